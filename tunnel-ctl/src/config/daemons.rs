//! What each daemon runs with: plain settings, the same whether they came from flags, a
//! `--config` file or both (see the module above for how the file becomes flags). `cli`
//! turns its parsed arguments into these; the daemons know nothing of clap.
use std::{
    fmt,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    str::FromStr,
    time::Duration,
};

use ipnet::{IpNet, Ipv6Net};

use crate::{
    dataplane::tc::Direction,
    instance::Instance,
    mape::{ForwardSpec, RuleQuery, rule::InterfaceId, rule::RuleSpec},
    pool::Range4,
};

/// `--keepalive` and `--timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timers {
    pub keepalive: Duration,
    pub timeout: Duration,
}

impl Timers {
    /// A timeout must leave room for at least one keepalive: a peer that keeps alive on time
    /// would otherwise be dropped.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.timeout <= self.keepalive {
            return Err(crate::usage::usage(format!(
                "--timeout {} must be longer than --keepalive {} (a peer that keeps alive on \
                 time would be dropped); a timeout of three keepalives is usual",
                humantime::format_duration(self.timeout),
                humantime::format_duration(self.keepalive)
            )));
        }
        Ok(())
    }
}

/// `tunnel-ctl server`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Empty with `bindings`: a pure lwAFTR (no control channel, no TUN).
    pub pool: Vec<Range4>,
    /// Unspecified (0.0.0.0) only when there is no pool.
    pub gateway: Ipv4Addr,
    pub dns: Vec<Ipv4Addr>,
    pub timers: Timers,
    pub hold: Duration,
    pub tun: String,
    /// TUN queues, each read by its own worker (`IFF_MULTI_QUEUE` when more than one).
    pub tun_queues: usize,
    /// TUN offloads (super-packets read, GRO writes) unless `--no-tun-offload`.
    pub tun_offload: bool,
    pub allow: Vec<IpNet>,
    pub max_sessions: usize,
    pub max_per_source: usize,
    pub max_bindings: u32,
    pub max_leases_per_prefix: usize,
    pub prefix_len: u8,
    pub max_leases_per_address: usize,
    pub max_connect_rate: u32,
    pub handshake_timeout: Duration,
    pub session_queue: u32,
    pub session_buffer: u32,
    pub pool6: Option<Ipv6Net>,
    pub delegate: Option<Ipv6Net>,
    pub delegate_len: u8,
    pub dns6: Vec<Ipv6Addr>,
    pub proxy_ndp: Option<String>,
    pub allow_in: Vec<AllowIn>,
    pub v6_dev: Option<String>,
    pub v4_dev: Option<String>,
    pub tunnel_addr: Option<Ipv6Addr>,
    pub policy_icmp: u32,
    /// `--bindings`: the static softwire table (lwAFTR).
    pub bindings: Option<PathBuf>,
    pub no_hairpin: bool,
    /// `--xdp`: the server's decapsulation in XDP too.
    pub xdp: bool,
    /// `--share`: clients per address (1: whole addresses).
    pub share: u16,
    pub psid_offset: u8,
    pub state_dir: PathBuf,
    /// `--lease-store`.
    pub lease_store: LeaseStoreSpec,
    /// `--node-id`; None: the host name.
    pub node_id: Option<String>,
    pub client_key: ClientKey,
    pub instance: Instance,
    pub metrics: Option<SocketAddr>,
}

/// `--client-key`: which clients count as the same one for getting their address back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ClientKey {
    /// The same source address.
    #[default]
    Address,
    /// Any IPv6 source in the same /64 (IPv4 clients: the same address).
    Prefix64,
}

impl ClientKey {
    /// `peer`'s key (canonical: IPv4-mapped clients as IPv4).
    pub fn of(self, peer: std::net::IpAddr) -> std::net::IpAddr {
        match (self, peer.to_canonical()) {
            (ClientKey::Prefix64, std::net::IpAddr::V6(a)) => {
                std::net::IpAddr::V6(Ipv6Addr::from(u128::from(a) & !((1u128 << 64) - 1)))
            }
            (_, other) => other,
        }
    }
}

/// `--lease-store`: where a concentrator keeps its leases.
#[derive(Clone, PartialEq, Eq)]
pub enum LeaseStoreSpec {
    /// The lease file in `--state-dir` (one machine).
    File,
    /// A PostgreSQL connection URL (several concentrators, one pool).
    Postgres(String),
}

impl fmt::Debug for LeaseStoreSpec {
    /// Without the URL's password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LeaseStoreSpec::File => f.write_str("file"),
            LeaseStoreSpec::Postgres(url) => f.write_str(&redact_url(url)),
        }
    }
}

/// `url` with any password (`user:PASSWORD@`, `password=PASSWORD`) replaced by `***` (for
/// logs and errors).
pub fn redact_url(url: &str) -> String {
    let mut out = match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let auth = &url[scheme + 3..at];
            match auth.find(':') {
                Some(colon) => {
                    format!("{}{}:***{}", &url[..scheme + 3], &auth[..colon], &url[at..])
                }
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    };
    if let Some(query) = out.find('?') {
        let redacted: Vec<String> = out[query + 1..]
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k == "password" => format!("{k}=***"),
                _ => kv.to_owned(),
            })
            .collect();
        out = format!("{}?{}", &out[..query], redacted.join("&"));
    }
    out
}

