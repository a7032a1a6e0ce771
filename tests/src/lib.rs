//! Harness for the root integration tests: build and start fixture programs (killed on drop),
//! drive an in-process [`Recording`] until a condition holds, and find the agent binary.
//! Go toolchains and Go fixture builds are in [`go`].

pub mod go;

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use profiler_agent::{collector::SymbolizedSample, ebpf::SamplerConfig, record::Recording};

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
    let src = workspace_root().join("tests/fixtures").join(source);
    let out = fixture_dir().join(output);
    let fresh = match (std::fs::metadata(&src), std::fs::metadata(&out)) {
        (Ok(s), Ok(o)) => o.modified().unwrap() >= s.modified().unwrap(),
        _ => false,
    };
    if !fresh {
        let status = Command::new("gcc")
            .args(flags)
            .arg("-o")
            .arg(&out)
            .arg(&src)
            .status()
            .expect("run gcc");
        assert!(status.success(), "gcc failed for {source}");
    }
    out
}

/// The C burn fixture, as built for the attribution tests.
pub fn burn_c() -> PathBuf {
    build_c(
        "burn.c",
        "burn-c",
        &["-O2", "-g", "-fno-omit-frame-pointer", "-pthread"],
    )
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
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(pid) = line.strip_prefix("ready ") {
                    let _ = tx.send(pid.trim().parse::<u32>().ok());
                }
            }
        });
        let pid = rx
            .recv_timeout(Duration::from_secs(10))
            .ok()
            .flatten()
            .unwrap_or_else(|| {
                let _ = child.kill();
                panic!("fixture did not report ready within 10 s")
            });
        Self { child, pid }
    }

    pub fn wait(&mut self) -> std::process::ExitStatus {
        self.child.wait().expect("wait fixture")
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

/// Number of samples whose leaf function is `leaf`.
pub fn leaf_count(samples: &[SymbolizedSample], leaf: &str) -> u64 {
    samples
        .iter()
        .filter(|s| s.functions.first().is_some_and(|f| &**f == leaf))
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
    for s in samples
        .iter()
        .filter(|s| s.functions.first().is_some_and(|f| &**f == leaf))
    {
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
