//! The kernel's per-process trace-context sources: the `CONTEXT_SOURCES` hash and its
//! direct-mapped copy `CONTEXT_SOURCE_SLOTS` (see `profiler_common::ContextSourceSlot`), which
//! the sampler reads first, inline, and which also records the processes found to have none.

use std::collections::HashSet;

use anyhow::Context as _;
use aya::maps::{Array, HashMap, MapData, MapError};
use profiler_common::{CONTEXT_SOURCE_SLOTS, ContextSource, ContextSourceSlot};

/// The only writer of both maps in user space: the hash first, then the process's slot. The
/// kernel's exec program drops a process's entries from both when it replaces its image, so
/// `tgids` and the slots' owners here may name entries that are gone: harmless, as a removal
/// of a missing key is ignored and a slot is always emptied before it is written.
pub struct ContextSourceMap {
    map: HashMap<MapData, u32, ContextSource>,
    /// The keys in `map`. Most processes never get a source, and a delete for each exit was a
    /// system call each, hundreds a second on a node busy starting processes.
    tgids: HashSet<u32>,
    slots: Slots<Array<MapData, ContextSourceSlot>>,
}

impl ContextSourceMap {
    /// Both maps as this load created them: empty (never pinned).
    pub(super) fn new(
        map: HashMap<MapData, u32, ContextSource>,
        slots: Array<MapData, ContextSourceSlot>,
    ) -> Self {
        Self {
            map,
            tgids: HashSet::new(),
            slots: Slots::new(slots),
        }
    }

    pub fn set(&mut self, tgid: u32, source: &ContextSource) -> anyhow::Result<()> {
        self.map
            .insert(tgid, source, 0)
            .with_context(|| format!("set the context source of {tgid}"))?;
        self.tgids.insert(tgid);
        self.slots.write(tgid, *source);
        Ok(())
    }

    /// The process was inspected and has no source: its samples need not look one up. Not
    /// undone at its exit: a process that reuses the id starts with no source either, until it
    /// is inspected and gets its own verdict.
    pub fn set_none(&mut self, tgid: u32) {
        self.slots.write(tgid, ContextSource::default());
    }

    /// The process exited or replaced its image: its source no longer applies.
    pub fn remove(&mut self, tgid: u32) {
        if self.tgids.remove(&tgid) {
            let _ = self.map.remove(&tgid);
            self.slots.release(tgid);
        }
    }
}

/// Writes one slot of the kernel's array.
trait SlotArray {
    fn write(&mut self, index: u32, slot: ContextSourceSlot) -> Result<(), MapError>;
}

impl SlotArray for Array<MapData, ContextSourceSlot> {
    fn write(&mut self, index: u32, slot: ContextSourceSlot) -> Result<(), MapError> {
        self.set(index, slot, 0)
    }
}

/// The slots and whose each one is, as last written (0: nobody's). A process takes its slot
/// from whoever had it (that process falls back to the hash). A slot is emptied before it gets
/// a new value, and the kernel copies a value front to back, owner last: a sampler that reads
/// the owner it expects reads the source written with it, never half of another's.
struct Slots<A> {
    array: A,
    owners: Vec<u32>,
}

impl<A: SlotArray> Slots<A> {
    fn new(array: A) -> Self {
        Self {
            array,
            owners: vec![0; CONTEXT_SOURCE_SLOTS as usize],
        }
    }

    fn write(&mut self, tgid: u32, source: ContextSource) {
        let index = slot_index(tgid);
        if self.owners[index] != 0 && !self.empty(index) {
            // Left as it was: still the previous owner's, whose source it holds.
            return;
        }
        let slot = ContextSourceSlot {
            source,
            tgid,
            _pad: 0,
        };
        match self.array.write(index as u32, slot) {
            Ok(()) => self.owners[index] = tgid,
            Err(e) => tracing::debug!(tgid, error = %e, "cannot write a context-source slot"),
        }
    }

    /// Empties the process's slot if it is still the process's.
    fn release(&mut self, tgid: u32) {
        let index = slot_index(tgid);
        if self.owners[index] == tgid {
            self.empty(index);
        }
    }

