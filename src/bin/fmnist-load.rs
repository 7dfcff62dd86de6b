//! `fmnist-load`: one load client for the three Open Inference Protocol encodings, so that
//! comparing them measures the server, not three different clients.
//!
//! Each worker holds one connection (an HTTP/1.1 keep-alive connection, or one HTTP/2
//! connection for gRPC) and sends one request at a time, as wrk does; requests cycle over the
//! fixture images and every answer is checked (status, and the logits' length). Every body is
//! encoded once up front (JSON text, the binary extension's framing, the prost-encoded gRPC
//! message in its length-prefixed frame), and all three go through hyper's client, so the
//! client does the same small work per request whatever the encoding: on a machine whose
//! cores it shares with the server, a heavier client would lower the figure it measures.

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
    /// gRPC ModelInfer with raw_input_contents (tritonclient.grpc's form), one HTTP/2
    /// connection per worker, as wrk's connections.
    Grpc,
    /// The same calls, all workers' calls multiplexed on one HTTP/2 connection, as a
    /// tritonclient.grpc or kserve client's single channel makes them.
    GrpcMux,
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
        default_value = "json,binary,grpc,grpc-mux"
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
    /// Rounds: each runs every encoding at every concurrency for --seconds, in turn, so that
    /// the machine's drift falls on all of them alike; the table sums the rounds.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// The server's process id (same machine): adds its CPU time per request (user + system,
    /// from /proc), which the client's own share of the machine does not move.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Images to send (Kaggle CSV: label,pixel1..pixel784).
    #[arg(long, default_value = "fixtures/sample.csv")]
    data: PathBuf,
}

/// What one request carries, prepared once per image.
struct Bodies {
    json: Vec<Bytes>,
    binary: Vec<(Bytes, usize)>,
    /// gRPC request bodies: the ModelInferRequest, prost-encoded once, in its 5-byte
    /// length-prefixed frame.
    grpc: Vec<Bytes>,
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
        let msg = pb::ModelInferRequest {
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
        };
        let encoded = prost::Message::encode_to_vec(&msg);
        let mut frame = Vec::with_capacity(5 + encoded.len());
        frame.push(0); // not compressed
        frame.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
        frame.extend_from_slice(&encoded);
        bodies.grpc.push(Bytes::from(frame));
    }
    if bodies.json.is_empty() {
        bail!("{} has no images", data.display());
    }
    Ok(bodies)
}

struct Run {
    latencies_us: Vec<u32>,
    errors: u64,
    first_error: Option<String>,
}

/// One worker: its own connection, requests back to back until `until`.
type H2Sender = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

/// An HTTP/2 connection to the gRPC listener.
async fn h2_connect(addr: &str) -> Result<H2Sender> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to gRPC {addr}"))?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .context("HTTP/2 handshake")?;
    tokio::spawn(conn);
    Ok(sender)
}

#[allow(clippy::too_many_arguments)]
async fn worker(
    cli: Arc<Cli>,
    bodies: Arc<Bodies>,
    auth: Arc<String>,
    encoding: Encoding,
    shared: Option<H2Sender>,
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
        Encoding::Grpc | Encoding::GrpcMux => {
            let mut sender = match shared {
                Some(s) => s,
                None => h2_connect(&cli.grpc).await?,
            };
            let uri = format!(
                "http://{}/inference.GRPCInferenceService/ModelInfer",
                cli.grpc
            );
            while Instant::now() < until {
                let started = Instant::now();
                let req = hyper::Request::post(&uri)
                    .header("content-type", "application/grpc")
                    .header("te", "trailers")
                    .header("authorization", auth.as_str())
                    .body(Full::new(bodies.grpc[i % bodies.grpc.len()].clone()))?;
                let outcome = async {
                    let resp = sender.send_request(req).await?;
                    let (head, body) = resp.into_parts();
                    let collected = body.collect().await?;
                    // grpc-status is in the trailers, or in the headers of a trailers-only
                    // (error) response.
                    let status = collected
                        .trailers()
                        .and_then(|t| t.get("grpc-status"))
                        .or_else(|| head.headers.get("grpc-status"))
                        .map(|v| v.to_str().unwrap_or("?").to_string());
                    let message = head
                        .headers
                        .get("grpc-message")
                        .or_else(|| collected.trailers().and_then(|t| t.get("grpc-message")))
                        .map(|v| v.to_str().unwrap_or("").to_string());
                    if status.as_deref() != Some("0") {
                        bail!("gRPC status {status:?}: {}", message.unwrap_or_default());
                    }
                    let bytes = collected.to_bytes();
                    if bytes.len() < 5 {
                        bail!("no gRPC message in the response");
                    }
                    let r: pb::ModelInferResponse = prost::Message::decode(&bytes[5..])?;
                    if r.raw_output_contents.first().map(Vec::len) != Some(40) {
                        bail!("no 10 logits in the response");
                    }
                    Ok(())
                }
                .await;
                let broken = outcome.is_err() && sender.is_closed();
                record(started, outcome);
                if broken {
                    bail!("the server closed the gRPC connection");
                }
                i += 1;
            }
        }
    }
    Ok(run)
}

