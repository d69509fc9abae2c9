//! Native mode (SPEC §5.2, issue "native fast path"): 105/106, eBPF encapsulation on both
//! ends, anti-spoofing, hitless server restart, bindings that follow the lease table, and
//! TCP that fits the tunnel without fragments.
use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV6, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use etherparse::PacketBuilder;
use tunnel_tests::{
    Ns, counter,
    fourover6::{FourOverSix, INTERNET_HOST, TUNNEL_ADDR, server_args},
    snmp_sum,
    transfer::tcp_transfer,
    wait_for,
};

/// A native-capable server with the test pool, plus `extra` flags.
fn start(extra: &[&str]) -> Result<FourOverSix> {
    FourOverSix::start_native(&server_args(extra))
}

fn stat(t: &FourOverSix, name: &str) -> Result<u64> {
    Ok(counter(&t.server_stats()?, name))
}

/// Sum of the server counters that mean "this packet went through the TUN".
fn tun_seen(stats: &serde_json::Value) -> u64 {
    [
        "inband_packets_to_tun",
        "inband_packets_from_tun",
        "slowpath_native_packets",
        "slowpath_icmp_frag_needed",
        "slowpath_fragmented",
        "drop_no_lease_for_destination",
    ]
    .iter()
    .map(|c| counter(stats, c))
    .sum()
}

fn bindings(t: &FourOverSix) -> Result<(u64, u64)> {
    let status = t.lab.ctl_json("status", &t.server_instance)?;
    let n = &status["native"];
    Ok((
        n["bindings_v4"]
            .as_u64()
            .ok_or_else(|| anyhow!("{status}"))?,
        n["bindings_v6"]
            .as_u64()
            .ok_or_else(|| anyhow!("{status}"))?,
    ))
}

#[test]
fn native_client_pings_and_streams_200mb_on_the_fast_path() -> Result<()> {
    let mut t = start(&[])?;
    let ns = t.client_ns()?;
    let (client, addr) = t.start_native_client(&ns, &[])?;
    let leases = t.leases()?;
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0]["mode"], "native", "{leases:?}");
    assert_eq!(leases[0]["ipv4"], addr);
    let status = t.lab.ctl_json("status", &client)?;
    assert_eq!(
        status["native"]["configured"]["inner_mtu"], 1460,
        "{status}"
    );
    assert_eq!(
        status["native"]["configured"]["server_tunnel"], TUNNEL_ADDR,
        "{status}"
    );

    assert_eq!(ns.ping(INTERNET_HOST, 3)?, 3, "pings over the native path");

    let before = t.server_stats()?;
    let len = 200 << 20;
    let started = Instant::now();
    tcp_transfer(&ns, &t.internet, "192.0.2.2:9100".parse()?, len, 42)?;
    let took = started.elapsed();
    let after = t.server_stats()?;
    let d = |name: &str| counter(&after, name) - counter(&before, name);
    let decap = d("fastpath_decap_packets");
    let encap = d("fastpath_encap_packets");
    let tun = tun_seen(&after) - tun_seen(&before);
    // Every data segment carries at most inner MTU − 40 bytes of payload.
    let min_segments = (len / 1420) as u64;
    assert!(
        decap as f64 >= 0.99 * min_segments as f64,
        "decapsulated {decap} packets, the stream has at least {min_segments}"
    );
    assert!(encap > 0, "ACKs come back through the fast path");
    assert!(
        (tun as f64) < 0.01 * (decap + encap) as f64,
        "{tun} packets on the TUN vs {} on the fast path",
        decap + encap
    );
    eprintln!("200 MB in {took:?}: {decap} decapsulated, {encap} encapsulated, {tun} on the TUN");
    let client_stats = t.lab.ctl_json("stats", &client)?;
    assert!(
        counter(&client_stats, "client_encap_packets") >= decap,
        "{client_stats}"
    );
    Ok(())
}

#[test]
fn inband_and_native_clients_work_at_the_same_time() -> Result<()> {
    let mut t = start(&[])?;
    let native_ns = t.client_ns()?;
    let inband_ns = t.client_ns()?;
    let (_, native_addr) = t.start_native_client(&native_ns, &[])?;
    let (_, inband_addr) = t.start_client(&inband_ns, &[])?;
    assert_ne!(native_addr, inband_addr);
    let modes: Vec<(String, String)> = t
        .leases()?
        .iter()
        .map(|l| {
            (
                l["ipv4"].as_str().unwrap_or("").into(),
                l["mode"].as_str().unwrap_or("").into(),
            )
        })
        .collect();
    assert!(
        modes.contains(&(native_addr.clone(), "native".into())),
        "{modes:?}"
    );
    assert!(
        modes.contains(&(inband_addr.clone(), "inband".into())),
        "{modes:?}"
    );

    // Both transfer at once.
    let internet = t.internet.clone();
    std::thread::scope(|s| -> Result<()> {
        let a = s.spawn(|| {
            tcp_transfer(
                &native_ns,
                &internet,
                "192.0.2.2:9201".parse()?,
                20 << 20,
                1,
            )
        });
        let b = s.spawn(|| {
            tcp_transfer(
                &inband_ns,
                &internet,
                "192.0.2.2:9202".parse()?,
                20 << 20,
                2,
            )
        });
        a.join()
            .map_err(|_| anyhow!("native transfer panicked"))?
            .context("native client")?;
        b.join()
            .map_err(|_| anyhow!("in-band transfer panicked"))?
            .context("in-band client")?;
        Ok(())
    })?;
    assert_eq!(native_ns.ping(INTERNET_HOST, 2)?, 2);
    assert_eq!(inband_ns.ping(INTERNET_HOST, 2)?, 2);
    // And they reach each other (native → TUN → in-band; in-band → TUN → raw IPv4-in-IPv6).
    assert_eq!(native_ns.ping(&inband_addr, 2)?, 2, "native → in-band");
    assert_eq!(inband_ns.ping(&native_addr, 2)?, 2, "in-band → native");
    let stats = t.server_stats()?;
    assert!(counter(&stats, "fastpath_decap_packets") > 5_000, "{stats}");
    assert!(counter(&stats, "inband_packets_to_tun") > 5_000, "{stats}");
    assert!(counter(&stats, "slowpath_native_packets") >= 2, "{stats}");
    Ok(())
}

