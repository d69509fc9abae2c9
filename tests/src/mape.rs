//! The MAP-E topology (SPEC §9): LAN host ⇄ CE ⇄ (IPv6 only) ⇄ BR ⇄ internet.
//!
//! ```text
//!  lan   eth0 198.51.100.10/24 ─veth─ lan0 198.51.100.1/24   ce
//!  ce    wan0 2001:db8:ffff::2/64 ─veth─ ce0 2001:db8:ffff::1/64   br
//!  br    inet0 192.0.2.1/24 ─veth─ eth0 192.0.2.2/24   internet
//! ```
//! The BR address (`BR_ADDR`) is configured nowhere: the CE's default IPv6 route leads to the
//! BR, whose TC program takes what is addressed to it. The BR routes the rule's IPv6 prefix to
//! the CE; the internet host routes the rule's IPv4 prefix to the BR.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::{Lab, Ns};

pub const BR_ADDR: &str = "2001:db8:ffff:1::1";
pub const LAN_HOST: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
pub const INTERNET_HOST: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
/// The shared address both rules below give: 203.0.113.0/24 with suffix 0x12.
pub const SHARED: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 18);

/// A rule and end-user prefix for the lab.
pub struct Rule {
    pub ipv6: &'static str,
    pub ipv4: &'static str,
    pub ea_len: u8,
    pub psid_offset: u8,
    pub prefix: &'static str,
}

/// The issue's rule: 2001:db8::/40 ↔ 203.0.113.0/24, EA 16, offset 6; PSID 0xa4 (63 blocks
/// of 4 ports: 1680-1683, 2704-2707, …), CE 2001:db8:12:a400:0:cb00:7112:a4.
pub const RULE_252: Rule = Rule {
    ipv6: "2001:db8::/40",
    ipv4: "203.0.113.0/24",
    ea_len: 16,
    psid_offset: 6,
    prefix: "2001:db8:12:a400::/56",
};

/// [`RULE_252`] with `--prefix auto`: the CE reads [`AUTO_WAN_ADDR`]'s /64 from its WAN.
pub const RULE_252_AUTO: Rule = Rule {
    prefix: "auto",
    ..RULE_252
};
/// The CE's global WAN address under [`RULE_252_AUTO`]: RULE_252's prefix.
pub const AUTO_WAN_ADDR: &str = "2001:db8:12:a400::1";
/// The CE's LAN address when a test passes `--prefix-from lan0`: another prefix of the rule
/// (IPv4 suffix 0x13, PSID 0xa4).
pub const PREFIX_FROM_LAN_ADDR: &str = "2001:db8:13:a400::1";

/// A 16-port set: offset 0, EA 20 → PSID 0xa40 owns 41984-41999.
pub const RULE_16: Rule = Rule {
    ipv6: "2001:db8::/40",
    ipv4: "203.0.113.0/24",
    ea_len: 20,
    psid_offset: 0,
    prefix: "2001:db8:12:a400::/60",
};

pub struct MapeLab {
    pub lab: Lab,
    pub lan: Ns,
    pub ce: Ns,
    pub br: Ns,
    pub internet: Ns,
    pub ce_instance: String,
    pub br_instance: String,
    /// The CE's command line (to start it again the same way).
    pub ce_args: Vec<String>,
    /// The BR's command line.
    pub br_args: Vec<String>,
    from_config: bool,
    second: Option<SecondCe>,
}

/// The second CE of [`MapeLab::start_two`].
pub struct SecondCe {
    pub lan: Ns,
    pub ce: Ns,
    pub instance: String,
}

impl MapeLab {
    /// Builds the namespaces, starts the BR with `rule` and the CE with `rule` plus
    /// `ce_extra` flags.
    pub fn start(rule: &Rule, ce_extra: &[&str]) -> Result<MapeLab> {
        MapeLab::start_with(rule, ce_extra, false)
    }

    /// As [`MapeLab::start`]; with `from_config` the BR and the CE read their settings from
    /// a TOML file alone (`--config`).
    pub fn start_with(rule: &Rule, ce_extra: &[&str], from_config: bool) -> Result<MapeLab> {
        MapeLab::build(rule, ce_extra, from_config, None)
    }

    /// As [`MapeLab::start`], with a second CE for end-user prefix `prefix2` (its own LAN
    /// namespace, the LAN host at the same address): both CEs and the BR share one IPv6
    /// segment (a bridge in a switch namespace), the second CE at 2001:db8:ffff::3.
    pub fn start_two(rule: &Rule, prefix2: &'static str) -> Result<(MapeLab, SecondCe)> {
        let mut t = MapeLab::build(rule, &[], false, Some(prefix2))?;
        let second = t.second.take().expect("built with a second CE");
        Ok((t, second))
    }

