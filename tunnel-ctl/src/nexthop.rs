//! The next-hop cache's decisions (pure; `tunnel_common::nexthop` says what the cache is, and
//! `dataplane::nexthop` does the I/O): which changes of the kernel's routing state retire
//! every entry, whether the cache can give the FIB's answer at all, and which misses to
//! resolve. Time is a parameter.
use std::{
    collections::HashMap,
    net::IpAddr,
    time::{Duration, Instant},
};

/// An address family of the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

/// What the FIB helper reads of a neighbour entry: its link-layer address, and whether the
/// entry is usable (`NUD_VALID`: reachable, stale, delay, probe, permanent, noarp).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Neighbour {
    pub lladdr: Vec<u8>,
    pub usable: bool,
}

/// The neighbour table as far as cache entries depend on it. A cached next hop holds the
/// MAC of a usable neighbour, so the cache must go when such an entry changes its address,
/// stops being usable or disappears; the state changes the kernel reports all the time
/// (reachable ↔ stale ↔ delay ↔ probe) change nothing the FIB helper reads and retire
/// nothing.
#[derive(Debug, Default)]
pub struct Neighbours {
    known: HashMap<(u32, IpAddr), Neighbour>,
}

impl Neighbours {
    /// An entry added or changed (RTM_NEWNEIGH, or the start-up dump): whether cached next
    /// hops may now be wrong.
    pub fn changed(&mut self, ifindex: u32, addr: IpAddr, now: Neighbour) -> bool {
        match self.known.insert((ifindex, addr), now.clone()) {
            // A cached entry only ever names a usable neighbour with its address then.
            Some(before) => before.usable && before != now,
            // Nothing cached can depend on a neighbour we never saw usable (the FIB answered
            // "no neighbour" for it, which is never cached).
            None => false,
        }
    }

    /// An entry removed (RTM_DELNEIGH): whether cached next hops may now be wrong.
    pub fn removed(&mut self, ifindex: u32, addr: IpAddr) -> bool {
        self.known
            .remove(&(ifindex, addr))
            .is_none_or(|before| before.usable)
    }

    pub fn len(&self) -> usize {
        self.known.len()
    }

    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }
}

/// A policy routing rule, as far as the cache cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub family: Family,
    pub priority: u32,
    pub table: u32,
    /// The rule selects on something besides "all" (source, destination, iif, oif, fwmark,
    /// TOS, ports, uid, ...).
    pub selective: bool,
}

/// A route, as far as the cache cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub family: Family,
    /// Several next hops (RTA_MULTIPATH): the FIB picks one per flow.
    pub multipath: bool,
    /// A nexthop object (RTA_NH_ID): it can change without a route notification.
    pub nexthop_object: bool,
    /// IPv4: the route matches on TOS.
    pub tos: u8,
    /// IPv6: a source-specific route (`from`).
    pub src_len: u8,
}

pub const TABLE_LOCAL: u32 = 255;
pub const TABLE_MAIN: u32 = 254;
pub const TABLE_DEFAULT: u32 = 253;

/// Whether the cache, keyed by destination alone, gives for each family what the FIB helper
/// would: only when no policy rule but the kernel's own ones exists (then neither the
/// source, the ingress interface, the TOS nor a mark changes the answer), no route has
/// several next hops (the FIB picks one per flow) or a nexthop object (changed without a
/// route event), and no route matches on TOS (IPv4) or source (IPv6). For each family (IPv4,
/// IPv6): None when it can, else why not (for the log).
pub fn cacheable(rules: &[Rule], routes: &[Route]) -> (Option<String>, Option<String>) {
    let why_not = |family: Family| -> Option<String> {
        let kernel_rules = match family {
            Family::V4 => &[
                (0, TABLE_LOCAL),
                (32766, TABLE_MAIN),
                (32767, TABLE_DEFAULT),
            ][..],
            Family::V6 => &[(0, TABLE_LOCAL), (32766, TABLE_MAIN)][..],
        };
        if let Some(r) = rules
            .iter()
            .filter(|r| r.family == family)
            .find(|r| r.selective || !kernel_rules.contains(&(r.priority, r.table)))
        {
            return Some(format!(
                "policy routing (rule {} to table {}{})",
                r.priority,
                r.table,
                if r.selective { ", selective" } else { "" }
            ));
        }
        let routes = || routes.iter().filter(|r| r.family == family);
        if routes().any(|r| r.multipath) {
            return Some("a route with several next hops".into());
        }
        if routes().any(|r| r.nexthop_object) {
            return Some("a route through a nexthop object".into());
        }
        if routes().any(|r| r.tos != 0) {
            return Some("a route that matches on TOS".into());
        }
        if routes().any(|r| r.src_len != 0) {
            return Some("a source-specific route".into());
        }
        None
    };
    (why_not(Family::V4), why_not(Family::V6))
}

