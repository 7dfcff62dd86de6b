//! Loading and running an ONNX classifier with candle-onnx.
//!
//! candle-onnx's `simple_eval` converts every initializer from protobuf on each call; for a
//! server that would copy all weights per request (hundreds of MB for VGG16). [`OnnxModel`]
//! converts them once at load, keeps a copy of the graph without initializers, and passes the
//! ready tensors (reference-counted, so not copied) as inputs on every run.

use super::plan::Plan;
use super::OUTPUT_NAME;
use crate::classes::NUM_CLASSES;
use crate::preprocess::InputLayout;
use candle_core::{Device, Tensor};
use candle_onnx::onnx::{self, tensor_shape_proto::dimension::Value as Dim, type_proto};
use prost::Message;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The operators candle-onnx 0.11 can evaluate. A graph using anything else is refused at
/// load time instead of failing on the first request.
pub const SUPPORTED_OPS: &[&str] = &[
    "Abs",
    "Add",
    "And",
    "ArgMax",
    "ArgMin",
    "AveragePool",
    "BatchNormalization",
    "Cast",
    "Ceil",
    "Clip",
    "Concat",
    "Constant",
    "ConstantOfShape",
    "Conv",
    "Cos",
    "CumSum",
    "Div",
    "Dropout",
    "Equal",
    "Erf",
    "Exp",
    "Expand",
    "Flatten",
    "Floor",
    "Gather",
    "GatherElements",
    "Gelu",
    "Gemm",
    "Greater",
    "GreaterOrEqual",
    "HardSwish",
    "Identity",
    "LeakyRelu",
    "Less",
    "LessOrEqual",
    "Log",
    "LogSoftmax",
    "MatMul",
    "MaxPool",
    "Min",
    "Mul",
    "Neg",
    "Not",
    "Or",
    "PRelu",
    "Pad",
    "Pow",
    "Range",
    "ReduceMax",
    "ReduceMean",
    "ReduceMin",
    "ReduceSum",
    "Relu",
    "Reshape",
    "Resize",
    "Selu",
    "Shape",
    "Sigmoid",
    "Sign",
    "Sin",
    "Size",
    "Slice",
    "Softmax",
    "Split",
    "Sqrt",
    "Squeeze",
    "Sub",
    "Tanh",
    "Tile",
    "Transpose",
    "Unsqueeze",
    "Where",
    "Xor",
];

/// How many inputs candle-onnx 0.11's evaluator reads from a node without checking that they
/// exist (it indexes them directly and would panic on fewer; the fuzzer found a two-input
/// `Gemm`). Optional inputs it does check (a convolution's bias, `Slice`'s axes and steps,
/// `Resize`'s scales and sizes, `Split`'s sizes, `Squeeze`'s axes) are not counted.
fn required_inputs(node: &onnx::NodeProto) -> usize {
    match node.op_type.as_str() {
        "Constant" => 0,
        "BatchNormalization" => 5,
        "Gemm" | "Range" | "Slice" | "Where" => 3,
        "Add" | "And" | "Conv" | "CumSum" | "Div" | "Equal" | "Expand" | "Gather"
        | "GatherElements" | "Greater" | "GreaterOrEqual" | "Less" | "LessOrEqual" | "MatMul"
        | "Mul" | "Or" | "PRelu" | "Pad" | "Pow" | "Reshape" | "Sub" | "Tile" | "Xor" => 2,
        // Its axes come from the attribute when there is one, else from the second input.
        "Unsqueeze" if !node.attribute.iter().any(|a| a.name == "axes") => 2,
        _ => 1,
    }
}

/// The most values one initializer may hold: 2^28 (1 GiB of float32). VGG16's largest,
/// its first fully connected layer, holds 102.8 M.
pub const MAX_TENSOR_VALUES: usize = 1 << 28;

/// The largest square RGB input side accepted (`[N,3,S,S]`); the VGG16 path trains at 32–224.
pub const MAX_RGB_SIZE: i64 = 512;

