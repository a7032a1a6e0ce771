//! Which container and which pod a process belongs to, from its cgroup path, and the cgroup ids
//! the kernel-side workload filter compares against.
//!
//! `/proc/<pid>/cgroup` has one line per hierarchy: `0::<path>` for cgroup v2 and
//! `<id>:<controllers>:<path>` for each cgroup v1 hierarchy (hybrid hosts have both, and the v2
//! line may be just `/`). The path names the container and the pod in every common layout:
//!
//! | runtime, cgroup driver | container cgroup |
//! |---|---|
//! | containerd, systemd | `…/kubepods-burstable-pod<uid_>.slice/cri-containerd-<id>.scope` |
//! | CRI-O, systemd | `…/kubepods-pod<uid_>.slice/crio-<id>.scope` (`crio-conmon-<id>.scope`: its monitor) |
//! | docker (cri-dockerd), systemd | `…/kubepods-besteffort-pod<uid_>.slice/docker-<id>.scope` |
//! | any, cgroupfs | `/kubepods/besteffort/pod<uid>/<id>` |
//! | docker alone | `/docker/<id>` (cgroupfs), `/system.slice/docker-<id>.scope` (systemd) |
//! | podman | `…/libpod-<id>.scope` or `…/libpod-<id>.scope/container` |
//!
//! Pod uids use `_` instead of `-` in systemd slice names. Nesting (kind: a Kubernetes node that
//! is itself a docker container; docker in docker) puts one layout inside another, and a reader
//! in another cgroup namespace sees `/../..` prefixes: the innermost pod and container win, and a
//! container found *above* a pod is the node's container, not the workload's.

use std::{
    collections::BTreeSet,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// The container runtime a cgroup path names (from its naming convention; `None` when the path
/// does not tell, e.g. a bare id under the cgroupfs driver).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    Containerd,
    CriO,
    Docker,
    Podman,
}

impl Runtime {
    /// The prefix Kubernetes puts before container ids in `status.containerStatuses[].containerID`.
    pub fn kubernetes_scheme(self) -> &'static str {
        match self {
            Runtime::Containerd => "containerd",
            Runtime::CriO => "cri-o",
            Runtime::Docker => "docker",
            Runtime::Podman => "podman",
        }
    }
}

/// What a cgroup path says about the workload of the processes in it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupIdentity {
    /// Container id (64 lowercase hex digits for every runtime above).
    pub container_id: Option<String>,
    pub runtime: Option<Runtime>,
    /// Kubernetes pod UID, canonical form (lowercase, dashes).
    pub pod_uid: Option<String>,
}

impl CgroupIdentity {
    pub fn is_empty(&self) -> bool {
        self.container_id.is_none() && self.pod_uid.is_none()
    }
}

/// One process's cgroup membership.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcCgroup {
    /// The cgroup v2 path (`0::` line), as the reader's cgroup namespace shows it.
    pub unified_path: Option<String>,
    /// From the v2 path, or when that names nothing (cgroup v1 and hybrid hosts), from the first
    /// v1 hierarchy that does.
    pub identity: CgroupIdentity,
}

/// Parses the content of `/proc/<pid>/cgroup`.
pub fn parse_proc_cgroup(content: &str) -> ProcCgroup {
    let mut unified_path = None;
    let mut v1_paths = Vec::new();
    for line in content.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(hierarchy), Some(controllers), Some(path)) =
            (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if hierarchy == "0" && controllers.is_empty() {
            unified_path = Some(path.to_owned());
        } else {
            v1_paths.push(path);
        }
    }
    let identity = unified_path
        .as_deref()
        .map(parse_path)
        .filter(|id| !id.is_empty())
        .or_else(|| {
            v1_paths
                .iter()
                .map(|p| parse_path(p))
                .find(|id| !id.is_empty())
        })
        .unwrap_or_default();
    ProcCgroup {
        unified_path,
        identity,
    }
}

/// Reads and parses `<proc_root>/<pid>/cgroup`.
pub fn read_proc_cgroup(proc_root: &Path, pid: u32) -> std::io::Result<ProcCgroup> {
    let content = std::fs::read_to_string(proc_root.join(pid.to_string()).join("cgroup"))?;
    Ok(parse_proc_cgroup(&content))
}

