//! Asking the store: the `query` and `traces` commands, and the parsing and rendering they
//! share with the HTTP API (trace ids, times, windows, output formats). Reads the database
//! directly (read-only; SQLite's WAL lets it run next to the writing agent), so it works
//! whether the agent runs or not.

use std::{
    io::{IsTerminal as _, Write},
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};

use crate::{
    context::{hex, parse_hex_array},
    export::{pprof, pprof_proto as pb, render::Stacks},
    store::{StoreReader, TraceFilter, TraceSummary, Window},
};

/// Where `run`, `query` and `traces` put and find the store unless told otherwise.
pub const DEFAULT_STORE: &str = "/var/lib/profiler/profiles.db";

/// A query's output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum View {
    /// Functions by self and cumulative samples, like `go tool pprof -top`.
    Top,
    /// gzip-compressed pprof (for `go tool pprof`, Pyroscope, speedscope).
    Pprof,
    /// Folded stacks, one line per stack (for flame graph tools).
    Folded,
    /// A flame graph (SVG, opens in a browser).
    Svg,
}

/// Why a trace id was refused (the API answers 400 with this message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TraceIdError {
    #[error("a trace id is 32 hex digits; got {0} characters")]
    Length(usize),
    #[error("a trace id is 32 hex digits; {0:?} is not hex")]
    NotHex(String),
    #[error("the all-zero trace id is invalid (W3C Trace Context)")]
    Zero,
}

/// Parses a trace id as users paste it: 32 hex digits, either case, surrounding blanks ignored.
pub fn parse_trace_id(text: &str) -> Result<[u8; 16], TraceIdError> {
    let text = text.trim();
    if text.chars().count() != 32 {
        return Err(TraceIdError::Length(text.chars().count()));
    }
    let id = parse_hex_array::<16>(text).ok_or_else(|| TraceIdError::NotHex(text.to_owned()))?;
    if id == [0; 16] {
        return Err(TraceIdError::Zero);
    }
    Ok(id)
}

/// Parses a span id (16 hex digits).
pub fn parse_span_id(text: &str) -> Result<[u8; 8], String> {
    parse_hex_array::<8>(text).ok_or_else(|| format!("a span id is 16 hex digits, not {text:?}"))
}

pub fn unix_ns(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// A point in time as a user writes it: RFC 3339 (`2026-05-01T14:05:00Z`; without a zone it
/// is UTC), `HH:MM[:SS]` (UTC, the most recent such time), or Unix seconds.
pub fn parse_time(text: &str, now: SystemTime) -> Result<u64, String> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        let secs: u64 = text.parse().map_err(|e| format!("{text:?}: {e}"))?;
        return Ok(secs.saturating_mul(1_000_000_000));
    }
    if let Some(ns) = parse_time_of_day(text, now) {
        return Ok(ns);
    }
    humantime::parse_rfc3339_weak(text)
        .map(unix_ns)
        .map_err(|e| {
            format!(
                "{text:?} is not a time ({e}): use RFC 3339 (2026-05-01T14:05:00Z), HH:MM[:SS] \
                 (UTC) or Unix seconds"
            )
        })
}

fn parse_time_of_day(text: &str, now: SystemTime) -> Option<u64> {
    let parts: Vec<&str> = text.split(':').collect();
    if !(2..=3).contains(&parts.len()) || parts.iter().any(|p| p.is_empty() || p.len() > 2) {
        return None;
    }
    let field = |i: usize, max: u64| -> Option<u64> {
        let v: u64 = parts.get(i).map_or(Some(0), |p| p.parse().ok())?;
        (v < max).then_some(v)
    };
    let secs_of_day = field(0, 24)? * 3600 + field(1, 60)? * 60 + field(2, 60)?;
    let now_secs = unix_ns(now) / 1_000_000_000;
    let mut t = now_secs - now_secs % 86_400 + secs_of_day;
    if t > now_secs {
        t -= 86_400;
    }
    Some(t * 1_000_000_000)
}

/// The window of a time-window query: `from` (+ `to`, or + `duration`, default one minute),
/// or the last `since` (default 10 minutes).
pub fn resolve_window(
    from: Option<&str>,
    to: Option<&str>,
    since: Option<Duration>,
    duration: Option<Duration>,
    now: SystemTime,
) -> Result<(u64, u64), String> {
    let now_ns = unix_ns(now);
    let (from_ns, to_ns) = match (from, since) {
        (Some(_), Some(_)) => return Err("give either a start time or --since, not both".into()),
        (Some(from), None) => {
            let from_ns = parse_time(from, now)?;
            let to_ns = match (to, duration) {
                (Some(to), _) => parse_time(to, now)?,
                (None, d) => from_ns + d.unwrap_or(Duration::from_secs(60)).as_nanos() as u64,
            };
            (from_ns, to_ns)
        }
        (None, since) => {
            let since = since.unwrap_or(Duration::from_secs(600));
            (now_ns.saturating_sub(since.as_nanos() as u64), now_ns)
        }
    };
    if to_ns <= from_ns {
        return Err("the window ends before it starts".into());
    }
    Ok((from_ns, to_ns))
}

