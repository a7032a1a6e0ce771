//! Kernel side of the profiler.
//!
//! - `on_cpu_sample` (perf_event, software cpu-clock on every online CPU): filter (idle, self,
//!   cgroup allow-list, pid allow-list), capture the user and kernel stacks into a per-CPU
//!   scratch record and append it, with its real length, to the CPU's batch of samples
//!   (`staging`), which goes to the ring buffer every few ticks (at once, waking the agent, for
//!   a new process the agent has not inspected yet).
//! - `on_process_exec` / `on_process_exit` (sched tracepoints): process lifecycle records in the
//!   same ring buffer, after their CPU's staged samples.
//!
//! Every outcome that loses or skips something increments a per-CPU counter.
#![no_std]
#![no_main]

use arch::UserContext;
use aya_ebpf::{
    EbpfContext, Global,
    bindings::BPF_F_USER_STACK,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_smp_processor_id, bpf_get_stack, bpf_ktime_get_ns, bpf_probe_read_user,
    },
    macros::{map, perf_event, tracepoint},
    maps::{Array, HashMap, PerCpuArray, ProgramArray, RingBuf},
    programs::{PerfEventContext, TracePointContext},
};
use profiler_common::{
    CONTEXT_READ_TIMING_EVERY, CONTEXT_SOURCE_SLOTS, ContextKind, ContextReader, ContextSource,
    ContextSourceSlot, Counter, EbpfConfig, MAX_CONTEXT_BYTES, MAX_FILTERED_CGROUPS, NUM_COUNTERS,
    ProcessEvent, RecordKind, STACK_BYTES, SampleHeader, SampleScratch, URGENT_THREAD_AGE_NS,
    sample_flags,
};
use task::Task;

mod arch;
mod context;
mod staging;
mod task;
mod unwind;

/// Load-time settings; user space overrides this before load.
#[unsafe(no_mangle)]
static CONFIG: Global<EbpfConfig> = Global::new(EbpfConfig {
    agent_tgid: 0,
    filter_by_pid: 0,
    exit_group_dead_offset: 0,
    task_fsbase_offset: 0,
    obi_enabled: 0,
    filter_by_cgroup: 0,
    task_pid_offset: 0,
    task_tgid_offset: 0,
    task_comm_offset: 0,
    staging_flush_ticks: 1,
    staging_flush_bytes: 0,
    task_start_time_offset: 0,
});

/// A field of `CONFIG`, loaded where it is used. The verifier knows a load from the frozen,
/// read-only `.rodata` map as a constant, which an offset into a BTF-typed pointer must be; a
/// copy of the whole struct through the stack loses that.
macro_rules! config_field {
    ($field:ident) => {
        unsafe {
            core::ptr::read_volatile(core::ptr::addr_of!(
                (*(&raw const crate::CONFIG).cast::<profiler_common::EbpfConfig>()).$field
            ))
        }
    };
}
pub(crate) use config_field;

/// Size is set by user space at load time (`EbpfLoader::map_max_entries`).
#[map]
pub(crate) static EVENTS: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NUM_COUNTERS as u32, 0);

#[map]
static SCRATCH: PerCpuArray<SampleScratch> = PerCpuArray::with_max_entries(1, 0);

/// Allow-list of tgids, used when `CONFIG.filter_by_pid` is set.
#[map]
static PID_FILTER: HashMap<u32, u8> = HashMap::with_max_entries(4096, 0);

/// Allow-list of cgroup v2 ids (the workload filter), used when `CONFIG.filter_by_cgroup` is set.
#[map]
static CGROUP_FILTER: HashMap<u64, u8> = HashMap::with_max_entries(MAX_FILTERED_CGROUPS, 0);

/// Trace-context source per process (key: tgid), chosen and written by the agent.
#[map]
static CONTEXT_SOURCES: HashMap<u32, ContextSource> = HashMap::with_max_entries(16384, 0);

