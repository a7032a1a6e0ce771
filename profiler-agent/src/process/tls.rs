//! ELF thread-local symbols (`otel_thread_ctx_v1`, `custom_labels_current_set`, ...): where a
//! variable lives relative to a thread's thread pointer, so that the eBPF program can read it
//! from `task_struct->thread.fsbase` at sample time. x86_64 only (TLS variant II).
//!
//! Two steps, because the file says *how* the variable is reached and only the live process
//! knows *where*:
//! 1. [`find_tls_symbol`] reads the ELF object: the `STT_TLS` symbol (`.dynsym` first, as
//!    OTEP 4947 requires, `.symtab` as a fallback) and its access model, from the dynamic
//!    relocations that name it:
//!    - `R_X86_64_TPOFF64`: initial-exec; a GOT slot holds the offset from the thread pointer;
//!    - `R_X86_64_TLSDESC`: a TLS descriptor `{entry, arg}` (static or dynamic TLS);
//!    - `R_X86_64_DTPMOD64`: general-dynamic; a GOT pair holds `{module id, offset}`;
//!    - none, in an executable: local-exec; the offset is fixed at link time.
//!
//!    A module relocation without a symbol is local-dynamic, which OTEP 4947 excludes.
//! 2. [`resolve`] reads the GOT slot or descriptor that the dynamic loader filled in, in the
//!    live process, and returns a [`TlsLocation`]: either a static offset from the thread
//!    pointer or a (module id, offset) pair for the DTV walk.
//!
//! [`tls_address`] is the user-space twin of what the eBPF program does with a
//! [`TlsLocation`]; the tests compare it with the addresses the fixtures print.
//!
//! Relocations are found through the section headers (`SHF_ALLOC` `SHT_RELA` sections, i.e.
//! `.rela.dyn` and `.rela.plt`); an object whose section headers were stripped is not handled.

use std::{fs::File, io, ops::Range, os::unix::fs::FileExt as _};

use object::{
    Endianness, ReadRef,
    elf::{self, FileHeader64},
    read::elf::{
        Dyn as _, FileHeader as _, ProgramHeader as _, Rela as _, SectionHeader as _, Sym as _,
    },
};
use procfs::process::{MMapPath, MemoryMap};
use profiler_common::TlsLocation;
use thiserror::Error;

/// A TLS variable of an ELF object and how the object's code reaches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSymbol {
    /// `st_value`: the variable's offset inside the object's TLS block.
    pub value: u64,
    /// `st_size`.
    pub size: u64,
    /// Found in `.dynsym` (where OTEP 4947 requires it) rather than only in `.symtab`.
    pub in_dynsym: bool,
    /// `ET_EXEC`, or `ET_DYN` flagged `DF_1_PIE`: its TLS block is the first static block.
    pub is_executable: bool,
    /// The `PT_TLS` segment.
    pub tls_segment: TlsSegment,
    pub access: TlsAccess,
    /// Virtual addresses spanned by the `PT_LOAD` segments (before the load bias).
    pub image: Range<u64>,
}

/// What the loader needs of `PT_TLS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsSegment {
    pub vaddr: u64,
    pub memsz: u64,
    pub align: u64,
}

/// The access model, with the link-time address (before the load bias) of what to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsAccess {
    /// Executable, no relocation: the offset from the thread pointer is fixed.
    LocalExec { tp_offset: i64 },
    /// `R_X86_64_TPOFF64`: the GOT slot holds the offset from the thread pointer.
    InitialExec { got: u64 },
    /// `R_X86_64_TLSDESC`: the descriptor `{entry, arg}`.
    Descriptor { descriptor: u64 },
    /// `R_X86_64_DTPMOD64`: the GOT pair `{module id, offset}` (`tls_index`).
    GeneralDynamic { got: u64 },
}

/// The C library of the target, which decides the DTV layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LibcFlavor {
    Glibc,
    Musl,
}

impl LibcFlavor {
    /// Offset of the DTV pointer from the thread pointer (x86_64: `tcbhead_t.dtv` in glibc,
    /// `struct pthread.dtv` in musl, both the second word).
    pub const fn dtv_offset(self) -> i16 {
        8
    }

    /// Bytes per DTV entry: glibc's `dtv_t` is `{void *val; void *to_free}`, musl's a pointer.
    pub const fn dtv_entry_size(self) -> u8 {
        match self {
            Self::Glibc => 16,
            Self::Musl => 8,
        }
    }

