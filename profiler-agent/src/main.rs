//! `profiler-agent`: command-line entry point. Parses flags (each with a `PROFILER_*`
//! environment twin), sets up logging, and runs the chosen command.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};
use profiler_agent::{
    context::IdLabels,
    ebpf::SamplerConfig,
    export::{
        Format,
        otlp::{self, Compression, OtlpArgs, OtlpConfig, Protocol, RetryPolicy},
    },
    k8s::{CgroupSelection, KubernetesOptions, WorkloadSelector},
    profile::traces::TraceTableConfig,
    query::{DEFAULT_STORE, QueryOptions, TracesOptions, View},
    record::{RecordOptions, record},
    run::{ApiOptions, RunOptions, StoreOptions, run},
    store::Retention,
};
use tracing_subscriber::EnvFilter;

/// jemalloc rather than glibc's malloc: the collector builds and frees many small objects per
/// trace (maps, strings, pprof messages), and glibc spent that churn in `malloc_consolidate`
/// and bin unlinking. Interleaved 30 s rounds at 99 Hz on the bench's fixture: the collector
/// thread ran 0.42–0.88 ms/s with glibc, 0.34–0.39 with jemalloc (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read once at its start (the `_RJEM_MALLOC_CONF` environment variable
/// still overrides them). Freed pages are given back to the kernel after 60 s unused instead of
/// 10 s: the collector's work comes in bursts every drain and every 10 s interval, and with
/// the default the pages freed after one burst were purged and faulted in again by the next.
/// Seven interleaved 40 s rounds at 99 Hz: lower agent CPU in six, by 0.26 µs per sample on
/// average (4.44 → 4.18); RssAnon unchanged (~41 MiB).
#[used]
#[unsafe(export_name = "_rjem_malloc_conf")]
static JEMALLOC_OPTIONS: Option<&'static std::ffi::c_char> =
    Some(unsafe { &*c"dirty_decay_ms:60000".as_ptr() });

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
    /// Run as a daemon until SIGINT/SIGTERM: per-trace profiles into the store, query API.
    Run(Box<RunArgs>),
    /// Show a stored trace's profile (or a service's time window): top, pprof, folded, svg.
    Query(QueryArgs),
    /// List recent traces in the store with their samples and durations.
    Traces(TracesArgs),
    /// Store benchmark (used by `cargo xtask bench`): query latency among N stored traces.
    #[command(hide = true)]
    BenchStore(BenchStoreArgs),
    /// Symbolization benchmark (used by `cargo xtask bench`): addresses per second, cold and
    /// warm.
    #[command(hide = true)]
    BenchSymbolize(BenchSymbolizeArgs),
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
    /// Measure the sampler's own kernel time: turns the kernel's eBPF run-time statistics on
    /// while the agent runs (machine-wide: two clock reads per run of every eBPF program; needs
    /// CAP_SYS_ADMIN). Reported in /metrics (`profiler_ebpf_program_run_seconds_total`) and at
    /// the end of `record`.
    #[arg(long, env = "PROFILER_BPF_STATS")]
    bpf_stats: bool,
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
            bpf_stats: self.bpf_stats,
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
    /// The embedded store (SQLite): per-trace profiles and per-process time buckets.
    #[arg(long, env = "PROFILER_STORE", default_value = DEFAULT_STORE)]
    store: PathBuf,
    /// Do not store profiles (and serve no store routes).
    #[arg(long, env = "PROFILER_NO_STORE")]
    no_store: bool,
    /// Delete stored traces and buckets older than this.
    #[arg(long, env = "PROFILER_RETENTION", default_value = "24h", value_parser = humantime::parse_duration)]
    retention: Duration,
    /// Cap on the bytes the store uses (e.g. 2GiB, 500MB); the oldest data goes first.
    #[arg(long, env = "PROFILER_STORE_MAX_BYTES", default_value = "1GiB", value_parser = parse_bytes)]
    store_max_bytes: u64,
    /// Address of the query API and HTML page.
    #[arg(long, env = "PROFILER_API_LISTEN", default_value = "127.0.0.1:8740")]
    api_listen: SocketAddr,
    /// Serve no API.
    #[arg(long, env = "PROFILER_NO_API")]
    no_api: bool,
    /// Require this bearer token on every API route but /healthz.
    #[arg(long, env = "PROFILER_API_TOKEN", hide_env_values = true)]
    api_token: Option<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    traces: TraceArgs,
    #[command(flatten)]
    otlp: OtlpFlags,
}

