//! The port log (`mape ce --port-log FILE`): one JSON line per NAPT mapping made and ended,
//! so that an operator can answer an abuse request ("who used external port P at time T").
//! The file is rotated by size (`FILE` → `FILE.1`); `tunnel-ctl portlog` answers from both.
use std::{
    fs::{self, File, OpenOptions},
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    sync::Mutex,
    time::SystemTime,
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use tracing::warn;

use super::table::{Entry, proto_name};

/// One line of the log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// RFC 3339, UTC, microseconds.
    pub time: String,
    /// `start` or `end`.
    pub event: String,
    pub proto: String,
    /// The LAN endpoint (address:port; the ICMP echo id as the port).
    pub lan: String,
    pub external_port: u16,
    /// The remote endpoint; null for mappings any remote may use (forwards, endpoint-
    /// independent UDP).
    pub remote: Option<String>,
    /// `dynamic`, `endpoint-independent` or `forward`.
    pub kind: String,
    /// Why it ended (`idle`, `removed`, `not taken back at a restart`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Event {
    pub fn of(entry: &Entry, start: bool, reason: Option<&str>, at: SystemTime) -> Event {
        Event {
            time: humantime::format_rfc3339_micros(at).to_string(),
            event: if start { "start" } else { "end" }.into(),
            proto: proto_name(entry.proto()).into(),
            lan: entry.lan().to_string(),
            external_port: entry.ext_port,
            remote: entry.remote().map(|r| r.to_string()),
            kind: entry.kind.as_str().into(),
            reason: reason.map(str::to_owned),
        }
    }

    /// The same mapping (all but time, event and reason).
    fn same_mapping(&self, other: &Event) -> bool {
        (
            &self.proto,
            &self.lan,
            self.external_port,
            &self.remote,
            &self.kind,
        ) == (
            &other.proto,
            &other.lan,
            other.external_port,
            &other.remote,
            &other.kind,
        )
    }
}

/// The open log file and its size.
pub struct PortLog {
    path: PathBuf,
    max_bytes: u64,
    file: Mutex<(File, u64)>,
}

/// `FILE.1`.
fn rotated(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

impl PortLog {
    /// Opens `path` for appending (created if missing).
    pub fn open(path: &Path, max_bytes: u64) -> Result<PortLog> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("--port-log {}", path.display()))?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(PortLog {
            path: path.to_owned(),
            max_bytes,
            file: Mutex::new((file, size)),
        })
    }

    /// Appends one line (and rotates first when the file has reached its size). A write
    /// error is logged, never fatal: the NAPT goes on.
    pub fn record(&self, event: &Event) {
        let mut line = serde_json::to_vec(event).unwrap_or_default();
        line.push(b'\n');
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if f.1 + line.len() as u64 > self.max_bytes && f.1 > 0 {
            match self.rotate() {
                Ok(file) => *f = (file, 0),
                Err(e) => warn!("rotating the port log {}: {e:#}", self.path.display()),
            }
        }
        match f.0.write_all(&line) {
            Ok(()) => f.1 += line.len() as u64,
            Err(e) => warn!("writing the port log {}: {e}", self.path.display()),
        }
    }

    fn rotate(&self) -> Result<File> {
        fs::rename(&self.path, rotated(&self.path))?;
        Ok(OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?)
    }
}

/// One mapping's life as the log tells it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Use {
    pub proto: String,
    pub lan: String,
    pub external_port: u16,
    pub remote: Option<String>,
    pub kind: String,
    pub start: String,
    /// None: still in use when the log ends.
    pub end: Option<String>,
}

