//! The kernel/user contract: every record, map value and load-time setting that crosses the
//! boundary between `profiler-ebpf` and `profiler-agent` is defined here, once.
//!
//! Rules: `#[repr(C)]`, fixed-width fields, explicit padding (no `bool`), and a compile-time
//! size check per type. User space must treat every record as untrusted bytes and decode it
//! with length checks (see `profiler-agent/src/ebpf/decode.rs`).
#![no_std]

/// Frames captured per stack (user and kernel each), as `bpf_get_stack` allows.
pub const MAX_STACK_DEPTH: usize = 127;
/// Bytes of one captured stack buffer.
pub const STACK_BYTES: usize = MAX_STACK_DEPTH * 8;
/// Upper bound of the raw trace-context payload copied from a target (OTEP 4947: a 28-byte
/// header plus up to 612 bytes of attributes).
pub const MAX_CONTEXT_BYTES: usize = 640;
/// `TASK_COMM_LEN` in the kernel.
pub const COMM_LEN: usize = 16;

/// First field of every ring-buffer record, so user space can dispatch before decoding.
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    Sample = 1,
    ProcessExec = 2,
    ProcessExit = 3,
    /// A process mapped a file with execute permission (a library loaded late, e.g. dlopen).
    ProcessMmapExec = 4,
    /// Samples of one CPU, staged in [`SampleStaging`] and written to the ring together.
    SampleBatch = 5,
}

impl RecordKind {
    pub fn from_u16(v: u16) -> Option<Self> {
        match v {
            1 => Some(Self::Sample),
            2 => Some(Self::ProcessExec),
            3 => Some(Self::ProcessExit),
            4 => Some(Self::ProcessMmapExec),
            5 => Some(Self::SampleBatch),
            _ => None,
        }
    }
}

/// Bits of [`SampleHeader::flags`].
pub mod sample_flags {
    /// The user stack could not be walked (a 32-bit task's, by `bpf_get_stack`); `user_frames`
    /// is 0.
    pub const USER_STACK_ERROR: u16 = 1 << 0;
    /// The user stack filled the buffer: it may be deeper than what was captured.
    pub const USER_STACK_TRUNCATED: u16 = 1 << 1;
    /// `bpf_get_stack` for the kernel stack returned an error; `kernel_frames` is 0.
    pub const KERNEL_STACK_ERROR: u16 = 1 << 2;
    /// The kernel stack filled the buffer.
    pub const KERNEL_STACK_TRUNCATED: u16 = 1 << 3;
    /// [`super::SampleHeader::user_stack_top`] holds the word at the interrupted user stack
    /// pointer.
    pub const USER_STACK_TOP: u16 = 1 << 4;
}

/// Where a sample's trace context came from; the tag of the context payload.
/// Every source has its variant now so later readers only fill it in.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContextKind {
    /// No context source for this process, or nothing active on the thread.
    None = 0,
    /// OTEP 4947 thread context record: 28-byte header followed by attributes.
    ThreadContext = 1,
    /// Go pprof labels (`pprof.Do`), as key/value string pairs.
    GoLabels = 2,
    /// Polar Signals custom-labels v1 label set.
    CustomLabels = 3,
    /// OpenTelemetry eBPF Instrumentation's `traces_ctx_v1` map value.
    Obi = 4,
}

impl ContextKind {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::None),
            1 => Some(Self::ThreadContext),
            2 => Some(Self::GoLabels),
            3 => Some(Self::CustomLabels),
            4 => Some(Self::Obi),
            _ => None,
        }
    }
}

