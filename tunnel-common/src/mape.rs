//! MAP-E (RFC 7597, SPEC §6) as the eBPF programs and the controller both need it: the rule
//! arithmetic (port → PSID, CE address from IPv4 address and PSID) and the NAPT map layouts.
//!
//! The BR's programs compute CE addresses per packet with [`MapRule::ce_address`]; the
//! controller computes the same for `mape calc` and the CE. One implementation, tested here.

use crate::fastpath::{Ipv4Key, Ipv6Key};

/// CE interface id: RFC 7597 §6, `16 zero bits | IPv4 | PSID`.
pub const IID_RFC7597: u8 = 0;
/// CE interface id: draft-ietf-softwire-map-03 (v6plus, OCN), `8 zero bits | IPv4 | PSID |
/// 8 zero bits`.
pub const IID_DRAFT03: u8 = 1;

/// A mapping rule as the BR's programs use it: the value of [`crate::names::BR_RULES`], an
/// LPM trie keyed by the rule's IPv4 prefix (prefix length, then the four wire bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapRule {
    /// The upper 64 bits of the rule IPv6 prefix, as an integer (the rest is zero: rule prefix
    /// plus EA bits never go past /64).
    pub ipv6_hi: u64,
    /// The rule IPv4 prefix, as an integer (host order).
    pub ipv4: u32,
    pub ipv6_len: u8,
    pub ipv4_len: u8,
    /// EA-bits length: IPv4 suffix bits + PSID length.
    pub ea_len: u8,
    /// PSID offset `a`.
    pub psid_offset: u8,
    /// [`IID_RFC7597`] or [`IID_DRAFT03`].
    pub iid_layout: u8,
    pub _pad: [u8; 7],
}

impl MapRule {
    /// PSID length `k` = EA bits − IPv4 suffix bits (0 when the EA bits only hold the suffix).
    pub const fn psid_len(&self) -> u8 {
        self.ea_len.saturating_sub(32 - self.ipv4_len)
    }

    /// The PSID that owns `port` under this rule, or None for ports no CE owns.
    #[inline(always)]
    pub fn psid_of(&self, port: u16) -> Option<u16> {
        psid_of(self.psid_offset, self.psid_len(), port)
    }

    /// The CE address for shared address `ipv4` (host order) and `psid`: rule prefix, EA bits
    /// (IPv4 suffix, PSID), subnet id 0, interface id.
    #[inline(always)]
    pub fn ce_address(&self, ipv4: u32, psid: u16) -> [u8; 16] {
        let [hi, lo] = self.ce_address_words(ipv4, psid);
        let mut out = [0u8; 16];
        let h = hi.to_ne_bytes();
        let l = lo.to_ne_bytes();
        let mut i = 0;
        while i < 8 {
            out[i] = h[i];
            out[8 + i] = l[i];
            i += 1;
        }
        out
    }

    /// [`MapRule::ce_address`] as two words in wire order (what loading the address's two
    /// halves from memory gives), for the programs, which compare and write it as words.
    #[inline(always)]
    pub fn ce_address_words(&self, ipv4: u32, psid: u16) -> [u64; 2] {
        let q = 32u32.saturating_sub(self.ipv4_len as u32);
        let suffix = (ipv4 as u64) & low_bits(q);
        let k = self.psid_len() as u32;
        let ea = (suffix.checked_shl(k).unwrap_or(0)) | ((psid as u64) & low_bits(k));
        let used = self.ipv6_len as u32 + self.ea_len as u32;
        let hi = if self.ea_len == 0 || used > 64 {
            self.ipv6_hi
        } else {
            self.ipv6_hi | ea.checked_shl(64 - used).unwrap_or(0)
        };
        let lo = interface_id(self.iid_layout, ipv4, psid);
        [hi.to_be(), lo.to_be()]
    }
}

/// The PSID (length `k`, offset `a`) that owns `port`: with m = 16 − a − k the port is
/// `j << (16 − a) | psid << m | i`. None when a > 0 and j = 0 (the ports below 2^(16−a) belong
/// to no CE) or when a + k > 16. With k = 0 nothing is shared: every port is PSID 0's.
#[inline(always)]
pub fn psid_of(a: u8, k: u8, port: u16) -> Option<u16> {
    let (a, k, port) = (a as u32, k as u32, port as u32);
    if a + k > 16 {
        return None;
    }
    if k == 0 {
        return Some(0);
    }
    if a > 0 && port >> (16 - a) == 0 {
        return None;
    }
    let m = 16 - a - k;
    Some(((port >> m) as u64 & low_bits(k)) as u16)
}

/// The CE's 64-bit interface id in `layout` for `ipv4` (host order) and `psid`.
#[inline(always)]
pub fn interface_id(layout: u8, ipv4: u32, psid: u16) -> u64 {
    if layout == IID_DRAFT03 {
        ((ipv4 as u64) << 24) | ((psid as u64) << 8)
    } else {
        ((ipv4 as u64) << 16) | psid as u64
    }
}

#[inline(always)]
const fn low_bits(n: u32) -> u64 {
    if n >= 64 { u64::MAX } else { (1u64 << n) - 1 }
}

