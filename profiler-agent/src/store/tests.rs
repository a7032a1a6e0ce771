//! Store unit tests: round trip, late merges, windows, retention, and the files it refuses.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use super::*;
use crate::{
    collector::{Sink, SinkContext},
    context::TraceContext,
    export::{pprof, pprof_proto as pb, render::Stacks, synthetic},
    metrics::Metrics,
    process::ObjectStore,
    profile::{
        Aggregate, Frame, PodDetails, ProcessDetails,
        traces::{TraceTable, TraceTableConfig, TracedSample},
    },
    symbolize::Symbolizer,
};

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "profiler-store-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn db(&self) -> PathBuf {
        self.0.join("profiles.db")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const NS: u64 = 1_000_000_000;
const T0: u64 = 1_777_644_300 * NS;

/// The parts every `traces` row lists (its `trace_parts` rows and its parts in batches), and
/// what nothing lists: `trace_parts` rows no trace names, and batches whose `live` count is not
/// the number of parts that name them (one that should have been deleted, or one deleted too
/// early).
fn part_rows(db: &Path) -> (i64, i64) {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut listed = std::collections::HashSet::new();
    let mut batch_refs: HashMap<i64, i64> = HashMap::new();
    let mut parts = 0;
    let mut stmt = conn
        .prepare("SELECT part_ids, batch_parts FROM traces")
        .unwrap();
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
        .unwrap();
    for row in rows {
        let (ids, batch_parts) = row.unwrap();
        let ids = parse_part_ids(&ids);
        let batch_parts = BatchPart::parse_list(&batch_parts, Default::default());
        parts += (ids.len() + batch_parts.len()) as i64;
        listed.extend(ids);
        for p in batch_parts {
            *batch_refs.entry(p.batch).or_default() += 1;
        }
    }
    let mut stmt = conn.prepare("SELECT id FROM trace_parts").unwrap();
    let orphan_rows = stmt
        .query_map([], |r| r.get::<_, i64>(0))
        .unwrap()
        .filter(|id| !listed.contains(id.as_ref().unwrap()))
        .count() as i64;
    let mut stmt = conn.prepare("SELECT id, live FROM trace_batches").unwrap();
    let batches: HashMap<i64, i64> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(|row| row.unwrap())
        .collect();
    let miscounted = batches
        .iter()
        .filter(|(id, live)| batch_refs.get(id).copied().unwrap_or(0) != **live)
        .count() as i64;
    let missing = batch_refs
        .keys()
        .filter(|id| !batches.contains_key(id))
        .count() as i64;
    (parts, orphan_rows + miscounted + missing)
}

/// A trace's index record and the profile of its samples, as the store sink gathers them.
#[derive(Clone)]
struct Part {
    record: TraceRecord,
    profile: pb::Profile,
}

impl std::ops::Deref for Part {
    type Target = TraceRecord;
    fn deref(&self) -> &TraceRecord {
        &self.record
    }
}

impl std::ops::DerefMut for Part {
    fn deref_mut(&mut self) -> &mut TraceRecord {
        &mut self.record
    }
}

/// Each sample's labels as text, sorted, for comparing profiles whose tables differ.
fn sample_labels(p: &pb::Profile) -> Vec<Vec<String>> {
    let text = |i: i64| p.string_table[i as usize].clone();
    let mut samples: Vec<Vec<String>> = p
        .sample
        .iter()
        .map(|s| {
            let mut labels: Vec<String> = s
                .label
                .iter()
                .map(|l| format!("{}={}{}", text(l.key), text(l.str), l.num))
                .collect();
            labels.sort();
            labels
        })
        .collect();
    samples.sort();
    samples
}

/// Writes `parts` as one batch (one shared profile), with `buckets`.
fn write(store: &mut Store, parts: &[Part], buckets: &[BucketRecord]) -> super::Result<()> {
    let batch =
        TraceBatch::from_profiles(parts.iter().map(|p| (p.record.clone(), p.profile.clone())));
    store.write(&batch, buckets)
}

fn record(id: u8, part: u64, first: u64, samples_seed: u64, service: &str) -> Part {
    let trace_id = [id; 16];
    let profile = synthetic::trace_profile(trace_id, first, samples_seed);
    let record = TraceRecord {
        trace_id,
        part,
        first_ns: first,
        last_ns: first + NS,
        samples: u64::from(synthetic::SAMPLES),
        cpu_ns: 500_000_000,
        processes: vec![TraceProcess {
            pid: 100 + u32::from(id),
            process_name: format!("proc-{id}"),
            service: service.into(),
            // Odd ids run in the "shop" namespace, in pod `pod-<id>`; even ones outside Kubernetes.
            namespace: if id % 2 == 1 {
                "shop".into()
            } else {
                String::new()
            },
            pod: if id % 2 == 1 {
                format!("pod-{id:x}")
            } else {
                String::new()
            },
        }],
        spans: vec![[id, 0, 0, 0, 0, 0, 0, 1]],
        index: 0,
    };
    Part { record, profile }
}

fn bucket(start: u64, pid: u32, service: &str, seed: u64) -> BucketRecord {
    let profile = synthetic::trace_profile([9; 16], start, seed);
    BucketRecord {
        start_ns: start,
        end_ns: start + 10 * NS,
        pid,
        process_name: service.into(),
        service: service.into(),
        namespace: if pid == 2 {
            "shop".into()
        } else {
            String::new()
        },
        pod: if pid == 2 {
            "cart-0".into()
        } else {
            String::new()
        },
        samples: u64::from(synthetic::SAMPLES),
        cpu_ns: 500_000_000,
        profile: pprof::encode_gzip(&profile),
    }
}

