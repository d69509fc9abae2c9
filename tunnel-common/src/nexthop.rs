//! The next-hop cache: what the FIB answers for a destination, kept by the controller so that
//! the fast path forwards without a FIB lookup per packet (SPEC §5; the fast-path issue).
//!
//! The programs look a destination up in [`crate::names::NEXTHOPS_V4`] or
//! [`crate::names::NEXTHOPS_V6`]: arrays used as a two-way set-associative cache, the set
//! chosen by [`set_base`] (array lookups are a few instructions once verified, where a hash
//! map's lookup cost the programs 35 ns per packet). An entry counts only when it holds the
//! destination and its `generation` is the current one in [`crate::names::NEXTHOP_STATE`]. Anything else (no entry, an old one, the cache off)
//! takes the FIB helper as before and reports the destination on
//! [`crate::names::NEXTHOP_MISSES`]. The controller answers a report by asking the kernel's
//! FIB the same question (through the resolver program, [`crate::names::PROG_NEXTHOP_RESOLVE`],
//! so the answer is the helper's own) and writes the entry; on every route, rule, address,
//! link or netconf change and every neighbour whose address or validity changes it moves the
//! generation on, which retires every entry at once. A stale MAC never outlives the netlink
//! event that announced the change.

/// Value of the next-hop maps.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    /// Two zero bytes, then the Ethernet header toward the next hop: destination MAC, source
    /// MAC, EtherType. The padding puts the end of the Ethernet header (where the IP header
    /// starts) on an 8-byte boundary in the programs' head buffer, so they copy it as words.
    pub eth: [u8; 16],
    /// The interface the FIB sends it out of.
    pub ifindex: u32,
    /// The FIB's MTU for the route ([`NH_FORWARD`]); the programs' too-big checks use it.
    pub mtu: u32,
    /// [`NextHopState::generation`] when the entry was resolved.
    pub generation: u32,
    /// [`NH_FORWARD`] or [`NH_KERNEL`].
    pub kind: u32,
}

/// Value of the next-hop maps: an entry and the destination it is for.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHopSlot {
    /// The IPv6 destination, or the IPv4 one in the first four bytes (wire order).
    pub addr: [u8; 16],
    pub hop: NextHop,
}

/// Slots per set: a destination lives in one of the two slots from [`set_base`] on.
pub const NEXTHOP_WAYS: u32 = 2;

/// The first slot of the set of a destination held as words (the address's bytes loaded as
/// two native-endian `u64`s; IPv4 in the low four bytes of the first, the second zero). The
/// programs and the controller both place entries with it.
#[inline(always)]
pub fn set_base(words: [u64; 2]) -> u32 {
    let x = words[0] ^ words[1];
    let x = (x ^ (x >> 32)) as u32;
    // Fibonacci hashing: the high bits of the product depend on every bit of `x`.
    (x.wrapping_mul(0x9E37_79B1) >> (32 - SET_BITS)) * NEXTHOP_WAYS
}

const SET_BITS: u32 = (MAX_NEXTHOPS / NEXTHOP_WAYS).trailing_zeros();

/// The FIB found a route and a resolved neighbour: rewrite the MAC header and redirect.
pub const NH_FORWARD: u32 = 1;
/// The FIB's answer was neither (local delivery, unreachable, forwarding off, ...): the
/// program does what it does with such an answer (leave it to the kernel).
pub const NH_KERNEL: u32 = 2;

/// The single entry of [`crate::names::NEXTHOP_STATE`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHopState {
    /// Entries of another generation are ignored.
    pub generation: u32,
    /// [`NH_CACHE_V4`] | [`NH_CACHE_V6`]: which families the programs look up at all (off
    /// where the cache could not give the FIB's answer: policy routing, multipath routes).
    pub enabled: u32,
    /// The kernel's `jiffies` up to which the entries may be used. The controller moves it
    /// on every second; a controller that died (nobody would retire entries on a route
    /// change any more) leaves the fast path on the FIB within seconds. Jiffies because the
    /// verifier turns `bpf_jiffies64` into one load, where a clock read cost the programs
    /// 25-30 ns per packet.
    pub valid_until_jiffies: u64,
}

pub const NH_CACHE_V4: u32 = 1;
pub const NH_CACHE_V6: u32 = 2;

