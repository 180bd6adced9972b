//! The import benchmark (not a timed test): how an import of a large image, and a copy of a stored
//! image into another region's store, compare with `cp`, `dd` and `sha256sum` of the same file on the
//! same disk, and how much memory each takes.
//!
//! ```sh
//! cargo bench --bench import -- --size-gib 4 --runs 5
//! ```
//!
//! Options: `--size-gib N` (default 4), `--runs N` (default 5), `--rss-gib 1,4` (sizes whose peak
//! RSS is reported; default 1 and N), `--dir PATH` (where the test files live; default
//! `$CARGO_TARGET_TMPDIR/import-bench`, i.e. `target/tmp/`, outside the git tree), `--no-prime`
//! (see below), `--compare-with PATH` (the bench binary of an earlier build: its imports are
//! measured in the same runs, the same way, for a before/after).
//!
//! The test file (N GiB of pseudo-random bytes, nothing sparse) is written once and reused. The
//! page cache cannot be dropped here (no root over the host's caches), so every run is
//! warm-cache: the figures compare CPU and memory-bandwidth costs, not the disk. Before each
//! measurement the previous outputs are removed and `sync` runs (not timed), so no step pays for
//! an earlier one's write-back.
//!
//! The machine is a shared 2-CPU VM, so each step first waits until the machine is idle, then
//! primes it (an untimed `cp` of the test file, removed again, and `sync`; `--no-prime` skips
//! that): writing into page-cache pages the guest freed a while ago costs several times more than
//! into pages freed just before, and priming puts every step, `cp` included, in the same state.
//! A step during which other processes used more than 0.3 s of CPU (`/proc/stat` minus this
//! process and its children) is repeated, up to 3 times; the report says how many were.
//!
//! Each import runs in a child process (this binary re-executed with `--child-import`), so its
//! peak RSS (`VmHWM` of `/proc/self/status`, read by the child when the import has ended) is the
//! import's alone; "extra" is that peak minus the child's RSS before the import started. The
//! http source is served by this process (a thread per connection, `std::io::copy` from the file,
//! which Linux turns into `sendfile`), with a Content-Length.
//!
//! The copy (`import::copy`, what ImageCopy uses) goes from one `file://` RegionStore to another
//! on the same disk: the test file is hard-linked into the source store as an image object, and
//! the child copies it, then reads the landed copy back with `import::hash_object` (timed
//! separately: what verifying a copy by re-reading it would cost).

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use ims_operator::{
    api::{DeclaredFormat, RegionStorage},
    fetch::FetchPolicy,
    import::{self, CopyRequest, Progress, Request},
    store::{RegionStore, StoreConfig},
};

const GIB: u64 = 1 << 30;
const MIB: f64 = (1 << 20) as f64;

struct Args {
    size_gib: u64,
    runs: usize,
    rss_gib: Vec<u64>,
    dir: PathBuf,
    prime: bool,
    /// Another build of this bench: its imports (`--child-import`) are measured too, alike.
    compare_with: Option<PathBuf>,
}

fn usage() -> ! {
    eprintln!(
        "usage: cargo bench --bench import -- [--size-gib N] [--runs N] [--rss-gib 1,4] [--dir PATH] [--no-prime]\n\
         [--compare-with EARLIER-BENCH-BINARY]\n\
         (defaults: 4 GiB, 5 runs, RSS at 1 GiB and N GiB, $CARGO_TARGET_TMPDIR/import-bench)"
    );
    std::process::exit(2)
}

