//! The one inference request that every Open Inference Protocol front end (REST JSON, REST
//! binary, gRPC) decodes into, the checks they share, and the output tensors computed from
//! the model's logits. A front end only translates its wire format to and from these types, so
//! the rules (shapes, value ranges, output names, classification) live here once.

use super::error::ApiError;
use crate::classes::{CLASS_NAMES, IMAGE_PIXELS, NUM_CLASSES};
use crate::onnx::model::softmax_rows;

/// The outputs every model served here has, in the order they are answered by default.
pub const OUTPUT_NAMES: [&str; 2] = ["logits", "probabilities"];

/// Bytes of one image in FP32.
pub const IMAGE_BYTES: usize = IMAGE_PIXELS * 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputName {
    Logits,
    Probabilities,
}

impl OutputName {
    pub fn as_str(self) -> &'static str {
        match self {
            OutputName::Logits => "logits",
            OutputName::Probabilities => "probabilities",
        }
    }

    /// An output the client named; 422 (INVALID_ARGUMENT) for any other name.
    pub fn parse(name: &str) -> Result<Self, ApiError> {
        match name {
            "logits" => Ok(OutputName::Logits),
            "probabilities" => Ok(OutputName::Probabilities),
            other => {
                let shown: String = other.chars().take(60).collect();
                Err(ApiError::Unprocessable(format!(
                    "unknown output {shown:?}; available: \"logits\", \"probabilities\""
                )))
            }
        }
    }
}

/// One output the client asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestedOutput {
    pub name: OutputName,
    /// Classification extension: the top K classes as "score:index:label" strings.
    pub classification: Option<usize>,
    /// REST only: this output in the binary section (`None`: the request's default).
    pub binary: Option<bool>,
}

impl RequestedOutput {
    /// Checks a `classification` count (1 to the number of classes).
    pub fn new(
        name: OutputName,
        classification: Option<i64>,
        binary: Option<bool>,
        at: &str,
    ) -> Result<Self, ApiError> {
        let classification = match classification {
            None => None,
            Some(k) if (1..=NUM_CLASSES as i64).contains(&k) => Some(k as usize),
            Some(k) => {
                return Err(ApiError::Unprocessable(format!(
                    "{at}.parameters.classification is {k}; it must be within 1–{NUM_CLASSES}"
                )))
            }
        };
        Ok(Self {
            name,
            classification,
            binary,
        })
    }
}

/// A decoded v2 inference request, whatever protocol carried it.
#[derive(Debug, Clone, PartialEq)]
pub struct InferRequest {
    /// The client's request id, echoed in the response.
    pub id: Option<String>,
    /// `n * 784` gray pixels within 0–1 (empty while `photos` waits to be decoded).
    pub pixels: Vec<f32>,
    /// A `BYTES` input: the `n` encoded image files, still to be decoded.
    pub photos: Vec<Vec<u8>>,
    pub n: usize,
    /// The outputs asked for, in order; empty means every output.
    pub outputs: Vec<RequestedOutput>,
    /// REST's request-wide `binary_data_output`: the default for outputs that do not say.
    pub binary_output: bool,
}

/// Checks an input tensor's datatype and shape and returns its batch size. `at` names the
/// tensor in messages (`inputs[0]`).
pub fn check_input(
    at: &str,
    datatype: &str,
    shape: &[i64],
    max_images: usize,
) -> Result<usize, ApiError> {
    let bad = |m: String| Err(ApiError::Unprocessable(m));
    if datatype != "FP32" {
        let shown: String = datatype.chars().take(20).collect();
        return bad(format!(
            "{at}.datatype is {shown:?}; expected \"FP32\" (pixels) or \"BYTES\" (image files)"
        ));
    }
    if shape.iter().any(|&d| d < 0) {
        return bad(format!(
            "{at}.shape must be an array of non-negative integers"
        ));
    }
    let n = match shape {
        [n, 784] | [n, 1, 28, 28] => *n as u64,
        _ => {
            let shown: Vec<i64> = shape.iter().take(8).copied().collect();
            return bad(format!(
                "{at}.shape is {shown:?}; expected [N,784] or [N,1,28,28]"
            ));
        }
    };
    if n == 0 || n > max_images as u64 {
        return bad(format!("batch size {n} must be within 1–{max_images}"));
    }
    Ok(n as usize)
}

