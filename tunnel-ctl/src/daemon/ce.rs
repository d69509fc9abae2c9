//! `tunnel-ctl mape ce`: the MAP-E CE daemon (SPEC §6).
//!
//! The eBPF programs (`ce_out` on the LAN, `ce_in` on the WAN) translate and tunnel every
//! packet of a mapped flow; [`crate::dataplane::ce`] keeps the flow table and its mirror in
//! the maps. This module is the rest: the slow path on the TUN (first packets, packets too
//! big for the tunnel, ICMP errors from the internet), when idle mappings expire, and the
//! management commands (`nat`, `forward`, `stats`, `status`).
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use crate::tundev::Tun;
use anyhow::{Context as _, Result, anyhow};
use ipnet::Ipv4Net;
use tracing::{debug, info, warn};
use tunnel_common::{
    fastpath::{DEFAULT_HOP_LIMIT, TCP_IPV4_OVERHEAD, TunnelConfig},
    mape::{NAT_FIN_RST, NAT_SEEN},
};

use crate::mape::{
    calc, pcp, portlog,
    portlog::PortLog,
    rule::Mapping,
    table::{Entry, Kind, TCP, Table, UDP, proto_name},
    translate::{self, Outbound},
};
use crate::server::reassembly::{Reassembly, Step, Step6};
use crate::{
    config::{CeConfig, NatTimeouts},
    counters,
    dataplane::{
        bpffs::PinGuard,
        ce::{CeDataplane, CeDevices, FlowMapping},
        fastpath::v4_key,
    },
    instance::Instance,
    mgmt::{self, Handler, Reply, Request, Response, Status, api},
    netlink::Netlink,
    packet,
    softwire::{Sent, Softwire},
    tundev,
};

counters! {
    pub struct CeStats {
        slowpath_out_packets,
        slowpath_in_packets,
        slowpath_in_icmp_errors,
        slowpath_out_icmp_errors,
        mappings_created,
        mappings_expired,
        port_exhausted,
        slowpath_icmp_frag_needed,
        slowpath_fragmented,
        drop_fragment_out,
        drop_unsupported_protocol,
        drop_outbound_icmp_error,
        drop_malformed_packet,
        drop_icmp_error_no_mapping,
        drop_map_full,
        drop_send_error,
        drop_tun_write_error,
        drop_unfragmentable,
        drop_tun_not_ipv4,
        fragments_reassembled,
        outer_fragments_reassembled,
        drop_outer_not_from_br,
        drop_reassembly_full,
        drop_reassembly_bad,
        drop_reassembly_timeout,
        drop_in_no_mapping,
        ipv4_ids_rewritten,
        pcp_requests,
        pcp_mappings_created,
        pcp_mappings_expired,
        pcp_refused,
    }
}

/// Monotonic clock in ns, the clock of `bpf_ktime_get_ns`.
pub fn mono_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// The NAPT into a port set and its slow path on a TUN: first packets, packets too big for
/// the tunnel, ICMP errors from the far side, idle mappings. The MAP-E CE's, and the lwB4's
/// (a native client on a shared lease, RFC 7596: the same code).
pub struct Napt {
    /// The shared address.
    pub ipv4: Ipv4Addr,
    /// Where the tunnel goes: the BR, or the lwAFTR.
    pub br: Ipv6Addr,
    pub inner_mtu: u16,
    pub mss: u16,
    pub timeouts: NatTimeouts,
    pub dataplane: CeDataplane,
    pub stats: CeStats,
    pub tun: Arc<Tun>,
    pub softwire: Softwire,
    /// Last time an exhaustion was logged (they are counted always, logged once a second).
    exhaustion_logged: Mutex<Option<Instant>>,
    /// `--port-log`: each mapping's start and end.
    port_log: Option<Arc<PortLog>>,
    /// The mappings changed: the state file is due (None: no state file).
    pub changed: Option<tokio::sync::Notify>,
    /// Fragments both ways are put back together here first.
    reassembly: Mutex<Reassembly>,
    /// (PSID, its length): the top bits of the IPv4 id of datagrams sent fragmented.
    id_bits: (u16, u8),
    /// PCP mappings (port forwards with a lifetime): (protocol, external port) → until.
    pcp: Mutex<std::collections::HashMap<(u8, u16), (std::net::SocketAddrV4, Instant)>>,
}

