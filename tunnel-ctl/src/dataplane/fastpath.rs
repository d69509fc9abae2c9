//! The controller's handle on the fast-path maps: the tunnel configuration and the bindings
//! {client IPv6 ↔ lease IPv4} in both directions. The lease table decides; this module only
//! mirrors its decisions into the maps.
use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, PerCpuValues},
};
use tunnel_common::{
    fastpath::{Binding4, Binding6, ClientTraffic, Ipv4Key, Ipv6Key, TunnelConfig},
    names::{BIND_BY_V4, BIND_BY_V6, BIND_CACHE, CLIENT_TRAFFIC, TUNNEL_CONFIG},
};

use super::bindcache::BindCache;

pub use tunnel_common::fastpath::{v4_from_key, v4_key};

/// The maps, taken out of a loaded object (the object keeps the programs and the counters).
pub struct Maps {
    config: Array<MapData, TunnelConfig>,
    by_v6: HashMap<MapData, Ipv6Key, Binding4>,
    /// Part of `by_v6` for the programs to read without hashing (see [`BindCache`]).
    cache: BindCache,
    by_v4: HashMap<MapData, Ipv4Key, Binding6>,
    /// Each binding's traffic, per CPU, at the binding's slot (see [`ClientTraffic`]).
    traffic: PerCpuArray<MapData, ClientTraffic>,
    /// Slots of [`Maps::traffic`] that no binding uses, and the first never used.
    free_slots: Vec<u32>,
    next_slot: u32,
}

/// Takes map `name` out of the object as `T`.
pub fn take<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| anyhow!("eBPF object has no map {name}"))?;
    T::try_from(map).with_context(|| format!("opening map {name}"))
}

impl Maps {
    pub fn take(ebpf: &mut Ebpf) -> Result<Maps> {
        Ok(Maps {
            config: take(ebpf, TUNNEL_CONFIG)?,
            by_v6: take(ebpf, BIND_BY_V6)?,
            cache: BindCache::new(take(ebpf, BIND_CACHE)?)?,
            by_v4: take(ebpf, BIND_BY_V4)?,
            traffic: take(ebpf, CLIENT_TRAFFIC)?,
            free_slots: Vec::new(),
            next_slot: 0,
        }
        .with_slots_in_use()
        .with_cache_rebuilt())
    }

    /// The cache made again from the (pinned) hash: a controller that died mid-write, or one
    /// that ran without a cache, leaves nothing the hash does not hold.
    fn with_cache_rebuilt(mut self) -> Maps {
        self.rebuild_cache();
        self
    }

    /// Makes the binding cache again from `BIND_BY_V6` (also for a map filled by other means,
    /// as the bench does); returns how many bindings found a place.
    pub fn rebuild_cache(&mut self) -> usize {
        let bindings: Vec<(Ipv6Key, Binding4)> = self.by_v6.iter().filter_map(Result::ok).collect();
        self.cache.rebuild(bindings)
    }

    /// What the programs' binding cache holds for `client` (None: they hash for it).
    pub fn cached(&self, client: Ipv6Addr) -> Option<Binding4> {
        self.cache.get(&client.octets())
    }

    /// Slot bookkeeping for bindings already in (pinned) maps: their slots are taken.
    fn with_slots_in_use(mut self) -> Maps {
        let used: std::collections::BTreeSet<u32> = self
            .by_v4
            .iter()
            .filter_map(Result::ok)
            .map(|(_, b)| b.slot)
            .collect();
        self.next_slot = used.last().map_or(0, |s| s + 1);
        self.free_slots = (0..self.next_slot).filter(|s| !used.contains(s)).collect();
        self
    }

    /// A slot with its counters at zero.
    fn new_slot(&mut self) -> Result<u32> {
        let slot = match self.free_slots.pop() {
            Some(s) => s,
            None if self.next_slot < self.traffic.len() => {
                self.next_slot += 1;
                self.next_slot - 1
            }
            None => {
                return Err(anyhow!(std::io::Error::from_raw_os_error(libc::E2BIG)))
                    .context(format!("no free slot in {CLIENT_TRAFFIC}"));
            }
        };
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let zero = PerCpuValues::try_from(vec![ClientTraffic::default(); cpus])?;
        if let Err(e) = self.traffic.set(slot, zero, 0) {
            self.free_slots.push(slot);
            return Err(e).context(format!("zeroing slot {slot} of {CLIENT_TRAFFIC}"));
        }
        Ok(slot)
    }

    pub fn config(&self) -> Result<TunnelConfig> {
        self.config
            .get(&0, 0)
            .context("reading the tunnel configuration")
    }

    /// Writes the configuration (with the binding cache's size, which this handle knows);
    /// the programs act on it from the next packet on.
    pub fn set_config(&mut self, cfg: &TunnelConfig) -> Result<()> {
        let cfg = TunnelConfig {
            bind_cache_bits: self.cache.bits(),
            ..*cfg
        };
        self.config
            .set(0, cfg, 0)
            .context("writing the tunnel configuration")
    }

