//! The lease table and the pool: the server's single source of truth. The fast-path maps and
//! the saved lease file are derived from it.
//!
//! Plain data: sessions appear here as [`Holder`]s (an id and a peer address); their queues and
//! cancellation live with the daemon (`server::Shared`), so the table is tested alone.
use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant, SystemTime},
};

use ipnet::Ipv6Net;
use serde::{Deserialize, Serialize};

pub use crate::config::ClientKey;
use crate::{mgmt::api::LeaseRow, pool::Pool, pool6::Pool6};

/// How a client's traffic flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Inband,
    Native,
}

impl Mode {
    /// As in `leases --json`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Inband => "inband",
            Mode::Native => "native",
        }
    }
}

/// A lease as the lease file keeps it (see `persist`).
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
    /// A shared lease (`--share`): its PSID, of the length and offset the server had.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psid: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psid_len: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psid_offset: Option<u8>,
}

/// The session that holds a lease: its id and its client's address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Holder {
    pub id: u64,
    pub peer: IpAddr,
}

#[derive(Debug)]
pub struct Lease {
    /// The client's address (canonical: IPv4 clients as IPv4).
    pub client: IpAddr,
    /// None for a lease restored after a restart whose client has not reconnected yet.
    pub session: Option<Holder>,
    pub since: SystemTime,
    pub mode: Mode,
    /// Native mode: the client's tunnel endpoint, bound in the fast-path maps.
    pub tunnel: Option<Ipv6Addr>,
    /// Restored leases are released if their client is not back by then.
    pub restored_until: Option<Instant>,
}

/// Leases a pool change withdrew: (address, session) of those held now, and the restored
/// ones that ended at once.
pub type Withdrawn = (Vec<(Ipv4Addr, u64)>, Vec<Ended>);

/// A lease that ended: what must be undone in the fast path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended {
    pub ipv4: Ipv4Addr,
    pub tunnel: Option<Ipv6Addr>,
    /// A shared lease's PSID: its softwire goes.
    pub psid: Option<u16>,
    /// Who held it, since when (the lease history).
    pub client: IpAddr,
    pub since: SystemTime,
}

/// `--share 2^k --psid-offset A`: how a shared address is split (SPEC §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sharing {
    pub psid_len: u8,
    pub offset: u8,
}

impl Sharing {
    /// The port-set text of `psid` (the 101/106 tokens).
    pub fn share(&self, psid: u16) -> crate::protocol::text::Share {
        crate::protocol::text::Share {
            psid,
            psid_len: self.psid_len,
            offset: self.offset,
        }
    }
}

/// One PSID of a shared address, held by a native client.
#[derive(Debug)]
struct SharedLease {
    client: IpAddr,
    session: Option<Holder>,
    since: SystemTime,
    tunnel: Ipv6Addr,
    restored_until: Option<Instant>,
}

/// A shared lease granted to a session: its address and PSID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SharedGrant {
    pub ipv4: Ipv4Addr,
    pub psid: u16,
    /// Taken over from this silent earlier session of the same client (the caller closes it).
    pub taken_over: Option<u64>,
    pub restored: bool,
}

pub struct State {
    pub pool: Pool,
    leases: HashMap<Ipv4Addr, Lease>,
    pub sessions: usize,
    /// `--pool6`: /128s.
    pub pool6: Option<Pool6>,
    /// `--delegate`: prefixes.
    pub delegate: Option<Pool6>,
    /// IPv6 units (an address or a delegated prefix) → the session holding them.
    leases6: HashMap<Ipv6Net, Lease6>,
    pub limits: LeaseLimits,
    /// Sessions whose IPv4 lease a newer session of the same client took over; their IPv6
    /// units go to that client's next 107 too. Forgotten when the session ends.
    replaced: HashSet<u64>,
    /// `--share`: None when every lease is a whole address.
    pub sharing: Option<Sharing>,
    /// Addresses taken from the pool for sharing → their PSIDs' leases (index = PSID).
    shared: HashMap<Ipv4Addr, Vec<Option<SharedLease>>>,
    /// The PSID a client held last (sticky like whole leases, for the pool's hold time).
    shared_held: HashMap<IpAddr, ((Ipv4Addr, u16), Instant)>,
    /// `--client-key`: which clients count as the same for getting a whole lease back.
    pub client_key: ClientKey,
}

/// How many leases the clients of one place may hold at once (0: no limit), so that one
/// network cannot take the whole pool (issue 18 item 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseLimits {
    /// Clients whose IPv6 source lies in one /`prefix_len`.
    pub per_prefix: usize,
    pub prefix_len: u8,
    /// One source address (IPv4 or IPv6).
    pub per_address: usize,
}

impl Default for LeaseLimits {
    fn default() -> LeaseLimits {
        LeaseLimits {
            per_prefix: 0,
            prefix_len: 64,
            per_address: 0,
        }
    }
}

/// Why a lease was refused although the pool has room.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitReached {
    Prefix { prefix: Ipv6Net, max: usize },
    Address { max: usize },
}

