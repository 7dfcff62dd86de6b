//! Request and response bodies of `/predict` and the Open Inference Protocol (v2) routes,
//! with validation that names the offending value.

use super::error::ApiError;
use super::json::Json;
use crate::classes::{CLASS_NAMES, IMAGE_PIXELS, NUM_CLASSES};
use crate::onnx::model::{argmax, softmax_rows};
use serde_json::{json, Map, Value};

/// Parses a JSON body, answering 400 with serde's position on failure (including duplicate
/// keys, numbers out of range and nesting too deep).
pub fn parse_json(body: &[u8]) -> Result<Json, ApiError> {
    Json::parse(body).map_err(|e| ApiError::BadJson(e.to_string()))
}

/// Appends one image of 0–255 numbers to `out` as 0–1 values. `at` names it in errors.
fn push_pixels(v: &Json, at: &str, out: &mut Vec<f32>) -> Result<(), ApiError> {
    let len = v.array_len().ok_or_else(|| {
        ApiError::Unprocessable(format!(
            "{at} must be an array of {IMAGE_PIXELS} numbers, not {v}"
        ))
    })?;
    if len != IMAGE_PIXELS {
        return Err(ApiError::Unprocessable(format!(
            "{at} has {len} values; expected {IMAGE_PIXELS} (28x28 pixels, row-major)"
        )));
    }
    let values = match v {
        Json::Nums(values) => values,
        // A mixed array: name its first item that is not a number.
        Json::Arr(items) => {
            let (i, p) = items
                .iter()
                .enumerate()
                .find(|(_, p)| !matches!(p, Json::Num(_)))
                .expect("an array that is not all numbers has a non-number");
            return Err(ApiError::Unprocessable(format!(
                "{at}[{i}] is {p}, not a number"
            )));
        }
        _ => unreachable!("array_len was Some"),
    };
    for (i, &x) in values.iter().enumerate() {
        if !(0.0..=255.0).contains(&x) {
            return Err(ApiError::Unprocessable(format!(
                "{at}[{i}] is {x}; pixels must be within 0–255"
            )));
        }
        out.push((x / 255.0) as f32);
    }
    Ok(())
}

/// A parsed `/predict` request: 0–1 pixels for `n` images, and whether it was the
/// single-image form.
#[derive(Debug)]
pub struct PredictRequest {
    pub pixels: Vec<f32>,
    pub n: usize,
    pub single: bool,
}

/// `{"image": [784]}` or `{"images": [[784], ...]}` (at most `max_images`).
pub fn parse_predict(body: &Json, max_images: usize) -> Result<PredictRequest, ApiError> {
    if !body.is_object() {
        return Err(ApiError::Unprocessable(
            "body must be a JSON object with \"image\" or \"images\"".into(),
        ));
    }
    if let Json::Obj(entries) = body {
        if let Some((key, _)) = entries.iter().find(|(k, _)| k != "image" && k != "images") {
            let shown: String = key.chars().take(40).collect();
            return Err(ApiError::Unprocessable(format!(
                "unknown field {shown:?}; the body has \"image\" or \"images\""
            )));
        }
    }
    match (body.get("image"), body.get("images")) {
        (Some(_), Some(_)) => Err(ApiError::Unprocessable(
            "give either \"image\" or \"images\", not both".into(),
        )),
        (Some(img), None) => {
            let mut pixels = Vec::with_capacity(IMAGE_PIXELS);
            push_pixels(img, "image", &mut pixels)?;
            Ok(PredictRequest {
                pixels,
                n: 1,
                single: true,
            })
        }
        (None, Some(imgs)) => {
            let n = imgs.array_len().ok_or_else(|| {
                ApiError::Unprocessable("\"images\" must be an array of images".into())
            })?;
            if n == 0 {
                return Err(ApiError::Unprocessable("\"images\" is empty".into()));
            }
            if n > max_images {
                return Err(ApiError::Unprocessable(format!(
                    "\"images\" has {n} images; at most {max_images} per request"
                )));
            }
            let list = match imgs {
                Json::Arr(list) => list,
                // An array of plain numbers: its first item is not an image.
                Json::Nums(nums) => {
                    return Err(ApiError::Unprocessable(format!(
                        "images[0] must be an array of {IMAGE_PIXELS} numbers, not {}",
                        Json::Num(nums[0])
                    )))
                }
                _ => unreachable!("array_len was Some"),
            };
            let mut pixels = Vec::with_capacity(n * IMAGE_PIXELS);
            for (j, img) in list.iter().enumerate() {
                push_pixels(img, &format!("images[{j}]"), &mut pixels)?;
            }
            Ok(PredictRequest {
                pixels,
                n,
                single: false,
            })
        }
        (None, None) => Err(ApiError::Unprocessable(
            "body needs \"image\" (784 numbers 0–255) or \"images\" (a list of them)".into(),
        )),
    }
}

