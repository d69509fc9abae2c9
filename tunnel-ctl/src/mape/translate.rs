//! The CE's slow path on packet bytes: classify a LAN packet's flow, translate it into the
//! port set (first packets of new flows), and map ICMP errors from the internet back to the
//! LAN host by the packet they quote. Checksums are recomputed over the whole packet (these
//! are single packets, not the fast path).
use std::net::{Ipv4Addr, SocketAddrV4};

use etherparse::Ipv4HeaderSlice;

use super::table::{Flow, ICMP, TCP, UDP};

const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_ERRORS: [u8; 3] = [3, 11, 12];

/// What a packet from the LAN is, for NAPT.
#[derive(Debug, PartialEq, Eq)]
pub enum Outbound {
    Flow(Flow),
    /// A non-first fragment: no ports to map.
    Fragment,
    /// An ICMP error from a LAN host (not translated yet).
    IcmpError,
    /// Another protocol, or an ICMP type that has no identifier.
    Unsupported,
    Malformed,
}

fn header(pkt: &[u8]) -> Option<(Ipv4HeaderSlice<'_>, usize)> {
    let h = Ipv4HeaderSlice::from_slice(pkt).ok()?;
    let ihl = h.slice().len();
    (usize::from(h.total_len()) <= pkt.len()).then_some((h, ihl))
}

fn u16_at(pkt: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*pkt.get(at)?, *pkt.get(at + 1)?]))
}

/// Classifies a LAN packet.
pub fn outbound(pkt: &[u8]) -> Outbound {
    let Some((h, ihl)) = header(pkt) else {
        return Outbound::Malformed;
    };
    if h.fragments_offset().value() != 0 {
        return Outbound::Fragment;
    }
    let (src, dst, proto) = (h.source_addr(), h.destination_addr(), h.protocol().0);
    let ports = match proto {
        TCP | UDP => u16_at(pkt, ihl).zip(u16_at(pkt, ihl + 2)),
        ICMP => match pkt.get(ihl) {
            Some(&ICMP_ECHO_REQUEST) => u16_at(pkt, ihl + 4).map(|id| (id, 0)),
            Some(t) if ICMP_ERRORS.contains(t) => return Outbound::IcmpError,
            _ => return Outbound::Unsupported,
        },
        _ => return Outbound::Unsupported,
    };
    match ports {
        Some((sport, dport)) => Outbound::Flow(Flow {
            proto,
            lan: SocketAddrV4::new(src, sport),
            remote: SocketAddrV4::new(dst, dport),
        }),
        None => Outbound::Malformed,
    }
}

/// Whether `pkt` is an ICMP error (destination unreachable, time exceeded, parameter
/// problem).
pub fn is_icmp_error(pkt: &[u8]) -> bool {
    header(pkt).is_some_and(|(h, ihl)| {
        h.protocol().0 == ICMP && pkt.get(ihl).is_some_and(|t| ICMP_ERRORS.contains(t))
    })
}

/// Rewrites a LAN packet's source to `addr`:`port` (the ICMP identifier for echo), clamps a
/// SYN's MSS to `mss` and recomputes the checksums.
pub fn translate_out(pkt: &mut [u8], addr: Ipv4Addr, port: u16, mss: u16) {
    let Some((h, ihl)) = header(pkt) else { return };
    let (proto, total) = (h.protocol().0, usize::from(h.total_len()));
    pkt[12..16].copy_from_slice(&addr.octets());
    let port_at = if proto == ICMP { ihl + 4 } else { ihl };
    if let Some(p) = pkt.get_mut(port_at..port_at + 2) {
        p.copy_from_slice(&port.to_be_bytes());
    }
    if proto == TCP {
        clamp_mss(&mut pkt[ihl..total], mss);
    }
    fix_checksums(&mut pkt[..total], ihl, proto);
}

