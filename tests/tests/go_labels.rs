//! Trace ids from Go pprof labels (`pprof.Do`), read by the kernel from the goroutine running
//! on the sampled thread: Go 1.19 (map layout) and ≥ 1.24 (sorted slice), static, cgo, PIE and
//! stripped builds. Goroutines burn under trace A, trace B, a goroutine spawned inside
//! `pprof.Do` (inherited labels) and a set of more than ten labels where `trace_id` sorts last.
//! Needs root; run through `cargo xtask test`.

use std::{collections::HashMap, process::Command, time::Duration};

use profiler_agent::{
    collector::SymbolizedSample,
    context::hex,
    export::PerTraceDir,
    record::{CollectOptions, Recording},
};
use profiler_common::Counter;
use profiler_tests::{
    go::{GoToolchain, GoVariant, build_go_fixture, go_toolchains},
    *,
};

const MIN_SAMPLES: u64 = 300;
const CAP: Duration = Duration::from_secs(30);
const FUNCTIONS: [(&str, &str); 4] = [
    ("main.burnTraceA", "A"),
    ("main.burnTraceB", "B"),
    ("main.burnInherited", "inherited"),
    ("main.burnManyLabels", "many"),
];

/// The fixture's `trace <name> <hex> span <hex>` lines.
fn traces(fixture: &Fixture) -> HashMap<String, String> {
    fixture
        .preamble
        .iter()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next()? == "trace").then_some(())?;
            Some((words.next()?.to_owned(), words.next()?.to_owned()))
        })
        .collect()
}

fn with_trace(samples: &[SymbolizedSample], leaf: &str, trace: &str) -> u64 {
    samples
        .iter()
        .filter(|s| &*s.leaf == leaf)
        .filter(|s| {
            s.context
                .as_ref()
                .is_some_and(|c| hex(&c.trace_id) == trace)
        })
        .map(|s| s.count)
        .sum()
}

async fn check(toolchain: &GoToolchain, variant: GoVariant) {
    require_root();
    let label = format!("{} {}", toolchain.version, variant.name());
    let fixture = Fixture::start(Command::new(build_go_fixture(toolchain, variant)));
    let ids = traces(&fixture);
    // One directory per test: the tests run in parallel, and each removes its own at the end.
    let dir = std::env::temp_dir().join(format!(
        "profiler-go-{}-{}-{}",
        std::process::id(),
        toolchain.version,
        variant.name()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let recording = Recording::start_with(
        &sampler_config(Some(vec![fixture.pid]), 99),
        CollectOptions {
            sinks: vec![Box::new(PerTraceDir::create(&dir).unwrap())],
            ..Default::default()
        },
    )
    .expect("start recording");
    let (samples, done) = sample_traced_until(&recording, CAP, |s| {
        FUNCTIONS
            .iter()
            .all(|(f, _)| leaf_count(s, f) >= MIN_SAMPLES)
    })
    .await;
    let finished = recording.finish(|_| ()).await.expect("finish");
    let k = &finished.kernel;
    println!(
        "{label}: kernel context reads {} ok, {} none active, {} faults, {} ns/attempt",
        k.get(Counter::ContextRead),
        k.get(Counter::ContextNoneActive),
        k.get(Counter::ContextReadFault),
        k.get(Counter::ContextReadNs) / k.get(Counter::ContextReadsTimed).max(1)
    );
    for (function, name) in FUNCTIONS {
        let own = &ids[name];
        let total = leaf_count(&samples, function);
        let right = with_trace(&samples, function, own);
        let wrong: u64 = ids
            .iter()
            .filter(|(n, _)| n.as_str() != name)
            .map(|(_, other)| with_trace(&samples, function, other))
            .sum();
        assert!(
            done,
            "{label}: fewer than {MIN_SAMPLES} samples per function within {CAP:?}"
        );
        assert_attributed(&label, function, total, right, wrong);
    }
    // The burn functions set up no frame, so the frame-pointer walk alone goes from each
    // straight to `runtime/pprof.Do`: the closure `forever` passes to `pprof.Do`, their caller,
    // comes back from the word at the stack pointer (`frames_recovered_frameless`).
    for function in ["main.burnTraceA", "main.burnTraceB"] {
        let (mut total, mut with_caller) = (0, 0);
        for s in samples.iter().filter(|s| &*s.leaf == function) {
            total += s.count;
            if s.functions
                .get(1)
                .is_some_and(|f| f.starts_with("main.forever.func"))
            {
                with_caller += s.count;
            }
        }
        println!("{label}: {function}: {with_caller} of {total} samples with their caller");
        assert!(
            with_caller * 10 >= total * 9,
            "{label}: {function}'s caller in {with_caller} of {total} samples"
        );
    }
    // The per-trace pprof of A, filtered on A's trace id, shows A's function only.
    let a = &ids["A"];
    let path = dir.join(format!("{a}.pb.gz"));
    let out = Command::new("/usr/lib/go-1.19/bin/go")
        .args(["tool", "pprof", "-top", &format!("-tagfocus=trace_id={a}")])
        .arg(&path)
        .output()
        .expect("go tool pprof");
    let top = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{label}: pprof: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(top.contains("main.burnTraceA"), "{label}: {top}");
    for other in [
        "main.burnTraceB",
        "main.burnInherited",
        "main.burnManyLabels",
    ] {
        assert!(
            !top.contains(other),
            "{label}: {other} in trace A's profile:\n{top}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn toolchain(series: &str) -> GoToolchain {
    go_toolchains()
        .into_iter()
        .find(|t| t.version.starts_with(&format!("go{series}")))
        .unwrap_or_else(|| panic!("Go {series} toolchain missing"))
}

#[tokio::test(flavor = "multi_thread")]
async fn go_1_19_map_labels() {
    check(&toolchain("1.19"), GoVariant::Static).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn go_1_24_slice_labels() {
    check(&toolchain("1.24"), GoVariant::Static).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn go_1_27_cgo() {
    check(&toolchain("1.27"), GoVariant::Cgo).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn go_1_27_pie() {
    check(&toolchain("1.27"), GoVariant::Pie).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn go_1_27_stripped() {
    check(&toolchain("1.27"), GoVariant::Stripped).await;
}
