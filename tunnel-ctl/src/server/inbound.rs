//! The default-deny inbound filter for clients' IPv6 (SPEC §7, seed 001's firewall): what a
//! client sent out opens the way back; new connections from outside get in only to ports
//! allowed with `--allow-in`. One [`Flows`] table per session, so a busy client fills its own
//! table and nobody else's.
//!
//! Let in: replies to tracked flows (TCP, UDP, ICMPv6 echo), ICMPv6 errors about a tracked
//! flow (packet-too-big must get through, or path MTU discovery breaks), echo requests
//! (RFC 6092 REC-10), non-first fragments and other protocols between a pair of hosts that
//! already talk, and TCP/UDP to an allowed port.
use std::{
    collections::HashMap,
    net::Ipv6Addr,
    time::{Duration, Instant},
};

use etherparse::{Icmpv6Type, LaxNetSlice, LaxSlicedPacket, TransportSlice};

/// Tracked flows per session; beyond this new outbound flows are not tracked (their replies
/// are dropped) until old ones expire.
pub const MAX_FLOWS: usize = 4096;

const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMPV6: u8 = 58;

/// Idle time after which a flow is forgotten (RFC 6092: TCP ≥ 124 min, UDP ≥ 2 min).
fn idle_limit(proto: u8) -> Duration {
    match proto {
        TCP => Duration::from_secs(7440),
        ICMPV6 => Duration::from_secs(60),
        _ => Duration::from_secs(300),
    }
}

pub use crate::config::AllowIn;

/// A flow as seen from the client: its address and port, the remote's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    proto: u8,
    local: Ipv6Addr,
    local_port: u16,
    remote: Ipv6Addr,
    remote_port: u16,
}

/// What the filter needs of one packet.
enum Seen<'a> {
    /// TCP or UDP ports, ICMPv6 echo (the identifier in both port slots' place).
    Ports {
        proto: u8,
        src: u16,
        dst: u16,
    },
    EchoRequest {
        id: u16,
    },
    /// An ICMPv6 error quoting this packet.
    Error(&'a [u8]),
    /// A non-first fragment or a protocol without ports.
    Opaque,
    /// ICMPv6 that is neither echo nor an error (e.g. neighbour discovery): never forwarded
    /// toward a client by the kernel, dropped here too.
    OtherIcmp,
}

fn parse(pkt: &[u8]) -> Option<(Ipv6Addr, Ipv6Addr, Seen<'_>)> {
    let sliced = LaxSlicedPacket::from_ip(pkt).ok()?;
    let Some(LaxNetSlice::Ipv6(ip)) = &sliced.net else {
        return None;
    };
    let (src, dst) = (ip.header().source_addr(), ip.header().destination_addr());
    let seen = match &sliced.transport {
        Some(TransportSlice::Tcp(t)) => Seen::Ports {
            proto: TCP,
            src: t.source_port(),
            dst: t.destination_port(),
        },
        Some(TransportSlice::Udp(u)) => Seen::Ports {
            proto: UDP,
            src: u.source_port(),
            dst: u.destination_port(),
        },
        Some(TransportSlice::Icmpv6(i)) => match i.icmp_type() {
            Icmpv6Type::EchoRequest(e) => Seen::EchoRequest { id: e.id },
            Icmpv6Type::EchoReply(e) => Seen::Ports {
                proto: ICMPV6,
                src: 0,
                dst: e.id,
            },
            Icmpv6Type::DestinationUnreachable(_)
            | Icmpv6Type::PacketTooBig { .. }
            | Icmpv6Type::TimeExceeded(_)
            | Icmpv6Type::ParameterProblem(_) => Seen::Error(i.payload()),
            _ => Seen::OtherIcmp,
        },
        _ => Seen::Opaque,
    };
    Some((src, dst, seen))
}

/// The verdict on an inbound packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Deny,
}

#[derive(Default)]
pub struct Flows {
    tracked: HashMap<Key, Instant>,
    /// Host pairs (local, remote) that talk, for fragments and port-less protocols.
    pairs: HashMap<(Ipv6Addr, Ipv6Addr), Instant>,
}

