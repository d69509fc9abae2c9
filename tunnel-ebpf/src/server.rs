//! The concentrator's fast path (SPEC §5.2).
//!
//! `server_decap` runs on ingress of the IPv6 side: IPv4-in-IPv6 to our tunnel address from a
//! bound client whose inner source is its lease is decapsulated and forwarded (after any
//! Hop-by-Hop or Destination Options headers are removed); every other IPv4-in-IPv6 packet
//! addressed to the tunnel (outer fragments, too many extension headers, policy violations)
//! is dropped and counted per reason; other traffic passes.
//!
//! `server_encap` runs on ingress of the IPv4 side: IPv4 to a native lease is encapsulated
//! toward the client and redirected out of the IPv6 side. Everything else passes, so the kernel
//! routes the pool to the TUN and in-band clients keep working (the slow path).
use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_skb_load_bytes},
    macros::classifier,
    programs::TcContext,
};
use network_types::ip::Ipv6Hdr;
use tunnel_common::{
    fastpath::{POLICY_QUOTE, PolicyEvent, TunnelConfig},
    names::{LOG_SERVER_DECAP, LOG_SERVER_ENCAP},
    stats::Counter,
};
use tunnel_ebpf::{
    encap::{self, Upper},
    log,
    maps::{BIND_BY_V4, BIND_BY_V6, POLICY_EVENTS, POLICY_LAST, config, count_client},
    packet::{
        self, DROP, ETH_LEN, ETH_P_IP, ETH_P_IPV6, INNER_OFF, IPPROTO_IPIP, Ipv4Info, NotIpv4,
        PASS, eq16,
    },
    route,
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
    if !eq16(&outer.dst_addr, &cfg.local) {
        return PASS;
    }
    match encap::outer_upper(&ctx, &outer) {
        Upper::Ipip => {}
        // The tunnel address may also be the control channel's (--listen): its TCP, and
        // ICMPv6 for it, are the stack's.
        Upper::Other(_) => return PASS,
        Upper::Fragment(next) if next != IPPROTO_IPIP => return PASS,
        other => return other.drop_counted(),
    }
    // SAFETY: the value is copied out before anything can change the map entry's meaning.
    let Some(binding) = (unsafe { BIND_BY_V6.get(outer.src_addr) }).copied() else {
        let reason = Counter::DropUnboundSource;
        log::dropped_ipip_unparsed(&ctx, LOG_SERVER_DECAP, reason, &outer.src_addr);
        policy_event(&ctx, cfg);
        return DROP;
    };
    let inner = match Ipv4Info::parse(&ctx, INNER_OFF) {
        Ok(inner) => inner,
        Err(why) => {
            let reason = match why {
                NotIpv4::OtherVersion => Counter::DropInnerNotIpv4,
                NotIpv4::Malformed => Counter::DropInnerMalformed,
            };
            log::dropped_ipip_unparsed(&ctx, LOG_SERVER_DECAP, reason, &outer.src_addr);
            return DROP;
        }
    };
    if inner.src() != binding.ipv4 {
        let reason = Counter::DropInnerSourceNotLease;
        log::dropped_ipip(&ctx, LOG_SERVER_DECAP, reason, &outer.src_addr, &inner);
        policy_event(&ctx, cfg);
        return DROP;
    }
    let Ok(segs) = encap::unwrap_for_forwarding(&ctx, &inner, cfg.mss, Counter::Decap) else {
        return DROP;
    };
    count_client(binding.slot, true, segs, inner_bytes(&ctx));

    // Forward it ourselves when the FIB has a plain route; the kernel handles the rest.
    let (verdict, redirected) =
        route::forward_unwrapped(&ctx, &inner, inner.dst(), cfg.tun_ifindex);
    if redirected {
        count_n(Counter::DecapRedirected, segs);
    }
    verdict
}

/// Hands a packet that failed the source policy to the controller (which may answer with
/// ICMPv6 "source address failed ingress/egress policy", RFC 7596 §5.1), at most
/// `policy_events_per_s` per second on this CPU. Off (nothing copied) when that is 0.
#[inline(always)]
fn policy_event(ctx: &TcContext, cfg: &TunnelConfig) {
    let rate = u64::from(cfg.policy_events_per_s);
    if rate == 0 {
        return;
    }
    let Some(last) = POLICY_LAST.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: a per-CPU slot from a successful lookup, used on this CPU only.
    if now.wrapping_sub(unsafe { *last }) < 1_000_000_000 / rate {
        return;
    }
    let Some(mut event) = POLICY_EVENTS.reserve::<PolicyEvent>(0) else {
        return;
    };
    let avail = (ctx.len() as usize).saturating_sub(ETH_LEN);
    let len = if avail > POLICY_QUOTE {
        POLICY_QUOTE
    } else {
        avail
    };
    let ptr = event.as_mut_ptr();
    // SAFETY: the entry is reserved for us; `len` is at most the buffer's size. The verifier
    // checks both the bound and the non-zero length.
    let ok = len >= 40
        && unsafe {
            bpf_skb_load_bytes(
                ctx.skb.skb as *const _,
                ETH_LEN as u32,
                (*ptr).packet.as_mut_ptr().cast(),
                len as u32,
            )
        } == 0;
    if !ok {
        event.discard(0);
        return;
    }
    // SAFETY: as above.
    unsafe {
        (*ptr).len = len as u32;
        (*ptr)._pad = 0;
        *last = now;
    }
    event.submit(0);
}

tunnel_ebpf::logger!(
    log_server_decap,
    "server_decap",
    [
        DropUnboundSource,
        DropInnerSourceNotLease,
        DropInnerNotIpv4,
        DropInnerMalformed
    ]
);

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
        log::slow_path(&ctx, LOG_SERVER_ENCAP, Counter::SlowPathTooBig, &ip);
        return PASS;
    }
    if ip.hdr.ttl <= 1 {
        log::slow_path(&ctx, LOG_SERVER_ENCAP, Counter::SlowPathTtl, &ip);
        return PASS;
    }
    if packet::decrement_ttl(&ctx, ETH_LEN, &ip).is_err() {
        count(Counter::DropRewriteFailed);
        return DROP;
    }
    let bytes = inner_bytes(&ctx);
    let (verdict, segs) = encap::send_wrapped(
        &ctx,
        &ip,
        cfg,
        &binding.client,
        false,
        Counter::Encap,
        LOG_SERVER_ENCAP,
    );
    if segs > 0 {
        count_client(binding.slot, false, segs, bytes);
    }
    verdict
}

tunnel_ebpf::logger!(
    log_server_encap,
    "server_encap",
    [SlowPathTooBig, SlowPathTtl, DropNoRoute]
);

/// The IPv4 bytes of a packet whose IPv4 header follows the Ethernet header (all segments of a
/// GSO packet).
#[inline(always)]
fn inner_bytes(ctx: &TcContext) -> u64 {
    u64::from(ctx.len()).saturating_sub(ETH_LEN as u64)
}
