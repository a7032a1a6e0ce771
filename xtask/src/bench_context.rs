//! The cost of reading a sampled thread's trace context, isolated from the rest of the sample:
//! the kernel times one read in 16 (per CPU) of a process's own context source
//! (`context_read_ns` / `context_reads_timed`, reported by `record`), against real writers: an
//! OTEP 4947 thread context (C, TLSDESC relaxed to local-exec) and Go pprof labels in both
//! runtime layouts (Go 1.19 hash map, Go ≥ 1.24 sorted slice).
//!
//! Each round also starts ours and bpftrace afresh, one after the other, on the OTEP 4947
//! target: one start of a profiler is one draw of its eBPF cost (two starts of the same binary
//! differ by up to ±35% while one start's windows agree within a few percent), and the main
//! table has only one start of each per round.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};
use profiler_common::names;

use crate::bench::{Bpftool, fmt_spread, retry, signal, spread};

/// Budget for the OTEP 4947 read (the three dependent reads cost about 1 µs here).
const BUDGET_THREAD_CONTEXT_NS: f64 = 1500.0;
/// The issue allows Go targets the floor plus 3 µs per sample: the whole sampler run on a Go
/// target with labels against the same goroutines without labels (Go's stacks and runtime,
/// nothing to find). The C floor is shown beside it: Go's stacks are not C's.
const BUDGET_GO_OVER_FLOOR_US: f64 = 3.0;
/// `record` runs this long before the measured window (load, attach, first context lookups).
const RECORD_WARMUP: Duration = Duration::from_secs(1);

pub struct ContextCost {
    pub target: String,
    /// ns per read attempt, one value per window (none for the untraced floor).
    pub read_ns: Vec<f64>,
    /// The sampler's whole run per sample (µs, bpf_stats), read included, one value per window.
    pub ebpf_us: Vec<f64>,
    pub budget: Budget,
}

#[derive(Clone, Copy, PartialEq)]
pub enum Budget {
    /// An untraced target: the per-sample cost of its language's runtime and stacks, with
    /// nothing to read.
    Floor(Language),
    ReadNs(f64),
    /// Go targets: at most this much over the Go floor (also shown against the C floor).
    OverFloorUs(f64),
}

#[derive(Clone, Copy, PartialEq)]
pub enum Language {
    C,
    Go,
}

/// The sampler's eBPF time per sample (µs, bpf_stats), ours and bpftrace's, one fresh start
/// of each per round on a fresh OTEP 4947 target: `ours_us[i]` and `bpftrace_us[i]` ran
/// seconds apart on the same target process.
#[derive(Default)]
pub struct StartPairs {
    pub ours_us: Vec<f64>,
    pub bpftrace_us: Vec<f64>,
}

pub struct ContextTable {
    pub costs: Vec<ContextCost>,
    pub starts: StartPairs,
}

/// The programs the table starts: our agent, bpftool to find their programs, bpftrace (its
/// output goes to a log in `logs`).
pub struct Profilers<'a> {
    pub agent: &'a Path,
    pub bpftool: &'a Bpftool,
    pub bpftrace: &'a Path,
    pub logs: &'a Path,
}

