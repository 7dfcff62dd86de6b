#![no_main]
//! See `fmnist::fuzzing::predict_body` for the property this target checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| fmnist::fuzzing::predict_body(data));
