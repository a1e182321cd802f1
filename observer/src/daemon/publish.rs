//! Publishing: the record budget, history, metrics counts, the live stream (flow API,
//! Hubble API, flow log), and conntrack snapshots for the API.
use super::*;

/// How far back in the history a record that waited is placed by its time.
const HISTORY_REORDER: usize = 4096;

impl Shared {
    pub(super) fn publish(&self, rec: FlowRecord) {
        let rec = Arc::new(rec);
        {
            let mut st = self.state.lock().unwrap();
            // Node-wide record budget: what exceeds it is counted, never silently lost. The
            // kernel's counters are unaffected; only records are shed.
            if self.opts.max_records_per_second > 0 {
                let now = Instant::now();
                let rate = self.opts.max_records_per_second as f64;
                let elapsed = now.duration_since(st.bucket_at).as_secs_f64();
                st.bucket = (st.bucket + elapsed * rate).min(rate);
                st.bucket_at = now;
                if st.bucket < 1.0 {
                    st.metrics.records_rate_limited_total += 1;
                    return;
                }
                st.bucket -= 1.0;
            }
            let k = (
                rec.event.clone(),
                rec.traffic_class.clone(),
                rec.l4.protocol.clone(),
                rec.verdict.clone(),
            );
            *st.metrics.records.entry(k).or_default() += 1;
            let names = rec
                .policy
                .iter()
                .map(|p| (&p.namespace, &p.name, &p.direction));
            let isolating = rec
                .isolated_by
                .iter()
                .map(|p| (&p.namespace, &p.name, &p.direction));
            for (ns, name, dir) in names.chain(isolating) {
                *st.metrics
                    .policy_verdicts
                    .entry((ns.clone(), name.clone(), dir.clone(), rec.verdict.clone()))
                    .or_default() += 1;
            }
            if st.history.len() >= self.opts.history.max(1) {
                st.history.pop_front();
            }
            // In time order: a record that waited for its SNAT goes in among those published
            // meanwhile, looked for among the last `HISTORY_REORDER` (beyond that, the
            // oldest of them: a bound on the work under the lock at high record rates).
            let len = st.history.len();
            let at = st
                .history
                .iter()
                .rev()
                .take(HISTORY_REORDER)
                .position(|r| r.time.0 <= rec.time.0)
                .map_or(len.saturating_sub(HISTORY_REORDER), |back| len - back);
            st.history.insert(at, rec.clone());
        }
        if let Some(log) = &self.flow_log {
            if let Err(e) = log.lock().unwrap().write(&rec) {
                warn!("flow log: {e:#}");
                self.state.lock().unwrap().metrics.flow_log_errors_total += 1;
            }
        }
        let _ = self.tx.send(rec);
    }
}

impl Shared {
    /// Every conntrack entry with its current counters.
    pub fn conntrack(&self) -> Result<Vec<FlowRecord>> {
        let entries = self.dp.lock().unwrap().conntrack_entries()?;
        let st = self.state.lock().unwrap();
        Ok(entries
            .iter()
            .filter(|(_, e)| e.flags & ct_flags::SVC_ALIAS == 0)
            .map(|(k, e)| {
                let kind = if e.flags & ct_flags::CLOSED != 0 {
                    EventKind::Close
                } else {
                    EventKind::Report
                };
                let mut rec = flows::record(
                    &self.opts.node_name,
                    kind,
                    k,
                    e,
                    |ip| st.by_ip.get(&ip).map(|p| &**p),
                    |id| st.rules.get(&id).cloned(),
                );
                if let Some(c) = st.conns.get(k) {
                    rec.snat = c.snat.clone();
                    if let Some((s, client)) = c.service.clone() {
                        (rec.service, rec.original_source) = (Some(s), client);
                    }
                }
                rec
            })
            .collect())
    }
}
