//! Everything that touches the kernel's BPF side: the embedded object, bpffs and pins, TC
//! attachment and map reads. The rest of the controller goes through this module.

pub mod bpffs;
pub mod fastpath;
pub mod loader;
pub mod nat;
pub mod stats;
pub mod tc;

pub use loader::{OBJECT, load, load_sized};
