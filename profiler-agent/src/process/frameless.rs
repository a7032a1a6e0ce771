//! Where a frame-pointer walk skips a caller, and what the sample holds to put it back.
//!
//! The kernel's user stack walk starts at the interrupted instruction and then follows the
//! frame-pointer chain. A function that has not pushed a frame leaves the frame pointer as its
//! caller set it, so the walk's second frame is the caller's caller: the direct caller of the
//! function doing the work is missing from the profile. That happens in whole functions (a
//! leaf the compiler gave no frame, assembly such as glibc's `memcpy` or Go's `memmove`) and at
//! every function's first instruction and its `ret`. There the return address is the word at
//! the stack pointer, which the sampler captures with every sample that has a user stack (in
//! kernel mode from the task's saved user registers: a system call's wrapper). Which
//! instructions are frameless is read from the binary's own unwind tables, once per binary:
//! `.eh_frame` (the canonical frame address is `rsp + 8`) and, for Go, which writes no
//! `.eh_frame` for its own code, the pclntab's `pcsp` table (0).

use std::{fs::File, ops::Range};

use foldhash::{HashMap, HashMapExt};
use gimli::UnwindSection as _;
use object::{Object as _, ObjectSection as _, read::ReadCache};

use super::objects::{Object, ObjectId};
use crate::{
    metrics::Metrics,
    symbolize::{gopclntab::LoadSegments, parse_gopclntab},
};

/// The frameless code of every object asked about.
#[derive(Default)]
pub struct FramelessCode {
    /// Sorted, disjoint file-offset ranges (u32: half the memory of a big binary's ~2 ranges
    /// per function; code past 4 GiB of a file is left out).
    by_object: HashMap<ObjectId, Vec<Range<u32>>>,
}

impl FramelessCode {
    pub fn new() -> Self {
        Self {
            by_object: HashMap::new(),
        }
    }

    /// Whether the instruction at `file_offset` of `object` runs with no frame of its own, so
    /// that its return address is the word at the stack pointer. False for objects without
    /// unwind tables.
    pub fn is_frameless(
        &mut self,
        id: ObjectId,
        object: &Object,
        file_offset: u64,
        metrics: &Metrics,
    ) -> bool {
        let ranges = self
            .by_object
            .entry(id)
            .or_insert_with(|| read_ranges(object, metrics));
        let Ok(offset) = u32::try_from(file_offset) else {
            return false;
        };
        let i = ranges.partition_point(|r| r.end <= offset);
        ranges.get(i).is_some_and(|r| r.contains(&offset))
    }
}

fn read_ranges(object: &Object, metrics: &Metrics) -> Vec<Range<u32>> {
    let Some(file) = object.file() else {
        return Vec::new();
    };
    let mut ranges = parse_gopclntab(object, metrics)
        .map(|table| table.frameless_ranges())
        .unwrap_or_default();
    ranges.extend(eh_frame_ranges(file, metrics).unwrap_or_default());
    let mut ranges: Vec<Range<u32>> = ranges
        .into_iter()
        .filter_map(|r| Some(u32::try_from(r.start).ok()?..u32::try_from(r.end).ok()?))
        .collect();
    ranges.sort_unstable_by_key(|r| r.start);
    // Overlaps (an FDE covering Go code, two FDEs for the same code) merge.
    let mut merged: Vec<Range<u32>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match merged.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    merged.shrink_to_fit();
    tracing::debug!(object = %object.name, ranges = merged.len(), "frameless code");
    merged
}

/// The file-offset ranges `.eh_frame` describes with the canonical frame address at `rsp + 8`:
/// nothing pushed, the return address at the stack pointer. A malformed entry is counted in
/// `eh_frame_errors`; one that breaks the entry list ends the walk with what was read before.
fn eh_frame_ranges(file: &File, metrics: &Metrics) -> Option<Vec<Range<u64>>> {
    let cache = ReadCache::new(file);
    let elf = object::File::parse(&cache).ok()?;
    let section = elf.section_by_name(".eh_frame")?;
    let eh_frame = gimli::EhFrame::new(section.data().ok()?, gimli::LittleEndian);
    let mut bases = gimli::BaseAddresses::default().set_eh_frame(section.address());
    if let Some(text) = elf.section_by_name(".text") {
        bases = bases.set_text(text.address());
    }
    let segments = LoadSegments::from_object(&elf);
    let mut context = Box::new(gimli::UnwindContext::new());
    let mut vaddrs: Vec<Range<u64>> = Vec::new();
    let mut entries = eh_frame.entries(&bases);
    loop {
        let entry = match entries.next() {
            Ok(Some(entry)) => entry,
            Ok(None) => break,
            Err(_) => {
                metrics.inc("eh_frame_errors");
                break;
            }
        };
        let gimli::CieOrFde::Fde(partial) = entry else {
            continue;
        };
        let Ok(fde) =
            partial.parse(|section, bases, offset| section.cie_from_offset(bases, offset))
        else {
            metrics.inc("eh_frame_errors");
            continue;
        };
        let Ok(mut rows) = fde.rows(&eh_frame, &bases, &mut context) else {
            metrics.inc("eh_frame_errors");
            continue;
        };
        while let Ok(Some(row)) = rows.next_row() {
            let frameless = matches!(
                row.cfa(),
                gimli::CfaRule::RegisterAndOffset { register, offset: 8 }
                    if *register == gimli::X86_64::RSP
            );
            if !frameless {
                continue;
            }
            let pcs = row.start_address()..row.end_address();
            match vaddrs.last_mut() {
                Some(last) if last.end == pcs.start => last.end = pcs.end,
                _ => vaddrs.push(pcs),
            }
        }
    }
    Some(
        vaddrs
            .into_iter()
            .filter_map(|r| segments.vaddr_range_to_file_offsets(r))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::objects::{ObjectKey, ObjectStore};

    /// This test binary's own `.eh_frame` (Rust emits one for every function): frameless at a
    /// function's first instruction, before its prologue pushes anything.
    #[test]
    fn function_entries_are_frameless_in_eh_frame() {
        let metrics = Metrics::default();
        let mut objects = ObjectStore::new(4, metrics.clone());
        let exe = std::env::current_exe().unwrap();
        let id = objects
            .file_object(
                ObjectKey::Pseudo("self".into()),
                "self",
                std::slice::from_ref(&exe),
            )
            .unwrap();
        let ranges = read_ranges(objects.get(id), &metrics);
        assert!(ranges.len() > 100, "{} ranges", ranges.len());
        assert!(ranges.windows(2).all(|w| w[0].end <= w[1].start));
        // Every range lies in the file.
        let size = std::fs::metadata(&exe).unwrap().len();
        assert!(
            ranges
                .iter()
                .all(|r| r.start < r.end && u64::from(r.end) <= size)
        );
        let mut code = FramelessCode::new();
        let first = u64::from(ranges[0].start);
        assert!(code.is_frameless(id, objects.get(id), first, &metrics));
        // Merged ranges leave a gap: the instruction after the first range has a frame.
        let after = u64::from(ranges[0].end);
        assert!(!code.is_frameless(id, objects.get(id), after, &metrics));
    }
}
