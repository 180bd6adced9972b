//! What both benchmarks (`benches/import/`, `benches/control_plane.rs`) use: the flag `cargo
//! bench` passes, a process's memory from `/proc`, and the pseudo-random bytes of their test
//! files (`tests/chaos.rs` takes its random choices and bytes from the same xorshift64).

/// `cargo bench` passes `--bench` to `harness = false` targets: accepted and ignored
/// (`#[command(flatten)]` it into a bench's arguments).
#[derive(clap::Args, Debug)]
pub struct CargoBench {
    /// Passed by `cargo bench`; ignored.
    #[arg(long = "bench", hide = true)]
    _bench: bool,
}

/// A line of `/proc/<pid>/status` in KiB (`key`: `VmRSS`, `VmHWM`, …; `pid`: a process id or
/// `self`); 0 when it cannot be read.
pub fn status_kib(pid: &str, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// xorshift64 (shifts 13, 7, 17) from `seed`: the test files' bytes, the same on every run, with
/// no zero runs (nothing sparse, nothing a compressor or a hole-punching copy could shortcut).
pub struct Xorshift64(pub u64);

impl Iterator for Xorshift64 {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        Some(x)
    }
}

/// `dir/<stem>-<N>GiB.bin`: N GiB of xorshift64 output from `seed ^ N`, written once (through a
/// `.partial` file, renamed when whole) and reused while its size is right.
#[allow(dead_code)] // (the import and control-plane benchmarks write theirs otherwise)
pub fn test_file(dir: &std::path::Path, stem: &str, gib: u64, seed: u64) -> std::path::PathBuf {
    use std::io::Write;
    const GIB: u64 = 1 << 30;
    let path = dir.join(format!("{stem}-{gib}GiB.bin"));
    if std::fs::metadata(&path).is_ok_and(|m| m.len() == gib * GIB) {
        return path;
    }
    let partial = path.with_extension("partial");
    let mut file = std::fs::File::create(&partial).expect("create the test file");
    let mut words = Xorshift64(seed ^ gib);
    let mut block = vec![0u8; 8 << 20];
    for _ in 0..(gib * GIB) / block.len() as u64 {
        for (word, x) in block.chunks_exact_mut(8).zip(&mut words) {
            word.copy_from_slice(&x.to_le_bytes());
        }
        file.write_all(&block).expect("write the test file");
    }
    drop(file);
    std::fs::rename(&partial, &path).expect("rename the test file");
    path
}
