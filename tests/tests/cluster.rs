//! Several concentrators, one pool, one PostgreSQL (issue 22): no address is ever leased
//! twice, clients fail over and keep their address, a store outage loses nothing, and the
//! lease history answers who held an address when. A real PostgreSQL from Debian's packages
//! (a throwaway cluster per test, see `tunnel_tests::postgres`).
use std::{
    collections::{BTreeMap, HashSet},
    net::Ipv4Addr,
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use tunnel_tests::{
    cluster::{CLIENT_NET, Cluster},
    loadgen::{Refused, Session, source},
    wait_for,
};

/// A small deterministic generator (xorshift64*): the same run every time.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> usize {
        (self.next() % n) as usize
    }
}

/// The address of a 101's text.
fn leased(text: &str) -> Result<Ipv4Addr> {
    text.split_whitespace()
        .next()
        .context("empty 101")?
        .parse()
        .with_context(|| format!("101 {text:?}"))
}

/// A connected raw client: its concentrator and address.
struct Held {
    node: usize,
    session: Session,
    addr: Ipv4Addr,
}

/// At one moment: no address is held by two clients, by both concentrators, or differently in
/// a table and the database; every connected client's lease is in its concentrator's table
/// and in the database as that concentrator's.
fn check_sample(c: &Cluster, held: &[Option<Held>]) -> Result<()> {
    let mut seen = HashSet::new();
    for h in held.iter().flatten() {
        ensure!(seen.insert(h.addr), "{} was leased to two clients", h.addr);
    }
    let tables = [c.table(0)?, c.table(1)?];
    let store = c.store()?;
    for addr in tables[0].keys() {
        ensure!(
            !tables[1].contains_key(addr),
            "{addr} is in both concentrators' lease tables: {:?} and {:?}",
            tables[0][addr],
            tables[1][addr]
        );
    }
    for (i, h) in held.iter().enumerate() {
        let Some(h) = h else { continue };
        let client = source(CLIENT_NET, i as u32).ip().to_string();
        let node = c.nodes[h.node].name;
        ensure!(
            tables[h.node].get(&h.addr) == Some(&client),
            "client {client}'s {} missing from {node}'s table {:?}",
            h.addr,
            tables[h.node]
        );
        ensure!(
            store.get(&h.addr) == Some(&(node.to_owned(), client.clone())),
            "the database has {:?} for {}, leased by {node} to {client}",
            store.get(&h.addr),
            h.addr
        );
    }
    Ok(())
}

/// Both lease tables are exactly the database's rows of their concentrator.
fn tables_agree(c: &Cluster) -> Result<Option<()>> {
    let store = c.store()?;
    for (i, node) in c.nodes.iter().enumerate() {
        let table = c.table(i)?;
        let rows: BTreeMap<Ipv4Addr, String> = store
            .iter()
            .filter(|(_, (n, _))| n == node.name)
            .map(|(a, (_, client))| (*a, client.clone()))
            .collect();
        if table != rows {
            return Ok(None);
        }
    }
    Ok(Some(()))
}

