//! The 4over6 concentrator and client over the in-band path (issue: control protocol).
//! Topology and addresses: `tunnel_tests::fourover6`.
use std::{
    io::Write as _,
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use etherparse::{Icmpv4Type, PacketBuilder, SlicedPacket, TransportSlice};
use tunnel_tests::{
    counter,
    fourover6::{FourOverSix, INTERNET_HOST, RawPeer},
    transfer::tcp_transfer,
    wait_for,
};

const POOL: &str = "198.51.100.2-198.51.100.128";

fn server_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--pool",
        POOL,
        "--gateway",
        "198.51.100.1",
        "--dns",
        "192.0.2.53,192.0.2.54",
    ];
    args.extend_from_slice(extra);
    args
}

fn echo_request(src: Ipv4Addr, dst: Ipv4Addr, id: u16) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv4(src.octets(), dst.octets(), 64)
        .icmpv4_echo_request(id, 1)
        .write(&mut out, b"4over6 raw peer")
        .unwrap();
    out
}

#[test]
fn two_clients_get_distinct_leases_ping_and_transfer_20mb() -> Result<()> {
    let mut t = FourOverSix::start(&server_args(&[]))?;
    let mut addrs = Vec::new();
    let mut namespaces = Vec::new();
    for _ in 0..2 {
        let ns = t.client_ns()?;
        let (_, addr) = t.start_client(&ns, &[])?;
        addrs.push(addr.parse::<Ipv4Addr>()?);
        namespaces.push(ns);
    }
    assert_ne!(addrs[0], addrs[1], "leases must differ");
    for a in &addrs {
        assert_eq!(
            a.octets()[..3],
            [198, 51, 100],
            "{a} not from 198.51.100.0/24"
        );
    }
    for (i, ns) in namespaces.iter().enumerate() {
        // The client namespaces have no IPv4 of their own: only the tunnel carries this.
        assert_eq!(ns.ping(INTERNET_HOST, 3)?, 3, "pings from client {i}");
        let to: SocketAddr = format!("{INTERNET_HOST}:{}", 9000 + i).parse()?;
        tcp_transfer(ns, &t.internet, to, 20 << 20, 7 + i as u64)
            .with_context(|| format!("20 MB transfer from client {i}"))?;
    }
    let leases = t.leases()?;
    assert_eq!(leases.len(), 2);
    let stats = t.server_stats()?;
    assert!(counter(&stats, "inband_packets_to_tun") > 10_000, "{stats}");
    Ok(())
}

#[test]
fn raw_peer_from_spec_bytes_gets_lease_and_echo_reply() -> Result<()> {
    let mut t = FourOverSix::start(&server_args(&[]))?;
    let ns = t.client_ns()?;
    let mut peer = RawPeer::connect(&ns)?;
    let text = peer.lease()?;
    let fields: Vec<&str> = text.split(' ').collect();
    assert_eq!(
        fields.len(),
        5,
        "101 text {text:?} must be 5 space-separated fields"
    );
    assert!(
        fields
            .iter()
            .all(|f| !f.is_empty() && !f.contains(char::is_whitespace)),
        "{text:?}"
    );
    assert_eq!(fields[1], "0.0.0.0", "{text:?}");
    assert!(!text.ends_with(' ') && !text.contains('\0'), "{text:?}");
    let lease: Ipv4Addr = fields[0].parse()?;
    assert_eq!(&fields[2..], &["192.0.2.53", "192.0.2.54", "192.0.2.54"]);

    // Header-only frames are five bytes on the wire: check what we send is accepted as such,
    // and that a second 100 gives the same address.
    let again = peer.lease()?;
    assert_eq!(again, text, "a repeated 100 must return the same lease");

    peer.send(102, &echo_request(lease, INTERNET_HOST.parse()?, 0x4242))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        ensure!(
            Instant::now() < deadline,
            "no echo reply in a 103 within 5 s"
        );
        let (kind, data) = peer.recv_skip_keepalive()?;
        if kind != 103 {
            bail!("expected 103, got {kind}");
        }
        let pkt = SlicedPacket::from_ip(&data)?;
        if let Some(TransportSlice::Icmpv4(icmp)) = pkt.transport
            && let Icmpv4Type::EchoReply(echo) = icmp.icmp_type()
        {
            assert_eq!(echo.id, 0x4242);
            break;
        }
    }
    let leases = t.leases()?;
    assert_eq!(leases.len(), 1, "one lease for one connection: {leases:?}");
    // SPEC §10 shapes: leases --json is a list of {ipv4, client, mode, since (RFC 3339)}.
    let l = &leases[0];
    assert_eq!(l["ipv4"], lease.to_string());
    assert_eq!(l["client"], "2001:db8:1::2");
    assert_eq!(l["mode"], "inband");
    let since = l["since"].as_str().expect("since is a string");
    humantime::parse_rfc3339(since).with_context(|| format!("since {since:?} is not RFC 3339"))?;
    // stats --json is an object of counter name -> integer.
    let stats = t.server_stats()?;
    let map = stats.as_object().expect("stats is an object");
    assert!(map.values().all(serde_json::Value::is_u64), "{stats}");
    assert!(counter(&stats, "leases_granted") >= 1);
    Ok(())
}

