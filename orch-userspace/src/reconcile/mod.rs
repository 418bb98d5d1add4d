//! The reconciler: the one writer of the data plane's service maps.
//!
//! Given the desired services, it computes what differs from what is installed and writes
//! only that. Ordering rules keep every packet's view consistent:
//! - a service's backend set changes by writing its *inactive* slot table, then replacing
//!   the service value with `active_table` flipped: one map update, so a packet sees the old
//!   set or the new one, never half of each;
//! - backends are written before any table points at them, and their ids are recycled
//!   oldest-first, so a freed id is not reused while recent connections may still count on it;
//! - ports are added to the pre-filter before their services appear and removed after.
//!
//! Capacity is checked before the first write: a change that does not fit changes nothing.
//!
//! The maps are the record of what is installed. A restarted daemon does not start from
//! nothing: [`Reconciler::adopt`] reads the pinned maps back (services, their active tables,
//! the backends that name them), keeps every id where it is, and the first `apply` then
//! writes only what changed while the daemon was away. Connections never notice the restart.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
};

use orch_common::{
    maps::{
        slot_table_index, Backend as MapBackend, BackendKey, MaglevReply, MaglevTable, PortBitmap,
        ServiceValue, SlotTable, PORTS_BACKEND, PORTS_VIP, SERVICE_MAGLEV,
    },
    MAGLEV_SIZE,
};
use tracing::{debug, info, warn};

mod ids;
pub mod maglev;
pub mod wrr;

use ids::IdPool;

use crate::{
    dataplane::{
        codec::{addr_words, service_addr, service_key, words_addr},
        MapReader, MapWriter,
    },
    model::{Scheduler, Service, ServiceAddr},
};

/// Why a desired state could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("{needed} services do not fit the data plane's capacity of {max}")]
    TooManyServices { needed: usize, max: u32 },
    #[error("{needed} backends do not fit the data plane's capacity of {max}")]
    TooManyBackends { needed: usize, max: u32 },
    #[error("writing the data plane maps failed")]
    Write(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("reading the data plane maps back failed")]
    Read(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// What one `apply` did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
    pub unchanged: usize,
}

/// A service as installed in the maps.
#[derive(Clone, Debug)]
struct Installed {
    id: u32,
    /// For logs; empty for a service adopted from the maps until a desired state names it.
    name: String,
    active_table: u32,
    scheduler: Scheduler,
    /// Every backend of the service (weight 0 included) with its id.
    backends: Vec<(SocketAddr, u32)>,
    /// The active table's backend ids, slot by slot: the round-robin slots, or the Maglev
    /// table.
    slots: Vec<u32>,
}

impl Installed {
    fn backend_id(&self, addr: SocketAddr) -> Option<u32> {
        self.backends
            .iter()
            .find(|(a, _)| *a == addr)
            .map(|(_, id)| *id)
    }

    /// Whether the maps already hold `svc` exactly: the same backends, and the table the
    /// weights give with the ids those backends have.
    fn matches(&self, svc: &Service) -> bool {
        let same_set = self.backends.len() == svc.backends.len()
            && svc
                .backends
                .iter()
                .all(|b| self.backend_id(b.addr).is_some());
        same_set
            && self.scheduler == svc.scheduler
            && slot_ids(svc, |a| self.backend_id(a).expect("same set")) == self.slots
    }
}

/// The table of `svc` (round-robin slots or Maglev's lookup table) as backend ids, given
/// each backend's id.
fn slot_ids(svc: &Service, id_of: impl Fn(SocketAddr) -> u32) -> Vec<u32> {
    let order: Vec<usize> = match svc.scheduler {
        Scheduler::RoundRobin => {
            let weights: Vec<u32> = svc.backends.iter().map(|b| b.weight).collect();
            wrr::slot_order(&weights)
        }
        Scheduler::Maglev => {
            // Named by address, the same on every host: the table is too.
            let named: Vec<(String, u32)> = svc
                .backends
                .iter()
                .map(|b| (b.addr.to_string(), b.weight))
                .collect();
            maglev::table(&named)
                .into_iter()
                .map(|i| i as usize)
                .collect()
        }
    };
    order
        .into_iter()
        .map(|i| id_of(svc.backends[i].addr))
        .collect()
}

fn map_backend(addr: SocketAddr, service_id: u32) -> MapBackend {
    MapBackend {
        addr: addr_words(addr.ip()),
        port_be: addr.port().to_be(),
        _pad: 0,
        service_id,
    }
}

/// Keeps the data plane's maps equal to the desired services.
#[derive(Debug)]
pub struct Reconciler {
    installed: BTreeMap<ServiceAddr, Installed>,
    service_ids: IdPool,
    backend_ids: IdPool,
    ports: [PortBitmap; 2],
    /// The Maglev reply entries written (see [`MaglevReply`]).
    replies: BTreeMap<BackendKey, MaglevReply>,
}

impl Reconciler {
    pub fn new(max_services: u32, max_backends: u32) -> Self {
        Reconciler {
            installed: BTreeMap::new(),
            service_ids: IdPool::new(max_services),
            backend_ids: IdPool::new(max_backends),
            ports: [PortBitmap::default(), PortBitmap::default()],
            replies: BTreeMap::new(),
        }
    }

