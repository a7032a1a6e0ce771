//! OTLP profiles v1.10 requests from an interval's aggregate (pure: symbols come through the
//! [`Symbols`] trait, so this is tested without blazesym or `/proc`).
//!
//! Layout, per request: one `ProfilesDictionary` shared by every profile in it (mapping,
//! location, function, link, string, attribute and stack tables; index 0 of each holds the zero
//! value, so index 0 means "unset"), and one `ResourceProfiles` per process with one CPU
//! `Profile`: `sample_type` samples/count, `period_type` cpu/nanoseconds, `period` 1e9/Hz (the
//! combination Pyroscope maps to process CPU). Samples carry one timestamp per tick and no
//! values (the timestamps-only shape the reference eBPF profiler uses); a traced sample points
//! to its `{trace_id, span_id}` in the link table, which is what receivers turn into
//! `trace_id`/`span_id` labels. Attribute values are written inline (`string_value`,
//! `int_value`), never as string-table references, which Pyroscope and Parca do not resolve.
//!
//! A request stays under `max_request_bytes`: the builder tracks the encoded size as it goes
//! and, when the next sample would not fit, rolls that sample's dictionary additions back and
//! starts a new request with its own dictionary.

use std::{collections::BTreeMap, sync::Arc};

use foldhash::{HashMap, HashMapExt};

use opentelemetry_proto::tonic::{
    collector::profiles::v1development::ExportProfilesServiceRequest,
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value::Value},
    profiles::v1development::{
        Function, KeyValueAndUnit, Line, Link, Location, Mapping, Profile, ProfilesDictionary,
        ResourceProfiles, Sample, ScopeProfiles, Stack, ValueType,
    },
    resource::v1::Resource,
};
use prost::{Message as _, encoding::encoded_len_varint};

use crate::{
    process::{ObjectId, ObjectStore},
    profile::{Aggregate, Frame, ProcessDetails, SampleKey, StackId},
    symbolize::{SymbolizedFrame, Symbolizer},
};

/// Where frames get their names and objects their file names and build ids.
pub trait Symbols {
    /// The frame's source lines, innermost inlined function first.
    fn frame(&mut self, frame: Frame) -> Arc<SymbolizedFrame>;
    fn object(&self, id: ObjectId) -> ObjectInfo<'_>;
}

pub struct ObjectInfo<'a> {
    pub path: &'a str,
    pub build_id: Option<&'a [u8]>,
}

/// [`Symbols`] from the collector's symbolizer and object store.
pub struct LiveSymbols<'a> {
    pub symbolizer: &'a mut Symbolizer,
    pub objects: &'a ObjectStore,
}

impl Symbols for LiveSymbols<'_> {
    fn frame(&mut self, frame: Frame) -> Arc<SymbolizedFrame> {
        self.symbolizer.get(frame, self.objects)
    }

    fn object(&self, id: ObjectId) -> ObjectInfo<'_> {
        let object = self.objects.get(id);
        ObjectInfo {
            path: &object.name,
            build_id: object.build_id.as_deref(),
        }
    }
}

/// What a request needs besides the aggregate.
#[derive(Debug, Clone)]
pub struct EncodeOptions {
    pub frequency_hz: u64,
    /// The interval, Unix ns.
    pub window: (u64, u64),
    pub host_name: Option<String>,
    /// Encoded requests stay at or under this size (unless one sample alone is larger).
    pub max_request_bytes: usize,
}

/// One request, ready to send.
#[derive(Debug, Clone, PartialEq)]
pub struct BuiltRequest {
    pub request: ExportProfilesServiceRequest,
    /// Sampled ticks in it (timestamps).
    pub samples: u64,
}

/// The interval's samples as requests, processes in pid order.
pub fn build_requests(
    aggregate: &Aggregate,
    options: &EncodeOptions,
    symbols: &mut dyn Symbols,
) -> Vec<BuiltRequest> {
    let mut by_pid: BTreeMap<u32, Vec<&SampleKey>> = BTreeMap::new();
    for (key, _) in aggregate.sorted_samples() {
        by_pid.entry(key.pid).or_default().push(key);
    }
    let mut out = Vec::new();
    let mut builder = RequestBuilder::new(options.max_request_bytes);
    for (pid, keys) in by_pid {
        let process = ProcessInput::new(aggregate, pid, &keys, options);
        for key in keys {
            let sample = SampleInput::new(aggregate, key);
            if builder.try_add(&process, &sample, symbols) {
                continue;
            }
            out.push(std::mem::replace(
                &mut builder,
                RequestBuilder::new(options.max_request_bytes),
            ));
            // An empty request takes any sample, however large.
            builder.try_add(&process, &sample, symbols);
        }
    }
    if builder.samples > 0 {
        out.push(builder);
    }
    out.into_iter().map(RequestBuilder::finish).collect()
}

/// An attribute value, as written inline.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum AttrValue {
    Str(String),
    Int(i64),
}

