//! The write side: one connection, owned by the store's writer thread (or a test), that adds
//! traces and buckets in batches and enforces retention.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use rusqlite::{Connection, OpenFlags, OptionalExtension as _, Transaction, params};

use crate::export::{pprof, pprof_proto as pb};

use super::{
    BatchPart, MIGRATIONS, Result, SCHEMA, SCHEMA_VERSION, StoreError, WriterLock, check_identity,
    check_integrity, open_connection, sql_ns,
};

/// A process a trace ran in: what the writer stores (as JSON in the trace's row) is what the
/// reader gives back.
pub type TraceProcess = super::read::ProcessRow;

/// One incarnation of a trace, as the collector hands it out (the whole profile so far).
#[derive(Debug, Clone)]
pub struct TraceRecord {
    pub trace_id: [u8; 16],
    /// Names the incarnation (`TraceProfile::created_unix_ns`): same part → replace.
    pub part: u64,
    pub first_ns: u64,
    pub last_ns: u64,
    pub samples: u64,
    pub cpu_ns: u64,
    pub processes: Vec<TraceProcess>,
    pub spans: Vec<[u8; 8]>,
    /// Its samples in the batch's profile are those labelled [`super::PART_LABEL`] = `index`.
    pub index: u32,
}

/// Traces written together, and the one profile that holds all their samples: each trace's
/// labelled [`super::PART_LABEL`] = its `index`. Strings, functions and locations the traces
/// share (most of a profile's bytes) are stored once per batch, not once per trace.
#[derive(Debug, Clone, Default)]
pub struct TraceBatch {
    /// Symbolized pprof (`pprof::encode_for_store`); empty when there are no traces.
    pub profile: Vec<u8>,
    pub traces: Vec<TraceRecord>,
}

impl TraceBatch {
    /// A batch of traces whose profiles were built one by one (tests, the store bench, a
    /// tool): labels each profile's samples with its trace's index and merges them.
    pub fn from_profiles(parts: impl IntoIterator<Item = (TraceRecord, pb::Profile)>) -> Self {
        let mut traces = Vec::new();
        let mut profiles = Vec::new();
        for (index, (mut trace, mut profile)) in parts.into_iter().enumerate() {
            trace.index = index as u32;
            let key = profile.string_table.len() as i64;
            profile.string_table.push(super::PART_LABEL.to_owned());
            for sample in &mut profile.sample {
                sample.label.push(pb::Label {
                    key,
                    num: index as i64,
                    ..Default::default()
                });
            }
            traces.push(trace);
            profiles.push(profile);
        }
        if traces.is_empty() {
            return Self::default();
        }
        let merged = pprof::merge(&profiles).expect("trace profiles share their sample types");
        Self {
            profile: pprof::encode_for_store(&merged),
            traces,
        }
    }
}

/// Every sample of one process during one agent interval.
#[derive(Debug, Clone)]
pub struct BucketRecord {
    pub start_ns: u64,
    pub end_ns: u64,
    pub pid: u32,
    pub process_name: String,
    pub service: String,
    /// The Kubernetes namespace and pod, empty outside Kubernetes.
    pub namespace: String,
    pub pod: String,
    pub samples: u64,
    pub cpu_ns: u64,
    pub profile: Vec<u8>,
}

/// Limits on what the store keeps; the oldest data goes first.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Traces whose last sample, and buckets whose end, are older than this are deleted.
    pub max_age: Duration,
    /// Bytes the database may use (its pages in use, indexes included).
    pub max_bytes: u64,
}

/// What one retention pass deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionOutcome {
    pub traces_by_age: u64,
    pub buckets_by_age: u64,
    pub traces_by_size: u64,
    pub buckets_by_size: u64,
}

/// The store opened for writing. One per file at a time (a lock file enforces it).
pub struct Store {
    conn: Connection,
    path: PathBuf,
    _lock: WriterLock,
}

