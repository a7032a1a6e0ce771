//! Reading the sampled thread's trace context from the target's memory.
//!
//! Every read is a `bpf_probe_read_*` (it cannot fault the kernel); every pointer comes from the
//! target and is treated as untrusted: the raw bytes go to user space, which validates them.
//! Each outcome increments its counter.

use aya_ebpf::{
    helpers::{bpf_probe_read_user, generated::bpf_probe_read_user as probe_read_user_raw},
    macros::map,
    maps::{Array, LruHashMap},
};
use profiler_common::{
    ContextKind, ContextSource, Counter, GO_LABELS_BUFFER_WORDS, MAX_CONTEXT_BYTES,
    MAX_THREAD_CONTEXT_ATTRS, MAX_WANTED_KEYS, ObiTraceContext, ThreadContextHeader, TlsLocation,
    WANTED_KEY_WORDS, WantedLabelKeys, custom_labels, go, obi,
};

/// Label keys searched first in Go labels (the trace and span id keys), written by user space.
#[map]
static LABEL_KEYS: Array<WantedLabelKeys> = Array::with_max_entries(1, 0);

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

/// Go pprof labels: thread pointer → g → g.m → m.curg → curg.labels → the label map (Go ≤
/// 1.23) or sorted slice (Go ≥ 1.24). The wanted keys (trace and span ids) are searched among
/// all labels read; other labels are copied while room remains, keeping room for the wanted.
#[inline(always)]
pub fn read_go_labels(
    source: &ContextSource,
    thread_pointer: Option<u64>,
    dest: *mut u8,
    work: Workspace,
    slice: bool,
) -> (ContextKind, usize) {
    let (cursor, buffer) = (work.cursor, unsafe { &mut *work.go_labels });
    let Some(thread_pointer) = thread_pointer else {
        count(Counter::ContextThreadPointerFault);
        return (ContextKind::None, 0);
    };
    let Some(g_slot) = tls_address(thread_pointer, &source.tls) else {
        return (ContextKind::None, 0);
    };
    let offsets = &source.go;
    let Some(g) = read_pointer(g_slot) else {
        return (ContextKind::None, 0);
    };
    // Labels are only ever set on user goroutines, and a user goroutine that runs is its
    // M's curg: labels found on g need no g → m → curg walk (two dependent reads saved on
    // most samples). None on g: g is g0 or gsignal (runtime code on behalf of curg), or a
    // goroutine without labels; m.curg tells.
    let labels = match read_pointer(g + u64::from(offsets.g_labels)) {
        Some(labels) => labels,
        None => {
            let Some(m) = read_pointer(g + u64::from(offsets.g_m)) else {
                return (ContextKind::None, 0);
            };
            // In the scheduler (g0) there may be no current user goroutine, so no labels.
            let curg = match read_pointer(m + u64::from(offsets.m_curg)) {
                Some(curg) if curg != g => curg,
                _ => {
                    count(Counter::ContextNoneActive);
                    return (ContextKind::None, 0);
                }
            };
            let Some(labels) = read_pointer(curg + u64::from(offsets.g_labels)) else {
                count(Counter::ContextNoneActive);
                return (ContextKind::None, 0);
            };
            labels
        }
    };
    let Some(wanted) = LABEL_KEYS.get(0) else {
        return (ContextKind::None, 0);
    };
    let len = if slice {
        go_slice_labels(labels, wanted, dest, cursor, buffer)
    } else {
        go_map_labels(labels, wanted, dest, cursor, buffer)
    };
    if len == 0 {
        count(Counter::ContextNoneActive);
        return (ContextKind::None, 0);
    }
    count(Counter::ContextRead);
    (ContextKind::GoLabels, len)
}

