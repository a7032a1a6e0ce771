//! Workloads: which container and pod a process belongs to (`cgroup`).

pub mod cgroup;
