//! The PostgreSQL lease store (`--lease-store postgres://...`): several concentrators share one
//! pool through one database, as Kea's shared lease backend or FreeRADIUS sqlippool do.
//!
//! - A lease is a row of `tunnel_leases` (migrations/) owned by one concentrator (`node`)
//!   with an expiry that the owner renews, batched, every quarter of `--timeout`.
//! - A lease is granted in one transaction, the `tunnel_claim` function: the client's own
//!   address (free again, or its owner's expiry passed: a failover), else a free address
//!   (`FOR UPDATE SKIP LOCKED`). An address taken from another concentrator is announced to
//!   it (`NOTIFY tunnel_lease_lost`): it ends its session at once. A renewal that finds a row
//!   no longer ours says the same, should a notification be missed.
//! - Ends are released in batches (the sync task, woken by each end), before any claim.
//! - While the database is unreachable established sessions go on (nothing on the packet
//!   path touches it); new leases get 110 "lease store unavailable"; ends and renewals wait
//!   and are sent when it is back. One warning when it goes, one line when it is back.
use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, bail};
use futures::StreamExt as _;
use tokio::sync::{Notify, mpsc};
use tokio_postgres::{AsyncMessage, Client, NoTls};
use tracing::{debug, info, warn};

use super::{Claim, HistoryRow};
use crate::{
    pool::Range4,
    server::state::{Ended, Mode, SavedLease},
};

/// The schema, in order; `tunnel_schema` records which ran.
const MIGRATIONS: &[(i32, &str)] = &[(1, include_str!("../../../migrations/0001_leases.sql"))];

/// A query that takes longer counts as an outage (the database hangs).
const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// Between connection attempts while the database is unreachable.
const RETRY: Duration = Duration::from_secs(1);

/// The settings a concentrator claims with.
pub struct PgSettings {
    pub url: String,
    pub node: String,
    /// A lease's expiry after each renewal (`--timeout`).
    pub ttl: Duration,
    /// `--hold`.
    pub hold: Duration,
    pub pool: Vec<Range4>,
    /// Never leased (the gateway).
    pub exclude: Vec<Ipv4Addr>,
    pub client_key: crate::config::ClientKey,
}

pub struct PgStore {
    config: tokio_postgres::Config,
    shown: String,
    node: String,
    ttl: Duration,
    hold: Duration,
    /// Another concentrator's lease is free for anyone after it has not renewed this long.
    reclaim: Duration,
    client_key: crate::config::ClientKey,
    first: Vec<IpAddr>,
    last: Vec<IpAddr>,
    exclude: Vec<IpAddr>,
    /// Claims share the connection (pipelined); releases, renewals and reconnects have it
    /// to themselves, so a renewal never runs while a claim is between the store and
    /// `pending`.
    conn: tokio::sync::RwLock<Conn>,
    /// Claimed in the store, not yet in the lease table (renewed all the same).
    pending: Mutex<HashSet<Ipv4Addr>>,
    /// Ended here, not yet released in the store.
    releases: Mutex<Vec<Ipv4Addr>>,
    wake: Notify,
    /// Leases another concentrator took over (from notifications).
    lost_tx: mpsc::UnboundedSender<Ipv4Addr>,
    lost_rx: Mutex<Option<mpsc::UnboundedReceiver<Ipv4Addr>>>,
    /// Since when the database is unreachable.
    down: Mutex<Option<Instant>>,
    /// To the claim batcher: claims that arrive while one transaction runs go together in
    /// the next.
    claims: mpsc::UnboundedSender<ClaimRequest>,
}

#[derive(Default)]
struct Conn {
    client: Option<Client>,
    /// `tunnel_claim`, prepared once per connection.
    claim: Option<tokio_postgres::Statement>,
    last_attempt: Option<Instant>,
}

impl Conn {
    fn is_up(&self) -> bool {
        self.client.as_ref().is_some_and(|c| !c.is_closed())
    }
}

