//! `server_decap_xdp`: the common case of [`crate::server::server_decap`] in XDP, for the
//! server's IPv6 side on NICs with native XDP (`server --xdp`), and measured by
//! `cargo xtask bench` against the TC program (SPEC §9).
//!
//! It only takes the plain case: IPv4-in-IPv6 to our tunnel address from a bound client, inner
//! source its lease, inner header without options, not a TCP SYN (MSS clamping), TTL above 1,
//! and a next hop (cache or FIB) with a resolved neighbour that is not the TUN and whose MTU
//! the packet fits. It then rewrites the frame in place (new Ethernet header over the end of
//! the IPv6 header, TTL and checksum), moves the packet start past the old headers and
//! redirects. Everything else is passed on unchanged, so the TC program behind it decides,
//! drops and counts exactly as without XDP; only the drops that need no decision (unbound
//! source, spoofed inner source) are taken here.
use core::mem;

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup, xdp_action},
    helpers::generated::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_xdp_adjust_head},
    macros::xdp,
    programs::XdpContext,
};
use tunnel_common::{fastpath::IPV6_HEADER_LEN, nexthop::NH_FORWARD, stats::Counter};
use tunnel_ebpf::{
    direct::{View, map_words, store16, store32, store64},
    maps::{binding_of, config, count_client},
    nexthop,
    packet::{ETH_LEN, ETH_P_IP, ETH_P_IPV6, INNER_OFF, IPPROTO_IPIP, IPPROTO_TCP, Ipv4Info},
    route::{eth_of, v4_lookup},
    stats::count,
};

pub const PASS: u32 = xdp_action::XDP_PASS;
pub const DROP: u32 = xdp_action::XDP_DROP;
/// The TCP flags byte in the TCP header, and the SYN bit.
const TCP_FLAGS_OFF: usize = 13;
const TCP_SYN: u8 = 0x02;

#[xdp]
pub fn server_decap_xdp(ctx: XdpContext) -> u32 {
    decap(&ctx).unwrap_or(PASS)
}

#[inline(always)]
fn decap(ctx: &XdpContext) -> Option<u32> {
    let cfg = config()?;
    let (v, inner) = ipip_to(ctx, &map_words(&cfg.local))?;
    // No native client: a B4's (softwires), or one to drop; the TC program decides.
    let binding = binding_of(v.addr6(ETH_LEN + 8), cfg.bind_cache_bits)?;
    if inner.src() != binding.ipv4 {
        count(Counter::DropInnerSourceNotLease);
        return Some(DROP);
    }
    let (ifindex, len) = match forward_unwrapped(ctx, &v, &inner, cfg.tun_ifindex)? {
        Ok(out) => out,
        Err(()) => return Some(DROP),
    };
    count(Counter::Decap);
    count(Counter::DecapRedirected);
    count(Counter::XdpDecap);
    count_client(binding.slot, true, 1, u64::from(len) - ETH_LEN as u64);
    // SAFETY: plain helper call.
    Some(unsafe { bpf_redirect(ifindex, 0) } as u32)
}

/// The plain case's frame: Ethernet + IPv6 (no extension header) carrying IPIP to `local`,
/// the inner IPv4 header without options, TTL above 1, and for TCP not a SYN (MSS clamping is
/// the TC program's); with `v` holding at least the inner header and, for TCP and UDP, the
/// ports and TCP flags. None: not the plain case.
#[inline(always)]
pub fn ipip_to(ctx: &XdpContext, local: &[u64; 2]) -> Option<(View, Ipv4Info)> {
    let v = View::from_bounds(ctx.data(), ctx.data_end());
    if !v.holds(INNER_OFF + 20) || u16::from_be(v.w16(12)) != ETH_P_IPV6 {
        return None;
    }
    let outer_w0 = v.w64(ETH_LEN);
    if (outer_w0 >> 48) as u8 != IPPROTO_IPIP || v.addr6(ETH_LEN + 24) != *local {
        return None;
    }
    let inner = Ipv4Info::from_words(
        v.w64(INNER_OFF),
        v.w64(INNER_OFF + 8),
        v.w32(INNER_OFF + 16),
    )
    .ok()?;
    // Options and odd headers: the TC program sorts them out.
    if inner.ihl != 20 || inner.ttl() <= 1 {
        return None;
    }
    if inner.proto() == IPPROTO_TCP {
        if !v.holds(INNER_OFF + 20 + TCP_FLAGS_OFF + 1) {
            return None;
        }
        if v.u8(INNER_OFF + 20 + TCP_FLAGS_OFF) & TCP_SYN != 0 {
            return None; // MSS clamping is the TC program's
        }
    }
    Some((v, inner))
}

/// Sends the inner packet of a plain-case frame on: with a next hop (cache or FIB) whose
/// neighbour is resolved, that is not the TUN (`tun_ifindex`) and whose MTU it fits, the frame
/// is rewritten in place (new Ethernet header over the end of the IPv6 header, TTL and
/// checksum) and its start moved past the old headers. Returns the interface to redirect to
/// and the new frame's length; None: leave the packet to the TC program; Err: the helper
/// failed (drop).
#[inline(always)]
pub fn forward_unwrapped(
    ctx: &XdpContext,
    v: &View,
    inner: &Ipv4Info,
    tun_ifindex: u32,
) -> Option<Result<(u32, u32), ()>> {
    // The frame once decapsulated: length, and where the new Ethernet header goes.
    let len = (ctx.data_end() - ctx.data()) as u32 - u32::from(IPV6_HEADER_LEN);
    let (eth, ifindex) = match nexthop::get4(inner.dst()) {
        Some(nh) => {
            if nh.kind != NH_FORWARD || nh.ifindex == tun_ifindex || len > nh.mtu + ETH_LEN as u32 {
                return None;
            }
            (map_words(&nh.eth), nh.ifindex)
        }
        None => {
            let mut p: bpf_fib_lookup = v4_lookup(
                ctx.ingress_ifindex() as u32,
                inner.src(),
                inner.dst(),
                inner.tos(),
            );
            // SAFETY: the helper reads and writes `p`, whose size we pass.
            let rc = unsafe {
                fib_lookup(
                    ctx.ctx.cast(),
                    &mut p,
                    mem::size_of::<bpf_fib_lookup>() as i32,
                    0,
                )
            } as u32;
            if rc != BPF_FIB_LKUP_RET_SUCCESS || p.ifindex == tun_ifindex {
                return None;
            }
            (eth_of(&p, ETH_P_IP), p.ifindex)
        }
    };
    // The new Ethernet header ends where the IPv4 header starts; TTL − 1 with its checksum.
    let at = v.addr(IPV6_HEADER_LEN as usize);
    // SAFETY: all within the INNER_OFF + 20 bytes checked above (through `v`, whose range the
    // verifier knows).
    unsafe {
        store64(at, (eth[0] >> 16) | (eth[1] << 48));
        store32(at + 8, (eth[1] >> 16) as u32);
        store16(at + 12, (eth[1] >> 48) as u16);
        store32(v.addr(INNER_OFF + 8), inner.ttl_decremented());
    }
    // SAFETY: plain helper call; no packet pointer is used after it.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, IPV6_HEADER_LEN as i32) } != 0 {
        return Some(Err(()));
    }
    Some(Ok((ifindex, len)))
}
