//! The MAP-E CE's fast path (SPEC §6).
//!
//! `ce_out` runs on ingress of the LAN side: an IPv4 packet of a flow the controller has
//! mapped gets the shared address and its external port, is wrapped in IPv6 to the BR and
//! redirected out of the WAN. A packet with no mapping passes: the kernel routes it to the TUN,
//! where the controller picks a port, installs both directions and sends it on (the slow path).
//!
//! `ce_in` runs on ingress of the WAN side: IPv4-in-IPv6 from the BR to our CE address whose
//! (external port, remote) is mapped is unwrapped, translated back to the LAN host and
//! forwarded. ICMP errors go to the controller through the TUN (they are mapped by the packet
//! they quote); anything else unsolicited is dropped and counted.
use aya_ebpf::{
    helpers::generated::bpf_redirect, macros::classifier, maps::HashMap, programs::TcContext,
};
use tunnel_common::{
    mape::NatKey,
    names::{LOG_CE_IN, LOG_CE_OUT},
    stats::Counter,
};
use tunnel_ebpf::{
    direct::map_words,
    encap::{self, Upper},
    log,
    maps::{NAT_IN, NAT_OUT, config},
    nat::{self, Classified, DST_ADDR, KeyWords},
    packet::{
        self, DROP, ETH_LEN, ETH_P_IP, ETH_P_IPV6, INNER_OFF, IPPROTO_IPIP, Ipv4Info, Outer6, PASS,
        eq_words,
    },
    route,
    stats::count,
};

/// The exact entry for `key`, else its wildcard (remote 0.0.0.0:0: port forwards and
/// endpoint-independent mappings).
#[inline(always)]
fn lookup<V>(map: &HashMap<NatKey, V>, key: &KeyWords) -> Option<*mut V> {
    map.get_ptr_mut(key.key()).or_else(|| {
        let wildcard = key.wildcard();
        map.get_ptr_mut(wildcard.key())
    })
}

#[classifier]
pub fn ce_out(ctx: TcContext) -> i32 {
    napt_out::<false, true>(&ctx)
}

/// An lwB4 (a native client on a shared lease, RFC 7596), egress of its IPv6 interface: the
/// host's own IPv4 (from 192.0.0.2) and what it routes from a LAN leave through the softwire
/// route (192.0.0.1, whose neighbour entry is the interface's own MAC). A frame to our own
/// MAC is such a packet; it is translated and wrapped exactly like `ce_out`'s, or handed to
/// the controller's TUN when it has no mapping yet (it has nowhere else to go). The kernel
/// already did the forwarding (TTL) for routed packets.
#[classifier]
pub fn lwb4_out(ctx: TcContext) -> i32 {
    napt_out::<true, false>(&ctx)
}

#[inline(always)]
/// `DIRECT`: how it writes the frame head (`tunnel_ebpf::head`): directly on the CE's LAN
/// ingress, through the helper on the lwB4's egress.
fn napt_out<const LWB4: bool, const DIRECT: bool>(ctx: &TcContext) -> i32 {
    let lwb4 = LWB4;
    let Some(cfg) = config() else { return PASS };
    if packet::eth_proto(ctx) != Some(ETH_P_IP) {
        return PASS;
    }
    // What the programs do not translate: the kernel's for the CE, the controller's for
    // the lwB4 (redirected to its TUN).
    let slow = || {
        if lwb4 {
            count(Counter::CeSlowPathOut);
            // SAFETY: plain helper call; the TUN takes the frame without its MAC header.
            unsafe { bpf_redirect(cfg.tun_ifindex, 0) as i32 }
        } else {
            PASS
        }
    };
    if lwb4 {
        let Ok(macs) = ctx.load::<[u8; 12]>(0) else {
            return PASS;
        };
        if macs[..6] != macs[6..] {
            // Not the softwire's route: native IPv4 of this interface.
            return PASS;
        }
    }
    let Some(ip) = Ipv4Info::load(ctx, ETH_LEN) else {
        return slow();
    };
    if ip.fragment() {
        // Fragments are reassembled by the controller (a non-first one carries no port, and
        // the datagram gets an IPv4 id of this CE's own, RFC 7597 §8.3.3).
        return slow();
    }
    let Classified::Flow(flow) = nat::classify(ctx, ETH_LEN, &ip, true) else {
        return slow();
    };
    let Some(entry) = lookup(&NAT_OUT, &flow.key) else {
        return slow();
    };
    if packet::wire_len(ctx, ETH_LEN, &ip) > cfg.inner_mtu as usize {
        // The controller answers with ICMP fragmentation-needed or fragments it.
        log::slow_path(ctx, LOG_CE_OUT, Counter::SlowPathTooBig, &ip);
        return slow();
    }
    if !lwb4 && ip.ttl() <= 1 {
        log::slow_path(ctx, LOG_CE_OUT, Counter::SlowPathTtl, &ip);
        return PASS;
    }
    // SAFETY: `entry` comes from a successful lookup and stays valid for this program run;
    // fields are read and updated in place.
    let ext_port = unsafe {
        nat::touch(&mut (*entry).last_seen_ns, &mut (*entry).flags, flow.flags);
        (*entry).ext_port
    };
    // The transport header now; the IPv4 header (the shared source, and the TTL when the CE
    // forwards, with the checksum for both) goes in with the outer header.
    if nat::rewrite_l4::<DIRECT>(ctx, ETH_LEN, &ip, ip.src(), cfg.ipv4, &flow, ext_port).is_err() {
        count(Counter::DropRewriteFailed);
        return DROP;
    }
    encap::send_wrapped::<DIRECT>(
        ctx,
        &ip,
        ip.w1_rewritten(!lwb4, cfg.ipv4),
        cfg,
        &map_words(&cfg.remote),
        lwb4,
        Counter::CeNaptOut,
        LOG_CE_OUT,
    )
    .0
}

