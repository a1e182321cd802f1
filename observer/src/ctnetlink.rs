//! The kernel's own connection tracking, read over ctnetlink (`NETLINK_NETFILTER`).
//!
//! Our eBPF conntrack sees a pod's connection before the node's netfilter rewrites it; what the
//! wire sees after MASQUERADE the programs see as the packet leaves (`EventKind::Wire`), and
//! the kernel's conntrack knows for every connection it tracks. Every kernel entry carries the
//! original tuple (as the pod sent it) and the reply tuple (as replies arrive, i.e. after NAT),
//! so the translation is read exactly, by tuple. The SNAT join reads it here for what the
//! programs cannot prove: a dump of the table at start (connections older than the daemon),
//! and an exact GET by original tuple for a connection whose opening packet was not seen
//! leaving. No event subscription: with a listener, the kernel builds a message for every
//! connection it confirms, about as much CPU per connection as observer's programs.
use std::{
    fmt, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, OwnedFd, RawFd},
    time::Duration,
};

// include/uapi/linux/netfilter/nfnetlink.h, nfnetlink_conntrack.h, linux/netlink.h.
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
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
const IPPROTO_ICMPV6: u8 = 58;
/// (echo request, echo reply) per ICMP version.
const ICMP_ECHO: (u8, u8) = (8, 0);
const ICMPV6_ECHO: (u8, u8) = (128, 129);

/// Large enough for any datagram the kernel builds for us: events are one entry each, and dump
/// skbs are capped at 32 KiB. `MSG_TRUNC` still tells us if that ever stops being true.
const RECV_BUF: usize = 64 * 1024;
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

/// Every conntrack entry of a datagram into `out`; returns how many messages were malformed
/// and skipped.
#[cfg(test)]
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