impl Napt {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ipv4: Ipv4Addr,
        id_bits: (u16, u8),
        br: Ipv6Addr,
        inner_mtu: u16,
        timeouts: NatTimeouts,
        dataplane: CeDataplane,
        tun: Arc<Tun>,
        softwire: Softwire,
        port_log: Option<Arc<PortLog>>,
        state_file: bool,
    ) -> Napt {
        Napt {
            ipv4,
            br,
            inner_mtu,
            mss: inner_mtu - TCP_IPV4_OVERHEAD,
            timeouts,
            dataplane,
            stats: CeStats::default(),
            tun,
            softwire,
            exhaustion_logged: Mutex::new(None),
            port_log,
            changed: state_file.then(tokio::sync::Notify::new),
            reassembly: Mutex::new(Reassembly::default()),
            id_bits,
            pcp: Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// Adds a port forward (see [`CeDataplane::add_forward`]), logged.
    pub fn add_forward(&self, spec: &crate::mape::ForwardSpec) -> Result<Vec<Entry>> {
        let added = self.dataplane.add_forward(spec)?;
        for e in &added {
            self.log_mapping(e, true, None);
        }
        Ok(added)
    }

    /// Removes the forward of `port`/`proto`, logged.
    pub fn remove_forward(&self, port: u16, proto: u8) -> Option<Entry> {
        let e = self.dataplane.remove_forward(port, proto)?;
        self.log_mapping(&e, false, Some("removed"));
        Some(e)
    }

    /// Answers one request from `from` on the LAN to the PCP port: PCP (RFC 6887, MAP) or
    /// NAT-PMP (RFC 6886, version 0). `epoch`: seconds since the CE started.
    pub fn pcp_answer(
        &self,
        data: &[u8],
        from: std::net::SocketAddrV4,
        epoch: u32,
    ) -> Option<Vec<u8>> {
        use pcp::{Request, ResultCode};
        self.stats.pcp_requests.inc();
        if data.first() == Some(&0) {
            return self.natpmp_answer(data, from, epoch);
        }
        let req = match pcp::parse(data) {
            Request::Map(req) => req,
            Request::Refuse {
                opcode,
                lifetime,
                code,
            } => {
                self.stats.pcp_refused.inc();
                return Some(pcp::refusal(opcode, code, lifetime, epoch));
            }
            Request::Ignore => return None,
        };
        let answer = if req.client != from.ip().to_ipv6_mapped() {
            Err(ResultCode::AddressMismatch)
        } else {
            self.pcp_grant(
                req.protocol,
                std::net::SocketAddrV4::new(*from.ip(), req.internal_port),
                req.suggested_port,
                req.lifetime,
            )
        };
        Some(match answer {
            Ok((port, lifetime)) => pcp::map_response(
                &req,
                ResultCode::Success,
                lifetime,
                epoch,
                (port, self.ipv4),
            ),
            Err(code) => {
                self.stats.pcp_refused.inc();
                pcp::map_response(&req, code, 0, epoch, (0, Ipv4Addr::UNSPECIFIED))
            }
        })
    }

    /// NAT-PMP (RFC 6886): the external address, and UDP/TCP mappings as PCP makes them.
    fn natpmp_answer(
        &self,
        data: &[u8],
        from: std::net::SocketAddrV4,
        epoch: u32,
    ) -> Option<Vec<u8>> {
        use pcp::{NatPmp, ResultCode};
        Some(match pcp::parse_natpmp(data) {
            NatPmp::ExternalAddress => pcp::natpmp_address(epoch, self.ipv4),
            NatPmp::Map {
                protocol,
                internal_port,
                suggested_port,
                lifetime,
            } => {
                let lan = std::net::SocketAddrV4::new(*from.ip(), internal_port);
                match self.pcp_grant(protocol, lan, suggested_port, lifetime) {
                    Ok((port, lifetime)) => {
                        pcp::natpmp_map(protocol, 0, epoch, internal_port, port, lifetime)
                    }
                    Err(code) => {
                        self.stats.pcp_refused.inc();
                        let code = match code {
                            ResultCode::NoResources => 4,
                            _ => 2,
                        };
                        pcp::natpmp_map(protocol, code, epoch, internal_port, 0, 0)
                    }
                }
            }
            NatPmp::Refuse { opcode, code } => {
                self.stats.pcp_refused.inc();
                pcp::natpmp_refusal(opcode, code, epoch)
            }
            NatPmp::Ignore => return None,
        })
    }

    /// A PCP/NAT-PMP mapping of `lan` for `proto`: a port forward from a port of the set
    /// (`suggested` when it is free), for at most [`pcp::MAX_LIFETIME`]; asking again
    /// renews it, lifetime 0 deletes it. Ok: (external port, lifetime granted).
    fn pcp_grant(
        &self,
        proto: u8,
        lan: std::net::SocketAddrV4,
        suggested: u16,
        lifetime: u32,
    ) -> Result<(u16, u32), pcp::ResultCode> {
        use pcp::ResultCode;
        if !matches!(proto, TCP | UDP) || lan.port() == 0 {
            return Err(ResultCode::UnsuppProtocol);
        }
        let held = lock(&self.pcp)
            .iter()
            .find(|((p, _), (l, _))| *p == proto && *l == lan)
            .map(|((_, port), _)| *port);
        if lifetime == 0 {
            if let Some(port) = held {
                lock(&self.pcp).remove(&(proto, port));
                self.remove_forward(port, proto);
            }
            return Ok((0, 0));
        }
        let lifetime = lifetime.min(pcp::MAX_LIFETIME);
        let until = Instant::now() + Duration::from_secs(u64::from(lifetime));
        let port = match held {
            Some(port) => port,
            None => {
                let port = self.dataplane.with_table(|t| {
                    if t.port_free(proto, suggested) {
                        Some(suggested)
                    } else {
                        t.free_port(proto)
                    }
                });
                let Some(port) = port else {
                    return Err(ResultCode::NoResources);
                };
                let spec = crate::mape::ForwardSpec {
                    ext_port: port,
                    lan,
                    protos: vec![proto],
                };
                if let Err(e) = self.add_forward(&spec) {
                    warn!("PCP mapping {port} → {lan}: {e:#}");
                    return Err(ResultCode::NoResources);
                }
                self.stats.pcp_mappings_created.inc();
                info!(
                    "PCP: {} port {port} → {lan} for {lifetime} s",
                    proto_name(proto)
                );
                port
            }
        };
        lock(&self.pcp).insert((proto, port), (lan, until));
        Ok((port, lifetime))
    }

    /// A mapping started or ended: the port log says so, the state file is due.
    pub fn log_mapping(&self, entry: &Entry, start: bool, reason: Option<&str>) {
        if let Some(log) = &self.port_log {
            log.record(&portlog::Event::of(
                entry,
                start,
                reason,
                std::time::SystemTime::now(),
            ));
        }
        if let Some(changed) = &self.changed {
            changed.notify_one();
        }
    }

    /// The slow path and the expiry, for as long as the NAPT runs.
    pub async fn run(self: Arc<Self>) {
        tokio::select! {
            () = tun_reader(self.clone()) => {}
            () = expire(self.clone()) => {}
        }
    }
}

struct Ce {
    /// The NAPT and the mapping it serves (`--prefix auto` replaces both).
    current: std::sync::RwLock<(Arc<Napt>, Mapping)>,
    /// The configuration running now (reloads compare with it and take turns on it).
    running: tokio::sync::Mutex<CeConfig>,
    started: Instant,
    instance: Instance,
    wan: String,
    lan: String,
    tun_name: String,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Ce {
    fn current(&self) -> (Arc<Napt>, Mapping) {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn napt(&self) -> Arc<Napt> {
        self.current().0
    }

    /// Reload: the file's port forwards are applied in place (those it no longer lists go,
    /// new ones come; forwards added with `tunnel-ctl forward` stay), every other mapping is
    /// left alone; the rest only changes with a restart and is reported so. A forward that
    /// cannot be added undoes the whole reload.
    async fn reload(&self, new: CeConfig) -> Result<Vec<String>, String> {
        let mut running = self.running.lock().await;
        let mut changes: Vec<String> = super::restart_only(&[
            ("wan", &running.wan, &new.wan),
            ("lan", &running.lan, &new.lan),
            ("rule", &running.rule, &new.rule),
            ("udp-eim", &running.udp_eim, &new.udp_eim),
            ("timeouts", &running.timeouts, &new.timeouts),
            ("tun", &running.tun, &new.tun),
            (
                "no-default-route",
                &running.no_default_route,
                &new.no_default_route,
            ),
            ("metrics", &running.metrics, &new.metrics),
            ("pcp", &running.pcp, &new.pcp),
            ("prefix-from", &running.prefix_from, &new.prefix_from),
            ("port-log", &running.port_log, &new.port_log),
            ("state-dir", &running.state_dir, &new.state_dir),
        ]);
        let gone: Vec<_> = running
            .forward
            .iter()
            .filter(|f| !new.forward.contains(f))
            .cloned()
            .collect();
        let added: Vec<_> = new
            .forward
            .iter()
            .filter(|f| !running.forward.contains(f))
            .cloned()
            .collect();
        let remove = |specs: &[crate::mape::ForwardSpec]| {
            for spec in specs {
                for &proto in &spec.protos {
                    self.napt().remove_forward(spec.ext_port, proto);
                }
            }
        };
        remove(&gone);
        let mut done = Vec::new();
        for spec in &added {
            match self.napt().add_forward(spec) {
                Ok(_) => done.push(spec.clone()),
                Err(e) => {
                    remove(&done);
                    for g in &gone {
                        let _ = self.napt().add_forward(g);
                    }
                    return Err(format!("--forward {}: {e:#}", spec.ext_port));
                }
            }
        }
        let line = |s: &crate::mape::ForwardSpec| {
            let protos: Vec<&str> = s.protos.iter().map(|p| proto_name(*p)).collect();
            format!("{}={}/{}", s.ext_port, s.lan, protos.join("+"))
        };
        changes.extend(gone.iter().map(|s| format!("forward removed: {}", line(s))));
        changes.extend(added.iter().map(|s| format!("forward added: {}", line(s))));
        running.forward = new.forward;
        if changes.is_empty() {
            changes.push("nothing changed".into());
        }
        for c in &changes {
            info!("reload: {c}");
        }
        Ok(changes)
    }
}

impl Napt {
    /// The idle timeout of `entry` given what the programs saw.
    fn timeout(&self, entry: &Entry, flags: u16, in_flags: u16) -> Duration {
        let t = &self.timeouts;
        match entry.proto() {
            TCP if in_flags & NAT_SEEN != 0 && flags & NAT_FIN_RST == 0 => t.tcp_timeout,
            TCP => t.tcp_transitory_timeout,
            UDP => t.udp_timeout,
            _ => t.icmp_timeout,
        }
    }

    pub fn nat_list(&self) -> Vec<api::NatRow> {
        let now = mono_ns();
        let mut rows: Vec<api::NatRow> = self
            .dataplane
            .mappings()
            .into_iter()
            .map(|(e, a)| {
                let last = a.last_seen_ns.max(e.created_ns);
                api::NatRow {
                    proto: proto_name(e.proto()),
                    lan: e.lan().to_string(),
                    external_port: e.ext_port,
                    remote: e.remote().map_or("*".to_owned(), |r| r.to_string()),
                    kind: if lock(&self.pcp).contains_key(&(e.proto(), e.ext_port)) {
                        "pcp"
                    } else {
                        e.kind.as_str()
                    },
                    idle_ms: if e.kind == Kind::Forward {
                        0
                    } else {
                        now.saturating_sub(last) / 1_000_000
                    },
                }
            })
            .collect();
        rows.sort_by_key(|r| (r.proto, r.external_port));
        rows
    }
}

fn describe(e: &Entry) -> String {
    format!(
        "{} {} → :{} → {}",
        proto_name(e.proto()),
        e.lan(),
        e.ext_port,
        e.remote().map_or("*".to_owned(), |r| r.to_string())
    )
}

impl Handler for Ce {
    fn handle(&self, request: Request) -> Response {
        match request {
            Request::Status => {
                let (napt, m) = self.current();
                let (mappings, (out, inb)) = napt.dataplane.counts();
                Status::Ce(api::CeStatus {
                    process: api::Process::now(&self.instance, self.started),
                    wan: self.wan.clone(),
                    lan: self.lan.clone(),
                    tun: self.tun_name.clone(),
                    ipv4: m.ipv4,
                    psid: m.psid,
                    psid_len: m.psid_len,
                    psid_offset: m.psid_offset,
                    port_count: m.port_count,
                    ce_ipv6: m.ce_ipv6,
                    br: napt.br,
                    inner_mtu: napt.inner_mtu,
                    mappings,
                    map_entries_out: out,
                    map_entries_in: inb,
                })
                .into()
            }
            Request::Stats => mgmt::counters_response(
                self.napt().stats.snapshot(),
                Some(self.napt().dataplane.counters()),
            ),
            Request::Nat => Response::Ok(Reply::Nat(self.napt().nat_list())),
            Request::ForwardList => {
                let mut rows: Vec<api::ForwardRow> = self
                    .napt()
                    .dataplane
                    .forwards()
                    .into_iter()
                    .map(|(port, proto, lan)| api::ForwardRow {
                        external_port: port,
                        proto: proto_name(proto),
                        lan: lan.to_string(),
                    })
                    .collect();
                rows.sort_by_key(|r| (r.external_port, r.proto));
                Response::Ok(Reply::Forwards(rows))
            }
            Request::ForwardAdd { forward } => match self.napt().add_forward(&forward) {
                Ok(added) => {
                    for e in &added {
                        info!("forward added: {}", describe(e));
                    }
                    Response::Ok(Reply::Changed(added.iter().map(describe).collect()))
                }
                Err(e) => Response::Error(format!("{e:#}")),
            },
            Request::ForwardDel { port } => {
                let mut removed = Vec::new();
                for &proto in &port.protos {
                    if let Some(e) = self.napt().remove_forward(port.ext_port, proto) {
                        info!("forward removed: {}", describe(&e));
                        removed.push(describe(&e));
                    }
                }
                if removed.is_empty() {
                    Response::Error(format!("no forward on external port {port}"))
                } else {
                    Response::Ok(Reply::Changed(removed))
                }
            }
            other => mgmt::not_supported("MAP-E CE", &other),
        }
    }
}

/// Runs the CE with `args`; `source` re-reads the configuration for a reload.
/// What a CE's NAPT is built on (the same across prefix changes).
struct Base {
    wan_index: u32,
    tun_index: u32,
    inner_mtu: u16,
    tun: Arc<Tun>,
    pin_dir: std::path::PathBuf,
    port_log: Option<Arc<PortLog>>,
}

/// Loads the data plane for `mapping` (taking back what it can of `saved` and the pinned
/// maps) and the NAPT over it, with the configured port forwards.
fn build_napt(
    args: &CeConfig,
    base: &Base,
    mapping: &Mapping,
    saved: &[crate::dataplane::ce::Saved],
) -> Result<Arc<Napt>> {
    let br = mapping.br.ok_or_else(|| {
        anyhow!("the rule names no BR: pass --br IPV6 (profiles carry their own)")
    })?;
    let (dataplane, adopted) = CeDataplane::start(
        &base.pin_dir,
        &TunnelConfig {
            local: mapping.ce_ipv6.octets(),
            remote: br.octets(),
            ipv4: v4_key(mapping.ipv4),
            v6_ifindex: base.wan_index,
            tun_ifindex: base.tun_index,
            inner_mtu: base.inner_mtu,
            mss: base.inner_mtu - TCP_IPV4_OVERHEAD,
            hop_limit: DEFAULT_HOP_LIMIT,
            enabled: 1,
            ..Default::default()
        },
        Table::new(&mapping.port_ranges, args.udp_eim),
        CeDevices::Ce {
            lan: &args.lan,
            wan: &args.wan,
        },
        saved,
        mono_ns(),
    )?;
    if adopted.pinned > 0 {
        info!(
            "took back {} NAPT mappings from the pinned maps of an earlier run (their flows \
             went on meanwhile)",
            adopted.pinned
        );
    } else if adopted.saved > 0 {
        info!("re-created {} NAPT mappings saved earlier", adopted.saved);
    }
    if adopted.removed > 0 {
        info!(
            "removed {} pinned NAPT map entries this CE cannot take back (outside its port \
             set now, or half a mapping)",
            adopted.removed
        );
    }
    let napt = Arc::new(Napt::new(
        mapping.ipv4,
        (mapping.psid, mapping.psid_len),
        br,
        base.inner_mtu,
        args.timeouts,
        dataplane,
        base.tun.clone(),
        Softwire::open(mapping.ce_ipv6)?,
        base.port_log.clone(),
        true,
    ));
    for spec in &args.forward {
        napt.add_forward(spec)
            .with_context(|| format!("--forward {}", spec.ext_port))?;
    }
    info!(
        "MAP-E CE: {} with PSID {} ({} ports in {} blocks), CE {} → BR {}, WAN {} (inner MTU {}), LAN {}",
        mapping.ipv4,
        mapping.psid,
        mapping.port_count,
        mapping.port_ranges.len(),
        mapping.ce_ipv6,
        br,
        args.wan,
        base.inner_mtu,
        args.lan
    );
    Ok(napt)
}

/// The PCP server's socket: port 5351 on the LAN interface only.
fn pcp_socket(lan: &str) -> Result<tokio::net::UdpSocket> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    sock.bind_device(Some(lan.as_bytes()))
        .with_context(|| format!("--pcp: binding to {lan}"))?;
    sock.set_reuse_address(true)?;
    sock.bind(&std::net::SocketAddr::from((Ipv4Addr::UNSPECIFIED, pcp::PORT)).into())
        .with_context(|| format!("--pcp: UDP port {} on {lan}", pcp::PORT))?;
    sock.set_nonblocking(true)?;
    Ok(tokio::net::UdpSocket::from_std(sock.into())?)
}

/// Answers PCP requests from the LAN for as long as the CE runs.
async fn pcp_server(ce: &Ce, sock: &tokio::net::UdpSocket) {
    let mut buf = [0u8; 1100];
    loop {
        let Ok((n, from)) = sock.recv_from(&mut buf).await else {
            continue;
        };
        let std::net::SocketAddr::V4(from) = from else {
            continue;
        };
        let epoch = ce.started.elapsed().as_secs() as u32;
        if let Some(answer) = ce.napt().pcp_answer(&buf[..n], from, epoch) {
            let _ = sock.send_to(&answer, from).await;
        }
    }
}

/// `--prefix auto`: the mapping of the first global address on the WAN (its /64) that the
/// rule covers; None while there is none.
async fn mapping_from_wan(
    nl: &Netlink,
    wan_index: u32,
    rule: &crate::mape::RuleQuery,
) -> Option<(ipnet::Ipv6Net, Mapping)> {
    let addrs = nl.global_ipv6(wan_index).await.ok()?;
    addrs.into_iter().find_map(|(addr, _)| {
        let prefix = ipnet::Ipv6Net::new(addr, 64).ok()?.trunc();
        let q = crate::mape::RuleQuery {
            prefix,
            ..rule.clone()
        };
        calc(&q).ok().map(|m| (prefix, m))
    })
}

/// `--prefix auto`: waits (polling once a second) until the WAN's prefix gives another
/// mapping than `current`; returns it.
async fn prefix_change(
    nl: &Netlink,
    wan_index: u32,
    rule: &crate::mape::RuleQuery,
    current: &Mapping,
) -> (ipnet::Ipv6Net, Mapping) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        if let Some((prefix, m)) = mapping_from_wan(nl, wan_index, rule).await
            && (m.ipv4, m.psid, m.ce_ipv6) != (current.ipv4, current.psid, current.ce_ipv6)
        {
            return (prefix, m);
        }
    }
}

