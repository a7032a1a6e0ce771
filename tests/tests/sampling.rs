//! The sampler against real processes: attribution of known functions to known threads, the
//! pid filter, drops when the ring buffer is full, short-lived processes, bursts of execs.
//! Needs root; run through `cargo xtask test`.

use std::{process::Command, time::Duration};

use profiler_common::Counter;
use profiler_tests::*;

const MIN_LEAF_SAMPLES: u64 = 300;
const CAP: Duration = Duration::from_secs(30);

async fn check_attribution(binary: std::path::PathBuf, label: &str) {
    require_root();
    let fixture = Fixture::start(Command::new(&binary));
    let recording =
        profiler_agent::record::Recording::start(&sampler_config(Some(vec![fixture.pid]), 99))
            .expect("start recording");
    let (samples, done) = sample_until(&recording, CAP, |s| {
        leaf_count(s, "burn_a") >= MIN_LEAF_SAMPLES && leaf_count(s, "burn_b") >= MIN_LEAF_SAMPLES
    })
    .await;
    let finished = recording.finish(|_| ()).await.expect("finish");
    assert!(
        done,
        "{label}: fewer than {MIN_LEAF_SAMPLES} samples per leaf within {CAP:?}: burn_a {} burn_b {}",
        leaf_count(&samples, "burn_a"),
        leaf_count(&samples, "burn_b")
    );
    assert!(
        samples.iter().all(|s| s.pid == fixture.pid),
        "{label}: samples from other processes"
    );
    for (leaf, entry, middle, other_entry, thread) in [
        (
            "burn_a",
            "thread_a_main",
            "work_a",
            "thread_b_main",
            "thread-a",
        ),
        (
            "burn_b",
            "thread_b_main",
            "work_b",
            "thread_a_main",
            "thread-b",
        ),
    ] {
        // The thread's name, as the kernel holds it at the sample (the fixture names each).
        let misnamed = samples
            .iter()
            .filter(|s| &*s.leaf == leaf && s.thread_name != thread)
            .map(|s| s.thread_name.as_str())
            .collect::<std::collections::BTreeSet<_>>();
        assert!(
            misnamed.is_empty(),
            "{label}: {leaf} samples on threads named {misnamed:?}, not {thread:?}"
        );
        let (total, with_entry, with_other) = caller_counts(&samples, leaf, entry, other_entry);
        let (_, full_chain, _) = caller_counts(&samples, leaf, middle, other_entry);
        let entry_rate = with_entry as f64 / total as f64;
        println!(
            "{label}: {leaf}: {total} samples, {:.1}% under {entry}, {:.1}% full chain (with {middle}), {with_other} under {other_entry}",
            100.0 * entry_rate,
            100.0 * full_chain as f64 / total as f64
        );
        assert!(
            entry_rate >= 0.90,
            "{label}: only {:.1}% of {leaf} samples under {entry}",
            100.0 * entry_rate
        );
        assert_eq!(
            with_other, 0,
            "{label}: {leaf} samples attributed to {other_entry}"
        );
        // The leaf may have no frame (gcc gives these none): the frame-pointer walk alone
        // skips `middle`, which comes back from the word at the stack pointer.
        assert!(
            full_chain * 10 >= total * 9,
            "{label}: {middle} above {leaf} in only {full_chain} of {total} samples"
        );
    }
    assert!(finished.kernel.get(Counter::SamplesEmitted) > 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn attributes_c_threads() {
    check_attribution(burn_c(), "C").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn attributes_rust_threads() {
    check_attribution(burn_rust(), "Rust").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_system_call_keeps_the_caller_of_its_wrapper() {
    require_root();
    let fixture = Fixture::start(Command::new(build_c(
        "syscall_loop.c",
        "syscall-loop",
        &["-O2", "-g", "-fno-omit-frame-pointer"],
    )));
    let recording =
        profiler_agent::record::Recording::start(&sampler_config(Some(vec![fixture.pid]), 99))
            .expect("start recording");
    let in_kernel = |s: &profiler_agent::collector::SymbolizedSample| {
        s.functions.iter().any(|f| f.contains("getppid"))
            && s.functions.iter().any(|f| f.contains("do_syscall_64"))
    };
    let (samples, _) = sample_until(&recording, CAP, |s| {
        s.iter()
            .filter(|x| in_kernel(x))
            .map(|x| x.count)
            .sum::<u64>()
            >= 100
    })
    .await;
    recording.finish(|_| ()).await.unwrap();
    let (mut total, mut with_caller) = (0, 0);
    for s in samples.iter().filter(|s| in_kernel(s)) {
        total += s.count;
        if s.functions.iter().any(|f| &**f == "ask_parent") {
            with_caller += s.count;
        }
    }
    println!("{with_caller} of {total} samples inside getppid's system call under ask_parent");
    assert!(total >= 100, "{total} samples in the system call");
    assert!(
        with_caller * 10 >= total * 9,
        "ask_parent in only {with_caller} of {total} system-call samples"
    );
}

/// The sampler walks user stacks along their frame pointers itself: a chain deeper than a
/// sample holds is cut at 127 frames and flagged, a frame that names itself as its caller ends
/// the walk (a blind walk would fill the sample with its copies), and an unreadable frame
/// pointer ends it with the frames so far, counted.
#[tokio::test(flavor = "multi_thread")]
async fn odd_frame_chains_end_the_user_stack_walk_cleanly() {
    require_root();
    let fixture = Fixture::start(Command::new(build_c(
        "odd_frames.c",
        "odd-frames",
        &["-O0", "-g", "-fno-omit-frame-pointer", "-pthread"],
    )));
    let recording =
        profiler_agent::record::Recording::start(&sampler_config(Some(vec![fixture.pid]), 99))
            .expect("start recording");
    const LEAVES: [&str; 3] = [
        "spin_deep",
        "spin_in_looped_frame",
        "spin_with_bad_frame_pointer",
    ];
    let (samples, done) = sample_until(&recording, CAP, |s| {
        LEAVES.iter().all(|leaf| leaf_count(s, leaf) >= 100)
    })
    .await;
    let finished = recording.finish(|_| ()).await.expect("finish");
    let counts = LEAVES.map(|leaf| leaf_count(&samples, leaf));
    println!(
        "samples {counts:?}; kernel: user stacks truncated {}, walk faults {}",
        finished.kernel.get(Counter::UserStackTruncated),
        finished.kernel.get(Counter::UserStackWalkFaults)
    );
    assert!(
        done,
        "fewer than 100 samples of each leaf within {CAP:?}: {counts:?}"
    );
    let occurrences = |s: &profiler_agent::collector::SymbolizedSample, function: &str| {
        s.functions.iter().filter(|f| &***f == function).count()
    };
    for s in &samples {
        match &*s.leaf {
            "spin_deep" => assert_eq!(
                occurrences(s, "recurse"),
                126,
                "deep stack: {:?}",
                s.functions
            ),
            // A blind walk would have 126 copies of the looped frame's return address.
            "spin_in_looped_frame" => assert!(
                occurrences(s, "looped_frame_return_site") <= 1,
                "looped frame: {:?}",
                s.functions
            ),
            // Nothing past the frame pointer that could not be read.
            "spin_with_bad_frame_pointer" => assert!(
                occurrences(s, "bad_main") + occurrences(s, "start_thread") == 0,
                "bad frame pointer: {:?}",
                s.functions
            ),
            _ => {}
        }
    }
    assert!(
        finished.kernel.get(Counter::UserStackTruncated) >= counts[0],
        "every deep sample is flagged truncated"
    );
    assert!(
        finished.kernel.get(Counter::UserStackWalkFaults) >= counts[2],
        "every walk from the bad frame pointer is counted"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn pid_filter_excludes_other_processes() {
    require_root();
    let profiled = Fixture::start(Command::new(burn_c()));
    let other = Fixture::start(Command::new(burn_c()));
    let recording =
        profiler_agent::record::Recording::start(&sampler_config(Some(vec![profiled.pid]), 99))
            .expect("start recording");
    // Until the profiled process has enough samples (a loaded machine is slower), 30 s at most.
    let (samples, _) = sample_until(&recording, CAP, |s| {
        s.iter()
            .filter(|x| x.pid == profiled.pid)
            .map(|x| x.count)
            .sum::<u64>()
            > 100
    })
    .await;
    let finished = recording.finish(|_| ()).await.unwrap();
    let from_profiled: u64 = samples
        .iter()
        .filter(|s| s.pid == profiled.pid)
        .map(|s| s.count)
        .sum();
    let from_others: u64 = samples
        .iter()
        .filter(|s| s.pid != profiled.pid)
        .map(|s| s.count)
        .sum();
    println!(
        "profiled {from_profiled}, others {from_others} (other fixture pid {})",
        other.pid
    );
    assert!(
        from_profiled > 100,
        "too few samples from the profiled process: {from_profiled}"
    );
    assert_eq!(from_others, 0);
    assert!(
        finished.kernel.get(Counter::SkippedFiltered) > 0,
        "filtered ticks not counted"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn full_ring_buffer_is_counted() {
    require_root();
    let _load = Fixture::start(Command::new(burn_c()));
    // One page of ring buffer at 4 kHz on every CPU overflows between two drains.
    let config = profiler_agent::ebpf::SamplerConfig {
        frequency_hz: 4000,
        pids: None,
        ring_buffer_bytes: 4096,
        ..Default::default()
    };
    let recording = profiler_agent::record::Recording::start(&config).expect("start recording");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let finished = recording
        .finish(|f| f.aggregate.total_samples)
        .await
        .unwrap();
    let lost = finished.kernel.get(Counter::RingBufferFull);
    let emitted = finished.kernel.get(Counter::SamplesEmitted);
    println!(
        "emitted {emitted}, lost {lost}, aggregated {}",
        finished.output
    );
    assert!(
        lost > 0,
        "no drop counted with a one-page ring buffer at 4 kHz"
    );
    assert!(emitted > 0);
}

/// Samples go to the ring buffer in per-CPU batches, and the ones still staged in the kernel
/// when the sampler stops are read from it then: every tick that captured a sample is in the
/// profile, and a batch carries several samples.
#[tokio::test(flavor = "multi_thread")]
async fn every_captured_sample_reaches_the_profile_in_batches() {
    require_root();
    let fixture = Fixture::start(Command::new(burn_c()));
    let recording =
        profiler_agent::record::Recording::start(&sampler_config(Some(vec![fixture.pid]), 99))
            .expect("start recording");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let finished = recording
        .finish(|f| f.aggregate.total_samples)
        .await
        .unwrap();
    let k = |c| finished.kernel.get(c);
    let captured = k(Counter::Invocations)
        - k(Counter::SkippedIdle)
        - k(Counter::SkippedSelf)
        - k(Counter::SkippedFiltered)
        - k(Counter::SkippedCgroup);
    let emitted = k(Counter::SamplesEmitted);
    let batches = k(Counter::SampleBatchesEmitted);
    let at_stop = finished.metrics.get("samples_read_from_staging_at_stop");
    println!(
        "captured {captured}, emitted {emitted} in {batches} batches, {at_stop} read at stop, {} in the profile",
        finished.output
    );
    assert_eq!(k(Counter::RingBufferFull), 0);
    assert!(
        captured > 150,
        "{captured} samples in 3 s at 99 Hz of two busy threads"
    );
    assert_eq!(
        emitted + at_stop,
        captured,
        "samples lost between kernel and agent"
    );
    assert_eq!(
        finished.output, captured,
        "samples missing from the profile"
    );
    // At 99 Hz a batch holds eight ticks of a CPU, and the fixture's two threads keep the
    // CPUs they run on busy much of the time (here: 5.7 samples a batch).
    assert!(
        emitted >= 3 * batches,
        "{emitted} samples in {batches} ring writes"
    );
}

/// A node busy starting processes: every exec signals the reader (a process event in a drained
/// ring), but it drains at most once per 100 ms for them, and no event is lost for that.
#[tokio::test(flavor = "multi_thread")]
async fn a_burst_of_execs_costs_few_drains_and_loses_no_event() {
    require_root();
    const EXECS: u32 = 400;
    let started = std::time::Instant::now();
    // No process is sampled: the ring carries only process events.
    let recording = profiler_agent::record::Recording::start(&sampler_config(Some(vec![]), 99))
        .expect("start recording");
    let status = Command::new("sh")
        .args([
            "-c",
            &format!("i=0; while [ $i -lt {EXECS} ]; do /bin/true; i=$((i+1)); done"),
        ])
        .status()
        .expect("run sh");
    assert!(status.success());
    let finished = recording.finish(|_| ()).await.expect("finish");
    let elapsed_ms = started.elapsed().as_millis() as u64;
    let drains = finished.metrics.get("ring_drains");
    let records = finished.metrics.get("records_received");
    println!(
        "{EXECS} execs in {elapsed_ms} ms: {records} records, {drains} drains, {} process events lost",
        finished.kernel.get(Counter::ProcessEventsLost)
    );
    // Each exec is at least an exec and an exit event.
    assert!(
        records >= 2 * u64::from(EXECS),
        "{records} records for {EXECS} execs"
    );
    assert_eq!(finished.kernel.get(Counter::ProcessEventsLost), 0);
    // One drain per 100 ms for signals, the periodic ones (2 s at 99 Hz), and a few on request.
    let bound = elapsed_ms / 100 + elapsed_ms / 2000 + 5;
    assert!(
        drains <= bound,
        "{drains} drains in {elapsed_ms} ms (at most {bound} expected)"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bpf_stats_measure_the_samplers_own_kernel_time() {
    require_root();
    let fixture = Fixture::start(Command::new(burn_c()));
    let config = profiler_agent::ebpf::SamplerConfig {
        bpf_stats: true,
        ..sampler_config(Some(vec![fixture.pid]), 99)
    };
    let recording = profiler_agent::record::Recording::start(&config).expect("start recording");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let live = recording.kernel_counters();
    let finished = recording.finish(|_| ()).await.unwrap();
    for counters in [&live, &finished.kernel] {
        let sampler = counters
            .programs
            .iter()
            .find(|p| p.program == "on_cpu_sample")
            .unwrap_or_else(|| panic!("no statistics for the sampler: {:?}", counters.programs));
        let ticks = counters.get(Counter::Invocations);
        println!(
            "on_cpu_sample: {} runs in {:?}, {ticks} ticks counted by the program",
            sampler.runs, sampler.run_time
        );
        // Statistics go on after the programs are attached, and the programs are read before
        // the counters: every counted run is also a tick, and almost every tick is counted.
        assert!(
            sampler.runs <= ticks,
            "{} runs > {ticks} ticks",
            sampler.runs
        );
        assert!(
            sampler.runs >= ticks / 2 && sampler.runs > 100,
            "{} runs of {ticks} ticks",
            sampler.runs
        );
        let per_run = counters.sampler_time_per_run().expect("time per run");
        assert!(
            per_run > Duration::from_nanos(50) && per_run < Duration::from_millis(1),
            "{per_run:?} per run"
        );
    }
    // A tracepoint program is reported too, whether or not it ran.
    assert!(
        finished
            .kernel
            .programs
            .iter()
            .any(|p| p.program == "on_process_exit"),
        "{:?}",
        finished.kernel.programs
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn short_lived_process_is_symbolized_after_exit() {
    short_lived_process_is_symbolized(99, "0.6", 20).await;
}

/// At 19 Hz, the agent's default, a CPU's batch waits 4 ticks (210 ms) and the drain after an
/// exec comes 100 ms after it: a new process's first samples must skip the batch.
#[tokio::test(flavor = "multi_thread")]
async fn short_lived_process_is_symbolized_after_exit_at_19_hz() {
    short_lived_process_is_symbolized(19, "1.0", 10).await;
}

/// A fixture that lives `seconds`, sampled at `hz`: its frames are named from mappings read
/// while it lived, its first samples having reached the agent at once.
async fn short_lived_process_is_symbolized(hz: u64, seconds: &str, min_samples: u64) {
    require_root();
    let mut recording =
        profiler_agent::record::Recording::start(&sampler_config(Some(vec![]), hz)).expect("start");
    // The fixture exits by itself after `seconds`; symbolization happens after that.
    let mut fixture = Fixture::start({
        let mut c = Command::new(burn_c());
        c.arg(seconds);
        c
    });
    recording.sampler().allow_pid(fixture.pid).unwrap();
    assert!(fixture.wait().success());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !std::path::Path::new(&format!("/proc/{}", fixture.pid)).exists(),
        "fixture still alive"
    );
    let samples = recording.snapshot().await.unwrap();
    let finished = recording.finish(|_| ()).await.unwrap();
    let ours: Vec<_> = samples.iter().filter(|s| s.pid == fixture.pid).collect();
    let total: u64 = ours.iter().map(|s| s.count).sum();
    let named = leaf_count(&samples, "burn_a") + leaf_count(&samples, "burn_b");
    let urgent = finished.kernel.get(Counter::SamplesOfUninspectedProcesses);
    println!(
        "short-lived at {hz} Hz: {total} samples, {named} with a named burn leaf, {urgent} sent at once"
    );
    assert!(
        total >= min_samples,
        "too few samples from the short-lived process: {total}"
    );
    assert!(
        named as f64 >= 0.8 * total as f64,
        "frames not symbolized after exit: {ours:?}"
    );
    // Only until the agent inspected the process: the rest waited for their batch.
    assert!(
        (1..total).contains(&urgent),
        "{urgent} of {total} samples sent at once"
    );
}

/// A process the agent has inspected (a shell, busy for ~1 s: no trace-context source) that
/// then execs a short-lived program: the verdict was the shell's, and the new image's first
/// samples must reach the agent while it lives, as a new process's do.
#[tokio::test(flavor = "multi_thread")]
async fn short_lived_image_after_an_exec_is_symbolized() {
    require_root();
    let recording =
        profiler_agent::record::Recording::start(&sampler_config(None, 19)).expect("start");
    let mut fixture = Fixture::start({
        let mut c = Command::new("sh");
        c.args([
            "-c",
            r#"i=0; while [ $i -lt 1000000 ]; do i=$((i+1)); done; exec "$0" 1.0"#,
        ])
        .arg(burn_c());
        c
    });
    assert!(fixture.wait().success());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let samples = recording.snapshot().await.unwrap();
    recording.finish(|_| ()).await.unwrap();
    let burners: Vec<_> = samples
        .iter()
        .filter(|s| s.pid == fixture.pid && s.thread_name.starts_with("thread-"))
        .collect();
    let total: u64 = burners.iter().map(|s| s.count).sum();
    let named: u64 = burners
        .iter()
        .filter(|s| matches!(&*s.leaf, "burn_a" | "burn_b"))
        .map(|s| s.count)
        .sum();
    println!("after an exec at 19 Hz: {total} samples of the burners, {named} named");
    assert!(
        total >= 10,
        "too few samples of the exec'd program: {total}"
    );
    assert!(
        named as f64 >= 0.8 * total as f64,
        "frames of the exec'd program not symbolized: {burners:?}"
    );
}

/// A Go binary without symbols or DWARF (`-ldflags=-s -w`), profiled for real: its frames are
/// named from Go's pclntab, and Go's frame pointers give whole goroutine stacks.
#[tokio::test(flavor = "multi_thread")]
async fn symbolizes_stripped_go_binaries() {
    use profiler_tests::go::{GoVariant, build_go_fixture, go_toolchains};
    require_root();
    let toolchain = go_toolchains().pop().expect("a Go toolchain");
    let binary = build_go_fixture(&toolchain, GoVariant::Stripped);
    let fixture = Fixture::start(Command::new(&binary));
    let recording =
        profiler_agent::record::Recording::start(&sampler_config(Some(vec![fixture.pid]), 99))
            .expect("start recording");
    let workers = [
        "main.burnTraceA",
        "main.burnTraceB",
        "main.burnInherited",
        "main.burnManyLabels",
        "main.burnDatadog",
    ];
    let burning = |s: &[profiler_agent::collector::SymbolizedSample]| -> u64 {
        workers.iter().map(|w| leaf_count(s, w)).sum()
    };
    let (samples, done) = sample_until(&recording, CAP, |s| burning(s) >= MIN_LEAF_SAMPLES).await;
    let finished = recording.finish(|_| ()).await.expect("finish");
    let total = burning(&samples);
    assert!(
        done,
        "{}: {total} worker samples within {CAP:?}: {samples:#?}",
        toolchain.version
    );
    for worker in workers {
        let count = leaf_count(&samples, worker);
        println!("{}: {worker}: {count} samples", toolchain.version);
        assert!(count > 0, "{worker}: no samples in {samples:#?}");
    }
    // The whole goroutine stack is there, down to its entry.
    let whole: u64 = samples
        .iter()
        .filter(|s| workers.contains(&&*s.leaf))
        .filter(|s| s.functions.last().is_some_and(|f| &**f == "runtime.goexit"))
        .map(|s| s.count)
        .sum();
    assert!(
        whole as f64 >= 0.95 * total as f64,
        "{whole} of {total} worker samples reach runtime.goexit"
    );
    assert!(finished.metrics.get("frames_symbolized_gopclntab") > 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn kernel_frames_are_symbolized_from_kallsyms() {
    require_root();
    // A syscall-heavy process: most of its samples land in the kernel's read/write paths.
    let mut dd = std::process::Command::new("dd")
        .args(["if=/dev/zero", "of=/dev/null", "bs=1", "count=2000000000"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start dd");
    let pid = dd.id();
    let recording = profiler_agent::record::Recording::start(&sampler_config(Some(vec![pid]), 99))
        .expect("start recording");
    let (samples, _) = sample_until(&recording, CAP, |s| {
        s.iter()
            .filter(|x| x.functions.iter().any(|f| in_kernel_io(f)))
            .map(|x| x.count)
            .sum::<u64>()
            >= 100
    })
    .await;
    recording.finish(|_| ()).await.unwrap();
    let _ = dd.kill();
    let _ = dd.wait();
    let total: u64 = samples.iter().map(|s| s.count).sum();
    let in_read: u64 = samples
        .iter()
        .filter(|s| s.functions.iter().any(|f| in_kernel_io(f)))
        .map(|s| s.count)
        .sum();
    let unknown_kernel: usize = samples
        .iter()
        .flat_map(|s| s.functions.iter())
        .filter(|f| f.starts_with("[unknown] [kernel]"))
        .count();
    println!(
        "dd: {total} samples, {in_read} under vfs_read/vfs_write, {unknown_kernel} unknown kernel frames"
    );
    assert!(
        in_read >= 100,
        "kernel read path not symbolized: {samples:?}"
    );
    // The user side is symbolized too: dd's own frames sit below the syscall.
    assert!(samples.iter().any(|s| {
        s.functions
            .iter()
            .any(|f| f.contains("write") || f.contains("read"))
    }));
}

/// The kernel's read/write paths (names as kallsyms gives them).
fn in_kernel_io(function: &str) -> bool {
    ["vfs_read", "ksys_read", "vfs_write", "ksys_write"]
        .iter()
        .any(|k| function.contains(k))
}