/// Fixed head of a sample record. In the ring buffer it is followed by
/// `user_frames` u64 user addresses, `kernel_frames` u64 kernel addresses and
/// `context_len` bytes of context payload, and nothing else: records are variable-length.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SampleHeader {
    /// [`RecordKind::Sample`].
    pub kind: u16,
    /// [`sample_flags`] bits.
    pub flags: u16,
    pub cpu: u32,
    /// Process id (thread group id).
    pub tgid: u32,
    /// Thread id.
    pub tid: u32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) at the sample.
    pub ktime_ns: u64,
    /// Thread name.
    pub comm: [u8; COMM_LEN],
    pub user_frames: u16,
    pub kernel_frames: u16,
    /// A [`ContextKind`].
    pub context_kind: u8,
    pub _pad: u8,
    pub context_len: u16,
    /// The 8 bytes at the task's user stack pointer (flag [`sample_flags::USER_STACK_TOP`]),
    /// else 0. Frame-pointer unwinding cannot see the caller of a function that set up no frame
    /// (a Go leaf, an assembly routine, a prologue, a system-call wrapper): its return address
    /// is still at the stack pointer. User space decides from the function's unwind table
    /// whether this word is that return address; here it is only captured.
    pub user_stack_top: u64,
}
const _: () = assert!(core::mem::size_of::<SampleHeader>() == 56);

/// Byte room after the header in the per-CPU scratch buffer: both stacks at their maximum, then
/// the context payload. The layout lets the eBPF side compute offsets the verifier can bound.
pub const SAMPLE_DATA_BYTES: usize = 2 * STACK_BYTES + MAX_CONTEXT_BYTES;
/// Largest sample record that can be emitted.
pub const MAX_SAMPLE_BYTES: usize = core::mem::size_of::<SampleHeader>() + SAMPLE_DATA_BYTES;

/// Per-CPU scratch where a sample is assembled before it is copied to the ring buffer with its
/// real length (the 512-byte BPF stack cannot hold it).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SampleScratch {
    pub header: SampleHeader,
    pub data: [u8; SAMPLE_DATA_BYTES],
    /// Working space of the context readers (never emitted): a write position stored here and
    /// read back is opaque to the verifier, which keeps loops over labels verifiable.
    pub cursor: u64,
    /// Working space of the Go label reader: a slice's label headers or a map bucket, read from
    /// the target in one copy rather than one per field.
    pub go_labels: [u64; GO_LABELS_BUFFER_WORDS],
}
/// Words of [`SampleScratch::go_labels`]: 16 slice labels of 4 words, or one 34-word bucket.
pub const GO_LABELS_BUFFER_WORDS: usize = 64;
const _: () = assert!(
    core::mem::size_of::<SampleScratch>() == MAX_SAMPLE_BYTES + 8 + 8 * GO_LABELS_BUFFER_WORDS
);

/// Head of a [`RecordKind::SampleBatch`] record: `samples` sample records follow, each as
/// [`SampleHeader`] describes it and each starting at a multiple of 8 bytes from the end of
/// this header (zero padding between them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SampleBatchHeader {
    /// [`RecordKind::SampleBatch`].
    pub kind: u16,
    pub _pad: u16,
    pub samples: u32,
}
const _: () = assert!(core::mem::size_of::<SampleBatchHeader>() == 8);

/// Sample bytes one CPU stages before writing them to the ring buffer as one batch.
pub const STAGING_BYTES: usize = 16384;
/// A batch holds at most this many ticks of one CPU: writing to the ring costs the same for one
/// sample as for many (a shared lock and the producer's cache lines, cold on every other tick),
/// so samples are written a batch at a time, and a batch is never older than this many ticks.
/// Not more: a batch delays by its age everything the agent reads from the ring, and longer
/// ones save little (24 ticks at 99 Hz: ~2% of the sampler's time, timed in place). They also
/// held a new process's first samples past the agent's drain after its exec, until such
/// samples were sent at once (`Counter::SamplesOfUninspectedProcesses`).
pub const MAX_STAGED_TICKS: u32 = 8;
/// Samples are staged only when this much room is left, so an append never needs a check the
/// verifier cannot follow.
pub const STAGING_APPEND_LIMIT: usize = STAGING_BYTES - MAX_SAMPLE_BYTES - 8;
const _: () = assert!(STAGING_BYTES.is_power_of_two());

