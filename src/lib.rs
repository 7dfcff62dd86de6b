//! fmnist: the pieces shared by training (`fmnist-train`) and serving (`fmnist-serve`).
//!
//! The library turns pixels into tensors ([`preprocess`]) and photos into pixels ([`photo`]),
//! names the classes ([`classes`]), writes and runs ONNX models ([`onnx`]) and serves them over
//! HTTP and gRPC ([`server`]). At the bottom, [`kernels`] is the CPU compute engine that both the
//! ONNX executor and the training step run on. It never
//! reads CSV files (polars stays in the training crate). Keeping the preprocessing in one
//! place is what guarantees that a model sees the same numbers at serving time as in training.

pub mod classes;
#[doc(hidden)]
pub mod fuzzing;
pub mod html;
pub mod kernels;
pub mod onnx;
pub mod photo;
pub mod preprocess;
pub mod report;
pub mod server;

pub use classes::{CLASS_NAMES, NUM_CLASSES};
pub use onnx::{InputLayout, ModelError, OnnxModel};
