//! The CE's NAPT flow table (SPEC §6): which external port each LAN flow uses.
//!
//! - Ports come only from the CE's port set, taken round-robin over an order that interleaves
//!   the blocks, so allocation spreads evenly over every block (seed 003's whole point).
//! - Port saving: an external port is reused toward different remote endpoints, so each remote
//!   endpoint can see up to the whole set (what Linux conntrack does for TCP and UDP).
//! - Wildcard mappings (remote `*`): static port forwards, and UDP when endpoint-independent
//!   mapping is on. They own their port for every remote.
//!
//! The table is pure state; the daemon mirrors each change into the BPF maps.
use std::{
    collections::{HashMap, HashSet},
    net::SocketAddrV4,
};

use tunnel_common::mape::NatKey;

use tunnel_common::fastpath::{v4_from_key, v4_key};

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;

pub fn proto_name(proto: u8) -> &'static str {
    match proto {
        TCP => "tcp",
        UDP => "udp",
        ICMP => "icmp",
        _ => "other",
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Created by the first packet of a LAN flow; expires when idle.
    Dynamic,
    /// Dynamic, endpoint-independent (UDP option): any remote may answer.
    EndpointIndependent,
    /// A static port forward: never expires.
    Forward,
}

impl Kind {
    /// As `nat --json` shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Dynamic => "dynamic",
            Kind::EndpointIndependent => "endpoint-independent",
            Kind::Forward => "forward",
        }
    }
}

/// One mapping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub out_key: NatKey,
    pub in_key: NatKey,
    pub ext_port: u16,
    pub kind: Kind,
    /// CLOCK_MONOTONIC ns when it was created (idle time starts here).
    pub created_ns: u64,
}

impl Entry {
    pub fn proto(&self) -> u8 {
        self.out_key.proto
    }

    pub fn lan(&self) -> SocketAddrV4 {
        SocketAddrV4::new(v4_from_key(self.out_key.local_ip), self.out_key.local_port)
    }

    /// None for wildcard mappings.
    pub fn remote(&self) -> Option<SocketAddrV4> {
        (self.out_key.remote_ip != 0 || self.out_key.remote_port != 0).then(|| {
            SocketAddrV4::new(
                v4_from_key(self.out_key.remote_ip),
                self.out_key.remote_port,
            )
        })
    }
}

/// A LAN flow as the first packet shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub proto: u8,
    pub lan: SocketAddrV4,
    /// For ICMP echo the port is 0.
    pub remote: SocketAddrV4,
}

/// Why a mapping could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    #[error("all {ports} ports of the set are in use toward {remote} ({proto})")]
    Exhausted {
        proto: &'static str,
        remote: String,
        ports: usize,
    },
    #[error(
        "external port {port} is outside this CE's port set ({count} ports: {ranges}); pick one of those"
    )]
    OutsideSet {
        port: u16,
        count: usize,
        ranges: String,
    },
    #[error("external port {port}/{proto} is already forwarded to {to}")]
    AlreadyForwarded {
        port: u16,
        proto: &'static str,
        to: SocketAddrV4,
    },
    #[error(
        "external port {port}/{proto} is in use by {flows} active flows; pick another port or retry when they end"
    )]
    InUse {
        port: u16,
        proto: &'static str,
        flows: usize,
    },
    #[error("no forward on external port {port}/{proto}")]
    NoSuchForward { port: u16, proto: &'static str },
}

#[derive(Default, Debug)]
struct PortUse {
    /// A wildcard mapping owns the port for every remote.
    wildcard: bool,
    /// Remote endpoints (address key, port) the port is used toward.
    remotes: HashSet<(u32, u16)>,
}

pub struct Table {
    /// The port set, blocks interleaved: block 0 port 0, block 1 port 0, …, block 0 port 1, …
    order: Vec<u16>,
    ranges: Vec<[u16; 2]>,
    cursor: usize,
    eim_udp: bool,
    entries: HashMap<NatKey, Entry>,
    /// (proto, external port) → who uses it.
    ports: HashMap<(u8, u16), PortUse>,
}

