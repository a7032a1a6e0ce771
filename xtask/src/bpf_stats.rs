//! Reads a BPF program's run statistics and a per-CPU array's values with the bpf(2) syscall and
//! `/proc/self/fdinfo`, without starting a process. A bpftool run inside a measured window is a
//! new process that the profiler under test samples, inspects and symbolizes: its cost would be
//! counted as the profiler's steady state.

use std::{
    fs,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use anyhow::{Context as _, anyhow, bail};

use crate::bench::{ProgStats, parse_cpu_list};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;

/// `union bpf_attr` as the `*_GET_FD_BY_ID` commands read it.
#[repr(C)]
struct GetFdById {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

/// `union bpf_attr` as `BPF_MAP_LOOKUP_ELEM` reads it.
#[repr(C)]
struct MapElem {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, properly laid out `bpf_attr` prefix of the size passed.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn fd_by_id(cmd: libc::c_long, id: u32, what: &str) -> anyhow::Result<OwnedFd> {
    let mut attr = GetFdById {
        id,
        next_id: 0,
        open_flags: 0,
    };
    let fd = bpf(cmd, &mut attr).with_context(|| format!("open BPF {what} {id}"))?;
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A program, opened by id; its statistics are read from this process's fdinfo.
pub struct Prog {
    fd: OwnedFd,
}

impl Prog {
    pub fn open(id: u32) -> anyhow::Result<Self> {
        Ok(Self {
            fd: fd_by_id(BPF_PROG_GET_FD_BY_ID, id, "program")?,
        })
    }

    /// Cumulative run time and count (kept while `kernel.bpf_stats_enabled` is 1).
    pub fn stats(&self) -> anyhow::Result<ProgStats> {
        let path = format!("/proc/self/fdinfo/{}", self.fd.as_raw_fd());
        parse_fdinfo_stats(&fs::read_to_string(&path).with_context(|| format!("read {path}"))?)
    }
}

/// `run_time_ns:` and `run_cnt:` of a program's fdinfo.
pub fn parse_fdinfo_stats(fdinfo: &str) -> anyhow::Result<ProgStats> {
    let field = |key: &str| {
        fdinfo_value(fdinfo, key)
            .ok_or_else(|| anyhow!("no {key} in the program's fdinfo (kernel older than 5.1?)"))
    };
    Ok(ProgStats {
        run_time_ns: field("run_time_ns")?,
        run_cnt: field("run_cnt")?,
    })
}

/// The number after `key:` in a `/proc/<pid>/fdinfo/<fd>` file (`prog_id:\t42`).
pub fn fdinfo_value(fdinfo: &str, key: &str) -> Option<u64> {
    fdinfo.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        (k.trim() == key).then(|| v.trim().parse().ok())?
    })
}

/// A per-CPU array of u64 counters, opened by id.
pub struct PerCpuCounters {
    fd: OwnedFd,
    /// The kernel copies one value per possible CPU.
    possible_cpus: usize,
}

impl PerCpuCounters {
    pub fn open(id: u32) -> anyhow::Result<Self> {
        let possible = fs::read_to_string("/sys/devices/system/cpu/possible")
            .context("read /sys/devices/system/cpu/possible")?;
        Ok(Self {
            fd: fd_by_id(BPF_MAP_GET_FD_BY_ID, id, "map")?,
            possible_cpus: parse_cpu_list(possible.trim())? as usize,
        })
    }

    /// Slot `key` summed over every CPU.
    pub fn sum(&self, key: u32) -> anyhow::Result<u64> {
        if self.possible_cpus == 0 {
            bail!("no possible CPUs");
        }
        let mut values = vec![0u64; self.possible_cpus];
        let mut attr = MapElem {
            map_fd: self.fd.as_raw_fd() as u32,
            _pad: 0,
            key: &key as *const u32 as u64,
            value: values.as_mut_ptr() as u64,
            flags: 0,
        };
        bpf(BPF_MAP_LOOKUP_ELEM, &mut attr).with_context(|| format!("look up slot {key}"))?;
        Ok(values.iter().sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_run_statistics_from_fdinfo() {
        let fdinfo = "pos:\t0\nflags:\t02000002\nprog_type:\t7\nprog_jited:\t1\n\
                      prog_tag:\tabc\nmemlock:\t4096\nprog_id:\t42\nrun_time_ns:\t123456\n\
                      run_cnt:\t78\nrecursion_misses:\t0\n";
        assert_eq!(
            parse_fdinfo_stats(fdinfo).unwrap(),
            ProgStats {
                run_time_ns: 123_456,
                run_cnt: 78
            }
        );
        assert!(parse_fdinfo_stats("prog_id:\t42\n").is_err());
    }
}
