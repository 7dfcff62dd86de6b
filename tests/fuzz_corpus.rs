//! Replays the fuzz targets' committed inputs (the seeds in `fuzz/seeds/<target>/`, the
//! minimised corpus in `fuzz/corpus/<target>/` and the crash reproducers in
//! `fuzz/regressions/<target>/`) through the same functions the libFuzzer
//! targets call, so `cargo test` keeps every bug the fuzzer found fixed without nightly.

use candle_onnx::onnx::ModelProto;
use prost::Message;
use std::path::{Path, PathBuf};

fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut files = Vec::new();
    for kind in ["seeds", "corpus", "regressions"] {
        if let Ok(dir) = std::fs::read_dir(root.join(kind).join(target)) {
            files.extend(dir.map(|e| e.unwrap().path()));
        }
    }
    files.sort();
    files
}

fn replay(target: &str, run: impl Fn(&[u8])) {
    let files = inputs(target);
    assert!(!files.is_empty(), "no committed inputs for {target}");
    for f in &files {
        let data = std::fs::read(f).unwrap();
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&data)));
        assert!(caught.is_ok(), "{target}: {} fails again", f.display());
    }
    eprintln!("{target}: {} inputs replayed", files.len());
}

#[test]
fn onnx_bytes() {
    replay("onnx_bytes", fmnist::fuzzing::onnx_bytes);
}

#[test]
fn onnx_mutate() {
    let bytes =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("weights/fmnist-cnn.onnx"))
            .unwrap();
    let base = ModelProto::decode(bytes.as_slice()).unwrap();
    replay("onnx_mutate", |d| fmnist::fuzzing::onnx_mutate(&base, d));
}

#[test]
fn predict_body() {
    replay("predict_body", fmnist::fuzzing::predict_body);
}

#[test]
fn v2_body() {
    replay("v2_body", fmnist::fuzzing::v2_body);
}

#[test]
fn v2_header_length() {
    replay("v2_header_length", fmnist::fuzzing::v2_header_length);
}

#[test]
fn grpc_infer() {
    replay("grpc_infer", fmnist::fuzzing::grpc_infer);
}

#[test]
fn photo() {
    replay("photo", fmnist::fuzzing::photo);
}

#[test]
fn basic_auth() {
    replay("basic_auth", fmnist::fuzzing::basic_auth);
}

/// The onnx_bytes seed is a model the planner plans, so the fuzzer starts inside the planned
/// executor rather than at the protobuf decoder.
#[test]
fn the_model_seed_plans() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/onnx_bytes/tiny_cnn");
    let model = fmnist::OnnxModel::load(&path).unwrap();
    assert!(model.plan().is_some(), "{}", model.engine_description());
}
