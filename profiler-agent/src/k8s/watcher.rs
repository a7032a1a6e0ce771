//! Pod metadata for the pods of this node: list, then watch from the list's resource version
//! (`fieldSelector=spec.nodeName=<node>`); when the server ends a watch, watch again from the
//! last version seen; when that version is too old (410 Gone), list again. Each pod's owning
//! workload is resolved through its controller: a ReplicaSet's Deployment, a Job's CronJob
//! (one GET per owner, cached).
//!
//! Every change publishes a new immutable [`PodIndex`] snapshot through a `watch` channel:
//! readers (the workload filter, the collector when it attaches metadata) hold a
//! [`PodMetadataHandle`] and never lock or wait for the watcher.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use tokio::sync::watch;

use super::{
    api::{self, List, Pod, WatchEvent},
    cgroup::CgroupIdentity,
    client::{ApiClient, ApiError, encode_query_value},
};
use crate::metrics::Metrics;

/// The workload a pod belongs to: its controller, or the controller's controller for
/// ReplicaSets (a Deployment) and Jobs (a CronJob).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub kind: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerMeta {
    pub name: String,
    /// Without the runtime scheme (`containerd://`); `None` until the container exists.
    pub id: Option<String>,
}

/// What the agent knows about one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodMetadata {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub workload: Option<Workload>,
    pub containers: Vec<ContainerMeta>,
}

impl PodMetadata {
    /// OpenTelemetry resource attributes (semantic conventions `k8s.*`, `container.id`) for a
    /// process of this pod; `container` is the container's name when known.
    pub fn resource_attributes(&self, container: Option<&ContainerMeta>) -> Vec<(String, String)> {
        let mut out = vec![
            ("k8s.namespace.name".to_owned(), self.namespace.clone()),
            ("k8s.pod.name".to_owned(), self.name.clone()),
            ("k8s.pod.uid".to_owned(), self.uid.clone()),
        ];
        if let Some(workload) = &self.workload {
            let key = match workload.kind.as_str() {
                "Deployment" => Some("k8s.deployment.name"),
                "ReplicaSet" => Some("k8s.replicaset.name"),
                "StatefulSet" => Some("k8s.statefulset.name"),
                "DaemonSet" => Some("k8s.daemonset.name"),
                "Job" => Some("k8s.job.name"),
                "CronJob" => Some("k8s.cronjob.name"),
                _ => None,
            };
            if let Some(key) = key {
                out.push((key.to_owned(), workload.name.clone()));
            }
        }
        if let Some(container) = container {
            out.push(("k8s.container.name".to_owned(), container.name.clone()));
            if let Some(id) = &container.id {
                out.push(("container.id".to_owned(), id.clone()));
            }
        }
        out
    }

    /// The `app.kubernetes.io/name` label (one step of the `service.name` precedence).
    pub fn app_name(&self) -> Option<&str> {
        self.labels
            .get("app.kubernetes.io/name")
            .map(String::as_str)
    }
}

/// An immutable snapshot of the pods of this node.
#[derive(Debug, Default)]
pub struct PodIndex {
    pods: HashMap<String, Arc<PodMetadata>>,
    /// Container id → (pod uid, index in its `containers`).
    containers: HashMap<String, (String, usize)>,
    /// False until the first list succeeded (an empty index then means "not known yet").
    pub synced: bool,
}

/// A process's pod and container, as found from its cgroup.
#[derive(Debug, Clone)]
pub struct ProcessPod {
    pub pod: Arc<PodMetadata>,
    pub container: Option<ContainerMeta>,
}

impl PodIndex {
    fn build(pods: &HashMap<String, Arc<PodMetadata>>, synced: bool) -> Self {
        let mut containers = HashMap::new();
        for pod in pods.values() {
            for (i, c) in pod.containers.iter().enumerate() {
                if let Some(id) = &c.id {
                    containers.insert(id.clone(), (pod.uid.clone(), i));
                }
            }
        }
        Self {
            pods: pods.clone(),
            containers,
            synced,
        }
    }

    /// An index of these pods (tests, and consumers that build their own).
    pub fn from_pods(pods: impl IntoIterator<Item = Arc<PodMetadata>>) -> Self {
        let pods = pods.into_iter().map(|p| (p.uid.clone(), p)).collect();
        Self::build(&pods, true)
    }

    pub fn len(&self) -> usize {
        self.pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }

    pub fn pods(&self) -> impl Iterator<Item = &Arc<PodMetadata>> {
        self.pods.values()
    }

    pub fn by_pod_uid(&self, uid: &str) -> Option<&Arc<PodMetadata>> {
        self.pods.get(uid)
    }

    pub fn by_container_id(&self, id: &str) -> Option<(&Arc<PodMetadata>, &ContainerMeta)> {
        let (uid, i) = self.containers.get(id)?;
        let pod = self.pods.get(uid)?;
        Some((pod, pod.containers.get(*i)?))
    }

