//! Reads the OpenTelemetry process context (OTEP 4719) that an instrumented process publishes
//! about itself: its resource attributes (`service.name`, …) and the process-level reference
//! data of thread contexts (`threadlocal.schema_version`, `threadlocal.attribute_key_map`).
//!
//! The publisher keeps a 32-byte header in a mapping named after `OTEL_CTX`:
//!
//! | offset | field | |
//! |---|---|---|
//! | 0 | signature `"OTEL_CTX"` | no NUL |
//! | 8 | version `u32` | 2 |
//! | 12 | payload_size `u32` | |
//! | 16 | monotonic_published_at_ns `u64` | 0 while an update is in progress |
//! | 24 | payload `u64` | pointer in the publisher's address space |
//!
//! and the payload is a protobuf `ProcessContext { Resource resource = 1; repeated KeyValue
//! attributes = 2; }`. Reading is a seqlock: read the timestamp, copy the payload, re-read the
//! timestamp, retry when it was 0 or changed. All reads go through `process_vm_readv`, so a
//! target publishing garbage can make a read fail, never crash or hang the agent.
//!
//! Only version 2 is accepted. Version 1 was the development format of the OTEP, whose
//! payload was a bare `Resource` and whose publishers wrote the signature last instead of
//! zeroing the timestamp; decoding it as a `ProcessContext` would silently misread it.

use std::{
    fmt::Write as _,
    io::{self, BufRead as _, BufReader},
    path::{Path, PathBuf},
    time::Duration,
};

use opentelemetry_proto::tonic::{
    common::v1::{AnyValue, KeyValue, any_value::Value},
    resource::v1::Resource,
};
use prost::Message as _;

/// The header's first 8 bytes.
pub const SIGNATURE: &[u8; 8] = b"OTEL_CTX";
/// The only header version this reader understands.
pub const SUPPORTED_VERSION: u32 = 2;
/// Size of the header in the target's memory.
pub const HEADER_SIZE: usize = 32;
/// Larger payloads are refused (the same bound as the OpenTelemetry eBPF profiler): a context
/// is a few hundred bytes, anything near this is garbage or abuse.
pub const MAX_PAYLOAD_SIZE: u32 = 64 * 1024;
/// Reads attempted before giving up on a context that is being updated.
pub const MAX_ATTEMPTS: u32 = 3;
/// Thread-context records index the key map with a `u8`.
pub const MAX_KEY_MAP_ENTRIES: usize = 256;

/// Names of the publishing mapping: memfd + prctl name, anonymous + prctl name, and memfd
/// without a name (kernels without `CONFIG_ANON_VMA_NAME`; the publisher closes the fd, so it
/// usually reads `/memfd:OTEL_CTX (deleted)`).
const MAPPING_PREFIXES: [&[u8]; 3] = [
    b"[anon_shmem:OTEL_CTX]",
    b"[anon:OTEL_CTX]",
    b"/memfd:OTEL_CTX",
];
/// Pause between attempts, long enough for a writer to finish swapping a pointer.
const RETRY_PAUSE: Duration = Duration::from_millis(1);

const SCHEMA_VERSION_KEY: &str = "threadlocal.schema_version";
const KEY_MAP_KEY: &str = "threadlocal.attribute_key_map";
const SERVICE_NAME_KEY: &str = "service.name";

/// `opentelemetry.proto.processcontext.v1development.ProcessContext`: not part of
/// `opentelemetry-proto`, so declared here on top of its `Resource` and `KeyValue`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ProcessContext {
    #[prost(message, optional, tag = "1")]
    pub resource: Option<Resource>,
    #[prost(message, repeated, tag = "2")]
    pub attributes: Vec<KeyValue>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessContextError {
    #[error("no OTEL_CTX mapping in the process")]
    NotPublished,
    #[error("context update still in progress after {attempts} attempts")]
    UpdateInProgress { attempts: u32 },
    #[error("context changed during each of {attempts} reads")]
    RetriesExhausted { attempts: u32 },
    #[error("bad signature {0:02x?}")]
    BadSignature([u8; 8]),
    #[error("unsupported process context version {0}")]
    UnsupportedVersion(u32),
    #[error("payload of {0} bytes exceeds {MAX_PAYLOAD_SIZE}")]
    PayloadTooLarge(u32),
    #[error("cannot decode payload: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("process is gone")]
    Gone,
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: io::Error,
    },
}