/// Key of [`crate::names::NAT_OUT`] (from the LAN) and [`crate::names::NAT_IN`] (from the
/// BR). Ports are host order; addresses wire order ([`Ipv4Key`]). ICMP echo uses the
/// identifier as the local port and 0 as the remote port.
///
/// Wildcard entries (remote 0.0.0.0:0) stand for every remote endpoint: static port forwards
/// and endpoint-independent UDP mappings. The programs try the exact key, then the wildcard.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NatKey {
    /// NAT_OUT: the LAN host. NAT_IN: 0 (the shared address is implied).
    pub local_ip: Ipv4Key,
    pub remote_ip: Ipv4Key,
    /// NAT_OUT: the LAN host's port. NAT_IN: the external port.
    pub local_port: u16,
    pub remote_port: u16,
    /// IP protocol number (6, 17, 1).
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Value of [`crate::names::NAT_OUT`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatOut {
    /// The external port (host order) from the CE's port set.
    pub ext_port: u16,
    /// [`NAT_SEEN`], [`NAT_FIN_RST`]: set by the program for outbound packets.
    pub flags: u16,
    pub _pad: u32,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) of the last packet, updated at most every
    /// [`TOUCH_INTERVAL_NS`].
    pub last_seen_ns: u64,
}

/// Value of [`crate::names::NAT_IN`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatIn {
    /// The LAN host (wire order).
    pub lan_ip: Ipv4Key,
    pub lan_port: u16,
    /// As in [`NatOut::flags`], for inbound packets.
    pub flags: u16,
    pub last_seen_ns: u64,
}

/// A packet was translated through this entry.
pub const NAT_SEEN: u16 = 1;
/// A TCP FIN or RST went through this entry (the flow is closing: short timeout).
pub const NAT_FIN_RST: u16 = 2;
/// The programs refresh `last_seen_ns` at most this often (fewer writes to shared lines).
pub const TOUCH_INTERVAL_NS: u64 = 1_000_000_000;

/// NAPT entries per direction.
pub const MAX_NAT_ENTRIES: u32 = 65_536;
/// BR rules (FMRs).
pub const MAX_RULES: u32 = 1_024;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain-old-data, `#[repr(C)]`, every bit pattern valid, no padding (checked below).
    unsafe impl aya::Pod for super::MapRule {}
    unsafe impl aya::Pod for super::NatKey {}
    unsafe impl aya::Pod for super::NatOut {}
    unsafe impl aya::Pod for super::NatIn {}
}

const _: () = assert!(core::mem::size_of::<MapRule>() == 8 + 4 + 5 + 7);
const _: () = assert!(core::mem::size_of::<NatKey>() == 4 + 4 + 2 + 2 + 1 + 3);
const _: () = assert!(core::mem::size_of::<NatOut>() == 2 + 2 + 4 + 8);
const _: () = assert!(core::mem::size_of::<NatIn>() == 4 + 2 + 2 + 8);
const _: () = assert!(core::mem::size_of::<Ipv6Key>() == 16);

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7597 Appendix A, example 1: 2001:db8::/40 ↔ 192.0.2.0/24, EA 16, a = 6.
    fn rfc_rule() -> MapRule {
        MapRule {
            ipv6_hi: 0x2001_0db8_0000_0000,
            ipv4: 0xc000_0200,
            ipv6_len: 40,
            ipv4_len: 24,
            ea_len: 16,
            psid_offset: 6,
            iid_layout: IID_RFC7597,
            _pad: [0; 7],
        }
    }

    #[test]
    fn ports_map_to_their_psid() {
        let r = rfc_rule();
        assert_eq!(r.psid_len(), 8);
        // 1232 = 1 << 10 | 0x34 << 2: the first port of PSID 0x34.
        assert_eq!(r.psid_of(1232), Some(0x34));
        assert_eq!(r.psid_of(1235), Some(0x34));
        assert_eq!(r.psid_of(64723), Some(0x34));
        assert_eq!(r.psid_of(1236), Some(0x35));
        // Below 1024 (j = 0): no CE owns it.
        assert_eq!(r.psid_of(80), None);
        // Offset 0: every port has a PSID.
        assert_eq!(psid_of(0, 12, 0xa40f), Some(0xa40));
    }

    #[test]
    fn ce_address_of_rfc_example_1() {
        let a = rfc_rule().ce_address(0xc000_0212, 0x34);
        // 2001:db8:12:3400:0:c000:212:34
        assert_eq!(
            a,
            [
                0x20, 0x01, 0x0d, 0xb8, 0x00, 0x12, 0x34, 0x00, 0, 0, 0xc0, 0x00, 0x02, 0x12, 0x00,
                0x34
            ]
        );
        let mut d = rfc_rule();
        d.iid_layout = IID_DRAFT03;
        // draft-03: 00c0:0002:1200:3400
        assert_eq!(
            &d.ce_address(0xc000_0212, 0x34)[8..],
            &[0x00, 0xc0, 0x00, 0x02, 0x12, 0x00, 0x34, 0x00]
        );
    }
}
