//! Process details for resource attributes that only `/proc` knows: `OTEL_SERVICE_NAME` from a
//! process's environment and its container id from its cgroup path. Read once per process
//! image (at first sight, again after exec).

use std::path::Path;

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

/// The container id in `/proc/<pid>/cgroup`, if the process runs in a container.
pub fn read_container_id(proc_dir: &Path) -> Option<String> {
    container_id(&std::fs::read_to_string(proc_dir.join("cgroup")).ok()?)
}

/// The 64-hex-digit container id in a cgroup file, as container runtimes name their cgroups:
/// `/docker/<id>`, `docker-<id>.scope`, `cri-containerd-<id>.scope`, `crio-<id>.scope`,
/// `/kubepods/.../<id>`, `libpod-<id>.scope`. The last match in the path wins (nested cgroups).
pub fn container_id(cgroup: &str) -> Option<String> {
    cgroup
        .lines()
        .filter_map(|line| line.splitn(3, ':').nth(2))
        .flat_map(|path| path.split('/'))
        .filter_map(|segment| {
            let segment = segment.strip_suffix(".scope").unwrap_or(segment);
            let id = segment.rsplit(['-', ':']).next()?;
            (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_owned())
        })
        .next_back()
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
    fn container_ids() {
        let id = "3f4a8c0d2b9e4f6a8c0d2b9e4f6a8c0d2b9e4f6a8c0d2b9e4f6a8c0d2b9e4f6a";
        for cgroup in [
            format!("0::/system.slice/docker-{id}.scope\n"),
            format!("12:pids:/docker/{id}\n1:name=systemd:/docker/{id}\n"),
            format!("0::/kubepods.slice/kubepods-burstable.slice/cri-containerd-{id}.scope\n"),
            format!("0::/kubepods/besteffort/pod1234/{id}\n"),
            format!("0::/machine.slice/libpod-{id}.scope/container\n"),
            format!("0::/crio-{id}.scope\n"),
        ] {
            assert_eq!(container_id(&cgroup).as_deref(), Some(id), "{cgroup}");
        }
        assert_eq!(
            container_id("0::/user.slice/user-0.slice/session-3.scope\n"),
            None
        );
        assert_eq!(container_id("0::/\n"), None);
        assert_eq!(container_id(""), None);
    }
}
