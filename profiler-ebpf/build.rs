use which::which;

/// Rebuild when bpf-linker changes (a new toolchain means a new linker build).
fn main() {
    let bpf_linker = which("bpf-linker")
        .expect("bpf-linker not found on PATH: run `cargo xtask setup` (scripts/setup.sh)");
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
}
