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
    if private_mount_namespace() {
        // `ip netns exec` gives the process its own mount namespace and a fresh /sys: the
        // bpffs mounted here is private, and the pins die with the process, so a crash or
        // restart stops forwarding instead of being bridged by the pinned programs.
        warn!(
            "{BPFFS_ROOT} is not the host's BPF filesystem: this process has a mount namespace \
             of its own (started with `ip netns exec`?). The bpffs mounted here is private, so \
             pinned programs and maps die with the process. Start it with \
             `nsenter --net=/run/netns/NAME tunnel-ctl ...` instead, which keeps the host's /sys"
        );
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

/// Whether this process runs with a /sys of its own, so that a bpffs it mounts is private:
/// its mount namespace differs from init's (pid 1, when that can be read), or /sys is the
/// sysfs that `ip netns exec` mounts (named after the network namespace, not "sysfs").
pub fn private_mount_namespace() -> bool {
    if let (Ok(ours), Ok(init)) = (
        fs::read_link("/proc/self/ns/mnt"),
        fs::read_link("/proc/1/ns/mnt"),
    ) && ours != init
    {
        return true;
    }
    fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|info| mount_source(&info, "/sys"))
        .is_some_and(|source| source != "sysfs")
}

/// The source of the mount at `point` in a /proc/self/mountinfo text (the last one wins, as
/// later mounts hide earlier ones): the field after the filesystem type behind " - ".
fn mount_source(mountinfo: &str, point: &str) -> Option<String> {
    mountinfo
        .lines()
        .rev()
        .filter(|l| l.split(' ').nth(4) == Some(point))
        .find_map(|l| l.split_once(" - ")?.1.split(' ').nth(1).map(str::to_owned))
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

/// Removes the pins that an earlier run of this instance left in `dir` although the daemon
/// now starts without what made them (e.g. a server restarted without native mode): the
/// pinned links would keep forwarding for bindings nobody owns. Logs what it removed and
/// why; returns how many pins went.
pub fn remove_stale(dir: &Path, why: &str) -> Result<usize> {
    let names = pin_names(dir)?;
    if names.is_empty() {
        return Ok(0);
    }
    warn!(
        "removing {} pins left in {} ({}): {why}",
        names.len(),
        dir.display(),
        names.join(" ")
    );
    remove_pins(dir)?;
    Ok(names.len())
}

/// Removes the link pins (`link_*`) in `dir` other than `keep`: links of an earlier run on
/// interfaces this run does not use. Returns their names.
pub fn remove_other_links(dir: &Path, keep: &[String]) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for name in pin_names(dir)? {
        if name.starts_with("link_") && !keep.contains(&name) {
            fs::remove_file(dir.join(&name))
                .with_context(|| format!("removing pin {}", dir.join(&name).display()))?;
            removed.push(name);
        }
    }
    if !removed.is_empty() {
        warn!(
            "removed pinned links of an earlier run that this configuration does not attach: {}",
            removed.join(" ")
        );
    }
    Ok(removed)
}

/// The names of the pins in `dir`, sorted (none when it does not exist).
fn pin_names(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    match fs::read_dir(dir) {
        Ok(entries) => {
            for entry in entries {
                names.push(entry?.file_name().to_string_lossy().into_owned());
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    }
    names.sort();
    Ok(names)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain files stand in for pins: only `link_*` pins other than `keep` go.
    #[test]
    fn links_of_other_interfaces_are_removed_and_maps_kept() {
        let dir = std::env::temp_dir().join(format!("tunnel-bpffs-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        for name in [
            "link_server_decap_up6",
            "link_server_encap_old0",
            "BIND_BY_V4",
        ] {
            fs::write(dir.join(name), "").unwrap();
        }
        let removed = remove_other_links(&dir, &["link_server_decap_up6".to_owned()]).unwrap();
        assert_eq!(removed, ["link_server_encap_old0"]);
        assert_eq!(
            pin_names(&dir).unwrap(),
            ["BIND_BY_V4", "link_server_decap_up6"]
        );
        assert_eq!(remove_stale(&dir, "test").unwrap(), 2);
        assert!(!dir.exists());
        assert_eq!(
            remove_stale(&dir, "test").unwrap(),
            0,
            "nothing there: nothing to do"
        );
    }

    #[test]
    fn the_sysfs_of_ip_netns_exec_is_told_apart() {
        let host = "23 27 0:22 / /sys rw,relatime - sysfs sysfs rw\n\
                    52 23 0:40 / /sys/fs/bpf rw,nosuid - bpf bpf rw,mode=700\n";
        assert_eq!(mount_source(host, "/sys").as_deref(), Some("sysfs"));
        let netns_exec = "23 27 0:22 / /sys rw,relatime - sysfs sysfs rw\n\
                          51 48 0:41 / /sys rw,relatime - sysfs tnl-probe rw\n";
        assert_eq!(
            mount_source(netns_exec, "/sys").as_deref(),
            Some("tnl-probe")
        );
        assert_eq!(mount_source(host, "/nowhere"), None);
    }
}
