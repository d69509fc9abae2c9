//! TCP MSS clamping on SYNs, so that TCP segments fit the tunnel without fragments.
use aya_ebpf::programs::TcContext;

use crate::{
    direct::View,
    packet::{IPPROTO_TCP, Ipv4Info},
};

/// TCP flag SYN in byte 13 of the header.
const TCP_SYN: u8 = 0x02;
const TCPOPT_EOL: u8 = 0;
const TCPOPT_NOP: u8 = 1;
const TCPOPT_MSS: u8 = 2;
/// Options walked before giving up. Every stack puts MSS first or second in a SYN; the bound
/// keeps the verifier's path count small (each step branches).
const MAX_OPTION_STEPS: usize = 8;

/// If the IPv4 packet at `ip_off` is a TCP SYN (or SYN-ACK) announcing an MSS above `max`,
/// rewrites the option to `max` and fixes the checksum. Returns whether it did.
#[inline(always)]
pub fn clamp(ctx: &TcContext, ip_off: usize, ip: &Ipv4Info, max: u16) -> bool {
    if ip.proto() != IPPROTO_TCP || !ip.first_fragment() || max == 0 {
        return false;
    }
    let tcp_off = ip_off + ip.ihl;
    // Every TCP packet is asked, so the flags are read straight from the packet when its
    // headers are in the linear part (they are, but for odd drivers).
    let v = View::of(ctx);
    let [doff, flags] = if let Some(tcp) = v.at(tcp_off, 14) {
        tcp.w16(12).to_ne_bytes()
    } else {
        match ctx.load::<[u8; 2]>(tcp_off + 12) {
            Ok(b) => b,
            Err(_) => return false,
        }
    };
    if flags & TCP_SYN == 0 {
        return false;
    }
    let opt_len = ((doff >> 4) as usize * 4).saturating_sub(20);
    let opt_off = tcp_off + 20;
    let mut i = 0usize;
    for _ in 0..MAX_OPTION_STEPS {
        if i + 2 > opt_len {
            break;
        }
        // Kind and length together; for a NOP the second byte is the next option's kind.
        let Ok([kind, len]) = ctx.load::<[u8; 2]>(opt_off + i) else {
            break;
        };
        if kind == TCPOPT_EOL {
            break;
        }
        if kind == TCPOPT_MSS {
            if len != 4 || i + 4 > opt_len {
                break;
            }
            return rewrite(ctx, tcp_off, opt_off + i + 2, max);
        }
        let step = if kind == TCPOPT_NOP { 1 } else { len as usize };
        if step == 0 || (kind != TCPOPT_NOP && step < 2) {
            break;
        }
        i += step;
    }
    false
}

/// Lowers the MSS value at `at` to `max` if it is larger, fixing the TCP checksum.
#[inline(never)]
fn rewrite(ctx: &TcContext, tcp_off: usize, at: usize, max: u16) -> bool {
    let Ok(old) = ctx.load::<[u8; 2]>(at) else {
        return false;
    };
    if u16::from_be_bytes(old) <= max {
        return false;
    }
    let new = max.to_be_bytes();
    if ctx.store(at, &new, 0).is_err() {
        return false;
    }
    // The checksum is at offset 16 of the TCP header; a 2-byte field changed.
    ctx.l4_csum_replace(
        tcp_off + 16,
        u16::from_ne_bytes(old) as u64,
        u16::from_ne_bytes(new) as u64,
        2,
    )
    .is_ok()
}
