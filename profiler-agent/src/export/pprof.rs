//! pprof output: gzip-compressed `profile.proto`, as `go tool pprof`, Pyroscope and Parca read.
//!
//! Sample types follow Go's CPU profiles: `samples/count` and `cpu/nanoseconds`, with
//! `period_type` cpu/nanoseconds and `period` = 1e9 / frequency. A location is one normalized
//! frame; its address is the file offset used for the lookup (return addresses minus one), and
//! its mapping is the object (identity mapping of file offsets), so profiles of processes that
//! have exited still say which binary and build id each frame came from.

use std::{borrow::Cow, cell::RefCell, sync::Arc};

use foldhash::{HashMap, HashMapExt};
use hashbrown::HashTable;
use std::hash::BuildHasher as _;

use flate2::{Compress, Compression, Crc, FlushCompress, Status};
use prost::Message as _;

use super::pprof_proto as pb;
use crate::{
    process::{ObjectId, ObjectStore},
    profile::Frame,
    symbolize::Symbolizer,
};

/// A sample label value.
#[derive(Debug, Clone)]
pub enum LabelValue<'a> {
    Str(&'a str),
    Num(i64),
}

/// A function's id, and the interned name and file its key points at (kept alive).
type FunctionEntry = (u64, Arc<str>, Option<Arc<str>>);

/// A profile being built and the tables that intern its strings, functions, locations and
/// mappings: what a [`PprofBuilder`] holds between uses, so one profile can gather samples
/// over several calls (the store's batch of traces) without holding the symbolizer.
pub struct PprofTables {
    profile: pb::Profile,
    /// Indexes into `profile.string_table`, hashed by the string they name: each string is
    /// allocated once, in the table.
    strings: HashTable<u32>,
    string_hasher: foldhash::fast::RandomState,
    /// By the symbolizer's interned names (one `Arc` per distinct name and file): pointers
    /// hash in one step where the names' bytes took most of a profile's hashing. The value
    /// holds the names, so no address in a key can be freed and reused while the profile is
    /// built. (Two `Arc`s of equal text only make two equal functions, never a wrong one.)
    functions: HashMap<(usize, Option<usize>), FunctionEntry>,
    locations: HashMap<Frame, u64>,
    mappings: HashMap<Option<ObjectId>, u64>,
    period_ns: i64,
}

pub struct PprofBuilder<'a> {
    tables: PprofTables,
    symbolizer: &'a mut Symbolizer,
    objects: &'a ObjectStore,
}

impl PprofTables {
    pub fn new(frequency_hz: u64, start_unix_ns: u64, duration_ns: u64) -> Self {
        // Sized for a trace of a few deep stacks: no rehashing while it fills.
        let mut tables = Self {
            profile: pb::Profile::default(),
            strings: HashTable::with_capacity(128),
            string_hasher: foldhash::fast::RandomState::default(),
            functions: HashMap::with_capacity(64),
            locations: HashMap::with_capacity(64),
            mappings: HashMap::with_capacity(8),
            period_ns: (1_000_000_000 / frequency_hz.max(1)) as i64,
        };
        tables.string("");
        let samples = tables.value_type("samples", "count");
        let cpu = tables.value_type("cpu", "nanoseconds");
        tables.profile.sample_type = vec![samples, cpu.clone()];
        tables.profile.period_type = Some(cpu);
        tables.profile.period = tables.period_ns;
        tables.set_window(start_unix_ns, duration_ns);
        tables.profile.default_sample_type = tables.profile.sample_type[1].r#type;
        tables
    }

    /// Continues building with the symbolizer that names the new samples' frames.
    pub fn resume<'a>(
        self,
        symbolizer: &'a mut Symbolizer,
        objects: &'a ObjectStore,
    ) -> PprofBuilder<'a> {
        PprofBuilder {
            tables: self,
            symbolizer,
            objects,
        }
    }

    pub fn set_window(&mut self, start_unix_ns: u64, duration_ns: u64) {
        self.profile.time_nanos = start_unix_ns as i64;
        self.profile.duration_nanos = duration_ns as i64;
    }

    pub fn samples(&self) -> usize {
        self.profile.sample.len()
    }

    pub fn finish(self) -> pb::Profile {
        self.profile
    }

    fn value_type(&mut self, r#type: &str, unit: &str) -> pb::ValueType {
        pb::ValueType {
            r#type: self.string(r#type),
            unit: self.string(unit),
        }
    }

    fn string(&mut self, s: &str) -> i64 {
        let Self {
            strings,
            string_hasher,
            profile,
            ..
        } = self;
        let hash = string_hasher.hash_one(s);
        if let Some(&i) = strings.find(hash, |&i| profile.string_table[i as usize] == s) {
            return i64::from(i);
        }
        let i = profile.string_table.len() as u32;
        profile.string_table.push(s.to_owned());
        let table = &profile.string_table;
        strings.insert_unique(hash, i, |&j| {
            string_hasher.hash_one(table[j as usize].as_str())
        });
        i64::from(i)
    }
}

