//! lw4o6 address sharing through the control channel (issue 24, Done-when 1): `server
//! --share 4` gives four native clients one IPv4 address with different PSIDs; each client is
//! an lwB4 that NAPTs its own traffic into its port set (the MAP-E CE's eBPF code). The
//! internet host counts, with nftables, every packet that arrives from outside the sending
//! client's address and port set.
use std::{
    net::{SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow};
use tunnel_tests::{
    Ns,
    fourover6::{FourOverSix, NATIVE_ARGS},
    transfer::tcp_transfer,
};

const SHARED: &str = "198.51.100.2";
const CLIENTS: u16 = 4;
const TCP_BYTES: usize = 20 * 1024 * 1024;
const PINGS: u32 = 20;
const DATAGRAMS: u32 = 20;

/// The internet host's address that client `i` (1-4) talks to, so that its packets can be
/// told apart there.
fn target(i: u16) -> String {
    format!("192.0.2.{}", 10 + i)
}

/// A server sharing its one pool address among four native clients.
fn start() -> Result<FourOverSix> {
    let mut args = vec![
        "--pool",
        "198.51.100.2-198.51.100.2",
        "--gateway",
        "198.51.100.1",
        "--dns",
        "192.0.2.53",
        "--share",
        "4",
    ];
    args.extend_from_slice(NATIVE_ARGS);
    FourOverSix::start(&args)
}

/// Ports of PSID `psid` (length 2, offset 6, SPEC §6): `(j << 10) | (psid << 8) | 0..255`
/// for j = 1..63, as nft ranges.
fn port_set(psid: u16) -> String {
    (1u16..64)
        .map(|j| {
            let first = (j << 10) | (psid << 8);
            format!("{first}-{}", first + 255)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// nftables on the internet host: per client, `seen<i>` counts what arrives for its target
/// address, `bad<i>` what arrives there from another address, or with a TCP/UDP source port
/// or an ICMP echo id outside its set.
fn watch(internet: &Ns, psids: &[(u16, u16)]) -> Result<()> {
    let mut rules = String::from("table ip watch {\n");
    for (i, _) in psids {
        rules += &format!("  counter seen{i} {{}}\n  counter bad{i} {{}}\n");
    }
    rules += "  chain in {\n    type filter hook prerouting priority -300; policy accept;\n";
    for (i, psid) in psids {
        let (dst, set) = (target(*i), port_set(*psid));
        rules += &format!(
            "    ip daddr {dst} counter name seen{i}\n\
             \x20   ip daddr {dst} ip saddr != {SHARED} counter name bad{i}\n\
             \x20   ip daddr {dst} tcp sport != {{ {set} }} counter name bad{i}\n\
             \x20   ip daddr {dst} udp sport != {{ {set} }} counter name bad{i}\n\
             \x20   ip daddr {dst} icmp type echo-request icmp id != {{ {set} }} counter name bad{i}\n"
        );
    }
    rules += "  }\n}\n";
    internet.nft(&rules)
}

/// Packets counted by the named nft counter.
fn nft_packets(internet: &Ns, name: &str) -> Result<u64> {
    let out = internet.run(&["nft", "list", "counter", "ip", "watch", name])?;
    out.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow!("no packet count in {out:?}"))
}

/// UDP echo on `addr` in `ns` until `stop`: replies come from the address asked.
fn echo_server(
    ns: &Ns,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>> {
    let sock = ns.enter(|| UdpSocket::bind(addr))??;
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    Ok(std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                let _ = sock.send_to(&buf[..n], from);
            }
        }
    }))
}

/// `DATAGRAMS` UDP echoes from `ns` to `to`, each tried up to three times; the number that
/// came back with their own payload.
fn udp_echoes(ns: &Ns, to: SocketAddr, who: u16) -> Result<u32> {
    let sock = ns.enter(|| UdpSocket::bind("0.0.0.0:0"))??;
    sock.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut answered = 0;
    let mut buf = [0u8; 2048];
    for seq in 0..DATAGRAMS {
        let payload = format!("client {who} datagram {seq}");
        'tries: for _ in 0..3 {
            sock.send_to(payload.as_bytes(), to)?;
            while let Ok((n, _)) = sock.recv_from(&mut buf) {
                if &buf[..n] == payload.as_bytes() {
                    answered += 1;
                    break 'tries;
                }
            }
        }
    }
    Ok(answered)
}

