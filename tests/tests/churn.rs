//! Churn without leaks and fault injection (issue: hardening).
//!
//! - Thousands of connect → lease → disconnect cycles, in-band and native, with IPv6 leases,
//!   some reset mid-handshake: afterwards the server's lease table, every pinned BPF map, its
//!   open file descriptors, its routes and proxy-NDP entries are back to where they started.
//! - The server SIGKILLed and restarted over and over under a mixed in-band/native load: no
//!   address is ever leased to two clients, the native fast path keeps forwarding while the
//!   controller is down, and every client gets its own address back.
//!
//! CI runs 10,000 cycles and 20 restarts; `cargo xtask test --long` runs 100,000 and 100.
//! Topology and addresses: `tunnel_tests::fourover6`.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, ensure};
use aya::maps::{MapData, MapInfo};
use tokio::runtime::Runtime;
use tunnel_common::names;
use tunnel_tests::{
    Ns, counter,
    fourover6::{FourOverSix, INTERNET_HOST, SERVER, server_args},
    loadgen::{self, IPV6_REPLY, IPV6_REQUEST, NATIVE_REPLY, NATIVE_REQUEST, Session},
    long_runs, raise_nofile, wait_for,
};

const PIN_ROOT: &str = tunnel_ctl::instance::PIN_ROOT;
/// The load generator's sources: this /64 is routed to its namespace.
const LOAD_NET: &str = "2001:db8:1:1::";
/// IPv6 leases come from here, proxied on the server's upstream link (one proxy entry and
/// one /128 route per lease).
const POOL6: &str = "2001:db8:ff::100:0/112";

/// A native-capable server (see [`FourOverSix::start_native`]) with the test pool and `extra`.
/// A native server whose load, all from one /64, is not held to the per-prefix lease limit.
fn start(extra: &[&str]) -> Result<FourOverSix> {
    let mut args = server_args(&["--max-leases-per-prefix", "0"]);
    args.extend_from_slice(extra);
    FourOverSix::start_native(&args)
}

/// Entries of a pinned BPF map, counted with BPF_MAP_GET_NEXT_KEY (any map type).
fn map_entries(path: &Path) -> Result<usize> {
    let info = MapInfo::from_pin(path).with_context(|| format!("{}", path.display()))?;
    let data = MapData::from_pin(path).with_context(|| format!("{}", path.display()))?;
    let fd = data.fd().as_fd().as_raw_fd();
    let key_size = info.key_size() as usize;
    let (mut key, mut next) = (vec![0u8; key_size], vec![0u8; key_size]);
    #[repr(C)]
    struct Attr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        next_key: u64,
        flags: u64,
    }
    let mut count = 0usize;
    loop {
        let attr = Attr {
            map_fd: fd as u32,
            _pad: 0,
            key: if count == 0 { 0 } else { key.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
            flags: 0,
        };
        // SAFETY: BPF_MAP_GET_NEXT_KEY reads `key_size` bytes at `key` (or none when null) and
        // writes `key_size` bytes at `next_key`; both buffers are that long and outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                4, // BPF_MAP_GET_NEXT_KEY
                &attr as *const Attr,
                std::mem::size_of::<Attr>(),
            )
        };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENOENT) {
                return Ok(count);
            }
            return Err(err).with_context(|| format!("iterating {}", path.display()));
        }
        count += 1;
        ensure!(
            count <= info.max_entries() as usize,
            "{} yields more keys than it can hold",
            path.display()
        );
        std::mem::swap(&mut key, &mut next);
    }
}

/// Everything a session can leave behind on the server, counted.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Footprint {
    /// Rows of `leases --json`.
    leases: usize,
    /// `status`: sessions and IPv6 leases.
    sessions: u64,
    leases6: u64,
    /// Entries of every map the server pinned, by name.
    maps: BTreeMap<&'static str, usize>,
    /// Open file descriptors of the server process.
    fds: usize,
    /// `ip -4 / -6 route show table all` and `ip -6 neigh show proxy` in the server's namespace.
    routes4: usize,
    routes6: usize,
    proxy_ndp: usize,
}

