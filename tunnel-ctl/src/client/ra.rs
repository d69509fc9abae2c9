//! Router advertisements on the client's LAN (`--lan`, seed 001's radvd job): the delegated
//! prefix with the autonomous flag, so hosts autoconfigure by SLAAC and route through us; the
//! link MTU; the leased DNS servers (RDNSS, RFC 8106).
//!
//! Sent three times at start (2 s apart), then every [`INTERVAL`], at once in answer to a
//! router solicitation, and when the prefix changes (the old one then goes out with zero
//! lifetimes, so hosts stop preferring it). On shutdown a last advertisement withdraws the
//! default route (router lifetime 0) and the prefix.
use std::{
    io,
    mem::MaybeUninit,
    net::{Ipv6Addr, SocketAddrV6},
    time::Duration,
};

use anyhow::{Context as _, Result};
use ipnet::Ipv6Net;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{io::unix::AsyncFd, sync::watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Unsolicited advertisements after the first three.
pub const INTERVAL: Duration = Duration::from_secs(30);
const ROUTER_LIFETIME_S: u16 = 1800;
const VALID_S: u32 = 3600;
const PREFERRED_S: u32 = 1800;
const DNS_LIFETIME_S: u32 = 1800;
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
const ROUTER_SOLICITATION: u8 = 133;
const ROUTER_ADVERTISEMENT: u8 = 134;

/// What is advertised.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Advert {
    pub prefix: Ipv6Net,
    pub mtu: u32,
    pub dns: Vec<Ipv6Addr>,
}

/// One router advertisement (ICMPv6 message; the kernel fills in the checksum). `live` false
/// withdraws: router lifetime and prefix lifetimes 0.
pub fn build(advert: &Advert, mac: &[u8], live: bool) -> Vec<u8> {
    let router_lifetime = if live { ROUTER_LIFETIME_S } else { 0 };
    let mut m = vec![ROUTER_ADVERTISEMENT, 0, 0, 0, 64, 0];
    m.extend_from_slice(&router_lifetime.to_be_bytes());
    m.extend_from_slice(&[0; 8]); // reachable time, retrans timer: unspecified
    if mac.len() == 6 {
        m.extend_from_slice(&[1, 1]); // source link-layer address
        m.extend_from_slice(mac);
    }
    m.extend_from_slice(&[5, 1, 0, 0]);
    m.extend_from_slice(&advert.mtu.to_be_bytes());
    push_prefix(&mut m, advert.prefix, live);
    if !advert.dns.is_empty() && live {
        m.extend_from_slice(&[25, (1 + 2 * advert.dns.len()) as u8, 0, 0]);
        m.extend_from_slice(&DNS_LIFETIME_S.to_be_bytes());
        for d in &advert.dns {
            m.extend_from_slice(&d.octets());
        }
    }
    m
}

/// A prefix information option: on-link, and autonomous when SLAAC can use it (/64).
fn push_prefix(m: &mut Vec<u8>, prefix: Ipv6Net, live: bool) {
    let flags = if prefix.prefix_len() == 64 {
        0xc0
    } else {
        0x80
    };
    let (valid, preferred) = if live { (VALID_S, PREFERRED_S) } else { (0, 0) };
    m.extend_from_slice(&[3, 4, prefix.prefix_len(), flags]);
    m.extend_from_slice(&valid.to_be_bytes());
    m.extend_from_slice(&preferred.to_be_bytes());
    m.extend_from_slice(&[0; 4]);
    m.extend_from_slice(&prefix.network().octets());
}

fn open(dev: &str, index: u32) -> Result<AsyncFd<Socket>> {
    let s = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))
        .context("opening a raw ICMPv6 socket for router advertisements")?;
    s.bind_device(Some(dev.as_bytes()))
        .with_context(|| format!("binding the router advertisement socket to {dev}"))?;
    s.set_multicast_if_v6(index)?;
    s.set_multicast_hops_v6(255)?; // RFC 4861: hosts drop RAs with any other hop limit
    s.set_unicast_hops_v6(255)?;
    s.set_multicast_loop_v6(false)?;
    s.set_nonblocking(true)?;
    // SAFETY: the socket owns its descriptor, which stays open and the same for as long as
    // the AsyncFd (its owner) lives.
    unsafe { AsyncFd::register_with_interest(s, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("registering the router advertisement socket: {e}"))
}

fn send(sock: &AsyncFd<Socket>, msg: &[u8], index: u32) -> io::Result<usize> {
    let to = SocketAddrV6::new(ALL_NODES, 0, 0, index);
    sock.get_ref().send_to(msg, &to.into())
}