/// Per-CPU staging of samples (the `STAGING` map's only value). The sampler appends each sample
/// to `samples` and writes `batch` and the used bytes to the ring when `ticks` reaches
/// `EbpfConfig::staging_flush_ticks` or the used bytes reach `EbpfConfig::staging_flush_bytes`.
/// The process exec and exit programs write their CPU's batch before their own event, so that a
/// process's samples on that CPU come before its end. At stop, user space reads what is left.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SampleStaging {
    /// Bytes of `samples` in use (a multiple of 8).
    pub used: u32,
    /// Ticks of this CPU since the batch's first sample.
    pub ticks: u32,
    pub batch: SampleBatchHeader,
    pub samples: [u8; STAGING_BYTES],
}
const _: () = assert!(core::mem::size_of::<SampleStaging>() == 16 + STAGING_BYTES);

/// Process lifecycle record (exec or exit), in the same ring buffer as samples so that it is
/// ordered with them.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ProcessEvent {
    /// [`RecordKind::ProcessExec`], [`RecordKind::ProcessExit`] or
    /// [`RecordKind::ProcessMmapExec`].
    pub kind: u16,
    pub _pad: u16,
    pub tgid: u32,
    pub ktime_ns: u64,
    pub comm: [u8; COMM_LEN],
}
const _: () = assert!(core::mem::size_of::<ProcessEvent>() == 32);

/// Load-time settings, written into the program's read-only global `CONFIG` before load.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct EbpfConfig {
    /// The agent's own tgid: never sampled.
    pub agent_tgid: u32,
    /// Non-zero: sample only processes present in `PID_FILTER`.
    pub filter_by_pid: u32,
    /// Byte offset of `group_dead` in the `sched_process_exit` tracepoint record, or 0 when the
    /// kernel lacks that field (then a process exit is the exit of its leader thread).
    pub exit_group_dead_offset: u32,
    /// Byte offset of `task_struct->thread.fsbase` (the thread pointer on x86_64), from the
    /// kernel's BTF. 0: unknown, and no trace context is read.
    pub task_fsbase_offset: u32,
    /// Non-zero: look up OBI's `traces_ctx_v1` map for samples with no other context.
    pub obi_enabled: u32,
    /// Non-zero: sample only tasks whose cgroup v2 id (`bpf_get_current_cgroup_id`) is in
    /// `CGROUP_FILTER` (the workload filter), checked before anything else costs.
    pub filter_by_cgroup: u32,
    /// Byte offsets of `task_struct->pid` and `->tgid` from the kernel's BTF; 0 in either: the
    /// sampler calls `bpf_get_current_pid_tgid` instead.
    pub task_pid_offset: u32,
    pub task_tgid_offset: u32,
    /// Byte offset of `task_struct->comm` from the kernel's BTF, when it is 8-byte aligned;
    /// 0: the sampler copies the name with `bpf_get_current_comm` instead.
    pub task_comm_offset: u32,
    /// A CPU's staged samples are written to the ring after this many ticks (1: every sample
    /// at once); at most [`MAX_STAGED_TICKS`].
    pub staging_flush_ticks: u32,
    /// ... or once this many bytes are staged (at most [`STAGING_APPEND_LIMIT`]; small rings
    /// take small batches).
    pub staging_flush_bytes: u32,
    /// Byte offset of `task_struct->start_time` (CLOCK_MONOTONIC ns at the thread's creation)
    /// from the kernel's BTF; 0: unknown, and no sample is urgent (see
    /// [`Counter::SamplesOfUninspectedProcesses`]).
    pub task_start_time_offset: u32,
}
const _: () = assert!(core::mem::size_of::<EbpfConfig>() == 48);

/// A sample of a process the agent has not inspected goes to the ring at once only while its
/// thread is younger than this: long enough for the agent's slowest periodic drain (2 s), after
/// which a process the agent still has no verdict on (one that lost its slot to a newer
/// process, see [`ContextSourceSlot`]) costs no more than any other.
pub const URGENT_THREAD_AGE_NS: u64 = 2_000_000_000;

