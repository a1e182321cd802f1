//! Loading the kernel programs, pinning and re-adopting their maps, attaching to interfaces.
use std::{
    collections::HashMap,
    ffi::CString,
    mem::size_of,
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};

use crate::policy::{compile::Desired, incremental::MapWrite};
use aya::{
    maps::{Array, HashMap as BpfHashMap, LpmTrie, MapData, MapInfo, PerCpuArray, RingBuf},
    programs::{
        links::{FdLink, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
        LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
    },
    util::KernelVersion,
    Ebpf, EbpfLoader,
};
use observer_common::{
    config_flags, maps, programs, stat, uplink, Config, CtEntry, CtKey, CtKey4, EndpointInfo,
    IpKey, IpcacheEntry, IpcacheKeyData, LocalRange, NodePortLink, PolicyEntry, PolicyKeyData,
    SvcKey, SvcNat, UplinkCounter, AF_INET, ATTACHED_BRIDGED, ATTACHED_ROUTED,
};
use tracing::{info, warn};

/// The kernel object built by `build.rs`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/observer"));

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/observer";
const BPF_FS_MAGIC: i64 = 0xcafe4a11;
/// Where bpffs is mounted on a node: the pins of the daemon and every scratch directory.
const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// A bpffs pin directory private to this process (benchmarks, the kernel engine, tests),
/// unique per call and removed on drop.
pub struct ScratchPins(PathBuf);

impl ScratchPins {
    pub fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        remove_orphans(tag);
        let dir = PathBuf::from(format!(
            "{BPFFS_ROOT}/observer-{tag}-{}-{n}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchPins {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Removes the scratch directories of `tag` whose process is gone: one killed before its drop
/// ran (an interrupted `observer bench`) left its maps pinned, a benchmark's conntrack tables
/// hundreds of MiB of kernel memory, until removed by hand. Only the same tag, and only where
/// no process of that id runs: another process's live directory is never touched. (From
/// another PID namespace sharing the bpffs, a live process may look gone: its run goes on on
/// the maps it holds open, only their pins go.)
fn remove_orphans(tag: &str) {
    let Ok(entries) = std::fs::read_dir(BPFFS_ROOT) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| scratch_owner(n, tag)) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// The process that made a scratch directory of `tag`, from its name
/// (`observer-{tag}-{pid}-{n}`); `None` for any other name.
fn scratch_owner(name: &str, tag: &str) -> Option<u32> {
    let rest = name
        .strip_prefix("observer-")?
        .strip_prefix(tag)?
        .strip_prefix('-')?;
    let (pid, n) = rest.split_once('-')?;
    n.parse::<u32>().ok()?;
    pid.parse().ok()
}

/// How a program is attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    Tcx,
    Clsact,
}

impl AttachMode {
    /// TCX when the running kernel has it, probed rather than read off the version (vendor
    /// kernels backport it): its BTF describes `struct tcx_link`. Without BTF, by version.
    pub fn detect() -> Self {
        let tcx = match aya::Btf::from_sys_fs() {
            Ok(btf) => btf
                .id_by_type_name_kind("tcx_link", aya_obj::btf::BtfKind::Struct)
                .is_ok(),
            Err(_) => KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0)),
        };
        if tcx {
            Self::Tcx
        } else {
            Self::Clsact
        }
    }
}

/// The loaded programs and maps.
pub struct Datapath {
    pub ebpf: Ebpf,
    pub pin_dir: PathBuf,
    pub mode: AttachMode,
    links: HashMap<u32, [Kept; 2]>,
    uplinks: HashMap<u32, Uplink>,
}

/// The programs on one of the node's uplinks.
struct Uplink {
    tc: [Kept; 2],
    xdp: Option<Kept>,
    xdp_mode: &'static str,
}

/// How XDP ended up attached to an uplink.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UplinkAttach {
    /// "native" (driver mode), "generic" (skb mode, on request only), or "off": tc ingress
    /// then judges what XDP would (a local pod's TCP openers), at the point generic XDP would
    /// run. `xdp_error`: why an XDP mode asked for did not attach.
    pub xdp_mode: &'static str,
    pub xdp_error: Option<String>,
}

/// Whether the uplinks get XDP (`--uplink-xdp`), which then judges a local pod's ingress
/// openers before the stack; without it, the uplink's tc ingress program does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum UplinkXdp {
    /// Driver mode where the NIC's driver has it, never on a veth; tc otherwise.
    #[default]
    Auto,
    /// Driver mode, on any interface (a veth included).
    Native,
    /// skb mode: runs where tc ingress does, after building an XDP buffer over each socket
    /// buffer (kept to compare with).
    Generic,
    /// tc only.
    Off,
}

impl UplinkXdp {
    /// The XDP mode to attach in on an interface, if any.
    fn mode(self, veth: bool) -> Option<(XdpMode, &'static str)> {
        match (self, veth) {
            (UplinkXdp::Off, _) | (UplinkXdp::Auto, true) => None,
            (UplinkXdp::Auto, false) | (UplinkXdp::Native, _) => Some((XdpMode::Driver, "native")),
            (UplinkXdp::Generic, _) => Some((XdpMode::Skb, "generic")),
        }
    }
}

/// An attachment that outlives the daemon: a kill -9 or a restart never leaves a pod
/// interface without its programs.
enum Kept {
    /// TCX: the link is pinned under `pin_dir/links`; the pin holds it, not this process.
    Pinned { _link: FdLink, pin: PathBuf },
    /// clsact: netlink filters belong to the qdisc, not to a file descriptor.
    Filter,
}

/// clsact filters are created at a fixed priority and handle so a restarted daemon can replace
/// its predecessor's program in place.
const FILTER_PRIORITY: u16 = 0x4f42;
const FILTER_HANDLE: u32 = 1;

/// Directory of pinned TCX links under the pin dir.
pub const LINKS_DIR: &str = "links";

/// Sizes every pinned map must have to be re-adopted.
fn expected_layout(name: &str) -> Option<(u32, u32)> {
    Some(match name {
        maps::CONNTRACK4 => (size_of::<CtKey4>() as u32, size_of::<CtEntry>() as u32),
        maps::CONNTRACK6 => (size_of::<CtKey>() as u32, size_of::<CtEntry>() as u32),
        maps::ENDPOINTS => (size_of::<IpKey>() as u32, size_of::<EndpointInfo>() as u32),
        maps::IPCACHE => (
            4 + size_of::<IpcacheKeyData>() as u32,
            size_of::<IpcacheEntry>() as u32,
        ),
        maps::ATTACHED => (4, 4),
        maps::STATS => (4, 8),
        maps::CONFIG => (4, size_of::<Config>() as u32),
        maps::EVENTS => (0, 0),
        maps::POLICY => (
            4 + size_of::<PolicyKeyData>() as u32,
            size_of::<PolicyEntry>() as u32,
        ),
        maps::UPLINK => (4, size_of::<UplinkCounter>() as u32),
        maps::SERVICES => (size_of::<SvcKey>() as u32, 4),
        maps::SVC_NAT => (size_of::<SvcKey>() as u32, size_of::<SvcNat>() as u32),
        maps::NODEPORT => (size_of::<SvcKey>() as u32, size_of::<NodePortLink>() as u32),
        maps::LOCAL_RANGE => (4, size_of::<LocalRange>() as u32),
        maps::LOCAL_BITS => (4, 8),
        maps::UPLINKS => (4, 4),
        _ => return None,
    })
}

/// Directory under the pin dir with one entry per clsact qdisc observer created
/// (`<ifindex>-<ifname>`, an empty directory: bpffs holds nothing else), so uninstall removes
/// those and leaves the ones other tools had.
pub const CLSACT_DIR: &str = "clsact";

