//! `tunnel-ctl server`: the 4over6 concentrator (SPEC §3-§5).
//!
//! Layout: [`state`] holds the pool and the lease table (the single source of truth, plain
//! data); [`machine`] decides what each session does (pure, unit-tested); one [`session`]
//! task per TCP connection carries out its actions; [`crate::dataplane::server`] owns the
//! fast-path maps; the TUN reader here routes packets from the kernel to the session that
//! holds the destination's lease.
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    ops::{Deref, DerefMut},
    path::PathBuf,
    sync::{
        Arc, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use bytes::{Bytes, BytesMut};
use tokio::{
    net::{TcpListener, TcpSocket},
    sync::Notify,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    config::ServerConfig,
    counters, dns,
    instance::Instance,
    mgmt::{self, Handler, Reply, Request, Response, Status, api},
    netlink::Netlink,
    packet,
    pool::Pool,
    protocol::{self, MsgType, frame::HEADER_LEN, text::three_dns},
    softwire::Sent,
    tundev::{self, Tun},
};

pub(crate) mod admission;
pub(crate) mod codel;
pub(crate) mod inbound;
pub(crate) mod ipv6;
pub(crate) mod machine;
pub(crate) mod persist;
pub(crate) mod policy;
pub(crate) mod queue;
pub mod reassembly;
pub(crate) mod reload;
pub(crate) mod session;
pub mod softwires;
pub(crate) mod state;
pub mod store;

use queue::QueueTx;

use crate::dataplane::server::{Native, NativeArgs};
use state::{Ended, Grant, Holder, Route, State};

counters! {
    pub struct ServerStats {
        sessions_opened,
        sessions_closed,
        sessions_timed_out,
        sessions_replaced,
        sessions_refused_not_allowed,
        sessions_refused_full,
        sessions_refused_per_source,
        sessions_refused_rate,
        sessions_handshake_timeout,
        leases_granted,
        leases_withdrawn,
        reloads,
        reloads_refused,
        pool_exhausted,
        lease_limit_refused,
        lease_store_unavailable,
        lease_held_elsewhere,
        lease_store_errors,
        leases_taken_over_elsewhere,
        frames_in,
        frames_out,
        keepalives_in,
        keepalives_out,
        protocol_error_frame_too_short,
        protocol_error_frame_too_long,
        protocol_error_unknown_type,
        protocol_error_unexpected_type,
        protocol_error_io,
        unsupported_request,
        inband_packets_to_tun,
        inband_bytes_to_tun,
        inband_packets_from_tun,
        inband_bytes_from_tun,
        drop_data_before_lease,
        drop_spoofed_source,
        drop_malformed_packet,
        drop_ipv6_without_lease,
        drop_no_lease_for_destination,
        drop_tun_not_ip,
        drop_tun_unsplittable,
        drop_tun_too_long,
        tun_link_local_ignored,
        ipv6_leases_granted,
        ipv6_pool_exhausted,
        ipv6_packets_to_tun,
        ipv6_packets_from_tun,
        drop_inbound_denied,
        inbound_flows_untracked,
        proxy_ndp_errors,
        drop_session_queue_full,
        drop_session_aqm,
        drop_tun_write_error,
        native_granted,
        native_refused,
        shared_leases_granted,
        drop_inband_on_shared_lease,
        leases_restored,
        leases_restored_expired,
        slowpath_native_packets,
        slowpath_icmp_frag_needed,
        slowpath_fragmented,
        drop_slowpath_send_error,
        policy_icmp_sent,
        policy_icmp_rate_limited,
        drop_slowpath_unfragmentable,
    }
}

/// Settings derived from the command line.
#[derive(Debug, Clone)]
pub struct Config {
    pub keepalive: Duration,
    pub timeout: Duration,
    pub dns: [Ipv4Addr; 3],
    pub max_sessions: usize,
    pub allow: Vec<ipnet::IpNet>,
    pub handshake_timeout: Duration,
    pub session_queue: usize,
    pub session_buffer: usize,
}

/// What the daemon keeps of a running session beside the lease table.
#[derive(Clone, Debug)]
pub struct Link {
    /// 103 packets for this session.
    pub tx: QueueTx,
    /// Server-relative ms of the last frame received.
    pub last_rx: Arc<AtomicU64>,
    /// Closes the session (takeover by a reconnecting client).
    pub cancel: CancellationToken,
    /// A reload took the session's lease out of the pool.
    pub withdraw: Arc<Notify>,
    /// What the session carried in-band.
    pub traffic: Arc<LinkTraffic>,
}

/// A session's in-band traffic: `rx` from the client (to the TUN), `tx` to it (103s).
#[derive(Debug, Default)]
pub struct LinkTraffic {
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
}

impl LinkTraffic {
    pub fn rx(&self, bytes: usize) {
        self.rx_packets.fetch_add(1, Ordering::Relaxed);
        self.rx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn tx(&self, packets: u64, bytes: u64) {
        self.tx_packets.fetch_add(packets, Ordering::Relaxed);
        self.tx_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    fn get(&self) -> api::Traffic {
        api::Traffic {
            rx_bytes: self.rx_bytes.load(Ordering::Relaxed),
            tx_bytes: self.tx_bytes.load(Ordering::Relaxed),
            rx_packets: self.rx_packets.load(Ordering::Relaxed),
            tx_packets: self.tx_packets.load(Ordering::Relaxed),
        }
    }
}

/// The lease table and the sessions' links, under one lock (the TUN reader finds a packet's
/// session queue with one lookup of each).
pub struct Shared {
    pub table: State,
    pub links: HashMap<u64, Link>,
}

impl Deref for Shared {
    type Target = State;
    fn deref(&self) -> &State {
        &self.table
    }
}

impl DerefMut for Shared {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.table
    }
}

impl Shared {
    /// A session's packet queue.
    fn queue(&self, session_id: u64) -> Option<QueueTx> {
        self.links.get(&session_id).map(|l| l.tx.clone())
    }
}

/// The lease table as a session machine reaches it: one lock per call. The claim is the
/// shared lease store's answer to the frame being handled, when it is a 100 (see
/// [`session`]).
pub struct Locked<'a>(pub &'a Server, pub Option<store::Claim>);

/// "Has session `id` been silent for longer than `stale_ms`?"
fn silent_since(
    links: &HashMap<u64, Link>,
    now_ms: u64,
    stale_ms: u64,
) -> impl Fn(u64) -> bool + '_ {
    move |id: u64| {
        links
            .get(&id)
            .is_some_and(|l| now_ms.saturating_sub(l.last_rx.load(Ordering::Relaxed)) > stale_ms)
    }
}