impl Flows {
    /// Records a packet the client sent. Returns false when the table is full and the flow
    /// could not be tracked.
    pub fn outbound(&mut self, pkt: &[u8], now: Instant) -> bool {
        let Some((src, dst, seen)) = parse(pkt) else {
            return true;
        };
        let key = match seen {
            Seen::Ports {
                proto,
                src: s,
                dst: d,
            } => Some(Key {
                proto,
                local: src,
                local_port: s,
                remote: dst,
                remote_port: d,
            }),
            // Our echo request: its reply comes back with the same identifier.
            Seen::EchoRequest { id } => Some(Key {
                proto: ICMPV6,
                local: src,
                local_port: id,
                remote: dst,
                remote_port: 0,
            }),
            _ => None,
        };
        let mut ok = self.touch_pair((src, dst), now);
        if let Some(key) = key {
            ok &= self.touch(key, now);
        }
        ok
    }

    /// Decides on a packet from outside toward the client.
    pub fn inbound(&mut self, pkt: &[u8], allow: &[AllowIn], now: Instant) -> Verdict {
        let Some((src, dst, seen)) = parse(pkt) else {
            return Verdict::Deny;
        };
        let pass = match seen {
            Seen::Ports {
                proto,
                src: s,
                dst: d,
            } => {
                let reply = Key {
                    proto,
                    local: dst,
                    local_port: d,
                    remote: src,
                    remote_port: s,
                };
                self.fresh(&reply, now)
                    || (proto != ICMPV6
                        && allow
                            .iter()
                            .any(|a| a.port == d && a.proto.is_none_or(|p| p == proto)))
            }
            Seen::EchoRequest { .. } => true,
            Seen::Error(quoted) => self.quotes_tracked(quoted, now),
            Seen::Opaque => self
                .pairs
                .get(&(dst, src))
                .is_some_and(|t| now.duration_since(*t) < idle_limit(0)),
            Seen::OtherIcmp => false,
        };
        if pass { Verdict::Pass } else { Verdict::Deny }
    }

    /// Whether an ICMPv6 error quotes a packet of a tracked flow (the client's own packet:
    /// source = client).
    fn quotes_tracked(&self, quoted: &[u8], now: Instant) -> bool {
        let Some((src, dst, seen)) = parse(quoted) else {
            return false;
        };
        match seen {
            Seen::Ports {
                proto,
                src: s,
                dst: d,
            } if proto != ICMPV6 => self.fresh(
                &Key {
                    proto,
                    local: src,
                    local_port: s,
                    remote: dst,
                    remote_port: d,
                },
                now,
            ),
            _ => self
                .pairs
                .get(&(src, dst))
                .is_some_and(|t| now.duration_since(*t) < idle_limit(0)),
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.tracked.len()
    }

    fn fresh(&self, key: &Key, now: Instant) -> bool {
        self.tracked
            .get(key)
            .is_some_and(|t| now.duration_since(*t) < idle_limit(key.proto))
    }

    fn touch(&mut self, key: Key, now: Instant) -> bool {
        insert_bounded(&mut self.tracked, key, now, |k| idle_limit(k.proto))
    }

    fn touch_pair(&mut self, pair: (Ipv6Addr, Ipv6Addr), now: Instant) -> bool {
        insert_bounded(&mut self.pairs, pair, now, |_| idle_limit(0))
    }
}

/// Records `key` as seen `now` in a table of at most [`MAX_FLOWS`]: a full table first forgets
/// what has been idle longer than `limit`; false when there is still no room.
fn insert_bounded<K: std::hash::Hash + Eq>(
    table: &mut HashMap<K, Instant>,
    key: K,
    now: Instant,
    limit: impl Fn(&K) -> Duration,
) -> bool {
    if table.len() >= MAX_FLOWS && !table.contains_key(&key) {
        table.retain(|k, t| now.duration_since(*t) < limit(k));
        if table.len() >= MAX_FLOWS {
            return false;
        }
    }
    table.insert(key, now);
    true
}

#[cfg(test)]
mod tests {
    use etherparse::{IcmpEchoHeader, PacketBuilder};

    use super::*;

    const CLIENT: [u8; 16] = [
        0x20, 0x01, 0x0d, 0xb8, 0x06, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2,
    ];
    const REMOTE: [u8; 16] = [
        0x20, 0x01, 0x0d, 0xb8, 0xee, 0xee, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
    ];

    fn tcp(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16, syn: bool) -> Vec<u8> {
        let mut b = PacketBuilder::ipv6(src, dst, 64).tcp(sport, dport, 1, 1000);
        if syn {
            b = b.syn();
        } else {
            b = b.ack(1);
        }
        let mut out = Vec::new();
        b.write(&mut out, &[]).unwrap();
        out
    }

    fn udp(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ipv6(src, dst, 64)
            .udp(sport, dport)
            .write(&mut out, b"x")
            .unwrap();
        out
    }

