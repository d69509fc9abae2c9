//! `server_decap_xdp`: the common case of [`crate::server::server_decap`] in XDP, measured by
//! `cargo xtask bench` against the TC program (SPEC §9; the issue keeps it only if it wins).
//!
//! It only takes the plain case: IPv4-in-IPv6 to our tunnel address from a bound client, inner
//! source its lease, inner header without options, not a TCP SYN (MSS clamping), TTL above 1,
//! and a FIB route with a resolved neighbour that is not the TUN. It then rewrites the frame in
//! place (new Ethernet header over the end of the IPv6 header, TTL and checksum), moves the
//! packet start past the old headers and redirects. Everything else is passed on unchanged,
//! so the TC program behind it decides, drops and counts exactly as without XDP; only the
//! drops that need no decision (unbound source, spoofed inner source) are taken here.
use core::mem;

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup, xdp_action},
    helpers::generated::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_xdp_adjust_head},
    macros::xdp,
    programs::XdpContext,
};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};
use tunnel_common::{fastpath::IPV6_HEADER_LEN, stats::Counter};
use tunnel_ebpf::{
    maps::{BIND_BY_V6, config, count_client},
    packet::{ETH_LEN, ETH_P_IP, ETH_P_IPV6, INNER_OFF, IPPROTO_IPIP, IPPROTO_TCP, eq16},
    route::v4_lookup,
    stats::count,
};

const PASS: u32 = xdp_action::XDP_PASS;
const DROP: u32 = xdp_action::XDP_DROP;
/// TCP flags byte offset in the TCP header, and the SYN bit.
const TCP_FLAGS_OFF: usize = 13;
const TCP_SYN: u8 = 0x02;

/// A pointer to a `T` at `off`, when the packet is long enough (the verifier's bounds check).
#[inline(always)]
fn at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + off + mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + off) as *mut T)
}

#[xdp]
pub fn server_decap_xdp(ctx: XdpContext) -> u32 {
    // SAFETY: every pointer comes from `at`, which checked it against the packet's end.
    unsafe { decap(&ctx) }.unwrap_or(PASS)
}

#[inline(always)]
unsafe fn decap(ctx: &XdpContext) -> Option<u32> {
    let cfg = config()?;
    let proto: *const [u8; 2] = at(ctx, 12)?;
    if u16::from_be_bytes(unsafe { *proto }) != ETH_P_IPV6 {
        return None;
    }
    let outer: *const Ipv6Hdr = at(ctx, ETH_LEN)?;
    let outer = unsafe { &*outer };
    if outer.next_hdr != IPPROTO_IPIP || !eq16(&outer.dst_addr, &cfg.local) {
        return None;
    }
    // SAFETY: copied out at once.
    let Some(binding) = (unsafe { BIND_BY_V6.get(outer.src_addr) }).copied() else {
        count(Counter::DropUnboundSource);
        return Some(DROP);
    };
    let inner: *mut Ipv4Hdr = at(ctx, INNER_OFF)?;
    let inner = unsafe { &mut *inner };
    // Options, other versions and short packets: the TC program sorts them out.
    if inner.vihl != 0x45 {
        return None;
    }
    if u32::from_ne_bytes(inner.src_addr) != binding.ipv4 {
        count(Counter::DropInnerSourceNotLease);
        return Some(DROP);
    }
    if inner.ttl <= 1 {
        return None;
    }
    if inner.proto == IPPROTO_TCP {
        let flags: *const u8 = at(ctx, INNER_OFF + 20 + TCP_FLAGS_OFF)?;
        if unsafe { *flags } & TCP_SYN != 0 {
            return None; // MSS clamping is the TC program's
        }
    }
    let mut p: bpf_fib_lookup = v4_lookup(
        ctx.ingress_ifindex() as u32,
        u32::from_ne_bytes(inner.src_addr),
        u32::from_ne_bytes(inner.dst_addr),
        inner.tos,
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
    if rc != BPF_FIB_LKUP_RET_SUCCESS || p.ifindex == cfg.tun_ifindex {
        return None;
    }
    // TTL - 1 and the matching checksum update (RFC 1624), as the kernel's ip_decrease_ttl.
    inner.ttl -= 1;
    let check = u32::from(u16::from_ne_bytes(inner.check)) + u32::from(0x0100u16.to_be());
    inner.check = ((check + u32::from(check >= 0xffff)) as u16).to_ne_bytes();
    // The new Ethernet header ends where the IPv4 header starts.
    let eth: *mut [u8; ETH_LEN] = at(ctx, IPV6_HEADER_LEN as usize)?;
    let eth = unsafe { &mut *eth };
    eth[..6].copy_from_slice(&p.dmac);
    eth[6..12].copy_from_slice(&p.smac);
    eth[12..].copy_from_slice(&ETH_P_IP.to_be_bytes());
    // SAFETY: plain helper call; no packet pointer is used after it.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, IPV6_HEADER_LEN as i32) } != 0 {
        return Some(DROP);
    }
    count(Counter::Decap);
    count(Counter::DecapRedirected);
    let bytes = (ctx.data_end() - ctx.data()).saturating_sub(ETH_LEN) as u64;
    count_client(binding.slot, true, 1, bytes);
    // SAFETY: plain helper call.
    Some(unsafe { bpf_redirect(p.ifindex, 0) } as u32)
}
