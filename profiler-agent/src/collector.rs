//! The collector owns the process table, the current aggregate and the symbolizer. It runs on
//! its own thread (it does blocking `/proc` and ELF reads), fed through one bounded channel by
//! the ring-buffer reader and by whoever asks it for output.

use std::{sync::Arc, thread::JoinHandle};

use tokio::sync::{mpsc, oneshot};

use crate::{
    clock::MonotonicToUnix,
    ebpf::decode::{RawSample, Record},
    metrics::Metrics,
    process::{ObjectStore, ProcessTable},
    profile::Aggregate,
    symbolize::Symbolizer,
};

/// Messages the collector handles, in order.
pub enum Message {
    Record(Record),
    /// Symbolize what has been aggregated so far and return it, keeping the aggregate.
    Snapshot(oneshot::Sender<Vec<SymbolizedSample>>),
    /// Hand the current aggregate to `f` together with the symbolizer, then start a new one.
    Flush(Box<dyn FnOnce(Flushed<'_>) + Send>),
}

impl From<Record> for Message {
    fn from(r: Record) -> Self {
        Message::Record(r)
    }
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
    pub count: u64,
}

pub struct Collector {
    processes: ProcessTable,
    aggregate: Aggregate,
    symbolizer: Symbolizer,
    clock: MonotonicToUnix,
    window_start: u64,
    metrics: Metrics,
}

impl Collector {
    pub fn new(metrics: Metrics) -> Self {
        let clock = MonotonicToUnix::now();
        Self {
            processes: ProcessTable::new(metrics.clone()),
            aggregate: Aggregate::default(),
            symbolizer: Symbolizer::new(metrics.clone()),
            window_start: clock.unix_now(),
            clock,
            metrics,
        }
    }

    /// Runs a collector on a new thread until every sender is dropped. (The symbolizer is not
    /// `Send`: the collector is created on its thread and never leaves it.)
    pub fn spawn(metrics: Metrics, mut inbox: mpsc::Receiver<Message>) -> JoinHandle<()> {
        std::thread::Builder::new()
            .name("collector".into())
            .spawn(move || {
                let mut this = Collector::new(metrics);
                let mut handled = 0u64;
                while let Some(message) = inbox.blocking_recv() {
                    this.handle(message);
                    handled += 1;
                    if handled.is_multiple_of(4096) {
                        this.processes.collect_garbage();
                    }
                }
            })
            .expect("spawn the collector thread")
    }

    pub fn handle(&mut self, message: Message) {
        match message {
            Message::Record(Record::Sample(sample)) => self.add_sample(sample),
            Message::Record(Record::Exec { tgid, .. }) => self.processes.on_exec(tgid),
            Message::Record(Record::Exit { tgid, .. }) => self.processes.on_exit(tgid),
            Message::Snapshot(reply) => {
                let _ = reply.send(self.snapshot());
            }
            Message::Flush(f) => {
                let now = self.clock.unix_now();
                let window = (self.window_start, now);
                self.window_start = now;
                let aggregate = std::mem::take(&mut self.aggregate);
                f(Flushed {
                    aggregate,
                    symbolizer: &mut self.symbolizer,
                    objects: self.processes.objects(),
                    window,
                });
            }
        }
    }

    fn add_sample(&mut self, sample: RawSample) {
        let frames = self.processes.normalize(
            sample.tgid,
            &sample.thread_name,
            &sample.user_stack,
            &sample.kernel_stack,
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
        self.aggregate
            .set_thread_name(sample.tid, &sample.thread_name);
        let unix_ns = self.clock.to_unix(sample.ktime_ns);
        self.aggregate.add(sample.tgid, sample.tid, frames, unix_ns);
        self.metrics.inc("samples_aggregated");
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
                count: value.count,
            })
            .collect()
    }
}
