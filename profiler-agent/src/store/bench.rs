//! `profiler-agent bench-store` (run by `cargo xtask bench`): fills a fresh store with
//! synthetic traces (`export::synthetic`, the shape of a real request's profile), then times
//! what `query --trace-id` and `GET /api/traces/{id}/top` do for one random trace: open the
//! database read-only, look the trace up, read its profile, decode it and build the top table.
//! Also reports the store's bytes per trace.

use std::{path::Path, time::Instant};

use super::{
    Result, Store, StoreError, StoreReader, TraceBatch, TraceProcess, TraceRecord, file_bytes,
};
use crate::export::{pprof, render::Stacks, synthetic};

#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    pub traces: u32,
    pub queries: u32,
    /// Writing every trace, in batches of 500 (one transaction each).
    pub write_secs: f64,
    /// Open + look up + read + decode + top table.
    pub query_p50_ms: f64,
    pub query_p99_ms: f64,
    /// Open + look up + read the stored pprof bytes (what `profile.pb.gz` serves).
    pub fetch_p50_ms: f64,
    pub fetch_p99_ms: f64,
    /// Database file (after a checkpoint) per trace: profile, index rows, B-tree overhead.
    pub bytes_per_trace: f64,
    /// The gzip pprof alone, per trace.
    pub profile_bytes_per_trace: f64,
    pub file_bytes: u64,
}

/// The `i`-th trace id: spread over the key space like random ids.
fn trace_id(i: u32) -> [u8; 16] {
    let mut x = u64::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5555_5555;
    let mut id = [0u8; 16];
    for chunk in id.chunks_mut(8) {
        x ^= x >> 31;
        x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    id
}

fn remove_store(path: &Path) {
    for suffix in ["", "-wal", "-shm", ".lock"] {
        let _ = std::fs::remove_file(super::sidecar(path, suffix));
    }
}

pub fn bench(path: &Path, traces: u32, queries: u32) -> Result<BenchReport> {
    remove_store(path);
    let start_ns = super::unix_now_ns().saturating_sub(3_600_000_000_000);
    let mut store = Store::open(path)?;
    // Only the writes are timed: the batch profile is built by the collector in the agent.
    let mut write_secs = 0.0;
    let mut profile_bytes = 0u64;
    let mut batch = Vec::with_capacity(super::sink::BATCH);
    let mut batch_samples = 0;
    for i in 0..traces {
        let first = start_ns + u64::from(i) * 100_000_000;
        let id = trace_id(i);
        let profile = synthetic::trace_profile(id, first, u64::from(i) + 1);
        let record = TraceRecord {
            trace_id: id,
            part: first,
            first_ns: first,
            last_ns: first + 500_000_000,
            samples: u64::from(synthetic::SAMPLES),
            cpu_ns: u64::from(synthetic::SAMPLES) * (1_000_000_000 / 99),
            processes: vec![TraceProcess {
                pid: 4242,
                process_name: "checkout".into(),
                service: "checkout".into(),
                namespace: "shop".into(),
                pod: "checkout-7d9f-x2".into(),
            }],
            spans: (0..3u8).map(|s| [0xa0, 0, 0, 0, 0, 0, 0, s]).collect(),
            index: 0,
        };
        batch_samples += profile.sample.len();
        batch.push((record, profile));
        // Batches as the agent's store sink cuts them.
        if batch.len() == super::sink::BATCH
            || batch_samples >= super::sink::BATCH_SAMPLES
            || i + 1 == traces
        {
            batch_samples = 0;
            let traces = TraceBatch::from_profiles(batch.drain(..));
            profile_bytes += traces.profile.len() as u64;
            let written = Instant::now();
            store.write(&traces, &[])?;
            write_secs += written.elapsed().as_secs_f64();
        }
    }
    store.checkpoint();
    let file = file_bytes(path);
    let (mut query, mut fetch) = (Vec::new(), Vec::new());
    let mut rng = 0x2545_f491_4f6c_dd1d_u64;
    for _ in 0..queries {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let id = trace_id((rng % u64::from(traces.max(1))) as u32);
        let t0 = Instant::now();
        let reader = StoreReader::open(path)?;
        reader.trace(&id)?;
        let raw = reader.trace_pprof(&id)?;
        fetch.push(t0.elapsed().as_secs_f64() * 1e3);
        let profile = pprof::decode(&raw).map_err(|e| StoreError::Other {
            path: path.to_owned(),
            detail: format!("{e:#}"),
        })?;
        let top = Stacks::of(&profile).top();
        std::hint::black_box(top);
        query.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    drop(store);
    remove_store(path);
    let n = f64::from(traces.max(1));
    Ok(BenchReport {
        traces,
        queries,
        write_secs,
        query_p50_ms: percentile(&mut query, 50),
        query_p99_ms: percentile(&mut query, 99),
        fetch_p50_ms: percentile(&mut fetch, 50),
        fetch_p99_ms: percentile(&mut fetch, 99),
        bytes_per_trace: file as f64 / n,
        profile_bytes_per_trace: profile_bytes as f64 / n,
        file_bytes: file,
    })
}

fn percentile(values: &mut [f64], p: usize) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    values[(values.len() * p / 100).min(values.len() - 1)]
}

#[cfg(test)]
mod tests {
    #[test]
    fn small_run_reports_sane_numbers() {
        let dir = std::env::temp_dir().join(format!("store-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let report = super::bench(&dir.join("b.db"), 200, 20).unwrap();
        assert_eq!(report.traces, 200);
        assert!(report.query_p50_ms > 0.0 && report.query_p50_ms <= report.query_p99_ms);
        assert!(report.bytes_per_trace > report.profile_bytes_per_trace * 0.9);
        assert!(!dir.join("b.db").exists(), "cleaned up");
        let _ = std::fs::remove_dir_all(dir);
    }
}
