//! Developer tasks. `cargo xtask <task>`:
//!
//! - `setup`: install what a fresh machine lacks (idempotent; scripts/setup.sh).
//! - `run`:   setup, build, and run the agent as a daemon with the embedded store and the
//!   query API (or the agent command given after `run`); prints where to look.
//! - `test`:  setup, formatting, clippy (host crates and the eBPF crate), unit tests, then the
//!   root integration tests that load the real eBPF programs.
//! - `lint`:  formatting and clippy only.
//! - `bench`: the overhead benchmark (see BENCHMARKS.md).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

mod agent_api;
mod bench;
mod bench_context;
mod bpf_stats;
mod otlp_sink;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install rust-src, bpf-linker and the Debian packages the tests use.
    Setup,
    /// Set up, build (release) and run the agent: by default the daemon with the store in
    /// target/profiler/ and the API on 127.0.0.1:8740. Extra arguments replace the default
    /// agent command line.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, lint, and run every test (the root integration tests included).
    Test {
        /// Skip formatting and clippy.
        #[arg(long)]
        no_lint: bool,
        /// Only run tests whose name contains this.
        filter: Option<String>,
    },
    /// Formatting and clippy, for the host crates and the eBPF crate.
    Lint,
    /// Overhead benchmark (root): the agent next to bpftrace and perf, one table.
    Bench(bench::BenchArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    if !matches!(cli.task, Task::Setup) {
        // Setup first: the eBPF build needs rust-src and bpf-linker.
        setup(&root)?;
        let object = build_ebpf_object(&root)?;
        // SAFETY: single-threaded here; nothing else reads the environment concurrently.
        unsafe { std::env::set_var(EBPF_OBJECT_ENV, object) };
    }
    match cli.task {
        Task::Setup => setup(&root),
        Task::Run { args } => {
            cargo(&["build", "--release", "-p", "profiler-agent"])?;
            let agent = root.join("target/release/profiler-agent");
            if args.is_empty() {
                return run_daemon(&agent);
            }
            eprintln!("+ {} {}", agent.display(), args.join(" "));
            run(Command::new(agent).args(&args))?;
            if args.first().map(String::as_str) == Some("record") {
                eprintln!(
                    "\nTop functions: go tool pprof -top profile.pb.gz   (Debian: /usr/lib/go-1.19/bin/go)"
                );
            }
            Ok(())
        }
        Task::Test { no_lint, filter } => {
            if !no_lint {
                lint()?;
            }
            // One package selection and one build for everything, so every later step reuses
            // it: the agent binary the integration tests run, the fixtures, the test harnesses
            // (another selection would resolve other features and rebuild half the tree).
            const SELECTION: [&str; 3] = ["--workspace", "--exclude", "profiler-ebpf"];
            cargo(&[&["build", "--all-targets"][..], &SELECTION].concat())?;
            // Tier 1: unit tests, no privileges needed.
            let mut unit = [&["test"][..], &SELECTION, &["--lib", "--bins"]].concat();
            unit.extend(filter.as_deref());
            cargo(&unit)?;
            // Tier 2: real eBPF programs against real processes, as root, one at a time so the
            // fixtures do not compete for the two CPUs.
            // Every test binary runs even after a failure, so one run shows every failure.
            let mut integration = [
                &["test"][..],
                &SELECTION,
                &["--no-fail-fast", "--test", "*"],
            ]
            .concat();
            integration.extend(filter.as_deref());
            integration.extend(["--", "--test-threads=1"]);
            cargo(&integration)
        }
        Task::Lint => lint(),
        Task::Bench(args) => bench::bench(&root, args),
    }
}

/// Where `cargo xtask run` keeps its store, and where its API listens.
const RUN_STORE: &str = "target/profiler/profiles.db";
const RUN_API: &str = "127.0.0.1:8740";

/// Runs the daemon with the store and the API, says where to look, and stops it cleanly on
/// Ctrl-C (the agent gets the terminal's SIGINT; a SIGTERM to xtask is passed on as SIGINT).
fn run_daemon(agent: &Path) -> anyhow::Result<()> {
    let args = ["run", "--store", RUN_STORE, "--api-listen", RUN_API];
    eprintln!("+ {} {}", agent.display(), args.join(" "));
    let agent_rel = "target/release/profiler-agent";
    eprintln!(
        "\nProfiling every process on this machine; per-trace profiles go to {RUN_STORE}.\n\
         \x20 Browse:  http://{RUN_API}/   (recent traces, flame graphs, a box for a trace id)\n\
         \x20 Query:   {agent_rel} query --store {RUN_STORE} --trace-id <trace id> [--format top|pprof|folded|svg]\n\
         \x20 List:    {agent_rel} traces --store {RUN_STORE} --since 10m\n\
         \x20 Metrics: curl http://{RUN_API}/metrics\n\
         Ctrl-C stops it (the last traces are flushed to the store first).\n"
    );
    bench::install_signal_handlers();
    let mut child = Command::new(agent)
        .args(args)
        .spawn()
        .with_context(|| format!("start {}", agent.display()))?;
    let mut forwarded = false;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if bench::interrupted() && !forwarded {
            // Harmless when the terminal already sent it: the agent handles every SIGINT.
            let _ = bench::signal(child.id(), libc::SIGINT);
            forwarded = true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    if !status.success() {
        bail!("the agent failed: {status}");
    }
    eprintln!("\nStopped. The store keeps the traces: {agent_rel} traces --store {RUN_STORE}");
    Ok(())
}

fn setup(root: &Path) -> anyhow::Result<()> {
    run(Command::new("bash").arg(root.join("scripts/setup.sh")))
}

fn lint() -> anyhow::Result<()> {
    cargo(&["fmt", "--all", "--", "--check"])?;
    cargo(&[
        "clippy",
        "--workspace",
        "--exclude",
        "profiler-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    // The eBPF crate in its own pass, for its real target (sharing the object build's `core`).
    run(nightly_ebpf_cargo("clippy").args(["--package", "profiler-ebpf", "--", "-D", "warnings"]))
}

/// The variable through which the agent's build script takes a prebuilt eBPF object.
const EBPF_OBJECT_ENV: &str = "PROFILER_EBPF_OBJECT";

/// Builds the eBPF object once, as the agent's build script (aya-build) would, and returns its
/// path. Every later cargo run gets it through `PROFILER_EBPF_OBJECT`, so the build script
/// copies it instead of building it again for each profile and feature set (four times in a
/// `test` run).
fn build_ebpf_object(root: &Path) -> anyhow::Result<PathBuf> {
    run(nightly_ebpf_cargo("build").args(["--package", "profiler-ebpf", "--bins"]))?;
    Ok(root.join("target/ebpf/bpfel-unknown-none/release/profiler"))
}

/// `cargo` of the nightly toolchain for the eBPF target, with aya-build's flags (BTF, debug
/// info, the architecture cfg) and its own target directory.
fn nightly_ebpf_cargo(subcommand: &str) -> Command {
    let mut command = Command::new("rustup");
    command
        .args(["run", "nightly", "cargo", subcommand])
        .args([
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            [
                "--cfg=bpf_target_arch=\"x86_64\"",
                "-Cdebuginfo=2",
                "-Clink-arg=--btf",
            ]
            .join("\x1f"),
        )
        .env("CARGO_TARGET_DIR", "target/ebpf");
    command
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())).args(args))
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("start {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}
