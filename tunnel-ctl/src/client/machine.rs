//! The client's session state machine (SPEC §3): 100 → 101, then 105 → 106 (native mode) and
//! 107 → 108 (`--ipv6`), then keepalives and data until the session ends. Frames and timer
//! events in, [`Action`]s out; the daemon ([`super`]) connects, configures the host for each
//! lease, moves packets and reconnects. No sockets, no clock reads.
use std::{
    collections::VecDeque,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use ipnet::Ipv6Net;
use tracing::warn;

use super::ClientStats;
use crate::protocol::{
    Frame, FrameError, MsgType,
    text::{Lease4, Lease6, NativeGrant},
};

/// What one session is to do.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub keepalive: Duration,
    pub timeout: Duration,
    /// Native mode: this end's IPv6 address on the control connection, named in the 105.
    pub native: Option<Ipv6Addr>,
    /// Ask for IPv6 (107) after the IPv4 lease.
    pub ipv6: bool,
    /// In-band: 103s go to the TUN (native mode has none).
    pub tun: bool,
}

/// What the daemon does for the machine, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Send(Frame),
    /// In-band: put the IPv4 lease on the TUN (and the default routes).
    Configure4(Lease4),
    /// Native mode: configure the fast path for the lease and the server's 106.
    ApplyNative {
        lease: Ipv4Addr,
        grant: NativeGrant,
    },
    /// Put the IPv6 lease in place.
    Configure6(Lease6),
    /// Every request was answered: the session carries traffic from now on.
    Established {
        lease: Lease4,
        lease6: Option<Lease6>,
    },
    /// A 103's packet for the TUN.
    ToTun(Bytes),
    /// The server refused IPv6: later sessions do not ask again.
    StopAskingIpv6,
    Close(End),
}

/// Why a session ended. Before [`Action::Established`] the session failed to get going (the
/// daemon counts a connect failure); after it, an established session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// No answer to a request in time: "no lease (101)", ...
    NoAnswer {
        what: &'static str,
        within: Duration,
    },
    /// A 110 during set-up: what was refused, and the server's text.
    Refused {
        what: &'static str,
        text: String,
    },
    /// An answer that does not parse.
    BadAnswer(String),
    /// The server closed before answering.
    ClosedBefore(&'static str),
    /// Established, then: nothing from the server for the timeout.
    Silent(Duration),
    ServerClosed,
    Protocol(String),
    /// A 110 on an established session.
    ServerError(String),
    WriteError(String),
    NotReading(Duration),
}

impl End {
    /// Whether the session had been established.
    pub fn established(&self) -> bool {
        matches!(
            self,
            End::Silent(_)
                | End::ServerClosed
                | End::Protocol(_)
                | End::ServerError(_)
                | End::WriteError(_)
                | End::NotReading(_)
        )
    }
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            End::NoAnswer { what, within } => write!(f, "{what} within {within:?}"),
            End::Refused { what, text } => write!(f, "{what}: {text}"),
            End::BadAnswer(e) => f.write_str(e),
            End::ClosedBefore(what) => {
                write!(f, "server closed the connection before sending {what}")
            }
            End::Silent(t) => write!(f, "server silent for {t:?}"),
            End::ServerClosed => write!(f, "server closed the connection"),
            End::Protocol(e) => write!(f, "protocol error: {e}"),
            End::ServerError(text) => write!(f, "server error: {text}"),
            End::WriteError(e) => write!(f, "write error: {e}"),
            End::NotReading(t) => write!(f, "server not reading for {t:?}"),
        }
    }
}

/// The 106 of a shared lease names the 101's port set (a 101 without one is a whole
/// address, unless the 106 says otherwise).
fn agree(lease: &Lease4, grant: NativeGrant) -> Result<NativeGrant, String> {
    match (lease.share()?, grant.share) {
        (Some(a), Some(b)) if a != b => Err(format!("106 names {b}, the 101 named {a}")),
        (Some(a), None) => Err(format!("106 names no port set, the 101 named {a}")),
        _ => Ok(grant),
    }
}

