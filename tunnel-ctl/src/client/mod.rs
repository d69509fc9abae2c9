//! `tunnel-ctl client`: a 4over6 client, in-band or native.
//!
//! In-band: the TUN device lives as long as the daemon; sessions come and go. The TUN reader
//! feeds a queue that the current session drains into 102 frames; while disconnected the queue
//! fills and further packets are dropped and counted.
//!
//! IPv6 (`--ipv6`, SPEC §7): after the IPv4 lease a 107 asks for IPv6; the 108's address goes
//! on the TUN (or, with `--lan`, the delegated prefix on the LAN, advertised by [`ra`]) and
//! IPv6 is routed into the tunnel like IPv4. 102/103 then carry both (the version nibble
//! tells).
//!
//! Native ([`crate::dataplane::client`]): after the lease, a 105 asks for the fast path; the 106 configures the
//! eBPF programs on `--v6-dev`. The data path outlives sessions: while reconnecting (a server
//! restart, say) packets keep flowing, and a reconnect that gets the same lease changes nothing.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use crate::tundev::Tun;
use anyhow::{Context as _, Result, anyhow, bail};
use bytes::{Bytes, BytesMut};
use futures::StreamExt as _;
use ipnet::{Ipv4Net, Ipv6Net};
use tokio::{
    net::TcpStream,
    sync::{mpsc, watch},
};
use tokio_util::{codec::Framed, sync::CancellationToken};
use tracing::{info, warn};

pub(crate) mod lwb4;
pub(crate) mod machine;
pub(crate) mod ra;
mod yielding;

use crate::dataplane::client::{Applied, NativePath};
use machine::{Action, Uplink};
use yielding::YieldPolicy;

use crate::{
    config::{ClientConfig, ClientMode},
    counters,
    mgmt::{self, Handler, Request, Response, api},
    netlink::Netlink,
    protocol::{
        Frame, FrameCodec, MsgType, frame,
        text::{Lease4, Lease6},
    },
    tundev,
};

counters! {
    pub struct ClientStats {
        connects,
        connect_failures,
        disconnects,
        leases,
        server_errors,
        timeouts,
        frames_in,
        frames_out,
        keepalives_in,
        keepalives_out,
        inband_packets_to_server,
        inband_bytes_to_server,
        inband_packets_from_server,
        inband_bytes_from_server,
        drop_while_disconnected,
        drop_tun_unsplittable,
        drop_tun_too_long,
        drop_tun_write_error,
        drop_unexpected_frame,
        native_granted,
        ipv6_leases,
        ipv6_refused,
        drop_ipv6_not_leased,
        tun_link_local_ignored,
    }
}

/// Queue between the TUN reader and the session (whole 102 frames).
const UPLINK_QUEUE: usize = 512;
/// 102 frames written per flush.
const WRITE_BATCH: usize = 64;
/// 103 frames handled before their packets go to the TUN: what one read of the socket brings.
const FRAMES_PER_TUN_WRITE: usize = 64;
/// The longest the session reads the server's frames without letting the TUN reader (the
/// other half of the task) take its turn. A download keeps the connection readable, and
/// tokio hands the task back only after 128 ready reads of up to 64 KiB each: up to a
/// second of 64-byte datagrams, while the uploads (a TCP download's acks among them) wait.
const READ_TURN: Duration = Duration::from_millis(1);

#[derive(Default)]
struct Status {
    connected: bool,
    lease: Option<Lease4>,
    lease6: Option<Lease6>,
    since: Option<SystemTime>,
    last_error: Option<String>,
}

struct Client {
    args: ClientConfig,
    stats: Arc<ClientStats>,
    status: Mutex<Status>,
    /// In-band mode.
    tun: Option<Arc<Tun>>,
    /// Native mode.
    native: Option<NativePath>,
    /// `--lan`: the delegated prefix goes there.
    lan: Option<Lan>,
    /// The server answered 107 with 110: later sessions do not ask again.
    ipv6_refused: AtomicBool,
    /// A session is established and reads the uplink queue: the TUN reader waits for room
    /// in it (the local senders' TCP slows down) instead of dropping.
    uplink_open: AtomicBool,
    started: Instant,
    /// The index in `--server` of the server tried now.
    current: std::sync::atomic::AtomicUsize,
}