/// A BYTES input's shape: `[N]` or `[N,1]`, one encoded image per element.
pub fn bytes_shape(at: &str, shape: &[i64], max_images: usize) -> Result<usize, ApiError> {
    let n = match shape {
        [n] | [n, 1] if *n >= 0 => *n as u64,
        _ => {
            let shown: Vec<i64> = shape.iter().take(8).copied().collect();
            return Err(ApiError::Unprocessable(format!(
                "{at}.shape is {shown:?}; a BYTES input of encoded images is [N] or [N,1]"
            )));
        }
    };
    if n == 0 || n > max_images as u64 {
        return Err(ApiError::Unprocessable(format!(
            "batch size {n} must be within 1–{max_images}"
        )));
    }
    Ok(n as usize)
}

/// The binary form of BYTES elements: each a 4-byte little-endian length, then the bytes.
pub fn bytes_elements(section: &[u8], n: usize) -> Result<Vec<Vec<u8>>, ApiError> {
    let framing = |m: String| ApiError::BadRequest(m);
    let mut rest = section;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let Some((len, tail)) = rest.split_first_chunk::<4>() else {
            return Err(framing(format!(
                "inputs[0] BYTES element {i}: the data ends before its 4-byte length"
            )));
        };
        let len = u32::from_le_bytes(*len) as usize;
        if len > tail.len() {
            return Err(framing(format!(
                "inputs[0] BYTES element {i} declares {len} bytes, but only {} follow",
                tail.len()
            )));
        }
        out.push(tail[..len].to_vec());
        rest = &tail[len..];
    }
    if !rest.is_empty() {
        return Err(framing(format!(
            "inputs[0] has {} bytes after its {n} BYTES elements",
            rest.len()
        )));
    }
    Ok(out)
}

/// Checks that every value is a pixel within 0–1 (NaN is not).
pub fn check_pixels(at: &str, values: &[f32]) -> Result<(), ApiError> {
    match values.iter().position(|x| !(0.0..=1.0).contains(x)) {
        None => Ok(()),
        Some(i) => Err(ApiError::Unprocessable(format!(
            "{at} data[{i}] is {}; FP32 pixels must be within 0–1",
            values[i]
        ))),
    }
}

/// Decodes `n` images of little-endian FP32 bytes (the binary extension's and gRPC's raw
/// form). `field` names where the bytes came from; a length that does not match is a framing
/// error (400).
pub fn pixels_from_le_bytes(
    at: &str,
    field: &str,
    bytes: &[u8],
    n: usize,
) -> Result<Vec<f32>, ApiError> {
    let want = n * IMAGE_BYTES;
    if bytes.len() != want {
        return Err(ApiError::BadRequest(format!(
            "{field} is {} bytes; {at} (FP32, {n} images of 784) needs {want}",
            bytes.len()
        )));
    }
    let pixels: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    check_pixels(at, &pixels)?;
    Ok(pixels)
}

/// An output tensor's values.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    Fp32(Vec<f32>),
    /// BYTES elements (classification strings).
    Bytes(Vec<String>),
}

impl TensorData {
    pub fn datatype(&self) -> &'static str {
        match self {
            TensorData::Fp32(_) => "FP32",
            TensorData::Bytes(_) => "BYTES",
        }
    }

    /// The raw form: little-endian FP32, or each BYTES element as a 4-byte little-endian
    /// length and its bytes.
    pub fn to_raw(&self) -> Vec<u8> {
        match self {
            TensorData::Fp32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::Bytes(items) => {
                let mut out = Vec::with_capacity(items.iter().map(|s| s.len() + 4).sum());
                for s in items {
                    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
                    out.extend_from_slice(s.as_bytes());
                }
                out
            }
        }
    }
}

/// One output tensor of a response.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputTensor {
    pub name: &'static str,
    pub shape: [usize; 2],
    pub data: TensorData,
    /// REST: answered in the binary section.
    pub binary: bool,
}

/// Triton's classification strings for one row: the top `k` as "score:index:label", highest
/// first (ties by index), the score printed as C++'s `std::to_string` prints a float.
fn classify_row(row: &[f32], k: usize) -> Vec<String> {
    let mut order: Vec<usize> = (0..row.len()).collect();
    order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
    order
        .into_iter()
        .take(k)
        .map(|i| format!("{:.6}:{i}:{}", row[i], CLASS_NAMES[i]))
        .collect()
}

