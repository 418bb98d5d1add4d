//! Read-only access to the data plane's counters and connection tables, for any thread.
//!
//! The daemon's loop owns the [`Dataplane`](super::Dataplane) and is the only writer of its
//! maps. Scrapes, list requests and the connection census read a great deal and write
//! nothing; they do it through a [`Reader`]: its own file descriptors for the same kernel
//! maps, shareable between threads, so that no read ever waits for (or stalls) the loop.

use std::{
    collections::HashMap as StdHashMap,
    os::fd::AsFd,
    sync::atomic::{AtomicU64, Ordering},
};

use aya::maps::{Array, HashMap, IterableMap, Map, MapData, MapError, PerCpuArray};
use orch_common::{
    maps::{
        Backend, BackendSignals, FlowKey, FlowValue, MaglevTable, ServiceKey, ServiceValue,
        SlotTable, SockEvent, TrafficCounters, BACKENDS_MAP, BACKEND_DOWN_MAP, BACKEND_SIGNALS_MAP,
        BACKEND_STATS_MAP, CONNTRACK_MAP, CONNTRACK_NEW_MAP, CT_EVENTS_MAP, CT_NEW_ADOPTED,
        CT_NEW_EXPIRED, CT_NEW_INSERTED, CT_NEW_OPS_MAP, CT_NEW_REMOVED, CURSORS_MAP, DIR_FORWARD,
        MAGLEV_MAP, SERVICES_MAP, SERVICE_STATS_MAP, SLOTS_MAP, SOCK_STATS_MAP, STATS_MAP,
    },
    CtEvent, Reason, IPPROTO_UDP,
};
use rustc_hash::FxHashMap;

use super::{
    map_err, monotonic_ns,
    raw::{next_key, Batches, ElemCount},
    Capacity, CtEvents, DataplaneError,
};

/// Entries read per syscall by the census: 4,096 keys and values of 104 bytes, 416 KiB.
const CENSUS_BATCH: usize = 4_096;

/// What a walk of the connection table found: see [`Reader::census`].
#[derive(Clone, Debug, Default)]
pub struct Census {
    /// Entries in the confirmed table (two per connection).
    pub entries: u64,
    /// Entries in the unconfirmed table.
    pub unconfirmed: u64,
    /// Live connections per backend id.
    pub live: StdHashMap<u32, u64>,
}

/// Read-only handles on the maps that are read in bulk.
pub struct Reader {
    capacity: Capacity,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    slots: Array<MapData, SlotTable>,
    maglev: HashMap<MapData, u32, MaglevTable>,
    backends: Array<MapData, Backend>,
    cursors: PerCpuArray<MapData, u64>,
    stats: PerCpuArray<MapData, u64>,
    service_stats: PerCpuArray<MapData, TrafficCounters>,
    backend_stats: PerCpuArray<MapData, TrafficCounters>,
    backend_signals: PerCpuArray<MapData, BackendSignals>,
    backend_down: Array<MapData, u32>,
    conntrack: HashMap<MapData, FlowKey, FlowValue>,
    conntrack_new: HashMap<MapData, FlowKey, FlowValue>,
    ct_events: PerCpuArray<MapData, u64>,
    ct_new_ops: PerCpuArray<MapData, u64>,
    sock_stats: PerCpuArray<MapData, u64>,
    /// Counts the unconfirmed table's elements; `None` where the kernel cannot.
    ct_new_count: Option<ElemCount>,
    /// The highest eviction figure reported, which later ones never go below.
    evicted_high: AtomicU64,
}

/// The maps a [`Reader`] is opened on, as the data plane holds them.
pub(super) struct Sources<'a> {
    pub services: &'a HashMap<MapData, ServiceKey, ServiceValue>,
    pub slots: &'a Array<MapData, SlotTable>,
    pub maglev: &'a HashMap<MapData, u32, MaglevTable>,
    pub backends: &'a Array<MapData, Backend>,
    pub cursors: &'a PerCpuArray<MapData, u64>,
    pub stats: &'a PerCpuArray<MapData, u64>,
    pub service_stats: &'a PerCpuArray<MapData, TrafficCounters>,
    pub backend_stats: &'a PerCpuArray<MapData, TrafficCounters>,
    pub backend_signals: &'a PerCpuArray<MapData, BackendSignals>,
    pub backend_down: &'a Array<MapData, u32>,
    pub conntrack: &'a HashMap<MapData, FlowKey, FlowValue>,
    pub conntrack_new: &'a HashMap<MapData, FlowKey, FlowValue>,
    pub ct_events: &'a PerCpuArray<MapData, u64>,
    pub ct_new_ops: &'a PerCpuArray<MapData, u64>,
    pub sock_stats: &'a PerCpuArray<MapData, u64>,
}

