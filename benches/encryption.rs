//! The encryption benchmark (not a timed test): an encrypted import and an encrypted copy of a
//! large image against the same unencrypted ones, alternating in the same run, with the
//! operator's code paths (`import::import`, `import::copy`, `file://` region stores, the local
//! KMS), and the memory each takes.
//!
//! ```sh
//! cargo bench --bench encryption -- --size-gib 4 --runs 5
//! ```
//!
//! - **Import**: a `file://` source (the test file: pseudo-random, nothing sparse) into a
//!   `file://` store. Unencrypted, the kernel copies the file and the landed bytes are hashed;
//!   encrypted, the bytes are read, hashed and sealed in 64 KiB segments as they stream.
//! - **Copy**: the stored object (the test file, hard-linked into a source store) into another
//!   store: unencrypted (kernel copy, landed bytes hashed) or encrypted under a new data key.
//!
//! Each step runs in a child process (this binary re-executed), so its peak RSS is its own; the
//! report gives every run, the medians, their ratios and the peak RSS. Before each step the
//! previous outputs are removed and `sync` runs (not timed). The page cache holds the test file
//! (warm runs): the figures compare CPU and memory bandwidth, not the disk.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use clap::Parser;
use ims_operator::{
    api::{DeclaredFormat, RegionStorage},
    crypt::{Kms, LocalKeys},
    fetch::FetchPolicy,
    import::{self, CopyRequest, Progress, Request},
    store::{RegionStore, StoreConfig},
};

#[path = "common/mod.rs"]
mod common;

/// Where the copied object lives in both stores.
const OBJECT_DIR: &str = "bench/image/uid";

/// Flags.
#[derive(Parser, Debug)]
struct Args {
    /// Size of the image, GiB.
    #[arg(long, default_value_t = 4)]
    size_gib: u64,
    /// Runs of each step.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Where the test file and the stores live (default: target/tmp/encryption-bench).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// (Internal) run one step in this process: `import|copy plain|sealed <dir>`.
    #[arg(long, num_args = 3, hide = true)]
    child: Option<Vec<String>>,
    #[command(flatten)]
    _cargo: common::CargoBench,
}

/// A `file://` store `region` under `root`, with a local KMS holding the key `bench`.
fn store(root: &Path, region: &str) -> RegionStore {
    let config = StoreConfig { file_url_root: "/var/lib/ims".into(), file_dir: root.to_path_buf() };
    let spec = RegionStorage { url: format!("file:///var/lib/ims/{region}"), ..Default::default() };
    let keys = LocalKeys::fixed("bench/ims-kms-keys", [("bench".to_string(), vec![7u8; 32])].into());
    RegionStore::open(&spec, &config, None).expect("open the store").with_kms(Kms::Local(keys))
}

/// The child: one import or copy, printed as `secs= size= sha256= base_kib= hwm_kib=`.
fn child(what: &str, mode: &str, dir: &Path) {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let encrypt = (mode == "sealed").then_some("bench");
    let line = runtime.block_on(async {
        let mut report = |_: u64, _: Option<u64>| {};
        let progress = Progress { every: Duration::from_secs(10), report: &mut report };
        let base = common::status_kib("self", "VmRSS");
        let started = Instant::now();
        let stored = match what {
            "import" => {
                let to = store(&dir.join("out"), "dst");
                let object = to.join(OBJECT_DIR).join("disk");
                let url = format!("file://{}", dir.join("source.bin").display());
                let policy = FetchPolicy { allow_file: true, file_roots: vec!["/".into()], ..Default::default() };
                let request = Request {
                    url: &url,
                    checksum: None,
                    declared: DeclaredFormat::Auto,
                    limit: u64::MAX,
                    image_type: None,
                    encrypt,
                };
                import::import(&to, &object, request, &policy, progress).await.expect("import")
            }
            _ => {
                let (from, to) = (store(&dir.join("stores"), "src"), store(&dir.join("out"), "dst"));
                let (from_object, to_object) = (from.join(OBJECT_DIR).join("disk"), to.join(OBJECT_DIR).join("disk"));
                let sha256 = std::fs::read_to_string(dir.join("source.sha256")).expect("the source's sha256");
                let request = CopyRequest {
                    from: &from,
                    from_object: &from_object,
                    to: &to,
                    to_object: &to_object,
                    sha256: sha256.trim(),
                    from_sealed: false,
                    encrypt,
                };
                import::copy(request, progress).await.expect("copy")
            }
        };
        let secs = started.elapsed().as_secs_f64();
        let hwm = common::status_kib("self", "VmHWM");
        format!("secs={secs} size={} sha256={} base_kib={base} hwm_kib={hwm}", stored.size, stored.sha256)
    });
    println!("{line}");
}