impl LimitReached {
    /// The 110 text (and log line).
    pub fn text(&self) -> String {
        match self {
            LimitReached::Prefix { prefix, max } => format!(
                "lease limit: clients in {prefix} already hold {max} leases (--max-leases-per-prefix)"
            ),
            LimitReached::Address { max } => format!(
                "lease limit: this address already holds {max} leases (--max-leases-per-address)"
            ),
        }
    }
}

/// An IPv6 address or prefix held by a session (not saved: clients get the same one back from
/// [`Pool6`]'s address-derived choice).
#[derive(Debug)]
struct Lease6 {
    client: IpAddr,
    session: Holder,
}

/// What a 107 got.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Units6 {
    /// From `--pool6`.
    pub addr: Option<Ipv6Net>,
    /// From `--delegate`.
    pub delegated: Option<Ipv6Net>,
}

impl Units6 {
    pub fn iter(&self) -> impl Iterator<Item = Ipv6Net> {
        self.addr.into_iter().chain(self.delegated)
    }

    /// Whether `src` may appear as the source of this client's packets.
    pub fn contains(&self, src: Ipv6Addr) -> bool {
        self.iter().any(|u| u.contains(&src))
    }
}

/// Where a new lease's address comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pick {
    /// The table's pool (the file store).
    Pool,
    /// The shared lease store claimed this one.
    Addr(Ipv4Addr),
    /// Nowhere: only a lease the table holds already.
    ReuseOnly,
}

/// The outcome of a lease request.
pub enum Grant {
    New(Ipv4Addr),
    /// Taken over from a silent earlier session of the same client.
    TakenOver(Ipv4Addr, u64),
    /// Saved before a restart and now claimed by its client.
    Restored(Ipv4Addr),
    Exhausted,
    Limited(LimitReached),
    /// A shared lease refused: the endpoint is bound already.
    Conflict(String),
    /// The shared lease store cannot be reached: the 110 text.
    StoreUnavailable(String),
    /// The client's address is still held by another concentrator: the 110 text.
    HeldElsewhere(String),
}

impl State {
    pub fn new(pool: Pool) -> State {
        State {
            pool,
            leases: HashMap::new(),
            sessions: 0,
            pool6: None,
            delegate: None,
            leases6: HashMap::new(),
            limits: LeaseLimits::default(),
            replaced: HashSet::new(),
            sharing: None,
            shared: HashMap::new(),
            shared_held: HashMap::new(),
            client_key: ClientKey::Address,
        }
    }

    fn shared_leases(&self) -> impl Iterator<Item = ((Ipv4Addr, u16), &SharedLease)> {
        self.shared.iter().flat_map(|(a, slots)| {
            slots
                .iter()
                .enumerate()
                .filter_map(move |(p, l)| l.as_ref().map(|l| ((*a, p as u16), l)))
        })
    }

    /// How many leases `client` holds (whole and shared).
    fn held_by(&self, matches: impl Fn(IpAddr) -> bool) -> usize {
        self.leases.values().filter(|l| matches(l.client)).count()
            + self
                .shared_leases()
                .filter(|(_, l)| matches(l.client))
                .count()
    }

    /// A shared lease (`--share`) for `session`, bound to `tunnel`: its restored lease, else
    /// the lease of a silent earlier session of the same client (`silent(id)`), else the PSID
    /// it held last if still free, else a free PSID of an address already shared, else a new
    /// address from the pool split anew. Err: the 110 text.
    pub fn grant_shared(
        &mut self,
        session: Holder,
        tunnel: Ipv6Addr,
        silent: impl Fn(u64) -> bool,
    ) -> Result<SharedGrant, Grant> {
        let Some(sharing) = self.sharing else {
            return Err(Grant::Exhausted);
        };
        let client = session.peer.to_canonical();
        let mine = self
            .shared_leases()
            .find(|(_, l)| {
                l.client == client && l.session.is_none_or(|s| s.id != session.id && silent(s.id))
            })
            .map(|(k, l)| (k, l.session.map(|s| s.id)));
        if let Some(((ipv4, psid), old)) = mine {
            let lease = self.slot(ipv4, psid).expect("found above");
            let restored = lease.session.is_none();
            lease.session = Some(session);
            lease.restored_until = None;
            lease.tunnel = tunnel;
            if let Some(old) = old {
                self.replaced.insert(old);
            }
            return Ok(SharedGrant {
                ipv4,
                psid,
                taken_over: old,
                restored,
            });
        }
        if let Some(other) = self
            .leases
            .iter()
            .find(|(_, l)| l.tunnel == Some(tunnel))
            .map(|(a, _)| a.to_string())
            .or_else(|| {
                self.shared_leases()
                    .find(|(_, l)| l.tunnel == tunnel)
                    .map(|((a, p), _)| format!("{a} psid {p}"))
            })
        {
            return Err(Grant::Conflict(format!(
                "{tunnel} is already the native endpoint of lease {other}"
            )));
        }
        if let Err(limit) = self.check_limits(client) {
            return Err(Grant::Limited(limit));
        }
        let now = Instant::now();
        self.shared_held.retain(|_, (_, until)| *until > now);
        let held = self.shared_held.remove(&client).map(|(k, _)| k);
        let held_free = held.filter(|(a, p)| {
            self.shared
                .get(a)
                .is_some_and(|s| s[usize::from(*p)].is_none())
        });
        let held_by_others: HashSet<(Ipv4Addr, u16)> =
            self.shared_held.values().map(|(k, _)| *k).collect();
        let free = held_free.or_else(|| {
            let mut addrs: Vec<&Ipv4Addr> = self.shared.keys().collect();
            addrs.sort();
            let free_slots = addrs.into_iter().flat_map(|a| {
                self.shared[a]
                    .iter()
                    .enumerate()
                    .filter(|(_, l)| l.is_none())
                    .map(move |(p, _)| (*a, p as u16))
            });
            let all: Vec<_> = free_slots.collect();
            all.iter()
                .find(|k| !held_by_others.contains(k))
                .or(all.first())
                .copied()
        });
        let (ipv4, psid) = match free {
            Some(k) => k,
            None => {
                let Some(addr) = self.pool.allocate(v6_key(client), now) else {
                    return Err(Grant::Exhausted);
                };
                let slots = 1usize << sharing.psid_len;
                self.shared
                    .insert(addr, std::iter::repeat_with(|| None).take(slots).collect());
                // The pool held this address for the client: its PSID comes back with it.
                (addr, held.filter(|(a, _)| *a == addr).map_or(0, |(_, p)| p))
            }
        };
        self.shared.get_mut(&ipv4).expect("chosen above")[usize::from(psid)] = Some(SharedLease {
            client,
            session: Some(session),
            since: SystemTime::now(),
            tunnel,
            restored_until: None,
        });
        Ok(SharedGrant {
            ipv4,
            psid,
            taken_over: None,
            restored: false,
        })
    }

