//! The imports, copies and reads, each in a child process (this binary re-executed with
//! `--child-import`, `--child-copy` or `--child-drain`, or an earlier build of it), so that its
//! peak RSS is its own: the parent's side (spawn, check, read the child's `key=value` line) and
//! the child's.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use ims_operator::{
    api::{DeclaredFormat, RegionStorage},
    fetch::FetchPolicy,
    import::{self, CopyRequest, Progress, Request},
    store::{RegionStore, StoreConfig},
};

use crate::{
    common::status_kib,
    measure::settle,
    sampler::{Window, clock_ticks, cpu_ticks},
};

/// What one child import reported.
#[derive(Clone, Debug, Default)]
pub struct ChildImport {
    pub secs: f64,
    /// CPU time (user + system, all threads) the import took.
    pub cpu_secs: f64,
    pub sha256: String,
    base_kib: u64,
    hwm_kib: u64,
    /// Copies only: reading the landed copy back and hashing it (`import::hash_object`).
    pub reread_secs: f64,
}

impl ChildImport {
    pub fn extra_kib(&self) -> u64 {
        self.hwm_kib.saturating_sub(self.base_kib)
    }
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

/// Runs `exe` with `args` in a window (see [`Window`]): its stdout, and the CPU other processes
/// used meanwhile.
fn run_child(exe: &Path, args: &[&OsStr], dir: &Path, source: &Path, what: &str) -> (String, f64) {
    let window = Window::begin(dir, source);
    let out = Command::new(exe).args(args).stderr(Stdio::inherit()).output().expect("run the child");
    let foreign = window.foreign_secs();
    assert!(out.status.success(), "the child {what} failed");
    (String::from_utf8_lossy(&out.stdout).into_owned(), foreign)
}

/// Runs one import of `source` (at `url`) in a child process (`exe`: this bench, or an earlier
/// build of it) into a fresh file:// store under `dir`; also returns the CPU other processes
/// used meanwhile.
pub fn import_in_child(exe: &Path, dir: &Path, source: &Path, url: &str, digest: &str) -> (ChildImport, f64) {
    let bytes = std::fs::metadata(source).unwrap().len();
    let store = dir.join("store");
    settle(&store);
    let args = [OsStr::new("--child-import"), OsStr::new(url), store.as_os_str()];
    let (out, foreign) = run_child(exe, &args, dir, source, &format!("import of {url}"));
    let (result, size) = parse_child(&out);
    assert_eq!(size, bytes, "the import of {url} stored every byte");
    assert_eq!(result.sha256, digest, "the import's sha256 is sha256sum's");
    settle(&store);
    (result, foreign)
}

/// Region stores of the copy: `dir/copy-stores/{src,dst}`, the test file hard-linked into `src`
/// as an image object. Runs one `import::copy` to `dst` in a child process; also returns the CPU
/// other processes used meanwhile.
pub fn copy_in_child(dir: &Path, source: &Path, digest: &str) -> (ChildImport, f64) {
    let stores = dir.join("copy-stores");
    settle(&stores);
    let object_dir = stores.join("src").join(COPY_OBJECT_DIR);
    std::fs::create_dir_all(&object_dir).expect("create the source store");
    std::fs::hard_link(source, object_dir.join("disk")).expect("link the test file into the source store");
    let exe = std::env::current_exe().expect("current exe");
    let args = [OsStr::new("--child-copy"), stores.as_os_str(), OsStr::new(digest)];
    let (out, foreign) = run_child(&exe, &args, dir, source, "copy");
    let (result, size) = parse_child(&out);
    assert_eq!(size, std::fs::metadata(source).unwrap().len(), "the copy stored every byte");
    assert_eq!(result.sha256, digest, "the copy's sha256 is the source's");
    let landed = stores.join("dst").join(COPY_OBJECT_DIR).join("disk");
    assert_eq!(std::fs::metadata(&landed).map(|m| m.len()).ok(), Some(size), "the copy landed in dst");
    settle(&stores);
    (result, foreign)
}

/// Reads the source through `fetch::open` in a child process and drops the bytes: seconds, and
/// the CPU other processes used meanwhile.
pub fn drain_in_child(dir: &Path, source: &Path, url: &str) -> (f64, f64) {
    let bytes = std::fs::metadata(source).unwrap().len();
    let exe = std::env::current_exe().expect("current exe");
    let args = [OsStr::new("--child-drain"), OsStr::new(url)];
    let (out, foreign) = run_child(&exe, &args, dir, source, &format!("drain of {url}"));
    let field = |key: &str| out.split_whitespace().find_map(|f| f.strip_prefix(key)).map(str::to_string);
    assert_eq!(field("size=").and_then(|v| v.parse::<u64>().ok()), Some(bytes), "the drain of {url} read every byte");
    (field("secs=").and_then(|v| v.parse().ok()).expect("secs"), foreign)
}

/// Where the copied object lives in both stores.
const COPY_OBJECT_DIR: &str = "bench/image/uid";

// -------------------------------------------------------------------------------------------------
// The children

/// Runs `f` on a multi-thread runtime like `#[tokio::main]`'s, as the operator does, and prints
/// the line it returns.
fn child(f: impl std::future::Future<Output = String>) {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    println!("{}", runtime.block_on(f));
}

/// The fetch policy of the children: file:// and 127.0.0.0/8 (the bench's server) allowed.
fn policy() -> FetchPolicy {
    // (The bench reads its own files wherever its temporary directory is.)
    FetchPolicy {
        allow_file: true,
        file_roots: vec!["/".into()],
        allow_cidrs: vec!["127.0.0.0/8".parse().unwrap()],
        ..Default::default()
    }
}

fn file_store(root: &str, region: &str) -> RegionStore {
    let config = StoreConfig { file_url_root: "/var/lib/ims".into(), file_dir: PathBuf::from(root) };
    let spec = RegionStorage { url: format!("file:///var/lib/ims/{region}"), ..Default::default() };
    RegionStore::open(&spec, &config, None).expect("open the store")
}

/// What a child measures of the import or copy it runs: time, CPU ticks, RSS before and peak.
struct Meter {
    base_kib: u64,
    base_ticks: u64,
    started: Instant,
}

impl Meter {
    fn start() -> Self {
        Meter { base_kib: status_kib("self", "VmRSS"), base_ticks: cpu_ticks(), started: Instant::now() }
    }

