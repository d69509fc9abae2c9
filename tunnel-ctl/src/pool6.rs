//! IPv6 pools (SPEC §7): `--pool6` hands out /128s, `--delegate` hands out prefixes of
//! `--delegate-len`. Both are a prefix cut into equal units.
//!
//! A client's unit is picked from its own address (a stable hash, then the next free unit), so
//! a client usually gets the same IPv6 address or prefix back after a reconnect or a server
//! restart without any saved state. Units 0 and 1 are never handed out (the subnet-router
//! anycast address and the conventional router address).
use std::{collections::HashSet, fmt, net::Ipv6Addr};

use ipnet::Ipv6Net;

/// Units tried from a client's preferred one before giving up.
const MAX_PROBES: u64 = 65_536;

#[derive(Debug, Clone)]
pub struct Pool6 {
    prefix: Ipv6Net,
    unit_len: u8,
    in_use: HashSet<u64>,
}

impl Pool6 {
    /// `prefix` cut into `/unit_len` pieces (128 for single addresses).
    pub fn new(prefix: Ipv6Net, unit_len: u8) -> Result<Pool6, String> {
        let prefix = prefix.trunc();
        if unit_len > 128 || unit_len < prefix.prefix_len() {
            return Err(format!(
                "cannot cut {prefix} into /{unit_len}s (the length must be between {} and 128)",
                prefix.prefix_len()
            ));
        }
        if unit_len - prefix.prefix_len() < 2 {
            return Err(format!(
                "{prefix} holds too few /{unit_len}s: the first two are reserved, give a shorter prefix"
            ));
        }
        Ok(Pool6 {
            prefix,
            unit_len,
            in_use: HashSet::new(),
        })
    }

    pub fn prefix(&self) -> Ipv6Net {
        self.prefix
    }

    pub fn unit_len(&self) -> u8 {
        self.unit_len
    }

    /// How many units can be handed out (capped at 2^64 − 2 for display purposes).
    pub fn capacity(&self) -> u64 {
        let bits = u32::from(self.unit_len - self.prefix.prefix_len());
        1u64.checked_shl(bits).unwrap_or(u64::MAX).saturating_sub(2)
    }

    pub fn in_use(&self) -> usize {
        self.in_use.len()
    }

    /// Units worth searching: all of them, but at most 2^64.
    fn span(&self) -> u64 {
        self.capacity().saturating_add(2)
    }

    fn unit(&self, index: u64) -> Ipv6Net {
        let shift = 128 - u32::from(self.unit_len);
        let base = u128::from(self.prefix.network());
        let addr = base | u128::from(index).checked_shl(shift).unwrap_or(0);
        Ipv6Net::new(Ipv6Addr::from(addr), self.unit_len).expect("length checked in new")
    }

    fn index_of(&self, unit: Ipv6Net) -> Option<u64> {
        if unit.prefix_len() != self.unit_len || !self.prefix.contains(&unit) {
            return None;
        }
        let shift = 128 - u32::from(self.unit_len);
        let offset = (u128::from(unit.network()) - u128::from(self.prefix.network())) >> shift;
        u64::try_from(offset).ok()
    }

    /// A free unit for `client`: its preferred one, else the next free after it.
    pub fn allocate(&mut self, client: &[u8]) -> Option<Ipv6Net> {
        let span = self.span();
        let start = fnv1a(client) % span;
        for probe in 0..span.min(MAX_PROBES) {
            let index = (start + probe) % span;
            if index < 2 || self.in_use.contains(&index) {
                continue;
            }
            self.in_use.insert(index);
            return Some(self.unit(index));
        }
        None
    }

    /// Returns `unit` to the pool.
    pub fn release(&mut self, unit: Ipv6Net) {
        if let Some(index) = self.index_of(unit) {
            self.in_use.remove(&index);
        }
    }

    /// The unit of this pool that `addr` falls in.
    pub fn unit_of(&self, addr: Ipv6Addr) -> Option<Ipv6Net> {
        self.prefix
            .contains(&addr)
            .then(|| Ipv6Net::new(addr, self.unit_len).expect("valid").trunc())
    }
}

impl fmt::Display for Pool6 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.unit_len == 128 {
            write!(f, "{}", self.prefix)
        } else {
            write!(f, "{} in /{}s", self.prefix, self.unit_len)
        }
    }
}

/// FNV-1a: stable across runs and releases (std's hashers are not), which is the point.
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv6Net {
        s.parse().unwrap()
    }

    #[test]
    fn same_client_gets_the_same_unit_back() {
        let mut pool = Pool6::new(net("2001:db8:600::/64"), 128).unwrap();
        let a = pool.allocate(b"client-a").unwrap();
        assert_eq!(a.prefix_len(), 128);
        assert!(pool.prefix().contains(&a));
        pool.release(a);
        assert_eq!(pool.in_use(), 0);
        let mut fresh = Pool6::new(net("2001:db8:600::/64"), 128).unwrap();
        assert_eq!(
            fresh.allocate(b"client-a"),
            Some(a),
            "stable across restarts"
        );
        assert_eq!(pool.allocate(b"client-a"), Some(a));
    }

    #[test]
    fn delegates_distinct_prefixes_and_never_the_reserved_ones() {
        let mut pool = Pool6::new(net("2001:db8:700::/60"), 64).unwrap();
        assert_eq!(pool.capacity(), 14);
        let mut seen = HashSet::new();
        for i in 0..14u32 {
            let p = pool.allocate(&i.to_be_bytes()).unwrap();
            assert_eq!(p.prefix_len(), 64);
            assert!(p != net("2001:db8:700::/64") && p != net("2001:db8:700:1::/64"));
            assert!(seen.insert(p), "{p} handed out twice");
            assert_eq!(pool.unit_of(p.network() | Ipv6Addr::from(5u128)), Some(p));
        }
        assert_eq!(pool.allocate(b"one too many"), None);
        pool.release(*seen.iter().next().unwrap());
        assert!(pool.allocate(b"one too many").is_some());
    }

    #[test]
    fn rejects_unusable_sizes() {
        assert!(Pool6::new(net("2001:db8::/64"), 48).is_err());
        assert!(Pool6::new(net("2001:db8::/127"), 128).is_err());
        assert!(Pool6::new(net("2001:db8::/126"), 128).is_ok());
        assert_eq!(
            Pool6::new(net("2001:db8::/64"), 128).unwrap().capacity(),
            u64::MAX - 2
        );
    }
}
