//! BPF_PROG_TEST_RUN unit tests of the fast-path programs on crafted packets: decapsulation
//! (accept and each reject), encapsulation, MSS clamping, checksums checked by etherparse.
use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{Result, bail};
use aya::{
    Ebpf,
    programs::{SchedClassifier, TestRun as _, TestRunOptions, Xdp},
};
use etherparse::{
    EtherType, Ethernet2Header, IpNumber, Ipv4HeaderSlice, Ipv6Header, Ipv6HeaderSlice,
    PacketBuilder, TcpHeaderSlice, TcpOptionElement,
};
use tunnel_common::{
    fastpath::{BindCacheEntry, Binding4, TunnelConfig, bind_cache_base, words16},
    names::{
        BIND_BY_V6, BIND_CACHE, PROG_CLIENT_DECAP, PROG_CLIENT_ENCAP, PROG_SERVER_DECAP,
        PROG_SERVER_DECAP_XDP, PROG_SERVER_ENCAP,
    },
    stats::Counter,
};
use tunnel_ctl::{
    dataplane::{self, bindcache::BindCache, fastpath::Maps, fastpath::v4_key, nexthop::Resolved},
    nexthop::Family,
};
use tunnel_tests::Lab;

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;

const TUNNEL: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 4);
const CLIENT: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
const STRANGER: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 99);
const LEASE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
const HOST: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 0xa];
const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 0xb];
const NEIGH_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x22];

fn config(v6_ifindex: u32) -> TunnelConfig {
    TunnelConfig {
        local: TUNNEL.octets(),
        remote: [0; 16],
        ipv4: 0,
        v6_ifindex,
        tun_ifindex: 0,
        inner_mtu: 1460,
        mss: 1420,
        hop_limit: 64,
        enabled: 1,
        policy_events_per_s: 0,
        ..Default::default()
    }
}

/// IPv4 + UDP (no Ethernet).
fn ipv4_udp(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv4(src.octets(), dst.octets(), 64)
        .udp(4000, 7)
        .write(&mut out, payload)
        .unwrap();
    out
}

/// IPv4 + TCP SYN announcing MSS 1460 (no Ethernet).
fn ipv4_syn(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    ipv4_syn_mss(src, dst, 1460)
}

/// An IPv4 TCP SYN announcing `mss`.
fn ipv4_syn_mss(src: Ipv4Addr, dst: Ipv4Addr, mss: u16) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv4(src.octets(), dst.octets(), 64)
        .tcp(40000, 80, 1, 64240)
        .syn()
        .options(&[
            TcpOptionElement::MaximumSegmentSize(mss),
            TcpOptionElement::SelectiveAcknowledgementPermitted,
            TcpOptionElement::Noop,
            TcpOptionElement::WindowScale(7),
        ])
        .unwrap()
        .write(&mut out, &[])
        .unwrap();
    out
}

fn ethernet(ether_type: EtherType, l3: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    Ethernet2Header {
        source: MAC_A,
        destination: MAC_B,
        ether_type,
    }
    .write(&mut out)
    .unwrap();
    out.extend_from_slice(l3);
    out
}

/// Ethernet + IPv6 (next header 4) + `inner`.
fn in_ipv6(src: Ipv6Addr, dst: Ipv6Addr, inner: &[u8]) -> Vec<u8> {
    let mut l3 = Vec::new();
    Ipv6Header {
        traffic_class: 0,
        flow_label: Default::default(),
        payload_length: inner.len() as u16,
        next_header: IpNumber::IPV4,
        hop_limit: 64,
        source: src.octets(),
        destination: dst.octets(),
    }
    .write(&mut l3)
    .unwrap();
    l3.extend_from_slice(inner);
    ethernet(EtherType::IPV6, &l3)
}

/// Each packet is dropped by `server_decap`, its reason counted once, nothing decapsulated.
fn drops_each_under_its_reason(ebpf: &mut Ebpf, cases: &[(Vec<u8>, Counter)]) -> Result<()> {
    for (packet, reason) in cases {
        let before = dataplane::stats::read(ebpf)?;
        let (verdict, _) = run(ebpf, PROG_SERVER_DECAP, packet)?;
        assert_eq!(verdict, TC_ACT_SHOT, "{}", reason.name());
        assert_eq!(delta(ebpf, &before, *reason), 1, "{}", reason.name());
        assert_eq!(delta(ebpf, &before, Counter::Decap), 0, "{}", reason.name());
    }
    Ok(())
}

fn run(ebpf: &mut Ebpf, program: &str, packet: &[u8]) -> Result<(u32, Vec<u8>)> {
    run_tc_from(ebpf, program, packet, 0)
}

/// One XDP run of `program` on `packet`, as received on `ifindex`.
fn run_xdp(ebpf: &mut Ebpf, program: &str, packet: &[u8], ifindex: u32) -> Result<(u32, Vec<u8>)> {
    let prog: &mut Xdp = ebpf.program_mut(program).unwrap().try_into()?;
    if prog.fd().is_err() {
        prog.load()?;
    }
    let ctx = tunnel_tests::xdp_test_ctx(ifindex, packet.len());
    let mut out = vec![0u8; packet.len() + 128];
    let result = prog.test_run(TestRunOptions {
        data_in: Some(packet),
        data_out: Some(&mut out),
        ctx_in: Some(&ctx),
        repeat: 1,
        ..Default::default()
    })?;
    out.truncate(result.data_size_out as usize);
    Ok((result.return_value, out))
}

/// One TC run of `program` on `packet`, as received on `ifindex` (the FIB lookups of the
/// forwarding path start from the ingress interface).
fn run_tc_from(
    ebpf: &mut Ebpf,
    program: &str,
    packet: &[u8],
    ifindex: u32,
) -> Result<(u32, Vec<u8>)> {
    let prog: &mut SchedClassifier = ebpf.program_mut(program).unwrap().try_into()?;
    if prog.fd().is_err() {
        prog.load()?;
    }
    // A struct __sk_buff: ingress_ifindex at 36, ifindex at 40.
    let mut ctx = vec![0u8; 192];
    ctx[36..40].copy_from_slice(&ifindex.to_ne_bytes());
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    let mut out = vec![0u8; packet.len() + 128];
    let result = prog.test_run(TestRunOptions {
        data_in: Some(packet),
        data_out: Some(&mut out),
        ctx_in: Some(&ctx),
        repeat: 1,
        ..Default::default()
    })?;
    out.truncate(result.data_size_out as usize);
    Ok((result.return_value, out))
}