#[test]
fn four_native_clients_share_one_address_and_each_stays_in_its_port_set() -> Result<()> {
    let mut t = start()?;
    for i in 1..=CLIENTS {
        t.internet
            .ip(&format!("addr add {}/24 dev eth0", target(i)))?;
    }
    let mut clients = Vec::new();
    for i in 1..=CLIENTS {
        let ns = t.client_ns()?;
        let (instance, addr) = t.start_native_client(&ns, &[])?;
        assert_eq!(addr, SHARED, "client {i} holds the shared address");
        let status = t.lab.ctl_json("status", &instance)?;
        let psid = status["native"]["configured"]["psid"]
            .as_u64()
            .ok_or_else(|| anyhow!("client {i} has no PSID: {status}"))? as u16;
        clients.push((i, ns, instance, psid));
    }
    let mut psids: Vec<u16> = clients.iter().map(|c| c.3).collect();
    psids.sort_unstable();
    assert_eq!(psids, vec![0, 1, 2, 3], "four different PSIDs");
    let leases = t.leases()?;
    assert_eq!(leases.len(), 4, "{leases:?}");
    for l in &leases {
        assert_eq!(l["ipv4"], SHARED, "{l}");
        assert_eq!(
            (l["psid_len"].as_u64(), l["psid_offset"].as_u64()),
            (Some(2), Some(6)),
            "{l}"
        );
    }

    watch(
        &t.internet,
        &clients.iter().map(|c| (c.0, c.3)).collect::<Vec<_>>(),
    )?;
    let stop = Arc::new(AtomicBool::new(false));
    let echoes = (1..=CLIENTS)
        .map(|i| {
            let addr: SocketAddr = format!("{}:7", target(i)).parse()?;
            echo_server(&t.internet, addr, stop.clone())
        })
        .collect::<Result<Vec<_>>>()?;

    // All four at once: a 20 MB stream, UDP echoes and pings each.
    let internet = &t.internet;
    let results: Vec<Result<(u16, u32, u32)>> = std::thread::scope(|s| {
        let handles: Vec<_> = clients
            .iter()
            .map(|(i, ns, _, _)| {
                s.spawn(move || -> Result<(u16, u32, u32)> {
                    let tcp = s.spawn(move || {
                        let to: SocketAddr = format!("{}:5001", target(*i)).parse()?;
                        tcp_transfer(ns, internet, to, TCP_BYTES, u64::from(*i))
                    });
                    let udp = udp_echoes(ns, format!("{}:7", target(*i)).parse()?, *i)?;
                    let (pings, text) = ns.ping_with(&[], &target(*i), PINGS)?;
                    tcp.join()
                        .map_err(|_| anyhow!("client {i}'s transfer panicked"))?
                        .with_context(|| format!("client {i}'s 20 MB transfer"))?;
                    Ok((*i, udp, pings.ok_or_else(|| anyhow!("ping said {text}"))?))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow!("a client thread panicked"))?)
            .collect()
    });
    stop.store(true, Ordering::Relaxed);
    for e in echoes {
        let _ = e.join();
    }
    for r in results {
        let (i, udp, pings) = r?;
        assert_eq!(udp, DATAGRAMS, "client {i}: UDP echoes answered");
        assert_eq!(pings, PINGS, "client {i}: ping replies");
    }
    for (i, _, instance, psid) in &clients {
        let seen = nft_packets(&t.internet, &format!("seen{i}"))?;
        let bad = nft_packets(&t.internet, &format!("bad{i}"))?;
        assert!(
            seen > (TCP_BYTES / 65536) as u64,
            "client {i}: only {seen} packets seen"
        );
        assert_eq!(
            bad, 0,
            "client {i} (PSID {psid}): {bad} of {seen} packets from outside {SHARED} and its port set"
        );
        let stats = t.lab.ctl_json("stats", instance)?;
        eprintln!(
            "client {i} (PSID {psid}): {seen} packets seen at the internet host, {bad} outside; \
             eBPF NAPT out {} in {}, slow path out {}, mappings {}",
            tunnel_tests::counter(&stats, "mape_ce_napt_out_packets"),
            tunnel_tests::counter(&stats, "mape_ce_napt_in_packets"),
            tunnel_tests::counter(&stats, "slowpath_out_packets"),
            tunnel_tests::counter(&stats, "mappings_created"),
        );
        // Its NAPT made the mappings, and the programs carried the bulk.
        let nat = t.lab.ctl_json("nat", instance)?;
        let rows = nat.as_array().cloned().unwrap_or_default();
        assert!(
            ["tcp", "udp", "icmp"]
                .iter()
                .all(|p| rows.iter().any(|r| r["proto"] == *p)),
            "client {i}'s mappings: {nat}"
        );
    }
    Ok(())
}

#[test]
fn shared_leases_and_their_forwarding_survive_a_server_sigkill() -> Result<()> {
    let mut t = start()?;
    t.internet
        .ip(&format!("addr add {}/24 dev eth0", target(1)))?;
    let mut clients = Vec::new();
    for _ in 0..2 {
        let ns = t.client_ns()?;
        let (instance, _) = t.start_native_client(&ns, &[])?;
        let status = t.lab.ctl_json("status", &instance)?;
        let psid = status["native"]["configured"]["psid"].clone();
        clients.push((ns, instance, psid));
    }
    let rows = |t: &FourOverSix| -> Result<Vec<(String, String)>> {
        let mut v: Vec<(String, String)> = t
            .leases()?
            .iter()
            .map(|l| (l["client"].to_string(), l["psid"].to_string()))
            .collect();
        v.sort();
        Ok(v)
    };
    let before = rows(&t)?;
    assert_eq!(before.len(), 2, "{before:?}");
    let status = t.lab.ctl_json("status", &t.server_instance)?;
    let file = status["state_file"].as_str().unwrap_or_default().to_owned();
    tunnel_tests::wait_for(
        "both PSIDs in the lease file",
        Duration::from_secs(5),
        || {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            Ok((text.matches("\"psid\"").count() == 2).then_some(()))
        },
    )?;

    // 300 pings 10 ms apart from the first client while the server is killed and restarted:
    // its softwire stays in the pinned maps.
    let ping = clients[0].0.ping_every_10ms(&target(1), 300)?;
    // Kill only once the answers come back through the client's NAPT.
    let napt_in = |t: &FourOverSix| -> Result<u64> {
        let stats = t.lab.ctl_json("stats", &clients[0].1)?;
        Ok(tunnel_tests::counter(&stats, "mape_ce_napt_in_packets"))
    };
    let answered = napt_in(&t)?;
    tunnel_tests::wait_for("the first ping answers", Duration::from_secs(10), || {
        Ok((napt_in(&t)? >= answered + 5).then_some(()))
    })?;
    let instance = t.server_instance.clone();
    t.lab.daemon(&instance).expect("server").kill();
    t.start_server()?;
    let out = ping.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let received = tunnel_tests::ping_received(&out.stdout)?;
    eprintln!("{received}/300 pings answered around the server's SIGKILL and restart");
    assert!(received >= 295, "{received}/300 pings:\n{text}");

    // Both clients are back on the same PSIDs, and the table says so.
    for (ns, instance, psid) in &clients {
        t.wait_connected(instance, Duration::from_secs(20))?;
        let status = t.lab.ctl_json("status", instance)?;
        assert_eq!(&status["native"]["configured"]["psid"], psid, "{status}");
        assert_eq!(ns.ping(&target(1), 3)?, 3);
    }
    tunnel_tests::wait_for(
        "the restored leases held again",
        Duration::from_secs(10),
        || {
            Ok(
                (rows(&t)? == before && t.leases()?.iter().all(|l| !l["session"].is_null()))
                    .then_some(()),
            )
        },
    )?;
    Ok(())
}

#[test]
fn a_lan_behind_a_shared_lease_client_is_napted_into_its_port_set_too() -> Result<()> {
    let mut t = start()?;
    t.internet
        .ip(&format!("addr add {}/24 dev eth0", target(1)))?;
    let ns = t.client_ns()?;
    let lan = t.lab.ns("lan")?;
    t.lab.veth(&ns, "lan0", &lan, "eth0")?;
    ns.ip("addr add 203.0.113.1/24 dev lan0")?;
    lan.ip("addr add 203.0.113.10/24 dev eth0")?;
    lan.ip("route add default via 203.0.113.1")?;
    let (instance, addr) = t.start_native_client(&ns, &["--lan", "lan0"])?;
    assert_eq!(addr, SHARED);
    let status = t.lab.ctl_json("status", &instance)?;
    let psid = status["native"]["configured"]["psid"]
        .as_u64()
        .ok_or_else(|| anyhow!("no PSID: {status}"))? as u16;
    watch(&t.internet, &[(1, psid)])?;
    let stop = Arc::new(AtomicBool::new(false));
    let echo = echo_server(
        &t.internet,
        format!("{}:7", target(1)).parse()?,
        stop.clone(),
    )?;
    let to: SocketAddr = format!("{}:5001", target(1)).parse()?;
    tcp_transfer(&lan, &t.internet, to, 2 * 1024 * 1024, 9).context("2 MB from the LAN host")?;
    let udp = udp_echoes(&lan, format!("{}:7", target(1)).parse()?, 9)?;
    let pings = lan.ping(&target(1), 5)?;
    stop.store(true, Ordering::Relaxed);
    let _ = echo.join();
    assert_eq!(
        (udp, pings),
        (DATAGRAMS, 5),
        "UDP echoes and pings from the LAN host"
    );
    let (seen, bad) = (
        nft_packets(&t.internet, "seen1")?,
        nft_packets(&t.internet, "bad1")?,
    );
    assert!(seen > 20, "{seen} packets seen");
    assert_eq!(
        bad, 0,
        "{bad} of {seen} packets outside {SHARED} and PSID {psid}'s ports"
    );
    let nat = t.lab.ctl_json("nat", &instance)?;
    assert!(
        nat.as_array()
            .is_some_and(|rows| rows.iter().all(|r| r["lan"]
                .as_str()
                .is_some_and(|l| l.starts_with("203.0.113.10:")))),
        "every mapping is the LAN host's: {nat}"
    );
    Ok(())
}
