//! Sending rewritten packets on: the next hop from the cache ([`crate::nexthop`]) or, when
//! the cache has no current answer, from the FIB helper; MAC rewrite; redirect (or neighbour
//! resolution by the kernel when the next hop's MAC is not known yet).
use core::mem;

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_OUTPUT, TC_ACT_OK,
        TC_ACT_REDIRECT, bpf_fib_lookup, bpf_redir_neigh,
    },
    helpers::generated::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use tunnel_common::{fastpath::IPV6_HEADER_LEN, nexthop::NH_FORWARD, stats::Counter};

use crate::{
    direct::map_words,
    head::{Head, write26},
    nexthop,
    packet::{
        DROP, ETH_LEN, ETH_P_IP, Ipv4Info, PASS, RewriteFailed, decrement_ttl, set_eth_proto,
    },
    stats::count,
};

/// The verdicts as the programs return them.
const VERDICT_OK: i32 = TC_ACT_OK as _;
const VERDICT_REDIRECT: i32 = TC_ACT_REDIRECT as _;

pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;

/// What the FIB helper's size-only check of a non-GSO packet allows beyond the device MTU:
/// the Ethernet header and a VLAN tag (the kernel's `is_skb_forwardable`).
const FORWARDABLE_SLACK: u32 = 14 + 4;

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

/// The padded Ethernet header ([`NextHop::eth`](tunnel_common::nexthop::NextHop::eth) layout) for the FIB's answer `p` and
/// EtherType `proto`, as words.
#[inline(always)]
pub fn eth_of(p: &bpf_fib_lookup, proto: u16) -> [u64; 2] {
    let d = &p.dmac;
    let s = &p.smac;
    let [t0, t1] = proto.to_be_bytes();
    [
        u64::from_le_bytes([0, 0, d[0], d[1], d[2], d[3], d[4], d[5]]),
        u64::from_le_bytes([s[0], s[1], s[2], s[3], s[4], s[5], t0, t1]),
    ]
}

/// Where an IPv6 packet we are about to build goes: the cache's next hop, or the FIB's
/// answer (asked before the packet is rewritten, so that the MAC header can go in with the
/// outer header in one store, [`V6Route::eth`], and [`V6Route::send`] only redirects). Every
/// field is set on every path: the verifier refuses a program that copies an unset one.
pub struct V6Route {
    how: u32,
    /// [`V6_KNOWN`]: the Ethernet header ([`NextHop::eth`](tunnel_common::nexthop::NextHop::eth) layout) and the interface.
    eth: [u64; 2],
    ifindex: u32,
    /// [`V6_NEIGH`]: the next hop the kernel resolves.
    gateway: [u32; 4],
}

/// The next hop's MAC is known and the packet fits: write it and redirect.
const V6_KNOWN: u32 = 0;
/// The next hop is known but not its MAC: the kernel resolves it (ND) on `ifindex`.
const V6_NEIGH: u32 = 1;
/// Anything else: the kernel's own route lookup and neighbour resolution, out of `oif`.
const V6_KERNEL: u32 = 2;

/// Whether a packet of `ctx.len() + grow` bytes (with its MAC header) fits `mtu`: GSO packets
/// are checked per segment when they are split, as the FIB helper does.
#[inline(always)]
fn fits(ctx: &TcContext, grow: u32, mtu: u32) -> bool {
    // SAFETY: reading a field of the context.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    gso_size != 0 || ctx.len() + grow <= mtu + ETH_LEN as u32
}

/// The FIB helper's check of a packet it forwards (`is_skb_forwardable`): GSO, or at most the
/// device MTU plus the Ethernet header and a VLAN tag.
#[inline(always)]
fn forwardable(ctx: &TcContext, mtu: u32) -> bool {
    fits(ctx, 0, mtu + FORWARDABLE_SLACK - ETH_LEN as u32)
}

/// Looks up the route for the IPv6 packet this skb becomes once encapsulated (outer `src` →
/// `dst`). `oif` is the IPv6-side interface.
#[inline(always)]
pub fn lookup_v6(ctx: &TcContext, src: &[u64; 2], dst: &[u64; 2], oif: u32) -> V6Route {
    let grow = u32::from(IPV6_HEADER_LEN);
    if let Some(nh) = nexthop::get6(dst) {
        let known = nh.kind == NH_FORWARD && fits(ctx, grow, nh.mtu);
        return V6Route {
            how: if known { V6_KNOWN } else { V6_KERNEL },
            eth: map_words(&nh.eth),
            ifindex: nh.ifindex,
            // Unused here; not zeros, which LLVM writes with a call to memset.
            gateway: halves(dst),
        };
    }
    let mut p = zeroed();
    p.family = AF_INET6;
    p.ifindex = oif;
    p.__bindgen_anon_3.ipv6_src = halves(src);
    p.__bindgen_anon_4.ipv6_dst = halves(dst);
    // SAFETY: the helper reads and writes `p`, whose size we pass.
    let rc = unsafe {
        fib_lookup(
            ctx.skb.skb.cast(),
            &mut p,
            mem::size_of::<bpf_fib_lookup>() as i32,
            BPF_FIB_LOOKUP_OUTPUT,
        )
    } as u32;
    // The helper checked the skb as it is now against the egress MTU; it grows by the outer
    // header.
    // SAFETY: reading the union the helper filled in.
    let mtu = u32::from(unsafe { p.__bindgen_anon_1.mtu_result });
    let how = match rc {
        BPF_FIB_LKUP_RET_SUCCESS if fits(ctx, grow, mtu) => V6_KNOWN,
        BPF_FIB_LKUP_RET_NO_NEIGH => V6_NEIGH,
        _ => V6_KERNEL,
    };
    V6Route {
        how,
        eth: eth_of(&p, crate::packet::ETH_P_IPV6),
        ifindex: p.ifindex,
        // SAFETY: after the lookup the destination field holds the next hop.
        gateway: unsafe { p.__bindgen_anon_4.ipv6_dst },
    }
}

