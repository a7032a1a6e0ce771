//! The cost of reading a sampled thread's trace context, isolated from the rest of the sample:
//! the kernel times each read of a process's own context source (`context_read_ns` /
//! `context_read_attempts`, reported by `record`), against real writers: an OTEP 4947 thread
//! context (C, TLSDESC relaxed to local-exec) and Go pprof labels in both runtime layouts
//! (Go 1.19 hash map, Go ≥ 1.24 sorted slice).

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};

/// Budget for the OTEP 4947 read (the three dependent reads cost about 1 µs here).
const BUDGET_THREAD_CONTEXT_NS: f64 = 1500.0;
/// Budget for a Go labels read: the issue allows Go targets the native floor plus 3 µs per
/// sample, and the read is what a Go target adds.
const BUDGET_GO_LABELS_NS: f64 = 3000.0;

pub struct ContextCost {
    pub target: String,
    /// ns per read attempt, one value per window.
    pub windows: Vec<f64>,
    pub budget_ns: Option<f64>,
}

/// Measures every target over `windows` windows of `window` each.
pub fn measure(
    root: &Path,
    agent: &Path,
    out_dir: &Path,
    windows: u32,
    window: Duration,
    frequency: u32,
) -> anyhow::Result<Vec<ContextCost>> {
    let targets = [
        (
            "OTEP 4947 thread context (C)",
            build_thread_context(root, out_dir)?,
            Some(BUDGET_THREAD_CONTEXT_NS),
        ),
        (
            "Go 1.19 pprof labels (map)",
            build_go(root, out_dir, "/usr/lib/go-1.19".into(), "1.19")?,
            Some(BUDGET_GO_LABELS_NS),
        ),
        (
            "Go 1.24 pprof labels (slice)",
            build_go(root, out_dir, go_bin(root, "1.24")?, "1.24")?,
            Some(BUDGET_GO_LABELS_NS),
        ),
    ];
    let mut costs = Vec::new();
    for (target, binary, budget_ns) in targets {
        crate::bench::progress(&format!("context read cost: {target}"));
        let fixture = Started::start(&binary)?;
        let mut values = Vec::new();
        for _ in 0..windows {
            values.push(one_window(agent, fixture.pid, window, frequency)?);
        }
        costs.push(ContextCost {
            target: target.to_owned(),
            windows: values,
            budget_ns,
        });
    }
    Ok(costs)
}

pub fn render(costs: &[ContextCost]) -> String {
    let mut out = String::from(
        "\n### Trace-context read cost (kernel, per read attempt)\n\n\
         | target | ns per read, median [min–max] | windows | budget |\n|---|---|---|---|\n",
    );
    for c in costs {
        let mut v = c.windows.clone();
        v.sort_by(f64::total_cmp);
        let median = v[v.len() / 2];
        let verdict = match c.budget_ns {
            Some(b) if median <= b => format!("≤ {b:.0} ns: PASS"),
            Some(b) => format!("≤ {b:.0} ns: MISS by {:.0} ns", median - b),
            None => "reported".into(),
        };
        let _ = writeln!(
            out,
            "| {} | {median:.0} [{:.0}–{:.0}] | {} | {verdict} |",
            c.target,
            v[0],
            v[v.len() - 1],
            v.len()
        );
    }
    out
}

fn one_window(agent: &Path, pid: u32, window: Duration, frequency: u32) -> anyhow::Result<f64> {
    let output = Command::new(agent)
        .args([
            "record",
            "--format",
            "folded",
            "-o",
            "/dev/null",
            "--pid",
            &pid.to_string(),
        ])
        .args([
            "-F",
            &frequency.to_string(),
            "-d",
            &format!("{}ms", window.as_millis()),
        ])
        .output()
        .context("run profiler-agent record")?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        bail!("profiler-agent record failed: {stderr}");
    }
    parse_ns_per_attempt(&stderr).with_context(|| format!("no context line in:\n{stderr}"))
}

/// `context: … , 1234 ns per attempt, …` from `record`'s summary.
fn parse_ns_per_attempt(stderr: &str) -> Option<f64> {
    let line = stderr.lines().find(|l| l.starts_with("context: "))?;
    let before = line.split(" ns per attempt").next()?;
    before.rsplit(' ').next()?.parse().ok()
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
    fn start(binary: &Path) -> anyhow::Result<Self> {
        use std::io::{BufRead as _, BufReader};
        let mut child = Command::new(binary)
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
    #[test]
    fn parses_the_summary_line() {
        let stderr = "wrote x\ncontext: 640 read attempts, 630 read, 5 none active, 0 invalid, 0 faults, 1234 ns per attempt, 629 samples traced\n";
        assert_eq!(super::parse_ns_per_attempt(stderr), Some(1234.0));
        assert_eq!(super::parse_ns_per_attempt("nothing"), None);
    }
}