/// OTLP export. Unset flags fall back to the standard `OTEL_EXPORTER_OTLP_PROFILES_*` and
/// `OTEL_EXPORTER_OTLP_*` variables.
#[derive(Args)]
#[command(next_help_heading = "OTLP export")]
struct OtlpFlags {
    /// Export every interval to this OTLP receiver (http:// or https://). For HTTP, a URL without
    /// a path gets /v1development/profiles. Falls back to OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT,
    /// then OTEL_EXPORTER_OTLP_ENDPOINT (a base URL).
    #[arg(long = "otlp-endpoint", env = "PROFILER_OTLP_ENDPOINT")]
    endpoint: Option<String>,
    /// Transport [default: grpc, or OTEL_EXPORTER_OTLP_(PROFILES_)PROTOCOL].
    #[arg(long = "otlp-protocol", env = "PROFILER_OTLP_PROTOCOL")]
    protocol: Option<Protocol>,
    /// A header sent with every request, key=value (repeatable; e.g. an auth token). Added to
    /// OTEL_EXPORTER_OTLP_(PROFILES_)HEADERS, replacing the same key.
    #[arg(
        long = "otlp-header",
        env = "PROFILER_OTLP_HEADERS",
        value_delimiter = ','
    )]
    headers: Vec<String>,
    /// PEM file of a CA to trust for https:// endpoints, besides the system's roots.
    #[arg(long = "otlp-ca-cert", env = "PROFILER_OTLP_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// Per-request timeout [default: 10s, or OTEL_EXPORTER_OTLP_(PROFILES_)TIMEOUT in ms].
    #[arg(long = "otlp-timeout", env = "PROFILER_OTLP_TIMEOUT", value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
    /// Request compression [default: gzip, or OTEL_EXPORTER_OTLP_(PROFILES_)COMPRESSION].
    #[arg(long = "otlp-compression", env = "PROFILER_OTLP_COMPRESSION")]
    compression: Option<Compression>,
    /// Encoded requests held while the receiver is slow or down; past it the oldest are
    /// dropped (and counted).
    #[arg(long = "otlp-queue-bytes", env = "PROFILER_OTLP_QUEUE_BYTES", default_value_t = otlp::DEFAULT_QUEUE_BYTES)]
    queue_bytes: usize,
    /// Largest request; an interval that encodes larger is split, each part with its own
    /// dictionary.
    #[arg(long = "otlp-max-request-bytes", env = "PROFILER_OTLP_MAX_REQUEST_BYTES", default_value_t = otlp::DEFAULT_MAX_REQUEST_BYTES)]
    max_request_bytes: usize,
    /// At shutdown, how long to keep delivering what is queued.
    #[arg(long = "otlp-shutdown-timeout", env = "PROFILER_OTLP_SHUTDOWN_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    shutdown_timeout: Duration,
    /// First retry delay; doubled on each retry (with jitter) up to --otlp-retry-max-backoff.
    #[arg(long = "otlp-retry-initial-backoff", env = "PROFILER_OTLP_RETRY_INITIAL_BACKOFF", default_value = "1s", value_parser = humantime::parse_duration)]
    retry_initial_backoff: Duration,
    #[arg(long = "otlp-retry-max-backoff", env = "PROFILER_OTLP_RETRY_MAX_BACKOFF", default_value = "30s", value_parser = humantime::parse_duration)]
    retry_max_backoff: Duration,
    /// A request still failing this long after its first attempt is dropped.
    #[arg(long = "otlp-retry-max-elapsed", env = "PROFILER_OTLP_RETRY_MAX_ELAPSED", default_value = "5m", value_parser = humantime::parse_duration)]
    retry_max_elapsed: Duration,
}

