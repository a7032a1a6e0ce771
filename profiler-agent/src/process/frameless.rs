//! Where a frame-pointer walk skips a caller, and what the sample holds to put it back.
//!
//! The kernel's user stack walk starts at the interrupted instruction and then follows the
//! frame-pointer chain. A function that has not pushed a frame (a Go leaf with no locals, the Go
//! runtime's assembly routines such as `memmove`, any Go function's entry before its prologue
//! and its `RET`) leaves the frame pointer as its caller set it, so the walk's second frame is
//! the caller's caller: the function that did the work's direct caller is missing from the
//! profile. Its return address is then the word at the stack pointer, which the Go label
//! readers capture with the sample. Which instructions are frameless is read from the binary's
//! own unwind table: for Go, the `pcsp` table of its pclntab, kept with symbols or without.

use std::{fs::File, ops::Range};

use foldhash::{HashMap, HashMapExt};
use object::read::ReadCache;

use super::objects::{Object, ObjectId};
use crate::{
    metrics::Metrics,
    symbolize::gopclntab::{GoPclntab, PclntabError},
};

/// The frameless code of every object asked about, read once per object.
#[derive(Default)]
pub struct FramelessCode {
    by_object: HashMap<ObjectId, Option<Vec<Range<u64>>>>,
}

impl FramelessCode {
    pub fn new() -> Self {
        Self {
            by_object: HashMap::new(),
        }
    }

    /// Whether the instruction at `file_offset` of `object` runs with no frame of its own, so
    /// that its return address is the word at the stack pointer. False for objects without an
    /// unwind table this reads (native code: its frameless leaves keep hiding their callers).
    pub fn is_frameless(
        &mut self,
        id: ObjectId,
        object: &Object,
        file_offset: u64,
        metrics: &Metrics,
    ) -> bool {
        let ranges = self.by_object.entry(id).or_insert_with(|| {
            object
                .file()
                .and_then(|f| read_go_ranges(f, object, metrics))
        });
        let Some(ranges) = ranges else { return false };
        let i = ranges.partition_point(|r| r.end <= file_offset);
        ranges.get(i).is_some_and(|r| r.contains(&file_offset))
    }
}

fn read_go_ranges(file: &File, object: &Object, metrics: &Metrics) -> Option<Vec<Range<u64>>> {
    match GoPclntab::parse(&ReadCache::new(file)) {
        Ok(table) => {
            let ranges = table.frameless_ranges();
            tracing::debug!(object = %object.name, ranges = ranges.len(), "Go frameless code");
            Some(ranges)
        }
        Err(PclntabError::NotFound) => None,
        Err(e) => {
            metrics.inc("gopclntab_parse_errors");
            tracing::debug!(object = %object.name, error = %e, "unreadable Go pclntab");
            None
        }
    }
}
