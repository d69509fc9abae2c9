//! The per-CPU counter array and the one way to bump it.
use aya_ebpf::{macros::map, maps::PerCpuArray};
use tunnel_common::stats::{COUNTER_COUNT, Counter};

/// Named by `tunnel_common::names::STATS_MAP`. Pinned by name so that counters survive a
/// controller restart (the controller loads with a pin path and re-adopts it).
#[map]
pub static TUNNEL_STATS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_COUNT, 0);

/// Adds one to `counter` on this CPU. Per-CPU slots need no atomics.
#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = TUNNEL_STATS.get_ptr_mut(counter.index()) {
        // SAFETY: the pointer comes from a successful map lookup and is only used on this CPU.
        unsafe { *slot += 1 };
    }
}

/// Adds `n` to `counter` on this CPU (GSO skbs count as their segments).
#[inline(always)]
pub fn count_n(counter: Counter, n: u64) {
    if let Some(slot) = TUNNEL_STATS.get_ptr_mut(counter.index()) {
        // SAFETY: as in `count`.
        unsafe { *slot += n };
    }
}