impl ProcessContextError {
    fn io(what: &'static str, source: io::Error) -> Self {
        if source.raw_os_error() == Some(libc::ESRCH) || source.kind() == io::ErrorKind::NotFound {
            Self::Gone
        } else {
            Self::Io { what, source }
        }
    }

    /// Whether a cached mapping address should be dropped and rediscovered: the header no
    /// longer looks like ours (unpublished, remapped, never ours).
    fn invalidates_mapping(&self) -> bool {
        matches!(
            self,
            Self::BadSignature(_) | Self::UnsupportedVersion(_) | Self::Io { .. }
        )
    }
}

pub type Result<T, E = ProcessContextError> = std::result::Result<T, E>;

/// A decoded process context.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProcessContextInfo {
    /// The header timestamp (CLOCK_BOOTTIME) of the read: a cache key, changes on every update.
    pub published_at_ns: u64,
    /// `Resource.attributes`, values rendered as strings (see [`render_value`]).
    pub resource_attributes: Vec<(String, String)>,
    /// The `service.name` resource attribute, when it is a string.
    pub service_name: Option<String>,
    /// `threadlocal.schema_version`, when it is a string.
    pub schema_version: Option<String>,
    /// `threadlocal.attribute_key_map`: index = key index of thread-context records. At most
    /// [`MAX_KEY_MAP_ENTRIES`]; non-string entries are rendered so the indexes stay right.
    pub attribute_key_map: Vec<String>,
    /// `ProcessContext.attributes` other than the two above.
    pub other_attributes: Vec<(String, String)>,
}

impl ProcessContextInfo {
    /// Decodes a payload copied out of a process.
    pub fn decode(payload: &[u8], published_at_ns: u64) -> Result<Self> {
        let context = ProcessContext::decode(payload)?;
        Ok(Self::from_context(&context, published_at_ns))
    }

    pub fn from_context(context: &ProcessContext, published_at_ns: u64) -> Self {
        let resource = context.resource.as_ref().map_or(&[][..], |r| &r.attributes);
        let mut info = Self {
            published_at_ns,
            resource_attributes: resource.iter().map(render_key_value).collect(),
            service_name: find_string(resource, SERVICE_NAME_KEY),
            schema_version: find_string(&context.attributes, SCHEMA_VERSION_KEY),
            ..Self::default()
        };
        for kv in &context.attributes {
            match kv.key.as_str() {
                SCHEMA_VERSION_KEY => {}
                KEY_MAP_KEY => info.attribute_key_map = key_map(kv.value.as_ref()),
                _ => info.other_attributes.push(render_key_value(kv)),
            }
        }
        info
    }
}

/// The first attribute `key` with a string value.
fn find_string(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes.iter().filter(|kv| kv.key == key).find_map(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => Some(s.clone()),
            _ => None,
        }
    })
}

fn key_map(value: Option<&AnyValue>) -> Vec<String> {
    let Some(Value::ArrayValue(array)) = value.and_then(|v| v.value.as_ref()) else {
        return Vec::new();
    };
    array
        .values
        .iter()
        .take(MAX_KEY_MAP_ENTRIES)
        .map(|v| render_value(Some(v)))
        .collect()
}

fn render_key_value(kv: &KeyValue) -> (String, String) {
    (kv.key.clone(), render_value(kv.value.as_ref()))
}

/// Renders an attribute value as a string: strings as they are, scalars in their usual text
/// form, bytes as hex, arrays and key-value lists as JSON-like text (`["a", 1]`,
/// `{"k": true}`), an absent value as the empty string.
pub fn render_value(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        None => String::new(),
        Some(Value::StringValue(s)) => s.clone(),
        other => {
            let mut out = String::new();
            render_nested(other, &mut out);
            out
        }
    }
}

