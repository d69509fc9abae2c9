//! Loading the embedded eBPF object.
use std::path::Path;

use anyhow::{Context as _, Result, bail};
use aya::{Ebpf, EbpfLoader};
use tunnel_common::names;

use super::bpffs;

/// The eBPF object built from `tunnel-ebpf` by build.rs; embedded so there is one file to ship.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tunnel"));

/// Loads the object. Maps declared as pinned are re-used from `pin_dir` when a previous run left
/// them there (that is how counters and bindings survive a controller restart) and pinned there
/// otherwise. Callers own the directory: `bpffs::remove_pins` on clean shutdown.
pub fn load(pin_dir: &Path) -> Result<Ebpf> {
    bpffs::ensure_mounted()?;
    bpffs::create_pin_dir(pin_dir)?;
    raise_memlock_limit();
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(pin_dir);
    let ebpf = loader
        .load(OBJECT)
        .context("loading the eBPF object (needs root or CAP_BPF + CAP_NET_ADMIN)")?;
    check_names(&ebpf)?;
    Ok(ebpf)
}

/// Fails when the object lacks a map or program that `tunnel_common::names` promises.
fn check_names(ebpf: &Ebpf) -> Result<()> {
    for map in names::ALL_MAPS {
        if ebpf.map(map).is_none() {
            bail!("eBPF object has no map {map}: tunnel-common and tunnel-ebpf disagree");
        }
    }
    for prog in names::ALL_PROGRAMS {
        if ebpf.program(prog).is_none() {
            bail!("eBPF object has no program {prog}: tunnel-common and tunnel-ebpf disagree");
        }
    }
    Ok(())
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; harmless on newer ones.
fn raise_memlock_limit() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer to a local.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
}