/// Where the session stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// 100 sent.
    Lease,
    /// 105 sent.
    Native(Lease4),
    /// 107 sent.
    Ipv6(Lease4),
    Established {
        routed6: Vec<Ipv6Net>,
    },
    Ended,
}

/// What a packet read from the TUN is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Uplink {
    Send,
    /// IPv6 from an address that is not leased (or no IPv6 lease at all).
    NotLeased,
    /// The kernel's own link-local chatter on the TUN (router solicitations, MLD): not for
    /// the server.
    LinkLocal,
}

/// One session with the server.
pub struct Session {
    cfg: SessionConfig,
    stats: Arc<ClientStats>,
    phase: Phase,
    /// The pending request's answer is due by then (set-up), or the server's next frame
    /// (established).
    deadline: Instant,
    next_keepalive: Option<Instant>,
    actions: VecDeque<Action>,
}

impl Session {
    /// A session whose connection opened at `now`: the 100 goes out first; in native mode
    /// the 105 goes before it, so that the server knows the lease is for native mode (and
    /// may share the address: the 101 and the 106 then name the port set).
    pub fn new(cfg: SessionConfig, stats: Arc<ClientStats>, now: Instant) -> Session {
        let mut s = Session {
            deadline: now + cfg.timeout,
            cfg,
            stats,
            phase: Phase::Lease,
            next_keepalive: None,
            actions: VecDeque::new(),
        };
        if let Some(local) = s.cfg.native {
            s.send(Frame::text(MsgType::NativeRequest, &local.to_string()));
        }
        s.send(Frame::empty(MsgType::AddrRequest));
        s
    }

    pub fn next_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    pub fn is_established(&self) -> bool {
        matches!(self.phase, Phase::Established { .. })
    }

    pub fn is_ended(&self) -> bool {
        self.phase == Phase::Ended
    }

