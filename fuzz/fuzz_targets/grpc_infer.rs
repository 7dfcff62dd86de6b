#![no_main]
//! See `fmnist::fuzzing::grpc_infer` for the property this target checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| fmnist::fuzzing::grpc_infer(data));
