//! OBI's shared `traces_ctx_v1` map: the agent creates and pins it (or opens OBI's pin), and
//! samples of threads that OBI recorded carry OBI's trace context. The test plays OBI's part
//! with bpftool. Needs root; run through `cargo xtask test`.

use std::{path::Path, process::Command, time::Duration};

use profiler_agent::{ebpf::SamplerConfig, record::Recording};
use profiler_tests::*;

struct BpfFs(std::path::PathBuf);

impl BpfFs {
    fn mount(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("profiler-bpffs-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let status = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(status.success(), "mount bpffs");
        Self(dir)
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn bpftool(args: &[&str]) {
    run_ok(
        Command::new("bpftool").args(args),
        &format!("bpftool {args:?}"),
    );
}

fn hex_bytes(bytes: &[u8]) -> Vec<String> {
    bytes.iter().map(|b| format!("0x{b:02x}")).collect()
}

/// Threads of `pid` by name.
fn thread_id(pid: u32, name: &str) -> u32 {
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let tid: u32 = entry
            .unwrap()
            .file_name()
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let comm =
            std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).unwrap_or_default();
        if comm.trim() == name {
            return tid;
        }
    }
    panic!("no thread {name} in {pid}");
}

fn config(root: &Path, pid: u32) -> SamplerConfig {
    SamplerConfig {
        obi_bpffs_root: Some(root.to_owned()),
        ..sampler_config(Some(vec![pid]), 99)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn samples_carry_obi_contexts() {
    require_root();
    let bpffs = BpfFs::mount("ok");
    let fixture = Fixture::start(Command::new(burn_c()));
    let recording = Recording::start(&config(&bpffs.0, fixture.pid)).expect("start with OBI");
    let pin = bpffs.0.join("otel/traces_ctx_v1");
    assert!(pin.exists(), "the agent pins the map when OBI has not");

    // Play OBI: record trace A on thread-a, trace B on thread-b.
    let trace_a = [0xa1u8; 16];
    let trace_b = [0xb2u8; 16];
    for (thread, trace, span) in [
        ("thread-a", trace_a, [0x11u8; 8]),
        ("thread-b", trace_b, [0x22u8; 8]),
    ] {
        let tid = thread_id(fixture.pid, thread);
        let key = ((u64::from(fixture.pid) << 32) | u64::from(tid)).to_le_bytes();
        let mut value = trace.to_vec();
        value.extend(span);
        let mut args = vec!["map", "update", "pinned", pin.to_str().unwrap(), "key"];
        let key_hex = hex_bytes(&key);
        let value_hex = hex_bytes(&value);
        args.extend(key_hex.iter().map(String::as_str));
        args.push("value");
        args.extend(value_hex.iter().map(String::as_str));
        bpftool(&args);
    }

    let traced =
        |s: &[profiler_agent::collector::SymbolizedSample], leaf: &str, trace: [u8; 16]| -> u64 {
            s.iter()
                .filter(|x| &*x.leaf == leaf)
                .filter(|x| x.context.as_ref().is_some_and(|c| c.trace_id == trace))
                .map(|x| x.count)
                .sum()
        };
    let (samples, done) = sample_traced_until(&recording, Duration::from_secs(30), |s| {
        traced(s, "burn_a", trace_a) >= 300 && traced(s, "burn_b", trace_b) >= 300
    })
    .await;
    let finished = recording.finish(|_| ()).await.unwrap();
    let a_total = leaf_count(&samples, "burn_a");
    let b_total = leaf_count(&samples, "burn_b");
    println!(
        "burn_a: {a_total} samples, {} with trace A, {} with B; burn_b: {b_total}, {} with B, {} with A; obi reads {}",
        traced(&samples, "burn_a", trace_a),
        traced(&samples, "burn_a", trace_b),
        traced(&samples, "burn_b", trace_b),
        traced(&samples, "burn_b", trace_a),
        finished.kernel.get(profiler_common::Counter::ContextObi)
    );
    assert!(done, "not enough traced samples within 30 s");
    assert!(traced(&samples, "burn_a", trace_a) as f64 >= 0.95 * a_total as f64);
    assert!(traced(&samples, "burn_a", trace_b) as f64 <= 0.01 * a_total as f64);
    assert!(traced(&samples, "burn_b", trace_b) as f64 >= 0.95 * b_total as f64);
    assert!(traced(&samples, "burn_b", trace_a) as f64 <= 0.01 * b_total as f64);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mismatched_pin_is_refused_clearly() {
    require_root();
    let bpffs = BpfFs::mount("bad");
    std::fs::create_dir_all(bpffs.0.join("otel")).unwrap();
    let pin = bpffs.0.join("otel/traces_ctx_v1");
    // Same name, wrong value size.
    bpftool(&[
        "map",
        "create",
        pin.to_str().unwrap(),
        "type",
        "lru_hash",
        "key",
        "8",
        "value",
        "16",
        "entries",
        "16384",
        "name",
        "traces_ctx_v1",
    ]);
    let error = match Recording::start(&config(&bpffs.0, std::process::id())) {
        Ok(_) => panic!("a mismatched pin was accepted"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        error.contains("is not OBI's traces_ctx_v1") && error.contains("16"),
        "{error}"
    );

    let plain_dir = std::env::temp_dir();
    let error = match Recording::start(&config(&plain_dir, std::process::id())) {
        Ok(_) => panic!("a non-bpffs root was accepted"),
        Err(e) => format!("{e:#}"),
    };
    assert!(error.contains("is not a BPF filesystem"), "{error}");
}
