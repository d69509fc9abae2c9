//! NAPT on IPv4 packets (MAP-E CE) and the port a MAP-E BR routes by: which flow a packet
//! belongs to, and rewriting one address and one port with every checksum kept right.
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use tunnel_common::mape::{NAT_FIN_RST, NAT_SEEN, NatKey, TOUCH_INTERVAL_NS};

use crate::{
    direct::View,
    packet::{IPPROTO_TCP, IPPROTO_UDP, Ipv4Info, RewriteFailed},
};

pub const IPPROTO_ICMP: u8 = 1;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;

/// Offsets of the source and destination address in the IPv4 header.
pub const SRC_ADDR: usize = 12;
pub const DST_ADDR: usize = 16;

/// A packet that NAPT can translate by a map entry.
pub struct Flow {
    /// Its [`NatKey`], as two words (built without a byte-wise zeroing of the padding).
    pub key: KeyWords,
    /// Offset, from the IPv4 header, of the port (or ICMP identifier) NAPT rewrites.
    pub port_off: usize,
    /// Its current value.
    pub port: u16,
    /// Offset, from the IPv4 header, of the transport checksum.
    pub csum_off: usize,
    /// NAT flags this packet sets ([`NAT_FIN_RST`] for TCP FIN/RST).
    pub flags: u16,
}

/// A [`NatKey`] as two 8-aligned words: local and remote address; local port, remote port
/// and protocol (host order ports, as the struct has them).
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct KeyWords(pub [u64; 2]);

impl KeyWords {
    #[inline(always)]
    pub fn new(
        local_ip: u32,
        remote_ip: u32,
        local_port: u16,
        remote_port: u16,
        proto: u8,
    ) -> Self {
        KeyWords([
            u64::from(local_ip) | u64::from(remote_ip) << 32,
            u64::from(local_port) | u64::from(remote_port) << 16 | u64::from(proto) << 32,
        ])
    }

    /// The key as the maps take it.
    #[inline(always)]
    pub fn key(&self) -> &NatKey {
        // SAFETY: NatKey is 16 bytes of plain data in this layout (checked below), and these
        // words are 8-aligned.
        unsafe { &*(self.0.as_ptr() as *const NatKey) }
    }

    /// The same key with remote 0.0.0.0:0 (port forwards, endpoint-independent mappings).
    #[inline(always)]
    pub fn wildcard(&self) -> KeyWords {
        KeyWords([self.0[0] & 0xffff_ffff, self.0[1] & !0xffff_0000])
    }
}

const _: () = assert!(core::mem::size_of::<NatKey>() == 16);
const _: () = assert!(core::mem::offset_of!(NatKey, remote_ip) == 4);
const _: () = assert!(core::mem::offset_of!(NatKey, local_port) == 8);
const _: () = assert!(core::mem::offset_of!(NatKey, remote_port) == 10);
const _: () = assert!(core::mem::offset_of!(NatKey, proto) == 12);

pub enum Classified {
    Flow(Flow),
    /// ICMP destination unreachable, time exceeded or parameter problem: mapped by the packet
    /// it quotes (the controller does that).
    IcmpError,
    /// Nothing NAPT handles.
    Other,
}

