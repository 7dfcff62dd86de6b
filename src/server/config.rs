//! Server settings: every flag has an `FMNIST_*` environment twin.

use clap::{Args, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// `--engine` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EngineChoice {
    /// The planned executor where the graph allows it, else candle-onnx.
    Auto,
    /// candle-onnx's graph interpreter for every graph.
    CandleOnnx,
}

impl From<EngineChoice> for crate::onnx::Engine {
    fn from(e: EngineChoice) -> Self {
        match e {
            EngineChoice::Auto => crate::onnx::Engine::Auto,
            EngineChoice::CandleOnnx => crate::onnx::Engine::CandleOnnx,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    /// ONNX model to serve: input [N,1,28,28], [N,784] or [N,3,S,S] float32 in 0–1, output
    /// [N,10] logits.
    #[arg(long, env = "FMNIST_MODEL", default_value = "weights/fmnist-cnn.onnx")]
    pub model: PathBuf,

    /// What runs the model: 'auto' uses fmnist's planned executor (weights laid out once for
    /// its own convolution and matrix kernels, several times faster) for the plain
    /// Conv/Relu/MaxPool/Flatten/MatMul/Gemm graphs fmnist and PyTorch export, and candle-onnx
    /// for any other graph; 'candle-onnx' always interprets the graph with candle-onnx. The
    /// log line "model loaded" says which one runs and, if candle-onnx, why.
    #[arg(long, env = "FMNIST_ENGINE", value_enum, default_value_t = EngineChoice::Auto)]
    pub engine: EngineChoice,

    /// Name of the model in the v2 routes; defaults to the model file's stem.
    #[arg(long, env = "FMNIST_MODEL_NAME")]
    pub model_name: Option<String>,

    /// The served model's version in the v2 routes (`/v2/models/NAME/versions/VERSION/...`
    /// and gRPC's model_version). Other versions get 404 / NOT_FOUND.
    #[arg(long, env = "FMNIST_MODEL_VERSION", default_value = "1")]
    pub model_version: String,

    /// Address and port to listen on. Use 0.0.0.0:8080 to accept connections from other
    /// machines (and put TLS in front of it: Basic auth sends passwords in every request).
    #[arg(long, env = "FMNIST_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Address and port for the gRPC listener (the Open Inference Protocol's
    /// inference.GRPCInferenceService, as tritonclient.grpc and kserve speak it). Off unless
    /// set; `make serve` uses 127.0.0.1:8081. It shares the HTTP listener's credentials, TLS
    /// files, batcher and limits.
    #[arg(long, env = "FMNIST_GRPC_LISTEN")]
    pub grpc_listen: Option<SocketAddr>,

    /// File of 'user:$argon2id$...' lines (make one with `fmnist-serve hash-password USER`).
    /// For development, FMNIST_BASIC_AUTH=user:password may be set instead or as well.
    #[arg(long, env = "FMNIST_CREDENTIALS_FILE")]
    pub credentials_file: Option<PathBuf>,

    /// PEM certificate chain for HTTPS (with --tls-key). Without it the server speaks plain
    /// HTTP, which is fine on loopback or behind a TLS-terminating proxy.
    #[arg(long, env = "FMNIST_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for --tls-cert (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "FMNIST_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Failed Basic-auth attempts one client address may make within
    /// --auth-failure-window-secs before it is locked out (429 with Retry-After). 0: no limit.
    #[arg(long, env = "FMNIST_AUTH_MAX_FAILURES", default_value_t = 10)]
    pub auth_max_failures: u32,

    /// Window in which failed attempts are counted, in seconds.
    #[arg(long, env = "FMNIST_AUTH_FAILURE_WINDOW_SECS", default_value_t = 60)]
    pub auth_failure_window_secs: u64,

    /// How long a locked-out address gets 429 on authenticated routes, in seconds.
    #[arg(long, env = "FMNIST_AUTH_LOCKOUT_SECS", default_value_t = 60)]
    pub auth_lockout_secs: u64,

    /// Largest request body accepted, in bytes (larger ones get 413 before being read).
    #[arg(long, env = "FMNIST_MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Largest image upload to /predict, in bytes: a raw image body (`Content-Type: image/*`)
    /// or a whole `multipart/form-data` body. Phone photos are 3–8 MB. JSON bodies, base64
    /// images included, keep `--max-body-bytes`.
    #[arg(long, env = "FMNIST_MAX_IMAGE_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_image_bytes: usize,

    /// Largest width or height of an uploaded image, in pixels (413 beyond; read from the
    /// file's header before any pixel is decoded).
    #[arg(long, env = "FMNIST_MAX_IMAGE_SIDE", default_value_t = crate::photo::DEFAULT_LIMITS.max_side)]
    pub max_image_side: u32,

    /// Largest decoded image, in MiB (width x height x bytes per pixel; 413 beyond). With
    /// `--max-concurrent-decodes` it bounds the memory image decoding can take.
    #[arg(long, env = "FMNIST_MAX_DECODED_IMAGE_MIB", default_value_t = crate::photo::DEFAULT_LIMITS.max_decoded_bytes >> 20)]
    pub max_decoded_image_mib: u64,

    /// Images decoded at once; further uploads wait their turn. Decoding a photo takes tens
    /// of milliseconds of CPU and up to `--max-decoded-image-mib` x ~1.7 of memory, so the
    /// default (2) keeps the peak within the Deployment's 512 MiB limit.
    #[arg(long, env = "FMNIST_MAX_CONCURRENT_DECODES", default_value_t = 2)]
    pub max_concurrent_decodes: usize,

    /// Most images in one request (`images` of /predict, N of v2 infer).
    #[arg(long, env = "FMNIST_MAX_IMAGES", default_value_t = 256)]
    pub max_images: usize,

    /// Most images the dynamic batcher puts in one forward pass.
    #[arg(long, env = "FMNIST_MAX_BATCH_SIZE", default_value_t = 64)]
    pub max_batch_size: usize,

    /// Longest a request waits for others to share its forward pass, in microseconds
    /// (0: take only what is already queued).
    #[arg(long, env = "FMNIST_MAX_QUEUE_DELAY_US", default_value_t = 500)]
    pub max_queue_delay_us: u64,

    /// Requests that may wait for the model; beyond it, 503 with Retry-After.
    #[arg(long, env = "FMNIST_QUEUE_CAPACITY", default_value_t = 1024)]
    pub queue_capacity: usize,

    /// Most images waiting for the model, all queued requests together; beyond it, 503 with
    /// Retry-After. Bounds the memory held by queued requests (~3 KB per image).
    #[arg(long, env = "FMNIST_MAX_QUEUED_IMAGES", default_value_t = 2048)]
    pub max_queued_images: usize,

    /// Most open client connections; further ones are closed at once.
    #[arg(long, env = "FMNIST_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,

    /// Most open connections from one client address (both listeners together); further
    /// ones from it are closed at once, others are unaffected. 0 turns the limit off: do
    /// that behind an ingress or proxy, where every client has the proxy's address.
    #[arg(long, env = "FMNIST_MAX_CONNECTIONS_PER_IP", default_value_t = 64)]
    pub max_connections_per_ip: usize,

    /// The longest gap in a request body with no bytes arriving, in milliseconds; a body
    /// that stalls longer gets 408 and its connection is closed (gRPC: DEADLINE_EXCEEDED).
    /// Slow but live uploads are fine.
    #[arg(long, env = "FMNIST_BODY_IDLE_TIMEOUT_MS", default_value_t = 10_000)]
    pub body_idle_timeout_ms: u64,

    /// The longest a whole request body may take to arrive, in seconds (408 after it).
    #[arg(long, env = "FMNIST_BODY_TIMEOUT_SECS", default_value_t = 60)]
    pub body_timeout_secs: u64,

    /// A client must send its request headers within this many milliseconds.
    #[arg(long, env = "FMNIST_HEADER_READ_TIMEOUT_MS", default_value_t = 5000)]
    pub header_read_timeout_ms: u64,

    /// On SIGTERM/Ctrl-C, how long to keep serving as a lame duck before closing the
    /// listeners, in seconds: readiness answers 503 at once so a load balancer (or the
    /// Kubernetes endpoint controller) stops routing here, while every request is still
    /// served, HTTP/1.1 responses carry `Connection: close` and gRPC connections get GOAWAY.
    /// Kubernetes: keep terminationGracePeriodSeconds above this plus --shutdown-grace-secs.
    #[arg(long, env = "FMNIST_DRAIN_DELAY_SECS", default_value_t = 5)]
    pub drain_delay_secs: u64,

    /// After the drain, how long in-flight requests may take to finish, in seconds; those
    /// still unanswered then get 503 (gRPC: UNAVAILABLE). A second signal exits at once.
    #[arg(long, env = "FMNIST_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub shutdown_grace_secs: u64,

    /// Log format.
    #[arg(long, env = "FMNIST_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl ServeConfig {
    /// The model's name in the v2 routes.
    pub fn resolved_model_name(&self) -> String {
        self.model_name.clone().unwrap_or_else(|| {
            self.model
                .file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_else(|| "fmnist".into())
        })
    }
}