    /// The pod (and container) of a process, from what its cgroup path names: the container
    /// id when the pod lists it, else the pod uid.
    pub fn lookup(&self, identity: &CgroupIdentity) -> Option<ProcessPod> {
        if let Some((pod, container)) = identity
            .container_id
            .as_deref()
            .and_then(|id| self.by_container_id(id))
        {
            return Some(ProcessPod {
                pod: pod.clone(),
                container: Some(container.clone()),
            });
        }
        let pod = self.by_pod_uid(identity.pod_uid.as_deref()?)?;
        Some(ProcessPod {
            pod: pod.clone(),
            container: None,
        })
    }
}

/// A reader's view of the pod metadata; cheap to clone.
#[derive(Clone)]
pub struct PodMetadataHandle {
    rx: watch::Receiver<Arc<PodIndex>>,
}

impl PodMetadataHandle {
    /// No cluster: always empty, never changes.
    pub fn disconnected() -> Self {
        let (tx, rx) = watch::channel(Arc::new(PodIndex::default()));
        // Keep the sender alive forever so `changed` waits instead of failing.
        std::mem::forget(tx);
        Self { rx }
    }

    pub fn current(&self) -> Arc<PodIndex> {
        self.rx.borrow().clone()
    }

    /// Waits for the next snapshot; false when the watcher is gone.
    pub async fn changed(&mut self) -> bool {
        self.rx.changed().await.is_ok()
    }

    pub fn lookup(&self, identity: &CgroupIdentity) -> Option<ProcessPod> {
        self.current().lookup(identity)
    }
}

