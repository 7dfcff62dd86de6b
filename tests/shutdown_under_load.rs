//! SIGTERM while the server is under load: every request it accepted gets a full response,
//! new connections are refused, and it exits 0 within the grace period.

mod common;

use common::*;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

enum Outcome {
    /// A complete 200 with a prediction.
    Answered,
    /// Connection refused, or closed before a single byte of response (never accepted).
    Refused,
    /// Anything else: a partial or wrong response.
    Broken(String),
}

fn one_request(addr: &str, body: &str) -> Outcome {
    let mut s = match std::net::TcpStream::connect(addr) {
        Ok(s) => s,
        Err(_) => return Outcome::Refused,
    };
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let req = request(
        "POST",
        "/predict",
        Some(&basic(USER, PASSWORD)),
        Some("application/json"),
        body,
    );
    if s.write_all(&req).is_err() {
        return Outcome::Refused;
    }
    let mut out = Vec::new();
    let read = s.read_to_end(&mut out);
    if out.is_empty() {
        return Outcome::Refused;
    }
    if let Err(e) = read {
        return Outcome::Broken(format!("read error after {} bytes: {e}", out.len()));
    }
    let r = parse_response(&out);
    match serde_json::from_str::<serde_json::Value>(&r.body) {
        Ok(v) if r.status == 200 && v["class"].is_string() => Outcome::Answered,
        _ => Outcome::Broken(format!("{} {}", r.status, r.body)),
    }
}

#[test]
fn sigterm_under_load_answers_everything_accepted_then_exits_zero() {
    let s = Server::start(&[
        "--max-queue-delay-us",
        "2000",
        "--shutdown-grace-secs",
        "20",
    ]);
    let (images, _) = fixture();
    let body = format!("{{\"image\":{:?}}}", images[5]);
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..24)
        .map(|_| {
            let (addr, body, stop) = (s.addr.clone(), body.clone(), stop.clone());
            std::thread::spawn(move || {
                let (mut answered, mut refused, mut broken) = (0, 0, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    match one_request(&addr, &body) {
                        Outcome::Answered => answered += 1,
                        Outcome::Refused => {
                            refused += 1;
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        Outcome::Broken(e) => broken.push(e),
                    }
                }
                (answered, refused, broken)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    let signalled = Instant::now();
    let status = s.terminate(Duration::from_secs(25));
    let took = signalled.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (mut answered, mut refused, mut broken) = (0, 0, Vec::new());
    for c in clients {
        let (a, r, b) = c.join().unwrap();
        answered += a;
        refused += r;
        broken.extend(b);
    }
    println!(
        "answered {answered}, refused {refused}, broken {}, exit after {took:?}",
        broken.len()
    );
    assert!(status.success(), "exit status {status:?}");
    assert!(took < Duration::from_secs(20), "took {took:?}");
    assert!(answered > 50, "load was too light: {answered}");
    assert!(refused > 0, "no connection was refused after the signal");
    assert!(
        broken.is_empty(),
        "{} broken responses: {:?}",
        broken.len(),
        &broken[..broken.len().min(5)]
    );
}
