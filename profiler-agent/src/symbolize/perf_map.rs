//! Names of JIT-compiled code from a process's perf map (`/tmp/perf-<pid>.map`), the
//! convention perf itself reads: one line per code region, `START SIZE name`, both numbers in
//! hex. Node.js (`--perf-basic-prof`), the JVM (`jcmd <pid> Compiler.perfmap`, or an agent),
//! CPython ≥ 3.12 (`-X perf`), .NET (`DOTNET_PerfMapEnabled=1`) and LuaJIT write one.
//!
//! Writers append as they compile, and a region freed by the JIT's garbage collector may be
//! reused by other code: the line written last wins. The file is read incrementally (only the
//! complete lines appended since the last read); a file that shrank was rewritten and is read
//! again from the start. No crate parses this format on its own (blazesym reads it only for a
//! live process it symbolizes by pid, which does not fit symbolizing after the process exited).

use std::{fs::File, os::unix::fs::FileExt as _};

/// Entries kept per map at most (~6 MiB with V8's names of ~70 bytes). A long-running JIT
/// appends without end (every re-optimization is a new line); past this, superseded entries
/// are dropped, then the oldest.
const MAX_ENTRIES: usize = 65_536;
/// Bytes read from one map per update at most (the rest waits for the next update, a second
/// later): a map of hundreds of megabytes is taken in slices, not into memory at once.
const MAX_READ: u64 = 4 << 20;
/// Longest name kept; longer ones are cut (Java signatures can be long).
const MAX_NAME: usize = 512;
/// Entries looked at below an address for one that contains it. Regions rarely overlap (only
/// when code was freed and the space reused), so the containing entry is one of the nearest.
const LOOKBACK: usize = 16;

#[derive(Debug, Clone, Copy)]
struct Entry {
    start: u64,
    end: u64,
    /// Line order: the higher wins where entries overlap.
    seq: u64,
    name: (u32, u32),
}

/// What one [`PerfMap::update`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Update {
    /// The file was rewritten from its start: every name looked up before may be stale.
    pub rewritten: bool,
    /// The regions of the lines read: the names of addresses inside them may have changed.
    pub new_regions: Vec<(u64, u64)>,
    pub lines: u64,
    /// Lines that were not `START SIZE name`.
    pub malformed: u64,
    /// Entries dropped to stay within [`MAX_ENTRIES`].
    pub dropped: u64,
}

pub struct PerfMap {
    file: std::sync::Arc<File>,
    /// Sorted by `(start, seq)`.
    entries: Vec<Entry>,
    names: Vec<u8>,
    /// Bytes of the file consumed: up to the end of the last complete line read.
    consumed: u64,
    next_seq: u64,
}

impl PerfMap {
    pub fn new(file: std::sync::Arc<File>) -> Self {
        Self {
            file,
            entries: Vec::new(),
            names: Vec::new(),
            consumed: 0,
            next_seq: 0,
        }
    }

    /// Reads the lines appended since the last call (all of them when the file was rewritten).
    pub fn update(&mut self) -> std::io::Result<Update> {
        let len = self.file.metadata()?.len();
        let mut update = Update::default();
        if len < self.consumed {
            self.entries.clear();
            self.names.clear();
            self.consumed = 0;
            update.rewritten = true;
        }
        if len == self.consumed {
            return Ok(update);
        }
        let want = (len - self.consumed).min(MAX_READ);
        let mut buf = vec![0u8; want as usize];
        let read = read_at_most(&self.file, &mut buf, self.consumed)?;
        buf.truncate(read);
        // Only complete lines: a writer may be in the middle of one.
        let Some(last_newline) = buf.iter().rposition(|&b| b == b'\n') else {
            if read as u64 == MAX_READ {
                // One "line" longer than anything a writer produces: skip it.
                self.consumed += MAX_READ;
                update.malformed += 1;
            }
            return Ok(update);
        };
        let before = self.entries.len();
        for line in buf[..last_newline].split(|&b| b == b'\n') {
            if line.is_empty() {
                continue;
            }
            update.lines += 1;
            match parse_line(line) {
                Some((start, size, name)) => {
                    self.push(start, size, name);
                    update.new_regions.push((start, start.saturating_add(size)));
                }
                None => update.malformed += 1,
            }
        }
        self.consumed += last_newline as u64 + 1;
        if self.entries.len() != before {
            self.entries.sort_by_key(|e| (e.start, e.seq));
            update.dropped = self.bound();
        }
        Ok(update)
    }

