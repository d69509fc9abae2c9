//! The concentrator's fast path (SPEC §5.2).
//!
//! `server_decap` runs on ingress of the IPv6 side: IPv4-in-IPv6 to our tunnel address from a
//! bound client whose inner source is its lease is decapsulated and forwarded (after any
//! Hop-by-Hop or Destination Options headers are removed); a packet from no native client is
//! a B4's, checked against the softwires (`server_decap_softwire`). Outer fragments from B4s
//! go to the kernel's reassembly and the controller's slow path; every other IPv4-in-IPv6
//! packet addressed to the tunnel (native clients' outer fragments, too many extension
//! headers, policy violations) is dropped and counted per reason; other traffic passes.
//!
//! `server_encap` runs on ingress of the IPv4 side: IPv4 to a native lease, or to a softwire's
//! address and port, is encapsulated toward the client or B4 and redirected out of the IPv6
//! side; fragments and too-big packets toward softwires are redirected to the TUN (the
//! controller reassembles and fragments them). Everything else passes, so the kernel routes
//! the pool to the TUN and in-band clients keep working (the slow path).
use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_skb_load_bytes, generated::bpf_redirect},
    macros::classifier,
    programs::TcContext,
};
use tunnel_common::{
    fastpath::{POLICY_QUOTE, PolicyEvent, SharedAddr, SoftwireEntry, TunnelConfig},
    names::{LOG_SERVER_DECAP, LOG_SERVER_ENCAP, TAIL_SERVER_DECAP_SOFTWIRE, TAIL_SERVER_HAIRPIN},
    stats::Counter,
};
use tunnel_ebpf::{
    direct::{Key16, map_words},
    encap::{self, Upper},
    log,
    maps::{
        BIND_BY_V4, BIND_BY_V6, POLICY_EVENTS, POLICY_LAST, TAIL_PROGS, binding_of, config,
        count_client,
    },
    nat,
    packet::{
        self, DROP, ETH_LEN, ETH_P_IP, ETH_P_IPV6, INNER_OFF, IPPROTO_IPIP, Ipv4Info, NotIpv4,
        Outer6, PASS, eq_words,
    },
    route,
    softwire::{self, Miss},
    stats::{count, count_n},
};

#[classifier]
pub fn server_decap(ctx: TcContext) -> i32 {
    let Some(cfg) = config() else { return PASS };
    if packet::eth_proto(&ctx) != Some(ETH_P_IPV6) {
        return PASS;
    }
    let Some(outer) = Outer6::load(&ctx) else {
        return PASS;
    };
    if !eq_words(&outer.dst, &map_words(&cfg.local)) && !softwire::is_aftr(Key16(outer.dst).bytes())
    {
        return PASS;
    }
    match encap::outer_upper(&ctx, &outer) {
        Upper::Ipip => {}
        // The tunnel address may also be the control channel's (--listen): its TCP, and
        // ICMPv6 for it, are the stack's.
        Upper::Other(_) => return PASS,
        Upper::Fragment(next) if next != IPPROTO_IPIP => return PASS,
        // A B4's datagram too big for its link: the kernel reassembles it and hands it to
        // the controller's raw socket, which checks it against the softwire table.
        // SAFETY: only the presence of a binding is read.
        Upper::Fragment(_)
            if cfg.softwire_slow_path != 0
                && unsafe { BIND_BY_V6.get(outer.src_key().bytes()) }.is_none() =>
        {
            count(Counter::SoftwireOuterFragment);
            return PASS;
        }
        other => return other.drop_counted(),
    }
    let Some(binding) = binding_of(outer.src, cfg.bind_cache_bits) else {
        // A B4's, perhaps: the softwire checks are a program of their own (the verifier
        // and the stack limit take each program alone), and this one's hot path stays as
        // it is.
        // SAFETY: the tail call does not return when it succeeds.
        unsafe { TAIL_PROGS.tail_call(&ctx, TAIL_SERVER_DECAP_SOFTWIRE) };
        return unbound(&ctx, cfg, &outer);
    };
    let inner = match Ipv4Info::parse(&ctx, INNER_OFF) {
        Ok(inner) => inner,
        Err(why) => {
            let reason = match why {
                NotIpv4::OtherVersion => Counter::DropInnerNotIpv4,
                NotIpv4::Malformed => Counter::DropInnerMalformed,
            };
            log::dropped_ipip_unparsed(&ctx, LOG_SERVER_DECAP, reason, &outer.src);
            return DROP;
        }
    };
    if inner.src() != binding.ipv4 {
        let reason = Counter::DropInnerSourceNotLease;
        log::dropped_ipip(&ctx, LOG_SERVER_DECAP, reason, &outer.src, &inner);
        policy_event(&ctx, cfg);
        return DROP;
    }
    let Ok(segs) = encap::unwrap_for_forwarding(&ctx, &inner, cfg.mss, Counter::Decap) else {
        return DROP;
    };
    count_client(binding.slot, true, segs, inner_bytes(&ctx));

    // Forward it ourselves when the FIB has a plain route; the kernel handles the rest.
    let (verdict, redirected) =
        route::forward_unwrapped::<true>(&ctx, &inner, inner.dst(), cfg.tun_ifindex);
    if redirected {
        count_n(Counter::DecapRedirected, segs);
    }
    verdict
}

