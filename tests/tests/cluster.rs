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
    loadgen::{Session, source},
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
    let mut c = Cluster::new(&[])?;
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
