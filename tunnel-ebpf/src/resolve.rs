//! `nexthop_resolve`: the controller's way of asking the FIB helper what the data path would
//! get for a destination (`tunnel_common::nexthop`). Never attached: the controller runs it
//! with BPF_PROG_TEST_RUN on a packet that carries a [`NextHopQuery`], in its own network
//! namespace (the data path's), and reads the answer from the packet it gets back. The answer
//! is the helper's own, so the cache can only hold what the FIB would have said.
use core::mem;

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup},
    helpers::generated::{bpf_check_mtu, bpf_fib_lookup as fib_lookup, bpf_jiffies64},
    macros::classifier,
    programs::TcContext,
};
use tunnel_common::nexthop::{NEXTHOP_QUERY_OFF, NextHopQuery};
use tunnel_ebpf::{
    direct::{Key16, to_words},
    packet::{DROP, ETH_P_IP, ETH_P_IPV6, PASS},
    route::{AF_INET, AF_INET6, eth_of},
};

#[classifier]
pub fn nexthop_resolve(ctx: TcContext) -> i32 {
    let Ok(mut q) = ctx.load::<NextHopQuery>(NEXTHOP_QUERY_OFF) else {
        return DROP;
    };
    // SAFETY: plain helper call.
    q.jiffies = unsafe { bpf_jiffies64() };
    // SAFETY: bpf_fib_lookup is plain data; all-zero is its documented initial state.
    let mut p: bpf_fib_lookup = unsafe { mem::zeroed() };
    p.ifindex = q.ifindex;
    let v4 = q.family == 4;
    if v4 {
        p.family = AF_INET;
        p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes([q.src[0], q.src[1], q.src[2], q.src[3]]);
        p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes([q.dst[0], q.dst[1], q.dst[2], q.dst[3]]);
    } else if q.family == 6 {
        let (s, d) = (to_words(&q.src), to_words(&q.dst));
        p.family = AF_INET6;
        p.__bindgen_anon_3.ipv6_src = [
            s[0] as u32,
            (s[0] >> 32) as u32,
            s[1] as u32,
            (s[1] >> 32) as u32,
        ];
        p.__bindgen_anon_4.ipv6_dst = [
            d[0] as u32,
            (d[0] >> 32) as u32,
            d[1] as u32,
            (d[1] >> 32) as u32,
        ];
    } else {
        q.rc = u32::MAX;
        return answer(&ctx, &q);
    }
    // SAFETY: the helper reads and writes `p`, whose size we pass.
    let rc = unsafe {
        fib_lookup(
            ctx.skb.skb.cast(),
            &mut p,
            mem::size_of::<bpf_fib_lookup>() as i32,
            q.flags,
        )
    };
    q.rc = rc as u32;
    if rc as u32 == BPF_FIB_LKUP_RET_SUCCESS {
        let proto = if v4 { ETH_P_IP } else { ETH_P_IPV6 };
        q.answer.eth = *Key16(eth_of(&p, proto)).bytes();
        q.answer.ifindex = p.ifindex;
        q.answer.mtu = if v4 {
            // The data path's IPv4 check is the helper's `is_skb_forwardable`: the device's
            // MTU, which bpf_check_mtu reports.
            let mut mtu = 0u32;
            // SAFETY: the helper writes the MTU into `mtu`.
            unsafe { bpf_check_mtu(ctx.skb.skb.cast(), p.ifindex, &mut mtu, 0, 0) };
            mtu
        } else {
            // SAFETY: reading the union the helper filled in.
            u32::from(unsafe { p.__bindgen_anon_1.mtu_result })
        };
    }
    answer(&ctx, &q)
}

#[inline(always)]
fn answer(ctx: &TcContext, q: &NextHopQuery) -> i32 {
    match ctx.store(NEXTHOP_QUERY_OFF, q, 0) {
        Ok(()) => PASS,
        Err(_) => DROP,
    }
}