impl OtlpFlags {
    /// The exporter's settings (flags, then the OTEL_* environment), or None when no endpoint
    /// is configured.
    fn config(&self) -> anyhow::Result<Option<OtlpConfig>> {
        let args = OtlpArgs {
            endpoint: self.endpoint.clone(),
            protocol: self.protocol,
            headers: self.headers.clone(),
            ca_cert: self.ca_cert.clone(),
            timeout: self.timeout,
            compression: self.compression,
            queue_bytes: self.queue_bytes,
            max_request_bytes: self.max_request_bytes,
            shutdown_timeout: self.shutdown_timeout,
            retry: RetryPolicy {
                initial_backoff: self.retry_initial_backoff,
                max_backoff: self.retry_max_backoff,
                max_elapsed: self.retry_max_elapsed,
            },
        };
        OtlpConfig::resolve(&args, &|name| std::env::var(name).ok())
    }
}

#[derive(Args)]
struct StoreArg {
    /// The store the agent writes (read-only here; works while the agent runs).
    #[arg(long, env = "PROFILER_STORE", default_value = DEFAULT_STORE)]
    store: PathBuf,
}

#[derive(Args)]
struct QueryArgs {
    /// The trace (32 hex digits). Without it: a time window (--service/--pid, --from/--since).
    #[arg(long, short = 't')]
    trace_id: Option<String>,
    /// Time window: this service's samples (its service.name, or its process name).
    #[arg(long, conflicts_with = "trace_id")]
    service: Option<String>,
    /// Time window: this process's samples.
    #[arg(long, conflicts_with = "trace_id")]
    pid: Option<u32>,
    /// Time window: samples of processes in this Kubernetes namespace.
    #[arg(long, conflicts_with = "trace_id")]
    namespace: Option<String>,
    /// Time window: samples of processes in this pod (its name; with --namespace when names
    /// repeat across namespaces).
    #[arg(long, conflicts_with = "trace_id")]
    pod: Option<String>,
    /// Time window start: RFC 3339 (2026-05-01T14:05:00Z), HH:MM[:SS] (UTC) or Unix seconds.
    #[arg(long, conflicts_with_all = ["trace_id", "since"])]
    from: Option<String>,
    /// Time window end [default: --from + --duration].
    #[arg(long, requires = "from")]
    to: Option<String>,
    /// Time window length after --from [default: 1m].
    #[arg(long, requires = "from", conflicts_with = "to", value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Time window: the last so long [default: 10m].
    #[arg(long, conflicts_with = "trace_id", value_parser = humantime::parse_duration)]
    since: Option<Duration>,
    /// Output format.
    #[arg(long, short = 'f', value_enum, default_value = "top")]
    format: View,
    /// Write here instead of standard output.
    #[arg(long, short = 'o')]
    output: Option<PathBuf>,
    /// Rows of the top table.
    #[arg(long, default_value_t = 20)]
    top: usize,
    #[command(flatten)]
    store: StoreArg,
}

#[derive(Args)]
struct TracesArgs {
    /// Only traces that ran in this service (its service.name, or its process name).
    #[arg(long)]
    service: Option<String>,
    /// Only traces that ran in this process.
    #[arg(long)]
    pid: Option<u32>,
    /// Only traces that ran in this Kubernetes namespace.
    #[arg(long)]
    namespace: Option<String>,
    /// Only traces that ran in this pod (its name).
    #[arg(long)]
    pod: Option<String>,
    /// Only the trace with this span (16 hex digits).
    #[arg(long)]
    span_id: Option<String>,
    /// Only traces with samples in the last so long (e.g. 10m, 2h).
    #[arg(long, value_parser = humantime::parse_duration)]
    since: Option<Duration>,
    /// At most this many, most recent first.
    #[arg(long, short = 'n', default_value_t = 20)]
    limit: usize,
    /// JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    store: StoreArg,
}

#[derive(Args)]
struct BenchStoreArgs {
    /// Where to create the benchmark's store (removed first).
    #[arg(long)]
    path: PathBuf,
    /// Traces to store.
    #[arg(long, default_value_t = 10_000)]
    traces: u32,
    /// Queries to time.
    #[arg(long, default_value_t = 500)]
    queries: u32,
}

#[derive(Args)]
struct BenchSymbolizeArgs {
    /// Addresses to resolve, spread over the functions of the executable and of libc.
    #[arg(long, default_value_t = 20_000)]
    addresses: usize,
    /// The executable to take addresses from, besides the libc the agent runs with [default:
    /// the agent's own executable].
    #[arg(long)]
    exe: Option<PathBuf>,
    /// Rounds, each with a fresh symbolizer; the report gives the medians.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
}

