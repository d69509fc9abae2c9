//! The queue from the TUN to one session: bounded in packets (`--session-queue`) and in bytes
//! (`--session-buffer`). When a client reads slower than its traffic arrives, its own packets
//! are dropped at the door; the TUN reader never waits and nobody else loses anything.
//! Packets carry the time they were queued, and the session takes them off through CoDel
//! ([`super::codel`]), which drops one now and then while the queue stays long, so that TCP
//! backs off before the caps are reached.
//!
//! A mutex-guarded deque rather than a channel: an idle session holds no buffer at all (a
//! tokio channel allocates its first block of 32 slots at once, about 1.3 KiB with the
//! timestamps, for each of 10,000 idle sessions), and the lock is per session, taken by the
//! TUN reader and by that session only.
use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use bytes::Bytes;
use tokio::sync::Notify;

use super::codel::{Codel, Micros, Verdict};

/// What both halves share.
#[derive(Debug, Default)]
struct Shared {
    packets: Mutex<VecDeque<(Bytes, Micros)>>,
    /// Wakes the session when a packet arrives in an empty queue.
    arrived: Notify,
    bytes: AtomicUsize,
    /// The session is gone: nothing is queued any more.
    closed: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, VecDeque<(Bytes, Micros)>> {
        self.packets.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A deque that grew past this many packets is given its memory back once empty.
const KEEP_CAPACITY: usize = 1024;

/// The sending half, held by the lease table.
#[derive(Clone, Debug)]
pub struct QueueTx {
    shared: Arc<Shared>,
    max_packets: usize,
    max_bytes: usize,
}

/// The receiving half, held by the session.
#[derive(Debug)]
pub struct QueueRx {
    shared: Arc<Shared>,
    codel: Codel,
    /// Packets CoDel dropped since [`QueueRx::take_aqm_drops`].
    aqm_drops: u64,
}

/// A queue of at most `packets` packets and `max_bytes` bytes.
pub fn queue(packets: usize, max_bytes: usize) -> (QueueTx, QueueRx) {
    let shared = Arc::new(Shared::default());
    (
        QueueTx {
            shared: shared.clone(),
            max_packets: packets.max(1),
            max_bytes,
        },
        QueueRx {
            shared,
            codel: Codel::default(),
            aqm_drops: 0,
        },
    )
}

impl QueueTx {
    /// Queues `pkt` (read from the TUN at `at`, [`super::codel::stamp`]) unless that would
    /// exceed either bound (or the session is gone).
    pub fn try_push(&self, pkt: Bytes, at: Micros) -> bool {
        let s = &self.shared;
        let n = pkt.len();
        if s.bytes.fetch_add(n, Ordering::Relaxed) + n > self.max_bytes {
            s.bytes.fetch_sub(n, Ordering::Relaxed);
            return false;
        }
        let was_empty = {
            let mut q = s.lock();
            // Checked under the lock that the session's end takes to empty the queue, so
            // nothing is queued after it.
            if s.closed.load(Ordering::Relaxed) || q.len() >= self.max_packets {
                drop(q);
                s.bytes.fetch_sub(n, Ordering::Relaxed);
                return false;
            }
            q.push_back((pkt, at));
            q.len() == 1
        };
        // The session drains the queue before it waits: only a packet into an empty queue
        // needs to wake it (a wake without a waiter is kept for its next wait).
        if was_empty {
            s.arrived.notify_one();
        }
        true
    }

    /// Bytes waiting now.
    pub fn queued_bytes(&self) -> usize {
        self.shared.bytes.load(Ordering::Relaxed)
    }
}

impl QueueRx {
    /// The next packet CoDel lets through (waiting for one). Cancel-safe: a packet is only
    /// taken off the queue when it is returned or dropped.
    pub async fn recv(&mut self) -> Option<Bytes> {
        loop {
            if let Some(pkt) = self.try_recv(super::codel::stamp(std::time::Instant::now())) {
                return Some(pkt);
            }
            self.shared.arrived.notified().await;
        }
    }

    /// The next packet CoDel lets through at `now`, if one is queued.
    pub fn try_recv(&mut self, now: Micros) -> Option<Bytes> {
        while let Some((pkt, at)) = self.pop() {
            if let Some(pkt) = self.take(pkt, at, now) {
                return Some(pkt);
            }
        }
        None
    }

    fn pop(&self) -> Option<(Bytes, Micros)> {
        let mut q = self.shared.lock();
        let head = q.pop_front();
        if q.is_empty() && q.capacity() > KEEP_CAPACITY {
            *q = VecDeque::new();
        }
        head
    }

    fn take(&mut self, pkt: Bytes, at: Micros, now: Micros) -> Option<Bytes> {
        let backlog = self.shared.bytes.fetch_sub(pkt.len(), Ordering::Relaxed) - pkt.len();
        match self.codel.on_dequeue(now, now.wrapping_sub(at), backlog) {
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

impl Drop for QueueRx {
    /// The session is gone: refuse new packets and let the queued ones go.
    fn drop(&mut self) {
        let dropped = {
            let mut q = self.shared.lock();
            self.shared.closed.store(true, Ordering::Relaxed);
            std::mem::take(&mut *q)
        };
        let bytes: usize = dropped.iter().map(|(p, _)| p.len()).sum();
        self.shared.bytes.fetch_sub(bytes, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A session waiting on an empty queue wakes for a packet, also after a wait it gave up
    /// (its select took another branch, dropping the wait) while nothing had come.
    #[tokio::test]
    async fn the_session_wakes_for_a_packet_into_an_empty_queue() {
        let (tx, mut rx) = queue(8, 1 << 20);
        let (gave_up, gave_up_rx) = tokio::sync::oneshot::channel();
        let waiter = tokio::spawn(async move {
            let first = rx.recv().await.map(|p| p.len());
            // Nothing is pushed until this wait has been given up.
            let wait = tokio::time::timeout(std::time::Duration::from_millis(20), rx.recv()).await;
            assert!(wait.is_err(), "nothing was queued");
            gave_up.send(()).expect("the test waits");
            let second = rx.recv().await.map(|p| p.len());
            (first, second)
        });
        assert!(tx.try_push(pkt(100), 0));
        gave_up_rx.await.expect("the waiter gave up a wait");
        assert!(tx.try_push(pkt(200), 0));
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("the session woke")
            .expect("no panic");
        assert_eq!(got, (Some(100), Some(200)));
    }

    fn pkt(len: usize) -> Bytes {
        Bytes::from(vec![0u8; len])
    }

    #[test]
    fn bounded_in_packets_and_in_bytes() {
        let now = 0;
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
        assert_eq!(tx.queued_bytes(), 0, "what it held is let go");
    }

    /// A queue that stays long (packets wait 20 ms, a reader that keeps up with the arrivals
    /// but never catches up) loses one packet after CoDel's interval, then more often; a
    /// short one loses none. Every packet is either delivered or counted.
    #[test]
    fn a_standing_queue_loses_a_packet_now_and_then_a_short_one_none() {
        for (sojourn, want_drops) in [(1_000, false), (20_000, true)] {
            let (tx, mut rx) = queue(100_000, 1 << 30);
            let mut delivered = 0;
            // 400 ms of 10,000 packets/s, each taken `sojourn` after it came in, with 64
            // packets (one super-packet's worth) queued behind it.
            let at = |i: u32| 100 * i;
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
