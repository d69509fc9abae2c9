//! The lwAFTR lab (SPEC §4a, RFC 7596): `tunnel-ctl server --bindings FILE` without a pool, B4s
//! that are plain namespaces sending IPv4-in-IPv6 by hand through raw sockets (no control
//! channel, no tunnel device), an internet host with a UDP echo service.
//!
//! Lab: b4 (2001:db8:1::2-6 on one link) ⇄ aftr (tunnel address 2001:db8:ffff::1, IPv4 side
//! 192.0.2.1) ⇄ internet (192.0.2.10, routes 203.0.113.0/24 to the AFTR).
use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{Lab, Ns};
use anyhow::{Result, bail};
use etherparse::{PacketBuilder, SlicedPacket};

pub const AFTR: &str = "2001:db8:ffff::1";
pub const INTERNET: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
pub const ECHO: SocketAddrV4 = SocketAddrV4::new(INTERNET, 7);

pub fn b4(n: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, n)
}

/// The table of Done-when 3: a whole address, two softwires of one address, one with offset
/// 0 (one contiguous range, ports below 1024 possible).
pub const TABLE: &str = r#"
[[softwire]]
ipv4 = "203.0.113.1"
psid-len = 0
b4 = "2001:db8:1::2"

[[softwire]]
ipv4 = "203.0.113.2"
psid = 1
psid-len = 4
b4 = "2001:db8:1::3"

[[softwire]]
ipv4 = "203.0.113.2"
psid = 2
psid-len = 4
b4 = "2001:db8:1::4"

[[softwire]]
ipv4 = "203.0.113.3"
psid = 5
psid-len = 8
psid-offset = 0
b4 = "2001:db8:1::5"
"#;

/// Ports worked out by hand from SPEC §6 (port = (j << (16 − a)) | (psid << m) | i):
/// a 6, k 4, psid 1: j = 1 gives 1024 + 64 … 1024 + 127.
pub const PORT_2_1: u16 = 1024 + 64 + 5;
/// a 6, k 4, psid 2: 1024 + 128 …
pub const PORT_2_2: u16 = 1024 + 128 + 9;
/// a 0, k 8, psid 5: m = 8, ports 1280 … 1535.
pub const PORT_3_5: u16 = 1280 + 17;

/// A datagram as the echo service received it: source and payload.
pub type Datagram = (SocketAddrV4, Vec<u8>);

pub struct Aftr {
    pub lab: Lab,
    b4s: Ns,
    pub aftr: Ns,
    /// The daemon's arguments (for a restart).
    pub args: Vec<String>,
    pub internet: Ns,
    pub instance: String,
    /// What the internet host's echo service received, as (source, payload).
    pub seen: Arc<Mutex<Vec<Datagram>>>,
    pub stop: Arc<AtomicBool>,
}

impl Drop for Aftr {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Aftr {
    pub fn start(table: &str, extra: &[&str]) -> Result<Aftr> {
        Aftr::start_in(Lab::new()?, table, extra)
    }

    pub fn start_in(mut lab: Lab, table: &str, extra: &[&str]) -> Result<Aftr> {
        let b4s = lab.ns("b4")?;
        let aftr = lab.ns("aftr")?;
        let internet = lab.ns("inet")?;
        lab.veth(&b4s, "v6", &aftr, "v6")?;
        lab.veth(&aftr, "v4", &internet, "v4")?;
        b4s.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
        for n in 2..=6 {
            b4s.ip(&format!("addr add {}/64 dev v6 nodad", b4(n)))?;
        }
        b4s.ip("route add 2001:db8:ffff::/48 via 2001:db8:1::1")?;
        aftr.ip("addr add 2001:db8:1::1/64 dev v6 nodad")?;
        aftr.ip(&format!("addr add {AFTR}/128 dev v6 nodad"))?;
        aftr.ip("addr add 192.0.2.1/24 dev v4")?;
        // The internet is the default way: a packet the AFTR failed to keep (a hairpin that
        // leaks) would reach the internet host.
        aftr.ip("route add default via 192.0.2.10")?;
        aftr.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        internet.ip("addr add 192.0.2.10/24 dev v4")?;
        internet.ip("route add 203.0.113.0/24 via 192.0.2.1")?;
        let file = lab.dir().join("bindings.toml");
        std::fs::write(&file, table)?;
        let instance = lab.instance("aftr");
        let file = file.to_string_lossy().into_owned();
        let mut args = vec![
            "server",
            "--bindings",
            &file,
            "--v6-dev",
            "v6",
            "--v4-dev",
            "v4",
            "--tunnel-addr",
            AFTR,
        ];
        args.extend_from_slice(extra);
        lab.spawn_daemon(&aftr, &instance, &args)?;
        let args = args.into_iter().map(str::to_owned).collect();

        let sock = internet.enter(|| std::net::UdpSocket::bind(ECHO))??;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (flag, log) = (stop.clone(), seen.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((n, std::net::SocketAddr::V4(from))) = sock.recv_from(&mut buf) {
                    log.lock().unwrap().push((from, buf[..n].to_vec()));
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
        });
        Ok(Aftr {
            lab,
            b4s,
            aftr,
            args,
            internet,
            instance,
            seen,
            stop,
        })
    }

    /// The same command again (after the daemon died; its pinned maps stay); returns once
    /// the new daemon serves, with how long that took.
    pub fn respawn(mut self) -> Result<(Aftr, Duration)> {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let started = Instant::now();
        self.lab.spawn_daemon(&self.aftr, &self.instance, &args)?;
        let took = started.elapsed();
        Ok((self, took))
    }

    pub fn stats(&self) -> Result<serde_json::Value> {
        self.lab.ctl_json("stats", &self.instance)
    }