/// Lowers the MSS option of a TCP SYN to `mss`.
fn clamp_mss(tcp: &mut [u8], mss: u16) {
    if tcp.len() < 20 || tcp[13] & 0x02 == 0 {
        return;
    }
    let end = (usize::from(tcp[12] >> 4) * 4).min(tcp.len());
    let mut i = 20;
    while i + 1 < end {
        match tcp[i] {
            0 => return,
            1 => i += 1,
            2 if tcp[i + 1] == 4 && i + 4 <= end => {
                if u16::from_be_bytes([tcp[i + 2], tcp[i + 3]]) > mss {
                    tcp[i + 2..i + 4].copy_from_slice(&mss.to_be_bytes());
                }
                return;
            }
            _ => {
                let len = usize::from(tcp[i + 1]);
                if len < 2 {
                    return;
                }
                i += len;
            }
        }
    }
}

/// A (reassembled) packet from the internet to the shared address, for LAN endpoint `lan`:
/// rewrites the destination address and port (the ICMP echo reply's identifier) and
/// recomputes the checksums.
pub fn translate_in(pkt: &mut [u8], lan: SocketAddrV4) {
    let Some((h, ihl)) = header(pkt) else { return };
    let (proto, total) = (h.protocol().0, usize::from(h.total_len()));
    pkt[16..20].copy_from_slice(&lan.ip().octets());
    let port_at = if proto == ICMP { ihl + 4 } else { ihl + 2 };
    if let Some(p) = pkt.get_mut(port_at..port_at + 2) {
        p.copy_from_slice(&lan.port().to_be_bytes());
    }
    fix_checksums(&mut pkt[..total], ihl, proto);
}

/// The (protocol, external port, remote) a packet from the internet to the shared address
/// is mapped by: its destination port (the echo reply's identifier) and its source.
pub fn inbound_key(pkt: &[u8]) -> Option<(u8, u16, SocketAddrV4)> {
    let (h, ihl) = header(pkt)?;
    let (proto, src) = (h.protocol().0, h.source_addr());
    match proto {
        TCP | UDP => Some((
            proto,
            u16_at(pkt, ihl + 2)?,
            SocketAddrV4::new(src, u16_at(pkt, ihl)?),
        )),
        ICMP if pkt.get(ihl) == Some(&0) => {
            Some((proto, u16_at(pkt, ihl + 4)?, SocketAddrV4::new(src, 0)))
        }
        _ => None,
    }
}

/// Where an ICMP error's parts are: its header length and total length, and the packet it
/// quotes (offset, header length, protocol, addresses).
struct Quoted {
    ihl: usize,
    total: usize,
    q: usize,
    qihl: usize,
    qproto: u8,
    qsrc: Ipv4Addr,
    qdst: Ipv4Addr,
}

/// The parts of an ICMP error (None for anything else).
fn quoted(pkt: &[u8]) -> Option<Quoted> {
    let (h, ihl) = header(pkt)?;
    let total = usize::from(h.total_len());
    if h.protocol().0 != ICMP || !pkt.get(ihl).is_some_and(|t| ICMP_ERRORS.contains(t)) {
        return None;
    }
    let q = ihl + 8;
    let qh = Ipv4HeaderSlice::from_slice(pkt.get(q..total)?).ok()?;
    Some(Quoted {
        ihl,
        total,
        q,
        qihl: qh.slice().len(),
        qproto: qh.protocol().0,
        qsrc: qh.source_addr(),
        qdst: qh.destination_addr(),
    })
}

/// An ICMP error from the internet to the shared address, mapped back to the LAN: rewrites
/// the destination, and inside the quoted packet the source address and port, using
/// `lookup(proto, external port, remote)` → LAN endpoint. False when no mapping matches.
pub fn translate_icmp_error_in(
    pkt: &mut [u8],
    lookup: impl Fn(u8, u16, SocketAddrV4) -> Option<SocketAddrV4>,
) -> bool {
    // The quoted packet: it went from the shared address:port to the remote.
    let Some(Quoted {
        ihl,
        total,
        q,
        qihl,
        qproto,
        qdst,
        ..
    }) = quoted(pkt)
    else {
        return false;
    };
    let ql4 = q + qihl;
    let (ext, remote_port, port_at) = match qproto {
        TCP | UDP => match u16_at(pkt, ql4).zip(u16_at(pkt, ql4 + 2)) {
            Some((s, d)) => (s, d, ql4),
            None => return false,
        },
        ICMP => match u16_at(pkt, ql4 + 4) {
            Some(id) => (id, 0, ql4 + 4),
            None => return false,
        },
        _ => return false,
    };
    let Some(lan) = lookup(qproto, ext, SocketAddrV4::new(qdst, remote_port)) else {
        return false;
    };
    let lan_ip = lan.ip().octets();
    pkt[16..20].copy_from_slice(&lan_ip);
    pkt[q + 12..q + 16].copy_from_slice(&lan_ip);
    pkt[port_at..port_at + 2].copy_from_slice(&lan.port().to_be_bytes());
    // The quoted header's checksum; its transport checksum is left alone (often cut off, and
    // never checked by the receiver of an ICMP error).
    pkt[q + 10..q + 12].fill(0);
    let c = checksum(&pkt[q..q + qihl], 0);
    pkt[q + 10..q + 12].copy_from_slice(&c.to_be_bytes());
    fix_checksums(&mut pkt[..total], ihl, ICMP);
    true
}

