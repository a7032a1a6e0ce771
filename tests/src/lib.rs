//! Harness for the root integration tests: build and start fixture programs (killed on drop),
//! drive an in-process [`Recording`] until a condition holds, and find the agent binary.
//! Go toolchains and Go fixture builds are in [`go`].

pub mod go;

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Mutex, mpsc},
    time::{Duration, Instant},
};

pub mod otel_ctx;
pub mod otlp;

use profiler_agent::{collector::SymbolizedSample, ebpf::SamplerConfig, record::Recording};

/// Runs `command` and returns its stdout; fails the test, with `what` and the command's
/// stderr, when it cannot start or exits unsuccessfully.
pub fn run_ok(command: &mut Command, what: &str) -> String {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `go tool pprof <view> -symbolize=none <file>` (Go 1.19, installed by the setup) as text;
/// `view` is a pprof output flag such as `-top` or `-tags`. Fails on a profile pprof refuses.
pub fn go_pprof(view: &str, file: &Path) -> String {
    run_ok(
        Command::new("/usr/lib/go-1.19/bin/go")
            .args(["tool", "pprof", view, "-symbolize=none"])
            .arg(file),
        &format!("go tool pprof {view} on {}", file.display()),
    )
}

/// Fails loudly: these tests load eBPF programs and must never pass by skipping.
pub fn require_root() {
    assert!(
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() } == 0,
        "the integration tests load eBPF programs: run them as root (cargo xtask test does)"
    );
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Where built fixtures go.
pub fn fixture_dir() -> PathBuf {
    let dir = workspace_root().join("target/fixtures");
    std::fs::create_dir_all(&dir).expect("create target/fixtures");
    dir
}

/// Compiles `tests/fixtures/<source>` with gcc and `flags` into `target/fixtures/<output>`,
/// unless an up-to-date build exists.
pub fn build_c(source: &str, output: &str, flags: &[&str]) -> PathBuf {
    build_c_sources(&[source], output, flags)
}

/// Compiles and links `sources` (relative to `tests/fixtures`) with gcc into
/// `target/fixtures/<output>`: `gcc <sources> <flags> -o <output>` (so `-l` flags work), unless
/// the output is newer than every source and every header next to them and was built with
/// the same command line.
pub fn build_c_sources(sources: &[&str], output: &str, flags: &[&str]) -> PathBuf {
    let fixtures = workspace_root().join("tests/fixtures");
    let sources: Vec<PathBuf> = sources.iter().map(|s| fixtures.join(s)).collect();
    let out = fixture_dir().join(output);
    let stamp = fixture_dir().join(format!("{output}.cmd"));
    let command = format!("{sources:?} {flags:?}");
    let fresh = std::fs::read_to_string(&stamp).is_ok_and(|c| c == command)
        && std::fs::metadata(&out)
            .and_then(|m| m.modified())
            .is_ok_and(|built| inputs(&sources).iter().all(|t| *t <= built));
    if !fresh {
        let status = Command::new("gcc")
            .args(&sources)
            .args(flags)
            .arg("-o")
            .arg(&out)
            .status()
            .expect("run gcc");
        assert!(status.success(), "gcc failed for {output}");
        std::fs::write(&stamp, command).expect("write build stamp");
    }
    out
}

/// Modification times of the sources and of the headers in their directories.
fn inputs(sources: &[PathBuf]) -> Vec<std::time::SystemTime> {
    let mut files = sources.to_vec();
    for dir in sources.iter().filter_map(|s| s.parent()) {
        for entry in std::fs::read_dir(dir).expect("read fixture dir").flatten() {
            if entry.path().extension().is_some_and(|e| e == "h") {
                files.push(entry.path());
            }
        }
    }
    files
        .iter()
        .map(|f| {
            std::fs::metadata(f)
                .and_then(|m| m.modified())
                .unwrap_or_else(|e| panic!("{}: {e}", f.display()))
        })
        .collect()
}

/// The C burn fixture, as built for the attribution tests.
pub fn burn_c() -> PathBuf {
    build_c(
        "burn.c",
        "burn-c",
        &["-O2", "-g", "-fno-omit-frame-pointer", "-pthread"],
    )
}

/// The minimal JIT (`jit.c`): code in anonymous executable memory, named in its perf map.
pub fn jit_c() -> PathBuf {
    build_c("jit.c", "jit", &["-O2", "-g", "-fno-omit-frame-pointer"])
}

/// The Rust burn fixture (a binary of this package, built with the tests).
pub fn burn_rust() -> PathBuf {
    target_bin("burn_rust")
}

/// The agent binary (`cargo xtask test` builds it before the tests).
pub fn agent_bin() -> PathBuf {
    if let Ok(p) = std::env::var("PROFILER_AGENT_BIN") {
        return p.into();
    }
    target_bin("profiler-agent")
}

/// A binary of the workspace next to this test's build: target/<profile>/deps/<test> ->
/// target/<profile>/<name>.
fn target_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join(name);
    assert!(
        bin.exists(),
        "{} not built (cargo build --workspace)",
        bin.display()
    );
    bin
}

/// A started fixture; killed when dropped.
pub struct Fixture {
    child: Child,
    pub pid: u32,
    /// The lines the fixture printed before `ready`.
    pub preamble: Vec<String>,
    /// Stdout lines after `ready`, for fixtures that report more (behind a mutex: `Fixture`
    /// stays `Sync`).
    lines: Mutex<mpsc::Receiver<String>>,
}

