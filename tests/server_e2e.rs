//! End-to-end tests of `fmnist-serve`: the real binary, the shipped model, real HTTP on
//! loopback.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;

fn image_json(img: &[u8]) -> Value {
    json!(img)
}

#[test]
fn health_metadata_and_auth_boundaries() {
    let s = Server::start(&[]);
    // Open routes.
    for path in [
        "/v2/health/live",
        "/v2/health/ready",
        "/v2",
        "/metrics",
        "/openapi.json",
        "/v2/models/fmnist-cnn/ready",
    ] {
        let r = get(&s, path, false);
        assert_eq!(r.status, 200, "{path}: {}", r.body);
    }
    assert_eq!(get(&s, "/v2/health/ready", false).json()["ready"], true);
    // Model metadata needs auth.
    let r = get(&s, "/v2/models/fmnist-cnn", false);
    assert_eq!(r.status, 401);
    assert_eq!(
        r.header("www-authenticate").as_deref(),
        Some("Basic realm=\"fmnist\", charset=\"UTF-8\"")
    );
    assert!(r.json()["error"].is_string());
    let r = get(&s, "/v2/models/fmnist-cnn", true);
    assert_eq!(r.status, 200);
    let meta = r.json();
    assert_eq!(meta["name"], "fmnist-cnn");
    assert_eq!(meta["inputs"][0]["shape"], json!([-1, 1, 28, 28]));
    assert_eq!(meta["outputs"][0]["shape"], json!([-1, 10]));
    // Unknown model names are 404, also for traversal attempts.
    for path in ["/v2/models/other", "/v2/models/..%2F..%2Fetc%2Fpasswd"] {
        let r = get(&s, path, true);
        assert_eq!(r.status, 404, "{path}");
        assert!(r.json()["error"]
            .as_str()
            .unwrap()
            .contains("unknown model"));
    }
}

#[test]
fn authentication_cases() {
    let s = Server::start(&[]);
    let (images, _) = fixture();
    let body = json!({ "image": image_json(&images[0]) }).to_string();
    let cases: Vec<(Option<String>, u16)> = vec![
        (None, 401),
        (Some(basic(USER, "wrong")), 401),
        (Some(basic("nobody", PASSWORD)), 401),
        (Some("Basic not-base64!!".into()), 401),
        (Some("Bearer abcdef".into()), 401),
        (Some(format!("Basic {}", "dGVzdGVy")), 401), // "tester" without a colon
        (Some(basic(USER, PASSWORD)), 200),
        (Some(basic(USER, PASSWORD).replace("Basic", "basic")), 200),
    ];
    for (auth, want) in cases {
        let r = raw(
            &s.addr,
            &request(
                "POST",
                "/predict",
                auth.as_deref(),
                Some("application/json"),
                &body,
            ),
        );
        assert_eq!(r.status, want, "auth {auth:?}: {}", r.body);
        if want == 401 {
            assert!(r
                .header("www-authenticate")
                .unwrap()
                .starts_with("Basic realm=\"fmnist\""));
        }
    }
    // The password never reaches the logs, in clear or in base64.
    let logs = s.logs();
    assert!(!logs.contains(PASSWORD), "password in logs");
    assert!(
        !logs.contains(basic(USER, PASSWORD).trim_start_matches("Basic ")),
        "credentials in logs"
    );
}

