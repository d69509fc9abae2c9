//! One TCP session of the concentrator: admission, lease, in-band data, keepalive, timeout.
//! Whatever goes wrong in a session ends that session only.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use futures::{SinkExt as _, StreamExt as _};
use tokio::{net::TcpStream, time::Instant};
use tokio_util::{codec::Framed, sync::CancellationToken};
use tracing::{info, warn};

use super::{
    Server,
    admission::Refusal,
    inbound::{Flows, Verdict},
    queue::{QueueRx, queue},
    state::{Grant, SessionHandle, Units6},
};
use crate::{
    packet,
    protocol::{
        Frame, FrameCodec, FrameError, MsgType, frame,
        text::{Lease4, NativeGrant},
    },
};

/// 103 frames written per flush when packets queue up.
const WRITE_BATCH: usize = 64;

/// Logs the 1st, 2nd, 4th, 8th... occurrence: a misbehaving client cannot flood the log.
#[derive(Default)]
struct Throttle(u64);

impl Throttle {
    fn hit(&mut self) -> bool {
        self.0 += 1;
        self.0.is_power_of_two()
    }
}

pub async fn run(server: Arc<Server>, stream: TcpStream, peer: SocketAddr) {
    let id = server.next_session.fetch_add(1, Ordering::Relaxed);
    // IPv4 clients of the dual-stack socket show as IPv4 in logs, not ::ffff:a.b.c.d.
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    let peer_ip = peer.ip();
    let mut framed = frame::framed(stream);

    if !server.allowed(peer.ip()) {
        server.stats.sessions_refused_not_allowed.inc();
        info!(%peer, session = id, "refused: {peer_ip} is outside --allow");
        refuse(
            &server,
            &mut framed,
            &format!("not allowed: {peer_ip} is outside the server's allowed prefixes"),
        )
        .await;
        return;
    }
    if let Err(refusal) = server.admission.admit(peer_ip, std::time::Instant::now()) {
        let (log, text) = match refusal {
            Refusal::TooMany(max) => (
                server.stats.sessions_refused_per_source.inc_and_log(),
                format!(
                    "too many connections from {peer_ip}: at most {max} at once (--max-per-source)"
                ),
            ),
            Refusal::TooFast(rate) => (
                server.stats.sessions_refused_rate.inc_and_log(),
                format!(
                    "{peer_ip} is connecting too fast: at most {rate} new connections per second \
                     (--max-connect-rate)"
                ),
            ),
        };
        if log {
            info!(%peer, session = id, "refused: {text}");
        }
        refuse(&server, &mut framed, &text).await;
        return;
    }
    let _admitted = Admitted(&server, peer_ip);
    let full = {
        let mut state = server.state.lock().unwrap_or_else(|p| p.into_inner());
        let max = server.cfg.max_sessions;
        let full = max != 0 && state.sessions >= max;
        if !full {
            state.sessions += 1;
        }
        full
    };
    if full {
        server.stats.sessions_refused_full.inc();
        let max = server.cfg.max_sessions;
        info!(%peer, session = id, "refused: --max-sessions {max} reached");
        refuse(
            &server,
            &mut framed,
            &format!("server full: {max} sessions (--max-sessions)"),
        )
        .await;
        return;
    }
    server.stats.sessions_opened.inc();
    info!(%peer, session = id, "connected");

    let (tx, rx) = queue(server.cfg.session_queue, server.cfg.session_buffer);
    let handle = SessionHandle {
        id,
        peer: peer.ip(),
        tx,
        last_rx: Arc::new(AtomicU64::new(server.now_ms())),
        cancel: CancellationToken::new(),
    };
    let mut session = Session {
        server: server.clone(),
        handle,
        peer,
        lease: None,
        native: false,
        lease6: None,
        flows: Flows::default(),
        log_no_lease: Throttle::default(),
        log_bad_packet: Throttle::default(),
    };
    let reason = session.serve(&mut framed, rx).await;

    let lease = session.lease;
    let (ended, released6) = {
        let mut state = server.state.lock().unwrap_or_else(|p| p.into_inner());
        state.sessions -= 1;
        let released6 = session.lease6.map(|units| state.release6(&units, id));
        (lease.and_then(|addr| state.release(addr, id)), released6)
    };
    if let Some(ended) = ended {
        server.ended(&[ended]);
    }
    // Only what this session still held: a unit taken over by the client's new session
    // keeps its proxy entry.
    if let (Some(units), Some(v6)) = (
        released6.filter(|u| u.iter().next().is_some()),
        &server.ipv6,
    ) {
        if let Err(e) = v6.sync(&units, |u| server.leased6(u)).await {
            warn!(%peer, session = id, "{e:#}");
        }
        info!(%peer, session = id, "IPv6 {} released", describe6(&units));
    }
    server.stats.sessions_closed.inc();
    match lease {
        Some(addr) => info!(%peer, session = id, "closed ({reason}); lease {addr} released"),
        None => info!(%peer, session = id, "closed ({reason})"),
    }
}

