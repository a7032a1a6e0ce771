//! The collector owns the process table, the interval aggregate, the per-trace table, the
//! symbolizer and the sinks. It runs on its own thread (it does blocking `/proc` and ELF reads,
//! and blazesym's symbolizer is not `Send`), fed through one bounded channel by the ring-buffer
//! reader (which also sends the 1 s housekeeping tick), and whoever asks it for output.

use std::{collections::HashSet, sync::Arc, thread::JoinHandle};

use tokio::sync::{mpsc, oneshot};

use crate::{
    clock::MonotonicToUnix,
    context::{
        DecodeOutcome, IdLabels, TraceContext, decode_custom_labels, decode_obi,
        decode_thread_context, sources::ContextSources,
    },
    ebpf::{
        ContextSourceMap,
        decode::{RawSample, Record},
    },
    k8s::{PodMetadataHandle, ProcessPod},
    metrics::{CounterBatch, Metrics},
    process::{MapsOnce, ObjectStore, ProcessTable},
    profile::{
        Aggregate, PodDetails, ProcessDetails,
        traces::{TraceProfile, TraceTable, TraceTableConfig, TracedSample},
    },
    symbolize::Symbolizer,
};
use profiler_common::ContextKind;

/// Messages the collector handles, in order.
pub enum Message {
    /// One ring-buffer drain's records, in ring order (one wake-up per drain, not per record).
    Records(Vec<Record>),
    /// Periodic: flush idle traces, housekeeping.
    Tick,
    /// Symbolize what has been aggregated so far and return it, keeping the aggregate.
    Snapshot(oneshot::Sender<Vec<SymbolizedSample>>),
    /// Hand the interval's aggregate to every sink, then start a new interval.
    FlushInterval,
    /// Hand the current aggregate to `f` together with the symbolizer, then start a new one.
    Flush(Box<dyn FnOnce(Flushed<'_>) + Send>),
    /// Flush every live trace to the sinks (shutdown).
    FlushTraces,
}

impl From<Vec<Record>> for Message {
    fn from(records: Vec<Record>) -> Self {
        Message::Records(records)
    }
}

/// What an output needs besides the data: the symbolizer and the objects frames point to.
pub struct SinkContext<'a> {
    pub symbolizer: &'a mut Symbolizer,
    pub objects: &'a ObjectStore,
    pub frequency_hz: u64,
}

/// An output of the collector. Runs on the collector thread: it must not block for long
/// (network sinks hand encoded bytes to their own task through a bounded queue).
pub trait Sink: Send {
    /// The whole profile of a trace so far; replaces any version handed out before.
    fn trace(&mut self, trace: &TraceProfile, cx: &mut SinkContext<'_>);
    /// Every sample of an interval, traced or not.
    fn interval(&mut self, _aggregate: &Aggregate, _window: (u64, u64), _cx: &mut SinkContext<'_>) {
    }
    /// Once a second, after idle traces went out: a sink that batches hands over what has
    /// waited long enough.
    fn tick(&mut self) {}
}

/// What a flush callback gets to work with.
pub struct Flushed<'a> {
    pub aggregate: Aggregate,
    pub symbolizer: &'a mut Symbolizer,
    pub objects: &'a ObjectStore,
    pub window: (u64, u64),
}

/// A sample with its frames' function names, leaf first (inlined functions expanded,
/// innermost first). Used by tests and summaries.
#[derive(Debug, Clone)]
pub struct SymbolizedSample {
    pub pid: u32,
    pub tid: u32,
    pub thread_name: String,
    pub functions: Vec<Arc<str>>,
    /// The function containing the sampled instruction (the leaf frame without its inlined
    /// calls): what "the sample's leaf" means to a person reading a profile.
    pub leaf: Arc<str>,
    pub count: u64,
    pub context: Option<TraceContext>,
}

/// A process started a new program or exited: for components that follow processes (the
/// workload filter keeps its pid allow-list current with these).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessNote {
    Exec(u32),
    Exit(u32),
}

#[derive(Clone, Copy)]
enum FlushTraces {
    Idle,
    All,
}

#[derive(Clone)]
pub struct CollectorConfig {
    pub frequency_hz: u64,
    pub traces: TraceTableConfig,
    pub id_labels: IdLabels,
    /// Where to tell about process exec and exit (bounded; a full queue drops and counts
    /// `process_notes_dropped`).
    pub process_notes: Option<mpsc::Sender<ProcessNote>>,
    /// This node's pods (Kubernetes), for the pod of each sampled process.
    pub pods: Option<PodMetadataHandle>,
}

