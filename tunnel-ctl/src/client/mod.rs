//! `tunnel-ctl client`: a 4over6 client, in-band or native.
//!
//! In-band: the TUN device lives as long as the daemon; sessions come and go. The TUN reader
//! feeds a queue that the current session drains into 102 frames; while disconnected the queue
//! fills and further packets are dropped and counted.
//!
//! Native ([`native`]): after the lease, a 105 asks for the fast path; the 106 configures the
//! eBPF programs on `--v6-dev`. The data path outlives sessions: while reconnecting (a server
//! restart, say) packets keep flowing, and a reconnect that gets the same lease changes nothing.
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, anyhow, bail};
use bytes::Bytes;
use futures::{SinkExt as _, StreamExt as _};
use ipnet::Ipv4Net;
use serde_json::json;
use tokio::{net::TcpStream, sync::mpsc};
use tokio_util::codec::Framed;
use tracing::{info, warn};
use tun::AsyncDevice;

pub mod native;

use native::{Applied, NativePath};

use crate::{
    cli::{ClientArgs, ClientMode},
    counters,
    mgmt::{self, Handler, Request, Response},
    netlink::Netlink,
    protocol::{
        Frame, FrameCodec, MsgType, frame,
        text::{Lease4, NativeGrant},
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
        drop_tun_write_error,
        drop_unexpected_frame,
        native_granted,
    }
}

/// Queue between the TUN reader and the session.
const UPLINK_QUEUE: usize = 512;
/// 102 frames written per flush.
const WRITE_BATCH: usize = 64;

#[derive(Default)]
struct Status {
    connected: bool,
    lease: Option<Lease4>,
    since: Option<SystemTime>,
    last_error: Option<String>,
}

struct Client {
    args: ClientArgs,
    stats: ClientStats,
    status: Mutex<Status>,
    /// In-band mode.
    tun: Option<Arc<AsyncDevice>>,
    /// Native mode.
    native: Option<NativePath>,
    started: Instant,
}

impl Handler for Client {
    fn handle(&self, request: Request) -> Response {
        match request {
            Request::Status => {
                let st = self.status.lock().unwrap_or_else(|p| p.into_inner());
                Response::Ok(json!({
                    "role": "client",
                    "instance": self.args.instance.instance.name(),
                    "pid": std::process::id(),
                    "uptime_s": self.started.elapsed().as_secs(),
                    "server": self.args.server.to_string(),
                    "state": if st.connected { "connected" } else { "connecting" },
                    "ipv4": st.lease.as_ref().map(|l| l.addr.to_string()),
                    "dns": st.lease.as_ref().map(|l| l.dns.map(|d| d.to_string())),
                    "since": st.since.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
                    "mode": match self.args.mode {
                        ClientMode::Inband => "inband",
                        ClientMode::Native => "native",
                    },
                    "tun": self.tun.as_ref().map(|_| &self.args.tun),
                    "native": self.native.as_ref().map(|n| json!({
                        "v6_dev": n.v6_dev,
                        "configured": n.applied().map(|a| json!({
                            "ipv4": a.lease.to_string(),
                            "local": a.local.to_string(),
                            "server_tunnel": a.grant.tunnel.to_string(),
                            "inner_mtu": a.grant.mtu,
                        })),
                    })),
                    "last_error": st.last_error,
                }))
            }
            Request::Stats => mgmt::counters_response(
                self.stats.snapshot(),
                self.native.as_ref().map(|n| n.counters()),
            ),
            other => mgmt::not_supported("client", &other),
        }
    }
}

pub async fn run(args: ClientArgs) -> Result<()> {
    let instance = args.instance.instance.clone();
    mgmt::ensure_not_running(&instance)?;
    let nl = Netlink::connect()?;
    let (tun, index, native) = match args.mode {
        ClientMode::Inband => {
            let tun = tundev::create(&args.tun)?;
            let index = nl.index(&args.tun).await?;
            nl.up(index, tundev::TUN_MTU).await?;
            (Some(tun), index, None)
        }
        ClientMode::Native => {
            let dev = args
                .v6_dev
                .as_deref()
                .ok_or_else(|| anyhow!("--mode native needs --v6-dev IFACE"))?;
            let path =
                NativePath::start(&nl, dev, instance.pin_dir(), !args.no_default_route).await?;
            (None, 0, Some(path))
        }
    };

    let client = Arc::new(Client {
        args,
        stats: ClientStats::default(),
        status: Mutex::new(Status::default()),
        tun,
        native,
        started: Instant::now(),
    });
    let (tx, rx) = mpsc::channel(UPLINK_QUEUE);
    let mgmt = mgmt::bind(&instance)?;
    info!(
        "4over6 client for {} ({}, keepalive {:?}, timeout {:?})",
        client.args.server,
        match &client.native {
            Some(n) => format!("native mode on {}", n.v6_dev),
            None => format!("in-band mode, TUN {}", client.args.tun),
        },
        client.args.timers.keepalive,
        client.args.timers.timeout
    );
    tokio::select! {
        () = tun_reader(client.clone(), tx) => {}
        () = connection_loop(client.clone(), &nl, index, rx) => {}
        () = mgmt.serve(client.clone()) => {}
        signal = crate::shutdown_signal() => info!("{signal}: disconnecting"),
    }
    if let Some(native) = &client.native {
        native.teardown(&nl).await;
    }
    Ok(())
}

