//! Packet parsing with direct packet access: Ethernet, up to two VLAN tags, IPv4 (options,
//! fragments), IPv6 (extension headers, fragments), TCP, UDP, SCTP, ICMP and ICMPv6.
use aya_ebpf::{
    bindings::__sk_buff,
    programs::{TcContext, XdpContext},
};
use observer_common::{
    stat, AF_INET, AF_INET6, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP,
};

use crate::maps::{FRAGS, PACKET};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;

const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_NONE: u8 = 59;
const NEXTHDR_DEST: u8 = 60;
/// Extension headers walked before giving up; each costs one bounded loop iteration.
const MAX_IPV6_EXT: usize = 6;
/// Bytes pulled into the linear area when headers are not there yet.
const PULL_LEN: u32 = 256;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct FragKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub id: u32,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct FragPorts {
    pub sport: u16,
    pub dport: u16,
}

/// Lives in a per-CPU map slot between the tc programs' global functions (`PACKET`).
#[repr(C)]
pub struct Packet {
    pub family: u8,
    pub proto: u8,
    pub tcp_flags: u8,
    pub icmp_type: u8,
    pub icmp_code: u8,
    /// Set by `to_pod` from the packet's `NODEPORT_MARK`: it came from outside the node to one
    /// of its frontends (a padding byte: the struct does not grow).
    pub outside: u8,
    /// Offset of the IP header: the counted length of a packet starts there.
    pub l3_off: u16,
    pub src: [u32; 4],
    pub dst: [u32; 4],
    /// Host byte order. For ICMP echo: the identifier as the requester's port.
    pub sport: u16,
    pub dport: u16,
    /// TCP: the sequence number, which NAT keeps (a NodePort client's SYN is recognised by it
    /// behind kube-proxy's masquerade).
    pub seq: u32,
    /// TCP: the acknowledgement number, and the one that would acknowledge this segment's FIN
    /// (see [`Seg`]).
    pub seg: Seg,
    /// Set by `to_pod` for a UDP packet that reached it as it arrived on the uplink (see
    /// `redirect::arrived_untranslated`).
    pub untranslated: u8,
}

/// What a TCP segment tells the close of its connection: the acknowledgement it carries, and
/// the one that acknowledges it (its sequence number plus its payload, plus one for a FIN).
/// From the IP header's length: a frame's padding is not payload.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Seg {
    pub ack: u32,
    pub fin_ack: u32,
}

impl Seg {
    /// From a TCP header `h` at `l4`, in an IP packet that ends at `ip_end`. A length that
    /// does not add up (a GSO packet beyond 64 KiB, whose IPv4 length is 0) gives an
    /// acknowledgement no end sends: the close is then reported by the sweep, not early.
    #[inline(always)]
    fn of(h: &[u8; 20], l4: usize, ip_end: usize) -> Seg {
        let seq = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
        let payload = ip_end.wrapping_sub(l4 + ((h[12] >> 4) as usize) * 4) as u32;
        Seg {
            ack: u32::from_be_bytes([h[8], h[9], h[10], h[11]]),
            fin_ack: seq.wrapping_add(payload).wrapping_add(1),
        }
    }
}

/// What the parser needs from a program context: direct packet access. tc and XDP both give
/// it; only tc can pull non-linear data in (an XDP frame on the paths we attach to is linear).
pub trait PacketCtx {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// Bytes of the whole packet, from the Ethernet header on.
    fn len(&self) -> u32;
    fn pull(&self, _len: u32) {}
}

impl PacketCtx for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }
    #[inline(always)]
    fn len(&self) -> u32 {
        TcContext::len(self)
    }
    #[inline(always)]
    fn pull(&self, len: u32) {
        let _ = self.pull_data(len);
    }
}

impl PacketCtx for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }
    #[inline(always)]
    fn len(&self) -> u32 {
        (XdpContext::data_end(self) - XdpContext::data(self)) as u32
    }
}

/// Bounds-checks a whole header at once and hands out a reference to it. One check per header
/// keeps the verifier's view simple: every field read below is a constant offset from a pointer
/// whose range it already knows.
#[inline(always)]
fn hdr<const N: usize, C: PacketCtx>(ctx: &C, off: usize) -> Result<&[u8; N], u32> {
    let p = ctx.data() + off;
    if p + N > ctx.data_end() {
        return Err(stat::TRUNCATED);
    }
    Ok(unsafe { &*(p as *const [u8; N]) })
}

