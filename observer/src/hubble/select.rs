//! One GetFlows request: which records it keeps, each kept record as the flow the client
//! asked for, from the history and then live.
use std::{hash::Hash as _, hash::Hasher as _, sync::Arc, time::SystemTime};

use futures_util::StreamExt as _;
use tokio::sync::broadcast;
use tokio_stream::wrappers::{errors::BroadcastStreamRecvError, BroadcastStream};
use tonic::Status;

use super::{
    convert::{self, FieldMask},
    filter,
    proto::{
        self,
        flow::{Flow, FlowFilter, LostEvent, LostEventSource},
        observer::{get_flows_response::ResponseTypes, GetFlowsRequest, GetFlowsResponse},
    },
    FlowStream,
};
use crate::flows::FlowRecord;

/// The type URL of observer's own filters in `GetFlowsRequest.extensions`.
pub const FLOWS_REQUEST_TYPE: &str = "type.googleapis.com/observer.ext.FlowsRequest";

/// What one request keeps and how it wants the flows.
#[derive(Clone)]
pub(super) struct Selection {
    /// observer's own filters (from `observer flows`), on the record.
    ours: Arc<Vec<crate::filter::Filter>>,
    /// Hubble's filters and time window, on the flow.
    white: Arc<Vec<FlowFilter>>,
    black: Arc<Vec<FlowFilter>>,
    since: Option<SystemTime>,
    until: Option<SystemTime>,
    mask: FieldMask,
    /// observer's own CLI (it sends its filters in the extensions) reads the extension.
    with_ext: bool,
    /// Uuids cost a hash and a string per flow: made only when sent or filtered on.
    uuids: bool,
    node: String,
}

impl Selection {
    /// The request's filters, checked: one observer has no data for is refused, naming it.
    pub(super) fn of(req: &GetFlowsRequest, node: &str) -> Result<Self, Status> {
        let hubble_filters = || req.whitelist.iter().chain(&req.blacklist);
        if let Some(field) = hubble_filters().find_map(filter::unsupported) {
            return Err(Status::invalid_argument(format!(
                "observer has no data to filter on {field}"
            )));
        }
        let paths = req.field_mask.as_ref().map(|m| &m.paths[..]).unwrap_or(&[]);
        let mask = FieldMask::new(paths);
        let time = |t: Option<prost_types::Timestamp>| t.and_then(|t| t.try_into().ok());
        Ok(Selection {
            ours: Arc::new(observer_filters(req)?),
            white: Arc::new(req.whitelist.clone()),
            black: Arc::new(req.blacklist.clone()),
            since: time(req.since),
            until: time(req.until),
            mask,
            with_ext: req.extensions.is_some() || (!paths.is_empty() && mask.keeps("extensions")),
            uuids: mask.keeps("uuid") || hubble_filters().any(|f| !f.uuid.is_empty()),
            node: node.to_string(),
        })
    }

    /// A record's flow, if the request keeps it: observer's own filters on the record, then
    /// the time window and Hubble's filters on the whole flow, then the field mask.
    fn flow(&self, rec: &FlowRecord) -> Option<Flow> {
        if !crate::filter::accepts(&self.ours, rec) {
            return None;
        }
        let uuid = if self.uuids {
            uuid_of(rec)
        } else {
            String::new()
        };
        let mut flow = convert::flow_masked(rec, uuid, self.with_ext, self.mask);
        if !(self.in_window(&flow) && filter::passes(&flow, &self.white, &self.black)) {
            return None;
        }
        self.mask.apply(&mut flow);
        Some(flow)
    }

    /// Whether the request keeps a record, without making its flow where no filter needs it.
    fn keeps(&self, rec: &FlowRecord) -> bool {
        let on_flow = !self.white.is_empty()
            || !self.black.is_empty()
            || self.since.is_some()
            || self.until.is_some();
        if on_flow {
            self.flow(rec).is_some()
        } else {
            crate::filter::accepts(&self.ours, rec)
        }
    }

    fn in_window(&self, flow: &Flow) -> bool {
        let Some(t) = flow.time.and_then(|t| SystemTime::try_from(t).ok()) else {
            return true;
        };
        self.since.is_none_or(|s| t >= s) && self.until.is_none_or(|u| t <= u)
    }

