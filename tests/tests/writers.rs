//! Per-trace attribution with real third-party writers from crates.io: Datadog's
//! `libdd-otel-thread-ctx` (OTEP 4947, with the OTEP 4719 process context and its attribute key
//! map from `libdd-library-config`) and Polar Signals' `custom-labels` (v1). Worker threads
//! alternate every few milliseconds between trace A (burning in `burn_for_trace_a`) and trace B
//! (`burn_for_trace_b`); samples in each function must carry that function's trace, and the
//! per-trace pprof files must carry the ids, the attributes and the service name.
//! Needs root; run through `cargo xtask test`.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use profiler_agent::{
    collector::SymbolizedSample,
    context::hex,
    export::{PerTraceDir, pprof, pprof_proto},
    record::{CollectOptions, Recording},
};
use profiler_common::Counter;
use profiler_tests::*;

const MIN_SAMPLES: u64 = 300;
const CAP: Duration = Duration::from_secs(30);
const GO: &str = "/usr/lib/go-1.19/bin/go";

/// What the fixture printed: `ctx <tid> a|b <trace hex> <span hex>`.
#[derive(Debug, Default)]
struct Expected {
    trace_a: String,
    trace_b: String,
    /// tid → (span in A, span in B).
    spans: HashMap<u32, (String, String)>,
}

impl Expected {
    fn parse(lines: &[String]) -> Self {
        let mut out = Self::default();
        for line in lines {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let ["ctx", tid, which, trace, span] = fields[..] else {
                continue;
            };
            let tid: u32 = tid.parse().expect("tid");
            let spans = out.spans.entry(tid).or_default();
            match which {
                "a" => (out.trace_a, spans.0) = (trace.to_owned(), span.to_owned()),
                "b" => (out.trace_b, spans.1) = (trace.to_owned(), span.to_owned()),
                other => panic!("ctx line for {other}"),
            }
        }
        assert!(
            !out.trace_a.is_empty() && !out.trace_b.is_empty() && out.trace_a != out.trace_b,
            "fixture printed {lines:?}"
        );
        out
    }
}

/// Samples with leaf `leaf` whose context has trace id `trace` (lowercase hex).
fn with_trace(samples: &[SymbolizedSample], leaf: &str, trace: &str) -> u64 {
    samples
        .iter()
        .filter(|s| &*s.leaf == leaf)
        .filter(|s| {
            s.context
                .as_ref()
                .is_some_and(|c| hex(&c.trace_id) == trace)
        })
        .map(|s| s.count)
        .sum()
}

