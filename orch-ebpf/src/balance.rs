//! Backend choice: the connection table first, then the service's round-robin table.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_get_smp_processor_id};
use orch_common::{
    maps::{
        slot_table_index, tcp_opens, FlowKey, FlowValue, ServiceValue, Settings, SlotTable,
        TCP_FIN, TCP_RST,
    },
    Reason, IPPROTO_TCP, IPPROTO_UDP, SLOTS_PER_TABLE,
};

use crate::{
    maps::{BACKENDS, BACKEND_DOWN, BACKEND_STATS, CONNTRACK, CURSORS, SERVICE_STATS, SLOTS},
    stats,
};

/// How many further slots a new connection tries when its slot's backend was ejected by the
/// data plane (it refused a connection and the daemon has not yet rebuilt the table).
const EJECTED_RETRIES: u64 = 3;

/// The connection's entry, if it has one that is still valid, with the packet's FIN/RST
/// recorded. A UDP flow idle for longer than the configured timeout is treated as new, so it
/// is balanced again.
#[inline(always)]
pub fn existing(key: &FlowKey, now: u64, settings: &Settings, tcp_flags: u8) -> Option<FlowValue> {
    let entry = CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: a live map value; concurrent writers only store whole aligned words into
    // `last_seen_ns` and single bytes into the flags, the rest is written once at insert.
    let entry = unsafe { &mut *entry };
    if key.proto == IPPROTO_TCP && tcp_opens(tcp_flags) {
        // A bare SYN after the client closed (FIN or RST) is a new connection reusing the
        // port: balance it afresh rather than send it to the old connection's backend.
        if entry.fin != 0 || entry.rst != 0 {
            return None;
        }
        // Otherwise it is the client retrying: its first SYN got no answer.
        stats::signals(entry.backend_id, |s| s.syn_retrans += 1);
    }
    let idle = now.saturating_sub(entry.last_seen_ns);
    if key.proto == IPPROTO_UDP && idle > settings.udp_idle_ns {
        return None;
    }
    // Refresh the timestamp only when it is stale enough to matter: a write per packet
    // would bounce the entry's cache line between CPUs.
    if idle > settings.touch_interval_ns {
        entry.last_seen_ns = now;
    }
    record_flags(entry, tcp_flags);
    Some(*entry)
}

/// Records a FIN or RST in an entry. Each flag is its own byte, set by one store and only
/// when not yet set (a few packets per connection), so established traffic never writes
/// here and two CPUs setting different flags cannot undo each other.
#[inline(always)]
pub fn record_flags(entry: &mut FlowValue, tcp_flags: u8) {
    if tcp_flags & TCP_FIN != 0 && entry.fin == 0 {
        entry.fin = 1;
    }
    if tcp_flags & TCP_RST != 0 && entry.rst == 0 {
        entry.rst = 1;
    }
}

/// What a new connection needs besides its key.
pub struct NewFlow {
    pub now: u64,
    /// The client's SYN sequence number plus one (TCP), 0 for UDP.
    pub syn_next: u32,
    /// A UDP flow idle for longer than this no longer holds its reply 4-tuple.
    pub udp_idle_ns: u64,
}

/// Balances a new connection: takes the service's next round-robin slot and records the
/// connection in both directions. `egress` tells the interface through which a backend
/// address is routed (recorded in the reply entry: replies must arrive there).
#[inline(always)]
pub fn new_flow(
    key: &FlowKey,
    svc: &ServiceValue,
    new: &NewFlow,
    mut egress: impl FnMut(&[u32; 4]) -> u32,
) -> Result<FlowValue, Reason> {
    let table = SLOTS
        .get(slot_table_index(svc.id, svc.active_table))
        .ok_or(Reason::DropInternal)?;
    let len = table.len;
    if len == 0 {
        stats::traffic(&SERVICE_STATS, svc.id, |c| c.no_backend += 1);
        return Err(Reason::DropNoBackend);
    }
    // The cursor is per CPU: incrementing it is a plain add on memory no other CPU touches,
    // so there is no read-then-write race and no cache line bouncing between CPUs under a
    // burst of new connections. Each CPU walks the same smooth order from its own starting
    // slot, so over any number of connections a backend's share is off by at most one per CPU.
    let cursor = CURSORS.get_ptr_mut(svc.id).ok_or(Reason::DropInternal)?;
    // SAFETY: this CPU's own slot; XDP programs do not nest on one CPU.
    let ticket = unsafe {
        let n = *cursor;
        *cursor = n + 1;
        n + bpf_get_smp_processor_id() as u64
    };
    let len = len as u64;
    let first = slot_backend(table, ticket % len)?;
    let mut backend_id = first;
    // A backend the data plane ejected (it refused a connection moments ago) is skipped for
    // the next slots until the daemon rewrites the table; if all of those are ejected too,
    // the first choice stands (better a try than a certain drop).
    if is_ejected(backend_id) {
        for i in 1..=EJECTED_RETRIES {
            let candidate = slot_backend(table, (ticket + i) % len)?;
            if !is_ejected(candidate) {
                backend_id = candidate;
                break;
            }
        }
    }

    let mut result = insert(key, svc.id, backend_id, new, &mut egress);
    if result == Err(Reason::DropReplyCollision) {
        // Another service's live connection holds this backend's reply 4-tuple: the next
        // other backend in the order, if there is one.
        for i in 1..=EJECTED_RETRIES {
            let candidate = slot_backend(table, (ticket + i) % len)?;
            if candidate != backend_id {
                result = insert(key, svc.id, candidate, new, &mut egress);
                break;
            }
        }
    }
    let forward = result?;
    stats::traffic(&SERVICE_STATS, svc.id, |c| c.new_conns += 1);
    stats::traffic(&BACKEND_STATS, forward.backend_id, |c| c.new_conns += 1);
    Ok(forward)
}

