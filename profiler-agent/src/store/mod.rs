//! The embedded store: per-trace profiles and per-process time buckets in one SQLite file, the
//! only module that knows its format.
//!
//! Why SQLite (rusqlite, library compiled in): in WAL mode one writer (the agent) and any number
//! of readers in other processes (`profiler-agent query`, `traces`) work at the same time, so
//! the CLI reads the live database without going through the agent. redb, the pure-Rust
//! alternative, locks its file for one process at a time. SQLite also gives indexes, atomic
//! batches, an integrity check and a format every machine has a tool (`sqlite3`) for.
//!
//! What is stored needs no symbolizer to read: every profile is a symbolized pprof (raw when
//! small, else gzip), so a query works after the processes and the agent are gone.
//!
//! - `trace_batches`: one row per write (the sink's 2 s batch): one symbolized profile of all
//!   its traces' samples, so the strings, functions and locations they share are stored once.
//!   A trace's part is the samples labelled [`PART_LABEL`] = its index; `live` counts the
//!   parts that name the batch, which goes with the last of them.
//! - `traces`: the index, one row per trace (times, samples, CPU, bytes, services), kept equal
//!   to the aggregate of its parts, with the processes it ran in (pid, process, service,
//!   Kubernetes namespace and pod; JSON), its span ids and its parts, all in the row: a new
//!   trace is one row appended and one random-key entry in the small `traces_by_id` index
//!   (each page a random key touches is a page the WAL rewrites). A part is an incarnation
//!   of the trace (see `TraceProfile::created_unix_ns`). `batch_parts` lists those in batches
//!   with their figures ([`BatchPart`]); `part_ids` the `trace_parts` rows of those written
//!   before schema 6, each with a profile of its own. A re-flush of the same incarnation (late
//!   samples, within the agent's late window) replaces its part; a new incarnation (after that
//!   window, or after a restart) adds one, and queries merge the parts. So late samples always
//!   merge into the stored trace.
//! - `buckets`: one row per process per agent interval with every sample of that interval
//!   (traced ones labelled `traced=true`, without their ids), for time-window flame graphs.
//!
//! Retention deletes the oldest traces and buckets by age and by the bytes the file uses
//! (`--retention`, `--store-max-bytes`), counted. A corrupt, foreign or locked file is a clear
//! error and is never rewritten or deleted.

mod bench;
mod read;
mod sink;
#[cfg(test)]
mod tests;
mod write;

use std::{
    fs::File,
    path::{Path, PathBuf},
    time::Duration,
};

use rusqlite::{Connection, ErrorCode, OpenFlags};

pub use bench::{BenchReport, bench};
pub use read::{
    ProcessRow, ServiceRow, StoreReader, StoreStats, TraceFilter, TraceSummary, Window,
};
pub use sink::StoreSink;
pub use write::{
    BucketRecord, Retention, RetentionOutcome, Store, TraceBatch, TraceProcess, TraceRecord,
};