/// The mappings of external `port` (and `proto`, if given) in use at `at`, from `FILE.1` and
/// `FILE`.
pub fn query(path: &Path, port: u16, proto: Option<&str>, at: SystemTime) -> Result<Vec<Use>> {
    let mut events = Vec::new();
    let mut found = false;
    for p in [rotated(path), path.to_owned()] {
        let f = match File::open(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
        };
        found = true;
        for (n, line) in BufReader::new(f).lines().enumerate() {
            let line = line.with_context(|| format!("reading {}", p.display()))?;
            if line.trim().is_empty() {
                continue;
            }
            let e: Event = serde_json::from_str(&line)
                .with_context(|| format!("{} line {}: not a port log line", p.display(), n + 1))?;
            if e.external_port == port && proto.is_none_or(|p| p == e.proto) {
                events.push(e);
            }
        }
    }
    if !found {
        anyhow::bail!(
            "{}: no such port log (nor {})",
            path.display(),
            rotated(path).display()
        );
    }
    let mut uses: Vec<Use> = Vec::new();
    for e in events {
        if e.event == "start" {
            uses.push(Use {
                proto: e.proto,
                lan: e.lan,
                external_port: e.external_port,
                remote: e.remote,
                kind: e.kind,
                start: e.time,
                end: None,
            });
        } else if let Some(u) = uses.iter_mut().rev().find(|u| {
            u.end.is_none()
                && e.same_mapping(&Event {
                    time: String::new(),
                    event: String::new(),
                    proto: u.proto.clone(),
                    lan: u.lan.clone(),
                    external_port: u.external_port,
                    remote: u.remote.clone(),
                    kind: u.kind.clone(),
                    reason: None,
                })
        }) {
            u.end = Some(e.time);
        }
    }
    let t = |s: &str| humantime::parse_rfc3339_weak(s).ok();
    Ok(uses
        .into_iter()
        .filter(|u| {
            t(&u.start).is_some_and(|s| s <= at)
                && u.end
                    .as_deref()
                    .is_none_or(|e| t(e).is_some_and(|e| e >= at))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddrV4, time::Duration};

    use tunnel_common::mape::NatKey;

    use super::*;
    use crate::mape::table::Kind;

    fn entry(lan: &str, port: u16) -> Entry {
        let lan: SocketAddrV4 = lan.parse().unwrap();
        let out_key = NatKey {
            local_ip: tunnel_common::fastpath::v4_key(*lan.ip()),
            remote_ip: tunnel_common::fastpath::v4_key(std::net::Ipv4Addr::new(192, 0, 2, 1)),
            local_port: lan.port(),
            remote_port: 80,
            proto: 6,
            _pad: [0; 3],
        };
        Entry {
            out_key,
            in_key: out_key,
            ext_port: port,
            kind: Kind::Dynamic,
            created_ns: 0,
        }
    }

    #[test]
    fn who_used_a_port_when_across_a_rotation() {
        let dir = std::env::temp_dir().join(format!("tunnel-portlog-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ports.log");
        let _ = fs::remove_file(&path);
        let _ = fs::remove_file(rotated(&path));
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let at = |s| t0 + Duration::from_secs(s);
        // Small enough that the second mapping's lines rotate the first ones out.
        let log = PortLog::open(&path, 400).unwrap();
        let a = entry("203.0.113.10:5000", 4100);
        let b = entry("203.0.113.11:6000", 4100);
        log.record(&Event::of(&a, true, None, at(0)));
        log.record(&Event::of(&a, false, Some("idle"), at(100)));
        log.record(&Event::of(&b, true, None, at(200)));
        assert!(rotated(&path).exists(), "rotated by size");
        let who = |s| query(&path, 4100, Some("tcp"), at(s)).unwrap();
        assert_eq!(
            who(50).iter().map(|u| u.lan.as_str()).collect::<Vec<_>>(),
            ["203.0.113.10:5000"]
        );
        assert!(who(150).is_empty(), "nobody between the two");
        let now = who(300);
        assert_eq!(now.len(), 1);
        assert_eq!(
            (now[0].lan.as_str(), now[0].end.as_ref()),
            ("203.0.113.11:6000", None)
        );
        assert!(query(&path, 4101, None, at(50)).unwrap().is_empty());
        let _ = fs::remove_dir_all(&dir);
    }
}
