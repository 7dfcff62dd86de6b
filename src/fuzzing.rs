//! The bodies of the coverage-guided fuzz targets in `fuzz/` (cargo fuzz, libFuzzer), kept in
//! the library so that `tests/fuzz_corpus.rs` replays the committed corpus and regression
//! inputs through exactly the same code in `cargo test`.
//!
//! Each function takes arbitrary bytes, checks the property stated on it and panics only when
//! that property fails (which libFuzzer reports as a crash). What they cover and the memory
//! bounds they run under are in RELIABILITY.md. Not an API: hidden from the docs.

use crate::onnx::model::SUPPORTED_OPS;
use crate::onnx::OnnxModel;
use crate::server::error::ApiError;
use crate::server::grpc::{decode_infer, pb};
use crate::server::http::predict::{fast_single_image, parse_json, parse_predict};
use crate::server::http::v2;
use crate::server::infer::InferRequest;
use candle_core::{Device, Tensor};
use candle_onnx::onnx;
use std::path::PathBuf;

/// The image limit the decoders run with (small, so that the limit itself gets exercised).
const MAX_IMAGES: usize = 4;

/// A decoding failure must be a client error over HTTP and over gRPC; panics otherwise.
pub(crate) fn client_error(e: &ApiError, what: &str) {
    assert!(
        e.status().is_client_error(),
        "{what}: a decoding failure answered {}: {e}",
        e.status()
    );
    let code = e.grpc_code();
    assert!(
        !matches!(code, tonic::Code::Internal | tonic::Code::Unknown),
        "{what}: a decoding failure maps to gRPC {code:?}: {e}"
    );
}

fn valid_request(r: &InferRequest, what: &str) {
    assert!(r.n >= 1 && r.n <= MAX_IMAGES, "{what}: {} images", r.n);
    if !r.photos.is_empty() {
        assert!(
            r.pixels.is_empty() && r.photos.len() == r.n,
            "{what}: BYTES"
        );
        return;
    }
    assert_eq!(r.pixels.len(), r.n * crate::classes::IMAGE_PIXELS, "{what}");
    assert!(
        r.pixels.iter().all(|p| (0.0..=1.0).contains(p)),
        "{what}: a pixel outside 0–1 passed validation"
    );
}

/// `POST /predict` bodies: a 4xx or valid pixels, never a panic; the fast single-image
/// scanner, whenever it accepts a body, gives exactly the general parser's pixels.
pub fn predict_body(data: &[u8]) {
    let fast = fast_single_image(data);
    match parse_json(data).and_then(|j| parse_predict(&j, MAX_IMAGES)) {
        Ok(r) => {
            assert_eq!(r.pixels.len(), r.n * crate::classes::IMAGE_PIXELS);
            assert!(r.pixels.iter().all(|p| (0.0..=1.0).contains(p)));
            if let Some(f) = fast {
                assert!(
                    r.single,
                    "the fast path took a body the parser reads as a batch"
                );
                assert_eq!(f, r.pixels, "the fast path and the parser disagree");
            }
        }
        Err(e) => {
            client_error(&e, "/predict");
            assert!(
                fast.is_none(),
                "the fast path took a body the parser refuses: {e}"
            );
        }
    }
}

/// The v2 infer body in its three REST forms, chosen by the first byte: 0 plain JSON, 1 the
/// raw binary request (`Inference-Header-Content-Length: 0`), 2 the binary extension with the
/// JSON part's length in the next two bytes (little-endian, so lengths past the body occur).
pub fn v2_body(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (header_len, body) = match mode % 3 {
        0 => (None, rest),
        1 => (Some(0), rest),
        _ if rest.len() >= 2 => (
            Some(usize::from(u16::from_le_bytes([rest[0], rest[1]]))),
            &rest[2..],
        ),
        _ => return,
    };
    match v2::decode(body, header_len, MAX_IMAGES) {
        Ok(r) => valid_request(&r, "v2 REST"),
        Err(e) => client_error(&e, "v2 REST"),
    }
}

