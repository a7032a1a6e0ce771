//! The Kubernetes deployment's promises, on this machine: the in-kernel workload filter (a
//! fixture whose cgroup is not selected gets no sample at all, and the skipped ticks are
//! counted), and the agent working with only the capabilities the DaemonSet grants, as a
//! non-root user, against a fixture of another user.
//! Needs root; run through `cargo xtask test k8s`.

use std::{collections::BTreeSet, path::PathBuf, process::Command, time::Duration};

use profiler_agent::{
    ebpf::{SamplerConfig, drain_interval},
    k8s::cgroup,
    record::Recording,
};
use profiler_common::Counter;
use profiler_tests::{otel_ctx::builds, *};

const CAP: Duration = Duration::from_secs(30);

/// A cgroup v2 directory created for a test under the root of the hierarchy; processes still
/// in it are moved back to the root and the directory removed when dropped.
struct TestCgroup {
    path: PathBuf,
    root: PathBuf,
}

impl TestCgroup {
    fn create(name: &str) -> Self {
        let root = cgroup::host_cgroup2_mount().expect("a cgroup v2 hierarchy is mounted");
        let cgroup = Self::create_under(root, name);
        assert!(cgroup::is_cgroup2(&cgroup.path));
        cgroup
    }

    /// A cgroup under the root of any hierarchy (v1 or v2).
    fn create_under(root: PathBuf, name: &str) -> Self {
        let path = root.join(format!("profiler-test-{}-{name}", std::process::id()));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self { path, root }
    }

    fn id(&self) -> u64 {
        cgroup::cgroup_id(&self.path).expect("cgroup id")
    }

    /// Moves a whole process (every thread) into this cgroup.
    fn adopt(&self, pid: u32) {
        std::fs::write(self.path.join("cgroup.procs"), pid.to_string())
            .unwrap_or_else(|e| panic!("move {pid} into {}: {e}", self.path.display()));
        let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        let unified = cgroup::parse_proc_cgroup(&own).unified_path.unwrap();
        assert!(
            self.path.ends_with(unified.trim_start_matches('/')),
            "{pid} is in {unified}"
        );
    }
}

impl Drop for TestCgroup {
    /// Deepest cgroups first; processes left in them go back to the root.
    fn drop(&mut self) {
        let mut dirs = cgroup::walk(&self.path, cgroup::MAX_CGROUP_DEPTH);
        dirs.sort_by_key(|d| std::cmp::Reverse(d.path.components().count()));
        for dir in dirs {
            for pid in cgroup::procs(&dir.path).unwrap_or_default() {
                let _ = std::fs::write(self.root.join("cgroup.procs"), pid.to_string());
            }
            let _ = std::fs::remove_dir(&dir.path);
        }
    }
}

