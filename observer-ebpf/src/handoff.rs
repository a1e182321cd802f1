//! From one pod of the node to another: a packet passes the source's veth (`from_pod`, tc
//! ingress) and then the destination's (`to_pod`, tc egress) in one synchronous run of the
//! stack on one CPU (receive, forward or bridge, transmit). When `from_pod` settled it as an
//! allowed packet of an established connection, `to_pod` would look up the same entry and find
//! the same verdict: both ends' verdicts are taken at the source's veth, and `to_pod` does not
//! count what `from_pod` counted. So `from_pod` leaves the packet's tuple in a per-CPU slot and
//! `to_pod` passes a packet from that veth with that tuple without a second lookup. The same
//! holds for a packet `from_pod` passed through the full path (a connection's opening packets):
//! there too it took the destination's ingress verdict. A packet whose tuple changed on the way
//! (a Service's DNAT, a masquerade) does not match and is looked up in full; the slot is
//! cleared by every `from_pod` run that does not pass its packet.
//!
//! The same slot proves a new connection's wire side for the daemon's SNAT join. When
//! `from_pod` passes a connection's opening packet, the slot also asks for a proof (`WANT`),
//! with what NAT leaves of that packet: its IPv4 length and identification, a TCP segment's
//! sequence number. Where the packet leaves the node's stack (`uplink_egress` toward another
//! node or the world, `to_pod` toward a local pod: the same run of the stack on the same CPU),
//! the program that finds that packet reports its tuple as it left, next to the tuple the pod
//! sent (`EventKind::Wire`): the same tuple proves no translation, a different one is the
//! translation itself. The kernel's conntrack need not announce its entries to the daemon.
use aya_ebpf::{bindings::__sk_buff, programs::TcContext};
use observer_common::IPPROTO_TCP;

use crate::{
    events::emit_wire,
    maps::HANDOFF,
    parse::{ipv4_ident, plain_ipv4, Packet, PacketCtx, Plain},
};

/// `Handoff::wire` bits: `from_pod`'s conntrack created a connection from this packet ...
const CREATED: u8 = 1;
/// ... and the packet's wire side is wanted.
const WANT: u8 = 2;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Handoff {
    src: u32,
    dst: u32,
    sport: u16,
    dport: u16,
    proto: u8,
    valid: u8,
    /// `CREATED`, `WANT`.
    wire: u8,
    _pad: u8,
    /// The veth `from_pod` ran on: the packet's ingress interface at `to_pod`.
    ifindex: u32,
    /// With `WANT`: the packet's IPv4 total length and identification (raw), and its TCP
    /// sequence number (0 for UDP).
    ident: u32,
    seq: u32,
}

/// This CPU's slot.
#[inline(always)]
pub fn slot() -> Option<&'static mut Handoff> {
    HANDOFF.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

impl Handoff {
    /// Whatever this CPU handed over before is void.
    #[inline(always)]
    pub fn clear(&mut self) {
        // Most packets find it void already: no store then.
        if self.valid != 0 || self.wire != 0 {
            self.valid = 0;
            self.wire = 0;
        }
    }

    /// `from_pod`'s conntrack created a connection from the packet it handles now, in the
    /// connection's original direction.
    #[inline(always)]
    pub fn note_created(&mut self) {
        self.wire = CREATED;
    }

    /// `from_pod` on `ifindex` passed `p`, a packet of an established, fully judged connection
    /// to another pod of the node.
    #[inline(always)]
    pub fn hand_over(&mut self, ifindex: u32, p: &Plain) {
        self.fill(ifindex, p.src, p.dst, p.sport, p.dport, p.proto);
    }