    fn push(&mut self, start: u64, size: u64, name: &[u8]) {
        let name = &name[..name.len().min(MAX_NAME)];
        let Ok(offset) = u32::try_from(self.names.len()) else {
            return;
        };
        self.names.extend_from_slice(name);
        self.entries.push(Entry {
            start,
            end: start.saturating_add(size),
            seq: self.next_seq,
            name: (offset, name.len() as u32),
        });
        self.next_seq += 1;
    }

    /// Keeps at most [`MAX_ENTRIES`]: first drops entries another one with the same start
    /// superseded, then the oldest. Returns how many went.
    fn bound(&mut self) -> u64 {
        if self.entries.len() <= MAX_ENTRIES {
            return 0;
        }
        let before = self.entries.len();
        // Sorted by (start, seq): of each run of equal starts, the last is the live one.
        let mut kept: Vec<Entry> = Vec::with_capacity(before);
        for e in self.entries.drain(..) {
            match kept.last_mut() {
                Some(last) if last.start == e.start => *last = e,
                _ => kept.push(e),
            }
        }
        if kept.len() > MAX_ENTRIES {
            let mut by_age: Vec<u64> = kept.iter().map(|e| e.seq).collect();
            let cut = kept.len() - MAX_ENTRIES;
            let (_, oldest_kept, _) = by_age.select_nth_unstable(cut);
            let oldest_kept = *oldest_kept;
            kept.retain(|e| e.seq >= oldest_kept);
        }
        // The names of dropped entries stay in `names` until it is rebuilt here.
        let mut names = Vec::with_capacity(self.names.len() / 2);
        for e in &mut kept {
            let (offset, len) = (e.name.0 as usize, e.name.1 as usize);
            let new_offset = names.len() as u32;
            names.extend_from_slice(&self.names[offset..offset + len]);
            e.name.0 = new_offset;
        }
        self.names = names;
        self.entries = kept;
        (before - self.entries.len()) as u64
    }

