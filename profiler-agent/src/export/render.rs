//! Human-facing views of a symbolized pprof profile: folded stacks, a top-functions table and
//! a flame graph SVG (inferno). They work from the profile alone, with no symbolizer, so a
//! stored profile can be rendered after its processes (and the agent) are gone.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
    io::{self, Write},
};

use super::pprof_proto as pb;

/// A profile's stacks as function names, with the sample counts.
pub struct Stacks {
    /// Folded line (`root;caller;...;leaf`) → samples.
    pub folded: BTreeMap<String, u64>,
    pub total_samples: u64,
    /// CPU time of one sample, in ns (the profile's period).
    pub period_ns: i64,
}

impl Stacks {
    /// Reads the stacks of `profile`: root first, inlined functions expanded (outer first),
    /// the sample's process name as the root frame (as `record --format folded` does).
    pub fn of(profile: &pb::Profile) -> Self {
        let text = |i: i64| -> &str {
            usize::try_from(i)
                .ok()
                .and_then(|i| profile.string_table.get(i))
                .map_or("", String::as_str)
        };
        let functions: HashMap<u64, &str> = profile
            .function
            .iter()
            .map(|f| (f.id, text(f.name)))
            .collect();
        // Location id → its functions, innermost first (pprof's order).
        let locations: HashMap<u64, Vec<&str>> = profile
            .location
            .iter()
            .map(|l| {
                let names = l
                    .line
                    .iter()
                    .map(|line| functions.get(&line.function_id).copied().unwrap_or("?"))
                    .collect();
                (l.id, names)
            })
            .collect();
        let count_index = sample_count_index(profile);
        let mut folded = BTreeMap::new();
        let mut total = 0;
        for sample in &profile.sample {
            let count = sample.value.get(count_index).copied().unwrap_or(0).max(0) as u64;
            if count == 0 {
                continue;
            }
            let root = sample
                .label
                .iter()
                .find(|l| text(l.key) == "process_name" && l.str != 0)
                .map(|l| text(l.str))
                .unwrap_or("[process]");
            let mut line = root.replace(';', ":");
            for location in sample.location_id.iter().rev() {
                let names = locations.get(location).map(Vec::as_slice).unwrap_or(&[]);
                for name in names.iter().rev() {
                    line.push(';');
                    line.push_str(&name.replace(';', ":"));
                }
            }
            *folded.entry(line).or_default() += count;
            total += count;
        }
        Self {
            folded,
            total_samples: total,
            period_ns: profile.period,
        }
    }

    /// One `stack count` line per distinct stack, sorted (the input of flame graph tools).
    pub fn write_folded(&self, w: &mut (impl Write + ?Sized)) -> io::Result<()> {
        for (stack, count) in &self.folded {
            writeln!(w, "{stack} {count}")?;
        }
        Ok(())
    }

    /// Functions by self samples (flat) and by samples of stacks they appear in (cum).
    pub fn top(&self) -> Top {
        let mut flat: HashMap<&str, u64> = HashMap::new();
        let mut cum: HashMap<&str, u64> = HashMap::new();
        for (line, count) in &self.folded {
            // The first element is the process (root), not a function.
            let functions: Vec<&str> = line.split(';').skip(1).collect();
            if let Some(leaf) = functions.last() {
                *flat.entry(leaf).or_default() += count;
            }
            let distinct: HashSet<&str> = functions.iter().copied().collect();
            for f in distinct {
                *cum.entry(f).or_default() += count;
            }
        }
        let mut rows: Vec<TopRow> = cum
            .into_iter()
            .map(|(function, cum)| TopRow {
                function: function.to_owned(),
                flat: flat.get(function).copied().unwrap_or(0),
                cum,
            })
            .collect();
        rows.sort_by(|a, b| (b.flat, b.cum, &a.function).cmp(&(a.flat, a.cum, &b.function)));
        Top {
            rows,
            total_samples: self.total_samples,
            period_ns: self.period_ns,
            limit: usize::MAX,
        }
    }

    /// A flame graph of these stacks, as SVG. Fails on an empty profile.
    pub fn write_svg(&self, title: &str, w: impl Write) -> io::Result<()> {
        if self.folded.is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "no samples"));
        }
        let lines: Vec<String> = self
            .folded
            .iter()
            .map(|(stack, count)| format!("{stack} {count}"))
            .collect();
        let mut options = inferno::flamegraph::Options::default();
        options.title = title.to_owned();
        options.count_name = "samples".to_owned();
        // Colours from a hash of the name: the same function looks the same in every graph.
        options.hash = true;
        options.deterministic = true;
        inferno::flamegraph::from_lines(&mut options, lines.iter().map(String::as_str), w)
    }
}