impl Client {
    /// The server this client talks to (or tries) now.
    fn server(&self) -> SocketAddr {
        let i = self.current.load(Ordering::Relaxed);
        self.args.servers[i % self.args.servers.len()]
    }

    /// After a failure: the next `--server` (round robin).
    fn next_server(&self) {
        if self.args.servers.len() > 1 {
            let from = self.server();
            self.current.fetch_add(1, Ordering::Relaxed);
            info!("trying the next server, {} (after {from})", self.server());
        }
    }
}

/// The LAN of `--lan` and its router advertisements.
struct Lan {
    dev: String,
    index: u32,
    advert: watch::Sender<Option<ra::Advert>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// What the in-band session configured on the host, undone or replaced as leases change.
#[derive(Default)]
struct Configured {
    v4: Option<Ipv4Addr>,
    v6: Option<Lease6>,
    /// The host routes that keep the control connections (one per `--server`) out of the
    /// tunnel's default routes.
    pinned: Vec<(IpAddr, u32)>,
}

impl Handler for Client {
    fn handle(&self, request: Request) -> Response {
        match request {
            Request::Status => {
                let st = self.status.lock().unwrap_or_else(|p| p.into_inner());
                api::Status::Client(api::ClientStatus {
                    process: api::Process::now(&self.args.instance, self.started),
                    server: self.server(),
                    servers: self.args.servers.clone(),
                    state: if st.connected {
                        "connected"
                    } else {
                        "connecting"
                    },
                    ipv4: st.lease.as_ref().map(|l| l.addr),
                    dns: st.lease.as_ref().map(|l| l.dns),
                    since: st
                        .since
                        .map(|t| humantime::format_rfc3339_seconds(t).to_string()),
                    mode: match self.args.mode {
                        ClientMode::Inband => "inband",
                        ClientMode::Native => "native",
                    },
                    tun: self.tun.as_ref().map(|_| self.args.tun.clone()),
                    ipv6: st.lease6.as_ref().map(|l| api::ClientIpv6Status {
                        addr: format!("{}/{}", l.addr, l.len),
                        delegated: l.delegated,
                        dns6: l.dns.clone(),
                        lan: self.lan.as_ref().map(|l| l.dev.clone()),
                    }),
                    native: self.native.as_ref().map(|n| api::ClientNativeStatus {
                        v6_dev: n.v6_dev.clone(),
                        configured: n.applied().map(|a| api::ClientNativeConfigured {
                            ipv4: a.lease,
                            local: a.local,
                            server_tunnel: a.grant.tunnel,
                            inner_mtu: a.grant.mtu,
                            psid: a.grant.share.map(|s| s.psid),
                            psid_len: a.grant.share.map(|s| s.psid_len),
                            psid_offset: a.grant.share.map(|s| s.offset),
                            port_ranges: a.grant.share.map(|s| {
                                crate::mape::rule::port_set(s.offset, s.psid_len, s.psid).0
                            }),
                        }),
                    }),
                    last_error: st.last_error.clone(),
                })
                .into()
            }
            Request::Stats => {
                let mut own = self.stats.snapshot();
                if let Some(napt) = self.native.as_ref().and_then(|n| n.lwb4()) {
                    own.extend(napt.stats.snapshot());
                }
                mgmt::counters_response(own, self.native.as_ref().map(|n| n.counters()))
            }
            Request::Nat => match self.native.as_ref().and_then(|n| n.lwb4()) {
                Some(napt) => Response::Ok(mgmt::Reply::Nat(napt.nat_list())),
                None => Response::Error(
                    "no NAPT: this client's lease is not shared (native mode with a 106 that \
                     names a port set)"
                        .into(),
                ),
            },
            other => mgmt::not_supported("client", &other),
        }
    }
}

pub async fn run(args: ClientConfig) -> Result<()> {
    let instance = args.instance.clone();
    args.timers.check()?;
    if args.ipv6 && args.mode == ClientMode::Native {
        return Err(crate::usage::usage(
            "--ipv6 carries IPv6 in 102/103 frames through the TUN: it needs --mode inband \
             (native mode's fast path is IPv4-in-IPv6 only)",
        ));
    }
    crate::daemon::claim(&instance)?;
    let nl = Netlink::connect()?;
    let lan = match (&args.lan, args.ipv6) {
        (Some(dev), true) => Some(start_lan(&nl, dev).await?),
        (Some(dev), false) if args.mode == ClientMode::Native => {
            nl.index(dev)
                .await
                .with_context(|| format!("--lan {dev}"))?;
            None
        }
        (Some(_), false) => {
            return Err(crate::usage::usage(
                "--lan: in-band, a LAN gets IPv6 only (add --ipv6); its IPv4 hosts are NAPTed \
                 by a native client on a shared lease (--mode native)",
            ));
        }
        (None, _) => None,
    };
    let (tun, index, native) = match args.mode {
        ClientMode::Inband => {
            let mut queues = tundev::open(&args.tun, 1, args.tun_offload)?;
            let tun = queues.remove(0);
            let index = nl.index(&args.tun).await?;
            nl.up(index, tundev::TUN_MTU).await?;
            (Some(tun), index, None)
        }
        ClientMode::Native => {
            let dev = args
                .v6_dev
                .as_deref()
                .ok_or_else(|| anyhow!("--mode native needs --v6-dev IFACE"))?;
            let path = NativePath::start(
                &nl,
                dev,
                instance.pin_dir(),
                !args.no_default_route,
                &args.tun,
                args.lan.is_some(),
            )
            .await?;
            (None, 0, Some(path))
        }
    };

    let client = Arc::new(Client {
        args,
        stats: Arc::default(),
        status: Mutex::new(Status::default()),
        tun,
        native,
        lan,
        ipv6_refused: AtomicBool::new(false),
        uplink_open: AtomicBool::new(false),
        started: Instant::now(),
        current: Default::default(),
    });
    let (tx, rx) = mpsc::channel(UPLINK_QUEUE);
    let daemon =
        crate::daemon::Daemon::start(&instance, client.clone(), client.args.metrics).await?;
    info!(
        "4over6 client for {} ({}, keepalive {:?}, timeout {:?})",
        client.server(),
        match &client.native {
            Some(n) => format!("native mode on {}", n.v6_dev),
            None => format!(
                "in-band mode, TUN {}{}",
                client.args.tun,
                match &client.tun {
                    Some(t) if t.offload() => " with offloads",
                    _ => " without offloads",
                }
            ),
        },
        client.args.timers.keepalive,
        client.args.timers.timeout
    );
    let configured = Mutex::new(Configured::default());
    let work = async {
        tokio::select! {
            () = tun_reader(client.clone(), tx) => {}
            () = connection_loop(client.clone(), &nl, index, rx, &configured) => {}
        }
    };
    daemon.run(work, "disconnecting").await;
    if let Some(native) = &client.native {
        native.teardown(&nl).await;
    }
    let configured = configured.into_inner().unwrap_or_else(|p| p.into_inner());
    client.teardown(&nl, configured).await;
    Ok(())
}

/// Prepares `--lan`: IPv6 forwarding and the router advertisement task (idle until a
/// prefix is leased).
async fn start_lan(nl: &Netlink, dev: &str) -> Result<Lan> {
    let index = nl
        .index(dev)
        .await
        .with_context(|| format!("--lan {dev}"))?;
    let (_, mac) = nl.mtu_and_mac(index).await?;
    tundev::ensure_ipv6_forwarding(&format!(
        "hosts on {dev} are routed through the tunnel; interfaces with accept_ra=1 stop \
         autoconfiguring, set accept_ra=2 on the uplink if it needs router advertisements"
    ))?;
    let (advert, rx) = watch::channel(None);
    let stop = CancellationToken::new();
    let task = tokio::spawn(ra::run(dev.to_owned(), index, mac, rx, stop.clone()));
    Ok(Lan {
        dev: dev.to_owned(),
        index,
        advert,
        stop,
        task,
    })
}

impl Client {
    /// Undoes what the in-band sessions configured outside the TUN (whose addresses and
    /// routes go with it): the pinned route to the server, the LAN's address and prefix.
    async fn teardown(&self, nl: &Netlink, configured: Configured) {
        for (server, oif) in configured.pinned {
            let _ = nl.del_host_route(server, oif).await;
        }
        if let Some(lan) = &self.lan {
            lan.stop.cancel();
            // The last advertisement (withdrawing the prefix) goes out before the address.
            let deadline = Instant::now() + Duration::from_secs(2);
            while !lan.task.is_finished() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if let Some(l6) = &configured.v6 {
                let _ = nl.del_address(lan.index, IpAddr::V6(l6.addr)).await;
                if let Some(p) = l6.lan_prefix() {
                    let _ = nl.del_address(lan.index, IpAddr::V6(lan_address(p))).await;
                }
            }
        }
    }
}

/// The client's own address on its LAN: `<prefix>::1`.
fn lan_address(prefix: Ipv6Net) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(prefix.network()) | 1)
}

