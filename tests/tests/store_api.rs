//! The embedded store, the query CLI and the HTTP API, end to end: the agent binary runs as the
//! daemon (`run`) with a temporary store and API port against two OTEP 4947 fixture processes
//! whose workers alternate between trace A (`aa..aa01`, burning in `burn_for_trace_a`) and
//! trace B (`bb..bb01`, `burn_for_trace_b`). The two processes share those trace ids, as two
//! services of one distributed trace would. The fixtures stop after a few seconds, so their
//! traces end and are stored. Needs root; run through `cargo xtask test`.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use profiler_tests::{otel_ctx::builds, *};

const TRACE_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa01";
const TRACE_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbb01";
/// How long the fixtures burn before exiting (their traces then end).
const FIXTURE_SECS: &str = "6";
const MIN_TRACE_SAMPLES: u64 = 40;
const STORED_TIMEOUT: Duration = Duration::from_secs(90);

/// A scratch directory under target/, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = fixture_dir()
            .join("..")
            .join(format!("store-api-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Self(dir)
    }

    fn db(&self) -> PathBuf {
        self.0.join("profiles.db")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Where screenshots go (kept after the test, for a human to look at).
fn artifacts() -> PathBuf {
    let dir = fixture_dir().join("../test-artifacts");
    std::fs::create_dir_all(&dir).expect("create target/test-artifacts");
    dir.canonicalize().expect("artifacts dir")
}

/// `profiler-agent run` with a store and an API on a free port; SIGINT and wait on drop.
struct Agent {
    child: Child,
    url: String,
    lines: mpsc::Receiver<String>,
}

impl Agent {
    fn start(store: &Path, pids: &[u32], extra: &[&str]) -> Self {
        let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
        let mut command = Command::new(agent_bin());
        command
            .args([
                "run",
                "-F",
                "99",
                "--interval",
                "2s",
                "--trace-idle-timeout",
                "2s",
            ])
            .arg("--store")
            .arg(store)
            .args(["--api-listen", "127.0.0.1:0"])
            .args(extra)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if !pids.is_empty() {
            command.args(["--pid", &pids.join(",")]);
        }
        let mut child = command.spawn().expect("start the agent");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("  agent: {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let url = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("the agent did not announce its API within 60 s"));
            if let Some(rest) = line.split("url=").nth(1) {
                break rest.split_whitespace().next().expect("url").to_owned();
            }
        };
        Self { child, url, lines }
    }

    fn get(&self, path: &str) -> (u16, Vec<u8>) {
        http_get(&format!("{}{}", self.url.trim_end_matches('/'), path), None)
    }

    fn text(&self, path: &str) -> (u16, String) {
        let (status, body) = self.get(path);
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// SIGINT, then waits (20 s at most) for a clean exit.
    fn stop(mut self) {
        self.interrupt_and_wait();
    }

    fn interrupt_and_wait(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let pid = i32::try_from(self.child.id()).expect("pid");
        // SAFETY: kill has no memory preconditions; the pid is our own live child.
        unsafe { libc::kill(pid, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                assert!(status.success(), "the agent exited with {status}");
                while self.lines.try_recv().is_ok() {}
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        panic!("the agent did not stop within 20 s of SIGINT");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        } else {
            self.interrupt_and_wait();
        }
    }
}

fn http_get(url: &str, token: Option<&str>) -> (u16, Vec<u8>) {
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .new_agent();
    let mut request = agent.get(url);
    if let Some(token) = token {
        request = request.header("Authorization", format!("Bearer {token}"));
    }
    let mut response = request.call().unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .with_config()
        .limit(64 << 20)
        .read_to_vec()
        .unwrap_or_else(|e| panic!("GET {url}: body: {e}"));
    (status, body)
}

/// The two traced fixtures, otel-exe-le and otel-driver-desc (one worker each), and an agent
/// profiling them into `store`. The fixtures' few seconds start once the agent is attached:
/// on a busy host its start-up took most of them.
fn start_traced(store: &Path) -> (Fixture, Fixture, Agent) {
    let b = builds();
    let start = |binary: &Path| {
        let mut c = Command::new(binary);
        c.args(["-t", "1", "-w", "-s", FIXTURE_SECS]);
        Fixture::start(c)
    };
    let (exe, driver) = (start(&b.exe_le), start(&b.driver_desc));
    let agent = Agent::start(store, &[exe.pid, driver.pid], &[]);
    exe.signal(libc::SIGUSR1);
    driver.signal(libc::SIGUSR1);
    (exe, driver, agent)
}

fn trace_samples(list: &serde_json::Value, id: &str) -> u64 {
    list.as_array()
        .into_iter()
        .flatten()
        .find(|t| t["trace_id"] == id)
        .and_then(|t| t["samples"].as_u64())
        .unwrap_or(0)
}

/// Polls the API until traces A and B are stored with enough samples; returns the list.
fn wait_for_traces(agent: &Agent) -> serde_json::Value {
    let started = Instant::now();
    loop {
        let (status, body) = agent.get("/api/traces?limit=50");
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let list: serde_json::Value = serde_json::from_slice(&body).expect("JSON trace list");
        let (a, b) = (trace_samples(&list, TRACE_A), trace_samples(&list, TRACE_B));
        if a >= MIN_TRACE_SAMPLES && b >= MIN_TRACE_SAMPLES {
            println!(
                "traces stored {:.1} s after the agent's API came up: A {a} samples, B {b}",
                started.elapsed().as_secs_f64()
            );
            return list;
        }
        assert!(
            started.elapsed() < STORED_TIMEOUT,
            "traces A and B not stored with ≥ {MIN_TRACE_SAMPLES} samples within \
             {STORED_TIMEOUT:?}: {list}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn cli(args: &[&str]) -> Output {
    Command::new(agent_bin())
        .args(args)
        .output()
        .expect("run profiler-agent")
}

fn cli_ok(args: &[&str]) -> String {
    let out = cli(args);
    assert!(
        out.status.success(),
        "profiler-agent {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Parses the SVG as XML and returns every text node (frame labels and titles).
fn svg_texts(svg: &[u8]) -> String {
    let text = std::str::from_utf8(svg).expect("SVG is UTF-8");
    let doc = roxmltree::Document::parse_with_options(
        text,
        roxmltree::ParsingOptions {
            allow_dtd: true,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("the flame graph is not well-formed XML: {e}"));
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    doc.descendants()
        .filter(|n| n.is_text())
        .filter_map(|n| n.text())
        .collect::<Vec<_>>()
        .join("\n")
}

/// `own` appears in `text` and `other` does not.
fn assert_only(text: &str, own: &str, other: &str, what: &str) {
    assert!(text.contains(own), "{what}: {own} missing:\n{text}");
    assert!(!text.contains(other), "{what}: {other} present:\n{text}");
}

#[test]
fn trace_profiles_through_the_cli_and_the_api() {
    require_root();
    let scratch = Scratch::new("e2e");
    let (_exe, _driver, agent) = start_traced(&scratch.db());
    let list = wait_for_traces(&agent);
    let db = scratch.db();
    let db = db.to_str().expect("utf-8 path");

    // The CLI, reading the database the running agent writes.
    let traces = cli_ok(&["traces", "--store", db]);
    println!("{traces}");
    for id in [TRACE_A, TRACE_B] {
        let line = traces.lines().find(|l| l.starts_with(id)).expect("listed");
        assert!(
            line.contains("otel-exe-le") && line.contains("otel-driver-desc"),
            "{line}"
        );
    }
    let only_exe = cli_ok(&[
        "traces",
        "--store",
        db,
        "--service",
        "otel-exe-le",
        "--json",
    ]);
    let only_exe: serde_json::Value = serde_json::from_str(&only_exe).expect("JSON");
    assert!(trace_samples(&only_exe, TRACE_A) > 0);
    let timed = Instant::now();
    let top_a = cli_ok(&["query", "--store", db, "--trace-id", TRACE_A]);
    let cli_ms = timed.elapsed().as_secs_f64() * 1e3;
    println!("query --trace-id {TRACE_A} ({cli_ms:.0} ms, process start included):\n{top_a}");
    assert_only(&top_a, "burn_for_trace_a", "burn_for_trace_b", "CLI top A");
    let top_b = cli_ok(&["query", "--store", db, "-t", TRACE_B, "--format", "top"]);
    assert_only(&top_b, "burn_for_trace_b", "burn_for_trace_a", "CLI top B");
    let folded = cli_ok(&["query", "--store", db, "-t", TRACE_A, "-f", "folded"]);
    assert!(
        folded.lines().all(|l| !l.contains("burn_for_trace_b")),
        "{folded}"
    );
    assert!(
        folded.lines().any(|l| l.starts_with("otel-driver-desc;")),
        "{folded}"
    );
    let pprof_a = scratch.0.join("cli-a.pb.gz");
    cli_ok(&[
        "query",
        "--store",
        db,
        "-t",
        TRACE_A,
        "-f",
        "pprof",
        "-o",
        pprof_a.to_str().unwrap(),
    ]);
    assert_only(
        &go_pprof("-top", &pprof_a),
        "burn_for_trace_a",
        "burn_for_trace_b",
        "CLI pprof A",
    );
    let svg_b = scratch.0.join("cli-b.svg");
    cli_ok(&[
        "query",
        "--store",
        db,
        "-t",
        TRACE_B,
        "-f",
        "svg",
        "-o",
        svg_b.to_str().unwrap(),
    ]);
    let texts = svg_texts(&std::fs::read(&svg_b).unwrap());
    assert_only(&texts, "burn_for_trace_b", "burn_for_trace_a", "CLI SVG B");
    // A time window of one service holds all its CPU, both traces'.
    let window = cli_ok(&[
        "query",
        "--store",
        db,
        "--service",
        "otel-exe-le",
        "--since",
        "10m",
    ]);
    assert!(
        window.contains("burn_for_trace_a") && window.contains("burn_for_trace_b"),
        "{window}"
    );
    let bad = cli(&["query", "--store", db, "-t", "xyz"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("32 hex digits"));

    // The HTTP API.
    assert!(trace_samples(&list, TRACE_A) >= MIN_TRACE_SAMPLES);
    for (id, own, other) in [
        (TRACE_A, "burn_for_trace_a", "burn_for_trace_b"),
        (TRACE_B, "burn_for_trace_b", "burn_for_trace_a"),
    ] {
        let timed = Instant::now();
        let (status, top) = agent.text(&format!("/api/traces/{id}/top"));
        let ms = timed.elapsed().as_secs_f64() * 1e3;
        assert_eq!(status, 200, "{top}");
        println!("GET /api/traces/{id}/top: {ms:.1} ms\n{top}");
        assert_only(&top, own, other, "API top");
        let (status, folded) = agent.text(&format!("/api/traces/{id}/folded"));
        assert_eq!(status, 200);
        assert_only(&folded, own, other, "API folded");
        let (status, pprof) = agent.get(&format!("/api/traces/{id}/profile.pb.gz"));
        assert_eq!(status, 200);
        let file = scratch.0.join(format!("api-{id}.pb.gz"));
        std::fs::write(&file, &pprof).unwrap();
        assert_only(&go_pprof("-top", &file), own, other, "API pprof");
        let (status, svg) = agent.get(&format!("/api/traces/{id}/flamegraph.svg"));
        assert_eq!(status, 200);
        assert_only(&svg_texts(&svg), own, other, "API SVG");
        let (status, summary) = agent.text(&format!("/api/traces/{id}"));
        assert_eq!(status, 200);
        let summary: serde_json::Value = serde_json::from_str(&summary).unwrap();
        assert_eq!(
            summary["processes"].as_array().map(Vec::len),
            Some(2),
            "{summary}"
        );
    }
    let (status, message) = agent.text("/api/traces/xyz/top");
    assert_eq!(status, 400, "{message}");
    assert!(message.contains("32 hex digits"), "{message}");
    let (status, message) = agent.text(&format!("/api/traces/{}/flamegraph.svg", "c".repeat(32)));
    assert_eq!(status, 404, "{message}");
    assert!(message.contains("not in the store"), "{message}");
    let (status, window) =
        agent.get("/api/window/flamegraph.svg?service=otel-driver-desc&since=10m");
    assert_eq!(status, 200);
    let texts = svg_texts(&window);
    assert!(texts.contains("burn_for_trace_a") && texts.contains("burn_for_trace_b"));
    let (status, metrics) = agent.text("/metrics");
    assert_eq!(status, 200);
    for needle in [
        "# TYPE profiler_samples_total counter",
        "profiler_drops_total{reason=\"ringbuf_full\"}",
        "profiler_context_reads_total{source=\"thread_context\",outcome=\"decoded\"}",
        "profiler_export_total{sink=\"store\",kind=\"trace\",result=\"ok\"}",
        "profiler_store_bytes ",
    ] {
        assert!(
            metrics.contains(needle),
            "{needle} missing from /metrics:\n{metrics}"
        );
    }
    assert_eq!(agent.text("/healthz"), (200, "ok\n".to_owned()));
    agent.stop();
}

/// Headless Debian chromium renders the page, a trace page and a flame graph.
#[test]
fn browser_renders_the_page_and_a_flame_graph() {
    require_root();
    let chromium = Path::new("/usr/bin/chromium");
    assert!(
        chromium.exists(),
        "chromium is not installed (scripts/setup.sh installs it)"
    );
    let scratch = Scratch::new("browser");
    let (_exe, _driver, agent) = start_traced(&scratch.db());
    wait_for_traces(&agent);
    let artifacts = artifacts();
    let profile_dir = scratch.0.join("chromium-profile");
    // The rendered DOM (after scripts and layout: what a user sees) and a screenshot.
    let dom = |url: &str, screenshot: &str| -> String {
        let run = |mode: &str| {
            let mut chromium = Command::new(chromium);
            chromium
                .args([
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--disable-dev-shm-usage",
                    "--hide-scrollbars",
                    "--window-size=1400,1000",
                    "--virtual-time-budget=5000",
                ])
                .arg(format!("--user-data-dir={}", profile_dir.display()))
                .arg(mode)
                .arg(url);
            run_ok(&mut chromium, &format!("chromium {mode} {url}"))
        };
        let shot = artifacts.join(screenshot);
        let _ = std::fs::remove_file(&shot);
        run(&format!("--screenshot={}", shot.display()));
        let png = std::fs::read(&shot).expect("screenshot written");
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 10_000,
            "{} is not a real PNG",
            shot.display()
        );
        println!("{url}: screenshot {} ({} bytes)", shot.display(), png.len());
        run("--dump-dom")
    };
    let base = agent.url.trim_end_matches('/').to_owned();
    let index = dom(&format!("{base}/"), "store-index.png");
    for needle in [
        TRACE_A,
        TRACE_B,
        "otel-exe-le",
        "Recent traces",
        "flame graph",
    ] {
        assert!(
            index.contains(needle),
            "{needle} not on the rendered page:\n{index}"
        );
    }
    let page = dom(&format!("{base}/trace?id={TRACE_A}"), "store-trace-a.png");
    assert!(
        page.contains(&format!("Trace <span class=\"id\">{TRACE_A}</span>")),
        "{page}"
    );
    assert_only(&page, "burn_for_trace_a", "burn_for_trace_b", "trace page");
    let svg = dom(
        &format!("{base}/api/traces/{TRACE_B}/flamegraph.svg"),
        "store-flamegraph-b.png",
    );
    assert!(svg.contains("<svg"), "{svg}");
    assert_only(
        &svg,
        "burn_for_trace_b",
        "burn_for_trace_a",
        "rendered flame graph",
    );
    agent.stop();
}

/// Earlier traces survive a restart; a small size cap is enforced and counted; a bearer
/// token guards the API.
#[test]
fn restart_keeps_traces_and_retention_is_counted() {
    require_root();
    let scratch = Scratch::new("restart");
    let db = scratch.db();
    let db_str = db.to_str().unwrap().to_owned();
    {
        let (_exe, _driver, agent) = start_traced(&db);
        wait_for_traces(&agent);
        agent.stop();
    }
    // Stopped: the CLI reads the file alone.
    let top = cli_ok(&["query", "--store", &db_str, "-t", TRACE_A]);
    assert_only(
        &top,
        "burn_for_trace_a",
        "burn_for_trace_b",
        "CLI after stop",
    );

    // Restarted (nothing traced now): the earlier traces are served, behind a token.
    let agent = Agent::start(&db, &[std::process::id()], &["--api-token", "s3cret"]);
    let url = format!("{}api/traces/{TRACE_B}/top", agent.url);
    assert_eq!(http_get(&url, None).0, 401);
    assert_eq!(http_get(&url, Some("wrong")).0, 401);
    let (status, body) = http_get(&url, Some("s3cret"));
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, 200, "{body}");
    assert_only(
        &body,
        "burn_for_trace_b",
        "burn_for_trace_a",
        "after restart",
    );
    assert_eq!(agent.text("/healthz").0, 200, "healthz needs no token");
    let before = std::fs::metadata(&db).unwrap().len();
    agent.stop();

    // Restarted with a cap smaller than the data: the oldest go, and it is counted.
    let agent = Agent::start(&db, &[std::process::id()], &["--store-max-bytes", "16KiB"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let deleted = loop {
        let (_, metrics) = agent.text("/metrics");
        let deleted: u64 = metrics
            .lines()
            .filter(|l| {
                l.starts_with("profiler_store_deleted_total{") && l.contains("reason=\"size\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum();
        if deleted > 0 || Instant::now() > deadline {
            println!("retention: {deleted} rows deleted by size; store was {before} bytes");
            break deleted;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(deleted >= 2, "the size cap deleted nothing");
    let (status, _) = agent.text(&format!("/api/traces/{TRACE_A}/top"));
    assert_eq!(status, 404, "trace A deleted by the cap");
    agent.stop();
}

/// A corrupt store stops the agent before it loads anything, with a clear message, and the
/// file is left as it was; a missing store is a clear CLI error.
#[test]
fn corrupt_or_missing_store_is_a_clear_error() {
    require_root();
    let scratch = Scratch::new("corrupt");
    let db = scratch.db();
    std::fs::write(&db, vec![0x5a; 16384]).unwrap();
    let out = cli(&[
        "run",
        "--store",
        db.to_str().unwrap(),
        "--api-listen",
        "127.0.0.1:0",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is corrupt") && stderr.contains("left untouched"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&db).unwrap(), vec![0x5a; 16384]);
    let out = cli(&["traces", "--store", "/nonexistent/profiles.db"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no store at /nonexistent/profiles.db"),
        "{stderr}"
    );
}