/// A second handle on the kernel map behind `data`: a duplicated file descriptor.
fn dup<T: TryFrom<Map, Error = MapError>>(
    data: &MapData,
    wrap: fn(MapData) -> Map,
    name: &'static str,
) -> Result<T, DataplaneError> {
    let fd = data
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| map_err(name)(MapError::IoError(e)))?;
    let data = MapData::from_fd(fd).map_err(map_err(name))?;
    T::try_from(wrap(data)).map_err(map_err(name))
}

impl Reader {
    pub(super) fn open(
        m: Sources<'_>,
        capacity: Capacity,
        ct_new_count: Option<ElemCount>,
    ) -> Result<Reader, DataplaneError> {
        Ok(Reader {
            capacity,
            services: dup(m.services.map(), Map::HashMap, SERVICES_MAP)?,
            slots: dup(m.slots.map(), Map::Array, SLOTS_MAP)?,
            maglev: dup(m.maglev.map(), Map::HashMap, MAGLEV_MAP)?,
            backends: dup(m.backends.map(), Map::Array, BACKENDS_MAP)?,
            cursors: dup(m.cursors.map(), Map::PerCpuArray, CURSORS_MAP)?,
            stats: dup(m.stats.map(), Map::PerCpuArray, STATS_MAP)?,
            service_stats: dup(m.service_stats.map(), Map::PerCpuArray, SERVICE_STATS_MAP)?,
            backend_stats: dup(m.backend_stats.map(), Map::PerCpuArray, BACKEND_STATS_MAP)?,
            backend_signals: dup(
                m.backend_signals.map(),
                Map::PerCpuArray,
                BACKEND_SIGNALS_MAP,
            )?,
            backend_down: dup(m.backend_down.map(), Map::Array, BACKEND_DOWN_MAP)?,
            conntrack: dup(m.conntrack.map(), Map::HashMap, CONNTRACK_MAP)?,
            conntrack_new: dup(m.conntrack_new.map(), Map::LruHashMap, CONNTRACK_NEW_MAP)?,
            ct_events: dup(m.ct_events.map(), Map::PerCpuArray, CT_EVENTS_MAP)?,
            ct_new_ops: dup(m.ct_new_ops.map(), Map::PerCpuArray, CT_NEW_OPS_MAP)?,
            sock_stats: dup(m.sock_stats.map(), Map::PerCpuArray, SOCK_STATS_MAP)?,
            ct_new_count,
            evicted_high: AtomicU64::new(0),
        })
    }

    /// Whether the kernel counts the unconfirmed table's elements (see
    /// [`Reader::unconfirmed_len`]).
    pub fn counts_unconfirmed(&self) -> bool {
        self.ct_new_count.is_some()
    }

