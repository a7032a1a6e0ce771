//! The export queue and its delivery task.
//!
//! The sink (on the collector thread) pushes encoded requests into a queue bounded in bytes
//! and never waits: when a push would exceed the bound, the oldest requests are dropped and
//! counted. The delivery task, on the tokio runtime, sends the oldest request, retrying
//! retryable failures with exponential backoff and jitter (or the delay the server asked
//! for), one request at a time. A request being retried stays at the head of the queue and
//! counts against its bound, so a long outage drops the oldest data, in-flight included,
//! rather than growing. Shutdown delivers what it can within a deadline, then drops the rest.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use tokio::{sync::Notify, task::JoinHandle};

use super::{
    config::RetryPolicy,
    transport::{Delivered, ExportError, Transport},
};
use crate::metrics::Metrics;

/// One encoded request.
#[derive(Debug, Clone)]
pub struct Batch {
    pub id: u64,
    pub body: Bytes,
    /// Sampled ticks in it.
    pub samples: u64,
}

/// What a push or a shutdown dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dropped {
    pub requests: u64,
    pub bytes: u64,
    pub samples: u64,
}

impl Dropped {
    fn add(&mut self, batch: &Batch) {
        self.requests += 1;
        self.bytes += batch.body.len() as u64;
        self.samples += batch.samples;
    }
}

/// Requests, oldest first, holding at most `cap` bytes of bodies.
#[derive(Debug)]
pub struct ByteQueue {
    items: VecDeque<Batch>,
    bytes: usize,
    cap: usize,
    next_id: u64,
}

impl ByteQueue {
    pub fn new(cap: usize) -> Self {
        Self {
            items: VecDeque::new(),
            bytes: 0,
            cap,
            next_id: 0,
        }
    }

    /// Appends a request, dropping the oldest ones until it fits. A request larger than the
    /// whole queue is dropped itself.
    pub fn push(&mut self, body: Bytes, samples: u64) -> Dropped {
        let batch = Batch {
            id: self.next_id,
            body,
            samples,
        };
        self.next_id += 1;
        let mut dropped = Dropped::default();
        if batch.body.len() > self.cap {
            dropped.add(&batch);
            return dropped;
        }
        while self.bytes + batch.body.len() > self.cap {
            let Some(old) = self.items.pop_front() else {
                break;
            };
            self.bytes -= old.body.len();
            dropped.add(&old);
        }
        self.bytes += batch.body.len();
        self.items.push_back(batch);
        dropped
    }

    /// The oldest request (a cheap copy: bodies are shared).
    pub fn front(&self) -> Option<Batch> {
        self.items.front().cloned()
    }

    /// Removes request `id` if it is still queued (it may have been dropped meanwhile).
    pub fn remove(&mut self, id: u64) -> bool {
        let Some(i) = self.items.iter().position(|b| b.id == id) else {
            return false;
        };
        if let Some(b) = self.items.remove(i) {
            self.bytes -= b.body.len();
        }
        true
    }

    pub fn contains(&self, id: u64) -> bool {
        self.items.iter().any(|b| b.id == id)
    }

