//! `tunnel-ctl mape br`: the MAP-E BR daemon (SPEC §6). Stateless: it writes the rules into
//! `BR_RULES`, attaches `br_decap` (IPv6 side) and `br_encap` (IPv4 side), and handles on its
//! TUN the packets toward CEs that the programs leave to the kernel (too big for the tunnel:
//! fragments, or ICMP fragmentation-needed for DF packets).
use std::{
    net::{IpAddr, Ipv6Addr},
    sync::Arc,
    time::Instant,
};

use crate::tundev::Tun;
use anyhow::{Context as _, Result, bail};
use tracing::{info, warn};
use tunnel_common::fastpath::{DEFAULT_HOP_LIMIT, TCP_IPV4_OVERHEAD, TunnelConfig};

use crate::mape::rule::Rule;
use crate::{
    config::BrConfig,
    counters,
    dataplane::{
        bpffs::PinGuard,
        br::{BrDataplane, BrDevices},
    },
    instance::Instance,
    mgmt::{self, Handler, Request, Response, Status, api},
    netlink::Netlink,
    packet,
    server::reassembly::{Reassembly, Step, Step6},
    softwire::{Sent, Softwire},
    tundev,
};

counters! {
    pub struct BrStats {
        slowpath_packets,
        slowpath_icmp_frag_needed,
        slowpath_fragmented,
        drop_slowpath_no_rule,
        drop_slowpath_no_port,
        drop_unfragmentable,
        drop_send_error,
        drop_tun_write_error,
        fragments_reassembled,
        outer_fragments_reassembled,
        slowpath_decap_packets,
        drop_slowpath_source_mismatch,
        drop_reassembly_full,
        drop_reassembly_bad,
        drop_reassembly_timeout,
    }
}

struct Br {
    /// The rules in force (a reload replaces them).
    rules: std::sync::RwLock<Vec<Rule>>,
    /// The configuration running now (reloads compare with it and take turns on it).
    running: tokio::sync::Mutex<BrConfig>,
    nl: Netlink,
    tun_index: u32,
    br_addr: Ipv6Addr,
    inner_mtu: u16,
    stats: BrStats,
    dataplane: BrDataplane,
    tun: Arc<Tun>,
    softwire: Softwire,
    instance: Instance,
    started: Instant,
    v6_dev: String,
    v4_dev: String,
}

impl Handler for Br {
    fn handle(&self, request: Request) -> Response {
        match request {
            Request::Status => Status::Br(api::BrStatus {
                process: api::Process::now(&self.instance, self.started),
                br_addr: self.br_addr,
                v6_dev: self.v6_dev.clone(),
                v4_dev: self.v4_dev.clone(),
                inner_mtu: self.inner_mtu,
                rules: self
                    .rules()
                    .iter()
                    .map(|r| api::BrRuleRow {
                        ipv6: r.ipv6.to_string(),
                        ipv4: r.ipv4.to_string(),
                        ea_len: r.ea_len,
                        psid_offset: r.psid_offset,
                    })
                    .collect(),
            })
            .into(),
            Request::Stats => {
                mgmt::counters_response(self.stats.snapshot(), Some(self.dataplane.counters()))
            }
            other => mgmt::not_supported("MAP-E BR", &other),
        }
    }
}

/// The rules of `args`; two that map one IPv4 prefix are an error.
fn rules_of(args: &BrConfig) -> Result<Vec<Rule>> {
    let rules: Vec<Rule> = args
        .rule
        .iter()
        .map(|spec| spec.rule(args.interface_id))
        .collect();
    for (i, a) in rules.iter().enumerate() {
        if rules[i + 1..].iter().any(|b| b.ipv4 == a.ipv4) {
            bail!("two --rule options map the same IPv4 prefix {}", a.ipv4);
        }
    }
    Ok(rules)
}