fn samples_of(samples: &[profiler_agent::collector::SymbolizedSample], pid: u32) -> u64 {
    samples
        .iter()
        .filter(|s| s.pid == pid)
        .map(|s| s.count)
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn cgroup_filter_skips_unselected_workloads_in_the_kernel() {
    require_root();
    let selected = TestCgroup::create("selected");
    let excluded = TestCgroup::create("excluded");
    let inside = Fixture::start(Command::new(burn_c()));
    let outside = Fixture::start(Command::new(burn_c()));
    selected.adopt(inside.pid);
    excluded.adopt(outside.pid);

    let config = SamplerConfig {
        frequency_hz: 99,
        cgroups: Some(BTreeSet::from([selected.id()])),
        ..Default::default()
    };
    let mut recording = Recording::start(&config).expect("start recording");
    let (samples, done) = sample_until(&recording, CAP, |s| samples_of(s, inside.pid) >= 300).await;
    let phase1 = recording.kernel_counters();
    let (from_inside, from_outside) = (
        samples_of(&samples, inside.pid),
        samples_of(&samples, outside.pid),
    );
    let from_anything_else: u64 = samples
        .iter()
        .filter(|s| s.pid != inside.pid)
        .map(|s| s.count)
        .sum();
    println!(
        "selected fixture {from_inside} samples, excluded fixture {from_outside}, any other process {from_anything_else}; kernel: {} ticks, {} emitted, {} skipped by cgroup",
        phase1.get(Counter::Invocations),
        phase1.get(Counter::SamplesEmitted),
        phase1.get(Counter::SkippedCgroup),
    );
    assert!(
        done,
        "selected fixture: {from_inside} samples within {CAP:?}"
    );
    assert_eq!(from_outside, 0, "the excluded fixture was sampled");
    assert_eq!(
        from_anything_else, 0,
        "a process outside the cgroup was sampled"
    );
    // Every sample the kernel emitted is the selected fixture's: the counter (read after the
    // snapshot) may be ahead by the samples still in the ring buffer: at most one drain's
    // worth of every CPU.
    let emitted = phase1.get(Counter::SamplesEmitted);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let drain = drain_interval(99, cpus as u64, config.ring_buffer_bytes);
    let in_ring = (99.0 * cpus as f64 * drain.as_secs_f64()).ceil() as u64 + 20;
    assert!(
        (from_inside..=from_inside + in_ring).contains(&emitted),
        "kernel emitted {emitted}, the selected fixture has {from_inside}"
    );
    // The excluded fixture burns as much CPU as the selected one: its ticks are skipped
    // (and counted) at least about as often as the selected one's are sampled.
    assert!(
        phase1.get(Counter::SkippedCgroup) >= from_inside / 2,
        "skipped_cgroup {} for {from_inside} selected samples",
        phase1.get(Counter::SkippedCgroup)
    );

    // The selection can change while running: now only the other cgroup.
    let changed = recording
        .sampler()
        .set_cgroup_filter(&BTreeSet::from([excluded.id()]))
        .expect("replace the filter");
    assert_eq!(changed, 2, "one removed, one added");
    // Let samples taken before the switch drain into the aggregate that is dropped here.
    tokio::time::sleep(drain + Duration::from_millis(300)).await;
    let _ = recording.flush(|_| ()).await;
    let (samples, done) =
        sample_until(&recording, CAP, |s| samples_of(s, outside.pid) >= 100).await;
    let finished = recording.finish(|_| ()).await.expect("finish");
    let late_inside = samples_of(&samples, inside.pid);
    println!(
        "after the switch: formerly excluded {} samples, formerly selected {late_inside}; skipped_cgroup {} -> {}",
        samples_of(&samples, outside.pid),
        phase1.get(Counter::SkippedCgroup),
        finished.kernel.get(Counter::SkippedCgroup)
    );
    assert!(done, "the newly selected fixture was not sampled");
    // A sample taken at the switch itself may still arrive.
    assert!(late_inside <= 2, "{late_inside} samples after deselection");
    assert!(finished.kernel.get(Counter::SkippedCgroup) > phase1.get(Counter::SkippedCgroup));
}

/// The agent's user in the capability tests, and the user its targets run as.
const AGENT_UID: u32 = 64011;
const TARGET_UID: u32 = 64012;

/// The capabilities the DaemonSet grants (`deploy/base/daemonset.yaml`, the list under
/// `capabilities: add:`), as setpriv names them: the test exercises exactly what is deployed.
fn daemonset_capabilities() -> Vec<String> {
    let path = workspace_root().join("deploy/base/daemonset.yaml");
    let yaml = std::fs::read_to_string(&path).expect("read the DaemonSet");
    let mut caps = Vec::new();
    let mut in_add = false;
    for line in yaml.lines() {
        let item = line.split('#').next().unwrap_or("").trim();
        if item == "add:" {
            in_add = true;
        } else if in_add && let Some(cap) = item.strip_prefix("- ") {
            caps.push(cap.trim_matches('"').to_ascii_lowercase());
        } else if in_add && !item.is_empty() {
            in_add = false;
        }
    }
    assert!(
        !caps.is_empty(),
        "no capabilities found in {}",
        path.display()
    );
    caps
}

/// The targets of the capability tests, all running as `TARGET_UID`: the OTEP 4947 writer from
/// a copy of its binary that is deleted once it runs (only `/proc/<pid>/map_files` still
/// reaches it, as for a binary replaced by an upgrade), `dd` copying /dev/zero to /dev/null
/// (kernel stacks, symbolized from kallsyms), and the minimal JIT (its code named from the
/// perf map it writes in /tmp).
struct Targets {
    writer: Fixture,
    syscalls: Fixture,
    jit: Fixture,
}

impl Drop for Targets {
    /// The JIT is killed, so its perf map stays behind unless removed here.
    fn drop(&mut self) {
        let _ = std::fs::remove_file(format!("/tmp/perf-{}.map", self.jit.pid));
    }
}

fn as_target_user(program: &str) -> Command {
    let mut command = Command::new("setpriv");
    command.args([
        format!("--reuid={TARGET_UID}"),
        format!("--regid={TARGET_UID}"),
        "--clear-groups".into(),
        "--".into(),
        program.into(),
    ]);
    command
}

fn start_targets(dir: &std::path::Path) -> Targets {
    let copy = dir.join("otel-writer");
    std::fs::copy(&builds().exe_le, &copy).expect("copy the writer");
    let mut writer = as_target_user(copy.to_str().unwrap());
    writer.args(["-t", "2"]);
    let writer = Fixture::start(writer);
    std::fs::remove_file(&copy).expect("delete the running writer's binary");
    let mut syscalls = as_target_user("sh");
    syscalls.args([
        "-c",
        "echo ready $$; exec dd if=/dev/zero of=/dev/null bs=64k 2>/dev/null",
    ]);
    let syscalls = Fixture::start(syscalls);
    let jit = Fixture::start(as_target_user(jit_c().to_str().unwrap()));
    for pid in [writer.pid, syscalls.pid, jit.pid] {
        let status = std::fs::metadata(format!("/proc/{pid}")).expect("target running");
        use std::os::unix::fs::MetadataExt as _;
        assert_eq!(
            status.uid(),
            TARGET_UID,
            "target {pid} runs as {TARGET_UID}"
        );
    }
    Targets {
        writer,
        syscalls,
        jit,
    }
}

/// What one `record` run as `AGENT_UID` with `caps` produced.
struct Run {
    ok: bool,
    stderr: String,
    folded: String,
    trace_files: BTreeSet<String>,
}

impl Run {
    fn samples_in(&self, function: &str) -> u64 {
        self.folded
            .lines()
            .filter(|l| l.contains(function))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
            .sum()
    }
}

fn record_as_agent_user(caps: &[String], targets: &Targets, dir: &std::path::Path) -> Run {
    use std::os::unix::fs::MetadataExt as _;
    let out = dir.join(format!("run-{}", caps.join("_")));
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    std::os::unix::fs::chown(&out, Some(AGENT_UID), Some(AGENT_UID)).unwrap();
    let list = caps
        .iter()
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(",");
    let folded = out.join("cpu.folded");
    let traces = out.join("traces");
    let output = Command::new("setpriv")
        .args([
            format!("--reuid={AGENT_UID}"),
            format!("--regid={AGENT_UID}"),
            "--clear-groups".into(),
            format!("--inh-caps={list}"),
            format!("--ambient-caps={list}"),
            "--".into(),
        ])
        .arg(agent_bin())
        .args(["record", "-d", "4s", "-F", "99", "--format", "folded"])
        .args(["--pid", &targets.writer.pid.to_string()])
        .args(["--pid", &targets.syscalls.pid.to_string()])
        .args(["--pid", &targets.jit.pid.to_string()])
        .arg("-o")
        .arg(&folded)
        .arg("--per-trace-dir")
        .arg(&traces)
        .output()
        .expect("run the agent through setpriv");
    if output.status.success() {
        let owner = std::fs::metadata(&folded).expect("profile written").uid();
        assert_eq!(owner, AGENT_UID, "the agent ran as {AGENT_UID}");
    }
    Run {
        ok: output.status.success(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        folded: std::fs::read_to_string(&folded).unwrap_or_default(),
        trace_files: std::fs::read_dir(&traces)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// Trace ids of the writer's first worker (`aa..aa01` in `burn_for_trace_a`, `bb..bb01` in B).
fn trace_file(marker: &str) -> String {
    format!("{}01.pb.gz", marker.repeat(15))
}

/// Removed when the test ends, passed or not.
fn capability_dir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("profiler-caps-")
        .tempdir()
        .unwrap();
    // Both users traverse it (the writer's binary, the agent's outputs).
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    dir
}

#[test]
fn agent_as_another_user_with_only_the_daemonset_capabilities() {
    require_root();
    let caps = daemonset_capabilities();
    let dir = capability_dir();
    let targets = start_targets(dir.path());
    let run = record_as_agent_user(&caps, &targets, dir.path());
    println!(
        "capabilities {caps:?}: ok {}; burn_for_trace_a {} samples, burn_for_trace_b {}, kernel do_syscall_64 {}, JIT jit_spin_v1 {}; trace files {:?}\n{}",
        run.ok,
        run.samples_in("burn_for_trace_a"),
        run.samples_in("burn_for_trace_b"),
        run.samples_in("do_syscall_64"),
        run.samples_in("jit_spin_v1"),
        run.trace_files,
        run.stderr
    );
    assert!(run.ok, "the agent failed:\n{}", run.stderr);
    assert!(
        run.stderr.contains("samples from 3 processes"),
        "{}",
        run.stderr
    );
    // Symbolized user frames of a process of another user whose binary is deleted.
    for function in ["burn_for_trace_a", "burn_for_trace_b"] {
        assert!(
            run.samples_in(function) >= 10,
            "{function}: {} samples",
            run.samples_in(function)
        );
    }
    // Kernel frames symbolized (kallsyms addresses visible).
    assert!(
        run.samples_in("do_syscall_64") >= 10,
        "kernel frames of dd not symbolized:\n{}",
        run.folded
    );
    // JIT code of another user named from the perf map in its /tmp.
    assert!(
        run.samples_in("jit_spin_v1") >= 10,
        "JIT code not named from its perf map:\n{}",
        run.folded
    );
    // Trace contexts read from the writer's TLS (the kernel reads, the agent resolved where).
    for marker in ["aa", "bb"] {
        let file = trace_file(marker);
        assert!(
            run.trace_files.contains(&file),
            "{file} missing: {:?}",
            run.trace_files
        );
    }
}

/// Each capability the DaemonSet grants is needed: without it, a named part stops working.
#[test]
fn each_daemonset_capability_is_needed() {
    require_root();
    let caps = daemonset_capabilities();
    let dir = capability_dir();
    let targets = start_targets(dir.path());
    for dropped in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != dropped).cloned().collect();
        let run = record_as_agent_user(&fewer, &targets, dir.path());
        let user_symbols = run.samples_in("burn_for_trace_a");
        let kernel_symbols = run.samples_in("do_syscall_64");
        println!(
            "without {dropped}: ok {}, burn_for_trace_a {user_symbols}, do_syscall_64 {kernel_symbols}, {} trace files; {}",
            run.ok,
            run.trace_files.len(),
            run.stderr.lines().last().unwrap_or("")
        );
        match dropped.as_str() {
            // Loading programs, reading maps / attaching perf events and tracepoints.
            "bpf" | "perfmon" => {
                assert!(!run.ok);
                let name = format!("CAP_{}", dropped.to_ascii_uppercase());
                assert!(
                    run.stderr.contains(&format!("missing capabilities {name}")),
                    "{}",
                    run.stderr
                );
            }
            // tracefs (tracepoint ids and formats) is root-only.
            "dac_read_search" => {
                assert!(!run.ok);
                assert!(run.stderr.contains("CAP_DAC_READ_SEARCH"), "{}", run.stderr);
            }
            // Another user's /proc/<pid>/maps, exe, map_files and memory: nothing of it
            // can be symbolized, and no trace-context source is found.
            "sys_ptrace" | "checkpoint_restore" => {
                assert!(run.ok, "{}", run.stderr);
                assert_eq!(user_symbols, 0, "symbolized without {dropped}");
                assert!(run.trace_files.is_empty(), "{:?}", run.trace_files);
                assert!(kernel_symbols > 0, "the rest still works");
                // The process's root (and so its perf map) is behind ptrace access too.
                if dropped == "sys_ptrace" {
                    assert_eq!(run.samples_in("jit_spin_v1"), 0, "JIT named without ptrace");
                }
            }
            // Kernel symbol addresses in /proc/kallsyms.
            "syslog" => {
                assert!(run.ok, "{}", run.stderr);
                assert_eq!(kernel_symbols, 0, "kernel symbolized without syslog");
                assert!(user_symbols > 0, "the rest still works");
            }
            other => panic!(
                "the DaemonSet grants {other}, which this test does not know: say what breaks without it"
            ),
        }
    }
}

/// A stand-in for the Kubernetes API: lists `pods` (JSON objects) for any pod list request and
/// holds watches open. Runs until the process ends.
fn fake_api(pods: Vec<String>) -> std::net::SocketAddr {
    use std::io::{BufRead as _, BufReader, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let list = format!(
        r#"{{"kind":"PodList","apiVersion":"v1","metadata":{{"resourceVersion":"100"}},"items":[{}]}}"#,
        pods.join(",")
    );
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let list = list.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request = String::new();
                let _ = reader.read_line(&mut request);
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                }
                if request.contains("watch=1") {
                    let _ =
                        stream.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
                    std::thread::sleep(Duration::from_secs(3600));
                } else {
                    let _ = write!(
                        stream,
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{list}",
                        list.len()
                    );
                }
            });
        }
    });
    addr
}