/// A raw IPv6 socket for next header 4 in the current namespace, bound to `src`.
fn raw_ipip(src: Ipv6Addr) -> Result<OwnedFd> {
    // SAFETY: socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_IPIP) };
    if fd < 0 {
        bail!("raw socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fresh fd.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let addr = nix::sys::socket::SockaddrIn6::from(SocketAddrV6::new(src, 0, 0, 0));
    nix::sys::socket::bind(fd.as_raw_fd(), &addr)?;
    Ok(fd)
}

fn send_ipip(fd: &OwnedFd, inner: &[u8]) -> Result<()> {
    let dst = nix::sys::socket::SockaddrIn6::from(SocketAddrV6::new(TUNNEL_ADDR.parse()?, 0, 0, 0));
    nix::sys::socket::sendto(
        fd.as_raw_fd(),
        inner,
        &dst,
        nix::sys::socket::MsgFlags::empty(),
    )?;
    Ok(())
}

fn udp4(src: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv4(src.octets(), [192, 0, 2, 2], 64)
        .udp(5555, 9300)
        .write(&mut out, payload)
        .unwrap();
    out
}

/// A native client in `t` plus a second, unbound address on its link: (namespace, lease,
/// the client's bound tunnel address, the stranger address).
struct Offenders {
    ns: Ns,
    lease: Ipv4Addr,
    bound: Ipv6Addr,
    stranger: Ipv6Addr,
}

fn offenders(t: &mut FourOverSix) -> Result<Offenders> {
    let ns = t.client_ns()?;
    let (_, addr) = t.start_native_client(&ns, &[])?;
    ns.ip("addr add 2001:db8:1::99/64 dev v6 nodad")?;
    Ok(Offenders {
        ns,
        lease: addr.parse()?,
        bound: "2001:db8:1::2".parse()?,
        stranger: "2001:db8:1::99".parse()?,
    })
}

#[test]
fn crafted_tunnel_packets_never_reach_the_internet_and_are_counted_per_reason() -> Result<()> {
    // -v: debug lines are shown, but the eBPF programs log only with -vv.
    let mut t = start(&["-v"])?;
    let Offenders {
        ns,
        lease,
        bound,
        stranger,
    } = offenders(&mut t)?;
    let addr = lease.to_string();

    let sink = t.internet.enter(|| UdpSocket::bind("192.0.2.2:9300"))??;
    sink.set_read_timeout(Some(Duration::from_secs(5)))?;
    let before = t.server_stats()?;
    let mut ipv6_inner = Vec::new();
    PacketBuilder::ipv6(
        bound.octets(),
        [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7],
        64,
    )
    .udp(1, 2)
    .write(&mut ipv6_inner, b"v6 inside")?;
    ns.enter(|| -> Result<()> {
        let from_stranger = raw_ipip(stranger)?;
        let from_client = raw_ipip(bound)?;
        send_ipip(&from_stranger, &udp4(lease, b"unbound outer source"))?;
        send_ipip(
            &from_client,
            &udp4("198.51.100.77".parse()?, b"inner source not the lease"),
        )?;
        send_ipip(&from_client, &ipv6_inner)?;
        // The control: the same path, everything right. It arrives after the others would.
        send_ipip(&from_client, &udp4(lease, b"legitimate"))?;
        Ok(())
    })??;
    let mut buf = [0u8; 2048];
    let (n, from) = sink
        .recv_from(&mut buf)
        .context("the legitimate packet did not arrive")?;
    assert_eq!(
        &buf[..n],
        b"legitimate",
        "first datagram to reach the internet host"
    );
    assert_eq!(from.ip().to_string(), addr);
    let after = t.server_stats()?;
    for reason in [
        "drop_unbound_source",
        "drop_inner_source_not_lease",
        "drop_inner_not_ipv4",
    ] {
        assert_eq!(
            counter(&after, reason) - counter(&before, reason),
            1,
            "{reason}: {after}"
        );
    }
    assert_eq!(
        counter(&after, "policy_icmp_sent"),
        0,
        "no ICMPv6 policy errors unless --policy-icmp"
    );
    let log = t.lab.daemon_log(&t.server_instance).unwrap_or_default();
    assert!(
        !log.contains("dropped ("),
        "with -v (not -vv) the eBPF programs log nothing:\n{log}"
    );
    Ok(())
}

#[test]
fn with_vv_the_fast_path_logs_each_crafted_drop_with_its_reason_and_addresses() -> Result<()> {
    let mut t = start(&["-vv"])?;
    let Offenders {
        ns,
        lease,
        bound,
        stranger,
    } = offenders(&mut t)?;
    let spoofed: Ipv4Addr = "198.51.100.77".parse()?;
    ns.enter(|| -> Result<()> {
        send_ipip(&raw_ipip(stranger)?, &udp4(lease, b"unbound outer source"))?;
        send_ipip(
            &raw_ipip(bound)?,
            &udp4(spoofed, b"inner source not the lease"),
        )
    })??;
    let want = [
        format!("dropped (drop_unbound_source): from {stranger}, inner {lease} -> 192.0.2.2"),
        format!(
            "dropped (drop_inner_source_not_lease): from {bound}, inner {spoofed} -> 192.0.2.2"
        ),
    ];
    let lines = wait_for("the eBPF log lines", Duration::from_secs(10), || {
        let log = t.lab.daemon_log(&t.server_instance).unwrap_or_default();
        let found: Option<Vec<String>> = want
            .iter()
            .map(|w| {
                log.lines()
                    .find(|l| l.contains(w.as_str()))
                    .map(str::to_owned)
            })
            .collect();
        Ok(found)
    })
    .map_err(|e| {
        let log = t.lab.daemon_log(&t.server_instance).unwrap_or_default();
        let ebpf: Vec<&str> = log.lines().filter(|l| l.contains(" ebpf")).collect();
        anyhow!("{e}; want {want:#?}; the server's eBPF lines: {ebpf:#?}")
    })?;
    for line in &lines {
        assert!(
            line.contains("DEBUG") && line.contains("ebpf") && line.contains("server_decap"),
            "a debug record under the target ebpf, naming the program: {line}"
        );
    }
    Ok(())
}

/// ICMPv6 type 1 code 5 messages that reach `sock` within `wait`: (destination of the quoted
/// packet's source, i.e. who was told, the sender of the error).
fn policy_errors(sock: &socket2::Socket, wait: Duration) -> Result<Vec<(Ipv6Addr, Ipv6Addr)>> {
    let deadline = Instant::now() + wait;
    let mut got = Vec::new();
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break;
            }
            Err(e) => return Err(e.into()),
        };
        // SAFETY: recv_from initialised the first n bytes.
        let msg: Vec<u8> = buf[..n]
            .iter()
            .map(|b| unsafe { b.assume_init() })
            .collect();
        if n >= 8 + 40 && msg[0] == 1 && msg[1] == 5 {
            let quoted_src = Ipv6Addr::from(<[u8; 16]>::try_from(&msg[16..32])?);
            let sender = from
                .as_socket_ipv6()
                .map(|a| *a.ip())
                .ok_or_else(|| anyhow!("not from IPv6"))?;
            got.push((quoted_src, sender));
        }
    }
    Ok(got)
}

