//! The data plane as the daemon sees it: the only module that talks to aya.
//!
//! It loads the eBPF object embedded at build time, sizes its maps, attaches the XDP program
//! to interfaces, writes map entries for the reconciler (through [`MapWriter`]) and reads the
//! per-CPU counters back, summed over CPUs. It also runs the program on test packets
//! (`BPF_PROG_TEST_RUN`) for the packet tests and benchmarks.

use std::time::Duration;

use aya::{
    maps::{Array, HashMap, MapData, MapError, PerCpuArray},
    programs::{xdp::XdpLinkId, ProgramError, TestRun, TestRunOptions, Xdp, XdpMode},
    Ebpf, EbpfError, EbpfLoader,
};
use orch_common::maps::{
    Backend, FlowKey, FlowValue, PortBitmap, ServiceKey, ServiceValue, Settings, SlotTable,
    TrafficCounters, BACKENDS_MAP, BACKEND_STATS_MAP, CONNTRACK_MAP, CURSORS_MAP, PORTS_MAP,
    SERVICES_MAP, SERVICE_STATS_MAP, SETTINGS_MAP, SLOTS_MAP, STATS_MAP,
};
use orch_common::Reason;
use tracing::{debug, info};

use crate::reconcile::MapWriter;

/// The eBPF object built by `build.rs` from the `orch-ebpf` crate.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/orch"));

/// The balancer program's name in the object.
const PROGRAM: &str = "orch_xdp";
/// The benchmark floor program (one counter increment, XDP_PASS).
const FLOOR_PROGRAM: &str = "orch_floor";

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
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("attaching XDP to interface {iface} failed")]
    Attach {
        iface: String,
        #[source]
        source: ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
}

/// Map capacities, fixed when the object is loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub max_services: u32,
    pub max_backends: u32,
    pub conntrack: u32,
}

impl Default for Capacity {
    fn default() -> Self {
        Capacity {
            max_services: orch_common::MAX_SERVICES,
            max_backends: orch_common::MAX_BACKENDS,
            conntrack: orch_common::CONNTRACK_CAPACITY,
        }
    }
}

/// How to attach the XDP program.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttachMode {
    /// Native where the driver supports it, generic (skb) otherwise: the kernel chooses.
    #[default]
    Auto,
    /// Driver mode only; fails where the driver has no XDP support.
    Native,
    /// Generic mode: works on any interface, slower.
    Generic,
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

/// The loaded data plane. Dropping it detaches the program from every interface.
pub struct Dataplane {
    ebpf: Ebpf,
    capacity: Capacity,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    slots: Array<MapData, SlotTable>,
    backends: Array<MapData, Backend>,
    ports: Array<MapData, PortBitmap>,
    settings: Array<MapData, Settings>,
    stats: PerCpuArray<MapData, u64>,
    service_stats: PerCpuArray<MapData, TrafficCounters>,
    backend_stats: PerCpuArray<MapData, TrafficCounters>,
    conntrack: HashMap<MapData, FlowKey, FlowValue>,
    attached: Vec<(String, XdpLinkId)>,
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

fn xdp_program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, DataplaneError> {
    ebpf.program_mut(name)
        .ok_or(DataplaneError::Missing {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(|source| DataplaneError::Program { name, source })
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
    /// writes the default settings. Nothing is attached yet.
    pub fn load(capacity: Capacity) -> Result<Self, DataplaneError> {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(SERVICES_MAP, capacity.max_services)
            .map_max_entries(SLOTS_MAP, capacity.max_services * 2)
            .map_max_entries(CURSORS_MAP, capacity.max_services)
            .map_max_entries(SERVICE_STATS_MAP, capacity.max_services)
            .map_max_entries(BACKENDS_MAP, capacity.max_backends)
            .map_max_entries(BACKEND_STATS_MAP, capacity.max_backends)
            .map_max_entries(CONNTRACK_MAP, capacity.conntrack)
            .load(OBJECT)
            .map_err(DataplaneError::Load)?;
        for name in [PROGRAM, FLOOR_PROGRAM] {
            xdp_program(&mut ebpf, name)?
                .load()
                .map_err(|source| DataplaneError::Program { name, source })?;
        }
        let mut dp = Dataplane {
            services: take(&mut ebpf, SERVICES_MAP)?,
            slots: take(&mut ebpf, SLOTS_MAP)?,
            backends: take(&mut ebpf, BACKENDS_MAP)?,
            ports: take(&mut ebpf, PORTS_MAP)?,
            settings: take(&mut ebpf, SETTINGS_MAP)?,
            stats: take(&mut ebpf, STATS_MAP)?,
            service_stats: take(&mut ebpf, SERVICE_STATS_MAP)?,
            backend_stats: take(&mut ebpf, BACKEND_STATS_MAP)?,
            conntrack: take(&mut ebpf, CONNTRACK_MAP)?,
            ebpf,
            capacity,
            attached: Vec::new(),
        };
        dp.set_settings(&default_settings())?;
        debug!(?capacity, "data plane loaded");
        Ok(dp)
    }

    /// The capacities the maps were created with.
    pub fn capacity(&self) -> Capacity {
        self.capacity
    }

    fn program(&mut self, name: &'static str) -> Result<&mut Xdp, DataplaneError> {
        xdp_program(&mut self.ebpf, name)
    }

    /// Attaches the balancer to `iface`.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<(), DataplaneError> {
        let aya_mode = match mode {
            AttachMode::Auto => XdpMode::Default,
            AttachMode::Native => XdpMode::Driver,
            AttachMode::Generic => XdpMode::Skb,
        };
        let link = self
            .program(PROGRAM)?
            .attach(iface, aya_mode)
            .map_err(|source| DataplaneError::Attach {
                iface: iface.to_owned(),
                source,
            })?;
        info!(iface, ?mode, "XDP program attached");
        self.attached.push((iface.to_owned(), link));
        Ok(())
    }

    /// Detaches the balancer from every interface it was attached to.
    pub fn detach_all(&mut self) {
        let attached = std::mem::take(&mut self.attached);
        for (iface, link) in attached {
            match self.program(PROGRAM).map(|p| p.detach(link)) {
                Ok(Ok(())) => info!(iface, "XDP program detached"),
                Ok(Err(e)) => tracing::warn!(iface, error = %e, "detaching XDP failed"),
                Err(e) => tracing::warn!(iface, error = %e, "detaching XDP failed"),
            }
        }
    }

    /// Interfaces the balancer is attached to.
    pub fn attached(&self) -> impl Iterator<Item = &str> {
        self.attached.iter().map(|(i, _)| i.as_str())
    }

    /// Replaces the runtime settings.
    pub fn set_settings(&mut self, s: &Settings) -> Result<(), DataplaneError> {
        self.settings.set(0, s, 0).map_err(map_err(SETTINGS_MAP))
    }

    /// Verdict counters summed over CPUs, one per [`Reason`], in [`Reason::ALL`] order.
    pub fn reason_counts(&self) -> Result<Vec<(Reason, u64)>, DataplaneError> {
        Reason::ALL
            .iter()
            .map(|&r| {
                let per_cpu = self.stats.get(&(r as u32), 0).map_err(map_err(STATS_MAP))?;
                Ok((r, per_cpu.iter().sum()))
            })
            .collect()
    }

    /// Traffic counters of service `id`, summed over CPUs.
    pub fn service_counters(&self, id: u32) -> Result<TrafficCounters, DataplaneError> {
        sum_counters(&self.service_stats, id, SERVICE_STATS_MAP)
    }

    /// Traffic counters of backend `id`, summed over CPUs.
    pub fn backend_counters(&self, id: u32) -> Result<TrafficCounters, DataplaneError> {
        sum_counters(&self.backend_stats, id, BACKEND_STATS_MAP)
    }

    /// The connection-table entry for `key`, if any.
    pub fn flow(&self, key: &FlowKey) -> Result<Option<FlowValue>, DataplaneError> {
        match self.conntrack.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(CONNTRACK_MAP)(e)),
        }
    }

