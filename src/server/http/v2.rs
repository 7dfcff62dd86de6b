//! The Open Inference Protocol's REST form: JSON requests, the binary tensor data extension
//! (a JSON header of `Inference-Header-Content-Length` bytes followed by raw tensor bytes),
//! the raw binary request, and the JSON documents of model metadata and configuration.
//!
//! Everything decodes into [`InferRequest`], the type the gRPC front end produces too. Every
//! size and offset of the binary form is checked against the body before use; framing errors
//! are 400 and name the field, invalid tensors are 422 as in the JSON form.

use super::json::Json;
use super::predict::parse_json;
use crate::classes::IMAGE_PIXELS;
use crate::server::error::ApiError;
use crate::server::infer::{
    bytes_elements, bytes_shape, check_input, check_pixels, pixels_from_le_bytes, InferRequest,
    OutputName, OutputTensor, RequestedOutput, TensorData,
};
use crate::server::{ModelInfo, EXTENSIONS};
use serde_json::{json, Value};

/// The header that announces the JSON part's length in the binary extension.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// Parses the `Inference-Header-Content-Length` value (400 unless it is a byte count).
pub fn header_length(value: &[u8]) -> Result<usize, ApiError> {
    std::str::from_utf8(value)
        .ok()
        .map(str::trim)
        .filter(|v| !v.is_empty() && v.len() <= 19 && v.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| {
            let shown: String = String::from_utf8_lossy(value).chars().take(40).collect();
            ApiError::BadRequest(format!(
                "Inference-Header-Content-Length must be a byte count, not {shown:?}"
            ))
        })
}

/// Decodes an infer body. `header_len` is the `Inference-Header-Content-Length` value when
/// the request carried one: 0 is the raw binary request (the body is the one input, batch 1,
/// and every output comes back binary), anything else splits the body into the JSON header
/// and the binary section.
pub fn decode(
    body: &[u8],
    header_len: Option<usize>,
    max_images: usize,
) -> Result<InferRequest, ApiError> {
    match header_len {
        None => parse_infer(&parse_json(body)?, None, max_images),
        Some(0) => Ok(InferRequest {
            id: None,
            pixels: pixels_from_le_bytes("the raw binary request's input", "the body", body, 1)?,
            photos: Vec::new(),
            n: 1,
            outputs: Vec::new(),
            binary_output: true,
        }),
        Some(n) if n > body.len() => Err(ApiError::BadRequest(format!(
            "Inference-Header-Content-Length is {n}, but the body has only {} bytes",
            body.len()
        ))),
        Some(n) => {
            let (head, binary) = body.split_at(n);
            parse_infer(&parse_json(head)?, Some(binary), max_images)
        }
    }
}

/// A non-negative integer (JSON has only doubles; 2^53 and beyond are refused).
fn as_count(v: &Json) -> Option<u64> {
    match v {
        Json::Num(x) if *x >= 0.0 && x.fract() == 0.0 && *x < 9.0e15 => Some(*x as u64),
        _ => None,
    }
}

fn push_unit(x: f64, out: &mut Vec<f32>, limit: usize) -> Result<(), ApiError> {
    if out.len() >= limit {
        return Err(ApiError::Unprocessable(format!(
            "input data has more values than its shape allows ({limit})"
        )));
    }
    out.push(x as f32);
    Ok(())
}

fn flatten_numbers(v: &Json, out: &mut Vec<f32>, limit: usize) -> Result<(), ApiError> {
    match v {
        Json::Nums(xs) => xs.iter().try_for_each(|&x| push_unit(x, out, limit)),
        Json::Arr(items) => items
            .iter()
            .try_for_each(|item| flatten_numbers(item, out, limit)),
        Json::Num(x) => push_unit(*x, out, limit),
        other => Err(ApiError::Unprocessable(format!(
            "inputs[0] data[{}] is {other}, not a number",
            out.len()
        ))),
    }
}

