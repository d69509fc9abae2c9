//! Control-plane scale: a load generator speaking the raw protocol (SPEC §3) opens many
//! concurrent sessions to the server over IPv6 inside the server's namespace, each from its
//! own source address (a local /64 route on loopback), then churns native bindings while an
//! unrelated native client pings through the fast path.
//!
//! Measured on the server process: leases per second while sessions pile up, resident memory
//! per idle session, CPU of the keepalive machinery at steady state, and binding changes per
//! second under churn with the other client's ping loss.
//!
//! Addresses: 10,000 leases do not fit in the documentation blocks, so the pool continues in
//! 198.18.0.0/15 (RFC 2544's benchmarking block). Those leases only exist as bookkeeping: no
//! packet is ever sent to them; the pinging client's lease is the pool's first address,
//! 198.51.100.2.
use std::{
    net::{Ipv6Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow};
use futures::StreamExt as _;
use tunnel_tests::{
    fourover6::{FourOverSix, SERVER},
    loadgen::{self, KEEPALIVE, NATIVE_REPLY, NATIVE_REQUEST, Session},
    measure::per_item,
    wait_for,
};

use crate::{
    Plan,
    report::{Report, Target},
};

/// Idle sessions come from 2001:db8:b::/64, churning ones from 2001:db8:c::/64.
const IDLE_NET: u16 = 0xb;
const CHURN_NET: u16 = 0xc;
const CHURN_CONCURRENCY: usize = 32;
const CONNECT_CONCURRENCY: usize = 256;

fn source(net: u16, i: u32) -> SocketAddr {
    loadgen::source(Ipv6Addr::new(0x2001, 0xdb8, net, 0, 0, 0, 0, 0), i)
}

/// Connects from `from`, asks for an address (100) and waits for the lease (101).
async fn lease(from: SocketAddr) -> Result<Session> {
    let mut s = Session::connect(SERVER.parse()?, from).await?;
    s.lease().await?;
    Ok(s)
}

/// An idle session's life: answer nothing but send 104 every 20 s, until the server closes
/// or the bench ends.
async fn idle(mut s: Session) {
    let mut tick = tokio::time::interval(Duration::from_secs(20));
    tick.tick().await;
    loop {
        tokio::select! {
            frame = s.recv() => match frame {
                Ok(Some(_)) => {}
                _ => return,
            },
            _ = tick.tick() => {
                if s.send(KEEPALIVE, &[]).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// One churn cycle: lease, native binding (105 → 106), close.
async fn churn_once(from: SocketAddr) -> Result<()> {
    let mut s = lease(from).await?;
    s.send(NATIVE_REQUEST, &[]).await?;
    s.expect(NATIVE_REPLY).await?;
    s.close().await;
    Ok(())
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS for pid {pid}"))
}

/// utime + stime of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    Ok(ticks / crate::clock_ticks_per_second())
}

pub fn run(plan: &Plan, report: &mut Report) -> Result<()> {
    let max = (plan.sessions + 1_000).to_string();
    let mut t = FourOverSix::start_native(&[
        "--pool",
        "198.51.100.2-198.51.100.254",
        "--pool",
        "198.18.0.1-198.18.127.254",
        "--gateway",
        "198.51.100.1",
        "--dns",
        "192.0.2.53",
        "--max-sessions",
        &max,
        // Every load session comes from one of two /64s.
        "--max-leases-per-prefix",
        "0",
        "--max-leases-per-address",
        "0",
    ])?;
    let pinger = t.client_ns()?;
    let (_, ping_lease) = t.start_native_client(&pinger, &[])?;
    // Sources: two /64s routed locally (AnyIP); binding to them needs nonlocal bind.
    t.server.sysctl("net.ipv6.ip_nonlocal_bind", "1")?;
    t.server.ip(&format!(
        "-6 route add local 2001:db8:{IDLE_NET:x}::/64 dev lo"
    ))?;
    t.server.ip(&format!(
        "-6 route add local 2001:db8:{CHURN_NET:x}::/64 dev lo"
    ))?;
    let pid = t
        .lab
        .spawn_daemon_pid(&t.server_instance)
        .context("server pid")?;
    let rss_before = rss_kib(pid)?;
    let leases_before = t.leases()?.len();

    // Phase 1: sessions pile up, CONNECT_CONCURRENCY in flight.
    let n = plan.sessions;
    let rt_ns = t.server.clone();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (result_tx, result_rx) = std::sync::mpsc::channel::<Result<(f64, u32)>>();
    // The generator lives on a thread inside the server's namespace, with a single-threaded
    // runtime so that every socket is created there; it keeps its sessions until told to stop.
    let generator = std::thread::spawn(move || {
        let r = rt_ns.enter(|| -> Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let started = Instant::now();
                let sessions = futures::stream::iter(0..n)
                    .map(|i| lease(source(IDLE_NET, i)))
                    .buffer_unordered(CONNECT_CONCURRENCY)
                    .collect::<Vec<_>>()
                    .await;
                let elapsed = started.elapsed().as_secs_f64();
                let mut ok = 0u32;
                let mut first_err = None;
                for s in sessions {
                    match s {
                        Ok(s) => {
                            ok += 1;
                            tokio::spawn(idle(s));
                        }
                        Err(e) => {
                            first_err.get_or_insert(e);
                        }
                    }
                }
                if let Some(e) = first_err.filter(|_| ok < n) {
                    let _ = result_tx
                        .send(Err(e.context(format!("{} of {n} sessions failed", n - ok))));
                } else {
                    let _ = result_tx.send(Ok((elapsed, ok)));
                }
                // Hold the sessions until the bench is done with them.
                let _ = tokio::task::spawn_blocking(move || rx.recv()).await;
            });
            Ok(())
        });
        r.and_then(|inner| inner)
    });
    let (elapsed, established) = result_rx
        .recv_timeout(Duration::from_secs(300))
        .context("the load generator did not report")??;
    let leases_per_s = f64::from(established) / elapsed;
    wait_for(
        "every session to hold a lease",
        Duration::from_secs(30),
        || Ok((t.leases()?.len() >= leases_before + established as usize).then_some(())),
    )?;
    std::thread::sleep(Duration::from_secs(1));
    let rss_after = rss_kib(pid)?;
    let per_session_kib = per_item(rss_before, rss_after, u64::from(established));

    // Phase 2: steady state, keepalives only.
    let cpu0 = cpu_seconds(pid)?;
    let w0 = Instant::now();
    std::thread::sleep(Duration::from_secs(u64::from(plan.steady_seconds)));
    let cpu_pct = (cpu_seconds(pid)? - cpu0) / w0.elapsed().as_secs_f64() * 100.0;
    if crate::profile::enabled() {
        crate::profile::run("keepalive steady state", || {
            std::thread::sleep(Duration::from_secs(u64::from(plan.steady_seconds)));
            Ok(())
        })?;
    }

    // Phase 3: churn of native bindings while the other client pings the internet host.
    let count = plan.churn_seconds * 100;
    let ping_ns = pinger.clone();
    let ping = std::thread::spawn(move || {
        ping_ns.output(&[
            "ping",
            "-n",
            "-q",
            "-i",
            "0.01",
            "-c",
            &count.to_string(),
            "-W",
            "1",
            "192.0.2.2",
        ])
    });
    let cycles = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let churn_secs = plan.churn_seconds;
    let first_failure: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    let (c2, f2, e2) = (cycles.clone(), failures.clone(), first_failure.clone());
    let churn_elapsed = t.server.enter(move || -> Result<f64> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(rt.block_on(async move {
            let started = Instant::now();
            let deadline = started + Duration::from_secs(u64::from(churn_secs));
            let next = Arc::new(AtomicU64::new(0));
            let workers = (0..CHURN_CONCURRENCY).map(|_| {
                let (next, c2, f2, e2) = (next.clone(), c2.clone(), f2.clone(), e2.clone());
                async move {
                    while Instant::now() < deadline {
                        let i = next.fetch_add(1, Ordering::Relaxed) as u32;
                        match churn_once(source(CHURN_NET, i)).await {
                            Ok(()) => c2.fetch_add(1, Ordering::Relaxed),
                            Err(e) => {
                                e2.lock().unwrap().get_or_insert_with(|| format!("{e:#}"));
                                f2.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                    }
                }
            });
            futures::future::join_all(workers).await;
            started.elapsed().as_secs_f64()
        }))
    })??;
    let ping_out = ping.join().map_err(|_| anyhow!("ping thread panicked"))??;
    let text = String::from_utf8_lossy(&ping_out.stdout);
    let received: u64 = text
        .split(", ")
        .find_map(|p| p.strip_suffix(" received"))
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| anyhow!("no ping summary in {text:?}"))?;
    let lost = u64::from(count) - received;
    let cycles = cycles.load(Ordering::Relaxed);
    // A cycle adds a lease and a binding and removes both when it closes.
    let changes_per_s = 2.0 * cycles as f64 / churn_elapsed;
    // Churned leases must all be gone again (bounded wait: the server notices closes).
    let settled = wait_for(
        "churned leases to be released",
        Duration::from_secs(30),
        || {
            let now = t.leases()?.len();
            Ok((now == leases_before + established as usize).then_some(now))
        },
    );
    let _ = tx.send(());
    let _ = generator.join();

    let failed = failures.load(Ordering::Relaxed);
    if failed > 0 {
        report.note(format!(
            "control plane: {failed} churn cycles failed, the first with: {}",
            first_failure.lock().unwrap().clone().unwrap_or_default()
        ));
    }
    let sec = "control";
    report.figure(
        sec,
        "sessions established",
        "sessions",
        vec![f64::from(established)],
    );
    let lps = report.figure(
        sec,
        "leases per second (sessions piling up)",
        "/s",
        vec![leases_per_s],
    );
    let kib = report.figure(
        sec,
        "server RSS per idle session",
        "KiB",
        vec![per_session_kib],
    );
    let cpu = report.figure(
        sec,
        "server CPU at steady state (keepalives)",
        "% of one core",
        vec![cpu_pct],
    );
    let cps = report.figure(
        sec,
        "binding churn (lease+bind, unbind+release)",
        "changes/s",
        vec![changes_per_s],
    );
    report.figure(sec, "churn cycles failed", "cycles", vec![failed as f64]);
    let loss = report.figure(
        sec,
        "pings lost by the unrelated native client during churn",
        "packets",
        vec![lost as f64],
    );
    report.figure(
        sec,
        "pings sent during churn",
        "packets",
        vec![f64::from(count)],
    );
    report.note(format!(
        "control plane: {established} sessions from distinct IPv6 sources; RSS {rss_before} KiB \
         idle → {rss_after} KiB loaded; pinging client {ping_lease}; leases after churn: {}.",
        match &settled {
            Ok(n) => format!("back to {n}"),
            Err(e) => format!("NOT back to the start ({e:#})"),
        }
    ));
    let scale = if plan.quick {
        " (quick: fewer sessions)"
    } else {
        ""
    };
    report.target(Target {
        name: format!("leases/s while establishing {established} sessions{scale}"),
        value: lps,
        unit: "/s",
        op: ">=",
        threshold: 5000.0,
        against: "absolute".into(),
    });
    report.target(Target {
        name: "server RSS per idle session".into(),
        value: kib,
        unit: "KiB",
        op: "<=",
        threshold: 8.0,
        against: "absolute".into(),
    });
    report.target(Target {
        name: "keepalive CPU at steady state".into(),
        value: cpu,
        unit: "% core",
        op: "<=",
        threshold: 5.0,
        against: "absolute".into(),
    });
    report.target(Target {
        name: "binding churn".into(),
        value: cps,
        unit: "/s",
        op: ">=",
        threshold: 1000.0,
        against: "absolute".into(),
    });
    report.target(Target {
        name: "pings lost during churn".into(),
        value: loss,
        unit: "pkts",
        op: "<=",
        threshold: 0.0,
        against: format!("{count} pings at 10 ms"),
    });
    Ok(())
}