/// Why a model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read model file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not an ONNX model (protobuf decoding failed: {source})")]
    Decode {
        path: PathBuf,
        source: prost::DecodeError,
    },
    #[error("{path}: the model has no graph")]
    NoGraph { path: PathBuf },
    #[error("{path}: node '{node}' uses operator '{op}', which candle-onnx cannot run")]
    UnsupportedOp {
        path: PathBuf,
        node: String,
        op: String,
    },
    #[error(
        "{path}: node '{node}' ({op}) has {inputs} inputs where candle-onnx reads {want}, or no output"
    )]
    NodeArity {
        path: PathBuf,
        node: String,
        op: String,
        inputs: usize,
        want: usize,
    },
    #[error(
        "{path}: input '{name}' has shape {found}; expected [N,1,28,28], [N,784] or [N,3,H,W] (float32)"
    )]
    InputShape {
        path: PathBuf,
        name: String,
        found: String,
    },
    #[error("{path}: expected exactly one graph input besides the weights, found {found}")]
    InputCount { path: PathBuf, found: usize },
    #[error("{path}: output '{name}' has shape {found}; expected [N,{NUM_CLASSES}]")]
    OutputShape {
        path: PathBuf,
        name: String,
        found: String,
    },
    #[error("{path}: initializer '{name}' cannot be converted: {source}")]
    Initializer {
        path: PathBuf,
        name: String,
        source: Box<candle_core::Error>,
    },
    #[error("{path}: initializer '{name}' {problem}")]
    InitializerBounds {
        path: PathBuf,
        name: String,
        problem: String,
    },
    #[error("input tensor has shape {found:?}; this model wants {expected}")]
    BadInput { found: Vec<usize>, expected: String },
    // Boxed: candle's error type is large, and this enum travels through every `?`.
    #[error("model evaluation failed: {0}")]
    Eval(Box<candle_core::Error>),
}

impl From<candle_core::Error> for ModelError {
    fn from(e: candle_core::Error) -> Self {
        ModelError::Eval(Box::new(e))
    }
}

/// Which implementation runs the graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Engine {
    /// fmnist's planned executor when the graph is one it plans, else candle-onnx.
    #[default]
    Auto,
    /// Always candle-onnx's `simple_eval` (the reference the planned executor is tested
    /// against).
    CandleOnnx,
}

/// A loaded classifier: weights converted once, ready to run many times.
#[derive(Debug)]
pub struct OnnxModel {
    path: PathBuf,
    /// The planned executor, or why the graph could not be planned.
    plan: Result<Plan, String>,
    engine: Engine,
    graph_only: onnx::ModelProto,
    weights: Vec<(String, Tensor)>,
    input_name: String,
    output_name: String,
    layout: InputLayout,
    metadata: Vec<(String, String)>,
    size_bytes: u64,
}

fn shape_of(info: &onnx::ValueInfoProto) -> Option<(i32, Vec<Option<i64>>)> {
    let ty = info.r#type.as_ref()?.value.as_ref()?;
    let type_proto::Value::TensorType(t) = ty else {
        return None;
    };
    let dims = t
        .shape
        .as_ref()?
        .dim
        .iter()
        .map(|d| match d.value {
            Some(Dim::DimValue(v)) => Some(v),
            _ => None,
        })
        .collect();
    Some((t.elem_type, dims))
}

