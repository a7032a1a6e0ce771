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
//! Go 1.26 stopped filling the header's `textStart`: it is then read from `runtime.moduledata`
//! (found by its pointers to the table). Inlined calls (Go ≥ 1.18, `FUNCDATA_InlTree`) are
//! expanded when the `go:func.*` data their offsets are relative to is found: moduledata points
//! at it, from a field that moves between releases, so it is recognised by its contents.
//!
//! All reads are bounds-checked: a malformed table gives errors or `None`, never a panic.

use std::ops::Range;

use object::{Object as _, ObjectSection as _, ObjectSegment as _, ReadRef};

/// Functions found at most; beyond this the header is taken as garbage (the largest Go binaries
/// have a few hundred thousand).
const MAX_FUNCTIONS: u64 = 1 << 24;
/// `PCDATA_InlTreeIndex`: the pc-value table giving the inline-tree entry at each pc.
const PCDATA_INL_TREE_INDEX: u32 = 2;
/// `FUNCDATA_InlTree`: the function's inline tree, in the `go:func.*` data.
const FUNCDATA_INL_TREE: u8 = 3;
/// Inlined calls expanded at most per address (a guard against cyclic garbage).
const MAX_INLINE_DEPTH: usize = 64;

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

    /// The file offsets of a range of virtual addresses that one segment backs.
    pub fn vaddr_range_to_file_offsets(&self, vaddrs: Range<u64>) -> Option<Range<u64>> {
        let start = self.vaddr_to_file_offset(vaddrs.start)?;
        let last = self.vaddr_to_file_offset(vaddrs.end.checked_sub(1)?)?;
        (last >= start).then(|| start..last + 1)
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
    /// The `go:func.*` data, for inline trees; `None` when it was not found (no inlined
    /// frames then).
    gofunc: Option<Vec<u8>>,
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
        // Go 1.16's table has absolute entries and pointer funcdata: no moduledata needed, and
        // inline trees are not read.
        if table.version != PclntabVersion::Go116 {
            let moduledata = find_moduledata(file, &table);
            if table.text_start == 0 {
                // Go 1.26 stopped filling pcHeader.textStart: moduledata.text has it.
                table.text_start = moduledata
                    .as_ref()
                    .and_then(|m| m.get(MODULEDATA_TEXT).copied())
                    .ok_or(PclntabError::Malformed("text start not found"))?;
            }
            table.validate()?;
            table.gofunc = moduledata.and_then(|m| find_gofunc(file, &table, &m));
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
            gofunc: None,
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

    /// The function containing a virtual address (as linked), with the file and line of the
    /// address itself (inside inlined code: the inlined callee's), as `go tool addr2line`
    /// answers.
    pub fn lookup(&self, virtual_address: u64) -> Option<GoFrame> {
        let func = self.func(self.function_index(virtual_address)?)?;
        self.frame(&func, func.name_off, virtual_address)
    }

    /// Every frame at a virtual address: the innermost inlined call first, the containing
    /// function last, each with its own position (a caller's is its call site), as Go's
    /// runtime unwinds inlined calls. Without inline-tree data, just [`Self::lookup`].
    pub fn lookup_frames(&self, virtual_address: u64) -> Vec<GoFrame> {
        let Some(func) = self
            .function_index(virtual_address)
            .and_then(|i| self.func(i))
        else {
            return Vec::new();
        };
        let (inlined, outer_pc) = self.inlined_calls(&func, virtual_address);
        inlined
            .into_iter()
            .chain([(outer_pc, func.name_off)])
            .filter_map(|(pc, name_off)| self.frame(&func, name_off, pc))
            .collect()
    }

    /// [`Self::lookup_frames`] for a file offset (what `Frame::User` carries).
    pub fn lookup_file_offset(&self, offset: u64) -> Vec<GoFrame> {
        self.segments
            .file_offset_to_vaddr(offset)
            .map(|va| self.lookup_frames(va))
            .unwrap_or_default()
    }

    /// The code, as sorted and disjoint file-offset ranges, where the stack pointer is where
    /// it was at the function's entry (Go's `pcsp` table reads 0): a leaf that needs no frame
    /// and the assembly routines that set up none (`memmove`, `memclrNoHeapPointers`,
    /// `aeshashbody`), and every function's entry before its prologue and its `RET`. There the
    /// return address is the word at the stack pointer and the frame pointer is still the
    /// caller's, so a frame-pointer walk skips the caller.
    pub fn frameless_ranges(&self) -> Vec<Range<u64>> {
        let mut ranges: Vec<Range<u64>> = Vec::new();
        for i in 0..self.nfunc {
            let Some(func) = self.func(i) else { continue };
            for (value, pcs) in self.pc_value_runs(func.pcsp, func.entry) {
                if value != 0 {
                    continue;
                }
                match ranges.last_mut() {
                    Some(last) if last.end == pcs.start => last.end = pcs.end,
                    _ => ranges.push(pcs),
                }
            }
        }
        let mut offsets: Vec<Range<u64>> = ranges
            .into_iter()
            .filter_map(|r| self.segments.vaddr_range_to_file_offsets(r))
            .collect();
        offsets.sort_unstable_by_key(|r| r.start);
        offsets.dedup_by(|b, a| b.start < a.end);
        offsets
    }

    /// Whether inlined calls can be expanded (the `go:func.*` data was found).
    pub fn has_inline_trees(&self) -> bool {
        self.gofunc.is_some()
    }

    /// A frame of function `func`'s code: the name at `name_off`, the position of `pc`.
    fn frame(&self, func: &Func, name_off: u32, pc: u64) -> Option<GoFrame> {
        let function = String::from_utf8_lossy(self.name_bytes(name_off)?).into_owned();
        let file = self
            .pc_value(func.pcfile, func.entry, pc)
            .and_then(|i| self.file_name(func.cu_offset, i))
            .map(|f| String::from_utf8_lossy(f).into_owned());
        let line = self
            .pc_value(func.pcln, func.entry, pc)
            .and_then(|l| u32::try_from(l).ok())
            .unwrap_or(0);
        Some(GoFrame {
            function,
            file,
            line,
        })
    }

    /// The inlined calls at `pc`, innermost first, as (position, name offset), and the
    /// position in the containing function: each inline-tree entry gives the callee's name
    /// and a pc in the caller whose position is the call site.
    fn inlined_calls(&self, func: &Func, pc: u64) -> (Vec<(u64, u32)>, u64) {
        let mut calls = Vec::new();
        let (Some(gofunc), Some(tree), Some(index_table)) = (
            self.gofunc.as_deref(),
            self.funcdata(func, FUNCDATA_INL_TREE),
            self.pcdata(func, PCDATA_INL_TREE_INDEX),
        ) else {
            return (calls, pc);
        };
        let mut pc = pc;
        while calls.len() < MAX_INLINE_DEPTH {
            let Some(index) = self
                .pc_value(index_table, func.entry, pc)
                .and_then(|i| usize::try_from(i).ok())
            else {
                break;
            };
            let Some(call) = self.inlined_call(gofunc, tree, index) else {
                break;
            };
            let Some(parent_pc) = func.entry.checked_add(call.parent_pc) else {
                break;
            };
            calls.push((pc, call.name_off));
            pc = parent_pc;
        }
        (calls, pc)
    }

    /// Entry `index` of the inline tree at `tree` in the `go:func.*` data.
    fn inlined_call(&self, gofunc: &[u8], tree: u32, index: usize) -> Option<InlinedCall> {
        // 1.18–1.19: {parent i16, funcID u8, _ u8, file i32, line i32, nameOff i32, parentPc i32}
        // 1.20+:     {funcID u8, _ [3]u8, nameOff i32, parentPc i32, startLine i32}
        let (size, name_at, parent_at) = match self.version {
            PclntabVersion::Go118 => (20, 12, 16),
            _ => (16, 4, 8),
        };
        let at = (tree as usize).checked_add(index.checked_mul(size)?)?;
        let name_off = read_u32(gofunc, at.checked_add(name_at)?)?;
        let parent_pc = read_u32(gofunc, at.checked_add(parent_at)?)? as i32;
        Some(InlinedCall {
            name_off,
            parent_pc: u64::try_from(parent_pc).ok()?,
        })
    }

    /// Offset of a pc-value table of `func` (`PCDATA_*` index), if it has one.
    fn pcdata(&self, func: &Func, index: u32) -> Option<u32> {
        if index >= func.npcdata {
            return None;
        }
        let at = func.trailer.checked_add(4 * index as usize)?;
        let table = read_u32(&self.data, at)?;
        (table != 0).then_some(table)
    }

    /// Offset of a funcdata blob of `func` (`FUNCDATA_*` index) in the `go:func.*` data.
    fn funcdata(&self, func: &Func, index: u8) -> Option<u32> {
        if index >= func.nfuncdata {
            return None;
        }
        let at = func
            .trailer
            .checked_add(4 * func.npcdata as usize)?
            .checked_add(4 * usize::from(index))?;
        let off = read_u32(&self.data, at)?;
        (off != u32::MAX).then_some(off)
    }

    /// Whether `gofunc` is the `go:func.*` data: the first inline-tree entry of up to 64
    /// functions names a function (an offset at the start of a name in the name table) and
    /// points back into its function. Needs at least a few functions with inline trees.
    fn inline_trees_plausible(&self, gofunc: &[u8]) -> bool {
        let names = self.cu_off.saturating_sub(self.funcname_off);
        let mut checked = 0;
        for i in 0..self.nfunc {
            let Some(func) = self.func(i) else { continue };
            let Some(tree) = self.funcdata(&func, FUNCDATA_INL_TREE) else {
                continue;
            };
            let size = match (self.entry(i + 1), func.entry) {
                (Some(next), entry) => next.saturating_sub(entry),
                _ => 0,
            };
            let Some(call) = self.inlined_call(gofunc, tree, 0) else {
                return false;
            };
            let name_ok = (call.name_off as usize) < names
                && (call.name_off == 0
                    || self
                        .data
                        .get(self.funcname_off + call.name_off as usize - 1)
                        == Some(&0))
                && self
                    .name_bytes(call.name_off)
                    .is_some_and(|n| !n.is_empty());
            if !name_ok || call.parent_pc >= size {
                return false;
            }
            checked += 1;
            if checked == 64 {
                break;
            }
        }
        checked >= 4
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
        // Fixed size of `_func` (pcdata and funcdata offsets follow); its last byte is nfuncdata.
        let size = match self.version {
            PclntabVersion::Go116 => self.ptr_size + 36,
            PclntabVersion::Go118 => 40,
            PclntabVersion::Go120 => 44,
        };
        let trailer = base.checked_add(size)?;
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
            pcsp: u32_field(3)?,
            pcfile: u32_field(4)?,
            pcln: u32_field(5)?,
            npcdata: u32_field(6)?,
            cu_offset: u32_field(7)?,
            nfuncdata: *self.data.get(trailer - 1)?,
            trailer,
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

    /// Every run of a pc-value table, from the function's entry: each value and the pcs it
    /// covers. Each step is a zig-zag varint value delta and a varint pc delta (in units of the
    /// instruction quantum); a value applies up to (excluding) the step's pc.
    fn pc_value_runs(&self, table: u32, entry: u64) -> PcValueRuns<'_> {
        PcValueRuns {
            data: &self.data,
            at: (table != 0)
                .then(|| self.pctab_off.checked_add(table as usize))
                .flatten(),
            pc: entry,
            value: -1,
            first: true,
            quantum: self.min_lc,
        }
    }

    /// The value a pc-value table (pcfile, pcln, …) gives `target`.
    fn pc_value(&self, table: u32, entry: u64, target: u64) -> Option<i32> {
        self.pc_value_runs(table, entry)
            .find(|(_, pcs)| target < pcs.end)
            .map(|(value, _)| value)
    }
}

/// [`GoPclntab::pc_value_runs`]'s iterator; it ends at the table's end or at malformed bytes.
struct PcValueRuns<'a> {
    data: &'a [u8],
    /// The next step's offset; `None` once ended.
    at: Option<usize>,
    pc: u64,
    value: i32,
    first: bool,
    quantum: u64,
}

