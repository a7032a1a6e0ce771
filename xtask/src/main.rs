//! Developer tasks. `cargo xtask <task>`:
//!
//! - `setup`: install what a fresh machine lacks (idempotent; scripts/setup.sh).
//! - `run`:   setup, build, and run the agent's main job.
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

mod bench;
mod bench_context;
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
    /// Set up, build (release) and run the agent. Extra arguments go to the agent.
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
    match cli.task {
        Task::Setup => setup(&root),
        Task::Run { args } => {
            setup(&root)?;
            cargo(&["build", "--release", "-p", "profiler-agent"])?;
            let args = if args.is_empty() {
                default_run_args()
            } else {
                args
            };
            let agent = root.join("target/release/profiler-agent");
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
            setup(&root)?;
            if !no_lint {
                lint()?;
            }
            // Tier 1: no privileges needed.
            let mut unit = vec![
                "test",
                "--workspace",
                "--exclude",
                "profiler-ebpf",
                "--exclude",
                "profiler-tests",
            ];
            if let Some(f) = &filter {
                unit.push(f);
            }
            cargo(&unit)?;
            // Tier 2: real eBPF programs against real processes, as root, one at a time so the
            // fixtures do not compete for the two CPUs.
            cargo(&[
                "build",
                "--workspace",
                "--exclude",
                "profiler-ebpf",
                "--bins",
            ])?;
            let mut integration = vec!["test", "-p", "profiler-tests"];
            if let Some(f) = &filter {
                integration.push(f);
            }
            integration.extend(["--", "--test-threads=1"]);
            cargo(&integration)
        }
        Task::Lint => lint(),
        Task::Bench(args) => bench::bench(&root, args),
    }
}

fn default_run_args() -> Vec<String> {
    ["record", "--duration", "10s", "--output", "profile.pb.gz"]
        .map(String::from)
        .to_vec()
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
    // The eBPF crate in its own pass, for its real target.
    run(Command::new("cargo").current_dir("profiler-ebpf").args([
        "+nightly",
        "clippy",
        "--release",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--",
        "-D",
        "warnings",
    ]))
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
