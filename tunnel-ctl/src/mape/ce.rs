//! `tunnel-ctl mape ce`: the MAP-E CE daemon (SPEC §6).
//!
//! The eBPF programs (`ce_out` on the LAN, `ce_in` on the WAN) translate and tunnel every
//! packet of a mapped flow. This module is the rest: the flow table and its mirror in the
//! maps, the slow path on the TUN (first packets, packets too big for the tunnel, ICMP errors
//! from the internet), expiry of idle mappings, and the management commands (`nat`,
//! `forward`, `stats`, `status`).
use std::{
    net::{IpAddr, Ipv6Addr},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow};
use aya::Ebpf;
use ipnet::Ipv4Net;
use serde_json::json;
use tracing::{debug, info, warn};
use tun::AsyncDevice;
use tunnel_common::{
    fastpath::{DEFAULT_HOP_LIMIT, TCP_IPV4_OVERHEAD, TunnelConfig},
    mape::{NAT_FIN_RST, NAT_SEEN, NatIn, NatOut},
    names::{PROG_CE_IN, PROG_CE_OUT},
};

use super::{
    ForwardSpec, calc, parse_protos,
    rule::Mapping,
    table::{Entry, Kind, TCP, Table, UDP, proto_name},
    translate::{self, Outbound},
};
use crate::{
    cli::{MapeCeArgs, NatTimeouts},
    counters,
    dataplane::{
        self,
        bpffs::PinGuard,
        fastpath::{Maps, v4_key},
        nat::NatMaps,
        tc::{self, Direction},
    },
    instance::Instance,
    mgmt::{self, Handler, Request, Response},
    netlink::Netlink,
    packet,
    softwire::{Sent, Softwire},
    tundev,
};

counters! {
    pub struct CeStats {
        slowpath_out_packets,
        slowpath_in_icmp_errors,
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
    }
}

/// Monotonic clock in ns, the clock of `bpf_ktime_get_ns`.
fn mono_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