impl Iterator for PcValueRuns<'_> {
    type Item = (i32, Range<u64>);

    fn next(&mut self) -> Option<Self::Item> {
        let mut p = self.at.take()?;
        let (uv, n) = read_uvarint(self.data, p)?;
        if uv == 0 && !self.first {
            return None;
        }
        p += n;
        self.value = self
            .value
            .wrapping_add(((uv >> 1) as i32) ^ -((uv & 1) as i32));
        let (pc_delta, n) = read_uvarint(self.data, p)?;
        p += n;
        let end = self
            .pc
            .checked_add(u64::from(pc_delta).checked_mul(self.quantum)?)?;
        let pcs = self.pc..end;
        (self.pc, self.first, self.at) = (end, false, Some(p));
        Some((self.value, pcs))
    }
}

/// The fields of a `_func` record a lookup needs.
struct Func {
    entry: u64,
    name_off: u32,
    pcsp: u32,
    pcfile: u32,
    pcln: u32,
    npcdata: u32,
    cu_offset: u32,
    nfuncdata: u8,
    /// Where the pcdata offsets (then the funcdata offsets) start.
    trailer: usize,
}

/// An inline-tree entry: the inlined callee, and a pc (relative to the containing function's
/// entry) whose position is the call site.
struct InlinedCall {
    name_off: u32,
    parent_pc: u64,
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
/// 21), text (22). Later fields move between releases (`gofunc` is word 38 in 1.18–1.19, 40 in
/// 1.20–1.26, 43 in 1.27): [`find_gofunc`] recognises it by what it points to instead.
const MODULEDATA_FUNCNAMETAB: usize = 1;
const MODULEDATA_FTAB: usize = 16;
const MODULEDATA_TEXT: usize = 22;
/// Words of moduledata read: past every field a Go release has put `gofunc` at so far.
const MODULEDATA_WORDS: usize = 64;

/// The first [`MODULEDATA_WORDS`] words of the moduledata whose pcHeader is `table` (in
/// `.go.module` from Go 1.26, `.noptrdata` before, else anywhere in writable loaded data): its
/// pointers to the header, the name table and the function table, and the function table's
/// length, must all agree with the table.
fn find_moduledata<'data, R: ReadRef<'data>>(
    file: &object::File<'data, R>,
    table: &GoPclntab,
) -> Option<Vec<u64>> {
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
                return Some(
                    (0..MODULEDATA_WORDS)
                        .map_while(|i| word(bytes, at, i))
                        .collect(),
                );
            }
        }
    }
    None
}