#[test]
fn source_policy_drops_are_answered_with_rate_limited_icmpv6_when_asked() -> Result<()> {
    let mut t = start(&["--policy-icmp", "5"])?;
    let Offenders {
        ns,
        lease,
        bound,
        stranger,
    } = offenders(&mut t)?;
    let tunnel: Ipv6Addr = TUNNEL_ADDR.parse()?;
    let before = t.server_stats()?;
    let (first, flood, flood_secs) = ns.enter(|| -> Result<_> {
        use socket2::{Domain, Protocol, Socket, Type};
        let icmp = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))?;
        let from_stranger = raw_ipip(stranger)?;
        let from_client = raw_ipip(bound)?;
        send_ipip(&from_stranger, &udp4(lease, b"unbound outer source"))?;
        let mut first = policy_errors(&icmp, Duration::from_secs(2))?;
        std::thread::sleep(Duration::from_millis(300)); // past the per-CPU spacing (200 ms)
        send_ipip(
            &from_client,
            &udp4("198.51.100.77".parse()?, b"not the lease"),
        )?;
        first.extend(policy_errors(&icmp, Duration::from_secs(2))?);
        // A flood: 200 bad packets as fast as they go.
        let started = Instant::now();
        for _ in 0..200 {
            send_ipip(&from_stranger, &udp4(lease, b"flood"))?;
        }
        let took = started.elapsed().as_secs_f64();
        let flood = policy_errors(&icmp, Duration::from_secs(2))?;
        Ok((first, flood, took))
    })??;
    assert_eq!(
        first,
        vec![(stranger, tunnel), (bound, tunnel)],
        "one error per offender, from the tunnel address, quoting the offending packet"
    );
    let bound_answers = 5.0 + 5.0 * flood_secs + 2.0;
    eprintln!(
        "--policy-icmp 5: {} ICMPv6 errors for 200 bad packets sent in {flood_secs:.2} s",
        flood.len()
    );
    assert!(
        !flood.is_empty() && (flood.len() as f64) <= bound_answers,
        "{} answers to 200 bad packets in {flood_secs:.1} s (at most {bound_answers:.0} allowed)",
        flood.len()
    );
    let after = t.server_stats()?;
    let d = |name: &str| counter(&after, name) - counter(&before, name);
    assert_eq!(d("drop_unbound_source"), 201, "{after}");
    assert_eq!(d("policy_icmp_sent"), 2 + flood.len() as u64, "{after}");
    Ok(())
}

#[test]
fn server_sigkill_and_restart_keep_native_forwarding_and_leases() -> Result<()> {
    let mut t = start(&[])?;
    let ns = t.client_ns()?;
    let (client, addr) = t.start_native_client(&ns, &[])?;
    let leases_before = t.leases()?;

    // 500 pings 10 ms apart (5 s); the server is killed and restarted in the middle.
    let ping = ns.ping_every_10ms(INTERNET_HOST, 500)?;
    // Kill only once the pings flow: an answer encapsulated back to the client by the fast path.
    let encap_before = stat(&t, "fastpath_encap_packets")?;
    wait_for("the first ping answer", Duration::from_secs(10), || {
        Ok((stat(&t, "fastpath_encap_packets")? > encap_before).then_some(()))
    })?;
    // A SIGKILL within ~100 ms of the 106 would find the lease saved as in-band (the known
    // limit of the delayed save): kill once the file has it as native.
    t.wait_saved(&[(addr.as_str(), "native")])?;
    let instance = t.server_instance.clone();
    t.lab.daemon(&instance).expect("server").kill();
    t.start_server()?;
    let out = ping.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let received = tunnel_tests::ping_received(&out.stdout)?;
    eprintln!("{received}/500 pings answered around the server's SIGKILL and restart");

    assert!(
        received >= 495,
        "{received}/500 pings answered around the restart:\n{text}"
    );

    // Same leases (address, client, mode, since), and the client has its address.
    let strip = |v: &[serde_json::Value]| -> Vec<(String, String, String, String)> {
        v.iter()
            .map(|l| {
                (
                    l["ipv4"].to_string(),
                    l["client"].to_string(),
                    l["mode"].to_string(),
                    l["since"].to_string(),
                )
            })
            .collect()
    };
    assert_eq!(strip(&t.leases()?), strip(&leases_before));
    let again = t.wait_connected(&client, Duration::from_secs(15))?;
    assert_eq!(again, addr);
    wait_for(
        "the lease to be held by the new session",
        Duration::from_secs(10),
        || {
            Ok(t.leases()?
                .first()
                .is_some_and(|l| !l["session"].is_null())
                .then_some(()))
        },
    )?;
    assert_eq!(strip(&t.leases()?), strip(&leases_before));
    assert_eq!(ns.ping(INTERNET_HOST, 2)?, 2);
    Ok(())
}