/// The `/predict` answer for one image's logits.
pub fn prediction(logits: &[f32]) -> Value {
    let probs = softmax_rows(logits, NUM_CLASSES);
    let label = argmax(&probs);
    let mut map = Map::new();
    for (name, p) in CLASS_NAMES.iter().zip(&probs) {
        map.insert(name.to_string(), json!(p));
    }
    json!({
        "label": label,
        "class": CLASS_NAMES[label],
        "confidence": probs[label],
        "probabilities": Value::Object(map),
    })
}

/// A parsed v2 infer request.
#[derive(Debug)]
pub struct InferRequest {
    pub id: Option<Value>,
    pub pixels: Vec<f32>,
    pub n: usize,
    /// Requested outputs: "logits" and/or "probabilities".
    pub outputs: Vec<String>,
}

fn push_unit(x: f64, out: &mut Vec<f32>, limit: usize) -> Result<(), ApiError> {
    if out.len() >= limit {
        return Err(ApiError::Unprocessable(format!(
            "input data has more values than its shape allows ({limit})"
        )));
    }
    if !(0.0..=1.0).contains(&x) {
        return Err(ApiError::Unprocessable(format!(
            "input data[{}] is {x}; FP32 pixels must be within 0–1",
            out.len()
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
            "input data[{}] is {other}, not a number",
            out.len()
        ))),
    }
}

/// `{"inputs": [{"name", "shape": [N,784] | [N,1,28,28], "datatype": "FP32", "data": [...]}],
///   "outputs": [{"name": "logits" | "probabilities"}]}`
pub fn parse_infer(body: &Json, max_images: usize) -> Result<InferRequest, ApiError> {
    let bad = |m: String| ApiError::Unprocessable(m);
    if !body.is_object() {
        return Err(bad("body must be a JSON object".into()));
    }
    let inputs = body
        .get("inputs")
        .ok_or_else(|| bad("\"inputs\" must be an array with one tensor".into()))?;
    let count = inputs
        .array_len()
        .ok_or_else(|| bad("\"inputs\" must be an array with one tensor".into()))?;
    if count != 1 {
        return Err(bad(format!(
            "expected exactly one input tensor, got {count}"
        )));
    }
    let input = match inputs {
        Json::Arr(items) if items[0].is_object() => &items[0],
        _ => return Err(bad("inputs[0] must be an object".into())),
    };
    let datatype = input.get("datatype").and_then(Json::as_str).unwrap_or("");
    if datatype != "FP32" {
        return Err(bad(format!(
            "inputs[0].datatype is {datatype:?}; expected \"FP32\""
        )));
    }
    let shape: Vec<u64> = match input.get("shape") {
        Some(Json::Nums(dims))
            if dims
                .iter()
                .all(|&d| d >= 0.0 && d.fract() == 0.0 && d < 1e12) =>
        {
            dims.iter().map(|&d| d as u64).collect()
        }
        _ => {
            return Err(bad(
                "inputs[0].shape must be an array of non-negative integers".into(),
            ))
        }
    };
    let n = match shape.as_slice() {
        [n, 784] | [n, 1, 28, 28] => *n as usize,
        _ => {
            return Err(bad(format!(
                "inputs[0].shape is {shape:?}; expected [N,784] or [N,1,28,28]"
            )))
        }
    };
    if n == 0 || n > max_images {
        return Err(bad(format!("batch size {n} must be within 1–{max_images}")));
    }
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
    let outputs = match body.get("outputs") {
        None => vec!["logits".to_string()],
        Some(list) => {
            let items: &[Json] = match list {
                Json::Arr(items) => items,
                Json::Nums(nums) if nums.is_empty() => &[],
                Json::Nums(_) => return Err(bad("\"outputs\" must hold objects".into())),
                _ => return Err(bad("\"outputs\" must be an array".into())),
            };
            let mut names = Vec::new();
            for o in items {
                let name = o.get("name").and_then(Json::as_str).unwrap_or("");
                if name != "logits" && name != "probabilities" {
                    return Err(bad(format!(
                        "unknown output {name:?}; available: \"logits\", \"probabilities\""
                    )));
                }
                names.push(name.to_string());
            }
            if names.is_empty() {
                names.push("logits".into());
            }
            names
        }
    };
    Ok(InferRequest {
        id: body.get("id").map(Json::to_value),
        pixels,
        n,
        outputs,
    })
}