/// The container and pod a cgroup path names (innermost wins; see the module documentation).
pub fn parse_path(path: &str) -> CgroupIdentity {
    let mut identity = CgroupIdentity::default();
    for component in path.split('/').filter(|c| !c.is_empty() && *c != "..") {
        if let Some(uid) = pod_uid(component) {
            // Anything found above the pod is the node's own container (nested setups).
            identity = CgroupIdentity {
                pod_uid: Some(uid),
                ..CgroupIdentity::default()
            };
        } else if let Some((id, runtime)) = container_id(component) {
            identity.container_id = Some(id);
            identity.runtime = runtime.or_else(|| runtime_from_ancestors(path));
        }
    }
    identity
}

/// `pod<uuid>` (cgroupfs), `<anything>-pod<uuid_with_underscores>.slice` (systemd).
fn pod_uid(component: &str) -> Option<String> {
    let name = component.strip_suffix(".slice").unwrap_or(component);
    let at = name.rfind("pod")?;
    if at != 0 && !name[..at].ends_with('-') {
        return None;
    }
    let uid = &name[at + 3..];
    is_uuid(uid).then(|| uid.replace('_', "-").to_ascii_lowercase())
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-' || c == '_',
            _ => c.is_ascii_hexdigit(),
        })
}

/// Prefixes of `<prefix>-<id>.scope` container cgroups.
const SCOPE_PREFIXES: &[(&str, Option<Runtime>)] = &[
    ("cri-containerd", Some(Runtime::Containerd)),
    ("crio", Some(Runtime::CriO)),
    ("docker", Some(Runtime::Docker)),
    ("libpod", Some(Runtime::Podman)),
];

fn container_id(component: &str) -> Option<(String, Option<Runtime>)> {
    let name = component.strip_suffix(".scope").unwrap_or(component);
    if is_container_id(name) {
        return Some((name.to_ascii_lowercase(), None));
    }
    let (prefix, id) = name.rsplit_once('-')?;
    if !is_container_id(id) {
        return None;
    }
    // `crio-conmon-<id>`: CRI-O's monitor process, not the container; `libpod-conmon-<id>` too.
    if prefix.ends_with("conmon") {
        return None;
    }
    let runtime = SCOPE_PREFIXES
        .iter()
        .find(|(p, _)| *p == prefix)
        .and_then(|(_, r)| *r);
    Some((id.to_ascii_lowercase(), runtime))
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A bare id under `/docker/` is docker's (cgroupfs driver); under kubepods it could be any.
fn runtime_from_ancestors(path: &str) -> Option<Runtime> {
    path.split('/')
        .any(|c| c == "docker")
        .then_some(Runtime::Docker)
}

/// The id `bpf_get_current_cgroup_id()` returns for tasks in this cgroup v2 directory: the
/// directory's inode number (the kernfs node id, on 64-bit kernels).
pub fn cgroup_id(dir: &Path) -> std::io::Result<u64> {
    Ok(std::fs::metadata(dir)?.ino())
}

/// `CGROUP2_SUPER_MAGIC`.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Whether `dir` is on a cgroup v2 filesystem (the only kind the kernel filter can match).
pub fn is_cgroup2(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    let Ok(c_path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: a valid NUL-terminated path and a buffer of the right type.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), stat.as_mut_ptr()) };
    // SAFETY: statfs succeeded and filled the buffer. (`f_type`'s width varies by architecture.)
    #[allow(clippy::unnecessary_cast)]
    let is_cgroup2 = rc == 0 && unsafe { stat.assume_init() }.f_type as i64 == CGROUP2_SUPER_MAGIC;
    is_cgroup2
}