/// A packet from an IPv6 source that no native client is bound to: a B4's, when its inner
/// source address and port belong to a softwire of that B4 (RFC 7596 §5.1). Then it is
/// decapsulated and forwarded, or re-encapsulated toward another softwire (hairpinning).
/// Tail-called by `server_decap` with the outer header alone in front of the inner packet.
#[classifier]
pub fn server_decap_softwire(ctx: TcContext) -> i32 {
    let Some(cfg) = config() else { return PASS };
    let Some(outer) = Outer6::load(&ctx) else {
        return DROP;
    };
    softwire_decap(&ctx, cfg, &outer)
}

/// Counts (and logs, and reports) a packet from an IPv6 source that holds nothing: DROP.
#[inline(always)]
fn unbound(ctx: &TcContext, cfg: &TunnelConfig, outer: &Outer6) -> i32 {
    let reason = Counter::DropUnboundSource;
    log::dropped_ipip_unparsed(ctx, LOG_SERVER_DECAP, reason, &outer.src);
    policy_event(ctx, cfg);
    DROP
}

#[inline(always)]
fn softwire_decap(ctx: &TcContext, cfg: &TunnelConfig, outer: &Outer6) -> i32 {
    let Ok(inner) = Ipv4Info::parse(ctx, INNER_OFF) else {
        return unbound(ctx, cfg, outer);
    };
    let Some(addr) = softwire::shared(inner.src()) else {
        return unbound(ctx, cfg, outer);
    };
    let port = nat::br_port(ctx, INNER_OFF, &inner, true);
    let holds = || softwire::b4_holds(&outer.src_bytes(), inner.src());
    let outside_or = |other: Counter| {
        if holds() {
            Some(Counter::DropPortOutsideSet)
        } else {
            Some(other)
        }
    };
    let refused = match softwire::psid(&addr, port) {
        Ok(psid) => match softwire::get(inner.src(), psid) {
            Some(sw) if eq_words(&map_words(&sw.b4), &outer.src) => {
                if eq_words(&map_words(&sw.aftr), &outer.dst) {
                    None
                } else {
                    Some(Counter::DropB4Mismatch)
                }
            }
            Some(_) => outside_or(Counter::DropB4Mismatch),
            None => outside_or(Counter::DropNoBindingForPort),
        },
        Err(Miss::Outside) => outside_or(Counter::DropNoBindingForPort),
        // The first fragment carried the port and was checked; the rest of a B4's own
        // datagram follows it.
        Err(Miss::NoPort) if !inner.first_fragment() && holds() => None,
        Err(Miss::NoPort) => Some(Counter::DropNoBindingForPort),
    };
    if let Some(reason) = refused {
        log::dropped_ipip(ctx, LOG_SERVER_DECAP, reason, &outer.src, &inner);
        policy_event(ctx, cfg);
        return DROP;
    }
    if inner.ttl() > 1 && softwire::shared(inner.dst()).is_some() {
        // SAFETY: the tail call does not return when it succeeds.
        unsafe { TAIL_PROGS.tail_call(ctx, TAIL_SERVER_HAIRPIN) };
        count(Counter::DropRewriteFailed);
        return DROP;
    }
    if encap::unwrap_for_forwarding(ctx, &inner, cfg.mss, Counter::Decap).is_err() {
        return DROP;
    }
    route::forward_unwrapped::<true>(ctx, &inner, inner.dst(), cfg.tun_ifindex).0
}

