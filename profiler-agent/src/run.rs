//! The long-running agent: samples until SIGINT/SIGTERM, hands each interval's aggregate to the
//! configured sinks, logs its counters, and flushes once more on shutdown. In Kubernetes it
//! also answers the kubelet's probes and keeps the workload filter current.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use tokio::sync::mpsc;

use crate::{
    collector::Sink,
    context::IdLabels,
    ebpf::SamplerConfig,
    export,
    health::{self, Health},
    k8s::{self, FilterMode, KubernetesOptions, WorkloadFilter, WorkloadSelector, Workloads},
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
    /// Serve `/healthz` and `/readyz` here (the pod IP in Kubernetes).
    pub health_listen: Option<SocketAddr>,
    pub kubernetes: KubernetesOptions,
    /// Profile only the pods it selects (empty: every process).
    pub workloads: WorkloadSelector,
    /// The host's cgroup hierarchy (the workload filter's cgroup ids).
    pub cgroup_root: PathBuf,
    /// How often the workload filter re-reads the cgroup tree.
    pub workload_refresh: Duration,
}

pub async fn run(mut options: RunOptions) -> anyhow::Result<()> {
    let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
    if let Some(dir) = &options.output_dir {
        sinks.push(Box::new(export::IntervalDir::create(dir)?));
    }
    if let Some(dir) = &options.per_trace_dir {
        sinks.push(Box::new(export::PerTraceDir::create(dir)?));
    }
    // Bound before anything slow, so a port conflict fails fast; unhealthy after three
    // intervals without a flush.
    let health = Health::new(options.interval * 3 + Duration::from_secs(30));
    if let Some(addr) = options.health_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("health listener on {addr}"))?;
        tracing::info!(%addr, "health probes: /healthz, /readyz");
        tokio::spawn(health::serve(listener, health.clone()));
    }

    let metrics = crate::metrics::Metrics::default();
    let pods = k8s::start_pod_metadata(&options.kubernetes, &metrics);
    let mut workloads = None;
    let mut process_notes = None;
    if !options.workloads.is_empty() {
        let pods = pods.clone().context(
            "--k8s-namespace / --k8s-selector need the Kubernetes API (in a pod, or --k8s-api-url) and a node name",
        )?;
        let filter = WorkloadFilter::new(options.workloads.clone(), &options.cgroup_root)?;
        match filter.mode() {
            FilterMode::CgroupIds => {
                // Nothing until the first selection; `--cgroup` paths are replaced.
                options.sampler.cgroups = Some(Default::default());
            }
            FilterMode::Pids => {
                anyhow::ensure!(
                    options.sampler.pids.is_none(),
                    "--pid cannot be combined with a workload filter on a cgroup v1 host"
                );
                options.sampler.pids = Some(Vec::new());
            }
        }
        let (tx, rx) = mpsc::channel(Workloads::NOTE_QUEUE);
        process_notes = Some(tx);
        workloads = Some(Workloads::new(filter, pods, rx, options.workload_refresh));
    }

    let mut recording = Recording::start_with_metrics(
        &options.sampler,
        CollectOptions {
            traces: options.traces.clone(),
            id_labels: options.id_labels.clone(),
            sinks,
            process_notes,
        },
        metrics,
    )?;
    health.set_ready();
    tracing::info!(
        frequency_hz = options.sampler.frequency_hz,
        interval = ?options.interval,
        output_dir = ?options.output_dir,
        per_trace_dir = ?options.per_trace_dir,
        workload_filter = workloads.as_ref().map(|w| format!("{:?}", w.mode())),
        "profiling"
    );
    let mut tick = tokio::time::interval(options.interval);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                recording.flush_interval().await?;
                health.progress();
                log_counters(&recording);
            }
            Some(event) = next_workload_event(&mut workloads) => {
                if let Some(w) = &mut workloads
                    && let Err(e) = w.handle(event, recording.sampler())
                {
                    tracing::warn!(error = %format!("{e:#}"), "workload filter not updated");
                }
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

async fn next_workload_event(workloads: &mut Option<Workloads>) -> Option<k8s::WorkloadEvent> {
    match workloads {
        Some(w) => Some(w.next().await),
        None => std::future::pending().await,
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
