//! `/metrics` in the Prometheus text exposition format (0.0.4). Every counter is exposed
//! under its own name (`profiler_agent_<name>_total`, `profiler_kernel_<name>_total`), and the
//! ones people alert on are also grouped into labelled families: samples by stage, drops by
//! reason, context-read outcomes by source, store writes and deletions, store size.

use std::{collections::BTreeMap, fmt::Write as _};

use crate::{ebpf::KernelCounters, store::StoreStats};
use profiler_common::Counter;

/// One metric family being written.
struct Family<'a> {
    out: &'a mut String,
    name: String,
}

impl<'a> Family<'a> {
    fn new(out: &'a mut String, name: &str, kind: &str, help: &str) -> Self {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        Self {
            out,
            name: name.to_owned(),
        }
    }

    fn sample(&mut self, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        let _ = write!(self.out, "{}", self.name);
        if !labels.is_empty() {
            let text: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape_label(v)))
                .collect();
            let _ = write!(self.out, "{{{}}}", text.join(","));
        }
        let _ = writeln!(self.out, " {value}");
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

/// Metric names allow `[a-zA-Z0-9_:]`; counter names are snake_case already, but be safe.
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

pub fn render(
    agent: &BTreeMap<String, u64>,
    kernel: &KernelCounters,
    store: Option<&StoreStats>,
) -> String {
    let mut out = String::new();
    let a = |name: &str| agent.get(name).copied().unwrap_or(0);
    let k = |c: Counter| kernel.get(c);

    let mut f = Family::new(
        &mut out,
        "profiler_samples_total",
        "counter",
        "Samples by stage: emitted by the kernel, aggregated by the agent, attributed to a \
         (sampled) trace.",
    );
    f.sample(&[("stage", "emitted")], k(Counter::SamplesEmitted));
    f.sample(&[("stage", "aggregated")], a("samples_aggregated"));
    f.sample(&[("stage", "traced")], a("samples_traced"));

    let mut f = Family::new(
        &mut out,
        "profiler_drops_total",
        "counter",
        "Records lost, by reason (kernel ring buffer, agent queues, decoding, store).",
    );
    f.sample(&[("reason", "ringbuf_full")], k(Counter::RingBufferFull));
    f.sample(
        &[("reason", "ringbuf_full_process_event")],
        k(Counter::ProcessEventsLost),
    );
    for (name, value) in agent {
        if let Some(reason) = name.strip_prefix("records_dropped_") {
            f.sample(&[("reason", reason)], *value);
        } else if let Some(reason) = name.strip_prefix("store_dropped_") {
            f.sample(&[("reason", &format!("store_{reason}"))], *value);
        }
    }
    f.sample(
        &[("reason", "store_write_error")],
        a("store_records_lost_write_error"),
    );

    let mut f = Family::new(
        &mut out,
        "profiler_context_reads_total",
        "counter",
        "Trace contexts the agent decoded, by source (thread_context = OTEP 4947, \
         custom_labels, obi) and outcome.",
    );
    for source in ["thread_context", "custom_labels", "obi"] {
        for outcome in ["decoded", "empty", "invalid"] {
            f.sample(
                &[("source", source), ("outcome", outcome)],
                a(&format!("context_{outcome}_{source}")),
            );
        }
    }

    let mut f = Family::new(
        &mut out,
        "profiler_kernel_context_reads_total",
        "counter",
        "Outcomes of the kernel's context reads (every source).",
    );
    for (outcome, counter) in [
        ("read", Counter::ContextRead),
        ("none_active", Counter::ContextNoneActive),
        ("no_source", Counter::ContextNoSource),
        ("invalid", Counter::ContextInvalid),
        ("read_fault", Counter::ContextReadFault),
        ("tls_unallocated", Counter::ContextTlsUnallocated),
        ("thread_pointer_fault", Counter::ContextThreadPointerFault),
        ("attrs_fault", Counter::ContextAttrsFault),
        ("obi", Counter::ContextObi),
    ] {
        f.sample(&[("outcome", outcome)], k(counter));
    }

    let mut f = Family::new(
        &mut out,
        "profiler_export_total",
        "counter",
        "Profiles handed to outputs, by sink and result.",
    );
    f.sample(
        &[("sink", "store"), ("kind", "trace"), ("result", "ok")],
        a("store_traces_written"),
    );
    f.sample(
        &[("sink", "store"), ("kind", "bucket"), ("result", "ok")],
        a("store_buckets_written"),
    );
    f.sample(
        &[("sink", "store"), ("kind", "batch"), ("result", "error")],
        a("store_write_errors"),
    );

    let mut f = Family::new(
        &mut out,
        "profiler_store_deleted_total",
        "counter",
        "Rows retention deleted from the store, by kind and reason (age, size).",
    );
    for kind in ["traces", "buckets"] {
        for reason in ["age", "size"] {
            f.sample(
                &[("kind", kind), ("reason", reason)],
                a(&format!("store_deleted_{kind}_{reason}")),
            );
        }
    }

    if let Some(s) = store {
        let gauges = [
            (
                "profiler_store_bytes",
                "Bytes the store file and its write-ahead log take on disk.",
                s.file_bytes,
            ),
            (
                "profiler_store_profile_bytes",
                "Bytes of the stored profiles (pprof, gzip-compressed unless small).",
                s.profile_bytes,
            ),
            ("profiler_store_traces", "Traces in the store.", s.traces),
            (
                "profiler_store_buckets",
                "Per-process time buckets in the store.",
                s.buckets,
            ),
        ];
        for (name, help, value) in gauges {
            Family::new(&mut out, name, "gauge", help).sample(&[], value);
        }
    }

    let mut f = Family::new(
        &mut out,
        "profiler_symbolize_seconds_total",
        "counter",
        "CPU time (user + system) the agent spent naming frames it had not named before \
         (symbol tables, DWARF, perf maps, kallsyms), by target. Frames already named cost a \
         cache look-up and are not counted; profiler_agent_frames_symbolized_total and \
         profiler_agent_frames_unsymbolized_total count the frames.",
    );
    for target in ["user", "kernel"] {
        f.sample(
            &[("target", target)],
            a(&format!("symbolize_{target}_ns")) as f64 / 1e9,
        );
    }

    let mut f = Family::new(
        &mut out,
        "profiler_ebpf_program_run_seconds_total",
        "counter",
        "Kernel time in each of the agent's eBPF programs (the kernel's bpf_stats: zero while \
         they are off; see --bpf-stats). A label reader entered by a tail call counts in \
         on_cpu_sample.",
    );
    for p in &kernel.programs {
        f.sample(&[("program", &p.program)], p.run_time.as_secs_f64());
    }
    let mut f = Family::new(
        &mut out,
        "profiler_ebpf_program_runs_total",
        "counter",
        "Runs of each of the agent's eBPF programs (bpf_stats, as above).",
    );
    for p in &kernel.programs {
        f.sample(&[("program", &p.program)], p.runs);
    }

    for c in Counter::ALL {
        let name = format!("profiler_kernel_{}_total", sanitize(c.name()));
        Family::new(
            &mut out,
            &name,
            "counter",
            "Kernel-side counter (COUNTERS map).",
        )
        .sample(&[], k(*c));
    }
    for (name, value) in agent {
        let name = format!("profiler_agent_{}_total", sanitize(name));
        Family::new(&mut out, &name, "counter", "Agent-side counter.").sample(&[], *value);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_have_help_and_type_and_valid_lines() {
        let mut agent = BTreeMap::new();
        agent.insert("records_dropped_queue_full".to_owned(), 3);
        agent.insert("store_deleted_traces_size".to_owned(), 7);
        agent.insert("context_decoded_thread_context".to_owned(), 11);
        agent.insert("symbolize_user_ns".to_owned(), 1_500_000);
        let mut kernel = KernelCounters::default();
        kernel.counters.insert(Counter::SamplesEmitted.name(), 100);
        kernel.programs.push(crate::ebpf::ProgramRuns {
            program: "on_cpu_sample".to_owned(),
            run_time: std::time::Duration::from_micros(2500),
            runs: 1000,
        });
        let stats = StoreStats {
            traces: 2,
            buckets: 1,
            profile_bytes: 10,
            file_bytes: 4096,
        };
        let text = render(&agent, &kernel, Some(&stats));
        assert!(text.contains("profiler_samples_total{stage=\"emitted\"} 100\n"));
        assert!(text.contains("profiler_drops_total{reason=\"queue_full\"} 3\n"));
        assert!(text.contains(
            "profiler_context_reads_total{source=\"thread_context\",outcome=\"decoded\"} 11\n"
        ));
        assert!(text.contains("profiler_store_deleted_total{kind=\"traces\",reason=\"size\"} 7\n"));
        assert!(text.contains("profiler_store_bytes 4096\n"));
        assert!(text.contains(
            "profiler_ebpf_program_run_seconds_total{program=\"on_cpu_sample\"} 0.0025\n"
        ));
        assert!(
            text.contains("profiler_ebpf_program_runs_total{program=\"on_cpu_sample\"} 1000\n")
        );
        assert!(text.contains("profiler_agent_records_dropped_queue_full_total 3\n"));
        assert!(text.contains("profiler_symbolize_seconds_total{target=\"user\"} 0.0015\n"));
        assert!(text.contains("profiler_symbolize_seconds_total{target=\"kernel\"} 0\n"));
        // Every sample line belongs to a family announced by HELP and TYPE lines.
        let mut declared = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                declared.insert(rest.split(' ').next().unwrap().to_owned());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                assert!(declared.contains(name), "{line}");
                assert!(
                    line.rsplit(' ').next().unwrap().parse::<f64>().is_ok(),
                    "{line}"
                );
            }
        }
    }
}
