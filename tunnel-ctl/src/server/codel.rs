//! CoDel (RFC 8289) for the queue from the TUN to one session: the decision only (time and
//! queue state are parameters), taken for each packet as the session takes it off the queue.
//!
//! Why: a TCP flow toward an in-band client fills the session's queue whenever the client
//! (or its link) is slower than the sender, and a tail drop then loses a whole window's worth
//! at once (hundreds of segments per episode were measured with one download), or, with a
//! queue large enough to never drop, keeps seconds of standing queue in front of a slow
//! client's other traffic. CoDel drops one packet when the time packets spend in the queue
//! stays above `target` for an `interval`, and then more often (interval / sqrt(count)) until
//! it falls below: TCP backs off by one loss at a time, the standing queue stays near
//! `target`, and the byte and packet caps only stop what does not back off.
//!
//! Written here, not taken from a crate: the few crates that implement CoDel are qdisc
//! simulations or tied to their own queue types, and this is forty lines over a timestamp.
use std::{sync::OnceLock, time::Instant};

/// A time in microseconds on a wrapping 32-bit clock ([`stamp`]): four bytes per queued
/// packet instead of an `Instant`'s sixteen (10,000 idle sessions each hold a queue). Spans
/// are taken with wrapping arithmetic, so they are right up to 35 minutes.
pub type Micros = u32;

/// RFC 8289's defaults: acceptable standing queue, and the time it may be exceeded.
pub const TARGET: Micros = 5_000;
pub const INTERVAL: Micros = 100_000;
/// Below this many bytes left in the queue nothing is dropped (one maximum-size 103).
const MIN_BACKLOG: usize = crate::protocol::frame::HEADER_LEN + crate::protocol::frame::MAX_DATA;

/// `now` on the queues' clock (microseconds since the first call, wrapping).
pub fn stamp(now: Instant) -> Micros {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(|| now);
    now.saturating_duration_since(epoch).as_micros() as Micros
}

/// `b` − `a` on the wrapping clock.
fn since(b: Micros, a: Micros) -> i32 {
    b.wrapping_sub(a) as i32
}

/// What to do with the packet just taken off the queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Deliver,
    /// Dropped as the queue's congestion signal (counted as `drop_session_aqm`).
    Drop,
}

/// One queue's CoDel state (RFC 8289's variables, in [`Micros`]).
#[derive(Debug, Default)]
pub struct Codel {
    /// When the sojourn time went above target, plus an interval: dropping may start then.
    first_above: Option<Micros>,
    drop_next: Option<Micros>,
    count: u32,
    last_count: u32,
    dropping: bool,
}

impl Codel {
    /// A packet leaves the queue at `now` after `sojourn` in it, with `backlog` bytes still
    /// queued behind it.
    pub fn on_dequeue(&mut self, now: Micros, sojourn: Micros, backlog: usize) -> Verdict {
        let ok_to_drop = self.ok_to_drop(now, sojourn, backlog);
        if self.dropping {
            if !ok_to_drop {
                self.dropping = false;
                return Verdict::Deliver;
            }
            match self.drop_next {
                Some(next) if since(now, next) >= 0 => {
                    self.count = self.count.saturating_add(1);
                    self.drop_next = Some(self.control_law(next));
                    Verdict::Drop
                }
                _ => Verdict::Deliver,
            }
        } else if ok_to_drop {
            self.dropping = true;
            // Dropping again soon after the last episode: resume near the rate it reached.
            let delta = self.count.saturating_sub(self.last_count);
            let recent = self
                .drop_next
                .is_some_and(|next| since(now, next) < 16 * INTERVAL as i32);
            self.count = if delta > 1 && recent { delta } else { 1 };
            self.last_count = self.count;
            self.drop_next = Some(self.control_law(now));
            Verdict::Drop
        } else {
            Verdict::Deliver
        }
    }

    fn ok_to_drop(&mut self, now: Micros, sojourn: Micros, backlog: usize) -> bool {
        if sojourn < TARGET || backlog <= MIN_BACKLOG {
            self.first_above = None;
            return false;
        }
        match self.first_above {
            None => {
                self.first_above = Some(now.wrapping_add(INTERVAL));
                false
            }
            Some(at) => since(now, at) >= 0,
        }
    }

    /// The next drop: an interval after `t`, shortened by the square root of the drops so far.
    fn control_law(&self, t: Micros) -> Micros {
        t.wrapping_add((f64::from(INTERVAL) / f64::from(self.count.max(1)).sqrt()) as Micros)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Micros = 1_000;
    const BIG: usize = 1 << 20;

    /// Dequeues one packet every `step` from `t0` for `total` with the given sojourn; the drop
    /// times (from `t0`).
    fn run(c: &mut Codel, t0: Micros, total: Micros, step: Micros, sojourn: Micros) -> Vec<Micros> {
        let mut drops = Vec::new();
        let mut t = 0;
        while t < total {
            if c.on_dequeue(t0.wrapping_add(t), sojourn, BIG) == Verdict::Drop {
                drops.push(t);
            }
            t += step;
        }
        drops
    }

    #[test]
    fn a_queue_below_target_or_nearly_empty_never_drops() {
        let mut c = Codel::default();
        assert!(run(&mut c, 0, 2_000 * MS, 100, 4 * MS).is_empty());
        // Long sojourn, but only one packet's worth left behind it.
        let mut c = Codel::default();
        for i in 0..20_000u32 {
            assert_eq!(
                c.on_dequeue(i * 100, 50 * MS, MIN_BACKLOG),
                Verdict::Deliver
            );
        }
    }

    #[test]
    fn a_standing_queue_is_dropped_from_once_per_interval_then_faster() {
        // Also across the clock's wrap.
        for t0 in [0, u32::MAX - 300 * MS] {
            let mut c = Codel::default();
            let drops = run(&mut c, t0, 1_000 * MS, 100, 20 * MS);
            // Nothing in the first interval above target; then 100 ms / sqrt(n) apart.
            assert_eq!(drops[0], 100 * MS, "{drops:?}");
            let gaps: Vec<f64> = drops
                .windows(2)
                .map(|w| f64::from(w[1] - w[0]) / 1e3)
                .collect();
            for (n, gap) in gaps.iter().enumerate() {
                let want = 100.0 / ((n + 1) as f64).sqrt();
                assert!(
                    (gap - want).abs() <= 0.2,
                    "gap {n}: {gap} ms, want {want}: {gaps:?}"
                );
            }
            assert!(drops.len() >= 15, "{} drops in 1 s", drops.len());
        }
    }

    #[test]
    fn it_stops_when_the_queue_drains_and_resumes_at_its_last_rate() {
        let mut c = Codel::default();
        let first = run(&mut c, 0, 1_000 * MS, 100, 20 * MS);
        // Drained: deliver everything.
        assert!(run(&mut c, 1_000 * MS, 50 * MS, 100, MS).is_empty());
        // Congested again soon after: the first drop comes after an interval, the next ones
        // at about the rate reached before, not from scratch.
        let again = run(&mut c, 1_050 * MS, 400 * MS, 100, 20 * MS);
        assert_eq!(again[0], 100 * MS);
        let gap = again[1] - again[0];
        let last_gap = first[first.len() - 1] - first[first.len() - 2];
        assert!(
            gap < 100 * MS && gap <= last_gap * 2,
            "{gap} (last {last_gap})"
        );
    }
}
