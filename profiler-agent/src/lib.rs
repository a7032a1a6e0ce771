//! The profiler agent as a library: the binary (`main.rs`) is a thin CLI over it, and the
//! integration tests drive [`record::Recording`] in-process.
//!
//! Data flow (see ARCHITECTURE.md): `ebpf` (kernel programs, ring buffer) → `collector`
//! (owns `process` table, `profile` aggregate and `symbolize`r) → `export` (pprof, folded).

pub mod api;
pub mod clock;
pub mod collector;
pub mod context;
pub mod ebpf;
pub mod export;
pub mod health;
pub mod k8s;
pub mod metrics;
pub mod process;
pub mod profile;
pub mod query;
pub mod record;
pub mod run;
pub mod store;
pub mod symbolize;

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