impl Table {
    /// A table over the port set given as inclusive ranges (one per block).
    pub fn new(ranges: &[[u16; 2]], eim_udp: bool) -> Table {
        let longest = ranges
            .iter()
            .map(|[f, l]| usize::from(l - f) + 1)
            .max()
            .unwrap_or(0);
        let mut order = Vec::new();
        for i in 0..longest {
            for [first, last] in ranges {
                if usize::from(last - first) >= i {
                    order.push(first + i as u16);
                }
            }
        }
        // Port 0 is in the set when nothing is shared (k = 0) or a = 0; it is never usable.
        order.retain(|&p| p != 0);
        Table {
            order,
            ranges: ranges.to_vec(),
            cursor: 0,
            eim_udp,
            entries: HashMap::new(),
            ports: HashMap::new(),
        }
    }

    pub fn port_count(&self) -> usize {
        self.order.len()
    }

    pub fn in_set(&self, port: u16) -> bool {
        self.ranges.iter().any(|[f, l]| (*f..=*l).contains(&port))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    /// The outbound key of `flow` (wildcard remote for endpoint-independent UDP).
    fn out_key(&self, flow: &Flow) -> NatKey {
        let wildcard = flow.proto == UDP && self.eim_udp;
        NatKey {
            local_ip: v4_key(*flow.lan.ip()),
            remote_ip: if wildcard {
                0
            } else {
                v4_key(*flow.remote.ip())
            },
            local_port: flow.lan.port(),
            remote_port: if wildcard { 0 } else { flow.remote.port() },
            proto: flow.proto,
            _pad: [0; 3],
        }
    }

    /// The mapping `flow` uses: an existing one (exact, or the wildcard of its LAN endpoint)
    /// or a new one (`true`).
    pub fn lookup_or_create(
        &mut self,
        flow: &Flow,
        now_ns: u64,
    ) -> Result<(Entry, bool), TableError> {
        let key = self.out_key(flow);
        if let Some(e) = self.entries.get(&key) {
            return Ok((e.clone(), false));
        }
        let wildcard_key = NatKey {
            remote_ip: 0,
            remote_port: 0,
            ..key
        };
        if let Some(e) = self.entries.get(&wildcard_key) {
            return Ok((e.clone(), false));
        }
        let wildcard = key.remote_ip == 0 && key.remote_port == 0;
        let remote = (key.remote_ip, key.remote_port);
        let n = self.order.len();
        for step in 0..n {
            let port = self.order[(self.cursor + step) % n];
            let free = match self.ports.get(&(flow.proto, port)) {
                None => true,
                Some(u) if u.wildcard => false,
                Some(u) if wildcard => u.remotes.is_empty(),
                Some(u) => !u.remotes.contains(&remote),
            };
            if !free {
                continue;
            }
            self.cursor = (self.cursor + step + 1) % n;
            let kind = if wildcard {
                Kind::EndpointIndependent
            } else {
                Kind::Dynamic
            };
            let entry = self.insert(key, port, kind, now_ns);
            return Ok((entry, true));
        }
        Err(TableError::Exhausted {
            proto: proto_name(flow.proto),
            remote: if wildcard {
                "every remote".into()
            } else {
                flow.remote.to_string()
            },
            ports: n,
        })
    }

    fn insert(&mut self, out_key: NatKey, port: u16, kind: Kind, now_ns: u64) -> Entry {
        let in_key = NatKey {
            local_ip: 0,
            remote_ip: out_key.remote_ip,
            local_port: port,
            remote_port: out_key.remote_port,
            proto: out_key.proto,
            _pad: [0; 3],
        };
        let u = self.ports.entry((out_key.proto, port)).or_default();
        if out_key.remote_ip == 0 && out_key.remote_port == 0 {
            u.wildcard = true;
        } else {
            u.remotes.insert((out_key.remote_ip, out_key.remote_port));
        }
        let entry = Entry {
            out_key,
            in_key,
            ext_port: port,
            kind,
            created_ns: now_ns,
        };
        self.entries.insert(out_key, entry.clone());
        entry
    }

    /// Removes the mapping with outbound key `key`.
    pub fn remove(&mut self, key: &NatKey) -> Option<Entry> {
        let entry = self.entries.remove(key)?;
        let pk = (key.proto, entry.ext_port);
        if let Some(u) = self.ports.get_mut(&pk) {
            if key.remote_ip == 0 && key.remote_port == 0 {
                u.wildcard = false;
            } else {
                u.remotes.remove(&(key.remote_ip, key.remote_port));
            }
            if !u.wildcard && u.remotes.is_empty() {
                self.ports.remove(&pk);
            }
        }
        Some(entry)
    }

    /// A static forward: external `port` → `lan` for `proto`, for every remote.
    pub fn add_forward(
        &mut self,
        port: u16,
        lan: SocketAddrV4,
        proto: u8,
    ) -> Result<Entry, TableError> {
        if !self.in_set(port) {
            return Err(self.outside_set(port));
        }
        let key = NatKey {
            local_ip: v4_key(*lan.ip()),
            remote_ip: 0,
            local_port: lan.port(),
            remote_port: 0,
            proto,
            _pad: [0; 3],
        };
        // The same forward, taken back after a restart (adopted as a wildcard mapping).
        if let Some(e) = self.entries.get_mut(&key)
            && e.ext_port == port
        {
            e.kind = Kind::Forward;
            return Ok(e.clone());
        }
        if let Some(u) = self.ports.get(&(proto, port)) {
            if u.wildcard {
                let to = self
                    .entries
                    .values()
                    .find(|e| e.proto() == proto && e.ext_port == port)
                    .map(Entry::lan)
                    .unwrap_or(lan);
                return Err(TableError::AlreadyForwarded {
                    port,
                    proto: proto_name(proto),
                    to,
                });
            }
            return Err(TableError::InUse {
                port,
                proto: proto_name(proto),
                flows: u.remotes.len(),
            });
        }
        if let Some(old) = self.entries.get(&key) {
            return Err(TableError::AlreadyForwarded {
                port: old.ext_port,
                proto: proto_name(proto),
                to: lan,
            });
        }
        Ok(self.insert(key, port, Kind::Forward, 0))
    }

    /// Takes back a mapping an earlier run made (found in the pinned maps or the state
    /// file): `out_key` → external `port`, of `kind`. Err when the port is outside this
    /// table's set (the rule changed) or taken in a way the mapping cannot share.
    pub fn adopt(
        &mut self,
        out_key: NatKey,
        port: u16,
        kind: Kind,
        now_ns: u64,
    ) -> Result<Entry, TableError> {
        if !self.in_set(port) || port == 0 {
            return Err(self.outside_set(port));
        }
        let wildcard = out_key.remote_ip == 0 && out_key.remote_port == 0;
        if self.entries.contains_key(&out_key) {
            return Err(TableError::InUse {
                port,
                proto: proto_name(out_key.proto),
                flows: 1,
            });
        }
        if let Some(u) = self.ports.get(&(out_key.proto, port))
            && (u.wildcard
                || (wildcard && !u.remotes.is_empty())
                || u.remotes
                    .contains(&(out_key.remote_ip, out_key.remote_port)))
        {
            return Err(TableError::InUse {
                port,
                proto: proto_name(out_key.proto),
                flows: u.remotes.len().max(1),
            });
        }
        let kind = match kind {
            Kind::Forward | Kind::EndpointIndependent if wildcard => kind,
            _ if wildcard => Kind::EndpointIndependent,
            _ => Kind::Dynamic,
        };
        Ok(self.insert(out_key, port, kind, now_ns))
    }

    /// Removes the forward on external `port`/`proto`.
    pub fn remove_forward(&mut self, port: u16, proto: u8) -> Result<Entry, TableError> {
        let key = self
            .entries
            .values()
            .find(|e| e.kind == Kind::Forward && e.ext_port == port && e.proto() == proto)
            .map(|e| e.out_key)
            .ok_or(TableError::NoSuchForward {
                port,
                proto: proto_name(proto),
            })?;
        Ok(self.remove(&key).expect("found above"))
    }

    /// A port of the set that no mapping of `proto` uses (for a PCP mapping), in the
    /// table's spread-out order.
    pub fn free_port(&self, proto: u8) -> Option<u16> {
        self.order
            .iter()
            .copied()
            .find(|p| !self.ports.contains_key(&(proto, *p)))
    }

    /// Whether `port` of the set is unused by `proto`.
    pub fn port_free(&self, proto: u8, port: u16) -> bool {
        port != 0 && self.in_set(port) && !self.ports.contains_key(&(proto, port))
    }

    /// The mapping of LAN endpoint `lan` toward `remote` (exact, else its wildcard).
    pub fn outbound(&self, proto: u8, lan: SocketAddrV4, remote: SocketAddrV4) -> Option<&Entry> {
        let key = NatKey {
            local_ip: v4_key(*lan.ip()),
            remote_ip: v4_key(*remote.ip()),
            local_port: lan.port(),
            remote_port: remote.port(),
            proto,
            _pad: [0; 3],
        };
        self.entries.get(&key).or_else(|| {
            self.entries.get(&NatKey {
                remote_ip: 0,
                remote_port: 0,
                ..key
            })
        })
    }

    /// The mapping that inbound packets from `remote` to external `port` use.
    pub fn inbound(&self, proto: u8, port: u16, remote: SocketAddrV4) -> Option<&Entry> {
        let exact = (v4_key(*remote.ip()), remote.port());
        self.entries.values().find(|e| {
            e.proto() == proto
                && e.ext_port == port
                && ((e.in_key.remote_ip, e.in_key.remote_port) == exact
                    || (e.in_key.remote_ip == 0 && e.in_key.remote_port == 0))
        })
    }

    fn outside_set(&self, port: u16) -> TableError {
        let mut ranges: Vec<String> = self
            .ranges
            .iter()
            .take(4)
            .map(|[f, l]| format!("{f}-{l}"))
            .collect();
        if self.ranges.len() > 4 {
            ranges.push("…".into());
        }
        TableError::OutsideSet {
            port,
            count: self.order.len(),
            ranges: ranges.join(", "),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::mape::rule::port_set;

    fn flow(proto: u8, lan: SocketAddrV4, remote: SocketAddrV4) -> Flow {
        Flow { proto, lan, remote }
    }

    fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(ip, port)
    }

    fn lan(port: u16) -> SocketAddrV4 {
        sa(Ipv4Addr::new(198, 51, 100, 10), port)
    }

    fn remote(port: u16) -> SocketAddrV4 {
        sa(Ipv4Addr::new(192, 0, 2, 2), port)
    }

    #[test]
    fn allocation_spreads_over_every_block() {
        // a = 6, k = 8, PSID 0xa4: 63 blocks of 4.
        let (ranges, _) = port_set(6, 8, 0xa4);
        let mut t = Table::new(&ranges, false);
        let mut per_block = vec![0usize; ranges.len()];
        for i in 0..600u16 {
            let (e, new) = t
                .lookup_or_create(&flow(TCP, lan(40000 + i), remote(5000 + i)), 0)
                .unwrap();
            assert!(new);
            assert!(t.in_set(e.ext_port));
            let b = ranges
                .iter()
                .position(|[f, l]| (*f..=*l).contains(&e.ext_port))
                .unwrap();
            per_block[b] += 1;
        }
        let (min, max) = (
            per_block.iter().min().unwrap(),
            per_block.iter().max().unwrap(),
        );
        assert!(*min > 0 && *max <= 2 * *min, "{per_block:?}");
    }

    #[test]
    fn ports_are_saved_across_remotes_and_exhaust_per_remote() {
        let (ranges, _) = port_set(0, 12, 0xa40);
        let mut t = Table::new(&ranges, false);
        assert_eq!(t.port_count(), 16);
        for dst in 0..4u16 {
            for i in 0..16u16 {
                t.lookup_or_create(
                    &flow(TCP, lan(40000 + dst * 100 + i), remote(5000 + dst)),
                    0,
                )
                .unwrap();
            }
        }
        assert_eq!(t.len(), 64);
        let err = t
            .lookup_or_create(&flow(TCP, lan(41000), remote(5000)), 0)
            .unwrap_err();
        assert!(matches!(err, TableError::Exhausted { .. }), "{err}");
        // Another protocol and another remote still have the whole set.
        t.lookup_or_create(&flow(UDP, lan(41000), remote(5000)), 0)
            .unwrap();
        t.lookup_or_create(&flow(TCP, lan(41000), remote(5004)), 0)
            .unwrap();
        // An ended flow frees its port toward that remote (a TCP one: the UDP flow to the
        // same remote is in the table too).
        let key = t
            .entries()
            .find(|e| e.proto() == TCP && e.remote() == Some(remote(5000)))
            .unwrap()
            .out_key;
        let freed = t.remove(&key).unwrap().ext_port;
        let (e, _) = t
            .lookup_or_create(&flow(TCP, lan(41001), remote(5000)), 0)
            .unwrap();
        assert_eq!(e.ext_port, freed);
    }

    #[test]
    fn forwards_own_their_port_and_stay_inside_the_set() {
        let (ranges, _) = port_set(6, 8, 0xa4);
        let mut t = Table::new(&ranges, false);
        let err = t.add_forward(1232, lan(80), TCP).unwrap_err();
        assert!(err.to_string().contains("outside"), "{err}");
        let f = t.add_forward(1680, lan(80), TCP).unwrap();
        assert_eq!(f.ext_port, 1680);
        assert!(t.add_forward(1680, lan(81), TCP).is_err());
        // Outbound from the forwarded LAN port uses the forward; inbound from anyone finds it.
        let (e, new) = t
            .lookup_or_create(&flow(TCP, lan(80), remote(1)), 0)
            .unwrap();
        assert!(!new);
        assert_eq!(e.ext_port, 1680);
        assert_eq!(t.inbound(TCP, 1680, remote(9)).unwrap().lan(), lan(80));
        // Dynamic flows never get the forwarded port.
        for i in 0..251u16 {
            let (e, _) = t
                .lookup_or_create(&flow(TCP, lan(40000 + i), remote(5000)), 0)
                .unwrap();
            assert_ne!(e.ext_port, 1680);
        }
        t.remove_forward(1680, TCP).unwrap();
        assert!(t.remove_forward(1680, TCP).is_err());
    }

    #[test]
    fn endpoint_independent_udp_takes_a_port_for_every_remote() {
        let (ranges, _) = port_set(0, 12, 0xa40);
        let mut t = Table::new(&ranges, true);
        let (a, _) = t
            .lookup_or_create(&flow(UDP, lan(5353), remote(1)), 0)
            .unwrap();
        let (b, new) = t
            .lookup_or_create(&flow(UDP, lan(5353), remote(2)), 0)
            .unwrap();
        assert!(!new);
        assert_eq!(a.ext_port, b.ext_port);
        assert_eq!(a.kind, Kind::EndpointIndependent);
        assert_eq!(
            t.inbound(UDP, a.ext_port, remote(77)).unwrap().lan(),
            lan(5353)
        );
    }
}
