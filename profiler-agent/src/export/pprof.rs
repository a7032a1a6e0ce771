//! pprof output: gzip-compressed `profile.proto`, as `go tool pprof`, Pyroscope and Parca read.
//!
//! Sample types follow Go's CPU profiles: `samples/count` and `cpu/nanoseconds`, with
//! `period_type` cpu/nanoseconds and `period` = 1e9 / frequency. A location is one normalized
//! frame; its address is the file offset used for the lookup (return addresses minus one), and
//! its mapping is the object (identity mapping of file offsets), so profiles of processes that
//! have exited still say which binary and build id each frame came from.

use std::{collections::HashMap, io::Write as _, sync::Arc};

use flate2::{Compression, write::GzEncoder};
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

pub struct PprofBuilder<'a> {
    profile: pb::Profile,
    strings: HashMap<Arc<str>, i64>,
    functions: HashMap<(Arc<str>, Option<Arc<str>>), u64>,
    locations: HashMap<Frame, u64>,
    mappings: HashMap<Option<ObjectId>, u64>,
    period_ns: i64,
    symbolizer: &'a mut Symbolizer,
    objects: &'a ObjectStore,
}

impl<'a> PprofBuilder<'a> {
    pub fn new(
        frequency_hz: u64,
        start_unix_ns: u64,
        duration_ns: u64,
        symbolizer: &'a mut Symbolizer,
        objects: &'a ObjectStore,
    ) -> Self {
        let mut builder = Self {
            profile: pb::Profile::default(),
            strings: HashMap::new(),
            functions: HashMap::new(),
            locations: HashMap::new(),
            mappings: HashMap::new(),
            period_ns: (1_000_000_000 / frequency_hz.max(1)) as i64,
            symbolizer,
            objects,
        };
        builder.string("");
        let samples = builder.value_type("samples", "count");
        let cpu = builder.value_type("cpu", "nanoseconds");
        builder.profile.sample_type = vec![samples, cpu.clone()];
        builder.profile.period_type = Some(cpu);
        builder.profile.period = builder.period_ns;
        builder.profile.time_nanos = start_unix_ns as i64;
        builder.profile.duration_nanos = duration_ns as i64;
        builder.profile.default_sample_type = builder.profile.sample_type[1].r#type;
        builder
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
        self.profile.sample.push(pb::Sample {
            location_id,
            value: vec![count, count * self.period_ns],
            label,
        });
    }

    pub fn add_comment(&mut self, comment: &str) {
        let id = self.string(comment);
        self.profile.comment.push(id);
    }

    pub fn finish(self) -> pb::Profile {
        self.profile
    }

    fn location(&mut self, frame: Frame) -> u64 {
        if let Some(id) = self.locations.get(&frame) {
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
        let id = self.profile.location.len() as u64 + 1;
        self.profile.location.push(pb::Location {
            id,
            mapping_id,
            address,
            line,
            is_folded: false,
        });
        self.locations.insert(frame, id);
        id
    }

    fn mapping(&mut self, object: Option<ObjectId>) -> u64 {
        if let Some(id) = self.mappings.get(&object) {
            return *id;
        }
        let (filename, build_id) = match object {
            Some(o) => {
                let o = self.objects.get(o);
                (o.name.clone(), o.build_id_hex().unwrap_or_default())
            }
            None => ("[kernel.kallsyms]".to_owned(), String::new()),
        };
        let id = self.profile.mapping.len() as u64 + 1;
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
        self.profile.mapping.push(mapping);
        self.mappings.insert(object, id);
        id
    }

    fn function(&mut self, name: &Arc<str>, file: Option<&Arc<str>>) -> u64 {
        let key = (name.clone(), file.cloned());
        if let Some(id) = self.functions.get(&key) {
            return *id;
        }
        let id = self.profile.function.len() as u64 + 1;
        let name_idx = self.string(name);
        let filename = file.map(|f| self.string(f)).unwrap_or(0);
        self.profile.function.push(pb::Function {
            id,
            name: name_idx,
            system_name: name_idx,
            filename,
            start_line: 0,
        });
        self.functions.insert(key, id);
        id
    }

    fn value_type(&mut self, r#type: &str, unit: &str) -> pb::ValueType {
        pb::ValueType {
            r#type: self.string(r#type),
            unit: self.string(unit),
        }
    }

    fn string(&mut self, s: &str) -> i64 {
        if let Some(i) = self.strings.get(s) {
            return *i;
        }
        let i = self.profile.string_table.len() as i64;
        self.profile.string_table.push(s.to_owned());
        self.strings.insert(s.into(), i);
        i
    }
}

/// Serialized and gzip-compressed, as pprof files are stored.
pub fn encode_gzip(profile: &pb::Profile) -> Vec<u8> {
    let raw = profile.encode_to_vec();
    let mut gz = GzEncoder::new(Vec::with_capacity(raw.len() / 4), Compression::default());
    gz.write_all(&raw).expect("writing to a Vec cannot fail");
    gz.finish().expect("writing to a Vec cannot fail")
}

/// Decodes a (possibly gzip-compressed) pprof profile.
pub fn decode(bytes: &[u8]) -> anyhow::Result<pb::Profile> {
    let raw = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(bytes), &mut out)?;
        out
    } else {
        bytes.to_vec()
    };
    Ok(pb::Profile::decode(raw.as_slice())?)
}
