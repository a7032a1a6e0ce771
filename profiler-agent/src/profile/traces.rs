//! Per-trace aggregation: samples grouped by trace id, span and labels kept per sample.
//!
//! A trace is handed to the sinks once it has been idle for `idle_timeout` (or when the table is
//! full, or at shutdown). It is then retained for a while: samples that arrive later for the
//! same trace (a slow request can be idle for seconds and then burn CPU again) revive it, and
//! the next flush hands out the merged, complete profile. Sinks therefore always receive the
//! whole trace so far and replace what they had. Memory is bounded by `max_live` and
//! `max_retained`; evictions are counted.

use foldhash::{HashMap, HashMapExt};
use litemap::LiteMap;
use std::{collections::VecDeque, sync::Arc};

use super::{Frame, ProcessDetails, SampleValue};
use crate::context::TraceContext;

pub type Labels = Arc<[(Arc<str>, Arc<str>)]>;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TraceSampleKey {
    pub pid: u32,
    pub tid: u32,
    pub stack: Arc<[Frame]>,
    pub span_id: [u8; 8],
    pub labels: Labels,
}

#[derive(Clone, Debug)]
pub struct TraceProfile {
    pub trace_id: [u8; 16],
    pub samples: HashMap<TraceSampleKey, SampleValue>,
    pub total_samples: u64,
    pub first_unix_ns: u64,
    pub last_unix_ns: u64,
    /// Each sampled thread's name, as last seen. A sorted vector rather than a hash map: a
    /// trace has a few threads, and a trace is created (and later dropped) per request.
    pub thread_names: LiteMap<u32, String>,
    /// Each sampled process, by pid, as the agent knew it at the trace's first sample in it.
    pub processes: LiteMap<u32, TracedProcess>,
    /// How many times this trace was handed to sinks before (0: first time).
    pub previous_flushes: u32,
    /// Time of the sample that created this in-memory profile; never changes. With the trace
    /// id it names this incarnation: a trace re-created after its retained copy expired (or
    /// after an agent restart) is a new incarnation whose samples a persistent sink must add to
    /// what it stored, whereas a re-flush of the same incarnation replaces it.
    pub created_unix_ns: u64,
}

impl TraceProfile {
    fn new(trace_id: [u8; 16], unix_ns: u64) -> Self {
        Self {
            trace_id,
            samples: HashMap::new(),
            total_samples: 0,
            first_unix_ns: unix_ns,
            last_unix_ns: unix_ns,
            thread_names: LiteMap::new(),
            processes: LiteMap::new(),
            previous_flushes: 0,
            created_unix_ns: unix_ns,
        }
    }

    /// A sampled thread's name; empty when it was never recorded.
    pub fn thread_name(&self, tid: u32) -> &str {
        self.thread_names.get(&tid).map_or("", String::as_str)
    }

    /// Samples in a stable order.
    pub fn sorted_samples(&self) -> Vec<(&TraceSampleKey, &SampleValue)> {
        let mut v: Vec<_> = self.samples.iter().collect();
        v.sort_by(|(a, _), (b, _)| {
            (a.pid, a.tid, a.span_id, &a.stack[..], &a.labels[..]).cmp(&(
                b.pid,
                b.tid,
                b.span_id,
                &b.stack[..],
                &b.labels[..],
            ))
        });
        v
    }
}

/// A process a trace's samples came from.
#[derive(Clone, Debug)]
pub struct TracedProcess {
    pub name: String,
    pub details: Arc<ProcessDetails>,
}

impl TracedProcess {
    pub fn service_name(&self) -> &str {
        self.details.service_name()
    }
}

#[derive(Clone, Debug)]
pub struct TraceTableConfig {
    /// A trace with no sample for this long is handed to the sinks.
    pub idle_timeout_ns: u64,
    /// Live traces at most; past it the least recently active is flushed early.
    pub max_live: usize,
    /// Flushed traces kept for late samples.
    pub max_retained: usize,
    /// How long after its last sample a flushed trace can still take late samples.
    pub late_window_ns: u64,
    /// Keep traces whose sampled flag is clear.
    pub keep_unsampled: bool,
}

impl Default for TraceTableConfig {
    fn default() -> Self {
        Self {
            idle_timeout_ns: 5_000_000_000,
            max_live: 10_000,
            max_retained: 2_000,
            late_window_ns: 300_000_000_000,
            keep_unsampled: false,
        }
    }
}

/// Counts of what the table did that a user may want to know.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TraceTableStats {
    pub unsampled_samples: u64,
    pub flushed_early_full: u64,
    pub retained_evicted: u64,
    pub late_merges: u64,
}

/// The sample being added to a trace.
pub struct TracedSample<'a> {
    pub context: &'a TraceContext,
    pub pid: u32,
    pub tid: u32,
    pub thread_name: &'a str,
    pub process_name: &'a str,
    pub details: &'a Arc<ProcessDetails>,
    pub stack: Arc<[Frame]>,
    pub unix_ns: u64,
}

