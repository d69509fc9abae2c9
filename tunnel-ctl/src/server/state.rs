//! The lease table and the pool: the server's single source of truth.
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Instant, SystemTime},
};

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::pool::Pool;

/// How a client's traffic flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Inband,
    Native,
}

/// What a session registers when it gets an address.
#[derive(Clone, Debug)]
pub struct SessionHandle {
    pub id: u64,
    pub peer: IpAddr,
    /// 103 packets for this session.
    pub tx: mpsc::Sender<Bytes>,
    /// Server-relative ms of the last frame received.
    pub last_rx: Arc<AtomicU64>,
    /// Closes the session (takeover by a reconnecting client).
    pub cancel: CancellationToken,
}

#[derive(Debug)]
pub struct Lease {
    pub session: SessionHandle,
    pub since: SystemTime,
    pub mode: Mode,
}

/// One row of `tunnel-ctl leases --json`.
#[derive(Debug, Serialize)]
pub struct LeaseRow {
    pub ipv4: Ipv4Addr,
    pub client: String,
    pub mode: Mode,
    pub since: String,
    pub session: u64,
}

pub struct State {
    pub pool: Pool,
    leases: HashMap<Ipv4Addr, Lease>,
    pub sessions: usize,
}

/// The outcome of a lease request.
pub enum Grant {
    New(Ipv4Addr),
    /// Taken over from a silent earlier session of the same client.
    TakenOver(Ipv4Addr, u64),
    Exhausted,
}

impl State {
    pub fn new(pool: Pool) -> State {
        State {
            pool,
            leases: HashMap::new(),
            sessions: 0,
        }
    }

    /// An address for `session`. If a silent (no frame for `stale_ms`) session of the same
    /// client still holds one, that session is cancelled and its address moves over, so a
    /// client that reconnects before the server noticed its old connection died keeps its
    /// address.
    pub fn grant(&mut self, session: &SessionHandle, now_ms: u64, stale_ms: u64) -> Grant {
        let stale = self
            .leases
            .iter()
            .find(|(_, l)| {
                l.session.peer == session.peer
                    && l.session.id != session.id
                    && now_ms.saturating_sub(l.session.last_rx.load(Ordering::Relaxed)) > stale_ms
            })
            .map(|(a, l)| (*a, l.session.id));
        if let Some((addr, old_id)) = stale {
            let old = self.leases.remove(&addr).expect("found above");
            old.session.cancel.cancel();
            self.insert(addr, session);
            return Grant::TakenOver(addr, old_id);
        }
        match self.pool.allocate(v6_key(session.peer), Instant::now()) {
            Some(addr) => {
                self.insert(addr, session);
                Grant::New(addr)
            }
            None => Grant::Exhausted,
        }
    }

    fn insert(&mut self, addr: Ipv4Addr, session: &SessionHandle) {
        self.leases.insert(
            addr,
            Lease {
                session: session.clone(),
                since: SystemTime::now(),
                mode: Mode::Inband,
            },
        );
    }

    /// Ends `session`'s lease on `addr` (if it still holds it) and returns the address to the
    /// pool, held for the same client.
    pub fn release(&mut self, addr: Ipv4Addr, session_id: u64) -> bool {
        match self.leases.get(&addr) {
            Some(l) if l.session.id == session_id => {
                let peer = l.session.peer;
                self.leases.remove(&addr);
                self.pool.release(addr, v6_key(peer), Instant::now());
                true
            }
            _ => false,
        }
    }

    pub fn sender_for(&self, addr: Ipv4Addr) -> Option<mpsc::Sender<Bytes>> {
        self.leases.get(&addr).map(|l| l.session.tx.clone())
    }

    pub fn lease_list(&self) -> Vec<LeaseRow> {
        let mut rows: Vec<LeaseRow> = self
            .leases
            .iter()
            .map(|(addr, l)| LeaseRow {
                ipv4: *addr,
                client: l.session.peer.to_canonical().to_string(),
                mode: l.mode,
                since: humantime::format_rfc3339_seconds(l.since).to_string(),
                session: l.session.id,
            })
            .collect();
        rows.sort_by_key(|r| r.ipv4);
        rows
    }
}

/// Pool holds are keyed by IPv6 address; IPv4 peers use their mapped form.
fn v6_key(peer: IpAddr) -> std::net::Ipv6Addr {
    match peer {
        IpAddr::V6(a) => a,
        IpAddr::V4(a) => a.to_ipv6_mapped(),
    }
}
