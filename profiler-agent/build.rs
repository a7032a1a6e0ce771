//! Builds the eBPF object from `profiler-ebpf` with the nightly toolchain and bpf-linker
//! (aya-build), so `cargo build` of the agent is all a developer runs.
//!
//! `PROFILER_EBPF_OBJECT=<path>` takes a prebuilt object instead (`cargo xtask` builds it once
//! and hands it to every cargo run, rather than building it again per profile and feature set).
use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// The name aya-build gives the object in OUT_DIR (the eBPF crate's bin), which
/// `profiler-agent/src/ebpf/mod.rs` includes.
const OBJECT_NAME: &str = "profiler";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=PROFILER_EBPF_OBJECT");
    if let Some(prebuilt) = std::env::var_os("PROFILER_EBPF_OBJECT") {
        let prebuilt = PathBuf::from(prebuilt);
        println!("cargo:rerun-if-changed={}", prebuilt.display());
        let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR")?);
        std::fs::copy(&prebuilt, out_dir.join(OBJECT_NAME))
            .with_context(|| format!("copy the prebuilt eBPF object {}", prebuilt.display()))?;
        return Ok(());
    }
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("agent crate has no parent directory"))?
        .join("profiler-ebpf");
    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {ebpf_dir:?}"))?;
    aya_build::build_ebpf(
        [Package {
            name: "profiler-ebpf",
            root_dir,
            no_default_features: false,
            features: &[],
        }],
        // Plain `nightly`: the toolchain installed on these machines (a dated name would not match).
        Toolchain::default(),
    )
}
