//! MAP-E (SPEC §6, issue "MAP-E"): LAN host → CE (eBPF NAPT into the port set) → BR →
//! internet host, and back.
use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read as _, Write as _},
    net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use tunnel_tests::{
    counter,
    mape::{
        BR_ADDR, Capture, INTERNET_HOST, LAN_HOST, MapeLab, RULE_16, RULE_252, SHARED, udp_echo,
        udp_roundtrip,
    },
    transfer::tcp_transfer,
    wait_for,
};

/// The ports of PSID 0xa4 under RULE_252: (j << 10) | (0xa4 << 2) | i.
fn in_set_252(port: u16) -> bool {
    port >= 1024 && (port >> 2) & 0xff == 0xa4
}

/// The ports of PSID 0xa40 under RULE_16.
fn in_set_16(port: u16) -> bool {
    port >> 4 == 0xa40
}

fn stat(v: &serde_json::Value, name: &str) -> u64 {
    counter(v, name)
}

#[test]
fn lan_reaches_the_internet_through_ce_and_br_inside_the_port_set() -> Result<()> {
    let t = MapeLab::start(&RULE_252, &[])?;
    let capture = Capture::start(&t.internet, "eth0")?;
    let echo = udp_echo(&t.internet, SocketAddrV4::new(INTERNET_HOST, 7))?;

    // ICMP echo: the first request takes the slow path, the rest the fast path.
    assert_eq!(t.lan.ping(&INTERNET_HOST.to_string(), 5)?, 5, "pings lost");
    // UDP echo, several sockets.
    for i in 0..5u8 {
        udp_roundtrip(&t.lan, SocketAddrV4::new(INTERNET_HOST, 7), &[i; 100])?;
    }
    // 20 MB of TCP, byte for byte.
    tcp_transfer(
        &t.lan,
        &t.internet,
        SocketAddr::from((INTERNET_HOST, 5001)),
        20 << 20,
        7,
    )?;
    echo.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = capture.stop()?;

    let mut per_proto = BTreeMap::new();
    for s in &seen {
        assert_eq!(s.src, SHARED, "packet without the shared address: {s:?}");
        if s.proto != 1 || s.port.is_some() {
            let port = s.port.expect("TCP/UDP have ports");
            assert!(in_set_252(port), "port {port} outside the set: {s:?}");
        }
        *per_proto.entry(s.proto).or_insert(0u64) += 1;
    }
    for proto in [1u8, 6, 17] {
        assert!(
            per_proto.get(&proto).copied().unwrap_or(0) > 0,
            "no protocol {proto} seen: {per_proto:?}"
        );
    }
    let ce = t.ce_stats()?;
    assert!(stat(&ce, "mape_ce_napt_out_packets") > 1000, "{ce}");
    assert!(stat(&ce, "mape_ce_napt_in_packets") > 10, "{ce}");
    let br = t.br_stats()?;
    assert_eq!(stat(&br, "mape_br_drop_port_outside_set"), 0, "{br}");
    assert_eq!(stat(&br, "mape_br_drop_source_mismatch"), 0, "{br}");
    Ok(())
}

/// Sends one UDP datagram from a fresh socket in the LAN to `to` (nobody needs to answer).
fn udp_send(t: &MapeLab, to: SocketAddrV4) -> Result<std::net::UdpSocket> {
    let sock = t.lan.enter(|| std::net::UdpSocket::bind("0.0.0.0:0"))??;
    sock.send_to(b"x", to)?;
    Ok(sock)
}

/// External ports of the CE's mappings of `proto`.
fn external_ports(t: &MapeLab, proto: &str) -> Result<Vec<u16>> {
    Ok(t.nat()?
        .iter()
        .filter(|m| m["proto"] == proto)
        .filter_map(|m| m["external_port"].as_u64())
        .map(|p| p as u16)
        .collect())
}

#[test]
fn six_hundred_flows_spread_evenly_over_every_block() -> Result<()> {
    let t = MapeLab::start(&RULE_252, &[])?;
    let capture = Capture::start(&t.internet, "eth0")?;
    let mut sockets = Vec::new();
    for i in 0..600u16 {
        sockets.push(udp_send(&t, SocketAddrV4::new(INTERNET_HOST, 10_000 + i))?);
    }
    wait_for("600 UDP mappings", Duration::from_secs(20), || {
        Ok((external_ports(&t, "udp")?.len() == 600).then_some(()))
    })?;
    // What left the BR, as the internet host saw it.
    let seen = capture.stop()?;
    let ports: Vec<u16> = seen
        .iter()
        .filter(|s| s.proto == 17)
        .filter_map(|s| s.port)
        .collect();
    assert_eq!(
        ports.len(),
        600,
        "datagrams seen at the internet host; BR {} CE {}",
        t.br_stats()?,
        t.ce_stats()?
    );
    let mut per_block: BTreeMap<u16, usize> = BTreeMap::new();
    for p in &ports {
        assert!(in_set_252(*p), "port {p} outside the set");
        *per_block.entry(p >> 10).or_default() += 1;
    }
    assert_eq!(per_block.len(), 63, "blocks used: {per_block:?}");
    let (min, max) = (
        per_block.values().min().copied().unwrap_or(0),
        per_block.values().max().copied().unwrap_or(0),
    );
    assert!(
        max <= 2 * min,
        "uneven: min {min}, max {max}: {per_block:?}"
    );
    drop(sockets);
    Ok(())
}

/// Opens a TCP connection from the LAN host to `to`, within `limit`.
fn connect(t: &MapeLab, to: SocketAddrV4, limit: Duration) -> std::io::Result<TcpStream> {
    t.lan
        .enter(|| TcpStream::connect_timeout(&SocketAddr::V4(to), limit))
        .map_err(std::io::Error::other)?
}

#[test]
fn a_sixteen_port_set_exhausts_per_destination_only() -> Result<()> {
    let t = MapeLab::start(&RULE_16, &[])?;
    // Five listening destinations on the internet host; accepted connections stay open.
    let mut listeners = Vec::new();
    for port in 5001..=5005u16 {
        let l = t
            .internet
            .enter(|| TcpListener::bind(SocketAddrV4::new(INTERNET_HOST, port)))??;
        listeners.push(l);
    }
    let mut open = Vec::new();
    for port in 5001..=5004u16 {
        for _ in 0..16 {
            let c = connect(
                &t,
                SocketAddrV4::new(INTERNET_HOST, port),
                Duration::from_secs(5),
            )
            .with_context(|| format!("flow to port {port}"))?;
            open.push(c);
        }
    }
    // The internet host holds 64 connections, every one from the shared address.
    for l in &listeners[..4] {
        l.set_nonblocking(true)?;
        for n in 0..16 {
            let (_, peer) = l
                .accept()
                .with_context(|| format!("connection {n} to {:?}", l.local_addr()))?;
            assert_eq!(peer.ip(), SHARED, "a flow arrived from {peer}");
        }
        assert!(l.accept().is_err(), "a 17th connection reached {l:?}");
    }
    let ports = external_ports(&t, "tcp")?;
    assert_eq!(ports.len(), 64);
    assert!(ports.iter().all(|p| in_set_16(*p)), "{ports:?}");
    assert_eq!(ports.iter().collect::<BTreeSet<_>>().len(), 16);

    let before = stat(&t.ce_stats()?, "port_exhausted");
    // The 17th flow is refused by the CE's ICMP "administratively prohibited" (type 3 code
    // 13), which Linux reports to connect() as EHOSTUNREACH, not left to time out.
    let refused = connect(
        &t,
        SocketAddrV4::new(INTERNET_HOST, 5001),
        Duration::from_secs(5),
    );
    match refused {
        Ok(_) => bail!("a 17th flow to one destination got through"),
        Err(e) => assert_eq!(
            e.kind(),
            std::io::ErrorKind::HostUnreachable,
            "the 17th flow failed with {e} instead of the CE's ICMP answer"
        ),
    }
    assert!(stat(&t.ce_stats()?, "port_exhausted") > before);
    // A fifth destination still has the whole set.
    connect(
        &t,
        SocketAddrV4::new(INTERNET_HOST, 5005),
        Duration::from_secs(5),
    )
    .context("flow to a fifth destination")?;
    drop(listeners);
    Ok(())
}

