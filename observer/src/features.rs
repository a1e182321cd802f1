//! What the running kernel offers observer, probed (program and map types, helpers, BTF)
//! rather than read off its version: vendor kernels backport features, and a kernel that lacks
//! one gets it named at start instead of a verifier or load error further on.
use anyhow::{bail, Result};
use aya::maps::MapType;
use aya::programs::ProgramType;
use aya::sys::{is_helper_supported, is_map_supported, is_program_supported};
use aya_obj::generated::bpf_func_id;

/// One kernel feature and whether this kernel has it.
#[derive(Clone, Debug)]
pub struct Feature {
    pub name: &'static str,
    /// The upstream release that brought it, for the error message.
    pub since: &'static str,
    pub present: bool,
}

/// The probe's result: what observer cannot run without, and what it chooses between.
#[derive(Clone, Debug)]
pub struct Features {
    pub required: Vec<Feature>,
    /// TCX attachment (Linux 6.6): else clsact.
    pub tcx: bool,
}

fn program(t: ProgramType) -> bool {
    is_program_supported(t).unwrap_or(false)
}

fn map(t: MapType) -> bool {
    is_map_supported(t).unwrap_or(false)
}

fn helper(h: bpf_func_id) -> bool {
    is_helper_supported(ProgramType::SchedClassifier, h).unwrap_or(false)
}

/// Probes the running kernel (a few tiny loads; milliseconds).
pub fn probe() -> Features {
    // Parsed once for both structs it is asked about.
    let btf = aya::Btf::from_sys_fs().ok();
    let has_struct = |name: &str| {
        btf.as_ref().map(|b| {
            b.id_by_type_name_kind(name, aya_obj::btf::BtfKind::Struct)
                .is_ok()
        })
    };
    let f = |name, since, present| Feature {
        name,
        since,
        present,
    };
    let required = vec![
        f(
            "tc programs (sched_cls)",
            "4.1",
            program(ProgramType::SchedClassifier),
        ),
        f("XDP programs", "4.8", program(ProgramType::Xdp)),
        f("hash maps", "3.19", map(MapType::Hash)),
        f("per-CPU array maps", "4.6", map(MapType::PerCpuArray)),
        f("LRU hash maps (conntrack)", "4.10", map(MapType::LruHash)),
        f(
            "LPM trie maps (ipBlock, ipcache)",
            "4.11",
            map(MapType::LpmTrie),
        ),
        f("BPF ring buffer (events)", "5.8", map(MapType::RingBuf)),
        f(
            "helper bpf_ringbuf_reserve",
            "5.8",
            helper(bpf_func_id::BPF_FUNC_ringbuf_reserve),
        ),
        f(
            "helper bpf_ktime_get_coarse_ns",
            "5.11",
            helper(bpf_func_id::BPF_FUNC_ktime_get_coarse_ns),
        ),
        f(
            "helper bpf_jiffies64",
            "5.5",
            helper(bpf_func_id::BPF_FUNC_jiffies64),
        ),
        // Pinned XDP links let a restarted daemon take the uplink over without a gap.
        f(
            "BPF links for XDP",
            "5.9",
            // Without BTF, not held against the kernel.
            has_struct("bpf_xdp_link").unwrap_or(true),
        ),
    ];
    Features {
        required,
        tcx: has_struct("tcx_link")
            .unwrap_or_else(|| crate::bpf::AttachMode::detect() == crate::bpf::AttachMode::Tcx),
    }
}

impl Features {
    /// An error naming every missing feature, or Ok.
    pub fn check(&self) -> Result<()> {
        let missing: Vec<String> = self
            .required
            .iter()
            .filter(|f| !f.present)
            .map(|f| format!("{} (Linux {})", f.name, f.since))
            .collect();
        if !missing.is_empty() {
            bail!(
                "this kernel cannot run observer: it lacks {} (observer needs Linux >= 5.11 \
                 with BTF, or a kernel with these backported)",
                missing.join(", ")
            );
        }
        Ok(())
    }

    /// One line for logs and `observer status`.
    pub fn summary(&self) -> String {
        let ok = self.required.iter().filter(|f| f.present).count();
        format!(
            "{ok}/{} required present; TCX {}",
            self.required.len(),
            if self.tcx { "yes" } else { "no (clsact)" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_feature_is_named_with_its_release() {
        let mut f = Features {
            required: vec![
                Feature {
                    name: "BPF ring buffer (events)",
                    since: "5.8",
                    present: false,
                },
                Feature {
                    name: "hash maps",
                    since: "3.19",
                    present: true,
                },
                Feature {
                    name: "helper bpf_ktime_get_coarse_ns",
                    since: "5.11",
                    present: false,
                },
            ],
            tcx: false,
        };
        let e = f.check().unwrap_err().to_string();
        assert!(e.contains("BPF ring buffer (events) (Linux 5.8)"), "{e}");
        assert!(
            e.contains("helper bpf_ktime_get_coarse_ns (Linux 5.11)"),
            "{e}"
        );
        assert!(!e.contains("hash maps"), "{e}");
        assert_eq!(f.summary(), "1/3 required present; TCX no (clsact)");
        for x in &mut f.required {
            x.present = true;
        }
        assert!(f.check().is_ok());
    }
}