impl Locked<'_> {
    /// Runs `f` on the table with "silent for longer than `stale`", then closes the session
    /// whose lease it took over (if any).
    fn granting<R>(
        &mut self,
        stale: Duration,
        f: impl FnOnce(&mut State, &dyn Fn(u64) -> bool) -> R,
        taken_over: impl Fn(&R) -> Option<u64>,
    ) -> R {
        let now_ms = self.0.now_ms();
        let stale_ms = stale.as_millis() as u64;
        let mut shared = self.0.lock();
        let Shared { table, links } = &mut *shared;
        let silent = silent_since(links, now_ms, stale_ms);
        let r = f(table, &silent);
        if let Some(old) = taken_over(&r)
            && let Some(link) = links.get(&old)
        {
            link.cancel.cancel();
        }
        r
    }
}

impl machine::Leases for Locked<'_> {
    fn grant(&mut self, holder: Holder, stale: Duration, _now: Instant) -> Grant {
        let pick = match (self.1.take(), &self.0.store) {
            (Some(store::Claim::Picked(a)), _) => state::Pick::Addr(a),
            (Some(store::Claim::Exhausted), _) => return Grant::Exhausted,
            (Some(store::Claim::HeldElsewhere(text)), _) => return Grant::HeldElsewhere(text),
            (Some(store::Claim::Unavailable(text)), _) => return Grant::StoreUnavailable(text),
            // Only what the table holds already: a new address comes from the store alone.
            (None, store::LeaseStore::Postgres(_)) => state::Pick::ReuseOnly,
            (Some(store::Claim::Local) | None, _) => state::Pick::Pool,
        };
        let g = self.granting(
            stale,
            |t, silent| t.grant_from(holder, silent, pick),
            |g| match g {
                Grant::TakenOver(_, old) => Some(*old),
                _ => None,
            },
        );
        if let (state::Pick::Addr(a), store::LeaseStore::Postgres(pg)) = (pick, &self.0.store) {
            pg.settled(a, matches!(g, Grant::New(x) if x == a));
        }
        g
    }
    fn grant_shared(
        &mut self,
        holder: Holder,
        tunnel: Ipv6Addr,
        stale: Duration,
        _now: Instant,
    ) -> Result<state::SharedGrant, Grant> {
        self.granting(
            stale,
            |t, silent| t.grant_shared(holder, tunnel, silent),
            |g| g.as_ref().ok().and_then(|g| g.taken_over),
        )
    }
    fn with_table<R>(&mut self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut self.0.lock())
    }
}

/// Everything the sessions share.
pub struct Server {
    cfg: std::sync::RwLock<Config>,
    /// What each new session machine is told.
    session_cfg: std::sync::RwLock<Arc<machine::SessionConfig>>,
    /// The configuration running now (a reload compares the file with it; held while one
    /// reload runs, so reloads take turns).
    running: tokio::sync::Mutex<ServerConfig>,
    nl: Netlink,
    tun_index: u32,
    pub state: std::sync::Mutex<Shared>,
    pub stats: Arc<ServerStats>,
    /// Per-source connection count and rate.
    pub admission: admission::Admission,
    /// The TUN's first queue: single packets (ICMP errors, the slow path).
    pub tun: Arc<Tun>,
    /// Every queue of the TUN, each with its reader; sessions write to `id % len`.
    pub tun_queues: Vec<Arc<Tun>>,
    pub started: Instant,
    pub next_session: AtomicU64,
    /// The fast path, when --v6-dev/--v4-dev are given.
    pub native: Option<Native>,
    /// With the fast path: what it hands over for softwires (fragments, too big).
    pub softwire_slow: Option<crate::daemon::softwire_slow::SoftwireSlowPath>,
    /// The TUN's address: source of the ICMP errors the slow path sends.
    pub gateway: Ipv4Addr,
    /// IPv6 for clients (107/108), when --pool6 or --delegate is given.
    pub ipv6: Option<ipv6::Ipv6Service>,
    /// Wakes the lease-file writer.
    pub leases_changed: Notify,
    /// `--lease-store`.
    pub store: store::LeaseStore,
    state_path: PathBuf,
    instance: Instance,
    listen: SocketAddr,
    tun_name: String,
}