/// A pod of namespace `shop` with labels `app` and `app.kubernetes.io/name: <app>-svc`.
fn pod_json(uid: &str, name: &str, app: &str, container_id: &str) -> String {
    format!(
        r#"{{"metadata":{{"name":"{name}","namespace":"shop","uid":"{uid}","labels":{{"app":"{app}","app.kubernetes.io/name":"{app}-svc"}}}},"spec":{{"nodeName":"node-a"}},"status":{{"containerStatuses":[{{"name":"{app}","containerID":"containerd://{container_id}"}}]}}}}"#
    )
}

/// The whole chain in the daemon: a label selector over pods from the (fake) API → the pods'
/// container cgroups, found in the host's cgroup tree by the pod uid in their names → the
/// kernel's cgroup filter. Two "pods" run the same fixture in cgroups laid out as containerd's
/// (systemd driver); only the selected one may appear in the profiles.
#[test]
fn daemon_profiles_only_pods_the_selector_picks() {
    require_root();
    const GO: &str = "/usr/lib/go-1.19/bin/go";
    let web_uid = "6a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
    let batch_uid = "7b2c3d4e-5f6a-4b7c-9d8e-0f1a2b3c4d5e";
    let (web_cid, batch_cid) = ("ab".repeat(32), "cd".repeat(32));
    let slice = TestCgroup::create("kubepods.slice");
    let container = |uid: &str, cid: &str| {
        let dir = slice
            .path
            .join(format!(
                "kubepods-besteffort-pod{}.slice",
                uid.replace('-', "_")
            ))
            .join(format!("cri-containerd-{cid}.scope"));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    };
    let (web_dir, batch_dir) = (
        container(web_uid, &web_cid),
        container(batch_uid, &batch_cid),
    );
    let web = Fixture::start(Command::new(burn_c()));
    let batch = Fixture::start(Command::new(burn_c()));
    std::fs::write(web_dir.join("cgroup.procs"), web.pid.to_string()).unwrap();
    std::fs::write(batch_dir.join("cgroup.procs"), batch.pid.to_string()).unwrap();

    let api = fake_api(vec![
        pod_json(web_uid, "web-0", "web", &web_cid),
        pod_json(batch_uid, "batch-0", "batch", &batch_cid),
    ]);
    // The interval profiles and the store (with its WAL and lock files), removed at the end.
    let run_dir = tempfile::Builder::new()
        .prefix("profiler-k8s-run-")
        .tempdir()
        .unwrap();
    let out = run_dir.path().join("intervals");
    let store = run_dir.path().join("store.db");
    let mut agent = Command::new(agent_bin())
        .args([
            "run",
            "--interval",
            "2s",
            "-F",
            "99",
            "--k8s-selector",
            "app=web",
        ])
        .args(["--k8s-namespace", "shop", "--node-name", "node-a"])
        .arg(format!("--k8s-api-url=http://{api}"))
        .arg("--cgroup-root")
        .arg(&slice.root)
        .arg("--output-dir")
        .arg(&out)
        .arg("--store")
        .arg(&store)
        .args(["--api-listen", "127.0.0.1:0"])
        .env("PROFILER_LOG_FORMAT", "json")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the agent");
    std::thread::sleep(Duration::from_secs(8));
    // SAFETY: kill has no memory preconditions; the pid is our own child.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let output = {
        let status = agent.wait().expect("agent exits");
        let mut stderr = String::new();
        std::io::Read::read_to_string(agent.stderr.as_mut().unwrap(), &mut stderr).unwrap();
        assert!(status.success(), "agent failed:\n{stderr}");
        stderr
    };
    let updated = output
        .lines()
        .any(|l| l.contains("workload filter updated"));
    let skipped: u64 = output
        .lines()
        .find(|l| l.contains("\"stopped\""))
        .and_then(|l| {
            l.split("\\\"skipped_cgroup\\\": ")
                .nth(1)
                .or(l.split("\"skipped_cgroup\": ").nth(1))
        })
        .and_then(|rest| {
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no skipped_cgroup in the final counters:\n{output}"));

    let mut tags = Tags::default();
    let mut files = 0;
    for entry in std::fs::read_dir(&out).expect("interval profiles written") {
        tags.add_profile(GO, &entry.unwrap().path());
        files += 1;
    }
    let by_pid = tags.values("pid");
    println!(
        "workload filter updated: {updated}; {files} interval profiles, pids {by_pid:?} (web {}, batch {}); skipped_cgroup {skipped}",
        web.pid, batch.pid
    );
    assert!(updated, "the filter was never applied:\n{output}");
    assert!(files > 0);
    assert_eq!(
        by_pid,
        BTreeSet::from([web.pid.to_string()]),
        "only the selected pod's process is profiled"
    );
    assert!(skipped > 100, "skipped_cgroup {skipped}");
    // Where the samples ran, from the pod metadata: labels on every sample.
    for (label, value) in [
        ("k8s_namespace_name", "shop"),
        ("k8s_pod_name", "web-0"),
        ("k8s_pod_uid", web_uid),
        ("k8s_container_name", "web"),
        ("container_id", web_cid.as_str()),
        // No process context, no OTEL_SERVICE_NAME: the pod's app.kubernetes.io/name.
        ("service_name", "web-svc"),
    ] {
        assert_eq!(
            tags.values(label),
            BTreeSet::from([value.to_owned()]),
            "{label}: {tags:?}"
        );
    }
    // Filterable in queries: the pod's time window has the samples, the other pod none.
    let query = |pod: &str| {
        Command::new(agent_bin())
            .arg("query")
            .arg("--store")
            .arg(&store)
            .args(["--namespace", "shop", "--pod", pod, "--since", "5m"])
            .args(["--format", "folded"])
            .output()
            .expect("run query")
    };
    let selected = query("web-0");
    let folded = String::from_utf8_lossy(&selected.stdout);
    assert!(
        selected.status.success() && folded.contains("burn_a"),
        "query --pod web-0:\n{folded}\n{}",
        String::from_utf8_lossy(&selected.stderr)
    );
    let other = query("batch-0");
    assert!(!other.status.success());
    assert!(
        String::from_utf8_lossy(&other.stderr)
            .contains("no samples stored for namespace shop, pod batch-0 in that window"),
        "{}",
        String::from_utf8_lossy(&other.stderr)
    );
}

/// Every label value in pprof profiles, as `go tool pprof -tags` prints them.
#[derive(Debug, Default)]
struct Tags(std::collections::BTreeMap<String, BTreeSet<String>>);

impl Tags {
    fn add_profile(&mut self, go: &str, path: &std::path::Path) {
        let output = Command::new(go)
            .args(["tool", "pprof", "-tags", "-symbolize=none"])
            .arg(path)
            .output()
            .expect("go tool pprof");
        // A "<label>: Total <n>" header, then "<count> (<pct>): <value>" lines.
        let mut label = None;
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            if let Some((name, _)) = line.trim().split_once(": Total") {
                label = Some(name.to_owned());
            } else if let Some(label) = &label
                && let Some((_, value)) = line.split_once("): ")
            {
                self.0
                    .entry(label.clone())
                    .or_default()
                    .insert(value.trim().to_owned());
            }
        }
    }

    fn values(&self, label: &str) -> BTreeSet<String> {
        self.0.get(label).cloned().unwrap_or_default()
    }
}

