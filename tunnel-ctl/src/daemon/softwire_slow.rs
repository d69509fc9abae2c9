//! The lwAFTR's slow path (RFC 7596 §5.1), for what the fast path hands over: IPv4
//! fragments and too-big packets toward a softwire's address arrive on the TUN; they are
//! reassembled (only the first fragment names the port), given to the softwire of their
//! port and sent to its B4 as IPv4-in-IPv6, fragmented to fit the tunnel (or answered with
//! ICMP fragmentation-needed when DF is set). A B4's outer IPv6 fragments are reassembled
//! by the kernel (the AFTR address must be this host's) and arrive whole on a raw socket
//! (next header 4); they are checked against the table as the fast path checks, and
//! written to the TUN for the kernel to route (and fragment) toward the internet, or
//! hairpinned. Used by the pure lwAFTR and by a server with native mode.
use std::{
    collections::HashMap,
    io::IoSliceMut,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV6},
    os::fd::{AsRawFd as _, OwnedFd},
    sync::{Arc, Mutex},
    time::Instant,
};

use crate::tundev::Tun;
use anyhow::{Context as _, Result};
use tokio::io::unix::AsyncFd;
use tracing::{debug, warn};

use crate::{
    counters,
    dataplane::server::Native,
    packet,
    server::{
        reassembly::{Reassembly, Step},
        softwires::Refused,
    },
    softwire::{Sent, Softwire},
};

counters! {
    pub struct SlowStats {
        /// Packets toward a softwire the fast path handed over, sent to its B4 whole.
        slowpath_to_b4,
        /// ... sent as IPv4 fragments that fit the tunnel.
        slowpath_fragmented,
        /// ... with DF set and too big: answered with ICMP fragmentation-needed.
        slowpath_icmp_frag_needed,
        /// IPv4 datagrams put back together from fragments toward a softwire.
        fragments_reassembled,
        /// Fragments dropped: too many datagrams in progress (1,024).
        drop_reassembly_full,
        /// Datagrams given up: no fragment for 15 s.
        drop_reassembly_timeout,
        /// Malformed or inconsistent fragments.
        drop_fragment_bad,
        /// Toward a softwire address whose port no softwire holds.
        drop_slowpath_no_softwire,
        /// Reassembled packets from B4s, checked and forwarded.
        slowpath_from_b4,
        /// ... toward another softwire (hairpinned).
        slowpath_hairpinned,
        /// ... refused, per reason (the fast path's drop reasons).
        slowpath_drop_unbound_source,
        slowpath_drop_port_outside_set,
        slowpath_drop_b4_mismatch,
        slowpath_drop_no_binding_for_port,
        slowpath_drop_hairpin_off,
        /// ... hairpinned with a TTL that would expire.
        slowpath_drop_ttl_expired,
        drop_slowpath_unfragmentable,
        drop_slowpath_send_error,
        drop_tun_write_error,
    }
}

pub struct SoftwireSlowPath {
    pub tun: Arc<Tun>,
    no_hairpin: bool,
    reassembly: Mutex<Reassembly>,
    /// A sending socket per AFTR address, opened when first needed.
    senders: Mutex<HashMap<Ipv6Addr, Arc<Softwire>>>,
    pub stats: SlowStats,
}

impl SoftwireSlowPath {
    pub fn new(tun: Arc<Tun>, no_hairpin: bool) -> SoftwireSlowPath {
        SoftwireSlowPath {
            tun,
            no_hairpin,
            reassembly: Mutex::new(Reassembly::default()),
            senders: Mutex::new(HashMap::new()),
            stats: SlowStats::default(),
        }
    }

    fn sender(&self, aftr: Ipv6Addr) -> Result<Arc<Softwire>> {
        let mut senders = self.senders.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = senders.get(&aftr) {
            return Ok(s.clone());
        }
        let s = Arc::new(Softwire::open(aftr)?);
        senders.insert(aftr, s.clone());
        Ok(s)
    }

    /// A packet from the TUN: an IPv4 fragment or too-big packet toward a softwire (the
    /// kernel's own chatter on a TUN of the pure lwAFTR, IPv6 router solicitations and the
    /// like, is not ours).
    pub async fn toward_b4(&self, native: &Native, pkt: &[u8]) {
        if pkt.first().is_none_or(|b| b >> 4 != 4) {
            return;
        }
        let stats = &self.stats;
        let whole = {
            let mut expired = 0;
            let step = self
                .reassembly
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(pkt, Instant::now(), &mut expired);
            stats.drop_reassembly_timeout.add(expired as u64);
            match step {
                Step::Whole => pkt.to_vec(),
                Step::Done(whole) => {
                    stats.fragments_reassembled.inc();
                    whole
                }
                Step::Kept => return,
                Step::Full => return stats.drop_reassembly_full.inc(),
                Step::Bad => return stats.drop_fragment_bad.inc(),
            }
        };
        let Some(IpAddr::V4(dst)) = packet::destination(&whole) else {
            return stats.drop_fragment_bad.inc();
        };
        self.send_to_softwire(native, dst, &whole).await;
    }

