//! Where leases live beyond the process (`--lease-store`): the lease file of one machine, or
//! PostgreSQL shared by several concentrators that serve one pool (issue 22).
//!
//! The lease table ([`super::state::State`]) stays the server's source of truth for what it
//! holds; the store answers what the table cannot know alone:
//! - which address a new lease gets ([`LeaseStore::claim`]): the file store leaves that to
//!   the table's pool, PostgreSQL picks it in one transaction so that no address is leased
//!   by two concentrators and a client that fails over gets its address back;
//! - what a restarted server re-adopts ([`LeaseStore::restore`]);
//! - who held an address when ([`LeaseStore::history`], both backends).
use std::{
    fs,
    io::Write as _,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use tracing::warn;

use super::{persist, state::Ended};

pub mod postgres;

/// One lease in the history: who held `ipv4` (and PSID) from `start` to `end` (None: still
/// held), on which concentrator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryRow {
    pub ipv4: Ipv4Addr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psid: Option<u16>,
    pub client: String,
    pub node: String,
    /// RFC 3339.
    pub start: String,
    pub end: Option<String>,
}

impl HistoryRow {
    /// Whether the row is of `ipv4` (if given) and covers `at` (if given).
    pub fn matches(&self, ipv4: Option<Ipv4Addr>, at: Option<SystemTime>) -> bool {
        if ipv4.is_some_and(|a| a != self.ipv4) {
            return false;
        }
        let Some(at) = at else { return true };
        let parse = |t: &str| humantime::parse_rfc3339(t).ok();
        parse(&self.start).is_some_and(|s| s <= at)
            && self
                .end
                .as_deref()
                .is_none_or(|e| parse(e).is_none_or(|e| at < e))
    }
}

/// What the shared store answered to a lease request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The file store: the table's pool picks.
    Local,
    /// This address (claimed for the client in the store).
    Picked(Ipv4Addr),
    /// Every address of the pool is leased (across all concentrators).
    Exhausted,
    /// The client's address is still held by another concentrator (whose session has not
    /// ended yet, or which died less than its expiry ago): the 110 text.
    HeldElsewhere(String),
    /// The store cannot be reached: the 110 text.
    Unavailable(String),
}

/// `--lease-store`.
pub enum LeaseStore {
    File(FileStore),
    Postgres(Arc<postgres::PgStore>),
}

impl LeaseStore {
    /// What `status` shows.
    pub fn describe(&self) -> String {
        match self {
            LeaseStore::File(f) => format!("file {}", f.leases.display()),
            LeaseStore::Postgres(pg) => pg.describe(),
        }
    }

    /// Records leases that ended: the history, and for PostgreSQL their release.
    pub fn ended(&self, ended: &[Ended]) {
        match self {
            LeaseStore::File(f) => f.append_history(ended),
            LeaseStore::Postgres(pg) => pg.released(ended),
        }
    }

    /// Whether the table must be written to the lease file after a change.
    pub fn file(&self) -> Option<&FileStore> {
        match self {
            LeaseStore::File(f) => Some(f),
            LeaseStore::Postgres(_) => None,
        }
    }
}

/// The lease file and the history file in `--state-dir`.
pub struct FileStore {
    pub leases: PathBuf,
    pub history: PathBuf,
    node: String,
    /// Appends take turns.
    lock: Mutex<()>,
}

impl FileStore {
    pub fn new(dir: &Path, instance: &str, node: String) -> FileStore {
        FileStore {
            leases: persist::path(dir, instance),
            history: dir.join(format!("{instance}.history.jsonl")),
            node,
            lock: Mutex::new(()),
        }
    }

