//! OTLP profiles export (proto v1.10, `opentelemetry.proto.profiles.v1development`), over gRPC
//! or HTTP/protobuf.
//!
//! - `config`: settings from flags and the standard `OTEL_EXPORTER_OTLP_*` variables;
//! - `encode`: an interval's aggregate as requests (shared dictionary, one resource per
//!   process, links to traces), split to stay under the request size cap — pure;
//! - `transport`: the gRPC and HTTP clients and the OTLP retry classification;
//! - `queue`: the bounded byte queue and the delivery task (retries, drops, shutdown).
//!
//! [`OtlpSink`] runs on the collector thread: it symbolizes and encodes each interval there
//! (the symbolizer lives on that thread) and pushes the bytes into the queue without waiting;
//! the delivery task owns the network. Sampling never waits on it.

pub mod config;
pub mod encode;
pub mod queue;
pub mod transport;

use std::time::Duration;

use bytes::Bytes;

pub use config::{Compression, OtlpArgs, OtlpConfig, Protocol, RetryPolicy};
pub use queue::{Exporter, QueueHandle};

use crate::{
    collector::{Sink, SinkContext},
    metrics::Metrics,
    profile::{Aggregate, traces::TraceProfile},
};
use encode::{EncodeOptions, LiveSymbols, build_requests};

/// Starts the delivery task (on the current tokio runtime) and returns the sink that feeds
/// it, and the exporter to shut down at the end.
pub fn start(config: &OtlpConfig, metrics: Metrics) -> anyhow::Result<(OtlpSink, Exporter)> {
    let transport = transport::Transport::new(config)?;
    let (exporter, queue) =
        Exporter::spawn(transport, config.retry, config.queue_bytes, metrics.clone());
    let sink = OtlpSink {
        queue,
        host_name: host_name(),
        max_request_bytes: config.max_request_bytes,
        metrics,
    };
    Ok((sink, exporter))
}

/// This machine's name, for `host.name`.
fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
}

/// Sink: every interval's samples, traced or not, as OTLP requests on the export queue.
pub struct OtlpSink {
    queue: QueueHandle,
    host_name: Option<String>,
    max_request_bytes: usize,
    metrics: Metrics,
}

impl OtlpSink {
    /// Bytes waiting in the export queue.
    pub fn queued_bytes(&self) -> usize {
        self.queue.queued_bytes()
    }
}

impl Sink for OtlpSink {
    /// Traces are not exported on their own: each traced sample is already in its interval's
    /// profile with a link to its trace, which is how OTLP receivers select by trace.
    fn trace(&mut self, _trace: &TraceProfile, _cx: &mut SinkContext<'_>) {}

    fn interval(&mut self, aggregate: &Aggregate, window: (u64, u64), cx: &mut SinkContext<'_>) {
        if aggregate.total_samples == 0 {
            return;
        }
        let started = std::time::Instant::now();
        // One blazesym call per object instead of one per frame.
        cx.symbolizer
            .resolve(aggregate.frames().collect::<Vec<_>>(), cx.objects);
        let options = EncodeOptions {
            frequency_hz: cx.frequency_hz,
            window,
            host_name: self.host_name.clone(),
            max_request_bytes: self.max_request_bytes,
        };
        let mut symbols = LiveSymbols {
            symbolizer: cx.symbolizer,
            objects: cx.objects,
        };
        let requests = build_requests(aggregate, &options, &mut symbols);
        self.metrics.add(
            "otlp_requests_split",
            requests.len().saturating_sub(1) as u64,
        );
        for built in &requests {
            let body = Bytes::from(encode::encode(&built.request));
            if body.len() > self.max_request_bytes {
                // Only a single sample larger than the cap gets here.
                self.metrics.inc("otlp_requests_oversized");
            }
            self.queue.push(body, built.samples);
        }
        tracing::debug!(
            requests = requests.len(),
            samples = aggregate.total_samples,
            queue_bytes = self.queue.queued_bytes(),
            encode_time = ?started.elapsed(),
            "OTLP interval queued"
        );
    }
}

/// Defaults the command line shows.
pub const DEFAULT_QUEUE_BYTES: usize = 32 << 20;
/// 4 MiB is what default gRPC servers accept; the estimate is exact but leave room anyway.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = (4 << 20) - (64 << 10);
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests;