/// Checks an initializer's declared shape against [`MAX_TENSOR_VALUES`] and against the data
/// it carries, before candle converts it. Why here: candle-onnx trusts the dims (their product
/// overflows on hostile values) and candle's unaligned raw-buffer path copies `raw_data.len()`
/// bytes into a buffer sized for whole elements, so a length that is not a multiple of the
/// element size would write past it.
fn check_initializer(t: &onnx::TensorProto) -> Result<(), String> {
    use onnx::tensor_proto::DataType as D;
    if t.data_location == onnx::tensor_proto::DataLocation::External as i32 {
        return Err("keeps its data in an external file, which fmnist does not read".into());
    }
    let mut count: usize = 1;
    for &d in &t.dims {
        let d = usize::try_from(d).map_err(|_| format!("has a negative dimension ({d})"))?;
        count = count
            .checked_mul(d)
            .filter(|&c| c <= MAX_TENSOR_VALUES)
            .ok_or_else(|| format!("has shape {:?}, over {MAX_TENSOR_VALUES} values", t.dims))?;
    }
    let (size, typed) = match D::try_from(t.data_type) {
        Ok(D::Float) => (4, t.float_data.len()),
        Ok(D::Double) => (8, t.double_data.len()),
        Ok(D::Int64) => (8, t.int64_data.len()),
        Ok(D::Int32) => (4, t.int32_data.len()),
        Ok(D::Uint32) => (4, 0),
        Ok(D::Float16) => (2, 0),
        Ok(D::Uint8 | D::Bool) => (1, 0),
        _ => {
            return Err(format!(
                "has data type {}, which fmnist does not load",
                t.data_type
            ))
        }
    };
    let fits = if typed > 0 {
        typed == count
    } else {
        t.raw_data.len() == count * size
    };
    if !fits {
        return Err(format!(
            "declares {count} values of shape {:?} but carries {} ({} raw bytes)",
            t.dims,
            if typed > 0 {
                typed
            } else {
                t.raw_data.len() / size
            },
            t.raw_data.len()
        ));
    }
    Ok(())
}

fn show_dims(dims: &[Option<i64>]) -> String {
    let parts: Vec<String> = dims
        .iter()
        .map(|d| d.map_or("?".to_string(), |v| v.to_string()))
        .collect();
    format!("[{}]", parts.join(","))
}