/// A byte size: a number with an optional unit (B, KB, MB, GB: powers of 1000; KiB, MiB, GiB:
/// powers of 1024).
fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size (e.g. 512MiB, 2GB, 1000000)"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size unit {other:?} (B, KB, MB, GB, KiB, MiB, GiB)"
            ));
        }
    };
    Ok((number * scale as f64) as u64)
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

/// Longer than any `--interval` a deployment uses, shorter than forever: an idle blocking
/// thread costs a stack.
const BLOCKING_THREAD_KEEP_ALIVE: Duration = Duration::from_secs(120);

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        // The OTLP gzip runs on a blocking thread once per interval (10 s by default): with
        // tokio's default 10 s keep-alive that thread exited and was re-created every interval.
        .thread_keep_alive(BLOCKING_THREAD_KEEP_ALIVE)
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
                let otlp = args.otlp.config()?;
                let store = (!args.no_store).then(|| StoreOptions {
                    path: args.store.clone(),
                    retention: Retention {
                        max_age: args.retention,
                        max_bytes: args.store_max_bytes,
                    },
                });
                let api = (!args.no_api).then(|| ApiOptions {
                    listen: args.api_listen,
                    token: args.api_token.clone().filter(|t| !t.is_empty()),
                });
                run(RunOptions {
                    sampler: args.sampling.config(&args.traces)?,
                    interval: args.interval,
                    output_dir: args.output_dir,
                    per_trace_dir: args.per_trace_dir,
                    store,
                    api,
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
                    otlp,
                })
                .await
            }
            Command::Query(args) => profiler_agent::query::query(&QueryOptions {
                store: args.store.store,
                trace_id: args.trace_id,
                service: args.service,
                pid: args.pid,
                namespace: args.namespace,
                pod: args.pod,
                duration: args.duration,
                from: args.from,
                to: args.to,
                since: args.since,
                view: args.format,
                output: args.output,
                top_rows: args.top,
            }),
            Command::Traces(args) => profiler_agent::query::traces(&TracesOptions {
                store: args.store.store,
                service: args.service,
                pid: args.pid,
                namespace: args.namespace,
                pod: args.pod,
                span_id: args.span_id,
                since: args.since,
                limit: args.limit,
                json: args.json,
            }),
            Command::BenchStore(args) => {
                let report = profiler_agent::store::bench(&args.path, args.traces, args.queries)?;
                println!("{}", serde_json::to_string(&report)?);
                Ok(())
            }
            Command::BenchSymbolize(args) => {
                use profiler_agent::symbolize::bench;
                let binaries = bench::default_binaries(args.exe)?;
                let report = bench::bench(&binaries, args.addresses, args.rounds)?;
                println!("{}", serde_json::to_string(&report)?);
                Ok(())
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
    if let Some(per_run) = k.sampler_time_per_run() {
        eprintln!(
            "kernel time: {:.2} µs per sampler run (bpf_stats)",
            per_run.as_nanos() as f64 / 1000.0
        );
    }
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
    let attempts = k.get(Counter::ContextReadAttempts);
    let timed = k.get(Counter::ContextReadsTimed);
    if let Some(ns_per_attempt) = k.get(Counter::ContextReadNs).checked_div(timed) {
        // The kernel times one read in CONTEXT_READ_TIMING_EVERY of a process's own context
        // source (OBI lookups aside).
        eprintln!(
            "context: {attempts} read attempts, {} read, {} none active, {} invalid, {} faults, {} ns per attempt, {} samples traced",
            k.get(Counter::ContextRead),
            k.get(Counter::ContextNoneActive),
            k.get(Counter::ContextInvalid),
            k.get(Counter::ContextReadFault),
            ns_per_attempt,
            summary.agent.get("samples_traced").copied().unwrap_or(0),
        );
    }
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

    #[test]
    fn byte_sizes() {
        assert_eq!(super::parse_bytes("1000"), Ok(1000));
        assert_eq!(super::parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(super::parse_bytes("2 GB"), Ok(2_000_000_000));
        assert_eq!(super::parse_bytes("1.5KiB"), Ok(1536));
        assert!(super::parse_bytes("lots").is_err());
        assert!(super::parse_bytes("5 parsecs").is_err());
    }
}
