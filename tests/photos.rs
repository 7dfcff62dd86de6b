//! Photos through the real server: the 400 fixture images made to look like product photos
//! (dark item on white, scaled to 120–400 px, off-centre on a non-square canvas, PNG and
//! JPEG quality 80) must get the class the model gives their original 784 pixels on at least
//! 95 % of them, with accuracy at least 0.90; and the three ways of uploading (raw body,
//! multipart form, base64 JSON) plus the bad-file cases answer as documented.

mod common;
use common::*;
use image::{DynamicImage, GrayImage, ImageFormat, Luma};
use std::io::Cursor;

/// A small deterministic generator (SplitMix64), so every run builds the same photos.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn range(&mut self, lo: u32, hi: u32) -> u32 {
        lo + (self.next() % u64::from(hi - lo + 1)) as u32
    }
}

/// The product-photo version of a fixture image.
fn photo(pixels: &[u8], rng: &mut Rng) -> GrayImage {
    let inverted = GrayImage::from_fn(28, 28, |x, y| Luma([255 - pixels[(y * 28 + x) as usize]]));
    let side = rng.range(120, 400);
    let item = image::imageops::resize(
        &inverted,
        side,
        side,
        image::imageops::FilterType::CatmullRom,
    );
    let (w, h) = (side + rng.range(10, 300), side + rng.range(10, 150));
    let mut canvas = GrayImage::from_pixel(w, h, Luma([255]));
    let (x, y) = (rng.range(0, w - side), rng.range(0, h - side));
    image::imageops::replace(&mut canvas, &item, i64::from(x), i64::from(y));
    canvas
}

fn encode(img: &GrayImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Vec::new();
    let dynamic = DynamicImage::ImageLuma8(img.clone());
    match format {
        ImageFormat::Jpeg => {
            let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 80);
            dynamic.write_with_encoder(enc).unwrap();
        }
        _ => dynamic
            .write_to(&mut Cursor::new(&mut out), format)
            .unwrap(),
    }
    out
}

fn post_file(server: &Server, path: &str, ctype: &str, body: &[u8]) -> Raw {
    let headers = [
        ("Authorization", basic(USER, PASSWORD)),
        ("Content-Type", ctype.to_string()),
    ];
    raw(&server.addr, &request_bytes("POST", path, &headers, body))
}