    /// Installs (or confirms) `client` ↔ `ipv4`. The IPv6 → IPv4 direction goes in last so
    /// that a client is never accepted before its return path exists.
    /// The traffic counters start at zero with a new binding; a confirmed one (same lease,
    /// same client) keeps its slot and counters.
    pub fn bind(&mut self, client: Ipv6Addr, ipv4: Ipv4Addr) -> Result<()> {
        let existing = self.by_v4.get(&v4_key(ipv4), 0).ok();
        let slot = match existing {
            Some(b) if b.client == client.octets() => b.slot,
            Some(b) => {
                // The lease moves to another client: its counters start again.
                self.free_slots.push(b.slot);
                self.new_slot()?
            }
            None => self.new_slot()?,
        };
        let result = self.write_binding(client, ipv4, slot);
        if result.is_err() && existing.is_none() {
            self.free_slots.push(slot);
        }
        result
    }

    fn write_binding(&mut self, client: Ipv6Addr, ipv4: Ipv4Addr, slot: u32) -> Result<()> {
        let by_v6 = Binding4 {
            ipv4: v4_key(ipv4),
            slot,
            ..Default::default()
        };
        self.by_v4
            .insert(
                v4_key(ipv4),
                Binding6 {
                    client: client.octets(),
                    slot,
                },
                0,
            )
            .with_context(|| format!("binding {ipv4} → {client} (map {BIND_BY_V4} full?)"))?;
        self.by_v6
            .insert(client.octets(), by_v6, 0)
            .with_context(|| format!("binding {client} → {ipv4} (map {BIND_BY_V6} full?)"))?;
        // After the hash: the cache never holds what the hash does not.
        self.cache.put(&client.octets(), &by_v6);
        Ok(())
    }

    /// Removes `client` ↔ `ipv4`; entries already gone are fine. Only removes an entry that
    /// still points at the other half, so a rebinding done meanwhile is left alone.
    pub fn unbind(&mut self, client: Ipv6Addr, ipv4: Ipv4Addr) -> Result<()> {
        if let Ok(b) = self.by_v6.get(&client.octets(), 0)
            && b.ipv4 == v4_key(ipv4)
        {
            self.cache.remove(&client.octets());
            remove_ok(self.by_v6.remove(&client.octets()))?;
        }
        if let Ok(b) = self.by_v4.get(&v4_key(ipv4), 0)
            && b.client == client.octets()
        {
            remove_ok(self.by_v4.remove(&v4_key(ipv4)))?;
            self.free_slots.push(b.slot);
        }
        Ok(())
    }

    /// What `ipv4`'s binding carried, summed over the CPUs (None: not bound).
    pub fn traffic(&self, ipv4: Ipv4Addr) -> Option<ClientTraffic> {
        let slot = self.by_v4.get(&v4_key(ipv4), 0).ok()?.slot;
        let per_cpu = self.traffic.get(&slot, 0).ok()?;
        Some(
            per_cpu
                .iter()
                .fold(ClientTraffic::default(), |a, t| ClientTraffic {
                    rx_packets: a.rx_packets + t.rx_packets,
                    rx_bytes: a.rx_bytes + t.rx_bytes,
                    tx_packets: a.tx_packets + t.tx_packets,
                    tx_bytes: a.tx_bytes + t.tx_bytes,
                }),
        )
    }

    /// Every binding, as seen from the IPv4 side, and the count of IPv6-side entries.
    pub fn bindings(&self) -> (Vec<(Ipv4Addr, Ipv6Addr)>, usize) {
        let v4 = self
            .by_v4
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (v4_from_key(k), Ipv6Addr::from(v.client)))
            .collect();
        let v6 = self.by_v6.keys().filter_map(Result::ok).count();
        (v4, v6)
    }

    /// Removes every binding whose pair `keep` rejects (reconciling after a restart).
    pub fn retain(&mut self, keep: impl Fn(Ipv4Addr, Ipv6Addr) -> bool) -> Result<usize> {
        let mut removed = 0;
        let v4: Vec<(Ipv4Key, Binding6)> = self.by_v4.iter().filter_map(Result::ok).collect();
        for (k, v) in v4 {
            if !keep(v4_from_key(k), Ipv6Addr::from(v.client)) {
                remove_ok(self.by_v4.remove(&k))?;
                self.free_slots.push(v.slot);
                removed += 1;
            }
        }
        let v6: Vec<(Ipv6Key, Binding4)> = self.by_v6.iter().filter_map(Result::ok).collect();
        for (k, v) in v6 {
            if !keep(v4_from_key(v.ipv4), Ipv6Addr::from(k)) {
                self.cache.remove(&k);
                remove_ok(self.by_v6.remove(&k))?;
            }
        }
        Ok(removed)
    }
}

fn remove_ok(r: Result<(), MapError>) -> Result<()> {
    match r {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(e) => Err(e).context("removing a binding"),
    }
}
