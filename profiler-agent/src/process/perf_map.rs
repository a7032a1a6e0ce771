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
        unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    },
    path::Path,
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
    if fd < 0 {
        return None;
    }
    // SAFETY: a descriptor openat2 just returned, owned by nobody else.
    Some(unsafe { File::from_raw_fd(fd as i32) })
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
}