/// Claims for several clients in one transaction (one round trip, one commit), in order.
const CLAIM: &str = "SELECT c.n, r.status, r.addr, r.holder, r.until \
                     FROM unnest($1::inet[], $9::inet[]) WITH ORDINALITY AS c(client, key, n), \
                     LATERAL tunnel_claim(c.client, c.key, $2, $3, $4, $5, $6, $7, $8) AS r \
                     ORDER BY c.n";

/// At most this many claims go in one transaction.
const MAX_BATCH: usize = 64;

/// A session waiting for its claim.
struct ClaimRequest {
    client: IpAddr,
    reply: tokio::sync::oneshot::Sender<Claim>,
}

/// What the server does for the store's sync task.
pub trait Owner: Send + Sync {
    /// Whole leases held now: address, mode, native binding.
    fn held(&self) -> Vec<(Ipv4Addr, Mode, Option<Ipv6Addr>)>;
    /// Another concentrator took `addr` over: end its session (or restored lease) here.
    fn lost(&self, addr: Ipv4Addr, why: &str);
    /// A claim could not be served (counted).
    fn renew_failed(&self);
}

impl PgStore {
    /// Connects (failing the start when the database cannot be reached: the concentrator
    /// could not know what it holds), creates or updates the schema, adds the pool's
    /// addresses, and returns the store with the leases it owns (to restore).
    pub async fn start(s: PgSettings) -> Result<(Arc<PgStore>, Vec<SavedLease>)> {
        let mut config: tokio_postgres::Config = s
            .url
            .parse()
            .with_context(|| format!("--lease-store {}", crate::config::redact_url(&s.url)))?;
        if config.get_password().is_none()
            && let Some(password) = pgpass_password(&config)
        {
            config.password(password);
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(3));
        }
        if config.get_application_name().is_none() {
            config.application_name(format!("tunnel-ctl {}", s.node));
        }
        let (lost_tx, lost_rx) = mpsc::unbounded_channel();
        let (claims, claims_rx) = mpsc::unbounded_channel();
        let ip4 = |a: Ipv4Addr| IpAddr::V4(a);
        let store = Arc::new(PgStore {
            shown: crate::config::redact_url(&s.url),
            config,
            node: s.node,
            ttl: s.ttl,
            hold: s.hold,
            reclaim: (s.ttl * 10).max(Duration::from_secs(600)),
            client_key: s.client_key,
            first: s.pool.iter().map(|r| ip4(r.first)).collect(),
            last: s.pool.iter().map(|r| ip4(r.last)).collect(),
            exclude: s.exclude.iter().copied().map(ip4).collect(),
            conn: tokio::sync::RwLock::default(),
            pending: Mutex::default(),
            releases: Mutex::default(),
            wake: Notify::new(),
            lost_tx,
            lost_rx: Mutex::new(Some(lost_rx)),
            down: Mutex::new(None),
            claims,
        });
        let mut client = store.connect().await.with_context(|| {
            format!(
                "lease store {} cannot be reached (a concentrator does not start without \
                 knowing which leases it holds)",
                store.shown
            )
        })?;
        migrate(&mut client)
            .await
            .with_context(|| format!("lease store {}: creating the schema", store.shown))?;
        let added = store
            .add_pool(&client)
            .await
            .with_context(|| format!("lease store {}: adding the pool", store.shown))?;
        let saved = store
            .owned(&client)
            .await
            .with_context(|| format!("lease store {}: reading this node's leases", store.shown))?;
        info!(
            "lease store {}: node {}, {} addresses new to the store, {} leases of this node \
             to re-adopt",
            store.shown,
            store.node,
            added,
            saved.len()
        );
        let claim = client.prepare(CLAIM).await?;
        let mut conn = store.conn.write().await;
        conn.client = Some(client);
        conn.claim = Some(claim);
        drop(conn);
        tokio::spawn(store.clone().batcher(claims_rx));
        Ok((store, saved))
    }

    pub fn describe(&self) -> String {
        format!("postgres {} (node {})", self.shown, self.node)
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    async fn connect(&self) -> Result<Client> {
        let (client, mut connection) = self.config.connect(NoTls).await?;
        let node = self.node.clone();
        let lost = self.lost_tx.clone();
        tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(m) = messages.next().await {
                match m {
                    Ok(AsyncMessage::Notification(n)) => {
                        if let Some((owner, addr)) = n.payload().split_once(' ')
                            && owner == node
                            && let Ok(addr) = addr.parse()
                        {
                            let _ = lost.send(addr);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        debug!("lease store connection: {e}");
                        break;
                    }
                }
            }
        });
        client.batch_execute("LISTEN tunnel_lease_lost").await?;
        Ok(client)
    }

    /// The pool's addresses as rows (those already there stay as they are).
    async fn add_pool(&self, client: &Client) -> Result<u64> {
        let mut added = 0;
        for (first, last) in self.first.iter().zip(&self.last) {
            let (IpAddr::V4(f), IpAddr::V4(l)) = (first, last) else {
                continue;
            };
            let count = i64::from(u32::from(*l) - u32::from(*f));
            added += client
                .execute(
                    "INSERT INTO tunnel_leases (ipv4) \
                     SELECT $1::inet + g FROM generate_series(0::bigint, $2::bigint) AS g \
                     WHERE NOT ($1::inet + g) = ANY ($3::inet[]) ON CONFLICT DO NOTHING",
                    &[first, &count, &self.exclude],
                )
                .await?;
        }
        if added > 0 {
            // Plans for the claim need the table's statistics; autovacuum would take its time.
            client.batch_execute("ANALYZE tunnel_leases").await?;
        }
        Ok(added)
    }

    /// This node's leases, as the lease file would give them.
    async fn owned(&self, client: &Client) -> Result<Vec<SavedLease>> {
        let rows = client
            .query(
                "SELECT ipv4, client, mode, tunnel, since FROM tunnel_leases WHERE node = $1",
                &[&self.node],
            )
            .await?;
        let mut saved = Vec::new();
        for r in rows {
            let (IpAddr::V4(ipv4), Some(client)) = (r.get(0), r.get::<_, Option<IpAddr>>(1)) else {
                continue;
            };
            let mode = match r.get::<_, &str>(2) {
                "native" => Mode::Native,
                _ => Mode::Inband,
            };
            let tunnel = match r.get::<_, Option<IpAddr>>(3) {
                Some(IpAddr::V6(t)) => Some(t),
                _ => None,
            };
            let since: Option<SystemTime> = r.get(4);
            saved.push(SavedLease {
                ipv4,
                client,
                mode,
                since: humantime::format_rfc3339_seconds(since.unwrap_or_else(SystemTime::now))
                    .to_string(),
                tunnel,
                psid: None,
                psid_len: None,
                psid_offset: None,
            });
        }
        Ok(saved)
    }

    /// The connection, (re)connecting if needed; Err: the 110 text.
    async fn connected(&self) -> Result<tokio::sync::RwLockWriteGuard<'_, Conn>, String> {
        let mut conn = self.conn.write().await;
        if conn.is_up() {
            return Ok(conn);
        }
        conn.client = None;
        conn.claim = None;
        if conn.last_attempt.is_some_and(|t| t.elapsed() < RETRY) {
            return Err(self.unavailable_text());
        }
        conn.last_attempt = Some(Instant::now());
        let connected = async {
            let c = self.connect().await?;
            let claim = run(c.prepare(CLAIM)).await.map_err(anyhow::Error::msg)?;
            anyhow::Ok((c, claim))
        };
        match connected.await {
            Ok((c, claim)) => {
                conn.client = Some(c);
                conn.claim = Some(claim);
                Ok(conn)
            }
            Err(e) => {
                self.went_down(&format!("{e:#}"));
                Err(self.unavailable_text())
            }
        }
    }

    fn unavailable_text(&self) -> String {
        "lease store unavailable: no new leases until it is back (established sessions go on)"
            .into()
    }

    /// Logs the outage once.
    fn went_down(&self, why: &str) {
        let mut down = self.down.lock().unwrap_or_else(|p| p.into_inner());
        if down.is_none() {
            *down = Some(Instant::now());
            warn!(
                "lease store {} unavailable: {why}; established sessions and native \
                 forwarding go on, new leases are refused (110) and renewals and releases \
                 wait until it is back",
                self.shown
            );
        }
    }

    fn came_back(&self) {
        let was = self.down.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(since) = was {
            info!(
                "lease store {} is back after {:.1} s; renewals and releases resume",
                self.shown,
                since.elapsed().as_secs_f32()
            );
        }
    }

    /// An operation failed: the connection is dropped (the next use reconnects).
    fn failed(&self, conn: &mut Conn, e: &str) {
        conn.client = None;
        conn.claim = None;
        self.went_down(e);
    }

    /// A lease for `client` (see the module comment).
    pub async fn claim(&self, client: IpAddr) -> Claim {
        // Ends first, so that the client's own address just released here can be had again;
        // and a connection. Both need the connection to themselves.
        let ends_waiting = !self
            .releases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty();
        if ends_waiting || !self.conn.read().await.is_up() {
            let mut conn = match self.connected().await {
                Ok(c) => c,
                Err(text) => return Claim::Unavailable(text),
            };
            let c = conn.client.as_ref().expect("connected");
            if let Err(e) = self.flush_releases(c).await {
                self.failed(&mut conn, &e);
                return Claim::Unavailable(self.unavailable_text());
            }
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        if self.claims.send(ClaimRequest { client, reply }).is_err() {
            return Claim::Unavailable(self.unavailable_text());
        }
        answer
            .await
            .unwrap_or_else(|_| Claim::Unavailable(self.unavailable_text()))
    }

    /// Runs the claims, a batch per transaction, for the server's life.
    async fn batcher(self: Arc<Self>, mut requests: mpsc::UnboundedReceiver<ClaimRequest>) {
        while let Some(first) = requests.recv().await {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match requests.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            let clients: Vec<IpAddr> = batch.iter().map(|r| r.client).collect();
            let answers = self.claim_batch(&clients).await;
            for (request, answer) in batch.into_iter().zip(answers) {
                let _ = request.reply.send(answer);
            }
        }
    }

    /// One transaction of claims: an answer per client, in order.
    async fn claim_batch(&self, clients: &[IpAddr]) -> Vec<Claim> {
        let unavailable = || vec![Claim::Unavailable(self.unavailable_text()); clients.len()];
        let conn = self.conn.read().await;
        let (Some(c), Some(statement)) = (&conn.client, &conn.claim) else {
            return unavailable();
        };
        let keys: Vec<IpAddr> = clients.iter().map(|c| self.client_key.of(*c)).collect();
        let result = run(c.query(
            statement,
            &[
                &clients,
                &self.node,
                &self.ttl.as_secs_f64(),
                &self.hold.as_secs_f64(),
                &self.reclaim.as_secs_f64(),
                &self.first,
                &self.last,
                &self.exclude,
                &keys,
            ],
        ))
        .await;
        let rows = match result {
            Ok(rows) if rows.len() == clients.len() => rows,
            Ok(rows) => {
                let e = format!("{} answers to {} claims", rows.len(), clients.len());
                drop(conn);
                self.failed(&mut *self.conn.write().await, &e);
                return unavailable();
            }
            Err(e) => {
                drop(conn);
                self.failed(&mut *self.conn.write().await, &e);
                return unavailable();
            }
        };
        self.came_back();
        let answers: Vec<Claim> = rows
            .iter()
            .zip(clients)
            .map(|(row, client)| self.answer(row, *client))
            .collect();
        // Before the connection is given back: a renewal then counts them.
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.extend(answers.iter().filter_map(|a| match a {
            Claim::Picked(addr) => Some(*addr),
            _ => None,
        }));
        drop(pending);
        drop(conn);
        answers
    }

    /// One row of [`CLAIM`] as a [`Claim`].
    fn answer(&self, row: &tokio_postgres::Row, client: IpAddr) -> Claim {
        let addr = match row.get::<_, Option<IpAddr>>(2) {
            Some(IpAddr::V4(a)) => Some(a),
            _ => None,
        };
        match (row.get::<_, &str>(1), addr) {
            ("ok", Some(addr)) => {
                if let Some(old) = row.get::<_, Option<String>>(3) {
                    info!(
                        "lease store: {addr} taken over for {client} from concentrator {old} \
                         (its expiry passed)"
                    );
                }
                Claim::Picked(addr)
            }
            ("held", Some(addr)) => {
                let holder: String = row.get(3);
                let until: Option<SystemTime> = row.get(4);
                Claim::HeldElsewhere(format!(
                    "lease store: this client's address {addr} is still held by concentrator \
                     {holder} (until {}, or until that session ends); connect again then",
                    until
                        .map(|u| humantime::format_rfc3339_seconds(u).to_string())
                        .unwrap_or_else(|| "its expiry".into())
                ))
            }
            _ => Claim::Exhausted,
        }
    }

    /// The claim of `addr` went into the lease table (or, with `used` false, was not used:
    /// it is given back).
    pub fn settled(&self, addr: Ipv4Addr, used: bool) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&addr);
        if !used {
            self.releases
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(addr);
            self.wake.notify_one();
        }
    }

    /// Leases that ended here: released in the store by the sync task (shared leases are not
    /// kept in PostgreSQL).
    pub fn released(&self, ended: &[Ended]) {
        let mut releases = self.releases.lock().unwrap_or_else(|p| p.into_inner());
        releases.extend(ended.iter().filter(|e| e.psid.is_none()).map(|e| e.ipv4));
        drop(releases);
        self.wake.notify_one();
    }

    async fn flush_releases(&self, c: &Client) -> Result<(), String> {
        let addrs: Vec<Ipv4Addr> =
            std::mem::take(&mut *self.releases.lock().unwrap_or_else(|p| p.into_inner()));
        if addrs.is_empty() {
            return Ok(());
        }
        let list: Vec<IpAddr> = addrs.iter().copied().map(IpAddr::V4).collect();
        let r = run(c.execute(
            "WITH gone AS ( \
                UPDATE tunnel_leases SET node = NULL, expires = NULL, released = now(), \
                       mode = 'inband', tunnel = NULL \
                 WHERE node = $1 AND ipv4 = ANY ($2) RETURNING ipv4) \
             UPDATE tunnel_lease_history h SET ended = now() FROM gone \
              WHERE h.ipv4 = gone.ipv4 AND h.ended IS NULL AND h.node = $1",
            &[&self.node, &list],
        ))
        .await;
        if r.is_err() {
            // Sent again next time.
            self.releases
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(addrs);
        }
        r.map(|_| ())
    }

    /// Renews every lease `owner` holds (and pending claims); those the store says are no
    /// longer ours were taken over. Err: the store is unavailable.
    async fn renew(&self, owner: &dyn Owner) -> Result<(), String> {
        let mut conn = self.connected().await?;
        let held = owner.held();
        let pending: Vec<Ipv4Addr> = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect();
        let mut addrs: Vec<IpAddr> = Vec::with_capacity(held.len() + pending.len());
        let mut modes: Vec<&str> = Vec::with_capacity(addrs.capacity());
        let mut tunnels: Vec<Option<IpAddr>> = Vec::with_capacity(addrs.capacity());
        for (a, mode, tunnel) in &held {
            addrs.push(IpAddr::V4(*a));
            modes.push(mode.as_str());
            tunnels.push(tunnel.map(IpAddr::V6));
        }
        for a in &pending {
            addrs.push(IpAddr::V4(*a));
            modes.push("inband");
            tunnels.push(None);
        }
        let result = async {
            let c = conn.client.as_ref().expect("connected");
            self.flush_releases(c).await?;
            if addrs.is_empty() {
                return Ok(Vec::new());
            }
            run(c.query(
                "UPDATE tunnel_leases l SET expires = now() + make_interval(secs => $2), \
                        mode = v.mode, tunnel = v.tunnel \
                   FROM unnest($3::inet[], $4::text[], $5::inet[]) AS v(ipv4, mode, tunnel) \
                  WHERE l.ipv4 = v.ipv4 AND l.node = $1 RETURNING l.ipv4",
                &[
                    &self.node,
                    &self.ttl.as_secs_f64(),
                    &addrs,
                    &modes,
                    &tunnels,
                ],
            ))
            .await
        }
        .await;
        let rows = match result {
            Ok(rows) => rows,
            Err(e) => {
                self.failed(&mut conn, &e);
                owner.renew_failed();
                return Err(e);
            }
        };
        drop(conn);
        self.came_back();
        let ours: HashSet<IpAddr> = rows.iter().map(|r| r.get(0)).collect();
        for (a, _, _) in held {
            if !ours.contains(&IpAddr::V4(a)) {
                owner.lost(a, "the lease store says another concentrator holds it now");
            }
        }
        Ok(())
    }

    /// Keeps the store in step with the table for the server's life: releases soon after
    /// each end, renewals every quarter of the expiry (every second while unreachable, to
    /// notice its return), takeovers by other concentrators as they are announced.
    pub async fn sync(self: Arc<Self>, owner: Arc<dyn Owner>) {
        let Some(mut lost) = self
            .lost_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        let every = (self.ttl / 4).max(Duration::from_millis(250));
        let mut next_renewal = tokio::time::Instant::now();
        loop {
            let down = self
                .down
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some();
            let wait = if down { RETRY } else { every };
            tokio::select! {
                () = tokio::time::sleep_until(next_renewal) => {
                    let _ = self.renew(&*owner).await;
                    next_renewal = tokio::time::Instant::now() + wait;
                }
                () = self.wake.notified() => {
                    // Ends in a burst go out together.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    if let Ok(mut conn) = self.connected().await {
                        let c = conn.client.as_ref().expect("connected");
                        if let Err(e) = self.flush_releases(c).await {
                            self.failed(&mut conn, &e);
                        } else {
                            drop(conn);
                            self.came_back();
                        }
                    }
                }
                Some(addr) = lost.recv() => {
                    owner.lost(addr, "another concentrator took it over (its client connected there)");
                }
            }
        }
    }

    /// Who held `ipv4` (all addresses: None) at `at` (any time: None), oldest first.
    pub async fn history(
        &self,
        ipv4: Option<Ipv4Addr>,
        at: Option<SystemTime>,
    ) -> Result<Vec<HistoryRow>> {
        let mut conn = match self.connected().await {
            Ok(c) => c,
            Err(text) => bail!("{text}"),
        };
        let c = conn.client.as_ref().expect("connected");
        let ipv4 = ipv4.map(IpAddr::V4);
        let rows = match run(c.query(
            "SELECT ipv4, psid, client, node, started, ended FROM tunnel_lease_history \
              WHERE ($1::inet IS NULL OR ipv4 = $1) \
                AND ($2::timestamptz IS NULL OR (started <= $2 AND (ended IS NULL OR ended > $2))) \
              ORDER BY started, id LIMIT 100000",
            &[&ipv4, &at],
        ))
        .await
        {
            Ok(rows) => rows,
            Err(e) => {
                self.failed(&mut conn, &e);
                bail!("{}", self.unavailable_text());
            }
        };
        let time = |t: SystemTime| humantime::format_rfc3339_micros(t).to_string();
        Ok(rows
            .iter()
            .filter_map(|r| {
                let IpAddr::V4(ipv4) = r.get(0) else {
                    return None;
                };
                Some(HistoryRow {
                    ipv4,
                    psid: r.get::<_, Option<i32>>(1).map(|p| p as u16),
                    client: r.get::<_, IpAddr>(2).to_string(),
                    node: r.get(3),
                    start: time(r.get(4)),
                    end: r.get::<_, Option<SystemTime>>(5).map(time),
                })
            })
            .collect())
    }
}

