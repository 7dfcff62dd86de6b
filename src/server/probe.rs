//! A readiness probe that needs nothing but the server binary itself.
//!
//! The container image is `FROM scratch`: there is no shell, curl or wget for a
//! `HEALTHCHECK`. `fmnist-serve healthcheck` runs this instead: one plain HTTP/1.1
//! `GET /v2/health/ready` over a blocking socket with a deadline, success only on `200`.
//! For a server running HTTPS, the probe speaks TLS and trusts exactly the certificate the
//! server was given (`FMNIST_TLS_CERT`), whatever names it carries: it talks to itself.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::{
    verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms,
};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::{
    self, ClientConfig, ClientConnection, DigitallySignedStruct, StreamOwned,
};

/// A blocking byte stream (plain TCP or TLS over it).
trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// Why the probe failed; the message is what the container runtime shows.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("talking to {addr}: {source}")]
    Io {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS certificate {path}: {message}")]
    Cert { path: String, message: String },
    #[error("{addr} answered {status_line:?} to GET {path}, not 200")]
    NotReady {
        addr: SocketAddr,
        path: String,
        status_line: String,
    },
}

/// The address to dial for a server configured to listen on `listen`: a wildcard
/// address (`0.0.0.0`, `::`) is reached through loopback.
pub fn dial_address(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// GETs `path` on `addr` and succeeds only when the status is 200; every step (connect,
/// write, read) is bounded by `timeout`. Returns the status line.
pub fn probe(addr: SocketAddr, path: &str, timeout: Duration) -> Result<String, ProbeError> {
    let mut stream = connect(addr, timeout)?;
    exchange(&mut stream, addr, path)
}

/// [`probe`] over TLS, trusting only the leaf certificate in the PEM file `cert`.
pub fn probe_tls(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
    cert: &std::path::Path,
) -> Result<String, ProbeError> {
    let cert_err = |message: String| ProbeError::Cert {
        path: cert.display().to_string(),
        message,
    };
    let leaf = CertificateDer::pem_file_iter(cert)
        .map_err(|e| cert_err(e.to_string()))?
        .next()
        .ok_or_else(|| cert_err("no PEM certificate found".into()))?
        .map_err(|e| cert_err(e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(PinnedCert {
        leaf: leaf.into_owned(),
        algorithms: provider.signature_verification_algorithms,
    });
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| cert_err(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    let name = ServerName::IpAddress(addr.ip().into());
    let conn = ClientConnection::new(Arc::new(config), name).map_err(|e| ProbeError::Io {
        addr,
        source: std::io::Error::other(e),
    })?;
    let mut stream = StreamOwned::new(conn, connect(addr, timeout)?);
    exchange(&mut stream, addr, path)
}

/// Accepts exactly one certificate (the server's own), with real signature checks.
#[derive(Debug)]
struct PinnedCert {
    leaf: CertificateDer<'static>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.leaf.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the server's certificate is not the one in FMNIST_TLS_CERT".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ProbeError> {
    let stream = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|source| ProbeError::Connect { addr, source })?;
    let io = |source| ProbeError::Io { addr, source };
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    Ok(stream)
}

/// Sends the GET and reads the status line.
fn exchange(
    stream: &mut impl ReadWrite,
    addr: SocketAddr,
    path: &str,
) -> Result<String, ProbeError> {
    let io = |source| ProbeError::Io { addr, source };
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).map_err(io)?;
    // Only the status line matters; read until the first line ends (or the peer closes).
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 4096 {
        let n = stream.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head);
    let status_line = text.lines().next().unwrap_or("").trim().to_string();
    let code = status_line.split_whitespace().nth(1);
    if status_line.starts_with("HTTP/1.") && code == Some("200") {
        Ok(status_line)
    } else {
        Err(ProbeError::NotReady {
            addr,
            path: path.to_string(),
            status_line,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A one-shot peer that answers the first request with `reply`.
    fn peer(reply: &'static str) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            s.write_all(reply.as_bytes()).unwrap();
        });
        addr
    }

    #[test]
    fn wildcard_listen_addresses_are_dialled_on_loopback() {
        assert_eq!(
            dial_address("0.0.0.0:8080".parse().unwrap()),
            "127.0.0.1:8080".parse().unwrap()
        );
        assert_eq!(
            dial_address("[::]:9".parse().unwrap()),
            "[::1]:9".parse().unwrap()
        );
        assert_eq!(
            dial_address("10.1.2.3:7".parse().unwrap()),
            "10.1.2.3:7".parse().unwrap()
        );
    }

    #[test]
    fn only_a_200_passes() {
        let t = Duration::from_secs(2);
        let ok = peer("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
        assert_eq!(probe(ok, "/v2/health/ready", t).unwrap(), "HTTP/1.1 200 OK");
        let draining = peer("HTTP/1.1 503 Service Unavailable\r\n\r\n");
        let err = probe(draining, "/v2/health/ready", t).unwrap_err();
        assert!(err.to_string().contains("503"), "{err}");
        let garbage = peer("SSH-2.0-OpenSSH 200\r\n");
        assert!(matches!(
            probe(garbage, "/", t),
            Err(ProbeError::NotReady { .. })
        ));
    }

    #[test]
    fn a_closed_port_and_a_silent_peer_fail_within_the_deadline() {
        let closed = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        assert!(matches!(
            probe(closed, "/", Duration::from_secs(2)),
            Err(ProbeError::Connect { .. })
        ));
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = silent.local_addr().unwrap();
        let started = std::time::Instant::now();
        let err = probe(addr, "/", Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err, ProbeError::Io { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
        drop(silent);
    }
}
