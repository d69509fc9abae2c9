//! The fast-path maps. Their names are `tunnel_common::names`; the controller owns every write.
use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, HashMap, LpmTrie, PerCpuArray, ProgramArray, RingBuf},
};
use tunnel_common::{
    fastpath::{
        B4Key, BIND_CACHE_WAYS, BindCacheEntry, Binding4, Binding6, ClientTraffic, Ipv4Key,
        Ipv6Key, MAX_AFTR_ADDRS, MAX_BINDINGS, SharedAddr, SoftwireEntry, SoftwireKey,
        TunnelConfig, bind_cache_base,
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

/// Server: part of [`BIND_BY_V6`] in a set-associative array the controller keeps (see
/// `BindCacheEntry`); as many entries as bindings by default, sized by the server with
/// `--max-bindings`.
#[map]
pub static BIND_CACHE: Array<BindCacheEntry> = Array::pinned(MAX_BINDINGS, BPF_F_MMAPABLE);

/// What a native client may send as inner source, and its traffic slot.
#[derive(Clone, Copy)]
pub struct Bound {
    pub ipv4: Ipv4Key,
    pub slot: u32,
}

/// `client`'s binding (its address as two words): from [`BIND_CACHE`] when it holds the
/// client (a few loads), else from [`BIND_BY_V6`] (a hash of 16 bytes, about 20 ns).
#[inline(always)]
pub fn binding_of(client: [u64; 2], cache_bits: u8) -> Option<Bound> {
    if cache_bits != 0 {
        let base = bind_cache_base(client, cache_bits);
        for way in 0..BIND_CACHE_WAYS {
            if let Some(e) = BIND_CACHE.get_ptr(base + way) {
                // SAFETY: a value of BIND_CACHE (32 readable bytes), from a successful lookup.
                let words = unsafe { read_seqlocked(e as usize) }?;
                // The client compared as the words read; only the fields used are decoded.
                let entry = BindCacheEntry::from_words(words);
                if words[1] == client[0] && words[2] == client[1] && entry.live != 0 {
                    return Some(Bound {
                        ipv4: entry.ipv4,
                        slot: entry.slot,
                    });
                }
            }
        }
    }
    // SAFETY: copied out at once.
    let b = unsafe { BIND_BY_V6.get(crate::direct::Key16(client).bytes()) }?;
    Some(Bound {
        ipv4: b.ipv4,
        slot: b.slot,
    })
}

/// The four words of the [`BindCacheEntry`] at `p`, when they were read with no write in
/// between: `seq` read first, then the words (their addresses depend on `seq`'s value), then
/// `seq` again (its address depends on every word's value). An address dependency orders
/// two loads on every CPU the kernel runs BPF on, x86's loads are never reordered anyway,
/// and the verifier and the JITs keep instructions in order, so this is a seqlock reader
/// without a barrier instruction. None: a write was under way (the caller hashes instead).
///
/// # Safety
/// `p` points to a [`BindCacheEntry`] in a map value.
#[inline(always)]
unsafe fn read_seqlocked(p: usize) -> Option<[u64; 4]> {
    let (s1, s2, w0, w1, w2, w3): (u64, u64, u64, u64, u64, u64);
    #[cfg(target_arch = "bpf")]
    // SAFETY: the caller's contract; every load is within the 32-byte value, and `q` is `p`
    // plus a register the verifier knows to be zero.
    unsafe {
        core::arch::asm!(
            "{s1} = *(u32 *)({p} + 0)",
            "{t} = {s1}",
            "{t} &= 0",
            "{q} = {p}",
            "{q} += {t}",
            "{w0} = *(u64 *)({q} + 0)",
            "{w1} = *(u64 *)({q} + 8)",
            "{w2} = *(u64 *)({q} + 16)",
            "{w3} = *(u64 *)({q} + 24)",
            "{t} = {w0}",
            "{t} ^= {w1}",
            "{t} ^= {w2}",
            "{t} ^= {w3}",
            "{t} &= 0",
            "{q} += {t}",
            "{s2} = *(u32 *)({q} + 0)",
            p = in(reg) p,
            q = out(reg) _,
            t = out(reg) _,
            s1 = out(reg) s1,
            s2 = out(reg) s2,
            w0 = out(reg) w0,
            w1 = out(reg) w1,
            w2 = out(reg) w2,
            w3 = out(reg) w3,
            options(readonly, nostack, preserves_flags),
        );
    }
    #[cfg(not(target_arch = "bpf"))]
    // SAFETY: the caller's contract (the host build never runs this).
    unsafe {
        let e = core::ptr::read_volatile(p as *const [u64; 4]);
        (s1, s2, w0, w1, w2, w3) = (
            e[0] & 0xffff_ffff,
            e[0] & 0xffff_ffff,
            e[0],
            e[1],
            e[2],
            e[3],
        );
    }
    if s1 != s2 || s1 & 1 != 0 {
        return None;
    }
    Some([w0, w1, w2, w3])
}

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
