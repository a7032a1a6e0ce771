//! Output formats. The only modules that know wire formats (pprof protobuf, folded text, OTLP
//! profiles).

pub mod folded;
pub mod otlp;
pub mod pprof;
pub mod pprof_proto;
pub mod render;
pub mod synthetic;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use anyhow::Context as _;

use crate::{
    collector::{Sink, SinkContext},
    context::hex,
    process::ObjectStore,
    profile::{Aggregate, ProcessDetails, traces::TraceProfile},
    symbolize::Symbolizer,
};
use pprof::{LabelValue, PprofBuilder};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// gzip-compressed pprof protobuf.
    Pprof,
    /// Folded stacks, one line per stack.
    Folded,
}

/// The whole aggregate as one pprof profile: labels pid, tid, thread and process names.
pub fn aggregate_to_pprof(
    aggregate: &Aggregate,
    frequency_hz: u64,
    window: (u64, u64),
    symbolizer: &mut Symbolizer,
    objects: &ObjectStore,
) -> pprof_proto::Profile {
    let (start, end) = window;
    let mut builder = PprofBuilder::new(
        frequency_hz,
        start,
        end.saturating_sub(start),
        symbolizer,
        objects,
    );
    let placements = aggregate_placements(aggregate);
    for (key, value) in aggregate.sorted_samples() {
        let thread = name_of(&aggregate.thread_names, key.tid);
        let process = name_of(&aggregate.process_names, key.pid);
        let context = key.context.map(|c| aggregate.context(c));
        let ids = context.map(|c| (hex(&c.trace_id), hex(&c.span_id)));
        let mut labels = vec![
            ("pid", LabelValue::Num(i64::from(key.pid))),
            ("tid", LabelValue::Num(i64::from(key.tid))),
            ("thread_name", LabelValue::Str(thread)),
            ("process_name", LabelValue::Str(process)),
        ];
        if let Some(details) = aggregate.process_details.get(&key.pid) {
            labels.push(("service_name", LabelValue::Str(details.service_name())));
        }
        push_placement(&mut labels, placements.get(&key.pid));
        if let (Some((trace_id, span_id)), Some(context)) = (&ids, context) {
            labels.push(("trace_id", LabelValue::Str(trace_id)));
            labels.push(("span_id", LabelValue::Str(span_id)));
            labels.extend(
                context
                    .labels
                    .iter()
                    .map(|(k, v)| (&**k, LabelValue::Str(v))),
            );
        }
        builder.add_sample(aggregate.stacks.get(key.stack), value.count, &labels);
    }
    builder.finish()
}

/// The samples of one process during an interval, as one pprof (the store's time buckets).
pub struct ProcessProfile {
    pub pid: u32,
    pub process_name: String,
    pub service_name: Option<String>,
    /// Its pod's namespace and name (Kubernetes), when known.
    pub pod: Option<(String, String)>,
    pub samples: u64,
    pub profile: pprof_proto::Profile,
}

/// One profile per process of the aggregate, every sample included: traced ones are labelled
/// `traced=true` and aggregated without their ids (per-trace profiles keep those), so a
/// time-window flame graph shows all the CPU at the cost of one entry per distinct stack.
/// Labels: `pid`, `thread_name`, `process_name`, `service_name`, `traced`, and where the
/// process runs (`k8s_namespace_name`, `k8s_pod_name`, …, `container_pid`).
pub fn process_profiles(
    aggregate: &Aggregate,
    frequency_hz: u64,
    window: (u64, u64),
    symbolizer: &mut Symbolizer,
    objects: &ObjectStore,
) -> Vec<ProcessProfile> {
    use std::collections::BTreeMap;
    // Symbolize every frame in one batch (one blazesym call per object) before building.
    symbolizer.resolve(aggregate.frames().collect::<Vec<_>>(), objects);
    let mut by_pid: BTreeMap<u32, BTreeMap<(&str, crate::profile::StackId, bool), u64>> =
        BTreeMap::new();
    for (key, value) in &aggregate.samples {
        let thread = name_of(&aggregate.thread_names, key.tid);
        *by_pid
            .entry(key.pid)
            .or_default()
            .entry((thread, key.stack, key.context.is_some()))
            .or_default() += value.count;
    }
    let (start, end) = window;
    let placements = aggregate_placements(aggregate);
    by_pid
        .into_iter()
        .map(|(pid, samples)| {
            let process_name = aggregate
                .process_names
                .get(&pid)
                .cloned()
                .unwrap_or_else(|| format!("pid {pid}"));
            let service_name = aggregate
                .process_details
                .get(&pid)
                .map(|d| d.service_name().to_owned());
            let mut builder = PprofBuilder::new(
                frequency_hz,
                start,
                end.saturating_sub(start),
                symbolizer,
                objects,
            );
            let mut total = 0;
            for ((thread, stack, traced), count) in samples {
                let mut labels = vec![
                    ("pid", LabelValue::Num(i64::from(pid))),
                    ("thread_name", LabelValue::Str(thread)),
                    ("process_name", LabelValue::Str(&process_name)),
                    (
                        "traced",
                        LabelValue::Str(if traced { "true" } else { "false" }),
                    ),
                ];
                if let Some(service) = &service_name {
                    labels.push(("service_name", LabelValue::Str(service)));
                }
                push_placement(&mut labels, placements.get(&pid));
                builder.add_sample(aggregate.stacks.get(stack), count, &labels);
                total += count;
            }
            let pod = aggregate
                .process_details
                .get(&pid)
                .and_then(|d| d.pod.as_ref())
                .map(|p| (p.namespace.clone(), p.name.clone()));
            ProcessProfile {
                pid,
                samples: total,
                profile: builder.finish(),
                process_name,
                service_name,
                pod,
            }
        })
        .collect()
}