pub struct TraceTable {
    config: TraceTableConfig,
    live: HashMap<[u8; 16], TraceProfile>,
    retained: HashMap<[u8; 16], TraceProfile>,
    retained_order: VecDeque<[u8; 16]>,
    /// Traces that must be flushed at the next opportunity (table full).
    overflow: Vec<TraceProfile>,
    pub stats: TraceTableStats,
}

impl TraceTable {
    pub fn new(config: TraceTableConfig) -> Self {
        Self {
            config,
            live: HashMap::new(),
            retained: HashMap::new(),
            retained_order: VecDeque::new(),
            overflow: Vec::new(),
            stats: TraceTableStats::default(),
        }
    }

    pub fn live_traces(&self) -> usize {
        self.live.len()
    }

    /// Adds a traced sample. Returns false when the trace is not kept (sampled flag clear).
    pub fn add(&mut self, sample: TracedSample<'_>) -> bool {
        if !sample.context.sampled && !self.config.keep_unsampled {
            self.stats.unsampled_samples += 1;
            return false;
        }
        let trace_id = sample.context.trace_id;
        if !self.live.contains_key(&trace_id) {
            self.make_room();
            let profile = match self.retained.remove(&trace_id) {
                Some(p) => {
                    self.stats.late_merges += 1;
                    self.retained_order.retain(|id| *id != trace_id);
                    p
                }
                None => TraceProfile::new(trace_id, sample.unix_ns),
            };
            self.live.insert(trace_id, profile);
        }
        let profile = self.live.get_mut(&trace_id).expect("inserted above");
        let key = TraceSampleKey {
            pid: sample.pid,
            tid: sample.tid,
            stack: sample.stack,
            span_id: sample.context.span_id,
            labels: sample.context.labels.clone(),
        };
        let t = sample.unix_ns;
        profile
            .samples
            .entry(key)
            .and_modify(|v| v.record(t))
            .or_insert(SampleValue::first(t));
        profile.total_samples += 1;
        profile.first_unix_ns = profile.first_unix_ns.min(t);
        profile.last_unix_ns = profile.last_unix_ns.max(t);
        if profile.thread_name(sample.tid) != sample.thread_name {
            profile
                .thread_names
                .insert(sample.tid, sample.thread_name.to_owned());
        }
        if !profile.processes.contains_key(&sample.pid) {
            profile.processes.insert(
                sample.pid,
                TracedProcess {
                    name: sample.process_name.to_owned(),
                    details: sample.details.clone(),
                },
            );
        }
        true
    }

    /// Hands every trace idle since `now - idle_timeout` (and any flushed early) to `sink`.
    pub fn flush_idle(&mut self, now_unix_ns: u64, sink: impl FnMut(&TraceProfile)) {
        let cutoff = now_unix_ns.saturating_sub(self.config.idle_timeout_ns);
        let idle: Vec<[u8; 16]> = self
            .live
            .iter()
            .filter(|(_, p)| p.last_unix_ns <= cutoff)
            .map(|(id, _)| *id)
            .collect();
        let mut ready = std::mem::take(&mut self.overflow);
        ready.extend(idle.iter().filter_map(|id| self.live.remove(id)));
        self.emit(ready, sink);
        self.expire_retained(now_unix_ns);
    }

    /// Hands every live trace to `sink` (shutdown).
    pub fn flush_all(&mut self, sink: impl FnMut(&TraceProfile)) {
        let mut ready = std::mem::take(&mut self.overflow);
        ready.extend(self.live.drain().map(|(_, p)| p));
        self.emit(ready, sink);
    }

    fn emit(&mut self, mut ready: Vec<TraceProfile>, mut sink: impl FnMut(&TraceProfile)) {
        ready.sort_by_key(|p| p.first_unix_ns);
        for mut profile in ready {
            sink(&profile);
            profile.previous_flushes += 1;
            self.retain(profile);
        }
    }

    fn make_room(&mut self) {
        if self.live.len() < self.config.max_live {
            return;
        }
        let oldest = self
            .live
            .iter()
            .min_by_key(|(_, p)| p.last_unix_ns)
            .map(|(id, _)| *id);
        if let Some(profile) = oldest.and_then(|id| self.live.remove(&id)) {
            self.stats.flushed_early_full += 1;
            self.overflow.push(profile);
        }
    }

    fn retain(&mut self, profile: TraceProfile) {
        if self.config.max_retained == 0 {
            return;
        }
        while self.retained.len() >= self.config.max_retained {
            let Some(old) = self.retained_order.pop_front() else {
                break;
            };
            self.retained.remove(&old);
            self.stats.retained_evicted += 1;
        }
        self.retained_order.push_back(profile.trace_id);
        self.retained.insert(profile.trace_id, profile);
    }

