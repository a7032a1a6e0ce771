//! Finding a process's perf map (`/tmp/perf-<pid>.map`, the names of its JIT code; read by
//! `symbolize::perf_map`) and opening it safely.
//!
//! The path is the process's: its own `/tmp` and its pid as it sees itself (in a container,
//! its pid in its pid namespace). The agent is root and the process is not trusted, so the
//! file is opened the way perf guards it, and more: resolved inside the process's root
//! (`openat2` with `RESOLVE_IN_ROOT`, so a symlink there cannot point into the host's files),
//! not through a symlink, without blocking (a FIFO), and only a regular file owned by the
//! process's user or by root is kept.

use std::{
    ffi::CString,
    fs::File,
    os::{
        fd::{AsRawFd as _, FromRawFd as _},
        unix::{
            ffi::OsStrExt as _,
            fs::{MetadataExt as _, OpenOptionsExt as _},
        },
    },
    path::{Path, PathBuf},
};

/// The perf map of the process at `proc_dir` whose own pid is `ns_pid`, open, with its path as
/// the process sees it; `None` when it writes none (or not one the agent may read).
pub(super) fn open(proc_dir: &Path, ns_pid: u32) -> Option<(File, String)> {
    let name = format!("/tmp/perf-{ns_pid}.map");
    let root = File::open(proc_dir.join("root")).ok()?;
    let file = open_in_root(&root, &name[1..])?;
    let meta = file.metadata().ok()?;
    // The process's user: the owner of its /proc directory.
    let owner = std::fs::metadata(proc_dir).ok()?.uid();
    (meta.file_type().is_file() && (meta.uid() == owner || meta.uid() == 0)).then_some((file, name))
}

/// Whether the process seems to write a perf map now: a cheap check before reading its maps.
pub(super) fn exists(proc_dir: &Path, ns_pid: u32) -> bool {
    proc_dir
        .join(format!("root/tmp/perf-{ns_pid}.map"))
        .symlink_metadata()
        .is_ok()
}

fn open_in_root(root: &File, relative: &str) -> Option<File> {
    let path = CString::new(Path::new(relative).as_os_str().as_bytes()).ok()?;
    let flags = libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK;
    // SAFETY: open_how is plain data; zeroed is its documented default.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = flags as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: valid fd, NUL-terminated path, and `how` of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            path.as_ptr(),
            &raw const how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd >= 0 {
        // SAFETY: a descriptor openat2 just returned, owned by nobody else.
        return Some(unsafe { File::from_raw_fd(fd as i32) });
    }
    match std::io::Error::last_os_error().raw_os_error() {
        // No openat2 (before Linux 5.6), or a seccomp profile that refuses it: open the usual
        // way, the last component not followed, and only when no directory on the way is a
        // symlink (which would resolve against the agent's root, not the process's).
        Some(libc::ENOSYS | libc::EPERM) => open_without_symlinks(root, relative, flags),
        _ => None,
    }
}

fn open_without_symlinks(root: &File, relative: &str, flags: i32) -> Option<File> {
    let mut path = PathBuf::from(format!("/proc/self/fd/{}", root.as_raw_fd()));
    let mut components = Path::new(relative).components().peekable();
    while let Some(component) = components.next() {
        path.push(component);
        if components.peek().is_some()
            && !std::fs::symlink_metadata(&path).ok()?.file_type().is_dir()
        {
            return None;
        }
    }
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own_proc_dir() -> std::path::PathBuf {
        std::path::PathBuf::from(format!("/proc/{}", std::process::id()))
    }

    #[test]
    fn opens_the_processs_own_map_and_nothing_through_a_symlink() {
        // A pid no process here has, so no real map collides with the test's.
        let ns_pid = 4_000_000 + std::process::id() % 100_000;
        let path = format!("/tmp/perf-{ns_pid}.map");
        let _ = std::fs::remove_file(&path);
        assert!(open(&own_proc_dir(), ns_pid).is_none(), "no map yet");

        std::os::unix::fs::symlink("/etc/passwd", &path).unwrap();
        assert!(
            open(&own_proc_dir(), ns_pid).is_none(),
            "a symlink is refused"
        );
        std::fs::remove_file(&path).unwrap();

        std::fs::write(&path, "1000 10 jitted\n").unwrap();
        let (file, name) = open(&own_proc_dir(), ns_pid).expect("a regular map");
        assert_eq!(name, path);
        assert_eq!(file.metadata().unwrap().len(), 15);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn symlinks_resolve_inside_the_processs_root() {
        let root = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        std::fs::write(elsewhere.path().join("perf-7.map"), "1000 10 host\n").unwrap();
        let root_dir = File::open(root.path()).unwrap();
        // An absolute symlink to the host's directory: looked for under the root instead.
        std::os::unix::fs::symlink(elsewhere.path(), root.path().join("tmp")).unwrap();
        assert!(open_in_root(&root_dir, "tmp/perf-7.map").is_none());
        // An absolute symlink to a directory of the root: followed there.
        std::fs::remove_file(root.path().join("tmp")).unwrap();
        std::os::unix::fs::symlink("/realtmp", root.path().join("tmp")).unwrap();
        std::fs::create_dir(root.path().join("realtmp")).unwrap();
        std::fs::write(root.path().join("realtmp/perf-7.map"), "1000 10 in root\n").unwrap();
        let file = open_in_root(&root_dir, "tmp/perf-7.map").expect("the map in the root");
        assert_eq!(file.metadata().unwrap().len(), 16);
    }

    #[test]
    fn the_fallback_open_refuses_symlinks_on_the_way() {
        let root = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        std::fs::write(elsewhere.path().join("perf-7.map"), "1000 10 f\n").unwrap();
        let flags = libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK;
        let root_dir = File::open(root.path()).unwrap();
        // `tmp` a symlink out of the root: refused.
        std::os::unix::fs::symlink(elsewhere.path(), root.path().join("tmp")).unwrap();
        assert!(open_without_symlinks(&root_dir, "tmp/perf-7.map", flags).is_none());
        // A real directory: opened; the map itself a symlink: refused.
        std::fs::remove_file(root.path().join("tmp")).unwrap();
        std::fs::create_dir(root.path().join("tmp")).unwrap();
        std::fs::write(root.path().join("tmp/perf-7.map"), "1000 10 f\n").unwrap();
        assert!(open_without_symlinks(&root_dir, "tmp/perf-7.map", flags).is_some());
        std::os::unix::fs::symlink(
            elsewhere.path().join("perf-7.map"),
            root.path().join("tmp/perf-8.map"),
        )
        .unwrap();
        assert!(open_without_symlinks(&root_dir, "tmp/perf-8.map", flags).is_none());
    }
}
