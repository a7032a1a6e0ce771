//! Publishes a process context with a real OTEP 4719 writer, Datadog's `libdd-library-config`
//! (with its `threadlocal.*` block), prints `ready <pid>`, and on every SIGUSR1 republishes
//! with `service.name` `checkout-v2` and prints `updated`.

use libdd_library_config::{
    otel_process_ctx,
    tracer_metadata::{ThreadLocalMetadata, TracerMetadata},
};

fn metadata(service_name: &str) -> TracerMetadata {
    TracerMetadata {
        runtime_id: Some("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0".into()),
        tracer_language: "rust".into(),
        tracer_version: "0.0.1".into(),
        hostname: "fixture-host".into(),
        service_name: Some(service_name.into()),
        service_env: Some("test".into()),
        service_version: Some("1.2.3".into()),
        threadlocal_metadata: Some(ThreadLocalMetadata {
            attribute_keys: vec!["http.route".into(), "http.method".into()],
            ..ThreadLocalMetadata::default()
        }),
        ..TracerMetadata::default()
    }
}

fn publish(service_name: &str) {
    otel_process_ctx::publish(&metadata(service_name).to_otel_process_ctx())
        .expect("publish process context");
}

/// Blocks SIGUSR1 so that it is only ever taken by `sigwait`.
fn block_usr1() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialized by sigemptyset before use; the mask
    // functions only read and write the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn main() {
    let set = block_usr1();
    publish("checkout");
    println!("ready {}", std::process::id());
    loop {
        let mut signal = 0;
        // SAFETY: `set` is initialized and `signal` is a valid out pointer.
        if unsafe { libc::sigwait(&set, &mut signal) } == 0 && signal == libc::SIGUSR1 {
            publish("checkout-v2");
            println!("updated");
        }
    }
}