/// UTC, to the second: `2026-05-01T14:05:03Z`.
pub fn format_time(unix_ns: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_nanos(unix_ns)).to_string()
}

/// Writes `profile` as `view`. `raw` is the profile's stored pprof bytes when there are any
/// (written gzip-compressed for [`View::Pprof`], as they are if they already are).
pub fn write_view(
    view: View,
    profile: &pb::Profile,
    raw: Option<&[u8]>,
    title: &str,
    top_rows: usize,
    w: &mut dyn Write,
) -> std::io::Result<()> {
    match view {
        View::Pprof => match raw {
            Some(bytes) => w.write_all(&pprof::ensure_gzip(bytes)),
            None => w.write_all(&pprof::encode_gzip(profile)),
        },
        View::Folded => Stacks::of(profile).write_folded(w),
        View::Top => write!(w, "{}", Stacks::of(profile).top().limit(top_rows)),
        View::Svg => Stacks::of(profile).write_svg(title, w),
    }
}

/// `profiler-agent query`.
#[derive(Debug, Clone)]
pub struct QueryOptions {
    pub store: PathBuf,
    pub trace_id: Option<String>,
    pub service: Option<String>,
    pub pid: Option<u32>,
    /// Kubernetes namespace and pod name of the window's processes.
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub since: Option<Duration>,
    pub duration: Option<Duration>,
    pub view: View,
    pub output: Option<PathBuf>,
    pub top_rows: usize,
}

pub fn query(o: &QueryOptions) -> anyhow::Result<()> {
    let reader = StoreReader::open(&o.store)?;
    let now = SystemTime::now();
    let (profile, raw, title, summary) = match &o.trace_id {
        Some(text) => {
            let id = parse_trace_id(text)?;
            let trace = reader.trace(&id)?;
            let raw = reader.trace_pprof(&id)?;
            let profile = pprof::decode(&raw).context("decode the stored profile")?;
            let title = trace_title(&trace);
            let summary = format!(
                "trace {}: {} samples ({:.2} s CPU) over {}, {}",
                trace.trace_id_hex(),
                trace.samples,
                trace.cpu_ns as f64 / 1e9,
                humantime::format_duration(Duration::from_millis(trace.duration_ns() / 1_000_000)),
                trace.services.join(", ")
            );
            (profile, Some(raw), title, summary)
        }
        None => {
            let (from_ns, to_ns) =
                resolve_window(o.from.as_deref(), o.to.as_deref(), o.since, o.duration, now)
                    .map_err(anyhow::Error::msg)?;
            let window = Window {
                service: o.service.clone(),
                pid: o.pid,
                namespace: o.namespace.clone(),
                pod: o.pod.clone(),
                from_ns,
                to_ns,
            };
            let (profile, covered) = reader.window_profile(&window)?;
            let title = window_title(&window, covered);
            (profile, None, title.clone(), title)
        }
    };
    let mut out: Box<dyn Write> = match &o.output {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?,
        )),
        None => {
            if matches!(o.view, View::Pprof) && std::io::stdout().is_terminal() {
                bail!("pprof is binary: pass --output FILE (or redirect stdout)");
            }
            Box::new(std::io::stdout().lock())
        }
    };
    if o.output.is_none() && o.view == View::Top {
        writeln!(out, "{summary}")?;
    }
    write_view(
        o.view,
        &profile,
        raw.as_deref(),
        &title,
        o.top_rows,
        &mut out,
    )?;
    out.flush()?;
    if let Some(path) = &o.output {
        eprintln!("{summary}\nwrote {}", path.display());
    }
    Ok(())
}

pub fn trace_title(trace: &TraceSummary) -> String {
    format!(
        "trace {} ({}, {} samples)",
        trace.trace_id_hex(),
        trace.services.join(", "),
        trace.samples
    )
}

pub fn window_title(window: &Window, covered: (u64, u64)) -> String {
    let what = window
        .subject()
        .unwrap_or_else(|| "every process".to_owned());
    format!(
        "{what}, {} to {} (buckets {} to {})",
        format_time(window.from_ns),
        format_time(window.to_ns),
        format_time(covered.0),
        format_time(covered.1)
    )
}

/// `profiler-agent traces`.
#[derive(Debug, Clone)]
pub struct TracesOptions {
    pub store: PathBuf,
    pub service: Option<String>,
    pub pid: Option<u32>,
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub span_id: Option<String>,
    pub since: Option<Duration>,
    pub limit: usize,
    pub json: bool,
}