impl V6Route {
    /// The Ethernet header toward the next hop ([`NextHop::eth`](tunnel_common::nexthop::NextHop::eth) layout), when it is known.
    #[inline(always)]
    pub fn eth(&self) -> Option<[u64; 2]> {
        (self.how == V6_KNOWN).then_some(self.eth)
    }

    /// Sends the packet (built with [`V6Route::eth`] as its MAC header) out of the interface
    /// the route names. `egress` tells whether the program runs on egress of the interface
    /// it is on (then a packet already on the right interface just continues). Without a
    /// known next hop the kernel resolves it (ND) and queues the packet; when the FIB refuses
    /// (IPv6 forwarding off on `oif`: a client host, or a server that does not forward IPv6),
    /// the kernel's own output route lookup and neighbour resolution still work, at the cost
    /// of doing them after we return.
    #[inline(always)]
    pub fn send(&self, ctx: &TcContext, oif: u32, egress: bool) -> Forward {
        match self.how {
            V6_KNOWN => redirect_known(ctx, self.ifindex, egress),
            V6_NEIGH => {
                // SAFETY: plain data.
                let mut nh: bpf_redir_neigh = unsafe { mem::zeroed() };
                nh.nh_family = u32::from(AF_INET6);
                nh.__bindgen_anon_1.ipv6_nh = self.gateway;
                redirect_neigh(self.ifindex, Some(&mut nh))
            }
            _ => redirect_neigh(oif, None),
        }
    }
}

/// Out of `ifindex` with the MAC header already written: redirect, or carry on when the
/// program runs on egress of that very interface.
#[inline(always)]
fn redirect_known(ctx: &TcContext, ifindex: u32, egress: bool) -> Forward {
    // SAFETY: reading a field of the context.
    let current = unsafe { (*ctx.skb.skb).ifindex };
    if egress && ifindex == current {
        return Forward::Verdict(VERDICT_OK);
    }
    // SAFETY: plain helper call.
    Forward::Verdict(unsafe { bpf_redirect(ifindex, 0) } as i32)
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

/// Writes the frame head of a forwarded IPv4 packet in one go: the Ethernet header `eth`
/// ([`NextHop::eth`](tunnel_common::nexthop::NextHop::eth) layout) and the first 12 bytes of
/// the IPv4 header `ip` with the TTL decremented and the checksum to match.
#[inline(always)]
fn write_head4<const DIRECT: bool>(
    ctx: &TcContext,
    eth: [u64; 2],
    ip: &Ipv4Info,
) -> Result<(), RewriteFailed> {
    let head = Head([eth[0], eth[1], ip.w0, u64::from(ip.ttl_decremented())]);
    write26::<DIRECT>(ctx, &head)
}

/// Forwards the IPv4 packet that now follows the Ethernet header (just unwrapped by
/// `encap::unwrap_for_forwarding`, so the frame's EtherType is still IPv6's; header `inner`,
/// destination `dst`) as the kernel's router would: TTL checked and decremented, next hop,
/// redirect. With the next hop known, the MAC header, the EtherType and the decremented TTL
/// with its checksum go in with one store. Routes to `exclude` (the TUN), local delivery,
/// unresolved routes, packets too big for the egress and expiring TTLs are left to the kernel
/// (with the EtherType written). Returns the verdict and whether we redirected it.
#[inline(always)]
pub fn forward_unwrapped<const DIRECT: bool>(
    ctx: &TcContext,
    inner: &Ipv4Info,
    dst: u32,
    exclude: u32,
) -> (i32, bool) {
    if inner.ttl() <= 1 {
        count(Counter::SlowPathTtl);
        return (to_kernel(ctx), false);
    }
    if let Some(nh) = nexthop::get4(dst) {
        if nh.kind != NH_FORWARD
            || (exclude != 0 && nh.ifindex == exclude)
            || !forwardable(ctx, nh.mtu)
        {
            return (to_kernel(ctx), false);
        }
        if write_head4::<DIRECT>(ctx, map_words(&nh.eth), inner).is_err() {
            return (to_kernel(ctx), false);
        }
        // SAFETY: plain helper call.
        return (unsafe { bpf_redirect(nh.ifindex, 0) } as i32, true);
    }
    // SAFETY: reading a field of the context.
    let ingress = unsafe { (*ctx.skb.skb).ingress_ifindex };
    let mut p = v4_lookup(ingress, inner.src(), dst, inner.tos());
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
            if write_head4::<DIRECT>(ctx, eth_of(&p, ETH_P_IP), inner).is_err() {
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
            nh.nh_family = u32::from(AF_INET);
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

/// An address held as two words, as the FIB helper's four.
#[inline(always)]
fn halves(a: &[u64; 2]) -> [u32; 4] {
    [
        a[0] as u32,
        (a[0] >> 32) as u32,
        a[1] as u32,
        (a[1] >> 32) as u32,
    ]
}