/// How the eBPF side finds a thread-local variable of the sampled thread, starting from the
/// thread pointer (x86_64: `task_struct->thread.fsbase`). User space computes it from the
/// ELF's TLS symbol and relocations (every access model OTEP 4947 allows).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TlsLocation {
    /// Static TLS (`module_id == 0`): the variable's offset from the thread pointer (negative on
    /// x86_64). Dynamic TLS: the variable's offset inside its module's TLS block.
    pub offset: i64,
    /// 0: static TLS. Otherwise the module's index in the thread's DTV.
    pub module_id: u32,
    /// Offset of the DTV pointer from the thread pointer (glibc and musl on x86_64: 8).
    pub dtv_offset: i16,
    /// Bytes per DTV entry (glibc: 16, musl: 8).
    pub dtv_entry_size: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<TlsLocation>() == 16);

/// Per-process entry of the `CONTEXT_SOURCES` map (key: tgid): which trace-context source the
/// agent chose for this process and where to read it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ContextSource {
    /// A [`ContextKind`].
    pub kind: u8,
    /// Index of the reader program in `CONTEXT_READERS` (a [`ContextReader`]).
    pub reader: u8,
    pub _pad: [u8; 6],
    /// For `ThreadContext`: where `otel_thread_ctx_v1` lives. For `CustomLabels`: where
    /// `custom_labels_current_set` lives. For `GoLabels`: where the current `g` pointer lives.
    pub tls: TlsLocation,
    /// For `GoLabels`: the runtime's struct offsets for the binary's Go version.
    pub go: GoRuntimeOffsets,
}
const _: () = assert!(core::mem::size_of::<ContextSource>() == 32);

/// Slots of the `CONTEXT_SOURCE_SLOTS` array: a direct-mapped copy of `CONTEXT_SOURCES`, the
/// slot of process `tgid` being `tgid % CONTEXT_SOURCE_SLOTS`. The sampler reads a slot inline
/// (no helper call, one cache line) and looks up the hash only when the slot belongs to
/// another process: on a cold 99 Hz tick the hash lookup took ~210 ns and the slot ~100 ns.
pub const CONTEXT_SOURCE_SLOTS: u32 = 4096;

/// One slot of `CONTEXT_SOURCE_SLOTS`: the source of process `tgid`, or, with `reader` 0, the
/// agent's verdict that the process has none (so its samples skip the hash lookup too).
/// User space writes a slot in two steps, an empty one and then the new one, and `tgid` comes
/// last: on x86_64 a sampler that reads the owner it expects, before the source, reads the
/// whole source written with it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ContextSourceSlot {
    pub source: ContextSource,
    /// The process this slot is for; 0 for none.
    pub tgid: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<ContextSourceSlot>() == 40);

/// How a process's context is read: by the sampler itself (`ThreadContext`), or by the reader
/// program at this index in the `CONTEXT_READERS` program array.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContextReader {
    ThreadContext = 1,
    GoLabelsMap = 2,
    CustomLabels = 3,
    GoLabelsSlice = 4,
}

/// Offsets into Go runtime structs, which change between Go versions (user space picks them
/// from the binary's DWARF or from a table per version).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GoRuntimeOffsets {
    /// `runtime.g.m`.
    pub g_m: u16,
    /// `runtime.g.labels`.
    pub g_labels: u16,
    /// `runtime.m.curg`.
    pub m_curg: u16,
    /// A [`GoLabelsFormat`].
    pub labels_format: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<GoRuntimeOffsets>() == 8);

/// How `g.labels` is laid out.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GoLabelsFormat {
    /// Go ≤ 1.23: `*map[string]string` (a pointer to the map word, then `hmap`).
    Map = 1,
    /// Go ≥ 1.24: `*labelMap` = a pointer to a slice header of `{key, value string}`, sorted.
    Slice = 2,
}

