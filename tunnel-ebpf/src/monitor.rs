//! `monitor_ingress` / `monitor_egress`: count every packet by L3 protocol and let it pass.
//!
//! The classification uses `skb->protocol`, not the Ethernet header, so it works the same on
//! Ethernet-like devices (veth) and on L3 devices (TUN).
use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use tunnel_common::stats::Counter;
use tunnel_ebpf::stats::count;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;

#[classifier]
pub fn monitor_ingress(ctx: TcContext) -> i32 {
    classify(
        &ctx,
        [
            Counter::MonitorIngressIpv4,
            Counter::MonitorIngressIpv6,
            Counter::MonitorIngressOther,
        ],
    )
}

#[classifier]
pub fn monitor_egress(ctx: TcContext) -> i32 {
    classify(
        &ctx,
        [
            Counter::MonitorEgressIpv4,
            Counter::MonitorEgressIpv6,
            Counter::MonitorEgressOther,
        ],
    )
}

#[inline(always)]
fn classify(ctx: &TcContext, [ipv4, ipv6, other]: [Counter; 3]) -> i32 {
    let protocol = u16::from_be(ctx.skb.protocol() as u16);
    count(match protocol {
        ETH_P_IP => ipv4,
        ETH_P_IPV6 => ipv6,
        _ => other,
    });
    TC_ACT_OK
}
