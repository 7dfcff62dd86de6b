//! Security end to end: HTTPS with a certificate generated here, failed-auth throttling per
//! client address, credentials kept out of logs, bodies and metrics, start-up warnings.

mod common;

use common::*;
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;
use tokio_rustls::rustls;

/// One HTTPS request trusting only `ca_pem`, by name `localhost`; returns the raw response.
fn https(addr: &str, ca_pem: &str, request: &[u8]) -> Raw {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let conn =
        rustls::ClientConnection::new(Arc::new(config), ServerName::try_from("localhost").unwrap())
            .unwrap();
    let tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(request).unwrap();
    let mut out = Vec::new();
    // The server closes after answering (Connection: close); a missing close_notify is fine.
    let _ = tls.read_to_end(&mut out);
    parse_response(&out)
}

#[test]
fn https_with_a_certificate_generated_in_the_test() {
    let tls = SelfSigned::new();
    let (cert, dir) = (tls.cert.clone(), tls.dir.path());
    let s = Server::start(&tls.args());
    let (images, labels) = fixture();
    let body = format!("{{\"image\":{:?}}}", images[0]);
    let auth = basic(USER, PASSWORD);
    let r = https(
        &s.addr,
        &tls.pem,
        &request(
            "POST",
            "/predict",
            Some(&auth),
            Some("application/json"),
            &body,
        ),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["label"], labels[0] as u64);
    let r = https(
        &s.addr,
        &tls.pem,
        &request("POST", "/predict", None, Some("application/json"), &body),
    );
    assert_eq!(r.status, 401);
    // Plain HTTP on the TLS port gets no HTTP answer, and the server carries on.
    let mut plain = std::net::TcpStream::connect(&s.addr).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    plain
        .write_all(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = Vec::new();
    let _ = plain.read_to_end(&mut out);
    assert!(!String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"));
    let r = https(
        &s.addr,
        &tls.pem,
        b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    assert!(!s.logs().contains("listening beyond loopback"));
    // The container HEALTHCHECK (`fmnist-serve healthcheck`) follows the server to HTTPS
    // through the same FMNIST_TLS_CERT, and trusts only that certificate.
    let healthcheck = |cert: Option<&std::path::Path>| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_fmnist-serve"));
        c.arg("healthcheck").env("FMNIST_LISTEN", &s.addr);
        match cert {
            Some(p) => c.env("FMNIST_TLS_CERT", p),
            None => c.env_remove("FMNIST_TLS_CERT"),
        };
        c.output().unwrap()
    };
    let out = healthcheck(Some(&cert));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !healthcheck(None).status.success(),
        "plain HTTP probe of an HTTPS server passed"
    );
    let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let other_cert = dir.join("other.pem");
    std::fs::write(&other_cert, other.cert.pem()).unwrap();
    let out = healthcheck(Some(&other_cert));
    assert!(!out.status.success(), "a different certificate was trusted");

    // Half a configuration is refused by the flag parser; a bad key is named.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fmnist-serve"))
        .args(["--tls-cert", cert.to_str().unwrap()])
        .env("FMNIST_BASIC_AUTH", "a:b")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-key"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fmnist-serve"))
        .args(["--tls-cert", cert.to_str().unwrap(), "--tls-key"])
        .arg(&cert)
        .env("FMNIST_BASIC_AUTH", "a:b")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("TLS key") && err.contains("cert.pem"), "{err}");
}

#[test]
fn failed_logins_lock_out_that_address_only() {
    let s = Server::start(&["--auth-max-failures", "3", "--auth-lockout-secs", "2"]);
    let (images, _) = fixture();
    let body = format!("{{\"image\":{:?}}}", images[1]);
    let wrong = basic(USER, "guess");
    let good = basic(USER, PASSWORD);
    let send = |from: &str, auth: Option<&str>| {
        raw_on(
            connect_from(from, &s.addr),
            &request("POST", "/predict", auth, Some("application/json"), &body),
        )
    };
    // No credentials at all is the normal start of Basic auth: never counted.
    for _ in 0..5 {
        assert_eq!(send("127.0.0.2", None).status, 401);
    }
    for i in 0..3 {
        assert_eq!(send("127.0.0.2", Some(&wrong)).status, 401, "attempt {i}");
    }
    // Locked out now, even with the right password, with a JSON body and Retry-After.
    let r = send("127.0.0.2", Some(&good));
    assert_eq!(r.status, 429, "{}", r.body);
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    assert!(r.json()["error"]
        .as_str()
        .unwrap()
        .contains("failed authentication"));
    // A valid client elsewhere is unaffected; open routes stay open for the locked address.
    assert_eq!(send("127.0.0.3", Some(&good)).status, 200);
    let ready = raw_on(
        connect_from("127.0.0.2", &s.addr),
        &request("GET", "/v2/health/ready", None, None, ""),
    );
    assert_eq!(ready.status, 200);
    // After the lockout the right password works again.
    std::thread::sleep(Duration::from_millis(2200));
    assert_eq!(send("127.0.0.2", Some(&good)).status, 200);
    assert!(
        s.wait_for_log("locked out", Duration::from_secs(5)),
        "{}",
        s.logs()
    );

    // Credentials never reach logs, error bodies or metrics.
    let metrics = get(&s, "/metrics", false).body;
    for secret in [
        PASSWORD,
        "guess",
        good.trim_start_matches("Basic "),
        wrong.trim_start_matches("Basic "),
    ] {
        assert!(!s.logs().contains(secret), "{secret} in the logs");
        assert!(!metrics.contains(secret), "{secret} in the metrics");
        assert!(!r.body.contains(secret), "{secret} in an error body");
    }
}

#[test]
fn risky_setups_are_reported_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("credentials");
    let hash = std::process::Command::new(env!("CARGO_BIN_EXE_fmnist-serve"))
        .args(["hash-password", "ops"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().unwrap().write_all(b"s3cret-pass\n")?;
            c.wait_with_output()
        })
        .unwrap();
    std::fs::write(&creds, &hash.stdout).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o644)).unwrap();
    // World-readable credentials and plain HTTP on every interface: two warnings, still serves.
    let s = Server::start_with(
        &[
            "--credentials-file",
            creds.to_str().unwrap(),
            "--listen",
            "0.0.0.0:0",
        ],
        &[],
    );
    let logs = s.logs();
    assert!(logs.contains("readable by every user"), "{logs}");
    assert!(
        logs.contains("listening beyond loopback over plain HTTP"),
        "{logs}"
    );
    drop(s);
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o600)).unwrap();
    let s = Server::start_with(&["--credentials-file", creds.to_str().unwrap()], &[]);
    assert!(!s.logs().contains("readable by every user"));
    // A malformed file is refused, naming the file and line.
    std::fs::write(&creds, "ops:$argon2id$broken\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fmnist-serve"))
        .arg("--credentials-file")
        .arg(&creds)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("credentials") && err.contains("line 1"),
        "{err}"
    );
}
