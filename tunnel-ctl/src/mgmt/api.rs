//! The management protocol's messages (SPEC §8, §10): what `tunnel-ctl status|leases|stats|
//! nat|forward` ask and what each daemon answers, as types. The wire is one JSON object per
//! line: a [`Request`] tagged by `cmd`, a [`Response`] of `{"ok": <reply>}` or
//! `{"error": "..."}`. Replies carry no tag of their own: their shape is what the command
//! promises (an object of counters, a list of leases, ...), pinned by the tests below.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
};

use ipnet::Ipv6Net;
use serde::{Deserialize, Serialize};

use crate::{
    mape::{ForwardPort, ForwardSpec},
    server::softwires::Softwire,
};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// What the daemon is and does.
    Status,
    /// Counter name → value.
    Stats,
    /// The lease table (servers).
    Leases,
    /// Who held an address when (servers): `ipv4` (all: None) at `at` (RFC 3339; any
    /// time: None).
    LeaseHistory {
        #[serde(default)]
        ipv4: Option<Ipv4Addr>,
        #[serde(default)]
        at: Option<String>,
    },
    /// The NAPT mappings (MAP-E CE).
    Nat,
    /// Add a static port forward (MAP-E CE).
    ForwardAdd { forward: ForwardSpec },
    /// Remove the forward(s) on one external port (MAP-E CE).
    ForwardDel { port: ForwardPort },
    /// The static port forwards (MAP-E CE).
    ForwardList,
    /// Add a softwire to the lwAFTR's table (server).
    SoftwireAdd { softwire: Softwire },
    /// Remove the softwire of one IPv4 address and PSID (server).
    SoftwireDel { ipv4: Ipv4Addr, psid: u16 },
    /// The softwire table (server).
    SoftwireList,
    /// Re-read the configuration and apply the difference (answered with what changed).
    Reload,
}

