//! The data plane as the daemon sees it: the only module that talks to aya.
//!
//! It loads the eBPF object embedded at build time, sizes its maps, attaches the XDP program
//! to interfaces, writes map entries for the reconciler (through [`MapWriter`]) and reads the
//! per-CPU counters back, summed over CPUs. It also runs the program on test packets
//! (`BPF_PROG_TEST_RUN`) for the packet tests and benchmarks.
//!
//! # Pinning and restarts
//! The daemon loads with a pin directory on bpffs ([`Dataplane::open`]). Every map the
//! balancer uses is pinned there (`DIR/maps/NAME`), and every attachment is a BPF link pinned
//! as `DIR/links/xdp_IFACE`. Neither depends on the daemon process: when it exits, the
//! program keeps running with its connection table, cursors and counters. The next daemon
//! finds the pins, reuses the maps as they are, and swaps its freshly loaded program into
//! each existing link with `BPF_LINK_UPDATE`: one atomic pointer change per interface, so
//! no packet meets an interface without a program. Map names carry a layout version
//! (`ORCH_CT_V1`); a layout change gets a new name and therefore new pins.

mod access;
pub mod codec;
mod device;
pub mod links;
mod raw;
mod reader;
pub mod routes;
pub mod vips;

pub use reader::{Census, Reader};

use std::{
    os::fd::AsFd,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use aya::{
    maps::{
        xdp::DevMapHash, Array, HashMap, IterableMap, MapData, MapError, MapInfo, PerCpuArray,
        PerCpuValues,
    },
    pin::PinError,
    programs::{
        links::{FdLink, LinkError, PinnedLink},
        tc::{SchedClassifierLink, SchedClassifierLinkId, TcAttachType},
        xdp::{XdpLink, XdpLinkId},
        CgroupAttachMode, CgroupSockAddr, ProgramError, SchedClassifier, TestRun, TestRunOptions,
        Xdp, XdpMode,
    },
    Ebpf, EbpfError, EbpfLoader,
};
use orch_common::maps::{
    v1, v2, Backend, BackendKey, BackendSignals, FlowKey, FlowValue, MaglevReply, MaglevTable,
    PortBitmap, ServiceKey, ServiceValue, Settings, SlotTable, TrafficCounters, BACKENDS_MAP,
    BACKEND_DOWN_MAP, BACKEND_SIGNALS_MAP, BACKEND_SIGNALS_MAP_V1, BACKEND_STATS_MAP,
    CONNTRACK_MAP, CONNTRACK_MAPS_V2, CONNTRACK_MAP_V1, CONNTRACK_NEW_MAP, CT_EVENTS_MAP,
    CT_NEW_ADOPTED, CT_NEW_EXPIRED, CT_NEW_INSERTED, CT_NEW_OPS_MAP, CT_NEW_REMOVED, CURSORS_MAP,
    DIR_FORWARD, MAGLEV_MAP, MAGLEV_REPLY_MAP, PORTS_MAP, ROUTE_GEN_MAP, SERVICES_MAP,
    SERVICE_LIVE_MAP, SERVICE_STATS_MAP, SETTINGS_MAP, SLOTS_MAP, SOCK_PEERS_MAP, SOCK_STATS_MAP,
    SOCK_UDP_MAP, SOCK_UDP_REV_MAP, STATS_MAP, STATS_MAPS_BEFORE, XDP_TX_MAP,
};
use orch_common::{Reason, IPPROTO_UDP};
use tracing::{debug, info, warn};

pub use access::{MapReader, MapWriter};
use raw::{next_key, ElemCount, ELEM_COUNT_KFUNC};

/// The maps that hold the balancer's state, pinned so that it outlives the daemon.
const PINNED_MAPS: [&str; 23] = [
    MAGLEV_MAP,
    MAGLEV_REPLY_MAP,
    SOCK_PEERS_MAP,
    SOCK_UDP_MAP,
    SOCK_UDP_REV_MAP,
    SOCK_STATS_MAP,
    BACKEND_SIGNALS_MAP,
    BACKEND_DOWN_MAP,
    SERVICES_MAP,
    SERVICE_LIVE_MAP,
    SLOTS_MAP,
    BACKENDS_MAP,
    CURSORS_MAP,
    CONNTRACK_MAP,
    CONNTRACK_NEW_MAP,
    CT_EVENTS_MAP,
    CT_NEW_OPS_MAP,
    PORTS_MAP,
    SETTINGS_MAP,
    ROUTE_GEN_MAP,
    STATS_MAP,
    SERVICE_STATS_MAP,
    BACKEND_STATS_MAP,
];

/// Where bpffs is conventionally mounted; the daemon mounts it there when it is missing.
const BPFFS_ROOT: &str = "/sys/fs/bpf";
/// `statfs` magic of bpffs (`BPF_FS_MAGIC` in include/uapi/linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The eBPF object built by `build.rs` from the `orch-ebpf` crate.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/orch"));

/// aya-log's level global in the program (see `orch-ebpf/src/log.rs`).
const KERNEL_LOG_LEVEL_GLOBAL: &str = "AYA_LOG_LEVEL";
/// [`Dataplane::open`]'s `kernel_log` value for no logging at all.
pub const KERNEL_LOG_OFF: u8 = 0;

/// Re-emits the program's log records (which aya-log hands over as `log` records) as
/// tracing events with target `orch::kernel`, so they share the daemon's format (human or
/// JSON) and filter (`RUST_LOG=orch::kernel=debug`).
struct KernelLog;

impl log::Log for KernelLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, r: &log::Record<'_>) {
        let (file, line) = (r.file().unwrap_or("?"), r.line().unwrap_or(0));
        let msg = r.args();
        match r.level() {
            log::Level::Error => tracing::error!(target: "orch::kernel", %file, line, "{msg}"),
            log::Level::Warn => tracing::warn!(target: "orch::kernel", %file, line, "{msg}"),
            log::Level::Info => tracing::info!(target: "orch::kernel", %file, line, "{msg}"),
            log::Level::Debug => tracing::debug!(target: "orch::kernel", %file, line, "{msg}"),
            log::Level::Trace => tracing::trace!(target: "orch::kernel", %file, line, "{msg}"),
        }
    }

    fn flush(&self) {}
}

/// Socket-level balancing's programs (cgroup `sock_addr` hooks).
const SOCK_PROGRAMS: [&str; 8] = [
    "orch_connect4",
    "orch_connect6",
    "orch_getpeername4",
    "orch_getpeername6",
    "orch_sendmsg4",
    "orch_sendmsg6",
    "orch_recvmsg4",
    "orch_recvmsg6",
];
/// `statfs` magic of cgroup v2 (`CGROUP2_SUPER_MAGIC` in include/uapi/linux/magic.h).
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The balancer program's name in the object.
const PROGRAM: &str = "orch_xdp";
/// The benchmark floor program (one counter increment, XDP_PASS).
const FLOOR_PROGRAM: &str = "orch_floor";
/// The balancer at TC ingress.
const TC_PROGRAM: &str = "orch_tc";
/// The TC benchmark floor (one counter increment, TC_ACT_OK).
const TC_FLOOR_PROGRAM: &str = "orch_tc_floor";

/// Errors of the data plane, each naming what it was doing.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("loading the eBPF object failed (is this root, with CAP_BPF and CAP_NET_ADMIN?)")]
    Load(#[source] EbpfError),
    #[error("the eBPF object has no {kind} named {name}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("attaching the balancer to interface {iface} ({hook}) failed")]
    Attach {
        iface: String,
        hook: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("interface {iface}: not found")]
    NoInterface {
        iface: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "interface {iface} is a virtual device (driver {driver}): XDP there sees skbs whose \
         checksums may be partial (TX offload, the kernel's default) and cannot redirect \
         reliably into such devices. Use attach = \"tc\" or \"auto\" for it"
    )]
    XdpOnVirtual { iface: String, driver: String },
    #[error("setting up the kernel program's log")]
    KernelLog(#[source] aya_log::Error),
    #[error("watching the kernel program's log")]
    KernelLogReader(#[source] std::io::Error),
    #[error("reading the number of possible CPUs")]
    Cpus(#[source] std::io::Error),
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error(
        "{dir} is not on a bpffs mount, and orch only mounts bpffs at {BPFFS_ROOT} itself; \
         mount one with `mount -t bpf bpf DIR` or choose a pin_dir under {BPFFS_ROOT}"
    )]
    NotBpffs { dir: PathBuf },
    #[error("preparing the pin directory {path}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the pinned map {name} in {dir} has {pinned} entries, the config asks for {wanted}: \
         pinned maps cannot be resized in place. Restore the old capacity, or stop orch, \
         remove {dir} (this drops every established connection) and start again"
    )]
    PinnedCapacity {
        name: &'static str,
        dir: PathBuf,
        pinned: u32,
        wanted: u32,
    },
    #[error("reading the pinned map {path}")]
    PinnedMap {
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error("socket-level balancing: {path}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("replacing the program in the pinned socket link of {name}")]
    SockLink {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("removing the link pin {path}")]
    Unpin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pinning the XDP link of {iface} at {path}")]
    PinLink {
        iface: String,
        path: PathBuf,
        #[source]
        source: PinError,
    },
    #[error(
        "the attachment to {iface} is not a BPF link (XDP links need Linux 5.9, TCX links \
         6.6), so it cannot outlive the daemon"
    )]
    NotALink {
        iface: String,
        #[source]
        source: LinkError,
    },
}