/// Gives the per-source admission back when the connection ends, however it ends.
struct Admitted<'a>(&'a Server, IpAddr);

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.0.admission.release(self.1);
    }
}

/// Sends a 110 and lets the connection close.
async fn refuse(server: &Server, framed: &mut Framed<TcpStream, FrameCodec>, text: &str) {
    let send = framed.send(Frame::text(MsgType::Error, text));
    if tokio::time::timeout(Duration::from_secs(2), send)
        .await
        .is_ok()
    {
        server.stats.frames_out.inc();
    }
}

struct Session {
    server: Arc<Server>,
    handle: SessionHandle,
    peer: SocketAddr,
    lease: Option<Ipv4Addr>,
    /// The lease is in native mode (bound in the fast path).
    native: bool,
    /// IPv6 (107/108).
    lease6: Option<Units6>,
    /// The inbound filter's view of this client's IPv6 flows.
    flows: Flows,
    log_no_lease: Throttle,
    log_bad_packet: Throttle,
}

type Conn = Framed<TcpStream, FrameCodec>;

impl Session {
    /// Runs until the session ends; returns why.
    async fn serve(&mut self, framed: &mut Conn, mut rx: QueueRx) -> String {
        let cfg = self.server.cfg.clone();
        let mut keepalive = tokio::time::interval_at(Instant::now() + cfg.keepalive, cfg.keepalive);
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut deadline = Instant::now() + cfg.timeout;
        let handshake = Instant::now() + cfg.handshake_timeout;
        let cancel = self.handle.cancel.clone();
        loop {
            // Not biased: a client flooding us with 102s must not starve its own 103s.
            tokio::select! {
                () = cancel.cancelled() => {
                    self.server.stats.sessions_replaced.inc();
                    self.lease = None; // moved to the new session
                    return "replaced by a new connection from the same client".into();
                }
                () = tokio::time::sleep_until(deadline) => {
                    self.server.stats.sessions_timed_out.inc();
                    return format!("timeout: nothing received for {:?}", cfg.timeout);
                }
                () = tokio::time::sleep_until(handshake), if self.lease.is_none() && self.lease6.is_none() => {
                    self.server.stats.sessions_handshake_timeout.inc();
                    return format!(
                        "no address request (100 or 107) within {:?} of connecting (--handshake-timeout)",
                        cfg.handshake_timeout
                    );
                }
                item = framed.next() => match item {
                    None => return "peer closed the connection".into(),
                    Some(Err(e)) => {
                        self.count_frame_error(&e);
                        return format!("protocol error: {e}");
                    }
                    Some(Ok(frame)) => {
                        deadline = Instant::now() + cfg.timeout;
                        self.handle.last_rx.store(self.server.now_ms(), Ordering::Relaxed);
                        self.server.stats.frames_in.inc();
                        if let Some(reason) = self.on_frame(frame, framed).await {
                            return reason;
                        }
                    }
                },
                Some(pkt) = rx.recv() => {
                    if let Err(reason) = self.write_packets(pkt, &mut rx, framed).await {
                        return reason;
                    }
                }
                _ = keepalive.tick() => {
                    self.server.stats.keepalives_out.inc();
                    if let Err(reason) = self.send(framed, Frame::empty(MsgType::Keepalive)).await {
                        return reason;
                    }
                }
            }
        }
    }

