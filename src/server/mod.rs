//! The prediction server: shared parts (configuration, auth, throttle, TLS, batcher, metrics,
//! errors) and two thin front ends over them, `http` (hyper, HTTP/1.1) and `grpc` (tonic
//! services on hyper's HTTP/2), which only translate their wire formats.

pub mod auth;
pub mod batcher;
pub mod config;
pub mod drain;
pub mod error;
pub mod grpc;
pub mod http;
pub mod images;
pub mod infer;
pub mod limits;
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
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// Image uploads, decoded a bounded number at a time.
    pub images: images::Decoder,
    pub metrics: Arc<Metrics>,
    /// The shutdown phase (readiness answers 503 from the drain on).
    pub shutdown: Arc<drain::Shutdown>,
    pub connections: Arc<drain::Connections>,
    /// Connections per client address (`--max-connections-per-ip`).
    pub per_ip: Arc<limits::PerIp>,
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
        let shutdown = Arc::new(drain::Shutdown::default());
        let metrics = Arc::new(Metrics::with_shutdown(Arc::clone(&shutdown)));
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
        let per_ip = limits::PerIp::new(config.max_connections_per_ip);
        let images = images::Decoder::new(
            config.max_concurrent_decodes,
            crate::photo::DecodeLimits {
                max_side: config.max_image_side,
                max_decoded_bytes: config.max_decoded_image_mib << 20,
            },
        );
        Arc::new(Self {
            openapi: http::openapi::document(&info.name, &info.version, config.max_images),
            model: info,
            config,
            auth: Arc::new(auth),
            throttle,
            tls,
            batcher,
            images,
            metrics,
            shutdown,
            connections: Arc::new(drain::Connections::default()),
            per_ip,
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

    /// A request body bounded by `--body-idle-timeout-ms` and `--body-timeout-secs`.
    pub fn timed<B>(&self, body: B) -> limits::TimedBody<B> {
        limits::TimedBody::new(
            body,
            Duration::from_millis(self.config.body_idle_timeout_ms.max(1)),
            Duration::from_secs(self.config.body_timeout_secs.max(1)),
        )
    }

    /// Ready until shutdown begins.
    pub fn is_ready(&self) -> bool {
        self.shutdown.phase() == drain::Phase::Serving
    }

    /// Runs a request's work unless the grace period ends first; then the request is answered
    /// `ShuttingDown` (503 / UNAVAILABLE), logged and counted, rather than cut off.
    pub async fn unless_expired<T>(
        &self,
        work: impl Future<Output = Result<T, ApiError>>,
    ) -> Result<T, ApiError> {
        tokio::select! {
            biased;
            r = work => r,
            _ = self.shutdown.reached(drain::Phase::Expired) => {
                self.shutdown.unanswered.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("grace period over: answering an unfinished request with 503 / UNAVAILABLE");
                Err(ApiError::ShuttingDown)
            }
        }
    }
}

/// Which front end a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Grpc,
}

/// Drives one connection until it ends, asking it to close gracefully (HTTP/1.1: after the
/// response in progress, at once if idle; HTTP/2: GOAWAY, then in-flight streams finish) once
/// the listeners close, or during the drain once it has been idle for [`drain::IDLE_CLOSE`]
/// or, with `after_a_call` (gRPC), once it has answered a call since the drain began. An
/// HTTP/1.1 connection learns it is going from the `Connection: close` of its responses.
async fn drive<C>(
    conn: C,
    mut phase: tokio::sync::watch::Receiver<drain::Phase>,
    activity: Arc<drain::Activity>,
    after_a_call: bool,
) where
    C: hyper_util::server::graceful::GracefulConnection,
{
    tokio::pin!(conn);
    let mut closing = false;
    let mut watching = true;
    let mut answered_at_drain = None;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        let p = *phase.borrow_and_update();
        let draining = p >= drain::Phase::Draining;
        if draining && answered_at_drain.is_none() {
            answered_at_drain = Some(activity.completed());
        }
        let told = after_a_call && answered_at_drain.is_some_and(|n| activity.completed() > n);
        let idle = draining && activity.idle_for() >= drain::IDLE_CLOSE;
        if !closing && (p >= drain::Phase::Closing || idle || told) {
            conn.as_mut().graceful_shutdown();
            closing = true;
        }
        tokio::select! {
            _ = conn.as_mut() => return,
            r = phase.changed(), if watching && !closing => watching = r.is_ok(),
            _ = tick.tick(), if draining && !closing => {}
        }
    }
}