/// An ICMP error from a LAN host (a port unreachable for a forwarded port, a time exceeded)
/// about a packet that came in through a mapping: the source becomes `addr`, and inside the
/// quoted packet (remote → LAN host) the destination becomes `addr` and the external port,
/// using `lookup(proto, LAN endpoint, remote)` → external port, so that the remote matches
/// it to its own socket. False when no mapping matches.
pub fn translate_icmp_error_out(
    pkt: &mut [u8],
    addr: Ipv4Addr,
    lookup: impl Fn(u8, SocketAddrV4, SocketAddrV4) -> Option<u16>,
) -> bool {
    let Some(Quoted {
        ihl,
        total,
        q,
        qihl,
        qproto,
        qsrc,
        qdst,
    }) = quoted(pkt)
    else {
        return false;
    };
    let ql4 = q + qihl;
    // TCP and UDP only: an echo request from outside is not something a LAN host answers
    // with an error through a mapping.
    let (remote_port, lan_port) = match qproto {
        TCP | UDP => match u16_at(pkt, ql4).zip(u16_at(pkt, ql4 + 2)) {
            Some(p) => p,
            None => return false,
        },
        _ => return false,
    };
    let lan = SocketAddrV4::new(qdst, lan_port);
    let Some(ext) = lookup(qproto, lan, SocketAddrV4::new(qsrc, remote_port)) else {
        return false;
    };
    pkt[12..16].copy_from_slice(&addr.octets());
    pkt[q + 16..q + 20].copy_from_slice(&addr.octets());
    pkt[ql4 + 2..ql4 + 4].copy_from_slice(&ext.to_be_bytes());
    pkt[q + 10..q + 12].fill(0);
    let c = checksum(&pkt[q..q + qihl], 0);
    pkt[q + 10..q + 12].copy_from_slice(&c.to_be_bytes());
    fix_checksums(&mut pkt[..total], ihl, ICMP);
    true
}

/// Recomputes the IPv4 header checksum and the transport checksum (TCP, UDP unless it was
/// 0, ICMP).
fn fix_checksums(pkt: &mut [u8], ihl: usize, proto: u8) {
    pkt[10..12].fill(0);
    let c = checksum(&pkt[..ihl], 0);
    pkt[10..12].copy_from_slice(&c.to_be_bytes());
    let len = pkt.len() - ihl;
    let at = match proto {
        TCP => 16,
        UDP => 6,
        ICMP => 2,
        _ => return,
    };
    if ihl + at + 2 > pkt.len() {
        return;
    }
    if proto == UDP && pkt[ihl + 6..ihl + 8] == [0, 0] {
        return;
    }
    pkt[ihl + at..ihl + at + 2].fill(0);
    let seed = if proto == ICMP {
        0
    } else {
        // Pseudo-header: addresses, protocol, length.
        let mut s = sum(&pkt[12..20]);
        s += u32::from(proto) + len as u32;
        s
    };
    let mut c = checksum(&pkt[ihl..], seed);
    if proto == UDP && c == 0 {
        c = 0xffff;
    }
    pkt[ihl + at..ihl + at + 2].copy_from_slice(&c.to_be_bytes());
}

fn sum(data: &[u8]) -> u32 {
    let mut s: u32 = 0;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        s = s.wrapping_add(u32::from(word));
    }
    s
}

