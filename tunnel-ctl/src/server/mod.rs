//! `tunnel-ctl server`: the 4over6 concentrator (SPEC §3-§5).
//!
//! Layout: [`state`] holds the pool and the lease table (the single source of truth), one
//! [`session`] task runs per TCP connection, and the TUN reader here routes packets from the
//! kernel to the session that holds the destination's lease.
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, atomic::AtomicU64},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use serde_json::json;
use tokio::net::{TcpListener, TcpSocket};
use tracing::{debug, info, warn};
use tun::AsyncDevice;

use crate::{
    cli::ServerArgs,
    counters, dns,
    instance::Instance,
    mgmt::{self, Handler, Request, Response},
    netlink::Netlink,
    packet,
    pool::Pool,
    protocol::text::three_dns,
    tundev,
};

pub mod session;
pub mod state;

use state::State;

counters! {
    pub struct ServerStats {
        sessions_opened,
        sessions_closed,
        sessions_timed_out,
        sessions_replaced,
        sessions_refused_not_allowed,
        sessions_refused_full,
        leases_granted,
        pool_exhausted,
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
        drop_not_ipv4,
        drop_no_lease_for_destination,
        drop_tun_not_ipv4,
        drop_session_queue_full,
        drop_tun_write_error,
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
}

/// Everything the sessions share.
pub struct Server {
    pub cfg: Config,
    pub state: std::sync::Mutex<State>,
    pub stats: ServerStats,
    pub tun: Arc<AsyncDevice>,
    pub started: Instant,
    pub next_session: AtomicU64,
    instance: Instance,
    listen: SocketAddr,
    tun_name: String,
}

impl Server {
    /// Milliseconds since the server started (cheap timestamps for liveness).
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Whether `peer` may connect (`--allow`; IPv4-mapped peers match IPv4 prefixes too).
    pub fn allowed(&self, peer: IpAddr) -> bool {
        if self.cfg.allow.is_empty() {
            return true;
        }
        let canonical = peer.to_canonical();
        self.cfg
            .allow
            .iter()
            .any(|net| net.contains(&peer) || net.contains(&canonical))
    }
}

impl Handler for Server {
    fn handle(&self, request: Request) -> Response {
        match request {
            Request::Status => {
                let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
                Response::Ok(json!({
                    "role": "server",
                    "instance": self.instance.name(),
                    "pid": std::process::id(),
                    "uptime_s": self.started.elapsed().as_secs(),
                    "listen": self.listen.to_string(),
                    "tun": self.tun_name,
                    "pool": state.pool.describe(),
                    "pool_size": state.pool.capacity(),
                    "leases": state.pool.in_use(),
                    "sessions": state.sessions,
                }))
            }
            Request::Stats => Response::Ok(json!(self.stats.snapshot())),
            Request::Leases => {
                let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
                Response::Ok(json!(state.lease_list()))
            }
        }
    }
}

pub async fn run(args: ServerArgs) -> Result<()> {
    let instance = args.instance.instance.clone();
    mgmt::ensure_not_running(&instance)?;
    let pool = Pool::new(&args.pool, &[args.gateway], args.hold)
        .map_err(|e| anyhow::anyhow!("--pool: {e}"))?;
    let dns = match args.dns.as_slice() {
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
    };

    let listener =
        bind_dual_stack(args.listen).with_context(|| format!("listening on {}", args.listen))?;
    let tun = setup_tun(&args).await?;
    let server = Arc::new(Server {
        cfg: Config {
            keepalive: args.timers.keepalive,
            timeout: args.timers.timeout,
            dns,
            max_sessions: args.max_sessions,
            allow: args.allow.clone(),
        },
        state: std::sync::Mutex::new(State::new(pool)),
        stats: ServerStats::default(),
        tun,
        started: Instant::now(),
        next_session: AtomicU64::new(1),
        instance: instance.clone(),
        listen: args.listen,
        tun_name: args.tun.clone(),
    });
    let mgmt = mgmt::bind(&instance)?;
    info!(
        "serving 4over6 on {} (pool {}, gateway {}, TUN {}, DNS {} {} {}, keepalive {:?}, timeout {:?}, hold {:?})",
        args.listen,
        server.state.lock().expect("fresh").pool.describe(),
        args.gateway,
        args.tun,
        dns[0],
        dns[1],
        dns[2],
        args.timers.keepalive,
        args.timers.timeout,
        args.hold
    );

    tokio::select! {
        () = accept_loop(server.clone(), listener) => {}
        () = tun_reader(server.clone()) => {}
        () = mgmt.serve(server.clone()) => {}
        signal = crate::shutdown_signal() => info!("{signal}: closing all sessions"),
    }
    Ok(())
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
async fn setup_tun(args: &ServerArgs) -> Result<Arc<AsyncDevice>> {
    let tun = tundev::create(&args.tun)?;
    let nl = Netlink::connect()?;
    let index = nl.index(&args.tun).await?;
    nl.up(index, tundev::TUN_MTU).await?;
    nl.add_address(index, IpAddr::V4(args.gateway), 32).await?;
    for range in &args.pool {
        for net in range.subnets() {
            nl.route_v4(net, index).await?;
        }
    }
    let forwarding = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap_or_default();
    if forwarding.trim() != "1" {
        info!("enabling net.ipv4.ip_forward (clients' traffic is routed through this host)");
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
            .context("enabling net.ipv4.ip_forward")?;
    }
    Ok(tun)
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

/// Packets the kernel routed to the TUN (destination in the pool) → the session holding that
/// address, as 103. Unknown destinations are dropped and counted.
async fn tun_reader(server: Arc<Server>) {
    let mut buf = vec![0u8; 65536];
    loop {
        let n = match server.tun.recv(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                warn!("reading TUN: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let pkt = &buf[..n];
        // IPv6 here is the kernel's own chatter on the TUN (router solicitations, MLD) until
        // IPv6 leases exist.
        let Some(IpAddr::V4(dst)) = packet::destination(pkt) else {
            server.stats.drop_tun_not_ipv4.inc();
            continue;
        };
        let tx = {
            let state = server.state.lock().unwrap_or_else(|p| p.into_inner());
            state.sender_for(dst)
        };
        match tx {
            Some(tx) => match tx.try_send(Bytes::copy_from_slice(pkt)) {
                Ok(()) => {
                    server.stats.inband_packets_from_tun.inc();
                    server.stats.inband_bytes_from_tun.add(n as u64);
                }
                Err(_) => server.stats.drop_session_queue_full.inc(),
            },
            None => {
                server.stats.drop_no_lease_for_destination.inc();
                debug!("TUN packet to {dst}: no lease, dropped");
            }
        }
    }
}
