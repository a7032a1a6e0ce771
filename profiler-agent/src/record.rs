//! A timed, self-contained capture: load the sampler, collect, stop, write one profile.
//! [`Recording`] is also the in-process API the integration tests drive.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use tokio::sync::{mpsc, oneshot, watch};

use crate::{
    collector::{
        Collector, CollectorConfig, Flushed, Message, ProcessNote, Sink, SymbolizedSample,
    },
    context::IdLabels,
    ebpf::{
        DrainRequest, Heartbeat, KernelCounters, Sampler, SamplerConfig, count_undecodable,
        spawn_reader,
    },
    export::{self, Format},
    k8s::PodMetadataHandle,
    metrics::Metrics,
    profile::traces::TraceTableConfig,
};

/// Depth of the queue between the ring-buffer reader and the collector, in messages (a
/// message is one drain's batch of at most `RECORDS_PER_BATCH` records): two minutes of drains
/// on a small machine, 65,536 records at most, while a slow flush (a cold symbolization) holds the
/// collector.
const COLLECTOR_QUEUE: usize = 256;

/// How often the collector flushes idle traces and does its housekeeping (sent by the reader
/// after a drain: at most one drain interval late).
const TICK: Duration = Duration::from_secs(1);

/// What a recording does with what it collects.
#[derive(Default)]
pub struct CollectOptions {
    pub traces: TraceTableConfig,
    /// Labels that carry trace and span ids (label-based sources).
    pub id_labels: IdLabels,
    pub sinks: Vec<Box<dyn Sink>>,
    /// Told about every process exec and exit (the workload filter's pid allow-list).
    pub process_notes: Option<mpsc::Sender<ProcessNote>>,
    /// This node's pods (Kubernetes): each process's pod goes on its profiles.
    pub pods: Option<PodMetadataHandle>,
    /// The agent's counters; shared with whatever else reports them (the daemon's sinks, the
    /// pod metadata watcher and the `/metrics` endpoint).
    pub metrics: Metrics,
}

/// A running capture.
pub struct Recording {
    sampler: Sampler,
    stop: watch::Sender<bool>,
    /// Drain requests to the ring-buffer reader.
    drains: mpsc::Sender<DrainRequest>,
    reader: tokio::task::JoinHandle<anyhow::Result<()>>,
    inbox: mpsc::Sender<Message>,
    collector: std::thread::JoinHandle<()>,
    pub metrics: Metrics,
    pub frequency_hz: u64,
}

/// What a finished recording hands back.
pub struct Finished<R> {
    /// What the final flush callback returned.
    pub output: R,
    pub kernel: KernelCounters,
    pub metrics: Metrics,
}

impl Recording {
    pub fn start(config: &SamplerConfig) -> anyhow::Result<Self> {
        Self::start_with(config, CollectOptions::default())
    }

    pub fn start_with(config: &SamplerConfig, outputs: CollectOptions) -> anyhow::Result<Self> {
        let metrics = outputs.metrics;
        let (sampler, channels) = Sampler::start(config)?;
        let (inbox, rx) = mpsc::channel(COLLECTOR_QUEUE);
        let collector = Collector::spawn(
            CollectorConfig {
                frequency_hz: config.frequency_hz,
                traces: outputs.traces,
                id_labels: outputs.id_labels,
                process_notes: outputs.process_notes,
                pods: outputs.pods,
            },
            outputs.sinks,
            Some(channels.context_sources),
            metrics.clone(),
            rx,
        )
        .context("start the collector thread")?;
        let (stop, stop_rx) = watch::channel(false);
        let (drains, drain_requests) = mpsc::channel(4);
        let reader = spawn_reader(
            channels.ring,
            inbox.clone(),
            channels.drain_every,
            drain_requests,
            Some(Heartbeat {
                every: TICK,
                message: || Message::Tick,
            }),
            metrics.clone(),
            stop_rx,
        );
        Ok(Self {
            sampler,
            stop,
            drains,
            reader,
            inbox,
            collector,
            metrics,
            frequency_hz: config.frequency_hz,
        })
    }

    pub fn sampler(&mut self) -> &mut Sampler {
        &mut self.sampler
    }

    pub fn kernel_counters(&self) -> KernelCounters {
        self.sampler.counters()
    }

    /// The samples so far, symbolized: the ring is drained first (drains otherwise come every
    /// ~200 samples per CPU, 2 s at 99 Hz).
    pub async fn snapshot(&self) -> anyhow::Result<Vec<SymbolizedSample>> {
        self.drain().await;
        let (tx, rx) = oneshot::channel();
        self.inbox
            .send(Message::Snapshot(tx))
            .await
            .map_err(|_| collector_stopped())?;
        rx.await.map_err(|_| collector_stopped())
    }

    /// Has the reader drain the ring buffer now; returns once the drained records are queued
    /// to the collector, so what is sent to the collector next comes after them. Samples wait
    /// in the ring for up to a drain interval (2 s at 99 Hz), which may be longer than the
    /// agent's flush interval: every flush drains first, so an interval holds its samples.
    async fn drain(&self) {
        let (drained, done) = oneshot::channel();
        if self.drains.send(drained).await.is_ok() {
            // Dropped unanswered only when the reader stopped: there is nothing left to drain.
            let _ = done.await;
        }
    }

