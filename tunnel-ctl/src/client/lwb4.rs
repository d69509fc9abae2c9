//! The lwB4 (RFC 7596): a native client whose lease is shared (`psid=P/K offset=A` in the
//! 101 and the 106). The host's own IPv4 leaves from 192.0.0.2 (RFC 6333's B4 address) and,
//! with forwarding on, its LAN's too; `lwb4_out` on the IPv6 interface's egress NAPTs both
//! into the lease's port set and wraps them to the server, `ce_in` on its ingress unwraps and
//! translates back: the MAP-E CE's eBPF code and its slow path ([`Napt`]), here fed by the
//! lease instead of a MAP rule.
use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
    sync::Arc,
};

use anyhow::{Context as _, Result};
use tracing::info;
use tunnel_common::fastpath::{DEFAULT_HOP_LIMIT, TCP_IPV4_OVERHEAD, TunnelConfig};

use crate::{
    config::NatTimeouts,
    daemon::ce::Napt,
    dataplane::{
        ce::{CeDataplane, CeDevices},
        fastpath::v4_key,
    },
    mape::{rule::port_set, table::Table},
    netlink::Netlink,
    protocol::text::{NativeGrant, Share},
    softwire::Softwire,
    tundev,
};

/// The host's IPv4 address behind the NAPT (RFC 6333 §5.7: the B4 element's address).
pub const B4_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 0, 2);

/// A running lwB4: its NAPT and the task of its slow path.
pub struct Lwb4 {
    pub napt: Arc<Napt>,
    task: tokio::task::JoinHandle<()>,
}

/// Where the lwB4 runs.
pub struct Place<'a> {
    pub v6_dev: &'a str,
    pub v6_index: u32,
    pub pin_dir: &'a Path,
    /// The slow path's TUN.
    pub tun: &'a str,
}

impl Lwb4 {
    /// Loads `lwb4_out` and `ce_in` on the interface, creates the slow path's TUN and starts
    /// it, for `lease` shared as `share`, tunnelled from `local` as `grant` says.
    pub async fn start(
        nl: &Netlink,
        at: Place<'_>,
        lease: Ipv4Addr,
        local: Ipv6Addr,
        grant: NativeGrant,
        share: Share,
    ) -> Result<Lwb4> {
        let (ranges, port_count) = port_set(share.offset, share.psid_len, share.psid);
        let tun = tundev::create(at.tun).with_context(|| format!("the lwB4's TUN {}", at.tun))?;
        let tun_index = nl.index(at.tun).await?;
        nl.up(tun_index, u32::from(grant.mtu)).await?;
        let config = TunnelConfig {
            local: local.octets(),
            remote: grant.tunnel.octets(),
            ipv4: v4_key(lease),
            v6_ifindex: at.v6_index,
            tun_ifindex: tun_index,
            inner_mtu: grant.mtu,
            mss: grant.mtu.saturating_sub(TCP_IPV4_OVERHEAD),
            hop_limit: DEFAULT_HOP_LIMIT,
            enabled: 1,
            ..Default::default()
        };
        let (dataplane, adopted) = CeDataplane::start(
            at.pin_dir,
            &config,
            Table::new(&ranges, false),
            CeDevices::Lwb4 { v6: at.v6_dev },
            &[],
            crate::daemon::ce::mono_ns(),
        )?;
        if adopted.pinned > 0 {
            info!(
                "took back {} NAPT mappings of an earlier run",
                adopted.pinned
            );
        }
        let napt = Arc::new(Napt::new(
            lease,
            (share.psid, share.psid_len),
            grant.tunnel,
            grant.mtu,
            NatTimeouts::default(),
            dataplane,
            tun,
            Softwire::open(local)?,
            None,
            false,
        ));
        let task = tokio::spawn(napt.clone().run());
        info!(
            "lwB4 on {}: {B4_ADDR} (and forwarded IPv4) NAPTed to {lease} {share}, {port_count} \
             ports in {} blocks; slow path on {}",
            at.v6_dev,
            ranges.len(),
            at.tun
        );
        Ok(Lwb4 { napt, task })
    }

    /// Stops the slow path; its TUN goes with the last reference.
    pub async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}
