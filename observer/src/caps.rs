//! The Linux capabilities the daemon needs, checked at start: a missing one fails with a message
//! naming it and why it is needed, instead of an `EPERM` from deep inside program loading.
//!
//! [`REQUIRED`] is the narrowest set found by running the daemon with reduced capability sets
//! (bounding set, inheritable and ambient sets emptied, `no_new_privs`, as a container runtime
//! starts a uid-0 container) on a throwaway network namespace with bpffs pre-mounted, and taking
//! each capability away in turn; `observer/tests/e2e_caps.rs` keeps both directions tested.
//! The DaemonSet in `manifests/` grants exactly this set; `docs/deploy.md` explains each one.

use anyhow::{bail, Context as _, Result};

/// One Linux capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cap {
    /// As `capabilities(7)` spells it, e.g. `CAP_BPF`. Kubernetes spells it without `CAP_`.
    pub name: &'static str,
    /// Bit number in the kernel's capability sets (`CapEff` in `/proc/PID/status`).
    pub number: u32,
    /// What the daemon does with it.
    pub why: &'static str,
}

impl Cap {
    /// The name as Kubernetes' `securityContext.capabilities` spells it (`BPF`).
    pub fn k8s_name(&self) -> &'static str {
        self.name.strip_prefix("CAP_").unwrap_or(self.name)
    }
}

/// Loading programs, creating maps, pinning and re-adopting them (`bpf(2)` as a whole). Without it
/// the first map creation fails with `EPERM`.
pub const BPF: Cap = Cap {
    name: "CAP_BPF",
    number: 39,
    why: "loading eBPF programs, creating and pinning their maps and links",
};

/// tc programs are networking programs: the kernel loads `SCHED_CLS` programs only with
/// CAP_NET_ADMIN, and attaching them (TCX links on >= 6.6, clsact qdiscs and filters before) is
/// netlink configuration of interfaces.
pub const NET_ADMIN: Cap = Cap {
    name: "CAP_NET_ADMIN",
    number: 12,
    why: "loading tc programs and attaching them to pod interfaces: TCX links, clsact filters",
};

/// The verifier accepts the programs' packet pointer arithmetic (`data_end - data`, pointer
/// comparisons) only from a perfmon-capable loader; without it `from_pod` is rejected with
/// "pointer -= pointer prohibited". True on every kernel since 5.8.
pub const PERFMON: Cap = Cap {
    name: "CAP_PERFMON",
    number: 38,
    why: "the verifier accepts the programs' packet pointer arithmetic only from a loader with it",
};

/// Only for `--netns` (tests and the demo): `setns(2)` into another network namespace. Also the
/// capability to mount bpffs, which the daemon does only when `/sys/fs/bpf` is not mounted yet
/// (the DaemonSet mounts the host's).
pub const SYS_ADMIN: Cap = Cap {
    name: "CAP_SYS_ADMIN",
    number: 21,
    why: "entering the network namespace given with --netns (setns)",
};

/// What `observer daemon` needs in production. Not included, on purpose:
/// CAP_SYS_RESOURCE (eBPF memory is charged to the memory cgroup, not RLIMIT_MEMLOCK, since Linux
/// 5.11, and observer needs >= 5.15; the daemon never raises the rlimit) and CAP_SYS_ADMIN (bpffs
/// is mounted by the node, see [`SYS_ADMIN`]).
pub const REQUIRED: &[Cap] = &[BPF, NET_ADMIN, PERFMON];

/// CAP_SYS_ADMIN is the pre-5.8 catch-all the kernel still honours for these: `bpf_capable()` and
/// `perfmon_capable()` accept it in their place.
fn subsumed_by_sys_admin(c: &Cap) -> bool {
    c.number == BPF.number || c.number == PERFMON.number
}

/// Parses the `CapEff:` line of a `/proc/PID/status` text.
pub fn parse_cap_eff(status: &str) -> Result<u64> {
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .context("no CapEff line in /proc/self/status")?;
    u64::from_str_radix(line.trim(), 16).with_context(|| format!("CapEff {:?}", line.trim()))
}

/// This process's effective capability set.
pub fn effective() -> Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    parse_cap_eff(&status)
}

fn has(eff: u64, number: u32) -> bool {
    number < 64 && eff & (1u64 << number) != 0
}

/// The capabilities of `wanted` that the effective set `eff` lacks.
pub fn missing<'a>(eff: u64, wanted: impl IntoIterator<Item = &'a Cap>) -> Vec<&'a Cap> {
    let mut out: Vec<&Cap> = Vec::new();
    for c in wanted {
        let ok = has(eff, c.number) || (subsumed_by_sys_admin(c) && has(eff, SYS_ADMIN.number));
        if !ok && !out.iter().any(|m| m.number == c.number) {
            out.push(c);
        }
    }
    out
}