/// Which value is the sample count: the `samples` sample type, else the first.
fn sample_count_index(profile: &pb::Profile) -> usize {
    profile
        .sample_type
        .iter()
        .position(|t| {
            usize::try_from(t.r#type)
                .ok()
                .and_then(|i| profile.string_table.get(i))
                .is_some_and(|s| s == "samples")
        })
        .unwrap_or(0)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopRow {
    pub function: String,
    pub flat: u64,
    pub cum: u64,
}

/// The top-functions table; `Display` prints it like `go tool pprof -top`.
#[derive(Debug, Clone)]
pub struct Top {
    pub rows: Vec<TopRow>,
    pub total_samples: u64,
    pub period_ns: i64,
    /// Rows shown by `Display`.
    pub limit: usize,
}

impl Top {
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }
}

impl fmt::Display for Top {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total = self.total_samples.max(1) as f64;
        let shown = self.rows.len().min(self.limit);
        writeln!(
            f,
            "{} samples, {:.2} s CPU; showing {} of {} functions",
            self.total_samples,
            self.total_samples as f64 * self.period_ns as f64 / 1e9,
            shown,
            self.rows.len()
        )?;
        writeln!(
            f,
            "{:>8} {:>7} {:>7} {:>8} {:>7}  function",
            "flat", "flat%", "sum%", "cum", "cum%"
        )?;
        let mut sum = 0;
        for row in self.rows.iter().take(shown) {
            sum += row.flat;
            writeln!(
                f,
                "{:>8} {:>6.2}% {:>6.2}% {:>8} {:>6.2}%  {}",
                row.flat,
                100.0 * row.flat as f64 / total,
                100.0 * sum as f64 / total,
                row.cum,
                100.0 * row.cum as f64 / total,
                row.function
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::pprof;

    /// A profile with two samples: main→work→leaf_a (3) and main→leaf_b (1).
    pub(crate) fn two_stacks() -> pb::Profile {
        let strings = [
            "",
            "samples",
            "count",
            "cpu",
            "nanoseconds",
            "main",
            "work",
            "leaf_a",
            "leaf_b",
            "process_name",
            "app",
        ];
        let function = |id: u64, name: i64| pb::Function {
            id,
            name,
            system_name: name,
            ..Default::default()
        };
        let location = |id: u64, function_id: u64| pb::Location {
            id,
            mapping_id: 0,
            address: id,
            line: vec![pb::Line {
                function_id,
                line: 0,
                column: 0,
            }],
            is_folded: false,
        };
        let label = pb::Label {
            key: 9,
            str: 10,
            ..Default::default()
        };
        pb::Profile {
            sample_type: vec![
                pb::ValueType { r#type: 1, unit: 2 },
                pb::ValueType { r#type: 3, unit: 4 },
            ],
            sample: vec![
                pb::Sample {
                    location_id: vec![3, 2, 1],
                    value: vec![3, 30],
                    label: vec![label.clone()],
                },
                pb::Sample {
                    location_id: vec![4, 1],
                    value: vec![1, 10],
                    label: vec![label],
                },
            ],
            function: vec![
                function(1, 5),
                function(2, 6),
                function(3, 7),
                function(4, 8),
            ],
            location: vec![
                location(1, 1),
                location(2, 2),
                location(3, 3),
                location(4, 4),
            ],
            string_table: strings.iter().map(|s| s.to_string()).collect(),
            period: 10,
            time_nanos: 1_000,
            duration_nanos: 100,
            ..Default::default()
        }
    }

    #[test]
    fn folded_top_and_svg() {
        let stacks = Stacks::of(&two_stacks());
        let mut folded = Vec::new();
        stacks.write_folded(&mut folded).unwrap();
        assert_eq!(
            String::from_utf8(folded).unwrap(),
            "app;main;leaf_b 1\napp;main;work;leaf_a 3\n"
        );
        let top = stacks.top();
        assert_eq!(top.rows[0].function, "leaf_a");
        assert_eq!((top.rows[0].flat, top.rows[0].cum), (3, 3));
        let main = top.rows.iter().find(|r| r.function == "main").unwrap();
        assert_eq!((main.flat, main.cum), (0, 4));
        let text = top.limit(2).to_string();
        assert!(text.starts_with("4 samples"), "{text}");
        assert!(text.contains("75.00%  leaf_a"), "{text}");
        assert!(!text.contains("  main"), "limited to 2 rows: {text}");
        let mut svg = Vec::new();
        stacks.write_svg("t", &mut svg).unwrap();
        let svg = String::from_utf8(svg).unwrap();
        assert!(svg.contains("<svg") && svg.contains("leaf_a"), "{svg}");
    }

    #[test]
    fn merge_sums_identical_samples_and_spans_both_windows() {
        let a = two_stacks();
        let mut b = two_stacks();
        b.time_nanos = 5_000;
        // The same functions and locations listed in another order: merged by content.
        b.function.reverse();
        b.location.reverse();
        let merged = pprof::merge(&[a, b]).unwrap();
        let stacks = Stacks::of(&merged);
        assert_eq!(stacks.total_samples, 8);
        assert_eq!(stacks.folded.len(), 2);
        assert_eq!(stacks.folded["app;main;work;leaf_a"], 6);
        assert_eq!(stacks.folded["app;main;leaf_b"], 2);
        assert_eq!(merged.sample.len(), 2, "identical samples summed");
        assert_eq!((merged.time_nanos, merged.duration_nanos), (1_000, 4_100));
        // Round trip through the wire format.
        let decoded = pprof::decode(&pprof::encode_gzip(&merged)).unwrap();
        assert_eq!(Stacks::of(&decoded).folded, stacks.folded);
    }

    #[test]
    fn merge_refuses_different_sample_types() {
        let a = two_stacks();
        let mut b = two_stacks();
        b.sample_type.truncate(1);
        assert!(pprof::merge(&[a, b]).is_err());
    }

    #[test]
    fn empty_profile_has_no_svg() {
        let stacks = Stacks::of(&pb::Profile::default());
        assert!(stacks.write_svg("t", Vec::new()).is_err());
    }
}
