//! Go binaries: recognise them and find what the eBPF pprof-label reader needs
//! (../shared/research/thread-context.md §6): the Go version, the offsets of `g.m`, `g.labels`
//! and `m.curg`, the labels layout (a map before 1.24, a sorted slice from 1.24), and where the
//! current `g` lives relative to the thread pointer.
//!
//! - Go-ness and the version come from the build info (`.go.buildinfo`, magic
//!   `\xff Go buildinf:`), in both its pointer-based (≤1.17) and inline-string (≥1.18) forms.
//! - Offsets come from DWARF (`runtime.g`, `runtime.m`) when the binary has it, else from the
//!   table in the memo, verified for 1.19 and 1.21–1.27. DWARF wins when the two disagree.
//!   Versions outside 1.17–1.27 are refused: their offsets are never guessed.
//! - The g slot is confirmed per binary by decoding the first instructions of
//!   `runtime.stackcheck` (found through the pclntab, so stripped binaries work too): C
//!   thread-locals in cgo binaries move it away from the usual FS−8.

use std::{borrow::Cow, fs::File, io::Read as _};

use gimli::{AttributeValue, LittleEndian, constants};
use object::{Object as _, ObjectSection as _, ObjectSegment as _, ReadRef, read::ReadCache};

use crate::symbolize::gopclntab::{GoPclntab, LoadSegments};

/// Build-info header magic; the header is 32 bytes, 16-byte aligned.
const BUILDINFO_MAGIC: &[u8; 14] = b"\xff Go buildinf:";
const BUILDINFO_HEADER: usize = 32;
/// Header flag: version and module info follow the header inline (Go ≥ 1.18).
const BUILDINFO_INLINE: u8 = 0x2;
/// Header flag: big-endian pointers (pointer-based format only).
const BUILDINFO_BIG_ENDIAN: u8 = 0x1;
/// The g slot when nothing says otherwise: the TLS word just below the thread pointer.
pub const DEFAULT_TLS_G_OFFSET: i64 = -8;
/// Functions whose first instructions load g from TLS, tried in order.
const G_LOADERS: [&str; 3] = ["runtime.stackcheck", "runtime.systemstack", "runtime.mcall"];
/// Decompressed DWARF sections larger than this are not read (a broken or hostile header).
const MAX_DWARF_SECTION: u64 = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum GoError {
    #[error("cannot parse the object: {0}")]
    Object(#[from] object::Error),
    #[error("cannot read the file: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed Go build info: {0}")]
    BuildInfo(&'static str),
    #[error("unparseable Go version {0:?}")]
    BadVersion(String),
    /// Outside 1.17–1.27: the offsets are unknown, and are not guessed.
    #[error("unsupported Go version {0}")]
    UnsupportedVersion(String),
}

/// A Go release, as `go1.MINOR.PATCH` (pre-releases count as patch 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
    /// The version string as the binary has it (`go1.24.11`, `go1.21rc2`, `go1.22.1 X:nocoverageredesign`).
    pub raw: String,
}

impl GoVersion {
    /// Parses `go1.19.8`, `go1.21rc2`, `go1.22.1 X:…`, `devel go1.25-abcdef …`.
    pub fn parse(s: &str) -> Option<Self> {
        let rest = s.trim().trim_start_matches("devel ").strip_prefix("go")?;
        let (major, rest) = leading_number(rest)?;
        let rest = rest.strip_prefix('.')?;
        let (minor, rest) = leading_number(rest)?;
        let patch = rest
            .strip_prefix('.')
            .and_then(leading_number)
            .map_or(0, |(p, _)| p);
        Some(Self {
            major,
            minor,
            patch,
            raw: s.to_owned(),
        })
    }
}

impl std::fmt::Display for GoVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.raw)
    }
}

/// Digits at the start of `s`: (value, rest).
fn leading_number(s: &str) -> Option<(u32, &str)> {
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    Some((s[..end].parse().ok()?, &s[end..]))
}

/// What `g.labels` points to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelsFormat {
    /// Go < 1.24: `*map[string]string` (a pointer to the map word, then `hmap`).
    Map,
    /// Go ≥ 1.24: a pointer to a slice header of `{key, value string}`, sorted by key.
    Slice,
}