/// Go ≥ 1.24: `labels` points to a slice header `{array, len, cap}` of `{key, value string}`;
/// the label headers are copied in one read.
#[inline(always)]
fn go_slice_labels(
    labels: u64,
    wanted: &WantedLabelKeys,
    dest: *mut u8,
    cursor: Cursor,
    buffer: &mut [u64; GO_LABELS_BUFFER_WORDS],
) -> usize {
    let Ok(header) = (unsafe { bpf_probe_read_user(labels as *const [u64; 2]) }) else {
        count(Counter::ContextReadFault);
        return 0;
    };
    let (array, len) = (header[0], header[1]);
    let n = if len > go::MAX_SLICE_LABELS {
        go::MAX_SLICE_LABELS
    } else {
        len
    };
    if n == 0 {
        return 0;
    }
    let bytes = (n * 32) as u32;
    if unsafe { probe_read_user_raw(buffer.as_mut_ptr().cast(), bytes, array as *const _) } < 0 {
        count(Counter::ContextReadFault);
        return 0;
    }
    let mut pos = 0usize;
    for i in 0..go::MAX_SLICE_LABELS as usize {
        if i as u64 >= n {
            break;
        }
        // {key.ptr, key.len, value.ptr, value.len}
        let w = &buffer[4 * i..4 * i + 4];
        pos = cursor.set(copy_label(dest, pos, wanted, w[0], w[1], w[2], w[3]));
    }
    pos
}

/// Go ≤ 1.23: `labels` points to the map word of a `map[string]string`. Labels maps are built
/// once and never grow afterwards, so the buckets (not `oldbuckets`) hold every entry. A bucket
/// whose 8 slots filled chains to an overflow bucket, which is read next (a 12-label map puts
/// more than 8 keys into one of its 2 buckets about one time in seven). Each bucket is copied in
/// one read; at most `MAX_BUCKETS` reads in all.
#[inline(always)]
fn go_map_labels(
    labels: u64,
    wanted: &WantedLabelKeys,
    dest: *mut u8,
    cursor: Cursor,
    buffer: &mut [u64; GO_LABELS_BUFFER_WORDS],
) -> usize {
    let Some(hmap) = read_pointer(labels) else {
        return 0;
    };
    // hmap's head up to `buckets` in one read (B and buckets are 7 bytes apart).
    const HEAD_WORDS: usize = (go::HMAP_BUCKETS_OFFSET / 8 + 1) as usize;
    const _: () = assert!(go::HMAP_BUCKETS_OFFSET.is_multiple_of(8));
    let Ok(head) = (unsafe { bpf_probe_read_user(hmap as *const [u64; HEAD_WORDS]) }) else {
        count(Counter::ContextReadFault);
        return 0;
    };
    let b = (head[(go::HMAP_B_OFFSET / 8) as usize] >> (8 * (go::HMAP_B_OFFSET % 8))) as u8;
    let buckets = head[HEAD_WORDS - 1];
    let bucket_count = if b > 3 { go::MAX_BUCKETS } else { 1u64 << b };
    let mut pos = 0usize;
    let (mut next_main, mut overflow) = (0u64, 0u64);
    for _ in 0..go::MAX_BUCKETS {
        let bucket = if overflow != 0 {
            overflow
        } else if next_main < bucket_count {
            next_main += 1;
            buckets + (next_main - 1) * go::BUCKET_SIZE
        } else {
            break;
        };
        let bytes = (go::BUCKET_WORDS * 8) as u32;
        if unsafe { probe_read_user_raw(buffer.as_mut_ptr().cast(), bytes, bucket as *const _) } < 0
        {
            count(Counter::ContextReadFault);
            break;
        }
        overflow = buffer[go::BUCKET_WORDS - 1];
        let tophash = buffer[0].to_ne_bytes();
        #[expect(
            clippy::needless_range_loop,
            reason = "an iterator compiles to code the verifier rejects"
        )]
        for slot in 0..8usize {
            if tophash[slot] < go::MIN_TOP_HASH {
                continue;
            }
            let (key, value) = (1 + 2 * slot, 17 + 2 * slot);
            pos = cursor.set(copy_label(
                dest,
                pos,
                wanted,
                buffer[key],
                buffer[key + 1],
                buffer[value],
                buffer[value + 1],
            ));
        }
    }
    pos
}