/// The password for `config` from PGPASSFILE (else ~/.pgpass), as libpq finds it:
/// `hostname:port:database:username:password` lines, `*` matching anything, `\:` and `\\`
/// escaped, the first match wins; a unix socket's host is `localhost`. tokio-postgres reads
/// no password file itself, so this is ours.
fn pgpass_password(config: &tokio_postgres::Config) -> Option<Vec<u8>> {
    let path = std::env::var_os("PGPASSFILE")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".pgpass")))?;
    let text = std::fs::read_to_string(path).ok()?;
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "localhost".to_owned(),
    };
    let port = config
        .get_ports()
        .first()
        .copied()
        .unwrap_or(5432)
        .to_string();
    let user = config.get_user().unwrap_or_default().to_owned();
    let db = config.get_dbname().unwrap_or(&user).to_owned();
    pgpass_lookup(&text, [&host, &port, &db, &user]).map(String::into_bytes)
}

/// The password of the first line of `text` whose four fields match `want`.
fn pgpass_lookup(text: &str, want: [&str; 4]) -> Option<String> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .find_map(|line| {
            let mut fields = Vec::with_capacity(5);
            let mut field = String::new();
            let mut chars = line.chars();
            while let Some(ch) = chars.next() {
                match ch {
                    '\\' => field.extend(chars.next()),
                    ':' if fields.len() < 4 => fields.push(std::mem::take(&mut field)),
                    other => field.push(other),
                }
            }
            fields.push(field);
            (fields.len() == 5
                && fields[..4]
                    .iter()
                    .zip(want)
                    .all(|(f, w)| f == "*" || f == w))
            .then(|| fields.pop().unwrap_or_default())
        })
}