#[inline(always)]
fn be16(h: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([h[i], h[i + 1]])
}

#[inline(always)]
fn raw32(h: &[u8], i: usize) -> u32 {
    u32::from_ne_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]])
}

/// Parses a tc program's packet into the per-CPU `PACKET` slot (returns 0), or returns the
/// stats index of why it cannot be parsed (never 0, `stat::PACKETS`). A global function,
/// verified once on its own: the paths through the parser (address families, extension
/// headers, fragments, L4 protocols) do not multiply the paths through what follows it, and
/// the packet lives outside the stack, which the functions after it need all of (the 512
/// bytes are shared by a program and every function it calls).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn observer_parse_tc(skb: *mut __sk_buff) -> u32 {
    if skb.is_null() {
        return stat::TRUNCATED;
    }
    let Some(out) = PACKET.get_ptr_mut(0) else {
        return stat::TRUNCATED;
    };
    match parse(&TcContext::new(skb)) {
        Ok(pkt) => {
            unsafe { *out = pkt };
            0
        }
        Err(reason) => reason,
    }
}

/// The packet `observer_parse_tc` parsed last on this CPU. One program run at a time uses it:
/// tc and XDP programs run with bottom halves off and do not nest on a CPU.
#[inline(always)]
pub fn parsed() -> Option<&'static mut Packet> {
    PACKET.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// The common packet read straight from its headers, for `conntrack::established`.
pub struct Plain {
    pub src: u32,
    pub dst: u32,
    pub proto: u8,
    pub tcp_flags: u8,
    /// Host byte order, as `Packet`'s.
    pub sport: u16,
    pub dport: u16,
    pub seg: Seg,
}

/// An untagged IPv4 packet without options or fragmentation, carrying TCP or UDP, its headers
/// in the linear area. Anything else is None and goes through `parse`.
#[inline(always)]
pub fn plain_ipv4<C: PacketCtx>(ctx: &C) -> Option<Plain> {
    // Ethernet (14) and IPv4 without options (20).
    let h = hdr::<34, C>(ctx, 0).ok()?;
    if be16(h, 12) != ETH_P_IP || h[14] != 0x45 || be16(h, 20) & 0x3fff != 0 {
        return None;
    }
    let proto = h[23];
    let (sport, dport, tcp_flags, seg) = match proto {
        IPPROTO_TCP => {
            let t = hdr::<20, C>(ctx, 34).ok()?;
            let seg = Seg::of(t, 34, 14 + be16(h, 16) as usize);
            (be16(t, 0), be16(t, 2), t[13], seg)
        }
        IPPROTO_UDP => {
            let u = hdr::<8, C>(ctx, 34).ok()?;
            (be16(u, 0), be16(u, 2), 0, Seg::default())
        }
        _ => return None,
    };
    Some(Plain {
        src: raw32(h, 26),
        dst: raw32(h, 30),
        proto,
        tcp_flags,
        sport,
        dport,
        seg,
    })
}

/// What NAT leaves of an untagged IPv4 packet: its total length and identification, raw.
#[inline(always)]
pub fn ipv4_ident<C: PacketCtx>(ctx: &C) -> Option<u32> {
    let h = hdr::<20, C>(ctx, 14).ok()?;
    Some(raw32(h, 2))
}

/// The sequence number of a TCP segment in an untagged IPv4 packet without options.
#[inline(always)]
pub fn tcp_seq<C: PacketCtx>(ctx: &C) -> Option<u32> {
    let t = hdr::<8, C>(ctx, 34).ok()?;
    Some(u32::from_be_bytes([t[4], t[5], t[6], t[7]]))
}

/// Parses the packet; on failure returns the stats index that accounts for it.
#[inline(always)]
pub fn parse<C: PacketCtx>(ctx: &C) -> Result<Packet, u32> {
    // GSO and some drivers leave headers outside the linear area: pull once, up front, so
    // direct access sees them.
    let linear = (ctx.data_end() - ctx.data()) as u32;
    let len = ctx.len();
    if linear < PULL_LEN && linear < len {
        let want = if len < PULL_LEN { len } else { PULL_LEN };
        ctx.pull(want);
    }

    let (proto, off) = l2(ctx)?;
    match proto {
        ETH_P_IP => parse_ipv4(ctx, off),
        ETH_P_IPV6 => parse_ipv6(ctx, off),
        _ => Err(stat::NON_IP),
    }
}