    fn count_frame_error(&self, e: &FrameError) {
        let s = &self.server.stats;
        match e {
            FrameError::TooShort(_) => s.protocol_error_frame_too_short.inc(),
            FrameError::TooLong(_) | FrameError::DataTooLong(_) => {
                s.protocol_error_frame_too_long.inc()
            }
            FrameError::UnknownType(_) => s.protocol_error_unknown_type.inc(),
            FrameError::Io(_) => s.protocol_error_io.inc(),
        }
        if !matches!(e, FrameError::Io(_)) {
            warn!(peer = %self.peer, session = self.handle.id, "protocol error: {e}; closing");
        }
    }

    /// Sends one frame (flushed), bounded by the timeout so a client that stopped reading
    /// cannot pin the session forever.
    async fn send(&self, framed: &mut Conn, frame: Frame) -> Result<(), String> {
        match tokio::time::timeout(self.server.cfg.timeout, framed.send(frame)).await {
            Ok(Ok(())) => {
                self.server.stats.frames_out.inc();
                Ok(())
            }
            Ok(Err(e)) => Err(format!("write error: {e}")),
            Err(_) => Err(format!(
                "client stopped reading for {:?}",
                self.server.cfg.timeout
            )),
        }
    }

    /// Writes `first` and whatever else is queued (up to a batch) as 103 frames, one flush.
    /// IPv6 packets pass the inbound filter first.
    async fn write_packets(
        &mut self,
        first: Bytes,
        rx: &mut QueueRx,
        framed: &mut Conn,
    ) -> Result<(), String> {
        let mut frames = Vec::with_capacity(8);
        let mut next = Some(first);
        let mut taken = 0;
        while let Some(p) = next {
            taken += 1;
            if self.inbound_allowed(&p) {
                frames.push(Frame::new(MsgType::DataReply, p));
            }
            next = if taken < WRITE_BATCH {
                rx.try_recv()
            } else {
                None
            };
        }
        if frames.is_empty() {
            return Ok(());
        }
        let n = frames.len() as u64;
        let write = async {
            for f in frames {
                framed.feed(f).await?;
            }
            framed.flush().await
        };
        match tokio::time::timeout(self.server.cfg.timeout, write).await {
            Ok(Ok(())) => {
                self.server.stats.frames_out.add(n);
                Ok(())
            }
            Ok(Err(e)) => Err(format!("write error: {e}")),
            Err(_) => Err(format!(
                "client stopped reading for {:?}",
                self.server.cfg.timeout
            )),
        }
    }

    /// The default-deny inbound filter on the client's IPv6 (IPv4 passes).
    fn inbound_allowed(&mut self, pkt: &[u8]) -> bool {
        let Some(v6) = &self.server.ipv6 else {
            return true;
        };
        if pkt.first().map(|b| b >> 4) != Some(6) {
            return true;
        }
        match self
            .flows
            .inbound(pkt, &v6.allow_in, std::time::Instant::now())
        {
            Verdict::Pass => true,
            Verdict::Deny => {
                self.server.stats.drop_inbound_denied.inc();
                false
            }
        }
    }

