//! DNS servers for the 101 text: the server's /etc/resolv.conf unless --dns says otherwise.
use std::net::Ipv4Addr;

/// IPv4 `nameserver` entries of a resolv.conf text, in order.
pub fn parse_resolv_conf(text: &str) -> Vec<Ipv4Addr> {
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

/// The system's IPv4 nameservers (empty when unreadable).
pub fn system_nameservers() -> Vec<Ipv4Addr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .map(|t| parse_resolv_conf(&t))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_ipv4_nameservers_only() {
        let text = "# comment\nsearch example\nnameserver 192.0.2.53\nnameserver 2001:db8::53\n\
                    nameserver 192.0.2.54 # trailing\noptions ndots:1\n";
        assert_eq!(
            parse_resolv_conf(text),
            vec![
                "192.0.2.53".parse::<Ipv4Addr>().unwrap(),
                "192.0.2.54".parse().unwrap()
            ]
        );
    }
}
