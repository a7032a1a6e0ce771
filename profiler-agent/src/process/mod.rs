//! The process table: for every sampled process, its executable mappings, read from
//! `/proc/<pid>/maps` on first sight and again when an address falls outside them (a library
//! loaded later), dropped on exec and shortly after exit. Its job is to turn a sampled absolute
//! address into `(object, file offset)` as soon as the sample arrives, so that the frame stays
//! symbolizable after the process is gone.

pub mod details;
mod frameless;
pub mod golang;
pub mod objects;
mod perf_map;
pub mod process_context;
pub mod tls;

use foldhash::{HashMap, HashMapExt};
use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use procfs::process::{MMPermissions, MMapPath, MemoryMap};

pub use objects::{Object, ObjectId, ObjectStore};
use objects::{ObjectKey, clean_path};

use crate::{k8s::cgroup::CgroupIdentity, metrics::Metrics, profile::Frame};

/// A process's `/proc/<pid>/maps`, read at its first use and then shared by whatever the
/// handling of one sample needs it for. A new process's first sample needs its mappings twice
/// (its trace-context source, then its symbolization), and on a node starting processes all
/// the time each read is a file of tens to hundreds of lines to format in the kernel and parse.
#[derive(Debug, Default)]
pub struct MapsOnce {
    read: Option<(PathBuf, Result<Vec<MemoryMap>, String>)>,
}

impl MapsOnce {
    /// The mappings of the process whose procfs directory is `proc_dir`, or why they could not
    /// be read (most often: the process is gone).
    pub fn get(&mut self, proc_dir: &Path) -> Result<&[MemoryMap], &str> {
        let read = match self.read.take() {
            Some((dir, maps)) if dir == proc_dir => (dir, maps),
            _ => {
                let maps = procfs::process::Process::new_with_root(proc_dir.to_owned())
                    .and_then(|p| p.maps())
                    .map(|m| m.0)
                    .map_err(|e| e.to_string());
                (proc_dir.to_owned(), maps)
            }
        };
        let (_, maps) = self.read.insert(read);
        maps.as_deref().map_err(String::as_str)
    }
}

/// After new executable code is mapped (the kernel's mmap event), a miss re-reads the maps at
/// most this often.
const REFRESH_INTERVAL: Duration = Duration::from_millis(100);
/// Without such an event, a miss re-reads them at most this often: addresses that miss are
/// mostly frame-pointer walks through code built without frame pointers, or JIT code, which no
/// re-read resolves; the slow re-read covers mmap events lost to a full ring buffer.
const UNANNOUNCED_REFRESH_INTERVAL: Duration = Duration::from_secs(30);
/// How long an exited process's mappings stay, for samples still in flight.
const EXIT_GRACE: Duration = Duration::from_secs(5);
/// Upper bound of objects kept open.
const MAX_OBJECTS: usize = 16_384;
/// A process sampled in anonymous executable memory without a perf map is looked at again at
/// most this often: a JVM writes its map only when asked (`jcmd <pid> Compiler.perfmap`).
const PERF_MAP_RECHECK: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy)]
struct Mapping {
    start: u64,
    end: u64,
    file_offset: u64,
    object: Option<ObjectId>,
}

struct Process {
    /// Executable mappings, sorted by start.
    mappings: Vec<Mapping>,
    refreshed_at: Instant,
    /// Executable code was mapped since the maps were read.
    new_code: bool,
    exited_at: Option<Instant>,
    /// Executable name from `/proc/<pid>/exe` (falls back to the command name).
    name: String,
    exe_path: Option<String>,
    /// `OTEL_SERVICE_NAME` from its environment.
    env_service_name: Option<String>,
    cgroup: CgroupIdentity,
    container_pid: Option<u32>,
    /// The object for its JIT code, once its perf map was found.
    jit: Option<ObjectId>,
    /// When a perf map was last looked for (reading the maps looks too).
    perf_map_checked_at: Instant,
}

