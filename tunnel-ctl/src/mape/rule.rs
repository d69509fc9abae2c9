//! MAP-E Basic Mapping Rules and the calculation of RFC 7597 §5-§6: from a rule and an
//! end-user IPv6 prefix, the shared IPv4 address, the PSID and its port set, and the CE's
//! IPv6 address.
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::Serialize;

/// Layout of the CE's interface identifier (SPEC §6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum InterfaceId {
    /// RFC 7597 §6: 16 zero bits | IPv4 (32) | PSID (16, right-aligned).
    Rfc7597,
    /// draft-ietf-softwire-map-03 (v6plus, OCN; OpenWrt's `legacymap`):
    /// 8 zero bits | IPv4 (32) | PSID (16) | 8 zero bits.
    Draft03,
}

/// A Basic Mapping Rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub ipv6: Ipv6Net,
    pub ipv4: Ipv4Net,
    /// EA-bits length (0-48).
    pub ea_len: u8,
    /// PSID offset `a` (0-15; RFC default 6).
    pub psid_offset: u8,
    pub br: Option<Ipv6Addr>,
    pub interface_id: InterfaceId,
    /// Port parameters given outright (RFC 7597 §5.1 / RFC 7598 S46_PORTPARAMS) instead of
    /// carried in the EA bits: a full IPv4 address (EA bits = IPv4 suffix bits only) shared
    /// by PSID.
    pub port_params: Option<PortParams>,
}

/// An explicit PSID and its length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortParams {
    pub psid: u16,
    pub psid_len: u8,
}

/// The result of applying a rule to an end-user prefix.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Mapping {
    pub ipv4: Ipv4Addr,
    pub psid: u16,
    pub psid_len: u8,
    pub psid_offset: u8,
    pub ea_len: u8,
    pub port_count: u32,
    /// Inclusive `[first, last]` ranges, ascending.
    pub port_ranges: Vec<[u16; 2]>,
    pub ce_ipv6: Ipv6Addr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub br: Option<Ipv6Addr>,
    pub rule_ipv6: Ipv6Net,
    pub rule_ipv4: Ipv4Net,
}

impl Mapping {
    /// The text form of `mape calc`: one fact per line, port ranges as `first-last`.
    pub fn describe(&self) -> String {
        let ports = if self.psid_len == 0 {
            "all 65536 (the address is not shared)".to_string()
        } else {
            format!("{} in {} blocks", self.port_count, self.port_ranges.len())
        };
        let mut out = format!(
            "ipv4         {}\npsid         {} (length {}, offset {})\nports        {ports}\nce_ipv6      {}\n",
            self.ipv4, self.psid, self.psid_len, self.psid_offset, self.ce_ipv6
        );
        if let Some(br) = self.br {
            out += &format!("br           {br}\n");
        }
        out += &format!(
            "rule         {} -> {}, EA bits {}\nport_ranges  ",
            self.rule_ipv6, self.rule_ipv4, self.ea_len
        );
        let ranges: Vec<String> = self
            .port_ranges
            .iter()
            .map(|[f, l]| format!("{f}-{l}"))
            .collect();
        out += &ranges.join(" ");
        out
    }
}