impl Request {
    /// What the request asks about, for "this daemon has no …" answers.
    pub fn subject(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Reload => "reload",
            Request::Stats => "counters",
            Request::Leases | Request::LeaseHistory { .. } => "lease table (leases are a server's)",
            Request::Nat => "NAT table (that is a MAP-E CE's)",
            Request::ForwardAdd { .. } | Request::ForwardDel { .. } | Request::ForwardList => {
                "port forwards (those are a MAP-E CE's)"
            }
            Request::SoftwireAdd { .. } | Request::SoftwireDel { .. } | Request::SoftwireList => {
                "softwire table (that is a server's with --v6-dev)"
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Ok(Reply),
    Error(String),
}

/// A successful answer.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Reply {
    Status(Box<Status>),
    /// `stats`: counter name → value (the controller's and the eBPF programs').
    Counters(BTreeMap<String, u64>),
    Leases(Vec<LeaseRow>),
    History(Vec<crate::server::store::HistoryRow>),
    Nat(Vec<NatRow>),
    Forwards(Vec<ForwardRow>),
    Softwires(Vec<SoftwireRow>),
    /// `forward add|del`: what was added or removed, one line each.
    Changed(Vec<String>),
}

/// `status`, by role.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "role")]
pub enum Status {
    #[serde(rename = "server")]
    Server(ServerStatus),
    #[serde(rename = "client")]
    Client(ClientStatus),
    #[serde(rename = "mape-ce")]
    Ce(CeStatus),
    #[serde(rename = "mape-br")]
    Br(BrStatus),
    #[serde(rename = "lwaftr")]
    Aftr(AftrStatus),
    #[serde(rename = "monitor")]
    Monitor(MonitorStatus),
}

/// What every daemon says of itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Process {
    pub instance: String,
    pub pid: u32,
    pub uptime_s: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServerStatus {
    #[serde(flatten)]
    pub process: Process,
    pub listen: SocketAddr,
    pub tun: String,
    pub pool: String,
    pub pool_size: usize,
    pub leases: usize,
    pub sessions: usize,
    pub native: Option<NativeStatus>,
    pub ipv6: Option<ServerIpv6Status>,
    pub state_file: PathBuf,
    /// `file ...` or `postgres URL (node N)`.
    pub lease_store: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NativeStatus {
    pub tunnel_addr: Ipv6Addr,
    pub v6_dev: String,
    pub v4_dev: String,
    pub inner_mtu: u16,
    pub bindings_v4: usize,
    pub bindings_v6: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServerIpv6Status {
    pub pool6: Option<String>,
    pub delegate: Option<String>,
    pub leases6: usize,
    pub dns6: Vec<Ipv6Addr>,
    pub proxy_ndp: Option<String>,
    pub allow_in: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClientStatus {
    #[serde(flatten)]
    pub process: Process,
    pub server: SocketAddr,
    /// Every `--server`, in order.
    pub servers: Vec<SocketAddr>,
    /// `connected` or `connecting`.
    pub state: &'static str,
    pub ipv4: Option<Ipv4Addr>,
    pub dns: Option<[Ipv4Addr; 3]>,
    pub since: Option<String>,
    /// `inband` or `native`.
    pub mode: &'static str,
    pub tun: Option<String>,
    pub ipv6: Option<ClientIpv6Status>,
    pub native: Option<ClientNativeStatus>,
    pub last_error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ClientIpv6Status {
    /// ADDR/LEN.
    pub addr: String,
    pub delegated: Option<Ipv6Net>,
    pub dns6: Vec<Ipv6Addr>,
    pub lan: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ClientNativeStatus {
    pub v6_dev: String,
    pub configured: Option<ClientNativeConfigured>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ClientNativeConfigured {
    pub ipv4: Ipv4Addr,
    pub local: Ipv6Addr,
    pub server_tunnel: Ipv6Addr,
    pub inner_mtu: u16,
    /// A shared lease (lwB4): its port set; the host's traffic is NAPTed into it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub psid: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub psid_len: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub psid_offset: Option<u8>,
    /// Inclusive `[first, last]` ranges.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port_ranges: Option<Vec<[u16; 2]>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CeStatus {
    #[serde(flatten)]
    pub process: Process,
    pub wan: String,
    pub lan: String,
    pub tun: String,
    pub ipv4: Ipv4Addr,
    pub psid: u16,
    pub psid_len: u8,
    pub psid_offset: u8,
    pub port_count: u32,
    pub ce_ipv6: Ipv6Addr,
    pub br: Ipv6Addr,
    pub inner_mtu: u16,
    pub mappings: usize,
    pub map_entries_out: usize,
    pub map_entries_in: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BrStatus {
    #[serde(flatten)]
    pub process: Process,
    pub br_addr: Ipv6Addr,
    pub v6_dev: String,
    pub v4_dev: String,
    pub inner_mtu: u16,
    pub rules: Vec<BrRuleRow>,
}

/// A pure lwAFTR (`server --bindings` without `--pool`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AftrStatus {
    #[serde(flatten)]
    pub process: Process,
    pub tunnel_addr: Ipv6Addr,
    pub v6_dev: String,
    pub v4_dev: String,
    pub inner_mtu: u16,
    pub bindings: Option<PathBuf>,
    pub softwires: usize,
    pub hairpin: bool,
}

/// One line of `softwire list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SoftwireRow {
    pub ipv4: Ipv4Addr,
    pub psid: u16,
    pub psid_len: u8,
    pub psid_offset: u8,
    pub b4: Ipv6Addr,
    /// The AFTR address in force (the softwire's own, or the tunnel address).
    pub aftr: Ipv6Addr,
    pub port_count: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BrRuleRow {
    pub ipv6: String,
    pub ipv4: String,
    pub ea_len: u8,
    pub psid_offset: u8,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MonitorStatus {
    #[serde(flatten)]
    pub process: Process,
    pub interfaces: Vec<String>,
    pub directions: Vec<&'static str>,
    pub pin_dir: PathBuf,
}

/// One row of `leases --json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LeaseRow {
    pub ipv4: Ipv4Addr,
    /// The client's address (the session's peer).
    pub client: String,
    /// `inband` or `native`.
    pub mode: &'static str,
    /// RFC 3339.
    pub since: String,
    /// The session holding it; null while a restored lease waits for its client.
    pub session: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<Ipv6Addr>,
    /// The session's IPv6 address and delegated prefix (107/108).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ipv6: Vec<Ipv6Net>,
    /// What the client sent (`rx`) and was sent (`tx`), in-band and through the fast path,
    /// as IP packets and their bytes, since its session or binding began.
    #[serde(flatten)]
    pub traffic: Traffic,
    /// A shared lease (`--share`): its PSID, PSID length and offset (SPEC §4).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub psid: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub psid_len: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub psid_offset: Option<u8>,
}

/// A client's traffic as the server counts it: `rx` from the client, `tx` to it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Traffic {
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
}

impl std::ops::Add for Traffic {
    type Output = Traffic;
    fn add(self, o: Traffic) -> Traffic {
        Traffic {
            rx_bytes: self.rx_bytes + o.rx_bytes,
            tx_bytes: self.tx_bytes + o.tx_bytes,
            rx_packets: self.rx_packets + o.rx_packets,
            tx_packets: self.tx_packets + o.tx_packets,
        }
    }
}

/// One row of `nat --json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NatRow {
    /// `tcp`, `udp` or `icmp`.
    pub proto: &'static str,
    /// IPV4:PORT on the LAN.
    pub lan: String,
    pub external_port: u16,
    /// IPV4:PORT, or `*` for a forward or an endpoint-independent mapping.
    pub remote: String,
    /// `dynamic`, `endpoint-independent` or `forward`.
    pub kind: &'static str,
    pub idle_ms: u64,
}

/// One row of `forward list --json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ForwardRow {
    pub external_port: u16,
    pub proto: &'static str,
    pub lan: String,
}

impl Process {
    /// This process, up since `started`.
    pub fn now(instance: &crate::instance::Instance, started: std::time::Instant) -> Process {
        Process {
            instance: instance.name().to_owned(),
            pid: std::process::id(),
            uptime_s: started.elapsed().as_secs(),
        }
    }
}

/// A server's status with every field set, for tests.
#[cfg(test)]
pub(crate) fn example_server_status() -> ServerStatus {
    ServerStatus {
        process: Process {
            instance: "hub".into(),
            pid: 42,
            uptime_s: 7,
        },
        listen: "[::]:5678".parse().unwrap(),
        tun: "tun4o6".into(),
        pool: "198.51.100.2-198.51.100.9".into(),
        pool_size: 8,
        leases: 1,
        sessions: 2,
        native: Some(NativeStatus {
            tunnel_addr: "2001:db8:ff::1".parse().unwrap(),
            v6_dev: "v6".into(),
            v4_dev: "v4".into(),
            inner_mtu: 1460,
            bindings_v4: 1,
            bindings_v6: 1,
        }),
        ipv6: None,
        state_file: "/var/lib/tunnel/hub.leases.json".into(),
        lease_store: "file /var/lib/tunnel/hub.leases.json".into(),
    }
}

impl Status {
    /// One line for systemd's `STATUS=` (what `systemctl status` shows).
    pub fn line(&self) -> String {
        match self {
            Status::Server(s) => format!(
                "{} sessions, {} of {} addresses leased",
                s.sessions, s.leases, s.pool_size
            ),
            Status::Client(c) => match c.ipv4 {
                Some(a) if c.state == "connected" => format!("connected to {}, {a}", c.server),
                _ => format!("connecting to {}", c.server),
            },
            Status::Ce(c) => format!("{} NAPT mappings, {} ports", c.mappings, c.port_count),
            Status::Br(b) => format!("{} rules", b.rules.len()),
            Status::Aftr(a) => format!("{} softwires", a.softwires),
            Status::Monitor(m) => format!("counting on {}", m.interfaces.join(", ")),
        }
    }
}

impl From<Status> for Response {
    fn from(s: Status) -> Response {
        Response::Ok(Reply::Status(Box::new(s)))
    }
}

#[cfg(test)]
mod tests {
    //! Golden shapes: the JSON that scripts and the SPEC §10 acceptance checks read, written
    //! out by hand. A field renamed or dropped in a struct fails here.
    use serde_json::json;

    use super::*;

    fn process() -> Process {
        Process {
            instance: "hub".into(),
            pid: 42,
            uptime_s: 7,
        }
    }

    fn wire(r: &Response) -> serde_json::Value {
        serde_json::to_value(r).unwrap()
    }

    #[test]
    fn requests_are_tagged_by_cmd() {
        assert_eq!(
            serde_json::to_string(&Request::Stats).unwrap(),
            r#"{"cmd":"stats"}"#
        );
        let add = Request::ForwardAdd {
            forward: "1680=198.51.100.10:80/tcp".parse().unwrap(),
        };
        assert_eq!(
            serde_json::to_value(&add).unwrap(),
            json!({"cmd": "forward_add", "forward": {
                "ext_port": 1680, "lan": "198.51.100.10:80", "protos": [6]}})
        );
        let del = r#"{"cmd":"forward_del","port":{"ext_port":8080,"protos":[6,17]}}"#;
        assert_eq!(
            serde_json::from_str::<Request>(del).unwrap(),
            Request::ForwardDel {
                port: "8080".parse().unwrap()
            }
        );
    }

    #[test]
    fn stats_is_an_object_of_counter_name_to_integer() {
        let counters = [("leases_granted".to_string(), 3u64), ("decap".into(), 9)];
        let r = Response::Ok(Reply::Counters(counters.into_iter().collect()));
        assert_eq!(wire(&r), json!({"ok": {"decap": 9, "leases_granted": 3}}));
        assert_eq!(
            wire(&Response::Error("map gone".into())),
            json!({"error": "map gone"})
        );
    }

    #[test]
    fn leases_rows_carry_ipv4_client_mode_since() {
        let row = LeaseRow {
            ipv4: "198.51.100.2".parse().unwrap(),
            client: "2001:db8:1::2".into(),
            mode: "native",
            since: "2026-11-23T10:00:00Z".into(),
            session: Some(4),
            tunnel: Some("2001:db8:1::2".parse().unwrap()),
            ipv6: vec![],
            traffic: Traffic {
                rx_bytes: 1500,
                tx_bytes: 3000,
                rx_packets: 1,
                tx_packets: 2,
            },
            psid: None,
            psid_len: None,
            psid_offset: None,
        };
        let restored = LeaseRow {
            mode: "inband",
            session: None,
            tunnel: None,
            ipv6: vec!["2001:db8:600::2/128".parse().unwrap()],
            traffic: Traffic::default(),
            ..row.clone()
        };
        assert_eq!(
            wire(&Response::Ok(Reply::Leases(vec![row, restored]))),
            json!({"ok": [
                {"ipv4": "198.51.100.2", "client": "2001:db8:1::2", "mode": "native",
                 "since": "2026-11-23T10:00:00Z", "session": 4, "tunnel": "2001:db8:1::2",
                 "rx_bytes": 1500, "tx_bytes": 3000, "rx_packets": 1, "tx_packets": 2},
                {"ipv4": "198.51.100.2", "client": "2001:db8:1::2", "mode": "inband",
                 "since": "2026-11-23T10:00:00Z", "session": null,
                 "ipv6": ["2001:db8:600::2/128"],
                 "rx_bytes": 0, "tx_bytes": 0, "rx_packets": 0, "tx_packets": 0},
            ]})
        );
    }

    #[test]
    fn server_status_has_its_role_and_every_field() {
        let status = Status::Server(example_server_status());
        assert_eq!(
            wire(&status.into()),
            json!({"ok": {
                "role": "server", "instance": "hub", "pid": 42, "uptime_s": 7,
                "listen": "[::]:5678", "tun": "tun4o6", "pool": "198.51.100.2-198.51.100.9",
                "pool_size": 8, "leases": 1, "sessions": 2,
                "native": {"tunnel_addr": "2001:db8:ff::1", "v6_dev": "v6", "v4_dev": "v4",
                           "inner_mtu": 1460, "bindings_v4": 1, "bindings_v6": 1},
                "ipv6": null, "state_file": "/var/lib/tunnel/hub.leases.json",
                "lease_store": "file /var/lib/tunnel/hub.leases.json"}})
        );
    }

    #[test]
    fn client_status_says_connected_or_connecting() {
        let status = Status::Client(ClientStatus {
            process: process(),
            server: "[2001:db8:100::1]:5678".parse().unwrap(),
            servers: vec![
                "[2001:db8:100::1]:5678".parse().unwrap(),
                "[2001:db8:200::1]:5678".parse().unwrap(),
            ],
            state: "connected",
            ipv4: Some("198.51.100.7".parse().unwrap()),
            dns: Some(["192.0.2.53".parse().unwrap(); 3]),
            since: Some("2026-12-01T00:00:00Z".into()),
            mode: "inband",
            tun: Some("tun0".into()),
            ipv6: None,
            native: None,
            last_error: None,
        });
        assert_eq!(
            wire(&status.into()),
            json!({"ok": {
                "role": "client", "instance": "hub", "pid": 42, "uptime_s": 7,
                "server": "[2001:db8:100::1]:5678",
                "servers": ["[2001:db8:100::1]:5678", "[2001:db8:200::1]:5678"],
                "state": "connected",
                "ipv4": "198.51.100.7", "dns": ["192.0.2.53", "192.0.2.53", "192.0.2.53"],
                "since": "2026-12-01T00:00:00Z", "mode": "inband", "tun": "tun0",
                "ipv6": null, "native": null, "last_error": null}})
        );
    }

    #[test]
    fn ce_status_and_nat_rows() {
        let status = Status::Ce(CeStatus {
            process: process(),
            wan: "wan0".into(),
            lan: "lan0".into(),
            tun: "mape0".into(),
            ipv4: "203.0.113.5".parse().unwrap(),
            psid: 52,
            psid_len: 8,
            psid_offset: 4,
            port_count: 240,
            ce_ipv6: "2001:db8:12:3400:0:cb00:7105:34".parse().unwrap(),
            br: "2001:db8:ffff::1".parse().unwrap(),
            inner_mtu: 1460,
            mappings: 3,
            map_entries_out: 3,
            map_entries_in: 3,
        });
        assert_eq!(
            wire(&status.into()),
            json!({"ok": {
                "role": "mape-ce", "instance": "hub", "pid": 42, "uptime_s": 7,
                "wan": "wan0", "lan": "lan0", "tun": "mape0", "ipv4": "203.0.113.5",
                "psid": 52, "psid_len": 8, "psid_offset": 4, "port_count": 240,
                "ce_ipv6": "2001:db8:12:3400:0:cb00:7105:34", "br": "2001:db8:ffff::1",
                "inner_mtu": 1460, "mappings": 3, "map_entries_out": 3, "map_entries_in": 3}})
        );
        let nat = Reply::Nat(vec![NatRow {
            proto: "udp",
            lan: "192.0.2.10:5353".into(),
            external_port: 13_456,
            remote: "*".into(),
            kind: "endpoint-independent",
            idle_ms: 120,
        }]);
        assert_eq!(
            wire(&Response::Ok(nat)),
            json!({"ok": [{"proto": "udp", "lan": "192.0.2.10:5353", "external_port": 13456,
                           "remote": "*", "kind": "endpoint-independent", "idle_ms": 120}]})
        );
    }

    #[test]
    fn br_and_monitor_status() {
        let br = Status::Br(BrStatus {
            process: process(),
            br_addr: "2001:db8:ffff::1".parse().unwrap(),
            v6_dev: "v6".into(),
            v4_dev: "v4".into(),
            inner_mtu: 1460,
            rules: vec![BrRuleRow {
                ipv6: "2001:db8:12::/40".into(),
                ipv4: "203.0.113.0/24".into(),
                ea_len: 16,
                psid_offset: 4,
            }],
        });
        assert_eq!(
            wire(&br.into())["ok"],
            json!({"role": "mape-br", "instance": "hub", "pid": 42, "uptime_s": 7,
                   "br_addr": "2001:db8:ffff::1", "v6_dev": "v6", "v4_dev": "v4",
                   "inner_mtu": 1460, "rules": [{"ipv6": "2001:db8:12::/40",
                   "ipv4": "203.0.113.0/24", "ea_len": 16, "psid_offset": 4}]})
        );
        let monitor = Status::Monitor(MonitorStatus {
            process: process(),
            interfaces: vec!["eth0".into()],
            directions: vec!["ingress", "egress"],
            pin_dir: "/sys/fs/bpf/tunnel/hub".into(),
        });
        assert_eq!(
            wire(&monitor.into())["ok"],
            json!({"role": "monitor", "instance": "hub", "pid": 42, "uptime_s": 7,
                   "interfaces": ["eth0"], "directions": ["ingress", "egress"],
                   "pin_dir": "/sys/fs/bpf/tunnel/hub"})
        );
    }
}