#[test]
fn fourth_client_of_a_three_address_pool_gets_110_and_the_others_keep_working() -> Result<()> {
    let mut t = FourOverSix::start(&[
        "--pool",
        "198.51.100.2-198.51.100.4",
        "--gateway",
        "198.51.100.1",
        "--dns",
        "192.0.2.53",
    ])?;
    let mut clients = Vec::new();
    for _ in 0..3 {
        let ns = t.client_ns()?;
        t.start_client(&ns, &[])?;
        clients.push(ns);
    }
    let ns = t.client_ns()?;
    let mut peer = RawPeer::connect(&ns)?;
    peer.send(100, &[])?;
    let (kind, data) = peer.recv_skip_keepalive()?;
    let text = String::from_utf8_lossy(&data);
    assert_eq!(kind, 110, "4th client got type {kind}: {text}");
    assert!(text.contains("pool exhausted"), "{text}");
    assert!(
        text.contains("198.51.100.2-198.51.100.4"),
        "110 must name the pool: {text}"
    );
    assert!(
        peer.closed_within(Duration::from_secs(5))?,
        "server must close after 110"
    );
    for ns in &clients {
        assert_eq!(ns.ping(INTERNET_HOST, 2)?, 2);
    }
    assert_eq!(counter(&t.server_stats()?, "pool_exhausted"), 1);
    Ok(())
}

