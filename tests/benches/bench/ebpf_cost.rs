//! Per-packet cost of the eBPF programs with BPF_PROG_TEST_RUN, against an empty program.
//!
//! Method: the programs rewrite their packet (decapsulate, encapsulate, translate), and the
//! kernel's `repeat` loop runs a program again on the *same*, already rewritten buffer, so a
//! repeat count would time the "not mine, pass" branch after the first run. Each figure is
//! therefore the kernel-reported run time of N separate one-packet runs, averaged; the empty
//! program is timed the same way, so the fixed cost of the timer around a run is in both
//! sides of every ratio. The N runs of each program are split into slices timed in turn with
//! every other program's, and the figure is the median slice, so a noisy moment of the
//! machine does not land on one program alone. The empty program's in-kernel `repeat` figure
//! is reported as well.
//!
//! Every program runs in a namespace where its packet has a route and a resolved neighbour,
//! so it takes its whole path: lookups, rewrite, checksums, FIB lookup, redirect. The first
//! run of each is checked (verdict redirect, its counter moved) before timing.
use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use aya::{
    Ebpf,
    programs::{Program, TestRun as _, TestRunOptions},
};
use etherparse::PacketBuilder;
use tunnel_common::{
    fastpath::TunnelConfig,
    mape::{NatIn, NatKey, NatOut},
    names::{
        B4_ADDRS, BIND_BY_V6, BIND_CACHE, PROG_BENCH_EMPTY, PROG_BENCH_EMPTY_XDP, PROG_BR_DECAP,
        PROG_BR_DECAP_XDP, PROG_CE_OUT, PROG_SERVER_DECAP, PROG_SERVER_DECAP_XDP,
        PROG_SERVER_ENCAP, SHARED_ADDRS, SOFTWIRES,
    },
    stats::Counter,
};
use tunnel_ctl::{
    dataplane::{
        self,
        fastpath::{Maps, v4_key},
        nat::{BrRules, NatMaps},
        nexthop::{NextHops, Resolved},
        softwires::Softwires,
    },
    mape::rule::{InterfaceId, RuleSpec},
    server::softwires::{Softwire, Table},
};
use tunnel_tests::{Lab, Ns};

use crate::{
    Plan,
    report::{Report, Target, ratio},
};

const TC_ACT_REDIRECT: u32 = 7;
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;
const TC_ACT_OK: u32 = 0;
/// The ifindex runs pretend the packet arrived on.
static INGRESS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

const SERVER_TUNNEL: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 4);
const CLIENT: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
const LEASE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
const HOST: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const LAN_HOST: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const SHARED: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 18);
const EXT_PORT: u16 = 1680;
const BR: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 1, 0, 0, 0, 1);
const CE: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x12, 0xa400, 0, 0xcb00, 0x7112, 0xa4);
const RULE: &str = "2001:db8::/40,203.0.113.0/24,16,6";
/// 64 bytes of UDP payload: the small-packet case.
const PAYLOAD: [u8; 64] = [0x5a; 64];

fn udp4(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src.octets(), dst.octets(), 64)
        .udp(sport, dport)
        .write(&mut out, &PAYLOAD)
        .expect("writing to a Vec");
    out
}

/// Ethernet + IPv6 (next header 4) + the IPv4 packet of `inner` (an Ethernet frame).
fn in_ipv6(src: Ipv6Addr, dst: Ipv6Addr, inner: &[u8]) -> Vec<u8> {
    let ipv4 = &inner[14..];
    let mut out = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv6(src.octets(), dst.octets(), 64)
        .write(&mut out, etherparse::IpNumber::IPV4, ipv4)
        .expect("writing to a Vec");
    out
}