#[test]
fn two_concentrators_one_pool_never_lease_an_address_twice() -> Result<()> {
    const CLIENTS: usize = 60;
    const OPS: usize = 300;
    let mut c = Cluster::new(&[], false)?;
    c.start_node(0)?;
    c.start_node(1)?;
    let c = &c;
    let (connects, samples, moved) = c
        .cli
        .enter(|| -> Result<(usize, usize, usize)> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
                let mut held: Vec<Option<Held>> = (0..CLIENTS).map(|_| None).collect();
                let mut last_node: Vec<Option<(usize, Ipv4Addr)>> = vec![None; CLIENTS];
                let (mut connects, mut samples, mut moved) = (0, 0, 0);
                // Rounds of ten clients at once (connects race on both concentrators), a sample
                // after each.
                let mut op = 0;
                while op < OPS {
                    let mut picked: Vec<usize> = Vec::new();
                    while picked.len() < 10 {
                        let i = rng.below(CLIENTS as u64);
                        if !picked.contains(&i) {
                            picked.push(i);
                        }
                    }
                    let mut connecting = Vec::new();
                    for &i in &picked {
                        match held[i].take() {
                            Some(h) if rng.below(2) == 0 => h.session.close().await,
                            Some(h) => h.session.abort(),
                            None => {
                                let node = rng.below(2);
                                let from = source(CLIENT_NET, i as u32);
                                let listen = c.nodes[node].listen;
                                let name = c.nodes[node].name;
                                connecting.push(async move {
                                    let mut session = Session::connect(listen, from).await?;
                                    let text = session.lease().await.with_context(|| {
                                        format!("client {} on {name}", from.ip())
                                    })?;
                                    anyhow::Ok((i, node, session, leased(&text)?))
                                });
                            }
                        }
                    }
                    op += picked.len();
                    for r in futures::future::join_all(connecting).await {
                        let (i, node, session, addr) = r?;
                        // A client that comes back (to either) within --hold gets its address
                        // again.
                        if let Some((before, old)) = last_node[i] {
                            ensure!(
                                old == addr,
                                "client {} had {old}, got {addr} back",
                                source(CLIENT_NET, i as u32).ip()
                            );
                            moved += usize::from(before != node);
                        }
                        last_node[i] = Some((node, addr));
                        held[i] = Some(Held {
                            node,
                            session,
                            addr,
                        });
                        connects += 1;
                    }
                    check_sample(c, &held)?;
                    samples += 1;
                }
                check_sample(c, &held)?;
                wait_for(
                    "both lease tables to agree with the database",
                    Duration::from_secs(10),
                    || tables_agree(c),
                )?;
                Ok((connects, samples, moved))
            })
        })?
        .inspect_err(|_| c.dump_logs())?;
    eprintln!(
        "{connects} connects of {CLIENTS} clients, {moved} to the other concentrator than \
         last time; {samples} samples without a double lease"
    );
    ensure!(
        moved > 10,
        "too few clients moved between the concentrators ({moved})"
    );
    Ok(())
}

/// A raw client `i` (of [`CLIENT_NET`]) asks concentrator `node` for a lease and leaves:
/// Ok(address), or Err(the 110's text).
fn raw_lease(c: &Cluster, node: usize, i: u32) -> Result<std::result::Result<Ipv4Addr, String>> {
    c.cli.enter(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let mut s = Session::connect(c.nodes[node].listen, source(CLIENT_NET, i)).await?;
            let answer = match s.lease().await {
                Ok(text) => Ok(leased(&text)?),
                Err(e) => match e.downcast_ref::<Refused>() {
                    Some(r) => Err(r.0.clone()),
                    None => return Err(e),
                },
            };
            s.close().await;
            Ok(answer)
        })
    })?
}

const FAST_TIMERS: &[&str] = &["--keepalive", "2s", "--timeout", "10s"];

#[test]
fn a_lease_store_outage_refuses_new_leases_and_loses_none() -> Result<()> {
    const OUTAGE: Duration = Duration::from_secs(30);
    let mut c = Cluster::new(FAST_TIMERS, false)?;
    c.start_node(0)?;
    c.start_node(1)?;
    let ns1 = c.client_ns()?;
    let ns2 = c.client_ns()?;
    let (cl1, a1) = c.start_client(&ns1, &[0], FAST_TIMERS)?;
    let (cl2, a2) = c.start_client(&ns2, &[1], FAST_TIMERS)?;
    ensure!(a1 != a2, "two clients got {a1}");
    let result = (|| -> Result<()> {
        c.pg.stop()?;
        let stopped = std::time::Instant::now();
        // A new client is told why it gets nothing.
        match raw_lease(&c, 0, 1)? {
            Err(text) => ensure!(
                text.contains("lease store unavailable"),
                "110 during the outage: {text:?}"
            ),
            Ok(addr) => anyhow::bail!("a client got {addr} while the lease store was down"),
        }
        // Established clients keep pinging for the whole outage (each round ~2 s).
        let mut rounds = 0;
        while stopped.elapsed() < OUTAGE {
            for (ns, who) in [(&ns1, &cl1), (&ns2, &cl2)] {
                let got = ns.ping(tunnel_tests::cluster::GATEWAY, 3)?;
                ensure!(
                    got == 3,
                    "{who}: {got} of 3 pings answered {:?} into the outage",
                    stopped.elapsed()
                );
            }
            rounds += 1;
        }
        c.pg.run()?;
        // New clients get leases again, none of the two held before the outage.
        let a3 = wait_for(
            "a new client to get a lease once the store is back",
            Duration::from_secs(15),
            || Ok(raw_lease(&c, 1, 2)?.ok()),
        )?;
        ensure!(
            a3.to_string() != a1 && a3.to_string() != a2,
            "the new client got {a3}, already held (a1 {a1}, a2 {a2})"
        );
        // Nothing was lost: both clients kept their lease throughout, and both tables agree
        // with the database (their rows renewed, not expired or taken).
        for (who, addr) in [(&cl1, &a1), (&cl2, &a2)] {
            let status = c.lab.ctl_json("status", who)?;
            ensure!(
                status["state"] == "connected" && status["ipv4"] == addr.as_str(),
                "{who} after the outage: {status}"
            );
            ensure!(
                tunnel_tests::counter(&c.lab.ctl_json("stats", who)?, "disconnects") == 0,
                "{who} was disconnected"
            );
        }
        wait_for(
            "both lease tables to agree with the database",
            Duration::from_secs(10),
            || tables_agree(&c),
        )?;
        let stats = c.lab.ctl_json("stats", &c.nodes[0].instance)?;
        ensure!(
            tunnel_tests::counter(&stats, "lease_store_unavailable") >= 1,
            "the refusal was not counted: {stats}"
        );
        // The outage is logged once, and its end.
        let log = c.lab.daemon_log(&c.nodes[0].instance).unwrap_or_default();
        let went = log.matches("native forwarding go on").count();
        ensure!(went == 1, "the outage was logged {went} times:\n{log}");
        ensure!(
            log.contains("is back after"),
            "its end was not logged:\n{log}"
        );
        eprintln!(
            "{rounds} ping rounds of both clients during the {OUTAGE:?} outage; new lease {a3}"
        );
        Ok(())
    })();
    result.inspect_err(|_| c.dump_logs())
}

