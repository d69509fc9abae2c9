//! PCP (RFC 6887) for the MAP-E CE's LAN: the MAP opcode only, so that an application (a
//! game console, a peer-to-peer client) can open an inbound port. The CE answers with a port
//! of its own set (a request for a port outside it gets one inside: RFC 6887 §11.3 lets the
//! server pick), as a port forward that lives for the granted lifetime. The bytes here, the
//! decisions in [`crate::daemon::ce`].
use std::net::{Ipv4Addr, Ipv6Addr};

/// The PCP server port (RFC 6887 §19.1).
pub const PORT: u16 = 5351;
const VERSION: u8 = 2;
pub const OP_ANNOUNCE: u8 = 0;
pub const OP_MAP: u8 = 1;
/// The longest lifetime granted (RFC 6887 §15: the server may cap it).
pub const MAX_LIFETIME: u32 = 2 * 3600;

/// Result codes (RFC 6887 §7.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ResultCode {
    Success = 0,
    UnsuppVersion = 1,
    NotAuthorized = 2,
    MalformedRequest = 3,
    UnsuppOpcode = 4,
    UnsuppProtocol = 9,
    NoResources = 8,
    AddressMismatch = 12,
}

/// A MAP request (RFC 6887 §11.1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapRequest {
    pub lifetime: u32,
    /// The PCP client's address as it wrote it (IPv4-mapped for IPv4).
    pub client: Ipv6Addr,
    pub nonce: [u8; 12],
    /// 6, 17, or 0 (all protocols).
    pub protocol: u8,
    pub internal_port: u16,
    pub suggested_port: u16,
}

/// What a datagram to the PCP port is.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    Map(MapRequest),
    /// Answered with this result code and no mapping (the header echoed back).
    Refuse {
        opcode: u8,
        lifetime: u32,
        code: ResultCode,
    },
    /// Not worth an answer (a response, or shorter than a header).
    Ignore,
}

pub fn parse(data: &[u8]) -> Request {
    if data.len() < 24 || data[1] & 0x80 != 0 {
        return Request::Ignore;
    }
    let opcode = data[1] & 0x7f;
    let lifetime = u32::from_be_bytes([data[4], data[5], data[6], data[7]]);
    let refuse = |code| Request::Refuse {
        opcode,
        lifetime,
        code,
    };
    if data[0] != VERSION {
        return refuse(ResultCode::UnsuppVersion);
    }
    if data.len() > 1100 || !data.len().is_multiple_of(4) {
        return refuse(ResultCode::MalformedRequest);
    }
    if opcode != OP_MAP {
        return refuse(ResultCode::UnsuppOpcode);
    }
    if data.len() < 60 {
        return refuse(ResultCode::MalformedRequest);
    }
    let mut client = [0u8; 16];
    client.copy_from_slice(&data[8..24]);
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&data[24..36]);
    Request::Map(MapRequest {
        lifetime,
        client: Ipv6Addr::from(client),
        nonce,
        protocol: data[36],
        internal_port: u16::from_be_bytes([data[40], data[41]]),
        suggested_port: u16::from_be_bytes([data[42], data[43]]),
    })
}

/// The 24-byte response header (RFC 6887 §7.2).
fn header(opcode: u8, code: ResultCode, lifetime: u32, epoch: u32) -> Vec<u8> {
    let mut out = vec![VERSION, 0x80 | opcode, 0, code as u8];
    out.extend_from_slice(&lifetime.to_be_bytes());
    out.extend_from_slice(&epoch.to_be_bytes());
    out.extend_from_slice(&[0; 12]);
    out
}

/// A response without a mapping (an error, or ANNOUNCE).
pub fn refusal(opcode: u8, code: ResultCode, lifetime: u32, epoch: u32) -> Vec<u8> {
    header(opcode, code, lifetime, epoch)
}

/// The MAP response: the request's nonce, protocol and internal port, the assigned port and
/// address (RFC 6887 §11.1).
pub fn map_response(
    req: &MapRequest,
    code: ResultCode,
    lifetime: u32,
    epoch: u32,
    external: (u16, Ipv4Addr),
) -> Vec<u8> {
    let mut out = header(OP_MAP, code, lifetime, epoch);
    out.extend_from_slice(&req.nonce);
    out.push(req.protocol);
    out.extend_from_slice(&[0; 3]);
    out.extend_from_slice(&req.internal_port.to_be_bytes());
    out.extend_from_slice(&external.0.to_be_bytes());
    out.extend_from_slice(&external.1.to_ipv6_mapped().octets());
    out
}

/// A NAT-PMP request (RFC 6886 §3.2, §3.3).
#[derive(Debug, PartialEq, Eq)]
pub enum NatPmp {
    ExternalAddress,
    Map {
        protocol: u8,
        internal_port: u16,
        suggested_port: u16,
        lifetime: u32,
    },
    Refuse {
        opcode: u8,
        code: u16,
    },
    Ignore,
}