impl AttrValue {
    fn any(&self) -> AnyValue {
        AnyValue {
            value: Some(match self {
                AttrValue::Str(s) => Value::StringValue(s.clone()),
                AttrValue::Int(i) => Value::IntValue(*i),
            }),
        }
    }
}

/// A process's resource and profile header, computed once per process.
struct ProcessInput {
    pid: u32,
    resource: Vec<(String, AttrValue)>,
    time_unix_nano: u64,
    duration_nano: u64,
    period: i64,
}

impl ProcessInput {
    fn new(aggregate: &Aggregate, pid: u32, keys: &[&SampleKey], options: &EncodeOptions) -> Self {
        let fallback = ProcessDetails {
            exe_name: aggregate
                .process_names
                .get(&pid)
                .cloned()
                .unwrap_or_default(),
            ..Default::default()
        };
        let details = aggregate
            .process_details
            .get(&pid)
            .map(|d| &**d)
            .unwrap_or(&fallback);
        // Samples that arrived after the previous flush can be older than the window's start:
        // the profile's window covers every timestamp in it.
        let (mut start, mut end) = options.window;
        for key in keys {
            if let Some(v) = aggregate.samples.get(key) {
                start = start.min(v.first_unix_ns);
                end = end.max(v.last_unix_ns + 1);
            }
        }
        Self {
            pid,
            resource: resource_attributes(pid, details, options.host_name.as_deref()),
            time_unix_nano: start,
            duration_nano: end - start,
            period: (1_000_000_000 / options.frequency_hz.max(1)) as i64,
        }
    }
}

/// Resource attributes: what the agent knows of the process, then what the process published
/// in its context (OTEP 4719) under other keys. `service.name` follows the process context,
/// then `OTEL_SERVICE_NAME`, then the pod's `app.kubernetes.io/name`, then the executable name;
/// `host.name`, `container.id` and the pod's `k8s.*` attributes from the process context win
/// over the agent's.
fn resource_attributes(
    pid: u32,
    details: &ProcessDetails,
    host_name: Option<&str>,
) -> Vec<(String, AttrValue)> {
    let mut attrs = vec![
        (
            "service.name".to_owned(),
            AttrValue::Str(details.service_name().to_owned()),
        ),
        ("process.pid".to_owned(), AttrValue::Int(i64::from(pid))),
        (
            "process.executable.name".to_owned(),
            AttrValue::Str(details.exe_name.clone()),
        ),
    ];
    if let Some(path) = &details.exe_path {
        attrs.push((
            "process.executable.path".to_owned(),
            AttrValue::Str(path.clone()),
        ));
    }
    let published = |key: &str| details.resource_attributes.iter().any(|(k, _)| k == key);
    for (key, value) in [
        ("host.name", host_name),
        ("container.id", details.container_id.as_deref()),
    ] {
        if let Some(value) = value.filter(|_| !published(key)) {
            attrs.push((key.to_owned(), AttrValue::Str(value.to_owned())));
        }
    }
    // The pod (k8s.namespace.name, k8s.pod.name, k8s.deployment.name, …), unless the process
    // published its own.
    for (key, value) in details.pod.iter().flat_map(|p| &p.attributes) {
        if !published(key) && !attrs.iter().any(|(k, _)| k == key) {
            attrs.push((key.clone(), AttrValue::Str(value.clone())));
        }
    }
    for (key, value) in &details.resource_attributes {
        if !attrs.iter().any(|(k, _)| k == key) {
            attrs.push((key.clone(), AttrValue::Str(value.clone())));
        }
    }
    attrs
}

/// One aggregated sample's parts.
struct SampleInput<'a> {
    frames: &'a [Frame],
    stack: StackId,
    attributes: Vec<(&'a str, AttrValue)>,
    link: Option<([u8; 16], [u8; 8])>,
    timestamps: Vec<u64>,
}

impl<'a> SampleInput<'a> {
    fn new(aggregate: &'a Aggregate, key: &SampleKey) -> Self {
        let context = key.context.map(|c| aggregate.context(c));
        let thread_name = aggregate
            .thread_names
            .get(&key.tid)
            .cloned()
            .unwrap_or_default();
        let mut attributes = vec![
            ("thread.id", AttrValue::Int(i64::from(key.tid))),
            ("thread.name", AttrValue::Str(thread_name)),
        ];
        // The context's own attributes (OTEP 4947 thread context, custom labels) describe what
        // the thread was doing: sample attributes, as long as the key is not taken.
        for (k, v) in context.iter().flat_map(|c| c.labels.iter()) {
            if !attributes.iter().any(|(taken, _)| *taken == &**k) {
                attributes.push((k, AttrValue::Str(v.to_string())));
            }
        }
        let mut timestamps = match aggregate.timestamps.get(key) {
            Some(t) => t.clone(),
            None => {
                let v = aggregate.samples[key];
                vec![v.last_unix_ns; v.count as usize]
            }
        };
        timestamps.sort_unstable();
        Self {
            frames: aggregate.stacks.get(key.stack),
            stack: key.stack,
            attributes,
            link: context.map(|c| (c.trace_id, c.span_id)),
            timestamps,
        }
    }
}

