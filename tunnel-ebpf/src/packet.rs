//! Header offsets and small packet operations shared by the programs. Reads and writes go
//! through `bpf_skb_load_bytes` / `bpf_skb_store_bytes`, which also work on non-linear skbs
//! (GSO packets whose headers are not all in the linear part).
use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_DECAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L3_IPV6, BPF_F_ADJ_ROOM_FIXED_GSO,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    programs::TcContext,
};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};
use tunnel_common::{fastpath::IPV6_HEADER_LEN, stats::Counter};

use crate::stats::{count, count_n};

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

/// The EtherType of the frame.
#[inline(always)]
pub fn eth_proto(ctx: &TcContext) -> Option<u16> {
    ctx.load::<[u8; 2]>(ETH_PROTO_OFF)
        .ok()
        .map(u16::from_be_bytes)
}

#[inline(always)]
fn set_eth_proto(ctx: &TcContext, proto: u16) -> Result<(), RewriteFailed> {
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

impl Ipv4Info {
    /// Reads and sanity-checks the IPv4 header at `off`.
    #[inline(always)]
    pub fn load(ctx: &TcContext, off: usize) -> Option<Ipv4Info> {
        let hdr: Ipv4Hdr = ctx.load(off).ok()?;
        if hdr.vihl >> 4 != 4 {
            return None;
        }
        let ihl = ((hdr.vihl & 0x0f) as usize) * 4;
        let tot_len = u16::from_be_bytes(hdr.tot_len);
        if ihl < 20 || (tot_len as usize) < ihl {
            return None;
        }
        Some(Ipv4Info { hdr, ihl, tot_len })
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

/// Decrements the TTL of the IPv4 header at `off` and fixes its checksum.
#[inline(always)]
pub fn decrement_ttl(ctx: &TcContext, off: usize, ip: &Ipv4Info) -> Result<(), RewriteFailed> {
    let old = [ip.hdr.ttl, ip.hdr.proto];
    let new = [ip.hdr.ttl.wrapping_sub(1), ip.hdr.proto];
    ctx.store(off + 8, &new, 0).map_err(|_| RewriteFailed)?;
    ctx.l3_csum_replace(
        off + 10,
        u16::from_ne_bytes(old) as u64,
        u16::from_ne_bytes(new) as u64,
        2,
    )
    .map_err(|_| RewriteFailed)
}

/// Puts an IPv6 header (next header 4) between the Ethernet header and the IPv4 packet.
/// GSO packets keep their segment size (the MSS already accounts for the tunnel).
#[inline(always)]
pub fn encapsulate(
    ctx: &TcContext,
    src: &[u8; 16],
    dst: &[u8; 16],
    inner: &Ipv4Info,
    hop_limit: u8,
) -> Result<(), RewriteFailed> {
    let tos = inner.hdr.tos;
    let outer = Ipv6Hdr {
        vcf: [0x60 | (tos >> 4), (tos & 0x0f) << 4, 0, 0],
        payload_len: inner.tot_len.to_be_bytes(),
        next_hdr: IPPROTO_IPIP,
        hop_limit,
        src_addr: *src,
        dst_addr: *dst,
    };
    ctx.adjust_room(
        IPV6_HEADER_LEN as i32,
        BPF_ADJ_ROOM_MAC,
        (BPF_F_ADJ_ROOM_ENCAP_L3_IPV6 | BPF_F_ADJ_ROOM_FIXED_GSO) as u64,
    )
    .map_err(|_| RewriteFailed)?;
    ctx.store(ETH_LEN, &outer, 0).map_err(|_| RewriteFailed)?;
    set_eth_proto(ctx, ETH_P_IPV6)
}

/// Removes the outer IPv6 header; the frame becomes Ethernet + IPv4 and the kernel treats it
/// as IPv4 from here on (skb->protocol follows the DECAP flag).
#[inline(always)]
pub fn decapsulate(ctx: &TcContext) -> Result<(), RewriteFailed> {
    ctx.adjust_room(
        -(IPV6_HEADER_LEN as i32),
        BPF_ADJ_ROOM_MAC,
        (BPF_F_ADJ_ROOM_DECAP_L3_IPV4 | BPF_F_ADJ_ROOM_FIXED_GSO) as u64,
    )
    .map_err(|_| RewriteFailed)?;
    set_eth_proto(ctx, ETH_P_IP)
}

/// Clamps the MSS of the inner IPv4 packet (at [`INNER_OFF`]) to `mss`, removes the outer
/// header and counts the packet's segments under `counter`, returning their number. On failure
/// the reason is counted and the caller drops the packet.
#[inline(always)]
pub fn unwrap_counted(
    ctx: &TcContext,
    inner: &Ipv4Info,
    mss: u16,
    counter: Counter,
) -> Result<u64, RewriteFailed> {
    if crate::mss::clamp(ctx, INNER_OFF, inner, mss) {
        count(Counter::MssClamped);
    }
    let segs = segments(ctx);
    if decapsulate(ctx).is_err() {
        count(Counter::DropRewriteFailed);
        return Err(RewriteFailed);
    }
    count_n(counter, segs);
    Ok(segs)
}

/// Clamps the MSS of the IPv4 packet right after the Ethernet header to `mss` and wraps it
/// in IPv6 `src` → `dst`. Returns its segment count, to be counted once it is on its way;
/// failures are counted here.
#[inline(always)]
pub fn wrap_clamped(
    ctx: &TcContext,
    ip: &Ipv4Info,
    src: &[u8; 16],
    dst: &[u8; 16],
    mss: u16,
    hop_limit: u8,
) -> Result<u64, RewriteFailed> {
    if crate::mss::clamp(ctx, ETH_LEN, ip, mss) {
        count(Counter::MssClamped);
    }
    let segs = segments(ctx);
    if encapsulate(ctx, src, dst, ip, hop_limit).is_err() {
        count(Counter::DropRewriteFailed);
        return Err(RewriteFailed);
    }
    Ok(segs)
}

/// What follows the outer IPv6 header of a packet addressed to us.
pub enum Upper {
    /// IPv4-in-IPv6, now with the outer header alone in front (any Hop-by-Hop and
    /// Destination Options headers have been removed): the inner packet is at [`INNER_OFF`].
    Ipip,
    /// An outer fragment; the value is the fragment header's next header (4 for ours).
    Fragment(u8),
    /// Another upper-layer protocol (ICMPv6, TCP, ...).
    Other(u8),
    /// More than [`MAX_EXT_HEADERS`] extension headers.
    TooLong,
    /// A chain that ends before its headers do, or whose removal failed.
    Malformed,
}

impl Upper {
    /// Counts a packet that was ours (IPv4-in-IPv6 to our address) and could not be taken;
    /// DROP. `Ipip` and `Other` are not drops and are not counted here.
    #[inline(always)]
    pub fn drop_counted(&self) -> i32 {
        match self {
            Upper::Fragment(_) => count(Counter::DropOuterFragment),
            Upper::TooLong => count(Counter::DropExtHeadersTooMany),
            Upper::Malformed => count(Counter::DropExtHeadersMalformed),
            Upper::Ipip | Upper::Other(_) => {}
        }
        DROP
    }
}

/// Walks the extension headers after the outer IPv6 header `outer` (at [`ETH_LEN`]), at most
/// [`MAX_EXT_HEADERS`] of them. Hop-by-Hop and Destination Options (RFC 8200 §4.3, §4.6; the
/// Tunnel Encapsulation Limit of RFC 2473 is one) are accepted: when they lead to IPv4 they
/// are removed, so that the frame is Ethernet + IPv6 (next header 4) + IPv4 as the rest of
/// the program expects. Options whose type asks to discard unknown ones are not acted on: a
/// packet to a tunnel endpoint is the endpoint's to take.
#[inline(always)]
pub fn outer_upper(ctx: &TcContext, outer: &Ipv6Hdr) -> Upper {
    let mut next = outer.next_hdr;
    let mut len = 0usize;
    for i in 0..=MAX_EXT_HEADERS {
        match next {
            IPPROTO_IPIP => return strip_ext(ctx, outer, len),
            IPPROTO_FRAGMENT => {
                return match ctx.load::<u8>(INNER_OFF + len) {
                    Ok(n) => Upper::Fragment(n),
                    Err(_) => Upper::Malformed,
                };
            }
            IPPROTO_HOPOPTS | IPPROTO_DSTOPTS if i < MAX_EXT_HEADERS => {
                let Ok(h) = ctx.load::<[u8; 2]>(INNER_OFF + len) else {
                    return Upper::Malformed;
                };
                next = h[0];
                len += (h[1] as usize + 1) * 8;
            }
            IPPROTO_HOPOPTS | IPPROTO_DSTOPTS => return Upper::TooLong,
            other => return Upper::Other(other),
        }
    }
    Upper::TooLong
}

/// Removes `len` bytes of extension headers after the outer IPv6 header and makes it say
/// next header 4 with the payload length reduced to match.
#[inline(always)]
fn strip_ext(ctx: &TcContext, outer: &Ipv6Hdr, len: usize) -> Upper {
    if len == 0 {
        return Upper::Ipip;
    }
    let payload = u16::from_be_bytes(outer.payload_len) as usize;
    if payload < len + 20 || len > 2048 {
        return Upper::Malformed;
    }
    let shrunk = ((payload - len) as u16).to_be_bytes();
    let fixed = ctx
        .adjust_room(
            -(len as i32),
            aya_ebpf::bindings::bpf_adj_room_mode::BPF_ADJ_ROOM_NET,
            BPF_F_ADJ_ROOM_FIXED_GSO as u64,
        )
        .is_ok()
        && ctx.store(ETH_LEN + 4, &shrunk, 0).is_ok()
        && ctx.store(ETH_LEN + 6, &IPPROTO_IPIP, 0).is_ok();
    if !fixed {
        return Upper::Malformed;
    }
    count(Counter::ExtHeadersRemoved);
    Upper::Ipip
}
