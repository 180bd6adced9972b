#![no_main]
// What it checks: the entry point's documentation (docs/DEVELOPMENT.md, "Fuzzing").

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ims_operator::fetch::fuzz::addr(data);
});
