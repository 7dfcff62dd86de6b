//! The Open Inference Protocol's REST form end to end, against the real server on loopback:
//! content types, the binary tensor data extension (requests and responses), the raw binary
//! request, classification, model configuration, versioned paths and readiness by status.

mod common;

use common::*;
use serde_json::{json, Value};

const INFER: &str = "/v2/models/fmnist-cnn/infer";

fn unit(images: &[Vec<u8>]) -> Vec<f32> {
    images
        .iter()
        .flat_map(|img| img.iter().map(|&p| p as f32 / 255.0))
        .collect()
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn json_logits(v: &Value, output: usize) -> Vec<f32> {
    v["outputs"][output]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// The same images sent as JSON and with the binary extension give bit-identical logits and
/// probabilities, over several batch sizes.
#[test]
fn json_and_binary_requests_give_identical_outputs() {
    let s = Server::start(&[]);
    let (images, _) = fixture();
    let mut start = 0;
    for n in [1usize, 3, 16, 64, 7] {
        let batch = &images[start..start + n];
        start += n;
        let values = unit(batch);
        let outputs = json!([{"name": "logits"}, {"name": "probabilities"}]);
        let as_json = json!({"inputs": [{"name": "input", "shape": [n, 1, 28, 28], "datatype": "FP32",
            "data": values}], "outputs": outputs});
        let r = post(&s, INFER, &as_json);
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(
            r.header("content-type").as_deref(),
            Some("application/json")
        );
        let from_json = r.json();
        let head = json!({"inputs": [{"name": "input", "shape": [n, 784], "datatype": "FP32",
            "parameters": {"binary_data_size": n * 3136}}],
            "outputs": [{"name": "logits", "parameters": {"binary_data": true}},
                        {"name": "probabilities", "parameters": {"binary_data": true}}]});
        let (body, hl) = binary_body(&head, &le_bytes(&values));
        let r = post_binary(&s.addr, INFER, &body, Some(hl));
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(
            r.header("content-type").as_deref(),
            Some("application/octet-stream")
        );
        let (head, parts) = split_binary(&r);
        assert_eq!(head["outputs"][0]["shape"], json!([n, 10]));
        assert_eq!(parts[0].0, "logits");
        assert_eq!(f32s(&parts[0].1), json_logits(&from_json, 0), "batch {n}");
        assert_eq!(f32s(&parts[1].1), json_logits(&from_json, 1), "batch {n}");
    }
}

/// tritonclient sends no Content-Type; octet-stream marks binary bodies; others are 415. The
/// raw binary request answers every output in binary.
#[test]
fn content_types_and_the_raw_binary_request() {
    let s = Server::start(&[]);
    let (images, _) = fixture();
    let values = unit(&images[..1]);
    let body = json!({"inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32", "data": values}],
                      "outputs": [{"name": "logits"}]})
    .to_string();
    let auth = basic(USER, PASSWORD);
    let expected = {
        let r = post_to(&s.addr, INFER, &body);
        json_logits(&r.json(), 0)
    };
    let with_type = |ctype: Option<&str>| {
        let mut headers = vec![("Authorization", auth.clone())];
        if let Some(c) = ctype {
            headers.push(("Content-Type", c.to_string()));
        }
        raw(
            &s.addr,
            &request_bytes("POST", INFER, &headers, body.as_bytes()),
        )
    };
    for ok in [
        None,
        Some("application/json"),
        Some("application/json; charset=utf-8"),
    ] {
        let r = with_type(ok);
        assert_eq!(r.status, 200, "{ok:?}: {}", r.body);
        assert_eq!(json_logits(&r.json(), 0), expected);
    }
    for bad in ["text/plain", "image/png", "multipart/form-data"] {
        let r = with_type(Some(bad));
        assert_eq!(r.status, 415, "{bad}");
        assert!(r.json()["error"].as_str().unwrap().contains("octet-stream"));
    }
    // octet-stream without the header: a framing error.
    let r = with_type(Some("application/octet-stream"));
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]
        .as_str()
        .unwrap()
        .contains("Inference-Header-Content-Length"));
    // The raw binary request: the body is the input, batch 1; all outputs come back binary.
    let r = post_binary(&s.addr, INFER, &le_bytes(&values), Some(0));
    assert_eq!(r.status, 200, "{}", r.body);
    let (head, parts) = split_binary(&r);
    assert_eq!(head["model_name"], "fmnist-cnn");
    assert_eq!(
        parts.iter().map(|p| p.0.as_str()).collect::<Vec<_>>(),
        ["logits", "probabilities"]
    );
    assert_eq!(f32s(&parts[0].1), expected);
    // Routes without a body ignore the Content-Type.
    let r = raw(
        &s.addr,
        &request("GET", "/v2/health/ready", None, Some("image/png"), ""),
    );
    assert_eq!(r.status, 200);
}

