//! The fast-path maps. Their names are `tunnel_common::names`; the controller owns every write.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap},
};
use tunnel_common::fastpath::{Binding4, Binding6, Ipv4Key, Ipv6Key, MAX_BINDINGS, TunnelConfig};

/// This instance's endpoint, interfaces and MTU (one entry).
#[map]
pub static TUNNEL_CONFIG: Array<TunnelConfig> = Array::pinned(1, 0);

/// Server: native client's tunnel IPv6 → its lease (anti-spoofing on decapsulation).
#[map]
pub static BIND_BY_V6: HashMap<Ipv6Key, Binding4> = HashMap::pinned(MAX_BINDINGS, 0);

/// Server: lease → native client's tunnel IPv6 (encapsulation).
#[map]
pub static BIND_BY_V4: HashMap<Ipv4Key, Binding6> = HashMap::pinned(MAX_BINDINGS, 0);

/// The configuration, once the controller has written it.
#[inline(always)]
pub fn config() -> Option<&'static TunnelConfig> {
    TUNNEL_CONFIG.get(0).filter(|c| c.enabled != 0)
}