fn parse_args(argv: &[String]) -> Args {
    let mut args = Args {
        size_gib: 4,
        runs: 5,
        rss_gib: Vec::new(),
        dir: PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("import-bench"),
        prime: true,
        compare_with: None,
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
            "--no-prime" => args.prime = false,
            "--compare-with" => args.compare_with = Some(PathBuf::from(value())),
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
        Some("--child-copy") => return child_copy(&argv[1..]),
        _ => {}
    }
    let args = parse_args(&argv);
    std::fs::create_dir_all(&args.dir).expect("create the bench directory");
    PRIME.store(args.prime, Ordering::Relaxed);
    let server = serve(args.dir.clone());

    let source = test_file(&args.dir, args.size_gib);
    let bytes = args.size_gib * GIB;
    eprintln!("# {} runs on {} ({} GiB)", args.runs, source.display(), args.size_gib);

    let mut runs: Vec<Run> = Vec::new();
    for run in 1..=args.runs {
        let r = measure(&args.dir, &source, server, args.compare_with.as_deref());
        eprintln!(
            "run {run}: cp {:.2}s, dd {:.2}s, sha256sum {:.2}s, import http {:.2}s (cpu {:.2}s), import file {:.2}s \
             (cpu {:.2}s), copy {:.2}s (cpu {:.2}s), re-read {:.2}s, read http {:.2}s, read file {:.2}s, sha2 {:.2}s",
            r.cp,
            r.dd,
            r.sha256sum,
            r.http.secs,
            r.http.cpu_secs,
            r.file.secs,
            r.file.cpu_secs,
            r.copy.secs,
            r.copy.cpu_secs,
            r.copy.reread_secs,
            r.drain_http,
            r.drain_file,
            r.hash
        );
        if let Some([http, file]) = &r.earlier {
            eprintln!(
                "run {run}, earlier build: import http {:.2}s (cpu {:.2}s), import file {:.2}s (cpu {:.2}s)",
                http.secs, http.cpu_secs, file.secs, file.cpu_secs
            );
        }
        runs.push(r);
    }

    // Peak RSS at each size (the main size's from the runs above).
    // Peak RSS at each size (the main size's from the runs above): import http, import file,
    // copy, and the earlier build's imports.
    let mut rss: Vec<(u64, Vec<u64>)> = Vec::new();
    for &gib in &args.rss_gib {
        if gib == args.size_gib {
            let peak = |f: &dyn Fn(&Run) -> Option<&ChildImport>| {
                runs.iter().filter_map(|r| f(r).map(ChildImport::extra_kib)).max().unwrap_or(0)
            };
            let mut row = vec![peak(&|r| Some(&r.http)), peak(&|r| Some(&r.file)), peak(&|r| Some(&r.copy))];
            if args.compare_with.is_some() {
                row.push(peak(&|r| r.earlier.as_ref().map(|e| &e[0])));
                row.push(peak(&|r| r.earlier.as_ref().map(|e| &e[1])));
            }
            rss.push((gib, row));
        } else {
            let path = test_file(&args.dir, gib);
            let digest = digest_of(&path);
            let import = |exe: &Path, url: &str| {
                steady("import", || import_in_child(exe, &args.dir, &path, url, Some(&digest))).extra_kib()
            };
            let this = std::env::current_exe().expect("current exe");
            let (http, file) = (http_url(server, &path), file_url(&path));
            let mut row = vec![import(&this, &http), import(&this, &file)];
            row.push(steady("copy", || copy_in_child(&args.dir, &path, &digest)).extra_kib());
            if let Some(earlier) = &args.compare_with {
                row.push(import(earlier, &http));
                row.push(import(earlier, &file));
            }
            rss.push((gib, row));
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
    let _ = std::fs::remove_file(path.with_extension("bin.sha256"));
    eprintln!("# wrote {} in {:.1}s", path.display(), started.elapsed().as_secs_f64());
    path
}

/// The sha256 of a test file (sha2, streamed), cached in `<file>.sha256`.
fn digest_of(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let cache = path.with_extension("bin.sha256");
    if let Ok(digest) = std::fs::read_to_string(&cache)
        && digest.trim().len() == 64
    {
        return digest.trim().to_string();
    }
    let mut file = std::fs::File::open(path).expect("open the test file");
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = file.read(&mut buf).expect("read the test file");
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let digest: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(&cache, &digest).expect("cache the digest");
    digest
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
    /// Copies only: reading the landed copy back and hashing it (`import::hash_object`).
    reread_secs: f64,
}

impl ChildImport {
    fn extra_kib(&self) -> u64 {
        self.hwm_kib.saturating_sub(self.base_kib)
    }
}

struct Run {
    cp: f64,
    /// `dd bs=256K`: the same copy through a user-space buffer, as any pipeline that must see the
    /// bytes (to hash them) has to do it.
    dd: f64,
    sha256sum: f64,
    http: ChildImport,
    file: ChildImport,
    /// `import::copy` from one file:// store to another.
    copy: ChildImport,
    /// `--compare-with`: the earlier build's imports, http:// and file://.
    earlier: Option<[ChildImport; 2]>,
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

fn measure(dir: &Path, source: &Path, server: SocketAddr, earlier: Option<&Path>) -> Run {
    let this = std::env::current_exe().expect("current exe");
    let bytes = std::fs::metadata(source).unwrap().len();
    let cp = steady("cp", || {
        let copy = dir.join("cp-copy.bin");
        settle(&copy);
        let window = Window::begin(dir, source);
        let (secs, _) = timed(Command::new("cp").arg(source).arg(&copy));
        let foreign = window.foreign_secs();
        assert_eq!(std::fs::metadata(&copy).unwrap().len(), bytes);
        settle(&copy);
        (secs, foreign)
    });
    let dd = steady("dd", || {
        let copy = dir.join("dd-copy.bin");
        settle(&copy);
        let window = Window::begin(dir, source);
        let (secs, _) = timed(
            Command::new("dd")
                .arg(format!("if={}", source.display()))
                .arg(format!("of={}", copy.display()))
                .args(["bs=256K", "status=none"]),
        );
        let foreign = window.foreign_secs();
        assert_eq!(std::fs::metadata(&copy).unwrap().len(), bytes);
        settle(&copy);
        (secs, foreign)
    });
    let (sha256sum, digest) = steady("sha256sum", || {
        let window = Window::begin(dir, source);
        let (secs, out) = timed(Command::new("sha256sum").arg(source));
        ((secs, out.split_whitespace().next().unwrap_or_default().to_string()), window.foreign_secs())
    });
    let (http_source, file_source) = (http_url(server, source), file_url(source));
    let import = |exe: &Path, url: &str| steady("import", || import_in_child(exe, dir, source, url, Some(&digest)));
    let http = import(&this, &http_source);
    let file = import(&this, &file_source);
    let earlier = earlier.map(|exe| [import(exe, &http_source), import(exe, &file_source)]);
    let copy = steady("copy", || copy_in_child(dir, source, &digest));
    let drain_http = steady("read http", || drain_in_child(dir, source, &http_url(server, source)));
    let drain_file = steady("read file", || drain_in_child(dir, source, &file_url(source)));
    let hash = steady("sha2", || {
        let window = Window::begin(dir, source);
        let secs = hash_in_memory(bytes);
        (secs, window.foreign_secs())
    });
    Run { cp, dd, sha256sum, http, file, copy, earlier, drain_http, drain_file, hash }
}

// -------------------------------------------------------------------------------------------------
// Steady measurements on a shared machine

/// Whether each step is preceded by priming (see [`Window::begin`]); `--no-prime` turns it off.
static PRIME: AtomicBool = AtomicBool::new(true);
/// Steps repeated because other processes used the CPU during them.
static REPEATED: AtomicUsize = AtomicUsize::new(0);
/// The most CPU other processes used during a step that was kept, in seconds.
static WORST_FOREIGN: Mutex<f64> = Mutex::new(0.0);

/// A step is repeated when other processes used more CPU than this during it.
const MAX_FOREIGN_SECS: f64 = 0.3;
/// ... at most this many times in all.
const ATTEMPTS: usize = 3;

/// Runs a step (`f` returns its result and the CPU other processes used during it), repeating
/// it when other processes disturbed it.
fn steady<T>(name: &str, mut f: impl FnMut() -> (T, f64)) -> T {
    for attempt in 1.. {
        let (result, foreign) = f();
        if foreign <= MAX_FOREIGN_SECS || attempt == ATTEMPTS {
            let mut worst = WORST_FOREIGN.lock().unwrap();
            *worst = worst.max(foreign);
            return result;
        }
        REPEATED.fetch_add(1, Ordering::Relaxed);
        eprintln!("# {name}: other processes used {foreign:.2} s of CPU during it; repeating it");
    }
    unreachable!()
}

/// CPU time in clock ticks: the machine's busy time (`/proc/stat`: user, nice, system, irq,
/// softirq), this process's and its waited-for children's (`/proc/self/stat`).
#[derive(Clone, Copy)]
struct CpuSample {
    machine: u64,
    own: u64,
}

impl CpuSample {
    fn now() -> Self {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let cpu: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        let field = |i: usize| cpu.get(i).copied().unwrap_or(0);
        let machine = field(0) + field(1) + field(2) + field(5) + field(6);
        CpuSample { machine, own: cpu_ticks() + children_cpu_ticks() }
    }
}

/// The timed part of a step.
struct Window(CpuSample);

impl Window {
    /// Waits until the machine is idle, then (unless `--no-prime`) primes it: an untimed `cp` of
    /// `source` into `dir`, removed again, and `sync`. That puts the source in the page cache
    /// and every step in the same state: on this VM, writing into page-cache pages that the
    /// guest freed a while ago (and the hypervisor took back) costs several times more than
    /// into pages freed just before.
    fn begin(dir: &Path, source: &Path) -> Self {
        wait_idle();
        if PRIME.load(Ordering::Relaxed) {
            let primed = dir.join("prime.bin");
            let status = Command::new("cp").arg(source).arg(&primed).status().expect("run cp");
            assert!(status.success(), "priming failed");
            settle(&primed);
        }
        Window(CpuSample::now())
    }

    /// Seconds of CPU that other processes (not this one or its children) used since `begin`.
    fn foreign_secs(&self) -> f64 {
        let now = CpuSample::now();
        let machine = now.machine.saturating_sub(self.0.machine) as f64;
        let own = now.own.saturating_sub(self.0.own) as f64;
        ((machine - own) / clock_ticks()).max(0.0)
    }
}

/// Waits (at most 2 minutes) until the machine has been idle, under 8% of one CPU busy, for two
/// seconds in a row.
fn wait_idle() {
    let started = Instant::now();
    let mut idle_seconds = 0;
    while idle_seconds < 2 {
        if started.elapsed() > Duration::from_secs(120) {
            eprintln!("# the machine did not become idle within 2 minutes; measuring anyway");
            return;
        }
        let before = CpuSample::now();
        std::thread::sleep(Duration::from_secs(1));
        let busy = CpuSample::now().machine.saturating_sub(before.machine) as f64 / clock_ticks();
        idle_seconds = if busy < 0.08 { idle_seconds + 1 } else { 0 };
    }
}

/// Reads the source through `fetch::open` in a child process and drops the bytes: seconds, and
/// the CPU other processes used meanwhile.
fn drain_in_child(dir: &Path, source: &Path, url: &str) -> (f64, f64) {
    let bytes = std::fs::metadata(source).unwrap().len();
    let exe = std::env::current_exe().expect("current exe");
    let window = Window::begin(dir, source);
    let out = Command::new(exe).arg("--child-drain").arg(url).stderr(Stdio::inherit()).output().expect("run the child");
    let foreign = window.foreign_secs();
    assert!(out.status.success(), "the child drain of {url} failed");
    let out = String::from_utf8_lossy(&out.stdout);
    let field = |key: &str| out.split_whitespace().find_map(|f| f.strip_prefix(key)).map(str::to_string);
    assert_eq!(field("size=").and_then(|v| v.parse::<u64>().ok()), Some(bytes), "the drain of {url} read every byte");
    (field("secs=").and_then(|v| v.parse().ok()).expect("secs"), foreign)
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

/// Runs one import of `source` (at `url`) in a child process (`exe`: this bench, or an earlier
/// build of it) into a fresh file:// store under `dir`; also returns the CPU other processes
/// used meanwhile.
fn import_in_child(exe: &Path, dir: &Path, source: &Path, url: &str, digest: Option<&str>) -> (ChildImport, f64) {
    let bytes = std::fs::metadata(source).unwrap().len();
    let store = dir.join("store");
    settle(&store);
    let window = Window::begin(dir, source);
    let out = Command::new(exe)
        .arg("--child-import")
        .arg(url)
        .arg(&store)
        .stderr(Stdio::inherit())
        .output()
        .expect("run the child import");
    let foreign = window.foreign_secs();
    assert!(out.status.success(), "the child import of {url} failed");
    let (result, size) = parse_child(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(size, bytes, "the import of {url} stored every byte");
    if let Some(digest) = digest {
        assert_eq!(result.sha256, digest, "the import's sha256 is sha256sum's");
    }
    settle(&store);
    (result, foreign)
}

/// Reads a child's `key=value` line: what it measured, and the size it stored.
fn parse_child(out: &str) -> (ChildImport, u64) {
    let mut result = ChildImport::default();
    let mut size = 0;
    for field in out.split_whitespace() {
        match field.split_once('=') {
            Some(("secs", v)) => result.secs = v.parse().unwrap(),
            Some(("cpu_ticks", v)) => result.cpu_secs = v.parse::<f64>().unwrap() / clock_ticks(),
            Some(("size", v)) => size = v.parse().unwrap(),
            Some(("sha256", v)) => result.sha256 = v.to_string(),
            Some(("base_kib", v)) => result.base_kib = v.parse().unwrap(),
            Some(("hwm_kib", v)) => result.hwm_kib = v.parse().unwrap(),
            Some(("reread_secs", v)) => result.reread_secs = v.parse().unwrap(),
            _ => {}
        }
    }
    (result, size)
}

/// Region stores of the copy: `dir/copy-stores/{src,dst}`, the test file hard-linked into `src`
/// as an image object. Runs one `import::copy` to `dst` in a child process; also returns the CPU
/// other processes used meanwhile.
fn copy_in_child(dir: &Path, source: &Path, digest: &str) -> (ChildImport, f64) {
    let stores = dir.join("copy-stores");
    settle(&stores);
    let object_dir = stores.join("src").join(COPY_OBJECT_DIR);
    std::fs::create_dir_all(&object_dir).expect("create the source store");
    std::fs::hard_link(source, object_dir.join("disk")).expect("link the test file into the source store");
    let exe = std::env::current_exe().expect("current exe");
    let window = Window::begin(dir, source);
    let out = Command::new(exe)
        .arg("--child-copy")
        .arg(&stores)
        .arg(digest)
        .stderr(Stdio::inherit())
        .output()
        .expect("run the child copy");
    let foreign = window.foreign_secs();
    assert!(out.status.success(), "the child copy failed");
    let (result, size) = parse_child(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(size, std::fs::metadata(source).unwrap().len(), "the copy stored every byte");
    assert_eq!(result.sha256, digest, "the copy's sha256 is the source's");
    let landed = stores.join("dst").join(COPY_OBJECT_DIR).join("disk");
    assert_eq!(std::fs::metadata(&landed).map(|m| m.len()).ok(), Some(size), "the copy landed in dst");
    settle(&stores);
    (result, foreign)
}

/// Where the copied object lives in both stores.
const COPY_OBJECT_DIR: &str = "bench/image/uid";

/// User + system CPU ticks of this process, all threads (`/proc/self/stat` utime + stime).
fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(") ").map(|(_, rest)| rest).unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After "(comm) ": state is field 3 of the man page, utime 14 and stime 15.
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    field(14) + field(15)
}

/// User + system CPU ticks of this process's waited-for children (`cutime` + `cstime`).
fn children_cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(") ").map(|(_, rest)| rest).unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    field(16) + field(17)
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

/// The child: `--child-copy <stores-dir> <sha256>`. Copies the `src` store's object into the
/// `dst` store with `import::copy` (runtime and stores as the operator has them), then reads the
/// landed copy back with `import::hash_object`; prints `secs= cpu_ticks= size= sha256= base_kib=
/// hwm_kib= reread_secs=` (the peak RSS is the copy's, read before the re-read).
fn child_copy(argv: &[String]) {
    let [stores, digest] = argv else { panic!("--child-copy <stores-dir> <sha256>") };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let line = runtime.block_on(async {
        let config = StoreConfig { file_url_root: "/var/lib/ims".into(), file_dir: PathBuf::from(stores) };
        let open = |region: &str| {
            let spec = RegionStorage { url: format!("file:///var/lib/ims/{region}"), ..Default::default() };
            RegionStore::open(&spec, &config, None).expect("open the store")
        };
        let (from, to) = (open("src"), open("dst"));
        let from_object = from.join(COPY_OBJECT_DIR).join("disk");
        let to_object = to.join(COPY_OBJECT_DIR).join("disk");
        let mut report = |_: u64, _: Option<u64>| {};
        let base_kib = proc_status_kib("VmRSS");
        let base_ticks = cpu_ticks();
        let started = Instant::now();
        let request =
            CopyRequest { from: &from, from_object: &from_object, to: &to, to_object: &to_object, sha256: digest };
        let copied = import::copy(request, Progress { every: Duration::from_secs(10), report: &mut report })
            .await
            .expect("copy");
        let secs = started.elapsed().as_secs_f64();
        let ticks = cpu_ticks() - base_ticks;
        let hwm_kib = proc_status_kib("VmHWM");
        let started = Instant::now();
        let (size, reread) = import::hash_object(&to, &to_object).await.expect("re-read the copy");
        let reread_secs = started.elapsed().as_secs_f64();
        assert_eq!((size, &reread), (copied.size, &copied.sha256), "the landed copy reads back the same");
        format!(
            "secs={secs} cpu_ticks={ticks} size={} sha256={} format={} base_kib={base_kib} hwm_kib={hwm_kib} \
             reread_secs={reread_secs}",
            copied.size,
            copied.sha256,
            copied.detected.format.as_api_str()
        )
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

/// Seconds of the earlier build's import (0: http://, 1: file://) in a run; NaN without one.
fn earlier_secs(r: &Run, i: usize) -> f64 {
    r.earlier.as_ref().map_or(f64::NAN, |e| e[i].secs)
}

fn print_report(args: &Args, bytes: u64, runs: &[Run], rss: &[(u64, Vec<u64>)]) {
    let of = |f: fn(&Run) -> f64| median(runs.iter().map(f).collect());
    let cp = of(|r| r.cp);
    let sha = of(|r| r.sha256sum);
    let http = of(|r| r.http.secs);
    let file = of(|r| r.file.secs);
    let copy = of(|r| r.copy.secs);
    let mibs = |secs: f64| bytes as f64 / MIB / secs;

    println!("\n### Import of {} GiB, median of {} warm-cache runs\n", args.size_gib, args.runs);
    println!(
        "Each step after waiting for an idle machine{}; {} steps repeated because other processes used more \
         than {MAX_FOREIGN_SECS} s of CPU during them; at most {:.2} s of CPU used by other processes during a \
         kept step.\n",
        if args.prime { " and priming (an untimed cp of the test file, removed, and sync)" } else { "" },
        REPEATED.load(Ordering::Relaxed),
        *WORST_FOREIGN.lock().unwrap()
    );
    println!("| step | median s | MiB/s | runs (s) | time / cp | time / sha256sum |");
    println!("|---|---:|---:|---|---:|---:|");
    let mut rows: Vec<Column> = vec![
        ("`cp` (same disk)", |r| r.cp),
        ("`dd bs=256K` (same copy, through user space)", |r| r.dd),
        ("`sha256sum`", |r| r.sha256sum),
        ("import, http:// source", |r| r.http.secs),
        ("import, file:// source", |r| r.file.secs),
        ("copy, file:// store to file:// store", |r| r.copy.secs),
        ("part: re-read + sha256 of the landed copy", |r| r.copy.reread_secs),
        ("part: read the http:// source only", |r| r.drain_http),
        ("part: read the file:// source only", |r| r.drain_file),
        ("part: sha2 sha256 in memory, 1 core", |r| r.hash),
    ];
    if args.compare_with.is_some() {
        rows.insert(5, ("earlier build: import, http:// source", |r| earlier_secs(r, 0)));
        rows.insert(6, ("earlier build: import, file:// source", |r| earlier_secs(r, 1)));
    }
    for (name, f) in rows {
        let secs = of(f);
        let list = runs.iter().map(|r| format!("{:.2}", f(r))).collect::<Vec<_>>().join(", ");
        println!("| {name} | {secs:.2} | {:.0} | {list} | {:.2} | {:.2} |", mibs(secs), secs / cp, secs / sha);
    }
    println!("\nGoal: import throughput >= 0.8x cp's (time_import <= time_cp / 0.8 = {:.2} s).", cp / 0.8);
    for (name, secs) in [("import http", http), ("import file", file), ("copy", copy)] {
        let ratio = cp / secs;
        let verdict = if ratio >= 0.8 { "met" } else { "NOT met" };
        println!("- {name}: throughput {ratio:.2}x cp's: {verdict}");
    }
    let (dd, hash, reread) = (of(|r| r.dd), of(|r| r.hash), of(|r| r.copy.reread_secs));
    println!(
        "- ceilings: sha256 on one core (every byte is hashed once, in order) allows at most {:.2}x cp's \
         throughput; reading a stored file back and hashing it, with no writing at all, reaches {:.2}x; a \
         copy through user space without hashing (dd) {:.2}x.",
        cp / hash,
        cp / reread,
        cp / dd
    );
    let cpu_http = of(|r| r.http.cpu_secs);
    let cpu_file = of(|r| r.file.cpu_secs);
    let cpu_copy = of(|r| r.copy.cpu_secs);
    println!(
        "\nCPU time of the child process (user + system, all threads; median): import http:// {cpu_http:.2} s \
         ({:.2} cores busy; the http server's sendfile runs in the bench process, not counted), \
         import file:// {cpu_file:.2} s ({:.2} cores busy), copy {cpu_copy:.2} s ({:.2} cores busy).",
        cpu_http / http,
        cpu_file / file,
        cpu_copy / copy
    );

    if let Some(earlier_build) = &args.compare_with {
        let earlier = |i: usize| median(runs.iter().map(|r| earlier_secs(r, i)).collect());
        println!(
            "\nEarlier build ({}): import http:// {:.2}x cp's throughput, file:// {:.2}x; this build is {:.2}x \
             (http://) and {:.2}x (file://) as fast.",
            earlier_build.display(),
            cp / earlier(0),
            cp / earlier(1),
            earlier(0) / http,
            earlier(1) / file
        );
    }

    println!("\n### Peak RSS (child process: VmHWM minus RSS before the import or copy; max of the runs)\n");
    let mut header = vec!["import, http://", "import, file://", "copy"];
    if args.compare_with.is_some() {
        header.extend(["earlier build: import, http://", "earlier build: import, file://"]);
    }
    println!("| size | {} |", header.join(" | "));
    println!("|---:|{}", "---:|".repeat(header.len()));
    for (gib, row) in rss {
        let cells: Vec<String> = row.iter().map(|kib| format!("{:.1} MiB", *kib as f64 / 1024.0)).collect();
        println!("| {gib} GiB | {} |", cells.join(" | "));
    }
}
