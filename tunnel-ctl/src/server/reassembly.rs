//! IPv4 reassembly for the lwAFTR's slow path: only the first fragment of a datagram names
//! the port that picks the softwire (RFC 7596 §5.1), so fragments toward a shared address
//! are put back together before the lookup. Bounded: at most `max_open` datagrams in
//! progress (the rest dropped and counted), each given up `timeout` after its latest
//! fragment. Pure: time is passed in. The buffers are etherparse's `IpDefragPool`.
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr},
    time::{Duration, Instant},
};

use etherparse::{Ipv4Header, Ipv4HeaderSlice, SlicedPacket, defrag::IpDefragPool};

/// Datagrams in progress at most, by default.
pub const MAX_OPEN: usize = 1024;
/// How long a datagram may wait for its next fragment (RFC 791 suggests 15 s at least; the
/// kernel waits 30 s; a B4 behind one tunnel has no reason to be slower).
pub const TIMEOUT: Duration = Duration::from_secs(15);

/// A datagram: source, destination, identification, and (IPv4) protocol.
type Id = (IpAddr, IpAddr, u32, u8);

pub struct Reassembly {
    pool: IpDefragPool<Instant, ()>,
    /// Datagrams in progress: their latest fragment's time.
    open: HashMap<Id, Instant>,
    max_open: usize,
    timeout: Duration,
    last_sweep: Option<Instant>,
}

/// What one fragment gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Not a fragment: the packet as it is.
    Whole,
    /// The datagram is complete: the reassembled packet.
    Done(Vec<u8>),
    /// Kept; more fragments to come.
    Kept,
    /// Dropped: `max_open` datagrams are in progress already.
    Full,
    /// Dropped: a malformed or inconsistent fragment (its datagram is given up).
    Bad,
}

impl Default for Reassembly {
    fn default() -> Reassembly {
        Reassembly::new(MAX_OPEN, TIMEOUT)
    }
}

impl Reassembly {
    pub fn new(max_open: usize, timeout: Duration) -> Reassembly {
        Reassembly {
            pool: IpDefragPool::new(),
            open: HashMap::new(),
            max_open,
            timeout,
            last_sweep: None,
        }
    }

    /// Datagrams in progress.
    pub fn open(&self) -> usize {
        self.open.len()
    }

    /// Gives up datagrams whose latest fragment is older than the timeout; returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        self.last_sweep = Some(now);
        let timeout = self.timeout;
        let alive = |t: &Instant| now.saturating_duration_since(*t) < timeout;
        let before = self.open.len();
        self.open.retain(|_, t| alive(t));
        if self.open.len() != before {
            self.pool.retain(alive);
        }
        before - self.open.len()
    }

    /// Takes one IPv4 packet (with its header); `expired` counts datagrams given up on the
    /// way (swept at most once a second).
    pub fn push(&mut self, pkt: &[u8], now: Instant, expired: &mut usize) -> Step {
        if self
            .last_sweep
            .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1))
        {
            *expired += self.expire(now);
        }
        let Ok(h) = Ipv4HeaderSlice::from_slice(pkt) else {
            return Step::Bad;
        };
        if !h.is_fragmenting_payload() {
            return Step::Whole;
        }
        let id: Id = (
            IpAddr::V4(h.source_addr()),
            IpAddr::V4(h.destination_addr()),
            u32::from(h.identification()),
            h.protocol().0,
        );
        if !self.open.contains_key(&id) && self.open.len() >= self.max_open {
            return Step::Full;
        }
        let Ok(sliced) = SlicedPacket::from_ip(pkt) else {
            return Step::Bad;
        };
        match self.pool.process_sliced_packet(&sliced, now, ()) {
            Ok(None) => {
                self.open.insert(id, now);
                Step::Kept
            }
            Ok(Some(done)) => {
                self.open.remove(&id);
                let mut header: Ipv4Header = h.to_header();
                header.more_fragments = false;
                header.fragment_offset = Default::default();
                header.options = Default::default();
                if header.set_payload_len(done.payload.len()).is_err() {
                    return Step::Bad;
                }
                header.header_checksum = header.calc_header_checksum();
                let mut out = Vec::with_capacity(header.header_len() + done.payload.len());
                if header.write(&mut out).is_err() {
                    return Step::Bad;
                }
                out.extend_from_slice(&done.payload);
                Step::Done(out)
            }
            // The pool keeps what it has of the datagram; it times out with it.
            Err(_) => Step::Bad,
        }
    }
}