    /// Sends the whole IPv4 packet `pkt` (to `dst`) to the B4 of the softwire its port
    /// belongs to, fragmented to fit the tunnel.
    async fn send_to_softwire(&self, native: &Native, dst: Ipv4Addr, pkt: &[u8]) {
        let stats = &self.stats;
        let endpoints = {
            let softwires = native.softwires();
            softwires
                .table()
                .holder(dst, packet::port_toward(pkt))
                .map(|sw| (sw.aftr.unwrap_or(native.tunnel_addr), sw.b4))
        };
        let Some((aftr, b4)) = endpoints else {
            debug!("slow path: no softwire holds the port of a packet to {dst}");
            return stats.drop_slowpath_no_softwire.inc();
        };
        let sender = match self.sender(aftr) {
            Ok(s) => s,
            Err(e) => {
                warn!("slow path: {e:#}");
                return stats.drop_slowpath_send_error.inc();
            }
        };
        // ICMP errors come "from" the destination, like a router on its last hop.
        match sender.send_fitted(b4, pkt, native.inner_mtu, dst) {
            Sent::Whole => stats.slowpath_to_b4.inc(),
            Sent::Fragmented => stats.slowpath_fragmented.inc(),
            Sent::TooBig(icmp) => match self.tun.send(&icmp).await {
                Ok(_) => stats.slowpath_icmp_frag_needed.inc(),
                Err(_) => stats.drop_tun_write_error.inc(),
            },
            Sent::Unfragmentable => stats.drop_slowpath_unfragmentable.inc(),
            Sent::Failed => stats.drop_slowpath_send_error.inc(),
        }
    }

    /// A whole IPv4 packet `inner` from `b4` to AFTR address `to` (the kernel reassembled
    /// its outer fragments): checked, then routed by the kernel (or hairpinned).
    async fn take_from_b4(&self, native: &Native, b4: Ipv6Addr, to: Ipv6Addr, inner: &[u8]) {
        let stats = &self.stats;
        let Some((IpAddr::V4(src), IpAddr::V4(dst))) = packet::addrs(inner) else {
            return stats.slowpath_drop_unbound_source.inc();
        };
        let (verdict, hairpin) = {
            let softwires = native.softwires();
            let table = softwires.table();
            let verdict = table
                .check_from_b4(b4, src, packet::port_from(inner))
                .and_then(|sw| {
                    if sw.aftr.unwrap_or(native.tunnel_addr) == to {
                        Ok(())
                    } else {
                        Err(Refused::B4Mismatch)
                    }
                });
            (verdict, table.holds_address(dst))
        };
        if let Err(why) = verdict {
            debug!("slow path: {src} from B4 {b4} refused: {}", why.counter());
            return match why {
                Refused::Unbound => stats.slowpath_drop_unbound_source.inc(),
                Refused::PortOutsideSet => stats.slowpath_drop_port_outside_set.inc(),
                Refused::B4Mismatch => stats.slowpath_drop_b4_mismatch.inc(),
                Refused::NoBindingForPort => stats.slowpath_drop_no_binding_for_port.inc(),
            };
        }
        if hairpin {
            if self.no_hairpin {
                return stats.slowpath_drop_hairpin_off.inc();
            }
            // Routed inside the AFTR: one hop, as the fast path's hairpin counts it.
            let mut pkt = inner.to_vec();
            if !packet::decrement_ttl(&mut pkt) {
                return stats.slowpath_drop_ttl_expired.inc();
            }
            stats.slowpath_hairpinned.inc();
            return self.send_to_softwire(native, dst, &pkt).await;
        }
        match self.tun.send(inner).await {
            Ok(_) => stats.slowpath_from_b4.inc(),
            Err(_) => stats.drop_tun_write_error.inc(),
        }
    }

    /// Whole IPv4-in-IPv6 packets the kernel reassembled for us.
    pub async fn b4_reader(&self, native: &Native, receiver: AsyncFd<OwnedFd>) {
        let mut buf = vec![0u8; 65536];
        loop {
            let mut ready = match receiver.readable().await {
                Ok(r) => r,
                Err(e) => {
                    // Only when the runtime shuts down; the daemon's other work goes on.
                    warn!("slow path raw socket: {e}");
                    return std::future::pending().await;
                }
            };
            match ready.try_io(|fd| recv_from_b4(fd.get_ref(), &mut buf)) {
                Ok(Ok((n, b4, to))) => self.take_from_b4(native, b4, to, &buf[..n]).await,
                Ok(Err(e)) => warn!("slow path raw socket: {e}"),
                Err(_would_block) => {}
            }
        }
    }
}

/// A raw IPv6 socket for next header 4 that receives what the kernel delivers locally (the
/// fast path takes everything else), with each packet's destination (IPV6_PKTINFO).
pub fn ipip_receiver() -> Result<AsyncFd<OwnedFd>> {
    ipip_socket().context("the slow path's raw socket for B4s' packets (next header 4)")
}

fn ipip_socket() -> Result<AsyncFd<OwnedFd>> {
    let fd = crate::softwire::raw_ipip_socket()?;
    nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::Ipv6RecvPacketInfo, &true)?;
    // SAFETY: the AsyncFd owns the descriptor, which nothing else uses.
    Ok(unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }?)
}

/// One packet from the raw socket: (length, outer source, outer destination).
fn recv_from_b4(fd: &OwnedFd, buf: &mut [u8]) -> std::io::Result<(usize, Ipv6Addr, Ipv6Addr)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockaddrIn6, recvmsg};
    let mut iov = [IoSliceMut::new(buf)];
    let mut space = nix::cmsg_space!(libc::in6_pktinfo);
    let msg = recvmsg::<SockaddrIn6>(
        fd.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_DONTWAIT,
    )?;
    let from = msg
        .address
        .map(|a| SocketAddrV6::from(a).ip().to_owned())
        .unwrap_or(Ipv6Addr::UNSPECIFIED);
    let to = msg
        .cmsgs()?
        .find_map(|c| match c {
            ControlMessageOwned::Ipv6PacketInfo(info) => {
                Some(Ipv6Addr::from(info.ipi6_addr.s6_addr))
            }
            _ => None,
        })
        .unwrap_or(Ipv6Addr::UNSPECIFIED);
    Ok((msg.bytes, from, to))
}