/// Measures every target over `windows` windows of `window` each, in interleaved rounds, and
/// ours against bpftrace once per round.
pub fn measure(
    root: &Path,
    profilers: &Profilers<'_>,
    out_dir: &Path,
    windows: u32,
    window: Duration,
    frequency: u32,
) -> anyhow::Result<ContextTable> {
    let agent = profilers.agent;
    let bpftool = profilers.bpftool;
    let thread_context = build_thread_context(root, out_dir)?;
    let go_1_24 = build_go(root, out_dir, go_bin(root, "1.24")?, "1.24")?;
    let targets = [
        (
            "untraced C (the floor: no context source)",
            build_untraced(root, out_dir)?,
            &[][..],
            Budget::Floor(Language::C),
        ),
        (
            "OTEP 4947 thread context (C)",
            thread_context.clone(),
            &[][..],
            Budget::ReadNs(BUDGET_THREAD_CONTEXT_NS),
        ),
        (
            "Go 1.24 without labels (the Go floor: same goroutines, nothing to find)",
            go_1_24.clone(),
            &["nolabels"][..],
            Budget::Floor(Language::Go),
        ),
        (
            "Go 1.19 pprof labels (map)",
            build_go(root, out_dir, "/usr/lib/go-1.19".into(), "1.19")?,
            &[][..],
            Budget::OverFloorUs(BUDGET_GO_OVER_FLOOR_US),
        ),
        (
            "Go 1.24 pprof labels (slice)",
            go_1_24,
            &[][..],
            Budget::OverFloorUs(BUDGET_GO_OVER_FLOOR_US),
        ),
    ];
    // Interleaved rounds, one window of each target per round (fixture started afresh each
    // time): the host's drift over the table lands on every target alike, so the Go targets'
    // distance to the Go floor is not one target's quiet minute against another's busy one.
    let mut costs: Vec<ContextCost> = targets
        .iter()
        .map(|(target, _, _, budget)| ContextCost {
            target: (*target).to_owned(),
            read_ns: Vec::new(),
            ebpf_us: Vec::new(),
            budget: *budget,
        })
        .collect();
    let mut starts = StartPairs::default();
    for round in 1..=windows {
        crate::bench::progress(&format!("context read cost: round {round} of {windows}"));
        for ((_, binary, args, _), cost) in targets.iter().zip(costs.iter_mut()) {
            let fixture = Started::start(binary, args)?;
            let (read, sample) = one_window(agent, bpftool, Some(fixture.pid), window, frequency)?;
            cost.read_ns.extend(read);
            cost.ebpf_us.push(sample);
        }
        let fixture = Started::start(&thread_context, &[])?;
        let ours_first = round % 2 == 1;
        for ours in [ours_first, !ours_first] {
            if ours {
                let (_, sample) = one_window(agent, bpftool, None, window, frequency)?;
                starts.ours_us.push(sample);
            } else {
                let sample = bpftrace_window(profilers, window, frequency)?;
                starts.bpftrace_us.push(sample);
            }
        }
        drop(fixture);
        crate::bench::progress(&format!(
            "  fresh starts on the OTEP 4947 target: ours {:.2} µs, bpftrace {:.2} µs per sample",
            starts.ours_us.last().copied().unwrap_or(f64::NAN),
            starts.bpftrace_us.last().copied().unwrap_or(f64::NAN),
        ));
    }
    Ok(ContextTable { costs, starts })
}

/// The table, then the eBPF budget over every start of the run: the fresh starts here and the
/// main table's rounds (`main_rounds`: ours / bpftrace, one ratio per round).
pub fn render(table: &ContextTable, main_rounds: &[f64]) -> String {
    let costs = &table.costs;
    let mut out = String::from(
        "\n### Trace-context read cost (kernel, per sample of the target alone)\n\n\
         | target | context read (ns per attempt) | eBPF time per sample (µs), read included | \
         windows | budget |\n|---|---|---|---|---|\n",
    );
    let floor = |language| {
        costs
            .iter()
            .find(|c| c.budget == Budget::Floor(language))
            .map(|c| c.ebpf_us.as_slice())
    };
    // A target's distance to a floor: the median of its window minus the floor's window of
    // the same round (a few seconds apart), so the host's drift between rounds cancels.
    let over = |c: &ContextCost, language| {
        floor(language).and_then(|f| spread(&paired_differences(&c.ebpf_us, f)))
    };
    for c in costs {
        let (read, sample) = (spread(&c.read_ns), spread(&c.ebpf_us));
        let verdict = match (c.budget, read, sample) {
            (Budget::Floor(Language::C), _, _) => "the floor".to_owned(),
            (Budget::Floor(Language::Go), _, Some(_)) => match over(c, Language::C) {
                Some(d) => format!("the Go floor ({:+.2} µs over the C floor)", d.median),
                None => "the Go floor".to_owned(),
            },
            (Budget::ReadNs(b), Some(r), _) => pass_or_miss(r.median, b, "ns", 0),
            (Budget::OverFloorUs(b), _, Some(_)) => {
                let over_c = over(c, Language::C)
                    .map(|d| format!(" ({:+.2} µs over the C floor)", d.median))
                    .unwrap_or_default();
                match over(c, Language::Go) {
                    Some(d) => format!(
                        "≤ Go floor + {b} µs: {} µs over it, round by round → {}{over_c}",
                        fmt_spread(Some(d), 2, true),
                        if d.median <= b {
                            "PASS".to_owned()
                        } else {
                            format!("MISS by {:.2}", d.median - b)
                        },
                    ),
                    None => "n/a (no Go floor)".into(),
                }
            }
            _ => "n/a".into(),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {verdict} |",
            c.target,
            fmt_spread(read, 0, false),
            fmt_spread(sample, 2, false),
            c.ebpf_us.len()
        );
    }
    out.push_str(&render_starts(&table.starts, main_rounds));
    out
}