    fn build(
        rule: &Rule,
        ce_extra: &[&str],
        from_config: bool,
        prefix2: Option<&'static str>,
    ) -> Result<MapeLab> {
        let mut lab = Lab::new()?;
        let lan = lab.ns("lan")?;
        let ce = lab.ns("ce")?;
        let br = lab.ns("br")?;
        let internet = lab.ns("inet")?;
        // Link-local addresses that are usable at once: until DAD ends, neighbour discovery
        // cannot send solicitations and the first packets toward the BR would wait or drop.
        for ns in [&ce, &br] {
            ns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
            ns.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
        }
        lab.veth(&lan, "eth0", &ce, "lan0")?;
        lan.ip(&format!("addr add {LAN_HOST}/24 dev eth0"))?;
        lan.ip("route add default via 198.51.100.1")?;
        ce.ip("addr add 198.51.100.1/24 dev lan0")?;
        let ce2 = match prefix2 {
            None => {
                lab.veth(&ce, "wan0", &br, "ce0")?;
                None
            }
            Some(_) => {
                let sw = lab.ns("sw")?;
                let (lan2, ce2) = (lab.ns("lan2")?, lab.ns("ce2")?);
                ce2.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
                ce2.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
                sw.ip("link add sw0 type bridge")?;
                for (ns, dev, port) in [
                    (&ce, "wan0", "p1"),
                    (&br, "ce0", "p0"),
                    (&ce2, "wan0", "p2"),
                ] {
                    lab.veth(ns, dev, &sw, port)?;
                    sw.ip(&format!("link set {port} master sw0"))?;
                }
                sw.ip("link set sw0 up")?;
                lab.veth(&lan2, "eth0", &ce2, "lan0")?;
                lan2.ip(&format!("addr add {LAN_HOST}/24 dev eth0"))?;
                lan2.ip("route add default via 198.51.100.1")?;
                ce2.ip("addr add 198.51.100.1/24 dev lan0")?;
                ce2.ip("addr add 2001:db8:ffff::3/64 dev wan0 nodad")?;
                ce2.ip("-6 route add default via 2001:db8:ffff::1")?;
                Some((lan2, ce2))
            }
        };
        ce.ip("addr add 2001:db8:ffff::2/64 dev wan0 nodad")?;
        if rule.prefix == "auto" {
            // What an RA would give: the CE takes its end-user prefix from here.
            ce.ip(&format!("addr add {AUTO_WAN_ADDR}/64 dev wan0 nodad"))?;
        }
        if ce_extra.contains(&"--prefix-from") {
            // A /64 of a delegated prefix, numbered on the LAN side.
            ce.ip(&format!(
                "addr add {PREFIX_FROM_LAN_ADDR}/64 dev lan0 nodad"
            ))?;
        }
        br.ip("addr add 2001:db8:ffff::1/64 dev ce0 nodad")?;
        ce.ip("-6 route add default via 2001:db8:ffff::1")?;
        br.ip(&format!("-6 route add {} via 2001:db8:ffff::2", rule.ipv6))?;
        lab.veth(&br, "inet0", &internet, "eth0")?;
        br.ip("addr add 192.0.2.1/24 dev inet0")?;
        internet.ip(&format!("addr add {INTERNET_HOST}/24 dev eth0"))?;
        internet.ip(&format!("route add {} via 192.0.2.1", rule.ipv4))?;
        // Resolve the CE's next hop toward the BR before traffic starts.
        ce.run(&["ping", "-6", "-c", "1", "-W", "2", "2001:db8:ffff::1"])?;

        let br_instance = lab.instance("br");
        let rule_arg = format!(
            "{},{},{},{}",
            rule.ipv6, rule.ipv4, rule.ea_len, rule.psid_offset
        );
        let br_args = [
            "mape",
            "br",
            "--v6-dev",
            "ce0",
            "--v4-dev",
            "inet0",
            "--br-addr",
            BR_ADDR,
            "--rule",
            &rule_arg,
        ];
        let spawn = if from_config {
            Lab::spawn_daemon_from_config
        } else {
            Lab::spawn_daemon
        };
        spawn(&mut lab, &br, &br_instance, &br_args)?;
        let ce_instance = lab.instance("ce");
        let (ea, offset) = (rule.ea_len.to_string(), rule.psid_offset.to_string());
        let state_dir = lab.dir().join("state").display().to_string();
        let mut args = vec![
            "mape",
            "ce",
            "--wan",
            "wan0",
            "--lan",
            "lan0",
            "--rule-ipv6",
            rule.ipv6,
            "--rule-ipv4",
            rule.ipv4,
            "--ea-len",
            &ea,
            "--psid-offset",
            &offset,
            "--br",
            BR_ADDR,
            "--prefix",
            rule.prefix,
            "--state-dir",
            &state_dir,
        ];
        args.extend_from_slice(ce_extra);
        spawn(&mut lab, &ce, &ce_instance, &args)?;
        let second = match (ce2, prefix2) {
            (Some((lan2, ce2)), Some(prefix2)) => {
                br.ip(&format!("-6 route add {prefix2} via 2001:db8:ffff::3"))?;
                ce2.run(&["ping", "-6", "-c", "1", "-W", "2", "2001:db8:ffff::1"])?;
                let instance = lab.instance("ce2");
                let state_dir2 = lab.dir().join("state2").display().to_string();
                let mut args2: Vec<&str> = args.clone();
                for (flag, value) in [("--prefix", prefix2), ("--state-dir", state_dir2.as_str())] {
                    if let Some(i) = args2.iter().position(|a| *a == flag) {
                        args2[i + 1] = value;
                    }
                }
                spawn(&mut lab, &ce2, &instance, &args2)?;
                Some(SecondCe {
                    lan: lan2,
                    ce: ce2,
                    instance,
                })
            }
            _ => None,
        };
        Ok(MapeLab {
            lab,
            lan,
            ce,
            br,
            internet,
            ce_instance,
            br_instance,
            ce_args: args.iter().map(|a| a.to_string()).collect(),
            br_args: br_args.iter().map(|a| a.to_string()).collect(),
            from_config,
            second,
        })
    }

