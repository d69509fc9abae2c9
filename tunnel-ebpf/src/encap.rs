//! Wrapping and unwrapping: the outer IPv6 header put on (RFC 2473) and taken off, with the
//! MSS clamp that goes with each, and the walk over the outer extension headers of a packet
//! addressed to us (removing Hop-by-Hop and Destination Options before decapsulation).
use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_DECAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L3_IPV6, BPF_F_ADJ_ROOM_FIXED_GSO,
        BPF_F_ADJ_ROOM_NO_CSUM_RESET, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    programs::TcContext,
};
use tunnel_common::{
    fastpath::{IPV6_HEADER_LEN, TunnelConfig},
    stats::Counter,
};

use crate::{
    direct::map_words,
    head::{Head, write_from_proto70, write70},
    log,
    packet::{
        DROP, ETH_LEN, ETH_P_IP, ETH_P_IPV6, INNER_OFF, IPPROTO_DSTOPTS, IPPROTO_FRAGMENT,
        IPPROTO_HOPOPTS, IPPROTO_IPIP, Ipv4Info, MAX_EXT_HEADERS, Outer6, RewriteFailed, segments,
        set_eth_proto,
    },
    route::{self, Forward},
    stats::{count, count_n},
};

/// The EtherType word of a head without known MACs: IPv6's, at buffer bytes 14-15.
const IPV6_PROTO_WORD: u64 = (ETH_P_IPV6.to_be() as u64) << 48;

/// The first eight bytes of the outer IPv6 header (version 6 with the inner TOS as traffic
/// class, no flow label, payload length, next header 4, hop limit) as a word.
#[inline(always)]
fn outer_w0(tos: u8, payload: u16, hop_limit: u8) -> u64 {
    u64::from(0x60 | (tos >> 4))
        | u64::from((tos & 0x0f) << 4) << 8
        | u64::from(payload.to_be()) << 32
        | u64::from(IPPROTO_IPIP) << 48
        | u64::from(hop_limit) << 56
}

/// Puts an IPv6 header `src` → `dst` (next header 4) between the Ethernet header and the IPv4
/// packet, with the EtherType, and with `eth` as the MAC header (the [`NextHop::eth`] layout)
/// when the next hop is known, all in one write that also sets the inner header's bytes 8-15
/// to `inner_w1` (TTL, protocol, checksum, source: [`Ipv4Info::w1_rewritten`] when the caller
/// forwards or translates, else as they are). GSO packets keep their segment size (the MSS
/// already accounts for the tunnel).
///
/// [`NextHop::eth`]: tunnel_common::nexthop::NextHop::eth
#[inline(always)]
pub fn encapsulate<const DIRECT: bool>(
    ctx: &TcContext,
    src: &[u64; 2],
    dst: &[u64; 2],
    inner: &Ipv4Info,
    inner_w1: u64,
    hop_limit: u8,
    eth: Option<[u64; 2]>,
) -> Result<(), RewriteFailed> {
    let w0 = outer_w0(inner.tos(), inner.tot_len, hop_limit);
    let [s0, s1] = *src;
    let [d0, d1] = *dst;
    let i0 = inner.w0;
    ctx.adjust_room(
        IPV6_HEADER_LEN as i32,
        BPF_ADJ_ROOM_MAC,
        (BPF_F_ADJ_ROOM_ENCAP_L3_IPV6 | BPF_F_ADJ_ROOM_FIXED_GSO) as u64,
    )
    .map_err(|_| RewriteFailed)?;
    match eth {
        Some([e0, e1]) => write70::<DIRECT>(ctx, &Head([e0, e1, w0, s0, s1, d0, d1, i0, inner_w1])),
        None => write_from_proto70(
            ctx,
            &Head([0, IPV6_PROTO_WORD, w0, s0, s1, d0, d1, i0, inner_w1]),
        ),
    }
}

/// Removes the outer IPv6 header; the frame becomes Ethernet + IPv4 and the kernel treats it
/// as IPv4 from here on (skb->protocol follows the DECAP flag).
///
/// `NO_CSUM_RESET`: a packet whose checksums the NIC verified (CHECKSUM_UNNECESSARY) keeps
/// that state, so nobody checksums it again in software. That is right because removing the
/// outer header changes no checksum the verdict covers: IPv6 has none, and the inner IPv4 and
/// TCP/UDP checksums are untouched (an MSS clamp updates the TCP checksum incrementally).
#[inline(always)]
pub fn decapsulate(ctx: &TcContext) -> Result<(), RewriteFailed> {
    remove_outer(ctx)?;
    set_eth_proto(ctx, ETH_P_IP)
}

