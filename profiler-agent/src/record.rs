//! A timed, self-contained capture: load the sampler, collect, stop, write one profile.
//! [`Recording`] is also the in-process API the integration tests drive.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use tokio::sync::{mpsc, oneshot, watch};

use crate::{
    collector::{Collector, Flushed, Message, SymbolizedSample},
    ebpf::{KernelCounters, Sampler, SamplerConfig, spawn_reader},
    export::{self, Format},
    metrics::Metrics,
};

/// Depth of the queue between the ring-buffer reader and the collector.
const COLLECTOR_QUEUE: usize = 16_384;

/// A running capture.
pub struct Recording {
    sampler: Sampler,
    stop: watch::Sender<bool>,
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
        let metrics = Metrics::default();
        let (sampler, ring) = Sampler::start(config)?;
        let (inbox, rx) = mpsc::channel(COLLECTOR_QUEUE);
        let collector = Collector::spawn(metrics.clone(), rx);
        let (stop, stop_rx) = watch::channel(false);
        let reader = spawn_reader(ring, inbox.clone(), metrics.clone(), stop_rx);
        Ok(Self {
            sampler,
            stop,
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

    /// The samples so far, symbolized.
    pub async fn snapshot(&self) -> anyhow::Result<Vec<SymbolizedSample>> {
        let (tx, rx) = oneshot::channel();
        self.inbox
            .send(Message::Snapshot(tx))
            .await
            .map_err(|_| collector_stopped())?;
        rx.await.map_err(|_| collector_stopped())
    }

    /// Runs `f` on the collector's thread with the aggregate since the last flush.
    pub async fn flush(&self, f: impl FnOnce(Flushed<'_>) + Send + 'static) -> anyhow::Result<()> {
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
        let kernel = self.sampler.stop();
        let _ = self.stop.send(true);
        self.reader.await.context("ring-buffer reader panicked")??;
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
    let recording = Recording::start(&options.sampler)?;
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
