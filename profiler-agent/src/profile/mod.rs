//! Profile data as the agent holds it between sampling and output: normalized frames,
//! interned stacks, samples aggregated by (process, thread, stack, trace context) per interval
//! (`Aggregate`), and per trace (`traces::TraceTable`). No I/O here.

pub mod traces;

use std::sync::Arc;

use foldhash::HashMap;

use crate::{context::TraceContext, process::ObjectId};

/// One normalized frame. User frames are `(object, file offset)`; kernel frames keep their
/// address (kallsyms is global). Return addresses are already adjusted by -1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Frame {
    User { object: ObjectId, address: u64 },
    Kernel { address: u64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StackId(pub u32);

/// Interns stacks (leaf first) so each distinct stack is stored once.
#[derive(Default)]
pub struct StackInterner {
    ids: HashMap<Arc<[Frame]>, StackId>,
    stacks: Vec<Arc<[Frame]>>,
}

impl StackInterner {
    pub fn intern(&mut self, frames: Vec<Frame>) -> StackId {
        if let Some(id) = self.ids.get(frames.as_slice()) {
            return *id;
        }
        let id = StackId(self.stacks.len() as u32);
        let frames: Arc<[Frame]> = frames.into();
        self.stacks.push(frames.clone());
        self.ids.insert(frames, id);
        id
    }

    /// The shared stack, for holders outside this interner (per-trace profiles).
    pub fn shared(&self, id: StackId) -> Arc<[Frame]> {
        self.stacks[id.0 as usize].clone()
    }

    pub fn get(&self, id: StackId) -> &[Frame] {
        &self.stacks[id.0 as usize]
    }

    pub fn len(&self) -> usize {
        self.stacks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.stacks.is_empty()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContextId(pub u32);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SampleKey {
    pub pid: u32,
    pub tid: u32,
    pub stack: StackId,
    /// The trace context active on the thread, if any.
    pub context: Option<ContextId>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SampleValue {
    pub count: u64,
    pub first_unix_ns: u64,
    pub last_unix_ns: u64,
}

impl SampleValue {
    pub fn first(unix_ns: u64) -> Self {
        Self {
            count: 1,
            first_unix_ns: unix_ns,
            last_unix_ns: unix_ns,
        }
    }

    /// One more sample at `unix_ns`.
    pub fn record(&mut self, unix_ns: u64) {
        self.count += 1;
        self.first_unix_ns = self.first_unix_ns.min(unix_ns);
        self.last_unix_ns = self.last_unix_ns.max(unix_ns);
    }
}

/// What the agent learned about a sampled process, for outputs that describe processes
/// (OTLP resource attributes, pprof labels, the store's index). Gathered by the collector; no
/// I/O here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessDetails {
    /// Executable file name (or the command name when the executable is unknown).
    pub exe_name: String,
    pub exe_path: Option<String>,
    /// `service.name` from the process's OTEP 4719 context.
    pub context_service_name: Option<String>,
    /// `OTEL_SERVICE_NAME` from the process's environment at its start.
    pub env_service_name: Option<String>,
    pub container_id: Option<String>,
    /// Its pid in its own pid namespace (what `ps` in its container shows), when different.
    pub container_pid: Option<u32>,
    /// Its pod, when the agent watches the Kubernetes API and the pod is known.
    pub pod: Option<PodDetails>,
    /// Resource attributes the process published in its context, as published.
    pub resource_attributes: Vec<(String, String)>,
}

/// A process's pod, as Kubernetes describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodDetails {
    pub namespace: String,
    pub name: String,
    /// The container's name in the pod spec, when the process's container is known.
    pub container: Option<String>,
    /// The pod's `app.kubernetes.io/name` label.
    pub app_name: Option<String>,
    /// OpenTelemetry resource attributes (`k8s.namespace.name`, `k8s.pod.name`, `k8s.pod.uid`,
    /// the owning workload's `k8s.<kind>.name`, `k8s.container.name`, `container.id`).
    pub attributes: Vec<(String, String)>,
}

impl ProcessDetails {
    /// `service.name` by precedence: the process context (OTEP 4719), then
    /// `OTEL_SERVICE_NAME`, then the pod's `app.kubernetes.io/name` label, then the executable
    /// name. Blank values do not count.
    pub fn service_name(&self) -> &str {
        [
            self.context_service_name.as_deref(),
            self.env_service_name.as_deref(),
            self.pod.as_ref().and_then(|p| p.app_name.as_deref()),
        ]
        .into_iter()
        .flatten()
        .find(|name| !name.trim().is_empty())
        .unwrap_or(&self.exe_name)
    }

    /// pprof labels that place the process: its pod's attributes with `_` for `.`
    /// (`k8s_namespace_name`, `k8s_pod_name`, …, the form label-based backends accept) and
    /// `container_pid`.
    pub fn placement_labels(&self) -> Vec<(String, String)> {
        let mut labels: Vec<(String, String)> = self
            .pod
            .iter()
            .flat_map(|p| &p.attributes)
            .map(|(k, v)| (k.replace('.', "_"), v.clone()))
            .collect();
        if self.pod.is_none()
            && let Some(id) = &self.container_id
        {
            labels.push(("container_id".to_owned(), id.clone()));
        }
        if let Some(pid) = self.container_pid {
            labels.push(("container_pid".to_owned(), pid.to_string()));
        }
        labels
    }
}

/// Samples aggregated by key, with the names seen for processes and threads.
#[derive(Default)]
pub struct Aggregate {
    pub stacks: StackInterner,
    pub samples: HashMap<SampleKey, SampleValue>,
    /// Every sample's Unix time per key, in arrival order (OTLP carries per-sample timestamps).
    pub timestamps: HashMap<SampleKey, Vec<u64>>,
    context_ids: HashMap<TraceContext, ContextId>,
    contexts: Vec<TraceContext>,
    pub thread_names: HashMap<u32, String>,
    pub process_names: HashMap<u32, String>,
    /// Per-process details, first seen in this interval (its `service.name` among them).
    pub process_details: HashMap<u32, Arc<ProcessDetails>>,
    pub total_samples: u64,
}

impl Aggregate {
    /// Adds one sample; returns its interned stack.
    pub fn add(
        &mut self,
        pid: u32,
        tid: u32,
        frames: Vec<Frame>,
        context: Option<&TraceContext>,
        unix_ns: u64,
    ) -> StackId {
        let stack = self.stacks.intern(frames);
        let context = context.map(|c| self.context_id(c));
        self.total_samples += 1;
        let key = SampleKey {
            pid,
            tid,
            stack,
            context,
        };
        self.timestamps.entry(key).or_default().push(unix_ns);
        self.samples
            .entry(key)
            .and_modify(|v| v.record(unix_ns))
            .or_insert(SampleValue::first(unix_ns));
        stack
    }

    fn context_id(&mut self, context: &TraceContext) -> ContextId {
        if let Some(id) = self.context_ids.get(context) {
            return *id;
        }
        let id = ContextId(self.contexts.len() as u32);
        self.contexts.push(context.clone());
        self.context_ids.insert(context.clone(), id);
        id
    }

    pub fn context(&self, id: ContextId) -> &TraceContext {
        &self.contexts[id.0 as usize]
    }

    pub fn set_thread_name(&mut self, tid: u32, name: &str) {
        if self.thread_names.get(&tid).map(String::as_str) != Some(name) {
            self.thread_names.insert(tid, name.to_owned());
        }
    }

    /// Every distinct frame referenced by a sample.
    pub fn frames(&self) -> impl Iterator<Item = Frame> + '_ {
        let mut seen = foldhash::HashSet::default();
        self.samples
            .keys()
            .flat_map(|k| self.stacks.get(k.stack).iter().copied())
            .filter(move |f| seen.insert(*f))
    }

    /// Samples in a stable order (by pid, tid, stack).
    pub fn sorted_samples(&self) -> Vec<(&SampleKey, &SampleValue)> {
        let mut v: Vec<_> = self.samples.iter().collect();
        v.sort_by_key(|(k, _)| **k);
        v
    }

    pub fn time_range(&self) -> Option<(u64, u64)> {
        let first = self.samples.values().map(|v| v.first_unix_ns).min()?;
        let last = self.samples.values().map(|v| v.last_unix_ns).max()?;
        Some((first, last))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregates_identical_stacks() {
        let mut agg = Aggregate::default();
        let a = vec![
            Frame::Kernel { address: 1 },
            Frame::User {
                object: ObjectId(0),
                address: 2,
            },
        ];
        let ctx = TraceContext {
            trace_id: [1; 16],
            span_id: [2; 8],
            sampled: true,
            labels: Arc::new([]),
        };
        agg.add(1, 2, a.clone(), None, 100);
        agg.add(1, 2, a.clone(), None, 50);
        agg.add(1, 3, a.clone(), None, 70);
        agg.add(1, 2, vec![Frame::Kernel { address: 9 }], None, 80);
        agg.add(1, 2, a.clone(), Some(&ctx), 90);
        agg.add(1, 2, a, Some(&ctx), 95);
        assert_eq!(agg.total_samples, 6);
        assert_eq!(agg.stacks.len(), 2);
        assert_eq!(agg.samples.len(), 4);
        let key = |context| SampleKey {
            pid: 1,
            tid: 2,
            stack: StackId(0),
            context,
        };
        assert_eq!(agg.samples[&key(Some(ContextId(0)))].count, 2);
        assert_eq!(agg.context(ContextId(0)), &ctx);
        let v = agg.samples[&key(None)];
        assert_eq!((v.count, v.first_unix_ns, v.last_unix_ns), (2, 50, 100));
        assert_eq!(agg.frames().count(), 3);
        assert_eq!(agg.time_range(), Some((50, 100)));
        assert_eq!(agg.timestamps[&key(None)], vec![100, 50]);
        assert_eq!(agg.timestamps[&key(Some(ContextId(0)))], vec![90, 95]);
    }

    #[test]
    fn service_name_precedence() {
        let mut d = ProcessDetails {
            exe_name: "server".into(),
            ..Default::default()
        };
        assert_eq!(d.service_name(), "server");
        d.env_service_name = Some("from-env".into());
        assert_eq!(d.service_name(), "from-env");
        d.context_service_name = Some("from-context".into());
        assert_eq!(d.service_name(), "from-context");
        d.context_service_name = Some(" ".into());
        d.env_service_name = None;
        d.pod = Some(PodDetails {
            app_name: Some("from-pod-label".into()),
            ..Default::default()
        });
        assert_eq!(d.service_name(), "from-pod-label");
        d.env_service_name = Some("from-env".into());
        assert_eq!(d.service_name(), "from-env");
    }

    #[test]
    fn placement_labels() {
        let mut d = ProcessDetails {
            container_id: Some("c0ffee".into()),
            container_pid: Some(7),
            ..Default::default()
        };
        assert_eq!(
            d.placement_labels(),
            [("container_id", "c0ffee"), ("container_pid", "7")]
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
        d.pod = Some(PodDetails {
            attributes: vec![
                ("k8s.namespace.name".into(), "shop".into()),
                ("container.id".into(), "c0ffee".into()),
            ],
            ..Default::default()
        });
        assert_eq!(
            d.placement_labels(),
            [
                ("k8s_namespace_name", "shop"),
                ("container_id", "c0ffee"),
                ("container_pid", "7")
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
    }
}