impl Store {
    /// Opens (creating it if needed) the store at `path` for writing. Refuses a corrupt or
    /// foreign file, and one another agent writes.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Other {
                path: path.to_owned(),
                detail: format!("create {}: {e}", dir.display()),
            })?;
        }
        let lock = WriterLock::acquire(path)?;
        let conn = open_connection(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        let err = |e| StoreError::sqlite(path, e);
        let version = check_identity(&conn, path, true)?;
        let fresh = version == 0;
        if fresh {
            // auto_vacuum must be chosen before the first table exists.
            conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")
                .map_err(err)?;
        } else {
            check_integrity(&conn, path)?;
        }
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .map_err(err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Other {
                path: path.to_owned(),
                detail: format!("cannot switch to WAL mode (journal mode {mode})"),
            });
        }
        // NORMAL in WAL mode: a power loss may lose the last commits, never the file.
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(err)?;
        conn.pragma_update(None, "journal_size_limit", 16i64 << 20)
            .map_err(err)?;
        if fresh {
            conn.execute_batch(&format!(
                "BEGIN; {SCHEMA} PRAGMA application_id = {}; PRAGMA user_version = \
                 {SCHEMA_VERSION}; COMMIT;",
                super::APPLICATION_ID
            ))
            .map_err(err)?;
        }
        let opened_at = version;
        let mut version = version;
        for (from, migration) in MIGRATIONS.iter().enumerate() {
            let from = from as i32 + 1;
            if !fresh && version == from {
                let started = std::time::Instant::now();
                conn.execute_batch(&format!(
                    "BEGIN; {migration} PRAGMA user_version = {}; COMMIT;",
                    from + 1
                ))
                .map_err(err)?;
                tracing::info!(
                    path = %path.display(),
                    from,
                    to = from + 1,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "store schema upgraded"
                );
                version = from + 1;
            }
        }
        if !fresh && version != opened_at {
            // A migration that rebuilt a table left its old pages free: give them back.
            incremental_vacuum(&conn, 0).map_err(err)?;
        }
        // Fails now, with a clear error, when another process holds the write lock.
        conn.execute_batch("BEGIN IMMEDIATE; COMMIT;")
            .map_err(err)?;
        Ok(Self {
            conn,
            path: path.to_owned(),
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        |e| StoreError::sqlite(&self.path, e)
    }

    /// Writes a batch of traces and buckets in one transaction.
    pub fn write(&mut self, traces: &TraceBatch, buckets: &[BucketRecord]) -> Result<()> {
        let path = self.path.clone();
        let err = |e| StoreError::sqlite(&path, e);
        let tx = self.conn.transaction().map_err(err)?;
        if !traces.traces.is_empty() {
            put_traces(&tx, traces).map_err(err)?;
        }
        for bucket in buckets {
            put_bucket(&tx, bucket).map_err(err)?;
        }
        tx.commit().map_err(err)
    }

    /// Bytes of the pages in use (free pages excluded).
    pub fn used_bytes(&self) -> Result<u64> {
        let q = |name: &str| -> Result<i64> {
            self.conn
                .pragma_query_value(None, name, |r| r.get(0))
                .map_err(self.err())
        };
        let pages = q("page_count")? - q("freelist_count")?;
        Ok((pages.max(0) * q("page_size")?) as u64)
    }

    /// Deletes what is older than `retention.max_age`, then the oldest traces or buckets until
    /// the pages in use fit `retention.max_bytes`, and returns the freed pages to the file
    /// system.
    pub fn enforce_retention(
        &mut self,
        retention: &Retention,
        now_ns: u64,
    ) -> Result<RetentionOutcome> {
        let mut outcome = RetentionOutcome::default();
        let cutoff = sql_ns(now_ns.saturating_sub(retention.max_age.as_nanos() as u64));
        let old: Vec<Vec<u8>> =
            self.ids("SELECT trace_id FROM traces WHERE last_ns < ?1", cutoff)?;
        outcome.traces_by_age = self.delete_traces(&old)?;
        outcome.buckets_by_age = self
            .conn
            .execute("DELETE FROM buckets WHERE end_ns < ?1", [cutoff])
            .map_err(self.err())? as u64;
        while self.used_bytes()? > retention.max_bytes {
            let (traces, buckets) = self.delete_oldest_chunk()?;
            if traces + buckets == 0 {
                break;
            }
            outcome.traces_by_size += traces;
            outcome.buckets_by_size += buckets;
        }
        if outcome != RetentionOutcome::default() {
            self.release_free_pages()?;
        }
        Ok(outcome)
    }

    /// Deletes about 5% of the oldest rows (traces by last sample, buckets by end) from the
    /// table whose oldest row is older. Returns (traces, buckets) deleted.
    fn delete_oldest_chunk(&mut self) -> Result<(u64, u64)> {
        let oldest = |sql: &str| -> Result<Option<i64>> {
            self.conn
                .query_row(sql, [], |r| r.get(0))
                .map_err(self.err())
        };
        let trace = oldest("SELECT min(last_ns) FROM traces")?;
        let bucket = oldest("SELECT min(end_ns) FROM buckets")?;
        let count = |sql: &str| -> Result<i64> {
            self.conn
                .query_row(sql, [], |r| r.get(0))
                .map_err(self.err())
        };
        match (trace, bucket) {
            (Some(t), b) if b.is_none_or(|b| t <= b) => {
                let chunk = (count("SELECT count(*) FROM traces")? / 20).max(1);
                let ids = self.ids(
                    "SELECT trace_id FROM traces ORDER BY last_ns LIMIT ?1",
                    chunk,
                )?;
                Ok((self.delete_traces(&ids)?, 0))
            }
            (_, Some(_)) => {
                let chunk = (count("SELECT count(*) FROM buckets")? / 20).max(1);
                let n = self
                    .conn
                    .execute(
                        "DELETE FROM buckets WHERE id IN \
                         (SELECT id FROM buckets ORDER BY end_ns LIMIT ?1)",
                        [chunk],
                    )
                    .map_err(self.err())?;
                Ok((0, n as u64))
            }
            _ => Ok((0, 0)),
        }
    }

    fn ids(&self, sql: &str, arg: i64) -> Result<Vec<Vec<u8>>> {
        let mut stmt = self.conn.prepare_cached(sql).map_err(self.err())?;
        let rows = stmt
            .query_map([arg], |r| r.get::<_, Vec<u8>>(0))
            .map_err(self.err())?;
        rows.collect::<rusqlite::Result<_>>().map_err(self.err())
    }

    fn delete_traces(&mut self, ids: &[Vec<u8>]) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        let path = self.path.clone();
        let err = |e| StoreError::sqlite(&path, e);
        let tx = self.conn.transaction().map_err(err)?;
        let mut released = Vec::new();
        for id in ids {
            let parts: Option<(String, String)> = tx
                .prepare_cached(
                    "DELETE FROM traces WHERE trace_id = ?1 RETURNING part_ids, batch_parts",
                )
                .and_then(|mut s| s.query_row([id], |r| Ok((r.get(0)?, r.get(1)?))).optional())
                .map_err(err)?;
            let Some((part_ids, batch_parts)) = parts else {
                continue;
            };
            for part_id in super::parse_part_ids(&part_ids) {
                tx.prepare_cached("DELETE FROM trace_parts WHERE id = ?1")
                    .and_then(|mut s| s.execute([part_id]))
                    .map_err(err)?;
            }
            let parts = BatchPart::parse_list(&batch_parts, Default::default());
            released.extend(parts.iter().map(|p| p.batch));
        }
        release_batches(&tx, released).map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(ids.len() as u64)
    }

    /// Gives free pages back to the file system once they are over a quarter of the pages in
    /// use, keeping an eighth of those free. New rows reuse free pages, so a store at its size cap
    /// stays at its size without churn; one that shrank (less traffic, a smaller cap) gets
    /// smaller on disk.
    fn release_free_pages(&self) -> Result<()> {
        let q = |name: &str| -> Result<i64> {
            self.conn
                .pragma_query_value(None, name, |r| r.get(0))
                .map_err(self.err())
        };
        let free = q("freelist_count")?;
        let used = q("page_count")? - free;
        if free > used / 4 {
            incremental_vacuum(&self.conn, free - used / 8).map_err(self.err())?;
        }
        Ok(())
    }

    /// Moves the write-ahead log into the database and truncates it (at shutdown, and before
    /// measuring the file). Best effort: a reader in the middle of a query keeps the log.
    pub fn checkpoint(&self) {
        let _ = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
    }
}

