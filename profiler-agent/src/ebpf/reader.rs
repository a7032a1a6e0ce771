//! Drains the ring buffer. The kernel side submits samples without waking us, so the reader
//! drains on a tick, on request, and whenever the kernel does signal: a process event submitted
//! into a drained ring wakes it (one behind undrained samples does not: the ring signals only a
//! reader that has caught up). Signals are answered at most once per [`MIN_DRAIN_INTERVAL`]:
//! on a node that starts hundreds of processes a second, each exec would otherwise cost a
//! wake-up of this task and of the collector.

use std::time::Duration;

use aya::maps::{MapData, RingBuf};
use tokio::{
    io::unix::AsyncFd,
    sync::{mpsc, oneshot},
    task::JoinHandle,
};

use super::decode::{DecodeError, Record, decode_item};
use crate::metrics::Metrics;

/// The ring buffer is drained when about this many samples per CPU are waiting (or when the
/// kernel wakes the reader): every two seconds at 99 Hz and below on most machines. A wake-up
/// costs tens of microseconds in a VM (timer and IPI exits) whatever it carries: fewer drains
/// are the largest saving in the agent's fixed cost (1 s → 2 s took ~60–90 µs a second off
/// the runtime thread, measured per thread on the bench's fixture). On a machine with many
/// CPUs the drains come sooner, so that one drain's worth of samples never fills more than half
/// the ring (at [`SAMPLE_BYTES_BOUND`] a sample: with the default 8 MiB ring, from ~50 CPUs at
/// 99 Hz). A new process's samples carry no trace context until its context source is resolved
/// (counted in `context_no_source`), so after an exec or an executable mmap the next drain
/// comes [`MIN_DRAIN_INTERVAL`] later instead.
const SAMPLES_PER_CPU_PER_DRAIN: u64 = 200;
const MIN_DRAIN_INTERVAL: Duration = Duration::from_millis(100);
/// At start every running process is new to the agent in the same way: until one of its samples
/// has been drained and its context source resolved, its samples carry no trace context. The
/// drains of this first stretch come every [`MIN_DRAIN_INTERVAL`], so a `record` of a few
/// seconds does not lose its first two to that.
const STARTUP_DRAINS_FOR: Duration = Duration::from_secs(1);
const MAX_DRAIN_INTERVAL: Duration = Duration::from_secs(2);
/// Ring bytes one sample may take: deep user and kernel stacks and a trace context.
const SAMPLE_BYTES_BOUND: u64 = 400;

/// How often the ring buffer is drained when nothing wakes the reader, at `frequency_hz` on
/// `cpus` CPUs with a ring of `ring_bytes`.
pub fn drain_interval(frequency_hz: u64, cpus: u64, ring_bytes: u32) -> Duration {
    let hz = frequency_hz.max(1);
    let by_samples = SAMPLES_PER_CPU_PER_DRAIN * 1000 / hz;
    let ring_fill_per_second = hz * cpus.max(1) * SAMPLE_BYTES_BOUND;
    let by_ring = u64::from(ring_bytes) / 2 * 1000 / ring_fill_per_second;
    Duration::from_millis(by_samples.min(by_ring)).clamp(MIN_DRAIN_INTERVAL, MAX_DRAIN_INTERVAL)
}

/// Records per message to the collector: a drain is handed over in batches of at most this
/// many, so the collector wakes once per drain instead of once per record.
const RECORDS_PER_BATCH: usize = 256;

/// A message the reader also sends, after a drain, once `every` has passed since the last one:
/// the consumer's periodic housekeeping rides on the drain's wake-up instead of a timer of its
/// own (each wake-up of the runtime costs tens of µs on a VM). Skipped while the queue is full.
pub struct Heartbeat<T> {
    pub every: Duration,
    pub message: fn() -> T,
}

/// Asks the reader for a drain now; answered once the drained records are queued to the
/// consumer, so whatever the asker sends the consumer next comes after them. (Samples are
/// submitted without waking the reader, and a process event submitted behind them does not
/// wake it either: the ring only signals a reader that has caught up.)
pub type DrainRequest = oneshot::Sender<()>;

