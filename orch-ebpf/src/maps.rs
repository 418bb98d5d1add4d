//! The maps, declared once. Names, keys and values come from `orch_common::maps`; the names
//! here must match its `*_MAP` constants (the daemon looks maps up by those).
//!
//! Capacities are defaults: the daemon resizes the per-service and per-backend maps at load
//! time from its configuration.

use aya_ebpf::{
    bindings::{bpf_fib_lookup, BPF_F_NO_PREALLOC},
    macros::map,
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray},
};
use orch_common::{
    maps::{
        Backend, BackendKey, BackendSignals, CachedHop, FlowKey, FlowValue, FragKey, FragValue,
        MaglevReply, MaglevTable, PortBitmap, ServiceKey, ServiceValue, Settings, SlotTable,
        SockEvent, SockFlow, SockFlowKey, SockPeer, TrafficCounters,
        CT_NEW_OPS as CT_NEW_OPS_SLOTS, FRAGS_CAPACITY, SOCK_PEERS_CAPACITY, SOCK_UDP_CAPACITY,
        XDP_TX_CAPACITY,
    },
    CtEvent, Reason, CONNTRACK_CAPACITY, CONNTRACK_NEW_CAPACITY, MAX_BACKENDS, MAX_SERVICES,
};

#[map(name = "ORCH_SVC_V1")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::with_max_entries(MAX_SERVICES, 0);

#[map(name = "ORCH_SLOTS_V1")]
pub static SLOTS: Array<SlotTable> = Array::with_max_entries(MAX_SERVICES * 2, 0);

/// Maglev tables: not preallocated, so services on round-robin cost nothing here.
#[map(name = "ORCH_MAGLEV_V1")]
pub static MAGLEV: HashMap<u32, MaglevTable> =
    HashMap::with_max_entries(MAX_SERVICES * 2, BPF_F_NO_PREALLOC);

#[map(name = "ORCH_MAGLEV_REPLY_V1")]
pub static MAGLEV_REPLY: HashMap<BackendKey, MaglevReply> =
    HashMap::with_max_entries(MAX_BACKENDS, 0);

/// See `orch_common::maps::SERVICE_LIVE_MAP`.
#[map(name = "ORCH_SVC_LIVE_V1")]
pub static SERVICE_LIVE: Array<u32> = Array::with_max_entries(MAX_SERVICES, 0);

/// The incarnation of service `id` (0: no service has this id).
#[inline(always)]
pub fn service_gen(id: u32) -> u32 {
    SERVICE_LIVE.get(id).copied().unwrap_or(0)
}

#[map(name = "ORCH_BE_V1")]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

#[map(name = "ORCH_CURSOR_V1")]
pub static CURSORS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);

/// Confirmed connections: a plain hash, so nothing but the daemon's expiry removes one. Not
/// preallocated: its memory follows the connections it holds rather than its capacity (a
/// connection is confirmed once, so the allocation is off the per-packet path), and a
/// failed allocation fails the confirmation, which is counted and leaves the connection
/// working from the unconfirmed table.
#[map(name = "ORCH_CT_V3")]
pub static CONNTRACK: HashMap<FlowKey, FlowValue> =
    HashMap::with_max_entries(CONNTRACK_CAPACITY, BPF_F_NO_PREALLOC);

/// Connections not yet confirmed: an LRU, which a flood recycles.
#[map(name = "ORCH_CT_NEW_V3")]
pub static CONNTRACK_NEW: LruHashMap<FlowKey, FlowValue> =
    LruHashMap::with_max_entries(CONNTRACK_NEW_CAPACITY, 0);

/// Where a new connection's entries and keys are built, one per CPU: the 512-byte BPF stack,
/// shared by the entry point and its subprograms, cannot hold them. Not pinned: nothing in
/// it outlives a packet.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Work {
    /// The entry being written (reply first, then forward).
    pub flow: FlowValue,
    /// The new connection's reply key.
    pub reply_key: FlowKey,
    /// The forward key of a connection that holds that reply key.
    pub holder_key: FlowKey,
    /// The result code of the FIB lookup for the chosen backend, whose parameters and
    /// results stay in [`FIB_SCRATCH`] for the packet's forwarding.
    pub route_rc: i64,
    /// A fragment's datagram, and how its first fragment was translated.
    pub frag_key: FragKey,
    pub frag: FragValue,
}