/// `PRAGMA incremental_vacuum(pages)` (0: every free page), stepped to its end: each step
/// releases one page, so a single step (as `execute_batch` does) releases only one.
fn incremental_vacuum(conn: &Connection, pages: i64) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare(&format!("PRAGMA incremental_vacuum({pages})"))?;
    let mut rows = stmt.query([])?;
    while rows.next()?.is_some() {}
    Ok(())
}

/// The batch's profile, then each trace's `traces` row, which lists its part in the batch.
fn put_traces(tx: &Transaction<'_>, batch: &TraceBatch) -> rusqlite::Result<()> {
    let first_ns = batch.traces.iter().map(|t| t.first_ns).min().unwrap_or(0);
    let last_ns = batch.traces.iter().map(|t| t.last_ns).max().unwrap_or(0);
    // Every record becomes one part naming the batch; a part replaced later releases it.
    tx.prepare_cached(
        "INSERT INTO trace_batches (first_ns, last_ns, bytes, live, profile) \
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![
        sql_ns(first_ns),
        sql_ns(last_ns),
        batch.profile.len() as i64,
        batch.traces.len() as i64,
        batch.profile,
    ])?;
    let batch_id = tx.last_insert_rowid();
    // Each part is charged its share of the batch's bytes, by samples.
    let samples = batch.traces.iter().map(|t| t.samples).sum::<u64>().max(1);
    let mut released = Vec::new();
    for t in &batch.traces {
        let part = BatchPart {
            part: sql_ns(t.part),
            batch: batch_id,
            index: i64::from(t.index),
            first_ns: sql_ns(t.first_ns),
            last_ns: sql_ns(t.last_ns),
            samples: sql_ns(t.samples),
            cpu_ns: sql_ns(t.cpu_ns),
            bytes: (batch.profile.len() as u128 * u128::from(t.samples) / u128::from(samples))
                as i64,
        };
        released.extend(put_trace(tx, t, part)?);
    }
    release_batches(tx, released)
}