/// How long a destination resolved in the current generation is not asked again (the
/// program reports it again when its entry was evicted, or is still missing).
pub const RESOLVED_HOLD: Duration = Duration::from_secs(1);
/// How long a destination whose resolution gave nothing to cache (no neighbour yet, an error)
/// waits before it is asked again.
pub const RETRY_AFTER: Duration = Duration::from_millis(50);
/// Remembered misses, at most (the oldest are forgotten first when the table is full).
pub const MAX_REMEMBERED: usize = 65_536;

/// Which reported misses to resolve: each destination once per generation, again only after
/// [`RESOLVED_HOLD`] (or [`RETRY_AFTER`] when there was nothing to cache).
#[derive(Debug, Default)]
pub struct Misses {
    seen: HashMap<(Family, [u8; 16]), Seen>,
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    generation: u32,
    at: Instant,
    cached: bool,
}

impl Misses {
    /// Whether to resolve `addr` now.
    pub fn take(&mut self, family: Family, addr: [u8; 16], generation: u32, now: Instant) -> bool {
        if let Some(seen) = self.seen.get(&(family, addr)) {
            let hold = if seen.cached {
                RESOLVED_HOLD
            } else {
                RETRY_AFTER
            };
            if seen.generation == generation && now.duration_since(seen.at) < hold {
                return false;
            }
        }
        if self.seen.len() >= MAX_REMEMBERED {
            self.forget_older_than(now, RETRY_AFTER);
        }
        true
    }

    /// Records the outcome of a resolution: whether it left an entry in the cache.
    pub fn resolved(
        &mut self,
        family: Family,
        addr: [u8; 16],
        generation: u32,
        now: Instant,
        cached: bool,
    ) {
        if self.seen.len() >= MAX_REMEMBERED && !self.seen.contains_key(&(family, addr)) {
            return;
        }
        self.seen.insert(
            (family, addr),
            Seen {
                generation,
                at: now,
                cached,
            },
        );
    }

    /// Drops what is older than `age` (called now and then, and when full).
    pub fn forget_older_than(&mut self, now: Instant, age: Duration) {
        self.seen.retain(|_, s| now.duration_since(s.at) < age);
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// What a slot of a destination's set holds, as far as placing its entry goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotHolds {
    /// This destination's entry (of any generation).
    ThisDestination,
    /// Another destination's entry of the current generation.
    Other,
    /// Nothing the programs would use: empty, or of an older generation.
    Free,
}

/// Where entries go within their set (two slots, `tunnel_common::nexthop::set_base`): the
/// slot that holds the destination already, else a free one, else the one written before the
/// other, so that a third destination in a set takes the older entry's place.
#[derive(Debug)]
pub struct Placement {
    /// Per set, the slot written before the other.
    older: Vec<u8>,
}

const _: () = assert!(tunnel_common::nexthop::NEXTHOP_WAYS == 2);

impl Placement {
    pub fn new(sets: usize) -> Placement {
        Placement {
            older: vec![0; sets],
        }
    }

    /// The slot (0 or 1) of `set` to write, and it counts as written.
    pub fn choose(&mut self, set: usize, slots: [SlotHolds; 2]) -> usize {
        let older = usize::from(self.older[set]);
        let way = if let Some(w) = slots.iter().position(|s| *s == SlotHolds::ThisDestination) {
            w
        } else if let Some(w) = slots.iter().position(|s| *s == SlotHolds::Free) {
            w
        } else {
            older
        };
        // The other slot is now the older one.
        self.older[set] = (1 - way) as u8;
        way
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn n(mac: u8, usable: bool) -> Neighbour {
        Neighbour {
            lladdr: vec![2, 0, 0, 0, 0, mac],
            usable,
        }
    }

    const GW: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));

    #[test]
    fn only_a_new_address_or_a_lost_neighbour_retires_the_cache() {
        let mut table = Neighbours::default();
        assert!(!table.changed(3, GW, n(1, true)), "first sight");
        // The kernel's routine state changes keep the address and usability.
        assert!(!table.changed(3, GW, n(1, true)));
        assert!(table.changed(3, GW, n(2, true)), "new MAC");
        assert!(table.changed(3, GW, n(2, false)), "failed");
        assert!(!table.changed(3, GW, n(2, false)), "still failed");
        assert!(
            !table.changed(3, GW, n(2, true)),
            "usable again: nothing cached used it"
        );
        assert!(table.removed(3, GW), "a usable one gone");
        assert!(table.removed(3, GW), "one never seen gone: we cannot know");
        table.changed(4, GW, n(1, false));
        assert!(!table.removed(4, GW), "an unusable one gone");
        assert!(
            !table.changed(5, GW, n(9, true)),
            "other interface, first sight"
        );
    }