/// `out` is `inner` decapsulated and forwarded toward HOST: new MAC header, TTL one lower
/// with a valid checksum, everything else as it was; counted as redirected.
fn assert_forwarded(
    ebpf: &Ebpf,
    before: &dataplane::stats::Counters,
    out: &[u8],
    inner: &[u8],
    own_mac: &[u8; 6],
) -> Result<()> {
    assert_eq!(delta(ebpf, before, Counter::DecapRedirected), 1);
    assert_eq!(&out[0..6], &NEIGH_MAC);
    assert_eq!(&out[6..12], own_mac);
    assert_eq!(&out[12..14], &[0x08, 0x00]);
    let got = &out[14..];
    assert_eq!(got.len(), inner.len());
    assert_eq!(got[8], inner[8] - 1, "TTL decremented");
    assert_ipv4_checksum(got)?;
    assert_eq!(
        &got[..8],
        &inner[..8],
        "the header before the TTL unchanged"
    );
    assert_eq!(&got[12..], &inner[12..], "addresses and payload unchanged");
    Ok(())
}

fn delta(ebpf: &Ebpf, before: &dataplane::stats::Counters, counter: Counter) -> u64 {
    dataplane::stats::read(ebpf).unwrap()[counter.name()] - before[counter.name()]
}

fn assert_ipv4_checksum(ip: &[u8]) -> Result<()> {
    let slice = Ipv4HeaderSlice::from_slice(ip)?;
    let header = slice.to_header();
    if header.calc_header_checksum() != slice.header_checksum() {
        bail!("IPv4 header checksum is wrong");
    }
    Ok(())
}

/// The MSS option of a TCP SYN in `ip` (IPv4), after checking the TCP checksum.
fn syn_mss(ip: &[u8]) -> Result<u16> {
    let ip_slice = Ipv4HeaderSlice::from_slice(ip)?;
    let header = ip_slice.to_header();
    let tcp = TcpHeaderSlice::from_slice(&ip[ip_slice.slice().len()..])?;
    let payload = &ip[ip_slice.slice().len() + tcp.slice().len()..];
    let want = tcp.to_header().calc_checksum_ipv4(&header, payload)?;
    if want != tcp.checksum() {
        bail!("TCP checksum is wrong after the rewrite");
    }
    for opt in tcp.options_iterator() {
        if let Ok(TcpOptionElement::MaximumSegmentSize(mss)) = opt {
            return Ok(mss);
        }
    }
    bail!("no MSS option")
}

/// The MAC address of `dev` in `ns` (sysfs shows the test's own namespace, so ask `ip`).
fn link_mac(ns: &tunnel_tests::Ns, dev: &str) -> Result<[u8; 6]> {
    let text = ns.ip(&format!("-o link show {dev}"))?;
    let hex = text
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("no MAC in {text}"))?;
    let mut mac = [0u8; 6];
    for (i, part) in hex.split(':').enumerate().take(6) {
        mac[i] = u8::from_str_radix(part, 16)?;
    }
    Ok(mac)
}

struct Fixture {
    lab: Lab,
    ebpf: Ebpf,
    maps: Maps,
    pin_dir: std::path::PathBuf,
}

fn fixture(role: &str) -> Result<Fixture> {
    let mut lab = Lab::new()?;
    let instance = lab.instance(role);
    let pin_dir = std::path::Path::new("/sys/fs/bpf/tunnel").join(&instance);
    let mut ebpf = dataplane::load(&pin_dir)?;
    let maps = Maps::take(&mut ebpf)?;
    Ok(Fixture {
        lab,
        ebpf,
        maps,
        pin_dir,
    })
}

#[test]
fn server_decap_accepts_bound_clients_and_drops_each_violation() -> Result<()> {
    let Fixture {
        lab: _lab,
        mut ebpf,
        mut maps,
        ..
    } = fixture("decap")?;
    maps.set_config(&config(0))?;
    maps.bind(CLIENT, LEASE)?;

    // Accepted: the output is exactly the inner packet behind the same Ethernet addresses.
    let inner = ipv4_udp(LEASE, HOST, b"hello");
    let before = dataplane::stats::read(&ebpf)?;
    let (verdict, out) = run(
        &mut ebpf,
        PROG_SERVER_DECAP,
        &in_ipv6(CLIENT, TUNNEL, &inner),
    )?;
    // No route in this namespace: the kernel gets the decapsulated packet.
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, ethernet(EtherType::IPV4, &inner));
    assert_eq!(delta(&ebpf, &before, Counter::Decap), 1);

    // Rejected, each under its own reason.
    let mut ipv6_inner = Vec::new();
    PacketBuilder::ipv6(STRANGER.octets(), CLIENT.octets(), 64)
        .udp(1, 2)
        .write(&mut ipv6_inner, b"x")?;
    let cases = [
        (
            in_ipv6(STRANGER, TUNNEL, &inner),
            Counter::DropUnboundSource,
        ),
        (
            in_ipv6(
                CLIENT,
                TUNNEL,
                &ipv4_udp(Ipv4Addr::new(198, 51, 100, 3), HOST, b"x"),
            ),
            Counter::DropInnerSourceNotLease,
        ),
        (
            in_ipv6(CLIENT, TUNNEL, &ipv6_inner),
            Counter::DropInnerNotIpv4,
        ),
        (
            in_ipv6(CLIENT, TUNNEL, &inner[..12]),
            Counter::DropInnerMalformed,
        ),
    ];
    drops_each_under_its_reason(&mut ebpf, &cases)?;

    // Not ours: other destinations and plain IPv6 pass untouched and uncounted.
    let elsewhere = in_ipv6(CLIENT, STRANGER, &inner);
    let before = dataplane::stats::read(&ebpf)?;
    let (verdict, out) = run(&mut ebpf, PROG_SERVER_DECAP, &elsewhere)?;
    assert_eq!((verdict, &out), (TC_ACT_OK, &elsewhere));
    assert_eq!(delta(&ebpf, &before, Counter::DropUnboundSource), 0);

    // After unbinding, the client is a stranger.
    maps.unbind(CLIENT, LEASE)?;
    let (verdict, _) = run(
        &mut ebpf,
        PROG_SERVER_DECAP,
        &in_ipv6(CLIENT, TUNNEL, &inner),
    )?;
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(maps.bindings(), (vec![], 0));
    Ok(())
}