/// The Internet checksum of `data`, starting from the partial sum `seed`.
fn checksum(data: &[u8], seed: u32) -> u16 {
    let mut s = u64::from(seed) + u64::from(sum(data));
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// ICMP destination unreachable, communication administratively prohibited (type 3 code 13),
/// from `from` to the sender of `pkt`: what a LAN host gets when the port set toward its
/// destination is exhausted, so its connect fails at once instead of timing out.
pub fn admin_prohibited(pkt: &[u8], from: Ipv4Addr) -> Option<Vec<u8>> {
    let (h, ihl) = header(pkt)?;
    let quoted = &pkt[..(ihl + 8).min(pkt.len())];
    let mut out = Vec::with_capacity(28 + quoted.len());
    etherparse::PacketBuilder::ipv4(from.octets(), h.source_addr().octets(), 64)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::FilterProhibited,
        ))
        .write(&mut out, quoted)
        .ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};

    use super::*;

    const LAN: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
    const REMOTE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
    const SHARED: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 18);

    fn syn() -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ipv4(LAN.octets(), REMOTE.octets(), 63)
            .tcp(40000, 80, 1, 64000)
            .syn()
            .options(&[etherparse::TcpOptionElement::MaximumSegmentSize(1460)])
            .unwrap()
            .write(&mut out, &[])
            .unwrap();
        out
    }

    #[test]
    fn outbound_syn_is_translated_clamped_and_checksummed() {
        let mut p = syn();
        let Outbound::Flow(f) = outbound(&p) else {
            panic!()
        };
        assert_eq!(f.lan, SocketAddrV4::new(LAN, 40000));
        assert_eq!(f.remote, SocketAddrV4::new(REMOTE, 80));
        translate_out(&mut p, SHARED, 1680, 1420);
        let s = SlicedPacket::from_ip(&p).unwrap();
        let Some(etherparse::NetSlice::Ipv4(ip)) = &s.net else {
            panic!()
        };
        assert_eq!(ip.header().source_addr(), SHARED);
        assert_eq!(
            ip.header().to_header().calc_header_checksum(),
            ip.header().header_checksum()
        );
        let Some(TransportSlice::Tcp(tcp)) = s.transport else {
            panic!()
        };
        assert_eq!(tcp.source_port(), 1680);
        assert!(tcp.options_iterator().any(|o| matches!(
            o,
            Ok(etherparse::TcpOptionElement::MaximumSegmentSize(1420))
        )));
        let expected = tcp
            .to_header()
            .calc_checksum_ipv4_raw(SHARED.octets(), REMOTE.octets(), tcp.payload())
            .unwrap();
        assert_eq!(tcp.checksum(), expected);
    }

    #[test]
    fn icmp_error_maps_back_to_the_lan_host() {
        // What the remote sends back: port unreachable quoting SHARED:1680 → REMOTE:53.
        let mut quoted = Vec::new();
        PacketBuilder::ipv4(SHARED.octets(), REMOTE.octets(), 60)
            .udp(1680, 53)
            .write(&mut quoted, b"hello")
            .unwrap();
        let mut err = Vec::new();
        PacketBuilder::ipv4(REMOTE.octets(), SHARED.octets(), 64)
            .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::Port,
            ))
            .write(&mut err, &quoted)
            .unwrap();
        let ok = translate_icmp_error_in(&mut err, |proto, ext, remote| {
            (proto == UDP && ext == 1680 && remote == SocketAddrV4::new(REMOTE, 53))
                .then_some(SocketAddrV4::new(LAN, 5000))
        });
        assert!(ok);
        let s = SlicedPacket::from_ip(&err).unwrap();
        let Some(etherparse::NetSlice::Ipv4(ip)) = &s.net else {
            panic!()
        };
        assert_eq!(ip.header().destination_addr(), LAN);
        let Some(TransportSlice::Icmpv4(icmp)) = s.transport else {
            panic!()
        };
        assert_eq!(
            icmp.checksum(),
            icmp.icmp_type().calc_checksum(icmp.payload())
        );
        let inner = Ipv4HeaderSlice::from_slice(icmp.payload()).unwrap();
        assert_eq!(inner.source_addr(), LAN);
        assert_eq!(&icmp.payload()[20..22], &5000u16.to_be_bytes());
        assert!(!translate_icmp_error_in(&mut err.clone(), |_, _, _| None));
    }
}
