//! The MAP-E BR (SPEC §6): stateless, driven by the rules in `BR_RULES`.
//!
//! `br_decap` runs on ingress of the IPv6 side: IPv4-in-IPv6 to the BR address is accepted
//! only when its outer source is the CE address that the rule computes from the inner source
//! address and port; then it is unwrapped (Hop-by-Hop and Destination Options headers too)
//! and forwarded. Nothing else addressed to the BR address is returned to the stack: outer
//! fragments go to the controller's TUN (it reassembles them), too long a header chain and
//! other protocols are dropped and counted. `br_encap` runs on ingress of the
//! IPv4 side: a packet to an address that a rule covers goes to the CE address computed from
//! its destination address and port.
use aya_ebpf::{
    helpers::generated::bpf_redirect,
    macros::{classifier, xdp},
    maps::lpm_trie::Key,
    programs::{TcContext, XdpContext},
};
use tunnel_common::{
    mape::{IID_DRAFT03, MapRule},
    names::{LOG_BR_DECAP, LOG_BR_ENCAP},
    stats::Counter,
};
use tunnel_ebpf::{
    direct::map_words,
    encap::{self, Upper},
    log,
    maps::{BR_RULES, config},
    nat,
    packet::{
        self, DROP, ETH_LEN, ETH_P_IP, ETH_P_IPV6, INNER_OFF, IPPROTO_TCP, IPPROTO_UDP, Ipv4Info,
        Outer6, PASS, eq_words,
    },
    route,
    stats::count,
};

use crate::server_xdp;

/// The most specific rule covering `addr` (wire order).
#[inline(always)]
fn rule_for(addr: u32) -> Option<&'static MapRule> {
    BR_RULES.get(Key::new(32, addr))
}

/// The PSID written in a CE address's interface id.
#[inline(always)]
fn psid_in(rule: &MapRule, ce: &[u64; 2]) -> u16 {
    // Bytes 8-15 of the address are the second word, byte 8 lowest.
    let b = |i: u32| (ce[1] >> (8 * (i - 8))) as u8;
    if rule.iid_layout == IID_DRAFT03 {
        u16::from_be_bytes([b(13), b(14)])
    } else {
        u16::from_be_bytes([b(14), b(15)])
    }
}

#[classifier]
pub fn br_decap(ctx: TcContext) -> i32 {
    let Some(cfg) = config() else { return PASS };
    if packet::eth_proto(&ctx) != Some(ETH_P_IPV6) {
        return PASS;
    }
    let Some(outer) = Outer6::load(&ctx) else {
        return PASS;
    };
    if !eq_words(&outer.dst, &map_words(&cfg.local)) {
        return PASS;
    }
    // The BR address is on no interface: whatever is handed back to the stack would be
    // forwarded out again (and bounce until its hop limit runs out), so nothing addressed
    // to it leaves this program but decapsulated IPv4.
    match encap::outer_upper(&ctx, &outer) {
        Upper::Ipip => {}
        Upper::Fragment(packet::IPPROTO_IPIP) => {
            // A CE's packet sent in outer fragments (RFC 2473 §7): the controller
            // reassembles it, checks it like this program does and forwards the IPv4.
            count(Counter::BrSlowPathOuterFragment);
            // SAFETY: plain helper call; the TUN takes the frame without its MAC header.
            return unsafe { bpf_redirect(cfg.tun_ifindex, 0) } as i32;
        }
        Upper::Other(_) => {
            let reason = Counter::BrDropNotIpip;
            log::dropped_ipip_unparsed(&ctx, LOG_BR_DECAP, reason, &outer.src);
            return DROP;
        }
        other => return other.drop_counted(),
    }
    let Some(inner) = Ipv4Info::load(&ctx, INNER_OFF) else {
        let reason = Counter::DropInnerMalformed;
        log::dropped_ipip_unparsed(&ctx, LOG_BR_DECAP, reason, &outer.src);
        return DROP;
    };
    let Some(rule) = rule_for(inner.src()) else {
        let reason = Counter::BrDropNoRule;
        log::dropped_ipip(&ctx, LOG_BR_DECAP, reason, &outer.src, &inner);
        return DROP;
    };
    let src = u32::from_be(inner.src());
    let expected = if inner.first_fragment() {
        let Some(port) = nat::br_port(&ctx, INNER_OFF, &inner, true) else {
            let reason = Counter::BrDropNoPort;
            log::dropped_ipip(&ctx, LOG_BR_DECAP, reason, &outer.src, &inner);
            return DROP;
        };
        rule.psid_of(port)
            .map(|psid| rule.ce_address_words(src, psid))
    } else {
        // A later fragment names no port: its CE must be one of the address's (the PSID its
        // address carries); the first fragment was checked for its port.
        Some(rule.ce_address_words(src, psid_in(rule, &outer.src)))
    };
    if !expected.is_some_and(|e| eq_words(&e, &outer.src)) {
        // A CE that is who it says (its address matches the rule for the PSID it carries)
        // but used a port outside its set, or a source the rule does not give at all.
        let own = rule.ce_address_words(src, psid_in(rule, &outer.src));
        let reason = if eq_words(&own, &outer.src) {
            Counter::BrDropPortOutsideSet
        } else {
            Counter::BrDropSourceMismatch
        };
        log::dropped_ipip(&ctx, LOG_BR_DECAP, reason, &outer.src, &inner);
        return DROP;
    }
    if encap::unwrap_for_forwarding(&ctx, &inner, cfg.mss, Counter::BrDecap).is_err() {
        return DROP;
    }
    route::forward_unwrapped::<true>(&ctx, &inner, inner.dst(), cfg.tun_ifindex).0
}

