//! The MAP-E BR's data plane (SPEC §6): loads the object, writes the rules and the tunnel
//! configuration, attaches `br_decap` (IPv6 side, with `--xdp` also `br_decap_xdp` there) and
//! `br_encap` (IPv4 side). The only code that writes the BR's maps.
use std::{path::Path, sync::Mutex};

use anyhow::Result;
use aya::Ebpf;
use ipnet::Ipv4Net;
use tunnel_common::{
    fastpath::TunnelConfig,
    mape::MapRule,
    names::{PROG_BR_DECAP, PROG_BR_DECAP_XDP, PROG_BR_ENCAP},
};

use super::{
    fastpath::{Maps, v4_key},
    nat::BrRules,
    nexthop::{self, NextHopTask},
    stats::{self, Counters},
    tc,
};

/// Where the BR's programs go.
pub struct BrDevices<'a> {
    pub v6_dev: &'a str,
    pub v4_dev: &'a str,
    /// `--xdp`: the plain case decapsulated in XDP on `v6_dev` too.
    pub xdp: bool,
}

pub struct BrDataplane {
    ebpf: Mutex<Ebpf>,
    rules: Mutex<BrRules>,
    nexthops: NextHopTask,
}

impl BrDataplane {
    /// Loads (re-adopting pins in `pin_dir`), writes exactly `rules` and `config`, attaches.
    pub fn start(
        pin_dir: &Path,
        rules: &[(Ipv4Net, MapRule)],
        config: &TunnelConfig,
        devices: BrDevices<'_>,
    ) -> Result<BrDataplane> {
        let mut ebpf = super::load_without(pin_dir, &[super::SERVER_MAPS, super::NAT_MAPS])?;
        let mut maps = Maps::take(&mut ebpf)?;
        let mut table = BrRules::take(&mut ebpf)?;
        replace(&mut table, rules)?;
        maps.set_config(config)?;
        tc::attach_ingress_exactly(
            &mut ebpf,
            &[
                (PROG_BR_DECAP, devices.v6_dev),
                (PROG_BR_ENCAP, devices.v4_dev),
            ],
            devices.xdp.then_some((PROG_BR_DECAP_XDP, devices.v6_dev)),
            pin_dir,
        )?;
        let nexthops = nexthop::start(&mut ebpf, pin_dir)?;
        Ok(BrDataplane {
            ebpf: Mutex::new(ebpf),
            rules: Mutex::new(table),
            nexthops,
        })
    }

    /// Makes the rules map hold exactly `rules` (a reload).
    pub fn set_rules(&self, rules: &[(Ipv4Net, MapRule)]) -> Result<()> {
        replace(
            &mut self.rules.lock().unwrap_or_else(|p| p.into_inner()),
            rules,
        )
    }

    /// The programs' counters.
    pub fn counters(&self) -> Result<Counters> {
        let ebpf = self.ebpf.lock().unwrap_or_else(|p| p.into_inner());
        Ok(self.nexthops.with_counters(stats::read(&ebpf)?))
    }
}

fn replace(table: &mut BrRules, rules: &[(Ipv4Net, MapRule)]) -> Result<()> {
    let entries: Vec<_> = rules
        .iter()
        .map(|(net, rule)| (v4_key(net.network()), net.prefix_len(), *rule))
        .collect();
    table.replace_all(&entries)
}
