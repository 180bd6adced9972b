//! The import benchmark (not a timed test): how an import of a large image compares with `cp` and
//! `sha256sum` of the same file on the same disk, and how much memory an import takes.
//!
//! ```sh
//! cargo bench --bench import -- --size-gib 4 --runs 3
//! ```
//!
//! Options: `--size-gib N` (default 4), `--runs N` (default 3), `--rss-gib 1,4` (sizes whose peak
//! RSS is reported; default 1 and N), `--dir PATH` (where the test files live; default
//! `$CARGO_TARGET_TMPDIR/import-bench`, i.e. `target/tmp/`, outside the git tree).
//!
//! The test file (N GiB of pseudo-random bytes, nothing sparse) is written once and reused. The
//! page cache cannot be dropped here (no root over the host's caches), so every run is
//! warm-cache: the figures compare CPU and memory-bandwidth costs, not the disk. Before each
//! measurement the previous outputs are removed and `sync` runs (not timed), so no step pays for
//! an earlier one's write-back.
//!
//! Each import runs in a child process (this binary re-executed with `--child-import`), so its
//! peak RSS (`VmHWM` of `/proc/self/status`, read by the child when the import has ended) is the
//! import's alone; "extra" is that peak minus the child's RSS before the import started. The
//! http source is served by this process (a thread per connection, `std::io::copy` from the file,
//! which Linux turns into `sendfile`), with a Content-Length.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use ims_operator::{
    api::{DeclaredFormat, RegionStorage},
    fetch::FetchPolicy,
    import::{self, Progress, Request},
    store::{RegionStore, StoreConfig},
};

const GIB: u64 = 1 << 30;
const MIB: f64 = (1 << 20) as f64;

struct Args {
    size_gib: u64,
    runs: usize,
    rss_gib: Vec<u64>,
    dir: PathBuf,
}

fn usage() -> ! {
    eprintln!(
        "usage: cargo bench --bench import -- [--size-gib N] [--runs N] [--rss-gib 1,4] [--dir PATH]\n\
         (defaults: 4 GiB, 3 runs, RSS at 1 GiB and N GiB, $CARGO_TARGET_TMPDIR/import-bench)"
    );
    std::process::exit(2)
}

fn parse_args(argv: &[String]) -> Args {
    let mut args = Args {
        size_gib: 4,
        runs: 3,
        rss_gib: Vec::new(),
        dir: PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("import-bench"),
    };
    let mut it = argv.iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().cloned().unwrap_or_else(|| usage());
        match arg.as_str() {
            "--size-gib" => args.size_gib = value().parse().unwrap_or_else(|_| usage()),
            "--runs" => args.runs = value().parse().unwrap_or_else(|_| usage()),
            "--rss-gib" => {
                args.rss_gib = value().split(',').map(|s| s.trim().parse().unwrap_or_else(|_| usage())).collect()
            }
            "--dir" => args.dir = PathBuf::from(value()),
            // cargo bench passes --bench to harness = false targets.
            "--bench" => {}
            "-h" | "--help" => usage(),
            _ => {
                eprintln!("unknown argument {arg:?}");
                usage()
            }
        }
    }
    if args.size_gib == 0 || args.runs == 0 {
        usage();
    }
    if args.rss_gib.is_empty() {
        args.rss_gib = if args.size_gib > 1 { vec![1, args.size_gib] } else { vec![1] };
    }
    args
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    match argv.first().map(String::as_str) {
        Some("--child-import") => return child_import(&argv[1..]),
        Some("--child-drain") => return child_drain(&argv[1..]),
        _ => {}
    }
    let args = parse_args(&argv);
    std::fs::create_dir_all(&args.dir).expect("create the bench directory");
    let server = serve(args.dir.clone());

    let source = test_file(&args.dir, args.size_gib);
    let bytes = args.size_gib * GIB;
    eprintln!("# {} runs on {} ({} GiB)", args.runs, source.display(), args.size_gib);

    let mut runs: Vec<Run> = Vec::new();
    for run in 1..=args.runs {
        let r = measure(&args.dir, &source, server);
        eprintln!(
            "run {run}: cp {:.2}s, sha256sum {:.2}s, import http {:.2}s (cpu {:.2}s), import file {:.2}s \
             (cpu {:.2}s), read http {:.2}s, read file {:.2}s, sha2 {:.2}s",
            r.cp,
            r.sha256sum,
            r.http.secs,
            r.http.cpu_secs,
            r.file.secs,
            r.file.cpu_secs,
            r.drain_http,
            r.drain_file,
            r.hash
        );
        runs.push(r);
    }

    // Peak RSS at each size (the main size's from the runs above).
    let mut rss: Vec<(u64, u64, u64)> = Vec::new();
    for &gib in &args.rss_gib {
        if gib == args.size_gib {
            let http = runs.iter().map(|r| r.http.extra_kib()).max().unwrap_or(0);
            let file = runs.iter().map(|r| r.file.extra_kib()).max().unwrap_or(0);
            rss.push((gib, http, file));
        } else {
            let path = test_file(&args.dir, gib);
            let http = import_in_child(&args.dir, &http_url(server, &path), gib * GIB, None);
            let file = import_in_child(&args.dir, &file_url(&path), gib * GIB, None);
            rss.push((gib, http.extra_kib(), file.extra_kib()));
        }
    }
    print_report(&args, bytes, &runs, &rss);
}

