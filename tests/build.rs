//! Link arguments for the fixtures that carry third-party trace-context writers. Both writers
//! define TLS symbols that readers find in `.dynsym`, which an executable does not export by
//! default. Each argument is scoped to the one binary that needs it.

use std::process::Command;

/// Set when this script re-runs itself only to collect custom-labels' build instructions.
const EMIT_CUSTOM_LABELS: &str = "PROFILER_TESTS_EMIT_CUSTOM_LABELS";

fn main() {
    if std::env::var_os(EMIT_CUSTOM_LABELS).is_some() {
        custom_labels::build::emit_build_instructions();
        return;
    }
    println!("cargo:rerun-if-changed=build.rs");

    // OTEP 4947: `otel_thread_ctx_v1` must be in .dynsym; libdd-otel-thread-ctx leaves that to
    // the executable's link.
    println!(
        "cargo:rustc-link-arg-bin=otel_writer_rust=-Wl,--export-dynamic-symbol=otel_thread_ctx_v1"
    );

    // custom-labels: its `emit_build_instructions` prints `cargo:rustc-link-arg=` (every target
    // of the package) with a `--dynamic-list` of its two symbols. Run it in a child copy of this
    // script and narrow each link argument to the custom-labels fixture.
    let exe = std::env::current_exe().expect("build script path");
    let output = Command::new(exe)
        .env(EMIT_CUSTOM_LABELS, "1")
        .output()
        .expect("run the build script for custom-labels' instructions");
    assert!(
        output.status.success(),
        "custom-labels build instructions failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    for line in String::from_utf8(output.stdout)
        .expect("UTF-8 build instructions")
        .lines()
    {
        let arg = line
            .strip_prefix("cargo:rustc-link-arg=")
            .or_else(|| line.strip_prefix("cargo::rustc-link-arg="));
        match arg {
            Some(arg) => println!("cargo:rustc-link-arg-bin=custom_labels_rust={arg}"),
            None => println!("{line}"),
        }
    }
}
