//! The client's native mode: eBPF on `--v6-dev` wraps the lease's IPv4 in IPv6 to the server
//! and unwraps the server's packets (see `tunnel-ebpf/src/client.rs` for the packet side).
//!
//! How IPv4 reaches the egress program without any ARP: the lease goes on the IPv6 interface
//! as a /32; 0.0.0.0/1 and 128.0.0.0/1 are routed via 192.0.0.1 (RFC 7335's address for the
//! far end of an IPv4-in-IPv6 softwire) "onlink" on that interface, with the path MTU of the
//! tunnel; 192.0.0.1 gets a permanent neighbour entry with the interface's own MAC. The kernel
//! thus builds ordinary Ethernet + IPv4 frames, the program encapsulates them and the IPv6
//! FIB (or the kernel's neighbour output) supplies the real next hop.
//!
//! A shared lease (the 106 names a port set) swaps the client programs for the lwB4's
//! ([`crate::client::lwb4`]): the host then has 192.0.0.2 on the interface instead of the
//! lease, and the NAPT translates its traffic into the port set.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    sync::Mutex,
};

use anyhow::{Context as _, Result};
use aya::Ebpf;
use ipnet::Ipv4Net;
use tracing::{info, warn};
use tunnel_common::{
    fastpath::{DEFAULT_HOP_LIMIT, TCP_IPV4_OVERHEAD, TunnelConfig},
    names::{PROG_CE_IN, PROG_CLIENT_DECAP, PROG_CLIENT_ENCAP, PROG_LWB4_OUT},
};

use crate::{
    client::lwb4::{self, B4_ADDR, Lwb4},
    dataplane::{
        self, bpffs,
        fastpath::{Maps, v4_key},
        stats::Counters,
        tc::{self, Direction},
    },
    netlink::Netlink,
    protocol::text::NativeGrant,
};

/// The softwire's IPv4 next hop (RFC 7335, 192.0.0.0/29 "IPv4 Service Continuity Prefix").
pub const SOFTWIRE_NEXT_HOP: Ipv4Addr = Ipv4Addr::new(192, 0, 0, 1);
const HALVES: [&str; 2] = ["0.0.0.0/1", "128.0.0.0/1"];

/// What is configured now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Applied {
    pub lease: Ipv4Addr,
    pub local: Ipv6Addr,
    pub grant: NativeGrant,
}

pub struct NativePath {
    pub v6_dev: String,
    v6_index: u32,
    mac: Vec<u8>,
    ebpf: Mutex<Ebpf>,
    maps: Mutex<Maps>,
    pin_dir: PathBuf,
    applied: Mutex<Option<Applied>>,
    routes: bool,
    /// The lwB4's slow-path TUN name (`--tun`).
    tun: String,
    /// `--lan`: an lwB4 forwards (and NAPTs) its IPv4 hosts.
    forward_lan: bool,
    /// On a shared lease: the lwB4 in place of the client programs.
    lwb4: tokio::sync::Mutex<Option<Lwb4>>,
    nexthops: dataplane::nexthop::NextHopTask,
}

/// The client programs' attachments.
const CLIENT_PROGRAMS: [(&str, Direction); 2] = [
    (PROG_CLIENT_ENCAP, Direction::Egress),
    (PROG_CLIENT_DECAP, Direction::Ingress),
];
/// The lwB4's.
const LWB4_PROGRAMS: [&str; 2] = [PROG_LWB4_OUT, PROG_CE_IN];

impl Applied {
    /// The host's IPv4 address on the interface: the lease, or behind an lwB4's NAPT
    /// 192.0.0.2.
    fn host_addr(&self) -> Ipv4Addr {
        match self.grant.share {
            Some(_) => B4_ADDR,
            None => self.lease,
        }
    }
}

