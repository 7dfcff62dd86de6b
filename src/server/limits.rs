//! Bounds on what one client can hold: connections per address, and how long a request body
//! may stall or take. Both listeners use them.

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// Open connections per client address.
#[derive(Debug)]
pub struct PerIp {
    limit: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl PerIp {
    /// `limit` 0: no limit.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for one more connection from `ip`, or `None` when it holds its limit.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        if self.limit == 0 {
            return Some(IpSlot(None));
        }
        let mut open = self.open.lock().expect("per-ip lock");
        let n = open.entry(ip).or_insert(0);
        if *n >= self.limit {
            return None;
        }
        *n += 1;
        Some(IpSlot(Some((Arc::clone(self), ip))))
    }
}

/// Holds one connection's place in its address's count.
pub struct IpSlot(Option<(Arc<PerIp>, IpAddr)>);

impl Drop for IpSlot {
    fn drop(&mut self) {
        if let Some((per_ip, ip)) = self.0.take() {
            let mut open = per_ip.open.lock().expect("per-ip lock");
            if let Some(n) = open.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    open.remove(&ip);
                }
            }
        }
    }
}

/// A body that stalled longer than its idle bound, or took longer than its total bound.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BodyTimedOut(pub String);

/// A request body that must keep arriving: at most `idle` without a byte, `total` in all.
pub struct TimedBody<B> {
    inner: B,
    idle: Duration,
    idle_timer: Pin<Box<Sleep>>,
    total_timer: Pin<Box<Sleep>>,
    total: Duration,
}

impl<B> TimedBody<B> {
    pub fn new(inner: B, idle: Duration, total: Duration) -> Self {
        let now = Instant::now();
        Self {
            inner,
            idle,
            idle_timer: Box::pin(tokio::time::sleep_until(now + idle)),
            total_timer: Box::pin(tokio::time::sleep_until(now + total)),
            total,
        }
    }
}

impl<B> Body for TimedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let next = Instant::now() + this.idle;
                this.idle_timer.as_mut().reset(next);
                return Poll::Ready(Some(Ok(frame)));
            }
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => {}
        }
        if this.total_timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(Box::new(BodyTimedOut(format!(
                "the request body took longer than {} s",
                this.total.as_secs()
            ))))));
        }
        if this.idle_timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(Box::new(BodyTimedOut(format!(
                "the request body stalled: no bytes for {} ms",
                this.idle.as_millis()
            ))))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

use std::future::Future as _;

/// Collects a body within `limit` bytes and the time bounds; `Err` carries the reason.
pub async fn collect<B>(body: TimedBody<B>, limit: usize) -> Result<Bytes, CollectError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(CollectError::TooLarge),
        Err(e) => match e.downcast::<BodyTimedOut>() {
            Ok(t) => Err(CollectError::TimedOut(t.0)),
            Err(e) => Err(CollectError::Other(e.to_string())),
        },
    }
}

pub enum CollectError {
    TooLarge,
    TimedOut(String),
    Other(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_ip_slots_are_counted_and_given_back() {
        let p = PerIp::new(2);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let other: IpAddr = "127.0.0.2".parse().unwrap();
        let a = p.admit(ip).unwrap();
        let _b = p.admit(ip).unwrap();
        assert!(p.admit(ip).is_none());
        assert!(p.admit(other).is_some());
        drop(a);
        assert!(p.admit(ip).is_some());
        assert!(PerIp::new(0).admit(ip).is_some());
    }

    /// On the real clock, with margins wide enough for a loaded machine: what is asserted is
    /// which bound fires (or none), not how long it took.
    #[test]
    fn a_stalled_body_times_out_and_a_steady_one_does_not() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            // Chunks every 20 ms against a 1 s idle bound: arrives.
            let (mut tx, body) = http_body_util::channel::Channel::<Bytes, std::io::Error>::new(1);
            let feeder = tokio::spawn(async move {
                for _ in 0..5 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    tx.send_data(Bytes::from_static(b"abc")).await.unwrap();
                }
            });
            let timed = TimedBody::new(body, Duration::from_secs(1), Duration::from_secs(30));
            let got = collect(timed, 1000).await.ok().unwrap();
            assert_eq!(got.len(), 15);
            feeder.await.unwrap();
            // One chunk, then silence (the sender stays open): stalls.
            let (mut tx, body) = http_body_util::channel::Channel::<Bytes, std::io::Error>::new(1);
            tx.send_data(Bytes::from_static(b"abc")).await.unwrap();
            let timed = TimedBody::new(body, Duration::from_millis(100), Duration::from_secs(30));
            match collect(timed, 1000).await {
                Err(CollectError::TimedOut(m)) => assert!(m.contains("stalled"), "{m}"),
                _ => panic!("no timeout"),
            }
            drop(tx);
            // Steady (a chunk every 20 ms, 1 s idle bound) but longer than 1 s in all: the
            // feeder would take 10 s.
            let (mut tx, body) = http_body_util::channel::Channel::<Bytes, std::io::Error>::new(1);
            let feeder = tokio::spawn(async move {
                for _ in 0..500 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    if tx.send_data(Bytes::from_static(b"a")).await.is_err() {
                        break;
                    }
                }
            });
            let timed = TimedBody::new(body, Duration::from_secs(1), Duration::from_secs(1));
            match collect(timed, 1000).await {
                Err(CollectError::TimedOut(m)) => assert!(m.contains("longer than 1 s"), "{m}"),
                _ => panic!("no total timeout"),
            }
            feeder.abort();
        });
    }
}