#[test]
fn round_trip_and_filters() {
    let dir = TempDir::new("round-trip");
    let mut store = Store::open(&dir.db()).unwrap();
    let a = record(0xaa, T0, T0, 1, "checkout");
    let b = record(0xbb, T0 + NS, T0 + 5 * NS, 2, "cart");
    write(&mut store, &[a.clone(), b.clone()], &[]).unwrap();

    // A reader in parallel with the open writer (WAL).
    let reader = StoreReader::open(&dir.db()).unwrap();
    let summary = reader.trace(&[0xaa; 16]).unwrap();
    assert_eq!(summary.samples, u64::from(synthetic::SAMPLES));
    assert_eq!((summary.first_unix_ns, summary.last_unix_ns), (T0, T0 + NS));
    assert_eq!(summary.services, vec!["checkout".to_owned()]);
    assert_eq!(summary.parts, 1);
    // Cut out of the batch's profile: its own samples, labels and dictionary only.
    let stored = pprof::decode(&reader.trace_pprof(&[0xaa; 16]).unwrap()).unwrap();
    assert_eq!(Stacks::of(&stored).folded, Stacks::of(&a.profile).folded);
    assert_eq!(sample_labels(&stored), sample_labels(&a.profile));
    assert!(
        !stored
            .string_table
            .iter()
            .any(|s| s == PART_LABEL || s.contains("bbbbbbbb")),
        "only what trace aa's samples use: {:?}",
        stored.string_table
    );
    assert_eq!(
        (stored.time_nanos, stored.duration_nanos),
        (T0 as i64, NS as i64)
    );
    assert_eq!(
        Stacks::of(&reader.trace_profile(&[0xbb; 16]).unwrap()).folded,
        Stacks::of(&b.profile).folded
    );
    let (processes, spans) = reader.trace_detail(&[0xaa; 16]).unwrap();
    assert_eq!(processes[0].pid, 100 + 0xaa);
    assert_eq!(spans, vec!["aa00000000000001".to_owned()]);

    let list = |filter: TraceFilter| -> Vec<u8> {
        reader
            .traces(&TraceFilter {
                limit: 10,
                ..filter
            })
            .unwrap()
            .iter()
            .map(|t| t.trace_id[0])
            .collect()
    };
    assert_eq!(
        list(TraceFilter::default()),
        vec![0xbb, 0xaa],
        "most recent first"
    );
    let by_service = TraceFilter {
        service: Some("checkout".into()),
        ..Default::default()
    };
    assert_eq!(list(by_service), vec![0xaa]);
    let by_pid = TraceFilter {
        pid: Some(100 + 0xbb),
        ..Default::default()
    };
    assert_eq!(list(by_pid), vec![0xbb]);
    let by_span = TraceFilter {
        span_id: Some([0xbb, 0, 0, 0, 0, 0, 0, 1]),
        ..Default::default()
    };
    assert_eq!(list(by_span), vec![0xbb]);
    let since = TraceFilter {
        since_ns: Some(T0 + 3 * NS),
        ..Default::default()
    };
    assert_eq!(list(since), vec![0xbb]);
    let by_namespace = TraceFilter {
        namespace: Some("shop".into()),
        ..Default::default()
    };
    assert_eq!(list(by_namespace), vec![0xbb]);
    let by_pod = TraceFilter {
        namespace: Some("shop".into()),
        pod: Some("pod-bb".into()),
        ..Default::default()
    };
    assert_eq!(list(by_pod), vec![0xbb]);
    let other_pod = TraceFilter {
        pod: Some("pod-aa".into()),
        ..Default::default()
    };
    assert_eq!(list(other_pod), Vec::<u8>::new());
    let (processes, _) = reader.trace_detail(&[0xbb; 16]).unwrap();
    assert_eq!(
        (processes[0].namespace.as_str(), processes[0].pod.as_str()),
        ("shop", "pod-bb")
    );
    assert!(matches!(
        reader.trace(&[0xcc; 16]),
        Err(StoreError::TraceNotFound(_))
    ));
    assert!(matches!(
        reader.trace_pprof(&[0xcc; 16]),
        Err(StoreError::TraceNotFound(_))
    ));

    // Survives closing and reopening (an agent restart).
    drop(reader);
    drop(store);
    let store = Store::open(&dir.db()).unwrap();
    let reader = StoreReader::open(&dir.db()).unwrap();
    assert_eq!(reader.trace(&[0xbb; 16]).unwrap().services, vec!["cart"]);
    assert_eq!(reader.stats().unwrap().traces, 2);
    drop(store);
}