/// Lengths of every table, to undo what a sample that did not fit added.
#[derive(Clone, Copy)]
struct Checkpoint {
    strings: usize,
    mappings: usize,
    locations: usize,
    functions: usize,
    links: usize,
    attributes: usize,
    stacks: usize,
    resources: usize,
}

/// A sample's identity within a profile: samples that share it are merged.
type SampleIdentity = (i32, Vec<i32>, i32);

/// One request being built: the dictionary, the processes' profiles, and the encoded size.
struct RequestBuilder {
    dict: ProfilesDictionary,
    strings: HashMap<String, i32>,
    mappings: HashMap<Option<ObjectId>, i32>,
    locations: HashMap<Frame, i32>,
    functions: HashMap<(i32, i32), i32>,
    links: HashMap<([u8; 16], [u8; 8]), i32>,
    attributes: HashMap<(i32, AttrValue), i32>,
    stacks: HashMap<StackId, i32>,
    resources: Vec<ResourceProfiles>,
    /// For the last resource (processes arrive one after the other): merged samples.
    current_pid: Option<u32>,
    sample_index: HashMap<SampleIdentity, usize>,
    /// Encoded size of the request so far (exact for the tables and samples, with a bound on
    /// the nested length prefixes).
    bytes: usize,
    max_bytes: usize,
    samples: u64,
}

/// Bytes the nested lengths of a resource's `ResourceProfiles` → `ScopeProfiles` → `Profile`
/// can grow by (three varints of at most 5 bytes), plus the dictionary field's own prefix.
const NESTING_SLACK: usize = 16;

/// Size of a length-delimited field holding `len` bytes (field numbers below 16).
fn field_len(len: usize) -> usize {
    1 + encoded_len_varint(len as u64) + len
}

impl RequestBuilder {
    fn new(max_bytes: usize) -> Self {
        let dict = ProfilesDictionary {
            mapping_table: vec![Mapping::default()],
            location_table: vec![Location::default()],
            function_table: vec![Function::default()],
            link_table: vec![Link::default()],
            string_table: vec![String::new()],
            attribute_table: vec![KeyValueAndUnit::default()],
            stack_table: vec![Stack::default()],
        };
        let bytes = dict.encoded_len() + NESTING_SLACK;
        let mut strings = HashMap::new();
        strings.insert(String::new(), 0);
        Self {
            dict,
            strings,
            mappings: HashMap::new(),
            locations: HashMap::new(),
            functions: HashMap::new(),
            links: HashMap::new(),
            attributes: HashMap::new(),
            stacks: HashMap::new(),
            resources: Vec::new(),
            current_pid: None,
            sample_index: HashMap::new(),
            bytes,
            max_bytes,
            samples: 0,
        }
    }

    /// Adds a sample (and its process's resource, the first time). False when the request
    /// would grow past its cap and already holds samples: the request is then complete, with
    /// its tables as they were before the call.
    fn try_add(
        &mut self,
        process: &ProcessInput,
        sample: &SampleInput<'_>,
        symbols: &mut dyn Symbols,
    ) -> bool {
        let checkpoint = self.checkpoint();
        let bytes_before = self.bytes;
        if self.current_pid != Some(process.pid) {
            self.start_resource(process);
        }
        let stack_index = self.stack(sample, symbols);
        let mut attribute_indices: Vec<i32> = sample
            .attributes
            .iter()
            .map(|(k, v)| self.attribute(k, v.clone()))
            .collect();
        attribute_indices.sort_unstable();
        let link_index = sample.link.map_or(0, |(t, s)| self.link(t, s));
        let identity = (stack_index, attribute_indices, link_index);
        let existing = self.sample_index.get(&identity).copied();
        let samples = &self.profile_mut().samples;
        let growth = match existing {
            Some(i) => {
                let old = samples[i].encoded_len();
                let mut merged = samples[i].clone();
                merged
                    .timestamps_unix_nano
                    .extend_from_slice(&sample.timestamps);
                field_len(merged.encoded_len()) - field_len(old)
            }
            None => field_len(
                Sample {
                    stack_index,
                    attribute_indices: identity.1.clone(),
                    link_index,
                    values: Vec::new(),
                    timestamps_unix_nano: sample.timestamps.clone(),
                }
                .encoded_len(),
            ),
        };
        if self.bytes + growth > self.max_bytes && self.samples > 0 {
            // The request is finished as it was: only its tables need to be as they were.
            self.rollback(checkpoint);
            self.bytes = bytes_before;
            return false;
        }
        self.bytes += growth;
        self.samples += sample.timestamps.len() as u64;
        let profile = self.profile_mut();
        match existing {
            Some(i) => profile.samples[i]
                .timestamps_unix_nano
                .extend_from_slice(&sample.timestamps),
            None => {
                profile.samples.push(Sample {
                    stack_index,
                    attribute_indices: identity.1.clone(),
                    link_index,
                    values: Vec::new(),
                    timestamps_unix_nano: sample.timestamps.clone(),
                });
                let i = profile.samples.len() - 1;
                self.sample_index.insert(identity, i);
            }
        }
        true
    }

