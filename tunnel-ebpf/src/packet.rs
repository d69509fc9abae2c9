//! Header offsets and small packet operations shared by the programs. Headers are read as
//! words straight from the packet's linear part ([`crate::direct`]), or through
//! `bpf_skb_load_bytes` when they are not in it; writes go through `bpf_skb_store_bytes`
//! (direct writes would make the verifier unclone every packet of the program's hook, also
//! the ones it passes).
use aya_ebpf::{helpers::bpf_skb_load_bytes, programs::TcContext};
use tunnel_common::fastpath::IPV6_HEADER_LEN;

use crate::direct::{Key16, View};

pub const ETH_LEN: usize = 14;
/// Offset of the EtherType in the Ethernet header.
const ETH_PROTO_OFF: usize = 12;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_DSTOPTS: u8 = 60;
/// How many outer extension headers the decapsulating programs walk; a longer chain is
/// dropped and counted.
pub const MAX_EXT_HEADERS: usize = 4;
/// Where the inner IPv4 header starts in an encapsulated frame.
pub const INNER_OFF: usize = ETH_LEN + IPV6_HEADER_LEN as usize;

/// The verdicts the programs return.
pub const PASS: i32 = aya_ebpf::bindings::TC_ACT_OK as _;
pub const DROP: i32 = aya_ebpf::bindings::TC_ACT_SHOT as _;

/// A packet rewrite helper (adjust_room, store, checksum) failed; the packet is dropped.
#[derive(Debug, Clone, Copy)]
pub struct RewriteFailed;

/// The frame's protocol as the kernel classified it (`skb->protocol`: the EtherType, or the
/// inner one of a VLAN tag the NIC removed). A context field, so no helper call: every
/// packet on our interfaces pays for this check, also those the programs pass.
#[inline(always)]
pub fn eth_proto(ctx: &TcContext) -> Option<u16> {
    // SAFETY: reading a field of the context the kernel handed us.
    let protocol = unsafe { (*ctx.skb.skb).protocol };
    Some(u16::from_be(protocol as u16))
}

#[inline(always)]
pub fn set_eth_proto(ctx: &TcContext, proto: u16) -> Result<(), RewriteFailed> {
    ctx.store(ETH_PROTO_OFF, &proto.to_be_bytes(), 0)
        .map_err(|_| RewriteFailed)
}

/// 16-byte equality without a memcmp call (BPF has none).
#[inline(always)]
pub fn eq16(a: &[u8; 16], b: &[u8; 16]) -> bool {
    let (a0, a1) = a.split_at(8);
    let (b0, b1) = b.split_at(8);
    u64::from_ne_bytes(a0.try_into().unwrap_or([0; 8]))
        == u64::from_ne_bytes(b0.try_into().unwrap_or([1; 8]))
        && u64::from_ne_bytes(a1.try_into().unwrap_or([0; 8]))
            == u64::from_ne_bytes(b1.try_into().unwrap_or([1; 8]))
}

/// An IPv4 header as the programs read it: its 20 fixed bytes as three words (wire order,
/// as loaded), with accessors for the fields. Read with one load per word from the packet
/// (or one helper call when the header is not in the linear part).
#[derive(Clone, Copy)]
pub struct Ipv4Info {
    /// Bytes 0-7: version and header length, TOS, total length, id, flags and offset.
    pub w0: u64,
    /// Bytes 8-15: TTL, protocol, checksum, source address.
    pub w1: u64,
    /// Bytes 16-19: destination address.
    pub w2: u32,
    /// Header length in bytes (20-60).
    pub ihl: usize,
    pub tot_len: u16,
}

/// Why [`Ipv4Info::parse`] found no IPv4 header.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum NotIpv4 {
    /// 20 bytes are there, but not version 4.
    OtherVersion,
    /// Shorter than an IPv4 header, or a header length or total length that cannot be.
    Malformed,
}

/// 24 bytes, 8-aligned: what a header read through the helper lands in.
#[repr(C, align(8))]
struct Words3([u64; 3]);

impl Ipv4Info {
    /// Reads and sanity-checks the IPv4 header at `off` (a constant: 14 or 54).
    #[inline(always)]
    pub fn load(ctx: &TcContext, off: usize) -> Option<Ipv4Info> {
        Self::parse(ctx, off).ok()
    }

