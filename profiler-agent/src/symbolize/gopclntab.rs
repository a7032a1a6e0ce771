//! Go's own symbol table, `.gopclntab`: function names and file:line for Go binaries that have
//! neither a symbol table nor DWARF (`-ldflags=-s -w`). blazesym does not read it, and no
//! well-kept crate on crates.io does either, so this is a small reader of just what a profiler
//! needs: the function table (entry PC → name) and the pc→file and pc→line tables.
//!
//! Layout (Go's `runtime/symtab.go`; the header's magic tells the version):
//!
//! | magic        | Go        | function table entries             | `_func` |
//! |--------------|-----------|------------------------------------|---------|
//! | `0xfffffffa` | 1.16–1.17 | `{entry uintptr, funcoff uintptr}` | starts with `entry uintptr` |
//! | `0xfffffff0` | 1.18–1.19 | `{entryoff u32, funcoff u32}`, relative to `textStart` | `entryoff u32` |
//! | `0xfffffff1` | 1.20+     | as 1.18                            | as 1.18, plus `startLine` |
//!
//! Where the table is: the `.gopclntab` section (kept by Go's linker even with `-s -w`), or
//! `.data.rel.ro.gopclntab` in internally linked PIEs. Externally linked PIEs (cgo) merge it
//! into `.data.rel.ro`, and a binary can lose its section headers: then the header is found by
//! its magic in the non-executable loaded data.
//!
//! Inlined frames (`FUNCDATA_InlTree`) are not decoded: their offsets are relative to
//! `moduledata.gofunc`, which a stripped binary only gives away through `moduledata`. An
//! address inside inlined code therefore gets the containing function's name with the inlined
//! callee's file:line (what the pc→line table says).
//!
//! All reads are bounds-checked: a malformed table gives errors or `None`, never a panic.

use object::{Object as _, ObjectSection as _, ObjectSegment as _, ReadRef};

/// Functions found at most; beyond this the header is taken as garbage (the largest Go binaries
/// have a few hundred thousand).
const MAX_FUNCTIONS: u64 = 1 << 24;

#[derive(Debug, thiserror::Error)]
pub enum PclntabError {
    #[error("cannot parse the object: {0}")]
    Object(#[from] object::Error),
    #[error("no Go pclntab in this object")]
    NotFound,
    #[error("unsupported pclntab magic {0:#x}")]
    UnsupportedMagic(u32),
    #[error("only little-endian objects are supported")]
    BigEndian,
    #[error("malformed pclntab: {0}")]
    Malformed(&'static str),
}

/// The pclntab layout generation, from the header's magic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PclntabVersion {
    /// Go 1.16–1.17 (`0xfffffffa`).
    Go116,
    /// Go 1.18–1.19 (`0xfffffff0`).
    Go118,
    /// Go 1.20 and later (`0xfffffff1`).
    Go120,
}

impl PclntabVersion {
    fn from_magic(magic: u32) -> Option<Self> {
        match magic {
            0xffff_fffa => Some(Self::Go116),
            0xffff_fff0 => Some(Self::Go118),
            0xffff_fff1 => Some(Self::Go120),
            _ => None,
        }
    }
}

/// One symbolized address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoFrame {
    pub function: String,
    pub file: Option<String>,
    /// 0 when unknown.
    pub line: u32,
}

/// One `PT_LOAD` segment.
#[derive(Debug, Clone, Copy)]
struct Segment {
    vaddr: u64,
    file_offset: u64,
    file_size: u64,
    executable: bool,
}

/// The loaded segments of an ELF file: converts between file offsets (what the process table
/// records for a frame) and virtual addresses (what Go's tables use).
#[derive(Debug, Clone, Default)]
pub struct LoadSegments {
    segments: Vec<Segment>,
}

