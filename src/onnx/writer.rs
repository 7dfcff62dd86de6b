//! Builds an ONNX `ModelProto` from a list of layers.
//!
//! candle has no exporter, so training describes its model as a short list of [`Layer`]s with
//! their weights, and this module turns that into a graph with the prost types candle-onnx
//! exposes: opset 13, float32 initializers stored as raw little-endian data, a dynamic batch
//! dimension `N`, input `pixels` (values 0–1) and output `logits` `[N, 10]`.

use super::{INPUT_NAME, OPSET, OUTPUT_NAME};
use crate::preprocess::InputLayout;
use candle_onnx::onnx::{
    self, attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto,
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use prost::Message;
use std::path::{Path, PathBuf};

/// One layer of a feed-forward image classifier, with its weights in PyTorch's layout.
#[derive(Debug, Clone)]
pub enum Layer {
    /// `(x - mean[c]) / std[c]` per channel (one value each for gray input).
    Normalize { mean: Vec<f32>, std: Vec<f32> },
    /// 2-D convolution; `weight` is `[out, in, k, k]` row-major, `bias` has `out` values.
    Conv2d {
        weight: Vec<f32>,
        shape: [usize; 4],
        bias: Vec<f32>,
        stride: usize,
        padding: usize,
    },
    /// Elementwise `max(x, 0)`.
    Relu,
    /// Elementwise `x/2 · (1 + erf(x/√2))` (PyTorch's `nn.GELU()`), written as the
    /// `Div → Erf → Add → Mul → Mul` chain PyTorch exports at opset 13, since the `Gelu`
    /// operator only exists from opset 20.
    Gelu,
    /// Square max pooling without padding.
    MaxPool2d { kernel: usize, stride: usize },
    /// PyTorch's `AdaptiveAvgPool2d(out)` on a map of known size `in_h×in_w`: written as two
    /// MatMuls with [`adaptive_pool_matrix`]es (the pool is separable), since ONNX has no
    /// adaptive pooling. `out = 1` is global average pooling.
    AdaptiveAvgPool2d {
        in_h: usize,
        in_w: usize,
        out: usize,
    },
    /// `[N, C, H, W]` → `[N, C*H*W]`.
    Flatten,
    /// Fully connected; `weight` is `[out, in]` row-major (PyTorch's `nn.Linear`).
    Linear {
        weight: Vec<f32>,
        in_features: usize,
        out_features: usize,
        bias: Vec<f32>,
    },
}

/// Everything needed to write a model file.
#[derive(Debug, Clone)]
pub struct GraphSpec {
    /// Graph name stored in the file.
    pub name: String,
    /// What the model takes as input.
    pub input: InputLayout,
    /// Number of output classes (the width of `logits`).
    pub num_classes: usize,
    /// The layers, applied in order.
    pub layers: Vec<Layer>,
    /// Flip test-time averaging inside the graph: the logits are the mean of the layers'
    /// output for each image and for its mirror image (left-right). Written as a `Slice`
    /// (step −1 along the width) and a `Concat` along the batch before the layers, and a
    /// `Reshape` to `[2, N, classes]` and a `ReduceMean` over the first axis after them, so
    /// any ONNX runtime computes it; it doubles the compute per image. Image inputs only.
    pub flip_average: bool,
    /// Free-form key/value metadata (class names, training summary, ...).
    pub metadata: Vec<(String, String)>,
}

/// Failure to describe or write a model.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("layer {index} ({kind}): {message}")]
    Layer {
        index: usize,
        kind: &'static str,
        message: String,
    },
    #[error("{0}")]
    Spec(String),
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl Layer {
    fn kind(&self) -> &'static str {
        match self {
            Layer::Normalize { .. } => "Normalize",
            Layer::Conv2d { .. } => "Conv2d",
            Layer::Relu => "Relu",
            Layer::Gelu => "Gelu",
            Layer::MaxPool2d { .. } => "MaxPool2d",
            Layer::AdaptiveAvgPool2d { .. } => "AdaptiveAvgPool2d",
            Layer::Flatten => "Flatten",
            Layer::Linear { .. } => "Linear",
        }
    }

    fn check(&self, index: usize) -> Result<(), WriteError> {
        let fail = |message: String| {
            Err(WriteError::Layer {
                index,
                kind: self.kind(),
                message,
            })
        };
        match self {
            Layer::Normalize { mean, std } => {
                if mean.len() != std.len() || mean.is_empty() {
                    return fail(format!("{} means but {} stds", mean.len(), std.len()));
                }
                if std.iter().any(|s| *s == 0.0 || !s.is_finite()) {
                    return fail("a standard deviation is zero or not finite".into());
                }
            }
            Layer::Conv2d {
                weight,
                shape,
                bias,
                ..
            } => {
                if weight.len() != shape.iter().product::<usize>() {
                    return fail(format!("{} weights for shape {shape:?}", weight.len()));
                }
                if bias.len() != shape[0] {
                    return fail(format!("{} biases for {} filters", bias.len(), shape[0]));
                }
            }
            Layer::Linear {
                weight,
                in_features,
                out_features,
                bias,
            } => {
                if weight.len() != in_features * out_features {
                    return fail(format!(
                        "{} weights for {out_features}x{in_features}",
                        weight.len()
                    ));
                }
                if bias.len() != *out_features {
                    return fail(format!("{} biases for {out_features} outputs", bias.len()));
                }
            }
            Layer::AdaptiveAvgPool2d { in_h, in_w, out } => {
                if *in_h == 0 || *in_w == 0 || *out == 0 {
                    return fail(format!("empty pool {in_h}x{in_w} -> {out}x{out}"));
                }
            }
            Layer::Relu | Layer::Gelu | Layer::MaxPool2d { .. } | Layer::Flatten => {}
        }
        Ok(())
    }
}