/// Inside arrays and lists strings are quoted, so `["a, b"]` and `["a", "b"]` differ.
fn render_nested(value: Option<&Value>, out: &mut String) {
    // Writing into a String cannot fail.
    let _ = match value {
        None => write!(out, "null"),
        Some(Value::StringValue(s)) => write!(out, "{s:?}"),
        Some(Value::BoolValue(b)) => write!(out, "{b}"),
        Some(Value::IntValue(i)) => write!(out, "{i}"),
        Some(Value::DoubleValue(d)) => write!(out, "{d}"),
        Some(Value::BytesValue(bytes)) => {
            out.push_str("0x");
            bytes.iter().try_for_each(|b| write!(out, "{b:02x}"))
        }
        // An index into an OTLP profiles dictionary, which a process context does not have.
        Some(Value::StringValueStrindex(i)) => write!(out, "strindex:{i}"),
        Some(Value::ArrayValue(array)) => {
            out.push('[');
            for (i, v) in array.values.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                render_nested(v.value.as_ref(), out);
            }
            write!(out, "]")
        }
        Some(Value::KvlistValue(list)) => {
            out.push('{');
            for (i, kv) in list.values.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                let _ = write!(out, "{:?}: ", kv.key);
                render_nested(kv.value.as_ref().and_then(|v| v.value.as_ref()), out);
            }
            write!(out, "}}")
        }
    };
}

/// The header as read from the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    payload_size: u32,
    published_at_ns: u64,
    payload: u64,
}

impl Header {
    /// Parses and validates signature and version.
    fn parse(raw: &[u8; HEADER_SIZE]) -> Result<Self> {
        let (signature, rest) = raw.split_at(8);
        if signature != SIGNATURE {
            let mut bad = [0u8; 8];
            bad.copy_from_slice(signature);
            return Err(ProcessContextError::BadSignature(bad));
        }
        let version = u32::from_ne_bytes(field(rest, 0));
        if version != SUPPORTED_VERSION {
            return Err(ProcessContextError::UnsupportedVersion(version));
        }
        Ok(Self {
            payload_size: u32::from_ne_bytes(field(rest, 4)),
            published_at_ns: u64::from_ne_bytes(field(rest, 8)),
            payload: u64::from_ne_bytes(field(rest, 16)),
        })
    }
}

/// `N` bytes at `offset` of `bytes`; the caller guarantees the range (fixed header layout).
fn field<const N: usize>(bytes: &[u8], offset: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[offset..offset + N]);
    out
}

/// Copies `buf.len()` bytes at `addr` of process `pid`; a short copy is an error.
fn read_remote(pid: u32, addr: u64, buf: &mut [u8], what: &'static str) -> Result<()> {
    if buf.is_empty() {
        return Ok(());
    }
    let invalid = |msg| ProcessContextError::Io {
        what,
        source: io::Error::new(io::ErrorKind::InvalidInput, msg),
    };
    let pid = libc::pid_t::try_from(pid).map_err(|_| invalid("pid out of range"))?;
    let addr = usize::try_from(addr).map_err(|_| invalid("address out of range"))?;
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        // An address in the other process: never dereferenced here, hence no provenance.
        iov_base: std::ptr::without_provenance_mut(addr),
        iov_len: buf.len(),
    };
    // SAFETY: `local` describes exactly `buf`, which we borrow mutably for the call; the kernel
    // only reads through `remote`, in the target's address space, and checks it.
    let copied = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    if copied < 0 {
        return Err(ProcessContextError::io(what, io::Error::last_os_error()));
    }
    if copied.unsigned_abs() != buf.len() {
        return Err(ProcessContextError::Io {
            what,
            source: io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("copied {copied} of {} bytes", buf.len()),
            ),
        });
    }
    Ok(())
}

fn read_header(pid: u32, addr: u64) -> Result<Header> {
    let mut raw = [0u8; HEADER_SIZE];
    read_remote(pid, addr, &mut raw, "read process context header")?;
    Header::parse(&raw)
}

/// The header timestamp of the context at `addr` (from [`find_mapping`]): 0 while an update is
/// in progress, otherwise a value that changes on every update. Cheap (one 32-byte copy):
/// callers decode the payload again only when it changed.
pub fn read_published_at(pid: u32, addr: u64) -> Result<u64> {
    read_header(pid, addr).map(|h| h.published_at_ns)
}

