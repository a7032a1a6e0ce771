//! `profiler-agent`: command-line entry point. Parses flags (each with a `PROFILER_*`
//! environment twin), sets up logging, and runs the chosen command.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};
use profiler_agent::{
    context::IdLabels,
    ebpf::SamplerConfig,
    export::Format,
    k8s::{CgroupSelection, KubernetesOptions, WorkloadSelector},
    profile::traces::TraceTableConfig,
    record::{RecordOptions, record},
    run::{RunOptions, run},
};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "profiler-agent",
    version,
    about = "eBPF CPU profiler that answers where a trace spent its CPU"
)]
struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        env = "PROFILER_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Sample for a fixed time and write one profile.
    Record(RecordArgs),
    /// Run as a daemon until SIGINT/SIGTERM.
    Run(RunArgs),
}

#[derive(Args)]
struct SamplingArgs {
    /// Sampling frequency per CPU, in Hz.
    #[arg(long, short = 'F', env = "PROFILER_FREQUENCY", default_value_t = 19)]
    frequency: u64,
    /// Only sample these processes (repeatable). Default: every process.
    #[arg(
        long = "pid",
        short = 'p',
        env = "PROFILER_PIDS",
        value_delimiter = ','
    )]
    pids: Vec<u32>,
    /// Only sample tasks in this cgroup or below it (repeatable): a directory of the cgroup v2
    /// hierarchy, checked in the kernel by cgroup id before any stack is walked. A cgroup v1
    /// directory falls back to an allow-list of the pids in it when the agent starts.
    #[arg(long = "cgroup", env = "PROFILER_CGROUPS", value_delimiter = ',')]
    cgroups: Vec<PathBuf>,
    /// Ring-buffer size in bytes (power of two).
    #[arg(long, env = "PROFILER_RING_BUFFER_BYTES", default_value_t = 8 << 20)]
    ring_buffer_bytes: u32,
    /// Read trace contexts that OpenTelemetry eBPF Instrumentation (OBI) records in its pinned
    /// `traces_ctx_v1` map (lowest precedence; creates and pins the map if OBI has not).
    #[arg(long, env = "PROFILER_OBI")]
    obi: bool,
    /// Where bpffs is mounted (OBI's map is `<root>/otel/traces_ctx_v1`).
    #[arg(long, env = "PROFILER_BPFFS_ROOT", default_value = "/sys/fs/bpf")]
    bpffs_root: PathBuf,
}

impl SamplingArgs {
    fn config(&self, traces: &TraceArgs) -> anyhow::Result<SamplerConfig> {
        let mut pids = (!self.pids.is_empty()).then(|| self.pids.clone());
        let mut cgroups = None;
        if !self.cgroups.is_empty() {
            let selection = CgroupSelection::resolve(&self.cgroups)?;
            if let Some(v1_pids) = selection.v1_pids {
                anyhow::ensure!(
                    pids.is_none(),
                    "--pid cannot be combined with a cgroup v1 --cgroup (both become pid lists)"
                );
                pids = Some(v1_pids);
            }
            cgroups = selection.v2_ids;
        }
        Ok(SamplerConfig {
            frequency_hz: self.frequency,
            pids,
            cgroups,
            ring_buffer_bytes: self.ring_buffer_bytes,
            obi_bpffs_root: self.obi.then(|| self.bpffs_root.clone()),
            wanted_label_keys: traces
                .trace_id_labels
                .iter()
                .chain(&traces.span_id_labels)
                .cloned()
                .collect(),
        })
    }
}