    /// A reconciler that takes over what a previous daemon left in the maps: every
    /// installed service keeps its id, active table and backend ids, so the next `apply`
    /// writes only real differences.
    pub fn adopt<R: MapReader>(
        max_services: u32,
        max_backends: u32,
        maps: &R,
    ) -> Result<Self, ReconcileError> {
        let read = |e: R::Error| ReconcileError::Read(Box::new(e));
        let mut r = Reconciler::new(max_services, max_backends);
        let backends = maps.backends().map_err(read)?;
        let mut service_ids = BTreeSet::new();
        let mut backend_ids = BTreeSet::new();
        for (key, value) in maps.services().map_err(read)? {
            let Some(addr) = service_addr(&key) else {
                warn!(?key, "ignoring a service entry with an unknown protocol");
                continue;
            };
            if value.id >= max_services {
                warn!(%addr, id = value.id, "ignoring a service entry beyond capacity");
                continue;
            }
            let index = slot_table_index(value.id, value.active_table);
            let (scheduler, slots) = if value.flags & SERVICE_MAGLEV != 0 {
                let table = maps.maglev_table(index).map_err(read)?;
                let slots = table.map_or_else(Vec::new, |t| t.used().to_vec());
                (Scheduler::Maglev, slots)
            } else {
                let table = maps.slot_table(index).map_err(read)?;
                (Scheduler::RoundRobin, table.used().to_vec())
            };
            let own: Vec<(SocketAddr, u32)> = backends
                .iter()
                .filter(|(id, b)| b.service_id == value.id && *id < max_backends)
                .map(|(id, b)| {
                    (
                        SocketAddr::new(words_addr(&b.addr), u16::from_be(b.port_be)),
                        *id,
                    )
                })
                .collect();
            service_ids.insert(value.id);
            backend_ids.extend(own.iter().map(|(_, id)| *id));
            r.installed.insert(
                addr,
                Installed {
                    id: value.id,
                    name: String::new(),
                    active_table: value.active_table,
                    scheduler,
                    backends: own,
                    slots,
                },
            );
        }
        r.service_ids = IdPool::with_used(max_services, &service_ids);
        r.backend_ids = IdPool::with_used(max_backends, &backend_ids);
        r.ports = [
            maps.ports(PORTS_VIP).map_err(read)?,
            maps.ports(PORTS_BACKEND).map_err(read)?,
        ];
        r.replies = maps.maglev_replies().map_err(read)?.into_iter().collect();
        info!(
            services = r.installed.len(),
            backends = backend_ids.len(),
            "adopted the data plane's existing state"
        );
        Ok(r)
    }

    /// How many services are installed.
    pub fn len(&self) -> usize {
        self.installed.len()
    }

    /// Whether no service is installed.
    pub fn is_empty(&self) -> bool {
        self.installed.is_empty()
    }

    /// The data-plane id of the service at `addr`, if installed.
    pub fn service_id(&self, addr: &ServiceAddr) -> Option<u32> {
        self.installed.get(addr).map(|s| s.id)
    }

    /// The data-plane id of backend `backend` of the service at `addr`, if installed.
    pub fn backend_id(&self, addr: &ServiceAddr, backend: SocketAddr) -> Option<u32> {
        self.installed.get(addr)?.backend_id(backend)
    }

    /// Makes the maps hold exactly `desired`. On error nothing was written if the error is a
    /// capacity error; a write error leaves every service either as it was or as desired.
    pub fn apply<W: MapWriter>(
        &mut self,
        w: &mut W,
        desired: &[Service],
    ) -> Result<Summary, ReconcileError> {
        self.check_capacity(desired)?;
        let write = |e: W::Error| ReconcileError::Write(Box::new(e));

        // Pre-filter: the union of old and new ports while services change, then the new set.
        let target = port_sets(desired);
        let union = [
            union(&self.ports[0], &target[0]),
            union(&self.ports[1], &target[1]),
        ];
        self.write_ports(w, &union).map_err(write)?;

        let mut summary = Summary::default();
        for svc in desired {
            match self.installed.get_mut(&svc.addr) {
                Some(old) if old.matches(svc) => {
                    summary.unchanged += 1;
                    if old.name != svc.name {
                        old.name = svc.name.clone();
                    }
                }
                Some(_) => {
                    self.install(w, svc).map_err(write)?;
                    summary.updated += 1;
                }
                None => {
                    self.install(w, svc).map_err(write)?;
                    summary.added += 1;
                }
            }
        }
        let gone: Vec<ServiceAddr> = self
            .installed
            .keys()
            .filter(|a| !desired.iter().any(|s| s.addr == **a))
            .copied()
            .collect();
        for addr in gone {
            w.remove_service(&service_key(&addr)).map_err(write)?;
            let old = self.installed.remove(&addr).expect("present");
            if old.scheduler == Scheduler::Maglev {
                release_maglev_tables(w, old.id).map_err(write)?;
            }
            info!(service = %old.name, %addr, "service removed");
            self.service_ids.release(old.id);
            for (_, id) in &old.backends {
                self.release_backend(w, *id).map_err(write)?;
            }
            summary.removed += 1;
        }

        self.write_replies(w).map_err(write)?;
        self.write_ports(w, &target).map_err(write)?;
        debug!(?summary, "reconciled");
        Ok(summary)
    }

