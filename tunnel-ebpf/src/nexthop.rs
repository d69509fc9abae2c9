//! The next-hop cache's side in the programs (`tunnel_common::nexthop`): look a destination
//! up, and report the ones it does not answer. The controller writes every entry.
use aya_ebpf::{
    helpers::generated::{bpf_jiffies64, bpf_ktime_get_coarse_ns},
    macros::map,
    maps::{Array, PerCpuArray, RingBuf},
};
use tunnel_common::{
    nexthop::{
        Clock, MAX_NEXTHOPS, NEXTHOP_WAYS, NH_CACHE_V4, NH_CACHE_V6, NextHop, NextHopMiss,
        NextHopSlot, NextHopState, set_base,
    },
    stats::Counter,
};

use crate::{
    direct::{Key16, map_words},
    stats::count,
};

/// Named by `tunnel_common::names::NEXTHOPS_V4`: a two-way set-associative cache
/// (`tunnel_common::nexthop::set_base`).
#[map]
pub static NEXTHOPS_V4: Array<NextHopSlot> = Array::with_max_entries(MAX_NEXTHOPS, 0);

/// Named by `tunnel_common::names::NEXTHOPS_V6`: as [`NEXTHOPS_V4`].
#[map]
pub static NEXTHOPS_V6: Array<NextHopSlot> = Array::with_max_entries(MAX_NEXTHOPS, 0);

/// Named by `tunnel_common::names::NEXTHOP_STATE`.
#[map]
pub static NEXTHOP_STATE: Array<NextHopState> = Array::with_max_entries(1, 0);

/// Named by `tunnel_common::names::NEXTHOP_MISSES`.
#[map]
pub static NEXTHOP_MISSES: RingBuf = RingBuf::with_byte_size(1 << 14, 0);

/// Named by `tunnel_common::names::NEXTHOP_MISS_LAST`: the last report of this CPU
/// (destination, and the jiffy), so that a burst to one destination reports it once per
/// tick.
#[map]
pub static NEXTHOP_MISS_LAST: PerCpuArray<[u64; 3]> = PerCpuArray::with_max_entries(1, 0);

/// Named by `tunnel_common::names::CLOCK`.
#[map]
pub static CLOCK: Array<Clock> = Array::with_max_entries(1, 0);

/// CLOCK_MONOTONIC in ns to a tick's precision: `jiffies` through the controller's
/// [`CLOCK`], or a clock read until the controller has written it.
#[inline(always)]
pub fn now_ns() -> u64 {
    match CLOCK.get(0) {
        Some(c) if c.ns_per_jiffy != 0 => {
            // SAFETY: plain helper call (a load of `jiffies` once verified).
            let j = unsafe { bpf_jiffies64() };
            j.wrapping_mul(c.ns_per_jiffy).wrapping_add(c.offset_ns)
        }
        // SAFETY: plain helper call.
        _ => unsafe { bpf_ktime_get_coarse_ns() },
    }
}

/// The generation entries must have, when the cache is on for `family` (and the controller
/// is alive); with it, `jiffies`.
#[inline(always)]
fn current(family: u32) -> Option<(u32, u64)> {
    let state = NEXTHOP_STATE.get(0)?;
    if state.enabled & family == 0 {
        return None;
    }
    // SAFETY: plain helper call (the verifier makes it a load of `jiffies`).
    let now = unsafe { bpf_jiffies64() };
    if now >= state.valid_until_jiffies {
        return None;
    }
    Some((state.generation, now))
}

/// The slot of `cache` holding `dst` (as words) in the current generation, if any: the two
/// slots of its set, each an array lookup the verifier turns into a few instructions.
#[inline(always)]
fn find(
    cache: &'static Array<NextHopSlot>,
    dst: [u64; 2],
    generation: u32,
) -> Option<&'static NextHop> {
    let base = set_base(dst);
    for way in 0..NEXTHOP_WAYS {
        if let Some(slot) = cache.get(base + way) {
            let addr = map_words(&slot.addr);
            if addr[0] == dst[0] && addr[1] == dst[1] && slot.hop.generation == generation {
                return Some(&slot.hop);
            }
        }
    }
    None
}

/// The next hop toward `dst` (IPv4, wire order), when the cache has a current one; else the
/// caller asks the FIB (and the miss has been reported).
#[inline(always)]
pub fn get4(dst: u32) -> Option<&'static NextHop> {
    let (generation, now) = current(NH_CACHE_V4)?;
    let words = [u64::from(dst), 0];
    let found = find(&NEXTHOPS_V4, words, generation);
    if found.is_none() {
        count(Counter::NextHopMiss);
        report(4, words, now);
    }
    found
}

/// As [`get4`] for an IPv6 destination held as words.
#[inline(always)]
pub fn get6(dst: &[u64; 2]) -> Option<&'static NextHop> {
    let (generation, now) = current(NH_CACHE_V6)?;
    let found = find(&NEXTHOPS_V6, *dst, generation);
    if found.is_none() {
        count(Counter::NextHopMiss);
        report(6, *dst, now);
    }
    found
}

/// Tells the controller that `addr` missed, unless this CPU reported it already in this
/// jiffy. A full ring drops the report (the next miss reports again).
#[inline(always)]
fn report(family: u32, addr: [u64; 2], now: u64) {
    let Some(last) = NEXTHOP_MISS_LAST.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: a per-CPU value from a successful lookup, used on this CPU only.
    let last = unsafe { &mut *last };
    if last[0] == addr[0] && last[1] == addr[1] && last[2] == now {
        return;
    }
    *last = [addr[0], addr[1], now];
    let Some(mut slot) = NEXTHOP_MISSES.reserve::<NextHopMiss>(0) else {
        return;
    };
    let key = Key16(addr);
    slot.write(NextHopMiss {
        family,
        _pad: 0,
        addr: *key.bytes(),
    });
    slot.submit(0);
}
