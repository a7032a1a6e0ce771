//! Folded stacks (`process;root;...;leaf count`), the input format of flame graph tools.

use std::fmt::Write as _;

use crate::{process::ObjectStore, profile::Aggregate, symbolize::Symbolizer};

/// One line per (process, thread, stack), root first; inlined functions are expanded, outer
/// function first. The process name is the root frame.
pub fn render(aggregate: &Aggregate, symbolizer: &mut Symbolizer, objects: &ObjectStore) -> String {
    let mut lines: std::collections::BTreeMap<String, u64> = Default::default();
    for (key, value) in aggregate.sorted_samples() {
        let mut line = aggregate
            .process_names
            .get(&key.pid)
            .cloned()
            .unwrap_or_else(|| format!("pid {}", key.pid));
        for frame in aggregate.stacks.get(key.stack).iter().rev() {
            let symbolized = symbolizer.get(*frame, objects);
            for l in symbolized.lines.iter().rev() {
                line.push(';');
                line.push_str(&l.function.replace(';', ":"));
            }
        }
        *lines.entry(line).or_default() += value.count;
    }
    let mut out = String::new();
    for (stack, count) in lines {
        let _ = writeln!(out, "{stack} {count}");
    }
    out
}