tunnel_ebpf::logger!(
    log_ce_out,
    "ce_out",
    [SlowPathTooBig, SlowPathTtl, DropNoRoute]
);

#[classifier]
pub fn ce_in(ctx: TcContext) -> i32 {
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
    match encap::outer_upper(&ctx, &outer) {
        Upper::Ipip => {}
        // The CE address is the CE's own: its ICMPv6 and other traffic are the stack's.
        Upper::Other(_) => return PASS,
        Upper::Fragment(next) if next != IPPROTO_IPIP => return PASS,
        // IPv4-in-IPv6 the BR sent in outer fragments (RFC 2473 §7): the controller
        // reassembles it (and checks it came from the BR).
        Upper::Fragment(_) => {
            count(Counter::CeSlowPathOuterFragment);
            // SAFETY: plain helper call; the TUN takes the frame without its MAC header.
            return unsafe { bpf_redirect(cfg.tun_ifindex, 0) } as i32;
        }
        other => return other.drop_counted(),
    }
    if !eq_words(&outer.src, &map_words(&cfg.remote)) {
        let reason = Counter::CeDropNotFromBr;
        log::dropped_ipip_unparsed(&ctx, LOG_CE_IN, reason, &outer.src);
        return DROP;
    }
    let Some(inner) = Ipv4Info::load(&ctx, INNER_OFF) else {
        let reason = Counter::DropInnerMalformed;
        log::dropped_ipip_unparsed(&ctx, LOG_CE_IN, reason, &outer.src);
        return DROP;
    };
    if inner.dst() != cfg.ipv4 {
        let reason = Counter::CeDropInNoMapping;
        log::dropped_ipip(&ctx, LOG_CE_IN, reason, &outer.src, &inner);
        return DROP;
    }
    // Fragments (only the first names the port) and ICMP errors (mapped by the packet they
    // quote) are the controller's: reassembled or translated on the TUN.
    if inner.fragment() {
        return to_controller(&ctx, cfg.tun_ifindex);
    }
    let flow = match nat::classify(&ctx, INNER_OFF, &inner, false) {
        Classified::Flow(flow) => flow,
        Classified::IcmpError => return to_controller(&ctx, cfg.tun_ifindex),
        Classified::Other => {
            let reason = Counter::CeDropInNoMapping;
            log::dropped_ipip(&ctx, LOG_CE_IN, reason, &outer.src, &inner);
            return DROP;
        }
    };
    let Some(entry) = lookup(&NAT_IN, &flow.key) else {
        let reason = Counter::CeDropInNoMapping;
        log::dropped_ipip(&ctx, LOG_CE_IN, reason, &outer.src, &inner);
        return DROP;
    };
    // SAFETY: as in ce_out.
    let (lan_ip, lan_port) = unsafe {
        nat::touch(&mut (*entry).last_seen_ns, &mut (*entry).flags, flow.flags);
        ((*entry).lan_ip, (*entry).lan_port)
    };
    if encap::unwrap_for_forwarding(&ctx, &inner, cfg.mss, Counter::CeNaptIn).is_err() {
        return DROP;
    }
    // Forwarding decrements the TTL from the header as it arrived (`inner`); the address
    // translation then adjusts the checksum in the packet in turn. The FIB lookup is for
    // `lan_ip` already, and a redirect takes effect only when the program returns.
    let (verdict, _) = route::forward_unwrapped::<true>(&ctx, &inner, lan_ip, cfg.tun_ifindex);
    if verdict == DROP {
        return DROP;
    }
    // The IPv4 header now follows the Ethernet header.
    if nat::rewrite(&ctx, ETH_LEN, &inner, DST_ADDR, lan_ip, &flow, lan_port).is_err() {
        count(Counter::DropRewriteFailed);
        return DROP;
    }
    verdict
}

/// Unwraps the packet and hands it to the controller's TUN (counted).
#[inline(always)]
fn to_controller(ctx: &TcContext, tun_ifindex: u32) -> i32 {
    if encap::decapsulate(ctx).is_err() {
        count(Counter::DropRewriteFailed);
        return DROP;
    }
    count(Counter::CeSlowPathIn);
    // SAFETY: plain helper call; the TUN takes the frame without its MAC header.
    unsafe { bpf_redirect(tun_ifindex, 0) as i32 }
}

tunnel_ebpf::logger!(
    log_ce_in,
    "ce_in",
    [CeDropNotFromBr, DropInnerMalformed, CeDropInNoMapping]
);