impl Footprint {
    fn take(t: &FourOverSix) -> Result<Footprint> {
        // The fds first: the management calls below open (and then close) a connection.
        let pid = t
            .lab
            .spawn_daemon_pid(&t.server_instance)
            .ok_or_else(|| anyhow!("no server daemon"))?;
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
        let status = t.lab.ctl_json("status", &t.server_instance)?;
        let dir = Path::new(PIN_ROOT).join(&t.server_instance);
        let mut maps = BTreeMap::new();
        for name in names::ALL_MAPS {
            let pin = dir.join(name);
            if pin.exists() {
                maps.insert(*name, map_entries(&pin)?);
            }
        }
        ensure!(
            maps.contains_key(names::BIND_BY_V4) && maps.contains_key(names::BIND_BY_V6),
            "the server pinned no binding maps in {}: {maps:?}",
            dir.display()
        );
        // Link-local routes and addresses (fe80::) are the kernel's, added when it
        // autoconfigures an interface (the TUN's can come seconds after start-up); the
        // server adds none, so they are not part of its footprint.
        let lines = |args: &str| -> Result<usize> {
            Ok(t.server
                .ip(args)?
                .lines()
                .filter(|l| !l.split_whitespace().take(2).any(|w| w.starts_with("fe80:")))
                .count())
        };
        Ok(Footprint {
            leases: t.leases()?.len(),
            sessions: status["sessions"]
                .as_u64()
                .ok_or_else(|| anyhow!("status has no sessions count: {status}"))?,
            leases6: status["ipv6"]["leases6"]
                .as_u64()
                .ok_or_else(|| anyhow!("status has no ipv6.leases6 count: {status}"))?,
            maps,
            fds,
            routes4: lines("-4 route show table all")?,
            routes6: lines("-6 route show table all")?,
            proxy_ndp: lines("-6 neigh show proxy")?,
        })
    }

    /// A footprint that two snapshots 200 ms apart agree on (a management connection that
    /// is still closing must not become the baseline).
    fn stable(t: &FourOverSix) -> Result<Footprint> {
        let mut last = Footprint::take(t)?;
        wait_for("a stable footprint", Duration::from_secs(10), || {
            std::thread::sleep(Duration::from_millis(200));
            let now = Footprint::take(t)?;
            let same = now == last;
            last = now.clone();
            Ok(same.then_some(now))
        })
    }

    fn bindings(&self) -> usize {
        self.maps[names::BIND_BY_V4]
    }
}

/// Waits (bounded) for the server's footprint to equal `want`; the error shows the last one.
fn settle(t: &FourOverSix, want: &Footprint, limit: Duration) -> Result<()> {
    let mut last = None;
    let r = wait_for("the server's footprint to settle", limit, || {
        let now = Footprint::take(t)?;
        let same = now == *want;
        last = Some(now);
        Ok(same.then_some(()))
    });
    r.map_err(|e| {
        let routes = t.server.ip("-6 route show table all").unwrap_or_default();
        let proxies = t.server.ip("-6 neigh show proxy").unwrap_or_default();
        anyhow!(
            "{e:#}\n  wanted {want:?}\n  last   {last:?}\nIPv6 routes:\n{routes}proxy entries:\n{proxies}"
        )
    })
}

/// How a churn cycle ends.
#[derive(Debug, Clone, Copy)]
enum Cycle {
    /// 100 → 101, FIN.
    InbandClose,
    /// 100 → 101, reset.
    InbandReset,
    /// 100 → 101, 105 → 106, FIN.
    NativeClose,
    /// 100 → 101, 105 → 106, reset.
    NativeReset,
    /// 100 → 101, 107 → 108, FIN.
    Ipv6Close,
    /// 100 and 105 sent back to back, reset before any answer (killed mid-handshake).
    KilledEarly,
}

const CYCLES: [Cycle; 6] = [
    Cycle::InbandClose,
    Cycle::InbandReset,
    Cycle::NativeClose,
    Cycle::NativeReset,
    Cycle::Ipv6Close,
    Cycle::KilledEarly,
];

/// Runs one cycle from `from`.
async fn cycle(kind: Cycle, from: SocketAddr) -> Result<()> {
    let mut s = Session::connect(SERVER.parse()?, from).await?;
    if let Cycle::KilledEarly = kind {
        s.send(100, &[]).await?;
        s.send(NATIVE_REQUEST, &[]).await?;
        s.abort();
        return Ok(());
    }
    let lease = s.lease().await?;
    ensure!(lease.starts_with("198.51.100."), "101 {lease:?}");
    match kind {
        Cycle::NativeClose | Cycle::NativeReset => {
            s.send(NATIVE_REQUEST, &[]).await?;
            let grant = s.expect(NATIVE_REPLY).await?;
            ensure!(grant.starts_with("2001:db8:100::4 "), "106 {grant:?}");
        }
        Cycle::Ipv6Close => {
            s.send(IPV6_REQUEST, &[]).await?;
            let v6 = s.expect(IPV6_REPLY).await?;
            ensure!(v6.starts_with("2001:db8:ff::100:"), "108 {v6:?}");
        }
        _ => {}
    }
    match kind {
        Cycle::InbandReset | Cycle::NativeReset => s.abort(),
        _ => s.close().await,
    }
    Ok(())
}

