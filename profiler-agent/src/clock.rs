//! Kernel timestamps (`bpf_ktime_get_ns`, CLOCK_MONOTONIC) to Unix time.

#[derive(Debug, Clone, Copy)]
pub struct MonotonicToUnix {
    /// Unix time minus monotonic time, in ns, measured once.
    offset_ns: i128,
}

impl MonotonicToUnix {
    pub fn now() -> Self {
        let mono = clock_ns(libc::CLOCK_MONOTONIC);
        let real = clock_ns(libc::CLOCK_REALTIME);
        Self {
            offset_ns: i128::from(real) - i128::from(mono),
        }
    }

    pub fn to_unix(&self, monotonic_ns: u64) -> u64 {
        (i128::from(monotonic_ns) + self.offset_ns).max(0) as u64
    }

    pub fn unix_now(&self) -> u64 {
        clock_ns(libc::CLOCK_REALTIME)
    }
}

/// CPU time (user + system) the calling thread has used, in ns: unlike wall time, it does not
/// count while the thread waits or another thread runs on its CPU.
pub fn thread_cpu_ns() -> u64 {
    clock_ns(libc::CLOCK_THREAD_CPUTIME_ID)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec; these clocks always exist on Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    #[test]
    fn converts_close_to_now() {
        let c = super::MonotonicToUnix::now();
        let mono = super::clock_ns(libc::CLOCK_MONOTONIC);
        let diff = c.to_unix(mono).abs_diff(c.unix_now());
        assert!(diff < 1_000_000_000, "{diff}");
    }
}