/// The cgroup v1 fallback of the daemon's workload filter (this machine is a hybrid host: its
/// v1 hierarchies are under /sys/fs/cgroup, which is not a cgroup2 mount): the selected pod's
/// processes become the pid allow-list, and a process that starts later in that pod is added
/// from its exec event alone (the periodic rescan is an hour away).
#[test]
fn cgroup_v1_hosts_fall_back_to_pids_kept_current_from_exec_events() {
    use std::io::{BufRead as _, BufReader, Write as _};
    require_root();
    const GO: &str = "/usr/lib/go-1.19/bin/go";
    let v1_root = PathBuf::from("/sys/fs/cgroup");
    let pids_hierarchy = v1_root.join("pids");
    if cgroup::is_cgroup2(&v1_root) || !pids_hierarchy.join("cgroup.procs").exists() {
        panic!("this test needs a host with cgroup v1 hierarchies under /sys/fs/cgroup");
    }
    let web_uid = "8c3d4e5f-6a7b-4c8d-9e0f-1a2b3c4d5e6f";
    let batch_uid = "9d4e5f6a-7b8c-4d9e-8f1a-2b3c4d5e6f70";
    let kubepods = TestCgroup::create_under(pids_hierarchy, "kubepods");
    let container = |uid: &str, cid: &str| {
        // The cgroupfs driver's layout: kubepods/besteffort/pod<uid>/<container id>.
        let dir = kubepods.path.join(format!("besteffort/pod{uid}/{cid}"));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    };
    let web_dir = container(web_uid, &"ef".repeat(32));
    let batch_dir = container(batch_uid, &"12".repeat(32));
    let web = Fixture::start(Command::new(burn_c()));
    let batch = Fixture::start(Command::new(burn_c()));
    std::fs::write(web_dir.join("cgroup.procs"), web.pid.to_string()).unwrap();
    std::fs::write(batch_dir.join("cgroup.procs"), batch.pid.to_string()).unwrap();
    // A shell in the web pod that starts a second process when told to.
    let mut launcher = Command::new("sh")
        .args(["-c", &format!("read go; {}", burn_c().display())])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::fs::write(web_dir.join("cgroup.procs"), launcher.id().to_string()).unwrap();

    let api = fake_api(vec![
        pod_json(web_uid, "web-0", "web", &"ef".repeat(32)),
        pod_json(batch_uid, "batch-0", "batch", &"12".repeat(32)),
    ]);
    let out = std::env::temp_dir().join(format!("profiler-k8s-v1-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let mut agent = Command::new(agent_bin())
        .args([
            "run",
            "--interval",
            "2s",
            "-F",
            "99",
            "--k8s-selector",
            "app=web",
        ])
        .args(["--node-name", "node-a", "--k8s-refresh", "1h"])
        .args(["--no-store", "--no-api"])
        .arg(format!("--k8s-api-url=http://{api}"))
        .arg("--cgroup-root")
        .arg(&v1_root)
        .arg("--output-dir")
        .arg(&out)
        .env("PROFILER_LOG_FORMAT", "json")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the agent");
    // Wait until the first selection is in place, then start the late process.
    let mut log = BufReader::new(agent.stderr.take().unwrap());
    let mut lines = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !lines
        .iter()
        .any(|l: &String| l.contains("workload filter updated (pid allow-list)"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no selection: {lines:#?}"
        );
        let mut line = String::new();
        if log.read_line(&mut line).unwrap() == 0 {
            panic!("agent exited: {lines:#?}");
        }
        lines.push(line);
    }
    let collect = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut log, &mut rest);
        rest
    });
    launcher.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let mut ready = String::new();
    BufReader::new(launcher.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    let late: u32 = ready
        .trim()
        .strip_prefix("ready ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("late process: {ready:?}"));
    std::thread::sleep(Duration::from_secs(6));
    // SAFETY: kill has no memory preconditions; these are our own children.
    unsafe {
        libc::kill(agent.id() as i32, libc::SIGTERM);
    }
    assert!(agent.wait().unwrap().success());
    let log = collect.join().unwrap();
    // SAFETY: as above.
    unsafe {
        libc::kill(late as i32, libc::SIGKILL);
        libc::kill(launcher.id() as i32, libc::SIGKILL);
    }
    let _ = launcher.wait();

    let mut tags = Tags::default();
    for entry in std::fs::read_dir(&out).expect("interval profiles") {
        tags.add_profile(GO, &entry.unwrap().path());
    }
    let pids: BTreeSet<u32> = tags
        .values("pid")
        .iter()
        .filter_map(|p| p.parse().ok())
        .collect();
    let filtered: u64 = log
        .lines()
        .find(|l| l.contains("\"stopped\""))
        .and_then(|l| l.split("skipped_filtered\\\": ").nth(1))
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .unwrap_or_else(|| panic!("no final counters:\n{log}"));
    println!(
        "profiled pids {pids:?}: web {}, late {late}, batch {}; skipped_filtered {filtered}",
        web.pid, batch.pid
    );
    assert!(pids.contains(&web.pid), "the selected pod's process");
    assert!(
        pids.contains(&late),
        "the process started later in the selected pod (exec event)"
    );
    assert!(!pids.contains(&batch.pid), "the other pod's process");
    assert!(
        pids.iter()
            .all(|p| [web.pid, late, launcher.id()].contains(p)),
        "{pids:?}"
    );
    assert!(filtered > 100, "skipped_filtered {filtered}");
    let _ = std::fs::remove_dir_all(&out);
}