pub fn traces(o: &TracesOptions) -> anyhow::Result<()> {
    let reader = StoreReader::open(&o.store)?;
    let filter = TraceFilter {
        service: o.service.clone(),
        pid: o.pid,
        namespace: o.namespace.clone(),
        pod: o.pod.clone(),
        span_id: o
            .span_id
            .as_deref()
            .map(parse_span_id)
            .transpose()
            .map_err(anyhow::Error::msg)?,
        since_ns: o
            .since
            .map(|s| unix_ns(SystemTime::now()).saturating_sub(s.as_nanos() as u64)),
        limit: o.limit,
    };
    let traces = reader.traces(&filter)?;
    let mut out = std::io::stdout().lock();
    if o.json {
        serde_json::to_writer_pretty(&mut out, &traces)?;
        writeln!(out)?;
        return Ok(());
    }
    write_trace_table(&traces, &mut out)?;
    if traces.is_empty() {
        eprintln!("no traces match (store {})", o.store.display());
    }
    Ok(())
}

fn write_trace_table(traces: &[TraceSummary], w: &mut impl Write) -> std::io::Result<()> {
    writeln!(
        w,
        "{:<32}  {:>7}  {:>8}  {:>9}  {:<20}  SERVICES",
        "TRACE ID", "SAMPLES", "CPU", "DURATION", "LAST SAMPLE (UTC)"
    )?;
    for t in traces {
        writeln!(
            w,
            "{:<32}  {:>7}  {:>7.2}s  {:>8.2}s  {:<20}  {}",
            t.trace_id_hex(),
            t.samples,
            t.cpu_ns as f64 / 1e9,
            t.duration_ns() as f64 / 1e9,
            format_time(t.last_unix_ns),
            t.services.join(",")
        )?;
    }
    Ok(())
}

/// The query command line for a trace, as the agent prints it (shell-quoted store path).
pub fn query_command(store: &Path, trace_id: Option<&[u8; 16]>) -> String {
    let id = trace_id.map_or_else(|| "<trace id>".to_owned(), |id| hex(id));
    let store = store.display().to_string();
    let store_arg = if store == DEFAULT_STORE {
        String::new()
    } else {
        format!(" --store '{}'", store.replace('\'', r"'\''"))
    };
    format!("profiler-agent query{store_arg} --trace-id {id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_ids() {
        let id = parse_trace_id(" AAAAAAAAAAAAAAAAAAAAAAAAAAAAAA01 ").unwrap();
        assert_eq!(id[0], 0xaa);
        assert_eq!(id[15], 1);
        assert_eq!(parse_trace_id("abc"), Err(TraceIdError::Length(3)));
        assert!(matches!(
            parse_trace_id(&"g".repeat(32)),
            Err(TraceIdError::NotHex(_))
        ));
        assert_eq!(parse_trace_id(&"0".repeat(32)), Err(TraceIdError::Zero));
        // Multi-byte characters are counted as characters, never sliced.
        assert_eq!(
            parse_trace_id(&"é".repeat(16)),
            Err(TraceIdError::Length(16))
        );
        assert!(matches!(
            parse_trace_id(&"é".repeat(32)),
            Err(TraceIdError::NotHex(_))
        ));
    }

    #[test]
    fn times_and_windows() {
        // 2026-05-01T14:07:30Z
        let now = UNIX_EPOCH + Duration::from_secs(1_777_644_450);
        let at_1405 = 1_777_644_300 * 1_000_000_000;
        assert_eq!(parse_time("2026-05-01T14:05:00Z", now), Ok(at_1405));
        assert_eq!(parse_time("2026-05-01 14:05:00", now), Ok(at_1405));
        assert_eq!(parse_time("14:05", now), Ok(at_1405));
        assert_eq!(parse_time("1777644300", now), Ok(at_1405));
        // A time of day later than now is yesterday's.
        assert_eq!(
            parse_time("23:00", now),
            Ok((1_777_644_450 - 1_777_644_450 % 86_400 - 3600) * 1_000_000_000)
        );
        assert!(parse_time("25:00", now).is_err());
        assert!(parse_time("soon", now).is_err());
        assert_eq!(
            resolve_window(Some("14:05"), None, None, None, now),
            Ok((at_1405, at_1405 + 60_000_000_000))
        );
        let now_ns = unix_ns(now);
        assert_eq!(
            resolve_window(None, None, Some(Duration::from_secs(10)), None, now),
            Ok((now_ns - 10_000_000_000, now_ns))
        );
        assert!(resolve_window(Some("14:05"), Some("14:00"), None, None, now).is_err());
        assert!(
            resolve_window(Some("14:05"), None, Some(Duration::from_secs(1)), None, now).is_err()
        );
        assert_eq!(format_time(at_1405), "2026-05-01T14:05:00Z");
    }

    #[test]
    fn query_command_quotes_the_store() {
        assert_eq!(
            query_command(Path::new(DEFAULT_STORE), None),
            "profiler-agent query --trace-id <trace id>"
        );
        assert_eq!(
            query_command(Path::new("/tmp/it's.db"), Some(&[0xab; 16])),
            format!(
                "profiler-agent query --store '/tmp/it'\\''s.db' --trace-id {}",
                "ab".repeat(16)
            )
        );
    }
}
