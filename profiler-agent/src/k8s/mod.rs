//! Workloads: which container and pod a process belongs to (`cgroup`), and which cgroups the
//! kernel-side workload filter lets through.

pub mod cgroup;

use std::{collections::BTreeSet, path::PathBuf};

use anyhow::Context as _;

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