/// A checked packet from one softwire to the address `to` of others: re-encapsulated toward
/// the softwire of its destination port, from that softwire's AFTR address, without leaving
/// the AFTR (RFC 7596 §7.1); dropped under `--no-hairpin` or when no softwire holds the port.
/// Tail-called by `server_decap_softwire` (a program of its own for the stack limit).
#[classifier]
pub fn server_hairpin(ctx: TcContext) -> i32 {
    let Some(cfg) = config() else { return PASS };
    let (Some(outer), Some(inner)) = (Outer6::load(&ctx), Ipv4Info::load(&ctx, INNER_OFF)) else {
        return DROP;
    };
    let outer_src = outer.src;
    let Some(to) = softwire::shared(inner.dst()) else {
        return DROP;
    };
    hairpin(&ctx, cfg, &inner, &to, &outer_src)
}

#[inline(always)]
fn hairpin(
    ctx: &TcContext,
    cfg: &TunnelConfig,
    inner: &Ipv4Info,
    to: &SharedAddr,
    outer_src: &[u64; 2],
) -> i32 {
    if cfg.no_hairpin != 0 {
        log::dropped_ipip(
            ctx,
            LOG_SERVER_DECAP,
            Counter::DropHairpinOff,
            outer_src,
            inner,
        );
        return DROP;
    }
    let port = nat::br_port(ctx, INNER_OFF, inner, false);
    let Some(sw) = softwire::psid(to, port)
        .ok()
        .and_then(|psid| softwire::get(inner.dst(), psid))
    else {
        let reason = Counter::DropNoBindingForPort;
        log::dropped_ipip(ctx, LOG_SERVER_DECAP, reason, outer_src, inner);
        return DROP;
    };
    if encap::unwrap_counted(ctx, inner, cfg.mss, Counter::Decap).is_err() {
        return DROP;
    }
    count(Counter::Hairpinned);
    let (verdict, _) = encap::send_wrapped_from::<true>(
        ctx,
        inner,
        inner.w1_rewritten(true, inner.src()),
        cfg,
        &map_words(&sw.aftr),
        &map_words(&sw.b4),
        false,
        Counter::Encap,
        LOG_SERVER_DECAP,
    );
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
        DropInnerMalformed,
        DropPortOutsideSet,
        DropNoBindingForPort,
        DropB4Mismatch,
        DropHairpinOff,
        DropNoRoute
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
    // The binding's traffic slot, NO_SLOT for a softwire (a plain integer: an Option's unset
    // payload, copied on the softwire path, is a register the verifier refuses to read).
    const NO_SLOT: u32 = u32::MAX;
    // SAFETY: map values live as long as the map.
    let (src, dst, slot) = match unsafe { BIND_BY_V4.get(ip.dst()) } {
        Some(binding) => (
            map_words(&cfg.local),
            map_words(&binding.client),
            binding.slot,
        ),
        None => match softwire_toward(&ctx, cfg, &ip) {
            Ok(sw) => (map_words(&sw.aftr), map_words(&sw.b4), NO_SLOT),
            Err(verdict) => return verdict,
        },
    };
    let bytes = inner_bytes(&ctx);
    let (verdict, segs) = encap_toward(&ctx, cfg, &ip, &src, &dst);
    if slot != NO_SLOT && segs > 0 {
        count_client(slot, false, segs, bytes);
    }
    verdict
}

