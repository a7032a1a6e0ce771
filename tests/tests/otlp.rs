//! OTLP profiles export, checked by a real receiver: the Python peer built on
//! opentelemetry-proto 1.45.2 (proto v1.10) decodes what the agent binary sends over gRPC and
//! over HTTP while it profiles the OTEP 4947 fixtures (workers alternating between trace A in
//! `burn_for_trace_a` and trace B in `burn_for_trace_b`). Then an outage: the receiver is
//! down for several intervals and comes back. Needs root; run through `cargo xtask test`.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use profiler_tests::{
    otel_ctx::builds,
    otlp::{Agent, Receiver, field},
    *,
};
use serde_json::Value;

const FREQUENCY: u64 = 99;
/// Ticks per leaf function the export must carry before the agent is stopped.
const MIN_TICKS: u64 = 150;
const CAP: Duration = Duration::from_secs(60);
const SERVICE_NAME: &str = "otlp-test-checkout";

/// A directory for one test's files, removed when the test ends (passed or not).
fn scratch_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("profiler-otlp-{name}-"))
        .tempdir()
        .expect("create scratch dir")
}

/// The traced fixture: `-t 2` workers; `service` sets OTEL_SERVICE_NAME in its environment.
fn traced_fixture(service: Option<&str>) -> Fixture {
    let mut command = Command::new(&builds().exe_le);
    command.args(["-t", "2"]);
    if let Some(name) = service {
        command.env("OTEL_SERVICE_NAME", name);
    }
    Fixture::start(command)
}

/// (trace id, span id) pairs the fixture publishes, from its `ctx <tid> a|b <trace> <span>`.
fn published(fixture: &Fixture) -> BTreeMap<String, (String, String)> {
    fixture
        .preamble
        .iter()
        .filter_map(|l| {
            let parts: Vec<&str> = l.split_whitespace().collect();
            match parts.as_slice() {
                ["ctx", tid, which, trace, span] => Some((
                    format!("{tid}:{which}"),
                    (trace.to_string(), span.to_string()),
                )),
                _ => None,
            }
        })
        .collect()
}

/// Ticks per leaf function of `pid`, split by linked trace ("" = no link), over all requests.
fn leaf_traces(requests: &[Value], pid: u32) -> BTreeMap<String, BTreeMap<String, u64>> {
    let mut out: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for r in requests {
        for (key, traces) in r["leaf_traces"].as_object().into_iter().flatten() {
            let Some(leaf) = key.strip_prefix(&format!("{pid}:")) else {
                continue;
            };
            for (trace, n) in traces.as_object().into_iter().flatten() {
                *out.entry(leaf.to_owned())
                    .or_default()
                    .entry(trace.clone())
                    .or_default() += n.as_u64().unwrap_or(0);
            }
        }
    }
    out
}

fn leaf_ticks(requests: &[Value], pid: u32, leaf: &str) -> u64 {
    leaf_traces(requests, pid)
        .get(leaf)
        .map(|t| t.values().sum())
        .unwrap_or(0)
}

/// The resource attributes the receiver decoded for `pid` (from the last request with it).
fn resource_of(requests: &[Value], pid: u32) -> (Value, Value) {
    requests
        .iter()
        .rev()
        .flat_map(|r| r["resources"].as_array().cloned().unwrap_or_default())
        .find(|res| res["attributes"]["process.pid"].as_u64() == Some(u64::from(pid)))
        .map(|res| (res["attributes"].clone(), res["profiles"][0].clone()))
        .unwrap_or_else(|| panic!("no resource for pid {pid}"))
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("hostname")
        .trim()
        .to_owned()
}