/// `leases --history --ipv4 A --at T` of `instance`: the clients named.
fn history(
    c: &Cluster,
    instance: &str,
    addr: Ipv4Addr,
    at: &str,
) -> Result<Vec<serde_json::Value>> {
    let out = c.lab.ctl(&[
        "leases",
        "--history",
        "--ipv4",
        &addr.to_string(),
        "--at",
        at,
        "--json",
        "--instance",
        instance,
    ])?;
    let v: serde_json::Value = serde_json::from_str(&out).with_context(|| out.clone())?;
    v.as_array().cloned().context("a list")
}

/// A client holds an address for a while and leaves; the history names it for a moment in
/// that while, asked of `ask` (another concentrator, with the shared store).
fn history_names_the_client(c: &Cluster, on: usize, ask: usize, i: u32) -> Result<()> {
    let client = source(CLIENT_NET, i).ip().to_string();
    let (addr, during) = c.cli.enter(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let mut s = Session::connect(c.nodes[on].listen, source(CLIENT_NET, i)).await?;
            let addr = leased(&s.lease().await?)?;
            // A moment while it holds the address, after the lease began.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let during = std::time::SystemTime::now();
            tokio::time::sleep(Duration::from_millis(300)).await;
            s.close().await;
            anyhow::Ok((addr, during))
        })
    })??;
    wait_for("the lease to end", Duration::from_secs(5), || {
        Ok((!c.table(on)?.contains_key(&addr)).then_some(()))
    })?;
    let at = humantime::format_rfc3339_micros(during).to_string();
    let ask_instance = &c.nodes[ask].instance;
    let rows = wait_for(
        "the history to name the client",
        Duration::from_secs(5),
        || {
            let rows = history(c, ask_instance, addr, &at)?;
            Ok(rows.iter().any(|r| r["end"].is_string()).then_some(rows))
        },
    )?;
    ensure!(rows.len() == 1, "{addr} at {at}: {rows:?}");
    ensure!(
        rows[0]["client"] == client.as_str() && rows[0]["node"] == c.nodes[on].name,
        "{addr} at {at}: {rows:?}, want {client} on {}",
        c.nodes[on].name
    );
    // Before the lease nobody held it.
    let before = humantime::format_rfc3339_micros(during - Duration::from_secs(3600)).to_string();
    let rows = history(c, ask_instance, addr, &before)?;
    ensure!(rows.is_empty(), "{addr} an hour earlier: {rows:?}");
    Ok(())
}

#[test]
fn the_lease_history_names_who_held_an_address_with_either_store() -> Result<()> {
    let mut c = Cluster::new(&[], false)?;
    c.start_node(0)?;
    c.start_node(1)?;
    // PostgreSQL: held on A, asked of B.
    history_names_the_client(&c, 0, 1, 5).inspect_err(|_| c.dump_logs())?;
    // The file store (one machine): A again, with the history file in its state directory.
    c.restart_with_file_store(0)?;
    history_names_the_client(&c, 0, 0, 6).inspect_err(|_| c.dump_logs())?;
    Ok(())
}

