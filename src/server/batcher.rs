//! Dynamic batching: concurrent requests are queued and run together in one forward pass,
//! like Triton's dynamic batcher. The model runs on a dedicated thread, off the tokio reactor.
//!
//! A batch closes when it holds `max_batch` images or `max_delay` has passed since its first
//! request arrived; a request is never split, and one that would overflow a batch waits for the
//! next. Each image's logits depend only on that image, so an answer never depends on what it
//! was batched with.
//!
//! Memory is bounded by images, not only requests: beyond `max_queued_images` waiting images a
//! request gets 503 at once. A request whose client has gone (timeout, disconnect) is dropped
//! from the queue unrun, so abandoned work neither holds memory nor delays live requests.

use super::error::ApiError;
use super::metrics::Metrics;
use crate::onnx::OnnxModel;
use crate::preprocess::{push_image, InputLayout};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

#[derive(Debug, Clone, Copy)]
pub struct BatcherConfig {
    /// Most images in one forward pass.
    pub max_batch: usize,
    /// Longest a request waits for others to join its batch.
    pub max_delay: Duration,
    /// Requests that may wait; beyond that new ones get 503 with Retry-After.
    pub queue_capacity: usize,
    /// Most images waiting at once (all queued requests together).
    pub max_queued_images: usize,
}

struct Job {
    /// `n * 784` values in 0–1.
    pixels: Vec<f32>,
    n: usize,
    reply: oneshot::Sender<Result<Vec<f32>, String>>,
}

/// Handle to the batching thread; cheap to share.
pub struct Batcher {
    tx: SyncSender<Job>,
    metrics: Arc<Metrics>,
    queued_images: Arc<AtomicUsize>,
    max_queued_images: usize,
    arriving: Arc<AtomicUsize>,
}

/// A prediction request on its way to the queue (its body being read and decoded). While any
/// exists the batching thread waits up to `max_delay` for it; when none does and the queue is
/// empty, a batch runs at once — a lone request does not pay the delay for nothing.
pub struct Arriving {
    count: Arc<AtomicUsize>,
}

impl Drop for Arriving {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Batcher {
    /// Starts the worker thread. It ends when the last handle is dropped.
    pub fn start(model: Arc<OnnxModel>, cfg: BatcherConfig, metrics: Arc<Metrics>) -> Self {
        let (tx, rx) = mpsc::sync_channel::<Job>(cfg.queue_capacity.max(1));
        let m = Arc::clone(&metrics);
        let queued_images = Arc::new(AtomicUsize::new(0));
        let q = Arc::clone(&queued_images);
        let arriving = Arc::new(AtomicUsize::new(0));
        let a = Arc::clone(&arriving);
        std::thread::Builder::new()
            .name("fmnist-batcher".into())
            .spawn(move || worker(model, cfg, rx, m, q, a))
            .expect("spawning the batcher thread");
        Self {
            tx,
            metrics,
            queued_images,
            max_queued_images: cfg.max_queued_images.max(1),
            arriving,
        }
    }

    /// Announces a prediction request before its body is read; refused (503) while the image
    /// budget is used up, so an overloaded server does not read and decode bodies it would
    /// refuse anyway.
    pub fn arriving(&self) -> Result<Arriving, ApiError> {
        if self.is_saturated() {
            return Err(ApiError::QueueFull {
                retry_after_secs: 1,
            });
        }
        self.arriving.fetch_add(1, Ordering::SeqCst);
        Ok(Arriving {
            count: Arc::clone(&self.arriving),
        })
    }

    /// Queues `n` images (0–1 values, 784 each) and waits for their `n * 10` logits.
    /// True while the image budget is used up: a new request would be refused anyway, so the
    /// router answers 503 before reading and decoding its body.
    pub fn is_saturated(&self) -> bool {
        self.queued_images.load(Ordering::SeqCst) >= self.max_queued_images
    }

