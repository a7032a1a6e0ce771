//! The store as a collector sink. On the collector thread it adds each trace's samples to the
//! batch's one profile (the symbolizer lives there) and gathers index records; a batch goes to
//! the writer thread once it is [`BATCH_WAIT`] old (checked at the collector's tick) or
//! [`BATCH`] records long, through a bounded queue. A full queue drops the batch and counts its
//! records (`store_dropped_queue_full`), so sampling never waits for the disk. The writer
//! commits each batch as one transaction and runs retention every [`RETENTION_EVERY`].

use std::{
    sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use super::{
    BucketRecord, PART_LABEL, Retention, Store, TraceBatch, TraceProcess, TraceRecord, unix_now_ns,
};
use crate::{
    collector::{Sink, SinkContext},
    export::{self, pprof},
    metrics::Metrics,
    profile::{Aggregate, traces::TraceProfile},
};

/// Records per batch (one transaction) at most.
pub(super) const BATCH: usize = 512;
/// Samples (distinct stacks and label sets) in a batch's trace profile at most: a query
/// decodes the whole profile of its trace's batch, 1–2 ms at this size (`bench-store`'s
/// synthetic traces, 30 frames deep: 2.3 ms p50 for the whole query). A trace with more
/// samples goes in a batch of its own.
pub(super) const BATCH_SAMPLES: usize = 2048;
/// Batches waiting for the writer at most: 16 × 2 s of a busy machine while the disk stalls.
const QUEUE_BATCHES: usize = 16;
/// How long a batch gathers records before it goes to the writer: one transaction (and one WAL
/// commit, which rewrites every index page it touched), one profile for all its traces and one
/// wake-up of the writer per two seconds, rather than per trace. Traces reach the store after
/// they went idle anyway.
const BATCH_WAIT: Duration = Duration::from_secs(2);
/// How often retention runs (and once at start).
const RETENTION_EVERY: Duration = Duration::from_secs(10);

/// What the writer stores in one transaction.
struct Batch {
    traces: TraceBatch,
    buckets: Vec<BucketRecord>,
}

impl Batch {
    fn records(&self) -> usize {
        self.traces.traces.len() + self.buckets.len()
    }
}

pub struct StoreSink {
    queue: Option<SyncSender<Batch>>,
    /// The batch being gathered: its traces' samples (one profile, each trace's labelled with
    /// its index), their index records, the buckets, and when its first record came.
    trace_samples: Option<pprof::PprofTables>,
    traces: Vec<TraceRecord>,
    buckets: Vec<BucketRecord>,
    pending_since: Instant,
    writer: Option<JoinHandle<()>>,
    metrics: Metrics,
}

impl StoreSink {
    /// Starts the writer thread, which owns `store` from now on.
    pub fn start(store: Store, retention: Retention, metrics: Metrics) -> std::io::Result<Self> {
        let (queue, rx) = mpsc::sync_channel(QUEUE_BATCHES);
        let writer_metrics = metrics.clone();
        let writer = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || write_loop(store, retention, &rx, &writer_metrics))?;
        Ok(Self {
            queue: Some(queue),
            trace_samples: None,
            traces: Vec::new(),
            buckets: Vec::new(),
            pending_since: Instant::now(),
            writer: Some(writer),
            metrics,
        })
    }

    fn pending(&self) -> usize {
        self.traces.len() + self.buckets.len()
    }

    /// Call before adding a record.
    fn note_new_record(&mut self) {
        if self.pending() == 0 {
            self.pending_since = Instant::now();
        }
    }

    fn hand_over_if_full(&mut self) {
        if self.pending() >= BATCH {
            self.hand_over();
        }
    }

    fn hand_over(&mut self) {
        if self.pending() == 0 {
            return;
        }
        let traces = std::mem::take(&mut self.traces);
        let profile = match self.trace_samples.take() {
            Some(mut samples) if !traces.is_empty() => {
                let first = traces.iter().map(|t| t.first_ns).min().unwrap_or(0);
                let last = traces.iter().map(|t| t.last_ns).max().unwrap_or(first);
                samples.set_window(first, last - first);
                pprof::encode_for_store(&samples.finish())
            }
            _ => Vec::new(),
        };
        let batch = Batch {
            traces: TraceBatch { profile, traces },
            buckets: std::mem::take(&mut self.buckets),
        };
        let Some(queue) = &self.queue else { return };
        match queue.try_send(batch) {
            Ok(()) => {}
            Err(TrySendError::Full(b)) => {
                self.metrics
                    .add("store_dropped_queue_full", b.records() as u64);
            }
            Err(TrySendError::Disconnected(b)) => {
                self.metrics
                    .add("store_dropped_writer_gone", b.records() as u64);
            }
        }
    }
}

impl Sink for StoreSink {
    fn trace(&mut self, trace: &TraceProfile, cx: &mut SinkContext<'_>) {
        // One blazesym call per object for the whole trace.
        let frames: Vec<_> = trace
            .samples
            .keys()
            .flat_map(|k| k.stack.iter().copied())
            .collect();
        cx.symbolizer.resolve(frames, cx.objects);
        self.note_new_record();
        let index = self.traces.len() as u32;
        let samples = self
            .trace_samples
            .take()
            .unwrap_or_else(|| pprof::PprofTables::new(cx.frequency_hz, 0, 0));
        let mut builder = samples.resume(cx.symbolizer, cx.objects);
        export::add_trace_samples(&mut builder, trace, Some((PART_LABEL, i64::from(index))));
        let samples = builder.suspend();
        let full = samples.samples() >= BATCH_SAMPLES;
        self.trace_samples = Some(samples);
        self.traces
            .push(trace_record(trace, cx.frequency_hz, index));
        if full || self.pending() >= BATCH {
            self.hand_over();
        }
    }

