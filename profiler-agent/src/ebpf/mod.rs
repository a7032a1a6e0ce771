//! Everything that touches aya: loading the embedded eBPF object with its load-time settings,
//! attaching the sampler and the process tracepoints, draining the ring buffer, reading the
//! kernel-side counters, maintaining the pid allow-list. No other module uses aya.

pub mod btf;
mod context_sources;
pub mod decode;
mod obi;
mod privileges;
mod reader;

use std::{
    collections::{BTreeMap, BTreeSet},
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, ProgramArray, RingBuf},
    programs::{
        PerfEvent, TracePoint,
        perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent},
    },
    util::online_cpus,
};
pub use context_sources::ContextSourceMap;
use decode::{DecodeError, Record};
pub use privileges::check_privileges;
use profiler_common::{
    ContextReader, Counter, EbpfConfig, MAX_STAGED_TICKS, MAX_WANTED_KEY_LEN, MAX_WANTED_KEYS,
    STAGING_APPEND_LIMIT, STAGING_BYTES, SampleStaging, WantedLabelKeys, names,
};
pub use reader::{DrainRequest, Heartbeat, count_undecodable, drain_interval, spawn_reader};

/// The object `profiler-ebpf` compiles to, built by `build.rs`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/profiler"));

#[derive(Debug, Clone)]
pub struct SamplerConfig {
    pub frequency_hz: u64,
    /// `Some`: sample only these processes (more can be added while running).
    pub pids: Option<Vec<u32>>,
    /// `Some`: sample only tasks in these cgroup v2 ids (the workload filter; the set can be
    /// replaced while running with [`Sampler::set_cgroup_filter`]). Checked in the kernel
    /// before anything else is done for the sample.
    pub cgroups: Option<BTreeSet<u64>>,
    /// Ring-buffer size in bytes (a power of two, multiple of the page size).
    pub ring_buffer_bytes: u32,
    /// `Some(bpffs root)`: read OBI's `traces_ctx_v1` map pinned at `<root>/otel/`.
    pub obi_bpffs_root: Option<PathBuf>,
    /// Label keys the kernel searches first in Go labels (trace and span id keys).
    pub wanted_label_keys: Vec<String>,
    /// Turn the kernel's run-time statistics of eBPF programs on while the sampler runs
    /// (`BPF_ENABLE_STATS`), so that [`KernelCounters::programs`] measures the sampler's own
    /// cost. They are machine-wide (every eBPF program pays two clock reads per run) and need
    /// CAP_SYS_ADMIN; without it the sampler runs with a warning and no statistics.
    pub bpf_stats: bool,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self {
            frequency_hz: 19,
            pids: None,
            cgroups: None,
            ring_buffer_bytes: 8 << 20,
            obi_bpffs_root: None,
            wanted_label_keys: vec!["trace_id".into(), "span_id".into()],
            bpf_stats: false,
        }
    }
}

/// Packs label keys for the kernel; keys too long to compare, or past the maximum count, are
/// left out with a warning (their labels are still copied while room remains).
fn wanted_label_keys(keys: &[String]) -> WantedLabelKeys {
    let mut wanted = WantedLabelKeys::default();
    let mut n = 0;
    for key in keys {
        if key.is_empty() || key.len() > MAX_WANTED_KEY_LEN || n == MAX_WANTED_KEYS {
            tracing::warn!(
                key,
                "label key not searched in the kernel (too long, or too many keys)"
            );
            continue;
        }
        let mut bytes = [0u8; MAX_WANTED_KEY_LEN];
        bytes[..key.len()].copy_from_slice(key.as_bytes());
        for (word, chunk) in wanted.keys[n].iter_mut().zip(bytes.chunks_exact(8)) {
            *word = u64::from_ne_bytes(chunk.try_into().expect("8 bytes"));
        }
        wanted.lens[n] = key.len() as u8;
        n += 1;
    }
    wanted
}

