//! The fast-path maps. Their names are `tunnel_common::names`; the controller owns every write.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, PerCpuArray, ProgramArray, RingBuf},
};
use tunnel_common::{
    fastpath::{
        B4Key, Binding4, Binding6, ClientTraffic, Ipv4Key, Ipv6Key, MAX_AFTR_ADDRS, MAX_BINDINGS,
        SharedAddr, SoftwireEntry, SoftwireKey, TunnelConfig,
    },
    mape::{MAX_NAT_ENTRIES, MAX_RULES, MapRule, NatIn, NatKey, NatOut},
    names::TAIL_PROGRAMS,
};

/// Programs that others tail-call (`tunnel_common::names::TAIL_PROGRAMS`, by index); the
/// controller installs them at load time. Pinned: the kernel empties a program array when
/// no process and no pin refers to it any more, so an unpinned one went empty the moment a
/// controller was killed, and the still attached programs lost their tail calls (every
/// softwire packet dropped) until the next one had loaded.
#[map]
pub static TAIL_PROGS: ProgramArray = ProgramArray::pinned(TAIL_PROGRAMS.len() as u32, 0);

/// This instance's endpoint, interfaces and MTU (one entry).
#[map]
pub static TUNNEL_CONFIG: Array<TunnelConfig> = Array::pinned(1, 0);

/// Server: native client's tunnel IPv6 → its lease (anti-spoofing on decapsulation).
#[map]
pub static BIND_BY_V6: HashMap<Ipv6Key, Binding4> = HashMap::pinned(MAX_BINDINGS, 0);

/// Server: lease → native client's tunnel IPv6 (encapsulation).
#[map]
pub static BIND_BY_V4: HashMap<Ipv4Key, Binding6> = HashMap::pinned(MAX_BINDINGS, 0);

/// Server: a binding's slot → what it carried (per CPU; the controller zeroes the slot with
/// the binding and sums the CPUs).
#[map]
pub static CLIENT_TRAFFIC: PerCpuArray<ClientTraffic> = PerCpuArray::pinned(MAX_BINDINGS, 0);

/// lwAFTR: (IPv4, PSID) → the softwire's B4 and AFTR address.
#[map]
pub static SOFTWIRES: HashMap<SoftwireKey, SoftwireEntry> = HashMap::pinned(MAX_BINDINGS, 0);

/// lwAFTR: an IPv4 address that softwires use → how its ports are split.
#[map]
pub static SHARED_ADDRS: HashMap<Ipv4Key, SharedAddr> = HashMap::pinned(MAX_BINDINGS, 0);

/// lwAFTR: (B4, IPv4) pairs with at least one softwire (only read to name a drop's reason,
/// and to accept a B4's non-first fragments of its own address).
#[map]
pub static B4_ADDRS: HashMap<B4Key, u32> = HashMap::pinned(MAX_BINDINGS, 0);

/// lwAFTR: AFTR addresses softwires name besides the tunnel address.
#[map]
pub static AFTR_ADDRS: HashMap<Ipv6Key, u32> = HashMap::pinned(MAX_AFTR_ADDRS, 0);

/// Adds one (possibly GSO) packet of `bytes` to the traffic of the binding at `slot`, `rx`
/// (from the client) or not (to it).
#[inline(always)]
pub fn count_client(slot: u32, rx: bool, segs: u64, bytes: u64) {
    let Some(t) = CLIENT_TRAFFIC.get_ptr_mut(slot) else {
        return;
    };
    // SAFETY: a per-CPU value from a successful lookup, used on this CPU only.
    unsafe {
        if rx {
            (*t).rx_packets += segs;
            (*t).rx_bytes += bytes;
        } else {
            (*t).tx_packets += segs;
            (*t).tx_bytes += bytes;
        }
    }
}

/// MAP-E CE: LAN flow → external port (the controller creates every entry).
#[map]
pub static NAT_OUT: HashMap<NatKey, NatOut> = HashMap::pinned(MAX_NAT_ENTRIES, 0);

/// MAP-E CE: (external port, remote) → LAN host.
#[map]
pub static NAT_IN: HashMap<NatKey, NatIn> = HashMap::pinned(MAX_NAT_ENTRIES, 0);

/// MAP-E BR: the mapping rules by IPv4 prefix (longest match).
#[map]
pub static BR_RULES: LpmTrie<Ipv4Key, MapRule> = LpmTrie::pinned(MAX_RULES, 0);

/// The configuration, once the controller has written it.
#[inline(always)]
pub fn config() -> Option<&'static TunnelConfig> {
    TUNNEL_CONFIG.get(0).filter(|c| c.enabled != 0)
}

/// Packets dropped for failing the source policy, for the controller's ICMPv6 errors.
#[map]
pub static POLICY_EVENTS: RingBuf = RingBuf::with_byte_size(1 << 16, 0);

/// When this CPU last queued a policy event (ns, `bpf_ktime_get_ns`).
#[map]
pub static POLICY_LAST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);
