//! Header offsets and small packet operations shared by the programs. Reads and writes go
//! through `bpf_skb_load_bytes` / `bpf_skb_store_bytes`, which also work on non-linear skbs
//! (GSO packets whose headers are not all in the linear part).
use aya_ebpf::programs::TcContext;
use network_types::ip::Ipv4Hdr;
use tunnel_common::fastpath::IPV6_HEADER_LEN;

pub const ETH_LEN: usize = 14;
/// Offset of the EtherType in the Ethernet header.
const ETH_PROTO_OFF: usize = 12;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_DSTOPTS: u8 = 60;
/// How many outer extension headers the decapsulating programs walk; a longer chain is
/// dropped and counted.
pub const MAX_EXT_HEADERS: usize = 4;
/// Where the inner IPv4 header starts in an encapsulated frame.
pub const INNER_OFF: usize = ETH_LEN + IPV6_HEADER_LEN as usize;

/// The verdicts the programs return.
pub const PASS: i32 = aya_ebpf::bindings::TC_ACT_OK as _;
pub const DROP: i32 = aya_ebpf::bindings::TC_ACT_SHOT as _;

/// A packet rewrite helper (adjust_room, store, checksum) failed; the packet is dropped.
#[derive(Debug, Clone, Copy)]
pub struct RewriteFailed;

/// The frame's protocol as the kernel classified it (`skb->protocol`: the EtherType, or the
/// inner one of a VLAN tag the NIC removed). A context field, so no helper call: every
/// packet on our interfaces pays for this check, also those the programs pass.
#[inline(always)]
pub fn eth_proto(ctx: &TcContext) -> Option<u16> {
    // SAFETY: reading a field of the context the kernel handed us.
    let protocol = unsafe { (*ctx.skb.skb).protocol };
    Some(u16::from_be(protocol as u16))
}

#[inline(always)]
pub fn set_eth_proto(ctx: &TcContext, proto: u16) -> Result<(), RewriteFailed> {
    ctx.store(ETH_PROTO_OFF, &proto.to_be_bytes(), 0)
        .map_err(|_| RewriteFailed)
}

/// 16-byte equality without a memcmp call (BPF has none).
#[inline(always)]
pub fn eq16(a: &[u8; 16], b: &[u8; 16]) -> bool {
    let (a0, a1) = a.split_at(8);
    let (b0, b1) = b.split_at(8);
    u64::from_ne_bytes(a0.try_into().unwrap_or([0; 8]))
        == u64::from_ne_bytes(b0.try_into().unwrap_or([1; 8]))
        && u64::from_ne_bytes(a1.try_into().unwrap_or([0; 8]))
            == u64::from_ne_bytes(b1.try_into().unwrap_or([1; 8]))
}

/// The parts of an IPv4 header the programs decide on.
pub struct Ipv4Info {
    pub hdr: Ipv4Hdr,
    /// Header length in bytes (20-60).
    pub ihl: usize,
    pub tot_len: u16,
}

/// Why [`Ipv4Info::parse`] found no IPv4 header.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum NotIpv4 {
    /// 20 bytes are there, but not version 4.
    OtherVersion,
    /// Shorter than an IPv4 header, or a header length or total length that cannot be.
    Malformed,
}

impl Ipv4Info {
    /// Reads and sanity-checks the IPv4 header at `off`.
    #[inline(always)]
    pub fn load(ctx: &TcContext, off: usize) -> Option<Ipv4Info> {
        Self::parse(ctx, off).ok()
    }

    /// As [`Ipv4Info::load`], telling why it is not an IPv4 header (one read of the packet).
    #[inline(always)]
    pub fn parse(ctx: &TcContext, off: usize) -> Result<Ipv4Info, NotIpv4> {
        let hdr: Ipv4Hdr = ctx.load(off).map_err(|_| NotIpv4::Malformed)?;
        if hdr.vihl >> 4 != 4 {
            return Err(NotIpv4::OtherVersion);
        }
        let ihl = ((hdr.vihl & 0x0f) as usize) * 4;
        let tot_len = u16::from_be_bytes(hdr.tot_len);
        if ihl < 20 || (tot_len as usize) < ihl {
            return Err(NotIpv4::Malformed);
        }
        Ok(Ipv4Info { hdr, ihl, tot_len })
    }

    pub fn src(&self) -> u32 {
        u32::from_ne_bytes(self.hdr.src_addr)
    }

    pub fn dst(&self) -> u32 {
        u32::from_ne_bytes(self.hdr.dst_addr)
    }

    pub fn dont_fragment(&self) -> bool {
        self.hdr.frags[0] & 0x40 != 0
    }

    /// Offset 0 (the first or only fragment): the transport header is here.
    pub fn first_fragment(&self) -> bool {
        u16::from_be_bytes(self.hdr.frags) & 0x1fff == 0
    }

    /// Whether this is a fragment at all (more fragments follow, or it is not the first).
    #[inline(always)]
    pub fn fragment(&self) -> bool {
        u16::from_be_bytes(self.hdr.frags) & 0x3fff != 0
    }
}

/// The length of the largest packet this skb will become on the wire: its IPv4 total length,
/// or for a GSO skb one segment (headers + gso_size).
#[inline(always)]
pub fn wire_len(ctx: &TcContext, ip_off: usize, ip: &Ipv4Info) -> usize {
    // SAFETY: reading fields of the context the kernel handed us.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size } as usize;
    if gso_size == 0 {
        return ip.tot_len as usize;
    }
    let l4 = match ip.hdr.proto {
        IPPROTO_TCP => ctx
            .load::<u8>(ip_off + ip.ihl + 12)
            .map(|b| ((b >> 4) as usize) * 4)
            .unwrap_or(60),
        IPPROTO_UDP => 8,
        _ => 60,
    };
    ip.ihl + l4 + gso_size
}

/// How many wire packets this skb stands for (GSO segments, or 1).
#[inline(always)]
pub fn segments(ctx: &TcContext) -> u64 {
    // SAFETY: reading a field of the context.
    let segs = unsafe { (*ctx.skb.skb).gso_segs };
    if segs == 0 { 1 } else { segs as u64 }
}

/// Decrements the TTL of the IPv4 header at `off` and fixes its checksum: one store of TTL,
/// protocol and checksum (RFC 1624's incremental update, as the kernel's `ip_decrease_ttl`
/// does it), not a store and a checksum helper.
#[inline(always)]
pub fn decrement_ttl(ctx: &TcContext, off: usize, ip: &Ipv4Info) -> Result<(), RewriteFailed> {
    let check = ttl_decremented_checksum(u16::from_be_bytes(ip.hdr.check));
    let [c0, c1] = check.to_be_bytes();
    let new = [ip.hdr.ttl.wrapping_sub(1), ip.hdr.proto, c0, c1];
    ctx.store(off + 8, &new, 0).map_err(|_| RewriteFailed)
}

/// The header checksum once the TTL (the high byte of its 16-bit word) is one lower: the sum
/// loses 0x0100, so its complement gains it, with the end-around carry.
#[inline(always)]
pub fn ttl_decremented_checksum(check: u16) -> u16 {
    let c = u32::from(check) + 0x0100;
    (c + u32::from(c >= 0xffff)) as u16
}
