//! IPv4 address pools: ranges, allocation, and sticky holds.
//!
//! A released address stays associated with its last client for the hold time: that client
//! gets it back when it reconnects, and other clients get it only when nothing else is free.
use std::{
    collections::{HashMap, HashSet, VecDeque},
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
    str::FromStr,
    time::{Duration, Instant},
};

use ipnet::Ipv4Net;

/// An inclusive range of IPv4 addresses: `A-B`, a single `A`, or a CIDR `N/len` (all its
/// addresses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range4 {
    pub first: Ipv4Addr,
    pub last: Ipv4Addr,
}

impl Range4 {
    pub fn len(&self) -> u64 {
        u64::from(u32::from(self.last)) - u64::from(u32::from(self.first)) + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// The smallest set of CIDRs that covers the range (for routes).
    pub fn subnets(&self) -> Vec<Ipv4Net> {
        ipnet::Ipv4Subnets::new(self.first, self.last, 0).collect()
    }

    fn addrs(&self) -> impl Iterator<Item = Ipv4Addr> {
        (u32::from(self.first)..=u32::from(self.last)).map(Ipv4Addr::from)
    }
}

impl fmt::Display for Range4 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

impl FromStr for Range4 {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some((a, b)) = s.split_once('-') {
            let first: Ipv4Addr = a
                .trim()
                .parse()
                .map_err(|_| format!("{a:?} is not an IPv4 address"))?;
            let last: Ipv4Addr = b
                .trim()
                .parse()
                .map_err(|_| format!("{b:?} is not an IPv4 address"))?;
            if last < first {
                return Err(format!(
                    "range {s} ends before it starts (write it as {last}-{first})"
                ));
            }
            return Ok(Range4 { first, last });
        }
        if s.contains('/') {
            let net: Ipv4Net = s
                .parse()
                .map_err(|_| format!("{s:?} is not an IPv4 CIDR"))?;
            // A /30 or wider names a subnet: its network and broadcast addresses are no
            // host's. /31 and /32 have none to skip (RFC 3021). A range names exactly what
            // it lists, so write 198.51.100.0-198.51.100.3 to lease all four.
            let (first, last) = if net.prefix_len() <= 30 {
                (
                    Ipv4Addr::from(u32::from(net.network()) + 1),
                    Ipv4Addr::from(u32::from(net.broadcast()) - 1),
                )
            } else {
                (net.network(), net.broadcast())
            };
            return Ok(Range4 { first, last });
        }
        let a: Ipv4Addr = s.parse().map_err(|_| {
            format!("{s:?} is not an IPv4 range (use FIRST-LAST, e.g. 198.51.100.2-198.51.100.128)")
        })?;
        Ok(Range4 { first: a, last: a })
    }
}

/// Largest pool we accept (a /12); beyond that the free list costs real memory.
pub const MAX_POOL: u64 = 1 << 20;

/// Address allocator over a set of ranges.
#[derive(Debug)]
pub struct Pool {
    ranges: Vec<Range4>,
    /// Free addresses, oldest release first (never-used ones first of all).
    free: VecDeque<Ipv4Addr>,
    in_use: HashSet<Ipv4Addr>,
    /// client → (address, hold expiry) after a release.
    held: HashMap<Ipv6Addr, (Ipv4Addr, Instant)>,
    hold: Duration,
    /// Addresses of the ranges that are never leased (the gateway).
    exclude: Vec<Ipv4Addr>,
}

impl Pool {
    /// A pool of `ranges` minus `exclude` (the gateway, say). Fails when empty, overlapping
    /// or too large.
    pub fn new(ranges: &[Range4], exclude: &[Ipv4Addr], hold: Duration) -> Result<Pool, String> {
        Ok(Pool {
            ranges: ranges.to_vec(),
            free: usable(ranges, exclude)?.into(),
            in_use: HashSet::new(),
            held: HashMap::new(),
            hold,
            exclude: exclude.to_vec(),
        })
    }

    /// Changes the ranges in place (a reload): free addresses that stay keep their place,
    /// new ones go to the end of the free list. Leased addresses outside the new ranges stay
    /// leased until released and then leave the pool for good; they are returned, so that
    /// their leases can be ended. Fails (changing nothing) as [`Pool::new`] would.
    pub fn reshape(&mut self, ranges: &[Range4]) -> Result<Vec<Ipv4Addr>, String> {
        let all = usable(ranges, &self.exclude)?;
        let wanted: HashSet<Ipv4Addr> = all.iter().copied().collect();
        self.free.retain(|a| wanted.contains(a));
        for a in all {
            if !self.in_use.contains(&a) && !self.free.contains(&a) {
                self.free.push_back(a);
            }
        }
        self.held.retain(|_, (a, _)| wanted.contains(a));
        self.ranges = ranges.to_vec();
        let mut withdrawn: Vec<Ipv4Addr> = self
            .in_use
            .iter()
            .filter(|a| !wanted.contains(a))
            .copied()
            .collect();
        withdrawn.sort();
        Ok(withdrawn)
    }

