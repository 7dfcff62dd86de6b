//! Request and response bodies of `/predict`, with validation that names the offending value.

use super::super::error::ApiError;
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

/// The common body `{"image": [784 integers 0–255]}`, scanned directly into 0–1 pixels. The
/// general parser builds a tree of values first, which cost about a tenth of the server's CPU
/// at full load. Anything else (other or repeated fields, decimals, exponents, leading zeros,
/// values above 255, the wrong count, escapes) returns `None` and goes through
/// [`parse_json`] + [`parse_predict`], which give the same pixels or the precise error.
pub fn fast_single_image(body: &[u8]) -> Option<Vec<f32>> {
    let mut i = 0;
    let ws = |i: &mut usize| {
        while body
            .get(*i)
            .is_some_and(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        {
            *i += 1;
        }
    };
    let lit = |i: &mut usize, text: &[u8]| -> Option<()> {
        ws(i);
        body.get(*i..*i + text.len()).filter(|s| *s == text)?;
        *i += text.len();
        Some(())
    };
    lit(&mut i, b"{")?;
    lit(&mut i, b"\"image\"")?;
    lit(&mut i, b":")?;
    lit(&mut i, b"[")?;
    let mut pixels = Vec::with_capacity(IMAGE_PIXELS);
    loop {
        ws(&mut i);
        let start = i;
        let mut v: u32 = 0;
        while let Some(d) = body.get(i).filter(|b| b.is_ascii_digit()) {
            v = v * 10 + u32::from(d - b'0');
            i += 1;
            if i - start > 3 {
                return None;
            }
        }
        let digits = i - start;
        // JSON forbids leading zeros; "0" alone is fine.
        if digits == 0 || v > 255 || (digits > 1 && body[start] == b'0') {
            return None;
        }
        if pixels.len() == IMAGE_PIXELS {
            return None;
        }
        pixels.push((f64::from(v) / 255.0) as f32);
        ws(&mut i);
        match body.get(i)? {
            b',' => i += 1,
            b']' => {
                i += 1;
                break;
            }
            _ => return None,
        }
    }
    lit(&mut i, b"}")?;
    ws(&mut i);
    (i == body.len() && pixels.len() == IMAGE_PIXELS).then_some(pixels)
}

/// A parsed `/predict` request: 0–1 pixels for `n` images, and whether it was the
/// single-image form.
#[derive(Debug)]
pub struct PredictRequest {
    pub pixels: Vec<f32>,
    pub n: usize,
    pub single: bool,
    /// Encoded image files (`image_base64` / `images_base64`), still to be decoded; `pixels`
    /// is empty then.
    pub photos: Vec<Vec<u8>>,
}

/// The bytes of a base64 image field; a `data:image/...;base64,` prefix (what a browser's
/// FileReader gives) is allowed.
fn base64_image(v: &Json, at: &str) -> Result<Vec<u8>, ApiError> {
    use base64::Engine;
    let Json::Str(text) = v else {
        return Err(ApiError::Unprocessable(format!(
            "{at} must be a base64 string, not {v}"
        )));
    };
    let data = match text.split_once(";base64,") {
        Some((head, rest)) if head.starts_with("data:") => rest,
        _ => text.as_str(),
    };
    base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| ApiError::Unprocessable(format!("{at} is not valid base64: {e}")))
}

/// `{"image_base64": "..."}` or `{"images_base64": ["...", ...]}`.
fn parse_base64(body: &Json, max_images: usize) -> Result<PredictRequest, ApiError> {
    let (photos, single) = match (body.get("image_base64"), body.get("images_base64")) {
        (Some(_), Some(_)) => {
            return Err(ApiError::Unprocessable(
                "give either \"image_base64\" or \"images_base64\", not both".into(),
            ))
        }
        (Some(v), None) => (vec![base64_image(v, "image_base64")?], true),
        (None, Some(Json::Arr(list))) => {
            if list.is_empty() {
                return Err(ApiError::Unprocessable("\"images_base64\" is empty".into()));
            }
            if list.len() > max_images {
                return Err(ApiError::Unprocessable(format!(
                    "\"images_base64\" has {} images; at most {max_images} per request",
                    list.len()
                )));
            }
            let photos = list
                .iter()
                .enumerate()
                .map(|(i, v)| base64_image(v, &format!("images_base64[{i}]")))
                .collect::<Result<Vec<_>, _>>()?;
            (photos, false)
        }
        (None, Some(Json::Nums(n))) if n.is_empty() => {
            return Err(ApiError::Unprocessable("\"images_base64\" is empty".into()))
        }
        (None, Some(_)) => {
            return Err(ApiError::Unprocessable(
                "\"images_base64\" must be an array of base64 strings".into(),
            ))
        }
        (None, None) => unreachable!("called with one of the keys"),
    };
    Ok(PredictRequest {
        pixels: Vec::new(),
        n: photos.len(),
        single,
        photos,
    })
}