/// The error for missing capabilities, or `Ok` when none is missing.
pub fn verdict(missing: &[&Cap]) -> Result<()> {
    match missing {
        [] => Ok(()),
        [c] => bail!(
            "missing capability {} ({}); run as root or grant it (the DaemonSet in manifests/ does)",
            c.name,
            c.why
        ),
        many => bail!(
            "missing capabilities {}; run as root or grant them (the DaemonSet in manifests/ does)",
            many.iter()
                .map(|c| format!("{} ({})", c.name, c.why))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Fails, naming every missing capability and why it is needed, unless this process has
/// [`REQUIRED`] and `extra` in its effective set.
pub fn check(extra: &[Cap]) -> Result<()> {
    let eff = effective()?;
    verdict(&missing(eff, REQUIRED.iter().chain(extra)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tobserver\nUmask:\t0022\nState:\tR (running)\n\
        CapInh:\t0000000000000000\nCapPrm:\t000000c000001000\nCapEff:\t000000c000001000\n\
        CapBnd:\t000000c000001000\nCapAmb:\t0000000000000000\nNoNewPrivs:\t1\n";

    fn mask(caps: &[&Cap]) -> u64 {
        caps.iter().fold(0, |m, c| m | 1 << c.number)
    }

    #[test]
    fn cap_eff_is_parsed_from_proc_status() {
        let eff = parse_cap_eff(STATUS).unwrap();
        assert_eq!(eff, 0xc0_0000_1000);
        assert_eq!(eff, mask(&[&BPF, &NET_ADMIN, &PERFMON]));
        // Root with every capability of a 6.x kernel.
        assert_eq!(
            parse_cap_eff("CapPrm:\t000001ffffffffff\nCapEff:\t000001ffffffffff\n").unwrap(),
            0x1ff_ffff_ffff
        );
        assert!(parse_cap_eff("Name:\tx\nCapPrm:\t0\n").is_err());
        assert!(parse_cap_eff("CapEff:\tzz\n").is_err());
        // The line is found by its key, not its position.
        assert_eq!(parse_cap_eff("CapEff:  10\nCapBnd:\t0\n").unwrap(), 0x10);
    }

    #[test]
    fn this_process_has_a_readable_effective_set() {
        effective().unwrap();
    }

    #[test]
    fn the_required_set_is_enough_and_each_capability_is_needed() {
        let all = mask(&[&BPF, &NET_ADMIN, &PERFMON]);
        assert!(missing(all, REQUIRED).is_empty());
        assert!(verdict(&missing(all, REQUIRED)).is_ok());
        for c in REQUIRED {
            let m = missing(all & !(1 << c.number), REQUIRED);
            assert_eq!(m, vec![c]);
            let e = verdict(&m).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("missing capability {} (", c.name)),
                "{e}"
            );
            assert!(e.contains(c.why), "{e}");
            assert!(
                e.contains("grant it (the DaemonSet in manifests/ does)"),
                "{e}"
            );
        }
    }

    #[test]
    fn every_missing_capability_is_named() {
        let e = verdict(&missing(0, REQUIRED.iter().chain([&SYS_ADMIN])))
            .unwrap_err()
            .to_string();
        for c in REQUIRED.iter().chain([&SYS_ADMIN]) {
            assert!(e.contains(c.name), "{e}");
            assert!(e.contains(c.why), "{e}");
        }
        assert!(e.starts_with("missing capabilities "), "{e}");
    }

    #[test]
    fn netns_needs_sys_admin_on_top() {
        let base = mask(&[&BPF, &NET_ADMIN, &PERFMON]);
        assert_eq!(
            missing(base, REQUIRED.iter().chain([&SYS_ADMIN])),
            vec![&SYS_ADMIN]
        );
        assert!(missing(
            base | 1 << SYS_ADMIN.number,
            REQUIRED.iter().chain([&SYS_ADMIN])
        )
        .is_empty());
    }

    #[test]
    fn sys_admin_stands_in_for_bpf_and_perfmon_but_not_net_admin() {
        let old_style = mask(&[&SYS_ADMIN, &NET_ADMIN]);
        assert!(missing(old_style, REQUIRED).is_empty());
        assert_eq!(missing(mask(&[&SYS_ADMIN]), REQUIRED), vec![&NET_ADMIN]);
    }

    #[test]
    fn names_numbers_and_kubernetes_spelling() {
        // capabilities(7) / linux/capability.h.
        for (c, n) in [
            (&BPF, 39),
            (&NET_ADMIN, 12),
            (&PERFMON, 38),
            (&SYS_ADMIN, 21),
        ] {
            assert_eq!(c.number, n, "{}", c.name);
            assert!(c.name.starts_with("CAP_"));
            assert!(!c.why.is_empty());
        }
        assert_eq!(BPF.k8s_name(), "BPF");
        assert_eq!(NET_ADMIN.k8s_name(), "NET_ADMIN");
        assert!(!REQUIRED.contains(&SYS_ADMIN));
    }
}