/// `PRAGMA application_id` of a profiler store ("PRFL"): tells it from other SQLite files.
const APPLICATION_ID: i32 = 0x5052_464c;
/// `PRAGMA user_version`: the schema below.
const SCHEMA_VERSION: i32 = 7;
/// The oldest schema readers accept: version 6 keeps the parts written together in one
/// profile (`trace_batches`). Version 7 changed only how `traces` is laid out on disk, which
/// no query sees.
const MIN_READABLE_VERSION: i32 = 6;
/// The numeric sample label that tells the traces of a `trace_batches` profile apart: a part's
/// index in its batch (`BatchPart::index`). Readers cut a part out by it and drop it.
pub(crate) const PART_LABEL: &str = "store.part";
/// What brings a store of each older version to the next one (index 0: version 1 → 2). The
/// agent applies them when it opens the store; readers refuse an older schema until then.
const MIGRATIONS: &[&str] = &[
    // 2: the pod (Kubernetes) of every process, filterable.
    "ALTER TABLE trace_processes ADD COLUMN namespace TEXT NOT NULL DEFAULT '';
     ALTER TABLE trace_processes ADD COLUMN pod TEXT NOT NULL DEFAULT '';
     CREATE INDEX trace_processes_by_pod ON trace_processes (namespace, pod, trace_id);
     ALTER TABLE buckets ADD COLUMN namespace TEXT NOT NULL DEFAULT '';
     ALTER TABLE buckets ADD COLUMN pod TEXT NOT NULL DEFAULT '';",
    // 3: no secondary indexes on trace_processes and trace_spans. Every filter is checked
    // per trace with the primary key (trace_id, …) while the listing walks traces_by_last,
    // and each index cost a random-key B-tree insert per trace written.
    "DROP INDEX IF EXISTS trace_processes_by_service;
     DROP INDEX IF EXISTS trace_processes_by_pid;
     DROP INDEX IF EXISTS trace_processes_by_pod;
     DROP INDEX IF EXISTS trace_spans_by_span;",
    // 4: a trace's processes and spans in its `traces` row: a new trace dirtied four
    // random-key B-tree pages (traces, trace_parts' key, trace_processes, trace_spans), now
    // two. The primary keys give the rows in pid and span id order, as the agent writes them.
    "ALTER TABLE traces ADD COLUMN processes TEXT NOT NULL DEFAULT '[]';
     ALTER TABLE traces ADD COLUMN spans TEXT NOT NULL DEFAULT '';
     UPDATE traces SET
       processes = (SELECT json_group_array(json_object('pid', pid, 'process_name', process_name,
                      'service', service, 'namespace', namespace, 'pod', pod))
                    FROM trace_processes p WHERE p.trace_id = traces.trace_id),
       spans = coalesce((SELECT group_concat(lower(hex(span_id)), ' ')
                         FROM trace_spans s WHERE s.trace_id = traces.trace_id), '');
     DROP TABLE trace_processes;
     DROP TABLE trace_spans;",
    // 5: no (trace_id, part) key on trace_parts: its index cost a second random-key B-tree
    // insert per trace (about a third of the pages each commit wrote, in a store of 100,000
    // traces). The `traces` row lists its parts' row ids instead.
    "CREATE TABLE trace_parts_v5 (
       id INTEGER PRIMARY KEY, trace_id BLOB NOT NULL, part INTEGER NOT NULL,
       first_ns INTEGER NOT NULL, last_ns INTEGER NOT NULL, samples INTEGER NOT NULL,
       cpu_ns INTEGER NOT NULL, bytes INTEGER NOT NULL, profile BLOB NOT NULL);
     INSERT INTO trace_parts_v5 (trace_id, part, first_ns, last_ns, samples, cpu_ns, bytes,
       profile)
       SELECT trace_id, part, first_ns, last_ns, samples, cpu_ns, bytes, profile
       FROM trace_parts ORDER BY last_ns;
     DROP TABLE trace_parts;
     ALTER TABLE trace_parts_v5 RENAME TO trace_parts;
     CREATE INDEX migration_parts_by_trace ON trace_parts (trace_id, part);
     ALTER TABLE traces ADD COLUMN part_ids TEXT NOT NULL DEFAULT '';
     UPDATE traces SET part_ids = coalesce(
       (SELECT group_concat(id, ' ') FROM
          (SELECT id FROM trace_parts p WHERE p.trace_id = traces.trace_id ORDER BY part)),
       '');
     DROP INDEX migration_parts_by_trace;",
    // 6: the traces of one write share one profile (`trace_batches`), and a trace's parts in
    // a batch are listed in its `traces` row: a new trace is one row written, not two, and no
    // profile of its own (strings, functions and locations repeated in every trace were most
    // of the bytes each commit wrote). Older parts keep their `trace_parts` rows.
    "CREATE TABLE trace_batches (
       id INTEGER PRIMARY KEY, first_ns INTEGER NOT NULL, last_ns INTEGER NOT NULL,
       bytes INTEGER NOT NULL, live INTEGER NOT NULL, profile BLOB NOT NULL);
     ALTER TABLE traces ADD COLUMN batch_parts TEXT NOT NULL DEFAULT '';",
    // 7: `traces` is a rowid table: a new trace's row (~350 bytes with its processes) is
    // appended at the table's end and its random key goes to `traces_by_id`, whose ~30-byte
    // entries fill a tenth of the pages. Keyed by the trace id (WITHOUT ROWID), every new
    // trace rewrote a leaf of ten rows: a commit of 80 traces wrote ~80 pages of that table.
    "CREATE TABLE traces_v7 (
       id INTEGER PRIMARY KEY, trace_id BLOB NOT NULL, first_ns INTEGER NOT NULL,
       last_ns INTEGER NOT NULL, samples INTEGER NOT NULL, cpu_ns INTEGER NOT NULL,
       bytes INTEGER NOT NULL, parts INTEGER NOT NULL, services TEXT NOT NULL,
       processes TEXT NOT NULL DEFAULT '[]', spans TEXT NOT NULL DEFAULT '',
       part_ids TEXT NOT NULL DEFAULT '', batch_parts TEXT NOT NULL DEFAULT '');
     INSERT INTO traces_v7 (trace_id, first_ns, last_ns, samples, cpu_ns, bytes, parts,
       services, processes, spans, part_ids, batch_parts)
       SELECT trace_id, first_ns, last_ns, samples, cpu_ns, bytes, parts, services, processes,
         spans, part_ids, batch_parts
       FROM traces ORDER BY last_ns;
     DROP TABLE traces;
     ALTER TABLE traces_v7 RENAME TO traces;
     CREATE UNIQUE INDEX traces_by_id ON traces (trace_id);
     CREATE INDEX traces_by_last ON traces (last_ns);",
];
const _: () = assert!(MIGRATIONS.len() as i32 == SCHEMA_VERSION - 1);
/// How long a statement waits for another connection's lock before failing as locked.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const SCHEMA: &str = "
CREATE TABLE traces (
    id INTEGER PRIMARY KEY,
    trace_id BLOB NOT NULL,
    first_ns INTEGER NOT NULL,
    last_ns INTEGER NOT NULL,
    samples INTEGER NOT NULL,
    cpu_ns INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    parts INTEGER NOT NULL,
    services TEXT NOT NULL,
    processes TEXT NOT NULL DEFAULT '[]',
    spans TEXT NOT NULL DEFAULT '',
    part_ids TEXT NOT NULL DEFAULT '',
    batch_parts TEXT NOT NULL DEFAULT ''
);
CREATE UNIQUE INDEX traces_by_id ON traces (trace_id);
CREATE INDEX traces_by_last ON traces (last_ns);
CREATE TABLE trace_parts (
    id INTEGER PRIMARY KEY,
    trace_id BLOB NOT NULL,
    part INTEGER NOT NULL,
    first_ns INTEGER NOT NULL,
    last_ns INTEGER NOT NULL,
    samples INTEGER NOT NULL,
    cpu_ns INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    profile BLOB NOT NULL
);
CREATE TABLE trace_batches (
    id INTEGER PRIMARY KEY,
    first_ns INTEGER NOT NULL,
    last_ns INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    live INTEGER NOT NULL,
    profile BLOB NOT NULL
);
CREATE TABLE buckets (
    id INTEGER PRIMARY KEY,
    start_ns INTEGER NOT NULL,
    end_ns INTEGER NOT NULL,
    pid INTEGER NOT NULL,
    service TEXT NOT NULL,
    process_name TEXT NOT NULL,
    namespace TEXT NOT NULL DEFAULT '',
    pod TEXT NOT NULL DEFAULT '',
    samples INTEGER NOT NULL,
    cpu_ns INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    profile BLOB NOT NULL
);
CREATE INDEX buckets_by_end ON buckets (end_ns);
CREATE INDEX buckets_by_service ON buckets (service, end_ns);
";

