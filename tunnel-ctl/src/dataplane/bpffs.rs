//! The BPF filesystem: make sure it is mounted, and remove an instance's pins.
use std::{
    fs, io,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use nix::{
    mount::{MsFlags, mount},
    sys::statfs::statfs,
};
use tracing::{info, warn};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// The conventional bpffs mount point.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// Mounts bpffs on /sys/fs/bpf when nothing is mounted there (minimal systems, containers).
pub fn ensure_mounted() -> Result<()> {
    let root = Path::new(BPFFS_ROOT);
    let st = statfs(root).with_context(|| format!("statfs {BPFFS_ROOT}"))?;
    if st.filesystem_type().0 == BPF_FS_MAGIC {
        return Ok(());
    }
    info!("{BPFFS_ROOT} is not a BPF filesystem; mounting bpffs there");
    mount(
        Some("bpf"),
        root,
        Some("bpf"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=0700"),
    )
    .with_context(|| {
        format!("mounting bpffs on {BPFFS_ROOT} (run as root, or mount it: mount -t bpf bpf {BPFFS_ROOT})")
    })?;
    Ok(())
}

/// Removes every pin under `dir` and the directory itself, then its parent if that is left
/// empty. Removing a link's pin detaches the program once no process holds the link any more.
pub fn remove_pins(dir: &Path) -> Result<()> {
    match fs::read_dir(dir) {
        Ok(entries) => {
            for entry in entries {
                let path = entry?.path();
                if let Err(e) = fs::remove_file(&path) {
                    warn!("could not remove pin {}: {e}", path.display());
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    }
    fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))?;
    if let Some(parent) = dir.parent() {
        // Only succeeds when no other instance has pins left.
        let _ = fs::remove_dir(parent);
    }
    Ok(())
}

/// Creates `dir` (and parents) for pins.
pub fn create_pin_dir(dir: &Path) -> Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| format!("creating pin directory {}", dir.display()))?;
    Ok(dir.to_path_buf())
}

/// Removes an instance's pins when dropped: on every exit path except SIGKILL (then the pinned
/// links keep the programs attached and the next start re-adopts them). None: nothing pinned.
pub struct PinGuard(pub Option<PathBuf>);

impl Drop for PinGuard {
    fn drop(&mut self) {
        if let Some(dir) = &self.0
            && let Err(e) = remove_pins(dir)
        {
            warn!("removing pins: {e:#}");
        }
    }
}