    /// The services-map entry of `key`, if the service is installed.
    pub fn service_entry(&self, key: &ServiceKey) -> Result<Option<ServiceValue>, DataplaneError> {
        match self.services.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(SERVICES_MAP)(e)),
        }
    }

    /// Slot table `index` (see `orch_common::maps::slot_table_index`).
    pub fn slot_table(&self, index: u32) -> Result<SlotTable, DataplaneError> {
        self.slots.get(&index, 0).map_err(map_err(SLOTS_MAP))
    }

    /// Maglev table `index`, if there is one.
    pub fn maglev_table(&self, index: u32) -> Result<Option<Box<MaglevTable>>, DataplaneError> {
        match self.maglev.get(&index, 0) {
            Ok(t) => Ok(Some(Box::new(t))),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(MAGLEV_MAP)(e)),
        }
    }

    /// Service `id`'s new-connection cursor on every CPU, in CPU order.
    pub fn cursors(&self, id: u32) -> Result<Vec<u64>, DataplaneError> {
        let per_cpu = self.cursors.get(&id, 0).map_err(map_err(CURSORS_MAP))?;
        Ok(per_cpu.iter().copied().collect())
    }

    /// Backend entry `id`.
    pub fn backend_entry(&self, id: u32) -> Result<Backend, DataplaneError> {
        self.backends.get(&id, 0).map_err(map_err(BACKENDS_MAP))
    }

    /// Socket-level balancing's counters summed over CPUs, in [`SockEvent::ALL`] order.
    pub fn sock_counts(&self) -> Result<Vec<(SockEvent, u64)>, DataplaneError> {
        SockEvent::ALL
            .iter()
            .map(|&e| {
                let per_cpu = self
                    .sock_stats
                    .get(&(e as u32), 0)
                    .map_err(map_err(SOCK_STATS_MAP))?;
                Ok((e, per_cpu.iter().sum()))
            })
            .collect()
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

    /// The passive signals of backend `id`, summed over CPUs.
    pub fn backend_signals(&self, id: u32) -> Result<BackendSignals, DataplaneError> {
        let per_cpu = self
            .backend_signals
            .get(&id, 0)
            .map_err(map_err(BACKEND_SIGNALS_MAP))?;
        let mut total = BackendSignals::default();
        for s in per_cpu.iter() {
            total.add(s);
        }
        Ok(total)
    }

    /// Whether the data plane ejected backend `id` (it refused a connection).
    pub fn ejected(&self, id: u32) -> Result<bool, DataplaneError> {
        Ok(self
            .backend_down
            .get(&id, 0)
            .map_err(map_err(BACKEND_DOWN_MAP))?
            != 0)
    }

    /// The connection-table entry for `key`, if any, confirmed or not.
    pub fn flow(&self, key: &FlowKey) -> Result<Option<FlowValue>, DataplaneError> {
        for (map, name) in [
            (&self.conntrack, CONNTRACK_MAP),
            (&self.conntrack_new, CONNTRACK_NEW_MAP),
        ] {
            match map.get(key, 0) {
                Ok(v) => return Ok(Some(v)),
                Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(name)(e)),
            }
        }
        Ok(None)
    }

    /// Whether `key`'s entry is in the confirmed table.
    pub fn confirmed(&self, key: &FlowKey) -> Result<bool, DataplaneError> {
        match self.conntrack.get(key, 0) {
            Ok(_) => Ok(true),
            Err(MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(map_err(CONNTRACK_MAP)(e)),
        }
    }

    /// The unconfirmed table's element count, exact, in one syscall; `None` where the
    /// kernel cannot count it (before Linux 6.6).
    pub fn unconfirmed_len(&self) -> Result<Option<u64>, DataplaneError> {
        let Some(c) = &self.ct_new_count else {
            return Ok(None);
        };
        c.read().map(Some).map_err(|e| DataplaneError::Map {
            name: CONNTRACK_NEW_MAP,
            source: MapError::IoError(e),
        })
    }

    /// One unconfirmed-table counter, summed over CPUs (wrapping: the program's removal
    /// count dips below zero on a CPU whose removals another CPU's entries).
    pub(super) fn ct_new_op(&self, slot: u32) -> Result<u64, DataplaneError> {
        let v = self
            .ct_new_ops
            .get(&slot, 0)
            .map_err(map_err(CT_NEW_OPS_MAP))?;
        Ok(v.iter().fold(0u64, |a, b| a.wrapping_add(*b)))
    }

    /// The evictions so far (see [`CtEvents::evicted`]). The program's insertions are read
    /// first and its removals last: an insertion is counted after its entry is in, a
    /// removal before its entry goes, so whatever happens between the reads makes the
    /// figure low, not high.
    fn evicted(&self) -> Result<Option<u64>, DataplaneError> {
        if self.ct_new_count.is_none() {
            return Ok(None);
        }
        let inserted = self.ct_new_op(CT_NEW_INSERTED)?;
        let Some(present) = self.unconfirmed_len()? else {
            return Ok(None);
        };
        let removed = self.ct_new_op(CT_NEW_REMOVED)?;
        let expired = self.ct_new_op(CT_NEW_EXPIRED)?;
        let adopted = self.ct_new_op(CT_NEW_ADOPTED)?;
        let gone = inserted
            .wrapping_add(adopted)
            .wrapping_sub(removed)
            .wrapping_sub(expired)
            .wrapping_sub(present) as i64;
        let high = self
            .evicted_high
            .fetch_max(gone.max(0) as u64, Ordering::Relaxed)
            .max(gone.max(0) as u64);
        Ok(Some(high))
    }

    /// The connection-table events the program counted, summed over CPUs.
    pub fn ct_events(&self) -> Result<CtEvents, DataplaneError> {
        let read = |e: CtEvent| -> Result<u64, DataplaneError> {
            let v = self
                .ct_events
                .get(&(e as u32), 0)
                .map_err(map_err(CT_EVENTS_MAP))?;
            Ok(v.iter().sum())
        };
        Ok(CtEvents {
            confirmed: read(CtEvent::Confirmed)?,
            confirm_failed: read(CtEvent::ConfirmFailed)?,
            reply_collisions: read(CtEvent::ReplyCollision)?,
            evicted: self.evicted()?,
        })
    }

    /// The connection tables' occupancy, and the live connections per backend id: confirmed
    /// TCP connections until a RST or both FINs, confirmed UDP flows until their idle timeout
    /// (`udp_idle_ns`). A connection needs both its entries to carry traffic, so one whose
    /// reply entry is gone is not live. Connections whose ends vanished without a FIN or RST
    /// stay counted until they expire; callers that wait on this use a timeout.
    ///
    /// The table is read in batches ([`Batches`]: bucket by bucket, so churn cannot send the
    /// walk back to the start), a few hundred kilobytes at a time, with no syscall per
    /// entry: a connection's two entries are paired in memory, each waiting under a 64-bit
    /// hash of the connection for the other (about 32 bytes with the map's own, at most one
    /// per connection: under 70 MB for a table of 4 million entries, given back when the walk
    /// ends). About half
    /// a second per million entries, which is why the daemon runs it on a thread of its own.
    ///
    /// The unconfirmed table (handshakes in flight; under a flood, full) is only counted:
    /// exactly, in one syscall, where the kernel can ([`Reader::unconfirmed_len`]), else
    /// key by key.
    pub fn census(&self, udp_idle_ns: u64) -> Result<Census, DataplaneError> {
        let now = monotonic_ns();
        let mut entries = 0u64;
        let mut live = StdHashMap::new();
        // Each connection's two entries meet here, under the hash of its reply key: the
        // first one met waits for the other (a connection missing one is not live).
        let mut waiting: FxHashMap<u64, Half> = FxHashMap::default();
        let read_err = |e| map_err(CONNTRACK_MAP)(MapError::IoError(e));
        let mut walk: Batches<'_, FlowKey, FlowValue> =
            Batches::new(self.conntrack.map().fd().as_fd(), CENSUS_BATCH);
        loop {
            let n = walk.next_batch().map_err(read_err)?;
            if n == 0 {
                break;
            }
            entries += n as u64;
            for (key, value) in walk.keys[..n].iter().zip(&walk.values[..n]) {
                let (pair, half) = if key.dir == DIR_FORWARD {
                    let udp_live = key.proto == IPPROTO_UDP
                        && now.saturating_sub(value.last_seen_ns) <= udp_idle_ns;
                    let reply = key.reply(value.nat_addr, value.nat_port_be);
                    (pair_of(&reply), Half::forward(value, key.proto, udp_live))
                } else {
                    (pair_of(key), Half::reply(value))
                };
                match waiting.remove(&pair) {
                    None => {
                        waiting.insert(pair, half);
                    }
                    Some(other) => {
                        let (forward, reply) = if half.forward {
                            (half, other)
                        } else {
                            (other, half)
                        };
                        if forward.forward && !reply.forward && forward.live_with(&reply) {
                            *live.entry(forward.backend_id).or_insert(0) += 1;
                        }
                    }
                }
            }
        }
        let unconfirmed = match self.unconfirmed_len()? {
            Some(n) => n,
            None => self.unconfirmed_keys()?,
        };
        Ok(Census {
            entries: entries.min(u64::from(self.capacity.conntrack)),
            unconfirmed,
            live,
        })
    }

    /// The unconfirmed table's keys, counted one syscall each, up to its capacity. Exact
    /// only while the table is still: see [`Reader::census`].
    pub fn unconfirmed_keys(&self) -> Result<u64, DataplaneError> {
        let capacity = u64::from(self.capacity.conntrack_new);
        let fd = self.conntrack_new.map().fd().as_fd();
        let (mut n, mut key) = (0u64, None);
        while n < capacity {
            match next_key(fd, key.as_ref()).map_err(|e| DataplaneError::Map {
                name: CONNTRACK_NEW_MAP,
                source: MapError::IoError(e),
            })? {
                Some(k) => {
                    n += 1;
                    key = Some(k);
                }
                None => break,
            }
        }
        Ok(n)
    }
}