#[test]
fn late_samples_replace_their_part_and_new_incarnations_merge() {
    let dir = TempDir::new("late");
    let mut store = Store::open(&dir.db()).unwrap();
    write(&mut store, &[record(0xaa, T0, T0, 1, "s")], &[]).unwrap();
    // The same incarnation flushed again with late samples: replaces.
    let mut late = record(0xaa, T0, T0, 1, "s");
    late.samples = 80;
    late.last_ns = T0 + 9 * NS;
    write(&mut store, &[late], &[]).unwrap();
    let reader = StoreReader::open(&dir.db()).unwrap();
    let t = reader.trace(&[0xaa; 16]).unwrap();
    assert_eq!((t.samples, t.parts, t.last_unix_ns), (80, 1, T0 + 9 * NS));
    assert_eq!(
        part_rows(&dir.db()),
        (1, 0),
        "the re-flush replaced its part's row"
    );

    // A new incarnation (after the agent's late window, or a restart): added, then merged.
    let mut again = record(0xaa, T0 + 600 * NS, T0 + 600 * NS, 2, "s2");
    again.processes[0].pid = 7;
    write(&mut store, &[again], &[]).unwrap();
    let t = reader.trace(&[0xaa; 16]).unwrap();
    assert_eq!(
        (t.samples, t.parts),
        (80 + u64::from(synthetic::SAMPLES), 2)
    );
    assert_eq!((t.first_unix_ns, t.last_unix_ns), (T0, T0 + 601 * NS));
    assert_eq!(t.services, vec!["s", "s2"]);
    assert_eq!(part_rows(&dir.db()), (2, 0));
    // A late re-flush of the first incarnation, now that there are two: still replaces.
    let mut later = record(0xaa, T0, T0, 1, "s");
    later.samples = 90;
    later.last_ns = T0 + 10 * NS;
    write(&mut store, &[later], &[]).unwrap();
    let t = reader.trace(&[0xaa; 16]).unwrap();
    assert_eq!(
        (t.samples, t.parts),
        (90 + u64::from(synthetic::SAMPLES), 2)
    );
    assert_eq!(part_rows(&dir.db()), (2, 0));
    let merged = Stacks::of(&reader.trace_profile(&[0xaa; 16]).unwrap());
    assert_eq!(merged.total_samples, 2 * u64::from(synthetic::SAMPLES));
    let raw = pprof::decode(&reader.trace_pprof(&[0xaa; 16]).unwrap()).unwrap();
    assert_eq!(Stacks::of(&raw).folded, merged.folded);

    // Flushed twice in one batch (late samples within the batch's 2 s): the later one counts.
    let mut twice = record(0xcc, T0, T0, 1, "s");
    twice.samples = 3;
    let mut again = twice.clone();
    again.samples = 5;
    again.profile = record(0xcc, T0, T0, 5, "s").profile;
    write(&mut store, &[twice, again.clone()], &[]).unwrap();
    assert_eq!(reader.trace(&[0xcc; 16]).unwrap().samples, 5);
    assert_eq!(
        Stacks::of(&reader.trace_profile(&[0xcc; 16]).unwrap()).folded,
        Stacks::of(&again.profile).folded
    );
}

#[test]
fn windows_merge_buckets_of_a_service() {
    let dir = TempDir::new("window");
    let mut store = Store::open(&dir.db()).unwrap();
    write(
        &mut store,
        &[],
        &[
            bucket(T0, 1, "checkout", 1),
            bucket(T0 + 10 * NS, 1, "checkout", 2),
            bucket(T0 + 10 * NS, 2, "cart", 3),
            bucket(T0 + 100 * NS, 1, "checkout", 4),
        ],
    )
    .unwrap();
    let reader = StoreReader::open(&dir.db()).unwrap();
    let window = Window {
        service: Some("checkout".into()),
        from_ns: T0 + 5 * NS,
        to_ns: T0 + 15 * NS,
        ..Default::default()
    };
    let (profile, covered) = reader.window_profile(&window).unwrap();
    assert_eq!(
        Stacks::of(&profile).total_samples,
        2 * u64::from(synthetic::SAMPLES)
    );
    assert_eq!(covered, (T0, T0 + 20 * NS));
    let everything = Window {
        service: None,
        ..window.clone()
    };
    let (profile, _) = reader.window_profile(&everything).unwrap();
    assert_eq!(
        Stacks::of(&profile).total_samples,
        3 * u64::from(synthetic::SAMPLES)
    );
    let one_pod = Window {
        namespace: Some("shop".into()),
        pod: Some("cart-0".into()),
        ..everything.clone()
    };
    let (profile, _) = reader.window_profile(&one_pod).unwrap();
    assert_eq!(
        Stacks::of(&profile).total_samples,
        u64::from(synthetic::SAMPLES)
    );
    let no_such_pod = Window {
        pod: Some("cart-1".into()),
        ..one_pod
    };
    match reader.window_profile(&no_such_pod) {
        Err(StoreError::NoSamples(what)) => {
            assert_eq!(what, "namespace shop, pod cart-1 in that window", "{what}")
        }
        other => panic!("{other:?}"),
    }
    let empty = Window {
        from_ns: T0 + 50 * NS,
        to_ns: T0 + 60 * NS,
        ..window
    };
    assert!(matches!(
        reader.window_profile(&empty),
        Err(StoreError::NoSamples(_))
    ));
    let services = reader.services(0).unwrap();
    assert_eq!(services[0].service, "checkout");
    assert_eq!(services[0].samples, 3 * u64::from(synthetic::SAMPLES));
}