/// What [`Dataplane::migrate`] carried over from an earlier layout.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Migration {
    /// Connection-table entries copied into the new table.
    pub connections: u64,
    /// Entries the new table refused (it is smaller, or full).
    pub refused: u64,
    /// Whether the old verdict counters were added to the new ones.
    pub counters: bool,
    /// Old pins removed.
    pub retired: u32,
}

/// Connection-table events counted by the program.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEvents {
    /// Connections moved to the confirmed table.
    pub confirmed: u64,
    /// Connections left unconfirmed because the confirmed table was full.
    pub confirm_failed: u64,
    /// New connections whose reply 4-tuple another service's connection held.
    pub reply_collisions: u64,
    /// Entries the kernel evicted from the full unconfirmed table to make room; `None`
    /// where the kernel cannot count the table's elements (see
    /// [`Dataplane::unconfirmed_len`]).
    ///
    /// The kernel tells no one what an LRU evicts, so this is derived: every entry that
    /// entered the table and is neither in it nor removed by the program or the expiry was
    /// evicted. The counts are read so that an operation in flight can only hide an
    /// eviction for a moment, never invent one: the figure never exceeds the evictions
    /// made, equals them whenever the table is still for an instant, and never goes down.
    pub evicted: Option<u64>,
}

/// When [`Dataplane::expire`] removes a connection, in nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp_idle_ns: u64,
    pub tcp_close_ns: u64,
    pub unconfirmed_ns: u64,
    pub udp_idle_ns: u64,
}

/// Why a connection was removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// Closed (both FINs or a RST) and quiet for the close timeout.
    Closed,
    /// Idle past its timeout (TCP established, or UDP).
    Idle,
    /// A TCP handshake that was never completed.
    Unconfirmed,
    /// A reply entry without its forward entry.
    Orphan,
}

impl Expiry {
    /// Every reason, for metric labels.
    pub const ALL: [Expiry; 4] = [
        Expiry::Closed,
        Expiry::Idle,
        Expiry::Unconfirmed,
        Expiry::Orphan,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Expiry::Closed => "closed",
            Expiry::Idle => "idle",
            Expiry::Unconfirmed => "unconfirmed",
            Expiry::Orphan => "orphan",
        }
    }
}

/// What one [`Dataplane::expire`] step did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Expired {
    /// Entries looked at.
    pub walked: u64,
    /// Connections (or orphan entries) removed, by [`Expiry`] in its order.
    pub removed: [u64; 4],
}

impl Expired {
    fn count(&mut self, why: Expiry) -> &mut u64 {
        &mut self.removed[why as usize]
    }
}

/// Whether a map error says the key is not there (lookups say it one way, deletions another).
fn absent(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(e) => e.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// `bpf_map_update_elem` flag: insert only if the key is absent.
const BPF_NOEXIST: u64 = 1;

/// Opens a map pinned at `path`.
fn open_pinned(path: &Path) -> Result<aya::maps::Map, DataplaneError> {
    let pinned_err = |source| DataplaneError::PinnedMap {
        path: path.to_owned(),
        source,
    };
    let data = MapData::from_pin(path).map_err(pinned_err)?;
    aya::maps::Map::from_map_data(data).map_err(pinned_err)
}

/// Copies the entries of the connection table pinned at `path` (an earlier layout, values
/// `V`) that `into` lacks, converted; nothing when there is no such pin.
fn carry_flows<V: aya::Pod>(
    path: &Path,
    name: &'static str,
    into: &mut HashMap<MapData, FlowKey, FlowValue>,
    convert: impl Fn(&V) -> FlowValue,
    done: &mut Migration,
) -> Result<(), DataplaneError> {
    if !path.exists() {
        return Ok(());
    }
    let old: HashMap<MapData, FlowKey, V> =
        HashMap::try_from(open_pinned(path)?).map_err(map_err(name))?;
    for entry in old.iter() {
        // An entry deleted while we walk is simply skipped.
        let Ok((key, value)) = entry else { continue };
        match into.insert(key, convert(&value), BPF_NOEXIST) {
            Ok(()) => done.connections += 1,
            // Already there: copied by the first pass, or opened by the new program.
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => {
                warn!(error = %e, table = name, "the new connection table refused a migrated entry");
                done.refused += 1;
            }
        }
    }
    Ok(())
}

/// Map capacities, fixed when the object is loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub max_services: u32,
    pub max_backends: u32,
    /// Confirmed-connection table entries.
    pub conntrack: u32,
    /// Unconfirmed-connection table entries.
    pub conntrack_new: u32,
}

impl Default for Capacity {
    fn default() -> Self {
        Capacity {
            max_services: orch_common::MAX_SERVICES,
            max_backends: orch_common::MAX_BACKENDS,
            conntrack: orch_common::CONNTRACK_CAPACITY,
            conntrack_new: orch_common::CONNTRACK_NEW_CAPACITY,
        }
    }
}

/// Where the balancer runs on an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Hook {
    /// XDP in the driver: before the kernel builds an skb. For hardware NICs.
    Xdp,
    /// TC ingress (a TCX link): on skbs, with checksum helpers that know partial
    /// checksums. For veths, bridges, VLANs and tunnels.
    Tc,
}

impl Hook {
    pub const fn name(self) -> &'static str {
        match self {
            Hook::Xdp => "xdp",
            Hook::Tc => "tc",
        }
    }
}

/// What the configuration asks for on an interface (`dataplane.attach`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachKind {
    /// Native XDP on hardware NICs whose driver runs it, TC everywhere else.
    #[default]
    Auto,
    /// Native XDP; refused on virtual devices.
    Xdp,
    /// TC ingress.
    Tc,
}

/// XDP verdicts as the kernel numbers them (`enum xdp_action`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Aborted,
    Drop,
    Pass,
    Tx,
    Redirect,
    Unknown(u32),
}

impl From<u32> for Verdict {
    fn from(v: u32) -> Self {
        match v {
            0 => Verdict::Aborted,
            1 => Verdict::Drop,
            2 => Verdict::Pass,
            3 => Verdict::Tx,
            4 => Verdict::Redirect,
            other => Verdict::Unknown(other),
        }
    }
}

/// The result of running the program once on a test packet.
#[derive(Debug)]
pub struct TestRunOutput {
    pub verdict: Verdict,
    /// The packet as the program left it.
    pub packet: Vec<u8>,
    /// The kernel's average run time per repetition.
    pub duration: Duration,
}

/// The balancer on one interface.
#[derive(Debug)]
struct Attached {
    iface: String,
    /// The interface's index when it was attached: a device deleted and created again under
    /// the same name has a new one, and needs attaching again.
    ifindex: u32,
    hook: Hook,
    attachment: Attachment,
}

/// One attachment of the balancer to an interface.
#[derive(Debug)]
enum Attachment {
    /// XDP, owned by this process: detached when the data plane is dropped.
    OwnedXdp(XdpLinkId),
    /// TC, owned by this process.
    OwnedTc(SchedClassifierLinkId),
    /// A BPF link pinned on bpffs: it stays when the process exits, until unpinned.
    Pinned(PinnedLink),
}

/// The loaded data plane. Dropping it detaches what this process owns; pinned links and
/// maps stay (see the module docs) until [`Dataplane::detach_all`] or
/// [`Dataplane::remove_pins`].
pub struct Dataplane {
    ebpf: Ebpf,
    capacity: Capacity,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    /// Each service id's incarnation (see `orch_common::maps::SERVICE_LIVE_MAP`).
    service_live: Array<MapData, u32>,
    /// The incarnation the next installed service gets.
    next_incarnation: u32,
    slots: Array<MapData, SlotTable>,
    /// Maglev tables, by the same index as `slots`.
    maglev: HashMap<MapData, u32, MaglevTable>,
    maglev_reply: HashMap<MapData, BackendKey, MaglevReply>,
    backends: Array<MapData, Backend>,
    ports: Array<MapData, PortBitmap>,
    settings: Array<MapData, Settings>,
    stats: PerCpuArray<MapData, u64>,
    service_stats: PerCpuArray<MapData, TrafficCounters>,
    backend_stats: PerCpuArray<MapData, TrafficCounters>,
    backend_signals: PerCpuArray<MapData, BackendSignals>,
    backend_down: Array<MapData, u32>,
    conntrack: HashMap<MapData, FlowKey, FlowValue>,
    conntrack_new: HashMap<MapData, FlowKey, FlowValue>,
    ct_new_ops: PerCpuArray<MapData, u64>,
    /// The same maps, read-only, for the loop and for readers on other threads.
    reader: Arc<Reader>,
    /// Whether the unconfirmed-table counters began with this process while the table was
    /// adopted with entries: [`Dataplane::migrate`] then records what it held.
    ops_began: bool,
    /// Where the expiry sweep of each table ([`Dataplane::expire`]) goes on.
    sweep: [Option<FlowKey>; 2],
    /// The reader of the program's log ring buffer, when kernel logging is on.
    kernel_log: Option<aya_log::EbpfLogger<KernelLog>>,
    attached: Vec<Attached>,
    /// Socket-level balancing's links, while they are not pinned (no pin directory: tests).
    sock_links: Vec<FdLink>,
    /// The cgroup socket-level balancing is attached to.
    sock_cgroup: Option<PathBuf>,
    /// Where the XDP program may redirect (see `orch_common::maps::XDP_TX_MAP`).
    xdp_tx: DevMapHash<MapData>,
    /// What cached next hops are valid under (see [`routes`]).
    route_gen: routes::RouteGen,
    pin_dir: Option<PathBuf>,
    adopted: bool,
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

/// Program `name` of the object, as its kind `P` (`Xdp`, `SchedClassifier`,
/// `CgroupSockAddr`).
fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, DataplaneError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(DataplaneError::Missing {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(|source| DataplaneError::Program { name, source })
}

/// Loads program `name` of kind `P` into the kernel (the verifier runs here).
fn load<P>(
    ebpf: &mut Ebpf,
    name: &'static str,
    load: fn(&mut P) -> Result<(), ProgramError>,
) -> Result<(), DataplaneError>
where
    for<'a> &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    load(program::<P>(ebpf, name)?).map_err(|source| DataplaneError::Program { name, source })
}

fn take<T: TryFrom<aya::maps::Map, Error = MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, DataplaneError> {
    let map = ebpf
        .take_map(name)
        .ok_or(DataplaneError::Missing { kind: "map", name })?;
    T::try_from(map).map_err(map_err(name))
}

impl Dataplane {
    /// Loads the object into the kernel (maps sized by `capacity`, programs verified) and
    /// writes the default settings. Nothing is pinned and nothing is attached: this is the
    /// data plane of packet tests and benchmarks.
    pub fn load(capacity: Capacity) -> Result<Self, DataplaneError> {
        Self::load_logging(capacity, KERNEL_LOG_OFF)
    }