#[test]
fn predictions_agree_with_fmnist_train_eval() {
    let s = Server::start(&[]);
    let (images, labels) = fixture();
    // What `fmnist-train eval` computes for the same file.
    let out = std::env::temp_dir().join(format!("fmnist-e2e-logits-{}.json", std::process::id()));
    let status = std::process::Command::new(train_binary())
        .args(["eval", "--model"])
        .arg(shipped_model())
        .arg("--data")
        .arg(repo().join("fixtures/sample.csv"))
        .arg("--logits-out")
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let eval: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let _ = std::fs::remove_file(&out);
    let eval_labels: Vec<usize> = eval["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            let v: Vec<f64> = row
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            (0..10).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap()
        })
        .collect();
    // Single-image requests for the first 40, one batch request for all 400.
    for (i, img) in images.iter().enumerate().take(40) {
        let r = post(&s, "/predict", &json!({ "image": image_json(img) }));
        assert_eq!(r.status, 200, "{}", r.body);
        let p = r.json();
        assert_eq!(
            p["label"].as_u64().unwrap() as usize,
            eval_labels[i],
            "image {i}"
        );
        assert_eq!(p["class"], fmnist::CLASS_NAMES[eval_labels[i]]);
        let probs = p["probabilities"].as_object().unwrap();
        assert_eq!(probs.len(), 10);
        let sum: f64 = probs.values().map(|v| v.as_f64().unwrap()).sum();
        assert!((sum - 1.0).abs() < 1e-4, "probabilities sum to {sum}");
        assert_eq!(p["confidence"], probs[fmnist::CLASS_NAMES[eval_labels[i]]]);
    }
    let all: Vec<Value> = images.iter().take(256).map(|i| image_json(i)).collect();
    let r = post(&s, "/predict", &json!({ "images": all }));
    assert_eq!(r.status, 200, "{}", r.body);
    let preds = r.json()["predictions"].as_array().unwrap().clone();
    assert_eq!(preds.len(), 256);
    let mut correct = 0;
    for (i, p) in preds.iter().enumerate() {
        let label = p["label"].as_u64().unwrap() as usize;
        assert_eq!(label, eval_labels[i], "batch position {i}");
        correct += usize::from(label == labels[i] as usize);
    }
    assert!(correct as f64 / 256.0 > 0.85, "only {correct}/256 right");
}