#[test]
fn retention_by_age_and_by_size_is_counted() {
    let dir = TempDir::new("retention");
    let mut store = Store::open(&dir.db()).unwrap();
    let old = record(1, T0, T0, 1, "s");
    let new = record(2, T0 + 3600 * NS, T0 + 3600 * NS, 2, "s");
    write(
        &mut store,
        &[old, new],
        &[bucket(T0, 1, "s", 1), bucket(T0 + 3600 * NS, 1, "s", 2)],
    )
    .unwrap();
    let day = Retention {
        max_age: Duration::from_secs(1800),
        max_bytes: u64::MAX,
    };
    let outcome = store.enforce_retention(&day, T0 + 3700 * NS).unwrap();
    assert_eq!(
        outcome,
        RetentionOutcome {
            traces_by_age: 1,
            buckets_by_age: 1,
            ..Default::default()
        }
    );
    let reader = StoreReader::open(&dir.db()).unwrap();
    assert!(reader.trace(&[1; 16]).is_err());
    assert!(reader.trace(&[2; 16]).is_ok());
    // Nothing in the other tables refers to the deleted trace any more.
    let by_span = TraceFilter {
        span_id: Some([1, 0, 0, 0, 0, 0, 0, 1]),
        limit: 10,
        ..Default::default()
    };
    assert!(reader.traces(&by_span).unwrap().is_empty());
    assert_eq!(
        part_rows(&dir.db()),
        (1, 0),
        "the deleted trace's part went with it"
    );

    // Size: 300 traces of a few KiB each, then a cap of a quarter of that.
    let many: Vec<Part> = (0..300u32)
        .map(|i| {
            let mut r = record(
                3,
                T0 + 4000 * NS + u64::from(i) * NS,
                T0 + 4000 * NS,
                u64::from(i),
                "s",
            );
            r.trace_id = [
                (i % 251) as u8,
                (i / 251) as u8,
                7,
                7,
                7,
                7,
                7,
                7,
                7,
                7,
                7,
                7,
                7,
                7,
                7,
                7,
            ];
            r.first_ns += u64::from(i) * NS;
            r.last_ns += u64::from(i) * NS;
            r
        })
        .collect();
    // In batches, as the agent writes them: a batch's profile goes with its last trace.
    for batch in many.chunks(10) {
        write(&mut store, batch, &[]).unwrap();
    }
    let full = store.used_bytes().unwrap();
    let cap = Retention {
        max_age: Duration::from_secs(1 << 30),
        max_bytes: full / 4,
    };
    let outcome = store.enforce_retention(&cap, T0 + 5000 * NS).unwrap();
    assert!(outcome.traces_by_size > 150, "{outcome:?}");
    assert!(store.used_bytes().unwrap() <= full / 4);
    let (rows, orphans) = part_rows(&dir.db());
    assert_eq!(orphans, 0);
    assert!(rows < 150, "{rows} parts left");
    // The freed pages went back to the file system, but for an eighth of those in use.
    let pages = |name: &str| -> i64 {
        rusqlite::Connection::open(dir.db())
            .unwrap()
            .pragma_query_value(None, name, |r| r.get(0))
            .unwrap()
    };
    let (total, free) = (pages("page_count"), pages("freelist_count"));
    assert!(
        free <= (total - free) / 8 + 1,
        "{free} of {total} pages free"
    );
    assert!(
        (total as u64) * 4096 <= full / 2,
        "{total} pages for {} bytes that were in use",
        full
    );
    // The newest traces are the ones kept.
    let newest = [
        (299 % 251) as u8,
        (299 / 251) as u8,
        7,
        7,
        7,
        7,
        7,
        7,
        7,
        7,
        7,
        7,
        7,
        7,
        7,
        7,
    ];
    assert!(reader.trace(&newest).is_ok());
    assert!(
        reader
            .trace(&[0, 0, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7])
            .is_err()
    );
}

fn write_bytes_at(path: &Path, offset: u64, bytes: &[u8]) {
    use std::{
        io::{Seek, SeekFrom, Write},
        os::unix::fs::FileExt as _,
    };
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
    f.seek(SeekFrom::End(0)).unwrap();
    f.flush().unwrap();
}

#[test]
fn corrupt_files_are_refused_and_left_untouched() {
    let dir = TempDir::new("corrupt");
    // Not a database at all.
    std::fs::write(dir.db(), vec![0x42; 8192]).unwrap();
    let err = Store::open(&dir.db()).err().expect("refused");
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("left untouched"), "{err}");
    assert!(matches!(
        StoreReader::open(&dir.db()),
        Err(StoreError::Corrupt { .. })
    ));
    assert_eq!(std::fs::read(dir.db()).unwrap(), vec![0x42; 8192]);

    // A real store with a damaged page.
    std::fs::remove_file(dir.db()).unwrap();
    let mut store = Store::open(&dir.db()).unwrap();
    let traces: Vec<_> = (1..=40)
        .map(|i| record(i, T0, T0, u64::from(i), "s"))
        .collect();
    write(&mut store, &traces, &[]).unwrap();
    store.checkpoint();
    drop(store);
    let len = std::fs::metadata(dir.db()).unwrap().len();
    write_bytes_at(&dir.db(), len / 2, &[0xff; 4096]);
    write_bytes_at(&dir.db(), 4096 * 2, &[0xff; 4096]);
    let before = std::fs::read(dir.db()).unwrap();
    let err = Store::open(&dir.db()).err().expect("refused");
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    assert_eq!(std::fs::read(dir.db()).unwrap(), before, "never rewritten");
}

#[test]
fn foreign_missing_and_locked_files_are_clear_errors() {
    let dir = TempDir::new("foreign");
    assert!(matches!(
        StoreReader::open(&dir.db()),
        Err(StoreError::Missing(_))
    ));
    let other = rusqlite::Connection::open(dir.db()).unwrap();
    other.execute_batch("CREATE TABLE mine (x);").unwrap();
    drop(other);
    let err = Store::open(&dir.db()).err().expect("refused");
    assert!(matches!(err, StoreError::Foreign { .. }), "{err}");
    std::fs::remove_file(dir.db()).unwrap();

    // A second writer (another agent) on the same store.
    let store = Store::open(&dir.db()).unwrap();
    let err = Store::open(&dir.db()).err().expect("refused");
    assert!(matches!(err, StoreError::Locked { .. }), "{err}");
    assert!(err.to_string().contains("another profiler agent"), "{err}");
    drop(store);

    // Another program holding SQLite's write lock.
    let holder = rusqlite::Connection::open(dir.db()).unwrap();
    holder.execute_batch("BEGIN IMMEDIATE;").unwrap();
    let err = Store::open(&dir.db()).err().expect("refused");
    assert!(matches!(err, StoreError::Locked { .. }), "{err}");
    // Readers are not blocked by a writer (WAL).
    assert!(StoreReader::open(&dir.db()).unwrap().stats().is_ok());
    holder.execute_batch("COMMIT;").unwrap();
}

