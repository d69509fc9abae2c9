//! `cargo xtask demo`: a throwaway namespace lab that shows the tunnel working, in plain words.
//!
//! Everything it creates is removed at the end, on failure (the lab's drop) and on Ctrl-C (the
//! handler removes what this process made, since drop does not run there).
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use tunnel_tests::{Lab, remove_own_leftovers};

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

    let result = monitor_demo();
    match &result {
        Ok(()) => println!("\ndemo: done; namespaces, daemons, sockets and pins removed."),
        Err(_) => println!("\ndemo: failed; the lab has been removed."),
    }
    result
}

fn step(n: u32, text: &str) {
    println!("\n[{n}] {text}");
}

/// Until the control plane lands: the eBPF counting program on live traffic.
fn monitor_demo() -> Result<()> {
    const PINGS: u32 = 10;
    println!("tunnel demo: the eBPF pipeline on live traffic");

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
        &format!("Counters, read with `tunnel-ctl stats --instance {instance}`"),
    );
    let stats = lab.ctl(&["stats", "--instance", &instance])?;
    for line in stats.lines() {
        println!("    {line}");
    }
    let json = lab.ctl_json("stats", &instance)?;
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
