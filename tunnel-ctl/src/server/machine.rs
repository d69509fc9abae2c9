//! The server's session state machine (SPEC §3): frames and timer events in, a queue of
//! [`Action`]s out. No sockets, no TUN, no clock reads: the daemon ([`super::session`]) feeds
//! it what arrived and the time, executes the actions in order, and reports back the outcome
//! of the one action that can fail in a way the protocol answers ([`Action::Bind`]).
//!
//! The lease table is reached through [`Leases`], so the daemon can take its lock per call and
//! the tests can hand in a plain [`State`].
use std::{
    collections::VecDeque,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use tracing::{info, warn};

use super::{
    ServerStats,
    inbound::{AllowIn, Flows, Verdict},
    ipv6::GATEWAY6,
    state::{Grant, Holder, Mode, SharedGrant, Sharing, State, Units6},
};
use crate::{
    packet,
    protocol::{
        Frame, FrameError, MsgType,
        text::{Lease4, Lease6, NativeGrant, Share},
    },
};

/// What a session needs to know of the server's configuration.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub keepalive: Duration,
    pub timeout: Duration,
    pub handshake_timeout: Duration,
    /// The 101's three DNS servers.
    pub dns: [Ipv4Addr; 3],
    /// Native mode (105/106) when the fast path runs: the tunnel address and inner MTU.
    pub native: Option<NativeGrant>,
    /// IPv6 for clients (107/108) when a pool is configured.
    pub ipv6: Option<Ipv6Offer>,
    /// `--share`: a client that asks for native mode before its lease (105 before 100)
    /// gets a shared lease.
    pub sharing: Option<Sharing>,
}

#[derive(Debug, Clone)]
pub struct Ipv6Offer {
    /// The 108's DNS servers.
    pub dns: Vec<Ipv6Addr>,
    /// `--allow-in`: the inbound filter's open ports.
    pub allow_in: Vec<AllowIn>,
}

/// The lease table as a session sees it.
pub trait Leases {
    /// Runs `f` on the table (under its lock, if it has one).
    fn with_table<R>(&mut self, f: impl FnOnce(&mut State) -> R) -> R;

    /// An address for `holder` (see [`State::grant`]); a session silent for longer than
    /// `stale` as of `now` may lose its lease to `holder` (the implementation closes it).
    fn grant(&mut self, holder: Holder, stale: Duration, now: Instant) -> Grant;

    /// A shared lease for `holder` bound to `tunnel` (see [`State::grant_shared`]).
    fn grant_shared(
        &mut self,
        holder: Holder,
        tunnel: Ipv6Addr,
        stale: Duration,
        now: Instant,
    ) -> Result<SharedGrant, Grant>;

    fn grant6(&mut self, holder: Holder) -> Result<Units6, String> {
        self.with_table(|t| t.grant6(holder))
    }
    fn mode(&mut self, addr: Ipv4Addr, session_id: u64) -> Option<Mode> {
        self.with_table(|t| t.lease_of(addr, session_id).map(|(m, _)| m))
    }
    fn set_native(
        &mut self,
        addr: Ipv4Addr,
        session_id: u64,
        tunnel: Ipv6Addr,
    ) -> Result<(), String> {
        self.with_table(|t| t.set_native(addr, session_id, tunnel))
    }
    fn set_inband(&mut self, addr: Ipv4Addr, session_id: u64) -> Option<Ipv6Addr> {
        self.with_table(|t| t.set_inband(addr, session_id))
    }
    /// "all N addresses of pool P".
    fn describe_pool(&mut self) -> String {
        self.with_table(|t| t.pool_text())
    }
}

impl State {
    /// "all N addresses of pool P".
    pub fn pool_text(&self) -> String {
        format!(
            "all {} addresses of pool {}",
            self.pool.capacity(),
            self.pool.describe()
        )
    }
}

/// What the daemon does for the machine, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// One frame, flushed on its own (101 must not share a write with a 104 for some clients).
    Send(Frame),
    /// A packet from the client (a 102's content) for the TUN.
    ToTun(Bytes),
    /// Install the fast-path binding (a softwire for a shared lease), then call
    /// [`Session::bind_done`].
    Bind {
        addr: Ipv4Addr,
        endpoint: Ipv6Addr,
        share: Option<Share>,
    },
    /// Remove a fast-path binding.
    Unbind { addr: Ipv4Addr, endpoint: Ipv6Addr },
    /// Make the kernel (proxy NDP, routes) agree with the table on these units.
    Sync6(Units6),
    /// The lease file must be written.
    LeasesChanged,
    /// End the session (after any 110 queued before this).
    Close(CloseReason),
}

/// Why a session ended: the log text and, where the client is told, its 110.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    PeerClosed,
    /// A newer connection of the same client took the lease over.
    Replaced,
    Timeout(Duration),
    HandshakeTimeout(Duration),
    /// The byte stream is not frames.
    Protocol(String),
    /// A server-to-client type from the client.
    UnexpectedType(u8),
    /// 105 or 107 while that service is off.
    Unsupported(&'static str),
    LeaseLimit(String),
    PoolExhausted(String),
    /// The shared lease store cannot grant now.
    LeaseStore(String),
    Ipv6PoolExhausted(String),
    NativeRefused(String),
    WriteError(String),
    StoppedReading(Duration),
    /// A reload took the lease's address out of the pool.
    Withdrawn(String),
}

impl CloseReason {
    /// The 110 text this reason sends, if any.
    pub fn error_text(&self) -> Option<String> {
        match self {
            CloseReason::Unsupported(_)
            | CloseReason::LeaseLimit(_)
            | CloseReason::PoolExhausted(_)
            | CloseReason::LeaseStore(_)
            | CloseReason::Ipv6PoolExhausted(_)
            | CloseReason::NativeRefused(_)
            | CloseReason::Withdrawn(_) => Some(self.to_string()),
            _ => None,
        }
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::PeerClosed => write!(f, "peer closed the connection"),
            CloseReason::Replaced => write!(f, "replaced by a new connection from the same client"),
            CloseReason::Timeout(t) => write!(f, "timeout: nothing received for {t:?}"),
            CloseReason::HandshakeTimeout(t) => write!(
                f,
                "no address request (100 or 107) within {t:?} of connecting (--handshake-timeout)"
            ),
            CloseReason::Protocol(e) => write!(f, "protocol error: {e}"),
            CloseReason::UnexpectedType(t) => {
                write!(f, "protocol error: unexpected type {t} from a client")
            }
            CloseReason::Unsupported(what) => {
                write!(f, "not supported: {what} is not enabled on this server")
            }
            CloseReason::LeaseLimit(t)
            | CloseReason::PoolExhausted(t)
            | CloseReason::LeaseStore(t)
            | CloseReason::Ipv6PoolExhausted(t)
            | CloseReason::NativeRefused(t)
            | CloseReason::Withdrawn(t) => f.write_str(t),
            CloseReason::WriteError(e) => write!(f, "write error: {e}"),
            CloseReason::StoppedReading(t) => write!(f, "client stopped reading for {t:?}"),
        }
    }
}

/// Logs the 1st, 2nd, 4th, 8th... occurrence: a misbehaving client cannot flood the log.
#[derive(Default, Debug)]
struct Throttle(u64);

impl Throttle {
    fn hit(&mut self) -> bool {
        self.0 += 1;
        self.0.is_power_of_two()
    }
}

/// One session's protocol state.
pub struct Session {
    holder: Holder,
    cfg: Arc<SessionConfig>,
    stats: Arc<ServerStats>,
    lease: Option<Ipv4Addr>,
    /// The lease is shared: its port set.
    share: Option<Share>,
    /// A 105 came before the 100: the endpoint it named (a shared lease needs it).
    native_first: Option<Ipv6Addr>,
    /// The lease is bound in the fast path.
    native: bool,
    lease6: Option<Units6>,
    /// The inbound filter's view of this client's IPv6 flows.
    flows: Flows,
    /// Nothing received by then: timeout.
    deadline: Instant,
    /// No 100/107 by then: handshake timeout.
    handshake: Instant,
    next_keepalive: Instant,
    actions: VecDeque<Action>,
    closed: bool,
    log_no_lease: Throttle,
    log_bad_packet: Throttle,
}