/// `CONTEXT_SOURCES` by `tgid % CONTEXT_SOURCE_SLOTS`, written by the agent with it.
#[map(name = "CONTEXT_SOURCE_SLOTS")]
static CONTEXT_SOURCE_SLOTS_MAP: Array<ContextSourceSlot> =
    Array::with_max_entries(CONTEXT_SOURCE_SLOTS, 0);

/// Label readers by `ContextReader`, for tail calls from the sampler; filled by user space.
#[map]
static CONTEXT_READERS: ProgramArray = ProgramArray::with_max_entries(8, 0);

#[inline(always)]
pub(crate) fn count(counter: Counter) {
    add(counter, 1);
}

/// Increments `counter` and returns its previous value on this CPU.
#[inline(always)]
fn bump(counter: Counter) -> u64 {
    match COUNTERS.get_ptr_mut(counter as u32) {
        Some(slot) => unsafe {
            let previous = *slot;
            *slot = previous + 1;
            previous
        },
        None => 0,
    }
}

#[inline(always)]
pub(crate) fn add(counter: Counter, n: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // Per-CPU slot, and a perf_event program cannot nest on its own CPU: no atomics needed.
        unsafe { *slot += n };
    }
}

#[perf_event]
pub fn on_cpu_sample(ctx: PerfEventContext) -> u32 {
    count(Counter::Invocations);
    if !sample(&ctx) {
        staging::tick_without_sample();
    }
    0
}