#[test]
fn bindings_follow_the_clients_and_are_gone_when_they_leave() -> Result<()> {
    let mut t = start(&["--keepalive", "1s", "--timeout", "3s"])?;
    let a_ns = t.client_ns()?;
    let b_ns = t.client_ns()?;
    let (a, a_addr) = t.start_native_client(&a_ns, &["--keepalive", "1s", "--timeout", "3s"])?;
    let (b, b_addr) = t.start_native_client(&b_ns, &["--keepalive", "1s", "--timeout", "3s"])?;
    assert_eq!(bindings(&t)?, (2, 2));
    assert_eq!(
        t.internet.ping(&a_addr, 1)?,
        1,
        "the internet reaches a native client"
    );

    // One disconnects cleanly, the other goes silent and times out.
    t.lab.daemon(&a).expect("client a").stop();
    t.lab.daemon(&b).expect("client b").signal(libc::SIGSTOP);
    wait_for("every binding to go", Duration::from_secs(15), || {
        Ok((bindings(&t)? == (0, 0)).then_some(()))
    })?;
    assert!(t.leases()?.is_empty());

    let encap = stat(&t, "fastpath_encap_packets")?;
    let no_lease = stat(&t, "drop_no_lease_for_destination")?;
    assert_eq!(t.internet.ping(&a_addr, 1)?, 0);
    assert_eq!(t.internet.ping(&b_addr, 1)?, 0);
    assert_eq!(
        stat(&t, "fastpath_encap_packets")?,
        encap,
        "nothing encapsulated any more"
    );
    assert!(stat(&t, "drop_no_lease_for_destination")? >= no_lease + 2);
    t.lab.daemon(&b).expect("client b").signal(libc::SIGCONT);
    Ok(())
}

