//! Services under policy. kube-proxy DNATs a Service frontend to one backend in netfilter
//! PREROUTING, after the client pod's veth has run `from_pod`: a verdict taken there would
//! judge the ClusterIP, not the backend. So a connection to a frontend is tracked under its
//! pre-DNAT tuple as an *alias* (no verdict, no records) and judged where the translated
//! packet first shows up: the backend's veth (`to_pod`, local backend) or the uplink's tc
//! egress (remote backend; `from_pod` marks the packet so the uplink looks only at these),
//! against the backend, egress and ingress alike. The two are linked by the client pod's
//! address and port, which kube-proxy keeps (it masquerades only hairpin and NodePort traffic
//! from outside). The translated connection is the connection of record; its packets are
//! counted once, where the client pod sends and receives them, through the alias.
use observer_common::{
    ct_flags, nodeport_flags, svc_nat, Config, CtEntry, CtKey, NodePortLink, RemoteKind, SvcKey,
    SvcNat, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP,
};

use crate::{
    classify,
    conntrack::{self, key_of_pair, update, verdict, Action},
    maps::{NEW_ENTRY, NODEPORT, SERVICES, SVC_NAT},
    parse::Packet,
};

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

#[inline(always)]
fn svc_key(family: u8, proto: u8, addr: &[u32; 4], port: u16) -> SvcKey {
    SvcKey {
        addr: *addr,
        port,
        proto,
        family,
    }
}

/// Services carry TCP, UDP and SCTP only.
#[inline(always)]
fn service_proto(proto: u8) -> bool {
    proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP
}

/// The id of the Service whose frontend the packet is addressed to.
#[inline(always)]
pub fn frontend(pkt: &Packet) -> Option<u32> {
    if !service_proto(pkt.proto) {
        return None;
    }
    let k = svc_key(pkt.family, pkt.proto, &pkt.dst, pkt.dport);
    unsafe { SERVICES.get(&k) }.copied()
}

/// Starts tracking a connection to a frontend under its pre-DNAT tuple. Its verdict waits for
/// the translated packet; the packet passes, marked for the uplink.
// A call of its own, with its entry in the scratch slot: the link it writes would otherwise
// take stack from every hook's 512 bytes.
#[inline(never)]
pub fn open_alias(key: &CtKey, pkt: &Packet, svc_id: u32, from_a: bool, cfg: &Config) -> Action {
    let now = crate::clock::now_ns();
    // The per-CPU scratch slot new entries are built in, not the stack.
    let Some(e) = NEW_ENTRY.get_ptr_mut(0) else {
        return Action::PassMarked;
    };
    let e = unsafe { &mut *e };
    *e = CtEntry {
        first_seen_ns: now,
        last_seen_ns: now,
        last_report_ns: now,
        flags: ct_flags::SVC_ALIAS
            | ct_flags::EGRESS_DONE
            | ct_flags::INGRESS_DONE
            | if from_a { ct_flags::ORIG_IS_A } else { 0 },
        policy_gen: cfg.policy_gen,
        ..CtEntry::default()
    };
    let _ = conntrack::insert(key, e, 0);
    let nat = SvcNat {
        frontend: pkt.dst,
        frontend_port: pkt.dport,
        svc_id,
        ..SvcNat::default()
    };
    let client = svc_key(pkt.family, pkt.proto, &pkt.src, pkt.sport);
    let _ = SVC_NAT.insert(&client, &nat, 0);
    Action::PassMarked
}

