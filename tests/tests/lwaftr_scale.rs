//! The lwAFTR at scale (issue 24): a million softwires load, and are adopted again after a
//! crash, within 10 s; runtime changes go at 1,000 a second. A test binary of its own, and its
//! tests take [`TIMED`] in turn, so that nothing else runs while one is timed. The release
//! build is measured: it is what an operator runs.
use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV4},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use tunnel_tests::{
    Lab,
    lwaftr::{Aftr, ECHO, PORT_3_5, TABLE, b4, v4},
    wait_counter_deltas,
};

/// Held by each timed test for its whole run: one at a time.
static TIMED: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn timed() -> std::sync::MutexGuard<'static, ()> {
    // A test that failed while holding it poisoned it; the next still runs alone.
    TIMED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A bindings file of `n` softwires: 4,096 per address (psid-len 12, psid-offset 4: 15 ports
/// each, 4096·j + psid), addresses from 203.0.113.10 up, B4 2001:db8:100::/64 + i, except the
/// softwires `real` names, whose B4s are the lab's.
fn big_table(n: u32, real: &[(u32, Ipv6Addr)], skip: Option<u32>) -> String {
    use std::fmt::Write as _;
    let mut text = String::with_capacity(n as usize * 110);
    for i in (0..n).filter(|i| Some(*i) != skip) {
        let (ipv4, psid) = big_softwire(i);
        let b4 = real.iter().find(|(j, _)| *j == i).map_or(
            Ipv6Addr::from(0x2001_0db8_0100_u128 << 80 | u128::from(i)),
            |r| r.1,
        );
        writeln!(
            text,
            "[[softwire]]\nipv4 = \"{ipv4}\"\npsid = {psid}\npsid-len = 12\npsid-offset = 4\nb4 = \"{b4}\""
        )
        .expect("writing to a String");
    }
    text
}

/// Softwire `i` of [`big_table`]: its address and PSID.
fn big_softwire(i: u32) -> (Ipv4Addr, u16) {
    let ipv4 = Ipv4Addr::new(
        203,
        0,
        113,
        10 + u8::try_from(i / 4096).expect("at most 245 addresses"),
    );
    (ipv4, (i % 4096) as u16)
}

#[test]
fn a_million_softwires_load_in_under_ten_seconds_and_each_end_of_the_table_works() -> Result<()> {
    const N: u32 = 1_000_000;
    let _alone = timed();
    let (first, middle, last) = (0, N / 2 + 7, N - 1);
    let real = [(first, b4(2)), (middle, b4(3)), (last, b4(4))];
    let table = big_table(N, &real, None);
    // What an operator runs: the release build.
    let mut lab = Lab::new()?;
    lab.use_release_build()?;
    let started = Instant::now();
    let t = Aftr::start_in(lab, &table, &["--max-bindings", "1000000"])?;
    let took = started.elapsed();
    let mut t = t;
    let log = t
        .lab
        .daemon(&t.instance.clone())
        .map(|d| d.log())
        .unwrap_or_default();
    for line in log.lines().filter(|l| l.contains("softwires")) {
        eprintln!("daemon: {line}");
    }
    let status = t.lab.ctl_json("status", &t.instance)?;
    eprintln!(
        "{N} softwires ({} MB of TOML): serving {took:?} after the start",
        table.len() / 1_000_000
    );
    assert_eq!(status["softwires"], N, "{status}");
    assert!(
        took < Duration::from_secs(10),
        "{N} softwires took {took:?} to load"
    );
    // Softwires from the start, the middle and the end of the file carry traffic, each from
    // a port of its own set (4096·j + psid).
    let each_end_works = |t: &Aftr, run: &str| -> Result<()> {
        for (i, addr) in [(first, b4(2)), (middle, b4(3)), (last, b4(4))] {
            let (ipv4, psid) = big_softwire(i);
            let src = SocketAddrV4::new(ipv4, 4096 * 3 + psid);
            t.b4(addr)?
                .echo(src, format!("{run}: softwire {i}").as_bytes())
                .with_context(|| format!("{run}: softwire {i} of {N}"))?;
        }
        Ok(())
    };
    each_end_works(&t, "first start")?;

    // A crash, the middle softwire taken out of the file, and a restart: the pinned maps
    // are adopted within the same bound, the softwire the file no longer has is gone from
    // them, the others work.
    t.lab
        .daemon(&t.instance.clone())
        .context("the AFTR")?
        .kill();
    std::fs::write(
        t.lab.dir().join("bindings.toml"),
        big_table(N, &real, Some(middle)),
    )?;
    let (t, took) = t.respawn()?;
    eprintln!("restart over {N} pinned softwires: serving after {took:?}");
    assert!(
        took < Duration::from_secs(10),
        "{N} pinned softwires took {took:?} to adopt"
    );
    let (ipv4, psid) = big_softwire(middle);
    let before = t.stats()?;
    t.b4(b4(3))?.send_udp(
        SocketAddrV4::new(ipv4, 4096 * 3 + psid),
        ECHO,
        b"removed before the restart",
    )?;
    wait_counter_deltas(
        "the removed softwire refused",
        Duration::from_secs(3),
        &before,
        &[("drop_no_binding_for_port", 1)],
        || t.stats(),
    )?;
    let status = t.lab.ctl_json("status", &t.instance)?;
    assert_eq!(status["softwires"], N - 1, "{status}");
    for (i, addr) in [(first, b4(2)), (last, b4(4))] {
        let (ipv4, psid) = big_softwire(i);
        let src = SocketAddrV4::new(ipv4, 4096 * 3 + psid);
        t.b4(addr)?
            .echo(src, format!("after the restart: softwire {i}").as_bytes())
            .with_context(|| format!("after the restart: softwire {i} of {N}"))?;
    }
    assert!(t.seen(b"removed before the restart").is_none());
    Ok(())
}

#[test]
fn two_thousand_softwire_changes_run_at_a_thousand_a_second_while_another_softwire_loses_nothing()
-> Result<()> {
    let _alone = timed();
    // The rate is a claim about what an operator runs: the release build.
    let mut lab = Lab::new()?;
    lab.use_release_build()?;
    let t = Aftr::start_in(lab, TABLE, &[])?;
    let steady = t.b4(b4(5))?;
    let src = v4("203.0.113.3", PORT_3_5);
    steady.echo(src, b"warm-up")?;
    let stop = Arc::new(AtomicBool::new(false));
    // A 10 ms "ping" (UDP echo) on an unrelated softwire for as long as the changes run.
    let pinger = {
        let stop = stop.clone();
        std::thread::spawn(move || -> Result<(u32, u32)> {
            let (mut sent, mut answered) = (0u32, 0u32);
            while !stop.load(Ordering::Relaxed) && sent < 6000 {
                let payload = format!("seq {sent}");
                steady.send_udp(src, ECHO, payload.as_bytes())?;
                sent += 1;
                let deadline = Instant::now() + Duration::from_millis(500);
                while Instant::now() < deadline {
                    if let Some((_, _, got)) = steady.recv_udp(Duration::from_millis(10))?
                        && got == payload.as_bytes()
                    {
                        answered += 1;
                        break;
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok((sent, answered))
        })
    };
    // 1,000 adds then 1,000 dels in one process (`tunnel-ctl softwire` per change would
    // measure process start-up): through the management socket, one request each.
    let started = Instant::now();
    let n = t.lab.ctl_batch(
        &t.instance,
        (0..1000u32)
            .map(|i| {
                let ipv4 = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 51, 100, 0)) + i / 64);
                serde_json::json!({"cmd": "softwire_add", "softwire": {
                    "ipv4": ipv4, "psid": i % 64, "psid_len": 6, "psid_offset": 6,
                    "b4": b4(6), "aftr": null}})
            })
            .chain((0..1000u32).map(|i| {
                let ipv4 = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 51, 100, 0)) + i / 64);
                serde_json::json!({"cmd": "softwire_del", "ipv4": ipv4, "psid": i % 64})
            })),
    )?;
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (sent, answered) = pinger
        .join()
        .map_err(|_| anyhow::anyhow!("pinger panicked"))??;
    let rate = f64::from(n) / took.as_secs_f64();
    eprintln!("{n} softwire changes in {took:?}: {rate:.0}/s; echoes {answered}/{sent}");
    assert_eq!(n, 2000, "every change answered ok");
    assert!(rate >= 1000.0, "{rate:.0} changes per second");
    assert!(sent > 0);
    assert_eq!(answered, sent, "the unrelated softwire lost echoes");
    let list = t.ctl(&["softwire", "list", "--json"])?;
    let list: serde_json::Value = serde_json::from_str(&list)?;
    assert_eq!(
        list.as_array().map(Vec::len),
        Some(4),
        "back to the file's four"
    );
    Ok(())
}