    /// Runs the balancer once on `packet` (BPF_PROG_TEST_RUN). The kernel runs it in the
    /// network namespace of the calling thread, which decides what the FIB lookup sees.
    pub fn test_run(&mut self, packet: &[u8]) -> Result<TestRunOutput, DataplaneError> {
        self.run(PROGRAM, packet, 1)
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
        self.run(if floor { FLOOR_PROGRAM } else { PROGRAM }, packet, repeat)
    }

    fn run(
        &mut self,
        name: &'static str,
        packet: &[u8],
        repeat: u32,
    ) -> Result<TestRunOutput, DataplaneError> {
        // Room for the program to grow the packet (it does not today) and the kernel's check
        // that the output fits.
        let mut out = vec![0u8; packet.len() + 256];
        let prog = self.program(name)?;
        let opts = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            repeat,
            ..Default::default()
        };
        let result = prog
            .test_run(opts)
            .map_err(|source| DataplaneError::Program { name, source })?;
        out.truncate(result.data_size_out as usize);
        Ok(TestRunOutput {
            verdict: Verdict::from(result.return_value),
            packet: out,
            duration: result.duration,
        })
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        self.detach_all();
    }
}

fn sum_counters(
    map: &PerCpuArray<MapData, TrafficCounters>,
    id: u32,
    name: &'static str,
) -> Result<TrafficCounters, DataplaneError> {
    let per_cpu = map.get(&id, 0).map_err(map_err(name))?;
    let mut total = TrafficCounters::default();
    for c in per_cpu.iter() {
        total.add(c);
    }
    Ok(total)
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

impl MapWriter for Dataplane {
    type Error = DataplaneError;

    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<(), DataplaneError> {
        self.backends
            .set(id, backend, 0)
            .map_err(map_err(BACKENDS_MAP))
    }

    fn set_slot_table(&mut self, index: u32, table: &SlotTable) -> Result<(), DataplaneError> {
        self.slots.set(index, table, 0).map_err(map_err(SLOTS_MAP))
    }

    fn set_service(
        &mut self,
        key: &ServiceKey,
        value: &ServiceValue,
    ) -> Result<(), DataplaneError> {
        self.services
            .insert(key, value, 0)
            .map_err(map_err(SERVICES_MAP))
    }

    fn remove_service(&mut self, key: &ServiceKey) -> Result<(), DataplaneError> {
        match self.services.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(SERVICES_MAP)(e)),
        }
    }

    fn set_ports(&mut self, index: u32, ports: &PortBitmap) -> Result<(), DataplaneError> {
        self.ports.set(index, ports, 0).map_err(map_err(PORTS_MAP))
    }
}
