//! Per-CPU staging of samples. Writing a record to the ring buffer costs about as much for one
//! sample as for eight: the ring's lock and producer position are shared by every CPU and
//! cold again at each tick, and the commit waits for them. So each CPU appends its samples to
//! its own `STAGING` value and writes them to the ring as one batch every
//! `CONFIG.staging_flush_ticks` ticks (or when `CONFIG.staging_flush_bytes` are staged). A
//! sample of a new process the agent has not inspected yet sends the batch at once and wakes
//! the agent: it must read the process's mappings before a short-lived process is gone.
//!
//! Ordering: a process's exec and exit events write their CPU's batch first, so its samples on
//! that CPU come before them; samples staged on other CPUs may come after, and user space
//! orders them by time. At stop, user space reads what is still staged.
//!
//! A perf_event program does not nest inside another eBPF program on its CPU (the kernel's
//! `bpf_prog_active`), so the tracepoint programs and the sampler never write one CPU's
//! staging at the same time.

use aya_ebpf::{helpers::generated::bpf_probe_read_kernel, macros::map, maps::PerCpuArray};
use profiler_common::{
    Counter, MAX_SAMPLE_BYTES, RecordKind, STAGING_APPEND_LIMIT, STAGING_BYTES, SampleBatchHeader,
    SampleStaging,
};

use crate::{EVENTS, add, config_field, count};

#[map]
static STAGING: PerCpuArray<SampleStaging> = PerCpuArray::with_max_entries(1, 0);

/// Samples are consumed in batches on a timer: the reader is woken only for an urgent batch.
const QUIET: u64 = aya_ebpf::bindings::BPF_RB_NO_WAKEUP as u64;
const WAKE: u64 = aya_ebpf::bindings::BPF_RB_FORCE_WAKEUP as u64;

/// Appends the `len` bytes of an assembled sample at `sample` to this CPU's batch, and writes
/// the batch to the ring when it is due, or at once, waking the reader, when `urgent`.
#[inline(always)]
pub(crate) fn stage(sample: *const u8, len: usize, urgent: bool) {
    let Some(staging) = STAGING.get_ptr_mut(0) else {
        count(Counter::ScratchUnavailable);
        return;
    };
    let staging = unsafe { &mut *staging };
    if len > MAX_SAMPLE_BYTES {
        // Never with the sampler's lengths; the bound is what the verifier needs.
        count(Counter::ScratchUnavailable);
        return;
    }
    let mut used = staging.used as usize;
    if used > STAGING_APPEND_LIMIT {
        // Not with the flush sizes user space sets; the bound is also what the verifier needs.
        flush(staging, QUIET);
        used = 0;
    }
    let copied = unsafe {
        bpf_probe_read_kernel(
            staging.samples.as_mut_ptr().add(used).cast(),
            len as u32,
            sample.cast(),
        )
    };
    if copied < 0 {
        count(Counter::ScratchUnavailable);
        return;
    }
    if staging.batch.samples == 0 {
        staging.ticks = 0;
    }
    staging.batch.samples += 1;
    staging.ticks += 1;
    staging.used = ((used + len + 7) & !7) as u32;
    if urgent {
        flush(staging, WAKE);
    } else if staging.ticks >= config_field!(staging_flush_ticks)
        || staging.used >= config_field!(staging_flush_bytes)
    {
        flush(staging, QUIET);
    }
}

/// A tick that staged no sample (idle, filtered): still counts toward the batch's age.
#[inline(always)]
pub(crate) fn tick_without_sample() {
    let Some(staging) = STAGING.get_ptr_mut(0) else {
        return;
    };
    let staging = unsafe { &mut *staging };
    if staging.batch.samples == 0 {
        return;
    }
    staging.ticks += 1;
    if staging.ticks >= config_field!(staging_flush_ticks) {
        flush(staging, QUIET);
    }
}

/// Writes this CPU's staged samples to the ring now (before a process event of this CPU).
#[inline(always)]
pub(crate) fn flush_this_cpu() {
    if let Some(staging) = STAGING.get_ptr_mut(0) {
        flush(unsafe { &mut *staging }, QUIET);
    }
}

#[inline(always)]
fn flush(staging: &mut SampleStaging, flags: u64) {
    let samples = staging.batch.samples;
    if samples == 0 {
        return;
    }
    staging.batch.kind = RecordKind::SampleBatch as u16;
    staging.batch._pad = 0;
    // The mask bounds the length for the verifier; `used` never exceeds STAGING_BYTES - 1.
    let len =
        core::mem::size_of::<SampleBatchHeader>() + (staging.used as usize & (STAGING_BYTES - 1));
    let bytes =
        unsafe { core::slice::from_raw_parts((&raw const staging.batch).cast::<u8>(), len) };
    match EVENTS.output::<[u8]>(bytes, flags) {
        Ok(()) => {
            add(Counter::SamplesEmitted, u64::from(samples));
            count(Counter::SampleBatchesEmitted);
        }
        Err(_) => add(Counter::RingBufferFull, u64::from(samples)),
    }
    staging.used = 0;
    staging.ticks = 0;
    staging.batch.samples = 0;
}