pub struct Collector {
    config: CollectorConfig,
    processes: ProcessTable,
    aggregate: Aggregate,
    traces: TraceTable,
    symbolizer: Symbolizer,
    sinks: Vec<Box<dyn Sink>>,
    sources: Option<ContextSources>,
    /// Processes whose samples named attribute keys their cached key map lacks.
    stale_key_maps: HashSet<u32>,
    ends: ProcessEnds,
    clock: MonotonicToUnix,
    window_start: u64,
    metrics: Metrics,
    /// Per-sample counts, added to `metrics` once per message.
    counts: CounterBatch,
}

impl Collector {
    fn new(
        config: CollectorConfig,
        sinks: Vec<Box<dyn Sink>>,
        context_sources: Option<ContextSourceMap>,
        metrics: Metrics,
    ) -> Self {
        let clock = MonotonicToUnix::now();
        Self {
            traces: TraceTable::new(config.traces.clone()),
            config,
            processes: ProcessTable::new(metrics.clone()),
            aggregate: Aggregate::default(),
            symbolizer: Symbolizer::new(metrics.clone()),
            sinks,
            sources: context_sources.map(|map| ContextSources::new(map, metrics.clone())),
            stale_key_maps: HashSet::new(),
            ends: ProcessEnds::default(),
            window_start: clock.unix_now(),
            clock,
            metrics,
            counts: CounterBatch::default(),
        }
    }

