//! Every input a fuzz target (`fuzz/`, docs/DEVELOPMENT.md "Fuzzing") ever failed on, replayed
//! through the target's own entry point, which checks the target's invariants, with the outcome
//! it must have now. The inputs are `tests/fixtures/fuzz/<target>/<file>`.

use std::path::Path;

use crate::fetch;
use crate::format::fuzz::{self as format, Target};

/// `(target, file, the start of what the entry point says)`.
const CASES: &[(&str, &str, &str)] = &[
    // A harness error: a text descriptor on a store that holds less than it says is truncated
    // (the descriptor invariant holds for whole images only).
    ("format_vmdk", "descriptor-on-a-lying-store", "truncated: the image is said to be 549755813918 bytes"),
    // A harness error: `httI:A0@x` has no authority (and no credentials) although the http
    // crate reads one; such a URL is an unsupported scheme, shown as it is.
    ("fetch_url", "scheme-and-path-with-at", "unsupported scheme httI"),
];

/// The entry point of the fuzz target `name`.
fn run(name: &str, input: &[u8]) -> String {
    if let Some(t) = Target::ALL.iter().find(|t| name.strip_prefix("format_") == Some(t.lowercase())) {
        return format::run(*t, input);
    }
    match name {
        "fetch_url" => fetch::fuzz::url(input),
        "fetch_addr" => fetch::fuzz::addr(input),
        "embedded_selector" => kube_embedded::fuzz::selector(input),
        "embedded_patch" => kube_embedded::fuzz::patch(input),
        "embedded_request" => kube_embedded::fuzz::request(input),
        other => panic!("no fuzz target {other}"),
    }
}

#[test]
fn fuzz_regressions() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz");
    for (target, file, want) in CASES {
        let path = dir.join(target).join(file);
        let input = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let got = run(target, &input);
        assert!(got.starts_with(want), "{}: got {got:?}, want {want:?}", path.display());
    }
    // Every input there has a case.
    for target in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let target = target.file_name().to_string_lossy().into_owned();
        for file in std::fs::read_dir(dir.join(&target)).into_iter().flatten().flatten() {
            let file = file.file_name().to_string_lossy().into_owned();
            assert!(CASES.iter().any(|(t, f, _)| *t == target && *f == file), "{target}/{file} has no case in CASES");
        }
    }
}

/// The seeds of the fuzz targets (`fuzz/seeds/<target>/`) hold the targets' invariants too, and
/// every disk image among them is detected as its format (they are real images).
#[test]
fn fuzz_seeds_hold() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    let mut seen = 0;
    for target in std::fs::read_dir(&dir).into_iter().flatten().flatten().filter(|e| e.path().is_dir()) {
        let name = target.file_name().to_string_lossy().into_owned();
        for file in std::fs::read_dir(target.path()).into_iter().flatten().flatten() {
            let input = std::fs::read(file.path()).expect("a seed");
            let got = run(&name, &input);
            eprintln!("{name}/{}: {got}", file.file_name().to_string_lossy());
            if let Some(format) = name.strip_prefix("format_").filter(|f| *f != "raw") {
                let descriptor = file.file_name() == "descriptor.vmdk";
                let want = if descriptor { "unsupported" } else { format };
                assert!(got.to_lowercase().starts_with(want), "{name}/{:?}: {got}", file.file_name());
            }
            seen += 1;
        }
    }
    assert!(seen >= 40, "{seen} seeds");
}