/// The eBPF budget again, start by start: the fresh starts' ratios (ours's start over
/// bpftrace's, round by round), and with the main table's rounds the verdict over every start.
fn render_starts(starts: &StartPairs, main_rounds: &[f64]) -> String {
    let fresh: Vec<f64> = starts
        .ours_us
        .iter()
        .zip(&starts.bpftrace_us)
        .filter(|&(_, &b)| b > 0.0)
        .map(|(o, b)| o / b)
        .collect();
    let every: Vec<f64> = fresh.iter().chain(main_rounds).copied().collect();
    let all = spread(&every);
    let verdict = match &all {
        Some(p) if p.median <= 1.0 => "**PASS**".to_owned(),
        Some(p) => format!("**MISS** by {:.0}%", (p.median - 1.0) * 100.0),
        None => "n/a".to_owned(),
    };
    format!(
        "\nOurs and bpftrace, each started afresh on the OTEP 4947 target once per round (ours \
         `record` of every process, bpftrace the main table's program; which first \
         alternates). One start of a profiler is one draw of its eBPF cost, and the main table \
         has one start of each per round.\n\n\
         - eBPF time per sample ≤ bpftrace's, start by start: fresh starts ours / bpftrace = \
         {} over {} (ours {} µs, bpftrace {} µs); with the main table's rounds (whole \
         windows) {} over {} starts → {verdict} (ours ≤ bpftrace in {}/{} starts)\n",
        fmt_spread(spread(&fresh), 2, false),
        fresh.len(),
        fmt_spread(spread(&starts.ours_us), 2, false),
        fmt_spread(spread(&starts.bpftrace_us), 2, false),
        fmt_spread(all, 2, false),
        every.len(),
        every.iter().filter(|&&r| r <= 1.0).count(),
        every.len(),
    )
}

/// `target[i] - floor[i]` for every round both have.
fn paired_differences(target: &[f64], floor: &[f64]) -> Vec<f64> {
    target.iter().zip(floor).map(|(t, f)| t - f).collect()
}

fn pass_or_miss(value: f64, budget: f64, unit: &str, decimals: usize) -> String {
    if value <= budget {
        format!("{value:.decimals$} {unit} → PASS")
    } else {
        format!(
            "{value:.decimals$} {unit} → MISS by {:.decimals$}",
            value - budget
        )
    }
}

/// One `record` of the target `pid` (of every process when `None`, as deployed): the
/// sampler's eBPF time per sample over `window` (after a warm-up), and the kernel's context
/// read time per attempt over the whole recording.
fn one_window(
    agent: &Path,
    bpftool: &Bpftool,
    pid: Option<u32>,
    window: Duration,
    frequency: u32,
) -> anyhow::Result<(Option<f64>, f64)> {
    let mut command = Command::new(agent);
    command.args(["record", "--format", "folded", "-o", "/dev/null"]);
    if let Some(pid) = pid {
        command.args(["--pid", &pid.to_string()]);
    }
    let child = command
        .args(["-F", &frequency.to_string()])
        // Stopped with SIGINT after the window; the duration is only a backstop.
        .args(["-d", &format!("{}s", window.as_secs() + 60)])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("run profiler-agent record")?;
    let record = child.id();
    let measured = retry(|| bpftool.find_prog(record, Some(names::ON_CPU_SAMPLE)))
        .and_then(|prog| us_per_sample(prog, window));
    let _ = signal(record, libc::SIGINT);
    let output = child.wait_with_output().context("wait for record")?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        bail!("profiler-agent record failed: {stderr}");
    }
    Ok((parse_ns_per_attempt(&stderr), measured?))
}

/// bpftrace's `profile` program, as the main table runs it, started on its own: its eBPF time
/// per sample over `window` after the same warm-up as `record`'s.
fn bpftrace_window(
    profilers: &Profilers<'_>,
    window: Duration,
    frequency: u32,
) -> anyhow::Result<f64> {
    let (mut bpftrace, prog) = crate::bench::start_bpftrace(
        profilers.bpftrace,
        profilers.bpftool,
        u64::from(frequency),
        &profilers.logs.join("bpftrace-fresh-start.log"),
    )?;
    let measured = us_per_sample(prog, window);
    bpftrace.stop(crate::bench::STOP_TIMEOUT)?;
    measured
}

