//! Workloads: which container and pod a process belongs to, what Kubernetes says about that
//! pod, and which workloads the kernel-side filter lets through.
//!
//! - [`cgroup`]: container id and pod uid from `/proc/<pid>/cgroup` (every runtime and
//!   nesting shape), cgroup ids, the cgroup tree walk.
//! - [`watcher`]: pod metadata (name, namespace, labels, owning workload, containers) for the
//!   pods of this node, from the API server's list/watch, published as [`PodIndex`] snapshots.
//! - [`client`]: the API client (HTTP/1.1 over rustls), [`api`]: the fields it decodes.
//! - [`selector`] and [`filter`]: namespaces + label selector → cgroup ids (or pids on cgroup
//!   v1 hosts) for the kernel; [`Workloads`] keeps them current while sampling.
//!
//! ## How pod metadata reaches profiles
//!
//! The process table reads each process's [`cgroup::CgroupIdentity`] (container id, pod uid)
//! and its pid inside its container once per process image (`process/details.rs`). The
//! collector thread holds a [`PodMetadataHandle`] (cheap to clone, never blocks) and, for each
//! process once per interval, looks its identity up in the current snapshot: a pod that was
//! not known yet (the watcher's first list still running, a pod created a moment ago) is found
//! at the next interval. The result, `profile::PodDetails`, becomes OTLP resource attributes
//! (`k8s.namespace.name`, `k8s.pod.name`, `k8s.pod.uid`, `k8s.deployment.name`…,
//! `k8s.container.name`, `container.id`), pprof labels, the store's namespace and pod columns,
//! and one step of the `service.name` precedence (the pod's `app.kubernetes.io/name`).

pub mod api;
pub mod cgroup;
pub mod client;
pub mod filter;
pub mod selector;
pub mod watcher;

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
pub use filter::{FilterMode, Selection, WorkloadFilter};
pub use selector::{LabelSelector, WorkloadSelector};
use tokio::sync::mpsc;
pub use watcher::{PodIndex, PodMetadata, PodMetadataHandle, ProcessPod, Workload};

use crate::{collector::ProcessNote, ebpf::Sampler, metrics::Metrics};

/// What `--cgroup PATH` selects: cgroup v2 ids for the kernel filter, or on cgroup v1 (where
/// the kernel cannot match a task's cgroup) the pids in those cgroups when the agent starts.
#[derive(Debug, Default)]
pub struct CgroupSelection {
    pub v2_ids: Option<BTreeSet<u64>>,
    pub v1_pids: Option<Vec<u32>>,
}

impl CgroupSelection {
    /// Each path selects its directory and every cgroup below it.
    pub fn resolve(paths: &[PathBuf]) -> anyhow::Result<Self> {
        let mut selection = Self::default();
        for path in paths {
            anyhow::ensure!(
                path.is_dir(),
                "--cgroup {}: no such directory",
                path.display()
            );
            if cgroup::is_cgroup2(path) {
                let ids = cgroup::subtree_ids(path)
                    .with_context(|| format!("--cgroup {}", path.display()))?;
                selection.v2_ids.get_or_insert_default().extend(ids);
            } else {
                tracing::warn!(
                    cgroup = %path.display(),
                    "not a cgroup v2 directory: profiling the processes in it now (pid allow-list), not ones that join it later"
                );
                let pids = selection.v1_pids.get_or_insert_default();
                for dir in cgroup::walk(path, cgroup::MAX_CGROUP_DEPTH) {
                    pids.extend(cgroup::procs(&dir.path).unwrap_or_default());
                }
            }
        }
        if let Some(pids) = &mut selection.v1_pids {
            pids.sort_unstable();
            pids.dedup();
        }
        Ok(selection)
    }
}

/// Where pod metadata comes from.
#[derive(Debug, Clone, Default)]
pub struct KubernetesOptions {
    /// The API server (e.g. `kubectl proxy`'s `http://127.0.0.1:8001`); default: in-cluster.
    pub api_url: Option<String>,
    /// This node's name (the downward API's `spec.nodeName`).
    pub node_name: Option<String>,
}

/// Starts watching this node's pods. `None`, after one log line, when there is no cluster
/// (not in a pod and no `api_url`) or it cannot be used: the agent then profiles without pod
/// metadata.
pub fn start_pod_metadata(
    options: &KubernetesOptions,
    metrics: &Metrics,
) -> Option<PodMetadataHandle> {
    let config = match &options.api_url {
        Some(url) => client::ApiConfig::from_url(url).map(Some),
        None => client::ApiConfig::in_cluster(),
    };
    let config = match config {
        Ok(Some(c)) => c,
        Ok(None) => {
            tracing::info!("not in a Kubernetes pod (no KUBERNETES_SERVICE_HOST): no pod metadata");
            return None;
        }
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "Kubernetes API unusable: no pod metadata");
            return None;
        }
    };
    let Some(node) = options.node_name.clone().filter(|n| !n.is_empty()) else {
        tracing::warn!(
            "no node name (PROFILER_NODE_NAME from the downward API's spec.nodeName): no pod metadata"
        );
        return None;
    };
    match client::ApiClient::new(config) {
        Ok(client) => Some(watcher::spawn(
            client,
            watcher::WatcherConfig::new(node),
            metrics.clone(),
        )),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "Kubernetes API unusable: no pod metadata");
            None
        }
    }
}

