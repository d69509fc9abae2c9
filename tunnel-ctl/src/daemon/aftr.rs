//! `tunnel-ctl server --bindings FILE` without `--pool`: a pure lwAFTR (SPEC §4a, RFC 7596).
//! No control channel: the server's fast path serves the static softwire table, which
//! `tunnel-ctl softwire add|del` and a reload of the file change in place. The softwire
//! requests are answered here for the full server too ([`softwire_request`]).
//!
//! The slow path (what the fast path hands over): IPv4 fragments and too-big packets toward
//! a softwire's address arrive on the TUN; they are reassembled (only the first fragment
//! names the port), given to the softwire of their port and sent to its B4 as IPv4-in-IPv6,
//! fragmented to fit the tunnel (or answered with ICMP fragmentation-needed when DF is set).
//! A B4's outer IPv6 fragments are reassembled by the kernel and arrive whole on a raw
//! socket (next header 4); they are checked against the table as the fast path checks, and
//! written to the TUN for the kernel to route (and fragment) toward the internet.
use std::{
    collections::HashMap,
    io::IoSliceMut,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV6},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{Arc, Mutex},
    time::Instant,
};

use anyhow::{Context as _, Result, anyhow};
use tokio::io::unix::AsyncFd;
use tracing::{debug, info, warn};
use tun::AsyncDevice;

use crate::{
    config::ServerConfig,
    counters,
    dataplane::{
        bpffs::PinGuard,
        server::{Native, NativeArgs},
    },
    instance::Instance,
    mgmt::{self, Handler, Request, Response, Status, api},
    netlink::Netlink,
    packet,
    server::{
        reassembly::{Reassembly, Step},
        softwire_table,
        softwires::{Refused, Table},
    },
    softwire::{Sent, Softwire},
    tundev,
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
        drop_slowpath_unfragmentable,
        drop_slowpath_send_error,
        drop_tun_write_error,
    }
}

struct Aftr {
    native: Native,
    running: tokio::sync::Mutex<ServerConfig>,
    instance: Instance,
    started: Instant,
    tun: Arc<AsyncDevice>,
    no_hairpin: bool,
    reassembly: Mutex<Reassembly>,
    /// A sending socket per AFTR address, opened when first needed.
    senders: Mutex<HashMap<Ipv6Addr, Arc<Softwire>>>,
    stats: SlowStats,
}

impl Handler for Aftr {
    fn handle(&self, request: Request) -> Response {
        if let Some(r) = softwire_request(&self.native, &request) {
            return r;
        }
        match request {
            Request::Status => {
                let running = self.running.try_lock().ok();
                Status::Aftr(api::AftrStatus {
                    process: api::Process::now(&self.instance, self.started),
                    tunnel_addr: self.native.tunnel_addr,
                    v6_dev: self.native.v6_dev.clone(),
                    v4_dev: self.native.v4_dev.clone(),
                    inner_mtu: self.native.inner_mtu,
                    bindings: running.as_ref().and_then(|r| r.bindings.clone()),
                    softwires: self.native.softwires().table().len(),
                    hairpin: running.as_ref().is_none_or(|r| !r.no_hairpin),
                })
                .into()
            }
            Request::Stats => {
                mgmt::counters_response(self.stats.snapshot(), Some(self.native.counters()))
            }
            other => mgmt::not_supported("pure lwAFTR (server without --pool)", &other),
        }
    }
}

/// Answers `softwire add|del|list` from `native`'s table; None for other requests.
pub fn softwire_request(native: &Native, request: &Request) -> Option<Response> {
    let changed = |line: String| {
        info!("{line}");
        Response::Ok(api::Reply::Changed(vec![line]))
    };
    Some(match request {
        Request::SoftwireAdd { softwire } => {
            let result = native.softwires().add(*softwire);
            match result {
                Ok(()) => changed(format!("softwire added: {softwire}")),
                Err(e) => Response::Error(format!("{e:#}")),
            }
        }
        Request::SoftwireDel { ipv4, psid } => {
            let result = native.softwires().del((*ipv4, *psid));
            match result {
                Ok(sw) => changed(format!("softwire removed: {sw}")),
                Err(e) => Response::Error(format!("{e:#}")),
            }
        }
        Request::SoftwireList => {
            let softwires = native.softwires();
            let rows = softwires
                .table()
                .iter()
                .map(|sw| api::SoftwireRow {
                    ipv4: sw.ipv4,
                    psid: sw.psid,
                    psid_len: sw.psid_len,
                    psid_offset: sw.psid_offset,
                    b4: sw.b4,
                    aftr: sw.aftr.unwrap_or(native.tunnel_addr),
                    port_count: sw.port_count(),
                })
                .collect();
            Response::Ok(api::Reply::Softwires(rows))
        }
        _ => return None,
    })
}