/// User + system CPU seconds of a process, from /proc (Linux).
fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // USER_HZ, the unit of these fields, is 100 on Linux whatever the kernel timer.
    Some(ticks / 100.0)
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
    let server_cpu = |pid: Option<u32>| pid.and_then(process_cpu_seconds);
    let mut failed = false;
    // Results per (concurrency, encoding), summed over the rounds.
    struct Sum {
        latencies: Vec<u32>,
        seconds: f64,
        errors: u64,
        first_error: Option<String>,
        rounds_rps: Vec<f64>,
        cpu: f64,
    }
    let mut sums: Vec<((usize, Encoding), Sum)> = Vec::new();
    // Rounds alternate the encodings, so the machine's drift over minutes falls on all alike.
    for _round in 0..cli.rounds.max(1) {
        for &conns in &cli.concurrency {
            for &encoding in &cli.encoding {
                let start = Instant::now();
                let measure_from = start + Duration::from_secs_f64(cli.warmup_secs);
                let until = measure_from + Duration::from_secs_f64(cli.seconds);
                let mut cpu_before = None;
                let runs = runtime.block_on(async {
                    let shared = match encoding {
                        Encoding::GrpcMux => match h2_connect(&cli.grpc).await {
                            Ok(s) => Some(s),
                            Err(e) => return vec![Err(e)],
                        },
                        _ => None,
                    };
                    let tasks: Vec<_> = (0..conns.max(1))
                        .map(|w| {
                            tokio::spawn(worker(
                                Arc::clone(&cli),
                                Arc::clone(&bodies),
                                Arc::clone(&auth),
                                encoding,
                                shared.clone(),
                                w * 7,
                                measure_from,
                                until,
                            ))
                        })
                        .collect();
                    tokio::time::sleep_until(measure_from.into()).await;
                    cpu_before = server_cpu(cli.server_pid);
                    let mut out = Vec::new();
                    for t in tasks {
                        out.push(t.await.map_err(anyhow::Error::from).and_then(|r| r));
                    }
                    out
                });
                let cpu = match (cpu_before, server_cpu(cli.server_pid)) {
                    (Some(a), Some(b)) => b - a,
                    _ => f64::NAN,
                };
                let sum = match sums.iter_mut().find(|(k, _)| *k == (conns, encoding)) {
                    Some((_, s)) => s,
                    None => {
                        sums.push((
                            (conns, encoding),
                            Sum {
                                latencies: Vec::new(),
                                seconds: 0.0,
                                errors: 0,
                                first_error: None,
                                rounds_rps: Vec::new(),
                                cpu: 0.0,
                            },
                        ));
                        &mut sums.last_mut().unwrap().1
                    }
                };
                let before = sum.latencies.len();
                for r in runs {
                    match r {
                        Ok(r) => {
                            sum.latencies.extend(r.latencies_us);
                            sum.errors += r.errors;
                            if sum.first_error.is_none() {
                                sum.first_error = r.first_error;
                            }
                        }
                        Err(e) => {
                            sum.errors += 1;
                            sum.first_error.get_or_insert_with(|| format!("{e:#}"));
                        }
                    }
                }
                sum.seconds += cli.seconds;
                sum.cpu += cpu;
                sum.rounds_rps
                    .push((sum.latencies.len() - before) as f64 / cli.seconds);
            }
        }
    }
    println!(
        "{:<8} {:>5} {:>10} {:>9} {:>9} {:>7} {:>14} {:>16}",
        "encoding", "conns", "req/s", "p50 ms", "p99 ms", "errors", "server us/req", "rounds req/s"
    );
    for ((conns, encoding), mut sum) in sums {
        sum.latencies.sort_unstable();
        let n = sum.latencies.len();
        let rps = n as f64 / sum.seconds;
        let lo = sum.rounds_rps.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = sum.rounds_rps.iter().cloned().fold(0.0, f64::max);
        // Without --server-pid there is no server CPU to report: "-", not NaN.
        let per_req = if sum.cpu.is_finite() {
            format!("{:.0}", sum.cpu * 1e6 / n.max(1) as f64)
        } else {
            "-".to_string()
        };
        println!(
            "{:<8} {:>5} {:>10.0} {:>9.3} {:>9.3} {:>7} {:>14} {:>16}",
            match encoding {
                Encoding::Json => "json",
                Encoding::Binary => "binary",
                Encoding::Grpc => "grpc",
                Encoding::GrpcMux => "grpc-mux",
            },
            conns,
            rps,
            percentile(&sum.latencies, 0.5),
            percentile(&sum.latencies, 0.99),
            sum.errors,
            per_req,
            format!("{lo:.0}–{hi:.0}")
        );
        if let Some(e) = sum.first_error {
            println!("  first error: {e}");
        }
        failed |= sum.errors > 0 || n == 0;
    }
    if failed {
        bail!("some requests failed");
    }
    Ok(())
}