impl Server {
    /// The settings sessions and admission read (a reload replaces them).
    pub fn cfg(&self) -> Config {
        self.cfg.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn session_cfg(&self) -> Arc<machine::SessionConfig> {
        self.session_cfg
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The lease table (a poisoned lock is taken as is: the table stays consistent per call).
    pub fn lock(&self) -> MutexGuard<'_, Shared> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The lease table with each client's traffic: its session's in-band counters plus its
    /// binding's fast-path counters (read after the table's lock is given back).
    fn lease_rows(&self) -> Vec<api::LeaseRow> {
        let (mut rows, inband) = {
            let state = self.lock();
            let rows = state.lease_list();
            let inband: HashMap<u64, api::Traffic> = rows
                .iter()
                .filter_map(|r| r.session)
                .filter_map(|id| state.links.get(&id).map(|l| (id, l.traffic.get())))
                .collect();
            (rows, inband)
        };
        for row in &mut rows {
            let mut t = row
                .session
                .and_then(|id| inband.get(&id).copied())
                .unwrap_or_default();
            if let (Some(native), Some(_)) = (&self.native, row.tunnel)
                && let Some(n) = native.traffic(row.ipv4)
            {
                t = t + api::Traffic {
                    rx_bytes: n.rx_bytes,
                    tx_bytes: n.tx_bytes,
                    rx_packets: n.rx_packets,
                    tx_packets: n.tx_packets,
                };
            }
            row.traffic = t;
        }
        rows
    }

    /// The lease a reconnecting client gets again without asking the store (see
    /// [`State::reusable`]).
    pub fn reusable(&self, holder: Holder, stale: Duration) -> Option<Ipv4Addr> {
        let now_ms = self.now_ms();
        let shared = self.lock();
        let silent = silent_since(&shared.links, now_ms, stale.as_millis() as u64);
        shared.table.reusable(holder, silent)
    }

    /// `leases --history`: from the store's history, and (file store) the leases held now.
    fn history(&self, ipv4: Option<Ipv4Addr>, at: Option<&str>) -> Result<Vec<store::HistoryRow>> {
        let at = at
            .map(humantime::parse_rfc3339_weak)
            .transpose()
            .context("--at: not an RFC 3339 time")?;
        match &self.store {
            store::LeaseStore::File(f) => {
                let mut rows = f.history(ipv4, at)?;
                let open = store::open_rows(&self.lock().lease_list(), f.node());
                rows.extend(open.into_iter().filter(|r| r.matches(ipv4, at)));
                rows.sort_by(|a, b| (&a.start, a.ipv4).cmp(&(&b.start, b.ipv4)));
                Ok(rows)
            }
            store::LeaseStore::Postgres(pg) => tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(pg.history(ipv4, at))
            }),
        }
    }

    /// Whether an IPv6 unit is leased now (see [`ipv6::Ipv6Service::sync`]).
    pub fn leased6(&self, unit: ipnet::Ipv6Net) -> bool {
        self.lock().is_leased6(unit)
    }

    /// Milliseconds since the server started (cheap timestamps for liveness).
    pub fn now_ms(&self) -> u64 {
        self.ms_at(Instant::now())
    }

    /// [`Server::now_ms`] for an instant already read.
    pub fn ms_at(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.started).as_millis() as u64
    }

    /// Undoes the fast-path part of ended leases and schedules a lease-file write.
    pub fn ended(&self, ended: &[Ended]) {
        if let Some(native) = &self.native {
            for e in ended {
                match (e.psid, e.tunnel) {
                    (Some(psid), _) => {
                        if let Err(err) = native.softwires().del((e.ipv4, psid)) {
                            warn!("removing the softwire of {} psid {psid}: {err:#}", e.ipv4);
                        }
                    }
                    (None, Some(t)) => native.unbind(t, e.ipv4),
                    (None, None) => {}
                }
            }
        }
        self.store.ended(ended);
        self.leases_changed.notify_one();
    }

    /// Whether `peer` may connect (`--allow`; IPv4-mapped peers match IPv4 prefixes too).
    pub fn allowed(&self, peer: IpAddr) -> bool {
        let cfg = self.cfg.read().unwrap_or_else(|p| p.into_inner());
        if cfg.allow.is_empty() {
            return true;
        }
        let canonical = peer.to_canonical();
        cfg.allow
            .iter()
            .any(|net| net.contains(&peer) || net.contains(&canonical))
    }
}

