//! The lwAFTR (SPEC §4a, RFC 7596): `tunnel-ctl server --bindings FILE` without a pool, B4s
//! that are plain namespaces sending IPv4-in-IPv6 by hand through raw sockets (no control
//! channel, no tunnel device), an internet host with a UDP echo service. The lab is
//! `tunnel_tests::lwaftr`.
use std::{
    net::{Ipv6Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use tunnel_tests::{counter, lwaftr::*, wait_counter_deltas};

#[test]
fn a_static_table_serves_hand_made_b4s_and_softwire_add_and_del_take_effect_at_once() -> Result<()>
{
    let t = Aftr::start(TABLE, &[])?;
    let list: serde_json::Value = serde_json::from_str(&t.ctl(&["softwire", "list", "--json"])?)?;
    assert_eq!(list.as_array().map(Vec::len), Some(4), "{list}");
    assert_eq!(list[0]["port_count"], 65_536, "{list}");
    assert_eq!(list[1]["port_count"], 63 * 64, "{list}");

    // Each softwire's B4 reaches the internet host from its address and a port of its set,
    // and the echo comes back to that B4 (not to the other B4 of the shared address).
    let cases = [
        (b4(2), v4("203.0.113.1", 80)),
        (b4(3), v4("203.0.113.2", PORT_2_1)),
        (b4(4), v4("203.0.113.2", PORT_2_2)),
        (b4(5), v4("203.0.113.3", PORT_3_5)),
    ];
    for (addr, src) in cases {
        let b4 = t.b4(addr)?;
        let payload = format!("from {addr} as {src}");
        b4.echo(src, payload.as_bytes())
            .with_context(|| format!("softwire {src} of B4 {addr}"))?;
        assert_eq!(
            t.seen(payload.as_bytes()),
            Some(src),
            "as the internet saw it"
        );
    }

    // A fifth softwire (B4 ::2 holds a second one): works once added, not before, not after
    // its removal. Each change is timed from the command's return to the first echo.
    let fifth = t.b4(b4(2))?;
    let src = v4("203.0.113.4", 1024 + 48 + 3); // a 6, k 6, psid 3: 1024 + 48 …
    let before = t.stats()?;
    fifth.send_udp(src, ECHO, b"before add")?;
    wait_counter_deltas(
        "the unbound packet counted",
        Duration::from_secs(3),
        &before,
        &[("drop_unbound_source", 1)],
        || t.stats(),
    )?;
    t.ctl(&["softwire", "add", "203.0.113.4", "3/6", &b4(2).to_string()])?;
    let added = Instant::now();
    fifth.echo(src, b"after add")?;
    let took = added.elapsed();
    assert!(
        t.seen(b"before add").is_none(),
        "nothing got through before the add"
    );
    eprintln!("softwire add → first echo: {took:?}");
    t.ctl(&["softwire", "del", "203.0.113.4", "3"])?;
    let before = t.stats()?;
    fifth.send_udp(src, ECHO, b"after del")?;
    wait_counter_deltas(
        "the packet after del counted",
        Duration::from_secs(3),
        &before,
        &[("drop_unbound_source", 1)],
        || t.stats(),
    )?;
    // The others were never touched.
    b4_echo_again(&t, b4(3), v4("203.0.113.2", PORT_2_1))?;
    assert!(
        t.seen(b"after del").is_none(),
        "nothing got through after the del"
    );
    // What the issue bounds: the change is in force when the command returns (the
    // round trip above took `took`); report it.
    assert!(
        !t.ctl(&["softwire", "list"])?.contains("203.0.113.4"),
        "the deleted softwire is gone from the list"
    );

    // A reload of the edited file: the whole-address softwire goes, a new one comes, the
    // rest are not rewritten (and go on working).
    let edited = TABLE.replacen(
        "ipv4 = \"203.0.113.1\"\npsid-len = 0\nb4 = \"2001:db8:1::2\"",
        "ipv4 = \"203.0.113.5\"\npsid-len = 0\nb4 = \"2001:db8:1::6\"",
        1,
    );
    assert_ne!(edited, TABLE);
    std::fs::write(t.lab.dir().join("bindings.toml"), edited)?;
    let report = t.ctl(&["reload"])?;
    assert!(
        report.contains("softwire removed: 203.0.113.1") && report.contains("203.0.113.5"),
        "{report}"
    );
    assert!(
        !report.contains("203.0.113.2"),
        "untouched softwires rewritten: {report}"
    );
    t.b4(b4(6))?.echo(v4("203.0.113.5", 53), b"reloaded in")?;
    let before = t.stats()?;
    t.b4(b4(2))?
        .send_udp(v4("203.0.113.1", 80), ECHO, b"reloaded out")?;
    wait_counter_deltas(
        "the removed softwire refused",
        Duration::from_secs(3),
        &before,
        &[("drop_unbound_source", 1)],
        || t.stats(),
    )?;
    b4_echo_again(&t, b4(4), v4("203.0.113.2", PORT_2_2))?;
    assert!(t.seen(b"reloaded out").is_none());
    Ok(())
}

fn b4_echo_again(t: &Aftr, addr: Ipv6Addr, src: SocketAddrV4) -> Result<()> {
    t.b4(addr)?.echo(src, format!("again {src}").as_bytes())
}

#[test]
fn a_b4_outside_its_port_set_or_with_another_b4s_address_gets_nothing_through() -> Result<()> {
    let t = Aftr::start(TABLE, &[])?;
    let a = t.b4(b4(3))?; // holds 203.0.113.2 psid 1
    let before = t.stats()?;
    // Outside its set: psid 2's port (B4 ::4's), and a port below 1024 (in no set).
    a.send_udp(
        v4("203.0.113.2", PORT_2_2),
        ECHO,
        b"psid 2 port from psid 1 B4",
    )?;
    a.send_udp(v4("203.0.113.2", 1000), ECHO, b"port 1000")?;
    // Another B4's address (the whole address of ::2), and a port of 203.0.113.3 that no
    // softwire holds.
    a.send_udp(v4("203.0.113.1", 5000), ECHO, b"another B4's address")?;
    a.send_udp(
        v4("203.0.113.3", 1280 + 256 + 1),
        ECHO,
        b"no softwire for the port",
    )?;
    // The control, last: right address, right port.
    a.echo(v4("203.0.113.2", PORT_2_1), b"legitimate")?;
    let after = wait_counter_deltas(
        "each refused packet under its reason",
        Duration::from_secs(3),
        &before,
        &[
            ("drop_port_outside_set", 2),
            ("drop_b4_mismatch", 1),
            ("drop_no_binding_for_port", 1),
        ],
        || t.stats(),
    )?;
    let seen = t.seen.lock().unwrap().clone();
    assert_eq!(
        seen.iter().map(|(_, p)| p.as_slice()).collect::<Vec<_>>(),
        vec![b"legitimate".as_slice()],
        "the internet host saw only the control"
    );
    assert!(counter(&after, "fastpath_decap_packets") >= 1, "{after}");

    // From the internet, a datagram that its sender fragments toward a port of 203.0.113.3
    // that no softwire holds: reassembled by the slow path (only the first fragment names
    // the port), then refused and counted, not handed to the kernel (whose routes would
    // send it back out).
    let before = t.stats()?;
    let sender = t
        .internet
        .enter(|| std::net::UdpSocket::bind("192.0.2.10:0"))??;
    sender.send_to(&[7u8; 1600], v4("203.0.113.3", 1280 + 256 + 1))?;
    wait_counter_deltas(
        "the reassembled datagram refused",
        Duration::from_secs(3),
        &before,
        &[
            ("softwire_slow_path_packets", 2),
            ("fragments_reassembled", 1),
            ("drop_slowpath_no_softwire", 1),
        ],
        || t.stats(),
    )?;
    Ok(())
}

#[test]
fn hairpinning_reaches_another_b4_without_leaving_the_aftr_and_no_hairpin_drops_it() -> Result<()> {
    for hairpin in [true, false] {
        let extra: &[&str] = if hairpin { &[] } else { &["--no-hairpin"] };
        let t = Aftr::start(TABLE, extra)?;
        // Nothing toward 203.0.113.0/24 may reach the internet side: counted there.
        let nft = "table netdev leak {\n chain c {\n type filter hook ingress device v4 \
                   priority 0;\n ip daddr 203.0.113.0/24 counter\n }\n}\n";
        t.internet.nft(nft)?;
        let (a, b) = (t.b4(b4(3))?, t.b4(b4(4))?);
        let (a_src, b_dst) = (v4("203.0.113.2", PORT_2_1), v4("203.0.113.2", PORT_2_2));
        let before = t.stats()?;
        a.send_udp(a_src, b_dst, b"ping through the AFTR")?;
        if hairpin {
            let (from, to, got) = b
                .recv_udp(Duration::from_secs(3))?
                .context("B4 B got nothing from the hairpin")?;
            assert_eq!(
                (from, to, got.as_slice()),
                (a_src, b_dst, b"ping through the AFTR".as_slice())
            );
            // B answers (UDP echo) the same way.
            b.send_udp(b_dst, a_src, &got)?;
            let (from, to, back) = a
                .recv_udp(Duration::from_secs(3))?
                .context("B4 A got no answer")?;
            assert_eq!((from, to, back), (b_dst, a_src, got));
            wait_counter_deltas(
                "two hairpinned packets",
                Duration::from_secs(3),
                &before,
                &[("hairpin_packets", 2)],
                || t.stats(),
            )?;
        } else {
            wait_counter_deltas(
                "the hairpin dropped",
                Duration::from_secs(3),
                &before,
                &[("drop_hairpin_off", 1), ("hairpin_packets", 0)],
                || t.stats(),
            )?;
            assert!(
                b.recv_udp(Duration::from_millis(300))?.is_none(),
                "B got it anyway"
            );
        }
        // A packet to the internet host, sent last, shows the path works and is counted
        // there (the positive control of the leak counter: 0 toward 203.0.113.0/24).
        a.echo(a_src, b"control")?;
        let listed = t
            .internet
            .run(&["nft", "list", "table", "netdev", "leak"])?;
        assert!(
            listed.contains("packets 0 bytes 0"),
            "leaked to the internet side: {listed}"
        );
        drop(t);
    }
    Ok(())
}

#[test]
fn four_thousand_byte_datagrams_cross_the_aftr_whole_both_ways() -> Result<()> {
    big_datagrams_cross_whole(&Aftr::start(TABLE, &[])?)
}

/// The same through a server that also has a pool and a control channel (native mode):
/// its TUN carries the softwires' slow path next to the in-band clients'.
#[test]
fn four_thousand_byte_datagrams_cross_a_server_with_a_pool_whole_both_ways() -> Result<()> {
    let t = Aftr::start(TABLE, tunnel_tests::fourover6::BASE_ARGS)?;
    let status = t.lab.ctl_json("status", &t.instance)?;
    assert_eq!(status["role"], "server", "a full server: {status}");
    big_datagrams_cross_whole(&t)
}

fn big_datagrams_cross_whole(t: &Aftr) -> Result<()> {
    let b4 = t.b4(b4(3))?; // 203.0.113.2 psid 1
    let src = v4("203.0.113.2", PORT_2_1);
    let payload: Vec<u8> = (0..4000u32).map(|i| (i % 251) as u8).collect();
    let before = t.stats()?;
    // 4,028 bytes of IPv4 in IPv6: the B4's kernel fragments the outer packet (the link
    // has 1,500 bytes); the AFTR's kernel reassembles it, the slow path checks it and the
    // AFTR's kernel fragments the IPv4 datagram toward the internet host, whose stack puts
    // it back together for the echo service. The echo (4,000 bytes, fragmented by the
    // internet host) comes back through the AFTR's reassembly to the B4 of the port.
    b4.send(&udp4_may_fragment(src, ECHO, &payload))?;
    let mut echoed = None;
    let deadline = Instant::now() + Duration::from_secs(5);
    while echoed.is_none() && Instant::now() < deadline {
        echoed = b4
            .recv_udp(Duration::from_millis(500))?
            .filter(|(_, _, p)| p.len() > 100);
    }
    assert_eq!(
        t.seen(&payload),
        Some(src),
        "the internet host got the 4,000 bytes whole, from the softwire's address and port"
    );
    let (from, to, got) = echoed.context("no echo of the 4,000-byte datagram")?;
    assert_eq!((from, to), (ECHO, src));
    assert!(
        got == payload,
        "the echo arrived whole and unchanged ({} bytes)",
        got.len()
    );
    wait_counter_deltas(
        "the slow path took both directions",
        Duration::from_secs(3),
        &before,
        &[
            ("softwire_outer_fragments", 3),
            ("slowpath_from_b4", 1),
            ("softwire_slow_path_packets", 3),
            ("fragments_reassembled", 1),
            ("slowpath_fragmented", 1),
        ],
        || t.stats(),
    )?;

    // The same size from a port of psid 2 (another B4's): reassembled, then refused as the
    // fast path refuses it.
    let before = t.stats()?;
    let stolen: Vec<u8> = payload.iter().map(|b| b ^ 0x55).collect();
    b4.send(&udp4_may_fragment(
        v4("203.0.113.2", PORT_2_2),
        ECHO,
        &stolen,
    ))?;
    wait_counter_deltas(
        "the reassembled packet refused",
        Duration::from_secs(3),
        &before,
        &[
            ("softwire_outer_fragments", 3),
            ("slowpath_drop_port_outside_set", 1),
            ("slowpath_from_b4", 0),
        ],
        || t.stats(),
    )?;
    assert!(t.seen(&stolen).is_none(), "nothing got through");
    Ok(())
}

/// A datagram too big for one packet between two B4s: its outer fragments are reassembled,
/// it is hairpinned by the slow path (one hop: TTL − 1) and reaches the other B4 whole.
#[test]
fn a_big_datagram_between_two_b4s_is_hairpinned_whole_by_the_slow_path() -> Result<()> {
    let t = Aftr::start(TABLE, &[])?;
    let a = t.b4(b4(3))?; // 203.0.113.2 psid 1
    let b = t.b4(b4(5))?; // 203.0.113.3 psid 5, offset 0
    let (from, to) = (v4("203.0.113.2", PORT_2_1), v4("203.0.113.3", PORT_3_5));
    let payload: Vec<u8> = (0..3000u32).map(|i| (i % 241) as u8).collect();
    let before = t.stats()?;
    a.send(&udp4_may_fragment(from, to, &payload))?;
    let mut got = None;
    let deadline = Instant::now() + Duration::from_secs(5);
    while got.is_none() && Instant::now() < deadline {
        got = b
            .recv_udp(Duration::from_millis(500))?
            .filter(|(_, _, p)| p.len() > 100);
    }
    let (src, dst, data) = got.context("B4 ::5 got nothing")?;
    assert_eq!((src, dst), (from, to));
    assert!(data == payload, "arrived whole ({} bytes)", data.len());
    assert_eq!(b.last_ttl.get(), Some(63), "one hop through the AFTR");
    wait_counter_deltas(
        "hairpinned by the slow path",
        Duration::from_secs(3),
        &before,
        &[
            ("softwire_outer_fragments", 3),
            ("slowpath_hairpinned", 1),
            ("slowpath_fragmented", 1),
            ("slowpath_from_b4", 0),
        ],
        || t.stats(),
    )?;
    assert!(t.seen(&payload).is_none(), "kept off the internet side");
    Ok(())
}