/// Records a new connection to `backend_id` in both directions, unless its reply 4-tuple
/// belongs to another live connection.
#[inline(always)]
fn insert(
    key: &FlowKey,
    service_id: u32,
    backend_id: u32,
    new: &NewFlow,
    egress: &mut impl FnMut(&[u32; 4]) -> u32,
) -> Result<FlowValue, Reason> {
    let backend = BACKENDS.get(backend_id).ok_or(Reason::DropInternal)?;
    let forward = FlowValue {
        nat_addr: backend.addr,
        nat_port_be: backend.port_be,
        backend_id,
        service_id,
        syn_next: new.syn_next,
        last_seen_ns: new.now,
        ..FlowValue::default()
    };
    let reply_key = key.reply(backend.addr, backend.port_be);
    let reply = FlowValue {
        nat_addr: key.dst,
        nat_port_be: key.dst_port_be,
        ifindex: egress(&backend.addr),
        ..forward
    };
    // The reply entry goes in first: once the forward entry exists, later packets of the
    // connection rely on it and the reply must already be translatable.
    insert_reply(&reply_key, &reply, new)?;
    CONNTRACK
        .insert(key, forward, 0)
        .map_err(|_| Reason::DropConntrackFull)?;
    Ok(forward)
}

/// Inserts a reply entry without overwriting another live connection's. The reply key has
/// no VIP (it is the backend's packet as it arrives), so two services that share a backend,
/// reached by one client from one source port, would map to the same key; the second would
/// take over the first one's replies.
#[inline(always)]
fn insert_reply(key: &FlowKey, value: &FlowValue, new: &NewFlow) -> Result<(), Reason> {
    if CONNTRACK.insert(key, value, BPF_NOEXIST as u64).is_ok() {
        return Ok(());
    }
    // SAFETY: copied out at once.
    let Some(old) = (unsafe { CONNTRACK.get(key) }).copied() else {
        // The key is free, so the table itself refused.
        return Err(Reason::DropConntrackFull);
    };
    if !replaceable(key, &old, value, new) {
        return Err(Reason::DropReplyCollision);
    }
    CONNTRACK
        .insert(key, value, 0)
        .map_err(|_| Reason::DropConntrackFull)
}

/// Whether the reply entry `old` may give way to `value`: it is this client port's own
/// earlier connection to the same VIP (which the new connection replaces), or its
/// connection is over.
#[inline(always)]
fn replaceable(key: &FlowKey, old: &FlowValue, value: &FlowValue, new: &NewFlow) -> bool {
    if old.nat_addr == value.nat_addr && old.nat_port_be == value.nat_port_be {
        return true;
    }
    // SAFETY: copied out at once.
    let Some(fwd) = (unsafe { CONNTRACK.get(&key.forward_of(old)) }).copied() else {
        // Half a connection: its client side is gone, its replies cannot be translated.
        return true;
    };
    if key.proto == IPPROTO_UDP {
        let last = if fwd.last_seen_ns > old.last_seen_ns {
            fwd.last_seen_ns
        } else {
            old.last_seen_ns
        };
        return new.now.saturating_sub(last) > new.udp_idle_ns;
    }
    FlowValue::closed(fwd.seen(), old.seen())
}
#[inline(always)]
fn slot_backend(table: &SlotTable, slot: u64) -> Result<u32, Reason> {
    let slot = slot as usize;
    // Bound for the verifier (and against a corrupt `len`).
    if slot >= SLOTS_PER_TABLE as usize {
        return Err(Reason::DropInternal);
    }
    Ok(table.backend_ids[slot])
}

#[inline(always)]
fn is_ejected(backend_id: u32) -> bool {
    BACKEND_DOWN.get(backend_id).is_some_and(|d| *d != 0)
}

/// Marks a backend as refusing connections: new connections skip it from now on.
#[inline(always)]
pub fn eject(backend_id: u32) {
    if let Some(d) = BACKEND_DOWN.get_ptr_mut(backend_id) {
        // SAFETY: a u32 slot of an array map; a racing writer stores the same value.
        unsafe { *d = 1 };
    }
}