    /// Handles one frame; `Some(reason)` ends the session.
    async fn on_frame(&mut self, frame: Frame, framed: &mut Conn) -> Option<String> {
        match frame.kind {
            MsgType::AddrRequest => self.on_addr_request(framed).await,
            MsgType::DataRequest => {
                self.on_data(&frame.data).await;
                None
            }
            MsgType::Keepalive => {
                self.server.stats.keepalives_in.inc();
                None
            }
            MsgType::NativeRequest if self.server.native.is_some() => {
                self.on_native_request(&frame.data, framed).await
            }
            MsgType::Ipv6Request if self.server.ipv6.is_some() => {
                self.on_ipv6_request(framed).await
            }
            MsgType::NativeRequest | MsgType::Ipv6Request => {
                self.server.stats.unsupported_request.inc();
                let what = if frame.kind == MsgType::NativeRequest {
                    "native mode (105)"
                } else {
                    "IPv6 (107)"
                };
                let text = format!("not supported: {what} is not enabled on this server");
                info!(peer = %self.peer, session = self.handle.id, "{text}");
                let _ = self.send(framed, Frame::text(MsgType::Error, &text)).await;
                Some(text)
            }
            other => {
                self.server.stats.protocol_error_unexpected_type.inc();
                warn!(
                    peer = %self.peer,
                    session = self.handle.id,
                    "protocol error: clients do not send type {}; closing",
                    other.code()
                );
                Some(format!(
                    "protocol error: unexpected type {} from a client",
                    other.code()
                ))
            }
        }
    }

    async fn on_addr_request(&mut self, framed: &mut Conn) -> Option<String> {
        let addr = match self.lease {
            // Some clients resend 100 until they see 101: same lease again.
            Some(addr) => addr,
            None => {
                // A live client sends something at least every keepalive interval.
                let stale_ms = (self.server.cfg.keepalive.as_millis() * 3 / 2) as u64;
                let grant = {
                    let mut state = self.server.state.lock().unwrap_or_else(|p| p.into_inner());
                    state.grant(&self.handle, self.server.now_ms(), stale_ms)
                };
                match grant {
                    Grant::New(addr) => {
                        info!(peer = %self.peer, session = self.handle.id, "leased {addr}");
                        addr
                    }
                    Grant::Restored(addr) => {
                        info!(
                            peer = %self.peer,
                            session = self.handle.id,
                            "leased {addr} again (saved before the server restarted)"
                        );
                        addr
                    }
                    Grant::TakenOver(addr, old) => {
                        info!(
                            peer = %self.peer,
                            session = self.handle.id,
                            "leased {addr} (taken over from silent session {old} of the same client)"
                        );
                        addr
                    }
                    Grant::Limited(limit) => {
                        self.server.stats.lease_limit_refused.inc();
                        let text = limit.text();
                        warn!(peer = %self.peer, session = self.handle.id, "{text}");
                        let _ = self.send(framed, Frame::text(MsgType::Error, &text)).await;
                        return Some(text);
                    }
                    Grant::Exhausted => {
                        self.server.stats.pool_exhausted.inc();
                        let text = {
                            let state = self.server.state.lock().unwrap_or_else(|p| p.into_inner());
                            format!(
                                "pool exhausted: all {} addresses of pool {} are leased",
                                state.pool.capacity(),
                                state.pool.describe()
                            )
                        };
                        warn!(peer = %self.peer, session = self.handle.id, "{text}");
                        let _ = self.send(framed, Frame::text(MsgType::Error, &text)).await;
                        return Some(text);
                    }
                }
            }
        };
        if self.lease.is_none() {
            self.server.stats.leases_granted.inc();
            self.lease = Some(addr);
            // A restored or taken-over lease may already be native.
            let state = self.server.state.lock().unwrap_or_else(|p| p.into_inner());
            self.native = matches!(
                state.lease_of(addr, self.handle.id),
                Some((super::state::Mode::Native, _))
            );
            drop(state);
            self.server.leases_changed.notify_one();
        }
        let text = Lease4 {
            addr,
            route: Ipv4Addr::UNSPECIFIED,
            dns: self.server.cfg.dns,
            extra: vec![],
        }
        .to_string();
        // 101 goes out on its own write (some clients cannot take it batched with a 104).
        self.send(framed, Frame::text(MsgType::AddrReply, &text))
            .await
            .err()
    }

