//! Reading the sampled thread's trace context from the target's memory.
//!
//! Every read is a `bpf_probe_read_*` (it cannot fault the kernel); every pointer comes from the
//! target and is treated as untrusted: the raw bytes go to user space, which validates them.
//! Each outcome increments its counter.

use aya_ebpf::{
    helpers::{
        bpf_get_current_task, bpf_probe_read_kernel, bpf_probe_read_user,
        generated::bpf_probe_read_user as probe_read_user_raw,
    },
    macros::map,
    maps::LruHashMap,
};
use profiler_common::{
    ContextKind, ContextSource, Counter, MAX_CONTEXT_BYTES, MAX_THREAD_CONTEXT_ATTRS,
    ObiTraceContext, ThreadContextHeader, TlsLocation, custom_labels, obi,
};

use crate::count;

/// OBI's shared map. User space gives it OBI's pin (or creates and pins it) when OBI support
/// is on, and shrinks it to one entry otherwise.
#[map(name = "traces_ctx_v1")]
static OBI_TRACES_CTX: LruHashMap<u64, ObiTraceContext> =
    LruHashMap::with_max_entries(obi::MAX_ENTRIES, 0);

/// Marks a DTV slot whose TLS block was never allocated (glibc's `TLS_DTV_UNALLOCATED`).
const DTV_UNALLOCATED: u64 = u64::MAX;
/// Highest user-space address on x86_64 (47-bit): anything above is not a user pointer.
const USER_ADDRESS_LIMIT: u64 = 0x0000_8000_0000_0000;

/// Reads the context described by `source` into `dest` (at most `MAX_CONTEXT_BYTES`).
/// Returns the payload kind and length; `(None, 0)` when nothing usable was found.
#[inline(always)]
pub fn read(source: &ContextSource, fsbase_offset: u32, dest: *mut u8) -> (ContextKind, usize) {
    if source.kind == ContextKind::ThreadContext as u8 {
        return read_thread_context(&source.tls, fsbase_offset, dest);
    }
    if source.kind == ContextKind::CustomLabels as u8 {
        return read_custom_labels(&source.tls, fsbase_offset, dest);
    }
    (ContextKind::None, 0)
}

/// OBI: the context OBI recorded for this thread, if any (lowest precedence).
#[inline(always)]
pub fn read_obi(pid_tgid: u64, dest: *mut u8) -> (ContextKind, usize) {
    let Some(value) = (unsafe { OBI_TRACES_CTX.get(pid_tgid) }) else {
        return (ContextKind::None, 0);
    };
    unsafe { core::ptr::write_unaligned(dest.cast::<ObiTraceContext>(), *value) };
    count(Counter::ContextObi);
    (ContextKind::Obi, core::mem::size_of::<ObiTraceContext>())
}

/// custom-labels v1: TLS pointer → label set → up to `MAX_LABELS` key/value pairs, each copied
/// bounded; user space decides which labels carry the trace and span ids.
#[inline(always)]
fn read_custom_labels(
    tls: &TlsLocation,
    fsbase_offset: u32,
    dest: *mut u8,
) -> (ContextKind, usize) {
    let Some(thread_pointer) = thread_pointer(fsbase_offset) else {
        count(Counter::ContextThreadPointerFault);
        return (ContextKind::None, 0);
    };
    let Some(variable) = tls_address(thread_pointer, tls) else {
        return (ContextKind::None, 0);
    };
    let set = match unsafe { bpf_probe_read_user(variable as *const u64) } {
        Ok(0) => {
            count(Counter::ContextNoneActive);
            return (ContextKind::None, 0);
        }
        Ok(p) => p,
        Err(_) => {
            count(Counter::ContextReadFault);
            return (ContextKind::None, 0);
        }
    };
    let Ok(header) = (unsafe { bpf_probe_read_user(set as *const [u64; 2]) }) else {
        count(Counter::ContextReadFault);
        return (ContextKind::None, 0);
    };
    let (storage, labels) = (header[0], header[1]);
    let mut pos = 0usize;
    for i in 0..custom_labels::MAX_LABELS {
        if i as u64 >= labels || pos > MAX_CONTEXT_BYTES - custom_labels::MAX_ENTRY {
            break;
        }
        // {key.len, key.buf, value.len, value.buf}
        let Ok(label) =
            (unsafe { bpf_probe_read_user((storage + 32 * i as u64) as *const [u64; 4]) })
        else {
            count(Counter::ContextReadFault);
            break;
        };
        if label[1] == 0 {
            continue; // A label without a key is ignored, per the ABI.
        }
        let key_len = if label[0] > custom_labels::MAX_KEY as u64 {
            custom_labels::MAX_KEY
        } else {
            label[0] as usize
        };
        let value_len = if label[2] > custom_labels::MAX_VALUE as u64 {
            custom_labels::MAX_VALUE
        } else {
            label[2] as usize
        };
        let entry = unsafe { dest.add(pos) };
        unsafe {
            *entry = if label[0] > 255 { 255 } else { label[0] as u8 };
            *entry.add(1) = if label[2] > 255 { 255 } else { label[2] as u8 };
        }
        let key_ok = unsafe {
            probe_read_user_raw(entry.add(2).cast(), key_len as u32, label[1] as *const _)
        } >= 0;
        let value_ok = value_len == 0
            || unsafe {
                probe_read_user_raw(
                    entry.add(2 + key_len).cast(),
                    value_len as u32,
                    label[3] as *const _,
                )
            } >= 0;
        if !(key_ok && value_ok) {
            count(Counter::ContextReadFault);
            break;
        }
        pos += 2 + key_len + value_len;
    }
    if pos == 0 {
        count(Counter::ContextNoneActive);
        return (ContextKind::None, 0);
    }
    count(Counter::ContextRead);
    (ContextKind::CustomLabels, pos)
}