impl LoadSegments {
    pub fn from_object<'data, R: ReadRef<'data>>(file: &object::File<'data, R>) -> Self {
        const PF_X: u32 = 1;
        let segments = file
            .segments()
            .map(|s| {
                let (file_offset, file_size) = s.file_range();
                let executable = matches!(
                    s.flags(),
                    object::SegmentFlags::Elf { p_flags } if p_flags & PF_X != 0
                );
                Segment {
                    vaddr: s.address(),
                    file_offset,
                    file_size,
                    executable,
                }
            })
            .collect();
        Self { segments }
    }

    /// The virtual address (as linked, before any load bias) of a file offset. Executable
    /// segments win when two segments share a page of the file, since the offsets looked up
    /// are code addresses.
    pub fn file_offset_to_vaddr(&self, offset: u64) -> Option<u64> {
        let contains =
            |s: &&Segment| offset >= s.file_offset && offset - s.file_offset < s.file_size;
        let segment = self
            .segments
            .iter()
            .filter(|s| s.executable)
            .find(contains)
            .or_else(|| self.segments.iter().find(contains))?;
        Some((offset - segment.file_offset).wrapping_add(segment.vaddr))
    }

    /// The file offset of a virtual address, when the address is backed by the file.
    pub fn vaddr_to_file_offset(&self, vaddr: u64) -> Option<u64> {
        self.segments
            .iter()
            .find(|s| vaddr >= s.vaddr && vaddr - s.vaddr < s.file_size)
            .map(|s| (vaddr - s.vaddr).wrapping_add(s.file_offset))
    }

    fn is_executable(&self, vaddr: u64) -> bool {
        self.segments
            .iter()
            .any(|s| s.executable && vaddr >= s.vaddr && vaddr - s.vaddr < s.file_size)
    }
}

/// A parsed Go pclntab, owning a copy of the table's bytes (a few MB for typical binaries).
#[derive(Debug)]
pub struct GoPclntab {
    /// The table, from its header on.
    data: Vec<u8>,
    version: PclntabVersion,
    /// Where the header was in the binary.
    vaddr: u64,
    ptr_size: usize,
    /// Instruction size quantum: pc deltas are multiples of it.
    min_lc: u64,
    nfunc: usize,
    /// Base of the entry offsets (1.18+); 0 for 1.16, whose entries are absolute.
    text_start: u64,
    funcname_off: usize,
    cu_off: usize,
    filetab_off: usize,
    pctab_off: usize,
    functab_off: usize,
    segments: LoadSegments,
}

impl GoPclntab {
    /// Parses the pclntab of an ELF file given as bytes (or any `object::ReadRef`, such as
    /// `&object::read::ReadCache<File>`).
    pub fn parse<'data, R: ReadRef<'data>>(data: R) -> Result<Self, PclntabError> {
        let file = object::File::parse(data)?;
        Self::from_object(&file)
    }

    pub fn from_object<'data, R: ReadRef<'data>>(
        file: &object::File<'data, R>,
    ) -> Result<Self, PclntabError> {
        if !file.is_little_endian() {
            return Err(PclntabError::BigEndian);
        }
        let segments = LoadSegments::from_object(file);
        let (vaddr, bytes) = locate(file, &segments)?;
        let mut table = Self::from_header(bytes.to_vec(), vaddr, segments)?;
        if table.version != PclntabVersion::Go116 && table.text_start == 0 {
            // Go 1.26 stopped filling pcHeader.textStart: moduledata.text has it.
            table.text_start = moduledata_text(file, &table)
                .ok_or(PclntabError::Malformed("text start not found"))?;
        }
        table.validate()?;
        Ok(table)
    }

    /// A table parsed from its bytes alone (textStart as the header has it), validated.
    #[cfg(test)]
    fn from_table(data: Vec<u8>, vaddr: u64, segments: LoadSegments) -> Result<Self, PclntabError> {
        let table = Self::from_header(data, vaddr, segments)?;
        table.validate()?;
        Ok(table)
    }

