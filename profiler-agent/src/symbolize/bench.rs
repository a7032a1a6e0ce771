//! `profiler-agent bench-symbolize` (run by `cargo xtask bench`): how many addresses per second
//! the [`Symbolizer`] resolves, cold (a fresh symbolizer: blazesym opens and parses each
//! binary, every frame is looked up and demangled) and warm (the same frames again on the same
//! symbolizer: every one is a cache hit, as a stack seen in an earlier interval is).
//!
//! The addresses are real: spread over the functions of the ELF symbol table of an executable
//! (by default this one) and of the libc this process runs with, as file offsets. The objects
//! are opened through the [`ObjectStore`] and the frames resolved as the collector's sinks do:
//! one [`Symbolizer::resolve`] batch, then one [`Symbolizer::get`] per frame.

use std::{
    fs::File,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context as _, bail};
use object::{
    Object as _, ObjectSection as _, ObjectSymbol as _, SectionKind, SymbolKind, read::ReadCache,
};

use super::Symbolizer;
use crate::{
    metrics::Metrics,
    process::{ObjectId, ObjectStore, objects::ObjectKey},
    profile::Frame,
};

/// The functions of one ELF file.
#[derive(Debug, Clone)]
pub struct Functions {
    pub path: PathBuf,
    /// `(file offset, size)` of every defined function with a size, sorted, one per start.
    pub ranges: Vec<(u64, u64)>,
    /// Whether the file carries DWARF (`.debug_info`): line numbers and inlined calls.
    pub dwarf: bool,
}

/// Reads the function symbols of `path` (its `.symtab`, else its `.dynsym`), as file offsets.
pub fn read_functions(path: &Path) -> anyhow::Result<Functions> {
    let file = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let cache = ReadCache::new(&file);
    let elf = object::File::parse(&cache).with_context(|| format!("parse {}", path.display()))?;
    let dwarf = elf.section_by_name(".debug_info").is_some();
    let mut symbols: Vec<_> = elf.symbols().collect();
    if symbols.is_empty() {
        symbols = elf.dynamic_symbols().collect();
    }
    let mut ranges = Vec::new();
    for symbol in symbols {
        if symbol.kind() != SymbolKind::Text || symbol.size() == 0 || !symbol.is_definition() {
            continue;
        }
        let Some(section) = symbol
            .section_index()
            .and_then(|i| elf.section_by_index(i).ok())
        else {
            continue;
        };
        let Some((section_offset, section_size)) = section.file_range() else {
            continue;
        };
        if section.kind() != SectionKind::Text {
            continue;
        }
        let Some(within) = symbol.address().checked_sub(section.address()) else {
            continue;
        };
        if within >= section_size {
            continue;
        }
        let size = symbol.size().min(section_size - within);
        ranges.push((section_offset + within, size));
    }
    ranges.sort_unstable();
    ranges.dedup_by_key(|(start, _)| *start);
    Ok(Functions {
        path: path.to_owned(),
        ranges,
        dwarf,
    })
}

/// `n` distinct addresses spread evenly over every function of `binaries`, as
/// `(index in binaries, file offset)`: function starts while there are more functions than
/// addresses, then also evenly spaced offsets inside each function (where return addresses
/// are). Fewer than `n` when the functions are too small to hold them all.
pub fn pick_addresses(binaries: &[Functions], n: usize) -> Vec<(usize, u64)> {
    let all: Vec<(usize, u64, u64)> = binaries
        .iter()
        .enumerate()
        .flat_map(|(b, f)| f.ranges.iter().map(move |&(start, size)| (b, start, size)))
        .collect();
    if all.is_empty() || n == 0 {
        return Vec::new();
    }
    let per_function = n.div_ceil(all.len());
    let chosen = n.div_ceil(per_function);
    let mut out = Vec::with_capacity(chosen * per_function);
    for i in 0..chosen {
        let (binary, start, size) = all[i * all.len() / chosen];
        for k in 0..per_function as u64 {
            out.push((binary, start + size * k / per_function as u64));
        }
    }
    out.truncate(n);
    out.sort_unstable();
    out.dedup();
    out
}

