//! The gRPC front end end to end: the real server with `--grpc-listen` on loopback, called
//! with a tonic client generated from the same `.proto` (the Python clients tritonclient.grpc
//! and kserve are run by `make oip-clients`).

mod common;

use common::*;
use fmnist::server::grpc::pb;
use pb::grpc_inference_service_client::GrpcInferenceServiceClient;
use serde_json::json;
use std::time::Duration;
use tonic::transport::Channel;
use tonic::Code;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn client(s: &Server) -> GrpcInferenceServiceClient<Channel> {
    let addr = s.grpc_addr.clone().expect("started with --grpc-listen");
    GrpcInferenceServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

fn authed<T>(msg: T, auth: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", auth.parse().unwrap());
    r
}

fn input(n: usize) -> pb::model_infer_request::InferInputTensor {
    pb::model_infer_request::InferInputTensor {
        name: "input".into(),
        datatype: "FP32".into(),
        shape: vec![n as i64, 1, 28, 28],
        ..Default::default()
    }
}

fn unit(images: &[Vec<u8>]) -> Vec<f32> {
    images
        .iter()
        .flat_map(|img| img.iter().map(|&p| p as f32 / 255.0))
        .collect()
}

fn raw_request(values: &[f32]) -> pb::ModelInferRequest {
    pb::ModelInferRequest {
        model_name: "fmnist-cnn".into(),
        inputs: vec![input(values.len() / 784)],
        raw_input_contents: vec![le_bytes(values)],
        ..Default::default()
    }
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Raw and typed gRPC inputs give the HTTP side's logits bit for bit, the id and version are
/// echoed, and classification answers BYTES.
#[test]
fn grpc_infer_matches_http() {
    let s = Server::start(&["--grpc-listen", "127.0.0.1:0"]);
    let (images, labels) = fixture();
    let values = unit(&images[..32]);
    let http = post(
        &s,
        "/v2/models/fmnist-cnn/infer",
        &json!({"inputs": [{"name": "input", "shape": [32, 784], "datatype": "FP32", "data": values}],
                "outputs": [{"name": "logits"}]}),
    );
    let want: Vec<f32> = http.json()["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let auth = basic(USER, PASSWORD);
    runtime().block_on(async {
        let mut c = client(&s).await;
        let mut req = raw_request(&values);
        req.id = "call-7".into();
        req.model_version = "1".into();
        let r = c
            .model_infer(authed(req, &auth))
            .await
            .unwrap()
            .into_inner();
        assert_eq!((r.id.as_str(), r.model_version.as_str()), ("call-7", "1"));
        assert_eq!(
            r.outputs
                .iter()
                .map(|o| o.name.as_str())
                .collect::<Vec<_>>(),
            ["logits", "probabilities"]
        );
        assert_eq!(r.outputs[0].shape, vec![32, 10]);
        assert_eq!(f32s(&r.raw_output_contents[0]), want);
        // Typed contents.
        let mut typed = raw_request(&values);
        typed.raw_input_contents.clear();
        typed.inputs[0].contents = Some(pb::InferTensorContents {
            fp32_contents: values.clone(),
            ..Default::default()
        });
        typed.outputs = vec![
            pb::model_infer_request::InferRequestedOutputTensor {
                name: "logits".into(),
                ..Default::default()
            },
            pb::model_infer_request::InferRequestedOutputTensor {
                name: "probabilities".into(),
                parameters: [(
                    "classification".to_string(),
                    pb::InferParameter {
                        parameter_choice: Some(pb::infer_parameter::ParameterChoice::Int64Param(1)),
                    },
                )]
                .into(),
            },
        ];
        let r = c
            .model_infer(authed(typed, &auth))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(f32s(&r.raw_output_contents[0]), want);
        assert_eq!(r.outputs[1].datatype, "BYTES");
        assert_eq!(r.outputs[1].shape, vec![32, 1]);
        let mut b = &r.raw_output_contents[1][..];
        let mut right = 0;
        for label in &labels[..32] {
            let len = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
            let text = std::str::from_utf8(&b[4..4 + len]).unwrap();
            let index: u8 = text.split(':').nth(1).unwrap().parse().unwrap();
            right += usize::from(index == *label);
            b = &b[4 + len..];
        }
        assert!(right >= 28, "{right}/32");
        // Metadata and configuration agree with the HTTP side.
        let meta = c
            .model_metadata(authed(
                pb::ModelMetadataRequest {
                    name: "fmnist-cnn".into(),
                    version: String::new(),
                },
                &auth,
            ))
            .await
            .unwrap()
            .into_inner();
        let http_meta = get(&s, "/v2/models/fmnist-cnn", true).json();
        assert_eq!(meta.platform, http_meta["platform"].as_str().unwrap());
        assert_eq!(meta.inputs[0].shape, vec![-1, 1, 28, 28]);
        let cfg = c
            .model_config(authed(
                pb::ModelConfigRequest {
                    name: "fmnist-cnn".into(),
                    version: "1".into(),
                },
                &auth,
            ))
            .await
            .unwrap()
            .into_inner()
            .config
            .unwrap();
        let http_cfg = get(&s, "/v2/models/fmnist-cnn/config", true).json();
        assert_eq!(
            cfg.max_batch_size as i64,
            http_cfg["max_batch_size"].as_i64().unwrap()
        );
        assert_eq!(cfg.input[0].dims, vec![1, 28, 28]);
        assert_eq!(
            cfg.dynamic_batching.unwrap().max_queue_delay_microseconds as i64,
            http_cfg["dynamic_batching"]["max_queue_delay_microseconds"]
                .as_i64()
                .unwrap()
        );
        let server = c
            .server_metadata(pb::ServerMetadataRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(server
            .extensions
            .contains(&"binary_tensor_data".to_string()));
    });
    let metrics = get(&s, "/metrics", false).body;
    assert!(
        metrics.contains(
            "fmnist_requests_total{protocol=\"grpc\",route=\"/inference.GRPCInferenceService/ModelInfer\",status=\"0\"} 2"
        ),
        "{metrics}"
    );
}

/// Hostile and unauthorised calls get the status code the error table gives, with the HTTP
/// side's message, and the server stays healthy.
#[test]
fn grpc_errors_map_to_status_codes() {
    let s = Server::start(&[
        "--grpc-listen",
        "127.0.0.1:0",
        "--max-body-bytes",
        "20000",
        "--auth-max-failures",
        "3",
    ]);
    let (images, _) = fixture();
    let one = unit(&images[..1]);
    let auth = basic(USER, PASSWORD);
    runtime().block_on(async {
        let mut c = client(&s).await;
        // Open calls need no credentials.
        assert!(c.server_live(pb::ServerLiveRequest {}).await.unwrap().into_inner().live);
        assert!(c.server_ready(pb::ServerReadyRequest {}).await.unwrap().into_inner().ready);
        let ready = |name: &str, version: &str| pb::ModelReadyRequest {
            name: name.into(),
            version: version.into(),
        };
        assert!(c.model_ready(ready("fmnist-cnn", "")).await.unwrap().into_inner().ready);
        assert_eq!(
            c.model_ready(ready("fmnist-cnn", "9")).await.unwrap_err().code(),
            Code::NotFound
        );
        assert_eq!(
            c.model_ready(ready("other", "")).await.unwrap_err().code(),
            Code::NotFound
        );
        let mut cases: Vec<(&str, pb::ModelInferRequest, Code, &str)> = Vec::new();
        let mut m = raw_request(&one);
        m.model_name = "other".into();
        cases.push(("unknown model", m, Code::NotFound, "unknown model 'other'"));
        let mut m = raw_request(&one);
        m.model_version = "2".into();
        cases.push(("unknown version", m, Code::NotFound, "unknown version '2'"));
        let mut m = raw_request(&one);
        m.inputs[0].shape = vec![1, 783];
        cases.push(("shape [1,783]", m, Code::InvalidArgument, "expected [N,784]"));
        let mut m = raw_request(&one);
        m.inputs[0].datatype = "INT8".into();
        cases.push(("datatype INT8", m, Code::InvalidArgument, "FP32"));
        let mut m = raw_request(&one);
        m.raw_input_contents[0].pop();
        cases.push(("raw bytes one short", m, Code::InvalidArgument, "3135 bytes"));
        let mut m = raw_request(&one);
        m.raw_input_contents[0][..4].copy_from_slice(&f32::NAN.to_le_bytes());
        cases.push(("NaN pixel", m, Code::InvalidArgument, "data[0]"));
        let mut m = raw_request(&one);
        m.inputs[0].shape = vec![300, 784];
        cases.push(("batch over --max-images", m, Code::InvalidArgument, "batch size 300"));
        let mut m = raw_request(&one);
        m.outputs.push(pb::model_infer_request::InferRequestedOutputTensor {
            name: "weights".into(),
            ..Default::default()
        });
        cases.push(("unknown output", m, Code::InvalidArgument, "unknown output"));
        // 8 images (25 KB) over the 20,000-byte limit.
        let big = unit(&images[..8]);
        cases.push((
            "message over the body limit",
            raw_request(&big),
            Code::ResourceExhausted,
            "",
        ));
        for (what, msg, code, needle) in cases {
            let e = c.model_infer(authed(msg, &auth)).await.unwrap_err();
            assert_eq!(e.code(), code, "{what}: {}", e.message());
            assert!(e.message().contains(needle), "{what}: {}", e.message());
        }
        // The same message as the HTTP side.
        let mut m = raw_request(&one);
        m.inputs[0].shape = vec![1, 783];
        let grpc_message = c.model_infer(authed(m, &auth)).await.unwrap_err().message().to_string();
        let http = post(
            &s,
            "/v2/models/fmnist-cnn/infer",
            &json!({"inputs": [{"name": "input", "shape": [1, 783], "datatype": "FP32", "data": vec![0.0; 783]}]}),
        );
        assert_eq!(http.json()["error"], grpc_message);
        // Credentials: none, then wrong ones until the lockout (RESOURCE_EXHAUSTED with a
        // retry-after), which covers the right password too for that address.
        let e = c.model_infer(tonic::Request::new(raw_request(&one))).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
        let e = c
            .model_metadata(pb::ModelMetadataRequest {
                name: "fmnist-cnn".into(),
                version: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
        let wrong = basic(USER, "guess");
        for _ in 0..3 {
            let e = c.model_infer(authed(raw_request(&one), &wrong)).await.unwrap_err();
            assert_eq!(e.code(), Code::Unauthenticated);
        }
        let e = c.model_infer(authed(raw_request(&one), &auth)).await.unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
        assert!(e.metadata().get("retry-after").is_some());
        assert!(e.message().contains("too many failed authentication"));
    });
    // The lockout is shared with HTTP: the same address is refused there too.
    let r = post(&s, "/predict", &json!({"image": images[0]}));
    assert_eq!(r.status, 429);
    assert_eq!(get(&s, "/v2/health/ready", false).status, 200);
}

/// gRPC over TLS negotiates h2 by ALPN with the same certificate as HTTPS.
#[test]
fn grpc_over_tls() {
    let cert = SelfSigned::new();
    let mut args = vec!["--grpc-listen", "127.0.0.1:0"];
    args.extend(cert.args());
    let s = Server::start(&args);
    let (images, _) = fixture();
    let values = unit(&images[..2]);
    let auth = basic(USER, PASSWORD);
    let port = s
        .grpc_addr
        .clone()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    let rt = runtime();
    let mut c = rt.block_on(async {
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&cert.pem))
            .domain_name("localhost");
        let channel = Channel::from_shared(format!("https://localhost:{port}"))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap();
        GrpcInferenceServiceClient::new(channel)
    });
    let r = rt
        .block_on(c.model_infer(authed(raw_request(&values), &auth)))
        .unwrap()
        .into_inner();
    assert_eq!(r.raw_output_contents[0].len(), 2 * 10 * 4);
    // A plain-text client gets nothing from the TLS listener.
    let plain = rt.block_on(async {
        GrpcInferenceServiceClient::connect(format!("http://127.0.0.1:{port}"))
            .await
            .map(|mut c| async move { c.server_live(pb::ServerLiveRequest {}).await })
    });
    if let Ok(call) = plain {
        assert!(rt.block_on(call).is_err());
    }
}

/// SIGTERM lets an in-flight gRPC call (and an HTTP one) finish, then the process exits 0.
#[test]
fn grpc_call_in_flight_at_sigterm_is_answered() {
    let s = Server::start(&[
        "--grpc-listen",
        "127.0.0.1:0",
        "--max-queue-delay-us",
        "3000000",
        "--drain-delay-secs",
        "0",
        "--max-batch-size",
        "64",
    ]);
    let (images, _) = fixture();
    let values = unit(&images[..2]);
    let auth = basic(USER, PASSWORD);
    let rt = runtime();
    let c = rt.block_on(client(&s));
    // Hold the next batch open: an HTTP request whose body is still arriving makes the
    // batcher wait (up to --max-queue-delay-us) for it, so the gRPC call below is in flight
    // when SIGTERM comes.
    use std::io::Write;
    let body = json!({"image": images[0]}).to_string();
    let mut slow = std::net::TcpStream::connect(&s.addr).unwrap();
    let head = format!(
        "POST /predict HTTP/1.1\r\nHost: t\r\nAuthorization: {auth}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    slow.write_all(head.as_bytes()).unwrap();
    slow.write_all(&body.as_bytes()[..10]).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let call = {
        let mut c = c.clone();
        let req = authed(raw_request(&values), &auth);
        rt.spawn(async move { c.model_infer(req).await })
    };
    std::thread::sleep(Duration::from_millis(100));
    std::process::Command::new("kill")
        .args(["-TERM", &s.pid().to_string()])
        .status()
        .unwrap();
    assert!(s.wait_for_log("shutting down", Duration::from_secs(5)));
    assert!(!call.is_finished(), "the call was not in flight at SIGTERM");
    slow.write_all(&body.as_bytes()[10..]).unwrap();
    let answered = rt.block_on(call).unwrap();
    assert!(
        answered.is_ok(),
        "in-flight call lost: {:?}",
        answered.err()
    );
    let mut out = Vec::new();
    use std::io::Read;
    slow.read_to_end(&mut out).unwrap();
    assert_eq!(
        parse_response(&out).status,
        200,
        "the HTTP request in flight was lost"
    );
    let status = s.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status:?}");
}

/// During the drain a gRPC connection is told to go (GOAWAY: tonic's channel then fails its
/// next call once and reconnects, as tonic does after any lost connection), yet calls are
/// still served: on a new connection ServerReady says false and ModelInfer answers; then the
/// process exits 0.
#[test]
fn grpc_is_served_during_the_drain() {
    let s = Server::start(&["--grpc-listen", "127.0.0.1:0", "--drain-delay-secs", "3"]);
    let (images, _) = fixture();
    let values = unit(&images[..1]);
    let auth = basic(USER, PASSWORD);
    let rt = runtime();
    let mut first = rt.block_on(client(&s));
    rt.block_on(first.model_infer(authed(raw_request(&values), &auth)))
        .unwrap();
    std::process::Command::new("kill")
        .args(["-TERM", &s.pid().to_string()])
        .status()
        .unwrap();
    assert!(s.wait_for_log("draining", Duration::from_secs(5)));
    std::thread::sleep(Duration::from_millis(200));
    rt.block_on(async {
        // Each connection is told to go after its first call in the drain, so each call here
        // opens its own (a tonic channel does not retry a call on a connection that went).
        let mut c = client(&s).await;
        let ready = c.server_ready(pb::ServerReadyRequest {}).await.unwrap();
        assert!(!ready.into_inner().ready);
        let mut c = client(&s).await;
        let r = c
            .model_infer(authed(raw_request(&values), &auth))
            .await
            .unwrap();
        assert_eq!(r.into_inner().raw_output_contents[0].len(), 40);
    });
    let status = s.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "{status:?}");
}

/// A gRPC message that stops arriving gets DEADLINE_EXCEEDED after the body idle timeout,
/// as an HTTP body gets 408.
#[test]
fn a_stalled_grpc_message_gets_deadline_exceeded() {
    use http_body_util::BodyExt;
    let s = Server::start(&[
        "--grpc-listen",
        "127.0.0.1:0",
        "--body-idle-timeout-ms",
        "500",
    ]);
    let addr = s.grpc_addr.clone().unwrap();
    let auth = basic(USER, PASSWORD);
    runtime().block_on(async move {
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let (mut tx, body) =
            http_body_util::channel::Channel::<bytes::Bytes, std::io::Error>::new(4);
        let req = hyper::Request::post(format!(
            "http://{addr}/inference.GRPCInferenceService/ModelInfer"
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", auth)
        .body(body)
        .unwrap();
        let call = tokio::spawn(async move { sender.send_request(req).await });
        // A frame announcing 4,000 bytes, then 10 of them, then nothing.
        let mut start = vec![0u8];
        start.extend_from_slice(&4000u32.to_be_bytes());
        start.extend_from_slice(&[0u8; 10]);
        tx.send_data(bytes::Bytes::from(start)).await.unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .expect("no answer to a stalled message")
            .unwrap()
            .unwrap();
        let (head, body) = resp.into_parts();
        let collected = body.collect().await.unwrap();
        let status = collected
            .trailers()
            .and_then(|t| t.get("grpc-status"))
            .or_else(|| head.headers.get("grpc-status"))
            .map(|v| v.to_str().unwrap().to_string());
        assert_eq!(status.as_deref(), Some("4"), "{head:?}");
        drop(tx);
    });
}