    fn append_history(&self, ended: &[Ended]) {
        if ended.is_empty() {
            return;
        }
        let end = humantime::format_rfc3339_micros(SystemTime::now()).to_string();
        let mut text = Vec::new();
        for e in ended {
            let row = HistoryRow {
                ipv4: e.ipv4,
                psid: e.psid,
                client: e.client.to_string(),
                node: self.node.clone(),
                start: humantime::format_rfc3339_micros(e.since).to_string(),
                end: Some(end.clone()),
            };
            if let Ok(line) = serde_json::to_string(&row) {
                text.extend_from_slice(line.as_bytes());
                text.push(b'\n');
            }
        }
        let _turn = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let written = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.history)
            .and_then(|mut f| f.write_all(&text));
        if let Err(e) = written {
            warn!("lease history {}: {e}", self.history.display());
        }
    }

    /// The history file's rows that match (lines that do not parse are skipped).
    pub fn history(
        &self,
        ipv4: Option<Ipv4Addr>,
        at: Option<SystemTime>,
    ) -> Result<Vec<HistoryRow>> {
        let text = match fs::read_to_string(&self.history) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => {
                return Err(e).with_context(|| format!("reading {}", self.history.display()));
            }
        };
        Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str::<HistoryRow>(l).ok())
            .filter(|r| r.matches(ipv4, at))
            .collect())
    }

    pub fn node(&self) -> &str {
        &self.node
    }
}

/// The current leases as open history rows (the file store's history has only ended ones).
pub fn open_rows(rows: &[crate::mgmt::api::LeaseRow], node: &str) -> Vec<HistoryRow> {
    rows.iter()
        .map(|r| HistoryRow {
            ipv4: r.ipv4,
            psid: r.psid,
            client: r.client.clone(),
            node: node.to_owned(),
            start: r.since.clone(),
            end: None,
        })
        .collect()
}

/// `--node-id`, else the host name.
pub fn node_id(given: Option<&str>) -> String {
    match given {
        Some(n) => n.to_owned(),
        None => fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "tunnel".into()),
    }
}

/// A client's key in the store: its address, IPv4 clients as IPv4.
pub fn client_key(peer: IpAddr) -> IpAddr {
    peer.to_canonical()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(start: &str, end: Option<&str>) -> HistoryRow {
        HistoryRow {
            ipv4: "198.51.100.7".parse().unwrap(),
            psid: None,
            client: "2001:db8:1::2".into(),
            node: "a".into(),
            start: start.into(),
            end: end.map(Into::into),
        }
    }

    #[test]
    fn a_history_row_covers_its_interval_only() {
        let t = |s: &str| humantime::parse_rfc3339(s).unwrap();
        let r = row("2026-12-01T10:00:00Z", Some("2026-12-01T11:00:00Z"));
        let a = Some("198.51.100.7".parse().unwrap());
        assert!(r.matches(a, Some(t("2026-12-01T10:30:00Z"))));
        assert!(r.matches(a, Some(t("2026-12-01T10:00:00Z"))));
        assert!(!r.matches(a, Some(t("2026-12-01T11:00:00Z"))));
        assert!(!r.matches(a, Some(t("2026-12-01T09:59:59Z"))));
        assert!(!r.matches(Some("198.51.100.8".parse().unwrap()), None));
        assert!(row("2026-12-01T10:00:00Z", None).matches(a, Some(t("2027-01-01T00:00:00Z"))));
    }

    #[test]
    fn the_file_history_keeps_ended_leases() {
        let dir = std::env::temp_dir().join(format!("tunnel-history-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let store = FileStore::new(&dir, "t", "node-a".into());
        let since = SystemTime::now() - std::time::Duration::from_secs(60);
        store.append_history(&[Ended {
            ipv4: "198.51.100.7".parse().unwrap(),
            tunnel: None,
            psid: None,
            client: "2001:db8:1::2".parse().unwrap(),
            since,
        }]);
        let rows = store
            .history(
                Some("198.51.100.7".parse().unwrap()),
                Some(since + std::time::Duration::from_secs(30)),
            )
            .unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].client, "2001:db8:1::2");
        assert_eq!(rows[0].node, "node-a");
        assert!(
            store
                .history(Some("198.51.100.8".parse().unwrap()), None)
                .unwrap()
                .is_empty()
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