fn tensor(name: &str, dims: &[usize], values: &[f32]) -> TensorProto {
    let mut raw = Vec::with_capacity(values.len() * 4);
    for v in values {
        raw.extend_from_slice(&v.to_le_bytes());
    }
    TensorProto {
        name: name.to_string(),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: DataType::Float as i32,
        raw_data: raw,
        ..Default::default()
    }
}

fn int64s(name: &str, values: &[i64]) -> TensorProto {
    TensorProto {
        name: name.to_string(),
        dims: vec![values.len() as i64],
        data_type: DataType::Int64 as i32,
        int64_data: values.to_vec(),
        ..Default::default()
    }
}

fn ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.to_string(),
        r#type: AttributeType::Ints as i32,
        ints: values.to_vec(),
        ..Default::default()
    }
}

fn int(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: name.to_string(),
        r#type: AttributeType::Int as i32,
        i: value,
        ..Default::default()
    }
}

fn node(op: &str, name: String, inputs: Vec<String>, output: String) -> NodeProto {
    NodeProto {
        op_type: op.to_string(),
        name,
        input: inputs,
        output: vec![output],
        ..Default::default()
    }
}

fn value_info(name: &str, dims: &[Option<usize>]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| tensor_shape_proto::Dimension {
            value: Some(match d {
                Some(v) => tensor_shape_proto::dimension::Value::DimValue(*v as i64),
                None => tensor_shape_proto::dimension::Value::DimParam("N".to_string()),
            }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: name.to_string(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: DataType::Float as i32,
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Builds the in-memory ONNX model for `spec`.
pub fn build_model(spec: &GraphSpec) -> Result<ModelProto, WriteError> {
    let mut nodes = Vec::new();
    let mut initializers = Vec::new();
    let mut current = INPUT_NAME.to_string();
    if spec.flip_average {
        if spec.input == InputLayout::Flat {
            return Err(WriteError::Spec(
                "flip averaging needs an image input ([N, C, H, W]), not flat pixels".into(),
            ));
        }
        if spec.layers.is_empty() {
            return Err(WriteError::Spec("flip averaging of an empty graph".into()));
        }
        // pixels[:, :, :, ::-1], then [pixels; mirrored] along the batch.
        for (what, v) in [
            ("starts", -1),
            ("ends", i64::MIN),
            ("axes", 3),
            ("steps", -1),
        ] {
            initializers.push(int64s(&format!("flip.{what}"), &[v]));
        }
        let inputs = ["starts", "ends", "axes", "steps"].map(|w| format!("flip.{w}"));
        nodes.push(node(
            "Slice",
            "flip_mirror".into(),
            std::iter::once(current.clone()).chain(inputs).collect(),
            "flip.mirrored".into(),
        ));
        let mut concat = node(
            "Concat",
            "flip_batch".into(),
            vec![current, "flip.mirrored".into()],
            "flip.both".into(),
        );
        concat.attribute = vec![int("axis", 0)];
        nodes.push(concat);
        current = "flip.both".into();
    }
    let last = spec.layers.len().saturating_sub(1);
    for (i, layer) in spec.layers.iter().enumerate() {
        layer.check(i)?;
        let out = if i == last && !spec.flip_average {
            OUTPUT_NAME.to_string()
        } else if i == last {
            "flip.logits_both".to_string()
        } else {
            format!("l{i}_{}", layer.kind().to_lowercase())
        };
        let name = format!("l{i}");
        match layer {
            Layer::Normalize { mean, std } => {
                let c = mean.len();
                let (m, s, mid) = (
                    format!("{name}.mean"),
                    format!("{name}.std"),
                    format!("{name}.centered"),
                );
                initializers.push(tensor(&m, &[1, c, 1, 1], mean));
                initializers.push(tensor(&s, &[1, c, 1, 1], std));
                nodes.push(node(
                    "Sub",
                    format!("{name}_sub"),
                    vec![current.clone(), m],
                    mid.clone(),
                ));
                nodes.push(node(
                    "Div",
                    format!("{name}_div"),
                    vec![mid, s],
                    out.clone(),
                ));
            }
            Layer::Conv2d {
                weight,
                shape,
                bias,
                stride,
                padding,
            } => {
                let (w, b) = (format!("{name}.weight"), format!("{name}.bias"));
                initializers.push(tensor(&w, shape, weight));
                initializers.push(tensor(&b, &[shape[0]], bias));
                let mut n = node("Conv", name, vec![current.clone(), w, b], out.clone());
                let (k, s, p) = (shape[2] as i64, *stride as i64, *padding as i64);
                n.attribute = vec![
                    ints("kernel_shape", &[k, shape[3] as i64]),
                    ints("strides", &[s, s]),
                    ints("pads", &[p, p, p, p]),
                    ints("dilations", &[1, 1]),
                ];
                nodes.push(n);
            }
            Layer::Relu => nodes.push(node("Relu", name, vec![current.clone()], out.clone())),
            Layer::Gelu => {
                let mut k = |what: &str, v: f32| {
                    let n = format!("{name}.{what}");
                    initializers.push(tensor(&n, &[], &[v]));
                    n
                };
                let (sqrt2, one, half) = (
                    k("sqrt2", std::f32::consts::SQRT_2),
                    k("one", 1.0),
                    k("half", 0.5),
                );
                let v = |what: &str| format!("{name}.{what}");
                let steps = [
                    ("Div", vec![current.clone(), sqrt2], v("scaled")),
                    ("Erf", vec![v("scaled")], v("erf")),
                    ("Add", vec![v("erf"), one], v("erf_plus_one")),
                    (
                        "Mul",
                        vec![current.clone(), v("erf_plus_one")],
                        v("product"),
                    ),
                    ("Mul", vec![v("product"), half], out.clone()),
                ];
                for (i, (op, inputs, output)) in steps.into_iter().enumerate() {
                    nodes.push(node(op, format!("{name}_{i}"), inputs, output));
                }
            }
            Layer::MaxPool2d { kernel, stride } => {
                let mut n = node("MaxPool", name, vec![current.clone()], out.clone());
                let (k, s) = (*kernel as i64, *stride as i64);
                n.attribute = vec![ints("kernel_shape", &[k, k]), ints("strides", &[s, s])];
                nodes.push(n);
            }
            Layer::AdaptiveAvgPool2d {
                in_h,
                in_w,
                out: side,
            } => {
                let (rows, cols_t, mid) = (
                    format!("{name}.rows"),
                    format!("{name}.cols_t"),
                    format!("{name}.pooled_rows"),
                );
                initializers.push(tensor(
                    &rows,
                    &[*side, *in_h],
                    &adaptive_pool_matrix(*in_h, *side),
                ));
                let cols = adaptive_pool_matrix(*in_w, *side);
                let mut t = vec![0f32; cols.len()];
                for o in 0..*side {
                    for i in 0..*in_w {
                        t[i * side + o] = cols[o * in_w + i];
                    }
                }
                initializers.push(tensor(&cols_t, &[*in_w, *side], &t));
                // [side,H] x [N,C,H,W] -> [N,C,side,W]; then x [W,side] -> [N,C,side,side].
                nodes.push(node(
                    "MatMul",
                    format!("{name}_rows"),
                    vec![rows, current.clone()],
                    mid.clone(),
                ));
                nodes.push(node(
                    "MatMul",
                    format!("{name}_cols"),
                    vec![mid, cols_t],
                    out.clone(),
                ));
            }
            Layer::Flatten => nodes.push(node("Flatten", name, vec![current.clone()], out.clone())),
            Layer::Linear {
                weight,
                in_features,
                out_features,
                bias,
            } => {
                // Stored transposed ([in, out]) so the graph is a plain MatMul + Add, which
                // every runtime executes without the alpha/beta scaling Gemm implies.
                let mut wt = vec![0f32; weight.len()];
                for o in 0..*out_features {
                    for i in 0..*in_features {
                        wt[i * out_features + o] = weight[o * in_features + i];
                    }
                }
                let (w, b, mid) = (
                    format!("{name}.weight_t"),
                    format!("{name}.bias"),
                    format!("{name}.matmul"),
                );
                initializers.push(tensor(&w, &[*in_features, *out_features], &wt));
                initializers.push(tensor(&b, &[*out_features], bias));
                nodes.push(node(
                    "MatMul",
                    format!("{name}_matmul"),
                    vec![current.clone(), w],
                    mid.clone(),
                ));
                nodes.push(node(
                    "Add",
                    format!("{name}_add"),
                    vec![mid, b],
                    out.clone(),
                ));
            }
        }
        current = out;
    }
    if spec.flip_average {
        // [2N, classes] -> [2, N, classes] -> mean over the first axis: [N, classes].
        initializers.push(int64s("flip.pairs", &[2, -1, spec.num_classes as i64]));
        nodes.push(node(
            "Reshape",
            "flip_pairs".into(),
            vec![current, "flip.pairs".into()],
            "flip.pairs_out".into(),
        ));
        let mut mean = node(
            "ReduceMean",
            "flip_mean".into(),
            vec!["flip.pairs_out".into()],
            OUTPUT_NAME.into(),
        );
        mean.attribute = vec![ints("axes", &[0]), int("keepdims", 0)];
        nodes.push(mean);
    }
    let input_dims: Vec<Option<usize>> = std::iter::once(None)
        .chain(spec.input.batch_shape(1)[1..].iter().map(|&d| Some(d)))
        .collect();
    let graph = GraphProto {
        name: spec.name.clone(),
        node: nodes,
        initializer: initializers,
        input: vec![value_info(INPUT_NAME, &input_dims)],
        output: vec![value_info(OUTPUT_NAME, &[None, Some(spec.num_classes)])],
        ..Default::default()
    };
    Ok(ModelProto {
        ir_version: 7,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        }],
        producer_name: "fmnist".to_string(),
        producer_version: env!("CARGO_PKG_VERSION").to_string(),
        graph: Some(graph),
        metadata_props: spec
            .metadata
            .iter()
            .map(|(k, v)| StringStringEntryProto {
                key: k.clone(),
                value: v.clone(),
            })
            .collect(),
        ..Default::default()
    })
}

/// The `[out, len]` row-major matrix of PyTorch's adaptive average pooling along one axis:
/// output `o` averages inputs `floor(o·len/out) .. ceil((o+1)·len/out)` (so it upsamples
/// when `out > len`, repeating inputs, exactly as `AdaptiveAvgPool2d` does).
pub fn adaptive_pool_matrix(len: usize, out: usize) -> Vec<f32> {
    let mut m = vec![0f32; out * len];
    for o in 0..out {
        let start = o * len / out;
        let end = ((o + 1) * len).div_ceil(out);
        let weight = 1.0 / (end - start) as f32;
        for i in start..end {
            m[o * len + i] = weight;
        }
    }
    m
}

/// Writes `spec` as an ONNX file, atomically: the bytes go to a temporary file beside `path`
/// which is then renamed over it, so a crash never leaves a half-written model behind.
pub fn write_model(path: &Path, spec: &GraphSpec) -> Result<(), WriteError> {
    let bytes = build_model(spec)?.encode_to_vec();
    write_atomic(path, &bytes).map_err(|source| WriteError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `bytes` to `path` through a temporary sibling and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(dir) = dir {
        std::fs::create_dir_all(dir)?;
    }
    let file_name = path.file_name().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "path has no file name")
    })?;
    let tmp = path.with_file_name(format!(
        ".{}.{}.tmp",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The metadata of a model file, as key/value pairs.
pub fn metadata(model: &onnx::ModelProto) -> Vec<(String, String)> {
    model
        .metadata_props
        .iter()
        .map(|e| (e.key.clone(), e.value.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(m: &[f32], len: usize) -> Vec<Vec<f32>> {
        m.chunks(len).map(|r| r.to_vec()).collect()
    }

    /// Flip averaging mirrors images: a graph over flat pixels cannot have it.
    #[test]
    fn flip_averaging_needs_an_image_input() {
        let spec = GraphSpec {
            name: "flat".into(),
            input: InputLayout::Flat,
            num_classes: 10,
            flip_average: true,
            layers: vec![Layer::Linear {
                weight: vec![0.0; 7840],
                in_features: 784,
                out_features: 10,
                bias: vec![0.0; 10],
            }],
            metadata: vec![],
        };
        let err = build_model(&spec).unwrap_err().to_string();
        assert!(err.contains("image input"), "{err}");
    }

    #[test]
    fn adaptive_pool_matrix_follows_pytorch_bins() {
        // Same size: identity. Half size: pairs. 2 -> 7 upsamples (torchvision's 7x7 pool on
        // the 2x2 map of a 64x64 input): bins [0,1) [0,1) [0,1) [0,2) [1,2) [1,2) [1,2).
        let id = adaptive_pool_matrix(3, 3);
        assert_eq!(id, vec![1., 0., 0., 0., 1., 0., 0., 0., 1.]);
        assert_eq!(
            rows(&adaptive_pool_matrix(4, 2), 4),
            vec![vec![0.5, 0.5, 0., 0.], vec![0., 0., 0.5, 0.5]]
        );
        let up = rows(&adaptive_pool_matrix(2, 7), 2);
        assert_eq!(up[0], vec![1., 0.]);
        assert_eq!(up[3], vec![0.5, 0.5]);
        assert_eq!(up[6], vec![0., 1.]);
        // 5 -> 3: bins [0,2) [1,4) [3,5) overlap, as in PyTorch.
        let odd = rows(&adaptive_pool_matrix(5, 3), 5);
        assert_eq!(odd[1], vec![0., 1. / 3., 1. / 3., 1. / 3., 0.]);
        // Global average pooling.
        assert_eq!(adaptive_pool_matrix(4, 1), vec![0.25; 4]);
    }
}
