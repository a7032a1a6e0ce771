//! The long-running agent: samples until SIGINT/SIGTERM, hands each interval's aggregate and
//! each finished trace to the configured sinks (by default the embedded store; OTLP export when
//! an endpoint is set), serves the query API, logs its counters, and flushes once more on
//! shutdown (the OTLP exporter then delivers what it still holds, within its deadline). In
//! Kubernetes it also answers the kubelet's probes and keeps the workload filter current.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use tokio::sync::{mpsc, oneshot, watch};

use crate::{
    api,
    collector::Sink,
    context::IdLabels,
    ebpf::SamplerConfig,
    export::{self, otlp},
    health::{self, Health},
    k8s::{
        self, FilterMode, KubernetesOptions, PodMetadataHandle, WorkloadFilter, WorkloadSelector,
        Workloads,
    },
    metrics::Metrics,
    profile::traces::TraceTableConfig,
    query::query_command,
    record::{CollectOptions, Recording},
    store::{Retention, Store, StoreSink},
};

/// How often the kernel counters are published to `/metrics` (scrapes come every 15 s or
/// more; a timer wake-up a second is a measurable share of an idle agent).
const COUNTERS_EVERY: Duration = Duration::from_secs(5);
/// How long in-flight API requests get at shutdown.
const API_DRAIN: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub path: PathBuf,
    pub retention: Retention,
}

#[derive(Debug, Clone)]
pub struct ApiOptions {
    pub listen: SocketAddr,
    pub token: Option<String>,
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub sampler: SamplerConfig,
    pub interval: Duration,
    /// Write one pprof per interval here.
    pub output_dir: Option<PathBuf>,
    /// Write one pprof per trace here.
    pub per_trace_dir: Option<PathBuf>,
    /// The embedded store (the default output).
    pub store: Option<StoreOptions>,
    /// The query API.
    pub api: Option<ApiOptions>,
    pub traces: TraceTableConfig,
    pub id_labels: IdLabels,
    /// Export every interval over OTLP.
    pub otlp: Option<otlp::OtlpConfig>,
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
    let metrics = Metrics::default();
    // Everything that can refuse to start (a corrupt store, a taken port, a workload filter
    // without the Kubernetes API) does so before the eBPF programs load.
    let (sinks, exporter) = sinks(&options, &metrics)?;
    let listener = match &options.api {
        Some(api) => Some(api::bind(api.listen).await?),
        None => None,
    };
    // Unhealthy after three intervals without a flush.
    let health = Health::new(options.interval * 3 + Duration::from_secs(30));
    if let Some(addr) = options.health_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("health listener on {addr}"))?;
        tracing::info!(%addr, "health probes: /healthz, /readyz");
        tokio::spawn(health::serve(listener, health.clone()));
    }
    let pods = k8s::start_pod_metadata(&options.kubernetes, &metrics);
    let (mut workloads, process_notes) = workload_filter(&mut options, pods.clone())?;
    let mut recording = Recording::start_with(
        &options.sampler,
        CollectOptions {
            traces: options.traces.clone(),
            id_labels: options.id_labels.clone(),
            sinks,
            process_notes,
            pods,
            metrics: metrics.clone(),
        },
    )?;
    health.set_ready();
    let (kernel_tx, kernel_rx) = watch::channel(recording.kernel_counters());
    let api = match (listener, &options.api) {
        (Some(listener), Some(api)) => {
            Some(start_api(listener, api, &options, metrics, kernel_rx)?)
        }
        _ => None,
    };
    tracing::info!(
        frequency_hz = options.sampler.frequency_hz,
        interval = ?options.interval,
        output_dir = ?options.output_dir,
        per_trace_dir = ?options.per_trace_dir,
        store = ?options.store.as_ref().map(|s| &s.path),
        workload_filter = workloads.as_ref().map(|w| format!("{:?}", w.mode())),
        "{}",
        if workloads.is_some() {
            "profiling the selected workloads on this machine"
        } else {
            "profiling every process on this machine"
        }
    );
    announce(&options, api.as_ref().map(|a| a.addr));
    let mut tick = tokio::time::interval(options.interval);
    tick.tick().await;
    let mut counters = tokio::time::interval(COUNTERS_EVERY);
    let shutdown = crate::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                recording.flush_interval().await?;
                health.progress();
                // One read serves the log and the API; the next periodic read waits its whole
                // period (each read is a system call per counter and per program).
                let kernel = recording.kernel_counters();
                log_counters(&kernel, &recording);
                kernel_tx.send_replace(kernel);
                counters.reset();
            }
            _ = counters.tick() => {
                kernel_tx.send_replace(recording.kernel_counters());
            }
            Some(event) = next_workload_event(&mut workloads) => {
                if let Some(w) = &mut workloads
                    && let Err(e) = w.handle(event, recording.sampler())
                {
                    tracing::warn!(error = %format!("{e:#}"), "workload filter not updated");
                }
            }
            _ = &mut shutdown => break,
        }
    }
    tracing::info!("shutting down: flushing the last interval and every open trace");
    recording.flush_interval().await?;
    // Finishing drops the sinks on the collector thread: the store writes what is queued.
    let finished = recording.finish(|_| ()).await?;
    if let Some((exporter, deadline)) = exporter {
        exporter.shutdown(deadline).await;
    }
    kernel_tx.send_replace(finished.kernel.clone());
    if let Some(api) = api {
        api.stop().await;
    }
    let sampler_ns_per_run = finished
        .kernel
        .sampler_time_per_run()
        .map(|t| t.as_nanos() as u64);
    tracing::info!(kernel = ?finished.kernel.counters, ?sampler_ns_per_run, agent = ?finished.metrics.snapshot(), "stopped");
    Ok(())
}

