//! OTEP 4947 thread context written by a real third-party writer, Datadog's crates.io
//! `libdd-otel-thread-ctx`, with the OTEP 4719 process context (service.name `checkout` and the
//! `threadlocal.attribute_key_map`) published by `libdd-library-config`.
//!
//! Worker threads alternate between trace A and trace B (see `common/alternate.rs`), updating
//! their record in place with the trace's ids, sampled flag, and attributes `http.route`,
//! `worker` and `http.url` (a 123-byte value: the record's attributes then run past the first
//! 100 bytes the sampler reads with the header). libdd-otel-thread-ctx always writes key index 0
//! as the local root span id (hex); libdd-library-config names it `datadog.local_root_span_id`
//! in the key map and appends the keys given here, so `http.route` is index 1, `worker` index 2
//! and `http.url` index 3.
//!
//! `otel_thread_ctx_v1` is exported in .dynsym by the link argument tests/build.rs sets for this
//! binary.

#[path = "common/alternate.rs"]
mod alternate;

use alternate::Trace;
use libdd_otel_thread_ctx::linux::OwnedThreadContext;

const HTTP_ROUTE: u8 = 1;
const WORKER: u8 = 2;
const HTTP_URL: u8 = 3;
/// W3C trace-flags: sampled.
const SAMPLED: u8 = 1;

fn enter(t: &Trace, url: &str) {
    OwnedThreadContext::update(
        t.trace_id,
        t.span_id,
        SAMPLED,
        // Each worker's span is the root of its part of the trace.
        t.span_id,
        &[(HTTP_ROUTE, t.route), (WORKER, &t.worker), (HTTP_URL, url)],
    );
}

/// `/checkout/<span hex>/` then `item` 24 times: 123 bytes (tests/tests/writers.rs checks it).
fn url(t: &Trace) -> String {
    format!("/checkout/{}/{}", t.span_hex(), "item".repeat(24))
}

fn work(a: &Trace, b: &Trace) {
    let (url_a, url_b) = (url(a), url(b));
    loop {
        enter(a, &url_a);
        (a.burn)();
        enter(b, &url_b);
        (b.burn)();
    }
}

fn main() {
    alternate::publish_process_context(Some(&["http.route", "worker", "http.url"]));
    alternate::run(work);
}
