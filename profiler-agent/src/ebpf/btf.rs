//! A minimal reader of kernel BTF: just enough to answer "at which byte offset are
//! `task_struct.thread.fsbase`, `pid`, `tgid` and `comm`?" at start-up.
//!
//! Rust eBPF programs cannot carry CO-RE field relocations (see ARCHITECTURE.md: no kernel
//! struct offset is compiled in), so the agent reads the offsets it needs from
//! `/sys/kernel/btf/vmlinux` and passes them to the programs as load-time globals.
//! aya's BTF parser keeps its type lookups private and the `btf-rs` crate is LGPL, hence this
//! hand-written reader. It only walks the type section; every read is bounds-checked, so
//! garbage input gives an error, never a panic.

use thiserror::Error;

/// Where the running kernel exposes its own BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;
/// `struct btf_header` up to and including `str_len`.
const MIN_HEADER_LEN: usize = 24;
/// `struct btf_type`: name_off, info, size/type.
const TYPE_LEN: usize = 12;
/// Modifier chains are short; a longer one means a loop in corrupt data.
const MAX_CHAIN: usize = 64;
/// Anonymous members nest a few levels deep at most.
const MAX_ANON_DEPTH: usize = 16;

// BTF kinds (`BTF_KIND_*` in include/uapi/linux/btf.h) that this reader looks at.
const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;
const MAX_KIND: u32 = 19;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("not BTF data (bad magic, or big-endian BTF, which is not supported)")]
    BadMagic,
    #[error("BTF data is truncated or a section lies outside it")]
    Truncated,
    #[error("unknown BTF kind {0}")]
    UnknownKind(u32),
    #[error("BTF type id {0} does not exist")]
    BadTypeId(u32),
    #[error("no struct or union named {0:?}")]
    NoSuchStruct(String),
    #[error("no member {member:?} in {container:?}")]
    NoSuchMember { container: String, member: String },
    #[error("member {0:?} is a bitfield, it has no byte offset")]
    Bitfield(String),
    #[error("member {0:?} is not a struct or union, the path cannot continue")]
    NotAComposite(String),
    #[error("type chain too long (corrupt BTF?)")]
    ChainTooLong,
}

/// Byte offset of the dotted member `path` inside the struct or union `struct_name`
/// (e.g. `("task_struct", "thread.fsbase")`), looking through anonymous struct/union members
/// and typedef/const/volatile/restrict/type-tag modifiers.
pub fn member_offset(btf: &[u8], struct_name: &str, path: &str) -> Result<u32, BtfError> {
    Types::parse(btf)?.member_offset(struct_name, path)
}

/// Where the sampler finds the current task's fields in the running kernel's `task_struct`.
/// `None`: not found (or, for `comm`, not 8-byte aligned); the sampler then calls a helper,
/// and without `fsbase` it reads no trace context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskOffsets {
    /// `thread.fsbase`, the x86_64 user thread pointer.
    pub fsbase: Option<u32>,
    pub pid: Option<u32>,
    pub tgid: Option<u32>,
    pub comm: Option<u32>,
    /// `start_time`: when the thread was created (CLOCK_MONOTONIC ns).
    pub start_time: Option<u32>,
}

impl TaskOffsets {
    pub fn from_btf(btf: &[u8]) -> Result<Self, BtfError> {
        let types = Types::parse(btf)?;
        let offset = |path| types.member_offset("task_struct", path).ok();
        Ok(Self {
            fsbase: offset("thread.fsbase"),
            pid: offset("pid"),
            tgid: offset("tgid"),
            comm: offset("comm").filter(|offset| offset % 8 == 0),
            start_time: offset("start_time").filter(|offset| offset % 8 == 0),
        })
    }

    /// The offsets in the running kernel (`/sys/kernel/btf/vmlinux`).
    pub fn of_running_kernel() -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let btf = std::fs::read(VMLINUX_BTF).with_context(|| format!("read {VMLINUX_BTF}"))?;
        Self::from_btf(&btf).context("parse the kernel BTF")
    }
}

/// The type and string sections, with the byte position of every type record (index = id - 1).
struct Types<'a> {
    types: &'a [u8],
    strings: &'a [u8],
    starts: Vec<u32>,
}

/// One decoded `struct btf_type` header.
struct TypeHeader {
    name_off: u32,
    vlen: usize,
    kind: u32,
    kind_flag: bool,
    /// `size` for composites, `type` for modifiers.
    size_or_type: u32,
}

