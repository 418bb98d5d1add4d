//! The clock of established packets: the coarse monotonic clock, read through the kernel at
//! most once per CPU per tick.
//!
//! Idle times count in seconds, so packets read the coarse clock (the monotonic clock as of
//! the last tick, `bpf_ktime_get_coarse_ns`), not the precise one. Even so the reading is a
//! helper call three kernel functions deep, each return paying the CPU's return-misprediction
//! mitigations: about a tenth of an established packet's cost in a `perf record -e cpu-clock`
//! profile of `packet_cost`. The coarse clock moves only at a tick, and every tick moves
//! `jiffies`, which the verifier turns into one load. So each CPU keeps its last reading
//! with the jiffies it was taken at ([`CLOCK`]), and asks the kernel again only when jiffies
//! has moved.
//!
//! A tick moves jiffies a moment before the clock: a reading taken in that moment is kept
//! for the whole next tick, so a value is at most two ticks old (20 ms at the slowest tick
//! rate) instead of one (a little more when the timekeeper catches up several ticks at
//! once). Idle timeouts are seconds; the daemon reads entries' timestamps against its own
//! clock with the same tolerance either way.

use aya_ebpf::{
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns},
    macros::map,
    maps::PerCpuArray,
};

/// One CPU's last reading of the coarse clock, and the jiffies it was taken at.
#[repr(C)]
pub struct Reading {
    jiffies: u64,
    ns: u64,
}

/// Per CPU. Not pinned: a new program starts from zeros, which no jiffies value matches
/// (jiffies starts well above zero and would take 2^64 ticks to wrap to it).
#[map(name = "ORCH_CLOCK")]
static CLOCK: PerCpuArray<Reading> = PerCpuArray::with_max_entries(1, 0);

/// The coarse monotonic clock, in nanoseconds.
#[inline(always)]
pub fn coarse_ns() -> u64 {
    // SAFETY: helpers without arguments.
    let jiffies = unsafe { bpf_jiffies64() };
    let Some(r) = CLOCK.get_ptr_mut(0) else {
        // SAFETY: as above.
        return unsafe { bpf_ktime_get_coarse_ns() };
    };
    // SAFETY: this CPU's own entry; programs do not nest on one CPU.
    let r = unsafe { &mut *r };
    if r.jiffies != jiffies {
        // The reading first, then what it is valid for.
        // SAFETY: as above.
        r.ns = unsafe { bpf_ktime_get_coarse_ns() };
        r.jiffies = jiffies;
    }
    r.ns
}
