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

/// Resolves on SIGINT or SIGTERM received after this call. The listeners are registered here,
/// not when the future is first polled: create it once, before a loop that polls it among
/// other work (a listener created later does not see a signal that came before it, so one
/// made anew on each turn of the loop missed any signal that arrived between turns).
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let interrupt = signal(SignalKind::interrupt());
    let terminate = signal(SignalKind::terminate());
    async move {
        let (Ok(mut interrupt), Ok(mut terminate)) = (interrupt, terminate) else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    }
}