#[test]
fn keepalive_timeout_sticky_reconnect() -> Result<()> {
    let timers = ["--keepalive", "1s", "--timeout", "3s"];
    let mut t = FourOverSix::start(&server_args(&timers))?;

    // 104s keep coming: four of them, each within RawPeer's 10 s read limit, which the
    // default 20 s interval would miss (their spacing is the session machine's to test, with
    // a clock it is given, not a timing assertion here).
    let ns = t.client_ns()?;
    let mut peer = RawPeer::connect(&ns)?;
    peer.lease()?;
    let mut keepalives = 0;
    for _ in 0..8 {
        peer.send(104, &[])?; // stay alive ourselves
        let (kind, _) = peer.recv()?;
        if kind == 104 {
            keepalives += 1;
            if keepalives == 4 {
                break;
            }
        }
    }
    assert_eq!(keepalives, 4, "the server's keepalives stopped");
    drop(peer);

    // A frozen client loses its lease within 5 s, and the address can be leased again.
    let cns = t.client_ns()?;
    let (instance, addr) = t.start_client(&cns, &timers)?;
    let pid = t.lab.spawn_daemon_pid(&instance).expect("client daemon");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
    wait_for(
        "the frozen client's lease to go (3 s timeout)",
        Duration::from_secs(10),
        || {
            let leases = t.leases()?;
            Ok((!leases.iter().any(|l| l["ipv4"] == addr.as_str())).then_some(()))
        },
    )?;
    unsafe { libc::kill(pid as i32, libc::SIGCONT) };
    // The client notices its dead session and comes back with the same (held) address.
    wait_for(
        "the thawed client to reconnect with its address",
        Duration::from_secs(15),
        || {
            let s = t.lab.ctl_json("status", &instance)?;
            let leases = t.leases()?;
            Ok(
                (s["state"] == "connected" && leases.iter().any(|l| l["ipv4"] == addr.as_str()))
                    .then_some(()),
            )
        },
    )?;

    // A frozen server: the client times out, reconnects after the server resumes, same address.
    let before = t.lab.ctl_json("stats", &instance)?;
    let server_pid = t
        .lab
        .spawn_daemon_pid(&t.server_instance.clone())
        .expect("server");
    unsafe { libc::kill(server_pid as i32, libc::SIGSTOP) };
    // The client notices the silence (its 3 s timeout) and leaves `connected`.
    let noticed = wait_for(
        "the client to give up on the frozen server",
        Duration::from_secs(15),
        || {
            let status = t.lab.ctl_json("status", &instance)?;
            Ok((status["state"] != "connected").then_some(()))
        },
    );
    unsafe { libc::kill(server_pid as i32, libc::SIGCONT) };
    noticed?;
    wait_for(
        "the client to reconnect after the server resumed",
        Duration::from_secs(20),
        || {
            let s = t.lab.ctl_json("stats", &instance)?;
            let status = t.lab.ctl_json("status", &instance)?;
            Ok((counter(&s, "leases") > counter(&before, "leases")
                && status["state"] == "connected")
                .then(|| status["ipv4"].as_str().unwrap_or_default().to_owned()))
        },
    )
    .map(|ip| assert_eq!(ip, addr, "the client must get its address back"))?;
    assert_eq!(cns.ping(INTERNET_HOST, 2)?, 2);
    Ok(())
}

#[test]
fn bad_input_ends_only_its_own_session_while_a_transfer_runs() -> Result<()> {
    let mut t = FourOverSix::start(&server_args(&["--keepalive", "1s", "--timeout", "3s"]))?;
    let healthy = t.client_ns()?;
    t.start_client(&healthy, &["--keepalive", "1s", "--timeout", "3s"])?;
    let internet = t.internet.clone();
    let healthy2 = healthy.clone();
    let transfer = std::thread::spawn(move || {
        tcp_transfer(
            &healthy2,
            &internet,
            "192.0.2.2:9100".parse().unwrap(),
            20 << 20,
            99,
        )
    });

    let bad = t.client_ns()?;
    // length < 5, length > 4101, unknown type: the server closes each connection.
    for (name, bytes) in [
        ("length 4", vec![4u8, 0, 0, 0, 100]),
        ("length 4102", vec![0x06, 0x10, 0, 0, 102]),
        ("type 99", vec![5u8, 0, 0, 0, 99]),
    ] {
        let mut p = RawPeer::connect(&bad)?;
        p.stream.write_all(&bytes)?;
        assert!(
            p.closed_within(Duration::from_secs(5))?,
            "{name}: connection not closed"
        );
    }
    // 102 before any 100: dropped, session stays.
    let mut p = RawPeer::connect(&bad)?;
    p.send(
        102,
        &echo_request("198.51.100.77".parse()?, INTERNET_HOST.parse()?, 1),
    )?;
    // 102 whose inner source is not the lease: dropped.
    let text = p.lease()?;
    let lease: Ipv4Addr = text.split(' ').next().unwrap().parse()?;
    let spoofed: Ipv4Addr = if lease == "198.51.100.100".parse::<Ipv4Addr>()? {
        "198.51.100.101".parse()?
    } else {
        "198.51.100.100".parse()?
    };
    p.send(102, &echo_request(spoofed, INTERNET_HOST.parse()?, 2))?;
    // A frame cut off mid-way, then silence: closed by the timeout.
    let mut cut = RawPeer::connect(&bad)?;
    cut.stream.write_all(&[50, 0, 0, 0, 102, 1, 2, 3])?;
    assert!(
        cut.closed_within(Duration::from_secs(6))?,
        "cut-off frame: not closed by timeout"
    );

    transfer
        .join()
        .map_err(|_| anyhow::anyhow!("transfer thread panicked"))?
        .context("the healthy client's transfer")?;

    let stats = t.server_stats()?;
    for name in [
        "protocol_error_frame_too_short",
        "protocol_error_frame_too_long",
        "protocol_error_unknown_type",
        "drop_data_before_lease",
        "drop_spoofed_source",
        "sessions_timed_out",
    ] {
        assert!(counter(&stats, name) >= 1, "{name} not counted: {stats}");
    }
    // Logged with the peer address (the bad namespace's IPv6).
    let log = t
        .lab
        .daemon_log(&t.server_instance.clone())
        .unwrap_or_default();
    for needle in [
        "frame length 4 is below",
        "exceeds the maximum",
        "unknown message type 99",
        "before any lease",
        "is not the lease",
        "timeout",
    ] {
        assert!(
            log.lines()
                .any(|l| l.contains(needle) && l.contains("2001:db8:")),
            "no log line with {needle:?} and the peer address:\n{log}"
        );
    }
    Ok(())
}

