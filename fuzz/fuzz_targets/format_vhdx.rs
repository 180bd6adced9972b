#![no_main]
// What it checks: the entry point's documentation (docs/DEVELOPMENT.md, "Fuzzing").

use ims_operator::format::fuzz::Target;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ims_operator::format::fuzz::run(Target::Vhdx, data);
});