    /// Hands the interval's aggregate (the ring drained first) to every sink.
    pub async fn flush_interval(&self) -> anyhow::Result<()> {
        self.drain().await;
        self.inbox
            .send(Message::FlushInterval)
            .await
            .map_err(|_| collector_stopped())
    }

    /// Runs `f` on the collector's thread with the aggregate since the last flush (the ring
    /// drained first).
    pub async fn flush(&self, f: impl FnOnce(Flushed<'_>) + Send + 'static) -> anyhow::Result<()> {
        self.drain().await;
        self.inbox
            .send(Message::Flush(Box::new(f)))
            .await
            .map_err(|_| collector_stopped())
    }

    /// Stops sampling, drains what the kernel already wrote, runs `f` on the last aggregate
    /// (on the collector's thread) and stops the collector.
    pub async fn finish<R: Send + 'static>(
        self,
        f: impl FnOnce(Flushed<'_>) -> R + Send + 'static,
    ) -> anyhow::Result<Finished<R>> {
        let (kernel, staged) = self.sampler.stop();
        let _ = self.stop.send(true);
        self.reader.await.context("ring-buffer reader panicked")??;
        // The samples each CPU had staged but not yet written to the ring: they follow the
        // ring's last records.
        self.metrics.add("records_received", staged.len() as u64);
        let mut unsent = Vec::with_capacity(staged.len());
        for decoded in staged {
            match decoded {
                Ok(record) => unsent.push(record),
                Err(e) => count_undecodable(&self.metrics, &e),
            }
        }
        self.metrics
            .add("samples_read_from_staging_at_stop", unsent.len() as u64);
        if !unsent.is_empty() {
            self.inbox
                .send(Message::Records(unsent))
                .await
                .map_err(|_| collector_stopped())?;
        }
        self.inbox
            .send(Message::FlushTraces)
            .await
            .map_err(|_| collector_stopped())?;
        let (tx, rx) = oneshot::channel();
        self.inbox
            .send(Message::Flush(Box::new(move |flushed| {
                let _ = tx.send(f(flushed));
            })))
            .await
            .map_err(|_| collector_stopped())?;
        drop(self.inbox);
        let output = rx.await.map_err(|_| collector_stopped())?;
        tokio::task::spawn_blocking(move || self.collector.join())
            .await?
            .map_err(|_| anyhow::anyhow!("collector thread panicked"))?;
        Ok(Finished {
            output,
            kernel,
            metrics: self.metrics,
        })
    }
}

fn collector_stopped() -> anyhow::Error {
    anyhow::anyhow!("the collector thread stopped unexpectedly")
}

#[derive(Debug, Clone)]
pub struct RecordOptions {
    pub duration: Duration,
    pub output: PathBuf,
    pub format: Format,
    pub sampler: SamplerConfig,
    /// Also write one pprof per trace, `<dir>/<trace_id>.pb.gz`.
    pub per_trace_dir: Option<PathBuf>,
    pub traces: TraceTableConfig,
    pub id_labels: IdLabels,
}

/// Totals printed at the end of `record`.
#[derive(Debug, Clone)]
pub struct RecordSummary {
    pub samples: u64,
    pub processes: usize,
    pub kernel: KernelCounters,
    pub agent: std::collections::BTreeMap<String, u64>,
}

pub async fn record(options: RecordOptions) -> anyhow::Result<RecordSummary> {
    if let Some(pids) = &options.sampler.pids {
        for pid in pids {
            anyhow::ensure!(
                std::path::Path::new(&format!("/proc/{pid}")).exists(),
                "no process with pid {pid}"
            );
        }
    }
    let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
    if let Some(dir) = &options.per_trace_dir {
        sinks.push(Box::new(export::PerTraceDir::create(dir)?));
    }
    let recording = Recording::start_with(
        &options.sampler,
        CollectOptions {
            traces: options.traces.clone(),
            id_labels: options.id_labels.clone(),
            sinks,
            process_notes: None,
            pods: None,
            metrics: Metrics::default(),
        },
    )?;
    tracing::info!(
        duration = ?options.duration,
        frequency_hz = options.sampler.frequency_hz,
        "recording"
    );
    tokio::select! {
        _ = tokio::time::sleep(options.duration) => {}
        _ = crate::shutdown_signal() => tracing::info!("interrupted: writing what was recorded"),
    }
    let frequency_hz = recording.frequency_hz;
    let output = options.output.clone();
    let format = options.format;
    let finished = recording
        .finish(move |flushed: Flushed<'_>| {
            let samples = flushed.aggregate.total_samples;
            let processes = flushed.aggregate.process_names.len();
            export::write_file(
                &output,
                format,
                &flushed.aggregate,
                frequency_hz,
                flushed.window,
                flushed.symbolizer,
                flushed.objects,
            )
            .map(|()| (samples, processes))
        })
        .await?;
    let (samples, processes) = finished.output?;
    Ok(RecordSummary {
        samples,
        processes,
        kernel: finished.kernel,
        agent: finished.metrics.snapshot(),
    })
}