    fn tick(&mut self) {
        if self.pending_since.elapsed() >= BATCH_WAIT {
            self.hand_over();
        }
    }

    fn interval(&mut self, aggregate: &Aggregate, window: (u64, u64), cx: &mut SinkContext<'_>) {
        if aggregate.total_samples == 0 {
            return;
        }
        let period = period_ns(cx.frequency_hz);
        for p in export::process_profiles(
            aggregate,
            cx.frequency_hz,
            window,
            cx.symbolizer,
            cx.objects,
        ) {
            self.note_new_record();
            self.buckets.push(BucketRecord {
                start_ns: window.0,
                end_ns: window.1,
                pid: p.pid,
                service: p.service_name.unwrap_or_else(|| p.process_name.clone()),
                process_name: p.process_name,
                namespace: p.pod.as_ref().map(|p| p.0.clone()).unwrap_or_default(),
                pod: p.pod.map(|p| p.1).unwrap_or_default(),
                samples: p.samples,
                cpu_ns: p.samples * period,
                profile: pprof::encode_for_store(&p.profile),
            });
            self.hand_over_if_full();
        }
    }
}

impl Drop for StoreSink {
    /// Hands over the last batch, closes the queue and waits for the writer to store what is
    /// queued: at shutdown the collector drops its sinks after the last flush, and nothing may
    /// be lost.
    fn drop(&mut self) {
        self.hand_over();
        drop(self.queue.take());
        if let Some(writer) = self.writer.take()
            && writer.join().is_err()
        {
            tracing::error!("the store writer thread panicked");
        }
    }
}

fn period_ns(frequency_hz: u64) -> u64 {
    1_000_000_000 / frequency_hz.max(1)
}

fn trace_record(trace: &TraceProfile, frequency_hz: u64, index: u32) -> TraceRecord {
    // Sorted by pid, as the trace keeps them.
    let processes: Vec<TraceProcess> = trace
        .processes
        .iter()
        .map(|(pid, process)| {
            let pod = process.details.pod.as_ref();
            TraceProcess {
                pid: *pid,
                process_name: process.name.clone(),
                service: process.service_name().to_owned(),
                namespace: pod.map(|p| p.namespace.clone()).unwrap_or_default(),
                pod: pod.map(|p| p.name.clone()).unwrap_or_default(),
            }
        })
        .collect();
    let mut spans: Vec<[u8; 8]> = trace.samples.keys().map(|k| k.span_id).collect();
    spans.sort_unstable();
    spans.dedup();
    TraceRecord {
        trace_id: trace.trace_id,
        part: trace.created_unix_ns,
        first_ns: trace.first_unix_ns,
        last_ns: trace.last_unix_ns,
        samples: trace.total_samples,
        cpu_ns: trace.total_samples * period_ns(frequency_hz),
        processes,
        spans,
        index,
    }
}

fn write_loop(
    mut store: Store,
    retention: Retention,
    rx: &mpsc::Receiver<Batch>,
    metrics: &Metrics,
) {
    run_retention(&mut store, &retention, metrics);
    let mut last_retention = Instant::now();
    loop {
        match rx.recv_timeout(RETENTION_EVERY) {
            Ok(batch) => write_batch(&mut store, batch, metrics),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        if last_retention.elapsed() >= RETENTION_EVERY {
            run_retention(&mut store, &retention, metrics);
            last_retention = Instant::now();
        }
    }
    run_retention(&mut store, &retention, metrics);
    store.checkpoint();
}

fn write_batch(store: &mut Store, batch: Batch, metrics: &Metrics) {
    match store.write(&batch.traces, &batch.buckets) {
        Ok(()) => {
            metrics.add("store_traces_written", batch.traces.traces.len() as u64);
            metrics.add("store_buckets_written", batch.buckets.len() as u64);
        }
        Err(e) => {
            // The file is left as it was (the transaction rolled back); only this batch is lost.
            metrics.add("store_write_errors", 1);
            metrics.add("store_records_lost_write_error", batch.records() as u64);
            tracing::error!(error = %e, "cannot write to the store");
        }
    }
}

fn run_retention(store: &mut Store, retention: &Retention, metrics: &Metrics) {
    match store.enforce_retention(retention, unix_now_ns()) {
        Ok(o) => {
            metrics.add("store_deleted_traces_age", o.traces_by_age);
            metrics.add("store_deleted_buckets_age", o.buckets_by_age);
            metrics.add("store_deleted_traces_size", o.traces_by_size);
            metrics.add("store_deleted_buckets_size", o.buckets_by_size);
            if o.traces_by_size + o.buckets_by_size > 0 {
                tracing::info!(
                    traces = o.traces_by_size,
                    buckets = o.buckets_by_size,
                    max_bytes = retention.max_bytes,
                    "store over its size cap: deleted the oldest"
                );
            }
        }
        Err(e) => {
            metrics.inc("store_retention_errors");
            tracing::error!(error = %e, "store retention failed");
        }
    }
}