struct Ce {
    mapping: Mapping,
    br: Ipv6Addr,
    inner_mtu: u16,
    mss: u16,
    timeouts: NatTimeouts,
    table: Mutex<Table>,
    maps: Mutex<NatMaps>,
    ebpf: Mutex<Ebpf>,
    stats: CeStats,
    tun: Arc<AsyncDevice>,
    softwire: Softwire,
    started: Instant,
    instance: Instance,
    wan: String,
    lan: String,
    tun_name: String,
    /// Last time an exhaustion was logged (they are counted always, logged once a second).
    exhaustion_logged: Mutex<Option<Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Ce {
    /// Puts a new mapping into the maps; on failure takes it out of the table again.
    fn install(&self, entry: &Entry) -> Result<()> {
        let (out, inb) = map_values(entry);
        let r = lock(&self.maps).insert(entry.out_key, out, entry.in_key, inb);
        if r.is_err() {
            lock(&self.table).remove(&entry.out_key);
        }
        r
    }

    fn uninstall(&self, entry: &Entry) {
        if let Err(e) = lock(&self.maps).remove(&entry.out_key, &entry.in_key) {
            warn!("removing mapping {}: {e:#}", describe(entry));
        }
    }

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

    fn add_forward(&self, spec: &ForwardSpec) -> Result<Vec<Entry>> {
        let mut added = Vec::new();
        for &proto in &spec.protos {
            let entry = lock(&self.table).add_forward(spec.ext_port, spec.lan, proto);
            match entry {
                Ok(e) => {
                    if let Err(err) = self.install(&e) {
                        for a in &added {
                            self.remove_forward(spec.ext_port, a);
                        }
                        return Err(err);
                    }
                    added.push(e);
                }
                Err(err) => {
                    for a in &added {
                        self.remove_forward(spec.ext_port, a);
                    }
                    return Err(anyhow!("{err}"));
                }
            }
        }
        Ok(added)
    }

    fn remove_forward(&self, port: u16, entry: &Entry) {
        if let Ok(e) = lock(&self.table).remove_forward(port, entry.proto()) {
            self.uninstall(&e);
        }
    }

    fn nat_list(&self) -> serde_json::Value {
        let now = mono_ns();
        let table = lock(&self.table);
        let maps = lock(&self.maps);
        let mut rows: Vec<(u8, u16, serde_json::Value)> = table
            .entries()
            .map(|e| {
                let a = maps.activity(&e.out_key, &e.in_key);
                let last = a.last_seen_ns.max(e.created_ns);
                let idle_ms = if e.kind == Kind::Forward {
                    0
                } else {
                    now.saturating_sub(last) / 1_000_000
                };
                (
                    e.proto(),
                    e.ext_port,
                    json!({
                        "proto": proto_name(e.proto()),
                        "lan": e.lan().to_string(),
                        "external_port": e.ext_port,
                        "remote": e.remote().map_or("*".to_owned(), |r| r.to_string()),
                        "kind": e.kind,
                        "idle_ms": idle_ms,
                    }),
                )
            })
            .collect();
        rows.sort_by_key(|(p, port, _)| (*p, *port));
        json!(rows.into_iter().map(|(_, _, v)| v).collect::<Vec<_>>())
    }
}

fn map_values(entry: &Entry) -> (NatOut, NatIn) {
    (
        NatOut {
            ext_port: entry.ext_port,
            ..Default::default()
        },
        NatIn {
            lan_ip: entry.out_key.local_ip,
            lan_port: entry.out_key.local_port,
            ..Default::default()
        },
    )
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
                let (out, inb) = lock(&self.maps).counts();
                let m = &self.mapping;
                Response::Ok(json!({
                    "role": "mape-ce",
                    "instance": self.instance.name(),
                    "pid": std::process::id(),
                    "uptime_s": self.started.elapsed().as_secs(),
                    "wan": self.wan,
                    "lan": self.lan,
                    "tun": self.tun_name,
                    "ipv4": m.ipv4.to_string(),
                    "psid": m.psid,
                    "psid_len": m.psid_len,
                    "psid_offset": m.psid_offset,
                    "port_count": m.port_count,
                    "ce_ipv6": m.ce_ipv6.to_string(),
                    "br": self.br.to_string(),
                    "inner_mtu": self.inner_mtu,
                    "mappings": lock(&self.table).len(),
                    "map_entries_out": out,
                    "map_entries_in": inb,
                }))
            }
            Request::Stats => mgmt::counters_response(self.stats.snapshot(), {
                let ebpf = lock(&self.ebpf);
                Some(dataplane::stats::read(&ebpf))
            }),
            Request::Nat => Response::Ok(self.nat_list()),
            Request::ForwardList => {
                let table = lock(&self.table);
                let mut rows: Vec<_> = table
                    .entries()
                    .filter(|e| e.kind == Kind::Forward)
                    .map(|e| {
                        json!({
                            "external_port": e.ext_port,
                            "proto": proto_name(e.proto()),
                            "lan": e.lan().to_string(),
                        })
                    })
                    .collect();
                rows.sort_by_key(|v| (v["external_port"].as_u64(), v["proto"].to_string()));
                Response::Ok(json!(rows))
            }
            Request::ForwardAdd { spec } => match spec
                .parse::<ForwardSpec>()
                .map_err(|e| anyhow!(e))
                .and_then(|s| self.add_forward(&s))
            {
                Ok(added) => {
                    for e in &added {
                        info!("forward added: {}", describe(e));
                    }
                    Response::Ok(json!(added.iter().map(describe).collect::<Vec<_>>()))
                }
                Err(e) => Response::Error(format!("{e:#}")),
            },
            Request::ForwardDel { port } => {
                let (num, protos) = match port.split_once('/') {
                    Some((n, p)) => (n, parse_protos(p)),
                    None => (port.as_str(), Some(vec![TCP, UDP])),
                };
                let (Ok(num), Some(protos)) = (num.trim().parse::<u16>(), protos) else {
                    return Response::Error(format!(
                        "bad forward {port:?}: write EXTPORT or EXTPORT/tcp or EXTPORT/udp"
                    ));
                };
                let mut removed = Vec::new();
                for proto in protos {
                    if let Ok(e) = lock(&self.table).remove_forward(num, proto) {
                        self.uninstall(&e);
                        info!("forward removed: {}", describe(&e));
                        removed.push(describe(&e));
                    }
                }
                if removed.is_empty() {
                    Response::Error(format!("no forward on external port {port}"))
                } else {
                    Response::Ok(json!(removed))
                }
            }
            other => mgmt::not_supported("MAP-E CE", &other),
        }
    }
}