impl<'a> Types<'a> {
    /// Byte offset of the dotted member `path` inside the struct or union `struct_name`.
    fn member_offset(&self, struct_name: &str, path: &str) -> Result<u32, BtfError> {
        let mut id = self
            .find_composite(struct_name)?
            .ok_or_else(|| BtfError::NoSuchStruct(struct_name.to_owned()))?;
        let mut container = struct_name.to_owned();
        let mut total_bits: u64 = 0;
        for member in path.split('.') {
            let (bits, member_type) =
                self.find_member(id, member, 0)?
                    .ok_or_else(|| BtfError::NoSuchMember {
                        container: container.clone(),
                        member: member.to_owned(),
                    })?;
            total_bits += u64::from(bits);
            id = self.skip_modifiers(member_type)?;
            container = member.to_owned();
        }
        if !total_bits.is_multiple_of(8) {
            return Err(BtfError::Bitfield(path.to_owned()));
        }
        u32::try_from(total_bits / 8).map_err(|_| BtfError::Truncated)
    }

    fn parse(btf: &'a [u8]) -> Result<Self, BtfError> {
        if read_u16(btf, 0)? != MAGIC {
            return Err(BtfError::BadMagic);
        }
        let hdr_len = read_u32(btf, 4)? as usize;
        if hdr_len < MIN_HEADER_LEN {
            return Err(BtfError::Truncated);
        }
        let section = |off_at: usize| -> Result<&'a [u8], BtfError> {
            let off = read_u32(btf, off_at)? as usize;
            let len = read_u32(btf, off_at + 4)? as usize;
            let start = hdr_len.checked_add(off).ok_or(BtfError::Truncated)?;
            let end = start.checked_add(len).ok_or(BtfError::Truncated)?;
            btf.get(start..end).ok_or(BtfError::Truncated)
        };
        let types = section(8)?;
        let strings = section(16)?;
        let mut starts = Vec::with_capacity(types.len() / 32);
        let mut pos = 0;
        while pos < types.len() {
            starts.push(u32::try_from(pos).map_err(|_| BtfError::Truncated)?);
            let header = header_at(types, pos)?;
            pos = pos
                .checked_add(TYPE_LEN + trailing_len(&header)?)
                .ok_or(BtfError::Truncated)?;
        }
        if pos != types.len() {
            return Err(BtfError::Truncated);
        }
        Ok(Self {
            types,
            strings,
            starts,
        })
    }

    fn header(&self, id: u32) -> Result<(usize, TypeHeader), BtfError> {
        let index = id.checked_sub(1).ok_or(BtfError::BadTypeId(id))?;
        let pos = *self
            .starts
            .get(index as usize)
            .ok_or(BtfError::BadTypeId(id))? as usize;
        Ok((pos, header_at(self.types, pos)?))
    }

    /// The NUL-terminated string at `off` of the string section (empty if out of bounds).
    fn name(&self, off: u32) -> &'a [u8] {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        rest.split(|b| *b == 0).next().unwrap_or_default()
    }

    /// The first struct or union with this name that has members (skipping empty forwards).
    fn find_composite(&self, name: &str) -> Result<Option<u32>, BtfError> {
        for id in 1..=self.starts.len() as u32 {
            let (_, h) = self.header(id)?;
            if matches!(h.kind, KIND_STRUCT | KIND_UNION)
                && h.vlen > 0
                && self.name(h.name_off) == name.as_bytes()
            {
                return Ok(Some(id));
            }
        }
        Ok(None)
    }

    /// Follows typedefs and qualifiers down to the underlying type id.
    fn skip_modifiers(&self, mut id: u32) -> Result<u32, BtfError> {
        for _ in 0..MAX_CHAIN {
            let (_, h) = self.header(id)?;
            match h.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = h.size_or_type;
                }
                _ => return Ok(id),
            }
        }
        Err(BtfError::ChainTooLong)
    }

    /// Finds `member` in composite `id`, directly or inside anonymous struct/union members.
    /// Returns (bit offset from the start of `id`, member type id).
    fn find_member(
        &self,
        id: u32,
        member: &str,
        depth: usize,
    ) -> Result<Option<(u32, u32)>, BtfError> {
        if depth > MAX_ANON_DEPTH {
            return Err(BtfError::ChainTooLong);
        }
        let (pos, h) = self.header(id)?;
        if !matches!(h.kind, KIND_STRUCT | KIND_UNION) {
            return Err(BtfError::NotAComposite(member.to_owned()));
        }
        for i in 0..h.vlen {
            // struct btf_member { name_off; type; offset } after the type header.
            let at = pos + TYPE_LEN + i * 12;
            let name_off = read_u32(self.types, at)?;
            let member_type = read_u32(self.types, at + 4)?;
            let raw_offset = read_u32(self.types, at + 8)?;
            // With kind_flag set, the top 8 bits hold the bitfield size.
            let bits = if h.kind_flag {
                raw_offset & 0x00ff_ffff
            } else {
                raw_offset
            };
            if name_off != 0 {
                if self.name(name_off) == member.as_bytes() {
                    return Ok(Some((bits, member_type)));
                }
                continue;
            }
            let inner = self.skip_modifiers(member_type)?;
            let (_, ih) = self.header(inner)?;
            if matches!(ih.kind, KIND_STRUCT | KIND_UNION)
                && let Some((inner_bits, t)) = self.find_member(inner, member, depth + 1)?
            {
                return Ok(Some((bits.saturating_add(inner_bits), t)));
            }
        }
        Ok(None)
    }
}

