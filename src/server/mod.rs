//! The prediction server: shared parts (configuration, auth, throttle, TLS, batcher, metrics,
//! errors) and two thin front ends over them, `http` (hyper, HTTP/1.1) and `grpc` (tonic
//! services on hyper's HTTP/2), which only translate their wire formats.

pub mod auth;
pub mod batcher;
pub mod config;
pub mod error;
pub mod grpc;
pub mod http;
pub mod infer;
pub mod metrics;
pub mod probe;
pub mod shutdown;
pub mod throttle;
pub mod tls;

use crate::onnx::OnnxModel;
use crate::preprocess::InputLayout;
use auth::Authenticator;
use batcher::{Batcher, BatcherConfig};
use config::ServeConfig;
use error::ApiError;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use metrics::Metrics;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// The Open Inference Protocol extensions both front ends implement (`GET /v2`, gRPC
/// ServerMetadata).
pub const EXTENSIONS: [&str; 3] = [
    "binary_tensor_data",
    "classification",
    "model_configuration",
];

/// What the protocol front ends say about the served model (metadata and configuration).
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub name: String,
    pub version: String,
    /// One truthful platform string: which runtime runs the ONNX graph.
    pub platform: &'static str,
    pub input_name: String,
    /// The model's own input shape, batch dimension first (-1).
    pub input_shape: Vec<i64>,
    /// Most images one request may carry (`--max-images`): Triton's `max_batch_size`.
    pub max_batch_size: usize,
    /// Most images in one forward pass (`--max-batch-size`): the preferred batch size.
    pub preferred_batch_size: usize,
    pub max_queue_delay_us: u64,
    pub metadata: Vec<(String, String)>,
}

impl ModelInfo {
    fn new(config: &ServeConfig, model: &OnnxModel) -> Self {
        let input_shape = match model.layout() {
            InputLayout::Flat => vec![-1, 784],
            InputLayout::Gray => vec![-1, 1, 28, 28],
            InputLayout::Rgb { size } => vec![-1, 3, size as i64, size as i64],
        };
        Self {
            name: config.resolved_model_name(),
            version: config.model_version.clone(),
            platform: model.platform(),
            input_name: model.input_name().to_string(),
            input_shape,
            max_batch_size: config.max_images,
            preferred_batch_size: config.max_batch_size.max(1),
            max_queue_delay_us: config.max_queue_delay_us,
            metadata: model.metadata().to_vec(),
        }
    }

    /// Checks a model name and optional version from a request (404 / NOT_FOUND otherwise).
    /// gRPC's empty version means "the served one".
    pub fn check(&self, name: &str, version: Option<&str>) -> Result<(), ApiError> {
        if name != self.name {
            return Err(ApiError::UnknownModel(name.chars().take(100).collect()));
        }
        match version {
            Some(v) if !v.is_empty() && v != self.version => Err(ApiError::UnknownVersion {
                model: self.name.clone(),
                version: v.chars().take(100).collect(),
                served: self.version.clone(),
            }),
            _ => Ok(()),
        }
    }
}

/// What every request handler shares.
pub struct AppState {
    pub config: ServeConfig,
    pub model: ModelInfo,
    pub openapi: serde_json::Value,
    pub auth: Arc<Authenticator>,
    pub throttle: throttle::AuthThrottle,
    /// HTTPS / gRPC over TLS when set.
    pub tls: Option<tls::TlsAcceptors>,
    pub batcher: Batcher,
    pub metrics: Arc<Metrics>,
    /// False once shutdown has begun (readiness answers 503).
    pub ready: AtomicBool,
    pub id_prefix: String,
    pub next_id: AtomicU64,
}

impl AppState {
    pub fn new(
        config: ServeConfig,
        model: Arc<OnnxModel>,
        auth: Authenticator,
        tls: Option<tls::TlsAcceptors>,
    ) -> Arc<Self> {
        let metrics = Arc::new(Metrics::default());
        let info = ModelInfo::new(&config, &model);
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
            openapi: http::openapi::document(&info.name, &info.version, config.max_images),
            model: info,
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

    /// Basic auth for a protected route, with the failed-auth throttle of the client's
    /// address; both front ends call this with the header (or gRPC metadata) they got.
    pub async fn authenticate(&self, ip: IpAddr, header: Option<&[u8]>) -> Result<(), ApiError> {
        self.throttle.check(ip)?;
        match self.auth.check(header).await {
            Ok(_) => {
                self.throttle.succeeded(ip);
                Ok(())
            }
            // A request without credentials is the normal first step of Basic auth, not a
            // guess: only wrong credentials count towards the lockout.
            Err(e) if header.is_none() => Err(e),
            Err(e) => {
                if self.throttle.failed(ip) {
                    tracing::warn!(%ip, "too many failed authentication attempts; address locked out");
                }
                Err(e)
            }
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

/// Which front end a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Grpc,
}

/// One connection (plain or TLS), tracked for graceful shutdown: HTTP/1.1 for the HTTP
/// listener, HTTP/2 with the tonic service for the gRPC one.
async fn serve_connection<IO>(
    state: Arc<AppState>,
    peer: SocketAddr,
    io: IO,
    protocol: Protocol,
    watcher: hyper_util::server::graceful::Watcher,
    header_timeout: Duration,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    match protocol {
        Protocol::Http => {
            let svc = service_fn(move |req| http::handle(Arc::clone(&state), peer, req));
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(io), svc);
            let _ = watcher.watch(conn).await;
        }
        Protocol::Grpc => {
            let svc = grpc::connection_service(state, peer);
            let conn = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                // Streams (calls) at once on one connection; the batcher's queue bounds the
                // work, this bounds the per-connection bookkeeping.
                .max_concurrent_streams(grpc::MAX_CONCURRENT_STREAMS)
                .max_header_list_size(64 * 1024)
                .serve_connection(TokioIo::new(io), svc);
            let _ = watcher.watch(conn).await;
        }
    }
}

/// The next connection of an optional listener (never, without one).
async fn accept_on(
    listener: Option<&TcpListener>,
) -> std::io::Result<(tokio::net::TcpStream, SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// Serves until `shutdown` resolves, then stops accepting, lets in-flight requests finish
/// (up to the grace period) and returns. `grpc` is the optional gRPC listener; both share
/// the connection limit.
pub async fn serve(
    state: Arc<AppState>,
    listener: TcpListener,
    grpc: Option<TcpListener>,
    shutdown: impl Future<Output = &'static str>,
) -> std::io::Result<()> {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(
        state.config.max_connections.max(1),
    ));
    let header_timeout = Duration::from_millis(state.config.header_read_timeout_ms.max(1));
    tokio::pin!(shutdown);
    let signal = loop {
        let (accepted, protocol) = tokio::select! {
            a = listener.accept() => (a, Protocol::Http),
            a = accept_on(grpc.as_ref()) => (a, Protocol::Grpc),
            s = &mut shutdown => break s,
        };
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
            let tls = st.tls.as_ref().map(|t| match protocol {
                Protocol::Http => t.http.clone(),
                Protocol::Grpc => t.grpc.clone(),
            });
            match tls {
                None => serve_connection(st, peer, stream, protocol, watcher, header_timeout).await,
                Some(tls) => {
                    // The handshake gets the same deadline as the request headers.
                    match tokio::time::timeout(header_timeout, tls.accept(stream)).await {
                        Ok(Ok(s)) => {
                            serve_connection(st, peer, s, protocol, watcher, header_timeout).await
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
            drop(permit);
        });
    };
    drop(listener);
    drop(grpc);
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