#[test]
fn port_forward_reaches_the_lan_host_and_outside_ports_are_refused() -> Result<()> {
    let forward = format!("1680={LAN_HOST}:80/tcp");
    let t = MapeLab::start(&RULE_252, &["--forward", &forward])?;
    let server = t
        .lan
        .enter(|| TcpListener::bind(SocketAddrV4::new(LAN_HOST, 80)))??;
    let accept = std::thread::spawn(move || -> Result<SocketAddr> {
        let (mut c, peer) = server.accept()?;
        c.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut buf = [0u8; 5];
        c.read_exact(&mut buf)?;
        c.write_all(&buf)?;
        Ok(peer)
    });
    let mut c = t
        .internet
        .enter(|| {
            TcpStream::connect_timeout(
                &SocketAddr::V4(SocketAddrV4::new(SHARED, 1680)),
                Duration::from_secs(5),
            )
        })?
        .context("connecting to the shared address's forwarded port")?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    c.write_all(b"hello")?;
    let mut back = [0u8; 5];
    c.read_exact(&mut back)?;
    assert_eq!(&back, b"hello");
    let peer = accept.join().map_err(|_| anyhow::anyhow!("panicked"))??;
    assert_eq!(peer.ip(), std::net::IpAddr::V4(INTERNET_HOST));

    let out = t.lab.ctl_output(&[
        "forward",
        "add",
        &format!("1232={LAN_HOST}:81/tcp"),
        "--instance",
        &t.ce_instance,
    ])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("outside this CE's port set"), "{err}");
    Ok(())
}

#[test]
fn br_drops_ports_outside_the_set_and_spoofed_sources() -> Result<()> {
    let t = MapeLab::start(&RULE_252, &[])?;
    let _counted = br_rule_checks(&t)?;
    Ok(())
}

/// Sends the BR what its rule check must catch (a port of another CE's PSID, a port no CE
/// owns, the right port from a wrong outer source) and then a legitimate datagram, which must
/// be the first to reach the internet host; the BR counts the three drops. Returns the BR's
/// counters' changes.
fn br_rule_checks(t: &MapeLab) -> Result<impl Fn(&str) -> u64 + use<>> {
    use std::net::Ipv6Addr;
    let sink = t
        .internet
        .enter(|| std::net::UdpSocket::bind(SocketAddrV4::new(INTERNET_HOST, 7000)))??;
    sink.set_read_timeout(Some(Duration::from_secs(3)))?;
    let ce_addr: Ipv6Addr = "2001:db8:12:a400:0:cb00:7112:a4".parse()?;
    let spoofed: Ipv6Addr = "2001:db8:12:a400::99".parse()?;
    let inner = |sport: u16, payload: &[u8]| -> Vec<u8> {
        let mut out = Vec::new();
        etherparse::PacketBuilder::ipv4(SHARED.octets(), INTERNET_HOST.octets(), 64)
            .udp(sport, 7000)
            .write(&mut out, payload)
            .expect("valid packet");
        out
    };
    let before = t.br_stats()?;
    send_ipip(t, ce_addr, &inner(1232, b"bad port"))?; // PSID 0x34, not ours
    send_ipip(t, ce_addr, &inner(80, b"no psid"))?; // below 1024: no CE owns it
    send_ipip(t, spoofed, &inner(1680, b"spoofed"))?; // right port, wrong outer source
    send_ipip(t, ce_addr, &inner(1681, b"legit"))?;
    let mut buf = [0u8; 64];
    let (n, _) = sink
        .recv_from(&mut buf)
        .context("the legitimate datagram")?;
    assert_eq!(
        &buf[..n],
        b"legit",
        "something else reached the internet first"
    );
    let after = t.br_stats()?;
    let delta = move |name: &str| stat(&after, name) - stat(&before, name);
    assert_eq!(delta("mape_br_drop_port_outside_set"), 2);
    assert_eq!(delta("mape_br_drop_source_mismatch"), 1);
    Ok(delta)
}

/// Sends `inner` as IPv4-in-IPv6 from the CE namespace with outer source `src` to the BR.
fn send_ipip(t: &MapeLab, src: std::net::Ipv6Addr, inner: &[u8]) -> Result<()> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    let br: std::net::Ipv6Addr = tunnel_tests::mape::BR_ADDR.parse()?;
    t.ce.enter(|| -> Result<()> {
        // SAFETY: plain socket(2); owned at once.
        let raw = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_IPIP) };
        if raw < 0 {
            bail!("raw socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: fresh fd.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let one: libc::c_int = 1;
        // SAFETY: pointer and size of a live c_int.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::IPPROTO_IPV6,
                libc::IPV6_FREEBIND,
                (&one as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as u32,
            )
        };
        nix::sys::socket::bind(
            fd.as_raw_fd(),
            &nix::sys::socket::SockaddrIn6::from(std::net::SocketAddrV6::new(src, 0, 0, 0)),
        )?;
        nix::sys::socket::sendto(
            fd.as_raw_fd(),
            inner,
            &nix::sys::socket::SockaddrIn6::from(std::net::SocketAddrV6::new(br, 0, 0, 0)),
            nix::sys::socket::MsgFlags::empty(),
        )?;
        Ok(())
    })?
}

/// LAN host's TCP segment counters (out, in) from /proc/net/snmp.
fn tcp_segments(t: &MapeLab) -> Result<(u64, u64)> {
    let tcp = tunnel_tests::snmp(&t.lan, "Tcp", &["OutSegs", "InSegs"])?;
    Ok((tcp[0], tcp[1]))
}

#[test]
fn after_the_first_packet_a_transfer_stays_in_the_ebpf_fast_path() -> Result<()> {
    let t = MapeLab::start(&RULE_252, &[])?;
    let before = t.ce_stats()?;
    let (out0, in0) = tcp_segments(&t)?;
    tcp_transfer(
        &t.lan,
        &t.internet,
        SocketAddr::from((INTERNET_HOST, 5002)),
        100 << 20,
        9,
    )?;
    let after = t.ce_stats()?;
    let (out1, in1) = tcp_segments(&t)?;
    let delta = |name: &str| stat(&after, name) - stat(&before, name);
    let packets = (out1 - out0) + (in1 - in0);
    let fast = delta("mape_ce_napt_out_packets") + delta("mape_ce_napt_in_packets");
    let slow = delta("slowpath_out_packets");
    println!("LAN host TCP segments {packets}, eBPF NAPT {fast}, slow path {slow}");
    assert_eq!(slow, 1, "only the SYN takes the slow path: {after}");
    assert!(
        fast as f64 >= 0.99 * (packets - 1) as f64,
        "eBPF counted {fast} of {packets} segments"
    );
    Ok(())
}

