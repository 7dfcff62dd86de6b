//! `fmnist-serve`: load an ONNX model, warm it up, then serve predictions over HTTP.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use fmnist::server::auth::{hash_password, Authenticator};
use fmnist::server::config::{LogFormat, ServeConfig};
use fmnist::server::{probe, serve, shutdown, AppState};
use fmnist::OnnxModel;
use std::io::{BufRead, IsTerminal, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "fmnist-serve",
    version,
    // The subcommands (hash-password, healthcheck) ignore the server's own settings, so an
    // environment set up for the server (FMNIST_TLS_CERT without its key, say) does not
    // stop them.
    args_conflicts_with_subcommands = true,
    about = "Serve a Fashion-MNIST ONNX model over HTTP and gRPC (POST /predict and the Open Inference Protocol v2).",
    long_about = "Serve a Fashion-MNIST ONNX model over HTTP and, with --grpc-listen, gRPC.\n\n\
        Routes: POST /predict, the Open Inference Protocol (KServe v2 / Triton) under /v2 with \
        JSON or binary tensors, model configuration and versioned paths, GET /metrics \
        (Prometheus), GET /openapi.json. gRPC: inference.GRPCInferenceService, as \
        tritonclient.grpc and kserve speak it. Prediction, model-metadata and configuration \
        need HTTP Basic auth (gRPC: the authorization metadata); health, readiness and \
        metrics are open.\n\n\
        Credentials: --credentials-file with 'user:$argon2id$...' lines (see the hash-password \
        subcommand), or FMNIST_BASIC_AUTH=user:password for development. There are no built-in \
        credentials: the server refuses to start without any.\n\n\
        Every option can also be set through the environment variable shown beside it."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeConfig,
}

#[derive(Subcommand)]
enum Command {
    /// Read a password from standard input and print a credentials-file line for USER.
    HashPassword {
        /// The user name.
        user: String,
    },
    /// Exit 0 if a server answers 200 on its readiness route, 1 otherwise. For container
    /// HEALTHCHECKs in images without a shell or curl.
    Healthcheck {
        /// The server's listen address (0.0.0.0 and :: are dialled on loopback).
        #[arg(long, env = "FMNIST_LISTEN", default_value = "127.0.0.1:8080")]
        address: std::net::SocketAddr,
        /// Path to GET.
        #[arg(long, default_value = "/v2/health/ready")]
        path: String,
        /// Deadline for connecting and for each read and write, in milliseconds.
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
        /// The server's HTTPS certificate: when set (as it is for a server started with
        /// --tls-cert), the probe speaks TLS and trusts exactly this certificate.
        #[arg(long, env = "FMNIST_TLS_CERT")]
        tls_cert: Option<std::path::PathBuf>,
    },
}

// Each forward pass allocates and frees its activation buffers; mimalloc keeps that cheap,
// above all in the static musl build of the container image, whose own malloc is slow.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FMNIST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn hash_command(user: &str) -> Result<()> {
    anyhow::ensure!(
        !user.is_empty() && !user.contains(':'),
        "the user name must be non-empty and contain no ':'"
    );
    eprint!("password for {user} (read from standard input): ");
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading the password")?;
    let password = line.trim_end_matches(['\r', '\n']);
    anyhow::ensure!(!password.is_empty(), "the password is empty");
    eprintln!();
    println!("{user}:{}", hash_password(password)?);
    Ok(())
}

fn main() -> std::process::ExitCode {
    fmnist::report::exit_code(run())
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    match &cli.command {
        Some(Command::HashPassword { user }) => return hash_command(user),
        Some(Command::Healthcheck {
            address,
            path,
            timeout_ms,
            tls_cert,
        }) => {
            let addr = probe::dial_address(*address);
            let timeout = Duration::from_millis(*timeout_ms);
            let status = match tls_cert {
                Some(cert) => probe::probe_tls(addr, path, timeout, cert)?,
                None => probe::probe(addr, path, timeout)?,
            };
            println!("{addr}{path}: {status}");
            return Ok(());
        }
        None => {}
    }
    let cfg = cli.serve;
    init_logging(cfg.log_format);

    let dev_pair = std::env::var("FMNIST_BASIC_AUTH")
        .ok()
        .filter(|s| !s.is_empty());
    let auth = Authenticator::from_sources(cfg.credentials_file.as_deref(), dev_pair.as_deref())?;
    let source = match (&cfg.credentials_file, &dev_pair) {
        (Some(f), Some(_)) => format!("{} and FMNIST_BASIC_AUTH (development)", f.display()),
        (Some(f), None) => f.display().to_string(),
        _ => "FMNIST_BASIC_AUTH (development credentials)".into(),
    };
    tracing::info!(users = auth.user_count(), %source, "Basic auth configured");

    if let Some(warning) = cfg
        .credentials_file
        .as_deref()
        .and_then(fmnist::server::auth::permission_warning)
    {
        tracing::warn!("{warning}");
    }
    let tls = match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(cert), Some(key)) => Some(fmnist::server::tls::acceptors(cert, key)?),
        _ => None,
    };

    let started = Instant::now();
    // Requests arrive with gaps between them and the other cores serve HTTP meanwhile, so one
    // image runs on the batching thread alone (see Plan::split_single_images).
    let model = Arc::new(
        OnnxModel::load(&cfg.model)?
            .with_engine(cfg.engine.into())
            .with_single_image_split(false),
    );
    model.warm_up().context("warming up the model")?;
    tracing::info!(
        model = %cfg.model.display(),
        name = %cfg.resolved_model_name(),
        layout = ?model.layout(),
        engine = %model.engine_description(),
        bytes = model.size_bytes(),
        ms = started.elapsed().as_millis() as u64,
        "model loaded and warmed up"
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("fmnist-http")
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("cannot listen on {}", cfg.listen))?;
        let addr = listener.local_addr()?;
        if tls.is_none() && !addr.ip().is_loopback() {
            tracing::warn!(%addr, "listening beyond loopback over plain HTTP: Basic auth passwords travel unencrypted; use --tls-cert/--tls-key or put TLS in front");
        }
        let grpc = match cfg.grpc_listen {
            None => None,
            Some(at) => Some(
                tokio::net::TcpListener::bind(at)
                    .await
                    .with_context(|| format!("cannot listen for gRPC on {at}"))?,
            ),
        };
        let grpc_addr = grpc.as_ref().map(|l| l.local_addr()).transpose()?;
        if let Some(a) = grpc_addr {
            if tls.is_none() && !a.ip().is_loopback() {
                tracing::warn!(addr = %a, "gRPC listening beyond loopback without TLS: Basic auth passwords travel unencrypted; use --tls-cert/--tls-key or put TLS in front");
            }
        }
        let scheme = if tls.is_some() { "https" } else { "http" };
        let state = AppState::new(cfg, model, auth, tls);
        tracing::info!(%addr, scheme, "listening");
        // Plain lines on stdout too, for scripts and tests that wait for the ports. The gRPC
        // line comes first: a reader that sees the HTTP line has seen both.
        if let Some(a) = grpc_addr {
            tracing::info!(addr = %a, tls = scheme == "https", "gRPC listening");
            println!("fmnist-serve grpc listening on {a}");
        }
        println!("fmnist-serve listening on {scheme}://{addr}");
        std::io::stdout().flush().ok();
        serve(state, listener, grpc, shutdown::signal).await?;
        tracing::info!("stopped");
        Ok(())
    })
}
