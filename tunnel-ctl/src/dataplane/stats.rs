//! Reading the per-CPU counters.
use std::collections::BTreeMap;

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray},
};
use tunnel_common::{names::STATS_MAP, stats::Counter};

/// Counter name → sum over all CPUs, for every counter (zeros included, so the set of keys is
/// stable for scripts).
pub type Counters = BTreeMap<&'static str, u64>;

/// Reads all counters from the stats map of a loaded object.
pub fn read(ebpf: &Ebpf) -> Result<Counters> {
    let map = ebpf
        .map(STATS_MAP)
        .ok_or_else(|| anyhow!("eBPF object has no {STATS_MAP} map"))?;
    let array: PerCpuArray<&MapData, u64> =
        PerCpuArray::try_from(map).context("opening the stats map")?;
    let mut out = Counters::new();
    for counter in Counter::ALL {
        let values = array
            .get(&counter.index(), 0)
            .with_context(|| format!("reading counter {}", counter.name()))?;
        out.insert(counter.name(), values.iter().sum());
    }
    Ok(out)
}
