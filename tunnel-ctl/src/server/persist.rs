//! Leases saved in `--state-dir` so that a restarted server re-adopts them (SPEC §4: the fast
//! path is derived from the lease table, which must survive a controller restart).
//!
//! The file is JSON, written to a temporary name and renamed over the old one, so a crash
//! leaves either the old or the new version. A file that cannot be read or parsed gives a
//! warning and a clean start, never a refusal to start.
use std::{
    fs,
    io::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use tracing::warn;

use super::state::Mode;

/// Format version; a file with another version is ignored with a warning.
const VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedLease {
    pub ipv4: Ipv4Addr,
    pub client: IpAddr,
    pub mode: Mode,
    /// RFC 3339.
    pub since: String,
    /// The native binding's client endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<Ipv6Addr>,
}

#[derive(Debug, Serialize, Deserialize)]
struct File {
    version: u32,
    leases: Vec<SavedLease>,
}

/// `<dir>/<instance>.leases.json`.
pub fn path(dir: &Path, instance: &str) -> PathBuf {
    dir.join(format!("{instance}.leases.json"))
}

/// The saved leases; empty (with a warning) when the file is missing, unreadable or foreign.
pub fn load(path: &Path) -> Vec<SavedLease> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            warn!(
                "cannot read {}: {e}; starting without saved leases",
                path.display()
            );
            return Vec::new();
        }
    };
    match serde_json::from_str::<File>(&text) {
        Ok(f) if f.version == VERSION => f.leases,
        Ok(f) => {
            warn!(
                "{} has format version {} (this server writes {VERSION}); ignoring it",
                path.display(),
                f.version
            );
            Vec::new()
        }
        Err(e) => {
            warn!("{} is not a lease file ({e}); ignoring it", path.display());
            Vec::new()
        }
    }
}

/// Writes the leases atomically (temporary file + fsync + rename).
pub fn save(path: &Path, leases: &[SavedLease]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_vec_pretty(&File {
        version: VERSION,
        leases: leases.to_vec(),
    })?;
    let mut f = fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(&text)?;
    f.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bad_files_give_a_clean_start() {
        let dir = std::env::temp_dir().join(format!("tunnel-persist-{}", std::process::id()));
        let p = path(&dir, "t");
        let leases = vec![SavedLease {
            ipv4: "198.51.100.2".parse().unwrap(),
            client: "2001:db8:1::2".parse().unwrap(),
            mode: Mode::Native,
            since: "2026-11-23T10:00:00Z".into(),
            tunnel: Some("2001:db8:1::2".parse().unwrap()),
        }];
        save(&p, &leases).unwrap();
        assert_eq!(load(&p), leases);
        fs::write(&p, "{ not json").unwrap();
        assert!(load(&p).is_empty());
        fs::write(&p, r#"{"version": 99, "leases": []}"#).unwrap();
        assert!(load(&p).is_empty());
        assert!(load(&dir.join("missing.json")).is_empty());
        fs::remove_dir_all(&dir).unwrap();
    }
}