    fn empty(&mut self, index: usize) -> bool {
        match self.array.write(index as u32, ContextSourceSlot::default()) {
            Ok(()) => {
                self.owners[index] = 0;
                true
            }
            Err(e) => {
                tracing::debug!(index, error = %e, "cannot empty a context-source slot");
                false
            }
        }
    }
}

fn slot_index(tgid: u32) -> usize {
    (tgid % CONTEXT_SOURCE_SLOTS) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The writes the kernel array would get; writes fail while `failing`.
    #[derive(Default)]
    struct Recorded {
        writes: Vec<(u32, ContextSourceSlot)>,
        failing: bool,
    }

    impl SlotArray for Recorded {
        fn write(&mut self, index: u32, slot: ContextSourceSlot) -> Result<(), MapError> {
            if self.failing {
                return Err(MapError::OutOfBounds {
                    index,
                    max_entries: 0,
                });
            }
            self.writes.push((index, slot));
            Ok(())
        }
    }

    fn source(reader: u8) -> ContextSource {
        ContextSource {
            kind: 1,
            reader,
            ..Default::default()
        }
    }

    fn slot(tgid: u32, source: ContextSource) -> ContextSourceSlot {
        ContextSourceSlot {
            source,
            tgid,
            _pad: 0,
        }
    }

    const EMPTY: ContextSourceSlot = ContextSourceSlot {
        source: ContextSource {
            kind: 0,
            reader: 0,
            _pad: [0; 6],
            tls: profiler_common::TlsLocation {
                offset: 0,
                module_id: 0,
                dtv_offset: 0,
                dtv_entry_size: 0,
                _pad: 0,
            },
            go: profiler_common::GoRuntimeOffsets {
                g_m: 0,
                g_labels: 0,
                m_curg: 0,
                labels_format: 0,
                _pad: 0,
            },
        },
        tgid: 0,
        _pad: 0,
    };

    #[test]
    fn the_empty_slot_is_the_default() {
        assert_eq!(EMPTY, ContextSourceSlot::default());
    }

    #[test]
    fn a_slot_changes_owner_only_through_an_empty_slot() {
        let mut slots = Slots::new(Recorded::default());
        let (a, b) = (70, 70 + CONTEXT_SOURCE_SLOTS); // the same slot
        slots.write(a, source(1));
        assert_eq!(slots.array.writes, [(70, slot(a, source(1)))]);
        slots.write(b, ContextSource::default());
        assert_eq!(
            slots.array.writes[1..],
            [(70, EMPTY), (70, slot(b, ContextSource::default()))]
        );
        // The same owner with a new verdict: emptied first too.
        slots.write(b, source(2));
        assert_eq!(
            slots.array.writes[3..],
            [(70, EMPTY), (70, slot(b, source(2)))]
        );
    }

    #[test]
    fn only_the_owner_releases_its_slot() {
        let mut slots = Slots::new(Recorded::default());
        let (a, b) = (9, 9 + 2 * CONTEXT_SOURCE_SLOTS);
        slots.write(a, source(1));
        slots.write(b, source(4));
        let before = slots.array.writes.len();
        slots.release(a); // a lost the slot to b: nothing to undo
        assert_eq!(slots.array.writes.len(), before);
        slots.release(b);
        assert_eq!(slots.array.writes[before..], [(9, EMPTY)]);
        slots.release(b); // already empty
        assert_eq!(slots.array.writes.len(), before + 1);
    }

    #[test]
    fn a_slot_that_cannot_be_emptied_keeps_its_owner() {
        let mut slots = Slots::new(Recorded::default());
        slots.write(5, source(1));
        slots.array.failing = true;
        slots.write(5 + CONTEXT_SOURCE_SLOTS, source(2));
        slots.array.failing = false;
        // Still 5's: releasing 5 empties it, the newcomer never got it.
        slots.release(5 + CONTEXT_SOURCE_SLOTS);
        assert_eq!(slots.array.writes, [(5, slot(5, source(1)))]);
        slots.release(5);
        assert_eq!(slots.array.writes[1..], [(5, EMPTY)]);
    }
}