impl<'a> PprofBuilder<'a> {
    pub fn new(
        frequency_hz: u64,
        start_unix_ns: u64,
        duration_ns: u64,
        symbolizer: &'a mut Symbolizer,
        objects: &'a ObjectStore,
    ) -> Self {
        PprofTables::new(frequency_hz, start_unix_ns, duration_ns).resume(symbolizer, objects)
    }

    /// Gives the symbolizer back; the profile so far can be resumed later.
    pub fn suspend(self) -> PprofTables {
        self.tables
    }

    /// Adds a sample of `count` ticks; `frames` leaf first.
    pub fn add_sample(&mut self, frames: &[Frame], count: u64, labels: &[(&str, LabelValue<'_>)]) {
        let location_id = frames.iter().map(|f| self.location(*f)).collect();
        let label = labels
            .iter()
            .map(|(key, value)| {
                let key = self.string(key);
                match value {
                    LabelValue::Str(s) => pb::Label {
                        key,
                        str: self.string(s),
                        ..Default::default()
                    },
                    LabelValue::Num(n) => pb::Label {
                        key,
                        num: *n,
                        ..Default::default()
                    },
                }
            })
            .collect();
        let count = count as i64;
        self.tables.profile.sample.push(pb::Sample {
            location_id,
            value: vec![count, count * self.tables.period_ns],
            label,
        });
    }

    pub fn add_comment(&mut self, comment: &str) {
        let id = self.string(comment);
        self.tables.profile.comment.push(id);
    }

    pub fn finish(self) -> pb::Profile {
        self.tables.finish()
    }

    fn location(&mut self, frame: Frame) -> u64 {
        if let Some(id) = self.tables.locations.get(&frame) {
            return *id;
        }
        let symbolized = self.symbolizer.get(frame, self.objects);
        let (object, address) = match frame {
            Frame::User { object, address } => (Some(object), address),
            Frame::Kernel { address } => (None, address),
        };
        let mapping_id = self.mapping(object);
        let line = symbolized
            .lines
            .iter()
            .map(|l| pb::Line {
                function_id: self.function(&l.function, l.file.as_ref()),
                line: i64::from(l.line),
                column: 0,
            })
            .collect();
        let id = self.tables.profile.location.len() as u64 + 1;
        self.tables.profile.location.push(pb::Location {
            id,
            mapping_id,
            address,
            line,
            is_folded: false,
        });
        self.tables.locations.insert(frame, id);
        id
    }

    fn mapping(&mut self, object: Option<ObjectId>) -> u64 {
        if let Some(id) = self.tables.mappings.get(&object) {
            return *id;
        }
        let (filename, build_id) = match object {
            Some(o) => {
                let o = self.objects.get(o);
                (o.name.clone(), o.build_id_hex().unwrap_or_default())
            }
            None => ("[kernel.kallsyms]".to_owned(), String::new()),
        };
        let id = self.tables.profile.mapping.len() as u64 + 1;
        let mapping = pb::Mapping {
            id,
            memory_start: 0,
            memory_limit: u64::MAX,
            file_offset: 0,
            filename: self.string(&filename),
            build_id: self.string(&build_id),
            // Functions are resolved already: tells pprof not to try to symbolize again.
            has_functions: true,
            has_filenames: true,
            has_line_numbers: true,
            has_inline_frames: true,
        };
        self.tables.profile.mapping.push(mapping);
        self.tables.mappings.insert(object, id);
        id
    }

    fn function(&mut self, name: &Arc<str>, file: Option<&Arc<str>>) -> u64 {
        let address = |s: &Arc<str>| Arc::as_ptr(s).cast::<u8>() as usize;
        let key = (address(name), file.map(address));
        if let Some((id, ..)) = self.tables.functions.get(&key) {
            return *id;
        }
        let id = self.tables.profile.function.len() as u64 + 1;
        let name_idx = self.string(name);
        let filename = file.map(|f| self.string(f)).unwrap_or(0);
        self.tables.profile.function.push(pb::Function {
            id,
            name: name_idx,
            system_name: name_idx,
            filename,
            start_line: 0,
        });
        self.tables
            .functions
            .insert(key, (id, name.clone(), file.cloned()));
        id
    }

    fn string(&mut self, s: &str) -> i64 {
        self.tables.string(s)
    }
}

/// Serialized and gzip-compressed, as pprof files are stored.
pub fn encode_gzip(profile: &pb::Profile) -> Vec<u8> {
    gzip(&profile.encode_to_vec())
}

/// Encoded profiles up to this size are stored without compression: a trace's profile of a
/// few samples shrinks by about a fifth under gzip, which cost more CPU than its whole
/// storage. `decode` reads both forms.
const STORE_RAW_UP_TO: usize = 4096;

/// Serialized for the store: raw when small, gzip-compressed otherwise.
pub fn encode_for_store(profile: &pb::Profile) -> Vec<u8> {
    let raw = profile.encode_to_vec();
    if raw.len() <= STORE_RAW_UP_TO {
        raw
    } else {
        gzip(&raw)
    }
}

/// A stored profile (either form) as a `.pb.gz` file holds it: gzip-compressed, unless it
/// already is.
pub fn ensure_gzip(bytes: &[u8]) -> Cow<'_, [u8]> {
    if is_gzip(bytes) {
        Cow::Borrowed(bytes)
    } else {
        Cow::Owned(gzip(bytes))
    }
}

fn is_gzip(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0x1f, 0x8b])
}