    fn profile_mut(&mut self) -> &mut Profile {
        let resource = self.resources.last_mut().expect("a resource was started");
        &mut resource.scope_profiles[0].profiles[0]
    }

    fn start_resource(&mut self, process: &ProcessInput) {
        let sample_type = ValueType {
            type_strindex: self.string("samples"),
            unit_strindex: self.string("count"),
        };
        let period_type = ValueType {
            type_strindex: self.string("cpu"),
            unit_strindex: self.string("nanoseconds"),
        };
        let resource = ResourceProfiles {
            resource: Some(Resource {
                attributes: process
                    .resource
                    .iter()
                    .map(|(k, v)| KeyValue {
                        key: k.clone(),
                        value: Some(v.any()),
                        key_strindex: 0,
                    })
                    .collect(),
                dropped_attributes_count: 0,
                entity_refs: Vec::new(),
            }),
            scope_profiles: vec![ScopeProfiles {
                scope: Some(InstrumentationScope {
                    name: "profiler-agent".to_owned(),
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                    attributes: Vec::new(),
                    dropped_attributes_count: 0,
                }),
                profiles: vec![Profile {
                    sample_type: Some(sample_type),
                    samples: Vec::new(),
                    time_unix_nano: process.time_unix_nano,
                    duration_nano: process.duration_nano,
                    period_type: Some(period_type),
                    period: process.period,
                    ..Default::default()
                }],
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        };
        self.bytes += field_len(resource.encoded_len()) + NESTING_SLACK;
        self.resources.push(resource);
        self.current_pid = Some(process.pid);
        self.sample_index.clear();
    }

    fn checkpoint(&self) -> Checkpoint {
        let d = &self.dict;
        Checkpoint {
            strings: d.string_table.len(),
            mappings: d.mapping_table.len(),
            locations: d.location_table.len(),
            functions: d.function_table.len(),
            links: d.link_table.len(),
            attributes: d.attribute_table.len(),
            stacks: d.stack_table.len(),
            resources: self.resources.len(),
        }
    }

    /// Drops every entry added since `c`, from the tables and from their indexes.
    fn rollback(&mut self, c: Checkpoint) {
        let d = &mut self.dict;
        d.string_table.truncate(c.strings);
        d.mapping_table.truncate(c.mappings);
        d.location_table.truncate(c.locations);
        d.function_table.truncate(c.functions);
        d.link_table.truncate(c.links);
        d.attribute_table.truncate(c.attributes);
        d.stack_table.truncate(c.stacks);
        self.resources.truncate(c.resources);
        let keep = |len: usize| move |i: &i32| (*i as usize) < len;
        self.strings.retain(|_, i| keep(c.strings)(i));
        self.mappings.retain(|_, i| keep(c.mappings)(i));
        self.locations.retain(|_, i| keep(c.locations)(i));
        self.functions.retain(|_, i| keep(c.functions)(i));
        self.links.retain(|_, i| keep(c.links)(i));
        self.attributes.retain(|_, i| keep(c.attributes)(i));
        self.stacks.retain(|_, i| keep(c.stacks)(i));
    }

    fn finish(self) -> BuiltRequest {
        BuiltRequest {
            request: ExportProfilesServiceRequest {
                resource_profiles: self.resources,
                dictionary: Some(self.dict),
            },
            samples: self.samples,
        }
    }

    fn string(&mut self, s: &str) -> i32 {
        if let Some(i) = self.strings.get(s) {
            return *i;
        }
        let i = self.dict.string_table.len() as i32;
        self.bytes += field_len(s.len());
        self.dict.string_table.push(s.to_owned());
        self.strings.insert(s.to_owned(), i);
        i
    }

    fn attribute(&mut self, key: &str, value: AttrValue) -> i32 {
        let key_strindex = self.string(key);
        if let Some(i) = self.attributes.get(&(key_strindex, value.clone())) {
            return *i;
        }
        let entry = KeyValueAndUnit {
            key_strindex,
            value: Some(value.any()),
            unit_strindex: 0,
        };
        let i = self.dict.attribute_table.len() as i32;
        self.bytes += field_len(entry.encoded_len());
        self.dict.attribute_table.push(entry);
        self.attributes.insert((key_strindex, value), i);
        i
    }

    fn link(&mut self, trace_id: [u8; 16], span_id: [u8; 8]) -> i32 {
        if let Some(i) = self.links.get(&(trace_id, span_id)) {
            return *i;
        }
        let link = Link {
            trace_id: trace_id.to_vec(),
            span_id: span_id.to_vec(),
        };
        let i = self.dict.link_table.len() as i32;
        self.bytes += field_len(link.encoded_len());
        self.dict.link_table.push(link);
        self.links.insert((trace_id, span_id), i);
        i
    }

    fn stack(&mut self, sample: &SampleInput<'_>, symbols: &mut dyn Symbols) -> i32 {
        if let Some(i) = self.stacks.get(&sample.stack) {
            return *i;
        }
        let stack = Stack {
            location_indices: sample
                .frames
                .iter()
                .map(|f| self.location(*f, symbols))
                .collect(),
        };
        let i = self.dict.stack_table.len() as i32;
        self.bytes += field_len(stack.encoded_len());
        self.dict.stack_table.push(stack);
        self.stacks.insert(sample.stack, i);
        i
    }

    fn location(&mut self, frame: Frame, symbols: &mut dyn Symbols) -> i32 {
        if let Some(i) = self.locations.get(&frame) {
            return *i;
        }
        let (object, address, frame_type) = match frame {
            Frame::User { object, address } => (Some(object), address, "native"),
            Frame::Kernel { address } => (None, address, "kernel"),
        };
        let mapping_index = self.mapping(object, symbols);
        let lines = symbols
            .frame(frame)
            .lines
            .iter()
            .map(|l| {
                let name = self.string(&l.function);
                let file = l.file.as_deref().map_or(0, |f| self.string(f));
                Line {
                    function_index: self.function(name, file),
                    line: i64::from(l.line),
                    column: 0,
                }
            })
            .collect();
        let attribute_indices =
            vec![self.attribute("profile.frame.type", AttrValue::Str(frame_type.to_owned()))];
        let location = Location {
            mapping_index,
            address,
            lines,
            attribute_indices,
        };
        let i = self.dict.location_table.len() as i32;
        self.bytes += field_len(location.encoded_len());
        self.dict.location_table.push(location);
        self.locations.insert(frame, i);
        i
    }

    fn function(&mut self, name_strindex: i32, filename_strindex: i32) -> i32 {
        if let Some(i) = self.functions.get(&(name_strindex, filename_strindex)) {
            return *i;
        }
        let function = Function {
            name_strindex,
            system_name_strindex: name_strindex,
            filename_strindex,
            start_line: 0,
        };
        let i = self.dict.function_table.len() as i32;
        self.bytes += field_len(function.encoded_len());
        self.dict.function_table.push(function);
        self.functions.insert((name_strindex, filename_strindex), i);
        i
    }

    /// One mapping per object, covering every address (locations carry file offsets), with
    /// its build id; kernel frames share a `[kernel.kallsyms]` mapping.
    fn mapping(&mut self, object: Option<ObjectId>, symbols: &mut dyn Symbols) -> i32 {
        if let Some(i) = self.mappings.get(&object) {
            return *i;
        }
        let (path, build_id) = match object {
            Some(id) => {
                let info = symbols.object(id);
                (info.path.to_owned(), info.build_id.map(build_id_attribute))
            }
            None => ("[kernel.kallsyms]".to_owned(), None),
        };
        let filename_strindex = self.string(&path);
        let attribute_indices = build_id
            .map(|(key, value)| vec![self.attribute(key, AttrValue::Str(value))])
            .unwrap_or_default();
        let mapping = Mapping {
            memory_start: 0,
            memory_limit: u64::MAX,
            file_offset: 0,
            filename_strindex,
            attribute_indices,
        };
        let i = self.dict.mapping_table.len() as i32;
        self.bytes += field_len(mapping.encoded_len());
        self.dict.mapping_table.push(mapping);
        self.mappings.insert(object, i);
        i
    }
}

/// The semantic-conventions attribute for a build id. The object store keeps GNU build ids
/// (binary, usually a 20-byte SHA-1) and, for Go binaries without a GNU note, Go's own build id
/// (printable text such as `abc.../def...`): the latter is written as the text it is.
fn build_id_attribute(id: &[u8]) -> (&'static str, String) {
    let textual = id.len() > 32 && id.iter().all(|b| b.is_ascii_graphic());
    if textual {
        (
            "process.executable.build_id.go",
            String::from_utf8_lossy(id).into_owned(),
        )
    } else {
        ("process.executable.build_id.gnu", crate::context::hex(id))
    }
}

/// Serialized request.
pub fn encode(request: &ExportProfilesServiceRequest) -> Vec<u8> {
    request.encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{context::TraceContext, symbolize::SourceLine};

    /// Frames named after their address; objects named `/obj/<id>` with a build id of `id`.
    struct FakeSymbols {
        build_ids: Vec<Vec<u8>>,
    }

    impl Symbols for FakeSymbols {
        fn frame(&mut self, frame: Frame) -> Arc<SymbolizedFrame> {
            let (address, inlined) = match frame {
                Frame::User { address, .. } => (address, address % 2 == 1),
                Frame::Kernel { address } => (address, false),
            };
            let mut lines = vec![SourceLine {
                function: format!("fn_{address:x}").into(),
                file: Some("main.c".into()),
                line: address as u32,
            }];
            if inlined {
                lines.insert(
                    0,
                    SourceLine {
                        function: format!("inlined_{address:x}").into(),
                        file: None,
                        line: 0,
                    },
                );
            }
            Arc::new(SymbolizedFrame {
                lines,
                resolved: true,
            })
        }

        fn object(&self, id: ObjectId) -> ObjectInfo<'_> {
            ObjectInfo {
                path: ["/usr/bin/app", "/lib/libc.so.6"][id.0 as usize % 2],
                build_id: self.build_ids.get(id.0 as usize).map(Vec::as_slice),
            }
        }
    }

    fn symbols() -> FakeSymbols {
        FakeSymbols {
            build_ids: vec![
                vec![0xab; 20],
                b"goBuildId0123456789/abcdefghijklmnopqrstuvwxyz".to_vec(),
            ],
        }
    }

    fn user(object: u32, address: u64) -> Frame {
        Frame::User {
            object: ObjectId(object),
            address,
        }
    }

    fn context(trace: u8, span: u8) -> TraceContext {
        TraceContext {
            trace_id: [trace; 16],
            span_id: [span; 8],
            sampled: true,
            labels: Arc::new([("http.route".into(), "/cart".into())]),
        }
    }

    fn options(max_request_bytes: usize) -> EncodeOptions {
        EncodeOptions {
            frequency_hz: 100,
            window: (1_000, 11_000),
            host_name: Some("host-1".into()),
            max_request_bytes,
        }
    }

    /// Two processes; pid 10 with a traced and an untraced sample, pid 20 with one sample.
    fn aggregate() -> Aggregate {
        let mut agg = Aggregate::default();
        let stack = vec![
            Frame::Kernel {
                address: 0xffff_0001,
            },
            user(0, 0x10),
            user(0, 0x21),
        ];
        agg.add(10, 11, stack.clone(), None, 2_000);
        agg.add(10, 11, stack.clone(), None, 1_500);
        agg.add(10, 12, stack.clone(), Some(&context(0xaa, 1)), 3_000);
        agg.add(20, 20, vec![user(1, 0x30)], None, 900);
        agg.set_thread_name(11, "main");
        agg.set_thread_name(12, "worker-0");
        agg.set_thread_name(20, "other");
        agg.process_names.insert(10, "app".into());
        agg.process_names.insert(20, "other".into());
        agg.process_details.insert(
            10,
            Arc::new(ProcessDetails {
                exe_name: "app".into(),
                exe_path: Some("/usr/bin/app".into()),
                env_service_name: Some("checkout".into()),
                container_id: Some("c0ffee".into()),
                resource_attributes: vec![
                    ("deployment.environment.name".into(), "prod".into()),
                    ("host.name".into(), "published-host".into()),
                ],
                ..Default::default()
            }),
        );
        agg.process_details.insert(
            20,
            Arc::new(ProcessDetails {
                exe_name: "other".into(),
                pod: Some(crate::profile::PodDetails {
                    namespace: "shop".into(),
                    name: "storefront-7d9f-x2".into(),
                    container: Some("web".into()),
                    app_name: Some("storefront".into()),
                    attributes: vec![
                        ("k8s.namespace.name".into(), "shop".into()),
                        ("k8s.pod.name".into(), "storefront-7d9f-x2".into()),
                        ("k8s.deployment.name".into(), "storefront".into()),
                        ("k8s.container.name".into(), "web".into()),
                        ("container.id".into(), "beef".into()),
                    ],
                }),
                ..Default::default()
            }),
        );
        agg
    }

    fn round_trip(agg: &Aggregate, max: usize) -> Vec<(ExportProfilesServiceRequest, usize, u64)> {
        build_requests(agg, &options(max), &mut symbols())
            .into_iter()
            .map(|built| {
                let bytes = encode(&built.request);
                let decoded = ExportProfilesServiceRequest::decode(bytes.as_slice()).unwrap();
                assert_eq!(decoded, built.request);
                (decoded, bytes.len(), built.samples)
            })
            .collect()
    }

    fn attrs(kvs: &[KeyValue]) -> BTreeMap<String, Value> {
        kvs.iter()
            .map(|kv| (kv.key.clone(), kv.value.clone().unwrap().value.unwrap()))
            .collect()
    }

    fn str_value(v: &Value) -> &str {
        match v {
            Value::StringValue(s) => s,
            other => panic!("not an inline string: {other:?}"),
        }
    }

    #[test]
    fn round_trip_with_links_resources_and_tables() {
        let requests = round_trip(&aggregate(), 4 << 20);
        assert_eq!(requests.len(), 1);
        let (req, _, samples) = &requests[0];
        assert_eq!(*samples, 4);
        let dict = req.dictionary.as_ref().unwrap();
        let s = |i: i32| dict.string_table[i as usize].as_str();
        assert_eq!(req.resource_profiles.len(), 2);

        let app = &req.resource_profiles[0];
        let a = attrs(&app.resource.as_ref().unwrap().attributes);
        assert_eq!(str_value(&a["service.name"]), "checkout");
        assert_eq!(a["process.pid"], Value::IntValue(10));
        assert_eq!(str_value(&a["process.executable.name"]), "app");
        assert_eq!(str_value(&a["process.executable.path"]), "/usr/bin/app");
        assert_eq!(str_value(&a["container.id"]), "c0ffee");
        assert_eq!(str_value(&a["host.name"]), "published-host");
        assert_eq!(str_value(&a["deployment.environment.name"]), "prod");
        let other = attrs(
            &req.resource_profiles[1]
                .resource
                .as_ref()
                .unwrap()
                .attributes,
        );
        // No process context, no OTEL_SERVICE_NAME: the pod's app.kubernetes.io/name.
        assert_eq!(str_value(&other["service.name"]), "storefront");
        assert_eq!(str_value(&other["host.name"]), "host-1");
        assert_eq!(str_value(&other["container.id"]), "beef");
        assert_eq!(str_value(&other["k8s.namespace.name"]), "shop");
        assert_eq!(str_value(&other["k8s.pod.name"]), "storefront-7d9f-x2");
        assert_eq!(str_value(&other["k8s.deployment.name"]), "storefront");
        assert_eq!(str_value(&other["k8s.container.name"]), "web");

        let profile = &app.scope_profiles[0].profiles[0];
        let vt = |v: &Option<ValueType>| {
            let v = v.as_ref().unwrap();
            format!("{}/{}", s(v.type_strindex), s(v.unit_strindex))
        };
        assert_eq!(vt(&profile.sample_type), "samples/count");
        assert_eq!(vt(&profile.period_type), "cpu/nanoseconds");
        assert_eq!(profile.period, 10_000_000);
        // The window stretches to the sample that arrived before it started.
        assert_eq!(profile.time_unix_nano, 1_000);
        assert_eq!(profile.duration_nano, 10_000);
        assert_eq!(
            req.resource_profiles[1].scope_profiles[0].profiles[0].time_unix_nano,
            900
        );

        // Timestamps only, sorted, within the window; the traced sample links to its trace.
        assert_eq!(profile.samples.len(), 2);
        let untraced = &profile.samples[0];
        assert!(untraced.values.is_empty());
        assert_eq!(untraced.timestamps_unix_nano, vec![1_500, 2_000]);
        assert_eq!(untraced.link_index, 0);
        let traced = &profile.samples[1];
        let link = &dict.link_table[traced.link_index as usize];
        assert_eq!(
            (link.trace_id.as_slice(), link.span_id.as_slice()),
            (&[0xaa; 16][..], &[1; 8][..])
        );
        for sample in &profile.samples {
            for t in &sample.timestamps_unix_nano {
                assert!(
                    (profile.time_unix_nano..profile.time_unix_nano + profile.duration_nano)
                        .contains(t)
                );
            }
        }

        // Thread attributes and the context's labels, inline values, unique keys.
        let sample_attrs = |sample: &Sample| {
            sample
                .attribute_indices
                .iter()
                .map(|i| {
                    let kv = &dict.attribute_table[*i as usize];
                    (
                        s(kv.key_strindex).to_owned(),
                        kv.value.clone().unwrap().value.unwrap(),
                    )
                })
                .collect::<BTreeMap<_, _>>()
        };
        let t = sample_attrs(traced);
        assert_eq!(t["thread.id"], Value::IntValue(12));
        assert_eq!(str_value(&t["thread.name"]), "worker-0");
        assert_eq!(str_value(&t["http.route"]), "/cart");
        assert_eq!(sample_attrs(untraced).len(), 2);

        // Stack: leaf first; the inlined function comes before its caller in one location.
        let stack = &dict.stack_table[untraced.stack_index as usize];
        let names: Vec<Vec<&str>> = stack
            .location_indices
            .iter()
            .map(|l| {
                dict.location_table[*l as usize]
                    .lines
                    .iter()
                    .map(|line| s(dict.function_table[line.function_index as usize].name_strindex))
                    .collect()
            })
            .collect();
        assert_eq!(
            names,
            vec![
                vec!["fn_ffff0001"],
                vec!["fn_10"],
                vec!["inlined_21", "fn_21"]
            ]
        );
        let kernel = &dict.location_table[stack.location_indices[0] as usize];
        assert_eq!(
            s(dict.mapping_table[kernel.mapping_index as usize].filename_strindex),
            "[kernel.kallsyms]"
        );
        let frame_type = &dict.attribute_table[kernel.attribute_indices[0] as usize];
        assert_eq!(s(frame_type.key_strindex), "profile.frame.type");

        // Build ids on mappings.
        let build_ids: BTreeMap<&str, String> = dict
            .mapping_table
            .iter()
            .flat_map(|m| m.attribute_indices.iter())
            .map(|i| {
                let kv = &dict.attribute_table[*i as usize];
                (
                    s(kv.key_strindex),
                    str_value(kv.value.as_ref().unwrap().value.as_ref().unwrap()).to_owned(),
                )
            })
            .collect();
        assert_eq!(
            build_ids["process.executable.build_id.gnu"],
            "ab".repeat(20)
        );
        assert_eq!(
            build_ids["process.executable.build_id.go"],
            "goBuildId0123456789/abcdefghijklmnopqrstuvwxyz"
        );
    }

    #[test]
    fn index_zero_is_the_zero_value_in_every_table() {
        let (req, _, _) = &round_trip(&aggregate(), 4 << 20)[0];
        let d = req.dictionary.as_ref().unwrap();
        assert_eq!(d.string_table[0], "");
        assert_eq!(d.mapping_table[0], Mapping::default());
        assert_eq!(d.location_table[0], Location::default());
        assert_eq!(d.function_table[0], Function::default());
        assert_eq!(d.link_table[0], Link::default(), "link 0 is the empty link");
        assert_eq!(d.attribute_table[0], KeyValueAndUnit::default());
        assert_eq!(d.stack_table[0], Stack::default());
        // Every other link is a full trace id and span id; nothing is duplicated.
        assert!(
            d.link_table[1..]
                .iter()
                .all(|l| l.trace_id.len() == 16 && l.span_id.len() == 8)
        );
        let mut strings = d.string_table.clone();
        strings.sort();
        strings.dedup();
        assert_eq!(strings.len(), d.string_table.len());
    }

    #[test]
    fn attribute_values_are_inline() {
        let (req, _, _) = &round_trip(&aggregate(), 4 << 20)[0];
        let d = req.dictionary.as_ref().unwrap();
        let inline = |v: &Option<AnyValue>| {
            matches!(
                v.as_ref().and_then(|v| v.value.as_ref()),
                Some(Value::StringValue(_) | Value::IntValue(_))
            )
        };
        assert!(d.attribute_table[1..].iter().all(|kv| inline(&kv.value)));
        for rp in &req.resource_profiles {
            for kv in &rp.resource.as_ref().unwrap().attributes {
                assert!(!kv.key.is_empty() && kv.key_strindex == 0, "{kv:?}");
                assert!(inline(&kv.value), "{kv:?}");
            }
        }
    }

    #[test]
    fn splits_under_a_small_cap_each_part_with_its_own_dictionary() {
        let mut agg = Aggregate::default();
        for pid in 1..=6u32 {
            for depth in 0..20u64 {
                let stack: Vec<Frame> = (0..=depth)
                    .map(|i| user(0, pid as u64 * 1000 + i * 2))
                    .collect();
                let context = context(pid as u8, depth as u8);
                agg.add(pid, pid, stack, Some(&context), 5_000 + depth);
            }
        }
        let whole = round_trip(&agg, 4 << 20);
        assert_eq!(whole.len(), 1);
        let whole_size = whole[0].1;
        let cap = whole_size / 4;
        let parts = round_trip(&agg, cap);
        assert!(
            parts.len() >= 4,
            "{} parts of {whole_size} bytes under {cap}",
            parts.len()
        );
        let mut samples = 0;
        let mut links = std::collections::BTreeSet::new();
        for (req, size, n) in &parts {
            assert!(*size <= cap, "{size} > {cap}");
            samples += n;
            let d = req.dictionary.as_ref().unwrap();
            // Self-contained: every index points into this request's own tables.
            for rp in &req.resource_profiles {
                for sample in &rp.scope_profiles[0].profiles[0].samples {
                    let stack = &d.stack_table[sample.stack_index as usize];
                    assert!(!stack.location_indices.is_empty());
                    for l in &stack.location_indices {
                        let loc = &d.location_table[*l as usize];
                        assert!(!loc.lines.is_empty());
                    }
                    links.insert(d.link_table[sample.link_index as usize].trace_id.clone());
                }
            }
            assert_eq!(d.link_table[0], Link::default());
        }
        assert_eq!(samples, 6 * 20);
        assert_eq!(links.len(), 6);
    }

    #[test]
    fn samples_with_the_same_identity_merge() {
        let mut agg = Aggregate::default();
        let stack = vec![user(0, 0x10)];
        let mut unsampled = context(0xaa, 1);
        unsampled.sampled = false;
        unsampled.labels = Arc::new([("http.route".into(), "/cart".into())]);
        agg.add(1, 1, stack.clone(), Some(&context(0xaa, 1)), 10);
        agg.add(1, 1, stack, Some(&unsampled), 20);
        let (req, _, samples) = &round_trip(&agg, 4 << 20)[0];
        let profile = &req.resource_profiles[0].scope_profiles[0].profiles[0];
        assert_eq!(*samples, 2);
        assert_eq!(profile.samples.len(), 1);
        assert_eq!(profile.samples[0].timestamps_unix_nano.len(), 2);
    }
}
