//! The shared lease store (issue 22): leases per second while sessions pile up on two
//! concentrators that share one PostgreSQL (a throwaway cluster, as in the tests), next to
//! one concentrator with the lease file, in the same run and lab.
//!
//! Addresses: as in `control`, the pool continues in 198.18.0.0/15 (RFC 2544's benchmarking
//! block) for bookkeeping only: no packet is sent to those leases.
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use futures::StreamExt as _;
use tunnel_tests::{
    cluster::{CLIENT_NET, Cluster},
    loadgen::{Session, source},
    wait_for,
};

use crate::{
    Plan,
    report::{Report, Target},
};

const CONNECT_CONCURRENCY: usize = 256;
const POOL: &[&str] = &["198.51.100.1-198.51.100.64", "198.18.0.1-198.18.63.254"];

/// `n` sessions from distinct sources, spread over `nodes` round robin, `CONCURRENCY` in
/// flight; each holds its lease until all are in. Returns leases per second.
fn pile_up(c: &Cluster, nodes: &[usize], n: u32) -> Result<f64> {
    let listens: Vec<_> = nodes.iter().map(|&i| c.nodes[i].listen).collect();
    // Neighbours resolved first: a burst of SYNs to an unresolved neighbour loses all but
    // a few (the kernel queues three per neighbour), and their retransmits a second later
    // would be what the figure measures.
    for l in &listens {
        c.cli.ping(&l.ip().to_string(), 1)?;
    }
    c.cli.enter(|| -> Result<f64> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let started = Instant::now();
            let sessions: Vec<Result<Session>> = futures::stream::iter(0..n)
                .map(|i| {
                    let to = listens[i as usize % listens.len()];
                    async move {
                        let mut s = Session::connect(to, source(CLIENT_NET, i)).await?;
                        s.lease().await?;
                        anyhow::Ok(s)
                    }
                })
                .buffer_unordered(CONNECT_CONCURRENCY)
                .collect()
                .await;
            let elapsed = started.elapsed().as_secs_f64();
            let mut ok = Vec::with_capacity(sessions.len());
            for s in sessions {
                ok.push(s.with_context(|| format!("of {n} sessions"))?);
            }
            for s in ok {
                s.abort();
            }
            Ok(f64::from(n) / elapsed)
        })
    })?
}

/// Waits until no concentrator holds a lease (the piled-up sessions were reset).
fn drained(c: &Cluster, nodes: &[usize]) -> Result<()> {
    wait_for("the leases to be released", Duration::from_secs(60), || {
        for &i in nodes {
            if !c.table(i)?.is_empty() {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })
}

pub fn run(plan: &Plan, report: &mut Report) -> Result<()> {
    tunnel_tests::raise_nofile(u64::from(plan.sessions) + 4096)?;
    let max = (plan.sessions + 1_000).to_string();
    let n = plan.sessions;
    let mut c = Cluster::with_pool(&["--max-sessions", &max], false, POOL)?;
    c.start_node(0)?;
    c.start_node(1)?;
    let pg = pile_up(&c, &[0, 1], n).context("PostgreSQL store")?;
    drained(&c, &[0, 1])?;
    let double = c.pg.query(
        "SELECT count(*) FROM (SELECT ipv4 FROM tunnel_lease_history h1 WHERE EXISTS \
         (SELECT 1 FROM tunnel_lease_history h2 WHERE h2.ipv4 = h1.ipv4 AND h2.id <> h1.id \
          AND h2.started < coalesce(h1.ended, 'infinity') \
          AND h1.started < coalesce(h2.ended, 'infinity'))) AS o",
    )?;
    ensure!(
        double.trim() == "0",
        "leases overlapped in the history: {double}"
    );
    // The file store: concentrator A alone.
    c.stop_node(1)?;
    c.restart_with_file_store(0)?;
    let file = pile_up(&c, &[0], n).context("file store")?;

    let sec = "store";
    let pg = report.figure(
        sec,
        format!("leases/s, PostgreSQL store, {n} sessions across two concentrators"),
        "/s",
        vec![pg],
    );
    report.figure(
        sec,
        format!("leases/s, file store, {n} sessions on one concentrator"),
        "/s",
        vec![file],
    );
    report.note(format!(
        "lease store: {CONNECT_CONCURRENCY} connects in flight; each PostgreSQL lease is one \
         round trip (tunnel_claim) on the concentrator's one connection, over a unix socket \
         to a local cluster (fsync off, as a throwaway cluster); no lease overlapped another \
         in the history."
    ));
    let scale = if plan.quick {
        " (quick: fewer sessions)"
    } else {
        ""
    };
    report.target(Target {
        name: format!(
            "leases/s with the PostgreSQL store, {n} sessions on two concentrators{scale}"
        ),
        value: pg,
        unit: "/s",
        op: ">=",
        threshold: 2000.0,
        against: "absolute".into(),
    });
    Ok(())
}