    pub fn poll_timeout(&self) -> Instant {
        match self.next_keepalive {
            Some(k) => k.min(self.deadline),
            None => self.deadline,
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.is_ended() {
            return;
        }
        if now >= self.deadline {
            let within = self.cfg.timeout;
            let end = match &self.phase {
                Phase::Lease => End::NoAnswer {
                    what: "no lease (101)",
                    within,
                },
                Phase::Native(_) => End::NoAnswer {
                    what: "no answer (106) to native mode",
                    within,
                },
                Phase::Ipv6(_) => End::NoAnswer {
                    what: "no answer (108) to the IPv6 request",
                    within,
                },
                _ => {
                    self.stats.timeouts.inc();
                    End::Silent(within)
                }
            };
            return self.end(end);
        }
        if let Some(k) = self.next_keepalive
            && now >= k
        {
            self.stats.keepalives_out.inc();
            self.send(Frame::empty(MsgType::Keepalive));
            self.next_keepalive = Some(now + self.cfg.keepalive);
        }
    }

    /// The server closed the connection.
    pub fn handle_closed(&mut self) {
        let end = match &self.phase {
            Phase::Lease => End::ClosedBefore("a lease"),
            Phase::Native(_) => End::ClosedBefore("an answer to native mode"),
            Phase::Ipv6(_) => End::ClosedBefore("an IPv6 lease (108)"),
            _ => End::ServerClosed,
        };
        self.end(end);
    }

    pub fn handle_frame_error(&mut self, e: &FrameError) {
        self.end(End::Protocol(e.to_string()));
    }

    /// A frame from the server.
    pub fn handle_frame(&mut self, frame: Frame, now: Instant) {
        if self.is_ended() {
            return;
        }
        self.stats.frames_in.inc();
        if self.is_established() {
            self.deadline = now + self.cfg.timeout;
        }
        match (frame.kind, &self.phase) {
            (MsgType::Keepalive, _) => self.stats.keepalives_in.inc(),
            // Some servers repeat the 101.
            (MsgType::AddrReply, Phase::Lease) => match Lease4::parse(&frame.data) {
                Ok(lease) => {
                    self.stats.leases.inc();
                    self.got_lease(lease, now);
                }
                Err(e) => self.end(End::BadAnswer(format!("bad 101 from the server: {e}"))),
            },
            (MsgType::AddrReply, _) => {}
            (MsgType::NativeReply, Phase::Native(lease)) => {
                let lease = lease.clone();
                match NativeGrant::parse(&frame.data).and_then(|g| agree(&lease, g)) {
                    Ok(grant) => {
                        self.stats.native_granted.inc();
                        self.actions.push_back(Action::ApplyNative {
                            lease: lease.addr,
                            grant,
                        });
                        self.after_ipv4(lease, now);
                    }
                    Err(e) => self.end(End::BadAnswer(format!("bad 106: {e}"))),
                }
            }
            (MsgType::Ipv6Reply, Phase::Ipv6(lease)) => {
                let lease = lease.clone();
                match Lease6::parse(&frame.data) {
                    Ok(lease6) => {
                        self.stats.ipv6_leases.inc();
                        self.actions.push_back(Action::Configure6(lease6.clone()));
                        self.establish(lease, Some(lease6), now);
                    }
                    Err(e) => self.end(End::BadAnswer(format!("bad 108: {e}"))),
                }
            }
            (MsgType::DataReply, Phase::Established { .. }) if self.cfg.tun => {
                self.actions.push_back(Action::ToTun(frame.data));
            }
            (MsgType::Error, phase) => {
                self.stats.server_errors.inc();
                let text = String::from_utf8_lossy(&frame.data)
                    .trim_end_matches('\0')
                    .to_string();
                let end = match phase {
                    Phase::Lease => End::Refused {
                        what: "server refused",
                        text,
                    },
                    Phase::Native(_) => End::Refused {
                        what: "server refused native mode",
                        text,
                    },
                    Phase::Ipv6(_) => {
                        self.stats.ipv6_refused.inc();
                        self.actions.push_back(Action::StopAskingIpv6);
                        End::Refused {
                            what: "server refused IPv6",
                            text,
                        }
                    }
                    _ => End::ServerError(text),
                };
                self.end(end);
            }
            (other, phase) => {
                self.stats.drop_unexpected_frame.inc();
                if !matches!(phase, Phase::Established { .. }) {
                    warn!(
                        "ignoring type {} while waiting for the server's answer",
                        other.code()
                    );
                }
            }
        }
    }

    /// Whether a packet from the TUN goes to the server: IPv4 does, IPv6 only from a leased
    /// address (counted otherwise).
    pub fn uplink(&self, pkt: &[u8]) -> Uplink {
        let Some((IpAddr::V6(src), IpAddr::V6(dst))) = crate::packet::addrs(pkt) else {
            return Uplink::Send;
        };
        let routed6: &[Ipv6Net] = match &self.phase {
            Phase::Established { routed6 } => routed6,
            _ => &[],
        };
        let verdict = if routed6.iter().any(|n| n.contains(&src)) {
            Uplink::Send
        } else if crate::packet::link_local_v6(src, dst) {
            Uplink::LinkLocal
        } else {
            Uplink::NotLeased
        };
        match verdict {
            Uplink::Send => {}
            Uplink::NotLeased => self.stats.drop_ipv6_not_leased.inc(),
            Uplink::LinkLocal => self.stats.tun_link_local_ignored.inc(),
        }
        verdict
    }

    /// A write to the server failed (`Err(None)`: it stopped reading for the timeout).
    pub fn write_failed(&mut self, error: Option<String>) {
        self.end(match error {
            Some(e) => End::WriteError(e),
            None => End::NotReading(self.cfg.timeout),
        });
    }

    fn send(&mut self, frame: Frame) {
        self.actions.push_back(Action::Send(frame));
    }

    fn end(&mut self, end: End) {
        if self.is_ended() {
            return;
        }
        self.phase = Phase::Ended;
        self.next_keepalive = None;
        self.actions.push_back(Action::Close(end));
    }

    fn got_lease(&mut self, lease: Lease4, now: Instant) {
        match self.cfg.native {
            // The 105 went before the 100.
            Some(_) => {
                self.phase = Phase::Native(lease);
                self.deadline = now + self.cfg.timeout;
            }
            None => {
                self.actions.push_back(Action::Configure4(lease.clone()));
                self.after_ipv4(lease, now);
            }
        }
    }

    fn after_ipv4(&mut self, lease: Lease4, now: Instant) {
        if self.cfg.ipv6 {
            self.send(Frame::empty(MsgType::Ipv6Request));
            self.phase = Phase::Ipv6(lease);
            self.deadline = now + self.cfg.timeout;
        } else {
            self.establish(lease, None, now);
        }
    }

    fn establish(&mut self, lease: Lease4, lease6: Option<Lease6>, now: Instant) {
        self.phase = Phase::Established {
            routed6: lease6.as_ref().map(|l| l.routed()).unwrap_or_default(),
        };
        self.deadline = now + self.cfg.timeout;
        self.next_keepalive = Some(now + self.cfg.keepalive);
        self.actions
            .push_back(Action::Established { lease, lease6 });
    }
}

#[cfg(test)]
mod tests {
    //! SPEC §3 from the client's side, with a fake clock: no socket, no TUN.
    use etherparse::PacketBuilder;

