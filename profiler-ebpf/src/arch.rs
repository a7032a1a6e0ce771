//! Architecture-specific reads of the interrupted context. x86_64 only for now.

use aya_ebpf::{EbpfContext, programs::PerfEventContext};

use crate::task::Task;

/// Byte offset of `cs` in x86_64 `struct pt_regs`, which starts `struct bpf_perf_event_data`.
/// This is UAPI (`arch/x86/include/uapi/asm/ptrace.h`), stable across kernels.
const PT_REGS_CS_OFFSET: usize = 17 * 8;
/// Byte offset of `sp` in the same `struct pt_regs`.
pub(crate) const PT_REGS_SP_OFFSET: usize = 19 * 8;

/// True when the sampled CPU was running kernel code (the ring-3 bits of CS are clear).
#[inline(always)]
pub fn interrupted_kernel_mode(ctx: &PerfEventContext) -> bool {
    // The perf_event context is readable directly: the verifier allows loads from pt_regs.
    let cs = unsafe {
        *(ctx.as_ptr() as *const u8)
            .add(PT_REGS_CS_OFFSET)
            .cast::<u64>()
    };
    cs & 3 == 0
}

/// The user stack pointer of the sampled task. When the tick interrupted user code it is in
/// the context; in kernel mode (a system call, or an interrupt's work on its way back to user
/// code) the context holds kernel registers, and the user ones are at the top of the task's
/// kernel stack.
#[inline(always)]
pub fn user_stack_pointer(ctx: &PerfEventContext, task: Task) -> Option<u64> {
    if !interrupted_kernel_mode(ctx) {
        return Some(unsafe {
            *(ctx.as_ptr() as *const u8)
                .add(PT_REGS_SP_OFFSET)
                .cast::<u64>()
        });
    }
    task.saved_user_stack_pointer()
}