/// Ethernet and up to two VLAN tags: the network protocol and the offset of its header.
#[inline(always)]
fn l2<C: PacketCtx>(ctx: &C) -> Result<(u16, usize), u32> {
    let eth = hdr::<ETH_HLEN, C>(ctx, 0)?;
    let mut proto = be16(eth, 12);
    let mut off = ETH_HLEN;
    if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
        proto = be16(hdr::<4, C>(ctx, off)?, 2);
        off += 4;
        if proto == ETH_P_8021Q {
            proto = be16(hdr::<4, C>(ctx, off)?, 2);
            off += 4;
        }
    }
    Ok((proto, off))
}

#[inline(always)]
fn parse_ipv4<C: PacketCtx>(ctx: &C, l3: usize) -> Result<Packet, u32> {
    let ip = hdr::<20, C>(ctx, l3)?;
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    if ip[0] >> 4 != 4 || ihl < 20 {
        return Err(stat::TRUNCATED);
    }
    let frag = be16(ip, 6);
    let proto = ip[9];
    let mut pkt = Packet {
        family: AF_INET,
        proto,
        tcp_flags: 0,
        icmp_type: 0,
        icmp_code: 0,
        outside: 0,
        untranslated: 0,
        src: [raw32(ip, 12), 0, 0, 0],
        dst: [raw32(ip, 16), 0, 0, 0],
        sport: 0,
        dport: 0,
        l3_off: l3 as u16,
        seq: 0,
        seg: Seg::default(),
    };
    let more_frags = frag & 0x2000 != 0;
    let frag_off = frag & 0x1fff;
    let id = be16(ip, 4) as u32;
    if frag_off != 0 {
        return later_fragment(pkt, id);
    }
    parse_l4(ctx, &mut pkt, l3 + ihl, l3 + be16(ip, 2) as usize)?;
    if more_frags {
        remember_fragment(&pkt, id);
    }
    Ok(pkt)
}

#[inline(always)]
fn parse_ipv6<C: PacketCtx>(ctx: &C, l3: usize) -> Result<Packet, u32> {
    let ip = hdr::<40, C>(ctx, l3)?;
    if ip[0] >> 4 != 6 {
        return Err(stat::TRUNCATED);
    }
    let mut nexthdr = ip[6];
    let ip_end = l3 + 40 + be16(ip, 4) as usize;
    let mut pkt = Packet {
        family: AF_INET6,
        proto: 0,
        tcp_flags: 0,
        icmp_type: 0,
        icmp_code: 0,
        outside: 0,
        untranslated: 0,
        src: [raw32(ip, 8), raw32(ip, 12), raw32(ip, 16), raw32(ip, 20)],
        dst: [raw32(ip, 24), raw32(ip, 28), raw32(ip, 32), raw32(ip, 36)],
        sport: 0,
        dport: 0,
        l3_off: l3 as u16,
        seq: 0,
        seg: Seg::default(),
    };
    let mut off = l3 + 40;
    let mut frag: Option<(u32, bool)> = None;
    let mut done = false;
    for _ in 0..MAX_IPV6_EXT {
        match nexthdr {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let h = hdr::<8, C>(ctx, off)?;
                nexthdr = h[0];
                off += (h[1] as usize + 1) * 8;
            }
            NEXTHDR_AUTH => {
                let h = hdr::<8, C>(ctx, off)?;
                nexthdr = h[0];
                off += (h[1] as usize + 2) * 4;
            }
            NEXTHDR_FRAGMENT => {
                let h = hdr::<8, C>(ctx, off)?;
                let offlg = be16(h, 2);
                let id = raw32(h, 4);
                nexthdr = h[0];
                off += 8;
                if offlg & 0xfff8 != 0 {
                    pkt.proto = nexthdr;
                    return later_fragment(pkt, id);
                }
                if offlg & 1 != 0 {
                    frag = Some((id, true));
                }
            }
            _ => {
                done = true;
                break;
            }
        }
        // Keeps the offset provably small for the verifier.
        if off > 1024 {
            return Err(stat::IPV6_EXT_LIMIT);
        }
    }
    if !done {
        return Err(stat::IPV6_EXT_LIMIT);
    }
    pkt.proto = nexthdr;
    if nexthdr == NEXTHDR_NONE {
        return Ok(pkt);
    }
    parse_l4(ctx, &mut pkt, off, ip_end)?;
    if let Some((id, true)) = frag {
        remember_fragment(&pkt, id);
    }
    Ok(pkt)
}