    /// Whether `addr` is one this pool hands out.
    /// How long a released address stays held for its client.
    pub fn hold(&self) -> Duration {
        self.hold
    }

    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        !self.exclude.contains(&addr)
            && self
                .ranges
                .iter()
                .any(|r| (r.first..=r.last).contains(&addr))
    }

    /// Human description, e.g. `198.51.100.2-198.51.100.4`.
    pub fn describe(&self) -> String {
        self.ranges
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn capacity(&self) -> usize {
        self.free.len() + self.in_use.len()
    }

    pub fn in_use(&self) -> usize {
        self.in_use.len()
    }

    /// An address for `client`: the one it held within the hold time if still free, else a
    /// free address nobody holds, else the free address whose hold is oldest. None when every
    /// address is in use.
    pub fn allocate(&mut self, client: Ipv6Addr, now: Instant) -> Option<Ipv4Addr> {
        if let Some((addr, until)) = self.held.remove(&client)
            && until > now
            && !self.in_use.contains(&addr)
            && let Some(pos) = self.free.iter().position(|&a| a == addr)
        {
            self.free.remove(pos);
            self.in_use.insert(addr);
            return Some(addr);
        }
        self.held.retain(|_, (_, until)| *until > now);
        let held_addrs: HashSet<Ipv4Addr> = self.held.values().map(|(a, _)| *a).collect();
        let pos = self
            .free
            .iter()
            .position(|a| !held_addrs.contains(a))
            .or(if self.free.is_empty() { None } else { Some(0) })?;
        let addr = self.free.remove(pos)?;
        self.held.retain(|_, (a, _)| *a != addr);
        self.in_use.insert(addr);
        Some(addr)
    }

    /// Takes `addr` out of the free list (a lease restored after a restart). False when it is
    /// not a free address of this pool.
    pub fn reserve(&mut self, addr: Ipv4Addr) -> bool {
        match self.free.iter().position(|&a| a == addr) {
            Some(pos) => {
                self.free.remove(pos);
                self.held.retain(|_, (a, _)| *a != addr);
                self.in_use.insert(addr);
                true
            }
            None => false,
        }
    }

    /// Returns `addr` to the pool, held for `client` until the hold time passes.
    /// An address no longer in the ranges (withdrawn by a reload) just leaves.
    pub fn release(&mut self, addr: Ipv4Addr, client: Ipv6Addr, now: Instant) {
        if self.in_use.remove(&addr) && self.contains(addr) {
            self.free.push_back(addr);
            if !self.hold.is_zero() {
                self.held.insert(client, (addr, now + self.hold));
            }
        }
    }
}

