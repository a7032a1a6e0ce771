//! JIT-compiled code named from the process's perf map (`/tmp/perf-<pid>.map`): a minimal C
//! JIT whose code lives in anonymous executable memory, Node.js with `--perf-basic-prof`, and a
//! JVM whose map `jcmd` writes.
//! Needs root; run through `cargo xtask test`.

use std::{process::Command, time::Duration};

use profiler_agent::{collector::SymbolizedSample, record::Recording};
use profiler_tests::*;

const MIN_SAMPLES: u64 = 30;
const CAP: Duration = Duration::from_secs(30);

/// Removes a fixture's perf map when the test ends, passed or not (a killed fixture cannot).
struct PerfMapFile(String);

impl Drop for PerfMapFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A JIT fixture started from `command`, its perf map removed at the end, and a recording of
/// it alone at 99 Hz.
struct Profiled {
    fixture: Fixture,
    recording: Recording,
    _map: PerfMapFile,
}

fn start_profiled(command: Command) -> Profiled {
    let fixture = Fixture::start(command);
    let map = PerfMapFile(format!("/tmp/perf-{}.map", fixture.pid));
    let recording =
        Recording::start(&sampler_config(Some(vec![fixture.pid]), 99)).expect("start recording");
    Profiled {
        fixture,
        recording,
        _map: map,
    }
}

fn samples_in(samples: &[SymbolizedSample], pid: u32, function: &str) -> u64 {
    samples
        .iter()
        .filter(|s| s.pid == pid && s.functions.iter().any(|f| f.contains(function)))
        .map(|s| s.count)
        .sum()
}

