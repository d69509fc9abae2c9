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
    os::fd::OwnedFd,
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

use super::{
    batch::{all_keys, take_hash, update_all},
    fastpath::take,
};
use crate::server::softwires::{Diff, Key, Softwire, Table};

pub struct Softwires {
    table: Table,
    /// The AFTR address of softwires that name none (`--tunnel-addr`).
    default_aftr: Ipv6Addr,
    softwires: HashMap<MapData, SoftwireKey, SoftwireEntry>,
    shared: HashMap<MapData, Ipv4Key, SharedAddr>,
    b4s: HashMap<MapData, B4Key, u32>,
    aftrs: HashMap<MapData, Ipv6Key, u32>,
    /// Second descriptors of `softwires`, `shared` and `b4s`, for batch writes.
    batch_fds: [OwnedFd; 3],
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

fn split_of(sw: &Softwire) -> SharedAddr {
    SharedAddr {
        psid_len: sw.psid_len,
        psid_offset: sw.psid_offset,
        _pad: [0; 2],
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
        let (softwires, softwires_fd) = take_hash(ebpf, SOFTWIRES)?;
        let (shared, shared_fd) = take_hash(ebpf, SHARED_ADDRS)?;
        let (b4s, b4s_fd) = take_hash(ebpf, B4_ADDRS)?;
        let mut s = Softwires {
            table: Table::default(),
            default_aftr,
            softwires,
            shared,
            b4s,
            aftrs: take(ebpf, AFTR_ADDRS)?,
            batch_fds: [softwires_fd, shared_fd, b4s_fd],
            per_addr: StdHashMap::new(),
            per_b4: StdHashMap::new(),
            per_aftr: StdHashMap::new(),
        };
        s.remove_stale(&table)?;
        s.load(&table)?;
        s.table = table;
        Ok(s)
    }

    /// Removes the entries a previous run pinned that `table` lacks (a fresh map has none:
    /// then no key set is built, which a million-softwire start would notice).
    fn remove_stale(&mut self, table: &Table) -> Result<()> {
        use std::collections::HashSet;
        let [sw_fd, split_fd, b4_fd] = &self.batch_fds;
        let pinned: Vec<SoftwireKey> = all_keys(&self.softwires, sw_fd)?;
        if !pinned.is_empty() {
            let wanted: HashSet<SoftwireKey> = table.iter().map(map_key).collect();
            for k in pinned.iter().filter(|k| !wanted.contains(k)) {
                remove_ok(&mut self.softwires, k)?;
            }
        }
        let pinned: Vec<Ipv4Key> = all_keys(&self.shared, split_fd)?;
        if !pinned.is_empty() {
            let addrs: HashSet<Ipv4Key> = table.iter().map(|sw| v4_key(sw.ipv4)).collect();
            for k in pinned.iter().filter(|k| !addrs.contains(k)) {
                remove_ok(&mut self.shared, k)?;
            }
        }
        let pinned: Vec<B4Key> = all_keys(&self.b4s, b4_fd)?;
        if !pinned.is_empty() {
            let pairs: HashSet<(Ipv6Key, Ipv4Key)> = table
                .iter()
                .map(|sw| (sw.b4.octets(), v4_key(sw.ipv4)))
                .collect();
            for k in pinned.iter().filter(|k| !pairs.contains(&(k.b4, k.ipv4))) {
                remove_ok(&mut self.b4s, k)?;
            }
        }
        let pinned: Vec<Ipv6Key> = self.aftrs.keys().filter_map(Result::ok).collect();
        if !pinned.is_empty() {
            let aftrs: HashSet<Ipv6Key> = table
                .iter()
                .filter_map(|sw| sw.aftr)
                .map(|a| a.octets())
                .collect();
            for k in pinned.iter().filter(|k| !aftrs.contains(*k)) {
                remove_ok(&mut self.aftrs, k)?;
            }
        }
        Ok(())
    }

    /// Writes every softwire of `table` (none of which the maps' bookkeeping holds yet) in
    /// batches: the splits, then the B4 and AFTR entries, then the softwires.
    fn load(&mut self, table: &Table) -> Result<()> {
        let (mut split_keys, mut splits) = (Vec::new(), Vec::new());
        let mut b4_keys = Vec::new();
        let (mut sw_keys, mut entries) = (Vec::with_capacity(table.len()), Vec::new());
        entries.reserve(table.len());
        for sw in table.iter() {
            if up(&mut self.per_addr, sw.ipv4) {
                split_keys.push(v4_key(sw.ipv4));
                splits.push(split_of(sw));
            }
            if up(&mut self.per_b4, (sw.b4, sw.ipv4)) {
                b4_keys.push(b4_key(sw.b4, sw.ipv4));
            }
            if let Some(a) = sw.aftr.filter(|a| *a != self.default_aftr)
                && up(&mut self.per_aftr, a)
            {
                self.aftrs.insert(a.octets(), 1, 0).with_context(|| {
                    format!("{sw}: map {AFTR_ADDRS} full (at most 64 AFTR addresses)")
                })?;
            }
            sw_keys.push(map_key(sw));
            entries.push(self.entry_of(sw));
        }
        let [sw_fd, split_fd, b4_fd] = &self.batch_fds;
        update_all(&mut self.shared, split_fd, &split_keys, &splits)
            .with_context(|| format!("writing map {SHARED_ADDRS} (--max-bindings)"))?;
        let ones = vec![1u32; b4_keys.len()];
        update_all(&mut self.b4s, b4_fd, &b4_keys, &ones)
            .with_context(|| format!("writing map {B4_ADDRS} (--max-bindings)"))?;
        update_all(&mut self.softwires, sw_fd, &sw_keys, &entries)
            .with_context(|| format!("writing map {SOFTWIRES} (--max-bindings)"))
    }

    fn entry_of(&self, sw: &Softwire) -> SoftwireEntry {
        SoftwireEntry {
            b4: sw.b4.octets(),
            aftr: self.aftr_of(sw).octets(),
        }
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
            self.shared
                .insert(v4_key(sw.ipv4), split_of(sw), 0)
                .with_context(|| format!("{sw}: map {SHARED_ADDRS} full? (--max-bindings)"))?;
        }
        self.hold_endpoints(sw)?;
        self.write_entry(sw)
    }

    fn write_entry(&mut self, sw: &Softwire) -> Result<()> {
        let entry = self.entry_of(sw);
        self.softwires
            .insert(map_key(sw), entry, 0)
            .with_context(|| format!("{sw}: map {SOFTWIRES} full? (--max-bindings)"))
    }

    /// The B4 and AFTR entries `sw` needs.
    fn hold_endpoints(&mut self, sw: &Softwire) -> Result<()> {
        if up(&mut self.per_b4, (sw.b4, sw.ipv4)) {
            self.b4s
                .insert(b4_key(sw.b4, sw.ipv4), 1, 0)
                .with_context(|| format!("{sw}: map {B4_ADDRS} full? (--max-bindings)"))?;
        }
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
