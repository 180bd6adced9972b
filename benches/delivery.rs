//! The image server benchmark (not a timed test): how fast `ims-operator`'s image server serves a
//! large image to curl over loopback, against nginx (Debian's package, `sendfile on`) serving the
//! same file in the same run; how its memory moves while it serves; and 100 parallel range
//! readers, each checking its bytes.
//!
//! ```sh
//! cargo bench --bench delivery -- --size-gib 4 --runs 5
//! ```
//!
//! The operator is the real binary, `ims-operator local --serve`, on a manifest directory with a
//! Region and one DataDisk Image imported from the test file (`file://`), so the URL measured is
//! the image's `status.location.url` as `-o wide` prints it. nginx serves the manifest
//! directory, where the test file is. Runs alternate between the two (nginx first), each a
//! `curl -s -o /dev/null` of the whole object; the report gives every run, the medians and their
//! ratio. The page cache holds the file after the import (24 GiB of RAM), so both read from
//! memory: the figures compare the servers, not the disk.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use clap::Parser;

#[path = "common/mod.rs"]
mod common;

const GIB: u64 = 1 << 30;

/// Flags.
#[derive(Parser, Debug)]
struct Args {
    /// Size of the image, GiB.
    #[arg(long, default_value_t = 4)]
    size_gib: u64,
    /// Downloads per server.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Parallel range readers.
    #[arg(long, default_value_t = 100)]
    readers: usize,
    /// Where the test file, the stores and nginx's files live (default: target/tmp/delivery-bench).
    #[arg(long)]
    dir: Option<PathBuf>,
    #[command(flatten)]
    _cargo: common::CargoBench,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A child that is killed when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-INT", &self.0.id().to_string()]).status();
        std::thread::sleep(Duration::from_millis(300));
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `ims-operator local --serve` on `manifests`: the process and the image's URL.
fn operator(manifests: &Path, data: &Path) -> (Running, String) {
    let _ = std::fs::remove_dir_all(data);
    let mut child = Command::new(env!("CARGO_BIN_EXE_ims-operator"))
        .args([
            "local",
            "-o",
            "wide",
            "--timeout",
            "900",
            "--serve",
            "127.0.0.1:0",
            "--image-server-addr",
            "127.0.0.1:0",
        ])
        .arg("-f")
        .arg(manifests)
        .arg("--data-dir")
        .arg(data)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ims-operator runs");
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    // The table (read from status below, through kubectl, rather than parsed).
    std::thread::spawn(move || stdout.lines().map_while(Result::ok).count());
    let mut said = String::new();
    while !said.contains("serving the API on") {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap_or(0) == 0 {
            panic!("ims-operator local stopped: {said}");
        }
        said.push_str(&line);
    }
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    let running = Running(child);
    let kubeconfig = data.join("kubeconfig");
    let out = Command::new("kubectl")
        .args(["get", "-n", "bench", "image.ims.io/big", "-o", "jsonpath={.status.phase} {.status.location.url}"])
        .env("KUBECONFIG", &kubeconfig)
        .output()
        .expect("kubectl runs");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (phase, url) = text.split_once(' ').unwrap_or(("", ""));
    assert_eq!(phase, "Active", "the image is not Active: {text} {}", String::from_utf8_lossy(&out.stderr));
    (running, url.to_string())
}

/// nginx (`sendfile on`, one worker, no access log) serving `root` on a free port.
fn nginx(dir: &Path, root: &Path) -> (Running, u16) {
    let port = free_port();
    let conf = dir.join("nginx.conf");
    let text = format!(
        "user root;\nworker_processes 1;\ndaemon off;\npid {pid};\nerror_log {err};\nevents {{ worker_connections 1024; }}\nhttp {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n  default_type application/octet-stream;\n  client_body_temp_path {tmp};\n  proxy_temp_path {tmp};\n  fastcgi_temp_path {tmp};\n  uwsgi_temp_path {tmp};\n  scgi_temp_path {tmp};\n  server {{ listen 127.0.0.1:{port}; root {root}; }}\n}}\n",
        pid = dir.join("nginx.pid").display(),
        err = dir.join("nginx.err").display(),
        tmp = dir.join("nginx-tmp").display(),
        root = root.display(),
    );
    std::fs::create_dir_all(dir.join("nginx-tmp")).unwrap();
    std::fs::write(&conf, text).unwrap();
    let child = Command::new("nginx")
        .arg("-c")
        .arg(&conf)
        .arg("-p")
        .arg(dir)
        .spawn()
        .expect("nginx runs (apt install nginx-light)");
    for _ in 0..100 {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (Running(child), port)
}

/// One curl of `url` to /dev/null: bytes and seconds.
fn curl(url: &str) -> (u64, f64) {
    let out = Command::new("curl")
        .args(["-s", "-f", "-o", "/dev/null", "-w", "%{size_download} %{time_total}", url])
        .output()
        .expect("curl runs");
    assert!(out.status.success(), "curl {url} failed");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (bytes, secs) = text.split_once(' ').unwrap();
    (bytes.parse().unwrap(), secs.parse().unwrap())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `readers` threads, each GETting one range of `url` over its own connection and checking it
/// against the file: the failures.
fn range_readers(url: &str, file: &Path, readers: usize) -> Vec<String> {
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_at(rest.find('/').unwrap());
    let len = std::fs::metadata(file).unwrap().len();
    let threads: Vec<_> = (0..readers as u64)
        .map(|i| {
            let (host, path, file) = (host.to_string(), path.to_string(), file.to_path_buf());
            std::thread::spawn(move || -> Result<(), String> {
                let start = (i * 104_729 * 4096) % (len - (1 << 20));
                let end = start + (1 << 20) - 1;
                let mut s = TcpStream::connect(&host).map_err(|e| e.to_string())?;
                write!(
                    s,
                    "GET {path} HTTP/1.1\r\nHost: {host}\r\nRange: bytes={start}-{end}\r\nConnection: close\r\n\r\n"
                )
                .map_err(|e| e.to_string())?;
                let mut answer = Vec::new();
                s.read_to_end(&mut answer).map_err(|e| e.to_string())?;
                let at = answer.windows(4).position(|w| w == b"\r\n\r\n").ok_or("no head")? + 4;
                if !answer.starts_with(b"HTTP/1.1 206") {
                    return Err(format!("reader {i}: {}", String::from_utf8_lossy(&answer[..at.min(40)])));
                }
                let mut want = vec![0u8; (end - start + 1) as usize];
                std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(&file).unwrap(), &mut want, start)
                    .map_err(|e| e.to_string())?;
                (answer[at..] == want[..]).then_some(()).ok_or(format!("reader {i}: wrong bytes"))
            })
        })
        .collect();
    threads.into_iter().filter_map(|t| t.join().unwrap().err()).collect()
}

fn main() {
    let args = Args::parse();
    let dir = args.dir.clone().unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("delivery-bench"));
    let manifests = dir.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    let file = common::test_file(&dir, "delivery-bench", args.size_gib, 0x9E37_79B9_7F4A_7C15);
    let served = manifests.join("big.bin");
    let _ = std::fs::remove_file(&served);
    std::fs::hard_link(&file, &served).expect("link the test file next to the manifests");
    std::fs::write(
        manifests.join("bench.yaml"),
        "apiVersion: ims.io/v1alpha1\nkind: Region\nmetadata: {name: bench}\nspec: {storage: {url: \"file:///var/lib/ims/bench\"}}\n---\napiVersion: ims.io/v1alpha1\nkind: Image\nmetadata: {name: big, namespace: bench}\nspec: {region: bench, type: DataDisk, source: {url: {url: \"file://./big.bin\", format: Raw}}}\n",
    )
    .unwrap();
    eprintln!("# importing {} GiB into ims-operator local...", args.size_gib);
    let started = Instant::now();
    let (operator, url) = operator(&manifests, &dir.join("data"));
    eprintln!("# imported in {:.1}s; serving {url}", started.elapsed().as_secs_f64());
    let (_nginx, port) = nginx(&dir, &manifests);
    let nginx_url = format!("http://127.0.0.1:{port}/big.bin");
    let pid = operator.0.id().to_string();
    // Warm both (and the page cache) once, untimed.
    curl(&nginx_url);
    curl(&url);
    let rss_before = common::status_kib(&pid, "VmRSS");
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(rss_before));
    let watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (peak, watching, pid) = (peak.clone(), watching.clone(), pid.clone());
        std::thread::spawn(move || {
            while watching.load(std::sync::atomic::Ordering::Relaxed) {
                peak.fetch_max(common::status_kib(&pid, "VmRSS"), std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let (mut ims, mut reference) = (Vec::new(), Vec::new());
    println!("| run | nginx GB/s | ims-operator GB/s |\n|---:|---:|---:|");
    for run in 1..=args.runs {
        let (bytes, secs) = curl(&nginx_url);
        assert_eq!(bytes, args.size_gib * GIB);
        let n = bytes as f64 / secs / 1e9;
        let (bytes, secs) = curl(&url);
        assert_eq!(bytes, args.size_gib * GIB);
        let i = bytes as f64 / secs / 1e9;
        println!("| {run} | {n:.2} | {i:.2} |");
        reference.push(n);
        ims.push(i);
    }
    watching.store(false, std::sync::atomic::Ordering::Relaxed);
    sampler.join().unwrap();
    let (n, i) = (median(reference), median(ims));
    println!("\nmedian: nginx {n:.2} GB/s, ims-operator {i:.2} GB/s: **{:.2}x** nginx", i / n);
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "ims-operator RSS: {rss_before} KiB before the downloads, at most {peak} KiB during them (+{} KiB)",
        peak.saturating_sub(rss_before)
    );
    let failures = range_readers(&url, &file, args.readers);
    println!("{} parallel 1 MiB range readers: {} failed {failures:?}", args.readers, failures.len());
    assert!(failures.is_empty());
}