    /// Whether `desired` fits the data plane's capacity; [`Reconciler::apply`] checks the
    /// same before writing. Callers that must decide before committing elsewhere ask first.
    pub fn check(&self, desired: &[Service]) -> Result<(), ReconcileError> {
        self.check_capacity(desired)
    }

    fn check_capacity(&self, desired: &[Service]) -> Result<(), ReconcileError> {
        // Ids of removed services and backends are freed only after the new ones are
        // allocated, so the peak is old + new where they differ.
        let new_services = desired
            .iter()
            .filter(|s| !self.installed.contains_key(&s.addr))
            .count();
        let services_peak = self.service_ids.in_use() + new_services;
        if services_peak > self.service_ids.max as usize {
            return Err(ReconcileError::TooManyServices {
                needed: services_peak,
                max: self.service_ids.max,
            });
        }
        let in_use = self.backend_ids.in_use();
        let new_backends: usize = desired
            .iter()
            .map(|s| match self.installed.get(&s.addr) {
                None => s.backends.len(),
                Some(old) => s
                    .backends
                    .iter()
                    .filter(|b| old.backend_id(b.addr).is_none())
                    .count(),
            })
            .sum();
        if in_use + new_backends > self.backend_ids.max as usize {
            return Err(ReconcileError::TooManyBackends {
                needed: in_use + new_backends,
                max: self.backend_ids.max,
            });
        }
        Ok(())
    }

    /// Writes a new or changed service: backends, then the inactive table, then the flip.
    ///
    /// A failed write leaves the record true to the maps: until the flip, the service's
    /// active table is the old one, and the ids taken for it are given back (their entries
    /// cleared where that still works); from the flip on, the new state is recorded before
    /// the old backends are freed. Applying the previous desired state again after a
    /// failure therefore restores the maps exactly (a reload's rollback counts on it).
    fn install<W: MapWriter>(&mut self, w: &mut W, svc: &Service) -> Result<(), W::Error> {
        let old = self.installed.get(&svc.addr).cloned();
        let mut fresh_service = None;
        let mut fresh_backends = Vec::new();
        let written = self.write_service(
            w,
            svc,
            old.as_ref(),
            &mut fresh_service,
            &mut fresh_backends,
        );
        let installed = match written {
            Ok(done) => done,
            Err(e) => {
                for bid in fresh_backends {
                    // Best effort: the entry may stay written, but no table names it.
                    if self.release_backend(w, bid).is_err() {
                        self.backend_ids.release(bid);
                    }
                }
                if let Some(id) = fresh_service {
                    self.service_ids.release(id);
                }
                return Err(e);
            }
        };
        info!(
            service = %svc.name,
            addr = %svc.addr,
            backends = installed.backends.len(),
            slots = installed.slots.len(),
            "service {}",
            if old.is_some() { "updated" } else { "added" }
        );
        let kept: Vec<SocketAddr> = installed.backends.iter().map(|(a, _)| *a).collect();
        self.installed.insert(svc.addr, installed);
        if let Some(o) = &old {
            for (addr, bid) in &o.backends {
                if !kept.contains(addr) {
                    self.release_backend(w, *bid)?;
                }
            }
        }
        Ok(())
    }

    /// The writes of [`Reconciler::install`] up to the flip; returns what is installed then.
    fn write_service<W: MapWriter>(
        &mut self,
        w: &mut W,
        svc: &Service,
        old: Option<&Installed>,
        fresh_service: &mut Option<u32>,
        fresh_backends: &mut Vec<u32>,
    ) -> Result<Installed, W::Error> {
        let id = match old {
            Some(o) => o.id,
            None => {
                let id = self.service_ids.alloc();
                *fresh_service = Some(id);
                w.zero_service_counters(id)?;
                id
            }
        };
        let mut backends = Vec::with_capacity(svc.backends.len());
        for b in &svc.backends {
            let bid = match old.and_then(|o| o.backend_id(b.addr)) {
                Some(bid) => bid,
                None => {
                    let bid = self.backend_ids.alloc();
                    fresh_backends.push(bid);
                    w.set_backend(bid, &map_backend(b.addr, id))?;
                    bid
                }
            };
            backends.push((b.addr, bid));
        }

        let slots = slot_ids(svc, |a| {
            backends
                .iter()
                .find(|(b, _)| *b == a)
                .map(|(_, id)| *id)
                .expect("every backend has an id")
        });
        let active_table = match old {
            Some(o) => 1 - o.active_table,
            None => 0,
        };
        let index = slot_table_index(id, active_table);
        let flags = match svc.scheduler {
            Scheduler::RoundRobin => {
                let mut table = SlotTable {
                    len: slots.len() as u32,
                    ..SlotTable::default()
                };
                table.backend_ids[..slots.len()].copy_from_slice(&slots);
                w.set_slot_table(index, &table)?;
                0
            }
            Scheduler::Maglev => {
                // 64 KiB: on the heap.
                let mut table = Box::<MaglevTable>::default();
                if slots.len() == MAGLEV_SIZE as usize {
                    table.len = MAGLEV_SIZE;
                    table.backend_ids.copy_from_slice(&slots);
                }
                w.set_maglev_table(index, &table)?;
                SERVICE_MAGLEV
            }
        };
        w.set_service(
            &service_key(&svc.addr),
            &ServiceValue {
                id,
                active_table,
                flags,
                _pad: 0,
            },
        )?;
        if svc.scheduler == Scheduler::RoundRobin
            && old.is_some_and(|o| o.scheduler == Scheduler::Maglev)
        {
            // Switched away from Maglev: its tables' memory goes back.
            release_maglev_tables(w, id)?;
        }
        Ok(Installed {
            id,
            name: svc.name.clone(),
            active_table,
            scheduler: svc.scheduler,
            backends,
            slots,
        })
    }

