//! MAP-E (RFC 7597, SPEC §6), the decisions: the rule calculator (`mape calc`), the CE's NAPT
//! table and translation. The CE and BR daemons are [`crate::daemon::ce`] and
//! [`crate::daemon::br`].
pub mod pcp;
pub mod portlog;
pub mod profiles;
pub mod rule;
pub mod table;
pub mod translate;

use anyhow::{Result, anyhow, bail};

use std::net::SocketAddrV4;

use ipnet::{Ipv4Net, Ipv6Net};
use rule::{InterfaceId, Mapping, Rule};
use table::{TCP, UDP};

/// What `mape calc` (and the CE) is asked: a profile or a rule, optional explicit port
/// parameters, and the end-user prefix (the flags of `cli::RuleArgs`, as plain data).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuleQuery {
    pub profile: Option<String>,
    pub rule_ipv6: Option<Ipv6Net>,
    pub rule_ipv4: Option<Ipv4Net>,
    pub ea_len: Option<u8>,
    pub psid_offset: Option<u8>,
    pub psid: Option<u16>,
    pub psid_len: Option<u8>,
    pub br: Option<std::net::Ipv6Addr>,
    pub interface_id: Option<InterfaceId>,
    pub prefix: Ipv6Net,
}

/// `tunnel-ctl mape calc` (and the CE's own mapping).
pub fn calc(args: &RuleQuery) -> Result<Mapping> {
    if args.profile.is_some() && args.psid.is_some() {
        bail!("--psid/--psid-len go with a custom rule, not a profile");
    }
    let mapping = match (&args.profile, &args.rule_ipv6, &args.rule_ipv4, args.ea_len) {
        (Some(name), None, None, None) => profiles::Profile::by_name(name)
            .ok_or_else(|| {
                anyhow!(
                    "unknown profile {name:?} (known: {})",
                    profiles::names().join(", ")
                )
            })?
            .map(&args.prefix),
        (None, Some(ipv6), Some(ipv4), Some(ea_len)) => Rule {
            ipv6: *ipv6,
            ipv4: *ipv4,
            ea_len,
            psid_offset: args.psid_offset.unwrap_or(6),
            br: args.br,
            interface_id: args.interface_id.unwrap_or(InterfaceId::Rfc7597),
            port_params: args
                .psid
                .zip(args.psid_len)
                .map(|(psid, psid_len)| rule::PortParams { psid, psid_len }),
        }
        .map(&args.prefix),
        (Some(_), ..) => bail!("give either --profile or the rule flags, not both"),
        _ => bail!(
            "give --profile NAME, or all of --rule-ipv6, --rule-ipv4 and --ea-len for a custom rule"
        ),
    };
    let mut mapping = mapping.map_err(|e| anyhow!("{e}"))?;
    if let (Some(layout), Some(_)) = (args.interface_id, &args.profile) {
        mapping.ce_ipv6 = rule::ce_address(&args.prefix, mapping.ipv4, mapping.psid, layout);
    }
    Ok(mapping)
}

/// A static port forward as written on the command line: `EXTPORT=IPV4:PORT[/tcp|/udp]`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ForwardSpec {
    pub ext_port: u16,
    pub lan: SocketAddrV4,
    /// The protocols (both without a suffix).
    pub protos: Vec<u8>,
}

impl std::str::FromStr for ForwardSpec {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<ForwardSpec, String> {
        const FORM: &str = "write EXTPORT=IPV4:PORT[/tcp|/udp], e.g. 1680=192.168.1.10:80/tcp";
        let (ext, rest) = s
            .split_once('=')
            .ok_or_else(|| format!("forward {s:?} has no '='; {FORM}"))?;
        let (lan, protos) = match rest.rsplit_once('/') {
            Some((lan, p)) => (
                lan,
                parse_protos(p)
                    .ok_or_else(|| format!("unknown protocol {p:?} in {s:?}; {FORM}"))?,
            ),
            None => (rest, vec![TCP, UDP]),
        };
        Ok(ForwardSpec {
            ext_port: ext
                .trim()
                .parse()
                .map_err(|e| format!("external port {ext:?}: {e}; {FORM}"))?,
            lan: lan
                .trim()
                .parse()
                .map_err(|e| format!("LAN endpoint {lan:?}: {e}; {FORM}"))?,
            protos,
        })
    }
}

/// The forward(s) on one external port: `EXTPORT[/tcp|/udp]` (both protocols without a
/// suffix), as `forward del` takes it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ForwardPort {
    pub ext_port: u16,
    pub protos: Vec<u8>,
}

impl std::str::FromStr for ForwardPort {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<ForwardPort, String> {
        let bad = || format!("bad forward {s:?}: write EXTPORT or EXTPORT/tcp or EXTPORT/udp");
        let (num, protos) = match s.split_once('/') {
            Some((n, p)) => (n, parse_protos(p).ok_or_else(bad)?),
            None => (s, vec![TCP, UDP]),
        };
        Ok(ForwardPort {
            ext_port: num.trim().parse().map_err(|_| bad())?,
            protos,
        })
    }
}

impl std::fmt::Display for ForwardPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.protos.as_slice() {
            [p] => write!(f, "{}/{}", self.ext_port, table::proto_name(*p)),
            _ => write!(f, "{}", self.ext_port),
        }
    }
}

/// `tcp`, `udp` → their numbers.
pub fn parse_protos(p: &str) -> Option<Vec<u8>> {
    match p.trim().to_ascii_lowercase().as_str() {
        "tcp" => Some(vec![TCP]),
        "udp" => Some(vec![UDP]),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_specs() {
        let f: ForwardSpec = "1680=198.51.100.10:80/tcp".parse().unwrap();
        assert_eq!(f.ext_port, 1680);
        assert_eq!(f.lan, "198.51.100.10:80".parse().unwrap());
        assert_eq!(f.protos, vec![TCP]);
        let both: ForwardSpec = "1680=198.51.100.10:80".parse().unwrap();
        assert_eq!(both.protos, vec![TCP, UDP]);
        for bad in [
            "1680",
            "x=198.51.100.10:80",
            "1680=198.51.100.10",
            "1680=198.51.100.10:80/sctp",
        ] {
            let err = bad.parse::<ForwardSpec>().unwrap_err();
            assert!(err.contains("EXTPORT=IPV4:PORT"), "{bad}: {err}");
        }
    }
}
