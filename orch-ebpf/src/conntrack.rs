//! The connection table: two maps that act as one.
//!
//! Every connection starts in the unconfirmed table ([`CONNTRACK_NEW`], an LRU). A TCP
//! connection is confirmed when the client acknowledges the backend's SYN-ACK, a UDP flow when
//! the backend answers; its two entries then move to the confirmed table ([`CONNTRACK`], a
//! plain hash that never evicts). A SYN flood, spoofed or not, fills and recycles only the
//! unconfirmed table: the established connections are out of its reach, and the daemon alone
//! removes them, once closed or idle for their timeout.
//!
//! Lookups try the confirmed table first: established traffic, the hot path, pays one lookup.

use aya_ebpf::bindings::{BPF_ANY, BPF_NOEXIST};
use orch_common::{
    maps::{FlowKey, FlowValue, CT_NEW_INSERTED, CT_NEW_REMOVED},
    CtEvent,
};

use crate::maps::{CONNTRACK, CONNTRACK_NEW, CT_EVENTS, CT_NEW_OPS};

/// `EEXIST`: the key is taken.
const EEXIST: i32 = 17;

/// The entry of `key`, and whether it is confirmed.
#[inline(always)]
pub fn get(key: &FlowKey) -> Option<(*mut FlowValue, bool)> {
    if let Some(e) = CONNTRACK.get_ptr_mut(key) {
        return Some((e, true));
    }
    CONNTRACK_NEW.get_ptr_mut(key).map(|e| (e, false))
}

/// Inserts a new connection's entry (unconfirmed), counted when it adds a key. A taken key
/// fails unless `replace`: the forward entry replaces one that a duplicate SYN, on another
/// CPU, inserted a moment before; a reply key is never taken over here.
#[inline(always)]
pub fn insert_new(key: &FlowKey, value: &FlowValue, replace: bool) -> Result<(), ()> {
    match CONNTRACK_NEW.insert(key, value, BPF_NOEXIST as u64) {
        Ok(()) => {
            ops(CT_NEW_INSERTED, 1);
            Ok(())
        }
        // One entry for another: the table's size is unchanged, and so is the count.
        Err(e) if e == -EEXIST && replace => CONNTRACK_NEW
            .insert(key, value, BPF_ANY as u64)
            .map_err(|_| ()),
        Err(_) => Err(()),
    }
}

/// Forgets `key` in both tables.
#[inline(always)]
pub fn remove(key: &FlowKey) {
    let _ = CONNTRACK.remove(key);
    remove_new(key);
}

/// Forgets `key`, which [`get`] found `confirmed` or not. An unconfirmed key was just
/// missed in the confirmed table, so only the unconfirmed table is asked: one hash and one
/// bucket lock fewer on the path of a client's new attempt, as costly as the lookup itself.
/// A confirmed key goes from both (its unconfirmed copy lives on for a moment while another
/// CPU confirms it), and so does an unconfirmed one that has left its table meanwhile: another
/// CPU confirmed it since the lookup, and its confirmed copy must not outlive it.
#[inline(always)]
pub fn remove_found(key: &FlowKey, confirmed: bool) {
    let was_unconfirmed = remove_new(key);
    if confirmed || !was_unconfirmed {
        let _ = CONNTRACK.remove(key);
    }
}

/// Removes `key` from the unconfirmed table, counted. The count goes up before the removal
/// and back down if there was nothing to remove, so that a reader never sees an entry gone
/// and its removal uncounted (which it would take for an eviction).
/// Whether there was an entry to remove.
#[inline(always)]
fn remove_new(key: &FlowKey) -> bool {
    ops(CT_NEW_REMOVED, 1);
    if CONNTRACK_NEW.remove(key).is_err() {
        ops(CT_NEW_REMOVED, u64::MAX);
        return false;
    }
    true
}

/// Adds `n` (wrapping: `u64::MAX` takes one back) to an unconfirmed-table counter.
#[inline(always)]
fn ops(slot: u32, n: u64) {
    if let Some(c) = CT_NEW_OPS.get_ptr_mut(slot) {
        // SAFETY: a per-CPU slot, written only by this CPU while this program runs.
        unsafe { *c = (*c).wrapping_add(n) };
    }
}

/// Moves a connection (its forward entry `fwd` under `fwd_key`, and its reply entry) to the
/// confirmed table. The confirmed copies go in first, reply before forward, so that a packet
/// of either direction finds the connection in one table or the other at every moment. When
/// the confirmed table is full the connection stays unconfirmed (it keeps working) and the
/// failure is counted.
///
/// Not inlined, for the stack: a BPF function has 512 bytes, and a subprogram gets a frame
/// of its own. The entries are copied map to map, never through the stack.
#[inline(never)]
#[allow(
    clippy::needless_borrows_for_generic_args,
    reason = "by value, the map value would be copied onto the stack this avoids"
)]
pub fn confirm(fwd_key: &FlowKey, fwd: &FlowValue) {
    let reply_key = fwd_key.reply(fwd.nat_addr, fwd.nat_port_be);
    let Some(reply) = CONNTRACK_NEW.get_ptr_mut(&reply_key) else {
        return;
    };
    // SAFETY: a live map value, handed to the helper as the value to copy.
    if CONNTRACK
        .insert(&reply_key, unsafe { &*reply }, BPF_NOEXIST as u64)
        .is_err()
    {
        event(CtEvent::ConfirmFailed);
        return;
    }
    if CONNTRACK.insert(fwd_key, fwd, BPF_NOEXIST as u64).is_err() {
        let _ = CONNTRACK.remove(&reply_key);
        event(CtEvent::ConfirmFailed);
        return;
    }
    remove_new(fwd_key);
    remove_new(&reply_key);
    event(CtEvent::Confirmed);
}

/// Counts a connection-table event.
#[inline(always)]
pub fn event(e: CtEvent) {
    if let Some(c) = CT_EVENTS.get_ptr_mut(e as u32) {
        // SAFETY: a per-CPU slot, written only by this CPU while this program runs.
        unsafe { *c += 1 };
    }
}
