//! Micro-benchmarks of the agent's hot user-space paths, on inputs shaped like one real
//! interval: decoding ring-buffer records, aggregating samples (per interval and per trace),
//! and building the interval's pprof and OTLP output with a warm symbolizer. Inputs are built
//! before the measured loops, which do no I/O.
//!
//! ```sh
//! cargo bench -p profiler-agent --bench hot_paths -- --quick       # a few seconds per group
//! cargo bench -p profiler-agent --bench hot_paths                  # full statistics
//! cargo bench -p profiler-agent --bench hot_paths -- aggregate     # one group
//! ```
//!
//! The interval: [`SAMPLES`] samples over [`STACKS`] distinct stacks of [`USER_FRAMES`] user
//! frames (every third stack also has [`KERNEL_FRAMES`] kernel frames), on three processes of
//! two threads each. User frames are real functions of this executable and of libc, so the
//! symbolizer names them as it would in the agent (its cache is filled before measuring).

use std::{collections::HashMap, hint::black_box, sync::Arc, time::Duration};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use profiler_agent::{
    context::{TraceContext, decode_thread_context},
    ebpf::decode::{decode, decode_item, encode_batch, encode_sample},
    export::{
        add_trace_samples, aggregate_to_pprof,
        otlp::{
            DEFAULT_MAX_REQUEST_BYTES,
            encode::{EncodeOptions, LiveSymbols, build_requests, encode},
        },
        pprof::{PprofTables, encode_for_store, encode_gzip},
        trace_to_pprof,
    },
    metrics::Metrics,
    process::ObjectStore,
    profile::{
        Aggregate, Frame, ProcessDetails,
        traces::{TraceProfile, TraceTable, TraceTableConfig, TracedSample},
    },
    symbolize::{
        Symbolizer,
        bench::{default_binaries, function_offsets, open_object},
    },
};
use profiler_common::{COMM_LEN, ContextKind, RecordKind, SampleHeader};

const SAMPLES: usize = 2_000;
const STACKS: usize = 300;
const USER_FRAMES: usize = 20;
const KERNEL_FRAMES: usize = 5;
/// Functions of the executable and of libc the stacks are made of.
const EXE_FUNCTIONS: usize = 340;
const LIBC_FUNCTIONS: usize = 60;
const KERNEL_FUNCTIONS: usize = 60;
const PIDS: [u32; 3] = [4242, 5151, 6060];
/// Traces active during the interval, two spans each.
const TRACES: usize = 50;
const FREQUENCY_HZ: u64 = 99;
/// 10 s interval, Unix ns.
const WINDOW: (u64, u64) = (1_764_000_000_000_000_000, 1_764_000_010_000_000_000);

/// Deterministic xorshift64*, so every run measures the same inputs.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1) as u64) as usize
    }
}

/// One sample of the interval.
struct Sample {
    pid: u32,
    tid: u32,
    stack: usize,
    /// Index into [`Interval::contexts`].
    context: usize,
    unix_ns: u64,
}

/// The interval's samples, their stacks and contexts.
struct Interval {
    stacks: Vec<Vec<Frame>>,
    samples: Vec<Sample>,
    contexts: Vec<TraceContext>,
    details: HashMap<u32, Arc<ProcessDetails>>,
    objects: ObjectStore,
}