/// The `Inference-Header-Content-Length` value: a byte count or a 400.
pub fn v2_header_length(data: &[u8]) {
    match v2::header_length(data) {
        Ok(n) => {
            let text = std::str::from_utf8(data).expect("a count is text");
            assert_eq!(text.trim().parse::<usize>().ok(), Some(n));
        }
        Err(e) => assert_eq!(e.status().as_u16(), 400, "{e}"),
    }
}

/// A gRPC ModelInfer message as protobuf bytes: decoded by prost, then validated. A message
/// that decodes gives valid pixels or a client error with a non-internal gRPC code.
pub fn grpc_infer(data: &[u8]) {
    use prost::Message;
    let Ok(msg) = pb::ModelInferRequest::decode(data) else {
        return;
    };
    match decode_infer(msg, MAX_IMAGES) {
        Ok(r) => valid_request(&r, "gRPC ModelInfer"),
        Err(e) => client_error(&e, "gRPC ModelInfer"),
    }
}

/// The `Authorization` header: `None` or a user and password that round-trip through a
/// freshly encoded header; and the credentials file parser on the same bytes as text.
pub fn basic_auth(data: &[u8]) {
    use base64::Engine;
    if let Some((user, password)) = crate::server::auth::decode_basic(data) {
        assert!(!user.is_empty() && !user.contains(':'));
        let again = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        );
        assert_eq!(
            crate::server::auth::decode_basic(again.as_bytes()),
            Some((user, password))
        );
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::server::auth::parse_file(std::path::Path::new("fuzz"), text);
    }
}

/// Runs a loaded model's planned executor, when it has one, on `n` images and checks the
/// output's size. When `reference` is set, candle-onnx evaluates the same graph and the two
/// must agree (the planner's claim is that it computes what the graph says).
fn exercise(model: &OnnxModel, reference: bool) {
    let Some(plan) = model.plan() else {
        return;
    };
    for n in [1, 3] {
        let input: Vec<f32> = (0..n * plan.input_len())
            .map(|i| (i % 251) as f32 / 250.0)
            .collect();
        let out = plan.run(&input, n).expect("a planned graph runs");
        assert_eq!(out.len(), n * plan.output_len());
        if !reference || n != 1 {
            continue;
        }
        let dims = model.layout().batch_shape(n);
        let Ok(t) = Tensor::from_vec(input, dims, &Device::Cpu) else {
            continue;
        };
        let Ok(want) = model
            .run_candle_onnx(&t)
            .and_then(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?))
        else {
            continue;
        };
        assert_eq!(want.len(), out.len(), "planned vs candle-onnx output size");
        for (i, (a, b)) in out.iter().zip(&want).enumerate() {
            let close = (a - b).abs() <= 1e-3 * (1.0 + b.abs()) || (a.is_nan() && b.is_nan());
            assert!(close, "output {i}: planned {a}, candle-onnx {b}");
        }
    }
}

/// Arbitrary bytes as a model file: loading refuses or yields a model whose plan runs.
pub fn onnx_bytes(data: &[u8]) {
    if let Ok(model) = OnnxModel::from_bytes(PathBuf::from("fuzz.onnx"), data) {
        exercise(&model, false);
    }
}

/// Values that break shape arithmetic.
const EDGE: [i64; 16] = [
    -1,
    0,
    1,
    2,
    3,
    4,
    5,
    7,
    28,
    784,
    1 << 16,
    (1 << 31) - 1,
    1 << 31,
    1 << 40,
    i64::MAX,
    i64::MIN,
];

/// Reads the next byte of the edit script, or `None` at its end.
struct Script<'a>(&'a [u8]);
impl Script<'_> {
    fn byte(&mut self) -> Option<usize> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(usize::from(b))
    }
    fn edge(&mut self) -> Option<i64> {
        Some(EDGE[self.byte()? % EDGE.len()])
    }
}

fn pick<T>(v: &mut [T], i: usize) -> Option<&mut T> {
    let n = v.len();
    (n > 0).then(|| &mut v[i % n])
}

/// The attributes the planner and candle-onnx read.
const ATTRS: [&str; 12] = [
    "kernel_shape",
    "strides",
    "pads",
    "dilations",
    "group",
    "axis",
    "transA",
    "transB",
    "alpha",
    "beta",
    "ceil_mode",
    "epsilon",
];