    /// musl when the process maps its dynamic loader or libc (`ld-musl-*.so.1`,
    /// `libc.musl-*.so.1`), glibc otherwise. A static musl binary maps neither and is
    /// misreported as glibc; only dynamic TLS (absent in static binaries) depends on it.
    pub fn detect(maps: &[MemoryMap]) -> Self {
        let musl = maps.iter().any(|m| match &m.pathname {
            MMapPath::Path(p) => p
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("ld-musl") || n.starts_with("libc.musl")),
            _ => false,
        });
        if musl { Self::Musl } else { Self::Glibc }
    }
}

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("malformed ELF: {0}")]
    Elf(#[from] object::Error),
    #[error("not an x86_64 little-endian ELF object (e_machine {0})")]
    UnsupportedArch(u16),
    #[error("the symbol is not a TLS variable (st_type {0})")]
    NotTls(u8),
    #[error("the object has no valid PT_TLS segment")]
    NoTlsSegment,
    #[error("local-dynamic TLS access (module relocation without a symbol): not supported")]
    LocalDynamic,
    #[error("no dynamic relocation reaches the variable in this shared object")]
    NoAccessPath,
    #[error("{what} at {addr:#x} is not resolved by the dynamic loader yet")]
    Unresolved { what: &'static str, addr: u64 },
    #[error("implausible {what}: {value:#x}")]
    Implausible { what: &'static str, value: u64 },
    #[error("read {len} bytes at {addr:#x} in process {pid}: {source}")]
    Read {
        pid: u32,
        addr: u64,
        len: usize,
        source: io::Error,
    },
    #[error("no mapping of the object's first PT_LOAD segment")]
    NotMapped,
    #[error("the thread has no block for TLS module {0} yet")]
    Unallocated(u32),
}

impl TlsError {
    /// Whether trying again later can succeed (the loader or the thread has not got there yet,
    /// or memory could not be read), as opposed to an object that will never work.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Unresolved { .. } | Self::Read { .. } | Self::NotMapped | Self::Unallocated(_)
        )
    }
}

/// Static TLS offsets (variant II) lie below the thread pointer, within this distance.
const MAX_STATIC_TLS: i64 = 1 << 30;
/// Below `mmap_min_addr`: never a user pointer.
const MIN_USER_POINTER: u64 = 0x1000;
/// Far above any module count a loader hands out; a larger value is garbage.
const MAX_MODULE_ID: u64 = 1 << 20;
/// A module's TLS block is far smaller.
const MAX_BLOCK_OFFSET: u64 = 1 << 30;

/// Finds the TLS variable `name` defined in the ELF object `data` and classifies its access
/// model. `Ok(None)`: the object does not define it (it may reference it as undefined).
pub fn find_tls_symbol<'data, R: ReadRef<'data>>(
    data: R,
    name: &str,
) -> Result<Option<TlsSymbol>, TlsError> {
    let header = FileHeader64::<Endianness>::parse(data)?;
    let endian = header.endian()?;
    let machine = header.e_machine(endian);
    if machine != elf::EM_X86_64 || endian != Endianness::Little {
        return Err(TlsError::UnsupportedArch(machine));
    }
    let sections = header.sections(endian, data)?;
    let mut found = None;
    // OTEP 4947 requires the symbol in `.dynsym`. `.symtab` is only searched in objects without
    // a `.dynsym` (static binaries): it can be tens of megabytes, and objects are inspected on
    // the agent's hot start-up path.
    let has_dynsym = sections
        .iter()
        .any(|s| s.sh_type(endian) == elf::SHT_DYNSYM);
    let tables: &[(u32, bool)] = if has_dynsym {
        &[(elf::SHT_DYNSYM, true)]
    } else {
        &[(elf::SHT_SYMTAB, false)]
    };
    for &(sh_type, in_dynsym) in tables {
        let table = sections.symbols(endian, data, sh_type)?;
        // Names are compared against the string table read once: through a `ReadCache` (how
        // the agent reads binaries) each name lookup is its own seek and read, thousands per
        // object in a large `.dynsym` (perf's: ~10 ms of the collector's time at its first
        // sample).
        let string_bytes = sections
            .section(table.string_section())?
            .data(endian, data)?;
        let strings = object::read::StringTable::new(string_bytes, 0, string_bytes.len() as u64);
        let defined = table.iter().find(|s| {
            s.st_shndx(endian) != elf::SHN_UNDEF
                && strings.get(s.st_name(endian)).ok() == Some(name.as_bytes())
        });
        if let Some(sym) = defined {
            found = Some((sym, in_dynsym));
            break;
        }
    }
    let Some((sym, in_dynsym)) = found else {
        return Ok(None);
    };
    if sym.st_type() != elf::STT_TLS {
        return Err(TlsError::NotTls(sym.st_type()));
    }

    let segments = header.program_headers(endian, data)?;
    let tls_segment = segments
        .iter()
        .find(|p| p.p_type(endian) == elf::PT_TLS)
        .map(|p| TlsSegment {
            vaddr: p.p_vaddr(endian),
            memsz: p.p_memsz(endian),
            align: p.p_align(endian),
        })
        .filter(|s| s.align <= 1 || s.align.is_power_of_two())
        .ok_or(TlsError::NoTlsSegment)?;
    let image = segments
        .iter()
        .filter(|p| p.p_type(endian) == elf::PT_LOAD)
        .map(|p| {
            let start = p.p_vaddr(endian);
            start..start.saturating_add(p.p_memsz(endian))
        })
        .reduce(|a, b| a.start.min(b.start)..a.end.max(b.end))
        .unwrap_or(0..0);
    let is_executable = match header.e_type(endian) {
        elf::ET_EXEC => true,
        elf::ET_DYN => flags_1(&sections, endian, data)? & elf::DF_1_PIE != 0,
        _ => false,
    };

    let value = sym.st_value(endian);
    let access = match find_relocations(&sections, endian, data, name)? {
        Relocations {
            tpoff: Some(got), ..
        } => TlsAccess::InitialExec { got },
        Relocations {
            tlsdesc: Some(descriptor),
            ..
        } => TlsAccess::Descriptor { descriptor },
        Relocations {
            dtpmod: Some(got), ..
        } => TlsAccess::GeneralDynamic { got },
        _ if is_executable => TlsAccess::LocalExec {
            tp_offset: local_exec_offset(value, &tls_segment)?,
        },
        Relocations {
            anonymous_module: true,
            ..
        } => return Err(TlsError::LocalDynamic),
        _ => return Err(TlsError::NoAccessPath),
    };
    Ok(Some(TlsSymbol {
        value,
        size: sym.st_size(endian),
        in_dynsym,
        is_executable,
        tls_segment,
        access,
        image,
    }))
}