    /// Frees a backend id once no table points at it. The entry is cleared so that a
    /// restarted daemon does not count it as a backend of the service it belonged to;
    /// established connections do not read it (their entries hold the address).
    fn release_backend<W: MapWriter>(&mut self, w: &mut W, id: u32) -> Result<(), W::Error> {
        w.set_backend(id, &MapBackend::FREE)?;
        self.backend_ids.release(id);
        Ok(())
    }

    /// Brings the Maglev reply entries in line with the installed services: one for each
    /// backend address, port and protocol that exactly one service uses, a Maglev one (for
    /// two services, translating a stray reply would guess the VIP).
    fn write_replies<W: MapWriter>(&mut self, w: &mut W) -> Result<(), W::Error> {
        let mut users: BTreeMap<BackendKey, Vec<(Scheduler, MaglevReply)>> = BTreeMap::new();
        for (addr, s) in &self.installed {
            for (b, bid) in &s.backends {
                let key = BackendKey {
                    addr: addr_words(b.ip()),
                    port_be: b.port().to_be(),
                    proto: addr.protocol.number(),
                    _pad: 0,
                };
                let reply = MaglevReply {
                    vip: addr_words(addr.vip),
                    port_be: addr.port.to_be(),
                    _pad: 0,
                    service_id: s.id,
                    backend_id: *bid,
                };
                users.entry(key).or_default().push((s.scheduler, reply));
            }
        }
        let desired: BTreeMap<BackendKey, MaglevReply> = users
            .into_iter()
            .filter_map(|(k, v)| match v.as_slice() {
                [(Scheduler::Maglev, reply)] => Some((k, *reply)),
                _ => None,
            })
            .collect();
        let gone: Vec<BackendKey> = self
            .replies
            .keys()
            .filter(|k| !desired.contains_key(k))
            .copied()
            .collect();
        for k in gone {
            w.remove_maglev_reply(&k)?;
            self.replies.remove(&k);
        }
        for (k, v) in desired {
            if self.replies.get(&k) != Some(&v) {
                w.set_maglev_reply(&k, &v)?;
                self.replies.insert(k, v);
            }
        }
        Ok(())
    }

    fn write_ports<W: MapWriter>(
        &mut self,
        w: &mut W,
        ports: &[PortBitmap; 2],
    ) -> Result<(), W::Error> {
        for (index, which) in [PORTS_VIP, PORTS_BACKEND].into_iter().enumerate() {
            if self.ports[index] != ports[index] {
                w.set_ports(which, &ports[index])?;
                self.ports[index] = ports[index];
            }
        }
        Ok(())
    }
}

/// Removes both Maglev tables of service `id` (their memory is allocated per entry).
fn release_maglev_tables<W: MapWriter>(w: &mut W, id: u32) -> Result<(), W::Error> {
    for table in 0..2 {
        w.remove_maglev_table(slot_table_index(id, table))?;
    }
    Ok(())
}

fn port_sets(services: &[Service]) -> [PortBitmap; 2] {
    let mut sets = [PortBitmap::default(), PortBitmap::default()];
    for svc in services {
        sets[0].insert(svc.addr.port);
        for b in &svc.backends {
            sets[1].insert(b.addr.port());
        }
    }
    sets
}

