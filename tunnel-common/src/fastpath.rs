//! Keys and values of the fast-path maps (SPEC §2, §5). `#[repr(C)]` without implicit padding:
//! the eBPF programs and the controller read the same bytes.
//!
//! Addresses are kept as the bytes they have on the wire (network order), so the programs can
//! compare them with packet fields without swapping.

/// IPv4 address as a map key: the four wire bytes read as a native `u32`
/// (`u32::from_ne_bytes(addr.octets())` in userspace).
pub type Ipv4Key = u32;

/// `addr` as an [`Ipv4Key`].
pub fn v4_key(addr: core::net::Ipv4Addr) -> Ipv4Key {
    u32::from_ne_bytes(addr.octets())
}

/// The address an [`Ipv4Key`] holds.
pub fn v4_from_key(key: Ipv4Key) -> core::net::Ipv4Addr {
    core::net::Ipv4Addr::from(key.to_ne_bytes())
}

/// IPv6 address as a map key: its sixteen wire bytes.
pub type Ipv6Key = [u8; 16];

/// Value of [`crate::names::BIND_BY_V6`]: what a native client (keyed by its tunnel IPv6
/// address) may send as inner IPv4 source.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Binding4 {
    /// The lease, wire order (see [`Ipv4Key`]).
    pub ipv4: Ipv4Key,
    /// Port-set id for shared addresses (`psid_len == 0`: the whole address).
    pub psid: u16,
    pub psid_len: u8,
    pub psid_offset: u8,
    /// This binding's entry in [`crate::names::CLIENT_TRAFFIC`].
    pub slot: u32,
}

/// Entry of [`crate::names::BIND_CACHE`]: a client and its [`Binding4`], as in
/// [`crate::names::BIND_BY_V6`], read by the programs without a hash.
///
/// An array value has no atomic update, so the entry is a seqlock: the controller (its only
/// writer, through a shared mapping) makes `seq` odd, writes the rest, then makes `seq` even
/// again, with release ordering between the steps; a program reads `seq`, the rest, and
/// `seq` again (each read depending on the previous one's value, which orders them on every
/// CPU) and uses the entry only when both reads are the same even number. A torn entry is
/// thus never used, which matters because the binding is the anti-spoofing check.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BindCacheEntry {
    pub seq: u32,
    pub slot: u32,
    pub client: Ipv6Key,
    pub ipv4: Ipv4Key,
    pub psid: u16,
    pub psid_len: u8,
    /// Non-zero: the entry holds a binding (zero: empty; `client` means nothing).
    pub live: u8,
}

impl BindCacheEntry {
    /// The entry as the four 8-byte words of its memory, in order (the target is little
    /// endian: the first field of each word is its low part).
    #[inline(always)]
    pub fn to_words(&self) -> [u64; 4] {
        let c = words16(&self.client);
        [
            u64::from(self.seq) | u64::from(self.slot) << 32,
            c[0],
            c[1],
            u64::from(self.ipv4)
                | u64::from(self.psid) << 32
                | u64::from(self.psid_len) << 48
                | u64::from(self.live) << 56,
        ]
    }

    /// The entry whose memory is the words `w` ([`BindCacheEntry::to_words`] reversed).
    #[inline(always)]
    pub fn from_words(w: [u64; 4]) -> BindCacheEntry {
        let mut client = [0u8; 16];
        client[..8].copy_from_slice(&w[1].to_ne_bytes());
        client[8..].copy_from_slice(&w[2].to_ne_bytes());
        BindCacheEntry {
            seq: w[0] as u32,
            slot: (w[0] >> 32) as u32,
            client,
            ipv4: w[3] as u32,
            psid: (w[3] >> 32) as u16,
            psid_len: (w[3] >> 48) as u8,
            live: (w[3] >> 56) as u8,
        }
    }
}

/// Sixteen bytes (an IPv6 address as on the wire) as the two native-order words a program
/// reads them as.
#[inline(always)]
pub fn words16(a: &[u8; 16]) -> [u64; 2] {
    let mut lo = [0u8; 8];
    let mut hi = [0u8; 8];
    lo.copy_from_slice(&a[..8]);
    hi.copy_from_slice(&a[8..]);
    [u64::from_ne_bytes(lo), u64::from_ne_bytes(hi)]
}

/// Entries of a [`BindCacheEntry`] set.
pub const BIND_CACHE_WAYS: u32 = 2;
/// Most entries a binding cache gets (32 MiB): beyond that, the bindings that find no place
/// are looked up in the hash as before.
pub const BIND_CACHE_MAX_BITS: u8 = 20;

/// log2 of the cache entries for `bindings` bindings: the next power of two (at least one
/// set), at most 2^[`BIND_CACHE_MAX_BITS`].
pub fn bind_cache_bits(bindings: u32) -> u8 {
    let n = bindings.max(BIND_CACHE_WAYS).next_power_of_two();
    (n.trailing_zeros() as u8).min(BIND_CACHE_MAX_BITS)
}

