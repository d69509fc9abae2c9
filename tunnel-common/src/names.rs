//! Names of maps and programs in the eBPF object.
//!
//! aya names a map after its `static` in `tunnel-ebpf` and a program after its function, so the
//! eBPF side must use these exact identifiers; `tunnel-ctl` has a test that loads the object and
//! checks that every name below exists in it.

/// Per-CPU array of `u64` counters, indexed by [`crate::stats::Counter`].
pub const STATS_MAP: &str = "TUNNEL_STATS";

/// TC program that classifies and counts packets on ingress (no rewriting).
pub const PROG_MONITOR_INGRESS: &str = "monitor_ingress";
/// TC program that classifies and counts packets on egress (no rewriting).
pub const PROG_MONITOR_EGRESS: &str = "monitor_egress";

/// Every map the controller expects to find in the object.
pub const ALL_MAPS: &[&str] = &[STATS_MAP];
/// Every program the controller expects to find in the object.
pub const ALL_PROGRAMS: &[&str] = &[PROG_MONITOR_INGRESS, PROG_MONITOR_EGRESS];