impl Handler for Server {
    fn handle(&self, request: Request) -> Response {
        if let Some(native) = &self.native
            && let Some(r) = crate::daemon::aftr::softwire_request(native, &request)
        {
            return r;
        }
        match request {
            Request::Status => {
                let state = self.lock();
                let native = self.native.as_ref().map(|n| {
                    let (bindings_v4, bindings_v6) = n.binding_counts();
                    api::NativeStatus {
                        tunnel_addr: n.tunnel_addr,
                        v6_dev: n.v6_dev.clone(),
                        v4_dev: n.v4_dev.clone(),
                        inner_mtu: n.inner_mtu,
                        bindings_v4,
                        bindings_v6,
                    }
                });
                let ipv6 = self.ipv6.as_ref().map(|v6| api::ServerIpv6Status {
                    pool6: state.pool6.as_ref().map(|p| p.to_string()),
                    delegate: state.delegate.as_ref().map(|p| p.to_string()),
                    leases6: state.leases6_count(),
                    dns6: v6.dns.clone(),
                    proxy_ndp: v6.proxy.as_ref().map(|p| p.dev.clone()),
                    allow_in: v6.allow_in.iter().map(|a| a.to_string()).collect(),
                });
                Status::Server(api::ServerStatus {
                    process: api::Process::now(&self.instance, self.started),
                    listen: self.listen,
                    tun: self.tun_name.clone(),
                    pool: state.pool.describe(),
                    pool_size: state.pool.capacity(),
                    leases: state.pool.in_use(),
                    sessions: state.sessions,
                    native,
                    ipv6,
                    state_file: self.state_path.clone(),
                    lease_store: self.store.describe(),
                })
                .into()
            }
            Request::Stats => {
                let mut counters = self.stats.snapshot();
                if let Some(slow) = &self.softwire_slow {
                    counters.extend(slow.stats.snapshot());
                }
                mgmt::counters_response(counters, self.native.as_ref().map(|n| n.counters()))
            }
            Request::Leases => Response::Ok(Reply::Leases(self.lease_rows())),
            Request::LeaseHistory { ipv4, at } => match self.history(ipv4, at.as_deref()) {
                Ok(rows) => Response::Ok(Reply::History(rows)),
                Err(e) => Response::Error(format!("{e:#}")),
            },
            other => mgmt::not_supported("server", &other),
        }
    }
}