/// The workload filter, when namespaces or a label selector are given: cgroup ids in the
/// kernel (cgroup v2) or a pid allow-list kept current from process notes (v1). Adjusts the
/// sampler's filters to start empty, so nothing unselected is sampled before the first
/// selection.
fn workload_filter(
    options: &mut RunOptions,
    pods: Option<PodMetadataHandle>,
) -> anyhow::Result<(
    Option<Workloads>,
    Option<mpsc::Sender<crate::collector::ProcessNote>>,
)> {
    if options.workloads.is_empty() {
        return Ok((None, None));
    }
    let pods = pods.context(
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
    let workloads = Workloads::new(filter, pods, rx, options.workload_refresh);
    Ok((Some(workloads), Some(tx)))
}

/// The OTLP delivery task and how long it may take to drain at shutdown.
type Exporter = (otlp::Exporter, Duration);
type Sinks = Vec<Box<dyn Sink>>;

fn sinks(options: &RunOptions, metrics: &Metrics) -> anyhow::Result<(Sinks, Option<Exporter>)> {
    let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
    if let Some(dir) = &options.output_dir {
        sinks.push(Box::new(export::IntervalDir::create(dir)?));
    }
    if let Some(dir) = &options.per_trace_dir {
        sinks.push(Box::new(export::PerTraceDir::create(dir)?));
    }
    if let Some(store) = &options.store {
        let opened = Store::open(&store.path)?;
        sinks.push(Box::new(StoreSink::start(
            opened,
            store.retention,
            metrics.clone(),
        )?));
    }
    let exporter = match &options.otlp {
        Some(config) => {
            let (sink, exporter) = otlp::start(config, metrics.clone())?;
            sinks.push(Box::new(sink));
            tracing::info!(endpoint = %config.endpoint, protocol = ?config.protocol, "exporting OTLP profiles");
            Some((exporter, config.shutdown_timeout))
        }
        None => None,
    };
    Ok((sinks, exporter))
}

/// The API task and how to stop it.
struct RunningApi {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl RunningApi {
    /// Stops accepting, lets in-flight requests finish for [`API_DRAIN`], then aborts.
    async fn stop(self) {
        let _ = self.stop.send(());
        let mut task = self.task;
        match tokio::time::timeout(API_DRAIN, &mut task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "the API server failed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "the API task failed"),
            Err(_) => task.abort(),
        }
    }
}

fn start_api(
    listener: tokio::net::TcpListener,
    options: &ApiOptions,
    run: &RunOptions,
    metrics: Metrics,
    kernel: watch::Receiver<crate::ebpf::KernelCounters>,
) -> anyhow::Result<RunningApi> {
    let addr = listener.local_addr()?;
    let state = api::ApiState {
        store: run.store.as_ref().map(|s| s.path.clone()),
        token: options.token.clone(),
        metrics,
        kernel,
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(api::serve(listener, state, async {
        let _ = stopped.await;
    }));
    Ok(RunningApi { addr, stop, task })
}

/// Tells the user where to look: the page and the query command.
fn announce(options: &RunOptions, api: Option<SocketAddr>) {
    if let Some(addr) = api {
        tracing::info!(url = %api::describe(addr), "query API listening");
    }
    if let Some(store) = &options.store {
        tracing::info!(
            path = %store.path.display(),
            retention = %humantime::format_duration(store.retention.max_age),
            max_bytes = store.retention.max_bytes,
            query = %query_command(&store.path, None),
            "storing per-trace profiles"
        );
    }
}

async fn next_workload_event(workloads: &mut Option<Workloads>) -> Option<k8s::WorkloadEvent> {
    match workloads {
        Some(w) => Some(w.next().await),
        None => std::future::pending().await,
    }
}

fn log_counters(kernel: &crate::ebpf::KernelCounters, recording: &Recording) {
    let lost = kernel.get(profiler_common::Counter::RingBufferFull);
    if lost > 0 {
        tracing::warn!(lost, "samples dropped: ring buffer full");
    }
    tracing::debug!(kernel = ?kernel.counters, agent = ?recording.metrics.snapshot(), "counters");
}