impl NativePath {
    /// Loads the programs (re-adopting pinned maps and links of an earlier run, whose
    /// configuration keeps forwarding until the new session confirms or changes it).
    pub async fn start(
        nl: &Netlink,
        v6_dev: &str,
        pin_dir: PathBuf,
        routes: bool,
        tun: &str,
        forward_lan: bool,
    ) -> Result<NativePath> {
        let v6_index = nl
            .index(v6_dev)
            .await
            .with_context(|| format!("--v6-dev {v6_dev}"))?;
        let (_, mac) = nl.mtu_and_mac(v6_index).await?;
        if mac.len() != 6 {
            anyhow::bail!("--v6-dev {v6_dev} is not an Ethernet interface");
        }
        // The lwB4 (a shared lease) uses the NAPT maps; the server's are not needed.
        let mut ebpf = dataplane::load_without(&pin_dir, &[dataplane::SERVER_MAPS])?;
        let maps = Maps::take(&mut ebpf)?;
        // An earlier run's lwB4 comes back with its session's 106, if the lease is shared
        // still; until then the client programs forward for a whole lease.
        unpin_links(&pin_dir, &LWB4_PROGRAMS, v6_dev);
        for (program, direction) in CLIENT_PROGRAMS {
            tc::attach_pinned(&mut ebpf, program, v6_dev, direction, &pin_dir)?;
        }
        let nexthops = dataplane::nexthop::start(&mut ebpf, &pin_dir)?;
        Ok(NativePath {
            nexthops,
            v6_dev: v6_dev.to_owned(),
            v6_index,
            mac,
            ebpf: Mutex::new(ebpf),
            maps: Mutex::new(maps),
            pin_dir,
            applied: Mutex::new(None),
            routes,
            tun: tun.to_owned(),
            forward_lan,
            lwb4: tokio::sync::Mutex::new(None),
        })
    }

    /// The lwB4 running now (a shared lease), for its NAPT table and counters.
    pub fn lwb4(&self) -> Option<std::sync::Arc<crate::daemon::ce::Napt>> {
        self.lwb4
            .try_lock()
            .ok()
            .and_then(|l| l.as_ref().map(|l| l.napt.clone()))
    }

    /// Puts the programs for `want` in place: the lwB4 for a shared lease (restarted when
    /// the lease or its port set changed), the client programs for a whole one.
    async fn programs(&self, nl: &Netlink, want: Applied) -> Result<()> {
        let mut lwb4 = self.lwb4.lock().await;
        if let Some(old) = lwb4.take() {
            old.stop().await;
            unpin_links(&self.pin_dir, &LWB4_PROGRAMS, &self.v6_dev);
        }
        match want.grant.share {
            Some(share) => {
                if self.forward_lan {
                    crate::tundev::ensure_ipv4_forwarding(
                        "the LAN (--lan) is NAPTed into the shared lease's port set",
                    )?;
                }
                unpin_links(
                    &self.pin_dir,
                    &CLIENT_PROGRAMS.map(|(p, _)| p),
                    &self.v6_dev,
                );
                let at = lwb4::Place {
                    v6_dev: &self.v6_dev,
                    v6_index: self.v6_index,
                    pin_dir: &self.pin_dir,
                    tun: &self.tun,
                };
                *lwb4 = Some(Lwb4::start(nl, at, want.lease, want.local, want.grant, share).await?);
            }
            None => {
                let mut ebpf = self.ebpf.lock().unwrap_or_else(|p| p.into_inner());
                for (program, direction) in CLIENT_PROGRAMS {
                    tc::attach_pinned(&mut ebpf, program, &self.v6_dev, direction, &self.pin_dir)?;
                }
            }
        }
        Ok(())
    }

