//! DNS servers for the 101 and 108 texts: the server's /etc/resolv.conf unless --dns/--dns6
//! say otherwise.
use std::{net::IpAddr, str::FromStr};

/// `nameserver` entries of a resolv.conf text that parse as `A` (IPv4 or IPv6), in order.
pub fn parse_resolv_conf<A: FromStr>(text: &str) -> Vec<A> {
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next())
                .flatten()
                .and_then(|a| a.parse().ok())
        })
        .collect()
}

/// The system's nameservers of one family (empty when unreadable).
pub fn system_nameservers<A: FromStr>() -> Vec<A> {
    std::fs::read_to_string("/etc/resolv.conf")
        .map(|t| parse_resolv_conf(&t))
        .unwrap_or_default()
}

/// Whether a resolv.conf entry is usable from a tunnel client (not loopback or link-local).
pub fn usable(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => !a.is_loopback() && !a.is_link_local(),
        IpAddr::V6(a) => !a.is_loopback() && !a.is_unicast_link_local(),
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    #[test]
    fn takes_one_family_at_a_time() {
        let text = "# comment\nsearch example\nnameserver 192.0.2.53\nnameserver 2001:db8::53\n\
                    nameserver 192.0.2.54 # trailing\noptions ndots:1\n";
        assert_eq!(
            parse_resolv_conf::<Ipv4Addr>(text),
            vec![
                "192.0.2.53".parse::<Ipv4Addr>().unwrap(),
                "192.0.2.54".parse().unwrap()
            ]
        );
        assert_eq!(
            parse_resolv_conf::<Ipv6Addr>(text),
            vec!["2001:db8::53".parse::<Ipv6Addr>().unwrap()]
        );
        assert!(!usable("::1".parse().unwrap()));
        assert!(usable("2001:db8::53".parse().unwrap()));
    }
}
