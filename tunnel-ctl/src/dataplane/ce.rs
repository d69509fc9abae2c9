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
}

impl CeDataplane {
    /// Loads (re-adopting pins in `pin_dir`), empties the NAPT maps an earlier run left (their
    /// table is gone with it), writes `config`, attaches. Returns the handle and how many
    /// stale entries went.
    pub fn start(
        pin_dir: &Path,
        config: &TunnelConfig,
        table: Table,
        devices: CeDevices<'_>,
    ) -> Result<(CeDataplane, usize)> {
        let mut ebpf = super::load(pin_dir)?;
        let mut maps = Maps::take(&mut ebpf)?;
        let mut nat = NatMaps::take(&mut ebpf)?;
        let stale = nat.clear()?;
        maps.set_config(config)?;
        for (program, dev, direction) in devices.attachments() {
            tc::attach_pinned(&mut ebpf, program, dev, direction, pin_dir)?;
        }
        let dp = CeDataplane {
            ebpf: Mutex::new(ebpf),
            nat: Mutex::new(Nat { table, maps: nat }),
        };
        Ok((dp, stale))
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
        stats::read(&self.ebpf.lock().unwrap_or_else(|p| p.into_inner()))
    }
}