/// One sample of process 5, thread 6 ("w" of "app"), into both the interval aggregate and the
/// trace table, as the collector adds it.
fn add_traced(
    aggregate: &mut Aggregate,
    table: &mut TraceTable,
    context: &TraceContext,
    details: &Arc<ProcessDetails>,
    frames: Vec<Frame>,
    unix_ns: u64,
) {
    let stack = aggregate.add(5, 6, frames, Some(context), unix_ns);
    table.add(TracedSample {
        context,
        pid: 5,
        tid: 6,
        thread_name: "w",
        process_name: "app",
        details,
        stack: aggregate.stacks.shared(stack),
        unix_ns,
    });
}

/// A store sink writing a new store in `dir` (nothing old enough to delete), and the metrics,
/// symbolizer and object store a collector would drive it with.
fn sink_on(dir: &TempDir) -> (Metrics, StoreSink, Symbolizer, ObjectStore) {
    let metrics = Metrics::default();
    let store = Store::open(&dir.db()).unwrap();
    let retention = Retention {
        max_age: Duration::from_secs(86_400 * 365 * 100),
        max_bytes: u64::MAX,
    };
    let sink = StoreSink::start(store, retention, metrics.clone()).unwrap();
    let symbolizer = Symbolizer::new(metrics.clone());
    let objects = ObjectStore::new(16, metrics.clone());
    (metrics, sink, symbolizer, objects)
}

/// The sink path as the collector drives it: a trace handed out, revived by a late sample and
/// handed out again, and an interval; everything is written when the sink is dropped.
#[test]
fn sink_writes_traces_and_buckets_through_its_writer() {
    let dir = TempDir::new("sink");
    let (metrics, mut sink, mut symbolizer, objects) = sink_on(&dir);
    let mut cx = SinkContext {
        symbolizer: &mut symbolizer,
        objects: &objects,
        frequency_hz: 100,
    };
    let context = TraceContext {
        trace_id: [0xaa; 16],
        span_id: [1; 8],
        sampled: true,
        labels: Arc::new([]),
    };
    let mut table = TraceTable::new(TraceTableConfig {
        idle_timeout_ns: 10,
        ..Default::default()
    });
    let mut aggregate = Aggregate::default();
    let now = crate::query::unix_ns(std::time::SystemTime::now());
    let details = Arc::new(ProcessDetails {
        exe_name: "app".into(),
        context_service_name: Some("svc".into()),
        pod: Some(PodDetails {
            namespace: "shop".into(),
            name: "app-0".into(),
            ..Default::default()
        }),
        ..Default::default()
    });
    let mut add = |table: &mut TraceTable, t: u64| {
        let frames = vec![Frame::Kernel { address: 1 }];
        add_traced(&mut aggregate, table, &context, &details, frames, t);
    };
    add(&mut table, now);
    add(&mut table, now + 1);
    table.flush_idle(now + 100, |p| sink.trace(p, &mut cx));
    add(&mut table, now + 200);
    table.flush_idle(now + 300, |p| sink.trace(p, &mut cx));
    aggregate.process_names.insert(5, "app".into());
    sink.interval(&aggregate, (now, now + 300), &mut cx);
    drop(sink);
    let reader = StoreReader::open(&dir.db()).unwrap();
    let t = reader.trace(&[0xaa; 16]).unwrap();
    assert_eq!(
        (t.samples, t.parts),
        (3, 1),
        "the late flush replaced the first"
    );
    assert_eq!(t.services, vec!["svc"]);
    assert_eq!(metrics.get("store_traces_written"), 2);
    assert_eq!(metrics.get("store_buckets_written"), 1);
    let window = Window {
        from_ns: now,
        to_ns: now + 300,
        ..Default::default()
    };
    let (profile, _) = reader.window_profile(&window).unwrap();
    let stacks = Stacks::of(&profile);
    assert_eq!(stacks.total_samples, 3);
    let labels: HashMap<&str, &str> = profile.sample[0]
        .label
        .iter()
        .map(|l| {
            (
                profile.string_table[l.key as usize].as_str(),
                profile.string_table[l.str as usize].as_str(),
            )
        })
        .collect();
    assert_eq!(labels["traced"], "true");
    assert_eq!(labels["process_name"], "app");
}