/// Packets routed into the tunnel → the session's queue. A super-packet's segments are
/// copied into one buffer; a full queue drops (and counts) what does not fit.
async fn tun_reader(client: Arc<Client>, tx: mpsc::Sender<Bytes>) {
    let Some(tun) = client.tun.clone() else {
        // Native mode: nothing to read; keep the sender alive so the session's queue stays open.
        let _keep = tx;
        return std::future::pending().await;
    };
    let mut reader = tundev::Reader::new(tun);
    let bad = |e: &std::io::Error| {
        client.stats.drop_tun_unsplittable.inc();
        tracing::debug!("TUN super-packet not split: {e}");
    };
    let mut chunk = BytesMut::new();
    let mut packets = Vec::with_capacity(tundev::READ_BATCH);
    loop {
        reader.read(&bad).await;
        // Each packet as a whole 102 (header and packet): the session writes it as it is.
        let too_long = reader.take_frames(MsgType::DataRequest.code(), &mut chunk, &mut packets);
        client.stats.drop_tun_too_long.add(too_long as u64);
        for pkt in packets.drain(..) {
            // While a session reads the queue a full queue is waited out (the TUN's queue
            // fills behind it and the local TCP senders slow down, as on any link); while
            // none does, what does not fit is dropped.
            let sent = if client.uplink_open.load(Ordering::Relaxed) {
                tx.send(pkt).await.is_ok()
            } else {
                tx.try_send(pkt).is_ok()
            };
            if !sent {
                client.stats.drop_while_disconnected.inc();
            }
        }
    }
}

