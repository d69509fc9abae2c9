//! `cargo xtask demo`: a throwaway namespace lab that shows the tunnel working, in plain words.
//!
//! Everything it creates is removed at the end, on failure (the lab's drop) and on Ctrl-C (the
//! handler removes what this process made, since drop does not run there).
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use tunnel_tests::{
    Lab,
    fourover6::{FourOverSix, INTERNET_HOST, SERVER, TUNNEL_ADDR},
    mape::{self, MapeLab, RULE_252},
    remove_own_leftovers,
    transfer::tcp_transfer,
};

use crate::build_bin;

pub fn run() -> Result<()> {
    crate::require_root("cargo xtask demo")?;
    let bin = build_bin(false)?;
    // SAFETY: single-threaded here; the harness reads this to find the binary.
    unsafe { std::env::set_var("TUNNEL_CTL", &bin) };
    ctrlc::set_handler(|| {
        eprintln!("\ndemo: interrupted; removing the lab");
        remove_own_leftovers();
        std::process::exit(130);
    })
    .context("installing the Ctrl-C handler")?;

    let result = fourover6_demo()
        .and_then(|()| mape_demo())
        .and_then(|()| monitor_demo());
    match &result {
        Ok(()) => println!("\ndemo: done; namespaces, daemons, sockets and pins removed."),
        Err(_) => println!("\ndemo: failed; the lab has been removed."),
    }
    result
}

fn step(n: u32, text: &str) {
    println!("\n[{n}] {text}");
}

/// The main job: a 4over6 concentrator with two IPv6-only clients.
fn fourover6_demo() -> Result<()> {
    const MB: usize = 50;
    println!(
        "tunnel demo, part 1: a 4over6 concentrator and two IPv6-only clients (in-band and native)"
    );
    step(
        1,
        "Building a lab: server, internet host, two clients with IPv6-only links",
    );
    let mut t = FourOverSix::start_native(&[
        "--pool",
        "198.51.100.2-198.51.100.128",
        "--gateway",
        "198.51.100.1",
        "--dns",
        "192.0.2.53,192.0.2.54",
    ])?;
    println!(
        "    server   {}  listens on {SERVER}; pool 198.51.100.2-198.51.100.128 on TUN tun4o6",
        t.server.name
    );
    println!(
        "             eBPF fast path: decap on up6 (IPv6 side), encap on inet0 (IPv4 side), tunnel address {TUNNEL_ADDR}"
    );
    println!(
        "    internet {}  192.0.2.2/24, routes 198.51.100.0/24 back to the server",
        t.internet.name
    );
    let mut clients = Vec::new();
    step(
        2,
        "Starting `tunnel-ctl client --server [2001:db8:100::1]:5678` in one client namespace \
         and the same with `--mode native --v6-dev v6` in the other",
    );
    for mode in ["in-band", "native"] {
        let ns = t.client_ns()?;
        let (_instance, addr) = if mode == "native" {
            t.start_native_client(&ns, &[])?
        } else {
            t.start_client(&ns, &[])?
        };
        println!(
            "    client   {}  has no IPv4 of its own; leased {addr} over the TCP control channel ({mode})",
            ns.name
        );
        clients.push((ns, mode, addr));
    }
    step(
        3,
        &format!(
            "Each client pings {INTERNET_HOST} and sends {MB} MB over TCP to it, through the tunnel"
        ),
    );
    for (i, (ns, mode, addr)) in clients.iter().enumerate() {
        let answered = ns.ping(INTERNET_HOST, 3)?;
        println!("    {addr}: {answered}/3 pings answered");
        if answered != 3 {
            bail!("client {addr}: only {answered} of 3 pings were answered");
        }
        let to = format!("{INTERNET_HOST}:{}", 9000 + i).parse()?;
        let started = std::time::Instant::now();
        tcp_transfer(ns, &t.internet, to, MB << 20, i as u64 + 1)?;
        let how = if *mode == "native" {
            "native: IPv4-in-IPv6 by eBPF, never in userspace"
        } else {
            "in-band: 102/103 frames over TCP through the controller"
        };
        println!(
            "    {addr}: {MB} MB arrived byte-identical in {:.2} s ({how})",
            started.elapsed().as_secs_f64()
        );
    }
    step(
        4,
        &format!(
            "Lease table (`tunnel-ctl leases --instance {}`)",
            t.server_instance
        ),
    );
    for line in t
        .lab
        .ctl(&["leases", "--instance", &t.server_instance])?
        .lines()
    {
        println!("    {line}");
    }
    step(5, "Server counters that moved (`tunnel-ctl stats`)");
    print_moved("", &t.server_stats()?);
    step(6, "Stopping clients and server, removing the lab");
    t.lab.teardown();
    Ok(())
}