/// Byte offsets of the fields the label reader walks: TP → g → g.m → m.curg → curg.labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GoOffsets {
    pub g_m: u32,
    pub g_labels: u32,
    pub m_curg: u32,
    pub labels_format: LabelsFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetsSource {
    FromDwarf,
    FromTable,
}

/// How the g slot offset was established.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsGSource {
    /// Decoded from this function's g load.
    Instruction(&'static str),
    /// Nothing decodable was found: [`DEFAULT_TLS_G_OFFSET`] is assumed.
    Default,
}

/// What the label reader needs to know about one Go binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoBinary {
    pub version: GoVersion,
    pub offsets: GoOffsets,
    pub offsets_source: OffsetsSource,
    /// Offset of the current g's slot from the thread pointer (x86_64: FS base).
    pub tls_g_offset: i64,
    pub tls_g_source: TlsGSource,
    pub cgo: bool,
    /// A position-independent executable (ELF type `ET_DYN`).
    pub pie: bool,
    /// No ELF symbol table (`-ldflags=-s`, or `strip`).
    pub stripped: bool,
}

/// The offsets of the memo's table (verified from DWARF for 1.19 and 1.21–1.27; 1.17, 1.18
/// and 1.20 share 1.19's layout). `None` outside 1.17–1.27.
pub fn table_offsets(version: &GoVersion) -> Option<GoOffsets> {
    if version.major != 1 {
        return None;
    }
    let (g_labels, m_curg) = match version.minor {
        17..=20 => (360, 192),
        21 | 22 => (344, 192),
        23 | 24 => (352, 192),
        25 => (344, 184),
        26 | 27 => (352, 184),
        _ => return None,
    };
    Some(GoOffsets {
        g_m: 48,
        g_labels,
        m_curg,
        labels_format: labels_format(version),
    })
}

fn labels_format(version: &GoVersion) -> LabelsFormat {
    if version.major == 1 && version.minor < 24 {
        LabelsFormat::Map
    } else {
        LabelsFormat::Slice
    }
}

/// Inspects an open file (read through a cache: only the parts needed are read).
pub fn inspect_file(file: &File) -> Result<Option<GoBinary>, GoError> {
    let cache = ReadCache::new(file);
    inspect(&cache)
}

/// Inspects an ELF object: `Ok(None)` when it is not a Go binary (nor an ELF file at all: code
/// mapped executable from another kind of file is no Go binary either).
pub fn inspect<'data, R: ReadRef<'data>>(data: R) -> Result<Option<GoBinary>, GoError> {
    if data.read_bytes_at(0, 4).ok() != Some(&b"\x7fELF"[..]) {
        return Ok(None);
    }
    let file = object::File::parse(data)?;
    let image = Image::new(&file, data);
    let Some(info) = read_buildinfo(&file, &image)? else {
        return Ok(None);
    };
    let version =
        GoVersion::parse(&info.version).ok_or_else(|| GoError::BadVersion(info.version.clone()))?;
    let table = table_offsets(&version).ok_or(GoError::UnsupportedVersion(info.version))?;
    let (offsets, offsets_source) = choose_offsets(&file, &version, table);
    let (tls_g_offset, tls_g_source) = match GoPclntab::from_object(&file) {
        Ok(pclntab) => find_tls_g_offset(&pclntab, &image),
        Err(e) => {
            tracing::debug!(error = %e, "no pclntab: assuming the default g slot");
            (DEFAULT_TLS_G_OFFSET, TlsGSource::Default)
        }
    };
    Ok(Some(GoBinary {
        version,
        offsets,
        offsets_source,
        tls_g_offset,
        tls_g_source,
        cgo: is_cgo(&file, info.modinfo.as_deref()),
        pie: file.kind() == object::ObjectKind::Dynamic,
        stripped: file.section_by_name(".symtab").is_none(),
    }))
}

/// DWARF's offsets when it has them (warning when they differ from the table), else the table.
fn choose_offsets<'data, R: ReadRef<'data>>(
    file: &object::File<'data, R>,
    version: &GoVersion,
    table: GoOffsets,
) -> (GoOffsets, OffsetsSource) {
    match dwarf_offsets(file) {
        Ok(Some((g_m, g_labels, m_curg))) => {
            let dwarf = GoOffsets {
                g_m,
                g_labels,
                m_curg,
                labels_format: table.labels_format,
            };
            if dwarf != table {
                tracing::warn!(
                    %version, ?dwarf, ?table,
                    "Go runtime offsets from DWARF differ from the table: using DWARF"
                );
            }
            (dwarf, OffsetsSource::FromDwarf)
        }
        Ok(None) => (table, OffsetsSource::FromTable),
        Err(e) => {
            tracing::debug!(%version, error = %e, "unreadable DWARF: using the offsets table");
            (table, OffsetsSource::FromTable)
        }
    }
}