    fn icmp(src: [u8; 16], dst: [u8; 16], t: Icmpv6Type, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ipv6(src, dst, 64)
            .icmpv6(t)
            .write(&mut out, payload)
            .unwrap();
        out
    }

    #[test]
    fn new_inbound_tcp_is_denied_unless_allowed_and_replies_pass() {
        let now = Instant::now();
        let mut f = Flows::default();
        let syn_in = tcp(REMOTE, CLIENT, 40000, 8080, true);
        assert_eq!(f.inbound(&syn_in, &[], now), Verdict::Deny);
        let allow: Vec<AllowIn> = vec!["8080/tcp".parse().unwrap()];
        assert_eq!(f.inbound(&syn_in, &allow, now), Verdict::Pass);
        let udp_in = udp(REMOTE, CLIENT, 40000, 8080);
        assert_eq!(f.inbound(&udp_in, &allow, now), Verdict::Deny, "tcp only");

        // The client's own connection: its replies pass, other ports stay shut.
        assert!(f.outbound(&tcp(CLIENT, REMOTE, 50000, 443, true), now));
        let reply = tcp(REMOTE, CLIENT, 443, 50000, false);
        assert_eq!(f.inbound(&reply, &[], now), Verdict::Pass);
        let other = tcp(REMOTE, CLIENT, 443, 50001, false);
        assert_eq!(f.inbound(&other, &[], now), Verdict::Deny);
        // Forgotten once idle.
        let later = now + Duration::from_secs(7441);
        assert_eq!(f.inbound(&reply, &[], later), Verdict::Deny);
    }

    #[test]
    fn echo_and_errors_about_tracked_flows_pass() {
        let now = Instant::now();
        let mut f = Flows::default();
        let echo = IcmpEchoHeader { id: 7, seq: 1 };
        let request_in = icmp(REMOTE, CLIENT, Icmpv6Type::EchoRequest(echo), b"ping");
        assert_eq!(f.inbound(&request_in, &[], now), Verdict::Pass);
        let reply_in = icmp(REMOTE, CLIENT, Icmpv6Type::EchoReply(echo), b"ping");
        assert_eq!(f.inbound(&reply_in, &[], now), Verdict::Deny, "unsolicited");
        f.outbound(
            &icmp(CLIENT, REMOTE, Icmpv6Type::EchoRequest(echo), b"ping"),
            now,
        );
        assert_eq!(f.inbound(&reply_in, &[], now), Verdict::Pass);

        let sent = udp(CLIENT, REMOTE, 5000, 53);
        let router = [
            0x20, 0x01, 0x0d, 0xb8, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
        ];
        let ptb = icmp(
            router,
            CLIENT,
            Icmpv6Type::PacketTooBig { mtu: 1280 },
            &sent,
        );
        assert_eq!(
            f.inbound(&ptb, &[], now),
            Verdict::Deny,
            "flow not tracked yet"
        );
        f.outbound(&sent, now);
        assert_eq!(f.inbound(&ptb, &[], now), Verdict::Pass);
        let ns = icmp(REMOTE, CLIENT, Icmpv6Type::NeighborSolicitation, &[0; 20]);
        assert_eq!(f.inbound(&ns, &[], now), Verdict::Deny);
        assert_eq!(f.inbound(b"garbage", &[], now), Verdict::Deny);
    }

    #[test]
    fn the_table_is_bounded() {
        let now = Instant::now();
        let mut f = Flows::default();
        for port in 0..MAX_FLOWS as u16 {
            assert!(f.outbound(&udp(CLIENT, REMOTE, 1000 + port, 53), now));
        }
        assert!(!f.outbound(&udp(CLIENT, REMOTE, 60000, 53), now));
        assert_eq!(f.len(), MAX_FLOWS);
        // Expired flows make room.
        let later = now + Duration::from_secs(301);
        assert!(f.outbound(&udp(CLIENT, REMOTE, 60000, 53), later));
        assert_eq!(f.len(), 1);
    }

    #[test]
    fn allow_in_parses_and_explains() {
        assert_eq!(
            "22".parse::<AllowIn>().unwrap(),
            AllowIn {
                port: 22,
                proto: None
            }
        );
        assert_eq!("53/udp".parse::<AllowIn>().unwrap().to_string(), "53/udp");
        assert!("0".parse::<AllowIn>().unwrap_err().contains("not a port"));
        assert!(
            "22/sctp"
                .parse::<AllowIn>()
                .unwrap_err()
                .contains("tcp or udp")
        );
    }
}