/// What the collector needs from the kernel side: the ring buffer to drain and the
/// per-process context-source map to fill.
pub struct KernelChannels {
    pub ring: RingBuf<MapData>,
    /// How often to drain `ring`: see [`drain_interval`].
    pub drain_every: std::time::Duration,
    pub context_sources: ContextSourceMap,
}

/// Ticks a CPU's samples wait in the kernel to go to the ring buffer together (see
/// `profiler_common::SampleStaging`): a quarter of a second's worth at most, so staging adds
/// little to the drain interval, and [`MAX_STAGED_TICKS`] at most (8 at 99 Hz: one ring write
/// where there were eight).
pub fn staging_flush_ticks(frequency_hz: u64) -> u32 {
    (frequency_hz / 4).clamp(1, u64::from(MAX_STAGED_TICKS)) as u32
}

/// Staged bytes that send a batch to the ring before its ticks are up: an eighth of the ring
/// at most, so that a batch always fits a small ring.
pub fn staging_flush_bytes(ring_bytes: u32) -> u32 {
    (ring_bytes / 8).clamp(1, STAGING_APPEND_LIMIT as u32)
}

/// The loaded and attached kernel programs. Dropping it detaches everything.
pub struct Sampler {
    ebpf: Ebpf,
    counters: PerCpuArray<MapData, u64>,
    /// Each CPU's samples not yet written to the ring, read once the programs are detached.
    staging: PerCpuArray<MapData, SampleStaging>,
    /// Held while the kernel's eBPF run-time statistics should stay on (`bpf_stats`).
    _stats: Option<OwnedFd>,
}

