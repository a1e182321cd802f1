//! A userspace verdict program on NFQUEUE, for the side-by-side benchmark's model of
//! kube-network-policies as designed: the kernel queues the first packet of each new
//! connection to a selected pod, this program judges it against the policy rules in turn and
//! answers accept or drop. Speaks nfnetlink_queue directly (no libnetfilter_queue).
use std::{
    collections::HashSet,
    net::Ipv4Addr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
};

use anyhow::{bail, Result};

use crate::spawn_in_netns;

const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_QUEUE: u16 = 3;
const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_VERDICT: u16 = 1;
const NFQNL_MSG_CONFIG: u16 = 2;
const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_COPY_PACKET: u8 = 2;
const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_PAYLOAD: u16 = 10;
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;

/// One rule: traffic from these sources to this destination port is allowed.
#[derive(Clone, Debug)]
pub struct Rule {
    pub sources: HashSet<Ipv4Addr>,
    pub port: u16,
}

fn attr(buf: &mut Vec<u8>, ty: u16, data: &[u8]) {
    let len = 4 + data.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(data);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

/// A netfilter netlink message for queue `queue` with `attrs`.
fn message(msg: u16, flags: u16, queue: u16, family: u8, attrs: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + attrs.len());
    let len = 16 + 4 + attrs.len();
    b.extend_from_slice(&(len as u32).to_ne_bytes());
    b.extend_from_slice(&((NFNL_SUBSYS_QUEUE << 8) | msg).to_ne_bytes());
    b.extend_from_slice(&(libc::NLM_F_REQUEST as u16 | flags).to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes()); // seq
    b.extend_from_slice(&0u32.to_ne_bytes()); // pid
    b.push(family);
    b.push(0); // version
    b.extend_from_slice(&queue.to_be_bytes());
    b.extend_from_slice(attrs);
    b
}