/// Spawns the drain task. It stops when `records` is closed or `stop` fires, after a last drain.
pub fn spawn_reader<T: From<Vec<Record>> + Send + 'static>(
    ring: RingBuf<MapData>,
    records: mpsc::Sender<T>,
    drain_every: Duration,
    mut drain_requests: mpsc::Receiver<DrainRequest>,
    heartbeat: Option<Heartbeat<T>>,
    metrics: Metrics,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> JoinHandle<anyhow::Result<()>> {
    tokio::spawn(async move {
        // SAFETY: the ring buffer owns its map fd, and the AsyncFd owns the ring buffer until the
        // task ends: the fd is neither closed nor replaced while registered.
        let mut fd = unsafe { AsyncFd::register(ring)? };
        let mut tick = tokio::time::interval(drain_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let started = tokio::time::Instant::now();
        let mut last_heartbeat = started;
        let mut signals = SignalGate::default();
        loop {
            let mut asked = None;
            tokio::select! {
                _ = tick.tick() => {}
                guard = fd.readable_mut(), if signals.listening() => {
                    guard?.clear_ready();
                    if let Some(drain_at) = signals.on_signal(tokio::time::Instant::now()) {
                        // Too soon after the last drain: that drain comes on the tick instead,
                        // and further signals until then change nothing.
                        tick.reset_at(drain_at);
                        continue;
                    }
                }
                Some(reply) = drain_requests.recv() => { asked = Some(reply); }
                _ = stop.changed() => {
                    let _ = drain(fd.get_mut(), &records, &metrics);
                    return Ok(());
                }
            }
            signals.drained(tokio::time::Instant::now());
            metrics.inc("ring_drains");
            let Some(new_code) = drain(fd.get_mut(), &records, &metrics) else {
                return Ok(());
            };
            if let Some(reply) = asked {
                let _ = reply.send(());
                // The ring was just emptied: the periodic drain can wait a whole interval.
                tick.reset();
            }
            if new_code || started.elapsed() < STARTUP_DRAINS_FOR {
                // A process started (or mapped new code), or the agent did: the first samples
                // are what tell the collector to resolve a process's context source, so they
                // are fetched soon rather than a whole drain interval later. Exec and mmap
                // events already woke this task; this is one more drain after each, not one
                // per sample (and ten in the agent's first second).
                tick.reset_after(MIN_DRAIN_INTERVAL);
            }
            if let Some(h) = &heartbeat
                // Half a drain of slack: a heartbeat as long as the drain interval is not
                // skipped for a timer's jitter.
                && last_heartbeat.elapsed() + drain_every / 2 >= h.every
            {
                last_heartbeat = tokio::time::Instant::now();
                if let Err(mpsc::error::TrySendError::Closed(_)) = records.try_send((h.message)()) {
                    return Ok(());
                }
            }
        }
    })
}

/// Whether a kernel signal (a process event in a drained ring) is answered now. One that comes
/// within [`MIN_DRAIN_INTERVAL`] of the last drain, whatever caused that drain, is answered by
/// a drain at the end of that interval, and the reader stops listening for signals until then.
#[derive(Debug, Default)]
struct SignalGate {
    last_drain: Option<tokio::time::Instant>,
    deferred: bool,
}

impl SignalGate {
    fn listening(&self) -> bool {
        !self.deferred
    }

    /// None: drain now. Some(t): drain at `t` instead.
    fn on_signal(&mut self, now: tokio::time::Instant) -> Option<tokio::time::Instant> {
        let drain_at = self.last_drain? + MIN_DRAIN_INTERVAL;
        if now >= drain_at {
            return None;
        }
        self.deferred = true;
        Some(drain_at)
    }

    fn drained(&mut self, now: tokio::time::Instant) {
        self.last_drain = Some(now);
        self.deferred = false;
    }
}

/// Whether the drain saw a process exec or an executable mmap; None when the consumer is gone.
fn drain<T: From<Vec<Record>>>(
    ring: &mut RingBuf<MapData>,
    records: &mpsc::Sender<T>,
    metrics: &Metrics,
) -> Option<bool> {
    let mut received = 0;
    let mut new_code = false;
    let mut batch = Vec::new();
    let mut consumer_gone = false;
    while let Some(item) = ring.next() {
        decode_item(&item, |decoded| {
            received += 1;
            match decoded {
                Ok(record) => {
                    new_code |= matches!(record, Record::Exec { .. } | Record::MmapExec { .. });
                    // Sized once per batch, when its first record comes: grown record by
                    // record, the reallocations and copies were a tenth of the runtime
                    // thread's time.
                    if batch.capacity() == 0 {
                        batch.reserve_exact(RECORDS_PER_BATCH);
                    }
                    batch.push(record);
                    if batch.len() == RECORDS_PER_BATCH && !consumer_gone {
                        consumer_gone = !hand_over(&mut batch, records, metrics);
                    }
                }
                Err(e) => count_undecodable(metrics, &e),
            }
        });
        if consumer_gone {
            return None;
        }
    }
    metrics.add("records_received", received);
    (batch.is_empty() || hand_over(&mut batch, records, metrics)).then_some(new_code)
}

/// A record lost to decoding, counted by reason.
pub fn count_undecodable(metrics: &Metrics, error: &DecodeError) {
    metrics.inc(&format!("records_dropped_decode_{}", error.reason()));
    tracing::debug!(%error, "undecodable ring-buffer record");
}

/// Sends the batch without waiting (a full queue drops it, counted per record); false when
/// the consumer is gone.
fn hand_over<T: From<Vec<Record>>>(
    batch: &mut Vec<Record>,
    records: &mpsc::Sender<T>,
    metrics: &Metrics,
) -> bool {
    let records_in_batch = batch.len() as u64;
    match records.try_send(std::mem::take(batch).into()) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(_)) => {
            metrics.add("records_dropped_queue_full", records_in_batch);
            true
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_are_answered_at_most_once_per_minimum_interval() {
        let start = tokio::time::Instant::now();
        let mut gate = SignalGate::default();
        // Nothing drained yet: the first signal is answered at once.
        assert_eq!(gate.on_signal(start), None);
        gate.drained(start);
        // A signal soon after is deferred to the end of the interval, and no longer listened
        // for until that drain.
        let soon = start + Duration::from_millis(5);
        assert_eq!(gate.on_signal(soon), Some(start + MIN_DRAIN_INTERVAL));
        assert!(!gate.listening());
        let at = start + MIN_DRAIN_INTERVAL;
        gate.drained(at);
        assert!(gate.listening());
        // A drain on the tick or on request counts too.
        assert_eq!(
            gate.on_signal(at + Duration::from_millis(99)),
            Some(at + MIN_DRAIN_INTERVAL)
        );
        gate.drained(at + MIN_DRAIN_INTERVAL);
        // A signal after a quiet interval is answered at once.
        assert_eq!(gate.on_signal(at + 3 * MIN_DRAIN_INTERVAL), None);
    }

    #[test]
    fn drains_about_two_hundred_samples_per_cpu_within_bounds() {
        const RING: u32 = 8 << 20;
        assert_eq!(drain_interval(99, 2, RING), MAX_DRAIN_INTERVAL);
        assert_eq!(drain_interval(200, 2, RING), Duration::from_millis(1000));
        assert_eq!(drain_interval(19, 2, RING), MAX_DRAIN_INTERVAL);
        assert_eq!(drain_interval(2000, 2, RING), MIN_DRAIN_INTERVAL);
        assert_eq!(drain_interval(1, 2, RING), MAX_DRAIN_INTERVAL);
        assert_eq!(drain_interval(0, 2, RING), MAX_DRAIN_INTERVAL);
    }

    #[test]
    fn drains_sooner_when_many_cpus_would_fill_half_the_ring() {
        const RING: u32 = 8 << 20;
        // 200 CPUs at 99 Hz: 7.9 MB of samples a second at the bound; half the ring lasts 529 ms.
        assert_eq!(drain_interval(99, 200, RING), Duration::from_millis(529));
        assert_eq!(drain_interval(99, 50, RING), MAX_DRAIN_INTERVAL);
        // More CPUs than the ring can follow: the floor, and drops are counted (ringbuf_full).
        assert_eq!(drain_interval(99, 100_000, RING), MIN_DRAIN_INTERVAL);
        // A larger ring keeps the longer interval.
        assert_eq!(drain_interval(99, 100, 32 << 20), MAX_DRAIN_INTERVAL);
    }
}