/// OTEP 4947: TLS pointer → 28-byte header (require `valid == 1`) → attributes.
#[inline(always)]
fn read_thread_context(
    tls: &TlsLocation,
    fsbase_offset: u32,
    dest: *mut u8,
) -> (ContextKind, usize) {
    let Some(thread_pointer) = thread_pointer(fsbase_offset) else {
        count(Counter::ContextThreadPointerFault);
        return (ContextKind::None, 0);
    };
    let Some(variable) = tls_address(thread_pointer, tls) else {
        return (ContextKind::None, 0);
    };
    let record = match unsafe { bpf_probe_read_user(variable as *const u64) } {
        Ok(0) => {
            count(Counter::ContextNoneActive);
            return (ContextKind::None, 0);
        }
        Ok(p) => p,
        Err(_) => {
            count(Counter::ContextReadFault);
            return (ContextKind::None, 0);
        }
    };
    let header_len = core::mem::size_of::<ThreadContextHeader>();
    let ret = unsafe { probe_read_user_raw(dest.cast(), header_len as u32, record as *const _) };
    if ret < 0 {
        count(Counter::ContextReadFault);
        return (ContextKind::None, 0);
    }
    let header = unsafe { &*(dest as *const ThreadContextHeader) };
    if header.valid != 1 {
        count(Counter::ContextInvalid);
        return (ContextKind::None, 0);
    }
    let declared = header.attrs_data_size as usize;
    let mut attrs = if declared > MAX_THREAD_CONTEXT_ATTRS {
        MAX_THREAD_CONTEXT_ATTRS
    } else {
        declared
    };
    if attrs > 0 {
        let ret = unsafe {
            probe_read_user_raw(
                dest.add(header_len).cast(),
                attrs as u32,
                (record + header_len as u64) as *const _,
            )
        };
        if ret < 0 {
            count(Counter::ContextAttrsFault);
            attrs = 0;
        }
    }
    count(Counter::ContextRead);
    (ContextKind::ThreadContext, header_len + attrs)
}

/// `task_struct->thread.fsbase` of the current task (x86_64 thread pointer).
#[inline(always)]
fn thread_pointer(fsbase_offset: u32) -> Option<u64> {
    if fsbase_offset == 0 {
        return None;
    }
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let fsbase =
        unsafe { bpf_probe_read_kernel(task.add(fsbase_offset as usize) as *const u64) }.ok()?;
    (fsbase != 0).then_some(fsbase)
}

/// Address of the thread-local variable: static TLS is a fixed offset from the thread pointer;
/// dynamic TLS goes through the DTV (`dtv[module].val + offset`).
#[inline(always)]
fn tls_address(thread_pointer: u64, tls: &TlsLocation) -> Option<u64> {
    if tls.module_id == 0 {
        return Some(thread_pointer.wrapping_add(tls.offset as u64));
    }
    let dtv_slot = thread_pointer.wrapping_add(tls.dtv_offset as i64 as u64);
    let Ok(dtv) = (unsafe { bpf_probe_read_user(dtv_slot as *const u64) }) else {
        count(Counter::ContextReadFault);
        return None;
    };
    let entry = dtv.wrapping_add(u64::from(tls.module_id) * u64::from(tls.dtv_entry_size));
    let Ok(block) = (unsafe { bpf_probe_read_user(entry as *const u64) }) else {
        count(Counter::ContextReadFault);
        return None;
    };
    if block == 0 || block == DTV_UNALLOCATED || block >= USER_ADDRESS_LIMIT {
        count(Counter::ContextTlsUnallocated);
        return None;
    }
    Some(block.wrapping_add(tls.offset as u64))
}