impl Sampler {
    /// Loads and attaches the programs. Returns the sampler and the ring buffer to drain.
    pub fn start(config: &SamplerConfig) -> anyhow::Result<(Self, KernelChannels)> {
        check_privileges()?;
        if !config.ring_buffer_bytes.is_power_of_two() || config.ring_buffer_bytes < 4096 {
            bail!("ring buffer size must be a power of two of at least 4096 bytes");
        }
        if !(1..=10_000).contains(&config.frequency_hz) {
            bail!("sampling frequency must be between 1 and 10000 Hz");
        }
        ensure_tracefs()?;
        raise_memlock_limit();
        let task = btf::TaskOffsets::of_running_kernel().unwrap_or_else(|e| {
            tracing::warn!(error = %format!("{e:#}"), "no kernel BTF: task fields come from helpers");
            btf::TaskOffsets { fsbase: None, pid: None, tgid: None, comm: None, start_time: None }
        });
        if task.fsbase.is_none() {
            tracing::warn!(
                "no task_struct.thread.fsbase in the kernel BTF: trace contexts will not be read"
            );
        }
        let settings = EbpfConfig {
            agent_tgid: std::process::id(),
            filter_by_pid: u32::from(config.pids.is_some()),
            exit_group_dead_offset: exit_group_dead_offset().unwrap_or(0),
            task_fsbase_offset: task.fsbase.unwrap_or(0),
            obi_enabled: u32::from(config.obi_bpffs_root.is_some()),
            filter_by_cgroup: u32::from(config.cgroups.is_some()),
            task_pid_offset: task.pid.unwrap_or(0),
            task_tgid_offset: task.tgid.unwrap_or(0),
            task_comm_offset: task.comm.unwrap_or(0),
            staging_flush_ticks: staging_flush_ticks(config.frequency_hz),
            staging_flush_bytes: staging_flush_bytes(config.ring_buffer_bytes),
            task_start_time_offset: task.start_time.unwrap_or(0),
        };
        let obi_pin = config
            .obi_bpffs_root
            .as_deref()
            .map(obi::prepare_pin)
            .transpose()?;
        let mut loader = EbpfLoader::new();
        loader
            .override_global(names::CONFIG, &settings, true)
            .map_max_entries(names::EVENTS, config.ring_buffer_bytes);
        match &obi_pin {
            Some(path) => loader.map_pin_path(profiler_common::obi::MAP_NAME, path.as_path()),
            // Off: the map exists (the program references it) but holds nothing.
            None => loader.map_max_entries(profiler_common::obi::MAP_NAME, 1),
        };
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .context("load the eBPF programs into the kernel")?;
        if let Some(path) = &obi_pin {
            tracing::info!(path = %path.display(), "reading OBI trace contexts");
        }
        let mut label_keys: aya::maps::Array<_, WantedLabelKeys> = aya::maps::Array::try_from(
            ebpf.map_mut(names::LABEL_KEYS)
                .context("LABEL_KEYS map missing")?,
        )?;
        label_keys.set(0, wanted_label_keys(&config.wanted_label_keys), 0)?;

        if let Some(pids) = &config.pids {
            let mut filter: HashMap<_, u32, u8> = HashMap::try_from(
                ebpf.map_mut(names::PID_FILTER)
                    .context("PID_FILTER map missing")?,
            )?;
            for pid in pids {
                filter
                    .insert(pid, 1, 0)
                    .with_context(|| format!("allow pid {pid}"))?;
            }
        }

        if let Some(ids) = &config.cgroups {
            sync_cgroup_filter(&mut ebpf, ids)?;
        }

        for (program, category, event) in [
            (names::ON_PROCESS_EXEC, "sched", "sched_process_exec"),
            (names::ON_PROCESS_EXIT, "sched", "sched_process_exit"),
            // Executable mappings (dlopen): a trace-context writer library may have arrived,
            // and addresses in the new code need the process's maps re-read.
            (names::ON_MMAP, "syscalls", "sys_enter_mmap"),
        ] {
            let tp: &mut TracePoint = ebpf
                .program_mut(program)
                .with_context(|| format!("program {program} missing"))?
                .try_into()?;
            tp.load().with_context(|| format!("load {program}"))?;
            match tp.attach(category, event) {
                Ok(_) => {}
                // Kernels built without syscall tracepoints (CONFIG_FTRACE_SYSCALLS): still
                // profile, without noticing libraries loaded after a process's first sample.
                Err(e) if program == names::ON_MMAP => tracing::warn!(
                    error = %e,
                    "no {category}/{event} tracepoint: a trace-context writer loaded with dlopen \
                     after a process was first sampled is not found, and its code is symbolized \
                     only after the 30 s maps re-read"
                ),
                Err(e) => {
                    return Err(e).with_context(|| format!("attach {category}/{event}"));
                }
            }
        }

        // Context readers first: the sampler tail-calls into them by context kind (the OTEP
        // 4947 thread context it reads itself).
        let mut readers = Vec::new();
        for (kind, name) in [
            (ContextReader::GoLabelsMap, names::READ_GO_LABELS_MAP),
            (ContextReader::GoLabelsSlice, names::READ_GO_LABELS_SLICE),
            (ContextReader::CustomLabels, names::READ_CUSTOM_LABELS),
        ] {
            let program: &mut PerfEvent = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing"))?
                .try_into()?;
            program
                .load()
                .with_context(|| format!("load {name} (verifier)"))?;
            readers.push((kind, program.fd()?.try_clone()?));
        }
        let mut table = ProgramArray::try_from(
            ebpf.map_mut(names::CONTEXT_READERS)
                .context("CONTEXT_READERS map missing")?,
        )?;
        for (kind, fd) in &readers {
            table.set(*kind as u32, fd, 0)?;
        }

        let sampler: &mut PerfEvent = ebpf
            .program_mut(names::ON_CPU_SAMPLE)
            .context("sampler program missing")?
            .try_into()?;
        sampler.load().context("load the sampler (verifier)")?;
        let cpus = online_cpus().map_err(|(path, e)| anyhow::anyhow!("read {path}: {e}"))?;
        let drain_every = drain_interval(
            config.frequency_hz,
            cpus.len() as u64,
            config.ring_buffer_bytes,
        );
        for cpu in cpus {
            sampler
                .attach(
                    PerfEventConfig::Software(SoftwareEvent::CpuClock),
                    PerfEventScope::AllProcessesOneCpu { cpu },
                    SamplePolicy::Frequency(config.frequency_hz),
                    false,
                )
                .with_context(|| format!("attach the sampler to cpu-clock on CPU {cpu}"))?;
        }

        let ring = RingBuf::try_from(ebpf.take_map(names::EVENTS).context("EVENTS map missing")?)?;
        let counters = PerCpuArray::try_from(
            ebpf.take_map(names::COUNTERS)
                .context("COUNTERS map missing")?,
        )?;
        let staging = PerCpuArray::try_from(
            ebpf.take_map(names::STAGING)
                .context("STAGING map missing")?,
        )?;
        let context_sources = ContextSourceMap::new(
            HashMap::try_from(
                ebpf.take_map(names::CONTEXT_SOURCES)
                    .context("CONTEXT_SOURCES map missing")?,
            )?,
            Array::try_from(
                ebpf.take_map(names::CONTEXT_SOURCE_SLOTS)
                    .context("CONTEXT_SOURCE_SLOTS map missing")?,
            )?,
        );
        let stats = config.bpf_stats.then(enable_run_time_stats).flatten();
        Ok((
            Self {
                ebpf,
                counters,
                staging,
                _stats: stats,
            },
            KernelChannels {
                ring,
                drain_every,
                context_sources,
            },
        ))
    }