/// `br_decap_xdp`: the common case of [`br_decap`] in XDP, for the BR's IPv6 side on NICs
/// with native XDP (`br --xdp`). It takes IPIP to the BR address whose outer source is the CE
/// address the rule gives for the inner TCP or UDP source address and port, unfragmented, in
/// the plain shape the server's XDP program takes ([`server_xdp::ipip_to`]), and forwards it
/// the same way. Everything else, every packet to drop included, goes on to `br_decap`, which
/// decides, logs and counts exactly as without XDP.
#[xdp]
pub fn br_decap_xdp(ctx: XdpContext) -> u32 {
    decap_xdp(&ctx).unwrap_or(server_xdp::PASS)
}

#[inline(always)]
fn decap_xdp(ctx: &XdpContext) -> Option<u32> {
    let cfg = config()?;
    let (v, inner) = server_xdp::ipip_to(ctx, &map_words(&cfg.local))?;
    let proto = inner.proto();
    if inner.fragment() || (proto != IPPROTO_TCP && proto != IPPROTO_UDP) {
        return None;
    }
    if !v.holds(INNER_OFF + 24) {
        return None;
    }
    let rule = rule_for(inner.src())?;
    let port = u16::from_be(v.w16(INNER_OFF + 20));
    let expected = rule.ce_address_words(u32::from_be(inner.src()), rule.psid_of(port)?);
    if !eq_words(&expected, &v.addr6(ETH_LEN + 8)) {
        return None;
    }
    let (ifindex, _) = match server_xdp::forward_unwrapped(ctx, &v, &inner, cfg.tun_ifindex)? {
        Ok(out) => out,
        Err(()) => return Some(server_xdp::DROP),
    };
    count(Counter::BrDecap);
    count(Counter::XdpDecap);
    // SAFETY: plain helper call.
    Some(unsafe { bpf_redirect(ifindex, 0) } as u32)
}

#[classifier]
pub fn br_encap(ctx: TcContext) -> i32 {
    let Some(cfg) = config() else { return PASS };
    if packet::eth_proto(&ctx) != Some(ETH_P_IP) {
        return PASS;
    }
    let Some(ip) = Ipv4Info::load(&ctx, ETH_LEN) else {
        return PASS;
    };
    let Some(rule) = rule_for(ip.dst()) else {
        return PASS;
    };
    if ip.fragment() {
        // Only the first fragment names the port that picks the CE: the kernel routes the
        // rule prefixes to the TUN, where the controller reassembles (RFC 7597 §8.3.2).
        count(Counter::BrSlowPathFragment);
        return PASS;
    }
    let Some(psid) = nat::br_port(&ctx, ETH_LEN, &ip, false).and_then(|p| rule.psid_of(p)) else {
        log::dropped_v4(&ctx, LOG_BR_ENCAP, Counter::BrDropNoPort, &ip);
        return DROP;
    };
    let ce = rule.ce_address_words(u32::from_be(ip.dst()), psid);
    if packet::wire_len(&ctx, ETH_LEN, &ip) > cfg.inner_mtu as usize {
        // The kernel routes the rule prefixes to the TUN; the controller answers with ICMP
        // fragmentation-needed or fragments it.
        log::slow_path(&ctx, LOG_BR_ENCAP, Counter::SlowPathTooBig, &ip);
        return PASS;
    }
    if ip.ttl() <= 1 {
        log::slow_path(&ctx, LOG_BR_ENCAP, Counter::SlowPathTtl, &ip);
        return PASS;
    }
    encap::send_wrapped::<true>(
        &ctx,
        &ip,
        ip.w1_rewritten(true, ip.src()),
        cfg,
        &ce,
        false,
        Counter::BrEncap,
        LOG_BR_ENCAP,
    )
    .0
}

tunnel_ebpf::logger!(
    log_br_decap,
    "br_decap",
    [
        BrDropNotIpip,
        DropInnerMalformed,
        BrDropNoRule,
        BrDropNoPort,
        BrDropPortOutsideSet,
        BrDropSourceMismatch
    ]
);

tunnel_ebpf::logger!(
    log_br_encap,
    "br_encap",
    [BrDropNoPort, SlowPathTooBig, SlowPathTtl, DropNoRoute]
);