/// One connection (plain or TLS): HTTP/1.1 for the HTTP listener, HTTP/2 with the tonic
/// service for the gRPC one, counted until it closes.
async fn serve_connection<IO>(
    state: Arc<AppState>,
    peer: SocketAddr,
    io: IO,
    protocol: Protocol,
    header_timeout: Duration,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let _open = state.connections.open();
    let phase = state.shutdown.subscribe();
    let activity = Arc::new(drain::Activity::default());
    match protocol {
        Protocol::Http => {
            let seen = Arc::clone(&activity);
            let st = Arc::clone(&state);
            let svc = service_fn(move |req| {
                let busy = seen.begin();
                let st = Arc::clone(&st);
                async move {
                    let r = http::handle(st, peer, req).await;
                    drop(busy);
                    r
                }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(io), svc);
            drive(conn, phase, activity, false).await;
        }
        Protocol::Grpc => {
            let svc = grpc::connection_service(state, peer, Arc::clone(&activity));
            let conn = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                // Streams (calls) at once on one connection; the batcher's queue bounds the
                // work, this bounds the per-connection bookkeeping.
                .max_concurrent_streams(grpc::MAX_CONCURRENT_STREAMS)
                .max_header_list_size(64 * 1024)
                .serve_connection(TokioIo::new(io), svc);
            drive(conn, phase, activity, true).await;
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

/// Starts serving one accepted connection, within the connection limit.
fn spawn_connection(
    state: &Arc<AppState>,
    slots: &Arc<tokio::sync::Semaphore>,
    accepted: std::io::Result<(tokio::net::TcpStream, SocketAddr)>,
    protocol: Protocol,
    header_timeout: Duration,
) -> Option<()> {
    let (stream, peer) = match accepted {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, "accept failed");
            return None;
        }
    };
    let Ok(permit) = Arc::clone(slots).try_acquire_owned() else {
        tracing::warn!(%peer, "connection limit reached; closing new connection");
        return Some(());
    };
    let Some(ip_slot) = state.per_ip.admit(peer.ip()) else {
        tracing::warn!(%peer, limit = state.config.max_connections_per_ip, "connection limit for this address reached; closing new connection");
        return Some(());
    };
    let _ = stream.set_nodelay(true);
    let st = Arc::clone(state);
    tokio::spawn(async move {
        let tls = st.tls.as_ref().map(|t| match protocol {
            Protocol::Http => t.http.clone(),
            Protocol::Grpc => t.grpc.clone(),
        });
        match tls {
            None => serve_connection(st, peer, stream, protocol, header_timeout).await,
            Some(tls) => {
                // The handshake gets the same deadline as the request headers.
                match tokio::time::timeout(header_timeout, tls.accept(stream)).await {
                    Ok(Ok(s)) => serve_connection(st, peer, s, protocol, header_timeout).await,
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            }
        }
        drop(ip_slot);
        drop(permit);
    });
    Some(())
}

/// A second signal during shutdown: the operator wants out now.
fn exit_now(signal: &str) -> ! {
    tracing::warn!(signal, "second signal during shutdown: exiting at once");
    std::process::exit(1)
}

/// Serves until the first signal (`signals()` resolves), then shuts down as a lame duck (see
/// [`drain`]): readiness 503 and connections told to go for `--drain-delay-secs` while
/// everything is still served; then the listeners close and in-flight work finishes within
/// `--shutdown-grace-secs`; what is still unanswered then gets 503. A second signal exits at
/// once. `grpc` is the optional gRPC listener; both share the connection limit.
pub async fn serve<F>(
    state: Arc<AppState>,
    listener: TcpListener,
    grpc: Option<TcpListener>,
    signals: impl Fn() -> F,
) -> std::io::Result<()>
where
    F: Future<Output = &'static str>,
{
    let slots = Arc::new(tokio::sync::Semaphore::new(
        state.config.max_connections.max(1),
    ));
    let header_timeout = Duration::from_millis(state.config.header_read_timeout_ms.max(1));
    let first = signals();
    tokio::pin!(first);
    let signal = loop {
        let (accepted, protocol) = tokio::select! {
            a = listener.accept() => (a, Protocol::Http),
            a = accept_on(grpc.as_ref()) => (a, Protocol::Grpc),
            s = &mut first => break s,
        };
        if spawn_connection(&state, &slots, accepted, protocol, header_timeout).is_none() {
            // Out of file descriptors and the like: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let second = signals();
    tokio::pin!(second);
    let delay = Duration::from_secs(state.config.drain_delay_secs);
    state.shutdown.set(drain::Phase::Draining);
    tracing::info!(
        signal,
        ?delay,
        "shutting down: readiness 503; draining (still serving, connections told to close)"
    );
    let drain_end = tokio::time::sleep(delay);
    tokio::pin!(drain_end);
    loop {
        let (accepted, protocol) = tokio::select! {
            a = listener.accept() => (a, Protocol::Http),
            a = accept_on(grpc.as_ref()) => (a, Protocol::Grpc),
            _ = &mut drain_end => break,
            s = &mut second => exit_now(s),
        };
        if spawn_connection(&state, &slots, accepted, protocol, header_timeout).is_none() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    drop(listener);
    drop(grpc);
    state.shutdown.set(drain::Phase::Closing);
    let grace = Duration::from_secs(state.config.shutdown_grace_secs);
    tracing::info!(
        connections = state.connections.live(),
        ?grace,
        "listeners closed; finishing in-flight requests"
    );
    tokio::select! {
        _ = state.connections.all_closed() => {
            tracing::info!("all connections closed");
            return Ok(());
        }
        _ = tokio::time::sleep(grace) => {}
        s = &mut second => exit_now(s),
    }
    state.shutdown.set(drain::Phase::Expired);
    tracing::warn!(
        ?grace,
        connections = state.connections.live(),
        "grace period over: unfinished requests get 503 / UNAVAILABLE"
    );
    tokio::select! {
        _ = state.connections.all_closed() => {}
        _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        s = &mut second => exit_now(s),
    }
    let unanswered = state.shutdown.unanswered.load(Ordering::Relaxed);
    tracing::warn!(unanswered, "stopped after the grace period");
    Ok(())
}