/// Gives an interface a clsact qdisc unless it has one: ours from an earlier daemon, or
/// another tool's. The kernel refuses a second with EEXIST (its message, in aya's error, is
/// the extended ack "Exclusivity flag on, cannot modify", not "File exists"). Records a qdisc
/// it creates under `CLSACT_DIR`.
fn ensure_clsact(pin_dir: &Path, ifindex: u32, ifname: &str) -> Result<()> {
    match tc::qdisc_add_clsact(ifname) {
        Ok(()) => {
            let mark = pin_dir.join(CLSACT_DIR).join(format!("{ifindex}-{ifname}"));
            std::fs::create_dir_all(&mark).with_context(|| format!("recording {}", mark.display()))
        }
        Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        Err(tc::TcError::AlreadyAttached) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("adding clsact to {ifname}")),
    }
}

/// Forgets the clsact qdiscs recorded for `ifindex` (the interface is gone, and its qdisc
/// with it).
fn forget_clsact(pin_dir: &Path, ifindex: u32) {
    let Ok(rd) = std::fs::read_dir(pin_dir.join(CLSACT_DIR)) else {
        return;
    };
    let prefix = format!("{ifindex}-");
    for e in rd.flatten() {
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = std::fs::remove_dir(e.path());
        }
    }
}

/// Removes the clsact qdiscs observer created, where nothing else has filters on them any more;
/// says what it removed and what it kept.
fn remove_own_clsact(pin_dir: &Path, out: &mut Vec<String>) {
    let Ok(rd) = std::fs::read_dir(pin_dir.join(CLSACT_DIR)) else {
        return;
    };
    for e in rd.flatten() {
        let entry = e.file_name().to_string_lossy().to_string();
        let Some((index, name)) = entry.split_once('-') else {
            continue;
        };
        let Ok(index) = index.parse::<u32>() else {
            continue;
        };
        // The index may have been reused by another interface since.
        if crate::netlink::ifname(index).as_deref() != Some(name) {
            continue;
        }
        match crate::netlink::clsact_filters(index) {
            Ok(0) => match crate::netlink::delete_clsact(index) {
                Ok(()) => out.push(format!("removed clsact qdisc on {name}")),
                Err(err) => out.push(format!("kept clsact qdisc on {name}: {err}")),
            },
            Ok(n) => out.push(format!(
                "kept clsact qdisc on {name}: {n} filter(s) of another tool on it"
            )),
            Err(err) => out.push(format!("kept clsact qdisc on {name}: {err}")),
        }
    }
}

fn release(k: Kept, ifname: &str, t: TcAttachType) {
    match k {
        Kept::Pinned { pin, .. } => {
            let _ = std::fs::remove_file(pin);
        }
        Kept::Filter => {
            if !ifname.is_empty() {
                if let Ok(link) = SchedClassifierLink::attached(
                    ifname,
                    t,
                    FILTER_PRIORITY,
                    FILTER_HANDLE.into(),
                    None,
                ) {
                    let _ = link_detach(link);
                }
            }
        }
    }
}

fn link_detach(link: SchedClassifierLink) -> Result<()> {
    use aya::programs::links::Link as _;
    link.detach()?;
    Ok(())
}

/// Takes observer off the node: detaches its programs from every interface of this network
/// namespace, removes the clsact qdiscs it created where nothing else uses them, and removes
/// its pins. Enforcement stops. Returns one line per thing removed or kept.
pub fn uninstall(pin_dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let links = pin_dir.join(LINKS_DIR);
    if let Ok(rd) = std::fs::read_dir(&links) {
        for e in rd.flatten() {
            std::fs::remove_file(e.path())
                .with_context(|| format!("removing {}", e.path().display()))?;
            out.push(format!("removed link {}", e.file_name().to_string_lossy()));
        }
    }
    for l in crate::netlink::dump_links().unwrap_or_default() {
        for (t, name) in [
            (TcAttachType::Ingress, programs::FROM_POD),
            (TcAttachType::Egress, programs::TO_POD),
            (TcAttachType::Ingress, programs::UPLINK_INGRESS),
            (TcAttachType::Ingress, programs::UPLINK_INGRESS_POLICY),
            (TcAttachType::Egress, programs::UPLINK_EGRESS),
        ] {
            if tc::qdisc_detach_program(&l.name, t, name).is_ok() {
                out.push(format!("removed clsact filter {name} on {}", l.name));
            }
        }
    }
    remove_own_clsact(pin_dir, &mut out);
    if pin_dir.exists() {
        std::fs::remove_dir_all(pin_dir)
            .with_context(|| format!("removing {}", pin_dir.display()))?;
        out.push(format!("removed pins {}", pin_dir.display()));
    }
    Ok(out)
}

/// Mounts bpffs on `/sys/fs/bpf` when nothing is mounted there yet.
pub fn ensure_bpffs(pin_dir: &Path) -> Result<()> {
    let root = Path::new(BPFFS_ROOT);
    if pin_dir.starts_with(root) && !is_bpffs(root) {
        std::fs::create_dir_all(root).ok();
        let src = CString::new("bpf")?;
        let target = CString::new(BPFFS_ROOT)?;
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                src.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            bail!(
                "mounting bpffs on /sys/fs/bpf: {}",
                std::io::Error::last_os_error()
            );
        }
        info!("mounted bpffs on /sys/fs/bpf");
    }
    std::fs::create_dir_all(pin_dir)
        .with_context(|| format!("creating pin directory {}", pin_dir.display()))?;
    if !is_bpffs(pin_dir) {
        bail!("{} is not on a bpf filesystem", pin_dir.display());
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}

/// Removes pinned maps whose layout does not match this build, so they are recreated instead of
/// being misread. Returns the names of the maps that will be re-adopted.
fn check_pins(pin_dir: &Path) -> Result<Vec<String>> {
    let mut adopted = Vec::new();
    for name in maps::ALL {
        let path = pin_dir.join(name);
        if !path.exists() {
            continue;
        }
        let (key, value) = expected_layout(name).expect("every map has a layout");
        let ok = match MapInfo::from_pin(&path) {
            Ok(info) => {
                // The statistics and uplink arrays also grow when a counter is added.
                let sized = match name {
                    maps::STATS => info.max_entries() == stat::COUNT,
                    maps::UPLINK => info.max_entries() == uplink::ENTRIES,
                    _ => true,
                };
                sized
                    && ((key == 0 && value == 0)
                        || (info.key_size() == key && info.value_size() == value))
            }
            Err(_) => false,
        };
        if ok {
            adopted.push(name.to_string());
        } else {
            warn!(map = name, "pinned map has another layout; recreating it");
            std::fs::remove_file(&path)
                .with_context(|| format!("removing stale pin {}", path.display()))?;
        }
    }
    Ok(adopted)
}

/// The kernel's count of instructions its verifier walked for a program (Linux 5.16+): the
/// budget is 1,000,000 per program on every kernel, and older verifiers prune less, so the
/// same program costs more there. Logged to show the headroom left on the running kernel.
fn log_verified(name: &str, info: Option<aya::programs::ProgramInfo>) {
    if let Some(n) = info.and_then(|i| i.verified_instruction_count()) {
        info!(program = name, verified_insns = n, "program verified");
    }
}

impl Datapath {
    /// Loads the programs, re-adopting maps pinned under `pin_dir` by an earlier daemon.
    pub fn load(pin_dir: &Path) -> Result<Self> {
        Self::load_sized(pin_dir, None)
    }

    /// Like [`Datapath::load`], with the conntrack table sized to `ct_entries` (new maps only).
    pub fn load_sized(pin_dir: &Path, ct_entries: Option<u32>) -> Result<Self> {
        ensure_bpffs(pin_dir)?;
        let adopted = check_pins(pin_dir)?;
        if !adopted.is_empty() {
            info!(maps = ?adopted, "re-adopting pinned maps");
        }
        // Before the loader: both parse the kernel's BTF (about 14 MiB of heap on 6.18 for
        // the file and its types), and the loader holds its copy until it is dropped, so
        // detecting while it lives doubled the start's heap peak.
        let mode = AttachMode::detect();
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(pin_dir);
        if let Some(n) = ct_entries {
            loader.map_max_entries(maps::CONNTRACK4, n);
            loader.map_max_entries(maps::CONNTRACK6, n.min(observer_common::CT6_MAX_ENTRIES));
        }
        let ebpf = loader.load(OBJECT).context("loading the kernel programs")?;
        // Relocation is done: free its BTF before verification allocates above it.
        drop(loader);
        let mut dp = Self {
            ebpf,
            pin_dir: pin_dir.to_path_buf(),
            mode,
            links: HashMap::new(),
            uplinks: HashMap::new(),
        };
        for name in [programs::FROM_POD, programs::TO_POD] {
            dp.load_program(name)?;
        }
        dp.adopt_table_before_split()?;
        Ok(dp)
    }