/// A MAP-E line: LAN host → CE → BR → internet host.
fn mape_demo() -> Result<()> {
    const MB: usize = 50;
    println!("\ntunnel demo, part 2: a MAP-E CE and BR (RFC 7597), as on a v6plus/OCN line");
    step(
        1,
        "Building a lab: LAN host, CE, BR and internet host; only IPv6 between CE and BR",
    );
    let forward = format!("1680={}:80/tcp", mape::LAN_HOST);
    let t = MapeLab::start(&RULE_252, &["--forward", &forward])?;
    let status = t.lab.ctl_json("status", &t.ce_instance)?;
    let field = |k: &str| match &status[k] {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    println!(
        "    rule {} <-> {}, EA {} bits, PSID offset {}; end-user prefix {}",
        RULE_252.ipv6, RULE_252.ipv4, RULE_252.ea_len, RULE_252.psid_offset, RULE_252.prefix
    );
    println!(
        "    CE {}: shared IPv4 {}, PSID {}, {} ports; CE address {}; BR {}",
        t.ce.name,
        field("ipv4"),
        field("psid"),
        field("port_count"),
        field("ce_ipv6"),
        field("br")
    );
    step(
        2,
        &format!(
            "The LAN host {} pings {} and sends {MB} MB over TCP to it",
            mape::LAN_HOST,
            mape::INTERNET_HOST
        ),
    );
    let answered = t.lan.ping(&mape::INTERNET_HOST.to_string(), 3)?;
    println!("    {answered}/3 pings answered");
    if answered != 3 {
        bail!("only {answered} of 3 pings were answered through MAP-E");
    }
    let started = std::time::Instant::now();
    tcp_transfer(
        &t.lan,
        &t.internet,
        std::net::SocketAddr::from((mape::INTERNET_HOST, 9100)),
        MB << 20,
        42,
    )?;
    println!(
        "    {MB} MB arrived byte-identical in {:.2} s (NAPT + encapsulation in eBPF after the first packet)",
        started.elapsed().as_secs_f64()
    );
    step(
        3,
        &format!(
            "NAPT mappings (`tunnel-ctl nat --instance {}`): ports only from the set; the forward {forward}",
            t.ce_instance
        ),
    );
    for line in t.lab.ctl(&["nat", "--instance", &t.ce_instance])?.lines() {
        println!("    {line}");
    }
    step(4, "CE and BR counters that moved");
    for (who, stats) in [("CE ", t.ce_stats()?), ("BR ", t.br_stats()?)] {
        print_moved(who, &stats);
    }
    step(5, "Stopping CE and BR, removing the lab");
    let mut t = t;
    t.lab.teardown();
    Ok(())
}

/// The eBPF counting program on live traffic (the pipeline the fast path builds on).
fn monitor_demo() -> Result<()> {
    const PINGS: u32 = 10;
    println!("\ntunnel demo, part 3: the eBPF pipeline on live traffic");

    let mut lab = Lab::new()?;
    step(
        1,
        "Building a lab: two network namespaces joined by a veth pair",
    );
    let a = lab.ns("a")?;
    let b = lab.ns("b")?;
    lab.veth(&a, "veth-a", &b, "veth-b")?;
    a.ip("addr add 192.0.2.1/24 dev veth-a")?;
    b.ip("addr add 192.0.2.2/24 dev veth-b")?;
    println!("    {}  veth-a 192.0.2.1/24", a.name);
    println!("    {}  veth-b 192.0.2.2/24", b.name);

    let instance = lab.instance("demo");
    step(
        2,
        &format!(
            "Starting `tunnel-ctl monitor --dev veth-b --instance {instance}` inside the second namespace"
        ),
    );
    lab.spawn_daemon(&b, &instance, &["monitor", "--dev", "veth-b"])?;
    println!(
        "    it loaded the embedded eBPF object, attached TC (TCX) programs on veth-b ingress"
    );
    println!("    and egress, and pinned its map and links under /sys/fs/bpf/tunnel/{instance}/");

    step(
        3,
        &format!("Sending {PINGS} pings 192.0.2.1 -> 192.0.2.2 across the veth"),
    );
    let answered = a.ping("192.0.2.2", PINGS)?;
    println!("    {answered}/{PINGS} answered");
    if answered != PINGS {
        bail!("only {answered} of {PINGS} pings were answered");
    }

    step(
        4,
        &format!("Counters that moved, read with `tunnel-ctl stats --instance {instance}`"),
    );
    let json = lab.ctl_json("stats", &instance)?;
    print_moved("", &json);
    let rx = json["monitor_ingress_ipv4"].as_u64().unwrap_or(0);
    println!(
        "    => {rx} IPv4 packets came in on veth-b ({PINGS} echo requests, plus anything else),"
    );
    println!("       counted per CPU in a BPF map by the eBPF program, summed by the controller.");
    if rx < u64::from(PINGS) {
        bail!("the ingress IPv4 counter is {rx}, expected at least {PINGS}");
    }

    step(5, "Stopping the daemon (SIGTERM) and removing the lab");
    let daemon_log = {
        lab.teardown();
        std::thread::sleep(Duration::from_millis(50));
        std::path::Path::new("/sys/fs/bpf/tunnel").join(&instance)
    };
    if daemon_log.exists() {
        bail!("pins left behind in {}", daemon_log.display());
    }
    Ok(())
}

/// The counters of a `stats --json` object that are not zero, one per line after `who`.
fn print_moved(who: &str, stats: &serde_json::Value) {
    for line in moved(who, stats) {
        println!("{line}");
    }
}

/// The lines [`print_moved`] prints.
fn moved(who: &str, stats: &serde_json::Value) -> Vec<String> {
    stats
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, v)| v.as_u64() != Some(0))
        .map(|(k, v)| format!("    {who}{k:<32} {v}"))
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_counters_that_moved_are_shown() {
        let stats =
            serde_json::json!({"decap": 5, "drop_unbound_source": 0, "encap": 0, "leases": 1});
        let lines = super::moved("CE ", &stats);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines[0].starts_with("    CE decap") && lines[0].ends_with(" 5"),
            "{lines:?}"
        );
        assert!(lines[1].contains("leases"), "{lines:?}");
    }
}
