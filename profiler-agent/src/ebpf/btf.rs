//! Kernel BTF: struct member offsets the eBPF programs need (no CO-RE in Rust eBPF).
//! The reader lands with the TLS resolver; until then no thread pointer offset is known and
//! trace contexts are not read (the sampler logs this once).

pub fn task_fsbase_offset() -> anyhow::Result<u32> {
    anyhow::bail!("the BTF reader is not available in this build")
}
