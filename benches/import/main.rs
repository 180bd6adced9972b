//! The import benchmark (not a timed test): how an import of a large image, and a copy of a stored
//! image into another region's store, compare with `cp`, `dd` and `sha256sum` of the same file on the
//! same disk, and how much memory each takes.
//!
//! ```sh
//! cargo bench --bench import -- --size-gib 4 --runs 5
//! cargo bench --bench import -- --help
//! ```
//!
//! Options (`args.rs`): `--size-gib N` (default 4), `--runs N` (default 5), `--rss-gib 1,4` (sizes
//! whose peak RSS is reported; default 1 and N), `--dir PATH` (where the test files live; default
//! `$CARGO_TARGET_TMPDIR/import-bench`, i.e. `target/tmp/`, outside the git tree), `--no-prime`
//! (see below), `--compare-with PATH` (the bench binary of an earlier build: its imports are
//! measured in the same runs, the same way, for a before/after).
//!
//! The test file (`testfile.rs`: N GiB of pseudo-random bytes, nothing sparse) is written once and
//! reused. The page cache cannot be dropped here (no root over the host's caches), so every run is
//! warm-cache: the figures compare CPU and memory-bandwidth costs, not the disk. Before each
//! measurement the previous outputs are removed and `sync` runs (not timed), so no step pays for
//! an earlier one's write-back.
//!
//! The machine is a shared 2-CPU VM, so each step first waits until the machine is idle, then
//! primes it (an untimed `cp` of the test file, removed again, and `sync`; `--no-prime` skips
//! that): writing into page-cache pages the guest freed a while ago costs several times more than
//! into pages freed just before, and priming puts every step, `cp` included, in the same state.
//! A step during which other processes used more than 0.3 s of CPU (`/proc/stat` minus this
//! process and its children) is repeated, up to 3 times; the report says how many were
//! (`sampler.rs`).
//!
//! Each import runs in a child process (`child.rs`: this binary re-executed with
//! `--child-import`), so its peak RSS (`VmHWM` of `/proc/self/status`, read by the child when the
//! import has ended) is the import's alone; "extra" is that peak minus the child's RSS before the
//! import started. The http source is served by this process (`server.rs`: a thread per
//! connection, `std::io::copy` from the file, which Linux turns into `sendfile`), with a
//! Content-Length.
//!
//! The copy (`import::copy`, what ImageCopy uses) goes from one `file://` RegionStore to another
//! on the same disk: the test file is hard-linked into the source store as an image object, and
//! the child copies it, then reads the landed copy back with `import::hash_object` (timed
//! separately: what verifying a copy by re-reading it would cost). The report (`report.rs`) is
//! Markdown on stdout; progress goes to stderr.

use std::{path::Path, sync::atomic::Ordering};

mod args;
mod child;
#[path = "../common/mod.rs"]
mod common;
mod measure;
mod report;
mod sampler;
mod server;
mod testfile;

use child::{ChildImport, copy_in_child, import_in_child};
use measure::{Run, measure};
use sampler::steady;
use server::{file_url, http_url, serve};
use testfile::{digest_of, test_file};

const GIB: u64 = 1 << 30;
const MIB: f64 = (1 << 20) as f64;

fn main() {
    let args = args::Args::from_env();
    if let Some([url, store_dir]) = args.child_import.as_deref() {
        return child::child_import(url, store_dir);
    }
    if let Some(url) = &args.child_drain {
        return child::child_drain(url);
    }
    if let Some([stores, digest]) = args.child_copy.as_deref() {
        return child::child_copy(stores, digest);
    }
    std::fs::create_dir_all(&args.dir).expect("create the bench directory");
    sampler::PRIME.store(args.prime, Ordering::Relaxed);
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
                steady("import", || import_in_child(exe, &args.dir, &path, url, &digest)).extra_kib()
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
    report::print_report(&args, bytes, &runs, &rss);
}
