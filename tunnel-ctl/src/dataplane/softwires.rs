//! The lwAFTR's softwire maps (`SOFTWIRES`, `SHARED_ADDRS`, `B4_ADDRS`, `AFTR_ADDRS`): the one
//! writer of them. It keeps the table in force (`server::softwires`, which decides what a
//! table may hold) and mirrors each change into the maps, entry by entry, so that softwires a
//! change does not touch never miss a packet.
//!
//! Order of writes: an address's split, its B4 and its AFTR address go in before the softwire
//! that needs them and come out after the last one that did, so the programs never see a
//! softwire without them.
use std::{
    collections::HashMap as StdHashMap,
    net::{Ipv4Addr, Ipv6Addr},
};

use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    maps::{HashMap, MapData, MapError},
};
use tunnel_common::{
    fastpath::{B4Key, Ipv4Key, Ipv6Key, SharedAddr, SoftwireEntry, SoftwireKey, v4_key},
    names::{AFTR_ADDRS, B4_ADDRS, SHARED_ADDRS, SOFTWIRES},
};

use super::fastpath::take;
use crate::server::softwires::{Diff, Key, Softwire, Table};

pub struct Softwires {
    table: Table,
    /// The AFTR address of softwires that name none (`--tunnel-addr`).
    default_aftr: Ipv6Addr,
    softwires: HashMap<MapData, SoftwireKey, SoftwireEntry>,
    shared: HashMap<MapData, Ipv4Key, SharedAddr>,
    b4s: HashMap<MapData, B4Key, u32>,
    aftrs: HashMap<MapData, Ipv6Key, u32>,
    /// How many softwires use each address, (B4, address) pair and extra AFTR address.
    per_addr: StdHashMap<Ipv4Addr, u32>,
    per_b4: StdHashMap<(Ipv6Addr, Ipv4Addr), u32>,
    per_aftr: StdHashMap<Ipv6Addr, u32>,
}

fn map_key(sw: &Softwire) -> SoftwireKey {
    SoftwireKey {
        ipv4: v4_key(sw.ipv4),
        psid: sw.psid,
        _pad: 0,
    }
}

fn b4_key(b4: Ipv6Addr, ipv4: Ipv4Addr) -> B4Key {
    B4Key {
        b4: b4.octets(),
        ipv4: v4_key(ipv4),
    }
}

/// Counts one more user of `key`; true when it is the first.
fn up<K: std::hash::Hash + Eq>(counts: &mut StdHashMap<K, u32>, key: K) -> bool {
    let n = counts.entry(key).or_insert(0);
    *n += 1;
    *n == 1
}

/// Counts one user fewer of `key`; true when it was the last.
fn down<K: std::hash::Hash + Eq>(counts: &mut StdHashMap<K, u32>, key: K) -> bool {
    match counts.get_mut(&key) {
        Some(n) if *n > 1 => {
            *n -= 1;
            false
        }
        Some(_) => {
            counts.remove(&key);
            true
        }
        None => false,
    }
}

fn remove_ok<K: aya::Pod, V: aya::Pod>(map: &mut HashMap<MapData, K, V>, key: &K) -> Result<()> {
    match map.remove(key) {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(e) => Err(e).context("removing a softwire map entry"),
    }
}