/// A multipart/form-data body with one `file` part per image.
fn form(files: &[Vec<u8>]) -> (String, Vec<u8>) {
    let boundary = "fmnist-test-boundary-7d2a";
    let mut body = Vec::new();
    for (i, f) in files.iter().enumerate() {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"p{i}.png\"\r\nContent-Type: image/png\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(f);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

fn label_of(v: &serde_json::Value) -> u64 {
    v["label"]
        .as_u64()
        .unwrap_or_else(|| panic!("no label in {v}"))
}

#[test]
fn product_photos_get_the_class_of_their_original_pixels() {
    let server = Server::start(&[]);
    let (images, labels) = fixture();
    // The class of each original, in batches of 100 through the JSON pixel route.
    let mut original = Vec::new();
    for chunk in images.chunks(100) {
        let r = post(&server, "/predict", &serde_json::json!({ "images": chunk }));
        assert_eq!(r.status, 200, "{}", r.body);
        original.extend(
            r.json()["predictions"]
                .as_array()
                .unwrap()
                .iter()
                .map(label_of),
        );
    }
    let mut rng = Rng(2026);
    let photos: Vec<GrayImage> = images.iter().map(|p| photo(p, &mut rng)).collect();
    for (format, ctype) in [
        (ImageFormat::Png, "image/png"),
        (ImageFormat::Jpeg, "image/jpeg"),
    ] {
        let files: Vec<Vec<u8>> = photos.iter().map(|p| encode(p, format)).collect();
        let mut got = Vec::new();
        // PNG as raw bodies one at a time; JPEG as multipart forms of 20 files. The label is
        // always image/png in the form: the content decides.
        if format == ImageFormat::Png {
            for f in &files {
                let r = post_file(&server, "/predict", ctype, f);
                assert_eq!(r.status, 200, "{}", r.body);
                got.push(label_of(&r.json()));
            }
        } else {
            for chunk in files.chunks(20) {
                let (ctype, body) = form(chunk);
                let r = post_file(&server, "/predict", &ctype, &body);
                assert_eq!(r.status, 200, "{}", r.body);
                got.extend(
                    r.json()["predictions"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(label_of),
                );
            }
        }
        let same = got.iter().zip(&original).filter(|(a, b)| a == b).count();
        let right = got
            .iter()
            .zip(&labels)
            .filter(|(a, b)| **a == u64::from(**b))
            .count();
        let (agree, acc) = (same as f64 / 400.0, right as f64 / 400.0);
        eprintln!("{ctype}: agreement with the original pixels {agree:.4}, accuracy {acc:.4}");
        assert!(agree >= 0.95, "{ctype}: agreement {agree}");
        assert!(acc >= 0.90, "{ctype}: accuracy {acc}");
    }
}

#[test]
fn base64_preview_and_bad_files() {
    use base64::Engine;
    let server = Server::start(&["--max-image-side", "4000"]);
    let (images, _) = fixture();
    let mut rng = Rng(7);
    let png = encode(&photo(&images[0], &mut rng), ImageFormat::Png);
    let jpg = encode(&photo(&images[1], &mut rng), ImageFormat::Jpeg);
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);

    // base64, single and batch, with the data-URL prefix a browser gives; and the preview.
    let r = post(
        &server,
        "/predict?preview=true",
        &serde_json::json!({ "image_base64": format!("data:image/png;base64,{}", b64(&png)) }),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    let seen = v["input"].as_array().unwrap();
    assert_eq!(seen.len(), 784);
    assert!(seen.iter().all(|p| p.as_u64().unwrap() <= 255));
    let raw_single = post_file(&server, "/predict", "image/png", &png).json();
    assert_eq!(v["label"], raw_single["label"]);
    assert!(raw_single.get("input").is_none());
    let r = post(
        &server,
        "/predict",
        &serde_json::json!({ "images_base64": [b64(&png), b64(&jpg)] }),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["predictions"].as_array().unwrap().len(), 2);

    // One status per bad case, each naming the format.
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("image/jpeg", jpg[..jpg.len() / 2].to_vec(), 422, "JPEG"),
        ("image/png", png[..png.len() / 2].to_vec(), 422, "PNG"),
        ("image/png", b"II*\0\x08\0\0\0rest".to_vec(), 415, "Tiff"),
        (
            "image/png",
            b"not an image at all".to_vec(),
            415,
            "PNG, JPEG, WebP",
        ),
        ("image/png", huge_png(), 413, "PNG"),
        ("text/plain", png.clone(), 415, "image/png"),
    ];
    for (ctype, body, status, needle) in cases {
        let r = post_file(&server, "/predict", ctype, &body);
        assert_eq!(r.status, status, "{ctype} {needle}: {}", r.body);
        let msg = r.json()["error"].as_str().unwrap().to_string();
        assert!(msg.contains(needle), "{msg}");
    }
    let r = post(
        &server,
        "/predict",
        &serde_json::json!({ "image_base64": "%%%" }),
    );
    assert_eq!(r.status, 422);
    assert!(r.body.contains("not valid base64"), "{}", r.body);
    let r = post_file(&server, "/predict?preview=maybe", "image/png", &png);
    assert_eq!(r.status, 400, "{}", r.body);
    // The server is still serving after all of that.
    assert_eq!(
        post_file(&server, "/predict", "image/png", &png).status,
        200
    );
}

/// A real 5000×5000 PNG (all white: small to send), over `--max-image-side 4000`.
fn huge_png() -> Vec<u8> {
    encode(
        &GrayImage::from_pixel(5000, 5000, Luma([255])),
        ImageFormat::Png,
    )
}

#[test]
fn image_bodies_have_their_own_size_limit() {
    let server = Server::start(&["--max-image-bytes", "2000", "--max-body-bytes", "100000"]);
    let (images, _) = fixture();
    let png = encode(&photo(&images[0], &mut Rng(1)), ImageFormat::Png);
    assert!(png.len() > 2000);
    let r = post_file(&server, "/predict", "image/png", &png);
    assert_eq!(r.status, 413, "{}", r.body);
    assert!(r.body.contains("2000"), "{}", r.body);
    // The same bytes fit the JSON limit as base64.
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&png);
    let r = post(
        &server,
        "/predict",
        &serde_json::json!({ "image_base64": b64 }),
    );
    assert_eq!(r.status, 200, "{}", r.body);
}

/// The sample photos under fixtures/images/ (named by their class) through
/// `fmnist-train predict` and the server, which must agree with each other and the name.
#[test]
fn committed_photos_get_their_class_from_the_cli_and_the_server() {
    let dir = repo().join("fixtures/images");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 3);
    let expected = |p: &std::path::Path| {
        let stem = p.file_stem().unwrap().to_string_lossy().replace('-', " ");
        let mut c = stem.chars();
        c.next()
            .unwrap()
            .to_uppercase()
            .chain(c)
            .collect::<String>()
    };
    let out = std::process::Command::new(train_binary())
        .arg("predict")
        .arg("--json")
        .arg("--model")
        .arg(shipped_model())
        .args(&files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), files.len());
    let server = Server::start(&[]);
    for (f, line) in files.iter().zip(&lines) {
        assert_eq!(line["class"], expected(f), "{}", f.display());
        // Labelled image/jpeg whatever the format: the content decides.
        let r = post_file(
            &server,
            "/predict",
            "image/jpeg",
            &std::fs::read(f).unwrap(),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["class"], line["class"], "{}", f.display());
    }
    // A file that is not an image is named, the others still classified, exit status 1.
    let out = std::process::Command::new(train_binary())
        .args(["predict", "--model"])
        .arg(shipped_model())
        .arg(repo().join("README.md"))
        .arg(&files[0])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("README.md") && err.contains("not an image"),
        "{err}"
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
}