pub fn parse_natpmp(data: &[u8]) -> NatPmp {
    if data.len() < 2 || data[1] & 0x80 != 0 {
        return NatPmp::Ignore;
    }
    match (data[1], data.len()) {
        (0, _) => NatPmp::ExternalAddress,
        (op @ (1 | 2), 12..) => NatPmp::Map {
            protocol: if op == 1 { 17 } else { 6 },
            internal_port: u16::from_be_bytes([data[4], data[5]]),
            suggested_port: u16::from_be_bytes([data[6], data[7]]),
            lifetime: u32::from_be_bytes([data[8], data[9], data[10], data[11]]),
        },
        (op @ (1 | 2), _) => NatPmp::Refuse {
            opcode: op,
            code: 5,
        },
        // 5: unsupported opcode.
        (op, _) => NatPmp::Refuse {
            opcode: op,
            code: 5,
        },
    }
}

fn natpmp_header(opcode: u8, code: u16, epoch: u32) -> Vec<u8> {
    let mut out = vec![0, 0x80 | opcode];
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(&epoch.to_be_bytes());
    out
}

/// The answer to an external-address request.
pub fn natpmp_address(epoch: u32, addr: Ipv4Addr) -> Vec<u8> {
    let mut out = natpmp_header(0, 0, epoch);
    out.extend_from_slice(&addr.octets());
    out
}

/// The answer to a UDP (`protocol` 17) or TCP mapping request.
pub fn natpmp_map(
    protocol: u8,
    code: u16,
    epoch: u32,
    internal: u16,
    external: u16,
    lifetime: u32,
) -> Vec<u8> {
    let mut out = natpmp_header(if protocol == 17 { 1 } else { 2 }, code, epoch);
    out.extend_from_slice(&internal.to_be_bytes());
    out.extend_from_slice(&external.to_be_bytes());
    out.extend_from_slice(&lifetime.to_be_bytes());
    out
}

/// A refusal without a mapping.
pub fn natpmp_refusal(opcode: u8, code: u16, epoch: u32) -> Vec<u8> {
    natpmp_header(opcode, code, epoch)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A MAP request as RFC 6887 §7.1 and §11.1 lay it out.
    fn request(
        client: Ipv4Addr,
        proto: u8,
        internal: u16,
        suggested: u16,
        lifetime: u32,
    ) -> Vec<u8> {
        let mut r = vec![2, 1, 0, 0];
        r.extend_from_slice(&lifetime.to_be_bytes());
        r.extend_from_slice(&client.to_ipv6_mapped().octets());
        r.extend_from_slice(b"twelve bytes");
        r.extend_from_slice(&[proto, 0, 0, 0]);
        r.extend_from_slice(&internal.to_be_bytes());
        r.extend_from_slice(&suggested.to_be_bytes());
        r.extend_from_slice(&[0; 16]);
        r
    }

    #[test]
    fn a_map_request_parses_and_its_response_echoes_nonce_and_ports() {
        let client = Ipv4Addr::new(198, 51, 100, 10);
        let Request::Map(req) = parse(&request(client, 6, 8080, 80, 600)) else {
            panic!("not a MAP request");
        };
        assert_eq!(req.client, client.to_ipv6_mapped());
        assert_eq!(
            (
                req.protocol,
                req.internal_port,
                req.suggested_port,
                req.lifetime
            ),
            (6, 8080, 80, 600)
        );
        let shared = Ipv4Addr::new(203, 0, 113, 18);
        let resp = map_response(&req, ResultCode::Success, 600, 7, (1680, shared));
        assert_eq!(resp.len(), 60);
        assert_eq!(&resp[..4], &[2, 0x81, 0, 0]);
        assert_eq!(&resp[24..36], b"twelve bytes");
        assert_eq!(u16::from_be_bytes([resp[42], resp[43]]), 1680);
        assert_eq!(&resp[44..60], &shared.to_ipv6_mapped().octets());
    }

    #[test]
    fn other_versions_opcodes_and_short_requests_are_refused_or_ignored() {
        let mut r = request(Ipv4Addr::LOCALHOST, 6, 1, 1, 1);
        r[0] = 1;
        assert!(matches!(
            parse(&r),
            Request::Refuse {
                code: ResultCode::UnsuppVersion,
                ..
            }
        ));
        r[0] = 2;
        r[1] = 2;
        assert!(matches!(
            parse(&r),
            Request::Refuse {
                code: ResultCode::UnsuppOpcode,
                ..
            }
        ));
        assert_eq!(parse(&r[..20]), Request::Ignore);
        r[1] = 0x81;
        assert_eq!(parse(&r), Request::Ignore, "a response");
    }

    #[test]
    fn nat_pmp_requests_parse_and_answers_have_rfc_6886_layouts() {
        assert_eq!(parse_natpmp(&[0, 0]), NatPmp::ExternalAddress);
        let req = [0, 2, 0, 0, 0x1f, 0x90, 0, 80, 0, 0, 0x0e, 0x10];
        assert_eq!(
            parse_natpmp(&req),
            NatPmp::Map {
                protocol: 6,
                internal_port: 8080,
                suggested_port: 80,
                lifetime: 3600
            }
        );
        assert_eq!(parse_natpmp(&[0, 3]), NatPmp::Refuse { opcode: 3, code: 5 });
        let a = natpmp_address(9, Ipv4Addr::new(203, 0, 113, 18));
        assert_eq!(a, [0, 128, 0, 0, 0, 0, 0, 9, 203, 0, 113, 18]);
        let m = natpmp_map(6, 0, 9, 8080, 1680, 3600);
        assert_eq!(m.len(), 16);
        assert_eq!(&m[..2], &[0, 130]);
        assert_eq!(u16::from_be_bytes([m[10], m[11]]), 1680);
    }
}