    /// A 107: an IPv6 address and/or prefix for this client, answered with 108 (the same one
    /// again for a repeated 107).
    async fn on_ipv6_request(&mut self, framed: &mut Conn) -> Option<String> {
        let server = self.server.clone();
        let v6 = server.ipv6.as_ref().expect("checked by the caller");
        let units = match self.lease6 {
            Some(units) => units,
            None => {
                let grant = server
                    .state
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .grant6(&self.handle);
                let units = match grant {
                    Ok(units) => units,
                    Err(text) => {
                        server.stats.ipv6_pool_exhausted.inc();
                        warn!(peer = %self.peer, session = self.handle.id, "107 refused: {text}");
                        let _ = self.send(framed, Frame::text(MsgType::Error, &text)).await;
                        return Some(text);
                    }
                };
                self.lease6 = Some(units);
                if let Err(e) = v6.sync(&units, |u| server.leased6(u)).await {
                    server.stats.proxy_ndp_errors.inc();
                    warn!(peer = %self.peer, session = self.handle.id, "{e:#}");
                }
                server.stats.ipv6_leases_granted.inc();
                info!(peer = %self.peer, session = self.handle.id, "leased IPv6 {}", describe6(&units));
                units
            }
        };
        let text = v6.lease_text(&units);
        self.send(framed, Frame::text(MsgType::Ipv6Reply, &text))
            .await
            .err()
    }

    /// A 105: bind the lease to the client's IPv6 address in the fast path and answer 106
    /// "<tunnel-addr> <mtu>". The endpoint must be the session's own address: a client cannot
    /// point another host's traffic somewhere else.
    async fn on_native_request(&mut self, data: &[u8], framed: &mut Conn) -> Option<String> {
        let server = self.server.clone();
        let native = server.native.as_ref().expect("checked by the caller");
        let (addr, endpoint) = match self.bind_native(data) {
            Ok(pair) => pair,
            Err(text) => {
                server.stats.native_refused.inc();
                warn!(peer = %self.peer, session = self.handle.id, "105 refused: {text}");
                let _ = self.send(framed, Frame::text(MsgType::Error, &text)).await;
                return Some(text);
            }
        };
        self.native = true;
        server.stats.native_granted.inc();
        server.leases_changed.notify_one();
        info!(
            peer = %self.peer,
            session = self.handle.id,
            "native mode for {addr}: {endpoint} ↔ {} (inner MTU {})",
            native.tunnel_addr,
            native.inner_mtu
        );
        let reply = NativeGrant {
            tunnel: native.tunnel_addr,
            mtu: native.inner_mtu,
        }
        .to_string();
        self.send(framed, Frame::text(MsgType::NativeReply, &reply))
            .await
            .err()
    }

    /// Checks a 105 and installs the binding; Err is the 110 text.
    fn bind_native(&self, data: &[u8]) -> Result<(Ipv4Addr, Ipv6Addr), String> {
        let native = self.server.native.as_ref().expect("checked by the caller");
        let addr = self
            .lease
            .ok_or("native mode (105) before a lease: send 100 first")?;
        let peer = match self.peer.ip() {
            IpAddr::V6(p) if p.to_ipv4_mapped().is_none() => p,
            _ => return Err("native mode needs a client connected over IPv6".into()),
        };
        let text = String::from_utf8_lossy(data);
        let text = text.trim_matches(|c: char| c == '\0' || c.is_whitespace());
        let endpoint = if text.is_empty() {
            peer
        } else {
            text.parse::<Ipv6Addr>()
                .map_err(|_| format!("bad 105: {text:?} is not an IPv6 address"))?
        };
        if endpoint != peer {
            return Err(format!(
                "native endpoint {endpoint} is not this session's address {peer}"
            ));
        }
        self.server
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set_native(addr, self.handle.id, endpoint)?;
        if let Err(e) = native.bind(endpoint, addr) {
            self.server
                .state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .set_inband(addr, self.handle.id);
            return Err(format!("fast path unavailable: {e:#}"));
        }
        Ok((addr, endpoint))
    }

    /// A 102 on a native lease: the client went back to in-band (an old client, or a
    /// fallback); its binding goes so that its traffic takes the TUN again.
    fn leave_native(&mut self, addr: Ipv4Addr) {
        self.native = false;
        let old = self
            .server
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set_inband(addr, self.handle.id);
        if let (Some(t), Some(native)) = (old, &self.server.native) {
            native.unbind(t, addr);
            info!(peer = %self.peer, session = self.handle.id, "{addr} back to in-band");
        }
        self.server.leases_changed.notify_one();
    }

