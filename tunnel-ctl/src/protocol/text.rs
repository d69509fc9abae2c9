//! The ASCII payloads: 101 (IPv4 lease), 106 (native mode granted), 108 (IPv6 lease) and 110
//! (error).
use std::{
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
};

use ipnet::Ipv6Net;

/// The text of a payload the way a C peer means it: up to the first NUL (some servers count a
/// terminating NUL in `length`, and nothing after one is text).
fn c_string(data: &[u8]) -> &[u8] {
    data.split(|b| *b == 0).next().unwrap_or(data)
}

/// A shared lease's port set (RFC 7596): the SPEC §3 tokens `psid=P/K offset=A` of a 101
/// or a 106. The client NAPTs into the ports of PSID `psid` (of `psid_len` bits) at offset
/// `offset` (SPEC §6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Share {
    pub psid: u16,
    pub psid_len: u8,
    pub offset: u8,
}

impl Share {
    /// The share named by `tokens` (`key=value` pairs): None when there is no `psid`, Err
    /// when it is malformed or names no port at all.
    pub fn from_tokens<'a>(
        mut tokens: impl Iterator<Item = (&'a str, &'a str)> + Clone,
    ) -> Result<Option<Share>, String> {
        let Some((_, psid)) = tokens.clone().find(|(k, _)| *k == "psid") else {
            return Ok(None);
        };
        let offset = tokens.find(|(k, _)| *k == "offset").map_or("6", |t| t.1);
        let bad = || format!("psid={psid} offset={offset}: expected psid=P/K offset=A");
        let (p, k) = psid.split_once('/').ok_or_else(bad)?;
        let (psid, psid_len, offset): (u16, u8, u8) = (
            p.parse().map_err(|_| bad())?,
            k.parse().map_err(|_| bad())?,
            offset.parse().map_err(|_| bad())?,
        );
        if psid_len == 0 || u32::from(psid_len) + u32::from(offset) > 16 {
            return Err(format!(
                "psid length {psid_len} with offset {offset}: needs 1 <= length and length + offset <= 16"
            ));
        }
        if u32::from(psid) >= 1 << psid_len {
            return Err(format!("psid {psid} does not fit in {psid_len} bits"));
        }
        Ok(Some(Share {
            psid,
            psid_len,
            offset,
        }))
    }
}

impl fmt::Display for Share {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "psid={}/{} offset={}",
            self.psid, self.psid_len, self.offset
        )
    }
}

/// The 106 payload: `"<server-tunnel-ipv6> <mtu>"`, then for a shared lease its port set
/// (`psid=P/K offset=A`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NativeGrant {
    pub tunnel: Ipv6Addr,
    /// Inner (IPv4) MTU.
    pub mtu: u16,
    pub share: Option<Share>,
}

impl NativeGrant {
    /// Parses a 106 payload; tolerant of trailing spaces and NULs like the 101 parser.
    pub fn parse(data: &[u8]) -> Result<NativeGrant, String> {
        let text = String::from_utf8_lossy(c_string(data));
        let mut fields = text
            .trim_end_matches([' ', '\n', '\r'])
            .split_ascii_whitespace();
        let (Some(addr), Some(mtu)) = (fields.next(), fields.next()) else {
            return Err(format!("106 {text:?}: expected \"<ipv6> <mtu>\""));
        };
        let tunnel = addr
            .parse()
            .map_err(|_| format!("106: {addr:?} is not an IPv6 address"))?;
        let mtu: u16 = mtu
            .parse()
            .ok()
            .filter(|m| *m >= 576)
            .ok_or_else(|| format!("106: {mtu:?} is not an MTU (576-65535)"))?;
        let share = Share::from_tokens(fields.filter_map(|t| t.split_once('=')))
            .map_err(|e| format!("106: {e}"))?;
        Ok(NativeGrant { tunnel, mtu, share })
    }
}

impl fmt::Display for NativeGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.tunnel, self.mtu)?;
        if let Some(share) = self.share {
            write!(f, " {share}")?;
        }
        Ok(())
    }
}

/// The 101 payload: `"<ipv4> <route> <dns1> <dns2> <dns3>"`, then optional `key=value` tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease4 {
    pub addr: Ipv4Addr,
    /// 0.0.0.0 = default route.
    pub route: Ipv4Addr,
    pub dns: [Ipv4Addr; 3],
    /// Extra `key=value` tokens (e.g. `mtu=1460`), kept in order; old clients ignore them.
    pub extra: Vec<(String, String)>,
}