    /// A conntrack table pinned by a version before the split by family: its connections are
    /// copied into the new tables, verdicts, directions and Service aliases with them, and its
    /// pin removed. Without the copy every open connection would be picked up again from its
    /// next packet, and one that only its server sends on (a watch, a download) would be
    /// judged as opened by the server. Runs once the programs verified, so a failed start
    /// leaves the old table to the version rolled back to.
    fn adopt_table_before_split(&mut self) -> Result<()> {
        use aya::maps::Map;
        let path = self.pin_dir.join(maps::CONNTRACK_BEFORE_SPLIT);
        if !path.exists() {
            return Ok(());
        }
        let layout_ok = MapInfo::from_pin(&path).is_ok_and(|i| {
            i.key_size() == size_of::<CtKey>() as u32
                && i.value_size() == size_of::<CtEntry>() as u32
        });
        let (mut copied, mut failed) = (0usize, 0usize);
        if layout_ok {
            let open = |name: &str| {
                MapData::from_pin(self.pin_dir.join(name))
                    .with_context(|| format!("opening pinned {name}"))
            };
            let old = open(maps::CONNTRACK_BEFORE_SPLIT)?;
            let mut v4: aya::maps::HashMap<MapData, CtKey4, CtEntry> =
                aya::maps::HashMap::try_from(Map::LruHashMap(open(maps::CONNTRACK4)?))?;
            let mut v6: aya::maps::HashMap<MapData, CtKey, CtEntry> =
                aya::maps::HashMap::try_from(Map::LruHashMap(open(maps::CONNTRACK6)?))?;
            let mut copy = |k: &CtKey, e: &CtEntry| {
                let r = if k.family == AF_INET {
                    v4.insert(k.v4(), e, 0)
                } else {
                    v6.insert(k, e, 0)
                };
                match r {
                    Ok(()) => copied += 1,
                    Err(_) => failed += 1,
                }
            };
            // Batches exist on every kernel observer runs on (Linux 5.6; the floor is 5.15).
            lookup_batch(&old, |k: &[CtKey], v: &[CtEntry]| {
                k.iter().zip(v).for_each(|(k, e)| copy(k, e))
            })
            .context("reading the conntrack table before the split")?;
        }
        warn!(
            map = maps::CONNTRACK_BEFORE_SPLIT,
            copied,
            failed,
            layout_ok,
            "conntrack table of an earlier version (both families in one): its connections \
             copied into the tables by family; removing it"
        );
        std::fs::remove_file(&path)
            .with_context(|| format!("removing stale pin {}", path.display()))
    }

    /// Verifies and loads every uplink program (benchmarks, tests). The daemon verifies the
    /// ones an uplink needs on first use: a node without uplinks (or with
    /// `--no-uplink-programs`) never depends on them.
    pub fn load_uplink_programs(&mut self) -> Result<()> {
        for name in [
            programs::UPLINK_INGRESS,
            programs::UPLINK_INGRESS_POLICY,
            programs::UPLINK_EGRESS,
            programs::UPLINK_XDP,
        ] {
            self.load_once(name)?;
        }
        Ok(())
    }

    /// Verifies and loads a program of the object unless it is loaded.
    fn load_once(&mut self, name: &str) -> Result<()> {
        let prog = self
            .ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the object"))?;
        if prog.fd().is_ok() {
            return Ok(());
        }
        if matches!(prog, aya::programs::Program::Xdp(_)) {
            self.load_xdp(name)
        } else {
            self.load_program(name)
        }
    }

    /// Verifies and loads one XDP program of the object.
    pub fn load_xdp(&mut self, name: &str) -> Result<()> {
        let prog = self.xdp(name)?;
        prog.load()
            .with_context(|| format!("verifying program {name}"))?;
        log_verified(name, prog.info().ok());
        Ok(())
    }

    pub fn xdp(&mut self, name: &str) -> Result<&mut Xdp> {
        Ok(self
            .ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the object"))?
            .try_into()?)
    }

    /// Attaches the uplink programs: tc on both directions, and XDP on ingress as `xdp` says
    /// (see [`UplinkXdp`]). A local pod's ingress openers are judged by XDP when it is
    /// attached, by tc ingress otherwise; the pod's veth judges everything again either way,
    /// so this is an early drop, never the only one. Like pod interfaces, attachments left by
    /// an earlier daemon are taken over in place (a program swapped in a pinned link).
    /// `veth`: the uplink is a veth (kind's nodes, the virtual node).
    pub fn attach_uplink(
        &mut self,
        ifindex: u32,
        ifname: &str,
        veth: bool,
        xdp: UplinkXdp,
    ) -> Result<UplinkAttach> {
        if let Some(u) = self.uplinks.get(&ifindex) {
            return Ok(UplinkAttach {
                xdp_mode: u.xdp_mode,
                xdp_error: None,
            });
        }
        if self.mode == AttachMode::Clsact {
            ensure_clsact(&self.pin_dir, ifindex, ifname)?;
        }
        let (xdp, xdp_mode, xdp_error) = match xdp.mode(veth) {
            None => (None, "off", None),
            Some(mode) => match self.attach_xdp(ifindex, mode) {
                Ok(k) => (Some(k), mode.1, None),
                Err(e) => (None, "off", Some(format!("{e:#}"))),
            },
        };
        let ingress_prog = if xdp.is_some() {
            programs::UPLINK_INGRESS
        } else {
            programs::UPLINK_INGRESS_POLICY
        };
        let tc = match self.attach_uplink_tc(ifindex, ifname, ingress_prog) {
            Ok(tc) => tc,
            Err(e) => {
                if let Some(x) = xdp {
                    release(x, "", TcAttachType::Ingress);
                }
                return Err(e);
            }
        };
        // A mode given up (an earlier daemon's XDP, `--uplink-xdp` changed): tc judges now.
        self.unpin_xdp_except(ifindex, xdp_mode);
        self.uplinks.insert(ifindex, Uplink { tc, xdp, xdp_mode });
        self.mark_uplink(ifindex, true)?;
        Ok(UplinkAttach {
            xdp_mode,
            xdp_error,
        })
    }

    fn attach_uplink_tc(
        &mut self,
        ifindex: u32,
        ifname: &str,
        ingress_prog: &str,
    ) -> Result<[Kept; 2]> {
        self.load_once(ingress_prog)?;
        self.load_once(programs::UPLINK_EGRESS)?;
        let ingress = self
            .attach_one_as(
                ingress_prog,
                ifindex,
                ifname,
                TcAttachType::Ingress,
                "uplink-ingress",
            )
            .with_context(|| format!("attaching {ingress_prog} to {ifname}"))?;
        match self.attach_one_as(
            programs::UPLINK_EGRESS,
            ifindex,
            ifname,
            TcAttachType::Egress,
            "uplink-egress",
        ) {
            Ok(egress) => Ok([ingress, egress]),
            Err(e) => {
                release(ingress, ifname, TcAttachType::Ingress);
                Err(e).with_context(|| format!("attaching uplink_egress to {ifname}"))
            }
        }
    }

    /// The pin of an uplink's XDP link; its name records the mode the link was created in (a
    /// link keeps its mode).
    fn xdp_pin(&self, ifindex: u32, mode: &str) -> PathBuf {
        self.pin_dir
            .join(LINKS_DIR)
            .join(format!("{ifindex}-uplink-xdp-{mode}"))
    }