    /// A 102: each IPv4 packet whose source is the lease goes to the TUN; the rest is dropped
    /// and counted.
    async fn on_data(&mut self, data: &[u8]) {
        if self.native
            && let Some(addr) = self.lease
        {
            self.leave_native(addr);
        }
        let server = self.server.clone();
        let stats = &server.stats;
        if self.lease.is_none() && self.lease6.is_none() {
            stats.drop_data_before_lease.inc();
            if self.log_no_lease.hit() {
                warn!(
                    peer = %self.peer,
                    session = self.handle.id,
                    "102 before any lease (100 or 107); packet dropped (occurrence {})",
                    self.log_no_lease.0
                );
            }
            return;
        }
        let (packets, malformed_tail) = packet::split_packets(data);
        if malformed_tail {
            stats.drop_malformed_packet.inc();
            self.log_bad(format_args!("malformed packet data in 102"));
        }
        for pkt in packets {
            match self.check_source(pkt) {
                Ok(v6) => {
                    if v6 {
                        if !self.flows.outbound(pkt, std::time::Instant::now()) {
                            stats.inbound_flows_untracked.inc();
                        }
                        stats.ipv6_packets_to_tun.inc();
                    }
                    match server.tun.send(pkt).await {
                        Ok(_) => {
                            stats.inband_packets_to_tun.inc();
                            stats.inband_bytes_to_tun.add(pkt.len() as u64);
                        }
                        Err(e) => {
                            stats.drop_tun_write_error.inc();
                            self.log_bad(format_args!("TUN write failed: {e}"));
                        }
                    }
                }
                Err(BadSource::Spoofed(src)) => {
                    stats.drop_spoofed_source.inc();
                    self.log_bad(format_args!(
                        "source {src} is not the lease of this client; dropped"
                    ));
                }
                Err(BadSource::NoLease(family)) => {
                    let text = match family {
                        6 => {
                            stats.drop_ipv6_without_lease.inc();
                            "IPv6 packet without an IPv6 lease (107); dropped"
                        }
                        _ => {
                            stats.drop_data_before_lease.inc();
                            "IPv4 packet without an IPv4 lease (100); dropped"
                        }
                    };
                    self.log_bad(format_args!("{text}"));
                }
                Err(BadSource::Malformed) => {
                    stats.drop_malformed_packet.inc();
                    self.log_bad(format_args!("malformed packet; dropped"));
                }
            }
        }
    }

    /// Ok(is IPv6) when the packet's source is this client's lease of its family.
    fn check_source(&self, pkt: &[u8]) -> Result<bool, BadSource> {
        match packet::source(pkt) {
            Some(IpAddr::V4(src)) => match self.lease {
                Some(lease) if lease == src => Ok(false),
                Some(_) => Err(BadSource::Spoofed(IpAddr::V4(src))),
                None => Err(BadSource::NoLease(4)),
            },
            Some(IpAddr::V6(src)) => match &self.lease6 {
                Some(units) if units.contains(src) => Ok(true),
                Some(_) => Err(BadSource::Spoofed(IpAddr::V6(src))),
                None => Err(BadSource::NoLease(6)),
            },
            None => Err(BadSource::Malformed),
        }
    }

    fn log_bad(&mut self, what: std::fmt::Arguments<'_>) {
        if self.log_bad_packet.hit() {
            warn!(
                peer = %self.peer,
                session = self.handle.id,
                "{what} (bad packet {})",
                self.log_bad_packet.0
            );
        }
    }
}

/// Why a 102 packet was not forwarded.
enum BadSource {
    Spoofed(IpAddr),
    /// No lease of this IP version (4 or 6).
    NoLease(u8),
    Malformed,
}

/// "2001:db8:600::2/128 and 2001:db8:700:5::/64".
fn describe6(units: &Units6) -> String {
    units
        .iter()
        .map(|u| u.to_string())
        .collect::<Vec<_>>()
        .join(" and ")
}