    fn response(&self, flow: Flow) -> GetFlowsResponse {
        GetFlowsResponse {
            time: flow.time,
            node_name: self.node.clone(),
            response_types: Some(ResponseTypes::Flow(flow)),
        }
    }

    /// What the request asks for from the history (`number`, `first`, `since`).
    pub(super) fn head(self, history: Vec<Arc<FlowRecord>>, req: &GetFlowsRequest) -> FlowStream {
        let n = req.number as usize;
        if n == 0 && req.follow && self.since.is_none() {
            // Nothing asked for from the past: only what comes.
            return Box::pin(futures_util::stream::empty());
        }
        let (n, start) = if n == 0 || req.first {
            (if n == 0 { usize::MAX } else { n }, 0)
        } else {
            // The newest n, sent oldest first: where they start is found from the end.
            let mut seen = 0;
            let start = history.iter().rposition(|r| {
                seen += self.keeps(r) as usize;
                seen == n
            });
            (n, start.unwrap_or(0))
        };
        // Converted as the client reads.
        let flows = history
            .into_iter()
            .skip(start)
            .filter_map(move |r| self.flow(&r).map(|f| Ok(self.response(f))))
            .take(n);
        Box::pin(futures_util::stream::iter(flows))
    }

    /// The records published from now on; a reader that falls behind is told how many it
    /// missed, in-band as Hubble does. `until` ends the stream once it has passed.
    pub(super) fn live(self, rx: broadcast::Receiver<Arc<FlowRecord>>) -> FlowStream {
        let until = self.until;
        let live = BroadcastStream::new(rx)
            .filter_map(move |r| {
                let out = match r {
                    Ok(rec) => self.flow(&rec).map(|f| Ok(self.response(f))),
                    Err(BroadcastStreamRecvError::Lagged(n)) => Some(Ok(GetFlowsResponse {
                        time: Some(SystemTime::now().into()),
                        node_name: self.node.clone(),
                        response_types: Some(ResponseTypes::LostEvents(LostEvent {
                            source: LostEventSource::ObserverEventsQueue as i32,
                            num_events_lost: n,
                            ..Default::default()
                        })),
                    })),
                };
                async move { out }
            })
            .take_while(move |_| {
                let open = until.is_none_or(|u| SystemTime::now() <= u);
                async move { open }
            });
        Box::pin(live)
    }
}

/// `observer flows`' own filters, sent in the request's extensions; a bad one is refused with
/// the flag it came from.
fn observer_filters(req: &GetFlowsRequest) -> Result<Vec<crate::filter::Filter>, Status> {
    let Some(any) = &req.extensions else {
        return Ok(Vec::new());
    };
    if any.type_url != FLOWS_REQUEST_TYPE {
        return Err(Status::invalid_argument(format!(
            "extensions: observer does not know {:?}",
            any.type_url
        )));
    }
    let r = <proto::observer::ext::FlowsRequest as prost::Message>::decode(any.value.as_slice())
        .map_err(|e| Status::invalid_argument(format!("extensions: {e}")))?;
    r.filters
        .iter()
        .map(|f| {
            Ok(crate::filter::Filter {
                negate: f.negate,
                m: crate::filter::parse(&f.flag, &f.value)
                    .map_err(|e| Status::invalid_argument(format!("{e:#}")))?,
            })
        })
        .collect()
}

/// A record's identity in this daemon: the same record always gets the same uuid.
fn uuid_of(rec: &FlowRecord) -> String {
    use std::hash::BuildHasher as _;
    let part = |seed: u64| {
        // Fixed seeds: the same record, the same uuid, in every run of this daemon.
        let mut h = foldhash::fast::FixedState::with_seed(seed).build_hasher();
        (&rec.time, &rec.node, &rec.event, &rec.ip.src, &rec.ip.dst).hash(&mut h);
        (rec.l4.src_port, rec.l4.dst_port).hash(&mut h);
        rec.l4.protocol.hash(&mut h);
        h.finish()
    };
    let n = (part(1) as u128) << 64 | part(2) as u128;
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    uuid::Builder::from_random_bytes(n.to_be_bytes())
        .into_uuid()
        .hyphenated()
        .encode_lower(&mut buf)
        .to_string()
}
