//! Property-based fuzzing of what a client controls: request bytes → JSON → validated pixels,
//! and the preprocessing those pixels go through. Case counts follow `PROPTEST_CASES`
//! (256 by default; `make fuzz` runs many more for a bounded time).

use super::predict::{fast_single_image, parse_json, parse_predict};
use super::v2::{decode, parse_infer};
use crate::preprocess::{batch_from_unit, resize_bilinear, InputLayout};
// Every decoding failure must be a client error over HTTP and gRPC, never a panic or a 5xx:
// the libFuzzer targets' own check.
use crate::fuzzing::client_error;
use candle_core::Device;
use proptest::prelude::*;

/// JSON-ish text: fragments that real and broken requests are made of.
fn jsonish() -> impl Strategy<Value = String> {
    let atom = prop_oneof![
        Just("{".to_string()),
        Just("}".to_string()),
        Just("[".to_string()),
        Just("]".to_string()),
        Just(",".to_string()),
        Just(":".to_string()),
        Just("\"image\"".to_string()),
        Just("\"images\"".to_string()),
        Just("\"inputs\"".to_string()),
        Just("\"shape\"".to_string()),
        Just("\"data\"".to_string()),
        Just("\"datatype\"".to_string()),
        Just("\"FP32\"".to_string()),
        Just("null".to_string()),
        Just("true".to_string()),
        Just("NaN".to_string()),
        Just("1e309".to_string()),
        any::<i32>().prop_map(|v| v.to_string()),
        any::<f64>().prop_map(|v| v.to_string()),
        "[a-z\\\\\"]{0,6}".prop_map(|s| format!("\"{s}\"")),
    ];
    proptest::collection::vec(atom, 0..60).prop_map(|parts| parts.concat())
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        match parse_json(&bytes) {
            Ok(j) => {
                for r in [parse_predict(&j, 8).err(), parse_infer(&j, None, 8).err()].into_iter().flatten() {
                    client_error(&r, "proptest");
                }
            }
            Err(e) => prop_assert_eq!(e.status().as_u16(), 400),
        }
    }

    #[test]
    fn jsonish_text_never_panics(text in jsonish()) {
        if let Ok(j) = parse_json(text.as_bytes()) {
            if let Err(e) = parse_predict(&j, 8) {
                client_error(&e, "proptest");
            }
            if let Err(e) = parse_infer(&j, None, 8) {
                client_error(&e, "proptest");
            }
        }
    }

    /// Arbitrary bytes behind a binary-extension header (any header length, any body) are
    /// refused as client errors or decoded, never a panic.
    #[test]
    fn binary_framing_never_panics(
        head in jsonish(),
        tail in proptest::collection::vec(any::<u8>(), 0..4000),
        cut in any::<prop::sample::Index>(),
        header in prop_oneof![Just(None), Just(Some(0usize)), (0usize..5000).prop_map(Some)],
    ) {
        let mut body = head.into_bytes();
        let json_len = body.len();
        body.extend_from_slice(&tail);
        for h in [header, Some(json_len), Some(cut.index(body.len() + 1))] {
            if let Err(e) = decode(&body, h, 8) {
                client_error(&e, "proptest");
            }
        }
    }

    /// The same tensor sent as JSON numbers and as binary FP32 decodes to the same request
    /// (so the same outputs): values are any f32 within 0–1, as a client's numpy would send.
    #[test]
    fn json_and_binary_encodings_decode_identically(
        values in proptest::collection::vec(0f32..=1f32, 784..=784 * 3),
        nested in any::<bool>(),
        classification in proptest::option::of(1i64..=10),
    ) {
        let n = values.len() / 784;
        let values = &values[..n * 784];
        let shape = if nested { serde_json::json!([n, 1, 28, 28]) } else { serde_json::json!([n, 784]) };
        let outputs = match classification {
            Some(k) => serde_json::json!([{"name": "probabilities", "parameters": {"classification": k}}]),
            None => serde_json::json!([{"name": "logits"}]),
        };
        let as_json = serde_json::json!({"id": "p", "inputs": [{"name": "input", "shape": shape,
            "datatype": "FP32", "data": values}], "outputs": outputs});
        let from_json = decode(as_json.to_string().as_bytes(), None, 8).unwrap();
        let head = serde_json::json!({"id": "p", "inputs": [{"name": "input", "shape": shape,
            "datatype": "FP32", "parameters": {"binary_data_size": values.len() * 4}}], "outputs": outputs});
        let mut body = head.to_string().into_bytes();
        let header = body.len();
        body.extend(values.iter().flat_map(|x| x.to_le_bytes()));
        let from_binary = decode(&body, Some(header), 8).unwrap();
        prop_assert_eq!(&from_json, &from_binary);
        prop_assert_eq!(&from_json.pixels[..], values);
    }

    #[test]
    fn valid_images_decode_exactly(pixels in proptest::collection::vec(0u8..=255, 784), as_float in any::<bool>()) {
        let list: Vec<String> = pixels
            .iter()
            .map(|p| if as_float { format!("{p}.0") } else { p.to_string() })
            .collect();
        let body = format!("{{\"image\":[{}]}}", list.join(","));
        let req = parse_predict(&parse_json(body.as_bytes()).unwrap(), 8).unwrap();
        prop_assert_eq!(req.n, 1);
        for (got, p) in req.pixels.iter().zip(&pixels) {
            prop_assert_eq!(*got, (*p as f64 / 255.0) as f32);
        }
    }

    /// The fast path for `{"image":[...]}` never accepts what the general parser refuses, and
    /// gives the same pixels when it accepts: checked on mutations of a valid body (a byte
    /// changed, inserted or removed anywhere).
    #[test]
    fn fast_path_never_disagrees_with_the_general_parser(
        pixels in proptest::collection::vec(0u8..=255, 784),
        at in any::<prop::sample::Index>(),
        byte in prop::sample::select(b" ,:[]{}\".0123456789-e+imagex\n".to_vec()),
        how in 0u8..4,
    ) {
        let list: Vec<String> = pixels.iter().map(|p| p.to_string()).collect();
        let mut body = format!("{{\"image\":[{}]}}", list.join(",")).into_bytes();
        let i = at.index(body.len());
        match how {
            0 => body[i] = byte,
            1 => body.insert(i, byte),
            2 => { body.remove(i); }
            _ => {}
        }
        if let Some(fast) = fast_single_image(&body) {
            let slow = parse_json(&body).and_then(|j| parse_predict(&j, 8));
            prop_assert!(slow.is_ok(), "fast path accepted what the parser refuses: {:?}", slow.err());
            let slow = slow.unwrap();
            prop_assert!(slow.single && slow.n == 1);
            prop_assert_eq!(fast, slow.pixels);
        }
    }

    #[test]
    fn one_bad_pixel_is_named_by_index(
        index in 0usize..784,
        bad in prop_oneof![
            (256i64..100_000).prop_map(|v| v.to_string()),
            (-100_000i64..0).prop_map(|v| v.to_string()),
            Just("\"7\"".to_string()),
            Just("null".to_string()),
            Just("[]".to_string()),
            Just("{}".to_string()),
            Just("255.5".to_string()),
        ],
    ) {
        let mut list = vec!["0".to_string(); 784];
        list[index] = bad.clone();
        let body = format!("{{\"image\":[{}]}}", list.join(","));
        let err = parse_predict(&parse_json(body.as_bytes()).unwrap(), 8).unwrap_err();
        prop_assert_eq!(err.status().as_u16(), 422);
        let needle = format!("image[{index}]");
        prop_assert!(err.to_string().contains(&needle), "{} lacks {}", err, needle);
    }

    #[test]
    fn resize_stays_within_the_input_range(
        (h, w, plane) in (1usize..40, 1usize..40).prop_flat_map(|(h, w)| {
            (Just(h), Just(w), proptest::collection::vec(-1000f32..1000f32, h * w))
        }),
        out_h in 1usize..80,
        out_w in 1usize..80,
    ) {
        let out = resize_bilinear(&plane, h, w, out_h, out_w);
        prop_assert_eq!(out.len(), out_h * out_w);
        let lo = plane.iter().cloned().fold(f32::INFINITY, f32::min);
        let hi = plane.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let slack = 1e-3 * (1.0 + lo.abs().max(hi.abs()));
        for v in &out {
            prop_assert!(v.is_finite() && *v >= lo - slack && *v <= hi + slack, "{} outside {}..{}", v, lo, hi);
        }
        if (out_h, out_w) == (h, w) {
            prop_assert_eq!(out, plane);
        }
    }

    #[test]
    fn rgb_batches_replicate_one_plane(
        images in proptest::collection::vec(proptest::collection::vec(0f32..=1f32, 784), 1..4),
        size in 28usize..100,
    ) {
        let flat: Vec<f32> = images.concat();
        let t = batch_from_unit(&flat, InputLayout::Rgb { size }, &Device::Cpu).unwrap();
        prop_assert_eq!(t.dims(), &[images.len(), 3, size, size]);
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let plane = size * size;
        for img in 0..images.len() {
            let base = img * 3 * plane;
            prop_assert_eq!(&v[base..base + plane], &v[base + plane..base + 2 * plane]);
            prop_assert_eq!(&v[base..base + plane], &v[base + 2 * plane..base + 3 * plane]);
            prop_assert!(v[base..base + plane].iter().all(|x| (-1e-6..=1.0 + 1e-6).contains(x)));
        }
    }
}
