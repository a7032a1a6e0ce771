//! Workloads: which container and pod a process belongs to, what Kubernetes says about that
//! pod, and which workloads the kernel-side filter lets through.
//!
//! - [`cgroup`]: container id and pod uid from `/proc/<pid>/cgroup` (every runtime and
//!   nesting shape), cgroup ids, the cgroup tree walk.
//! - [`watcher`]: pod metadata (name, namespace, labels, owning workload, containers) for the
//!   pods of this node, from the API server's list/watch, published as [`PodIndex`] snapshots.
//! - [`client`]: the API client (HTTP/1.1 over rustls), [`api`]: the fields it decodes.
//! - [`selector`]: namespaces + label selector.
//! - [`process`]: `service.name` precedence, `OTEL_SERVICE_NAME` from the environment, pids as
//!   the container sees them.
//!
//! ## Attaching pod metadata to samples (for the collector and the exporters)
//!
//! The collector thread holds a [`PodMetadataHandle`] (cheap to clone, never blocks) and, once
//! per process (on first sample, dropped on exec/exit like the process table's entries):
//!
//! 1. `cgroup::read_proc_cgroup(proc_root, pid)?.identity` → container id and pod uid;
//! 2. `handle.lookup(&identity)` → [`ProcessPod`] (pod metadata and the container);
//! 3. resource attributes: `pod.resource_attributes(container.as_ref())` (`k8s.namespace.name`,
//!    `k8s.pod.name`, `k8s.pod.uid`, `k8s.deployment.name`…, `k8s.container.name`,
//!    `container.id`) for OTLP, and the same pairs as pprof labels;
//! 4. `service.name`: `process::service_name(process context, OTEL_SERVICE_NAME from
//!    process::otel_service_name, pod.app_name(), executable name)`;
//! 5. the pid users know: `process::container_pid(proc_root, pid)` next to the host pid.
//!
//! Cache the result per pid; a snapshot that changes (`handle.changed()`) only matters for
//! processes whose pod was not known yet (a pod's metadata is fixed once it runs, labels
//! aside).

pub mod api;
pub mod cgroup;
pub mod client;
pub mod process;
pub mod selector;
pub mod watcher;

use std::{
    collections::BTreeSet,
    path::PathBuf,
};

use anyhow::Context as _;
pub use selector::{LabelSelector, WorkloadSelector};
pub use watcher::{PodIndex, PodMetadata, PodMetadataHandle, ProcessPod, Workload};

use crate::metrics::Metrics;

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