/// The single entry of [`crate::names::CLOCK`]: the kernel's `jiffies` as CLOCK_MONOTONIC
/// nanoseconds, `jiffies * ns_per_jiffy + offset_ns` (wrapping), to a tick's precision. The
/// controller writes it every second once it knows the tick rate; until then (`ns_per_jiffy`
/// 0) the programs read a clock. What the programs time with it (a NAPT mapping's last
/// packet) only needs a tick's precision, and reading `jiffies` is one load where a clock
/// read is a helper call of 25-30 ns.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Clock {
    pub ns_per_jiffy: u64,
    pub offset_ns: u64,
}

/// One record of [`crate::names::NEXTHOP_MISSES`]: a destination the cache did not answer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHopMiss {
    /// 4 or 6.
    pub family: u32,
    pub _pad: u32,
    /// The IPv6 address, or the IPv4 address in the first four bytes (wire order).
    pub addr: [u8; 16],
}

/// The resolver program's packet: an Ethernet header (test runs need one) and this. The
/// controller fills the question; the program writes the answer in place.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHopQuery {
    /// 4 or 6.
    pub family: u32,
    /// `bpf_fib_lookup` flags (BPF_FIB_LOOKUP_OUTPUT for the encapsulating lookups).
    pub flags: u32,
    /// The ingress (or, with OUTPUT, egress) interface the data path asks with.
    pub ifindex: u32,
    /// Answer: the FIB helper's return code (`BPF_FIB_LKUP_RET_*`), or `u32::MAX` when the
    /// question was malformed.
    pub rc: u32,
    /// Source and destination (IPv4 in the first four bytes, wire order).
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Answer, when `rc` is 0: the next hop as the cache holds it (`generation` and `kind`
    /// left for the controller).
    pub answer: NextHop,
    /// Answer, always: the kernel's `jiffies` (the controller's clock for
    /// [`NextHopState::valid_until_jiffies`]).
    pub jiffies: u64,
}

/// Where the query starts in the resolver's packet.
pub const NEXTHOP_QUERY_OFF: usize = 14;

/// Slots of each next-hop map (entries are destinations: clients, B4s, BRs, CEs and IPv4
/// hosts the fast path forwards to); a power of two.
pub const MAX_NEXTHOPS: u32 = 65_536;
const _: () = assert!(MAX_NEXTHOPS.is_power_of_two() && MAX_NEXTHOPS >= 2 * NEXTHOP_WAYS);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain-old-data, `#[repr(C)]`, every bit pattern valid, no padding (checked below).
    unsafe impl aya::Pod for super::NextHop {}
    unsafe impl aya::Pod for super::NextHopSlot {}
    unsafe impl aya::Pod for super::NextHopState {}
    unsafe impl aya::Pod for super::NextHopMiss {}
    unsafe impl aya::Pod for super::NextHopQuery {}
    unsafe impl aya::Pod for super::Clock {}
}

const _: () = assert!(core::mem::size_of::<NextHop>() == 16 + 4 * 4);
const _: () = assert!(core::mem::size_of::<NextHopSlot>() == 16 + 32);
const _: () = assert!(core::mem::size_of::<NextHopState>() == 16);
const _: () = assert!(core::mem::size_of::<NextHopMiss>() == 24);
const _: () = assert!(core::mem::size_of::<Clock>() == 16);
const _: () = assert!(core::mem::size_of::<NextHopQuery>() == 16 + 32 + 32 + 8);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_set_is_in_the_map_and_destinations_spread_over_the_sets() {
        // One bit per set (no_std: no HashSet).
        let mut used = [0u64; (MAX_NEXTHOPS / NEXTHOP_WAYS / 64) as usize];
        for i in 0..4096u32 {
            // Neighbouring IPv4 hosts, as wire-order words.
            let v4 = u32::from_ne_bytes((0xc633_6400u32 + i).to_be_bytes());
            let base = set_base([u64::from(v4), 0]);
            assert!(base.is_multiple_of(NEXTHOP_WAYS) && base + NEXTHOP_WAYS <= MAX_NEXTHOPS);
            let set = (base / NEXTHOP_WAYS) as usize;
            used[set / 64] |= 1 << (set % 64);
            // IPv6 hosts of one /64, differing in the interface identifier.
            let v6 = [0x2001_0db8_0000_0001u64.to_be(), u64::from(i).to_be()];
            let base = set_base(v6);
            assert!(base.is_multiple_of(NEXTHOP_WAYS) && base + NEXTHOP_WAYS <= MAX_NEXTHOPS);
        }
        // 4096 neighbours over 32768 sets: nearly all apart.
        let sets: u32 = used.iter().map(|w| w.count_ones()).sum();
        assert!(sets > 3900, "{sets} sets for 4096 addresses");
    }
}
