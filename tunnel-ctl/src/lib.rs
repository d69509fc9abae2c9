//! `tunnel-ctl`: the controller of the tunnel. One binary runs the daemons (server, client, MAP-E
//! CE/BR, the monitor) and the management commands that talk to them.
//!
//! The library half exists so that the integration tests can load the same embedded eBPF object
//! and speak the same management protocol as the binary.

pub mod cli;
pub mod client;
pub mod config;
pub(crate) mod counters;
pub mod daemon;
pub mod dataplane;
pub(crate) mod dns;
#[doc(hidden)]
pub mod fuzzing;
pub mod instance;
pub mod mape;
pub(crate) mod metrics;
pub mod mgmt;
pub mod monitor;
pub mod netlink;
pub mod nexthop;
pub(crate) mod packet;
pub(crate) mod pool;
pub(crate) mod pool6;
pub(crate) mod protocol;
pub mod report;
pub mod server;
pub(crate) mod softwire;
pub(crate) mod systemd;
pub(crate) mod tundev;
pub mod usage;