/// The workload filter while sampling: re-selects when pods change, on a timer (cgroups of
/// new containers, forked processes on cgroup v1), and on process events; applies the result
/// to the sampler's allow-list.
pub struct Workloads {
    filter: WorkloadFilter,
    pods: PodMetadataHandle,
    notes: mpsc::Receiver<ProcessNote>,
    refresh: tokio::time::Interval,
    proc_root: PathBuf,
    /// Pid mode: what the kernel's allow-list holds.
    allowed_pids: BTreeSet<u32>,
    /// Cgroup mode: a selected process started: re-select (its container may be new).
    dirty: bool,
    pods_gone: bool,
}

/// What woke [`Workloads::next`].
pub enum WorkloadEvent {
    Reselect,
    Process(ProcessNote),
}

impl Workloads {
    /// Depth of the process-note queue from the collector.
    pub const NOTE_QUEUE: usize = 4096;

    pub fn new(
        filter: WorkloadFilter,
        pods: PodMetadataHandle,
        notes: mpsc::Receiver<ProcessNote>,
        refresh_every: Duration,
    ) -> Self {
        let mut refresh = tokio::time::interval(refresh_every);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            filter,
            pods,
            notes,
            refresh,
            proc_root: PathBuf::from("/proc"),
            allowed_pids: BTreeSet::new(),
            dirty: true,
            pods_gone: false,
        }
    }

    pub fn mode(&self) -> FilterMode {
        self.filter.mode()
    }

    /// Waits for something that may change the selection.
    pub async fn next(&mut self) -> WorkloadEvent {
        if self.dirty {
            self.dirty = false;
            return WorkloadEvent::Reselect;
        }
        tokio::select! {
            changed = self.pods.changed(), if !self.pods_gone => {
                self.pods_gone = !changed;
                WorkloadEvent::Reselect
            }
            _ = self.refresh.tick() => WorkloadEvent::Reselect,
            Some(note) = self.notes.recv() => WorkloadEvent::Process(note),
        }
    }

    /// Applies an event to the sampler's allow-list.
    pub fn handle(&mut self, event: WorkloadEvent, sampler: &mut Sampler) -> anyhow::Result<()> {
        match event {
            WorkloadEvent::Reselect => self.reselect(sampler),
            WorkloadEvent::Process(ProcessNote::Exec(pid)) => {
                if !self.filter.selects_process(&self.proc_root, pid) {
                    return Ok(());
                }
                match self.filter.mode() {
                    // A new program in a selected pod: its container's cgroup may be new.
                    FilterMode::CgroupIds => self.dirty = true,
                    FilterMode::Pids => {
                        if self.allowed_pids.insert(pid) {
                            sampler.allow_pid(pid)?;
                        }
                    }
                }
                Ok(())
            }
            WorkloadEvent::Process(ProcessNote::Exit(pid)) => {
                if self.allowed_pids.remove(&pid) {
                    sampler.disallow_pid(pid)?;
                }
                Ok(())
            }
        }
    }

    fn reselect(&mut self, sampler: &mut Sampler) -> anyhow::Result<()> {
        let index = self.pods.current();
        match self.filter.select(&index) {
            Selection::CgroupIds(ids) => {
                let changed = sampler.set_cgroup_filter(&ids)?;
                if changed > 0 {
                    tracing::info!(
                        pods = self.filter.selected_pods(),
                        cgroups = ids.len(),
                        "workload filter updated"
                    );
                }
            }
            Selection::Pids(pids) => {
                for gone in self.allowed_pids.difference(&pids) {
                    sampler.disallow_pid(*gone)?;
                }
                for new in pids.difference(&self.allowed_pids) {
                    sampler.allow_pid(*new)?;
                }
                if pids != self.allowed_pids {
                    tracing::info!(
                        pods = self.filter.selected_pods(),
                        pids = pids.len(),
                        "workload filter updated (pid allow-list)"
                    );
                }
                self.allowed_pids = pids;
            }
        }
        Ok(())
    }
}

/// The cgroup root to use by default: `/sys/fs/cgroup`.
pub fn default_cgroup_root() -> &'static Path {
    Path::new("/sys/fs/cgroup")
}