/// Runs the server with `args`; `source` re-reads the configuration for a reload.
pub async fn run(args: ServerConfig, source: crate::daemon::Source<ServerConfig>) -> Result<()> {
    if args.pool.is_empty() {
        return crate::daemon::aftr::run(args, source).await;
    }
    let instance = args.instance.clone();
    crate::daemon::claim(&instance)?;
    raise_fd_limit(args.max_sessions);
    args.timers.check()?;
    let pool = Pool::new(&args.pool, &[args.gateway], args.hold)
        .map_err(|e| crate::usage::usage(format!("--pool: {e}")))?;
    let (pool6, delegate) = ipv6::pools(&args)?;
    if !args.allow_in.is_empty() && pool6.is_none() && delegate.is_none() {
        anyhow::bail!("--allow-in filters clients' IPv6: it needs --pool6 or --delegate");
    }
    let dns = dns_of(&args);
    let sharing = sharing_of(&args)?;

    let tunnel_addr = match (&args.v6_dev, args.tunnel_addr, args.listen.ip()) {
        (None, _, _) => None,
        (Some(_), Some(a), _) => Some(a),
        (Some(_), None, IpAddr::V6(a)) if !a.is_unspecified() => Some(a),
        (Some(_), None, _) => anyhow::bail!(
            "native mode needs --tunnel-addr (the IPv6 address clients send IPv4-in-IPv6 to), \
             or a specific IPv6 --listen address to use as such"
        ),
    };

    persist::ensure_writable(&args.state_dir)?;
    // The lease store before any device: a store that cannot be reached stops the start
    // with nothing to undo.
    let state_path = persist::path(&args.state_dir, instance.name());
    let node = store::node_id(args.node_id.as_deref());
    let (lease_store, saved, saved_from) = match &args.lease_store {
        crate::config::LeaseStoreSpec::File => {
            let saved = persist::load(&state_path, std::time::SystemTime::now());
            let file = store::FileStore::new(&args.state_dir, instance.name(), node);
            (
                store::LeaseStore::File(file),
                saved,
                state_path.display().to_string(),
            )
        }
        crate::config::LeaseStoreSpec::Postgres(url) => {
            if sharing.is_some() {
                return Err(crate::usage::usage(
                    "--share with --lease-store postgres: shared leases are kept in the lease \
                     file only so far; run shared leases with --lease-store file",
                ));
            }
            let (pg, saved) = store::postgres::PgStore::start(store::postgres::PgSettings {
                url: url.clone(),
                node,
                ttl: args.timers.timeout,
                hold: args.hold,
                pool: args.pool.clone(),
                exclude: vec![args.gateway],
                client_key: args.client_key,
            })
            .await?;
            let from = pg.describe();
            (store::LeaseStore::Postgres(pg), saved, from)
        }
    };
    let listener =
        bind_dual_stack(args.listen).with_context(|| format!("listening on {}", args.listen))?;
    let nl = Netlink::connect()?;
    let (tun_queues, tun_index) = setup_tun(&nl, &args).await?;
    let tun = tun_queues[0].clone();
    let ipv6 = if pool6.is_some() || delegate.is_some() {
        Some(
            ipv6::Ipv6Service::start(&nl, &args, tun_index, pool6.as_ref(), delegate.as_ref())
                .await?,
        )
    } else {
        None
    };
    let mut state = State::new(pool);
    state.limits = state::LeaseLimits {
        per_prefix: args.max_leases_per_prefix,
        prefix_len: args.prefix_len,
        per_address: args.max_leases_per_address,
    };
    state.pool6 = pool6;
    state.delegate = delegate;
    state.sharing = sharing;
    state.client_key = args.client_key;
    for (lease, why) in state.restore(&saved, args.timers.timeout) {
        warn!(
            "not restoring saved lease {} of {}: {why}",
            lease.ipv4, lease.client
        );
    }
    let restored = state.lease_list().len();
    if restored > 0 {
        info!(
            "restored {restored} leases from {saved_from}; their clients have {:?} to reconnect",
            args.timers.timeout
        );
    }
    // Shared leases are softwires: those restored are in the table from the start, so that
    // their pinned entries stay in place across the restart.
    let mut softwires = softwire_table(&args)?;
    for sw in state.shared_softwires() {
        if let Err(e) = softwires.insert(sw) {
            warn!(
                "not restoring the softwire of shared lease {} psid {}: {e}",
                sw.ipv4, sw.psid
            );
        }
    }
    let native = match (&args.v6_dev, &args.v4_dev, tunnel_addr) {
        (Some(v6_dev), Some(v4_dev), Some(tunnel_addr)) => Some(
            Native::start(
                &nl,
                NativeArgs {
                    v6_dev,
                    v4_dev,
                    tunnel_addr,
                    tun_index,
                    pin_dir: instance.pin_dir(),
                    policy_icmp: args.policy_icmp,
                    max_bindings: args.max_bindings,
                    native_clients: true,
                    softwires,
                    no_hairpin: args.no_hairpin,
                    softwire_slow_path: true,
                    xdp: args.xdp,
                },
            )
            .await?,
        ),
        _ => None,
    };
    if native.is_none() {
        // A fast path pinned by an earlier native-mode run would go on forwarding (and
        // deliver re-leased addresses to their old holders): it goes before any lease.
        crate::dataplane::bpffs::remove_stale(
            &instance.pin_dir(),
            "this server runs without native mode (--v6-dev/--v4-dev/--tunnel-addr), so an \
             earlier run's fast path must not keep forwarding",
        )?;
    }
    // From here on a clean exit removes the pins (detaching the fast path); SIGKILL leaves
    // them for the next start to re-adopt.
    let _pins = crate::dataplane::bpffs::PinGuard(native.is_some().then(|| instance.pin_dir()));

    if let Some(native) = &native {
        native.reconcile(&state.bindings())?;
    }

    // The slow path's socket for B4s' reassembled packets (native mode only).
    let b4_receiver = match &native {
        Some(_) => Some(crate::daemon::softwire_slow::ipip_receiver()?),
        None => None,
    };
    let server = Arc::new(Server {
        running: tokio::sync::Mutex::new(args.clone()),
        nl: nl.clone(),
        tun_index,
        cfg: std::sync::RwLock::new(Config {
            keepalive: args.timers.keepalive,
            timeout: args.timers.timeout,
            dns,
            max_sessions: args.max_sessions,
            allow: args.allow.clone(),
            handshake_timeout: args.handshake_timeout,
            session_queue: args.session_queue as usize,
            session_buffer: args.session_buffer as usize,
        }),
        session_cfg: std::sync::RwLock::new(Arc::new(machine::SessionConfig {
            keepalive: args.timers.keepalive,
            timeout: args.timers.timeout,
            handshake_timeout: args.handshake_timeout,
            dns,
            native: native.as_ref().map(|n| protocol::text::NativeGrant {
                tunnel: n.tunnel_addr,
                mtu: n.inner_mtu,
                share: None,
            }),
            sharing,
            ipv6: ipv6.as_ref().map(|v6| machine::Ipv6Offer {
                dns: v6.dns.clone(),
                allow_in: v6.allow_in.clone(),
            }),
        })),
        state: std::sync::Mutex::new(Shared {
            table: state,
            links: HashMap::new(),
        }),
        stats: Arc::new(ServerStats::default()),
        admission: admission::Admission::new(args.max_per_source, args.max_connect_rate),
        softwire_slow: native.is_some().then(|| {
            crate::daemon::softwire_slow::SoftwireSlowPath::new(tun.clone(), args.no_hairpin)
        }),
        tun,
        tun_queues,
        started: Instant::now(),
        next_session: AtomicU64::new(1),
        native,
        gateway: args.gateway,
        ipv6,
        leases_changed: Notify::new(),
        store: lease_store,
        state_path,
        instance: instance.clone(),
        listen: args.listen,
        tun_name: args.tun.clone(),
    });
    server.stats.leases_restored.add(restored as u64);
    // Saved leases that were not restored must leave the file too.
    server.leases_changed.notify_one();
    let reload = crate::daemon::reloader(source, server.clone(), |s, cfg| {
        Box::pin(async move {
            let result = match cfg {
                Ok(cfg) => s.reload(cfg).await,
                Err(e) => Err(e),
            };
            if result.is_err() {
                s.stats.reloads_refused.inc();
            }
            result
        })
    });
    let daemon = crate::daemon::Daemon::start(&instance, server.clone(), args.metrics)
        .await?
        .with_reload(reload);
    info!(
        "serving 4over6 on {} (pool {}, gateway {}, TUN {}, DNS {} {} {}, keepalive {:?}, timeout {:?}, hold {:?})",
        args.listen,
        server.lock().pool.describe(),
        args.gateway,
        args.tun,
        dns[0],
        dns[1],
        dns[2],
        args.timers.keepalive,
        args.timers.timeout,
        args.hold
    );
    if let Some(n) = &server.native {
        info!(
            "native mode: tunnel address {}, IPv6 side {}, IPv4 side {}, inner MTU {}",
            n.tunnel_addr, n.v6_dev, n.v4_dev, n.inner_mtu
        );
    }
    if let Some(v6) = &server.ipv6 {
        let state = server.lock();
        let pools: Vec<String> = [&state.pool6, &state.delegate]
            .into_iter()
            .flatten()
            .map(|p| p.to_string())
            .collect();
        info!(
            "IPv6 for clients: {} (gateway {}, DNS {:?}, {}, inbound allowed: {})",
            pools.join(" and "),
            ipv6::GATEWAY6,
            v6.dns,
            match &v6.proxy {
                Some(p) => format!("proxy NDP on {}", p.dev),
                None => "routed: the upstream must route the prefixes here".into(),
            },
            if v6.allow_in.is_empty() {
                "replies only".to_string()
            } else {
                v6.allow_in
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            }
        );
    }

    if let Some(n) = &server.native
        && let Some(ring) = n.take_policy_events()
    {
        tokio::spawn(policy::run(
            server.clone(),
            ring,
            n.tunnel_addr,
            n.policy_icmp,
        ));
    }

    let b4_reader = async {
        match (&server.softwire_slow, &server.native, b4_receiver) {
            (Some(slow), Some(native), Some(receiver)) => slow.b4_reader(native, receiver).await,
            _ => std::future::pending().await,
        }
    };
    let work = async {
        tokio::select! {
            () = accept_loop(server.clone(), listener) => {}
            () = tun_readers(server.clone()) => {}
            () = b4_reader => {}
            () = lease_file_writer(server.clone()) => {}
            () = store_sync(server.clone()) => {}
            () = expire_restored(server.clone()) => {}
        }
    };
    daemon.run(work, "closing all sessions").await;
    if server.store.file().is_some() {
        save_leases(&server);
    }
    if let Some(v6) = &server.ipv6 {
        let pool = server.lock().pool6.as_ref().map(|p| p.prefix());
        v6.shutdown(pool).await;
    }
    Ok(())
}