    /// Reads the header; the function table is not checked yet.
    fn from_header(
        data: Vec<u8>,
        vaddr: u64,
        segments: LoadSegments,
    ) -> Result<Self, PclntabError> {
        let magic = read_u32(&data, 0).ok_or(PclntabError::Malformed("short header"))?;
        let version =
            PclntabVersion::from_magic(magic).ok_or(PclntabError::UnsupportedMagic(magic))?;
        let (min_lc, ptr_size) = header_quantum_and_ptr(&data).ok_or(PclntabError::Malformed(
            "bad instruction quantum or pointer size",
        ))?;
        let word = |index: usize| read_word(&data, 8 + index * ptr_size, ptr_size);
        let field = |index: usize, what: &'static str| -> Result<usize, PclntabError> {
            let v = word(index).ok_or(PclntabError::Malformed("short header"))?;
            let v = usize::try_from(v).map_err(|_| PclntabError::Malformed(what))?;
            if v > data.len() {
                return Err(PclntabError::Malformed(what));
            }
            Ok(v)
        };
        let nfunc = word(0).ok_or(PclntabError::Malformed("short header"))?;
        if nfunc == 0 || nfunc > MAX_FUNCTIONS {
            return Err(PclntabError::Malformed("implausible function count"));
        }
        // 1.18 added textStart after nfiles, shifting every later field by one word.
        let (text_start, first) = match version {
            PclntabVersion::Go116 => (0, 2),
            _ => (word(2).ok_or(PclntabError::Malformed("short header"))?, 3),
        };
        let table = Self {
            version,
            vaddr,
            ptr_size,
            min_lc,
            nfunc: nfunc as usize,
            text_start,
            funcname_off: field(first, "function name table offset")?,
            cu_off: field(first + 1, "compilation unit table offset")?,
            filetab_off: field(first + 2, "file table offset")?,
            pctab_off: field(first + 3, "pc table offset")?,
            functab_off: field(first + 4, "function table offset")?,
            segments,
            data,
        };
        Ok(table)
    }

    /// Checks what every lookup relies on: the function table fits, and its entries are sorted
    /// and start in executable memory.
    fn validate(&self) -> Result<(), PclntabError> {
        let end = self
            .functab_entry_size()
            .checked_mul(self.nfunc + 1)
            .and_then(|n| n.checked_add(self.functab_off))
            .ok_or(PclntabError::Malformed("function table overflows"))?;
        if end > self.data.len() {
            return Err(PclntabError::Malformed("function table past the end"));
        }
        let first = self
            .entry(0)
            .ok_or(PclntabError::Malformed("bad first entry"))?;
        let last = self
            .entry(self.nfunc)
            .ok_or(PclntabError::Malformed("bad last entry"))?;
        if first > last {
            return Err(PclntabError::Malformed("function table not sorted"));
        }
        if !self.segments.segments.is_empty() && !self.segments.is_executable(first) {
            return Err(PclntabError::Malformed(
                "first function not in executable memory",
            ));
        }
        Ok(())
    }

    pub fn version(&self) -> PclntabVersion {
        self.version
    }

    /// The virtual address of the table's header in the binary.
    pub fn address(&self) -> u64 {
        self.vaddr
    }

    pub fn function_count(&self) -> usize {
        self.nfunc
    }

    /// The Go text covered by the table: [first function's entry, end of the last function).
    pub fn text_range(&self) -> Option<(u64, u64)> {
        Some((self.entry(0)?, self.entry(self.nfunc)?))
    }

    pub fn segments(&self) -> &LoadSegments {
        &self.segments
    }

    /// The function containing a virtual address (as linked), with file and line.
    pub fn lookup(&self, virtual_address: u64) -> Option<GoFrame> {
        let index = self.function_index(virtual_address)?;
        let func = self.func(index)?;
        let function = String::from_utf8_lossy(self.name_bytes(func.name_off)?).into_owned();
        let file = self
            .pc_value(func.pcfile, func.entry, virtual_address)
            .and_then(|i| self.file_name(func.cu_offset, i))
            .map(|f| String::from_utf8_lossy(f).into_owned());
        let line = self
            .pc_value(func.pcln, func.entry, virtual_address)
            .and_then(|l| u32::try_from(l).ok())
            .unwrap_or(0);
        Some(GoFrame {
            function,
            file,
            line,
        })
    }

    /// [`Self::lookup`] for a file offset (what `Frame::User` carries).
    pub fn lookup_file_offset(&self, offset: u64) -> Option<GoFrame> {
        self.lookup(self.segments.file_offset_to_vaddr(offset)?)
    }

    /// Every function: (entry address, name). Names that are not UTF-8 are skipped.
    pub fn functions(&self) -> impl Iterator<Item = (u64, &str)> + '_ {
        (0..self.nfunc).filter_map(move |i| {
            let func = self.func(i)?;
            let name = std::str::from_utf8(self.name_bytes(func.name_off)?).ok()?;
            Some((func.entry, name))
        })
    }

    /// The entry address of the function named `name` (Go's name, without the `.abi0` suffix
    /// the ELF symbol table gives assembly functions).
    pub fn find_function(&self, name: &str) -> Option<u64> {
        self.functions()
            .find(|(_, n)| *n == name)
            .map(|(entry, _)| entry)
    }

    /// Index of the function containing `pc`: the last entry at or below it, if `pc` is inside
    /// the table's text.
    fn function_index(&self, pc: u64) -> Option<usize> {
        let (start, end) = self.text_range()?;
        if pc < start || pc >= end {
            return None;
        }
        // Binary search over entries 0..nfunc (entry nfunc is the end sentinel).
        let (mut lo, mut hi) = (0, self.nfunc);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if self.entry(mid)? <= pc {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Some(lo)
    }

    fn functab_entry_size(&self) -> usize {
        match self.version {
            PclntabVersion::Go116 => 2 * self.ptr_size,
            _ => 8,
        }
    }

    /// Entry address of function `i` (`i == nfunc`: end of the last function).
    fn entry(&self, i: usize) -> Option<u64> {
        let off = self.functab_off + i * self.functab_entry_size();
        match self.version {
            PclntabVersion::Go116 => read_word(&self.data, off, self.ptr_size),
            _ => self
                .text_start
                .checked_add(u64::from(read_u32(&self.data, off)?)),
        }
    }

    /// Offset of function `i`'s `_func` record, relative to the function table.
    fn func_off(&self, i: usize) -> Option<usize> {
        let off = self.functab_off + i * self.functab_entry_size();
        let v = match self.version {
            PclntabVersion::Go116 => read_word(&self.data, off + self.ptr_size, self.ptr_size)?,
            _ => u64::from(read_u32(&self.data, off + 4)?),
        };
        usize::try_from(v).ok()
    }

    fn func(&self, i: usize) -> Option<Func> {
        let base = self.functab_off.checked_add(self.func_off(i)?)?;
        // Fields after the entry: nameoff, args, deferreturn, pcsp, pcfile, pcln, npcdata,
        // cuOffset (4 bytes each).
        let after_entry = match self.version {
            PclntabVersion::Go116 => base.checked_add(self.ptr_size)?,
            _ => base.checked_add(4)?,
        };
        let u32_field = |k: usize| read_u32(&self.data, after_entry.checked_add(4 * k)?);
        Some(Func {
            entry: self.entry(i)?,
            name_off: u32_field(0)?,
            pcfile: u32_field(4)?,
            pcln: u32_field(5)?,
            cu_offset: u32_field(7)?,
        })
    }

    fn name_bytes(&self, name_off: u32) -> Option<&[u8]> {
        c_string(
            &self.data,
            self.funcname_off.checked_add(name_off as usize)?,
        )
    }

    /// File `index` of a compilation unit: the CU table maps it to an offset in the file table.
    fn file_name(&self, cu_offset: u32, index: i32) -> Option<&[u8]> {
        let slot = u64::from(cu_offset).checked_add(u64::try_from(index).ok()?)?;
        let at = usize::try_from(slot.checked_mul(4)?)
            .ok()?
            .checked_add(self.cu_off)?;
        let file_off = read_u32(&self.data, at)?;
        if file_off == u32::MAX {
            return None;
        }
        c_string(&self.data, self.filetab_off.checked_add(file_off as usize)?)
    }

    /// The value a pc-value table (pcfile, pcln, …) gives `target`, walking it from the
    /// function's entry. Each step is a zig-zag varint value delta and a varint pc delta (in
    /// units of the instruction quantum); a value applies up to (excluding) the step's pc.
    fn pc_value(&self, table: u32, entry: u64, target: u64) -> Option<i32> {
        if table == 0 {
            return None;
        }
        let mut p = self.pctab_off.checked_add(table as usize)?;
        let mut pc = entry;
        let mut value: i32 = -1;
        let mut first = true;
        loop {
            let (uv, n) = read_uvarint(&self.data, p)?;
            if uv == 0 && !first {
                return None;
            }
            p += n;
            let delta = ((uv >> 1) as i32) ^ -((uv & 1) as i32);
            value = value.wrapping_add(delta);
            let (pc_delta, n) = read_uvarint(&self.data, p)?;
            p += n;
            pc = pc.checked_add(u64::from(pc_delta).checked_mul(self.min_lc)?)?;
            if target < pc {
                return Some(value);
            }
            first = false;
        }
    }
}