    /// [`Dataplane::load`] with the program logging up to `kernel_log` (see
    /// [`Dataplane::open`]): each level is a different program for the verifier.
    pub fn load_logging(capacity: Capacity, kernel_log: u8) -> Result<Self, DataplaneError> {
        let mut dp = Self::load_with(capacity, None, kernel_log)?;
        dp.set_settings(&default_settings())?;
        Ok(dp)
    }

    /// Loads the object with its state maps pinned under `pin_dir` (mounting bpffs at
    /// /sys/fs/bpf when that is where `pin_dir` lives and nothing is mounted). Maps already
    /// pinned there are reused as they are, connection table included: see
    /// [`Dataplane::adopted`]. Settings are left for the caller to write.
    ///
    /// `kernel_log` is the most verbose level the program logs at (aya-log's numbering:
    /// 0 off, 1 error, 2 warn, 3 info, 4 debug, 5 trace); its lines are forwarded into the
    /// daemon's log once [`Dataplane::forward_kernel_log`] runs.
    pub fn open(
        capacity: Capacity,
        pin_dir: &Path,
        kernel_log: u8,
    ) -> Result<Self, DataplaneError> {
        prepare_pin_dir(pin_dir)?;
        let maps_dir = pin_dir.join("maps");
        for (name, wanted) in sized_maps(capacity) {
            let path = maps_dir.join(name);
            if !path.exists() {
                continue;
            }
            let info = MapInfo::from_pin(&path)
                .map_err(|source| DataplaneError::PinnedMap { path, source })?;
            if info.max_entries() != wanted {
                return Err(DataplaneError::PinnedCapacity {
                    name,
                    dir: pin_dir.to_owned(),
                    pinned: info.max_entries(),
                    wanted,
                });
            }
        }
        let adopted = maps_dir.join(SERVICES_MAP).exists();
        // An unconfirmed table of this layout or of layout 2 (whose entries are carried
        // into this one), adopted from a release that did not count its operations.
        let ops_began = (maps_dir.join(CONNTRACK_NEW_MAP).exists()
            || maps_dir.join(CONNTRACK_MAPS_V2[1]).exists())
            && !maps_dir.join(CT_NEW_OPS_MAP).exists();
        let mut dp = Self::load_with(capacity, Some(&maps_dir), kernel_log)?;
        dp.pin_dir = Some(pin_dir.to_owned());
        dp.adopted = adopted;
        dp.ops_began = ops_began;
        dp.adopt_incarnations()?;
        info!(pin_dir = %pin_dir.display(), adopted, "data plane loaded");
        dp.migrate(false)?;
        Ok(dp)
    }

    /// Carries the state of an earlier layout's pinned maps into this layout's, so that an
    /// upgrade that changes a layout drops no connection and no counter:
    /// - the connection tables (`ORCH_CT_V1`, `ORCH_CT_V2`, `ORCH_CT_NEW_V2`): every entry
    ///   the new tables lack, converted (layout 1's all into the confirmed table);
    /// - with `finish`, the verdict counters (`ORCH_STATS_V2`, `ORCH_STATS_V3`), added to the new ones, and
    ///   then the old pins are removed.
    ///
    /// [`Dataplane::open`] runs it before the program swap, so the new program finds the
    /// established connections in its table from its first packet on; the daemon runs it
    /// again with `finish` once its program is in every link, for the connections the old
    /// program opened in between, and to retire the old maps. Maps the old layout shares
    /// with this one (services, backends, cursors...) were adopted as they are.
    pub fn migrate(&mut self, finish: bool) -> Result<Migration, DataplaneError> {
        let mut done = Migration::default();
        let Some(maps_dir) = self.pin_dir.as_ref().map(|d| d.join("maps")) else {
            return Ok(done);
        };
        let old_ct = maps_dir.join(CONNTRACK_MAP_V1);
        carry_flows(
            &old_ct,
            CONNTRACK_MAP_V1,
            &mut self.conntrack,
            |v: &v1::FlowValue| v.upgrade().upgrade(),
            &mut done,
        )?;
        // Layout 2's tables, each into its counterpart. The unconfirmed table's operation
        // counters are shared across layouts and counted these entries in already.
        let [v2_confirmed, v2_unconfirmed] = CONNTRACK_MAPS_V2;
        let from_v2 = maps_dir.join(v2_unconfirmed).exists();
        let upgrade = |v: &v2::FlowValue| v.upgrade();
        carry_flows(
            &maps_dir.join(v2_confirmed),
            v2_confirmed,
            &mut self.conntrack,
            upgrade,
            &mut done,
        )?;
        carry_flows(
            &maps_dir.join(v2_unconfirmed),
            v2_unconfirmed,
            &mut self.conntrack_new,
            upgrade,
            &mut done,
        )?;
        if finish && from_v2 {
            // A connection the old program confirmed between the two passes was copied by
            // the first into the unconfirmed table and by this one into the confirmed one.
            // The unconfirmed copy goes: the expiry would take it for a handshake that never
            // completed and remove the connection with it. (Not counted: the old program
            // counted the entry out when it confirmed it.)
            let confirmed: Vec<FlowKey> = self
                .conntrack_new
                .keys()
                .filter_map(Result::ok)
                .filter(|k| self.conntrack.get(k, 0).is_ok())
                .collect();
            for key in confirmed {
                let _ = self.conntrack_new.remove(&key);
            }
        }
        if finish && self.ops_began {
            // The table was counted from the middle of its life: what it held then (less
            // what left it uncounted since) becomes the starting point, so that its first
            // eviction figure is zero rather than minus the entries nobody counted in.
            if let Some(present) = self.reader.unconfirmed_len()? {
                let counted = self
                    .reader
                    .ct_new_op(CT_NEW_INSERTED)?
                    .wrapping_sub(self.reader.ct_new_op(CT_NEW_REMOVED)?)
                    .wrapping_sub(self.reader.ct_new_op(CT_NEW_EXPIRED)?);
                self.add_ct_new_op(CT_NEW_ADOPTED, present.wrapping_sub(counted))?;
            }
            self.ops_began = false;
        }
        let mut old_pins = vec![old_ct];
        old_pins.extend(CONNTRACK_MAPS_V2.map(|name| maps_dir.join(name)));
        let old_signals = maps_dir.join(BACKEND_SIGNALS_MAP_V1);
        if finish && old_signals.exists() {
            let n = self.capacity.max_backends;
            carry_per_cpu::<v1::BackendSignals, _>(
                &old_signals,
                (
                    BACKEND_SIGNALS_MAP_V1,
                    &mut self.backend_signals,
                    BACKEND_SIGNALS_MAP,
                ),
                n,
                |old, new| old.add_to(new),
            )?;
            done.counters = true;
        }
        old_pins.push(old_signals);
        for name in STATS_MAPS_BEFORE {
            let old_stats = maps_dir.join(name);
            if finish && old_stats.exists() {
                carry_per_cpu::<u64, _>(
                    &old_stats,
                    (name, &mut self.stats, STATS_MAP),
                    Reason::COUNT,
                    |old, new| *new += old,
                )?;
                done.counters = true;
            }
            old_pins.push(old_stats);
        }
        if finish {
            for path in old_pins {
                match std::fs::remove_file(&path) {
                    Ok(()) => done.retired += 1,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        warn!(path = %path.display(), error = %e, "removing an old pin failed")
                    }
                }
            }
        }
        if done != Migration::default() {
            info!(
                connections = done.connections,
                refused = done.refused,
                counters = done.counters,
                retired_pins = done.retired,
                "state migrated from the previous map layout"
            );
        }
        Ok(done)
    }

