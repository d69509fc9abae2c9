//! Just enough IP parsing for the slow path: versions, lengths and addresses, with etherparse.
use std::net::{IpAddr, Ipv4Addr};

use etherparse::{Ipv4HeaderSlice, Ipv6HeaderSlice};

/// Why a packet from a client was not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadPacket {
    /// Not a parsable IPv4/IPv6 packet, or its length field disagrees with the data.
    Malformed,
    /// An IPv6 packet where only IPv4 is leased.
    NotIpv4,
}

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

/// Source and destination of an IPv4 packet.
pub fn ipv4_addrs(packet: &[u8]) -> Result<(Ipv4Addr, Ipv4Addr), BadPacket> {
    match packet.first().map(|b| b >> 4) {
        Some(4) => {
            let h = Ipv4HeaderSlice::from_slice(packet).map_err(|_| BadPacket::Malformed)?;
            Ok((h.source_addr(), h.destination_addr()))
        }
        Some(6) => Err(BadPacket::NotIpv4),
        _ => Err(BadPacket::Malformed),
    }
}

/// Destination of an IPv4 or IPv6 packet.
pub fn destination(packet: &[u8]) -> Option<IpAddr> {
    match packet.first()? >> 4 {
        4 => Ipv4HeaderSlice::from_slice(packet)
            .ok()
            .map(|h| IpAddr::V4(h.destination_addr())),
        6 => Ipv6HeaderSlice::from_slice(packet)
            .ok()
            .map(|h| IpAddr::V6(h.destination_addr())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use etherparse::PacketBuilder;

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
            ipv4_addrs(&p).unwrap(),
            (
                "198.51.100.2".parse().unwrap(),
                "192.0.2.2".parse().unwrap()
            )
        );
        assert_eq!(destination(&p), Some("192.0.2.2".parse().unwrap()));
    }
}
