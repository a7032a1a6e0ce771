//! Symbolization: the only module that touches blazesym.
//!
//! Configured for speed (../shared/research/floors.md): no auto-reload (a `stat` per address),
//! no demangling inside blazesym (done here once per distinct name), one long-lived
//! `Symbolizer`, and one blazesym call per object per batch. Results are cached per frame, so a
//! frame is symbolized once for the agent's lifetime.
//!
//! Go binaries without a symbol table (`-ldflags=-s -w`) are named from Go's own table
//! ([`gopclntab`], with inlined calls), parsed once per object, for the frames blazesym could
//! not name.
//!
//! JIT-compiled code is named from the process's perf map ([`perf_map`]), when it writes one.
//! Its names can change (a JIT reuses the memory of code it freed), so a cached frame is
//! dropped when a new line of the map covers its address.
//!
//! A frame that cannot be symbolized is data: it gets the name `[unknown] module+0xoffset`.
//!
//! Kernel frames are named from a snapshot of `/proc/kallsyms` in a memfd, refreshed every
//! few minutes (modules come and go): blazesym keys its kallsyms cache on the file's metadata,
//! and procfs reports a new modification time at every `stat`, so pointing it at
//! `/proc/kallsyms` itself re-parsed the whole symbol table (~10 ms) at every interval.

pub mod bench;
mod demangle;
pub mod gopclntab;
mod perf_map;

use foldhash::{HashMap, HashMapExt};
use std::{
    collections::BTreeSet,
    fs::File,
    io::{Seek as _, Write as _},
    os::fd::{AsRawFd as _, FromRawFd as _},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use blazesym::{
    MaybeDefault,
    symbolize::{
        CodeInfo, Input, Symbolized, Symbolizer as Blazesym,
        source::{Elf, Kernel, Source},
    },
};

use gopclntab::{GoPclntab, PclntabError};
use object::read::ReadCache;
use perf_map::PerfMap;

use crate::{
    clock,
    metrics::Metrics,
    process::{Object, ObjectId, ObjectStore},
    profile::Frame,
};

/// One function level of a symbolized frame.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SourceLine {
    pub function: Arc<str>,
    pub file: Option<Arc<str>>,
    /// 0 when unknown.
    pub line: u32,
}

/// A symbolized frame: the innermost inlined function first, the function that contains the
/// address last. Never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SymbolizedFrame {
    pub lines: Vec<SourceLine>,
    /// False when the name is the `[unknown] module+0xoffset` placeholder.
    pub resolved: bool,
}

pub struct Symbolizer {
    blazesym: Blazesym,
    cache: HashMap<Frame, Arc<SymbolizedFrame>>,
    strings: HashMap<String, Arc<str>>,
    kernel: Source<'static>,
    /// What `kernel` reads kernel symbols from (`None`: `/proc/kallsyms` directly).
    kallsyms: Option<KallsymsSnapshot>,
    /// Go pclntab per object, parsed when blazesym first leaves a frame of it unnamed; `None`
    /// when the object has none.
    go_tables: HashMap<ObjectId, Option<GoPclntab>>,
    /// Perf maps of JIT objects, read as they grow.
    perf_maps: HashMap<ObjectId, PerfMap>,
    perf_maps_checked_at: Instant,
    /// The addresses of each JIT object in `cache`: what new lines of its map may rename.
    jit_cached: HashMap<ObjectId, BTreeSet<u64>>,
    /// JIT objects whose process is gone, and since when.
    retiring_jit: Vec<(ObjectId, Instant)>,
    metrics: Metrics,
}

/// How often every perf map is checked for new lines, whether or not a frame missed the cache:
/// code replaced at the same address is named anew within this time.
const PERF_MAP_CHECK: Duration = Duration::from_secs(1);
/// How long the perf map and cached frames of a JIT object stay after its process is gone:
/// longer than anything that holds its frames may still ask for their names (a retained trace
/// revived by a late sample of another process, up to the trace table's 5 min late window).
/// Its file stays open with its object and is read again if a frame needs it later still.
const JIT_RETIRE_AFTER: Duration = Duration::from_secs(600);

/// How often the kallsyms snapshot is refreshed (loaded modules change it).
const KALLSYMS_REFRESH: Duration = Duration::from_secs(300);