/// Applies one edit of the script to the model; `None` when the script has run out.
fn edit(g: &mut onnx::GraphProto, s: &mut Script<'_>) -> Option<()> {
    let op = s.byte()?;
    let (a, b) = (s.byte()?, s.byte()?);
    match op % 12 {
        0 => pick(&mut g.node, a)?.op_type = SUPPORTED_OPS[b % SUPPORTED_OPS.len()].into(),
        1 => {
            let v = s.edge()?;
            let at = pick(&mut pick(&mut g.node, a)?.attribute, b)?;
            if let Some(x) = pick(&mut at.ints, v as usize) {
                *x = v;
            } else {
                at.ints.push(v);
            }
        }
        2 => pick(&mut pick(&mut g.node, a)?.attribute, b)?.i = s.edge()?,
        3 => pick(&mut pick(&mut g.node, a)?.attribute, b)?.f = s.edge()? as f32,
        4 => {
            let node = pick(&mut g.node, a)?;
            node.attribute.push(onnx::AttributeProto {
                name: ATTRS[b % ATTRS.len()].into(),
                r#type: onnx::attribute_proto::AttributeType::Ints as i32,
                ints: vec![s.edge()?, s.edge()?, s.edge()?, s.edge()?],
                i: s.edge()?,
                ..Default::default()
            });
        }
        5 => *pick(&mut pick(&mut g.initializer, a)?.dims, b)? = s.edge()?,
        6 => {
            let t = pick(&mut g.initializer, a)?;
            let keep = t.raw_data.len() * b / 256;
            t.raw_data.truncate(keep);
        }
        7 if !g.node.is_empty() => {
            g.node.remove(a % g.node.len());
        }
        8 => {
            // Rewire: one node's input becomes another node's output (or the graph input).
            let names: Vec<String> = g.node.iter().flat_map(|n| n.output.clone()).collect();
            let from = names.get(b % names.len().max(1)).cloned()?;
            *pick(&mut pick(&mut g.node, a)?.input, s.byte()?)? = from;
        }
        9 => {
            let dims = &mut g.input.first_mut()?.r#type.as_mut()?.value.as_mut()?;
            let onnx::type_proto::Value::TensorType(t) = dims else {
                return Some(());
            };
            let d = pick(&mut t.shape.as_mut()?.dim, a)?;
            d.value = Some(onnx::tensor_shape_proto::dimension::Value::DimValue(
                s.edge()?,
            ));
        }
        10 => pick(&mut g.initializer, a)?.data_type = (b % 17) as i32,
        _ => {
            let n = pick(&mut g.node, a)?.clone();
            let at = b % (g.node.len() + 1);
            g.node.insert(at, n);
        }
    }
    Some(())
}

/// Structured mutations of a real model (in the fuzz target, the shipped model): the bytes are
/// an edit script (op types, attributes, initializer shapes and data, wiring, the input
/// shape). Loading refuses or yields a model whose plan runs and agrees with candle-onnx.
/// Why a script and not mutated files: the corpus stays a few bytes per entry instead of
/// copies of a 2.5 MB model, and edits land on structure rather than inside weights.
pub fn onnx_mutate(base: &onnx::ModelProto, data: &[u8]) {
    let mut proto = base.clone();
    let graph = proto.graph.as_mut().expect("the base model has a graph");
    let mut script = Script(data);
    for _ in 0..16 {
        if edit(graph, &mut script).is_none() {
            break;
        }
    }
    if let Ok(model) = OnnxModel::from_proto(PathBuf::from("mutated.onnx"), proto, 0) {
        exercise(&model, true);
    }
}

/// An uploaded image file: refused with one of the three photo errors or converted to 784
/// pixels; never a panic, and never more memory than the (small) decoding bounds here allow.
pub fn photo(data: &[u8]) {
    let limits = crate::photo::DecodeLimits {
        max_side: 4096,
        max_decoded_bytes: 32 << 20,
    };
    if let Ok(px) = crate::photo::photo_pixels(data, limits) {
        assert_eq!(px.len(), crate::classes::IMAGE_PIXELS);
    }
}