    /// Releases the uplink's pinned XDP links of every mode but `keep` (the link goes with its
    /// pin once no process holds it).
    fn unpin_xdp_except(&self, ifindex: u32, keep: &str) {
        for mode in ["native", "generic"] {
            if mode != keep {
                let _ = std::fs::remove_file(self.xdp_pin(ifindex, mode));
            }
        }
    }

    /// XDP in `mode`; a link of that mode left by an earlier daemon is taken over. Driver mode
    /// is never chosen for a veth unasked: a veth runs a driver-mode program on a copy of each
    /// (already built) socket buffer and takes segmentation offload away from its peer, so
    /// cross-node TCP fell from about 12 to 2.5 Gbit/s on the virtual node.
    fn attach_xdp(&mut self, ifindex: u32, (mode, name): (XdpMode, &str)) -> Result<Kept> {
        self.load_once(programs::UPLINK_XDP)?;
        let pin = self.xdp_pin(ifindex, name);
        // One XDP mode at a time on an interface: the other one's link goes first.
        self.unpin_xdp_except(ifindex, name);
        let prog = self.xdp(programs::UPLINK_XDP)?;
        if let Ok(old) = PinnedLink::from_pin(&pin) {
            let link = XdpLink::try_from(FdLink::from(old))?;
            let id = prog.attach_to_link(link)?;
            let link: FdLink = prog.take_link(id)?.try_into()?;
            return Ok(Kept::Pinned { _link: link, pin });
        }
        let id = prog
            .attach_to_if_index(ifindex, mode)
            .with_context(|| format!("XDP attach in {name} mode"))?;
        let link: FdLink = prog
            .take_link(id)?
            .try_into()
            .context("XDP attached without a bpf_link (kernel < 5.9): cannot pin it")?;
        if let Some(dir) = pin.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let _ = std::fs::remove_file(&pin);
        let pinned = link
            .pin(&pin)
            .with_context(|| format!("pinning link {}", pin.display()))?;
        Ok(Kept::Pinned {
            _link: FdLink::from(pinned),
            pin,
        })
    }

    /// Forgets an uplink that went away and releases its pins.
    pub fn detach_uplink(&mut self, ifindex: u32) {
        let _ = self.mark_uplink(ifindex, false);
        if let Some(u) = self.uplinks.remove(&ifindex) {
            let name = crate::netlink::ifname(ifindex).unwrap_or_default();
            let [i, e] = u.tc;
            release(i, &name, TcAttachType::Ingress);
            release(e, &name, TcAttachType::Egress);
            if let Some(x) = u.xdp {
                release(x, "", TcAttachType::Ingress);
            }
        }
        if crate::netlink::ifname(ifindex).is_none() {
            forget_clsact(&self.pin_dir, ifindex);
        }
    }

    pub fn uplinks(&self) -> Vec<(u32, &'static str)> {
        let mut v: Vec<(u32, &'static str)> =
            self.uplinks.iter().map(|(i, u)| (*i, u.xdp_mode)).collect();
        v.sort_unstable();
        v
    }

    /// Wire-side counters of the uplinks, summed over CPUs, indexed by [`uplink::index`].
    pub fn uplink_counters(&self) -> Result<Vec<UplinkCounter>> {
        let arr: PerCpuArray<&MapData, UplinkCounter> =
            PerCpuArray::try_from(self.ebpf.map(maps::UPLINK).context("uplink map")?)?;
        let mut out = Vec::with_capacity(uplink::ENTRIES as usize);
        for i in 0..uplink::ENTRIES {
            let v = arr.get(&i, 0)?;
            out.push(
                v.iter()
                    .fold(UplinkCounter::default(), |a, c| UplinkCounter {
                        packets: a.packets + c.packets,
                        bytes: a.bytes + c.bytes,
                    }),
            );
        }
        Ok(out)
    }

    /// Verifies and loads one program of the object (the datapath's two are loaded by `load`;
    /// benchmarks load their own).
    pub fn load_program(&mut self, name: &str) -> Result<()> {
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the object"))?
            .try_into()?;
        prog.load()
            .with_context(|| format!("verifying program {name}"))?;
        log_verified(name, prog.info().ok());
        Ok(())
    }

    pub fn config(&self) -> Result<Config> {
        let arr: Array<&MapData, Config> =
            Array::try_from(self.ebpf.map(maps::CONFIG).context("config map")?)?;
        Ok(arr.get(&0, 0)?)
    }

    pub fn bump_policy_gen(&mut self) -> Result<()> {
        let mut c = self.config()?;
        c.policy_gen = c.policy_gen.wrapping_add(1);
        self.set_config(c)
    }

    pub fn policy_mut(&mut self) -> Result<LpmTrie<&mut MapData, PolicyKeyData, PolicyEntry>> {
        Ok(LpmTrie::try_from(
            self.ebpf.map_mut(maps::POLICY).context("policy map")?,
        )?)
    }

    pub fn set_config(&mut self, cfg: Config) -> Result<()> {
        let mut arr: Array<&mut MapData, Config> =
            Array::try_from(self.ebpf.map_mut(maps::CONFIG).context("config map")?)?;
        arr.set(0, cfg, 0)?;
        Ok(())
    }

    /// Attaches `from_pod` (ingress) and `to_pod` (egress) to a host-side pod interface. An
    /// attachment left by an earlier daemon is taken over by swapping the program inside it
    /// (`BPF_LINK_UPDATE` for TCX, an in-place filter change for clsact): the interface is never
    /// without a program, not even for one packet. `routed`: the node routes the pod's address
    /// to this veth (it is no bridge's port), see [`Datapath::mark_attached`].
    pub fn attach(&mut self, ifindex: u32, ifname: &str, routed: bool) -> Result<()> {
        if self.links.contains_key(&ifindex) {
            return self.mark_attached(ifindex, routed);
        }
        if self.mode == AttachMode::Clsact {
            ensure_clsact(&self.pin_dir, ifindex, ifname)?;
        }
        let ingress = self
            .attach_one(programs::FROM_POD, ifindex, ifname, TcAttachType::Ingress)
            .with_context(|| format!("attaching from_pod to {ifname}"))?;
        let egress = match self.attach_one(programs::TO_POD, ifindex, ifname, TcAttachType::Egress)
        {
            Ok(k) => k,
            Err(e) => {
                release(ingress, ifname, TcAttachType::Ingress);
                return Err(e).with_context(|| format!("attaching to_pod to {ifname}"));
            }
        };
        self.links.insert(ifindex, [ingress, egress]);
        self.mark_attached(ifindex, routed)
    }

    /// Tells `to_pod` that packets entering through `ifindex` passed `from_pod` there, and the
    /// programs whether the node routes the pod's address to it (`routed`, the veth has no
    /// master): only then are its packets to and from other nodes delivered past the node's
    /// stack, both ways (a bridge's port would send them but not get the replies).
    pub fn mark_attached(&mut self, ifindex: u32, routed: bool) -> Result<()> {
        let mut attached: BpfHashMap<&mut MapData, u32, u32> =
            BpfHashMap::try_from(self.ebpf.map_mut(maps::ATTACHED).context("attached map")?)?;
        let kind = if routed {
            ATTACHED_ROUTED
        } else {
            ATTACHED_BRIDGED
        };
        if attached.get(&ifindex, 0).ok() != Some(kind) {
            attached.insert(ifindex, kind, 0)?;
        }
        if routed {
            let mut c = self.config()?;
            if c.flags & config_flags::ROUTED_PODS == 0 {
                c.flags |= config_flags::ROUTED_PODS;
                self.set_config(c)?;
            }
        }
        Ok(())
    }

    /// Tells the programs which interfaces are uplinks observer is attached to (`present`) or
    /// no longer.
    fn mark_uplink(&mut self, ifindex: u32, present: bool) -> Result<()> {
        let mut uplinks: BpfHashMap<&mut MapData, u32, u32> =
            BpfHashMap::try_from(self.ebpf.map_mut(maps::UPLINKS).context("uplinks map")?)?;
        if present {
            uplinks.insert(ifindex, 1, 0)?;
        } else {
            let _ = uplinks.remove(&ifindex);
        }
        Ok(())
    }

    fn attach_one(
        &mut self,
        name: &str,
        ifindex: u32,
        ifname: &str,
        t: TcAttachType,
    ) -> Result<Kept> {
        let pin_name = match t {
            TcAttachType::Ingress => "ingress",
            _ => "egress",
        };
        self.attach_one_as(name, ifindex, ifname, t, pin_name)
    }

    /// Attaches one tc program; a TCX link is pinned as `links/<ifindex>-<pin_name>`.
    fn attach_one_as(
        &mut self,
        name: &str,
        ifindex: u32,
        ifname: &str,
        t: TcAttachType,
        pin_name: &str,
    ) -> Result<Kept> {
        match self.mode {
            AttachMode::Tcx => {
                let pin = self
                    .pin_dir
                    .join(LINKS_DIR)
                    .join(format!("{ifindex}-{pin_name}"));
                let prog = self.prog(name)?;
                let (id, adopted) = match PinnedLink::from_pin(&pin) {
                    Ok(old) => {
                        let link = SchedClassifierLink::try_from(FdLink::from(old))?;
                        (prog.attach_to_link(link)?, true)
                    }
                    Err(_) => (
                        prog.attach_with_options(
                            ifname,
                            t,
                            TcAttachOptions::TcxOrder(LinkOrder::default()),
                        )?,
                        false,
                    ),
                };
                let link: FdLink = prog.take_link(id)?.try_into()?;
                if adopted {
                    return Ok(Kept::Pinned { _link: link, pin });
                }
                if let Some(dir) = pin.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                let _ = std::fs::remove_file(&pin);
                let pinned = link
                    .pin(&pin)
                    .with_context(|| format!("pinning link {}", pin.display()))?;
                Ok(Kept::Pinned {
                    _link: FdLink::from(pinned),
                    pin,
                })
            }
            AttachMode::Clsact => {
                let prog = self.prog(name)?;
                let replaced = SchedClassifierLink::attached(
                    ifname,
                    t,
                    FILTER_PRIORITY,
                    FILTER_HANDLE.into(),
                    None,
                )
                .ok()
                .and_then(|old| prog.attach_to_link(old).ok());
                let id = match replaced {
                    Some(id) => id,
                    None => prog.attach_with_options(
                        ifname,
                        t,
                        TcAttachOptions::Netlink(NlOptions {
                            priority: FILTER_PRIORITY,
                            handle: FILTER_HANDLE.into(),
                            ..Default::default()
                        }),
                    )?,
                };
                // Dropping the link object would delete the filter; the qdisc owns it now.
                std::mem::forget(prog.take_link(id)?);
                Ok(Kept::Filter)
            }
        }
    }

    /// Forgets an interface and releases its attachments (a deleted interface took its
    /// programs with it; the pins go too).
    pub fn detach(&mut self, ifindex: u32) {
        if let Some([i, e]) = self.links.remove(&ifindex) {
            let name = crate::netlink::ifname(ifindex);
            release(i, name.as_deref().unwrap_or(""), TcAttachType::Ingress);
            release(e, name.as_deref().unwrap_or(""), TcAttachType::Egress);
        }
        if crate::netlink::ifname(ifindex).is_none() {
            forget_clsact(&self.pin_dir, ifindex);
        }
        if let Some(m) = self.ebpf.map_mut(maps::ATTACHED) {
            if let Ok(mut attached) = BpfHashMap::<&mut MapData, u32, u32>::try_from(m) {
                let _ = attached.remove(&ifindex);
            }
        }
    }

    /// Releases pinned attachments of interfaces this daemon did not take over (gone, or no
    /// longer pod interfaces). Call after the first scan of interfaces.
    pub fn prune_link_pins(&self) -> Vec<PathBuf> {
        let mut removed = Vec::new();
        let dir = self.pin_dir.join(LINKS_DIR);
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return removed;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let (ifindex, what) = match name.split_once('-') {
                Some((i, w)) => (i.parse::<u32>().ok(), w),
                None => (None, ""),
            };
            let kept = match ifindex {
                Some(i) if what.starts_with("uplink") => self.uplinks.contains_key(&i),
                Some(i) => self.links.contains_key(&i),
                None => false,
            };
            if kept {
                continue;
            }
            if std::fs::remove_file(e.path()).is_ok() {
                removed.push(e.path());
            }
        }
        removed
    }

