//! The MAP-E CE's data plane (SPEC §6): loads the object, writes the tunnel configuration,
//! attaches `ce_out` (LAN) and `ce_in` (WAN), and keeps the NAPT flow table
//! ([`crate::mape::table`], which decides ports) and its mirror in the maps consistent: every
//! change to one goes through here, under one lock, so a mapping is in both or in neither.
use std::{net::SocketAddrV4, path::Path, sync::Mutex, time::Duration};

use anyhow::{Result, anyhow};
use aya::Ebpf;
use tunnel_common::{
    fastpath::TunnelConfig,
    mape::{NatIn, NatOut},
    names::{PROG_CE_IN, PROG_CE_OUT, PROG_LWB4_OUT},
};

use super::{
    fastpath::Maps,
    nat::{Activity, NatMaps},
    stats::{self, Counters},
    tc::{self, Direction},
};
use crate::mape::{
    ForwardSpec,
    table::{Entry, Flow, Kind, Table, TableError},
};

/// Where the NAPT's programs go.
pub enum CeDevices<'a> {
    /// MAP-E CE: `ce_out` on the LAN's ingress, `ce_in` on the WAN's.
    Ce { lan: &'a str, wan: &'a str },
    /// lwB4 (a native client on a shared lease): `lwb4_out` on the IPv6 interface's egress,
    /// `ce_in` on its ingress.
    Lwb4 { v6: &'a str },
}

impl CeDevices<'_> {
    /// (program, interface, direction) of each attachment.
    pub fn attachments(&self) -> [(&'static str, &str, Direction); 2] {
        match *self {
            CeDevices::Ce { lan, wan } => [
                (PROG_CE_OUT, lan, Direction::Ingress),
                (PROG_CE_IN, wan, Direction::Ingress),
            ],
            CeDevices::Lwb4 { v6 } => [
                (PROG_LWB4_OUT, v6, Direction::Egress),
                (PROG_CE_IN, v6, Direction::Ingress),
            ],
        }
    }
}

/// The mapping a new outbound flow got.
pub enum FlowMapping {
    Existing(Entry),
    /// Made now, in the table and the maps.
    Created(Entry),
    /// The maps refused it (full): it is in neither.
    MapFull(Entry, anyhow::Error),
    /// No free port toward that remote.
    Exhausted(TableError),
}

struct Nat {
    table: Table,
    maps: NatMaps,
}

impl Nat {
    /// Puts a table entry into the maps; on failure takes it out of the table again.
    fn install(&mut self, entry: &Entry) -> Result<()> {
        let (out, inb) = map_values(entry);
        let r = self.maps.insert(entry.out_key, out, entry.in_key, inb);
        if r.is_err() {
            self.table.remove(&entry.out_key);
        }
        r
    }

    /// Takes an entry out of the maps, then the table.
    fn remove(&mut self, entry: &Entry) -> Result<()> {
        let r = self.maps.remove(&entry.out_key, &entry.in_key);
        self.table.remove(&entry.out_key);
        r
    }

    fn remove_forward(&mut self, port: u16, proto: u8) -> Option<Entry> {
        let e = self.table.remove_forward(port, proto).ok()?;
        if let Err(err) = self.maps.remove(&e.out_key, &e.in_key) {
            tracing::warn!("removing forward {port}: {err:#}");
        }
        Some(e)
    }
}

/// A mapping as the state file keeps it: its outbound key, external port and kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Saved {
    pub out_key: tunnel_common::mape::NatKey,
    pub ext_port: u16,
    pub kind: Kind,
}

/// What [`CeDataplane::start`] took back from an earlier run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Adopted {
    /// Mappings found in the pinned maps and kept.
    pub pinned: usize,
    /// Mappings re-created from the state file (nothing was pinned).
    pub saved: usize,
    /// Map entries removed: outside the port set now, half of a mapping, or conflicting.
    pub removed: usize,
}

