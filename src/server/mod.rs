//! The HTTP prediction server: hyper 1 + tokio, Basic auth, dynamic batching, metrics.

pub mod api;
pub mod auth;
pub mod batcher;
pub mod config;
pub mod error;
#[cfg(test)]
mod fuzz;
pub mod json;
pub mod metrics;
pub mod openapi;
pub mod probe;
pub mod routes;
pub mod shutdown;
pub mod throttle;
pub mod tls;

use crate::onnx::OnnxModel;
use crate::preprocess::InputLayout;
use auth::Authenticator;
use batcher::{Batcher, BatcherConfig};
use config::ServeConfig;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics::Metrics;
use serde_json::{json, Value};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// What every request handler shares.
pub struct AppState {
    pub config: ServeConfig,
    pub model_name: String,
    pub model_metadata: Value,
    pub openapi: Value,
    pub auth: Arc<Authenticator>,
    pub throttle: throttle::AuthThrottle,
    /// HTTPS when set.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub batcher: Batcher,
    pub metrics: Arc<Metrics>,
    /// False once shutdown has begun (readiness answers 503).
    pub ready: AtomicBool,
    pub id_prefix: String,
    pub next_id: AtomicU64,
}

fn model_metadata(name: &str, model: &OnnxModel) -> Value {
    let shape: Vec<i64> = match model.layout() {
        InputLayout::Flat => vec![-1, 784],
        InputLayout::Gray => vec![-1, 1, 28, 28],
        InputLayout::Rgb { size } => vec![-1, 3, size as i64, size as i64],
    };
    json!({
        "name": name,
        "versions": ["1"],
        "platform": "onnx_candle",
        "inputs": [{ "name": model.input_name(), "datatype": "FP32", "shape": shape }],
        "outputs": [{ "name": "logits", "datatype": "FP32", "shape": [-1, 10] },
                    { "name": "probabilities", "datatype": "FP32", "shape": [-1, 10] }],
        "parameters": {
            "class_names": crate::CLASS_NAMES,
            "v2_input_shapes": [[-1, 784], [-1, 1, 28, 28]],
            "note": "v2 inputs are gray 28x28 pixels within 0–1; the server resizes for 3-channel models",
            "metadata": model.metadata().iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
        }
    })
}

impl AppState {
    pub fn new(
        config: ServeConfig,
        model: Arc<OnnxModel>,
        auth: Authenticator,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Arc<Self> {
        let metrics = Arc::new(Metrics::default());
        let batcher = Batcher::start(
            Arc::clone(&model),
            BatcherConfig {
                max_batch: config.max_batch_size.max(1),
                max_delay: Duration::from_micros(config.max_queue_delay_us),
                queue_capacity: config.queue_capacity,
                max_queued_images: config.max_queued_images,
            },
            Arc::clone(&metrics),
        );
        let model_name = config.resolved_model_name();
        let throttle = throttle::AuthThrottle::new(
            config.auth_max_failures,
            Duration::from_secs(config.auth_failure_window_secs.max(1)),
            Duration::from_secs(config.auth_lockout_secs.max(1)),
        );
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        Arc::new(Self {
            model_metadata: model_metadata(&model_name, &model),
            openapi: openapi::document(&model_name, config.max_images),
            model_name,
            config,
            auth: Arc::new(auth),
            throttle,
            tls,
            batcher,
            metrics,
            ready: AtomicBool::new(true),
            id_prefix: format!("{:x}", nanos & 0xffff_ffff),
            next_id: AtomicU64::new(1),
        })
    }
}

/// One HTTP/1.1 connection (plain or TLS), tracked for graceful shutdown.
async fn serve_connection<IO>(
    state: Arc<AppState>,
    peer: std::net::SocketAddr,
    io: IO,
    watcher: hyper_util::server::graceful::Watcher,
    header_timeout: Duration,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| routes::handle(Arc::clone(&state), peer, req));
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(io), svc);
    let _ = watcher.watch(conn).await;
}

/// Serves until `shutdown` resolves, then stops accepting, lets in-flight requests finish
/// (up to the grace period) and returns.
pub async fn serve(
    state: Arc<AppState>,
    listener: TcpListener,
    shutdown: impl Future<Output = &'static str>,
) -> std::io::Result<()> {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(
        state.config.max_connections.max(1),
    ));
    let header_timeout = Duration::from_millis(state.config.header_read_timeout_ms.max(1));
    tokio::pin!(shutdown);
    let signal = loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
                    tracing::warn!(%peer, "connection limit reached; closing new connection");
                    drop(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let st = Arc::clone(&state);
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    match st.tls.clone() {
                        None => serve_connection(st, peer, stream, watcher, header_timeout).await,
                        Some(tls) => {
                            // The handshake gets the same deadline as the request headers.
                            match tokio::time::timeout(header_timeout, tls.accept(stream)).await {
                                Ok(Ok(s)) => {
                                    serve_connection(st, peer, s, watcher, header_timeout).await
                                }
                                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                            }
                        }
                    }
                    drop(permit);
                });
            }
            s = &mut shutdown => break s,
        }
    };
    drop(listener);
    state.ready.store(false, Ordering::SeqCst);
    tracing::info!(
        signal,
        "shutting down: no new connections; finishing in-flight requests"
    );
    let grace = Duration::from_secs(state.config.shutdown_grace_secs);
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all connections closed"),
        _ = tokio::time::sleep(grace) => tracing::warn!(?grace, "grace period over; closing remaining connections"),
    }
    Ok(())
}