#[test]
fn clients_of_a_killed_concentrator_fail_over_with_their_address() -> Result<()> {
    use tunnel_tests::cluster::INTERNET_HOST;
    // --timeout 10s: a client must pass traffic again within 15 s of the kill.
    const AGAIN: Duration = Duration::from_secs(15);
    let mut c = Cluster::new(FAST_TIMERS, true)?;
    c.start_node(0)?;
    c.start_node(1)?;
    let client_args = [
        "--keepalive",
        "2s",
        "--timeout",
        "10s",
        "--max-backoff",
        "1s",
    ];
    let ns1 = c.client_ns()?;
    let ns2 = c.client_ns()?;
    let (inband, a1) = c.start_client(&ns1, &[0, 1], &client_args)?;
    let mut native_args = vec!["--mode", "native", "--v6-dev", "v6"];
    native_args.extend(client_args);
    let (native, a2) = c.start_client(&ns2, &[0, 1], &native_args)?;
    let result = (|| -> Result<()> {
        let clients = [(&inband, &ns1, &a1), (&native, &ns2, &a2)];
        for (who, ns, _) in clients {
            ensure!(ns.ping(INTERNET_HOST, 3)? == 3, "{who} before the kill");
        }
        let status = c.lab.ctl_json("status", &native)?;
        ensure!(
            status["native"]["configured"]["ipv4"] == a2.as_str(),
            "the native client is not native: {status}"
        );
        c.kill_node(0)?;
        let killed = std::time::Instant::now();
        // The operator's routing: A's announcement of the pool is gone, B's remains.
        c.route_pool_to(1)?;
        for (who, ns, addr) in clients {
            let left = AGAIN.saturating_sub(killed.elapsed());
            let got = c.wait_connected(who, Some(1), left)?;
            ensure!(got == *addr, "{who} had {addr}, got {got} from B");
            let left = AGAIN.saturating_sub(killed.elapsed());
            wait_for(&format!("{who}'s traffic through B"), left, || {
                Ok((ns.ping(INTERNET_HOST, 1)? == 1).then_some(()))
            })?;
        }
        let took = killed.elapsed();
        let table = c.table(1)?;
        for (who, _, addr) in clients {
            ensure!(
                table.contains_key(&addr.parse()?),
                "{who}'s {addr} not in B's table {table:?}"
            );
        }
        let status = c.lab.ctl_json("status", &native)?;
        ensure!(
            status["native"]["configured"]["server_tunnel"] == "2001:db8:200::4",
            "the native client does not send to B: {status}"
        );
        // A starts again: it re-adopts nothing that B holds (its pinned bindings for those
        // addresses go) and serves new clients.
        c.start_node(0)?;
        let table = c.table(0)?;
        ensure!(table.is_empty(), "A re-adopted {table:?}");
        let status = c.lab.ctl_json("status", &c.nodes[0].instance)?;
        ensure!(
            status["native"]["bindings_v4"] == 0,
            "A kept bindings of B's leases: {status}"
        );
        let a3 = raw_lease(&c, 0, 9)?.map_err(anyhow::Error::msg)?;
        ensure!(
            a3.to_string() != a1 && a3.to_string() != a2,
            "A gave {a3}, which B holds"
        );
        for (who, ns, _) in clients {
            ensure!(ns.ping(INTERNET_HOST, 3)? == 3, "{who} after A's return");
        }
        eprintln!(
            "both clients passed traffic through B {took:?} after A's SIGKILL; A's new client got {a3}"
        );
        Ok(())
    })();
    result.inspect_err(|_| c.dump_logs())
}

#[test]
fn with_client_key_prefix64_a_client_back_from_its_64_gets_its_address() -> Result<()> {
    let mut c = Cluster::new(&["--client-key", "prefix64"], false)?;
    c.start_node(0)?;
    c.start_node(1)?;
    let result = (|| -> Result<()> {
        // Client c::1 leases on A and leaves; c::2 (the same /64) asks B: the same address.
        let a = raw_lease(&c, 0, 0)?.map_err(anyhow::Error::msg)?;
        wait_for("the lease to end", Duration::from_secs(5), || {
            Ok((!c.table(0)?.contains_key(&a)).then_some(()))
        })?;
        let b = raw_lease(&c, 1, 1)?.map_err(anyhow::Error::msg)?;
        ensure!(a == b, "the /64 had {a}, got {b}");
        Ok(())
    })();
    result.inspect_err(|_| c.dump_logs())
}
