//! Packet counters kept by the eBPF programs in the per-CPU [`crate::names::STATS_MAP`].
//!
//! Each counter is one slot of the array; the controller sums the slot over all CPUs and reports
//! it under [`Counter::name`].

macro_rules! counters {
    ($( $(#[$doc:meta])* $variant:ident = $name:literal, )*) => {
        /// One counter slot. The discriminant is the index in the stats map.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Counter {
            $( $(#[$doc])* $variant, )*
        }

        impl Counter {
            /// Every counter, in index order.
            pub const ALL: &'static [Counter] = &[$(Counter::$variant),*];

            /// The name under which `tunnel-ctl stats` reports this counter.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Counter::$variant => $name,)*
                }
            }
        }
    };
}

counters! {
    /// IPv4 packets seen by a monitor program on ingress.
    MonitorIngressIpv4 = "monitor_ingress_ipv4",
    /// IPv6 packets seen by a monitor program on ingress.
    MonitorIngressIpv6 = "monitor_ingress_ipv6",
    /// Other frames (ARP, LLDP, ...) seen by a monitor program on ingress.
    MonitorIngressOther = "monitor_ingress_other",
    /// IPv4 packets seen by a monitor program on egress.
    MonitorEgressIpv4 = "monitor_egress_ipv4",
    /// IPv6 packets seen by a monitor program on egress.
    MonitorEgressIpv6 = "monitor_egress_ipv6",
    /// Other frames seen by a monitor program on egress.
    MonitorEgressOther = "monitor_egress_other",

    /// Server: packets from native clients decapsulated (GSO segments counted one by one).
    Decap = "fastpath_decap_packets",
    /// Server: decapsulated packets forwarded by the program itself (FIB lookup + redirect).
    DecapRedirected = "fastpath_decap_redirected",
    /// Server: packets to native leases encapsulated and sent toward the client.
    Encap = "fastpath_encap_packets",
    /// Server: IPv4-in-IPv6 to our tunnel address from an IPv6 source with no binding.
    DropUnboundSource = "drop_unbound_source",
    /// Server: inner IPv4 source is not the lease bound to the outer source.
    DropInnerSourceNotLease = "drop_inner_source_not_lease",
    /// lwAFTR: a B4 sent from a port (or ICMP id) outside every port set it holds on that
    /// address: dropped.
    DropPortOutsideSet = "drop_port_outside_set",
    /// lwAFTR: no softwire holds the port (or the packet has none to check: other protocols,
    /// or a fragment from a B4 without a softwire on that address): dropped.
    DropNoBindingForPort = "drop_no_binding_for_port",
    /// lwAFTR: the softwire of that address and port belongs to another B4 (or another AFTR
    /// address): dropped.
    DropB4Mismatch = "drop_b4_mismatch",
    /// lwAFTR: packets from one softwire to another's address and port, re-encapsulated
    /// toward that B4 without leaving the AFTR (RFC 7596 §7.1).
    Hairpinned = "hairpin_packets",
    /// lwAFTR: packets from one softwire to another that `--no-hairpin` dropped.
    DropHairpinOff = "drop_hairpin_off",
    /// Server: next header 4 but the inner packet is not IPv4.
    DropInnerNotIpv4 = "drop_inner_not_ipv4",
    /// Server: inner IPv4 header truncated or inconsistent.
    DropInnerMalformed = "drop_inner_malformed",
    /// Packets to a native lease too big for the tunnel: left to the slow path (ICMP).
    SlowPathTooBig = "slowpath_too_big",
    /// Packets whose TTL would expire here: left to the kernel (ICMP time exceeded).
    SlowPathTtl = "slowpath_ttl_expired",
    /// lwAFTR: an IPv4 fragment toward a softwire's address (only the first names the
    /// port) while no slow path is set up to reassemble it (no TUN yet): dropped.
    DropFragmentToSoftwire = "drop_fragment_to_softwire",
    /// lwAFTR: a packet toward a softwire too big for the tunnel while no slow path is set
    /// up to fragment it: dropped.
    DropTooBigForSoftwire = "drop_too_big_for_softwire",
    /// lwAFTR: IPv4 fragments and too-big packets toward a softwire's address handed to the
    /// controller (TUN), which reassembles, picks the softwire and fragments to fit.
    SoftwireSlowPath = "softwire_slow_path_packets",
    /// lwAFTR: outer IPv6 fragments from a B4 left to the kernel's reassembly; the
    /// controller checks the whole packet against the table.
    SoftwireOuterFragment = "softwire_outer_fragments",
    /// No IPv6 route or neighbour toward a client: dropped.
    DropNoRoute = "drop_no_route_to_client",
    /// A packet rewrite (adjust_room, store) failed: dropped.
    DropRewriteFailed = "drop_rewrite_failed",
    /// SYNs whose MSS option was lowered to fit the tunnel.
    MssClamped = "mss_clamped",
    /// Native client: IPv4 packets encapsulated toward the server.
    ClientEncap = "client_encap_packets",
    /// Native client: packets from the server decapsulated.
    ClientDecap = "client_decap_packets",
    /// Native client: a packet from the server whose inner destination is not our lease
    /// (or not IPv4): dropped.
    ClientDropNotForLease = "client_drop_not_for_lease",

    /// MAP-E CE: LAN packets translated into the port set and encapsulated to the BR.
    CeNaptOut = "mape_ce_napt_out_packets",
    /// MAP-E CE: packets from the BR decapsulated and translated back to a LAN host.
    CeNaptIn = "mape_ce_napt_in_packets",
    /// MAP-E CE: ICMP errors and fragments from the BR handed to the controller (they need
    /// the flow table, or reassembly).
    CeSlowPathIn = "mape_ce_slowpath_in_packets",
    /// lwB4 (native client on a shared lease): outbound packets without a mapping (or too
    /// big, or fragments) handed to the controller's TUN.
    CeSlowPathOut = "mape_ce_slowpath_out_packets",
    /// MAP-E CE: packets from the BR for a port and remote with no mapping: dropped.
    CeDropInNoMapping = "mape_ce_drop_in_no_mapping",
    /// MAP-E CE: IPv4-in-IPv6 to our address whose outer source is not the BR: dropped.
    CeDropNotFromBr = "mape_ce_drop_not_from_br",
    /// MAP-E BR: IPv4 fragments toward a CE handed to the controller for reassembly.
    BrSlowPathFragment = "mape_br_slowpath_fragments",
    /// MAP-E CE: outer IPv6 fragments from the BR handed to the controller for reassembly.
    CeSlowPathOuterFragment = "mape_ce_slowpath_outer_fragments",
    /// MAP-E BR: outer IPv6 fragments from CEs handed to the controller for reassembly.
    BrSlowPathOuterFragment = "mape_br_slowpath_outer_fragments",
    /// MAP-E BR: packets from CEs checked and decapsulated.
    BrDecap = "mape_br_decap_packets",
    /// MAP-E BR: packets to CEs encapsulated.
    BrEncap = "mape_br_encap_packets",
    /// MAP-E BR: inner source port outside the port set of the CE that sent it: dropped.
    BrDropPortOutsideSet = "mape_br_drop_port_outside_set",
    /// MAP-E BR: outer source is not the CE address the rule gives for the inner source:
    /// dropped.
    BrDropSourceMismatch = "mape_br_drop_source_mismatch",
    /// MAP-E BR: inner source covered by no rule: dropped.
    BrDropNoRule = "mape_br_drop_no_rule",
    /// MAP-E BR: no port to check or route by (non-first fragment, unknown protocol): dropped.
    BrDropNoPort = "mape_br_drop_no_port",
    /// MAP-E BR: traffic to the BR address that is not IPv4-in-IPv6: dropped (returned to the
    /// stack it would be forwarded back out, as the BR address is on no interface).
    BrDropNotIpip = "mape_br_drop_not_ipip",
    /// IPv4-in-IPv6 to our address in outer IPv6 fragments: dropped (no reassembly yet).
    DropOuterFragment = "drop_outer_fragment",
    /// More outer extension headers than the programs walk (4): dropped.
    DropExtHeadersTooMany = "drop_ext_headers_too_many",
    /// An outer extension header chain that is truncated: dropped.
    DropExtHeadersMalformed = "drop_ext_headers_malformed",
    /// IPv4-in-IPv6 that came with Hop-by-Hop or Destination Options headers (e.g. the
    /// Tunnel Encapsulation Limit that Linux ip6tnl adds): the options were removed and the
    /// packet decapsulated as usual.
    ExtHeadersRemoved = "ext_headers_removed",
    /// Packets whose next hop the cache did not have (while it was on): they asked the FIB
    /// helper, and the destination was reported to the controller.
    NextHopMiss = "nexthop_cache_misses",
    /// Server (`--xdp`): packets decapsulated and redirected by the XDP program (also
    /// counted in `fastpath_decap_packets` and `fastpath_decap_redirected`).
    XdpDecap = "fastpath_xdp_decap_packets",
}

/// Number of slots in the stats map.
pub const COUNTER_COUNT: u32 = Counter::ALL.len() as u32;

impl Counter {
    /// Index of this counter in the stats map.
    pub const fn index(self) -> u32 {
        self as u32
    }

    /// The counter with the given name, if any.
    pub fn from_name(name: &str) -> Option<Counter> {
        Counter::ALL.iter().copied().find(|c| c.name() == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_are_dense_and_names_unique() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(c.index() as usize, i);
            assert_eq!(Counter::from_name(c.name()), Some(*c));
        }
        for (i, a) in Counter::ALL.iter().enumerate() {
            for b in &Counter::ALL[i + 1..] {
                assert_ne!(a.name(), b.name());
            }
        }
    }
}