/// Issue 18 item 2: outer extension headers. Hop-by-Hop and Destination Options (the Tunnel
/// Encapsulation Limit of ip6tnl among them) are removed and the packet decapsulated exactly
/// like the plain one; outer fragments, a chain longer than the walk's bound (4) and a
/// truncated chain are dropped under their own counters; other protocols to the tunnel
/// address (the control channel may share it) pass untouched.
#[test]
fn server_decap_walks_outer_extension_headers() -> Result<()> {
    use tunnel_tests::craft::{self, Ext};
    let Fixture {
        lab: _lab,
        mut ebpf,
        mut maps,
        ..
    } = fixture("ext")?;
    maps.set_config(&config(0))?;
    maps.bind(CLIENT, LEASE)?;
    let inner = ipv4_udp(LEASE, HOST, b"behind options");
    let plain = ethernet(EtherType::IPV4, &inner);
    let with = |exts: &[Ext], next: u8, payload: &[u8]| {
        ethernet(
            EtherType::IPV6,
            &craft::ipv6(CLIENT, TUNNEL, exts, next, payload),
        )
    };

    for exts in [
        &[Ext::EncapLimit][..],
        &[Ext::HopByHop],
        &[Ext::HopByHop, Ext::DestOpts, Ext::DestOpts, Ext::EncapLimit],
    ] {
        let before = dataplane::stats::read(&ebpf)?;
        let (verdict, out) = run(
            &mut ebpf,
            PROG_SERVER_DECAP,
            &with(exts, craft::IPIP, &inner),
        )?;
        assert_eq!(verdict, TC_ACT_OK, "{exts:?}");
        assert_eq!(out, plain, "{exts:?}: not the plain decapsulation");
        assert_eq!(delta(&ebpf, &before, Counter::Decap), 1, "{exts:?}");
        assert_eq!(
            delta(&ebpf, &before, Counter::ExtHeadersRemoved),
            1,
            "{exts:?}"
        );
    }

    let five = [Ext::DestOpts; 5];
    let first = Ext::Fragment {
        offset: 0,
        more: true,
        id: 9,
    };
    let second = Ext::Fragment {
        offset: 2,
        more: false,
        id: 9,
    };
    let truncated = with(&[Ext::DestOpts], craft::IPIP, &[]);
    let cases = [
        (
            with(&five, craft::IPIP, &inner),
            Counter::DropExtHeadersTooMany,
        ),
        (
            with(&[first], craft::IPIP, &inner[..16]),
            Counter::DropOuterFragment,
        ),
        (
            with(&[second], craft::IPIP, &inner[16..]),
            Counter::DropOuterFragment,
        ),
        (
            with(&[Ext::HopByHop, first], craft::IPIP, &inner[..16]),
            Counter::DropOuterFragment,
        ),
        (
            truncated[..truncated.len() - 4].to_vec(),
            Counter::DropExtHeadersMalformed,
        ),
    ];
    drops_each_under_its_reason(&mut ebpf, &cases)?;

    // Not IPv4-in-IPv6: the stack's, byte for byte.
    for packet in [
        with(&[Ext::DestOpts], craft::ICMPV6, &[128, 0, 0, 0, 0, 1, 0, 1]),
        with(&[first], 6, &[0; 16]),
    ] {
        let (verdict, out) = run(&mut ebpf, PROG_SERVER_DECAP, &packet)?;
        assert_eq!((verdict, &out), (TC_ACT_OK, &packet));
    }
    Ok(())
}

#[test]
fn xdp_decap_forwards_the_plain_case_and_passes_the_rest_to_tc() -> Result<()> {
    let Fixture {
        mut lab,
        mut ebpf,
        mut maps,
        ..
    } = fixture("xdp")?;
    // A router namespace: packets arrive on v6; HOST is an on-link neighbour of v4.
    let ns = lab.ns("xdp")?;
    let peer = lab.ns("xdp-peer")?;
    lab.veth(&ns, "v6", &peer, "p6")?;
    lab.veth(&ns, "v4", &peer, "p4")?;
    ns.sysctl("net.ipv4.ip_forward", "1")?;
    ns.ip("addr add 192.0.2.1/24 dev v4")?;
    ns.ip(&format!(
        "neigh replace {HOST} lladdr 02:00:00:00:00:22 dev v4 nud permanent"
    ))?;
    let v6 = ns.enter(|| nix::net::if_::if_nametoindex("v6"))??;
    let v4_mac = link_mac(&ns, "v4")?;
    maps.set_config(&config(v6))?;
    maps.bind(CLIENT, LEASE)?;

    // The plain case: decapsulated, TTL and checksum fixed, new MACs, redirected.
    let inner = ipv4_udp(LEASE, HOST, b"hello");
    let before = dataplane::stats::read(&ebpf)?;
    let (verdict, out) = ns.enter(|| {
        run_xdp(
            &mut ebpf,
            PROG_SERVER_DECAP_XDP,
            &in_ipv6(CLIENT, TUNNEL, &inner),
            v6,
        )
    })??;
    assert_eq!(
        verdict,
        XDP_REDIRECT,
        "counters {:?}",
        dataplane::stats::read(&ebpf)?
    );
    assert_eq!(delta(&ebpf, &before, Counter::Decap), 1);
    assert_eq!(delta(&ebpf, &before, Counter::XdpDecap), 1);
    assert_forwarded(&ebpf, &before, &out, &inner, &v4_mac)?;

    // The TC program forwards the same packet to the same frame (its MAC header, EtherType
    // and TTL go in with one store).
    let before = dataplane::stats::read(&ebpf)?;
    let (verdict, out) = ns.enter(|| {
        run_tc_from(
            &mut ebpf,
            PROG_SERVER_DECAP,
            &in_ipv6(CLIENT, TUNNEL, &inner),
            v6,
        )
    })??;
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_forwarded(&ebpf, &before, &out, &inner, &v4_mac)?;

    // A bound client's spoofed inner source: dropped and counted as the TC program would.
    let spoofed = in_ipv6(
        CLIENT,
        TUNNEL,
        &ipv4_udp(Ipv4Addr::new(198, 51, 100, 3), HOST, b"x"),
    );
    let before = dataplane::stats::read(&ebpf)?;
    let (verdict, _) = ns.enter(|| run_xdp(&mut ebpf, PROG_SERVER_DECAP_XDP, &spoofed, v6))??;
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(delta(&ebpf, &before, Counter::DropInnerSourceNotLease), 1);
    // A source no native client is bound to may be a B4's (softwires): the TC program
    // decides, here dropping it as unbound.
    let stranger = in_ipv6(STRANGER, TUNNEL, &inner);
    let before = dataplane::stats::read(&ebpf)?;
    let (verdict, out) =
        ns.enter(|| run_xdp(&mut ebpf, PROG_SERVER_DECAP_XDP, &stranger, v6))??;
    assert_eq!((verdict, &out), (XDP_PASS, &stranger));
    assert_eq!(delta(&ebpf, &before, Counter::DropUnboundSource), 0);
    let (verdict, _) = ns.enter(|| run_tc_from(&mut ebpf, PROG_SERVER_DECAP, &stranger, v6))??;
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(delta(&ebpf, &before, Counter::DropUnboundSource), 1);

    // Everything else reaches the TC program unchanged: SYNs (MSS clamping), TTL 1, no route,
    // other destinations.
    let mut ttl1 = inner.clone();
    ttl1[8] = 1;
    let no_route = ipv4_udp(LEASE, Ipv4Addr::new(203, 0, 113, 9), b"x");
    for packet in [
        in_ipv6(CLIENT, TUNNEL, &ipv4_syn(LEASE, HOST)),
        in_ipv6(CLIENT, TUNNEL, &ttl1),
        in_ipv6(CLIENT, TUNNEL, &no_route),
        in_ipv6(CLIENT, STRANGER, &inner),
    ] {
        let before = dataplane::stats::read(&ebpf)?;
        let (verdict, out) =
            ns.enter(|| run_xdp(&mut ebpf, PROG_SERVER_DECAP_XDP, &packet, v6))??;
        assert_eq!((verdict, &out), (XDP_PASS, &packet));
        assert_eq!(delta(&ebpf, &before, Counter::Decap), 0);
    }
    Ok(())
}

