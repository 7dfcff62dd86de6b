//! Hostile and broken requests, table-driven: each gets its specific 4xx (with a JSON message
//! wherever fmnist's code answers; hyper itself answers malformed HTTP) and the server stays
//! healthy. `cargo test --release --test hostile -- --nocapture` prints the table that
//! RELIABILITY.md records.

mod common;

use common::*;
use std::io::{Read, Write};
use std::time::Duration;

struct Case {
    name: &'static str,
    request: Vec<u8>,
    status: u16,
    /// Text the JSON `error` must contain; `None` when hyper answers (no JSON body).
    message: Option<&'static str>,
}

fn post(path: &str, ctype: Option<&str>, body: &str) -> Vec<u8> {
    request("POST", path, Some(&basic(USER, PASSWORD)), ctype, body)
}

fn predict(body: &str) -> Vec<u8> {
    post("/predict", Some("application/json"), body)
}

fn infer(body: &str) -> Vec<u8> {
    post(
        "/v2/models/fmnist-cnn/infer",
        Some("application/json"),
        body,
    )
}

/// A binary-extension infer request: `header` is the Inference-Header-Content-Length value
/// (None: no header), `ctype` the Content-Type.
fn binary(path: &str, header: Option<&str>, ctype: Option<&str>, body: &[u8]) -> Vec<u8> {
    let mut headers = vec![("Authorization", basic(USER, PASSWORD))];
    if let Some(h) = header {
        headers.push(("Inference-Header-Content-Length", h.to_string()));
    }
    if let Some(c) = ctype {
        headers.push(("Content-Type", c.to_string()));
    }
    request_bytes("POST", path, &headers, body)
}

/// The JSON header of a binary request for a [1,784] input of `size` bytes, then `tail`.
fn framed(size: i64, tail: &[u8]) -> (Vec<u8>, String) {
    let head = format!(
        "{{\"inputs\":[{{\"name\":\"input\",\"shape\":[1,784],\"datatype\":\"FP32\",\"parameters\":{{\"binary_data_size\":{size}}}}}]}}"
    );
    let mut body = head.clone().into_bytes();
    body.extend_from_slice(tail);
    (body, head.len().to_string())
}

fn pixels(n: usize, v: &str) -> String {
    vec![v; n].join(",")
}