    use super::*;

    const LEASE: &str = "198.51.100.7 0.0.0.0 192.0.2.53 192.0.2.54 192.0.2.54";
    const LEASE6: &str = "2001:db8:600::2/128 fe80::1 2001:db8:53::1 delegated=2001:db8:700:2::/64";
    const LOCAL: &str = "2001:db8:1::10";

    struct Lab {
        t0: Instant,
        stats: Arc<ClientStats>,
    }

    impl Lab {
        fn new() -> Lab {
            Lab {
                t0: Instant::now(),
                stats: Arc::default(),
            }
        }
        fn at(&self, secs: u64) -> Instant {
            self.t0 + Duration::from_secs(secs)
        }
        fn session(&self, native: bool, ipv6: bool) -> Session {
            let cfg = SessionConfig {
                keepalive: Duration::from_secs(10),
                timeout: Duration::from_secs(30),
                native: native.then(|| LOCAL.parse().unwrap()),
                ipv6,
                tun: !native,
            };
            Session::new(cfg, self.stats.clone(), self.t0)
        }
    }

    fn drain(s: &mut Session) -> Vec<Action> {
        std::iter::from_fn(|| s.next_action()).collect()
    }

    fn text(kind: MsgType, t: &str) -> Frame {
        Frame::text(kind, t)
    }

    fn lease4() -> Lease4 {
        Lease4::parse(LEASE.as_bytes()).unwrap()
    }

    fn established(s: &mut Session, lab: &Lab) {
        drain(s);
        s.handle_frame(text(MsgType::AddrReply, LEASE), lab.at(1));
        drain(s);
        assert!(s.is_established());
    }

    #[test]
    fn in_band_100_then_101_configures_the_tun_and_the_session_is_established() {
        let lab = Lab::new();
        let mut s = lab.session(false, false);
        assert_eq!(
            drain(&mut s),
            vec![Action::Send(Frame::empty(MsgType::AddrRequest))]
        );
        // A C server pads its 101 with a NUL.
        s.handle_frame(text(MsgType::AddrReply, &format!("{LEASE}\0")), lab.at(1));
        assert_eq!(
            drain(&mut s),
            vec![
                Action::Configure4(lease4()),
                Action::Established {
                    lease: lease4(),
                    lease6: None
                }
            ]
        );
        assert_eq!(s.poll_timeout(), lab.at(11), "first keepalive");
        assert_eq!(lab.stats.leases.get(), 1);
    }