#[derive(Args)]
struct TraceArgs {
    /// A trace is complete after this long without samples.
    #[arg(long, env = "PROFILER_TRACE_IDLE_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    trace_idle_timeout: Duration,
    /// Traces held in memory at most (the least recently active is written early past it).
    #[arg(long, env = "PROFILER_MAX_LIVE_TRACES", default_value_t = 10_000)]
    max_live_traces: usize,
    /// Also keep traces whose sampled flag is clear.
    #[arg(long, env = "PROFILER_KEEP_UNSAMPLED_TRACES")]
    keep_unsampled_traces: bool,
    /// Label keys that carry the trace id (hex) in label-based sources (custom-labels, Go
    /// pprof labels), in order of preference.
    #[arg(
        long = "trace-id-label",
        env = "PROFILER_TRACE_ID_LABELS",
        value_delimiter = ',',
        default_value = "trace_id"
    )]
    trace_id_labels: Vec<String>,
    /// Label keys that carry the span id (hex).
    #[arg(
        long = "span-id-label",
        env = "PROFILER_SPAN_ID_LABELS",
        value_delimiter = ',',
        default_value = "span_id"
    )]
    span_id_labels: Vec<String>,
}

impl TraceArgs {
    fn config(&self) -> TraceTableConfig {
        TraceTableConfig {
            idle_timeout_ns: self.trace_idle_timeout.as_nanos() as u64,
            max_live: self.max_live_traces,
            keep_unsampled: self.keep_unsampled_traces,
            ..TraceTableConfig::default()
        }
    }

    fn id_labels(&self) -> IdLabels {
        IdLabels {
            trace_id: self.trace_id_labels.clone(),
            span_id: self.span_id_labels.clone(),
        }
    }
}

#[derive(Args)]
struct RecordArgs {
    /// How long to sample (e.g. 10s, 1m).
    #[arg(long, short = 'd', default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Where to write the profile.
    #[arg(long, short = 'o', default_value = "profile.pb.gz")]
    output: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value = "pprof")]
    format: Format,
    /// Also write one pprof per trace: <DIR>/<trace_id>.pb.gz.
    #[arg(long)]
    per_trace_dir: Option<PathBuf>,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    traces: TraceArgs,
}

#[derive(Args)]
struct RunArgs {
    /// How often the current profile is handed to the outputs.
    #[arg(long, env = "PROFILER_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Write one pprof per interval into this directory.
    #[arg(long, env = "PROFILER_OUTPUT_DIR")]
    output_dir: Option<PathBuf>,
    /// Write one pprof per trace: <DIR>/<trace_id>.pb.gz.
    #[arg(long, env = "PROFILER_PER_TRACE_DIR")]
    per_trace_dir: Option<PathBuf>,
    /// Serve health probes (`/healthz`, `/readyz`) on this address, e.g. the pod IP (the API,
    /// if any, stays on loopback). IPv6 with or without brackets (`fd00::5:8081`).
    #[arg(long, env = "PROFILER_HEALTH_LISTEN", value_parser = parse_listen_addr)]
    health_listen: Option<std::net::SocketAddr>,
    #[command(flatten)]
    kubernetes: KubernetesArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    traces: TraceArgs,
}

#[derive(Args)]
struct KubernetesArgs {
    /// This node's name: pod metadata is watched for its pods only (downward API
    /// `spec.nodeName`).
    #[arg(long, env = "PROFILER_NODE_NAME")]
    node_name: Option<String>,
    /// The Kubernetes API server, e.g. `http://127.0.0.1:8001` from `kubectl proxy`.
    /// Default: the in-cluster service account. Not in a pod and not given: no pod metadata.
    #[arg(long, env = "PROFILER_K8S_API_URL")]
    k8s_api_url: Option<String>,
    /// Profile only pods in these namespaces (repeatable, or comma-separated). The workload
    /// filter is applied in the kernel, by cgroup id.
    #[arg(
        long = "k8s-namespace",
        env = "PROFILER_K8S_NAMESPACES",
        value_delimiter = ','
    )]
    k8s_namespaces: Vec<String>,
    /// Profile only pods whose labels match this selector (kubectl syntax: `app=web,tier!=test`,
    /// `env in (prod,staging)`, `!legacy`).
    #[arg(long, env = "PROFILER_K8S_SELECTOR", default_value = "")]
    k8s_selector: String,
    /// Where the host's cgroup hierarchy is mounted (a hostPath mount in a container).
    #[arg(long, env = "PROFILER_CGROUP_ROOT", default_value = "/sys/fs/cgroup")]
    cgroup_root: PathBuf,
    /// How often the workload filter re-reads the cgroup tree (besides pod and process events).
    #[arg(long, env = "PROFILER_K8S_REFRESH", default_value = "10s", value_parser = humantime::parse_duration)]
    k8s_refresh: Duration,
}