/// One step in a child: seconds and extra peak RSS (KiB); checks size and sha256.
fn step(what: &str, mode: &str, dir: &Path, size: u64, sha256: &str) -> (f64, u64) {
    let _ = std::fs::remove_dir_all(dir.join("out"));
    let _ = Command::new("sync").status();
    let exe = std::env::current_exe().expect("current exe");
    let out = Command::new(exe).args(["--child", what, mode]).arg(dir).output().expect("run the child");
    assert!(out.status.success(), "{what} {mode}: {}", String::from_utf8_lossy(&out.stderr));
    let out = String::from_utf8_lossy(&out.stdout).to_string();
    let field = |key: &str| out.split_whitespace().find_map(|f| f.strip_prefix(key)).unwrap_or_default().to_string();
    assert_eq!(field("size=").parse::<u64>().ok(), Some(size), "{what} {mode} stored every byte");
    assert_eq!(field("sha256="), sha256, "{what} {mode}: the sha256 of the plaintext");
    let kib = |key: &str| field(key).parse::<u64>().unwrap_or(0);
    let stored = std::fs::metadata(dir.join("out/dst").join(OBJECT_DIR).join("disk")).map(|m| m.len()).unwrap_or(0);
    let want = if mode == "sealed" { ims_operator::crypt::sealed_len(size) } else { size };
    assert_eq!(stored, want, "{what} {mode}: the stored object");
    (field("secs=").parse().expect("secs"), kib("hwm_kib=").saturating_sub(kib("base_kib=")))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args = Args::parse();
    if let Some(child_args) = &args.child {
        return child(&child_args[0], &child_args[1], Path::new(&child_args[2]));
    }
    let dir = args.dir.clone().unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("encryption-bench"));
    std::fs::create_dir_all(&dir).expect("the bench directory");
    eprintln!("# writing / reusing the {} GiB test file", args.size_gib);
    let file = common::test_file(&dir, "encryption-bench", args.size_gib, 0x2545_F491_4F6C_DD1D);
    let size = std::fs::metadata(&file).unwrap().len();
    let sha = Command::new("sha256sum").arg(&file).output().expect("sha256sum runs");
    let sha256 = String::from_utf8_lossy(&sha.stdout).split_whitespace().next().unwrap_or_default().to_string();
    // The source of the imports, and the source store's object of the copies: the test file.
    let source = dir.join("source.bin");
    let _ = std::fs::remove_file(&source);
    std::fs::hard_link(&file, &source).expect("link the source");
    std::fs::write(dir.join("source.sha256"), &sha256).unwrap();
    let object = dir.join("stores/src").join(OBJECT_DIR);
    let _ = std::fs::remove_dir_all(dir.join("stores"));
    std::fs::create_dir_all(&object).unwrap();
    std::fs::hard_link(&file, object.join("disk")).expect("link the copy's source");

    let steps = [("import", "plain"), ("import", "sealed"), ("copy", "plain"), ("copy", "sealed")];
    let mut secs: Vec<Vec<f64>> = vec![Vec::new(); steps.len()];
    let mut rss = vec![0u64; steps.len()];
    println!("| run | import s | encrypted import s | copy s | encrypted copy s |\n|---:|---:|---:|---:|---:|");
    for run in 1..=args.runs {
        let mut row = Vec::new();
        for (i, (what, mode)) in steps.iter().enumerate() {
            let (s, kib) = step(what, mode, &dir, size, &sha256);
            secs[i].push(s);
            rss[i] = rss[i].max(kib);
            row.push(format!("{s:.2}"));
        }
        println!("| {run} | {} |", row.join(" | "));
    }
    let m: Vec<f64> = secs.into_iter().map(median).collect();
    let gbs = |s: f64| size as f64 / s / 1e9;
    println!(
        "\nmedians: import {:.2} s ({:.2} GB/s), encrypted {:.2} s ({:.2} GB/s): **{:.2}x**; copy {:.2} s ({:.2} GB/s), encrypted {:.2} s ({:.2} GB/s): **{:.2}x**",
        m[0],
        gbs(m[0]),
        m[1],
        gbs(m[1]),
        m[1] / m[0],
        m[2],
        gbs(m[2]),
        m[3],
        gbs(m[3]),
        m[3] / m[2]
    );
    println!(
        "peak RSS above the start: import {} KiB, encrypted {} KiB, copy {} KiB, encrypted {} KiB",
        rss[0], rss[1], rss[2], rss[3]
    );
    let _ = std::fs::remove_dir_all(dir.join("out"));
}
