//! custom-labels v1 written by a real third-party writer, Polar Signals' crates.io
//! `custom-labels`: worker threads alternate between trace A and trace B (see
//! `common/alternate.rs`), each installing the trace's label set (`trace_id` as 32 hex digits,
//! `span_id` as 16, `http.route`, `worker`) around the burn call.
//!
//! It also publishes an OTEP 4719 process context (service.name `checkout`) with
//! `libdd-library-config`, without the `threadlocal.*` block.
//!
//! `custom_labels_abi_version` and `custom_labels_current_set` are exported in .dynsym by the
//! crate's `emit_build_instructions`, which tests/build.rs applies to this binary.

#[path = "common/alternate.rs"]
mod alternate;

use alternate::Trace;
use custom_labels::Labelset;

fn labelset(t: &Trace) -> Labelset {
    let mut set = Labelset::with_capacity(4);
    set.set("trace_id", t.trace_hex());
    set.set("span_id", t.span_hex());
    set.set("http.route", t.route);
    set.set("worker", &t.worker);
    set
}

fn work(a: &Trace, b: &Trace) {
    let (mut set_a, mut set_b) = (labelset(a), labelset(b));
    loop {
        set_a.enter(|| (a.burn)());
        set_b.enter(|| (b.burn)());
    }
}

fn main() {
    // No thread-local key map: custom-labels carry their keys.
    alternate::publish_process_context(None);
    alternate::run(work);
}