/// The fields of a `_func` record a lookup needs.
struct Func {
    entry: u64,
    name_off: u32,
    pcfile: u32,
    pcln: u32,
    cu_offset: u32,
}

/// Finds the table: by section name, else by its magic in loaded, non-executable data.
fn locate<'data, R: ReadRef<'data>>(
    file: &object::File<'data, R>,
    segments: &LoadSegments,
) -> Result<(u64, &'data [u8]), PclntabError> {
    for name in [".gopclntab", ".data.rel.ro.gopclntab"] {
        if let Some(section) = file.section_by_name(name) {
            return Ok((section.address(), section.data()?));
        }
    }
    // Only scan files that look like Go: a non-Go library must not cost a scan.
    let looks_go = file.section_by_name(".go.buildinfo").is_some()
        || file.section_by_name(".note.go.buildid").is_some()
        || file.sections().next().is_none();
    if !looks_go {
        return Err(PclntabError::NotFound);
    }
    let scan_sections = [".data.rel.ro", ".rodata", ".noptrdata"];
    let mut candidates: Vec<(u64, &'data [u8])> = scan_sections
        .iter()
        .filter_map(|n| file.section_by_name(n))
        .filter_map(|s| Some((s.address(), s.data().ok()?)))
        .collect();
    if candidates.is_empty() {
        candidates = file
            .segments()
            .filter(
                |s| !matches!(s.flags(), object::SegmentFlags::Elf { p_flags } if p_flags & 1 != 0),
            )
            .filter_map(|s| Some((s.address(), s.data().ok()?)))
            .collect();
    }
    for (base, bytes) in candidates {
        if let Some(offset) = find_header(bytes, segments) {
            return Ok((base.wrapping_add(offset as u64), &bytes[offset..]));
        }
    }
    Err(PclntabError::NotFound)
}

/// Words of `runtime.moduledata` used to recognise it and read `text` (the same from Go 1.18 to
/// 1.27): `pcHeader`, then slice headers `{ptr, len, cap}` for funcnametab (1), cutab (4),
/// filetab (7), pctab (10), pclntable (13) and ftab (16), findfunctab (19), minpc, maxpc (20,
/// 21), text (22).
const MODULEDATA_FUNCNAMETAB: usize = 1;
const MODULEDATA_FTAB: usize = 16;
const MODULEDATA_TEXT: usize = 22;

/// `moduledata.text`, from the moduledata whose pcHeader is `table` (in `.go.module` from Go
/// 1.26, `.noptrdata` before, else anywhere in writable loaded data): its pointers to the header, the name table and the
/// function table, and the function table's length, must all agree with the table.
fn moduledata_text<'data, R: ReadRef<'data>>(
    file: &object::File<'data, R>,
    table: &GoPclntab,
) -> Option<u64> {
    const PF_W: u32 = 2;
    let sections = [".go.module", ".noptrdata"]
        .iter()
        .filter_map(|name| file.section_by_name(name))
        .filter_map(|section| Some((section.address(), section.data().ok()?)));
    let writable_segments = file
        .segments()
        .filter(
            |s| matches!(s.flags(), object::SegmentFlags::Elf { p_flags } if p_flags & PF_W != 0),
        )
        .filter_map(|s| Some((s.address(), s.data().ok()?)));
    let regions: Vec<(u64, &'data [u8])> = sections.chain(writable_segments).collect();
    let p = table.ptr_size;
    let word = |bytes: &[u8], at: usize, index: usize| read_word(bytes, at + index * p, p);
    let expect =
        |index: usize, value: u64, bytes: &[u8], at: usize| word(bytes, at, index) == Some(value);
    for (base, bytes) in regions {
        // Pointer-aligned addresses only.
        let first = ((p as u64 - base % p as u64) % p as u64) as usize;
        for at in (first..bytes.len()).step_by(p) {
            if !expect(0, table.vaddr, bytes, at) {
                continue;
            }
            let matches = expect(
                MODULEDATA_FUNCNAMETAB,
                table.vaddr.wrapping_add(table.funcname_off as u64),
                bytes,
                at,
            ) && expect(
                MODULEDATA_FTAB,
                table.vaddr.wrapping_add(table.functab_off as u64),
                bytes,
                at,
            ) && expect(MODULEDATA_FTAB + 1, table.nfunc as u64 + 1, bytes, at);
            if matches {
                return word(bytes, at, MODULEDATA_TEXT);
            }
        }
    }
    None
}

/// The offset of the first plausible pcHeader in `bytes`: a known magic, zero padding, a sane
/// quantum and pointer size, and (1.18+) a textStart in executable memory.
fn find_header(bytes: &[u8], segments: &LoadSegments) -> Option<usize> {
    let mut at = 0;
    while at + 8 <= bytes.len() {
        let rest = &bytes[at..];
        let found = rest.windows(3).position(|w| w == [0xff, 0xff, 0xff])?;
        // The magic is 0xffffff?? little-endian: its first byte precedes the three 0xff.
        let Some(start) = (at + found).checked_sub(1) else {
            at += found + 1;
            continue;
        };
        at += found + 1;
        if start % 4 != 0 {
            continue;
        }
        let candidate = &bytes[start..];
        let Some(version) = read_u32(candidate, 0).and_then(PclntabVersion::from_magic) else {
            continue;
        };
        let Some((_, ptr_size)) = header_quantum_and_ptr(candidate) else {
            continue;
        };
        if candidate.get(4..6) != Some(&[0, 0]) {
            continue;
        }
        if plausible_header(candidate, version, ptr_size, segments) {
            return Some(start);
        }
    }
    None
}

/// Whether a header with a known magic is a real one: a function count, table offsets in the
/// order Go's linker lays the tables out and inside `candidate`, and (1.18–1.25) a textStart in
/// executable memory (1.26 leaves it 0).
fn plausible_header(
    candidate: &[u8],
    version: PclntabVersion,
    ptr_size: usize,
    segments: &LoadSegments,
) -> bool {
    let word = |index: usize| read_word(candidate, 8 + index * ptr_size, ptr_size);
    let first = match version {
        PclntabVersion::Go116 => 2,
        _ => 3,
    };
    let offsets: Option<Vec<u64>> = (first..first + 5).map(word).collect();
    let Some(offsets) = offsets else {
        return false;
    };
    let ordered = offsets.windows(2).all(|w| w[0] < w[1])
        && offsets[0] >= (8 + (first + 5) * ptr_size) as u64
        && offsets[4] < candidate.len() as u64;
    let nfunc_ok = word(0).is_some_and(|n| n > 0 && n <= MAX_FUNCTIONS);
    let text_ok = match version {
        PclntabVersion::Go116 => true,
        _ => word(2).is_some_and(|text| text == 0 || segments.is_executable(text)),
    };
    ordered && nfunc_ok && text_ok
}

/// (instruction quantum, pointer size) from a header, when both are sane.
fn header_quantum_and_ptr(data: &[u8]) -> Option<(u64, usize)> {
    let min_lc = *data.get(6)?;
    let ptr_size = *data.get(7)?;
    if !matches!(min_lc, 1 | 2 | 4) || !matches!(ptr_size, 4 | 8) {
        return None;
    }
    Some((u64::from(min_lc), usize::from(ptr_size)))
}

fn read_u32(data: &[u8], off: usize) -> Option<u32> {
    let b = data.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes(b.try_into().ok()?))
}

fn read_word(data: &[u8], off: usize, ptr_size: usize) -> Option<u64> {
    match ptr_size {
        4 => read_u32(data, off).map(u64::from),
        8 => {
            let b = data.get(off..off.checked_add(8)?)?;
            Some(u64::from_le_bytes(b.try_into().ok()?))
        }
        _ => None,
    }
}

/// An unsigned LEB128 varint of at most 32 bits: (value, bytes used).
fn read_uvarint(data: &[u8], off: usize) -> Option<(u32, usize)> {
    let mut value: u32 = 0;
    for i in 0..5 {
        let b = *data.get(off + i)?;
        value |= u32::from(b & 0x7f).checked_shl(7 * i as u32)?;
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// The NUL-terminated string at `off` (without the NUL).
fn c_string(data: &[u8], off: usize) -> Option<&[u8]> {
    let rest = data.get(off..)?;
    let len = rest.iter().position(|&b| b == 0)?;
    Some(&rest[..len])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_and_strings() {
        assert_eq!(read_uvarint(&[0x05], 0), Some((5, 1)));
        assert_eq!(read_uvarint(&[0x80, 0x01], 0), Some((128, 2)));
        assert_eq!(read_uvarint(&[0x80, 0x80], 0), None);
        assert_eq!(read_uvarint(&[0xff; 6], 0), None);
        assert_eq!(c_string(b"ab\0cd", 0), Some(&b"ab"[..]));
        assert_eq!(c_string(b"ab", 0), None);
        assert_eq!(c_string(b"ab", 7), None);
    }

    /// A hand-made 1.20 table with two functions, for the decoding logic without a Go toolchain.
    fn synthetic() -> Vec<u8> {
        let mut t = Vec::new();
        t.extend_from_slice(&0xffff_fff1u32.to_le_bytes());
        t.extend_from_slice(&[0, 0, 1, 8]);
        // nfunc, nfiles, textStart, funcname, cu, filetab, pctab, functab offsets.
        for w in [2u64, 1, 0x1000, 72, 88, 92, 104, 116] {
            t.extend_from_slice(&w.to_le_bytes());
        }
        assert_eq!(t.len(), 72);
        t.extend_from_slice(b"main.a\0main.b\0\0\0"); // 72..88: function names
        assert_eq!(t.len(), 88);
        t.extend_from_slice(&0u32.to_le_bytes()); // 88: CU table: file 0 -> file table + 0
        t.extend_from_slice(b"/src/a.go\0\0\0"); // 92..104: file table
        assert_eq!(t.len(), 104);
        // 104: pc table. At offset 1: file index 0 for 0x10 bytes. At 4: line 10 for 4 bytes,
        // then line 12 for 12 bytes.
        t.extend_from_slice(&[0, 2, 0x10, 0, 22, 4, 4, 12, 0, 0, 0, 0]);
        assert_eq!(t.len(), 116);
        // 116: functab {entryoff, funcoff} × 3 (the last is the end sentinel).
        for (entry, func) in [(0u32, 24u32), (0x10, 68), (0x20, 0)] {
            t.extend_from_slice(&entry.to_le_bytes());
            t.extend_from_slice(&func.to_le_bytes());
        }
        // functab+24: _func of main.a; functab+68: _func of main.b.
        assert_eq!(t.len(), 116 + 24);
        for (entry, name, pcfile, pcln) in [(0u32, 0u32, 1u32, 4u32), (0x10, 7, 0, 0)] {
            for v in [entry, name, 0, 0, 0, pcfile, pcln, 0, 0, 0] {
                t.extend_from_slice(&v.to_le_bytes());
            }
            t.extend_from_slice(&[0, 0, 0, 0]);
        }
        t
    }

    #[test]
    fn decodes_a_synthetic_table() {
        let t = GoPclntab::from_table(synthetic(), 0x2000, LoadSegments::default()).unwrap();
        assert_eq!(t.version(), PclntabVersion::Go120);
        assert_eq!(t.text_range(), Some((0x1000, 0x1020)));
        let f = |function: &str, file: Option<&str>, line| GoFrame {
            function: function.into(),
            file: file.map(Into::into),
            line,
        };
        assert_eq!(t.lookup(0x1000), Some(f("main.a", Some("/src/a.go"), 10)));
        assert_eq!(t.lookup(0x1003), Some(f("main.a", Some("/src/a.go"), 10)));
        assert_eq!(t.lookup(0x1004), Some(f("main.a", Some("/src/a.go"), 12)));
        assert_eq!(t.lookup(0x100f), Some(f("main.a", Some("/src/a.go"), 12)));
        assert_eq!(t.lookup(0x1010), Some(f("main.b", None, 0)));
        assert_eq!(t.lookup(0x1020), None);
        assert_eq!(t.lookup(0xfff), None);
        assert_eq!(t.find_function("main.b"), Some(0x1010));
        assert_eq!(t.functions().count(), 2);
    }

    #[test]
    fn truncated_or_garbage_tables_are_errors_not_panics() {
        let full = synthetic();
        for len in 0..full.len() {
            let table = GoPclntab::from_table(full[..len].to_vec(), 0, LoadSegments::default());
            // Cut anywhere, the table either fails to parse or answers lookups without panics.
            if let Ok(t) = table {
                for pc in 0xff0..0x1030 {
                    let _ = t.lookup(pc);
                }
            }
        }
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2000 {
            let mut bytes = full.clone();
            for _ in 0..4 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let i = (seed as usize) % bytes.len();
                bytes[i] = (seed >> 32) as u8;
            }
            if let Ok(t) = GoPclntab::from_table(bytes, 0, LoadSegments::default()) {
                for pc in (0xff0..0x1030).step_by(3) {
                    let _ = t.lookup(pc);
                }
            }
        }
        assert!(matches!(
            GoPclntab::parse(&[0u8; 64][..]),
            Err(PclntabError::Object(_))
        ));
        let own = std::fs::read("/proc/self/exe").unwrap();
        assert!(matches!(
            GoPclntab::parse(&own[..]),
            Err(PclntabError::NotFound)
        ));
    }

    #[test]
    fn header_scan_needs_alignment_and_sane_fields() {
        let segments = LoadSegments {
            segments: vec![Segment {
                vaddr: 0x1000,
                file_offset: 0,
                file_size: 0x1000,
                executable: true,
            }],
        };
        let mut bytes = vec![0xffu8; 3];
        bytes.extend_from_slice(&[0; 5]);
        bytes.extend_from_slice(&synthetic());
        assert_eq!(find_header(&bytes, &segments), Some(8));
        // textStart outside executable memory: not a header.
        assert_eq!(find_header(&bytes, &LoadSegments::default()), None);
        // Go 1.26 leaves textStart 0.
        bytes[8 + 24..8 + 32].fill(0);
        assert_eq!(find_header(&bytes, &LoadSegments::default()), Some(8));
        // A table offset past the end: not a header.
        bytes.truncate(8 + 100);
        assert_eq!(find_header(&bytes, &segments), None);
    }
}