/// Appends `{u8 key_len; u8 value_len; key; value}` at `pos` when there is room: wanted keys
/// while a whole entry fits, other labels only while room for two wanted entries remains.
/// The key is read once, compared from the copy, and the value read only when kept.
#[inline(always)]
fn copy_label(
    dest: *mut u8,
    pos: usize,
    wanted: &WantedLabelKeys,
    key_ptr: u64,
    key_len: u64,
    value_ptr: u64,
    value_len: u64,
) -> usize {
    // Every return is masked: the verifier then sees the same range for `pos` whichever path
    // was taken, and can prune the paths of later labels (otherwise they multiply per label).
    // Real values stay below MAX_CONTEXT_BYTES, so the mask never changes one.
    const POS_MASK: usize = 0x3ff;
    const _: () = assert!(MAX_CONTEXT_BYTES <= POS_MASK);
    if key_ptr == 0 || pos > MAX_CONTEXT_BYTES - custom_labels::MAX_ENTRY {
        return pos & POS_MASK;
    }
    let key_copy = if key_len > custom_labels::MAX_KEY as u64 {
        custom_labels::MAX_KEY
    } else {
        key_len as usize
    };
    let mut key = [0u64; WANTED_KEY_WORDS];
    if unsafe {
        probe_read_user_raw(
            key.as_mut_ptr().cast(),
            key_copy as u32,
            key_ptr as *const _,
        )
    } < 0
    {
        count(Counter::ContextReadFault);
        return pos & POS_MASK;
    }
    if pos > MAX_CONTEXT_BYTES - 3 * custom_labels::MAX_ENTRY && !is_wanted(&key, key_len, wanted) {
        return pos & POS_MASK;
    }
    let value_copy = if value_len > custom_labels::MAX_VALUE as u64 {
        custom_labels::MAX_VALUE
    } else {
        value_len as usize
    };
    let entry = unsafe { dest.add(pos) };
    unsafe {
        *entry = if key_len > 255 { 255 } else { key_len as u8 };
        *entry.add(1) = if value_len > 255 {
            255
        } else {
            value_len as u8
        };
        // The whole key buffer: bytes past `key_copy` are overwritten by the value.
        core::ptr::write_unaligned(entry.add(2).cast::<[u64; WANTED_KEY_WORDS]>(), key);
    }
    let value_ok = value_copy == 0
        || unsafe {
            probe_read_user_raw(
                entry.add(2 + key_copy).cast(),
                value_copy as u32,
                value_ptr as *const _,
            )
        } >= 0;
    if !value_ok {
        count(Counter::ContextReadFault);
        return pos & POS_MASK;
    }
    (pos + 2 + key_copy + value_copy) & POS_MASK
}

/// Whether the key (already copied, zero-padded) equals one of the wanted keys.
#[inline(always)]
fn is_wanted(key: &[u64; WANTED_KEY_WORDS], key_len: u64, wanted: &WantedLabelKeys) -> bool {
    for i in 0..MAX_WANTED_KEYS {
        if wanted.lens[i] != 0 && u64::from(wanted.lens[i]) == key_len && wanted.keys[i] == *key {
            return true;
        }
    }
    false
}

/// The readers' working space in the per-CPU scratch record.
#[derive(Clone, Copy)]
pub struct Workspace {
    pub cursor: Cursor,
    pub go_labels: *mut [u64; GO_LABELS_BUFFER_WORDS],
}

/// A write position kept in map memory. Storing it and reading it back hides its exact value
/// from the verifier (map contents are not tracked), so every path through a label loop ends in
/// the same state and the verifier can prune instead of exploring each combination of label
/// sizes. Callers bound the value again after each `set`.
#[derive(Clone, Copy)]
pub struct Cursor(pub *mut u64);

