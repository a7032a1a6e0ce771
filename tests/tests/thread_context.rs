//! Per-trace attribution from the OpenTelemetry thread context (OTEP 4947), for every TLS
//! access model: worker threads alternate every few milliseconds between trace A (burning in
//! `burn_for_trace_a`) and trace B (`burn_for_trace_b`); samples in each function must carry
//! that function's trace. A garbage-writing fixture runs alongside one of them.
//! Needs root; run through `cargo xtask test`.

use std::{path::Path, process::Command, time::Duration};

use profiler_agent::{
    collector::SymbolizedSample,
    record::{CollectOptions, Recording},
};
use profiler_common::Counter;
use profiler_tests::{otel_ctx::builds, *};

const MIN_SAMPLES: u64 = 300;
const CAP: Duration = Duration::from_secs(30);

/// Samples with leaf `leaf` whose trace id starts with `marker` (the fixture's trace ids are
/// `aa..aa<worker>` for A and `bb..bb<worker>` for B).
fn with_trace(samples: &[SymbolizedSample], leaf: &str, marker: u8) -> u64 {
    samples
        .iter()
        .filter(|s| &*s.leaf == leaf)
        .filter(|s| {
            s.context
                .as_ref()
                .is_some_and(|c| c.trace_id[0] == marker && c.trace_id[14] == marker)
        })
        .map(|s| s.count)
        .sum()
}

struct Outcome {
    samples: Vec<SymbolizedSample>,
    kernel: profiler_agent::ebpf::KernelCounters,
}

async fn profile(mut command: Command, label: &str, extra: Option<&Fixture>) -> Outcome {
    command.args(["-t", "2"]);
    let fixture = Fixture::start(command);
    let mut pids = vec![fixture.pid];
    pids.extend(extra.map(|f| f.pid));
    let recording =
        Recording::start_with(&sampler_config(Some(pids), 99), CollectOptions::default())
            .expect("start recording");
    let (samples, done) = sample_traced_until(&recording, CAP, |s| {
        leaf_count(s, "burn_for_trace_a") >= MIN_SAMPLES
            && leaf_count(s, "burn_for_trace_b") >= MIN_SAMPLES
    })
    .await;
    let finished = recording.finish(|_| ()).await.expect("finish");
    let kernel = finished.kernel.clone();
    println!(
        "{label}: kernel context reads {} ok, {} invalid, {} faults, {} unallocated, {} none active, {} no source, {} ns/attempt; agent {:?}",
        kernel.get(Counter::ContextRead),
        kernel.get(Counter::ContextInvalid),
        kernel.get(Counter::ContextReadFault),
        kernel.get(Counter::ContextTlsUnallocated),
        kernel.get(Counter::ContextNoneActive),
        kernel.get(Counter::ContextNoSource),
        kernel.get(Counter::ContextReadNs) / kernel.get(Counter::ContextReadsTimed).max(1),
        finished.metrics.snapshot(),
    );
    for (leaf, own, other) in [
        ("burn_for_trace_a", 0xaa, 0xbb),
        ("burn_for_trace_b", 0xbb, 0xaa),
    ] {
        let total = leaf_count(&samples, leaf);
        let right = with_trace(&samples, leaf, own);
        let wrong = with_trace(&samples, leaf, other);
        assert!(
            done,
            "{label}: fewer than {MIN_SAMPLES} samples per function within {CAP:?}"
        );
        assert_attributed(label, leaf, total, right, wrong);
    }
    Outcome { samples, kernel }
}

fn run(binary: &Path, args: &[&Path], env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(binary);
    c.args(args);
    c.envs(env.iter().copied());
    c
}

