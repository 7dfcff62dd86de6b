#![no_main]
//! See `fmnist::fuzzing::v2_header_length` for the property this target checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| fmnist::fuzzing::v2_header_length(data));