impl Interval {
    fn new() -> Self {
        let metrics = Metrics::default();
        let mut objects = ObjectStore::new(4, metrics);
        let binaries = default_binaries(None).expect("this executable and its libc");
        let mut pools = Vec::new();
        for (path, n) in binaries.iter().zip([EXE_FUNCTIONS, LIBC_FUNCTIONS]) {
            let object = open_object(&mut objects, path).expect("open a binary");
            let offsets = function_offsets(path, n).expect("function symbols");
            assert!(!offsets.is_empty(), "no functions in {}", path.display());
            pools.push(
                offsets
                    .into_iter()
                    .map(|address| Frame::User { object, address })
                    .collect::<Vec<_>>(),
            );
        }
        let (exe, libc) = (&pools[0], &pools[1]);
        let kernel: Vec<Frame> = (0..KERNEL_FUNCTIONS as u64)
            .map(|i| Frame::Kernel {
                address: 0xffff_ffff_8100_0000 + i * 0x1_3a0,
            })
            .collect();

        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        // Stacks share their root half (eight request paths) and differ towards the leaf, which
        // is in libc one time in four.
        let stacks: Vec<Vec<Frame>> = (0..STACKS)
            .map(|s| {
                let mut frames = Vec::with_capacity(USER_FRAMES + KERNEL_FRAMES);
                if s % 3 == 0 {
                    frames.extend((0..KERNEL_FRAMES).map(|_| kernel[rng.below(kernel.len())]));
                }
                for level in 0..USER_FRAMES {
                    let frame = if level >= USER_FRAMES / 2 {
                        exe[((s % 8) * USER_FRAMES + level) % exe.len()]
                    } else if level == 0 && rng.below(4) == 0 {
                        libc[rng.below(libc.len())]
                    } else {
                        exe[rng.below(exe.len())]
                    };
                    frames.push(frame);
                }
                frames
            })
            .collect();

        let contexts: Vec<TraceContext> = (0..TRACES * 2)
            .map(|i| {
                let mut trace_id = [0u8; 16];
                trace_id[..8].copy_from_slice(&(0xabcd_0000_u64 + (i / 2) as u64).to_be_bytes());
                trace_id[8..].copy_from_slice(&0x1234_5678_9abc_def0_u64.to_be_bytes());
                TraceContext {
                    trace_id,
                    span_id: (0xa000 + i as u64).to_be_bytes(),
                    sampled: true,
                    labels: Arc::new([("http.route".into(), "/api/cart/{id}".into())]),
                }
            })
            .collect();

        // Every stack once, then a skewed mix: a few hot stacks take most samples.
        let step = (WINDOW.1 - WINDOW.0) / SAMPLES as u64;
        let samples = (0..SAMPLES)
            .map(|i| {
                let stack = if i < STACKS {
                    i
                } else {
                    rng.below(STACKS) * rng.below(STACKS) / STACKS
                };
                let pid = PIDS[stack % PIDS.len()];
                Sample {
                    pid,
                    tid: pid + 1 + (i % 2) as u32,
                    stack,
                    context: rng.below(contexts.len()),
                    unix_ns: WINDOW.0 + i as u64 * step,
                }
            })
            .collect();

        let details = PIDS
            .iter()
            .map(|&pid| {
                let details = ProcessDetails {
                    exe_name: format!("service-{pid}"),
                    exe_path: Some(format!("/usr/local/bin/service-{pid}")),
                    env_service_name: Some(format!("service-{pid}")),
                    container_id: Some(format!("{pid:064x}")),
                    ..Default::default()
                };
                (pid, Arc::new(details))
            })
            .collect();
        Self {
            stacks,
            samples,
            contexts,
            details,
            objects,
        }
    }

    fn thread_name(tid: u32) -> &'static str {
        if tid.is_multiple_of(2) {
            "worker-0"
        } else {
            "worker-1"
        }
    }

    /// The interval's aggregate as the collector builds it, every third sample traced.
    fn aggregate(&self) -> Aggregate {
        let mut agg = Aggregate::default();
        for (i, s) in self.samples.iter().enumerate() {
            let details = &self.details[&s.pid];
            agg.process_names
                .entry(s.pid)
                .or_insert_with(|| details.exe_name.clone());
            agg.process_details
                .entry(s.pid)
                .or_insert_with(|| details.clone());
            agg.set_thread_name(s.tid, Self::thread_name(s.tid));
            let context = (i % 3 == 0).then(|| &self.contexts[s.context]);
            agg.add(
                s.pid,
                s.tid,
                self.stacks[s.stack].clone(),
                context,
                s.unix_ns,
            );
        }
        agg
    }
}