fn describe(samples: &[SymbolizedSample]) -> Vec<String> {
    let mut leaves: Vec<(u64, &str)> = samples.iter().map(|s| (s.count, &*s.leaf)).collect();
    leaves.sort_unstable_by(|a, b| b.cmp(a));
    leaves
        .iter()
        .take(8)
        .map(|(n, leaf)| format!("{n} × {leaf}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn names_jit_code_from_the_perf_map_and_follows_renames() {
    require_root();
    let Profiled {
        mut fixture,
        recording,
        _map,
    } = start_profiled(Command::new(jit_c()));

    let (samples, done) = sample_until(&recording, CAP, |s| {
        leaf_count(s, "jit_spin_v1") >= MIN_SAMPLES
    })
    .await;
    assert!(
        done,
        "fewer than {MIN_SAMPLES} samples named jit_spin_v1 within {CAP:?}; leaves: {:?}",
        describe(&samples)
    );
    // The JIT code is the leaf; the C caller that jumped into it is above it.
    let under_main = samples
        .iter()
        .filter(|s| &*s.leaf == "jit_spin_v1" && s.functions.iter().any(|f| &**f == "main"))
        .map(|s| s.count)
        .sum::<u64>();
    assert!(
        under_main * 10 >= leaf_count(&samples, "jit_spin_v1") * 9,
        "{under_main} of {} JIT samples under main",
        leaf_count(&samples, "jit_spin_v1")
    );

    // The same memory now holds other code: the map's newer line wins, for every sample.
    fixture.signal(libc::SIGUSR1);
    assert_eq!(
        fixture
            .wait_for_line("named ", Duration::from_secs(10))
            .as_deref(),
        Some("jit_spin_v2"),
        "the fixture did not rename its code"
    );
    recording.flush(|_| ()).await.expect("flush");
    let (samples, done) = sample_until(&recording, CAP, |s| {
        leaf_count(s, "jit_spin_v2") >= MIN_SAMPLES
    })
    .await;
    assert!(
        done,
        "fewer than {MIN_SAMPLES} samples named jit_spin_v2 within {CAP:?}; leaves: {:?}",
        describe(&samples)
    );
    assert_eq!(
        leaf_count(&samples, "jit_spin_v1"),
        0,
        "names from the stale line"
    );
    recording.finish(|_| ()).await.expect("finish");
    fixture.signal(libc::SIGTERM);
    assert!(fixture.wait().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn finds_a_perf_map_written_after_the_code_ran() {
    require_root();
    let mut late = Command::new(jit_c());
    late.arg("late");
    let Profiled {
        mut fixture,
        recording,
        _map,
    } = start_profiled(late);
    // No map yet: the code is anonymous memory, unnamed but attributed.
    let (samples, done) = sample_until(&recording, CAP, |s| {
        leaf_count_with(s, "[unknown] [anon]+") >= MIN_SAMPLES
    })
    .await;
    assert!(
        done,
        "fewer than {MIN_SAMPLES} samples in unnamed anonymous code within {CAP:?}; leaves: {:?}",
        describe(&samples)
    );
    fixture.signal(libc::SIGUSR1);
    assert_eq!(
        fixture
            .wait_for_line("named ", Duration::from_secs(10))
            .as_deref(),
        Some("jit_spin_v1")
    );
    recording.flush(|_| ()).await.expect("flush");
    // Looked for again at most every 10 s per process.
    let (samples, done) = sample_until(&recording, CAP, |s| {
        leaf_count(s, "jit_spin_v1") >= MIN_SAMPLES
    })
    .await;
    let finished = recording.finish(|_| ()).await.expect("finish");
    assert!(
        done,
        "fewer than {MIN_SAMPLES} samples named jit_spin_v1 within {CAP:?} of the map's writing; \
         leaves: {:?}",
        describe(&samples)
    );
    assert_eq!(finished.metrics.get("perf_maps_found"), 1);
    fixture.signal(libc::SIGTERM);
    assert!(fixture.wait().success());
}

fn leaf_count_with(samples: &[SymbolizedSample], prefix: &str) -> u64 {
    samples
        .iter()
        .filter(|s| s.leaf.starts_with(prefix))
        .map(|s| s.count)
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn names_node_js_functions_with_perf_basic_prof() {
    require_root();
    let script = workspace_root().join("tests/fixtures/burn.js");
    // --perf-basic-prof also has V8 write an `isolate-*-v8.log` into its working directory:
    // there, not into the source tree.
    let mut command = Command::new("node");
    command
        .arg("--perf-basic-prof")
        .arg(&script)
        .current_dir(fixture_dir());
    let Profiled {
        mut fixture,
        recording,
        _map,
    } = start_profiled(command);
    let (samples, done) = sample_until(&recording, CAP, |s| {
        samples_in(s, fixture.pid, "burnJs") >= MIN_SAMPLES
    })
    .await;
    let finished = recording.finish(|_| ()).await.expect("finish");
    assert!(
        done,
        "fewer than {MIN_SAMPLES} samples in burnJs within {CAP:?}; leaves: {:?}",
        describe(&samples)
    );
    // V8 names optimized code `JS:*burnJs <script>:<line>:<column>`.
    let named = samples
        .iter()
        .flat_map(|s| s.functions.iter())
        .find(|f| f.contains("burnJs"))
        .expect("a burnJs frame");
    assert!(
        named.starts_with("JS:") && named.contains("burn.js"),
        "V8's name for it: {named}"
    );
    assert!(finished.metrics.get("perf_maps_found") >= 1);
    fixture.signal(libc::SIGTERM);
    assert!(fixture.wait().success());
    let v8_log_suffix = format!("-{}-v8.log", fixture.pid);
    for entry in std::fs::read_dir(fixture_dir()).unwrap().flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .ends_with(&v8_log_suffix)
        {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn names_java_methods_from_the_map_jcmd_writes() {
    require_root();
    let classes = fixture_dir().join("java");
    run_ok(
        Command::new("javac")
            .arg("-d")
            .arg(&classes)
            .arg(workspace_root().join("tests/fixtures/BurnJava.java")),
        "javac",
    );
    let mut java = Command::new("java");
    java.args(["-XX:+PreserveFramePointer", "-cp"])
        .arg(&classes)
        .arg("BurnJava");
    let mut fixture = Fixture::start(java);
    let _map = PerfMapFile(format!("/tmp/perf-{}.map", fixture.pid));
    run_ok(
        Command::new("jcmd").args([&fixture.pid.to_string(), "Compiler.perfmap"]),
        "jcmd Compiler.perfmap",
    );
    let recording =
        Recording::start(&sampler_config(Some(vec![fixture.pid]), 99)).expect("start recording");
    let method = "long BurnJava.burnJava(long)";
    let (samples, done) = sample_until(&recording, CAP, |s| {
        samples_in(s, fixture.pid, method) >= MIN_SAMPLES
    })
    .await;
    recording.finish(|_| ()).await.expect("finish");
    assert!(
        done,
        "fewer than {MIN_SAMPLES} samples in {method} within {CAP:?}; leaves: {:?}",
        describe(&samples)
    );
    // Through the compiled code's frame pointers back into the JVM that called main.
    let in_method = samples_in(&samples, fixture.pid, method);
    let from_jvm = samples
        .iter()
        .filter(|s| {
            s.functions.iter().any(|f| &**f == method)
                && s.functions
                    .iter()
                    .any(|f| f.contains("JavaCalls::call_helper"))
        })
        .map(|s| s.count)
        .sum::<u64>();
    assert!(
        from_jvm * 10 >= in_method * 9,
        "{from_jvm} of {in_method} samples in {method} unwound to JavaCalls::call_helper"
    );
    // SIGTERM: the JVM's own exit removes its /tmp/hsperfdata_root/<pid> and attach socket.
    fixture.signal(libc::SIGTERM);
    fixture.wait();
    let _ = std::fs::remove_file(format!("/tmp/.java_pid{}", fixture.pid));
}
