//! Interface discovery over rtnetlink: one dump at start, then link events, so a new pod veth
//! is covered as soon as the kernel announces it. Also the two tc queries uninstall needs on
//! kernels without TCX: the filters left on an interface's clsact qdisc, and removing the
//! qdisc.
use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use tokio::io::unix::AsyncFd;

const NETLINK_ROUTE: i32 = 0;
const RTMGRP_LINK: u32 = 1;
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const NLMSG_DONE: u16 = 3;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const RTM_DELQDISC: u16 = 37;
const RTM_GETTFILTER: u16 = 46;
/// The clsact qdisc's parent and handle, and its two hooks (`TC_H_MAKE(TC_H_CLSACT, ...)`).
const TC_H_CLSACT: u32 = 0xFFFF_FFF1;
const CLSACT_HANDLE: u32 = 0xFFFF_0000;
const CLSACT_INGRESS: u32 = 0xFFFF_FFF2;
const CLSACT_EGRESS: u32 = 0xFFFF_FFF3;
const IFLA_IFNAME: u16 = 3;
const IFLA_MASTER: u16 = 10;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const NLA_TYPE_MASK: u16 = 0x3fff;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `IFLA_INFO_KIND`: "veth", "bridge", ... or empty for physical devices.
    pub kind: String,
    pub up: bool,
    /// `IFLA_MASTER`: the bridge (or bond, VRF) the link is enslaved to; 0: none.
    pub master: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    New(Link),
    Del(u32),
}

fn socket(groups: u32) -> io::Result<OwnedFd> {
    let fd = open(NETLINK_ROUTE)?;
    bind(&fd, groups)?;
    Ok(fd)
}

/// A nonblocking netlink socket of `protocol`, not bound yet (options that must precede the
/// subscription, like the receive buffer, go in between).
pub(crate) fn open(protocol: i32) -> io::Result<OwnedFd> {
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            protocol,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Binds a netlink socket, subscribing it to the multicast `groups` bitmask.
pub(crate) fn bind(fd: &OwnedFd, groups: u32) -> io::Result<()> {
    let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    sa.nl_family = libc::AF_NETLINK as u16;
    sa.nl_groups = groups;
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &sa as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Walks netlink messages in `buf`, calling `f` with (type, payload). Returns true at
/// `NLMSG_DONE`.
fn for_each_msg(buf: &[u8], mut f: impl FnMut(u16, &[u8])) -> io::Result<bool> {
    let mut off = 0;
    while off + 16 <= buf.len() {
        let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap()) as usize;
        let ty = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().unwrap());
        if len < 16 || off + len > buf.len() {
            break;
        }
        let payload = &buf[off + 16..off + len];
        match ty {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let errno = i32::from_ne_bytes(payload[..4].try_into().unwrap_or([0; 4]));
                if errno != 0 {
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                // The acknowledgement of a request that is not a dump: nothing follows.
                return Ok(true);
            }
            _ => f(ty, payload),
        }
        off += (len + 3) & !3;
    }
    Ok(false)
}

fn attrs(mut buf: &[u8], mut f: impl FnMut(u16, &[u8])) {
    while buf.len() >= 4 {
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let ty = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return;
        }
        f(ty, &buf[4..len]);
        let adv = (len + 3) & !3;
        if adv >= buf.len() {
            return;
        }
        buf = &buf[adv..];
    }
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn parse_link(ty: u16, payload: &[u8]) -> Option<LinkEvent> {
    if payload.len() < 16 {
        return None;
    }
    let index = i32::from_ne_bytes(payload[4..8].try_into().ok()?) as u32;
    let flags = u32::from_ne_bytes(payload[8..12].try_into().ok()?);
    if ty == RTM_DELLINK {
        return Some(LinkEvent::Del(index));
    }
    if ty != RTM_NEWLINK {
        return None;
    }
    let mut link = Link {
        index,
        name: String::new(),
        kind: String::new(),
        up: flags & libc::IFF_UP as u32 != 0,
        master: 0,
    };
    attrs(&payload[16..], |t, v| match t {
        IFLA_IFNAME => link.name = cstr(v),
        IFLA_MASTER if v.len() >= 4 => link.master = u32::from_ne_bytes([v[0], v[1], v[2], v[3]]),
        IFLA_LINKINFO => attrs(v, |t, v| {
            if t == IFLA_INFO_KIND {
                link.kind = cstr(v);
            }
        }),
        _ => {}
    });
    Some(LinkEvent::New(link))
}

