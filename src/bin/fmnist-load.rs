//! `fmnist-load`: one load client for the three Open Inference Protocol encodings, so that
//! comparing them measures the server, not three different clients.
//!
//! Each worker holds one connection (an HTTP/1.1 keep-alive connection, or one HTTP/2
//! connection for gRPC) and sends one request at a time, as wrk does; requests cycle over the
//! fixture images and every answer is checked (status, and the logits' length).

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use fmnist::server::grpc::pb;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Encoding {
    /// POST /v2/models/NAME/infer with JSON tensors.
    Json,
    /// The same route with the binary tensor data extension (tritonclient's default).
    Binary,
    /// gRPC ModelInfer with raw_input_contents (tritonclient.grpc's form).
    Grpc,
}

#[derive(Parser)]
#[command(
    name = "fmnist-load",
    version,
    about = "Drive a running fmnist-serve with v2 inference requests (JSON, binary, gRPC) and print req/s and latency.",
    long_about = "Drive a running fmnist-serve with Open Inference Protocol requests and print \
        throughput, p50/p99 latency and errors per encoding and concurrency. Every worker keeps \
        one connection and one request in flight. The password comes from FMNIST_LOAD_PASSWORD \
        (never the command line). Exits 1 if any request failed."
)]
struct Cli {
    /// HTTP address of the server (host:port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: String,
    /// gRPC address of the server (host:port); needed for --encoding grpc.
    #[arg(long, default_value = "127.0.0.1:8081")]
    grpc: String,
    /// Model name in the v2 routes.
    #[arg(long, default_value = "fmnist-cnn")]
    model: String,
    /// Basic-auth user (the password is read from FMNIST_LOAD_PASSWORD).
    #[arg(long, default_value = "admin")]
    user: String,
    /// Encodings to drive, in order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "json,binary,grpc"
    )]
    encoding: Vec<Encoding>,
    /// Concurrency levels (workers, each with its own connection).
    #[arg(long, value_delimiter = ',', default_value = "32,1")]
    concurrency: Vec<usize>,
    /// Seconds measured per run, after --warmup-secs of unmeasured load.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    #[arg(long, default_value_t = 2.0)]
    warmup_secs: f64,
    /// Images to send (Kaggle CSV: label,pixel1..pixel784).
    #[arg(long, default_value = "fixtures/sample.csv")]
    data: PathBuf,
}

/// What one request carries, prepared once per image.
struct Bodies {
    json: Vec<Bytes>,
    binary: Vec<(Bytes, usize)>,
    grpc: Vec<pb::ModelInferRequest>,
}

fn prepare(data: &PathBuf, model: &str) -> Result<Bodies> {
    let text =
        std::fs::read_to_string(data).with_context(|| format!("reading {}", data.display()))?;
    let mut bodies = Bodies {
        json: Vec::new(),
        binary: Vec::new(),
        grpc: Vec::new(),
    };
    for (i, line) in text.lines().skip(1).enumerate() {
        let values: Vec<f32> = line
            .split(',')
            .skip(1)
            .map(|v| v.trim().parse::<f32>().map(|p| p / 255.0))
            .collect::<Result<_, _>>()
            .with_context(|| format!("{}, row {}: not numbers", data.display(), i + 2))?;
        if values.len() != 784 {
            bail!(
                "{}, row {}: {} pixels, expected 784",
                data.display(),
                i + 2,
                values.len()
            );
        }
        let input = |extra: serde_json::Value| {
            let mut t =
                serde_json::json!({"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32"});
            t.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            t
        };
        let json = serde_json::json!({"inputs": [input(serde_json::json!({"data": values}))],
                                       "outputs": [{"name": "logits"}]});
        bodies.json.push(Bytes::from(json.to_string()));
        let raw: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
        let head = serde_json::json!({
            "inputs": [input(serde_json::json!({"parameters": {"binary_data_size": raw.len()}}))],
            "outputs": [{"name": "logits", "parameters": {"binary_data": true}}]});
        let mut body = head.to_string().into_bytes();
        let header_len = body.len();
        body.extend_from_slice(&raw);
        bodies.binary.push((Bytes::from(body), header_len));
        bodies.grpc.push(pb::ModelInferRequest {
            model_name: model.to_string(),
            inputs: vec![pb::model_infer_request::InferInputTensor {
                name: "input".into(),
                datatype: "FP32".into(),
                shape: vec![1, 1, 28, 28],
                ..Default::default()
            }],
            outputs: vec![pb::model_infer_request::InferRequestedOutputTensor {
                name: "logits".into(),
                ..Default::default()
            }],
            raw_input_contents: vec![raw],
            ..Default::default()
        });
    }
    if bodies.json.is_empty() {
        bail!("{} has no images", data.display());
    }
    Ok(bodies)
}

/// A bare HTTP/2 connection as the tower service tonic's client calls: tonic's own Channel
/// adds a buffer task and load balancing per call, which doubled the client's CPU per call on
/// a machine whose cores it shares with the server under test.
#[derive(Clone)]
struct H2(hyper::client::conn::http2::SendRequest<tonic::body::Body>);

impl tonic::codegen::Service<hyper::Request<tonic::body::Body>> for H2 {
    type Response = hyper::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: hyper::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.0.send_request(req))
    }
}

struct Run {
    latencies_us: Vec<u32>,
    errors: u64,
    first_error: Option<String>,
}