    fn load_with(
        capacity: Capacity,
        maps_dir: Option<&Path>,
        kernel_log: u8,
    ) -> Result<Self, DataplaneError> {
        let mut loader = EbpfLoader::new();
        // Patched into read-only data before verification: the verifier then removes every
        // log call above this level from the program.
        loader.override_global(KERNEL_LOG_LEVEL_GLOBAL, &kernel_log, true);
        for (name, max) in sized_maps(capacity) {
            loader.map_max_entries(name, max);
        }
        if let Some(dir) = maps_dir {
            for name in PINNED_MAPS {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        let mut ebpf = loader.load(OBJECT).map_err(DataplaneError::Load)?;
        // Taken before the programs load, and kept as long as they live: the log map's fd
        // is in their instructions.
        let kernel_log = if kernel_log > KERNEL_LOG_OFF {
            Some(
                aya_log::EbpfLogger::init_with_logger(&mut ebpf, KernelLog)
                    .map_err(DataplaneError::KernelLog)?,
            )
        } else {
            None
        };
        for name in [PROGRAM, FLOOR_PROGRAM] {
            load::<Xdp>(&mut ebpf, name, Xdp::load)?;
        }
        for name in [TC_PROGRAM, TC_FLOOR_PROGRAM] {
            load::<SchedClassifier>(&mut ebpf, name, SchedClassifier::load)?;
        }
        for name in SOCK_PROGRAMS {
            load::<CgroupSockAddr>(&mut ebpf, name, CgroupSockAddr::load)?;
        }
        let conntrack_new: HashMap<MapData, FlowKey, FlowValue> =
            take(&mut ebpf, CONNTRACK_NEW_MAP)?;
        let ct_new_count = match Self::elem_counter(&conntrack_new) {
            Ok(c) => Some(c),
            Err(e) => {
                warn!(
                    error = %e,
                    "the kernel cannot count the unconfirmed table's elements (Linux 6.6 or \
                     later has the kfunc {ELEM_COUNT_KFUNC}): its evictions go uncounted and \
                     its size is counted key by key"
                );
                None
            }
        };
        let services = take(&mut ebpf, SERVICES_MAP)?;
        let slots = take(&mut ebpf, SLOTS_MAP)?;
        let maglev = take(&mut ebpf, MAGLEV_MAP)?;
        let backends = take(&mut ebpf, BACKENDS_MAP)?;
        let cursors = take(&mut ebpf, CURSORS_MAP)?;
        let stats = take(&mut ebpf, STATS_MAP)?;
        let service_stats = take(&mut ebpf, SERVICE_STATS_MAP)?;
        let backend_stats = take(&mut ebpf, BACKEND_STATS_MAP)?;
        let backend_signals = take(&mut ebpf, BACKEND_SIGNALS_MAP)?;
        let backend_down = take(&mut ebpf, BACKEND_DOWN_MAP)?;
        let conntrack = take(&mut ebpf, CONNTRACK_MAP)?;
        let ct_events = take(&mut ebpf, CT_EVENTS_MAP)?;
        let ct_new_ops = take(&mut ebpf, CT_NEW_OPS_MAP)?;
        let sock_stats: PerCpuArray<MapData, u64> = take(&mut ebpf, SOCK_STATS_MAP)?;
        let reader = Arc::new(Reader::open(
            reader::Sources {
                services: &services,
                slots: &slots,
                maglev: &maglev,
                backends: &backends,
                cursors: &cursors,
                stats: &stats,
                service_stats: &service_stats,
                backend_stats: &backend_stats,
                backend_signals: &backend_signals,
                backend_down: &backend_down,
                conntrack: &conntrack,
                conntrack_new: &conntrack_new,
                ct_events: &ct_events,
                ct_new_ops: &ct_new_ops,
                sock_stats: &sock_stats,
            },
            capacity,
            ct_new_count,
        )?);
        let service_live: Array<MapData, u32> = take(&mut ebpf, SERVICE_LIVE_MAP)?;
        // Past every incarnation an adopted map holds or ever gave (its last slot), so that
        // none is given twice.
        let next_incarnation = service_live
            .iter()
            .filter_map(Result::ok)
            .max()
            .unwrap_or(0)
            .wrapping_add(1)
            .max(1);
        let dp = Dataplane {
            services,
            service_live,
            next_incarnation,
            slots,
            maglev,
            maglev_reply: take(&mut ebpf, MAGLEV_REPLY_MAP)?,
            backends,
            ports: take(&mut ebpf, PORTS_MAP)?,
            settings: take(&mut ebpf, SETTINGS_MAP)?,
            stats,
            service_stats,
            backend_stats,
            backend_signals,
            backend_down,
            conntrack,
            conntrack_new,
            ct_new_ops,
            xdp_tx: take(&mut ebpf, XDP_TX_MAP)?,
            route_gen: routes::RouteGen::new(take(&mut ebpf, ROUTE_GEN_MAP)?),
            reader,
            ops_began: false,
            sweep: [None, None],
            kernel_log,
            ebpf,
            capacity,
            attached: Vec::new(),
            sock_links: Vec::new(),
            sock_cgroup: None,
            pin_dir: None,
            adopted: false,
        };
        // Whatever an adopted table cached was filled before this process could watch the
        // routes: it is looked up again.
        dp.route_gen.bump()?;
        debug!(?capacity, "data plane loaded");
        Ok(dp)
    }

    fn elem_counter(
        map: &HashMap<MapData, FlowKey, FlowValue>,
    ) -> Result<ElemCount, Box<dyn std::error::Error>> {
        let btf = aya::Btf::from_sys_fs()?;
        let id = btf.id_by_type_name_kind(ELEM_COUNT_KFUNC, aya_obj::btf::BtfKind::Func)?;
        Ok(ElemCount::new(map.map().fd().as_fd(), id)?)
    }

    /// Adds `n` (wrapping) to one of the daemon's own unconfirmed-table counters. The
    /// program never writes these slots, so the read-modify-write races with nothing.
    fn add_ct_new_op(&mut self, slot: u32, n: u64) -> Result<(), DataplaneError> {
        let mut v: Vec<u64> = self
            .ct_new_ops
            .get(&slot, 0)
            .map_err(map_err(CT_NEW_OPS_MAP))?
            .iter()
            .copied()
            .collect();
        v[0] = v[0].wrapping_add(n);
        let values = PerCpuValues::try_from(v).map_err(|source| DataplaneError::Map {
            name: CT_NEW_OPS_MAP,
            source: MapError::IoError(source),
        })?;
        self.ct_new_ops
            .set(slot, values, 0)
            .map_err(map_err(CT_NEW_OPS_MAP))
    }

    /// Service `id`'s incarnation (see `orch_common::maps::SERVICE_LIVE_MAP`), 0 for none.
    fn incarnation(&self, id: u32) -> Result<u32, DataplaneError> {
        self.service_live
            .get(&id, 0)
            .map_err(map_err(SERVICE_LIVE_MAP))
    }

    /// Gives service `id` an incarnation no service had before, and records it as the
    /// highest given (the map's last slot) first.
    fn new_incarnation(&mut self, id: u32) -> Result<(), DataplaneError> {
        let incarnation = self.next_incarnation;
        self.next_incarnation = incarnation.checked_add(1).unwrap_or(1);
        for slot in [self.capacity.max_services, id] {
            self.service_live
                .set(slot, incarnation, 0)
                .map_err(map_err(SERVICE_LIVE_MAP))?;
        }
        Ok(())
    }

    /// Gives an incarnation to each service in the table that has none: services adopted
    /// from a release that did not keep them. Their connections then get the fast path as
    /// soon as they open (those opened before are still checked against the service table).
    fn adopt_incarnations(&mut self) -> Result<(), DataplaneError> {
        let ids: Vec<u32> = self
            .services
            .iter()
            .filter_map(Result::ok)
            .map(|(_, v)| v.id)
            .collect();
        for id in ids {
            if self.incarnation(id)? == 0 {
                self.new_incarnation(id)?;
            }
        }
        Ok(())
    }

    /// Forwards the program's log lines into the daemon's log (target `orch::kernel`) from a
    /// task on the current tokio runtime. Does nothing when kernel logging is off. The
    /// program keeps its own reference to the ring buffer, so the task may outlive nothing
    /// of importance: it ends with the runtime.
    pub fn forward_kernel_log(&mut self) -> Result<(), DataplaneError> {
        let Some(logger) = self.kernel_log.take() else {
            return Ok(());
        };
        // SAFETY: the fd is the logger's ring buffer map, which the logger owns and keeps
        // open, unchanged, until it is dropped, and the AsyncFd owns the logger.
        let mut fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
        }
        .map_err(|e| DataplaneError::KernelLogReader(e.into_parts().1))?;
        tokio::spawn(async move {
            loop {
                match fd.readable_mut().await {
                    Ok(mut guard) => {
                        guard.get_inner_mut().flush();
                        guard.clear_ready();
                    }
                    Err(e) => {
                        warn!(error = %e, "reading the kernel program's log failed; it is no longer forwarded");
                        return;
                    }
                }
            }
        });
        Ok(())
    }

    /// Whether [`Dataplane::open`] found the maps already pinned: a previous daemon left the
    /// data plane running, and its state should be adopted rather than rewritten.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// The capacities the maps were created with.
    pub fn capacity(&self) -> Capacity {
        self.capacity
    }

    fn program(&mut self, name: &'static str) -> Result<&mut Xdp, DataplaneError> {
        program::<Xdp>(&mut self.ebpf, name)
    }

    fn tc_program(&mut self) -> Result<&mut SchedClassifier, DataplaneError> {
        program(&mut self.ebpf, TC_PROGRAM)
    }

    /// Decides where the balancer runs on `iface`: see [`AttachKind`] and the `device`
    /// module. `auto` takes XDP on hardware and TC elsewhere; `xdp` on a virtual device is
    /// refused, because XDP there would corrupt partial checksums or redirect into a device
    /// that drops the frame.
    pub fn choose_hook(iface: &str, kind: AttachKind) -> Result<Hook, DataplaneError> {
        let dev = device::probe(iface).map_err(|source| DataplaneError::NoInterface {
            iface: iface.to_owned(),
            source,
        })?;
        match (kind, dev.hardware) {
            (AttachKind::Tc, _) | (AttachKind::Auto, false) => Ok(Hook::Tc),
            (AttachKind::Xdp, true) | (AttachKind::Auto, true) => Ok(Hook::Xdp),
            (AttachKind::Xdp, false) => Err(DataplaneError::XdpOnVirtual {
                iface: iface.to_owned(),
                driver: dev.driver,
            }),
        }
    }

    /// Attaches the balancer to `iface` at `hook`. With a pin directory, an existing pinned
    /// link of that interface and hook gets this process's program swapped in atomically
    /// (`BPF_LINK_UPDATE`); a pinned link of the other hook is removed; otherwise a new link
    /// is created and pinned. XDP is attached in driver mode only, and the interface becomes
    /// a redirect target of the XDP program.
    pub fn attach(&mut self, iface: &str, hook: Hook) -> Result<(), DataplaneError> {
        let attach_err = |source| DataplaneError::Attach {
            iface: iface.to_owned(),
            hook: hook.name(),
            source,
        };
        let ifindex =
            nix::net::if_::if_nametoindex(iface).map_err(|e| DataplaneError::NoInterface {
                iface: iface.to_owned(),
                source: e.into(),
            })?;
        let record = |attachment| Attached {
            iface: iface.to_owned(),
            ifindex,
            hook,
            attachment,
        };
        if hook == Hook::Xdp {
            self.allow_xdp_redirect(iface)?;
        }
        let Some(links_dir) = self.links_dir() else {
            let attachment = match hook {
                Hook::Xdp => Attachment::OwnedXdp(
                    self.program(PROGRAM)?
                        .attach(iface, XdpMode::Driver)
                        .map_err(attach_err)?,
                ),
                Hook::Tc => Attachment::OwnedTc(
                    self.tc_program()?
                        .attach(iface, TcAttachType::Ingress)
                        .map_err(attach_err)?,
                ),
            };
            info!(iface, hook = hook.name(), "balancer attached");
            self.attached.push(record(attachment));
            return Ok(());
        };
        let path = links_dir.join(format!("{}_{iface}", hook.name()));
        let other = match hook {
            Hook::Xdp => Hook::Tc,
            Hook::Tc => Hook::Xdp,
        };
        let other_path = links_dir.join(format!("{}_{iface}", other.name()));
        if path.exists() {
            match self.replace_in_link(&path, hook) {
                Ok(pinned) => {
                    info!(
                        iface,
                        hook = hook.name(),
                        "balancer replaced in the pinned link"
                    );
                    self.attached.push(record(Attachment::Pinned(pinned)));
                    return Ok(());
                }
                Err(e) => {
                    // Typically ENOLINK: the interface went away (or was recreated) since
                    // the link was made. Forget it and attach afresh.
                    warn!(iface, error = %e, "the pinned link cannot be reused; attaching anew");
                    if let Err(e) = std::fs::remove_file(&path) {
                        warn!(iface, error = %e, "removing the stale link pin failed");
                    }
                }
            }
        }
        let fd_link = match hook {
            Hook::Xdp => {
                let prog = self.program(PROGRAM)?;
                let id = prog.attach(iface, XdpMode::Driver).map_err(attach_err)?;
                FdLink::try_from(prog.take_link(id).map_err(attach_err)?)
            }
            Hook::Tc => {
                let prog = self.tc_program()?;
                let id = prog
                    .attach(iface, TcAttachType::Ingress)
                    .map_err(attach_err)?;
                FdLink::try_from(prog.take_link(id).map_err(attach_err)?)
            }
        }
        .map_err(|source| DataplaneError::NotALink {
            iface: iface.to_owned(),
            source,
        })?;
        let pinned = fd_link
            .pin(&path)
            .map_err(|source| DataplaneError::PinLink {
                iface: iface.to_owned(),
                path: path.clone(),
                source,
            })?;
        // Only now that the new hook runs: the other one, from an earlier configuration.
        if other_path.exists() {
            match std::fs::remove_file(&other_path) {
                Ok(()) => info!(
                    iface,
                    hook = other.name(),
                    "balancer detached from the other hook"
                ),
                Err(e) => warn!(iface, error = %e, "removing a link pin failed"),
            }
        }
        info!(
            iface,
            hook = hook.name(),
            "balancer attached through a pinned link"
        );
        self.attached.push(record(Attachment::Pinned(pinned)));
        Ok(())
    }

    /// Lets the XDP program redirect to `iface` (see `orch_common::maps::XDP_TX_MAP`): done
    /// for each interface the balancer runs on natively, and by tests that stand in for one.
    pub fn allow_xdp_redirect(&mut self, iface: &str) -> Result<(), DataplaneError> {
        let index =
            nix::net::if_::if_nametoindex(iface).map_err(|e| DataplaneError::NoInterface {
                iface: iface.to_owned(),
                source: e.into(),
            })?;
        self.xdp_tx
            .insert(index, index, None, 0)
            .map_err(|e| DataplaneError::Map {
                name: XDP_TX_MAP,
                source: match e {
                    aya::maps::xdp::XdpMapError::MapError(m) => m,
                    other => MapError::IoError(std::io::Error::other(other.to_string())),
                },
            })?;
        // Connections that went to the stack for want of this target are looked up again.
        self.route_gen.bump().map(drop)
    }

    /// The route generation, for the task that moves it when routing changes
    /// ([`routes::watch`]).
    pub fn route_generation(&self) -> routes::RouteGen {
        self.route_gen.clone()
    }

    /// Swaps this process's program into the link pinned at `path` (`BPF_LINK_UPDATE`).
    fn replace_in_link(
        &mut self,
        path: &Path,
        hook: Hook,
    ) -> Result<PinnedLink, Box<dyn std::error::Error>> {
        let fd_link = FdLink::from(PinnedLink::from_pin(path)?);
        match hook {
            Hook::Xdp => {
                let prog = self.program(PROGRAM)?;
                let id = prog.attach_to_link(XdpLink::try_from(fd_link)?)?;
                // The program now owns an fd of the link; closing it leaves the pin, and
                // with it the attachment, in place.
                drop(prog.take_link(id)?);
            }
            Hook::Tc => {
                let prog = self.tc_program()?;
                let id = prog.attach_to_link(SchedClassifierLink::try_from(fd_link)?)?;
                drop(prog.take_link(id)?);
            }
        }
        Ok(PinnedLink::from_pin(path)?)
    }

    /// Detaches pinned links of interfaces not in `keep` (left by an earlier configuration).
    pub fn detach_others(&mut self, keep: &[String]) {
        let others: Vec<String> = self
            .pinned_links()
            .into_iter()
            .filter(|i| !keep.contains(i))
            .collect();
        for iface in others {
            if let Err(e) = self.detach(&iface) {
                warn!(iface, error = %crate::chain(&e), "detaching failed");
            }
        }
        self.attached.retain(|a| keep.contains(&a.iface));
    }

    /// Detaches the balancer from `iface`: its link pin removed and its link dropped.
    pub fn detach(&mut self, iface: &str) -> Result<(), DataplaneError> {
        if let Some(dir) = self.links_dir() {
            for prefix in ["xdp_", "tc_"] {
                let path = dir.join(format!("{prefix}{iface}"));
                match std::fs::remove_file(&path) {
                    Ok(()) => info!(iface, "balancer detached (interface no longer configured)"),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(source) => return Err(DataplaneError::Unpin { path, source }),
                }
            }
        }
        let native: Vec<u32> = self
            .attached
            .iter()
            .filter(|a| a.iface == iface && a.hook == Hook::Xdp)
            .map(|a| a.ifindex)
            .collect();
        self.attached.retain(|a| a.iface != iface);
        for ifindex in native {
            self.forbid_xdp_redirect(ifindex);
        }
        Ok(())
    }

    /// Takes interface `ifindex` out of the XDP program's redirect targets (a device without
    /// the balancer may not take redirected frames: a veth drops them), and moves the route
    /// generation: connections that cached a redirect to it look their route up again.
    fn forbid_xdp_redirect(&mut self, ifindex: u32) {
        let _ = self.xdp_tx.remove(ifindex);
        if let Err(e) = self.route_gen.bump() {
            warn!(error = %e, "moving the route generation failed");
        }
    }

    /// The interfaces with a pinned link.
    fn pinned_links(&self) -> Vec<String> {
        let Some(dir) = self.links_dir() else {
            return Vec::new();
        };
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_prefix("xdp_")
                    .or_else(|| name.strip_prefix("tc_"))
                    .map(str::to_owned)
            })
            .collect()
    }

    fn links_dir(&self) -> Option<PathBuf> {
        self.pin_dir.as_ref().map(|d| d.join("links"))
    }

    /// Balances the sockets of the processes in the cgroup (v2) at `cgroup` and its
    /// descendants: their `connect()` to a VIP goes to a backend, their `getpeername()`
    /// answers the VIP (see `orch-ebpf/src/sock.rs`). Each program's link is pinned as
    /// `links/sock_<program>`; a link already pinned (a previous daemon's) gets this
    /// daemon's program in one atomic switch, so no `connect()` meets a moment without one.
    pub fn attach_cgroup(&mut self, cgroup: &Path) -> Result<(), DataplaneError> {
        let cgroup_err = |source| DataplaneError::Cgroup {
            path: cgroup.to_owned(),
            source,
        };
        let is_cgroup2 = fs_magic(cgroup).map_err(cgroup_err)? == CGROUP2_SUPER_MAGIC;
        if !is_cgroup2 {
            return Err(cgroup_err(std::io::Error::other(
                "not a cgroup v2 directory (socket-level balancing needs the unified hierarchy)",
            )));
        }
        let dir = std::fs::File::open(cgroup).map_err(cgroup_err)?;
        let links = self.links_dir();
        for name in SOCK_PROGRAMS {
            let pin = links.as_ref().map(|d| d.join(format!("sock_{name}")));
            let prog: &mut CgroupSockAddr = program(&mut self.ebpf, name)?;
            if let Some(pin) = pin.as_ref().filter(|p| p.exists()) {
                let fd = prog
                    .fd()
                    .map_err(|source| DataplaneError::Program { name, source })?;
                raw::link_update(pin, fd.as_fd())
                    .map_err(|source| DataplaneError::SockLink { name, source })?;
                continue;
            }
            let id = prog
                .attach(&dir, CgroupAttachMode::Single)
                .map_err(|source| DataplaneError::Program { name, source })?;
            let link = FdLink::try_from(
                prog.take_link(id)
                    .map_err(|source| DataplaneError::Program { name, source })?,
            )
            .map_err(|source| DataplaneError::NotALink {
                iface: name.to_owned(),
                source,
            })?;
            match pin {
                Some(pin) => {
                    link.pin(&pin).map_err(|source| DataplaneError::PinLink {
                        iface: name.to_owned(),
                        path: pin,
                        source,
                    })?;
                }
                None => self.sock_links.push(link),
            }
        }
        info!(cgroup = %cgroup.display(), "socket-level balancing attached");
        self.sock_cgroup = Some(cgroup.to_owned());
        Ok(())
    }

    /// Detaches socket-level balancing (its pins removed, its links dropped).
    pub fn detach_cgroup(&mut self) {
        self.sock_links.clear();
        if let Some(dir) = self.links_dir() {
            for name in SOCK_PROGRAMS {
                let pin = dir.join(format!("sock_{name}"));
                match std::fs::remove_file(&pin) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => warn!(pin = %pin.display(), error = %e, "removing a link pin failed"),
                }
            }
        }
        if self.sock_cgroup.take().is_some() {
            info!("socket-level balancing detached");
        }
    }

    /// Detaches the balancer from every interface it was attached to, pinned links included.
    pub fn detach_all(&mut self) {
        self.detach_cgroup();
        let attached = std::mem::take(&mut self.attached);
        for Attached {
            iface, attachment, ..
        } in attached
        {
            let result = match attachment {
                Attachment::OwnedXdp(id) => self
                    .program(PROGRAM)
                    .and_then(|p| {
                        p.detach(id).map_err(|source| DataplaneError::Program {
                            name: PROGRAM,
                            source,
                        })
                    })
                    .map_err(|e| crate::chain(&e)),
                Attachment::OwnedTc(id) => self
                    .tc_program()
                    .and_then(|p| {
                        p.detach(id).map_err(|source| DataplaneError::Program {
                            name: TC_PROGRAM,
                            source,
                        })
                    })
                    .map_err(|e| crate::chain(&e)),
                // Dropping the last fd of an unpinned link detaches it.
                Attachment::Pinned(p) => p.unpin().map(drop).map_err(|e| e.to_string()),
            };
            match result {
                Ok(()) => info!(iface, "balancer detached"),
                Err(e) => warn!(iface, error = %e, "detaching the balancer failed"),
            }
        }
    }

    /// Removes the pin directory: with the links detached ([`Dataplane::detach_all`]) the
    /// maps then go once this process closes them. Leaves nothing behind.
    pub fn remove_pins(&mut self) {
        if let Some(dir) = self.pin_dir.take() {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => info!(dir = %dir.display(), "pins removed"),
                Err(e) => warn!(dir = %dir.display(), error = %e, "removing the pins failed"),
            }
        }
    }

    /// Interfaces the balancer is attached to, and where.
    pub fn attached(&self) -> impl Iterator<Item = (&str, Hook)> {
        self.attached.iter().map(|a| (a.iface.as_str(), a.hook))
    }

    /// Forgets the attachments whose interface is gone, or was created again under its name
    /// (a new index): the kernel detached them with the device. Their link pins are removed.
    /// Returns the interfaces forgotten.
    pub fn forget_gone(&mut self) -> Vec<String> {
        let links_dir = self.links_dir();
        let (kept, gone): (Vec<Attached>, Vec<Attached>) = std::mem::take(&mut self.attached)
            .into_iter()
            .partition(|a| nix::net::if_::if_nametoindex(a.iface.as_str()).ok() == Some(a.ifindex));
        self.attached = kept;
        gone.into_iter()
            .map(|a| {
                if a.hook == Hook::Xdp {
                    self.forbid_xdp_redirect(a.ifindex);
                }
                if let Some(dir) = &links_dir {
                    let pin = dir.join(format!("{}_{}", a.hook.name(), a.iface));
                    if let Err(e) = std::fs::remove_file(&pin) {
                        if e.kind() != std::io::ErrorKind::NotFound {
                            warn!(iface = a.iface, error = %e, "removing a stale link pin failed");
                        }
                    }
                }
                // Dropping the attachment closes this process's fd of a link that the
                // kernel already detached.
                a.iface
            })
            .collect()
    }

    /// Puts entries straight into the confirmed-connection table, as the program writes
    /// them once handshakes complete: for benchmarks that need a full table without
    /// millions of handshakes. Returns how many went in; a full table ends it early.
    pub fn seed_flows(
        &mut self,
        entries: impl IntoIterator<Item = (FlowKey, FlowValue)>,
    ) -> Result<u64, DataplaneError> {
        let mut n = 0;
        for (key, value) in entries {
            match self.conntrack.insert(key, value, 0) {
                Ok(()) => n += 1,
                // E2BIG: the table is full.
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::E2BIG) =>
                {
                    break
                }
                Err(e) => return Err(map_err(CONNTRACK_MAP)(e)),
            }
        }
        Ok(n)
    }

    /// Read-only handles on the counters and connection tables, shareable with other
    /// threads (see [`Reader`]).
    pub fn reader(&self) -> &Arc<Reader> {
        &self.reader
    }

    /// Replaces the runtime settings.
    pub fn set_settings(&mut self, s: &Settings) -> Result<(), DataplaneError> {
        self.settings.set(0, s, 0).map_err(map_err(SETTINGS_MAP))
    }

    /// Lets new connections reach backend `id` again (after probes found it healthy), or
    /// clears the mark of an id being reused.
    pub fn clear_ejection(&mut self, id: u32) -> Result<(), DataplaneError> {
        self.backend_down
            .set(id, 0, 0)
            .map_err(map_err(BACKEND_DOWN_MAP))
    }

    /// One step of the connection tables' expiry: walks up to `budget` entries of each table
    /// from where the last step stopped, and removes the connections that are over:
    /// - closed (both FINs or a RST) and quiet for `tcp_close_ns`;
    /// - TCP idle for `tcp_idle_ns` (confirmed) or `unconfirmed_ns` (never confirmed);
    /// - UDP idle for `udp_idle_ns`;
    /// - reply entries whose forward entry is gone, once quiet for `tcp_close_ns`.
    ///
    /// A connection is judged by both its entries (either direction's traffic keeps it) and
    /// both go together. The walk resumes after the last key it saw that stays
    /// (`BPF_MAP_GET_NEXT_KEY`).
    pub fn expire(&mut self, t: &Timeouts, budget: usize) -> Result<Expired, DataplaneError> {
        let now = monotonic_ns();
        let mut out = Expired::default();
        for table in 0..2 {
            let (map, name) = if table == 0 {
                (&self.conntrack, CONNTRACK_MAP)
            } else {
                (&self.conntrack_new, CONNTRACK_NEW_MAP)
            };
            let fd = map.map().fd().as_fd();
            let mut cursor = self.sweep[table];
            let mut visited = Vec::new();
            let mut doomed = std::collections::HashSet::new();
            let mut finished = false;
            for _ in 0..budget {
                let next = next_key(fd, cursor.as_ref()).map_err(|e| DataplaneError::Map {
                    name,
                    source: MapError::IoError(e),
                })?;
                let Some(key) = next else {
                    finished = true;
                    break;
                };
                cursor = Some(key);
                visited.push(key);
                let Ok(value) = map.get(&key, 0) else {
                    continue;
                };
                if let Some((why, partner)) = self.verdict(&key, &value, table == 0, t, now)? {
                    *out.count(why) += 1;
                    doomed.insert(key);
                    doomed.extend(partner);
                }
            }
            out.walked += visited.len() as u64;
            // The next step resumes after the last key this one saw that stays: a walk from
            // a key that is gone starts the table over.
            self.sweep[table] = if finished {
                None
            } else {
                visited
                    .iter()
                    .rev()
                    .find(|k| !doomed.contains(*k))
                    .copied()
                    .or(self.sweep[table])
            };
            let mut unconfirmed_removed = 0;
            for key in doomed {
                for (m, n) in [
                    (&mut self.conntrack, CONNTRACK_MAP),
                    (&mut self.conntrack_new, CONNTRACK_NEW_MAP),
                ] {
                    match m.remove(&key) {
                        Ok(()) if n == CONNTRACK_NEW_MAP => unconfirmed_removed += 1,
                        Ok(()) => {}
                        // In the other table, or gone meanwhile (the program removes too).
                        Err(e) if absent(&e) => {}
                        Err(e) => return Err(map_err(n)(e)),
                    }
                }
            }
            if unconfirmed_removed > 0 {
                self.add_ct_new_op(CT_NEW_EXPIRED, unconfirmed_removed)?;
            }
        }
        Ok(out)
    }

    /// Whether the connection of entry (`key`, `value`) is over, why, and its other entry.
    fn verdict(
        &self,
        key: &FlowKey,
        value: &FlowValue,
        confirmed: bool,
        t: &Timeouts,
        now: u64,
    ) -> Result<Option<(Expiry, Option<FlowKey>)>, DataplaneError> {
        if key.dir != DIR_FORWARD {
            // Reply entries go with their forward entry; alone, they are orphans.
            let quiet = now.saturating_sub(value.last_seen_ns) > t.tcp_close_ns;
            if quiet && self.reader.flow(&key.forward_of(value))?.is_none() {
                return Ok(Some((Expiry::Orphan, None)));
            }
            return Ok(None);
        }
        let reply_key = key.reply(value.nat_addr, value.nat_port_be);
        let reply = self.reader.flow(&reply_key)?;
        let last = reply.map_or(value.last_seen_ns, |r| {
            r.last_seen_ns.max(value.last_seen_ns)
        });
        let idle = now.saturating_sub(last);
        let closed = FlowValue::closed(value.seen(), reply.map_or(0, |r| r.seen()));
        let why = if closed {
            (idle > t.tcp_close_ns).then_some(Expiry::Closed)
        } else if key.proto == IPPROTO_UDP {
            (idle > t.udp_idle_ns).then_some(Expiry::Idle)
        } else if confirmed {
            (idle > t.tcp_idle_ns).then_some(Expiry::Idle)
        } else {
            (idle > t.unconfirmed_ns).then_some(Expiry::Unconfirmed)
        };
        Ok(why.map(|w| (w, reply.map(|_| reply_key))))
    }

    /// Runs the balancer once on `packet` (BPF_PROG_TEST_RUN) as received on the loopback
    /// device. The kernel runs it in the network namespace of the calling thread, which
    /// decides what the FIB lookup sees.
    pub fn test_run(&mut self, packet: &[u8]) -> Result<TestRunOutput, DataplaneError> {
        self.run(PROGRAM, packet, 1, 0)
    }

    /// [`Dataplane::test_run`] as received on interface `ingress_ifindex` (of the calling
    /// thread's namespace): what the program's reverse-path check compares.
    pub fn test_run_on(
        &mut self,
        packet: &[u8],
        ingress_ifindex: u32,
    ) -> Result<TestRunOutput, DataplaneError> {
        self.run(PROGRAM, packet, 1, ingress_ifindex)
    }

    /// Runs `packet` once through the TC balancer as received on interface `ifindex` (of
    /// the calling thread's namespace): the TC action (`TC_ACT_*`) and the packet as the
    /// program left it. The kernel builds the skb with full checksums.
    pub fn test_run_tc(
        &mut self,
        packet: &[u8],
        ifindex: u32,
    ) -> Result<(i32, Vec<u8>), DataplaneError> {
        let (action, out, _) = self.run_tc(TC_PROGRAM, packet, 1, ifindex)?;
        Ok((action, out))
    }

    /// [`Dataplane::bench_run`] for the TC balancer and its floor (one counter increment,
    /// `TC_ACT_OK`): the TC action, and the kernel's average run time.
    pub fn bench_run_tc(
        &mut self,
        floor: bool,
        packet: &[u8],
        repeat: u32,
    ) -> Result<(i32, Duration), DataplaneError> {
        self.bench_run_tc_on(floor, packet, repeat, 0)
    }

    /// [`Dataplane::bench_run_tc`] as received on interface `ifindex` (0: none).
    pub fn bench_run_tc_on(
        &mut self,
        floor: bool,
        packet: &[u8],
        repeat: u32,
        ifindex: u32,
    ) -> Result<(i32, Duration), DataplaneError> {
        let name = if floor { TC_FLOOR_PROGRAM } else { TC_PROGRAM };
        let (action, _, duration) = self.run_tc(name, packet, repeat, ifindex)?;
        Ok((action, duration))
    }

    fn run_tc(
        &mut self,
        name: &'static str,
        packet: &[u8],
        repeat: u32,
        ifindex: u32,
    ) -> Result<(i32, Vec<u8>, Duration), DataplaneError> {
        // `struct __sk_buff` up to `ifindex` (offset 40), the one field set; without it the
        // kernel runs the skb on the loopback device.
        let mut ctx = [0u8; 44];
        ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(name)
            .ok_or(DataplaneError::Missing {
                kind: "program",
                name,
            })?
            .try_into()
            .map_err(|source| DataplaneError::Program { name, source })?;
        let ctx = (ifindex != 0).then_some(&ctx[..]);
        let (rc, out, duration) = test_run_program(prog, name, packet, repeat, ctx)?;
        Ok((rc as i32, out, duration))
    }

    /// Runs `packet` `repeat` times through the balancer (`floor == false`) or the floor
    /// program, for benchmarks. A rewriting path sees its own output on repeats: use
    /// packets whose path is idempotent (pass, established flows).
    pub fn bench_run(
        &mut self,
        floor: bool,
        packet: &[u8],
        repeat: u32,
    ) -> Result<TestRunOutput, DataplaneError> {
        self.bench_run_on(floor, packet, repeat, 0)
    }

    /// [`Dataplane::bench_run`] as received on interface `ingress_ifindex` (0: none).
    pub fn bench_run_on(
        &mut self,
        floor: bool,
        packet: &[u8],
        repeat: u32,
        ingress_ifindex: u32,
    ) -> Result<TestRunOutput, DataplaneError> {
        let name = if floor { FLOOR_PROGRAM } else { PROGRAM };
        self.run(name, packet, repeat, ingress_ifindex)
    }

    fn run(
        &mut self,
        name: &'static str,
        packet: &[u8],
        repeat: u32,
        ingress_ifindex: u32,
    ) -> Result<TestRunOutput, DataplaneError> {
        // `struct xdp_md`: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex. The kernel wants data 0 and data_end the packet's length.
        let ctx: Vec<u8> = [0, packet.len() as u32, 0, ingress_ifindex, 0, 0]
            .iter()
            .flat_map(|w| w.to_ne_bytes())
            .collect();
        let prog = self.program(name)?;
        let ctx = (ingress_ifindex != 0).then_some(&ctx[..]);
        let (rc, packet, duration) = test_run_program(prog, name, packet, repeat, ctx)?;
        Ok(TestRunOutput {
            verdict: Verdict::from(rc),
            packet,
            duration,
        })
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        // Owned attachments go with the process anyway; detach them explicitly so that a
        // failed start leaves nothing half-attached. Pinned links stay by design.
        self.attached
            .retain(|a| !matches!(a.attachment, Attachment::Pinned(_)));
        self.detach_all();
    }
}

