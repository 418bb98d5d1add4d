//! Per-CPU counters. Per-CPU maps need no atomics: each CPU writes its own copy and the
//! daemon sums them when it reads.

use aya_ebpf::maps::PerCpuArray;
use orch_common::{
    maps::{BackendSignals, SockEvent, TrafficCounters},
    Reason,
};

use crate::maps::{BACKEND_SIGNALS, SOCK_STATS, STATS};

/// Counts one packet under `reason`.
#[inline(always)]
pub fn count(reason: Reason) {
    if let Some(c) = STATS.get_ptr_mut(reason as u32) {
        // SAFETY: a per-CPU slot, written only by this CPU while this program runs.
        unsafe { *c += 1 };
    }
}

/// Counts a socket-level balancing event.
#[inline(always)]
pub fn sock(event: SockEvent) {
    if let Some(c) = SOCK_STATS.get_ptr_mut(event as u32) {
        // SAFETY: as in `count`.
        unsafe { *c += 1 };
    }
}

/// Updates the traffic counters of service or backend `id`.
#[inline(always)]
pub fn traffic(map: &PerCpuArray<TrafficCounters>, id: u32, f: impl FnOnce(&mut TrafficCounters)) {
    if let Some(c) = map.get_ptr_mut(id) {
        // SAFETY: as in `count`.
        f(unsafe { &mut *c });
    }
}

/// Updates the passive signals of backend `id`.
#[inline(always)]
pub fn signals(id: u32, f: impl FnOnce(&mut BackendSignals)) {
    if let Some(c) = BACKEND_SIGNALS.get_ptr_mut(id) {
        // SAFETY: as in `count`.
        f(unsafe { &mut *c });
    }
}