#[derive(Default)]
struct Tally {
    done: AtomicU64,
    failed: AtomicU64,
    first_failure: Mutex<Option<String>>,
}

fn runtime() -> Result<Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// `n` cycles from distinct sources, `concurrency` at a time, in `ns`.
fn churn(rt: &Runtime, ns: &Ns, n: u32, concurrency: usize) -> Result<Arc<Tally>> {
    let tally = Arc::new(Tally::default());
    let t2 = tally.clone();
    ns.enter(move || -> Result<()> {
        let net: Ipv6Addr = LOAD_NET.parse()?;
        rt.block_on(async move {
            let next = Arc::new(AtomicU64::new(0));
            let workers = (0..concurrency).map(|_| {
                let (next, tally) = (next.clone(), t2.clone());
                async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed) as u32;
                        if i >= n {
                            return;
                        }
                        let kind = CYCLES[i as usize % CYCLES.len()];
                        let r = tokio::time::timeout(
                            Duration::from_secs(30),
                            cycle(kind, loadgen::source(net, i)),
                        )
                        .await
                        .unwrap_or_else(|_| Err(anyhow!("cycle took over 30 s")));
                        match r {
                            Ok(()) => tally.done.fetch_add(1, Ordering::Relaxed),
                            Err(e) => {
                                let mut first = tally.first_failure.lock().unwrap();
                                first.get_or_insert_with(|| format!("cycle {i} ({kind:?}): {e:#}"));
                                tally.failed.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                    }
                }
            });
            futures::future::join_all(workers).await;
        });
        Ok(())
    })??;
    Ok(tally)
}

#[test]
fn churn_of_inband_and_native_sessions_leaves_nothing_behind() -> Result<()> {
    let cycles: u32 = if long_runs() { 100_000 } else { 10_000 };
    raise_nofile(4_096)?;
    let mut t = start(&["--pool6", POOL6, "--proxy-ndp", "up6"])?;
    let load = t.sources_ns(LOAD_NET)?;
    // A real native client that stays through it all.
    let pinger = t.client_ns()?;
    let (_, kept) = t.start_native_client(&pinger, &[])?;
    let start = Footprint::stable(&t)?;
    ensure!(start.leases == 1 && start.bindings() == 1, "{start:?}");

    let rt = runtime()?;
    let began = Instant::now();
    let tally = churn(&rt, &load, cycles, 32)?;
    let took = began.elapsed();
    let (done, failed) = (
        tally.done.load(Ordering::Relaxed),
        tally.failed.load(Ordering::Relaxed),
    );
    eprintln!(
        "{done} churn cycles in {took:.1?} ({:.0}/s), {failed} failed",
        f64::from(cycles) / took.as_secs_f64()
    );
    ensure!(
        failed == 0,
        "{failed} of {cycles} cycles failed; the first: {}",
        tally
            .first_failure
            .lock()
            .unwrap()
            .clone()
            .unwrap_or_default()
    );
    settle(&t, &start, Duration::from_secs(30))?;
    let stats = t.server_stats()?;
    let granted = counter(&stats, "leases_granted");
    let full = u64::from(cycles) - u64::from(cycles) / CYCLES.len() as u64;
    ensure!(
        granted > full,
        "leases_granted {granted}: fewer than the {full} completed cycles"
    );

    // The counts do see sessions: hold a few of each kind, then drop them.
    let held = load.enter(|| -> Result<Vec<Session>> {
        let net: Ipv6Addr = LOAD_NET.parse()?;
        rt.block_on(async {
            let mut held = Vec::new();
            for i in 0..8u32 {
                let mut s =
                    Session::connect(SERVER.parse()?, loadgen::source(net, 50_000 + i)).await?;
                s.lease().await?;
                let (ask, answer) = if i.is_multiple_of(2) {
                    (NATIVE_REQUEST, NATIVE_REPLY)
                } else {
                    (IPV6_REQUEST, IPV6_REPLY)
                };
                s.send(ask, &[]).await?;
                s.expect(answer).await?;
                held.push(s);
            }
            Ok(held)
        })
    })??;
    let loaded = Footprint::take(&t)?;
    ensure!(
        loaded.leases == start.leases + 8
            && loaded.bindings() == start.bindings() + 4
            && loaded.leases6 == start.leases6 + 4
            && loaded.proxy_ndp == start.proxy_ndp + 4
            && loaded.routes6 == start.routes6 + 4
            && loaded.fds > start.fds,
        "8 held sessions (4 native, 4 with IPv6) are not all counted:\n  start  {start:?}\n  loaded {loaded:?}"
    );
    rt.block_on(async {
        for s in held {
            s.abort();
        }
    });
    settle(&t, &start, Duration::from_secs(30))?;
    ensure!(
        pinger.ping(INTERNET_HOST, 3)? == 3,
        "the client that stayed ({kept}) lost its path"
    );
    Ok(())
}