    /// Runs a collector on a new thread until every sender is dropped. (The symbolizer is not
    /// `Send`: the collector is created on its thread and never leaves it.)
    pub fn spawn(
        config: CollectorConfig,
        sinks: Vec<Box<dyn Sink>>,
        context_sources: Option<ContextSourceMap>,
        metrics: Metrics,
        mut inbox: mpsc::Receiver<Message>,
    ) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name("collector".into())
            .spawn(move || {
                let mut this = Collector::new(config, sinks, context_sources, metrics);
                this.symbolizer.preload_kernel_symbols();
                while let Some(message) = inbox.blocking_recv() {
                    this.handle(message);
                }
            })
    }

    fn handle(&mut self, message: Message) {
        match message {
            Message::Records(records) => {
                for record in records {
                    self.handle_record(record);
                }
                self.metrics.add_batch(&mut self.counts);
            }
            Message::Tick => {
                self.flush_traces(FlushTraces::Idle);
                for sink in &mut self.sinks {
                    sink.tick();
                }
                self.processes.collect_garbage();
                self.ends.forget_old();
                self.symbolizer
                    .retire_jit_objects(self.processes.take_retired_jit_objects());
                self.processes
                    .recycle_jit_objects(self.symbolizer.forget_retired_jit_objects());
                if let Some(sources) = &mut self.sources {
                    for pid in self.stale_key_maps.drain() {
                        sources.refresh_process_context(pid);
                    }
                    sources.tick();
                }
            }
            Message::Snapshot(reply) => {
                let _ = reply.send(self.snapshot());
            }
            Message::FlushInterval => {
                let (aggregate, window) = self.take_interval();
                let mut cx = SinkContext {
                    symbolizer: &mut self.symbolizer,
                    objects: self.processes.objects(),
                    frequency_hz: self.config.frequency_hz,
                };
                for sink in &mut self.sinks {
                    sink.interval(&aggregate, window, &mut cx);
                }
            }
            Message::Flush(f) => {
                let (aggregate, window) = self.take_interval();
                f(Flushed {
                    aggregate,
                    symbolizer: &mut self.symbolizer,
                    objects: self.processes.objects(),
                    window,
                });
            }
            Message::FlushTraces => self.flush_traces(FlushTraces::All),
        }
    }

    fn handle_record(&mut self, record: Record) {
        match record {
            Record::Sample(sample) => match self.ends.sample_from(sample.tgid, sample.ktime_ns) {
                SampleTime::Current => self.add_sample(sample, true),
                SampleTime::BeforeExit => self.add_sample(sample, false),
                SampleTime::BeforeExec => self.counts.inc("records_dropped_replaced_image"),
            },
            Record::Exec { tgid, ktime_ns, .. } => {
                self.ends.ended(tgid, ktime_ns, End::Exec);
                self.notify(ProcessNote::Exec(tgid));
                self.processes.on_exec(tgid);
                if let Some(sources) = &mut self.sources {
                    sources.on_exec(tgid);
                }
            }
            Record::Exit { tgid, ktime_ns } => {
                self.ends.ended(tgid, ktime_ns, End::Exit);
                self.notify(ProcessNote::Exit(tgid));
                self.processes.on_exit(tgid);
                if let Some(sources) = &mut self.sources {
                    sources.on_exit(tgid);
                }
            }
            Record::MmapExec { tgid } => {
                self.processes.on_new_code(tgid);
                if let Some(sources) = &mut self.sources {
                    sources.on_new_code(tgid);
                }
            }
        }
    }

    fn notify(&self, note: ProcessNote) {
        if let Some(tx) = &self.config.process_notes
            && tx.try_send(note).is_err()
        {
            self.metrics.inc("process_notes_dropped");
        }
    }

    fn take_interval(&mut self) -> (Aggregate, (u64, u64)) {
        let now = self.clock.unix_now();
        let window = (self.window_start, now);
        self.window_start = now;
        (std::mem::take(&mut self.aggregate), window)
    }

    /// Hands idle (or all) traces to every sink.
    fn flush_traces(&mut self, which: FlushTraces) {
        let now = self.clock.unix_now();
        let Self {
            traces,
            sinks,
            symbolizer,
            processes,
            config,
            ..
        } = self;
        let mut cx = SinkContext {
            symbolizer,
            objects: processes.objects(),
            frequency_hz: config.frequency_hz,
        };
        let emit = |trace: &TraceProfile| {
            for sink in sinks.iter_mut() {
                sink.trace(trace, &mut cx);
            }
        };
        match which {
            FlushTraces::Idle => traces.flush_idle(now, emit),
            FlushTraces::All => traces.flush_all(emit),
        }
        self.report_trace_stats();
    }

    /// Mirrors the trace table's own counts into the metrics.
    fn report_trace_stats(&mut self) {
        let stats = &self.traces.stats;
        for (name, value) in [
            ("trace_samples_unsampled", stats.unsampled_samples),
            ("traces_flushed_early_table_full", stats.flushed_early_full),
            ("traces_retained_evicted", stats.retained_evicted),
            ("traces_late_merges", stats.late_merges),
        ] {
            let seen = self.metrics.get(name);
            self.metrics.add(name, value.saturating_sub(seen));
        }
    }

    /// `live`: the process has not exited yet as far as the records say (a sample staged on
    /// another CPU can come after its process's exit): only then is it inspected for a
    /// context source.
    fn add_sample(&mut self, sample: RawSample, live: bool) {
        let mut maps = MapsOnce::default();
        if live && let Some(sources) = &mut self.sources {
            sources.on_sample(sample.tgid, &mut maps);
        }
        let frames = self.processes.normalize(
            sample.tgid,
            &sample.thread_name,
            &sample.user_stack,
            &sample.kernel_stack,
            sample.user_stack_top,
            &mut maps,
        );
        if !self.aggregate.process_names.contains_key(&sample.tgid) {
            let name = self
                .processes
                .info(sample.tgid)
                .map(|i| i.name)
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| sample.thread_name.clone());
            self.aggregate.process_names.insert(sample.tgid, name);
        }
        let details = match self.aggregate.process_details.get(&sample.tgid) {
            Some(details) => details.clone(),
            None => {
                let details = Arc::new(self.process_details(sample.tgid, &sample.thread_name));
                self.aggregate
                    .process_details
                    .insert(sample.tgid, details.clone());
                details
            }
        };
        self.aggregate
            .set_thread_name(sample.tid, &sample.thread_name);
        let unix_ns = self.clock.to_unix(sample.ktime_ns);
        let context = self.decode_context(&sample);
        let stack = self
            .aggregate
            .add(sample.tgid, sample.tid, frames, context.as_ref(), unix_ns);
        self.counts.inc("samples_aggregated");
        if let Some(context) = &context {
            let process_name = self
                .aggregate
                .process_names
                .get(&sample.tgid)
                .map(String::as_str)
                .unwrap_or("");
            let kept = self.traces.add(TracedSample {
                context,
                pid: sample.tgid,
                tid: sample.tid,
                thread_name: &sample.thread_name,
                process_name,
                details: &details,
                stack: self.aggregate.stacks.shared(stack),
                unix_ns,
            });
            if kept {
                self.counts.inc("samples_traced");
            }
        }
    }

    /// What the process table, the process context and the pod metadata say about `pid`, once
    /// per interval (so a pod that was not known yet is found at the next one).
    fn process_details(&self, pid: u32, thread_name: &str) -> ProcessDetails {
        let info = self.processes.info(pid).unwrap_or_default();
        let meta = self.sources.as_ref().and_then(|s| s.meta(pid));
        let exe_name = Some(info.name)
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| thread_name.to_owned());
        let pod = self
            .config
            .pods
            .as_ref()
            .filter(|_| !info.cgroup.is_empty())
            .and_then(|pods| pods.lookup(&info.cgroup));
        if pod.is_none() && info.cgroup.pod_uid.is_some() {
            self.metrics.inc("pod_metadata_missing");
        }
        ProcessDetails {
            exe_name,
            exe_path: info.exe_path,
            context_service_name: meta.and_then(|m| m.service_name.clone()),
            env_service_name: info.env_service_name,
            container_id: info.cgroup.container_id,
            container_pid: info.container_pid,
            pod: pod.map(pod_details),
            resource_attributes: meta
                .map(|m| m.resource_attributes.clone())
                .unwrap_or_default(),
        }
    }

    fn decode_context(&mut self, sample: &RawSample) -> Option<TraceContext> {
        let (source, outcome) = match sample.context_kind {
            ContextKind::None => return None,
            ContextKind::ThreadContext => {
                let keys = self.sources.as_ref().and_then(|s| s.meta(sample.tgid));
                let keys = keys.map(|m| m.attribute_keys.clone());
                (
                    0,
                    decode_thread_context(&sample.context, keys.as_deref().unwrap_or(&[])),
                )
            }
            // Go labels use the custom-labels payload layout.
            ContextKind::CustomLabels => (
                1,
                decode_custom_labels(&sample.context, &self.config.id_labels),
            ),
            ContextKind::GoLabels => (
                3,
                decode_custom_labels(&sample.context, &self.config.id_labels),
            ),
            ContextKind::Obi => (2, decode_obi(&sample.context)),
        };
        // Per-source outcomes, for /metrics: which reader works on this host, which does not.
        const OUTCOMES: [[&str; 3]; 4] = [
            [
                "context_decoded_thread_context",
                "context_empty_thread_context",
                "context_invalid_thread_context",
            ],
            [
                "context_decoded_custom_labels",
                "context_empty_custom_labels",
                "context_invalid_custom_labels",
            ],
            [
                "context_decoded_obi",
                "context_empty_obi",
                "context_invalid_obi",
            ],
            [
                "context_decoded_go_labels",
                "context_empty_go_labels",
                "context_invalid_go_labels",
            ],
        ];
        match outcome {
            DecodeOutcome::Context {
                context,
                dropped_attributes,
                unknown_keys,
            } => {
                self.counts.inc(OUTCOMES[source][0]);
                self.counts
                    .add("context_attributes_dropped", u64::from(dropped_attributes));
                self.counts
                    .add("context_attributes_unknown_key", u64::from(unknown_keys));
                if unknown_keys > 0 {
                    self.stale_key_maps.insert(sample.tgid);
                }
                Some(context)
            }
            DecodeOutcome::Empty => {
                self.counts.inc(OUTCOMES[source][1]);
                None
            }
            DecodeOutcome::Invalid(reason) => {
                self.counts.inc(OUTCOMES[source][2]);
                self.counts.inc(reason);
                None
            }
        }
    }

    fn snapshot(&mut self) -> Vec<SymbolizedSample> {
        let objects = self.processes.objects();
        self.symbolizer
            .resolve(self.aggregate.frames().collect::<Vec<_>>(), objects);
        self.aggregate
            .sorted_samples()
            .into_iter()
            .map(|(key, value)| SymbolizedSample {
                pid: key.pid,
                tid: key.tid,
                thread_name: self
                    .aggregate
                    .thread_names
                    .get(&key.tid)
                    .cloned()
                    .unwrap_or_default(),
                functions: self
                    .aggregate
                    .stacks
                    .get(key.stack)
                    .iter()
                    .flat_map(|f| {
                        self.symbolizer
                            .get(*f, objects)
                            .lines
                            .iter()
                            .map(|l| l.function.clone())
                            .collect::<Vec<_>>()
                    })
                    .collect(),
                leaf: self
                    .aggregate
                    .stacks
                    .get(key.stack)
                    .first()
                    .and_then(|f| {
                        self.symbolizer
                            .get(*f, objects)
                            .lines
                            .last()
                            .map(|l| l.function.clone())
                    })
                    .unwrap_or_else(|| Arc::from("")),
                count: value.count,
                context: key.context.map(|c| self.aggregate.context(c).clone()),
            })
            .collect()
    }
}