/// What can go wrong with the store file; callers branch on these (the API maps them to
/// status codes, the agent refuses to start on the first four).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "no store at {0}: the agent creates it (`profiler-agent run --store {0}`); pass --store \
         (or PROFILER_STORE) if it runs with another path"
    )]
    Missing(PathBuf),
    #[error(
        "store {path} is corrupt ({detail}); it was left untouched: move it aside (the agent \
         then starts a new one) and try `sqlite3 {path} .recover` on the copy"
    )]
    Corrupt { path: PathBuf, detail: String },
    #[error("store {path} is locked: {detail}")]
    Locked { path: PathBuf, detail: String },
    #[error("{path} is not a profiler store ({detail}); refusing to touch it")]
    Foreign { path: PathBuf, detail: String },
    #[error(
        "store {path} has schema {version}; this reader needs {MIN_READABLE_VERSION} or newer: \
         the agent upgrades it when it starts (`profiler-agent run --store {path}`)"
    )]
    Outdated { path: PathBuf, version: i32 },
    #[error("trace {0} is not in the store")]
    TraceNotFound(String),
    #[error("no samples stored for {0}")]
    NoSamples(String),
    #[error("store {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("store {path}: {detail}")]
    Other { path: PathBuf, detail: String },
}

impl StoreError {
    /// Classifies a SQLite error on `path`: corruption and lock contention get their own
    /// variants (and messages that say what to do).
    fn sqlite(path: &Path, e: rusqlite::Error) -> Self {
        let path = path.to_owned();
        match e.sqlite_error_code() {
            Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => StoreError::Corrupt {
                path,
                detail: e.to_string(),
            },
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => StoreError::Locked {
                path,
                detail: format!(
                    "{e}: another process holds a write lock (a sqlite3 shell in a \
                     transaction?); retry when it is done"
                ),
            },
            _ => StoreError::Sqlite { path, source: e },
        }
    }
}