/// Adds the per-CPU values of the old pinned map at `old` (named `old_name`) into `new`,
/// index by index up to `limit`, with `add`: an upgrade's counters carried over. An index
/// the old map lacks is skipped. (The program keeps counting into `new` meanwhile; what it
/// counts between a read and the write of one index is lost, a window of microseconds.)
fn carry_per_cpu<O: aya::Pod, N: aya::Pod>(
    old: &Path,
    (old_name, new, new_name): (&'static str, &mut PerCpuArray<MapData, N>, &'static str),
    limit: u32,
    add: impl Fn(&O, &mut N),
) -> Result<(), DataplaneError> {
    let old: PerCpuArray<MapData, O> =
        PerCpuArray::try_from(open_pinned(old)?).map_err(map_err(old_name))?;
    for index in 0..old.len().min(limit) {
        let (Ok(before), Ok(now)) = (old.get(&index, 0), new.get(&index, 0)) else {
            continue;
        };
        let sum: Vec<N> = before
            .iter()
            .zip(now.iter())
            .map(|(b, n)| {
                let mut n = *n;
                add(b, &mut n);
                n
            })
            .collect();
        let values = PerCpuValues::try_from(sum).map_err(|source| DataplaneError::Map {
            name: new_name,
            source: MapError::IoError(source),
        })?;
        new.set(index, values, 0).map_err(map_err(new_name))?;
    }
    Ok(())
}