/// Each entry of `batches` is one part that no longer names that batch; a batch no part names
/// any more is deleted.
fn release_batches(tx: &Transaction<'_>, mut batches: Vec<i64>) -> rusqlite::Result<()> {
    batches.sort_unstable();
    for run in batches.chunk_by(|a, b| a == b) {
        tx.prepare_cached("UPDATE trace_batches SET live = live - ?2 WHERE id = ?1")?
            .execute([run[0], run.len() as i64])?;
        tx.prepare_cached("DELETE FROM trace_batches WHERE id = ?1 AND live <= 0")?
            .execute([run[0]])?;
    }
    Ok(())
}

/// Stores one trace's part; returns the batch of a part it replaced (released).
fn put_trace(
    tx: &Transaction<'_>,
    t: &TraceRecord,
    this: BatchPart,
) -> rusqlite::Result<Option<i64>> {
    let id = &t.trace_id[..];
    // Most traces are new to the store: their row is this part's own figures, written without
    // reading anything back. A trace already there (a late re-flush, a new part) is
    // re-aggregated from its parts below.
    let new_trace =
        tx.prepare_cached(
            "INSERT OR IGNORE INTO traces (trace_id, first_ns, last_ns, samples, cpu_ns, bytes, \
             parts, services, processes, spans, part_ids, batch_parts) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 1, ?7, ?8, ?9, '', ?10)",
        )?
        .execute(params![
            id,
            this.first_ns,
            this.last_ns,
            this.samples,
            this.cpu_ns,
            this.bytes,
            services(&t.processes),
            processes_json(&t.processes),
            spans_text(t.spans.iter().map(|s| crate::context::hex(s))),
            this.short_text(),
        ])? == 1;
    if new_trace {
        return Ok(None);
    }
    let (stored_processes, stored_spans, stored_ids, stored_batch_parts, row): (
        String,
        String,
        String,
        String,
        super::RowFigures,
    ) = tx
        .prepare_cached(
            "SELECT processes, spans, part_ids, batch_parts, first_ns, last_ns, samples, \
             cpu_ns, bytes FROM traces WHERE trace_id = ?1",
        )?
        .query_row([id], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                (r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?, r.get(8)?),
            ))
        })?;
    // Its parts written before schema 6, each a row of its own.
    let mut rows = Vec::new();
    for part_id in super::parse_part_ids(&stored_ids) {
        let part = tx
            .prepare_cached(
                "SELECT part, first_ns, last_ns, samples, cpu_ns, bytes FROM trace_parts \
                 WHERE id = ?1",
            )?
            .query_row([part_id], |r| {
                Ok(PartFigures {
                    id: part_id,
                    part: r.get(0)?,
                    first_ns: r.get(1)?,
                    last_ns: r.get(2)?,
                    samples: r.get(3)?,
                    cpu_ns: r.get(4)?,
                    bytes: r.get(5)?,
                })
            })
            .optional()?;
        rows.extend(part);
    }
    let mut batch_parts = BatchPart::parse_list(&stored_batch_parts, row);
    // A re-flush of a stored incarnation replaces its part.
    let mut released = None;
    if let Some(old) = rows.iter().position(|p| p.part == this.part) {
        tx.prepare_cached("DELETE FROM trace_parts WHERE id = ?1")?
            .execute([rows.swap_remove(old).id])?;
    }
    if let Some(old) = batch_parts.iter().position(|p| p.part == this.part) {
        released = Some(batch_parts.swap_remove(old).batch);
    }
    batch_parts.push(this);
    batch_parts.sort_by_key(|p| p.part);
    rows.sort_by_key(|p| p.part);
    // A row this agent cannot parse (edited by hand) loses its process list, not the trace.
    let mut processes = super::read::parse_processes(&stored_processes);
    for p in &t.processes {
        if !processes.iter().any(|q| q.pid == p.pid) {
            processes.push(p.clone());
        }
    }
    processes.sort_by_key(|p| p.pid);
    let mut spans: Vec<String> = stored_spans.split_whitespace().map(str::to_owned).collect();
    spans.extend(t.spans.iter().map(|s| crate::context::hex(s)));
    spans.sort_unstable();
    spans.dedup();
    let figures: Vec<(i64, i64, i64, i64, i64)> = rows
        .iter()
        .map(|p| (p.first_ns, p.last_ns, p.samples, p.cpu_ns, p.bytes))
        .chain(
            batch_parts
                .iter()
                .map(|p| (p.first_ns, p.last_ns, p.samples, p.cpu_ns, p.bytes)),
        )
        .collect();
    let ids: Vec<i64> = rows.iter().map(|p| p.id).collect();
    tx.prepare_cached(
        "INSERT OR REPLACE INTO traces (trace_id, first_ns, last_ns, samples, cpu_ns, bytes, \
         parts, services, processes, spans, part_ids, batch_parts) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
    )?
    .execute(params![
        id,
        figures.iter().map(|f| f.0).min().unwrap_or(this.first_ns),
        figures.iter().map(|f| f.1).max().unwrap_or(this.last_ns),
        figures.iter().map(|f| f.2).sum::<i64>(),
        figures.iter().map(|f| f.3).sum::<i64>(),
        figures.iter().map(|f| f.4).sum::<i64>(),
        figures.len() as i64,
        services(&processes),
        processes_json(&processes),
        spans_text(spans.into_iter()),
        super::part_ids_text(&ids),
        BatchPart::list_text(&batch_parts, ids.len()),
    ])?;
    Ok(released)
}