/// The v2 infer route takes a BYTES input of encoded images: base64 strings in JSON, and
/// length-prefixed elements in the binary extension; both give /predict's classes.
#[test]
fn v2_bytes_inputs_carry_image_files() {
    use base64::Engine;
    let server = Server::start(&[]);
    let files: Vec<Vec<u8>> = ["sneaker.jpg", "trouser.png"]
        .iter()
        .map(|f| std::fs::read(repo().join("fixtures/images").join(f)).unwrap())
        .collect();
    let want: Vec<u64> = files
        .iter()
        .map(|f| label_of(&post_file(&server, "/predict", "image/png", f).json()))
        .collect();
    let argmax = |row: &[serde_json::Value]| {
        (0..10)
            .max_by(|&a, &b| row[a].as_f64().partial_cmp(&row[b].as_f64()).unwrap())
            .unwrap() as u64
    };
    let path = "/v2/models/fmnist-cnn/infer";
    let b64: Vec<String> = files
        .iter()
        .map(|f| base64::engine::general_purpose::STANDARD.encode(f))
        .collect();
    let body = serde_json::json!({
        "inputs": [{"name": "images", "shape": [2], "datatype": "BYTES", "data": b64}],
        "outputs": [{"name": "logits"}]
    });
    let r = post(&server, path, &body);
    assert_eq!(r.status, 200, "{}", r.body);
    let data = r.json()["outputs"][0]["data"].as_array().unwrap().clone();
    assert_eq!(vec![argmax(&data[..10]), argmax(&data[10..])], want);

    // Binary extension: each element a 4-byte little-endian length, then the file.
    let mut section = Vec::new();
    for f in &files {
        section.extend_from_slice(&(f.len() as u32).to_le_bytes());
        section.extend_from_slice(f);
    }
    let head = serde_json::json!({
        "inputs": [{"name": "images", "shape": [2, 1], "datatype": "BYTES",
                    "parameters": {"binary_data_size": section.len()}}],
        "outputs": [{"name": "logits"}]
    });
    let (body, n) = binary_body(&head, &section);
    let r = post_binary(&server.addr, path, &body, Some(n));
    assert_eq!(r.status, 200, "{}", r.body);
    let data = r.json()["outputs"][0]["data"].as_array().unwrap().clone();
    assert_eq!(vec![argmax(&data[..10]), argmax(&data[10..])], want);

    // Framing and decoding errors keep their statuses.
    let mut short = section.clone();
    short.truncate(section.len() - 10);
    let head = serde_json::json!({
        "inputs": [{"name": "images", "shape": [2], "datatype": "BYTES",
                    "parameters": {"binary_data_size": short.len()}}]
    });
    let (body, n) = binary_body(&head, &short);
    let r = post_binary(&server.addr, path, &body, Some(n));
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("element 1"), "{}", r.body);
    let body = serde_json::json!({
        "inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": [b64[0][..100].to_string()]}]
    });
    let r = post(&server, path, &body);
    assert_eq!(r.status, 422, "{}", r.body);
    let body = serde_json::json!({
        "inputs": [{"name": "images", "shape": [1, 784], "datatype": "BYTES", "data": [b64[0]]}]
    });
    assert_eq!(post(&server, path, &body).status, 422);
}