/// Whether the tick's sample went to staging (a tail call to a context reader does not return
/// here: the reader stages it).
#[inline(always)]
fn sample(ctx: &PerfEventContext) -> bool {
    let config = CONFIG.load();
    let task = Task::current();
    let pid_tgid = task.pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let tid = pid_tgid as u32;
    if tid == 0 {
        count(Counter::SkippedIdle);
        return false;
    }
    if tgid == config.agent_tgid {
        count(Counter::SkippedSelf);
        return false;
    }
    // The workload filter: one helper call and one lookup, before any stack walk or context read.
    if config.filter_by_cgroup != 0 {
        let cgroup = unsafe { bpf_get_current_cgroup_id() };
        if unsafe { CGROUP_FILTER.get(cgroup) }.is_none() {
            count(Counter::SkippedCgroup);
            return false;
        }
    }
    if config.filter_by_pid != 0 && unsafe { PID_FILTER.get(tgid) }.is_none() {
        count(Counter::SkippedFiltered);
        return false;
    }
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        count(Counter::ScratchUnavailable);
        return false;
    };
    let scratch = unsafe { &mut *scratch };
    let mut flags = 0u16;

    // User stack first, at the start of the data area.
    let (user_bytes, user_sp) = match arch::user_context(ctx, task) {
        UserContext::Native(regs) => (
            unwind::walk_frame_pointers(&regs, scratch.data.as_mut_ptr().cast()),
            Some(regs.sp),
        ),
        UserContext::Compat { sp } => {
            let ret = unsafe {
                bpf_get_stack(
                    ctx.as_ptr(),
                    scratch.data.as_mut_ptr().cast(),
                    STACK_BYTES as u32,
                    BPF_F_USER_STACK as u64,
                )
            };
            if ret < 0 {
                flags |= sample_flags::USER_STACK_ERROR;
                count(Counter::UserStackError);
                (0, None)
            } else {
                (ret as usize, Some(sp))
            }
        }
        // A kernel thread: no user stack.
        UserContext::None => (0, None),
    };
    // The mask keeps the value provably within [0, STACK_BYTES] for the verifier.
    let user_bytes = user_bytes & STACK_MASK;
    if user_bytes == STACK_BYTES {
        flags |= sample_flags::USER_STACK_TRUNCATED;
        count(Counter::UserStackTruncated);
    }

    // The word at the user stack pointer: where the interrupted function has pushed nothing
    // (a leaf without a frame, assembly, a first instruction, a libc system-call wrapper), its
    // return address, which the frame-pointer walk skips. User space decides from the
    // binary's unwind tables.
    let mut user_stack_top = 0u64;
    if user_bytes > 0
        && let Some(sp) = user_sp
        && let Ok(word) = unsafe { bpf_probe_read_user(sp as *const u64) }
    {
        user_stack_top = word;
        flags |= sample_flags::USER_STACK_TOP;
    }

    // Kernel stack right after the user frames; only when the tick interrupted kernel code
    // (in user mode it is empty, and walking it still costs).
    let mut kernel_bytes = 0usize;
    if arch::interrupted_kernel_mode(ctx) {
        let kernel_ret = unsafe {
            bpf_get_stack(
                ctx.as_ptr(),
                scratch.data.as_mut_ptr().add(user_bytes).cast(),
                STACK_BYTES as u32,
                0,
            )
        };
        if kernel_ret < 0 {
            flags |= sample_flags::KERNEL_STACK_ERROR;
            count(Counter::KernelStackError);
        } else {
            kernel_bytes = (kernel_ret as usize) & STACK_MASK;
            if kernel_bytes == STACK_BYTES {
                flags |= sample_flags::KERNEL_STACK_TRUNCATED;
                count(Counter::KernelStackTruncated);
            }
        }
    }

    let header = &mut scratch.header;
    header.kind = RecordKind::Sample as u16;
    header.flags = flags;
    header.cpu = unsafe { bpf_get_smp_processor_id() };
    header.tgid = tgid;
    header.tid = tid;
    header.ktime_ns = unsafe { bpf_ktime_get_ns() };
    header.comm = task.comm();
    header.user_frames = (user_bytes / 8) as u16;
    header.kernel_frames = (kernel_bytes / 8) as u16;
    header.context_kind = ContextKind::None as u8;
    header._pad = 0;
    header.context_len = 0;
    header.user_stack_top = user_stack_top;

    // Trace context right after the frames. The OTEP 4947 thread context, the native case and
    // a short read, is read here: a tail call and the second look-up of the source cost more
    // than the read itself on a cold cache. Label-based sources are read by a program of
    // their own each (verified on its own, which keeps every program within the verifier's
    // limits). A failed tail call falls through: the sample goes out without the process's
    // own context.
    let mut urgent = false;
    match context_source(tgid) {
        Verdict::Source(source) if source.reader == ContextReader::ThreadContext as u8 => {
            let dest = unsafe { scratch.data.as_mut_ptr().add(user_bytes + kernel_bytes) };
            let thread_pointer = task.thread_pointer();
            let (kind, len) = timed_context_read(|| {
                context::read_thread_context(&source.tls, thread_pointer, dest)
            });
            finish_sample(scratch, pid_tgid, &config, kind, len, false);
            return true;
        }
        Verdict::Source(source) => unsafe {
            CONTEXT_READERS.tail_call(ctx, u32::from(source.reader))
        },
        Verdict::NoSource => count(Counter::ContextNoSource),
        Verdict::Uninspected => {
            count(Counter::ContextNoSource);
            // A process new to the agent, which names its frames from the process's mappings
            // and learns its context source by inspecting it: both need the process alive. A
            // staged sample would reach the agent a batch later, after a short-lived process
            // is gone. Kernel threads have no mappings to read.
            if user_bytes > 0
                && task.start_time().is_some_and(|start| {
                    scratch.header.ktime_ns.wrapping_sub(start) < URGENT_THREAD_AGE_NS
                })
            {
                count(Counter::SamplesOfUninspectedProcesses);
                urgent = true;
            }
        }
    }
    finish_sample(scratch, pid_tgid, &config, ContextKind::None, 0, urgent);
    true
}

/// What the agent has said of a process's trace-context source.
enum Verdict {
    Source(ContextSource),
    /// Inspected, and it has none.
    NoSource,
    /// Not inspected yet.
    Uninspected,
}