/// One `trace_parts` row's id and figures (a part written before schema 6), to re-aggregate
/// its trace's `traces` row.
#[derive(Clone, Copy)]
struct PartFigures {
    id: i64,
    part: i64,
    first_ns: i64,
    last_ns: i64,
    samples: i64,
    cpu_ns: i64,
    bytes: i64,
}

/// The distinct services of `processes`, sorted, one per line (the `services` column).
fn services(processes: &[TraceProcess]) -> String {
    let mut services: Vec<&str> = processes.iter().map(|p| p.service.as_str()).collect();
    services.sort_unstable();
    services.dedup();
    services.join("\n")
}

fn processes_json(processes: &[TraceProcess]) -> String {
    serde_json::to_string(processes).unwrap_or_else(|_| "[]".to_owned())
}

/// Span ids in lowercase hex, space-separated (the `spans` column).
fn spans_text(spans: impl Iterator<Item = String>) -> String {
    spans.collect::<Vec<_>>().join(" ")
}

fn put_bucket(tx: &Transaction<'_>, b: &BucketRecord) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO buckets (start_ns, end_ns, pid, service, process_name, namespace, pod, \
         samples, cpu_ns, bytes, profile) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )?
    .execute(params![
        sql_ns(b.start_ns),
        sql_ns(b.end_ns),
        b.pid,
        b.service,
        b.process_name,
        b.namespace,
        b.pod,
        sql_ns(b.samples),
        sql_ns(b.cpu_ns),
        b.profile.len() as i64,
        b.profile,
    ])?;
    Ok(())
}