#[test]
fn allow_list_and_session_limit_refuse_with_110() -> Result<()> {
    let mut t = FourOverSix::start(&server_args(&[
        "--allow",
        "2001:db8:1::/64",
        "--max-sessions",
        "2",
    ]))?;
    let allowed = t.client_ns()?;
    let outside = t.client_ns()?; // 2001:db8:2::2

    let mut refused = RawPeer::connect(&outside)?;
    let (kind, data) = refused.recv_skip_keepalive()?;
    let text = String::from_utf8_lossy(&data);
    assert_eq!(kind, 110, "{text}");
    assert!(
        text.contains("not allowed") && text.contains("2001:db8:2::2"),
        "{text}"
    );
    assert!(refused.closed_within(Duration::from_secs(5))?);
    assert!(
        t.leases()?.is_empty(),
        "a refused client must never get an address"
    );

    let mut first = RawPeer::connect(&allowed)?;
    first.lease()?;
    // A full round trip, so this session is admitted before the next connection is accepted.
    let mut second = RawPeer::connect(&allowed)?;
    second.lease()?;
    let mut third = RawPeer::connect(&allowed)?;
    let (kind, data) = third.recv_skip_keepalive()?;
    let text = String::from_utf8_lossy(&data);
    assert_eq!(kind, 110, "{text}");
    assert!(text.contains("server full"), "{text}");
    // The admitted sessions are untouched.
    let again = first.lease()?;
    assert!(again.starts_with("198.51.100."), "{again}");
    let stats = t.server_stats()?;
    assert_eq!(counter(&stats, "sessions_refused_not_allowed"), 1);
    assert_eq!(counter(&stats, "sessions_refused_full"), 1);
    Ok(())
}

