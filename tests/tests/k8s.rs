//! The Kubernetes deployment's promises, on this machine: the in-kernel workload filter (a
//! fixture whose cgroup is not selected gets no sample at all, and the skipped ticks are
//! counted), and the agent working with only the capabilities the DaemonSet grants, as a
//! non-root user, against a fixture of another user.
//! Needs root; run through `cargo xtask test k8s`.

use std::{collections::BTreeSet, path::PathBuf, process::Command, time::Duration};

use profiler_agent::{k8s::cgroup, record::Recording};
use profiler_common::Counter;
use profiler_tests::*;

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
        let path = root.join(format!("profiler-test-{}-{name}", std::process::id()));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        assert!(cgroup::is_cgroup2(&path));
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
    fn drop(&mut self) {
        for pid in cgroup::procs(&self.path).unwrap_or_default() {
            let _ = std::fs::write(self.root.join("cgroup.procs"), pid.to_string());
        }
        let _ = std::fs::remove_dir(&self.path);
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

    let config = profiler_agent::ebpf::SamplerConfig {
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
    assert_eq!(
        phase1.get(Counter::SamplesEmitted),
        from_inside,
        "every sample the kernel emitted is the selected fixture's"
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
    // A sample taken just before the switch may still be in flight.
    assert!(late_inside <= 2, "{late_inside} samples after deselection");
    assert!(finished.kernel.get(Counter::SkippedCgroup) > phase1.get(Counter::SkippedCgroup));
}