/// What one outer IPv6 fragment gave ([`Reassembly::push6`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Step6 {
    /// The packet is complete: its source and next header, and the reassembled payload.
    Done {
        src: Ipv6Addr,
        next: u8,
        payload: Vec<u8>,
    },
    Kept,
    Full,
    Bad,
}

impl Reassembly {
    /// Takes one IPv6 fragment (RFC 8200 §4.5; the same bounds and timeout as IPv4).
    pub fn push6(&mut self, pkt: &[u8], now: Instant, expired: &mut usize) -> Step6 {
        if self
            .last_sweep
            .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1))
        {
            *expired += self.expire(now);
        }
        let Ok(sliced) = SlicedPacket::from_ip(pkt) else {
            return Step6::Bad;
        };
        let Some(etherparse::NetSlice::Ipv6(v6)) = &sliced.net else {
            return Step6::Bad;
        };
        let Some(frag) = v6.extensions().clone().into_iter().find_map(|e| match e {
            etherparse::Ipv6ExtensionSlice::Fragment(f) => Some(f.to_header()),
            _ => None,
        }) else {
            return Step6::Bad;
        };
        let (src, dst) = (v6.header().source_addr(), v6.header().destination_addr());
        let id: Id = (IpAddr::V6(src), IpAddr::V6(dst), frag.identification, 0);
        if !self.open.contains_key(&id) && self.open.len() >= self.max_open {
            return Step6::Full;
        }
        match self.pool.process_sliced_packet(&sliced, now, ()) {
            Ok(None) => {
                self.open.insert(id, now);
                Step6::Kept
            }
            Ok(Some(done)) => {
                self.open.remove(&id);
                Step6::Done {
                    src,
                    next: done.ip_number.0,
                    payload: done.payload,
                }
            }
            Err(_) => Step6::Bad,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    fn datagram(id: u16, len: usize) -> Vec<u8> {
        let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let mut h = Ipv4Header::new(
            0,
            64,
            etherparse::IpNumber::UDP,
            [192, 0, 2, 10],
            [203, 0, 113, 2],
        )
        .unwrap();
        h.identification = id;
        h.dont_fragment = false;
        let mut out = Vec::new();
        PacketBuilder::ip(etherparse::IpHeaders::Ipv4(h, Default::default()))
            .udp(7, 1093)
            .write(&mut out, &payload)
            .unwrap();
        out
    }

    #[test]
    fn fragments_in_any_order_give_back_the_datagram() {
        let whole = datagram(7, 4000);
        let mut frags = crate::packet::fragment_ipv4(&whole, 1500).unwrap();
        assert_eq!(frags.len(), 3);
        frags.swap(0, 2);
        let mut r = Reassembly::default();
        let (now, mut expired) = (Instant::now(), 0);
        assert_eq!(r.push(&frags[0], now, &mut expired), Step::Kept);
        assert_eq!(r.push(&frags[1], now, &mut expired), Step::Kept);
        assert_eq!(r.open(), 1);
        assert_eq!(
            r.push(&frags[2], now, &mut expired),
            Step::Done(whole.clone())
        );
        assert_eq!(r.open(), 0);
        assert_eq!(r.push(&whole[..], now, &mut expired), Step::Whole);
    }

    #[test]
    fn memory_is_bounded_and_old_datagrams_time_out() {
        let mut r = Reassembly::new(2, Duration::from_secs(15));
        let t0 = Instant::now();
        let mut expired = 0;
        let first = |id| crate::packet::fragment_ipv4(&datagram(id, 3000), 1500).unwrap();
        assert_eq!(r.push(&first(1)[0], t0, &mut expired), Step::Kept);
        assert_eq!(r.push(&first(2)[0], t0, &mut expired), Step::Kept);
        assert_eq!(r.push(&first(3)[0], t0, &mut expired), Step::Full);
        // A datagram in progress still takes its fragments.
        assert!(matches!(
            r.push(&first(1)[1], t0, &mut expired),
            Step::Kept | Step::Done(_)
        ));
        let later = t0 + Duration::from_secs(16);
        assert_eq!(r.push(&first(3)[0], later, &mut expired), Step::Kept);
        assert_eq!(expired, 2, "both older datagrams given up");
        // The given-up datagram's last fragment alone completes nothing.
        assert_eq!(r.push(&first(2)[1], later, &mut expired), Step::Kept);
    }
}