thread_local! {
    /// One deflate state per thread, reset for each profile: a new one allocates and clears
    /// some 300 KiB, which cost more than compressing a small trace profile.
    static DEFLATE: RefCell<Compress> = RefCell::new(Compress::new(Compression::fast(), false));
}

/// `raw` as a gzip member (RFC 1952: header, raw deflate, CRC-32 and length).
fn gzip(raw: &[u8]) -> Vec<u8> {
    // ID1 ID2, deflate, no flags, no mtime, no extra flags, OS unknown.
    let mut out = Vec::with_capacity(raw.len() / 4 + 64);
    out.extend_from_slice(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff]);
    DEFLATE.with(|deflate| {
        let mut deflate = deflate.borrow_mut();
        deflate.reset();
        loop {
            let consumed = deflate.total_in() as usize;
            if out.capacity() - out.len() < 256 {
                out.reserve(out.capacity().max(4096));
            }
            match deflate
                .compress_vec(&raw[consumed..], &mut out, FlushCompress::Finish)
                .expect("deflate into a Vec cannot fail")
            {
                Status::StreamEnd => break,
                Status::Ok | Status::BufError => {}
            }
        }
    });
    let mut crc = Crc::new();
    crc.update(raw);
    out.extend_from_slice(&crc.sum().to_le_bytes());
    out.extend_from_slice(&(raw.len() as u32).to_le_bytes());
    out
}

/// Decodes a (possibly gzip-compressed) pprof profile.
pub fn decode(bytes: &[u8]) -> anyhow::Result<pb::Profile> {
    let raw = if is_gzip(bytes) {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(bytes), &mut out)?;
        out
    } else {
        bytes.to_vec()
    };
    Ok(pb::Profile::decode(raw.as_slice())?)
}

/// The samples of `profile` whose numeric label `key` equals `value`, without that label, in a
/// profile of their own that holds only the strings, mappings, functions and locations they
/// use. The store keeps the traces of one batch in one profile, told apart by such a label,
/// and cuts a trace's part out of it with this.
pub fn extract_labelled(profile: &pb::Profile, key: &str, value: i64) -> pb::Profile {
    let key = profile
        .string_table
        .iter()
        .position(|s| s == key)
        .map_or(-1, |i| i as i64);
    let mut out = Compactor::new(profile);
    for sample in &profile.sample {
        let mut selected = false;
        let mut labels = Vec::with_capacity(sample.label.len());
        for label in &sample.label {
            if label.key == key {
                selected = label.num == value;
            } else {
                labels.push(label);
            }
        }
        if !selected {
            continue;
        }
        let location_id = sample
            .location_id
            .iter()
            .filter_map(|id| out.location(*id))
            .collect();
        let label = labels
            .into_iter()
            .map(|l| pb::Label {
                key: out.string(l.key),
                str: out.string(l.str),
                num: l.num,
                num_unit: out.string(l.num_unit),
            })
            .collect();
        out.out.sample.push(pb::Sample {
            location_id,
            value: sample.value.clone(),
            label,
        });
    }
    out.out
}