/// The program's memory image as the file has it: reads by virtual address.
struct Image<'data, R: ReadRef<'data>> {
    data: R,
    segments: LoadSegments,
    _marker: std::marker::PhantomData<&'data ()>,
}

impl<'data, R: ReadRef<'data>> Image<'data, R> {
    fn new(file: &object::File<'data, R>, data: R) -> Self {
        Self {
            data,
            segments: LoadSegments::from_object(file),
            _marker: std::marker::PhantomData,
        }
    }

    fn read(&self, vaddr: u64, len: u64) -> Option<&'data [u8]> {
        if len == 0 {
            return Some(&[]);
        }
        let offset = self.segments.vaddr_to_file_offset(vaddr)?;
        // A read may not run past the segment's file bytes into the next one.
        let last = self
            .segments
            .vaddr_to_file_offset(vaddr.checked_add(len)?.checked_sub(1)?)?;
        if Some(last) != offset.checked_add(len - 1) {
            return None;
        }
        self.data.read_bytes_at(offset, len).ok()
    }
}

/// Version and module info from the build-info blob.
#[derive(Debug, Clone, PartialEq, Eq)]
struct BuildInfo {
    version: String,
    modinfo: Option<String>,
}

fn read_buildinfo<'data, R: ReadRef<'data>>(
    file: &object::File<'data, R>,
    image: &Image<'data, R>,
) -> Result<Option<BuildInfo>, GoError> {
    let Some(blob) = find_buildinfo(file)? else {
        return Ok(None);
    };
    parse_buildinfo(blob, &|vaddr, len| {
        image.read(vaddr, len).map(<[u8]>::to_vec)
    })
    .map(Some)
}

/// The build-info blob: the `.go.buildinfo` section, else, in a file without section headers,
/// the magic at a 16-byte boundary in writable loaded data (where Go's own `debug/buildinfo`
/// looks when sections are gone). Go's linker always names the section, so a file that has
/// sections but not that one is not Go, and costs no scan.
fn find_buildinfo<'data, R: ReadRef<'data>>(
    file: &object::File<'data, R>,
) -> Result<Option<&'data [u8]>, GoError> {
    if let Some(section) = file.section_by_name(".go.buildinfo") {
        return Ok(Some(section.data()?));
    }
    if file.sections().next().is_some() {
        return Ok(None);
    }
    const PF_W: u32 = 2;
    for segment in file.segments() {
        let writable =
            matches!(segment.flags(), object::SegmentFlags::Elf { p_flags } if p_flags & PF_W != 0);
        if !writable {
            continue;
        }
        let Ok(bytes) = segment.data() else { continue };
        let found = (0..bytes.len().saturating_sub(BUILDINFO_HEADER))
            .step_by(16)
            .find(|&i| bytes[i..].starts_with(BUILDINFO_MAGIC));
        if let Some(i) = found {
            return Ok(Some(&bytes[i..]));
        }
    }
    Ok(None)
}