    fn slot(&mut self, ipv4: Ipv4Addr, psid: u16) -> Option<&mut SharedLease> {
        self.shared
            .get_mut(&ipv4)?
            .get_mut(usize::from(psid))?
            .as_mut()
    }

    /// The PSID `session_id` holds on shared address `addr`.
    fn shared_psid(&self, addr: Ipv4Addr, session_id: u64) -> Option<u16> {
        let slots = self.shared.get(&addr)?;
        slots
            .iter()
            .position(|l| {
                l.as_ref()
                    .is_some_and(|l| l.session.is_some_and(|s| s.id == session_id))
            })
            .map(|p| p as u16)
    }

    /// Ends the shared lease (`addr`, `psid`): the PSID is held for its client, and the
    /// address goes back to the pool once no PSID of it is leased.
    fn remove_shared(&mut self, addr: Ipv4Addr, psid: u16) -> Ended {
        let slots = self.shared.get_mut(&addr).expect("caller checked");
        let lease = slots[usize::from(psid)].take().expect("caller checked");
        let empty = slots.iter().all(Option::is_none);
        let now = Instant::now();
        if empty {
            self.shared.remove(&addr);
            self.shared_held.retain(|_, ((a, _), _)| *a != addr);
            self.pool.release(addr, v6_key(lease.client), now);
        }
        self.shared_held
            .insert(lease.client, ((addr, psid), now + self.pool.hold()));
        Ended {
            ipv4: addr,
            tunnel: Some(lease.tunnel),
            psid: Some(psid),
            client: lease.client,
            since: lease.since,
        }
    }

    /// The softwires of all shared leases (what the fast path must hold for them).
    pub fn shared_softwires(&self) -> Vec<crate::server::softwires::Softwire> {
        let Some(sharing) = self.sharing else {
            return Vec::new();
        };
        self.shared_leases()
            .map(|((ipv4, psid), l)| crate::server::softwires::Softwire {
                ipv4,
                psid,
                psid_len: sharing.psid_len,
                psid_offset: sharing.offset,
                b4: l.tunnel,
                aftr: None,
            })
            .collect()
    }

    /// Whether `client` may hold one more lease under [`State::limits`].
    fn check_limits(&self, client: IpAddr) -> Result<(), LimitReached> {
        let LeaseLimits {
            per_prefix,
            prefix_len,
            per_address,
        } = self.limits;
        if per_address > 0 && self.held_by(|c| c == client) >= per_address {
            return Err(LimitReached::Address { max: per_address });
        }
        if let (IpAddr::V6(v6), true) = (client, per_prefix > 0) {
            let prefix =
                Ipv6Net::new(v6, prefix_len).map_or_else(|_| Ipv6Net::from(v6), |n| n.trunc());
            let held = self.held_by(|c| matches!(c, IpAddr::V6(c) if prefix.contains(&c)));
            if held >= per_prefix {
                return Err(LimitReached::Prefix {
                    prefix,
                    max: per_prefix,
                });
            }
        }
        Ok(())
    }

    /// Whether 107 can be answered.
    pub fn offers_ipv6(&self) -> bool {
        self.pool6.is_some() || self.delegate.is_some()
    }