    pub fn ctl(&self, args: &[&str]) -> Result<String> {
        let mut argv = args.to_vec();
        argv.extend_from_slice(&["--instance", &self.instance]);
        self.lab.ctl(&argv)
    }

    pub fn b4(&self, addr: Ipv6Addr) -> Result<B4> {
        B4::open(&self.b4s, addr)
    }

    /// The echo service received `payload` (from any source): its source.
    pub fn seen(&self, payload: &[u8]) -> Option<SocketAddrV4> {
        let seen = self.seen.lock().unwrap();
        seen.iter().find(|(_, p)| p == payload).map(|(s, _)| *s)
    }
}

/// A hand-made B4: a raw IPv6 socket (next header 4) bound to its address.
pub struct B4 {
    pub fd: OwnedFd,
    /// The TTL of the last datagram [`B4::recv_udp`] returned.
    pub last_ttl: std::cell::Cell<Option<u8>>,
}

impl B4 {
    pub fn open(ns: &Ns, addr: Ipv6Addr) -> Result<B4> {
        let fd = ns.enter(|| -> Result<OwnedFd> {
            // SAFETY: socket(2); the fd is owned right away.
            let fd = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_IPIP) };
            if fd < 0 {
                bail!("raw socket: {}", std::io::Error::last_os_error());
            }
            // SAFETY: fresh fd.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let local = nix::sys::socket::SockaddrIn6::from(SocketAddrV6::new(addr, 0, 0, 0));
            nix::sys::socket::bind(fd.as_raw_fd(), &local)?;
            Ok(fd)
        })??;
        let timeout = nix::sys::time::TimeVal::new(0, 100_000);
        nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::ReceiveTimeout, &timeout)?;
        Ok(B4 {
            fd,
            last_ttl: Default::default(),
        })
    }

    /// Sends IPv4 `inner` to the AFTR wrapped in IPv6.
    pub fn send(&self, inner: &[u8]) -> Result<()> {
        let dst = nix::sys::socket::SockaddrIn6::from(SocketAddrV6::new(AFTR.parse()?, 0, 0, 0));
        nix::sys::socket::sendto(
            self.fd.as_raw_fd(),
            inner,
            &dst,
            nix::sys::socket::MsgFlags::empty(),
        )?;
        Ok(())
    }

    /// Sends a UDP datagram `src` → `dst`.
    pub fn send_udp(&self, src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Result<()> {
        self.send(&udp4(src, dst, payload))
    }

    /// The next UDP datagram that arrives wrapped from the AFTR within `limit`, put back
    /// together when it comes in IPv4 fragments (as a B4's stack would): (source,
    /// destination, payload). Other packets are skipped.
    pub fn recv_udp(
        &self,
        limit: Duration,
    ) -> Result<Option<(SocketAddrV4, SocketAddrV4, Vec<u8>)>> {
        let deadline = Instant::now() + limit;
        let mut pool = etherparse::defrag::IpDefragPool::<(), ()>::new();
        let mut buf = [0u8; 65536];
        while Instant::now() < deadline {
            let n = match nix::sys::socket::recv(
                self.fd.as_raw_fd(),
                &mut buf,
                nix::sys::socket::MsgFlags::empty(),
            ) {
                Ok(n) => n,
                Err(nix::errno::Errno::EAGAIN) => continue,
                Err(e) => return Err(e.into()),
            };
            let Ok(p) = SlicedPacket::from_ip(&buf[..n]) else {
                continue;
            };
            let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else {
                continue;
            };
            let h = ip.header();
            let (src, dst) = (h.source_addr(), h.destination_addr());
            self.last_ttl.set(Some(h.ttl()));
            let udp = if h.is_fragmenting_payload() {
                match pool.process_sliced_packet(&p, (), ()) {
                    Ok(Some(done)) => done.payload,
                    Ok(None) => continue,
                    Err(e) => bail!("fragments that do not fit together: {e}"),
                }
            } else {
                ip.payload().payload.to_vec()
            };
            let Ok((u, payload)) = etherparse::UdpHeader::from_slice(&udp) else {
                continue;
            };
            return Ok(Some((
                SocketAddrV4::new(src, u.source_port),
                SocketAddrV4::new(dst, u.destination_port),
                payload.to_vec(),
            )));
        }
        Ok(None)
    }

    /// Sends `payload` to the echo service and waits (bounded) for its echo to this socket.
    pub fn echo(&self, src: SocketAddrV4, payload: &[u8]) -> Result<()> {
        self.send_udp(src, ECHO, payload)?;
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Some((from, to, got)) = self.recv_udp(Duration::from_millis(200))?
                && got == payload
            {
                assert_eq!((from, to), (ECHO, src), "the echo of {src}");
                return Ok(());
            }
        }
        bail!(
            "no echo of {:?} from {src}",
            String::from_utf8_lossy(payload)
        )
    }
}

pub fn udp4(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv4(src.ip().octets(), dst.ip().octets(), 64)
        .udp(src.port(), dst.port())
        .write(&mut out, payload)
        .expect("a UDP packet");
    out
}

/// As [`udp4`], with DF clear: a datagram routers may fragment.
pub fn udp4_may_fragment(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let mut h = etherparse::Ipv4Header::new(
        0,
        64,
        etherparse::IpNumber::UDP,
        src.ip().octets(),
        dst.ip().octets(),
    )
    .expect("a header");
    h.dont_fragment = false;
    let mut out = Vec::new();
    PacketBuilder::ip(etherparse::IpHeaders::Ipv4(h, Default::default()))
        .udp(src.port(), dst.port())
        .write(&mut out, payload)
        .expect("a UDP packet");
    out
}

pub fn v4(addr: &str, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(addr.parse().unwrap(), port)
}