/// Up to `n` file offsets spread over the functions of one binary (see [`pick_addresses`]).
pub fn function_offsets(path: &Path, n: usize) -> anyhow::Result<Vec<u64>> {
    let functions = read_functions(path)?;
    Ok(pick_addresses(&[functions], n)
        .into_iter()
        .map(|(_, offset)| offset)
        .collect())
}

/// Opens `path` in `objects` as the process table does for a mapped file (keyed by device and
/// inode, kept open).
pub fn open_object(objects: &mut ObjectStore, path: &Path) -> anyhow::Result<ObjectId> {
    let meta = std::fs::metadata(path).with_context(|| format!("stat {}", path.display()))?;
    let key = ObjectKey::File {
        dev: (
            libc::major(meta.dev()) as i32,
            libc::minor(meta.dev()) as i32,
        ),
        inode: meta.ino(),
    };
    let id = objects
        .file_object(key, &path.to_string_lossy(), &[path.to_owned()])
        .with_context(|| format!("no room for {} in the object store", path.display()))?;
    if objects.get(id).symbolize_path().is_none() {
        bail!("cannot open {}", path.display());
    }
    Ok(id)
}

/// The libc this process runs with, from its executable mappings.
pub fn own_libc() -> anyhow::Result<PathBuf> {
    let maps = procfs::process::Process::myself()
        .and_then(|p| p.maps())
        .context("read /proc/self/maps")?;
    maps.into_iter()
        .filter(|m| m.perms.contains(procfs::process::MMPermissions::EXECUTE))
        .find_map(|m| match m.pathname {
            procfs::process::MMapPath::Path(path) => {
                let name = path.file_name()?.to_str()?;
                (name.starts_with("libc.so") || name.starts_with("libc-")).then_some(path)
            }
            _ => None,
        })
        .context("no libc among this process's executable mappings")
}