    /// SIGKILLs the CE and starts it again with the same command line.
    pub fn kill_and_restart_ce(&mut self) -> Result<()> {
        self.restart_ce(true)
    }

    /// Stops the CE (SIGKILL with `kill`, else SIGTERM: a clean stop that removes its pins)
    /// and starts it again with the same command line.
    pub fn restart_ce(&mut self, kill: bool) -> Result<()> {
        let instance = self.ce_instance.clone();
        let daemon = self
            .lab
            .daemon(&instance)
            .ok_or_else(|| anyhow!("no CE daemon"))?;
        if kill {
            daemon.kill();
        } else {
            daemon.stop();
        }
        let (ce, args) = (self.ce.clone(), self.ce_args.clone());
        self.spawn(&ce, &instance, &args)
    }

    /// SIGKILLs the BR and starts it again with `args` as its command line (pinned programs
    /// and maps keep forwarding in between, as after a crash).
    pub fn restart_br(&mut self, args: Vec<String>) -> Result<()> {
        let instance = self.br_instance.clone();
        self.lab
            .daemon(&instance)
            .ok_or_else(|| anyhow!("no BR daemon"))?
            .kill();
        self.br_args = args;
        let (br, args) = (self.br.clone(), self.br_args.clone());
        self.spawn(&br, &instance, &args)
    }

    /// Starts daemon `instance` in `ns` with `args`, from a TOML file when the lab does.
    fn spawn(&mut self, ns: &Ns, instance: &str, args: &[String]) -> Result<()> {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        if self.from_config {
            self.lab.spawn_daemon_from_config(ns, instance, &args)?;
        } else {
            self.lab.spawn_daemon(ns, instance, &args)?;
        }
        Ok(())
    }

    pub fn ce_stats(&self) -> Result<serde_json::Value> {
        self.lab.ctl_json("stats", &self.ce_instance)
    }

    pub fn br_stats(&self) -> Result<serde_json::Value> {
        self.lab.ctl_json("stats", &self.br_instance)
    }

    /// `nat --json` of the CE.
    pub fn nat(&self) -> Result<Vec<serde_json::Value>> {
        let v = self.lab.ctl_json("nat", &self.ce_instance)?;
        v.as_array()
            .cloned()
            .ok_or_else(|| anyhow!("nat --json is not a list: {v}"))
    }
}

/// One IPv4 packet seen by a [`Capture`]: protocol, source, and its source port (TCP, UDP)
/// or identifier (ICMP echo); None for other ICMP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub proto: u8,
    pub src: Ipv4Addr,
    pub port: Option<u16>,
}