fn union(a: &PortBitmap, b: &PortBitmap) -> PortBitmap {
    let mut out = *a;
    for (o, w) in out.words.iter_mut().zip(&b.words) {
        *o |= w;
    }
    out
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, convert::Infallible, io};

    use super::*;
    use crate::model::{Backend, Protocol};
    use orch_common::maps::ServiceKey;

    /// Records every write, in order, and keeps the resulting map contents.
    #[derive(Default)]
    struct FakeMaps {
        log: Vec<String>,
        services: HashMap<ServiceKey, ServiceValue>,
        slots: HashMap<u32, SlotTable>,
        maglev: HashMap<u32, Box<MaglevTable>>,
        replies: HashMap<BackendKey, MaglevReply>,
        backends: HashMap<u32, MapBackend>,
        ports: HashMap<u32, PortBitmap>,
        /// Writes so far, and the one that fails (counting from 0), if any.
        writes: usize,
        fail_at: Option<usize>,
    }

    impl FakeMaps {
        /// Counts a write; the one chosen to fail does, before it changes anything.
        fn write(&mut self) -> Result<(), io::Error> {
            let n = self.writes;
            self.writes += 1;
            if self.fail_at == Some(n) {
                return Err(io::Error::other(format!("write {n} fails")));
            }
            Ok(())
        }
    }

    impl MapWriter for FakeMaps {
        type Error = io::Error;
        fn set_backend(&mut self, id: u32, b: &MapBackend) -> Result<(), io::Error> {
            self.write()?;
            if b.in_use() {
                self.log.push(format!("backend {id}"));
            } else {
                self.log.push(format!("free backend {id}"));
            }
            self.backends.insert(id, *b);
            Ok(())
        }
        fn set_slot_table(&mut self, index: u32, t: &SlotTable) -> Result<(), io::Error> {
            self.write()?;
            self.log.push(format!("slots {index}"));
            self.slots.insert(index, *t);
            Ok(())
        }
        fn set_maglev_table(&mut self, index: u32, t: &MaglevTable) -> Result<(), io::Error> {
            self.write()?;
            self.log.push(format!("maglev {index}"));
            self.maglev.insert(index, Box::new(*t));
            Ok(())
        }
        fn remove_maglev_table(&mut self, index: u32) -> Result<(), io::Error> {
            self.write()?;
            self.log.push(format!("remove maglev {index}"));
            self.maglev.remove(&index);
            Ok(())
        }
        fn set_maglev_reply(&mut self, k: &BackendKey, v: &MaglevReply) -> Result<(), io::Error> {
            self.write()?;
            self.log.push(format!("reply {}", u16::from_be(k.port_be)));
            self.replies.insert(*k, *v);
            Ok(())
        }
        fn remove_maglev_reply(&mut self, k: &BackendKey) -> Result<(), io::Error> {
            self.write()?;
            self.log
                .push(format!("remove reply {}", u16::from_be(k.port_be)));
            self.replies.remove(k);
            Ok(())
        }
        fn set_service(&mut self, k: &ServiceKey, v: &ServiceValue) -> Result<(), io::Error> {
            self.write()?;
            self.log
                .push(format!("service {} table {}", v.id, v.active_table));
            self.services.insert(*k, *v);
            Ok(())
        }
        fn remove_service(&mut self, k: &ServiceKey) -> Result<(), io::Error> {
            self.write()?;
            self.log.push("remove service".into());
            self.services.remove(k);
            Ok(())
        }
        fn set_ports(&mut self, index: u32, p: &PortBitmap) -> Result<(), io::Error> {
            self.write()?;
            self.log.push(format!("ports {index}"));
            self.ports.insert(index, *p);
            Ok(())
        }
        fn zero_service_counters(&mut self, id: u32) -> Result<(), io::Error> {
            self.write()?;
            self.log.push(format!("zero service {id}"));
            Ok(())
        }
    }

    impl MapReader for FakeMaps {
        type Error = Infallible;
        fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, Infallible> {
            Ok(self.services.iter().map(|(k, v)| (*k, *v)).collect())
        }
        fn slot_table(&self, index: u32) -> Result<SlotTable, Infallible> {
            Ok(self.slots.get(&index).copied().unwrap_or_default())
        }
        fn maglev_table(&self, index: u32) -> Result<Option<Box<MaglevTable>>, Infallible> {
            Ok(self.maglev.get(&index).cloned())
        }
        fn maglev_replies(&self) -> Result<Vec<(BackendKey, MaglevReply)>, Infallible> {
            Ok(self.replies.iter().map(|(k, v)| (*k, *v)).collect())
        }
        fn backends(&self) -> Result<Vec<(u32, MapBackend)>, Infallible> {
            Ok(self
                .backends
                .iter()
                .filter(|(_, b)| b.in_use())
                .map(|(id, b)| (*id, *b))
                .collect())
        }
        fn ports(&self, index: u32) -> Result<PortBitmap, Infallible> {
            Ok(self.ports.get(&index).copied().unwrap_or_default())
        }
    }

    impl FakeMaps {
        /// The backend addresses new connections would cycle through, as the kernel walks them.
        fn rotation(&self, addr: &ServiceAddr) -> Vec<SocketAddr> {
            let v = self.services[&service_key(addr)];
            let t = &self.slots[&slot_table_index(v.id, v.active_table)];
            t.used()
                .iter()
                .map(|id| {
                    let b = self.backends[id];
                    SocketAddr::new(words_addr(&b.addr), u16::from_be(b.port_be))
                })
                .collect()
        }
    }

    fn svc(name: &str, port: u16, backends: &[(&str, u32)]) -> Service {
        Service {
            name: name.into(),
            check: Default::default(),
            scheduler: Default::default(),
            addr: ServiceAddr {
                vip: "198.19.0.1".parse().unwrap(),
                port,
                protocol: Protocol::Tcp,
            },
            backends: backends
                .iter()
                .map(|(a, w)| Backend::new(a.parse().unwrap(), *w))
                .collect(),
        }
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn new_service_is_written_backends_first_then_table_then_service() {
        let mut r = Reconciler::new(4, 8);
        let mut m = FakeMaps::default();
        let web = svc("web", 80, &[("198.18.1.2:8080", 1), ("198.18.2.2:8080", 2)]);
        let s = r.apply(&mut m, std::slice::from_ref(&web)).unwrap();
        assert_eq!(s.added, 1);
        assert_eq!(
            m.log,
            [
                "ports 0",
                "ports 1",
                // A fresh id's counters start at zero before any packet can reach it.
                "zero service 0",
                "backend 0",
                "backend 1",
                "slots 0",
                "service 0 table 0"
            ]
        );
        assert_eq!(
            m.rotation(&web.addr),
            [
                sa("198.18.2.2:8080"),
                sa("198.18.1.2:8080"),
                sa("198.18.2.2:8080")
            ]
        );
        assert!(m.ports[&PORTS_VIP].contains(80));
        assert!(m.ports[&PORTS_BACKEND].contains(8080));
    }

    #[test]
    fn unchanged_state_writes_nothing() {
        let mut r = Reconciler::new(4, 8);
        let mut m = FakeMaps::default();
        let web = [svc("web", 80, &[("198.18.1.2:8080", 1)])];
        r.apply(&mut m, &web).unwrap();
        m.log.clear();
        let s = r.apply(&mut m, &web).unwrap();
        assert_eq!(s.unchanged, 1);
        assert!(m.log.is_empty(), "{:?}", m.log);
    }

    #[test]
    fn backend_change_flips_to_the_other_table_and_keeps_ids() {
        let mut r = Reconciler::new(4, 4);
        let mut m = FakeMaps::default();
        r.apply(
            &mut m,
            &[svc(
                "web",
                80,
                &[("198.18.1.2:8080", 1), ("198.18.2.2:8080", 1)],
            )],
        )
        .unwrap();
        m.log.clear();
        let web = svc("web", 80, &[("198.18.2.2:8080", 1), ("198.18.3.2:8080", 1)]);
        let s = r.apply(&mut m, std::slice::from_ref(&web)).unwrap();
        assert_eq!(s.updated, 1);
        // Only the new backend is written; the table goes to slot table 1, then the flip,
        // and only then is the dropped backend's entry freed.
        assert_eq!(
            m.log,
            [
                "backend 2",
                "slots 1",
                "service 0 table 1",
                "free backend 0"
            ]
        );
        assert_eq!(
            m.rotation(&web.addr),
            [sa("198.18.2.2:8080"), sa("198.18.3.2:8080")]
        );
        assert_eq!(r.backend_id(&web.addr, sa("198.18.2.2:8080")), Some(1));
        // Fresh ids go first (3), the freed id 0 only once the space is used up (capacity 4).
        m.log.clear();
        let more = |extra: &[(&str, u32)]| {
            let mut b = vec![("198.18.2.2:8080", 1), ("198.18.3.2:8080", 1)];
            b.extend_from_slice(extra);
            svc("web", 80, &b)
        };
        r.apply(&mut m, &[more(&[("198.18.4.2:8080", 1)])]).unwrap();
        assert_eq!(m.log, ["backend 3", "slots 0", "service 0 table 0"]);
        m.log.clear();
        r.apply(
            &mut m,
            &[more(&[("198.18.4.2:8080", 1), ("198.18.5.2:8080", 1)])],
        )
        .unwrap();
        assert_eq!(m.log[0], "backend 0");
    }

    #[test]
    fn weight_zero_leaves_backend_out_of_rotation() {
        let mut r = Reconciler::new(4, 8);
        let mut m = FakeMaps::default();
        let web = svc("web", 80, &[("198.18.1.2:8080", 0), ("198.18.2.2:8080", 1)]);
        r.apply(&mut m, std::slice::from_ref(&web)).unwrap();
        assert_eq!(m.rotation(&web.addr), [sa("198.18.2.2:8080")]);
        let none = svc("web", 80, &[("198.18.1.2:8080", 0)]);
        r.apply(&mut m, std::slice::from_ref(&none)).unwrap();
        assert!(m.rotation(&none.addr).is_empty());
    }

    #[test]
    fn removed_service_is_deleted_and_its_port_leaves_the_filter_last() {
        let mut r = Reconciler::new(4, 8);
        let mut m = FakeMaps::default();
        r.apply(
            &mut m,
            &[
                svc("web", 80, &[("198.18.1.2:8080", 1)]),
                svc("dns", 53, &[("198.18.1.2:5353", 1)]),
            ],
        )
        .unwrap();
        m.log.clear();
        let s = r
            .apply(&mut m, &[svc("web", 80, &[("198.18.1.2:8080", 1)])])
            .unwrap();
        assert_eq!(s.removed, 1);
        assert_eq!(
            m.log,
            ["remove service", "free backend 1", "ports 0", "ports 1"]
        );
        assert!(!m.ports[&PORTS_VIP].contains(53));
        assert!(m.ports[&PORTS_VIP].contains(80));
        assert_eq!(m.services.len(), 1);
    }

    #[test]
    fn over_capacity_changes_nothing() {
        let mut r = Reconciler::new(1, 2);
        let mut m = FakeMaps::default();
        let e = r
            .apply(&mut m, &[svc("a", 80, &[]), svc("b", 81, &[])])
            .unwrap_err();
        assert!(
            matches!(e, ReconcileError::TooManyServices { needed: 2, max: 1 }),
            "{e}"
        );
        let e = r
            .apply(
                &mut m,
                &[svc(
                    "a",
                    80,
                    &[
                        ("198.18.1.2:1", 1),
                        ("198.18.1.3:1", 1),
                        ("198.18.1.4:1", 1),
                    ],
                )],
            )
            .unwrap_err();
        assert!(
            matches!(e, ReconcileError::TooManyBackends { needed: 3, max: 2 }),
            "{e}"
        );
        assert!(m.log.is_empty(), "{:?}", m.log);
    }

    /// Every service's address and rotation in `m`, sorted, and the port filters.
    fn installed_state(m: &FakeMaps) -> (Vec<(ServiceAddr, Vec<SocketAddr>)>, Vec<PortBitmap>) {
        let mut services: Vec<(ServiceAddr, Vec<SocketAddr>)> = m
            .services
            .keys()
            .map(|k| {
                let addr = service_addr(k).unwrap();
                (addr, m.rotation(&addr))
            })
            .collect();
        services.sort_by_key(|(a, _)| a.to_string());
        let ports = [PORTS_VIP, PORTS_BACKEND]
            .iter()
            .map(|i| m.ports.get(i).copied().unwrap_or_default())
            .collect();
        (services, ports)
    }

    #[test]
    fn a_write_failing_anywhere_leaves_a_record_that_rolls_back_exactly() {
        let before = mixed();
        // A change of every kind: a service updated (a backend gone, one new), one removed,
        // one added.
        let mut after = mixed();
        after[0].backends.remove(1);
        after[0]
            .backends
            .push(Backend::new(sa("198.18.4.2:8080"), 2));
        after.remove(1);
        after.push(svc("api", 443, &[("198.18.5.2:443", 1)]));
        let (want_before, want_after, writes) = {
            let mut r = Reconciler::new(16, 64);
            let mut m = FakeMaps::default();
            r.apply(&mut m, &before).unwrap();
            let at = m.writes;
            let b = installed_state(&m);
            r.apply(&mut m, &after).unwrap();
            (b, installed_state(&m), m.writes - at)
        };
        assert!(writes >= 8, "{writes} writes");
        for n in 0..writes {
            let mut r = Reconciler::new(16, 64);
            let mut m = FakeMaps::default();
            r.apply(&mut m, &before).unwrap();
            m.fail_at = Some(m.writes + n);
            assert!(r.apply(&mut m, &after).is_err(), "write {n} should fail");
            r.apply(&mut m, &before)
                .unwrap_or_else(|e| panic!("rolling back after write {n} failed: {e}"));
            assert_eq!(
                installed_state(&m),
                want_before,
                "rolled back after write {n}"
            );
            // The record is still true: the change applies cleanly afterwards.
            r.apply(&mut m, &after).unwrap();
            assert_eq!(installed_state(&m), want_after, "reapplied after write {n}");
        }
    }

    fn mixed() -> Vec<Service> {
        let mut v6 = svc(
            "web6",
            80,
            &[("[2001:db8:1::2]:8080", 1), ("[2001:db8:2::2]:8080", 1)],
        );
        v6.addr.vip = "2001:db8:ff::1".parse().unwrap();
        vec![
            svc(
                "web",
                80,
                &[
                    ("198.18.1.2:8080", 3),
                    ("198.18.2.2:8080", 1),
                    ("198.18.3.2:8080", 0),
                ],
            ),
            svc("dns", 53, &[("198.18.1.2:8053", 1)]),
            v6,
        ]
    }

    #[test]
    fn a_maglev_service_gets_its_table_flipped_in_and_freed_when_it_leaves_maglev() {
        let mut m = FakeMaps::default();
        let mut r = Reconciler::new(8, 16);
        let mut hashed = svc("hashed", 80, &[("198.18.1.2:80", 1), ("198.18.1.3:80", 1)]);
        hashed.scheduler = Scheduler::Maglev;
        r.apply(&mut m, std::slice::from_ref(&hashed)).unwrap();
        let v = m.services[&service_key(&hashed.addr)];
        assert_eq!(v.flags, SERVICE_MAGLEV);
        let t = &m.maglev[&slot_table_index(v.id, v.active_table)];
        assert_eq!(t.len, MAGLEV_SIZE);
        // The table is Maglev's for these names, in this reconciler's ids.
        let named: Vec<(String, u32)> = hashed
            .backends
            .iter()
            .map(|b| (b.addr.to_string(), 1))
            .collect();
        let want: Vec<u32> = maglev::table(&named)
            .into_iter()
            .map(|i| {
                r.backend_id(&hashed.addr, hashed.backends[i as usize].addr)
                    .unwrap()
            })
            .collect();
        assert_eq!(t.backend_ids.to_vec(), want);
        assert!(m.slots.is_empty(), "no round-robin table: {:?}", m.log);
        // Each backend's stray replies go back to the VIP.
        assert_eq!(m.replies.len(), 2);
        assert!(m
            .replies
            .values()
            .all(|r| r.vip == addr_words(hashed.addr.vip) && r.service_id == v.id));
        // A backend that another service uses too: which VIP a stray reply belongs to
        // would be a guess, so it has no entry.
        let mut shared = svc("shared", 81, &[("198.18.1.2:80", 1)]);
        shared.addr.vip = "198.19.0.2".parse().unwrap();
        r.apply(&mut m, &[hashed.clone(), shared.clone()]).unwrap();
        assert_eq!(m.replies.len(), 1, "{:?}", m.log);
        r.apply(&mut m, std::slice::from_ref(&hashed)).unwrap();
        assert_eq!(m.replies.len(), 2, "{:?}", m.log);
        let v = m.services[&service_key(&hashed.addr)];

        // A backend leaves: the other table is written, then the flip.
        m.log.clear();
        hashed.backends[1].weight = 0;
        r.apply(&mut m, std::slice::from_ref(&hashed)).unwrap();
        let id = v.id;
        assert_eq!(
            m.log,
            [
                format!("maglev {}", id * 2 + 1),
                format!("service {id} table 1")
            ]
        );
        // Adopted by a restarted daemon: nothing to write.
        m.log.clear();
        let mut adopted = Reconciler::adopt(8, 16, &m).unwrap();
        adopted
            .apply(&mut m, std::slice::from_ref(&hashed))
            .unwrap();
        assert!(m.log.is_empty(), "{:?}", m.log);

        // Back to round-robin: a slot table, the flip, then both Maglev tables freed.
        hashed.scheduler = Scheduler::RoundRobin;
        adopted
            .apply(&mut m, std::slice::from_ref(&hashed))
            .unwrap();
        assert_eq!(m.services[&service_key(&hashed.addr)].flags, 0);
        assert!(m.maglev.is_empty(), "{:?}", m.log);
        assert!(m.replies.is_empty(), "{:?}", m.log);
        adopted.apply(&mut m, &[]).unwrap();
        assert!(m.services.is_empty());
    }

    #[test]
    fn adopted_maps_with_the_same_desired_state_get_no_write() {
        let mut m = FakeMaps::default();
        let desired = mixed();
        let mut first = Reconciler::new(8, 16);
        first.apply(&mut m, &desired).unwrap();
        // Churn so that ids and tables are not the trivial first ones.
        let mut changed = desired.clone();
        changed[0].backends.remove(1);
        first.apply(&mut m, &changed).unwrap();
        first.apply(&mut m, &desired).unwrap();
        m.log.clear();

        let mut adopted = Reconciler::adopt(8, 16, &m).unwrap();
        assert_eq!(adopted.len(), 3);
        for s in &desired {
            assert_eq!(adopted.service_id(&s.addr), first.service_id(&s.addr));
            for b in &s.backends {
                assert_eq!(
                    adopted.backend_id(&s.addr, b.addr),
                    first.backend_id(&s.addr, b.addr),
                    "{} {}",
                    s.name,
                    b.addr
                );
            }
        }
        let summary = adopted.apply(&mut m, &desired).unwrap();
        assert_eq!(summary.unchanged, 3, "{summary:?}");
        assert!(m.log.is_empty(), "{:?}", m.log);
    }

    #[test]
    fn adopted_maps_get_only_the_difference_and_fresh_ids_do_not_collide() {
        let mut m = FakeMaps::default();
        let desired = mixed();
        Reconciler::new(8, 16).apply(&mut m, &desired).unwrap();
        m.log.clear();

        let mut adopted = Reconciler::adopt(8, 16, &m).unwrap();
        let mut next = desired.clone();
        next[1]
            .backends
            .push(Backend::new(sa("198.18.2.2:8053"), 1));
        next.remove(2);
        let summary = adopted.apply(&mut m, &next).unwrap();
        assert_eq!((summary.updated, summary.removed), (1, 1), "{summary:?}");
        let used: Vec<u32> = desired
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| (s.addr, b.addr)))
            .filter_map(|(s, b)| adopted.backend_id(&s, b))
            .collect();
        let new_id = adopted
            .backend_id(&next[1].addr, sa("198.18.2.2:8053"))
            .unwrap();
        assert!(!used.contains(&new_id), "{new_id} reused while in use");
        assert_eq!(m.log[0], format!("backend {new_id}"));
        assert_eq!(
            m.rotation(&next[1].addr),
            [sa("198.18.1.2:8053"), sa("198.18.2.2:8053")]
        );
        assert!(!m.services.contains_key(&service_key(&desired[2].addr)));
    }
}