/// A namespace where every program's packet has a route and a resolved neighbour: `v6`
/// (default IPv6 route) and `v4` (192.0.2.0/24), forwarding on, permanent neighbours.
fn routed_ns(lab: &mut Lab) -> Result<(Ns, u32)> {
    let ns = lab.ns("ebpf")?;
    let peer = lab.ns("ebpf-peer")?;
    lab.veth(&ns, "v6", &peer, "p6")?;
    lab.veth(&ns, "v4", &peer, "p4")?;
    ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
    ns.sysctl("net.ipv4.ip_forward", "1")?;
    ns.ip("-6 addr add 2001:db8:ffff::2/64 dev v6 nodad")?;
    ns.ip("-6 route add default via 2001:db8:ffff::1")?;
    ns.ip("-6 neigh replace 2001:db8:ffff::1 lladdr 02:00:00:00:00:61 dev v6 nud permanent")?;
    ns.ip("addr add 192.0.2.1/24 dev v4")?;
    ns.ip(&format!(
        "neigh replace {HOST} lladdr 02:00:00:00:00:41 dev v4 nud permanent"
    ))?;
    let v6_index = ns.enter(|| nix::net::if_::if_nametoindex("v6"))??;
    Ok((ns, v6_index))
}

/// A loaded object of its own (own pins), for one role's map contents.
fn object(lab: &mut Lab, role: &str) -> Result<(Ebpf, PathBuf)> {
    let instance = lab.instance(role);
    let pin_dir = PathBuf::from("/sys/fs/bpf/tunnel").join(instance);
    Ok((dataplane::load(&pin_dir)?, pin_dir))
}

/// The object's next-hop cache, on (as a daemon runs it), valid for the whole bench, holding
/// the next hops toward `dsts` as the resolver found them (checked to be ones it forwards
/// with).
/// The resolver asks the FIB of the namespace it runs in: `ns`, where the programs run.
fn cache(
    ns: &Ns,
    ebpf: &mut Ebpf,
    pin_dir: &std::path::Path,
    dsts: &[std::net::IpAddr],
) -> Result<NextHops> {
    let mut nh = NextHops::take(ebpf, pin_dir)?;
    nh.set_enabled(true, true)?;
    // Twice, a second apart: the controller learns the tick rate from the first, and from
    // the second on keeps the programs' jiffies clock (what NAPT times mappings with), as a
    // running daemon does.
    nh.keep_valid(Duration::from_secs(3600))?;
    std::thread::sleep(Duration::from_millis(1100));
    nh.keep_valid(Duration::from_secs(3600))?;
    ns.enter(|| -> Result<()> {
        for &dst in dsts {
            match nh.resolve(dst)? {
                Resolved::Forward(_) => {}
                other => bail!("the next hop toward {dst} did not resolve: {other:?}"),
            }
        }
        Ok(())
    })??;
    Ok(nh)
}

fn config(local: Ipv6Addr, remote: Ipv6Addr, ipv4: Ipv4Addr, v6_ifindex: u32) -> TunnelConfig {
    TunnelConfig {
        local: local.octets(),
        remote: remote.octets(),
        ipv4: v4_key(ipv4),
        v6_ifindex,
        tun_ifindex: 0,
        inner_mtu: 1460,
        mss: 1420,
        hop_limit: 64,
        enabled: 1,
        ..Default::default()
    }
}

/// A server object's maps, configured for the tunnel address on `v6_index`.
fn server_maps(ebpf: &mut Ebpf, v6_index: u32) -> Result<Maps> {
    let mut maps = Maps::take(ebpf)?;
    maps.set_config(&config(
        SERVER_TUNNEL,
        Ipv6Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        v6_index,
    ))?;
    Ok(maps)
}

/// A server object whose decap map holds `n` bindings: the measured client's and `n` − 1
/// others (2001:db8:2::/64 + i, written straight into `BIND_BY_V6`; the program only looks
/// them up by source, so they share the lease and no packet is ever sent for them). Its
/// binding cache is sized as `--max-bindings n` sizes it and rebuilt from the map, as a
/// controller starting on those pins does.
struct Bindings {
    ebpf: Ebpf,
    _maps: (Maps, NextHops),
    /// Bindings that found a place in the cache.
    cached: usize,
    /// A client the cache answers for, and one it has no room for (the hash answers).
    hit: Ipv6Addr,
    miss: Ipv6Addr,
}