/// Issue 18 item 5: a lease file the server cannot use (another version's, after a rollback)
/// is kept under a new name that the log gives, never overwritten; a state directory that
/// cannot be written stops the start with exit 1.
#[test]
fn a_foreign_lease_file_is_kept_and_an_unwritable_state_dir_stops_the_start() -> Result<()> {
    let mut t = FourOverSix::start(&server_args(&[]))?;
    let instance = t.server_instance.clone();
    assert_eq!(t.lab.daemon(&instance).expect("server").stop(), Some(0));
    let state_dir = t.lab.dir().join("state");
    let file = state_dir.join(format!("{instance}.leases.json"));
    let newer = r#"{"version":2,"leases":[{"ipv4":"198.51.100.9","psid":3}]}"#;
    std::fs::write(&file, newer)?;

    t.start_server()?;
    let log = t.lab.daemon_log(&instance).unwrap_or_default();
    let kept: Vec<_> = std::fs::read_dir(&state_dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().contains(".unreadable-"))
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(
        std::fs::read_to_string(&kept[0])?,
        newer,
        "kept byte for byte"
    );
    assert!(
        log.contains(&kept[0].display().to_string()) && log.contains("format version 2"),
        "the log does not name the kept file:\n{log}"
    );
    // The server runs: a client gets a lease, which lands in a fresh version-1 file.
    let ns = t.client_ns()?;
    RawPeer::connect(&ns)?.lease()?;
    wait_for("the new lease file", Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        Ok(text.contains("\"version\": 1").then_some(()))
    })?;
    assert_eq!(std::fs::read_to_string(&kept[0])?, newer);

    // A state directory that cannot be created (its parent is a file): exit 1, one clear line.
    let blocker = t.lab.dir().join("not-a-dir");
    std::fs::write(&blocker, "")?;
    let bad_dir = blocker.join("state");
    let other = t.lab.instance("badstate");
    let mut argv = vec![
        tunnel_tests::tunnel_ctl_bin()?.display().to_string(),
        "server".into(),
        "--instance".into(),
        other,
        "--listen".into(),
        "[2001:db8:100::1]:5679".into(),
        "--tun".into(),
        "tnlbad0".into(),
        "--state-dir".into(),
        bad_dir.display().to_string(),
    ];
    argv.extend(server_args(&[]).iter().map(|s| s.to_string()));
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let out = t.server.output(&argv)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&bad_dir.display().to_string()) && stderr.contains("--state-dir"),
        "{stderr}"
    );
    Ok(())
}

/// Issue 18 item 6, in a running server: a CIDR pool leases its hosts only (.201 and .202 of
/// a /30), `--max-sessions 0` is no limit, and SIGHUP reloads (here the same flags: nothing
/// changes, and the server goes on serving and still stops cleanly on SIGTERM).
#[test]
fn cidr_pools_skip_network_and_broadcast_zero_is_no_limit_and_sighup_reloads() -> Result<()> {
    let mut t = FourOverSix::start(&[
        "--pool",
        "198.51.100.200/30",
        "--gateway",
        "198.51.100.1",
        "--dns",
        "192.0.2.53",
        "--max-sessions",
        "0",
    ])?;
    let ns = t.client_ns()?;
    let mut held = Vec::new();
    let mut got = Vec::new();
    for _ in 0..2 {
        let mut peer = RawPeer::connect(&ns)?;
        got.push(
            peer.lease()?
                .split(' ')
                .next()
                .unwrap_or_default()
                .to_owned(),
        );
        held.push(peer);
    }
    got.sort();
    assert_eq!(got, ["198.51.100.201", "198.51.100.202"]);
    let mut third = RawPeer::connect(&ns)?;
    third.send(100, &[])?;
    let (kind, text) = third.recv_skip_keepalive()?;
    assert_eq!(kind, 110, "{}", String::from_utf8_lossy(&text));

    let instance = t.server_instance.clone();
    t.lab
        .daemon(&instance)
        .expect("server")
        .signal(libc::SIGHUP);
    wait_for(
        "the SIGHUP reload's log line",
        Duration::from_secs(10),
        || {
            let log = t.lab.daemon_log(&instance).unwrap_or_default();
            Ok((log.contains("SIGHUP: reloading the configuration")
                && log.contains("reload: nothing changed"))
            .then_some(()))
        },
    )?;
    // The two sessions end; their addresses are free once the server has seen both go (a
    // connect before that would find the pool still full).
    let before = t.lab.ctl_json("stats", &instance)?;
    drop(held);
    wait_for("both sessions closed", Duration::from_secs(10), || {
        let now = t.lab.ctl_json("stats", &instance)?;
        Ok(
            (counter(&now, "sessions_closed") >= counter(&before, "sessions_closed") + 2)
                .then_some(()),
        )
    })?;
    let mut after = RawPeer::connect(&ns)?;
    assert!(
        after.lease()?.starts_with("198.51.100.20"),
        "serving after SIGHUP"
    );
    drop(after);
    let daemon = t.lab.daemon(&instance).expect("server");
    assert_eq!(daemon.stop(), Some(0), "SIGTERM after SIGHUP: a clean exit");
    assert!(
        !std::path::Path::new(&format!("/run/tunnel/{instance}.sock")).exists(),
        "socket left behind"
    );
    Ok(())
}