/// The `go:func.*` data (what inline-tree offsets are relative to): the moduledata word that
/// points into read-only data where the function table's inline trees decode sensibly. The
/// bytes run to the end of the segment, or to the pclntab when that follows in it.
fn find_gofunc<'data, R: ReadRef<'data>>(
    file: &object::File<'data, R>,
    table: &GoPclntab,
    moduledata: &[u64],
) -> Option<Vec<u8>> {
    let candidates = moduledata.get(MODULEDATA_TEXT + 1..)?;
    let mut tried = Vec::new();
    for &candidate in candidates {
        if tried.contains(&candidate) {
            continue;
        }
        tried.push(candidate);
        let Some(bytes) = read_only_data_from(file, candidate, table.vaddr) else {
            continue;
        };
        if table.inline_trees_plausible(bytes) {
            return Some(bytes.to_vec());
        }
    }
    None
}

/// The bytes of the read-only, non-executable segment holding `vaddr`, from `vaddr` on (up to
/// `stop` when that lies after `vaddr` in the same segment).
fn read_only_data_from<'data, R: ReadRef<'data>>(
    file: &object::File<'data, R>,
    vaddr: u64,
    stop: u64,
) -> Option<&'data [u8]> {
    const PF_X: u32 = 1;
    const PF_W: u32 = 2;
    let segment = file.segments().find(|s| {
        let read_only = matches!(
            s.flags(),
            object::SegmentFlags::Elf { p_flags } if p_flags & (PF_X | PF_W) == 0
        );
        read_only && vaddr >= s.address() && vaddr - s.address() < s.file_range().1
    })?;
    let data = segment.data().ok()?;
    let start = usize::try_from(vaddr - segment.address()).ok()?;
    let end = match stop.checked_sub(segment.address()) {
        Some(e) if stop > vaddr => usize::try_from(e).ok()?.min(data.len()),
        _ => data.len(),
    };
    data.get(start..end)
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
        // No go:func.* data here: one frame per address.
        assert!(!t.has_inline_trees());
        assert_eq!(
            t.lookup_frames(0x1004),
            vec![f("main.a", Some("/src/a.go"), 12)]
        );
        assert!(t.lookup_frames(0x1020).is_empty());
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