/// `--share N --psid-offset A`: None for whole addresses (N = 1).
pub fn sharing_of(args: &ServerConfig) -> Result<Option<state::Sharing>> {
    if args.share <= 1 {
        return Ok(None);
    }
    if !args.share.is_power_of_two() || args.share > 1024 {
        return Err(crate::usage::usage(format!(
            "--share {}: a power of two from 1 to 1024 (clients per address)",
            args.share
        )));
    }
    if args.v6_dev.is_none() {
        return Err(crate::usage::usage(
            "--share: shared leases are native mode only; add --v6-dev, --v4-dev and --tunnel-addr",
        ));
    }
    let psid_len = args.share.trailing_zeros() as u8;
    if u32::from(psid_len) + u32::from(args.psid_offset) > 16 {
        return Err(crate::usage::usage(format!(
            "--share {} (a {psid_len}-bit PSID) with --psid-offset {}: the two take more than \
             16 bits of the port",
            args.share, args.psid_offset
        )));
    }
    Ok(Some(state::Sharing {
        psid_len,
        offset: args.psid_offset,
    }))
}

/// The 101's DNS servers: `--dns`, else this host's resolv.conf.
/// The `--bindings` table (empty without one).
pub fn softwire_table(args: &ServerConfig) -> Result<softwires::Table> {
    match &args.bindings {
        Some(path) => {
            let reading = std::time::Instant::now();
            let table =
                softwires::Table::load(path).map_err(|e| crate::usage::usage(format!("{e:#}")))?;
            info!(
                "--bindings {}: {} softwires ({} ms)",
                path.display(),
                table.len(),
                reading.elapsed().as_millis()
            );
            Ok(table)
        }
        None => Ok(softwires::Table::default()),
    }
}

fn dns_of(args: &ServerConfig) -> [Ipv4Addr; 3] {
    match args.dns.as_slice() {
        [] => {
            let found = dns::system_nameservers();
            if found.is_empty() {
                warn!(
                    "no IPv4 nameserver in /etc/resolv.conf; clients get 0.0.0.0 as DNS (pass --dns)"
                );
            }
            three_dns(&found)
        }
        list => three_dns(list),
    }
}

fn save_leases(server: &Server) {
    let saved = server.lock().saved();
    if let Err(e) = persist::save(&server.state_path, &saved) {
        warn!("saving leases: {e:#}");
    }
}

/// Keeps a shared lease store in step (see [`store::postgres::PgStore::sync`]).
async fn store_sync(server: Arc<Server>) {
    match &server.store {
        store::LeaseStore::Postgres(pg) => pg.clone().sync(server.clone()).await,
        store::LeaseStore::File(_) => std::future::pending().await,
    }
}

