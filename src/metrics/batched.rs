//! A histogram for the delivery path: observations are tallied per batch without any
//! shared write, then added to shared atomic buckets once per batch.
//!
//! `prometheus_client`'s `Histogram` takes a mutex on every observation. Every delivery to
//! every subscriber observed two of them (`subscriber_lag_events`, `delivery_seconds`): two
//! lock round trips on cache lines all subscriber tasks share, per delivery. Here a
//! subscriber's batch (often hundreds of events) costs one atomic add per bucket it
//! touched. The series encode exactly as a classic histogram's.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use prometheus_client::{
    encoding::{EncodeMetric, MetricEncoder, NoLabelSet},
    metrics::MetricType,
};

/// Shared atomic buckets; clones share them.
#[derive(Debug, Clone)]
pub struct BatchedHistogram {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Upper bounds, ascending; the last is `+Inf`.
    bounds: Box<[f64]>,
    /// Observations per bucket (not cumulative), one per bound.
    counts: Box<[AtomicU64]>,
    count: AtomicU64,
    /// The sum's `f64` bits.
    sum: AtomicU64,
}

/// One batch's observations, kept by the observer alone until [`BatchedHistogram::add`].
#[derive(Debug, Clone)]
pub struct Tally {
    counts: Vec<u64>,
    count: u64,
    sum: f64,
}

impl BatchedHistogram {
    /// Buckets with these upper bounds, plus `+Inf`.
    pub fn new(bounds: impl Iterator<Item = f64>) -> Self {
        let mut bounds: Vec<f64> = bounds.collect();
        bounds.push(f64::INFINITY);
        let counts = bounds.iter().map(|_| AtomicU64::new(0)).collect();
        Self {
            inner: Arc::new(Inner {
                bounds: bounds.into(),
                counts,
                count: AtomicU64::new(0),
                sum: AtomicU64::new(0f64.to_bits()),
            }),
        }
    }

    /// An empty tally for this histogram's buckets.
    pub fn tally(&self) -> Tally {
        Tally {
            counts: vec![0; self.inner.bounds.len()],
            count: 0,
            sum: 0.0,
        }
    }

    /// Counts `value` into `tally` (no shared write).
    pub fn observe(&self, tally: &mut Tally, value: f64) {
        // NaN falls through to the +Inf bucket, as in a classic histogram.
        let bucket = self
            .inner
            .bounds
            .iter()
            .position(|bound| value <= *bound)
            .unwrap_or(self.inner.bounds.len() - 1);
        tally.counts[bucket] += 1;
        tally.count += 1;
        tally.sum += value;
    }

    /// Adds `tally` to the shared buckets and empties it.
    pub fn add(&self, tally: &mut Tally) {
        if tally.count == 0 {
            return;
        }
        for (shared, count) in self.inner.counts.iter().zip(&mut tally.counts) {
            if *count != 0 {
                shared.fetch_add(std::mem::take(count), Ordering::Relaxed);
            }
        }
        self.inner
            .count
            .fetch_add(std::mem::take(&mut tally.count), Ordering::Relaxed);
        let add = std::mem::take(&mut tally.sum);
        let _ = self
            .inner
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + add).to_bits())
            });
    }
}

impl EncodeMetric for BatchedHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let buckets: Vec<(f64, u64)> = self
            .inner
            .bounds
            .iter()
            .zip(self.inner.counts.iter())
            .map(|(bound, count)| (*bound, count.load(Ordering::Relaxed)))
            .collect();
        // Read after the buckets: a scrape racing a batch may show a count a batch short of
        // the buckets' total, never ahead of it (every series is monotonic either way).
        let count = self.inner.count.load(Ordering::Relaxed);
        let sum = f64::from_bits(self.inner.sum.load(Ordering::Relaxed));
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::{
        metrics::histogram::{Histogram, exponential_buckets},
        registry::Registry,
    };

    use super::*;

    fn text(register: impl FnOnce(&mut Registry)) -> String {
        let mut registry = Registry::default();
        register(&mut registry);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        out
    }

    #[test]
    fn encodes_as_the_classic_histogram_of_the_same_observations() {
        let values = [0.5, 1.0, 3.0, 17.0, 1e9, 4.0, 0.0];
        let classic = Histogram::new(exponential_buckets(1.0, 4.0, 6));
        let batched = BatchedHistogram::new(exponential_buckets(1.0, 4.0, 6));
        let mut tally = batched.tally();
        for (i, value) in values.iter().enumerate() {
            classic.observe(*value);
            batched.observe(&mut tally, *value);
            if i == 3 {
                batched.add(&mut tally);
            }
        }
        batched.add(&mut tally);
        batched.add(&mut tally); // an empty tally adds nothing
        let expected = text(|r| r.register("lag", "h", classic));
        assert_eq!(text(|r| r.register("lag", "h", batched)), expected);
        assert!(expected.contains("lag_count 7"), "{expected}");
    }
}