    /// IPv6 for `session` from each configured IPv6 pool: the unit a cancelled earlier
    /// session of the same client held, else the client's preferred free one. Err names the
    /// exhausted pool (nothing is kept then).
    pub fn grant6(&mut self, session: Holder) -> Result<Units6, String> {
        let mut units = Units6::default();
        let mut exhausted = None;
        for (pool, slot) in [
            (&mut self.pool6, &mut units.addr),
            (&mut self.delegate, &mut units.delegated),
        ] {
            let Some(pool) = pool else { continue };
            match grant_unit(pool, &mut self.leases6, &self.replaced, session) {
                Some(unit) => *slot = Some(unit),
                None => {
                    exhausted = Some(format!(
                        "IPv6 pool exhausted: all {} of {pool} are leased",
                        pool.capacity()
                    ));
                    break;
                }
            }
        }
        if let Some(why) = exhausted {
            let _ = self.release6(&units, session.id);
            return Err(why);
        }
        Ok(units)
    }

    /// Returns `session_id`'s IPv6 units to their pools (those it still holds: a unit taken
    /// over by a newer session of the same client stays); returns what was released.
    pub fn release6(&mut self, units: &Units6, session_id: u64) -> Units6 {
        let mut released = Units6::default();
        for (unit, slot) in [
            (units.addr, &mut released.addr),
            (units.delegated, &mut released.delegated),
        ] {
            let Some(unit) = unit else { continue };
            if self
                .leases6
                .get(&unit)
                .is_some_and(|l| l.session.id == session_id)
            {
                self.leases6.remove(&unit);
                for pool in [&mut self.pool6, &mut self.delegate].into_iter().flatten() {
                    pool.release(unit);
                }
                *slot = Some(unit);
            }
        }
        released
    }

    /// The session for a packet to `dst`.
    pub fn route6(&self, dst: Ipv6Addr) -> Option<u64> {
        [&self.pool6, &self.delegate]
            .into_iter()
            .flatten()
            .filter_map(|pool| pool.unit_of(dst))
            .find_map(|unit| self.leases6.get(&unit))
            .map(|l| l.session.id)
    }

    /// `session_id` ended: it is no longer remembered as replaced.
    pub fn session_ended(&mut self, session_id: u64) {
        self.replaced.remove(&session_id);
    }

    /// Whether `unit` is leased to any session now.
    pub fn is_leased6(&self, unit: Ipv6Net) -> bool {
        self.leases6.contains_key(&unit)
    }

    pub fn leases6_count(&self) -> usize {
        self.leases6.len()
    }

    /// Re-creates saved leases (no session yet) for `grace`. Returns those it could not
    /// restore (address outside the pool or duplicated), with the reason.
    pub fn restore(
        &mut self,
        saved: &[SavedLease],
        grace: Duration,
    ) -> Vec<(SavedLease, &'static str)> {
        let until = Instant::now() + grace;
        let mut rejected = Vec::new();
        for s in saved {
            if let (Some(psid), Some(tunnel)) = (s.psid, s.tunnel) {
                if let Err(why) = self.restore_shared(s, psid, tunnel, until) {
                    rejected.push((s.clone(), why));
                }
                continue;
            }
            if !self.pool.reserve(s.ipv4) {
                rejected.push((s.clone(), "address not free in the current pool"));
                continue;
            }
            let since = humantime::parse_rfc3339(&s.since).unwrap_or_else(|_| SystemTime::now());
            self.leases.insert(
                s.ipv4,
                Lease {
                    client: s.client.to_canonical(),
                    session: None,
                    since,
                    mode: s.mode,
                    tunnel: s.tunnel.filter(|_| s.mode == Mode::Native),
                    restored_until: Some(until),
                },
            );
        }
        rejected
    }