impl Cursor {
    #[inline(always)]
    fn set(self, value: usize) -> usize {
        unsafe {
            core::ptr::write_volatile(self.0, value as u64);
            core::ptr::read_volatile(self.0) as usize
        }
    }
}

/// A non-null pointer read from the target.
#[inline(always)]
fn read_pointer(address: u64) -> Option<u64> {
    match unsafe { bpf_probe_read_user(address as *const u64) } {
        Ok(0) => None,
        Ok(p) => Some(p),
        Err(_) => {
            count(Counter::ContextReadFault);
            None
        }
    }
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
pub fn read_custom_labels(
    tls: &TlsLocation,
    thread_pointer: Option<u64>,
    dest: *mut u8,
    cursor: Cursor,
) -> (ContextKind, usize) {
    let Some(set) = thread_local_pointer(tls, thread_pointer) else {
        return (ContextKind::None, 0);
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
        pos = cursor.set(pos + 2 + key_len + value_len);
    }
    if pos == 0 {
        count(Counter::ContextNoneActive);
        return (ContextKind::None, 0);
    }
    count(Counter::ContextRead);
    (ContextKind::CustomLabels, pos)
}

/// Attribute bytes read with the OTEP 4947 header: 28 + 100 = two cache lines.
const FIRST_READ_ATTRS: usize = 100;
/// Covers every size up to `MAX_THREAD_CONTEXT_ATTRS` (612).
const REST_MASK: usize = 0x3ff;
const _: () = assert!(MAX_THREAD_CONTEXT_ATTRS <= REST_MASK);

/// OTEP 4947: TLS pointer → 28-byte header (require `valid == 1`) → attributes.
#[inline(always)]
pub fn read_thread_context(
    tls: &TlsLocation,
    thread_pointer: Option<u64>,
    dest: *mut u8,
) -> (ContextKind, usize) {
    let Some(record) = thread_local_pointer(tls, thread_pointer) else {
        return (ContextKind::None, 0);
    };
    let header_len = core::mem::size_of::<ThreadContextHeader>();
    // The header and the first attributes (most records have few) in one read of two cache
    // lines, when they lie within the record's page (a read cannot fault on the page the record
    // itself is on); else the header alone. Then exactly the declared attributes not read yet.
    // Reading the whole maximal record every time touched ten lines of the target's memory for
    // the two that hold data.
    let first_attrs = if 4096 - (record & 4095) >= (header_len + FIRST_READ_ATTRS) as u64 {
        FIRST_READ_ATTRS
    } else {
        0
    };
    let first_read = header_len + first_attrs;
    let ret = unsafe { probe_read_user_raw(dest.cast(), first_read as u32, record as *const _) };
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
    if attrs > first_attrs {
        // Masked: the verifier sees a size within the scratch's room whichever path it took.
        let rest = (attrs - first_attrs) & REST_MASK;
        let ret = unsafe {
            probe_read_user_raw(
                dest.add(first_read).cast(),
                rest as u32,
                (record + first_read as u64) as *const _,
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

/// The pointer a writer stores in its thread-local variable (the active record or label set);
/// `None` when there is none (counted by outcome).
#[inline(always)]
fn thread_local_pointer(tls: &TlsLocation, thread_pointer: Option<u64>) -> Option<u64> {
    let Some(thread_pointer) = thread_pointer else {
        count(Counter::ContextThreadPointerFault);
        return None;
    };
    let variable = tls_address(thread_pointer, tls)?;
    match unsafe { bpf_probe_read_user(variable as *const u64) } {
        Ok(0) => {
            count(Counter::ContextNoneActive);
            None
        }
        Ok(p) => Some(p),
        Err(_) => {
            count(Counter::ContextReadFault);
            None
        }
    }
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