// -------------------------------------------------------------------------------------------------
// The test file

/// `dir/import-bench-<N>GiB.bin`: N GiB of xorshift64 output, written once and reused.
fn test_file(dir: &Path, gib: u64) -> PathBuf {
    let path = dir.join(format!("import-bench-{gib}GiB.bin"));
    if std::fs::metadata(&path).is_ok_and(|m| m.len() == gib * GIB) {
        return path;
    }
    let started = Instant::now();
    let partial = dir.join(format!("import-bench-{gib}GiB.bin.partial"));
    let mut file = std::fs::File::create(&partial).expect("create the test file");
    let mut state: u64 = 0x2545_F491_4F6C_DD1D ^ gib;
    let mut block = vec![0u8; 8 << 20];
    for _ in 0..(gib * GIB) / block.len() as u64 {
        for word in block.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        file.write_all(&block).expect("write the test file");
    }
    file.sync_all().expect("sync the test file");
    drop(file);
    std::fs::rename(&partial, &path).expect("rename the test file");
    eprintln!("# wrote {} in {:.1}s", path.display(), started.elapsed().as_secs_f64());
    path
}

// -------------------------------------------------------------------------------------------------
// The http source

/// Serves the files of `dir` on 127.0.0.1: `GET /<name>` answers the file with a Content-Length.
fn serve(dir: PathBuf) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let dir = dir.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(&stream);
                let mut request = String::new();
                if reader.read_line(&mut request).is_err() {
                    return;
                }
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                let name = request.split_whitespace().nth(1).unwrap_or("/").trim_start_matches('/').to_string();
                let mut out = &stream;
                let file = (!name.contains('/') && !name.is_empty()).then(|| std::fs::File::open(dir.join(&name)));
                match file {
                    Some(Ok(mut file)) => {
                        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
                        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n");
                        if out.write_all(head.as_bytes()).is_ok() {
                            let _ = std::io::copy(&mut file, &mut out);
                        }
                    }
                    _ => {
                        let _ =
                            out.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                    }
                }
            });
        }
    });
    addr
}

fn http_url(server: SocketAddr, path: &Path) -> String {
    format!("http://{server}/{}", path.file_name().unwrap().to_string_lossy())
}

fn file_url(path: &Path) -> String {
    format!("file://{}", path.display())
}

// -------------------------------------------------------------------------------------------------
// Measurements