/// Classifies the IPv4 packet at `off`. `outbound`: from the LAN (the local side is the
/// source); otherwise to the shared address (the local side is the destination, and the
/// local IP of the key is 0).
#[inline(always)]
pub fn classify(ctx: &TcContext, off: usize, ip: &Ipv4Info, outbound: bool) -> Classified {
    let l4 = ip.ihl;
    let (local_ip, remote_ip) = if outbound {
        (ip.src(), ip.dst())
    } else {
        (0, ip.src())
    };
    // The transport header's first 14 bytes, straight from the packet when they are in its
    // linear part (ports, ICMP type and id, TCP flags).
    let v = View::of(ctx);
    let l4h = v.at(off + l4, 14);
    match ip.proto() {
        proto @ (IPPROTO_TCP | IPPROTO_UDP) => {
            let p = match l4h {
                Some(h) => h.w32(0).to_ne_bytes(),
                None => match ctx.load::<[u8; 4]>(off + l4) {
                    Ok(p) => p,
                    Err(_) => return Classified::Other,
                },
            };
            let src = u16::from_be_bytes([p[0], p[1]]);
            let dst = u16::from_be_bytes([p[2], p[3]]);
            let (local_port, remote_port, port_off) = if outbound {
                (src, dst, l4)
            } else {
                (dst, src, l4 + 2)
            };
            let mut flags = NAT_SEEN;
            let csum_off = if proto == IPPROTO_TCP {
                let tcp_flags = match l4h {
                    Some(h) => Ok(h.u8(13)),
                    None => ctx.load::<u8>(off + l4 + 13),
                };
                if let Ok(f) = tcp_flags
                    && f & (TCP_FIN | TCP_RST) != 0
                {
                    flags |= NAT_FIN_RST;
                }
                l4 + 16
            } else {
                l4 + 6
            };
            Classified::Flow(Flow {
                key: KeyWords::new(local_ip, remote_ip, local_port, remote_port, proto),
                port_off,
                port: local_port,
                csum_off,
                flags,
            })
        }
        IPPROTO_ICMP => {
            let h = match l4h {
                Some(p) => {
                    let [a, b, c, d] = p.w32(0).to_ne_bytes();
                    let [e, f] = p.w16(4).to_ne_bytes();
                    [a, b, c, d, e, f]
                }
                None => match ctx.load::<[u8; 6]>(off + l4) {
                    Ok(h) => h,
                    Err(_) => return Classified::Other,
                },
            };
            let echo = if outbound {
                ICMP_ECHO_REQUEST
            } else {
                ICMP_ECHO_REPLY
            };
            match h[0] {
                t if t == echo => {
                    let id = u16::from_be_bytes([h[4], h[5]]);
                    Classified::Flow(Flow {
                        key: KeyWords::new(local_ip, remote_ip, id, 0, IPPROTO_ICMP),
                        port_off: l4 + 4,
                        port: id,
                        csum_off: l4 + 2,
                        flags: NAT_SEEN,
                    })
                }
                ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM => {
                    Classified::IcmpError
                }
                _ => Classified::Other,
            }
        }
        _ => Classified::Other,
    }
}

/// Replaces the address at `addr_off` (from the IPv4 header at `off`) with `new_addr` (wire
/// order) and the flow's port with `new_port`, fixing the IPv4 and transport checksums.
#[inline(always)]
pub fn rewrite(
    ctx: &TcContext,
    off: usize,
    ip: &Ipv4Info,
    addr_off: usize,
    new_addr: u32,
    flow: &Flow,
    new_port: u16,
) -> Result<(), RewriteFailed> {
    let old_addr = if addr_off == SRC_ADDR {
        ip.src()
    } else {
        ip.dst()
    };
    if old_addr != new_addr {
        ctx.store(off + addr_off, &new_addr, 0)
            .map_err(|_| RewriteFailed)?;
        ctx.l3_csum_replace(off + 10, old_addr as u64, new_addr as u64, 4)
            .map_err(|_| RewriteFailed)?;
    }
    rewrite_l4::<false>(ctx, off, ip, old_addr, new_addr, flow, new_port)
}

/// The transport part of [`rewrite`]: the flow's port becomes `new_port`, and the transport
/// checksum follows it and the address change `old_addr` → `new_addr` (its pseudo-header;
/// the caller writes the IPv4 header). The checksum helpers know what the skb's checksum
/// state (complete, partial, offloaded) needs. `DIRECT`: the port is written straight into
/// the packet (see `crate::head` for which programs may).
#[inline(always)]
pub fn rewrite_l4<const DIRECT: bool>(
    ctx: &TcContext,
    off: usize,
    ip: &Ipv4Info,
    old_addr: u32,
    new_addr: u32,
    flow: &Flow,
    new_port: u16,
) -> Result<(), RewriteFailed> {
    let udp = if ip.proto() == IPPROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    let csum = off + flow.csum_off;
    // TCP and UDP checksums cover the addresses (pseudo-header); ICMP's does not.
    if old_addr != new_addr && ip.proto() != IPPROTO_ICMP {
        ctx.l4_csum_replace(
            csum,
            old_addr as u64,
            new_addr as u64,
            BPF_F_PSEUDO_HDR as u64 | udp | 4,
        )
        .map_err(|_| RewriteFailed)?;
    }
    if flow.port != new_port {
        let old = flow.port.to_be_bytes();
        let new = new_port.to_be_bytes();
        let at = off + flow.port_off;
        match View::of(ctx).at(at, 2) {
            // SAFETY: two bytes the check just above found in the packet.
            Some(p) if DIRECT => unsafe {
                crate::direct::store16(p.addr(), u16::from_ne_bytes(new))
            },
            _ => ctx.store(at, &new, 0).map_err(|_| RewriteFailed)?,
        }
        ctx.l4_csum_replace(
            csum,
            u16::from_ne_bytes(old) as u64,
            u16::from_ne_bytes(new) as u64,
            udp | 2,
        )
        .map_err(|_| RewriteFailed)?;
    }
    Ok(())
}

