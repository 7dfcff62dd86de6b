//! TLS for the server with rustls (ring provider), from PEM files.
//!
//! Basic auth sends the password with every request, so anything beyond loopback should be
//! encrypted: either here (`--tls-cert`, `--tls-key`) or by a proxy in front.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::TlsAcceptor;

/// A certificate or key that cannot be used, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS certificate {path}: {message}")]
    Cert { path: PathBuf, message: String },
    #[error("TLS key {path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error(
        "TLS certificate {cert} and key {key} do not make a usable server identity: {message}"
    )]
    Config {
        cert: PathBuf,
        key: PathBuf,
        message: String,
    },
}

/// The TLS acceptors of both listeners, from one certificate and key.
#[derive(Clone)]
pub struct TlsAcceptors {
    /// The HTTP listener: offers `http/1.1` by ALPN (the server speaks HTTP/1.1 there).
    pub http: TlsAcceptor,
    /// The gRPC listener: offers `h2`, which gRPC clients require.
    pub grpc: TlsAcceptor,
}

/// Builds the acceptors from a PEM certificate chain (leaf first) and a PEM private key
/// (PKCS#8, PKCS#1 or SEC1).
pub fn acceptors(cert: &Path, key: &Path) -> Result<TlsAcceptors, TlsError> {
    let config = server_config(cert, key)?;
    let with_alpn = |proto: &[u8]| {
        let mut c = config.clone();
        c.alpn_protocols = vec![proto.to_vec()];
        TlsAcceptor::from(Arc::new(c))
    };
    Ok(TlsAcceptors {
        http: with_alpn(b"http/1.1"),
        grpc: with_alpn(b"h2"),
    })
}

fn server_config(cert: &Path, key: &Path) -> Result<ServerConfig, TlsError> {
    let cert_err = |message: String| TlsError::Cert {
        path: cert.to_path_buf(),
        message,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| cert_err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| cert_err(e.to_string()))?;
    if chain.is_empty() {
        return Err(cert_err("no PEM certificate found".into()));
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        path: key.to_path_buf(),
        message: e.to_string(),
    })?;
    let config_err = |message: String| TlsError::Config {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        message,
    };
    ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| config_err(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|e| config_err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(cert: &Path, key: &Path) -> String {
        match acceptors(cert, key) {
            Ok(_) => panic!("{} / {} accepted", cert.display(), key.display()),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn unusable_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let missing = dir.path().join("missing.pem");
        let err = super::tests::err(&missing, &junk);
        assert!(
            err.contains("certificate") && err.contains("missing.pem"),
            "{err}"
        );
        let err = super::tests::err(&junk, &junk);
        assert!(
            err.contains("junk.pem") && err.contains("no PEM certificate"),
            "{err}"
        );

        let generated = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = dir.path().join("cert.pem");
        std::fs::write(&cert, generated.cert.pem()).unwrap();
        let err = super::tests::err(&cert, &junk);
        assert!(err.contains("TLS key") && err.contains("junk.pem"), "{err}");
        // A key that does not belong to the certificate.
        let other = rcgen::generate_simple_self_signed(vec!["other".into()]).unwrap();
        let key = dir.path().join("key.pem");
        std::fs::write(&key, other.key_pair.serialize_pem()).unwrap();
        assert!(acceptors(&cert, &key).is_err());
        std::fs::write(&key, generated.key_pair.serialize_pem()).unwrap();
        assert!(acceptors(&cert, &key).is_ok());
    }
}
