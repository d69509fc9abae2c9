//! The monitor daemon counts live traffic on a veth in a namespace, and `tunnel-ctl stats`
//! reports it.
use anyhow::Result;
use tunnel_tests::{Lab, counter};

#[test]
fn pings_across_a_veth_are_counted() -> Result<()> {
    const N: u32 = 20;
    let mut lab = Lab::new()?;
    let a = lab.ns("a")?;
    let b = lab.ns("b")?;
    lab.veth(&a, "veth-a", &b, "veth-b")?;
    a.ip("addr add 192.0.2.1/24 dev veth-a")?;
    b.ip("addr add 192.0.2.2/24 dev veth-b")?;

    let instance = lab.instance("mon");
    lab.spawn_daemon(&b, &instance, &["monitor", "--dev", "veth-b"])?;
    let before = lab.ctl_json("stats", &instance)?;

    let answered = a.ping("192.0.2.2", N)?;
    assert_eq!(answered, N, "every ping should be answered");

    let after = lab.ctl_json("stats", &instance)?;
    let rx = counter(&after, "monitor_ingress_ipv4") - counter(&before, "monitor_ingress_ipv4");
    let tx = counter(&after, "monitor_egress_ipv4") - counter(&before, "monitor_egress_ipv4");
    assert!(
        rx >= u64::from(N),
        "ingress IPv4 rose by {rx}, expected >= {N}"
    );
    assert!(
        tx >= u64::from(N),
        "egress IPv4 rose by {tx}, expected >= {N}"
    );

    let status = lab.ctl_json("status", &instance)?;
    assert_eq!(status["role"], "monitor");
    assert_eq!(status["interfaces"][0], "veth-b");
    Ok(())
}

#[test]
fn clean_stop_detaches_and_removes_pins() -> Result<()> {
    let mut lab = Lab::new()?;
    let a = lab.ns("a")?;
    let b = lab.ns("b")?;
    lab.veth(&a, "veth-a", &b, "veth-b")?;
    let instance = lab.instance("mon");
    let pin_dir = std::path::Path::new("/sys/fs/bpf/tunnel").join(&instance);
    let socket = std::path::Path::new("/run/tunnel").join(format!("{instance}.sock"));

    let daemon = lab.spawn_daemon(&b, &instance, &["monitor", "--dev", "veth-b"])?;
    // The pinned link is a live TCX link (type 11) with a program.
    let link_pin = pin_dir.join("link_monitor_ingress_veth-b");
    let link: serde_json::Value = serde_json::from_str(&b.run(&[
        "bpftool",
        "-j",
        "link",
        "show",
        "pinned",
        link_pin.to_str().unwrap(),
    ])?)?;
    assert_eq!(link["type"], 11, "not a TCX link: {link}");
    let link_id = link["id"].to_string();
    assert!(
        pin_dir.join("TUNNEL_STATS").exists(),
        "stats map not pinned"
    );
    assert!(
        pin_dir.join("link_monitor_ingress_veth-b").exists(),
        "link not pinned"
    );
    assert_eq!(daemon.stop(), Some(0), "daemon log:\n{}", daemon.log());
    assert!(
        !pin_dir.exists(),
        "pins left behind in {}",
        pin_dir.display()
    );
    assert!(!socket.exists(), "socket left behind");

    // The link is gone from the kernel, so the program is detached.
    let out = b.output(&["bpftool", "link", "show", "id", &link_id])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("No such file or directory"),
        "link {link_id} is not reported missing after stop: {}{err}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(())
}

#[test]
fn second_daemon_on_the_same_instance_is_refused() -> Result<()> {
    let mut lab = Lab::new()?;
    let a = lab.ns("a")?;
    let b = lab.ns("b")?;
    lab.veth(&a, "veth-a", &b, "veth-b")?;
    let instance = lab.instance("mon");
    lab.spawn_daemon(&b, &instance, &["monitor", "--dev", "veth-b"])?;
    let out = b.output(&[
        tunnel_tests::tunnel_ctl_bin()?.to_str().unwrap(),
        "monitor",
        "--dev",
        "veth-b",
        "--instance",
        &instance,
    ])?;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("already running"), "stderr: {stderr}");
    // The first daemon still answers.
    lab.ctl_json("stats", &instance)?;
    Ok(())
}

/// Issue 18 item 6: started with `ip netns exec` (its own mount namespace and /sys), a daemon
/// says at start that its bpffs is private and that `nsenter --net` keeps the host's.
#[test]
fn a_private_bpffs_under_ip_netns_exec_is_reported_at_start() -> Result<()> {
    use std::time::Duration;
    let mut lab = Lab::new()?;
    let a = lab.ns("a")?;
    let b = lab.ns("b")?;
    lab.veth(&a, "veth-a", &b, "veth-b")?;
    let instance = lab.instance("mon");
    let log_path = lab.dir().join("netns-exec.log");
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", &b.name])
        .arg(tunnel_tests::tunnel_ctl_bin()?)
        .args(["monitor", "--dev", "veth-b", "--instance", &instance])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log_path)?)
        .spawn()?;
    let seen = tunnel_tests::wait_for("the private-bpffs warning", Duration::from_secs(20), || {
        let log = std::fs::read_to_string(&log_path)?;
        Ok(
            (log.contains("not the host's BPF filesystem") && log.contains("nsenter --net"))
                .then_some(()),
        )
    });
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    seen?;
    // Under nsenter (the lab's way) the same daemon says nothing of the kind.
    lab.spawn_daemon(&b, &instance, &["monitor", "--dev", "veth-b"])?;
    let log = lab.daemon_log(&instance).unwrap_or_default();
    assert!(!log.contains("not the host's BPF filesystem"), "{log}");
    Ok(())
}
