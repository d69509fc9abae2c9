//! Names of maps and programs in the eBPF object.
//!
//! aya names a map after its `static` in `tunnel-ebpf` and a program after its function, so the
//! eBPF side must use these exact identifiers; `tunnel-ctl` has a test that loads the object and
//! checks that every name below exists in it.

/// Per-CPU array of `u64` counters, indexed by [`crate::stats::Counter`].
pub const STATS_MAP: &str = "TUNNEL_STATS";
/// Array with one [`crate::fastpath::TunnelConfig`].
pub const TUNNEL_CONFIG: &str = "TUNNEL_CONFIG";
/// Hash: client tunnel IPv6 ([`crate::fastpath::Ipv6Key`]) → [`crate::fastpath::Binding4`].
pub const BIND_BY_V6: &str = "BIND_BY_V6";
/// Hash: lease IPv4 ([`crate::fastpath::Ipv4Key`]) → [`crate::fastpath::Binding6`].
pub const BIND_BY_V4: &str = "BIND_BY_V4";

/// TC program that classifies and counts packets on ingress (no rewriting).
pub const PROG_MONITOR_INGRESS: &str = "monitor_ingress";
/// TC program that classifies and counts packets on egress (no rewriting).
pub const PROG_MONITOR_EGRESS: &str = "monitor_egress";
/// Server, ingress of the IPv6 side: check and decapsulate native clients' packets.
pub const PROG_SERVER_DECAP: &str = "server_decap";
/// Server, ingress of the IPv4 side: encapsulate packets to native leases.
pub const PROG_SERVER_ENCAP: &str = "server_encap";
/// Native client, egress of its IPv6 interface: encapsulate the lease's IPv4 packets.
pub const PROG_CLIENT_ENCAP: &str = "client_encap";
/// Native client, ingress of its IPv6 interface: decapsulate packets from the server.
pub const PROG_CLIENT_DECAP: &str = "client_decap";

/// Every map the controller expects to find in the object.
pub const ALL_MAPS: &[&str] = &[STATS_MAP, TUNNEL_CONFIG, BIND_BY_V6, BIND_BY_V4];
/// Every program the controller expects to find in the object.
pub const ALL_PROGRAMS: &[&str] = &[
    PROG_MONITOR_INGRESS,
    PROG_MONITOR_EGRESS,
    PROG_SERVER_DECAP,
    PROG_SERVER_ENCAP,
    PROG_CLIENT_ENCAP,
    PROG_CLIENT_DECAP,
];
