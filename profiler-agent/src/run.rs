//! The long-running agent: samples until SIGINT/SIGTERM, hands each interval's aggregate to the
//! configured sinks, logs its counters, and flushes once more on shutdown.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;

use crate::{
    collector::Flushed,
    ebpf::SamplerConfig,
    export::{self, Format},
    record::Recording,
};

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub sampler: SamplerConfig,
    pub interval: Duration,
    /// Write one pprof per interval here.
    pub output_dir: Option<PathBuf>,
}

pub async fn run(options: RunOptions) -> anyhow::Result<()> {
    if let Some(dir) = &options.output_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let recording = Recording::start(&options.sampler)?;
    tracing::info!(
        frequency_hz = options.sampler.frequency_hz,
        interval = ?options.interval,
        output_dir = ?options.output_dir,
        "profiling every process on this machine"
    );
    let mut tick = tokio::time::interval(options.interval);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                recording.flush(sink(&options, recording.frequency_hz)).await?;
                log_counters(&recording);
            }
            _ = crate::shutdown_signal() => break,
        }
    }
    tracing::info!("shutting down: flushing the last interval");
    let frequency_hz = recording.frequency_hz;
    let finished = recording.finish(sink(&options, frequency_hz)).await?;
    tracing::info!(kernel = ?finished.kernel.0, agent = ?finished.metrics.snapshot(), "stopped");
    Ok(())
}

fn sink(options: &RunOptions, frequency_hz: u64) -> impl FnOnce(Flushed<'_>) + Send + 'static {
    let dir = options.output_dir.clone();
    move |flushed: Flushed<'_>| {
        let samples = flushed.aggregate.total_samples;
        let Some(dir) = dir else {
            tracing::info!(samples, "interval");
            return;
        };
        if samples == 0 {
            return;
        }
        let path = dir.join(format!(
            "profile-{}.pb.gz",
            flushed.window.1 / 1_000_000_000
        ));
        match export::write_file(
            &path,
            Format::Pprof,
            &flushed.aggregate,
            frequency_hz,
            flushed.window,
            flushed.symbolizer,
            flushed.objects,
        ) {
            Ok(()) => tracing::info!(samples, path = %path.display(), "wrote profile"),
            Err(e) => tracing::error!(error = %format!("{e:#}"), "cannot write profile"),
        }
    }
}

fn log_counters(recording: &Recording) {
    let kernel = recording.kernel_counters();
    let lost = kernel.get(profiler_common::Counter::RingBufferFull);
    if lost > 0 {
        tracing::warn!(lost, "samples dropped: ring buffer full");
    }
    tracing::debug!(kernel = ?kernel.0, agent = ?recording.metrics.snapshot(), "counters");
}