/// The default binaries: `exe` (this executable when `None`) and the libc this process runs
/// with — the two objects almost every sampled stack of a native process goes through.
pub fn default_binaries(exe: Option<PathBuf>) -> anyhow::Result<Vec<PathBuf>> {
    let exe = match exe {
        Some(path) => path,
        None => std::fs::read_link("/proc/self/exe").context("read /proc/self/exe")?,
    };
    Ok(vec![exe, own_libc()?])
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BinaryReport {
    pub path: String,
    pub functions: usize,
    pub addresses: usize,
    pub dwarf: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    /// Distinct addresses (frames) resolved per pass.
    pub addresses: usize,
    /// Of those, how many got a name (not `[unknown] module+0x…`), in the first cold pass.
    pub symbolized: usize,
    pub rounds: u32,
    /// Median over rounds of a fresh symbolizer resolving every address.
    pub cold_secs: f64,
    /// Median over rounds of the same symbolizer resolving them again.
    pub warm_secs: f64,
    pub cold_addresses_per_sec: f64,
    pub warm_addresses_per_sec: f64,
    /// Frames the warm passes sent to blazesym again (0: every one was a cache hit).
    pub warm_cache_misses: u64,
    pub binaries: Vec<BinaryReport>,
}

/// Frames blazesym (or Go's table) has been asked about so far.
fn lookups(metrics: &Metrics) -> u64 {
    metrics.get("frames_symbolized") + metrics.get("frames_unsymbolized")
}

/// What a sink does with an interval's frames: one batch, then one lookup per frame. Returns
/// how many have a name.
fn pass(symbolizer: &mut Symbolizer, frames: &[Frame], objects: &ObjectStore) -> usize {
    symbolizer.resolve(frames.iter().copied(), objects);
    frames
        .iter()
        .filter(|f| symbolizer.get(**f, objects).resolved)
        .count()
}

/// Resolves `addresses` addresses picked from `binaries`, `rounds` times: each round a fresh
/// symbolizer (cold), then the same one again (warm).
pub fn bench(binaries: &[PathBuf], addresses: usize, rounds: u32) -> anyhow::Result<BenchReport> {
    if rounds == 0 {
        bail!("rounds must be positive");
    }
    let metrics = Metrics::default();
    let mut objects = ObjectStore::new(binaries.len().max(1), metrics.clone());
    let mut functions = Vec::with_capacity(binaries.len());
    let mut ids = Vec::with_capacity(binaries.len());
    for path in binaries {
        functions.push(read_functions(path)?);
        ids.push(open_object(&mut objects, path)?);
    }
    let picked = pick_addresses(&functions, addresses);
    if picked.is_empty() {
        bail!("no function symbols in {binaries:?}");
    }
    let frames: Vec<Frame> = picked
        .iter()
        .map(|&(binary, address)| Frame::User {
            object: ids[binary],
            address,
        })
        .collect();

    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    let mut symbolized = None;
    let mut warm_cache_misses = 0;
    for _ in 0..rounds {
        let started = Instant::now();
        let mut symbolizer = Symbolizer::new(metrics.clone());
        let named = pass(&mut symbolizer, &frames, &objects);
        cold.push(started.elapsed().as_secs_f64());
        symbolized.get_or_insert(named);

        let before = lookups(&metrics);
        let started = Instant::now();
        std::hint::black_box(pass(&mut symbolizer, &frames, &objects));
        warm.push(started.elapsed().as_secs_f64());
        warm_cache_misses += lookups(&metrics) - before;
    }
    let (cold_secs, warm_secs) = (median(&mut cold), median(&mut warm));
    let per_sec = |secs: f64| {
        if secs > 0.0 {
            frames.len() as f64 / secs
        } else {
            0.0
        }
    };
    Ok(BenchReport {
        addresses: frames.len(),
        symbolized: symbolized.unwrap_or(0),
        rounds,
        cold_secs,
        warm_secs,
        cold_addresses_per_sec: per_sec(cold_secs),
        warm_addresses_per_sec: per_sec(warm_secs),
        warm_cache_misses,
        binaries: functions
            .iter()
            .enumerate()
            .map(|(i, f)| BinaryReport {
                path: f.path.display().to_string(),
                functions: f.ranges.len(),
                addresses: picked.iter().filter(|(b, _)| *b == i).count(),
                dwarf: f.dwarf,
            })
            .collect(),
    })
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_function_starts_then_offsets_inside_functions() {
        let binaries = [
            Functions {
                path: "a".into(),
                ranges: vec![(0x100, 0x40), (0x200, 0x10), (0x300, 0x80)],
                dwarf: false,
            },
            Functions {
                path: "b".into(),
                ranges: vec![(0x1000, 0x20)],
                dwarf: false,
            },
        ];
        assert_eq!(
            pick_addresses(&binaries, 2),
            vec![(0, 0x100), (0, 0x300)],
            "spread over the functions"
        );
        assert_eq!(
            pick_addresses(&binaries, 4),
            vec![(0, 0x100), (0, 0x200), (0, 0x300), (1, 0x1000)]
        );
        assert_eq!(
            pick_addresses(&binaries, 8),
            vec![
                (0, 0x100),
                (0, 0x120),
                (0, 0x200),
                (0, 0x208),
                (0, 0x300),
                (0, 0x340),
                (1, 0x1000),
                (1, 0x1010)
            ]
        );
        assert!(pick_addresses(&[], 8).is_empty());
    }

    #[test]
    fn finds_own_functions_and_libc() {
        let binaries = default_binaries(None).unwrap();
        let libc = binaries[1]
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(libc.starts_with("libc"), "{libc}");
        let own = read_functions(&binaries[0]).unwrap();
        assert!(own.ranges.len() > 1000, "{}", own.ranges.len());
        assert!(own.dwarf, "test binaries carry DWARF");
        assert!(read_functions(&binaries[1]).unwrap().ranges.len() > 100);
    }

    /// Counts, not speeds: the timing is whatever this machine gives.
    #[test]
    fn symbolizes_own_functions_and_warm_is_all_cache_hits() {
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let report = bench(&[exe], 2_000, 1).unwrap();
        assert!(report.addresses >= 1_900, "{report:?}");
        assert!(
            report.symbolized * 10 >= report.addresses * 9,
            "only {} of {} symbolized",
            report.symbolized,
            report.addresses
        );
        assert_eq!(report.warm_cache_misses, 0, "{report:?}");
        assert!(report.cold_secs > 0.0 && report.warm_secs > 0.0);
        assert_eq!(report.binaries[0].addresses, report.addresses);
    }
}