    /// Adds a process to the allow-list (only meaningful when started with `pids`).
    pub fn allow_pid(&mut self, pid: u32) -> anyhow::Result<()> {
        let mut filter: HashMap<_, u32, u8> = HashMap::try_from(
            self.ebpf
                .map_mut(names::PID_FILTER)
                .context("PID_FILTER map missing")?,
        )?;
        filter.insert(pid, 1, 0)?;
        Ok(())
    }

    /// Removes a process from the allow-list (an exited process, or one that left the selected
    /// workloads). Absent is fine.
    pub fn disallow_pid(&mut self, pid: u32) -> anyhow::Result<()> {
        let mut filter: HashMap<_, u32, u8> = HashMap::try_from(
            self.ebpf
                .map_mut(names::PID_FILTER)
                .context("PID_FILTER map missing")?,
        )?;
        let _ = filter.remove(&pid);
        Ok(())
    }

    /// Makes `ids` the cgroup allow-list (only meaningful when started with `cgroups`): adds
    /// what is new, removes what is gone. Returns how many entries changed.
    pub fn set_cgroup_filter(&mut self, ids: &BTreeSet<u64>) -> anyhow::Result<usize> {
        sync_cgroup_filter(&mut self.ebpf, ids)
    }

    /// Detaches every program, then reads the final counters and the samples still staged on
    /// each CPU (decoded, or the errors that lost them).
    pub fn stop(self) -> (KernelCounters, Vec<Result<Record, DecodeError>>) {
        let Self {
            ebpf,
            counters,
            staging,
            _stats,
        } = self;
        // The programs' statistics go with the programs; the counters and the staging are
        // read once nothing can add to them.
        let programs = program_runs(&ebpf);
        drop(ebpf);
        let mut staged = Vec::new();
        match staging.get(&0, 0) {
            Ok(per_cpu) => {
                for cpu in per_cpu.iter() {
                    decode_staged(cpu, |record| staged.push(record));
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the samples staged at stop"),
        }
        (
            KernelCounters {
                counters: read_counters(&counters),
                programs,
            },
            staged,
        )
    }

    /// Kernel-side counters summed over CPUs, and the programs' run-time statistics.
    pub fn counters(&self) -> KernelCounters {
        // The programs first: every run they count is then also in the counters read after.
        KernelCounters {
            programs: program_runs(&self.ebpf),
            counters: read_counters(&self.counters),
        }
    }
}

/// `BPF_ENABLE_STATS`: on for as long as the returned descriptor is open (the kernel counts
/// holders, so it stays on for whoever else turned it on). `None`, with a warning, when the
/// kernel refuses.
fn enable_run_time_stats() -> Option<OwnedFd> {
    match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
        Ok(fd) => Some(fd),
        Err(e) => {
            tracing::warn!(
                error = %e,
                "cannot turn on eBPF run-time statistics (BPF_ENABLE_STATS needs CAP_SYS_ADMIN \
                 and Linux 5.8): the sampler's own cost will read as zero"
            );
            None
        }
    }
}

/// Run time and run count of each loaded program, as the kernel's statistics have them (zero
/// while the statistics are off). A label reader entered by a tail call is not counted on its
/// own: its time is inside the sampler's.
fn program_runs(ebpf: &Ebpf) -> Vec<ProgramRuns> {
    let mut runs: Vec<ProgramRuns> = ebpf
        .programs()
        .filter_map(|(name, program)| {
            let info = program.info().ok()?;
            Some(ProgramRuns {
                program: name.to_owned(),
                run_time: info.run_time(),
                runs: info.run_count(),
            })
        })
        .collect();
    runs.sort_by(|a, b| a.program.cmp(&b.program));
    runs
}

fn sync_cgroup_filter(ebpf: &mut Ebpf, ids: &BTreeSet<u64>) -> anyhow::Result<usize> {
    if ids.len() > profiler_common::MAX_FILTERED_CGROUPS as usize {
        bail!(
            "{} cgroups selected; the kernel filter holds at most {}",
            ids.len(),
            profiler_common::MAX_FILTERED_CGROUPS
        );
    }
    let mut filter: HashMap<_, u64, u8> = HashMap::try_from(
        ebpf.map_mut(names::CGROUP_FILTER)
            .context("CGROUP_FILTER map missing")?,
    )?;
    let present: BTreeSet<u64> = filter.keys().filter_map(Result::ok).collect();
    let mut changed = 0;
    for gone in present.difference(ids) {
        let _ = filter.remove(gone);
        changed += 1;
    }
    for new in ids.difference(&present) {
        filter
            .insert(new, 1, 0)
            .with_context(|| format!("allow cgroup {new}"))?;
        changed += 1;
    }
    Ok(changed)
}

/// One CPU's staged samples, decoded as the batch they would have gone to the ring as.
fn decode_staged(staging: &SampleStaging, each: impl FnMut(Result<Record, DecodeError>)) {
    let used = (staging.used as usize).min(STAGING_BYTES);
    decode::decode_batch_samples(staging.batch.samples, &staging.samples[..used], each);
}

fn read_counters(map: &PerCpuArray<MapData, u64>) -> BTreeMap<&'static str, u64> {
    let mut values = BTreeMap::new();
    for counter in Counter::ALL {
        let total = map
            .get(&(*counter as u32), 0)
            .map(|per_cpu| per_cpu.iter().sum())
            .unwrap_or(0);
        values.insert(counter.name(), total);
    }
    values
}

