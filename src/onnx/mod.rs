//! ONNX models: writing them ([`writer`]) from layer descriptions, since candle cannot export,
//! and running them ([`model`]) with candle-onnx.

pub mod model;
pub mod plan;
pub mod writer;

pub use crate::preprocess::InputLayout;
pub use model::{Engine, ModelError, OnnxModel};
pub use writer::{adaptive_pool_matrix, GraphSpec, Layer, WriteError};

/// Name of the graph input in every model fmnist writes.
pub const INPUT_NAME: &str = "pixels";
/// Name of the graph output in every model fmnist writes.
pub const OUTPUT_NAME: &str = "logits";
/// The ONNX opset fmnist writes.
pub const OPSET: i64 = 13;
