//! Failed-authentication throttling per client address.
//!
//! After `max_failures` failed Basic-auth attempts from one IP address within `window`, that
//! address gets `429 Too Many Requests` (with `Retry-After`) on authenticated routes for
//! `lockout`, whatever it sends. Other addresses are unaffected; a success clears the count.
//! The table is bounded: expired entries are dropped once it grows past a few thousand.

use super::error::ApiError;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const PRUNE_ABOVE: usize = 4096;

#[derive(Debug)]
struct Entry {
    failures: u32,
    window_start: Instant,
    blocked_until: Option<Instant>,
}

/// The per-address failure counts.
#[derive(Debug)]
pub struct AuthThrottle {
    max_failures: u32,
    window: Duration,
    lockout: Duration,
    entries: Mutex<HashMap<IpAddr, Entry>>,
}

impl AuthThrottle {
    /// `max_failures = 0` turns throttling off.
    pub fn new(max_failures: u32, window: Duration, lockout: Duration) -> Self {
        Self {
            max_failures,
            window,
            lockout,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// `Err(TooManyRequests)` while `ip` is locked out.
    pub fn check(&self, ip: IpAddr) -> Result<(), ApiError> {
        if self.max_failures == 0 {
            return Ok(());
        }
        let now = Instant::now();
        let entries = self.entries.lock().expect("throttle lock");
        match entries.get(&ip).and_then(|e| e.blocked_until) {
            Some(until) if until > now => Err(ApiError::TooManyRequests {
                retry_after_secs: (until - now).as_secs_f64().ceil().max(1.0) as u64,
            }),
            _ => Ok(()),
        }
    }

    /// Records a failed attempt from `ip`; returns true when this one started a lockout.
    pub fn failed(&self, ip: IpAddr) -> bool {
        if self.max_failures == 0 {
            return false;
        }
        let now = Instant::now();
        let mut entries = self.entries.lock().expect("throttle lock");
        if entries.len() > PRUNE_ABOVE {
            let window = self.window;
            entries.retain(|_, e| {
                e.blocked_until.is_some_and(|u| u > now) || now - e.window_start < window
            });
        }
        let e = entries.entry(ip).or_insert(Entry {
            failures: 0,
            window_start: now,
            blocked_until: None,
        });
        if now - e.window_start >= self.window {
            e.failures = 0;
            e.window_start = now;
        }
        e.failures += 1;
        if e.failures >= self.max_failures {
            e.failures = 0;
            e.window_start = now;
            e.blocked_until = Some(now + self.lockout);
            return true;
        }
        false
    }

    /// A successful login from `ip` clears its count.
    pub fn succeeded(&self, ip: IpAddr) {
        if self.max_failures == 0 {
            return;
        }
        self.entries.lock().expect("throttle lock").remove(&ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn locks_out_one_address_after_n_failures_only() {
        let t = AuthThrottle::new(3, Duration::from_secs(60), Duration::from_millis(300));
        let (a, b) = (ip("10.0.0.1"), ip("10.0.0.2"));
        assert!(!t.failed(a));
        assert!(!t.failed(a));
        assert!(t.check(a).is_ok());
        assert!(t.failed(a), "the third failure starts the lockout");
        match t.check(a) {
            Err(ApiError::TooManyRequests { retry_after_secs }) => assert_eq!(retry_after_secs, 1),
            other => panic!("expected 429, got {other:?}"),
        }
        assert!(t.check(b).is_ok(), "another address is unaffected");
        std::thread::sleep(Duration::from_millis(350));
        assert!(t.check(a).is_ok(), "the lockout ends");
    }

    #[test]
    fn success_and_an_expired_window_reset_the_count() {
        let t = AuthThrottle::new(2, Duration::from_millis(200), Duration::from_secs(60));
        let a = ip("::1");
        t.failed(a);
        t.succeeded(a);
        assert!(!t.failed(a), "count restarted after the success");
        std::thread::sleep(Duration::from_millis(250));
        assert!(!t.failed(a), "count restarted after the window");
        assert!(t.failed(a));
        assert!(t.check(a).is_err());
    }

    #[test]
    fn zero_disables_it() {
        let t = AuthThrottle::new(0, Duration::from_secs(1), Duration::from_secs(1));
        for _ in 0..100 {
            assert!(!t.failed(ip("10.0.0.3")));
        }
        assert!(t.check(ip("10.0.0.3")).is_ok());
    }
}