/// `DT_FLAGS_1` of the dynamic section (0 when absent).
fn flags_1<'data, R: ReadRef<'data>>(
    sections: &object::read::elf::SectionTable<'data, FileHeader64<Endianness>, R>,
    endian: Endianness,
    data: R,
) -> Result<u32, TlsError> {
    let Some((dynamic, _)) = sections.dynamic(endian, data)? else {
        return Ok(0);
    };
    Ok(dynamic
        .iter()
        .find(|d| d.d_tag(endian) == elf::DT_FLAGS_1)
        .map_or(0, |d| d.d_val(endian) as u32))
}

/// The first relocation of each TLS kind that names the variable.
#[derive(Default)]
struct Relocations {
    tpoff: Option<u64>,
    tlsdesc: Option<u64>,
    dtpmod: Option<u64>,
    /// A TLSDESC or DTPMOD64 without a symbol: a local-dynamic access to some variable.
    anonymous_module: bool,
}

fn find_relocations<'data, R: ReadRef<'data>>(
    sections: &object::read::elf::SectionTable<'data, FileHeader64<Endianness>, R>,
    endian: Endianness,
    data: R,
    name: &str,
) -> Result<Relocations, TlsError> {
    let mut found = Relocations::default();
    for section in sections.iter() {
        // Only allocated RELA sections are seen by the dynamic loader (.rela.dyn, .rela.plt).
        if section.sh_flags(endian) & u64::from(elf::SHF_ALLOC) == 0 {
            continue;
        }
        let Some((relas, symtab_index)) = section.rela(endian, data)? else {
            continue;
        };
        // A section without a valid linked symbol table (sh_link 0 in static PIEs) can only
        // hold relocations without symbols.
        let symbols = sections
            .symbol_table_by_index(endian, data, symtab_index)
            .ok();
        for rela in relas {
            let r_type = rela.r_type(endian, false);
            let slot = match r_type {
                elf::R_X86_64_TPOFF64 => &mut found.tpoff,
                elf::R_X86_64_TLSDESC => &mut found.tlsdesc,
                elf::R_X86_64_DTPMOD64 => &mut found.dtpmod,
                _ => continue,
            };
            let sym_index = rela.r_sym(endian, false);
            if sym_index == 0 {
                found.anonymous_module |= r_type != elf::R_X86_64_TPOFF64;
                continue;
            }
            // Match by name: the relocation's symbol table may not be the one the variable
            // was found in (.symtab fallback).
            let named = symbols.as_ref().is_some_and(|symbols| {
                symbols
                    .symbol(object::SymbolIndex(sym_index as usize))
                    .and_then(|s| symbols.symbol_name(endian, s))
                    .is_ok_and(|n| n == name.as_bytes())
            });
            if named && slot.is_none() {
                *slot = Some(rela.r_offset(endian));
            }
        }
    }
    Ok(found)
}

