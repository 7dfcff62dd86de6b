//! Stalled request bodies cannot hold the server: one address holds at most
//! `--max-connections-per-ip` connections, other addresses are served meanwhile, a body that
//! stops arriving gets 408 and its connection is closed, and a slow but steady upload
//! succeeds. The test asserts the order of events, not wall-clock bounds.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Headers announcing a 5,000-byte body, then 10 bytes of it, then nothing.
fn stall(from: &str, addr: &str) -> TcpStream {
    let mut s = connect_from(from, addr);
    write!(
        s,
        "POST /predict HTTP/1.1\r\nHost: t\r\nAuthorization: {}\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n{{\"image\":[",
        basic(USER, PASSWORD)
    )
    .unwrap();
    s
}

/// Nothing has arrived on `s` yet (the server has neither answered nor closed it).
fn still_open(s: &TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    let open = matches!((&*s).read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
    s.set_nonblocking(false).unwrap();
    open
}

fn predict_from(from: &str, addr: &str, body: &str) -> Option<Raw> {
    let mut s = connect_from(from, addr);
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let req = request(
        "POST",
        "/predict",
        Some(&basic(USER, PASSWORD)),
        Some("application/json"),
        body,
    );
    let _ = s.write_all(&req);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    (!out.is_empty()).then(|| parse_response(&out))
}

#[test]
fn stalled_bodies_are_bounded_per_address_and_timed_out() {
    let s = Server::start(&[
        "--max-connections",
        "32",
        "--max-connections-per-ip",
        "8",
        "--body-idle-timeout-ms",
        "1500",
    ]);
    let (images, labels) = fixture();
    let body = format!("{{\"image\":{:?}}}", images[0]);
    // 8 stalled uploads from 127.0.0.1: the address's whole allowance.
    let stalled: Vec<TcpStream> = (0..8).map(|_| stall("127.0.0.1", &s.addr)).collect();
    std::thread::sleep(Duration::from_millis(300));
    // 1. The 9th connection from 127.0.0.1 is refused: closed with no response.
    assert!(
        predict_from("127.0.0.1", &s.addr, &body).is_none(),
        "a 9th connection from 127.0.0.1 was served"
    );
    assert!(s.wait_for_log("connection limit for this address", Duration::from_secs(5)));
    // 2. Another address is served while the stalled ones are still open.
    let r = predict_from("127.0.0.2", &s.addr, &body).expect("127.0.0.2 refused");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["label"], labels[0]);
    assert!(
        stalled.iter().all(still_open),
        "a stalled upload was closed too early"
    );
    // 3. After the idle timeout each stalled upload gets 408 and is closed.
    for mut st in stalled {
        st.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut out = Vec::new();
        let _ = st.read_to_end(&mut out);
        let r = parse_response(&out);
        assert_eq!(r.status, 408, "{}", r.body);
        assert!(r.json()["error"].as_str().unwrap().contains("stalled"));
        assert_eq!(r.header("connection").as_deref(), Some("close"));
    }
    // 4. 127.0.0.1 is served again.
    let r = predict_from("127.0.0.1", &s.addr, &body).expect("127.0.0.1 still refused");
    assert_eq!(r.status, 200, "{}", r.body);
    // 5. A slow but steady upload (gaps well under the idle bound) succeeds.
    let mut up = connect_from("127.0.0.1", &s.addr);
    up.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        up,
        "POST /predict HTTP/1.1\r\nHost: t\r\nAuthorization: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        basic(USER, PASSWORD),
        body.len()
    )
    .unwrap();
    let chunk = body.len().div_ceil(6);
    for part in body.as_bytes().chunks(chunk) {
        up.write_all(part).unwrap();
        std::thread::sleep(Duration::from_millis(400));
    }
    let mut out = Vec::new();
    let _ = up.read_to_end(&mut out);
    let r = parse_response(&out);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["label"], labels[0]);
}

/// The gRPC listener counts toward the same per-address limit.
#[test]
fn grpc_connections_count_toward_the_address_limit() {
    let s = Server::start(&[
        "--grpc-listen",
        "127.0.0.1:0",
        "--max-connections-per-ip",
        "2",
    ]);
    let grpc = s.grpc_addr.clone().unwrap();
    let held: Vec<TcpStream> = (0..2).map(|_| connect_from("127.0.0.1", &grpc)).collect();
    std::thread::sleep(Duration::from_millis(300));
    let (images, _) = fixture();
    let body = format!("{{\"image\":{:?}}}", images[0]);
    assert!(predict_from("127.0.0.1", &s.addr, &body).is_none());
    let r = predict_from("127.0.0.2", &s.addr, &body).expect("127.0.0.2 refused");
    assert_eq!(r.status, 200);
    drop(held);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        predict_from("127.0.0.1", &s.addr, &body).map(|r| r.status),
        Some(200)
    );
}
