//! Backend choice: the connection table first, then the service's round-robin table.

use aya_ebpf::helpers::bpf_get_smp_processor_id;
use orch_common::{
    maps::{
        slot_table_index, FlowKey, FlowValue, ServiceValue, Settings, SlotTable, SEEN_FIN,
        SEEN_RST, TCP_ACK, TCP_SYN,
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
/// (`seen`) recorded. A UDP flow idle for longer than the configured timeout is treated as
/// new, so it is balanced again.
#[inline(always)]
pub fn existing(
    key: &FlowKey,
    now: u64,
    settings: &Settings,
    seen: u32,
    tcp_flags: u8,
) -> Option<FlowValue> {
    let entry = CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: a live map value; concurrent writers only store whole aligned u64s into
    // `last_seen_ns`, the rest is written once at insert.
    let entry = unsafe { &mut *entry };
    if key.proto == IPPROTO_TCP && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        // A bare SYN after the client closed (FIN or RST) is a new connection reusing the
        // port: balance it afresh rather than send it to the old connection's backend.
        if entry.seen & (SEEN_FIN | SEEN_RST) != 0 {
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
    record_seen(entry, seen);
    Some(*entry)
}

/// Adds FIN/RST bits to an entry; writes only when they are new (a few packets per
/// connection), so established traffic never writes here.
#[inline(always)]
pub fn record_seen(entry: &mut FlowValue, seen: u32) {
    if seen & !entry.seen != 0 {
        entry.seen |= seen;
    }
}

/// Balances a new connection: takes the service's next round-robin slot and records the
/// connection in both directions.
#[inline(always)]
pub fn new_flow(
    key: &FlowKey,
    svc: &ServiceValue,
    now: u64,
    seen: u32,
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
    let mut backend_id = slot_backend(table, ticket % len as u64)?;
    // A backend the data plane ejected (it refused a connection moments ago) is skipped for
    // the next slots until the daemon rewrites the table; if all of those are ejected too,
    // the first choice stands (better a try than a certain drop).
    if is_ejected(backend_id) {
        for i in 1..=EJECTED_RETRIES {
            let candidate = slot_backend(table, (ticket + i) % len as u64)?;
            if !is_ejected(candidate) {
                backend_id = candidate;
                break;
            }
        }
    }
    let backend = BACKENDS.get(backend_id).ok_or(Reason::DropInternal)?;

    let forward = FlowValue {
        nat_addr: backend.addr,
        nat_port_be: backend.port_be,
        _pad: 0,
        backend_id,
        service_id: svc.id,
        seen,
        last_seen_ns: now,
    };
    let reply_key = key.reply(backend.addr, backend.port_be);
    let reply = FlowValue {
        nat_addr: key.dst,
        nat_port_be: key.dst_port_be,
        seen: 0,
        ..forward
    };
    // The reply entry goes in first: once the forward entry exists, later packets of the
    // connection rely on it and the reply must already be translatable.
    CONNTRACK
        .insert(reply_key, reply, 0)
        .map_err(|_| Reason::DropConntrackFull)?;
    CONNTRACK
        .insert(key, forward, 0)
        .map_err(|_| Reason::DropConntrackFull)?;

    stats::traffic(&SERVICE_STATS, svc.id, |c| c.new_conns += 1);
    stats::traffic(&BACKEND_STATS, backend_id, |c| c.new_conns += 1);
    Ok(forward)
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