/// Naming one object's new frames that takes this much CPU is logged (debug): which binaries
/// make the agent's CPU stand out.
const SLOW_NAMING_NS: u64 = 1_000_000;

/// `/proc/kallsyms`, copied into an anonymous in-memory file whose metadata changes only when
/// it is rewritten, so blazesym parses it once per refresh.
struct KallsymsSnapshot {
    file: File,
    taken_at: Instant,
}

impl KallsymsSnapshot {
    fn take() -> std::io::Result<Self> {
        // SAFETY: a valid NUL-terminated name; the returned fd is owned by the File below.
        let fd = unsafe { libc::memfd_create(c"profiler-kallsyms".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        let mut snapshot = Self {
            file,
            taken_at: Instant::now(),
        };
        snapshot.refresh()?;
        Ok(snapshot)
    }

    fn refresh(&mut self) -> std::io::Result<()> {
        let content = std::fs::read("/proc/kallsyms")?;
        self.file.set_len(0)?;
        self.file.rewind()?;
        self.file.write_all(&content)?;
        self.taken_at = Instant::now();
        Ok(())
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }
}

impl Symbolizer {
    pub fn new(metrics: Metrics) -> Self {
        let blazesym = Blazesym::builder()
            .enable_auto_reload(false)
            .enable_demangling(false)
            .enable_code_info(true)
            .enable_inlined_fns(true)
            .build();
        let kallsyms = match KallsymsSnapshot::take() {
            Ok(snapshot) => Some(snapshot),
            Err(e) => {
                tracing::debug!(error = %e, "no kallsyms snapshot: blazesym reads /proc/kallsyms");
                None
            }
        };
        let kernel = kernel_source(kallsyms.as_ref());
        Self {
            blazesym,
            cache: HashMap::new(),
            strings: HashMap::new(),
            kernel,
            kallsyms,
            go_tables: HashMap::new(),
            perf_maps: HashMap::new(),
            perf_maps_checked_at: Instant::now(),
            jit_cached: HashMap::new(),
            retiring_jit: Vec::new(),
            metrics,
        }
    }

    /// Parses the kernel's symbol table now (~15 ms for the ~200,000 symbols of a distribution
    /// kernel) instead of when the first kernel frame is symbolized, at an unpredictable moment
    /// of steady-state sampling (it then held up that flush, and the trace's sinks, by as much).
    /// No frame is cached: the address looked up is none.
    pub fn preload_kernel_symbols(&mut self) {
        if let Err(e) = self.blazesym.symbolize(&self.kernel, Input::AbsAddr(&[0])) {
            tracing::debug!(error = %e, "kernel symbols not preloaded");
        }
    }

    /// Symbolizes every frame not already cached: one blazesym call per object.
    pub fn resolve(&mut self, frames: impl IntoIterator<Item = Frame>, objects: &ObjectStore) {
        if !self.perf_maps.is_empty() && self.perf_maps_checked_at.elapsed() >= PERF_MAP_CHECK {
            self.perf_maps_checked_at = Instant::now();
            let ids: Vec<ObjectId> = self.perf_maps.keys().copied().collect();
            for id in ids {
                self.update_perf_map(id);
            }
        }
        let mut user: HashMap<ObjectId, Vec<u64>> = HashMap::new();
        let mut kernel = Vec::new();
        for frame in frames {
            if self.cache.contains_key(&frame) {
                continue;
            }
            match frame {
                Frame::User { object, address } => user.entry(object).or_default().push(address),
                Frame::Kernel { address } => kernel.push(address),
            }
        }
        // Naming a frame for the first time is the agent's most variable cost (a new object's
        // symbol table, a compile unit's DWARF): its CPU time is counted, so an operator can
        // tell it from the per-sample work. The thread's CPU clock is a system call, read only
        // around objects with new frames, whose naming costs far more; cached frames are not
        // timed.
        for (object, mut offsets) in user {
            offsets.sort_unstable();
            offsets.dedup();
            let started = clock::thread_cpu_ns();
            self.resolve_object(object, &offsets, objects);
            let ns = elapsed_ns(started);
            self.metrics.add("symbolize_user_ns", ns);
            if ns >= SLOW_NAMING_NS {
                tracing::debug!(
                    object = %objects.get(object).name,
                    frames = offsets.len(),
                    cpu_ms = ns as f64 / 1e6,
                    "slow first-time naming"
                );
            }
        }
        if !kernel.is_empty() {
            kernel.sort_unstable();
            kernel.dedup();
            let started = clock::thread_cpu_ns();
            self.resolve_kernel(&kernel);
            self.metrics.add("symbolize_kernel_ns", elapsed_ns(started));
        }
    }

    /// The symbolized frame; frames not passed to [`Self::resolve`] come back as unknown.
    pub fn get(&mut self, frame: Frame, objects: &ObjectStore) -> Arc<SymbolizedFrame> {
        if let Some(s) = self.cache.get(&frame) {
            return s.clone();
        }
        self.resolve([frame], objects);
        self.cache
            .get(&frame)
            .cloned()
            .expect("resolve fills every frame")
    }

    pub fn cached_frames(&self) -> usize {
        self.cache.len()
    }

    fn resolve_object(&mut self, id: ObjectId, offsets: &[u64], objects: &ObjectStore) {
        let object = objects.get(id);
        if let Some(file) = object.perf_map() {
            self.resolve_jit(id, file, offsets, object.short_name());
            return;
        }
        let mut results = match object.symbolize_path() {
            Some(path) => {
                let source = Source::Elf(Elf::new(path));
                match self.blazesym.symbolize(&source, Input::FileOffset(offsets)) {
                    Ok(results) => owned_levels(results),
                    Err(e) => {
                        self.metrics.inc("symbolize_object_errors");
                        tracing::debug!(object = %object.name, error = %e, "symbolization failed");
                        Vec::new()
                    }
                }
            }
            None => Vec::new(),
        };
        self.fill_from_gopclntab(id, object, offsets, &mut results);
        let module = object.short_name().to_owned();
        self.store(
            offsets,
            results,
            |address| Frame::User {
                object: id,
                address,
            },
            &module,
        );
    }

    /// JIT code: names from the perf map, read up to its end first. When that added lines,
    /// every cached frame of the object may be stale and is dropped (it is named again when
    /// next asked for).
    fn resolve_jit(&mut self, id: ObjectId, file: &Arc<File>, addresses: &[u64], module: &str) {
        self.perf_maps
            .entry(id)
            .or_insert_with(|| PerfMap::new(file.clone()));
        self.update_perf_map(id);
        let map = &self.perf_maps[&id];
        let results = addresses
            .iter()
            .map(|&address| {
                map.lookup(address).map(|name| {
                    vec![Level {
                        name: name.to_owned(),
                        file: None,
                        line: 0,
                    }]
                })
            })
            .collect();
        self.store(
            addresses,
            results,
            |address| Frame::User {
                object: id,
                address,
            },
            module,
        );
        self.jit_cached
            .entry(id)
            .or_default()
            .extend(addresses.iter().copied());
    }

    /// Reads what was appended to the perf map of `id`, and drops the cached frames whose
    /// names may have changed: those inside the new lines' regions (all of the object's, when
    /// the map was rewritten).
    fn update_perf_map(&mut self, id: ObjectId) {
        let Some(map) = self.perf_maps.get_mut(&id) else {
            return;
        };
        match map.update() {
            Ok(update) => {
                self.metrics.add("perf_map_lines", update.lines);
                self.metrics
                    .add("perf_map_lines_malformed", update.malformed);
                self.metrics.add("perf_map_entries_dropped", update.dropped);
                let Some(cached) = self.jit_cached.get_mut(&id) else {
                    return;
                };
                let stale: Vec<u64> = if update.rewritten {
                    std::mem::take(cached).into_iter().collect()
                } else {
                    update
                        .new_regions
                        .iter()
                        .flat_map(|&(start, end)| cached.range(start..end).copied())
                        .collect()
                };
                for address in stale {
                    cached.remove(&address);
                    self.cache.remove(&Frame::User {
                        object: id,
                        address,
                    });
                }
            }
            Err(e) => {
                self.metrics.inc("perf_map_read_errors");
                tracing::debug!(object = id.0, error = %e, "perf map not read");
            }
        }
    }

    /// The processes of these JIT objects are gone: their perf maps and cached frames are
    /// dropped [`JIT_RETIRE_AFTER`] from now. (Every JIT process has frames of its own, at its
    /// own addresses: kept for the agent's lifetime they would grow without bound.)
    pub fn retire_jit_objects(&mut self, ids: Vec<ObjectId>) {
        let now = Instant::now();
        self.retiring_jit
            .extend(ids.into_iter().map(|id| (id, now)));
    }

    /// Drops the perf maps and cached frames of the JIT objects retired [`JIT_RETIRE_AFTER`]
    /// ago or more, and returns them: nothing refers to them any more, their slots can serve
    /// other processes. (Called on the collector's tick.)
    pub fn forget_retired_jit_objects(&mut self) -> Vec<ObjectId> {
        self.forget_retired_jit(JIT_RETIRE_AFTER)
    }

    fn forget_retired_jit(&mut self, retired_for: Duration) -> Vec<ObjectId> {
        let due = self
            .retiring_jit
            .partition_point(|(_, since)| since.elapsed() >= retired_for);
        let forgotten: Vec<ObjectId> = self.retiring_jit.drain(..due).map(|(id, _)| id).collect();
        for &id in &forgotten {
            self.perf_maps.remove(&id);
            for address in self.jit_cached.remove(&id).unwrap_or_default() {
                self.cache.remove(&Frame::User {
                    object: id,
                    address,
                });
            }
        }
        forgotten
    }

    /// Names the frames blazesym left unknown from the object's Go pclntab, if it has one.
    fn fill_from_gopclntab(
        &mut self,
        id: ObjectId,
        object: &Object,
        offsets: &[u64],
        results: &mut Vec<Option<Vec<Level>>>,
    ) {
        // A failed blazesym call gives no results at all.
        results.resize_with(offsets.len(), || None);
        if results.iter().all(Option::is_some) {
            return;
        }
        let metrics = &self.metrics;
        let table = self
            .go_tables
            .entry(id)
            .or_insert_with(|| parse_gopclntab(object, metrics));
        let Some(table) = table else { return };
        for (result, &offset) in results.iter_mut().zip(offsets) {
            if result.is_some() {
                continue;
            }
            // Innermost inlined call first, as blazesym's levels are ordered here.
            let levels: Vec<Level> = table
                .lookup_file_offset(offset)
                .into_iter()
                .map(|f| Level {
                    name: f.function,
                    file: f.file,
                    line: f.line,
                })
                .collect();
            if !levels.is_empty() {
                self.metrics.inc("frames_symbolized_gopclntab");
                *result = Some(levels);
            }
        }
    }

    fn resolve_kernel(&mut self, addresses: &[u64]) {
        if let Some(snapshot) = &mut self.kallsyms
            && snapshot.taken_at.elapsed() >= KALLSYMS_REFRESH
            && let Err(e) = snapshot.refresh()
        {
            tracing::debug!(error = %e, "kallsyms snapshot not refreshed");
        }
        let results = match self
            .blazesym
            .symbolize(&self.kernel, Input::AbsAddr(addresses))
        {
            Ok(results) => owned_levels(results),
            Err(e) => {
                self.metrics.inc("symbolize_kernel_errors");
                tracing::debug!(error = %e, "kernel symbolization failed");
                Vec::new()
            }
        };
        self.store(
            addresses,
            results,
            |address| Frame::Kernel { address },
            "[kernel]",
        );
    }

    /// Caches one result per address; missing results (a failed call) become unknown frames.
    fn store(
        &mut self,
        addresses: &[u64],
        results: Vec<Option<Vec<Level>>>,
        frame: impl Fn(u64) -> Frame,
        module: &str,
    ) {
        let mut results = results.into_iter();
        for &address in addresses {
            let symbolized = match results.next().flatten() {
                Some(levels) => {
                    self.metrics.inc("frames_symbolized");
                    let lines = levels.into_iter().map(|l| self.line(l)).collect();
                    SymbolizedFrame {
                        lines,
                        resolved: true,
                    }
                }
                None => {
                    self.metrics.inc("frames_unsymbolized");
                    let name = format!("[unknown] {module}+{address:#x}");
                    SymbolizedFrame {
                        lines: vec![SourceLine {
                            function: self.intern(name),
                            file: None,
                            line: 0,
                        }],
                        resolved: false,
                    }
                }
            };
            self.cache.insert(frame(address), Arc::new(symbolized));
        }
    }

    fn line(&mut self, level: Level) -> SourceLine {
        let function = match self.strings.get(&level.name) {
            Some(s) => s.clone(),
            None => {
                let demangled: Arc<str> = demangle::demangle(&level.name).into();
                self.strings.insert(level.name, demangled.clone());
                demangled
            }
        };
        let file = level.file.map(|f| self.intern(f));
        SourceLine {
            function,
            file,
            line: level.line,
        }
    }

    fn intern(&mut self, s: String) -> Arc<str> {
        if let Some(v) = self.strings.get(&s) {
            return v.clone();
        }
        let v: Arc<str> = s.clone().into();
        self.strings.insert(s, v.clone());
        v
    }
}

/// The object's Go pclntab, or `None` for an object that is not Go (a malformed table is
/// counted in `gopclntab_parse_errors`).
pub(crate) fn parse_gopclntab(object: &Object, metrics: &Metrics) -> Option<GoPclntab> {
    let cache = ReadCache::new(object.file()?);
    match GoPclntab::parse(&cache) {
        Ok(table) => Some(table),
        Err(PclntabError::NotFound) => None,
        Err(e) => {
            metrics.inc("gopclntab_parse_errors");
            tracing::debug!(object = %object.name, error = %e, "unreadable Go pclntab");
            None
        }
    }
}

/// One function level of a blazesym result, owned (blazesym's borrow the symbolizer).
struct Level {
    /// Mangled.
    name: String,
    file: Option<String>,
    line: u32,
}

/// blazesym results as levels, innermost inlined function first. blazesym lists inlined calls
/// outermost first and gives every level its own location (the containing function's is the
/// call site of the first inlined call).
fn owned_levels(results: Vec<Symbolized<'_>>) -> Vec<Option<Vec<Level>>> {
    let level = |name: &str, code: Option<&CodeInfo<'_>>| Level {
        name: name.to_owned(),
        file: code.map(|c| c.to_path().to_string_lossy().into_owned()),
        line: code.and_then(|c| c.line).unwrap_or(0),
    };
    results
        .into_iter()
        .map(|r| match r {
            Symbolized::Sym(sym) => {
                let mut levels: Vec<Level> = sym
                    .inlined
                    .iter()
                    .rev()
                    .map(|i| level(&i.name, i.code_info.as_ref()))
                    .collect();
                levels.push(level(&sym.name, sym.code_info.as_deref()));
                Some(levels)
            }
            Symbolized::Unknown(_) => None,
        })
        .collect()
}

fn kernel_source(kallsyms: Option<&KallsymsSnapshot>) -> Source<'static> {
    Source::Kernel(Kernel {
        kallsyms: match kallsyms {
            Some(snapshot) => MaybeDefault::Some(snapshot.path()),
            None => MaybeDefault::Default,
        },
        vmlinux: MaybeDefault::None,
        debug_syms: false,
        ..Kernel::default()
    })
}