#[test]
fn tcp_over_1500_byte_links_needs_no_fragments_and_no_icmp() -> Result<()> {
    let mut t = start(&[])?;
    let ns = t.client_ns()?;
    t.start_native_client(&ns, &[])?;
    let watched = [&ns, &t.server, &t.internet];
    let frag = |n: &Ns| snmp_sum(n, "Ip", &["FragCreates", "FragOKs", "ReasmReqds"]);
    let icmp = |n: &Ns| snmp_sum(n, "Icmp", &["InDestUnreachs", "OutDestUnreachs"]);
    let before: Vec<(u64, u64)> = watched
        .iter()
        .map(|n| Ok((frag(n)?, icmp(n)?)))
        .collect::<Result<_>>()?;

    // Both directions, and the MSS each end uses.
    let listener = t
        .internet
        .enter(|| std::net::TcpListener::bind("192.0.2.2:9400"))??;
    let server = std::thread::spawn(move || -> Result<u32> {
        use std::io::{Read as _, Write as _};
        let (mut conn, _) = listener.accept()?;
        conn.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mss = nix::sys::socket::getsockopt(&conn, nix::sys::socket::sockopt::TcpMaxSeg)?;
        let mut got = vec![0u8; 8 << 20];
        conn.read_exact(&mut got)?;
        conn.write_all(&got)?;
        Ok(mss)
    });
    let mut conn = ns.enter(|| std::net::TcpStream::connect("192.0.2.2:9400"))??;
    conn.set_read_timeout(Some(Duration::from_secs(20)))?;
    let client_mss = nix::sys::socket::getsockopt(&conn, nix::sys::socket::sockopt::TcpMaxSeg)?;
    let data: Vec<u8> = (0..8u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    {
        use std::io::{Read as _, Write as _};
        let writer = conn.try_clone()?;
        let sent = data.clone();
        let w = std::thread::spawn(move || -> std::io::Result<()> { (&writer).write_all(&sent) });
        let mut back = vec![0u8; data.len()];
        conn.read_exact(&mut back)?;
        w.join().map_err(|_| anyhow!("writer panicked"))??;
        assert!(back == data, "echoed bytes differ");
    }
    let server_mss = server.join().map_err(|_| anyhow!("server panicked"))??;
    assert!(
        server_mss <= 1420,
        "the internet host sends segments of {server_mss} bytes"
    );
    assert!(
        client_mss <= 1420,
        "the client sends segments of {client_mss} bytes"
    );
    for (n, (f0, i0)) in watched.iter().zip(before) {
        assert_eq!(frag(n)? - f0, 0, "IPv4 fragments in {}", n.name);
        assert_eq!(icmp(n)? - i0, 0, "ICMP unreachable in {}", n.name);
    }
    Ok(())
}

#[test]
fn a_pinned_map_with_another_layout_is_replaced_not_trusted() -> Result<()> {
    use aya::maps::MapInfo;
    use tunnel_common::{fastpath::Binding6, names};

    let mut t = start(&[])?;
    let ns = t.client_ns()?;
    let (client, addr) = t.start_native_client(&ns, &[])?;
    t.wait_saved(&[(addr.as_str(), "native")])?;
    let instance = t.server_instance.clone();
    t.lab.daemon(&instance).expect("server").kill();
    // What an older version might have left: BIND_BY_V4 with another key and value size
    // (here the NAT table's map, moved into its place).
    let dir = std::path::Path::new(tunnel_ctl::instance::PIN_ROOT).join(&instance);
    let pin = dir.join(names::BIND_BY_V4);
    std::fs::remove_file(&pin)?;
    std::fs::rename(dir.join(names::NAT_IN), &pin)?;
    let foreign = MapInfo::from_pin(&pin)?;
    assert_ne!(
        foreign.key_size(),
        4,
        "the stand-in must have another layout"
    );

    t.start_server()?;
    let log = t.lab.daemon_log(&instance).unwrap_or_default();
    assert!(
        log.contains("replacing pinned map") && log.contains(names::BIND_BY_V4),
        "{log}"
    );
    assert_eq!(
        log.matches("replacing pinned map").count(),
        1,
        "only the foreign map is replaced; the others match:\n{log}"
    );
    let info = MapInfo::from_pin(&pin)?;
    assert_eq!(info.key_size(), 4);
    assert_eq!(info.value_size() as usize, std::mem::size_of::<Binding6>());
    assert_ne!(info.id(), foreign.id(), "the foreign map is still pinned");
    // The binding is rebuilt from the saved lease: the internet reaches the client on the
    // fast path again.
    assert_eq!(t.wait_connected(&client, Duration::from_secs(15))?, addr);
    let encap = stat(&t, "fastpath_encap_packets")?;
    assert_eq!(t.internet.ping(&addr, 2)?, 2);
    assert!(stat(&t, "fastpath_encap_packets")? >= encap + 2);
    Ok(())
}

/// Issue 18 item 1: a server restarted without native mode must not leave the earlier run's
/// fast path forwarding, and a re-leased address must reach its new holder.
#[test]
fn a_restart_without_native_mode_removes_the_fast_path_and_the_address_reaches_its_new_holder()
-> Result<()> {
    use tunnel_common::names::{PROG_SERVER_DECAP, PROG_SERVER_ENCAP};
    use tunnel_ctl::dataplane::tc::link_pin_name;

    // One address, a 1 s hold, short timeout: the address is free soon after its client is gone.
    let mut t = FourOverSix::start_native(&[
        "--pool",
        "198.51.100.50",
        "--gateway",
        "198.51.100.1",
        "--dns",
        "192.0.2.53",
        "--hold",
        "1s",
        "--keepalive",
        "1s",
        "--timeout",
        "3s",
    ])?;
    let old_ns = t.client_ns()?;
    let (old, addr) = t.start_native_client(&old_ns, &[])?;
    assert_eq!(addr, "198.51.100.50");
    assert_eq!(
        old_ns.ping(INTERNET_HOST, 2)?,
        2,
        "the fast path works first"
    );
    t.wait_saved(&[(addr.as_str(), "native")])?;

    // Both die without clean-up, the server first (so that its binding of the old client
    // stays in the pinned maps); the old client's encapsulation stays pinned in its namespace.
    let instance = t.server_instance.clone();
    t.lab.daemon(&instance).expect("server").kill();
    t.lab.daemon(&old).expect("client").kill();
    let dir = std::path::Path::new(tunnel_ctl::instance::PIN_ROOT).join(&instance);
    for (program, dev) in [(PROG_SERVER_DECAP, "up6"), (PROG_SERVER_ENCAP, "inet0")] {
        let pin = dir.join(link_pin_name(program, dev));
        assert!(pin.exists(), "SIGKILL left no {}", pin.display());
    }

    // Same instance and state directory, without the three native flags.
    let at = t
        .server_args
        .iter()
        .position(|a| a == "--v6-dev")
        .expect("native flags");
    t.server_args.drain(at..at + 6);
    assert!(!t.server_args.iter().any(|a| a == "--tunnel-addr"));
    t.start_server()?;
    let log = t.lab.daemon_log(&instance).unwrap_or_default();
    assert!(
        log.contains("without native mode") && log.contains(&dir.display().to_string()),
        "no log line names the removed fast path:\n{log}"
    );
    let left: Vec<_> = match std::fs::read_dir(&dir) {
        Ok(entries) => entries
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    assert!(left.is_empty(), "pins left in {}: {left:?}", dir.display());

    // The old client's packets are no longer forwarded.
    assert_eq!(
        old_ns.ping(INTERNET_HOST, 2)?,
        0,
        "the old client still gets through"
    );

    // Its restored lease runs out (3 s); an in-band client then gets the address, and the
    // internet's traffic for it reaches the new holder, not the old one.
    let new_ns = t.client_ns()?;
    let (_, again) = t.start_client(&new_ns, &[])?;
    assert_eq!(again, addr);
    assert_eq!(new_ns.ping(INTERNET_HOST, 3)?, 3, "the new holder's pings");
    assert_eq!(
        t.internet.ping(&addr, 3)?,
        3,
        "the internet reaches the new holder"
    );
    Ok(())
}

/// Issue 18 item 2 at the server's tunnel address: IPv4-in-IPv6 from a bound client behind
/// a Tunnel Encapsulation Limit or Hop-by-Hop options reaches the internet host byte for
/// byte; outer fragments and a chain of five Destination Options are dropped and counted.
#[test]
fn the_server_decapsulates_behind_options_and_counts_what_it_cannot_take() -> Result<()> {
    use tunnel_tests::craft::{self, Ext};
    let mut t = start(&[])?;
    let Offenders {
        ns, lease, bound, ..
    } = offenders(&mut t)?;
    let tunnel: Ipv6Addr = TUNNEL_ADDR.parse()?;
    let sink = t
        .internet
        .enter(|| std::net::UdpSocket::bind("192.0.2.2:9300"))??;
    sink.set_read_timeout(Some(Duration::from_secs(5)))?;
    let frag = |offset: u16, more: bool| Ext::Fragment {
        offset,
        more,
        id: 0x5eed,
    };
    let fragmented = udp4(lease, b"in two outer fragments, never reassembled");
    let packets = [
        craft::ipv6(
            bound,
            tunnel,
            &[Ext::EncapLimit],
            craft::IPIP,
            &udp4(lease, b"behind an encapsulation limit"),
        ),
        craft::ipv6(
            bound,
            tunnel,
            &[Ext::HopByHop],
            craft::IPIP,
            &udp4(lease, b"behind hop-by-hop options"),
        ),
        craft::ipv6(
            bound,
            tunnel,
            &[frag(0, true)],
            craft::IPIP,
            &fragmented[..32],
        ),
        craft::ipv6(
            bound,
            tunnel,
            &[frag(4, false)],
            craft::IPIP,
            &fragmented[32..],
        ),
        craft::ipv6(
            bound,
            tunnel,
            &[Ext::DestOpts; 5],
            craft::IPIP,
            &udp4(lease, b"too many headers"),
        ),
    ];
    let before = t.server_stats()?;
    ns.enter(|| -> Result<()> {
        for p in &packets {
            craft::send_raw_ipv6(p)?;
        }
        Ok(())
    })??;
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    for _ in 0..2 {
        let (n, from) = sink
            .recv_from(&mut buf)
            .context("a decapsulated datagram")?;
        assert_eq!(from.ip(), std::net::IpAddr::V4(lease));
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    got.sort();
    assert_eq!(
        got,
        ["behind an encapsulation limit", "behind hop-by-hop options"]
    );
    let want = [
        ("fastpath_decap_packets", 2),
        ("ext_headers_removed", 2),
        ("drop_outer_fragment", 2),
        ("drop_ext_headers_too_many", 1),
    ];
    tunnel_tests::wait_counter_deltas(
        "the server to count every crafted packet",
        Duration::from_secs(10),
        &before,
        &want,
        || t.server_stats(),
    )?;
    // Nothing else got through.
    sink.set_read_timeout(Some(Duration::from_millis(500)))?;
    assert!(
        sink.recv_from(&mut buf).is_err(),
        "a third datagram arrived"
    );
    Ok(())
}

/// Issue 19 Done-when 4: the fast path follows the server's IPv4 next hop as it changes
/// under traffic. A native client pings every 10 ms while the internet host's MAC changes
/// (the server learns it, as from a gratuitous ARP), then the route to the pinged address
/// moves to a second link: at most 3 pings are lost per change and none after the last.
#[test]
fn the_fast_path_follows_next_hop_changes_under_traffic() -> Result<()> {
    const PINGS: u32 = 600;
    let mut t = start(&[])?;
    let ns = t.client_ns()?;
    t.start_native_client(&ns, &[])?;
    // The pinged address sits behind the internet host, first via inet0 ...
    t.internet.ip("addr add 192.0.2.200/32 dev lo")?;
    t.server
        .ip("route add 192.0.2.200/32 via 192.0.2.2 dev inet0")?;
    // ... and a second link to move it to (outside the pool's .2-.100).
    t.lab.veth(&t.server, "inet1", &t.internet, "eth1")?;
    t.server.ip("addr add 198.51.100.241/30 dev inet1")?;
    t.internet.ip("addr add 198.51.100.242/30 dev eth1")?;
    assert_eq!(
        ns.ping("192.0.2.200", 3)?,
        3,
        "the path works before any change"
    );

    let ping = ns
        .command("ping")
        .args([
            "-n",
            "-i",
            "0.01",
            "-c",
            &PINGS.to_string(),
            "-W",
            "1",
            "192.0.2.200",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let encap = |t: &FourOverSix| stat(t, "fastpath_encap_packets");
    // Each change happens once the fast path has carried 100 more answers.
    let mut mark = encap(&t)?;
    let mut settle = |t: &FourOverSix| -> Result<()> {
        let from = mark;
        wait_for(
            "100 answers on the fast path",
            Duration::from_secs(10),
            || Ok((encap(t)? >= from + 100).then_some(())),
        )?;
        mark = encap(t)?;
        Ok(())
    };
    settle(&t)?;
    let new_mac = "02:00:00:00:99:02";
    t.internet.ip(&format!("link set eth0 address {new_mac}"))?;
    t.server.ip(&format!(
        "neigh replace 192.0.2.2 lladdr {new_mac} dev inet0 nud reachable"
    ))?;
    settle(&t)?;
    t.server
        .ip("route replace 192.0.2.200/32 via 198.51.100.242 dev inet1")?;
    settle(&t)?;
    let out = ping.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let answered: std::collections::BTreeSet<u32> = text
        .lines()
        .filter_map(|l| l.split("icmp_seq=").nth(1)?.split(' ').next()?.parse().ok())
        .collect();
    let lost: Vec<u32> = (1..=PINGS).filter(|s| !answered.contains(s)).collect();
    eprintln!(
        "next-hop changes: {} of {PINGS} pings lost: {lost:?}",
        lost.len()
    );
    assert!(lost.len() <= 6, "more than 3 lost per change: {lost:?}");
    let last = *answered.last().unwrap_or(&0);
    assert!(
        lost.iter().all(|s| *s + 100 < last),
        "pings lost after the changes settled: {lost:?}"
    );
    // The moved route really carried the end: the second link sent the last 100 or more.
    let link: serde_json::Value = serde_json::from_str(&t.server.ip("-s -j link show inet1")?)?;
    let sent = link[0]["stats64"]["tx"]["packets"].as_u64().unwrap_or(0);
    assert!(sent >= 100, "inet1 sent {sent} packets: {link}");
    Ok(())
}

/// Issue 19: `--max-bindings` sizes the binding maps. With room for one, the first native
/// client is bound and a second's 105 is refused with 110 saying the fast path is full; an
/// in-band lease for it is still granted.
#[test]
fn max_bindings_sizes_the_fast_path_and_refuses_beyond_it() -> Result<()> {
    use aya::maps::MapInfo;
    use tunnel_common::names;
    let mut t = start(&["--max-bindings", "1"])?;
    let dir = std::path::Path::new(tunnel_ctl::instance::PIN_ROOT).join(&t.server_instance);
    let entries = |dir: &std::path::Path, map: &str| -> Result<u32> {
        Ok(MapInfo::from_pin(dir.join(map))?.max_entries())
    };
    for map in [names::BIND_BY_V4, names::BIND_BY_V6] {
        assert_eq!(entries(&dir, map)?, 1, "{map}");
    }
    // The NAPT maps are not the server's: one entry each.
    for map in tunnel_ctl::dataplane::NAT_MAPS {
        assert_eq!(entries(&dir, map)?, 1, "server {map}");
    }
    let first = t.client_ns()?;
    let (client, _) = t.start_native_client(&first, &[])?;
    assert_eq!(first.ping(INTERNET_HOST, 2)?, 2);
    // A native client holds the server's maps with one entry each (tens of MB otherwise),
    // and keeps its lwB4's NAPT maps at full size.
    let client_dir = std::path::Path::new(tunnel_ctl::instance::PIN_ROOT).join(&client);
    for map in tunnel_ctl::dataplane::SERVER_MAPS {
        assert_eq!(entries(&client_dir, map)?, 1, "client {map}");
    }
    for map in tunnel_ctl::dataplane::NAT_MAPS {
        assert!(entries(&client_dir, map)? > 1, "client {map}");
    }
    let second = t.client_ns()?;
    let mut peer = tunnel_tests::fourover6::RawPeer::connect(&second)?;
    let lease = peer.lease()?;
    assert!(lease.starts_with("198.51.100."), "{lease}");
    peer.send(105, &[])?;
    let (kind, text) = peer.recv_skip_keepalive()?;
    let text = String::from_utf8_lossy(&text);
    assert_eq!(kind, 110, "{text}");
    assert!(
        text.contains("fast path is full") && text.contains("--max-bindings"),
        "{text}"
    );
    assert_eq!(
        first.ping(INTERNET_HOST, 2)?,
        2,
        "the bound client is not affected"
    );
    Ok(())
}

/// Replies of `ping -D` output: (icmp_seq, unix time in seconds) per answered ping.
fn ping_replies(text: &str) -> Vec<(u32, f64)> {
    text.lines()
        .filter_map(|l| {
            let time = l.strip_prefix('[')?.split(']').next()?.parse().ok()?;
            let seq = l.split("icmp_seq=").nth(1)?.split_whitespace().next()?;
            Some((seq.parse().ok()?, time))
        })
        .collect()
}

fn now_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn tx_packets(ns: &tunnel_tests::Ns, dev: &str) -> Result<u64> {
    let json: serde_json::Value =
        serde_json::from_str(&ns.ip(&format!("-j -s link show dev {dev}"))?)?;
    json[0]["stats64"]["tx"]["packets"]
        .as_u64()
        .ok_or_else(|| anyhow!("no tx packets for {dev}: {json}"))
}

#[test]
fn a_next_hop_change_under_a_native_ping_loses_at_most_3_pings_and_none_after() -> Result<()> {
    const PINGS: u32 = 400; // 4 s at 10 ms
    let mut t = start(&[])?;
    let ns = t.client_ns()?;
    let (_, _addr) = t.start_native_client(&ns, &[])?;
    assert_eq!(ns.ping(INTERNET_HOST, 2)?, 2, "pings before the changes");
    // A second way to the internet host: inet1 (203.0.113.0/24), unused until the route moves.
    t.lab.veth(&t.server, "inet1", &t.internet, "eth1")?;
    t.server.ip("addr add 203.0.113.1/24 dev inet1")?;
    t.internet.ip("addr add 203.0.113.2/24 dev eth1")?;
    // The internet host answers by its usual route (eth0), so it must accept what arrives on
    // eth1 for its eth0 address.
    for key in ["all", "eth1"] {
        t.internet
            .sysctl(&format!("net.ipv4.conf.{key}.rp_filter"), "0")?;
    }
    let before = t.server_stats()?;

    let count = PINGS.to_string();
    let ping = ns
        .command("ping")
        .args([
            "-n",
            "-D",
            "-i",
            "0.01",
            "-W",
            "1",
            "-c",
            &count,
            INTERNET_HOST,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_secs(1));
    // 1. The neighbour gets a new MAC (a replaced NIC, a VRRP failover): the host's interface
    //    changes and the server learns the new address (as from a gratuitous ARP).
    let mac_change = now_s();
    t.internet.ip("link set eth0 address 02:00:00:00:99:01")?;
    t.server
        .ip("neigh replace 192.0.2.2 lladdr 02:00:00:00:99:01 dev inet0 nud reachable")?;
    std::thread::sleep(Duration::from_secs(1));
    // 2. A new route: the host is now reached through inet1.
    let via_inet1_before = tx_packets(&t.server, "inet1")?;
    let route_change = now_s();
    t.server
        .ip("route replace 192.0.2.2/32 via 203.0.113.2 dev inet1")?;
    let out = ping.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let via_inet1 = tx_packets(&t.server, "inet1")? - via_inet1_before;

    let replies = ping_replies(&text);
    let answered: std::collections::BTreeSet<u32> = replies.iter().map(|r| r.0).collect();
    let lost: Vec<u32> = (1..=PINGS).filter(|s| !answered.contains(s)).collect();
    // When a lost ping was sent: between the replies around it.
    let sent_at = |seq: u32| {
        replies
            .iter()
            .filter(|r| r.0 < seq)
            .map(|r| r.1)
            .next_back()
            .unwrap_or(0.0)
    };
    let near = |seq: u32, change: f64| (sent_at(seq) - change).abs() < 0.5;
    let lost_at_mac: Vec<u32> = lost
        .iter()
        .copied()
        .filter(|&s| near(s, mac_change))
        .collect();
    let lost_at_route: Vec<u32> = lost
        .iter()
        .copied()
        .filter(|&s| near(s, route_change))
        .collect();
    eprintln!(
        "{} of {PINGS} answered; lost around the MAC change {lost_at_mac:?}, around the route \
         change {lost_at_route:?}, all lost {lost:?}; {via_inet1} packets left by inet1",
        answered.len()
    );
    assert!(
        lost_at_mac.len() <= 3,
        "the MAC change lost {lost_at_mac:?}"
    );
    assert!(
        lost_at_route.len() <= 3,
        "the route change lost {lost_at_route:?}"
    );
    assert_eq!(
        lost.len(),
        lost_at_mac.len() + lost_at_route.len(),
        "pings lost away from either change: {lost:?}\n{text}"
    );
    // The route change took: what the fast path forwarded after it left by inet1.
    assert!(
        via_inet1 >= 100,
        "only {via_inet1} packets left by inet1 after the route change"
    );
    let after = t.server_stats()?;
    let redirected = counter(&after, "fastpath_decap_redirected")
        - counter(&before, "fastpath_decap_redirected");
    assert!(
        redirected + 6 >= u64::from(PINGS),
        "the pings were not on the fast path: {redirected} redirected of {PINGS}"
    );
    // The next-hop cache did the forwarding, and both changes retired it: the pings (and
    // their replies) asked the FIB only in the moments after each change.
    let moved = |name: &str| counter(&after, name) - counter(&before, name);
    let (misses, retired, resolved) = (
        moved("nexthop_cache_misses"),
        moved("nexthop_invalidations"),
        moved("nexthop_resolved"),
    );
    eprintln!(
        "next-hop cache: {misses} packets asked the FIB, retired {retired} times, {resolved} \
         resolutions"
    );
    let log = t.lab.daemon_log(&t.server_instance).unwrap_or_default();
    assert!(
        retired >= 2 && resolved >= 2,
        "the changes did not retire the cache ({retired}) and fill it again ({resolved}); \
         server log:\n{log}"
    );
    assert!(
        misses <= 40,
        "{misses} of {} packets asked the FIB: the cache did not answer",
        2 * PINGS
    );
    Ok(())
}

#[test]
fn with_xdp_the_plain_case_is_decapsulated_in_xdp_and_a_restart_without_it_detaches_it()
-> Result<()> {
    let mut t = start(&["--xdp"])?;
    // What a NIC gives XDP, the lab's veths must too: a veth takes XDP-redirected frames only
    // with its peer's NAPI on (GRO, or an XDP program there), and frames arrive with their
    // checksums complete (off the wire), not partial as a local stack hands them over a veth
    // (XDP cannot complete those): the core computes them.
    t.internet.run(&["ethtool", "-K", "eth0", "gro", "on"])?;
    t.core.run(&["ethtool", "-K", "srv", "tx", "off"])?;
    let ns = t.client_ns()?;
    let (_, _addr) = t.start_native_client(&ns, &[])?;
    let xdp_attached = |t: &FourOverSix| -> Result<bool> {
        Ok(t.server.ip("-d link show up6")?.contains("prog/xdp"))
    };
    assert!(xdp_attached(&t)?, "no XDP program on up6");

    // Pings and a TCP transfer (its data: plain packets; its SYN: the TC program's, which
    // clamps the MSS) go through, the XDP program taking the plain ones.
    let before = t.server_stats()?;
    assert_eq!(ns.ping(INTERNET_HOST, 20)?, 20, "pings with --xdp");
    tcp_transfer(&ns, &t.internet, "192.0.2.2:9101".parse()?, 20 << 20, 7)?;
    let after = t.server_stats()?;
    let moved = |name: &str| counter(&after, name) - counter(&before, name);
    let (xdp, decap) = (
        moved("fastpath_xdp_decap_packets"),
        moved("fastpath_decap_packets"),
    );
    eprintln!("--xdp: {xdp} of {decap} decapsulated packets went through XDP");
    assert!(xdp >= 20, "the pings did not go through XDP ({xdp})");
    assert!(
        xdp * 10 >= decap * 9,
        "XDP took only {xdp} of {decap} decapsulated packets"
    );

    // Without --xdp the XDP link goes (with its pin), and the TC program alone forwards.
    let instance = t.server_instance.clone();
    t.lab.daemon(&instance).expect("server").kill();
    t.server_args.retain(|a| a != "--xdp");
    t.start_server()?;
    assert!(!xdp_attached(&t)?, "the XDP program stayed on up6");
    let before = t.server_stats()?;
    let answered = (0..20)
        .map(|_| ns.ping(INTERNET_HOST, 1))
        .collect::<Result<Vec<_>>>()?;
    let after = t.server_stats()?;
    assert!(
        answered.iter().sum::<u32>() >= 18,
        "pings after the restart: {answered:?}"
    );
    assert_eq!(
        counter(&after, "fastpath_xdp_decap_packets"),
        counter(&before, "fastpath_xdp_decap_packets")
    );
    assert!(
        counter(&after, "fastpath_decap_redirected")
            > counter(&before, "fastpath_decap_redirected")
    );
    Ok(())
}

#[test]
fn a_client_whose_link_carries_less_than_the_servers_uses_its_own_inner_mtu() -> Result<()> {
    let mut t = start(&[])?;
    // The server's side of the IPv6 network takes 1540-byte packets: restarted, it announces
    // an inner MTU of 1500.
    t.server.ip("link set dev up6 mtu 1540")?;
    t.core.ip("link set dev srv mtu 1540")?;
    let instance = t.server_instance.clone();
    t.lab.daemon(&instance).expect("server").kill();
    t.start_server()?;

    // A client on a 1540-byte link takes the announcement: full-size IPv4 with DF gets through.
    let big = t.client_ns()?;
    big.ip("link set dev v6 mtu 1540")?;
    t.core.ip("link set dev c1 mtu 1540")?;
    let (big_client, _) = t.start_native_client(&big, &[])?;
    assert_eq!(client_inner_mtu(&t, &big_client)?, 1500);
    let (replies, out) = big.ping_with(&["-M", "do", "-s", "1472"], INTERNET_HOST, 3)?;
    assert_eq!(
        replies,
        Some(3),
        "1500-byte DF pings over 1540-byte links:\n{out}"
    );

    // One on a 1500-byte link keeps to 1460: what fits goes through, a bigger DF packet is
    // refused at the sender (not lost on the way), and TCP streams.
    let small = t.client_ns()?;
    let (small_client, _) = t.start_native_client(&small, &[])?;
    assert_eq!(client_inner_mtu(&t, &small_client)?, 1460);
    let (replies, out) = small.ping_with(&["-M", "do", "-s", "1432"], INTERNET_HOST, 3)?;
    assert_eq!(replies, Some(3), "1460-byte DF pings:\n{out}");
    let (replies, out) = small.ping_with(&["-M", "do", "-s", "1472"], INTERNET_HOST, 1)?;
    assert!(
        replies.unwrap_or(0) == 0 && out.contains("mtu=1460"),
        "a 1500-byte DF ping should be refused locally with the route's MTU:\n{out}"
    );
    tcp_transfer(&small, &t.internet, "192.0.2.2:9101".parse()?, 4 << 20, 7)?;
    Ok(())
}

/// The inner MTU a native client's status reports.
fn client_inner_mtu(t: &FourOverSix, client: &str) -> Result<serde_json::Value> {
    let status = t.lab.ctl_json("status", client)?;
    Ok(status["native"]["configured"]["inner_mtu"].clone())
}
