//! Starting the real `fmnist-serve` binary on an ephemeral loopback port for tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const USER: &str = "tester";
pub const PASSWORD: &str = "correct-horse-battery";

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn shipped_model() -> PathBuf {
    repo().join("weights/fmnist-cnn.onnx")
}

/// The fixture images (first 400 of the official test set) and their labels.
pub fn fixture() -> (Vec<Vec<u8>>, Vec<u8>) {
    let text = std::fs::read_to_string(repo().join("fixtures/sample.csv")).unwrap();
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for line in text.lines().skip(1) {
        let v: Vec<u8> = line.split(',').map(|f| f.parse().unwrap()).collect();
        labels.push(v[0]);
        images.push(v[1..].to_vec());
    }
    (images, labels)
}

pub struct Server {
    child: Child,
    pub addr: String,
    /// The gRPC listener's address, when started with `--grpc-listen`.
    pub grpc_addr: Option<String>,
    pub base: String,
    stderr: Arc<Mutex<String>>,
}

impl Server {
    /// Starts the server with the shipped model and development credentials, plus `args`.
    pub fn start(args: &[&str]) -> Server {
        Self::start_with(
            args,
            &[("FMNIST_BASIC_AUTH", &format!("{USER}:{PASSWORD}"))],
        )
    }