/// Connects, serves, reconnects with capped exponential backoff, forever.
async fn connection_loop(
    client: Arc<Client>,
    nl: &Netlink,
    index: u32,
    mut rx: mpsc::Receiver<Bytes>,
    configured: &Mutex<Configured>,
) {
    let mut backoff = Duration::from_secs(1);
    loop {
        let started = Instant::now();
        let result = session(&client, nl, index, configured, &mut rx).await;
        {
            let mut st = client.status.lock().unwrap_or_else(|p| p.into_inner());
            if st.connected {
                client.stats.disconnects.inc();
            }
            st.connected = false;
            client.uplink_open.store(false, Ordering::Relaxed);
            st.last_error = Some(match &result {
                Ok(reason) => reason.clone(),
                Err(e) => format!("{e:#}"),
            });
        }
        match &result {
            Ok(reason) => warn!("disconnected from {}: {reason}", client.server()),
            Err(e) => {
                client.stats.connect_failures.inc();
                warn!("session with {} failed: {e:#}", client.server());
                client.next_server();
            }
        }
        // A session that lasted a while resets the backoff.
        if started.elapsed() > client.args.timers.timeout {
            backoff = Duration::from_secs(1);
        }
        info!("reconnecting in {backoff:?}");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(client.args.max_backoff);
    }
}

type Conn = Framed<TcpStream, FrameCodec>;