/// What a user can learn about a process.
#[derive(Debug, Clone, Default)]
pub struct ProcessInfo {
    pub name: String,
    pub exe_path: Option<String>,
    pub env_service_name: Option<String>,
    /// Container id and pod uid from its cgroup (empty outside containers).
    pub cgroup: CgroupIdentity,
    /// Its pid in its own pid namespace, when that differs from the host's.
    pub container_pid: Option<u32>,
}

pub struct ProcessTable {
    processes: HashMap<u32, Process>,
    objects: ObjectStore,
    /// Objects for memory without a file.
    unmapped: Option<ObjectId>,
    /// The shared object of anonymous executable memory in processes without a perf map.
    anon: Option<ObjectId>,
    /// JIT objects of images that are gone, for [`Self::take_retired_jit_objects`].
    retired_jit: Vec<ObjectId>,
    /// JIT objects nothing refers to any more, for new JIT processes
    /// ([`Self::recycle_jit_objects`]): the object table stays bounded by the JIT processes
    /// alive at once, not those ever seen.
    free_jit: Vec<ObjectId>,
    frameless: frameless::FramelessCode,
    proc_root: PathBuf,
    metrics: Metrics,
}

impl ProcessTable {
    pub fn new(metrics: Metrics) -> Self {
        Self::with_proc_root("/proc".into(), metrics)
    }

    /// `proc_root`: where procfs is mounted (the host's `/proc` inside a container).
    pub fn with_proc_root(proc_root: PathBuf, metrics: Metrics) -> Self {
        Self {
            processes: HashMap::new(),
            objects: ObjectStore::new(MAX_OBJECTS, metrics.clone()),
            unmapped: None,
            anon: None,
            retired_jit: Vec::new(),
            free_jit: Vec::new(),
            frameless: frameless::FramelessCode::new(),
            proc_root,
            metrics,
        }
    }

    pub fn objects(&self) -> &ObjectStore {
        &self.objects
    }

    pub fn info(&self, pid: u32) -> Option<ProcessInfo> {
        self.processes.get(&pid).map(|p| ProcessInfo {
            name: p.name.clone(),
            exe_path: p.exe_path.clone(),
            env_service_name: p.env_service_name.clone(),
            cgroup: p.cgroup.clone(),
            container_pid: p.container_pid,
        })
    }

    /// A new program image: forget the old one's mappings.
    pub fn on_exec(&mut self, pid: u32) {
        if let Some(jit) = self.processes.remove(&pid).and_then(|p| p.jit) {
            self.retired_jit.push(jit);
        }
    }

    /// The process mapped executable code (dlopen, a JIT's file-backed code): the next miss
    /// re-reads its maps.
    pub fn on_new_code(&mut self, pid: u32) {
        if let Some(p) = self.processes.get_mut(&pid) {
            p.new_code = true;
        }
    }

    pub fn on_exit(&mut self, pid: u32) {
        if let Some(p) = self.processes.get_mut(&pid) {
            p.exited_at = Some(Instant::now());
        }
    }

    /// Drops processes that exited more than the grace period ago.
    pub fn collect_garbage(&mut self) {
        let now = Instant::now();
        let retired = &mut self.retired_jit;
        self.processes.retain(|_, p| {
            let keep = p
                .exited_at
                .is_none_or(|t| now.duration_since(t) < EXIT_GRACE);
            if !keep && let Some(jit) = p.jit {
                retired.push(jit);
            }
            keep
        });
    }

    /// The JIT objects of the images that are gone (exited or replaced by an exec) since the
    /// last call: no new frame will point into them.
    pub fn take_retired_jit_objects(&mut self) -> Vec<ObjectId> {
        std::mem::take(&mut self.retired_jit)
    }

    /// Retired JIT objects that no frame refers to any more (the symbolizer forgot them): their
    /// slots serve the next JIT processes.
    pub fn recycle_jit_objects(&mut self, ids: Vec<ObjectId>) {
        self.free_jit.extend(ids);
    }