    /// What it measured: `secs= cpu_ticks=`, and `base_kib= hwm_kib=`.
    fn stop(&self) -> (String, String) {
        let secs = self.started.elapsed().as_secs_f64();
        let ticks = cpu_ticks() - self.base_ticks;
        let hwm_kib = status_kib("self", "VmHWM");
        (format!("secs={secs} cpu_ticks={ticks}"), format!("base_kib={} hwm_kib={hwm_kib}", self.base_kib))
    }
}

/// The child: `--child-import <url> <store-dir>`. Imports with the operator's code paths (a
/// multi-thread runtime like `#[tokio::main]`, a file:// RegionStore) and prints
/// `secs= cpu_ticks= size= sha256= format= base_kib= hwm_kib=`.
pub fn child_import(url: &str, store_dir: &str) {
    child(async {
        let store = file_store(store_dir, "bench");
        let object = store.image_prefix("bench", "image", "uid").join("disk");
        let request = Request {
            url,
            checksum: None,
            declared: DeclaredFormat::Auto,
            limit: u64::MAX,
            image_type: None,
            encrypt: None,
        };
        let mut report = |_: u64, _: Option<u64>| {};
        let meter = Meter::start();
        let progress = Progress { every: Duration::from_secs(10), report: &mut report };
        let imported = import::import(&store, &object, request, &policy(), progress).await.expect("import");
        let (time, memory) = meter.stop();
        let format = imported.detected.format.as_api_str();
        format!("{time} size={} sha256={} format={format} {memory}", imported.size, imported.sha256)
    })
}

/// The child: `--child-drain <url>`. Reads the source as an import would (same runtime, same
/// fetch policy) without hashing or storing; prints `secs= size=`.
pub fn child_drain(url: &str) {
    use futures::StreamExt;
    child(async {
        let started = Instant::now();
        let mut source = ims_operator::fetch::open(url, &policy()).await.expect("open the source");
        let mut size = 0u64;
        while let Some(chunk) = source.stream.next().await {
            size += chunk.expect("read the source").len() as u64;
        }
        format!("secs={} size={size}", started.elapsed().as_secs_f64())
    })
}

/// The child: `--child-copy <stores-dir> <sha256>`. Copies the `src` store's object into the
/// `dst` store with `import::copy` (runtime and stores as the operator has them), then reads the
/// landed copy back with `import::hash_object`; prints `secs= cpu_ticks= size= sha256= format=
/// base_kib= hwm_kib= reread_secs=` (the peak RSS is the copy's, read before the re-read).
pub fn child_copy(stores: &str, digest: &str) {
    child(async {
        let (from, to) = (file_store(stores, "src"), file_store(stores, "dst"));
        let from_object = from.join(COPY_OBJECT_DIR).join("disk");
        let to_object = to.join(COPY_OBJECT_DIR).join("disk");
        let mut report = |_: u64, _: Option<u64>| {};
        let meter = Meter::start();
        let request = CopyRequest {
            from: &from,
            from_object: &from_object,
            to: &to,
            to_object: &to_object,
            sha256: digest,
            from_sealed: false,
            encrypt: None,
        };
        let copied = import::copy(request, Progress { every: Duration::from_secs(10), report: &mut report })
            .await
            .expect("copy");
        let (time, memory) = meter.stop();
        let started = Instant::now();
        let (size, reread) = import::hash_object(&to, &to_object).await.expect("re-read the copy");
        let reread_secs = started.elapsed().as_secs_f64();
        assert_eq!((size, &reread), (copied.size, &copied.sha256), "the landed copy reads back the same");
        let format = copied.detected.format.as_api_str();
        format!(
            "{time} size={} sha256={} format={format} {memory} reread_secs={reread_secs}",
            copied.size, copied.sha256
        )
    })
}
