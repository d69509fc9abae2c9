//! The queue from the TUN to one session: bounded in packets (`--session-queue`) and in bytes
//! (`--session-buffer`). When a client reads slower than its traffic arrives, its own packets
//! are dropped at the door; the TUN reader never waits and nobody else loses anything.
use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use bytes::Bytes;
use tokio::sync::mpsc;

/// The sending half, held by the lease table.
#[derive(Clone, Debug)]
pub struct QueueTx {
    tx: mpsc::Sender<Bytes>,
    bytes: Arc<AtomicUsize>,
    max_bytes: usize,
}

/// The receiving half, held by the session.
#[derive(Debug)]
pub struct QueueRx {
    rx: mpsc::Receiver<Bytes>,
    bytes: Arc<AtomicUsize>,
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
        QueueRx { rx, bytes },
    )
}

impl QueueTx {
    /// Queues `pkt` unless that would exceed either bound (or the session is gone).
    pub fn try_push(&self, pkt: Bytes) -> bool {
        let n = pkt.len();
        if self.bytes.fetch_add(n, Ordering::Relaxed) + n > self.max_bytes {
            self.bytes.fetch_sub(n, Ordering::Relaxed);
            return false;
        }
        if self.tx.try_send(pkt).is_err() {
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
    pub async fn recv(&mut self) -> Option<Bytes> {
        let pkt = self.rx.recv().await?;
        self.bytes.fetch_sub(pkt.len(), Ordering::Relaxed);
        Some(pkt)
    }

    pub fn try_recv(&mut self) -> Option<Bytes> {
        let pkt = self.rx.try_recv().ok()?;
        self.bytes.fetch_sub(pkt.len(), Ordering::Relaxed);
        Some(pkt)
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
        let (tx, mut rx) = queue(3, 2_500);
        assert!(tx.try_push(pkt(1_000)));
        assert!(tx.try_push(pkt(1_000)));
        assert!(!tx.try_push(pkt(1_000)), "2,500-byte cap");
        assert!(tx.try_push(pkt(500)));
        assert!(!tx.try_push(pkt(1)), "3-packet cap");
        assert_eq!(tx.queued_bytes(), 2_500);
        assert_eq!(rx.try_recv().map(|p| p.len()), Some(1_000));
        assert_eq!(tx.queued_bytes(), 1_500);
        assert!(
            tx.try_push(pkt(1_000)),
            "room again once the reader took one"
        );
        drop(rx);
        assert!(!tx.try_push(pkt(1)), "session gone");
        assert_eq!(tx.queued_bytes(), 2_500);
    }
}
