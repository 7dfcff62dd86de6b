#![no_main]
//! See `fmnist::fuzzing::photo` for the property this target checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| fmnist::fuzzing::photo(data));
