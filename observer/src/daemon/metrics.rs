//! What the daemon counts about itself for /metrics and `observer status`.
use super::*;

#[derive(Default)]
pub struct Metrics {
    /// Connections of local pods by SNAT expectation.
    pub snat_flows: HashMap<crate::snat::Expectation, u64>,
    /// How each connection's SNAT was settled: "event" (ctnetlink event or dump), "lookup"
    /// (exact GET after waiting), "absent" (the kernel had no entry: untranslated).
    pub snat_settled: HashMap<&'static str, u64>,
    pub conntrack_events_total: u64,
    /// ctnetlink overruns (events lost by the kernel): each is followed by a full dump.
    pub conntrack_overruns_total: u64,
    pub conntrack_dumps_total: u64,
    pub conntrack_errors_total: u64,
    /// Lookups that found the connection only the other way round (published without snat).
    pub snat_unknown_total: u64,
    /// (event, traffic class, protocol, verdict) -> records.
    pub records: HashMap<(String, String, String, String), u64>,
    /// (policy, direction, verdict) -> records: the policy that allowed a record, or the one
    /// that isolated the side that dropped it.
    pub policy_verdicts: HashMap<(String, String, String), u64>,
    pub records_rate_limited_total: u64,
    pub flow_log_errors_total: u64,
    pub links_attached_total: u64,
    pub attach_errors_total: u64,
    pub map_sync_errors_total: u64,
    pub source_errors: Vec<String>,
    pub conntrack_expired_total: u64,
    /// Local pods left out of the per-pod metrics by `--pod-metrics-max`.
    pub pod_metrics_overflow_total: u64,
    /// API event to maps written, with `--source kube`.
    pub sync_latency: Histogram,
}

/// A Prometheus histogram with fixed buckets (seconds).
#[derive(Clone, Debug)]
pub struct Histogram {
    pub bounds: &'static [f64],
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        const B: &[f64] = &[
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        ];
        Self {
            bounds: B,
            counts: vec![0; B.len()],
            sum: 0.0,
            count: 0,
        }
    }
}

impl Histogram {
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
}