    /// As [`Ipv4Info::load`], telling why it is not an IPv4 header.
    #[inline(always)]
    pub fn parse(ctx: &TcContext, off: usize) -> Result<Ipv4Info, NotIpv4> {
        let v = View::of(ctx);
        let (w0, w1, w2) = if v.holds(off + 20) {
            (v.w64(off), v.w64(off + 8), v.w32(off + 16))
        } else {
            // Not zeroed first: LLVM would do it with a call to memset on every packet.
            let mut buf = core::mem::MaybeUninit::<Words3>::uninit();
            // SAFETY: the helper writes 20 bytes into the 24-byte buffer (the first 20, which
            // are all that is read: the third word's low half), or fails.
            let rc = unsafe {
                bpf_skb_load_bytes(
                    ctx.skb.skb as *const _,
                    off as u32,
                    buf.as_mut_ptr().cast(),
                    20,
                )
            };
            if rc != 0 {
                return Err(NotIpv4::Malformed);
            }
            // SAFETY: written by the helper (above).
            let w = unsafe { buf.assume_init_ref() };
            (w.0[0], w.0[1], w.0[2] as u32)
        };
        Self::from_words(w0, w1, w2)
    }

    /// The header whose words are `w0`, `w1`, `w2`, checked.
    #[inline(always)]
    pub fn from_words(w0: u64, w1: u64, w2: u32) -> Result<Ipv4Info, NotIpv4> {
        let vihl = w0 as u8;
        if vihl >> 4 != 4 {
            return Err(NotIpv4::OtherVersion);
        }
        let ihl = ((vihl & 0x0f) as usize) * 4;
        let tot_len = u16::from_be((w0 >> 16) as u16);
        if ihl < 20 || (tot_len as usize) < ihl {
            return Err(NotIpv4::Malformed);
        }
        Ok(Ipv4Info {
            w0,
            w1,
            w2,
            ihl,
            tot_len,
        })
    }

    /// The source address, wire order (as [`tunnel_common::fastpath::Ipv4Key`]).
    #[inline(always)]
    pub fn src(&self) -> u32 {
        (self.w1 >> 32) as u32
    }

    /// The destination address, wire order.
    #[inline(always)]
    pub fn dst(&self) -> u32 {
        self.w2
    }

    #[inline(always)]
    pub fn tos(&self) -> u8 {
        (self.w0 >> 8) as u8
    }

    #[inline(always)]
    pub fn ttl(&self) -> u8 {
        self.w1 as u8
    }

    #[inline(always)]
    pub fn proto(&self) -> u8 {
        (self.w1 >> 8) as u8
    }

    /// The header checksum's value.
    #[inline(always)]
    pub fn check(&self) -> u16 {
        u16::from_be((self.w1 >> 16) as u16)
    }

    /// Flags and fragment offset.
    #[inline(always)]
    fn frags(&self) -> u16 {
        u16::from_be((self.w0 >> 48) as u16)
    }

    pub fn dont_fragment(&self) -> bool {
        self.frags() & 0x4000 != 0
    }

    /// Offset 0 (the first or only fragment): the transport header is here.
    #[inline(always)]
    pub fn first_fragment(&self) -> bool {
        self.frags() & 0x1fff == 0
    }

    /// Whether this is a fragment at all (more fragments follow, or it is not the first).
    #[inline(always)]
    pub fn fragment(&self) -> bool {
        self.frags() & 0x3fff != 0
    }

    /// Bytes 8-11 (TTL, protocol, checksum) with the TTL one lower and the checksum to match
    /// (RFC 1624, as the kernel's `ip_decrease_ttl`), wire order.
    #[inline(always)]
    pub fn ttl_decremented(&self) -> u32 {
        let check = ttl_decremented_checksum(self.check()).to_be();
        u32::from(self.ttl().wrapping_sub(1))
            | u32::from(self.proto()) << 8
            | u32::from(check) << 16
    }

    /// Bytes 8-15 (TTL, protocol, checksum, source) as the header's second word, with the
    /// TTL one lower when `decrement` and the source `src` (wire order), the checksum updated
    /// for both.
    #[inline(always)]
    pub fn w1_rewritten(&self, decrement: bool, src: u32) -> u64 {
        let low = if decrement {
            self.ttl_decremented()
        } else {
            self.w1 as u32
        };
        let check = if src == self.src() {
            (low >> 16) as u16
        } else {
            csum_replace4((low >> 16) as u16, self.src(), src)
        };
        u64::from(low & 0xffff | u32::from(check) << 16) | u64::from(src) << 32
    }
}

