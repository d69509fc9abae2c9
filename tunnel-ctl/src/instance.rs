//! An instance is one running daemon. Its name picks the management socket and the pin
//! directory, so several daemons can share a host (SPEC §10).
use std::path::PathBuf;

use anyhow::{Result, bail};

/// Where management sockets live.
pub const RUN_DIR: &str = "/run/tunnel";
/// Where the instances' maps and links are pinned (under the bpffs mount).
pub const PIN_ROOT: &str = "/sys/fs/bpf/tunnel";
/// The instance used when `--instance` is not given.
pub const DEFAULT_INSTANCE: &str = "default";

/// A validated instance name and the paths derived from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    name: String,
}

impl Instance {
    /// Accepts 1-64 characters of `[A-Za-z0-9_.-]`, not starting with `.` or `-`.
    pub fn new(name: &str) -> Result<Self> {
        let valid_chars = name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if name.is_empty()
            || name.len() > 64
            || !valid_chars
            || name.starts_with('.')
            || name.starts_with('-')
        {
            bail!(
                "invalid instance name {name:?}: use 1-64 letters, digits, '_', '-' or '.', \
                 not starting with '.' or '-'"
            );
        }
        Ok(Self {
            name: name.to_owned(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/tunnel/NAME.sock`
    pub fn socket_path(&self) -> PathBuf {
        PathBuf::from(RUN_DIR).join(format!("{}.sock", self.name))
    }

    /// `/sys/fs/bpf/tunnel/NAME`
    pub fn pin_dir(&self) -> PathBuf {
        PathBuf::from(PIN_ROOT).join(&self.name)
    }
}

/// clap value parser for `--instance`.
pub fn parse_instance(s: &str) -> Result<Instance, String> {
    Instance::new(s).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_follow_the_name() {
        let i = Instance::new("lab-1").unwrap();
        assert_eq!(i.socket_path(), PathBuf::from("/run/tunnel/lab-1.sock"));
        assert_eq!(i.pin_dir(), PathBuf::from("/sys/fs/bpf/tunnel/lab-1"));
    }

    #[test]
    fn rejects_names_that_escape_the_directories() {
        for bad in ["", "../x", "a/b", ".hidden", "-x", &"x".repeat(65)] {
            assert!(Instance::new(bad).is_err(), "{bad:?} accepted");
        }
    }
}
