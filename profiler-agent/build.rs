//! Builds the eBPF object from `profiler-ebpf` with the nightly toolchain and bpf-linker
//! (aya-build), so `cargo build` of the agent is all a developer runs. `AYA_BUILD_SKIP=1` skips
//! it for builds that provide the object another way.
use std::path::Path;

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
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