fn with_auth(auth: &[u8]) -> Vec<u8> {
    let body = format!("{{\"image\":[{}]}}", pixels(784, "0"));
    let mut r =
        b"POST /predict HTTP/1.1\r\nHost: t\r\nConnection: close\r\nAuthorization: ".to_vec();
    r.extend_from_slice(auth);
    r.extend_from_slice(
        format!(
            "\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    r
}

fn chunked(total: usize) -> Vec<u8> {
    let mut r = format!(
        "POST /predict HTTP/1.1\r\nHost: t\r\nConnection: close\r\nAuthorization: {}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
        basic(USER, PASSWORD)
    )
    .into_bytes();
    let chunk = vec![b' '; 64 * 1024];
    let mut sent = 0;
    while sent < total {
        r.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        r.extend_from_slice(&chunk);
        r.extend_from_slice(b"\r\n");
        sent += chunk.len();
    }
    r.extend_from_slice(b"0\r\n\r\n");
    r
}

fn upload(ctype: &str, body: &[u8]) -> Vec<u8> {
    let headers = [
        ("Authorization", basic(USER, PASSWORD)),
        ("Content-Type", ctype.to_string()),
    ];
    request_bytes("POST", "/predict", &headers, body)
}

/// A GIF whose screen and first frame claim 65535 x 65535 pixels (12 KiB of header).
fn gif_bomb() -> Vec<u8> {
    let mut g = b"GIF89a\xff\xff\xff\xff\x00\x00\x00".to_vec();
    g.extend_from_slice(b"\x2c\x00\x00\x00\x00\xff\xff\xff\xff\x00\x02\x02\x4c\x01\x00\x3b");
    g
}

fn form_body(field: &str, file: &[u8]) -> Vec<u8> {
    let mut b = format!(
        "--hostile-boundary\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"a.png\"\r\n\r\n"
    )
    .into_bytes();
    b.extend_from_slice(file);
    b.extend_from_slice(b"\r\n--hostile-boundary--\r\n");
    b
}

fn cases() -> Vec<Case> {
    let ok_image = format!("[{}]", pixels(784, "0"));
    let photo = |f: &str| std::fs::read(repo().join("fixtures/images").join(f)).unwrap();
    let (jpg, png) = (photo("sneaker.jpg"), photo("trouser.png"));
    let form_type = "multipart/form-data; boundary=hostile-boundary".to_string();
    // 17 MB announced, only 64 KB sent: refused from Content-Length.
    let mut huge_image = upload("image/png", &vec![0u8; 17 << 20]);
    huge_image.truncate(huge_image.len() - ((17 << 20) - (64 << 10)));
    let bytes_head = "{\"inputs\":[{\"name\":\"i\",\"shape\":[1],\"datatype\":\"BYTES\",\"parameters\":{\"binary_data_size\":8}}]}";
    let mut bytes_framed = bytes_head.as_bytes().to_vec();
    bytes_framed.extend_from_slice(&1000u32.to_le_bytes());
    bytes_framed.extend_from_slice(b"abcd");
    let bytes_len = bytes_head.len().to_string();
    let mut header_flood = String::from("GET /v2/health/live HTTP/1.1\r\nHost: t\r\n");
    for i in 0..300 {
        header_flood.push_str(&format!("X-Flood-{i}: {i}\r\n"));
    }
    header_flood.push_str("Connection: close\r\n\r\n");
    // A 10 MB body is announced; the server answers 413 from Content-Length without reading
    // it, so only its first 64 KB are sent.
    let mut ten_mb = predict(&format!("{{\"image\":[{}]}}", " ".repeat(10 * 1024 * 1024)));
    ten_mb.truncate(ten_mb.len() - (10 * 1024 * 1024 - 64 * 1024));
    let deep = format!(
        "{{\"image\":{}{}}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let batch = format!(
        "{{\"images\":[{}]}}",
        vec![ok_image.as_str(); 257].join(",")
    );
    let infer_body = |shape: &str, datatype: &str, data: &str| {
        format!(
            "{{\"inputs\":[{{\"name\":\"pixels\",\"shape\":{shape},\"datatype\":\"{datatype}\",\"data\":{data}}}]}}"
        )
    };
    let unit = format!("[{}]", pixels(784, "0.5"));
    let image: Vec<u8> = vec![0.5f32; 784]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let v2 = "/v2/models/fmnist-cnn/infer";
    let (ok_framed, ok_len) = framed(3136, &image);
    let mut nan_image = image.clone();
    nan_image[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    let (nan_framed, nan_len) = framed(3136, &nan_image);
    let mut extra = image.clone();
    extra.extend_from_slice(&[0; 8]);
    let (extra_framed, extra_len) = framed(3136, &extra);
    let (lying, lying_len) = framed(5000, &image);
    let (short, short_len) = framed(3132, &image[..3132]);
    let (negative, negative_len) = framed(-8, &image);
    let cut_len = (ok_len.parse::<usize>().unwrap() - 5).to_string();
    // A 5 MB binary body is announced (over the 4 MiB limit); only its start is sent.
    let mut five_mb = binary(v2, Some(&ok_len), None, &vec![0u8; 5 * 1024 * 1024]);
    five_mb.truncate(five_mb.len() - (5 * 1024 * 1024 - 64 * 1024));
    let c = |name, request, status, message| Case {
        name,
        request,
        status,
        message,
    };
    vec![
        c("truncated JSON", predict("{\"image\": [1, 2"), 400, Some("malformed JSON")),
        c("empty body", predict(""), 400, Some("malformed JSON")),
        c("not JSON at all", predict("hello"), 400, Some("malformed JSON")),
        c("invalid UTF-8 in the body", not_utf8(), 400, Some("malformed JSON")),
        c("10 MB body", ten_mb, 413, Some("larger than the limit")),
        c("chunked body over the limit", chunked(5 * 1024 * 1024), 413, Some("larger than the limit")),
        c("deeply nested JSON", predict(&deep), 400, Some("recursion limit")),
        c("duplicate keys", predict(&format!("{{\"image\":{ok_image},\"image\":{ok_image}}}")), 400, Some("duplicate key")),
        c("body is an array", predict("[]"), 422, Some("JSON object")),
        c("image is a string", predict("{\"image\": \"pixels\"}"), 422, Some("must be an array")),
        c("image is an object", predict("{\"image\": {\"a\": 1}}"), 422, Some("must be an array")),
        c("image is null", predict("{\"image\": null}"), 422, Some("must be an array")),
        c("783 values", predict(&format!("{{\"image\":[{}]}}", pixels(783, "0"))), 422, Some("783 values")),
        c("785 values", predict(&format!("{{\"image\":[{}]}}", pixels(785, "0"))), 422, Some("785 values")),
        c("NaN", predict(&format!("{{\"image\":[NaN,{}]}}", pixels(783, "0"))), 400, Some("malformed JSON")),
        c("Infinity", predict(&format!("{{\"image\":[Infinity,{}]}}", pixels(783, "0"))), 400, Some("malformed JSON")),
        c("1e309", predict(&format!("{{\"image\":[1e309,{}]}}", pixels(783, "0"))), 400, Some("out of range")),
        c("-1", predict(&format!("{{\"image\":[{},-1]}}", pixels(783, "0"))), 422, Some("image[783] is -1")),
        c("256", predict(&format!("{{\"image\":[256,{}]}}", pixels(783, "0"))), 422, Some("image[0] is 256")),
        c("a string among the pixels", predict(&format!("{{\"image\":[{},\"7\"]}}", pixels(783, "0"))), 422, Some("image[783] is \"7\", not a number")),
        c("null among the pixels", predict(&format!("{{\"image\":[null,{}]}}", pixels(783, "0"))), 422, Some("image[0] is null")),
        c("images is empty", predict("{\"images\": []}"), 422, Some("empty")),
        c("images of numbers", predict("{\"images\": [1, 2]}"), 422, Some("images[0] must be an array")),
        c("257 images (limit 256)", predict(&batch), 422, Some("at most 256")),
        c("image and images", predict(&format!("{{\"image\":{ok_image},\"images\":[{ok_image}]}}")), 422, Some("not both")),
        c("neither image nor images", predict("{}"), 422, Some("needs \"image\"")),
        c("unknown field", predict(&format!("{{\"image\":{ok_image},\"debug\":true}}")), 422, Some("unknown field \"debug\"")),
        c("wrong content type", post("/predict", Some("text/plain"), "{}"), 415, Some("application/json")),
        c("no content type", post("/predict", None, "{}"), 415, Some("no Content-Type")),
        c("Authorization without a colon", with_auth(b"Basic dGVzdGVy"), 401, Some("authentication required")),
        c("Authorization with bad base64", with_auth(b"Basic %%%not-base64%%%"), 401, Some("authentication required")),
        c("Authorization with an empty user", with_auth(basic("", "pw").as_bytes()), 401, Some("authentication required")),
        c("Authorization not UTF-8", with_auth(&[b'B', b'a', b's', b'i', b'c', b' ', 0xff, 0xfe, 0x80]), 401, Some("authentication required")),
        c("Authorization scheme Bearer", with_auth(b"Bearer abc.def.ghi"), 401, Some("authentication required")),
        c("Authorization empty", with_auth(b""), 401, Some("authentication required")),
        c("unknown method", request("BREW", "/predict", None, None, ""), 405, Some("not allowed")),
        c("DELETE on a GET route", request("DELETE", "/v2/health/live", None, None, ""), 405, Some("not allowed")),
        c("path traversal in the route", request("GET", "/v2/models/../../etc/passwd", None, None, ""), 404, Some("no route")),
        c("path traversal in a model name", post("/v2/models/..%2F..%2Fetc%2Fpasswd/infer", Some("application/json"), "{}"), 404, Some("unknown model")),
        c("1,000-character model name", request("GET", &format!("/v2/models/{}/ready", "a".repeat(1000)), None, None, ""), 404, Some("unknown model")),
        c("v2 datatype INT8", infer(&infer_body("[1,784]", "INT8", &unit)), 422, Some("FP32")),
        c("v2 negative shape", infer(&infer_body("[-1,784]", "FP32", &unit)), 422, Some("non-negative integers")),
        c("v2 huge batch in shape", infer(&infer_body("[100000,784]", "FP32", &unit)), 422, Some("batch size")),
        c("v2 value above 1", infer(&infer_body("[1,784]", "FP32", &format!("[2,{}]", pixels(783, "0")))), 422, Some("within 0–1")),
        c("v2 data shorter than shape", infer(&infer_body("[2,784]", "FP32", &unit)), 422, Some("needs 1568")),
        c("v2 unknown output", infer(&format!("{{\"inputs\":[{{\"name\":\"pixels\",\"shape\":[1,784],\"datatype\":\"FP32\",\"data\":{unit}}}],\"outputs\":[{{\"name\":\"secrets\"}}]}}")), 422, Some("unknown output")),
        c("binary: header length past the body", binary(v2, Some("99999"), None, &ok_framed), 400, Some("Inference-Header-Content-Length is 99999")),
        c("binary: header length not a number", binary(v2, Some("12x"), None, &ok_framed), 400, Some("must be a byte count")),
        c("binary: header length cuts the JSON", binary(v2, Some(&cut_len), None, &ok_framed), 400, Some("malformed JSON")),
        c("binary: binary_data_size past the body", binary(v2, Some(&lying_len), None, &lying), 400, Some("binary_data_size is 5000")),
        c("binary: binary_data_size not the shape's", binary(v2, Some(&short_len), None, &short), 400, Some("3132 bytes")),
        c("binary: negative binary_data_size", binary(v2, Some(&negative_len), None, &negative), 400, Some("must be a byte count")),
        c("binary: bytes left over", binary(v2, Some(&extra_len), None, &extra_framed), 400, Some("8 bytes of binary data are left over")),
        c("binary: NaN pixel", binary(v2, Some(&nan_len), None, &nan_framed), 422, Some("data[0] is NaN")),
        c("binary: octet-stream without the header", binary(v2, None, Some("application/octet-stream"), &ok_framed), 400, Some("needs the Inference-Header-Content-Length")),
        c("binary: raw request of the wrong size", binary(v2, Some("0"), None, &image[..1000]), 400, Some("1000 bytes")),
        c("binary: body over the limit", five_mb, 413, Some("larger than the limit")),
        c("v2: text/plain body", binary(v2, None, Some("text/plain"), unit.as_bytes()), 415, Some("octet-stream")),
        c("v2: classification 11", infer(&format!("{{\"inputs\":[{{\"name\":\"pixels\",\"shape\":[1,784],\"datatype\":\"FP32\",\"data\":{unit}}}],\"outputs\":[{{\"name\":\"logits\",\"parameters\":{{\"classification\":11}}}}]}}")), 422, Some("within 1–10")),
        c("v2: id not a string", infer(&format!("{{\"id\":5,\"inputs\":[{{\"name\":\"pixels\",\"shape\":[1,784],\"datatype\":\"FP32\",\"data\":{unit}}}]}}")), 422, Some("must be a string")),
        c("v2: unknown version", binary("/v2/models/fmnist-cnn/versions/9/infer", Some(&ok_len), None, &ok_framed), 404, Some("unknown version '9'")),
        c("image: truncated JPEG", upload("image/jpeg", &jpg[..jpg.len() / 2]), 422, Some("JPEG file is truncated")),
        c("image: truncated PNG", upload("image/png", &png[..png.len() / 2]), 422, Some("PNG file is corrupt or truncated")),
        c("image: GIF claiming 65535x65535 (bomb)", upload("image/gif", &gif_bomb()), 413, Some("GIF image is too large")),
        c("image: TIFF", upload("image/tiff", b"II*\0\x08\0\0\0rest"), 415, Some("Tiff")),
        c("image: text labelled image/png", upload("image/png", b"hello there"), 415, Some("accepted formats are PNG, JPEG, WebP, GIF and BMP")),
        c("image: empty body", upload("image/png", b""), 415, Some("the file is empty")),
        c("image: body over --max-image-bytes", huge_image, 413, Some("larger than the limit of 16777216")),
        c("image: bad preview flag", post("/predict?preview=yes", Some("image/png"), "x"), 400, Some("query parameter preview")),
        c("image: unknown query parameter", post("/predict?previw=true", Some("image/png"), "x"), 400, Some("unknown query parameter \"previw\"")),
        c("form: no boundary", upload("multipart/form-data", b"--x\r\n"), 400, Some("boundary")),
        c("form: wrong field name", upload(&form_type, &form_body("photo", &png)), 422, Some("unknown form field \"photo\"")),
        c("form: garbage", upload(&form_type, b"not a form"), 400, Some("malformed multipart")),
        c("form: no file part", upload(&form_type, b"--hostile-boundary--\r\n"), 422, Some("no \"file\" part")),
        c("form: a file that is not an image", upload(&form_type, &form_body("file", b"GIF89a junk")), 422, Some("GIF file is corrupt")),
        c("base64: not base64", predict("{\"image_base64\": \"%%%\"}"), 422, Some("not valid base64")),
        c("base64: a number", predict("{\"image_base64\": 5}"), 422, Some("must be a base64 string")),
        c("base64: empty list", predict("{\"images_base64\": []}"), 422, Some("is empty")),
        c("base64: beside pixels", predict(&format!("{{\"image\": {ok_image}, \"image_base64\": \"AA==\"}}")), 422, Some("give one of")),
        c("v2 BYTES: shape [1,784]", infer("{\"inputs\":[{\"name\":\"i\",\"shape\":[1,784],\"datatype\":\"BYTES\",\"data\":[\"AA==\"]}]}"), 422, Some("[N] or [N,1]")),
        c("v2 BYTES: element not a string", infer("{\"inputs\":[{\"name\":\"i\",\"shape\":[1],\"datatype\":\"BYTES\",\"data\":[5]}]}"), 422, Some("base64 strings of image files")),
        c("v2 BYTES: element not an image", infer("{\"inputs\":[{\"name\":\"i\",\"shape\":[1],\"datatype\":\"BYTES\",\"data\":[\"aGVsbG8=\"]}]}"), 415, Some("not an image")),
        c("v2 BYTES: binary length past the end", binary(v2, Some(&bytes_len), None, &bytes_framed), 400, Some("declares 1000 bytes")),
        c("header flood (300 headers)", header_flood.into_bytes(), 431, None),
        c("garbage request line", b"GARBAGE\r\n\r\n".to_vec(), 400, None),
        c("non-numeric Content-Length", b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Length: abc\r\n\r\n".to_vec(), 400, None),
    ]
}

/// A body whose string holds bytes that are not UTF-8.
fn not_utf8() -> Vec<u8> {
    let mut r = predict("{\"image\": \"@@\"}");
    let at = r.windows(2).position(|w| w == b"@@").unwrap();
    r[at] = 0xff;
    r[at + 1] = 0xfe;
    r
}

#[test]
fn hostile_requests_get_their_4xx_and_leave_the_server_healthy() {
    let s = Server::start(&["--auth-max-failures", "1000"]);
    let cases = cases();
    assert!(cases.len() >= 30);
    let mut failures = Vec::new();
    println!("| # | request | status | error |");
    println!("|---|---|---|---|");
    for (i, case) in cases.iter().enumerate() {
        let r = raw(&s.addr, &case.request);
        let error = if r.status >= 400 && case.message.is_some() {
            serde_json::from_str::<serde_json::Value>(&r.body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
        } else {
            None
        };
        let shown = error
            .clone()
            .unwrap_or_else(|| "(answered by hyper, no body)".into());
        let shown: String = shown.chars().take(90).collect();
        println!("| {} | {} | {} | {} |", i + 1, case.name, r.status, shown);
        if r.status != case.status {
            failures.push(format!(
                "{}: status {} (wanted {}): {}",
                case.name, r.status, case.status, r.body
            ));
            continue;
        }
        if let Some(want) = case.message {
            match &error {
                Some(e) if e.contains(want) => {}
                _ => failures.push(format!("{}: body {:?} lacks {want:?}", case.name, r.body)),
            }
            if r.header("content-type").as_deref() != Some("application/json") {
                failures.push(format!("{}: not application/json", case.name));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Still healthy: ready, and a real prediction is right.
    assert_eq!(get(&s, "/v2/health/ready", false).status, 200);
    let (images, labels) = fixture();
    let r = post_to(
        &s.addr,
        "/predict",
        &format!("{{\"image\":{:?}}}", images[2]),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["label"], labels[2] as u64);
}

#[test]
fn idle_and_slow_connections_do_not_stop_the_server_answering_others() {
    // About the header timeout, so without the per-address connection limit (which would
    // refuse most of these at once; tests/slow_body.rs covers it).
    let s = Server::start(&[
        "--header-read-timeout-ms",
        "2000",
        "--max-connections-per-ip",
        "0",
    ]);
    // 200 idle connections plus 20 that send one header byte every 100 ms.
    let idle: Vec<_> = (0..200)
        .map(|_| std::net::TcpStream::connect(&s.addr).unwrap())
        .collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let dribblers: Vec<_> = (0..20)
        .map(|_| {
            let addr = s.addr.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut c = std::net::TcpStream::connect(addr).unwrap();
                for b in b"GET /v2/health/live HTTP/1.1\r\nHost: slow\r\n" {
                    if stop.load(std::sync::atomic::Ordering::Relaxed)
                        || c.write_all(&[*b]).is_err()
                    {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let (images, _) = fixture();
    let body = format!("{{\"image\":{:?}}}", images[0]);
    for _ in 0..20 {
        let started = std::time::Instant::now();
        let r = post_to(&s.addr, "/predict", &body);
        assert_eq!(r.status, 200);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }
    // The slow senders are cut off by the header timeout; their sockets get closed.
    std::thread::sleep(Duration::from_millis(2500));
    let mut cut = 0;
    for mut c in idle {
        c.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut buf = [0u8; 64];
        if matches!(c.read(&mut buf), Ok(0)) {
            cut += 1;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for d in dribblers {
        d.join().unwrap();
    }
    assert_eq!(
        cut, 200,
        "idle connections should be closed by the header timeout"
    );
    assert_eq!(get(&s, "/v2/health/ready", false).status, 200);
}

fn metric(s: &Server, name: &str) -> f64 {
    get(s, "/metrics", false)
        .body
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metric {name}"))
}

#[test]
fn overload_is_shed_by_the_image_budget_and_abandoned_requests_are_not_run() {
    let (images, _) = fixture();
    let batch: Vec<&[u8]> = images.iter().take(256).map(|i| i.as_slice()).collect();
    let body = format!("{{\"images\":{batch:?}}}");
    // Budget 512 images: of 12 concurrent 256-image requests, some must be refused at once.
    let s = Server::start(&["--max-queued-images", "512", "--max-queue-delay-us", "0"]);
    let handles: Vec<_> = (0..12)
        .map(|_| {
            let (addr, body) = (s.addr.clone(), body.clone());
            std::thread::spawn(move || post_to(&addr, "/predict", &body))
        })
        .collect();
    let statuses: Vec<u16> = handles
        .into_iter()
        .map(|h| h.join().unwrap().status)
        .collect();
    assert!(
        statuses.contains(&503) && statuses.contains(&200),
        "{statuses:?}"
    );
    assert!(
        statuses.iter().all(|&c| c == 200 || c == 503),
        "{statuses:?}"
    );
    drop(s);

    // Clients that hang up while queued: their requests are dropped, not run.
    let s = Server::start(&["--max-queue-delay-us", "0"]);
    let request = request(
        "POST",
        "/predict",
        Some(&basic(USER, PASSWORD)),
        Some("application/json"),
        &body,
    );
    let mut gone = Vec::new();
    for _ in 0..16 {
        let mut c = std::net::TcpStream::connect(&s.addr).unwrap();
        c.write_all(&request).unwrap();
        gone.push(c);
    }
    // Hang up once some of them are queued (not on a fixed delay: on a loaded machine 50 ms
    // may end before any body is even parsed, and then nothing is queued to abandon).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while metric(&s, "fmnist_queue_depth") < 2.0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(gone);
    std::thread::sleep(Duration::from_millis(3000));
    let abandoned = metric(&s, "fmnist_abandoned_requests_total");
    assert!(abandoned >= 1.0, "no abandoned request was dropped");
    assert_eq!(metric(&s, "fmnist_queue_depth"), 0.0);
    // And the server still answers normally.
    let r = post_to(
        &s.addr,
        "/predict",
        &format!("{{\"image\":{:?}}}", images[0]),
    );
    assert_eq!(r.status, 200);
}