/// The v2 infer response.
pub fn infer_response(model: &str, req: &InferRequest, logits: &[f32]) -> Value {
    let outputs: Vec<Value> = req
        .outputs
        .iter()
        .map(|name| {
            let data = if name == "probabilities" {
                softmax_rows(logits, NUM_CLASSES)
            } else {
                logits.to_vec()
            };
            json!({ "name": name, "datatype": "FP32", "shape": [req.n, NUM_CLASSES], "data": data })
        })
        .collect();
    let mut body = json!({ "model_name": model, "model_version": "1", "outputs": outputs });
    if let Some(id) = &req.id {
        body["id"] = id.clone();
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The request as the server sees it: serialised, then parsed.
    fn j(v: &Value) -> Json {
        parse_json(v.to_string().as_bytes()).unwrap()
    }

    fn img(v: f64) -> Value {
        json!(vec![v; 784])
    }

    #[test]
    fn predict_validation_names_the_index() {
        let mut bad = vec![json!(0); 784];
        bad[17] = json!(256);
        let err = parse_predict(&j(&json!({"image": bad})), 8)
            .unwrap_err()
            .to_string();
        assert!(err.contains("image[17]") && err.contains("0–255"), "{err}");
        let err = parse_predict(&j(&json!({"image": [1, 2]})), 8)
            .unwrap_err()
            .to_string();
        assert!(err.contains("2 values"), "{err}");
        let mut s = vec![json!(0); 784];
        s[3] = json!("x");
        let err = parse_predict(&j(&json!({"images": [img(0.0), s]})), 8)
            .unwrap_err()
            .to_string();
        assert!(err.contains("images[1][3]"), "{err}");
        assert!(parse_predict(&j(&json!({"images": vec![img(0.0); 9]})), 8).is_err());
        assert!(parse_predict(&j(&json!({})), 8).is_err());
        let ok = parse_predict(&j(&json!({"image": img(255.0)})), 8).unwrap();
        assert_eq!((ok.n, ok.single, ok.pixels[0]), (1, true, 1.0));
    }

    #[test]
    fn prediction_probabilities_sum_to_one() {
        let p = prediction(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.5]);
        assert_eq!(p["label"], 9);
        assert_eq!(p["class"], "Ankle boot");
        let sum: f64 = p["probabilities"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_f64().unwrap())
            .sum();
        assert!((sum - 1.0).abs() < 1e-5);
        // Class order is label order.
        let first = p["probabilities"]
            .as_object()
            .unwrap()
            .keys()
            .next()
            .unwrap()
            .clone();
        assert_eq!(first, "T-shirt/top");
    }

    #[test]
    fn infer_accepts_both_shapes_and_nested_data() {
        let flat = json!({"inputs": [{"name": "pixels", "shape": [2, 784], "datatype": "FP32", "data": vec![0.5; 1568]}]});
        let r = parse_infer(&j(&flat), 8).unwrap();
        assert_eq!((r.n, r.outputs.clone()), (2, vec!["logits".to_string()]));
        let nested = json!({"inputs": [{"name": "pixels", "shape": [1, 1, 28, 28], "datatype": "FP32",
            "data": [[vec![vec![0.25; 28]; 28]]]}], "outputs": [{"name": "probabilities"}], "id": "x"});
        let r = parse_infer(&j(&nested), 8).unwrap();
        assert_eq!(r.pixels.len(), 784);
        let out = infer_response("m", &r, &[0.0; 10]);
        assert_eq!(out["outputs"][0]["shape"], json!([1, 10]));
        assert_eq!(out["id"], "x");
        for bad in [
            json!({"inputs": [{"shape": [1, 784], "datatype": "INT8", "data": vec![0; 784]}]}),
            json!({"inputs": [{"shape": [1, 783], "datatype": "FP32", "data": vec![0; 783]}]}),
            json!({"inputs": [{"shape": [1, 784], "datatype": "FP32", "data": vec![0; 700]}]}),
            json!({"inputs": [{"shape": [1, 784], "datatype": "FP32", "data": vec![2.0; 784]}]}),
            json!({"inputs": []}),
        ] {
            assert!(parse_infer(&j(&bad), 8).is_err(), "{bad}");
        }
    }
}