/// Parses a build-info blob. `read(vaddr, len)` reads the program's memory, for the
/// pointer-based format (≤ 1.17), whose header points at Go string headers.
fn parse_buildinfo(
    blob: &[u8],
    read: &dyn Fn(u64, u64) -> Option<Vec<u8>>,
) -> Result<BuildInfo, GoError> {
    let header = blob
        .get(..BUILDINFO_HEADER)
        .ok_or(GoError::BuildInfo("short header"))?;
    if !header.starts_with(BUILDINFO_MAGIC) {
        return Err(GoError::BuildInfo("bad magic"));
    }
    let ptr_size = usize::from(header[14]);
    let flags = header[15];
    if flags & BUILDINFO_INLINE != 0 {
        let rest = &blob[BUILDINFO_HEADER..];
        let (version, rest) = inline_string(rest).ok_or(GoError::BuildInfo("bad version"))?;
        let modinfo = inline_string(rest).map(|(m, _)| m);
        return Ok(BuildInfo { version, modinfo });
    }
    if !matches!(ptr_size, 4 | 8) {
        return Err(GoError::BuildInfo("bad pointer size"));
    }
    let big_endian = flags & BUILDINFO_BIG_ENDIAN != 0;
    let word = |bytes: &[u8]| decode_word(bytes, ptr_size, big_endian);
    let version_ptr = word(&header[16..]).ok_or(GoError::BuildInfo("short header"))?;
    let modinfo_ptr = word(&header[16 + ptr_size..]).ok_or(GoError::BuildInfo("short header"))?;
    // Each pointer is to a Go string header {data pointer, length}.
    let string_at = |ptr: u64| -> Option<String> {
        let header = read(ptr, 2 * ptr_size as u64)?;
        let data = word(&header)?;
        let len = word(header.get(ptr_size..)?)?;
        if len == 0 {
            return Some(String::new());
        }
        if len > 1 << 20 {
            return None;
        }
        Some(String::from_utf8_lossy(&read(data, len)?).into_owned())
    };
    let version = string_at(version_ptr).ok_or(GoError::BuildInfo("unreadable version"))?;
    if version.is_empty() {
        return Err(GoError::BuildInfo("empty version"));
    }
    Ok(BuildInfo {
        version,
        modinfo: string_at(modinfo_ptr),
    })
}

/// A uvarint-length-prefixed string: (string, rest).
fn inline_string(bytes: &[u8]) -> Option<(String, &[u8])> {
    let mut len: u64 = 0;
    let mut used = 0;
    for (i, &b) in bytes.iter().enumerate().take(10) {
        len |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            used = i + 1;
            break;
        }
    }
    if used == 0 {
        return None;
    }
    let len = usize::try_from(len).ok()?;
    let s = bytes.get(used..used.checked_add(len)?)?;
    Some((
        String::from_utf8_lossy(s).into_owned(),
        &bytes[used + len..],
    ))
}

fn decode_word(bytes: &[u8], ptr_size: usize, big_endian: bool) -> Option<u64> {
    let b = bytes.get(..ptr_size)?;
    let mut v = [0u8; 8];
    if big_endian {
        v[8 - ptr_size..].copy_from_slice(b);
        Some(u64::from_be_bytes(v))
    } else {
        v[..ptr_size].copy_from_slice(b);
        Some(u64::from_le_bytes(v))
    }
}

/// cgo from the recorded build setting (Go ≥ 1.18 records `CGO_ENABLED`), else from whether
/// the binary imports anything from shared libraries (pure Go binaries import nothing).
fn is_cgo<'data, R: ReadRef<'data>>(file: &object::File<'data, R>, modinfo: Option<&str>) -> bool {
    let setting = modinfo.and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("build\tCGO_ENABLED="))
            .map(|v| v.trim() == "1")
    });
    setting.unwrap_or_else(|| file.imports().is_ok_and(|i| !i.is_empty()))
}

// ---- DWARF ------------------------------------------------------------------------------

type Slice<'a> = gimli::EndianSlice<'a, LittleEndian>;

/// `(g.m, g.labels, m.curg)` from DWARF; `Ok(None)` when the binary has no DWARF or the types
/// are not described.
fn dwarf_offsets<'data, R: ReadRef<'data>>(
    file: &object::File<'data, R>,
) -> Result<Option<(u32, u32, u32)>, String> {
    let (Some(info), Some(abbrev)) = (
        dwarf_section(file, ".debug_info")?,
        dwarf_section(file, ".debug_abbrev")?,
    ) else {
        return Ok(None);
    };
    let str_data = dwarf_section(file, ".debug_str")?.unwrap_or(Cow::Borrowed(&[]));
    let debug_info = gimli::DebugInfo::new(&info, LittleEndian);
    let debug_abbrev = gimli::DebugAbbrev::new(&abbrev, LittleEndian);
    let debug_str = gimli::DebugStr::new(&str_data, LittleEndian);
    let mut found = StructFields::default();
    let mut units = debug_info.units();
    while let Some(header) = units.next().map_err(|e| e.to_string())? {
        let abbrevs = header
            .abbreviations(&debug_abbrev)
            .map_err(|e| e.to_string())?;
        scan_unit(&header, &abbrevs, &debug_str, &mut found).map_err(|e| e.to_string())?;
        if let (Some(g_m), Some(g_labels), Some(m_curg)) = (found.g_m, found.g_labels, found.m_curg)
        {
            return Ok(Some((g_m, g_labels, m_curg)));
        }
    }
    Ok(None)
}

