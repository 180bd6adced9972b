//! Steady measurements on a shared machine: CPU time of this process, its children and the whole
//! machine (`/proc`), waiting for an idle machine, priming, and repeating a disturbed step.

use std::{
    path::Path,
    process::Command,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use crate::measure::settle;

/// Whether each step is preceded by priming (see [`Window::begin`]); `--no-prime` turns it off.
pub static PRIME: AtomicBool = AtomicBool::new(true);
/// Steps repeated because other processes used the CPU during them.
pub static REPEATED: AtomicUsize = AtomicUsize::new(0);
/// The most CPU other processes used during a step that was kept, in seconds.
pub static WORST_FOREIGN: Mutex<f64> = Mutex::new(0.0);

/// A step is repeated when other processes used more CPU than this during it.
pub const MAX_FOREIGN_SECS: f64 = 0.3;
/// ... at most this many times in all.
const ATTEMPTS: usize = 3;

/// Runs a step (`f` returns its result and the CPU other processes used during it), repeating
/// it when other processes disturbed it.
pub fn steady<T>(name: &str, mut f: impl FnMut() -> (T, f64)) -> T {
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

/// User + system CPU ticks of this process, all threads, and of its waited-for children
/// (`/proc/self/stat`: utime + stime, cutime + cstime).
fn self_and_children_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(") ").map(|(_, rest)| rest).unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After "(comm) ": state is field 3 of the man page, utime 14, stime 15, cutime 16, cstime 17.
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (field(14) + field(15), field(16) + field(17))
}

/// User + system CPU ticks of this process, all threads.
pub fn cpu_ticks() -> u64 {
    self_and_children_ticks().0
}

/// Clock ticks a second (`getconf CLK_TCK`; 100 on Linux).
pub fn clock_ticks() -> f64 {
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
        let (own, children) = self_and_children_ticks();
        CpuSample { machine, own: own + children }
    }
}

/// The timed part of a step.
pub struct Window(CpuSample);

impl Window {
    /// Waits until the machine is idle, then (unless `--no-prime`) primes it: an untimed `cp` of
    /// `source` into `dir`, removed again, and `sync`. That puts the source in the page cache
    /// and every step in the same state: on this VM, writing into page-cache pages that the
    /// guest freed a while ago (and the hypervisor took back) costs several times more than
    /// into pages freed just before.
    pub fn begin(dir: &Path, source: &Path) -> Self {
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
    pub fn foreign_secs(&self) -> f64 {
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