#[inline(always)]
fn parse_l4<C: PacketCtx>(ctx: &C, pkt: &mut Packet, l4: usize, ip_end: usize) -> Result<(), u32> {
    if l4 > 1100 {
        return Err(stat::TRUNCATED);
    }
    match pkt.proto {
        IPPROTO_TCP => {
            let h = hdr::<20, C>(ctx, l4)?;
            pkt.sport = be16(h, 0);
            pkt.dport = be16(h, 2);
            pkt.tcp_flags = h[13];
            pkt.seq = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
            pkt.seg = Seg::of(h, l4, ip_end);
        }
        IPPROTO_UDP => {
            let h = hdr::<8, C>(ctx, l4)?;
            pkt.sport = be16(h, 0);
            pkt.dport = be16(h, 2);
        }
        IPPROTO_SCTP => {
            let h = hdr::<12, C>(ctx, l4)?;
            pkt.sport = be16(h, 0);
            pkt.dport = be16(h, 2);
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let h = hdr::<8, C>(ctx, l4)?;
            let (ty, code) = (h[0], h[1]);
            pkt.icmp_type = ty;
            pkt.icmp_code = code;
            if pkt.proto == IPPROTO_ICMPV6 && (133..=137).contains(&ty) {
                return Err(stat::ICMPV6_ND);
            }
            let (request, reply) = if pkt.proto == IPPROTO_ICMP {
                (8, 0)
            } else {
                (128, 129)
            };
            if ty == request {
                pkt.sport = be16(h, 4);
            } else if ty == reply {
                pkt.dport = be16(h, 4);
            } else {
                // Not a query: keep type and code visible in the flow key.
                pkt.sport = ((ty as u16) << 8) | code as u16;
            }
        }
        _ => {}
    }
    Ok(())
}

#[inline(always)]
fn frag_key(pkt: &Packet, id: u32) -> FragKey {
    FragKey {
        src: pkt.src,
        dst: pkt.dst,
        id,
        proto: pkt.proto,
        family: pkt.family,
        _pad: [0; 2],
    }
}

#[inline(always)]
fn remember_fragment(pkt: &Packet, id: u32) {
    let ports = FragPorts {
        sport: pkt.sport,
        dport: pkt.dport,
    };
    let _ = FRAGS.insert(&frag_key(pkt, id), &ports, 0);
}

/// A non-first fragment has no L4 header: it takes the ports its first fragment carried, or is
/// reported as unattributable.
#[inline(always)]
fn later_fragment(mut pkt: Packet, id: u32) -> Result<Packet, u32> {
    match unsafe { FRAGS.get(&frag_key(&pkt, id)) } {
        Some(p) => {
            pkt.sport = p.sport;
            pkt.dport = p.dport;
            Ok(pkt)
        }
        None => Err(stat::FRAGMENT),
    }
}

/// Family and addresses of an IP packet whose header is intact, for packets whose L4 could not
/// be parsed. `None` for non-IP frames or a broken IP header.
#[inline(always)]
pub fn ip_addrs<C: PacketCtx>(ctx: &C) -> Option<(u8, [u32; 4], [u32; 4])> {
    let (proto, off) = l2(ctx).ok()?;
    if proto == ETH_P_IP {
        let ip = hdr::<20, C>(ctx, off).ok()?;
        Some((AF_INET, [raw32(ip, 12), 0, 0, 0], [raw32(ip, 16), 0, 0, 0]))
    } else if proto == ETH_P_IPV6 {
        let ip = hdr::<40, C>(ctx, off).ok()?;
        Some((
            AF_INET6,
            [raw32(ip, 8), raw32(ip, 12), raw32(ip, 16), raw32(ip, 20)],
            [raw32(ip, 24), raw32(ip, 28), raw32(ip, 32), raw32(ip, 36)],
        ))
    } else {
        None
    }
}