/// The addresses of `ranges` less `exclude`, in order; fails when they overlap, are too many
/// or leave none.
fn usable(ranges: &[Range4], exclude: &[Ipv4Addr]) -> Result<Vec<Ipv4Addr>, String> {
    let total: u64 = ranges.iter().map(Range4::len).sum();
    if total > MAX_POOL {
        return Err(format!(
            "pool of {total} addresses is larger than {MAX_POOL}"
        ));
    }
    let mut seen = HashSet::new();
    let mut free = Vec::new();
    for r in ranges {
        for a in r.addrs() {
            if !seen.insert(a) {
                return Err(format!("pool ranges overlap at {a}"));
            }
            if !exclude.contains(&a) {
                free.push(a);
            }
        }
    }
    if free.is_empty() {
        return Err("pool has no usable address".into());
    }
    Ok(free)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reshape_adds_and_withdraws_ranges_and_a_withdrawn_address_never_returns() {
        let now = Instant::now();
        let mut p = Pool::new(&[r("198.51.100.1-198.51.100.3")], &[], Duration::ZERO).unwrap();
        let a = p.allocate(client(1), now).unwrap();
        let b = p.allocate(client(2), now).unwrap();
        assert_eq!(
            (a, b),
            (
                "198.51.100.1".parse().unwrap(),
                "198.51.100.2".parse().unwrap()
            )
        );
        // .2 and .3 go, .10-.11 come: .2 is leased, so it is withdrawn.
        let withdrawn = p
            .reshape(&[
                r("198.51.100.1-198.51.100.1"),
                r("198.51.100.10-198.51.100.11"),
            ])
            .unwrap();
        assert_eq!(withdrawn, vec![b]);
        assert_eq!(
            p.capacity(),
            4,
            "2 free (.10 .11) + 2 leased (.1, withdrawn .2)"
        );
        p.release(b, client(2), now);
        assert_eq!(p.capacity(), 3);
        let mut got: Vec<Ipv4Addr> = std::iter::from_fn(|| p.allocate(client(9), now)).collect();
        got.sort();
        assert_eq!(
            got,
            vec![
                "198.51.100.10".parse::<Ipv4Addr>().unwrap(),
                "198.51.100.11".parse().unwrap()
            ]
        );
        // A bad shape changes nothing.
        assert!(
            p.reshape(&[
                r("198.51.100.1-198.51.100.5"),
                r("198.51.100.4-198.51.100.9")
            ])
            .is_err()
        );
        assert!(p.contains("198.51.100.10".parse().unwrap()));
        assert!(!p.contains(b));
    }

    fn r(s: &str) -> Range4 {
        s.parse().unwrap()
    }

    fn client(n: u16) -> Ipv6Addr {
        Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, n)
    }

    #[test]
    fn parses_ranges() {
        assert_eq!(r("198.51.100.2-198.51.100.128").len(), 127);
        // A CIDR leases its hosts only: .1 and .2 of a /30, all of a /31 or /32.
        assert_eq!(
            r("198.51.100.0/30").to_string(),
            "198.51.100.1-198.51.100.2"
        );
        assert_eq!(
            r("198.51.100.200/30").to_string(),
            "198.51.100.201-198.51.100.202"
        );
        assert_eq!(r("198.51.100.0/24").len(), 254);
        assert_eq!(r("198.51.100.6/31").len(), 2);
        assert_eq!(r("198.51.100.0-198.51.100.3").len(), 4);
        assert_eq!(r("198.51.100.7").len(), 1);
        let err = "198.51.100.9-198.51.100.2".parse::<Range4>().unwrap_err();
        assert!(err.contains("ends before it starts"), "{err}");
        assert!("banana".parse::<Range4>().is_err());
    }

    #[test]
    fn subnets_cover_the_range_exactly() {
        // .2-.128 split by hand into aligned blocks: .2/31 .4/30 .8/29 .16/28 .32/27 .64/26
        // and .128 alone.
        let nets = r("198.51.100.2-198.51.100.128").subnets();
        let text: Vec<String> = nets.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "198.51.100.2/31",
                "198.51.100.4/30",
                "198.51.100.8/29",
                "198.51.100.16/28",
                "198.51.100.32/27",
                "198.51.100.64/26",
                "198.51.100.128/32",
            ]
        );
        // And for other ranges: every address of the range in exactly one subnet, none outside.
        for range in [
            "198.51.100.0-198.51.100.255",
            "198.51.100.7",
            "198.51.100.3-198.51.100.200",
        ] {
            let range = r(range);
            let mut seen = std::collections::BTreeSet::new();
            for net in range.subnets() {
                for a in u32::from(net.network())..=u32::from(net.broadcast()) {
                    seen.insert(Ipv4Addr::from(a));
                }
            }
            let want: std::collections::BTreeSet<_> = range.addrs().collect();
            assert_eq!(seen, want, "{range}");
            let total: u64 = range
                .subnets()
                .iter()
                .map(|n| 1u64 << (32 - n.prefix_len()))
                .sum();
            assert_eq!(total, want.len() as u64, "{range}: subnets overlap");
        }
    }

    #[test]
    fn allocates_distinct_addresses_until_exhausted() {
        let now = Instant::now();
        let gw: Ipv4Addr = "198.51.100.1".parse().unwrap();
        let mut pool = Pool::new(&[r("198.51.100.1-198.51.100.3")], &[gw], Duration::ZERO).unwrap();
        let a = pool.allocate(client(1), now).unwrap();
        let b = pool.allocate(client(2), now).unwrap();
        assert_ne!(a, b);
        assert!(a != gw && b != gw);
        assert_eq!(pool.allocate(client(3), now), None);
        pool.release(a, client(1), now);
        assert_eq!(pool.allocate(client(3), now), Some(a));
    }

    #[test]
    fn sticky_within_hold_and_not_given_away_while_others_are_free() {
        let t0 = Instant::now();
        let hold = Duration::from_secs(300);
        let mut pool = Pool::new(&[r("198.51.100.2-198.51.100.5")], &[], hold).unwrap();
        let a = pool.allocate(client(1), t0).unwrap();
        pool.release(a, client(1), t0);
        // Another client gets a different address while a's hold lasts.
        let b = pool.allocate(client(2), t0).unwrap();
        assert_ne!(a, b);
        // The original client gets its address back.
        assert_eq!(
            pool.allocate(client(1), t0 + Duration::from_secs(10)),
            Some(a)
        );
    }

    #[test]
    fn held_addresses_are_reused_when_nothing_else_is_free() {
        let t0 = Instant::now();
        let mut pool = Pool::new(&[r("198.51.100.2")], &[], Duration::from_secs(300)).unwrap();
        let a = pool.allocate(client(1), t0).unwrap();
        pool.release(a, client(1), t0);
        assert_eq!(pool.allocate(client(2), t0), Some(a));
        // client 1's hold is gone with it.
        pool.release(a, client(2), t0);
        assert_eq!(pool.allocate(client(1), t0), Some(a));
    }

    #[test]
    fn rejects_overlap_and_empty() {
        assert!(
            Pool::new(
                &[r("198.51.100.2-198.51.100.5"), r("198.51.100.5")],
                &[],
                Duration::ZERO
            )
            .is_err()
        );
        let only: Ipv4Addr = "198.51.100.1".parse().unwrap();
        assert!(Pool::new(&[r("198.51.100.1")], &[only], Duration::ZERO).is_err());
    }
}
