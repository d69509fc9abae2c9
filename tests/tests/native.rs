//! Native mode (SPEC §5.2, issue "native fast path"): 105/106, eBPF encapsulation on both
//! ends, anti-spoofing, hitless server restart, bindings that follow the lease table, and
//! TCP that fits the tunnel without fragments.
use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use etherparse::PacketBuilder;
use tunnel_tests::{
    Ns, counter,
    fourover6::{FourOverSix, INTERNET_HOST, TUNNEL_ADDR},
    transfer::tcp_transfer,
    wait_for,
};

/// A native-capable server with the test pool, plus `extra` flags.
fn start(extra: &[&str]) -> Result<FourOverSix> {
    let mut args = vec![
        "--pool",
        "198.51.100.2-198.51.100.20",
        "--gateway",
        "198.51.100.1",
        "--dns",
        "192.0.2.53",
    ];
    args.extend_from_slice(extra);
    FourOverSix::start_native(&args)
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
    tcp_transfer(&ns, &t.internet, "192.0.2.2:9100".parse()?, len, 42)?;
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
    let client_stats = t.lab.ctl_json("stats", &client)?;
    assert!(
        counter(&client_stats, "client_encap_packets") >= decap,
        "{client_stats}"
    );
    Ok(())
}
