//! The report: Markdown tables of the medians and of the peak RSS, on stdout.

use std::sync::atomic::Ordering;

use crate::{
    MIB,
    args::Args,
    measure::Run,
    sampler::{MAX_FOREIGN_SECS, REPEATED, WORST_FOREIGN},
};

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

pub fn print_report(args: &Args, bytes: u64, runs: &[Run], rss: &[(u64, Vec<u64>)]) {
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
