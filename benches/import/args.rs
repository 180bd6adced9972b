//! The command line, and the internal one of the child processes (`--child-*`, hidden).

use std::path::PathBuf;

use clap::Parser;

use crate::common::CargoBench;

#[derive(Parser, Debug)]
#[command(
    name = "import",
    about = "The import benchmark: imports and copies of a large image against cp, dd and sha256sum",
    override_usage = "cargo bench --bench import -- [--size-gib N] [--runs N] [--rss-gib 1,4] [--dir PATH] \
                      [--no-prime] [--compare-with EARLIER-BENCH-BINARY]"
)]
pub struct Args {
    /// Size of the test file, in GiB (N GiB of pseudo-random bytes, written once and reused).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..))]
    pub size_gib: u64,
    /// Measured runs (the report gives the median of each step).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub runs: u64,
    /// Sizes in GiB whose peak RSS is reported, comma-separated [default: 1 and --size-gib].
    #[arg(long, value_delimiter = ',', value_name = "GIB,...")]
    pub rss_gib: Vec<u64>,
    /// Where the test files live (outside the git tree).
    #[arg(long, value_name = "PATH", default_value = concat!(env!("CARGO_TARGET_TMPDIR"), "/import-bench"))]
    pub dir: PathBuf,
    /// Do not prime the machine before each step (an untimed cp of the test file, removed, and sync).
    #[arg(long = "no-prime", action = clap::ArgAction::SetFalse)]
    pub prime: bool,
    /// The bench binary of an earlier build: its imports are measured in the same runs, the same
    /// way, for a before/after.
    #[arg(long, value_name = "EARLIER-BENCH-BINARY")]
    pub compare_with: Option<PathBuf>,
    #[command(flatten)]
    pub cargo: CargoBench,

    /// Child process: one import of URL into a file:// store at STORE_DIR.
    #[arg(long, hide = true, num_args = 2, value_names = ["URL", "STORE_DIR"])]
    pub child_import: Option<Vec<String>>,
    /// Child process: reads URL as an import would, without hashing or storing.
    #[arg(long, hide = true, value_name = "URL")]
    pub child_drain: Option<String>,
    /// Child process: one copy between the file:// stores of STORES_DIR.
    #[arg(long, hide = true, num_args = 2, value_names = ["STORES_DIR", "SHA256"])]
    pub child_copy: Option<Vec<String>>,
}

impl Args {
    /// The arguments of this process, with `--rss-gib`'s default (1 GiB and the main size).
    pub fn from_env() -> Self {
        let mut args = Args::parse();
        if args.rss_gib.is_empty() {
            args.rss_gib = if args.size_gib > 1 { vec![1, args.size_gib] } else { vec![1] };
        }
        args
    }
}
