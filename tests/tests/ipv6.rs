//! IPv6 for tunnel clients (SPEC §7, seeds 000-002): 107/108 leases over a session that
//! itself runs over IPv4, routed and proxy-NDP upstreams, a delegated prefix advertised on
//! the client's LAN, the default-deny inbound filter, and full-size packets.
//! Topology and addresses: `tunnel_tests::ipv6`.
use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use ipnet::Ipv6Net;
use tunnel_tests::{
    counter,
    ipv6::{DELEGATE, INTERNET6, ONLINK_POOL6, POOL6, Upstream, V6Lab, addr_of},
    transfer::tcp_transfer,
    wait_for,
};

const MB20: usize = 20 * 1024 * 1024;

fn in_prefix(addr: &str, prefix: &str) -> bool {
    let net: Ipv6Net = prefix.parse().expect("valid prefix");
    addr.parse::<std::net::Ipv6Addr>()
        .is_ok_and(|a| net.contains(&a))
}

#[test]
fn a_client_on_ipv4_only_gets_an_ipv6_address_and_reaches_the_ipv6_internet() -> Result<()> {
    let mut t = V6Lab::start(Upstream::Routed, &["--pool6", POOL6])?;
    let (client, server) = t.client_ns()?;
    let (instance, lease) = t.start_client(&client, &server, &[])?;
    ensure!(lease.ends_with("/128"), "leased {lease}, expected a /128");
    let addr = addr_of(&lease).to_owned();
    ensure!(in_prefix(&addr, POOL6), "{addr} is outside {POOL6}");
    let own = client.ip("-6 addr show dev wan scope global")?;
    ensure!(
        own.trim().is_empty(),
        "the client must have no IPv6 of its own: {own}"
    );
    let replies = client.ping(INTERNET6, 5)?;
    ensure!(replies == 5, "{replies}/5 pings to {INTERNET6} answered");
    let to: SocketAddr = format!("[{INTERNET6}]:7001").parse()?;
    tcp_transfer(&client, &t.internet, to, MB20, 11).context("client → internet")?;

    // What the operator sees: the lease with its IPv6 address, and the counters.
    let leases = t.lab.ctl_json("leases", &t.server_instance)?;
    let row = &leases[0];
    ensure!(
        row["client"] == "192.0.2.134" && row["ipv6"][0] == lease.as_str(),
        "leases: {leases}"
    );
    let stats = t.server_stats()?;
    ensure!(counter(&stats, "ipv6_leases_granted") == 1, "{stats}");
    ensure!(counter(&stats, "ipv6_packets_to_tun") > 1000, "{stats}");
    ensure!(counter(&stats, "drop_spoofed_source") == 0, "{stats}");
    // The client reports it too.
    let status = t.lab.ctl_json("status", &instance)?;
    ensure!(status["ipv6"]["dns6"][0] == "2001:db8::53", "{status}");
    Ok(())
}

#[test]
fn proxy_ndp_answers_for_a_leased_address_only_while_it_is_leased() -> Result<()> {
    let mut t = V6Lab::start(Upstream::ProxyNdp, &[])?;
    let router = t.internet.clone();
    ensure!(
        !router.ip("-6 route")?.contains("2001:db8:ff::100:"),
        "the router must not have a route for the clients"
    );
    let (client, server) = t.client_ns()?;
    let (instance, lease) = t.start_client(&client, &server, &[])?;
    let addr = addr_of(&lease).to_owned();
    ensure!(
        in_prefix(&addr, ONLINK_POOL6),
        "{addr} is outside {ONLINK_POOL6}"
    );

    let replies = router.ping(&addr, 3)?;
    ensure!(
        replies >= 2,
        "the router got {replies}/3 replies from {addr}"
    );
    let neigh = router.ip(&format!("-6 neigh show {addr} dev eth0"))?;
    ensure!(
        neigh.contains("lladdr"),
        "no neighbour entry for {addr}: {neigh}"
    );

    // The client leaves: the server withdraws the proxy entry with the lease.
    t.lab.daemon(&instance).context("client daemon")?.stop();
    wait_for("the proxy NDP entry to go", Duration::from_secs(10), || {
        let proxies = t.server.ip("-6 neigh show proxy dev up6")?;
        Ok((!proxies.contains(&addr)).then_some(()))
    })?;
    router.ip("-6 neigh flush dev eth0")?;
    let replies = router.ping(&addr, 2)?;
    ensure!(
        replies == 0,
        "{replies} replies from {addr} after its client left"
    );
    let neigh = router.ip(&format!("-6 neigh show {addr} dev eth0"))?;
    ensure!(
        !neigh.contains("lladdr"),
        "the router's solicitations for {addr} were answered after the client left: {neigh}"
    );
    Ok(())
}

