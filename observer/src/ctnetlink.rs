//! The kernel's own connection tracking, read over ctnetlink (`NETLINK_NETFILTER`).
//!
//! Our eBPF conntrack sees a pod's connection before the node's netfilter rewrites it; what the
//! wire sees after MASQUERADE only the kernel's conntrack knows. Every kernel entry carries the
//! original tuple (as the pod sent it) and the reply tuple (as replies arrive, i.e. after NAT),
//! so the translation is read exactly, by tuple, never guessed from timing. Conntrack kfuncs
//! cannot give us this (they look up one tuple from a program, and not at NAT time), hence raw
//! nfnetlink: events for new and destroyed entries, a dump to resync after an overrun, and an
//! exact GET by original tuple.
//!
//! Events are lossy by design: when the socket's receive buffer is full the kernel drops them
//! and reports `ENOBUFS` (we keep `NETLINK_NO_ENOBUFS` off to hear about it), and the caller
//! resyncs with [`dump`].
//!
//! With the default `net.netfilter.nf_conntrack_events = 2`, the kernel only attaches event
//! state to entries created while a listener is subscribed: entries older than the first
//! [`Listener`] never produce a destroy event, which is one more reason to start with a dump.
use std::{
    fmt, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, OwnedFd, RawFd},
    time::Duration,
};

use tokio::io::unix::AsyncFd;

// include/uapi/linux/netfilter/nfnetlink.h, nfnetlink_conntrack.h, linux/netlink.h.
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const NFNLGRP_CONNTRACK_NEW: u32 = 1;
const NFNLGRP_CONNTRACK_DESTROY: u32 = 3;
const NFNETLINK_V0: u8 = 0;

const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_DUMP: u16 = 0x300;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_ID: u16 = 12;
const CTA_ZONE: u16 = 18;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_PROTO_ICMP_ID: u16 = 4;
const CTA_PROTO_ICMP_TYPE: u16 = 5;
const CTA_PROTO_ICMP_CODE: u16 = 6;
const CTA_PROTO_ICMPV6_ID: u16 = 7;
const CTA_PROTO_ICMPV6_TYPE: u16 = 8;
const CTA_PROTO_ICMPV6_CODE: u16 = 9;

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_ICMPV6: u8 = 58;
/// (echo request, echo reply) per ICMP version.
const ICMP_ECHO: (u8, u8) = (8, 0);
const ICMPV6_ECHO: (u8, u8) = (128, 129);

/// Large enough for any datagram the kernel builds for us: events are one entry each, and dump
/// skbs are capped at 32 KiB. `MSG_TRUNC` still tells us if that ever stops being true.
const RECV_BUF: usize = 64 * 1024;
/// Datagrams one `read_pending` call takes at most, so an event flood cannot starve the caller.
const MAX_DATAGRAMS_PER_READ: usize = 16 * 1024;
/// How long a dump or GET waits for the kernel's next datagram.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// One direction of a connection as its packets look on the wire. Ports in host order.
///
/// ICMP/ICMPv6 follow the eBPF flow key (`observer-ebpf/src/parse.rs`) so tuples join with it:
/// an echo request carries the identifier as the source port (`sport = id, dport = 0`), an echo
/// reply as the destination port (`sport = 0, dport = id`). The original tuple of a ping is
/// therefore `(pod, id) -> (dst, 0)` and its reply tuple `(dst, 0) -> (node, id')`, where `id'`
/// is the identifier after SNAT. Other ICMP queries tracked by the kernel (timestamp, ...) are
/// keyed by `sport = type << 8 | code, dport = 0`, also as the eBPF parser does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tuple {
    pub proto: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
}

impl fmt::Display for Tuple {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sa = |ip: IpAddr, port: u16| match ip {
            IpAddr::V4(a) => format!("{a}:{port}"),
            IpAddr::V6(a) => format!("[{a}]:{port}"),
        };
        write!(
            f,
            "proto {} {} -> {}",
            self.proto,
            sa(self.src, self.sport),
            sa(self.dst, self.dport)
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CtEventKind {
    /// A new entry (event with `NLM_F_CREATE`), or any entry of a dump or GET.
    New,
    /// A change to an existing entry. The [`Listener`] does not subscribe to these; they only
    /// appear if some other code path hands us such a message.
    Update,
    Destroy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtEvent {
    pub kind: CtEventKind,
    /// `CTA_ID`: the kernel's id of the entry (0 if the kernel sent none).
    pub id: u32,
    pub orig: Tuple,
    pub reply: Tuple,
    /// `CTA_ZONE` (0 if absent).
    pub zone: u16,
}

fn is_icmp(proto: u8) -> bool {
    proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6
}

impl CtEvent {
    /// The source as the wire sees it when the connection's source was translated:
    /// `Some((reply.dst, reply.dport))` when that differs from `(orig.src, orig.sport)`.
    ///
    /// For ICMP echo the identifier sits in `reply.dport` (see [`Tuple`]), so the same rule
    /// holds; for other ICMP queries no identifier is keyed and only the address counts.
    pub fn snat(&self) -> Option<(IpAddr, u16)> {
        let port = if is_icmp(self.orig.proto) && self.reply.sport != 0 {
            self.orig.sport
        } else {
            self.reply.dport
        };
        let wire = (self.reply.dst, port);
        (wire != (self.orig.src, self.orig.sport)).then_some(wire)
    }

    /// The destination as the wire sees it when it was translated (DNAT, e.g. a Service):
    /// `Some((reply.src, reply.sport))` when that differs from `(orig.dst, orig.dport)`.
    /// ICMP keys no destination port, so only the address counts there.
    pub fn dnat(&self) -> Option<(IpAddr, u16)> {
        let port = if is_icmp(self.orig.proto) {
            self.orig.dport
        } else {
            self.reply.sport
        };
        let wire = (self.reply.src, port);
        (wire != (self.orig.dst, self.orig.dport)).then_some(wire)
    }
}

/// Why a message from the kernel could not be read. Never expected from a sane kernel; we
/// skip such messages (counted) rather than trust half of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// A header or attribute claims more bytes than there are.
    Truncated(&'static str),
    /// A required attribute is absent.
    Missing(&'static str),
    /// An attribute has the wrong size for its type.
    BadLength { attr: &'static str, len: usize },
    /// Source and destination of a tuple are of different families.
    MixedFamilies,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::Truncated(what) => write!(f, "ctnetlink: truncated {what}"),
            ParseError::Missing(what) => write!(f, "ctnetlink: missing {what}"),
            ParseError::BadLength { attr, len } => {
                write!(f, "ctnetlink: attribute {attr} has length {len}")
            }
            ParseError::MixedFamilies => write!(f, "ctnetlink: tuple mixes IPv4 and IPv6"),
        }
    }
}

impl std::error::Error for ParseError {}

impl From<ParseError> for io::Error {
    fn from(e: ParseError) -> Self {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing

struct Msg<'a> {
    ty: u16,
    flags: u16,
    seq: u32,
    payload: &'a [u8],
}

/// The netlink messages of one datagram. Stops at the first malformed header: nothing after it
/// can be located.
fn messages(buf: &[u8]) -> impl Iterator<Item = Result<Msg<'_>, ParseError>> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let Some(hdr) = rest.get(..NLMSG_HDRLEN) else {
            rest = &[];
            return Some(Err(ParseError::Truncated("netlink header")));
        };
        let len = u32::from_ne_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            rest = &[];
            return Some(Err(ParseError::Truncated("netlink message")));
        }
        let msg = Msg {
            ty: u16::from_ne_bytes([hdr[4], hdr[5]]),
            flags: u16::from_ne_bytes([hdr[6], hdr[7]]),
            seq: u32::from_ne_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]),
            payload: &rest[NLMSG_HDRLEN..len],
        };
        rest = rest.get(align4(len)..).unwrap_or(&[]);
        Some(Ok(msg))
    })
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// The attributes in `buf` as (type without flags, value).
fn attrs(buf: &[u8]) -> impl Iterator<Item = Result<(u16, &[u8]), ParseError>> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        // Trailing bytes shorter than an attribute header are padding.
        if rest.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
        let ty = u16::from_ne_bytes([rest[2], rest[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > rest.len() {
            rest = &[];
            return Some(Err(ParseError::Truncated("attribute")));
        }
        let value = &rest[4..len];
        rest = rest.get(align4(len)..).unwrap_or(&[]);
        Some(Ok((ty, value)))
    })
}