/// Reads and decodes the context at `addr` (from [`find_mapping`]), following the seqlock
/// protocol: at most [`MAX_ATTEMPTS`] reads, each accepted only if the timestamp was nonzero
/// and unchanged across the payload copy.
pub fn read_context(pid: u32, addr: u64) -> Result<ProcessContextInfo> {
    let mut last_error = ProcessContextError::UpdateInProgress { attempts: 0 };
    for attempt in 1..=MAX_ATTEMPTS {
        if attempt > 1 {
            std::thread::sleep(RETRY_PAUSE);
        }
        match read_once(pid, addr)? {
            Attempt::Consistent(payload, published_at_ns) => {
                return ProcessContextInfo::decode(&payload, published_at_ns);
            }
            Attempt::InProgress => {
                last_error = ProcessContextError::UpdateInProgress { attempts: attempt };
            }
            Attempt::Changed => {
                last_error = ProcessContextError::RetriesExhausted { attempts: attempt };
            }
        }
    }
    Err(last_error)
}

enum Attempt {
    Consistent(Vec<u8>, u64),
    InProgress,
    Changed,
}

/// One read of header, payload, header. Errors that a concurrent update can explain (the
/// payload copy failing because the old payload was freed) count as a change, not an error.
fn read_once(pid: u32, addr: u64) -> Result<Attempt> {
    let header = read_header(pid, addr)?;
    if header.published_at_ns == 0 {
        return Ok(Attempt::InProgress);
    }
    // With a nonzero timestamp the size is committed: a bad one is not a race.
    if header.payload_size > MAX_PAYLOAD_SIZE {
        return Err(ProcessContextError::PayloadTooLarge(header.payload_size));
    }
    let mut payload = vec![0u8; header.payload_size as usize];
    let copied = read_remote(
        pid,
        header.payload,
        &mut payload,
        "read process context payload",
    );
    let after = read_header(pid, addr)?.published_at_ns;
    if after != header.published_at_ns {
        return Ok(Attempt::Changed);
    }
    copied?;
    Ok(Attempt::Consistent(payload, header.published_at_ns))
}

/// Whether a `/proc/<pid>/maps` line names a process context mapping; returns its start.
fn context_mapping_start(line: &[u8]) -> Option<u64> {
    // `start-end perms offset dev inode   name`: five single-space separated fields, then
    // padding, then a name that may itself contain spaces.
    let mut fields = line.splitn(6, |&b| b == b' ');
    let range = fields.next()?;
    let name = fields.nth(4)?.trim_ascii();
    if !MAPPING_PREFIXES.iter().any(|p| name.starts_with(p)) {
        return None;
    }
    let start = range.split(|&b| b == b'-').next()?;
    u64::from_str_radix(std::str::from_utf8(start).ok()?, 16).ok()
}

/// Start addresses of every mapping named like a process context, in maps order. Streams the
/// file: maps of large processes run to megabytes.
fn candidate_mappings(maps: &Path) -> Result<Vec<u64>> {
    let file =
        std::fs::File::open(maps).map_err(|e| ProcessContextError::io("open process maps", e))?;
    let mut candidates = Vec::new();
    // Bytes, not lines of text: a mapped file name need not be UTF-8.
    for line in BufReader::new(file).split(b'\n') {
        let line = line.map_err(|e| ProcessContextError::io("read process maps", e))?;
        candidates.extend(context_mapping_start(&line));
    }
    Ok(candidates)
}

