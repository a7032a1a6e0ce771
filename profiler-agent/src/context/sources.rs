//! Chooses, per process, which trace-context source the kernel reads, and keeps what decoding
//! needs from the process (the OTEP 4719 process context: service name, attribute key map).
//!
//! A process is inspected when its first sample arrives (processes that never run need no
//! source), and again after it maps a file executable (dlopen) or execs. Each mapped ELF object is
//! parsed once for the agent's lifetime (keyed by device and inode) to learn whether it defines
//! one of the TLS symbols writers publish. Precedence: OTEP 4947 thread context, then
//! custom-labels. Transient failures (the loader has not relocated yet, a thread has no TLS
//! block yet) are retried on the next ticks, a bounded number of times.

use foldhash::{HashMap, HashMapExt};
use std::{
    fs::File,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use object::read::ReadCache;
use procfs::process::{MMapPath, MemoryMap};
use profiler_common::{
    ContextKind, ContextReader, ContextSource, GoLabelsFormat, GoRuntimeOffsets, TlsLocation,
};

use crate::{
    ebpf::ContextSourceMap,
    metrics::Metrics,
    process::{
        MapsOnce,
        golang::{self, GoBinary, LabelsFormat},
        process_context::{ProcessContextError, ProcessContextInfo, ProcessContextReader},
        tls::{self, LibcFlavor, TlsSymbol},
    },
};

/// OTEP 4947's thread-local pointer to the active record.
pub const THREAD_CONTEXT_SYMBOL: &str = "otel_thread_ctx_v1";
/// custom-labels v1's thread-local pointer to the current label set.
pub const CUSTOM_LABELS_SYMBOL: &str = "custom_labels_current_set";
/// Inspections of a process that keep failing transiently stop after this many.
const MAX_ATTEMPTS: u32 = 10;

/// What an object offers.
#[derive(Debug, Clone)]
struct ObjectSources {
    thread_context: Option<TlsSymbol>,
    custom_labels: Option<TlsSymbol>,
    /// A Go program (labels are read through its runtime structs).
    go: Option<GoBinary>,
}

/// A source found in one of the process's objects, before resolution against its memory.
enum Candidate {
    Tls(ContextKind, TlsSymbol),
    Go(GoBinary),
}

impl Candidate {
    /// Lower is preferred: thread context > Go labels > custom-labels (DESIGN §4).
    fn rank(&self) -> u8 {
        match self {
            Candidate::Tls(ContextKind::ThreadContext, _) => 0,
            Candidate::Go(_) => 1,
            Candidate::Tls(..) => 2,
        }
    }
}

/// Where a process stands.
#[derive(Debug, Clone)]
enum ProcessState {
    /// The kernel reads a source.
    Resolved,
    /// No writer found. `new_code`: it mapped executable code since, so look again at its next
    /// sample.
    NoWriter { new_code: bool },
    /// A writer exists but could not be resolved yet.
    Retry { attempts: u32 },
}

/// What the collector keeps per process for decoding.
#[derive(Debug, Clone, Default)]
pub struct ProcessMeta {
    pub service_name: Option<String>,
    /// `threadlocal.attribute_key_map`: names of OTEP 4947 attribute key indexes.
    pub attribute_keys: Arc<[Arc<str>]>,
    pub resource_attributes: Vec<(String, String)>,
}

pub struct ContextSources {
    map: ContextSourceMap,
    objects: HashMap<(i32, i32, u64), Option<ObjectSources>>,
    processes: HashMap<u32, ProcessState>,
    contexts: HashMap<u32, (ProcessContextReader, Arc<ProcessMeta>)>,
    /// When a process without a published context was last searched for one because its
    /// samples named attribute keys (a search reads its whole maps file).
    context_searched: HashMap<u32, Instant>,
    proc_root: PathBuf,
    metrics: Metrics,
}

/// A process whose samples name attribute keys but which published no process context is
/// searched for one at most this often.
const CONTEXT_SEARCH_EVERY: Duration = Duration::from_secs(10);

impl ContextSources {
    pub fn new(map: ContextSourceMap, metrics: Metrics) -> Self {
        Self {
            map,
            objects: HashMap::new(),
            processes: HashMap::new(),
            contexts: HashMap::new(),
            context_searched: HashMap::new(),
            proc_root: PathBuf::from("/proc"),
            metrics,
        }
    }

    /// A sample of `pid` arrived: inspect it if it is new or has new code. `maps`: the
    /// process's mappings, read here if needed and left for the rest of the sample's handling.
    pub fn on_sample(&mut self, pid: u32, maps: &mut MapsOnce) {
        match self.processes.get(&pid) {
            None | Some(ProcessState::NoWriter { new_code: true }) => self.inspect(pid, maps),
            Some(_) => {}
        }
    }

    /// A new program image: nothing of the old one applies; its libraries are not loaded yet,
    /// so it is inspected at its first sample.
    pub fn on_exec(&mut self, pid: u32) {
        self.forget(pid);
    }

    pub fn on_exit(&mut self, pid: u32) {
        self.forget(pid);
    }

    /// New executable code in the process: a writer library may have arrived.
    pub fn on_new_code(&mut self, pid: u32) {
        if let Some(ProcessState::NoWriter { new_code }) = self.processes.get_mut(&pid) {
            *new_code = true;
        }
    }

    /// Periodic: retry transient failures; re-read process contexts whose timestamp changed.
    pub fn tick(&mut self) {
        let retry: Vec<u32> = self
            .processes
            .iter()
            .filter(|(_, s)| matches!(s, ProcessState::Retry { .. }))
            .map(|(pid, _)| *pid)
            .collect();
        for pid in retry {
            self.inspect(pid, &mut MapsOnce::default());
        }
        let mut gone = Vec::new();
        for (pid, (reader, meta)) in &mut self.contexts {
            match reader.read_if_changed() {
                Ok(Some(info)) => {
                    *meta = Arc::new(meta_from(&info));
                    self.metrics.inc("process_context_updates");
                }
                Ok(None) => {}
                Err(ProcessContextError::Gone | ProcessContextError::NotPublished) => {
                    gone.push(*pid)
                }
                Err(_) => self.metrics.inc("process_context_read_errors"),
            }
        }
        for pid in gone {
            self.contexts.remove(&pid);
        }
    }

    /// The process's context metadata, if it published one.
    pub fn meta(&self, pid: u32) -> Option<&Arc<ProcessMeta>> {
        self.contexts.get(&pid).map(|(_, meta)| meta)
    }

    /// A sample named an attribute key index the cached key map does not have: the process may
    /// have published a longer map. A context already found is re-read by [`tick`](Self::tick)
    /// when its timestamp changes, which is how a writer announces a new map; a process
    /// without one is searched again at most every [`CONTEXT_SEARCH_EVERY`].
    pub fn refresh_process_context(&mut self, pid: u32) {
        if self.contexts.contains_key(&pid) {
            return;
        }
        let now = Instant::now();
        if self
            .context_searched
            .get(&pid)
            .is_some_and(|at| now.duration_since(*at) < CONTEXT_SEARCH_EVERY)
        {
            return;
        }
        self.context_searched.insert(pid, now);
        self.read_process_context(pid);
    }

    fn forget(&mut self, pid: u32) {
        self.processes.remove(&pid);
        self.contexts.remove(&pid);
        self.context_searched.remove(&pid);
        self.map.remove(pid);
    }

    fn inspect(&mut self, pid: u32, maps: &mut MapsOnce) {
        self.metrics.inc("context_process_inspections");
        let attempts = match self.processes.get(&pid) {
            Some(ProcessState::Retry { attempts }) => *attempts,
            _ => 0,
        };
        let state = match self.resolve(pid, maps) {
            Ok(Some(source)) => {
                let kind = ContextKind::from_u8(source.kind);
                match self.map.set(pid, &source) {
                    Ok(()) => {
                        self.metrics.inc("context_sources_resolved");
                        tracing::debug!(pid, ?kind, tls = ?source.tls, "trace-context source");
                        ProcessState::Resolved
                    }
                    Err(e) => {
                        self.metrics.inc("context_sources_map_full");
                        tracing::debug!(pid, error = %format!("{e:#}"), "cannot set a context source");
                        ProcessState::NoWriter { new_code: false }
                    }
                }
            }
            Ok(None) => {
                self.map.set_none(pid);
                ProcessState::NoWriter { new_code: false }
            }
            Err(e) if e.is_transient() && attempts + 1 < MAX_ATTEMPTS => {
                self.metrics.inc("context_sources_retried");
                ProcessState::Retry {
                    attempts: attempts + 1,
                }
            }
            Err(e) => {
                self.metrics.inc("context_sources_failed");
                tracing::info!(pid, error = %e, "trace-context writer found but not readable");
                self.map.set_none(pid);
                ProcessState::NoWriter { new_code: false }
            }
        };
        self.processes.insert(pid, state);
        if !self.contexts.contains_key(&pid) {
            self.read_process_context(pid);
        }
    }

    /// The best source among the process's mapped objects, resolved against its memory.
    fn resolve(
        &mut self,
        pid: u32,
        maps: &mut MapsOnce,
    ) -> Result<Option<ContextSource>, tls::TlsError> {
        let proc_dir = self.proc_root.join(pid.to_string());
        let Ok(maps) = maps.get(&proc_dir) else {
            return Ok(None);
        };
        let mut best: Option<(Candidate, Vec<MemoryMap>, PathBuf)> = None;
        for (key, entries) in group_by_file(maps) {
            let open_path = map_files_path(&proc_dir, &entries[0]);
            let Some(sources) = self.object_sources(key, &open_path, &proc_dir, &entries[0]) else {
                continue;
            };
            let candidate = match sources {
                ObjectSources {
                    thread_context: Some(s),
                    ..
                } => Candidate::Tls(ContextKind::ThreadContext, s),
                ObjectSources { go: Some(go), .. } => Candidate::Go(go),
                ObjectSources {
                    custom_labels: Some(s),
                    ..
                } => Candidate::Tls(ContextKind::CustomLabels, s),
                _ => continue,
            };
            if best
                .as_ref()
                .is_none_or(|(b, ..)| candidate.rank() < b.rank())
            {
                best = Some((candidate, entries, open_path));
            }
        }
        let Some((candidate, entries, open_path)) = best else {
            return Ok(None);
        };
        let source = match candidate {
            Candidate::Go(go) => go_source(&go),
            Candidate::Tls(kind, symbol) => {
                let file = File::open(&open_path).map_err(|e| tls::TlsError::Read {
                    pid,
                    addr: 0,
                    len: 0,
                    source: e,
                })?;
                let bias = tls::load_bias(&ReadCache::new(&file), &entries)?;
                let location = tls::resolve(pid, &symbol, bias, LibcFlavor::detect(maps))?;
                let reader = match kind {
                    ContextKind::CustomLabels => ContextReader::CustomLabels,
                    _ => ContextReader::ThreadContext,
                };
                ContextSource {
                    kind: kind as u8,
                    reader: reader as u8,
                    _pad: [0; 6],
                    tls: location,
                    go: GoRuntimeOffsets::default(),
                }
            }
        };
        Ok(Some(source))
    }

    /// Parses an object once (per device and inode) for the symbols writers publish.
    fn object_sources(
        &mut self,
        key: (i32, i32, u64),
        open_path: &Path,
        proc_dir: &Path,
        entry: &MemoryMap,
    ) -> Option<ObjectSources> {
        if let Some(known) = self.objects.get(&key) {
            return known.clone();
        }
        let file = File::open(open_path)
            .ok()
            .or_else(|| match &entry.pathname {
                MMapPath::Path(p) => {
                    File::open(proc_dir.join("root").join(p.strip_prefix("/").ok()?)).ok()
                }
                _ => None,
            });
        let Some(file) = file else {
            // Not cached: the next inspection may be able to open it.
            self.metrics.inc("context_objects_unreadable");
            return None;
        };
        let data = ReadCache::new(&file);
        let find = |name| match tls::find_tls_symbol(&data, name) {
            Ok(found) => found,
            Err(e) => {
                tracing::debug!(object = %open_path.display(), symbol = name, error = %e, "cannot use TLS symbol");
                None
            }
        };
        let go = match golang::inspect(&data) {
            Ok(go) => go,
            Err(e) => {
                // Once per binary: the object's answer is cached.
                self.metrics.inc(match e {
                    golang::GoError::UnsupportedVersion(_) => "go_binaries_unsupported_version",
                    _ => "go_binaries_unreadable",
                });
                tracing::warn!(object = %open_path.display(), error = %e, "Go binary: no trace context from its labels");
                None
            }
        };
        let sources = ObjectSources {
            thread_context: find(THREAD_CONTEXT_SYMBOL),
            custom_labels: find(CUSTOM_LABELS_SYMBOL),
            go,
        };
        let useful = sources.thread_context.is_some()
            || sources.custom_labels.is_some()
            || sources.go.is_some();
        let value = useful.then_some(sources);
        self.objects.insert(key, value.clone());
        value
    }

    fn read_process_context(&mut self, pid: u32) {
        let mut reader = ProcessContextReader::with_proc_root(pid, self.proc_root.clone());
        match reader.read() {
            Ok(info) => {
                self.metrics.inc("process_contexts_read");
                tracing::debug!(pid, service = ?info.service_name, keys = info.attribute_key_map.len(), "process context");
                self.contexts
                    .insert(pid, (reader, Arc::new(meta_from(&info))));
            }
            Err(ProcessContextError::NotPublished | ProcessContextError::Gone) => {}
            Err(e) => {
                self.metrics.inc("process_context_read_errors");
                tracing::debug!(pid, error = %e, "cannot read the process context");
            }
        }
    }
}

/// Go labels: `g` sits at a fixed offset from the thread pointer (static TLS), and the runtime
/// offsets come from the binary's DWARF or the table for its version.
fn go_source(go: &GoBinary) -> ContextSource {
    let (reader, format) = match go.offsets.labels_format {
        LabelsFormat::Map => (ContextReader::GoLabelsMap, GoLabelsFormat::Map),
        LabelsFormat::Slice => (ContextReader::GoLabelsSlice, GoLabelsFormat::Slice),
    };
    let narrow = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
    ContextSource {
        kind: ContextKind::GoLabels as u8,
        reader: reader as u8,
        _pad: [0; 6],
        tls: TlsLocation {
            offset: go.tls_g_offset,
            ..TlsLocation::default()
        },
        go: GoRuntimeOffsets {
            g_m: narrow(go.offsets.g_m),
            g_labels: narrow(go.offsets.g_labels),
            m_curg: narrow(go.offsets.m_curg),
            labels_format: format as u8,
            _pad: 0,
        },
    }
}

fn meta_from(info: &ProcessContextInfo) -> ProcessMeta {
    ProcessMeta {
        service_name: info.service_name.clone(),
        attribute_keys: info
            .attribute_key_map
            .iter()
            .map(|k| Arc::from(k.as_str()))
            .collect(),
        resource_attributes: info.resource_attributes.clone(),
    }
}

/// File-backed mappings grouped by (device, inode).
fn group_by_file(maps: &[MemoryMap]) -> Vec<((i32, i32, u64), Vec<MemoryMap>)> {
    let mut groups: HashMap<(i32, i32, u64), Vec<MemoryMap>> = HashMap::new();
    for m in maps {
        if m.inode != 0 && matches!(m.pathname, MMapPath::Path(_)) {
            groups
                .entry((m.dev.0, m.dev.1, m.inode))
                .or_default()
                .push(m.clone());
        }
    }
    let mut groups: Vec<_> = groups.into_iter().collect();
    groups.sort_by_key(|(_, entries)| entries.first().map(|m| m.address.0));
    groups
}

fn map_files_path(proc_dir: &Path, m: &MemoryMap) -> PathBuf {
    proc_dir.join(format!("map_files/{:x}-{:x}", m.address.0, m.address.1))
}