/// First entry of `client`'s set (its address as two native words, as read from the packet)
/// in a cache of 2^`bits` entries (`bits` >= 1): Fibonacci hashing, whose high bits depend on
/// every bit of the folded address.
#[inline(always)]
pub fn bind_cache_base(client: [u64; 2], bits: u8) -> u32 {
    let x = client[0] ^ client[1];
    let x = (x ^ (x >> 32)) as u32;
    let set_bits = u32::from(bits) - 1;
    if set_bits == 0 {
        return 0;
    }
    (x.wrapping_mul(0x9E37_79B1) >> (32 - set_bits)) * BIND_CACHE_WAYS
}

/// Value of [`crate::names::BIND_BY_V4`]: where packets to a lease go.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Binding6 {
    /// The client's tunnel IPv6 address (outer destination).
    pub client: Ipv6Key,
    /// This binding's entry in [`crate::names::CLIENT_TRAFFIC`] (the same as its [`Binding4`]'s).
    pub slot: u32,
}

/// Value of [`crate::names::CLIENT_TRAFFIC`] (per CPU, at the binding's slot): what a native
/// client's binding carried through the fast path, counted from the server's side (`rx`:
/// decapsulated, from the client; `tx`: encapsulated, to it). Bytes are inner IPv4 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientTraffic {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
}

/// The single entry of [`crate::names::TUNNEL_CONFIG`]. A server fills `local`, the interface
/// indexes and the MTU; a native client also fills `remote` and `ipv4`. A MAP-E CE fills
/// `local` (its CE address), `remote` (the BR), `ipv4` (the shared address), `v6_ifindex`
/// (WAN) and `tun_ifindex`; a BR fills `local` (the BR address) and `v6_ifindex`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TunnelConfig {
    /// Our tunnel endpoint (outer source of what we encapsulate, outer destination of what we
    /// accept).
    pub local: Ipv6Key,
    /// Client only: the server's tunnel endpoint.
    pub remote: Ipv6Key,
    /// Client only: the lease (inner source of what we encapsulate).
    pub ipv4: Ipv4Key,
    /// The IPv6-side interface (outer packets leave through it).
    pub v6_ifindex: u32,
    /// Server only: the TUN (slow path); packets routed there are left to the kernel.
    pub tun_ifindex: u32,
    /// Largest inner IPv4 packet that fits: outer MTU − 40.
    pub inner_mtu: u16,
    /// TCP MSS written into SYNs that announce more: `inner_mtu` − 40.
    pub mss: u16,
    /// Outer hop limit.
    pub hop_limit: u8,
    /// Non-zero once the controller has filled the entry; until then programs pass everything.
    pub enabled: u8,
    /// Server only: at most this many policy events per second per CPU go to
    /// [`crate::names::POLICY_EVENTS`] (the controller answers them with ICMPv6 type 1
    /// code 5); 0: none.
    pub policy_events_per_s: u16,
    /// Server only: non-zero when a packet from one softwire to another softwire's address
    /// and port is dropped (`drop_hairpin_off`) instead of re-encapsulated (`--no-hairpin`).
    pub no_hairpin: u8,
    /// Server only: non-zero when the controller reassembles and fragments for softwires
    /// (pure lwAFTR): IPv4 fragments and too-big packets toward a softwire's address go to
    /// the TUN, outer IPv6 fragments from B4s to the kernel's reassembly; zero: dropped and
    /// counted.
    pub softwire_slow_path: u8,
    /// Server only: log2 of [`crate::names::BIND_CACHE`]'s entries; 0: no cache (every
    /// lookup hashes).
    pub bind_cache_bits: u8,
    pub _pad: u8,
}

/// Key of [`crate::names::SOFTWIRES`]: a shared (or whole, `psid` 0 with length 0) IPv4
/// address and the PSID of one port set of it (RFC 7596 lw4o6).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SoftwireKey {
    pub ipv4: Ipv4Key,
    pub psid: u16,
    pub _pad: u16,
}

/// Value of [`crate::names::SOFTWIRES`]: the tunnel endpoints of one softwire.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SoftwireEntry {
    /// The B4's IPv6 address: the outer destination toward it, the only outer source it may
    /// send from.
    pub b4: Ipv6Key,
    /// The AFTR address of this softwire: the outer source toward the B4, the only outer
    /// destination accepted from it.
    pub aftr: Ipv6Key,
}

/// Value of [`crate::names::SHARED_ADDRS`]: how the ports of an IPv4 address that softwires
/// use are split (all softwires of one address split it the same way).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SharedAddr {
    /// k: 0 is the whole address (one softwire, PSID 0).
    pub psid_len: u8,
    /// a: ports whose top a bits are zero belong to no set (a = 0: one contiguous range).
    pub psid_offset: u8,
    pub _pad: [u8; 2],
}

/// Key of [`crate::names::B4_ADDRS`]: a B4 and an IPv4 address it holds a softwire of.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct B4Key {
    pub b4: Ipv6Key,
    pub ipv4: Ipv4Key,
}