/// Snapshot of the kernel-side counters, by name.
#[derive(Debug, Clone, Default)]
pub struct KernelCounters {
    pub counters: BTreeMap<&'static str, u64>,
    /// Each program's run-time statistics (see [`SamplerConfig::bpf_stats`]).
    pub programs: Vec<ProgramRuns>,
}

impl KernelCounters {
    pub fn get(&self, counter: Counter) -> u64 {
        self.counters.get(counter.name()).copied().unwrap_or(0)
    }

    /// Mean time of one run of the sampler (`on_cpu_sample`, its tail calls included), over
    /// every tick it ran on (idle and filtered ones too), when the statistics counted any.
    pub fn sampler_time_per_run(&self) -> Option<Duration> {
        let sampler = self
            .programs
            .iter()
            .find(|p| p.program == names::ON_CPU_SAMPLE)?;
        let per_run = sampler
            .run_time
            .as_nanos()
            .checked_div(u128::from(sampler.runs))?;
        Some(Duration::from_nanos(per_run as u64))
    }
}

/// One program's share of the kernel's eBPF run-time statistics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramRuns {
    pub program: String,
    pub run_time: Duration,
    pub runs: u64,
}

const TRACEFS: &str = "/sys/kernel/tracing";

/// Tracepoints need tracefs; mount it where a minimal system lacks it. A tracefs the agent may
/// not read (mode 0700, a non-root user without CAP_DAC_READ_SEARCH) is named as such; in a
/// container, mount the host's tracefs instead of relying on the agent mounting it (that would
/// take CAP_SYS_ADMIN).
fn ensure_tracefs() -> anyhow::Result<()> {
    let mut denied = None;
    for events in [
        Path::new(TRACEFS).join("events"),
        Path::new("/sys/kernel/debug/tracing/events").to_path_buf(),
    ] {
        match std::fs::metadata(&events) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                denied.get_or_insert(events);
            }
            Err(_) => {}
        }
    }
    if let Some(path) = denied {
        bail!(
            "{} is not readable: run as root or grant CAP_DAC_READ_SEARCH (tracefs is root-only)",
            path.display()
        );
    }
    let status = std::process::Command::new("mount")
        .args(["-t", "tracefs", "nodev", TRACEFS])
        .stderr(std::process::Stdio::null())
        .status();
    match status {
        Ok(s) if s.success() => Ok(()),
        _ => bail!(
            "tracefs is not mounted at {TRACEFS} and mounting it failed: mount it (mount -t tracefs nodev {TRACEFS}; in a container, a hostPath volume)"
        ),
    }
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK (later ones to the memory cgroup).
/// Raise it when allowed (root, or CAP_SYS_RESOURCE); elsewhere the limit does not matter or
/// loading reports the failure.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid rlimit struct; setrlimit has no other preconditions.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "RLIMIT_MEMLOCK not raised (only kernels before 5.11 need it)"
        );
    }
}

