//! The queue from the TUN to one session: bounded in packets (`--session-queue`) and in bytes
//! (`--session-buffer`). When a client reads slower than its traffic arrives, its own packets
//! are dropped at the door; the TUN reader never waits and nobody else loses anything.
//! Packets carry the time they were queued, and the session takes them off through CoDel
//! ([`super::codel`]), which drops one now and then while the queue stays long, so that TCP
//! backs off before the caps are reached.
use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Instant,
};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::codel::{Codel, Verdict};

/// The sending half, held by the lease table.
#[derive(Clone, Debug)]
pub struct QueueTx {
    tx: mpsc::Sender<(Bytes, Instant)>,
    bytes: Arc<AtomicUsize>,
    max_bytes: usize,
}

/// The receiving half, held by the session.
#[derive(Debug)]
pub struct QueueRx {
    rx: mpsc::Receiver<(Bytes, Instant)>,
    bytes: Arc<AtomicUsize>,
    codel: Codel,
    /// Packets CoDel dropped since [`QueueRx::take_aqm_drops`].
    aqm_drops: u64,
}

/// A queue of at most `packets` packets and `max_bytes` bytes.
pub fn queue(packets: usize, max_bytes: usize) -> (QueueTx, QueueRx) {
    let (tx, rx) = mpsc::channel(packets.max(1));
    let bytes = Arc::new(AtomicUsize::new(0));
    (
        QueueTx {
            tx,
            bytes: bytes.clone(),
            max_bytes,
        },
        QueueRx {
            rx,
            bytes,
            codel: Codel::default(),
            aqm_drops: 0,
        },
    )
}

impl QueueTx {
    /// Queues `pkt` (read from the TUN at `at`) unless that would exceed either bound (or the
    /// session is gone).
    pub fn try_push(&self, pkt: Bytes, at: Instant) -> bool {
        let n = pkt.len();
        if self.bytes.fetch_add(n, Ordering::Relaxed) + n > self.max_bytes {
            self.bytes.fetch_sub(n, Ordering::Relaxed);
            return false;
        }
        if self.tx.try_send((pkt, at)).is_err() {
            self.bytes.fetch_sub(n, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Bytes waiting now.
    pub fn queued_bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }
}

impl QueueRx {
    /// The next packet CoDel lets through (waiting for one).
    pub async fn recv(&mut self) -> Option<Bytes> {
        loop {
            let (pkt, at) = self.rx.recv().await?;
            if let Some(pkt) = self.take(pkt, at, Instant::now()) {
                return Some(pkt);
            }
        }
    }

    /// The next packet CoDel lets through at `now`, if one is queued.
    pub fn try_recv(&mut self, now: Instant) -> Option<Bytes> {
        loop {
            let (pkt, at) = self.rx.try_recv().ok()?;
            if let Some(pkt) = self.take(pkt, at, now) {
                return Some(pkt);
            }
        }
    }

    fn take(&mut self, pkt: Bytes, at: Instant, now: Instant) -> Option<Bytes> {
        let backlog = self.bytes.fetch_sub(pkt.len(), Ordering::Relaxed) - pkt.len();
        match self
            .codel
            .on_dequeue(now, now.saturating_duration_since(at), backlog)
        {
            Verdict::Deliver => Some(pkt),
            Verdict::Drop => {
                self.aqm_drops += 1;
                None
            }
        }
    }

    /// Packets CoDel dropped since the last call.
    pub fn take_aqm_drops(&mut self) -> u64 {
        std::mem::take(&mut self.aqm_drops)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkt(len: usize) -> Bytes {
        Bytes::from(vec![0u8; len])
    }

    #[test]
    fn bounded_in_packets_and_in_bytes() {
        let now = Instant::now();
        let (tx, mut rx) = queue(3, 2_500);
        assert!(tx.try_push(pkt(1_000), now));
        assert!(tx.try_push(pkt(1_000), now));
        assert!(!tx.try_push(pkt(1_000), now), "2,500-byte cap");
        assert!(tx.try_push(pkt(500), now));
        assert!(!tx.try_push(pkt(1), now), "3-packet cap");
        assert_eq!(tx.queued_bytes(), 2_500);
        assert_eq!(rx.try_recv(now).map(|p| p.len()), Some(1_000));
        assert_eq!(tx.queued_bytes(), 1_500);
        assert!(
            tx.try_push(pkt(1_000), now),
            "room again once the reader took one"
        );
        drop(rx);
        assert!(!tx.try_push(pkt(1), now), "session gone");
        assert_eq!(tx.queued_bytes(), 2_500);
    }

    /// A queue that stays long (packets wait 20 ms, a reader that keeps up with the arrivals
    /// but never catches up) loses one packet after CoDel's interval, then more often; a
    /// short one loses none. Every packet is either delivered or counted.
    #[test]
    fn a_standing_queue_loses_a_packet_now_and_then_a_short_one_none() {
        use std::time::Duration;
        let t0 = Instant::now();
        for (sojourn, want_drops) in [
            (Duration::from_millis(1), false),
            (Duration::from_millis(20), true),
        ] {
            let (tx, mut rx) = queue(100_000, 1 << 30);
            let mut delivered = 0;
            // 400 ms of 10,000 packets/s, each taken `sojourn` after it came in, with 64
            // packets (one super-packet's worth) queued behind it.
            let at = |i: u32| t0 + Duration::from_micros(100) * i;
            for i in 0..4_000u32 {
                assert!(tx.try_push(pkt(1_400), at(i)));
                if i >= 64 {
                    delivered += usize::from(rx.try_recv(at(i - 64) + sojourn).is_some());
                }
            }
            while rx.try_recv(at(4_000) + sojourn).is_some() {
                delivered += 1;
            }
            let dropped = rx.take_aqm_drops();
            assert_eq!(delivered as u64 + dropped, 4_000);
            if want_drops {
                assert!((3..=20).contains(&dropped), "{dropped} dropped in 400 ms");
            } else {
                assert_eq!(dropped, 0);
            }
        }
    }
}
