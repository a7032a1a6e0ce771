//! Output formats. The only modules that know wire formats (pprof protobuf, folded text).

pub mod folded;
pub mod pprof;
pub mod pprof_proto;

use std::path::Path;

use anyhow::Context as _;

use crate::{process::ObjectStore, profile::Aggregate, symbolize::Symbolizer};
use pprof::{LabelValue, PprofBuilder};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// gzip-compressed pprof protobuf.
    Pprof,
    /// Folded stacks, one line per stack.
    Folded,
}

/// The whole aggregate as one pprof profile: labels pid, tid, thread and process names.
pub fn aggregate_to_pprof(
    aggregate: &Aggregate,
    frequency_hz: u64,
    window: (u64, u64),
    symbolizer: &mut Symbolizer,
    objects: &ObjectStore,
) -> pprof_proto::Profile {
    let (start, end) = window;
    let mut builder = PprofBuilder::new(
        frequency_hz,
        start,
        end.saturating_sub(start),
        symbolizer,
        objects,
    );
    for (key, value) in aggregate.sorted_samples() {
        let thread = aggregate
            .thread_names
            .get(&key.tid)
            .map(String::as_str)
            .unwrap_or("");
        let process = aggregate
            .process_names
            .get(&key.pid)
            .map(String::as_str)
            .unwrap_or("");
        builder.add_sample(
            aggregate.stacks.get(key.stack),
            value.count,
            &[
                ("pid", LabelValue::Num(i64::from(key.pid))),
                ("tid", LabelValue::Num(i64::from(key.tid))),
                ("thread_name", LabelValue::Str(thread)),
                ("process_name", LabelValue::Str(process)),
            ],
        );
    }
    builder.finish()
}

/// Writes the aggregate to `path` in `format`, atomically (temporary file, then rename).
pub fn write_file(
    path: &Path,
    format: Format,
    aggregate: &Aggregate,
    frequency_hz: u64,
    window: (u64, u64),
    symbolizer: &mut Symbolizer,
    objects: &ObjectStore,
) -> anyhow::Result<()> {
    let bytes = match format {
        Format::Pprof => pprof::encode_gzip(&aggregate_to_pprof(
            aggregate,
            frequency_hz,
            window,
            symbolizer,
            objects,
        )),
        Format::Folded => folded::render(aggregate, symbolizer, objects).into_bytes(),
    };
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))?;
    Ok(())
}