#[test]
fn decap_clamps_the_mss_of_syns_and_keeps_the_checksum_valid() -> Result<()> {
    let Fixture {
        lab: _lab,
        mut ebpf,
        mut maps,
        ..
    } = fixture("mss")?;
    maps.set_config(&config(0))?;
    maps.bind(CLIENT, LEASE)?;
    let before = dataplane::stats::read(&ebpf)?;
    let (verdict, out) = run(
        &mut ebpf,
        PROG_SERVER_DECAP,
        &in_ipv6(CLIENT, TUNNEL, &ipv4_syn(LEASE, HOST)),
    )?;
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(syn_mss(&out[14..])?, 1420);
    assert_eq!(delta(&ebpf, &before, Counter::MssClamped), 1);

    // An MSS below the clamp (1300 < 1420) is left alone, and not counted.
    let before = dataplane::stats::read(&ebpf)?;
    let (verdict, out) = run(
        &mut ebpf,
        PROG_SERVER_DECAP,
        &in_ipv6(CLIENT, TUNNEL, &ipv4_syn_mss(LEASE, HOST, 1300)),
    )?;
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(syn_mss(&out[14..])?, 1300);
    assert_eq!(delta(&ebpf, &before, Counter::MssClamped), 0);
    Ok(())
}

#[test]
fn server_encap_wraps_packets_to_native_leases_toward_the_client() -> Result<()> {
    let Fixture {
        mut lab,
        mut ebpf,
        mut maps,
        ..
    } = fixture("encap")?;
    // A namespace where the client is an on-link neighbour of interface v6.
    let ns = lab.ns("encap")?;
    let peer = lab.ns("peer")?;
    lab.veth(&ns, "v6", &peer, "p")?;
    ns.ip("-6 addr add 2001:db8:1::1/64 dev v6 nodad")?;
    // A router: the program uses the FIB helper, which fills in the MAC addresses itself.
    ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
    ns.ip(&format!(
        "-6 neigh replace {CLIENT} lladdr 02:00:00:00:00:22 dev v6 nud permanent"
    ))?;
    let ifindex = ns.enter(|| nix::net::if_::if_nametoindex("v6"))??;
    let mac = link_mac(&ns, "v6")?;
    maps.set_config(&config(ifindex))?;
    maps.bind(CLIENT, LEASE)?;

    let inner = ipv4_udp(HOST, LEASE, b"hello client");
    let packet = ethernet(EtherType::IPV4, &inner);
    let before = dataplane::stats::read(&ebpf)?;
    let (verdict, out) = ns.enter(|| run(&mut ebpf, PROG_SERVER_ENCAP, &packet))??;
    assert_eq!(
        verdict,
        TC_ACT_REDIRECT,
        "encapsulated packets are redirected; counters {:?}",
        dataplane::stats::read(&ebpf)?
    );
    assert_eq!(delta(&ebpf, &before, Counter::Encap), 1);
    assert_eq!(
        &out[0..6],
        &NEIGH_MAC,
        "destination MAC from the neighbour table"
    );
    assert_eq!(&out[6..12], &mac, "source MAC of the IPv6 interface");
    assert_eq!(&out[12..14], &[0x86, 0xdd]);
    let outer = Ipv6HeaderSlice::from_slice(&out[14..])?;
    assert_eq!(outer.source_addr(), TUNNEL);
    assert_eq!(outer.destination_addr(), CLIENT);
    assert_eq!(outer.next_header(), IpNumber::IPV4);
    assert_eq!(outer.hop_limit(), 64);
    assert_eq!(outer.payload_length() as usize, inner.len());
    let got_inner = &out[54..];
    assert_eq!(got_inner.len(), inner.len());
    assert_eq!(got_inner[8], inner[8] - 1, "TTL decremented");
    assert_ipv4_checksum(got_inner)?;
    assert_eq!(&got_inner[20..], &inner[20..], "payload unchanged");

    // Too big for the tunnel: left to the slow path, unchanged.
    let big = ethernet(EtherType::IPV4, &ipv4_udp(HOST, LEASE, &[0u8; 1460]));
    let before = dataplane::stats::read(&ebpf)?;
    let (verdict, out) = ns.enter(|| run(&mut ebpf, PROG_SERVER_ENCAP, &big))??;
    assert_eq!((verdict, &out), (TC_ACT_OK, &big));
    assert_eq!(delta(&ebpf, &before, Counter::SlowPathTooBig), 1);

    // Addresses without a binding (in-band leases, anything else) pass untouched.
    let other = ethernet(
        EtherType::IPV4,
        &ipv4_udp(HOST, Ipv4Addr::new(198, 51, 100, 3), b"x"),
    );
    let (verdict, out) = ns.enter(|| run(&mut ebpf, PROG_SERVER_ENCAP, &other))??;
    assert_eq!((verdict, &out), (TC_ACT_OK, &other));

    // SYN-ACKs toward the client get their MSS clamped too.
    let syn = ethernet(EtherType::IPV4, &ipv4_syn(HOST, LEASE));
    let (verdict, out) = ns.enter(|| run(&mut ebpf, PROG_SERVER_ENCAP, &syn))??;
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(syn_mss(&out[54..])?, 1420);
    Ok(())
}