/// One worker: its own connection, requests back to back until `until`.
async fn worker(
    cli: Arc<Cli>,
    bodies: Arc<Bodies>,
    auth: Arc<String>,
    encoding: Encoding,
    offset: usize,
    measure_from: Instant,
    until: Instant,
) -> Result<Run> {
    let mut run = Run {
        latencies_us: Vec::new(),
        errors: 0,
        first_error: None,
    };
    let mut record = |started: Instant, outcome: Result<()>| {
        if started < measure_from {
            return;
        }
        match outcome {
            Ok(()) => run
                .latencies_us
                .push(started.elapsed().as_micros().min(u32::MAX as u128) as u32),
            Err(e) => {
                run.errors += 1;
                run.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    };
    let mut i = offset;
    match encoding {
        Encoding::Json | Encoding::Binary => {
            let stream = tokio::net::TcpStream::connect(&cli.http)
                .await
                .with_context(|| format!("connecting to {}", cli.http))?;
            stream.set_nodelay(true)?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .context("HTTP handshake")?;
            tokio::spawn(conn);
            let uri = format!("http://{}/v2/models/{}/infer", cli.http, cli.model);
            while Instant::now() < until {
                let started = Instant::now();
                let mut req = hyper::Request::post(&uri).header("authorization", auth.as_str());
                let body = match encoding {
                    Encoding::Json => {
                        req = req.header("content-type", "application/json");
                        bodies.json[i % bodies.json.len()].clone()
                    }
                    _ => {
                        let (b, n) = &bodies.binary[i % bodies.binary.len()];
                        req = req
                            .header("content-type", "application/octet-stream")
                            .header("inference-header-content-length", *n);
                        b.clone()
                    }
                };
                let outcome = async {
                    let resp = sender.send_request(req.body(Full::new(body))?).await?;
                    let status = resp.status();
                    let bytes = resp.into_body().collect().await?.to_bytes();
                    if !status.is_success() {
                        bail!("HTTP {status}: {}", String::from_utf8_lossy(&bytes));
                    }
                    Ok(())
                }
                .await;
                let broken = outcome.is_err() && sender.is_closed();
                record(started, outcome);
                if broken {
                    bail!("the server closed the connection");
                }
                i += 1;
            }
        }
        Encoding::Grpc => {
            let stream = tokio::net::TcpStream::connect(&cli.grpc)
                .await
                .with_context(|| format!("connecting to gRPC {}", cli.grpc))?;
            stream.set_nodelay(true)?;
            let (sender, conn) = hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                TokioIo::new(stream),
            )
            .await
            .context("HTTP/2 handshake")?;
            tokio::spawn(conn);
            let origin: hyper::Uri = format!("http://{}", cli.grpc).parse()?;
            let mut client =
                pb::grpc_inference_service_client::GrpcInferenceServiceClient::with_origin(
                    H2(sender),
                    origin,
                );
            let auth: tonic::metadata::MetadataValue<_> = auth.parse()?;
            while Instant::now() < until {
                let started = Instant::now();
                let mut req = tonic::Request::new(bodies.grpc[i % bodies.grpc.len()].clone());
                req.metadata_mut().insert("authorization", auth.clone());
                let outcome = match client.model_infer(req).await {
                    Ok(r) if r.get_ref().raw_output_contents.first().map(Vec::len) == Some(40) => {
                        Ok(())
                    }
                    Ok(_) => Err(anyhow::anyhow!("no 10 logits in the response")),
                    Err(s) => Err(anyhow::anyhow!("{:?}: {}", s.code(), s.message())),
                };
                record(started, outcome);
                i += 1;
            }
        }
    }
    Ok(run)
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx] as f64 / 1000.0
}

fn main() -> Result<()> {
    let cli = Arc::new(Cli::parse());
    let password = std::env::var("FMNIST_LOAD_PASSWORD")
        .context("set FMNIST_LOAD_PASSWORD to the server's password for --user")?;
    use base64::Engine;
    let auth = Arc::new(format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{password}", cli.user))
    ));
    let bodies = Arc::new(prepare(&cli.data, &cli.model)?);
    // One client thread, like `wrk -t1`: on a machine whose cores the server shares, a
    // second client thread takes CPU from the server it measures.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut failed = false;
    println!(
        "{:<8} {:>5} {:>10} {:>9} {:>9} {:>7}",
        "encoding", "conns", "req/s", "p50 ms", "p99 ms", "errors"
    );
    for &encoding in &cli.encoding {
        for &conns in &cli.concurrency {
            let start = Instant::now();
            let measure_from = start + Duration::from_secs_f64(cli.warmup_secs);
            let until = measure_from + Duration::from_secs_f64(cli.seconds);
            let runs = runtime.block_on(async {
                let tasks: Vec<_> = (0..conns.max(1))
                    .map(|w| {
                        tokio::spawn(worker(
                            Arc::clone(&cli),
                            Arc::clone(&bodies),
                            Arc::clone(&auth),
                            encoding,
                            w * 7,
                            measure_from,
                            until,
                        ))
                    })
                    .collect();
                let mut out = Vec::new();
                for t in tasks {
                    out.push(t.await.map_err(anyhow::Error::from).and_then(|r| r));
                }
                out
            });
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            let mut first_error = None;
            for r in runs {
                match r {
                    Ok(r) => {
                        latencies.extend(r.latencies_us);
                        errors += r.errors;
                        if first_error.is_none() {
                            first_error = r.first_error;
                        }
                    }
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| format!("{e:#}"));
                    }
                }
            }
            latencies.sort_unstable();
            let rps = latencies.len() as f64 / cli.seconds;
            println!(
                "{:<8} {:>5} {:>10.0} {:>9.3} {:>9.3} {:>7}",
                format!("{encoding:?}").to_lowercase(),
                conns,
                rps,
                percentile(&latencies, 0.5),
                percentile(&latencies, 0.99),
                errors
            );
            if let Some(e) = first_error {
                println!("  first error: {e}");
            }
            failed |= errors > 0 || latencies.is_empty();
        }
    }
    if failed {
        bail!("some requests failed");
    }
    Ok(())
}