impl FromStr for LeaseStoreSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<LeaseStoreSpec, String> {
        if s == "file" {
            return Ok(LeaseStoreSpec::File);
        }
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            return s
                .parse::<tokio_postgres::Config>()
                .map(|_| LeaseStoreSpec::Postgres(s.to_owned()))
                .map_err(|e| format!("not a PostgreSQL URL ({e})"));
        }
        Err("`file` or a PostgreSQL URL (postgres://USER@HOST/DB)".into())
    }
}

/// How a client carries its IPv4 traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientMode {
    /// 102/103 over the TCP session, through a TUN.
    Inband,
    /// IPv4-in-IPv6 by eBPF, after 105/106.
    Native,
}

/// `tunnel-ctl client`.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `--server`, in order of preference (at least one).
    pub servers: Vec<SocketAddr>,
    pub mode: ClientMode,
    pub v6_dev: Option<String>,
    pub tun: String,
    /// TUN offloads (super-packets read, GRO writes) unless `--no-tun-offload`.
    pub tun_offload: bool,
    pub no_default_route: bool,
    pub ipv6: bool,
    pub lan: Option<String>,
    pub write_resolv_conf: Option<PathBuf>,
    pub timers: Timers,
    pub max_backoff: Duration,
    pub instance: Instance,
    pub metrics: Option<SocketAddr>,
}

/// The CE's idle timeouts per kind of mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatTimeouts {
    pub tcp_timeout: Duration,
    pub tcp_transitory_timeout: Duration,
    pub udp_timeout: Duration,
    pub icmp_timeout: Duration,
}

/// `mape ce`'s defaults (RFC 5382, RFC 4787); the lwB4 uses them.
impl Default for NatTimeouts {
    fn default() -> NatTimeouts {
        NatTimeouts {
            tcp_timeout: Duration::from_secs(2 * 3600 + 4 * 60),
            tcp_transitory_timeout: Duration::from_secs(4 * 60),
            udp_timeout: Duration::from_secs(2 * 60),
            icmp_timeout: Duration::from_secs(60),
        }
    }
}

/// `tunnel-ctl mape ce`.
#[derive(Debug, Clone)]
pub struct CeConfig {
    pub wan: String,
    pub lan: String,
    pub rule: RuleQuery,
    pub forward: Vec<ForwardSpec>,
    pub udp_eim: bool,
    pub timeouts: NatTimeouts,
    pub tun: String,
    pub no_default_route: bool,
    /// `--prefix auto`: `rule.prefix` is taken from the WAN's addresses, and followed.
    pub prefix_auto: bool,
    /// `--prefix-from`: the interface `--prefix auto` reads (default `wan`).
    pub prefix_from: Option<String>,
    /// `--pcp`: answer PCP MAP requests from the LAN.
    pub pcp: bool,
    /// Where `<instance>.nat.json` (the mappings) is saved.
    pub state_dir: PathBuf,
    /// `--port-log FILE`, rotated at `port_log_size` bytes.
    pub port_log: Option<PathBuf>,
    pub port_log_size: u64,
    pub instance: Instance,
    pub metrics: Option<SocketAddr>,
}

/// `tunnel-ctl mape br`.
#[derive(Debug, Clone)]
pub struct BrConfig {
    pub v6_dev: String,
    pub v4_dev: String,
    pub br_addr: Ipv6Addr,
    pub rule: Vec<RuleSpec>,
    pub interface_id: InterfaceId,
    pub tun: String,
    /// `--xdp`: the BR's decapsulation in XDP too.
    pub xdp: bool,
    pub instance: Instance,
    pub metrics: Option<SocketAddr>,
}

/// `tunnel-ctl monitor`.
#[derive(Debug, Clone)]
pub struct MonitorConfig {
    pub devs: Vec<String>,
    pub directions: Vec<Direction>,
    pub instance: Instance,
    pub metrics: Option<SocketAddr>,
}

/// `--allow-in PORT[/tcp|/udp]`: new inbound connections to this port pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllowIn {
    pub port: u16,
    /// None: TCP and UDP.
    pub proto: Option<u8>,
}

impl FromStr for AllowIn {
    type Err = String;

    fn from_str(s: &str) -> Result<AllowIn, String> {
        let (port, proto) = match s.split_once('/') {
            Some((p, "tcp")) => (p, Some(6)),
            Some((p, "udp")) => (p, Some(17)),
            Some((_, other)) => {
                return Err(format!(
                    "{s:?}: protocol {other:?} is not tcp or udp (write PORT, PORT/tcp or PORT/udp)"
                ));
            }
            None => (s, None),
        };
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{s:?}: {port:?} is not a port (1-65535)"))?;
        Ok(AllowIn { port, proto })
    }
}

impl fmt::Display for AllowIn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.proto {
            Some(6) => write!(f, "{}/tcp", self.port),
            Some(17) => write!(f, "{}/udp", self.port),
            _ => write!(f, "{}", self.port),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_store_url_is_shown_without_its_password() {
        assert_eq!(
            redact_url("postgres://tunnel:s3cret@db.example.net/tunnel"),
            "postgres://tunnel:***@db.example.net/tunnel"
        );
        assert_eq!(
            redact_url("postgresql:///tunnel?host=/run/postgresql&password=s3cret&user=t"),
            "postgresql:///tunnel?host=/run/postgresql&password=***&user=t"
        );
        assert_eq!(
            redact_url("postgres://tunnel@db.example.net/tunnel"),
            "postgres://tunnel@db.example.net/tunnel"
        );
    }
}
