//! The concentrator's fast path (SPEC §5.2).
//!
//! `server_decap` runs on ingress of the IPv6 side: IPv4-in-IPv6 to our tunnel address from a
//! bound client whose inner source is its lease is decapsulated and forwarded; everything else
//! addressed to the tunnel is dropped and counted per reason; other traffic passes.
//!
//! `server_encap` runs on ingress of the IPv4 side: IPv4 to a native lease is encapsulated
//! toward the client and redirected out of the IPv6 side. Everything else passes, so the kernel
//! routes the pool to the TUN and in-band clients keep working (the slow path).
use aya_ebpf::{macros::classifier, programs::TcContext};
use network_types::ip::Ipv6Hdr;
use tunnel_common::stats::Counter;
use tunnel_ebpf::{
    maps::{BIND_BY_V4, BIND_BY_V6, config},
    packet::{
        self, DROP, ETH_LEN, ETH_P_IP, ETH_P_IPV6, INNER_OFF, IPPROTO_IPIP, Ipv4Info, PASS, eq16,
    },
    route::{self, Forward},
    stats::{count, count_n},
};

#[classifier]
pub fn server_decap(ctx: TcContext) -> i32 {
    let Some(cfg) = config() else { return PASS };
    if packet::eth_proto(&ctx) != Some(ETH_P_IPV6) {
        return PASS;
    }
    let Ok(outer) = ctx.load::<Ipv6Hdr>(ETH_LEN) else {
        return PASS;
    };
    if outer.next_hdr != IPPROTO_IPIP || !eq16(&outer.dst_addr, &cfg.local) {
        return PASS;
    }
    // SAFETY: the value is copied out before anything can change the map entry's meaning.
    let Some(binding) = (unsafe { BIND_BY_V6.get(outer.src_addr) }).copied() else {
        count(Counter::DropUnboundSource);
        return DROP;
    };
    match ctx.load::<u8>(INNER_OFF) {
        Ok(v) if v >> 4 == 4 => {}
        Ok(_) => {
            count(Counter::DropInnerNotIpv4);
            return DROP;
        }
        Err(_) => {
            count(Counter::DropInnerMalformed);
            return DROP;
        }
    }
    let Some(inner) = Ipv4Info::load(&ctx, INNER_OFF) else {
        count(Counter::DropInnerMalformed);
        return DROP;
    };
    if inner.src() != binding.ipv4 {
        count(Counter::DropInnerSourceNotLease);
        return DROP;
    }
    let Ok(segs) = packet::unwrap_counted(&ctx, &inner, cfg.mss, Counter::Decap) else {
        return DROP;
    };

    // Forward it ourselves when the FIB has a plain route; the kernel handles the rest.
    let (verdict, redirected) =
        route::forward_unwrapped(&ctx, &inner, inner.dst(), cfg.tun_ifindex);
    if redirected {
        count_n(Counter::DecapRedirected, segs);
    }
    verdict
}

#[classifier]
pub fn server_encap(ctx: TcContext) -> i32 {
    let Some(cfg) = config() else { return PASS };
    if packet::eth_proto(&ctx) != Some(ETH_P_IP) {
        return PASS;
    }
    let Some(ip) = Ipv4Info::load(&ctx, ETH_LEN) else {
        return PASS;
    };
    // SAFETY: copied out at once.
    let Some(binding) = (unsafe { BIND_BY_V4.get(ip.dst()) }).copied() else {
        return PASS;
    };
    if packet::wire_len(&ctx, ETH_LEN, &ip) > cfg.inner_mtu as usize {
        // The kernel routes it to the TUN; the controller answers with ICMP
        // fragmentation-needed (DF) or fragments it.
        count(Counter::SlowPathTooBig);
        return PASS;
    }
    if ip.hdr.ttl <= 1 {
        count(Counter::SlowPathTtl);
        return PASS;
    }
    if packet::decrement_ttl(&ctx, ETH_LEN, &ip).is_err() {
        count(Counter::DropRewriteFailed);
        return DROP;
    }
    let Ok(segs) = packet::wrap_clamped(
        &ctx,
        &ip,
        &cfg.local,
        &binding.client,
        cfg.mss,
        cfg.hop_limit,
    ) else {
        return DROP;
    };
    match route::forward_v6(&ctx, &cfg.local, &binding.client, cfg.v6_ifindex, false) {
        Forward::Verdict(v) => {
            count_n(Counter::Encap, segs);
            v
        }
        Forward::NoRoute | Forward::Excluded => {
            count(Counter::DropNoRoute);
            DROP
        }
    }
}