/// One query within [`OP_TIMEOUT`]; the error as text.
async fn run<T>(
    q: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(OP_TIMEOUT, q).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(match e.as_db_error() {
            Some(db) => format!("{}: {}", db.severity(), db.message()),
            None => e.to_string(),
        }),
        Err(_) => Err(format!("no answer within {OP_TIMEOUT:?}")),
    }
}

/// Applies the migrations not applied yet, each in its transaction, one concentrator at a time
/// (an advisory lock: two that start together do not both create the schema).
async fn migrate(client: &mut Client) -> Result<()> {
    let tx = client.transaction().await?;
    tx.batch_execute(
        "SELECT pg_advisory_xact_lock(7404106); \
         CREATE TABLE IF NOT EXISTS tunnel_schema ( \
             version integer PRIMARY KEY, applied timestamptz NOT NULL DEFAULT now())",
    )
    .await?;
    let current: i32 = tx
        .query_one("SELECT coalesce(max(version), 0) FROM tunnel_schema", &[])
        .await?
        .get(0);
    let newest = MIGRATIONS.last().map(|(v, _)| *v).unwrap_or(0);
    if current > newest {
        bail!(
            "the database has schema version {current}, newer than this release's {newest}: \
             upgrade this concentrator"
        );
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        tx.batch_execute(sql)
            .await
            .with_context(|| format!("migration {version}"))?;
        tx.execute(
            "INSERT INTO tunnel_schema (version) VALUES ($1)",
            &[version],
        )
        .await?;
        info!("lease store: schema version {version} applied");
    }
    tx.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pgpass_line_matches_field_by_field_with_wildcards_and_escapes() {
        let text = "# comment\n\
                    db1.example.net:5432:tunnel:other:nope\n\
                    *:5432:tunnel:tunnel:s\\:cret\\\\x\n\
                    *:*:*:*:fallback\n";
        assert_eq!(
            pgpass_lookup(text, ["db1.example.net", "5432", "tunnel", "tunnel"]).as_deref(),
            Some("s:cret\\x")
        );
        assert_eq!(
            pgpass_lookup(text, ["localhost", "6432", "postgres", "x"]).as_deref(),
            Some("fallback")
        );
        assert_eq!(pgpass_lookup("h:1:d:u\n", ["h", "1", "d", "u"]), None);
    }
}
