//! The workload filter: from the pods a [`WorkloadSelector`] picks to what the kernel checks.
//!
//! - cgroup v2: the ids of every cgroup under the selected pods' cgroups (found by walking the
//!   host's cgroup tree and reading pod uids out of the directory names), for `CGROUP_FILTER`.
//!   The kernel compares a task's own cgroup id first thing, so excluded workloads cost one
//!   helper call and one hash lookup per tick.
//! - cgroup v1 only: the kernel cannot tell containers apart (its cgroup id is the v2 one), so
//!   the filter becomes a pid allow-list: the pids in the selected pods' cgroups, kept current
//!   from process exec/exit events and a periodic rescan.

use std::{
    collections::{BTreeSet, HashSet},
    path::{Path, PathBuf},
};

use super::{
    cgroup::{self, MAX_CGROUP_DEPTH},
    selector::WorkloadSelector,
    watcher::PodIndex,
};

/// How the kernel is told what to sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterMode {
    /// `CGROUP_FILTER` with cgroup v2 ids.
    CgroupIds,
    /// `PID_FILTER` with the pids of the selected cgroups (cgroup v1 hosts).
    Pids,
}

/// What the kernel should let through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    CgroupIds(BTreeSet<u64>),
    Pids(BTreeSet<u32>),
}

pub struct WorkloadFilter {
    selector: WorkloadSelector,
    /// The root of the hierarchy to walk: the cgroup v2 mount, or one cgroup v1 hierarchy.
    root: PathBuf,
    mode: FilterMode,
    /// Uids of the pods selected at the last [`WorkloadFilter::select`].
    selected: HashSet<String>,
}

/// cgroup v1 hierarchies that every container runtime populates, in order of preference.
const V1_HIERARCHIES: &[&str] = &["pids", "memory", "cpu,cpuacct", "cpu", "systemd"];

impl WorkloadFilter {
    /// `cgroup_root`: where the host's cgroup hierarchy is mounted (`/sys/fs/cgroup`, or a
    /// hostPath mount of it in a container). A cgroup v2 mount selects by cgroup id; a cgroup
    /// v1 layout (a directory of hierarchies) falls back to pids.
    pub fn new(selector: WorkloadSelector, cgroup_root: &Path) -> anyhow::Result<Self> {
        let (root, mode) = if cgroup::is_cgroup2(cgroup_root) {
            (cgroup_root.to_path_buf(), FilterMode::CgroupIds)
        } else {
            let hierarchy = V1_HIERARCHIES
                .iter()
                .map(|h| cgroup_root.join(h))
                .find(|p| p.join("cgroup.procs").exists())
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "{}: neither a cgroup v2 mount nor a directory of cgroup v1 hierarchies",
                        cgroup_root.display()
                    )
                })?;
            tracing::warn!(
                hierarchy = %hierarchy.display(),
                "cgroup v1 only: the workload filter is a pid allow-list (kept current from process events)"
            );
            (hierarchy, FilterMode::Pids)
        };
        Ok(Self {
            selector,
            root,
            mode,
            selected: HashSet::new(),
        })
    }

    pub fn mode(&self) -> FilterMode {
        self.mode
    }

    pub fn selector(&self) -> &WorkloadSelector {
        &self.selector
    }

    /// Re-evaluates the selector over `pods` and the cgroup tree.
    pub fn select(&mut self, pods: &PodIndex) -> Selection {
        self.selected = pods
            .pods()
            .filter(|p| self.selector.matches(p))
            .map(|p| p.uid.clone())
            .collect();
        let dirs = cgroup::walk(&self.root, MAX_CGROUP_DEPTH)
            .into_iter()
            .filter(|d| {
                d.identity
                    .pod_uid
                    .as_ref()
                    .is_some_and(|uid| self.selected.contains(uid))
            });
        match self.mode {
            FilterMode::CgroupIds => Selection::CgroupIds(dirs.map(|d| d.id).collect()),
            FilterMode::Pids => Selection::Pids(
                dirs.flat_map(|d| cgroup::procs(&d.path).unwrap_or_default())
                    .collect(),
            ),
        }
    }

    /// Whether a process (by its `/proc/<pid>/cgroup`) belongs to a pod selected at the last
    /// [`WorkloadFilter::select`].
    pub fn selects_process(&self, proc_root: &Path, pid: u32) -> bool {
        cgroup::read_proc_cgroup(proc_root, pid)
            .ok()
            .and_then(|c| c.identity.pod_uid)
            .is_some_and(|uid| self.selected.contains(&uid))
    }

    pub fn selected_pods(&self) -> usize {
        self.selected.len()
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, sync::Arc};

    use super::*;
    use crate::k8s::watcher::PodMetadata;

    #[test]
    fn a_directory_tree_that_is_not_cgroupfs_is_refused() {
        let dir = std::env::temp_dir().join(format!("not-cgroup-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(WorkloadFilter::new(WorkloadSelector::default(), &dir).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A cgroup v1 layout (a directory per hierarchy, `cgroup.procs` in each cgroup), faked in
    /// a temporary directory: the filter falls back to the pids of the selected pod.
    #[test]
    fn cgroup_v1_layout_selects_pids_of_matching_pods() {
        let root = std::env::temp_dir().join(format!("cgroup-v1-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (web, batch) = (
            "11111111-2222-3333-4444-555555555555",
            "66666666-7777-8888-9999-000000000000",
        );
        let cid = "a".repeat(64);
        let pids = root.join("pids");
        std::fs::create_dir_all(&pids).unwrap();
        std::fs::write(pids.join("cgroup.procs"), "1\n2\n").unwrap();
        for (uid, procs) in [(web, "100\n101\n"), (batch, "200\n")] {
            let dir = pids.join(format!("kubepods/besteffort/pod{uid}/{cid}"));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("cgroup.procs"), procs).unwrap();
        }
        let pod = |uid: &str, app: &str| {
            Arc::new(PodMetadata {
                uid: uid.into(),
                name: app.into(),
                namespace: "shop".into(),
                labels: BTreeMap::from([("app".into(), app.into())]),
                workload: None,
                containers: vec![],
            })
        };
        let index = PodIndex::from_pods([pod(web, "web"), pod(batch, "batch")]);
        let selector = WorkloadSelector {
            namespaces: BTreeSet::from(["shop".into()]),
            labels: "app=web".parse().unwrap(),
        };
        let mut filter = WorkloadFilter::new(selector, &root).unwrap();
        assert_eq!(filter.mode(), FilterMode::Pids);
        assert_eq!(
            filter.select(&index),
            Selection::Pids(BTreeSet::from([100, 101]))
        );
        assert_eq!(filter.selected_pods(), 1);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
