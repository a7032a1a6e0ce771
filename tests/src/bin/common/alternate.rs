//! Shared by the third-party writer fixtures: worker threads alternate every few milliseconds
//! between trace A (burning in `burn_for_trace_a`) and trace B (`burn_for_trace_b`), publishing
//! each trace through the fixture's writer just before burning for it.
//!
//! Both traces are shared by every worker (one request fanned out to several threads); each
//! worker has its own span in each. Output, one line each, before `ready <pid>`:
//!   ctx <tid> a|b <trace_id hex> <span_id hex>

use std::{
    hint::black_box,
    sync::{Arc, Barrier, Mutex},
};

use libdd_library_config::{
    otel_process_ctx,
    tracer_metadata::{ThreadLocalMetadata, TracerMetadata},
};

pub const TRACE_A: [u8; 16] = [
    0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e, 0x47, 0x36,
];
pub const TRACE_B: [u8; 16] = [
    0x0a, 0xf7, 0x65, 0x19, 0x16, 0xcd, 0x43, 0xdd, 0x84, 0x48, 0xeb, 0x21, 0x1c, 0x80, 0x31, 0x9c,
];

/// One side of the alternation, as a worker publishes it.
pub struct Trace {
    /// `a` or `b`.
    pub name: char,
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// The `http.route` attribute: `/a` or `/b`.
    pub route: &'static str,
    /// The `worker` attribute: `worker-<n>`.
    pub worker: String,
    pub burn: extern "C" fn(),
}

impl Trace {
    fn new(name: char, worker: usize) -> Self {
        let (trace_id, span_base, route, burn): (_, u64, _, extern "C" fn()) = match name {
            'a' => (TRACE_A, 0x00f0_67aa_0ba9_0200, "/a", burn_for_trace_a),
            _ => (TRACE_B, 0x5399_5c3f_42cd_8a00, "/b", burn_for_trace_b),
        };
        Self {
            name,
            trace_id,
            span_id: (span_base + worker as u64 + 1).to_be_bytes(),
            route,
            worker: format!("worker-{worker}"),
            burn,
        }
    }

    pub fn trace_hex(&self) -> String {
        hex(&self.trace_id)
    }

    pub fn span_hex(&self) -> String {
        hex(&self.span_id)
    }
}

/// Publishes an OTEP 4719 process context with `libdd-library-config`: service.name
/// `checkout`, and with `attribute_keys` the `threadlocal.*` block, whose key map is
/// `datadog.local_root_span_id` followed by those keys.
pub fn publish_process_context(attribute_keys: Option<&[&str]>) {
    let metadata = TracerMetadata {
        runtime_id: Some("7c9e6679-7425-40de-944b-e07fc1f90ae7".into()),
        tracer_language: "rust".into(),
        tracer_version: "0.0.1".into(),
        hostname: "fixture-host".into(),
        service_name: Some("checkout".into()),
        service_env: Some("test".into()),
        service_version: Some("1.2.3".into()),
        threadlocal_metadata: attribute_keys.map(|keys| ThreadLocalMetadata {
            attribute_keys: keys.iter().map(|k| k.to_string()).collect(),
            ..ThreadLocalMetadata::default()
        }),
        ..TracerMetadata::default()
    };
    otel_process_ctx::publish(&metadata.to_otel_process_ctx()).expect("publish process context");
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// About 5 ms of dependent multiplies (and stack round trips) on a current x86_64 core.
const BURN_ITERATIONS: u32 = 5 << 19;

/// One LCG step in assembly, as a macro: a function (even inlined), `black_box` or
/// `wrapping_mul` would show up as an inlined frame (DWARF) above the burn functions.
macro_rules! lcg {
    ($x:expr, $mul:expr, $add:expr) => {
        // SAFETY: register-only arithmetic.
        unsafe {
            core::arch::asm!("imul {x}, {m}", "add {x}, {a}", x = inout(reg) $x, m = in(reg) $mul as u64, a = in(reg) $add as u64)
        }
    };
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn burn_for_trace_a() {
    let mut x = black_box(0x9e37_79b9_7f4a_7c15u64);
    for _ in 0..BURN_ITERATIONS {
        lcg!(x, 6364136223846793005u64, 1442695040888963407u64);
    }
    black_box(x);
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn burn_for_trace_b() {
    let mut x = black_box(0x7f4a_7c15_9e37_79b9u64);
    for _ in 0..BURN_ITERATIONS {
        lcg!(x, 2862933555777941757u64, 3037000493u64);
    }
    black_box(x);
}

/// Worker threads from `-t <n>` (default 2).
fn threads_from_args() -> usize {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == "-t") {
        Some(i) => args
            .get(i + 1)
            .and_then(|n| n.parse().ok())
            .expect("-t <threads>"),
        None => 2,
    }
}

/// Starts the workers, prints their `ctx` lines and `ready <pid>`, and never returns. Each
/// worker runs `work(&a, &b)`, which loops forever: publish A, `(a.burn)()`, publish B,
/// `(b.burn)()`.
pub fn run(work: fn(&Trace, &Trace)) -> ! {
    let threads = threads_from_args();
    let started = Arc::new(Barrier::new(threads + 1));
    let print = Arc::new(Mutex::new(()));
    for worker in 0..threads {
        let (started, print) = (started.clone(), print.clone());
        std::thread::Builder::new()
            .name(format!("worker-{worker}"))
            .spawn(move || {
                let (a, b) = (Trace::new('a', worker), Trace::new('b', worker));
                // SAFETY: gettid has no preconditions.
                let tid = unsafe { libc::gettid() };
                {
                    let _lock = print.lock().expect("print lock");
                    for t in [&a, &b] {
                        println!("ctx {tid} {} {} {}", t.name, t.trace_hex(), t.span_hex());
                    }
                }
                started.wait();
                work(&a, &b);
            })
            .expect("spawn worker");
    }
    started.wait();
    println!("ready {}", std::process::id());
    loop {
        std::thread::park();
    }
}
