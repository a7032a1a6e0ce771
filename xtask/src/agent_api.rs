//! Ours' own `/metrics`, read by the bench just before and just after each of ours' windows (so
//! the agent answers outside them): how much of its CPU went to naming frames for the first
//! time, the cost that makes a round of ours stand out.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{Context, bail};

const TIMEOUT: Duration = Duration::from_secs(5);

/// The API address from the agent's `query API listening url=http://127.0.0.1:PORT/` log line.
pub(crate) fn api_address(line: &str) -> Option<SocketAddr> {
    if !line.contains("query API listening") {
        return None;
    }
    let url = line.split("url=http://").nth(1)?;
    url.split(['/', ' ']).next()?.parse().ok()
}

/// `GET /metrics` over plain HTTP/1.1.
pub(crate) fn scrape(address: SocketAddr) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect_timeout(&address, TIMEOUT)
        .with_context(|| format!("connect to the agent's API at {address}"))?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .context("read the agent's /metrics")?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("the agent's /metrics answer has no header end")?;
    let status = head.lines().next().unwrap_or("");
    if status.split(' ').nth(1) != Some("200") {
        bail!("the agent's /metrics answered {status:?}");
    }
    Ok(body.to_owned())
}

/// The sum of a family's samples (every label set) in Prometheus text; `None` when the family
/// has no sample.
pub(crate) fn family_sum(text: &str, family: &str) -> Option<f64> {
    let mut sum = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(family) else {
            continue;
        };
        // The family itself, not one whose name starts with it.
        if !rest.starts_with(['{', ' ']) {
            continue;
        }
        if let Some(value) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            *sum.get_or_insert(0.0) += value;
        }
    }
    sum
}

/// Seconds the agent has spent naming frames for the first time, user and kernel.
pub(crate) fn naming_seconds(address: SocketAddr) -> anyhow::Result<f64> {
    let text = scrape(address)?;
    family_sum(&text, "profiler_symbolize_seconds_total")
        .context("the agent's /metrics has no profiler_symbolize_seconds_total")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_address_from_the_log_line() {
        let line = "2026-12-03T14:09:18.270606Z  INFO profiler_agent::run: query API listening \
                    url=http://127.0.0.1:43287/";
        assert_eq!(api_address(line), Some("127.0.0.1:43287".parse().unwrap()));
        assert_eq!(api_address("profiling every process on this machine"), None);
        assert_eq!(
            api_address("query API listening url=http://nonsense/"),
            None
        );
    }

    #[test]
    fn sums_a_family_over_its_labels_only() {
        let text = "# HELP profiler_symbolize_seconds_total Time.\n\
                    # TYPE profiler_symbolize_seconds_total counter\n\
                    profiler_symbolize_seconds_total{target=\"user\"} 0.25\n\
                    profiler_symbolize_seconds_total{target=\"kernel\"} 0.0015\n\
                    profiler_symbolize_seconds_total_other 7\n";
        let sum = family_sum(text, "profiler_symbolize_seconds_total").unwrap();
        assert!((sum - 0.2515).abs() < 1e-12, "{sum}");
        assert_eq!(family_sum(text, "profiler_missing_total"), None);
    }
}
