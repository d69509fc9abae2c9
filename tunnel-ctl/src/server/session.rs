//! One TCP session of the concentrator, the I/O side: admission, then the connection, the
//! session's packet queue and its timers feed [`machine::Session`], and the actions it returns
//! are carried out here (frames, TUN writes, fast-path bindings, IPv6 sync). Whatever goes
//! wrong in a session ends that session only.
use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use futures::{SinkExt as _, StreamExt as _};
use tokio::net::TcpStream;
use tokio_util::{codec::Framed, sync::CancellationToken};
use tracing::{info, warn};

use super::{
    Link, Locked, Server,
    admission::Refusal,
    machine::{self, Action, CloseReason},
    queue::{QueueRx, queue},
    state::Holder,
    store::{Claim, LeaseStore},
};
use crate::protocol::{
    Frame, FrameCodec, MsgType,
    frame::{self, WriteFailed},
};

/// 103 frames written per flush when packets queue up.
const WRITE_BATCH: usize = 64;

/// How often a client's address held by another concentrator is asked for again.
const HELD_RETRY: Duration = Duration::from_millis(500);

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
        let mut state = server.lock();
        let max = server.cfg().max_sessions;
        let full = max != 0 && state.sessions >= max;
        if !full {
            state.sessions += 1;
        }
        full
    };
    if full {
        server.stats.sessions_refused_full.inc();
        let max = server.cfg().max_sessions;
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

    let cfg = server.cfg();
    let (tx, rx) = queue(cfg.session_queue, cfg.session_buffer);
    let link = Link {
        tx,
        last_rx: Arc::new(AtomicU64::new(server.now_ms())),
        cancel: CancellationToken::new(),
        withdraw: Arc::default(),
        traffic: Arc::default(),
    };
    server.lock().links.insert(id, link.clone());
    let holder = Holder {
        id,
        peer: peer.ip(),
    };
    let machine = machine::Session::new(
        holder,
        server.session_cfg(),
        server.stats.clone(),
        std::time::Instant::now(),
    );
    let queue_of_tun = server.tun_queues[(id as usize) % server.tun_queues.len()].clone();
    let mut session = Driver {
        server: server.clone(),
        link,
        peer,
        machine,
        timeout: cfg.timeout,
        to_tun: crate::tundev::Writer::new(queue_of_tun),
    };
    let reason = session.serve(&mut framed, rx).await;

    let lease = session.machine.lease();
    let (ended, released6) = {
        let mut state = server.lock();
        state.sessions -= 1;
        state.links.remove(&id);
        state.session_ended(id);
        let released6 = session
            .machine
            .lease6()
            .map(|units| state.release6(&units, id));
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
        info!(%peer, session = id, "IPv6 {} released", machine::describe6(&units));
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

/// The I/O half of one session.
struct Driver {
    server: Arc<Server>,
    link: Link,
    peer: SocketAddr,
    machine: machine::Session,
    /// Writes that take longer end the session (the client stopped reading).
    timeout: Duration,
    /// The client's packets for the TUN, written together (GRO) once the frames that were
    /// in are handled.
    to_tun: crate::tundev::Writer,
}

/// Frames handled before their packets go to the TUN: what one read of the socket brings.
const FRAMES_PER_TUN_WRITE: usize = 64;

type Conn = Framed<TcpStream, FrameCodec>;

impl Driver {
    /// Runs until the session ends; returns why.
    async fn serve(&mut self, framed: &mut Conn, mut rx: QueueRx) -> CloseReason {
        let cancel = self.link.cancel.clone();
        let withdraw = self.link.withdraw.clone();
        loop {
            if let Some(reason) = self.run_actions(framed).await {
                return reason;
            }
            let wake = tokio::time::Instant::from_std(self.machine.poll_timeout());
            // Not biased: a client flooding us with 102s must not starve its own 103s.
            tokio::select! {
                () = cancel.cancelled() => self.machine.replaced(),
                () = withdraw.notified() => {
                    if let Some(addr) = self.machine.lease() {
                        self.machine.withdrawn(addr);
                    }
                }
                () = tokio::time::sleep_until(wake) => {
                    self.machine.handle_timeout(std::time::Instant::now());
                }
                item = framed.next() => {
                    let mut item = Some(item);
                    let mut handled = 0;
                    // The 102s (and 104s) already read go together: their packets are one
                    // TUN write per flow. Any other frame's actions run before the next.
                    // They arrived together too: one clock read for all of them (a read per
                    // frame was 3% of the worker's time in a TCP upload).
                    let now = std::time::Instant::now();
                    while let Some(next) = item.take() {
                        match next {
                            None if handled == 0 => return CloseReason::PeerClosed,
                            None => {
                                // What came before the close still goes out.
                                return self
                                    .run_actions(framed)
                                    .await
                                    .unwrap_or(CloseReason::PeerClosed);
                            }
                            Some(Err(e)) => {
                                self.machine.handle_frame_error(&e);
                                break;
                            }
                            Some(Ok(frame)) => {
                                if handled == 0 {
                                    self.link
                                        .last_rx
                                        .store(self.server.ms_at(now), Ordering::Relaxed);
                                }
                                let data = matches!(
                                    frame.kind,
                                    MsgType::DataRequest | MsgType::Keepalive
                                );
                                self.on_frame(frame, now).await;
                                handled += 1;
                                if data && handled < FRAMES_PER_TUN_WRITE {
                                    item = futures::FutureExt::now_or_never(framed.next());
                                }
                            }
                        }
                    }
                }
                Some(pkt) = rx.recv() => {
                    if let Err(reason) = self.write_packets(pkt, &mut rx, framed).await {
                        return reason;
                    }
                }
            }
        }
    }

    /// Hands `frame`, read at `now`, to the machine.
    async fn on_frame(&mut self, frame: Frame, now: std::time::Instant) {
        let claim = self.claim(&frame).await;
        // A claim may have waited for the lease store.
        let now = if claim.is_some() {
            std::time::Instant::now()
        } else {
            now
        };
        self.machine
            .handle_frame(frame, now, &mut Locked(&self.server, claim));
    }

    /// With a shared lease store, a 100 that needs a new address is answered by the store
    /// first (the machine then takes what it claimed). The client's address held by another
    /// concentrator that is about to give it up (its session ending, or its expiry passing
    /// after a crash) is waited for, up to half the timeout, then refused (the client retries).
    async fn claim(&self, frame: &Frame) -> Option<Claim> {
        let LeaseStore::Postgres(pg) = &self.server.store else {
            return None;
        };
        if frame.kind != MsgType::AddrRequest || self.machine.lease().is_some() {
            return None;
        }
        let holder = self.machine.holder();
        let stale = self.server.session_cfg().keepalive * 3 / 2;
        if self.server.reusable(holder, stale).is_some() {
            return None;
        }
        let give_up = tokio::time::Instant::now() + self.timeout / 2;
        loop {
            match pg.claim(holder.peer.to_canonical()).await {
                Claim::HeldElsewhere(_) if tokio::time::Instant::now() < give_up => {
                    tokio::time::sleep(HELD_RETRY).await;
                }
                claim => return Some(claim),
            }
        }
    }

    /// Carries out the machine's actions in order; `Some` when the session ends.
    async fn run_actions(&mut self, framed: &mut Conn) -> Option<CloseReason> {
        let server = self.server.clone();
        while let Some(action) = self.machine.next_action() {
            if let Action::ToTun(pkt) = &action {
                self.to_tun.push(pkt);
                self.link.traffic.rx(pkt.len());
                continue;
            }
            // Whatever follows the packets waits for them (a Close after a 102 included).
            self.flush_tun().await;
            match action {
                Action::Send(frame) => {
                    if let Err(reason) = self.send(framed, frame).await {
                        return Some(reason);
                    }
                }
                Action::ToTun(_) => unreachable!("pushed above"),
                Action::Bind {
                    addr,
                    endpoint,
                    share,
                } => {
                    let result = match (&server.native, share) {
                        (Some(native), None) => {
                            native.bind(endpoint, addr).map_err(|e| format!("{e:#}"))
                        }
                        // A shared lease is a softwire (RFC 7596): the lwAFTR path checks
                        // its port set both ways.
                        (Some(native), Some(share)) => {
                            let sw = crate::server::softwires::Softwire {
                                ipv4: addr,
                                psid: share.psid,
                                psid_len: share.psid_len,
                                psid_offset: share.offset,
                                b4: endpoint,
                                aftr: None,
                            };
                            let mut softwires = native.softwires();
                            // A restored or taken-over lease: its softwire may be in place.
                            match softwires.table().get(sw.key()).copied() {
                                Some(old) if old == sw => Ok(()),
                                Some(_) => softwires
                                    .del(sw.key())
                                    .and_then(|_| softwires.add(sw))
                                    .map_err(|e| format!("{e:#}")),
                                None => softwires.add(sw).map_err(|e| format!("{e:#}")),
                            }
                        }
                        (None, _) => Err("native mode is off".into()),
                    };
                    self.machine
                        .bind_done(addr, endpoint, result, &mut Locked(&server, None));
                }
                Action::Unbind { addr, endpoint } => {
                    if let Some(native) = &server.native {
                        native.unbind(endpoint, addr);
                    }
                }
                Action::Sync6(units) => {
                    if let Some(v6) = &server.ipv6
                        && let Err(e) = v6.sync(&units, |u| server.leased6(u)).await
                    {
                        server.stats.proxy_ndp_errors.inc();
                        warn!(peer = %self.peer, session = self.machine.id(), "{e:#}");
                    }
                }
                Action::LeasesChanged => server.leases_changed.notify_one(),
                Action::Close(reason) => return Some(reason),
            }
        }
        self.flush_tun().await;
        None
    }

    /// Writes the packets pushed for the TUN.
    async fn flush_tun(&mut self) {
        let (n, bytes) = (self.to_tun.len() as u64, self.to_tun.bytes() as u64);
        if n == 0 {
            return;
        }
        let stats = &self.server.stats;
        match self.to_tun.flush() {
            Ok(_) => {
                stats.inband_packets_to_tun.add(n);
                stats.inband_bytes_to_tun.add(bytes);
            }
            Err(e) => {
                stats.drop_tun_write_error.inc();
                self.machine.log_bad(format_args!("TUN write failed: {e}"));
            }
        }
    }

    /// Sends one frame (flushed), bounded by the timeout so a client that stopped reading
    /// cannot pin the session forever.
    async fn send(&self, framed: &mut Conn, frame: Frame) -> Result<(), CloseReason> {
        self.write(framed, [frame]).await
    }

    async fn write(
        &self,
        framed: &mut Conn,
        frames: impl IntoIterator<Item = Frame>,
    ) -> Result<(), CloseReason> {
        let timeout = self.timeout;
        let n = frame::write_frames(framed, timeout, frames)
            .await
            .map_err(|e| self.closed_by(e))?;
        self.server.stats.frames_out.add(n);
        Ok(())
    }

    /// Why the session ends after a failed write.
    fn closed_by(&self, e: WriteFailed) -> CloseReason {
        match e {
            WriteFailed::Error(e) => CloseReason::WriteError(e.to_string()),
            WriteFailed::Stalled => CloseReason::StoppedReading(self.timeout),
        }
    }

    /// Writes `first` and whatever else is queued (up to a batch): 103 frames as the TUN
    /// reader made them, in one `writev`. IPv6 packets pass the inbound filter first.
    async fn write_packets(
        &mut self,
        first: Bytes,
        rx: &mut QueueRx,
        framed: &mut Conn,
    ) -> Result<(), CloseReason> {
        let mut frames = Vec::with_capacity(8);
        let mut next = Some(first);
        let mut taken = 0;
        let now = std::time::Instant::now();
        while let Some(f) = next {
            taken += 1;
            if self.machine.inbound_allowed(&f[frame::HEADER_LEN..], now) {
                frames.push(f);
            }
            next = if taken < WRITE_BATCH {
                rx.try_recv(super::codel::stamp(now))
            } else {
                None
            };
        }
        let aqm = rx.take_aqm_drops();
        if aqm > 0 {
            self.server.stats.drop_session_aqm.add(aqm);
        }
        if frames.is_empty() {
            return Ok(());
        }
        let (n, bytes) = (
            frames.len() as u64,
            frames
                .iter()
                .map(|f| (f.len() - frame::HEADER_LEN) as u64)
                .sum(),
        );
        let written = frame::write_wire(framed, self.timeout, &frames)
            .await
            .map_err(|e| self.closed_by(e))?;
        self.server.stats.frames_out.add(written);
        self.link.traffic.tx(n, bytes);
        Ok(())
    }
}