fn send(fd: i32, b: &[u8]) -> Result<()> {
    let n = unsafe { libc::send(fd, b.as_ptr().cast(), b.len(), 0) };
    if n < 0 {
        bail!("netlink send: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Reads one acknowledgement; fails on a netlink error.
fn ack(fd: i32) -> Result<()> {
    let mut buf = [0u8; 4096];
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 20 {
        bail!("netlink ack: {}", std::io::Error::last_os_error());
    }
    let ty = u16::from_ne_bytes([buf[4], buf[5]]);
    let err = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
    if ty == libc::NLMSG_ERROR as u16 && err != 0 {
        bail!(
            "nfnetlink_queue config: {}",
            std::io::Error::from_raw_os_error(-err)
        );
    }
    Ok(())
}

/// Binds queue `queue` (IPv4, packets copied up to 64 bytes: headers only).
fn bind(queue: u16) -> Result<i32> {
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, NETLINK_NETFILTER) };
    if fd < 0 {
        bail!("netlink socket: {}", std::io::Error::last_os_error());
    }
    let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    sa.nl_family = libc::AF_NETLINK as u16;
    if unsafe {
        libc::bind(
            fd,
            &sa as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    } != 0
    {
        bail!("netlink bind: {}", std::io::Error::last_os_error());
    }
    let mut cmd = Vec::new();
    attr(
        &mut cmd,
        NFQA_CFG_CMD,
        &[
            NFQNL_CFG_CMD_BIND,
            0,
            (libc::AF_INET as u16).to_be_bytes()[0],
            (libc::AF_INET as u16).to_be_bytes()[1],
        ],
    );
    let ackf = libc::NLM_F_ACK as u16;
    send(
        fd,
        &message(NFQNL_MSG_CONFIG, ackf, queue, libc::AF_UNSPEC as u8, &cmd),
    )?;
    ack(fd)?;
    let mut params = Vec::new();
    let mut p = 64u32.to_be_bytes().to_vec();
    p.push(NFQNL_COPY_PACKET);
    attr(&mut params, NFQA_CFG_PARAMS, &p);
    send(
        fd,
        &message(
            NFQNL_MSG_CONFIG,
            ackf,
            queue,
            libc::AF_UNSPEC as u8,
            &params,
        ),
    )?;
    ack(fd)?;
    Ok(fd)
}

/// The verdict for an IPv4 packet: the first rule whose sources and port match accepts it.
pub fn judge(rules: &[Rule], ip: &[u8]) -> u32 {
    if ip.len() < 24 || ip[0] >> 4 != 4 {
        return NF_DROP;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let Some(ports) = ip.get(ihl..ihl + 4) else {
        return NF_DROP;
    };
    let dport = u16::from_be_bytes([ports[2], ports[3]]);
    if rules
        .iter()
        .any(|r| r.port == dport && r.sources.contains(&src))
    {
        NF_ACCEPT
    } else {
        NF_DROP
    }
}

/// Runs the verdict program for queue `queue` in namespace `ns` until `stop` (checked every
/// 100 ms). Returns once the queue is bound (or binding failed: the handle then gives the
/// error), so a rule queueing to it never meets an empty queue, which drops. The handle gives
/// how many packets it judged.
pub fn start(
    ns: &str,
    queue: u16,
    rules: Vec<Rule>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<Result<Result<u64>>> {
    let (bound_tx, bound) = std::sync::mpsc::channel();
    let handle = spawn_in_netns(ns, move || -> Result<u64> {
        let fd = bind(queue);
        let _ = bound_tx.send(());
        let fd = fd?;
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            );
        }
        let mut buf = vec![0u8; 65536];
        let mut judged = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n <= 0 {
                continue;
            }
            let mut off = 0usize;
            while off + 20 <= n as usize {
                let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap()) as usize;
                let ty = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
                if len < 20 || off + len > n as usize {
                    break;
                }
                if ty == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET {
                    let (mut id, mut payload) = (None, &[][..]);
                    let mut a = off + 20;
                    while a + 4 <= off + len {
                        let alen = u16::from_ne_bytes([buf[a], buf[a + 1]]) as usize;
                        let aty = u16::from_ne_bytes([buf[a + 2], buf[a + 3]]) & 0x7fff;
                        if alen < 4 || a + alen > off + len {
                            break;
                        }
                        let data = &buf[a + 4..a + alen];
                        match aty {
                            NFQA_PACKET_HDR if data.len() >= 4 => {
                                id = Some(u32::from_be_bytes(data[..4].try_into().unwrap()))
                            }
                            NFQA_PAYLOAD => payload = data,
                            _ => {}
                        }
                        a += alen.next_multiple_of(4);
                    }
                    if let Some(id) = id {
                        let mut v = NF_DROP.to_be_bytes().to_vec();
                        v[..4].copy_from_slice(&judge(&rules, payload).to_be_bytes());
                        v.extend_from_slice(&id.to_be_bytes());
                        let mut attrs = Vec::new();
                        attr(&mut attrs, NFQA_VERDICT_HDR, &v);
                        send(
                            fd,
                            &message(NFQNL_MSG_VERDICT, 0, queue, libc::AF_UNSPEC as u8, &attrs),
                        )?;
                        judged += 1;
                    }
                }
                off += len.next_multiple_of(4);
            }
        }
        unsafe { libc::close(fd) };
        Ok(judged)
    });
    // A thread that failed before binding drops the sender: recv returns at once.
    let _ = bound.recv();
    handle
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judges_by_source_and_port() {
        let client = Ipv4Addr::new(10, 244, 1, 11);
        let rules = vec![
            Rule {
                sources: [Ipv4Addr::new(10, 250, 0, 0)].into(),
                port: 8080,
            },
            Rule {
                sources: [client].into(),
                port: 8080,
            },
        ];
        let mut ip = [0u8; 40];
        ip[0] = 0x45;
        ip[12..16].copy_from_slice(&client.octets());
        ip[22..24].copy_from_slice(&8080u16.to_be_bytes());
        assert_eq!(judge(&rules, &ip), NF_ACCEPT);
        ip[22..24].copy_from_slice(&8081u16.to_be_bytes());
        assert_eq!(judge(&rules, &ip), NF_DROP);
        ip[22..24].copy_from_slice(&8080u16.to_be_bytes());
        ip[15] = 99;
        assert_eq!(judge(&rules, &ip), NF_DROP);
    }
}