    fn rule(family: Family, priority: u32, table: u32) -> Rule {
        Rule {
            family,
            priority,
            table,
            selective: false,
        }
    }

    fn route(family: Family) -> Route {
        Route {
            family,
            multipath: false,
            nexthop_object: false,
            tos: 0,
            src_len: 0,
        }
    }

    fn kernel_rules() -> Vec<Rule> {
        vec![
            rule(Family::V4, 0, TABLE_LOCAL),
            rule(Family::V4, 32766, TABLE_MAIN),
            rule(Family::V4, 32767, TABLE_DEFAULT),
            rule(Family::V6, 0, TABLE_LOCAL),
            rule(Family::V6, 32766, TABLE_MAIN),
        ]
    }

    #[test]
    fn the_cache_answers_only_where_the_destination_alone_decides() {
        let routes = vec![route(Family::V4), route(Family::V6)];
        let on = |(v4, v6): (Option<String>, Option<String>)| (v4.is_none(), v6.is_none());
        assert_eq!(on(cacheable(&kernel_rules(), &routes)), (true, true));

        let mut rules = kernel_rules();
        rules.push(rule(Family::V4, 100, 10));
        let (v4, v6) = cacheable(&rules, &routes);
        assert_eq!(v4.as_deref(), Some("policy routing (rule 100 to table 10)"));
        assert_eq!(v6, None);

        let mut rules = kernel_rules();
        rules[4].selective = true;
        assert_eq!(
            on(cacheable(&rules, &routes)),
            (true, false),
            "main with a selector"
        );

        let mut multi = routes.clone();
        multi[0].multipath = true;
        assert_eq!(on(cacheable(&kernel_rules(), &multi)), (false, true));
        let mut nh = routes.clone();
        nh[1].nexthop_object = true;
        assert_eq!(on(cacheable(&kernel_rules(), &nh)), (true, false));
        let mut tos = routes.clone();
        tos[0].tos = 0x10;
        assert_eq!(on(cacheable(&kernel_rules(), &tos)), (false, true));
        let mut from = routes;
        from[1].src_len = 64;
        assert_eq!(on(cacheable(&kernel_rules(), &from)), (true, false));
    }

    #[test]
    fn each_miss_is_resolved_once_per_generation_and_retried_when_nothing_was_cached() {
        let mut misses = Misses::default();
        let t0 = Instant::now();
        let a = [1u8; 16];
        assert!(misses.take(Family::V6, a, 7, t0));
        misses.resolved(Family::V6, a, 7, t0, true);
        assert!(!misses.take(Family::V6, a, 7, t0 + Duration::from_millis(10)));
        assert!(!misses.take(Family::V6, a, 7, t0 + RESOLVED_HOLD / 2));
        assert!(
            misses.take(Family::V6, a, 7, t0 + RESOLVED_HOLD),
            "evicted, perhaps"
        );
        assert!(misses.take(Family::V6, a, 8, t0), "a new generation");
        assert!(misses.take(Family::V4, a, 7, t0), "the other family");

        let b = [2u8; 16];
        misses.resolved(Family::V4, b, 7, t0, false);
        assert!(!misses.take(Family::V4, b, 7, t0 + RETRY_AFTER / 2));
        assert!(misses.take(Family::V4, b, 7, t0 + RETRY_AFTER));

        misses.forget_older_than(t0 + Duration::from_secs(5), Duration::from_secs(1));
        assert!(misses.is_empty());
    }

    #[test]
    fn an_entry_replaces_its_own_then_a_free_slot_then_the_older_of_two() {
        use SlotHolds::*;
        let mut p = Placement::new(4);
        assert_eq!(p.choose(1, [Free, Free]), 0);
        assert_eq!(p.choose(1, [Other, Free]), 1, "the free slot");
        assert_eq!(p.choose(1, [Other, ThisDestination]), 1, "its own, again");
        assert_eq!(p.choose(1, [ThisDestination, Other]), 0, "its own");
        // Both slots taken by others: slot 1 was written before slot 0.
        assert_eq!(p.choose(1, [Other, Other]), 1);
        assert_eq!(p.choose(1, [Other, Other]), 0, "then the other one");
        assert_eq!(p.choose(1, [Other, Other]), 1);
        assert_eq!(p.choose(2, [Other, Other]), 0, "sets apart");
    }
}
