//! The read side: a read-only connection, usable from any process while the agent writes (WAL),
//! and after it stopped. Every answer is built from stored data alone.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags, OptionalExtension as _, params};

use super::{Result, StoreError, check_identity, open_connection, sql_ns};
use crate::{
    context::hex,
    export::{pprof, pprof_proto as pb},
};

/// Which traces to list.
#[derive(Debug, Clone, Default)]
pub struct TraceFilter {
    pub service: Option<String>,
    pub pid: Option<u32>,
    /// Kubernetes namespace and pod name of a process the trace ran in.
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub span_id: Option<[u8; 8]>,
    /// Only traces whose last sample is at or after this time.
    pub since_ns: Option<u64>,
    pub limit: usize,
}

/// A trace's index row.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TraceSummary {
    #[serde(serialize_with = "hex_id")]
    pub trace_id: [u8; 16],
    pub first_unix_ns: u64,
    pub last_unix_ns: u64,
    pub samples: u64,
    pub cpu_ns: u64,
    /// Stored profile bytes (every part; a part in a batch counts its share of the batch's
    /// profile, by samples).
    pub bytes: u64,
    /// Stored incarnations (more than one after a late return past the agent's window).
    pub parts: u64,
    pub services: Vec<String>,
}

fn hex_id<S: serde::Serializer>(id: &[u8; 16], s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&hex(id))
}

impl TraceSummary {
    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    pub fn duration_ns(&self) -> u64 {
        self.last_unix_ns.saturating_sub(self.first_unix_ns)
    }
}

/// A process a trace ran in (the trace's detail; written by the agent as `TraceProcess`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcessRow {
    pub pid: u32,
    pub process_name: String,
    /// `service.name` (the process context, `OTEL_SERVICE_NAME`, the pod's
    /// `app.kubernetes.io/name`, or the executable name).
    pub service: String,
    /// Kubernetes namespace and pod; empty outside Kubernetes.
    pub namespace: String,
    pub pod: String,
}

/// A service seen in the buckets.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ServiceRow {
    pub service: String,
    pub samples: u64,
    pub processes: u64,
    pub last_unix_ns: u64,
}

/// A time window of a service or process (or of everything, with neither).
#[derive(Debug, Clone, Default)]
pub struct Window {
    pub service: Option<String>,
    pub pid: Option<u32>,
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub from_ns: u64,
    pub to_ns: u64,
}

impl Window {
    /// What the window selects, e.g. "service checkout, namespace shop"; `None`: everything.
    pub fn subject(&self) -> Option<String> {
        let mut parts = Vec::new();
        if let Some(s) = &self.service {
            parts.push(format!("service {s}"));
        }
        if let Some(p) = self.pid {
            parts.push(format!("pid {p}"));
        }
        if let Some(n) = &self.namespace {
            parts.push(format!("namespace {n}"));
        }
        if let Some(p) = &self.pod {
            parts.push(format!("pod {p}"));
        }
        (!parts.is_empty()).then(|| parts.join(", "))
    }
}

/// Totals for `/metrics` and the bench.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StoreStats {
    pub traces: u64,
    pub buckets: u64,
    pub profile_bytes: u64,
    pub file_bytes: u64,
}

pub struct StoreReader {
    conn: Connection,
    path: PathBuf,
}

impl StoreReader {
    /// Opens the store read-only. A missing file, a foreign or corrupt one, and a lock that
    /// does not clear within the busy timeout are errors of their own.
    pub fn open(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(StoreError::Missing(path.to_owned()));
        }
        let conn = open_connection(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        let version = check_identity(&conn, path, false)?;
        if version < super::MIN_READABLE_VERSION {
            return Err(StoreError::Outdated {
                path: path.to_owned(),
                version,
            });
        }
        Ok(Self {
            conn,
            path: path.to_owned(),
        })
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        |e| StoreError::sqlite(&self.path, e)
    }