pub async fn run(args: MapeCeArgs) -> Result<()> {
    let instance = args.instance.instance.clone();
    mgmt::ensure_not_running(&instance)?;
    let mapping = calc(&args.rule.query())?;
    let br = mapping.br.ok_or_else(|| {
        anyhow!("the rule names no BR: pass --br IPV6 (profiles carry their own)")
    })?;
    let nl = Netlink::connect()?;
    let wan_index = nl
        .index(&args.wan)
        .await
        .with_context(|| format!("--wan {}", args.wan))?;
    nl.index(&args.lan)
        .await
        .with_context(|| format!("--lan {}", args.lan))?;
    let inner_mtu = nl
        .inner_mtu(wan_index, &format!("--wan {}", args.wan))
        .await?;
    let mss = inner_mtu - TCP_IPV4_OVERHEAD;

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

    let pin_dir = instance.pin_dir();
    let mut ebpf = dataplane::load(&pin_dir)?;
    let _pins = PinGuard(Some(pin_dir.clone()));
    let mut config = Maps::take(&mut ebpf)?;
    let mut maps = NatMaps::take(&mut ebpf)?;
    let stale = maps.clear()?;
    if stale > 0 {
        info!("cleared {stale} NAPT map entries pinned by an earlier run");
    }
    config.set_config(&TunnelConfig {
        local: mapping.ce_ipv6.octets(),
        remote: br.octets(),
        ipv4: v4_key(mapping.ipv4),
        v6_ifindex: wan_index,
        tun_ifindex: tun_index,
        inner_mtu,
        mss,
        hop_limit: DEFAULT_HOP_LIMIT,
        enabled: 1,
        ..Default::default()
    })?;
    tc::attach_pinned(
        &mut ebpf,
        PROG_CE_OUT,
        &args.lan,
        Direction::Ingress,
        &pin_dir,
    )?;
    tc::attach_pinned(
        &mut ebpf,
        PROG_CE_IN,
        &args.wan,
        Direction::Ingress,
        &pin_dir,
    )?;
    let softwire = Softwire::open(mapping.ce_ipv6)?;

    let ce = Arc::new(Ce {
        table: Mutex::new(Table::new(&mapping.port_ranges, args.udp_eim)),
        mapping,
        br,
        inner_mtu,
        mss,
        timeouts: args.timeouts.clone(),
        maps: Mutex::new(maps),
        ebpf: Mutex::new(ebpf),
        stats: CeStats::default(),
        tun,
        softwire,
        started: Instant::now(),
        instance: instance.clone(),
        wan: args.wan.clone(),
        lan: args.lan.clone(),
        tun_name: args.tun.clone(),
        exhaustion_logged: Mutex::new(None),
    });
    for spec in &args.forward {
        ce.add_forward(spec)
            .with_context(|| format!("--forward {}", spec.ext_port))?;
    }
    crate::metrics::spawn(args.metrics, ce.clone()).await?;
    let mgmt = mgmt::bind(&instance)?;
    let m = &ce.mapping;
    info!(
        "MAP-E CE: {} with PSID {} ({} ports in {} blocks), CE {} → BR {}, WAN {} (inner MTU {inner_mtu}), LAN {}",
        m.ipv4,
        m.psid,
        m.port_count,
        m.port_ranges.len(),
        m.ce_ipv6,
        br,
        args.wan,
        args.lan
    );
    tokio::select! {
        () = tun_reader(ce.clone()) => {}
        () = expire(ce.clone()) => {}
        () = mgmt.serve(ce.clone()) => {}
        signal = crate::shutdown_signal() => info!("{signal}: stopping"),
    }
    Ok(())
}

async fn tun_reader(ce: Arc<Ce>) {
    let mut buf = vec![0u8; 65536];
    loop {
        let n = crate::tundev::recv(&ce.tun, &mut buf).await;
        slow_path(&ce, &mut buf[..n]).await;
    }
}

async fn slow_path(ce: &Ce, pkt: &mut [u8]) {
    let stats = &ce.stats;
    let Some(IpAddr::V4(dst)) = packet::destination(pkt) else {
        stats.drop_tun_not_ipv4.inc();
        return;
    };
    if dst == ce.mapping.ipv4 {
        // Redirected by ce_in: an ICMP error about one of our flows.
        let ok = {
            let table = lock(&ce.table);
            translate::translate_icmp_error_in(pkt, |proto, port, remote| {
                table.inbound(proto, port, remote).map(Entry::lan)
            })
        };
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
        Outbound::IcmpError => return stats.drop_outbound_icmp_error.inc(),
        Outbound::Unsupported => return stats.drop_unsupported_protocol.inc(),
        Outbound::Malformed => return stats.drop_malformed_packet.inc(),
    };
    let found = lock(&ce.table).lookup_or_create(&flow, mono_ns());
    let entry = match found {
        Ok((entry, new)) => {
            if new {
                if let Err(e) = ce.install(&entry) {
                    stats.drop_map_full.inc();
                    warn!("cannot install mapping {}: {e:#}", describe(&entry));
                    return;
                }
                stats.mappings_created.inc();
                debug!("new mapping {}", describe(&entry));
            }
            entry
        }
        Err(e) => {
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
    translate::translate_out(pkt, ce.mapping.ipv4, entry.ext_port, ce.mss);
    // DF packets that are too big were answered above; the rest fits or is fragmented.
    match ce
        .softwire
        .send_fitted(ce.br, pkt, ce.inner_mtu, *flow.remote.ip())
    {
        Sent::Whole => stats.slowpath_out_packets.inc(),
        Sent::Fragmented => stats.slowpath_fragmented.inc(),
        Sent::TooBig(_) | Sent::Unfragmentable => stats.drop_unfragmentable.inc(),
        Sent::Failed => stats.drop_send_error.inc(),
    }
}

/// Removes mappings idle for longer than their timeout, from the maps first.
async fn expire(ce: Arc<Ce>) {
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
        let now = mono_ns();
        let candidates: Vec<Entry> = lock(&ce.table)
            .entries()
            .filter(|e| e.kind != Kind::Forward)
            .cloned()
            .collect();
        let mut expired = Vec::new();
        {
            let maps = lock(&ce.maps);
            for e in candidates {
                let a = maps.activity(&e.out_key, &e.in_key);
                let idle = now.saturating_sub(a.last_seen_ns.max(e.created_ns));
                if idle > ce.timeout(&e, a.flags, a.in_flags).as_nanos() as u64 {
                    expired.push(e);
                }
            }
        }
        for e in expired {
            let mut table = lock(&ce.table);
            ce.uninstall(&e);
            table.remove(&e.out_key);
            ce.stats.mappings_expired.inc();
            debug!("mapping expired: {}", describe(&e));
        }
    }
}