/// A checksum field (as read from the packet, wire order) once the 32-bit field it covers
/// changed from `old` to `new` (both as read from the packet): RFC 1624 eqn. 3,
/// HC' = ~(~HC + ~m + m'), in ones' complement arithmetic, which gives the same bytes
/// whichever byte order it is done in.
#[inline(always)]
pub fn csum_replace4(check: u16, old: u32, new: u32) -> u16 {
    let sum = u32::from(!check)
        + u32::from(!(old as u16))
        + u32::from(!((old >> 16) as u16))
        + u32::from(new as u16)
        + u32::from((new >> 16) as u16);
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The outer IPv6 header of an encapsulated frame (at [`ETH_LEN`]), as words.
#[derive(Clone, Copy)]
pub struct Outer6 {
    /// Bytes 0-7: version, traffic class, flow label, payload length, next header, hop limit.
    pub w0: u64,
    pub src: [u64; 2],
    pub dst: [u64; 2],
}

impl Outer6 {
    /// Reads the IPv6 header after the Ethernet header; None when the frame is shorter.
    #[inline(always)]
    pub fn load(ctx: &TcContext) -> Option<Outer6> {
        let v = View::of(ctx);
        if v.holds(ETH_LEN + 40) {
            return Some(Outer6 {
                w0: v.w64(ETH_LEN),
                src: v.addr6(ETH_LEN + 8),
                dst: v.addr6(ETH_LEN + 24),
            });
        }
        let mut buf = core::mem::MaybeUninit::<Words5>::uninit();
        // SAFETY: the helper writes 40 bytes into the 40-byte buffer, or fails.
        let rc = unsafe {
            bpf_skb_load_bytes(
                ctx.skb.skb as *const _,
                ETH_LEN as u32,
                buf.as_mut_ptr().cast(),
                40,
            )
        };
        if rc != 0 {
            return None;
        }
        // SAFETY: written by the helper (above).
        let w = unsafe { buf.assume_init_ref() };
        Some(Outer6 {
            w0: w.0[0],
            src: [w.0[1], w.0[2]],
            dst: [w.0[3], w.0[4]],
        })
    }

    #[inline(always)]
    pub fn next_hdr(&self) -> u8 {
        (self.w0 >> 48) as u8
    }

    #[inline(always)]
    pub fn payload_len(&self) -> u16 {
        u16::from_be((self.w0 >> 32) as u16)
    }

    /// The source as a map key.
    #[inline(always)]
    pub fn src_key(&self) -> Key16 {
        Key16(self.src)
    }

    /// The source address's bytes (for logs and keys built elsewhere).
    #[inline(always)]
    pub fn src_bytes(&self) -> [u8; 16] {
        *Key16(self.src).bytes()
    }
}

/// 40 bytes, 8-aligned.
#[repr(C, align(8))]
struct Words5([u64; 5]);

/// Whether two addresses held as words are the same.
#[inline(always)]
pub fn eq_words(a: &[u64; 2], b: &[u64; 2]) -> bool {
    a[0] == b[0] && a[1] == b[1]
}

/// The length of the largest packet this skb will become on the wire: its IPv4 total length,
/// or for a GSO skb one segment (headers + gso_size).
#[inline(always)]
pub fn wire_len(ctx: &TcContext, ip_off: usize, ip: &Ipv4Info) -> usize {
    // SAFETY: reading fields of the context the kernel handed us.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size } as usize;
    if gso_size == 0 {
        return ip.tot_len as usize;
    }
    let l4 = match ip.proto() {
        IPPROTO_TCP => ctx
            .load::<u8>(ip_off + ip.ihl + 12)
            .map(|b| ((b >> 4) as usize) * 4)
            .unwrap_or(60),
        IPPROTO_UDP => 8,
        _ => 60,
    };
    ip.ihl + l4 + gso_size
}

/// How many wire packets this skb stands for (GSO segments, or 1).
#[inline(always)]
pub fn segments(ctx: &TcContext) -> u64 {
    // SAFETY: reading a field of the context.
    let segs = unsafe { (*ctx.skb.skb).gso_segs };
    if segs == 0 { 1 } else { segs as u64 }
}

/// Decrements the TTL of the IPv4 header at `off` and fixes its checksum: one store of TTL,
/// protocol and checksum (RFC 1624's incremental update, as the kernel's `ip_decrease_ttl`
/// does it), not a store and a checksum helper.
#[inline(always)]
pub fn decrement_ttl(ctx: &TcContext, off: usize, ip: &Ipv4Info) -> Result<(), RewriteFailed> {
    let new = ip.ttl_decremented();
    ctx.store(off + 8, &new, 0).map_err(|_| RewriteFailed)
}

/// The header checksum once the TTL (the high byte of its 16-bit word) is one lower: the sum
/// loses 0x0100, so its complement gains it, with the end-around carry.
#[inline(always)]
pub fn ttl_decremented_checksum(check: u16) -> u16 {
    let c = u32::from(check) + 0x0100;
    (c + u32::from(c >= 0xffff)) as u16
}