/// Local-exec offset from the thread pointer (x86_64, variant II): the executable's TLS block
/// ends at the thread pointer, its start padded so that `p_vaddr` keeps its alignment. This
/// is `st_value - roundup(p_memsz, p_align)` when `p_vaddr` is aligned, as it normally is
/// (glibc `_dl_determine_tlsoffset`, LLD `getTlsTpOffset`).
fn local_exec_offset(value: u64, tls: &TlsSegment) -> Result<i64, TlsError> {
    let mask = tls.align.max(1) - 1;
    let padding = 0u64.wrapping_sub(tls.vaddr).wrapping_sub(tls.memsz) & mask;
    let block = tls
        .memsz
        .checked_add(padding)
        .filter(|b| *b as i64 <= MAX_STATIC_TLS && value < *b)
        .ok_or(TlsError::Implausible {
            what: "local-exec TLS block size",
            value: tls.memsz,
        })?;
    Ok(value as i64 - block as i64)
}

/// Load bias of an object (runtime address − link-time address) from its entries in
/// `/proc/<pid>/maps` (the caller passes those of this file): the lowest mapping of the file
/// page holding the first `PT_LOAD` segment starts at the page-aligned `p_vaddr` + bias.
pub fn load_bias<'data, R: ReadRef<'data>>(elf: R, maps: &[MemoryMap]) -> Result<u64, TlsError> {
    let header = FileHeader64::<Endianness>::parse(elf)?;
    let endian = header.endian()?;
    let first = header
        .program_headers(endian, elf)?
        .iter()
        .filter(|p| p.p_type(endian) == elf::PT_LOAD)
        .min_by_key(|p| p.p_vaddr(endian))
        .ok_or(TlsError::NotMapped)?;
    let page = page_size();
    let page_offset = first.p_offset(endian) & !(page - 1);
    let start = maps
        .iter()
        .filter(|m| m.offset == page_offset)
        .map(|m| m.address.0)
        .min()
        .ok_or(TlsError::NotMapped)?;
    Ok(start.wrapping_sub(first.p_vaddr(endian) & !(page - 1)))
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size)
        .ok()
        .filter(|s| s.is_power_of_two())
        .unwrap_or(4096)
}

/// Reads the words the dynamic loader wrote for `symbol` in process `pid` (whose copy of the
/// object is at `load_bias`) and returns where the variable is relative to a thread pointer.
///
/// TLSDESC: the descriptor's `arg` is either a static offset (glibc `_dl_tlsdesc_return`,
/// musl `__tlsdesc_static`) or a pointer to `{module id, offset, ...}` (glibc
/// `struct tlsdesc_dynamic_arg`, musl's two-word block). On x86_64 static offsets are always
/// negative (the static TLS area lies below the thread pointer) while user-space pointers are
/// positive as signed values, so the sign decides; offsets beyond 1 GiB and values below the
/// first page are rejected as garbage. This holds for non-PIE heaps at low addresses too, which
/// a magnitude threshold would misread. An `arg` pointing into the object itself is the
/// relocation that a lazily bound descriptor passes to the loader's resolver: unresolved.
pub fn resolve(
    pid: u32,
    symbol: &TlsSymbol,
    load_bias: u64,
    libc: LibcFlavor,
) -> Result<TlsLocation, TlsError> {
    let (module_id, offset) = match symbol.access {
        TlsAccess::LocalExec { tp_offset } => (0, tp_offset),
        TlsAccess::InitialExec { got } => {
            let addr = load_bias.wrapping_add(got);
            let [value] = read_words(pid, addr)?;
            (0, static_offset(value, "initial-exec GOT slot", addr)?)
        }
        TlsAccess::Descriptor { descriptor } => {
            let addr = load_bias.wrapping_add(descriptor);
            let [entry, arg] = read_words(pid, addr)?;
            let unresolved = TlsError::Unresolved {
                what: "TLS descriptor",
                addr,
            };
            if entry == 0 {
                return Err(unresolved);
            }
            if (arg as i64) < 0 {
                (0, static_offset(arg, "TLS descriptor argument", addr)?)
            } else if arg < MIN_USER_POINTER {
                return Err(TlsError::Implausible {
                    what: "TLS descriptor argument",
                    value: arg,
                });
            } else if symbol.image.contains(&arg.wrapping_sub(load_bias)) {
                return Err(unresolved);
            } else {
                let [module, offset] = read_words(pid, arg)?;
                dynamic_pair(module, offset, "TLS descriptor", addr)?
            }
        }
        TlsAccess::GeneralDynamic { got } => {
            let addr = load_bias.wrapping_add(got);
            let [module, offset] = read_words(pid, addr)?;
            dynamic_pair(module, offset, "general-dynamic GOT pair", addr)?
        }
    };
    Ok(TlsLocation {
        offset,
        module_id,
        dtv_offset: libc.dtv_offset(),
        dtv_entry_size: libc.dtv_entry_size(),
        _pad: 0,
    })
}

