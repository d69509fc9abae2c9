//! `cargo xtask install`: the binary (eBPF object embedded) and example systemd units.
use std::{fs, os::unix::fs::PermissionsExt as _, path::Path};

use anyhow::{Context as _, Result};

use crate::{build_bin, root};

pub fn run(prefix: &Path) -> Result<()> {
    let bin = build_bin(true)?;
    let bin_dir = prefix.join("bin");
    let unit_dir = prefix.join("lib/systemd/system");
    fs::create_dir_all(&bin_dir).with_context(|| format!("creating {}", bin_dir.display()))?;
    fs::create_dir_all(&unit_dir).with_context(|| format!("creating {}", unit_dir.display()))?;

    let target = bin_dir.join("tunnel-ctl");
    // Copy to a temporary name and rename, so a running daemon's binary is never half-written.
    let tmp = bin_dir.join(".tunnel-ctl.new");
    fs::copy(&bin, &tmp).with_context(|| format!("copying to {}", tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))?;
    fs::rename(&tmp, &target)?;
    println!("installed {}", target.display());

    for entry in fs::read_dir(root().join("dist/systemd"))? {
        let src = entry?.path();
        let Some(name) = src.file_name() else {
            continue;
        };
        let text = fs::read_to_string(&src)?.replace("@BINDIR@", &bin_dir.to_string_lossy());
        let dst = unit_dir.join(name);
        fs::write(&dst, text).with_context(|| format!("writing {}", dst.display()))?;
        println!("installed {} (example unit)", dst.display());
    }
    Ok(())
}
