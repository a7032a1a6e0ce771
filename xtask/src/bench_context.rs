//! The cost of reading a sampled thread's trace context, isolated from the rest of the sample:
//! the kernel times one read in 16 (per CPU) of a process's own context source
//! (`context_read_ns` / `context_reads_timed`, reported by `record`), against real writers: an
//! OTEP 4947 thread context (C, TLSDESC relaxed to local-exec) and Go pprof labels in both
//! runtime layouts (Go 1.19 hash map, Go ≥ 1.24 sorted slice).

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

/// Measures every target over `windows` windows of `window` each, in interleaved rounds.
pub fn measure(
    root: &Path,
    agent: &Path,
    bpftool: &Bpftool,
    out_dir: &Path,
    windows: u32,
    window: Duration,
    frequency: u32,
) -> anyhow::Result<Vec<ContextCost>> {
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
            build_thread_context(root, out_dir)?,
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
    for round in 1..=windows {
        crate::bench::progress(&format!("context read cost: round {round} of {windows}"));
        for ((_, binary, args, _), cost) in targets.iter().zip(costs.iter_mut()) {
            let fixture = Started::start(binary, args)?;
            let (read, sample) = one_window(agent, bpftool, fixture.pid, window, frequency)?;
            cost.read_ns.extend(read);
            cost.ebpf_us.push(sample);
        }
    }
    Ok(costs)
}

pub fn render(costs: &[ContextCost]) -> String {
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
    out
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

/// One `record` of the target: the sampler's eBPF time per sample over `window` (after a
/// warm-up), and the kernel's context read time per attempt over the whole recording.
fn one_window(
    agent: &Path,
    bpftool: &Bpftool,
    pid: u32,
    window: Duration,
    frequency: u32,
) -> anyhow::Result<(Option<f64>, f64)> {
    let child = Command::new(agent)
        .args(["record", "--format", "folded", "-o", "/dev/null"])
        .args(["--pid", &pid.to_string(), "-F", &frequency.to_string()])
        // Stopped with SIGINT after the window; the duration is only a backstop.
        .args(["-d", &format!("{}s", window.as_secs() + 60)])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("run profiler-agent record")?;
    let record = child.id();
    let measured = (|| {
        let prog = retry(|| bpftool.find_prog(record, Some(names::ON_CPU_SAMPLE)))?;
        let prog = crate::bpf_stats::Prog::open(prog)?;
        std::thread::sleep(RECORD_WARMUP);
        let before = prog.stats()?;
        std::thread::sleep(window);
        let after = prog.stats()?;
        after
            .us_per_run_since(&before)
            .context("the sampler did not run in the window")
    })();
    let _ = signal(record, libc::SIGINT);
    let output = child.wait_with_output().context("wait for record")?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        bail!("profiler-agent record failed: {stderr}");
    }
    Ok((parse_ns_per_attempt(&stderr), measured?))
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
        use std::io::{BufRead as _, BufReader};
        let mut child = Command::new(binary)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("start {}", binary.display()))?;
        let stdout = child.stdout.take().context("fixture stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let pid = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(pid) = line.strip_prefix("ready ") {
                        break pid.trim().parse().context("ready <pid>")?;
                    }
                }
                _ => {
                    let _ = child.kill();
                    bail!("{} exited before it was ready", binary.display());
                }
            }
        };
        // Keep draining stdout so the fixture never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Ok(Self { child, pid })
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
    use super::{Budget, ContextCost, Language, render};

    #[test]
    fn go_targets_are_judged_against_the_go_floor() {
        let cost = |target: &str, read_ns: Vec<f64>, ebpf_us: Vec<f64>, budget| ContextCost {
            target: target.into(),
            read_ns,
            ebpf_us,
            budget,
        };
        let table = render(&[
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
        ]);
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
}
