#![no_main]
//! See `fmnist::fuzzing::basic_auth` for the property this target checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| fmnist::fuzzing::basic_auth(data));