/// Records a packet on a map entry: its flags, and the time at most every
/// [`TOUCH_INTERVAL_NS`] (the controller's garbage collection reads both).
#[inline(always)]
pub fn touch(last_seen: &mut u64, flags_field: &mut u16, flags: u16) {
    // A tick's resolution is plenty for an idle timeout.
    let now = crate::nexthop::now_ns();
    // Racing writers on other CPUs can only store the same kind of values.
    if now.wrapping_sub(*last_seen) > TOUCH_INTERVAL_NS {
        *last_seen = now;
    }
    if *flags_field & flags != flags {
        *flags_field |= flags;
    }
}

/// The port a MAP-E BR maps the IPv4 packet at `off` by: the source port of a packet from a
/// CE (`from_ce`), the destination port of one toward a CE; the ICMP echo identifier; for an
/// ICMP error, the port of the packet it quotes (which went the other way). None when the
/// packet has none (non-first fragments, other protocols).
#[inline(always)]
pub fn br_port(ctx: &TcContext, off: usize, ip: &Ipv4Info, from_ce: bool) -> Option<u16> {
    if !ip.first_fragment() {
        return None;
    }
    let l4 = off + ip.ihl;
    // The ports (or ICMP type and id) straight from the packet when they are in its linear
    // part.
    let head = View::of(ctx).at(l4, 8);
    match ip.proto() {
        IPPROTO_TCP | IPPROTO_UDP => {
            let p = match head {
                Some(h) => h.w32(0).to_ne_bytes(),
                None => ctx.load::<[u8; 4]>(l4).ok()?,
            };
            Some(if from_ce {
                u16::from_be_bytes([p[0], p[1]])
            } else {
                u16::from_be_bytes([p[2], p[3]])
            })
        }
        IPPROTO_ICMP => {
            let h = match head {
                Some(p) => {
                    let [a, b, c, d] = p.w32(0).to_ne_bytes();
                    let [e, f] = p.w16(4).to_ne_bytes();
                    [a, b, c, d, e, f]
                }
                None => ctx.load::<[u8; 6]>(l4).ok()?,
            };
            match h[0] {
                ICMP_ECHO_REPLY | ICMP_ECHO_REQUEST => Some(u16::from_be_bytes([h[4], h[5]])),
                ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM => {
                    quoted_port(ctx, l4 + 8, !from_ce)
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// The source (`src`) or destination port of the packet quoted in an ICMP error at `at`.
#[inline(always)]
fn quoted_port(ctx: &TcContext, at: usize, src: bool) -> Option<u16> {
    let [vihl, proto] = [ctx.load::<u8>(at).ok()?, ctx.load::<u8>(at + 9).ok()?];
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || ihl < 20 {
        return None;
    }
    let l4 = at + ihl;
    match proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            let p = ctx.load::<[u8; 4]>(l4).ok()?;
            Some(if src {
                u16::from_be_bytes([p[0], p[1]])
            } else {
                u16::from_be_bytes([p[2], p[3]])
            })
        }
        IPPROTO_ICMP => {
            let h = ctx.load::<[u8; 6]>(l4).ok()?;
            Some(u16::from_be_bytes([h[4], h[5]]))
        }
        _ => None,
    }
}