fn elapsed_ns(started_cpu_ns: u64) -> u64 {
    clock::thread_cpu_ns().saturating_sub(started_cpu_ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kernel text symbol with a real address (kallsyms shows zeros without CAP_SYSLOG).
    fn kernel_function() -> Option<(u64, String)> {
        let kallsyms = std::fs::read_to_string("/proc/kallsyms").ok()?;
        kallsyms.lines().find_map(|line| {
            let mut parts = line.split_whitespace();
            let address = u64::from_str_radix(parts.next()?, 16).ok()?;
            let kind = parts.next()?;
            let name = parts.next()?;
            (address != 0 && kind == "T" && parts.next().is_none() && name == "schedule")
                .then(|| (address, name.to_owned()))
        })
    }

    #[test]
    fn jit_frames_are_renamed_where_newer_lines_cover_them() {
        use std::io::Write as _;
        let mut map_file = tempfile::NamedTempFile::new().unwrap();
        map_file
            .write_all(b"1000 100 first\n2000 100 other\n")
            .unwrap();
        let mut objects = ObjectStore::new(16, Metrics::default());
        let id = objects
            .perf_map_object("/tmp/perf-1.map", map_file.reopen().unwrap(), None)
            .unwrap();
        let mut symbolizer = Symbolizer::new(Metrics::default());
        let name = |symbolizer: &mut Symbolizer, address| {
            let frame = symbolizer.get(
                Frame::User {
                    object: id,
                    address,
                },
                &objects,
            );
            (frame.lines[0].function.to_string(), frame.resolved)
        };
        assert_eq!(name(&mut symbolizer, 0x1010), ("first".into(), true));
        assert_eq!(name(&mut symbolizer, 0x2010), ("other".into(), true));
        assert_eq!(
            name(&mut symbolizer, 0x3005),
            ("[unknown] perf-1.map+0x3005".into(), false)
        );
        // The JIT reused 0x1000 for other code and compiled new code at 0x3000.
        map_file
            .write_all(b"1000 100 replaced\n3000 10 new\n")
            .unwrap();
        symbolizer.update_perf_map(id);
        assert_eq!(name(&mut symbolizer, 0x1010), ("replaced".into(), true));
        assert_eq!(name(&mut symbolizer, 0x2010), ("other".into(), true));
        assert_eq!(name(&mut symbolizer, 0x3005), ("new".into(), true));
        assert_eq!(symbolizer.jit_cached[&id].len(), 3);

        // The process is gone: after a while, nothing of its JIT stays in memory.
        let before = symbolizer.cached_frames();
        symbolizer.retire_jit_objects(vec![id]);
        assert!(
            symbolizer.forget_retired_jit_objects().is_empty(),
            "not yet"
        );
        assert_eq!(symbolizer.cached_frames(), before);
        assert_eq!(symbolizer.forget_retired_jit(Duration::ZERO), [id]);
        assert_eq!(symbolizer.cached_frames(), before - 3);
        assert!(symbolizer.perf_maps.is_empty() && symbolizer.jit_cached.is_empty());
        assert!(symbolizer.retiring_jit.is_empty());
        // A frame asked for later still is named from the file, which stays open.
        assert_eq!(name(&mut symbolizer, 0x1010), ("replaced".into(), true));
    }

    #[test]
    fn first_naming_of_a_frame_is_timed_and_a_cache_hit_is_not() {
        use std::io::Write as _;
        let mut map_file = tempfile::NamedTempFile::new().unwrap();
        map_file.write_all(b"1000 100 first\n").unwrap();
        let mut objects = ObjectStore::new(16, Metrics::default());
        let id = objects
            .perf_map_object("/tmp/perf-2.map", map_file.reopen().unwrap(), None)
            .unwrap();
        let metrics = Metrics::default();
        let mut symbolizer = Symbolizer::new(metrics.clone());
        let frame = Frame::User {
            object: id,
            address: 0x1010,
        };
        symbolizer.resolve([frame], &objects);
        let first = metrics.get("symbolize_user_ns");
        assert!(first > 0, "the first naming is timed");
        symbolizer.resolve([frame, frame], &objects);
        assert_eq!(
            symbolizer.get(frame, &objects).lines[0].function.as_ref(),
            "first"
        );
        assert_eq!(
            metrics.get("symbolize_user_ns"),
            first,
            "cache hits are not timed"
        );
        assert_eq!(metrics.get("symbolize_kernel_ns"), 0);
    }

    #[test]
    fn kernel_frames_are_named_from_the_kallsyms_snapshot() {
        let mut symbolizer = Symbolizer::new(Metrics::default());
        let snapshot = symbolizer.kallsyms.as_ref().expect("memfd snapshot");
        let copied = std::fs::read(snapshot.path()).unwrap();
        assert!(copied.len() > 1000, "{} bytes", copied.len());
        let Some((address, name)) = kernel_function() else {
            // Not root: kallsyms has no addresses to name anything with.
            assert_ne!(
                unsafe { libc::geteuid() },
                0,
                "root sees kallsyms addresses"
            );
            return;
        };
        symbolizer.preload_kernel_symbols();
        assert!(symbolizer.cache.is_empty(), "preloading caches no frame");
        let objects = ObjectStore::new(16, Metrics::default());
        for _ in 0..2 {
            let frame = symbolizer.get(
                Frame::Kernel {
                    address: address + 1,
                },
                &objects,
            );
            assert_eq!(&*frame.lines.last().unwrap().function, name.as_str());
        }
    }
}