    /// Normalizes a sampled stack: kernel frames first (leaf first), then user frames.
    /// Every frame but the sample's leaf is a return address and is looked up as `address - 1`,
    /// which keeps it inside the calling instruction (and the calling function).
    /// `maps`: the process's mappings, if this sample's handling has read them already.
    /// `user_stack_top`: the word at the interrupted user stack pointer, when the kernel read
    /// it; it becomes the second frame where the first is frameless code whose caller the
    /// frame-pointer walk skipped (see [`frameless`]).
    pub fn normalize(
        &mut self,
        pid: u32,
        comm: &str,
        user: &[u64],
        kernel: &[u64],
        user_stack_top: Option<u64>,
        maps: &mut MapsOnce,
    ) -> Vec<Frame> {
        let mut frames = Vec::with_capacity(user.len() + kernel.len() + 1);
        for (i, &addr) in kernel.iter().enumerate() {
            let address = if i == 0 { addr } else { addr.wrapping_sub(1) };
            frames.push(Frame::Kernel { address });
        }
        if user.is_empty() {
            return frames;
        }
        self.ensure_loaded(pid, comm, maps);
        for (i, &addr) in user.iter().enumerate() {
            // The first user frame is the interrupted (or syscall) instruction pointer, exact.
            let lookup = if i == 0 { addr } else { addr.wrapping_sub(1) };
            let frame = self.user_frame(pid, lookup);
            frames.push(frame);
            if i == 0
                && let Some(top) = user_stack_top
                && let Some(caller) = self.skipped_caller(pid, frame, top)
            {
                frames.push(caller);
            }
        }
        frames
    }

    /// The caller a frame-pointer walk skipped when the sample's `leaf` runs without a frame:
    /// the return address at the stack pointer, `stack_top`, when it points into code.
    fn skipped_caller(&mut self, pid: u32, leaf: Frame, stack_top: u64) -> Option<Frame> {
        let Frame::User { object, address } = leaf else {
            return None;
        };
        if !self
            .frameless
            .is_frameless(object, self.objects.get(object), address, &self.metrics)
        {
            return None;
        }
        let caller = self.lookup(pid, stack_top.wrapping_sub(1))?;
        self.metrics.inc("frames_recovered_frameless");
        Some(caller)
    }

    fn user_frame(&mut self, pid: u32, addr: u64) -> Frame {
        if let Some(frame) = self.lookup(pid, addr) {
            if self.perf_map_may_have_appeared(pid, frame) {
                self.refresh(pid, None, &mut MapsOnce::default());
                return self.lookup(pid, addr).unwrap_or(frame);
            }
            return frame;
        }
        // A library mapped after we last read the maps (dlopen)? Re-read, rate-limited.
        let stale = self.processes.get(&pid).is_some_and(|p| {
            let since = p.refreshed_at.elapsed();
            p.exited_at.is_none()
                && (since >= UNANNOUNCED_REFRESH_INTERVAL
                    || (p.new_code && since >= REFRESH_INTERVAL))
        });
        if stale {
            self.refresh(pid, None, &mut MapsOnce::default());
            if let Some(frame) = self.lookup(pid, addr) {
                return frame;
            }
        }
        self.metrics.inc("frames_unmapped");
        let unmapped = *self.unmapped.get_or_insert_with(|| {
            self.objects
                .pseudo_object("[unmapped]")
                .unwrap_or(ObjectId(u32::MAX))
        });
        Frame::User {
            object: unmapped,
            address: addr,
        }
    }