impl Softwires {
    /// Takes the maps out of the object and makes them hold exactly `table` (entries a
    /// previous run pinned and `table` lacks are removed; the rest are rewritten in place).
    pub fn take(ebpf: &mut Ebpf, default_aftr: Ipv6Addr, table: Table) -> Result<Softwires> {
        let mut s = Softwires {
            table: Table::default(),
            default_aftr,
            softwires: take(ebpf, SOFTWIRES)?,
            shared: take(ebpf, SHARED_ADDRS)?,
            b4s: take(ebpf, B4_ADDRS)?,
            aftrs: take(ebpf, AFTR_ADDRS)?,
            per_addr: StdHashMap::new(),
            per_b4: StdHashMap::new(),
            per_aftr: StdHashMap::new(),
        };
        let wanted: std::collections::HashSet<SoftwireKey> = table.iter().map(map_key).collect();
        let stale: Vec<SoftwireKey> = s
            .softwires
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !wanted.contains(k))
            .collect();
        for k in &stale {
            remove_ok(&mut s.softwires, k)?;
        }
        // The helper maps are rebuilt from the table: stale entries of them go first.
        let addrs: std::collections::HashSet<Ipv4Key> =
            table.iter().map(|sw| v4_key(sw.ipv4)).collect();
        for k in s.shared.keys().filter_map(Result::ok).collect::<Vec<_>>() {
            if !addrs.contains(&k) {
                remove_ok(&mut s.shared, &k)?;
            }
        }
        let pairs: std::collections::HashSet<(Ipv6Key, Ipv4Key)> = table
            .iter()
            .map(|sw| (sw.b4.octets(), v4_key(sw.ipv4)))
            .collect();
        for k in s.b4s.keys().filter_map(Result::ok).collect::<Vec<_>>() {
            if !pairs.contains(&(k.b4, k.ipv4)) {
                remove_ok(&mut s.b4s, &k)?;
            }
        }
        let aftrs: std::collections::HashSet<Ipv6Key> = table
            .iter()
            .filter_map(|sw| sw.aftr)
            .map(|a| a.octets())
            .collect();
        for k in s.aftrs.keys().filter_map(Result::ok).collect::<Vec<_>>() {
            if !aftrs.contains(&k) {
                remove_ok(&mut s.aftrs, &k)?;
            }
        }
        for sw in table.iter() {
            s.write_new(sw)?;
        }
        s.table = table;
        Ok(s)
    }

    pub fn table(&self) -> &Table {
        &self.table
    }

    fn aftr_of(&self, sw: &Softwire) -> Ipv6Addr {
        sw.aftr.unwrap_or(self.default_aftr)
    }

    /// The maps' entries for a softwire the table does not hold yet.
    fn write_new(&mut self, sw: &Softwire) -> Result<()> {
        if up(&mut self.per_addr, sw.ipv4) {
            let split = SharedAddr {
                psid_len: sw.psid_len,
                psid_offset: sw.psid_offset,
                _pad: [0; 2],
            };
            self.shared
                .insert(v4_key(sw.ipv4), split, 0)
                .with_context(|| format!("{sw}: map {SHARED_ADDRS} full? (--max-bindings)"))?;
        }
        self.hold_endpoints(sw)?;
        self.write_entry(sw)
    }

    fn write_entry(&mut self, sw: &Softwire) -> Result<()> {
        let entry = SoftwireEntry {
            b4: sw.b4.octets(),
            aftr: self.aftr_of(sw).octets(),
        };
        self.softwires
            .insert(map_key(sw), entry, 0)
            .with_context(|| format!("{sw}: map {SOFTWIRES} full? (--max-bindings)"))
    }

    /// The B4 and AFTR entries `sw` needs.
    fn hold_endpoints(&mut self, sw: &Softwire) -> Result<()> {
        let n = {
            let n = self.per_b4.entry((sw.b4, sw.ipv4)).or_insert(0);
            *n += 1;
            *n
        };
        self.b4s
            .insert(b4_key(sw.b4, sw.ipv4), n, 0)
            .with_context(|| format!("{sw}: map {B4_ADDRS} full? (--max-bindings)"))?;
        if let Some(a) = sw.aftr.filter(|a| *a != self.default_aftr)
            && up(&mut self.per_aftr, a)
        {
            self.aftrs.insert(a.octets(), 1, 0).with_context(|| {
                format!("{sw}: map {AFTR_ADDRS} full (at most 64 AFTR addresses)")
            })?;
        }
        Ok(())
    }

    /// Gives up the B4 and AFTR entries `sw` held.
    fn release_endpoints(&mut self, sw: &Softwire) -> Result<()> {
        if down(&mut self.per_b4, (sw.b4, sw.ipv4)) {
            remove_ok(&mut self.b4s, &b4_key(sw.b4, sw.ipv4))?;
        }
        if let Some(a) = sw.aftr.filter(|a| *a != self.default_aftr)
            && down(&mut self.per_aftr, a)
        {
            remove_ok(&mut self.aftrs, &a.octets())?;
        }
        Ok(())
    }

    /// Adds one softwire (refused, with nothing written, when the table cannot take it).
    pub fn add(&mut self, sw: Softwire) -> Result<()> {
        self.table.check(&sw).map_err(anyhow::Error::msg)?;
        self.write_new(&sw)?;
        self.table.insert(sw).map_err(anyhow::Error::msg)
    }

    /// Removes the softwire of `key`; Err when there is none.
    pub fn del(&mut self, key: Key) -> Result<Softwire> {
        let sw = *self.table.get(key).ok_or_else(|| {
            anyhow::anyhow!(
                "no softwire holds {} psid {} (see softwire list)",
                key.0,
                key.1
            )
        })?;
        remove_ok(&mut self.softwires, &map_key(&sw))?;
        self.release_endpoints(&sw)?;
        if down(&mut self.per_addr, sw.ipv4) {
            remove_ok(&mut self.shared, &v4_key(sw.ipv4))?;
        }
        self.table.remove(key);
        Ok(sw)
    }

    /// Makes the maps hold `new` (a reloaded file), touching only what differs; returns what
    /// changed.
    pub fn apply(&mut self, new: Table) -> Result<Diff> {
        let diff = self.table.diff(&new);
        // Softwires that go, and those whose address is split anew (removed, then added
        // with the new split once their address is clear).
        let resplit = |old: &Softwire, sw: &Softwire| {
            (old.psid_len, old.psid_offset) != (sw.psid_len, sw.psid_offset)
        };
        let mut gone: Vec<Key> = diff.remove.iter().map(Softwire::key).collect();
        gone.extend(
            diff.write
                .iter()
                .filter(|sw| self.table.get(sw.key()).is_some_and(|old| resplit(old, sw)))
                .map(Softwire::key),
        );
        for key in gone {
            self.del(key)?;
        }
        for sw in &diff.write {
            match self.table.get(sw.key()).copied() {
                // Same (IPv4, PSID), other endpoints: replaced in one map write.
                Some(old) => {
                    self.hold_endpoints(sw)?;
                    self.write_entry(sw)?;
                    self.release_endpoints(&old)?;
                    self.table.remove(old.key());
                    self.table.insert(*sw).map_err(anyhow::Error::msg)?;
                }
                None => self.add(*sw)?,
            }
        }
        Ok(diff)
    }
}
