//! Interfaces: which are pods' and which are uplinks, attached as the kernel announces them.
use super::*;

/// Every address of this network namespace: interface name, address and prefix length.
pub(super) fn interface_addresses() -> Vec<(String, IpAddr, u8)> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return out;
    }
    let mut cur = ifap;
    while !cur.is_null() {
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() {
            continue;
        }
        let fam = unsafe { (*ifa.ifa_addr).sa_family } as i32;
        let has_mask = !ifa.ifa_netmask.is_null();
        let (ip, len) = if fam == libc::AF_INET {
            let a = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
            let len = has_mask.then(|| {
                let m = unsafe { &*(ifa.ifa_netmask as *const libc::sockaddr_in) };
                u32::from_be(m.sin_addr.s_addr).leading_ones() as u8
            });
            (
                IpAddr::from(a.sin_addr.s_addr.to_ne_bytes()),
                len.unwrap_or(32),
            )
        } else if fam == libc::AF_INET6 {
            let a = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
            let len = has_mask.then(|| {
                let m = unsafe { &*(ifa.ifa_netmask as *const libc::sockaddr_in6) };
                u128::from_be_bytes(m.sin6_addr.s6_addr).leading_ones() as u8
            });
            (IpAddr::from(a.sin6_addr.s6_addr), len.unwrap_or(128))
        } else {
            continue;
        };
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }.to_string_lossy();
        out.push((name.into_owned(), ip, len));
    }
    unsafe { libc::freeifaddrs(ifap) };
    out
}

pub(super) fn is_link_local(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}

/// Local non-loopback addresses of this network namespace: the node's own IPs.
pub fn host_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    for (_, ip, _) in interface_addresses() {
        if !ip.is_loopback() && !is_link_local(&ip) && !out.contains(&ip) {
            out.push(ip);
        }
    }
    out
}

/// The subnets of the addresses on the named interfaces (the uplinks: the VNet).
pub fn interface_nets(names: &[String]) -> Vec<ipnet::IpNet> {
    let mut out = Vec::new();
    for (name, ip, len) in interface_addresses() {
        if !names.contains(&name) || is_link_local(&ip) {
            continue;
        }
        if let Ok(n) = ipnet::IpNet::new(ip, len) {
            let n = n.trunc();
            if !out.contains(&n) {
                out.push(n);
            }
        }
    }
    out
}

pub(super) fn is_pod_interface(link: &netlink::Link, uplinks: &[String]) -> bool {
    link.kind == "veth" && !uplinks.iter().any(|u| u == &link.name)
}

pub(super) fn apply_link(shared: &Shared, dp: &mut Datapath, ev: LinkEvent) {
    match ev {
        LinkEvent::New(l) => {
            if shared.opts.uplinks.iter().any(|u| u == &l.name) {
                if shared.opts.uplink_programs && !dp.uplinks().iter().any(|(i, _)| *i == l.index) {
                    attach_uplink(shared, dp, l);
                }
                return;
            }
            if !is_pod_interface(&l, &shared.opts.uplinks) {
                return;
            }
            // A veth already attached may have joined or left a bridge.
            let routed = l.master == 0;
            if dp.attached().contains(&l.index) {
                if let Err(e) = dp.mark_attached(l.index, routed) {
                    warn!(ifname = %l.name, "marking attached interface failed: {e:#}");
                }
                return;
            }
            match dp.attach(l.index, &l.name, routed) {
                Ok(()) => {
                    info!(ifindex = l.index, ifname = %l.name, "attached to pod interface");
                    let mut st = shared.state.lock().unwrap();
                    st.metrics.links_attached_total += 1;
                    st.interfaces.insert(l.index, l.name);
                }
                Err(e) => {
                    // A veth can vanish between the event and the attach; the next event or
                    // rescan retries.
                    warn!(ifname = %l.name, "attach failed: {e:#}");
                    shared.state.lock().unwrap().metrics.attach_errors_total += 1;
                }
            }
        }
        LinkEvent::Del(index) => {
            if dp.uplinks().iter().any(|(i, _)| *i == index) {
                dp.detach_uplink(index);
                let name = shared.state.lock().unwrap().uplinks.remove(&index);
                info!(ifindex = index, uplink = ?name, "uplink removed");
            }
            if dp.attached().contains(&index) {
                dp.detach(index);
                let name = shared.state.lock().unwrap().interfaces.remove(&index);
                info!(ifindex = index, ifname = ?name, "pod interface removed");
            }
        }
    }
}

pub(super) fn attach_uplink(shared: &Shared, dp: &mut Datapath, l: netlink::Link) {
    match dp.attach_uplink(l.index, &l.name, l.kind == "veth", shared.opts.uplink_xdp) {
        Ok(a) => {
            match &a.xdp_error {
                None => {
                    info!(ifindex = l.index, ifname = %l.name, xdp = a.xdp_mode, "attached to uplink")
                }
                Some(e) => warn!(
                    ifname = %l.name,
                    "uplink: tc attached, XDP not ({e}); tc ingress judges local pods' openers"
                ),
            }
            let mut st = shared.state.lock().unwrap();
            st.uplinks.insert(l.index, (l.name, a.xdp_mode));
        }
        Err(e) => {
            warn!(ifname = %l.name, "uplink attach failed: {e:#}");
            shared.state.lock().unwrap().metrics.attach_errors_total += 1;
        }
    }
}

pub(super) async fn links_task(shared: Arc<Shared>, mut monitor: LinkMonitor) -> Result<()> {
    loop {
        match monitor.next_batch().await {
            Ok(events) => {
                let mut dp = shared.dp.lock().unwrap();
                for ev in events {
                    apply_link(&shared, &mut dp, ev);
                }
            }
            Err(e) => {
                // Lost events (ENOBUFS): reconcile against a fresh dump.
                warn!("link monitor: {e}; rescanning");
                let links = netlink::dump_links()?;
                let mut dp = shared.dp.lock().unwrap();
                let present: Vec<u32> = links.iter().map(|l| l.index).collect();
                for idx in dp.attached() {
                    if !present.contains(&idx) {
                        apply_link(&shared, &mut dp, LinkEvent::Del(idx));
                    }
                }
                for l in links {
                    apply_link(&shared, &mut dp, LinkEvent::New(l));
                }
            }
        }
    }
}
