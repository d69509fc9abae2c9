//! Just enough IP parsing for the slow path: versions, lengths and addresses, with etherparse.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::mape::table::{ICMP, TCP, UDP};
use etherparse::{
    Icmpv4Type, Ipv4Header, Ipv4HeaderSlice, Ipv6HeaderSlice, PacketBuilder,
    icmpv4::DestUnreachableHeader,
};

/// Splits a 102 payload into the IP packets it holds back to back (one client batches TUN
/// reads). Stops at the first packet whose length field does not fit; the rest is returned as
/// malformed.
pub fn split_packets(mut data: &[u8]) -> (Vec<&[u8]>, bool) {
    let mut out = Vec::new();
    while !data.is_empty() {
        let len = match data[0] >> 4 {
            4 if data.len() >= 20 => usize::from(u16::from_be_bytes([data[2], data[3]])),
            6 if data.len() >= 40 => 40 + usize::from(u16::from_be_bytes([data[4], data[5]])),
            _ => return (out, true),
        };
        if len < 20 || len > data.len() {
            return (out, true);
        }
        out.push(&data[..len]);
        data = &data[len..];
    }
    (out, false)
}

/// Source and destination of an IPv4 or IPv6 packet (one header parse).
pub fn addrs(packet: &[u8]) -> Option<(IpAddr, IpAddr)> {
    match packet.first()? >> 4 {
        4 => Ipv4HeaderSlice::from_slice(packet).ok().map(|h| {
            (
                IpAddr::V4(h.source_addr()),
                IpAddr::V4(h.destination_addr()),
            )
        }),
        6 => Ipv6HeaderSlice::from_slice(packet).ok().map(|h| {
            (
                IpAddr::V6(h.source_addr()),
                IpAddr::V6(h.destination_addr()),
            )
        }),
        _ => None,
    }
}

/// Source of an IPv4 or IPv6 packet.
pub fn source(packet: &[u8]) -> Option<IpAddr> {
    addrs(packet).map(|(src, _)| src)
}

/// Whether an IPv6 packet stays on its link: a link-local or unspecified source, or a
/// multicast or link-local destination (what a kernel says on a TUN by itself).
pub fn link_local_v6(src: Ipv6Addr, dst: Ipv6Addr) -> bool {
    src.is_unspecified()
        || src.is_unicast_link_local()
        || dst.is_multicast()
        || dst.is_unicast_link_local()
}

/// Destination of an IPv4 or IPv6 packet.
pub fn destination(packet: &[u8]) -> Option<IpAddr> {
    addrs(packet).map(|(_, dst)| dst)
}

/// Whether the IPv4 packet has Don't Fragment set.
pub fn dont_fragment(packet: &[u8]) -> bool {
    Ipv4HeaderSlice::from_slice(packet).is_ok_and(|h| h.dont_fragment())
}

/// ICMP "fragmentation needed" (type 3 code 4) from `router` back to the source of `packet`,
/// announcing `mtu`; None for packets that must not get an ICMP error (ICMP errors
/// themselves are not special-cased: RFC 1812 allows errors about echo and such).
pub fn icmp_frag_needed(packet: &[u8], router: Ipv4Addr, mtu: u16) -> Option<Vec<u8>> {
    let h = Ipv4HeaderSlice::from_slice(packet).ok()?;
    // The original header plus the first 8 bytes of its payload (RFC 792).
    let quoted = &packet[..(h.slice().len() + 8).min(packet.len())];
    let mut out = Vec::with_capacity(28 + quoted.len());
    PacketBuilder::ipv4(router.octets(), h.source_addr().octets(), 64)
        .icmpv4(Icmpv4Type::DestinationUnreachable(
            DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: mtu },
        ))
        .write(&mut out, quoted)
        .ok()?;
    Some(out)
}

/// How an IPv4 packet goes into a tunnel whose inner MTU is `mtu`.
pub enum Fit {
    /// It fits as it is.
    Whole,
    /// DF clear: these fragments go instead.
    Fragments(Vec<Vec<u8>>),
    /// DF set: this ICMP fragmentation-needed goes back to the sender instead.
    TooBig(Vec<u8>),
    /// Cannot be parsed, fragmented or answered: dropped.
    Unfragmentable,
}

