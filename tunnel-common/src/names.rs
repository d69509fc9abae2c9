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
/// Array of [`crate::fastpath::BindCacheEntry`], two-way set-associative by client IPv6
/// ([`crate::fastpath::bind_cache_base`]): a copy of part of [`BIND_BY_V6`] that the server's
/// decap programs read before hashing (mmapped by the controller, which writes every entry).
pub const BIND_CACHE: &str = "BIND_CACHE";
/// Hash: lease IPv4 ([`crate::fastpath::Ipv4Key`]) → [`crate::fastpath::Binding6`].
pub const BIND_BY_V4: &str = "BIND_BY_V4";
/// Per-CPU array: a binding's slot (in its [`crate::fastpath::Binding4`] and
/// [`crate::fastpath::Binding6`]) → [`crate::fastpath::ClientTraffic`]. An array, not a hash:
/// the lookup the programs add per packet is an index.
pub const CLIENT_TRAFFIC: &str = "CLIENT_TRAFFIC";
/// Server (lwAFTR): hash [`crate::fastpath::SoftwireKey`] (IPv4, PSID) →
/// [`crate::fastpath::SoftwireEntry`] (B4, AFTR address).
pub const SOFTWIRES: &str = "SOFTWIRES";
/// Server (lwAFTR): hash IPv4 ([`crate::fastpath::Ipv4Key`]) → [`crate::fastpath::SharedAddr`]
/// (how that address's ports are split among its softwires).
pub const SHARED_ADDRS: &str = "SHARED_ADDRS";
/// Server (lwAFTR): hash [`crate::fastpath::B4Key`] → number of softwires that B4 holds on
/// that address (tells a port outside the B4's set from another B4's address).
pub const B4_ADDRS: &str = "B4_ADDRS";
/// Server (lwAFTR): hash IPv6 → number of softwires naming it: the AFTR addresses accepted
/// besides the tunnel address.
pub const AFTR_ADDRS: &str = "AFTR_ADDRS";

/// Server: ring buffer of [`crate::fastpath::PolicyEvent`]s (not pinned).
pub const POLICY_EVENTS: &str = "POLICY_EVENTS";
/// Server: array with the time (ns) of the last policy event on each CPU (the rate limit).
pub const POLICY_LAST: &str = "POLICY_LAST";

/// Array of [`crate::nexthop::NextHopSlot`], two-way set-associative by IPv4 destination
/// ([`crate::nexthop::set_base`]; not pinned: a new controller starts it empty).
pub const NEXTHOPS_V4: &str = "NEXTHOPS_V4";
/// As [`NEXTHOPS_V4`], by IPv6 destination.
pub const NEXTHOPS_V6: &str = "NEXTHOPS_V6";
/// Array with one [`crate::nexthop::NextHopState`].
pub const NEXTHOP_STATE: &str = "NEXTHOP_STATE";
/// Ring buffer of [`crate::nexthop::NextHopMiss`]es for the controller.
pub const NEXTHOP_MISSES: &str = "NEXTHOP_MISSES";
/// Per-CPU array: when this CPU last reported a miss, and what (the reports' rate limit).
pub const NEXTHOP_MISS_LAST: &str = "NEXTHOP_MISS_LAST";

/// Array with one [`crate::nexthop::Clock`]: `jiffies` as CLOCK_MONOTONIC ns.
pub const CLOCK: &str = "CLOCK";

/// MAP-E CE: hash [`crate::mape::NatKey`] (LAN host, remote) → [`crate::mape::NatOut`].
pub const NAT_OUT: &str = "NAT_OUT";
/// MAP-E CE: hash [`crate::mape::NatKey`] (external port, remote) → [`crate::mape::NatIn`].
pub const NAT_IN: &str = "NAT_IN";
/// MAP-E BR: LPM trie [`crate::mape::RuleKey`] (rule IPv4 prefix) → [`crate::mape::MapRule`].
pub const BR_RULES: &str = "BR_RULES";

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

/// MAP-E CE, ingress of the LAN side: NAPT into the port set and encapsulate to the BR.
pub const PROG_CE_OUT: &str = "ce_out";
/// lwB4 (a native client on a shared lease), egress of its IPv6 interface: NAPT the host's
/// (and its LAN's) IPv4 into the port set and encapsulate to the AFTR; unmapped to the TUN.
pub const PROG_LWB4_OUT: &str = "lwb4_out";
/// MAP-E CE, ingress of the WAN side: decapsulate from the BR and NAPT back to the LAN.
pub const PROG_CE_IN: &str = "ce_in";
/// MAP-E BR, ingress of the IPv6 side: check a CE's source against the rules, decapsulate.
pub const PROG_BR_DECAP: &str = "br_decap";
/// MAP-E BR, ingress of the IPv4 side: compute the CE address, encapsulate.
pub const PROG_BR_ENCAP: &str = "br_encap";
/// The server's IPv6-side decapsulation in XDP (the plain case only; everything else passes to
/// [`PROG_SERVER_DECAP`]). Attached with `server --xdp`; measured by `cargo xtask bench`.
pub const PROG_SERVER_DECAP_XDP: &str = "server_decap_xdp";
/// The BR's IPv6-side decapsulation in XDP (the plain case only; everything else passes to
/// [`PROG_BR_DECAP`]). Attached with `br --xdp`; measured by `cargo xtask bench`.
pub const PROG_BR_DECAP_XDP: &str = "br_decap_xdp";
/// Run by the controller (BPF_PROG_TEST_RUN) to ask the FIB helper what the data path would
/// get for a destination ([`crate::nexthop::NextHopQuery`]); never attached.
pub const PROG_NEXTHOP_RESOLVE: &str = "nexthop_resolve";
/// A TC program that does nothing: the baseline of `cargo xtask bench`'s per-packet cost.
/// Never attached.
pub const PROG_BENCH_EMPTY: &str = "bench_empty";
/// An XDP program that does nothing: what an XDP run costs the bench's timer by itself.
/// Never attached.
pub const PROG_BENCH_EMPTY_XDP: &str = "bench_empty_xdp";