impl Rule {
    /// Checks RFC 7597 §5's constraints; the error says which and why.
    pub fn validate(&self) -> Result<(), String> {
        if self.ea_len > 48 {
            return Err(format!(
                "EA-bits length {} is out of range 0-48",
                self.ea_len
            ));
        }
        let q = 32 - self.ipv4.prefix_len();
        if self.ea_len < q {
            return Err(format!(
                "EA-bits length {} is shorter than the {q} IPv4 suffix bits of {}: that would \
                 delegate an IPv4 prefix, which this calculator does not do",
                self.ea_len, self.ipv4
            ));
        }
        let mut k = self.ea_len - q;
        if let Some(pp) = self.port_params {
            if k != 0 {
                return Err(format!(
                    "the EA bits already carry a {k}-bit PSID ({} EA bits, {q} IPv4 suffix \
                     bits); an explicit PSID only goes with a rule whose EA bits hold no PSID",
                    self.ea_len
                ));
            }
            if pp.psid_len == 0 || pp.psid_len > 16 {
                return Err(format!("PSID length {} is out of range 1-16", pp.psid_len));
            }
            if u32::from(pp.psid) >> pp.psid_len != 0 {
                return Err(format!(
                    "PSID {:#x} does not fit in {} bits",
                    pp.psid, pp.psid_len
                ));
            }
            k = pp.psid_len;
        }
        if k > 16 || u32::from(self.psid_offset) + u32::from(k) > 16 {
            return Err(format!(
                "PSID offset {} + PSID length {k} exceed the 16 port bits",
                self.psid_offset
            ));
        }
        if u32::from(self.ipv6.prefix_len()) + u32::from(self.ea_len) > 64 {
            return Err(format!(
                "rule prefix {} + {} EA bits go past /64",
                self.ipv6, self.ea_len
            ));
        }
        Ok(())
    }

    /// Whether the rule covers `prefix` (and the prefix holds all the EA bits).
    pub fn covers(&self, prefix: &Ipv6Net) -> bool {
        self.ipv6.contains(prefix)
    }

    /// Applies the rule to the end-user prefix.
    pub fn map(&self, prefix: &Ipv6Net) -> Result<Mapping, String> {
        self.validate()?;
        if !self.covers(prefix) {
            return Err(format!("rule {} does not cover {prefix}", self.ipv6));
        }
        let r6 = u32::from(self.ipv6.prefix_len());
        let o = u32::from(self.ea_len);
        if u32::from(prefix.prefix_len()) < r6 + o {
            return Err(format!(
                "end-user prefix {prefix} is shorter than rule prefix /{r6} + {o} EA bits = /{}",
                r6 + o
            ));
        }
        let bits = u128::from(prefix.network());
        let ea = if o == 0 {
            0
        } else {
            (bits >> (128 - r6 - o)) & ((1u128 << o) - 1)
        } as u64;
        let q = 32 - u32::from(self.ipv4.prefix_len());
        let ea_psid_len = o - q;
        let suffix = (ea >> ea_psid_len) as u32;
        let (psid, k) = match self.port_params {
            Some(pp) => (pp.psid, u32::from(pp.psid_len)),
            None => ((ea & ((1u64 << ea_psid_len) - 1)) as u16, ea_psid_len),
        };
        let ipv4 = Ipv4Addr::from(u32::from(self.ipv4.network()) | suffix);
        let (port_ranges, port_count) = port_set(self.psid_offset, k as u8, psid);
        Ok(Mapping {
            ipv4,
            psid,
            psid_len: k as u8,
            psid_offset: self.psid_offset,
            ea_len: self.ea_len,
            port_count,
            port_ranges,
            ce_ipv6: ce_address(prefix, ipv4, psid, self.interface_id),
            br: self.br,
            rule_ipv6: self.ipv6,
            rule_ipv4: self.ipv4,
        })
    }
}

/// The ports of PSID `psid` (length `k`, offset `a`), as inclusive ranges: with
/// m = 16 − a − k, `(j << (16−a)) | (psid << m) | i` for j = 1 … 2^a−1 (j = 0 when a = 0)
/// and i = 0 … 2^m−1 (SPEC §6, RFC 7597 §5.1). With k = 0 the address is not shared and
/// every port is the CE's (RFC 7597 Appendix A, example 4: the PSID offset does not apply).
pub fn port_set(a: u8, k: u8, psid: u16) -> (Vec<[u16; 2]>, u32) {
    if k == 0 {
        return (vec![[0, u16::MAX]], 1 << 16);
    }
    let m = 16 - u32::from(a) - u32::from(k);
    let blocks: Vec<u32> = if a == 0 {
        vec![0]
    } else {
        (1..(1u32 << a)).collect()
    };
    let mut ranges = Vec::with_capacity(blocks.len());
    for j in blocks {
        let first = (j << (16 - u32::from(a))) | (u32::from(psid) << m);
        let last = first | ((1 << m) - 1);
        ranges.push([first as u16, last as u16]);
    }
    let count = ranges.iter().map(|[f, l]| u32::from(l - f) + 1).sum();
    (ranges, count)
}

