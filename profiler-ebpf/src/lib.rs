//! Empty on purpose: the library target lets `profiler-agent` build-depend on this crate, so
//! Cargo rebuilds the agent when the eBPF sources change.
#![no_std]