/// The table and the maps agree afterwards: every pinned mapping the table can take is
/// kept (with its activity), the rest removed; with nothing pinned, `saved` is installed.
fn adopt(table: &mut Table, nat: &mut NatMaps, saved: &[Saved], now_ns: u64) -> Result<Adopted> {
    let mut a = Adopted::default();
    let pinned = nat.pinned();
    let kind_of = |k: &tunnel_common::mape::NatKey| {
        saved
            .iter()
            .find(|s| s.out_key == *k)
            .map_or(Kind::Dynamic, |s| s.kind)
    };
    for (out_key, out, in_key, inb) in &pinned {
        let whole =
            inb.is_some_and(|i| (i.lan_ip, i.lan_port) == (out_key.local_ip, out_key.local_port));
        let kept = whole
            && table
                .adopt(*out_key, out.ext_port, kind_of(out_key), now_ns)
                .is_ok();
        if kept {
            a.pinned += 1;
        } else {
            nat.remove(out_key, in_key)?;
            a.removed += 1;
        }
    }
    let live: std::collections::HashSet<tunnel_common::mape::NatKey> =
        table.entries().map(|e| e.in_key).collect();
    a.removed += nat.retain_inbound(|k| live.contains(k))?;
    if pinned.is_empty() {
        for s in saved {
            if let Ok(e) = table.adopt(s.out_key, s.ext_port, s.kind, now_ns) {
                let (out, inb) = map_values(&e);
                if nat.insert(e.out_key, out, e.in_key, inb).is_ok() {
                    a.saved += 1;
                } else {
                    table.remove(&e.out_key);
                }
            }
        }
    }
    Ok(a)
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

pub struct CeDataplane {
    ebpf: Mutex<Ebpf>,
    nat: Mutex<Nat>,
    nexthops: super::nexthop::NextHopTask,
}

impl CeDataplane {
    /// Loads (re-adopting pins in `pin_dir`), takes back the NAPT mappings an earlier run
    /// left in the pinned maps (so that a CE killed and started again keeps its flows: the
    /// programs went on translating meanwhile) or, with none pinned, those `saved` lists
    /// (a clean restart), writes `config`, attaches. `saved` also gives the kind of each
    /// pinned mapping (a forward or an endpoint-independent one look alike in the maps).
    pub fn start(
        pin_dir: &Path,
        config: &TunnelConfig,
        mut table: Table,
        devices: CeDevices<'_>,
        saved: &[Saved],
        now_ns: u64,
    ) -> Result<(CeDataplane, Adopted)> {
        let mut ebpf = super::load_without(pin_dir, &[super::SERVER_MAPS])?;
        let mut maps = Maps::take(&mut ebpf)?;
        let mut nat = NatMaps::take(&mut ebpf)?;
        let adopted = adopt(&mut table, &mut nat, saved, now_ns)?;
        maps.set_config(config)?;
        for (program, dev, direction) in devices.attachments() {
            tc::attach_pinned(&mut ebpf, program, dev, direction, pin_dir)?;
        }
        let nexthops = super::nexthop::start(&mut ebpf, pin_dir)?;
        let dp = CeDataplane {
            ebpf: Mutex::new(ebpf),
            nat: Mutex::new(Nat { table, maps: nat }),
            nexthops,
        };
        Ok((dp, adopted))
    }

    fn nat(&self) -> std::sync::MutexGuard<'_, Nat> {
        self.nat.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The mapping of an outbound flow the programs did not know, made if needed.
    pub fn map_flow(&self, flow: &Flow, now_ns: u64) -> FlowMapping {
        let mut nat = self.nat();
        match nat.table.lookup_or_create(flow, now_ns) {
            Ok((entry, false)) => FlowMapping::Existing(entry),
            Ok((entry, true)) => match nat.install(&entry) {
                Ok(()) => FlowMapping::Created(entry),
                Err(e) => FlowMapping::MapFull(entry, e),
            },
            Err(e) => FlowMapping::Exhausted(e),
        }
    }

    /// Reads the flow table (lookups for the slow path).
    pub fn with_table<R>(&self, f: impl FnOnce(&Table) -> R) -> R {
        f(&self.nat().table)
    }

    /// Adds a port forward for each of its protocols, all or none.
    pub fn add_forward(&self, spec: &ForwardSpec) -> Result<Vec<Entry>> {
        let mut nat = self.nat();
        let mut added: Vec<Entry> = Vec::new();
        for &proto in &spec.protos {
            let result = nat
                .table
                .add_forward(spec.ext_port, spec.lan, proto)
                .map_err(|e| anyhow!("{e}"))
                .and_then(|e| nat.install(&e).map(|()| e));
            match result {
                Ok(e) => added.push(e),
                Err(err) => {
                    for a in &added {
                        nat.remove_forward(spec.ext_port, a.proto());
                    }
                    return Err(err);
                }
            }
        }
        Ok(added)
    }

    /// Removes the forward of `port`/`proto`, if there is one.
    pub fn remove_forward(&self, port: u16, proto: u8) -> Option<Entry> {
        self.nat().remove_forward(port, proto)
    }

    /// Every mapping with what the programs recorded on it.
    pub fn mappings(&self) -> Vec<(Entry, Activity)> {
        let nat = self.nat();
        nat.table
            .entries()
            .map(|e| (e.clone(), nat.maps.activity(&e.out_key, &e.in_key)))
            .collect()
    }

    /// Removes the dynamic mappings idle (as of `now_ns`) for longer than `timeout` says,
    /// from the maps first; returns them.
    pub fn expire(
        &self,
        now_ns: u64,
        timeout: impl Fn(&Entry, &Activity) -> Duration,
    ) -> Vec<Entry> {
        let mut nat = self.nat();
        let expired: Vec<Entry> = nat
            .table
            .entries()
            .filter(|e| e.kind != Kind::Forward)
            .filter(|e| {
                let a = nat.maps.activity(&e.out_key, &e.in_key);
                let idle = now_ns.saturating_sub(a.last_seen_ns.max(e.created_ns));
                idle > timeout(e, &a).as_nanos() as u64
            })
            .cloned()
            .collect();
        for e in &expired {
            if let Err(err) = nat.remove(e) {
                tracing::warn!("removing an expired mapping: {err:#}");
            }
        }
        expired
    }

    /// Mappings in the table; entries in the maps (outbound, inbound).
    pub fn counts(&self) -> (usize, (usize, usize)) {
        let nat = self.nat();
        (nat.table.len(), nat.maps.counts())
    }

    /// The LAN endpoint of a forward or mapping, for the management commands.
    pub fn forwards(&self) -> Vec<(u16, u8, SocketAddrV4)> {
        self.nat()
            .table
            .entries()
            .filter(|e| e.kind == Kind::Forward)
            .map(|e| (e.ext_port, e.proto(), e.lan()))
            .collect()
    }

    /// The programs' counters.
    pub fn counters(&self) -> Result<Counters> {
        let ebpf = self.ebpf.lock().unwrap_or_else(|p| p.into_inner());
        Ok(self.nexthops.with_counters(stats::read(&ebpf)?))
    }
}
