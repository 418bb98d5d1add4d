//! The maps, declared once. Names, keys and values come from `orch_common::maps`; the names
//! here must match its `*_MAP` constants (the daemon looks maps up by those).
//!
//! Capacities are defaults: the daemon resizes the per-service and per-backend maps at load
//! time from its configuration.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use orch_common::{
    maps::{
        Backend, BackendSignals, FlowKey, FlowValue, PortBitmap, ServiceKey, ServiceValue,
        Settings, SlotTable, TrafficCounters,
    },
    Reason, CONNTRACK_CAPACITY, MAX_BACKENDS, MAX_SERVICES,
};

#[map(name = "ORCH_SVC_V1")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::with_max_entries(MAX_SERVICES, 0);

#[map(name = "ORCH_SLOTS_V1")]
pub static SLOTS: Array<SlotTable> = Array::with_max_entries(MAX_SERVICES * 2, 0);

#[map(name = "ORCH_BE_V1")]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

#[map(name = "ORCH_CURSOR_V1")]
pub static CURSORS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);

#[map(name = "ORCH_CT_V2")]
pub static CONNTRACK: LruHashMap<FlowKey, FlowValue> =
    LruHashMap::with_max_entries(CONNTRACK_CAPACITY, 0);

#[map(name = "ORCH_PORTS_V1")]
pub static PORTS: Array<PortBitmap> = Array::with_max_entries(2, 0);

#[map(name = "ORCH_CFG_V1")]
pub static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

#[map(name = "ORCH_STATS_V3")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Reason::COUNT, 0);

#[map(name = "ORCH_SVC_ST_V1")]
pub static SERVICE_STATS: PerCpuArray<TrafficCounters> =
    PerCpuArray::with_max_entries(MAX_SERVICES, 0);

#[map(name = "ORCH_BE_ST_V1")]
pub static BACKEND_STATS: PerCpuArray<TrafficCounters> =
    PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

#[map(name = "ORCH_BE_SIG_V1")]
pub static BACKEND_SIGNALS: PerCpuArray<BackendSignals> =
    PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

#[map(name = "ORCH_BE_DOWN_V1")]
pub static BACKEND_DOWN: Array<u32> = Array::with_max_entries(MAX_BACKENDS, 0);