#[map(name = "ORCH_SCRATCH")]
pub static SCRATCH: PerCpuArray<Work> = PerCpuArray::with_max_entries(1, 0);

/// One FIB lookup's parameters and its result as a next hop, per CPU (for the same reason).
#[repr(C)]
pub struct FibWork {
    pub params: bpf_fib_lookup,
    /// The next hop of a packet whose connection has no entry to cache it in (a new
    /// connection's first packet, a stateless translation, an ICMP error, a fragment).
    pub hop: CachedHop,
}
// `fib::lookup` zeroes the parameters in 8-byte words: they start the (8-byte aligned) value.
const _: () = assert!(core::mem::offset_of!(FibWork, params) == 0);

#[map(name = "ORCH_FIB_SCRATCH")]
pub static FIB_SCRATCH: PerCpuArray<FibWork> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "ORCH_CT_EV_V1")]
pub static CT_EVENTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(CtEvent::COUNT, 0);

/// What the program added to and removed from [`CONNTRACK_NEW`] (see `CT_NEW_OPS_MAP`).
#[map(name = "ORCH_CT_NEW_OPS_V1")]
pub static CT_NEW_OPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(CT_NEW_OPS_SLOTS, 0);

/// Where XDP may redirect (see `orch_common::maps::XDP_TX_MAP`).
#[map(name = "ORCH_XDP_TX_V1")]
pub static XDP_TX: DevMapHash = DevMapHash::with_max_entries(XDP_TX_CAPACITY, 0);

/// Datagrams in fragments (see `orch_common::maps::FRAGS_MAP`).
#[map(name = "ORCH_FRAGS_V1")]
pub static FRAGS: LruHashMap<FragKey, FragValue> = LruHashMap::with_max_entries(FRAGS_CAPACITY, 0);

#[map(name = "ORCH_PORTS_V1")]
pub static PORTS: Array<PortBitmap> = Array::with_max_entries(2, 0);

/// See `orch_common::maps::ROUTE_GEN_MAP`.
#[map(name = "ORCH_ROUTE_GEN_V1")]
pub static ROUTE_GEN: Array<u32> = Array::with_max_entries(1, 0);

/// The route generation cached next hops must carry to be used (see
/// `orch_common::maps::CachedHop`); 0 (never a generation) if the map cannot be read.
#[inline(always)]
pub fn route_gen() -> u32 {
    ROUTE_GEN.get(0).copied().unwrap_or(0)
}

#[map(name = "ORCH_CFG_V1")]
pub static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

#[map(name = "ORCH_STATS_V4")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Reason::COUNT, 0);

#[map(name = "ORCH_SVC_ST_V1")]
pub static SERVICE_STATS: PerCpuArray<TrafficCounters> =
    PerCpuArray::with_max_entries(MAX_SERVICES, 0);

#[map(name = "ORCH_BE_ST_V1")]
pub static BACKEND_STATS: PerCpuArray<TrafficCounters> =
    PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

#[map(name = "ORCH_BE_SIG_V2")]
pub static BACKEND_SIGNALS: PerCpuArray<BackendSignals> =
    PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

#[map(name = "ORCH_BE_DOWN_V1")]
pub static BACKEND_DOWN: Array<u32> = Array::with_max_entries(MAX_BACKENDS, 0);

/// The daemon's runtime settings (defaults until it writes them).
#[inline(always)]
pub fn settings() -> Settings {
    SETTINGS.get(0).copied().unwrap_or_default()
}

#[map(name = "ORCH_SOCK_PEERS_V1")]
pub static SOCK_PEERS: LruHashMap<u64, SockPeer> =
    LruHashMap::with_max_entries(SOCK_PEERS_CAPACITY, 0);

#[map(name = "ORCH_SOCK_UDP_V1")]
pub static SOCK_UDP: LruHashMap<SockFlowKey, SockFlow> =
    LruHashMap::with_max_entries(SOCK_UDP_CAPACITY, 0);

#[map(name = "ORCH_SOCK_UDP_REV_V1")]
pub static SOCK_UDP_REV: LruHashMap<SockFlowKey, SockFlow> =
    LruHashMap::with_max_entries(SOCK_UDP_CAPACITY, 0);

#[map(name = "ORCH_SOCK_ST_V1")]
pub static SOCK_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(SockEvent::COUNT, 0);