/// Offset of `group_dead` in the `sched_process_exit` record, from the tracepoint's format file
/// (the field exists from Linux 6.16 on).
fn exit_group_dead_offset() -> Option<u32> {
    let format = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .find_map(|root| {
            std::fs::read_to_string(format!("{root}/events/sched/sched_process_exit/format")).ok()
        })?;
    parse_field_offset(&format, "group_dead")
}

fn parse_field_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let line = line.trim();
        let decl = line.strip_prefix("field:")?.split(';').next()?;
        let name = decl.rsplit(' ').next()?;
        if name != field {
            return None;
        }
        let offset = line
            .split(';')
            .find_map(|p| p.trim().strip_prefix("offset:"))?;
        offset.trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn packs_wanted_label_keys() {
        let keys = ["trace_id", "", &"x".repeat(40), "span_id"].map(String::from);
        let w = super::wanted_label_keys(&keys);
        assert_eq!(w.lens, [8, 7, 0, 0]);
        assert_eq!(w.keys[0][0], u64::from_ne_bytes(*b"trace_id"));
        assert_eq!(w.keys[1][0], u64::from_ne_bytes(*b"span_id\0"));
        assert_eq!(w.keys[1][1], 0);
    }

    #[test]
    fn parses_tracepoint_format() {
        let format = "name: sched_process_exit\nformat:\n\tfield:char comm[16];\toffset:8;\tsize:16;\tsigned:0;\n\tfield:pid_t pid;\toffset:24;\tsize:4;\tsigned:1;\n\tfield:bool group_dead;\toffset:32;\tsize:1;\tsigned:0;\n";
        assert_eq!(super::parse_field_offset(format, "group_dead"), Some(32));
        assert_eq!(super::parse_field_offset(format, "pid"), Some(24));
        assert_eq!(super::parse_field_offset(format, "prio"), None);
    }
}
