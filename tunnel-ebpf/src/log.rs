//! Rare events logged through aya-log: a drop with its reason and the addresses involved, a
//! hand-off to the slow path. Debug level, under the program's name (the record's target).
//!
//! A program never formats a record itself: aya-log's macro copies its strings byte by byte
//! into the ring buffer, and the verifier walks that code once for every state that reaches a
//! call, which made `server_encap` with three calls cost 245,000 verified instructions and
//! `server_decap` with four exceed the kernel's million. Instead the program counts the event,
//! writes it to [`LOG_EVENT`] and tail-calls its log program (`log_<program>`, one per
//! program, defined with [`logger!`]), which formats the line and returns the verdict the
//! program chose. Each log program is verified once, on its own.
//!
//! All of it hangs on [`TUNNEL_LOG`], a read-only global the controller sets at load time
//! (on with `-vv`). When it is 0 the verifier sees the branch as dead and removes it: a
//! program then runs exactly the instructions it would without logging. When the log program
//! is not installed (the tail call fails), the program returns its verdict itself.
use aya_ebpf::{
    Global,
    macros::map,
    maps::{PerCpuArray, ProgramArray},
    programs::TcContext,
};
use tunnel_common::{names::LOG_PROGRAMS, stats::Counter};

use crate::{
    direct::Key16,
    packet::{DROP, INNER_OFF, Ipv4Info, PASS},
    stats::count,
};

/// Named by `tunnel_common::names::LOG_SWITCH`.
#[unsafe(no_mangle)]
pub static TUNNEL_LOG: Global<u8> = Global::new(0);

/// How the log program words an event.
#[repr(u32)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An IPv4-in-IPv6 packet dropped: outer source, inner source and destination.
    DroppedIpip = 0,
    /// An IPv4 packet dropped: source and destination.
    DroppedV4 = 1,
    /// An IPv4 packet handed to the kernel (and from there the controller's TUN).
    SlowPath = 2,
}

/// What a program hands to its log program.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct LogEvent {
    pub outer_src: [u8; 16],
    /// Wire order.
    pub src: u32,
    pub dst: u32,
    /// A [`Counter`] index.
    pub reason: u32,
    pub kind: Kind,
    /// What the log program returns.
    pub verdict: i32,
}

/// Named by `tunnel_common::names::LOG_EVENT`.
#[map]
pub static LOG_EVENT: PerCpuArray<LogEvent> = PerCpuArray::with_max_entries(1, 0);

/// Named by `tunnel_common::names::LOG_PROGS`; the controller installs the log programs.
#[map]
pub static LOG_PROGS: ProgramArray = ProgramArray::with_max_entries(LOG_PROGRAMS.len() as u32, 0);

#[inline(always)]
fn emit(ctx: &TcContext, program: u32, reason: Counter, event: impl FnOnce() -> LogEvent) {
    count(reason);
    if TUNNEL_LOG.load() == 0 {
        return;
    }
    let Some(slot) = LOG_EVENT.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: a per-CPU value from a successful lookup; the tail call runs on this CPU.
    unsafe {
        *slot = event();
        LOG_PROGS.tail_call(ctx, program);
    }
}

/// Counts `reason` for a dropped IPv4-in-IPv6 packet and, when logging, logs it through
/// `program`'s log program (`tunnel_common::names::LOG_*`), which then returns DROP.
#[inline(always)]
pub fn dropped_ipip(
    ctx: &TcContext,
    program: u32,
    reason: Counter,
    outer_src: &[u64; 2],
    inner: &Ipv4Info,
) {
    emit(ctx, program, reason, || LogEvent {
        outer_src: *Key16(*outer_src).bytes(),
        src: inner.src(),
        dst: inner.dst(),
        reason: reason.index(),
        kind: Kind::DroppedIpip,
        verdict: DROP,
    });
}

/// As [`dropped_ipip`] before the inner header was checked: the inner addresses are read
/// (only when logging) from where they are without outer extension headers, 0 if the packet
/// is too short.
#[inline(always)]
pub fn dropped_ipip_unparsed(ctx: &TcContext, program: u32, reason: Counter, outer_src: &[u64; 2]) {
    emit(ctx, program, reason, || LogEvent {
        outer_src: *Key16(*outer_src).bytes(),
        src: ctx.load::<u32>(INNER_OFF + 12).unwrap_or(0),
        dst: ctx.load::<u32>(INNER_OFF + 16).unwrap_or(0),
        reason: reason.index(),
        kind: Kind::DroppedIpip,
        verdict: DROP,
    });
}

/// As [`dropped_ipip`], for an IPv4 packet.
#[inline(always)]
pub fn dropped_v4(ctx: &TcContext, program: u32, reason: Counter, ip: &Ipv4Info) {
    emit(ctx, program, reason, || LogEvent {
        outer_src: [0; 16],
        src: ip.src(),
        dst: ip.dst(),
        reason: reason.index(),
        kind: Kind::DroppedV4,
        verdict: DROP,
    });
}

/// As [`dropped_v4`], for a packet handed to the slow path: the log program returns PASS.
#[inline(always)]
pub fn slow_path(ctx: &TcContext, program: u32, reason: Counter, ip: &Ipv4Info) {
    emit(ctx, program, reason, || LogEvent {
        outer_src: [0; 16],
        src: ip.src(),
        dst: ip.dst(),
        reason: reason.index(),
        kind: Kind::SlowPath,
        verdict: PASS,
    });
}

/// Formats `event` (whose reason is named `reason`) under `target`, at debug level.
#[inline(always)]
pub fn line(ctx: &TcContext, target: &'static str, reason: &'static str, event: &LogEvent) {
    let (src, dst) = (event.src.to_ne_bytes(), event.dst.to_ne_bytes());
    match event.kind {
        Kind::DroppedIpip => aya_log_ebpf::debug!(
            ctx,
            target: target,
            "dropped ({}): from {:i}, inner {:i} -> {:i}",
            reason,
            event.outer_src,
            src,
            dst
        ),
        Kind::DroppedV4 => aya_log_ebpf::debug!(
            ctx,
            target: target,
            "dropped ({}): {:i} -> {:i}",
            reason,
            src,
            dst
        ),
        Kind::SlowPath => aya_log_ebpf::debug!(
            ctx,
            target: target,
            "to the slow path ({}): {:i} -> {:i}",
            reason,
            src,
            dst
        ),
    }
}

/// Defines a log program: `logger!(log_server_decap, "server_decap", [DropUnboundSource,
/// ...])` formats the events of those reasons (others are not logged) and returns the verdict
/// the calling program chose.
#[macro_export]
macro_rules! logger {
    ($name:ident, $target:literal, [$($reason:ident),* $(,)?]) => {
        #[aya_ebpf::macros::classifier]
        pub fn $name(ctx: aya_ebpf::programs::TcContext) -> i32 {
            let Some(event) = $crate::log::LOG_EVENT.get(0).copied() else {
                return $crate::packet::DROP;
            };
            $(
                if event.reason == tunnel_common::stats::Counter::$reason.index() {
                    const NAME: &str = tunnel_common::stats::Counter::$reason.name();
                    $crate::log::line(&ctx, $target, NAME, &event);
                }
            )*
            event.verdict
        }
    };
}