/// A packet of a known alias: counted on, and judged by, the translated connection once that
/// exists; until then original-direction packets pass marked (their verdict is taken after
/// the DNAT).
#[inline(always)]
pub fn through_alias(
    alias: &mut CtEntry,
    pkt: &Packet,
    from_a: bool,
    bytes: u64,
    cfg: &Config,
) -> Action {
    let now = crate::clock::now_ns();
    alias.last_seen_ns = now;
    let orig = from_a == (alias.flags & ct_flags::ORIG_IS_A != 0);
    let pass = if orig {
        Action::PassMarked
    } else {
        Action::Pass
    };
    let (caddr, cport) = if orig {
        (&pkt.src, pkt.sport)
    } else {
        (&pkt.dst, pkt.dport)
    };
    let client = svc_key(pkt.family, pkt.proto, caddr, cport);
    let Some(nat) = SVC_NAT.get_ptr_mut(&client) else {
        return pass;
    };
    let nat = unsafe { &mut *nat };
    if nat.flags & svc_nat::RESOLVED == 0 {
        return pass;
    }
    let (tkey, client_is_a) = key_of_pair(
        pkt.family,
        pkt.proto,
        caddr,
        cport,
        &nat.backend,
        nat.backend_port,
    );
    let t = conntrack::lookup(&tkey);
    // A fresh SYN on the client's tuple after its connection closed, or after the closed
    // connection left the table (the alias outlives it by up to a sweep): a new connection,
    // maybe to another backend, linked anew behind the DNAT.
    let syn = orig
        && pkt.proto == IPPROTO_TCP
        && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
        && t.is_none_or(|t| unsafe { (*t).flags } & ct_flags::CLOSED != 0);
    if syn {
        nat.flags = 0;
        alias.flags &= !ct_flags::CLOSED;
        return pass;
    }
    let Some(t) = t else {
        return pass;
    };
    let t = unsafe { &mut *t };
    let action = verdict(t.flags, cfg.enforce);
    // The same per-packet update as any connection's, with its report, close and after-close
    // events: since the parser and each hook's conntrack are global functions of their own,
    // kernels before 6.6 accept it here too (a lighter count without events once kept `to_pod`
    // inside their verifier's budget).
    update(
        &tkey,
        t,
        orig == client_is_a,
        bytes,
        now,
        pkt.tcp_flags,
        pkt.seg,
        pkt.proto == IPPROTO_TCP,
        cfg.report_interval_ns,
    );
    // The alias ends with its connection: the sweep removes it after the same linger, not
    // after the TCP idle timeout.
    if t.flags & ct_flags::CLOSED != 0 {
        alias.flags |= ct_flags::CLOSED;
    }
    match action {
        Action::Drop => Action::Drop,
        _ => pass,
    }
}

/// What a translated packet's connection is, looked up when the connection is new at a hook
/// behind the DNAT (`to_pod`, the uplink's egress).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Not a Service connection (or its alias is gone).
    None,
    /// The client's own connection to a frontend: judged against this backend.
    Service,
    /// A pod reaching itself through its Service: kube-proxy masqueraded the source to the
    /// node, and a pod talking to itself is always allowed.
    Hairpin,
    /// A client from outside on a NodePort or load-balancer frontend (its address here).
    NodePort([u32; 4]),
    /// From outside through a frontend of this node, but its client's note is not found (a
    /// UDP client whose port kube-proxy's `--random-fully` masquerade changed, a note evicted):
    /// judged as an unknown outside address, admitted only where every source is. Never the
    /// node.
    Outside,
}

/// The key of a NodePort note that later packets of the connection find: the client's port as
/// the backend sees it (the address part zero).
#[inline(always)]
fn nodeport_key(family: u8, proto: u8, port: u16) -> SvcKey {
    svc_key(family, proto, &[0; 4], port)
}

/// The key a new connection's first packet finds its client's note by, behind kube-proxy's
/// masquerade: a TCP SYN by its sequence number (NAT keeps it; `--random-fully`, kube-proxy's
/// default, changes the port), anything else by its port (kept unless taken or randomised).
#[inline(always)]
fn opener_key(pkt: &Packet) -> SvcKey {
    if pkt.proto == IPPROTO_TCP {
        svc_key(pkt.family, pkt.proto, &[pkt.seq, 1, 0, 0], 0)
    } else {
        nodeport_key(pkt.family, pkt.proto, pkt.sport)
    }
}