/// Classification (top-K "score:index:label" BYTES), in JSON and binary, and only the outputs
/// asked for; `binary_data_output` makes every output binary unless it says otherwise.
#[test]
fn classification_and_requested_outputs() {
    let s = Server::start(&[]);
    let (images, labels) = fixture();
    let n = 8;
    let values = unit(&images[..n]);
    let req = json!({"id": "cls-1", "inputs": [{"name": "input", "shape": [n, 784], "datatype": "FP32", "data": values}],
        "outputs": [{"name": "probabilities", "parameters": {"classification": 3}}]});
    let r = post(&s, INFER, &req);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["id"], "cls-1");
    assert_eq!(v["model_version"], "1");
    assert_eq!(v["outputs"].as_array().unwrap().len(), 1);
    let out = &v["outputs"][0];
    assert_eq!(
        (out["datatype"].clone(), out["shape"].clone()),
        (json!("BYTES"), json!([n, 3]))
    );
    let strings: Vec<String> = out["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect();
    let mut right = 0;
    for (i, row) in strings.chunks(3).enumerate() {
        let parts: Vec<Vec<&str>> = row.iter().map(|s| s.splitn(3, ':').collect()).collect();
        let scores: Vec<f64> = parts.iter().map(|p| p[0].parse().unwrap()).collect();
        assert!(
            scores.windows(2).all(|w| w[0] >= w[1]),
            "{row:?} not sorted"
        );
        let index: usize = parts[0][1].parse().unwrap();
        assert_eq!(parts[0][2], fmnist::CLASS_NAMES[index]);
        right += usize::from(index == labels[i] as usize);
    }
    assert!(right >= 7, "{right}/8 right");
    // Binary BYTES: 4-byte little-endian lengths, then the strings; same values as JSON.
    let head = json!({"parameters": {"binary_data_output": true},
        "inputs": [{"name": "input", "shape": [n, 784], "datatype": "FP32", "parameters": {"binary_data_size": n * 3136}}],
        "outputs": [{"name": "probabilities", "parameters": {"classification": 3}},
                    {"name": "logits", "parameters": {"binary_data": false}}]});
    let (body, hl) = binary_body(&head, &le_bytes(&values));
    let r = post_binary(&s.addr, INFER, &body, Some(hl));
    assert_eq!(r.status, 200, "{}", r.body);
    let (head, parts) = split_binary(&r);
    assert_eq!(parts.len(), 1);
    assert!(
        head["outputs"][1]["data"].is_array(),
        "logits asked as JSON"
    );
    let mut decoded = Vec::new();
    let mut b = &parts[0].1[..];
    while !b.is_empty() {
        let len = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
        decoded.push(String::from_utf8(b[4..4 + len].to_vec()).unwrap());
        b = &b[4 + len..];
    }
    assert_eq!(decoded, strings);
}

#[test]
fn configuration_and_versioned_paths() {
    let s = Server::start(&[
        "--model-version",
        "3",
        "--max-queue-delay-us",
        "300000",
        "--max-batch-size",
        "64",
    ]);
    let v = get(&s, "/v2", false).json();
    for e in [
        "binary_tensor_data",
        "classification",
        "model_configuration",
    ] {
        assert!(
            v["extensions"].as_array().unwrap().contains(&json!(e)),
            "{v}"
        );
    }
    let meta = get(&s, "/v2/models/fmnist-cnn", true).json();
    assert_eq!(meta["versions"], json!(["3"]));
    let cfg = get(&s, "/v2/models/fmnist-cnn/config", true);
    assert_eq!(cfg.status, 200, "{}", cfg.body);
    let cfg = cfg.json();
    assert_eq!(cfg["name"], "fmnist-cnn");
    assert_eq!(cfg["platform"], meta["platform"]);
    assert_eq!(cfg["platform"], "onnx_fmnist");
    assert_eq!(cfg["max_batch_size"], 256);
    assert_eq!(cfg["input"][0]["dims"], json!([1, 28, 28]));
    assert_eq!(cfg["input"][0]["data_type"], "TYPE_FP32");
    assert_eq!(cfg["output"][0]["dims"], json!([10]));
    assert_eq!(
        cfg["dynamic_batching"]["max_queue_delay_microseconds"],
        300000
    );
    // Versioned twins: same answers for version 3, 404 for any other, the same auth.
    for (path, needs_auth) in [
        ("/v2/models/fmnist-cnn/versions/3", true),
        ("/v2/models/fmnist-cnn/versions/3/config", true),
        ("/v2/models/fmnist-cnn/versions/3/ready", false),
    ] {
        assert_eq!(get(&s, path, true).status, 200, "{path}");
        assert_eq!(
            get(&s, path, false).status,
            if needs_auth { 401 } else { 200 },
            "{path}"
        );
        let other = path.replace("/versions/3", "/versions/1");
        let r = get(&s, &other, true);
        assert_eq!(r.status, 404, "{other}");
        assert!(r.json()["error"].as_str().unwrap().contains("version '1'"));
    }
    let (images, _) = fixture();
    let req = json!({"inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32", "data": unit(&images[..1])}]});
    let r = post(&s, "/v2/models/fmnist-cnn/versions/3/infer", &req);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["model_version"], "3");
    assert_eq!(
        post(&s, "/v2/models/fmnist-cnn/versions/2/infer", &req).status,
        404
    );
    let anon = raw(
        &s.addr,
        &request(
            "POST",
            "/v2/models/fmnist-cnn/versions/3/infer",
            None,
            Some("application/json"),
            &req.to_string(),
        ),
    );
    assert_eq!(anon.status, 401);
}