    /// Whether `frame`, in anonymous executable memory of a process without a perf map, is
    /// due for another look for one (which re-reads the maps). Rate-limited per process.
    fn perf_map_may_have_appeared(&mut self, pid: u32, frame: Frame) -> bool {
        let Frame::User { object, .. } = frame else {
            return false;
        };
        if self.anon != Some(object) {
            return false;
        }
        let Some(process) = self.processes.get_mut(&pid) else {
            return false;
        };
        if process.jit.is_some()
            || process.exited_at.is_some()
            || process.perf_map_checked_at.elapsed() < PERF_MAP_RECHECK
        {
            return false;
        }
        process.perf_map_checked_at = Instant::now();
        let ns_pid = process.container_pid.unwrap_or(pid);
        perf_map::exists(&self.proc_root.join(pid.to_string()), ns_pid)
    }

    fn lookup(&self, pid: u32, addr: u64) -> Option<Frame> {
        let process = self.processes.get(&pid)?;
        let idx = process
            .mappings
            .partition_point(|m| m.start <= addr)
            .checked_sub(1)?;
        let m = &process.mappings[idx];
        if addr >= m.end {
            return None;
        }
        Some(Frame::User {
            object: m.object?,
            address: addr - m.start + m.file_offset,
        })
    }

    fn ensure_loaded(&mut self, pid: u32, comm: &str, maps: &mut MapsOnce) {
        if !self.processes.contains_key(&pid) {
            self.refresh(pid, Some(comm), maps);
        }
    }

    fn refresh(&mut self, pid: u32, comm: Option<&str>, maps: &mut MapsOnce) {
        let previous = self.processes.remove(&pid);
        let proc_dir = self.proc_root.join(pid.to_string());
        let exe_path = std::fs::read_link(proc_dir.join("exe"))
            .ok()
            .map(|p| clean_path(&p));
        let name = exe_path
            .as_deref()
            .and_then(|p| p.rsplit('/').next())
            .map(str::to_owned)
            .or_else(|| comm.map(str::to_owned))
            .or_else(|| previous.as_ref().map(|p| p.name.clone()))
            .unwrap_or_default();
        // The environment, cgroup and pid namespace of a process image do not change: read
        // them once.
        let (env_service_name, cgroup, container_pid) = match &previous {
            Some(p) => (
                p.env_service_name.clone(),
                p.cgroup.clone(),
                p.container_pid,
            ),
            None => (
                details::read_env_var(&proc_dir, "OTEL_SERVICE_NAME"),
                details::read_cgroup_identity(&proc_dir),
                details::read_container_pid(&proc_dir),
            ),
        };
        let mut jit = previous.as_ref().and_then(|p| p.jit);
        let mappings = match maps.get(&proc_dir) {
            Ok(maps) => {
                let ns_pid = container_pid.unwrap_or(pid);
                self.executable_mappings(&proc_dir, ns_pid, &mut jit, maps)
            }
            Err(e) => {
                // Gone already, or not readable: keep whatever we knew.
                self.metrics.inc("process_maps_read_failed");
                tracing::debug!(pid, error = %e, "cannot read process maps");
                previous
                    .as_ref()
                    .map(|p| p.mappings.clone())
                    .unwrap_or_default()
            }
        };
        self.metrics.inc("process_maps_read");
        self.processes.insert(
            pid,
            Process {
                mappings,
                refreshed_at: Instant::now(),
                new_code: false,
                exited_at: previous.and_then(|p| p.exited_at),
                name,
                exe_path,
                env_service_name,
                cgroup,
                container_pid,
                jit,
                perf_map_checked_at: Instant::now(),
            },
        );
    }