/// A boolean parameter (`binary_data`, `binary_data_output`), 422 for another type.
fn bool_param(params: Option<&Json>, key: &str, at: &str) -> Result<Option<bool>, ApiError> {
    match params.and_then(|p| p.get(key)) {
        None => Ok(None),
        Some(Json::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(ApiError::Unprocessable(format!(
            "{at}.parameters.{key} is {other}; expected true or false"
        ))),
    }
}

/// `{"id"?, "parameters"?, "inputs": [one tensor], "outputs"?: [...]}`, with the input's
/// values in `data` or, given `parameters.binary_data_size`, in `binary`.
pub fn parse_infer(
    body: &Json,
    binary: Option<&[u8]>,
    max_images: usize,
) -> Result<InferRequest, ApiError> {
    let bad = |m: String| ApiError::Unprocessable(m);
    let framing = |m: String| ApiError::BadRequest(m);
    if !body.is_object() {
        return Err(bad("body must be a JSON object".into()));
    }
    let id = match body.get("id") {
        None => None,
        Some(Json::Str(s)) => Some(s.clone()),
        Some(other) => return Err(bad(format!("id is {other}; it must be a string"))),
    };
    let count = body
        .get("inputs")
        .and_then(Json::array_len)
        .ok_or_else(|| bad("\"inputs\" must be an array with one tensor".into()))?;
    if count != 1 {
        return Err(bad(format!(
            "expected exactly one input tensor, got {count}"
        )));
    }
    let input = match body.get("inputs") {
        Some(Json::Arr(items)) if items[0].is_object() => &items[0],
        _ => return Err(bad("inputs[0] must be an object".into())),
    };
    let datatype = input.get("datatype").and_then(Json::as_str).unwrap_or("");
    let shape: Vec<i64> = match input.get("shape") {
        Some(Json::Nums(dims)) if dims.iter().all(|&d| d.fract() == 0.0 && d.abs() < 1e12) => {
            dims.iter().map(|&d| d as i64).collect()
        }
        _ => {
            return Err(bad(
                "inputs[0].shape must be an array of non-negative integers".into(),
            ))
        }
    };
    // BYTES: encoded image files (PNG, JPEG, ...), one element per image.
    let is_bytes = datatype == "BYTES";
    let n = if is_bytes {
        bytes_shape("inputs[0]", &shape, max_images)?
    } else {
        check_input("inputs[0]", datatype, &shape, max_images)?
    };
    let params = input.get("parameters");
    let binary_size = match params.and_then(|p| p.get("binary_data_size")) {
        None => None,
        Some(v) => Some(as_count(v).ok_or_else(|| {
            framing(format!(
                "inputs[0].parameters.binary_data_size is {v}; it must be a byte count"
            ))
        })?),
    };
    let mut used = 0usize;
    let mut photos = Vec::new();
    let pixels = match binary_size {
        Some(size) => {
            let section = binary.ok_or_else(|| {
                framing(
                    "inputs[0].parameters.binary_data_size is set, but the request has no \
                     binary section (send the Inference-Header-Content-Length header)"
                        .into(),
                )
            })?;
            if input.get("data").is_some() {
                return Err(framing(
                    "inputs[0] has both \"data\" and parameters.binary_data_size; give one".into(),
                ));
            }
            if size > section.len() as u64 {
                return Err(framing(format!(
                    "inputs[0].parameters.binary_data_size is {size}, but only {} bytes of binary \
                     data follow the JSON header",
                    section.len()
                )));
            }
            used = size as usize;
            if is_bytes {
                photos = bytes_elements(&section[..used], n)?;
                Vec::new()
            } else {
                pixels_from_le_bytes(
                    "inputs[0]",
                    "inputs[0].parameters.binary_data_size",
                    &section[..used],
                    n,
                )?
            }
        }
        None if is_bytes => {
            let data = input
                .get("data")
                .ok_or_else(|| bad("inputs[0].data is missing".into()))?;
            photos = base64_elements(data, n)?;
            Vec::new()
        }
        None => {
            let data = input
                .get("data")
                .ok_or_else(|| bad("inputs[0].data is missing".into()))?;
            let mut pixels = Vec::with_capacity(n * IMAGE_PIXELS);
            flatten_numbers(data, &mut pixels, n * IMAGE_PIXELS)?;
            if pixels.len() != n * IMAGE_PIXELS {
                return Err(bad(format!(
                    "inputs[0].data has {} values; shape {shape:?} needs {}",
                    pixels.len(),
                    n * IMAGE_PIXELS
                )));
            }
            check_pixels("inputs[0]", &pixels)?;
            pixels
        }
    };
    if let Some(section) = binary {
        if used != section.len() {
            return Err(framing(format!(
                "{} bytes of binary data are left over after the inputs (check \
                 Inference-Header-Content-Length and parameters.binary_data_size)",
                section.len() - used
            )));
        }
    }
    let binary_output = bool_param(body.get("parameters"), "binary_data_output", "request")?;
    let outputs = match body.get("outputs") {
        None => Vec::new(),
        Some(Json::Nums(nums)) if nums.is_empty() => Vec::new(),
        Some(Json::Arr(items)) => items
            .iter()
            .enumerate()
            .map(|(i, o)| {
                let at = format!("outputs[{i}]");
                if !o.is_object() {
                    return Err(bad(format!("{at} must be an object with a \"name\"")));
                }
                let name = OutputName::parse(o.get("name").and_then(Json::as_str).unwrap_or(""))?;
                let params = o.get("parameters");
                let classification = match params.and_then(|p| p.get("classification")) {
                    None => None,
                    Some(v) => Some(as_count(v).map(|k| k as i64).ok_or_else(|| {
                        bad(format!(
                            "{at}.parameters.classification is {v}; it must be a count"
                        ))
                    })?),
                };
                let binary = bool_param(params, "binary_data", &at)?;
                RequestedOutput::new(name, classification, binary, &at)
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad("\"outputs\" must be an array of objects".into())),
    };
    Ok(InferRequest {
        id,
        pixels,
        photos,
        n,
        outputs,
        binary_output: binary_output.unwrap_or(false),
    })
}

/// The JSON form of BYTES elements: base64 strings (nested one deep for `[N,1]`).
fn base64_elements(data: &Json, n: usize) -> Result<Vec<Vec<u8>>, ApiError> {
    use base64::Engine;
    let bad = |m: String| ApiError::Unprocessable(m);
    let mut strings = Vec::new();
    match data {
        Json::Arr(items) => {
            for item in items {
                match item {
                    Json::Arr(inner) => strings.extend(inner.iter()),
                    other => strings.push(other),
                }
            }
        }
        other => strings.push(other),
    }
    if strings.len() != n {
        return Err(bad(format!(
            "inputs[0].data has {} elements; its shape needs {n}",
            strings.len()
        )));
    }
    strings
        .into_iter()
        .enumerate()
        .map(|(i, v)| match v {
            Json::Str(s) => base64::engine::general_purpose::STANDARD
                .decode(s.trim())
                .map_err(|e| bad(format!("inputs[0].data[{i}] is not valid base64: {e}"))),
            other => Err(bad(format!(
                "inputs[0].data[{i}] is {other}; BYTES elements are base64 strings of image files"
            ))),
        })
        .collect()
}

/// An encoded infer response: the body, and the JSON header's length when it carries a
/// binary section (sent as `Inference-Header-Content-Length`).
pub struct Encoded {
    pub body: Vec<u8>,
    pub header_len: Option<usize>,
}

/// The response body: JSON, or the JSON header followed by the binary outputs in order.
pub fn encode(model: &ModelInfo, id: Option<&str>, tensors: &[OutputTensor]) -> Encoded {
    let mut binary = Vec::new();
    let outputs: Vec<Value> = tensors
        .iter()
        .map(|t| {
            let mut o = json!({ "name": t.name, "datatype": t.data.datatype(), "shape": t.shape });
            if t.binary {
                let raw = t.data.to_raw();
                o["parameters"] = json!({ "binary_data_size": raw.len() });
                binary.extend_from_slice(&raw);
            } else {
                o["data"] = match &t.data {
                    TensorData::Fp32(v) => json!(v),
                    TensorData::Bytes(v) => json!(v),
                };
            }
            o
        })
        .collect();
    let mut head =
        json!({ "model_name": model.name, "model_version": model.version, "outputs": outputs });
    if let Some(id) = id {
        head["id"] = json!(id);
    }
    let mut body = head.to_string().into_bytes();
    let any_binary = tensors.iter().any(|t| t.binary);
    let header_len = any_binary.then_some(body.len());
    body.extend_from_slice(&binary);
    Encoded { body, header_len }
}

/// `GET /v2`: server metadata with the extensions really implemented.
pub fn server_metadata() -> Value {
    json!({ "name": "fmnist", "version": env!("CARGO_PKG_VERSION"), "extensions": EXTENSIONS })
}

/// `GET /v2/models/{name}`: model metadata.
pub fn model_metadata(m: &ModelInfo) -> Value {
    json!({
        "name": m.name,
        "versions": [m.version],
        "platform": m.platform,
        "inputs": [{ "name": m.input_name, "datatype": "FP32", "shape": m.input_shape }],
        "outputs": [{ "name": "logits", "datatype": "FP32", "shape": [-1, 10] },
                    { "name": "probabilities", "datatype": "FP32", "shape": [-1, 10] }],
        "parameters": {
            "class_names": crate::CLASS_NAMES,
            "v2_input_shapes": [[-1, 784], [-1, 1, 28, 28]],
            "note": "v2 inputs are gray 28x28 pixels within 0–1; the server resizes for 3-channel models",
            "metadata": m.metadata.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
        }
    })
}

/// `GET /v2/models/{name}/config`: Triton's model configuration (model_config.proto as
/// JSON, int64 fields as numbers). `dims` leave out the batch dimension and give the shape
/// the v2 routes take ([1,28,28]; [784] works too); `max_batch_size` is the most images one
/// request may carry.
pub fn model_config(m: &ModelInfo) -> Value {
    let out = |name: &str| json!({ "name": name, "data_type": "TYPE_FP32", "dims": [10] });
    json!({
        "name": m.name,
        "platform": m.platform,
        "max_batch_size": m.max_batch_size,
        "input": [{ "name": m.input_name, "data_type": "TYPE_FP32", "format": "FORMAT_NCHW", "dims": [1, 28, 28] }],
        "output": [out("logits"), out("probabilities")],
        "dynamic_batching": {
            "preferred_batch_size": [m.preferred_batch_size],
            "max_queue_delay_microseconds": m.max_queue_delay_us
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn j(v: &Value) -> Json {
        parse_json(v.to_string().as_bytes()).unwrap()
    }

    fn le(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// A binary-extension body: the JSON header, then `binary`.
    fn framed(head: &Value, binary: &[u8]) -> (Vec<u8>, usize) {
        let mut body = head.to_string().into_bytes();
        let n = body.len();
        body.extend_from_slice(binary);
        (body, n)
    }

    fn binary_head(shape: Value, size: usize) -> Value {
        json!({"inputs": [{"name": "input", "shape": shape, "datatype": "FP32",
                           "parameters": {"binary_data_size": size}}]})
    }

    #[test]
    fn json_inputs_take_both_shapes_and_nested_data() {
        let flat = json!({"inputs": [{"name": "pixels", "shape": [2, 784], "datatype": "FP32", "data": vec![0.5; 1568]}]});
        let r = parse_infer(&j(&flat), None, 8).unwrap();
        assert_eq!((r.n, r.outputs.len(), r.binary_output), (2, 0, false));
        let nested = json!({"inputs": [{"name": "pixels", "shape": [1, 1, 28, 28], "datatype": "FP32",
            "data": [[vec![vec![0.25; 28]; 28]]]}], "outputs": [{"name": "probabilities"}], "id": "x"});
        let r = parse_infer(&j(&nested), None, 8).unwrap();
        assert_eq!(r.pixels.len(), 784);
        assert_eq!(r.id.as_deref(), Some("x"));
        assert_eq!(r.outputs[0].name, OutputName::Probabilities);
        for bad in [
            json!({"inputs": [{"shape": [1, 784], "datatype": "INT8", "data": vec![0; 784]}]}),
            json!({"inputs": [{"shape": [1, 783], "datatype": "FP32", "data": vec![0; 783]}]}),
            json!({"inputs": [{"shape": [1, 784], "datatype": "FP32", "data": vec![0; 700]}]}),
            json!({"inputs": [{"shape": [1, 784], "datatype": "FP32", "data": vec![2.0; 784]}]}),
            json!({"inputs": [{"shape": [1.5, 784], "datatype": "FP32", "data": vec![0; 784]}]}),
            json!({"inputs": [{"shape": [1, 784], "datatype": "FP32", "data": vec![0; 784]}], "id": 7}),
            json!({"inputs": [{"shape": [1, 784], "datatype": "FP32", "data": vec![0; 784]}],
                   "outputs": [{"name": "logits", "parameters": {"classification": 0}}]}),
            json!({"inputs": [{"shape": [1, 784], "datatype": "FP32", "data": vec![0; 784]}],
                   "outputs": [{"name": "logits", "parameters": {"binary_data": "yes"}}]}),
            json!({"inputs": []}),
        ] {
            let e = parse_infer(&j(&bad), None, 8).unwrap_err();
            assert_eq!(e.status(), 422, "{bad}: {e}");
        }
    }

    #[test]
    fn binary_inputs_decode_and_every_framing_error_names_its_field() {
        let img: Vec<f32> = (0..1568).map(|i| (i % 256) as f32 / 255.0).collect();
        let (body, n) = framed(&binary_head(json!([2, 784]), 6272), &le(&img));
        let r = decode(&body, Some(n), 8).unwrap();
        assert_eq!((r.n, r.pixels.clone()), (2, img.clone()));

        let one = le(&img[..784]);
        let cases: Vec<(&str, Vec<u8>, Option<usize>, &str)> = vec![
            {
                let (b, n) = framed(&binary_head(json!([1, 784]), 5000), &one);
                ("size past the body", b, Some(n), "binary_data_size is 5000")
            },
            {
                let (b, n) = framed(&binary_head(json!([1, 784]), 3000), &one);
                (
                    "size not the shape's",
                    b,
                    Some(n),
                    "binary_data_size is 3000 bytes",
                )
            },
            {
                let (b, n) = framed(&binary_head(json!([1, 784]), 3136), &le(&img[..800]));
                (
                    "bytes left over",
                    b,
                    Some(n),
                    "64 bytes of binary data are left over",
                )
            },
            {
                let (b, _) = framed(&binary_head(json!([1, 784]), 3136), &one);
                let len = b.len();
                (
                    "header past the body",
                    b,
                    Some(len + 1),
                    "Inference-Header-Content-Length",
                )
            },
            {
                let (b, n) = framed(&binary_head(json!([1, 784]), 3136), &one);
                ("header cut short", b, Some(n - 3), "malformed JSON")
            },
            {
                let (b, n) = framed(
                    &json!({"inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32",
                        "parameters": {"binary_data_size": -4}}]}),
                    &one,
                );
                ("negative size", b, Some(n), "must be a byte count")
            },
            {
                let (b, n) = framed(
                    &json!({"inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32",
                        "data": vec![0; 784], "parameters": {"binary_data_size": 3136}}]}),
                    &one,
                );
                ("data and binary", b, Some(n), "both")
            },
            {
                let b = binary_head(json!([1, 784]), 3136).to_string().into_bytes();
                (
                    "size without a binary section",
                    b,
                    None,
                    "no binary section",
                )
            },
            (
                "raw request of the wrong size",
                one[..3000].to_vec(),
                Some(0),
                "3000 bytes",
            ),
        ];
        for (what, body, header, needle) in cases {
            let e = decode(&body, header, 8).unwrap_err();
            assert_eq!(e.status(), 400, "{what}: {e}");
            assert!(e.to_string().contains(needle), "{what}: {e}");
        }
        // A pixel out of range inside binary data is a tensor error, like in JSON.
        let mut hot = img[..784].to_vec();
        hot[5] = 2.0;
        let (b, n) = framed(&binary_head(json!([1, 784]), 3136), &le(&hot));
        let e = decode(&b, Some(n), 8).unwrap_err();
        assert_eq!(e.status(), 422);
        assert!(e.to_string().contains("data[5]"), "{e}");
        // The raw binary request: batch 1, every output binary.
        let r = decode(&one, Some(0), 8).unwrap();
        assert!(r.binary_output && r.outputs.is_empty() && r.n == 1);
        for bad in ["", "12a", "-1", "99999999999999999999999"] {
            assert_eq!(header_length(bad.as_bytes()).unwrap_err().status(), 400);
        }
        assert_eq!(header_length(b" 42 ").unwrap(), 42);
    }

    #[test]
    fn binary_responses_carry_their_header_length_and_sizes() {
        let info = ModelInfo {
            name: "m".into(),
            version: "3".into(),
            platform: "onnx_fmnist",
            input_name: "input".into(),
            input_shape: vec![-1, 1, 28, 28],
            max_batch_size: 8,
            preferred_batch_size: 4,
            max_queue_delay_us: 500,
            metadata: vec![],
        };
        let tensors = vec![
            OutputTensor {
                name: "logits",
                shape: [1, 10],
                data: TensorData::Fp32(vec![1.5; 10]),
                binary: true,
            },
            OutputTensor {
                name: "probabilities",
                shape: [1, 1],
                data: TensorData::Bytes(vec!["0.9:3:Dress".into()]),
                binary: false,
            },
        ];
        let e = encode(&info, Some("r1"), &tensors);
        let n = e.header_len.unwrap();
        let head: Value = serde_json::from_slice(&e.body[..n]).unwrap();
        assert_eq!(head["model_version"], "3");
        assert_eq!(head["id"], "r1");
        assert_eq!(head["outputs"][0]["parameters"]["binary_data_size"], 40);
        assert!(head["outputs"][0].get("data").is_none());
        assert_eq!(head["outputs"][1]["data"][0], "0.9:3:Dress");
        assert_eq!(&e.body[n..], &le(&[1.5; 10])[..]);
        let plain = encode(&info, None, &tensors[1..]);
        assert!(plain.header_len.is_none());
        let cfg = model_config(&info);
        assert_eq!(cfg["input"][0]["dims"], json!([1, 28, 28]));
        assert_eq!(cfg["dynamic_batching"]["max_queue_delay_microseconds"], 500);
        assert_eq!(model_metadata(&info)["platform"], cfg["platform"]);
    }
}