    pub fn clear(&mut self) -> Dropped {
        let mut dropped = Dropped::default();
        for b in self.items.drain(..) {
            dropped.add(&b);
        }
        self.bytes = 0;
        dropped
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// The `attempt`-th backoff (0-based): initial × 2^attempt, at most `max_backoff`, scaled by
/// `jitter` in [0, 1) to between 50 % and 150 % (then capped again), so that agents that lost
/// the same receiver do not come back in lockstep.
pub fn backoff(policy: &RetryPolicy, attempt: u32, jitter: f64) -> Duration {
    let base = policy
        .initial_backoff
        .saturating_mul(1u32 << attempt.min(20))
        .min(policy.max_backoff);
    base.mul_f64(0.5 + jitter.clamp(0.0, 1.0))
        .min(policy.max_backoff)
}

/// A random number in [0, 1) without a random-number crate: std's hasher keys are random.
fn jitter() -> f64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(Instant::now().elapsed().as_nanos() as u64);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

struct Shared {
    queue: Mutex<ByteQueue>,
    wake: Notify,
    closing: AtomicBool,
    metrics: Metrics,
}

impl Shared {
    fn queue(&self) -> std::sync::MutexGuard<'_, ByteQueue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Mirrors the queue's size into the gauges.
    fn report(&self, queue: &ByteQueue) {
        self.metrics.set("otlp_queue_bytes", queue.bytes() as u64);
        self.metrics.set("otlp_queue_requests", queue.len() as u64);
        self.metrics
            .max("otlp_queue_bytes_peak", queue.bytes() as u64);
    }

    fn count_dropped(&self, dropped: Dropped, why: &str) {
        let m = &self.metrics;
        m.add(&format!("otlp_requests_dropped_{why}"), dropped.requests);
        m.add(&format!("otlp_bytes_dropped_{why}"), dropped.bytes);
        m.add(&format!("otlp_samples_dropped_{why}"), dropped.samples);
    }
}

/// The sink's end: pushes never wait for the network.
#[derive(Clone)]
pub struct QueueHandle {
    shared: Arc<Shared>,
}

impl QueueHandle {
    pub fn push(&self, body: Bytes, samples: u64) {
        let bytes = body.len() as u64;
        let dropped = {
            let mut queue = self.shared.queue();
            let dropped = queue.push(body, samples);
            self.shared.report(&queue);
            dropped
        };
        let m = &self.shared.metrics;
        m.inc("otlp_requests_queued");
        m.add("otlp_bytes_queued", bytes);
        if dropped.requests > 0 {
            self.shared.count_dropped(dropped, "queue_full");
            tracing::warn!(
                requests = dropped.requests,
                bytes = dropped.bytes,
                samples = dropped.samples,
                "OTLP export queue full: dropped the oldest requests"
            );
        }
        self.shared.wake.notify_one();
    }

    pub fn queued_bytes(&self) -> usize {
        self.shared.queue().bytes()
    }
}

/// The delivery task.
pub struct Exporter {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Exporter {
    /// Starts the delivery task on the current runtime.
    pub fn spawn(
        transport: Transport,
        policy: RetryPolicy,
        queue_bytes: usize,
        metrics: Metrics,
    ) -> (Self, QueueHandle) {
        let shared = Arc::new(Shared {
            queue: Mutex::new(ByteQueue::new(queue_bytes)),
            wake: Notify::new(),
            closing: AtomicBool::new(false),
            metrics,
        });
        let task = tokio::spawn(deliver_forever(shared.clone(), transport, policy));
        let handle = QueueHandle {
            shared: shared.clone(),
        };
        (Self { shared, task }, handle)
    }

    /// Delivers what is queued, for `deadline` at most (retrying as usual meanwhile), then
    /// stops; what is left is dropped and counted.
    pub async fn shutdown(mut self, deadline: Duration) {
        self.shared.closing.store(true, Ordering::SeqCst);
        self.shared.wake.notify_one();
        let finished = tokio::time::timeout(deadline, &mut self.task).await.is_ok();
        if !finished {
            self.task.abort();
            let _ = (&mut self.task).await;
        }
        let dropped = {
            let mut queue = self.shared.queue();
            let dropped = queue.clear();
            self.shared.report(&queue);
            dropped
        };
        self.shared.count_dropped(dropped, "shutdown");
        let m = self.shared.metrics.snapshot();
        let get = |name: &str| m.get(name).copied().unwrap_or(0);
        tracing::info!(
            exported_requests = get("otlp_requests_exported"),
            exported_samples = get("otlp_samples_exported"),
            retries = get("otlp_export_retries"),
            failed_attempts = get("otlp_export_attempts_failed"),
            dropped_queue_full = get("otlp_requests_dropped_queue_full"),
            dropped_queue_full_bytes = get("otlp_bytes_dropped_queue_full"),
            dropped_retries_exhausted = get("otlp_requests_dropped_retries_exhausted"),
            dropped_permanent = get("otlp_requests_dropped_permanent_error"),
            dropped_shutdown = dropped.requests,
            dropped_shutdown_bytes = dropped.bytes,
            partial_success = get("otlp_partial_success_responses"),
            rejected_profiles = get("otlp_profiles_rejected"),
            queue_bytes_peak = get("otlp_queue_bytes_peak"),
            within_deadline = finished,
            "OTLP exporter stopped"
        );
    }
}

/// Sends the oldest request until the queue is empty and shutdown has begun.
async fn deliver_forever(shared: Arc<Shared>, transport: Transport, policy: RetryPolicy) {
    let mut outage: Option<Instant> = None;
    loop {
        let next = shared.queue().front();
        match next {
            Some(batch) => deliver(&shared, &transport, &policy, batch, &mut outage).await,
            None if shared.closing.load(Ordering::SeqCst) => return,
            None => shared.wake.notified().await,
        }
    }
}

/// Delivers one request: retried until it succeeds, fails for good, runs out of time, or is
/// dropped from the queue as the oldest while waiting.
async fn deliver(
    shared: &Shared,
    transport: &Transport,
    policy: &RetryPolicy,
    batch: Batch,
    outage: &mut Option<Instant>,
) {
    let m = &shared.metrics;
    let first_attempt = Instant::now();
    let mut attempt = 0u32;
    loop {
        let result = transport.export(batch.body.clone()).await;
        match result {
            Ok(delivered) => {
                finish(shared, &batch);
                record_delivery(m, &batch, &delivered);
                if let Some(since) = outage.take() {
                    tracing::info!(after = ?since.elapsed(), "OTLP export resumed");
                }
                return;
            }
            Err(ExportError::Permanent { reason }) => {
                finish(shared, &batch);
                m.inc("otlp_requests_dropped_permanent_error");
                m.add("otlp_samples_dropped_permanent_error", batch.samples);
                tracing::error!(error = %reason, bytes = batch.body.len(), "OTLP export failed; request dropped");
                return;
            }
            Err(ExportError::Retryable {
                reason,
                retry_after,
            }) => {
                m.inc("otlp_export_attempts_failed");
                if outage.is_none() {
                    *outage = Some(Instant::now());
                    tracing::warn!(error = %reason, "OTLP export failing; retrying with backoff");
                } else {
                    tracing::debug!(error = %reason, attempt, "OTLP export attempt failed");
                }
                let elapsed = first_attempt.elapsed();
                let delay = retry_after.unwrap_or_else(|| backoff(policy, attempt, jitter()));
                if elapsed + delay > policy.max_elapsed {
                    finish(shared, &batch);
                    m.inc("otlp_requests_dropped_retries_exhausted");
                    m.add("otlp_samples_dropped_retries_exhausted", batch.samples);
                    tracing::warn!(error = %reason, ?elapsed, "OTLP request dropped: retries exhausted");
                    return;
                }
                tokio::time::sleep(delay).await;
                // Dropped as the oldest while waiting (already counted): move on.
                if !shared.queue().contains(batch.id) {
                    return;
                }
                m.inc("otlp_export_retries");
                attempt += 1;
            }
        }
    }
}

fn finish(shared: &Shared, batch: &Batch) {
    let mut queue = shared.queue();
    queue.remove(batch.id);
    shared.report(&queue);
}

fn record_delivery(m: &Metrics, batch: &Batch, delivered: &Delivered) {
    m.inc("otlp_requests_exported");
    m.add("otlp_samples_exported", batch.samples);
    m.add("otlp_bytes_exported", batch.body.len() as u64);
    if let Some(wire) = delivered.wire_bytes {
        m.add("otlp_wire_bytes_exported", wire as u64);
    }
    if delivered.rejected_profiles > 0 || !delivered.message.is_empty() {
        m.inc("otlp_partial_success_responses");
        m.add(
            "otlp_profiles_rejected",
            u64::try_from(delivered.rejected_profiles).unwrap_or(0),
        );
        tracing::warn!(
            rejected_profiles = delivered.rejected_profiles,
            error_message = %delivered.message,
            "OTLP receiver accepted the request partially"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(n: usize) -> Bytes {
        Bytes::from(vec![0u8; n])
    }

    #[test]
    fn drops_the_oldest_to_stay_under_the_cap() {
        let mut q = ByteQueue::new(100);
        assert_eq!(q.push(body(40), 4), Dropped::default());
        assert_eq!(q.push(body(40), 5), Dropped::default());
        assert_eq!(q.bytes(), 80);
        // 30 more: the oldest (40 bytes) goes.
        assert_eq!(
            q.push(body(30), 3),
            Dropped {
                requests: 1,
                bytes: 40,
                samples: 4
            }
        );
        assert_eq!((q.len(), q.bytes()), (2, 70));
        assert_eq!(q.front().unwrap().samples, 5);
        // Larger than the whole queue: dropped itself, nothing else.
        assert_eq!(
            q.push(body(101), 9),
            Dropped {
                requests: 1,
                bytes: 101,
                samples: 9
            }
        );
        assert_eq!(q.len(), 2);
        // Exactly the cap: everything else goes.
        assert_eq!(q.push(body(100), 1).requests, 2);
        assert_eq!(q.bytes(), 100);
    }

    #[test]
    fn removing_what_was_already_dropped_is_harmless() {
        let mut q = ByteQueue::new(50);
        q.push(body(30), 1);
        let head = q.front().unwrap();
        q.push(body(30), 1); // drops the head while it is "in flight"
        assert!(!q.contains(head.id));
        assert!(!q.remove(head.id));
        assert_eq!(q.bytes(), 30);
        let next = q.front().unwrap();
        assert!(q.remove(next.id));
        assert!(q.is_empty() && q.bytes() == 0);
        q.push(body(10), 2);
        q.push(body(20), 3);
        assert_eq!(
            q.clear(),
            Dropped {
                requests: 2,
                bytes: 30,
                samples: 5
            }
        );
    }

    #[test]
    fn exponential_backoff_with_bounded_jitter() {
        let p = RetryPolicy {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            max_elapsed: Duration::from_secs(60),
        };
        assert_eq!(backoff(&p, 0, 0.5), Duration::from_millis(100));
        assert_eq!(backoff(&p, 3, 0.5), Duration::from_millis(800));
        assert_eq!(backoff(&p, 3, 0.0), Duration::from_millis(400));
        assert_eq!(backoff(&p, 10, 0.5), Duration::from_secs(2));
        assert_eq!(backoff(&p, 10, 0.99), Duration::from_secs(2));
        assert_eq!(backoff(&p, 40, 0.0), Duration::from_secs(1));
        for _ in 0..100 {
            let j = jitter();
            assert!((0.0..1.0).contains(&j), "{j}");
        }
    }
}