/// Applies the softwire table of a reloaded configuration: the report lines.
pub fn reload_softwires(native: &Native, table: Table) -> Result<Vec<String>, String> {
    let diff = native
        .softwires()
        .apply(table)
        .map_err(|e| format!("{e:#}"))?;
    let mut lines: Vec<String> = diff
        .remove
        .iter()
        .map(|sw| format!("softwire removed: {sw}"))
        .collect();
    lines.extend(
        diff.write
            .iter()
            .map(|sw| format!("softwire written: {sw}")),
    );
    Ok(lines)
}

impl Aftr {
    fn sender(&self, aftr: Ipv6Addr) -> Result<Arc<Softwire>> {
        let mut senders = self.senders.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = senders.get(&aftr) {
            return Ok(s.clone());
        }
        let s = Arc::new(Softwire::open(aftr)?);
        senders.insert(aftr, s.clone());
        Ok(s)
    }

    /// An IPv4 packet from the TUN: a fragment or too-big packet toward a softwire.
    async fn toward_b4(&self, pkt: &[u8]) {
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
        self.send_to_softwire(dst, &whole).await;
    }

    /// Sends the whole IPv4 packet `pkt` (to `dst`) to the B4 of the softwire its port
    /// belongs to, fragmented to fit the tunnel.
    async fn send_to_softwire(&self, dst: Ipv4Addr, pkt: &[u8]) {
        let stats = &self.stats;
        let endpoints = {
            let softwires = self.native.softwires();
            softwires
                .table()
                .holder(dst, packet::port_toward(pkt))
                .map(|sw| (sw.aftr.unwrap_or(self.native.tunnel_addr), sw.b4))
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
        match sender.send_fitted(b4, pkt, self.native.inner_mtu, dst) {
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
    async fn take_from_b4(&self, b4: Ipv6Addr, to: Ipv6Addr, inner: &[u8]) {
        let stats = &self.stats;
        let Some((IpAddr::V4(src), IpAddr::V4(dst))) = packet::addrs(inner) else {
            return stats.slowpath_drop_unbound_source.inc();
        };
        let (verdict, hairpin) = {
            let softwires = self.native.softwires();
            let table = softwires.table();
            let verdict = table
                .check_from_b4(b4, src, packet::port_from(inner))
                .and_then(|sw| {
                    if sw.aftr.unwrap_or(self.native.tunnel_addr) == to {
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
            stats.slowpath_hairpinned.inc();
            return self.send_to_softwire(dst, inner).await;
        }
        match self.tun.send(inner).await {
            Ok(_) => stats.slowpath_from_b4.inc(),
            Err(_) => stats.drop_tun_write_error.inc(),
        }
    }

    async fn reload(&self, new: ServerConfig) -> Result<Vec<String>, String> {
        let mut running = self.running.lock().await;
        if !new.pool.is_empty() {
            return Err(
                "--pool: a pure lwAFTR becomes a server with a pool only by a restart".into(),
            );
        }
        let table = softwire_table(&new).map_err(|e| format!("{e:#}"))?;
        let mut changes = super::restart_only(&[
            ("v6-dev", &running.v6_dev, &new.v6_dev),
            ("v4-dev", &running.v4_dev, &new.v4_dev),
            ("tunnel-addr", &running.tunnel_addr, &new.tunnel_addr),
            ("no-hairpin", &running.no_hairpin, &new.no_hairpin),
            ("max-bindings", &running.max_bindings, &new.max_bindings),
            ("metrics", &running.metrics, &new.metrics),
        ]);
        changes.extend(reload_softwires(&self.native, table)?);
        running.bindings = new.bindings;
        if changes.is_empty() {
            changes.push("nothing changed".into());
        }
        for c in &changes {
            info!("reload: {c}");
        }
        Ok(changes)
    }
}

/// Runs the pure lwAFTR with `args` (no `--pool`); `source` re-reads it for a reload.
pub async fn run(args: ServerConfig, source: super::Source<ServerConfig>) -> Result<()> {
    let instance = args.instance.clone();
    super::claim(&instance)?;
    let (Some(v6_dev), Some(v4_dev)) = (&args.v6_dev, &args.v4_dev) else {
        return Err(crate::usage::usage(
            "a server without --pool is a pure lwAFTR: it needs --bindings, --v6-dev, \
             --v4-dev and --tunnel-addr",
        ));
    };
    let Some(tunnel_addr) = args.tunnel_addr else {
        return Err(crate::usage::usage(
            "a pure lwAFTR (no --pool) needs --tunnel-addr: the IPv6 address B4s send \
             IPv4-in-IPv6 to",
        ));
    };
    let table = softwire_table(&args)?;
    let nl = Netlink::connect()?;
    crate::tundev::ensure_ipv4_forwarding("B4s' traffic is routed through this host")?;
    // The slow path's door: what the fast path hands over arrives here, and what the kernel
    // is to route toward the internet is written here.
    let tun = tundev::create(&args.tun)?;
    let tun_index = nl.index(&args.tun).await?;
    nl.up(tun_index, tundev::TUN_MTU).await?;
    let receiver = ipip_receiver().context("the slow path's raw socket for B4s' packets")?;
    let pin_dir = instance.pin_dir();
    let _pins = PinGuard(Some(pin_dir.clone()));
    let native = Native::start(
        &nl,
        NativeArgs {
            v6_dev,
            v4_dev,
            tunnel_addr,
            tun_index,
            pin_dir,
            policy_icmp: args.policy_icmp,
            max_bindings: args.max_bindings,
            softwires: table,
            no_hairpin: args.no_hairpin,
            softwire_slow_path: true,
        },
    )
    .await
    .context("starting the lwAFTR fast path")?;
    // Native clients never bind here (no control channel): bindings an earlier run with a
    // pool pinned must not keep forwarding.
    if let Err(e) = native.reconcile(&[]) {
        warn!("removing pinned native bindings: {e:#}");
    }
    let aftr = Arc::new(Aftr {
        native,
        running: tokio::sync::Mutex::new(args.clone()),
        instance: instance.clone(),
        started: Instant::now(),
        tun,
        no_hairpin: args.no_hairpin,
        reassembly: Mutex::new(Reassembly::default()),
        senders: Mutex::new(HashMap::new()),
        stats: SlowStats::default(),
    });
    let reload = super::reloader(source, aftr.clone(), |aftr, cfg| {
        Box::pin(async move { aftr.reload(cfg?).await })
    });
    let daemon = super::Daemon::start(&instance, aftr.clone(), args.metrics)
        .await?
        .with_reload(reload);
    info!(
        "lwAFTR {tunnel_addr} on {v6_dev} (B4s) and {v4_dev} (IPv4): {} softwires{}",
        aftr.native.softwires().table().len(),
        if args.no_hairpin {
            ", no hairpinning"
        } else {
            ""
        }
    );
    let slow_path = async {
        tokio::join!(tun_reader(aftr.clone()), b4_reader(aftr.clone(), receiver));
    };
    daemon.run(slow_path, "stopping").await;
    Ok(())
}

/// IPv4 packets the fast path handed to the TUN (the kernel's own chatter on it, IPv6
/// router solicitations and the like, is not ours).
async fn tun_reader(aftr: Arc<Aftr>) {
    let mut buf = vec![0u8; 65536];
    loop {
        let n = tundev::recv(&aftr.tun, &mut buf).await;
        if buf.first().is_some_and(|b| b >> 4 == 4) {
            aftr.toward_b4(&buf[..n]).await;
        }
    }
}

/// Whole IPv4-in-IPv6 packets the kernel reassembled for us.
async fn b4_reader(aftr: Arc<Aftr>, receiver: AsyncFd<OwnedFd>) {
    let mut buf = vec![0u8; 65536];
    loop {
        let mut ready = match receiver.readable().await {
            Ok(r) => r,
            Err(e) => {
                warn!("slow path raw socket: {e}");
                return;
            }
        };
        match ready.try_io(|fd| recv_from_b4(fd.get_ref(), &mut buf)) {
            Ok(Ok((n, b4, to))) => aftr.take_from_b4(b4, to, &buf[..n]).await,
            Ok(Err(e)) => warn!("slow path raw socket: {e}"),
            Err(_would_block) => {}
        }
    }
}

/// A raw IPv6 socket for next header 4 that receives what the kernel delivers locally (the
/// fast path takes everything else), with each packet's destination (IPV6_PKTINFO).
fn ipip_receiver() -> Result<AsyncFd<OwnedFd>> {
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
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
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
