//! Drains the ring buffer. The kernel side submits samples without waking us, so the reader
//! drains on a short tick, and also whenever the kernel does signal (process events wake it).

use std::time::Duration;

use aya::maps::{MapData, RingBuf};
use tokio::{io::unix::AsyncFd, sync::mpsc, task::JoinHandle};

use super::decode::{Record, decode};
use crate::metrics::Metrics;

/// How often the ring buffer is drained when nothing wakes the reader.
const DRAIN_INTERVAL: Duration = Duration::from_millis(50);

/// Spawns the drain task. It stops when `records` is closed or `stop` fires, after a last drain.
pub fn spawn_reader<T: From<Record> + Send + 'static>(
    ring: RingBuf<MapData>,
    records: mpsc::Sender<T>,
    metrics: Metrics,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> JoinHandle<anyhow::Result<()>> {
    tokio::spawn(async move {
        // SAFETY: the ring buffer owns its map fd, and the AsyncFd owns the ring buffer until the
        // task ends: the fd is neither closed nor replaced while registered.
        let mut fd = unsafe { AsyncFd::register(ring)? };
        let mut tick = tokio::time::interval(DRAIN_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                guard = fd.readable_mut() => { guard?.clear_ready(); }
                _ = stop.changed() => {
                    drain(fd.get_mut(), &records, &metrics);
                    return Ok(());
                }
            }
            if !drain(fd.get_mut(), &records, &metrics) {
                return Ok(());
            }
        }
    })
}

/// Returns false when the consumer is gone.
fn drain<T: From<Record>>(
    ring: &mut RingBuf<MapData>,
    records: &mpsc::Sender<T>,
    metrics: &Metrics,
) -> bool {
    let mut received = 0;
    while let Some(item) = ring.next() {
        received += 1;
        match decode(&item) {
            Ok(record) => match records.try_send(record.into()) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    metrics.inc("records_dropped_queue_full")
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
            },
            Err(e) => {
                metrics.inc(&format!("records_dropped_decode_{}", e.reason()));
                tracing::debug!(error = %e, "undecodable ring-buffer record");
            }
        }
    }
    metrics.add("records_received", received);
    true
}