/// The agent's arguments: its store in the test's `dir` and its API on a free port, so that
/// neither meets an agent running on the host (or another test's).
fn agent_args(
    dir: &std::path::Path,
    pids: &[u32],
    endpoint: &str,
    protocol: &str,
    extra: &[&str],
) -> Vec<String> {
    let pids = pids
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let store = dir.join("store.db").to_string_lossy().into_owned();
    [
        "--store",
        &store,
        "--api-listen",
        "127.0.0.1:0",
        "--interval",
        "1s",
        "-F",
        &FREQUENCY.to_string(),
        "--pid",
        &pids,
        "--otlp-endpoint",
        endpoint,
        "--otlp-protocol",
        protocol,
        "--otlp-header",
        "authorization=Bearer otlp-test-token",
    ]
    .iter()
    .chain(extra)
    .map(|s| s.to_string())
    .collect()
}

/// Profiles the traced fixture (with OTEL_SERVICE_NAME) and an untraced one over `protocol`,
/// until the receiver has enough of both traces, and checks what it decoded.
fn export_and_check(protocol: &str, receiver_args: &[&str]) -> (Vec<Value>, Agent) {
    let dir = scratch_dir(&protocol.replace('/', "-"));
    let receiver = Receiver::start(0, 0, &dir.path().join("requests.jsonl"), receiver_args);
    let traced = traced_fixture(Some(SERVICE_NAME));
    let plain = Fixture::start(Command::new(burn_c()));
    let endpoint = match protocol {
        "grpc" => receiver.grpc_endpoint(),
        _ => receiver.http_endpoint(),
    };
    let pprof_dir = dir.path().join("pprof");
    let pprof_arg = pprof_dir.to_string_lossy().into_owned();
    let mut agent = Agent::start(
        &agent_args(
            dir.path(),
            &[traced.pid, plain.pid],
            &endpoint,
            protocol,
            &["--output-dir", &pprof_arg],
        ),
        "info",
    );
    let started = Instant::now();
    let enough = |requests: &[Value]| {
        leaf_ticks(requests, traced.pid, "burn_for_trace_a") >= MIN_TICKS
            && leaf_ticks(requests, traced.pid, "burn_for_trace_b") >= MIN_TICKS
            && leaf_ticks(requests, plain.pid, "burn_a") > 0
    };
    while !enough(&receiver.requests()) && started.elapsed() < CAP {
        std::thread::sleep(Duration::from_millis(500));
    }
    let (took, status) = agent.terminate(Duration::from_secs(20));
    let requests = receiver.requests();
    println!(
        "{protocol}: {} requests in {:?}, agent stopped in {took:?} ({status:?})",
        requests.len(),
        started.elapsed()
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "agent did not exit cleanly: {status:?}\n{}",
        agent.log_text()
    );
    assert!(
        enough(&requests),
        "{protocol}: not enough ticks within {CAP:?}: {:?}\n{}",
        leaf_traces(&requests, traced.pid),
        agent.log_text()
    );

    // Well-formed v1.10 requests, with the configured header and transport details.
    for r in &requests {
        assert_eq!(r["errors"], serde_json::json!([]), "{protocol}: {r}");
        assert_eq!(r["transport"], protocol.split('/').next().unwrap());
        assert_eq!(r["headers"]["authorization"], "Bearer otlp-test-token");
        // (grpcio hides grpc-encoding from the servicer: gzip over gRPC is checked by the
        // agent's unit tests against tonic.)
        if protocol != "grpc" {
            assert_eq!(r["compression"], "gzip", "{r}");
        }
    }

    // Links carry the fixture's own trace and span ids, and each leaf its own trace.
    let published = published(&traced);
    let known: BTreeSet<String> = published
        .values()
        .map(|(t, s)| format!("{t}:{s}"))
        .collect();
    let linked: BTreeSet<String> = requests
        .iter()
        .flat_map(|r| {
            r["links"]
                .as_object()
                .map(|m| m.keys().cloned().collect::<Vec<_>>())
                .unwrap_or_default()
        })
        .collect();
    assert!(!linked.is_empty(), "no links");
    assert!(
        linked.is_subset(&known),
        "links {linked:?} not in {known:?}"
    );
    // Samples taken before the agent resolved the fixture's context source carry no link by
    // design (counted as `context_no_source`): attribution is checked on the requests after the
    // first one with a linked sample of the fixture.
    let first_linked = requests
        .iter()
        .position(|r| {
            leaf_traces(std::slice::from_ref(r), traced.pid)
                .values()
                .flat_map(|traces| traces.keys())
                .any(|trace| !trace.is_empty())
        })
        .expect("a linked sample of the traced fixture");
    let by_leaf = leaf_traces(&requests[first_linked + 1..], traced.pid);
    for (leaf, own, other) in [
        ("burn_for_trace_a", "a", "b"),
        ("burn_for_trace_b", "b", "a"),
    ] {
        let traces_of = |which: &str| -> BTreeSet<&String> {
            published
                .iter()
                .filter(|(k, _)| k.ends_with(&format!(":{which}")))
                .map(|(_, (t, _))| t)
                .collect()
        };
        let (mine, theirs) = (traces_of(own), traces_of(other));
        let ticks = &by_leaf[leaf];
        let total: u64 = ticks.values().sum();
        let right: u64 = ticks
            .iter()
            .filter(|(t, _)| mine.contains(t))
            .map(|(_, n)| n)
            .sum();
        let wrong: u64 = ticks
            .iter()
            .filter(|(t, _)| theirs.contains(t))
            .map(|(_, n)| n)
            .sum();
        println!(
            "{protocol}: {leaf}: {total} ticks, {right} ({:.1}%) linked to its trace, {wrong} to the other",
            100.0 * right as f64 / total.max(1) as f64
        );
        assert!(total > 0, "{leaf}: no samples after the warm-up");
        assert!(right as f64 >= 0.95 * total as f64, "{leaf}: {ticks:?}");
        assert!(wrong as f64 <= 0.01 * total as f64, "{leaf}: {ticks:?}");
    }
    // The untraced fixture's samples have no link.
    for (leaf, ticks) in leaf_traces(&requests, plain.pid) {
        assert_eq!(
            ticks.keys().collect::<Vec<_>>(),
            vec![""],
            "{leaf}: {ticks:?}"
        );
    }

    // The fixtures' functions are in the function table.
    let functions: BTreeSet<&str> = requests
        .iter()
        .flat_map(|r| r["functions"].as_array().into_iter().flatten())
        .filter_map(Value::as_str)
        .collect();
    for f in ["burn_for_trace_a", "burn_for_trace_b", "burn_a", "burn_b"] {
        assert!(functions.contains(f), "{f} not in the function table");
    }

    // Resource attributes.
    let host = host_name();
    let (attrs, profile) = resource_of(&requests, traced.pid);
    println!("{protocol}: traced fixture resource {attrs}");
    assert_eq!(attrs["service.name"], SERVICE_NAME, "OTEL_SERVICE_NAME");
    assert_eq!(attrs["process.executable.name"], "otel-exe-le");
    assert_eq!(
        attrs["process.executable.path"].as_str().map(PathBuf::from),
        Some(builds().exe_le.clone())
    );
    assert_eq!(attrs["host.name"], host.as_str());
    let (plain_attrs, _) = resource_of(&requests, plain.pid);
    assert_eq!(
        plain_attrs["service.name"], "burn-c",
        "executable name fallback"
    );
    assert_eq!(plain_attrs["process.pid"], plain.pid);
    // What Pyroscope maps to process CPU.
    assert_eq!(profile["sample_type"], "samples/count");
    assert_eq!(profile["period_type"], "cpu/nanoseconds");
    assert_eq!(profile["period"], 1_000_000_000 / FREQUENCY);
    // Thread attributes on samples, build ids on mappings.
    let last = requests.last().expect("a request");
    for key in ["thread.id", "thread.name"] {
        assert!(
            last["sample_attribute_keys"]
                .as_array()
                .unwrap()
                .contains(&Value::from(key)),
            "{last}"
        );
    }
    let exe = builds().exe_le.to_string_lossy().into_owned();
    assert!(
        last["mapping_attributes"][&exe]["process.executable.build_id.gnu"]
            .as_str()
            .is_some_and(|id| id.len() == 40),
        "no GNU build id on {exe}: {}",
        last["mapping_attributes"]
    );

    check_pprof_labels(&pprof_dir, &published);
    (requests, agent)
}

