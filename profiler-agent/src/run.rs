//! The long-running agent: samples until SIGINT/SIGTERM, hands each interval's aggregate to the
//! configured sinks, logs its counters, and flushes once more on shutdown.

use std::{path::PathBuf, time::Duration};

use crate::{
    collector::Sink,
    context::IdLabels,
    ebpf::SamplerConfig,
    export,
    profile::traces::TraceTableConfig,
    record::{CollectOptions, Recording},
};

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub sampler: SamplerConfig,
    pub interval: Duration,
    /// Write one pprof per interval here.
    pub output_dir: Option<PathBuf>,
    /// Write one pprof per trace here.
    pub per_trace_dir: Option<PathBuf>,
    pub traces: TraceTableConfig,
    pub id_labels: IdLabels,
}

pub async fn run(options: RunOptions) -> anyhow::Result<()> {
    let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
    if let Some(dir) = &options.output_dir {
        sinks.push(Box::new(export::IntervalDir::create(dir)?));
    }
    if let Some(dir) = &options.per_trace_dir {
        sinks.push(Box::new(export::PerTraceDir::create(dir)?));
    }
    let recording = Recording::start_with(
        &options.sampler,
        CollectOptions {
            traces: options.traces.clone(),
            id_labels: options.id_labels.clone(),
            sinks,
            metrics: Default::default(),
        },
    )?;
    tracing::info!(
        frequency_hz = options.sampler.frequency_hz,
        interval = ?options.interval,
        output_dir = ?options.output_dir,
        per_trace_dir = ?options.per_trace_dir,
        "profiling every process on this machine"
    );
    let mut tick = tokio::time::interval(options.interval);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                recording.flush_interval().await?;
                log_counters(&recording);
            }
            _ = crate::shutdown_signal() => break,
        }
    }
    tracing::info!("shutting down: flushing the last interval and every open trace");
    recording.flush_interval().await?;
    let finished = recording.finish(|_| ()).await?;
    tracing::info!(kernel = ?finished.kernel.0, agent = ?finished.metrics.snapshot(), "stopped");
    Ok(())
}

fn log_counters(recording: &Recording) {
    let kernel = recording.kernel_counters();
    let lost = kernel.get(profiler_common::Counter::RingBufferFull);
    if lost > 0 {
        tracing::warn!(lost, "samples dropped: ring buffer full");
    }
    tracing::debug!(kernel = ?kernel.0, agent = ?recording.metrics.snapshot(), "counters");
}
