//! One run: every step on the same test file, each steady (see [`crate::sampler`]).

use std::{
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

use crate::{
    child::{ChildImport, copy_in_child, drain_in_child, import_in_child},
    sampler::{Window, steady},
    server::{file_url, http_url},
};

pub struct Run {
    pub cp: f64,
    /// `dd bs=256K`: the same copy through a user-space buffer, as any pipeline that must see the
    /// bytes (to hash them) has to do it.
    pub dd: f64,
    pub sha256sum: f64,
    pub http: ChildImport,
    pub file: ChildImport,
    /// `import::copy` from one file:// store to another.
    pub copy: ChildImport,
    /// `--compare-with`: the earlier build's imports, http:// and file://.
    pub earlier: Option<[ChildImport; 2]>,
    /// Only reading the source (`fetch::open`, chunks dropped), in a child.
    pub drain_http: f64,
    pub drain_file: f64,
    /// sha2 (the import's hasher) over the same number of bytes in memory.
    pub hash: f64,
}

/// Removes what an earlier step wrote and flushes dirty pages, so the next step starts clean.
pub fn settle(path: &Path) {
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

/// A copy of `source` by `cmd` (given the copy's path), timed: seconds, and the CPU other
/// processes used meanwhile.
fn timed_copy(dir: &Path, source: &Path, name: &str, cmd: impl Fn(&Path) -> Command) -> (f64, f64) {
    let bytes = std::fs::metadata(source).unwrap().len();
    let copy = dir.join(name);
    settle(&copy);
    let window = Window::begin(dir, source);
    let (secs, _) = timed(&mut cmd(&copy));
    let foreign = window.foreign_secs();
    assert_eq!(std::fs::metadata(&copy).unwrap().len(), bytes);
    settle(&copy);
    (secs, foreign)
}

pub fn measure(dir: &Path, source: &Path, server: SocketAddr, earlier: Option<&Path>) -> Run {
    let this = std::env::current_exe().expect("current exe");
    let bytes = std::fs::metadata(source).unwrap().len();
    let cp = steady("cp", || {
        timed_copy(dir, source, "cp-copy.bin", |copy| {
            let mut cmd = Command::new("cp");
            cmd.arg(source).arg(copy);
            cmd
        })
    });
    let dd = steady("dd", || {
        timed_copy(dir, source, "dd-copy.bin", |copy| {
            let mut cmd = Command::new("dd");
            cmd.arg(format!("if={}", source.display()))
                .arg(format!("of={}", copy.display()))
                .args(["bs=256K", "status=none"]);
            cmd
        })
    });
    let (sha256sum, digest) = steady("sha256sum", || {
        let window = Window::begin(dir, source);
        let (secs, out) = timed(Command::new("sha256sum").arg(source));
        ((secs, out.split_whitespace().next().unwrap_or_default().to_string()), window.foreign_secs())
    });
    let (http_source, file_source) = (http_url(server, source), file_url(source));
    let import = |exe: &Path, url: &str| steady("import", || import_in_child(exe, dir, source, url, &digest));
    let http = import(&this, &http_source);
    let file = import(&this, &file_source);
    let earlier = earlier.map(|exe| [import(exe, &http_source), import(exe, &file_source)]);
    let copy = steady("copy", || copy_in_child(dir, source, &digest));
    let drain_http = steady("read http", || drain_in_child(dir, source, &http_source));
    let drain_file = steady("read file", || drain_in_child(dir, source, &file_source));
    let hash = steady("sha2", || {
        let window = Window::begin(dir, source);
        let secs = hash_in_memory(bytes);
        (secs, window.foreign_secs())
    });
    Run { cp, dd, sha256sum, http, file, copy, earlier, drain_http, drain_file, hash }
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