/// One entry of a connection, waiting for the other (see [`Reader::census`]): 12 bytes.
#[derive(Clone, Copy)]
struct Half {
    /// [`FlowValue::seen`] of the entry.
    seen: u32,
    backend_id: u32,
    forward: bool,
    udp: bool,
    /// Forward entries of UDP flows: still within the idle timeout.
    udp_live: bool,
}

impl Half {
    fn forward(v: &FlowValue, proto: u8, udp_live: bool) -> Half {
        Half {
            seen: v.seen(),
            backend_id: v.backend_id,
            forward: true,
            udp: proto == IPPROTO_UDP,
            udp_live,
        }
    }

    fn reply(v: &FlowValue) -> Half {
        Half {
            seen: v.seen(),
            backend_id: v.backend_id,
            forward: false,
            udp: false,
            udp_live: false,
        }
    }

    /// Whether the connection whose forward entry is `self` and reply entry `reply` is
    /// live: UDP within its idle timeout; TCP until a RST or both FINs
    /// ([`FlowValue::closed`]).
    fn live_with(&self, reply: &Half) -> bool {
        if self.udp {
            self.udp_live
        } else {
            !FlowValue::closed(self.seen, reply.seen)
        }
    }
}

/// The pairing hash of a connection, from its reply key. Fast rather than strong: the keys
/// are the kernel's own entries, and a collision can only miscount one connection.
fn pair_of(reply: &FlowKey) -> u64 {
    use std::hash::BuildHasher;
    rustc_hash::FxBuildHasher.hash_one(reply)
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
