//! Sending IPv4-in-IPv6 (next header 4) from userspace: the slow paths of the server, the
//! MAP-E CE and the BR hand the kernel an IPv4 packet and let it add the IPv6 header.
use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV6},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use anyhow::{Context as _, Result, anyhow};

use crate::packet::Fit;

/// A raw IPv6 socket bound to a tunnel endpoint, for sending only.
pub struct Softwire(OwnedFd);

impl Softwire {
    /// Opens the socket with `local` as the outer source.
    pub fn open(local: Ipv6Addr) -> Result<Softwire> {
        raw_socket(local).map(Softwire)
    }

    /// Sends `packet` (IPv4) to `remote` wrapped in IPv6; never blocks (a full socket buffer
    /// is an error the caller counts).
    pub fn send(&self, remote: Ipv6Addr, packet: &[u8]) -> std::io::Result<()> {
        let dst = nix::sys::socket::SockaddrIn6::from(SocketAddrV6::new(remote, 0, 0, 0));
        nix::sys::socket::sendto(
            self.0.as_raw_fd(),
            packet,
            &dst,
            nix::sys::socket::MsgFlags::MSG_DONTWAIT,
        )
        .map(|_| ())
        .map_err(std::io::Error::from)
    }

    /// Sends `packet` to `remote` if it fits `mtu`, else its fragments (DF clear); a DF
    /// packet that does not fit is not sent: the ICMP fragmentation-needed (from `icmp_src`)
    /// for its sender is returned instead.
    pub fn send_fitted(
        &self,
        remote: Ipv6Addr,
        packet: &[u8],
        mtu: u16,
        icmp_src: Ipv4Addr,
    ) -> Sent {
        match crate::packet::fit(packet, mtu, icmp_src) {
            Fit::Whole => match self.send(remote, packet) {
                Ok(()) => Sent::Whole,
                Err(_) => Sent::Failed,
            },
            Fit::Fragments(frags) => {
                if frags.iter().all(|f| self.send(remote, f).is_ok()) {
                    Sent::Fragmented
                } else {
                    Sent::Failed
                }
            }
            Fit::TooBig(icmp) => Sent::TooBig(icmp),
            Fit::Unfragmentable => Sent::Unfragmentable,
        }
    }
}

impl Softwire {
    /// As [`Softwire::send_fitted`], but a packet too big for `mtu` without DF goes whole:
    /// the kernel sends it as fragments of the outer IPv6 packet (RFC 2473 §7), which the far
    /// end reassembles before it decapsulates ([`Sent::Fragmented`]).
    pub fn send_outer_fragmented(
        &self,
        remote: Ipv6Addr,
        packet: &[u8],
        mtu: u16,
        icmp_src: Ipv4Addr,
    ) -> Sent {
        if packet.len() <= usize::from(mtu) || crate::packet::dont_fragment(packet) {
            return self.send_fitted(remote, packet, mtu, icmp_src);
        }
        match self.send(remote, packet) {
            Ok(()) => Sent::Fragmented,
            Err(_) => Sent::Failed,
        }
    }
}

/// What [`Softwire::send_fitted`] did.
pub enum Sent {
    Whole,
    Fragmented,
    /// Not sent: too big with DF; this ICMP error goes back to the sender.
    TooBig(Vec<u8>),
    Unfragmentable,
    /// The socket refused (buffer full): dropped.
    Failed,
}

/// A raw IPv6 socket for next header 4 (non-blocking): it sends IPv4 packets the kernel wraps
/// in IPv6, and receives the IPv4-in-IPv6 packets the kernel delivers locally.
pub fn raw_ipip_socket() -> Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the fd is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET6,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            libc::IPPROTO_IPIP,
        )
    };
    if fd < 0 {
        return Err(anyhow!(
            "opening a raw IPv6 socket: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: fd was just returned by socket(2) and is not owned elsewhere.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A raw IPv6 socket for next header 4, bound to the tunnel address (which need not be
/// configured on an interface: IPV6_FREEBIND). It only sends; its receive buffer is minimal.
fn raw_socket(tunnel_addr: Ipv6Addr) -> Result<OwnedFd> {
    let fd = raw_ipip_socket()?;
    let one: libc::c_int = 1;
    let small: libc::c_int = 1;
    // SAFETY: setsockopt with pointers to live locals of the right size.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_FREEBIND,
            (&one as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as u32,
        );
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&small as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as u32,
        );
    }
    let local = nix::sys::socket::SockaddrIn6::from(SocketAddrV6::new(tunnel_addr, 0, 0, 0));
    nix::sys::socket::bind(fd.as_raw_fd(), &local)
        .with_context(|| format!("binding the slow-path raw socket to {tunnel_addr}"))?;
    Ok(fd)
}
