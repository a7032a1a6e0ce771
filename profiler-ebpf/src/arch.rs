//! Architecture-specific reads of the interrupted context. x86_64 only for now.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_probe_read_kernel, bpf_task_pt_regs},
    programs::PerfEventContext,
};

use crate::task::Task;

/// Byte offsets in x86_64 `struct pt_regs`, which starts `struct bpf_perf_event_data`. This is
/// UAPI (`arch/x86/include/uapi/asm/ptrace.h`), stable across kernels.
const PT_REGS_BP_OFFSET: usize = 4 * 8;
const PT_REGS_IP_OFFSET: usize = 16 * 8;
const PT_REGS_CS_OFFSET: usize = 17 * 8;
const PT_REGS_SP_OFFSET: usize = 19 * 8;

/// `__USER_CS`: the code segment of 64-bit user code (`__USER32_CS`, 0x23, is 32-bit code).
const USER64_CS: u64 = 0x33;

/// The part of `struct pt_regs` from `bp` to `sp`, read in one copy from a task's kernel stack.
#[repr(C)]
struct SavedRegisters {
    bp: u64,
    _between: [u64; 11],
    ip: u64,
    cs: u64,
    _flags: u64,
    sp: u64,
}
const _: () =
    assert!(core::mem::size_of::<SavedRegisters>() == PT_REGS_SP_OFFSET + 8 - PT_REGS_BP_OFFSET);

/// The interrupted user code's registers that start a stack walk.
pub struct UserRegisters {
    pub ip: u64,
    /// The frame pointer (`rbp`).
    pub bp: u64,
    pub sp: u64,
}

/// What user code the sampled task was running.
pub enum UserContext {
    /// 64-bit user code: walked by `unwind::walk_frame_pointers`.
    Native(UserRegisters),
    /// 32-bit (compat) user code, whose frames the kernel's walker knows: the stack pointer
    /// only.
    Compat { sp: u64 },
    /// None: a kernel thread, or registers that could not be read.
    None,
}

/// True when the sampled CPU was running kernel code (the ring-3 bits of CS are clear).
#[inline(always)]
pub fn interrupted_kernel_mode(ctx: &PerfEventContext) -> bool {
    // The perf_event context is readable directly: the verifier allows loads from pt_regs.
    context_register(ctx, PT_REGS_CS_OFFSET) & 3 == 0
}

#[inline(always)]
fn context_register(ctx: &PerfEventContext, offset: usize) -> u64 {
    unsafe { *(ctx.as_ptr() as *const u8).add(offset).cast::<u64>() }
}

/// The sampled task's user registers. When the tick interrupted user code they are in the
/// context; in kernel mode (a system call, or an interrupt's work on its way back to user
/// code) the context holds kernel registers, and the user ones are at the top of the task's
/// kernel stack, where it entered the kernel. A kernel thread has zeros there.
#[inline(always)]
pub fn user_context(ctx: &PerfEventContext, task: Task) -> UserContext {
    let (ip, bp, cs, sp) = if interrupted_kernel_mode(ctx) {
        let regs = unsafe { bpf_task_pt_regs(task.as_ptr() as *mut _) } as *const u8;
        if regs.is_null() {
            return UserContext::None;
        }
        // A helper rather than loads: the compiler would otherwise share one load instruction
        // between this pointer and the perf context, which the verifier refuses.
        let Ok(saved) = (unsafe {
            bpf_probe_read_kernel(regs.add(PT_REGS_BP_OFFSET).cast::<SavedRegisters>())
        }) else {
            return UserContext::None;
        };
        (saved.ip, saved.bp, saved.cs, saved.sp)
    } else {
        (
            context_register(ctx, PT_REGS_IP_OFFSET),
            context_register(ctx, PT_REGS_BP_OFFSET),
            context_register(ctx, PT_REGS_CS_OFFSET),
            context_register(ctx, PT_REGS_SP_OFFSET),
        )
    };
    if cs & 3 != 3 {
        UserContext::None
    } else if cs == USER64_CS {
        UserContext::Native(UserRegisters { ip, bp, sp })
    } else {
        UserContext::Compat { sp }
    }
}
