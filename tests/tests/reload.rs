//! Reload (issue 26, SPEC §8): `tunnel-ctl reload` re-reads the server's `--config` file and
//! applies the difference in place while clients keep pinging: a pool range added, `--allow`
//! and a limit changed (no ping lost, no session lost); a broken file refused whole (exit 1,
//! nothing changed); a range removed (exactly the lease in it ends with 110 "address
//! withdrawn", nobody else notices).
use std::{
    process::{Child, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use tunnel_tests::{
    fourover6::{FourOverSix, INTERNET_HOST, NATIVE_ARGS},
    wait_for,
};

/// In-band and native clients, half each; they fill [`POOL`] exactly.
const CLIENTS: usize = 20;
const POOL: &str = "198.51.100.2-198.51.100.21";
const ADDED: &str = "198.51.100.150-198.51.100.151";
/// Pings per client while the reloads run (every 10 ms).
const PINGS: u32 = 600;

fn flags<'a>(pool: &[&'a str], allow: &[&'a str], max_per_source: &'a str) -> Vec<&'a str> {
    let mut f = vec!["--gateway", "198.51.100.1", "--dns", "192.0.2.53"];
    for p in pool {
        f.extend(["--pool", p]);
    }
    for a in allow {
        f.extend(["--allow", a]);
    }
    f.extend(["--max-per-source", max_per_source]);
    f.extend_from_slice(NATIVE_ARGS);
    f
}

/// Rewrites the server's config file with `flags` (as the lab first wrote it).
fn rewrite(t: &FourOverSix, flags: &[&str]) -> Result<()> {
    let state_dir = t.lab.dir().join("state").display().to_string();
    let mut all = flags.to_vec();
    all.extend(["--state-dir", &state_dir]);
    t.lab.write_config(&t.server_instance, &all)?;
    Ok(())
}

/// `tunnel-ctl reload --instance` of the server: (exit code, stdout, stderr).
fn reload(t: &FourOverSix) -> Result<(i32, String, String)> {
    reload_instance(&t.lab, &t.server_instance)
}