impl Br {
    fn rules(&self) -> std::sync::RwLockReadGuard<'_, Vec<Rule>> {
        self.rules.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Reload: the rules are replaced in place (map and routes to the TUN); the rest only
    /// changes with a restart and is reported so.
    async fn reload(&self, new: BrConfig) -> Result<Vec<String>, String> {
        let mut running = self.running.lock().await;
        let rules = rules_of(&new).map_err(|e| format!("{e:#}"))?;
        let mut changes: Vec<String> = super::restart_only(&[
            ("v6-dev", &running.v6_dev, &new.v6_dev),
            ("v4-dev", &running.v4_dev, &new.v4_dev),
            ("br-addr", &running.br_addr, &new.br_addr),
            ("tun", &running.tun, &new.tun),
            ("xdp", &running.xdp, &new.xdp),
            ("metrics", &running.metrics, &new.metrics),
        ]);
        let old: Vec<Rule> = self.rules().clone();
        let describe = |r: &Rule| {
            format!(
                "{} ↔ {} (EA {}, PSID offset {})",
                r.ipv6, r.ipv4, r.ea_len, r.psid_offset
            )
        };
        let old_lines: Vec<String> = old.iter().map(describe).collect();
        let new_lines: Vec<String> = rules.iter().map(describe).collect();
        if old_lines != new_lines {
            let map_rules: Vec<_> = rules.iter().map(|r| (r.ipv4, r.to_map_rule())).collect();
            self.dataplane
                .set_rules(&map_rules)
                .map_err(|e| format!("{e:#}"))?;
            for r in rules
                .iter()
                .filter(|r| !old.iter().any(|o| o.ipv4 == r.ipv4))
            {
                if let Err(e) = self.nl.route(r.ipv4, self.tun_index).await {
                    warn!("reload: route {} to the TUN: {e:#}", r.ipv4);
                }
            }
            for o in old
                .iter()
                .filter(|o| !rules.iter().any(|r| r.ipv4 == o.ipv4))
            {
                if let Err(e) = self.nl.del_route(o.ipv4, self.tun_index).await {
                    warn!("reload: removing route {}: {e:#}", o.ipv4);
                }
            }
            changes.extend(
                old_lines
                    .iter()
                    .filter(|l| !new_lines.contains(l))
                    .map(|l| format!("rule removed: {l}")),
            );
            changes.extend(
                new_lines
                    .iter()
                    .filter(|l| !old_lines.contains(l))
                    .map(|l| format!("rule added: {l}")),
            );
            *self.rules.write().unwrap_or_else(|p| p.into_inner()) = rules;
        }
        running.rule = new.rule;
        running.interface_id = new.interface_id;
        if changes.is_empty() {
            changes.push("nothing changed".into());
        }
        for c in &changes {
            info!("reload: {c}");
        }
        Ok(changes)
    }
}

/// Runs the BR with `args`; `source` re-reads the configuration for a reload.
pub async fn run(args: BrConfig, source: super::Source<BrConfig>) -> Result<()> {
    let instance = args.instance.clone();
    super::claim(&instance)?;
    let rules = rules_of(&args)?;
    let nl = Netlink::connect()?;
    let v6_index = nl
        .index(&args.v6_dev)
        .await
        .with_context(|| format!("--v6-dev {}", args.v6_dev))?;
    nl.index(&args.v4_dev)
        .await
        .with_context(|| format!("--v4-dev {}", args.v4_dev))?;
    let inner_mtu = nl
        .inner_mtu(v6_index, &format!("--v6-dev {}", args.v6_dev))
        .await?;

    let tun = tundev::create(&args.tun)?;
    let tun_index = nl.index(&args.tun).await?;
    nl.up(tun_index, tundev::TUN_MTU).await?;
    for r in &rules {
        nl.route(r.ipv4, tun_index).await?;
    }
    tundev::ensure_ipv4_forwarding("CEs' traffic is routed through this host")?;

    let pin_dir = instance.pin_dir();
    let _pins = PinGuard(Some(pin_dir.clone()));
    let map_rules: Vec<_> = rules.iter().map(|r| (r.ipv4, r.to_map_rule())).collect();
    let dataplane = BrDataplane::start(
        &pin_dir,
        &map_rules,
        &TunnelConfig {
            local: args.br_addr.octets(),
            v6_ifindex: v6_index,
            tun_ifindex: tun_index,
            inner_mtu,
            mss: inner_mtu - TCP_IPV4_OVERHEAD,
            hop_limit: DEFAULT_HOP_LIMIT,
            enabled: 1,
            ..Default::default()
        },
        BrDevices {
            v6_dev: &args.v6_dev,
            v4_dev: &args.v4_dev,
            xdp: args.xdp,
        },
    )?;
    let softwire = Softwire::open(args.br_addr)?;

    let br = Arc::new(Br {
        rules: std::sync::RwLock::new(rules),
        running: tokio::sync::Mutex::new(args.clone()),
        nl: nl.clone(),
        tun_index,
        br_addr: args.br_addr,
        inner_mtu,
        stats: BrStats::default(),
        dataplane,
        tun,
        softwire,
        instance: instance.clone(),
        started: Instant::now(),
        v6_dev: args.v6_dev.clone(),
        v4_dev: args.v4_dev.clone(),
    });
    let reload = super::reloader(source, br.clone(), |br, cfg| {
        Box::pin(async move { br.reload(cfg?).await })
    });
    let daemon = super::Daemon::start(&instance, br.clone(), args.metrics)
        .await?
        .with_reload(reload);
    for r in br.rules().iter() {
        info!(
            "MAP-E BR {}: rule {} ↔ {} (EA {}, PSID offset {})",
            args.br_addr, r.ipv6, r.ipv4, r.ea_len, r.psid_offset
        );
    }
    daemon.run(tun_reader(br.clone()), "stopping").await;
    Ok(())
}

