//! The agent's own counters: every drop and every failed read has a name here (and a few
//! gauges, such as the OTLP export queue's size and its high-water mark). Kernel-side
//! counters live in the eBPF `COUNTERS` map and are merged in when reported.
//!
//! Counters are incremented from several components, so this is the one piece of shared state:
//! a mutex around a small map, touched only on rare events or in batches.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

#[derive(Clone, Default)]
pub struct Metrics {
    counters: Arc<Mutex<BTreeMap<String, u64>>>,
}

impl Metrics {
    pub fn add(&self, name: &str, n: u64) {
        if n == 0 {
            return;
        }
        let mut counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        match counters.get_mut(name) {
            Some(v) => *v += n,
            None => {
                counters.insert(name.to_owned(), n);
            }
        }
    }

    pub fn inc(&self, name: &str) {
        self.add(name, 1);
    }

    /// Sets a gauge (a value that goes down as well as up, such as a queue's size).
    pub fn set(&self, name: &str, value: u64) {
        let mut counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        match counters.get_mut(name) {
            Some(v) => *v = value,
            None => {
                counters.insert(name.to_owned(), value);
            }
        }
    }

    /// Raises a high-water mark to `value` if it is higher.
    pub fn max(&self, name: &str, value: u64) {
        let mut counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        let v = counters.entry(name.to_owned()).or_insert(0);
        *v = (*v).max(value);
    }

    pub fn get(&self, name: &str) -> u64 {
        self.counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .copied()
            .unwrap_or(0)
    }

    /// Adds what `batch` counted, under one lock, and empties it.
    pub fn add_batch(&self, batch: &mut CounterBatch) {
        if batch.counts.is_empty() {
            return;
        }
        let mut counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        for (name, n) in batch.counts.drain(..) {
            match counters.get_mut(name) {
                Some(v) => *v += n,
                None => {
                    counters.insert(name.to_owned(), n);
                }
            }
        }
    }

    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Counts gathered by one owner and handed to [`Metrics`] in one lock
/// ([`Metrics::add_batch`]): for per-sample paths, where a lock and a map lookup per count cost
/// more than the work being counted.
#[derive(Default)]
pub struct CounterBatch {
    counts: Vec<(&'static str, u64)>,
}

impl CounterBatch {
    pub fn add(&mut self, name: &'static str, n: u64) {
        if n == 0 {
            return;
        }
        // A handful of names per batch: a scan (same literal first) beats hashing.
        match self
            .counts
            .iter_mut()
            .find(|(k, _)| std::ptr::eq(*k, name) || *k == name)
        {
            Some((_, v)) => *v += n,
            None => self.counts.push((name, n)),
        }
    }

    pub fn inc(&mut self, name: &'static str) {
        self.add(name, 1);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn batches_add_under_one_lock() {
        let m = super::Metrics::default();
        m.inc("a");
        let mut batch = super::CounterBatch::default();
        batch.inc("a");
        batch.add("c", 5);
        batch.inc("c");
        batch.add("d", 0);
        assert_eq!(m.get("a"), 1, "nothing counted before the batch is added");
        m.add_batch(&mut batch);
        assert_eq!((m.get("a"), m.get("c"), m.get("d")), (2, 6, 0));
        m.add_batch(&mut batch);
        assert_eq!(m.get("c"), 6, "a batch is emptied when added");
        assert_eq!(m.snapshot().len(), 2, "a zero count adds no counter");
    }

    #[test]
    fn counts() {
        let m = super::Metrics::default();
        m.inc("a");
        m.add("a", 2);
        m.add("b", 0);
        assert_eq!(m.get("a"), 3);
        assert_eq!(m.get("b"), 0);
        assert_eq!(m.snapshot().len(), 1);
        m.set("q", 5);
        m.set("q", 2);
        m.max("peak", 5);
        m.max("peak", 3);
        assert_eq!((m.get("q"), m.get("peak")), (2, 5));
    }
}