    pub fn attached(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.links.keys().copied().collect();
        v.sort_unstable();
        v
    }

    pub fn prog(&mut self, name: &str) -> Result<&mut SchedClassifier> {
        Ok(self
            .ebpf
            .program_mut(name)
            .with_context(|| format!("program {name}"))?
            .try_into()?)
    }

    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        Ok(RingBuf::try_from(
            self.ebpf.take_map(maps::EVENTS).context("events map")?,
        )?)
    }

    pub fn stats(&self) -> Result<Vec<(&'static str, u64)>> {
        let arr: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.ebpf.map(maps::STATS).context("stats map")?)?;
        let mut out = Vec::new();
        for (i, name) in stat::NAMES.iter().enumerate() {
            let v = arr.get(&(i as u32), 0)?;
            out.push((*name, v.iter().sum()));
        }
        Ok(out)
    }

    /// Events the kernel could not put in the ring, all CPUs (`stat::EVENTS_LOST`).
    pub fn events_lost(&self) -> Result<u64> {
        let arr: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.ebpf.map(maps::STATS).context("stats map")?)?;
        Ok(arr.get(&stat::EVENTS_LOST, 0)?.iter().sum())
    }

    /// Removes these connections from the kernel's tables, thousands per system call
    /// (`BPF_MAP_DELETE_BATCH`, Linux 5.6, below the supported floor of 5.15).
    /// A key already gone is skipped. Returns how many were removed.
    pub fn remove_conntrack(&mut self, keys: &[CtKey]) -> Result<usize> {
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for k in keys {
            if k.family == AF_INET {
                v4.push(k.v4());
            } else {
                v6.push(*k);
            }
        }
        Ok(self.remove_from(maps::CONNTRACK4, &v4)? + self.remove_from(maps::CONNTRACK6, &v6)?)
    }

    fn remove_from<K: aya::Pod>(&mut self, table: &str, keys: &[K]) -> Result<usize> {
        if keys.is_empty() {
            return Ok(0);
        }
        delete_batch(self.conntrack_data(table)?, keys).context("removing conntrack entries")
    }

    /// Whether the kernel holds NodePort client notes (one system call).
    pub fn has_nodeport_notes(&self) -> Result<bool> {
        let m: BpfHashMap<&MapData, SvcKey, NodePortLink> =
            BpfHashMap::try_from(self.ebpf.map(maps::NODEPORT).context("nodeport map")?)?;
        Ok(m.keys().next().is_some())
    }

    /// One connection's entry, if the kernel holds it.
    pub fn conntrack_get(&self, key: &CtKey) -> Result<Option<CtEntry>> {
        let got = if key.family == AF_INET {
            let m: aya::maps::HashMap<&MapData, CtKey4, CtEntry> =
                aya::maps::HashMap::try_from(self.ebpf.map(maps::CONNTRACK4).context("ct map")?)?;
            m.get(&key.v4(), 0)
        } else {
            let m: aya::maps::HashMap<&MapData, CtKey, CtEntry> =
                aya::maps::HashMap::try_from(self.ebpf.map(maps::CONNTRACK6).context("ct map")?)?;
            m.get(key, 0)
        };
        match got {
            Ok(e) => Ok(Some(e)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).context("reading a conntrack entry"),
        }
    }

    /// Every conntrack entry, read in batches of thousands per system call
    /// (`BPF_MAP_LOOKUP_BATCH`, Linux 5.6) rather than two calls per entry; the entry-by-entry
    /// walk where the kernel has no batches. A sweep over 200,000 connections went from about
    /// 400,000 system calls to about 50.
    pub fn conntrack_entries(&self) -> Result<Vec<(CtKey, CtEntry)>> {
        let mut out = Vec::new();
        self.visit_conntrack(|k, e| out.push((*k, *e)))?;
        Ok(out)
    }

    /// Hands every conntrack entry, IPv4's then IPv6's, to `f`, batch by batch: nothing of the
    /// tables is kept, so a sweep of a full table neither allocates nor faults in tens of MiB.
    pub fn visit_conntrack(&self, mut f: impl FnMut(&CtKey, &CtEntry)) -> Result<()> {
        self.visit_table(maps::CONNTRACK4, |k: &CtKey4, e| f(&k.widen(), e))?;
        self.visit_table(maps::CONNTRACK6, |k: &CtKey, e| f(k, e))
    }

    fn visit_table<K: aya::Pod>(&self, table: &str, mut f: impl FnMut(&K, &CtEntry)) -> Result<()> {
        lookup_batch(self.conntrack_data(table)?, |k: &[K], v: &[CtEntry]| {
            for (k, v) in k.iter().zip(v) {
                f(k, v);
            }
        })
        .context("reading the conntrack map")
    }

    /// How many connections the conntrack tables hold, and of those IPv6, counted batch by
    /// batch (nothing kept).
    pub fn conntrack_len(&self) -> Result<(usize, usize)> {
        let (mut n, mut v6) = (0, 0);
        self.visit_conntrack(|k, _| {
            n += 1;
            v6 += (k.family != AF_INET) as usize;
        })?;
        Ok((n, v6))
    }

    fn conntrack_data(&self, table: &str) -> Result<&MapData> {
        match self.ebpf.map(table).context("ct map")? {
            aya::maps::Map::LruHashMap(d) | aya::maps::Map::HashMap(d) => Ok(d),
            _ => bail!("the conntrack map {table} is not a hash map"),
        }
    }

    /// Adds or changes a local pod, widening the local address range and marking its bit
    /// first: XDP must never take a pod the endpoints map holds for the node.
    pub fn insert_endpoint(&mut self, ip: IpAddr, v: EndpointInfo) -> Result<()> {
        if let IpAddr::V4(a) = ip {
            let a = u32::from(a);
            let r = self.local_range()?;
            let mut next = if r.may_hold(a) { r } else { r.with(a) };
            // Still exact if the pod is in the bitmap's /16: its bit goes in first.
            match r.bit(a) {
                Some((w, bit)) if r.exact != 0 => {
                    self.set_local_bit(w, bit, true)?;
                    next.exact = 1;
                }
                _ => next.exact = 0,
            }
            if next != r {
                self.set_local_range(next)?;
            }
        }
        self.endpoints_mut()?
            .insert(crate::cluster::ip_key(ip), v, 0)
            .context("writing endpoints map")
    }

    /// Removes a local pod; its bit goes after it. The range narrows at the next full write
    /// (wider only costs lookups).
    fn remove_endpoint(&mut self, ip: IpAddr) -> Result<()> {
        let k = crate::cluster::ip_key(ip);
        remove_present(self.endpoints_mut()?.remove(&k)).context("removing an endpoint")?;
        if let IpAddr::V4(a) = ip {
            let r = self.local_range()?;
            if let Some((w, bit)) = r.bit(u32::from(a)).filter(|_| r.exact != 0) {
                self.set_local_bit(w, bit, false)?;
            }
        }
        Ok(())
    }

    fn local_bits_mut(&mut self) -> Result<Array<&mut MapData, u64>> {
        Ok(Array::try_from(
            self.ebpf
                .map_mut(maps::LOCAL_BITS)
                .context("local bits map")?,
        )?)
    }

    fn set_local_bit(&mut self, word: u32, bit: u64, on: bool) -> Result<()> {
        let mut arr = self.local_bits_mut()?;
        let w = arr.get(&word, 0)?;
        let next = if on { w | bit } else { w & !bit };
        if next != w {
            arr.set(word, next, 0).context("writing local bits map")?;
        }
        Ok(())
    }

    /// Sets the local range to exactly the IPv4 endpoints among `keys` (the endpoints map must
    /// already hold them all), with the bitmap when they lie in one /16.
    fn settle_local_range<'a>(
        &mut self,
        keys: impl Iterator<Item = &'a IpKey> + Clone,
    ) -> Result<()> {
        let mut r = v4_range(keys.clone());
        if r.fits_bits() {
            let want = local_bits(&r, keys.filter_map(v4_addr));
            let mut arr = self.local_bits_mut()?;
            for (i, w) in want.iter().enumerate() {
                if arr.get(&(i as u32), 0)? != *w {
                    arr.set(i as u32, *w, 0).context("writing local bits map")?;
                }
            }
            r.exact = 1;
        }
        self.set_local_range(r)
    }

    /// The local range and bitmap as a full write leaves them, from what the endpoints map
    /// holds (for benchmarks that fill the maps by hand).
    pub fn settle_local_range_from_endpoints(&mut self) -> Result<()> {
        let held = held_endpoints(&self.endpoints_mut()?);
        self.settle_local_range(held.keys())
    }

    pub fn local_range(&self) -> Result<LocalRange> {
        let arr: Array<&MapData, LocalRange> = Array::try_from(
            self.ebpf
                .map(maps::LOCAL_RANGE)
                .context("local range map")?,
        )?;
        Ok(arr.get(&0, 0)?)
    }

    fn set_local_range(&mut self, r: LocalRange) -> Result<()> {
        let mut arr: Array<&mut MapData, LocalRange> = Array::try_from(
            self.ebpf
                .map_mut(maps::LOCAL_RANGE)
                .context("local range map")?,
        )?;
        arr.set(0, r, 0).context("writing local range map")
    }

    pub fn endpoints_mut(&mut self) -> Result<BpfHashMap<&mut MapData, IpKey, EndpointInfo>> {
        Ok(BpfHashMap::try_from(
            self.ebpf
                .map_mut(maps::ENDPOINTS)
                .context("endpoints map")?,
        )?)
    }

    pub fn ipcache_mut(&mut self) -> Result<LpmTrie<&mut MapData, IpcacheKeyData, IpcacheEntry>> {
        Ok(LpmTrie::try_from(
            self.ebpf.map_mut(maps::IPCACHE).context("ipcache map")?,
        )?)
    }
    /// The kernel's link of a Service client (pod address and port) to its frontend and backend.
    pub fn svc_nat(&self, client: &SvcKey) -> Option<SvcNat> {
        let m: BpfHashMap<&MapData, SvcKey, SvcNat> =
            BpfHashMap::try_from(self.ebpf.map(maps::SVC_NAT)?).ok()?;
        m.get(client, 0).ok()
    }

    /// The client from outside behind a NodePort connection, by the client's port.
    pub fn nodeport_link(&self, key: &SvcKey) -> Option<NodePortLink> {
        let m: BpfHashMap<&MapData, SvcKey, NodePortLink> =
            BpfHashMap::try_from(self.ebpf.map(maps::NODEPORT)?).ok()?;
        m.get(key, 0).ok()
    }

    /// Visits every NodePort note: `keep` returns its new flags, or `None` to remove it.
    pub fn sweep_nodeport(
        &mut self,
        mut keep: impl FnMut(&SvcKey, &NodePortLink) -> Option<u32>,
    ) -> Result<()> {
        let mut m: BpfHashMap<&mut MapData, SvcKey, NodePortLink> =
            BpfHashMap::try_from(self.ebpf.map_mut(maps::NODEPORT).context("nodeport map")?)?;
        let notes: Vec<(SvcKey, NodePortLink)> = m.iter().filter_map(|r| r.ok()).collect();
        for (k, l) in notes {
            match keep(&k, &l) {
                None => {
                    let _ = m.remove(&k);
                }
                Some(f) if f != l.flags => {
                    let _ = m.insert(k, NodePortLink { flags: f, ..l }, 0);
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    pub fn services_mut(&mut self) -> Result<BpfHashMap<&mut MapData, SvcKey, u32>> {
        Ok(BpfHashMap::try_from(
            self.ebpf.map_mut(maps::SERVICES).context("services map")?,
        )?)
    }

    /// Moves the Service frontends to `want` from what the map holds.
    fn apply_services(&mut self, want: &Desired) -> Result<(usize, usize)> {
        let mut m = self.services_mut()?;
        let have: HashMap<SvcKey, u32> = m.iter().filter_map(|r| r.ok()).collect();
        let want: HashMap<SvcKey, u32> = want
            .services
            .iter()
            .map(|(k, v)| (svc_key(*k), *v))
            .collect();
        let (mut written, mut removed) = (0, 0);
        for (k, v) in &want {
            if have.get(k) != Some(v) {
                m.insert(k, v, 0).context("writing services map")?;
                written += 1;
            }
        }
        for k in have.keys().filter(|k| !want.contains_key(k)) {
            let _ = m.remove(k);
            removed += 1;
        }
        Ok((written, removed))
    }

    /// Performs `writes` in order (see [`crate::policy::incremental::ordered_writes`]);
    /// returns (written, removed). Stops at the first failure: the caller then rewrites
    /// everything from what the maps hold.
    pub fn write(&mut self, writes: &[MapWrite]) -> Result<(usize, usize)> {
        let (mut written, mut removed) = (0, 0);
        for w in writes {
            match *w {
                MapWrite::Endpoint(ip, v) => match v {
                    Some(v) => self.insert_endpoint(ip, v)?,
                    None => self.remove_endpoint(ip)?,
                },
                MapWrite::Ipcache(net, v) => {
                    let mut m = self.ipcache_mut()?;
                    let (plen, data) = crate::cluster::ipcache_key(net);
                    let k = aya::maps::lpm_trie::Key::new(plen, data);
                    match v {
                        Some(v) => m.insert(&k, v, 0).context("writing ipcache map")?,
                        None => remove_present(m.remove(&k)).context("removing from ipcache")?,
                    }
                }
                MapWrite::Policy((plen, data), v) => {
                    let mut m = self.policy_mut()?;
                    let k = aya::maps::lpm_trie::Key::new(plen, data);
                    match v {
                        Some(v) => m.insert(&k, v, 0).context("writing policy map")?,
                        None => remove_present(m.remove(&k)).context("removing a policy entry")?,
                    }
                }
                MapWrite::Service(k, v) => {
                    let mut m = self.services_mut()?;
                    match v {
                        Some(v) => m.insert(svc_key(k), v, 0).context("writing services map")?,
                        None => remove_present(m.remove(&svc_key(k)))
                            .context("removing a Service frontend")?,
                    }
                }
            }
            let gone = matches!(
                w,
                MapWrite::Endpoint(_, None)
                    | MapWrite::Ipcache(_, None)
                    | MapWrite::Policy(_, None)
                    | MapWrite::Service(_, None)
            );
            if gone {
                removed += 1;
            } else {
                written += 1;
            }
        }
        Ok((written, removed))
    }

    /// Writes `want` into the endpoints, ipcache and policy maps, touching only what differs
    /// from what they hold (used at start, when the maps may come from an earlier daemon).
    /// New entries go in before stale ones go out.
    pub fn apply(&mut self, want: &Desired) -> Result<(usize, usize)> {
        let (mut written, mut removed) = self.apply_services(want)?;
        let dp = self;
        {
            let have = held_endpoints(&dp.endpoints_mut()?);
            let want_keys = wanted_endpoints(want);
            // Wide enough for old and new pods while they change (and not exact: the bitmap is
            // rewritten), exactly the new ones after.
            dp.set_local_range(v4_range(have.keys().chain(want_keys.keys())))?;
            let mut eps = dp.endpoints_mut()?;
            for (k, v) in &want_keys {
                if have.get(k) != Some(v) {
                    eps.insert(k, v, 0).context("writing endpoints map")?;
                    written += 1;
                }
            }
            for k in have.keys() {
                if !want_keys.contains_key(k) {
                    eps.remove(k).context("removing from endpoints map")?;
                    removed += 1;
                }
            }
            dp.settle_local_range(want_keys.keys())?;
        }
        {
            let mut ipc = dp.ipcache_mut()?;
            let have = held_ipcache(&ipc);
            let want_keys = wanted_ipcache(want);
            for ((plen, data), v) in &want_keys {
                if have.get(&(*plen, *data)) != Some(v) {
                    let key = aya::maps::lpm_trie::Key::new(
                        *plen,
                        observer_common::IpcacheKeyData { data: *data },
                    );
                    ipc.insert(&key, *v, 0).context("writing ipcache map")?;
                    written += 1;
                }
            }
            for (plen, data) in have.keys() {
                if !want_keys.contains_key(&(*plen, *data)) {
                    let key = aya::maps::lpm_trie::Key::new(
                        *plen,
                        observer_common::IpcacheKeyData { data: *data },
                    );
                    ipc.remove(&key).context("removing from ipcache map")?;
                    removed += 1;
                }
            }
        }
        {
            let mut pol = dp.policy_mut()?;
            let have = held_policy(&pol);
            for (k, v) in &want.policy {
                if have.get(k) != Some(v) {
                    pol.insert(&aya::maps::lpm_trie::Key::new(k.0, k.1), *v, 0)
                        .context("writing policy map")?;
                    written += 1;
                }
            }
            for k in have.keys() {
                if !want.policy.contains_key(k) {
                    pol.remove(&aya::maps::lpm_trie::Key::new(k.0, k.1))
                        .context("removing from policy map")?;
                    removed += 1;
                }
            }
        }
        Ok((written, removed))
    }
}

/// A removal of an entry that is already gone is done.
fn remove_present(r: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        other => other,
    }
}

fn svc_key((ip, proto, port): (IpAddr, u8, u16)) -> SvcKey {
    let k = crate::cluster::ip_key(ip);
    SvcKey {
        addr: k.addr,
        port,
        proto,
        family: k.family,
    }
}

/// An IPv4 endpoint key's address (host byte order).
fn v4_addr(k: &IpKey) -> Option<u32> {
    (k.family == observer_common::AF_INET).then(|| u32::from_be(k.addr[0]))
}

/// The range of the IPv4 endpoints among `keys`.
fn v4_range<'a>(keys: impl Iterator<Item = &'a IpKey>) -> LocalRange {
    LocalRange::of(keys.filter_map(v4_addr))
}

/// The `LOCAL_BITS` words that mark `addrs` (host byte order) in the bitmap of range `r`;
/// addresses outside its /16 are left out.
fn local_bits(r: &LocalRange, addrs: impl Iterator<Item = u32>) -> Vec<u64> {
    let mut words = vec![0u64; observer_common::LOCAL_BITS_WORDS as usize];
    for (w, bit) in addrs.filter_map(|a| r.bit(a)) {
        words[w as usize] |= bit;
    }
    words
}

/// What the kernel maps hold, keyed as the writer and the checker compare them.
fn held_endpoints<T: std::borrow::Borrow<MapData>>(
    m: &BpfHashMap<T, IpKey, EndpointInfo>,
) -> HashMap<IpKey, EndpointInfo> {
    m.iter().filter_map(|r| r.ok()).collect()
}

fn held_ipcache<T: std::borrow::Borrow<MapData>>(
    m: &LpmTrie<T, IpcacheKeyData, IpcacheEntry>,
) -> HashMap<(u32, [u32; 5]), IpcacheEntry> {
    m.iter()
        .filter_map(|r| r.ok())
        .map(|(k, v)| ((k.prefix_len(), k.data().data), v))
        .collect()
}

fn held_policy<T: std::borrow::Borrow<MapData>>(
    m: &LpmTrie<T, PolicyKeyData, PolicyEntry>,
) -> HashMap<(u32, PolicyKeyData), PolicyEntry> {
    m.iter()
        .filter_map(|r| r.ok())
        .map(|(k, v)| ((k.prefix_len(), k.data()), v))
        .collect()
}

fn wanted_endpoints(want: &Desired) -> HashMap<IpKey, EndpointInfo> {
    want.endpoints
        .iter()
        .map(|(ip, v)| (crate::cluster::ip_key(*ip), *v))
        .collect()
}

fn wanted_ipcache(want: &Desired) -> HashMap<(u32, [u32; 5]), IpcacheEntry> {
    want.ipcache
        .iter()
        .map(|(net, v)| {
            let (plen, data) = crate::cluster::ipcache_key(*net);
            ((plen, data.data), *v)
        })
        .collect()
}

/// Differences between the maps pinned under `pin_dir` and `want`, one line each; empty when
/// the kernel holds exactly what the compiler says. Opens the pins read-only: a check, not a
/// writer.
pub fn diff_pinned(pin_dir: &Path, want: &Desired) -> Result<Vec<String>> {
    use aya::maps::Map;
    let open = |name: &str| {
        MapData::from_pin(pin_dir.join(name)).with_context(|| format!("opening pinned {name}"))
    };
    let mut out = Vec::new();
    let eps: BpfHashMap<MapData, IpKey, EndpointInfo> =
        BpfHashMap::try_from(Map::HashMap(open(maps::ENDPOINTS)?))?;
    let have = held_endpoints(&eps);
    let want_eps = wanted_endpoints(want);
    for (ip, v) in &want.endpoints {
        let k = crate::cluster::ip_key(*ip);
        if have.get(&k) != Some(v) {
            out.push(format!(
                "endpoints {ip}: kernel {:?}, want {v:?}",
                have.get(&k)
            ));
        }
    }
    for k in have.keys().filter(|k| !want_eps.contains_key(*k)) {
        out.push(format!("endpoints: stale entry {k:?}"));
    }
    // Wider than the pods is allowed (it narrows at the next full write), narrower is not:
    // XDP would count a pod's packets as the node's.
    let ranges: Array<MapData, LocalRange> = Array::try_from(Map::Array(open(maps::LOCAL_RANGE)?))?;
    let range = ranges.get(&0, 0)?;
    for ip in want.endpoints.keys() {
        if let IpAddr::V4(a) = ip {
            if !range.may_hold(u32::from(*a)) {
                out.push(format!("local range {range:?} does not hold endpoint {ip}"));
            }
        }
    }
    // An exact range's bitmap holds every IPv4 pod and nothing else (a pod outside the range,
    // and so outside its /16, is reported above).
    if range.exact != 0 {
        let bits: Array<MapData, u64> = Array::try_from(Map::Array(open(maps::LOCAL_BITS)?))?;
        let want_bits = local_bits(&range, want_eps.keys().filter_map(v4_addr));
        for (i, w) in want_bits.iter().enumerate() {
            let have = bits.get(&(i as u32), 0)?;
            if have != *w {
                out.push(format!(
                    "local bits word {i}: kernel {have:#018x}, want {w:#018x}"
                ));
            }
        }
    }
    let ipc: LpmTrie<MapData, IpcacheKeyData, IpcacheEntry> =
        LpmTrie::try_from(Map::LpmTrie(open(maps::IPCACHE)?))?;
    let have = held_ipcache(&ipc);
    let want_ipc = wanted_ipcache(want);
    for (net, v) in &want.ipcache {
        let (plen, data) = crate::cluster::ipcache_key(*net);
        if have.get(&(plen, data.data)) != Some(v) {
            out.push(format!(
                "ipcache {net}: kernel {:?}, want {v:?}",
                have.get(&(plen, data.data))
            ));
        }
    }
    for k in have.keys().filter(|k| !want_ipc.contains_key(*k)) {
        out.push(format!("ipcache: stale entry {k:?}"));
    }
    let pol: LpmTrie<MapData, PolicyKeyData, PolicyEntry> =
        LpmTrie::try_from(Map::LpmTrie(open(maps::POLICY)?))?;
    let have = held_policy(&pol);
    for (k, v) in &want.policy {
        if have.get(k) != Some(v) {
            out.push(format!(
                "policy {k:?}: kernel {:?}, want {v:?}",
                have.get(k)
            ));
        }
    }
    for k in have.keys().filter(|k| !want.policy.contains_key(*k)) {
        out.push(format!("policy: stale entry {k:?}"));
    }
    Ok(out)
}

/// `union bpf_attr`'s `batch` member (include/uapi/linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

fn bpf_batch(cmd: libc::c_long, attr: &mut BatchAttr) -> std::io::Result<()> {
    // SAFETY: `attr` points at the kernel's layout of the command's attributes; its buffers
    // are the caller's, sized for `count` keys and values of the map.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Deletes `keys` from a hash map through `BPF_MAP_DELETE_BATCH`. The kernel stops at the
/// first key it cannot delete, saying how many it did: a missing key is stepped over.
fn delete_batch<K: aya::Pod>(data: &MapData, keys: &[K]) -> std::io::Result<usize> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
    let fd = data.fd().as_fd().as_raw_fd() as u32;
    let (mut at, mut removed) = (0, 0);
    while at < keys.len() {
        let rest = &keys[at..];
        let mut attr = BatchAttr {
            keys: rest.as_ptr() as u64,
            count: rest.len().min(u32::MAX as usize) as u32,
            map_fd: fd,
            ..Default::default()
        };
        let r = bpf_batch(BPF_MAP_DELETE_BATCH, &mut attr);
        removed += attr.count as usize;
        at += attr.count as usize;
        match r {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => at += 1,
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}

/// A hash map's entries through `BPF_MAP_LOOKUP_BATCH`, handed to `visit` a batch at a time.
/// Entries added or removed while it runs may or may not be seen, as with the entry-by-entry
/// walk.
fn lookup_batch<K: aya::Pod, V: aya::Pod>(
    data: &MapData,
    mut visit: impl FnMut(&[K], &[V]),
) -> std::io::Result<()> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    const CHUNK: usize = 4096;
    let fd = data.fd().as_fd().as_raw_fd() as u32;
    let mut keys: Vec<K> = Vec::with_capacity(CHUNK);
    let mut values: Vec<V> = Vec::with_capacity(CHUNK);
    // The hash table's batch token is its bucket index; none before the first batch.
    let (mut token_in, mut token_out) = (None::<u32>, 0u32);
    loop {
        let mut attr = BatchAttr {
            in_batch: token_in.as_ref().map_or(0, |t| t as *const u32 as u64),
            out_batch: &mut token_out as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: fd,
            ..Default::default()
        };
        // The buffers hold CHUNK keys and values of the map's sizes (checked when the map
        // was loaded), and the kernel writes at most `count` of each.
        // ENOENT: the end of the table, with the last entries in this batch.
        let last = match bpf_batch(BPF_MAP_LOOKUP_BATCH, &mut attr) {
            Ok(()) => false,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            Err(e) => return Err(e),
        };
        // SAFETY: the kernel wrote `count` keys and values.
        unsafe {
            keys.set_len(attr.count as usize);
            values.set_len(attr.count as usize);
        }
        visit(&keys, &values);
        if last {
            return Ok(());
        }
        token_in = Some(token_out);
    }
}

#[cfg(test)]
mod scratch_tests {
    use super::scratch_owner;

    #[test]
    fn a_scratch_directory_names_its_process_only_under_its_own_tag() {
        assert_eq!(scratch_owner("observer-bench-4242-0", "bench"), Some(4242));
        assert_eq!(
            scratch_owner("observer-bench-policy-4242-3", "bench-policy"),
            Some(4242)
        );
        // Another tag's, the daemon's own and anything else are not this tag's scratch.
        assert_eq!(scratch_owner("observer-bench-policy-4242-3", "bench"), None);
        assert_eq!(scratch_owner("observer-bench-4242-0", "bench-policy"), None);
        assert_eq!(scratch_owner("observer", "bench"), None);
        assert_eq!(scratch_owner("observer-bench", "bench"), None);
        assert_eq!(scratch_owner("observer-bench-4242", "bench"), None);
        assert_eq!(scratch_owner("observer-bench-x-0", "bench"), None);
        assert_eq!(scratch_owner("observer-bench-4242-0-1", "bench"), None);
    }
}