async fn tun_reader(br: Arc<Br>) {
    let mut buf = vec![0u8; 65536];
    let stats = &br.stats;
    // Fragments toward a CE: only the first names the port that picks the CE (RFC 7597
    // §8.3.2), so they are put back together first (bounded, timed out).
    let mut reassembly = Reassembly::default();
    loop {
        let n = crate::tundev::recv(&br.tun, &mut buf).await;
        if buf[..n].first().is_some_and(|b| b >> 4 == 6) {
            // An outer IPv6 fragment from a CE (br_decap handed it over).
            let mut expired = 0;
            let step = reassembly.push6(&buf[..n], std::time::Instant::now(), &mut expired);
            stats.drop_reassembly_timeout.add(expired as u64);
            match step {
                Step6::Done {
                    src,
                    next: 4,
                    payload,
                } => {
                    stats.outer_fragments_reassembled.inc();
                    from_ce(&br, src, payload).await;
                }
                Step6::Done { .. } | Step6::Bad => stats.drop_reassembly_bad.inc(),
                Step6::Full => stats.drop_reassembly_full.inc(),
                Step6::Kept => {}
            }
            continue;
        }
        let whole;
        let pkt = if packet::is_fragment(&buf[..n]) {
            let mut expired = 0;
            let step = reassembly.push(&buf[..n], std::time::Instant::now(), &mut expired);
            stats.drop_reassembly_timeout.add(expired as u64);
            match step {
                Step::Done(p) => {
                    stats.fragments_reassembled.inc();
                    whole = p;
                    &whole[..]
                }
                Step::Whole => &buf[..n],
                Step::Kept => continue,
                Step::Full => {
                    stats.drop_reassembly_full.inc();
                    continue;
                }
                Step::Bad => {
                    stats.drop_reassembly_bad.inc();
                    continue;
                }
            }
        } else {
            &buf[..n]
        };
        let Some(IpAddr::V4(dst)) = packet::destination(pkt) else {
            continue;
        };
        let rule = br
            .rules()
            .iter()
            .filter(|r| r.ipv4.contains(&dst))
            .max_by_key(|r| r.ipv4.prefix_len())
            .cloned();
        let Some(rule) = rule else {
            stats.drop_slowpath_no_rule.inc();
            continue;
        };
        let mr = rule.to_map_rule();
        let Some(psid) = packet::port_toward(pkt).and_then(|p| mr.psid_of(p)) else {
            stats.drop_slowpath_no_port.inc();
            continue;
        };
        let ce = Ipv6Addr::from(mr.ce_address(u32::from(dst), psid));
        // ICMP errors come "from" the destination, like a router on its last hop.
        // Too big without DF: outer IPv6 fragments (the CE reassembles them).
        match br
            .softwire
            .send_outer_fragmented(ce, pkt, br.inner_mtu, dst)
        {
            Sent::Whole => stats.slowpath_packets.inc(),
            Sent::Fragmented => stats.slowpath_fragmented.inc(),
            Sent::TooBig(icmp) => match br.tun.send(&icmp).await {
                Ok(_) => stats.slowpath_icmp_frag_needed.inc(),
                Err(_) => stats.drop_tun_write_error.inc(),
            },
            Sent::Unfragmentable => stats.drop_unfragmentable.inc(),
            Sent::Failed => stats.drop_send_error.inc(),
        }
    }
}

/// A CE's IPv4 packet that came in outer fragments, reassembled: accepted only from the CE
/// address the rule gives for its source address and port (as `br_decap` checks), then
/// written to the TUN for the kernel to forward.
async fn from_ce(br: &Br, ce: Ipv6Addr, inner: Vec<u8>) {
    let stats = &br.stats;
    let Some(IpAddr::V4(src)) = packet::source(&inner) else {
        return stats.drop_slowpath_source_mismatch.inc();
    };
    let rule = br
        .rules()
        .iter()
        .filter(|r| r.ipv4.contains(&src))
        .max_by_key(|r| r.ipv4.prefix_len())
        .cloned();
    let expected = rule.and_then(|r| {
        let mr = r.to_map_rule();
        packet::port_from(&inner)
            .and_then(|p| mr.psid_of(p))
            .map(|psid| Ipv6Addr::from(mr.ce_address(u32::from(src), psid)))
    });
    if expected != Some(ce) {
        return stats.drop_slowpath_source_mismatch.inc();
    }
    // The kernel forwards it from the TUN (and decrements the TTL).
    match br.tun.send(&inner).await {
        Ok(_) => stats.slowpath_decap_packets.inc(),
        Err(_) => stats.drop_tun_write_error.inc(),
    }
}