/// `BPF_PROG_TEST_RUN` of `prog` (XDP or TC) on `packet`, `repeat` times, with the context
/// `ctx`: the return value, the packet as the program left it, the average run time.
fn test_run_program<P>(
    prog: &mut P,
    name: &'static str,
    packet: &[u8],
    repeat: u32,
    ctx: Option<&[u8]>,
) -> Result<(u32, Vec<u8>, Duration), DataplaneError>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = aya::programs::TestRunResult>,
{
    // Room for the program to grow the packet (it does not today) and the kernel's check
    // that the output fits.
    let mut out = vec![0u8; packet.len() + 256];
    let opts = TestRunOptions {
        data_in: Some(packet),
        data_out: Some(&mut out),
        ctx_in: ctx,
        repeat,
        ..Default::default()
    };
    let result = prog
        .test_run(opts)
        .map_err(|source| DataplaneError::Program { name, source })?;
    out.truncate(result.data_size_out as usize);
    Ok((result.return_value, out, result.duration))
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

/// The maps whose size follows the capacity, with their sizes.
fn sized_maps(c: Capacity) -> [(&'static str, u32); 13] {
    [
        // One slot more: the highest incarnation given.
        (SERVICE_LIVE_MAP, c.max_services + 1),
        (MAGLEV_MAP, c.max_services * 2),
        (MAGLEV_REPLY_MAP, c.max_backends),
        (BACKEND_SIGNALS_MAP, c.max_backends),
        (BACKEND_DOWN_MAP, c.max_backends),
        (SERVICES_MAP, c.max_services),
        (SLOTS_MAP, c.max_services * 2),
        (CURSORS_MAP, c.max_services),
        (SERVICE_STATS_MAP, c.max_services),
        (BACKENDS_MAP, c.max_backends),
        (BACKEND_STATS_MAP, c.max_backends),
        (CONNTRACK_MAP, c.conntrack),
        (CONNTRACK_NEW_MAP, c.conntrack_new),
    ]
}

/// Makes sure `dir` is a directory on bpffs with `maps` and `links` in it.
fn prepare_pin_dir(dir: &Path) -> Result<(), DataplaneError> {
    let pin_err = |path: &Path| {
        let path = path.to_owned();
        move |source| DataplaneError::PinDir { path, source }
    };
    // The nearest existing ancestor tells which filesystem `dir` will be on.
    let mut probe = dir;
    while !probe.exists() {
        probe = probe.parent().unwrap_or(Path::new("/"));
    }
    if !is_bpffs(probe).map_err(pin_err(probe))? {
        let root = Path::new(BPFFS_ROOT);
        if !(dir.starts_with(root) && (probe == root || root.starts_with(probe))) {
            return Err(DataplaneError::NotBpffs {
                dir: dir.to_owned(),
            });
        }
        std::fs::create_dir_all(root).map_err(pin_err(root))?;
        nix::mount::mount(
            Some("bpf"),
            root,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| pin_err(root)(e.into()))?;
        info!(path = BPFFS_ROOT, "mounted bpffs");
    }
    for sub in ["maps", "links"] {
        let path = dir.join(sub);
        std::fs::create_dir_all(&path).map_err(pin_err(&path))?;
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> std::io::Result<bool> {
    Ok(fs_magic(path)? == BPF_FS_MAGIC)
}

/// The filesystem type (`statfs` magic) of `path`.
fn fs_magic(path: &Path) -> std::io::Result<i64> {
    let st = nix::sys::statfs::statfs(path)?;
    #[allow(clippy::unnecessary_cast)] // `__fsword_t` is narrower than i64 on some targets
    Ok(st.filesystem_type().0 as i64)
}

/// Settings written at load: UDP idle timeout 30 s, timestamps refreshed once a second,
/// redirect on.
pub fn default_settings() -> Settings {
    Settings {
        udp_idle_ns: orch_common::DEFAULT_UDP_IDLE_NS,
        touch_interval_ns: 1_000_000_000,
        flags: orch_common::maps::SETTING_REDIRECT,
        _reserved: 0,
    }
}

impl MapReader for Dataplane {
    type Error = DataplaneError;

    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, DataplaneError> {
        self.services
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(SERVICES_MAP))
    }

    fn slot_table(&self, index: u32) -> Result<SlotTable, DataplaneError> {
        self.slots.get(&index, 0).map_err(map_err(SLOTS_MAP))
    }

    fn maglev_table(&self, index: u32) -> Result<Option<Box<MaglevTable>>, DataplaneError> {
        self.reader.maglev_table(index)
    }

    fn maglev_replies(&self) -> Result<Vec<(BackendKey, MaglevReply)>, DataplaneError> {
        self.maglev_reply
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(MAGLEV_REPLY_MAP))
    }

    fn backends(&self) -> Result<Vec<(u32, Backend)>, DataplaneError> {
        let mut out = Vec::new();
        for (id, b) in self.backends.iter().enumerate() {
            let b = b.map_err(map_err(BACKENDS_MAP))?;
            if b.in_use() {
                out.push((id as u32, b));
            }
        }
        Ok(out)
    }

    fn ports(&self, index: u32) -> Result<PortBitmap, DataplaneError> {
        self.ports.get(&index, 0).map_err(map_err(PORTS_MAP))
    }
}

impl MapWriter for Dataplane {
    type Error = DataplaneError;

    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<(), DataplaneError> {
        // A (re)written entry starts with a clean slate: an ejection mark left by the id's
        // previous backend must not keep the new one out, and its counters must not be
        // reported as the new backend's (a Prometheus counter starts at zero).
        self.clear_ejection(id)?;
        if backend.in_use() {
            zero_per_cpu(&mut self.backend_stats, id, BACKEND_STATS_MAP)?;
            zero_per_cpu(&mut self.backend_signals, id, BACKEND_SIGNALS_MAP)?;
        }
        self.backends
            .set(id, backend, 0)
            .map_err(map_err(BACKENDS_MAP))
    }

    fn set_slot_table(&mut self, index: u32, table: &SlotTable) -> Result<(), DataplaneError> {
        self.slots.set(index, table, 0).map_err(map_err(SLOTS_MAP))
    }

    fn set_maglev_table(&mut self, index: u32, table: &MaglevTable) -> Result<(), DataplaneError> {
        self.maglev
            .insert(index, table, 0)
            .map_err(map_err(MAGLEV_MAP))
    }

    fn remove_maglev_table(&mut self, index: u32) -> Result<(), DataplaneError> {
        match self.maglev.remove(&index) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(MAGLEV_MAP)(e)),
        }
    }

    fn set_maglev_reply(
        &mut self,
        key: &BackendKey,
        value: &MaglevReply,
    ) -> Result<(), DataplaneError> {
        self.maglev_reply
            .insert(key, value, 0)
            .map_err(map_err(MAGLEV_REPLY_MAP))
    }

    fn remove_maglev_reply(&mut self, key: &BackendKey) -> Result<(), DataplaneError> {
        match self.maglev_reply.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(MAGLEV_REPLY_MAP)(e)),
        }
    }

    /// Also gives the service a new incarnation when it is new under its id (its key not in
    /// the table under that id, or the id without one). An update keeps it, and with it its
    /// connections' fast path.
    fn set_service(
        &mut self,
        key: &ServiceKey,
        value: &ServiceValue,
    ) -> Result<(), DataplaneError> {
        let same = match self.services.get(key, 0) {
            Ok(v) => v.id == value.id,
            Err(MapError::KeyNotFound) => false,
            Err(e) => return Err(map_err(SERVICES_MAP)(e)),
        };
        if !same || self.incarnation(value.id)? == 0 {
            self.new_incarnation(value.id)?;
        }
        self.services
            .insert(key, value, 0)
            .map_err(map_err(SERVICES_MAP))
    }

    /// Also clears the service's incarnation, first: its connections' packets are checked
    /// against the service table again, which no longer has it.
    fn remove_service(&mut self, key: &ServiceKey) -> Result<(), DataplaneError> {
        match self.services.get(key, 0) {
            Ok(v) => self
                .service_live
                .set(v.id, 0, 0)
                .map_err(map_err(SERVICE_LIVE_MAP))?,
            Err(MapError::KeyNotFound) => return Ok(()),
            Err(e) => return Err(map_err(SERVICES_MAP)(e)),
        }
        match self.services.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(SERVICES_MAP)(e)),
        }
    }

    fn set_ports(&mut self, index: u32, ports: &PortBitmap) -> Result<(), DataplaneError> {
        self.ports.set(index, ports, 0).map_err(map_err(PORTS_MAP))
    }

    fn zero_service_counters(&mut self, id: u32) -> Result<(), DataplaneError> {
        zero_per_cpu(&mut self.service_stats, id, SERVICE_STATS_MAP)
    }
}

/// Sets every CPU's copy of entry `id` to its default (zero).
fn zero_per_cpu<T: aya::Pod + Default>(
    map: &mut PerCpuArray<MapData, T>,
    id: u32,
    name: &'static str,
) -> Result<(), DataplaneError> {
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| DataplaneError::Cpus(e))?;
    let values = aya::maps::PerCpuValues::try_from(vec![T::default(); cpus])
        .map_err(DataplaneError::Cpus)?;
    map.set(id, values, 0).map_err(map_err(name))
}