#[derive(Default)]
struct StructFields {
    g_m: Option<u32>,
    g_labels: Option<u32>,
    m_curg: Option<u32>,
}

/// Looks at one unit's top-level structure types for `runtime.g` and `runtime.m`.
fn scan_unit(
    header: &gimli::UnitHeader<Slice<'_>>,
    abbrevs: &gimli::Abbreviations,
    debug_str: &gimli::DebugStr<Slice<'_>>,
    found: &mut StructFields,
) -> gimli::Result<()> {
    let mut tree = header.entries_tree(abbrevs, None)?;
    let mut children = tree.root()?.children();
    while let Some(node) = children.next()? {
        let entry = node.entry();
        if entry.tag() != constants::DW_TAG_structure_type {
            continue;
        }
        let name = attr_string(entry.attr_value(constants::DW_AT_name), debug_str);
        let wanted: &[&str] = match name.as_deref() {
            Some(b"runtime.g") => &["m", "labels"],
            Some(b"runtime.m") => &["curg"],
            _ => continue,
        };
        let mut members = node.children();
        while let Some(member) = members.next()? {
            let member = member.entry();
            if member.tag() != constants::DW_TAG_member {
                continue;
            }
            let Some(member_name) =
                attr_string(member.attr_value(constants::DW_AT_name), debug_str)
            else {
                continue;
            };
            let Some(field) = wanted.iter().find(|w| w.as_bytes() == &*member_name) else {
                continue;
            };
            let offset = member_offset(member.attr_value(constants::DW_AT_data_member_location));
            match (name.as_deref(), *field) {
                (Some(b"runtime.g"), "m") => found.g_m = offset,
                (Some(b"runtime.g"), "labels") => found.g_labels = offset,
                (_, "curg") => found.m_curg = offset,
                _ => {}
            }
        }
    }
    Ok(())
}

fn attr_string<'a>(
    value: Option<AttributeValue<Slice<'a>>>,
    debug_str: &gimli::DebugStr<Slice<'a>>,
) -> Option<Cow<'a, [u8]>> {
    match value? {
        AttributeValue::String(s) => Some(Cow::Borrowed(s.slice())),
        AttributeValue::DebugStrRef(offset) => debug_str
            .get_str(offset)
            .ok()
            .map(|s| Cow::Borrowed(s.slice())),
        _ => None,
    }
}

/// A member offset: a constant (what Go emits), or the `DW_OP_plus_uconst N` expression form.
fn member_offset(value: Option<AttributeValue<Slice<'_>>>) -> Option<u32> {
    let value = value?;
    if let Some(v) = value.udata_value() {
        return u32::try_from(v).ok();
    }
    let AttributeValue::Exprloc(expr) = value else {
        return None;
    };
    let bytes = expr.0.slice();
    let (&op, rest) = bytes.split_first()?;
    if op != constants::DW_OP_plus_uconst.0 {
        return None;
    }
    let mut v: u64 = 0;
    for (i, &b) in rest.iter().enumerate().take(5) {
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return u32::try_from(v).ok();
        }
    }
    None
}

/// A DWARF section's bytes, decompressed (Go compresses its DWARF with zlib).
fn dwarf_section<'data, R: ReadRef<'data>>(
    file: &object::File<'data, R>,
    name: &str,
) -> Result<Option<Cow<'data, [u8]>>, String> {
    let Some(section) = file.section_by_name(name) else {
        return Ok(None);
    };
    let compressed = section.compressed_data().map_err(|e| e.to_string())?;
    match compressed.format {
        object::CompressionFormat::None => Ok(Some(Cow::Borrowed(compressed.data))),
        object::CompressionFormat::Zlib => {
            if compressed.uncompressed_size > MAX_DWARF_SECTION {
                return Err(format!("{name}: implausible size"));
            }
            let mut out = Vec::with_capacity(compressed.uncompressed_size as usize);
            flate2::read::ZlibDecoder::new(compressed.data)
                .take(compressed.uncompressed_size)
                .read_to_end(&mut out)
                .map_err(|e| format!("{name}: {e}"))?;
            Ok(Some(Cow::Owned(out)))
        }
        other => Err(format!("{name}: unsupported compression {other:?}")),
    }
}