/// `{"image": [784]}` or `{"images": [[784], ...]}` (at most `max_images`).
pub fn parse_predict(body: &Json, max_images: usize) -> Result<PredictRequest, ApiError> {
    if !body.is_object() {
        return Err(ApiError::Unprocessable(
            "body must be a JSON object with \"image\" or \"images\"".into(),
        ));
    }
    const KEYS: [&str; 4] = ["image", "images", "image_base64", "images_base64"];
    if let Json::Obj(entries) = body {
        if let Some((key, _)) = entries.iter().find(|(k, _)| !KEYS.contains(&k.as_str())) {
            let shown: String = key.chars().take(40).collect();
            return Err(ApiError::Unprocessable(format!(
                "unknown field {shown:?}; the body has \"image\", \"images\", \"image_base64\" or \"images_base64\""
            )));
        }
        if entries.len() > 1 && entries.iter().any(|(k, _)| k.ends_with("_base64")) {
            return Err(ApiError::Unprocessable(
                "give one of \"image\", \"images\", \"image_base64\" or \"images_base64\"".into(),
            ));
        }
    }
    if body.get("image_base64").is_some() || body.get("images_base64").is_some() {
        return parse_base64(body, max_images);
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
                photos: Vec::new(),
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
                photos: Vec::new(),
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

    /// The fast path accepts exactly what it claims and gives the general parser's pixels.
    #[test]
    fn fast_single_image_agrees_with_the_general_parser() {
        let mut seed = 9u64;
        let mut next = |m: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % m
        };
        let spaces = [" ", "", "\n", " \t ", "\r\n"];
        for case in 0..300 {
            let values: Vec<String> = (0..IMAGE_PIXELS).map(|_| next(256).to_string()).collect();
            let mut sp = || spaces[next(5) as usize];
            let mut body = format!("{}{{{}\"image\"{}:{}[", sp(), sp(), sp(), sp());
            for (j, v) in values.iter().enumerate() {
                if j > 0 {
                    body.push_str(sp());
                    body.push(',');
                }
                body.push_str(sp());
                body.push_str(v);
            }
            body.push_str(&format!("{}]{}}}{}", sp(), sp(), sp()));
            let fast = fast_single_image(body.as_bytes()).unwrap_or_else(|| panic!("case {case}"));
            let slow = parse_predict(&parse_json(body.as_bytes()).unwrap(), 1).unwrap();
            assert_eq!(fast, slow.pixels, "case {case}");
        }
        // Everything else goes to the general path.
        let ones = vec!["1"; IMAGE_PIXELS].join(",");
        let good = format!("{{\"image\":[{ones}]}}");
        assert!(fast_single_image(good.as_bytes()).is_some());
        for bad in [
            good.replacen("[1,", "[1.0,", 1),
            good.replacen("[1,", "[01,", 1),
            good.replacen("[1,", "[256,", 1),
            good.replacen("[1,", "[-1,", 1),
            good.replacen("[1,", "[1e0,", 1),
            good.replacen("[1,", "[", 1),
            good.replacen("[1,", "[1,1,", 1),
            good.replacen("[1,", "[1000,", 1),
            good.replacen("\"image\"", "\"imag\\u0065\"", 1),
            good.replacen("}", ",\"image\":[]}", 1),
            good.replacen("}", ",\"x\":1}", 1),
            format!("{good}x"),
            good.replacen("[1,", "[,", 1),
            good.replacen("]}", ",]}", 1),
            "{\"images\":[]}".to_string(),
            String::new(),
        ] {
            assert!(
                fast_single_image(bad.as_bytes()).is_none(),
                "{}",
                &bad[..40.min(bad.len())]
            );
        }
    }
}
