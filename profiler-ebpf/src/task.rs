//! The sampled task, read through the BTF-typed pointer `bpf_get_current_task_btf` returns.
//!
//! Fields are plain loads at offsets user space took from the kernel's BTF (`CONFIG`): one
//! helper call for the pointer replaces one per field (`bpf_get_current_pid_tgid`,
//! `bpf_get_current_comm`, `bpf_probe_read_kernel` for the thread pointer). On this
//! kernel every helper call costs a mitigated return, and the sampler runs on every tick of
//! every CPU. The offsets are constants of the frozen `.rodata` map, so the verifier checks
//! each load against `task_struct` once, at load time. An offset user space could not find
//! is 0, and that field comes from the helper instead.

use aya_ebpf::helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task_btf};

use crate::config_field;

/// `current`, valid for the program's run.
#[derive(Clone, Copy)]
pub struct Task(*const u8);

impl Task {
    #[inline(always)]
    pub fn current() -> Self {
        Self(unsafe { bpf_get_current_task_btf() } as *const u8)
    }

    /// `tgid << 32 | pid`, as `bpf_get_current_pid_tgid` returns it.
    #[inline(always)]
    pub fn pid_tgid(self) -> u64 {
        let (pid, tgid) = (
            config_field!(task_pid_offset),
            config_field!(task_tgid_offset),
        );
        if pid == 0 || tgid == 0 {
            return bpf_get_current_pid_tgid();
        }
        let pid = unsafe { *(self.0.add(pid as usize) as *const u32) };
        let tgid = unsafe { *(self.0.add(tgid as usize) as *const u32) };
        (u64::from(tgid) << 32) | u64::from(pid)
    }

    /// The thread's name (`comm`, NUL-padded), as `bpf_get_current_comm` copies it.
    #[inline(always)]
    pub fn comm(self) -> [u8; 16] {
        let offset = config_field!(task_comm_offset);
        if offset == 0 {
            return bpf_get_current_comm().unwrap_or([0; 16]);
        }
        // User space sets the offset only when it is 8-byte aligned: two word loads.
        let words = unsafe { *(self.0.add(offset as usize) as *const [u64; 2]) };
        unsafe { core::mem::transmute::<[u64; 2], [u8; 16]>(words) }
    }

    /// When the thread was created (CLOCK_MONOTONIC ns); `None` when the offset is unknown.
    #[inline(always)]
    pub fn start_time(self) -> Option<u64> {
        let offset = config_field!(task_start_time_offset);
        if offset == 0 {
            return None;
        }
        Some(unsafe { *(self.0.add(offset as usize) as *const u64) })
    }

    /// `thread.fsbase`, the x86_64 user thread pointer; `None` when unknown or not set.
    #[inline(always)]
    pub fn thread_pointer(self) -> Option<u64> {
        let offset = config_field!(task_fsbase_offset);
        if offset == 0 {
            return None;
        }
        let fsbase = unsafe { *(self.0.add(offset as usize) as *const u64) };
        (fsbase != 0).then_some(fsbase)
    }

    /// `current` itself, for helpers that take a task.
    #[inline(always)]
    pub fn as_ptr(self) -> *const u8 {
        self.0
    }
}
