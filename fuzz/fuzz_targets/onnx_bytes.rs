#![no_main]
//! See `fmnist::fuzzing::onnx_bytes` for the property this target checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| fmnist::fuzzing::onnx_bytes(data));