/// Copies the parts of a profile's dictionary that are used, renumbered densely.
struct Compactor<'p> {
    src: &'p pb::Profile,
    out: pb::Profile,
    strings: HashMap<i64, i64>,
    mappings: HashMap<u64, u64>,
    functions: HashMap<u64, u64>,
    locations: HashMap<u64, u64>,
    mapping_at: HashMap<u64, &'p pb::Mapping>,
    function_at: HashMap<u64, &'p pb::Function>,
    location_at: HashMap<u64, &'p pb::Location>,
}

impl<'p> Compactor<'p> {
    fn new(src: &'p pb::Profile) -> Self {
        let mut c = Self {
            src,
            out: pb::Profile {
                string_table: vec![String::new()],
                time_nanos: src.time_nanos,
                duration_nanos: src.duration_nanos,
                period: src.period,
                ..Default::default()
            },
            strings: HashMap::new(),
            mappings: HashMap::new(),
            functions: HashMap::new(),
            locations: HashMap::new(),
            mapping_at: src.mapping.iter().map(|m| (m.id, m)).collect(),
            function_at: src.function.iter().map(|f| (f.id, f)).collect(),
            location_at: src.location.iter().map(|l| (l.id, l)).collect(),
        };
        let value_type = |c: &mut Self, t: &pb::ValueType| pb::ValueType {
            r#type: c.string(t.r#type),
            unit: c.string(t.unit),
        };
        c.out.sample_type = src
            .sample_type
            .iter()
            .map(|t| value_type(&mut c, t))
            .collect();
        c.out.period_type = src.period_type.as_ref().map(|t| value_type(&mut c, t));
        c.out.default_sample_type = c.string(src.default_sample_type);
        c.out.drop_frames = c.string(src.drop_frames);
        c.out.keep_frames = c.string(src.keep_frames);
        c.out.comment = src.comment.iter().map(|i| c.string(*i)).collect();
        c
    }

    fn string(&mut self, i: i64) -> i64 {
        if i <= 0 {
            return 0;
        }
        if let Some(&j) = self.strings.get(&i) {
            return j;
        }
        let text = usize::try_from(i)
            .ok()
            .and_then(|i| self.src.string_table.get(i))
            .cloned()
            .unwrap_or_default();
        let j = self.out.string_table.len() as i64;
        self.out.string_table.push(text);
        self.strings.insert(i, j);
        j
    }

    fn mapping(&mut self, id: u64) -> u64 {
        if let Some(&j) = self.mappings.get(&id) {
            return j;
        }
        let Some(m) = self.mapping_at.get(&id).copied() else {
            return 0;
        };
        let j = self.out.mapping.len() as u64 + 1;
        let mapping = pb::Mapping {
            id: j,
            filename: self.string(m.filename),
            build_id: self.string(m.build_id),
            ..m.clone()
        };
        self.out.mapping.push(mapping);
        self.mappings.insert(id, j);
        j
    }

    fn function(&mut self, id: u64) -> u64 {
        if let Some(&j) = self.functions.get(&id) {
            return j;
        }
        let Some(f) = self.function_at.get(&id).copied() else {
            return 0;
        };
        let j = self.out.function.len() as u64 + 1;
        let function = pb::Function {
            id: j,
            name: self.string(f.name),
            system_name: self.string(f.system_name),
            filename: self.string(f.filename),
            start_line: f.start_line,
        };
        self.out.function.push(function);
        self.functions.insert(id, j);
        j
    }

    /// The location's new id; `None` when the profile has no location of that id.
    fn location(&mut self, id: u64) -> Option<u64> {
        if let Some(&j) = self.locations.get(&id) {
            return Some(j);
        }
        let l = self.location_at.get(&id).copied()?;
        let mapping_id = self.mapping(l.mapping_id);
        let line = l
            .line
            .iter()
            .map(|line| pb::Line {
                function_id: self.function(line.function_id),
                ..line.clone()
            })
            .collect();
        let j = self.out.location.len() as u64 + 1;
        self.out.location.push(pb::Location {
            id: j,
            mapping_id,
            address: l.address,
            line,
            is_folded: l.is_folded,
        });
        self.locations.insert(id, j);
        Some(j)
    }
}