impl store::postgres::Owner for Server {
    fn held(&self) -> Vec<(Ipv4Addr, state::Mode, Option<Ipv6Addr>)> {
        self.lock().held()
    }

    fn lost(&self, addr: Ipv4Addr, why: &str) {
        let taken = {
            let mut shared = self.lock();
            match shared.table.taken_away(addr) {
                Some(Ok(id)) => {
                    if let Some(link) = shared.links.get(&id) {
                        link.cancel.cancel();
                    }
                    Some(Ok(id))
                }
                other => other,
            }
        };
        match taken {
            Some(Ok(id)) => {
                self.stats.leases_taken_over_elsewhere.inc();
                info!("lease {addr}: {why}; closing session {id}");
            }
            Some(Err(ended)) => {
                self.stats.leases_taken_over_elsewhere.inc();
                info!("restored lease {addr}: {why}; its binding goes");
                self.ended(&[ended]);
            }
            None => {}
        }
    }

    fn renew_failed(&self) {
        self.stats.lease_store_errors.inc();
    }
}

/// Writes the lease file after changes, at most every 100 ms (bursts coalesce).
async fn lease_file_writer(server: Arc<Server>) {
    if server.store.file().is_none() {
        return std::future::pending().await;
    }
    loop {
        server.leases_changed.notified().await;
        let s = server.clone();
        let _ = tokio::task::spawn_blocking(move || save_leases(&s)).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Releases restored leases whose clients did not come back within the timeout.
async fn expire_restored(server: Arc<Server>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let ended = server.lock().expire_restored(std::time::Instant::now());
        if !ended.is_empty() {
            for e in &ended {
                info!(
                    "restored lease {} expired: its client did not reconnect",
                    e.ipv4
                );
            }
            server.stats.leases_restored_expired.add(ended.len() as u64);
            server.ended(&ended);
        }
    }
}

/// `[::]:port` with IPV6_V6ONLY off, so IPv4 clients connect too (as IPv4-mapped).
fn bind_dual_stack(addr: SocketAddr) -> Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => {
            let s = TcpSocket::new_v6()?;
            nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::Ipv6V6Only, &false)?;
            s
        }
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    Ok(socket.listen(1024)?)
}

/// Creates the TUN, gives it the gateway address, routes the pool to it, enables forwarding.
async fn setup_tun(nl: &Netlink, args: &ServerConfig) -> Result<(Vec<Arc<Tun>>, u32)> {
    let tun = tundev::open(&args.tun, args.tun_queues, args.tun_offload)?;
    info!(
        "TUN {}: {} queue(s), {}",
        args.tun,
        tun.len(),
        if tun[0].offload() {
            "offloads on (TCP/UDP super-packets in, GRO writes out)"
        } else {
            "one packet per read and write"
        }
    );
    let index = nl.index(&args.tun).await?;
    nl.up(index, tundev::TUN_MTU).await?;
    nl.add_address(index, IpAddr::V4(args.gateway), 32).await?;
    for range in &args.pool {
        for net in range.subnets() {
            nl.route(net, index).await?;
        }
    }
    tundev::ensure_ipv4_forwarding("clients' traffic is routed through this host")?;
    Ok((tun, index))
}

