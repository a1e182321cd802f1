//! Traffic class of a new connection, from the endpoints map and the ipcache.
use aya_ebpf::maps::lpm_trie::Key;
use observer_common::{
    EndpointInfo, IpKey, IpcacheEntry, IpcacheKeyData, RemoteKind, TrafficClass,
};

use crate::maps::{ENDPOINTS, IPCACHE, LOCAL_BITS, LOCAL_RANGE};

#[inline(always)]
pub fn endpoint(family: u8, addr: &[u32; 4]) -> Option<&'static EndpointInfo> {
    let key = IpKey {
        addr: *addr,
        family,
        _pad: [0; 3],
    };
    unsafe { ENDPOINTS.get(&key) }
}

/// Whether `addr` is a local pod's: for IPv4 the local range first and, when exact, its bitmap
/// (inlined array reads), else the endpoints map.
#[inline(always)]
pub fn local_pod(family: u8, addr: &[u32; 4]) -> bool {
    if family == observer_common::AF_INET {
        if let Some(r) = LOCAL_RANGE.get(0) {
            let a = u32::from_be(addr[0]);
            if !r.may_hold(a) {
                return false;
            }
            if r.exact != 0 {
                if let Some((w, bit)) = r.bit(a) {
                    if let Some(word) = LOCAL_BITS.get(w) {
                        return *word & bit != 0;
                    }
                }
            }
        }
    }
    endpoint(family, addr).is_some()
}

/// The ipcache entry of an address: its identity and what it is.
#[inline(always)]
pub fn remote(family: u8, addr: &[u32; 4]) -> Option<&'static IpcacheEntry> {
    let key = Key::new(
        if family == observer_common::AF_INET {
            64
        } else {
            160
        },
        IpcacheKeyData {
            data: [family as u32, addr[0], addr[1], addr[2], addr[3]],
        },
    );
    IPCACHE.get(&key)
}

#[inline(always)]
fn remote_kind(family: u8, addr: &[u32; 4]) -> u8 {
    match remote(family, addr) {
        Some(e) => e.kind,
        None => RemoteKind::World as u8,
    }
}

/// Class of a connection whose first packet left a local pod towards `dst`.
#[inline(always)]
pub fn from_pod(family: u8, dst: &[u32; 4]) -> TrafficClass {
    if endpoint(family, dst).is_some() {
        return TrafficClass::PodToPodLocal;
    }
    match remote_kind(family, dst) {
        k if k == RemoteKind::RemotePod as u8 => TrafficClass::PodToPodRemote,
        k if k == RemoteKind::Host as u8 || k == RemoteKind::RemoteNode as u8 => {
            TrafficClass::PodToNode
        }
        _ => TrafficClass::PodToWorld,
    }
}

/// Class of a connection whose first packet arrived for a local pod from `src`.
#[inline(always)]
pub fn to_pod(family: u8, src: &[u32; 4]) -> TrafficClass {
    if endpoint(family, src).is_some() {
        return TrafficClass::PodToPodLocal;
    }
    match remote_kind(family, src) {
        k if k == RemoteKind::RemotePod as u8 => TrafficClass::PodToPodRemote,
        k if k == RemoteKind::Host as u8 || k == RemoteKind::RemoteNode as u8 => {
            TrafficClass::NodeToPod
        }
        _ => TrafficClass::WorldToPod,
    }
}