// ---- g slot -----------------------------------------------------------------------------

/// The g slot's offset from the thread pointer, from the first g load found in [`G_LOADERS`].
fn find_tls_g_offset<'data, R: ReadRef<'data>>(
    pclntab: &GoPclntab,
    image: &Image<'data, R>,
) -> (i64, TlsGSource) {
    for name in G_LOADERS {
        let Some(entry) = pclntab.find_function(name) else {
            continue;
        };
        let Some(code) = image.read(entry, 32).or_else(|| image.read(entry, 16)) else {
            continue;
        };
        let got = |vaddr: u64| {
            image
                .read(vaddr, 8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_le_bytes)
        };
        if let Some(offset) = decode_g_load(code, entry, &got) {
            return (offset, TlsGSource::Instruction(name));
        }
    }
    (DEFAULT_TLS_G_OFFSET, TlsGSource::Default)
}

/// Finds an x86_64 load of g through FS in `code` (at virtual address `address`), in the forms
/// Go's linker emits:
///
/// - local exec: `mov %fs:OFF, %reg` (`64 48 8b 04 25 OFF32`);
/// - PIE: `mov $OFF, %rcx; mov %fs:(%rcx), %rax` (`48 c7 c1 OFF32  64 48 8b 01`);
/// - initial exec: `mov GOT(%rip), %rcx; mov %fs:(%rcx), %rax`, with OFF in the GOT slot
///   (`read_u64` reads it).
fn decode_g_load(code: &[u8], address: u64, read_u64: &dyn Fn(u64) -> Option<u64>) -> Option<i64> {
    (0..code.len()).find_map(|i| {
        let at = &code[i..];
        fs_absolute(at)
            .or_else(|| immediate_then_fs(at))
            .or_else(|| got_then_fs(at, address.wrapping_add(i as u64), read_u64))
    })
}

/// `64 REX.W 8b modrm(mod 00, rm 100) sib(0x25) disp32`: `mov %fs:disp32, %reg`.
fn fs_absolute(at: &[u8]) -> Option<i64> {
    let [0x64, rex, 0x8b, modrm, 0x25, d0, d1, d2, d3, ..] = *at else {
        return None;
    };
    if rex & 0xf8 != 0x48 || modrm & 0xc7 != 0x04 {
        return None;
    }
    Some(i64::from(i32::from_le_bytes([d0, d1, d2, d3])))
}

/// `REX.W c7 (c0+r) imm32` then `mov %fs:(r), %reg`.
fn immediate_then_fs(at: &[u8]) -> Option<i64> {
    let [rex, 0xc7, modrm, i0, i1, i2, i3, ref next @ ..] = *at else {
        return None;
    };
    if rex & 0xfe != 0x48 || modrm & 0xf8 != 0xc0 {
        return None;
    }
    let reg = (modrm & 7) | ((rex & 1) << 3);
    fs_indirect_uses(next, reg).then(|| i64::from(i32::from_le_bytes([i0, i1, i2, i3])))
}

/// `REX.W 8b modrm(mod 00, rm 101) disp32` (a RIP-relative load of the GOT slot into r) then
/// `mov %fs:(r), %reg`.
fn got_then_fs(at: &[u8], address: u64, read_u64: &dyn Fn(u64) -> Option<u64>) -> Option<i64> {
    let [rex, 0x8b, modrm, d0, d1, d2, d3, ref next @ ..] = *at else {
        return None;
    };
    if rex & 0xfb != 0x48 || modrm & 0xc7 != 0x05 {
        return None;
    }
    let reg = ((modrm >> 3) & 7) | ((rex & 4) << 1);
    if !fs_indirect_uses(next, reg) {
        return None;
    }
    let next_ip = address.checked_add(7)?;
    let slot = next_ip.checked_add_signed(i64::from(i32::from_le_bytes([d0, d1, d2, d3])))?;
    Some(read_u64(slot)? as i64)
}