/// Go runtime layout constants the reader relies on (amd64, stable across 1.17–1.27).
pub mod go {
    /// `hmap.B` (log2 of the bucket count).
    pub const HMAP_B_OFFSET: u64 = 9;
    /// `hmap.buckets`.
    pub const HMAP_BUCKETS_OFFSET: u64 = 16;
    /// A `map[string]string` bucket: `tophash[8]`, `keys[8]`, `values[8]`, `overflow`.
    pub const BUCKET_SIZE: u64 = 8 + 8 * 16 + 8 * 16 + 8;
    /// `tophash` values below this mark empty or evacuated slots.
    pub const MIN_TOP_HASH: u8 = 5;
    /// Buckets read at most, overflow buckets included (8 slots each; a map of up to 26
    /// labels has at most 4 main buckets, and more than 8 keys can hash into one of them).
    pub const MAX_BUCKETS: u64 = 4;
    /// Slice labels read at most (their headers fill the scratch buffer).
    pub const MAX_SLICE_LABELS: u64 = 16;
    /// Words of a bucket: tophash (1), keys (16), values (16), overflow (1).
    pub const BUCKET_WORDS: usize = 34;
}

/// Label keys the kernel looks for first in label-based sources (Go labels: the trace and span
/// id keys), so they are found however many labels come before them. Zero-padded.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WantedLabelKeys {
    pub lens: [u8; MAX_WANTED_KEYS],
    pub _pad: [u8; 4],
    pub keys: [[u64; WANTED_KEY_WORDS]; MAX_WANTED_KEYS],
}
pub const MAX_WANTED_KEYS: usize = 4;
/// Wanted keys fit in the 24 bytes of a copied label key.
pub const WANTED_KEY_WORDS: usize = 3;
/// Longest wanted key, in bytes.
pub const MAX_WANTED_KEY_LEN: usize = WANTED_KEY_WORDS * 8;
const _: () = assert!(core::mem::size_of::<WantedLabelKeys>() == 8 + 4 * 24);
const _: () = assert!(MAX_WANTED_KEY_LEN == custom_labels::MAX_KEY);

/// OTEP 4947 thread-context record header; `attrs_data_size` bytes of attributes follow.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ThreadContextHeader {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// Exactly 1 when the record is valid.
    pub valid: u8,
    pub trace_flags: u8,
    pub attrs_data_size: u16,
}
const _: () = assert!(core::mem::size_of::<ThreadContextHeader>() == 28);
/// Attribute bytes copied at most (OTEP 4947's recommended 640-byte record).
pub const MAX_THREAD_CONTEXT_ATTRS: usize = MAX_CONTEXT_BYTES - 28;

/// Value of OBI's `traces_ctx_v1` map (key: `pid_tgid`), as OpenTelemetry eBPF Instrumentation
/// defines it. The sample payload for [`ContextKind::Obi`] is these 24 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ObiTraceContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
}
const _: () = assert!(core::mem::size_of::<ObiTraceContext>() == 24);

/// The definition OBI gives `traces_ctx_v1`; an existing pin must match it.
pub mod obi {
    pub const MAP_NAME: &str = "traces_ctx_v1";
    pub const KEY_SIZE: u32 = 8;
    pub const VALUE_SIZE: u32 = 24;
    pub const MAX_ENTRIES: u32 = 1 << 14;
}

/// custom-labels v1 (Polar Signals ABI): a label set is `{label *storage; size_t count;
/// size_t capacity}`, a label `{string key; string value}`, a string `{size_t len; u8 *buf}`.
/// The sample payload for [`ContextKind::CustomLabels`] is up to `MAX_LABELS` entries of
/// `{u8 key_len; u8 value_len; key[min(key_len, MAX_KEY)]; value[min(value_len, MAX_VALUE)]}`
/// where the lengths are the originals capped at 255 (so truncation is visible).
pub mod custom_labels {
    pub const MAX_LABELS: usize = 8;
    pub const MAX_KEY: usize = 24;
    pub const MAX_VALUE: usize = 48;
    pub const MAX_ENTRY: usize = 2 + MAX_KEY + MAX_VALUE;
    const _: () = assert!(MAX_LABELS * MAX_ENTRY <= super::MAX_CONTEXT_BYTES);
}