/// What one child import reported.
#[derive(Clone, Debug, Default)]
struct ChildImport {
    secs: f64,
    /// CPU time (user + system, all threads) the import took.
    cpu_secs: f64,
    sha256: String,
    base_kib: u64,
    hwm_kib: u64,
}

impl ChildImport {
    fn extra_kib(&self) -> u64 {
        self.hwm_kib.saturating_sub(self.base_kib)
    }
}

struct Run {
    cp: f64,
    sha256sum: f64,
    http: ChildImport,
    file: ChildImport,
    /// Only reading the source (`fetch::open`, chunks dropped), in a child.
    drain_http: f64,
    drain_file: f64,
    /// sha2 (the import's hasher) over the same number of bytes in memory.
    hash: f64,
}

/// Removes what an earlier step wrote and flushes dirty pages, so the next step starts clean.
fn settle(path: &Path) {
    if path.is_dir() {
        let _ = std::fs::remove_dir_all(path);
    } else {
        let _ = std::fs::remove_file(path);
    }
    let _ = Command::new("sync").status();
}

fn timed(cmd: &mut Command) -> (f64, String) {
    let started = Instant::now();
    let out = cmd.stderr(Stdio::inherit()).output().expect("run a command");
    let secs = started.elapsed().as_secs_f64();
    assert!(out.status.success(), "{cmd:?} failed");
    (secs, String::from_utf8_lossy(&out.stdout).into_owned())
}

fn measure(dir: &Path, source: &Path, server: SocketAddr) -> Run {
    let bytes = std::fs::metadata(source).unwrap().len();
    let copy = dir.join("cp-copy.bin");
    settle(&copy);
    let (cp, _) = timed(Command::new("cp").arg(source).arg(&copy));
    assert_eq!(std::fs::metadata(&copy).unwrap().len(), bytes);
    settle(&copy);

    let (sha256sum, out) = timed(Command::new("sha256sum").arg(source));
    let digest = out.split_whitespace().next().unwrap_or_default().to_string();

    let http = import_in_child(dir, &http_url(server, source), bytes, Some(&digest));
    let file = import_in_child(dir, &file_url(source), bytes, Some(&digest));
    let drain_http = drain_in_child(&http_url(server, source), bytes);
    let drain_file = drain_in_child(&file_url(source), bytes);
    let hash = hash_in_memory(bytes);
    Run { cp, sha256sum, http, file, drain_http, drain_file, hash }
}

/// Reads the source through `fetch::open` in a child process and drops the bytes: seconds.
fn drain_in_child(url: &str, bytes: u64) -> f64 {
    let exe = std::env::current_exe().expect("current exe");
    let out = Command::new(exe).arg("--child-drain").arg(url).stderr(Stdio::inherit()).output().expect("run the child");
    assert!(out.status.success(), "the child drain of {url} failed");
    let out = String::from_utf8_lossy(&out.stdout);
    let field = |key: &str| out.split_whitespace().find_map(|f| f.strip_prefix(key)).map(str::to_string);
    assert_eq!(field("size=").and_then(|v| v.parse::<u64>().ok()), Some(bytes), "the drain of {url} read every byte");
    field("secs=").and_then(|v| v.parse().ok()).expect("secs")
}