/// Issue 18 item 6: a TUN device that cannot be created says why (here: the name belongs to
/// an interface that is not a TUN device), not a blanket "needs root".
#[test]
fn a_tun_error_says_what_failed() -> Result<()> {
    let mut t = FourOverSix::start(&server_args(&[]))?;
    let instance = t.lab.instance("badtun");
    let state = t.lab.dir().join("badtun-state");
    let bin = tunnel_tests::tunnel_ctl_bin()?.display().to_string();
    let state = state.display().to_string();
    // `up6` is a veth of the server's namespace.
    let mut argv = vec![
        bin.as_str(),
        "server",
        "--instance",
        &instance,
        "--listen",
        "[2001:db8:100::1]:5679",
        "--tun",
        "up6",
        "--state-dir",
        &state,
    ];
    argv.extend(server_args(&[]));
    let out = t.server.output(&argv)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("creating TUN device up6") && stderr.contains("not a TUN device"),
        "{stderr}"
    );
    assert!(!stderr.contains("needs root"), "{stderr}");
    Ok(())
}

/// A download the client cannot keep up with must not hold back what the client sends (its
/// TCP acks, a test's end message): a server written from the SPEC §3 bytes floods 103s
/// faster than any client takes them, while datagrams go up through the client's TUN once
/// every 50 ms; each must reach the server while the flood still runs, and soon.
#[test]
fn a_download_flood_does_not_hold_back_the_clients_uploads() -> Result<()> {
    use std::{
        net::{TcpListener, UdpSocket},
        sync::{
            Arc,
            atomic::{AtomicBool, Ordering},
        },
    };
    const UPLOADS: u32 = 20;
    const LEASE: &str = "198.51.100.77";
    const FAR: &str = "192.0.2.9";
    let mut t = FourOverSix::start(&server_args(&[]))?;
    let ns = t.client_ns()?;
    // The lab's server holds 5678; the flooding server listens next to it.
    let listener = t
        .server
        .enter(|| TcpListener::bind("[2001:db8:100::1]:5679"))??;
    listener.set_nonblocking(true)?;
    let instance = t.lab.instance("flood-cl");
    t.lab.spawn_daemon(
        &ns,
        &instance,
        &["client", "--server", "[2001:db8:100::1]:5679"],
    )?;
    let conn = wait_for(
        "the client to connect",
        Duration::from_secs(10),
        || match listener.accept() {
            Ok((conn, _)) => Ok(Some(conn)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e.into()),
        },
    )?;
    conn.set_nonblocking(false)?;
    let mut peer = RawPeer { stream: conn };
    let (kind, _) = peer.recv_skip_keepalive()?;
    ensure!(kind == 100, "the client's first frame is {kind}, not 100");
    peer.send(
        101,
        format!("{LEASE} 0.0.0.0 192.0.2.53 192.0.2.53 192.0.2.53").as_bytes(),
    )?;
    t.wait_connected(&instance, Duration::from_secs(10))?;
    // The flood's datagrams land in a socket that is never read: the kernel drops them
    // quietly once it is full (no port unreachable goes back up).
    let _sink = ns.enter(|| UdpSocket::bind(format!("{LEASE}:9999")))??;

    // 103s of 64-byte UDP datagrams, many to a write.
    let mut flood = Vec::new();
    for i in 0..512u16 {
        let mut pkt = Vec::new();
        PacketBuilder::ipv4(
            FAR.parse::<Ipv4Addr>()?.octets(),
            LEASE.parse::<Ipv4Addr>()?.octets(),
            64,
        )
        .udp(9, 9999)
        .write(&mut pkt, &[i as u8; 36])?;
        flood.extend(RawPeer::frame(103, &pkt));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut writer = peer.stream.try_clone()?;
    writer.set_write_timeout(Some(Duration::from_secs(5)))?;
    let flooding = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut frames = 0u64;
            // Ends with the stop flag, or with an error once the test closes the connection.
            while !stop.load(Ordering::Relaxed) && writer.write_all(&flood).is_ok() {
                frames += 512;
            }
            frames
        })
    };
    // The uploads as the server sees them: 102s carrying UDP to FAR:7, numbered.
    let mut reader = RawPeer {
        stream: peer.stream.try_clone()?,
    };
    let reading = {
        let stop = stop.clone();
        std::thread::spawn(move || -> Result<Vec<(u32, Instant)>> {
            let mut seen = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(20);
            while seen.len() < UPLOADS as usize {
                let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                    break;
                };
                reader
                    .stream
                    .set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
                // A read that times out ends the wait: the count below says what was missed.
                let Ok((kind, data)) = reader.recv() else {
                    break;
                };
                if kind != 102 {
                    continue;
                }
                if let Ok(pkt) = SlicedPacket::from_ip(&data)
                    && let Some(TransportSlice::Udp(udp)) = pkt.transport
                    && udp.destination_port() == 7
                    && let Some(n) = std::str::from_utf8(udp.payload())
                        .ok()
                        .and_then(|s| s.strip_prefix("up "))
                        .and_then(|s| s.parse().ok())
                {
                    seen.push((n, Instant::now()));
                }
            }
            // The flood ends only now: what arrived, arrived while it ran.
            stop.store(true, Ordering::Relaxed);
            Ok(seen)
        })
    };

    // Once the flood has reached the client, the uploads, one every 50 ms.
    wait_for(
        "the flood to reach the client",
        Duration::from_secs(10),
        || {
            let stats = t.lab.ctl_json("stats", &instance)?;
            Ok((counter(&stats, "inband_packets_from_server") > 10_000).then_some(()))
        },
    )?;
    let up = ns.enter(|| UdpSocket::bind(format!("{LEASE}:0")))??;
    let mut sent = Vec::new();
    for n in 0..UPLOADS {
        up.send_to(format!("up {n}").as_bytes(), format!("{FAR}:7"))?;
        sent.push(Instant::now());
        std::thread::sleep(Duration::from_millis(50));
    }
    let seen = reading
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))?;
    stop.store(true, Ordering::Relaxed);
    // The writer may be blocked on a full socket: ending the connection frees it.
    let _ = peer.stream.shutdown(std::net::Shutdown::Both);
    let frames = flooding
        .join()
        .map_err(|_| anyhow::anyhow!("flooder panicked"))?;
    let seen = seen?;
    let stats = t.lab.ctl_json("stats", &instance)?;
    let delivered = counter(&stats, "inband_packets_from_server");
    let delays: Vec<Duration> = seen
        .iter()
        .map(|&(n, at)| at.saturating_duration_since(sent[n as usize]))
        .collect();
    eprintln!("flood: {delivered} of {frames} 103s delivered to the TUN; upload delays {delays:?}");
    assert_eq!(
        seen.len(),
        UPLOADS as usize,
        "only {} of {UPLOADS} uploads reached the server while the download ran \
         (received {:?}); the client's counters: {stats}",
        seen.len(),
        seen.iter().map(|s| s.0).collect::<Vec<_>>()
    );
    let worst = delays.iter().max().copied().unwrap_or_default();
    assert!(
        worst < Duration::from_millis(500),
        "an upload waited {worst:?} behind the download: {delays:?}"
    );
    Ok(())
}