/// Program array of the log programs ([`LOG_PROGRAMS`], by index), which the programs above
/// tail-call to log a drop or a slow-path hand-off when logging is on (not pinned).
pub const LOG_PROGS: &str = "LOG_PROGS";
/// Per-CPU array with the one event a program hands to its log program.
pub const LOG_EVENT: &str = "LOG_EVENT";
/// Read-only global (u8): non-zero when the programs log (`-vv`). Set at load time, so that
/// the verifier removes every log call when it is 0.
pub const LOG_SWITCH: &str = "TUNNEL_LOG";
/// The log program of each program that logs, at its index in [`LOG_PROGS`] (`LOG_*` below).
pub const LOG_PROGRAMS: &[&str] = &[
    "log_server_decap",
    "log_server_encap",
    "log_client_decap",
    "log_client_encap",
    "log_ce_in",
    "log_ce_out",
    "log_br_decap",
    "log_br_encap",
];
pub const LOG_SERVER_DECAP: u32 = 0;
pub const LOG_SERVER_ENCAP: u32 = 1;
pub const LOG_CLIENT_DECAP: u32 = 2;
pub const LOG_CLIENT_ENCAP: u32 = 3;
pub const LOG_CE_IN: u32 = 4;
pub const LOG_CE_OUT: u32 = 5;
pub const LOG_BR_DECAP: u32 = 6;
pub const LOG_BR_ENCAP: u32 = 7;

/// Program array of the programs others tail-call ([`TAIL_PROGRAMS`], by index). Pinned, so
/// that a killed controller leaves it filled.
pub const TAIL_PROGS: &str = "TAIL_PROGS";
/// The programs of [`TAIL_PROGS`], at their indexes (`TAIL_*` below).
pub const TAIL_PROGRAMS: &[&str] = &[PROG_SERVER_DECAP_SOFTWIRE, PROG_SERVER_HAIRPIN];
/// Server, tail-called by [`PROG_SERVER_DECAP`] for a source no native client is bound to:
/// the lwAFTR's softwire checks, decapsulation and hairpinning.
pub const PROG_SERVER_DECAP_SOFTWIRE: &str = "server_decap_softwire";
pub const TAIL_SERVER_DECAP_SOFTWIRE: u32 = 0;
/// Server, tail-called by [`PROG_SERVER_DECAP_SOFTWIRE`] for a checked packet to another
/// softwire's address: re-encapsulation toward that B4 (RFC 7596 §7.1).
pub const PROG_SERVER_HAIRPIN: &str = "server_hairpin";
pub const TAIL_SERVER_HAIRPIN: u32 = 1;

/// Every map the controller expects to find in the object.
pub const ALL_MAPS: &[&str] = &[
    STATS_MAP,
    TUNNEL_CONFIG,
    BIND_BY_V6,
    BIND_CACHE,
    BIND_BY_V4,
    CLIENT_TRAFFIC,
    SOFTWIRES,
    SHARED_ADDRS,
    B4_ADDRS,
    AFTR_ADDRS,
    POLICY_EVENTS,
    POLICY_LAST,
    NAT_OUT,
    NAT_IN,
    BR_RULES,
    NEXTHOPS_V4,
    NEXTHOPS_V6,
    NEXTHOP_STATE,
    NEXTHOP_MISSES,
    NEXTHOP_MISS_LAST,
    CLOCK,
    LOG_PROGS,
    LOG_EVENT,
    TAIL_PROGS,
];
/// Every program the controller expects to find in the object.
pub const ALL_PROGRAMS: &[&str] = &[
    PROG_MONITOR_INGRESS,
    PROG_MONITOR_EGRESS,
    PROG_SERVER_DECAP,
    PROG_SERVER_ENCAP,
    PROG_CLIENT_ENCAP,
    PROG_CLIENT_DECAP,
    PROG_CE_OUT,
    PROG_LWB4_OUT,
    PROG_CE_IN,
    PROG_BR_DECAP,
    PROG_BR_ENCAP,
    PROG_SERVER_DECAP_XDP,
    PROG_BR_DECAP_XDP,
    PROG_BENCH_EMPTY,
    PROG_BENCH_EMPTY_XDP,
    PROG_NEXTHOP_RESOLVE,
    PROG_SERVER_DECAP_SOFTWIRE,
    PROG_SERVER_HAIRPIN,
];