/// sha256 (the sha2 crate, as the import uses it) of `bytes` bytes, fed 1 MiB at a time from a
/// 16 MiB buffer that stays in memory: the hashing ceiling of one core.
fn hash_in_memory(bytes: u64) -> f64 {
    use sha2::{Digest, Sha256};
    let buffer: Vec<u8> = (0..16u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let started = Instant::now();
    let mut hasher = Sha256::new();
    let mut left = bytes;
    while left > 0 {
        for chunk in buffer.chunks(1 << 20) {
            let n = (chunk.len() as u64).min(left) as usize;
            hasher.update(&chunk[..n]);
            left -= n as u64;
            if left == 0 {
                break;
            }
        }
    }
    std::hint::black_box(hasher.finalize());
    started.elapsed().as_secs_f64()
}

/// Runs one import in a child process into a fresh file:// store under `dir`.
fn import_in_child(dir: &Path, url: &str, bytes: u64, digest: Option<&str>) -> ChildImport {
    let store = dir.join("store");
    settle(&store);
    let exe = std::env::current_exe().expect("current exe");
    let out = Command::new(exe)
        .arg("--child-import")
        .arg(url)
        .arg(&store)
        .stderr(Stdio::inherit())
        .output()
        .expect("run the child import");
    assert!(out.status.success(), "the child import of {url} failed");
    let mut result = ChildImport::default();
    let mut size = 0;
    for field in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        match field.split_once('=') {
            Some(("secs", v)) => result.secs = v.parse().unwrap(),
            Some(("cpu_ticks", v)) => result.cpu_secs = v.parse::<f64>().unwrap() / clock_ticks(),
            Some(("size", v)) => size = v.parse().unwrap(),
            Some(("sha256", v)) => result.sha256 = v.to_string(),
            Some(("base_kib", v)) => result.base_kib = v.parse().unwrap(),
            Some(("hwm_kib", v)) => result.hwm_kib = v.parse().unwrap(),
            _ => {}
        }
    }
    assert_eq!(size, bytes, "the import of {url} stored every byte");
    if let Some(digest) = digest {
        assert_eq!(result.sha256, digest, "the import's sha256 is sha256sum's");
    }
    settle(&store);
    result
}

/// User + system CPU ticks of this process, all threads (`/proc/self/stat` utime + stime).
fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(") ").map(|(_, rest)| rest).unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After "(comm) ": state is field 3 of the man page, utime 14 and stime 15.
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    field(14) + field(15)
}