type Result<T> = std::result::Result<T, StoreError>;

/// Checks that an open connection is a profiler store this agent understands and returns its
/// schema version. A fresh, empty file (`allow_empty`) is not an error: its version is 0 and
/// the caller creates the schema.
fn check_identity(conn: &Connection, path: &Path, allow_empty: bool) -> Result<i32> {
    let err = |e| StoreError::sqlite(path, e);
    let app: i32 = conn
        .pragma_query_value(None, "application_id", |r| r.get(0))
        .map_err(err)?;
    let tables: i64 = conn
        .query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))
        .map_err(err)?;
    if app == 0 && tables == 0 {
        return if allow_empty {
            Ok(0)
        } else {
            Err(StoreError::Foreign {
                path: path.to_owned(),
                detail: "an empty database".into(),
            })
        };
    }
    if app != APPLICATION_ID {
        return Err(StoreError::Foreign {
            path: path.to_owned(),
            detail: format!("application_id {app:#x}, {tables} tables"),
        });
    }
    let version: i32 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(err)?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::Foreign {
            path: path.to_owned(),
            detail: format!(
                "schema {version}, written by a newer agent; this one reads {SCHEMA_VERSION}"
            ),
        });
    }
    Ok(version)
}

/// `PRAGMA quick_check`: reads every page once. Run when the agent opens its store, so a
/// damaged file stops it before it writes anything.
fn check_integrity(conn: &Connection, path: &Path) -> Result<()> {
    let result: String = conn
        .query_row("PRAGMA quick_check(1)", [], |r| r.get(0))
        .map_err(|e| StoreError::sqlite(path, e))?;
    if result != "ok" {
        return Err(StoreError::Corrupt {
            path: path.to_owned(),
            detail: result,
        });
    }
    Ok(())
}

fn open_connection(path: &Path, flags: OpenFlags) -> Result<Connection> {
    let conn = Connection::open_with_flags(path, flags).map_err(|e| StoreError::sqlite(path, e))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| StoreError::sqlite(path, e))?;
    Ok(conn)
}

/// Bytes the store takes on disk: the database and its write-ahead log.
pub fn file_bytes(path: &Path) -> u64 {
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    size(path) + size(&sidecar(path, "-wal"))
}

fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// An exclusive `flock` on `<store>.lock`, held while an agent writes the store: a second
/// agent on the same file gets a clear error instead of interleaving its writes. (A sidecar
/// file, because closing any descriptor of the database itself would drop SQLite's own
/// POSIX locks.)
struct WriterLock {
    _file: File,
}