    /// `from_pod` on `ifindex` passed `pkt` through the full path: both ends' verdicts are
    /// taken there too (an IPv4 packet `plain_ipv4` cannot read never matches at `to_pod`),
    /// except for a Service's frontend (`take_over` false). A connection's opening packet (a
    /// TCP SYN, also one sent again after a first SYN was dropped on the way; the packet that
    /// created a connection of another protocol) also asks for its wire side. Only an untagged
    /// IPv4 packet carries what tells it apart where it leaves.
    #[inline(always)]
    pub fn hand_over_parsed<C: PacketCtx>(
        &mut self,
        ctx: &C,
        ifindex: u32,
        pkt: &Packet,
        take_over: bool,
    ) {
        // TCP: its SYN only, not a connection picked up mid-way (the kernel's entry may be
        // the other way round: the pod's packet a reply, translated back).
        let opening = if pkt.proto == IPPROTO_TCP {
            pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
        } else {
            self.wire & CREATED != 0
        };
        self.fill(
            ifindex, pkt.src[0], pkt.dst[0], pkt.sport, pkt.dport, pkt.proto,
        );
        self.valid = take_over as u8;
        if opening && pkt.l3_off == 14 {
            if let Some(ident) = ipv4_ident(ctx) {
                self.ident = ident;
                self.seq = if pkt.proto == IPPROTO_TCP { pkt.seq } else { 0 };
                self.wire = WANT;
            }
        }
    }

    #[inline(always)]
    fn fill(&mut self, ifindex: u32, src: u32, dst: u32, sport: u16, dport: u16, proto: u8) {
        self.src = src;
        self.dst = dst;
        self.sport = sport;
        self.dport = dport;
        self.proto = proto;
        self.valid = 1;
        self.wire = 0;
        self.ifindex = ifindex;
    }

    /// Where a forwarded packet leaves the stack on `ifindex`: if it is the one whose wire
    /// side this slot asks for, reports both tuples (once). A slot whose packet never left
    /// (delivered to the node, dropped) still asks: what tells its packet apart must hold, and
    /// one end of the tuple must be as the pod sent it (a source NAT keeps the destination, a
    /// destination NAT the source). A reply to the pod keeps neither; a packet both
    /// translations changed is not proven here and is looked up instead. Called only when the
    /// slot asks (`prove_wire` below).
    #[inline(always)]
    fn prove_wire<C: PacketCtx>(&mut self, ctx: &C, ifindex: u32) {
        let Some(p) = plain_ipv4(ctx) else {
            return;
        };
        let Some(ident) = ipv4_ident(ctx) else {
            return;
        };
        if p.proto != self.proto || ident != self.ident {
            return;
        }
        let same_src = p.src == self.src && p.sport == self.sport;
        let same_dst = p.dst == self.dst && p.dport == self.dport;
        if !same_src && !same_dst {
            return;
        }
        if p.proto == IPPROTO_TCP && crate::parse::tcp_seq(ctx) != Some(self.seq) {
            return;
        }
        self.wire = 0;
        emit_wire(
            (self.proto, self.src, self.sport, self.dst, self.dport),
            (p.src, p.sport, p.dst, p.dport),
            ifindex,
        );
    }
}

/// Where a packet leaves the stack (`uplink_egress`, `to_pod`): proves its wire side when this
/// CPU's slot asks for it. The check is inline; the proof a function of its own, its frame
/// apart from the hook's (Linux 6.1 counts 512 bytes of stack along a call chain).
#[inline(always)]
pub fn prove_wire(skb: *mut __sk_buff) {
    if let Some(s) = slot() {
        if s.wire & WANT != 0 {
            prove_wire_skb(skb);
        }
    }
}

#[inline(never)]
fn prove_wire_skb(skb: *mut __sk_buff) {
    if skb.is_null() {
        return;
    }
    // The node's own packets (no ingress interface) are never a pod's.
    if unsafe { (*skb).ingress_ifindex } == 0 {
        return;
    }
    let ifindex = unsafe { (*skb).ifindex };
    if let Some(s) = slot() {
        s.prove_wire(&TcContext::new(skb), ifindex);
    }
}

/// At `to_pod`: whether the packet, which entered the node through `iif`, is the one this CPU's
/// `from_pod` passed there, unchanged.
#[inline(always)]
pub fn taken_over<C: PacketCtx>(ctx: &C, iif: u32) -> bool {
    let Some(s) = slot() else {
        return false;
    };
    if s.valid == 0 || s.ifindex != iif {
        return false;
    }
    let Some(p) = plain_ipv4(ctx) else {
        return false;
    };
    p.src == s.src
        && p.dst == s.dst
        && p.sport == s.sport
        && p.dport == s.dport
        && p.proto == s.proto
}