/// One trace's profile: every sample labelled with `trace_id` and `span_id` (lowercase hex, as
/// Pyroscope derives them from OTLP links), thread and process, and the context's attributes.
pub fn trace_to_pprof(
    trace: &TraceProfile,
    frequency_hz: u64,
    symbolizer: &mut Symbolizer,
    objects: &ObjectStore,
) -> pprof_proto::Profile {
    let window = (trace.first_unix_ns, trace.last_unix_ns);
    let mut builder = PprofBuilder::new(
        frequency_hz,
        window.0,
        window.1.saturating_sub(window.0),
        symbolizer,
        objects,
    );
    add_trace_samples(&mut builder, trace, None);
    builder.finish()
}

/// Adds a trace's samples to `builder`, labelled as [`trace_to_pprof`] labels them, and with
/// `extra` (a numeric label) on each when given: the store tells the traces of one batch
/// profile apart by it.
pub fn add_trace_samples(
    builder: &mut PprofBuilder<'_>,
    trace: &TraceProfile,
    extra: Option<(&str, i64)>,
) {
    let trace_id = hex(&trace.trace_id);
    let placements = placement_labels(
        trace
            .processes
            .iter()
            .map(|(pid, process)| (*pid, &*process.details)),
    );
    for (key, value) in trace.sorted_samples() {
        let span_id = hex(&key.span_id);
        let process = trace.processes.get(&key.pid);
        let mut labels = vec![
            ("trace_id", LabelValue::Str(&trace_id)),
            ("span_id", LabelValue::Str(&span_id)),
            ("pid", LabelValue::Num(i64::from(key.pid))),
            ("tid", LabelValue::Num(i64::from(key.tid))),
            ("thread_name", LabelValue::Str(trace.thread_name(key.tid))),
            (
                "process_name",
                LabelValue::Str(process.map_or("", |p| p.name.as_str())),
            ),
        ];
        if let Some(process) = process {
            labels.push(("service_name", LabelValue::Str(process.service_name())));
        }
        push_placement(&mut labels, placements.get(&key.pid));
        labels.extend(key.labels.iter().map(|(k, v)| (&**k, LabelValue::Str(v))));
        labels.extend(extra.map(|(k, v)| (k, LabelValue::Num(v))));
        builder.add_sample(&key.stack, value.count, &labels);
    }
}

/// A thread's or process's name from a profile's table; empty when it was never recorded.
fn name_of(names: &foldhash::HashMap<u32, String>, id: u32) -> &str {
    names.get(&id).map_or("", String::as_str)
}

fn aggregate_placements(aggregate: &Aggregate) -> HashMap<u32, Vec<(String, String)>> {
    placement_labels(
        aggregate
            .process_details
            .iter()
            .map(|(pid, d)| (*pid, &**d)),
    )
}

/// Each process's placement labels (pod, container, pid in its container), computed once per
/// profile rather than once per sample.
fn placement_labels<'a>(
    details: impl IntoIterator<Item = (u32, &'a ProcessDetails)>,
) -> HashMap<u32, Vec<(String, String)>> {
    details
        .into_iter()
        .map(|(pid, d)| (pid, d.placement_labels()))
        .filter(|(_, labels)| !labels.is_empty())
        .collect()
}

fn push_placement<'a>(
    labels: &mut Vec<(&'a str, LabelValue<'a>)>,
    placement: Option<&'a Vec<(String, String)>>,
) {
    labels.extend(
        placement
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.as_str(), LabelValue::Str(v))),
    );
}