impl WriterLock {
    fn acquire(store: &Path) -> Result<Self> {
        use std::{io::Write as _, os::fd::AsRawFd as _};
        let path = sidecar(store, ".lock");
        let other = |detail: String| StoreError::Other {
            path: path.clone(),
            detail,
        };
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| other(format!("open the lock file: {e}")))?;
        // SAFETY: flock on a descriptor we own; no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            return Err(StoreError::Locked {
                path: store.to_owned(),
                detail: format!(
                    "another profiler agent writes it (pid {}, lock {}): stop it or pass \
                     another --store",
                    holder.trim(),
                    path.display()
                ),
            });
        }
        let _ = file.set_len(0);
        let _ = write!(file, "{}", std::process::id());
        Ok(Self { _file: file })
    }
}

/// The row ids of a trace's parts, from its `traces` row (space-separated). Anything else in
/// the column (a row edited by hand) is skipped.
fn parse_part_ids(text: &str) -> Vec<i64> {
    text.split_whitespace()
        .filter_map(|id| id.parse().ok())
        .collect()
}

fn part_ids_text(ids: &[i64]) -> String {
    ids.iter().map(i64::to_string).collect::<Vec<_>>().join(" ")
}

/// A trace's part in a batch, as its `traces` row lists it: which incarnation, where its
/// samples are, and its figures (to re-aggregate the row when another part comes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BatchPart {
    part: i64,
    batch: i64,
    index: i64,
    first_ns: i64,
    last_ns: i64,
    samples: i64,
    cpu_ns: i64,
    bytes: i64,
}

/// A trace's own figures, from its `traces` row: (first_ns, last_ns, samples, cpu_ns, bytes).
type RowFigures = (i64, i64, i64, i64, i64);

impl BatchPart {
    /// The `batch_parts` column: parts separated by spaces, each integers separated by commas:
    /// `part,batch,index` for a trace's only part (its figures are the row's: `row`), else
    /// with `first_ns,last_ns,samples,cpu_ns,bytes` after them. The short form keeps the
    /// `traces` row, written for every new trace, small. An entry that does not parse (a row
    /// edited by hand) is skipped.
    fn parse_list(text: &str, row: RowFigures) -> Vec<Self> {
        text.split_whitespace()
            .filter_map(|entry| {
                let f: Vec<i64> = entry
                    .split(',')
                    .map(str::parse)
                    .collect::<std::result::Result<_, _>>()
                    .ok()?;
                let (part, batch, index, figures) = match *f.as_slice() {
                    [part, batch, index] => (part, batch, index, row),
                    [part, batch, index, first, last, samples, cpu, bytes] => {
                        (part, batch, index, (first, last, samples, cpu, bytes))
                    }
                    _ => return None,
                };
                let (first_ns, last_ns, samples, cpu_ns, bytes) = figures;
                Some(Self {
                    part,
                    batch,
                    index,
                    first_ns,
                    last_ns,
                    samples,
                    cpu_ns,
                    bytes,
                })
            })
            .collect()
    }

    /// The column for a trace whose parts in batches are `parts` and that has `other_parts`
    /// (`trace_parts` rows) besides.
    fn list_text(parts: &[Self], other_parts: usize) -> String {
        if let [only] = parts
            && other_parts == 0
        {
            return only.short_text();
        }
        parts
            .iter()
            .map(|p| {
                format!(
                    "{},{},{},{},{},{}",
                    p.short_text(),
                    p.first_ns,
                    p.last_ns,
                    p.samples,
                    p.cpu_ns,
                    p.bytes
                )
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The entry of a trace's only part.
    fn short_text(&self) -> String {
        format!("{},{},{}", self.part, self.batch, self.index)
    }
}

/// Nanoseconds as SQLite integers (i64: good until 2262).
fn sql_ns(ns: u64) -> i64 {
    i64::try_from(ns).unwrap_or(i64::MAX)
}

fn unix_now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}
