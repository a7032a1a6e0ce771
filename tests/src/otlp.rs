//! OTLP test peers: the Python receiver (`tests/otlp_receiver/receiver.py`, decoding with
//! opentelemetry-proto 1.45.2 = proto v1.10) run from a venv created on first use, and the
//! agent binary run as a daemon with its JSON log captured.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{Fixture, agent_bin, workspace_root};

/// What the receiver must be built on: v1.10 profiles (1.43.0–1.45.2) and a gRPC server.
pub const PIP_PACKAGES: &[&str] = &["opentelemetry-proto==1.45.2", "grpcio==1.85.3"];

/// The venv's python, created (idempotently) under target/otlp-venv. Panics when it cannot be
/// created: these tests must never pass by skipping.
pub fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let venv = workspace_root().join("target/otlp-venv");
        let python = venv.join("bin/python");
        let probe = |python: &Path| {
            Command::new(python)
                .args([
                    "-c",
                    "import grpc; from importlib.metadata import version; \
                     from opentelemetry.proto.collector.profiles.v1development import profiles_service_pb2_grpc; \
                     assert version('opentelemetry-proto') == '1.45.2', version('opentelemetry-proto')",
                ])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if probe(&python) {
            return python;
        }
        let run = |command: &mut Command| {
            let status = command
                .status()
                .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
            assert!(
                status.success(),
                "{command:?} failed ({status}); scripts/setup.sh creates this venv"
            );
        };
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv));
        run(Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(PIP_PACKAGES));
        assert!(
            probe(&python),
            "{} cannot import the OTLP receiver's packages",
            python.display()
        );
        python
    })
}

/// A running receiver; stopped when dropped. Its decoded requests go to a JSON-lines file.
pub struct Receiver {
    fixture: Option<Fixture>,
    pub grpc_port: u16,
    pub http_port: u16,
    pub out: PathBuf,
}

impl Receiver {
    /// Starts a receiver on free ports (0) or given ones, writing to `out`.
    pub fn start(grpc_port: u16, http_port: u16, out: &Path, extra: &[&str]) -> Self {
        let mut command = Command::new(python());
        command
            .arg(workspace_root().join("tests/otlp_receiver/receiver.py"))
            .args(["--grpc-port", &grpc_port.to_string()])
            .args(["--http-port", &http_port.to_string()])
            .arg("--out")
            .arg(out)
            .args(extra);
        let fixture = Fixture::start(command);
        let port = |name: &str| -> u16 {
            fixture
                .preamble
                .iter()
                .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
                .unwrap_or_else(|| panic!("receiver did not print {name}: {:?}", fixture.preamble))
        };
        Self {
            grpc_port: port("grpc_port "),
            http_port: port("http_port "),
            fixture: Some(fixture),
            out: out.to_owned(),
        }
    }

    /// Stops the receiver (SIGKILL: a receiver that dies, not one that says goodbye).
    pub fn stop(&mut self) {
        self.fixture.take();
    }

    pub fn grpc_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }

    pub fn http_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// Every request decoded so far.
    pub fn requests(&self) -> Vec<Value> {
        read_requests(&self.out)
    }
}

pub fn read_requests(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l}: {e}")))
        .collect()
}

/// The agent binary running `run`; killed when dropped. Its JSON log lines are kept.
pub struct Agent {
    child: Child,
    pub pid: u32,
    log: Arc<Mutex<Vec<Value>>>,
}

impl Agent {
    /// `profiler-agent run <args>` with JSON logs at `log_filter`.
    pub fn start(args: &[String], log_filter: &str) -> Self {
        let mut child = Command::new(agent_bin())
            .arg("run")
            .args(args)
            .env("PROFILER_LOG_FORMAT", "json")
            .env("PROFILER_LOG", log_filter)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start profiler-agent");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({ "fields": { "message": line } }));
                lines.lock().expect("agent log").push(value);
            }
        });
        let pid = child.id();
        Self { child, pid, log }
    }

    /// Log lines whose message is `message`, their fields.
    pub fn logged(&self, message: &str) -> Vec<Value> {
        self.log
            .lock()
            .expect("agent log")
            .iter()
            .filter_map(|l| l.get("fields"))
            .filter(|f| f.get("message").and_then(Value::as_str) == Some(message))
            .cloned()
            .collect()
    }

    /// The whole log, for failure messages.
    pub fn log_text(&self) -> String {
        self.log
            .lock()
            .expect("agent log")
            .iter()
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits (`timeout` at most) for a log line with `message`.
    pub fn wait_logged(&self, message: &str, timeout: Duration) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = self.logged(message).pop() {
                return Some(v);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// RssAnon in KiB.
    pub fn rss_anon_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid)).expect("agent status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("RssAnon:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("RssAnon in /proc/<pid>/status")
    }

    /// SIGTERM, then waits up to `timeout`; returns how long it took and the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> (Duration, Option<std::process::ExitStatus>) {
        let started = Instant::now();
        // SAFETY: kill has no memory preconditions; the pid is our own live child.
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        while started.elapsed() < timeout {
            if let Ok(Some(status)) = self.child.try_wait() {
                // Let the log reader catch up with the last lines.
                std::thread::sleep(Duration::from_millis(200));
                return (started.elapsed(), Some(status));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        (started.elapsed(), None)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A numeric log field.
pub fn field(fields: &Value, name: &str) -> u64 {
    fields
        .get(name)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("no numeric field {name} in {fields}"))
}