#[test]
fn idle_udp_mappings_expire_and_their_ports_are_used_again() -> Result<()> {
    let t = MapeLab::start(&RULE_16, &["--udp-timeout", "2s"])?;
    let to = SocketAddrV4::new(INTERNET_HOST, 9000);
    let mut sockets = Vec::new();
    for _ in 0..16 {
        sockets.push(udp_send(&t, to)?);
    }
    let first: BTreeSet<u16> = wait_for("16 UDP mappings", Duration::from_secs(5), || {
        let p = external_ports(&t, "udp")?;
        Ok((p.len() == 16).then(|| p.into_iter().collect()))
    })?;
    assert_eq!(first.len(), 16);
    // The set is used up toward this destination.
    let before = stat(&t.ce_stats()?, "port_exhausted");
    sockets.push(udp_send(&t, to)?);
    wait_for(
        "the 17th flow to be refused",
        Duration::from_secs(5),
        || Ok((stat(&t.ce_stats()?, "port_exhausted") > before).then_some(())),
    )?;
    // Idle for the timeout: gone from the table.
    wait_for("the mappings to expire", Duration::from_secs(15), || {
        Ok(external_ports(&t, "udp")?.is_empty().then_some(()))
    })?;
    assert!(stat(&t.ce_stats()?, "mappings_expired") >= 16);
    // New flows get the same ports again.
    for _ in 0..16 {
        sockets.push(udp_send(&t, to)?);
    }
    let second: BTreeSet<u16> = wait_for("16 new UDP mappings", Duration::from_secs(5), || {
        let p = external_ports(&t, "udp")?;
        Ok((p.len() == 16).then(|| p.into_iter().collect()))
    })?;
    assert_eq!(first, second);
    Ok(())
}

/// The CE address of RULE_252's prefix, worked out by hand (RFC 7597 §6): the /56's first
/// /64, then 0, the IPv4 address 203.0.113.18 (cb00:7112) and PSID 0xa4.
const CE_252: &str = "2001:db8:12:a400:0:cb00:7112:a4";

/// The id after the "tnlprobe" marker in a frame, if any.
fn probe_id(frame: &[u8]) -> Option<u8> {
    let at = frame.windows(8).position(|w| w == b"tnlprobe")?;
    frame.get(at + 8).copied()
}

/// Issue 18 item 2: IPv4-in-IPv6 to the BR with a Tunnel Encapsulation Limit (ip6tnl's
/// default) or Hop-by-Hop options is decapsulated; outer fragments are reassembled by the
/// controller (issue 21) and go on; a chain of five Destination Options and ICMPv6 to the
/// BR address are dropped and counted. With IPv6
/// forwarding on and a route that would send the BR address back toward the CE, a capture on
/// the CE-BR link sees each crafted packet exactly once (no loop).
#[test]
fn the_br_decapsulates_behind_options_and_never_bounces_what_it_does_not_take() -> Result<()> {
    use tunnel_tests::craft::{self, Ext};
    let t = MapeLab::start(&RULE_252, &[])?;
    assert_eq!(t.lab.ctl_json("status", &t.ce_instance)?["ce_ipv6"], CE_252);
    for ns in [&t.ce, &t.br] {
        ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
    }
    t.br.ip("-6 route add 2001:db8:ffff:1::/64 via 2001:db8:ffff::2")?;
    // A listener that never answers: nothing comes back over the link to muddle the count.
    let _sink = t
        .internet
        .enter(|| std::net::UdpSocket::bind(SocketAddrV4::new(INTERNET_HOST, 7)))??;
    let arrivals = Capture::start(&t.internet, "eth0")?;
    // Frames reaching the BR from the CE side: a bouncing packet would come in again and again.
    let link = Capture::start_with(&t.br, "ce0", probe_id)?;

    let (ce, br): (std::net::Ipv6Addr, std::net::Ipv6Addr) = (CE_252.parse()?, BR_ADDR.parse()?);
    // UDP from the shared address and a port of PSID 0xa4 (1680) to the echo service.
    let udp = |id: u8| -> Result<Vec<u8>> {
        let mut payload = b"tnlprobe".to_vec();
        payload.push(id);
        payload.extend_from_slice(&[0; 11]);
        payload.extend_from_slice(b"tnlprobe");
        payload.push(id + 100);
        let mut out = Vec::new();
        etherparse::PacketBuilder::ipv4(SHARED.octets(), INTERNET_HOST.octets(), 64)
            .udp(1680, 7)
            .write(&mut out, &payload)?;
        Ok(out)
    };
    let frag = |offset: u16, more: bool| Ext::Fragment {
        offset,
        more,
        id: 0x5eed,
    };
    let fragmented = udp(3)?;
    let five = [Ext::DestOpts; 5];
    let packets = [
        craft::ipv6(ce, br, &[Ext::EncapLimit], craft::IPIP, &udp(1)?),
        craft::ipv6(ce, br, &[Ext::HopByHop], craft::IPIP, &udp(2)?),
        // 48 bytes (IPv4 + UDP + "tnlprobe" 3 + 11) in the first fragment, the rest after.
        craft::ipv6(ce, br, &[frag(0, true)], craft::IPIP, &fragmented[..48]),
        craft::ipv6(ce, br, &[frag(6, false)], craft::IPIP, &fragmented[48..]),
        craft::ipv6(ce, br, &five, craft::IPIP, &udp(5)?),
        craft::ipv6(
            ce,
            br,
            &[],
            craft::ICMPV6,
            b"\x80\0\0\0\0\x01\0\x01tnlprobe\x06",
        ),
    ];
    let before = t.br_stats()?;
    t.ce.enter(|| -> Result<()> {
        for p in &packets {
            craft::send_raw_ipv6(p)?;
        }
        Ok(())
    })??;
    let want = [
        ("mape_br_decap_packets", 2),
        ("ext_headers_removed", 2),
        ("mape_br_slowpath_outer_fragments", 2),
        ("outer_fragments_reassembled", 1),
        ("slowpath_decap_packets", 1),
        ("drop_outer_fragment", 0),
        ("drop_ext_headers_too_many", 1),
        ("mape_br_drop_not_ipip", 1),
    ];
    tunnel_tests::wait_counter_deltas(
        "the BR to count every crafted packet",
        Duration::from_secs(10),
        &before,
        &want,
        || t.br_stats(),
    )?;
    // Stopping a capture reads what has arrived by then (a bounce takes microseconds).
    let link = link.stop()?;
    let seen = arrivals.stop()?;
    // The three it took (the fragmented one put together) reach the internet host from the
    // shared address and port.
    let from_ce: Vec<_> = seen
        .iter()
        .filter(|s| s.proto == 17 && s.src == SHARED && s.port == Some(1680))
        .collect();
    assert_eq!(from_ce.len(), 3, "datagrams at the internet host: {seen:?}");
    let after = t.br_stats()?;
    for (name, n) in want {
        assert_eq!(
            stat(&after, name) - stat(&before, name),
            n,
            "{name}: {after}"
        );
    }
    let mut counts = BTreeMap::new();
    for id in &link {
        *counts.entry(*id).or_insert(0) += 1;
    }
    // The crafted packets: 1, 2, the two fragments (3 and the second marker, 103), 5, 6.
    for id in [1u8, 2, 3, 103, 5, 6] {
        assert_eq!(
            counts.get(&id),
            Some(&1),
            "probe {id} on the CE-BR link: {counts:?}"
        );
    }
    assert!(
        counts.values().all(|n| *n == 1),
        "something bounced: {counts:?}"
    );
    Ok(())
}

