//! Prometheus metrics, kept in memory and rendered as text on `GET /metrics`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use super::Protocol;

impl Protocol {
    fn label(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Grpc => "grpc",
        }
    }
}

/// A cumulative histogram with fixed upper bounds.
#[derive(Debug, Clone)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        for (i, b) in self.bounds.iter().enumerate() {
            if v <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

const LATENCY_BOUNDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
const BATCH_BOUNDS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

#[derive(Debug, Default)]
struct Inner {
    /// By (protocol, route, status): HTTP's status, or gRPC's status code number (0 is OK).
    requests: BTreeMap<(&'static str, &'static str, u16), u64>,
    latency: BTreeMap<(&'static str, &'static str), Histogram>,
    batch_size: Option<Histogram>,
    inference: Option<Histogram>,
}

/// All server metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Shutdown state, for the count of requests answered 503 at the end of the grace period.
    shutdown: Option<std::sync::Arc<super::drain::Shutdown>>,
    inner: Mutex<Inner>,
    /// Requests waiting for the batcher (a gauge).
    pub queue_depth: AtomicUsize,
    /// Queued requests dropped unrun because their client had gone.
    pub abandoned: AtomicU64,
}

impl Metrics {
    pub fn with_shutdown(shutdown: std::sync::Arc<super::drain::Shutdown>) -> Self {
        Self {
            shutdown: Some(shutdown),
            ..Self::default()
        }
    }

    /// Records one answered request (an HTTP request or a gRPC call); `route` is the HTTP
    /// route template or the gRPC method's path.
    pub fn request(&self, protocol: Protocol, route: &'static str, status: u16, seconds: f64) {
        let p = protocol.label();
        let mut m = self.inner.lock().expect("metrics lock");
        *m.requests.entry((p, route, status)).or_default() += 1;
        m.latency
            .entry((p, route))
            .or_insert_with(|| Histogram::new(LATENCY_BOUNDS))
            .observe(seconds);
    }

    /// Records one forward pass of `images` images taking `seconds`.
    pub fn batch(&self, images: usize, seconds: f64) {
        let mut m = self.inner.lock().expect("metrics lock");
        m.batch_size
            .get_or_insert_with(|| Histogram::new(BATCH_BOUNDS))
            .observe(images as f64);
        m.inference
            .get_or_insert_with(|| Histogram::new(LATENCY_BOUNDS))
            .observe(seconds);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let m = self.inner.lock().expect("metrics lock").clone_inner();
        let mut out = String::new();
        out.push_str("# HELP fmnist_requests_total Requests answered, by protocol, route and status (HTTP status; gRPC status code, 0 = OK).\n");
        out.push_str("# TYPE fmnist_requests_total counter\n");
        for ((protocol, route, status), n) in &m.requests {
            let _ = writeln!(
                out,
                "fmnist_requests_total{{protocol=\"{protocol}\",route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        out.push_str(
            "# HELP fmnist_request_duration_seconds Time from request to response, by protocol and route.\n",
        );
        out.push_str("# TYPE fmnist_request_duration_seconds histogram\n");
        for ((protocol, route), h) in &m.latency {
            h.render(
                &mut out,
                "fmnist_request_duration_seconds",
                &format!("protocol=\"{protocol}\",route=\"{route}\""),
            );
        }
        out.push_str("# HELP fmnist_batch_size Images per forward pass of the model.\n");
        out.push_str("# TYPE fmnist_batch_size histogram\n");
        m.batch_size
            .unwrap_or_else(|| Histogram::new(BATCH_BOUNDS))
            .render(&mut out, "fmnist_batch_size", "");
        out.push_str("# HELP fmnist_inference_seconds Time of one forward pass of the model.\n");
        out.push_str("# TYPE fmnist_inference_seconds histogram\n");
        m.inference
            .unwrap_or_else(|| Histogram::new(LATENCY_BOUNDS))
            .render(&mut out, "fmnist_inference_seconds", "");
        out.push_str("# HELP fmnist_queue_depth Requests waiting for the model.\n");
        out.push_str("# TYPE fmnist_queue_depth gauge\n");
        let _ = writeln!(
            out,
            "fmnist_queue_depth {}",
            self.queue_depth.load(Ordering::Relaxed)
        );
        out.push_str(
            "# HELP fmnist_abandoned_requests_total Queued requests dropped unrun because their client had gone.\n",
        );
        out.push_str("# TYPE fmnist_abandoned_requests_total counter\n");
        let _ = writeln!(
            out,
            "fmnist_abandoned_requests_total {}",
            self.abandoned.load(Ordering::Relaxed)
        );
        out.push_str(
            "# HELP fmnist_shutdown_unanswered_total Requests answered 503 (gRPC UNAVAILABLE) because the shutdown grace period ended first.\n",
        );
        out.push_str("# TYPE fmnist_shutdown_unanswered_total counter\n");
        let _ = writeln!(
            out,
            "fmnist_shutdown_unanswered_total {}",
            self.shutdown
                .as_ref()
                .map_or(0, |s| s.unanswered.load(Ordering::Relaxed))
        );
        out
    }
}

impl Inner {
    fn clone_inner(&self) -> Inner {
        Inner {
            requests: self.requests.clone(),
            latency: self.latency.clone(),
            batch_size: self.batch_size.clone(),
            inference: self.inference.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_buckets() {
        let m = Metrics::default();
        m.request(Protocol::Http, "/predict", 200, 0.002);
        m.request(Protocol::Http, "/predict", 200, 0.02);
        m.request(Protocol::Http, "/predict", 401, 0.001);
        m.request(
            Protocol::Grpc,
            "/inference.GRPCInferenceService/ModelInfer",
            0,
            0.001,
        );
        m.batch(3, 0.001);
        let text = m.render();
        assert!(text.contains(
            "fmnist_requests_total{protocol=\"http\",route=\"/predict\",status=\"200\"} 2"
        ));
        assert!(text.contains(
            "fmnist_requests_total{protocol=\"http\",route=\"/predict\",status=\"401\"} 1"
        ));
        assert!(text.contains("fmnist_requests_total{protocol=\"grpc\",route=\"/inference.GRPCInferenceService/ModelInfer\",status=\"0\"} 1"));
        assert!(text.contains(
            "fmnist_request_duration_seconds_bucket{protocol=\"http\",route=\"/predict\",le=\"0.0025\"} 2"
        ));
        assert!(text.contains(
            "fmnist_request_duration_seconds_bucket{protocol=\"http\",route=\"/predict\",le=\"+Inf\"} 3"
        ));
        assert!(text.contains("fmnist_batch_size_bucket{le=\"4\"} 1"));
        assert!(text.contains("fmnist_batch_size_bucket{le=\"2\"} 0"));
        assert!(text.contains("fmnist_queue_depth 0"));
    }
}
