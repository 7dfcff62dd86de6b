//! Lame-duck shutdown: the phases a server goes through after SIGTERM, and the per-connection
//! bookkeeping that lets it close connections without losing a request.
//!
//! 1. **Serving.**
//! 2. **Draining** (`--drain-delay-secs`): readiness answers 503 at once, so a load balancer or
//!    the Kubernetes endpoint controller stops sending new connections, but everything is still
//!    served. Each HTTP/1.1 response carries `Connection: close`; a gRPC connection gets GOAWAY
//!    once it has answered a call in the drain (its in-flight calls still finish); and a
//!    connection idle for [`IDLE_CLOSE`] is closed. A client therefore learns
//!    that a connection is going away from a response, never from a closed socket after it
//!    sent a request.
//! 3. **Closing**: the listeners close; in-flight requests and calls finish, within
//!    `--shutdown-grace-secs`.
//! 4. **Expired**: the grace period is over; requests still unanswered get 503 (gRPC:
//!    UNAVAILABLE), logged and counted, instead of a reset.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How long a keep-alive connection with nothing in flight may stay idle during the drain
/// before it is closed.
pub const IDLE_CLOSE: Duration = Duration::from_millis(1000);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Serving,
    Draining,
    Closing,
    Expired,
}

/// The phase, shared by the accept loop (which moves it) and every connection and request.
#[derive(Debug)]
pub struct Shutdown {
    tx: watch::Sender<Phase>,
    /// Requests answered 503 because the grace period ended first.
    pub unanswered: AtomicU64,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self {
            tx: watch::channel(Phase::Serving).0,
            unanswered: AtomicU64::new(0),
        }
    }
}

impl Shutdown {
    pub fn phase(&self) -> Phase {
        *self.tx.borrow()
    }

    pub fn set(&self, phase: Phase) {
        self.tx.send_replace(phase);
    }

    pub fn subscribe(&self) -> watch::Receiver<Phase> {
        self.tx.subscribe()
    }

    /// Resolves once the phase is at least `phase`.
    pub async fn reached(&self, phase: Phase) {
        let mut rx = self.subscribe();
        let _ = rx.wait_for(|p| *p >= phase).await;
    }
}

/// One connection's activity: requests in flight, and when the last one ended.
#[derive(Debug)]
pub struct Activity {
    started: Instant,
    in_flight: AtomicUsize,
    last_ms: AtomicU64,
    completed: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
            completed: AtomicU64::new(0),
        }
    }
}

impl Activity {
    /// Marks a request as begun; the guard marks it ended.
    pub fn begin(self: &Arc<Self>) -> ActivityGuard {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        ActivityGuard(Arc::clone(self))
    }

    /// Requests answered so far.
    pub fn completed(&self) -> u64 {
        self.completed.load(Ordering::SeqCst)
    }

    /// How long the connection has had nothing in flight (zero while it has).
    pub fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return Duration::ZERO;
        }
        let last = Duration::from_millis(self.last_ms.load(Ordering::SeqCst));
        self.started.elapsed().saturating_sub(last)
    }
}

pub struct ActivityGuard(Arc<Activity>);

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        let a = &self.0;
        a.last_ms
            .store(a.started.elapsed().as_millis() as u64, Ordering::SeqCst);
        a.completed.fetch_add(1, Ordering::SeqCst);
        a.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Counts live connections, so shutdown can wait for the last one.
#[derive(Debug, Default)]
pub struct Connections {
    live: AtomicUsize,
    gone: tokio::sync::Notify,
}

impl Connections {
    pub fn open(self: &Arc<Self>) -> ConnectionGuard {
        self.live.fetch_add(1, Ordering::SeqCst);
        ConnectionGuard(Arc::clone(self))
    }

    pub fn live(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    /// Resolves once no connection is left.
    pub async fn all_closed(&self) {
        loop {
            let notified = self.gone.notified();
            if self.live() == 0 {
                return;
            }
            notified.await;
        }
    }
}

pub struct ConnectionGuard(Arc<Connections>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if self.0.live.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.gone.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_time_counts_from_the_last_request() {
        let a = Arc::new(Activity::default());
        let g = a.begin();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(a.idle_for(), Duration::ZERO);
        drop(g);
        std::thread::sleep(Duration::from_millis(30));
        let idle = a.idle_for();
        assert!(
            idle >= Duration::from_millis(25) && idle < Duration::from_secs(5),
            "{idle:?}"
        );
    }

    #[test]
    fn phases_only_move_forward_and_waiters_see_them() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let s = Arc::new(Shutdown::default());
        let s2 = Arc::clone(&s);
        rt.block_on(async move {
            let waiter = tokio::spawn(async move { s2.reached(Phase::Closing).await });
            s.set(Phase::Draining);
            tokio::task::yield_now().await;
            assert!(!waiter.is_finished());
            s.set(Phase::Closing);
            tokio::time::timeout(Duration::from_secs(5), waiter)
                .await
                .unwrap()
                .unwrap();
            assert!(s.phase() > Phase::Draining);
        });
        let c = Arc::new(Connections::default());
        let g = c.open();
        assert_eq!(c.live(), 1);
        drop(g);
        rt.block_on(c.all_closed());
    }
}
