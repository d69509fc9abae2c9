//! ICMPv6 "source address failed ingress/egress policy" (type 1 code 5; RFC 7596 §5.1 lets an
//! lwAFTR send it) for native packets the fast path drops for their source: an outer source
//! with no binding, or an inner IPv4 source that is not the lease. Off unless
//! `--policy-icmp N`: then the eBPF program queues at most N offending packets per second per
//! CPU, and here a token bucket keeps the answers to N per second in all (RFC 4443 §2.4 f),
//! sent from the tunnel address through a raw ICMPv6 socket (the kernel adds the checksum).
use std::{
    net::{Ipv6Addr, SocketAddrV6},
    sync::Arc,
    time::Instant,
};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, RingBuf};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::unix::AsyncFd;
use tracing::{info, warn};
use tunnel_common::fastpath::{POLICY_QUOTE, PolicyEvent};

use super::Server;

pub const ICMPV6_DEST_UNREACHABLE: u8 = 1;
pub const CODE_SOURCE_FAILED_POLICY: u8 = 5;

/// The ICMPv6 message quoting `packet` (the offending IPv6 packet, cut to fit 1280 bytes).
pub fn message(packet: &[u8]) -> Vec<u8> {
    let quote = &packet[..packet.len().min(POLICY_QUOTE)];
    let mut msg = vec![
        ICMPV6_DEST_UNREACHABLE,
        CODE_SOURCE_FAILED_POLICY,
        0,
        0,
        0,
        0,
        0,
        0,
    ];
    msg.extend_from_slice(quote);
    msg
}

/// Tokens for `rate` answers per second, bursts of `rate`.
struct Bucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: u32) -> Bucket {
        Bucket {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            last: Instant::now(),
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        self.tokens = (self.tokens + self.rate * now.duration_since(self.last).as_secs_f64())
            .min(self.rate.max(1.0));
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Answers the fast path's policy events until the server stops.
pub async fn run(server: Arc<Server>, ring: RingBuf<MapData>, from: Ipv6Addr, rate: u32) {
    if let Err(e) = serve(&server, ring, from, rate).await {
        warn!("policy ICMPv6 answers stopped: {e:#}");
    }
}

async fn serve(server: &Server, ring: RingBuf<MapData>, from: Ipv6Addr, rate: u32) -> Result<()> {
    let socket = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))
        .context("opening a raw ICMPv6 socket for policy errors")?;
    socket
        .bind(&SocketAddrV6::new(from, 0, 0, 0).into())
        .with_context(|| format!("binding the policy ICMPv6 socket to {from}"))?;
    socket.set_nonblocking(true)?;
    // SAFETY: the ring owns its descriptor, which stays open and the same for as long as the
    // AsyncFd (its owner) lives.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("watching the policy event ring: {e}"))?;
    let mut bucket = Bucket::new(rate);
    info!("answering source-policy drops with ICMPv6 type 1 code 5, at most {rate}/s");
    loop {
        let mut guard = ring.readable_mut().await?;
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            if item.len() < std::mem::size_of::<PolicyEvent>() {
                continue;
            }
            // SAFETY: the record is a PolicyEvent written by the eBPF program (size checked);
            // read unaligned into a copy.
            let event: PolicyEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            let len = (event.len as usize).min(POLICY_QUOTE);
            let packet = &event.packet[..len];
            let Some(to) = packet.get(8..24).and_then(|s| <[u8; 16]>::try_from(s).ok()) else {
                continue;
            };
            if !bucket.take(Instant::now()) {
                server.stats.policy_icmp_rate_limited.inc();
                continue;
            }
            let to = SocketAddrV6::new(Ipv6Addr::from(to), 0, 0, 0);
            match socket.send_to(&message(packet), &to.into()) {
                Ok(_) => server.stats.policy_icmp_sent.inc(),
                Err(_) => server.stats.drop_slowpath_send_error.inc(),
            }
        }
        guard.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_quotes_at_most_what_fits_the_minimum_mtu() {
        let m = message(&[7u8; 2000]);
        assert_eq!(&m[..8], &[1, 5, 0, 0, 0, 0, 0, 0]);
        assert_eq!(m.len(), 1280 - 40);
        assert_eq!(message(&[7u8; 60]).len(), 68);
    }

    #[test]
    fn bucket_allows_bursts_of_the_rate_then_the_rate() {
        let mut b = Bucket::new(5);
        let t0 = b.last;
        assert_eq!((0..10).filter(|_| b.take(t0)).count(), 5);
        assert!(b.take(t0 + std::time::Duration::from_millis(200)));
        assert!(!b.take(t0 + std::time::Duration::from_millis(200)));
    }
}