/// One sample record as the kernel emits it: header, 20 user and 5 kernel frames, and an
/// OTEP 4947 thread context with two attributes.
fn sample_record() -> (Vec<u8>, Vec<u8>) {
    let mut context = Vec::new();
    context.extend_from_slice(&[0xab; 16]); // trace id
    context.extend_from_slice(&[0xcd; 8]); // span id
    context.extend_from_slice(&[1, 1]); // valid, sampled
    let attributes: Vec<u8> = [(0u8, "/api/cart/{id}"), (1, "user-4242")]
        .iter()
        .flat_map(|(key, value)| [*key, value.len() as u8].into_iter().chain(value.bytes()))
        .collect();
    context.extend_from_slice(&(attributes.len() as u16).to_ne_bytes());
    context.extend_from_slice(&attributes);

    let mut comm = [0u8; COMM_LEN];
    comm[..8].copy_from_slice(b"worker-1");
    let header = SampleHeader {
        kind: RecordKind::Sample as u16,
        flags: 0,
        cpu: 1,
        tgid: 4242,
        tid: 4244,
        ktime_ns: 123_456_789_000,
        comm,
        user_frames: USER_FRAMES as u16,
        kernel_frames: KERNEL_FRAMES as u16,
        context_kind: ContextKind::ThreadContext as u8,
        _pad: 0,
        context_len: context.len() as u16,
        user_stack_top: 0,
    };
    let user = (0..USER_FRAMES as u64).map(|i| 0x5600_0012_3000 + i * 0x2_1f3);
    let kernel = (0..KERNEL_FRAMES as u64).map(|i| 0xffff_ffff_8123_4000 + i * 0x1_3a0);
    let frames: Vec<u64> = user.chain(kernel).collect();
    (encode_sample(&header, &frames, &context), context)
}

fn decoding(c: &mut Criterion) {
    let (record, context) = sample_record();
    let keys: Vec<Arc<str>> = vec!["http.route".into(), "enduser.id".into()];
    assert!(decode(&record).is_ok());
    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(1));
    group.bench_function("sample_record", |b| b.iter(|| decode(black_box(&record))));
    group.finish();
    // What the reader decodes at 99 Hz: a CPU's batch of eight ticks.
    let batch = encode_batch(&vec![record.clone(); 8]);
    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(8));
    group.bench_function("sample_batch_of_8", |b| {
        b.iter(|| {
            let mut decoded = 0;
            decode_item(black_box(&batch), |r| decoded += usize::from(r.is_ok()));
            assert_eq!(decoded, 8);
        })
    });
    group.finish();
    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(1));
    group.bench_function("thread_context", |b| {
        b.iter(|| decode_thread_context(black_box(&context), &keys))
    });
    group.finish();
}

