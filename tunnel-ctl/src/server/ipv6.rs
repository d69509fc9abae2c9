//! IPv6 for clients on the server side (SPEC §7, seeds 000-002): the TUN's IPv6 setup, the
//! 108 answer, and how leased addresses are made reachable from upstream: a route for the
//! pool (routed mode), or per-lease proxy NDP entries and host routes when the pool sits in
//! a prefix that is on-link upstream (`--proxy-ndp`).
use std::net::{IpAddr, Ipv6Addr};

use anyhow::{Context as _, Result};
use ipnet::Ipv6Net;
use tracing::{info, warn};

use super::{inbound::AllowIn, state::Units6};
use crate::{config::ServerConfig, dns, netlink::Netlink, pool6::Pool6, tundev};

/// The server's address on the TUN, announced as the clients' IPv6 gateway.
pub const GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// Proxy NDP on the upstream interface.
pub struct ProxyNdp {
    pub dev: String,
    index: u32,
}

/// What the server needs to serve 107.
pub struct Ipv6Service {
    pub dns: Vec<Ipv6Addr>,
    pub allow_in: Vec<AllowIn>,
    pub proxy: Option<ProxyNdp>,
    nl: Netlink,
    tun_index: u32,
    /// Serializes [`Ipv6Service::sync`].
    sync: tokio::sync::Mutex<()>,
}

/// The IPv6 pools of the command line (None, None without --pool6/--delegate).
pub fn pools(args: &ServerConfig) -> Result<(Option<Pool6>, Option<Pool6>)> {
    let pool6 = args
        .pool6
        .map(|p| Pool6::new(p, 128).map_err(|e| anyhow::anyhow!("--pool6: {e}")))
        .transpose()?;
    let delegate = args
        .delegate
        .map(|p| {
            Pool6::new(p, args.delegate_len)
                .map_err(|e| anyhow::anyhow!("--delegate/--delegate-len: {e}"))
        })
        .transpose()?;
    if let (Some(a), Some(d)) = (&pool6, &delegate)
        && (a.prefix().contains(&d.prefix()) || d.prefix().contains(&a.prefix()))
    {
        anyhow::bail!(
            "--pool6 {} and --delegate {} overlap: give them separate prefixes",
            a.prefix(),
            d.prefix()
        );
    }
    Ok((pool6, delegate))
}

impl Ipv6Service {
    /// Sets up the TUN's IPv6 side: the gateway address, routes for the pools (not for a
    /// proxied pool: its leases get host routes), forwarding, proxy NDP.
    pub async fn start(
        nl: &Netlink,
        args: &ServerConfig,
        tun_index: u32,
        pool6: Option<&Pool6>,
        delegate: Option<&Pool6>,
    ) -> Result<Ipv6Service> {
        nl.add_address(tun_index, IpAddr::V6(GATEWAY6), 64).await?;
        if args.proxy_ndp.is_none()
            && let Some(p) = pool6
        {
            nl.route(p.prefix(), tun_index).await?;
        }
        if let Some(d) = delegate {
            nl.route(d.prefix(), tun_index).await?;
        }
        tundev::ensure_ipv6_forwarding(
            "clients' IPv6 is routed through this host; interfaces with accept_ra=1 stop \
             autoconfiguring, set accept_ra=2 where that matters",
        )?;
        let proxy = match &args.proxy_ndp {
            Some(dev) => {
                let index = nl.index(dev).await?;
                let path = format!("/proc/sys/net/ipv6/conf/{dev}/proxy_ndp");
                std::fs::write(&path, "1").with_context(|| format!("enabling {path}"))?;
                let proxy = ProxyNdp {
                    dev: dev.clone(),
                    index,
                };
                let pool = pool6.expect("clap: --proxy-ndp requires --pool6").prefix();
                let stale = proxy_entries_in(nl, &proxy, pool).await?;
                for addr in &stale {
                    nl.del_proxy_ndp(index, *addr).await?;
                }
                if !stale.is_empty() {
                    info!(
                        "removed {} proxy NDP entries on {dev} left by an earlier run",
                        stale.len()
                    );
                }
                Some(proxy)
            }
            None => None,
        };
        let dns = if args.dns6.is_empty() {
            dns::system_nameservers::<Ipv6Addr>()
                .into_iter()
                .filter(|a| dns::usable(IpAddr::V6(*a)))
                .collect()
        } else {
            args.dns6.clone()
        };
        Ok(Ipv6Service {
            dns,
            allow_in: args.allow_in.clone(),
            proxy,
            nl: nl.clone(),
            tun_index,
            sync: tokio::sync::Mutex::new(()),
        })
    }

    /// Makes the kernel agree with the lease table on `units`: in proxy mode a leased address
    /// has an NDP entry and a host route, an address no longer leased has neither (from then
    /// on the upstream's neighbour solicitations for it go unanswered). Called after a grant
    /// and after a release. One call at a time, and `leased` is asked under that turn: when a
    /// unit released by one session is granted at once to another, the first session's
    /// removal can then never land after the second one's addition.
    pub async fn sync(&self, units: &Units6, leased: impl Fn(Ipv6Net) -> bool) -> Result<()> {
        let (Some(proxy), Some(addr)) = (&self.proxy, units.addr) else {
            return Ok(());
        };
        let _turn = self.sync.lock().await;
        if leased(addr) {
            self.nl.route(addr, self.tun_index).await?;
            self.nl.add_proxy_ndp(proxy.index, addr.addr()).await?;
        } else {
            let proxy_entry = self.nl.del_proxy_ndp(proxy.index, addr.addr()).await;
            let route = self.nl.del_route(addr, self.tun_index).await;
            proxy_entry.and(route)?;
        }
        Ok(())
    }

    /// Removes every proxy NDP entry of the pool (a clean shutdown).
    pub async fn shutdown(&self, pool: Option<Ipv6Net>) {
        if let (Some(proxy), Some(pool)) = (&self.proxy, pool) {
            match proxy_entries_in(&self.nl, proxy, pool).await {
                Ok(entries) => {
                    for addr in entries {
                        let _ = self.nl.del_proxy_ndp(proxy.index, addr).await;
                    }
                }
                Err(e) => warn!("listing proxy NDP entries on {}: {e:#}", proxy.dev),
            }
        }
    }
}

async fn proxy_entries_in(nl: &Netlink, proxy: &ProxyNdp, pool: Ipv6Net) -> Result<Vec<Ipv6Addr>> {
    Ok(nl
        .proxy_ndp_entries(proxy.index)
        .await?
        .into_iter()
        .filter(|a| pool.contains(a))
        .collect())
}
