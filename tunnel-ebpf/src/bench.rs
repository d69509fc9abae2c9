//! `bench_empty` and `bench_empty_xdp`: return "pass" and nothing else. `cargo xtask bench`
//! measures every real program's per-packet cost against the TC one (BPF_PROG_TEST_RUN) and
//! reports the XDP one beside it; neither is ever attached.
use aya_ebpf::{
    bindings::{TC_ACT_OK, xdp_action::XDP_PASS},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

#[classifier]
pub fn bench_empty(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

#[xdp]
pub fn bench_empty_xdp(_ctx: XdpContext) -> u32 {
    XDP_PASS
}