impl OnnxModel {
    /// Reads, validates and prepares a model file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ModelError> {
        let path = path.as_ref().to_path_buf();
        let bytes = std::fs::read(&path).map_err(|source| ModelError::Io {
            path: path.clone(),
            source,
        })?;
        Self::from_bytes(path, &bytes)
    }

    /// Decodes, validates and prepares a model held in memory; `path` is used in messages
    /// only. Every shape and size in the file is checked against [`MAX_TENSOR_VALUES`],
    /// [`MAX_RGB_SIZE`] and the bytes actually present before anything is allocated for it,
    /// so a hostile or damaged file costs at most a few times its own size.
    pub fn from_bytes(path: PathBuf, bytes: &[u8]) -> Result<Self, ModelError> {
        let proto = onnx::ModelProto::decode(bytes).map_err(|source| ModelError::Decode {
            path: path.clone(),
            source,
        })?;
        Self::from_proto(path, proto, bytes.len() as u64)
    }

    /// Validates and prepares an in-memory model; `path` is used in messages only.
    pub fn from_proto(
        path: PathBuf,
        mut proto: onnx::ModelProto,
        size_bytes: u64,
    ) -> Result<Self, ModelError> {
        let Some(graph) = proto.graph.as_mut() else {
            return Err(ModelError::NoGraph { path });
        };
        if graph.node.is_empty() {
            return Err(ModelError::NoGraph { path });
        }
        for n in &graph.node {
            if !SUPPORTED_OPS.contains(&n.op_type.as_str()) || !n.domain.is_empty() {
                return Err(ModelError::UnsupportedOp {
                    path,
                    node: n.name.clone(),
                    op: n.op_type.clone(),
                });
            }
            let want = required_inputs(n);
            if n.input.len() < want || n.output.is_empty() {
                return Err(ModelError::NodeArity {
                    path,
                    node: n.name.clone(),
                    op: n.op_type.clone(),
                    inputs: n.input.len(),
                    want,
                });
            }
        }
        let init_names: Vec<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
        let inputs: Vec<&onnx::ValueInfoProto> = graph
            .input
            .iter()
            .filter(|i| !init_names.contains(&i.name.as_str()))
            .collect();
        if inputs.len() != 1 {
            return Err(ModelError::InputCount {
                path,
                found: inputs.len(),
            });
        }
        let input = inputs[0];
        let input_name = input.name.clone();
        let bad_input = |found: String| ModelError::InputShape {
            path: path.clone(),
            name: input_name.clone(),
            found,
        };
        let (elem, dims) = shape_of(input).ok_or_else(|| bad_input("unknown".into()))?;
        if elem != onnx::tensor_proto::DataType::Float as i32 {
            return Err(bad_input(format!(
                "{} of element type {elem}",
                show_dims(&dims)
            )));
        }
        let layout = match dims.as_slice() {
            [_, Some(784)] => InputLayout::Flat,
            [_, Some(1), Some(28), Some(28)] => InputLayout::Gray,
            [_, Some(3), Some(h), Some(w)] if h == w && (1..=MAX_RGB_SIZE).contains(h) => {
                InputLayout::Rgb { size: *h as usize }
            }
            _ => return Err(bad_input(show_dims(&dims))),
        };
        let Some(output) = graph.output.first() else {
            return Err(ModelError::OutputShape {
                path,
                name: "?".into(),
                found: "none".into(),
            });
        };
        let output_name = output.name.clone();
        if let Some((_, odims)) = shape_of(output) {
            if odims.len() != 2 || odims[1].is_some_and(|d| d != NUM_CLASSES as i64) {
                return Err(ModelError::OutputShape {
                    path,
                    name: output_name,
                    found: show_dims(&odims),
                });
            }
        }
        for t in &graph.initializer {
            check_initializer(t).map_err(|problem| ModelError::InitializerBounds {
                path: path.clone(),
                name: t.name.clone(),
                problem,
            })?;
        }
        let mut weights = Vec::with_capacity(graph.initializer.len());
        for t in std::mem::take(&mut graph.initializer) {
            let tensor = candle_onnx::eval::get_tensor(&t, &t.name).map_err(|source| {
                ModelError::Initializer {
                    path: path.clone(),
                    name: t.name.clone(),
                    source: Box::new(source),
                }
            })?;
            weights.push((t.name, tensor));
        }
        let plan = Plan::new(
            proto.graph.as_ref().expect("checked above"),
            &weights,
            &input_name,
            &output_name,
            layout,
        );
        // Old-style graphs list initializers among the inputs too; simple_eval checks those
        // against the values we pass, which is what we want.
        let metadata = proto
            .metadata_props
            .iter()
            .map(|e| (e.key.clone(), e.value.clone()))
            .collect();
        Ok(Self {
            path,
            plan,
            engine: Engine::Auto,
            graph_only: proto,
            weights,
            input_name,
            output_name,
            layout,
            metadata,
            size_bytes,
        })
    }

    /// Chooses the implementation that runs the graph from now on.
    pub fn with_engine(mut self, engine: Engine) -> Self {
        self.engine = engine;
        self
    }

    /// Whether the planned executor splits a single image's large steps across threads; see
    /// [`Plan::split_single_images`].
    pub fn with_single_image_split(mut self, on: bool) -> Self {
        if let Ok(plan) = &mut self.plan {
            plan.split_single_images(on);
        }
        self
    }

    /// What runs the graph: `"planned"` or `"candle-onnx"`, with the reason the planner gave
    /// when it could not take the graph.
    pub fn engine_description(&self) -> String {
        match (&self.plan, self.engine) {
            (Ok(p), Engine::Auto) => format!("planned ({} steps)", p.len()),
            (Ok(_), Engine::CandleOnnx) => "candle-onnx (chosen)".to_string(),
            (Err(why), _) => format!("candle-onnx (not planned: {why})"),
        }
    }

    /// The Open Inference Protocol's `platform` for this model: the format and the runtime
    /// that really runs it, `onnx_fmnist` (the planned executor) or `onnx_candle`.
    pub fn platform(&self) -> &'static str {
        if self.active_plan().is_some() {
            "onnx_fmnist"
        } else {
            "onnx_candle"
        }
    }

    /// The planned executor, when the graph could be planned (whatever the engine).
    pub fn plan(&self) -> Option<&Plan> {
        self.plan.as_ref().ok()
    }

    fn active_plan(&self) -> Option<&Plan> {
        match (&self.plan, self.engine) {
            (Ok(p), Engine::Auto) => Some(p),
            _ => None,
        }
    }

    /// The input layout this model wants.
    pub fn layout(&self) -> InputLayout {
        self.layout
    }

    /// The file the model came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size of the model file in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Name of the graph input.
    pub fn input_name(&self) -> &str {
        &self.input_name
    }

    /// Name of the graph output.
    pub fn output_name(&self) -> &str {
        &self.output_name
    }

    /// Metadata properties stored in the file (class names, training summary, ...).
    pub fn metadata(&self) -> &[(String, String)] {
        &self.metadata
    }

    /// One metadata value.
    pub fn metadata_value(&self, key: &str) -> Option<&str> {
        self.metadata
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Runs the graph on an input already in the model's layout; returns `[N, 10]` logits.
    pub fn run(&self, input: &Tensor) -> Result<Tensor, ModelError> {
        self.check_input(input)?;
        match self.active_plan() {
            Some(plan) => {
                let n = input.dims()[0];
                let values = input.flatten_all()?.to_vec1::<f32>()?;
                let logits = plan.run(&values, n)?;
                Ok(Tensor::from_vec(logits, (n, NUM_CLASSES), input.device())?)
            }
            None => self.run_candle_onnx(input),
        }
    }

    /// Runs `n` images already in the model's layout, given as a flat slice; returns the
    /// `n * 10` logits. The server's path: no tensor is built when the graph is planned.
    pub fn run_values(&self, values: Vec<f32>, n: usize) -> Result<Vec<f32>, ModelError> {
        match self.active_plan() {
            Some(plan) => plan.run(&values, n),
            None => {
                let input = Tensor::from_vec(values, self.layout.batch_shape(n), &Device::Cpu)?;
                Ok(self.run(&input)?.flatten_all()?.to_vec1::<f32>()?)
            }
        }
    }

    fn check_input(&self, input: &Tensor) -> Result<(), ModelError> {
        let expected = self
            .layout
            .batch_shape(input.dims().first().copied().unwrap_or(0));
        if input.dims() != expected.as_slice() || input.dims()[0] == 0 {
            return Err(ModelError::BadInput {
                found: input.dims().to_vec(),
                expected: format!("{} with N >= 1", self.layout.describe()),
            });
        }
        Ok(())
    }

    /// Runs the graph through candle-onnx's `simple_eval`, whatever the engine.
    pub fn run_candle_onnx(&self, input: &Tensor) -> Result<Tensor, ModelError> {
        self.check_input(input)?;
        let mut values: HashMap<String, Tensor> = self
            .weights
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        values.insert(self.input_name.clone(), input.clone());
        let mut out = candle_onnx::simple_eval(&self.graph_only, values)?;
        let logits = out
            .remove(&self.output_name)
            .or_else(|| out.remove(OUTPUT_NAME))
            .ok_or_else(|| {
                candle_core::Error::Msg(format!("output {} missing", self.output_name))
            })?;
        let n = input.dims()[0];
        if logits.dims() != [n, NUM_CLASSES] {
            return Err(ModelError::from(candle_core::Error::Msg(format!(
                "model produced shape {:?}, expected [{n},{NUM_CLASSES}]",
                logits.dims()
            ))));
        }
        Ok(logits)
    }

    /// Runs the model on images given as 0–255 pixel rows of 784 values each.
    pub fn logits_for_pixels(&self, images: &[&[u8]]) -> Result<Tensor, ModelError> {
        let input = crate::preprocess::batch_from_pixels(images, self.layout, &Device::Cpu)?;
        self.run(&input)
    }

    /// Runs a batch of zero images once so the first real request does not pay for lazy
    /// initialisation (thread pools, allocator growth).
    pub fn warm_up(&self) -> Result<(), ModelError> {
        let blank = [0u8; crate::classes::IMAGE_PIXELS];
        self.logits_for_pixels(&[&blank])?;
        Ok(())
    }
}