/// A static TLS offset: negative, within [`MAX_STATIC_TLS`]. Zero is what an unrelocated slot
/// holds.
fn static_offset(value: u64, what: &'static str, addr: u64) -> Result<i64, TlsError> {
    match value as i64 {
        0 => Err(TlsError::Unresolved { what, addr }),
        v if (-MAX_STATIC_TLS..0).contains(&v) => Ok(v),
        _ => Err(TlsError::Implausible { what, value }),
    }
}

/// `{module id, offset}`; module 0 is what an unrelocated GOT pair holds.
fn dynamic_pair(
    module: u64,
    offset: u64,
    what: &'static str,
    addr: u64,
) -> Result<(u32, i64), TlsError> {
    if module == 0 {
        return Err(TlsError::Unresolved { what, addr });
    }
    if module > MAX_MODULE_ID {
        return Err(TlsError::Implausible {
            what: "TLS module id",
            value: module,
        });
    }
    if offset >= MAX_BLOCK_OFFSET {
        return Err(TlsError::Implausible {
            what: "offset in a TLS block",
            value: offset,
        });
    }
    Ok((module as u32, offset as i64))
}

/// The variable's address for the thread whose thread pointer (fsbase) is `thread_pointer`:
/// the same walk the eBPF program does, with user-space reads. Static TLS: `tp + offset`.
/// Dynamic: `dtv = *(tp + dtv_offset)`, `block = *(dtv + module_id * dtv_entry_size)`,
/// `block + offset`.
pub fn tls_address(pid: u32, thread_pointer: u64, loc: &TlsLocation) -> Result<u64, TlsError> {
    if loc.module_id == 0 {
        return Ok(thread_pointer.wrapping_add_signed(loc.offset));
    }
    let [dtv] = read_words(
        pid,
        thread_pointer.wrapping_add_signed(loc.dtv_offset.into()),
    )?;
    let entry = dtv.wrapping_add(u64::from(loc.module_id) * u64::from(loc.dtv_entry_size));
    let [block] = read_words(pid, entry)?;
    // glibc marks a block not allocated yet with TLS_DTV_UNALLOCATED (-1).
    if block == 0 || block == u64::MAX {
        return Err(TlsError::Unallocated(loc.module_id));
    }
    Ok(block.wrapping_add_signed(loc.offset))
}

/// Reads `buf.len()` bytes at `addr` of process `pid`: `process_vm_readv`, falling back on
/// `/proc/<pid>/mem` (which works where the former is filtered, e.g. by seccomp).
pub fn read_memory(pid: u32, addr: u64, buf: &mut [u8]) -> Result<(), TlsError> {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: `local` describes `buf`, which is valid for writes of its length; the remote
    // range is only read by the kernel, which checks it.
    let n = unsafe { libc::process_vm_readv(pid as libc::pid_t, &local, 1, &remote, 1, 0) };
    if usize::try_from(n).is_ok_and(|n| n == buf.len()) {
        return Ok(());
    }
    File::open(format!("/proc/{pid}/mem"))
        .and_then(|mem| mem.read_exact_at(buf, addr))
        .map_err(|source| TlsError::Read {
            pid,
            addr,
            len: buf.len(),
            source,
        })
}

fn read_words<const N: usize>(pid: u32, addr: u64) -> Result<[u64; N], TlsError> {
    let mut bytes = [[0u8; 8]; N];
    read_memory(pid, addr, bytes.as_flattened_mut())?;
    Ok(bytes.map(u64::from_ne_bytes))
}

#[cfg(test)]
mod tests {
    use std::{
        path::{Path, PathBuf},
        process::Command,
    };

    use super::*;

    const NAME: &str = "otel_thread_ctx_v1";