/// IPv4 to an address no native client is bound to: the softwire of its destination port,
/// when softwires use that address; else the verdict (other addresses pass: the slow path).
#[inline(always)]
fn softwire_toward(
    ctx: &TcContext,
    cfg: &TunnelConfig,
    ip: &Ipv4Info,
) -> Result<&'static SoftwireEntry, i32> {
    let Some(addr) = softwire::shared(ip.dst()) else {
        return Err(PASS);
    };
    // Fragments (only the first names the port) and packets too big for the tunnel go to
    // the controller where it reassembles and fragments (pure lwAFTR); left to the kernel,
    // they would follow its routes for the address, which lead back out.
    let fragment = ip.fragment();
    let too_big = packet::wire_len(ctx, ETH_LEN, ip) > cfg.inner_mtu as usize;
    if fragment || too_big {
        if cfg.softwire_slow_path != 0 && cfg.tun_ifindex != 0 {
            count(Counter::SoftwireSlowPath);
            // SAFETY: bpf_redirect has no memory preconditions.
            return Err(unsafe { bpf_redirect(cfg.tun_ifindex, 0) } as i32);
        }
        let reason = if fragment {
            Counter::DropFragmentToSoftwire
        } else {
            Counter::DropTooBigForSoftwire
        };
        log::dropped_v4(ctx, LOG_SERVER_ENCAP, reason, ip);
        return Err(DROP);
    }
    let sw = match softwire::psid(&addr, nat::br_port(ctx, ETH_LEN, ip, false)) {
        Ok(psid) => softwire::get(ip.dst(), psid),
        Err(_) => None,
    };
    sw.ok_or_else(|| {
        log::dropped_v4(ctx, LOG_SERVER_ENCAP, Counter::DropNoBindingForPort, ip);
        DROP
    })
}

/// Encapsulates `ip` `src` → `dst` and sends it toward the client, or leaves it to the slow
/// path (too big, TTL expiring). Returns the verdict and the segments sent.
#[inline(always)]
fn encap_toward(
    ctx: &TcContext,
    cfg: &TunnelConfig,
    ip: &Ipv4Info,
    src: &[u64; 2],
    dst: &[u64; 2],
) -> (i32, u64) {
    if packet::wire_len(ctx, ETH_LEN, ip) > cfg.inner_mtu as usize {
        // The kernel routes it to the TUN; the controller answers with ICMP
        // fragmentation-needed (DF) or fragments it.
        log::slow_path(ctx, LOG_SERVER_ENCAP, Counter::SlowPathTooBig, ip);
        return (PASS, 0);
    }
    if ip.ttl() <= 1 {
        log::slow_path(ctx, LOG_SERVER_ENCAP, Counter::SlowPathTtl, ip);
        return (PASS, 0);
    }
    encap::send_wrapped_from::<true>(
        ctx,
        ip,
        ip.w1_rewritten(true, ip.src()),
        cfg,
        src,
        dst,
        false,
        Counter::Encap,
        LOG_SERVER_ENCAP,
    )
}

tunnel_ebpf::logger!(
    log_server_encap,
    "server_encap",
    [
        SlowPathTooBig,
        SlowPathTtl,
        DropNoRoute,
        DropNoBindingForPort,
        DropFragmentToSoftwire,
        DropTooBigForSoftwire
    ]
);

/// The IPv4 bytes of a packet whose IPv4 header follows the Ethernet header (all segments of a
/// GSO packet).
#[inline(always)]
fn inner_bytes(ctx: &TcContext) -> u64 {
    u64::from(ctx.len()).saturating_sub(ETH_LEN as u64)
}