/// Notes a packet from outside the node that may open a connection to a frontend here (a
/// NodePort on the node's address, a load-balancer IP), before kube-proxy translates it.
/// True when it is one: the caller marks the packet (`NODEPORT_MARK`).
#[inline(always)]
pub fn note_nodeport(pkt: &Packet) -> bool {
    let Some(svc_id) = frontend(pkt) else {
        return false;
    };
    let link = NodePortLink {
        client: pkt.src,
        frontend: pkt.dst,
        client_port: pkt.sport,
        frontend_port: pkt.dport,
        svc_id,
        flags: 0,
        noted_ns: crate::clock::now_ns(),
    };
    let _ = NODEPORT.insert(&opener_key(pkt), &link, 0);
    true
}

/// The NodePort client behind a connection's original-direction packet seen at the backend.
#[inline(always)]
pub fn nodeport_link(pkt: &Packet) -> Option<&'static NodePortLink> {
    unsafe { NODEPORT.get(&nodeport_key(pkt.family, pkt.proto, pkt.sport)) }
}

/// The client of a new connection from outside, from its note; the note is filed again under
/// the port the backend sees, taken, for the connection's later verdicts and its records.
#[inline(always)]
fn link_outside(pkt: &Packet) -> Link {
    let Some(l) = (unsafe { NODEPORT.get(&opener_key(pkt)) }) else {
        return Link::Outside;
    };
    if l.flags != 0 {
        return Link::Outside;
    }
    let client = l.client;
    let taken = NodePortLink {
        flags: nodeport_flags::TAKEN,
        ..*l
    };
    let _ = NODEPORT.insert(&nodeport_key(pkt.family, pkt.proto, pkt.sport), &taken, 0);
    Link::NodePort(client)
}

/// Links a new connection seen behind the DNAT to its client's alias, recording the backend.
#[inline(always)]
pub fn resolve(pkt: &Packet) -> Link {
    if !service_proto(pkt.proto) {
        return Link::None;
    }
    let src_is_pod = classify::local_pod(pkt.family, &pkt.src);
    // Hairpin: kube-proxy masqueraded the source to this node (keeping the port when free) and
    // the backend is the client itself. Nothing from off the node can claim it. A NodePort
    // client from outside arrives masqueraded to the node too, or (externalTrafficPolicy:
    // Local) as itself.
    if !src_is_pod {
        let from_node = matches!(
            classify::remote(pkt.family, &pkt.src),
            Some(r) if r.kind == RemoteKind::Host as u8
        );
        let hairpin = from_node && {
            let client = svc_key(pkt.family, pkt.proto, &pkt.dst, pkt.sport);
            unsafe { SVC_NAT.get(&client) }.is_some_and(|n| n.flags & svc_nat::RESOLVED == 0)
        };
        if hairpin {
            return Link::Hairpin;
        }
        // From outside through a frontend here: masqueraded to the node, or (externalTraffic
        // Policy: Local) as itself. Anything else not from a pod is the node or a remote peer.
        return if pkt.outside != 0 {
            link_outside(pkt)
        } else {
            Link::None
        };
    }
    let client = svc_key(pkt.family, pkt.proto, &pkt.src, pkt.sport);
    let Some(nat) = SVC_NAT.get_ptr_mut(&client) else {
        return Link::None;
    };
    let nat = unsafe { &mut *nat };
    if nat.flags & svc_nat::RESOLVED != 0 {
        return Link::None;
    }
    nat.backend = pkt.dst;
    nat.backend_port = pkt.dport;
    nat.flags |= svc_nat::RESOLVED;
    Link::Service
}

/// Unlinks a Service connection denied behind the DNAT, which is dropped untracked: its
/// client's next packet passes the alias unjudged and is linked and judged again behind the
/// DNAT, under the policy of that moment and with its Service named. The note keeps its
/// frontend and backend for the daemon's record of the drop.
#[inline(always)]
pub fn unresolve(pkt: &Packet) {
    let client = svc_key(pkt.family, pkt.proto, &pkt.src, pkt.sport);
    if let Some(nat) = SVC_NAT.get_ptr_mut(&client) {
        unsafe { (*nat).flags &= !svc_nat::RESOLVED };
    }
}
