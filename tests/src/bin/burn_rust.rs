//! Rust twin of `fixtures/burn.c`: thread_a_main -> work_a -> burn_a, and the same for b.
//! Built with frame pointers (workspace `.cargo/config.toml`). Prints "ready <pid>"; exits
//! after the number of seconds given as the first argument, if any.
use std::{
    hint::black_box,
    io::Write as _,
    sync::atomic::{AtomicU64, AtomicUsize, Ordering},
};

static SINK: AtomicU64 = AtomicU64::new(1);
static STARTED: AtomicUsize = AtomicUsize::new(0);

/// One LCG step in assembly: inlined std helpers (`wrapping_mul`, `black_box`) would show up
/// as inlined frames (DWARF) and become the leaf instead of the burn function.
#[inline(always)]
fn lcg(x: &mut u64, mul: u64, add: u64) {
    // SAFETY: register-only arithmetic.
    unsafe {
        core::arch::asm!("imul {x}, {m}", "add {x}, {a}", x = inout(reg) *x, m = in(reg) mul, a = in(reg) add)
    };
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn burn_a() {
    let mut x = SINK.load(Ordering::Relaxed);
    for _ in 0..(1u32 << 20) {
        lcg(&mut x, 6364136223846793005, 1442695040888963407);
    }
    SINK.store(x, Ordering::Relaxed);
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn burn_b() {
    let mut x = SINK.load(Ordering::Relaxed) ^ 1;
    for _ in 0..(1u32 << 20) {
        lcg(&mut x, 2862933555777941757, 3037000493);
    }
    SINK.store(x, Ordering::Relaxed);
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn work_a() {
    burn_a();
    black_box(());
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn work_b() {
    burn_b();
    black_box(());
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn thread_a_main() {
    STARTED.fetch_add(1, Ordering::SeqCst);
    loop {
        work_a();
    }
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn thread_b_main() {
    STARTED.fetch_add(1, Ordering::SeqCst);
    loop {
        work_b();
    }
}

fn main() {
    std::thread::Builder::new()
        .name("thread-a".into())
        .spawn(|| thread_a_main())
        .unwrap();
    std::thread::Builder::new()
        .name("thread-b".into())
        .spawn(|| thread_b_main())
        .unwrap();
    while STARTED.load(Ordering::SeqCst) < 2 {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let mut out = std::io::stdout();
    writeln!(out, "ready {}", std::process::id()).unwrap();
    out.flush().unwrap();
    match std::env::args().nth(1).and_then(|s| s.parse::<f64>().ok()) {
        Some(secs) => std::thread::sleep(std::time::Duration::from_secs_f64(secs)),
        None => loop {
            std::thread::park();
        },
    }
}
