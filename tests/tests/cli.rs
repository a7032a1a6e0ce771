//! The agent binary as a user runs it: `record` output read by `go tool pprof`, and the errors
//! a user gets for bad input. Needs root; run through `cargo xtask test`.

use std::process::Command;

use profiler_tests::*;

const GO: &str = "/usr/lib/go-1.19/bin/go";

fn record(args: &[&str]) -> std::process::Output {
    Command::new(agent_bin())
        .arg("record")
        .args(args)
        .output()
        .expect("run profiler-agent")
}

#[test]
fn record_writes_a_pprof_that_go_pprof_reads() {
    require_root();
    let fixture = Fixture::start(Command::new(burn_c()));
    let dir = tempdir();
    let out = dir.path().join("cpu.pb.gz");
    let pid = fixture.pid.to_string();
    let output = record(&[
        "--duration",
        "3s",
        "-F",
        "99",
        "--pid",
        &pid,
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(
        output.status.success(),
        "record failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("samples from 1 processes"), "{stderr}");

    let top = Command::new(GO)
        .args(["tool", "pprof", "-top", "-symbolize=none"])
        .arg(&out)
        .output()
        .expect("run go tool pprof");
    let text = String::from_utf8_lossy(&top.stdout);
    assert!(
        top.status.success(),
        "pprof failed: {}",
        String::from_utf8_lossy(&top.stderr)
    );
    for f in ["burn_a", "burn_b", "thread_a_main", "thread_b_main"] {
        assert!(text.contains(f), "{f} missing from pprof -top:\n{text}");
    }
    let tags = Command::new(GO)
        .args(["tool", "pprof", "-tags"])
        .arg(&out)
        .output()
        .unwrap();
    let tags = String::from_utf8_lossy(&tags.stdout);
    for label in ["thread-a", "thread-b", &pid, "burn-c"] {
        assert!(tags.contains(label), "label {label} missing:\n{tags}");
    }
}

#[test]
fn record_writes_folded_stacks() {
    require_root();
    let fixture = Fixture::start(Command::new(burn_c()));
    let dir = tempdir();
    let out = dir.path().join("cpu.folded");
    let pid = fixture.pid.to_string();
    let output = record(&[
        "--duration",
        "2s",
        "-F",
        "99",
        "--pid",
        &pid,
        "--format",
        "folded",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let folded = std::fs::read_to_string(&out).unwrap();
    // The heaviest burn_a stack: a tick that interrupted the kernel on burn_a's behalf (an
    // interrupt's softirq) has kernel frames after it.
    let (line, stack, count) = folded
        .lines()
        .filter(|l| l.contains("burn_a"))
        .filter_map(|l| {
            let (stack, count) = l.rsplit_once(' ')?;
            Some((l, stack, count.parse::<u64>().ok()?))
        })
        .max_by_key(|(_, _, count)| *count)
        .expect("a burn_a stack");
    assert!(count > 0);
    assert!(
        stack.starts_with("burn-c;"),
        "process name is the root: {line}"
    );
    assert!(stack.ends_with(";burn_a"), "leaf last: {line}");
}

#[test]
fn nonexistent_pid_is_a_clear_error() {
    require_root();
    let output = record(&["--duration", "1s", "--pid", "999999999", "-o", "/dev/null"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no process with pid 999999999"), "{stderr}");
}

#[test]
fn missing_capabilities_are_named() {
    require_root();
    // An unprivileged user: no CAP_BPF, no CAP_PERFMON.
    let output = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(agent_bin())
        .args(["record", "--duration", "1s", "-o", "/dev/null"])
        .output()
        .expect("run setpriv");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("missing capabilities CAP_BPF, CAP_PERFMON"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "one clear line:\n{stderr}");
}

/// A directory for one test's outputs, removed when the test ends (passed or not).
fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("profiler-cli-test-")
        .tempdir()
        .expect("create a temporary directory")
}
