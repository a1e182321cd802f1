//! NetworkPolicy verdicts: endpoint isolation flags, the remote identity from the ipcache, and
//! two LPM lookups (exact identity, then any peer) in the policy map.
use aya_ebpf::maps::lpm_trie::Key;
use observer_common::{
    config_flags, ep_flags, identity, policy_flags, EndpointInfo, PolicyEntry, PolicyKeyData,
    RemoteKind, DIR_INGRESS, POLICY_PREFIX_FULL, RULE_NODE,
};

use crate::{
    classify,
    maps::{CONFIG, POLICY},
};

/// Outcome of one direction's policy.
#[derive(Clone, Copy)]
pub struct Verdict {
    pub denied: bool,
    /// Passes only because the policies that would deny it are audited.
    pub audit: bool,
    /// The rule that allowed it (0: the endpoint is not isolated, or nothing allowed it).
    pub rule: u32,
}

const ALLOW: Verdict = Verdict {
    denied: false,
    audit: false,
    rule: 0,
};

#[inline(always)]
fn lookup(ep: u32, dir: u8, ident: u32, proto: u8, port: u16) -> Option<&'static PolicyEntry> {
    let key = Key::new(
        POLICY_PREFIX_FULL,
        PolicyKeyData::new(ep, dir, ident, proto, port),
    );
    POLICY.get(&key)
}

#[inline(always)]
fn node_allowed() -> bool {
    match CONFIG.get(0) {
        Some(c) => c.flags & config_flags::ALLOW_NODE != 0,
        None => false,
    }
}

/// The verdict for `ep` in direction `dir` towards or from `remote` (family, address).
#[inline(always)]
pub fn evaluate(
    ep: &EndpointInfo,
    dir: u8,
    family: u8,
    remote: &[u32; 4],
    proto: u8,
    port: u16,
) -> Verdict {
    let (iso, aud) = if dir == DIR_INGRESS {
        (
            ep.flags & ep_flags::INGRESS_ISOLATED,
            ep.flags & ep_flags::INGRESS_AUDIT,
        )
    } else {
        (
            ep.flags & ep_flags::EGRESS_ISOLATED,
            ep.flags & ep_flags::EGRESS_AUDIT,
        )
    };
    if iso == 0 && aud == 0 {
        return ALLOW;
    }
    let remote = classify::remote(family, remote);
    // Traffic from the pod's own node (kubelet probes) passes ingress isolation.
    if dir == DIR_INGRESS {
        if let Some(r) = remote {
            if r.kind == RemoteKind::Host as u8 && node_allowed() {
                return Verdict {
                    denied: false,
                    audit: false,
                    rule: RULE_NODE,
                };
            }
        }
    }
    let ident = match remote {
        Some(e) => e.identity,
        None => identity::WORLD,
    };
    let exact = lookup(ep.id, dir, ident, proto, port);
    if let Some(e) = exact {
        if e.flags & policy_flags::AUDIT_ONLY == 0 {
            return Verdict {
                denied: false,
                audit: false,
                rule: e.rule,
            };
        }
    }
    let any = lookup(ep.id, dir, identity::ANY, proto, port);
    if let Some(e) = any {
        if e.flags & policy_flags::AUDIT_ONLY == 0 {
            return Verdict {
                denied: false,
                audit: false,
                rule: e.rule,
            };
        }
    }
    if iso != 0 {
        return Verdict {
            denied: true,
            audit: false,
            rule: 0,
        };
    }
    // Isolated only by audited policies: their allows still say which rule would admit it.
    match exact.or(any) {
        Some(e) => Verdict {
            denied: false,
            audit: false,
            rule: e.rule,
        },
        None => Verdict {
            denied: false,
            audit: true,
            rule: 0,
        },
    }
}