/// Registers an fd-owning object with the tokio reactor for readiness.
pub fn readable<T: AsRawFd>(inner: T) -> io::Result<AsyncFd<T>> {
    // SAFETY: every `T` used here (sockets, ring buffers, the log reader) owns its descriptor
    // for its whole life and always returns the same one.
    unsafe { AsyncFd::register_with_interest(inner, tokio::io::Interest::READABLE) }
        .map_err(|e| io::Error::other(e.to_string()))
}

/// A subscription to link events of the current network namespace.
pub struct LinkMonitor {
    fd: AsyncFd<OwnedFd>,
    buf: Vec<u8>,
}

impl LinkMonitor {
    /// Subscribes first, then dumps, so no link created in between is missed.
    pub fn start() -> io::Result<(Self, Vec<Link>)> {
        let monitor = Self {
            fd: readable(socket(RTMGRP_LINK)?)?,
            buf: vec![0; 64 * 1024],
        };
        Ok((monitor, dump_links()?))
    }

    pub async fn next_batch(&mut self) -> io::Result<Vec<LinkEvent>> {
        loop {
            let mut guard = self.fd.readable().await?;
            let n = unsafe {
                libc::recv(
                    guard.get_inner().as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    0,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock {
                    guard.clear_ready();
                    continue;
                }
                // ENOBUFS: events were lost; the caller rescans.
                return Err(e);
            }
            let mut out = Vec::new();
            for_each_msg(&self.buf[..n as usize], |ty, p| {
                if let Some(ev) = parse_link(ty, p) {
                    out.push(ev);
                }
            })?;
            return Ok(out);
        }
    }
}

/// Sends one request and hands every reply message to `f` until the dump ends or the request
/// is acknowledged.
fn transact(req: &[u8], mut f: impl FnMut(u16, &[u8])) -> io::Result<()> {
    let fd = socket(0)?;
    let rc = unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        if unsafe { libc::poll(&mut pfd, 1, 5000) } <= 0 {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "rtnetlink request timed out",
            ));
        }
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                continue;
            }
            return Err(e);
        }
        if for_each_msg(&buf[..n as usize], &mut f)? {
            return Ok(());
        }
    }
}

/// A netlink header for a request of `ty` carrying `payload`.
fn request(ty: u16, flags: u16, payload: &[u8]) -> Vec<u8> {
    let len = 16 + payload.len();
    let mut req = Vec::with_capacity(len);
    req.extend_from_slice(&(len as u32).to_ne_bytes());
    req.extend_from_slice(&ty.to_ne_bytes());
    req.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(payload);
    req
}

/// `struct tcmsg` (family unspecified).
fn tcmsg(ifindex: u32, handle: u32, parent: u32) -> [u8; 20] {
    let mut m = [0u8; 20];
    m[4..8].copy_from_slice(&ifindex.to_ne_bytes());
    m[8..12].copy_from_slice(&handle.to_ne_bytes());
    m[12..16].copy_from_slice(&parent.to_ne_bytes());
    m
}

/// All links of the current network namespace.
pub fn dump_links() -> io::Result<Vec<Link>> {
    let mut ifinfo = [0u8; 16];
    ifinfo[0] = libc::AF_UNSPEC as u8;
    let mut links = Vec::new();
    transact(&request(RTM_GETLINK, NLM_F_DUMP, &ifinfo), |ty, p| {
        if let Some(LinkEvent::New(l)) = parse_link(ty, p) {
            links.push(l);
        }
    })?;
    Ok(links)
}

/// How many tc filters the clsact qdisc of `ifindex` holds, on both hooks (0 without one).
pub fn clsact_filters(ifindex: u32) -> io::Result<usize> {
    let mut n = 0;
    for parent in [CLSACT_INGRESS, CLSACT_EGRESS] {
        let req = request(RTM_GETTFILTER, NLM_F_DUMP, &tcmsg(ifindex, 0, parent));
        // The dump also describes each classifier instance (handle 0) before its filters.
        transact(&req, |_, p| {
            if p.len() >= 12 && p[8..12] != [0; 4] {
                n += 1;
            }
        })?;
    }
    Ok(n)
}

/// Removes the clsact qdisc of `ifindex`, with whatever filters it still holds.
pub fn delete_clsact(ifindex: u32) -> io::Result<()> {
    let req = request(
        RTM_DELQDISC,
        NLM_F_ACK,
        &tcmsg(ifindex, CLSACT_HANDLE, TC_H_CLSACT),
    );
    transact(&req, |_, _| {})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dump_sees_loopback() {
        let links = dump_links().expect("dump");
        let lo = links.iter().find(|l| l.name == "lo").expect("lo present");
        assert_eq!(lo.index, 1);
        assert!(lo.up);
    }
}

/// The name of an interface of this network namespace, if it still exists.
pub fn ifname(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}
