//! Traffic class of a new connection, from the endpoints map and the ipcache.
use aya_ebpf::maps::lpm_trie::Key;
use observer_common::{
    EndpointInfo, IpKey, IpcacheEntry, IpcacheKeyData, RemoteKind, TrafficClass,
};

use crate::maps::{CONFIG, ENDPOINTS, IPCACHE, KIND_CACHE, LOCAL_BITS, LOCAL_RANGE};

#[inline(always)]
pub fn endpoint(family: u8, addr: &[u32; 4]) -> Option<&'static EndpointInfo> {
    let key = IpKey {
        addr: *addr,
        family,
        _pad: [0; 3],
    };
    unsafe { ENDPOINTS.get(&key) }
}

/// What the IPv4 local range and, when exact, its bitmap say of `addr` (inlined array reads):
/// `Some(false)` when it is no local pod's, `Some(true)` when the bitmap has it, `None` when
/// only the endpoints map can tell. The daemon sets a pod's bit before its endpoint entry and
/// clears it after, so the bitmap never misses a pod the map holds.
#[inline(always)]
fn local_hint(family: u8, addr: &[u32; 4]) -> Option<bool> {
    if family != observer_common::AF_INET {
        return None;
    }
    let r = LOCAL_RANGE.get(0)?;
    let a = u32::from_be(addr[0]);
    if !r.may_hold(a) {
        return Some(false);
    }
    if r.exact == 0 {
        return None;
    }
    let (w, bit) = r.bit(a)?;
    LOCAL_BITS.get(w).map(|word| *word & bit != 0)
}

/// Whether `addr` is a local pod's: the local range and bitmap first, else the endpoints map.
#[inline(always)]
pub fn local_pod(family: u8, addr: &[u32; 4]) -> bool {
    match local_hint(family, addr) {
        Some(local) => local,
        None => endpoint(family, addr).is_some(),
    }
}

/// A local pod's endpoint entry; an address the local range rules out (every remote end of a
/// new connection, on a node whose pods are in one IPv4 range) is settled without the hash
/// lookup, which would miss.
#[inline(always)]
pub fn local_endpoint(family: u8, addr: &[u32; 4]) -> Option<&'static EndpointInfo> {
    if local_hint(family, addr) == Some(false) {
        return None;
    }
    endpoint(family, addr)
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

/// Slots of `KIND_CACHE`: the top 8 bits of a multiplicative hash of the address.
pub const KIND_CACHE_SLOTS: u32 = 256;

/// An IPv4 address's ipcache kind (`NO_ENTRY`: none) as of policy generation `gen`.
#[repr(C)]
pub struct KindSlot {
    addr: u32,
    gen: u32,
    kind: u32,
    valid: u32,
}

const NO_ENTRY: u32 = u32::MAX;

/// The ipcache kind of an address (`NO_ENTRY`: none). The ipcache is an LPM trie, a walk of
/// several nodes, asked about an end of every new connection (its class) and by the uplink's
/// tc programs about both ends of every wire packet (their counts), while those ends repeat;
/// so IPv4 answers are kept per CPU in a small direct-mapped cache, valid within one policy
/// generation (the daemon bumps it after any write to the endpoints, ipcache or policy maps).
/// Classes and counts use it, never a verdict: policy reads the ipcache itself. A plain `u32`,
/// not an `Option`: the compiler may leave a `None`'s payload unset, which the verifier refuses.
#[inline(always)]
pub fn cached_kind(family: u8, addr: &[u32; 4]) -> u32 {
    let lookup = || remote(family, addr).map_or(NO_ENTRY, |e| e.kind as u32);
    if family != observer_common::AF_INET {
        return lookup();
    }
    let Some(gen) = CONFIG.get(0).map(|c| c.policy_gen) else {
        return lookup();
    };
    let a = addr[0];
    let Some(s) = KIND_CACHE.get_ptr_mut(a.wrapping_mul(0x9E37_79B1) >> 24) else {
        return lookup();
    };
    // Per-CPU slot, and the programs run with bottom halves off: no other writer.
    let s = unsafe { &mut *s };
    if s.valid != 0 && s.addr == a && s.gen == gen {
        return s.kind;
    }
    let kind = lookup();
    *s = KindSlot {
        addr: a,
        gen,
        kind,
        valid: 1,
    };
    kind
}

#[inline(always)]
fn remote_kind(family: u8, addr: &[u32; 4]) -> u8 {
    match cached_kind(family, addr) {
        NO_ENTRY => RemoteKind::World as u8,
        k => k as u8,
    }
}

/// Class of a connection whose first packet left a local pod towards `dst`.
#[inline(always)]
pub fn from_pod(family: u8, dst: &[u32; 4]) -> TrafficClass {
    if local_pod(family, dst) {
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
    if local_pod(family, src) {
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