/// Records the frames arriving on an interface of a namespace (AF_PACKET) that `parse`
/// picks, until [`Capture::stop`] (which still reads what has arrived by then): by default
/// every IPv4 packet ([`Seen`]).
pub struct Capture<T = Seen> {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<T>>,
}

impl Capture<Seen> {
    /// Every IPv4 packet arriving on `iface`.
    pub fn start(ns: &Ns, iface: &str) -> Result<Capture<Seen>> {
        Capture::start_with(ns, iface, parse)
    }
}

impl<T: Send + 'static> Capture<T> {
    /// Frames arriving on `iface` for which `parse` says something.
    pub fn start_with(ns: &Ns, iface: &str, parse: fn(&[u8]) -> Option<T>) -> Result<Capture<T>> {
        let iface = std::ffi::CString::new(iface)?;
        let fd = ns.enter(|| -> Result<OwnedFd> {
            // SAFETY: plain socket(2); the fd is owned at once.
            let raw = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW,
                    i32::from((libc::ETH_P_ALL as u16).to_be()),
                )
            };
            if raw < 0 {
                bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
            }
            // SAFETY: raw is a fresh fd.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            // SAFETY: valid C string.
            let index = unsafe { libc::if_nametoindex(iface.as_ptr()) };
            if index == 0 {
                bail!("no interface {iface:?}");
            }
            // SAFETY: zeroed sockaddr_ll is valid; fields set below.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
            sll.sll_ifindex = index as i32;
            // SAFETY: pointer and size of a live sockaddr_ll.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&sll as *const libc::sockaddr_ll).cast(),
                    size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if rc != 0 {
                bail!("binding AF_PACKET: {}", std::io::Error::last_os_error());
            }
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 100_000,
            };
            // SAFETY: pointer and size of a live timeval.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    size_of::<libc::timeval>() as u32,
                )
            };
            Ok(fd)
        })??;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut buf = vec![0u8; 65536];
            loop {
                // SAFETY: zeroed sockaddr_ll; recvfrom fills it.
                let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                let mut len = size_of::<libc::sockaddr_ll>() as u32;
                // SAFETY: buffer and address pointers are live and sized.
                let n = unsafe {
                    libc::recvfrom(
                        fd.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        0,
                        (&mut from as *mut libc::sockaddr_ll).cast(),
                        &mut len,
                    )
                };
                if n <= 0 {
                    // Nothing for 100 ms: done once stopped (what had arrived is read).
                    if flag.load(Ordering::Relaxed) {
                        break;
                    }
                    continue;
                }
                if from.sll_pkttype == libc::PACKET_OUTGOING {
                    continue;
                }
                if let Some(s) = parse(&buf[..n as usize]) {
                    seen.push(s);
                }
            }
            seen
        });
        Ok(Capture { stop, thread })
    }

    pub fn stop(self) -> Result<Vec<T>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow!("capture thread panicked"))
    }
}

fn parse(frame: &[u8]) -> Option<Seen> {
    if frame.len() < 34 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let proto = ip[9];
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let l4 = ip.get(ihl..)?;
    let port = match proto {
        6 | 17 => Some(u16::from_be_bytes([*l4.first()?, *l4.get(1)?])),
        1 if matches!(l4.first(), Some(0 | 8)) => {
            Some(u16::from_be_bytes([*l4.get(4)?, *l4.get(5)?]))
        }
        _ => None,
    };
    Some(Seen { proto, src, port })
}

/// A UDP echo server in `ns` on `addr`, answering until the returned flag is set.
pub fn udp_echo(ns: &Ns, addr: SocketAddrV4) -> Result<Arc<AtomicBool>> {
    let sock = ns.enter(|| std::net::UdpSocket::bind(addr))??;
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while !flag.load(Ordering::Relaxed) {
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                let _ = sock.send_to(&buf[..n], from);
            }
        }
    });
    Ok(stop)
}

/// Sends `msg` from a new UDP socket in `ns` to `to` and waits (bounded) for the echo;
/// returns the socket's local port.
pub fn udp_roundtrip(ns: &Ns, to: SocketAddrV4, msg: &[u8]) -> Result<u16> {
    let sock = ns.enter(|| std::net::UdpSocket::bind("0.0.0.0:0"))??;
    sock.set_read_timeout(Some(Duration::from_secs(3)))?;
    sock.send_to(msg, to)?;
    let mut buf = [0u8; 2048];
    let (n, _) = sock
        .recv_from(&mut buf)
        .with_context(|| format!("no UDP echo from {to}"))?;
    if &buf[..n] != msg {
        bail!("UDP echo from {to} differs");
    }
    Ok(sock.local_addr()?.port())
}