#[test]
fn client_programs_mirror_the_server() -> Result<()> {
    let Fixture {
        mut lab,
        mut ebpf,
        mut maps,
        ..
    } = fixture("client")?;
    let ns = lab.ns("cli")?;
    let peer = lab.ns("gw")?;
    lab.veth(&ns, "v6", &peer, "p")?;
    ns.ip(&format!("-6 addr add {CLIENT}/64 dev v6 nodad"))?;
    ns.ip("-6 route add 2001:db8:100::/48 via 2001:db8:1::1 dev v6")?;
    ns.ip("-6 neigh replace 2001:db8:1::1 lladdr 02:00:00:00:00:22 dev v6 nud permanent")?;
    let ifindex = ns.enter(|| nix::net::if_::if_nametoindex("v6"))??;
    maps.set_config(&TunnelConfig {
        local: CLIENT.octets(),
        remote: TUNNEL.octets(),
        ipv4: v4_key(LEASE),
        ..config(ifindex)
    })?;

    // Egress: the lease's packets are wrapped toward the server. A client host does not
    // forward IPv6, so the FIB helper declines and the program hands the packet to the
    // kernel's neighbour output (which fills in the MAC addresses after the program).
    let inner = ipv4_udp(LEASE, HOST, b"up");
    let (verdict, out) = ns.enter(|| {
        run(
            &mut ebpf,
            PROG_CLIENT_ENCAP,
            &ethernet(EtherType::IPV4, &inner),
        )
    })??;
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(&out[12..14], &[0x86, 0xdd]);
    let outer = Ipv6HeaderSlice::from_slice(&out[14..])?;
    assert_eq!(
        (outer.source_addr(), outer.destination_addr()),
        (CLIENT, TUNNEL)
    );
    assert_eq!(
        &out[54..],
        &inner[..],
        "a client does not route: TTL unchanged"
    );

    // Other sources are not the tunnel's.
    let foreign = ethernet(EtherType::IPV4, &ipv4_udp(HOST, LEASE, b"x"));
    let (verdict, out) = ns.enter(|| run(&mut ebpf, PROG_CLIENT_ENCAP, &foreign))??;
    assert_eq!((verdict, &out), (TC_ACT_OK, &foreign));

    // Ingress: packets from the server to us are unwrapped; from anyone else, left alone.
    let down = ipv4_udp(HOST, LEASE, b"down");
    let (verdict, out) = run(
        &mut ebpf,
        PROG_CLIENT_DECAP,
        &in_ipv6(TUNNEL, CLIENT, &down),
    )?;
    assert_eq!(
        (verdict, out),
        (TC_ACT_OK, ethernet(EtherType::IPV4, &down))
    );
    let spoof = in_ipv6(STRANGER, CLIENT, &down);
    let (verdict, out) = run(&mut ebpf, PROG_CLIENT_DECAP, &spoof)?;
    assert_eq!((verdict, out), (TC_ACT_OK, spoof));
    Ok(())
}

/// The frame's destination MAC.
fn dmac(frame: &[u8]) -> [u8; 6] {
    frame[..6].try_into().unwrap()
}

/// A router namespace for the next-hop tests: packets from clients arrive on `v6`
/// (2001:db8:1::1/64), IPv4 leaves by `v4` (192.0.2.1/24), forwarding on; its interfaces'
/// indices.
fn router(lab: &mut Lab, name: &str) -> Result<(tunnel_tests::Ns, u32, u32)> {
    let ns = lab.ns(name)?;
    let peer = lab.ns(&format!("{name}-peer"))?;
    lab.veth(&ns, "v6", &peer, "p6")?;
    lab.veth(&ns, "v4", &peer, "p4")?;
    ns.sysctl("net.ipv4.ip_forward", "1")?;
    ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
    ns.ip("addr add 192.0.2.1/24 dev v4")?;
    ns.ip("-6 addr add 2001:db8:1::1/64 dev v6 nodad")?;
    let v6 = ns.enter(|| nix::net::if_::if_nametoindex("v6"))??;
    let v4 = ns.enter(|| nix::net::if_::if_nametoindex("v4"))??;
    Ok((ns, v6, v4))
}