fn be16(attr: &'static str, v: &[u8]) -> Result<u16, ParseError> {
    let b: [u8; 2] = v
        .try_into()
        .map_err(|_| ParseError::BadLength { attr, len: v.len() })?;
    Ok(u16::from_be_bytes(b))
}

fn be32(attr: &'static str, v: &[u8]) -> Result<u32, ParseError> {
    let b: [u8; 4] = v
        .try_into()
        .map_err(|_| ParseError::BadLength { attr, len: v.len() })?;
    Ok(u32::from_be_bytes(b))
}

fn u8_attr(attr: &'static str, v: &[u8]) -> Result<u8, ParseError> {
    match v {
        [b] => Ok(*b),
        _ => Err(ParseError::BadLength { attr, len: v.len() }),
    }
}

fn v4(attr: &'static str, v: &[u8]) -> Result<IpAddr, ParseError> {
    let b: [u8; 4] = v
        .try_into()
        .map_err(|_| ParseError::BadLength { attr, len: v.len() })?;
    Ok(IpAddr::V4(Ipv4Addr::from(b)))
}

fn v6(attr: &'static str, v: &[u8]) -> Result<IpAddr, ParseError> {
    let b: [u8; 16] = v
        .try_into()
        .map_err(|_| ParseError::BadLength { attr, len: v.len() })?;
    Ok(IpAddr::V6(Ipv6Addr::from(b)))
}

