//! A TCP SYN flood put on a link from inside a test namespace, for the denied-flood benchmark:
//! raw Ethernet frames written with AF_PACKET past the qdisc, each a SYN from a new (source
//! address, source port), so every packet is a new connection to whatever judges it, as in a
//! spoofed flood.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
};

use anyhow::{bail, Result};

use crate::spawn_in_netns;

/// Where the flood leaves and what it carries.
#[derive(Clone, Debug)]
pub struct Flood {
    /// The namespace of the sending interface.
    pub ns: String,
    pub ifname: String,
    pub src_mac: [u8; 6],
    /// The receiving interface's MAC (the frames skip ARP).
    pub dst_mac: [u8; 6],
    /// Source addresses, taken in turn once every source port was used.
    pub sources: Vec<Ipv4Addr>,
    pub dst: SocketAddrV4,
    /// The CPU the sending thread is pinned to.
    pub cpu: usize,
}

/// The MAC address of `dev` in namespace `ns`.
pub fn mac_of(ns: &str, dev: &str) -> Result<[u8; 6]> {
    let out = crate::ns_run(ns, &["ip", "-j", "link", "show", "dev", dev])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let text = v[0]["address"].as_str().unwrap_or_default();
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = text.split(':').collect();
    if parts.len() != 6 {
        bail!("{dev} in {ns} has no MAC address ({text:?})");
    }
    for (m, x) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(x, 16)?;
    }
    Ok(mac)
}

/// The flood from `src` to `dst` that the router puts on node-1's uplink (`vn-node1` is
/// node-1's `eth0`'s peer on the VNet bridge), sent from CPU `cpu`.
pub fn onto_node1(
    bed: &crate::TestBed,
    sources: Vec<Ipv4Addr>,
    dst: SocketAddrV4,
    cpu: usize,
) -> Result<Flood> {
    Ok(Flood {
        ns: bed.router_ns.clone(),
        ifname: "vn-node1".into(),
        src_mac: mac_of(&bed.router_ns, "vn-node1")?,
        dst_mac: mac_of(&bed.node_ns, "eth0")?,
        sources,
        dst,
        cpu,
    })
}

const FRAME: usize = 14 + 20 + 20;
const BATCH: usize = 64;

fn csum_add(mut sum: u32, data: &[u8]) -> u32 {
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    sum
}

fn csum_fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// One SYN frame from `src:sport` with valid IPv4 and TCP checksums.
pub fn syn_frame(f: &Flood, src: Ipv4Addr, sport: u16, seq: u32) -> [u8; FRAME] {
    let mut b = [0u8; FRAME];
    b[0..6].copy_from_slice(&f.dst_mac);
    b[6..12].copy_from_slice(&f.src_mac);
    b[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut b[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&f.dst.ip().octets());
    let c = csum_fold(csum_add(0, ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let tcp = &mut b[34..54];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&f.dst.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&src.octets());
    pseudo[4..8].copy_from_slice(&f.dst.ip().octets());
    pseudo[9] = 6;
    pseudo[10..12].copy_from_slice(&20u16.to_be_bytes());
    let c = csum_fold(csum_add(csum_add(0, &pseudo), tcp));
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    b
}

/// An AF_PACKET socket bound to `ifname` that writes straight to the driver.
fn packet_socket(ifname: &str) -> Result<i32> {
    let name = std::ffi::CString::new(ifname)?;
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        bail!("no interface {ifname}");
    }
    // Protocol 0: send only, nothing is queued for reading.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd < 0 {
        bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
    }
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_ifindex = ifindex as i32;
    let one: i32 = 1;
    let ok = unsafe {
        libc::bind(
            fd,
            &sll as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        ) == 0
            && libc::setsockopt(
                fd,
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                &one as *const i32 as *const libc::c_void,
                4,
            ) == 0
    };
    if !ok {
        let e = std::io::Error::last_os_error();
        unsafe { libc::close(fd) };
        bail!("binding the AF_PACKET socket to {ifname}: {e}");
    }
    Ok(fd)
}

/// Sends SYNs as fast as one thread can until `stop`; returns how many the link took.
pub fn start(f: Flood, stop: Arc<AtomicBool>) -> JoinHandle<Result<Result<u64>>> {
    let ns = f.ns.clone();
    spawn_in_netns(&ns, move || -> Result<u64> {
        crate::bench::pin_thread(0, f.cpu);
        let fd = packet_socket(&f.ifname)?;
        let mut frames = vec![[0u8; FRAME]; BATCH];
        let mut iov: Vec<libc::iovec> = frames
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr() as *mut libc::c_void,
                iov_len: FRAME,
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = iov
            .iter_mut()
            .map(|v| {
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_iov = v as *mut libc::iovec;
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        let (mut src, mut port, mut seq, mut sent) = (0usize, 1024u16, 1u32, 0u64);
        while !stop.load(Ordering::Relaxed) {
            for fr in frames.iter_mut() {
                *fr = syn_frame(&f, f.sources[src], port, seq);
                seq = seq.wrapping_mul(2_654_435_761).wrapping_add(1);
                port = if port == u16::MAX { 1024 } else { port + 1 };
                if port == 1024 {
                    src = (src + 1) % f.sources.len();
                }
            }
            let n = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), BATCH as u32, 0) };
            // A full queue on the far side refuses a batch: that is the flood's point.
            if n > 0 {
                sent += n as u64;
            }
        }
        unsafe { libc::close(fd) };
        Ok(sent)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_verify() {
        let f = Flood {
            ns: String::new(),
            ifname: String::new(),
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            sources: vec![],
            dst: SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 10), 8080),
            cpu: 0,
        };
        let b = syn_frame(&f, Ipv4Addr::new(10, 244, 2, 77), 40000, 12345);
        // A header with its checksum in place sums to 0xffff (folds to zero).
        assert_eq!(csum_fold(csum_add(0, &b[14..34])), 0);
        let mut pseudo = [0u8; 12];
        pseudo[0..4].copy_from_slice(&b[26..30]);
        pseudo[4..8].copy_from_slice(&b[30..34]);
        pseudo[9] = 6;
        pseudo[10..12].copy_from_slice(&20u16.to_be_bytes());
        assert_eq!(csum_fold(csum_add(csum_add(0, &pseudo), &b[34..54])), 0);
        assert_eq!(&b[34..36], &40000u16.to_be_bytes());
        assert_eq!(b[47], 0x02);
    }
}