/// Clock ticks a second (`getconf CLK_TCK`; 100 on Linux).
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// `VmHWM` (peak RSS) or `VmRSS` of this process, in KiB.
fn proc_status_kib(key: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.trim_start_matches(':').split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The child: `--child-import <url> <store-dir>`. Imports with the operator's code paths (a
/// multi-thread runtime like `#[tokio::main]`, a file:// RegionStore) and prints
/// `secs= cpu_ticks= size= sha256= format= base_kib= hwm_kib=`.
fn child_import(argv: &[String]) {
    let [url, store_dir] = argv else { panic!("--child-import <url> <store-dir>") };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let line = runtime.block_on(async {
        let config = StoreConfig { file_url_root: "/var/lib/ims".into(), file_dir: PathBuf::from(store_dir) };
        let spec = RegionStorage { url: "file:///var/lib/ims/bench".into(), ..Default::default() };
        let store = RegionStore::open(&spec, &config, None).expect("open the store");
        let policy =
            FetchPolicy { allow_file: true, allow_cidrs: vec!["127.0.0.0/8".parse().unwrap()], ..Default::default() };
        let object = store.image_prefix("bench", "image", "uid").join("disk");
        let request = Request { url, checksum: None, declared: DeclaredFormat::Auto, limit: u64::MAX };
        let mut report = |_: u64, _: Option<u64>| {};
        let base_kib = proc_status_kib("VmRSS");
        let base_ticks = cpu_ticks();
        let started = Instant::now();
        let imported = import::import(
            &store,
            &object,
            request,
            &policy,
            Progress { every: Duration::from_secs(10), report: &mut report },
        )
        .await
        .expect("import");
        let secs = started.elapsed().as_secs_f64();
        let ticks = cpu_ticks() - base_ticks;
        let hwm_kib = proc_status_kib("VmHWM");
        format!(
            "secs={secs} cpu_ticks={ticks} size={} sha256={} format={} base_kib={base_kib} hwm_kib={hwm_kib}",
            imported.size,
            imported.sha256,
            imported.detected.format.as_api_str()
        )
    });
    println!("{line}");
}

/// The child: `--child-drain <url>`. Reads the source as an import would (same runtime, same
/// fetch policy) without hashing or storing; prints `secs= size=`.
fn child_drain(argv: &[String]) {
    use futures::StreamExt;
    let [url] = argv else { panic!("--child-drain <url>") };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let line = runtime.block_on(async {
        let policy =
            FetchPolicy { allow_file: true, allow_cidrs: vec!["127.0.0.0/8".parse().unwrap()], ..Default::default() };
        let started = Instant::now();
        let mut source = ims_operator::fetch::open(url, &policy).await.expect("open the source");
        let mut size = 0u64;
        while let Some(chunk) = source.stream.next().await {
            size += chunk.expect("read the source").len() as u64;
        }
        format!("secs={} size={size}", started.elapsed().as_secs_f64())
    });
    println!("{line}");
}

// -------------------------------------------------------------------------------------------------
// Report

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

/// One row of the report: its name and the seconds of each run.
type Column = (&'static str, fn(&Run) -> f64);

fn print_report(args: &Args, bytes: u64, runs: &[Run], rss: &[(u64, u64, u64)]) {
    let of = |f: fn(&Run) -> f64| median(runs.iter().map(f).collect());
    let cp = of(|r| r.cp);
    let sha = of(|r| r.sha256sum);
    let http = of(|r| r.http.secs);
    let file = of(|r| r.file.secs);
    let mibs = |secs: f64| bytes as f64 / MIB / secs;

    println!("\n### Import of {} GiB, median of {} warm-cache runs\n", args.size_gib, args.runs);
    println!("| step | median s | MiB/s | runs (s) | time / cp | time / sha256sum |");
    println!("|---|---:|---:|---|---:|---:|");
    let rows: [Column; 7] = [
        ("`cp` (same disk)", |r| r.cp),
        ("`sha256sum`", |r| r.sha256sum),
        ("import, http:// source", |r| r.http.secs),
        ("import, file:// source", |r| r.file.secs),
        ("part: read the http:// source only", |r| r.drain_http),
        ("part: read the file:// source only", |r| r.drain_file),
        ("part: sha2 sha256 in memory, 1 core", |r| r.hash),
    ];
    for (name, f) in rows {
        let secs = of(f);
        let list = runs.iter().map(|r| format!("{:.2}", f(r))).collect::<Vec<_>>().join(", ");
        println!("| {name} | {secs:.2} | {:.0} | {list} | {:.2} | {:.2} |", mibs(secs), secs / cp, secs / sha);
    }
    println!("\nGoal: import throughput >= 0.8x cp's (time_import <= time_cp / 0.8 = {:.2} s).", cp / 0.8);
    for (name, secs) in [("http", http), ("file", file)] {
        let ratio = cp / secs;
        let verdict = if ratio >= 0.8 { "met" } else { "NOT met" };
        println!("- {name}: throughput {ratio:.2}x cp's: {verdict}");
    }
    let cpu_http = of(|r| r.http.cpu_secs);
    let cpu_file = of(|r| r.file.cpu_secs);
    println!(
        "\nCPU time of the import process (user + system, all threads; median): http:// {cpu_http:.2} s \
         ({:.2} cores busy; the http server's sendfile runs in the bench process, not counted), \
         file:// {cpu_file:.2} s ({:.2} cores busy).",
        cpu_http / http,
        cpu_file / file
    );

    println!("\n### Peak RSS of one import (child process: VmHWM minus RSS before the import)\n");
    println!("| size | import, http:// | import, file:// |");
    println!("|---:|---:|---:|");
    for (gib, http, file) in rss {
        println!("| {gib} GiB | {:.1} MiB | {:.1} MiB |", *http as f64 / 1024.0, *file as f64 / 1024.0);
    }
}
