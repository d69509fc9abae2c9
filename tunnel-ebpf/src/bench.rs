//! `bench_empty`: returns "pass" and nothing else. `cargo xtask bench` measures every real
//! program's per-packet cost against it (BPF_PROG_TEST_RUN); it is never attached.
use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};

#[classifier]
pub fn bench_empty(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}