    fn restore_shared(
        &mut self,
        s: &SavedLease,
        psid: u16,
        tunnel: Ipv6Addr,
        until: Instant,
    ) -> Result<(), &'static str> {
        let Some(sharing) = self.sharing else {
            return Err("a shared lease, and the server no longer runs with --share");
        };
        if (s.psid_len, s.psid_offset) != (Some(sharing.psid_len), Some(sharing.offset)) {
            return Err("a shared lease of another --share or --psid-offset");
        }
        if !self.shared.contains_key(&s.ipv4) {
            if !self.pool.reserve(s.ipv4) {
                return Err("address not free in the current pool");
            }
            let slots = 1usize << sharing.psid_len;
            self.shared.insert(
                s.ipv4,
                std::iter::repeat_with(|| None).take(slots).collect(),
            );
        }
        let slot = &mut self.shared.get_mut(&s.ipv4).expect("inserted above")[usize::from(psid)];
        if slot.is_some() {
            return Err("PSID saved twice");
        }
        *slot = Some(SharedLease {
            client: s.client.to_canonical(),
            session: None,
            since: humantime::parse_rfc3339(&s.since).unwrap_or_else(|_| SystemTime::now()),
            tunnel,
            restored_until: Some(until),
        });
        Ok(())
    }

    /// An address for `session`: its restored lease if it had one, else the lease of a silent
    /// (`silent(id)`) earlier session of the same client, which the caller must close
    /// ([`Grant::TakenOver`] names it), else a new one from the pool.
    pub fn grant(&mut self, session: Holder, silent: impl Fn(u64) -> bool) -> Grant {
        self.grant_from(session, silent, Pick::Pool)
    }

    /// The address [`State::grant`] would give `session` again without the pool: its
    /// restored lease or that of a silent earlier session of the same client.
    pub fn reusable(&self, session: Holder, silent: impl Fn(u64) -> bool) -> Option<Ipv4Addr> {
        let key = self.client_key;
        let client = key.of(session.peer);
        self.leases
            .iter()
            .find(|(_, l)| {
                key.of(l.client) == client
                    && match &l.session {
                        None => true,
                        Some(s) => s.id != session.id && silent(s.id),
                    }
            })
            .map(|(a, _)| *a)
    }

    /// As [`State::grant`], a new lease's address coming from `pick`.
    pub fn grant_from(
        &mut self,
        session: Holder,
        silent: impl Fn(u64) -> bool,
        pick: Pick,
    ) -> Grant {
        let client = session.peer.to_canonical();
        let key = self.client_key;
        let restored = self
            .leases
            .iter()
            .find(|(_, l)| key.of(l.client) == key.of(client) && l.session.is_none())
            .map(|(a, _)| *a);
        if let Some(addr) = restored {
            let lease = self.leases.get_mut(&addr).expect("found above");
            lease.session = Some(session);
            lease.restored_until = None;
            return Grant::Restored(addr);
        }
        let stale = self
            .leases
            .iter()
            .filter_map(|(a, l)| l.session.as_ref().map(|s| (a, l, s)))
            .find(|(_, l, s)| {
                key.of(l.client) == key.of(client) && s.id != session.id && silent(s.id)
            })
            .map(|(a, _, s)| (*a, s.id));
        if let Some((addr, old_id)) = stale {
            let lease = self.leases.get_mut(&addr).expect("found above");
            lease.session = Some(session);
            self.replaced.insert(old_id);
            return Grant::TakenOver(addr, old_id);
        }
        if let Err(limit) = self.check_limits(client) {
            return Grant::Limited(limit);
        }
        let addr = match pick {
            Pick::Addr(addr) if self.pool.reserve(addr) => Some(addr),
            Pick::ReuseOnly => None,
            Pick::Addr(addr) => {
                tracing::warn!(
                    "the lease store picked {addr}, which is not a free address of this \
                     server's pool"
                );
                None
            }
            Pick::Pool => self.pool.allocate(v6_key(key.of(client)), Instant::now()),
        };
        match addr {
            Some(addr) => {
                self.leases.insert(
                    addr,
                    Lease {
                        client,
                        session: Some(session),
                        since: SystemTime::now(),
                        mode: Mode::Inband,
                        tunnel: None,
                        restored_until: None,
                    },
                );
                Grant::New(addr)
            }
            None => Grant::Exhausted,
        }
    }

    /// The lease's current mode and binding, if `session_id` holds it.
    pub fn lease_of(&self, addr: Ipv4Addr, session_id: u64) -> Option<(Mode, Option<Ipv6Addr>)> {
        self.leases
            .get(&addr)
            .filter(|l| l.session.as_ref().is_some_and(|s| s.id == session_id))
            .map(|l| (l.mode, l.tunnel))
    }

    /// Switches `session_id`'s lease on `addr` to native mode with endpoint `tunnel`. Fails
    /// when another lease is bound to that endpoint.
    pub fn set_native(
        &mut self,
        addr: Ipv4Addr,
        session_id: u64,
        tunnel: Ipv6Addr,
    ) -> Result<(), String> {
        if let Some((other, _)) = self
            .leases
            .iter()
            .find(|(a, l)| **a != addr && l.tunnel == Some(tunnel))
        {
            return Err(format!(
                "{tunnel} is already the native endpoint of lease {other}"
            ));
        }
        match self.leases.get_mut(&addr) {
            Some(l) if l.session.as_ref().is_some_and(|s| s.id == session_id) => {
                l.mode = Mode::Native;
                l.tunnel = Some(tunnel);
                Ok(())
            }
            _ => Err("the lease is no longer held by this session".into()),
        }
    }

    /// Back to in-band (the client sent 102 on a native lease); returns the old binding.
    pub fn set_inband(&mut self, addr: Ipv4Addr, session_id: u64) -> Option<Ipv6Addr> {
        match self.leases.get_mut(&addr) {
            Some(l) if l.session.as_ref().is_some_and(|s| s.id == session_id) => {
                l.mode = Mode::Inband;
                l.tunnel.take()
            }
            _ => None,
        }
    }

    /// Ends `session`'s lease on `addr` (if it still holds it) and returns the address to the
    /// pool, held for the same client.
    pub fn release(&mut self, addr: Ipv4Addr, session_id: u64) -> Option<Ended> {
        if let Some(psid) = self.shared_psid(addr, session_id) {
            return Some(self.remove_shared(addr, psid));
        }
        match self.leases.get(&addr) {
            Some(l) if l.session.as_ref().is_some_and(|s| s.id == session_id) => {
                Some(self.remove(addr))
            }
            _ => None,
        }
    }

    fn remove(&mut self, addr: Ipv4Addr) -> Ended {
        let lease = self.leases.remove(&addr).expect("caller checked");
        self.pool.release(
            addr,
            v6_key(self.client_key.of(lease.client)),
            Instant::now(),
        );
        Ended {
            ipv4: addr,
            tunnel: lease.tunnel,
            psid: None,
            client: lease.client,
            since: lease.since,
        }
    }

    /// New pool ranges (a reload): see [`Pool::reshape`]. Leases on withdrawn addresses that
    /// a session holds are returned as (address, session) for the sessions to end; restored
    /// ones without a session end here (returned as [`Ended`]).
    pub fn reshape_pool(&mut self, ranges: &[crate::pool::Range4]) -> Result<Withdrawn, String> {
        let withdrawn = self.pool.reshape(ranges)?;
        let mut held = Vec::new();
        let mut ended = Vec::new();
        for addr in withdrawn {
            if let Some(slots) = self.shared.get(&addr) {
                let (live, restored): (Vec<_>, Vec<_>) = slots
                    .iter()
                    .enumerate()
                    .filter_map(|(p, l)| l.as_ref().map(|l| (p as u16, l.session)))
                    .partition(|(_, s)| s.is_some());
                held.extend(
                    live.into_iter()
                        .filter_map(|(_, s)| s.map(|s| (addr, s.id))),
                );
                for (psid, _) in restored {
                    ended.push(self.remove_shared(addr, psid));
                }
                continue;
            }
            match self.leases.get(&addr).and_then(|l| l.session) {
                Some(s) => held.push((addr, s.id)),
                None if self.leases.contains_key(&addr) => ended.push(self.remove(addr)),
                None => {}
            }
        }
        Ok((held, ended))
    }

    /// A whole lease that another concentrator took over (the shared lease store): the id
    /// of the session to close (its end releases the lease), or for a restored lease
    /// without one, its end. None when this server does not hold `addr`.
    pub fn taken_away(&mut self, addr: Ipv4Addr) -> Option<Result<u64, Ended>> {
        match self.leases.get(&addr)?.session {
            Some(s) => Some(Ok(s.id)),
            None => Some(Err(self.remove(addr))),
        }
    }

    /// The addresses of every whole lease held now, with mode and binding (what the shared
    /// lease store renews).
    pub fn held(&self) -> Vec<(Ipv4Addr, Mode, Option<Ipv6Addr>)> {
        self.leases
            .iter()
            .map(|(a, l)| (*a, l.mode, l.tunnel))
            .collect()
    }

    /// Releases restored leases whose client did not come back in time.
    pub fn expire_restored(&mut self, now: Instant) -> Vec<Ended> {
        let expired: Vec<Ipv4Addr> = self
            .leases
            .iter()
            .filter(|(_, l)| l.session.is_none() && l.restored_until.is_some_and(|t| t <= now))
            .map(|(a, _)| *a)
            .collect();
        let shared: Vec<(Ipv4Addr, u16)> = self
            .shared_leases()
            .filter(|(_, l)| l.session.is_none() && l.restored_until.is_some_and(|t| t <= now))
            .map(|(k, _)| k)
            .collect();
        let mut ended: Vec<Ended> = expired.into_iter().map(|a| self.remove(a)).collect();
        ended.extend(shared.into_iter().map(|(a, p)| self.remove_shared(a, p)));
        ended
    }

    /// Where a packet to `addr` goes: the in-band session's queue, or the native endpoint.
    pub fn route(&self, addr: Ipv4Addr) -> Option<Route> {
        let l = self.leases.get(&addr)?;
        match (l.mode, l.tunnel, &l.session) {
            (Mode::Native, Some(t), _) => Some(Route::Native(t)),
            (_, _, Some(s)) => Some(Route::Inband(s.id)),
            _ => None,
        }
    }

    /// Native bindings of all leases.
    pub fn bindings(&self) -> Vec<(Ipv4Addr, Ipv6Addr)> {
        self.leases
            .iter()
            .filter_map(|(a, l)| l.tunnel.map(|t| (*a, t)))
            .collect()
    }

    pub fn lease_list(&self) -> Vec<LeaseRow> {
        let mut ipv6: HashMap<u64, Vec<Ipv6Net>> = HashMap::new();
        for (unit, l) in &self.leases6 {
            ipv6.entry(l.session.id).or_default().push(*unit);
        }
        let mut rows: Vec<LeaseRow> = self
            .leases
            .iter()
            .map(|(addr, l)| LeaseRow {
                ipv4: *addr,
                client: l.client.to_string(),
                mode: l.mode.as_str(),
                since: humantime::format_rfc3339_seconds(l.since).to_string(),
                session: l.session.as_ref().map(|s| s.id),
                tunnel: l.tunnel,
                ipv6: l
                    .session
                    .as_ref()
                    .and_then(|s| ipv6.get(&s.id).cloned())
                    .unwrap_or_default(),
                traffic: Default::default(),
                psid: None,
                psid_len: None,
                psid_offset: None,
            })
            .collect();
        if let Some(sharing) = self.sharing {
            rows.extend(self.shared_leases().map(|((addr, psid), l)| {
                LeaseRow {
                    ipv4: addr,
                    client: l.client.to_string(),
                    mode: Mode::Native.as_str(),
                    since: humantime::format_rfc3339_seconds(l.since).to_string(),
                    session: l.session.as_ref().map(|s| s.id),
                    tunnel: Some(l.tunnel),
                    ipv6: l
                        .session
                        .as_ref()
                        .and_then(|s| ipv6.get(&s.id).cloned())
                        .unwrap_or_default(),
                    traffic: Default::default(),
                    psid: Some(psid),
                    psid_len: Some(sharing.psid_len),
                    psid_offset: Some(sharing.offset),
                }
            }));
        }
        rows.sort_by_key(|r| (r.ipv4, r.psid));
        rows
    }

    /// What goes into the lease file.
    pub fn saved(&self) -> Vec<SavedLease> {
        let mut saved: Vec<SavedLease> = self
            .leases
            .iter()
            .map(|(addr, l)| SavedLease {
                ipv4: *addr,
                client: l.client,
                mode: l.mode,
                since: humantime::format_rfc3339_seconds(l.since).to_string(),
                tunnel: l.tunnel,
                psid: None,
                psid_len: None,
                psid_offset: None,
            })
            .collect();
        if let Some(sharing) = self.sharing {
            saved.extend(self.shared_leases().map(|((addr, psid), l)| SavedLease {
                ipv4: addr,
                client: l.client,
                mode: Mode::Native,
                since: humantime::format_rfc3339_seconds(l.since).to_string(),
                tunnel: Some(l.tunnel),
                psid: Some(psid),
                psid_len: Some(sharing.psid_len),
                psid_offset: Some(sharing.offset),
            }));
        }
        saved.sort_by_key(|s| (s.ipv4, s.psid));
        saved
    }
}