/// Writes `bytes` to `path` atomically (temporary file beside it, then rename), so a reader
/// never sees half a profile. A path that exists and is not a regular file (`/dev/null`,
/// `/dev/stdout`, a FIFO) is written through instead: renaming over it would replace the
/// device node with a plain file. A symlink is followed, so the link itself survives.
fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let target = match std::fs::canonicalize(path) {
        Ok(resolved) if !resolved.is_file() => {
            return std::fs::write(&resolved, bytes)
                .with_context(|| format!("write {}", path.display()));
        }
        Ok(resolved) => resolved,
        Err(_) => path.to_owned(),
    };
    let mut tmp_name = target.file_name().unwrap_or_default().to_owned();
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = target.with_file_name(tmp_name);
    std::fs::write(&tmp, bytes).with_context(|| format!("write {}", tmp.display()))?;
    if let Err(e) = std::fs::rename(&tmp, &target) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("rename to {}", target.display()));
    }
    Ok(())
}

/// Sink: one pprof per trace, `<dir>/<trace_id>.pb.gz`, rewritten when late samples arrive.
pub struct PerTraceDir {
    dir: PathBuf,
}

impl PerTraceDir {
    pub fn create(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }
}

impl Sink for PerTraceDir {
    fn trace(&mut self, trace: &TraceProfile, cx: &mut SinkContext<'_>) {
        let profile = trace_to_pprof(trace, cx.frequency_hz, cx.symbolizer, cx.objects);
        let path = self.dir.join(format!("{}.pb.gz", hex(&trace.trace_id)));
        if let Err(e) = write_atomically(&path, &pprof::encode_gzip(&profile)) {
            tracing::error!(error = %format!("{e:#}"), "cannot write a trace profile");
        }
    }
}

/// Sink: one pprof per interval, `<dir>/profile-<unix seconds>.pb.gz`.
pub struct IntervalDir {
    dir: PathBuf,
}

impl IntervalDir {
    pub fn create(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }
}

impl Sink for IntervalDir {
    fn trace(&mut self, _trace: &TraceProfile, _cx: &mut SinkContext<'_>) {}

    fn interval(&mut self, aggregate: &Aggregate, window: (u64, u64), cx: &mut SinkContext<'_>) {
        if aggregate.total_samples == 0 {
            return;
        }
        let path = self
            .dir
            .join(format!("profile-{}.pb.gz", window.1 / 1_000_000_000));
        let profile = aggregate_to_pprof(
            aggregate,
            cx.frequency_hz,
            window,
            cx.symbolizer,
            cx.objects,
        );
        match write_atomically(&path, &pprof::encode_gzip(&profile)) {
            Ok(()) => {
                tracing::info!(samples = aggregate.total_samples, path = %path.display(), "wrote profile")
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "cannot write an interval profile")
            }
        }
    }
}

/// Writes the aggregate to `path` in `format`, atomically (temporary file, then rename).
pub fn write_file(
    path: &Path,
    format: Format,
    aggregate: &Aggregate,
    frequency_hz: u64,
    window: (u64, u64),
    symbolizer: &mut Symbolizer,
    objects: &ObjectStore,
) -> anyhow::Result<()> {
    let bytes = match format {
        Format::Pprof => pprof::encode_gzip(&aggregate_to_pprof(
            aggregate,
            frequency_hz,
            window,
            symbolizer,
            objects,
        )),
        Format::Folded => folded::render(aggregate, symbolizer, objects).into_bytes(),
    };
    write_atomically(path, &bytes)
}

#[cfg(test)]
mod write_tests {
    use std::os::unix::fs::FileTypeExt as _;

    use super::write_atomically;

    fn scratch_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("write-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn replaces_a_regular_file_and_leaves_no_temporary_behind() {
        let dir = scratch_dir("regular");
        let path = dir.join("profile.pb.gz");
        std::fs::write(&path, b"old").unwrap();
        write_atomically(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn writes_through_a_fifo_instead_of_replacing_it() {
        let dir = scratch_dir("fifo");
        let fifo = dir.join("pipe");
        let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::read(fifo).unwrap())
        };
        write_atomically(&fifo, b"through the pipe").unwrap();
        assert_eq!(reader.join().unwrap(), b"through the pipe");
        assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn dev_null_stays_a_device() {
        write_atomically(std::path::Path::new("/dev/null"), b"discarded").unwrap();
        let file_type = std::fs::metadata("/dev/null").unwrap().file_type();
        assert!(
            file_type.is_char_device(),
            "/dev/null replaced: {file_type:?}"
        );
    }

    #[test]
    fn follows_a_symlink_and_keeps_it() {
        let dir = scratch_dir("symlink");
        let real = dir.join("real.folded");
        let link = dir.join("link.folded");
        std::fs::write(&real, b"old").unwrap();
        std::os::unix::fs::symlink(&real, &link).unwrap();
        write_atomically(&link, b"new").unwrap();
        assert!(
            std::fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(std::fs::read(&real).unwrap(), b"new");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