/// The interval pprof files the same run wrote stay readable by `go tool pprof`, with
/// `trace_id`/`span_id` labels in lowercase hex, as Pyroscope derives them from OTLP links.
fn check_pprof_labels(dir: &std::path::Path, published: &BTreeMap<String, (String, String)>) {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("pprof dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "gz"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no interval pprof in {}", dir.display());
    // Every interval's tags: the last interval (cut short by the shutdown) may hold a few
    // samples only, none of them of the first published trace.
    let text: String = files.iter().map(|file| go_pprof("-tags", file)).collect();
    let (trace, span) = published.values().next().expect("a published context");
    for needle in ["trace_id", "span_id", trace.as_str(), span.as_str()] {
        assert!(
            text.contains(needle),
            "{needle} missing from pprof -tags of every interval in {}:\n{text}",
            dir.display()
        );
    }
}

#[test]
fn grpc_export_links_samples_to_traces() {
    require_root();
    let (requests, agent) = export_and_check("grpc", &[]);
    let stopped = agent
        .logged("OTLP exporter stopped")
        .pop()
        .expect("exporter summary");
    println!("grpc: exporter {stopped}");
    assert_eq!(
        field(&stopped, "exported_requests"),
        requests.len() as u64,
        "every request the agent counted arrived"
    );
    assert_eq!(field(&stopped, "dropped_shutdown"), 0);
}

