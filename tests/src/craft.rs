//! Outer IPv6 packets with extension headers, written byte by byte from RFC 8200 (§3 header,
//! §4.3 Hop-by-Hop, §4.5 Fragment, §4.6 Destination Options) and RFC 2473 §5.1 (the Tunnel
//! Encapsulation Limit option), not with the code under test: for crafted-packet tests of
//! the decapsulating programs.
use std::net::Ipv6Addr;

/// Next header: IPv4 (IPv4-in-IPv6).
pub const IPIP: u8 = 4;
/// Next header: ICMPv6.
pub const ICMPV6: u8 = 58;

/// One 8-byte extension header.
#[derive(Clone, Copy, Debug)]
pub enum Ext {
    /// Hop-by-Hop Options with one PadN option.
    HopByHop,
    /// Destination Options with one PadN option.
    DestOpts,
    /// Destination Options with a Tunnel Encapsulation Limit of 4 (what Linux ip6tnl adds by
    /// default) and a PadN.
    EncapLimit,
    /// A fragment header: offset in 8-byte units, more fragments, identification.
    Fragment { offset: u16, more: bool, id: u32 },
}

impl Ext {
    fn code(self) -> u8 {
        match self {
            Ext::HopByHop => 0,
            Ext::DestOpts | Ext::EncapLimit => 60,
            Ext::Fragment { .. } => 44,
        }
    }

    fn bytes(self, next: u8) -> [u8; 8] {
        match self {
            // PadN (type 1) with 4 bytes of padding fills the 6 option bytes.
            Ext::HopByHop | Ext::DestOpts => [next, 0, 1, 4, 0, 0, 0, 0],
            // Tunnel Encapsulation Limit (type 4, length 1, limit 4), then PadN of 1.
            Ext::EncapLimit => [next, 0, 4, 1, 4, 1, 1, 0],
            Ext::Fragment { offset, more, id } => {
                let field = (offset << 3) | u16::from(more);
                let [f0, f1] = field.to_be_bytes();
                let [i0, i1, i2, i3] = id.to_be_bytes();
                [next, 0, f0, f1, i0, i1, i2, i3]
            }
        }
    }
}

/// IPv6 `src` → `dst`, hop limit 64, then `exts` in order, the last naming `next`, then
/// `payload`.
pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, exts: &[Ext], next: u8, payload: &[u8]) -> Vec<u8> {
    let len = 8 * exts.len() + payload.len();
    let first = exts.first().map_or(next, |e| e.code());
    let mut out = vec![0x60, 0, 0, 0];
    out.extend_from_slice(&(len as u16).to_be_bytes());
    out.extend_from_slice(&[first, 64]);
    out.extend_from_slice(&src.octets());
    out.extend_from_slice(&dst.octets());
    for (i, e) in exts.iter().enumerate() {
        let after = exts.get(i + 1).map_or(next, |n| n.code());
        out.extend_from_slice(&e.bytes(after));
    }
    out.extend_from_slice(payload);
    out
}

/// Sends a whole IPv6 packet (header included) from a raw socket of the calling thread's
/// namespace, routed by its destination.
pub fn send_raw_ipv6(packet: &[u8]) -> anyhow::Result<()> {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    anyhow::ensure!(packet.len() >= 40, "not an IPv6 packet");
    // IPPROTO_RAW: the packet carries its own IPv6 header.
    let sock = Socket::new(
        Domain::IPV6,
        Type::RAW,
        Some(Protocol::from(libc::IPPROTO_RAW)),
    )?;
    let dst: [u8; 16] = packet[24..40].try_into()?;
    let to = std::net::SocketAddrV6::new(Ipv6Addr::from(dst), 0, 0, 0);
    sock.send_to(packet, &SockAddr::from(to))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_chain_their_next_header_fields() {
        let a: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let b: Ipv6Addr = "2001:db8::2".parse().unwrap();
        let p = ipv6(a, b, &[Ext::HopByHop, Ext::EncapLimit], IPIP, &[0x45]);
        assert_eq!(
            &p[4..8],
            &[0, 17, 0, 64],
            "payload length 8+8+1, next header HbH"
        );
        assert_eq!(&p[40..48], &[60, 0, 1, 4, 0, 0, 0, 0]);
        assert_eq!(&p[48..56], &[4, 0, 4, 1, 4, 1, 1, 0]);
        let f = ipv6(
            a,
            b,
            &[Ext::Fragment {
                offset: 6,
                more: false,
                id: 7,
            }],
            IPIP,
            &[],
        );
        assert_eq!(&f[40..48], &[4, 0, 0, 48, 0, 0, 0, 7]);
    }
}