    /// Calls `f` with each matching trace, most recent last sample first, until `f` returns
    /// false or `filter.limit` traces were seen (so a caller can stream a long list). The
    /// listing walks `traces_by_last`; the filters are checked on each row (its services,
    /// processes and spans), the processes parsed only when a process filter is set.
    pub fn for_each_trace(
        &self,
        filter: &TraceFilter,
        mut f: impl FnMut(TraceSummary) -> bool,
    ) -> Result<()> {
        if filter.limit == 0 {
            return Ok(());
        }
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT trace_id, first_ns, last_ns, samples, cpu_ns, bytes, parts, services,
                        processes, spans
                 FROM traces WHERE last_ns >= ?1 ORDER BY last_ns DESC",
            )
            .map_err(self.err())?;
        let span = filter.span_id.map(|s| hex(&s));
        let by_process = filter.pid.is_some() || filter.namespace.is_some() || filter.pod.is_some();
        let mut rows = stmt
            .query(params![sql_ns(filter.since_ns.unwrap_or(0))])
            .map_err(self.err())?;
        let mut seen = 0;
        while let Some(row) = rows.next().map_err(self.err())? {
            let summary = summary(row).map_err(self.err())?;
            if let Some(service) = &filter.service
                && !summary.services.iter().any(|s| s == service)
            {
                continue;
            }
            if let Some(span) = &span {
                let spans: String = row.get(9).map_err(self.err())?;
                if !spans.split_whitespace().any(|s| s == span) {
                    continue;
                }
            }
            if by_process {
                let processes: String = row.get(8).map_err(self.err())?;
                let matches = parse_processes(&processes).iter().any(|p| {
                    filter.pid.is_none_or(|pid| p.pid == pid)
                        && filter.namespace.as_ref().is_none_or(|n| &p.namespace == n)
                        && filter.pod.as_ref().is_none_or(|n| &p.pod == n)
                });
                if !matches {
                    continue;
                }
            }
            seen += 1;
            if !f(summary) || seen >= filter.limit {
                break;
            }
        }
        Ok(())
    }

    pub fn traces(&self, filter: &TraceFilter) -> Result<Vec<TraceSummary>> {
        let mut out = Vec::new();
        self.for_each_trace(filter, |t| {
            out.push(t);
            true
        })?;
        Ok(out)
    }

    /// One trace's index row, or [`StoreError::TraceNotFound`].
    pub fn trace(&self, trace_id: &[u8; 16]) -> Result<TraceSummary> {
        self.conn
            .prepare_cached(
                "SELECT trace_id, first_ns, last_ns, samples, cpu_ns, bytes, parts, services
                 FROM traces WHERE trace_id = ?1",
            )
            .and_then(|mut s| s.query_row([&trace_id[..]], summary).optional())
            .map_err(self.err())?
            .ok_or_else(|| StoreError::TraceNotFound(hex(trace_id)))
    }

    /// The processes a trace ran in and its span ids.
    pub fn trace_detail(&self, trace_id: &[u8; 16]) -> Result<(Vec<ProcessRow>, Vec<String>)> {
        let (processes, spans): (String, String) = self
            .conn
            .prepare_cached("SELECT processes, spans FROM traces WHERE trace_id = ?1")
            .and_then(|mut s| s.query_row([&trace_id[..]], |r| Ok((r.get(0)?, r.get(1)?))))
            .optional()
            .map_err(self.err())?
            .ok_or_else(|| StoreError::TraceNotFound(hex(trace_id)))?;
        let mut processes = parse_processes(&processes);
        processes.sort_by_key(|p| p.pid);
        Ok((
            processes,
            spans.split_whitespace().map(str::to_owned).collect(),
        ))
    }

    /// The trace's pprof: as stored (raw when small, else gzip; `pprof::decode` reads both,
    /// `pprof::ensure_gzip` makes a `.pb.gz` of it) when it is one part with a profile of its
    /// own (schema 5 and older); else its part cut out of its batch's profile, or its parts
    /// merged, gzip-compressed.
    pub fn trace_pprof(&self, trace_id: &[u8; 16]) -> Result<Vec<u8>> {
        let mut parts = self.trace_parts(trace_id)?;
        if let [StoredPart::Own(_)] = parts.as_slice()
            && let Some(StoredPart::Own(bytes)) = parts.pop()
        {
            return Ok(bytes);
        }
        Ok(pprof::encode_gzip(&self.merge(parts)?))
    }

    /// The trace's profile, decoded (and merged).
    pub fn trace_profile(&self, trace_id: &[u8; 16]) -> Result<pb::Profile> {
        let parts = self.trace_parts(trace_id)?;
        self.merge(parts)
    }

    /// The profiles of the trace's parts, oldest incarnation first.
    fn trace_parts(&self, trace_id: &[u8; 16]) -> Result<Vec<StoredPart>> {
        // One read transaction: the trace's row and the parts it names come from the same
        // snapshot, whatever the writer commits in between.
        let snapshot = self.conn.unchecked_transaction().map_err(self.err())?;
        let listed: Option<(String, String, super::RowFigures)> = snapshot
            .prepare_cached(
                "SELECT part_ids, batch_parts, first_ns, last_ns, samples, cpu_ns, bytes \
                 FROM traces WHERE trace_id = ?1",
            )
            .and_then(|mut s| {
                s.query_row([&trace_id[..]], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        (r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?),
                    ))
                })
                .optional()
            })
            .map_err(self.err())?;
        let Some((part_ids, batch_parts, row)) = listed else {
            return Err(StoreError::TraceNotFound(hex(trace_id)));
        };
        let mut parts: Vec<(i64, StoredPart)> = Vec::new();
        // Parts written before schema 6: a profile each.
        let mut stmt = snapshot
            .prepare_cached("SELECT part, profile FROM trace_parts WHERE id = ?1")
            .map_err(self.err())?;
        for id in super::parse_part_ids(&part_ids) {
            let part = stmt
                .query_row([id], |r| Ok((r.get(0)?, StoredPart::Own(r.get(1)?))))
                .optional()
                .map_err(self.err())?;
            parts.extend(part);
        }
        // Parts in batches: cut out of the batch's profile (decoded once per batch).
        let mut batches: Vec<(i64, pb::Profile)> = Vec::new();
        for p in super::BatchPart::parse_list(&batch_parts, row) {
            let batch = match batches.iter().position(|(id, _)| *id == p.batch) {
                Some(i) => &batches[i].1,
                None => {
                    let bytes: Option<Vec<u8>> = snapshot
                        .prepare_cached("SELECT profile FROM trace_batches WHERE id = ?1")
                        .and_then(|mut s| s.query_row([p.batch], |r| r.get(0)).optional())
                        .map_err(self.err())?;
                    let Some(bytes) = bytes else {
                        return Err(StoreError::Corrupt {
                            path: self.path.clone(),
                            detail: format!(
                                "trace {} names batch {}, which is not in the store",
                                hex(trace_id),
                                p.batch
                            ),
                        });
                    };
                    batches.push((p.batch, self.decode(&bytes)?));
                    &batches[batches.len() - 1].1
                }
            };
            let mut profile = pprof::extract_labelled(batch, super::PART_LABEL, p.index);
            profile.time_nanos = p.first_ns;
            profile.duration_nanos = p.last_ns.saturating_sub(p.first_ns);
            parts.push((p.part, StoredPart::Decoded(Box::new(profile))));
        }
        if parts.is_empty() {
            return Err(StoreError::TraceNotFound(hex(trace_id)));
        }
        parts.sort_by_key(|(part, _)| *part);
        Ok(parts.into_iter().map(|(_, part)| part).collect())
    }

    /// Every sample of the window's buckets (those overlapping it), merged. Also returns the
    /// span the buckets cover, which is wider than asked when a bucket straddles an edge.
    pub fn window_profile(&self, window: &Window) -> Result<(pb::Profile, (u64, u64))> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT profile, start_ns, end_ns FROM buckets
                 WHERE end_ns > ?1 AND start_ns < ?2
                   AND (?3 IS NULL OR service = ?3) AND (?4 IS NULL OR pid = ?4)
                   AND (?5 IS NULL OR namespace = ?5) AND (?6 IS NULL OR pod = ?6)
                 ORDER BY start_ns",
            )
            .map_err(self.err())?;
        let rows: Vec<(Vec<u8>, i64, i64)> = stmt
            .query_map(
                params![
                    sql_ns(window.from_ns),
                    sql_ns(window.to_ns),
                    window.service,
                    window.pid,
                    window.namespace,
                    window.pod
                ],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .and_then(Iterator::collect)
            .map_err(self.err())?;
        if rows.is_empty() {
            let what = match window.subject() {
                Some(subject) => format!("{subject} in that window"),
                None => "that window".to_owned(),
            };
            return Err(StoreError::NoSamples(what));
        }
        let covered = (
            rows.iter().map(|r| r.1).min().unwrap_or(0).max(0) as u64,
            rows.iter().map(|r| r.2).max().unwrap_or(0).max(0) as u64,
        );
        let blobs = rows.into_iter().map(|r| StoredPart::Own(r.0)).collect();
        Ok((self.merge(blobs)?, covered))
    }

    /// Services in the buckets since `since_ns`, by samples.
    pub fn services(&self, since_ns: u64) -> Result<Vec<ServiceRow>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT service, sum(samples), count(DISTINCT pid), max(end_ns) FROM buckets
                 WHERE end_ns >= ?1 GROUP BY service ORDER BY sum(samples) DESC",
            )
            .map_err(self.err())?;
        stmt.query_map([sql_ns(since_ns)], |r| {
            Ok(ServiceRow {
                service: r.get(0)?,
                samples: r.get::<_, i64>(1)?.max(0) as u64,
                processes: r.get::<_, i64>(2)?.max(0) as u64,
                last_unix_ns: r.get::<_, i64>(3)?.max(0) as u64,
            })
        })
        .and_then(Iterator::collect)
        .map_err(self.err())
    }

    pub fn stats(&self) -> Result<StoreStats> {
        let (traces, trace_bytes): (i64, i64) = self
            .conn
            .query_row(
                "SELECT count(*), coalesce(sum(bytes), 0) FROM traces",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(self.err())?;
        let (buckets, bucket_bytes): (i64, i64) = self
            .conn
            .query_row(
                "SELECT count(*), coalesce(sum(bytes), 0) FROM buckets",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(self.err())?;
        Ok(StoreStats {
            traces: traces as u64,
            buckets: buckets as u64,
            profile_bytes: (trace_bytes + bucket_bytes) as u64,
            file_bytes: super::file_bytes(&self.path),
        })
    }

    fn decode(&self, bytes: &[u8]) -> Result<pb::Profile> {
        pprof::decode(bytes).map_err(|e| StoreError::Corrupt {
            path: self.path.clone(),
            detail: format!("a stored profile does not decode: {e:#}"),
        })
    }

    fn merge(&self, parts: Vec<StoredPart>) -> Result<pb::Profile> {
        let profiles = parts
            .into_iter()
            .map(|part| match part {
                StoredPart::Own(bytes) => self.decode(&bytes),
                StoredPart::Decoded(profile) => Ok(*profile),
            })
            .collect::<Result<Vec<_>>>()?;
        if profiles.len() == 1 {
            return Ok(profiles.into_iter().next().unwrap_or_default());
        }
        pprof::merge(&profiles).map_err(|e| StoreError::Other {
            path: self.path.clone(),
            detail: format!("cannot merge stored profiles: {e:#}"),
        })
    }
}

/// One stored part of a trace.
enum StoredPart {
    /// A profile of its own, as stored (schema 5 and older).
    Own(Vec<u8>),
    /// Cut out of its batch's profile.
    Decoded(Box<pb::Profile>),
}

fn summary(r: &rusqlite::Row<'_>) -> rusqlite::Result<TraceSummary> {
    let id: Vec<u8> = r.get(0)?;
    let mut trace_id = [0u8; 16];
    if id.len() == 16 {
        trace_id.copy_from_slice(&id);
    }
    let n = |i| -> rusqlite::Result<u64> { Ok(r.get::<_, i64>(i)?.max(0) as u64) };
    let services: String = r.get(7)?;
    Ok(TraceSummary {
        trace_id,
        first_unix_ns: n(1)?,
        last_unix_ns: n(2)?,
        samples: n(3)?,
        cpu_ns: n(4)?,
        bytes: n(5)?,
        parts: n(6)?,
        services: services
            .split('\n')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
    })
}

/// The `processes` column of a trace (a JSON array); a value that does not parse (a row edited
/// by hand) reads as no processes, with a warning, rather than failing the query.
pub(super) fn parse_processes(json: &str) -> Vec<ProcessRow> {
    serde_json::from_str(json).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "unreadable process list in the store's traces row");
        Vec::new()
    })
}