/// Map and global names, shared so the two sides cannot drift.
pub mod names {
    pub const EVENTS: &str = "EVENTS";
    pub const STAGING: &str = "STAGING";
    pub const COUNTERS: &str = "COUNTERS";
    pub const PID_FILTER: &str = "PID_FILTER";
    pub const CGROUP_FILTER: &str = "CGROUP_FILTER";
    pub const CONFIG: &str = "CONFIG";
    pub const CONTEXT_SOURCES: &str = "CONTEXT_SOURCES";
    pub const CONTEXT_SOURCE_SLOTS: &str = "CONTEXT_SOURCE_SLOTS";
    pub const LABEL_KEYS: &str = "LABEL_KEYS";
    pub const ON_CPU_SAMPLE: &str = "on_cpu_sample";
    pub const ON_PROCESS_EXEC: &str = "on_process_exec";
    pub const ON_PROCESS_EXIT: &str = "on_process_exit";
    pub const ON_MMAP: &str = "on_mmap";
    pub const CONTEXT_READERS: &str = "CONTEXT_READERS";
    /// Tail-call targets, by the [`super::ContextKind`] they read.
    pub const READ_GO_LABELS_MAP: &str = "read_go_labels_map";
    pub const READ_GO_LABELS_SLICE: &str = "read_go_labels_slice";
    pub const READ_CUSTOM_LABELS: &str = "read_custom_labels";
}

