//! Synthetic per-trace profiles, for measuring the store (`profiler-agent bench-store`) at a
//! scale no fixture reaches quickly. They have the shape of `trace_to_pprof`'s output for a
//! request of a service with deep stacks: [`SAMPLES`] samples at 99 Hz (about half a second
//! of CPU) over up to [`STACKS`] distinct stacks [`DEPTH`] frames deep, drawn from a
//! [`FUNCTIONS`]-name pool of one binary, on two threads and three spans, with the labels the
//! agent writes.

use std::collections::HashMap;

use super::pprof_proto as pb;
use crate::context::hex;

pub const SAMPLES: u32 = 50;
pub const STACKS: u32 = 20;
pub const DEPTH: u32 = 30;
pub const FUNCTIONS: u32 = 400;

/// A deterministic pseudo-random sequence (xorshift64*), so runs are comparable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u32) -> u32 {
        (self.next() % u64::from(n.max(1))) as u32
    }
}

#[derive(Default)]
struct Strings {
    table: Vec<String>,
    index: HashMap<String, i64>,
}

impl Strings {
    fn get(&mut self, s: &str) -> i64 {
        if let Some(i) = self.index.get(s) {
            return *i;
        }
        let i = self.table.len() as i64;
        self.table.push(s.to_owned());
        self.index.insert(s.to_owned(), i);
        i
    }
}

/// The profile of trace `trace_id` whose first sample is at `start_unix_ns`; `seed` varies the
/// stacks between traces.
pub fn trace_profile(trace_id: [u8; 16], start_unix_ns: u64, seed: u64) -> pb::Profile {
    let mut rng = Rng(seed | 1);
    let mut s = Strings::default();
    s.get("");
    let period = 1_000_000_000 / 99;
    let samples_type = pb::ValueType {
        r#type: s.get("samples"),
        unit: s.get("count"),
    };
    let cpu = pb::ValueType {
        r#type: s.get("cpu"),
        unit: s.get("nanoseconds"),
    };
    let mapping = pb::Mapping {
        id: 1,
        memory_limit: u64::MAX,
        filename: s.get("/usr/local/bin/checkout-service"),
        build_id: s.get("5f0c6a1e9b2d4c3a8e7f60112233445566778899"),
        has_functions: true,
        has_filenames: true,
        has_line_numbers: true,
        has_inline_frames: true,
        ..Default::default()
    };
    let mut profile = pb::Profile {
        sample_type: vec![samples_type, cpu.clone()],
        period_type: Some(cpu.clone()),
        period,
        default_sample_type: cpu.r#type,
        time_nanos: start_unix_ns as i64,
        duration_nanos: i64::from(SAMPLES) * period,
        mapping: vec![mapping],
        ..Default::default()
    };
    let trace = hex(&trace_id);
    let mut locations: HashMap<u32, u64> = HashMap::new();
    for stack in 0..STACKS.min(SAMPLES) {
        let count = if stack == 0 {
            i64::from(SAMPLES - STACKS.min(SAMPLES) + 1)
        } else {
            1
        };
        // Stacks share their root half (the request path) and differ towards the leaf.
        let ids: Vec<u64> = (0..DEPTH)
            .map(|level| {
                let function = if level >= DEPTH / 2 {
                    level
                } else {
                    DEPTH + rng.below(FUNCTIONS - DEPTH)
                };
                location(&mut profile, &mut s, &mut locations, function)
            })
            .collect();
        let span = hex(&[0xa0, 0, 0, 0, 0, 0, 0, (stack % 3) as u8]);
        let thread = if stack % 2 == 0 {
            "worker-0"
        } else {
            "worker-1"
        };
        let labels = [
            ("trace_id", Some(trace.as_str()), 0),
            ("span_id", Some(span.as_str()), 0),
            ("pid", None, 4242),
            ("tid", None, 4243 + i64::from(stack % 2)),
            ("thread_name", Some(thread), 0),
            ("process_name", Some("checkout"), 0),
            ("service_name", Some("checkout"), 0),
            ("http.route", Some("/api/cart/{id}"), 0),
        ];
        let label = labels
            .iter()
            .map(|(key, text, num)| pb::Label {
                key: s.get(key),
                str: text.map_or(0, |t| s.get(t)),
                num: *num,
                num_unit: 0,
            })
            .collect();
        profile.sample.push(pb::Sample {
            location_id: ids,
            value: vec![count, count * period],
            label,
        });
    }
    profile.string_table = s.table;
    profile
}

fn location(
    profile: &mut pb::Profile,
    s: &mut Strings,
    locations: &mut HashMap<u32, u64>,
    function: u32,
) -> u64 {
    if let Some(id) = locations.get(&function) {
        return *id;
    }
    let module = function % 23;
    let name = s.get(&format!(
        "checkout::module_{module}::Handler::process_step_{function}"
    ));
    let file = s.get(&format!("src/module_{module}.rs"));
    let function_id = profile.function.len() as u64 + 1;
    profile.function.push(pb::Function {
        id: function_id,
        name,
        system_name: name,
        filename: file,
        start_line: 0,
    });
    let id = profile.location.len() as u64 + 1;
    profile.location.push(pb::Location {
        id,
        mapping_id: 1,
        address: 0x10_000 + u64::from(function) * 0x40,
        line: vec![pb::Line {
            function_id,
            line: i64::from(10 + function % 300),
            column: 0,
        }],
        is_folded: false,
    });
    locations.insert(function, id);
    id
}

#[cfg(test)]
mod tests {
    #[test]
    fn has_the_documented_shape() {
        let p = super::trace_profile([1; 16], 5, 7);
        let stacks = super::super::render::Stacks::of(&p);
        assert_eq!(stacks.total_samples, u64::from(super::SAMPLES));
        assert!(stacks.folded.len() > 1);
        let depth = stacks.folded.keys().next().unwrap().split(';').count();
        assert_eq!(depth, super::DEPTH as usize + 1, "process root + frames");
    }
}