/// Where the cgroup v2 hierarchy is mounted, from `/proc/self/mountinfo` content
/// (`/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on hybrid ones).
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        if after.split(' ').next()? != "cgroup2" {
            return None;
        }
        let mount_point = before.split(' ').nth(4)?;
        Some(PathBuf::from(unescape_mountinfo(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The host's cgroup v2 mount point, when there is one.
pub fn host_cgroup2_mount() -> Option<PathBuf> {
    cgroup2_mount(&std::fs::read_to_string("/proc/self/mountinfo").ok()?)
}

/// A cgroup directory found by [`walk`], with what its path names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupDir {
    pub path: PathBuf,
    /// The directory's inode number: its cgroup id on cgroup v2.
    pub id: u64,
    pub identity: CgroupIdentity,
}

/// Every directory under `root` (itself included), at most `max_depth` levels down, with the
/// identity its path (relative to `root`) names. Unreadable directories are skipped.
pub fn walk(root: &Path, max_depth: usize) -> Vec<CgroupDir> {
    let mut out = Vec::new();
    let mut stack = vec![(root.to_path_buf(), 0usize)];
    while let Some((dir, depth)) = stack.pop() {
        let Ok(meta) = std::fs::metadata(&dir) else {
            continue;
        };
        let relative = dir.strip_prefix(root).unwrap_or(&dir);
        out.push(CgroupDir {
            identity: parse_path(&relative.to_string_lossy()),
            id: meta.ino(),
            path: dir.clone(),
        });
        if depth == max_depth {
            continue;
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push((entry.path(), depth + 1));
            }
        }
    }
    out
}

/// The ids of `dir` and of every cgroup below it (the kernel compares a task's own cgroup, so
/// a subtree is selected by listing all of it).
pub fn subtree_ids(dir: &Path) -> std::io::Result<BTreeSet<u64>> {
    let root = cgroup_id(dir)?;
    let mut ids: BTreeSet<u64> = walk(dir, MAX_CGROUP_DEPTH).iter().map(|d| d.id).collect();
    ids.insert(root);
    Ok(ids)
}

/// Deeper than any layout above, nested twice.
pub const MAX_CGROUP_DEPTH: usize = 16;

/// Process ids in a cgroup (`cgroup.procs`; cgroup v1 and v2).
pub fn procs(dir: &Path) -> std::io::Result<Vec<u32>> {
    Ok(std::fs::read_to_string(dir.join("cgroup.procs"))?
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CID: &str = "4a1e3c5b7d9f0a2c4e6b8d0f1a3c5e7b9d1f3a5c7e9b0d2f4a6c8e0b2d4f6a8c";
    const CID2: &str = "9f8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a39281706f5e4d3c2b1a0";
    const NODE: &str = "0b5d2f4e6a8c1e3b5d7f9a0c2e4b6d8f0a1c3e5b7d9f0a2c4e6b8d0f1a3c5e7b";
    const UID: &str = "7c7a5d2e-3c1f-4a8b-9e0d-1f2a3b4c5d6e";
    const UID_: &str = "7c7a5d2e_3c1f_4a8b_9e0d_1f2a3b4c5d6e";

    fn id(container: Option<&str>, runtime: Option<Runtime>, pod: Option<&str>) -> CgroupIdentity {
        CgroupIdentity {
            container_id: container.map(str::to_owned),
            runtime,
            pod_uid: pod.map(str::to_owned),
        }
    }

    #[test]
    fn containerd_systemd_driver_cgroup_v2() {
        let c = parse_proc_cgroup(&format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope\n"
        ));
        assert_eq!(
            c.identity,
            id(Some(CID), Some(Runtime::Containerd), Some(UID))
        );
        assert!(c.unified_path.unwrap().ends_with(".scope"));
        // Guaranteed QoS has no QoS slice.
        let c = parse_proc_cgroup(&format!(
            "0::/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope\n"
        ));
        assert_eq!(
            c.identity,
            id(Some(CID), Some(Runtime::Containerd), Some(UID))
        );
    }

    #[test]
    fn cgroupfs_driver_cgroup_v1_all_hierarchies() {
        let path = format!("/kubepods/besteffort/pod{UID}/{CID}");
        let mut content = String::new();
        for hierarchy in [
            "12:hugetlb:",
            "11:pids:",
            "10:memory:",
            "9:cpu,cpuacct:",
            "8:blkio:",
            "7:devices:",
            "6:freezer:",
            "5:net_cls,net_prio:",
            "4:perf_event:",
            "3:cpuset:",
            "1:name=systemd:",
        ] {
            content.push_str(&format!("{hierarchy}{path}\n"));
        }
        // A hierarchy kubelet does not manage stays at the root.
        content.insert_str(0, "13:rdma:/\n");
        let c = parse_proc_cgroup(&content);
        assert_eq!(c.unified_path, None);
        assert_eq!(c.identity, id(Some(CID), None, Some(UID)));
        // Guaranteed QoS, cgroupfs.
        let c = parse_proc_cgroup(&format!("4:memory:/kubepods/pod{UID}/{CID}\n"));
        assert_eq!(c.identity, id(Some(CID), None, Some(UID)));
    }

    #[test]
    fn hybrid_host_falls_back_to_v1_lines() {
        // systemd in hybrid mode: the unified hierarchy only holds systemd's own tree.
        let content = format!(
            "13:misc:/\n12:memory:/kubepods/burstable/pod{UID}/{CID}\n1:name=systemd:/kubepods/burstable/pod{UID}/{CID}\n0::/\n"
        );
        let c = parse_proc_cgroup(&content);
        assert_eq!(c.unified_path.as_deref(), Some("/"));
        assert_eq!(c.identity, id(Some(CID), None, Some(UID)));
    }

    #[test]
    fn crio_container_and_its_monitor() {
        let c = parse_proc_cgroup(&format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{CID}.scope\n"
        ));
        assert_eq!(c.identity, id(Some(CID), Some(Runtime::CriO), Some(UID)));
        // conmon runs in the pod's slice but is not the container.
        let c = parse_proc_cgroup(&format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-conmon-{CID}.scope\n"
        ));
        assert_eq!(c.identity, id(None, None, Some(UID)));
        // CRI-O with the cgroupfs driver.
        let c = parse_proc_cgroup(&format!("0::/kubepods/burstable/pod{UID}/crio-{CID}\n"));
        assert_eq!(c.identity, id(Some(CID), Some(Runtime::CriO), Some(UID)));
    }

    #[test]
    fn docker_standalone_and_under_kubernetes() {
        assert_eq!(
            parse_proc_cgroup(&format!("0::/system.slice/docker-{CID}.scope\n")).identity,
            id(Some(CID), Some(Runtime::Docker), None)
        );
        assert_eq!(
            parse_proc_cgroup(&format!(
                "11:devices:/docker/{CID}\n3:cpu,cpuacct:/docker/{CID}\n1:name=systemd:/docker/{CID}\n"
            ))
            .identity,
            id(Some(CID), Some(Runtime::Docker), None)
        );
        // cgroup v2 with the cgroupfs driver.
        assert_eq!(
            parse_proc_cgroup(&format!("0::/docker/{CID}\n")).identity,
            id(Some(CID), Some(Runtime::Docker), None)
        );
        // cri-dockerd / dockershim, systemd driver.
        assert_eq!(
            parse_proc_cgroup(&format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/docker-{CID}.scope\n"
            ))
            .identity,
            id(Some(CID), Some(Runtime::Docker), Some(UID))
        );
        // Docker in docker: the inner container.
        assert_eq!(
            parse_path(&format!("/docker/{NODE}/docker/{CID}")),
            id(Some(CID), Some(Runtime::Docker), None)
        );
    }

    #[test]
    fn podman_with_its_container_subgroup() {
        assert_eq!(
            parse_proc_cgroup(&format!(
                "0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID}.scope/container\n"
            ))
            .identity,
            id(Some(CID), Some(Runtime::Podman), None)
        );
        assert_eq!(
            parse_path(&format!("/machine.slice/libpod-conmon-{CID}.scope")),
            id(None, None, None)
        );
    }

    #[test]
    fn systemd_services_and_sessions_are_no_workload() {
        for path in [
            "/",
            "/init.scope",
            "/system.slice/nginx.service",
            "/system.slice/containerd.service",
            "/user.slice/user-1000.slice/session-3.scope",
            "/user.slice/user-1000.slice/user@1000.service/app.slice/app-podman.scope",
            "/kubepods.slice",
            "/kubepods.slice/kubepods-burstable.slice",
            "/system.slice/kubelet.service",
        ] {
            let c = parse_proc_cgroup(&format!("0::{path}\n"));
            assert!(c.identity.is_empty(), "{path}: {:?}", c.identity);
        }
    }

    #[test]
    fn kind_nested_in_docker() {
        // Seen from inside the kind node (private cgroup namespace; kubelet's cgroup root is
        // /kubelet).
        let inside = format!(
            "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope\n"
        );
        assert_eq!(
            parse_proc_cgroup(&inside).identity,
            id(Some(CID), Some(Runtime::Containerd), Some(UID))
        );
        // The same process seen from the host: the node's docker scope comes first.
        let host = format!(
            "0::/system.slice/docker-{NODE}.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope\n"
        );
        assert_eq!(
            parse_proc_cgroup(&host).identity,
            id(Some(CID), Some(Runtime::Containerd), Some(UID))
        );
        // Older kind on cgroup v1 (host cgroup namespace).
        let v1 = format!(
            "12:memory:/docker/{NODE}/kubepods/besteffort/pod{UID}/{CID}\n1:name=systemd:/docker/{NODE}/kubepods/besteffort/pod{UID}/{CID}\n"
        );
        let identity = parse_proc_cgroup(&v1).identity;
        assert_eq!(identity.container_id.as_deref(), Some(CID));
        assert_eq!(identity.pod_uid.as_deref(), Some(UID));
        // A process of the kind node itself (kubelet) is in the node's container, no pod.
        assert_eq!(
            parse_path(&format!(
                "/system.slice/docker-{NODE}.scope/system.slice/kubelet.service"
            )),
            id(Some(NODE), Some(Runtime::Docker), None)
        );
    }

    #[test]
    fn paths_outside_the_readers_cgroup_namespace() {
        // An agent in a private cgroup namespace sees other pods' paths relative to its own.
        let c = parse_proc_cgroup(&format!(
            "0::/../../kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID2}.scope\n"
        ));
        assert_eq!(
            c.identity,
            id(Some(CID2), Some(Runtime::Containerd), Some(UID))
        );
    }

    #[test]
    fn malformed_input_names_nothing() {
        for content in [
            "",
            "garbage",
            "0::",
            "0::/kubepods.slice/kubepods-podnot-a-uid.slice/cri-containerd-xyz.scope",
            // 63 hex digits: not an id.
            &format!("0::/docker/{}", &CID[1..]),
            // A uuid not preceded by `pod` or `-pod`.
            &format!("0::/kubepods/x{UID}/"),
        ] {
            assert!(
                parse_proc_cgroup(content).identity.is_empty(),
                "{content:?}"
            );
        }
    }

    #[test]
    fn uppercase_ids_are_canonicalised() {
        let c = parse_path(&format!(
            "/kubepods/pod{}/{}",
            UID.to_uppercase(),
            CID.to_uppercase()
        ));
        assert_eq!(c, id(Some(CID), None, Some(UID)));
    }

    #[test]
    fn finds_the_cgroup2_mount() {
        let hybrid = "25 24 0:22 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755\n\
                      26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw\n\
                      27 25 0:24 / /sys/fs/cgroup/systemd rw shared:11 - cgroup cgroup rw,name=systemd\n";
        assert_eq!(
            cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            cgroup2_mount(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        let escaped = "30 23 0:26 / /host\\040cg rw shared:4 - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_mount(escaped), Some(PathBuf::from("/host cg")));
        assert_eq!(cgroup2_mount("1 0 0:1 / / rw - ext4 /dev/sda rw\n"), None);
    }

    #[test]
    fn walks_a_cgroup_tree_and_names_each_directory() {
        let root = std::env::temp_dir().join(format!("cgroup-walk-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let pod = root.join(format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice"
        ));
        let container = pod.join(format!("cri-containerd-{CID}.scope"));
        std::fs::create_dir_all(&container).unwrap();
        std::fs::create_dir_all(root.join("system.slice/sshd.service")).unwrap();
        let dirs = walk(&root, MAX_CGROUP_DEPTH);
        assert_eq!(dirs.len(), 7, "{dirs:#?}");
        let found = dirs.iter().find(|d| d.path == container).unwrap();
        assert_eq!(found.id, cgroup_id(&container).unwrap());
        assert_eq!(
            found.identity,
            id(Some(CID), Some(Runtime::Containerd), Some(UID))
        );
        let pod_dir = dirs.iter().find(|d| d.path == pod).unwrap();
        assert_eq!(pod_dir.identity, id(None, None, Some(UID)));
        let ids = subtree_ids(&pod).unwrap();
        assert_eq!(
            ids,
            BTreeSet::from([cgroup_id(&pod).unwrap(), cgroup_id(&container).unwrap()])
        );
        assert_eq!(walk(&root, 1).len(), 3, "depth bound");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
