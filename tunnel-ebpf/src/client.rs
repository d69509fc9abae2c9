//! A native client's data path (SPEC §5.2, the mirror image of the server).
//!
//! How IPv4 reaches `client_encap`: the controller puts the lease on the IPv6 interface as a
//! /32 and routes 0.0.0.0/1 + 128.0.0.0/1 via 192.0.0.1 (RFC 7335's softwire next hop) on
//! that interface, with a permanent neighbour entry for it, so the kernel emits ordinary
//! Ethernet + IPv4 frames there without ever ARPing. On egress the program wraps the lease's
//! IPv4 packets in IPv6 to the server and fixes the MAC addresses from the IPv6 FIB. On
//! ingress `client_decap` unwraps IPv4-in-IPv6 from the server to us, and the kernel delivers
//! the inner packet locally (the lease is a local address).
use aya_ebpf::{macros::classifier, programs::TcContext};
use tunnel_common::{
    names::{LOG_CLIENT_DECAP, LOG_CLIENT_ENCAP},
    stats::Counter,
};
use tunnel_ebpf::{
    direct::map_words,
    encap::{self, Upper},
    log,
    maps::config,
    packet::{
        self, DROP, ETH_LEN, ETH_P_IP, ETH_P_IPV6, INNER_OFF, IPPROTO_IPIP, Ipv4Info, Outer6, PASS,
        eq_words,
    },
};

#[classifier]
pub fn client_encap(ctx: TcContext) -> i32 {
    let Some(cfg) = config() else { return PASS };
    if packet::eth_proto(&ctx) != Some(ETH_P_IP) {
        return PASS;
    }
    let Some(ip) = Ipv4Info::load(&ctx, ETH_LEN) else {
        return PASS;
    };
    if ip.src() != cfg.ipv4 {
        // Not the tunnel's traffic (the interface may carry native IPv4 too).
        return PASS;
    }
    encap::send_wrapped::<false>(
        &ctx,
        &ip,
        ip.w1,
        cfg,
        &map_words(&cfg.remote),
        true,
        Counter::ClientEncap,
        LOG_CLIENT_ENCAP,
    )
    .0
}

tunnel_ebpf::logger!(log_client_encap, "client_encap", [DropNoRoute]);

#[classifier]
pub fn client_decap(ctx: TcContext) -> i32 {
    let Some(cfg) = config() else { return PASS };
    if packet::eth_proto(&ctx) != Some(ETH_P_IPV6) {
        return PASS;
    }
    let Some(outer) = Outer6::load(&ctx) else {
        return PASS;
    };
    if !eq_words(&outer.dst, &map_words(&cfg.local))
        || !eq_words(&outer.src, &map_words(&cfg.remote))
    {
        return PASS;
    }
    match encap::outer_upper(&ctx, &outer) {
        Upper::Ipip => {}
        Upper::Other(_) => return PASS,
        Upper::Fragment(next) if next != IPPROTO_IPIP => return PASS,
        other => return other.drop_counted(),
    }
    let Some(inner) = Ipv4Info::load(&ctx, INNER_OFF).filter(|i| i.dst() == cfg.ipv4) else {
        let reason = Counter::ClientDropNotForLease;
        log::dropped_ipip_unparsed(&ctx, LOG_CLIENT_DECAP, reason, &outer.src);
        return DROP;
    };
    match encap::unwrap_counted(&ctx, &inner, cfg.mss, Counter::ClientDecap) {
        Ok(_) => PASS,
        Err(_) => DROP,
    }
}

tunnel_ebpf::logger!(log_client_decap, "client_decap", [ClientDropNotForLease]);