    pub fn applied(&self) -> Option<Applied> {
        *self.applied.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Configures the data path for `want`; nothing changes when it is already in place (a
    /// reconnect that got the same lease), so forwarding never stops for it.
    pub async fn apply(&self, nl: &Netlink, want: Applied) -> Result<()> {
        // The server announces what fits its own IPv6 link; ours may carry less (a server on
        // a 1540-byte link announces 1500 to clients on 1500-byte links too).
        let announced = want.grant.mtu;
        let own = nl
            .inner_mtu(self.v6_index, &format!("--v6-dev {}", self.v6_dev))
            .await?;
        let want = Applied {
            grant: NativeGrant {
                mtu: announced.min(own),
                ..want.grant
            },
            ..want
        };
        let mtu = want.grant.mtu;
        let old = self.applied();
        if old == Some(want) {
            return Ok(());
        }
        if mtu < announced {
            info!(
                "the server announced inner MTU {announced}; {} carries only {mtu} inside IPv6",
                self.v6_dev
            );
        }
        if want.grant.share.is_some() || old.is_some_and(|o| o.grant.share.is_some()) {
            self.programs(nl, want).await?;
        }
        if want.grant.share.is_none() {
            self.maps
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .set_config(&TunnelConfig {
                    local: want.local.octets(),
                    remote: want.grant.tunnel.octets(),
                    ipv4: v4_key(want.lease),
                    v6_ifindex: self.v6_index,
                    inner_mtu: mtu,
                    mss: mtu.saturating_sub(TCP_IPV4_OVERHEAD),
                    hop_limit: DEFAULT_HOP_LIMIT,
                    enabled: 1,
                    ..Default::default()
                })?;
        }
        if let Some(old) = old
            && old.host_addr() != want.host_addr()
        {
            nl.del_address(self.v6_index, IpAddr::V4(old.host_addr()))
                .await?;
        }
        nl.add_address(self.v6_index, IpAddr::V4(want.host_addr()), 32)
            .await?;
        nl.permanent_neighbour(self.v6_index, IpAddr::V4(SOFTWIRE_NEXT_HOP), &self.mac)
            .await?;
        if self.routes {
            for net in HALVES {
                nl.route_v4_onlink(
                    net.parse::<Ipv4Net>().expect("valid"),
                    SOFTWIRE_NEXT_HOP,
                    self.v6_index,
                    u32::from(mtu),
                )
                .await?;
            }
        }
        info!(
            "native path on {}: {} ↔ {} as {}{} (inner MTU {})",
            self.v6_dev,
            want.local,
            want.grant.tunnel,
            want.lease,
            want.grant
                .share
                .map(|s| format!(" {s}"))
                .unwrap_or_default(),
            mtu
        );
        *self.applied.lock().unwrap_or_else(|p| p.into_inner()) = Some(want);
        Ok(())
    }

    pub fn counters(&self) -> Result<Counters> {
        let ebpf = self.ebpf.lock().unwrap_or_else(|p| p.into_inner());
        Ok(self.nexthops.with_counters(dataplane::stats::read(&ebpf)?))
    }

    /// Clean shutdown: routes and address off the interface, programs detached, pins gone.
    pub async fn teardown(&self, nl: &Netlink) {
        if let Some(lwb4) = self.lwb4.lock().await.take() {
            lwb4.stop().await;
        }
        if let Some(a) = self.applied() {
            if self.routes {
                for net in HALVES {
                    let _ = nl
                        .del_route(net.parse::<ipnet::Ipv4Net>().expect("valid"), self.v6_index)
                        .await;
                }
            }
            if let Err(e) = nl
                .del_address(self.v6_index, IpAddr::V4(a.host_addr()))
                .await
            {
                warn!("removing {} from {}: {e:#}", a.host_addr(), self.v6_dev);
            }
        }
        if let Err(e) = bpffs::remove_pins(&self.pin_dir) {
            warn!("removing pins: {e:#}");
        }
    }
}

/// Detaches `programs` from `iface` by removing their link pins (the pins hold the links).
fn unpin_links(pin_dir: &std::path::Path, programs: &[&str], iface: &str) {
    for program in programs {
        let pin = pin_dir.join(tc::link_pin_name(program, iface));
        match std::fs::remove_file(&pin) {
            Ok(()) => info!("detached {program} from {iface}"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!("removing {}: {e}", pin.display()),
        }
    }
}