    /// The name of the code at `address`: of the entries that contain it, the last written.
    pub fn lookup(&self, address: u64) -> Option<&str> {
        let end = self.entries.partition_point(|e| e.start <= address);
        let best = self.entries[end.saturating_sub(LOOKBACK)..end]
            .iter()
            .filter(|e| address < e.end)
            .max_by_key(|e| e.seq)?;
        let (offset, len) = (best.name.0 as usize, best.name.1 as usize);
        std::str::from_utf8(&self.names[offset..offset + len]).ok()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

fn read_at_most(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// `START SIZE name`: hex numbers (an optional `0x` prefix tolerated), the name is the rest of
/// the line and may hold spaces. Names that are not UTF-8 are rejected, as are empty regions.
fn parse_line(line: &[u8]) -> Option<(u64, u64, &[u8])> {
    let line = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    let (start, rest) = line.split_once(' ')?;
    let (size, name) = rest.split_once(' ')?;
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
    let (start, size) = (hex(start)?, hex(size)?);
    let name = name.trim();
    (size > 0 && !name.is_empty()).then_some((start, size, name.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{io::Write as _, sync::Arc};

    fn map_with(content: &str) -> (tempfile::NamedTempFile, PerfMap) {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(content.as_bytes()).unwrap();
        let map = PerfMap::new(Arc::new(file.reopen().unwrap()));
        (file, map)
    }

    #[test]
    fn names_addresses_inside_regions_only() {
        let (_f, mut map) = map_with(
            "7faca0005b80 130 JS:^burnJs /tmp/burn.js:1:16\n\
             7faca0006040 1e0 JS:*burnJs /tmp/burn.js:1:16\n\
             36c2fc78aaa6 2d Builtin:ArrayPrototypePush\n",
        );
        let update = map.update().unwrap();
        assert_eq!((update.lines, update.malformed), (3, 0));
        assert_eq!(update.new_regions.len(), 3);
        assert_eq!(
            map.lookup(0x7faca0005b80),
            Some("JS:^burnJs /tmp/burn.js:1:16")
        );
        assert_eq!(
            map.lookup(0x7faca0006040 + 0x1df),
            Some("JS:*burnJs /tmp/burn.js:1:16")
        );
        assert_eq!(map.lookup(0x7faca0006040 + 0x1e0), None, "end is exclusive");
        assert_eq!(map.lookup(0x7faca0005b80 + 0x130), None, "between regions");
        assert_eq!(
            map.lookup(0x36c2fc78aaa6 + 1),
            Some("Builtin:ArrayPrototypePush")
        );
        assert_eq!(map.lookup(0x10), None);
    }

    #[test]
    fn the_line_written_last_wins_where_code_was_replaced() {
        let (_f, mut map) = map_with(
            "1000 100 old_function\n\
             1000 100 new_function\n\
             0f80 200 overlapping_newest\n\
             2000 10 elsewhere\n",
        );
        map.update().unwrap();
        assert_eq!(map.lookup(0x1050), Some("overlapping_newest"));
        assert_eq!(map.lookup(0x0f90), Some("overlapping_newest"));
        assert_eq!(map.lookup(0x2005), Some("elsewhere"));
    }

    #[test]
    fn reads_appended_complete_lines_and_rereads_a_rewritten_file() {
        let (mut f, mut map) = map_with("1000 10 first\n2000 10 sec");
        map.update().unwrap();
        assert_eq!(map.lookup(0x1001), Some("first"));
        assert_eq!(map.lookup(0x2001), None, "an incomplete line waits");
        assert_eq!(map.update().unwrap(), Update::default(), "nothing new");
        f.write_all(b"ond\n3000 10 third\n").unwrap();
        let update = map.update().unwrap();
        assert_eq!(update.new_regions, [(0x2000, 0x2010), (0x3000, 0x3010)]);
        assert_eq!(map.lookup(0x2001), Some("second"));
        assert_eq!(map.lookup(0x3001), Some("third"));
        // Rewritten shorter (a JVM dumping its map again): read from the start.
        let file = f.as_file_mut();
        file.set_len(0).unwrap();
        file.write_all_at(b"4000 10 fourth\n", 0).unwrap();
        let update = map.update().unwrap();
        assert!(update.rewritten);
        assert_eq!(update.new_regions, [(0x4000, 0x4010)]);
        assert_eq!(map.lookup(0x1001), None);
        assert_eq!(map.lookup(0x4001), Some("fourth"));
    }

    #[test]
    fn garbage_lines_are_counted_not_fatal() {
        let (_f, mut map) = map_with(
            "not a map line\n\
             zz 10 bad_start\n\
             1000 0 empty_region\n\
             1000 10\n\
             \u{1}\u{2}\n\
             0x5000 0x20 prefixed ok\n",
        );
        let update = map.update().unwrap();
        assert_eq!((update.lines, update.malformed), (6, 5));
        assert_eq!(map.lookup(0x5001), Some("prefixed ok"));
        assert_eq!(map.len(), 1);
    }

    #[test]
    fn stays_bounded_dropping_superseded_then_oldest() {
        let mut content = String::new();
        // Every region written twice (re-optimized code), then more distinct ones than fit.
        for i in 0..10u64 {
            content.push_str(&format!("{:x} 10 stale_{i}\n", 0x1000 * (i + 1)));
            content.push_str(&format!("{:x} 10 live_{i}\n", 0x1000 * (i + 1)));
        }
        for i in 0..MAX_ENTRIES as u64 {
            content.push_str(&format!("{:x} 8 f{i}\n", 0x1_0000_0000 + 0x10 * i));
        }
        let (_f, mut map) = map_with(&content);
        let update = map.update().unwrap();
        assert_eq!(map.len(), MAX_ENTRIES);
        assert_eq!(update.dropped, 20);
        // The ten superseded went first, then the ten oldest live ones.
        assert_eq!(map.lookup(0x1001), None);
        assert_eq!(map.lookup(0x1_0000_0001), Some("f0"));
        let last = MAX_ENTRIES as u64 - 1;
        let last_name = format!("f{last}");
        assert_eq!(
            map.lookup(0x1_0000_0000 + 0x10 * last),
            Some(last_name.as_str())
        );
    }
}