/// Merges profiles with the same sample types into one. Strings, mappings, functions and
/// locations are re-interned; samples with the same stack and labels are summed. The merged
/// profile spans from the earliest start to the latest end. Used where one answer is made of
/// several stored profiles (a trace stored in parts, a time window made of buckets).
pub fn merge(profiles: &[pb::Profile]) -> anyhow::Result<pb::Profile> {
    let mut merger = Merger::default();
    for profile in profiles {
        merger.add(profile)?;
    }
    Ok(merger.finish())
}

type LocationKey = (u64, u64, Vec<(u64, i64)>);
type SampleKey = (Vec<u64>, Vec<(i64, i64, i64, i64)>);

#[derive(Default)]
struct Merger {
    out: pb::Profile,
    /// Sample type names, to check that every input measures the same thing.
    sample_types: Option<Vec<(String, String)>>,
    strings: HashMap<String, i64>,
    mappings: HashMap<(i64, i64), u64>,
    functions: HashMap<(i64, i64, i64, i64), u64>,
    locations: HashMap<LocationKey, u64>,
    samples: HashMap<SampleKey, usize>,
    start: Option<i64>,
    end: i64,
}

impl Merger {
    fn add(&mut self, p: &pb::Profile) -> anyhow::Result<()> {
        let text = |i: i64| -> &str {
            usize::try_from(i)
                .ok()
                .and_then(|i| p.string_table.get(i))
                .map_or("", String::as_str)
        };
        let types: Vec<(String, String)> = p
            .sample_type
            .iter()
            .map(|t| (text(t.r#type).to_owned(), text(t.unit).to_owned()))
            .collect();
        match &self.sample_types {
            None => self.init(p, &types),
            Some(known) => anyhow::ensure!(
                *known == types,
                "cannot merge profiles with sample types {known:?} and {types:?}"
            ),
        }
        let mut strings = Vec::with_capacity(p.string_table.len());
        for s in &p.string_table {
            strings.push(self.string(s));
        }
        let s = |i: i64| {
            usize::try_from(i)
                .ok()
                .and_then(|i| strings.get(i).copied())
                .unwrap_or(0)
        };
        let mut mapping_ids = HashMap::new();
        for m in &p.mapping {
            let key = (s(m.filename), s(m.build_id));
            let next = self.out.mapping.len() as u64 + 1;
            let id = *self.mappings.entry(key).or_insert_with(|| {
                self.out.mapping.push(pb::Mapping {
                    id: next,
                    filename: key.0,
                    build_id: key.1,
                    ..m.clone()
                });
                next
            });
            mapping_ids.insert(m.id, id);
        }
        let mut function_ids = HashMap::new();
        for f in &p.function {
            let key = (s(f.name), s(f.system_name), s(f.filename), f.start_line);
            let next = self.out.function.len() as u64 + 1;
            let id = *self.functions.entry(key).or_insert_with(|| {
                self.out.function.push(pb::Function {
                    id: next,
                    name: key.0,
                    system_name: key.1,
                    filename: key.2,
                    start_line: key.3,
                });
                next
            });
            function_ids.insert(f.id, id);
        }
        let mut location_ids = HashMap::new();
        for l in &p.location {
            let mapping = mapping_ids.get(&l.mapping_id).copied().unwrap_or(0);
            let lines: Vec<(u64, i64)> = l
                .line
                .iter()
                .map(|line| {
                    let f = function_ids.get(&line.function_id).copied().unwrap_or(0);
                    (f, line.line)
                })
                .collect();
            let key = (mapping, l.address, lines);
            let next = self.out.location.len() as u64 + 1;
            let id = match self.locations.get(&key) {
                Some(id) => *id,
                None => {
                    self.out.location.push(pb::Location {
                        id: next,
                        mapping_id: key.0,
                        address: key.1,
                        line: key
                            .2
                            .iter()
                            .map(|(function_id, line)| pb::Line {
                                function_id: *function_id,
                                line: *line,
                                column: 0,
                            })
                            .collect(),
                        is_folded: l.is_folded,
                    });
                    self.locations.insert(key, next);
                    next
                }
            };
            location_ids.insert(l.id, id);
        }
        for sample in &p.sample {
            let locations: Vec<u64> = sample
                .location_id
                .iter()
                .map(|id| location_ids.get(id).copied().unwrap_or(0))
                .collect();
            let mut labels: Vec<(i64, i64, i64, i64)> = sample
                .label
                .iter()
                .map(|l| (s(l.key), s(l.str), l.num, s(l.num_unit)))
                .collect();
            labels.sort_unstable();
            self.add_sample(locations, labels, &sample.value);
        }
        for c in &p.comment {
            let c = s(*c);
            if !self.out.comment.contains(&c) {
                self.out.comment.push(c);
            }
        }
        if p.time_nanos > 0 {
            self.start = Some(self.start.map_or(p.time_nanos, |t| t.min(p.time_nanos)));
            self.end = self.end.max(p.time_nanos + p.duration_nanos);
        }
        Ok(())
    }

    fn init(&mut self, p: &pb::Profile, types: &[(String, String)]) {
        self.string("");
        self.out.sample_type = types
            .iter()
            .map(|(t, u)| pb::ValueType {
                r#type: self.string(t),
                unit: self.string(u),
            })
            .collect();
        let text = |i: i64| {
            usize::try_from(i)
                .ok()
                .and_then(|i| p.string_table.get(i))
                .cloned()
                .unwrap_or_default()
        };
        self.out.period_type = p.period_type.as_ref().map(|t| pb::ValueType {
            r#type: self.string(&text(t.r#type)),
            unit: self.string(&text(t.unit)),
        });
        self.out.period = p.period;
        self.out.default_sample_type = self.string(&text(p.default_sample_type));
        self.sample_types = Some(types.to_vec());
    }

    fn add_sample(
        &mut self,
        locations: Vec<u64>,
        labels: Vec<(i64, i64, i64, i64)>,
        value: &[i64],
    ) {
        let key = (locations, labels);
        if let Some(&i) = self.samples.get(&key) {
            let existing = &mut self.out.sample[i].value;
            for (sum, v) in existing.iter_mut().zip(value) {
                *sum += v;
            }
            return;
        }
        self.out.sample.push(pb::Sample {
            location_id: key.0.clone(),
            value: value.to_vec(),
            label: key
                .1
                .iter()
                .map(|&(key, str, num, num_unit)| pb::Label {
                    key,
                    str,
                    num,
                    num_unit,
                })
                .collect(),
        });
        self.samples.insert(key, self.out.sample.len() - 1);
    }

    fn string(&mut self, s: &str) -> i64 {
        if let Some(i) = self.strings.get(s) {
            return *i;
        }
        let i = self.out.string_table.len() as i64;
        self.out.string_table.push(s.to_owned());
        self.strings.insert(s.to_owned(), i);
        i
    }

    fn finish(mut self) -> pb::Profile {
        if let Some(start) = self.start {
            self.out.time_nanos = start;
            self.out.duration_nanos = self.end - start;
        }
        self.out
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use prost::Message as _;

    use super::{decode, encode_for_store, ensure_gzip, gzip, is_gzip, pb};

    fn gunzip(bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut out)
            .expect("a valid gzip member");
        out
    }

    #[test]
    fn gzip_round_trips_with_the_reused_deflate_state() {
        // Empty, small, and larger than any internal buffer; twice each, so the reset state is
        // exercised, and interleaved so a stale state would show.
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        let noisy: Vec<u8> = (0..300_000)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if i % 3 == 0 { (x >> 56) as u8 } else { b'a' }
            })
            .collect();
        for input in [
            &b""[..],
            b"pprof",
            &noisy[..],
            b"pprof",
            &noisy[..1000],
            b"",
        ] {
            let packed = gzip(input);
            assert_eq!(gunzip(&packed), input, "{} bytes", input.len());
            assert_eq!(&packed[..3], &[0x1f, 0x8b, 8]);
        }
        assert!(gzip(&noisy).len() < noisy.len(), "it compresses");
    }

    #[test]
    fn stored_profiles_are_raw_when_small_gzip_when_large_and_always_served_as_gzip() {
        let small = pb::Profile {
            string_table: vec![String::new(), "cpu".into()],
            ..Default::default()
        };
        let stored = encode_for_store(&small);
        assert!(!is_gzip(&stored));
        assert_eq!(decode(&stored).unwrap(), small);
        assert_eq!(gunzip(&ensure_gzip(&stored)), small.encode_to_vec());

        let large = pb::Profile {
            string_table: (0..2000).map(|i| format!("function_{i}")).collect(),
            ..Default::default()
        };
        let stored = encode_for_store(&large);
        assert!(is_gzip(&stored) && stored.len() < large.encoded_len());
        assert_eq!(decode(&stored).unwrap(), large);
        assert_eq!(
            ensure_gzip(&stored).as_ref(),
            stored,
            "already gzip: unchanged"
        );
    }
}