/// Many traces through the sink: batches are cut by samples as well as records, and every
/// trace reads back with its own samples and labels only.
#[test]
fn sink_batches_read_back_one_trace_each() {
    let dir = TempDir::new("sink-batches");
    let (metrics, mut sink, mut symbolizer, objects) = sink_on(&dir);
    let mut cx = SinkContext {
        symbolizer: &mut symbolizer,
        objects: &objects,
        frequency_hz: 100,
    };
    let mut table = TraceTable::new(TraceTableConfig {
        idle_timeout_ns: 10,
        ..Default::default()
    });
    let mut aggregate = Aggregate::default();
    let now = crate::query::unix_ns(std::time::SystemTime::now());
    let details = Arc::new(ProcessDetails::default());
    // 300 traces of 1 + i % 20 distinct stacks: ~3,150 samples, more than one batch holds.
    let traces = 300u64;
    let mut expected = Vec::new();
    for i in 0..traces {
        let context = TraceContext {
            trace_id: [
                (i % 251) as u8,
                (i / 251) as u8,
                0x5e,
                1,
                1,
                1,
                1,
                1,
                1,
                1,
                1,
                1,
                1,
                1,
                1,
                1,
            ],
            span_id: [i as u8; 8],
            sampled: true,
            labels: Arc::new([]),
        };
        let stacks = 1 + i % 20;
        for s in 0..stacks {
            let frames = vec![
                Frame::Kernel {
                    address: 0x1000 + s,
                },
                Frame::Kernel { address: i },
            ];
            let t = now + i * 1000 + s;
            add_traced(&mut aggregate, &mut table, &context, &details, frames, t);
        }
        expected.push((context.trace_id, stacks));
        table.flush_idle(now + i * 1000 + 500, |p| sink.trace(p, &mut cx));
    }
    drop(sink);
    assert_eq!(metrics.get("store_traces_written"), traces);
    let batches: i64 = rusqlite::Connection::open(dir.db())
        .unwrap()
        .query_row("SELECT count(*) FROM trace_batches", [], |r| r.get(0))
        .unwrap();
    assert!(batches >= 2, "{batches} batches");
    let reader = StoreReader::open(&dir.db()).unwrap();
    for (trace_id, stacks) in expected {
        let profile = reader.trace_profile(&trace_id).unwrap();
        assert_eq!(Stacks::of(&profile).total_samples, stacks);
        let hex = crate::context::hex(&trace_id);
        for sample in &profile.sample {
            let text = |i: i64| profile.string_table[i as usize].as_str();
            let keys: Vec<&str> = sample.label.iter().map(|l| text(l.key)).collect();
            assert!(!keys.contains(&PART_LABEL), "{keys:?}");
            let trace = sample
                .label
                .iter()
                .find(|l| text(l.key) == "trace_id")
                .unwrap();
            assert_eq!(text(trace.str), hex);
        }
    }
}