impl KubernetesArgs {
    fn selector(&self) -> anyhow::Result<WorkloadSelector> {
        Ok(WorkloadSelector {
            namespaces: self
                .k8s_namespaces
                .iter()
                .map(|n| n.trim().to_owned())
                .filter(|n| !n.is_empty())
                .collect(),
            labels: self
                .k8s_selector
                .parse()
                .map_err(|e| anyhow::anyhow!("--k8s-selector: {e:#}"))?,
        })
    }
}

/// `ip:port`, also for an IPv6 address without brackets: `$(POD_IP):8081` in a manifest works
/// for IPv4 and IPv6 pods alike.
fn parse_listen_addr(s: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    let (ip, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s}: expected ip:port"))?;
    let ip: std::net::IpAddr = ip.parse().map_err(|e| format!("{s}: {e}"))?;
    let port: u16 = port.parse().map_err(|e| format!("{s}: port: {e}"))?;
    Ok((ip, port).into())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Record(args) => {
                let summary = record(RecordOptions {
                    duration: args.duration,
                    output: args.output.clone(),
                    format: args.format,
                    sampler: args.sampling.config(&args.traces)?,
                    per_trace_dir: args.per_trace_dir.clone(),
                    traces: args.traces.config(),
                    id_labels: args.traces.id_labels(),
                })
                .await?;
                print_summary(&args.output, &summary);
                Ok(())
            }
            Command::Run(args) => {
                run(RunOptions {
                    sampler: args.sampling.config(&args.traces)?,
                    interval: args.interval,
                    output_dir: args.output_dir,
                    per_trace_dir: args.per_trace_dir,
                    traces: args.traces.config(),
                    id_labels: args.traces.id_labels(),
                    health_listen: args.health_listen,
                    workloads: args.kubernetes.selector()?,
                    kubernetes: KubernetesOptions {
                        api_url: args.kubernetes.k8s_api_url,
                        node_name: args.kubernetes.node_name,
                    },
                    cgroup_root: args.kubernetes.cgroup_root,
                    workload_refresh: args.kubernetes.k8s_refresh,
                })
                .await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn print_summary(output: &std::path::Path, summary: &profiler_agent::record::RecordSummary) {
    use profiler_common::Counter;
    let k = &summary.kernel;
    eprintln!(
        "wrote {} ({} samples from {} processes)",
        output.display(),
        summary.samples,
        summary.processes
    );
    eprintln!(
        "kernel: {} ticks, {} samples emitted, {} lost (ring buffer full), {} filtered by pid, {} by cgroup, {} idle",
        k.get(Counter::Invocations),
        k.get(Counter::SamplesEmitted),
        k.get(Counter::RingBufferFull),
        k.get(Counter::SkippedFiltered),
        k.get(Counter::SkippedCgroup),
        k.get(Counter::SkippedIdle),
    );
    let dropped: u64 = summary
        .agent
        .iter()
        .filter(|(name, _)| name.starts_with("records_dropped"))
        .map(|(_, v)| v)
        .sum();
    eprintln!(
        "agent: {} records received, {} dropped, {} frames unsymbolized",
        summary.agent.get("records_received").copied().unwrap_or(0),
        dropped,
        summary
            .agent
            .get("frames_unsymbolized")
            .copied()
            .unwrap_or(0),
    );
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("PROFILER_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn listen_addresses() {
        for (input, expected) in [
            ("10.1.2.3:8081", "10.1.2.3:8081"),
            ("[fd00::5]:8081", "[fd00::5]:8081"),
            ("fd00::5:8081", "[fd00::5]:8081"),
        ] {
            assert_eq!(
                super::parse_listen_addr(input).unwrap().to_string(),
                expected
            );
        }
        for bad in ["10.1.2.3", "host:80", "10.1.2.3:99999", ""] {
            assert!(super::parse_listen_addr(bad).is_err(), "{bad}");
        }
    }
}
