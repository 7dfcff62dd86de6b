//! Property-based fuzzing of what a client controls: request bytes → JSON → validated pixels,
//! and the preprocessing those pixels go through. Case counts follow `PROPTEST_CASES`
//! (256 by default; `make fuzz` runs many more for a bounded time).

use super::api::{fast_single_image, parse_infer, parse_json, parse_predict};
use super::error::ApiError;
use crate::preprocess::{batch_from_unit, resize_bilinear, InputLayout};
use candle_core::Device;
use proptest::prelude::*;

/// Every decoding failure must be a client error, never a panic or a 5xx.
fn is_client_error(e: &ApiError) -> bool {
    e.status().is_client_error()
}

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
                for r in [parse_predict(&j, 8).err(), parse_infer(&j, 8).err()].into_iter().flatten() {
                    prop_assert!(is_client_error(&r), "{r}");
                }
            }
            Err(e) => prop_assert_eq!(e.status().as_u16(), 400),
        }
    }

    #[test]
    fn jsonish_text_never_panics(text in jsonish()) {
        if let Ok(j) = parse_json(text.as_bytes()) {
            if let Err(e) = parse_predict(&j, 8) {
                prop_assert!(is_client_error(&e), "{e}");
            }
            if let Err(e) = parse_infer(&j, 8) {
                prop_assert!(is_client_error(&e), "{e}");
            }
        }
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