    #[test]
    fn a_shared_lease_applies_the_port_set_of_the_106_and_a_106_that_disagrees_ends_it() {
        use crate::protocol::text::Share;
        let lab = Lab::new();
        let shared = format!("{LEASE} psid=3/2 offset=6");
        let share = Share {
            psid: 3,
            psid_len: 2,
            offset: 6,
        };
        let mut s = lab.session(true, false);
        drain(&mut s);
        s.handle_frame(text(MsgType::AddrReply, &shared), lab.at(1));
        s.handle_frame(
            text(
                MsgType::NativeReply,
                "2001:db8:ff::1 1460 psid=3/2 offset=6",
            ),
            lab.at(2),
        );
        let actions = drain(&mut s);
        assert!(
            matches!(&actions[0], Action::ApplyNative { grant, .. } if grant.share == Some(share)),
            "{actions:?}"
        );
        assert!(s.is_established());
        for (reply, why) in [
            (
                "2001:db8:ff::1 1460 psid=2/2 offset=6",
                "bad 106: 106 names psid=2/2 offset=6, the 101 named psid=3/2 offset=6",
            ),
            (
                "2001:db8:ff::1 1460",
                "bad 106: 106 names no port set, the 101 named psid=3/2 offset=6",
            ),
            (
                "2001:db8:ff::1 1460 psid=4/2 offset=6",
                "bad 106: 106: psid 4 does not fit in 2 bits",
            ),
        ] {
            let mut s = lab.session(true, false);
            drain(&mut s);
            s.handle_frame(text(MsgType::AddrReply, &shared), lab.at(1));
            s.handle_frame(text(MsgType::NativeReply, reply), lab.at(2));
            assert_eq!(
                drain(&mut s),
                vec![Action::Close(End::BadAnswer(why.into()))],
                "{reply}"
            );
        }
    }

    #[test]
    fn native_mode_sends_105_with_the_local_address_and_applies_the_106() {
        let lab = Lab::new();
        let mut s = lab.session(true, false);
        // The 105 before the 100: the server knows the lease is for native mode.
        assert_eq!(
            drain(&mut s),
            vec![
                Action::Send(text(MsgType::NativeRequest, LOCAL)),
                Action::Send(Frame::empty(MsgType::AddrRequest))
            ]
        );
        s.handle_frame(text(MsgType::AddrReply, LEASE), lab.at(1));
        assert_eq!(drain(&mut s), vec![]);
        assert!(!s.is_established());
        s.handle_frame(text(MsgType::NativeReply, "2001:db8:ff::1 1460"), lab.at(2));
        assert_eq!(
            drain(&mut s),
            vec![
                Action::ApplyNative {
                    lease: "198.51.100.7".parse().unwrap(),
                    grant: NativeGrant {
                        tunnel: "2001:db8:ff::1".parse().unwrap(),
                        mtu: 1460,
                        share: None,
                    }
                },
                Action::Established {
                    lease: lease4(),
                    lease6: None
                }
            ]
        );
        // A 103 in native mode has nowhere to go.
        s.handle_frame(
            Frame::new(MsgType::DataReply, Bytes::from_static(b"x")),
            lab.at(3),
        );
        assert_eq!(drain(&mut s), vec![]);
        assert_eq!(lab.stats.drop_unexpected_frame.get(), 1);
    }

    #[test]
    fn with_ipv6_a_107_follows_the_101_and_the_108_is_configured_before_traffic() {
        let lab = Lab::new();
        let mut s = lab.session(false, true);
        drain(&mut s);
        s.handle_frame(text(MsgType::AddrReply, LEASE), lab.at(1));
        assert_eq!(
            drain(&mut s),
            vec![
                Action::Configure4(lease4()),
                Action::Send(Frame::empty(MsgType::Ipv6Request))
            ]
        );
        s.handle_frame(text(MsgType::Ipv6Reply, LEASE6), lab.at(2));
        let lease6 = Lease6::parse(LEASE6.as_bytes()).unwrap();
        assert_eq!(
            drain(&mut s),
            vec![
                Action::Configure6(lease6.clone()),
                Action::Established {
                    lease: lease4(),
                    lease6: Some(lease6)
                }
            ]
        );
        assert_eq!(lab.stats.ipv6_leases.get(), 1);
    }