/// Without the shared configuration and counters.
impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.holder.id)
            .field("lease", &self.lease)
            .field("native", &self.native)
            .field("lease6", &self.lease6)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// A session that connected at `now` (admission already passed).
    pub fn new(
        holder: Holder,
        cfg: Arc<SessionConfig>,
        stats: Arc<ServerStats>,
        now: Instant,
    ) -> Session {
        Session {
            holder,
            deadline: now + cfg.timeout,
            handshake: now + cfg.handshake_timeout,
            next_keepalive: now + cfg.keepalive,
            cfg,
            stats,
            lease: None,
            share: None,
            native_first: None,
            native: false,
            lease6: None,
            flows: Flows::default(),
            actions: VecDeque::new(),
            closed: false,
            log_no_lease: Throttle::default(),
            log_bad_packet: Throttle::default(),
        }
    }

    pub fn holder(&self) -> Holder {
        self.holder
    }

    pub fn id(&self) -> u64 {
        self.holder.id
    }

    /// The IPv4 lease this session holds (none after a takeover).
    pub fn lease(&self) -> Option<Ipv4Addr> {
        self.lease
    }

    pub fn lease6(&self) -> Option<Units6> {
        self.lease6
    }

    #[cfg(test)]
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    pub fn next_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`Session::handle_timeout`] is due next.
    pub fn poll_timeout(&self) -> Instant {
        let mut t = self.deadline.min(self.next_keepalive);
        if self.lease.is_none() && self.lease6.is_none() {
            t = t.min(self.handshake);
        }
        t
    }

    /// Timers: the session timeout, the handshake timeout, the keepalive.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.closed {
            return;
        }
        if now >= self.deadline {
            self.stats.sessions_timed_out.inc();
            return self.close(CloseReason::Timeout(self.cfg.timeout));
        }
        if self.lease.is_none() && self.lease6.is_none() && now >= self.handshake {
            self.stats.sessions_handshake_timeout.inc();
            return self.close(CloseReason::HandshakeTimeout(self.cfg.handshake_timeout));
        }
        if now >= self.next_keepalive {
            self.stats.keepalives_out.inc();
            self.actions
                .push_back(Action::Send(Frame::empty(MsgType::Keepalive)));
            self.next_keepalive = now + self.cfg.keepalive;
        }
    }

    /// A newer session of the same client took the lease over: this one ends without
    /// releasing it.
    pub fn replaced(&mut self) {
        if self.closed {
            return;
        }
        self.stats.sessions_replaced.inc();
        self.lease = None;
        self.close(CloseReason::Replaced);
    }

    /// A reload took `addr` out of the pool: if it is this session's lease, the client hears
    /// 110 "address withdrawn" and the session ends (releasing it for good).
    pub fn withdrawn(&mut self, addr: Ipv4Addr) {
        if self.closed || self.lease != Some(addr) {
            return;
        }
        self.stats.leases_withdrawn.inc();
        let text = format!("address withdrawn: {addr} is no longer in this server's pool");
        info!(peer = %self.holder.peer, session = self.holder.id, "{text}");
        self.refuse(CloseReason::Withdrawn(text));
    }

    /// The connection delivered bytes that are not frames.
    pub fn handle_frame_error(&mut self, e: &FrameError) {
        let s = &self.stats;
        match e {
            FrameError::TooShort(_) => s.protocol_error_frame_too_short.inc(),
            FrameError::TooLong(_) | FrameError::DataTooLong(_) => {
                s.protocol_error_frame_too_long.inc()
            }
            FrameError::UnknownType(_) => s.protocol_error_unknown_type.inc(),
            FrameError::Io(_) => s.protocol_error_io.inc(),
        }
        if !matches!(e, FrameError::Io(_)) {
            warn!(peer = %self.holder.peer, session = self.holder.id, "protocol error: {e}; closing");
        }
        self.close(CloseReason::Protocol(e.to_string()));
    }

    /// A frame from the client.
    pub fn handle_frame(&mut self, frame: Frame, now: Instant, leases: &mut impl Leases) {
        if self.closed {
            return;
        }
        self.deadline = now + self.cfg.timeout;
        self.stats.frames_in.inc();
        match frame.kind {
            MsgType::AddrRequest => self.on_addr_request(now, leases),
            MsgType::DataRequest => self.on_data(&frame.data, now, leases),
            MsgType::Keepalive => self.stats.keepalives_in.inc(),
            MsgType::NativeRequest if self.cfg.native.is_some() => {
                self.on_native_request(&frame.data, leases)
            }
            MsgType::Ipv6Request if self.cfg.ipv6.is_some() => self.on_ipv6_request(leases),
            MsgType::NativeRequest | MsgType::Ipv6Request => {
                self.stats.unsupported_request.inc();
                let what = if frame.kind == MsgType::NativeRequest {
                    "native mode (105)"
                } else {
                    "IPv6 (107)"
                };
                let reason = CloseReason::Unsupported(what);
                info!(peer = %self.holder.peer, session = self.holder.id, "{reason}");
                self.refuse(reason);
            }
            other => {
                self.stats.protocol_error_unexpected_type.inc();
                warn!(
                    peer = %self.holder.peer, session = self.holder.id,
                    "protocol error: clients do not send type {}; closing",
                    other.code()
                );
                self.close(CloseReason::UnexpectedType(other.code()));
            }
        }
    }

    /// Whether an IPv6 packet for the client passes the default-deny inbound filter (IPv4
    /// always does).
    pub fn inbound_allowed(&mut self, pkt: &[u8], now: Instant) -> bool {
        let Some(v6) = &self.cfg.ipv6 else {
            return true;
        };
        if pkt.first().map(|b| b >> 4) != Some(6) {
            return true;
        }
        match self.flows.inbound(pkt, &v6.allow_in, now) {
            Verdict::Pass => true,
            Verdict::Deny => {
                self.stats.drop_inbound_denied.inc();
                false
            }
        }
    }

    /// The outcome of an [`Action::Bind`]: 106 on success; on failure the lease goes back to
    /// in-band and the session ends with a 110 naming the error.
    pub fn bind_done(
        &mut self,
        addr: Ipv4Addr,
        endpoint: Ipv6Addr,
        result: Result<(), String>,
        leases: &mut impl Leases,
    ) {
        let Some(mut grant) = self.cfg.native else {
            return;
        };
        if let Err(e) = result {
            // A shared lease has no in-band fallback: it ends with the session.
            if self.share.is_none() {
                leases.set_inband(addr, self.holder.id);
            }
            return self.refuse_native(format!("fast path unavailable: {e}"));
        }
        grant.share = self.share;
        self.native = true;
        self.stats.native_granted.inc();
        self.actions.push_back(Action::LeasesChanged);
        info!(
            peer = %self.holder.peer, session = self.holder.id,
            "native mode for {addr}{}: {endpoint} ↔ {} (inner MTU {})",
            self.share.map(|s| format!(" {s}")).unwrap_or_default(), grant.tunnel, grant.mtu
        );
        self.send_text(MsgType::NativeReply, &grant.to_string());
    }

    fn close(&mut self, reason: CloseReason) {
        self.closed = true;
        self.actions.push_back(Action::Close(reason));
    }

    /// A 110 with the reason's text, then the end.
    fn refuse(&mut self, reason: CloseReason) {
        if let Some(text) = reason.error_text() {
            self.send_text(MsgType::Error, &text);
        }
        self.close(reason);
    }

    fn send_text(&mut self, kind: MsgType, text: &str) {
        self.actions
            .push_back(Action::Send(Frame::text(kind, text)));
    }

    fn on_addr_request(&mut self, now: Instant, leases: &mut impl Leases) {
        let id = self.holder.id;
        // Some clients resend 100 until they see 101: the same lease again.
        let addr = match self.lease {
            Some(addr) => addr,
            None if let (Some(sharing), Some(endpoint)) = (self.cfg.sharing, self.native_first) => {
                let stale = self.cfg.keepalive * 3 / 2;
                match leases.grant_shared(self.holder, endpoint, stale, now) {
                    Ok(g) => {
                        let share = sharing.share(g.psid);
                        info!(
                            peer = %self.holder.peer, session = id,
                            "leased {} {share}{}", g.ipv4,
                            match (g.restored, g.taken_over) {
                                (true, _) => " again (saved before the server restarted)".to_owned(),
                                (_, Some(old)) => format!(" (taken over from silent session {old} of the same client)"),
                                _ => String::new(),
                            }
                        );
                        self.stats.leases_granted.inc();
                        self.stats.shared_leases_granted.inc();
                        self.lease = Some(g.ipv4);
                        self.share = Some(share);
                        self.actions.push_back(Action::LeasesChanged);
                        g.ipv4
                    }
                    Err(refusal) => return self.refused_grant(refusal, leases),
                }
            }
            None => {
                // A live client sends something at least every keepalive interval.
                let stale = self.cfg.keepalive * 3 / 2;
                let addr = match leases.grant(self.holder, stale, now) {
                    Grant::New(addr) => {
                        info!(peer = %self.holder.peer, session = id, "leased {addr}");
                        addr
                    }
                    Grant::Restored(addr) => {
                        info!(
                            peer = %self.holder.peer, session = id,
                            "leased {addr} again (saved before the server restarted)"
                        );
                        addr
                    }
                    Grant::TakenOver(addr, old) => {
                        info!(
                            peer = %self.holder.peer, session = id,
                            "leased {addr} (taken over from silent session {old} of the same client)"
                        );
                        addr
                    }
                    refusal @ (Grant::Limited(_)
                    | Grant::Exhausted
                    | Grant::Conflict(_)
                    | Grant::StoreUnavailable(_)
                    | Grant::HeldElsewhere(_)) => {
                        return self.refused_grant(refusal, leases);
                    }
                };
                self.stats.leases_granted.inc();
                self.lease = Some(addr);
                // A restored or taken-over lease may already be native.
                self.native = leases.mode(addr, id) == Some(Mode::Native);
                self.actions.push_back(Action::LeasesChanged);
                addr
            }
        };
        let extra = match self.share {
            Some(s) => vec![
                ("psid".to_owned(), format!("{}/{}", s.psid, s.psid_len)),
                ("offset".to_owned(), s.offset.to_string()),
            ],
            None => vec![],
        };
        let text = Lease4 {
            addr,
            route: Ipv4Addr::UNSPECIFIED,
            dns: self.cfg.dns,
            extra,
        }
        .to_string();
        self.send_text(MsgType::AddrReply, &text);
        // A 105 came first: native mode now (once; a repeated 100 only repeats the 101).
        if let Some(endpoint) = self.native_first.take() {
            if self.share.is_some() {
                let share = self.share;
                self.actions.push_back(Action::Bind {
                    addr,
                    endpoint,
                    share,
                });
            } else {
                // As a 105 after the lease: bound again (also a restored native lease), 106.
                match leases.set_native(addr, self.holder.id, endpoint) {
                    Ok(()) => self.actions.push_back(Action::Bind {
                        addr,
                        endpoint,
                        share: None,
                    }),
                    Err(text) => self.refuse_native(text),
                }
            }
        }
    }

    /// A lease request that the table refused: a 110 naming why.
    fn refused_grant(&mut self, refusal: Grant, leases: &mut impl Leases) {
        let id = self.holder.id;
        match refusal {
            Grant::Limited(limit) => {
                self.stats.lease_limit_refused.inc();
                let text = limit.text();
                warn!(peer = %self.holder.peer, session = id, "{text}");
                self.refuse(CloseReason::LeaseLimit(text));
            }
            Grant::Conflict(text) => self.refuse_native(text),
            Grant::StoreUnavailable(text) => {
                if self.stats.lease_store_unavailable.inc_and_log() {
                    warn!(peer = %self.holder.peer, session = id, "{text}");
                }
                self.refuse(CloseReason::LeaseStore(text));
            }
            Grant::HeldElsewhere(text) => {
                self.stats.lease_held_elsewhere.inc();
                info!(peer = %self.holder.peer, session = id, "{text}");
                self.refuse(CloseReason::LeaseStore(text));
            }
            _ => {
                self.stats.pool_exhausted.inc();
                let what = if self.native_first.is_some() && self.cfg.sharing.is_some() {
                    format!("every PSID of {}", leases.describe_pool())
                } else {
                    leases.describe_pool()
                };
                let text = format!("pool exhausted: {what} are leased");
                warn!(peer = %self.holder.peer, session = id, "{text}");
                self.refuse(CloseReason::PoolExhausted(text));
            }
        }
    }

    /// A 107: an IPv6 address and/or prefix, answered with 108 (the same again for a repeat).
    fn on_ipv6_request(&mut self, leases: &mut impl Leases) {
        let units = match self.lease6 {
            Some(units) => units,
            None => match leases.grant6(self.holder) {
                Ok(units) => {
                    self.lease6 = Some(units);
                    self.actions.push_back(Action::Sync6(units));
                    self.stats.ipv6_leases_granted.inc();
                    info!(
                        peer = %self.holder.peer, session = self.holder.id,
                        "leased IPv6 {}",
                        describe6(&units)
                    );
                    units
                }
                Err(text) => {
                    self.stats.ipv6_pool_exhausted.inc();
                    warn!(peer = %self.holder.peer, session = self.holder.id, "107 refused: {text}");
                    return self.refuse(CloseReason::Ipv6PoolExhausted(text));
                }
            },
        };
        let dns = self
            .cfg
            .ipv6
            .as_ref()
            .map(|v| v.dns.clone())
            .unwrap_or_default();
        let text = lease6_text(&units, dns);
        self.send_text(MsgType::Ipv6Reply, &text);
    }

    /// A 105: the endpoint must be the session's own IPv6 address (a client cannot point
    /// another host's traffic somewhere else); the table records it, then [`Action::Bind`].
    fn on_native_request(&mut self, data: &[u8], leases: &mut impl Leases) {
        if self.lease.is_none() {
            // Before the 100: the lease will be native from the start (a shared one with
            // `--share`); the 106 follows the 101.
            return match self.native_endpoint(data) {
                Ok(endpoint) => self.native_first = Some(endpoint),
                Err(text) => self.refuse_native(text),
            };
        }
        if self.share.is_some() {
            // Already bound (its 106 went out after the 101).
            return;
        }
        match self.check_native(data, leases) {
            Ok((addr, endpoint)) => self.actions.push_back(Action::Bind {
                addr,
                endpoint,
                share: None,
            }),
            Err(text) => self.refuse_native(text),
        }
    }

    fn refuse_native(&mut self, text: String) {
        self.stats.native_refused.inc();
        warn!(peer = %self.holder.peer, session = self.holder.id, "105 refused: {text}");
        self.refuse(CloseReason::NativeRefused(text));
    }

    fn check_native(
        &self,
        data: &[u8],
        leases: &mut impl Leases,
    ) -> Result<(Ipv4Addr, Ipv6Addr), String> {
        let addr = self
            .lease
            .ok_or("native mode (105) before a lease: send 100 first")?;
        let endpoint = self.native_endpoint(data)?;
        leases.set_native(addr, self.holder.id, endpoint)?;
        Ok((addr, endpoint))
    }

    /// The endpoint a 105 names: this session's own IPv6 address (a client cannot point
    /// another host's traffic somewhere else).
    fn native_endpoint(&self, data: &[u8]) -> Result<Ipv6Addr, String> {
        let peer = match self.holder.peer {
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
        Ok(endpoint)
    }

    /// A 102: each packet whose source is this client's lease goes to the TUN; the rest is
    /// dropped and counted. On a native lease the client went back to in-band (an old client,
    /// or a fallback): its binding goes, so its traffic takes the TUN again.
    fn on_data(&mut self, data: &Bytes, now: Instant, leases: &mut impl Leases) {
        if self.share.is_some() {
            // A shared address's ports belong to several clients: no in-band path for it.
            self.stats.drop_inband_on_shared_lease.inc();
            self.log_bad(format_args!(
                "102 on a shared lease (native mode only); dropped"
            ));
            return;
        }
        if self.native
            && let Some(addr) = self.lease
        {
            self.native = false;
            if let Some(endpoint) = leases.set_inband(addr, self.holder.id) {
                self.actions.push_back(Action::Unbind { addr, endpoint });
                info!(peer = %self.holder.peer, session = self.holder.id, "{addr} back to in-band");
            }
            self.actions.push_back(Action::LeasesChanged);
        }
        let stats = self.stats.clone();
        if self.lease.is_none() && self.lease6.is_none() {
            stats.drop_data_before_lease.inc();
            if self.log_no_lease.hit() {
                warn!(
                    peer = %self.holder.peer, session = self.holder.id,
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
                        if !self.flows.outbound(pkt, now) {
                            stats.inbound_flows_untracked.inc();
                        }
                        stats.ipv6_packets_to_tun.inc();
                    }
                    self.actions.push_back(Action::ToTun(data.slice_ref(pkt)));
                }
                Err(BadSource::Spoofed(src)) => {
                    stats.drop_spoofed_source.inc();
                    self.log_bad(format_args!(
                        "source {src} is not the lease of this client; dropped"
                    ));
                }
                Err(BadSource::NoLease(6)) => {
                    stats.drop_ipv6_without_lease.inc();
                    self.log_bad(format_args!(
                        "IPv6 packet without an IPv6 lease (107); dropped"
                    ));
                }
                Err(BadSource::NoLease(_)) => {
                    stats.drop_data_before_lease.inc();
                    self.log_bad(format_args!(
                        "IPv4 packet without an IPv4 lease (100); dropped"
                    ));
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

    /// Logs a packet-level problem (throttled).
    pub fn log_bad(&mut self, what: fmt::Arguments<'_>) {
        if self.log_bad_packet.hit() {
            warn!(
                peer = %self.holder.peer, session = self.holder.id,
                "{what} (bad packet {})", self.log_bad_packet.0
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

/// The 108 text for `units`.
pub fn lease6_text(units: &Units6, dns: Vec<Ipv6Addr>) -> String {
    let (addr, len, delegated) = match (units.addr, units.delegated) {
        (Some(a), d) => (a.addr(), 128, d),
        // Only a prefix: the client numbers itself <prefix>::1.
        (None, Some(d)) => (
            Ipv6Addr::from(u128::from(d.network()) | 1),
            d.prefix_len(),
            None,
        ),
        (None, None) => unreachable!("a grant has at least one unit"),
    };
    Lease6 {
        addr,
        len,
        gateway: GATEWAY6,
        dns,
        delegated,
    }
    .to_string()
}

/// "2001:db8:600::2/128 and 2001:db8:700:5::/64".
pub fn describe6(units: &Units6) -> String {
    units
        .iter()
        .map(|u| u.to_string())
        .collect::<Vec<_>>()
        .join(" and ")
}

#[cfg(test)]
mod tests {
    //! The SPEC §3 rules, driven with a fake clock and a plain lease table: no socket, no TUN.
    use std::collections::HashSet;

    use etherparse::PacketBuilder;

    use super::*;
    use crate::{pool::Pool, pool6::Pool6, server::state::SavedLease};

    const DNS: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 53);
    const TUNNEL: &str = "2001:db8:ff::1";
    const CLIENT6: &str = "2001:db8:1::10";

    fn cfg(native: bool, ipv6: bool) -> Arc<SessionConfig> {
        Arc::new(SessionConfig {
            keepalive: Duration::from_secs(10),
            timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(5),
            dns: [DNS; 3],
            native: native.then(|| NativeGrant {
                tunnel: TUNNEL.parse().unwrap(),
                mtu: 1460,
                share: None,
            }),
            sharing: None,
            ipv6: ipv6.then(|| Ipv6Offer {
                dns: vec!["2001:db8:53::1".parse().unwrap()],
                allow_in: vec![],
            }),
        })
    }

    /// A table over `range` ("a-b"); sessions in `silent` count as silent.
    fn table(range: &str) -> Table<impl Fn(u64) -> bool> {
        let pool = Pool::new(&[range.parse().unwrap()], &[], Duration::from_secs(300)).unwrap();
        let mut state = State::new(pool);
        state.pool6 = Some(Pool6::new("2001:db8:600::/126".parse().unwrap(), 128).unwrap());
        state.delegate = Some(Pool6::new("2001:db8:700::/62".parse().unwrap(), 64).unwrap());
        Table {
            state,
            silent: |id| SILENT.with(|s| s.borrow().contains(&id)),
        }
    }

    /// A [`State`] alone: a session is silent when `silent` says so.
    struct Table<F: Fn(u64) -> bool> {
        state: State,
        silent: F,
    }

    impl<F: Fn(u64) -> bool> Leases for Table<F> {
        fn with_table<R>(&mut self, f: impl FnOnce(&mut State) -> R) -> R {
            f(&mut self.state)
        }
        fn grant(&mut self, holder: Holder, _stale: Duration, _now: Instant) -> Grant {
            self.state.grant(holder, &self.silent)
        }
        fn grant_shared(
            &mut self,
            holder: Holder,
            tunnel: Ipv6Addr,
            _stale: Duration,
            _now: Instant,
        ) -> Result<SharedGrant, Grant> {
            self.state.grant_shared(holder, tunnel, &self.silent)
        }
    }

    thread_local! {
        static SILENT: std::cell::RefCell<HashSet<u64>> = Default::default();
    }

    struct Lab {
        t0: Instant,
        stats: Arc<ServerStats>,
    }

    impl Lab {
        fn new() -> Lab {
            SILENT.with(|s| s.borrow_mut().clear());
            Lab {
                t0: Instant::now(),
                stats: Arc::default(),
            }
        }

        fn session(&self, id: u64, peer: &str, cfg: &Arc<SessionConfig>) -> Session {
            let holder = Holder {
                id,
                peer: peer.parse().unwrap(),
            };
            Session::new(holder, cfg.clone(), self.stats.clone(), self.t0)
        }

        fn at(&self, secs: u64) -> Instant {
            self.t0 + Duration::from_secs(secs)
        }
    }

    fn drain(s: &mut Session) -> Vec<Action> {
        std::iter::from_fn(|| s.next_action()).collect()
    }

    fn frame(kind: MsgType, data: &[u8]) -> Frame {
        Frame::new(kind, Bytes::copy_from_slice(data))
    }

    fn send(kind: MsgType, text: &str) -> Action {
        Action::Send(Frame::text(kind, text))
    }

    fn refused(text: &str, reason: CloseReason) -> Vec<Action> {
        vec![send(MsgType::Error, text), Action::Close(reason)]
    }

    fn udp4(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ipv4(src.octets(), dst.octets(), 64).udp(4000, 53);
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        out
    }

    fn udp6(src: &str, dst: &str, sport: u16, dport: u16) -> Vec<u8> {
        let (s, d): (Ipv6Addr, Ipv6Addr) = (src.parse().unwrap(), dst.parse().unwrap());
        let b = PacketBuilder::ipv6(s.octets(), d.octets(), 64).udp(sport, dport);
        let mut out = Vec::new();
        b.write(&mut out, b"hi").unwrap();
        out
    }

    /// A native lease of `addr` bound to `endpoint`, as a restart finds it in the file.
    fn restore_native(state: &mut State, addr: Ipv4Addr, endpoint: Ipv6Addr) {
        let saved = SavedLease {
            ipv4: addr,
            client: IpAddr::V6(endpoint),
            mode: Mode::Native,
            since: "2026-12-01T00:00:00Z".into(),
            tunnel: Some(endpoint),
            psid: None,
            psid_len: None,
            psid_offset: None,
        };
        assert!(state.restore(&[saved], Duration::from_secs(30)).is_empty());
    }

    fn lease_of(s: &mut Session, t: &mut impl Leases, now: Instant) -> Ipv4Addr {
        s.handle_frame(Frame::empty(MsgType::AddrRequest), now, t);
        drain(s);
        s.lease().expect("leased")
    }

    #[test]
    fn a_100_gets_a_101_with_the_lease_and_dns_and_the_lease_file_is_written() {
        let lab = Lab::new();
        let mut t = table("198.51.100.7-198.51.100.7");
        let mut s = lab.session(1, CLIENT6, &cfg(false, false));
        s.handle_frame(Frame::empty(MsgType::AddrRequest), lab.at(1), &mut t);
        assert_eq!(
            drain(&mut s),
            vec![
                Action::LeasesChanged,
                send(
                    MsgType::AddrReply,
                    "198.51.100.7 0.0.0.0 192.0.2.53 192.0.2.53 192.0.2.53"
                ),
            ]
        );
        assert_eq!(lab.stats.leases_granted.get(), 1);
        assert_eq!(t.state.lease_list()[0].session, Some(1));
    }

    #[test]
    fn a_repeated_100_gets_the_same_lease_again_and_takes_nothing_more() {
        let lab = Lab::new();
        let mut t = table("198.51.100.7-198.51.100.8");
        let mut s = lab.session(1, CLIENT6, &cfg(false, false));
        let addr = lease_of(&mut s, &mut t, lab.at(1));
        s.handle_frame(Frame::empty(MsgType::AddrRequest), lab.at(2), &mut t);
        let text = format!("{addr} 0.0.0.0 192.0.2.53 192.0.2.53 192.0.2.53");
        assert_eq!(drain(&mut s), vec![send(MsgType::AddrReply, &text)]);
        assert_eq!(lab.stats.leases_granted.get(), 1);
        assert_eq!(t.state.pool.in_use(), 1);
    }

    #[test]
    fn a_105_binds_the_sessions_own_address_and_106_follows_the_binding() {
        let lab = Lab::new();
        let mut t = table("198.51.100.7-198.51.100.7");
        let mut s = lab.session(1, CLIENT6, &cfg(true, false));
        let addr = lease_of(&mut s, &mut t, lab.at(1));
        s.handle_frame(frame(MsgType::NativeRequest, b""), lab.at(2), &mut t);
        let endpoint: Ipv6Addr = CLIENT6.parse().unwrap();
        assert_eq!(
            drain(&mut s),
            vec![Action::Bind {
                addr,
                endpoint,
                share: None
            }]
        );
        assert_eq!(t.state.bindings(), vec![(addr, endpoint)]);
        s.bind_done(addr, endpoint, Ok(()), &mut t);
        assert_eq!(
            drain(&mut s),
            vec![
                Action::LeasesChanged,
                send(MsgType::NativeReply, "2001:db8:ff::1 1460")
            ]
        );
        assert_eq!(lab.stats.native_granted.get(), 1);
        // The endpoint may also be named explicitly (padded with NULs, as C clients do).
        s.handle_frame(
            frame(MsgType::NativeRequest, b"2001:db8:1::10\0"),
            lab.at(3),
            &mut t,
        );
        assert_eq!(
            drain(&mut s),
            vec![Action::Bind {
                addr,
                endpoint,
                share: None
            }]
        );
    }

    #[test]
    fn a_105_is_refused_before_a_lease_over_ipv4_for_another_endpoint_or_garbage() {
        let lab = Lab::new();
        let native = cfg(true, false);
        let cases: [(&str, &[u8], bool, &str); 4] = [
            // Before the lease too (a 105 may come first).
            (
                "192.0.2.9",
                b"",
                false,
                "native mode needs a client connected over IPv6",
            ),
            (
                "192.0.2.9",
                b"",
                true,
                "native mode needs a client connected over IPv6",
            ),
            (
                CLIENT6,
                b"2001:db8:1::99",
                true,
                "native endpoint 2001:db8:1::99 is not this session's address 2001:db8:1::10",
            ),
            (
                CLIENT6,
                b"not-an-address",
                true,
                "bad 105: \"not-an-address\" is not an IPv6 address",
            ),
        ];
        for (n, (peer, data, lease_first, text)) in cases.into_iter().enumerate() {
            let mut t = table("198.51.100.7-198.51.100.7");
            let mut s = lab.session(n as u64 + 1, peer, &native);
            if lease_first {
                lease_of(&mut s, &mut t, lab.at(1));
            }
            s.handle_frame(frame(MsgType::NativeRequest, data), lab.at(2), &mut t);
            assert_eq!(
                drain(&mut s),
                refused(text, CloseReason::NativeRefused(text.into())),
                "{peer} {data:?}"
            );
            assert!(s.is_closed());
            assert!(t.state.bindings().is_empty(), "nothing bound: {text}");
        }
        assert_eq!(lab.stats.native_refused.get(), 4);
    }

    fn shared_cfg(psid_len: u8) -> Arc<SessionConfig> {
        let mut c = (*cfg(true, false)).clone();
        c.sharing = Some(Sharing {
            psid_len,
            offset: 6,
        });
        Arc::new(c)
    }

    fn shared_table(range: &str, psid_len: u8) -> Table<impl Fn(u64) -> bool> {
        let mut t = table(range);
        t.state.sharing = Some(Sharing {
            psid_len,
            offset: 6,
        });
        t
    }

    /// Session `id` from `2001:db8:1::<id>`: 105, then 100.
    fn native_first(lab: &Lab, id: u64, c: &Arc<SessionConfig>, t: &mut impl Leases) -> Session {
        let peer = format!("2001:db8:1::{id:x}");
        let mut s = lab.session(id, &peer, c);
        s.handle_frame(frame(MsgType::NativeRequest, b""), lab.at(1), t);
        assert_eq!(drain(&mut s), vec![], "nothing until the 100");
        s.handle_frame(Frame::empty(MsgType::AddrRequest), lab.at(1), t);
        s
    }

    #[test]
    fn a_105_before_the_100_without_share_makes_the_whole_lease_native_at_once() {
        let lab = Lab::new();
        let mut t = table("198.51.100.7-198.51.100.7");
        let mut s = native_first(&lab, 1, &cfg(true, false), &mut t);
        let addr = Ipv4Addr::new(198, 51, 100, 7);
        let endpoint: Ipv6Addr = "2001:db8:1::1".parse().unwrap();
        assert_eq!(
            drain(&mut s),
            vec![
                Action::LeasesChanged,
                send(
                    MsgType::AddrReply,
                    "198.51.100.7 0.0.0.0 192.0.2.53 192.0.2.53 192.0.2.53"
                ),
                Action::Bind {
                    addr,
                    endpoint,
                    share: None
                },
            ]
        );
        s.bind_done(addr, endpoint, Ok(()), &mut t);
        assert_eq!(
            drain(&mut s),
            vec![
                Action::LeasesChanged,
                send(MsgType::NativeReply, "2001:db8:ff::1 1460")
            ]
        );
        assert_eq!(t.state.bindings(), vec![(addr, endpoint)]);
    }

    #[test]
    fn a_restored_native_lease_asked_105_first_is_bound_again_and_gets_its_106() {
        let lab = Lab::new();
        let mut t = table("198.51.100.7-198.51.100.7");
        let addr = Ipv4Addr::new(198, 51, 100, 7);
        let endpoint: Ipv6Addr = "2001:db8:1::1".parse().unwrap();
        restore_native(&mut t.state, addr, endpoint);
        let mut s = native_first(&lab, 1, &cfg(true, false), &mut t);
        assert_eq!(
            drain(&mut s).last(),
            Some(&Action::Bind {
                addr,
                endpoint,
                share: None
            })
        );
        s.bind_done(addr, endpoint, Ok(()), &mut t);
        assert!(drain(&mut s).contains(&send(MsgType::NativeReply, "2001:db8:ff::1 1460")));
    }

    #[test]
    fn with_share_4_one_address_serves_four_native_clients_and_nobody_else() {
        let lab = Lab::new();
        let c = shared_cfg(2);
        let mut t = shared_table("198.51.100.7-198.51.100.7", 2);
        let addr = Ipv4Addr::new(198, 51, 100, 7);
        let mut sessions = Vec::new();
        for id in 1..=4u64 {
            let mut s = native_first(&lab, id, &c, &mut t);
            let endpoint: Ipv6Addr = format!("2001:db8:1::{id:x}").parse().unwrap();
            let psid = id - 1;
            let share = Share {
                psid: psid as u16,
                psid_len: 2,
                offset: 6,
            };
            assert_eq!(
                drain(&mut s),
                vec![
                    Action::LeasesChanged,
                    send(
                        MsgType::AddrReply,
                        &format!(
                            "198.51.100.7 0.0.0.0 192.0.2.53 192.0.2.53 192.0.2.53 psid={psid}/2 offset=6"
                        )
                    ),
                    Action::Bind {
                        addr,
                        endpoint,
                        share: Some(share)
                    },
                ]
            );
            s.bind_done(addr, endpoint, Ok(()), &mut t);
            assert_eq!(
                drain(&mut s),
                vec![
                    Action::LeasesChanged,
                    send(
                        MsgType::NativeReply,
                        &format!("2001:db8:ff::1 1460 psid={psid}/2 offset=6")
                    )
                ]
            );
            sessions.push(s);
        }
        let rows = t.state.lease_list();
        assert_eq!(
            rows.iter().map(|r| (r.ipv4, r.psid)).collect::<Vec<_>>(),
            (0..4).map(|p| (addr, Some(p))).collect::<Vec<_>>()
        );
        assert!(
            rows.iter()
                .all(|r| r.psid_len == Some(2) && r.psid_offset == Some(6))
        );
        assert_eq!(t.state.shared_softwires().len(), 4);
        // A fifth native client, and an in-band one: the address is all given out.
        let mut fifth = native_first(&lab, 5, &c, &mut t);
        assert!(
            matches!(&drain(&mut fifth)[..], [Action::Send(f), Action::Close(CloseReason::PoolExhausted(_))] if f.kind == MsgType::Error)
        );
        let mut inband = lab.session(6, "2001:db8:1::6", &c);
        inband.handle_frame(Frame::empty(MsgType::AddrRequest), lab.at(1), &mut t);
        assert!(matches!(
            drain(&mut inband).last(),
            Some(Action::Close(CloseReason::PoolExhausted(_)))
        ));
        // A 102 on a shared lease goes nowhere.
        sessions[0].handle_frame(
            Frame::new(
                MsgType::DataRequest,
                Bytes::from(udp4(addr, Ipv4Addr::new(192, 0, 2, 1), b"x")),
            ),
            lab.at(2),
            &mut t,
        );
        assert_eq!(drain(&mut sessions[0]), vec![]);
        assert_eq!(lab.stats.drop_inband_on_shared_lease.get(), 1);
        // Session 2 ends: its PSID is free again, and held for its client.
        let ended = t.state.release(addr, 2).expect("held");
        assert_eq!(
            (ended.psid, ended.tunnel),
            (Some(1), Some("2001:db8:1::2".parse().unwrap()))
        );
        let mut again = native_first(&lab, 2, &c, &mut t);
        assert!(drain(&mut again).contains(&send(
            MsgType::AddrReply,
            "198.51.100.7 0.0.0.0 192.0.2.53 192.0.2.53 192.0.2.53 psid=1/2 offset=6"
        )));
        // The lease file keeps the PSIDs; a restart restores all four.
        let saved = t.state.saved();
        assert_eq!(saved.iter().filter(|s| s.psid.is_some()).count(), 4);
        let mut restarted = shared_table("198.51.100.7-198.51.100.7", 2);
        assert!(
            restarted
                .state
                .restore(&saved, Duration::from_secs(30))
                .is_empty()
        );
        assert_eq!(restarted.state.shared_softwires().len(), 4);
        let mut back = native_first(&lab, 3, &c, &mut restarted);
        assert!(drain(&mut back).contains(&send(
            MsgType::AddrReply,
            "198.51.100.7 0.0.0.0 192.0.2.53 192.0.2.53 192.0.2.53 psid=2/2 offset=6"
        )));
        // All four released: the address goes back to the pool whole.
        for id in 1..=4 {
            t.state.release(addr, id);
        }
        assert!(t.state.shared_softwires().is_empty());
        let mut whole = lab.session(9, "2001:db8:1::9", &c);
        assert_eq!(lease_of(&mut whole, &mut t, lab.at(3)), addr);
    }

    #[test]
    fn an_endpoint_bound_to_another_lease_is_refused() {
        let lab = Lab::new();
        let native = cfg(true, false);
        let mut t = table("198.51.100.7-198.51.100.8");
        let mut a = lab.session(1, CLIENT6, &native);
        let addr_a = lease_of(&mut a, &mut t, lab.at(1));
        a.handle_frame(frame(MsgType::NativeRequest, b""), lab.at(1), &mut t);
        drain(&mut a);
        // The same client, a second session that is not a takeover (the first is alive).
        let mut b = lab.session(2, CLIENT6, &native);
        let addr_b = lease_of(&mut b, &mut t, lab.at(2));
        assert_ne!(addr_a, addr_b);
        b.handle_frame(frame(MsgType::NativeRequest, b""), lab.at(2), &mut t);
        let text = format!("2001:db8:1::10 is already the native endpoint of lease {addr_a}");
        assert_eq!(
            drain(&mut b),
            refused(&text, CloseReason::NativeRefused(text.clone()))
        );
    }

    #[test]
    fn a_failed_binding_returns_the_lease_to_in_band_and_says_why() {
        let lab = Lab::new();
        let mut t = table("198.51.100.7-198.51.100.7");
        let mut s = lab.session(1, CLIENT6, &cfg(true, false));
        let addr = lease_of(&mut s, &mut t, lab.at(1));
        s.handle_frame(frame(MsgType::NativeRequest, b""), lab.at(2), &mut t);
        let Some(Action::Bind { endpoint, .. }) = s.next_action() else {
            panic!("a Bind first")
        };
        s.bind_done(addr, endpoint, Err("map full".into()), &mut t);
        let text = "fast path unavailable: map full";
        assert_eq!(
            drain(&mut s),
            refused(text, CloseReason::NativeRefused(text.into()))
        );
        assert_eq!(t.state.lease_of(addr, 1), Some((Mode::Inband, None)));
        assert_eq!(lab.stats.native_refused.get(), 1);
        assert_eq!(lab.stats.native_granted.get(), 0);
    }

    #[test]
    fn requests_105_and_107_on_a_server_without_them_end_with_110_not_supported() {
        let lab = Lab::new();
        for (kind, what) in [
            (MsgType::NativeRequest, "native mode (105)"),
            (MsgType::Ipv6Request, "IPv6 (107)"),
        ] {
            let mut t = table("198.51.100.7-198.51.100.7");
            let mut s = lab.session(1, CLIENT6, &cfg(false, false));
            s.handle_frame(Frame::empty(kind), lab.at(1), &mut t);
            let text = format!("not supported: {what} is not enabled on this server");
            assert_eq!(
                drain(&mut s),
                refused(&text, CloseReason::Unsupported(what))
            );
        }
        assert_eq!(lab.stats.unsupported_request.get(), 2);
    }

    #[test]
    fn a_107_gets_its_units_synced_then_108_and_the_same_again_on_a_repeat() {
        let lab = Lab::new();
        let mut t = table("198.51.100.7-198.51.100.7");
        let mut s = lab.session(1, CLIENT6, &cfg(false, true));
        s.handle_frame(Frame::empty(MsgType::Ipv6Request), lab.at(1), &mut t);
        let actions = drain(&mut s);
        let [Action::Sync6(units), Action::Send(reply)] = actions.as_slice() else {
            panic!("Sync6 then 108: {actions:?}")
        };
        let (addr, prefix) = (units.addr.unwrap(), units.delegated.unwrap());
        assert!(
            ["2001:db8:600::2/128", "2001:db8:600::3/128"].contains(&addr.to_string().as_str())
        );
        assert!(
            ["2001:db8:700:2::/64", "2001:db8:700:3::/64"].contains(&prefix.to_string().as_str())
        );
        let text = format!(
            "{}/128 fe80::1 2001:db8:53::1 delegated={prefix}",
            addr.addr()
        );
        assert_eq!(*reply, Frame::text(MsgType::Ipv6Reply, &text));
        s.handle_frame(Frame::empty(MsgType::Ipv6Request), lab.at(2), &mut t);
        assert_eq!(drain(&mut s), vec![send(MsgType::Ipv6Reply, &text)]);
        assert_eq!(lab.stats.ipv6_leases_granted.get(), 1);
    }

    #[test]
    fn an_exhausted_ipv6_pool_ends_the_session_with_110_and_keeps_nothing() {
        let lab = Lab::new();
        let v6 = cfg(false, true);
        let mut t = table("198.51.100.7-198.51.100.9");
        for id in 1..=2 {
            let mut s = lab.session(id, &format!("2001:db8:1::{id}"), &v6);
            s.handle_frame(Frame::empty(MsgType::Ipv6Request), lab.at(1), &mut t);
            assert!(matches!(drain(&mut s)[0], Action::Sync6(_)));
        }
        let mut s = lab.session(3, "2001:db8:1::3", &v6);
        s.handle_frame(Frame::empty(MsgType::Ipv6Request), lab.at(1), &mut t);
        let text = "IPv6 pool exhausted: all 2 of 2001:db8:600::/126 are leased";
        assert_eq!(
            drain(&mut s),
            refused(text, CloseReason::Ipv6PoolExhausted(text.into()))
        );
        assert_eq!(
            t.state.leases6_count(),
            4,
            "the two earlier sessions' units only"
        );
        assert_eq!(lab.stats.ipv6_pool_exhausted.get(), 1);
    }

    /// The table, with a shared lease store's refusal for the next grant.
    struct StoreSays<'a, F: Fn(u64) -> bool>(&'a mut Table<F>, Option<Grant>);

    impl<F: Fn(u64) -> bool> Leases for StoreSays<'_, F> {
        fn with_table<R>(&mut self, f: impl FnOnce(&mut State) -> R) -> R {
            self.0.with_table(f)
        }
        fn grant(&mut self, holder: Holder, stale: Duration, now: Instant) -> Grant {
            match self.1.take() {
                Some(g) => g,
                None => self.0.grant(holder, stale, now),
            }
        }
        fn grant_shared(
            &mut self,
            holder: Holder,
            tunnel: Ipv6Addr,
            stale: Duration,
            now: Instant,
        ) -> Result<SharedGrant, Grant> {
            self.0.grant_shared(holder, tunnel, stale, now)
        }
    }

    #[test]
    fn a_lease_store_refusal_ends_the_session_with_its_110_and_is_counted() {
        let lab = Lab::new();
        let mut t = table("198.51.100.7-198.51.100.9");
        let down = "lease store unavailable: no new leases until it is back";
        let held = "lease store: this client's address 198.51.100.8 is still held by \
                    concentrator b";
        for (id, refusal, text) in [
            (1, Grant::StoreUnavailable(down.into()), down),
            (2, Grant::HeldElsewhere(held.into()), held),
        ] {
            let mut s = lab.session(id, "2001:db8:1::1", &cfg(false, false));
            let mut store = StoreSays(&mut t, Some(refusal));
            s.handle_frame(Frame::empty(MsgType::AddrRequest), lab.at(1), &mut store);
            assert_eq!(
                drain(&mut s),
                refused(text, CloseReason::LeaseStore(text.into()))
            );
            assert_eq!(s.lease(), None);
        }
        assert_eq!(lab.stats.lease_store_unavailable.get(), 1);
        assert_eq!(lab.stats.lease_held_elsewhere.get(), 1);
        assert_eq!(lab.stats.leases_granted.get(), 0);
        assert!(t.state.lease_list().is_empty(), "nothing leased");
    }

    #[test]
    fn an_exhausted_pool_ends_the_session_with_110_naming_the_pool() {
        let lab = Lab::new();
        let mut t = table("198.51.100.7-198.51.100.7");
        let mut a = lab.session(1, "2001:db8:1::1", &cfg(false, false));
        lease_of(&mut a, &mut t, lab.at(1));
        let mut b = lab.session(2, "2001:db8:2::1", &cfg(false, false));
        b.handle_frame(Frame::empty(MsgType::AddrRequest), lab.at(1), &mut t);
        let text = "pool exhausted: all 1 addresses of pool 198.51.100.7 are leased";
        assert_eq!(
            drain(&mut b),
            refused(text, CloseReason::PoolExhausted(text.into()))
        );
        assert_eq!(b.lease(), None);
        assert_eq!(lab.stats.pool_exhausted.get(), 1);
    }

    #[test]
    fn a_lease_limit_ends_the_session_with_110_naming_the_flag() {
        let lab = Lab::new();
        let mut t = table("198.51.100.7-198.51.100.9");
        t.state.limits.per_address = 1;
        let mut a = lab.session(1, CLIENT6, &cfg(false, false));
        lease_of(&mut a, &mut t, lab.at(1));
        let mut b = lab.session(2, CLIENT6, &cfg(false, false));
        b.handle_frame(Frame::empty(MsgType::AddrRequest), lab.at(1), &mut t);
        let text = "lease limit: this address already holds 1 leases (--max-leases-per-address)";
        assert_eq!(
            drain(&mut b),
            refused(text, CloseReason::LeaseLimit(text.into()))
        );
        assert_eq!(lab.stats.lease_limit_refused.get(), 1);
    }

    #[test]
    fn a_reconnecting_client_takes_over_the_lease_of_its_silent_session() {
        let lab = Lab::new();
        let mut t = table("198.51.100.7-198.51.100.8");
        let mut old = lab.session(1, CLIENT6, &cfg(false, false));
        let addr = lease_of(&mut old, &mut t, lab.at(1));
        SILENT.with(|s| s.borrow_mut().insert(1));
        let mut new = lab.session(2, CLIENT6, &cfg(false, false));
        assert_eq!(lease_of(&mut new, &mut t, lab.at(20)), addr);
        assert_eq!(t.state.lease_of(addr, 2), Some((Mode::Inband, None)));
        // The daemon closes the old session; it ends without the lease.
        old.replaced();
        assert_eq!(drain(&mut old), vec![Action::Close(CloseReason::Replaced)]);
        assert_eq!(old.lease(), None);
        assert_eq!(lab.stats.sessions_replaced.get(), 1);
    }

    #[test]
    fn a_second_session_of_a_live_client_gets_its_own_lease() {
        let lab = Lab::new();
        let mut t = table("198.51.100.7-198.51.100.8");
        let mut a = lab.session(1, CLIENT6, &cfg(false, false));
        let mut b = lab.session(2, CLIENT6, &cfg(false, false));
        let addr_a = lease_of(&mut a, &mut t, lab.at(1));
        let addr_b = lease_of(&mut b, &mut t, lab.at(2));
        assert_ne!(addr_a, addr_b);
        assert_eq!(t.state.lease_of(addr_a, 1), Some((Mode::Inband, None)));
    }

    #[test]
    fn a_restored_native_lease_comes_back_native_and_a_102_unbinds_it() {
        let lab = Lab::new();
        let mut t = table("198.51.100.7-198.51.100.7");
        let addr = Ipv4Addr::new(198, 51, 100, 7);
        let endpoint: Ipv6Addr = CLIENT6.parse().unwrap();
        restore_native(&mut t.state, addr, endpoint);
        let mut s = lab.session(1, CLIENT6, &cfg(true, false));
        assert_eq!(lease_of(&mut s, &mut t, lab.at(1)), addr);
        assert_eq!(
            t.state.lease_of(addr, 1),
            Some((Mode::Native, Some(endpoint)))
        );
        let pkt = udp4(addr, Ipv4Addr::new(203, 0, 113, 5), b"back in band");
        s.handle_frame(frame(MsgType::DataRequest, &pkt), lab.at(2), &mut t);
        assert_eq!(
            drain(&mut s),
            vec![
                Action::Unbind { addr, endpoint },
                Action::LeasesChanged,
                Action::ToTun(Bytes::from(pkt)),
            ]
        );
        assert_eq!(t.state.lease_of(addr, 1), Some((Mode::Inband, None)));
    }

    #[test]
    fn keepalives_go_out_every_interval_whatever_the_client_sends() {
        let lab = Lab::new();
        let mut t = table("198.51.100.7-198.51.100.7");
        let mut s = lab.session(1, CLIENT6, &cfg(false, false));
        lease_of(&mut s, &mut t, lab.at(1));
        assert_eq!(s.poll_timeout(), lab.at(10));
        s.handle_timeout(lab.at(9));
        assert_eq!(drain(&mut s), vec![]);
        s.handle_frame(Frame::empty(MsgType::Keepalive), lab.at(9), &mut t);
        s.handle_timeout(lab.at(10));
        assert_eq!(
            drain(&mut s),
            vec![Action::Send(Frame::empty(MsgType::Keepalive))]
        );
        assert_eq!(s.poll_timeout(), lab.at(20));
        assert_eq!(
            (
                lab.stats.keepalives_in.get(),
                lab.stats.keepalives_out.get()
            ),
            (1, 1)
        );
    }

    #[test]
    fn a_session_times_out_after_the_timeout_without_a_frame_each_frame_restarts_it() {
        let lab = Lab::new();
        let mut t = table("198.51.100.7-198.51.100.7");
        let mut s = lab.session(1, CLIENT6, &cfg(false, false));
        lease_of(&mut s, &mut t, lab.at(25));
        // Keepalives from us do not count: the client must send something.
        for k in [10, 20, 30, 40, 50] {
            s.handle_timeout(lab.at(k));
        }
        assert!(!s.is_closed(), "the 100 at 25 s keeps it open until 55 s");
        drain(&mut s);
        assert_eq!(s.poll_timeout(), lab.at(55).min(lab.at(60)));
        s.handle_timeout(lab.at(55));
        assert_eq!(
            drain(&mut s),
            vec![Action::Close(CloseReason::Timeout(Duration::from_secs(30)))]
        );
        assert_eq!(lab.stats.sessions_timed_out.get(), 1);
        // Nothing after the end.
        s.handle_frame(Frame::empty(MsgType::Keepalive), lab.at(56), &mut t);
        s.handle_timeout(lab.at(90));
        assert_eq!(drain(&mut s), vec![]);
    }

    #[test]
    fn a_session_without_100_or_107_ends_at_the_handshake_timeout() {
        let lab = Lab::new();
        let mut t = table("198.51.100.7-198.51.100.7");
        let mut s = lab.session(1, CLIENT6, &cfg(false, false));
        s.handle_frame(Frame::empty(MsgType::Keepalive), lab.at(1), &mut t);
        assert_eq!(s.poll_timeout(), lab.at(5));
        s.handle_timeout(lab.at(5));
        assert_eq!(
            drain(&mut s),
            vec![Action::Close(CloseReason::HandshakeTimeout(
                Duration::from_secs(5)
            ))]
        );
        // With a lease the handshake timer is off.
        let mut s = lab.session(2, CLIENT6, &cfg(false, false));
        lease_of(&mut s, &mut t, lab.at(1));
        assert_eq!(s.poll_timeout(), lab.at(10));
        s.handle_timeout(lab.at(6));
        assert!(!s.is_closed());
    }

    #[test]
    fn a_102_forwards_each_packet_from_the_lease_and_drops_the_rest_by_reason() {
        let lab = Lab::new();
        let mut t = table("198.51.100.7-198.51.100.7");
        let mut s = lab.session(1, CLIENT6, &cfg(false, true));
        let remote = Ipv4Addr::new(203, 0, 113, 5);
        // Before any lease: dropped.
        let early = udp4(Ipv4Addr::new(198, 51, 100, 7), remote, b"early");
        s.handle_frame(frame(MsgType::DataRequest, &early), lab.at(1), &mut t);
        assert_eq!(drain(&mut s), vec![]);
        assert_eq!(lab.stats.drop_data_before_lease.get(), 1);

        let addr = lease_of(&mut s, &mut t, lab.at(1));
        let good1 = udp4(addr, remote, b"one");
        let spoofed = udp4(Ipv4Addr::new(198, 51, 100, 99), remote, b"spoofed");
        let good2 = udp4(addr, remote, b"two");
        let v6 = udp6("2001:db8:600::2", "2001:db8:99::1", 5000, 53);
        let mut data = [good1.clone(), spoofed, good2.clone(), v6].concat();
        data.extend_from_slice(&[0x45, 0, 0]); // a truncated tail
        s.handle_frame(frame(MsgType::DataRequest, &data), lab.at(2), &mut t);
        assert_eq!(
            drain(&mut s),
            vec![
                Action::ToTun(Bytes::from(good1)),
                Action::ToTun(Bytes::from(good2))
            ]
        );
        let st = &lab.stats;
        assert_eq!(
            (
                st.drop_spoofed_source.get(),
                st.drop_ipv6_without_lease.get(),
                st.drop_malformed_packet.get(),
            ),
            (1, 1, 1)
        );
    }

    #[test]
    fn ipv6_from_the_client_opens_the_way_back_and_nothing_else_gets_in() {
        let lab = Lab::new();
        let mut t = table("198.51.100.7-198.51.100.7");
        let mut s = lab.session(1, CLIENT6, &cfg(false, true));
        s.handle_frame(Frame::empty(MsgType::Ipv6Request), lab.at(1), &mut t);
        let Some(Action::Sync6(units)) = s.next_action() else {
            panic!("Sync6")
        };
        drain(&mut s);
        let me = units.addr.unwrap().addr().to_string();
        let reply = udp6("2001:db8:99::1", &me, 53, 5000);
        assert!(!s.inbound_allowed(&reply, lab.at(2)), "nothing sent yet");
        let out = udp6(&me, "2001:db8:99::1", 5000, 53);
        s.handle_frame(frame(MsgType::DataRequest, &out), lab.at(2), &mut t);
        assert_eq!(drain(&mut s), vec![Action::ToTun(Bytes::from(out))]);
        assert!(s.inbound_allowed(&reply, lab.at(3)), "the reply");
        let other = udp6("2001:db8:99::1", &me, 53, 5001);
        assert!(!s.inbound_allowed(&other, lab.at(3)), "another port");
        let v4 = udp4(
            Ipv4Addr::new(203, 0, 113, 5),
            Ipv4Addr::new(198, 51, 100, 7),
            b"x",
        );
        assert!(s.inbound_allowed(&v4, lab.at(3)), "IPv4 is not filtered");
        assert_eq!(lab.stats.drop_inbound_denied.get(), 2);
        assert_eq!(lab.stats.ipv6_packets_to_tun.get(), 1);
    }

    #[test]
    fn a_server_to_client_type_from_a_client_or_a_broken_stream_ends_the_session() {
        let lab = Lab::new();
        let mut t = table("198.51.100.7-198.51.100.7");
        let mut s = lab.session(1, CLIENT6, &cfg(false, false));
        s.handle_frame(Frame::empty(MsgType::AddrReply), lab.at(1), &mut t);
        assert_eq!(
            drain(&mut s),
            vec![Action::Close(CloseReason::UnexpectedType(101))]
        );
        assert_eq!(lab.stats.protocol_error_unexpected_type.get(), 1);

        let mut s = lab.session(2, CLIENT6, &cfg(false, false));
        s.handle_frame_error(&FrameError::UnknownType(99));
        assert_eq!(
            drain(&mut s),
            vec![Action::Close(CloseReason::Protocol(
                "unknown message type 99".into()
            ))]
        );
        assert_eq!(lab.stats.protocol_error_unknown_type.get(), 1);
        assert_eq!(
            CloseReason::UnexpectedType(101).to_string(),
            "protocol error: unexpected type 101 from a client"
        );
    }

    #[test]
    fn a_withdrawn_address_ends_its_session_with_110_and_no_other() {
        let lab = Lab::new();
        let mut t = table("198.51.100.7-198.51.100.8");
        let mut a = lab.session(1, "2001:db8:1::1", &cfg(false, false));
        let mut b = lab.session(2, "2001:db8:2::1", &cfg(false, false));
        let addr_a = lease_of(&mut a, &mut t, lab.at(1));
        lease_of(&mut b, &mut t, lab.at(1));
        // Only the holder of the withdrawn address reacts.
        b.withdrawn(addr_a);
        assert_eq!(drain(&mut b), vec![]);
        a.withdrawn(addr_a);
        let text = format!("address withdrawn: {addr_a} is no longer in this server's pool");
        assert_eq!(
            drain(&mut a),
            refused(&text, CloseReason::Withdrawn(text.clone()))
        );
        assert_eq!(lab.stats.leases_withdrawn.get(), 1);
    }
}
