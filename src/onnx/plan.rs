//! A planned executor for the plain feed-forward graphs fmnist writes.
//!
//! candle-onnx's `simple_eval` interprets the graph on every call: it looks every value up by
//! name, and its CPU convolution is a generic NCHW loop. For the graphs fmnist exports (and
//! PyTorch exports of the same shape: Conv/Relu/MaxPool/Flatten/MatMul+Add or Gemm, per-channel
//! Sub/Div/Mul/Add, MatMul pooling) [`Plan::new`] turns the graph once, at load, into a list of
//! steps over channels-last (NHWC) buffers with the weights already packed for the kernels in
//! [`crate::kernels`]: a convolution reads its input windows in place from a zero-padded copy
//! (no im2col matrix) with bias, ReLU and a following max-pool fused into the same pass; fully
//! connected layers have their rows permuted at plan time so that ONNX's (channel, y, x)
//! flatten order costs nothing. Any node outside that set makes [`Plan::new`] return the
//! reason, and the model keeps running through candle-onnx.
//!
//! Parallelism: work is split over rows of the output (images × positions) with rayon; a
//! single small image runs on the calling thread, since handing a 100 µs job to another thread
//! costs more than it saves.

use super::model::ModelError;
use crate::kernels::activation::gelu_in_place;
use crate::kernels::{
    conv_bias_act, conv_pool2_bias_act, matmul_bias_act, matvec_cols, sgemm, PackedB, Windows,
};
use crate::preprocess::InputLayout;
use candle_core::Tensor;
use candle_onnx::onnx::{self, NodeProto};
use rayon::prelude::*;
use std::collections::HashMap;