/// eBPF time per run of program `prog` over `window`, after [`RECORD_WARMUP`].
fn us_per_sample(prog: u32, window: Duration) -> anyhow::Result<f64> {
    let prog = crate::bpf_stats::Prog::open(prog)?;
    std::thread::sleep(RECORD_WARMUP);
    let before = prog.stats()?;
    std::thread::sleep(window);
    let after = prog.stats()?;
    after
        .us_per_run_since(&before)
        .context("the sampler did not run in the window")
}

/// Reads `child`'s stdout up to the first line `ready` accepts and returns it; the rest of
/// stdout is drained in the background, so that the child never blocks on a full pipe.
fn wait_for_stdout_line(child: &mut Child, ready: impl Fn(&str) -> bool) -> anyhow::Result<String> {
    use std::io::{BufRead as _, BufReader};
    let stdout = child.stdout.take().context("no stdout to read")?;
    let mut lines = BufReader::new(stdout).lines();
    loop {
        match lines.next() {
            Some(Ok(line)) if ready(&line) => {
                std::thread::spawn(move || for _ in lines {});
                return Ok(line);
            }
            Some(Ok(_)) => {}
            _ => bail!("exited before it was ready"),
        }
    }
}

/// `context: … , 1234 ns per attempt, …` from `record`'s summary.
fn parse_ns_per_attempt(stderr: &str) -> Option<f64> {
    let line = stderr.lines().find(|l| l.starts_with("context: "))?;
    let before = line.split(" ns per attempt").next()?;
    before.rsplit(' ').next()?.parse().ok()
}

/// Two threads burning CPU with no trace context: the per-sample floor.
fn build_untraced(root: &Path, out_dir: &Path) -> anyhow::Result<PathBuf> {
    let out = out_dir.join("burn-untraced");
    crate::run(
        Command::new("gcc")
            .args(["-O2", "-g", "-fno-omit-frame-pointer", "-pthread"])
            .arg(root.join("tests/fixtures/burn.c"))
            .arg("-o")
            .arg(&out),
    )?;
    Ok(out)
}

pub(crate) fn build_thread_context(root: &Path, out_dir: &Path) -> anyhow::Result<PathBuf> {
    let out = out_dir.join("otel-exe-le");
    let fixtures = root.join("tests/fixtures/otel_ctx");
    crate::run(
        Command::new("gcc")
            .args([
                "-O2",
                "-g",
                "-fno-omit-frame-pointer",
                "-pthread",
                "-DWRITER_LINKED",
            ])
            .args([
                "-mtls-dialect=gnu2",
                "-Wl,--export-dynamic-symbol=otel_thread_ctx_v1",
            ])
            .arg(fixtures.join("main.c"))
            .arg(fixtures.join("writer.c"))
            .arg("-o")
            .arg(&out),
    )?;
    Ok(out)
}

fn go_bin(root: &Path, series: &str) -> anyhow::Result<PathBuf> {
    let output = Command::new("bash")
        .arg(root.join("scripts/go-toolchain.sh"))
        .arg(series)
        .output()
        .context("run scripts/go-toolchain.sh")?;
    if !output.status.success() {
        bail!(
            "go-toolchain.sh {series}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(PathBuf::from(
        String::from_utf8_lossy(&output.stdout).trim(),
    ))
}

fn build_go(root: &Path, out_dir: &Path, goroot: PathBuf, series: &str) -> anyhow::Result<PathBuf> {
    let out = out_dir.join(format!("go-labels-{series}"));
    let cache = out_dir.join("go-cache");
    crate::run(
        Command::new(goroot.join("bin/go"))
            .current_dir(root.join("tests/fixtures/go/labels"))
            .env("GOROOT", &goroot)
            .env("GOTOOLCHAIN", "local")
            .env("GOPROXY", "off")
            .env("GOFLAGS", "-mod=mod")
            .env("GOCACHE", cache.join("cache"))
            .env("GOPATH", cache.join("path"))
            .env("GOENV", "off")
            .env("CGO_ENABLED", "0")
            .args(["build", "-o"])
            .arg(&out)
            .arg("."),
    )?;
    Ok(out)
}

/// A running fixture, killed on drop.
struct Started {
    child: Child,
    pid: u32,
}