#[derive(Debug, Clone)]
pub struct WatcherConfig {
    pub node_name: String,
    /// Asked of the server for each watch (`timeoutSeconds`): it then ends the stream cleanly.
    pub watch_timeout: Duration,
    /// No line (event or bookmark) for this long: the connection is presumed dead.
    pub idle_timeout: Duration,
    /// Retry delays after failures: doubling from `backoff_initial` up to `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl WatcherConfig {
    pub fn new(node_name: impl Into<String>) -> Self {
        Self {
            node_name: node_name.into(),
            watch_timeout: Duration::from_secs(240),
            idle_timeout: Duration::from_secs(300),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// Starts watching the pods of `config.node_name`.
pub fn spawn(client: ApiClient, config: WatcherConfig, metrics: Metrics) -> PodMetadataHandle {
    let (tx, rx) = watch::channel(Arc::new(PodIndex::default()));
    let watcher = Watcher {
        client,
        config,
        metrics,
        pods: HashMap::new(),
        owners: HashMap::new(),
        synced: false,
        tx,
    };
    tokio::spawn(watcher.run());
    PodMetadataHandle { rx }
}

/// How a watch ended.
enum WatchEnd {
    /// The server closed the stream (timeout, restart): watch again from this version.
    Closed(String),
    /// The version is too old (410 Gone): list again.
    Expired,
}

/// Owner caches are dropped past this size (ReplicaSets churn with every rollout).
const MAX_CACHED_OWNERS: usize = 4096;

struct Watcher {
    client: ApiClient,
    config: WatcherConfig,
    metrics: Metrics,
    pods: HashMap<String, Arc<PodMetadata>>,
    /// (namespace, kind, name) → the workload it belongs to.
    owners: HashMap<(String, String, String), Workload>,
    synced: bool,
    tx: watch::Sender<Arc<PodIndex>>,
}

impl Watcher {
    async fn run(mut self) {
        let mut version: Option<String> = None;
        let mut backoff = self.config.backoff_initial;
        loop {
            if self.tx.is_closed() {
                return;
            }
            let result = match version.clone() {
                None => self.list().await.map(|v| {
                    version = Some(v);
                }),
                Some(from) => match self.watch(&from).await {
                    Ok(WatchEnd::Closed(last)) => {
                        self.metrics.inc("k8s_watch_restarts");
                        version = Some(last);
                        Ok(())
                    }
                    Ok(WatchEnd::Expired) => {
                        self.metrics.inc("k8s_watch_expired");
                        version = None;
                        Ok(())
                    }
                    Err(e) => Err(e),
                },
            };
            match result {
                Ok(()) => backoff = self.config.backoff_initial,
                Err(e) => {
                    self.metrics.inc("k8s_api_errors");
                    tracing::warn!(error = %e, retry_in = ?backoff, "Kubernetes API: pod metadata may be stale");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.config.backoff_max);
                }
            }
        }
    }

    fn selector(&self) -> String {
        encode_query_value(&format!("spec.nodeName={}", self.config.node_name))
    }

    /// Replaces every pod with a fresh list; returns its resource version.
    async fn list(&mut self) -> Result<String, ApiError> {
        let path = format!("/api/v1/pods?fieldSelector={}", self.selector());
        let list: List<Pod> = self.client.get(&path).await?;
        let mut pods = HashMap::new();
        for pod in list.items {
            let meta = self.metadata(pod).await;
            pods.insert(meta.uid.clone(), Arc::new(meta));
        }
        self.pods = pods;
        self.synced = true;
        self.metrics.inc("k8s_pod_lists");
        tracing::info!(
            pods = self.pods.len(),
            node = %self.config.node_name,
            "Kubernetes pod metadata listed"
        );
        self.publish();
        list.metadata
            .resource_version
            .ok_or_else(|| anyhow::anyhow!("the pod list has no resourceVersion").into())
    }

    async fn watch(&mut self, from: &str) -> Result<WatchEnd, ApiError> {
        let path = format!(
            "/api/v1/pods?fieldSelector={}&watch=1&allowWatchBookmarks=true&resourceVersion={}&timeoutSeconds={}",
            self.selector(),
            encode_query_value(from),
            self.config.watch_timeout.as_secs()
        );
        let mut stream = match self.client.stream(&path).await {
            Ok(s) => s,
            Err(e) if e.code() == Some(410) => return Ok(WatchEnd::Expired),
            Err(e) => return Err(e),
        };
        let mut last = from.to_owned();
        loop {
            let line = tokio::time::timeout(self.config.idle_timeout, stream.next_line())
                .await
                .map_err(|_| {
                    anyhow::anyhow!("watch silent for {:?}", self.config.idle_timeout)
                })??;
            let Some(line) = line else {
                return Ok(WatchEnd::Closed(last));
            };
            let event: WatchEvent = match serde_json::from_slice(&line) {
                Ok(e) => e,
                Err(e) => {
                    self.metrics.inc("k8s_watch_undecodable");
                    tracing::debug!(error = %e, "undecodable watch event");
                    continue;
                }
            };
            if event.kind == "ERROR" {
                let status: api::Status = serde_json::from_value(event.object).unwrap_or_default();
                if status.code == 410 {
                    return Ok(WatchEnd::Expired);
                }
                return Err(ApiError::Status {
                    code: status.code,
                    message: status.message,
                });
            }
            let pod: Pod = match serde_json::from_value(event.object) {
                Ok(p) => p,
                Err(e) => {
                    self.metrics.inc("k8s_watch_undecodable");
                    tracing::debug!(error = %e, "undecodable pod in a watch event");
                    continue;
                }
            };
            if let Some(v) = &pod.metadata.resource_version {
                last = v.clone();
            }
            match event.kind.as_str() {
                "ADDED" | "MODIFIED" => {
                    let meta = self.metadata(pod).await;
                    self.pods.insert(meta.uid.clone(), Arc::new(meta));
                }
                "DELETED" => {
                    self.pods.remove(&pod.metadata.uid);
                }
                // BOOKMARK: only the version moves.
                _ => continue,
            }
            self.metrics.inc("k8s_pod_events");
            self.publish();
        }
    }

    fn publish(&self) {
        let _ = self
            .tx
            .send(Arc::new(PodIndex::build(&self.pods, self.synced)));
    }

    async fn metadata(&mut self, pod: Pod) -> PodMetadata {
        let workload = match pod.metadata.controller().cloned() {
            Some(owner) => Some(self.workload(&pod.metadata.namespace, owner).await),
            None => None,
        };
        let status = pod.status;
        let containers = status
            .init_container_statuses
            .into_iter()
            .chain(status.container_statuses)
            .chain(status.ephemeral_container_statuses)
            .map(|c| ContainerMeta {
                name: c.name,
                id: c
                    .container_id
                    .as_deref()
                    .map(api::strip_runtime_scheme)
                    .filter(|id| !id.is_empty())
                    .map(str::to_owned),
            })
            .collect();
        PodMetadata {
            uid: pod.metadata.uid,
            name: pod.metadata.name,
            namespace: pod.metadata.namespace,
            labels: pod.metadata.labels,
            workload,
            containers,
        }
    }

    /// The workload of a pod whose controller is `owner`: a ReplicaSet's or Job's own
    /// controller when it has one (Deployment, CronJob, or anything else that manages them),
    /// else the owner itself. Lookups that fail fall back to the owner, uncached.
    async fn workload(&mut self, namespace: &str, owner: api::OwnerReference) -> Workload {
        let direct = Workload {
            kind: owner.kind.clone(),
            name: owner.name.clone(),
        };
        let path = match owner.kind.as_str() {
            "ReplicaSet" => format!(
                "/apis/apps/v1/namespaces/{}/replicasets/{}",
                encode_query_value(namespace),
                encode_query_value(&owner.name)
            ),
            "Job" => format!(
                "/apis/batch/v1/namespaces/{}/jobs/{}",
                encode_query_value(namespace),
                encode_query_value(&owner.name)
            ),
            _ => return direct,
        };
        let key = (namespace.to_owned(), owner.kind, owner.name);
        if let Some(w) = self.owners.get(&key) {
            return w.clone();
        }
        match self.client.get::<api::Owned>(&path).await {
            Ok(object) => {
                let workload = object
                    .metadata
                    .controller()
                    .map(|o| Workload {
                        kind: o.kind.clone(),
                        name: o.name.clone(),
                    })
                    .unwrap_or_else(|| direct.clone());
                if self.owners.len() >= MAX_CACHED_OWNERS {
                    self.owners.clear();
                }
                self.owners.insert(key, workload.clone());
                workload
            }
            Err(e) => {
                self.metrics.inc("k8s_owner_lookups_failed");
                tracing::debug!(error = %e, path, "owner lookup failed");
                direct
            }
        }
    }
}