#[test]
fn http_export_links_samples_to_traces_and_counts_partial_success() {
    require_root();
    let (requests, agent) = export_and_check("http/protobuf", &["--reject-profiles", "1"]);
    let stopped = agent
        .logged("OTLP exporter stopped")
        .pop()
        .expect("exporter summary");
    println!("http: exporter {stopped}");
    for r in &requests {
        assert_eq!(r["content_type"], "application/x-protobuf");
    }
    let wire: u64 = requests
        .iter()
        .map(|r| r["wire_bytes"].as_u64().unwrap())
        .sum();
    let ticks: u64 = requests.iter().map(|r| r["ticks"].as_u64().unwrap()).sum();
    println!(
        "http: {wire} gzip bytes for {ticks} ticks: {:.1} B per sample",
        wire as f64 / ticks.max(1) as f64
    );
    assert_eq!(field(&stopped, "exported_requests"), requests.len() as u64);
    assert_eq!(field(&stopped, "partial_success"), requests.len() as u64);
    assert_eq!(field(&stopped, "rejected_profiles"), requests.len() as u64);
    assert!(
        !agent
            .logged("OTLP receiver accepted the request partially")
            .is_empty()
    );
}

/// The receiver is down for at least five intervals and comes back: memory and the queue stay
/// under their caps, export resumes, the counters say what was retried and dropped; then a
/// shutdown with the receiver down again keeps its deadline.
#[test]
fn receiver_outage_is_bounded_and_recovers() {
    require_root();
    const QUEUE_CAP: u64 = 6 << 10;
    const RSS_ANON_CAP_KIB: u64 = 64 << 10;
    const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);
    const INTERVAL: Duration = Duration::from_secs(1);
    let dir = scratch_dir("outage");
    let mut receiver = Receiver::start(0, 0, &dir.path().join("before.jsonl"), &[]);
    let port = receiver.grpc_port;
    let traced = traced_fixture(None);
    let cap = QUEUE_CAP.to_string();
    let mut agent = Agent::start(
        &agent_args(
            dir.path(),
            &[traced.pid],
            &receiver.grpc_endpoint(),
            "grpc",
            &[
                "--otlp-queue-bytes",
                &cap,
                "--otlp-retry-initial-backoff",
                "200ms",
                "--otlp-retry-max-backoff",
                "1s",
                "--otlp-shutdown-timeout",
                "2s",
            ],
        ),
        "info,profiler_agent::export::otlp=debug",
    );
    let wait_for = |what: &str, receiver: &Receiver, timeout: Duration| {
        let deadline = Instant::now() + timeout;
        while receiver.requests().is_empty() {
            assert!(Instant::now() < deadline, "no request {what}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    wait_for("before the outage", &receiver, CAP);
    let sizes: Vec<u64> = receiver
        .requests()
        .iter()
        .map(|r| r["encoded_bytes"].as_u64().unwrap())
        .collect();
    println!("outage: requests before it: {sizes:?} bytes");

    // Down for 7 intervals; memory and queue watched meanwhile.
    receiver.stop();
    let down = Instant::now();
    let mut rss_peak = 0;
    while down.elapsed() < 7 * INTERVAL {
        rss_peak = rss_peak.max(agent.rss_anon_kib());
        std::thread::sleep(Duration::from_millis(200));
    }
    let queued: Vec<u64> = agent
        .logged("OTLP interval queued")
        .iter()
        .map(|f| field(f, "queue_bytes"))
        .collect();
    println!("outage: queue bytes after each interval {queued:?}; RssAnon peak {rss_peak} KiB");
    assert!(
        queued.len() >= 5,
        "fewer than 5 intervals queued: {queued:?}"
    );
    assert!(queued.iter().all(|q| *q <= QUEUE_CAP), "{queued:?}");
    assert!(rss_peak <= RSS_ANON_CAP_KIB, "RssAnon {rss_peak} KiB");
    assert!(
        agent
            .wait_logged("OTLP export failing; retrying with backoff", Duration::ZERO)
            .is_some(),
        "{}",
        agent.log_text()
    );

    // Back on the same port: export resumes.
    let mut receiver = Receiver::start(port, 0, &dir.path().join("after.jsonl"), &[]);
    let back = Instant::now();
    wait_for("after the outage", &receiver, Duration::from_secs(20));
    println!(
        "outage: export resumed {:?} after the receiver came back",
        back.elapsed()
    );
    let resumed = agent.wait_logged("OTLP export resumed", Duration::from_secs(5));
    assert!(resumed.is_some(), "{}", agent.log_text());
    for r in receiver.requests() {
        assert_eq!(r["errors"], serde_json::json!([]), "{r}");
    }

    // Down again, then SIGTERM: the agent gives up on the queue at its deadline.
    receiver.stop();
    std::thread::sleep(3 * INTERVAL);
    let (took, status) = agent.terminate(SHUTDOWN_TIMEOUT + Duration::from_secs(10));
    println!("outage: SIGTERM with the receiver down: exited in {took:?} ({status:?})");
    assert!(status.is_some_and(|s| s.success()), "{}", agent.log_text());
    assert!(
        took <= SHUTDOWN_TIMEOUT + Duration::from_secs(6),
        "shutdown took {took:?}"
    );
    let stopped = agent
        .logged("OTLP exporter stopped")
        .pop()
        .expect("exporter summary");
    println!("outage: exporter {stopped}");
    assert!(field(&stopped, "retries") > 0);
    assert!(field(&stopped, "failed_attempts") > 0);
    assert!(
        field(&stopped, "dropped_queue_full") > 0,
        "nothing dropped: raise the outage or lower the cap"
    );
    assert!(field(&stopped, "dropped_queue_full_bytes") > 0);
    assert!(field(&stopped, "dropped_shutdown") > 0);
    assert!(field(&stopped, "queue_bytes_peak") <= QUEUE_CAP);
    assert!(field(&stopped, "exported_requests") >= 2);
    assert_eq!(stopped["within_deadline"], false);
}