/// Advertises what `rx` holds on `dev` until `stop`; then withdraws.
pub async fn run(
    dev: String,
    index: u32,
    mac: Vec<u8>,
    mut rx: watch::Receiver<Option<Advert>>,
    stop: CancellationToken,
) {
    let sock = match open(&dev, index) {
        Ok(s) => s,
        Err(e) => {
            warn!("router advertisements on {dev} disabled: {e:#}");
            return;
        }
    };
    let mut current: Option<Advert> = rx.borrow_and_update().clone();
    let mut sent = 0u32;
    let mut next_at = tokio::time::Instant::now();
    let mut buf = [MaybeUninit::<u8>::uninit(); 1500];
    loop {
        let advertise = tokio::select! {
            () = stop.cancelled() => break,
            changed = rx.changed() => {
                if changed.is_err() {
                    break;
                }
                let new = rx.borrow_and_update().clone();
                if let Some(old) = current.as_ref().filter(|o| new.as_ref().is_none_or(|n| n.prefix != o.prefix)) {
                    info!("LAN {dev}: withdrawing {}", old.prefix);
                    let _ = send(&sock, &build(old, &mac, false), index);
                }
                current = new;
                sent = 0;
                true
            }
            () = tokio::time::sleep_until(next_at) => {
                next_at += INTERVAL; // pushed back below once something is sent
                true
            }
            ready = sock.readable() => match ready {
                Ok(mut guard) => match guard.try_io(|s| s.get_ref().recv(&mut buf)) {
                    Ok(Ok(n)) => {
                        // SAFETY: recv initialised the first n bytes.
                        let first = (n > 0).then(|| unsafe { buf[0].assume_init() });
                        first == Some(ROUTER_SOLICITATION)
                    }
                    Ok(Err(_)) | Err(_) => false,
                },
                Err(_) => false,
            },
        };
        let Some(advert) = current.as_ref().filter(|_| advertise) else {
            continue;
        };
        match send(&sock, &build(advert, &mac, true), index) {
            Ok(_) => {
                if sent == 0 {
                    info!(
                        "LAN {dev}: advertising {} (SLAAC), MTU {}",
                        advert.prefix, advert.mtu
                    );
                }
                sent += 1;
                let wait = if sent < 3 {
                    Duration::from_secs(2)
                } else {
                    INTERVAL
                };
                next_at = tokio::time::Instant::now() + wait;
            }
            // The link-local address may still be tentative (DAD) right after start.
            Err(e) => {
                debug!("router advertisement on {dev}: {e}; retrying in 1 s");
                next_at = tokio::time::Instant::now() + Duration::from_secs(1);
            }
        }
    }
    if let Some(advert) = &current {
        let _ = send(&sock, &build(advert, &mac, false), index);
        info!(
            "LAN {dev}: withdrew {} and the default route",
            advert.prefix
        );
    }
}

#[cfg(test)]
mod tests {
    use etherparse::{Icmpv6Slice, Icmpv6Type};

    use super::*;

    #[test]
    fn advertisement_carries_prefix_mtu_and_dns() {
        let advert = Advert {
            prefix: "2001:db8:700:5::/64".parse().unwrap(),
            mtu: 1500,
            dns: vec!["2001:db8::53".parse().unwrap()],
        };
        let m = build(&advert, &[2, 0, 0, 0, 0, 1], true);
        let icmp = Icmpv6Slice::from_slice(&m).unwrap();
        let Icmpv6Type::RouterAdvertisement(h) = icmp.icmp_type() else {
            panic!("not an RA: {:?}", icmp.icmp_type());
        };
        assert_eq!(h.router_lifetime, 1800);
        assert_eq!(h.cur_hop_limit, 64);
        // RFC 4861 §4.2: type 134, code 0, checksum (the kernel's), hop limit 64, no M/O
        // flags, router lifetime 1800 s, reachable time and retrans timer unspecified.
        assert_eq!(
            &m[..16],
            &[134, 0, 0, 0, 64, 0, 0x07, 0x08, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        // Source link-layer address option (type 1, 8 bytes).
        assert_eq!(&m[16..24], &[1, 1, 2, 0, 0, 0, 0, 1]);
        // header 16, SLLA 8, MTU 8, prefix 32, RDNSS 24
        assert_eq!(m.len(), 16 + 8 + 8 + 32 + 24);
        // Prefix information (§4.6.2): type 3, 32 bytes, /64, on-link + autonomous, valid
        // 3600 s, preferred 1800 s, reserved, then 2001:db8:700:5::.
        let prefix = &m[32..64];
        assert_eq!(
            &prefix[..16],
            &[
                3, 4, 64, 0xc0, 0, 0, 0x0e, 0x10, 0, 0, 0x07, 0x08, 0, 0, 0, 0
            ]
        );
        assert_eq!(
            &prefix[16..],
            &[
                0x20, 0x01, 0x0d, 0xb8, 0x07, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0
            ]
        );
        assert_eq!(&m[24..32], &[5, 1, 0, 0, 0, 0, 0x05, 0xdc]);
        // RDNSS (RFC 8106 §5.1): type 25, 3 × 8 bytes, lifetime 1800 s, 2001:db8::53.
        assert_eq!(&m[64..72], &[25, 3, 0, 0, 0, 0, 0x07, 0x08]);
        assert_eq!(
            &m[72..88],
            &[
                0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x53
            ]
        );

        let gone = build(&advert, &[], false);
        assert_eq!(&gone[6..8], &[0, 0], "router lifetime 0");
        assert_eq!(
            &gone[16 + 8 + 4..16 + 8 + 12],
            &[0; 8],
            "prefix lifetimes 0"
        );
        assert_eq!(gone.len(), 16 + 8 + 32, "no SLLA without a MAC, no RDNSS");
    }
}