    fn fixture_sources() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/otel_ctx")
    }

    /// A fresh directory for one test's builds.
    fn temp_dir(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("profiler-tls-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        dir
    }

    /// Compiles with the fixture flags; `args` holds sources (relative to the fixture
    /// directory unless absolute) and extra flags.
    fn gcc(dir: &Path, output: &str, args: &[&str]) -> PathBuf {
        let out = dir.join(output);
        let status = Command::new("gcc")
            .current_dir(fixture_sources())
            .args(["-O2", "-g", "-fno-omit-frame-pointer", "-pthread"])
            .args(args)
            .arg("-o")
            .arg(&out)
            .status()
            .expect("run gcc");
        assert!(status.success(), "gcc {args:?} failed");
        out
    }

    fn classify(path: &Path, name: &str) -> Result<Option<TlsSymbol>, TlsError> {
        let data = std::fs::read(path).expect("read fixture");
        find_tls_symbol(&*data, name)
    }

    /// `r_offset` of the relocation of type `r_type` naming `symbol`, as readelf (an
    /// independent ELF reader) lists it.
    fn readelf_reloc(path: &Path, r_type: &str, symbol: &str) -> u64 {
        let out = Command::new("readelf")
            .arg("-rW")
            .arg(path)
            .output()
            .expect("run readelf");
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.len() > 4 && f[2] == r_type && f[4] == symbol)
            .and_then(|f| u64::from_str_radix(f[0], 16).ok())
            .unwrap_or_else(|| panic!("readelf lists no {r_type} for {symbol}"))
    }

    #[test]
    fn executable_is_local_exec_from_dynsym_only() {
        let dir = temp_dir("exe");
        let exported = gcc(
            &dir,
            "exe-le",
            &[
                "-DWRITER_LINKED",
                "-mtls-dialect=gnu2",
                "-Wl,--export-dynamic-symbol=otel_thread_ctx_v1",
                "main.c",
                "writer.c",
            ],
        );
        let sym = classify(&exported, NAME).unwrap().expect("symbol");
        assert!(sym.in_dynsym && sym.is_executable);
        assert_eq!((sym.value, sym.size), (0, 8));
        // writer.c's 8-byte pointer is the executable's only TLS: the block is [tp-8, tp).
        assert_eq!(sym.access, TlsAccess::LocalExec { tp_offset: -8 });

        let unexported = gcc(
            &dir,
            "exe-le-symtab",
            &["-DWRITER_LINKED", "main.c", "writer.c"],
        );
        // Not exported: OTEP 4947 requires `.dynsym`, and `.symtab` is not searched in objects
        // that have one.
        assert!(classify(&unexported, NAME).unwrap().is_none());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn shared_objects_are_classified_by_their_relocations() {
        let dir = temp_dir("so");
        let so = |name: &str, flags: &[&str]| {
            let mut args = vec!["-fPIC", "-shared", "writer.c"];
            args.extend_from_slice(flags);
            gcc(&dir, name, &args)
        };
        let desc = so("desc.so", &["-mtls-dialect=gnu2"]);
        let gd = so("gd.so", &["-mtls-dialect=gnu"]);
        let ie = so("ie.so", &["-ftls-model=initial-exec"]);
        for (path, expected) in [
            (
                &desc,
                TlsAccess::Descriptor {
                    descriptor: readelf_reloc(&desc, "R_X86_64_TLSDESC", NAME),
                },
            ),
            (
                &gd,
                TlsAccess::GeneralDynamic {
                    got: readelf_reloc(&gd, "R_X86_64_DTPMOD64", NAME),
                },
            ),
            (
                &ie,
                TlsAccess::InitialExec {
                    got: readelf_reloc(&ie, "R_X86_64_TPOFF64", NAME),
                },
            ),
        ] {
            let sym = classify(path, NAME).unwrap().expect("symbol");
            assert!(sym.in_dynsym && !sym.is_executable, "{}", path.display());
            assert_eq!(sym.access, expected, "{}", path.display());
            assert!(sym.image.contains(&match expected {
                TlsAccess::Descriptor { descriptor } => descriptor,
                TlsAccess::GeneralDynamic { got } | TlsAccess::InitialExec { got } => got,
                TlsAccess::LocalExec { .. } => unreachable!(),
            }));
        }

        // The driver linked against the library only references the symbol.
        let driver = gcc(
            &dir,
            "driver",
            &[
                "-DWRITER_LINKED",
                "main.c",
                desc.to_str().expect("utf-8 path"),
            ],
        );
        assert_eq!(classify(&driver, NAME).unwrap(), None);
        assert!(matches!(
            classify(&desc, "otel_ctx_slot"),
            Err(TlsError::NotTls(elf::STT_FUNC))
        ));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn unexported_local_dynamic_variable_is_not_found() {
        let dir = temp_dir("ld");
        let source = dir.join("ld.c");
        std::fs::write(
            &source,
            "static __thread void *ld_var;\nvoid **ld_slot(void) { return &ld_var; }\n",
        )
        .expect("write ld.c");
        let source = source.to_str().expect("utf-8 path");
        // A variable only the object's own code reaches (local-dynamic) is not exported, so a
        // reader that follows OTEP 4947 (`.dynsym` only) does not find it at all.
        for dialect in ["-mtls-dialect=gnu", "-mtls-dialect=gnu2"] {
            let so = gcc(&dir, "ld.so", &["-fPIC", "-shared", dialect, source]);
            assert!(
                matches!(classify(&so, "ld_var"), Ok(None)),
                "{dialect}: {:?}",
                classify(&so, "ld_var")
            );
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn garbage_input_is_an_error_not_a_panic() {
        let dir = temp_dir("garbage");
        let so = gcc(
            &dir,
            "desc.so",
            &["-fPIC", "-shared", "-mtls-dialect=gnu2", "writer.c"],
        );
        let data = std::fs::read(&so).expect("read");
        let _ = std::fs::remove_dir_all(dir);
        assert!(find_tls_symbol(&b"not an elf file"[..], NAME).is_err());
        for len in (0..data.len()).step_by(7) {
            let _ = find_tls_symbol(&data[..len], NAME);
        }
        // Corrupt single bytes (header, program headers, then a stride through the rest),
        // and try every other function that parses the file.
        let positions = (0..256).chain((256..data.len()).step_by(13));
        for i in positions {
            let mut bad = data.clone();
            bad[i] ^= 0xa5;
            let _ = find_tls_symbol(&*bad, NAME);
            let _ = load_bias(&*bad, &[]);
        }
    }

    #[test]
    fn local_exec_offset_follows_variant_ii() {
        let seg = |vaddr, memsz, align| TlsSegment {
            vaddr,
            memsz,
            align,
        };
        // Aligned segment: st_value - roundup(memsz, align) (the libdd-otel-thread-ctx case).
        assert_eq!(
            local_exec_offset(0x20, &seg(0x3dd0, 0x68, 8)).unwrap(),
            -0x48
        );
        assert_eq!(local_exec_offset(0, &seg(0x1000, 0x68, 32)).unwrap(), -0x80);
        // p_vaddr 8 bytes past a 32-byte boundary: the block start keeps that misalignment,
        // so tp - block_start is the smallest size >= memsz that is 24 modulo 32.
        assert_eq!(local_exec_offset(0, &seg(0x1008, 0x10, 32)).unwrap(), -0x18);
        assert_eq!(local_exec_offset(0, &seg(0x1008, 0x30, 32)).unwrap(), -0x38);
        assert_eq!(local_exec_offset(0, &seg(0, 8, 0)).unwrap(), -8);
        assert!(local_exec_offset(0x100, &seg(0, 8, 8)).is_err());
        assert!(local_exec_offset(0, &seg(0, u64::MAX, 8)).is_err());
    }

    /// A symbol whose descriptor / GOT words are `words`, in this very process.
    fn resolve_words(access: fn(u64) -> TlsAccess, words: &[u64]) -> Result<TlsLocation, TlsError> {
        let symbol = TlsSymbol {
            value: 0,
            size: 8,
            in_dynsym: true,
            is_executable: false,
            tls_segment: TlsSegment {
                vaddr: 0,
                memsz: 8,
                align: 8,
            },
            access: access(words.as_ptr() as u64),
            image: 0x10000..0x20000,
        };
        resolve(std::process::id(), &symbol, 0, LibcFlavor::Glibc)
    }

    #[test]
    fn descriptor_argument_decides_static_or_dynamic() {
        let desc = |a| TlsAccess::Descriptor { descriptor: a };
        let entry = 0x7f00_0000_1000u64;
        let loc = resolve_words(desc, &[entry, (-152i64) as u64]).unwrap();
        assert_eq!((loc.module_id, loc.offset), (0, -152));
        assert_eq!((loc.dtv_offset, loc.dtv_entry_size), (8, 16));

        // A pointer to glibc's tlsdesc_dynamic_arg {module, offset, gen_count}.
        let dynamic_arg = [2u64, 96, 2];
        let loc = resolve_words(desc, &[entry, dynamic_arg.as_ptr() as u64]).unwrap();
        assert_eq!((loc.module_id, loc.offset), (2, 96));

        let unresolved =
            |r: Result<TlsLocation, TlsError>| matches!(r, Err(TlsError::Unresolved { .. }));
        assert!(unresolved(resolve_words(desc, &[0, 0])));
        // A lazily bound descriptor points at its relocation inside the object's image.
        assert!(unresolved(resolve_words(desc, &[entry, 0x10800])));
        assert!(matches!(
            resolve_words(desc, &[entry, 8]),
            Err(TlsError::Implausible { .. })
        ));
        assert!(matches!(
            resolve_words(desc, &[entry, (-(1i64 << 40)) as u64]),
            Err(TlsError::Implausible { .. })
        ));
        let bad_module = [1u64 << 40, 0];
        assert!(matches!(
            resolve_words(desc, &[entry, bad_module.as_ptr() as u64]),
            Err(TlsError::Implausible { .. })
        ));
    }

    #[test]
    fn got_words_give_initial_exec_and_general_dynamic_locations() {
        let ie = |a| TlsAccess::InitialExec { got: a };
        let gd = |a| TlsAccess::GeneralDynamic { got: a };
        assert_eq!(resolve_words(ie, &[(-64i64) as u64]).unwrap().offset, -64);
        assert!(matches!(
            resolve_words(ie, &[0]),
            Err(TlsError::Unresolved { .. })
        ));
        let loc = resolve_words(gd, &[3, 16]).unwrap();
        assert_eq!((loc.module_id, loc.offset), (3, 16));
        assert!(matches!(
            resolve_words(gd, &[0, 0]),
            Err(TlsError::Unresolved { .. })
        ));
        let unreadable = TlsSymbol {
            access: TlsAccess::InitialExec { got: 8 },
            ..resolve_template()
        };
        let err = resolve(std::process::id(), &unreadable, 0, LibcFlavor::Musl).unwrap_err();
        assert!(matches!(err, TlsError::Read { .. }) && err.is_transient());
    }

    fn resolve_template() -> TlsSymbol {
        TlsSymbol {
            value: 0,
            size: 8,
            in_dynsym: true,
            is_executable: true,
            tls_segment: TlsSegment {
                vaddr: 0,
                memsz: 8,
                align: 8,
            },
            access: TlsAccess::LocalExec { tp_offset: -8 },
            image: 0..0,
        }
    }

    #[test]
    fn tls_address_walks_the_dtv() {
        // A fake thread: tp points at a TCB whose second word is the DTV pointer.
        let block = [0u8; 64];
        let dtv = [0u64, 0, 0, 0, block.as_ptr() as u64, 0];
        let tcb = [0u64, dtv.as_ptr() as u64];
        let tp = tcb.as_ptr() as u64;
        let pid = std::process::id();
        let glibc = |module_id, offset| TlsLocation {
            offset,
            module_id,
            dtv_offset: 8,
            dtv_entry_size: 16,
            _pad: 0,
        };
        assert_eq!(tls_address(pid, tp, &glibc(0, -8)).unwrap(), tp - 8);
        assert_eq!(
            tls_address(pid, tp, &glibc(2, 24)).unwrap(),
            block.as_ptr() as u64 + 24
        );
        let musl = TlsLocation {
            dtv_entry_size: 8,
            ..glibc(4, 0)
        };
        assert_eq!(tls_address(pid, tp, &musl).unwrap(), block.as_ptr() as u64);
        assert!(matches!(
            tls_address(pid, tp, &glibc(1, 0)),
            Err(TlsError::Unallocated(1))
        ));
    }

    #[test]
    fn load_bias_of_this_test_binary_matches_the_auxiliary_vector() {
        let exe = std::fs::read_link("/proc/self/exe").expect("exe path");
        let maps: Vec<MemoryMap> = procfs::process::Process::myself()
            .and_then(|p| p.maps())
            .expect("own maps")
            .0
            .into_iter()
            .filter(|m| matches!(&m.pathname, MMapPath::Path(p) if *p == exe))
            .collect();
        let data = std::fs::read(&exe).expect("read exe");
        let bias = load_bias(&*data, &maps).expect("load bias");

        // AT_PHDR is where the loader sees the program headers: bias + PT_PHDR.p_vaddr.
        let header = FileHeader64::<Endianness>::parse(&*data).expect("elf");
        let phdr = header
            .program_headers(Endianness::Little, &*data)
            .expect("phdrs")
            .iter()
            .find(|p| p.p_type(Endianness::Little) == elf::PT_PHDR)
            .expect("PT_PHDR")
            .p_vaddr(Endianness::Little);
        // SAFETY: getauxval has no preconditions.
        let at_phdr = unsafe { libc::getauxval(libc::AT_PHDR) };
        assert_eq!(bias + phdr, at_phdr);
        assert_eq!(
            LibcFlavor::detect(
                &procfs::process::Process::myself()
                    .unwrap()
                    .maps()
                    .unwrap()
                    .0
            ),
            LibcFlavor::Glibc
        );
    }
}