    /// The executable mappings of a process. Anonymous executable memory is JIT code: when the
    /// process writes a perf map, it becomes the process's own object (`jit`, found on the
    /// first read that sees such memory and the map), addressed absolutely; else it is the
    /// shared `[anon]` pseudo-object.
    fn executable_mappings(
        &mut self,
        proc_dir: &std::path::Path,
        ns_pid: u32,
        jit: &mut Option<ObjectId>,
        maps: &[MemoryMap],
    ) -> Vec<Mapping> {
        let is_jit = |m: &MemoryMap| match &m.pathname {
            MMapPath::Anonymous => true,
            MMapPath::Other(name) => name.starts_with("anon:"),
            _ => false,
        };
        if jit.is_none()
            && maps
                .iter()
                .any(|m| m.perms.contains(MMPermissions::EXECUTE) && is_jit(m))
        {
            match perf_map::open(proc_dir, ns_pid) {
                Some((file, name)) => {
                    let reuse = self.free_jit.pop();
                    *jit = self.objects.perf_map_object(&name, file, reuse);
                    self.metrics.inc("perf_maps_found");
                }
                // There, but a symlink, not a regular file, or another user's.
                None if perf_map::exists(proc_dir, ns_pid) => self.metrics.inc("perf_maps_refused"),
                None => {}
            }
        }
        let mut out: Vec<Mapping> = maps
            .iter()
            .filter(|m| m.perms.contains(MMPermissions::EXECUTE))
            .map(|m| {
                if let Some(object) = *jit
                    && is_jit(m)
                {
                    return Mapping {
                        start: m.address.0,
                        end: m.address.1,
                        file_offset: m.address.0,
                        object: Some(object),
                    };
                }
                let (start, end) = m.address;
                let object = match &m.pathname {
                    MMapPath::Path(path) => {
                        let name = clean_path(path);
                        let key = ObjectKey::File {
                            dev: m.dev,
                            inode: m.inode,
                        };
                        let open_paths = [
                            proc_dir.join(format!("map_files/{start:x}-{end:x}")),
                            proc_dir.join("root").join(name.trim_start_matches('/')),
                        ];
                        self.objects.file_object(key, &name, &open_paths)
                    }
                    MMapPath::Vdso => self.objects.pseudo_object("[vdso]"),
                    MMapPath::Vsyscall => self.objects.pseudo_object("[vsyscall]"),
                    MMapPath::Other(name) => self.objects.pseudo_object(&format!("[{name}]")),
                    _ => {
                        let anon = self.objects.pseudo_object("[anon]");
                        self.anon = anon;
                        anon
                    }
                };
                // Memory without a file is addressed relative to its mapping.
                let file_offset = if matches!(m.pathname, MMapPath::Path(_)) {
                    m.offset
                } else {
                    0
                };
                Mapping {
                    start,
                    end,
                    file_offset,
                    object,
                }
            })
            .collect();
        out.sort_by_key(|m| m.start);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_are_read_once_per_process_directory() {
        let root = std::env::temp_dir().join(format!("maps-once-{}", std::process::id()));
        let (a, b) = (root.join("1"), root.join("2"));
        for dir in [&a, &b] {
            std::fs::create_dir_all(dir).unwrap();
        }
        let line = "7f0000000000-7f0000001000 r-xp 00000000 08:01 42 /usr/lib/libx.so\n";
        std::fs::write(a.join("maps"), line).unwrap();
        std::fs::write(b.join("maps"), format!("{line}{line}")).unwrap();
        let mut maps = MapsOnce::default();
        assert_eq!(maps.get(&a).unwrap().len(), 1);
        // Changed on disk, but this sample's handling already read it.
        std::fs::write(a.join("maps"), "").unwrap();
        assert_eq!(maps.get(&a).unwrap().len(), 1);
        // Another process is read anew.
        assert_eq!(maps.get(&b).unwrap().len(), 2);
        assert_eq!(MapsOnce::default().get(&a).unwrap().len(), 0);
        let gone = maps.get(&root.join("3")).unwrap_err();
        assert!(!gone.is_empty());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn normalizes_own_stack_to_file_offsets() {
        let metrics = Metrics::default();
        let mut table = ProcessTable::new(metrics.clone());
        let pid = std::process::id();
        let here = normalizes_own_stack_to_file_offsets as *const () as u64;
        let frames = table.normalize(
            pid,
            "test",
            &[here, here + 1],
            &[0xffff_ffff_8100_0000],
            None,
            &mut MapsOnce::default(),
        );
        assert_eq!(frames.len(), 3);
        assert_eq!(
            frames[0],
            Frame::Kernel {
                address: 0xffff_ffff_8100_0000
            }
        );
        let Frame::User { object, address } = frames[1] else {
            panic!("{frames:?}")
        };
        let obj = table.objects().get(object);
        assert!(obj.build_id.is_some(), "{obj:?}");
        assert!(obj.symbolize_path().is_some());
        // Return addresses are looked up one byte earlier.
        assert_eq!(frames[2], Frame::User { object, address });
        assert!(address < here, "file offset {address:#x} of {here:#x}");
        assert_eq!(metrics.get("frames_unmapped"), 0);
        assert!(table.info(pid).unwrap().name.starts_with("profiler_agent"));
    }

    #[test]
    fn jit_memory_with_a_perf_map_is_the_processs_own_object_until_it_is_gone() {
        // Anonymous executable memory in this process, and a perf map naming it.
        let len = 4096;
        // SAFETY: a fresh anonymous mapping, unmapped below.
        let code = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(code, libc::MAP_FAILED);
        let start = code as u64;
        let pid = std::process::id();
        let map_path = format!("/tmp/perf-{pid}.map");
        std::fs::write(&map_path, format!("{start:x} 40 jitted\n")).unwrap();

        let metrics = Metrics::default();
        let mut table = ProcessTable::new(metrics.clone());
        let frames = table.normalize(
            pid,
            "test",
            &[start + 0x10],
            &[],
            None,
            &mut MapsOnce::default(),
        );
        std::fs::remove_file(&map_path).unwrap();
        let Frame::User { object, address } = frames[0] else {
            panic!("{frames:?}")
        };
        assert_eq!(address, start + 0x10, "JIT frames keep absolute addresses");
        assert_eq!(table.objects().get(object).name, map_path);
        assert!(table.objects().get(object).perf_map().is_some());
        assert_eq!(metrics.get("perf_maps_found"), 1);
        assert!(table.take_retired_jit_objects().is_empty());
        // A new image: the old one's JIT object is retired, once.
        table.on_exec(pid);
        assert_eq!(table.take_retired_jit_objects(), [object]);
        assert!(table.take_retired_jit_objects().is_empty());
        // Once nothing refers to it, the next JIT process gets its slot, with its own map.
        table.recycle_jit_objects(vec![object]);
        let objects_before = table.objects().len();
        std::fs::write(&map_path, format!("{start:x} 40 jitted_again\n")).unwrap();
        let frames = table.normalize(
            pid,
            "test",
            &[start + 0x10],
            &[],
            None,
            &mut MapsOnce::default(),
        );
        std::fs::remove_file(&map_path).unwrap();
        assert!(matches!(frames[0], Frame::User { object: o, .. } if o == object));
        assert_eq!(table.objects().len(), objects_before, "no new object");
        let mut content = String::new();
        use std::io::Read as _;
        let mut map = (**table.objects().get(object).perf_map().unwrap())
            .try_clone()
            .unwrap();
        map.read_to_string(&mut content).unwrap();
        assert!(content.contains("jitted_again"), "{content}");
        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(code, len) };
    }

    #[test]
    fn unmapped_addresses_are_frames_not_errors() {
        let metrics = Metrics::default();
        let mut table = ProcessTable::new(metrics.clone());
        let frames = table.normalize(
            std::process::id(),
            "t",
            &[0x10],
            &[],
            None,
            &mut MapsOnce::default(),
        );
        assert!(matches!(frames[0], Frame::User { address: 0x10, .. }));
        assert_eq!(metrics.get("frames_unmapped"), 1);
        // A pid that does not exist: every frame is unmapped, nothing panics.
        let frames = table.normalize(
            u32::MAX - 1,
            "ghost",
            &[0x1000, 0x2000],
            &[],
            None,
            &mut MapsOnce::default(),
        );
        assert_eq!(frames.len(), 2);
    }
}