/// Whether `code` starts with `64 REX.W 8b modrm(mod 00, rm = base)`: `mov %fs:(base), %reg`.
fn fs_indirect_uses(code: &[u8], base: u8) -> bool {
    let [0x64, rex, 0x8b, modrm, ..] = *code else {
        return false;
    };
    // rm 100 (SIB) and 101 (RIP-relative) are not plain register bases.
    let rm = modrm & 7;
    rex & 0xf8 == 0x48 && modrm & 0xc0 == 0 && rm != 4 && rm != 5 && (rm | ((rex & 1) << 3)) == base
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> GoVersion {
        GoVersion::parse(s).unwrap()
    }

    #[test]
    fn parses_versions() {
        assert_eq!((v("go1.19.8").minor, v("go1.19.8").patch), (19, 8));
        assert_eq!((v("go1.24.11").minor, v("go1.24.11").patch), (24, 11));
        assert_eq!((v("go1.21rc2").minor, v("go1.21rc2").patch), (21, 0));
        assert_eq!(v("go1.22.1 X:nocoverageredesign").minor, 22);
        assert_eq!(v("devel go1.25-abcdef Tue").minor, 25);
        assert_eq!(v("go1.20").patch, 0);
        assert_eq!(v("go1.19.8").to_string(), "go1.19.8");
        for bad in ["", "go", "1.19", "gox.y", "go1", "go1.", "go1.x"] {
            assert_eq!(GoVersion::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn offsets_table_matches_the_memo() {
        let t =
            |s: &str| table_offsets(&v(s)).map(|o| (o.g_m, o.g_labels, o.m_curg, o.labels_format));
        use LabelsFormat::*;
        assert_eq!(t("go1.16.15"), None);
        assert_eq!(t("go1.17.1"), Some((48, 360, 192, Map)));
        assert_eq!(t("go1.19.8"), Some((48, 360, 192, Map)));
        assert_eq!(t("go1.20.14"), Some((48, 360, 192, Map)));
        assert_eq!(t("go1.21.13"), Some((48, 344, 192, Map)));
        assert_eq!(t("go1.22.10"), Some((48, 344, 192, Map)));
        assert_eq!(t("go1.23.9"), Some((48, 352, 192, Map)));
        assert_eq!(t("go1.24.11"), Some((48, 352, 192, Slice)));
        assert_eq!(t("go1.25.5"), Some((48, 344, 184, Slice)));
        assert_eq!(t("go1.26.6"), Some((48, 352, 184, Slice)));
        assert_eq!(t("go1.27.3"), Some((48, 352, 184, Slice)));
        assert_eq!(t("go1.28.0"), None);
        assert_eq!(t("go2.0.0"), None);
    }

    fn header(ptr_size: u8, flags: u8) -> Vec<u8> {
        let mut h = BUILDINFO_MAGIC.to_vec();
        h.extend_from_slice(&[ptr_size, flags]);
        h.resize(BUILDINFO_HEADER, 0);
        h
    }

    #[test]
    fn parses_inline_buildinfo() {
        let mut blob = header(8, BUILDINFO_INLINE);
        blob.push(9);
        blob.extend_from_slice(b"go1.24.11");
        blob.push(22);
        blob.extend_from_slice(b"build\tCGO_ENABLED=1\nxx");
        let info = parse_buildinfo(&blob, &|_, _| None).unwrap();
        assert_eq!(info.version, "go1.24.11");
        assert_eq!(info.modinfo.as_deref(), Some("build\tCGO_ENABLED=1\nxx"));
    }

    #[test]
    fn parses_pointer_buildinfo() {
        // Header at 0x1000 points at string headers at 0x2000 (version) and 0x2010 (modinfo).
        let mut blob = header(8, 0);
        blob[16..24].copy_from_slice(&0x2000u64.to_le_bytes());
        blob[24..32].copy_from_slice(&0x2010u64.to_le_bytes());
        let memory = |vaddr: u64, len: u64| -> Option<Vec<u8>> {
            let mut m = vec![0u8; 0x100];
            m[0..8].copy_from_slice(&0x2080u64.to_le_bytes());
            m[8..16].copy_from_slice(&9u64.to_le_bytes());
            m[16..24].copy_from_slice(&0x20a0u64.to_le_bytes());
            m[24..32].copy_from_slice(&3u64.to_le_bytes());
            m[0x80..0x89].copy_from_slice(b"go1.17.13");
            m[0xa0..0xa3].copy_from_slice(b"mod");
            let start = usize::try_from(vaddr.checked_sub(0x2000)?).ok()?;
            m.get(start..start + len as usize).map(<[u8]>::to_vec)
        };
        let info = parse_buildinfo(&blob, &memory).unwrap();
        assert_eq!(info.version, "go1.17.13");
        assert_eq!(info.modinfo.as_deref(), Some("mod"));
        // Pointers into nowhere: an error, not a panic.
        assert!(parse_buildinfo(&blob, &|_, _| None).is_err());
    }

    #[test]
    fn malformed_buildinfo_is_an_error() {
        assert!(parse_buildinfo(b"", &|_, _| None).is_err());
        assert!(parse_buildinfo(&[0xff; 40], &|_, _| None).is_err());
        let mut blob = header(8, BUILDINFO_INLINE);
        blob.push(50); // longer than what follows
        blob.extend_from_slice(b"go1.24");
        assert!(parse_buildinfo(&blob, &|_, _| None).is_err());
        assert!(parse_buildinfo(&header(3, 0), &|_, _| None).is_err());
    }

    #[test]
    fn decodes_g_loads() {
        let none = |_: u64| None;
        // go1.19/1.24 static: mov %fs:0xfffffffffffffff8,%rax; cmp %rsp,0x8(%rax)
        let le = [
            0x64, 0x48, 0x8b, 0x04, 0x25, 0xf8, 0xff, 0xff, 0xff, 0x48, 0x39, 0x60, 0x08,
        ];
        assert_eq!(decode_g_load(&le, 0x1000, &none), Some(-8));
        // cgo with a C thread-local: FS-16.
        let le16 = [0x64, 0x48, 0x8b, 0x04, 0x25, 0xf0, 0xff, 0xff, 0xff];
        assert_eq!(decode_g_load(&le16, 0x1000, &none), Some(-16));
        // PIE: mov $-8,%rcx; mov %fs:(%rcx),%rax
        let pie = [
            0x48, 0xc7, 0xc1, 0xf8, 0xff, 0xff, 0xff, 0x64, 0x48, 0x8b, 0x01,
        ];
        assert_eq!(decode_g_load(&pie, 0x1000, &none), Some(-8));
        // The same with an unrelated second instruction: no match.
        let pie_bad = [
            0x48, 0xc7, 0xc1, 0xf8, 0xff, 0xff, 0xff, 0x64, 0x48, 0x8b, 0x02,
        ];
        assert_eq!(decode_g_load(&pie_bad, 0x1000, &none), None);
        // Initial exec: mov 0x10(%rip),%rcx; mov %fs:(%rcx),%rax — the slot is at 0x1000+7+0x10.
        let ie = [0x48, 0x8b, 0x0d, 0x10, 0, 0, 0, 0x64, 0x48, 0x8b, 0x01];
        let got = |a: u64| (a == 0x1017).then_some(-24i64 as u64);
        assert_eq!(decode_g_load(&ie, 0x1000, &got), Some(-24));
        // After a preamble (runtime.systemstack loads its argument first).
        let mut later = vec![0x48, 0x8b, 0x7c, 0x24, 0x08];
        later.extend_from_slice(&le);
        assert_eq!(decode_g_load(&later, 0x1000, &none), Some(-8));
        assert_eq!(decode_g_load(&[0x90; 32], 0x1000, &none), None);
        assert_eq!(decode_g_load(&[], 0x1000, &none), None);
    }

    #[test]
    fn garbage_objects_are_errors_or_not_go() {
        // Not an ELF file (code mapped executable from some other file): no Go binary, and no
        // warning about it.
        assert!(matches!(inspect(&[0u8; 100][..]), Ok(None)));
        assert!(matches!(inspect(&b"#!/bin/sh\n"[..]), Ok(None)));
        // A truncated ELF file is an error.
        assert!(inspect(&b"\x7fELF\x02\x01\x01"[..]).is_err());
        // The test binary is an ELF file but not a Go binary.
        let own = std::fs::read("/proc/self/exe").unwrap();
        assert!(matches!(inspect(&own[..]), Ok(None)));
        let file = File::open("/proc/self/exe").unwrap();
        assert!(matches!(inspect_file(&file), Ok(None)));
    }
}