/// The output tensors for `req`, computed from the model's `n * 10` logits.
pub fn outputs(req: &InferRequest, logits: &[f32]) -> Vec<OutputTensor> {
    let all = [
        RequestedOutput {
            name: OutputName::Logits,
            classification: None,
            binary: None,
        },
        RequestedOutput {
            name: OutputName::Probabilities,
            classification: None,
            binary: None,
        },
    ];
    let wanted: &[RequestedOutput] = if req.outputs.is_empty() {
        &all
    } else {
        &req.outputs
    };
    let mut probs: Option<Vec<f32>> = None;
    wanted
        .iter()
        .map(|o| {
            let values: &[f32] = match o.name {
                OutputName::Logits => logits,
                OutputName::Probabilities => {
                    probs.get_or_insert_with(|| softmax_rows(logits, NUM_CLASSES))
                }
            };
            let (shape, data) = match o.classification {
                None => ([req.n, NUM_CLASSES], TensorData::Fp32(values.to_vec())),
                Some(k) => (
                    [req.n, k],
                    TensorData::Bytes(
                        values
                            .chunks_exact(NUM_CLASSES)
                            .flat_map(|row| classify_row(row, k))
                            .collect(),
                    ),
                ),
            };
            OutputTensor {
                name: o.name.as_str(),
                shape,
                data,
                binary: o.binary.unwrap_or(req.binary_output),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_and_types_are_checked() {
        assert_eq!(check_input("inputs[0]", "FP32", &[3, 784], 8).unwrap(), 3);
        assert_eq!(
            check_input("inputs[0]", "FP32", &[2, 1, 28, 28], 8).unwrap(),
            2
        );
        for (dt, shape, needle) in [
            ("INT8", vec![1, 784], "FP32"),
            ("FP32", vec![-1, 784], "non-negative"),
            ("FP32", vec![1, 783], "expected [N,784]"),
            ("FP32", vec![0, 784], "batch size 0"),
            ("FP32", vec![9, 784], "batch size 9"),
            ("FP32", vec![i64::MAX, 784], "batch size"),
        ] {
            let e = check_input("inputs[0]", dt, &shape, 8).unwrap_err();
            assert_eq!(e.status(), 422, "{shape:?}");
            assert!(e.to_string().contains(needle), "{e}");
        }
    }

    #[test]
    fn raw_pixels_decode_and_wrong_lengths_are_framing_errors() {
        let img: Vec<f32> = (0..784).map(|i| i as f32 / 783.0).collect();
        let bytes: Vec<u8> = img.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(
            pixels_from_le_bytes("inputs[0]", "raw", &bytes, 1).unwrap(),
            img
        );
        let e = pixels_from_le_bytes("inputs[0]", "raw", &bytes[1..], 1).unwrap_err();
        assert_eq!(e.status(), 400);
        assert!(e.to_string().contains("3135 bytes"), "{e}");
        let mut nan = bytes.clone();
        nan[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
        let e = pixels_from_le_bytes("inputs[0]", "raw", &nan, 1).unwrap_err();
        assert!(e.to_string().contains("data[2]"), "{e}");
    }

    #[test]
    fn outputs_default_to_all_and_classification_is_top_k() {
        let mut logits = vec![0.0f32; 20];
        logits[3] = 5.0;
        logits[7] = 4.0;
        logits[10 + 9] = 2.0;
        let mut req = InferRequest {
            id: None,
            pixels: vec![],
            photos: vec![],
            n: 2,
            outputs: vec![],
            binary_output: true,
        };
        let out = outputs(&req, &logits);
        assert_eq!(out.len(), 2);
        assert_eq!((out[0].name, out[1].name), ("logits", "probabilities"));
        assert!(out.iter().all(|t| t.binary && t.shape == [2, 10]));
        req.outputs =
            vec![
                RequestedOutput::new(OutputName::Logits, Some(2), Some(false), "outputs[0]")
                    .unwrap(),
            ];
        let out = outputs(&req, &logits);
        assert_eq!(out[0].shape, [2, 2]);
        assert!(!out[0].binary);
        let TensorData::Bytes(s) = &out[0].data else {
            panic!("not BYTES")
        };
        assert_eq!(s[0], "5.000000:3:Dress");
        assert_eq!(s[1], "4.000000:7:Sneaker");
        assert_eq!(s[2], "2.000000:9:Ankle boot");
        // Equal scores: the lower index first.
        assert_eq!(s[3], "0.000000:0:T-shirt/top");
        let raw = out[0].data.to_raw();
        assert_eq!(&raw[..4], &16u32.to_le_bytes());
        assert_eq!(&raw[4..20], b"5.000000:3:Dress");
        for k in [0, 11, -1] {
            assert!(RequestedOutput::new(OutputName::Logits, Some(k), None, "o").is_err());
        }
        assert_eq!(OutputName::parse("secrets").unwrap_err().status(), 422);
    }
}
