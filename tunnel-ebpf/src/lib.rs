//! Helpers shared by the eBPF programs. The programs themselves are in `main.rs` (the `tunnel`
//! binary, built for `bpfel-unknown-none`).
#![no_std]
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

pub mod direct;
pub mod encap;
pub mod head;
pub mod log;
pub mod maps;
pub mod mss;
pub mod nat;
pub mod nexthop;
pub mod packet;
pub mod route;
pub mod softwire;
pub mod stats;