/// One session: Ok(reason) when an established session ended, Err when it never got going.
async fn session(
    client: &Client,
    nl: &Netlink,
    index: u32,
    configured: &Mutex<Configured>,
    rx: &mut mpsc::Receiver<Bytes>,
) -> Result<String> {
    let timers = &client.args.timers;
    let server = client.server();
    let stream = tokio::time::timeout(timers.timeout, TcpStream::connect(server))
        .await
        .map_err(|_| {
            anyhow!(
                "connecting to {server}: no answer within {:?}",
                timers.timeout
            )
        })?
        .with_context(|| format!("connecting to {server}"))?;
    let _ = stream.set_nodelay(true);
    client.stats.connects.inc();
    let native = match (&client.native, stream.local_addr()?.ip()) {
        (None, _) => None,
        (Some(_), IpAddr::V6(a)) if a.to_ipv4_mapped().is_none() => Some(a),
        (Some(_), other) => {
            bail!("native mode needs an IPv6 connection to the server (local address {other})")
        }
    };
    let cfg = machine::SessionConfig {
        keepalive: timers.keepalive,
        timeout: timers.timeout,
        native,
        ipv6: client.args.ipv6 && !client.ipv6_refused.load(Ordering::Relaxed),
        tun: client.tun.is_some(),
    };
    let mut framed = frame::framed(stream);
    let mut m = machine::Session::new(cfg, client.stats.clone(), Instant::now());
    let mut to_tun = client.tun.clone().map(tundev::Writer::new);
    let mut yields = YieldPolicy::default();
    let (mut turn, mut give_turn) = (Instant::now(), false);
    loop {
        while let Some(action) = m.next_action() {
            if let Action::ToTun(pkt) = &action {
                match &mut to_tun {
                    Some(w) => w.push(pkt),
                    None => client.stats.drop_unexpected_frame.inc(),
                }
                continue;
            }
            // Whatever follows the packets waits for them.
            flush_tun(client, &mut to_tun, &mut yields).await;
            match action {
                Action::Send(frame) => match write(&mut framed, timers.timeout, [frame]).await {
                    Ok(()) => client.stats.frames_out.inc(),
                    Err(e) => m.write_failed(e),
                },
                Action::Configure4(lease) => {
                    configure_ipv4(client, nl, index, &lease, configured).await?
                }
                Action::ApplyNative { lease, grant } => {
                    let local = native.expect("native mode has a local address");
                    let path = client.native.as_ref().expect("native mode");
                    path.apply(
                        nl,
                        Applied {
                            lease,
                            local,
                            grant,
                        },
                    )
                    .await?;
                }
                Action::Configure6(lease6) => {
                    configure_ipv6(client, nl, index, &lease6, configured).await?
                }
                Action::Established { lease, lease6 } => established(client, lease, lease6, rx),
                Action::ToTun(_) => unreachable!("pushed above"),
                Action::StopAskingIpv6 => {
                    client.ipv6_refused.store(true, Ordering::Relaxed);
                    info!("continuing with IPv4 only from the next connection on");
                }
                Action::Close(end) if end.established() => return Ok(end.to_string()),
                Action::Close(end) => return Err(anyhow!("{end}")),
            }
        }
        flush_tun(client, &mut to_tun, &mut yields).await;
        if std::mem::take(&mut give_turn) {
            // What was read has gone out; now the TUN reader's turn (READ_TURN).
            tokio::task::yield_now().await;
            turn = Instant::now();
        }
        let wake = tokio::time::Instant::from_std(m.poll_timeout());
        tokio::select! {
            // Not biased: while a download keeps the connection readable, a fixed order
            // served it forever and left the TUN's packets (the uploads, TCP's acks among
            // them) unsent until the flood stopped. The server's session is fair the same way.
            () = tokio::time::sleep_until(wake) => m.handle_timeout(Instant::now()),
            item = framed.next() => {
                // The 103s already read go together: one TUN write per flow. They arrived
                // together too: one clock read for all of them (one per frame was 2% of the
                // client's time in a download).
                let mut item = Some(item);
                let mut handled = 0;
                let now = Instant::now();
                while let Some(next) = item.take() {
                    match next {
                        None => m.handle_closed(),
                        Some(Err(e)) => m.handle_frame_error(&e),
                        Some(Ok(frame)) => {
                            let data =
                                matches!(frame.kind, MsgType::DataReply | MsgType::Keepalive);
                            m.handle_frame(frame, now);
                            handled += 1;
                            if data && handled < FRAMES_PER_TUN_WRITE {
                                item = futures::FutureExt::now_or_never(framed.next());
                            }
                        }
                    }
                }
                give_turn = now.duration_since(turn) >= READ_TURN;
            }
            Some(first) = rx.recv(), if m.is_established() => {
                // Whole 102s from the TUN reader, written as they are.
                let mut batch = Vec::with_capacity(8);
                let mut next = Some(first);
                while let Some(f) = next {
                    if m.uplink(&f[frame::HEADER_LEN..]) == Uplink::Send {
                        batch.push(f);
                    }
                    next = if batch.len() < WRITE_BATCH { rx.try_recv().ok() } else { None };
                }
                let n = batch.len() as u64;
                if n == 0 {
                    continue;
                }
                let bytes: u64 = batch.iter().map(|f| (f.len() - frame::HEADER_LEN) as u64).sum();
                match frame::write_wire(&mut framed, timers.timeout, &batch).await {
                    Ok(_) => {
                        client.stats.frames_out.add(n);
                        client.stats.inband_packets_to_server.add(n);
                        client.stats.inband_bytes_to_server.add(bytes);
                    }
                    Err(e) => m.write_failed(failed(e)),
                }
            }
        }
    }
}