/// Runs the CE with `args`; `source` re-reads the configuration for a reload.
pub async fn run(args: CeConfig, source: super::Source<CeConfig>) -> Result<()> {
    let instance = args.instance.clone();
    if args.prefix_from.is_some() && !args.prefix_auto {
        return Err(crate::usage::usage(
            "--prefix-from names where --prefix auto reads the prefix: add --prefix auto",
        ));
    }
    super::claim(&instance)?;
    let nl = Netlink::connect()?;
    let wan_index = nl
        .index(&args.wan)
        .await
        .with_context(|| format!("--wan {}", args.wan))?;
    // `--prefix auto` reads the addresses of --wan, or of --prefix-from (a LAN interface
    // that holds a /64 of the delegated prefix).
    let prefix_dev = args.prefix_from.as_deref().unwrap_or(&args.wan);
    let prefix_index = nl
        .index(prefix_dev)
        .await
        .with_context(|| format!("--prefix-from {prefix_dev}"))?;
    let mapping = if args.prefix_auto {
        let mut logged = false;
        loop {
            if let Some((prefix, m)) = mapping_from_wan(&nl, prefix_index, &args.rule).await {
                info!("--prefix auto: {prefix} from the addresses of {prefix_dev}");
                break m;
            }
            if !std::mem::replace(&mut logged, true) {
                info!(
                    "--prefix auto: waiting for a global IPv6 address on {prefix_dev} that the rule covers"
                );
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    } else {
        calc(&args.rule)?
    };
    nl.index(&args.lan)
        .await
        .with_context(|| format!("--lan {}", args.lan))?;
    let inner_mtu = nl
        .inner_mtu(wan_index, &format!("--wan {}", args.wan))
        .await?;

    let tun = tundev::create(&args.tun)?;
    let tun_index = nl.index(&args.tun).await?;
    nl.up(tun_index, u32::from(inner_mtu)).await?;
    if !args.no_default_route {
        for half in ["0.0.0.0/1", "128.0.0.0/1"] {
            nl.route(half.parse::<Ipv4Net>().expect("constant"), tun_index)
                .await?;
        }
    }
    tundev::ensure_ipv4_forwarding("the LAN is routed into MAP-E")?;

    crate::server::persist::ensure_writable(&args.state_dir)?;
    let state_path = nat_state::path(&args.state_dir, instance.name());
    let saved = nat_state::load(&state_path);
    let port_log = args
        .port_log
        .as_deref()
        .map(|p| PortLog::open(p, args.port_log_size))
        .transpose()?
        .map(Arc::new);

    let pin_dir = instance.pin_dir();
    let _pins = PinGuard(Some(pin_dir.clone()));
    let base = Base {
        wan_index,
        tun_index,
        inner_mtu,
        tun,
        pin_dir,
        port_log,
    };
    let napt = build_napt(&args, &base, &mapping, &saved)?;
    let ce = Arc::new(Ce {
        current: std::sync::RwLock::new((napt, mapping)),
        running: tokio::sync::Mutex::new(args.clone()),
        started: Instant::now(),
        instance: instance.clone(),
        wan: args.wan.clone(),
        lan: args.lan.clone(),
        tun_name: args.tun.clone(),
    });
    let reload = super::reloader(source, ce.clone(), |ce, cfg| {
        Box::pin(async move { ce.reload(cfg?).await })
    });
    let daemon = super::Daemon::start(&instance, ce.clone(), args.metrics)
        .await?
        .with_reload(reload);
    let pcp_socket = if args.pcp {
        Some(pcp_socket(&args.lan)?)
    } else {
        None
    };
    let pcp = async {
        match &pcp_socket {
            Some(sock) => pcp_server(&ce, sock).await,
            None => std::future::pending().await,
        }
    };
    let remap = async {
        loop {
            let (napt, mapping) = ce.current();
            let auto = async {
                if args.prefix_auto {
                    prefix_change(&nl, prefix_index, &args.rule, &mapping).await
                } else {
                    std::future::pending().await
                }
            };
            let (prefix, new) = tokio::select! {
                () = napt.clone().run() => return,
                () = nat_state::writer(&napt, &state_path) => return,
                change = auto => change,
            };
            info!(
                "--prefix auto: {prefix_dev} now has {prefix}: moving from {} PSID {} to {} PSID {}; \
                 existing flows end",
                mapping.ipv4, mapping.psid, new.ipv4, new.psid
            );
            let config = ce.running.lock().await.clone();
            match build_napt(&config, &base, &new, &[]) {
                Ok(n) => *ce.current.write().unwrap_or_else(|p| p.into_inner()) = (n, new),
                Err(e) => warn!("--prefix auto: staying on {}: {e:#}", mapping.ipv4),
            }
        }
    };
    let work = async {
        tokio::select! {
            () = remap => {}
            () = pcp => {}
        }
    };
    daemon.run(work, "stopping").await;
    nat_state::save_now(&ce.napt(), &state_path);
    Ok(())
}

async fn tun_reader(ce: Arc<Napt>) {
    let mut buf = vec![0u8; 65536];
    loop {
        let n = crate::tundev::recv(&ce.tun, &mut buf).await;
        slow_path(&ce, &mut buf[..n], false).await;
    }
}

/// A packet from the TUN; `unwrapped`: it came out of reassembled outer fragments (so ce_in
/// never saw it).
async fn slow_path(ce: &Napt, pkt: &mut [u8], unwrapped: bool) {
    let stats = &ce.stats;
    if pkt.first().is_some_and(|b| b >> 4 == 6) {
        // Outer IPv6 fragments from the BR (ce_in handed them over).
        let step = {
            let mut expired = 0;
            let step = lock(&ce.reassembly).push6(pkt, Instant::now(), &mut expired);
            stats.drop_reassembly_timeout.add(expired as u64);
            step
        };
        return match step {
            Step6::Done {
                src,
                next: 4,
                mut payload,
            } if src == ce.br => {
                stats.outer_fragments_reassembled.inc();
                // The inner packet, as if ce_in had unwrapped it (it may be a fragment
                // itself).
                Box::pin(slow_path(ce, &mut payload, true)).await
            }
            Step6::Done { .. } => stats.drop_outer_not_from_br.inc(),
            Step6::Kept => {}
            Step6::Full => stats.drop_reassembly_full.inc(),
            Step6::Bad => stats.drop_reassembly_bad.inc(),
        };
    }
    if packet::is_fragment(pkt) {
        // Both ways: a non-first fragment names no port (RFC 7597 §8.3.2).
        let step = {
            let mut expired = 0;
            let step = lock(&ce.reassembly).push(pkt, Instant::now(), &mut expired);
            stats.drop_reassembly_timeout.add(expired as u64);
            step
        };
        match step {
            Step::Done(mut whole) => {
                stats.fragments_reassembled.inc();
                return slow_path_whole(ce, &mut whole, true).await;
            }
            Step::Kept => return,
            Step::Full => return stats.drop_reassembly_full.inc(),
            Step::Bad => return stats.drop_reassembly_bad.inc(),
            Step::Whole => {}
        }
    }
    slow_path_whole(ce, pkt, unwrapped).await
}

/// A whole packet (`reassembled` from fragments, or as it came).
async fn slow_path_whole(ce: &Napt, pkt: &mut [u8], reassembled: bool) {
    let stats = &ce.stats;
    let Some(IpAddr::V4(dst)) = packet::destination(pkt) else {
        stats.drop_tun_not_ipv4.inc();
        return;
    };
    if dst == ce.ipv4 && reassembled && !translate::is_icmp_error(pkt) {
        // A datagram from the internet that came in fragments.
        let lan = translate::inbound_key(pkt).and_then(|(proto, port, remote)| {
            ce.dataplane
                .with_table(|t| t.inbound(proto, port, remote).map(Entry::lan))
        });
        let Some(lan) = lan else {
            return stats.drop_in_no_mapping.inc();
        };
        translate::translate_in(pkt, lan);
        match ce.tun.send(pkt).await {
            Ok(_) => stats.slowpath_in_packets.inc(),
            Err(_) => stats.drop_tun_write_error.inc(),
        }
        return;
    }
    if dst == ce.ipv4 {
        // Redirected by ce_in: an ICMP error about one of our flows.
        let ok = ce.dataplane.with_table(|table| {
            translate::translate_icmp_error_in(pkt, |proto, port, remote| {
                table.inbound(proto, port, remote).map(Entry::lan)
            })
        });
        if !ok {
            stats.drop_icmp_error_no_mapping.inc();
            return;
        }
        match ce.tun.send(pkt).await {
            Ok(_) => stats.slowpath_in_icmp_errors.inc(),
            Err(_) => stats.drop_tun_write_error.inc(),
        }
        return;
    }
    let flow = match translate::outbound(pkt) {
        Outbound::Flow(flow) => flow,
        Outbound::Fragment => return stats.drop_fragment_out.inc(),
        Outbound::IcmpError => return icmp_error_out(ce, pkt).await,
        Outbound::Unsupported => return stats.drop_unsupported_protocol.inc(),
        Outbound::Malformed => return stats.drop_malformed_packet.inc(),
    };
    let entry = match ce.dataplane.map_flow(&flow, mono_ns()) {
        FlowMapping::Existing(entry) => entry,
        FlowMapping::Created(entry) => {
            stats.mappings_created.inc();
            debug!("new mapping {}", describe(&entry));
            ce.log_mapping(&entry, true, None);
            entry
        }
        FlowMapping::MapFull(entry, e) => {
            stats.drop_map_full.inc();
            warn!("cannot install mapping {}: {e:#}", describe(&entry));
            return;
        }
        FlowMapping::Exhausted(e) => {
            stats.port_exhausted.inc();
            let log_now = {
                let mut logged = lock(&ce.exhaustion_logged);
                let due = logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
                if due {
                    *logged = Some(Instant::now());
                }
                due
            };
            if log_now {
                warn!("new flow {} → {} refused: {e}", flow.lan, flow.remote);
            }
            if let Some(icmp) = translate::admin_prohibited(pkt, *flow.remote.ip()) {
                let _ = ce.tun.send(&icmp).await;
            }
            return;
        }
    };
    // Too big with DF: the sender hears about it with its own addresses.
    if pkt.len() > usize::from(ce.inner_mtu) && packet::dont_fragment(pkt) {
        match packet::icmp_frag_needed(pkt, *flow.remote.ip(), ce.inner_mtu) {
            Some(icmp) => match ce.tun.send(&icmp).await {
                Ok(_) => stats.slowpath_icmp_frag_needed.inc(),
                Err(_) => stats.drop_tun_write_error.inc(),
            },
            None => stats.drop_unfragmentable.inc(),
        }
        return;
    }
    translate::translate_out(pkt, ce.ipv4, entry.ext_port, ce.mss);
    if (reassembled || pkt.len() > usize::from(ce.inner_mtu)) && ce.id_bits.1 > 0 {
        // Sent in fragments: an id no other CE of this address uses.
        let id = u16::from_be_bytes([pkt[4], pkt[5]]);
        if packet::set_ipv4_id(pkt, packet::shared_ipv4_id(id, ce.id_bits.0, ce.id_bits.1)) {
            stats.ipv4_ids_rewritten.inc();
        }
    }
    // DF packets that are too big were answered above; the rest fits or is fragmented.
    // Too big without DF: outer IPv6 fragments (the BR reassembles them).
    match ce
        .softwire
        .send_outer_fragmented(ce.br, pkt, ce.inner_mtu, *flow.remote.ip())
    {
        Sent::Whole => stats.slowpath_out_packets.inc(),
        Sent::Fragmented => stats.slowpath_fragmented.inc(),
        Sent::TooBig(_) | Sent::Unfragmentable => stats.drop_unfragmentable.inc(),
        Sent::Failed => stats.drop_send_error.inc(),
    }
}

/// An ICMP error from a LAN host about a mapped flow: translated (its quoted packet too)
/// and sent to the BR; without a mapping it is dropped and counted.
async fn icmp_error_out(ce: &Napt, pkt: &mut [u8]) {
    let stats = &ce.stats;
    let ok = ce.dataplane.with_table(|table| {
        translate::translate_icmp_error_out(pkt, ce.ipv4, |proto, lan, remote| {
            table.outbound(proto, lan, remote).map(|e| e.ext_port)
        })
    });
    let Some(IpAddr::V4(remote)) = packet::destination(pkt).filter(|_| ok) else {
        return stats.drop_outbound_icmp_error.inc();
    };
    match ce.softwire.send_fitted(ce.br, pkt, ce.inner_mtu, remote) {
        Sent::Whole | Sent::Fragmented => stats.slowpath_out_icmp_errors.inc(),
        Sent::TooBig(_) | Sent::Unfragmentable => stats.drop_unfragmentable.inc(),
        Sent::Failed => stats.drop_send_error.inc(),
    }
}

/// Removes mappings idle for longer than their timeout, from the maps first.
async fn expire(ce: Arc<Napt>) {
    let t = &ce.timeouts;
    let shortest = [
        t.tcp_timeout,
        t.tcp_transitory_timeout,
        t.udp_timeout,
        t.icmp_timeout,
    ]
    .into_iter()
    .min()
    .unwrap_or(Duration::from_secs(60));
    let period = (shortest / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        let expired = ce
            .dataplane
            .expire(mono_ns(), |e, a| ce.timeout(e, a.flags, a.in_flags));
        for e in expired {
            ce.stats.mappings_expired.inc();
            debug!("mapping expired: {}", describe(&e));
            ce.log_mapping(&e, false, Some("idle"));
        }
        let now = Instant::now();
        let due: Vec<(u8, u16)> = lock(&ce.pcp)
            .iter()
            .filter(|(_, (_, until))| *until <= now)
            .map(|(k, _)| *k)
            .collect();
        for (proto, port) in due {
            lock(&ce.pcp).remove(&(proto, port));
            if let Some(e) = ce.remove_forward(port, proto) {
                ce.stats.pcp_mappings_expired.inc();
                debug!("PCP mapping expired: {}", describe(&e));
            }
        }
    }
}

/// `<state-dir>/<instance>.nat.json`: the CE's mappings, so that a restarted CE takes them
/// back (with the pinned maps after a SIGKILL they only give each mapping its kind; after a
/// clean stop they are all there is).
mod nat_state {
    use std::{
        net::SocketAddrV4,
        path::{Path, PathBuf},
        time::Duration,
    };

    use serde::{Deserialize, Serialize};
    use tracing::warn;
    use tunnel_common::{fastpath::v4_key, mape::NatKey};

    use super::Napt;
    use crate::{
        dataplane::ce::Saved,
        mape::table::{ICMP, Kind, TCP, UDP},
    };

    const VERSION: u32 = 1;

    #[derive(Serialize, Deserialize)]
    struct File {
        version: u32,
        mappings: Vec<Mapping>,
    }

    /// As `nat --json` names things.
    #[derive(Serialize, Deserialize)]
    struct Mapping {
        proto: String,
        lan: SocketAddrV4,
        external_port: u16,
        /// None: any remote (forwards, endpoint-independent UDP).
        remote: Option<SocketAddrV4>,
        kind: String,
    }

    pub fn path(dir: &Path, instance: &str) -> PathBuf {
        dir.join(format!("{instance}.nat.json"))
    }

    /// The saved mappings; none when the file is missing or unreadable (with a warning).
    pub fn load(path: &Path) -> Vec<Saved> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
            Err(e) => {
                warn!("{}: {e}; starting without saved mappings", path.display());
                return Vec::new();
            }
        };
        let file: File = match serde_json::from_str(&text) {
            Ok(
                f @ File {
                    version: VERSION, ..
                },
            ) => f,
            Ok(f) => {
                warn!(
                    "{}: format version {} (this CE reads {VERSION}); starting without saved mappings",
                    path.display(),
                    f.version
                );
                return Vec::new();
            }
            Err(e) => {
                warn!("{}: {e}; starting without saved mappings", path.display());
                return Vec::new();
            }
        };
        file.mappings
            .into_iter()
            .filter_map(|m| {
                let proto = match m.proto.as_str() {
                    "tcp" => TCP,
                    "udp" => UDP,
                    "icmp" => ICMP,
                    _ => return None,
                };
                let kind = match m.kind.as_str() {
                    "forward" => Kind::Forward,
                    "endpoint-independent" => Kind::EndpointIndependent,
                    _ => Kind::Dynamic,
                };
                let (remote_ip, remote_port) =
                    m.remote.map_or((0, 0), |r| (v4_key(*r.ip()), r.port()));
                Some(Saved {
                    out_key: NatKey {
                        local_ip: v4_key(*m.lan.ip()),
                        remote_ip,
                        local_port: m.lan.port(),
                        remote_port,
                        proto,
                        _pad: [0; 3],
                    },
                    ext_port: m.external_port,
                    kind,
                })
            })
            .collect()
    }

    /// Writes the table now.
    pub fn save_now(napt: &Napt, path: &Path) {
        let mappings = napt.dataplane.with_table(|t| {
            t.entries()
                .map(|e| Mapping {
                    proto: crate::mape::table::proto_name(e.proto()).to_owned(),
                    lan: e.lan(),
                    external_port: e.ext_port,
                    remote: e.remote(),
                    kind: e.kind.as_str().to_owned(),
                })
                .collect::<Vec<_>>()
        });
        let text = serde_json::to_vec(&File {
            version: VERSION,
            mappings,
        })
        .unwrap_or_default();
        if let Err(e) = crate::server::persist::write_atomic(path, &text) {
            warn!("saving the NAPT mappings: {e:#}");
        }
    }

    /// Saves the table at most once a second while it changes.
    pub async fn writer(napt: &Napt, path: &Path) {
        let Some(changed) = &napt.changed else {
            return std::future::pending().await;
        };
        loop {
            changed.notified().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            save_now(napt, path);
        }
    }
}
