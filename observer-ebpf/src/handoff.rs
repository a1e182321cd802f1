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
use crate::{
    maps::HANDOFF,
    parse::{plain_ipv4, Packet, PacketCtx, Plain},
};

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Handoff {
    src: u32,
    dst: u32,
    sport: u16,
    dport: u16,
    proto: u8,
    valid: u8,
    _pad: [u8; 2],
    /// The veth `from_pod` ran on: the packet's ingress interface at `to_pod`.
    ifindex: u32,
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
        if self.valid != 0 {
            self.valid = 0;
        }
    }

    /// `from_pod` on `ifindex` passed `p`, a packet of an established, fully judged connection
    /// to another pod of the node.
    #[inline(always)]
    pub fn hand_over(&mut self, ifindex: u32, p: &Plain) {
        self.fill(ifindex, p.src, p.dst, p.sport, p.dport, p.proto);
    }

    /// `from_pod` on `ifindex` passed `pkt` through the full path: both ends' verdicts are
    /// taken there too (an IPv4 packet `plain_ipv4` cannot read never matches at `to_pod`).
    #[inline(always)]
    pub fn hand_over_parsed(&mut self, ifindex: u32, pkt: &Packet) {
        self.fill(
            ifindex, pkt.src[0], pkt.dst[0], pkt.sport, pkt.dport, pkt.proto,
        );
    }

    #[inline(always)]
    fn fill(&mut self, ifindex: u32, src: u32, dst: u32, sport: u16, dport: u16, proto: u8) {
        *self = Handoff {
            src,
            dst,
            sport,
            dport,
            proto,
            valid: 1,
            _pad: [0; 2],
            ifindex,
        };
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