#[test]
fn a_lan_host_behind_the_client_autoconfigures_from_the_delegated_prefix() -> Result<()> {
    let mut t = V6Lab::start(
        Upstream::Routed,
        &["--delegate", DELEGATE, "--delegate-len", "64"],
    )?;
    let (client, server) = t.client_ns()?;
    let host = t.lab.ns("host")?;
    t.lab.veth(&client, "lan0", &host, "eth0")?;
    let (_, lease) = t.start_client(&client, &server, &["--lan", "lan0"])?;
    ensure!(lease.ends_with("/64"), "leased {lease}, expected a /64");
    let prefix: Ipv6Net = lease.parse::<Ipv6Net>()?.trunc();
    ensure!(in_prefix(&prefix.addr().to_string(), DELEGATE), "{prefix}");

    // SLAAC: the host's kernel takes the advertised prefix (no tentative addresses).
    let slaac = wait_for(
        "the LAN host to autoconfigure an address",
        Duration::from_secs(20),
        || {
            let out = host.ip("-6 -o addr show dev eth0 scope global")?;
            Ok(out
                .lines()
                .filter(|l| !l.contains("tentative"))
                .filter_map(|l| l.split_whitespace().nth(3))
                .filter_map(|a| a.split('/').next())
                .find(|a| in_prefix(a, &prefix.to_string()))
                .map(str::to_owned))
        },
    )?;
    let route = host.ip("-6 route show default")?;
    ensure!(
        route.contains("proto ra"),
        "no default route from the RA: {route}"
    );

    let replies = host.ping(INTERNET6, 5)?;
    ensure!(
        replies == 5,
        "{replies}/5 pings from {slaac} to {INTERNET6}"
    );
    let to: SocketAddr = format!("[{INTERNET6}]:7003").parse()?;
    tcp_transfer(&host, &t.internet, to, 2 * 1024 * 1024, 13).context("LAN host → internet")?;
    Ok(())
}

#[test]
fn new_inbound_connections_get_in_only_on_allowed_ports() -> Result<()> {
    let mut t = V6Lab::start(
        Upstream::Routed,
        &["--pool6", POOL6, "--allow-in", "8080/tcp"],
    )?;
    let (client, server) = t.client_ns()?;
    let (_, lease) = t.start_client(&client, &server, &[])?;
    let addr = addr_of(&lease).to_owned();
    // Listeners on both ports: a refused connection is the filter's doing, not a RST.
    let allowed: SocketAddr = format!("[{addr}]:8080").parse()?;
    let denied: SocketAddr = format!("[{addr}]:8081").parse()?;
    let _l1 = client.enter(|| TcpListener::bind(allowed))??;
    let _l2 = client.enter(|| TcpListener::bind(denied))??;

    let before = counter(&t.server_stats()?, "drop_inbound_denied");
    let connect = |to: SocketAddr| {
        t.internet
            .enter(|| TcpStream::connect_timeout(&to, Duration::from_secs(3)))
    };
    connect(allowed)?.with_context(|| format!("connecting to the allowed {allowed}"))?;
    let refused = connect(denied)?;
    ensure!(refused.is_err(), "a new connection to {denied} got through");
    let after = counter(&t.server_stats()?, "drop_inbound_denied");
    ensure!(
        after > before,
        "drop_inbound_denied did not count ({before} → {after})"
    );

    // The client's own outbound connections work, replies and all.
    let to: SocketAddr = format!("[{INTERNET6}]:7004").parse()?;
    tcp_transfer(&client, &t.internet, to, 1024 * 1024, 14).context("client → internet")?;
    Ok(())
}

#[test]
fn full_size_packets_cross_the_tunnel_both_ways() -> Result<()> {
    let mut t = V6Lab::start(
        Upstream::Routed,
        &["--pool6", POOL6, "--allow-in", "9000/tcp"],
    )?;
    let (client, server) = t.client_ns()?;
    for (ns, dev) in [(&client, "wan"), (&t.internet, "eth0")] {
        let link = ns.ip(&format!("link show {dev}"))?;
        ensure!(
            link.contains("mtu 1500"),
            "{dev} is not a 1500-byte link: {link}"
        );
    }
    let (_, lease) = t.start_client(&client, &server, &[])?;
    let addr = addr_of(&lease).to_owned();

    // 1452 bytes of ICMP payload = a 1500-byte IPv6 packet, DF (IPv6 routers never fragment).
    for (from, to) in [(&client, INTERNET6), (&t.internet, addr.as_str())] {
        let (replies, out) = from.ping_with(&["-M", "do", "-s", "1452"], to, 3)?;
        ensure!(
            replies == Some(3),
            "1452-byte ping {} → {to}: not 3 of 3 replies through 1500-byte links:\n{out}",
            from.name
        );
    }

    let up: SocketAddr = format!("[{INTERNET6}]:7005").parse()?;
    tcp_transfer(&client, &t.internet, up, MB20, 15).context("client → internet")?;
    let down: SocketAddr = format!("[{addr}]:9000").parse()?;
    tcp_transfer(&t.internet, &client, down, MB20, 16).context("internet → client")?;
    Ok(())
}