/// Decides [`Fit`] for `pkt`; ICMP errors come from `icmp_src`.
pub fn fit(pkt: &[u8], mtu: u16, icmp_src: Ipv4Addr) -> Fit {
    if pkt.len() <= usize::from(mtu) {
        return Fit::Whole;
    }
    let found = if dont_fragment(pkt) {
        icmp_frag_needed(pkt, icmp_src, mtu).map(Fit::TooBig)
    } else {
        fragment_ipv4(pkt, usize::from(mtu)).map(Fit::Fragments)
    };
    found.unwrap_or(Fit::Unfragmentable)
}

/// Splits an IPv4 packet (DF clear) into fragments of at most `mtu` bytes (RFC 791). None if
/// it cannot be parsed or the MTU cannot hold a header plus 8 bytes.
pub fn fragment_ipv4(packet: &[u8], mtu: usize) -> Option<Vec<Vec<u8>>> {
    let slice = Ipv4HeaderSlice::from_slice(packet).ok()?;
    let header = slice.to_header();
    let hlen = slice.slice().len();
    let total = usize::from(header.total_len).min(packet.len());
    let payload = packet.get(hlen..total)?;
    let chunk = (mtu.checked_sub(hlen)? / 8) * 8;
    if chunk == 0 {
        return None;
    }
    let base = header.fragment_offset.byte_offset() as usize;
    let mut out = Vec::new();
    for (i, piece) in payload.chunks(chunk).enumerate() {
        let mut h: Ipv4Header = header.clone();
        let offset = base + i * chunk;
        let last = (i + 1) * chunk >= payload.len();
        h.more_fragments = header.more_fragments || !last;
        h.fragment_offset = etherparse::IpFragOffset::try_new((offset / 8) as u16).ok()?;
        h.set_payload_len(piece.len()).ok()?;
        h.header_checksum = h.calc_header_checksum();
        let mut bytes = Vec::with_capacity(hlen + piece.len());
        h.write(&mut bytes).ok()?;
        bytes.extend_from_slice(piece);
        out.push(bytes);
    }
    Some(out)
}

/// Whether `pkt` is an IPv4 fragment (more fragments follow, or it is not the first).
pub fn is_fragment(pkt: &[u8]) -> bool {
    Ipv4HeaderSlice::from_slice(pkt).is_ok_and(|h| h.is_fragmenting_payload())
}

/// Writes `id` as the IPv4 identification of `pkt` and updates its header checksum.
pub fn set_ipv4_id(pkt: &mut [u8], id: u16) -> bool {
    rewrite_ipv4_header(pkt, |h| {
        h.identification = id;
        true
    })
}

/// Changes the IPv4 header of `pkt` with `change` (false: leave it) and writes it back with
/// its checksum; false when nothing was written.
fn rewrite_ipv4_header(pkt: &mut [u8], change: impl FnOnce(&mut Ipv4Header) -> bool) -> bool {
    let Ok(slice) = Ipv4HeaderSlice::from_slice(pkt) else {
        return false;
    };
    let len = slice.slice().len();
    let mut header = slice.to_header();
    if !change(&mut header) {
        return false;
    }
    header.header_checksum = header.calc_header_checksum();
    let mut bytes = Vec::with_capacity(len);
    if header.write(&mut bytes).is_err() || bytes.len() != len {
        return false;
    }
    pkt[..len].copy_from_slice(&bytes);
    true
}

/// The IPv4 identification a CE of PSID `psid` (`psid_len` bits) gives a datagram it
/// fragments or forwards fragmented: the PSID in the top bits, so that CEs sharing one
/// address never send two datagrams with one id (RFC 7597 §8.3.3).
pub fn shared_ipv4_id(id: u16, psid: u16, psid_len: u8) -> u16 {
    if psid_len == 0 || psid_len >= 16 {
        return if psid_len >= 16 { psid } else { id };
    }
    let low = 16 - u32::from(psid_len);
    (psid << low) | (id & ((1u16 << low) - 1))
}

/// Decrements the TTL of the IPv4 packet `pkt` and updates its header checksum, as a router
/// does before forwarding; false (nothing changed) when it would expire or cannot be parsed.
pub fn decrement_ttl(pkt: &mut [u8]) -> bool {
    rewrite_ipv4_header(pkt, |h| {
        if h.time_to_live <= 1 {
            return false;
        }
        h.time_to_live -= 1;
        true
    })
}

