//! Per-process facts that workload metadata needs from procfs: `service.name` (and where it
//! came from), the `OTEL_SERVICE_NAME` a process was started with, and its pid as its own
//! container sees it.

use std::path::Path;

/// Where a process's `service.name` came from, most trusted first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ServiceNameSource {
    /// The OTEP 4719 process context the process publishes (`service.name` resource attribute).
    ProcessContext,
    /// `OTEL_SERVICE_NAME` in the process's environment at start.
    Environment,
    /// The pod's `app.kubernetes.io/name` label.
    PodLabel,
    /// The executable's name.
    Executable,
}

/// `service.name` by precedence: process context > `OTEL_SERVICE_NAME` > the pod's
/// `app.kubernetes.io/name` label > executable name. Empty values do not count.
pub fn service_name<'a>(
    process_context: Option<&'a str>,
    environment: Option<&'a str>,
    pod_label: Option<&'a str>,
    executable: &'a str,
) -> (&'a str, ServiceNameSource) {
    [
        (process_context, ServiceNameSource::ProcessContext),
        (environment, ServiceNameSource::Environment),
        (pod_label, ServiceNameSource::PodLabel),
    ]
    .into_iter()
    .find_map(|(v, source)| {
        v.map(str::trim)
            .filter(|v| !v.is_empty())
            .map(|v| (v, source))
    })
    .unwrap_or((executable, ServiceNameSource::Executable))
}

/// A variable from `/proc/<pid>/environ` content (NUL-separated `KEY=value`; the environment
/// the process was started with). Reading another user's needs CAP_SYS_PTRACE.
pub fn env_var(environ: &[u8], key: &str) -> Option<String> {
    environ.split(|b| *b == 0).find_map(|entry| {
        let rest = entry.strip_prefix(key.as_bytes())?.strip_prefix(b"=")?;
        Some(String::from_utf8_lossy(rest).into_owned())
    })
}

/// `OTEL_SERVICE_NAME` of process `pid` (procfs at `proc_root`).
pub fn otel_service_name(proc_root: &Path, pid: u32) -> Option<String> {
    let environ = std::fs::read(proc_root.join(pid.to_string()).join("environ")).ok()?;
    env_var(&environ, "OTEL_SERVICE_NAME")
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

/// The pid of `pid` as its own container sees it (`None`: not readable, or same namespace).
pub fn container_pid(proc_root: &Path, pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(proc_root.join(pid.to_string()).join("status")).ok()?;
    let pids = ns_pids(&status);
    (pids.len() > 1).then(|| *pids.last().expect("non-empty"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_name_precedence() {
        use ServiceNameSource::*;
        assert_eq!(
            service_name(Some("ctx"), Some("env"), Some("label"), "exe"),
            ("ctx", ProcessContext)
        );
        assert_eq!(
            service_name(None, Some("env"), Some("label"), "exe"),
            ("env", Environment)
        );
        assert_eq!(
            service_name(Some(" "), Some(""), Some("label"), "exe"),
            ("label", PodLabel)
        );
        assert_eq!(service_name(None, None, None, "exe"), ("exe", Executable));
    }

    #[test]
    fn reads_environment_variables() {
        let environ = b"PATH=/bin\0OTEL_SERVICE_NAME=checkout\0OTEL_SERVICE_NAME_X=no\0EMPTY=\0";
        assert_eq!(
            env_var(environ, "OTEL_SERVICE_NAME").as_deref(),
            Some("checkout")
        );
        assert_eq!(env_var(environ, "EMPTY").as_deref(), Some(""));
        assert_eq!(env_var(environ, "OTEL"), None);
        assert_eq!(env_var(b"", "PATH"), None);
    }

    #[test]
    fn namespace_pids() {
        let status = "Name:\tjava\nTgid:\t48213\nPid:\t48213\nPPid:\t48190\nNSpid:\t48213\t7\n";
        assert_eq!(ns_pids(status), vec![48213, 7]);
        assert_eq!(ns_pids("Name:\tx\nNSpid:\t12\n"), vec![12]);
        assert!(ns_pids("Name:\tx\n").is_empty());
    }

    #[test]
    fn own_process_has_no_container_pid() {
        // The test runs in a single pid namespace (or its pid there is its own).
        let pid = std::process::id();
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let pids = ns_pids(&status);
        assert_eq!(pids.first(), Some(&pid));
        assert_eq!(
            container_pid(Path::new("/proc"), pid).is_some(),
            pids.len() > 1
        );
        assert!(
            otel_service_name(Path::new("/proc"), pid).is_none()
                || std::env::var("OTEL_SERVICE_NAME").is_ok()
        );
    }
}