impl fmt::Display for Lease4 {
    /// Exactly the SPEC §3 text: no trailing space, no NUL.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {} {} {}",
            self.addr, self.route, self.dns[0], self.dns[1], self.dns[2]
        )?;
        for (k, v) in &self.extra {
            write!(f, " {k}={v}")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TextError {
    #[error("101 text is not ASCII")]
    NotAscii,
    #[error("101 text has {0} fields, expected at least 5 (ip route dns dns dns)")]
    TooFewFields(usize),
    #[error("101 field {field} is not an IPv4 address: {value:?}")]
    BadAddress { field: &'static str, value: String },
}

impl Lease4 {
    /// Parses a 101 payload as servers send it: tolerates a trailing space, a trailing NUL (some
    /// servers count it in `length`), and unknown extra tokens.
    pub fn parse(data: &[u8]) -> Result<Lease4, TextError> {
        let text = std::str::from_utf8(c_string(data)).map_err(|_| TextError::NotAscii)?;
        let text = text.trim_end_matches([' ', '\n', '\r']);
        let fields: Vec<&str> = text.split_ascii_whitespace().collect();
        if fields.len() < 5 {
            return Err(TextError::TooFewFields(fields.len()));
        }
        let ip = |i: usize, field: &'static str| {
            fields[i]
                .parse::<Ipv4Addr>()
                .map_err(|_| TextError::BadAddress {
                    field,
                    value: fields[i].to_owned(),
                })
        };
        let extra = fields[5..]
            .iter()
            .filter_map(|t| t.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Ok(Lease4 {
            addr: ip(0, "ip")?,
            route: ip(1, "route")?,
            dns: [ip(2, "dns1")?, ip(3, "dns2")?, ip(4, "dns3")?],
            extra,
        })
    }

    /// The shared lease's port set, if the 101 names one.
    pub fn share(&self) -> Result<Option<Share>, String> {
        Share::from_tokens(self.extra.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .map_err(|e| format!("101: {e}"))
    }

    #[cfg(test)]
    /// An extra token's value.
    pub fn extra(&self, key: &str) -> Option<&str> {
        self.extra
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// The 108 payload (SPEC §3): `"<ipv6-addr/len> <ipv6-gateway> <dns6>..."`, then optional
/// `key=value` tokens.
///
/// `addr/len` is the client's own address and the size of what is routed to it: a /128 from
/// `--pool6`, or `<prefix>::1/64` for a delegated /64 (the client numbers itself from it and
/// may hand the rest to its LAN). A server with both pools sends the /128 and the delegated
/// prefix as `delegated=<prefix>/<len>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease6 {
    pub addr: Ipv6Addr,
    pub len: u8,
    pub gateway: Ipv6Addr,
    pub dns: Vec<Ipv6Addr>,
    pub delegated: Option<Ipv6Net>,
}

impl Lease6 {
    /// Everything routed to the client: its address's prefix, and the delegated one.
    pub fn routed(&self) -> Vec<Ipv6Net> {
        let own = Ipv6Net::new(self.addr, self.len)
            .expect("len checked")
            .trunc();
        std::iter::once(own).chain(self.delegated).collect()
    }

    /// The prefix to advertise on a LAN: the delegated one, or the lease itself when it is
    /// shorter than a /128.
    pub fn lan_prefix(&self) -> Option<Ipv6Net> {
        self.delegated.or_else(|| {
            (self.len < 128).then(|| Ipv6Net::new(self.addr, self.len).expect("valid").trunc())
        })
    }

    /// Parses a 108 payload (tolerant of trailing spaces and NULs like the 101 parser).
    pub fn parse(data: &[u8]) -> Result<Lease6, String> {
        let text =
            std::str::from_utf8(c_string(data)).map_err(|_| "108 text is not ASCII".to_string())?;
        let text = text.trim_end_matches([' ', '\n', '\r']);
        let mut fields = text.split_ascii_whitespace();
        let (Some(addr), Some(gateway)) = (fields.next(), fields.next()) else {
            return Err(format!(
                "108 {text:?}: expected \"<ipv6-addr/len> <ipv6-gateway> <dns6>...\""
            ));
        };
        let net: Ipv6Net = addr
            .parse()
            .map_err(|_| format!("108: {addr:?} is not an IPv6 address/length"))?;
        let gateway = gateway
            .parse()
            .map_err(|_| format!("108: gateway {gateway:?} is not an IPv6 address"))?;
        let mut lease = Lease6 {
            addr: net.addr(),
            len: net.prefix_len(),
            gateway,
            dns: vec![],
            delegated: None,
        };
        for field in fields {
            match field.split_once('=') {
                Some(("delegated", v)) => {
                    lease.delegated = Some(
                        v.parse()
                            .map_err(|_| format!("108: delegated={v:?} is not an IPv6 prefix"))?,
                    )
                }
                Some(_) => {} // a future key: ignored
                None => lease.dns.push(
                    field
                        .parse()
                        .map_err(|_| format!("108: DNS {field:?} is not an IPv6 address"))?,
                ),
            }
        }
        Ok(lease)
    }
}

impl fmt::Display for Lease6 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} {}", self.addr, self.len, self.gateway)?;
        for d in &self.dns {
            write!(f, " {d}")?;
        }
        if let Some(p) = self.delegated {
            write!(f, " delegated={p}")?;
        }
        Ok(())
    }
}

/// Pads or cuts a DNS list to the three the 101 text carries (repeating the last; 0.0.0.0 when
/// there is none).
pub fn three_dns(servers: &[Ipv4Addr]) -> [Ipv4Addr; 3] {
    let last = servers.last().copied().unwrap_or(Ipv4Addr::UNSPECIFIED);
    [0, 1, 2].map(|i| servers.get(i).copied().unwrap_or(last))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Lease4 {
        Lease4 {
            addr: "198.51.100.2".parse().unwrap(),
            route: Ipv4Addr::UNSPECIFIED,
            dns: three_dns(&["192.0.2.53".parse().unwrap(), "192.0.2.54".parse().unwrap()]),
            extra: vec![],
        }
    }

    #[test]
    fn formats_exactly_the_spec_text() {
        assert_eq!(
            sample().to_string(),
            "198.51.100.2 0.0.0.0 192.0.2.53 192.0.2.54 192.0.2.54"
        );
    }

    #[test]
    fn parses_trailing_space_nul_and_extras() {
        let want = sample();
        for text in [
            "198.51.100.2 0.0.0.0 192.0.2.53 192.0.2.54 192.0.2.54",
            "198.51.100.2 0.0.0.0 192.0.2.53 192.0.2.54 192.0.2.54 ",
            "198.51.100.2 0.0.0.0 192.0.2.53 192.0.2.54 192.0.2.54\0",
            "198.51.100.2 0.0.0.0 192.0.2.53 192.0.2.54 192.0.2.54 \0",
        ] {
            assert_eq!(Lease4::parse(text.as_bytes()).unwrap(), want, "{text:?}");
        }
        let with_extra =
            Lease4::parse(b"198.51.100.2 0.0.0.0 192.0.2.53 192.0.2.54 192.0.2.54 mtu=1460 x")
                .unwrap();
        assert_eq!(with_extra.extra("mtu"), Some("1460"));
    }

    #[test]
    fn rejects_short_or_bad_text() {
        assert_eq!(
            Lease4::parse(b"198.51.100.2 0.0.0.0"),
            Err(TextError::TooFewFields(2))
        );
        assert!(matches!(
            Lease4::parse(b"198.51.100.999 0.0.0.0 a b c"),
            Err(TextError::BadAddress { field: "ip", .. })
        ));
    }

    #[test]
    fn dns_padding() {
        let a: Ipv4Addr = "192.0.2.1".parse().unwrap();
        assert_eq!(three_dns(&[a]), [a, a, a]);
        assert_eq!(three_dns(&[]), [Ipv4Addr::UNSPECIFIED; 3]);
    }

    #[test]
    fn lease6_round_trips_and_rejects_garbage() {
        let text =
            "2001:db8:600::2/128 fe80::1 2001:db8::53 2001:db8::54 delegated=2001:db8:700:5::/64";
        let l = Lease6::parse(format!("{text} \0").as_bytes()).unwrap();
        assert_eq!(l.to_string(), text);
        assert_eq!(l.dns.len(), 2);
        assert_eq!(
            l.routed(),
            vec![
                "2001:db8:600::2/128".parse::<Ipv6Net>().unwrap(),
                "2001:db8:700:5::/64".parse().unwrap()
            ]
        );
        assert_eq!(l.lan_prefix(), Some("2001:db8:700:5::/64".parse().unwrap()));
        let only_prefix = Lease6::parse(b"2001:db8:700:5::1/64 fe80::1").unwrap();
        assert_eq!(
            only_prefix.lan_prefix(),
            Some("2001:db8:700:5::/64".parse().unwrap())
        );
        assert!(only_prefix.dns.is_empty());
        assert!(Lease6::parse(b"2001:db8::1/128").is_err());
        assert!(Lease6::parse(b"198.51.100.2/32 fe80::1").is_err());
        assert!(Lease6::parse(b"2001:db8::1/129 fe80::1").is_err());
        assert!(Lease6::parse(b"2001:db8::1/128 fe80::1 not-an-address").is_err());
    }

    #[test]
    fn native_grant_round_trips_and_rejects_garbage() {
        let g = NativeGrant::parse(b"2001:db8:100::4 1460\0").unwrap();
        assert_eq!(g.to_string(), "2001:db8:100::4 1460");
        assert!(NativeGrant::parse(b"2001:db8:100::4").is_err());
        assert!(NativeGrant::parse(b"198.51.100.1 1460").is_err());
        assert!(NativeGrant::parse(b"2001:db8::1 12").is_err());
    }
}