/// What the background load saw across the restarts.
#[derive(Default)]
struct Load {
    /// Every address the load generator was granted, with how often.
    granted: Mutex<HashMap<Ipv4Addr, u32>>,
    leases: AtomicU64,
    /// Connects refused, sessions cut by the SIGKILL, 110 for an exhausted pool: expected.
    failed: AtomicU64,
    stop: std::sync::atomic::AtomicBool,
}

/// Until `load.stop`: lease (half of them native too) and disconnect, from ever new sources,
/// four at a time.
fn background_load(rt: &Runtime, ns: &Ns, load: &Load) -> Result<()> {
    ns.enter(|| -> Result<()> {
        let net: Ipv6Addr = LOAD_NET.parse()?;
        rt.block_on(async {
            let next = AtomicU64::new(0);
            let worker = || async {
                while !load.stop.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed) as u32;
                    let r = async {
                        let mut s =
                            Session::connect(SERVER.parse()?, loadgen::source(net, i)).await?;
                        let text = s.lease().await?;
                        let addr: Ipv4Addr = text
                            .split_whitespace()
                            .next()
                            .unwrap_or_default()
                            .parse()
                            .with_context(|| format!("101 {text:?}"))?;
                        *load.granted.lock().unwrap().entry(addr).or_default() += 1;
                        load.leases.fetch_add(1, Ordering::Relaxed);
                        if i.is_multiple_of(2) {
                            s.send(NATIVE_REQUEST, &[]).await?;
                            s.expect(NATIVE_REPLY).await?;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        if i.is_multiple_of(3) {
                            s.abort()
                        } else {
                            s.close().await
                        }
                        anyhow::Ok(())
                    };
                    if r.await.is_err() {
                        load.failed.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            };
            futures::future::join4(worker(), worker(), worker(), worker()).await;
        });
        Ok(())
    })?
}

/// (address, client) of every row of `leases --json`; fails on an address or a client that
/// appears twice.
fn lease_rows(t: &FourOverSix) -> Result<Vec<(String, String, bool)>> {
    let rows: Vec<(String, String, bool)> = t
        .leases()?
        .iter()
        .map(|l| {
            (
                l["ipv4"].as_str().unwrap_or_default().to_owned(),
                l["client"].as_str().unwrap_or_default().to_owned(),
                !l["session"].is_null(),
            )
        })
        .collect();
    let addrs: HashSet<&String> = rows.iter().map(|r| &r.0).collect();
    let clients: HashSet<&String> = rows.iter().map(|r| &r.1).collect();
    ensure!(
        addrs.len() == rows.len() && clients.len() == rows.len(),
        "an address or a client appears twice in the lease table: {rows:?}"
    );
    Ok(rows)
}

#[test]
fn server_sigkilled_and_restarted_again_and_again_under_load_never_double_leases() -> Result<()> {
    let rounds: u32 = if long_runs() { 100 } else { 20 };
    raise_nofile(4_096)?;
    let mut t = start(&[
        // A restored lease waits this long for its client: the load's leases cut by each
        // SIGKILL would otherwise fill the pool within a few dozen rounds.
        "--keepalive",
        "1s",
        "--timeout",
        "5s",
    ])?;
    let load_ns = t.sources_ns(LOAD_NET)?;
    // Two native and two in-band clients; reconnect at most 1 s after losing the server.
    let quick = [
        "--max-backoff",
        "1s",
        "--keepalive",
        "1s",
        "--timeout",
        "5s",
    ];
    let mut clients = Vec::new();
    for native in [true, false, true, false] {
        let (ns, ipv6) = t.client_ns_addr()?;
        let ipv6 = ipv6.to_string();
        let (instance, addr) = if native {
            t.start_native_client(&ns, &quick)?
        } else {
            t.start_client(&ns, &quick)?
        };
        clients.push((ns, instance, addr, ipv6, native));
    }
    let theirs: HashSet<Ipv4Addr> = clients
        .iter()
        .map(|c| c.2.parse())
        .collect::<Result<_, _>>()?;
    ensure!(theirs.len() == 4, "clients share addresses: {theirs:?}");
    // The server saves leases within ~100 ms of a change; a SIGKILL before that loses the
    // newest. The rounds start once all four are in the file.
    let state_file = t.lab.ctl_json("status", &t.server_instance)?["state_file"]
        .as_str()
        .ok_or_else(|| anyhow!("status has no state_file"))?
        .to_owned();
    wait_for(
        "the clients' leases to be saved",
        Duration::from_secs(5),
        || {
            let saved = std::fs::read_to_string(&state_file).unwrap_or_default();
            Ok(theirs
                .iter()
                .all(|a| saved.contains(&format!("\"{a}\"")))
                .then_some(()))
        },
    )?;

    let rt = runtime()?;
    let load = Load::default();
    let outcome = std::thread::scope(|s| -> Result<()> {
        let generator = s.spawn(|| background_load(&rt, &load_ns, &load));
        let restarts = (|| -> Result<()> {
            for round in 1..=rounds {
                let before = load.leases.load(Ordering::Relaxed);
                wait_for("the load to get leases", Duration::from_secs(10), || {
                    Ok((load.leases.load(Ordering::Relaxed) >= before + 4).then_some(()))
                })
                .with_context(|| format!("round {round}"))?;
                let instance = t.server_instance.clone();
                t.lab.daemon(&instance).expect("server").kill();
                // The controller is gone; the native clients' packets still get through.
                for (ns, instance, addr, _, native) in &clients {
                    if *native {
                        let (got, out) = ns.ping_with(&[], INTERNET_HOST, 3)?;
                        ensure!(
                            got == Some(3),
                            "round {round}: native client {instance} ({addr}) got {got:?}/3 \
                             replies while the server was down:\n{out}"
                        );
                    }
                }
                t.start_server()?;
                for (_, instance, addr, ipv6, _) in &clients {
                    let again = t
                        .wait_connected(instance, Duration::from_secs(15))
                        .with_context(|| format!("round {round}: {instance} did not reconnect"))?;
                    ensure!(
                        again == *addr,
                        "round {round}: {instance} came back with {again}, not {addr}"
                    );
                    wait_for(
                        "the lease to be held by the client's new session",
                        Duration::from_secs(10),
                        || {
                            let rows = lease_rows(&t)?;
                            Ok(rows
                                .iter()
                                .any(|r| r.0 == *addr && r.1 == *ipv6 && r.2)
                                .then_some(()))
                        },
                    )
                    .with_context(|| format!("round {round}: {instance}"))?;
                }
                let stolen: Vec<Ipv4Addr> = load
                    .granted
                    .lock()
                    .unwrap()
                    .keys()
                    .filter(|a| theirs.contains(a))
                    .copied()
                    .collect();
                ensure!(
                    stolen.is_empty(),
                    "round {round}: the load was granted a client's address: {stolen:?}"
                );
            }
            Ok(())
        })();
        load.stop.store(true, Ordering::Relaxed);
        let generated = generator
            .join()
            .map_err(|_| anyhow!("load generator panicked"))?;
        restarts?;
        generated
    });
    outcome?;
    let leases = load.leases.load(Ordering::Relaxed);
    let failed = load.failed.load(Ordering::Relaxed);
    let distinct = load.granted.lock().unwrap().len();
    eprintln!(
        "{rounds} SIGKILL + restart rounds: the load got {leases} leases ({distinct} distinct \
         addresses), {failed} attempts failed or were cut"
    );
    for (ns, instance, addr, _, _) in &clients {
        ensure!(
            ns.ping(INTERNET_HOST, 2)? == 2,
            "{instance} ({addr}) cannot reach the internet after the restarts"
        );
    }
    lease_rows(&t)?;
    Ok(())
}