fn aggregation(c: &mut Criterion) {
    let interval = Interval::new();
    let mut group = c.benchmark_group("aggregate");
    group.throughput(Throughput::Elements(SAMPLES as u64));
    for (name, traced) in [("add/no_context", false), ("add/with_context", true)] {
        group.bench_function(name, |b| {
            b.iter_batched(
                // The collector hands `add` the frames the process table just normalized.
                || {
                    interval
                        .samples
                        .iter()
                        .map(|s| interval.stacks[s.stack].clone())
                        .collect::<Vec<_>>()
                },
                |stacks| {
                    let mut agg = Aggregate::default();
                    for (s, frames) in interval.samples.iter().zip(stacks) {
                        let context = traced.then(|| &interval.contexts[s.context]);
                        agg.add(s.pid, s.tid, frames, context, s.unix_ns);
                    }
                    agg
                },
                BatchSize::LargeInput,
            )
        });
    }
    let shared: Vec<Arc<[Frame]>> = interval
        .stacks
        .iter()
        .map(|s| s.as_slice().into())
        .collect();
    group.bench_function("trace_table_add", |b| {
        b.iter_batched(
            || TraceTable::new(TraceTableConfig::default()),
            |mut table| {
                for s in &interval.samples {
                    table.add(interval.traced(s, shared[s.stack].clone()));
                }
                table
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

/// Samples that make the traces of the per-trace benchmark (~5 per trace).
const TRACE_SAMPLES: usize = 250;

impl Interval {
    /// `s` as the collector hands it to the trace table.
    fn traced<'a>(&'a self, s: &Sample, stack: Arc<[Frame]>) -> TracedSample<'a> {
        let details = &self.details[&s.pid];
        TracedSample {
            context: &self.contexts[s.context],
            pid: s.pid,
            tid: s.tid,
            thread_name: Interval::thread_name(s.tid),
            process_name: &details.exe_name,
            details,
            stack,
            unix_ns: s.unix_ns,
        }
    }

    /// The traces the first `n` samples make, as the trace table hands them to its sinks.
    fn traces(&self, n: usize) -> Vec<TraceProfile> {
        let mut table = TraceTable::new(TraceTableConfig::default());
        for s in self.samples.iter().take(n) {
            table.add(self.traced(s, self.stacks[s.stack].as_slice().into()));
        }
        let mut traces = Vec::new();
        table.flush_all(|t| traces.push(t.clone()));
        traces
    }
}

/// The interval's aggregate and a symbolizer that has already seen every frame in it.
fn warm_interval() -> (Interval, Aggregate, Symbolizer) {
    let interval = Interval::new();
    let aggregate = interval.aggregate();
    let mut symbolizer = Symbolizer::new(Metrics::default());
    symbolizer.resolve(aggregate.frames().collect::<Vec<_>>(), &interval.objects);
    assert_eq!(symbolizer.cached_frames(), aggregate.frames().count());
    (interval, aggregate, symbolizer)
}

fn pprof(c: &mut Criterion) {
    let (interval, aggregate, mut symbolizer) = warm_interval();
    let objects = &interval.objects;
    let mut build =
        || aggregate_to_pprof(&aggregate, FREQUENCY_HZ, WINDOW, &mut symbolizer, objects);
    let profile = build();
    assert_eq!(
        profile.sample.iter().map(|s| s.value[0]).sum::<i64>(),
        SAMPLES as i64
    );
    let mut group = c.benchmark_group("pprof");
    group.bench_function("aggregate_to_pprof", |b| b.iter(&mut build));
    group.bench_function("aggregate_to_pprof_gzip", |b| {
        b.iter(|| encode_gzip(&build()))
    });
    // What the store sink does for every trace it is handed: the trace's symbolized pprof,
    // encoded for the store. The traces of the interval's first samples: ~5 samples a trace,
    // as a request of ~50 ms CPU at 99 Hz.
    let traces = interval.traces(TRACE_SAMPLES);
    group.throughput(Throughput::Elements(traces.len() as u64));
    group.bench_function("trace_to_pprof_store/per_trace", |b| {
        b.iter(|| {
            traces
                .iter()
                .map(|t| {
                    encode_for_store(&trace_to_pprof(t, FREQUENCY_HZ, &mut symbolizer, objects))
                        .len()
                })
                .sum::<usize>()
        })
    });
    // What the store sink does since schema 6: every trace's samples into the batch's one
    // profile, encoded once for the batch.
    group.bench_function("store_batch/per_trace", |b| {
        b.iter(|| {
            let mut tables = PprofTables::new(FREQUENCY_HZ, WINDOW.0, WINDOW.1 - WINDOW.0);
            for (index, trace) in traces.iter().enumerate() {
                let mut builder = tables.resume(&mut symbolizer, objects);
                add_trace_samples(&mut builder, trace, Some(("store.part", index as i64)));
                tables = builder.suspend();
            }
            encode_for_store(&tables.finish()).len()
        })
    });
    group.finish();
}

fn otlp(c: &mut Criterion) {
    let (interval, aggregate, mut symbolizer) = warm_interval();
    let options = EncodeOptions {
        frequency_hz: FREQUENCY_HZ,
        window: WINDOW,
        host_name: Some("bench-host".into()),
        max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
    };
    let mut build = || {
        let mut symbols = LiveSymbols {
            symbolizer: &mut symbolizer,
            objects: &interval.objects,
        };
        build_requests(&aggregate, &options, &mut symbols)
    };
    assert_eq!(
        build().iter().map(|r| r.samples).sum::<u64>(),
        SAMPLES as u64
    );
    let mut group = c.benchmark_group("otlp");
    group.bench_function("build_requests", |b| b.iter(&mut build));
    group.bench_function("build_requests_encode", |b| {
        b.iter(|| {
            build()
                .iter()
                .map(|r| encode(&r.request).len())
                .sum::<usize>()
        })
    });
    group.finish();
}

criterion_group! {
    name = hot_paths;
    // Shorter than criterion's defaults (3 s warm-up, 5 s per benchmark): the whole file takes
    // about half a minute, and `-- --quick` a few seconds.
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = decoding, aggregation, pprof, otlp
}
criterion_main!(hot_paths);