/// Finds the address of the process context header of `pid` (procfs at `proc_root`): the first
/// mapping named like one whose header has our signature and version. When candidates exist
/// but none qualifies, the first one's error says why.
pub fn find_mapping(proc_root: &Path, pid: u32) -> Result<u64> {
    let candidates = candidate_mappings(&proc_root.join(pid.to_string()).join("maps"))?;
    let mut first_error = None;
    for addr in candidates {
        match read_header(pid, addr) {
            Ok(_) => return Ok(addr),
            Err(e @ ProcessContextError::Gone) => return Err(e),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    Err(first_error.unwrap_or(ProcessContextError::NotPublished))
}

/// Per-process reader that caches the header address and the last timestamp it decoded. The
/// caller owns one per pid and drops it when the process goes away or execs.
#[derive(Debug)]
pub struct ProcessContextReader {
    pid: u32,
    proc_root: PathBuf,
    addr: Option<u64>,
    last_published_at: Option<u64>,
}

impl ProcessContextReader {
    pub fn new(pid: u32) -> Self {
        Self::with_proc_root(pid, "/proc".into())
    }

    /// `proc_root`: where procfs is mounted (the host's `/proc` inside a container).
    pub fn with_proc_root(pid: u32, proc_root: PathBuf) -> Self {
        Self {
            pid,
            proc_root,
            addr: None,
            last_published_at: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The cached header address, if the mapping was found.
    pub fn address(&self) -> Option<u64> {
        self.addr
    }

    /// The timestamp of the last successful [`read`](Self::read).
    pub fn last_published_at(&self) -> Option<u64> {
        self.last_published_at
    }

    /// Reads and decodes the context, discovering the mapping first when none is cached.
    pub fn read(&mut self) -> Result<ProcessContextInfo> {
        let addr = self.locate()?;
        let info = self.checked(read_context(self.pid, addr))?;
        self.last_published_at = Some(info.published_at_ns);
        Ok(info)
    }

    /// Like [`read`](Self::read), but `None` when the timestamp equals the last one read: the
    /// common case costs one 32-byte copy (plus a maps scan while nothing is published).
    pub fn read_if_changed(&mut self) -> Result<Option<ProcessContextInfo>> {
        let addr = self.locate()?;
        let published_at = self.checked(read_published_at(self.pid, addr))?;
        if published_at != 0 && Some(published_at) == self.last_published_at {
            return Ok(None);
        }
        self.read().map(Some)
    }

    fn locate(&mut self) -> Result<u64> {
        if let Some(addr) = self.addr {
            return Ok(addr);
        }
        let addr = find_mapping(&self.proc_root, self.pid)?;
        self.addr = Some(addr);
        Ok(addr)
    }

    /// Forgets the mapping when an error says it is no longer a context header.
    fn checked<T>(&mut self, result: Result<T>) -> Result<T> {
        if let Err(e) = &result
            && e.invalidates_mapping()
        {
            self.addr = None;
            self.last_published_at = None;
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::common::v1::{ArrayValue, KeyValueList};

    use super::*;

    fn value(v: Value) -> Option<AnyValue> {
        Some(AnyValue { value: Some(v) })
    }

    fn kv(key: &str, v: Value) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: value(v),
            ..KeyValue::default()
        }
    }

    fn string(s: &str) -> Value {
        Value::StringValue(s.into())
    }

    fn array(values: Vec<Value>) -> Value {
        Value::ArrayValue(ArrayValue {
            values: values
                .into_iter()
                .map(|v| AnyValue { value: Some(v) })
                .collect(),
        })
    }

    fn sample_context() -> ProcessContext {
        ProcessContext {
            resource: Some(Resource {
                attributes: vec![
                    kv("service.name", string("checkout")),
                    kv("service.instance.id", string("abc")),
                    kv("process.pid", Value::IntValue(42)),
                ],
                ..Resource::default()
            }),
            attributes: vec![
                kv("threadlocal.schema_version", string("tlsdesc_v1_dev")),
                kv(
                    "threadlocal.attribute_key_map",
                    array(vec![string("http.route"), string("user.id")]),
                ),
                kv("custom.flag", Value::BoolValue(true)),
            ],
        }
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn decodes_resource_and_threadlocal_attributes() {
        let payload = sample_context().encode_to_vec();
        let info = ProcessContextInfo::decode(&payload, 7).unwrap();
        assert_eq!(
            info,
            ProcessContextInfo {
                published_at_ns: 7,
                resource_attributes: pairs(&[
                    ("service.name", "checkout"),
                    ("service.instance.id", "abc"),
                    ("process.pid", "42"),
                ]),
                service_name: Some("checkout".into()),
                schema_version: Some("tlsdesc_v1_dev".into()),
                attribute_key_map: vec!["http.route".into(), "user.id".into()],
                other_attributes: pairs(&[("custom.flag", "true")]),
            }
        );
    }

    #[test]
    fn empty_payload_is_an_empty_context() {
        let info = ProcessContextInfo::decode(&[], 1).unwrap();
        assert_eq!(
            info,
            ProcessContextInfo {
                published_at_ns: 1,
                ..ProcessContextInfo::default()
            }
        );
    }

    #[test]
    fn renders_every_value_kind() {
        let nested = Value::KvlistValue(KeyValueList {
            values: vec![
                kv("a", Value::IntValue(-1)),
                kv("b", array(vec![string("x, y"), Value::BoolValue(false)])),
                KeyValue {
                    key: "none".into(),
                    ..KeyValue::default()
                },
            ],
        });
        let cases = [
            (string("plain \"text\""), "plain \"text\""),
            (Value::BoolValue(false), "false"),
            (Value::IntValue(i64::MIN), "-9223372036854775808"),
            (Value::DoubleValue(1.5), "1.5"),
            (Value::BytesValue(vec![0xde, 0xad, 0x01]), "0xdead01"),
            (Value::StringValueStrindex(3), "strindex:3"),
            (array(vec![string("a"), Value::IntValue(2)]), r#"["a", 2]"#),
            (array(vec![]), "[]"),
            (nested, r#"{"a": -1, "b": ["x, y", false], "none": null}"#),
        ];
        for (v, expected) in cases {
            assert_eq!(render_value(value(v).as_ref()), expected);
        }
        assert_eq!(render_value(None), "");
        assert_eq!(render_value(Some(&AnyValue { value: None })), "");
    }

    #[test]
    fn key_map_is_bounded_and_keeps_indexes() {
        let mut keys: Vec<Value> = (0..300).map(|i| string(&format!("k{i}"))).collect();
        keys[1] = Value::IntValue(5);
        let context = ProcessContext {
            resource: None,
            attributes: vec![kv("threadlocal.attribute_key_map", array(keys))],
        };
        let info = ProcessContextInfo::from_context(&context, 1);
        assert_eq!(info.attribute_key_map.len(), MAX_KEY_MAP_ENTRIES);
        assert_eq!(info.attribute_key_map[0], "k0");
        assert_eq!(info.attribute_key_map[1], "5");
        assert_eq!(info.attribute_key_map[255], "k255");
        assert_eq!(info.service_name, None);
        assert_eq!(info.schema_version, None);
    }

    #[test]
    fn non_string_special_attributes_are_not_taken() {
        let context = ProcessContext {
            resource: Some(Resource {
                attributes: vec![kv("service.name", Value::IntValue(1))],
                ..Resource::default()
            }),
            attributes: vec![
                kv("threadlocal.schema_version", Value::IntValue(1)),
                kv("threadlocal.attribute_key_map", string("not an array")),
            ],
        };
        let info = ProcessContextInfo::from_context(&context, 1);
        assert_eq!(info.service_name, None);
        assert_eq!(info.schema_version, None);
        assert!(info.attribute_key_map.is_empty());
        assert_eq!(info.resource_attributes, pairs(&[("service.name", "1")]));
        assert!(info.other_attributes.is_empty());
    }

    #[test]
    fn garbage_payloads_are_decode_errors() {
        let garbage: [&[u8]; 4] = [
            // Field 1, length-delimited, length 2^32 - 1.
            &[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f],
            // An over-long varint tag.
            &[0xff; 11],
            // Field 1 with wire type 7 (invalid).
            &[0x0f],
            // A truncated nested message.
            &[0x0a, 0x05, 0x0a, 0x03, 0x0a],
        ];
        for bytes in garbage {
            assert!(
                matches!(
                    ProcessContextInfo::decode(bytes, 1),
                    Err(ProcessContextError::Decode(_))
                ),
                "{bytes:02x?}"
            );
        }
    }

    fn header(signature: &[u8; 8], version: u32, size: u32, ts: u64, ptr: u64) -> [u8; 32] {
        let mut raw = [0u8; 32];
        raw[..8].copy_from_slice(signature);
        raw[8..12].copy_from_slice(&version.to_ne_bytes());
        raw[12..16].copy_from_slice(&size.to_ne_bytes());
        raw[16..24].copy_from_slice(&ts.to_ne_bytes());
        raw[24..].copy_from_slice(&ptr.to_ne_bytes());
        raw
    }

    #[test]
    fn parses_and_validates_headers() {
        assert_eq!(
            Header::parse(&header(SIGNATURE, 2, 10, 99, 0x1000)).unwrap(),
            Header {
                payload_size: 10,
                published_at_ns: 99,
                payload: 0x1000
            }
        );
        assert!(matches!(
            Header::parse(&header(b"OTEL_CTY", 2, 10, 99, 0x1000)),
            Err(ProcessContextError::BadSignature(s)) if &s == b"OTEL_CTY"
        ));
        for version in [0, 1, 3] {
            assert!(matches!(
                Header::parse(&header(SIGNATURE, version, 10, 99, 0x1000)),
                Err(ProcessContextError::UnsupportedVersion(v)) if v == version
            ));
        }
    }

    #[test]
    fn recognizes_context_mapping_names() {
        let lines: [(&[u8], Option<u64>); 8] = [
            (
                b"7f1c2a000000-7f1c2a001000 rw-s 00000000 00:01 1234                       [anon_shmem:OTEL_CTX]",
                Some(0x7f1c_2a00_0000),
            ),
            (
                b"7f1c2a000000-7f1c2a001000 rw-p 00000000 00:00 0                          [anon:OTEL_CTX]",
                Some(0x7f1c_2a00_0000),
            ),
            (
                b"55d0c0de0000-55d0c0de1000 rw-p 00000000 00:01 2048                       /memfd:OTEL_CTX (deleted)",
                Some(0x55d0_c0de_0000),
            ),
            (b"1000-2000 rw-p 00000000 00:01 2048 /memfd:OTEL_CTX", Some(0x1000)),
            (
                b"1000-2000 rw-p 00000000 00:01 2048                       /memfd:other (deleted)",
                None,
            ),
            (b"1000-2000 rw-p 00000000 00:00 0 ", None),
            (b"1000-2000 r-xp 00000000 08:01 77 /usr/lib/OTEL_CTX.so", None),
            (b"zzzz-2000 rw-p 00000000 00:00 0 [anon:OTEL_CTX]", None),
        ];
        for (line, expected) in lines {
            assert_eq!(
                context_mapping_start(line),
                expected,
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn a_process_without_context_is_not_published() {
        let mut reader = ProcessContextReader::new(std::process::id());
        assert!(matches!(
            reader.read(),
            Err(ProcessContextError::NotPublished)
        ));
        assert!(matches!(
            reader.read_if_changed(),
            Err(ProcessContextError::NotPublished)
        ));
        assert_eq!(reader.address(), None);
    }

    #[test]
    fn a_missing_process_is_gone() {
        // Above pid_max (2^22), so never a live process.
        let mut reader = ProcessContextReader::new(u32::MAX - 1);
        assert!(matches!(reader.read(), Err(ProcessContextError::Gone)));
    }

    #[test]
    fn reads_a_context_published_in_this_process() {
        // Publish into our own memory (no mapping name needed for `read_context`).
        let payload = sample_context().encode_to_vec();
        let mut raw = header(
            SIGNATURE,
            2,
            u32::try_from(payload.len()).unwrap(),
            123,
            payload.as_ptr() as u64,
        );
        let pid = std::process::id();
        let addr = raw.as_ptr() as u64;
        assert_eq!(read_published_at(pid, addr).unwrap(), 123);
        let info = read_context(pid, addr).unwrap();
        assert_eq!(info.service_name.as_deref(), Some("checkout"));
        assert_eq!(info.published_at_ns, 123);

        // Update in progress.
        raw[16..24].copy_from_slice(&0u64.to_ne_bytes());
        let addr = std::hint::black_box(raw.as_ptr()) as u64;
        assert!(matches!(
            read_context(pid, addr),
            Err(ProcessContextError::UpdateInProgress { attempts: 3 })
        ));

        // Oversized and unreadable payloads.
        let too_large = header(
            SIGNATURE,
            2,
            MAX_PAYLOAD_SIZE + 1,
            5,
            payload.as_ptr() as u64,
        );
        assert!(matches!(
            read_context(pid, too_large.as_ptr() as u64),
            Err(ProcessContextError::PayloadTooLarge(_))
        ));
        let unreadable = header(SIGNATURE, 2, 16, 5, 8);
        assert!(matches!(
            read_context(pid, unreadable.as_ptr() as u64),
            Err(ProcessContextError::Io { .. })
        ));
        // An unreadable header.
        assert!(matches!(
            read_published_at(pid, 8),
            Err(ProcessContextError::Io { .. })
        ));
    }
}
