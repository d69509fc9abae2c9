//! When the in-band client gives its CPU away after a TUN write: the decision, apart from the
//! `sched_yield` itself (`flush_tun`).
//!
//! A UDP socket wakes its reader "synchronously": the kernel puts the reader on the waker's
//! CPU, expecting the waker to sleep soon. A relay that goes on writing keeps the CPU for up to
//! a scheduler slice, and a reader's default socket (about 256 small datagrams) overflows
//! meanwhile: in the bench's in-band UDP 64 B download that lost a third of the datagrams.
//! Yielding once after a burst of small packets lets the woken readers drain their sockets.
//!
//! A yield hands the CPU to any runnable task, not only to the readers: on a machine whose CPUs
//! are busy with other work each one costs the client a whole slice of someone else's (1.5 ms
//! or more), and a client that yielded after every burst would deliver a few bursts per slice.
//! So the policy watches what its yields cost and stops yielding while most of them are long,
//! trying one again now and then.
use std::time::{Duration, Instant};

/// A TUN write of at least this many packets of under [`SMALL_PACKET`] bytes on average is a
/// burst of small packets. TCP downloads write 64 KiB super-packets and never yield.
const SMALL_BURST: u64 = 8;
const SMALL_PACKET: u64 = 256;
/// A yield that kept the client off its CPU this long gave a slice to other work, not just a
/// moment to a reader draining its socket. In the bench's UDP download 96% of the yields took
/// under 2 ms (most under 200 µs); with two CPU hogs beside it, most took longer.
const LONG_YIELD: Duration = Duration::from_millis(2);
/// The share of long yields, as a moving average over about the last eight, above which the
/// client stops yielding: about six long ones in a row.
const GIVE_UP_SHARE: f32 = 0.5;
/// How long the client then goes without yielding before it tries one again.
const QUIET: Duration = Duration::from_millis(100);

/// Whether to yield after a TUN write, from what earlier yields cost.
#[derive(Debug, Default)]
pub(crate) struct YieldPolicy {
    /// Moving average of "this yield was long" (0 or 1), weight 1/8.
    long_share: f32,
    /// No yield before this instant (set while most yields are long).
    quiet_until: Option<Instant>,
}

impl YieldPolicy {
    /// Whether a TUN write of `packets` packets and `bytes` bytes was a burst of small ones
    /// (then the caller reads the clock and asks [`YieldPolicy::yield_now`]).
    pub(crate) fn burst_of_small_packets(packets: u64, bytes: u64) -> bool {
        packets >= SMALL_BURST && bytes < packets.saturating_mul(SMALL_PACKET)
    }

    /// Whether to yield now, after a burst of small packets.
    pub(crate) fn yield_now(&self, now: Instant) -> bool {
        self.quiet_until.is_none_or(|until| now >= until)
    }

    /// A yield started at `start` kept the client off its CPU for `took`.
    pub(crate) fn yielded(&mut self, start: Instant, took: Duration) {
        let long = if took >= LONG_YIELD { 1.0 } else { 0.0 };
        self.long_share += (long - self.long_share) / 8.0;
        self.quiet_until = (self.long_share > GIVE_UP_SHARE).then(|| start + took + QUIET);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHORT: Duration = Duration::from_micros(150);
    const LONG: Duration = Duration::from_millis(3);

    #[test]
    fn only_a_burst_of_small_packets_is_one() {
        // 64 datagrams of 64 B (92 B IP packets): a UDP flood's burst.
        assert!(YieldPolicy::burst_of_small_packets(64, 64 * 92));
        assert!(YieldPolicy::burst_of_small_packets(8, 8 * 255));
        // Fewer packets, or TCP's full-size segments and super-packets: no yield.
        assert!(!YieldPolicy::burst_of_small_packets(7, 7 * 92));
        assert!(!YieldPolicy::burst_of_small_packets(64, 64 * 1500));
        assert!(!YieldPolicy::burst_of_small_packets(8, 8 * 256));
        assert!(!YieldPolicy::burst_of_small_packets(0, 0));
    }

    #[test]
    fn short_yields_and_a_rare_long_one_keep_it_yielding() {
        let mut p = YieldPolicy::default();
        let mut t = Instant::now();
        for i in 0..1000 {
            assert!(p.yield_now(t), "yield {i}");
            // One long yield in twenty: the machine's own work now and then.
            p.yielded(t, if i % 20 == 0 { LONG } else { SHORT });
            t += Duration::from_micros(500);
        }
    }

    #[test]
    fn on_a_busy_machine_it_stops_yielding_tries_again_and_comes_back() {
        let mut p = YieldPolicy::default();
        let mut t = Instant::now();
        // Every yield gives a whole slice away: after a few it stops.
        let mut yields = 0;
        while p.yield_now(t) {
            p.yielded(t, LONG);
            t += LONG;
            yields += 1;
            assert!(yields < 10, "still yielding after {yields} long yields");
        }
        // Quiet for QUIET after the last yield ended, then one try.
        assert!(!p.yield_now(t + QUIET - Duration::from_millis(1)));
        t += QUIET;
        assert!(p.yield_now(t));
        // While the machine stays busy: one yield per QUIET, a small share of the time.
        let start = t;
        let mut yielded = Duration::ZERO;
        while t < start + Duration::from_secs(2) {
            if p.yield_now(t) {
                p.yielded(t, LONG);
                yielded += LONG;
                t += LONG;
            }
            t += Duration::from_micros(100);
        }
        assert!(
            yielded < Duration::from_millis(80),
            "{yielded:?} of 2 s given away"
        );
        // The other work ends: the tries are short again and it goes back to yielding.
        let mut tries = 0;
        loop {
            while !p.yield_now(t) {
                t += Duration::from_millis(1);
            }
            p.yielded(t, SHORT);
            tries += 1;
            if p.quiet_until.is_none() {
                break;
            }
            assert!(tries < 20, "still quiet after {tries} short yields");
        }
        assert!(p.yield_now(t));
    }
}