async fn accept_loop(server: Arc<Server>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(session::run(server.clone(), stream, peer));
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Reads at most this many times before routing what it read (one lock of the lease table).
const READS_PER_BATCH: usize = 16;

/// One reader per TUN queue, until the daemon stops.
async fn tun_readers(server: Arc<Server>) {
    let mut readers = tokio::task::JoinSet::new();
    for tun in server.tun_queues.clone() {
        readers.spawn(tun_reader(server.clone(), tun));
    }
    while readers.join_next().await.is_some() {}
}

/// Where a packet from the TUN goes.
#[derive(Clone)]
enum Toward {
    Session(QueueTx),
    Native(Ipv6Addr),
    /// Not leased here: maybe a softwire's (lwAFTR slow path), else dropped.
    Unleased(Ipv4Addr),
    /// An IPv6 destination no session holds.
    Unleased6(Ipv6Addr),
    /// The kernel's own IPv6 chatter on the TUN.
    LinkLocal,
    NotIp,
}

/// Packets the kernel routed to one TUN queue (destination in the pool) → the session
/// holding that address, as 103. Each read (a packet, or a super-packet's segments) and
/// whatever else the queue has right now, up to [`READS_PER_BATCH`] reads, is copied into one
/// buffer and routed under one lock of the lease table. Unknown destinations are dropped and
/// counted.
async fn tun_reader(server: Arc<Server>, tun: Arc<Tun>) {
    let mut reader = tundev::Reader::new(tun);
    let bad = |e: &std::io::Error| {
        server.stats.drop_tun_unsplittable.inc();
        debug!("TUN super-packet not split: {e}");
    };
    let mut chunk = BytesMut::new();
    // Each packet as a whole 103 (header and packet), so the session writes it as it is.
    let mut frames: Vec<Bytes> = Vec::with_capacity(tundev::READ_BATCH);
    let mut toward: Vec<Toward> = Vec::with_capacity(tundev::READ_BATCH);
    loop {
        reader.read(&bad).await;
        let mut reads = 1;
        loop {
            let too_long = reader.take_frames(MsgType::DataReply.code(), &mut chunk, &mut frames);
            server.stats.drop_tun_too_long.add(too_long as u64);
            if reads == READS_PER_BATCH || !reader.try_read(&bad) {
                break;
            }
            reads += 1;
        }
        {
            let state = server.lock();
            let mut last: Option<(IpAddr, Toward)> = None;
            for frame in &frames {
                let dst = packet::addrs(&frame[HEADER_LEN..]);
                let t = match dst {
                    // A super-packet's segments share their destination: one lookup.
                    Some((_, dst))
                        if let Some((d, t)) = &last
                            && *d == dst =>
                    {
                        t.clone()
                    }
                    Some((_, IpAddr::V4(dst))) => match state.route(dst) {
                        Some(Route::Inband(id)) => state
                            .queue(id)
                            .map_or(Toward::Unleased(dst), Toward::Session),
                        Some(Route::Native(client)) => Toward::Native(client),
                        None => Toward::Unleased(dst),
                    },
                    Some((src, IpAddr::V6(dst))) => {
                        if matches!(src, IpAddr::V6(s) if packet::link_local_v6(s, dst)) {
                            Toward::LinkLocal
                        } else {
                            match state.route6(dst).and_then(|id| state.queue(id)) {
                                Some(tx) => Toward::Session(tx),
                                None => Toward::Unleased6(dst),
                            }
                        }
                    }
                    None => Toward::NotIp,
                };
                if let Some((_, dst)) = dst {
                    last = Some((dst, t.clone()));
                }
                toward.push(t);
            }
        }
        let now = codel::stamp(Instant::now());
        for (t, frame) in toward.drain(..).zip(frames.drain(..)) {
            deliver_from_tun(&server, t, frame, now).await;
        }
    }
}

/// Hands one packet from the TUN (made a 103: `frame`, read at `now`) on, as [`tun_reader`]
/// routed it.
async fn deliver_from_tun(server: &Server, toward: Toward, frame: Bytes, now: codel::Micros) {
    let pkt = &frame[HEADER_LEN..];
    match toward {
        Toward::Session(tx) => {
            let v6 = pkt.first().is_some_and(|b| b >> 4 == 6);
            if queue_for_session(server, &tx, frame, now) && v6 {
                server.stats.ipv6_packets_from_tun.inc();
            }
        }
        Toward::Native(client) => slow_path_to_native(server, client, pkt).await,
        Toward::Unleased(dst)
            if let (Some(slow), Some(native)) = (&server.softwire_slow, &server.native)
                && native.softwires().table().holds_address(dst) =>
        {
            slow.toward_b4(native, pkt).await
        }
        Toward::Unleased(dst) => {
            server.stats.drop_no_lease_for_destination.inc();
            debug!("TUN packet to {dst}: no lease, dropped");
        }
        Toward::Unleased6(dst) => {
            server.stats.drop_no_lease_for_destination.inc();
            debug!("TUN packet to {dst}: no IPv6 lease, dropped");
        }
        Toward::LinkLocal => server.stats.tun_link_local_ignored.inc(),
        Toward::NotIp => server.stats.drop_tun_not_ip.inc(),
    }
}

/// Queues a TUN packet (as its 103) for its session; a full queue drops it (that session's loss
/// only). Whether it was queued.
fn queue_for_session(server: &Server, tx: &QueueTx, frame: Bytes, now: codel::Micros) -> bool {
    let len = (frame.len() - HEADER_LEN) as u64;
    if tx.try_push(frame, now) {
        server.stats.inband_packets_from_tun.inc();
        server.stats.inband_bytes_from_tun.add(len);
        true
    } else {
        server.stats.drop_session_queue_full.inc();
        false
    }
}

/// A packet for a native client that the fast path left to the kernel (too big for the
/// tunnel, or from this host or an in-band client): ICMP fragmentation-needed back to the
/// sender for DF packets, IPv4 fragments otherwise, sent as IPv4-in-IPv6.
async fn slow_path_to_native(server: &Server, client: Ipv6Addr, pkt: &[u8]) {
    let Some(native) = &server.native else {
        return;
    };
    let stats = &server.stats;
    match native.send_fitted(client, pkt, server.gateway) {
        Sent::Whole => stats.slowpath_native_packets.inc(),
        Sent::Fragmented => stats.slowpath_fragmented.inc(),
        Sent::TooBig(icmp) => match server.tun.send(&icmp).await {
            Ok(_) => stats.slowpath_icmp_frag_needed.inc(),
            Err(_) => stats.drop_tun_write_error.inc(),
        },
        Sent::Unfragmentable => stats.drop_slowpath_unfragmentable.inc(),
        Sent::Failed => stats.drop_slowpath_send_error.inc(),
    }
}

/// One socket per session: raise the soft open-files limit to the hard one (the usual 1,024
/// would cap a concentrator near 1,000 clients), and say so when even that is below what
/// `--max-sessions` needs.
fn raise_fd_limit(max_sessions: usize) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    let needed = max_sessions as u64 + 64;
    if max_sessions != 0 && lim.rlim_cur < needed {
        warn!(
            "open-files limit {} is below --max-sessions {max_sessions} + 64: sessions beyond it \
             will fail to be accepted (raise LimitNOFILE= or ulimit -n)",
            lim.rlim_cur
        );
    }
}
