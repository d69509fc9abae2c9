//! Types and names shared by the eBPF programs (`tunnel-ebpf`) and the controller (`tunnel-ctl`).
//!
//! Everything that both sides must agree on lives here and only here: map and program names,
//! counter indices, and the `#[repr(C)]` layouts of map keys and values.
#![no_std]

pub mod fastpath;
pub mod mape;
pub mod names;
pub mod nexthop;
pub mod stats;