    pub async fn infer(
        &self,
        arriving: Arriving,
        pixels: Vec<f32>,
        n: usize,
    ) -> Result<Vec<f32>, ApiError> {
        let (reply, rx) = oneshot::channel();
        // Reserve room for the images first; a request bigger than the whole budget still
        // runs when nothing else waits.
        let before = self.queued_images.fetch_add(n, Ordering::SeqCst);
        if before > 0 && before + n > self.max_queued_images {
            self.queued_images.fetch_sub(n, Ordering::SeqCst);
            return Err(ApiError::QueueFull {
                retry_after_secs: 1,
            });
        }
        self.metrics.queue_depth.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send(Job { pixels, n, reply }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
                self.queued_images.fetch_sub(n, Ordering::SeqCst);
                return Err(ApiError::QueueFull {
                    retry_after_secs: 1,
                });
            }
            Err(TrySendError::Disconnected(_)) => {
                self.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
                self.queued_images.fetch_sub(n, Ordering::SeqCst);
                return Err(ApiError::ShuttingDown);
            }
        }
        // Queued: no longer on its way (dropped only now, so the worker always sees it in
        // one of the two places).
        drop(arriving);
        rx.await
            .map_err(|_| ApiError::Internal("the inference thread stopped".into()))?
            .map_err(ApiError::Internal)
    }
}

fn worker(
    model: Arc<OnnxModel>,
    cfg: BatcherConfig,
    rx: mpsc::Receiver<Job>,
    metrics: Arc<Metrics>,
    queued_images: Arc<AtomicUsize>,
    arriving: Arc<AtomicUsize>,
) {
    // A job leaves the queue: its images no longer count; one whose client is gone is dropped.
    let dequeue = |job: Job| -> Option<Job> {
        queued_images.fetch_sub(job.n, Ordering::SeqCst);
        if job.reply.is_closed() {
            metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
            metrics.abandoned.fetch_add(1, Ordering::Relaxed);
            None
        } else {
            Some(job)
        }
    };
    let mut carried: Option<Job> = None;
    loop {
        let first = match carried.take() {
            Some(j) => j,
            None => match rx.recv() {
                Ok(j) => match dequeue(j) {
                    Some(j) => j,
                    None => continue,
                },
                Err(_) => return,
            },
        };
        let deadline = Instant::now() + cfg.max_delay;
        let mut total = first.n;
        let mut jobs = vec![first];
        while total < cfg.max_batch {
            let wait = deadline.saturating_duration_since(Instant::now());
            let next = match rx.try_recv() {
                Ok(j) => Ok(j),
                // Nothing queued and no request on its way: run now rather than wait.
                Err(_) if wait.is_zero() || arriving.load(Ordering::SeqCst) == 0 => {
                    Err(RecvTimeoutError::Timeout)
                }
                Err(_) => rx.recv_timeout(wait),
            };
            let next = match next {
                Ok(j) => match dequeue(j) {
                    Some(j) => Ok(j),
                    None => continue,
                },
                Err(e) => Err(e),
            };
            match next {
                Ok(j) if total + j.n > cfg.max_batch => {
                    carried = Some(j);
                    break;
                }
                Ok(j) => {
                    total += j.n;
                    jobs.push(j);
                }
                Err(_) => break,
            }
        }
        metrics.queue_depth.fetch_sub(jobs.len(), Ordering::Relaxed);
        let started = Instant::now();
        let result = run_batch(&model, &jobs, total);
        metrics.batch(total, started.elapsed().as_secs_f64());
        match result {
            Ok(logits) => {
                let mut offset = 0;
                for job in jobs {
                    let len = job.n * crate::NUM_CLASSES;
                    let _ = job.reply.send(Ok(logits[offset..offset + len].to_vec()));
                    offset += len;
                }
            }
            Err(e) => {
                for job in jobs {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

fn run_batch(model: &OnnxModel, jobs: &[Job], total: usize) -> Result<Vec<f32>, String> {
    let layout = model.layout();
    let mut values = Vec::with_capacity(total * layout.values_per_image());
    for j in jobs {
        match layout {
            InputLayout::Flat | InputLayout::Gray => values.extend_from_slice(&j.pixels),
            InputLayout::Rgb { .. } => {
                for image in j.pixels.chunks_exact(crate::classes::IMAGE_PIXELS) {
                    push_image(image, layout, &mut values);
                }
            }
        }
    }
    model.run_values(values, total).map_err(|e| e.to_string())
}