/// The agent's verdict on process `tgid`: from its slot when the slot is the process's, else
/// from the hash.
#[inline(always)]
fn context_source(tgid: u32) -> Verdict {
    let verdict = |source: ContextSource| {
        if source.reader != 0 {
            Verdict::Source(source)
        } else {
            Verdict::NoSource
        }
    };
    if let Some(slot) = CONTEXT_SOURCE_SLOTS_MAP.get(tgid % CONTEXT_SOURCE_SLOTS) {
        // The owner before the source, both volatile so that they stay in that order: user
        // space writes the owner last (see `ContextSourceSlot`).
        let owner = unsafe { core::ptr::read_volatile(&slot.tgid) };
        if owner == tgid {
            return verdict(unsafe { core::ptr::read_volatile(&slot.source) });
        }
    }
    match unsafe { CONTEXT_SOURCES.get(tgid) } {
        Some(source) => verdict(*source),
        None => Verdict::Uninspected,
    }
}

/// Runs one context read, counting the attempt; one attempt in `CONTEXT_READ_TIMING_EVERY` on
/// each CPU is also timed (`context_read_ns`, `context_reads_timed`): timing every read cost
/// two clock reads per sample, a few percent of the sampler's whole run.
#[inline(always)]
fn timed_context_read(read: impl FnOnce() -> (ContextKind, usize)) -> (ContextKind, usize) {
    let attempt = bump(Counter::ContextReadAttempts);
    let timed = attempt.is_multiple_of(CONTEXT_READ_TIMING_EVERY);
    let start = if timed {
        unsafe { bpf_ktime_get_ns() }
    } else {
        0
    };
    let result = read();
    if timed {
        add(
            Counter::ContextReadNs,
            unsafe { bpf_ktime_get_ns() } - start,
        );
        count(Counter::ContextReadsTimed);
    }
    result
}

/// Appends OBI's context when none was found (lowest precedence), then stages the record;
/// `urgent`: writes the CPU's batch to the ring now and wakes the agent.
#[inline(always)]
pub(crate) fn finish_sample(
    scratch: &mut SampleScratch,
    pid_tgid: u64,
    config: &EbpfConfig,
    mut context_kind: ContextKind,
    mut context_len: usize,
    urgent: bool,
) {
    let frames =
        (usize::from(scratch.header.user_frames) + usize::from(scratch.header.kernel_frames)) * 8;
    if frames > 2 * STACK_BYTES || context_len > MAX_CONTEXT_BYTES {
        return;
    }
    if context_len == 0 && config.obi_enabled != 0 {
        let dest = unsafe { scratch.data.as_mut_ptr().add(frames) };
        (context_kind, context_len) = context::read_obi(pid_tgid, dest);
    }
    scratch.header.context_kind = context_kind as u8;
    scratch.header.context_len = context_len as u16;
    let len = core::mem::size_of::<SampleHeader>() + frames + context_len;
    if len > core::mem::size_of::<SampleScratch>() {
        return;
    }
    staging::stage((scratch as *const SampleScratch).cast::<u8>(), len, urgent);
}

/// Tail-call target for every context source: reads the context of the sampled thread into
/// the scratch record the sampler prepared, then emits it.
#[inline(always)]
fn read_context_and_finish(
    reader: impl Fn(&ContextSource, Option<u64>, *mut u8, context::Workspace) -> (ContextKind, usize),
) -> u32 {
    let config = CONFIG.load();
    let task = Task::current();
    let pid_tgid = task.pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    let scratch = unsafe { &mut *scratch };
    let frames =
        (usize::from(scratch.header.user_frames) + usize::from(scratch.header.kernel_frames)) * 8;
    if frames > 2 * STACK_BYTES {
        return 0;
    }
    let (kind, len) = match context_source(tgid) {
        Verdict::Source(source) => {
            let dest = unsafe { scratch.data.as_mut_ptr().add(frames) };
            let work = context::Workspace {
                cursor: context::Cursor(&raw mut scratch.cursor),
                go_labels: &raw mut scratch.go_labels,
            };
            let thread_pointer = task.thread_pointer();
            timed_context_read(|| reader(&source, thread_pointer, dest, work))
        }
        Verdict::NoSource | Verdict::Uninspected => (ContextKind::None, 0),
    };
    finish_sample(scratch, pid_tgid, &config, kind, len, false);
    0
}

