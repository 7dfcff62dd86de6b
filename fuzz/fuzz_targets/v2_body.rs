#![no_main]
//! See `fmnist::fuzzing::v2_body` for the property this target checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| fmnist::fuzzing::v2_body(data));