/// When each recently ended process image ended (exec or exit), by the kernel's clock. The
/// kernel stages samples per CPU and writes a process's exec and exit events after that CPU's
/// staged samples only: one of its samples staged on another CPU can come after the event.
/// Such a sample belongs to the image before the event.
#[derive(Default)]
struct ProcessEnds {
    /// Looked up for every sample: foldhash, as the collector's other per-sample maps.
    by_pid: foldhash::HashMap<u32, Ends>,
    /// The latest event time seen: entries far older than it are forgotten.
    latest_ns: u64,
}

/// The last exec and the last exit of a pid (0: none seen).
#[derive(Clone, Copy, Debug, Default)]
struct Ends {
    exec_ns: u64,
    exit_ns: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    Exec,
    Exit,
}

#[derive(Debug, PartialEq, Eq)]
enum SampleTime {
    /// Taken in the process's current image.
    Current,
    /// Taken before the image was replaced by an exec: what the agent knows of the process now
    /// (its mappings) is the new image's, which would misname every frame.
    BeforeExec,
    /// Taken before the process exited (its mappings are kept for a grace period).
    BeforeExit,
}

/// Far longer than any sample stays staged (at most 8 ticks, and the agent samples at 1 Hz
/// or more).
const PROCESS_END_MEMORY_NS: u64 = 30_000_000_000;