/// `tunnel-ctl reload --instance I`: (exit code, stdout, stderr).
fn reload_instance(lab: &tunnel_tests::Lab, instance: &str) -> Result<(i32, String, String)> {
    let out = lab.ctl_output(&["reload", "--instance", instance])?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// How many of `count` pings came back, from ping's summary.
fn received(child: Child, count: u32) -> Result<u32> {
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .with_context(|| format!("no ping summary: {text}"))?;
    let got: u32 = line
        .split(',')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .context(line.to_owned())?;
    ensure!(line.starts_with(&format!("{count} packets")), "{line}");
    Ok(got)
}

#[test]
fn a_reload_changes_the_pool_allow_and_limits_in_place_and_loses_nothing() -> Result<()> {
    let start = flags(&[POOL], &["2001:db8::/32"], "64");
    let mut t = FourOverSix::start_with(&start, true)?;
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let ns = t.client_ns()?;
        let (_, addr) = if i % 2 == 0 {
            t.start_client(&ns, &[])?
        } else {
            t.start_native_client(&ns, &[])?
        };
        ensure!(
            ns.ping(INTERNET_HOST, 2)? == 2,
            "client {i} before the reloads"
        );
        clients.push((ns, addr));
    }
    let sessions_before = t.leases()?;
    ensure!(sessions_before.len() == CLIENTS);

    // Every client pings every 10 ms across all the reloads below.
    let count = PINGS.to_string();
    let pings: Vec<Child> = clients
        .iter()
        .map(|(ns, _)| {
            ns.command("ping")
                .args([
                    "-n",
                    "-q",
                    "-i",
                    "0.01",
                    "-W",
                    "1",
                    "-c",
                    &count,
                    INTERNET_HOST,
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .map_err(anyhow::Error::from)
        })
        .collect::<Result<_>>()?;

    // 1. A range added, --allow and a limit changed.
    rewrite(
        &t,
        &flags(&[POOL, ADDED], &["2001:db8::/32", "192.0.2.0/24"], "32"),
    )?;
    let (code, out, err) = reload(&t)?;
    ensure!(code == 0, "reload: {code} {out} {err}");
    for change in [
        "pool: 198.51.100.2-198.51.100.21 → 198.51.100.2-198.51.100.21,198.51.100.150-198.51.100.151 (0 leases withdrawn)",
        "allow: 2001:db8::/32 → 2001:db8::/32,192.0.2.0/24",
        "max-per-source: 64 → 32",
    ] {
        ensure!(out.contains(change), "{change:?} not in:\n{out}");
    }
    let status = t.lab.ctl_json("status", &t.server_instance)?;
    ensure!(status["pool_size"] == 22, "{status}");
    // The pool was full; the added range serves a new client at once.
    let extra_ns = t.client_ns()?;
    let (extra_instance, extra_addr) = t.start_client(&extra_ns, &[])?;
    ensure!(
        extra_addr == "198.51.100.150" || extra_addr == "198.51.100.151",
        "{extra_addr}"
    );
    ensure!(extra_ns.ping(INTERNET_HOST, 2)? == 2);

    // 2. A broken file: refused whole, exit 1 with the error, nothing changes.
    let path = t.lab.dir().join(format!("{}.toml", t.server_instance));
    let good = std::fs::read_to_string(&path)?;
    std::fs::write(&path, format!("{good}pool-size = 3\n"))?;
    let (code, out, err) = reload(&t)?;
    ensure!(code == 1, "a broken file: exit {code}\n{out}{err}");
    ensure!(err.contains("unknown key \"pool-size\""), "{err}");
    let after = t.lab.ctl_json("status", &t.server_instance)?;
    ensure!(
        after["pool_size"] == 22
            && after["sessions"] == status["sessions"].as_u64().unwrap_or(0) + 1
    );

    // 3. The added range removed: exactly the extra client's lease ends, with 110.
    rewrite(&t, &flags(&[POOL], &["2001:db8::/32"], "32"))?;
    let (code, out, err) = reload(&t)?;
    ensure!(code == 0, "reload: {code} {out} {err}");
    ensure!(out.contains("(1 leases withdrawn)"), "{out}");
    wait_for(
        "the extra client to hear 110",
        Duration::from_secs(5),
        || {
            let log = t.lab.daemon_log(&extra_instance).unwrap_or_default();
            Ok(log.contains("address withdrawn").then_some(()))
        },
    )?;

    for ((ns, _), child) in clients.iter().zip(pings) {
        let got = received(child, PINGS)?;
        ensure!(
            got == PINGS,
            "[{}] {got}/{PINGS} pings across the reloads\nserver log:\n{}",
            ns.name,
            t.lab.daemon_log(&t.server_instance).unwrap_or_default()
        );
    }
    // Nobody else noticed: the same leases in the same sessions.
    let leases = t.leases()?;
    for before in &sessions_before {
        let now = leases
            .iter()
            .find(|l| l["ipv4"] == before["ipv4"])
            .with_context(|| format!("lease {} gone", before["ipv4"]))?;
        ensure!(now["session"] == before["session"], "{before} then {now}");
    }
    ensure!(
        !leases.iter().any(|l| l["ipv4"] == extra_addr.as_str()),
        "the withdrawn lease is still there"
    );
    let stats = t.server_stats()?;
    ensure!(stats["leases_withdrawn"] == 1, "{stats}");
    ensure!(stats["sessions_timed_out"] == 0, "{stats}");
    ensure!(
        stats["reloads"] == 2 && stats["reloads_refused"] == 1,
        "{stats}"
    );
    Ok(())
}

/// Issue 26, Done-when 3: a CE reload that removes one port forward and adds another leaves
/// an established NAPT mapping alone: a TCP transfer from the LAN across the reload comes
/// back byte-identical, and the new forward reaches the LAN host.
#[test]
fn a_ce_reload_swaps_port_forwards_and_a_transfer_across_it_is_intact() -> Result<()> {
    use std::{
        io::{Read as _, Write as _},
        net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream},
        sync::mpsc,
    };
    use tunnel_tests::mape::{INTERNET_HOST, LAN_HOST, MapeLab, RULE_252, SHARED};
    const OLD: &str = "1680=198.51.100.10:80/tcp";
    const NEW: &str = "1681=198.51.100.10:81/tcp";
    const HALF: usize = 2 << 20;
    let t = MapeLab::start_with(&RULE_252, &["--forward", OLD], true)?;

    // An echo server on the internet host, and a LAN client that sends half, waits for the
    // reload, sends the rest and reads everything back.
    let echo = t
        .internet
        .enter(|| TcpListener::bind(SocketAddrV4::new(INTERNET_HOST, 6000)))??;
    std::thread::spawn(move || {
        if let Ok((mut c, _)) = echo.accept() {
            let mut r = c.try_clone().expect("clone");
            let _ = std::io::copy(&mut r, &mut c);
        }
    });
    let data: Vec<u8> = (0..2 * HALF).map(|i| (i * 7 + i / 251) as u8).collect();
    let mut conn = t
        .lan
        .enter(|| {
            TcpStream::connect_timeout(
                &SocketAddr::V4(SocketAddrV4::new(INTERNET_HOST, 6000)),
                Duration::from_secs(5),
            )
        })?
        .context("LAN to the internet")?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = conn.try_clone()?;
    let expected = data.clone();
    let (half_done, wait_half) = mpsc::channel();
    let back = std::thread::spawn(move || -> Result<Vec<u8>> {
        let mut got = vec![0u8; expected.len()];
        reader.read_exact(&mut got[..HALF])?;
        half_done.send(()).ok();
        reader.read_exact(&mut got[HALF..])?;
        Ok(got)
    });
    conn.write_all(&data[..HALF])?;
    wait_half
        .recv_timeout(Duration::from_secs(10))
        .context("the first half's echo")?;

    let path = t.lab.dir().join(format!("{}.toml", t.ce_instance));
    let text = std::fs::read_to_string(&path)?;
    ensure!(text.contains(OLD), "{text}");
    std::fs::write(&path, text.replace(OLD, NEW))?;
    let (code, stdout, stderr) = reload_instance(&t.lab, &t.ce_instance)?;
    ensure!(code == 0, "{code} {stdout}{stderr}");
    ensure!(
        stdout.contains(&format!("forward removed: {OLD}")),
        "{stdout}"
    );
    ensure!(
        stdout.contains(&format!("forward added: {NEW}")),
        "{stdout}"
    );

    conn.write_all(&data[HALF..])?;
    let got = back
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    ensure!(
        got == data,
        "the transfer across the reload came back different"
    );

    let list = t
        .lab
        .ctl(&["forward", "list", "--instance", &t.ce_instance, "--json"])?;
    let list: serde_json::Value = serde_json::from_str(&list)?;
    let ports: Vec<u64> = list
        .as_array()
        .context("a list")?
        .iter()
        .filter_map(|f| f["external_port"].as_u64())
        .collect();
    ensure!(ports == vec![1681], "{list}");
    // The new forward works.
    let lan81 = t
        .lan
        .enter(|| TcpListener::bind(SocketAddrV4::new(LAN_HOST, 81)))??;
    let accept = std::thread::spawn(move || lan81.accept().map(|(_, peer)| peer));
    t.internet
        .enter(|| {
            TcpStream::connect_timeout(
                &SocketAddr::V4(SocketAddrV4::new(SHARED, 1681)),
                Duration::from_secs(5),
            )
        })?
        .context("to the new forward")?;
    let peer = accept.join().map_err(|_| anyhow::anyhow!("panicked"))??;
    ensure!(peer.ip() == std::net::IpAddr::V4(INTERNET_HOST), "{peer}");
    Ok(())
}

/// A BR reload with a second rule: the rule is in force at once (status, the TUN route for
/// its prefix) and the first rule's CE keeps talking across it.
#[test]
fn a_br_reload_adds_a_rule_in_place() -> Result<()> {
    use std::net::SocketAddrV4;
    use tunnel_tests::mape::{INTERNET_HOST, MapeLab, RULE_252, udp_echo, udp_roundtrip};
    const NEW: &str = "2001:db8:a000::/40,198.51.100.128/25,15,6";
    let t = MapeLab::start_with(&RULE_252, &[], true)?;
    let _echo = udp_echo(&t.internet, SocketAddrV4::new(INTERNET_HOST, 7))?;
    udp_roundtrip(&t.lan, SocketAddrV4::new(INTERNET_HOST, 7), b"before")?;
    let path = t.lab.dir().join(format!("{}.toml", t.br_instance));
    let text = std::fs::read_to_string(&path)?;
    let line = text
        .lines()
        .find(|l| l.starts_with("rule = "))
        .context("a rule key")?
        .to_owned();
    let first = line.trim_start_matches("rule = ").to_owned();
    std::fs::write(
        &path,
        text.replace(&line, &format!("rule = [{first}, \"{NEW}\"]")),
    )?;
    let (code, stdout, stderr) = reload_instance(&t.lab, &t.br_instance)?;
    ensure!(code == 0, "{code} {stdout}{stderr}");
    ensure!(
        stdout
            .contains("rule added: 2001:db8:a000::/40 ↔ 198.51.100.128/25 (EA 15, PSID offset 6)"),
        "{stdout}"
    );
    ensure!(!stdout.contains("rule removed"), "{stdout}");
    let status = t.lab.ctl_json("status", &t.br_instance)?;
    ensure!(
        status["rules"].as_array().map(Vec::len) == Some(2),
        "{status}"
    );
    // In the programs' map too, not only in what the controller says.
    let pin = std::path::Path::new(tunnel_ctl::instance::PIN_ROOT)
        .join(&t.br_instance)
        .join("BR_RULES");
    let map = aya::maps::MapData::from_pin(&pin)?;
    let trie: aya::maps::LpmTrie<_, u32, tunnel_common::mape::MapRule> =
        aya::maps::LpmTrie::try_from(aya::maps::Map::LpmTrie(map))?;
    ensure!(trie.keys().filter_map(Result::ok).count() == 2, "BR_RULES");
    let routes = t.br.ip("route show 198.51.100.128/25")?;
    ensure!(
        routes.contains("198.51.100.128/25"),
        "no TUN route: {routes:?}"
    );
    udp_roundtrip(&t.lan, SocketAddrV4::new(INTERNET_HOST, 7), b"after")?;
    Ok(())
}
