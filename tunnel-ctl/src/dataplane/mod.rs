//! Everything that touches the kernel's BPF side: the embedded object, bpffs and pins, TC
//! attachment, map reads and writes. One handle per role ([`server`], [`client`], [`ce`],
//! [`br`]) loads and attaches that role's programs and is the only code that writes its maps;
//! the rest of the controller goes through these handles.

pub mod batch;
pub mod bindcache;
pub mod bpffs;
pub mod br;
pub mod ce;
pub mod client;
pub mod fastpath;
pub mod loader;
pub mod nat;
pub mod nexthop;
pub mod server;
pub mod softwires;
pub mod stats;
pub mod tc;

pub use loader::{NAT_MAPS, OBJECT, SERVER_MAPS, load, load_sized, load_without, log_ebpf_debug};