/// How much of an offending packet a policy event carries: what fits in an ICMPv6 error
/// within the IPv6 minimum MTU (1280 − 40 − 8, RFC 4443 §2.4 c).
pub const POLICY_QUOTE: usize = 1232;

/// One record of [`crate::names::POLICY_EVENTS`]: a packet the server's fast path dropped for
/// failing the source policy (unbound outer source, or inner source not the lease).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PolicyEvent {
    /// Bytes of `packet` that are valid (from the outer IPv6 header on).
    pub len: u32,
    pub _pad: u32,
    pub packet: [u8; POLICY_QUOTE],
}

/// Size of the outer header we add and remove.
pub const IPV6_HEADER_LEN: u16 = 40;
/// IPv4 header (20) + TCP header (20): the MSS is the inner MTU minus this.
pub const TCP_IPV4_OVERHEAD: u16 = 40;
/// Default outer hop limit.
pub const DEFAULT_HOP_LIMIT: u8 = 64;
/// Bindings a server can hold (both maps), and softwires (each softwire map).
pub const MAX_BINDINGS: u32 = 65_536;
/// AFTR addresses a softwire table may name.
pub const MAX_AFTR_ADDRS: u32 = 64;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain-old-data, `#[repr(C)]`, every bit pattern valid, no padding (checked below).
    unsafe impl aya::Pod for super::Binding4 {}
    unsafe impl aya::Pod for super::BindCacheEntry {}
    unsafe impl aya::Pod for super::Binding6 {}
    unsafe impl aya::Pod for super::TunnelConfig {}
    unsafe impl aya::Pod for super::ClientTraffic {}
    unsafe impl aya::Pod for super::SoftwireKey {}
    unsafe impl aya::Pod for super::SoftwireEntry {}
    unsafe impl aya::Pod for super::SharedAddr {}
    unsafe impl aya::Pod for super::B4Key {}
}

// No implicit padding: the sizes equal the sums of the fields.
const _: () = assert!(core::mem::size_of::<Binding4>() == 12);
const _: () = assert!(core::mem::size_of::<Binding6>() == 20);
const _: () = assert!(core::mem::size_of::<BindCacheEntry>() == 32);
// The binding cache's size in the object (a power of two, as every cache size).
const _: () = assert!(MAX_BINDINGS.is_power_of_two());
const _: () = assert!(core::mem::size_of::<ClientTraffic>() == 32);
const _: () = assert!(
    core::mem::size_of::<TunnelConfig>() == 16 + 16 + 4 + 4 + 4 + 2 + 2 + 1 + 1 + 2 + 1 + 1 + 1 + 1
);
const _: () = assert!(core::mem::size_of::<SoftwireKey>() == 8);
const _: () = assert!(core::mem::size_of::<SoftwireEntry>() == 32);
const _: () = assert!(core::mem::size_of::<SharedAddr>() == 4);
const _: () = assert!(core::mem::size_of::<B4Key>() == 20);
const _: () = assert!(core::mem::size_of::<PolicyEvent>() == 8 + POLICY_QUOTE);

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn a_cache_entry_is_the_words_of_its_memory_and_back() {
        let e = BindCacheEntry {
            seq: 6,
            slot: 0x0102_0304,
            client: [0x20, 1, 0xd, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
            ipv4: 0xc633_6402,
            psid: 0x1234,
            psid_len: 6,
            live: 1,
        };
        let w = e.to_words();
        // SAFETY: `#[repr(C)]`, 32 bytes without padding (asserted above), every field an
        // integer: its memory read as four words.
        let memory: [u64; 4] = unsafe { core::mem::transmute(e) };
        assert_eq!(w, memory);
        assert_eq!(BindCacheEntry::from_words(w), e);
    }

    #[test]
    fn the_binding_cache_has_a_power_of_two_entries_from_one_set_to_its_cap() {
        assert_eq!(bind_cache_bits(1), 1);
        assert_eq!(bind_cache_bits(1_000), 10);
        assert_eq!(bind_cache_bits(MAX_BINDINGS), 16);
        assert_eq!(bind_cache_bits(MAX_BINDINGS + 1), 17);
        assert_eq!(bind_cache_bits(4_194_304), BIND_CACHE_MAX_BITS);
    }

    #[test]
    fn a_set_starts_on_a_way_boundary_inside_the_cache_and_sets_are_all_used() {
        for bits in [1u8, 2, 10, 16, 20] {
            let mut seen = std::collections::BTreeSet::new();
            for i in 0..4096u64 {
                let base = bind_cache_base([0x0000_0100_b80d_0120, i << 56 | 2], bits);
                assert_eq!(base % BIND_CACHE_WAYS, 0);
                assert!(base + BIND_CACHE_WAYS <= 1 << bits, "bits {bits}: {base}");
                seen.insert(base);
            }
            // Addresses that differ in one byte spread over the sets.
            let sets = (1u32 << bits) / BIND_CACHE_WAYS;
            assert!(
                seen.len() as u32 >= sets.min(256),
                "bits {bits}: {} sets",
                seen.len()
            );
        }
    }
}