#[test]
fn batching_never_changes_an_answer() {
    // A long queue delay makes concurrent requests share forward passes.
    let s = Server::start(&["--max-queue-delay-us", "20000", "--max-batch-size", "16"]);
    let (images, _) = fixture();
    let solo: Vec<Value> = images[..24]
        .iter()
        .map(|img| post(&s, "/predict", &json!({ "image": image_json(img) })).json())
        .collect();
    // All 24 requests leave together, so that they overlap in the queue however slow the
    // machine is.
    let start = std::sync::Arc::new(std::sync::Barrier::new(24));
    let handles: Vec<_> = (0..24)
        .map(|i| {
            let addr = s.addr.clone();
            let body = json!({ "image": image_json(&images[i]) }).to_string();
            let start = std::sync::Arc::clone(&start);
            std::thread::spawn(move || {
                start.wait();
                let r = post_to(&addr, "/predict", &body);
                assert_eq!(r.status, 200);
                r.json()
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let together = h.join().unwrap();
        assert_eq!(together["label"], solo[i]["label"], "image {i}");
        for (name, p) in together["probabilities"].as_object().unwrap() {
            let q = solo[i]["probabilities"][name].as_f64().unwrap();
            assert!(
                (p.as_f64().unwrap() - q).abs() < 1e-5,
                "image {i} {name}: {p} vs {q}"
            );
        }
    }
    // The batcher did put several images in one pass.
    let metrics = get(&s, "/metrics", false).body;
    let line = metrics
        .lines()
        .find(|l| l.starts_with("fmnist_batch_size_bucket{le=\"1\"}"))
        .unwrap();
    let singles: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    let total: u64 = metrics
        .lines()
        .find(|l| l.starts_with("fmnist_batch_size_count"))
        .unwrap()
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        singles < total,
        "no batch held more than one image ({singles} of {total})"
    );
}

#[test]
fn open_inference_protocol_infer() {
    let s = Server::start(&[]);
    let (images, _) = fixture();
    let unit = |img: &[u8]| img.iter().map(|&p| p as f64 / 255.0).collect::<Vec<_>>();
    let expected: Vec<u64> = images[..3]
        .iter()
        .map(|img| {
            post(&s, "/predict", &json!({ "image": image_json(img) })).json()["label"]
                .as_u64()
                .unwrap()
        })
        .collect();
    let flat: Vec<f64> = images[..3].iter().flat_map(|i| unit(i)).collect();
    for shape in [json!([3, 784]), json!([3, 1, 28, 28])] {
        let req = json!({ "id": "abc", "inputs": [{ "name": "pixels", "shape": shape, "datatype": "FP32", "data": flat }],
                          "outputs": [{ "name": "logits" }, { "name": "probabilities" }] });
        let r = post(&s, "/v2/models/fmnist-cnn/infer", &req);
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json();
        assert_eq!(v["model_name"], "fmnist-cnn");
        assert_eq!(v["id"], "abc");
        let logits = &v["outputs"][0];
        assert_eq!(logits["name"], "logits");
        assert_eq!(logits["shape"], json!([3, 10]));
        let probs: Vec<f64> = v["outputs"][1]["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        for (row, want) in probs.chunks(10).zip(&expected) {
            assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-4);
            let arg = (0..10).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap() as u64;
            assert_eq!(arg, *want);
        }
    }
    let bad = json!({ "inputs": [{ "name": "pixels", "shape": [1, 783], "datatype": "FP32", "data": vec![0.0; 783] }] });
    assert_eq!(post(&s, "/v2/models/fmnist-cnn/infer", &bad).status, 422);
    let unknown = json!({ "inputs": [{ "name": "pixels", "shape": [1, 784], "datatype": "FP32", "data": vec![0.0; 784] }] });
    assert_eq!(post(&s, "/v2/models/nope/infer", &unknown).status, 404);
}

#[test]
fn every_error_status_is_json_with_the_right_status() {
    let s = Server::start(&["--max-body-bytes", "20000", "--max-images", "4"]);
    let (images, _) = fixture();
    let auth = basic(USER, PASSWORD);
    let ok_body = json!({ "image": image_json(&images[0]) }).to_string();
    let mut wrong_len = images[0].clone();
    wrong_len.pop();
    let mut out_of_range: Vec<Value> = images[0].iter().map(|&p| json!(p)).collect();
    out_of_range[100] = json!(300);
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (
            request(
                "POST",
                "/predict",
                Some(&auth),
                Some("application/json"),
                "{\"image\": [1, 2,",
            ),
            400,
            "malformed JSON",
        ),
        (
            request("GET", "/nowhere", Some(&auth), None, ""),
            404,
            "no route",
        ),
        (
            request("GET", "/predict", Some(&auth), None, ""),
            405,
            "not allowed",
        ),
        (
            request("POST", "/v2/health/live", None, None, ""),
            405,
            "not allowed",
        ),
        (
            request(
                "POST",
                "/predict",
                Some(&auth),
                Some("text/plain"),
                &ok_body,
            ),
            415,
            "Content-Type",
        ),
        (
            request("POST", "/predict", Some(&auth), None, &ok_body),
            415,
            "Content-Type",
        ),
        (
            request(
                "POST",
                "/predict",
                Some(&auth),
                Some("application/json"),
                &"x".repeat(30000),
            ),
            413,
            "limit of 20000",
        ),
        (
            request(
                "POST",
                "/predict",
                Some(&auth),
                Some("application/json"),
                &json!({ "image": wrong_len }).to_string(),
            ),
            422,
            "783 values",
        ),
        (
            request(
                "POST",
                "/predict",
                Some(&auth),
                Some("application/json"),
                &json!({ "image": out_of_range }).to_string(),
            ),
            422,
            "image[100]",
        ),
        (
            request(
                "POST",
                "/predict",
                Some(&auth),
                Some("application/json"),
                &json!({ "images": vec![json!([0]); 5] }).to_string(),
            ),
            422,
            "at most 4",
        ),
        (
            request(
                "POST",
                "/predict",
                Some(&auth),
                Some("application/json"),
                "[1,2,3]",
            ),
            422,
            "JSON object",
        ),
    ];
    for (req, status, text) in cases {
        let r = raw(&s.addr, &req);
        assert_eq!(
            r.status,
            status,
            "{}: {}",
            String::from_utf8_lossy(&req[..40.min(req.len())]),
            r.body
        );
        let msg = r.json()["error"].as_str().unwrap().to_string();
        assert!(msg.contains(text), "{status}: {msg:?} lacks {text:?}");
        assert_eq!(
            r.header("content-type").as_deref(),
            Some("application/json")
        );
        if status == 405 {
            assert!(r.header("allow").is_some());
        }
    }
    // A chunked body that grows past the limit is cut off at the limit.
    let mut chunked = format!(
        "POST /predict HTTP/1.1\r\nHost: t\r\nConnection: close\r\nAuthorization: {auth}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for _ in 0..10 {
        chunked.extend_from_slice(format!("{:x}\r\n{}\r\n", 5000, " ".repeat(5000)).as_bytes());
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let r = raw(&s.addr, &chunked);
    assert_eq!(r.status, 413);
    // And the server is still healthy.
    assert_eq!(get(&s, "/v2/health/live", false).status, 200);
}

#[test]
fn full_queue_answers_503_with_retry_after() {
    let s = Server::start(&[
        "--queue-capacity",
        "1",
        "--max-batch-size",
        "1",
        "--max-queue-delay-us",
        "0",
    ]);
    let (images, _) = fixture();
    let batch: Vec<Value> = images.iter().take(256).map(|i| image_json(i)).collect();
    let body = json!({ "images": batch }).to_string();
    let start = std::sync::Arc::new(std::sync::Barrier::new(12));
    let handles: Vec<_> = (0..12)
        .map(|_| {
            let addr = s.addr.clone();
            let body = body.clone();
            let start = std::sync::Arc::clone(&start);
            std::thread::spawn(move || {
                start.wait();
                post_to(&addr, "/predict", &body)
            })
        })
        .collect();
    let results: Vec<Raw> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let full: Vec<&Raw> = results.iter().filter(|r| r.status == 503).collect();
    assert!(
        !full.is_empty(),
        "no 503 among {:?}",
        results.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert!(results.iter().all(|r| r.status == 200 || r.status == 503));
    assert_eq!(full[0].header("retry-after").as_deref(), Some("1"));
    assert!(full[0].json()["error"].as_str().unwrap().contains("queue"));
}

#[test]
fn metrics_request_ids_and_openapi() {
    let s = Server::start(&[]);
    let (images, _) = fixture();
    post(&s, "/predict", &json!({ "image": image_json(&images[0]) }));
    let r = raw(&s.addr, &request("GET", "/v2/health/live", None, None, ""));
    assert!(r.header("x-request-id").is_some_and(|v| !v.is_empty()));
    let with_id = b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\nConnection: close\r\nx-request-id: my-id-42\r\n\r\n";
    assert_eq!(
        raw(&s.addr, with_id).header("x-request-id").as_deref(),
        Some("my-id-42")
    );
    let m = get(&s, "/metrics", false);
    assert!(m.header("content-type").unwrap().starts_with("text/plain"));
    for needle in [
        "fmnist_requests_total{protocol=\"http\",route=\"/predict\",status=\"200\"} 1",
        "fmnist_request_duration_seconds_bucket{protocol=\"http\",route=\"/predict\",le=\"+Inf\"} 1",
        "fmnist_batch_size_count",
        "fmnist_inference_seconds_count",
        "fmnist_queue_depth 0",
    ] {
        assert!(
            m.body.contains(needle),
            "metrics lack {needle}:\n{}",
            m.body
        );
    }
    // Every operation in the OpenAPI document is routed (never 404 or 405)...
    let doc = get(&s, "/openapi.json", false).json();
    let paths = doc["paths"].as_object().unwrap();
    let mut documented = Vec::new();
    for (path, ops) in paths {
        for method in ops.as_object().unwrap().keys() {
            let concrete = path
                .replace("{name}", "fmnist-cnn")
                .replace("{version}", "1");
            let r = raw(
                &s.addr,
                &request(
                    &method.to_uppercase(),
                    &concrete,
                    Some(&basic(USER, PASSWORD)),
                    Some("application/json"),
                    "{}",
                ),
            );
            assert!(
                r.status != 404 && r.status != 405,
                "{method} {path} -> {}",
                r.status
            );
            documented.push((method.to_uppercase(), path.clone()));
        }
    }
    // ... and every route the router knows is documented.
    for (method, path) in fmnist::server::http::openapi::ROUTES {
        assert!(
            documented.contains(&(method.to_string(), path.to_string())),
            "{method} {path} undocumented"
        );
    }
    assert_eq!(
        documented.len(),
        fmnist::server::http::openapi::ROUTES.len()
    );
}

#[test]
fn sigterm_finishes_in_flight_requests_and_exits_zero() {
    let s = Server::start(&[
        "--max-queue-delay-us",
        "300000",
        "--max-batch-size",
        "64",
        "--drain-delay-secs",
        "1",
    ]);
    let (images, _) = fixture();
    let body = json!({ "image": image_json(&images[0]) }).to_string();
    // This request waits ~300 ms in the batcher: SIGTERM arrives while it is in flight.
    let addr = s.addr.clone();
    let inflight = std::thread::spawn(move || post_to(&addr, "/predict", &body));
    std::thread::sleep(Duration::from_millis(100));
    let addr = s.addr.clone();
    let status = s.terminate(Duration::from_secs(20));
    assert!(status.success(), "exit status {status:?}");
    let r = inflight.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        std::net::TcpStream::connect(&addr).is_err(),
        "still accepting after exit"
    );
}

#[test]
fn refuses_to_start_without_credentials_or_with_a_bad_model() {
    let bin = env!("CARGO_BIN_EXE_fmnist-serve");
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut c = std::process::Command::new(bin);
        c.args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env_remove("FMNIST_BASIC_AUTH")
            .env_remove("FMNIST_CREDENTIALS_FILE");
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    let model = shipped_model();
    let model = model.to_str().unwrap();
    let out = run(&["--model", model], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no credentials configured"));

    let dir = tempfile::tempdir().unwrap();
    let not_onnx = dir.path().join("junk.onnx");
    std::fs::write(&not_onnx, b"this is not a protobuf \xff\xff\xff").unwrap();
    let out = run(
        &["--model", not_onnx.to_str().unwrap()],
        &[("FMNIST_BASIC_AUTH", "a:b")],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("junk.onnx") && err.contains("not an ONNX model"),
        "{err}"
    );

    let truncated = dir.path().join("truncated.onnx");
    let bytes = std::fs::read(model).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let out = run(
        &["--model", truncated.to_str().unwrap()],
        &[("FMNIST_BASIC_AUTH", "a:b")],
    );
    assert!(!out.status.success(), "truncated model accepted");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("truncated.onnx"), "{err}");

    // A valid ONNX file whose graph uses an operator candle-onnx cannot run.
    use prost::Message;
    let mut proto = candle_onnx::onnx::ModelProto::decode(bytes.as_slice()).unwrap();
    proto.graph.as_mut().unwrap().node[0].op_type = "Einsum".into();
    let unsupported = dir.path().join("einsum.onnx");
    std::fs::write(&unsupported, proto.encode_to_vec()).unwrap();
    let out = run(
        &["--model", unsupported.to_str().unwrap()],
        &[("FMNIST_BASIC_AUTH", "a:b")],
    );
    assert!(!out.status.success(), "unsupported operator accepted");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("einsum.onnx") && err.contains("Einsum"),
        "{err}"
    );

    let creds = dir.path().join("creds");
    std::fs::write(&creds, "alice:plaintext-password\n").unwrap();
    let out = run(
        &[
            "--model",
            model,
            "--credentials-file",
            creds.to_str().unwrap(),
        ],
        &[],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 1"));
}

#[test]
fn credentials_file_made_by_hash_password_works() {
    let bin = env!("CARGO_BIN_EXE_fmnist-serve");
    let mut child = std::process::Command::new(bin)
        .args(["hash-password", "carol"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"carols-password\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let line = String::from_utf8(out.stdout).unwrap();
    assert!(line.starts_with("carol:$argon2id$"), "{line}");
    assert!(!line.contains("carols-password"));
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("credentials");
    std::fs::write(&creds, &line).unwrap();
    let s = Server::start_with(&["--credentials-file", creds.to_str().unwrap()], &[]);
    let r = raw(
        &s.addr,
        &request(
            "GET",
            "/v2/models/fmnist-cnn",
            Some(&basic("carol", "carols-password")),
            None,
            "",
        ),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let r = raw(
        &s.addr,
        &request(
            "GET",
            "/v2/models/fmnist-cnn",
            Some(&basic("carol", "nope")),
            None,
            "",
        ),
    );
    assert_eq!(r.status, 401);
}

#[test]
fn serves_a_three_channel_model_with_server_side_resizing() {
    use fmnist::onnx::writer::{write_model, GraphSpec, Layer};
    let size = 40;
    let n_in = 2 * size * size;
    let spec = GraphSpec {
        name: "rgb".into(),
        input: fmnist::InputLayout::Rgb { size },
        num_classes: 10,
        flip_average: false,
        layers: vec![
            Layer::Conv2d {
                weight: (0..54).map(|i| ((i % 5) as f32 - 2.0) * 0.1).collect(),
                shape: [2, 3, 3, 3],
                bias: vec![0.0, 0.1],
                stride: 1,
                padding: 1,
            },
            Layer::Relu,
            Layer::Flatten,
            Layer::Linear {
                weight: (0..10 * n_in)
                    .map(|i| ((i % 11) as f32 - 5.0) * 0.01)
                    .collect(),
                in_features: n_in,
                out_features: 10,
                bias: vec![0.0; 10],
            },
        ],
        metadata: vec![],
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rgb-model.onnx");
    write_model(&path, &spec).unwrap();
    let s = Server::start(&["--model", path.to_str().unwrap()]);
    let meta = get(&s, "/v2/models/rgb-model", true).json();
    assert_eq!(meta["inputs"][0]["shape"], json!([-1, 3, size, size]));
    let (images, _) = fixture();
    let r = post(&s, "/predict", &json!({ "image": image_json(&images[3]) }));
    assert_eq!(r.status, 200, "{}", r.body);
    // The server's answer equals the library's preprocessing + model on the same image.
    let model = fmnist::OnnxModel::load(&path).unwrap();
    let logits = model
        .logits_for_pixels(&[&images[3]])
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let want = fmnist::onnx::model::argmax(&logits[0]);
    assert_eq!(r.json()["label"].as_u64().unwrap() as usize, want);
    // v2 takes gray [N,784] input for it as well.
    let flat: Vec<f64> = images[3].iter().map(|&p| p as f64 / 255.0).collect();
    let req = json!({ "inputs": [{ "name": "pixels", "shape": [1, 784], "datatype": "FP32", "data": flat }] });
    assert_eq!(post(&s, "/v2/models/rgb-model/infer", &req).status, 200);
}

#[test]
fn a_slow_client_is_cut_off_and_does_not_block_others() {
    use std::io::{Read, Write};
    let s = Server::start(&["--header-read-timeout-ms", "300"]);
    let mut slow = std::net::TcpStream::connect(&s.addr).unwrap();
    slow.write_all(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n")
        .unwrap();
    // Others are served while the slow client dawdles.
    assert_eq!(get(&s, "/v2/health/live", false).status, 200);
    std::thread::sleep(Duration::from_millis(800));
    slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = Vec::new();
    let _ = slow.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    assert!(
        !text.contains("200 OK"),
        "the slow request was served: {text}"
    );
    // The connection is closed (EOF reached above) and the server is healthy.
    assert_eq!(get(&s, "/v2/health/live", false).status, 200);
}

#[test]
fn healthcheck_subcommand_follows_readiness() {
    let healthcheck = |addr: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_fmnist-serve"))
            .args(["healthcheck", "--timeout-ms", "2000"])
            .env("FMNIST_LISTEN", addr)
            .output()
            .unwrap()
    };
    let s = Server::start(&[]);
    // The image sets FMNIST_LISTEN=0.0.0.0:8080 for both the server and its HEALTHCHECK.
    let port = s.addr.rsplit_once(':').unwrap().1.to_string();
    let out = healthcheck(&format!("0.0.0.0:{port}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("200 OK"));
    let addr = s.addr.clone();
    assert!(s.terminate(Duration::from_secs(20)).success());
    let out = healthcheck(&addr);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot connect") && err.contains(&addr),
        "{err}"
    );
}

#[test]
fn both_engines_give_the_same_answers_and_say_which_runs() {
    let planned = Server::start(&[]);
    let reference = Server::start(&["--engine", "candle-onnx"]);
    assert!(
        planned.wait_for_log("engine=planned", Duration::from_secs(5)),
        "{}",
        planned.logs()
    );
    assert!(
        reference.wait_for_log("engine=candle-onnx (chosen)", Duration::from_secs(5)),
        "{}",
        reference.logs()
    );
    let (images, _) = fixture();
    let body = json!({ "images": images[..40].iter().map(|i| image_json(i)).collect::<Vec<_>>() });
    let a = post(&planned, "/predict", &body);
    let b = post(&reference, "/predict", &body);
    assert_eq!((a.status, b.status), (200, 200), "{} / {}", a.body, b.body);
    let (a, b) = (a.json(), b.json());
    let (a, b) = (
        a["predictions"].as_array().unwrap(),
        b["predictions"].as_array().unwrap(),
    );
    assert_eq!(a.len(), 40);
    for (i, (p, q)) in a.iter().zip(b).enumerate() {
        assert_eq!(p["label"], q["label"], "image {i}");
        for (name, v) in p["probabilities"].as_object().unwrap() {
            let w = q["probabilities"][name].as_f64().unwrap();
            assert!(
                (v.as_f64().unwrap() - w).abs() < 1e-5,
                "image {i} {name}: {v} vs {w}"
            );
        }
    }
}