impl Started {
    fn start(binary: &Path, args: &[&str]) -> anyhow::Result<Self> {
        let mut child = Command::new(binary)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("start {}", binary.display()))?;
        let pid = wait_for_stdout_line(&mut child, |l| l.starts_with("ready "))
            .and_then(|line| line["ready ".len()..].trim().parse().context("ready <pid>"));
        match pid {
            Ok(pid) => Ok(Self { child, pid }),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e.context(format!("{} did not start", binary.display())))
            }
        }
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::{Budget, ContextCost, ContextTable, Language, StartPairs, render, render_starts};

    #[test]
    fn go_targets_are_judged_against_the_go_floor() {
        let cost = |target: &str, read_ns: Vec<f64>, ebpf_us: Vec<f64>, budget| ContextCost {
            target: target.into(),
            read_ns,
            ebpf_us,
            budget,
        };
        let table = render(
            &ContextTable {
                costs: vec![
                    cost(
                        "floor",
                        vec![],
                        vec![6.0, 6.5, 7.0],
                        Budget::Floor(Language::C),
                    ),
                    cost("otep", vec![1200.0], vec![7.0], Budget::ReadNs(1500.0)),
                    cost(
                        "go floor",
                        vec![300.0],
                        vec![7.0, 10.0, 7.5],
                        Budget::Floor(Language::Go),
                    ),
                    cost(
                        "go ok",
                        vec![2000.0],
                        vec![9.5, 12.0, 10.0],
                        Budget::OverFloorUs(3.0),
                    ),
                    cost(
                        "go slow",
                        vec![4000.0],
                        vec![10.5, 12.0, 11.5],
                        Budget::OverFloorUs(3.0),
                    ),
                ],
                starts: StartPairs::default(),
            },
            &[],
        );
        assert!(
            table.contains("| floor | n/a | 6.50 [6.00–7.00] | 3 | the floor |"),
            "{table}"
        );
        assert!(table.contains("1200 ns → PASS"), "{table}");
        // Round by round: the Go floor read 7.0, 10.0 and 7.5 µs.
        assert!(
            table.contains("the Go floor (+1.00 µs over the C floor)"),
            "{table}"
        );
        assert!(
            table.contains(
                "≤ Go floor + 3 µs: +2.50 [+2.00–+2.50] µs over it, round by round → PASS \
                 (+3.50 µs over the C floor)"
            ),
            "{table}"
        );
        // Its median (11.5) is 4.0 over the floor's (7.5); paired, the median is 3.5.
        assert!(
            table.contains(
                "≤ Go floor + 3 µs: +3.50 [+2.00–+4.00] µs over it, round by round → MISS by \
                 0.50 (+4.50 µs over the C floor)"
            ),
            "{table}"
        );
    }

    #[test]
    fn parses_the_summary_line() {
        let stderr = "wrote x\ncontext: 640 read attempts, 630 read, 5 none active, 0 invalid, 0 faults, 1234 ns per attempt, 629 samples traced\n";
        assert_eq!(super::parse_ns_per_attempt(stderr), Some(1234.0));
        assert_eq!(super::parse_ns_per_attempt("nothing"), None);
    }

    #[test]
    fn fresh_starts_are_judged_start_by_start() {
        // Fresh starts 1.5, 0.8 and 1.25; main rounds 1.1 and 0.9: the median of all five
        // is 1.1. The unpaired medians of the fresh starts (2.0 over 2.0) would read 1.00.
        let line = render_starts(
            &StartPairs {
                ours_us: vec![3.0, 1.6, 2.0],
                bpftrace_us: vec![2.0, 2.0, 1.6],
            },
            &[1.1, 0.9],
        );
        assert!(
            line.contains(
                "fresh starts ours / bpftrace = 1.25 [0.80–1.50] over 3 (ours 2.00 [1.60–3.00] \
                 µs, bpftrace 2.00 [1.60–2.00] µs); with the main table's rounds (whole \
                 windows) 1.10 [0.80–1.50] over 5 starts → **MISS** by 10% (ours ≤ bpftrace \
                 in 2/5 starts)"
            ),
            "{line}"
        );
        let line = render_starts(
            &StartPairs {
                ours_us: vec![1.0, 1.9],
                bpftrace_us: vec![2.0, 2.0],
            },
            &[1.2],
        );
        assert!(
            line.contains("1.20] over 3 starts → **PASS** (ours ≤ bpftrace in 2/3 starts)"),
            "{line}"
        );
        let line = render_starts(&StartPairs::default(), &[]);
        assert!(line.contains("n/a over 0 starts → n/a"), "{line}");
    }
}
