//! Everything that touches aya: loading the embedded eBPF object with its load-time settings,
//! attaching the sampler and the process tracepoints, draining the ring buffer, reading the
//! kernel-side counters, maintaining the pid allow-list. No other module uses aya.

pub mod btf;
pub mod decode;
mod privileges;
mod reader;

use std::{collections::BTreeMap, path::Path};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        PerfEvent, TracePoint,
        perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent},
    },
    util::online_cpus,
};
pub use privileges::check_privileges;
use profiler_common::{Counter, EbpfConfig, names};
pub use reader::spawn_reader;

/// The object `profiler-ebpf` compiles to, built by `build.rs`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/profiler"));

#[derive(Debug, Clone)]
pub struct SamplerConfig {
    pub frequency_hz: u64,
    /// `Some`: sample only these processes (more can be added while running).
    pub pids: Option<Vec<u32>>,
    /// Ring-buffer size in bytes (a power of two, multiple of the page size).
    pub ring_buffer_bytes: u32,
}

/// The loaded and attached kernel programs. Dropping it detaches everything.
pub struct Sampler {
    ebpf: Ebpf,
    counters: PerCpuArray<MapData, u64>,
}

impl Sampler {
    /// Loads and attaches the programs. Returns the sampler and the ring buffer to drain.
    pub fn start(config: &SamplerConfig) -> anyhow::Result<(Self, RingBuf<MapData>)> {
        check_privileges()?;
        if !config.ring_buffer_bytes.is_power_of_two() || config.ring_buffer_bytes < 4096 {
            bail!("ring buffer size must be a power of two of at least 4096 bytes");
        }
        if !(1..=10_000).contains(&config.frequency_hz) {
            bail!("sampling frequency must be between 1 and 10000 Hz");
        }
        ensure_tracefs()?;
        let settings = EbpfConfig {
            agent_tgid: std::process::id(),
            filter_by_pid: u32::from(config.pids.is_some()),
            exit_group_dead_offset: exit_group_dead_offset().unwrap_or(0),
            _pad: 0,
        };
        let mut ebpf = EbpfLoader::new()
            .override_global(names::CONFIG, &settings, true)
            .map_max_entries(names::EVENTS, config.ring_buffer_bytes)
            .load(EBPF_OBJECT)
            .context("load the eBPF programs into the kernel")?;

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

        for (program, event) in [
            (names::ON_PROCESS_EXEC, "sched_process_exec"),
            (names::ON_PROCESS_EXIT, "sched_process_exit"),
        ] {
            let tp: &mut TracePoint = ebpf
                .program_mut(program)
                .with_context(|| format!("program {program} missing"))?
                .try_into()?;
            tp.load().with_context(|| format!("load {program}"))?;
            tp.attach("sched", event)
                .with_context(|| format!("attach sched/{event}"))?;
        }

        let sampler: &mut PerfEvent = ebpf
            .program_mut(names::ON_CPU_SAMPLE)
            .context("sampler program missing")?
            .try_into()?;
        sampler.load().context("load the sampler (verifier)")?;
        let cpus = online_cpus().map_err(|(path, e)| anyhow::anyhow!("read {path}: {e}"))?;
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
        Ok((Self { ebpf, counters }, ring))
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

    /// Detaches every program, then reads the final counters.
    pub fn stop(self) -> KernelCounters {
        let Self { ebpf, counters } = self;
        drop(ebpf);
        read_counters(&counters)
    }

    /// Kernel-side counters summed over CPUs.
    pub fn counters(&self) -> KernelCounters {
        read_counters(&self.counters)
    }
}

fn read_counters(map: &PerCpuArray<MapData, u64>) -> KernelCounters {
    let mut values = BTreeMap::new();
    for counter in Counter::ALL {
        let total = map
            .get(&(*counter as u32), 0)
            .map(|per_cpu| per_cpu.iter().sum())
            .unwrap_or(0);
        values.insert(counter.name(), total);
    }
    KernelCounters(values)
}

/// Snapshot of the kernel-side counters, by name.
#[derive(Debug, Clone, Default)]
pub struct KernelCounters(pub BTreeMap<&'static str, u64>);

impl KernelCounters {
    pub fn get(&self, counter: Counter) -> u64 {
        self.0.get(counter.name()).copied().unwrap_or(0)
    }
}

const TRACEFS: &str = "/sys/kernel/tracing";

/// Tracepoints need tracefs; mount it where a minimal system (or a container) lacks it.
fn ensure_tracefs() -> anyhow::Result<()> {
    if Path::new(TRACEFS).join("events").exists()
        || Path::new("/sys/kernel/debug/tracing/events").exists()
    {
        return Ok(());
    }
    let status = std::process::Command::new("mount")
        .args(["-t", "tracefs", "nodev", TRACEFS])
        .status();
    match status {
        Ok(s) if s.success() => Ok(()),
        _ => bail!(
            "tracefs is not mounted at {TRACEFS} and mounting it failed: mount it (mount -t tracefs nodev {TRACEFS})"
        ),
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
    fn parses_tracepoint_format() {
        let format = "name: sched_process_exit\nformat:\n\tfield:char comm[16];\toffset:8;\tsize:16;\tsigned:0;\n\tfield:pid_t pid;\toffset:24;\tsize:4;\tsigned:1;\n\tfield:bool group_dead;\toffset:32;\tsize:1;\tsigned:0;\n";
        assert_eq!(super::parse_field_offset(format, "group_dead"), Some(32));
        assert_eq!(super::parse_field_offset(format, "pid"), Some(24));
        assert_eq!(super::parse_field_offset(format, "prio"), None);
    }
}