    #[test]
    fn a_110_during_set_up_fails_the_session_with_the_servers_text() {
        let lab = Lab::new();
        let mut s = lab.session(false, false);
        drain(&mut s);
        s.handle_frame(text(MsgType::Error, "pool exhausted\0"), lab.at(1));
        let end = End::Refused {
            what: "server refused",
            text: "pool exhausted".into(),
        };
        assert_eq!(drain(&mut s), vec![Action::Close(end.clone())]);
        assert!(!end.established());
        assert_eq!(end.to_string(), "server refused: pool exhausted");

        let mut s = lab.session(true, false);
        drain(&mut s);
        s.handle_frame(text(MsgType::AddrReply, LEASE), lab.at(1));
        drain(&mut s);
        s.handle_frame(text(MsgType::Error, "fast path full"), lab.at(2));
        assert_eq!(
            drain(&mut s),
            vec![Action::Close(End::Refused {
                what: "server refused native mode",
                text: "fast path full".into()
            })]
        );
        assert_eq!(lab.stats.server_errors.get(), 2);
    }

    #[test]
    fn a_refused_107_stops_later_sessions_from_asking() {
        let lab = Lab::new();
        let mut s = lab.session(false, true);
        drain(&mut s);
        s.handle_frame(text(MsgType::AddrReply, LEASE), lab.at(1));
        drain(&mut s);
        s.handle_frame(text(MsgType::Error, "not supported: IPv6 (107)"), lab.at(2));
        assert_eq!(
            drain(&mut s),
            vec![
                Action::StopAskingIpv6,
                Action::Close(End::Refused {
                    what: "server refused IPv6",
                    text: "not supported: IPv6 (107)".into()
                })
            ]
        );
        assert_eq!(lab.stats.ipv6_refused.get(), 1);
    }

    #[test]
    fn each_unanswered_request_fails_at_the_timeout_counted_from_its_sending() {
        let lab = Lab::new();
        let within = Duration::from_secs(30);
        let mut s = lab.session(false, false);
        drain(&mut s);
        // Keepalives while waiting are fine but do not extend the wait.
        s.handle_frame(Frame::empty(MsgType::Keepalive), lab.at(20));
        assert_eq!(s.poll_timeout(), lab.at(30));
        s.handle_timeout(lab.at(30));
        assert_eq!(
            drain(&mut s),
            vec![Action::Close(End::NoAnswer {
                what: "no lease (101)",
                within
            })]
        );
        assert_eq!(lab.stats.keepalives_in.get(), 1);

        let mut s = lab.session(true, true);
        drain(&mut s);
        s.handle_frame(text(MsgType::AddrReply, LEASE), lab.at(25));
        drain(&mut s);
        s.handle_timeout(lab.at(54));
        assert_eq!(drain(&mut s), vec![], "105 sent at 25 s: due at 55 s");
        s.handle_timeout(lab.at(55));
        assert_eq!(
            drain(&mut s),
            vec![Action::Close(End::NoAnswer {
                what: "no answer (106) to native mode",
                within
            })]
        );
        assert_eq!(
            End::NoAnswer {
                what: "no answer (108) to the IPv6 request",
                within
            }
            .to_string(),
            "no answer (108) to the IPv6 request within 30s"
        );
    }

    #[test]
    fn an_established_session_keeps_alive_and_ends_when_the_server_falls_silent() {
        let lab = Lab::new();
        let mut s = lab.session(false, false);
        established(&mut s, &lab);
        s.handle_timeout(lab.at(11));
        assert_eq!(
            drain(&mut s),
            vec![Action::Send(Frame::empty(MsgType::Keepalive))]
        );
        s.handle_frame(Frame::empty(MsgType::Keepalive), lab.at(20));
        for t in [21, 31, 41] {
            s.handle_timeout(lab.at(t));
        }
        assert_eq!(drain(&mut s).len(), 3, "three more keepalives");
        assert!(
            !s.is_ended(),
            "the server's keepalive at 20 s holds until 50 s"
        );
        s.handle_timeout(lab.at(50));
        let end = End::Silent(Duration::from_secs(30));
        assert_eq!(drain(&mut s), vec![Action::Close(end.clone())]);
        assert!(end.established());
        assert_eq!(lab.stats.timeouts.get(), 1);
        assert_eq!(lab.stats.keepalives_out.get(), 4);
    }