#[tokio::test(flavor = "multi_thread")]
async fn executable_local_exec() {
    require_root();
    profile(
        run(&builds().exe_le, &[], &[]),
        "exe-LE (-mtls-dialect=gnu2)",
        None,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn library_at_startup_tlsdesc() {
    require_root();
    profile(
        run(&builds().driver_desc, &[], &[]),
        "so at start-up, TLSDESC",
        None,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn library_dlopen_static_tls() {
    require_root();
    let b = builds();
    profile(
        run(&b.driver_dlopen, &[&b.lib_desc], &[]),
        "so dlopen, TLSDESC static",
        None,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn library_dlopen_dynamic_tls() {
    require_root();
    let b = builds();
    let env = [("GLIBC_TUNABLES", "glibc.rtld.optional_static_tls=0")];
    let out = profile(
        run(&b.driver_dlopen, &[&b.lib_desc], &env),
        "so dlopen, TLSDESC dynamic (DTV)",
        None,
    )
    .await;
    assert!(out.kernel.get(Counter::ContextRead) > 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn library_general_dynamic() {
    require_root();
    profile(
        run(&builds().driver_gd, &[], &[]),
        "so at start-up, -mtls-dialect=gnu (GD)",
        None,
    )
    .await;
    let b = builds();
    profile(
        run(&b.driver_dlopen, &[&b.lib_gd], &[]),
        "so dlopen, -mtls-dialect=gnu (GD)",
        None,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn library_initial_exec() {
    require_root();
    profile(
        run(&builds().driver_ie, &[], &[]),
        "so at start-up, initial-exec",
        None,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_writer_costs_only_its_own_contexts() {
    require_root();
    let garbage = Fixture::start({
        let mut c = Command::new(&builds().garbage);
        c.args(["-t", "1"]);
        c
    });
    let out = profile(
        run(&builds().exe_le, &[], &[]),
        "exe-LE next to a garbage writer",
        Some(&garbage),
    )
    .await;
    let garbage_samples: u64 = out
        .samples
        .iter()
        .filter(|s| s.pid == garbage.pid)
        .map(|s| s.count)
        .sum();
    let k = &out.kernel;
    println!(
        "garbage: {garbage_samples} samples; invalid {} read faults {} none {}",
        k.get(Counter::ContextInvalid),
        k.get(Counter::ContextReadFault),
        k.get(Counter::ContextNoneActive)
    );
    assert!(garbage_samples > 50, "the garbage writer was not sampled");
    assert!(
        k.get(Counter::ContextInvalid) > 0,
        "invalid records not counted"
    );
    assert!(
        k.get(Counter::ContextReadFault) > 0,
        "unmapped pointers not counted"
    );
    // Whatever garbage got through carries the garbage fixture's own ids, never the good one's.
    for s in out.samples.iter().filter(|s| s.pid == garbage.pid) {
        if let Some(c) = &s.context {
            assert!(c.trace_id[0] != 0xaa && c.trace_id[0] != 0xbb, "{c:?}");
        }
    }
}

/// A short recording of a process that was already running carries its trace context from its
/// first fraction of a second. At start every process is new to the agent: its samples carry
/// no context until one of them has been drained and its context source resolved. The process
/// is older than the kernel's window for new threads (`URGENT_THREAD_AGE_NS`), so its first
/// samples wait in their CPU's batch like any other's; the agent's first drains come every
/// 100 ms (they came after 2 s, and a 3 s recording had a third of its samples traced).
#[tokio::test(flavor = "multi_thread")]
async fn a_short_recording_of_a_running_process_is_traced_from_its_start() {
    require_root();
    let mut command = Command::new(&builds().exe_le);
    command.args(["-t", "2"]);
    let fixture = Fixture::start(command);
    std::thread::sleep(
        Duration::from_nanos(profiler_common::URGENT_THREAD_AGE_NS) + Duration::from_millis(500),
    );
    let recording = Recording::start_with(
        &sampler_config(Some(vec![fixture.pid]), 99),
        CollectOptions::default(),
    )
    .expect("start recording");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let samples = recording.snapshot().await.expect("snapshot");
    recording.finish(|_| ()).await.expect("finish");
    let of_fixture = || samples.iter().filter(|s| s.pid == fixture.pid);
    let total: u64 = of_fixture().map(|s| s.count).sum();
    let traced: u64 = of_fixture()
        .filter(|s| s.context.is_some())
        .map(|s| s.count)
        .sum();
    println!("{traced} of {total} samples of a 3 s recording carry a trace context");
    assert!(total >= 200, "only {total} samples in 3 s");
    assert!(
        traced * 10 >= total * 8,
        "only {traced} of {total} samples traced"
    );
}
