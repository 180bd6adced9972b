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