    pub fn start_with(args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fmnist-serve"));
        if !args.contains(&"--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        if !args.contains(&"--model") {
            cmd.arg("--model").arg(shipped_model());
        }
        cmd.args(args)
            .env_remove("FMNIST_BASIC_AUTH")
            .env_remove("FMNIST_CREDENTIALS_FILE")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("starting fmnist-serve");
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err = child.stderr.take().unwrap();
        let sink = Arc::clone(&stderr);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let grpc_addr = Arc::new(Mutex::new(None));
        let grpc_seen = Arc::clone(&grpc_addr);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // The gRPC line comes first, so it is read before the HTTP one.
                if let Some(a) = line.strip_prefix("fmnist-serve grpc listening on ") {
                    *grpc_seen.lock().unwrap() = Some(a.to_string());
                }
                let addr = line
                    .strip_prefix("fmnist-serve listening on http://")
                    .or_else(|| line.strip_prefix("fmnist-serve listening on https://"));
                if let Some(addr) = addr {
                    let _ = tx.send(addr.to_string());
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!("server did not start; stderr:\n{}", stderr.lock().unwrap());
            }
        };
        let grpc_addr = grpc_addr.lock().unwrap().clone();
        let server = Server {
            child,
            base: format!("http://{addr}"),
            addr,
            grpc_addr,
            stderr,
        };
        // The address reaches stdout and stderr through separate pipes and reader threads; wait
        // until stderr has caught up (its "listening" line names the address), so that every
        // start-up warning, all written before it, is in `logs()`.
        server.wait_for_log(&server.addr.clone(), Duration::from_secs(10));
        server
    }

    /// Waits until the server's stderr contains `needle` (true) or `limit` passes (false).
    pub fn wait_for_log(&self, needle: &str, limit: Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if self.logs().contains(needle) {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn logs(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits for the exit status (at most `limit`).
    pub fn terminate(self, limit: Duration) -> std::process::ExitStatus {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        self.wait_exit(limit)
    }

    /// Sends SIGTERM, waits for the exit (at most `limit`), and returns the status and the
    /// whole log.
    pub fn terminate_logged(self, limit: Duration) -> (std::process::ExitStatus, String) {
        let stderr = Arc::clone(&self.stderr);
        let status = self.terminate(limit);
        // The reader thread drains the closed pipe.
        std::thread::sleep(Duration::from_millis(200));
        let logs = stderr.lock().unwrap().clone();
        (status, logs)
    }

    /// Waits for the process to exit (at most `limit`) and returns its status.
    pub fn wait_exit(mut self, limit: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                start.elapsed() < limit,
                "server did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A response read off the wire.
#[derive(Debug)]
pub struct Raw {
    pub status: u16,
    pub head: String,
    pub body: String,
    /// The body as sent (binary responses).
    pub bytes: Vec<u8>,
}

impl Raw {
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// Sends raw bytes on a fresh connection (closing after the request) and reads the response.
pub fn raw(addr: &str, request: &[u8]) -> Raw {
    raw_on(TcpStream::connect(addr).unwrap(), request)
}

/// A blocking connection to `addr` from the local address `from` (e.g. 127.0.0.2: all of
/// 127/8 is loopback on Linux), to act as a different client.
pub fn connect_from(from: &str, addr: &str) -> TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stream = rt.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
        socket.connect(addr.parse().unwrap()).await.unwrap()
    });
    let std = stream.into_std().unwrap();
    std.set_nonblocking(false).unwrap();
    std
}

/// Like [`raw`] on an already open connection.
pub fn raw_on(mut s: TcpStream, request: &[u8]) -> Raw {
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // No write shutdown: hyper treats a half-closed connection as gone. `Connection: close`
    // makes the server close after answering.
    // A server may answer (413, 431) and close before the whole request is sent.
    if let Err(e) = s.write_all(request) {
        use std::io::ErrorKind::{BrokenPipe, ConnectionReset};
        assert!(matches!(e.kind(), BrokenPipe | ConnectionReset), "{e}");
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    parse_response(&out)
}

pub fn parse_response(bytes: &[u8]) -> Raw {
    let split = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(bytes.len(), |i| i + 4);
    let body_bytes = bytes[split..].to_vec();
    let text = String::from_utf8_lossy(bytes).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    Raw {
        status,
        head: head.to_string(),
        body: body.to_string(),
        bytes: body_bytes,
    }
}

/// A request with any headers and a byte body (the binary tensor extension).
pub fn request_bytes(method: &str, path: &str, headers: &[(&str, String)], body: &[u8]) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut r = r.into_bytes();
    r.extend_from_slice(body);
    r
}

/// A binary-extension infer body: the JSON header, then `binary`; returns the body and the
/// header's length.
pub fn binary_body(head: &serde_json::Value, binary: &[u8]) -> (Vec<u8>, usize) {
    let mut body = head.to_string().into_bytes();
    let n = body.len();
    body.extend_from_slice(binary);
    (body, n)
}

/// POSTs a binary-extension body to the v2 infer route with the test credentials.
pub fn post_binary(addr: &str, path: &str, body: &[u8], header_len: Option<usize>) -> Raw {
    let mut headers = vec![("Authorization", basic(USER, PASSWORD))];
    if let Some(n) = header_len {
        headers.push(("Inference-Header-Content-Length", n.to_string()));
    }
    raw(addr, &request_bytes("POST", path, &headers, body))
}

/// Little-endian FP32 bytes.
pub fn le_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A binary response's outputs: the JSON header, and each output's bytes by name.
pub fn split_binary(r: &Raw) -> (serde_json::Value, Vec<(String, Vec<u8>)>) {
    let n: usize = r
        .header("inference-header-content-length")
        .expect("a binary response")
        .parse()
        .unwrap();
    let head: serde_json::Value = serde_json::from_slice(&r.bytes[..n]).unwrap();
    let mut at = n;
    let mut parts = Vec::new();
    for o in head["outputs"].as_array().unwrap() {
        if let Some(size) = o["parameters"]["binary_data_size"].as_u64() {
            let size = size as usize;
            parts.push((
                o["name"].as_str().unwrap().to_string(),
                r.bytes[at..at + size].to_vec(),
            ));
            at += size;
        }
    }
    assert_eq!(at, r.bytes.len(), "bytes left over in the response");
    (head, parts)
}

pub fn basic(user: &str, password: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// A request with the right credentials unless `auth` says otherwise.
pub fn request(
    method: &str,
    path: &str,
    auth: Option<&str>,
    ctype: Option<&str>,
    body: &str,
) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    if let Some(a) = auth {
        r.push_str(&format!("Authorization: {a}\r\n"));
    }
    if let Some(c) = ctype {
        r.push_str(&format!("Content-Type: {c}\r\n"));
    }
    r.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    r.into_bytes()
}

/// POSTs a JSON text to `addr` with the test credentials (usable from other threads).
pub fn post_to(addr: &str, path: &str, body: &str) -> Raw {
    let auth = basic(USER, PASSWORD);
    raw(
        addr,
        &request("POST", path, Some(&auth), Some("application/json"), body),
    )
}

/// POSTs JSON with the test credentials.
pub fn post(server: &Server, path: &str, body: &serde_json::Value) -> Raw {
    post_to(&server.addr, path, &body.to_string())
}

pub fn get(server: &Server, path: &str, auth: bool) -> Raw {
    let a = basic(USER, PASSWORD);
    raw(
        &server.addr,
        &request("GET", path, auth.then_some(a.as_str()), None, ""),
    )
}

/// The sibling `fmnist-train` binary built by `cargo test --workspace`.
pub fn train_binary() -> PathBuf {
    let serve = Path::new(env!("CARGO_BIN_EXE_fmnist-serve"));
    let p = serve.with_file_name("fmnist-train");
    assert!(
        p.exists(),
        "{} not built: run the tests with `cargo test --workspace` (make test does)",
        p.display()
    );
    p
}

/// A self-signed certificate for `localhost`, written into a new temporary folder.
pub struct SelfSigned {
    /// Keeps the files alive.
    pub dir: tempfile::TempDir,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The certificate in PEM, for clients to trust.
    pub pem: String,
}

impl SelfSigned {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let generated = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert, generated.cert.pem()).unwrap();
        std::fs::write(&key, generated.key_pair.serialize_pem()).unwrap();
        SelfSigned {
            dir,
            cert,
            key,
            pem: generated.cert.pem(),
        }
    }

    /// `--tls-cert CERT --tls-key KEY`.
    pub fn args(&self) -> [&str; 4] {
        [
            "--tls-cert",
            self.cert.to_str().unwrap(),
            "--tls-key",
            self.key.to_str().unwrap(),
        ]
    }
}