#[test]
fn the_programs_forward_with_the_cached_next_hop_until_the_cache_is_retired() -> Result<()> {
    let Fixture {
        mut lab,
        mut ebpf,
        mut maps,
        pin_dir,
    } = fixture("nexthop")?;
    // HOST is a neighbour on v4, CLIENT on v6.
    let (ns, v6, v4) = router(&mut lab, "nh")?;
    let neighbour = |ip: String, mac: &str, dev: &str| {
        ns.ip(&format!(
            "neigh replace {ip} lladdr {mac} dev {dev} nud permanent"
        ))
    };
    neighbour(HOST.to_string(), "02:00:00:00:00:22", "v4")?;
    neighbour(CLIENT.to_string(), "02:00:00:00:00:44", "v6")?;
    let (v4_mac, v6_mac) = (link_mac(&ns, "v4")?, link_mac(&ns, "v6")?);
    maps.set_config(&config(v6))?;
    maps.bind(CLIENT, LEASE)?;
    let mut cache = dataplane::nexthop::NextHops::take(&mut ebpf, &pin_dir)?;
    cache.set_enabled(true, true)?;
    cache.keep_valid(std::time::Duration::from_secs(60))?;

    // The resolver's answers are the FIB's: interface, the neighbour's MAC, our own.
    let answer = ns.enter(|| cache.resolve(HOST.into()))??;
    let Resolved::Forward(nh) = answer else {
        bail!("HOST did not resolve: {answer:?}")
    };
    assert_eq!(
        (nh.ifindex, &nh.eth[2..8], &nh.eth[8..14]),
        (v4, &NEIGH_MAC[..], &v4_mac[..])
    );
    assert_eq!(&nh.eth[..2], &[0, 0]);
    assert_eq!(&nh.eth[14..], &[0x08, 0x00]);
    let answer = ns.enter(|| cache.resolve(CLIENT.into()))??;
    let Resolved::Forward(nh) = answer else {
        bail!("CLIENT did not resolve: {answer:?}")
    };
    assert_eq!(&nh.eth[2..8], &[2, 0, 0, 0, 0, 0x44]);
    assert_eq!(&nh.eth[8..14], &v6_mac);
    assert_eq!(&nh.eth[14..], &[0x86, 0xdd]);
    // No route: an entry that leaves the packet to the kernel.
    let nowhere = Ipv4Addr::new(203, 0, 113, 9);
    let answer = ns.enter(|| cache.resolve(nowhere.into()))??;
    assert!(matches!(answer, Resolved::Kernel(_)), "{answer:?}");

    // The neighbours change behind the cache's back (no task watches here): the programs go
    // on with what the cache says, and ask the FIB for nothing.
    neighbour(HOST.to_string(), "02:00:00:00:00:33", "v4")?;
    neighbour(CLIENT.to_string(), "02:00:00:00:00:55", "v6")?;
    let inner = ipv4_udp(LEASE, HOST, b"hello");
    let decap = in_ipv6(CLIENT, TUNNEL, &inner);
    let encap = ethernet(EtherType::IPV4, &ipv4_udp(HOST, LEASE, b"back"));
    let before = dataplane::stats::read(&ebpf)?;
    let (verdict, out) = ns.enter(|| run_tc_from(&mut ebpf, PROG_SERVER_DECAP, &decap, v6))??;
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_forwarded(&ebpf, &before, &out, &inner, &v4_mac)?;
    let (verdict, out) = ns.enter(|| run_xdp(&mut ebpf, PROG_SERVER_DECAP_XDP, &decap, v6))??;
    assert_eq!((verdict, dmac(&out)), (XDP_REDIRECT, NEIGH_MAC));
    let (verdict, out) = ns.enter(|| run_tc_from(&mut ebpf, PROG_SERVER_ENCAP, &encap, v4))??;
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(
        (dmac(&out), &out[6..12]),
        ([2, 0, 0, 0, 0, 0x44], &v6_mac[..])
    );
    let (verdict, out) = ns.enter(|| {
        run_tc_from(
            &mut ebpf,
            PROG_SERVER_DECAP,
            &in_ipv6(CLIENT, TUNNEL, &ipv4_udp(LEASE, nowhere, b"x")),
            v6,
        )
    })??;
    assert_eq!(
        (verdict, &out[12..14]),
        (TC_ACT_OK, &[0x08, 0x00][..]),
        "to the kernel"
    );
    assert_eq!(delta(&ebpf, &before, Counter::NextHopMiss), 0);
    assert!(cache.reported().is_empty());

    // Retired: the FIB's answer (the new MACs), each destination reported once.
    cache.invalidate()?;
    let before = dataplane::stats::read(&ebpf)?;
    let (_, out) = ns.enter(|| run_tc_from(&mut ebpf, PROG_SERVER_DECAP, &decap, v6))??;
    assert_eq!(dmac(&out), [2, 0, 0, 0, 0, 0x33]);
    let (_, out) = ns.enter(|| run_tc_from(&mut ebpf, PROG_SERVER_ENCAP, &encap, v4))??;
    assert_eq!(dmac(&out), [2, 0, 0, 0, 0, 0x55]);
    assert_eq!(delta(&ebpf, &before, Counter::NextHopMiss), 2);
    let mut reported = cache.reported();
    reported.sort_by_key(|(_, a)| a.to_string());
    assert_eq!(
        reported,
        vec![(Family::V4, HOST.into()), (Family::V6, CLIENT.into())]
    );
    // Resolved again: the new next hops, from the cache.
    ns.enter(|| -> Result<()> {
        cache.resolve(HOST.into())?;
        cache.resolve(CLIENT.into())?;
        Ok(())
    })??;
    neighbour(HOST.to_string(), "02:00:00:00:00:66", "v4")?;
    let before = dataplane::stats::read(&ebpf)?;
    let (_, out) = ns.enter(|| run_tc_from(&mut ebpf, PROG_SERVER_DECAP, &decap, v6))??;
    assert_eq!(dmac(&out), [2, 0, 0, 0, 0, 0x33]);
    assert_eq!(delta(&ebpf, &before, Counter::NextHopMiss), 0);

    // A controller that stops confirming (dead) or a cache turned off: the FIB, no reports.
    cache.keep_valid(std::time::Duration::ZERO)?;
    std::thread::sleep(std::time::Duration::from_millis(20));
    let before = dataplane::stats::read(&ebpf)?;
    let (_, out) = ns.enter(|| run_tc_from(&mut ebpf, PROG_SERVER_DECAP, &decap, v6))??;
    assert_eq!(dmac(&out), [2, 0, 0, 0, 0, 0x66], "expired: the FIB");
    cache.keep_valid(std::time::Duration::from_secs(60))?;
    let (_, out) = ns.enter(|| run_tc_from(&mut ebpf, PROG_SERVER_DECAP, &decap, v6))??;
    assert_eq!(dmac(&out), [2, 0, 0, 0, 0, 0x33], "valid again: the cache");
    cache.set_enabled(false, false)?;
    let (_, out) = ns.enter(|| run_tc_from(&mut ebpf, PROG_SERVER_DECAP, &decap, v6))??;
    assert_eq!(dmac(&out), [2, 0, 0, 0, 0, 0x66], "off: the FIB");
    assert_eq!(delta(&ebpf, &before, Counter::NextHopMiss), 0);
    assert!(cache.reported().is_empty());
    Ok(())
}

/// The set of `addr` in the next-hop maps, as the programs compute it.
fn nexthop_set(addr: Ipv6Addr) -> u32 {
    let o = addr.octets();
    let word = |i: usize| u64::from_ne_bytes(o[i..i + 8].try_into().expect("8 bytes"));
    tunnel_common::nexthop::set_base([word(0), word(8)])
}

#[test]
fn a_third_destination_in_a_set_takes_the_older_entry_and_the_evicted_one_asks_the_fib()
-> Result<()> {
    let Fixture {
        mut lab,
        mut ebpf,
        mut maps,
        pin_dir,
    } = fixture("nh-set")?;
    let (ns, v6, v4) = router(&mut lab, "nhset")?;
    ns.ip("-6 neigh replace 2001:db8:1::2 lladdr 02:00:00:00:00:44 dev v6 nud permanent")?;
    ns.ip("-6 route add 2001:db8:2::/64 via 2001:db8:1::2")?;
    maps.set_config(&config(v6))?;

    // Three clients behind the router whose addresses share a set of the IPv6 map.
    let client =
        |iid: u32| Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, (iid >> 16) as u16, iid as u16);
    let mut by_set: std::collections::HashMap<u32, Vec<Ipv6Addr>> = Default::default();
    let trio = (1..=1_000_000)
        .find_map(|iid| {
            let group = by_set.entry(nexthop_set(client(iid))).or_default();
            group.push(client(iid));
            <[Ipv6Addr; 3]>::try_from(group.as_slice()).ok()
        })
        .ok_or_else(|| anyhow::anyhow!("no three addresses share a set"))?;
    let leases = [10, 11, 12].map(|i| Ipv4Addr::new(198, 51, 100, i));
    for (c, l) in trio.iter().zip(leases) {
        maps.bind(*c, l)?;
    }
    let mut cache = dataplane::nexthop::NextHops::take(&mut ebpf, &pin_dir)?;
    cache.set_enabled(true, true)?;
    cache.keep_valid(std::time::Duration::from_secs(60))?;
    let current = |cache: &dataplane::nexthop::NextHops| {
        trio.map(|c| cache.current_entry(c.into()).is_some())
    };
    ns.enter(|| -> Result<()> {
        for c in &trio {
            let answer = cache.resolve((*c).into())?;
            assert!(matches!(answer, Resolved::Forward(_)), "{c}: {answer:?}");
        }
        Ok(())
    })??;
    assert_eq!(
        current(&cache),
        [false, true, true],
        "the third took the first's slot"
    );

    // Each client's packets: the cached two from the cache, the evicted one from the FIB (as
    // well forwarded) and reported once.
    let encap = |lease: Ipv4Addr| ethernet(EtherType::IPV4, &ipv4_udp(HOST, lease, b"back"));
    let before = dataplane::stats::read(&ebpf)?;
    for (i, lease) in leases.iter().enumerate() {
        let (verdict, out) =
            ns.enter(|| run_tc_from(&mut ebpf, PROG_SERVER_ENCAP, &encap(*lease), v4))??;
        assert_eq!(
            (verdict, dmac(&out)),
            (TC_ACT_REDIRECT, [2, 0, 0, 0, 0, 0x44]),
            "client {i}"
        );
    }
    assert_eq!(delta(&ebpf, &before, Counter::NextHopMiss), 1);
    assert_eq!(cache.reported(), vec![(Family::V6, trio[0].into())]);

    // Resolved again, it takes the older of the other two: the second's.
    ns.enter(|| cache.resolve(trio[0].into()))??;
    assert_eq!(current(&cache), [true, false, true]);
    let before = dataplane::stats::read(&ebpf)?;
    for lease in &leases {
        ns.enter(|| run_tc_from(&mut ebpf, PROG_SERVER_ENCAP, &encap(*lease), v4))??;
    }
    assert_eq!(delta(&ebpf, &before, Counter::NextHopMiss), 1);
    assert_eq!(cache.reported(), vec![(Family::V6, trio[1].into())]);
    Ok(())
}