/// Issue 18 item 3: `traceroute -n` (UDP, and ICMP with -I) from the LAN host shows every hop: the CE
/// (198.51.100.1), the BR (192.0.2.1: its time-exceeded goes back through the softwire to
/// the CE that the quoted packet's source port selects) and the internet host.
#[test]
fn traceroute_from_the_lan_shows_the_br_hop() -> Result<()> {
    let t = MapeLab::start(&RULE_252, &[])?;
    // The kernel's ICMP rate limit would turn quick probes into stars; not what is tested.
    for ns in [&t.ce, &t.br, &t.internet] {
        ns.sysctl("net.ipv4.icmp_ratelimit", "0")?;
    }
    let before = t.br_stats()?;
    let host = INTERNET_HOST.to_string();
    // UDP probes (the host answers port unreachable), then ICMP echo (issue 21 Done-when 4).
    for probe in [&[][..], &["-I"]] {
        let mut argv = vec!["traceroute", "-n", "-q", "1", "-w", "2", "-m", "5"];
        argv.extend_from_slice(probe);
        argv.push(&host);
        let out = t.lan.run(&argv)?;
        let hops: Vec<String> = out
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().nth(1).map(str::to_owned))
            .collect();
        assert_eq!(
            hops,
            ["198.51.100.1", "192.0.2.1", "192.0.2.2"],
            "{probe:?}: {out}"
        );
    }
    let after = t.br_stats()?;
    assert_eq!(
        stat(&after, "drop_slowpath_no_port"),
        stat(&before, "drop_slowpath_no_port"),
        "{after}"
    );
    Ok(())
}

/// Issue 21 (Done-when 3, second half): IPv4-in-IPv6 from the BR that carries a Tunnel
/// Encapsulation Limit option (what a hand-built ip6tnl BR sends) is accepted by the CE and
/// reaches the LAN host through its mapping, byte for byte.
#[test]
fn the_ce_accepts_a_tunnel_encapsulation_limit_from_the_br() -> Result<()> {
    use tunnel_tests::craft::{self, Ext};
    let t = MapeLab::start(&RULE_252, &[])?;
    // A mapping: the LAN host's UDP socket talks to the internet host once.
    let _echo = udp_echo(&t.internet, SocketAddrV4::new(INTERNET_HOST, 7))?;
    let lan = t
        .lan
        .enter(|| std::net::UdpSocket::bind(SocketAddrV4::new(LAN_HOST, 0)))??;
    lan.set_read_timeout(Some(Duration::from_secs(5)))?;
    lan.send_to(b"open a mapping", SocketAddrV4::new(INTERNET_HOST, 7))?;
    let mut buf = [0u8; 2048];
    lan.recv_from(&mut buf)
        .context("the echo through the tunnel")?;
    let ports = external_ports(&t, "udp")?;
    let [port] = ports[..] else {
        bail!("expected one UDP mapping: {ports:?}")
    };
    // The internet host's next datagram, as an ip6tnl BR would wrap it.
    let mut inner = Vec::new();
    etherparse::PacketBuilder::ipv4(INTERNET_HOST.octets(), SHARED.octets(), 63)
        .udp(7, port)
        .write(&mut inner, b"behind an encapsulation limit")?;
    let (br, ce): (std::net::Ipv6Addr, std::net::Ipv6Addr) = (BR_ADDR.parse()?, CE_252.parse()?);
    let packet = craft::ipv6(br, ce, &[Ext::EncapLimit], craft::IPIP, &inner);
    let before = t.ce_stats()?;
    t.br.enter(|| craft::send_raw_ipv6(&packet))??;
    let (n, from) = lan
        .recv_from(&mut buf)
        .context("the crafted datagram at the LAN host")?;
    assert_eq!(&buf[..n], b"behind an encapsulation limit");
    assert_eq!(
        from,
        std::net::SocketAddr::V4(SocketAddrV4::new(INTERNET_HOST, 7))
    );
    let after = t.ce_stats()?;
    assert_eq!(
        stat(&after, "ext_headers_removed") - stat(&before, "ext_headers_removed"),
        1
    );
    Ok(())
}

/// The CE's TCP mapping of `lan_port` toward `remote_port`, as `nat --json` lists it.
fn tcp_mapping(t: &MapeLab, remote_port: u16) -> Result<Option<serde_json::Value>> {
    Ok(t.nat()?.into_iter().find(|m| {
        m["proto"] == "tcp"
            && m["remote"]
                .as_str()
                .is_some_and(|r| r.ends_with(&format!(":{remote_port}")))
    }))
}

/// Issue 21, Done-when 5: a CE SIGKILLed in the middle of a 200 MB TCP transfer from the LAN
/// and started again takes its mappings back from the pinned maps: the transfer completes
/// byte-identical, and `nat --json` lists the same mapping.
#[test]
fn a_ce_killed_mid_transfer_and_restarted_keeps_the_flow_and_its_mapping() -> Result<()> {
    let mut t = MapeLab::start(&RULE_252, &[])?;
    let to = SocketAddr::from((INTERNET_HOST, 5201));
    let (lan, internet) = (t.lan.clone(), t.internet.clone());
    let transfer =
        std::thread::spawn(move || tcp_transfer(&lan, &internet, to, 200 * 1024 * 1024, 21));
    let before = wait_for("the transfer's mapping", Duration::from_secs(10), || {
        tcp_mapping(&t, 5201)
    })?;
    t.kill_and_restart_ce()?;
    let log = t.lab.daemon_log(&t.ce_instance).unwrap_or_default();
    transfer
        .join()
        .map_err(|_| anyhow::anyhow!("transfer thread panicked"))?
        .context("the 200 MB transfer across the CE's restart")?;
    let after = tcp_mapping(&t, 5201)?.context("the mapping after the restart")?;
    for key in ["lan", "external_port", "remote", "kind"] {
        assert_eq!(after[key], before[key], "{key}: {before} then {after}");
    }
    assert!(
        log.contains("took back 1 NAPT mappings from the pinned maps"),
        "the restarted CE's log:\n{log}"
    );
    Ok(())
}

