//! The client's native mode: eBPF on `--v6-dev` wraps the lease's IPv4 in IPv6 to the server
//! and unwraps the server's packets (see `tunnel-ebpf/src/client.rs` for the packet side).
//!
//! How IPv4 reaches the egress program without any ARP: the lease goes on the IPv6 interface
//! as a /32; 0.0.0.0/1 and 128.0.0.0/1 are routed via 192.0.0.1 (RFC 7335's address for the
//! far end of an IPv4-in-IPv6 softwire) "onlink" on that interface, with the path MTU of the
//! tunnel; 192.0.0.1 gets a permanent neighbour entry with the interface's own MAC. The kernel
//! thus builds ordinary Ethernet + IPv4 frames, the program encapsulates them and the IPv6
//! FIB (or the kernel's neighbour output) supplies the real next hop.
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
    names::{PROG_CLIENT_DECAP, PROG_CLIENT_ENCAP},
};

use crate::{
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
}

impl NativePath {
    /// Loads the programs (re-adopting pinned maps and links of an earlier run, whose
    /// configuration keeps forwarding until the new session confirms or changes it).
    pub async fn start(
        nl: &Netlink,
        v6_dev: &str,
        pin_dir: PathBuf,
        routes: bool,
    ) -> Result<NativePath> {
        let v6_index = nl
            .index(v6_dev)
            .await
            .with_context(|| format!("--v6-dev {v6_dev}"))?;
        let (_, mac) = nl.mtu_and_mac(v6_index).await?;
        if mac.len() != 6 {
            anyhow::bail!("--v6-dev {v6_dev} is not an Ethernet interface");
        }
        let mut ebpf = dataplane::load(&pin_dir)?;
        let maps = Maps::take(&mut ebpf)?;
        tc::attach_pinned(
            &mut ebpf,
            PROG_CLIENT_ENCAP,
            v6_dev,
            Direction::Egress,
            &pin_dir,
        )?;
        tc::attach_pinned(
            &mut ebpf,
            PROG_CLIENT_DECAP,
            v6_dev,
            Direction::Ingress,
            &pin_dir,
        )?;
        Ok(NativePath {
            v6_dev: v6_dev.to_owned(),
            v6_index,
            mac,
            ebpf: Mutex::new(ebpf),
            maps: Mutex::new(maps),
            pin_dir,
            applied: Mutex::new(None),
            routes,
        })
    }

    pub fn applied(&self) -> Option<Applied> {
        *self.applied.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Configures the data path for `want`; nothing changes when it is already in place (a
    /// reconnect that got the same lease), so forwarding never stops for it.
    pub async fn apply(&self, nl: &Netlink, want: Applied) -> Result<()> {
        let old = self.applied();
        if old == Some(want) {
            return Ok(());
        }
        self.maps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set_config(&TunnelConfig {
                local: want.local.octets(),
                remote: want.grant.tunnel.octets(),
                ipv4: v4_key(want.lease),
                v6_ifindex: self.v6_index,
                inner_mtu: want.grant.mtu,
                mss: want.grant.mtu.saturating_sub(TCP_IPV4_OVERHEAD),
                hop_limit: DEFAULT_HOP_LIMIT,
                enabled: 1,
                ..Default::default()
            })?;
        if let Some(old) = old
            && old.lease != want.lease
        {
            nl.del_address(self.v6_index, IpAddr::V4(old.lease)).await?;
        }
        nl.add_address(self.v6_index, IpAddr::V4(want.lease), 32)
            .await?;
        nl.permanent_neighbour(self.v6_index, IpAddr::V4(SOFTWIRE_NEXT_HOP), &self.mac)
            .await?;
        if self.routes {
            for net in HALVES {
                nl.route_v4_onlink(
                    net.parse::<Ipv4Net>().expect("valid"),
                    SOFTWIRE_NEXT_HOP,
                    self.v6_index,
                    u32::from(want.grant.mtu),
                )
                .await?;
            }
        }
        info!(
            "native path on {}: {} ↔ {} as {} (inner MTU {})",
            self.v6_dev, want.local, want.grant.tunnel, want.lease, want.grant.mtu
        );
        *self.applied.lock().unwrap_or_else(|p| p.into_inner()) = Some(want);
        Ok(())
    }

    pub fn counters(&self) -> Result<Counters> {
        dataplane::stats::read(&self.ebpf.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Clean shutdown: routes and address off the interface, programs detached, pins gone.
    pub async fn teardown(&self, nl: &Netlink) {
        if let Some(a) = self.applied() {
            if self.routes {
                for net in HALVES {
                    let _ = nl
                        .del_route(net.parse::<ipnet::Ipv4Net>().expect("valid"), self.v6_index)
                        .await;
                }
            }
            if let Err(e) = nl.del_address(self.v6_index, IpAddr::V4(a.lease)).await {
                warn!("removing {} from {}: {e:#}", a.lease, self.v6_dev);
            }
        }
        if let Err(e) = bpffs::remove_pins(&self.pin_dir) {
            warn!("removing pins: {e:#}");
        }
    }
}
