//! The controller's handle on the MAP-E maps: the CE's NAPT entries (both directions) and the
//! BR's rules. The CE's flow table (`mape::table`) decides; this module mirrors it.
use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    maps::{HashMap, MapData, MapError, lpm_trie::Key, lpm_trie::LpmTrie},
};
use tunnel_common::{
    fastpath::Ipv4Key,
    mape::{MapRule, NatIn, NatKey, NatOut},
    names::{BR_RULES, NAT_IN, NAT_OUT},
};

use super::fastpath::take;

/// What the programs recorded on one mapping (both directions).
#[derive(Clone, Copy, Debug, Default)]
pub struct Activity {
    /// CLOCK_MONOTONIC ns of the last packet either way (0: none yet).
    pub last_seen_ns: u64,
    /// Flags of outbound and inbound packets, or-ed.
    pub flags: u16,
    /// Flags of inbound packets only (a reply was seen).
    pub in_flags: u16,
}

pub struct NatMaps {
    out: HashMap<MapData, NatKey, NatOut>,
    inb: HashMap<MapData, NatKey, NatIn>,
}

impl NatMaps {
    pub fn take(ebpf: &mut Ebpf) -> Result<NatMaps> {
        Ok(NatMaps {
            out: take(ebpf, NAT_OUT)?,
            inb: take(ebpf, NAT_IN)?,
        })
    }

    /// Installs a mapping; the inbound half first, so a reply never finds only half of it.
    pub fn insert(
        &mut self,
        out_key: NatKey,
        out: NatOut,
        in_key: NatKey,
        inb: NatIn,
    ) -> Result<()> {
        self.inb
            .insert(in_key, inb, 0)
            .with_context(|| format!("adding to {NAT_IN} (full?)"))?;
        if let Err(e) = self.out.insert(out_key, out, 0) {
            let _ = self.inb.remove(&in_key);
            return Err(e).with_context(|| format!("adding to {NAT_OUT} (full?)"));
        }
        Ok(())
    }

    /// Removes a mapping; the outbound half first (no new packets use it), entries already
    /// gone are fine.
    pub fn remove(&mut self, out_key: &NatKey, in_key: &NatKey) -> Result<()> {
        ok_if_gone(self.out.remove(out_key))?;
        ok_if_gone(self.inb.remove(in_key))
    }

    pub fn activity(&self, out_key: &NatKey, in_key: &NatKey) -> Activity {
        let out = self.out.get(out_key, 0).unwrap_or_default();
        let inb = self.inb.get(in_key, 0).unwrap_or_default();
        Activity {
            last_seen_ns: out.last_seen_ns.max(inb.last_seen_ns),
            flags: out.flags | inb.flags,
            in_flags: inb.flags,
        }
    }

    /// Every outbound entry with its inbound half, as an earlier run left them pinned:
    /// (outbound key, external port, inbound key, inbound value when present).
    pub fn pinned(&self) -> Vec<(NatKey, NatOut, NatKey, Option<NatIn>)> {
        self.out
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| {
                let in_key = NatKey {
                    local_ip: 0,
                    remote_ip: k.remote_ip,
                    local_port: v.ext_port,
                    remote_port: k.remote_port,
                    proto: k.proto,
                    _pad: [0; 3],
                };
                let inb = self.inb.get(&in_key, 0).ok();
                (k, v, in_key, inb)
            })
            .collect()
    }

    /// Removes the inbound entries whose key `keep` refuses; returns how many went.
    pub fn retain_inbound(&mut self, keep: impl Fn(&NatKey) -> bool) -> Result<usize> {
        let gone: Vec<NatKey> = self
            .inb
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !keep(k))
            .collect();
        for k in &gone {
            ok_if_gone(self.inb.remove(k))?;
        }
        Ok(gone.len())
    }

    /// Number of entries (outbound, inbound).
    pub fn counts(&self) -> (usize, usize) {
        (
            self.out.keys().filter_map(Result::ok).count(),
            self.inb.keys().filter_map(Result::ok).count(),
        )
    }
}

/// The BR's rules.
pub struct BrRules {
    rules: LpmTrie<MapData, Ipv4Key, MapRule>,
}

impl BrRules {
    pub fn take(ebpf: &mut Ebpf) -> Result<BrRules> {
        Ok(BrRules {
            rules: take(ebpf, BR_RULES)?,
        })
    }

    /// Makes the map hold exactly `rules` (IPv4 prefix, prefix length, rule).
    pub fn replace_all(&mut self, rules: &[(Ipv4Key, u8, MapRule)]) -> Result<()> {
        let stale: Vec<Key<Ipv4Key>> = self.rules.keys().filter_map(Result::ok).collect();
        for key in stale {
            ok_if_gone(self.rules.remove(&key))?;
        }
        for (prefix, len, rule) in rules {
            self.rules
                .insert(&Key::new(u32::from(*len), *prefix), rule, 0)
                .with_context(|| format!("adding a rule to {BR_RULES}"))?;
        }
        Ok(())
    }
}

fn ok_if_gone(r: Result<(), MapError>) -> Result<()> {
    match r {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(e) => Err(e).context("removing a map entry"),
    }
}