impl ProcessEnds {
    fn ended(&mut self, pid: u32, ktime_ns: u64, end: End) {
        self.latest_ns = self.latest_ns.max(ktime_ns);
        let ends = self.by_pid.entry(pid).or_default();
        match end {
            End::Exec => ends.exec_ns = ktime_ns,
            End::Exit => ends.exit_ns = ktime_ns,
        }
    }

    fn sample_from(&self, pid: u32, ktime_ns: u64) -> SampleTime {
        match self.by_pid.get(&pid) {
            Some(ends) if ktime_ns < ends.exec_ns => SampleTime::BeforeExec,
            Some(ends) if ktime_ns < ends.exit_ns => SampleTime::BeforeExit,
            _ => SampleTime::Current,
        }
    }

    fn forget_old(&mut self) {
        let horizon = self.latest_ns.saturating_sub(PROCESS_END_MEMORY_NS);
        self.by_pid
            .retain(|_, ends| ends.exec_ns.max(ends.exit_ns) >= horizon);
    }
}

fn pod_details(found: ProcessPod) -> PodDetails {
    PodDetails {
        namespace: found.pod.namespace.clone(),
        name: found.pod.name.clone(),
        container: found.container.as_ref().map(|c| c.name.clone()),
        app_name: found.pod.app_name().map(str::to_owned),
        attributes: found.pod.resource_attributes(found.container.as_ref()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_is_placed_against_its_processs_exec_and_exit() {
        let mut ends = ProcessEnds::default();
        assert_eq!(ends.sample_from(7, 100), SampleTime::Current);
        ends.ended(7, 1_000, End::Exec);
        assert_eq!(ends.sample_from(7, 999), SampleTime::BeforeExec);
        assert_eq!(ends.sample_from(7, 1_000), SampleTime::Current);
        assert_eq!(ends.sample_from(8, 999), SampleTime::Current);
        // An exit after the exec: a late sample of the old image is still the old image's.
        ends.ended(7, 2_000, End::Exit);
        assert_eq!(ends.sample_from(7, 500), SampleTime::BeforeExec);
        assert_eq!(ends.sample_from(7, 1_500), SampleTime::BeforeExit);
        // The pid taken by a new process, which execs: its samples after that are current.
        ends.ended(7, 3_000, End::Exec);
        assert_eq!(ends.sample_from(7, 3_001), SampleTime::Current);
        assert_eq!(ends.sample_from(7, 2_500), SampleTime::BeforeExec);
    }

    #[test]
    fn old_ends_are_forgotten() {
        let mut ends = ProcessEnds::default();
        ends.ended(1, 1_000, End::Exit);
        ends.ended(2, PROCESS_END_MEMORY_NS + 500, End::Exec);
        ends.ended(3, PROCESS_END_MEMORY_NS + 2_000, End::Exit);
        ends.forget_old();
        assert_eq!(ends.sample_from(1, 10), SampleTime::Current);
        assert_eq!(ends.sample_from(2, 10), SampleTime::BeforeExec);
        assert_eq!(ends.sample_from(3, 10), SampleTime::BeforeExit);
    }
}
