//! What the daemon counts about itself for /metrics and `observer status`.
use super::*;
use crate::flows::Word;

/// (policy namespace, policy name, direction, verdict) of `observer_policy_verdicts_total`.
pub type PolicyVerdict = (Arc<str>, Arc<str>, Arc<str>, Word);

#[derive(Default)]
pub struct Metrics {
    /// Connections of local pods by SNAT expectation.
    pub snat_flows: foldhash::HashMap<crate::snat::Expectation, u64>,
    /// How each connection's SNAT was settled: "wire" (the opening packet seen leaving the
    /// stack), "dump" (the table read at start), "lookup" (exact GET after waiting), "absent"
    /// (the kernel had no entry: untranslated), "late" (a translation after all, corrected on
    /// a later record).
    pub snat_settled: foldhash::HashMap<&'static str, u64>,
    /// Entries of the kernel's table read at start.
    pub conntrack_events_total: u64,
    pub conntrack_dumps_total: u64,
    pub conntrack_errors_total: u64,
    /// Lookups that found the connection only the other way round (published without snat).
    pub snat_unknown_total: u64,
    /// (event, traffic class, protocol, verdict) -> records.
    /// Fast hashers: touched by every record.
    pub records: foldhash::HashMap<(Word, Word, Word, Word), u64>,
    /// (policy, direction, verdict) -> records: the policy that allowed a record, or the one
    /// that isolated the side that dropped it.
    /// No string built per record: the key's parts are the record's own, shared.
    pub policy_verdicts: foldhash::HashMap<PolicyVerdict, u64>,
    pub records_rate_limited_total: u64,
    pub flow_log_errors_total: u64,
    pub links_attached_total: u64,
    pub attach_errors_total: u64,
    pub map_sync_errors_total: u64,
    pub source_errors: Vec<String>,
    pub conntrack_expired_total: u64,
    /// Closes whose last counters were read back from the kernel's table rather than taken
    /// from its after-close events (a loss, a restart, a connection past its events).
    pub closes_read_back_total: u64,
    /// TCP closes published, by when: [`CLOSES_WHEN`].
    pub closes_total: [u64; 3],
    /// Local pods left out of the per-pod metrics by `--pod-metrics-max`.
    pub pod_metrics_overflow_total: u64,
    /// API event to maps written, with `--source kube`.
    pub sync_latency: Histogram,
}

/// When a TCP close was published, the `when` label of `observer_closes_total`: with the
/// acknowledgement of its last FIN (`last_ack`), held for `--close-grace` after a close the
/// kernel reports early, a RST or crossed FINs (`held`; past the queue's bound, at once), or by
/// the sweep, a close without its event (`sweep`).
pub const CLOSES_WHEN: [&str; 3] = ["last_ack", "held", "sweep"];
pub const CLOSE_AT_LAST_ACK: usize = 0;
pub const CLOSE_HELD: usize = 1;
pub const CLOSE_BY_SWEEP: usize = 2;

/// A Prometheus histogram with fixed buckets (seconds). `counts[i]` is cumulative: the
/// observations at or below `bounds[i]`; `count` is the `+Inf` bucket.
#[derive(Clone, Debug)]
pub struct Histogram {
    pub bounds: &'static [f64],
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

/// Bounds of the sync latency histogram: fine between 1 and 100 ms, where one change to the
/// maps should land (at most a third of the bound apart from 10 ms up, so a quantile read from
/// the buckets is close), coarse up to 30 s for syncs of very large clusters.
pub const LATENCY_BOUNDS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06,
    0.075, 0.1, 0.15, 0.2, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl Default for Histogram {
    fn default() -> Self {
        Self::with_bounds(LATENCY_BOUNDS)
    }
}

impl Histogram {
    pub fn with_bounds(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe(&mut self, d: Duration) {
        let v = d.as_secs_f64();
        for (i, b) in self.bounds.iter().enumerate() {
            if v <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    /// The `q` quantile (0..=1) estimated from the buckets as Prometheus' `histogram_quantile`
    /// does: the bucket holding the rank, linear within it (from 0 for the first bucket). A
    /// rank beyond the largest bound reads as that bound. `None` before any observation.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 || self.bounds.is_empty() {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * self.count as f64;
        let mut below = 0u64;
        let mut lower = 0.0;
        for (b, n) in self.bounds.iter().zip(&self.counts) {
            if *n as f64 >= rank && *n > below {
                let inside = (n - below) as f64;
                return Some(lower + (b - lower) * (rank - below as f64) / inside);
            }
            below = *n;
            lower = *b;
        }
        Some(*self.bounds.last().unwrap())
    }

    /// Observations above the largest bound (only the `+Inf` bucket holds them).
    pub fn above_bounds(&self) -> u64 {
        self.count - self.counts.last().copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: f64) -> Duration {
        Duration::from_secs_f64(v / 1e3)
    }

    #[test]
    fn quantiles_interpolate_within_the_bucket_like_prometheus() {
        let mut h = Histogram::default();
        assert_eq!(h.quantile(0.5), None);
        // Ten syncs in (10, 15] ms: the median is the middle of the bucket.
        for _ in 0..10 {
            h.observe(ms(12.0));
        }
        assert!((h.quantile(0.5).unwrap() - 0.0125).abs() < 1e-9);
        assert!((h.quantile(0.99).unwrap() - 0.01495).abs() < 1e-9);
        // The first bucket interpolates from 0.
        let mut h = Histogram::default();
        h.observe(ms(0.1));
        h.observe(ms(0.2));
        assert!((h.quantile(0.5).unwrap() - 0.00025).abs() < 1e-9);
    }

    #[test]
    fn quantiles_of_a_spread_stay_within_a_bucket_of_the_truth() {
        // 1 to 100 ms, one sample each: the true p50 is 50 ms, p99 99 ms.
        let mut h = Histogram::default();
        for v in 1..=100 {
            h.observe(ms(v as f64));
        }
        let (p50, p99) = (h.quantile(0.5).unwrap(), h.quantile(0.99).unwrap());
        assert!((p50 - 0.050).abs() <= 0.005, "p50 {p50}");
        assert!((p99 - 0.099).abs() <= 0.005, "p99 {p99}");
        assert_eq!(h.above_bounds(), 0);
        // Matches histogram_quantile on the same buckets: rank 50 falls in (40, 50] ms, which
        // holds 10 of them with 40 below.
        assert!((p50 - (0.04 + 0.01 * (50.0 - 40.0) / 10.0)).abs() < 1e-9);
    }

    #[test]
    fn quantiles_beyond_the_largest_bound_read_as_it() {
        let mut h = Histogram::default();
        h.observe(ms(5.0));
        h.observe(Duration::from_secs(100));
        assert_eq!(h.quantile(0.99), Some(30.0));
        assert_eq!(h.above_bounds(), 1);
        assert!((h.quantile(0.25).unwrap() - (0.003 + 0.002 * 0.5)).abs() < 1e-9);
    }
}
