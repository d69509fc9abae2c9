//! Leases saved in `--state-dir` so that a restarted server re-adopts them (SPEC §4: the fast
//! path is derived from the lease table, which must survive a controller restart).
//!
//! The file is JSON, written to a temporary name and renamed over the old one, so a crash
//! leaves either the old or the new version. A file that cannot be read or parsed (or is of
//! another version) is renamed aside with a warning and the server starts clean; a state
//! directory that cannot be written stops the start.
use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    time::SystemTime,
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use tracing::warn;

pub use super::state::SavedLease;

/// Format version; a file with another version is ignored with a warning.
const VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
struct File {
    version: u32,
    leases: Vec<SavedLease>,
}

/// Just the version of a lease file of any version.
#[derive(Deserialize)]
struct Version {
    version: u32,
}

/// `<dir>/<instance>.leases.json`.
pub fn path(dir: &Path, instance: &str) -> PathBuf {
    dir.join(format!("{instance}.leases.json"))
}

/// The saved leases; empty when there is no file. A file that cannot be read, parsed or is of
/// another format version (a newer release's, after a rollback) is kept: renamed to
/// `<name>.unreadable-<UTC time>` with a warning that names it, so that a clean start never
/// overwrites leases that someone may still want. `now` names the kept copy.
pub fn load(path: &Path, now: SystemTime) -> Vec<SavedLease> {
    let why = match fs::read_to_string(path) {
        // The version first: another version's leases may have another shape.
        Ok(text) => match serde_json::from_str::<Version>(&text) {
            Ok(Version { version }) if version != VERSION => {
                format!("it has format version {version} (this server reads and writes {VERSION})")
            }
            _ => match serde_json::from_str::<File>(&text) {
                Ok(f) => return f.leases,
                Err(e) => format!("it is not a lease file ({e})"),
            },
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => format!("it cannot be read ({e})"),
    };
    let kept = kept_name(path, now);
    match fs::rename(path, &kept) {
        Ok(()) => warn!(
            "{}: {why}; kept it as {} and starting without saved leases",
            path.display(),
            kept.display()
        ),
        Err(e) => warn!(
            "{}: {why}; could not keep it as {} ({e}); starting without saved leases",
            path.display(),
            kept.display()
        ),
    }
    Vec::new()
}

/// `<path>.unreadable-YYYYMMDDTHHMMSSZ`.
fn kept_name(path: &Path, now: SystemTime) -> PathBuf {
    let stamp: String = humantime::format_rfc3339_seconds(now)
        .to_string()
        .chars()
        .filter(|c| !matches!(c, '-' | ':'))
        .collect();
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".unreadable-{stamp}"));
    PathBuf::from(name)
}

/// Fails unless leases can be saved in `dir` (created if missing): a server that cannot save
/// would lose every lease at its next restart, so it must not start.
pub fn ensure_writable(dir: &Path) -> Result<()> {
    let hint = "pass a writable --state-dir";
    fs::create_dir_all(dir).with_context(|| {
        format!(
            "state directory {} cannot be created; {hint}",
            dir.display()
        )
    })?;
    let probe = dir.join(format!(".write-test-{}", std::process::id()));
    fs::File::create(&probe)
        .and_then(|mut f| f.write_all(b"x").and_then(|()| f.sync_all()))
        .with_context(|| format!("state directory {} is not writable; {hint}", dir.display()))?;
    let _ = fs::remove_file(&probe);
    Ok(())
}

/// Writes the leases atomically (temporary file + fsync + rename).
pub fn save(path: &Path, leases: &[SavedLease]) -> Result<()> {
    let text = serde_json::to_vec_pretty(&File {
        version: VERSION,
        leases: leases.to_vec(),
    })?;
    write_atomic(path, &text)
}

/// Writes `bytes` to `path` so that a crash leaves the old or the new file whole: a temporary
/// file beside it, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::state::Mode;

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
            psid: None,
            psid_len: None,
            psid_offset: None,
        }];
        save(&p, &leases).unwrap();
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_795_000_000);
        assert_eq!(load(&p, now), leases);
        // Garbage, and a newer version's file: each kept under a timestamped name, byte for
        // byte, and the start is clean.
        let kept = dir.join("t.leases.json.unreadable-20261118T110640Z");
        for text in [
            "{ not json",
            r#"{"version": 2, "leases": [{"ipv4": "198.51.100.2", "psid": 3}]}"#,
        ] {
            fs::write(&p, text).unwrap();
            assert!(load(&p, now).is_empty());
            assert!(!p.exists());
            assert_eq!(fs::read_to_string(&kept).unwrap(), text);
            fs::remove_file(&kept).unwrap();
        }
        assert!(load(&dir.join("missing.json"), now).is_empty());
        ensure_writable(&dir).unwrap();
        assert_eq!(
            fs::read_dir(&dir).unwrap().count(),
            0,
            "the probe is removed"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