/// Row-wise softmax of `[N, C]` logits, computed in f32 with the max subtracted.
pub fn softmax_rows(logits: &[f32], classes: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(logits.len());
    for row in logits.chunks_exact(classes) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exps: Vec<f32> = row.iter().map(|v| (v - max).exp()).collect();
        let sum: f32 = exps.iter().sum();
        out.extend(exps.iter().map(|e| e / sum));
    }
    out
}

/// Index of the largest value (first one on ties).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::writer::{build_model, GraphSpec, Layer};

    /// A tiny 3-channel model: conv 3→2 (3×3, pad 1) → ReLU → flatten → linear → 10.
    pub(crate) fn rgb_spec(size: usize) -> GraphSpec {
        let conv_w: Vec<f32> = (0..2 * 3 * 9)
            .map(|i| ((i % 7) as f32 - 3.0) * 0.05)
            .collect();
        let n_in = 2 * size * size;
        let lin_w: Vec<f32> = (0..10 * n_in)
            .map(|i| ((i % 13) as f32 - 6.0) * 0.01)
            .collect();
        GraphSpec {
            name: "rgb".into(),
            input: InputLayout::Rgb { size },
            num_classes: 10,
            flip_average: false,
            layers: vec![
                Layer::Normalize {
                    mean: crate::preprocess::IMAGENET_MEAN.to_vec(),
                    std: crate::preprocess::IMAGENET_STD.to_vec(),
                },
                Layer::Conv2d {
                    weight: conv_w,
                    shape: [2, 3, 3, 3],
                    bias: vec![0.1, -0.1],
                    stride: 1,
                    padding: 1,
                },
                Layer::Relu,
                Layer::Flatten,
                Layer::Linear {
                    weight: lin_w,
                    in_features: n_in,
                    out_features: 10,
                    bias: vec![0.0; 10],
                },
            ],
            metadata: vec![],
        }
    }

    #[test]
    fn three_channel_models_get_resized_replicated_input() {
        let proto = build_model(&rgb_spec(32)).unwrap();
        let model = OnnxModel::from_proto("rgb.onnx".into(), proto, 0).unwrap();
        assert_eq!(model.layout(), InputLayout::Rgb { size: 32 });
        let pixels: Vec<u8> = (0..784).map(|i| (i * 7 % 256) as u8).collect();
        let got = model.logits_for_pixels(&[&pixels]).unwrap();
        // The same input built by hand: /255, bilinear resize to 32, three equal channels.
        let unit: Vec<f32> = pixels.iter().map(|&p| p as f32 / 255.0).collect();
        let plane = crate::preprocess::resize_bilinear(&unit, 28, 28, 32, 32);
        let rgb: Vec<f32> = plane.iter().chain(&plane).chain(&plane).copied().collect();
        let want = model
            .run(&Tensor::from_vec(rgb, (1, 3, 32, 32), &Device::Cpu).unwrap())
            .unwrap();
        let diff = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0);
        // Wrong shapes are refused with the expected layout named.
        let bad = Tensor::zeros((1, 1, 28, 28), candle_core::DType::F32, &Device::Cpu).unwrap();
        let err = model.run(&bad).unwrap_err().to_string();
        assert!(err.contains("[N,3,32,32]"), "{err}");
    }

    #[test]
    fn unsupported_ops_and_input_shapes_are_named() {
        let mut proto = build_model(&rgb_spec(32)).unwrap();
        proto.graph.as_mut().unwrap().node[2].op_type = "FancyConv".into();
        let err = OnnxModel::from_proto("m.onnx".into(), proto, 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("FancyConv") && err.contains("m.onnx"), "{err}");

        let mut proto = build_model(&rgb_spec(32)).unwrap();
        let input = &mut proto.graph.as_mut().unwrap().input[0];
        if let Some(type_proto::Value::TensorType(t)) =
            input.r#type.as_mut().unwrap().value.as_mut()
        {
            t.shape.as_mut().unwrap().dim[1].value = Some(Dim::DimValue(5));
        }
        let err = OnnxModel::from_proto("m.onnx".into(), proto, 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("[?,5,32,32]"), "{err}");
    }

    /// A node with fewer inputs than candle-onnx reads (the fuzzer's two-input `Gemm`, a
    /// one-input `Add`) is refused at load with the node named, instead of panicking inside
    /// candle-onnx on the first request; the shipped-style graph still loads.
    #[test]
    fn nodes_missing_inputs_are_refused_at_load() {
        for op in ["Gemm", "Add", "Conv"] {
            let mut proto = build_model(&rgb_spec(32)).unwrap();
            let g = proto.graph.as_mut().unwrap();
            let Some(n) = g.node.iter_mut().find(|n| n.op_type == op) else {
                continue;
            };
            n.input.truncate(1);
            let name = n.name.clone();
            let err = OnnxModel::from_proto("m.onnx".into(), proto, 0)
                .unwrap_err()
                .to_string();
            assert!(err.contains(&name) && err.contains(op), "{err}");
        }
        let mut proto = build_model(&rgb_spec(32)).unwrap();
        let g = proto.graph.as_mut().unwrap();
        g.node[0].op_type = "Gemm".into();
        g.node[0].input.truncate(2);
        let err = OnnxModel::from_proto("m.onnx".into(), proto, 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("2 inputs") && err.contains("reads 3"), "{err}");
        assert!(
            OnnxModel::from_proto("m.onnx".into(), build_model(&rgb_spec(32)).unwrap(), 0).is_ok()
        );
    }

    /// Every shape and size is checked before candle allocates: each case here would
    /// otherwise overflow, allocate far more than the file holds, or (the odd raw length)
    /// write past candle's buffer.
    #[test]
    fn initializer_shapes_and_sizes_are_bounded_before_allocation() {
        let refused = |edit: &dyn Fn(&mut onnx::TensorProto)| {
            let mut proto = build_model(&rgb_spec(4)).unwrap();
            let g = proto.graph.as_mut().unwrap();
            let t = g
                .initializer
                .iter_mut()
                .find(|t| t.dims == [2, 3, 3, 3])
                .unwrap();
            edit(t);
            OnnxModel::from_proto("m.onnx".into(), proto, 0)
                .unwrap_err()
                .to_string()
        };
        let e = refused(&|t| t.dims[0] = -2);
        assert!(e.contains("negative dimension (-2)"), "{e}");
        let e = refused(&|t| t.dims = vec![1 << 40, 1 << 40, 1, 1]);
        assert!(e.contains("over 268435456 values"), "{e}");
        let e = refused(&|t| t.dims[0] *= 2);
        assert!(
            e.contains("declares 108 values") && e.contains("carries 54"),
            "{e}"
        );
        let e = refused(&|t| {
            t.raw_data.pop();
        });
        assert!(e.contains("215 raw bytes"), "{e}");
        let e = refused(&|t| t.data_type = onnx::tensor_proto::DataType::String as i32);
        assert!(e.contains("data type 8"), "{e}");
        let e = refused(&|t| t.data_location = 1);
        assert!(e.contains("external file"), "{e}");
        // The typed field must hold exactly the declared count too.
        let e = refused(&|t| {
            t.float_data = vec![0.0; 3];
            t.raw_data.clear();
        });
        assert!(e.contains("declares 54 values"), "{e}");

        let big = build_model(&rgb_spec(4)).map(|mut p| {
            let input = &mut p.graph.as_mut().unwrap().input[0];
            if let Some(type_proto::Value::TensorType(t)) =
                input.r#type.as_mut().unwrap().value.as_mut()
            {
                let dims = &mut t.shape.as_mut().unwrap().dim;
                dims[2].value = Some(Dim::DimValue(MAX_RGB_SIZE + 1));
                dims[3].value = Some(Dim::DimValue(MAX_RGB_SIZE + 1));
            }
            p
        });
        let e = OnnxModel::from_proto("m.onnx".into(), big.unwrap(), 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("[?,3,513,513]"), "{e}");
    }
}