/// A `CTA_TUPLE_*` nest, with ICMP mapped onto ports as [`Tuple`] documents.
fn parse_tuple(buf: &[u8]) -> Result<Tuple, ParseError> {
    let (mut src, mut dst, mut proto) = (None, None, None);
    let (mut sport, mut dport) = (0, 0);
    let (mut icmp_id, mut icmp_type, mut icmp_code) = (None, None, 0u8);
    for a in attrs(buf) {
        let (ty, v) = a?;
        match ty {
            CTA_TUPLE_IP => {
                for a in attrs(v) {
                    let (ty, v) = a?;
                    match ty {
                        CTA_IP_V4_SRC => src = Some(v4("CTA_IP_V4_SRC", v)?),
                        CTA_IP_V4_DST => dst = Some(v4("CTA_IP_V4_DST", v)?),
                        CTA_IP_V6_SRC => src = Some(v6("CTA_IP_V6_SRC", v)?),
                        CTA_IP_V6_DST => dst = Some(v6("CTA_IP_V6_DST", v)?),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for a in attrs(v) {
                    let (ty, v) = a?;
                    match ty {
                        CTA_PROTO_NUM => proto = Some(u8_attr("CTA_PROTO_NUM", v)?),
                        CTA_PROTO_SRC_PORT => sport = be16("CTA_PROTO_SRC_PORT", v)?,
                        CTA_PROTO_DST_PORT => dport = be16("CTA_PROTO_DST_PORT", v)?,
                        CTA_PROTO_ICMP_ID | CTA_PROTO_ICMPV6_ID => {
                            icmp_id = Some(be16("CTA_PROTO_ICMP_ID", v)?)
                        }
                        CTA_PROTO_ICMP_TYPE | CTA_PROTO_ICMPV6_TYPE => {
                            icmp_type = Some(u8_attr("CTA_PROTO_ICMP_TYPE", v)?)
                        }
                        CTA_PROTO_ICMP_CODE | CTA_PROTO_ICMPV6_CODE => {
                            icmp_code = u8_attr("CTA_PROTO_ICMP_CODE", v)?
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    let src = src.ok_or(ParseError::Missing("tuple source address"))?;
    let dst = dst.ok_or(ParseError::Missing("tuple destination address"))?;
    if src.is_ipv4() != dst.is_ipv4() {
        return Err(ParseError::MixedFamilies);
    }
    let proto = proto.ok_or(ParseError::Missing("CTA_PROTO_NUM"))?;
    if is_icmp(proto) {
        let (request, reply) = if proto == IPPROTO_ICMP {
            ICMP_ECHO
        } else {
            ICMPV6_ECHO
        };
        let ty = icmp_type.ok_or(ParseError::Missing("CTA_PROTO_ICMP_TYPE"))?;
        let id = icmp_id.unwrap_or(0);
        (sport, dport) = if ty == request {
            (id, 0)
        } else if ty == reply {
            (0, id)
        } else {
            ((u16::from(ty) << 8) | u16::from(icmp_code), 0)
        };
    }
    Ok(Tuple {
        proto,
        src,
        dst,
        sport,
        dport,
    })
}

/// One ctnetlink message. `Ok(None)` for messages that are not conntrack entries (other
/// subsystems, expectations, control messages).
fn parse_entry(msg: &Msg<'_>) -> Result<Option<CtEvent>, ParseError> {
    if msg.ty >> 8 != NFNL_SUBSYS_CTNETLINK {
        return Ok(None);
    }
    let kind = match msg.ty & 0xff {
        IPCTNL_MSG_CT_NEW if msg.flags & (NLM_F_CREATE | NLM_F_EXCL) != 0 => CtEventKind::New,
        IPCTNL_MSG_CT_NEW => CtEventKind::Update,
        IPCTNL_MSG_CT_DELETE => CtEventKind::Destroy,
        _ => return Ok(None),
    };
    let body = msg
        .payload
        .get(NFGENMSG_LEN..)
        .ok_or(ParseError::Truncated("nfgenmsg"))?;
    let (mut orig, mut reply, mut id, mut zone) = (None, None, 0, 0);
    for a in attrs(body) {
        let (ty, v) = a?;
        match ty {
            CTA_TUPLE_ORIG => orig = Some(parse_tuple(v)?),
            CTA_TUPLE_REPLY => reply = Some(parse_tuple(v)?),
            CTA_ID => id = be32("CTA_ID", v)?,
            CTA_ZONE => zone = be16("CTA_ZONE", v)?,
            _ => {}
        }
    }
    Ok(Some(CtEvent {
        kind,
        id,
        orig: orig.ok_or(ParseError::Missing("CTA_TUPLE_ORIG"))?,
        reply: reply.ok_or(ParseError::Missing("CTA_TUPLE_REPLY"))?,
        zone,
    }))
}

/// Every conntrack event of a multicast datagram into `out`; returns how many messages were
/// malformed and skipped.
fn parse_events(buf: &[u8], out: &mut Vec<CtEvent>) -> u64 {
    let mut bad = 0;
    for m in messages(buf) {
        match m.and_then(|m| parse_entry(&m)) {
            Ok(Some(ev)) => out.push(ev),
            Ok(None) => {}
            Err(e) => {
                bad += 1;
                tracing::warn!("skipping a conntrack event: {e}");
            }
        }
    }
    bad
}

// ---------------------------------------------------------------------------------------------
// Sockets

fn socket() -> io::Result<OwnedFd> {
    crate::netlink::open(libc::NETLINK_NETFILTER)
}

fn setsockopt_int(fd: &OwnedFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What a [`Listener`]'s socket filter keeps: the kernel drops the rest before it is queued,
/// so the reader is neither woken nor copied what it would skip.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only IPv4 connections whose original source is in this range (inclusive); other
    /// families pass.
    pub v4_sources: Option<(Ipv4Addr, Ipv4Addr)>,
    /// Only TCP connections the kernel translated, the source or the destination
    /// (`IPS_SRC_NAT`, `IPS_DST_NAT` in the entry's status); other protocols pass.
    pub tcp_translated_only: bool,
}

/// `IPS_SRC_NAT` and `IPS_DST_NAT` of `CTA_STATUS` (linux/netfilter/nf_conntrack_common.h):
/// the kernel set up a translation that changed the tuple (masquerade, SNAT, a clash's port
/// change; DNAT, a Service, a redirect).
const IPS_NAT: u32 = (1 << 4) | (1 << 5);
const CTA_STATUS: u16 = 3;

/// The classic BPF program of a [`Filter`]. The netlink attribute extensions find a top-level
/// attribute after the message and nfgenmsg headers (`CTA_STATUS`, `CTA_TUPLE_ORIG`) and one
/// nested in it (`CTA_TUPLE_PROTO` then `CTA_PROTO_NUM`, `CTA_TUPLE_IP` then
/// `CTA_IP_V4_SRC`); a message without what a test reads (not an entry, another family) is
/// kept, never dropped on a guess.
fn filter_program(f: &Filter) -> Vec<libc::sock_filter> {
    use bpf_asm::*;
    let base = (NLMSG_HDRLEN + NFGENMSG_LEN) as u32;
    let mut a = Asm::default();
    if f.tcp_translated_only {
        // Translated: on to the source test.
        a.op(LD_IMM, base);
        a.op(LDX_IMM, CTA_STATUS.into());
        a.op(LD_W_ABS, AD_NLATTR);
        a.jump(JEQ, 0, To::Label("source"), To::Next);
        a.op(TAX, 0);
        a.op(LD_W_IND, 4);
        a.jump(JSET, IPS_NAT, To::Label("source"), To::Next);
        // Untranslated: dropped if TCP.
        a.find(
            base,
            [CTA_TUPLE_ORIG, CTA_TUPLE_PROTO, CTA_PROTO_NUM],
            To::Label("source"),
        );
        a.op(LD_B_IND, 4);
        a.jump(
            JEQ,
            IPPROTO_TCP.into(),
            To::Label("drop"),
            To::Label("source"),
        );
    }
    a.label("source");
    if let Some((lo, hi)) = f.v4_sources {
        a.find(
            base,
            [CTA_TUPLE_ORIG, CTA_TUPLE_IP, CTA_IP_V4_SRC],
            To::Label("keep"),
        );
        // The address after the attribute's 4-byte header, in network order as loaded.
        a.op(LD_W_IND, 4);
        a.jump(JGE, u32::from(lo), To::Next, To::Label("drop"));
        a.jump(JGT, u32::from(hi), To::Label("drop"), To::Label("keep"));
    }
    a.label("keep");
    a.op(RET, u32::MAX);
    a.label("drop");
    a.op(RET, 0);
    a.finish()
}

/// A few classic BPF instructions (linux/filter.h, linux/bpf_common.h) and jumps by label,
/// resolved into the forward offsets the kernel takes.
mod bpf_asm {
    pub const LD_IMM: u16 = 0x00;
    pub const LDX_IMM: u16 = 0x01;
    pub const LD_W_ABS: u16 = 0x20;
    pub const LD_W_IND: u16 = 0x40;
    pub const LD_B_IND: u16 = 0x50;
    pub const TAX: u16 = 0x07;
    pub const JEQ: u16 = 0x15;
    pub const JGT: u16 = 0x25;
    pub const JGE: u16 = 0x35;
    pub const JSET: u16 = 0x45;
    pub const RET: u16 = 0x06;
    const AD_OFF: u32 = (-0x1000i32) as u32;
    /// `A` = offset of the first attribute of type `X` from offset `A` on (0: none).
    pub const AD_NLATTR: u32 = AD_OFF + 12;
    /// `A` = offset of the attribute of type `X` nested in the attribute at offset `A`.
    pub const AD_NLATTR_NEST: u32 = AD_OFF + 16;

    #[derive(Clone, Copy)]
    pub enum To {
        Next,
        Label(&'static str),
    }

    #[derive(Default)]
    pub struct Asm {
        ops: Vec<(u16, u32, To, To)>,
        labels: Vec<(&'static str, usize)>,
    }

    impl Asm {
        pub fn op(&mut self, code: u16, k: u32) {
            self.ops.push((code, k, To::Next, To::Next));
        }
        pub fn jump(&mut self, code: u16, k: u32, jt: To, jf: To) {
            self.ops.push((code, k, jt, jf));
        }
        /// `X` = offset of the attribute `path[2]`, nested in `path[1]`, nested in the
        /// top-level `path[0]` after `base`; on to `missing` when one of them is absent.
        pub fn find(&mut self, base: u32, path: [u16; 3], missing: To) {
            self.op(LD_IMM, base);
            self.op(LDX_IMM, path[0].into());
            self.op(LD_W_ABS, AD_NLATTR);
            self.jump(JEQ, 0, missing, To::Next);
            for attr in &path[1..] {
                self.op(LDX_IMM, (*attr).into());
                self.op(LD_W_ABS, AD_NLATTR_NEST);
                self.jump(JEQ, 0, missing, To::Next);
            }
            self.op(TAX, 0);
        }

        /// Names the next instruction.
        pub fn label(&mut self, name: &'static str) {
            self.labels.push((name, self.ops.len()));
        }
        /// Panics on a label never placed or behind its jump: a fault of this file's
        /// programs, caught by their unit tests.
        pub fn finish(self) -> Vec<libc::sock_filter> {
            let at = |to: To, i: usize| -> u8 {
                let target = match to {
                    To::Next => i + 1,
                    To::Label(l) => {
                        self.labels
                            .iter()
                            .find(|(n, _)| *n == l)
                            .unwrap_or_else(|| panic!("label {l} not placed"))
                            .1
                    }
                };
                u8::try_from(target - (i + 1)).expect("a forward jump of at most 255")
            };
            self.ops
                .iter()
                .enumerate()
                .map(|(i, &(code, k, jt, jf))| libc::sock_filter {
                    code,
                    jt: at(jt, i),
                    jf: at(jf, i),
                    k,
                })
                .collect()
        }
    }
}

/// What one [`Listener::read_batch`] found besides its events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Batch {
    /// Events were lost (`ENOBUFS`, or a datagram too large): resync with [`dump`].
    pub overrun: bool,
    /// The socket said it had nothing more (`EAGAIN`).
    pub emptied: bool,
}

/// What one `recv` produced.
#[derive(Clone, Copy)]
enum Recv {
    /// A datagram of this many bytes from the kernel, whole.
    Data(usize),
    /// A datagram larger than the buffer; its rest is gone.
    Truncated,
    /// A datagram not sent by the kernel (port id != 0): ignored.
    Foreign,
}

/// One datagram into `buf`. `MSG_TRUNC` makes netlink report the real length, so truncation is
/// seen instead of parsing half a message.
fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<Recv> {
    let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    let mut sa_len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
    let n = unsafe {
        libc::recvfrom(
            fd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_TRUNC,
            (&mut sa as *mut libc::sockaddr_nl).cast(),
            &mut sa_len,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Recv::of(sa.nl_pid, n as usize, buf.len(), 0))
}

impl Recv {
    /// A datagram from port `nl_pid`, `len` bytes long (its full length: received with
    /// `MSG_TRUNC`) into `room` bytes, with the `msg_flags` it came with.
    fn of(nl_pid: u32, len: usize, room: usize, msg_flags: i32) -> Recv {
        if nl_pid != 0 {
            Recv::Foreign
        } else if len > room || msg_flags & libc::MSG_TRUNC != 0 {
            Recv::Truncated
        } else {
            Recv::Data(len)
        }
    }
}

/// Event datagrams one `recvmmsg` call takes, and the room for each: an event is one entry, a
/// few hundred bytes (one system call per event was most of the reader's cost).
const EVENTS_PER_CALL: usize = 32;
const EVENT_SLOT: usize = 8 * 1024;

/// Up to `EVENTS_PER_CALL` datagrams into the slots of `buf`, their [`Recv`]s into `got`.
fn recv_many(fd: RawFd, buf: &mut [u8], got: &mut Vec<Recv>) -> io::Result<()> {
    let mut addrs: [libc::sockaddr_nl; EVENTS_PER_CALL] = unsafe { std::mem::zeroed() };
    let mut iov: [libc::iovec; EVENTS_PER_CALL] = unsafe { std::mem::zeroed() };
    let mut msgs: [libc::mmsghdr; EVENTS_PER_CALL] = unsafe { std::mem::zeroed() };
    for (i, slot) in buf.chunks_exact_mut(EVENT_SLOT).enumerate() {
        iov[i] = libc::iovec {
            iov_base: slot.as_mut_ptr().cast(),
            iov_len: EVENT_SLOT,
        };
        let h = &mut msgs[i].msg_hdr;
        h.msg_name = (&mut addrs[i] as *mut libc::sockaddr_nl).cast();
        h.msg_namelen = std::mem::size_of::<libc::sockaddr_nl>() as u32;
        h.msg_iov = &mut iov[i];
        h.msg_iovlen = 1;
    }
    // MSG_TRUNC: netlink reports a datagram's full length, so a cut one is seen.
    let n = unsafe {
        libc::recvmmsg(
            fd,
            msgs.as_mut_ptr(),
            EVENTS_PER_CALL as u32,
            libc::MSG_TRUNC,
            std::ptr::null_mut(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    got.clear();
    for (m, a) in msgs.iter().zip(&addrs).take(n as usize) {
        got.push(Recv::of(
            a.nl_pid,
            m.msg_len as usize,
            EVENT_SLOT,
            m.msg_hdr.msg_flags,
        ));
    }
    Ok(())
}

/// Which conntrack events a [`Listener`] receives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Events {
    /// New entries only: half the messages of [`Events::NewAndDestroy`], for a reader that
    /// only needs to know how each connection was translated.
    New,
    NewAndDestroy,
}

/// A subscription to conntrack events of the current network namespace (the one the calling
/// thread is in when [`Listener::open`] runs; the socket stays there).
pub struct Listener {
    fd: OwnedFd,
    /// `EVENTS_PER_CALL` slots of `EVENT_SLOT` bytes.
    buf: Vec<u8>,
    got: Vec<Recv>,
    overruns: u64,
    malformed: u64,
}

impl Listener {
    /// `rcvbuf` bytes of receive buffer: `SO_RCVBUFFORCE` (we have `CAP_NET_ADMIN`) so
    /// `net.core.rmem_max` does not cap it, `SO_RCVBUF` without the capability. The kernel
    /// doubles the value for its bookkeeping, as for any socket.
    pub fn open(rcvbuf: usize, events: Events) -> io::Result<Self> {
        let fd = socket()?;
        let size = i32::try_from(rcvbuf).unwrap_or(i32::MAX);
        if setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, size).is_err() {
            setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_RCVBUF, size)?;
        }
        // Off is the default; set anyway: losing events silently would leave the caller's
        // view wrong with no reason to resync.
        setsockopt_int(&fd, libc::SOL_NETLINK, libc::NETLINK_NO_ENOBUFS, 0)?;
        // Sized before subscribing, so no burst lands in the default buffer.
        let destroy = match events {
            Events::New => 0,
            Events::NewAndDestroy => 1 << (NFNLGRP_CONNTRACK_DESTROY - 1),
        };
        crate::netlink::bind(&fd, (1 << (NFNLGRP_CONNTRACK_NEW - 1)) | destroy)?;
        Ok(Self {
            fd,
            buf: vec![0; EVENTS_PER_CALL * EVENT_SLOT],
            got: Vec::with_capacity(EVENTS_PER_CALL),
            overruns: 0,
            malformed: 0,
        })
    }

    /// Reads every message currently queued (nonblocking) into `out`, up to a bound per call
    /// (16 Ki datagrams) so a flood cannot starve the caller. Returns `Ok(true)` if the kernel
    /// reported an overrun (`ENOBUFS`: events were lost, the caller must resync with [`dump`]),
    /// `Ok(false)` otherwise. A datagram too large for the buffer counts as an overrun too.
    pub fn read_pending(&mut self, out: &mut Vec<CtEvent>) -> io::Result<bool> {
        self.read_batch(out).map(|b| b.overrun)
    }

    /// [`Self::read_pending`], also saying whether the socket was left empty (`emptied`): then
    /// every event the kernel queued before the call was read (or, with `overrun`, lost).
    pub fn read_batch(&mut self, out: &mut Vec<CtEvent>) -> io::Result<Batch> {
        self.read_some(out)
            .map(|(overrun, emptied)| Batch { overrun, emptied })
    }

    /// Blocks until an event is queued (true) or `timeout` passed (false).
    pub fn wait(&self, timeout: std::time::Duration) -> io::Result<bool> {
        let mut p = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // Rounded up: a timeout under a millisecond rounded down to 0 made poll return at
        // once, and a caller waiting out a deadline spun until it passed.
        let ms = i32::try_from(timeout.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
        match unsafe { libc::poll(&mut p, 1, ms) } {
            n if n > 0 => Ok(true),
            0 => Ok(false),
            _ => match io::Error::last_os_error() {
                e if e.raw_os_error() == Some(libc::EINTR) => Ok(false),
                e => Err(e),
            },
        }
    }

    /// Has the kernel drop, before they are queued, the events `f` does not keep. Replaces any
    /// filter set before.
    pub fn set_filter(&self, f: &Filter) -> io::Result<()> {
        let mut prog = filter_program(f);
        let fprog = libc::sock_fprog {
            len: prog.len() as u16,
            filter: prog.as_mut_ptr(),
        };
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ATTACH_FILTER,
                (&fprog as *const libc::sock_fprog).cast(),
                std::mem::size_of::<libc::sock_fprog>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Overruns reported so far. One report can stand for any number of lost events.
    pub fn overruns(&self) -> u64 {
        self.overruns
    }

    /// Messages skipped because they could not be parsed.
    pub fn malformed(&self) -> u64 {
        self.malformed
    }

    /// (overrun, drained): drained when the socket said `EAGAIN`.
    fn read_some(&mut self, out: &mut Vec<CtEvent>) -> io::Result<(bool, bool)> {
        let mut overrun = false;
        for _ in 0..MAX_DATAGRAMS_PER_READ / EVENTS_PER_CALL {
            match recv_many(self.fd.as_raw_fd(), &mut self.buf, &mut self.got) {
                Ok(()) => {
                    for (i, r) in self.got.iter().enumerate() {
                        match *r {
                            Recv::Data(n) => {
                                let at = i * EVENT_SLOT;
                                self.malformed += parse_events(&self.buf[at..at + n], out);
                            }
                            Recv::Foreign => {}
                            Recv::Truncated => {
                                overrun = true;
                                self.overruns += 1;
                            }
                        }
                    }
                }
                Err(e) => match e.raw_os_error() {
                    Some(libc::EAGAIN) => return Ok((overrun, true)),
                    Some(libc::EINTR) => {}
                    // The error is cleared by reporting it; what is still queued is intact.
                    Some(libc::ENOBUFS) => {
                        overrun = true;
                        self.overruns += 1;
                    }
                    _ => return Err(e),
                },
            }
        }
        Ok((overrun, false))
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// A [`Listener`] on the tokio reactor.
pub struct AsyncListener {
    inner: AsyncFd<Listener>,
}

impl AsyncListener {
    pub fn new(l: Listener) -> io::Result<Self> {
        // `Listener` owns its socket for its whole life, as `readable` requires.
        Ok(Self {
            inner: crate::netlink::readable(l)?,
        })
    }

    /// Waits until at least one event arrived or an overrun was reported, then appends what
    /// is queued to `out`. Returns whether events were lost (resync with [`dump`]).
    pub async fn next_batch(&mut self, out: &mut Vec<CtEvent>) -> io::Result<bool> {
        loop {
            let mut guard = self.inner.readable_mut().await?;
            let before = out.len();
            let (overrun, drained) = guard.get_inner_mut().read_some(out)?;
            if drained {
                guard.clear_ready();
            }
            if overrun || out.len() > before {
                return Ok(overrun);
            }
        }
    }

    pub fn overruns(&self) -> u64 {
        self.inner.get_ref().overruns()
    }

    pub fn malformed(&self) -> u64 {
        self.inner.get_ref().malformed()
    }
}

// ---------------------------------------------------------------------------------------------
// Requests

/// A netlink message under construction.
struct Request {
    buf: Vec<u8>,
}

impl Request {
    fn new(msg_type: u16, flags: u16, seq: u32, family: u8) -> Self {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set in `finish`
        buf.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | msg_type).to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        buf.extend_from_slice(&[family, NFNETLINK_V0, 0, 0]);
        Self { buf }
    }

    fn put(&mut self, ty: u16, value: &[u8]) {
        let len = 4 + value.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(value);
        self.buf.resize(align4(self.buf.len()), 0);
    }

    fn nest(&mut self, ty: u16, f: impl FnOnce(&mut Self)) {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0, 0]);
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        f(self);
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }

    /// A `CTA_TUPLE_*` nest for `t`, the inverse of [`parse_tuple`].
    fn tuple(&mut self, ty: u16, t: &Tuple) {
        self.nest(ty, |r| {
            r.nest(CTA_TUPLE_IP, |r| match (t.src, t.dst) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    r.put(CTA_IP_V4_SRC, &s.octets());
                    r.put(CTA_IP_V4_DST, &d.octets());
                }
                _ => {
                    r.put(CTA_IP_V6_SRC, &v6_octets(t.src));
                    r.put(CTA_IP_V6_DST, &v6_octets(t.dst));
                }
            });
            r.nest(CTA_TUPLE_PROTO, |r| {
                r.put(CTA_PROTO_NUM, &[t.proto]);
                if is_icmp(t.proto) {
                    let (id_attr, type_attr, code_attr, (request, reply)) =
                        if t.proto == IPPROTO_ICMP {
                            (
                                CTA_PROTO_ICMP_ID,
                                CTA_PROTO_ICMP_TYPE,
                                CTA_PROTO_ICMP_CODE,
                                ICMP_ECHO,
                            )
                        } else {
                            (
                                CTA_PROTO_ICMPV6_ID,
                                CTA_PROTO_ICMPV6_TYPE,
                                CTA_PROTO_ICMPV6_CODE,
                                ICMPV6_ECHO,
                            )
                        };
                    // The original direction of an echo is the request; a reply-direction
                    // tuple (sport 0) is the reply.
                    let (id, ty) = if t.sport == 0 && t.dport != 0 {
                        (t.dport, reply)
                    } else {
                        (t.sport, request)
                    };
                    r.put(id_attr, &id.to_be_bytes());
                    r.put(type_attr, &[ty]);
                    r.put(code_attr, &[0]);
                } else {
                    r.put(CTA_PROTO_SRC_PORT, &t.sport.to_be_bytes());
                    r.put(CTA_PROTO_DST_PORT, &t.dport.to_be_bytes());
                }
            });
        });
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

fn v6_octets(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

fn send(fd: &OwnedFd, req: &[u8]) -> io::Result<()> {
    let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    sa.nl_family = libc::AF_NETLINK as u16;
    let rc = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            req.as_ptr().cast(),
            req.len(),
            0,
            (&sa as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sends `req` and feeds every reply message carrying `seq` to `f` until `f` says done.
/// `NLMSG_ERROR` with a nonzero code ends the exchange with that error.
fn exchange(
    req: &[u8],
    seq: u32,
    mut f: impl FnMut(&Msg<'_>) -> io::Result<bool>,
) -> io::Result<()> {
    let fd = socket()?;
    crate::netlink::bind(&fd, 0)?;
    send(&fd, req)?;
    let mut buf = vec![0u8; RECV_BUF];
    loop {
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let rc = unsafe { libc::poll(&mut pfd, 1, REPLY_TIMEOUT.as_millis() as i32) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if rc == 0 {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no reply from ctnetlink",
            ));
        }
        let n = match recv(fd.as_raw_fd(), &mut buf) {
            Ok(Recv::Data(n)) => n,
            Ok(Recv::Foreign) => continue,
            Ok(Recv::Truncated) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "ctnetlink reply larger than the receive buffer",
                ))
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EINTR)) => continue,
            Err(e) => return Err(e),
        };
        for m in messages(&buf[..n]) {
            let m = m?;
            if m.seq != seq {
                continue;
            }
            if m.ty == NLMSG_ERROR {
                let code = m
                    .payload
                    .get(..4)
                    .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                    .ok_or(ParseError::Truncated("netlink error"))?;
                if code != 0 {
                    return Err(io::Error::from_raw_os_error(-code));
                }
            }
            if f(&m)? {
                return Ok(());
            }
        }
    }
}

fn next_seq() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static SEQ: AtomicU32 = AtomicU32::new(1);
    SEQ.fetch_add(1, Ordering::Relaxed)
}

/// Every entry of the conntrack table of the current network namespace, both families, as
/// `CtEventKind::New`. The kernel walks its hash table across several datagrams without
/// locking it, so an entry created or destroyed during the dump may or may not be in it;
/// callers combine the dump with a [`Listener`] opened before it.
pub fn dump() -> io::Result<Vec<CtEvent>> {
    let seq = next_seq();
    // AF_UNSPEC: no family filter.
    let req = Request::new(
        IPCTNL_MSG_CT_GET,
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        libc::AF_UNSPEC as u8,
    )
    .finish();
    let mut out = Vec::new();
    exchange(&req, seq, |m| {
        if m.ty == NLMSG_DONE {
            // A dump that failed midway says so here.
            let code = m
                .payload
                .get(..4)
                .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
            if code < 0 {
                return Err(io::Error::from_raw_os_error(-code));
            }
            return Ok(true);
        }
        match parse_entry(m) {
            Ok(Some(ev)) => out.push(CtEvent {
                kind: CtEventKind::New,
                ..ev
            }),
            Ok(None) => {}
            // One bad entry should not cost the whole resync.
            Err(e) => tracing::warn!("skipping a conntrack entry of the dump: {e}"),
        }
        Ok(false)
    })?;
    Ok(out)
}

/// Exact lookup of one entry by its original tuple, in zone 0 (the kernel's key is the tuple and
/// the zone). `Ok(None)` when the kernel has
/// no such entry. An ICMP tuple is looked up as an echo request with identifier `sport`.
pub fn get(orig: &Tuple) -> io::Result<Option<CtEvent>> {
    let family = match (orig.src, orig.dst) {
        (IpAddr::V4(_), IpAddr::V4(_)) => libc::AF_INET,
        (IpAddr::V6(_), IpAddr::V6(_)) => libc::AF_INET6,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "tuple mixes IPv4 and IPv6",
            ))
        }
    };
    let seq = next_seq();
    // NLM_F_ACK: the success path then ends with an ack too, so we know when to stop.
    let mut req = Request::new(
        IPCTNL_MSG_CT_GET,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        family as u8,
    );
    req.tuple(CTA_TUPLE_ORIG, orig);
    let req = req.finish();
    let mut found = None;
    let res = exchange(&req, seq, |m| {
        if m.ty == NLMSG_ERROR {
            return Ok(true);
        }
        if let Some(ev) = parse_entry(m).map_err(io::Error::from)? {
            found = Some(CtEvent {
                kind: CtEventKind::New,
                ..ev
            });
        }
        Ok(false)
    });
    match res {
        Ok(()) => Ok(found),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_programs_jump_inside_themselves() {
        let keep_all = filter_program(&Filter::default());
        assert_eq!(keep_all.len(), 2);
        assert_eq!((keep_all[0].code, keep_all[0].k), (0x06, u32::MAX));
        let lo = "10.244.1.0".parse().unwrap();
        let hi = "10.244.1.255".parse().unwrap();
        for f in [
            Filter {
                v4_sources: Some((lo, hi)),
                tcp_translated_only: false,
            },
            Filter {
                v4_sources: None,
                tcp_translated_only: true,
            },
            Filter {
                v4_sources: Some((lo, hi)),
                tcp_translated_only: true,
            },
        ] {
            let p = filter_program(&f);
            let n = p.len();
            for (i, op) in p.iter().enumerate() {
                let jump = op.code & 0x07 == 0x05;
                assert!(
                    !jump || i + 1 + usize::from(op.jt.max(op.jf)) < n,
                    "{f:?}: {i}"
                );
            }
            // Ends keeping, then dropping; nothing falls off the end.
            assert_eq!((p[n - 2].code, p[n - 2].k), (0x06, u32::MAX));
            assert_eq!((p[n - 1].code, p[n - 1].k), (0x06, 0));
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn tuple(proto: u8, src: &str, sport: u16, dst: &str, dport: u16) -> Tuple {
        Tuple {
            proto,
            src: ip(src),
            dst: ip(dst),
            sport,
            dport,
        }
    }

    /// A message as the kernel sends it: header, nfgenmsg, both tuples, then the other
    /// attributes the kernel adds (status, timeout, id, zone) that we must walk past.
    fn message(msg_type: u16, flags: u16, orig: &Tuple, reply: &Tuple, id: u32) -> Vec<u8> {
        let family = if orig.src.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        } as u8;
        let mut r = Request::new(msg_type, flags, 0, family);
        r.tuple(CTA_TUPLE_ORIG, orig);
        r.tuple(CTA_TUPLE_REPLY, reply);
        r.put(3 /* CTA_STATUS */, &0x18eu32.to_be_bytes());
        r.put(7 /* CTA_TIMEOUT */, &120u32.to_be_bytes());
        r.put(CTA_ID, &id.to_be_bytes());
        r.put(CTA_ZONE, &0u16.to_be_bytes());
        r.finish()
    }

    fn parse_one(buf: &[u8]) -> CtEvent {
        let mut out = Vec::new();
        assert_eq!(parse_events(buf, &mut out), 0, "no malformed messages");
        assert_eq!(out.len(), 1);
        out[0]
    }

    #[test]
    fn ipv4_tcp_masquerade() {
        let orig = tuple(6, "10.244.1.5", 40000, "93.184.216.34", 443);
        let reply = tuple(6, "93.184.216.34", 443, "10.224.0.4", 61000);
        let msg = message(
            IPCTNL_MSG_CT_NEW,
            NLM_F_CREATE | NLM_F_EXCL,
            &orig,
            &reply,
            7,
        );
        let ev = parse_one(&msg);
        assert_eq!(ev.kind, CtEventKind::New);
        assert_eq!((ev.id, ev.zone), (7, 0));
        assert_eq!((ev.orig, ev.reply), (orig, reply));
        assert_eq!(ev.snat(), Some((ip("10.224.0.4"), 61000)));
        assert_eq!(ev.dnat(), None);
    }

    #[test]
    fn ipv6_udp_without_nat() {
        let orig = tuple(17, "fd00:10:244:1::5", 5353, "2001:db8::53", 53);
        let reply = tuple(17, "2001:db8::53", 53, "fd00:10:244:1::5", 5353);
        let ev = parse_one(&message(IPCTNL_MSG_CT_NEW, 0, &orig, &reply, u32::MAX));
        assert_eq!(ev.kind, CtEventKind::Update, "NEW without NLM_F_CREATE");
        assert_eq!((ev.orig, ev.reply, ev.id), (orig, reply, u32::MAX));
        assert_eq!(ev.snat(), None);
        assert_eq!(ev.dnat(), None);
        let ev = parse_one(&message(IPCTNL_MSG_CT_DELETE, 0, &orig, &reply, 1));
        assert_eq!(ev.kind, CtEventKind::Destroy);
    }

    #[test]
    fn port_only_snat_and_dnat() {
        // Same address, new port (masquerade resolving a clash); and a Service DNAT.
        let orig = tuple(17, "10.224.0.4", 5000, "10.0.0.10", 53);
        let reply = tuple(17, "10.244.2.7", 53, "10.224.0.4", 1025);
        let ev = parse_one(&message(IPCTNL_MSG_CT_NEW, NLM_F_CREATE, &orig, &reply, 1));
        assert_eq!(ev.snat(), Some((ip("10.224.0.4"), 1025)));
        assert_eq!(ev.dnat(), Some((ip("10.244.2.7"), 53)));
    }

    #[test]
    fn icmp_echo_follows_the_flow_key() {
        let orig = tuple(1, "10.244.1.5", 7, "1.1.1.1", 0);
        let reply = tuple(1, "1.1.1.1", 0, "10.224.0.4", 9);
        let ev = parse_one(&message(IPCTNL_MSG_CT_NEW, NLM_F_CREATE, &orig, &reply, 1));
        assert_eq!((ev.orig, ev.reply), (orig, reply));
        assert_eq!(ev.snat(), Some((ip("10.224.0.4"), 9)));
        assert_eq!(ev.dnat(), None);

        let orig = tuple(58, "fd00::5", 300, "2001:db8::1", 0);
        let reply = tuple(58, "2001:db8::1", 0, "fd00::5", 300);
        let ev = parse_one(&message(IPCTNL_MSG_CT_NEW, NLM_F_CREATE, &orig, &reply, 1));
        assert_eq!((ev.orig, ev.reply), (orig, reply));
        assert_eq!((ev.snat(), ev.dnat()), (None, None));
    }

    #[test]
    fn icmp_types_on_the_wire() {
        // Hand-built: a timestamp request (13) / reply (14), keyed by type and code.
        let mut r = Request::new(IPCTNL_MSG_CT_NEW, NLM_F_CREATE, 0, libc::AF_INET as u8);
        for (attr, ty, src, dst) in [
            (CTA_TUPLE_ORIG, 13u8, [10, 0, 0, 1], [10, 0, 0, 2]),
            (CTA_TUPLE_REPLY, 14u8, [10, 0, 0, 2], [10, 0, 0, 1]),
        ] {
            r.nest(attr, |r| {
                r.nest(CTA_TUPLE_IP, |r| {
                    r.put(CTA_IP_V4_SRC, &src);
                    r.put(CTA_IP_V4_DST, &dst);
                });
                r.nest(CTA_TUPLE_PROTO, |r| {
                    r.put(CTA_PROTO_NUM, &[1]);
                    r.put(CTA_PROTO_ICMP_ID, &77u16.to_be_bytes());
                    r.put(CTA_PROTO_ICMP_TYPE, &[ty]);
                    r.put(CTA_PROTO_ICMP_CODE, &[0]);
                });
            });
        }
        let ev = parse_one(&r.finish());
        assert_eq!((ev.orig.sport, ev.orig.dport), (13 << 8, 0));
        assert_eq!((ev.reply.sport, ev.reply.dport), (14 << 8, 0));
        assert_eq!((ev.snat(), ev.dnat()), (None, None));
    }

    #[test]
    fn get_request_round_trips() {
        for t in [
            tuple(6, "10.1.0.2", 40000, "10.2.0.2", 80),
            tuple(17, "fd01::2", 1, "fd02::2", 65535),
            tuple(1, "10.1.0.2", 4242, "10.2.0.2", 0),
            tuple(58, "fd01::2", 4242, "fd02::2", 0),
            tuple(132, "10.1.0.2", 9, "10.2.0.2", 10),
        ] {
            let mut r = Request::new(IPCTNL_MSG_CT_GET, NLM_F_REQUEST, 1, 0);
            r.tuple(CTA_TUPLE_ORIG, &t);
            let buf = r.finish();
            let m = messages(&buf).next().unwrap().unwrap();
            assert_eq!(m.ty, (1 << 8) | IPCTNL_MSG_CT_GET);
            let (ty, v) = attrs(&m.payload[4..]).next().unwrap().unwrap();
            assert_eq!(ty, CTA_TUPLE_ORIG);
            assert_eq!(parse_tuple(v), Ok(t));
        }
    }

    #[test]
    fn several_messages_per_datagram_and_foreign_ones() {
        let a = tuple(6, "10.0.0.1", 1, "10.0.0.2", 2);
        let b = tuple(6, "10.0.0.2", 2, "10.0.0.1", 1);
        let mut buf = message(IPCTNL_MSG_CT_NEW, NLM_F_CREATE, &a, &b, 1);
        // An expectation message (subsystem 2) is not an entry: skipped, not an error.
        let mut other = message(IPCTNL_MSG_CT_NEW, NLM_F_CREATE, &a, &b, 2);
        other[4..6].copy_from_slice(&((2u16 << 8) | IPCTNL_MSG_CT_NEW).to_ne_bytes());
        buf.extend_from_slice(&other);
        buf.extend_from_slice(&message(IPCTNL_MSG_CT_DELETE, 0, &a, &b, 3));
        let mut out = Vec::new();
        assert_eq!(parse_events(&buf, &mut out), 0);
        assert_eq!(out.iter().map(|e| e.id).collect::<Vec<_>>(), [1, 3]);
    }

    #[test]
    fn missing_or_malformed_attributes_are_errors() {
        let empty = Request::new(IPCTNL_MSG_CT_NEW, NLM_F_CREATE, 0, 2).finish();
        let m = messages(&empty).next().unwrap().unwrap();
        assert_eq!(parse_entry(&m), Err(ParseError::Missing("CTA_TUPLE_ORIG")));

        let mut r = Request::new(IPCTNL_MSG_CT_NEW, NLM_F_CREATE, 0, 2);
        r.nest(CTA_TUPLE_ORIG, |r| {
            r.nest(CTA_TUPLE_IP, |r| {
                r.put(CTA_IP_V4_SRC, &[10, 0, 0]);
            })
        });
        let buf = r.finish();
        let m = messages(&buf).next().unwrap().unwrap();
        assert!(matches!(
            parse_entry(&m),
            Err(ParseError::BadLength { len: 3, .. })
        ));
    }

    /// A tiny deterministic generator: no dependency, same cases every run.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }
    }

    #[test]
    fn truncated_and_garbage_input_never_panics() {
        let orig = tuple(6, "10.244.1.5", 40000, "93.184.216.34", 443);
        let reply = tuple(6, "93.184.216.34", 443, "10.224.0.4", 61000);
        let good = message(IPCTNL_MSG_CT_NEW, NLM_F_CREATE, &orig, &reply, 7);
        let mut out = Vec::new();
        // Every prefix: either skipped as malformed or (at full length) parsed.
        for cut in 0..good.len() {
            out.clear();
            let bad = parse_events(&good[..cut], &mut out);
            assert!(out.is_empty(), "prefix {cut} parsed into an entry");
            assert_eq!(bad, u64::from(cut > 0), "prefix {cut}");
        }
        // The outer length kept, the content cut: attributes claim bytes that are not there.
        for cut in NLMSG_HDRLEN..good.len() {
            let mut buf = good[..cut].to_vec();
            buf[0..4].copy_from_slice(&(cut as u32).to_ne_bytes());
            out.clear();
            parse_events(&buf, &mut out);
        }
        // Random bit flips of a good message, and random bytes.
        let mut rng = Lcg(0x5eed);
        for _ in 0..20_000 {
            let mut buf = good.clone();
            for _ in 0..1 + rng.next() % 4 {
                let i = rng.next() as usize % buf.len();
                buf[i] ^= 1 << (rng.next() % 8);
            }
            out.clear();
            parse_events(&buf, &mut out);
            let len = rng.next() as usize % 256;
            let junk: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            parse_events(&junk, &mut out);
        }
    }
}