/// The CE's address: the end-user prefix's first /64 with the interface id of `layout`.
pub fn ce_address(prefix: &Ipv6Net, ipv4: Ipv4Addr, psid: u16, layout: InterfaceId) -> Ipv6Addr {
    let subnet = u128::from(prefix.network()) & !((1u128 << 64) - 1);
    let iid = tunnel_common::mape::interface_id(layout.code(), u32::from(ipv4), psid);
    Ipv6Addr::from(subnet | u128::from(iid))
}

impl InterfaceId {
    /// The layout's code in [`tunnel_common::mape::MapRule::iid_layout`].
    pub fn code(self) -> u8 {
        match self {
            InterfaceId::Rfc7597 => tunnel_common::mape::IID_RFC7597,
            InterfaceId::Draft03 => tunnel_common::mape::IID_DRAFT03,
        }
    }
}

/// A rule as the BR takes it on the command line: `IPV6PREFIX,IPV4PREFIX,EA_LEN[,PSID_OFFSET]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleSpec {
    pub ipv6: Ipv6Net,
    pub ipv4: Ipv4Net,
    pub ea_len: u8,
    pub psid_offset: u8,
}

impl std::str::FromStr for RuleSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<RuleSpec, String> {
        const FORM: &str = "write IPV6PREFIX,IPV4PREFIX,EA_LEN[,PSID_OFFSET], e.g. 2001:db8::/40,203.0.113.0/24,16,6";
        let parts: Vec<&str> = s.split(',').map(str::trim).collect();
        if !(3..=4).contains(&parts.len()) {
            return Err(format!("rule {s:?} has {} fields; {FORM}", parts.len()));
        }
        let spec = RuleSpec {
            ipv6: parts[0]
                .parse()
                .map_err(|e| format!("rule IPv6 prefix {:?}: {e}; {FORM}", parts[0]))?,
            ipv4: parts[1]
                .parse()
                .map_err(|e| format!("rule IPv4 prefix {:?}: {e}; {FORM}", parts[1]))?,
            ea_len: parts[2]
                .parse()
                .map_err(|e| format!("EA length {:?}: {e}; {FORM}", parts[2]))?,
            psid_offset: match parts.get(3) {
                Some(a) => a
                    .parse()
                    .map_err(|e| format!("PSID offset {a:?}: {e}; {FORM}"))?,
                None => 6,
            },
        };
        spec.rule(InterfaceId::Rfc7597).validate()?;
        Ok(spec)
    }
}

impl RuleSpec {
    pub fn rule(&self, interface_id: InterfaceId) -> Rule {
        Rule {
            ipv6: self.ipv6.trunc(),
            ipv4: self.ipv4.trunc(),
            ea_len: self.ea_len,
            psid_offset: self.psid_offset,
            br: None,
            interface_id,
            port_params: None,
        }
    }
}