    fn expire_retained(&mut self, now_unix_ns: u64) {
        let cutoff = now_unix_ns.saturating_sub(self.config.late_window_ns);
        while let Some(id) = self.retained_order.front() {
            if self
                .retained
                .get(id)
                .is_some_and(|p| p.last_unix_ns > cutoff)
            {
                break;
            }
            let id = *id;
            self.retained_order.pop_front();
            self.retained.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(trace: u8, span: u8, sampled: bool) -> TraceContext {
        TraceContext {
            trace_id: [trace; 16],
            span_id: [span; 8],
            sampled,
            labels: Arc::new([]),
        }
    }

    fn add(table: &mut TraceTable, c: &TraceContext, t: u64) -> bool {
        table.add(TracedSample {
            context: c,
            pid: 1,
            tid: 2,
            thread_name: "w",
            process_name: "p",
            details: &Arc::default(),
            stack: Arc::new([Frame::Kernel { address: 1 }]),
            unix_ns: t,
        })
    }

    fn flushed(table: &mut TraceTable, now: u64) -> Vec<(u8, u64, u32)> {
        let mut out = Vec::new();
        table.flush_idle(now, |p| {
            out.push((p.trace_id[0], p.total_samples, p.previous_flushes))
        });
        out
    }

    #[test]
    fn flushes_idle_traces_and_merges_late_samples() {
        let mut t = TraceTable::new(TraceTableConfig {
            idle_timeout_ns: 100,
            ..Default::default()
        });
        assert!(add(&mut t, &ctx(1, 1, true), 10));
        assert!(add(&mut t, &ctx(1, 2, true), 20));
        assert!(add(&mut t, &ctx(2, 1, true), 150));
        assert!(flushed(&mut t, 100).is_empty());
        assert_eq!(flushed(&mut t, 125), vec![(1, 2, 0)]);
        // A late sample revives trace 1: the next flush carries all three samples.
        assert!(add(&mut t, &ctx(1, 3, true), 400));
        assert_eq!(t.stats.late_merges, 1);
        assert_eq!(flushed(&mut t, 1000), vec![(1, 3, 1), (2, 1, 0)]);
    }

    #[test]
    fn unsampled_traces_are_skipped_unless_asked() {
        let mut t = TraceTable::new(TraceTableConfig::default());
        assert!(!add(&mut t, &ctx(1, 1, false), 10));
        assert_eq!(t.stats.unsampled_samples, 1);
        let mut t = TraceTable::new(TraceTableConfig {
            keep_unsampled: true,
            ..Default::default()
        });
        assert!(add(&mut t, &ctx(1, 1, false), 10));
    }

    #[test]
    fn keeps_each_process_as_first_seen_and_each_thread_as_last_seen() {
        let mut t = TraceTable::new(TraceTableConfig::default());
        let c = ctx(1, 1, true);
        let details = |exe: &str| {
            Arc::new(ProcessDetails {
                exe_name: exe.into(),
                ..Default::default()
            })
        };
        let mut sample = |pid, tid, thread_name, process_name, exe: &str, unix_ns| {
            t.add(TracedSample {
                context: &c,
                pid,
                tid,
                thread_name,
                process_name,
                details: &details(exe),
                stack: Arc::new([Frame::Kernel { address: 1 }]),
                unix_ns,
            })
        };
        // Out of pid order, a process renamed mid-trace and a thread renamed mid-trace.
        assert!(sample(30, 31, "worker", "api", "api-bin", 10));
        assert!(sample(20, 21, "db-1", "db", "db-bin", 20));
        assert!(sample(
            30,
            31,
            "worker-renamed",
            "api-renamed",
            "other-bin",
            30
        ));
        assert!(sample(30, 32, "io", "api", "api-bin", 40));
        let mut seen = Vec::new();
        t.flush_all(|p| {
            let processes: Vec<_> = p
                .processes
                .iter()
                .map(|(pid, process)| {
                    (
                        *pid,
                        process.name.clone(),
                        process.service_name().to_owned(),
                    )
                })
                .collect();
            let threads: Vec<_> = [21, 31, 32, 99]
                .map(|tid| p.thread_name(tid).to_owned())
                .into();
            seen.push((processes, threads));
        });
        assert_eq!(
            seen,
            vec![(
                vec![
                    (20, "db".into(), "db-bin".into()),
                    (30, "api".into(), "api-bin".into()),
                ],
                vec![
                    "db-1".into(),
                    "worker-renamed".into(),
                    "io".into(),
                    String::new()
                ],
            )]
        );
    }

    #[test]
    fn bounded_live_and_retained() {
        let mut t = TraceTable::new(TraceTableConfig {
            idle_timeout_ns: 1_000_000,
            max_live: 2,
            max_retained: 1,
            ..Default::default()
        });
        add(&mut t, &ctx(1, 1, true), 10);
        add(&mut t, &ctx(2, 1, true), 20);
        add(&mut t, &ctx(3, 1, true), 30); // evicts trace 1 (least recently active) early
        assert_eq!(t.live_traces(), 2);
        assert_eq!(t.stats.flushed_early_full, 1);
        assert_eq!(flushed(&mut t, 40), vec![(1, 1, 0)]);
        let mut all = Vec::new();
        t.flush_all(|p| all.push(p.trace_id[0]));
        assert_eq!(all, vec![2, 3]);
        assert_eq!(t.stats.retained_evicted, 2);
    }
}
