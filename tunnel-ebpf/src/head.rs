//! Writing a frame's head: the MAC header and the first bytes of the IP header that follows,
//! built as aligned words.
//!
//! Two ways to write, chosen per program (`DIRECT`, a constant, so the other way is not in the
//! program at all):
//! - through `bpf_skb_store_bytes`, which works on any hook;
//! - directly, one store instruction per word: about 30 ns less per packet, but a program
//!   that writes packets directly gets a prologue from the verifier that uncones every cloned
//!   skb it sees. Ingress programs see clones only while a packet socket (tcpdump) listens;
//!   the egress programs of a host's own traffic (`client_encap`, `lwb4_out`) see TCP's
//!   clones all the time, also the packets they only pass, so those write through the
//!   helper.
//!
//! A head is a buffer of words with two bytes of padding in front: the frame's byte `i` is the
//! buffer's byte `i + 2`, so the IP header (frame byte 14) starts on a word and its fields
//! are aligned. [`tunnel_common::nexthop::NextHop::eth`] has the same padding, so the Ethernet
//! header goes in as two words.
use aya_ebpf::{helpers::generated::bpf_skb_store_bytes, programs::TcContext};

use crate::{
    direct::{View, store16, store32, store64},
    packet::RewriteFailed,
};

/// `N` words: frame bytes 0 to `8 * N - 2`.
#[repr(C, align(8))]
pub struct Head<const N: usize>(pub [u64; N]);

impl<const N: usize> Head<N> {
    /// Writes frame bytes `from` to `from + len` (at most `8 * N - 2`) through the helper.
    #[inline(always)]
    fn store(&self, ctx: &TcContext, from: u32, len: u32) -> Result<(), RewriteFailed> {
        // SAFETY: the helper reads `len` bytes of this buffer from its byte `from + 2`;
        // callers keep `from + len` within the buffer's frame bytes.
        let rc = unsafe {
            bpf_skb_store_bytes(
                ctx.skb.skb.cast(),
                from,
                (self.0.as_ptr() as *const u8).add(2 + from as usize).cast(),
                len,
                0,
            )
        };
        if rc == 0 { Ok(()) } else { Err(RewriteFailed) }
    }
}

impl<const N: usize> Head<N> {
    /// Writes frame bytes 0 to `8 * FULL + 6` straight into the packet when they are in its
    /// linear part (the first word's last six bytes, then words 1 to `FULL` whole); false
    /// when they are not.
    #[inline(always)]
    fn write_direct<const FULL: usize>(&self, ctx: &TcContext) -> bool {
        let v = View::of(ctx);
        if !v.holds(8 * FULL + 6) {
            return false;
        }
        let w = &self.0;
        // SAFETY: the bytes written were checked just above.
        unsafe {
            store16(v.addr(0), (w[0] >> 16) as u16);
            store32(v.addr(2), (w[0] >> 32) as u32);
            let mut k = 1;
            while k <= FULL {
                store64(v.addr(8 * k - 2), w[k]);
                k += 1;
            }
        }
        true
    }
}

/// Frame bytes 0-25: Ethernet header and IPv4 bytes 0-11 (through the TTL, protocol and
/// checksum), as a forwarded IPv4 packet gets them.
#[inline(always)]
pub fn write26<const DIRECT: bool>(ctx: &TcContext, h: &Head<4>) -> Result<(), RewriteFailed> {
    // Bytes 0-21, then the last word's first four.
    if DIRECT && h.write_direct::<2>(ctx) {
        let v = View::of(ctx);
        if v.holds(26) {
            // SAFETY: checked just above.
            unsafe { store32(v.addr(22), h.0[3] as u32) };
            return Ok(());
        }
    }
    h.store(ctx, 0, 26)
}

/// Frame bytes 0-69: Ethernet header, IPv6 header and the first 16 bytes of the IPv4 header
/// inside (through its source address), as an encapsulated packet gets them.
#[inline(always)]
pub fn write70<const DIRECT: bool>(ctx: &TcContext, h: &Head<9>) -> Result<(), RewriteFailed> {
    if DIRECT && h.write_direct::<8>(ctx) {
        return Ok(());
    }
    h.store(ctx, 0, 70)
}

/// Frame bytes 12-69: as [`write70`] with the MAC addresses kept (the kernel writes them when
/// it resolves the next hop).
#[inline(always)]
pub fn write_from_proto70(ctx: &TcContext, h: &Head<9>) -> Result<(), RewriteFailed> {
    h.store(ctx, 12, 58)
}