impl Fixture {
    /// Starts `command` and waits (10 s at most) for its `ready <pid>` line.
    pub fn start(mut command: Command) -> Self {
        let mut child = command
            .stdout(Stdio::piped())
            .spawn()
            .expect("start fixture");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        // Drains stdout for the fixture's whole life, so that it never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut preamble = Vec::new();
        let pid = loop {
            let line = deadline
                .checked_duration_since(Instant::now())
                .and_then(|left| rx.recv_timeout(left).ok());
            let Some(line) = line else {
                let _ = child.kill();
                panic!("fixture did not report ready within 10 s; it printed {preamble:?}")
            };
            match line.strip_prefix("ready ") {
                Some(pid) => break pid.trim().parse::<u32>().expect("ready <pid>"),
                None => preamble.push(line),
            }
        };
        Self {
            child,
            pid,
            preamble,
            lines: Mutex::new(rx),
        }
    }

    /// Waits for a stdout line starting with `prefix`, skipping others; returns the rest of it.
    pub fn wait_for_line(&self, prefix: &str, timeout: Duration) -> Option<String> {
        let rx = self.lines.lock().expect("fixture lines");
        wait_line(&rx, prefix, timeout)
    }

    /// The next line printed after `ready`, if one comes within `timeout`.
    pub fn next_line(&self, timeout: Duration) -> Option<String> {
        self.lines
            .lock()
            .expect("fixture lines")
            .recv_timeout(timeout)
            .ok()
    }

    /// Sends `signal` to the fixture.
    pub fn signal(&self, signal: i32) {
        let pid = i32::try_from(self.pid).expect("pid");
        // SAFETY: kill has no memory preconditions; the pid is our own live child.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({pid}, {signal})");
    }

    pub fn wait(&mut self) -> std::process::ExitStatus {
        self.child.wait().expect("wait fixture")
    }
}

fn wait_line(rx: &mpsc::Receiver<String>, prefix: &str, timeout: Duration) -> Option<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).ok()?;
        if let Some(rest) = line.strip_prefix(prefix) {
            return Some(rest.to_owned());
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn sampler_config(pids: Option<Vec<u32>>, frequency_hz: u64) -> SamplerConfig {
    SamplerConfig {
        frequency_hz,
        pids,
        ring_buffer_bytes: 8 << 20,
        ..SamplerConfig::default()
    }
}

/// Samples until `done` holds for the symbolized samples so far, polling every second, or
/// until `cap`. Returns the last snapshot and whether the condition was met.
pub async fn sample_until(
    recording: &Recording,
    cap: Duration,
    done: impl Fn(&[SymbolizedSample]) -> bool,
) -> (Vec<SymbolizedSample>, bool) {
    let deadline = Instant::now() + cap;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let snapshot = recording.snapshot().await.expect("snapshot");
        if done(&snapshot) {
            return (snapshot, true);
        }
        if Instant::now() >= deadline {
            return (snapshot, false);
        }
    }
}

/// As [`sample_until`], after a warm-up that ends with the first sample carrying a trace
/// context. Until the agent has inspected a new process (one ring-buffer drain and one look at
/// its objects after its first sample) the kernel has no context source for it, and its samples
/// carry no context by design (counted as `context_no_source`); they are discarded here, so
/// attribution checks measure the steady state.
pub async fn sample_traced_until(
    recording: &Recording,
    cap: Duration,
    done: impl Fn(&[SymbolizedSample]) -> bool,
) -> (Vec<SymbolizedSample>, bool) {
    let deadline = Instant::now() + cap;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let snapshot = recording.snapshot().await.expect("snapshot");
        if snapshot.iter().any(|s| s.context.is_some()) {
            break;
        }
        if Instant::now() >= deadline {
            return (snapshot, false);
        }
    }
    recording.flush(|_| ()).await.expect("flush the warm-up");
    sample_until(
        recording,
        deadline.saturating_duration_since(Instant::now()),
        done,
    )
    .await
}

/// The bar every trace-context test holds a function to: at least 95% of its `total` samples
/// carry its own trace (`own`), at most 1% another (`other`).
pub fn assert_attributed(label: &str, function: &str, total: u64, own: u64, other: u64) {
    println!(
        "{label}: {function}: {total} samples, {own} ({:.1}%) with its trace, {other} ({:.1}%) with another",
        100.0 * own as f64 / total.max(1) as f64,
        100.0 * other as f64 / total.max(1) as f64,
    );
    assert!(
        own as f64 >= 0.95 * total as f64,
        "{label}: {function} attributed to its trace {own}/{total}"
    );
    assert!(
        other as f64 <= 0.01 * total as f64,
        "{label}: {function} attributed to another trace {other}/{total}"
    );
}

/// Number of samples whose leaf function is `leaf`.
pub fn leaf_count(samples: &[SymbolizedSample], leaf: &str) -> u64 {
    samples
        .iter()
        .filter(|s| &*s.leaf == leaf)
        .map(|s| s.count)
        .sum()
}

/// For samples with leaf `leaf`: (total, containing `with`, containing `without`).
pub fn caller_counts(
    samples: &[SymbolizedSample],
    leaf: &str,
    with: &str,
    without: &str,
) -> (u64, u64, u64) {
    let mut total = 0;
    let mut has_with = 0;
    let mut has_without = 0;
    for s in samples.iter().filter(|s| &*s.leaf == leaf) {
        total += s.count;
        if s.functions.iter().any(|f| &**f == with) {
            has_with += s.count;
        }
        if s.functions.iter().any(|f| &**f == without) {
            has_without += s.count;
        }
    }
    (total, has_with, has_without)
}