impl Rule {
    /// The rule as the BR's programs take it.
    pub fn to_map_rule(&self) -> tunnel_common::mape::MapRule {
        tunnel_common::mape::MapRule {
            ipv6_hi: (u128::from(self.ipv6.network()) >> 64) as u64,
            ipv4: u32::from(self.ipv4.network()),
            ipv6_len: self.ipv6.prefix_len(),
            ipv4_len: self.ipv4.prefix_len(),
            ea_len: self.ea_len,
            psid_offset: self.psid_offset,
            iid_layout: self.interface_id.code(),
            _pad: [0; 7],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rfc_rule() -> Rule {
        Rule {
            ipv6: "2001:db8::/40".parse().unwrap(),
            ipv4: "192.0.2.0/24".parse().unwrap(),
            ea_len: 16,
            psid_offset: 6,
            br: None,
            interface_id: InterfaceId::Rfc7597,
            port_params: None,
        }
    }

    /// RFC 7597 Appendix A, example 1: end-user prefix 2001:db8:0012:3400::/56.
    #[test]
    fn rfc7597_example_1() {
        let m = rfc_rule()
            .map(&"2001:db8:12:3400::/56".parse().unwrap())
            .unwrap();
        assert_eq!(m.ipv4, Ipv4Addr::new(192, 0, 2, 18));
        assert_eq!((m.psid, m.psid_len), (0x34, 8));
        assert_eq!(
            m.ce_ipv6,
            "2001:db8:12:3400:0:c000:212:34"
                .parse::<Ipv6Addr>()
                .unwrap()
        );
        // a = 6, k = 8, m = 2: 63 blocks of 4 ports.
        assert_eq!(m.port_count, 252);
        assert_eq!(m.port_ranges.len(), 63);
        assert_eq!(m.port_ranges[0], [1232, 1235]);
        assert_eq!(m.port_ranges[62], [64720, 64723]);
    }

    /// RFC 7597 Appendix A, examples 4 and 5 share this rule: the end-user prefix is the rule
    /// prefix, no EA bits, a /32 rule IPv4 prefix.
    fn no_ea_rule(port_params: Option<PortParams>) -> Rule {
        Rule {
            ipv6: "2001:db8:12:3400::/56".parse().unwrap(),
            ipv4: "192.0.2.1/32".parse().unwrap(),
            ea_len: 0,
            psid_offset: 6,
            br: None,
            interface_id: InterfaceId::Rfc7597,
            port_params,
        }
    }

    /// Example 4: no embedded address bits and no address sharing. PSID length 0: the CE has
    /// the whole of 192.0.2.1, every port, and CE address 2001:db8:12:3400:0:c000:201:0.
    #[test]
    fn rfc7597_example_4() {
        let prefix: Ipv6Net = "2001:db8:12:3400::/56".parse().unwrap();
        let m = no_ea_rule(None).map(&prefix).unwrap();
        assert_eq!(m.ipv4, Ipv4Addr::new(192, 0, 2, 1));
        assert_eq!((m.psid, m.psid_len), (0, 0));
        assert_eq!(m.port_ranges, vec![[0, 65535]]);
        assert_eq!(m.port_count, 65536);
        assert_eq!(
            m.ce_ipv6,
            "2001:db8:12:3400:0:c000:201:0".parse::<Ipv6Addr>().unwrap()
        );
        // The BR side agrees: every port is the CE's.
        let mr = no_ea_rule(None).to_map_rule();
        assert_eq!(mr.psid_of(80), Some(0));
        assert_eq!(
            Ipv6Addr::from(mr.ce_address(u32::from(m.ipv4), 0)),
            m.ce_ipv6
        );
    }

    /// Example 5: no embedded address bits, address sharing by port parameters PSID 0x34 of
    /// length 8 (offset 6): ports 1232-1235, 2256-2259, … 64720-64723; CE address
    /// 2001:db8:12:3400:0:c000:201:34.
    #[test]
    fn rfc7597_example_5() {
        let pp = PortParams {
            psid: 0x34,
            psid_len: 8,
        };
        let m = no_ea_rule(Some(pp))
            .map(&"2001:db8:12:3400::/56".parse().unwrap())
            .unwrap();
        assert_eq!(m.ipv4, Ipv4Addr::new(192, 0, 2, 1));
        assert_eq!((m.psid, m.psid_len, m.psid_offset), (0x34, 8, 6));
        assert_eq!(m.port_count, 252);
        let expected: Vec<[u16; 2]> = (1u16..64)
            .map(|j| {
                let first = (j << 10) | (0x34 << 2);
                [first, first + 3]
            })
            .collect();
        assert_eq!(m.port_ranges, expected);
        assert_eq!(m.port_ranges[0], [1232, 1235]);
        assert_eq!(m.port_ranges[1], [2256, 2259]);
        assert_eq!(m.port_ranges[62], [64720, 64723]);
        assert_eq!(
            m.ce_ipv6,
            "2001:db8:12:3400:0:c000:201:34"
                .parse::<Ipv6Addr>()
                .unwrap()
        );
    }

    #[test]
    fn explicit_psid_is_checked() {
        let too_wide = PortParams {
            psid: 0x134,
            psid_len: 8,
        };
        let err = no_ea_rule(Some(too_wide)).validate().unwrap_err();
        assert!(err.contains("does not fit in 8 bits"), "{err}");
        let zero = PortParams {
            psid: 0,
            psid_len: 0,
        };
        assert!(
            no_ea_rule(Some(zero))
                .validate()
                .unwrap_err()
                .contains("1-16")
        );
        let mut both = rfc_rule();
        both.port_params = Some(PortParams {
            psid: 1,
            psid_len: 4,
        });
        let err = both.validate().unwrap_err();
        assert!(err.contains("already carry a 8-bit PSID"), "{err}");
    }

    /// The BR's per-packet arithmetic (tunnel-common, also run by eBPF) agrees with the
    /// calculator for every PSID (the /56's last EA byte) and every port of its set.
    #[test]
    fn map_rule_agrees_with_the_calculator() {
        let rule = rfc_rule();
        let mr = rule.to_map_rule();
        let mut owner = std::collections::HashMap::new();
        for psid in 0..=255u16 {
            let prefix: Ipv6Net = format!("2001:db8:12:{psid:02x}00::/56").parse().unwrap();
            let m = rule.map(&prefix).unwrap();
            assert_eq!(m.psid, psid);
            assert_eq!(m.ipv4, Ipv4Addr::new(192, 0, 2, 0x12));
            for [lo, hi] in &m.port_ranges {
                for port in *lo..=*hi {
                    assert_eq!(mr.psid_of(port), Some(psid), "port {port}");
                    assert!(owner.insert(port, psid).is_none(), "port {port} twice");
                }
            }
            assert_eq!(
                Ipv6Addr::from(mr.ce_address(u32::from(m.ipv4), m.psid)),
                m.ce_ipv6
            );
        }
        // Offset 6: every port from 1024 up belongs to exactly one PSID, none below.
        assert_eq!(owner.len(), 65536 - 1024);
        assert!((0..1024).all(|p| !owner.contains_key(&p) && mr.psid_of(p).is_none()));
        let spec: RuleSpec = "2001:db8::/40,192.0.2.0/24,16,6".parse().unwrap();
        assert_eq!(spec.rule(InterfaceId::Rfc7597), rule);
        let err = "2001:db8::/40,192.0.2.0/24"
            .parse::<RuleSpec>()
            .unwrap_err();
        assert!(err.contains("IPV6PREFIX,IPV4PREFIX,EA_LEN"), "{err}");
        assert!("2001:db8::/40,192.0.2.0/24,49".parse::<RuleSpec>().is_err());
    }

    #[test]
    fn validation_errors_name_the_problem() {
        let mut r = rfc_rule();
        r.ea_len = 49;
        assert!(r.validate().unwrap_err().contains("0-48"));
        let mut r = rfc_rule();
        r.ea_len = 4;
        assert!(r.validate().unwrap_err().contains("IPv4 suffix"));
        let err = rfc_rule()
            .map(&"2001:db9::/56".parse().unwrap())
            .unwrap_err();
        assert!(err.contains("does not cover"), "{err}");
        let err = rfc_rule()
            .map(&"2001:db8::/48".parse().unwrap())
            .unwrap_err();
        assert!(err.contains("shorter"), "{err}");
    }
}