macro_rules! counters {
    ($($(#[$doc:meta])* $variant:ident = $name:literal,)*) => {
        /// Index into the per-CPU `COUNTERS` array: one slot per outcome the kernel side counts.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Counter {
            $($(#[$doc])* $variant,)*
        }

        impl Counter {
            pub const ALL: &[Counter] = &[$(Counter::$variant,)*];

            /// Stable snake_case name, used in logs and metrics.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Counter::$variant => $name,)*
                }
            }
        }
    };
}

counters! {
    /// Program invocations (every timer tick on every CPU).
    Invocations = "invocations",
    /// Ticks that found the CPU idle (pid 0).
    SkippedIdle = "skipped_idle",
    /// Ticks that interrupted the agent itself.
    SkippedSelf = "skipped_self",
    /// Ticks of processes outside the pid allow-list.
    SkippedFiltered = "skipped_filtered",
    /// Samples written to the ring buffer (in batches: see [`SampleStaging`]).
    SamplesEmitted = "samples_emitted",
    /// Samples lost because the ring buffer was full (every sample of a batch that did not fit).
    RingBufferFull = "ringbuf_full",
    /// Process events lost because the ring buffer was full.
    ProcessEventsLost = "process_events_lost",
    /// The per-CPU scratch or staging buffer could not be looked up, or a sample not copied
    /// into the staging (should never happen).
    ScratchUnavailable = "scratch_unavailable",
    /// The user stack of a 32-bit task, walked by `bpf_get_stack`, failed.
    UserStackError = "user_stack_error",
    /// The user stack was deeper than the buffer.
    UserStackTruncated = "user_stack_truncated",
    /// `bpf_get_stack` failed for the kernel stack.
    KernelStackError = "kernel_stack_error",
    /// The kernel stack was deeper than the buffer.
    KernelStackTruncated = "kernel_stack_truncated",
    /// Samples of processes with no trace-context source.
    ContextNoSource = "context_no_source",
    /// The thread pointer could not be read from the task.
    ContextThreadPointerFault = "context_thread_pointer_fault",
    /// Dynamic TLS: the thread has no block for the module yet (never touched the variable).
    ContextTlsUnallocated = "context_tls_unallocated",
    /// A read of the target's memory faulted (unmapped, or not resident).
    ContextReadFault = "context_read_fault",
    /// The thread has no active context (null pointer): not an error.
    ContextNoneActive = "context_none_active",
    /// The record's `valid` byte was not 1 (being updated, or garbage).
    ContextInvalid = "context_invalid",
    /// The attributes could not be copied (the header was kept).
    ContextAttrsFault = "context_attrs_fault",
    /// Contexts read and attached to the sample.
    ContextRead = "context_read",
    /// Time spent in the timed context reads (`context_reads_timed`), in ns: the isolated cost
    /// of the read path is `context_read_ns / context_reads_timed`.
    ContextReadNs = "context_read_ns",
    /// Context reads attempted (processes with a source).
    ContextReadAttempts = "context_read_attempts",
    /// Context reads timed into `context_read_ns`: one attempt in
    /// [`CONTEXT_READ_TIMING_EVERY`] per CPU (the two clock reads cost about a tenth of the read).
    ContextReadsTimed = "context_reads_timed",
    /// Executable file mappings reported (dlopen and friends).
    MmapExecEvents = "mmap_exec_events",
    /// Samples that took their context from OBI's `traces_ctx_v1` map.
    ContextObi = "context_obi",
    /// Ticks of tasks outside the cgroup allow-list (the workload filter): no stack was walked
    /// and no context read for them.
    SkippedCgroup = "skipped_cgroup",
    /// Sample batches written to the ring buffer: `samples_emitted / sample_batches_emitted`
    /// samples per ring write.
    SampleBatchesEmitted = "sample_batches_emitted",
    /// Samples of new processes the agent has not inspected yet (no verdict on their context
    /// source in `CONTEXT_SOURCE_SLOTS` or `CONTEXT_SOURCES`, and a thread younger than
    /// [`URGENT_THREAD_AGE_NS`]): their batch goes to the ring at once and wakes the agent,
    /// which reads the process's mappings while it still lives.
    SamplesOfUninspectedProcesses = "samples_of_uninspected_processes",
    /// User stack walks that stopped at a frame pointer they could not read: code built without
    /// frame pointers left the register holding data, or the page was not resident. The frames
    /// walked before it are kept.
    UserStackWalkFaults = "user_stack_walk_faults",
}

/// One context read in this many (per CPU) is timed into `Counter::ContextReadNs`.
pub const CONTEXT_READ_TIMING_EVERY: u64 = 16;

/// Entries of `CGROUP_FILTER` (cgroup v2 id → 1): containers selected on one node.
pub const MAX_FILTERED_CGROUPS: u32 = 16_384;

pub const NUM_COUNTERS: usize = Counter::ALL.len();

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are `#[repr(C)]`, contain only integers and byte arrays, and have no
    // implicit padding (checked by the size assertions above).
    unsafe impl aya::Pod for super::SampleHeader {}
    unsafe impl aya::Pod for super::ProcessEvent {}
    unsafe impl aya::Pod for super::SampleBatchHeader {}
    unsafe impl aya::Pod for super::SampleStaging {}
    unsafe impl aya::Pod for super::EbpfConfig {}
    unsafe impl aya::Pod for super::TlsLocation {}
    unsafe impl aya::Pod for super::ContextSource {}
    unsafe impl aya::Pod for super::ContextSourceSlot {}
    unsafe impl aya::Pod for super::ThreadContextHeader {}
    unsafe impl aya::Pod for super::ObiTraceContext {}
    unsafe impl aya::Pod for super::GoRuntimeOffsets {}
    unsafe impl aya::Pod for super::WantedLabelKeys {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_names_are_unique_and_indices_dense() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
            for other in &Counter::ALL[i + 1..] {
                assert_ne!(c.name(), other.name());
            }
        }
    }

    #[test]
    fn kinds_round_trip() {
        for k in [
            RecordKind::Sample,
            RecordKind::ProcessExec,
            RecordKind::ProcessExit,
            RecordKind::ProcessMmapExec,
            RecordKind::SampleBatch,
        ] {
            assert_eq!(RecordKind::from_u16(k as u16), Some(k));
        }
        assert_eq!(RecordKind::from_u16(0), None);
        for v in 0..=4u8 {
            assert_eq!(ContextKind::from_u8(v).map(|k| k as u8), Some(v));
        }
        assert_eq!(ContextKind::from_u8(5), None);
    }
}