fn header_at(types: &[u8], pos: usize) -> Result<TypeHeader, BtfError> {
    let info = read_u32(types, pos + 4)?;
    Ok(TypeHeader {
        name_off: read_u32(types, pos)?,
        vlen: (info & 0xffff) as usize,
        kind: (info >> 24) & 0x1f,
        kind_flag: info >> 31 == 1,
        size_or_type: read_u32(types, pos + 8)?,
    })
}

/// Bytes that follow the 12-byte header of a type of this kind.
fn trailing_len(h: &TypeHeader) -> Result<usize, BtfError> {
    Ok(match h.kind {
        KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
        KIND_ARRAY => 12,
        KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * h.vlen,
        KIND_ENUM | KIND_FUNC_PROTO => 8 * h.vlen,
        k if k <= MAX_KIND => 0,
        k => return Err(BtfError::UnknownKind(k)),
    })
}

fn read_u16(data: &[u8], at: usize) -> Result<u16, BtfError> {
    let bytes = data
        .get(at..at.checked_add(2).ok_or(BtfError::Truncated)?)
        .ok_or(BtfError::Truncated)?;
    Ok(u16::from_le_bytes([bytes[0], bytes[1]]))
}

fn read_u32(data: &[u8], at: usize) -> Result<u32, BtfError> {
    let bytes = data
        .get(at..at.checked_add(4).ok_or(BtfError::Truncated)?)
        .ok_or(BtfError::Truncated)?;
    Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small BTF blob built by hand, so the tests do not depend on the running kernel:
    /// struct outer { int a; union { struct { int x; int y; }; long z; }; const inner_t in; }
    /// with typedef inner_t = struct inner { long p; long q; }.
    fn synthetic() -> Vec<u8> {
        let mut strings = vec![0u8];
        let mut name = |s: &str| {
            let off = strings.len() as u32;
            strings.extend_from_slice(s.as_bytes());
            strings.push(0);
            off
        };
        let (n_int, n_long, n_outer, n_a, n_x, n_y, n_z, n_in, n_inner, n_inner_t, n_p, n_q) = (
            name("int"),
            name("long"),
            name("outer"),
            name("a"),
            name("x"),
            name("y"),
            name("z"),
            name("in"),
            name("inner"),
            name("inner_t"),
            name("p"),
            name("q"),
        );
        let mut types = Vec::new();
        let mut ty = |name_off: u32, kind: u32, vlen: u32, size_or_type: u32, extra: &[u32]| {
            for w in [name_off, (kind << 24) | vlen, size_or_type]
                .iter()
                .chain(extra)
            {
                types.extend_from_slice(&w.to_le_bytes());
            }
        };
        ty(n_int, KIND_INT, 0, 4, &[32]); // 1
        ty(n_long, KIND_INT, 0, 8, &[64]); // 2
        ty(0, KIND_STRUCT, 2, 8, &[n_x, 1, 0, n_y, 1, 32]); // 3: anonymous { x; y }
        ty(0, KIND_UNION, 2, 8, &[0, 3, 0, n_z, 2, 0]); // 4: anonymous union
        ty(n_inner, KIND_STRUCT, 2, 16, &[n_p, 2, 0, n_q, 2, 64]); // 5
        ty(n_inner_t, KIND_TYPEDEF, 0, 5, &[]); // 6
        ty(0, KIND_CONST, 0, 6, &[]); // 7
        ty(
            n_outer,
            KIND_STRUCT,
            3,
            32,
            &[n_a, 1, 0, 0, 4, 64, n_in, 7, 128],
        ); // 8
        let mut btf = Vec::new();
        btf.extend_from_slice(&MAGIC.to_le_bytes());
        btf.extend_from_slice(&[1, 0]);
        for w in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            btf.extend_from_slice(&w.to_le_bytes());
        }
        btf.extend_from_slice(&types);
        btf.extend_from_slice(&strings);
        btf
    }

    #[test]
    fn resolves_paths_through_anonymous_members_and_modifiers() {
        let btf = synthetic();
        assert_eq!(member_offset(&btf, "outer", "a"), Ok(0));
        assert_eq!(member_offset(&btf, "outer", "x"), Ok(8));
        assert_eq!(member_offset(&btf, "outer", "y"), Ok(12));
        assert_eq!(member_offset(&btf, "outer", "z"), Ok(8));
        assert_eq!(member_offset(&btf, "outer", "in.q"), Ok(24));
        assert_eq!(
            member_offset(&btf, "nope", "a"),
            Err(BtfError::NoSuchStruct("nope".into()))
        );
        assert!(matches!(
            member_offset(&btf, "outer", "in.r"),
            Err(BtfError::NoSuchMember { .. })
        ));
        assert!(matches!(
            member_offset(&btf, "outer", "a.b"),
            Err(BtfError::NotAComposite(_))
        ));
    }

    #[test]
    fn garbage_and_truncated_input_are_errors_not_panics() {
        let btf = synthetic();
        for len in 0..btf.len() {
            assert!(member_offset(&btf[..len], "outer", "in.q").is_err());
        }
        // Flip every byte in turn: any result is fine, as long as nothing panics.
        for i in 0..btf.len() {
            let mut bad = btf.clone();
            bad[i] ^= 0xff;
            let _ = member_offset(&bad, "outer", "in.q");
        }
        // A pseudo-random blob behind a valid magic.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        noise[..2].copy_from_slice(&MAGIC.to_le_bytes());
        let _ = member_offset(&noise, "task_struct", "thread.fsbase");
        assert_eq!(member_offset(b"", "a", "b"), Err(BtfError::Truncated));
    }

    /// `bits_offset` of `member` in the STRUCT `name`, from `bpftool btf dump` text.
    fn bpftool_bits_offset(dump: &str, name: &str, member: &str) -> u64 {
        let header = format!("STRUCT '{name}' ");
        let mut lines = dump.lines().skip_while(|l| !l.contains(&header)).skip(1);
        let prefix = format!("\t'{member}' ");
        lines
            .by_ref()
            .take_while(|l| l.starts_with('\t'))
            .find(|l| l.starts_with(&prefix))
            .and_then(|l| l.split("bits_offset=").nth(1))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("bpftool dump has no {name}.{member}"))
    }

    /// The running kernel's BTF against bpftool's reading of it. The agent needs both BTF and
    /// bpftool is installed by scripts/setup.sh, so a missing one fails the test.
    #[test]
    fn vmlinux_task_offsets_match_bpftool() {
        let btf = std::fs::read(VMLINUX_BTF).expect("kernel BTF at /sys/kernel/btf/vmlinux");
        let started = std::time::Instant::now();
        let offset = member_offset(&btf, "task_struct", "thread.fsbase").expect("fsbase offset");
        let elapsed = started.elapsed();
        println!("parsed {} bytes of kernel BTF in {elapsed:?}", btf.len());

        let out = ["bpftool", "/usr/sbin/bpftool"]
            .iter()
            .find_map(|b| {
                std::process::Command::new(b)
                    .args(["btf", "dump", "file", VMLINUX_BTF])
                    .output()
                    .ok()
            })
            .expect("run bpftool (scripts/setup.sh installs it)");
        assert!(out.status.success(), "bpftool failed");
        let dump = String::from_utf8_lossy(&out.stdout);
        let expected = bpftool_bits_offset(&dump, "task_struct", "thread") / 8
            + bpftool_bits_offset(&dump, "thread_struct", "fsbase") / 8;
        assert_eq!(u64::from(offset), expected);
        let task = TaskOffsets::of_running_kernel().expect("task offsets");
        assert_eq!(task.fsbase, Some(offset));
        let field = |name| Some(bpftool_bits_offset(&dump, "task_struct", name) / 8);
        assert_eq!(task.pid.map(u64::from), field("pid"));
        assert_eq!(task.tgid.map(u64::from), field("tgid"));
        let comm = field("comm").filter(|offset| offset.is_multiple_of(8));
        assert_eq!(task.comm.map(u64::from), comm);
        assert_eq!(task.start_time.map(u64::from), field("start_time"));
        // The budget is 50 ms in release; a debug build is several times slower.
        let budget = if cfg!(debug_assertions) { 500 } else { 50 };
        assert!(
            elapsed.as_millis() < budget,
            "parsing the kernel BTF took {elapsed:?}"
        );
    }
}