/// Writes the packets from the server that were pushed for the TUN.
async fn flush_tun(client: &Client, to_tun: &mut Option<tundev::Writer>, policy: &mut YieldPolicy) {
    let Some(w) = to_tun.as_mut().filter(|w| !w.is_empty()) else {
        return;
    };
    let (n, bytes) = (w.len() as u64, w.bytes() as u64);
    match w.flush() {
        Ok(_) => {
            client.stats.inband_packets_from_server.add(n);
            client.stats.inband_bytes_from_server.add(bytes);
            // The readers this burst woke were put on this CPU: let them drain their
            // sockets before the next one (yielding.rs), while that costs little.
            if YieldPolicy::burst_of_small_packets(n, bytes) {
                let start = Instant::now();
                if policy.yield_now(start) {
                    std::thread::yield_now();
                    policy.yielded(start, start.elapsed());
                }
            }
        }
        Err(_) => client.stats.drop_tun_write_error.inc(),
    }
}

/// Writes `frames` with one flush, within `timeout` (`Err(None)`: the peer stopped reading).
async fn write(
    framed: &mut Conn,
    timeout: Duration,
    frames: impl IntoIterator<Item = Frame>,
) -> Result<(), Option<String>> {
    frame::write_frames(framed, timeout, frames)
        .await
        .map(|_| ())
        .map_err(failed)
}

/// What the machine is told of a failed write (`None`: the peer stopped reading).
fn failed(e: frame::WriteFailed) -> Option<String> {
    match e {
        frame::WriteFailed::Error(e) => Some(e.to_string()),
        frame::WriteFailed::Stalled => None,
    }
}

/// In-band: the lease on the TUN and, unless --no-default-route, the default routes (a lease
/// that did not change changes nothing).
async fn configure_ipv4(
    client: &Client,
    nl: &Netlink,
    index: u32,
    lease: &Lease4,
    configured: &Mutex<Configured>,
) -> Result<()> {
    if lock(configured).v4 == Some(lease.addr) {
        return Ok(());
    }
    let server = client.server();
    nl.flush_ipv4(index).await?;
    nl.add_address(index, IpAddr::V4(lease.addr), 32).await?;
    if !client.args.no_default_route {
        if server.ip().to_canonical().is_ipv4() {
            pin_server_route(nl, server.ip(), index, configured).await?;
        }
        // Two halves instead of a default route: more specific than any existing
        // default, and gone with the TUN device.
        for net in ["0.0.0.0/1", "128.0.0.0/1"] {
            nl.route(net.parse::<Ipv4Net>().expect("valid"), index)
                .await?;
        }
    }
    lock(configured).v4 = Some(lease.addr);
    Ok(())
}

/// The session carries traffic: status, resolv.conf, and the packets queued while
/// disconnected are stale.
fn established(
    client: &Client,
    lease: Lease4,
    lease6: Option<Lease6>,
    rx: &mut mpsc::Receiver<Bytes>,
) {
    info!(
        "leased {} from {}; DNS {} {} {}",
        lease.addr,
        client.server(),
        lease.dns[0],
        lease.dns[1],
        lease.dns[2]
    );
    if let Some(path) = &client.args.write_resolv_conf {
        let v6 = lease6
            .iter()
            .flat_map(|l| l.dns.iter().map(|d| IpAddr::V6(*d)));
        let text: String = lease
            .dns
            .iter()
            .map(|d| IpAddr::V4(*d))
            .chain(v6)
            .map(|d| format!("nameserver {d}\n"))
            .collect();
        if let Err(e) = std::fs::write(path, text) {
            warn!("writing {}: {e}", path.display());
        }
    }
    {
        let mut st = client.status.lock().unwrap_or_else(|p| p.into_inner());
        st.connected = true;
        client.uplink_open.store(true, Ordering::Relaxed);
        st.lease = Some(lease);
        st.lease6 = lease6;
        st.since = Some(SystemTime::now());
        st.last_error = None;
    }
    while rx.try_recv().is_ok() {
        client.stats.drop_while_disconnected.inc();
    }
}