#[perf_event]
pub fn read_custom_labels(_ctx: PerfEventContext) -> u32 {
    read_context_and_finish(|source, thread_pointer, dest, work| {
        context::read_custom_labels(&source.tls, thread_pointer, dest, work.cursor)
    })
}

#[perf_event]
pub fn read_go_labels_map(_ctx: PerfEventContext) -> u32 {
    read_context_and_finish(|source, thread_pointer, dest, work| {
        context::read_go_labels(source, thread_pointer, dest, work, false)
    })
}

#[perf_event]
pub fn read_go_labels_slice(_ctx: PerfEventContext) -> u32 {
    read_context_and_finish(|source, thread_pointer, dest, work| {
        context::read_go_labels(source, thread_pointer, dest, work, true)
    })
}

/// `STACK_BYTES` (1016) is `0b11_1111_1000`: masking keeps every multiple of 8 up to it.
const STACK_MASK: usize = 0x3f8;
const _: () = assert!(STACK_MASK == STACK_BYTES);

#[tracepoint]
pub fn on_process_exec(_ctx: TracePointContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    forget_context_source(tgid);
    emit_process_event(RecordKind::ProcessExec, tgid);
    0
}

/// Drops the agent's verdict on a process whose image was just replaced: the old image's
/// source (its TLS offsets would be read in the new image's memory) or its "none". Until the
/// agent inspects the new image, its samples are a new process's (see `Verdict::Uninspected`).
/// The agent hears of the exec only at its next drain, which on a busy ring can be seconds
/// later. It writes a slot only after emptying it, so a slot emptied here is never half
/// written.
#[inline(always)]
fn forget_context_source(tgid: u32) {
    let _ = CONTEXT_SOURCES.remove(tgid);
    if let Some(slot) = CONTEXT_SOURCE_SLOTS_MAP.get_ptr_mut(tgid % CONTEXT_SOURCE_SLOTS) {
        unsafe {
            if core::ptr::read_volatile(&(*slot).tgid) == tgid {
                core::ptr::write_volatile(&mut (*slot).tgid, 0);
            }
        }
    }
}

#[tracepoint]
pub fn on_process_exit(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let offset = CONFIG.load().exit_group_dead_offset;
    let process_gone = if offset != 0 {
        unsafe { ctx.read_at::<u8>(offset as usize) }.unwrap_or(0) != 0
    } else {
        tgid == pid_tgid as u32
    };
    if process_gone {
        emit_process_event(RecordKind::ProcessExit, tgid);
    }
    0
}

/// `struct syscall_trace_enter`: the syscall number, then `args[6]` as unsigned longs.
const SYSCALL_ARG0_OFFSET: usize = 16;
const PROT_EXEC: u64 = 4;

/// A file mapped executable: a library loaded after start-up (dlopen). The agent re-inspects
/// the process (new trace-context writers, new mappings).
#[tracepoint]
pub fn on_mmap(ctx: TracePointContext) -> u32 {
    let prot = unsafe { ctx.read_at::<u64>(SYSCALL_ARG0_OFFSET + 2 * 8) }.unwrap_or(0);
    let fd = unsafe { ctx.read_at::<u64>(SYSCALL_ARG0_OFFSET + 4 * 8) }.unwrap_or(u64::MAX) as i64;
    if prot & PROT_EXEC != 0 && fd >= 0 {
        count(Counter::MmapExecEvents);
        let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        emit_process_event(RecordKind::ProcessMmapExec, tgid);
    }
    0
}

#[inline(always)]
fn emit_process_event(kind: RecordKind, tgid: u32) {
    if kind != RecordKind::ProcessMmapExec {
        staging::flush_this_cpu();
    }
    let Some(mut entry) = EVENTS.reserve::<ProcessEvent>(0) else {
        count(Counter::ProcessEventsLost);
        return;
    };
    entry.write(ProcessEvent {
        kind: kind as u16,
        _pad: 0,
        tgid,
        ktime_ns: unsafe { bpf_ktime_get_ns() },
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    });
    entry.submit(0);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