/// Where the TUN reader sends a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// To this session's queue.
    Inband(u64),
    Native(Ipv6Addr),
}

/// One IPv6 unit of `pool` for `session` (see [`State::grant6`]).
fn grant_unit(
    pool: &mut Pool6,
    leases6: &mut HashMap<Ipv6Net, Lease6>,
    replaced: &HashSet<u64>,
    session: Holder,
) -> Option<Ipv6Net> {
    let client = session.peer.to_canonical();
    let earlier = leases6
        .iter()
        .find(|(unit, l)| {
            pool.prefix().contains(*unit) && l.client == client && replaced.contains(&l.session.id)
        })
        .map(|(unit, _)| *unit);
    if let Some(unit) = earlier {
        leases6.get_mut(&unit).expect("found above").session = session;
        return Some(unit);
    }
    let key = match client {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    let unit = pool.allocate(&key)?;
    leases6.insert(unit, Lease6 { client, session });
    Some(unit)
}

/// Pool holds are keyed by IPv6 address; IPv4 peers use their mapped form.
fn v6_key(peer: IpAddr) -> Ipv6Addr {
    match peer.to_canonical() {
        IpAddr::V6(a) => a,
        IpAddr::V4(a) => a.to_ipv6_mapped(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> State {
        let pool = Pool::new(
            &["198.51.100.2-198.51.100.9".parse().unwrap()],
            &[],
            Duration::from_secs(300),
        )
        .unwrap();
        let mut s = State::new(pool);
        s.pool6 = Some(Pool6::new("2001:db8:600::/64".parse().unwrap(), 128).unwrap());
        s.delegate = Some(Pool6::new("2001:db8:700::/48".parse().unwrap(), 64).unwrap());
        s
    }

    /// `--client-key prefix64`: a client back from another address of its /64 is the same.
    #[test]
    fn with_prefix64_keys_a_client_of_the_same_64_gets_its_address_back() {
        for (key, same) in [(ClientKey::Address, false), (ClientKey::Prefix64, true)] {
            let mut s = state();
            s.client_key = key;
            let never = |_| false;
            let Grant::New(a) = s.grant(holder(1, "2001:db8:1::1"), never) else {
                panic!("no lease")
            };
            // Silent, then back from another address of the /64: taken over, or a new one.
            let back = s.grant(holder(2, "2001:db8:1::99"), |id| id == 1);
            assert_eq!(
                matches!(back, Grant::TakenOver(x, 1) if x == a),
                same,
                "{key:?}"
            );
            // Released and back within the hold: the same address, or (address keys) not.
            let mut s = state();
            s.client_key = key;
            let Grant::New(a) = s.grant(holder(1, "2001:db8:1::1"), never) else {
                panic!("no lease")
            };
            s.release(a, 1);
            let Grant::New(b) = s.grant(holder(2, "2001:db8:1::99"), never) else {
                panic!("no lease")
            };
            assert_eq!(a == b, same, "{key:?}: {a} then {b}");
            // Another /64 is another client with either key.
            let Grant::New(c) = s.grant(holder(3, "2001:db8:2::1"), never) else {
                panic!("no lease")
            };
            assert_ne!(c, b);
        }
        assert_eq!(
            ClientKey::Prefix64.of("2001:db8:1:2:3:4:5:6".parse().unwrap()),
            "2001:db8:1:2::".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            ClientKey::Prefix64.of("::ffff:192.0.2.9".parse().unwrap()),
            "192.0.2.9".parse::<IpAddr>().unwrap()
        );
    }

    /// With the shared store: the store's pick, or only what the table holds.
    #[test]
    fn a_store_pick_is_leased_and_a_takeover_elsewhere_ends_it() {
        let mut s = state();
        let a: Ipv4Addr = "198.51.100.5".parse().unwrap();
        let never = |_| false;
        let h1 = holder(1, "2001:db8:1::1");
        assert!(matches!(s.grant_from(h1, never, Pick::Addr(a)), Grant::New(x) if x == a));
        // The store cannot pick an address the table holds, and nothing comes from the pool.
        let h2 = holder(2, "2001:db8:2::1");
        assert!(matches!(
            s.grant_from(h2, never, Pick::Addr(a)),
            Grant::Exhausted
        ));
        assert!(matches!(
            s.grant_from(h2, never, Pick::ReuseOnly),
            Grant::Exhausted
        ));
        assert_eq!(s.reusable(h2, never), None);
        // The same client again, its session silent: that lease, no store needed.
        let h3 = holder(3, "2001:db8:1::1");
        assert_eq!(s.reusable(h3, |id| id == 1), Some(a));
        assert_eq!(s.held(), vec![(a, Mode::Inband, None)]);
        // Another concentrator took it: the session holding it is named, to be closed.
        assert_eq!(s.taken_away(a), Some(Ok(1)));
        assert_eq!(s.taken_away("198.51.100.6".parse().unwrap()), None);
        // A restored lease without a session just ends.
        let mut r = state();
        r.restore(&s.saved(), Duration::from_secs(60));
        let ended = r.taken_away(a).unwrap().unwrap_err();
        assert_eq!(ended.ipv4, a);
        assert_eq!(ended.client, "2001:db8:1::1".parse::<IpAddr>().unwrap());
        assert!(r.lease_list().is_empty());
    }

    /// A pool of 8; clients of one /64 may hold 3, one address 2.
    #[test]
    fn one_prefix_or_address_cannot_take_the_pool() {
        let mut s = state();
        s.limits = LeaseLimits {
            per_prefix: 3,
            prefix_len: 64,
            per_address: 2,
        };
        let grant = |s: &mut State, id: u64, peer: &str| s.grant(holder(id, peer), |_| false);
        for (id, peer) in [(1, "2001:db8:1:1::1"), (2, "2001:db8:1:1::2")] {
            assert!(matches!(grant(&mut s, id, peer), Grant::New(_)));
        }
        // The same address again: its second lease (its cap comes below).
        assert!(matches!(grant(&mut s, 3, "2001:db8:1:1::2"), Grant::New(_)));
        // 3 leases in 2001:db8:1:1::/64 now: a fourth address of that /64 is refused.
        match grant(&mut s, 4, "2001:db8:1:1::99") {
            Grant::Limited(LimitReached::Prefix { prefix, max: 3 }) => {
                assert_eq!(prefix, "2001:db8:1:1::/64".parse::<Ipv6Net>().unwrap());
            }
            _ => panic!("a fourth lease in one /64"),
        }
        s.limits.per_prefix = 0;
        assert!(matches!(
            grant(&mut s, 5, "2001:db8:1:1::2"),
            Grant::Limited(LimitReached::Address { max: 2 })
        ));
        // Another /64, and an IPv4 client, still get theirs.
        s.limits.per_prefix = 3;
        assert!(matches!(grant(&mut s, 6, "2001:db8:1:2::1"), Grant::New(_)));
        assert!(matches!(grant(&mut s, 7, "192.0.2.9"), Grant::New(_)));
        assert!(
            LimitReached::Prefix {
                prefix: "2001:db8:1:1::/64".parse().unwrap(),
                max: 3
            }
            .text()
            .contains("2001:db8:1:1::/64")
        );
    }

    fn holder(id: u64, peer: &str) -> Holder {
        Holder {
            id,
            peer: peer.parse().unwrap(),
        }
    }

    #[test]
    fn ipv6_units_route_to_their_session_and_survive_a_takeover() {
        let mut s = state();
        let old = holder(1, "192.0.2.7");
        assert!(matches!(s.grant(old, |_| false), Grant::New(_)));
        let units = s.grant6(old).unwrap();
        let (addr, delegated) = (units.addr.unwrap(), units.delegated.unwrap());
        assert_eq!((addr.prefix_len(), delegated.prefix_len()), (128, 64));
        let in_prefix = Ipv6Addr::from(u128::from(delegated.network()) | 0x42);
        assert_eq!(
            (s.route6(addr.addr()), s.route6(in_prefix)),
            (Some(1), Some(1))
        );
        assert!(s.route6("2001:db8:700:ffff::1".parse().unwrap()).is_none());

        // The client reconnects while its old session is silent: the new one takes the IPv4
        // lease over (the old one has not ended yet), then its IPv6 units.
        let new = holder(2, "192.0.2.7");
        assert!(matches!(s.grant(new, |id| id == 1), Grant::TakenOver(_, 1)));
        assert_eq!(s.grant6(new).unwrap(), units, "same units, taken over");
        assert_eq!(
            s.release6(&units, 1),
            Units6::default(),
            "the old session releases nothing"
        );
        assert_eq!(
            s.route6(addr.addr()),
            Some(2),
            "packets go to the new session"
        );
        assert_eq!(s.release6(&units, 2), units);
        assert_eq!(s.leases6_count(), 0);
        assert!(s.route6(addr.addr()).is_none());
    }
}