/// The port a packet toward a port-set holder (MAP-E CE, lwB4) is mapped by (RFC 7597 §8,
/// RFC 7596 §5.1): the destination port (TCP, UDP), the ICMP echo identifier, or for an
/// ICMP error (destination unreachable, time exceeded, parameter problem) the source port
/// or echo identifier of the packet it quotes, which the holder sent. The BR's own
/// time-exceeded and fragmentation-needed answers to a CE's packets (traceroute through the
/// BR) take this way.
pub fn port_toward(pkt: &[u8]) -> Option<u16> {
    holder_port(pkt, 2)
}

/// The holder's port of `pkt`: the TCP/UDP port at `at` (2: destination, 0: source), the
/// echo identifier, or in a quoted packet the port at the other offset.
fn holder_port(pkt: &[u8], at: usize) -> Option<u16> {
    let (proto, l4) = first_fragment_l4(pkt)?;
    match (proto, *l4.first()?) {
        (TCP | UDP, _) => u16_at(l4, at),
        (ICMP, 0 | 8) => u16_at(l4, 4),
        (ICMP, 3 | 11 | 12) => {
            let (quoted_proto, quoted) = first_fragment_l4(l4.get(8..)?)?;
            match (quoted_proto, *quoted.first()?) {
                (TCP | UDP, _) => u16_at(quoted, 2 - at),
                (ICMP, 0 | 8) => u16_at(quoted, 4),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The protocol and transport bytes of an IPv4 packet (or of the header and first bytes an
/// ICMP error quotes); None for a non-first fragment, which has no transport header.
fn first_fragment_l4(pkt: &[u8]) -> Option<(u8, &[u8])> {
    let h = etherparse::Ipv4HeaderSlice::from_slice(pkt).ok()?;
    if h.fragments_offset().value() != 0 {
        return None;
    }
    Some((h.protocol().0, pkt.get(h.slice().len()..)?))
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// The port a packet from a port-set holder is sent from: the source port (TCP, UDP), the
/// ICMP echo identifier, or for an ICMP error it sends the destination port or echo
/// identifier of the packet it quotes. None for a non-first fragment.
pub fn port_from(pkt: &[u8]) -> Option<u16> {
    holder_port(pkt, 0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn ce_ids_carry_the_psid_in_their_top_bits() {
        // Two CEs of one address, PSIDs 0xa4 and 0xa5 (8 bits): one LAN id, two wire ids.
        let (a, b) = (
            super::shared_ipv4_id(0x1234, 0xa4, 8),
            super::shared_ipv4_id(0x1234, 0xa5, 8),
        );
        assert_eq!((a, b), (0xa434, 0xa534));
        assert_eq!(
            super::shared_ipv4_id(0x1234, 0, 0),
            0x1234,
            "not shared: kept"
        );
        assert_eq!(
            super::shared_ipv4_id(0x1234, 0x7, 16),
            0x7,
            "one port: the PSID"
        );
    }

    use etherparse::{IcmpEchoHeader, PacketBuilder};

    use super::*;

    fn udp4(src: [u8; 4], payload: usize) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ipv4(src, [192, 0, 2, 2], 64)
            .udp(1, 2)
            .write(&mut out, &vec![0u8; payload])
            .unwrap();
        out
    }

    #[test]
    fn splits_back_to_back_packets() {
        let a = udp4([198, 51, 100, 2], 10);
        let b = udp4([198, 51, 100, 2], 300);
        let joined = [a.clone(), b.clone()].concat();
        let (packets, bad) = split_packets(&joined);
        assert!(!bad);
        assert_eq!(packets, vec![&a[..], &b[..]]);
    }

    #[test]
    fn truncated_tail_is_reported() {
        let a = udp4([198, 51, 100, 2], 10);
        let mut joined = [a.clone(), a.clone()].concat();
        joined.truncate(a.len() + 10);
        let (packets, bad) = split_packets(&joined);
        assert_eq!(packets.len(), 1);
        assert!(bad);
        assert!(split_packets(&[0x45, 0, 0]).1);
        assert!(split_packets(&[0x00; 40]).1);
    }

    #[test]
    fn reads_addresses() {
        let p = udp4([198, 51, 100, 2], 1);
        assert_eq!(
            addrs(&p).unwrap(),
            (
                "198.51.100.2".parse().unwrap(),
                "192.0.2.2".parse().unwrap()
            )
        );
        assert_eq!(destination(&p), Some("192.0.2.2".parse().unwrap()));
    }

    #[test]
    fn icmp_frag_needed_quotes_the_packet_and_announces_the_mtu() {
        let p = udp4([198, 51, 100, 2], 1500);
        let icmp = icmp_frag_needed(&p, "198.51.100.1".parse().unwrap(), 1460).unwrap();
        let parsed = etherparse::SlicedPacket::from_ip(&icmp).unwrap();
        let Some(etherparse::NetSlice::Ipv4(ip)) = parsed.net else {
            panic!("not IPv4")
        };
        assert_eq!(
            ip.header().destination_addr(),
            Ipv4Addr::new(198, 51, 100, 2)
        );
        let Some(etherparse::TransportSlice::Icmpv4(icmp)) = parsed.transport else {
            panic!("not ICMP")
        };
        assert_eq!(
            icmp.icmp_type(),
            Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
                next_hop_mtu: 1460
            })
        );
        assert_eq!(icmp.payload(), &p[..28]);
    }

    #[test]
    fn fragments_reassemble_to_the_original() {
        let p = udp4([198, 51, 100, 2], 3000);
        let frags = fragment_ipv4(&p, 1460).unwrap();
        assert_eq!(frags.len(), 3);
        let mut payload = Vec::new();
        for (i, f) in frags.iter().enumerate() {
            assert!(f.len() <= 1460);
            let h = Ipv4HeaderSlice::from_slice(f).unwrap();
            assert_eq!(h.more_fragments(), i + 1 < frags.len());
            assert_eq!(h.fragments_offset().byte_offset() as usize, payload.len());
            assert_eq!(h.to_header().calc_header_checksum(), h.header_checksum());
            payload.extend_from_slice(&f[20..]);
        }
        assert_eq!(payload, &p[20..]);
    }

    /// A UDP datagram the CE sent from 203.0.113.18:1680 toward 192.0.2.2:33434, and the
    /// BR's time-exceeded answer to it (type 11, quoting its header and 8 bytes).
    fn traceroute_probe_and_answer() -> (Vec<u8>, Vec<u8>) {
        let mut probe = Vec::new();
        PacketBuilder::ipv4([203, 0, 113, 18], [192, 0, 2, 2], 1)
            .udp(1680, 33434)
            .write(&mut probe, &[0; 32])
            .unwrap();
        let mut answer = Vec::new();
        PacketBuilder::ipv4([192, 0, 2, 1], [203, 0, 113, 18], 64)
            .icmpv4(Icmpv4Type::TimeExceeded(
                etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit,
            ))
            .write(&mut answer, &probe[..28])
            .unwrap();
        (probe, answer)
    }

    #[test]
    fn icmp_errors_toward_a_ce_map_by_the_quoted_source_port() {
        let (_, answer) = traceroute_probe_and_answer();
        assert_eq!(port_toward(&answer), Some(1680));
        // A quoted echo request: its identifier.
        let mut echo = Vec::new();
        PacketBuilder::ipv4([203, 0, 113, 18], [192, 0, 2, 2], 1)
            .icmpv4_echo_request(2704, 1)
            .write(&mut echo, &[0; 8])
            .unwrap();
        let mut unreachable = Vec::new();
        PacketBuilder::ipv4([192, 0, 2, 1], [203, 0, 113, 18], 64)
            .icmpv4(Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded {
                    next_hop_mtu: 1280,
                },
            ))
            .write(&mut unreachable, &echo[..28])
            .unwrap();
        assert_eq!(port_toward(&unreachable), Some(2704));
        // The plain cases: destination port, echo reply identifier.
        let mut reply = Vec::new();
        PacketBuilder::ipv4([192, 0, 2, 2], [203, 0, 113, 18], 64)
            .icmpv4(Icmpv4Type::EchoReply(IcmpEchoHeader { id: 1681, seq: 1 }))
            .write(&mut reply, &[])
            .unwrap();
        assert_eq!(port_toward(&reply), Some(1681));
        let mut udp = Vec::new();
        PacketBuilder::ipv4([192, 0, 2, 2], [203, 0, 113, 18], 64)
            .udp(53, 1682)
            .write(&mut udp, &[])
            .unwrap();
        assert_eq!(port_toward(&udp), Some(1682));
        // An error cut inside the quoted transport header has no port to go by.
        let (_, mut cut) = traceroute_probe_and_answer();
        cut.truncate(20 + 8 + 20 + 1);
        assert_eq!(port_toward(&cut), None);
        // From the holder's side: its source port, its echo identifier.
        let (probe, _) = traceroute_probe_and_answer();
        assert_eq!(port_from(&probe), Some(1680));
        assert_eq!(port_from(&echo), Some(2704));
        assert_eq!(port_from(&cut[28..]), None, "a quoted header cut short");
    }
}
