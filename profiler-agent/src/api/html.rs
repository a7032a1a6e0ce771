//! The HTML pages: server-rendered, no JavaScript of their own (the flame graph SVG brings
//! inferno's), every stored string escaped.

use std::fmt::Write as _;

use axum::{
    http::header,
    response::{IntoResponse as _, Response},
};

use crate::{
    export::render::Top,
    query::format_time,
    store::{ProcessRow, ServiceRow, TraceSummary},
};

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}\
table{border-collapse:collapse;margin:.5em 0 1.5em}\
td,th{padding:.25em .8em;border-bottom:1px solid #ddd;text-align:left}\
td.n{text-align:right;font-variant-numeric:tabular-nums}\
code,.id{font-family:ui-monospace,monospace}\
input[name=id]{width:34ch;font-family:ui-monospace,monospace}\
img.flame{max-width:100%;border:1px solid #ddd}\
.muted{color:#777}";

/// A whole page around `body`.
pub fn page(title: &str, body: &str) -> Response {
    let html = format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>{}</title><style>{STYLE}</style></head><body>\n{body}\n\
         <p class=\"muted\">Rendered {}.</p></body></html>\n",
        escape(title),
        super::now_text()
    );
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response()
}

fn search_box(suffix: &str) -> String {
    // The token travels as a hidden field so that the search keeps working behind one.
    let token = suffix
        .strip_prefix("?access_token=")
        .map(|t| {
            format!(
                "<input type=\"hidden\" name=\"access_token\" value=\"{}\">",
                escape(&url_decode(t))
            )
        })
        .unwrap_or_default();
    format!(
        "<form action=\"/trace\" method=\"get\"><label>Trace id: <input name=\"id\" \
         placeholder=\"32 hex digits\" autofocus></label>{token} <button>Show</button></form>"
    )
}

/// The front page: search box, services of the last hour, recent traces.
pub fn index(
    traces: &[TraceSummary],
    services: &[ServiceRow],
    service: Option<&str>,
    suffix: &str,
) -> String {
    let amp = suffix.replacen('?', "&amp;", 1);
    let mut out = String::new();
    let _ = write!(
        out,
        "<h1>Per-trace CPU profiles</h1>\n{}\n",
        search_box(suffix)
    );
    let _ = writeln!(out, "<h2>Services (last hour)</h2>");
    if services.is_empty() {
        let _ = writeln!(
            out,
            "<p class=\"muted\">No samples stored in the last hour.</p>"
        );
    } else {
        let _ = writeln!(
            out,
            "<table><tr><th>service</th><th>samples</th><th>processes</th>\
             <th>last 10 minutes</th><th>traces</th></tr>"
        );
        for s in services {
            let name = url_encode(&s.service);
            let _ = writeln!(
                out,
                "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
                 <td><a href=\"/api/window/flamegraph.svg?service={name}&amp;since=10m{amp}\">\
                 flame graph</a> · <a href=\"/api/window/top?service={name}&amp;since=10m{amp}\">\
                 top</a></td><td><a href=\"/?service={name}{amp}\">traces</a></td></tr>",
                escape(&s.service),
                s.samples,
                s.processes
            );
        }
        let _ = writeln!(out, "</table>");
    }
    let heading = match service {
        Some(s) if !s.is_empty() => format!("Recent traces of {}", escape(s)),
        _ => "Recent traces".to_owned(),
    };
    let _ = writeln!(out, "<h2>{heading}</h2>");
    if traces.is_empty() {
        let _ = writeln!(
            out,
            "<p class=\"muted\">No traces stored yet. A trace appears a few seconds after \
             its last sample.</p>"
        );
        return out;
    }
    let _ = writeln!(
        out,
        "<table id=\"traces\"><tr><th>trace id</th><th>services</th><th>samples</th>\
         <th>CPU</th><th>duration</th><th>last sample (UTC)</th><th>views</th></tr>"
    );
    for t in traces {
        let id = t.trace_id_hex();
        let _ = writeln!(
            out,
            "<tr><td class=\"id\"><a href=\"/traces/{id}{suffix}\">{id}</a></td><td>{}</td>\
             <td class=\"n\">{}</td><td class=\"n\">{:.2} s</td><td class=\"n\">{:.2} s</td>\
             <td>{}</td><td><a href=\"/api/traces/{id}/flamegraph.svg{suffix}\">flame graph</a> \
             · <a href=\"/api/traces/{id}/profile.pb.gz{suffix}\">pprof</a> · \
             <a href=\"/api/traces/{id}/folded{suffix}\">folded</a></td></tr>",
            escape(&t.services.join(", ")),
            t.samples,
            t.cpu_ns as f64 / 1e9,
            t.duration_ns() as f64 / 1e9,
            format_time(t.last_unix_ns)
        );
    }
    let _ = writeln!(out, "</table>");
    out
}

/// One trace: summary, processes, top functions, the flame graph.
pub fn trace(
    t: &TraceSummary,
    processes: &[ProcessRow],
    spans: &[String],
    top: &Top,
    suffix: &str,
) -> String {
    let id = t.trace_id_hex();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "<p><a href=\"/{suffix}\">← all traces</a></p>\n<h1>Trace <span class=\"id\">{id}</span></h1>"
    );
    let _ = writeln!(
        out,
        "<p>{} samples, {:.2} s CPU, from {} to {} ({:.2} s); {} span(s)</p>",
        t.samples,
        t.cpu_ns as f64 / 1e9,
        format_time(t.first_unix_ns),
        format_time(t.last_unix_ns),
        t.duration_ns() as f64 / 1e9,
        spans.len()
    );
    let _ = writeln!(
        out,
        "<p><a href=\"/api/traces/{id}/flamegraph.svg{suffix}\">flame graph (SVG)</a> · \
         <a href=\"/api/traces/{id}/profile.pb.gz{suffix}\">pprof</a> · \
         <a href=\"/api/traces/{id}/folded{suffix}\">folded</a> · \
         <a href=\"/api/traces/{id}/top{suffix}\">top</a> · \
         <code>go tool pprof -http : {id}.pb.gz</code></p>"
    );
    let _ = writeln!(
        out,
        "<table><tr><th>pid</th><th>process</th><th>service</th></tr>"
    );
    for p in processes {
        let _ = writeln!(
            out,
            "<tr><td class=\"n\">{}</td><td>{}</td><td>{}</td></tr>",
            p.pid,
            escape(&p.process_name),
            escape(&p.service)
        );
    }
    let _ = writeln!(out, "</table>\n<h2>Top functions</h2>");
    let _ = writeln!(
        out,
        "<table id=\"top\"><tr><th>flat</th><th>flat%</th><th>cum</th><th>cum%</th>\
         <th>function</th></tr>"
    );
    let total = top.total_samples.max(1) as f64;
    for row in top.rows.iter().take(top.limit) {
        let _ = writeln!(
            out,
            "<tr><td class=\"n\">{}</td><td class=\"n\">{:.1}%</td><td class=\"n\">{}</td>\
             <td class=\"n\">{:.1}%</td><td><code>{}</code></td></tr>",
            row.flat,
            100.0 * row.flat as f64 / total,
            row.cum,
            100.0 * row.cum as f64 / total,
            escape(&row.function)
        );
    }
    let _ = writeln!(
        out,
        "</table>\n<h2>Flame graph</h2>\n<img class=\"flame\" alt=\"flame graph of trace {id}\" \
         src=\"/api/traces/{id}/flamegraph.svg{suffix}\">"
    );
    out
}

/// Escapes text for HTML content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes everything but unreserved characters (RFC 3986).
pub fn url_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn url_decode(text: &str) -> String {
    percent_encoding::percent_decode_str(text)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_and_encoding() {
        assert_eq!(
            escape("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        assert_eq!(url_encode("a b/ü"), "a%20b%2F%C3%BC");
        assert_eq!(url_decode(&url_encode("a b/ü?&=")), "a b/ü?&=");
    }
}