    #[test]
    fn data_goes_to_the_tun_and_a_repeated_101_or_an_unknown_frame_changes_nothing() {
        let lab = Lab::new();
        let mut s = lab.session(false, false);
        established(&mut s, &lab);
        s.handle_frame(
            Frame::new(MsgType::DataReply, Bytes::from_static(b"pkt")),
            lab.at(2),
        );
        s.handle_frame(text(MsgType::AddrReply, LEASE), lab.at(2));
        s.handle_frame(Frame::empty(MsgType::AddrRequest), lab.at(2));
        assert_eq!(
            drain(&mut s),
            vec![Action::ToTun(Bytes::from_static(b"pkt"))]
        );
        assert_eq!(lab.stats.drop_unexpected_frame.get(), 1);
        assert_eq!(lab.stats.leases.get(), 1);
        s.handle_frame(text(MsgType::Error, "address withdrawn"), lab.at(3));
        assert_eq!(
            drain(&mut s),
            vec![Action::Close(End::ServerError("address withdrawn".into()))]
        );
    }

    #[test]
    fn bad_answers_and_a_closed_connection_end_the_session_saying_which() {
        let lab = Lab::new();
        let mut s = lab.session(false, false);
        drain(&mut s);
        s.handle_frame(text(MsgType::AddrReply, "198.51.100.7"), lab.at(1));
        assert_eq!(
            drain(&mut s),
            vec![Action::Close(End::BadAnswer(
                "bad 101 from the server: 101 text has 1 fields, expected at least 5 (ip route \
                 dns dns dns)"
                    .into()
            ))]
        );
        let mut s = lab.session(false, false);
        drain(&mut s);
        s.handle_closed();
        let end = End::ClosedBefore("a lease");
        assert_eq!(drain(&mut s), vec![Action::Close(end.clone())]);
        assert_eq!(
            end.to_string(),
            "server closed the connection before sending a lease"
        );
        let mut s = lab.session(false, false);
        established(&mut s, &lab);
        s.write_failed(None);
        s.handle_closed();
        assert_eq!(
            drain(&mut s),
            vec![Action::Close(End::NotReading(Duration::from_secs(30)))],
            "only the first end counts"
        );
    }

    fn udp6(src: &str, dst: &str) -> Vec<u8> {
        let (s, d): (Ipv6Addr, Ipv6Addr) = (src.parse().unwrap(), dst.parse().unwrap());
        let mut out = Vec::new();
        PacketBuilder::ipv6(s.octets(), d.octets(), 64)
            .udp(5000, 53)
            .write(&mut out, b"q")
            .unwrap();
        out
    }

    #[test]
    fn only_ipv4_and_ipv6_from_leased_addresses_go_up() {
        let lab = Lab::new();
        let mut s = lab.session(false, true);
        drain(&mut s);
        s.handle_frame(text(MsgType::AddrReply, LEASE), lab.at(1));
        s.handle_frame(text(MsgType::Ipv6Reply, LEASE6), lab.at(1));
        let mut v4 = Vec::new();
        PacketBuilder::ipv4([198, 51, 100, 7], [203, 0, 113, 5], 64)
            .udp(5000, 53)
            .write(&mut v4, b"q")
            .unwrap();
        assert_eq!(s.uplink(&v4), Uplink::Send);
        assert_eq!(
            s.uplink(&udp6("2001:db8:600::2", "2001:db8:99::1")),
            Uplink::Send
        );
        assert_eq!(
            s.uplink(&udp6("2001:db8:700:2::42", "2001:db8:99::1")),
            Uplink::Send,
            "the delegated prefix"
        );
        assert_eq!(
            s.uplink(&udp6("2001:db8:600::9", "2001:db8:99::1")),
            Uplink::NotLeased
        );
        assert_eq!(s.uplink(&udp6("fe80::5", "ff02::2")), Uplink::LinkLocal);
        assert_eq!(
            (
                lab.stats.drop_ipv6_not_leased.get(),
                lab.stats.tun_link_local_ignored.get()
            ),
            (1, 1)
        );
    }
}