/// A scratch directory for the per-trace files, empty.
fn scratch_dir(label: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("profiler-writers-{label}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Runs the fixture under a recording with a per-trace sink until both functions have
/// `MIN_SAMPLES`, checks the attribution, and returns what the fixture printed and the
/// directory of per-trace pprof files.
async fn profile(binary: &str, label: &str) -> (Expected, PathBuf) {
    let mut command = Command::new(binary);
    command.args(["-t", "2"]);
    let fixture = Fixture::start(command);
    let expected = Expected::parse(&fixture.preamble);
    let dir = scratch_dir(label);
    let recording = Recording::start_with(
        &sampler_config(Some(vec![fixture.pid]), 99),
        CollectOptions {
            sinks: vec![Box::new(PerTraceDir::create(&dir).expect("per-trace dir"))],
            ..Default::default()
        },
    )
    .expect("start recording");
    let (samples, done) = sample_traced_until(&recording, CAP, |s| {
        leaf_count(s, "burn_for_trace_a") >= MIN_SAMPLES
            && leaf_count(s, "burn_for_trace_b") >= MIN_SAMPLES
    })
    .await;
    let finished = recording.finish(|_| ()).await.expect("finish");
    let kernel = &finished.kernel;
    println!(
        "{label}: kernel context reads {} ok, {} invalid, {} faults, {} none active; agent {:?}",
        kernel.get(Counter::ContextRead),
        kernel.get(Counter::ContextInvalid),
        kernel.get(Counter::ContextReadFault),
        kernel.get(Counter::ContextNoneActive),
        finished.metrics.snapshot(),
    );
    for (leaf, own, other) in [
        ("burn_for_trace_a", &expected.trace_a, &expected.trace_b),
        ("burn_for_trace_b", &expected.trace_b, &expected.trace_a),
    ] {
        let total = leaf_count(&samples, leaf);
        let right = with_trace(&samples, leaf, own);
        let wrong = with_trace(&samples, leaf, other);
        assert!(
            done,
            "{label}: fewer than {MIN_SAMPLES} samples per function within {CAP:?}"
        );
        assert_attributed(label, leaf, total, right, wrong);
    }
    drop(fixture);
    (expected, dir)
}

/// A sample's labels, numbers as decimal text.
fn labels(
    profile: &pprof_proto::Profile,
    sample: &pprof_proto::Sample,
) -> BTreeMap<String, String> {
    let s = |i: i64| profile.string_table[i as usize].clone();
    sample
        .label
        .iter()
        .map(|l| {
            let value = if l.str != 0 {
                s(l.str)
            } else {
                l.num.to_string()
            };
            (s(l.key), value)
        })
        .collect()
}

fn trace_file(dir: &Path, trace: &str) -> PathBuf {
    let path = dir.join(format!("{trace}.pb.gz"));
    assert!(path.exists(), "no per-trace profile {}", path.display());
    path
}

/// Checks every sample of trace A's pprof: ids in lowercase hex (the span of the sample's
/// thread), the attributes (`http.route` = `/a`, `worker` = the thread's name, plus `extra`
/// computed from the expected span), and `service_name` = `checkout`.
fn check_trace_a_labels(
    dir: &Path,
    expected: &Expected,
    extra: &dyn Fn(&str) -> Vec<(&'static str, String)>,
) {
    let path = trace_file(dir, &expected.trace_a);
    let profile = pprof::decode(&std::fs::read(&path).expect("read trace A")).expect("decode");
    assert!(!profile.sample.is_empty(), "{}: no samples", path.display());
    let mut total = 0;
    for sample in &profile.sample {
        let labels = labels(&profile, sample);
        let get = |k: &str| {
            labels
                .get(k)
                .unwrap_or_else(|| panic!("no label {k} in {labels:?}"))
                .as_str()
        };
        let tid: u32 = get("tid").parse().expect("tid label");
        let (span_a, _) = expected
            .spans
            .get(&tid)
            .unwrap_or_else(|| panic!("sample of unknown thread {tid}: {labels:?}"));
        assert_eq!(get("trace_id"), expected.trace_a, "{labels:?}");
        assert_eq!(get("span_id"), span_a, "{labels:?}");
        assert_eq!(get("http.route"), "/a", "{labels:?}");
        assert_eq!(get("worker"), get("thread_name"), "{labels:?}");
        assert_eq!(get("service_name"), "checkout", "{labels:?}");
        for (key, value) in extra(span_a) {
            assert_eq!(get(key), value, "{labels:?}");
        }
        total += sample.value[0];
    }
    println!(
        "trace A pprof: {} samples in {} label sets, every one with the expected ids, attributes and service_name",
        total,
        profile.sample.len()
    );
}

/// `go tool pprof -sample_index=samples -tagfocus=trace_id=<trace> -top` over both traces'
/// files: (function, flat samples) rows, and the whole output.
fn top_with_trace(files: &[PathBuf], trace: &str) -> (Vec<(String, i64)>, String) {
    let output = Command::new(GO)
        .args(["tool", "pprof", "-symbolize=none", "-sample_index=samples"])
        .arg(format!("-tagfocus=trace_id={trace}"))
        .arg("-top")
        .args(files)
        .output()
        .expect("run go tool pprof");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "go tool pprof failed: {}{text}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rows = text
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let flat = fields.first()?.parse::<i64>().ok()?;
            (fields.len() >= 6).then(|| (fields[5..].join(" "), flat))
        })
        .collect();
    (rows, text)
}

/// Filtering the merged profiles of both traces to one trace id leaves that trace's function.
fn check_tagfocus(dir: &Path, expected: &Expected) {
    let files = [
        trace_file(dir, &expected.trace_a),
        trace_file(dir, &expected.trace_b),
    ];
    for (trace, own, other) in [
        (&expected.trace_a, "burn_for_trace_a", "burn_for_trace_b"),
        (&expected.trace_b, "burn_for_trace_b", "burn_for_trace_a"),
    ] {
        let (rows, text) = top_with_trace(&files, trace);
        println!("go tool pprof -tagfocus=trace_id={trace} -top:\n{text}");
        let flat = |f: &str| rows.iter().find(|(n, _)| n == f).map_or(0, |(_, c)| *c);
        let top = rows.iter().max_by_key(|(_, c)| *c).expect("some rows");
        assert_eq!(top.0, own, "{text}");
        assert!(
            flat(other) as f64 <= 0.01 * flat(own) as f64,
            "{other} under trace {trace}: {text}"
        );
    }
}

/// `go tool pprof -tags` of trace A's file, printed, with the labels a user would look for.
fn check_go_tags(dir: &Path, expected: &Expected) {
    let output = Command::new(GO)
        .args(["tool", "pprof", "-symbolize=none", "-tags"])
        .arg(trace_file(dir, &expected.trace_a))
        .output()
        .expect("run go tool pprof -tags");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "go tool pprof -tags failed");
    println!("go tool pprof -tags (trace A):\n{text}");
    for needle in [
        "service_name",
        "checkout",
        "http.route",
        "/a",
        "trace_id",
        expected.trace_a.as_str(),
    ] {
        assert!(text.contains(needle), "{needle} not in -tags output");
    }
    assert!(!text.contains(&expected.trace_b), "trace B in A's file");
}

#[tokio::test(flavor = "multi_thread")]
async fn libdd_otel_thread_ctx_writer() {
    require_root();
    let (expected, dir) = profile(
        env!("CARGO_BIN_EXE_otel_writer_rust"),
        "libdd-otel-thread-ctx",
    )
    .await;
    // libdd-otel-thread-ctx writes key index 0, the local root span id (the fixture passes
    // the worker's span); libdd-library-config names it in the key map. `http.url` ends past
    // the attribute bytes the sampler reads with the header: it arrives whole.
    check_trace_a_labels(&dir, &expected, &|span| {
        vec![
            ("datadog.local_root_span_id", span.to_owned()),
            (
                "http.url",
                format!("/checkout/{span}/{}", "item".repeat(24)),
            ),
        ]
    });
    check_go_tags(&dir, &expected);
    check_tagfocus(&dir, &expected);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn custom_labels_writer() {
    require_root();
    let (expected, dir) = profile(env!("CARGO_BIN_EXE_custom_labels_rust"), "custom-labels").await;
    check_trace_a_labels(&dir, &expected, &|_| Vec::new());
    check_go_tags(&dir, &expected);
    check_tagfocus(&dir, &expected);
    let _ = std::fs::remove_dir_all(&dir);
}