fn lock(configured: &Mutex<Configured>) -> std::sync::MutexGuard<'_, Configured> {
    configured.lock().unwrap_or_else(|p| p.into_inner())
}

/// Before the tunnel's default routes of the server's family go in (callers check the
/// family): a host route to the
/// server the way it is reached now, so that the control connection does not end up inside
/// its own tunnel. Once per run (later sessions find the route in place).
async fn pin_server_route(
    nl: &Netlink,
    server: IpAddr,
    tun_index: u32,
    configured: &Mutex<Configured>,
) -> Result<()> {
    let server = server.to_canonical();
    if lock(configured).pinned.iter().any(|(s, _)| *s == server) {
        return Ok(());
    }
    let (gateway, oif) = nl.route_to(server).await?;
    if oif == tun_index {
        return Ok(());
    }
    nl.host_route(server, gateway, oif).await?;
    info!(
        "route to the server {server} pinned{} so that it stays outside the tunnel",
        gateway.map(|g| format!(" via {g}")).unwrap_or_default()
    );
    lock(configured).pinned.push((server, oif));
    Ok(())
}

/// Puts a new IPv6 lease in place: the address on the TUN (a delegated prefix with --lan:
/// `<prefix>::1` on the LAN, advertised there), and IPv6 routed into the tunnel.
async fn configure_ipv6(
    client: &Client,
    nl: &Netlink,
    index: u32,
    lease: &Lease6,
    configured: &Mutex<Configured>,
) -> Result<()> {
    let old = lock(configured).v6.clone();
    if old.as_ref() == Some(lease) {
        return Ok(());
    }
    let lan = client.lan.as_ref().zip(lease.lan_prefix());
    if let Some(old) = &old {
        let _ = nl.del_address(index, IpAddr::V6(old.addr)).await;
        if let (Some(l), Some(p)) = (&client.lan, old.lan_prefix()) {
            let _ = nl.del_address(l.index, IpAddr::V6(lan_address(p))).await;
        }
    }
    match lan {
        Some((l, prefix)) => {
            nl.add_address(
                l.index,
                IpAddr::V6(lan_address(prefix)),
                prefix.prefix_len(),
            )
            .await?;
            if lease.len == 128 {
                nl.add_address(index, IpAddr::V6(lease.addr), 128).await?;
            }
            let (lan_mtu, _) = nl.mtu_and_mac(l.index).await?;
            l.advert.send_replace(Some(ra::Advert {
                prefix,
                mtu: lan_mtu.min(tundev::TUN_MTU),
                dns: lease.dns.clone(),
            }));
        }
        None => {
            nl.add_address(index, IpAddr::V6(lease.addr), 128).await?;
            if client.lan.is_some() {
                warn!(
                    "--lan: the server leased a single address ({}/{}), no prefix to \
                     advertise (the server needs --delegate)",
                    lease.addr, lease.len
                );
            }
        }
    }
    if !client.args.no_default_route {
        if client.server().ip().to_canonical().is_ipv6() {
            pin_server_route(nl, client.server().ip(), index, configured).await?;
        }
        for net in ["::/1", "8000::/1"] {
            nl.route(net.parse::<Ipv6Net>().expect("valid"), index)
                .await?;
        }
    }
    info!(
        "IPv6 {}/{}{}{} via the tunnel (gateway {})",
        lease.addr,
        lease.len,
        lease
            .delegated
            .map(|d| format!(", delegated {d}"))
            .unwrap_or_default(),
        lan.map(|(l, p)| format!(", {p} on {}", l.dev))
            .unwrap_or_default(),
        lease.gateway
    );
    lock(configured).v6 = Some(lease.clone());
    Ok(())
}