fn server_with_bindings(lab: &mut Lab, ns: &Ns, n: u32, v6_index: u32) -> Result<Bindings> {
    use std::os::fd::AsFd as _;
    let pin_dir =
        PathBuf::from("/sys/fs/bpf/tunnel").join(lab.instance(&format!("bench-server-{n}")));
    let size = n.max(1024);
    let mut ebpf = dataplane::load_sized(
        &pin_dir,
        &[
            (BIND_BY_V6, size),
            (
                BIND_CACHE,
                1 << tunnel_common::fastpath::bind_cache_bits(size),
            ),
        ],
    )?;
    let mut maps = server_maps(&mut ebpf, v6_index)?;
    let nexthops = cache(ns, &mut ebpf, &pin_dir, &[HOST.into()])?;
    maps.bind(CLIENT, LEASE)?;
    let other = |i: u32| Ipv6Addr::from(0x2001_0db8_0002_u128 << 80 | u128::from(i));
    let others: Vec<[u8; 16]> = (1..n).map(|i| other(i).octets()).collect();
    let binding = tunnel_common::fastpath::Binding4 {
        ipv4: v4_key(LEASE),
        ..Default::default()
    };
    let by_v6 = aya::maps::MapData::from_pin(pin_dir.join(BIND_BY_V6))?;
    dataplane::batch::update(by_v6.fd().as_fd(), &others, &vec![binding; others.len()])
        .map_err(|e| anyhow::anyhow!("filling {BIND_BY_V6}: {e:?}"))?;
    let cached = maps.rebuild_cache();
    let clients = || std::iter::once(CLIENT).chain((1..n).map(other));
    let hit = clients()
        .find(|&c| maps.cached(c).is_some())
        .context("no binding in the cache")?;
    let miss = clients().find(|&c| maps.cached(c).is_none()).unwrap_or(hit);
    Ok(Bindings {
        ebpf,
        _maps: (maps, nexthops),
        cached,
        hit,
        miss,
    })
}

/// Softwire `i` of the lwAFTR tables: 4,096 per address from 203.0.113.10 (psid-len 12,
/// psid-offset 4: ports 4096·j + psid), B4 2001:db8:100::/64 + i.
fn softwire(i: u32) -> Softwire {
    let ipv4 = Ipv4Addr::from(u32::from(Ipv4Addr::new(203, 0, 113, 10)) + i / 4096);
    let b4 = Ipv6Addr::from(0x2001_0db8_0100_u128 << 80 | u128::from(i));
    Softwire::new(ipv4, (i % 4096) as u16, 12, 4, b4, None).expect("a valid softwire")
}

/// An lwAFTR object holding `n` softwires, and the packet of its last one (B4 → internet).
#[allow(clippy::type_complexity)]
fn lwaftr(
    lab: &mut Lab,
    ns: &Ns,
    n: u32,
    v6_index: u32,
) -> Result<(Ebpf, (Maps, NextHops), Softwires, Vec<u8>)> {
    let pin_dir =
        PathBuf::from("/sys/fs/bpf/tunnel").join(lab.instance(&format!("bench-aftr-{n}")));
    let size = n.max(1024);
    let mut ebpf = dataplane::load_sized(
        &pin_dir,
        &[(SOFTWIRES, size), (SHARED_ADDRS, size), (B4_ADDRS, size)],
    )?;
    let maps = server_maps(&mut ebpf, v6_index)?;
    let nexthops = cache(ns, &mut ebpf, &pin_dir, &[HOST.into()])?;
    let mut table = Table::default();
    for i in 0..n {
        table.insert(softwire(i)).map_err(anyhow::Error::msg)?;
    }
    let softwires = Softwires::take(&mut ebpf, SERVER_TUNNEL, table)?;
    let last = softwire(n - 1);
    let packet = in_ipv6(
        last.b4,
        SERVER_TUNNEL,
        &udp4(last.ipv4, 4096 * 5 + last.psid, HOST, 53),
    );
    Ok((ebpf, (maps, nexthops), softwires, packet))
}