#[test]
fn without_ipv6_forwarding_the_controller_finds_the_output_next_hop_itself() -> Result<()> {
    let Fixture {
        mut lab,
        mut ebpf,
        mut maps,
        pin_dir,
    } = fixture("nh-out")?;
    // A host that sends from its tunnel address but does not forward IPv6 (a client, or a
    // server that forwards IPv4 only): CLIENT is behind a router on v6.
    let ns = lab.ns("nhout")?;
    let peer = lab.ns("nhout-peer")?;
    lab.veth(&ns, "v6", &peer, "p6")?;
    ns.ip("-6 addr add 2001:db8:ff::1/64 dev v6 nodad")?;
    ns.ip("-6 route add 2001:db8:1::/64 via 2001:db8:ff::2")?;
    ns.ip("-6 neigh replace 2001:db8:ff::2 lladdr 02:00:00:00:00:77 dev v6 nud reachable")?;
    let v6 = ns.enter(|| nix::net::if_::if_nametoindex("v6"))??;
    let v6_mac = link_mac(&ns, "v6")?;
    maps.set_config(&config(v6))?;
    maps.bind(CLIENT, LEASE)?;
    let mut cache = dataplane::nexthop::NextHops::take(&mut ebpf, &pin_dir)?;
    cache.set_enabled(true, true)?;
    cache.keep_valid(std::time::Duration::from_secs(60))?;

    // The FIB helper refuses: IPv6 forwarding is off on v6.
    let q = ns.enter(|| cache.ask(CLIENT.into()))??;
    assert_eq!(q.rc, 5, "BPF_FIB_LKUP_RET_FWD_DISABLED");
    // The controller asks the output path instead: the router's MAC, ours, v6.
    let answer = ns.enter(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let nl = tunnel_ctl::netlink::Netlink::connect()?;
            cache.resolve_with(CLIENT.into(), &nl).await
        })
    })??;
    let Resolved::Forward(nh) = answer else {
        bail!("CLIENT did not resolve: {answer:?}")
    };
    assert_eq!(
        (nh.ifindex, &nh.eth[2..8]),
        (v6, &[2, 0, 0, 0, 0, 0x77][..])
    );
    assert_eq!(
        (&nh.eth[8..14], &nh.eth[14..]),
        (&v6_mac[..], &[0x86, 0xdd][..])
    );
    assert_eq!(nh.mtu, 1500);

    // The programs encapsulate toward it with that MAC header and redirect, asking nothing.
    let encap = ethernet(EtherType::IPV4, &ipv4_udp(HOST, LEASE, b"back"));
    let before = dataplane::stats::read(&ebpf)?;
    let (verdict, out) = ns.enter(|| run_tc_from(&mut ebpf, PROG_SERVER_ENCAP, &encap, 0))??;
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(
        (dmac(&out), &out[6..12]),
        ([2, 0, 0, 0, 0, 0x77], &v6_mac[..])
    );
    assert_eq!(delta(&ebpf, &before, Counter::NextHopMiss), 0);
    assert_eq!(delta(&ebpf, &before, Counter::Encap), 1);
    Ok(())
}

/// Addresses of 2001:db8:1::/64 (other than CLIENT) in CLIENT's set of the binding cache.
fn cache_set_mates(bits: u8, n: usize) -> Vec<Ipv6Addr> {
    let set = |a: Ipv6Addr| bind_cache_base(words16(&a.octets()), bits);
    (3u16..)
        .map(|i| Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0x77, i))
        .filter(|&a| set(a) == set(CLIENT))
        .take(n)
        .collect()
}