/// Multiply-accumulates below which a step runs on the calling thread.
const PARALLEL_MIN_MACS: usize = 1_000_000;
/// Values below which a GELU step runs on the calling thread.
const GELU_PARALLEL_MIN: usize = 1 << 16;
thread_local! {
    /// Per-thread zero-padded input images of a fused convolution + pool.
    static PAD_SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Per-thread convolution output awaiting its fused max-pool.
    static MAP_SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Multiply-accumulates above which one image's fully connected layer is split by columns
/// across threads (its weights, ≥ 1 MB, take longer to read than the hand-off).
const SPLIT_ROW_MIN_MACS: usize = 256 * 1024;

thread_local! {
    /// Activation buffers that earlier passes on this thread are done with (see [`scratch`]).
    static SPARE: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// How many finished activation buffers [`recycle`] keeps per thread (a pass holds at most
/// two at once), and the largest it keeps, in values.
const SPARE_BUFFERS: usize = 4;
const SPARE_MAX_VALUES: usize = 4 << 20;

/// A buffer of `len` values for a step that writes every one of them; what it holds before
/// that is whatever an earlier pass left. Why: at batch 64 a pass moves ~3 MB of activations
/// through its steps, and zeroing fresh allocations of that size cost ~130 µs per pass on the
/// calling thread, before any kernel started (recycling measured 3–5 % faster at batch 64,
/// alternated in one process; neutral at batch 1).
fn scratch(len: usize) -> Vec<f32> {
    let reused = SPARE.with_borrow_mut(|spare| {
        // The smallest that fits, so that a small pass leaves the big buffers alone.
        let at = (0..spare.len())
            .filter(|&i| spare[i].capacity() >= len)
            .min_by_key(|&i| spare[i].capacity())?;
        Some(spare.swap_remove(at))
    });
    let mut v = reused.unwrap_or_default();
    if v.len() >= len {
        v.truncate(len);
    } else {
        v.resize(len, 0.0);
    }
    v
}

/// Hands a finished activation back for [`scratch`] to reuse.
fn recycle(v: Vec<f32>) {
    if v.capacity() > SPARE_MAX_VALUES {
        return;
    }
    SPARE.with_borrow_mut(|spare| {
        if spare.len() < SPARE_BUFFERS {
            spare.push(v);
        }
    });
}

/// Bytes of im2col rows one chunk builds (fits next to the weights in a 1–2 MB L2).
const CHUNK_BYTES: usize = 256 * 1024;

/// Shape of the activation between two steps, per image.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Shape {
    /// Channels-last map.
    Map { h: usize, w: usize, c: usize },
    /// Feature vector. `chw` is set right after a Flatten of a map: memory still holds the
    /// (y, x, channel) order while ONNX means (channel, y, x); the next fully connected layer
    /// absorbs the difference in its weights, anything else materialises it.
    Flat {
        f: usize,
        chw: Option<(usize, usize, usize)>,
    },
}

impl Shape {
    fn len(&self) -> usize {
        match *self {
            Shape::Map { h, w, c } => h * w * c,
            Shape::Flat { f, .. } => f,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Elementwise {
    Add,
    Sub,
    Mul,
    Div,
}

#[derive(Debug)]
enum Step {
    /// `x op k[channel]` on the last dimension (channel of a map, feature of a vector).
    Elementwise {
        op: Elementwise,
        k: Vec<f32>,
    },
    Conv(Conv),
    Relu,
    /// Exact GELU ([`crate::kernels::activation::gelu`]).
    Gelu,
    MaxPool {
        k: usize,
        stride: usize,
        inp: (usize, usize, usize),
        out: (usize, usize),
    },
    /// `out[s, x, c] = Σ_y m[s, y] · in[y, x, c]` (ONNX `MatMul(const[S,H], x[N,C,H,W])`).
    PoolRows {
        m: Vec<f32>,
        s: usize,
        inp: (usize, usize, usize),
    },
    /// `out[y, s, c] = Σ_x in[y, x, c] · m[x, s]` (ONNX `MatMul(x[N,C,H,W], const[W,S])`).
    PoolCols {
        m: Vec<f32>,
        s: usize,
        inp: (usize, usize, usize),
    },
    /// (y, x, channel) → (channel, y, x), for a flatten no fully connected layer absorbed.
    ToChw {
        h: usize,
        w: usize,
        c: usize,
    },
    Linear(Linear),
    /// Flip test-time averaging, first half: `n` channels-last maps become `2n`, the images
    /// followed by their mirror images (ONNX `Concat(x, Slice(x, step −1 on the width))`
    /// along the batch).
    MirrorBatch {
        h: usize,
        w: usize,
        c: usize,
    },
    /// Second half: `2n` vectors of `f` become `n`, each the mean of row `i` and row `n + i`
    /// (ONNX `Reshape` to `[2, N, f]` and `ReduceMean` over the first axis).
    MeanHalves {
        f: usize,
    },
}

#[derive(Debug)]
struct Conv {
    k: usize,
    stride: usize,
    pad: usize,
    cin: usize,
    cout: usize,
    inp: (usize, usize),
    out: (usize, usize),
    /// `[k·k·cin, cout]`, rows in (ky, kx, channel) order.
    weight: PackedB,
    bias: Vec<f32>,
    relu: bool,
    /// A max-pool fused into the convolution (applied per image while its map is in cache).
    pool: Option<FusedPool>,
}

#[derive(Debug)]
struct FusedPool {
    k: usize,
    stride: usize,
    out: (usize, usize),
}

/// Largest convolution output map (bytes, one image) that a following max-pool is fused into.
const FUSE_POOL_MAX_BYTES: usize = 512 * 1024;

#[derive(Debug)]
struct Linear {
    inp: usize,
    out: usize,
    /// `[inp, out]`.
    weight: PackedB,
    bias: Vec<f32>,
    relu: bool,
}

/// A graph turned into kernel calls; see the module documentation.
#[derive(Debug)]
pub struct Plan {
    steps: Vec<Step>,
    input: Shape,
    /// The input is `[N, C, H, W]` and needs transposing to channels-last.
    input_is_nchw: bool,
    outputs: usize,
    /// Split a single image's large steps across threads (see [`Plan::split_single_images`]).
    split_single: bool,
}

/// Reads the value of a constant (initializer) input.
type Consts<'a> = HashMap<&'a str, (&'a [usize], Vec<f32>)>;
/// A constant input of a node: its shape and values.
type ConstInput<'c> = (Vec<usize>, &'c [f32]);

fn attr<'a>(node: &'a NodeProto, name: &str) -> Option<&'a onnx::AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

fn attr_ints(node: &NodeProto, name: &str) -> Option<Vec<i64>> {
    attr(node, name).map(|a| a.ints.clone())
}

fn attr_int(node: &NodeProto, name: &str, default: i64) -> i64 {
    attr(node, name).map_or(default, |a| a.i)
}

fn attr_float(node: &NodeProto, name: &str, default: f32) -> f32 {
    attr(node, name).map_or(default, |a| a.f)
}

/// Attributes the planner does not implement must be absent (or hold their default).
fn refuse_attrs(node: &NodeProto, allowed: &[&str]) -> Result<(), String> {
    for a in &node.attribute {
        if !allowed.contains(&a.name.as_str()) {
            return Err(format!(
                "node '{}' ({}) has attribute '{}'",
                node.name, node.op_type, a.name
            ));
        }
    }
    Ok(())
}

fn all_equal(v: &[i64], want: i64) -> bool {
    v.iter().all(|&x| x == want)
}

impl Plan {
    /// Plans `graph` for inputs of `layout`, reading weights from `weights` (by initializer
    /// name). `Err` says why the graph is outside what the planner runs.
    pub fn new(
        graph: &onnx::GraphProto,
        weights: &[(String, Tensor)],
        input_name: &str,
        output_name: &str,
        layout: InputLayout,
    ) -> Result<Plan, String> {
        let mut consts: Consts<'_> = HashMap::new();
        for (name, t) in weights {
            let values = t
                .flatten_all()
                .and_then(|t| t.to_dtype(candle_core::DType::F32))
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| format!("initializer '{name}': {e}"))?;
            consts.insert(name.as_str(), (t.dims(), values));
        }
        let (input, input_is_nchw) = match layout {
            InputLayout::Flat => (Shape::Flat { f: 784, chw: None }, false),
            InputLayout::Gray => (Shape::Map { h: 28, w: 28, c: 1 }, false),
            InputLayout::Rgb { size } => (
                Shape::Map {
                    h: size,
                    w: size,
                    c: 3,
                },
                true,
            ),
        };
        let mut planner = Planner {
            consts: &consts,
            steps: Vec::new(),
            shape: input,
            current: input_name.to_string(),
            doubled: false,
        };
        let nodes = &graph.node;
        let mut i = 0;
        while i < nodes.len() {
            i += planner.node(&nodes[i], &nodes[i + 1..])?;
        }
        if planner.current != output_name {
            return Err(format!(
                "the chain of nodes ends in '{}', not the output '{output_name}'",
                planner.current
            ));
        }
        if planner.doubled {
            return Err("the mirrored images are never averaged back".into());
        }
        planner.materialise_chw();
        let outputs = match planner.shape {
            Shape::Flat { f, .. } => f,
            Shape::Map { .. } => return Err("the graph ends in a feature map".into()),
        };
        Ok(Plan {
            steps: planner.steps,
            input,
            input_is_nchw,
            outputs,
            split_single: true,
        })
    }

    /// Whether a pass over fewer images than threads splits its large steps (a pooled
    /// convolution by positions, a fully connected layer by columns) across rayon's threads,
    /// the calling thread computing its own share. On by default: for back-to-back calls it
    /// cuts batch-1 latency by ~25 %. Off suits a caller whose calls come with idle gaps and
    /// whose other cores have their own work, as the server's batching thread does: there the
    /// pool's threads have gone to sleep between requests, and waking one costs more than it
    /// saves (measured: 1-connection throughput 2,436–2,569 req/s with the split against
    /// 2,964–3,554 without, BENCHMARKS.md).
    pub fn split_single_images(&mut self, on: bool) {
        self.split_single = on;
    }

    /// Plans a whole in-memory model (weights still in its initializers) for inputs of
    /// `layout`, whatever its output width: used for feature extractors, whose output is not
    /// the 10 classes [`super::OnnxModel`] insists on.
    pub fn from_model_proto(proto: &onnx::ModelProto, layout: InputLayout) -> Result<Plan, String> {
        let graph = proto.graph.as_ref().ok_or("the model has no graph")?;
        let mut weights = Vec::with_capacity(graph.initializer.len());
        for t in &graph.initializer {
            let tensor = candle_onnx::eval::get_tensor(t, &t.name)
                .map_err(|e| format!("initializer '{}': {e}", t.name))?;
            weights.push((t.name.clone(), tensor));
        }
        let init: Vec<&str> = weights.iter().map(|(n, _)| n.as_str()).collect();
        let input = graph
            .input
            .iter()
            .find(|i| !init.contains(&i.name.as_str()))
            .ok_or("the graph has no input")?;
        let output = graph.output.first().ok_or("the graph has no output")?;
        Plan::new(graph, &weights, &input.name, &output.name, layout)
    }

    /// Values per image the plan writes.
    pub fn output_len(&self) -> usize {
        self.outputs
    }

    /// Values per image the plan reads.
    pub fn input_len(&self) -> usize {
        self.input.len()
    }

    /// Runs `n` images given in the ONNX input layout (`[N,C,H,W]` or `[N,784]`); returns
    /// `[N, outputs]` row-major.
    pub fn run(&self, input: &[f32], n: usize) -> Result<Vec<f32>, ModelError> {
        let per = self.input.len();
        if n == 0 || input.len() != n * per {
            return Err(ModelError::BadInput {
                found: vec![input.len()],
                expected: format!("{n} images of {per} values"),
            });
        }
        let mut x = match (self.input_is_nchw, self.input) {
            (true, Shape::Map { h, w, c }) => nchw_to_nhwc(input, n, c, h * w),
            _ => {
                let mut x = scratch(input.len());
                x.copy_from_slice(input);
                x
            }
        };
        let mut n = n;
        for step in &self.steps {
            x = step.run(x, n, self.split_single);
            n = step.images_after(n);
        }
        debug_assert_eq!(x.len(), n * self.outputs);
        // The logits leave in a buffer of their own size; the working one stays for reuse.
        let out = x.clone();
        recycle(x);
        Ok(out)
    }

    /// Runs like [`Plan::run`] and returns each step's name and time (for benchmarks).
    pub fn profile(&self, input: &[f32], n: usize) -> Vec<(String, std::time::Duration)> {
        let mut x = input.to_vec();
        let mut out = Vec::new();
        let mut n = n;
        for step in &self.steps {
            let t = std::time::Instant::now();
            x = step.run(x, n, self.split_single);
            n = step.images_after(n);
            out.push((step.name(), t.elapsed()));
        }
        recycle(x);
        out
    }

    /// Number of steps (kernel calls per forward pass), for logs.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    /// True for a plan without steps (an identity graph).
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }
}

struct Planner<'c, 'a> {
    consts: &'c Consts<'a>,
    steps: Vec<Step>,
    shape: Shape,
    current: String,
    /// Between a [`Step::MirrorBatch`] and its [`Step::MeanHalves`]: the batch is doubled.
    doubled: bool,
}

impl<'c, 'a> Planner<'c, 'a> {
    /// The single non-constant input of `node`, which must be the chain's current value, and
    /// the node's constant inputs in order (None where an input is the current value).
    fn split_inputs(&self, node: &NodeProto) -> Result<Vec<Option<ConstInput<'c>>>, String> {
        let consts: &'c Consts<'a> = self.consts;
        let mut seen_current = false;
        let mut out = Vec::new();
        for name in &node.input {
            if name.is_empty() {
                continue;
            }
            if *name == self.current {
                if seen_current {
                    return Err(format!("node '{}' reads the same value twice", node.name));
                }
                seen_current = true;
                out.push(None);
            } else if let Some((dims, v)) = consts.get(name.as_str()) {
                out.push(Some((dims.to_vec(), v.as_slice())));
            } else {
                return Err(format!(
                    "node '{}' reads '{name}', which is neither a weight nor the previous node's output",
                    node.name
                ));
            }
        }
        if !seen_current {
            return Err(format!(
                "node '{}' does not read the previous node's output",
                node.name
            ));
        }
        Ok(out)
    }

    fn materialise_chw(&mut self) {
        if let Shape::Flat {
            f,
            chw: Some((c, h, w)),
        } = self.shape
        {
            self.steps.push(Step::ToChw { h, w, c });
            self.shape = Shape::Flat { f, chw: None };
        }
    }

    /// Plans `node` (and possibly some of the nodes after it, `rest`, when they fuse); returns
    /// how many nodes it consumed.
    fn node(&mut self, node: &NodeProto, rest: &[NodeProto]) -> Result<usize, String> {
        let next = rest.first();
        if node.output.len() != 1 {
            return Err(format!(
                "node '{}' has {} outputs",
                node.name,
                node.output.len()
            ));
        }
        let inputs = self.split_inputs(node)?;
        let mut consumed = 1;
        match node.op_type.as_str() {
            "Relu" => {
                refuse_attrs(node, &[])?;
                match self.steps.last_mut() {
                    // ReLU and max-pool commute, so a ReLU after a fused pool may still be
                    // applied inside the convolution.
                    Some(Step::Conv(c)) if !c.relu => c.relu = true,
                    Some(Step::Linear(l)) if !l.relu => l.relu = true,
                    _ => self.steps.push(Step::Relu),
                }
            }
            "Add" | "Sub" | "Mul" | "Div" => {
                refuse_attrs(node, &[])?;
                if let Some(out) = self.gelu_chain(node, rest) {
                    self.steps.push(Step::Gelu);
                    self.current = out;
                    return Ok(5);
                }
                let op = match node.op_type.as_str() {
                    "Add" => Elementwise::Add,
                    "Sub" => Elementwise::Sub,
                    "Mul" => Elementwise::Mul,
                    _ => Elementwise::Div,
                };
                let [a, b] = inputs.as_slice() else {
                    return Err(format!("node '{}' needs two inputs", node.name));
                };
                // Sub and Div are not commutative: only `x op const` is planned.
                let (dims, k) = match (a, b) {
                    (None, Some(c)) => c.clone(),
                    (Some(c), None) if matches!(op, Elementwise::Add | Elementwise::Mul) => {
                        c.clone()
                    }
                    _ => {
                        return Err(format!(
                            "node '{}' is `const {} x`",
                            node.name, node.op_type
                        ))
                    }
                };
                self.elementwise(node, op, &dims, k)?;
            }
            "Gelu" => {
                refuse_attrs(node, &["approximate"])?;
                if attr(node, "approximate").is_some_and(|a| a.s != b"none") {
                    return Err(format!(
                        "Gelu '{}' with the tanh approximation (only the exact form is planned)",
                        node.name
                    ));
                }
                self.steps.push(Step::Gelu);
            }
            "Conv" => {
                self.materialise_chw();
                self.conv(node, &inputs)?;
            }
            "MaxPool" => {
                refuse_attrs(
                    node,
                    &[
                        "kernel_shape",
                        "strides",
                        "pads",
                        "dilations",
                        "ceil_mode",
                        "auto_pad",
                        "storage_order",
                    ],
                )?;
                let Shape::Map { h, w, c } = self.shape else {
                    return Err(format!("MaxPool '{}' on a vector", node.name));
                };
                let ks = attr_ints(node, "kernel_shape").unwrap_or_default();
                let strides = attr_ints(node, "strides").unwrap_or_else(|| vec![1, 1]);
                let plain = attr_ints(node, "pads").is_none_or(|p| all_equal(&p, 0))
                    && attr_ints(node, "dilations").is_none_or(|d| all_equal(&d, 1))
                    && attr_int(node, "ceil_mode", 0) == 0
                    && attr_int(node, "storage_order", 0) == 0
                    && attr(node, "auto_pad").is_none_or(|a| a.s == b"NOTSET");
                if !plain
                    || ks.len() != 2
                    || ks[0] != ks[1]
                    || strides.len() != 2
                    || strides[0] != strides[1]
                    || ks[0] < 1
                    || strides[0] < 1
                {
                    return Err(format!(
                        "MaxPool '{}' has padding, dilation, ceil mode or a non-square window",
                        node.name
                    ));
                }
                let (k, s) = (ks[0] as usize, strides[0] as usize);
                if k > h || k > w {
                    return Err(format!("MaxPool '{}' window exceeds the map", node.name));
                }
                let out = ((h - k) / s + 1, (w - k) / s + 1);
                match self.steps.last_mut() {
                    Some(Step::Conv(conv))
                        if conv.pool.is_none() && h * w * c * 4 <= FUSE_POOL_MAX_BYTES =>
                    {
                        conv.pool = Some(FusedPool { k, stride: s, out });
                    }
                    _ => self.steps.push(Step::MaxPool {
                        k,
                        stride: s,
                        inp: (h, w, c),
                        out,
                    }),
                }
                self.shape = Shape::Map {
                    h: out.0,
                    w: out.1,
                    c,
                };
            }
            "Flatten" => {
                refuse_attrs(node, &["axis"])?;
                if attr_int(node, "axis", 1) != 1 {
                    return Err(format!("Flatten '{}' with axis other than 1", node.name));
                }
                self.shape = match self.shape {
                    Shape::Map { h, w, c } if h * w == 1 || c == 1 => Shape::Flat {
                        f: h * w * c,
                        chw: None,
                    },
                    Shape::Map { h, w, c } => Shape::Flat {
                        f: h * w * c,
                        chw: Some((c, h, w)),
                    },
                    flat => flat,
                };
            }
            "MatMul" => {
                refuse_attrs(node, &[])?;
                let [a, b] = inputs.as_slice() else {
                    return Err(format!("node '{}' needs two inputs", node.name));
                };
                match (a, b, self.shape) {
                    (None, Some((dims, m)), Shape::Flat { f, .. })
                        if dims.len() == 2 && dims[0] == f =>
                    {
                        let weight = m.to_vec();
                        let out = dims[1];
                        // MatMul + Add(bias) is a fully connected layer.
                        let mut bias = vec![0f32; out];
                        if let Some(add) = next.filter(|n| {
                            n.op_type == "Add"
                                && n.attribute.is_empty()
                                && n.input.iter().any(|i| *i == node.output[0])
                        }) {
                            let other = add.input.iter().find(|i| **i != node.output[0]);
                            if let Some((bd, bv)) = other.and_then(|o| self.consts.get(o.as_str()))
                            {
                                if bv.len() == out && bd.iter().rev().skip(1).all(|&d| d == 1) {
                                    bias.copy_from_slice(bv);
                                    self.current = add.output[0].clone();
                                    consumed = 2;
                                }
                            }
                        }
                        self.linear(weight, bias, f, out);
                        if consumed == 2 {
                            return Ok(consumed);
                        }
                    }
                    (Some((dims, m)), None, Shape::Map { h, w, c })
                        if dims.len() == 2 && dims[1] == h =>
                    {
                        let s = dims[0];
                        self.steps.push(Step::PoolRows {
                            m: m.to_vec(),
                            s,
                            inp: (h, w, c),
                        });
                        self.shape = Shape::Map { h: s, w, c };
                    }
                    (None, Some((dims, m)), Shape::Map { h, w, c })
                        if dims.len() == 2 && dims[0] == w =>
                    {
                        let s = dims[1];
                        self.steps.push(Step::PoolCols {
                            m: m.to_vec(),
                            s,
                            inp: (h, w, c),
                        });
                        self.shape = Shape::Map { h, w: s, c };
                    }
                    _ => {
                        return Err(format!(
                            "MatMul '{}' is not a fully connected layer or a pooling matrix",
                            node.name
                        ))
                    }
                }
            }
            "Gemm" => {
                refuse_attrs(node, &["alpha", "beta", "transA", "transB"])?;
                let Shape::Flat { f, .. } = self.shape else {
                    return Err(format!("Gemm '{}' on a feature map", node.name));
                };
                if attr_int(node, "transA", 0) != 0 {
                    return Err(format!("Gemm '{}' transposes its input", node.name));
                }
                let (alpha, beta) = (
                    attr_float(node, "alpha", 1.0),
                    attr_float(node, "beta", 1.0),
                );
                let (Some(None), Some(Some((dims, b)))) = (inputs.first(), inputs.get(1)) else {
                    return Err(format!(
                        "Gemm '{}' does not multiply the input by a weight",
                        node.name
                    ));
                };
                let trans_b = attr_int(node, "transB", 0) != 0;
                let (k, out) = match (dims.as_slice(), trans_b) {
                    ([k, o], false) => (*k, *o),
                    ([o, k], true) => (*k, *o),
                    _ => return Err(format!("Gemm '{}' weight is not 2-D", node.name)),
                };
                if k != f {
                    return Err(format!(
                        "Gemm '{}' expects {k} features, gets {f}",
                        node.name
                    ));
                }
                let mut weight = vec![0f32; k * out];
                for i in 0..k {
                    for o in 0..out {
                        let v = if trans_b {
                            b[o * k + i]
                        } else {
                            b[i * out + o]
                        };
                        weight[i * out + o] = alpha * v;
                    }
                }
                let mut bias = vec![0f32; out];
                if let Some(Some((cd, c))) = inputs.get(2) {
                    if c.len() == out && cd.iter().rev().skip(1).all(|&d| d == 1) {
                        bias.iter_mut()
                            .zip(c.iter())
                            .for_each(|(d, v)| *d = beta * v);
                    } else if c.len() == 1 {
                        bias.iter_mut().for_each(|d| *d = beta * c[0]);
                    } else {
                        return Err(format!("Gemm '{}' bias of shape {cd:?}", node.name));
                    }
                }
                self.linear(weight, bias, f, out);
            }
            "Slice" => {
                let out = self.mirror_batch(node, &inputs, next)?;
                self.current = out;
                return Ok(2);
            }
            "Reshape" => {
                let out = self.mean_halves(node, &inputs, next)?;
                self.current = out;
                return Ok(2);
            }
            other => return Err(format!("operator {other} (node '{}')", node.name)),
        }
        self.current = node.output[0].clone();
        Ok(consumed)
    }

    /// `Slice(x, starts [-1], ends [≤ -W-1], axes [3], steps [-1])` (the mirror image) and a
    /// `Concat` of `x` and it along the batch, the first half of flip test-time averaging as
    /// [`crate::onnx::writer::GraphSpec::flip_average`] writes it. Returns the Concat's
    /// output.
    fn mirror_batch(
        &mut self,
        slice: &NodeProto,
        inputs: &[Option<ConstInput<'_>>],
        next: Option<&NodeProto>,
    ) -> Result<String, String> {
        let refuse = || {
            Err(format!(
                "Slice '{}' is not a mirror image concatenated to its input",
                slice.name
            ))
        };
        let Shape::Map { h, w, c } = self.shape else {
            return refuse();
        };
        let one = |i: usize| match inputs.get(i) {
            Some(Some((_, v))) if v.len() == 1 => Some(v[0]),
            _ => None,
        };
        // Starts at the last column (−1 or W−1) and runs past the first one.
        let (starts, ends, axes, steps) = (one(1), one(2), one(3), one(4));
        let mirror = matches!(inputs.first(), Some(None))
            && slice.attribute.is_empty()
            && (starts == Some(-1.0) || starts == Some(w as f32 - 1.0))
            && ends.is_some_and(|e| e <= -(w as f32) - 1.0)
            && (axes == Some(3.0) || axes == Some(-1.0))
            && steps == Some(-1.0);
        let Some(concat) = next else { return refuse() };
        let concat_ok = concat.op_type == "Concat"
            && concat.input == [self.current.clone(), slice.output[0].clone()]
            && concat.output.len() == 1
            && concat.attribute.len() == 1
            && attr(concat, "axis").is_some_and(|a| a.i == 0);
        if !mirror || !concat_ok || self.doubled {
            return refuse();
        }
        self.steps.push(Step::MirrorBatch { h, w, c });
        self.doubled = true;
        Ok(concat.output[0].clone())
    }

    /// `Reshape(x, [2, -1, F])` then `ReduceMean(axes [0], keepdims 0)`: the second half of
    /// flip test-time averaging. Returns the ReduceMean's output.
    fn mean_halves(
        &mut self,
        reshape: &NodeProto,
        inputs: &[Option<ConstInput<'_>>],
        next: Option<&NodeProto>,
    ) -> Result<String, String> {
        let refuse = || {
            Err(format!(
                "Reshape '{}' is not the mean of the two halves of a mirrored batch",
                reshape.name
            ))
        };
        let Shape::Flat { f, .. } = self.shape else {
            return refuse();
        };
        let pairs = matches!(inputs.first(), Some(None))
            && reshape.attribute.is_empty()
            && matches!(inputs.get(1), Some(Some((_, v))) if v[..] == [2.0, -1.0, f as f32]);
        let Some(mean) = next else { return refuse() };
        let mean_ok = mean.op_type == "ReduceMean"
            && mean.input == reshape.output
            && mean.output.len() == 1
            && attr_ints(mean, "axes").is_some_and(|a| a == [0])
            && attr_int(mean, "keepdims", 1) == 0
            && refuse_attrs(mean, &["axes", "keepdims"]).is_ok();
        if !pairs || !mean_ok || !self.doubled {
            return refuse();
        }
        self.materialise_chw();
        self.steps.push(Step::MeanHalves { f });
        self.doubled = false;
        Ok(mean.output[0].clone())
    }

    /// The value of a one-element constant.
    fn scalar(&self, name: &str) -> Option<f32> {
        match self.consts.get(name) {
            Some((_, v)) if v.len() == 1 => Some(v[0]),
            _ => None,
        }
    }

    /// Recognises exact GELU written as arithmetic around `Erf` (how PyTorch exports
    /// `nn.GELU()` below opset 20, and how [`crate::onnx::writer::Layer::Gelu`] writes it),
    /// starting at `first` and reading the current value `x`:
    /// `a = x / √2` (or `x · (1/√2)`), `b = Erf(a)`, `d = b + 1`, then either
    /// `(x · d) · 0.5` or `x · (d · 0.5)`, operands of Add and Mul in either order.
    /// Returns the chain's output (the chain spans 5 nodes), or None when it is anything
    /// else; the intermediate values cannot be read elsewhere, since every later node must
    /// read the chain's output.
    fn gelu_chain(&self, first: &NodeProto, rest: &[NodeProto]) -> Option<String> {
        let x = self.current.as_str();
        let near = |v: Option<f32>, want: f32| v.is_some_and(|v| (v - want).abs() <= 1e-6 * want);
        // `op` with exactly the inputs `a` and a constant near `k`, in either order (or in
        // the given order only, for Div); its output.
        let binary = |n: &NodeProto, op: &str, a: &str, k: f32| -> Option<String> {
            if n.op_type != op
                || !n.attribute.is_empty()
                || n.input.len() != 2
                || n.output.len() != 1
            {
                return None;
            }
            let (i0, i1) = (n.input[0].as_str(), n.input[1].as_str());
            let ok = (i0 == a && near(self.scalar(i1), k))
                || (op != "Div" && i1 == a && near(self.scalar(i0), k));
            ok.then(|| n.output[0].clone())
        };
        // `Mul(a, b)` in either order; its output.
        let product = |n: &NodeProto, a: &str, b: &str| -> Option<String> {
            let ins: Vec<&str> = n.input.iter().map(String::as_str).collect();
            (n.op_type == "Mul"
                && n.attribute.is_empty()
                && n.output.len() == 1
                && (ins == [a, b] || ins == [b, a]))
            .then(|| n.output[0].clone())
        };
        let scaled = binary(first, "Div", x, std::f32::consts::SQRT_2)
            .or_else(|| binary(first, "Mul", x, std::f32::consts::FRAC_1_SQRT_2))?;
        let [erf, add, m1, m2, ..] = rest else {
            return None;
        };
        if erf.op_type != "Erf" || erf.input != [scaled] || erf.output.len() != 1 {
            return None;
        }
        let plus_one = binary(add, "Add", &erf.output[0], 1.0)?;
        if let Some(e) = product(m1, x, &plus_one) {
            binary(m2, "Mul", &e, 0.5)
        } else {
            let halved = binary(m1, "Mul", &plus_one, 0.5)?;
            product(m2, x, &halved)
        }
    }

    fn elementwise(
        &mut self,
        node: &NodeProto,
        op: Elementwise,
        dims: &[usize],
        k: &[f32],
    ) -> Result<(), String> {
        // A constant that broadcasts along one axis only: the channel of a map ([C,1,1] or
        // [1,C,1,1]) or the feature of a vector ([F] / [1,F]), or a scalar.
        let per = match self.shape {
            Shape::Map { c, .. } => {
                let ok = k.len() == 1
                    || (k.len() == c
                        && dims.len() >= 3
                        && dims[dims.len() - 3] == c
                        && dims.len() <= 4);
                if !ok {
                    return Err(format!(
                        "node '{}' constant of shape {dims:?} on a map",
                        node.name
                    ));
                }
                c
            }
            Shape::Flat { f, chw } => {
                // Rank above 2 would broadcast the [N, F] input to a higher rank.
                if dims.len() > 2 || (k.len() != 1 && !(k.len() == f && dims.last() == Some(&f))) {
                    return Err(format!(
                        "node '{}' constant of shape {dims:?} on {f} features",
                        node.name
                    ));
                }
                if k.len() != 1 && chw.is_some() {
                    self.materialise_chw();
                }
                f
            }
        };
        let k = if k.len() == 1 {
            vec![k[0]; per]
        } else {
            k.to_vec()
        };
        self.steps.push(Step::Elementwise { op, k });
        Ok(())
    }

    fn conv(&mut self, node: &NodeProto, inputs: &[Option<ConstInput<'_>>]) -> Result<(), String> {
        refuse_attrs(
            node,
            &[
                "kernel_shape",
                "strides",
                "pads",
                "dilations",
                "group",
                "auto_pad",
            ],
        )?;
        let Shape::Map { h, w, c } = self.shape else {
            return Err(format!("Conv '{}' on a vector", node.name));
        };
        let (Some(None), Some(Some((wd, wv)))) = (inputs.first(), inputs.get(1)) else {
            return Err(format!(
                "Conv '{}' does not convolve the input with a weight",
                node.name
            ));
        };
        let [cout, cin, kh, kw] = wd.as_slice() else {
            return Err(format!("Conv '{}' weight of shape {wd:?}", node.name));
        };
        let (cout, cin, k) = (*cout, *cin, *kh);
        let strides = attr_ints(node, "strides").unwrap_or_else(|| vec![1, 1]);
        let pads = attr_ints(node, "pads").unwrap_or_else(|| vec![0; 4]);
        let plain = attr_int(node, "group", 1) == 1
            && attr_ints(node, "dilations").is_none_or(|d| all_equal(&d, 1))
            && attr(node, "auto_pad").is_none_or(|a| a.s == b"NOTSET")
            && attr_ints(node, "kernel_shape")
                .is_none_or(|s| s.len() == 2 && s[0] as usize == k && s[1] as usize == k);
        if !plain
            || *kw != k
            || cin != c
            || strides.len() != 2
            || strides[0] != strides[1]
            || strides[0] < 1
            || pads.len() != 4
            || !all_equal(&pads, pads[0])
            || pads[0] < 0
        {
            return Err(format!(
                "Conv '{}' is grouped, dilated, asymmetric or does not fit the {c}-channel input",
                node.name
            ));
        }
        let (stride, pad) = (strides[0] as usize, pads[0] as usize);
        if h + 2 * pad < k || w + 2 * pad < k {
            return Err(format!(
                "Conv '{}' kernel exceeds the padded map",
                node.name
            ));
        }
        let out = (
            (h + 2 * pad - k) / stride + 1,
            (w + 2 * pad - k) / stride + 1,
        );
        // [out, in, ky, kx] -> [(ky, kx, in), out].
        let mut weight = vec![0f32; k * k * cin * cout];
        for o in 0..cout {
            for i in 0..cin {
                for y in 0..k {
                    for x in 0..k {
                        weight[((y * k + x) * cin + i) * cout + o] =
                            wv[((o * cin + i) * k + y) * k + x];
                    }
                }
            }
        }
        let bias = match inputs.get(2) {
            Some(Some((_, b))) if b.len() == cout => b.to_vec(),
            None => vec![0f32; cout],
            _ => {
                return Err(format!(
                    "Conv '{}' bias does not have {cout} values",
                    node.name
                ))
            }
        };
        self.steps.push(Step::Conv(Conv {
            k,
            stride,
            pad,
            cin,
            cout,
            inp: (h, w),
            out,
            weight: PackedB::new(weight, k * k * cin, cout),
            bias,
            relu: false,
            pool: None,
        }));
        self.shape = Shape::Map {
            h: out.0,
            w: out.1,
            c: cout,
        };
        Ok(())
    }

    fn linear(&mut self, mut weight: Vec<f32>, bias: Vec<f32>, f: usize, out: usize) {
        // Weight rows follow ONNX's (channel, y, x) feature order; the activation holds
        // (y, x, channel): reorder the rows once here instead of the activation every run.
        if let Shape::Flat {
            chw: Some((c, h, w)),
            ..
        } = self.shape
        {
            let mut permuted = vec![0f32; weight.len()];
            for ch in 0..c {
                for y in 0..h {
                    for x in 0..w {
                        let from = (ch * h + y) * w + x;
                        let to = (y * w + x) * c + ch;
                        permuted[to * out..(to + 1) * out]
                            .copy_from_slice(&weight[from * out..(from + 1) * out]);
                    }
                }
            }
            weight = permuted;
        }
        self.steps.push(Step::Linear(Linear {
            inp: f,
            out,
            weight: PackedB::new(weight, f, out),
            bias,
            relu: false,
        }));
        self.shape = Shape::Flat { f: out, chw: None };
    }
}

fn nchw_to_nhwc(input: &[f32], n: usize, c: usize, hw: usize) -> Vec<f32> {
    let mut out = scratch(input.len());
    for b in 0..n {
        let src = &input[b * c * hw..(b + 1) * c * hw];
        let dst = &mut out[b * c * hw..(b + 1) * c * hw];
        for ch in 0..c {
            for p in 0..hw {
                dst[p * c + ch] = src[ch * hw + p];
            }
        }
    }
    out
}

/// Rows of output per chunk: about [`CHUNK_BYTES`] of `k`-wide input rows, at least 8.
fn chunk_rows(k: usize) -> usize {
    (CHUNK_BYTES / (4 * k.max(1))).max(8)
}

impl Conv {
    /// The input padded with zeros (channels-last, per image), or the input itself when the
    /// convolution has no padding, and where each output row's values lie in it.
    /// Where each output row's input values lie in a zero-padded batch (see [`Windows`]).
    fn windows(&self) -> Windows {
        let (c, p, s) = (self.cin, self.pad, self.stride);
        let (hp, wp) = (self.inp.0 + 2 * p, self.inp.1 + 2 * p);
        Windows {
            ohw: self.out.0 * self.out.1,
            ow: self.out.1,
            img_stride: hp * wp * c,
            row_step: s * wp * c,
            col_step: s * c,
            segs: self.k,
            seg_len: self.k * c,
            seg_stride: wp * c,
        }
    }

    /// Copies images into `dst` (`images × padded size`, borders already zero or zeroed here
    /// when `clear`).
    fn pad_into(&self, x: &[f32], dst: &mut [f32], clear: bool) {
        let (h, w, c, p) = (self.inp.0, self.inp.1, self.cin, self.pad);
        let wp = w + 2 * p;
        if clear {
            dst.fill(0.0);
        }
        for (img, d) in x
            .chunks_exact(h * w * c)
            .zip(dst.chunks_exact_mut((h + 2 * p) * wp * c))
        {
            for y in 0..h {
                let at = ((y + p) * wp + p) * c;
                d[at..at + w * c].copy_from_slice(&img[y * w * c..(y + 1) * w * c]);
            }
        }
    }

    /// The whole batch zero-padded (or the input itself without padding).
    fn padded_batch<'x>(&self, x: &'x [f32], n: usize) -> std::borrow::Cow<'x, [f32]> {
        if self.pad == 0 {
            return std::borrow::Cow::Borrowed(x);
        }
        let per_in = self.inp.0 * self.inp.1 * self.cin;
        let per_pad = self.windows().img_stride;
        let mut padded = vec![0f32; n * per_pad];
        if n > 1 && n * per_in >= 1 << 18 {
            padded
                .par_chunks_mut(per_pad)
                .enumerate()
                .for_each(|(b, d)| self.pad_into(&x[b * per_in..(b + 1) * per_in], d, false));
        } else {
            self.pad_into(x, &mut padded, false);
        }
        std::borrow::Cow::Owned(padded)
    }

    fn rows_into(&self, src: &[f32], win: &Windows, r0: usize, rows: usize, out: &mut [f32]) {
        conv_bias_act(src, win, r0, rows, &self.weight, &self.bias, self.relu, out);
    }

    fn run(&self, x: &[f32], n: usize, split: bool) -> Vec<f32> {
        let (oh, ow) = self.out;
        let m = n * oh * ow;
        let kk = self.k * self.k * self.cin;
        let threads = rayon::current_num_threads().max(1);
        let parallel = m * kk * self.cout >= PARALLEL_MIN_MACS;
        let win = self.windows();
        let pool22 = self
            .pool
            .as_ref()
            .is_some_and(|p| (p.k, p.stride) == (2, 2));
        if let (true, Some(p)) = (split && pool22 && parallel && n < threads, &self.pool) {
            // Fewer images than threads (a single request): the pooled positions are split,
            // so that one image's convolution uses every core.
            let src = self.padded_batch(x, n);
            let units = n * p.out.0 * p.out.1;
            let per = units.div_ceil(threads);
            let mut y = scratch(units * self.cout);
            let work = |(ci, out): (usize, &mut [f32])| {
                let count = out.len() / self.cout;
                let (w, b) = (&self.weight, &self.bias);
                conv_pool2_bias_act(&src, &win, ci * per, count, w, b, self.relu, out);
            };
            on_this_and_pool(y.chunks_mut(per * self.cout).enumerate(), &work);
            return y;
        }
        if let Some(p) = &self.pool {
            // Whole images per task: each image's map is pooled while it is still in cache,
            // and only the pooled map is written out.
            let per_out = p.out.0 * p.out.1 * self.cout;
            let mut y = scratch(n * per_out);
            let imgs = (chunk_rows(kk) / (oh * ow)).max(1);
            let imgs = if parallel {
                imgs.min(n.div_ceil(threads))
            } else {
                imgs
            };
            let per_in = self.inp.0 * self.inp.1 * self.cin;
            let work = |(ci, out): (usize, &mut [f32])| {
                let (b0, nb) = (ci * imgs, out.len() / per_out);
                let x = &x[b0 * per_in..(b0 + nb) * per_in];
                // These images padded in this thread's buffer (in cache for the convolution
                // that follows), then convolved and pooled.
                PAD_SCRATCH.with_borrow_mut(|padded| {
                    MAP_SCRATCH.with_borrow_mut(|map| {
                        let src: &[f32] = if self.pad == 0 {
                            x
                        } else {
                            let len = nb * win.img_stride;
                            if padded.len() < len {
                                padded.resize(len, 0.0);
                            }
                            self.pad_into(x, &mut padded[..len], true);
                            &padded[..len]
                        };
                        if pool22 {
                            // The common 2×2 pool is reduced in the kernel's registers.
                            conv_pool2_bias_act(
                                src,
                                &win,
                                0,
                                nb * p.out.0 * p.out.1,
                                &self.weight,
                                &self.bias,
                                self.relu,
                                out,
                            );
                            return;
                        }
                        let len = nb * oh * ow * self.cout;
                        if map.len() < len {
                            map.resize(len, 0.0);
                        }
                        let map = &mut map[..len];
                        self.rows_into(src, &win, 0, nb * oh * ow, map);
                        for (img, o) in map
                            .chunks_exact(oh * ow * self.cout)
                            .zip(out.chunks_exact_mut(per_out))
                        {
                            max_pool_image(img, (oh, ow, self.cout), p.k, p.stride, p.out, o);
                        }
                    });
                });
            };
            if parallel && n > 1 {
                y.par_chunks_mut(imgs * per_out).enumerate().for_each(work);
            } else {
                y.chunks_mut(imgs * per_out).enumerate().for_each(work);
            }
            return y;
        }
        let src = self.padded_batch(x, n);
        let src: &[f32] = &src;
        let mut y = scratch(m * self.cout);
        // At least one chunk per thread, even for one image.
        let rows_per = if parallel {
            chunk_rows(kk).min(m.div_ceil(threads))
        } else {
            m.max(1)
        };
        let work = |(ci, out): (usize, &mut [f32])| {
            self.rows_into(src, &win, ci * rows_per, out.len() / self.cout, out);
        };
        let chunk = rows_per * self.cout;
        if parallel {
            y.par_chunks_mut(chunk).enumerate().for_each(work);
        } else {
            y.chunks_mut(chunk).enumerate().for_each(work);
        }
        y
    }
}

/// Runs the first task on the calling thread and the others on rayon's pool. For a single
/// image's step (tens of µs), a caller outside the pool that hands all the work over and
/// sleeps until it is done loses more to the wake-ups than the second core gains; computing
/// its own share instead made batch-1 latency ~25 % lower (measured, BENCHMARKS.md).
fn on_this_and_pool<T: Send>(mut tasks: impl Iterator<Item = T>, work: &(impl Fn(T) + Sync)) {
    let Some(first) = tasks.next() else { return };
    rayon::in_place_scope(|s| {
        for t in tasks {
            s.spawn(move |_| work(t));
        }
        work(first);
    });
}

/// Max-pools one channels-last map `(h, w, c)` with a `k`×`k` window and `stride`.
fn max_pool_image(
    img: &[f32],
    (_, w, c): (usize, usize, usize),
    k: usize,
    s: usize,
    (oh, ow): (usize, usize),
    out: &mut [f32],
) {
    for oy in 0..oh {
        for ox in 0..ow {
            let d = &mut out[(oy * ow + ox) * c..(oy * ow + ox + 1) * c];
            let first = (oy * s * w + ox * s) * c;
            d.copy_from_slice(&img[first..first + c]);
            for ky in 0..k {
                for kx in 0..k {
                    let p = ((oy * s + ky) * w + ox * s + kx) * c;
                    // A select, not f32::max: it vectorises, and a NaN that starts a window
                    // stays (inputs here are finite anyway).
                    for (d, v) in d.iter_mut().zip(&img[p..p + c]) {
                        *d = if *v > *d { *v } else { *d };
                    }
                }
            }
        }
    }
}

impl Linear {
    fn run(&self, x: &[f32], n: usize, split: bool) -> Vec<f32> {
        let mut y = scratch(n * self.out);
        let threads = rayon::current_num_threads().max(1);
        let each = self.out / threads;
        if split
            && n == 1
            && self.inp * self.out >= SPLIT_ROW_MIN_MACS
            && self.out.is_multiple_of(16 * threads)
            && each > 0
        {
            // One image: reading the weights is the cost (2.4 MB for the shipped fc1), so
            // each thread takes its own columns and reads only their weights.
            let work = |(t, out): (usize, &mut [f32])| {
                let cols = (t * each, t * each + out.len());
                matvec_cols(x, &self.weight, cols, &self.bias, self.relu, out);
            };
            on_this_and_pool(y.chunks_mut(each).enumerate(), &work);
            return y;
        }
        let work = |(i, out): (usize, &mut [f32])| {
            let rows = out.len() / self.out;
            let r0 = i * self.rows_per(n);
            let a = &x[r0 * self.inp..(r0 + rows) * self.inp];
            matmul_bias_act(a, rows, &self.weight, &self.bias, self.relu, out);
        };
        let chunk = self.rows_per(n) * self.out;
        if n * self.inp * self.out >= PARALLEL_MIN_MACS && n > 1 {
            y.par_chunks_mut(chunk).enumerate().for_each(work);
        } else {
            y.chunks_mut(chunk).enumerate().for_each(work);
        }
        y
    }

    /// Rows per parallel chunk: the batch split across the pool's threads.
    fn rows_per(&self, n: usize) -> usize {
        n.div_ceil(rayon::current_num_threads().max(1)).max(1)
    }
}

impl Step {
    fn name(&self) -> String {
        match self {
            Step::Elementwise { op, k } => format!("{op:?}[{}]", k.len()),
            Step::Conv(c) => format!(
                "Conv{}x{} {}->{} s{} p{} on {}x{}{} [{}]",
                c.k,
                c.k,
                c.cin,
                c.cout,
                c.stride,
                c.pad,
                c.inp.0,
                c.inp.1,
                match (&c.pool, c.relu) {
                    (Some(p), true) => format!(" +ReLU +MaxPool{}", p.k),
                    (Some(p), false) => format!(" +MaxPool{}", p.k),
                    (None, true) => " +ReLU".to_string(),
                    (None, false) => String::new(),
                },
                c.weight.kernel_name()
            ),
            Step::Relu => "Relu".into(),
            Step::Gelu => "Gelu".into(),
            Step::MaxPool { k, stride, inp, .. } => format!("MaxPool{k} s{stride} on {inp:?}"),
            Step::PoolRows { s, inp, .. } => format!("PoolRows {inp:?}->{s}"),
            Step::PoolCols { s, inp, .. } => format!("PoolCols {inp:?}->{s}"),
            Step::ToChw { h, w, c } => format!("ToChw {h}x{w}x{c}"),
            Step::MirrorBatch { h, w, c } => format!("MirrorBatch {h}x{w}x{c}"),
            Step::MeanHalves { f } => format!("MeanHalves {f}"),
            Step::Linear(l) => format!(
                "Linear {}->{}{} [{}]",
                l.inp,
                l.out,
                if l.relu { " +ReLU" } else { "" },
                l.weight.kernel_name()
            ),
        }
    }

    /// Images in the batch after this step, for `n` before it.
    fn images_after(&self, n: usize) -> usize {
        match self {
            Step::MirrorBatch { .. } => 2 * n,
            Step::MeanHalves { .. } => n / 2,
            _ => n,
        }
    }

    /// `split`: see [`Plan::split_single_images`].
    fn run(&self, mut x: Vec<f32>, n: usize, split: bool) -> Vec<f32> {
        let y = match self {
            Step::Elementwise { op, k } => {
                // One loop per operator, so that each vectorises.
                fn apply(x: &mut [f32], k: &[f32], f: impl Fn(f32, f32) -> f32) {
                    if let [k] = k {
                        x.iter_mut().for_each(|v| *v = f(*v, *k));
                        return;
                    }
                    for row in x.chunks_exact_mut(k.len()) {
                        for (v, k) in row.iter_mut().zip(k) {
                            *v = f(*v, *k);
                        }
                    }
                }
                let k = if k.iter().all(|v| *v == k[0]) {
                    &k[..1]
                } else {
                    &k[..]
                };
                match op {
                    Elementwise::Add => apply(&mut x, k, |v, k| v + k),
                    Elementwise::Sub => apply(&mut x, k, |v, k| v - k),
                    Elementwise::Mul => apply(&mut x, k, |v, k| v * k),
                    Elementwise::Div => apply(&mut x, k, |v, k| v / k),
                }
                return x;
            }
            Step::Relu => {
                x.iter_mut().for_each(|v| *v = v.max(0.0));
                return x;
            }
            Step::Gelu => {
                // ~20 flops a value: worth both threads from a few images up.
                if x.len() >= GELU_PARALLEL_MIN {
                    x.par_chunks_mut(GELU_PARALLEL_MIN / 4)
                        .for_each(gelu_in_place);
                } else {
                    gelu_in_place(&mut x);
                }
                return x;
            }
            Step::Conv(c) => c.run(&x, n, split),
            Step::Linear(l) => l.run(&x, n, split),
            Step::MaxPool {
                k,
                stride,
                inp: (h, w, c),
                out: (oh, ow),
            } => {
                let (h, w, c, oh, ow) = (*h, *w, *c, *oh, *ow);
                let mut y = scratch(n * oh * ow * c);
                let pool = |(img, out): (&[f32], &mut [f32])| {
                    max_pool_image(img, (h, w, c), *k, *stride, (oh, ow), out)
                };
                let pairs = x
                    .chunks_exact(h * w * c)
                    .zip(y.chunks_exact_mut(oh * ow * c));
                if n > 1 && n * h * w * c >= 1 << 16 {
                    pairs.par_bridge().for_each(pool);
                } else {
                    pairs.for_each(pool);
                }
                y
            }
            Step::PoolRows {
                m,
                s,
                inp: (h, w, c),
            } => {
                let (s, h, wc) = (*s, *h, *w * *c);
                let mut y = scratch(n * s * wc);
                for b in 0..n {
                    // [S,H] · [H, W·C] for this image.
                    sgemm(
                        s,
                        h,
                        wc,
                        m,
                        &x[b * h * wc..(b + 1) * h * wc],
                        &mut y[b * s * wc..(b + 1) * s * wc],
                    );
                }
                y
            }
            Step::PoolCols {
                m,
                s,
                inp: (h, w, c),
            } => {
                let (s, w, c) = (*s, *w, *c);
                // Accumulated into: starts at zero.
                let mut y = scratch(n * h * s * c);
                y.fill(0.0);
                for (src, dst) in x.chunks_exact(w * c).zip(y.chunks_exact_mut(s * c)) {
                    for (xi, row) in src.chunks_exact(c).enumerate() {
                        for so in 0..s {
                            let f = m[xi * s + so];
                            for (d, v) in dst[so * c..(so + 1) * c].iter_mut().zip(row) {
                                *d += f * v;
                            }
                        }
                    }
                }
                y
            }
            Step::ToChw { h, w, c } => {
                let (hw, c) = (h * w, *c);
                let mut y = scratch(x.len());
                for (src, dst) in x.chunks_exact(hw * c).zip(y.chunks_exact_mut(hw * c)) {
                    for p in 0..hw {
                        for ch in 0..c {
                            dst[ch * hw + p] = src[p * c + ch];
                        }
                    }
                }
                y
            }
            Step::MirrorBatch { h, w, c } => {
                let (row, c) = (w * c, *c);
                let mut y = scratch(2 * x.len());
                let (same, mirrored) = y.split_at_mut(x.len());
                same.copy_from_slice(&x);
                for (src, dst) in x.chunks_exact(row).zip(mirrored.chunks_exact_mut(row)) {
                    for (s, d) in src.chunks_exact(c).zip(dst.chunks_exact_mut(c).rev()) {
                        d.copy_from_slice(s);
                    }
                }
                debug_assert_eq!(x.len() % (h * row), 0);
                y
            }
            Step::MeanHalves { f } => {
                let half = n / 2 * f;
                let mut y = scratch(half);
                for ((d, a), b) in y.iter_mut().zip(&x[..half]).zip(&x[half..2 * half]) {
                    *d = (a + b) / 2.0;
                }
                y
            }
        };
        recycle(x);
        y
    }
}

#[cfg(test)]
mod tests {
    use crate::onnx::writer::{build_model, GraphSpec, Layer};
    use crate::onnx::{adaptive_pool_matrix, OnnxModel};
    use crate::preprocess::InputLayout;
    use candle_core::{Device, Tensor};
    use std::path::PathBuf;

    /// A small deterministic generator (tests must not depend on a random seed source).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn unit(&mut self) -> f32 {
            (self.next() % 2_000_001) as f32 / 1_000_000.0 - 1.0
        }
        fn vec(&mut self, len: usize, scale: f32) -> Vec<f32> {
            (0..len).map(|_| self.unit() * scale).collect()
        }
    }

    fn model(spec: &GraphSpec) -> OnnxModel {
        OnnxModel::from_proto(PathBuf::from("test.onnx"), build_model(spec).unwrap(), 0).unwrap()
    }

    /// Runs `n` random inputs through the planned executor and through candle-onnx; returns
    /// the largest difference relative to the largest reference logit.
    fn compare(m: &OnnxModel, n: usize, r: &mut Lcg) -> f32 {
        let shape = m.layout().batch_shape(n);
        let len: usize = shape.iter().product();
        let input = Tensor::from_vec(r.vec(len, 1.0), shape, &Device::Cpu).unwrap();
        let planned = m
            .run(&input)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let reference = m
            .run_candle_onnx(&input)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(planned.len(), reference.len());
        let scale = reference.iter().fold(1e-3f32, |a, v| a.max(v.abs()));
        planned
            .iter()
            .zip(&reference)
            .map(|(a, b)| (a - b).abs() / scale)
            .fold(0.0, f32::max)
    }

    /// A random network of the kinds fmnist and PyTorch export: convolutions of odd sizes,
    /// strides and paddings, pools, adaptive pooling, flatten, fully connected layers.
    fn random_spec(r: &mut Lcg) -> GraphSpec {
        let input = match r.below(3) {
            0 => InputLayout::Gray,
            1 => InputLayout::Flat,
            _ => InputLayout::Rgb {
                size: 5 + r.below(20),
            },
        };
        let mut layers = Vec::new();
        let (mut c, mut side) = match input {
            InputLayout::Gray => (1, 28),
            InputLayout::Flat => (1, 0),
            InputLayout::Rgb { size } => (3, size),
        };
        if side > 0 && r.below(2) == 0 {
            layers.push(Layer::Normalize {
                mean: r.vec(c, 0.5),
                std: (0..c).map(|_| 0.2 + r.unit().abs()).collect(),
            });
        }
        if side > 0 {
            for _ in 0..1 + r.below(3) {
                let k = [1, 2, 3, 5][r.below(4)];
                let stride = 1 + r.below(2);
                let padding = r.below(k.min(3));
                if side + 2 * padding < k {
                    break;
                }
                let out = 1 + r.below(12);
                layers.push(Layer::Conv2d {
                    weight: r.vec(out * c * k * k, 0.5),
                    shape: [out, c, k, k],
                    bias: r.vec(out, 0.5),
                    stride,
                    padding,
                });
                side = (side + 2 * padding - k) / stride + 1;
                c = out;
                match r.below(4) {
                    0 => {}
                    1 => layers.push(Layer::Gelu),
                    _ => layers.push(Layer::Relu),
                }
                let (pk, ps) = (2 + r.below(2), 1 + r.below(3));
                if side >= pk && r.below(2) == 0 {
                    layers.push(Layer::MaxPool2d {
                        kernel: pk,
                        stride: ps,
                    });
                    side = (side - pk) / ps + 1;
                }
            }
            if r.below(3) == 0 {
                let out = 1 + r.below(4);
                layers.push(Layer::AdaptiveAvgPool2d {
                    in_h: side,
                    in_w: side,
                    out,
                });
                side = out;
            }
            layers.push(Layer::Flatten);
        }
        let mut features = if side > 0 { c * side * side } else { 784 };
        if r.below(2) == 0 {
            let hidden = 1 + r.below(40);
            layers.push(Layer::Linear {
                weight: r.vec(hidden * features, 0.3),
                in_features: features,
                out_features: hidden,
                bias: r.vec(hidden, 0.3),
            });
            layers.push(Layer::Relu);
            features = hidden;
        }
        layers.push(Layer::Linear {
            weight: r.vec(10 * features, 0.3),
            in_features: features,
            out_features: 10,
            bias: r.vec(10, 0.3),
        });
        let flip_average = side > 0 && r.below(3) == 0;
        GraphSpec {
            name: "random".into(),
            input,
            num_classes: 10,
            flip_average,
            layers,
            metadata: vec![],
        }
    }

    #[test]
    fn planned_executor_matches_candle_onnx_on_random_graphs() {
        let mut r = Lcg(7);
        for case in 0..60 {
            let spec = random_spec(&mut r);
            let m = model(&spec);
            assert!(
                m.engine_description().starts_with("planned"),
                "case {case}: {}\n{spec:?}",
                m.engine_description()
            );
            for n in [1, 3, 17] {
                let diff = compare(&m, n, &mut r);
                assert!(
                    diff < 2e-5,
                    "case {case} batch {n}: relative difference {diff}"
                );
            }
        }
    }

    /// `input` (`[N, C, H, W]` row-major) with every row reversed: the mirror images.
    fn mirrored(input: &[f32], w: usize) -> Vec<f32> {
        input
            .chunks_exact(w)
            .flat_map(|row| row.iter().rev().copied())
            .collect()
    }

    fn logits(m: &OnnxModel, input: &[f32], n: usize, planned: bool) -> Vec<f32> {
        let shape = m.layout().batch_shape(n);
        let t = Tensor::from_vec(input.to_vec(), shape, &Device::Cpu).unwrap();
        let out = if planned {
            m.run(&t)
        } else {
            m.run_candle_onnx(&t)
        };
        out.unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }

    /// A flip-averaged graph scores each image by the mean of the plain graph's logits for it
    /// and for its mirror image, on the planned executor and in candle-onnx alike, at odd and
    /// even batch sizes, on gray and RGB inputs.
    #[test]
    fn flip_average_is_the_mean_of_the_image_and_its_mirror() {
        let mut r = Lcg(5);
        let mut cases = 0;
        while cases < 12 {
            let mut spec = random_spec(&mut r);
            if spec.input == InputLayout::Flat {
                continue;
            }
            cases += 1;
            spec.flip_average = false;
            let plain = model(&spec);
            spec.flip_average = true;
            let flip = model(&spec);
            assert!(
                flip.engine_description().starts_with("planned"),
                "{}",
                flip.engine_description()
            );
            let w = *flip.layout().batch_shape(1).last().unwrap();
            for n in [1, 2, 5] {
                let len: usize = flip.layout().batch_shape(n).iter().product();
                let input = r.vec(len, 1.0);
                let a = logits(&plain, &input, n, true);
                let b = logits(&plain, &mirrored(&input, w), n, true);
                let want: Vec<f32> = a.iter().zip(&b).map(|(a, b)| (a + b) / 2.0).collect();
                let scale = want.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
                for planned in [true, false] {
                    let got = logits(&flip, &input, n, planned);
                    assert_eq!(got.len(), want.len());
                    let diff = got
                        .iter()
                        .zip(&want)
                        .map(|(g, w)| (g - w).abs() / scale)
                        .fold(0f32, f32::max);
                    assert!(diff < 2e-5, "batch {n}, planned {planned}: {diff}");
                }
            }
        }
    }

    /// Anything but the exact mirror-and-average pattern is left to candle-onnx: a vertical
    /// flip, a slice that keeps every other column, a mean that keeps the pair axis.
    #[test]
    fn near_misses_of_flip_averaging_are_not_planned() {
        let mut r = Lcg(9);
        let spec = loop {
            let s = random_spec(&mut r);
            if s.input != InputLayout::Flat {
                break GraphSpec {
                    flip_average: true,
                    ..s
                };
            }
        };
        type Edit = fn(&mut candle_onnx::onnx::GraphProto);
        let edits: [(&str, Edit); 3] = [
            ("vertical flip", |g| {
                let t = g.initializer.iter_mut().find(|t| t.name == "flip.axes");
                t.unwrap().int64_data = vec![2];
            }),
            ("step -2", |g| {
                let t = g.initializer.iter_mut().find(|t| t.name == "flip.steps");
                t.unwrap().int64_data = vec![-2];
            }),
            ("keepdims", |g| {
                let n = g.node.iter_mut().find(|n| n.op_type == "ReduceMean");
                n.unwrap().attribute.retain(|a| a.name != "keepdims");
            }),
        ];
        for (what, edit) in edits {
            let mut proto = build_model(&spec).unwrap();
            edit(proto.graph.as_mut().unwrap());
            // Output shape checks would reject the kept axis: drop the declared shape.
            proto.graph.as_mut().unwrap().output[0].r#type = None;
            let m = OnnxModel::from_proto(PathBuf::from("t.onnx"), proto, 0).unwrap();
            assert!(
                m.engine_description()
                    .starts_with("candle-onnx (not planned"),
                "{what}: {}",
                m.engine_description()
            );
        }
    }

    /// The two-conv CNN's shape (the shipped model until 2026-12-08) at batch sizes that take
    /// the serial and the parallel paths.
    #[test]
    fn fmnist_cnn_shape_agrees_on_both_threading_paths() {
        let mut r = Lcg(11);
        let (c1, c2, hidden) = (32, 64, 128);
        let spec = GraphSpec {
            name: "cnn".into(),
            input: InputLayout::Gray,
            num_classes: 10,
            flip_average: false,
            layers: vec![
                Layer::Normalize {
                    mean: vec![0.286],
                    std: vec![0.353],
                },
                Layer::Conv2d {
                    weight: r.vec(c1 * 9, 0.3),
                    shape: [c1, 1, 3, 3],
                    bias: r.vec(c1, 0.1),
                    stride: 1,
                    padding: 1,
                },
                Layer::Relu,
                Layer::MaxPool2d {
                    kernel: 2,
                    stride: 2,
                },
                Layer::Conv2d {
                    weight: r.vec(c2 * c1 * 9, 0.1),
                    shape: [c2, c1, 3, 3],
                    bias: r.vec(c2, 0.1),
                    stride: 1,
                    padding: 1,
                },
                Layer::Relu,
                Layer::MaxPool2d {
                    kernel: 2,
                    stride: 2,
                },
                Layer::Flatten,
                Layer::Linear {
                    weight: r.vec(hidden * c2 * 49, 0.05),
                    in_features: c2 * 49,
                    out_features: hidden,
                    bias: r.vec(hidden, 0.1),
                },
                Layer::Relu,
                Layer::Linear {
                    weight: r.vec(10 * hidden, 0.1),
                    in_features: hidden,
                    out_features: 10,
                    bias: r.vec(10, 0.1),
                },
            ],
            metadata: vec![],
        };
        let m = model(&spec);
        assert_eq!(m.engine_description(), "planned (6 steps)");
        for n in [1, 2, 64, 130] {
            let diff = compare(&m, n, &mut r);
            assert!(diff < 2e-5, "batch {n}: relative difference {diff}");
        }
        let unsplit = model(&spec).with_single_image_split(false);
        // One image split across 2 and 3 threads (conv2 by pooled positions, fc1 by columns
        // where 128 divides evenly), from inside a pool as well as from outside one above.
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for n in [1, 2] {
                let diff = pool.install(|| compare(&m, n, &mut r));
                assert!(
                    diff < 2e-5,
                    "{threads} threads, batch {n}: difference {diff}"
                );
                let diff = pool.install(|| compare(&unsplit, n, &mut r));
                assert!(diff < 2e-5, "{threads} threads, batch {n}, unsplit: {diff}");
            }
        }
    }

    /// A VGG-like head: 7×7 adaptive pooling of an upsampled 2×2 map, as torchvision does for
    /// small inputs, then the classifier.
    #[test]
    fn adaptive_pooling_that_upsamples_is_planned_exactly() {
        let mut r = Lcg(3);
        let spec = GraphSpec {
            name: "pool".into(),
            input: InputLayout::Rgb { size: 8 },
            num_classes: 10,
            flip_average: false,
            layers: vec![
                Layer::Conv2d {
                    weight: r.vec(6 * 3 * 9, 0.3),
                    shape: [6, 3, 3, 3],
                    bias: r.vec(6, 0.1),
                    stride: 1,
                    padding: 1,
                },
                Layer::Relu,
                Layer::MaxPool2d {
                    kernel: 2,
                    stride: 2,
                },
                Layer::MaxPool2d {
                    kernel: 2,
                    stride: 2,
                },
                Layer::AdaptiveAvgPool2d {
                    in_h: 2,
                    in_w: 2,
                    out: 7,
                },
                Layer::Flatten,
                Layer::Linear {
                    weight: r.vec(10 * 6 * 49, 0.1),
                    in_features: 6 * 49,
                    out_features: 10,
                    bias: r.vec(10, 0.1),
                },
            ],
            metadata: vec![],
        };
        assert_eq!(adaptive_pool_matrix(2, 7).len(), 14);
        let m = model(&spec);
        assert!(m.engine_description().starts_with("planned"));
        assert!(compare(&m, 5, &mut r) < 2e-5);
    }

    fn gemm_graph(extra_softmax: bool) -> candle_onnx::onnx::ModelProto {
        use candle_onnx::onnx::{attribute_proto::AttributeType, AttributeProto};
        let mut r = Lcg(5);
        let spec = GraphSpec {
            name: "gemm".into(),
            input: InputLayout::Flat,
            num_classes: 10,
            flip_average: false,
            layers: vec![Layer::Linear {
                weight: r.vec(10 * 784, 0.1),
                in_features: 784,
                out_features: 10,
                bias: r.vec(10, 0.1),
            }],
            metadata: vec![],
        };
        let mut proto = build_model(&spec).unwrap();
        let graph = proto.graph.as_mut().unwrap();
        // Replace MatMul + Add by one Gemm(transB=1, alpha, beta), as PyTorch exports Linear.
        let (w, b) = (graph.initializer[0].clone(), graph.initializer[1].clone());
        let mut wt = w.clone();
        wt.name = "gemm.weight".into();
        wt.dims = vec![10, 784];
        let values: Vec<f32> = w
            .raw_data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(values.len(), 7840, "weights are stored as raw data");
        let mut raw = Vec::with_capacity(values.len() * 4);
        for o in 0..10 {
            for i in 0..784 {
                raw.extend_from_slice(&values[i * 10 + o].to_le_bytes());
            }
        }
        wt.raw_data = raw;
        graph.initializer = vec![wt, b.clone()];
        let attr = |name: &str, f: Option<f32>, i: Option<i64>| AttributeProto {
            name: name.into(),
            f: f.unwrap_or(0.0),
            i: i.unwrap_or(0),
            r#type: if f.is_some() {
                AttributeType::Float as i32
            } else {
                AttributeType::Int as i32
            },
            ..Default::default()
        };
        let mut gemm = graph.node[0].clone();
        gemm.op_type = "Gemm".into();
        gemm.name = "gemm".into();
        gemm.input = vec!["pixels".into(), "gemm.weight".into(), b.name.clone()];
        gemm.output = vec![if extra_softmax {
            "raw".into()
        } else {
            "logits".into()
        }];
        gemm.attribute = vec![
            attr("alpha", Some(0.5), None),
            attr("beta", Some(2.0), None),
            attr("transB", None, Some(1)),
        ];
        graph.node = vec![gemm.clone()];
        if extra_softmax {
            let mut sm = gemm;
            sm.op_type = "Softmax".into();
            sm.name = "probabilities".into();
            sm.input = vec!["raw".into()];
            sm.output = vec!["logits".into()];
            sm.attribute = vec![attr("axis", None, Some(1))];
            graph.node.push(sm);
        }
        proto
    }

    /// Replaces the writer's five-node GELU chain (nodes 1..=5) with one opset-20 `Gelu`.
    fn gelu_operator(n: &mut Vec<candle_onnx::onnx::NodeProto>, approximate: Option<&str>) {
        let mut g = n[1].clone();
        g.op_type = "Gelu".into();
        g.input = vec![n[1].input[0].clone()];
        g.output = n[5].output.clone();
        g.attribute = approximate
            .map(|a| candle_onnx::onnx::AttributeProto {
                name: "approximate".into(),
                s: a.as_bytes().to_vec(),
                r#type: candle_onnx::onnx::attribute_proto::AttributeType::String as i32,
                ..Default::default()
            })
            .into_iter()
            .collect();
        n.splice(1..6, [g]);
    }

    /// GELU as the writer emits it, with its operands reordered the ways other exporters
    /// write them, and as the opset-20 `Gelu` operator: each is planned and agrees with
    /// candle-onnx; near misses and the tanh form fall back and say why.
    #[test]
    fn gelu_in_every_written_form_is_planned_and_near_misses_are_not() {
        let mut r = Lcg(5);
        let spec = GraphSpec {
            name: "gelu".into(),
            input: InputLayout::Gray,
            num_classes: 10,
            flip_average: false,
            layers: vec![
                Layer::Conv2d {
                    weight: r.vec(8 * 9, 0.8),
                    shape: [8, 1, 3, 3],
                    bias: r.vec(8, 0.5),
                    stride: 1,
                    padding: 1,
                },
                Layer::Gelu,
                Layer::MaxPool2d {
                    kernel: 2,
                    stride: 2,
                },
                Layer::Flatten,
                Layer::Linear {
                    weight: r.vec(10 * 8 * 14 * 14, 0.1),
                    in_features: 8 * 14 * 14,
                    out_features: 10,
                    bias: r.vec(10, 0.3),
                },
            ],
            metadata: vec![],
        };
        let base = build_model(&spec).unwrap();
        // Nodes 1..=5 are the GELU chain: Div, Erf, Add, Mul(x, ·), Mul(·, 0.5).
        let edit = |f: &dyn Fn(
            &mut Vec<candle_onnx::onnx::NodeProto>,
            &mut Vec<candle_onnx::onnx::TensorProto>,
        )| {
            let mut p = base.clone();
            let g = p.graph.as_mut().unwrap();
            f(&mut g.node, &mut g.initializer);
            OnnxModel::from_proto(PathBuf::from("gelu.onnx"), p, 0).unwrap()
        };
        let planned: Vec<(&str, OnnxModel)> = vec![
            ("as written", edit(&|_, _| {})),
            (
                "operands swapped",
                edit(&|n, _| {
                    n[3].input.reverse();
                    n[4].input.reverse();
                    n[5].input.reverse();
                }),
            ),
            (
                "halved before the product",
                edit(&|n, _| {
                    // x · ((erf + 1) · 0.5)
                    let x = n[4].input[0].clone();
                    let plus_one = n[4].input[1].clone();
                    let half = n[5].input[1].clone();
                    n[4].input = vec![plus_one, half];
                    n[4].output = vec!["halved".into()];
                    n[5].input = vec!["halved".into(), x];
                }),
            ),
            (
                "times 1/sqrt 2",
                edit(&|n, init| {
                    n[1].op_type = "Mul".into();
                    let k = init.iter_mut().find(|t| t.name == n[1].input[1]).unwrap();
                    k.raw_data = std::f32::consts::FRAC_1_SQRT_2.to_le_bytes().to_vec();
                }),
            ),
            ("the Gelu operator", edit(&|n, _| gelu_operator(n, None))),
        ];
        for (what, m) in &planned {
            assert!(
                m.engine_description().starts_with("planned"),
                "{what}: {}",
                m.engine_description()
            );
            for n in [1, 5] {
                let diff = compare(m, n, &mut r);
                assert!(diff < 2e-5, "{what} batch {n}: relative difference {diff}");
            }
        }
        let fallback: Vec<(&str, &str, OnnxModel)> = vec![
            (
                "0.6 instead of 0.5",
                "Erf",
                edit(&|n, init| {
                    let k = init.iter_mut().find(|t| t.name == n[5].input[1]).unwrap();
                    k.raw_data = 0.6f32.to_le_bytes().to_vec();
                }),
            ),
            (
                "tanh approximation",
                "tanh",
                edit(&|n, _| gelu_operator(n, Some("tanh"))),
            ),
        ];
        for (what, reason, m) in &fallback {
            let why = m.engine_description();
            assert!(
                why.contains("not planned") && why.contains(reason),
                "{what}: {why}"
            );
        }
    }

    #[test]
    fn gemm_as_pytorch_exports_it_is_planned() {
        let proto = gemm_graph(false);
        let m = OnnxModel::from_proto(PathBuf::from("gemm.onnx"), proto, 0).unwrap();
        assert!(m.engine_description().starts_with("planned"));
        assert!(compare(&m, 4, &mut Lcg(1)) < 2e-5);
    }

    #[test]
    fn a_graph_outside_the_plan_falls_back_to_candle_onnx_and_says_why() {
        let proto = gemm_graph(true);
        let m = OnnxModel::from_proto(PathBuf::from("softmax.onnx"), proto, 0).unwrap();
        let why = m.engine_description();
        assert!(
            why.contains("not planned") && why.contains("Softmax"),
            "{why}"
        );
        // Both calls then run candle-onnx; the answer is a softmax.
        let input = Tensor::zeros((2, 784), candle_core::DType::F32, &Device::Cpu).unwrap();
        let p = m
            .run(&input)
            .unwrap()
            .sum(1)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(p.iter().all(|s| (s - 1.0).abs() < 1e-5), "{p:?}");
    }

    #[test]
    fn the_engine_can_be_forced_to_candle_onnx() {
        let m = OnnxModel::from_proto(PathBuf::from("gemm.onnx"), gemm_graph(false), 0)
            .unwrap()
            .with_engine(crate::onnx::Engine::CandleOnnx);
        assert_eq!(m.engine_description(), "candle-onnx (chosen)");
    }

    /// The shipped model on the committed sample: same classes, logits within 1e-4.
    #[test]
    fn shipped_model_gives_the_same_answers_on_both_engines() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let m = OnnxModel::load(root.join("weights/fmnist-cnn.onnx")).unwrap();
        assert!(
            m.engine_description().starts_with("planned"),
            "{}",
            m.engine_description()
        );
        let text = std::fs::read_to_string(root.join("fixtures/sample.csv")).unwrap();
        let images: Vec<Vec<u8>> = text
            .lines()
            .skip(1)
            .map(|l| l.split(',').skip(1).map(|v| v.parse().unwrap()).collect())
            .collect();
        assert!(images.len() >= 100);
        let refs: Vec<&[u8]> = images.iter().map(|v| v.as_slice()).collect();
        let input = crate::preprocess::batch_from_pixels(&refs, m.layout(), &Device::Cpu).unwrap();
        let planned = m.run(&input).unwrap().to_vec2::<f32>().unwrap();
        let reference = m.run_candle_onnx(&input).unwrap().to_vec2::<f32>().unwrap();
        let mut worst = 0f32;
        for (p, r) in planned.iter().zip(&reference) {
            assert_eq!(crate::onnx::model::argmax(p), crate::onnx::model::argmax(r));
            worst = p
                .iter()
                .zip(r)
                .map(|(a, b)| (a - b).abs())
                .fold(worst, f32::max);
        }
        assert!(worst < 1e-4, "largest logit difference {worst}");
    }

    #[test]
    fn wrong_input_sizes_are_refused_not_run() {
        let m = OnnxModel::from_proto(PathBuf::from("gemm.onnx"), gemm_graph(false), 0).unwrap();
        assert!(m.run_values(vec![0.0; 783], 1).is_err());
        assert!(m.run_values(vec![], 0).is_err());
        assert_eq!(m.run_values(vec![0.0; 784 * 2], 2).unwrap().len(), 20);
    }
}