/// What a version 3 agent left: its schema, verbatim, with trace 0xaa (two processes, two
/// spans, one part) and then `more` (SQL run on the connection: the older versions).
fn version_3_store(path: &Path, more: &str) -> Vec<u8> {
    let profile = pprof::encode_gzip(&synthetic::trace_profile([0xaa; 16], T0, 1));
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.execute_batch(&format!(
        "PRAGMA application_id = {APPLICATION_ID};
         CREATE TABLE traces (trace_id BLOB PRIMARY KEY, first_ns INTEGER NOT NULL,
             last_ns INTEGER NOT NULL, samples INTEGER NOT NULL, cpu_ns INTEGER NOT NULL,
             bytes INTEGER NOT NULL, parts INTEGER NOT NULL, services TEXT NOT NULL)
             WITHOUT ROWID;
         CREATE INDEX traces_by_last ON traces (last_ns);
         CREATE TABLE trace_parts (trace_id BLOB NOT NULL, part INTEGER NOT NULL,
             first_ns INTEGER NOT NULL, last_ns INTEGER NOT NULL, samples INTEGER NOT NULL,
             cpu_ns INTEGER NOT NULL, bytes INTEGER NOT NULL, profile BLOB NOT NULL,
             PRIMARY KEY (trace_id, part));
         CREATE TABLE trace_processes (trace_id BLOB NOT NULL, pid INTEGER NOT NULL,
             service TEXT NOT NULL, process_name TEXT NOT NULL,
             namespace TEXT NOT NULL DEFAULT '', pod TEXT NOT NULL DEFAULT '',
             PRIMARY KEY (trace_id, pid)) WITHOUT ROWID;
         CREATE TABLE trace_spans (trace_id BLOB NOT NULL, span_id BLOB NOT NULL,
             PRIMARY KEY (trace_id, span_id)) WITHOUT ROWID;
         CREATE TABLE buckets (id INTEGER PRIMARY KEY, start_ns INTEGER NOT NULL,
             end_ns INTEGER NOT NULL, pid INTEGER NOT NULL, service TEXT NOT NULL,
             process_name TEXT NOT NULL, namespace TEXT NOT NULL DEFAULT '',
             pod TEXT NOT NULL DEFAULT '', samples INTEGER NOT NULL, cpu_ns INTEGER NOT NULL,
             bytes INTEGER NOT NULL, profile BLOB NOT NULL);
         CREATE INDEX buckets_by_end ON buckets (end_ns);
         CREATE INDEX buckets_by_service ON buckets (service, end_ns);
         INSERT INTO traces VALUES (x'{id}', {T0}, {T0} + 5, 7, 70, {len}, 1, 'cart
checkout');
         INSERT INTO trace_parts VALUES (x'{id}', {T0}, {T0}, {T0} + 5, 7, 70, {len}, x'{hex}');
         INSERT INTO trace_processes VALUES (x'{id}', 9, 'checkout', 'co', 'shop', 'co-1'),
                                            (x'{id}', 3, 'cart', 'ca', '', '');
         INSERT INTO trace_spans VALUES (x'{id}', x'0200000000000000'),
                                        (x'{id}', x'0100000000000000');
         PRAGMA user_version = 3;
         {more}",
        id = "aa".repeat(16),
        len = profile.len(),
        hex = crate::context::hex(&profile),
    ))
    .unwrap();
    profile
}

fn refused_as_outdated(path: &Path, expected: i32) {
    match StoreReader::open(path) {
        Err(e @ StoreError::Outdated { version, .. }) => {
            assert_eq!(version, expected);
            assert!(e.to_string().contains("upgrades it when it starts"), "{e}")
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a version {expected} store was read as it is"),
    }
}

#[test]
fn a_version_3_store_is_upgraded_by_the_agent_and_refused_by_readers_until_then() {
    let dir = TempDir::new("migrate4");
    let profile = version_3_store(&dir.db(), "");
    refused_as_outdated(&dir.db(), 3);
    let mut store = Store::open(&dir.db()).unwrap();
    let reader = StoreReader::open(&dir.db()).unwrap();
    let version: i32 = rusqlite::Connection::open(dir.db())
        .unwrap()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    // The processes and spans moved into the trace's row, by pid and by span id.
    let (processes, spans) = reader.trace_detail(&[0xaa; 16]).unwrap();
    let pids: Vec<u32> = processes.iter().map(|p| p.pid).collect();
    assert_eq!(pids, vec![3, 9]);
    assert_eq!(
        (processes[1].namespace.as_str(), processes[1].pod.as_str()),
        ("shop", "co-1")
    );
    assert_eq!(spans, vec!["0100000000000000", "0200000000000000"]);
    assert_eq!(reader.trace_pprof(&[0xaa; 16]).unwrap(), profile);
    let found = |filter: TraceFilter| {
        reader
            .traces(&TraceFilter {
                limit: 10,
                ..filter
            })
            .unwrap()
            .len()
    };
    assert_eq!(
        found(TraceFilter {
            pid: Some(9),
            ..TraceFilter::default()
        }),
        1
    );
    assert_eq!(
        found(TraceFilter {
            pid: Some(4),
            ..TraceFilter::default()
        }),
        0
    );
    assert_eq!(
        found(TraceFilter {
            span_id: Some([2, 0, 0, 0, 0, 0, 0, 0]),
            ..TraceFilter::default()
        }),
        1
    );
    assert_eq!(
        found(TraceFilter {
            pod: Some("co-1".into()),
            ..TraceFilter::default()
        }),
        1
    );
    // A new part of the old trace adds its process and span to what the row had.
    let mut late = record(0xaa, T0 + 60 * NS, T0 + 60 * NS, 2, "late");
    late.processes[0].pid = 5;
    write(&mut store, &[late], &[]).unwrap();
    let (processes, spans) = reader.trace_detail(&[0xaa; 16]).unwrap();
    let pids: Vec<u32> = processes.iter().map(|p| p.pid).collect();
    assert_eq!(pids, vec![3, 5, 9]);
    assert_eq!(spans.len(), 3);
    let summary = reader.trace(&[0xaa; 16]).unwrap();
    assert_eq!(summary.parts, 2);
    assert_eq!(summary.services, vec!["cart", "checkout", "late"]);
    let tables: i64 = rusqlite::Connection::open(dir.db())
        .unwrap()
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE name IN ('trace_processes', 'trace_spans')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(tables, 0);
    drop(store);
}

#[test]
fn a_version_1_store_is_upgraded_by_the_agent_and_refused_by_readers_until_then() {
    let dir = TempDir::new("migrate");
    // Take the version 2 additions back out: what a version 1 agent left.
    version_3_store(
        &dir.db(),
        "ALTER TABLE trace_processes DROP COLUMN namespace;
         ALTER TABLE trace_processes DROP COLUMN pod;
         ALTER TABLE buckets DROP COLUMN namespace;
         ALTER TABLE buckets DROP COLUMN pod;
         PRAGMA user_version = 1;",
    );
    refused_as_outdated(&dir.db(), 1);
    let mut store = Store::open(&dir.db()).unwrap();
    write(&mut store, &[record(0xbb, T0, T0, 1, "new")], &[]).unwrap();
    let reader = StoreReader::open(&dir.db()).unwrap();
    let (processes, _) = reader.trace_detail(&[0xbb; 16]).unwrap();
    assert_eq!(processes[0].namespace, "shop");
    let (processes, _) = reader.trace_detail(&[0xaa; 16]).unwrap();
    assert_eq!(processes.len(), 2);
    assert_eq!(processes[1].namespace, "", "version 1 had no pods");
    drop(store);
}

#[test]
fn a_version_2_store_loses_its_unused_indexes_when_the_agent_upgrades_it() {
    let dir = TempDir::new("migrate3");
    // What a version 2 agent left: the same tables plus four secondary indexes.
    version_3_store(
        &dir.db(),
        "CREATE INDEX trace_processes_by_service ON trace_processes (service, trace_id);
         CREATE INDEX trace_processes_by_pid ON trace_processes (pid, trace_id);
         CREATE INDEX trace_processes_by_pod ON trace_processes (namespace, pod, trace_id);
         CREATE INDEX trace_spans_by_span ON trace_spans (span_id);
         PRAGMA user_version = 2;",
    );
    refused_as_outdated(&dir.db(), 2);
    let store = Store::open(&dir.db()).unwrap();
    let indexes: i64 = rusqlite::Connection::open(dir.db())
        .unwrap()
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE type = 'index' AND name IN \
             ('trace_processes_by_service', 'trace_processes_by_pid', \
              'trace_processes_by_pod', 'trace_spans_by_span')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(indexes, 0, "the agent dropped the unused indexes");
    let checkout = StoreReader::open(&dir.db())
        .unwrap()
        .traces(&TraceFilter {
            service: Some("checkout".into()),
            limit: 10,
            ..TraceFilter::default()
        })
        .unwrap();
    assert_eq!(checkout.len(), 1);
    drop(store);
}

#[test]
fn an_older_trace_of_two_parts_keeps_both_in_order_when_upgraded() {
    let dir = TempDir::new("migrate5");
    let second = pprof::encode_gzip(&synthetic::trace_profile([0xaa; 16], T0 + 600 * NS, 2));
    let first = version_3_store(
        &dir.db(),
        &format!(
            "INSERT INTO trace_parts VALUES (x'{id}', {T0} + 600000000000, {T0} + 600000000000,
                 {T0} + 600000000005, 3, 30, {len}, x'{hex}');
             UPDATE traces SET parts = 2, samples = 10, last_ns = {T0} + 600000000005;",
            id = "aa".repeat(16),
            len = second.len(),
            hex = crate::context::hex(&second),
        ),
    );
    let store = Store::open(&dir.db()).unwrap();
    let reader = StoreReader::open(&dir.db()).unwrap();
    let t = reader.trace(&[0xaa; 16]).unwrap();
    assert_eq!((t.parts, t.samples), (2, 10));
    assert_eq!(part_rows(&dir.db()), (2, 0));
    let expected = |bytes: &[u8]| Stacks::of(&pprof::decode(bytes).unwrap()).total_samples;
    assert_eq!(
        Stacks::of(&reader.trace_profile(&[0xaa; 16]).unwrap()).total_samples,
        expected(&first) + expected(&second)
    );
    let ids: String = rusqlite::Connection::open(dir.db())
        .unwrap()
        .query_row("SELECT part_ids FROM traces", [], |r| r.get(0))
        .unwrap();
    let parts: Vec<i64> = parse_part_ids(&ids)
        .into_iter()
        .map(|id| {
            rusqlite::Connection::open(dir.db())
                .unwrap()
                .query_row("SELECT part FROM trace_parts WHERE id = ?1", [id], |r| {
                    r.get(0)
                })
                .unwrap()
        })
        .collect();
    assert_eq!(
        parts,
        vec![T0 as i64, (T0 + 600 * NS) as i64],
        "oldest part first"
    );
    // No index on trace_parts: a new trace costs one random-key insert (`traces`).
    let indexes: i64 = rusqlite::Connection::open(dir.db())
        .unwrap()
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE type = 'index' AND tbl_name = 'trace_parts'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(indexes, 0);

    // Parts written since (in a batch's profile) merge with the older ones, and a re-flush of
    // an older part replaces it.
    let mut store = store;
    let third = record(0xaa, T0 + 1200 * NS, T0 + 1200 * NS, 3, "s3");
    let refreshed = record(0xaa, T0, T0, 4, "checkout");
    write(&mut store, &[third.clone(), refreshed.clone()], &[]).unwrap();
    let t = reader.trace(&[0xaa; 16]).unwrap();
    assert_eq!(t.parts, 3);
    let total = |p: &pb::Profile| Stacks::of(p).total_samples;
    assert_eq!(
        total(&reader.trace_profile(&[0xaa; 16]).unwrap()),
        total(&refreshed.profile) + expected(&second) + total(&third.profile)
    );
    assert_eq!(part_rows(&dir.db()), (3, 0));
    drop(store);
}

/// The `traces` table's own definition, as SQLite keeps it.
fn traces_table_sql(db: &Path) -> String {
    rusqlite::Connection::open(db)
        .unwrap()
        .query_row(
            "SELECT sql FROM sqlite_schema WHERE type = 'table' AND name = 'traces'",
            [],
            |r| r.get(0),
        )
        .unwrap()
}

#[test]
fn a_version_6_store_is_read_as_it_is_and_gets_a_rowid_traces_table_from_the_agent() {
    let dir = TempDir::new("migrate7");
    // Version 3 brought to 6 by its own migrations: what a version 6 agent left.
    let profile = version_3_store(&dir.db(), "");
    {
        let conn = rusqlite::Connection::open(dir.db()).unwrap();
        for (from, migration) in MIGRATIONS.iter().enumerate().take(5).skip(2) {
            conn.execute_batch(&format!(
                "BEGIN; {migration} PRAGMA user_version = {}; COMMIT;",
                from + 2
            ))
            .unwrap();
        }
    }
    assert!(traces_table_sql(&dir.db()).contains("WITHOUT ROWID"));
    // Readers see no difference between versions 6 and 7.
    let before = StoreReader::open(&dir.db()).unwrap();
    assert_eq!(before.trace(&[0xaa; 16]).unwrap().samples, 7);
    drop(before);

    let mut store = Store::open(&dir.db()).unwrap();
    assert!(!traces_table_sql(&dir.db()).contains("WITHOUT ROWID"));
    let reader = StoreReader::open(&dir.db()).unwrap();
    assert_eq!(reader.trace_pprof(&[0xaa; 16]).unwrap(), profile);
    let (processes, spans) = reader.trace_detail(&[0xaa; 16]).unwrap();
    assert_eq!(processes.len(), 2);
    assert_eq!(spans.len(), 2);
    // The trace id stays unique: a new part of the old trace updates its row, a new trace
    // adds one.
    write(
        &mut store,
        &[
            record(0xaa, T0 + 60 * NS, T0 + 60 * NS, 2, "late"),
            record(0xbb, T0, T0 + NS, 3, "new"),
        ],
        &[],
    )
    .unwrap();
    assert_eq!(reader.stats().unwrap().traces, 2);
    assert_eq!(reader.trace(&[0xaa; 16]).unwrap().parts, 2);
    assert_eq!(part_rows(&dir.db()), (3, 0));
    let duplicate = rusqlite::Connection::open(dir.db()).unwrap().execute(
        "INSERT INTO traces (trace_id, first_ns, last_ns, samples, cpu_ns, bytes, parts, \
         services) SELECT trace_id, 0, 0, 0, 0, 0, 0, '' FROM traces",
        [],
    );
    assert!(duplicate.is_err(), "traces_by_id refuses a second row");
    drop(store);
}