/// One program on one packet: checked once, then timed.
struct Case {
    name: &'static str,
    program: &'static str,
    ebpf: usize,
    packet: Vec<u8>,
    /// The counter its intended path moves (None for the empty program).
    counter: Option<Counter>,
    /// The verdict of that path.
    verdict: u32,
}

/// A `struct __sk_buff` for BPF_PROG_TEST_RUN's ctx_in: the packet arrived on `ifindex`
/// (as on a real ingress hook; the programs' FIB lookups start from the ingress interface).
fn skb_ctx(ifindex: u32) -> Vec<u8> {
    let mut ctx = vec![0u8; 192];
    // offsetof(struct __sk_buff, ingress_ifindex) = 36, ifindex = 40.
    ctx[36..40].copy_from_slice(&ifindex.to_ne_bytes());
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

/// One run of `program` (TC or XDP) on `packet`: its return value and kernel-reported time.
fn run_once(ebpf: &mut Ebpf, program: &str, packet: &[u8], repeat: u32) -> Result<(u32, Duration)> {
    let ifindex = INGRESS.load(std::sync::atomic::Ordering::Relaxed);
    let mut out = vec![0u8; packet.len() + 256];
    let prog = ebpf
        .program_mut(program)
        .with_context(|| format!("no program {program}"))?;
    let ctx = match prog {
        Program::SchedClassifier(_) => skb_ctx(ifindex),
        Program::Xdp(_) => tunnel_tests::xdp_test_ctx(ifindex, packet.len()),
        _ => bail!("{program} is neither a TC nor an XDP program"),
    };
    let opts = TestRunOptions {
        data_in: Some(packet),
        data_out: Some(&mut out),
        ctx_in: Some(&ctx),
        repeat,
        ..Default::default()
    };
    let loading = || format!("loading {program}");
    let r = match prog {
        Program::SchedClassifier(p) => {
            if p.fd().is_err() {
                p.load().with_context(loading)?;
            }
            p.test_run(opts)?
        }
        Program::Xdp(p) => {
            if p.fd().is_err() {
                p.load().with_context(loading)?;
            }
            p.test_run(opts)?
        }
        _ => unreachable!("checked above"),
    };
    Ok((r.return_value, r.duration))
}

/// Slices each case's one-packet runs are timed in, taken in turn across the cases.
const SLICES: u32 = 10;

/// Mean kernel-reported ns of `calls` one-packet runs.
fn time_per_call(ebpf: &mut Ebpf, program: &str, packet: &[u8], calls: u32) -> Result<f64> {
    let mut total = Duration::ZERO;
    for _ in 0..calls {
        total += run_once(ebpf, program, packet, 1)?.1;
    }
    Ok(total.as_nanos() as f64 / f64::from(calls))
}

pub fn run(plan: &Plan, report: &mut Report) -> Result<()> {
    let mut lab = Lab::new()?;
    let (ns, v6_index) = routed_ns(&mut lab)?;
    INGRESS.store(v6_index, std::sync::atomic::Ordering::Relaxed);

    // Server: one native binding; its next hops toward the client and the internet host.
    let (mut server, server_pins) = object(&mut lab, "bench-server")?;
    let mut maps = server_maps(&mut server, v6_index)?;
    maps.bind(CLIENT, LEASE)?;
    let _server_nh = cache(
        &ns,
        &mut server,
        &server_pins,
        &[HOST.into(), CLIENT.into()],
    )?;
    // The same programs asking the FIB for every packet (the cache off).
    let (mut server_fib, _) = object(&mut lab, "bench-server-fib")?;
    let mut fib_maps = server_maps(&mut server_fib, v6_index)?;
    fib_maps.bind(CLIENT, LEASE)?;

    // CE: one established UDP mapping LAN_HOST:40000 → HOST:53 as SHARED:1680.
    let (mut ce, ce_pins) = object(&mut lab, "bench-ce")?;
    let mut ce_cfg = Maps::take(&mut ce)?;
    ce_cfg.set_config(&config(CE, BR, SHARED, v6_index))?;
    let _ce_nh = cache(&ns, &mut ce, &ce_pins, &[BR.into()])?;
    let mut nat = NatMaps::take(&mut ce)?;
    let out_key = NatKey {
        local_ip: v4_key(LAN_HOST),
        remote_ip: v4_key(HOST),
        local_port: 40000,
        remote_port: 53,
        proto: 17,
        _pad: [0; 3],
    };
    let in_key = NatKey {
        local_ip: 0,
        local_port: EXT_PORT,
        ..out_key
    };
    nat.insert(
        out_key,
        NatOut {
            ext_port: EXT_PORT,
            ..Default::default()
        },
        in_key,
        NatIn {
            lan_ip: v4_key(LAN_HOST),
            lan_port: 40000,
            ..Default::default()
        },
    )?;

    // BR: the lab's rule.
    let (mut br, br_pins) = object(&mut lab, "bench-br")?;
    let mut br_cfg = Maps::take(&mut br)?;
    br_cfg.set_config(&config(
        BR,
        Ipv6Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        v6_index,
    ))?;
    let _br_nh = cache(&ns, &mut br, &br_pins, &[HOST.into()])?;
    let rule = RULE
        .parse::<RuleSpec>()
        .map_err(anyhow::Error::msg)?
        .rule(InterfaceId::Rfc7597);
    ensure!(
        Ipv6Addr::from(rule.to_map_rule().ce_address(u32::from(SHARED), 0xa4)) == CE,
        "the bench's CE address does not follow its rule"
    );
    // Map handles stay alive while the programs run: they hold the maps' fds.
    let mut br_rules = BrRules::take(&mut br)?;
    br_rules.replace_all(&[(
        v4_key(rule.ipv4.network()),
        rule.ipv4.prefix_len(),
        rule.to_map_rule(),
    )])?;

    // lwAFTR: 1,000 and 1,000,000 softwires (the decap cost with a big table).
    let (aftr_1k, _aftr_1k_cfg, _aftr_1k_sw, packet_1k) = lwaftr(&mut lab, &ns, 1_000, v6_index)?;
    let (aftr_1m, _aftr_1m_cfg, _aftr_1m_sw, packet_1m) =
        lwaftr(&mut lab, &ns, plan.softwires, v6_index)?;

    // Server decap with 1,000 and with 1,000,000 bindings in its map.
    let Bindings {
        ebpf: server_1k,
        _maps: _server_1k_maps,
        hit: hit_1k,
        ..
    } = server_with_bindings(&mut lab, &ns, 1_000, v6_index)?;
    let Bindings {
        ebpf: server_1m,
        _maps: _server_1m_maps,
        cached: cached_1m,
        hit: hit_1m,
        miss: miss_1m,
    } = server_with_bindings(&mut lab, &ns, plan.softwires, v6_index)?;

    let mut objects = [
        server, ce, br, aftr_1k, aftr_1m, server_1k, server_1m, server_fib,
    ];
    let cases = [
        Case {
            name: "empty TC program",
            program: PROG_BENCH_EMPTY,
            ebpf: 0,
            packet: udp4(HOST, 53, LEASE, 40000),
            counter: None,
            verdict: TC_ACT_OK,
        },
        Case {
            name: "server decap (binding + lease check, decap, next hop, redirect)",
            program: PROG_SERVER_DECAP,
            ebpf: 0,
            packet: in_ipv6(CLIENT, SERVER_TUNNEL, &udp4(LEASE, 40000, HOST, 53)),
            counter: Some(Counter::DecapRedirected),
            verdict: TC_ACT_REDIRECT,
        },
        Case {
            name: "server decap in XDP (binding + lease check, decap, next hop, redirect)",
            program: PROG_SERVER_DECAP_XDP,
            ebpf: 0,
            packet: in_ipv6(CLIENT, SERVER_TUNNEL, &udp4(LEASE, 40000, HOST, 53)),
            counter: Some(Counter::DecapRedirected),
            verdict: XDP_REDIRECT,
        },
        Case {
            name: "server encap (binding, encap, next hop, redirect)",
            program: PROG_SERVER_ENCAP,
            ebpf: 0,
            packet: udp4(HOST, 53, LEASE, 40000),
            counter: Some(Counter::Encap),
            verdict: TC_ACT_REDIRECT,
        },
        Case {
            name: "CE NAPT + encap (established flow)",
            program: PROG_CE_OUT,
            ebpf: 1,
            packet: udp4(LAN_HOST, 40000, HOST, 53),
            counter: Some(Counter::CeNaptOut),
            verdict: TC_ACT_REDIRECT,
        },
        Case {
            name: "BR rule check + decap",
            program: PROG_BR_DECAP,
            ebpf: 2,
            packet: in_ipv6(CE, BR, &udp4(SHARED, EXT_PORT, HOST, 53)),
            counter: Some(Counter::BrDecap),
            verdict: TC_ACT_REDIRECT,
        },
        Case {
            name: "server decap, 1,000 bindings (binding + lease check, decap, next hop, redirect)",
            program: PROG_SERVER_DECAP,
            ebpf: 5,
            packet: in_ipv6(hit_1k, SERVER_TUNNEL, &udp4(LEASE, 40000, HOST, 53)),
            counter: Some(Counter::DecapRedirected),
            verdict: TC_ACT_REDIRECT,
        },
        Case {
            name: "server decap, big map (binding + lease check, decap, next hop, redirect)",
            program: PROG_SERVER_DECAP,
            ebpf: 6,
            packet: in_ipv6(hit_1m, SERVER_TUNNEL, &udp4(LEASE, 40000, HOST, 53)),
            counter: Some(Counter::DecapRedirected),
            verdict: TC_ACT_REDIRECT,
        },
        Case {
            name: "lwAFTR decap, 1,000 softwires (softwire + B4 check, decap, next hop, redirect)",
            program: PROG_SERVER_DECAP,
            ebpf: 3,
            packet: packet_1k,
            counter: Some(Counter::Decap),
            verdict: TC_ACT_REDIRECT,
        },
        Case {
            name: "lwAFTR decap, big table (softwire + B4 check, decap, next hop, redirect)",
            program: PROG_SERVER_DECAP,
            ebpf: 4,
            packet: packet_1m,
            counter: Some(Counter::Decap),
            verdict: TC_ACT_REDIRECT,
        },
        Case {
            name: "server decap, FIB helper per packet (next-hop cache off)",
            program: PROG_SERVER_DECAP,
            ebpf: 7,
            packet: in_ipv6(CLIENT, SERVER_TUNNEL, &udp4(LEASE, 40000, HOST, 53)),
            counter: Some(Counter::DecapRedirected),
            verdict: TC_ACT_REDIRECT,
        },
        Case {
            name: "server encap, FIB helper per packet (next-hop cache off)",
            program: PROG_SERVER_ENCAP,
            ebpf: 7,
            packet: udp4(HOST, 53, LEASE, 40000),
            counter: Some(Counter::Encap),
            verdict: TC_ACT_REDIRECT,
        },
        // Information: a client the binding cache has no room for (the hash answers).
        Case {
            name: "server decap, big map, client not in the binding cache",
            program: PROG_SERVER_DECAP,
            ebpf: 6,
            packet: in_ipv6(miss_1m, SERVER_TUNNEL, &udp4(LEASE, 40000, HOST, 53)),
            counter: Some(Counter::DecapRedirected),
            verdict: TC_ACT_REDIRECT,
        },
        // Information: what `br --xdp` attaches.
        Case {
            name: "BR rule check + decap in XDP",
            program: PROG_BR_DECAP_XDP,
            ebpf: 2,
            packet: in_ipv6(CE, BR, &udp4(SHARED, EXT_PORT, HOST, 53)),
            counter: Some(Counter::BrDecap),
            verdict: XDP_REDIRECT,
        },
        // Last, so the indices above hold: information beside the XDP row, no target.
        Case {
            name: "empty XDP program",
            program: PROG_BENCH_EMPTY_XDP,
            ebpf: 0,
            packet: in_ipv6(CLIENT, SERVER_TUNNEL, &udp4(LEASE, 40000, HOST, 53)),
            counter: None,
            verdict: XDP_PASS,
        },
    ];

    let calls = plan.test_runs;
    // Every case is timed in SLICES slices taken in turn (case 1, 2, ... then again), each
    // figure the median of its slices: a quiet or busy moment of the machine falls on all the
    // cases alike, not on whichever one was being timed then.
    let per_slice = (calls / SLICES).max(1);
    let mut slices: Vec<Vec<f64>> = vec![Vec::with_capacity(SLICES as usize); cases.len()];
    ns.enter(|| -> Result<()> {
        for case in &cases {
            let ebpf = &mut objects[case.ebpf];
            if let Some(counter) = case.counter {
                let before = dataplane::stats::read(ebpf)?[counter.name()];
                let (verdict, _) = run_once(ebpf, case.program, &case.packet, 1)?;
                let after = dataplane::stats::read(ebpf)?[counter.name()];
                if verdict != case.verdict || after != before + 1 {
                    bail!(
                        "{}: verdict {verdict}, {} moved by {}: not the path to measure; counters {:?}",
                        case.program,
                        counter.name(),
                        after - before,
                        dataplane::stats::read(ebpf)?
                    );
                }
            }
            // Warm up.
            time_per_call(ebpf, case.program, &case.packet, calls.min(10_000) / 10)?;
        }
        for _ in 0..SLICES {
            for (case, times) in cases.iter().zip(&mut slices) {
                let ebpf = &mut objects[case.ebpf];
                times.push(time_per_call(ebpf, case.program, &case.packet, per_slice)?);
            }
        }
        if crate::profile::enabled() {
            for case in &cases {
                let ebpf = &mut objects[case.ebpf];
                crate::profile::run(&format!("eBPF {}", short(case.name)), || {
                    time_per_call(ebpf, case.program, &case.packet, calls)
                })?;
            }
        }
        Ok(())
    })??;
    let sec = "ebpf";
    let results: Vec<(&'static str, f64)> = cases
        .iter()
        .zip(slices)
        .map(|(case, times)| {
            let value = report.figure(sec, format!("{}, ns/packet", case.name), "ns", times);
            (case.name, value)
        })
        .collect();
    let (_, repeat_ns) =
        ns.enter(|| run_once(&mut objects[0], PROG_BENCH_EMPTY, &cases[0].packet, calls))??;

    let empty = results[0].1;
    report.figure(
        sec,
        "empty TC program, in-kernel repeat loop, ns/packet",
        "ns",
        vec![repeat_ns.as_nanos() as f64],
    );
    // Indices in `cases`: 0 empty, 1 decap (TC), 2 decap (XDP), 3 encap, 4 CE, 5 BR. The
    // limits are the fast-path issue's table.
    let limits = [(1, 3.0), (2, 2.0), (3, 3.5), (4, 4.5), (5, 3.0)];
    for (i, limit) in limits {
        let (name, v) = results[i];
        report.target(Target {
            name: format!("eBPF {} / empty", short(name)),
            value: ratio(v, empty),
            unit: "x",
            op: "<=",
            threshold: limit,
            against: format!("empty TC program, {empty:.0} ns per one-packet run"),
        });
    }
    let (small, big) = (results[8].1, results[9].1);
    let (few, many) = (results[6].1, results[7].1);
    report.target(Target {
        name: format!(
            "eBPF server decap, {} / 1,000 bindings",
            grouped(plan.softwires)
        ),
        value: ratio(many, few),
        unit: "x",
        op: "<=",
        threshold: 1.1,
        against: format!("server decap with 1,000 bindings, {few:.0} ns"),
    });
    let uncached = results[results.len() - 3].1;
    report.figure(
        sec,
        "server decap, big map, client not in / in the binding cache",
        "x",
        vec![uncached / many],
    );
    report.note(format!(
        "Server decap with {} bindings in BIND_BY_V6: {many:.0} ns against {few:.0} ns with \
         1,000, each for a client the binding cache answers for (the other bindings written \
         straight into the map, the cache then rebuilt from it as a starting controller \
         does). The cache (two-way, {} entries) holds {} of the {} bindings; {}",
        grouped(plan.softwires),
        grouped(1u32 << tunnel_common::fastpath::bind_cache_bits(plan.softwires.max(1024))),
        grouped(cached_1m as u32),
        grouped(plan.softwires),
        if cached_1m < plan.softwires as usize {
            format!("for one it has no room for, the hash answers: {uncached:.0} ns.")
        } else {
            "every binding found a place (the uncached row measures a cached client).".into()
        }
    ));
    report.figure(
        sec,
        format!(
            "lwAFTR decap, {} / 1,000 softwires",
            grouped(plan.softwires)
        ),
        "x",
        vec![big / small],
    );
    report.note(format!(
        "lwAFTR decap (server_decap, no native binding for the B4, tail call to \
         server_decap_softwire: split, softwire and B4 lookups, decap, next hop, redirect): \
         {small:.0} ns with 1,000 softwires, {big:.0} ns with {} in the maps (the last \
         softwire of each table measured).",
        plan.softwires
    ));
    let (tc, xdp) = (results[1].1, results[2].1);
    let empty_xdp = results[results.len() - 1].1;
    report.figure(sec, "server decap, XDP / TC", "x", vec![xdp / tc]);
    let (br_tc, br_xdp) = (results[5].1, results[results.len() - 2].1);
    report.figure(
        sec,
        "BR rule check + decap, XDP / TC",
        "x",
        vec![br_xdp / br_tc],
    );
    report.figure(
        sec,
        "server decap in XDP / empty XDP program",
        "x",
        vec![xdp / empty_xdp],
    );
    report.note(format!(
        "XDP variant of the server's decapsulation (server_decap_xdp, the plain case only, \
         everything else passed to the TC program): {xdp:.0} ns against TC's {tc:.0} ns per \
         packet; an empty XDP program takes {empty_xdp:.0} ns (the empty TC program {empty:.0}), \
         so the XDP program's own work is {:.0} ns. The server attaches it only with --xdp: \
         on a veth (this lab, containers) XDP takes the software GSO features away from its peer (the veth driver's \
         veth_xdp_set), so every hop before it carries MTU-sized packets instead of 64 KiB \
         GSO packets; the throughput section's XDP rows show what that costs.",
        xdp - empty_xdp
    ));
    report.note(format!(
        "eBPF figures: mean kernel-reported time of {calls} one-packet BPF_PROG_TEST_RUN runs \
         each (64-byte UDP payload); the timer around each run is in the empty program's \
         figure too. Net of the empty program: {}.",
        results[1..results.len() - 1]
            .iter()
            .map(|(n, v)| format!("{} {:.0} ns", short(n), v - empty))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    Ok(())
}

/// `n` with thousands separated: 1,000,000.
fn grouped(n: u32) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The part of a case name before its parenthesis.
fn short(name: &str) -> &str {
    name.split(" (").next().unwrap_or(name)
}
