//! Sending rewritten packets on: FIB lookup, MAC rewrite, redirect (or neighbour resolution
//! by the kernel when the next hop's MAC is not known yet).
use core::mem;

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_FIB_LOOKUP_OUTPUT, TC_ACT_OK, TC_ACT_REDIRECT, bpf_fib_lookup, bpf_redir_neigh,
    },
    helpers::generated::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use tunnel_common::{fastpath::IPV6_HEADER_LEN, stats::Counter};

use crate::{
    packet::{
        DROP, ETH_LEN, ETH_P_IP, Ipv4Info, PASS, decrement_ttl, set_eth_proto,
        ttl_decremented_checksum,
    },
    stats::count,
};

/// The verdicts as the programs return them.
const VERDICT_OK: i32 = TC_ACT_OK as _;
const VERDICT_REDIRECT: i32 = TC_ACT_REDIRECT as _;

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Result of a forwarding attempt.
pub enum Forward {
    /// The program's verdict (redirect, or OK when already on the right egress).
    Verdict(i32),
    /// No usable route: the caller decides (drop, or leave it to the kernel).
    NoRoute,
    /// The route leads to `ifindex`, which the caller wants left to the kernel.
    Excluded,
}

#[inline(always)]
fn zeroed() -> bpf_fib_lookup {
    // SAFETY: bpf_fib_lookup is plain data; all-zero is its documented initial state.
    unsafe { mem::zeroed() }
}

/// The FIB's answer for an IPv6 packet we are about to build (outer `src` → `dst`), asked
/// before the packet is rewritten, so that the MAC header can go in with the outer header in
/// one store ([`V6Route::macs`]) and [`V6Route::send`] only redirects.
pub struct V6Route {
    p: bpf_fib_lookup,
    rc: u32,
}

/// Looks up the route for the IPv6 packet this skb becomes once encapsulated. `oif` is the
/// IPv6-side interface.
#[inline(always)]
pub fn lookup_v6(ctx: &TcContext, src: &[u8; 16], dst: &[u8; 16], oif: u32) -> V6Route {
    let mut p = zeroed();
    p.family = AF_INET6;
    p.ifindex = oif;
    p.__bindgen_anon_3.ipv6_src = words(src);
    p.__bindgen_anon_4.ipv6_dst = words(dst);
    // SAFETY: the helper reads and writes `p`, whose size we pass.
    let mut rc = unsafe {
        fib_lookup(
            ctx.skb.skb.cast(),
            &mut p,
            mem::size_of::<bpf_fib_lookup>() as i32,
            BPF_FIB_LOOKUP_OUTPUT,
        )
    } as u32;
    // The helper checked the skb as it is now against the egress MTU; it grows by the outer
    // header.
    // GSO packets are checked per segment when they are split, as the helper does.
    // SAFETY: reading fields of the context and of the union the helper filled in.
    let (gso_size, mtu) = unsafe { ((*ctx.skb.skb).gso_size, p.__bindgen_anon_1.mtu_result) };
    if rc == BPF_FIB_LKUP_RET_SUCCESS
        && gso_size == 0
        && ctx.len() + u32::from(IPV6_HEADER_LEN) > u32::from(mtu) + ETH_LEN as u32
    {
        rc = BPF_FIB_LKUP_RET_FRAG_NEEDED;
    }
    V6Route { p, rc }
}

impl V6Route {
    /// Destination and source MAC, when the FIB knows the next hop's.
    #[inline(always)]
    pub fn macs(&self) -> Option<[u8; 12]> {
        if self.rc != BPF_FIB_LKUP_RET_SUCCESS {
            return None;
        }
        let mut macs = [0u8; 12];
        macs[..6].copy_from_slice(&self.p.dmac);
        macs[6..].copy_from_slice(&self.p.smac);
        Some(macs)
    }

    /// Sends the packet (built with [`V6Route::macs`] in its MAC header) out of the interface
    /// the FIB picked. `current` is the interface the program runs on and `egress` tells
    /// whether it runs on egress there (then a packet already on the right interface just
    /// continues). Without a known next hop the kernel resolves it (ND) and queues the
    /// packet; when the FIB refuses (IPv6 forwarding off on `oif`: a client host, or a server
    /// that does not forward IPv6), the kernel's own output route lookup and neighbour
    /// resolution still work, at the cost of doing them after we return.
    #[inline(always)]
    pub fn send(&self, ctx: &TcContext, oif: u32, egress: bool) -> Forward {
        match self.rc {
            BPF_FIB_LKUP_RET_SUCCESS => {
                // SAFETY: reading a field of the context.
                let current = unsafe { (*ctx.skb.skb).ifindex };
                if egress && self.p.ifindex == current {
                    return Forward::Verdict(VERDICT_OK);
                }
                // SAFETY: plain helper call.
                Forward::Verdict(unsafe { bpf_redirect(self.p.ifindex, 0) } as i32)
            }
            BPF_FIB_LKUP_RET_NO_NEIGH => {
                // SAFETY: plain data; after the lookup the destination field holds the next
                // hop.
                let mut nh: bpf_redir_neigh = unsafe { mem::zeroed() };
                nh.nh_family = AF_INET6 as u32;
                nh.__bindgen_anon_1.ipv6_nh = unsafe { self.p.__bindgen_anon_4.ipv6_dst };
                redirect_neigh(self.p.ifindex, Some(&mut nh))
            }
            _ => redirect_neigh(oif, None),
        }
    }
}