async fn tun_reader(client: Arc<Client>, tx: mpsc::Sender<Bytes>) {
    let Some(tun) = client.tun.clone() else {
        // Native mode: nothing to read; keep the sender alive so the session's queue stays open.
        let _keep = tx;
        return std::future::pending().await;
    };
    let mut buf = vec![0u8; 65536];
    loop {
        match tun.recv(&mut buf).await {
            Ok(n) => {
                if tx.try_send(Bytes::copy_from_slice(&buf[..n])).is_err() {
                    client.stats.drop_while_disconnected.inc();
                }
            }
            Err(e) => {
                warn!("reading TUN: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
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
) {
    let mut backoff = Duration::from_secs(1);
    let mut configured: Option<Ipv4Addr> = None;
    loop {
        let started = Instant::now();
        let result = session(&client, nl, index, &mut configured, &mut rx).await;
        {
            let mut st = client.status.lock().unwrap_or_else(|p| p.into_inner());
            if st.connected {
                client.stats.disconnects.inc();
            }
            st.connected = false;
            st.last_error = Some(match &result {
                Ok(reason) => reason.clone(),
                Err(e) => format!("{e:#}"),
            });
        }
        match &result {
            Ok(reason) => warn!("disconnected from {}: {reason}", client.args.server),
            Err(e) => {
                client.stats.connect_failures.inc();
                warn!("session with {} failed: {e:#}", client.args.server);
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
    configured: &mut Option<Ipv4Addr>,
    rx: &mut mpsc::Receiver<Bytes>,
) -> Result<String> {
    let timers = &client.args.timers;
    let server = client.args.server;
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
    let mut framed = frame::framed(stream);
    framed.send(Frame::empty(MsgType::AddrRequest)).await?;
    client.stats.frames_out.inc();
    let lease = tokio::time::timeout(timers.timeout, wait_for_lease(client, &mut framed))
        .await
        .map_err(|_| anyhow!("no lease (101) from {server} within {:?}", timers.timeout))??;
    client.stats.leases.inc();

    if let Some(native) = &client.native {
        let local = match framed.get_ref().local_addr()?.ip() {
            IpAddr::V6(a) if a.to_ipv4_mapped().is_none() => a,
            other => {
                bail!("native mode needs an IPv6 connection to the server (local address {other})")
            }
        };
        framed
            .send(Frame::text(MsgType::NativeRequest, &local.to_string()))
            .await?;
        client.stats.frames_out.inc();
        let grant = tokio::time::timeout(timers.timeout, wait_for_native(client, &mut framed))
            .await
            .map_err(|_| {
                anyhow!(
                    "no answer (106) to native mode from {server} within {:?}",
                    timers.timeout
                )
            })??;
        client.stats.native_granted.inc();
        native
            .apply(
                nl,
                Applied {
                    lease: lease.addr,
                    local,
                    grant,
                },
            )
            .await?;
    } else if *configured != Some(lease.addr) {
        nl.flush_ipv4(index).await?;
        nl.add_address(index, IpAddr::V4(lease.addr), 32).await?;
        if !client.args.no_default_route {
            // Two halves instead of a default route: more specific than any existing default,
            // and gone with the TUN device.
            for net in ["0.0.0.0/1", "128.0.0.0/1"] {
                nl.route_v4(net.parse::<Ipv4Net>().expect("valid"), index)
                    .await?;
            }
        }
        *configured = Some(lease.addr);
    }
    info!(
        "leased {} from {server}; DNS {} {} {}",
        lease.addr, lease.dns[0], lease.dns[1], lease.dns[2]
    );
    if let Some(path) = &client.args.write_resolv_conf {
        let text: String = lease
            .dns
            .iter()
            .map(|d| format!("nameserver {d}\n"))
            .collect();
        if let Err(e) = std::fs::write(path, text) {
            warn!("writing {}: {e}", path.display());
        }
    }
    {
        let mut st = client.status.lock().unwrap_or_else(|p| p.into_inner());
        st.connected = true;
        st.lease = Some(lease);
        st.since = Some(SystemTime::now());
        st.last_error = None;
    }
    // Packets queued while disconnected are stale.
    while rx.try_recv().is_ok() {
        client.stats.drop_while_disconnected.inc();
    }
    Ok(serve(client, &mut framed, rx, server).await)
}

async fn wait_for_lease(client: &Client, framed: &mut Conn) -> Result<Lease4> {
    wait_for_reply(
        client,
        framed,
        MsgType::AddrReply,
        "a lease",
        "server refused",
        |d| Lease4::parse(d).context("bad 101 from the server"),
    )
    .await
}

/// Waits for the 106 after a 105 (keepalives and a repeated 101 may come first).
async fn wait_for_native(client: &Client, framed: &mut Conn) -> Result<NativeGrant> {
    wait_for_reply(
        client,
        framed,
        MsgType::NativeReply,
        "an answer to native mode",
        "server refused native mode",
        |d| NativeGrant::parse(d).map_err(|e| anyhow!("bad 106: {e}")),
    )
    .await
}

/// Reads frames until one of type `want` arrives and parses it. Keepalives and repeated 101s
/// are fine meanwhile; a 110 ends the wait with `refused: <reason>`.
async fn wait_for_reply<T>(
    client: &Client,
    framed: &mut Conn,
    want: MsgType,
    waiting_for: &str,
    refused: &str,
    parse: impl Fn(&[u8]) -> Result<T>,
) -> Result<T> {
    while let Some(frame) = framed.next().await {
        let frame = frame?;
        client.stats.frames_in.inc();
        match frame.kind {
            kind if kind == want => return parse(&frame.data),
            MsgType::Keepalive => client.stats.keepalives_in.inc(),
            MsgType::AddrReply => {}
            MsgType::Error => {
                client.stats.server_errors.inc();
                bail!(
                    "{refused}: {}",
                    String::from_utf8_lossy(&frame.data).trim_end_matches('\0')
                );
            }
            other => {
                client.stats.drop_unexpected_frame.inc();
                warn!(
                    "ignoring type {} while waiting for {waiting_for}",
                    other.code()
                );
            }
        }
    }
    bail!("server closed the connection before sending {waiting_for}")
}

async fn serve(
    client: &Client,
    framed: &mut Conn,
    rx: &mut mpsc::Receiver<Bytes>,
    server: SocketAddr,
) -> String {
    let timers = &client.args.timers;
    let stats = &client.stats;
    let mut keepalive = tokio::time::interval_at(
        tokio::time::Instant::now() + timers.keepalive,
        timers.keepalive,
    );
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut deadline = tokio::time::Instant::now() + timers.timeout;
    loop {
        tokio::select! {
            biased;
            () = tokio::time::sleep_until(deadline) => {
                stats.timeouts.inc();
                return format!("server {server} silent for {:?}", timers.timeout);
            }
            item = framed.next() => match item {
                None => return "server closed the connection".into(),
                Some(Err(e)) => return format!("protocol error: {e}"),
                Some(Ok(frame)) => {
                    deadline = tokio::time::Instant::now() + timers.timeout;
                    stats.frames_in.inc();
                    match frame.kind {
                        MsgType::DataReply => match &client.tun {
                            Some(tun) => match tun.send(&frame.data).await {
                                Ok(_) => {
                                    stats.inband_packets_from_server.inc();
                                    stats.inband_bytes_from_server.add(frame.data.len() as u64);
                                }
                                Err(_) => stats.drop_tun_write_error.inc(),
                            },
                            None => stats.drop_unexpected_frame.inc(),
                        },
                        MsgType::Keepalive => stats.keepalives_in.inc(),
                        MsgType::AddrReply => {} // a repeated 101
                        MsgType::Error => {
                            stats.server_errors.inc();
                            return format!(
                                "server error: {}",
                                String::from_utf8_lossy(&frame.data).trim_end_matches('\0')
                            );
                        }
                        _ => stats.drop_unexpected_frame.inc(),
                    }
                }
            },
            Some(pkt) = rx.recv() => {
                let mut batch = vec![pkt];
                while batch.len() < WRITE_BATCH {
                    match rx.try_recv() {
                        Ok(p) => batch.push(p),
                        Err(_) => break,
                    }
                }
                let n = batch.len() as u64;
                let bytes: u64 = batch.iter().map(|p| p.len() as u64).sum();
                let write = async {
                    for p in batch {
                        framed.feed(Frame::new(MsgType::DataRequest, p)).await?;
                    }
                    framed.flush().await
                };
                match tokio::time::timeout(timers.timeout, write).await {
                    Ok(Ok(())) => {
                        stats.frames_out.add(n);
                        stats.inband_packets_to_server.add(n);
                        stats.inband_bytes_to_server.add(bytes);
                    }
                    Ok(Err(e)) => return format!("write error: {e}"),
                    Err(_) => return format!("server not reading for {:?}", timers.timeout),
                }
            }
            _ = keepalive.tick() => {
                match tokio::time::timeout(timers.timeout, framed.send(Frame::empty(MsgType::Keepalive))).await {
                    Ok(Ok(())) => {
                        stats.keepalives_out.inc();
                        stats.frames_out.inc();
                    }
                    Ok(Err(e)) => return format!("write error: {e}"),
                    Err(_) => return format!("server not reading for {:?}", timers.timeout),
                }
            }
        }
    }
}
