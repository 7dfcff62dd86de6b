#![no_main]
//! Edit scripts over the shipped model; see `fmnist::fuzzing::onnx_mutate`.
use prost::Message;
use std::sync::OnceLock;

static SHIPPED: &[u8] = include_bytes!("../../weights/fmnist-cnn.onnx");

fn base() -> &'static candle_onnx::onnx::ModelProto {
    static BASE: OnceLock<candle_onnx::onnx::ModelProto> = OnceLock::new();
    BASE.get_or_init(|| {
        candle_onnx::onnx::ModelProto::decode(SHIPPED).expect("the shipped model decodes")
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| fmnist::fuzzing::onnx_mutate(base(), data));