/// `bpf_redirect_neigh` toward `nh` on `ifindex`, or with the kernel's route lookup when `nh`
/// is None.
#[inline(always)]
fn redirect_neigh(ifindex: u32, nh: Option<&mut bpf_redir_neigh>) -> Forward {
    let (ptr, len) = match nh {
        Some(nh) => (
            nh as *mut bpf_redir_neigh,
            mem::size_of::<bpf_redir_neigh>() as i32,
        ),
        None => (core::ptr::null_mut(), 0),
    };
    // SAFETY: `ptr` is null (with length 0) or points to a live struct of that length.
    let verdict = unsafe { bpf_redirect_neigh(ifindex, ptr, len, 0) };
    if verdict == VERDICT_REDIRECT as i64 {
        Forward::Verdict(VERDICT_REDIRECT)
    } else {
        Forward::NoRoute
    }
}

/// FIB lookup parameters for an IPv4 packet `src` → `dst` that arrived on `ifindex`.
#[inline(always)]
pub fn v4_lookup(ifindex: u32, src: u32, dst: u32, tos: u8) -> bpf_fib_lookup {
    let mut p = zeroed();
    p.family = AF_INET;
    p.ifindex = ifindex;
    p.__bindgen_anon_2.tos = tos;
    p.__bindgen_anon_3.ipv4_src = src;
    p.__bindgen_anon_4.ipv4_dst = dst;
    p
}

/// The frame head a forwarded IPv4 packet gets in one store: MAC header, EtherType and the
/// first 12 bytes of the IPv4 header (through the TTL, protocol and checksum).
#[repr(C)]
struct Head4 {
    macs: [u8; 12],
    proto: [u8; 2],
    ipv4: [u8; 12],
}

/// Forwards the IPv4 packet that now follows the Ethernet header (just unwrapped by
/// `encap::unwrap_for_forwarding`, so the frame's EtherType is still IPv6's; header `inner`,
/// destination `dst`) as the kernel's router would: TTL checked and decremented, FIB lookup,
/// redirect. With the next hop known, the MAC header, the EtherType and the decremented TTL
/// with its checksum go in with one store. Routes to `exclude` (the TUN), local delivery,
/// unresolved routes and expiring TTLs are left to the kernel (with the EtherType written).
/// Returns the verdict and whether we redirected it.
#[inline(always)]
pub fn forward_unwrapped(ctx: &TcContext, inner: &Ipv4Info, dst: u32, exclude: u32) -> (i32, bool) {
    if inner.hdr.ttl <= 1 {
        count(Counter::SlowPathTtl);
        return (to_kernel(ctx), false);
    }
    // SAFETY: reading a field of the context.
    let ingress = unsafe { (*ctx.skb.skb).ingress_ifindex };
    let mut p = v4_lookup(ingress, inner.src(), dst, inner.hdr.tos);
    // SAFETY: the helper reads and writes `p`, whose size we pass.
    let rc = unsafe {
        fib_lookup(
            ctx.skb.skb.cast(),
            &mut p,
            mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    } as u32;
    if exclude != 0 && p.ifindex == exclude {
        return (to_kernel(ctx), false);
    }
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => {
            let h = &inner.hdr;
            let [c0, c1] = ttl_decremented_checksum(u16::from_be_bytes(h.check)).to_be_bytes();
            let mut macs = [0u8; 12];
            macs[..6].copy_from_slice(&p.dmac);
            macs[6..].copy_from_slice(&p.smac);
            let head = Head4 {
                macs,
                proto: ETH_P_IP.to_be_bytes(),
                ipv4: [
                    h.vihl,
                    h.tos,
                    h.tot_len[0],
                    h.tot_len[1],
                    h.id[0],
                    h.id[1],
                    h.frags[0],
                    h.frags[1],
                    h.ttl - 1,
                    h.proto,
                    c0,
                    c1,
                ],
            };
            if ctx.store(0, &head, 0).is_err() {
                return (to_kernel(ctx), false);
            }
            // SAFETY: plain helper call.
            (unsafe { bpf_redirect(p.ifindex, 0) } as i32, true)
        }
        BPF_FIB_LKUP_RET_NO_NEIGH => {
            // The kernel resolves the next hop (ARP) and queues the packet meanwhile.
            if set_eth_proto(ctx, ETH_P_IP).is_err() {
                count(Counter::DropRewriteFailed);
                return (DROP, false);
            }
            // SAFETY: plain data; after the lookup the destination field holds the next hop.
            let mut nh: bpf_redir_neigh = unsafe { mem::zeroed() };
            nh.nh_family = AF_INET as u32;
            nh.__bindgen_anon_1.ipv4_nh = unsafe { p.__bindgen_anon_4.ipv4_dst };
            match redirect_neigh(p.ifindex, Some(&mut nh)) {
                // The redirect happens when the program returns: the TTL can go down now.
                Forward::Verdict(v) => {
                    if decrement_ttl(ctx, ETH_LEN, inner).is_err() {
                        count(Counter::DropRewriteFailed);
                        return (DROP, false);
                    }
                    (v, true)
                }
                Forward::NoRoute | Forward::Excluded => (PASS, false),
            }
        }
        _ => (to_kernel(ctx), false),
    }
}

/// Leaves an unwrapped packet to the kernel, with the frame's EtherType written.
#[inline(always)]
fn to_kernel(ctx: &TcContext) -> i32 {
    if set_eth_proto(ctx, ETH_P_IP).is_err() {
        count(Counter::DropRewriteFailed);
        return DROP;
    }
    PASS
}

#[inline(always)]
fn words(a: &[u8; 16]) -> [u32; 4] {
    let mut w = [0u32; 4];
    let mut i = 0;
    while i < 4 {
        w[i] = u32::from_ne_bytes([a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]]);
        i += 1;
    }
    w
}