/// [`decapsulate`] without writing the frame's EtherType, which stays IPv6's until the caller
/// writes it (with the MAC header when it forwards the packet itself).
#[inline(always)]
fn remove_outer(ctx: &TcContext) -> Result<(), RewriteFailed> {
    ctx.adjust_room(
        -(IPV6_HEADER_LEN as i32),
        BPF_ADJ_ROOM_MAC,
        (BPF_F_ADJ_ROOM_DECAP_L3_IPV4 | BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_NO_CSUM_RESET)
            as u64,
    )
    .map_err(|_| RewriteFailed)
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
    let segs = unwrap_for_forwarding(ctx, inner, mss, counter)?;
    if set_eth_proto(ctx, ETH_P_IP).is_err() {
        count(Counter::DropRewriteFailed);
        return Err(RewriteFailed);
    }
    Ok(segs)
}

/// As [`unwrap_counted`] for a packet that goes on to `route::forward_unwrapped`, which
/// writes the frame's EtherType (with the MAC header when it forwards the packet itself).
#[inline(always)]
pub fn unwrap_for_forwarding(
    ctx: &TcContext,
    inner: &Ipv4Info,
    mss: u16,
    counter: Counter,
) -> Result<u64, RewriteFailed> {
    if crate::mss::clamp(ctx, INNER_OFF, inner, mss) {
        count(Counter::MssClamped);
    }
    let segs = segments(ctx);
    if remove_outer(ctx).is_err() {
        count(Counter::DropRewriteFailed);
        return Err(RewriteFailed);
    }
    count_n(counter, segs);
    Ok(segs)
}

/// Clamps the MSS of the IPv4 packet right after the Ethernet header to `mss` and wraps it
/// in IPv6 `src` → `dst` (with `eth` as its MAC header, when known, and `inner_w1` as the
/// inner header's bytes 8-15). Returns its segment
/// count, to be counted once it is on its way; failures are counted here.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn wrap_clamped<const DIRECT: bool>(
    ctx: &TcContext,
    ip: &Ipv4Info,
    src: &[u64; 2],
    dst: &[u64; 2],
    inner_w1: u64,
    mss: u16,
    hop_limit: u8,
    eth: Option<[u64; 2]>,
) -> Result<u64, RewriteFailed> {
    if crate::mss::clamp(ctx, ETH_LEN, ip, mss) {
        count(Counter::MssClamped);
    }
    let segs = segments(ctx);
    if encapsulate::<DIRECT>(ctx, src, dst, ip, inner_w1, hop_limit, eth).is_err() {
        count(Counter::DropRewriteFailed);
        return Err(RewriteFailed);
    }
    Ok(segs)
}

/// Wraps the IPv4 packet that follows the Ethernet header in IPv6 `cfg.local` → `dst` and
/// sends it on: the next hop is looked up first (cache or FIB), so the new frame head goes in
/// with one store, then the redirect ([`crate::route::V6Route`]). `egress`: the program runs on egress of the IPv6
/// side. On its way, its segments are counted under `counter`; a route that does not work is
/// counted as `drop_no_route_to_client` and logged through `log_program`. Returns the verdict
/// and the segments sent (0 when it was not).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn send_wrapped<const DIRECT: bool>(
    ctx: &TcContext,
    ip: &Ipv4Info,
    inner_w1: u64,
    cfg: &TunnelConfig,
    dst: &[u64; 2],
    egress: bool,
    counter: Counter,
    log_program: u32,
) -> (i32, u64) {
    let src = map_words(&cfg.local);
    send_wrapped_from::<DIRECT>(
        ctx,
        ip,
        inner_w1,
        cfg,
        &src,
        dst,
        egress,
        counter,
        log_program,
    )
}

/// [`send_wrapped`] from outer source `src` instead of `cfg.local` (an lwAFTR softwire's own
/// AFTR address).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn send_wrapped_from<const DIRECT: bool>(
    ctx: &TcContext,
    ip: &Ipv4Info,
    inner_w1: u64,
    cfg: &TunnelConfig,
    src: &[u64; 2],
    dst: &[u64; 2],
    egress: bool,
    counter: Counter,
    log_program: u32,
) -> (i32, u64) {
    let route = route::lookup_v6(ctx, src, dst, cfg.v6_ifindex);
    let eth = route.eth();
    let Ok(segs) = wrap_clamped::<DIRECT>(ctx, ip, src, dst, inner_w1, cfg.mss, cfg.hop_limit, eth)
    else {
        return (DROP, 0);
    };
    match route.send(ctx, cfg.v6_ifindex, egress) {
        Forward::Verdict(v) => {
            count_n(counter, segs);
            (v, segs)
        }
        Forward::NoRoute | Forward::Excluded => {
            log::dropped_v4(ctx, log_program, Counter::DropNoRoute, ip);
            (DROP, 0)
        }
    }
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
pub fn outer_upper(ctx: &TcContext, outer: &Outer6) -> Upper {
    let mut next = outer.next_hdr();
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
fn strip_ext(ctx: &TcContext, outer: &Outer6, len: usize) -> Upper {
    if len == 0 {
        return Upper::Ipip;
    }
    let payload = outer.payload_len() as usize;
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
