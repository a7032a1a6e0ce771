//! Executable objects (binaries, shared libraries, and pseudo-objects such as `[vdso]`), each
//! opened once and kept open, so that frames can still be symbolized after the process that
//! mapped the object has exited or the file has been replaced on disk.

use std::{
    collections::HashMap,
    fs::File,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::Arc,
};

use object::{Object as _, ObjectSection as _, read::ReadCache};

use crate::metrics::Metrics;

/// Index of an object in the [`ObjectStore`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectId(pub u32);

/// What identifies a file-backed object across processes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ObjectKey {
    File {
        dev: (i32, i32),
        inode: u64,
    },
    /// Memory without a file (`[vdso]`, anonymous executable memory): one per name.
    Pseudo(String),
}

#[derive(Debug)]
pub struct Object {
    /// The path as the process saw it (`/usr/lib/x86_64-linux-gnu/libc.so.6`), or a pseudo name.
    pub name: String,
    pub build_id: Option<Vec<u8>>,
    /// Open file, when the object is file-backed and could be opened.
    file: Option<Arc<File>>,
    /// A process's perf map (`/tmp/perf-<pid>.map`), open: the names of its JIT code, which
    /// is addressed by absolute address.
    perf_map: Option<Arc<File>>,
}

impl Object {
    /// The file name (last path component), for display.
    pub fn short_name(&self) -> &str {
        self.name.rsplit('/').next().unwrap_or(&self.name)
    }

    /// A path through which the symbolizer can read the object, valid while the store lives.
    pub fn symbolize_path(&self) -> Option<PathBuf> {
        self.file
            .as_ref()
            .map(|f| PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd())))
    }

    /// The open file, for readers other than the symbolizer's (Go's pclntab).
    pub fn file(&self) -> Option<&File> {
        self.file.as_deref()
    }

    pub fn perf_map(&self) -> Option<&Arc<File>> {
        self.perf_map.as_ref()
    }

    pub fn build_id_hex(&self) -> Option<String> {
        self.build_id.as_deref().map(crate::context::hex)
    }
}

/// Owns every object the agent has seen. Objects are never removed while the agent runs
/// (the symbolizer caches by path); the table is bounded, and objects past the bound are
/// counted and left unsymbolized.
pub struct ObjectStore {
    by_key: HashMap<ObjectKey, ObjectId>,
    objects: Vec<Object>,
    max_objects: usize,
    metrics: Metrics,
}

impl ObjectStore {
    pub fn new(max_objects: usize, metrics: Metrics) -> Self {
        raise_open_files_limit();
        Self {
            by_key: HashMap::new(),
            objects: Vec::new(),
            max_objects,
            metrics,
        }
    }

    pub fn get(&self, id: ObjectId) -> &Object {
        &self.objects[id.0 as usize]
    }

    pub fn len(&self) -> usize {
        self.objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    /// Finds or opens a file-backed object. `open_paths` are tried in order (for example the
    /// process's `map_files` entry, then the path under its root).
    pub fn file_object(
        &mut self,
        key: ObjectKey,
        name: &str,
        open_paths: &[PathBuf],
    ) -> Option<ObjectId> {
        if let Some(id) = self.by_key.get(&key) {
            return Some(*id);
        }
        let file = open_paths.iter().find_map(|p| File::open(p).ok());
        if file.is_none() {
            self.metrics.inc("objects_open_failed");
        }
        let build_id = file.as_ref().and_then(read_build_id);
        self.insert(
            key,
            Object {
                name: name.to_owned(),
                build_id,
                file: file.map(Arc::new),
                perf_map: None,
            },
        )
    }

    pub fn pseudo_object(&mut self, name: &str) -> Option<ObjectId> {
        let key = ObjectKey::Pseudo(name.to_owned());
        if let Some(id) = self.by_key.get(&key) {
            return Some(*id);
        }
        self.insert(
            key,
            Object {
                name: name.to_owned(),
                build_id: None,
                file: None,
                perf_map: None,
            },
        )
    }

    /// An object for one process's JIT code, named `name` (the map's path as the process sees
    /// it) and symbolized from `perf_map`: a new one, or `reuse`, the object of a process gone
    /// long enough that nothing refers to it any more (the old map's file is closed). No key:
    /// every process's JIT code is its own.
    pub fn perf_map_object(
        &mut self,
        name: &str,
        perf_map: File,
        reuse: Option<ObjectId>,
    ) -> Option<ObjectId> {
        let object = Object {
            name: name.to_owned(),
            build_id: None,
            file: None,
            perf_map: Some(Arc::new(perf_map)),
        };
        if let Some(id) = reuse {
            self.objects[id.0 as usize] = object;
            return Some(id);
        }
        if self.objects.len() >= self.max_objects {
            self.metrics.inc("objects_table_full");
            return None;
        }
        let id = ObjectId(self.objects.len() as u32);
        self.objects.push(object);
        Some(id)
    }

    fn insert(&mut self, key: ObjectKey, object: Object) -> Option<ObjectId> {
        if self.objects.len() >= self.max_objects {
            self.metrics.inc("objects_table_full");
            return None;
        }
        let id = ObjectId(self.objects.len() as u32);
        self.objects.push(object);
        self.by_key.insert(key, id);
        Some(id)
    }
}

/// Every object stays open (up to `max_objects` files): the soft limit on open files, often
/// 1024, is raised to the hard limit, as Go runtimes do for every program.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid rlimit structs; getrlimit/setrlimit have no other preconditions.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                tracing::debug!(
                    error = %std::io::Error::last_os_error(),
                    "RLIMIT_NOFILE not raised"
                );
            }
        }
    }
}

/// The GNU build id note of an ELF file, read without loading the whole file.
pub fn read_build_id(file: &File) -> Option<Vec<u8>> {
    let cache = ReadCache::new(file);
    let elf = object::File::parse(&cache).ok()?;
    if let Ok(Some(id)) = elf.build_id() {
        return Some(id.to_vec());
    }
    // Go binaries without a GNU note carry their own build id section.
    let section = elf.section_by_name(".note.go.buildid")?;
    let data = section.data().ok()?;
    Some(
        data.get(16..)?
            .iter()
            .copied()
            .take_while(|&b| b != 0)
            .collect(),
    )
}

/// Strips the ` (deleted)` suffix the kernel appends to replaced files.
pub fn clean_path(path: &Path) -> String {
    let s = path.to_string_lossy();
    s.strip_suffix(" (deleted)").unwrap_or(&s).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_build_id() {
        let exe = File::open("/proc/self/exe").unwrap();
        let id = read_build_id(&exe).expect("test binary has a build id");
        assert!(id.len() >= 16);
    }

    #[test]
    fn dedups_and_bounds() {
        let metrics = Metrics::default();
        let mut store = ObjectStore::new(2, metrics.clone());
        let key = ObjectKey::File {
            dev: (1, 2),
            inode: 3,
        };
        let a = store.file_object(key.clone(), "/proc/self/exe", &["/proc/self/exe".into()]);
        assert_eq!(store.file_object(key, "/other", &[]), a);
        assert!(store.get(a.unwrap()).symbolize_path().is_some());
        assert!(store.pseudo_object("[vdso]").is_some());
        assert_eq!(store.pseudo_object("[anon]"), None);
        assert_eq!(metrics.get("objects_table_full"), 1);
        assert_eq!(clean_path(Path::new("/a/b (deleted)")), "/a/b");
    }
}