/// Issue 21, Done-when 6: the port log answers "which LAN endpoint used external port P at
/// time T" for a flow the test made, also after the CE was killed and started again.
#[test]
fn the_port_log_names_the_lan_endpoint_of_an_external_port_across_a_restart() -> Result<()> {
    let log_file = std::env::temp_dir().join(format!("tunnel-ports-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&log_file);
    let log_arg = log_file.display().to_string();
    let mut t = MapeLab::start(&RULE_252, &["--port-log", &log_arg, "--udp-timeout", "1s"])?;
    let echo_at = SocketAddrV4::new(INTERNET_HOST, 7);
    let stop = udp_echo(&t.internet, echo_at)?;
    // The internet host sees the external port; the LAN host knows its own.
    let seen = Capture::start(&t.internet, "eth0")?;
    let lan_port = udp_roundtrip(&t.lan, echo_at, b"who am i")?;
    let mid = std::time::SystemTime::now();
    let ext = seen
        .stop()?
        .into_iter()
        .find(|s| s.proto == 17 && s.src == SHARED)
        .and_then(|s| s.port)
        .context("the datagram at the internet host")?;
    // The mapping ends (idle), then the CE is killed and started again.
    wait_for("the mapping to expire", Duration::from_secs(10), || {
        Ok(t.nat()?.is_empty().then_some(()))
    })?;
    t.kill_and_restart_ce()?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let ask = |at: std::time::SystemTime| -> Result<serde_json::Value> {
        let out = t.lab.ctl(&[
            "portlog",
            &log_arg,
            "--port",
            &ext.to_string(),
            "--proto",
            "udp",
            "--at",
            &humantime::format_rfc3339_micros(at).to_string(),
            "--json",
        ])?;
        Ok(serde_json::from_str(&out)?)
    };
    let then = ask(mid)?;
    assert_eq!(
        then[0]["lan"],
        format!("{LAN_HOST}:{lan_port}"),
        "who used {ext} at {mid:?}: {then}"
    );
    assert_eq!(then[0]["remote"], echo_at.to_string(), "{then}");
    assert!(then[0]["end"].is_string(), "it ended (idle): {then}");
    let now = ask(std::time::SystemTime::now())?;
    assert_eq!(now, serde_json::json!([]), "nobody uses {ext} now");
    let _ = std::fs::remove_file(&log_file);
    Ok(())
}

/// Issue 21 (hitless restart): a CE stopped cleanly (its pins go) and started again
/// re-creates its mappings from the state file: a UDP flow goes on with the same external
/// port, and a port forward is a forward still.
#[test]
fn a_ce_stopped_and_started_again_re_creates_its_mappings_from_the_state_file() -> Result<()> {
    let mut t = MapeLab::start(&RULE_252, &[])?;
    let echo_at = SocketAddrV4::new(INTERNET_HOST, 7);
    let stop = udp_echo(&t.internet, echo_at)?;
    let sock = t.lan.enter(|| std::net::UdpSocket::bind("0.0.0.0:0"))??;
    sock.set_read_timeout(Some(Duration::from_secs(3)))?;
    let internet = t.internet.clone();
    let roundtrip = |msg: &[u8]| -> Result<u16> {
        let seen = Capture::start(&internet, "eth0")?;
        sock.send_to(msg, echo_at)?;
        let mut buf = [0u8; 64];
        let (n, _) = sock.recv_from(&mut buf).context("no echo")?;
        anyhow::ensure!(&buf[..n] == msg, "another echo");
        seen.stop()?
            .into_iter()
            .find(|s| s.proto == 17 && s.src == SHARED)
            .and_then(|s| s.port)
            .context("the datagram at the internet host")
    };
    let before = roundtrip(b"before")?;
    let nat_before = t.nat()?;
    let state = t
        .lab
        .dir()
        .join("state")
        .join(format!("{}.nat.json", t.ce_instance));
    wait_for("the state file", Duration::from_secs(5), || {
        let text = std::fs::read_to_string(&state).unwrap_or_default();
        Ok(text
            .contains(&format!("\"external_port\":{before}"))
            .then_some(()))
    })?;
    t.restart_ce(false)?;
    let log = t.lab.daemon_log(&t.ce_instance).unwrap_or_default();
    assert!(log.contains("re-created 1 NAPT mappings saved"), "{log}");
    assert_eq!(
        roundtrip(b"after")?,
        before,
        "the same external port after the restart"
    );
    let strip = |v: Vec<serde_json::Value>| -> Vec<(String, String, String)> {
        v.iter()
            .map(|m| {
                (
                    m["lan"].to_string(),
                    m["external_port"].to_string(),
                    m["remote"].to_string(),
                )
            })
            .collect()
    };
    assert_eq!(strip(t.nat()?), strip(nat_before));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// Issue 21, Done-when 4 (second half): a UDP datagram from the internet to a forwarded
/// port whose LAN service is closed returns the LAN host's ICMP port unreachable, translated
/// (quoted packet included) so that the internet host's socket sees "connection refused".
#[test]
fn a_closed_forwarded_port_answers_port_unreachable_that_the_sender_matches() -> Result<()> {
    let forward = format!("1680={LAN_HOST}:5000/udp");
    let t = MapeLab::start(&RULE_252, &["--forward", &forward])?;
    let sock = t
        .internet
        .enter(|| std::net::UdpSocket::bind("0.0.0.0:0"))??;
    sock.connect(SocketAddrV4::new(SHARED, 1680))?;
    sock.set_read_timeout(Some(Duration::from_secs(3)))?;
    sock.send(b"anyone there?")?;
    let mut buf = [0u8; 64];
    match sock.recv(&mut buf) {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
        other => bail!("expected connection refused (ICMP port unreachable), got {other:?}"),
    }
    let stats = t.ce_stats()?;
    assert_eq!(counter(&stats, "slowpath_out_icmp_errors"), 1, "{stats}");
    Ok(())
}

/// What the internet host sees of one IPv4 packet toward it: source, fragment offset
/// (bytes), more-fragments, and the source port (ICMP echo id) when the transport header is
/// in it.
#[derive(Clone, Debug)]
struct Piece {
    src: std::net::Ipv4Addr,
    dst: std::net::Ipv4Addr,
    offset: u16,
    more: bool,
    port: Option<u16>,
}

fn piece(frame: &[u8]) -> Option<Piece> {
    if frame.len() < 34 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let frags = u16::from_be_bytes([ip[6], ip[7]]);
    let offset = (frags & 0x1fff) * 8;
    let l4 = ip.get(ihl..)?;
    let port = match (offset, ip[9]) {
        (0, 6 | 17) => Some(u16::from_be_bytes([*l4.first()?, *l4.get(1)?])),
        (0, 1) => Some(u16::from_be_bytes([*l4.get(4)?, *l4.get(5)?])),
        _ => None,
    };
    Some(Piece {
        src: std::net::Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        dst: std::net::Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        offset,
        more: frags & 0x2000 != 0,
        port,
    })
}

/// A UDP datagram `src` → `dst` with `payload`, as IPv4 fragments of at most 1,400 bytes of
/// payload each (DF clear, id `id`).
fn udp_fragments(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8], id: u16) -> Vec<Vec<u8>> {
    let mut udp = Vec::new();
    etherparse::PacketBuilder::ipv4(src.ip().octets(), dst.ip().octets(), 64)
        .udp(src.port(), dst.port())
        .write(&mut udp, payload)
        .expect("a UDP packet");
    let l4 = &udp[20..];
    l4.chunks(1400)
        .enumerate()
        .map(|(i, chunk)| {
            let mut h = etherparse::Ipv4Header::new(
                chunk.len() as u16,
                64,
                etherparse::IpNumber::UDP,
                src.ip().octets(),
                dst.ip().octets(),
            )
            .expect("a header");
            h.identification = id;
            h.dont_fragment = false;
            h.more_fragments = (i + 1) * 1400 < l4.len();
            h.fragment_offset = etherparse::IpFragOffset::try_new((i * 1400 / 8) as u16).unwrap();
            h.header_checksum = h.calc_header_checksum();
            let mut out = h.to_bytes().to_vec();
            out.extend_from_slice(chunk);
            out
        })
        .collect()
}

/// Sends whole IPv4 packets (headers included) from a raw socket in `ns`.
fn send_raw_ipv4(ns: &tunnel_tests::Ns, packets: &[Vec<u8>]) -> Result<()> {
    ns.enter(|| -> Result<()> {
        // SAFETY: plain socket(2); closed below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        anyhow::ensure!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        for p in packets {
            let dst = std::net::Ipv4Addr::new(p[16], p[17], p[18], p[19]);
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from(dst).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: valid buffer and address of the sizes given.
            let n = unsafe {
                libc::sendto(
                    fd,
                    p.as_ptr().cast(),
                    p.len(),
                    0,
                    (&sin as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as u32,
                )
            };
            anyhow::ensure!(n >= 0, "sendto: {}", std::io::Error::last_os_error());
        }
        // SAFETY: fd is ours.
        unsafe { libc::close(fd) };
        Ok(())
    })?
}

/// Issue 21, Done-when 1: from the LAN host a 3,000-byte ping and a 4,000-byte UDP datagram
/// with its 4,000-byte echo (fragmented on the internet side, through the BR) arrive whole,
/// also when the LAN host sends the fragments last first; the internet host sees the shared
/// address on every fragment and a port of the set on every first one.
#[test]
fn fragmented_datagrams_cross_the_ce_and_the_br_whole_both_ways() -> Result<()> {
    let t = MapeLab::start(&RULE_252, &[])?;
    let echo_at = SocketAddrV4::new(INTERNET_HOST, 7);
    let stop = udp_echo(&t.internet, echo_at)?;
    let seen = Capture::start_with(&t.internet, "eth0", piece)?;

    let (pings, text) =
        t.lan
            .ping_with(&["-s", "3000", "-M", "dont"], &INTERNET_HOST.to_string(), 3)?;
    assert_eq!(pings, Some(3), "ping -s 3000:\n{text}");

    let sock = t.lan.enter(|| std::net::UdpSocket::bind("0.0.0.0:0"))??;
    sock.set_read_timeout(Some(Duration::from_secs(3)))?;
    let big: Vec<u8> = (0..4000u32).map(|i| (i * 7) as u8).collect();
    let mut buf = vec![0u8; 8192];
    for order in ["in order", "last fragment first"] {
        if order == "in order" {
            sock.send_to(&big, echo_at)?;
        } else {
            let port = sock.local_addr()?.port();
            let mut frags = udp_fragments(SocketAddrV4::new(LAN_HOST, port), echo_at, &big, 0x4242);
            frags.reverse();
            send_raw_ipv4(&t.lan, &frags)?;
        }
        let (n, _) = sock
            .recv_from(&mut buf)
            .with_context(|| format!("no 4,000-byte echo ({order})"))?;
        assert_eq!(n, big.len(), "the echo's length, {order}");
        assert!(buf[..n] == big[..], "the echo's bytes differ, {order}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);

    let toward: Vec<Piece> = seen
        .stop()?
        .into_iter()
        .filter(|p| p.dst == INTERNET_HOST)
        .collect();
    let fragments = toward.iter().filter(|p| p.offset > 0 || p.more).count();
    assert!(
        fragments >= 3 * 3 + 2 * 3,
        "only {fragments} fragments at the internet host"
    );
    for p in &toward {
        assert_eq!(p.src, SHARED, "{p:?}");
        if let Some(port) = p.port {
            assert!(in_set_252(port), "{p:?}");
        }
    }
    let (ce, br) = (t.ce_stats()?, t.br_stats()?);
    assert!(counter(&ce, "fragments_reassembled") >= 3 + 2, "{ce}");
    assert!(
        counter(&br, "fragments_reassembled") >= 2,
        "the echoes came in fragments: {br}"
    );
    // The BR sent the 4,000-byte echoes on in outer IPv6 fragments; the CE put them together.
    assert!(counter(&ce, "outer_fragments_reassembled") >= 2, "{ce}");
    Ok(())
}

/// Issue 21, Done-when 2: two CEs that share one IPv4 address (PSIDs 0xa4 and 0xa5) send
/// fragmented datagrams with the same IPv4 id toward one internet host at the same moment:
/// each CE gives them an id with its own PSID in the top bits, so both reassemble there.
#[test]
fn two_ces_of_one_address_send_fragments_with_one_id_and_both_arrive_whole() -> Result<()> {
    let (t, second) = MapeLab::start_two(&RULE_252, "2001:db8:12:a500::/56")?;
    let echo_at = SocketAddrV4::new(INTERNET_HOST, 7);
    let stop = udp_echo(&t.internet, echo_at)?;
    let hosts = [(&t.lan, 1u8), (&second.lan, 2u8)];
    let mut socks = Vec::new();
    let mut datagrams = Vec::new();
    for (lan, n) in hosts {
        let sock = lan.enter(|| std::net::UdpSocket::bind("0.0.0.0:0"))??;
        sock.set_read_timeout(Some(Duration::from_secs(3)))?;
        let payload: Vec<u8> = (0..4000u32)
            .map(|i| (i as u8) ^ n.wrapping_mul(0x5a))
            .collect();
        let port = sock.local_addr()?.port();
        // The same id from both LAN hosts (and the same LAN address and port would do too).
        datagrams.push(udp_fragments(
            SocketAddrV4::new(LAN_HOST, port),
            echo_at,
            &payload,
            0x4242,
        ));
        socks.push((sock, payload));
    }
    // The first fragment of each, then the rest of each, interleaved.
    let (a, b) = (&datagrams[0], &datagrams[1]);
    for i in 0..a.len() {
        send_raw_ipv4(&t.lan, std::slice::from_ref(&a[i]))?;
        send_raw_ipv4(&second.lan, std::slice::from_ref(&b[i]))?;
    }
    let mut buf = vec![0u8; 8192];
    for (i, (sock, payload)) in socks.iter().enumerate() {
        let (n, _) = sock
            .recv_from(&mut buf)
            .with_context(|| format!("no echo for the datagram of CE {}", i + 1))?;
        assert_eq!(n, payload.len(), "CE {}'s echo length", i + 1);
        assert!(buf[..n] == payload[..], "CE {}'s echo differs", i + 1);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for instance in [&t.ce_instance, &second.instance] {
        let stats = t.lab.ctl_json("stats", instance)?;
        assert!(
            counter(&stats, "ipv4_ids_rewritten") >= 1,
            "{instance}: {stats}"
        );
    }
    Ok(())
}

/// The source address and port the internet host sees for one UDP echo from the LAN.
fn seen_from_lan(t: &MapeLab, msg: &[u8]) -> Result<(std::net::Ipv4Addr, u16)> {
    let echo_at = SocketAddrV4::new(INTERNET_HOST, 7);
    let seen = Capture::start(&t.internet, "eth0")?;
    udp_roundtrip(&t.lan, echo_at, msg)?;
    seen.stop()?
        .into_iter()
        .find(|s| s.proto == 17 && s.port.is_some())
        .map(|s| (s.src, s.port.unwrap_or(0)))
        .context("the datagram at the internet host")
}

/// Issue 21, Done-when 7: `--prefix auto` takes the end-user prefix from the WAN's address;
/// when the line's /64 changes, the CE moves to the new shared address within 5 s, new flows
/// use it, and `mape calc` for the new prefix agrees with the CE's status.
#[test]
fn prefix_auto_follows_the_wans_prefix_to_a_new_shared_address() -> Result<()> {
    let t = MapeLab::start(&tunnel_tests::mape::RULE_252_AUTO, &[])?;
    let status = t.lab.ctl_json("status", &t.ce_instance)?;
    assert_eq!(status["ipv4"], SHARED.to_string(), "{status}");
    let stop = udp_echo(&t.internet, SocketAddrV4::new(INTERNET_HOST, 7))?;
    assert_eq!(seen_from_lan(&t, b"before")?.0, SHARED);

    // The ISP renumbers the line: 2001:db8:12:a400::/64 becomes 2001:db8:13:a400::/64
    // (IPv4 suffix 0x13, the same PSID 0xa4).
    t.ce.ip(&format!(
        "addr del {}/64 dev wan0",
        tunnel_tests::mape::AUTO_WAN_ADDR
    ))?;
    t.ce.ip("addr add 2001:db8:13:a400::1/64 dev wan0 nodad")?;
    let moved = std::time::Instant::now();
    let new_shared = std::net::Ipv4Addr::new(203, 0, 113, 19);
    let status = wait_for("the CE on the new prefix", Duration::from_secs(5), || {
        let s = t.lab.ctl_json("status", &t.ce_instance)?;
        Ok((s["ipv4"] == new_shared.to_string()).then_some(s))
    })?;
    eprintln!("moved to {new_shared} in {:?}", moved.elapsed());
    let (src, port) = seen_from_lan(&t, b"after")?;
    assert_eq!(src, new_shared, "a new flow uses the new address");
    assert!(in_set_252(port), "port {port} of the set");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);

    let calc = t.lab.ctl(&[
        "mape",
        "calc",
        "--rule-ipv6",
        "2001:db8::/40",
        "--rule-ipv4",
        "203.0.113.0/24",
        "--ea-len",
        "16",
        "--psid-offset",
        "6",
        "--prefix",
        "2001:db8:13:a400::/64",
        "--json",
    ])?;
    let calc: serde_json::Value = serde_json::from_str(&calc)?;
    for key in [
        "ipv4",
        "psid",
        "psid_len",
        "psid_offset",
        "port_count",
        "ce_ipv6",
    ] {
        assert_eq!(
            status[key], calc[key],
            "{key}: status {status}, calc {calc}"
        );
    }
    Ok(())
}

/// A PCP MAP request (RFC 6887 §7.1, §11.1) for `internal` port of `proto`, suggesting
/// external port `suggested`, from the LAN host; the response's (result code, lifetime,
/// assigned port, assigned IPv4).
fn pcp_map(
    t: &MapeLab,
    proto: u8,
    internal: u16,
    suggested: u16,
) -> Result<(u8, u32, u16, std::net::Ipv4Addr)> {
    let sock = t.lan.enter(|| std::net::UdpSocket::bind("0.0.0.0:0"))??;
    sock.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut req = vec![2u8, 1, 0, 0];
    req.extend_from_slice(&600u32.to_be_bytes());
    req.extend_from_slice(&LAN_HOST.to_ipv6_mapped().octets());
    req.extend_from_slice(b"a nonce 1234");
    req.extend_from_slice(&[proto, 0, 0, 0]);
    req.extend_from_slice(&internal.to_be_bytes());
    req.extend_from_slice(&suggested.to_be_bytes());
    req.extend_from_slice(&[0u8; 16]);
    sock.send_to(&req, "198.51.100.1:5351")?;
    let mut buf = [0u8; 1100];
    let (n, _) = sock.recv_from(&mut buf).context("no PCP response")?;
    let r = &buf[..n];
    anyhow::ensure!(
        n == 60 && r[0] == 2 && r[1] == 0x81,
        "not a MAP response: {r:?}"
    );
    anyhow::ensure!(&r[24..36] == b"a nonce 1234", "the nonce is not echoed");
    let ext_ip: [u8; 16] = r[44..60].try_into()?;
    let ext_ip = std::net::Ipv6Addr::from(ext_ip)
        .to_ipv4_mapped()
        .context("an IPv4-mapped external address")?;
    Ok((
        r[3],
        u32::from_be_bytes([r[4], r[5], r[6], r[7]]),
        u16::from_be_bytes([r[42], r[43]]),
        ext_ip,
    ))
}

/// Issue 21, Done-when 8: a PCP MAP request from the LAN host gets an external port inside
/// the set, through which the internet host reaches the LAN host's service; a request for a
/// port outside the set is answered with one inside it.
#[test]
fn pcp_map_requests_open_ports_of_the_set_to_lan_services() -> Result<()> {
    let t = MapeLab::start(&RULE_252, &["--pcp"])?;
    let service = t
        .lan
        .enter(|| TcpListener::bind(SocketAddrV4::new(LAN_HOST, 8080)))??;
    let (code, lifetime, port, ip) = pcp_map(&t, 6, 8080, 1680)?;
    assert_eq!(
        (code, lifetime, port, ip),
        (0, 600, 1680, SHARED),
        "the suggested port, in the set"
    );
    let server = std::thread::spawn(move || -> Result<Vec<u8>> {
        let (mut conn, _) = service.accept()?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut got = vec![0u8; 5];
        conn.read_exact(&mut got)?;
        conn.write_all(b"hello from the LAN")?;
        Ok(got)
    });
    let mut conn = t.internet.enter(|| {
        TcpStream::connect_timeout(&SocketAddr::from((SHARED, port)), Duration::from_secs(5))
    })??;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.write_all(b"hello")?;
    let mut answer = vec![0u8; 18];
    conn.read_exact(&mut answer)?;
    assert_eq!(&answer, b"hello from the LAN");
    let got = server
        .join()
        .map_err(|_| anyhow::anyhow!("service panicked"))??;
    assert_eq!(&got, b"hello");

    // Port 80 is not this CE's: the answer is a port of the set instead.
    let (code, _, port, ip) = pcp_map(&t, 17, 9000, 80)?;
    assert_eq!((code, ip), (0, SHARED));
    assert!(port != 80 && in_set_252(port), "assigned {port}");
    let nat = t.nat()?;
    assert!(
        nat.iter().any(|m| m["external_port"] == port
            && m["proto"] == "udp"
            && m["lan"] == format!("{LAN_HOST}:9000")
            && m["kind"] == "pcp"),
        "{nat:?}"
    );

    // NAT-PMP (RFC 6886), the same service: the external address, then a TCP mapping.
    let sock = t.lan.enter(|| std::net::UdpSocket::bind("0.0.0.0:0"))??;
    sock.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut buf = [0u8; 64];
    sock.send_to(&[0, 0], "198.51.100.1:5351")?;
    let (n, _) = sock
        .recv_from(&mut buf)
        .context("no NAT-PMP address answer")?;
    assert_eq!(&buf[..2], &[0, 128]);
    assert_eq!(&buf[8..n], &SHARED.octets(), "the external address");
    sock.send_to(
        &[0, 2, 0, 0, 0x1f, 0x91, 0, 80, 0, 0, 0x02, 0x58],
        "198.51.100.1:5351",
    )?;
    let (n, _) = sock
        .recv_from(&mut buf)
        .context("no NAT-PMP mapping answer")?;
    assert_eq!(
        (n, buf[1], buf[2], buf[3]),
        (16, 130, 0, 0),
        "{:?}",
        &buf[..n]
    );
    let ext = u16::from_be_bytes([buf[10], buf[11]]);
    assert!(ext != 80 && in_set_252(ext), "NAT-PMP assigned {ext}");
    assert_eq!(
        u32::from_be_bytes([buf[12], buf[13], buf[14], buf[15]]),
        600
    );
    Ok(())
}

/// An IPv6 packet on the CE-BR link: (source, next header, payload length).
fn outer(frame: &[u8]) -> Option<(std::net::Ipv6Addr, u8, u16)> {
    if frame.len() < 54 || frame[12..14] != [0x86, 0xdd] {
        return None;
    }
    let src: [u8; 16] = frame[22..38].try_into().ok()?;
    Some((
        src.into(),
        frame[20],
        u16::from_be_bytes([frame[18], frame[19]]),
    ))
}

/// Issue 21, Done-when 3 (first half): a 3,000-byte datagram without DF from the LAN host
/// crosses the CE-BR link (MTU 1500) as fragments of the outer IPv6 packet (RFC 2473 §7),
/// which the BR reassembles, and arrives whole (its echo comes back).
#[test]
fn a_big_datagram_without_df_crosses_the_ce_br_link_in_outer_ipv6_fragments() -> Result<()> {
    let t = MapeLab::start(&RULE_252, &[])?;
    let echo_at = SocketAddrV4::new(INTERNET_HOST, 7);
    let stop = udp_echo(&t.internet, echo_at)?;
    let link = Capture::start_with(&t.br, "ce0", outer)?;
    let sock = t.lan.enter(|| std::net::UdpSocket::bind("0.0.0.0:0"))??;
    sock.set_read_timeout(Some(Duration::from_secs(3)))?;
    let big: Vec<u8> = (0..3000u32).map(|i| (i * 13) as u8).collect();
    sock.send_to(&big, echo_at)?;
    let mut buf = vec![0u8; 8192];
    let (n, _) = sock
        .recv_from(&mut buf)
        .context("no echo of the 3,000-byte datagram")?;
    assert!(
        n == big.len() && buf[..n] == big[..],
        "the echo differs ({n} bytes)"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let ce: std::net::Ipv6Addr = "2001:db8:12:a400:0:cb00:7112:a4".parse()?;
    let frags: Vec<_> = link
        .stop()?
        .into_iter()
        .filter(|(src, next, _)| *src == ce && *next == 44)
        .collect();
    assert!(
        frags.len() >= 3,
        "outer fragments from the CE on the link: {frags:?}"
    );
    assert!(frags.iter().all(|(_, _, len)| *len <= 1460), "{frags:?}");
    let br = t.br_stats()?;
    assert_eq!(counter(&br, "outer_fragments_reassembled"), 1, "{br}");
    assert_eq!(counter(&br, "slowpath_decap_packets"), 1, "{br}");
    Ok(())
}

/// Issue 21 (`--prefix-from IFACE`): with the delegated prefix numbered on the LAN side, the
/// CE takes the prefix from there rather than from the WAN.
#[test]
fn prefix_auto_from_the_lan_side_takes_the_delegated_prefix() -> Result<()> {
    let t = MapeLab::start(
        &tunnel_tests::mape::RULE_252_AUTO,
        &["--prefix-from", "lan0"],
    )?;
    let status = t.lab.ctl_json("status", &t.ce_instance)?;
    // The WAN's 2001:db8:12:a400::/64 would give .18; the LAN's 2001:db8:13:a400::/64 gives .19.
    assert_eq!(status["ipv4"], "203.0.113.19", "{status}");
    let stop = udp_echo(&t.internet, SocketAddrV4::new(INTERNET_HOST, 7))?;
    assert_eq!(
        seen_from_lan(&t, b"hi")?.0,
        std::net::Ipv4Addr::new(203, 0, 113, 19)
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

#[test]
fn with_xdp_the_br_takes_the_plain_case_in_xdp_and_its_checks_still_hold() -> Result<()> {
    let mut t = MapeLab::start(&RULE_252, &[])?;
    let mut args = t.br_args.clone();
    args.push("--xdp".into());
    t.restart_br(args)?;
    // What a NIC gives XDP, the lab's veths must too: the internet side takes redirected
    // frames only with GRO on, and frames from the CE come with complete checksums.
    t.internet.run(&["ethtool", "-K", "eth0", "gro", "on"])?;
    t.ce.run(&["ethtool", "-K", "wan0", "tx", "off"])?;
    let xdp_attached =
        |t: &MapeLab| -> Result<bool> { Ok(t.br.ip("-d link show ce0")?.contains("prog/xdp")) };
    assert!(xdp_attached(&t)?, "no XDP program on ce0");

    // The LAN host's TCP through the CE's NAPT: its data packets are the plain case.
    let before = t.br_stats()?;
    tcp_transfer(
        &t.lan,
        &t.internet,
        SocketAddr::from((INTERNET_HOST, 5001)),
        10 << 20,
        9,
    )?;
    let after = t.br_stats()?;
    let moved = |name: &str| stat(&after, name) - stat(&before, name);
    let (xdp, decap) = (
        moved("fastpath_xdp_decap_packets"),
        moved("mape_br_decap_packets"),
    );
    eprintln!("--xdp: {xdp} of {decap} decapsulated packets went through XDP");
    assert!(
        xdp * 10 >= decap * 9 && xdp > 1000,
        "XDP took {xdp} of {decap}"
    );

    // What the rule does not allow still goes to the TC program, which drops and counts it;
    // the legitimate datagram goes through XDP.
    let delta = br_rule_checks(&t)?;
    assert_eq!(delta("fastpath_xdp_decap_packets"), 1);
    assert_eq!(delta("mape_br_decap_packets"), 1);

    // Without --xdp the XDP link goes, and the TC program alone forwards.
    let mut args = t.br_args.clone();
    args.retain(|a| a != "--xdp");
    t.restart_br(args)?;
    assert!(!xdp_attached(&t)?, "the XDP program stayed on ce0");
    let delta = br_rule_checks(&t)?;
    assert_eq!(delta("fastpath_xdp_decap_packets"), 0);
    assert_eq!(delta("mape_br_decap_packets"), 1);
    Ok(())
}
