//! Process details for resource attributes that only `/proc` knows: `OTEL_SERVICE_NAME` from a
//! process's environment, its container and pod from its cgroup path, and its pid as its own
//! container sees it. Read once per process image (at first sight, again after exec).

use std::path::Path;

use crate::k8s::cgroup::{self, CgroupIdentity};

/// The value of `name` in `/proc/<pid>/environ` (the environment the process started with).
pub fn read_env_var(proc_dir: &Path, name: &str) -> Option<String> {
    let environ = std::fs::read(proc_dir.join("environ")).ok()?;
    env_var(&environ, name)
}

/// `name`'s value in a NUL-separated `KEY=value` list; empty values count as unset.
pub fn env_var(environ: &[u8], name: &str) -> Option<String> {
    environ
        .split(|&b| b == 0)
        .find_map(|entry| entry.strip_prefix(name.as_bytes())?.strip_prefix(b"="))
        .filter(|v| !v.is_empty())
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// The container and pod `/proc/<pid>/cgroup` names (empty outside containers, or unreadable).
pub fn read_cgroup_identity(proc_dir: &Path) -> CgroupIdentity {
    std::fs::read_to_string(proc_dir.join("cgroup"))
        .map(|content| cgroup::parse_proc_cgroup(&content).identity)
        .unwrap_or_default()
}

/// The process's pid in each pid namespace it belongs to, outermost (the reader's) first, from
/// the `NSpid:` line of `/proc/<pid>/status` content. The last one is the pid its own
/// container sees (what the application logs and `ps` inside the pod show).
pub fn ns_pids(status: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .map(|rest| {
            rest.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The pid of the process as its own container sees it (`None`: not readable, or the same pid
/// namespace as the reader).
pub fn read_container_pid(proc_dir: &Path) -> Option<u32> {
    let status = std::fs::read_to_string(proc_dir.join("status")).ok()?;
    let pids = ns_pids(&status);
    (pids.len() > 1).then(|| *pids.last().expect("non-empty"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_vars() {
        let environ = b"PATH=/bin\0OTEL_SERVICE_NAME=checkout\0OTEL_SERVICE_NAME_X=no\0EMPTY=\0";
        assert_eq!(
            env_var(environ, "OTEL_SERVICE_NAME").as_deref(),
            Some("checkout")
        );
        assert_eq!(env_var(environ, "EMPTY"), None);
        assert_eq!(env_var(environ, "OTEL_SERVICE"), None);
        assert_eq!(env_var(b"", "PATH"), None);
        let own = read_env_var(Path::new("/proc/self"), "PATH");
        assert_eq!(own, std::env::var("PATH").ok().filter(|p| !p.is_empty()));
    }

    #[test]
    fn container_ids_of_every_runtime_shape() {
        let id = "3f4a8c0d2b9e4f6a8c0d2b9e4f6a8c0d2b9e4f6a8c0d2b9e4f6a8c0d2b9e4f6a";
        for content in [
            format!("0::/system.slice/docker-{id}.scope\n"),
            format!("12:pids:/docker/{id}\n1:name=systemd:/docker/{id}\n"),
            format!("0::/kubepods.slice/kubepods-burstable.slice/cri-containerd-{id}.scope\n"),
            format!("0::/kubepods/besteffort/pod1234/{id}\n"),
            format!("0::/machine.slice/libpod-{id}.scope/container\n"),
            format!("0::/crio-{id}.scope\n"),
        ] {
            let identity = cgroup::parse_proc_cgroup(&content).identity;
            assert_eq!(identity.container_id.as_deref(), Some(id), "{content}");
        }
        let session = cgroup::parse_proc_cgroup("0::/user.slice/user-0.slice/session-3.scope\n");
        assert!(session.identity.is_empty());
        assert!(read_cgroup_identity(Path::new("/nonexistent")).is_empty());
    }

    #[test]
    fn namespace_pids() {
        let status = "Name:\tjava\nTgid:\t48213\nPid:\t48213\nPPid:\t48190\nNSpid:\t48213\t7\n";
        assert_eq!(ns_pids(status), vec![48213, 7]);
        assert_eq!(ns_pids("Name:\tx\nNSpid:\t12\n"), vec![12]);
        assert!(ns_pids("Name:\tx\n").is_empty());
        // This test runs in one pid namespace, or sees its own pid there.
        let own = ns_pids(&std::fs::read_to_string("/proc/self/status").unwrap());
        assert_eq!(own.first(), Some(&std::process::id()));
        assert_eq!(
            read_container_pid(Path::new("/proc/self")).is_some(),
            own.len() > 1
        );
    }
}
