//! The rule tables shipped for the Japanese IPoE services (SPEC §6). They are data: what is
//! publicly known comes from community calculators, so a correction is an edit here.
use std::net::Ipv6Addr;

use ipnet::Ipv6Net;

use super::rule::{InterfaceId, Mapping, Rule};

/// (rule IPv6 prefix, rule IPv4 prefix, EA-bits length)
type RuleRow = (&'static str, &'static str, u8);

pub struct Profile {
    pub name: &'static str,
    pub rules: &'static [RuleRow],
    pub psid_offset: u8,
    pub br: &'static str,
    pub interface_id: InterfaceId,
}

pub const PROFILES: &[Profile] = &[
    Profile {
        name: "v6plus",
        rules: &[
            ("240b:10::/31", "106.72.0.0/15", 25),
            ("240b:12::/31", "14.8.0.0/15", 25),
            ("240b:250::/31", "14.10.0.0/15", 25),
            ("240b:252::/31", "14.12.0.0/15", 25),
        ],
        psid_offset: 4,
        br: "2404:9200:225:100::64",
        interface_id: InterfaceId::Draft03,
    },
    Profile {
        name: "ocn",
        rules: &[
            ("2400:4050::/34", "153.240.0.0/16", 22),
            ("2400:4050:4000::/35", "153.241.0.0/17", 21),
            ("2400:4050:6000::/35", "153.241.128.0/17", 21),
            ("2400:4050:8000::/33", "153.242.0.0/15", 23),
        ],
        psid_offset: 6,
        br: "2001:380:a120::9",
        interface_id: InterfaceId::Draft03,
    },
];

pub fn names() -> Vec<&'static str> {
    PROFILES.iter().map(|p| p.name).collect()
}

impl Profile {
    pub fn by_name(name: &str) -> Option<&'static Profile> {
        PROFILES.iter().find(|p| p.name == name)
    }

    pub fn rules(&self) -> Vec<Rule> {
        self.rules
            .iter()
            .map(|(v6, v4, ea)| Rule {
                ipv6: v6.parse().expect("valid profile table"),
                ipv4: v4.parse().expect("valid profile table"),
                ea_len: *ea,
                psid_offset: self.psid_offset,
                br: Some(self.br.parse::<Ipv6Addr>().expect("valid profile table")),
                interface_id: self.interface_id,
                port_params: None,
            })
            .collect()
    }

    /// Applies the longest rule covering `prefix`.
    pub fn map(&self, prefix: &Ipv6Net) -> Result<Mapping, String> {
        let rules = self.rules();
        let rule = rules
            .iter()
            .filter(|r| r.covers(prefix))
            .max_by_key(|r| r.ipv6.prefix_len())
            .ok_or_else(|| {
                format!(
                    "no {} rule covers {prefix} (rules cover {}); this line cannot use {} MAP-E",
                    self.name,
                    self.rules
                        .iter()
                        .map(|r| r.0)
                        .collect::<Vec<_>>()
                        .join(", "),
                    self.name
                )
            })?;
        rule.map(prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_port_sets_follow_the_spec_tables() {
        let ocn = Profile::by_name("ocn").unwrap();
        for prefix in [
            "2400:4050:1234:5600::/56",
            "2400:4050:4321:ab00::/56",
            "2400:4050:6abc:de00::/56",
            "2400:4050:9999:aa00::/56",
        ] {
            let m = ocn.map(&prefix.parse().unwrap()).unwrap();
            assert_eq!((m.psid_offset, m.psid_len), (6, 6), "{prefix}");
            assert_eq!(m.port_ranges.len(), 63, "{prefix}");
            assert_eq!(m.port_count, 1008, "{prefix}");
            assert!(m.port_ranges.iter().all(|[f, l]| l - f == 15));
            assert_eq!(m.br, Some("2001:380:a120::9".parse().unwrap()));
        }
        let m = ocn
            .map(&"2400:4050:1234:5600::/56".parse().unwrap())
            .unwrap();
        // /34 + 22 EA bits: 16 IPv4 suffix bits, then a 6-bit PSID.
        // EA = bits 34..56 of the prefix = 0x34_5600 >> ... computed by hand:
        // 2400:4050:1234:56 → bits 32..55 = 0x123456; drop bits 32,33 (rule) → 0x123456 & 0x3fffff.
        let ea = 0x12_3456u32 & 0x3f_ffff;
        assert_eq!(u32::from(m.ipv4), (153 << 24 | 240 << 16) | (ea >> 6));
        assert_eq!(u32::from(m.psid), ea & 0x3f);
        // draft-03 interface id: 8 zero bits | IPv4 | PSID | 8 zero bits.
        let iid = u128::from(m.ce_ipv6) & u128::from(u64::MAX);
        assert_eq!(
            iid,
            (u128::from(u32::from(m.ipv4)) << 24) | (u128::from(m.psid) << 8)
        );

        let v6plus = Profile::by_name("v6plus").unwrap();
        let m = v6plus
            .map(&"240b:10:abcd:ef00::/56".parse().unwrap())
            .unwrap();
        assert_eq!((m.psid_offset, m.psid_len), (4, 8));
        assert_eq!((m.port_ranges.len(), m.port_count), (15, 240));
        assert_eq!(m.ipv4.octets()[..1], [106]);
    }

    #[test]
    fn ocn_prefix_2409_has_no_rule() {
        let err = Profile::by_name("ocn")
            .unwrap()
            .map(&"2409:10:1234:5600::/56".parse().unwrap())
            .unwrap_err();
        assert!(
            err.contains("no ocn rule covers 2409:10:1234:5600::/56"),
            "{err}"
        );
    }
}