/// The binding cache (BIND_CACHE) that the decap programs read before hashing holds exactly
/// what the hash holds: every bind, rebind and unbind shows in both programs' verdicts; a
/// client whose set is full is answered by the hash; a new controller rebuilds it from the
/// pinned hash. The programs' use of the cache itself is shown by making the hash say
/// something else behind the cache's back (which the controller never does).
#[test]
fn the_decap_programs_answer_from_the_binding_cache_which_follows_every_change() -> Result<()> {
    let Fixture {
        lab: _lab,
        mut ebpf,
        mut maps,
        pin_dir,
    } = fixture("bindcache")?;
    maps.set_config(&config(0))?;
    let bits = maps.config()?.bind_cache_bits;
    assert_eq!(bits, 16, "65,536 entries by default");
    let lease2 = Ipv4Addr::new(198, 51, 100, 20);
    let accepts = |ebpf: &mut Ebpf, client: Ipv6Addr, src: Ipv4Addr| -> Result<bool> {
        let before = dataplane::stats::read(ebpf)?;
        let packet = in_ipv6(client, TUNNEL, &ipv4_udp(src, HOST, b"x"));
        let (verdict, _) = run(ebpf, PROG_SERVER_DECAP, &packet)?;
        let decapsulated = delta(ebpf, &before, Counter::Decap) == 1;
        assert_eq!(decapsulated, verdict == TC_ACT_OK, "verdict {verdict}");
        Ok(decapsulated)
    };

    maps.bind(CLIENT, LEASE)?;
    let cached = maps.cached(CLIENT).expect("a new binding is cached");
    assert_eq!(cached.ipv4, v4_key(LEASE));
    assert!(accepts(&mut ebpf, CLIENT, LEASE)?);
    assert!(!accepts(&mut ebpf, CLIENT, lease2)?);

    // Behind the cache's back, the hash now gives CLIENT lease2: both programs still judge
    // by the cache (TC accepts LEASE; XDP drops lease2 as not the lease, where the hash
    // would have let it through to TC).
    let by_v6_pin = aya::maps::MapData::from_pin(pin_dir.join(BIND_BY_V6))?;
    let mut by_v6: aya::maps::HashMap<_, [u8; 16], Binding4> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(by_v6_pin))?;
    let real = by_v6.get(&CLIENT.octets(), 0)?;
    by_v6.insert(
        CLIENT.octets(),
        Binding4 {
            ipv4: v4_key(lease2),
            ..real
        },
        0,
    )?;
    assert!(accepts(&mut ebpf, CLIENT, LEASE)?);
    let before = dataplane::stats::read(&ebpf)?;
    let lease2_packet = in_ipv6(CLIENT, TUNNEL, &ipv4_udp(lease2, HOST, b"x"));
    let (verdict, _) = run_xdp(&mut ebpf, PROG_SERVER_DECAP_XDP, &lease2_packet, 0)?;
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(delta(&ebpf, &before, Counter::DropInnerSourceNotLease), 1);
    by_v6.insert(CLIENT.octets(), real, 0)?;

    // Unbind, then bind to another lease: the old lease is refused at once.
    maps.unbind(CLIENT, LEASE)?;
    assert_eq!(maps.cached(CLIENT), None);
    assert!(!accepts(&mut ebpf, CLIENT, LEASE)?);
    maps.bind(CLIENT, lease2)?;
    assert_eq!(maps.cached(CLIENT).map(|b| b.ipv4), Some(v4_key(lease2)));
    assert!(!accepts(&mut ebpf, CLIENT, LEASE)?);
    assert!(accepts(&mut ebpf, CLIENT, lease2)?);

    // A full set: the third client of it is not cached and is served by the hash.
    let mates = cache_set_mates(bits, 2);
    let leases = [
        Ipv4Addr::new(198, 51, 100, 30),
        Ipv4Addr::new(198, 51, 100, 31),
    ];
    for (&m, &l) in mates.iter().zip(&leases) {
        maps.bind(m, l)?;
    }
    assert!(maps.cached(mates[0]).is_some());
    assert_eq!(maps.cached(mates[1]), None, "the set holds two");
    assert!(accepts(&mut ebpf, mates[1], leases[1])?);
    assert!(!accepts(&mut ebpf, mates[1], leases[0])?);
    // A place frees up: binding again (a renewal) caches it.
    maps.unbind(mates[0], leases[0])?;
    maps.bind(mates[1], leases[1])?;
    assert!(maps.cached(mates[1]).is_some());
    assert!(!accepts(&mut ebpf, mates[0], leases[0])?);

    // A new controller on the same pins: the cache holds what the hash holds.
    drop(maps);
    let mut ebpf2 = dataplane::load(&pin_dir)?;
    let maps2 = Maps::take(&mut ebpf2)?;
    for (client, lease) in [(CLIENT, lease2), (mates[1], leases[1])] {
        assert_eq!(maps2.cached(client).map(|b| b.ipv4), Some(v4_key(lease)));
        assert!(accepts(&mut ebpf2, client, lease)?);
    }
    assert_eq!(maps2.cached(mates[0]), None);
    Ok(())
}

/// The seqlock of a binding cache entry: while one CPU rewrites an entry in place between
/// two clients (A → its lease, B → another) as fast as it can, the other runs the decap
/// program on "A with B's lease" millions of times. The hash holds neither, so only a
/// half-old, half-new entry could let one through: none may be decapsulated. (Without the
/// seqlock's check this test sees them; the controller itself never rewrites an entry from
/// one client to another, but an interrupted reader could straddle several writes.)
#[test]
fn a_binding_cache_entry_rewritten_under_traffic_is_never_read_half_old_half_new() -> Result<()> {
    let Fixture {
        lab: _lab,
        mut ebpf,
        mut maps,
        pin_dir,
    } = fixture("seqlock")?;
    maps.set_config(&config(0))?;
    let bits = maps.config()?.bind_cache_bits;
    let [a, b] = [CLIENT, cache_set_mates(bits, 1)[0]];
    let (lease_a, lease_b) = (LEASE, Ipv4Addr::new(198, 51, 100, 40));
    let pinned = aya::maps::MapData::from_pin(pin_dir.join(BIND_CACHE))?;
    let mut cache = BindCache::new(aya::maps::Array::try_from(aya::maps::Map::Array(pinned))?)?;
    let entry = |client: Ipv6Addr, l: Ipv4Addr| BindCacheEntry {
        client: client.octets(),
        ipv4: v4_key(l),
        slot: 7,
        live: 1,
        ..Default::default()
    };
    let (entry_a, entry_b) = (entry(a, lease_a), entry(b, lease_b));
    let i = cache.set_of(&a.octets()).start;
    // Positive control: the cache alone (no hash entry) gets A's packet through.
    cache.write(i, &entry_a);
    let ok = in_ipv6(a, TUNNEL, &ipv4_udp(lease_a, HOST, b"x"));
    assert_eq!(run(&mut ebpf, PROG_SERVER_DECAP, &ok)?.0, TC_ACT_OK);

    let stop = std::sync::atomic::AtomicBool::new(false);
    let forged = in_ipv6(a, TUNNEL, &ipv4_udp(lease_b, HOST, b"x"));
    let before = dataplane::stats::read(&ebpf)?;
    let runs: u64 = std::thread::scope(|s| -> Result<u64> {
        let writer = s.spawn(|| {
            let mut writes = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                cache.write(i, &entry_b);
                cache.write(i, &entry_a);
                writes += 2;
            }
            writes
        });
        let prog: &mut SchedClassifier = ebpf.program_mut(PROG_SERVER_DECAP).unwrap().try_into()?;
        let ctx = vec![0u8; 192];
        let mut out = vec![0u8; forged.len() + 128];
        let mut runs = 0;
        let started = std::time::Instant::now();
        // Bounded in count and in time.
        for _ in 0..400 {
            prog.test_run(TestRunOptions {
                data_in: Some(&forged),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                repeat: 10_000,
                ..Default::default()
            })?;
            runs += 10_000;
            if started.elapsed() > std::time::Duration::from_secs(3) {
                break;
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let writes = writer.join().expect("the writer thread");
        assert!(
            writes > 100_000,
            "the entry was rewritten only {writes} times"
        );
        Ok(runs)
    })?;
    let counters = dataplane::stats::read(&ebpf)?;
    let d = |c: Counter| counters[c.name()] - before[c.name()];
    assert_eq!(d(Counter::Decap), 0, "a torn entry let A send as B");
    assert_eq!(
        d(Counter::DropUnboundSource) + d(Counter::DropInnerSourceNotLease),
        runs,
        "every run dropped"
    );
    Ok(())
}
