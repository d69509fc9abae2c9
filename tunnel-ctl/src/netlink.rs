//! Links, addresses and routes through rtnetlink.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context as _, Result, anyhow};

use crate::nexthop;
use futures::TryStreamExt as _;
use ipnet::{IpNet, Ipv4Net};
use rtnetlink::{
    Handle, LinkUnspec, RouteMessageBuilder,
    packet_route::{
        AddressFamily,
        link::LinkAttribute,
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourState},
        route::{RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteMetric},
    },
};

/// A netlink connection (its driver runs as a tokio task).
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    pub fn connect() -> Result<Netlink> {
        let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    /// The interface index of `name`.
    pub async fn index(&self, name: &str) -> Result<u32> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        let link = links
            .try_next()
            .await
            .with_context(|| format!("looking up interface {name}"))?
            .ok_or_else(|| anyhow!("no interface named {name}"))?;
        Ok(link.header.index)
    }

    /// The link's MTU and MAC address (empty for L3 devices).
    pub async fn mtu_and_mac(&self, index: u32) -> Result<(u32, Vec<u8>)> {
        let mut links = self.handle.link().get().match_index(index).execute();
        let link = links
            .try_next()
            .await
            .with_context(|| format!("looking up interface {index}"))?
            .ok_or_else(|| anyhow!("no interface with index {index}"))?;
        let mut mtu = None;
        let mut mac = Vec::new();
        for attr in link.attributes {
            match attr {
                LinkAttribute::Mtu(m) => mtu = Some(m),
                LinkAttribute::Address(a) => mac = a,
                _ => {}
            }
        }
        Ok((
            mtu.ok_or_else(|| anyhow!("interface {index} has no MTU"))?,
            mac,
        ))
    }

    /// A permanent neighbour entry `addr` → `mac` on the link (replacing any).
    pub async fn permanent_neighbour(&self, index: u32, addr: IpAddr, mac: &[u8]) -> Result<()> {
        self.handle
            .neighbours()
            .add(index, addr)
            .link_layer_address(mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .with_context(|| format!("adding neighbour {addr}"))
    }

    /// Routes `net` via `gateway` on the link even though no subnet of it is on-link, with a
    /// path MTU (replacing a route to the same prefix).
    pub async fn route_v4_onlink(
        &self,
        net: Ipv4Net,
        gateway: Ipv4Addr,
        index: u32,
        mtu: u32,
    ) -> Result<()> {
        let mut msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(net.network(), net.prefix_len())
            .gateway(gateway)
            .output_interface(index)
            .build();
        msg.header.flags |= RouteFlags::Onlink;
        msg.attributes
            .push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(mtu)]));
        self.replace_route(msg)
            .await
            .with_context(|| format!("adding route {net} via {gateway}"))
    }

    /// Adds the route, replacing one to the same prefix.
    async fn replace_route(&self, msg: RouteMessage) -> Result<()> {
        Ok(self.handle.route().add(msg).replace().execute().await?)
    }

    /// Removes `addr/prefix` from the link if it is there.
    pub async fn del_address(&self, index: u32, addr: IpAddr) -> Result<()> {
        let mut addrs = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .set_address_filter(addr)
            .execute();
        while let Some(msg) = addrs.try_next().await? {
            self.handle.address().del(msg).execute().await?;
        }
        Ok(())
    }

    /// The largest IPv4 packet that fits in IPv4-in-IPv6 over link `index` (named `what` in
    /// errors): its MTU − 40, at least 576.
    pub async fn inner_mtu(&self, index: u32, what: &str) -> Result<u16> {
        let (mtu, _) = self.mtu_and_mac(index).await?;
        let overhead = u32::from(tunnel_common::fastpath::IPV6_HEADER_LEN);
        let inner = u16::try_from(mtu.saturating_sub(overhead)).unwrap_or(u16::MAX);
        if inner < 576 {
            anyhow::bail!("{what} has MTU {mtu}: too small to carry IPv4 (needs at least 616)");
        }
        Ok(inner)
    }

    /// Sets the MTU and brings the link up.
    pub async fn up(&self, index: u32, mtu: u32) -> Result<()> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).mtu(mtu).up().build())
            .execute()
            .await
            .context("setting link up")
    }

    /// Adds (or keeps) `addr/prefix` on the link.
    pub async fn add_address(&self, index: u32, addr: IpAddr, prefix: u8) -> Result<()> {
        self.handle
            .address()
            .add(index, addr, prefix)
            .replace()
            .execute()
            .await
            .with_context(|| format!("adding address {addr}/{prefix}"))
    }

    /// The global IPv6 addresses of the link, with their prefix lengths (tentative and
    /// deprecated ones left out).
    pub async fn global_ipv6(&self, index: u32) -> Result<Vec<(Ipv6Addr, u8)>> {
        use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressScope};
        let mut addrs = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let mut out = Vec::new();
        while let Some(msg) = addrs.try_next().await? {
            if msg.header.family != rtnetlink::packet_route::AddressFamily::Inet6
                || msg.header.scope != AddressScope::Universe
            {
                continue;
            }
            let flags = msg
                .attributes
                .iter()
                .find_map(|a| match a {
                    AddressAttribute::Flags(f) => Some(*f),
                    _ => None,
                })
                .unwrap_or(AddressFlags::empty());
            if flags.intersects(AddressFlags::Tentative | AddressFlags::Deprecated) {
                continue;
            }
            for a in &msg.attributes {
                if let AddressAttribute::Address(IpAddr::V6(v6)) = a {
                    out.push((*v6, msg.header.prefix_len));
                }
            }
        }
        Ok(out)
    }

    /// Removes every IPv4 address of the link.
    pub async fn flush_ipv4(&self, index: u32) -> Result<()> {
        let mut addrs = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        while let Some(msg) = addrs.try_next().await? {
            if msg.header.family == rtnetlink::packet_route::AddressFamily::Inet {
                self.handle.address().del(msg).execute().await?;
            }
        }
        Ok(())
    }

    /// Routes `net` (IPv4 or IPv6) out of the link, replacing a route to the same prefix.
    pub async fn route(&self, net: impl Into<IpNet>, index: u32) -> Result<()> {
        let net = net.into();
        self.replace_route(route_message(net, index))
            .await
            .with_context(|| format!("adding route {net}"))
    }

    /// Removes the route to `net` out of the link, if any.
    pub async fn del_route(&self, net: impl Into<IpNet>, index: u32) -> Result<()> {
        let net = net.into();
        self.handle
            .route()
            .del(route_message(net, index))
            .execute()
            .await
            .with_context(|| format!("removing route {net}"))
    }

    /// How the kernel reaches `dest` now (`ip route get`): gateway (if any) and interface.
    pub async fn route_to(&self, dest: IpAddr) -> Result<(Option<IpAddr>, u32)> {
        let msg = match dest {
            IpAddr::V4(a) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(a, 32)
                .build(),
            IpAddr::V6(a) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(a, 128)
                .build(),
        };
        let route = self.route_get(msg, dest).await?;
        let mut gateway = None;
        let mut oif = None;
        for attr in route.attributes {
            match attr {
                RouteAttribute::Gateway(RouteAddress::Inet(a)) => gateway = Some(IpAddr::V4(a)),
                RouteAttribute::Gateway(RouteAddress::Inet6(a)) => gateway = Some(IpAddr::V6(a)),
                RouteAttribute::Oif(i) => oif = Some(i),
                _ => {}
            }
        }
        Ok((
            gateway,
            oif.ok_or_else(|| anyhow!("the route to {dest} has no interface"))?,
        ))
    }

    /// The kernel's answer to the route query `msg` (`ip route get`) for `dest`.
    async fn route_get(
        &self,
        msg: RouteMessage,
        dest: impl std::fmt::Display,
    ) -> Result<RouteMessage> {
        let mut routes = self.handle.route().get(msg).execute();
        routes
            .try_next()
            .await
            .with_context(|| format!("looking up the route to {dest}"))?
            .ok_or_else(|| anyhow!("no route to {dest}"))
    }

    /// A host route to `dest` via `gateway` (or on-link) out of `index`, replacing any.
    pub async fn host_route(
        &self,
        dest: IpAddr,
        gateway: Option<IpAddr>,
        index: u32,
    ) -> Result<()> {
        let msg = match (dest, gateway) {
            (IpAddr::V4(d), gw) => {
                let b = RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(d, 32)
                    .output_interface(index);
                match gw {
                    Some(IpAddr::V4(g)) => b.gateway(g).build(),
                    _ => b.build(),
                }
            }
            (IpAddr::V6(d), gw) => {
                let b = RouteMessageBuilder::<Ipv6Addr>::new()
                    .destination_prefix(d, 128)
                    .output_interface(index);
                match gw {
                    Some(IpAddr::V6(g)) => b.gateway(g).build(),
                    _ => b.build(),
                }
            }
        };
        self.replace_route(msg)
            .await
            .with_context(|| format!("adding a host route to {dest}"))
    }

    /// Removes the host route to `dest` out of `index`, if any.
    pub async fn del_host_route(&self, dest: IpAddr, index: u32) -> Result<()> {
        self.del_route(IpNet::from(dest), index).await
    }

    /// A proxy NDP entry: the kernel answers neighbour solicitations for `addr` on the link.
    pub async fn add_proxy_ndp(&self, index: u32, addr: Ipv6Addr) -> Result<()> {
        self.handle
            .neighbours()
            .add(index, IpAddr::V6(addr))
            .flags(NeighbourFlags::Proxy)
            .replace()
            .execute()
            .await
            .with_context(|| format!("adding proxy NDP entry for {addr}"))
    }

    /// Removes the proxy NDP entry for `addr` on the link.
    pub async fn del_proxy_ndp(&self, index: u32, addr: Ipv6Addr) -> Result<()> {
        let mut req = self
            .handle
            .neighbours()
            .add(index, IpAddr::V6(addr))
            .flags(NeighbourFlags::Proxy);
        let msg = req.message_mut().clone();
        self.handle
            .neighbours()
            .del(msg)
            .execute()
            .await
            .with_context(|| format!("removing proxy NDP entry for {addr}"))
    }

    /// The IPv6 proxy NDP entries on the link.
    pub async fn proxy_ndp_entries(&self, index: u32) -> Result<Vec<Ipv6Addr>> {
        let mut entries = self
            .handle
            .neighbours()
            .get()
            .proxies()
            .set_address_family(AddressFamily::Inet6)
            .execute();
        let mut out = Vec::new();
        while let Some(msg) = entries.try_next().await? {
            if msg.header.ifindex != index {
                continue;
            }
            for attr in msg.attributes {
                if let NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) = attr {
                    out.push(a);
                }
            }
        }
        Ok(out)
    }
}

/// The kernel's routing state as the next-hop cache sees it (`crate::nexthop`).
impl Netlink {
    /// The policy routing rules of both families.
    pub async fn rules(&self) -> Result<Vec<nexthop::Rule>> {
        use rtnetlink::{
            IpVersion,
            packet_route::rule::{RuleAction, RuleAttribute},
        };
        let mut out = Vec::new();
        for (version, family) in [
            (IpVersion::V4, nexthop::Family::V4),
            (IpVersion::V6, nexthop::Family::V6),
        ] {
            let mut rules = self.handle.rule().get(version).execute();
            while let Some(msg) = rules.try_next().await.context("listing routing rules")? {
                let mut priority = 0;
                let mut table = u32::from(msg.header.table);
                let mut selective = msg.header.dst_len != 0
                    || msg.header.src_len != 0
                    || msg.header.tos != 0
                    || msg.header.action != RuleAction::ToTable;
                for attr in &msg.attributes {
                    match attr {
                        RuleAttribute::Priority(p) => priority = *p,
                        RuleAttribute::Table(t) => table = *t,
                        RuleAttribute::Protocol(_) => {}
                        // A mark of 0 with mask 0 matches everything (kernels report them).
                        RuleAttribute::FwMark(0) | RuleAttribute::FwMask(0) => {}
                        // Unset suppressors are reported as -1.
                        RuleAttribute::SuppressPrefixLen(u32::MAX)
                        | RuleAttribute::SuppressIfGroup(u32::MAX) => {}
                        _ => selective = true,
                    }
                }
                out.push(nexthop::Rule {
                    family,
                    priority,
                    table,
                    selective,
                });
            }
        }
        Ok(out)
    }

    /// The shape of every route of both families, all tables.
    pub async fn route_shapes(&self) -> Result<Vec<nexthop::Route>> {
        let mut out = Vec::new();
        for (msg, family) in [
            (
                RouteMessageBuilder::<Ipv4Addr>::new().build(),
                nexthop::Family::V4,
            ),
            (
                RouteMessageBuilder::<Ipv6Addr>::new().build(),
                nexthop::Family::V6,
            ),
        ] {
            let mut routes = self.handle.route().get(msg).execute();
            while let Some(route) = routes.try_next().await.context("listing routes")? {
                let mut shape = nexthop::Route {
                    family,
                    multipath: false,
                    nexthop_object: false,
                    tos: route.header.tos,
                    src_len: route.header.source_prefix_length,
                };
                for attr in &route.attributes {
                    match attr {
                        RouteAttribute::MultiPath(hops) if hops.len() > 1 => shape.multipath = true,
                        RouteAttribute::NhId(_) => shape.nexthop_object = true,
                        _ => {}
                    }
                }
                out.push(shape);
            }
        }
        Ok(out)
    }

    /// The neighbour entries of both families (proxy entries left out).
    pub async fn neighbours(&self) -> Result<Vec<(u32, IpAddr, nexthop::Neighbour)>> {
        let mut entries = self.handle.neighbours().get().execute();
        let mut out = Vec::new();
        while let Some(msg) = entries.try_next().await.context("listing neighbours")? {
            if let Some(n) = neighbour_of(&msg) {
                out.push(n);
            }
        }
        Ok(out)
    }
}

/// Where the kernel's output path sends an IPv6 packet: what the FIB helper would answer if
/// IPv6 forwarding were on (it refuses every question on an interface without it: a client
/// host, a server that forwards IPv4 only).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutputHop {
    /// Out of `ifindex` to `dmac` from `smac`, packets of at most `mtu` bytes.
    Forward {
        ifindex: u32,
        dmac: [u8; 6],
        smac: [u8; 6],
        mtu: u32,
    },
    /// A route that is not plain unicast (unreachable, blackhole, local, ...).
    Kernel,
    /// No usable neighbour entry yet.
    Unresolved,
}

impl Netlink {
    /// `ip -6 route get DST from SRC oif OIF`, and the neighbour entry and MAC that go with it.
    pub async fn output_hop_v6(&self, dst: Ipv6Addr, src: Ipv6Addr, oif: u32) -> Result<OutputHop> {
        use rtnetlink::packet_route::route::RouteType;
        let msg = RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(dst, 128)
            .source_prefix(src, 128)
            .output_interface(oif)
            .build();
        let route = self.route_get(msg, dst).await?;
        if route.header.kind != RouteType::Unicast {
            return Ok(OutputHop::Kernel);
        }
        let (mut gateway, mut ifindex, mut mtu) = (None, None, None);
        for attr in &route.attributes {
            match attr {
                RouteAttribute::Gateway(RouteAddress::Inet6(a)) => gateway = Some(*a),
                RouteAttribute::Oif(i) => ifindex = Some(*i),
                RouteAttribute::Metrics(metrics) => {
                    for m in metrics {
                        if let RouteMetric::Mtu(v) = m {
                            mtu = Some(*v);
                        }
                    }
                }
                _ => {}
            }
        }
        let ifindex = ifindex.ok_or_else(|| anyhow!("the route to {dst} has no interface"))?;
        let next = gateway.unwrap_or(dst);
        let (dev_mtu, own) = self.mtu_and_mac(ifindex).await?;
        let Ok(smac) = <[u8; 6]>::try_from(own.as_slice()) else {
            return Ok(OutputHop::Kernel);
        };
        let dmac = self
            .neighbours()
            .await?
            .into_iter()
            .find(|(i, a, n)| *i == ifindex && *a == IpAddr::V6(next) && n.usable)
            .and_then(|(_, _, n)| <[u8; 6]>::try_from(n.lladdr.as_slice()).ok());
        Ok(match dmac {
            Some(dmac) => OutputHop::Forward {
                ifindex,
                dmac,
                smac,
                mtu: mtu.unwrap_or(dev_mtu),
            },
            None => OutputHop::Unresolved,
        })
    }
}

/// A neighbour message as (interface, address, what the FIB reads of it); None for proxy
/// entries and other families.
pub fn neighbour_of(
    msg: &rtnetlink::packet_route::neighbour::NeighbourMessage,
) -> Option<(u32, IpAddr, nexthop::Neighbour)> {
    if msg.header.flags.contains(NeighbourFlags::Proxy) {
        return None;
    }
    let mut addr = None;
    let mut lladdr = Vec::new();
    for attr in &msg.attributes {
        match attr {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => {
                addr = Some(IpAddr::V4(*a))
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                addr = Some(IpAddr::V6(*a))
            }
            NeighbourAttribute::LinkLayerAddress(l) => lladdr.clone_from(l),
            _ => {}
        }
    }
    let usable = matches!(
        msg.header.state,
        NeighbourState::Reachable
            | NeighbourState::Stale
            | NeighbourState::Delay
            | NeighbourState::Probe
            | NeighbourState::Permanent
            | NeighbourState::Noarp
    );
    Some((
        msg.header.ifindex,
        addr?,
        nexthop::Neighbour { lladdr, usable },
    ))
}

/// A change of the kernel's routing state, from the rtnetlink multicast groups the next-hop
/// cache watches.
#[derive(Debug)]
pub enum RoutingEvent {
    /// A neighbour entry was added or changed.
    Neighbour(u32, IpAddr, nexthop::Neighbour),
    /// A neighbour entry was removed.
    NeighbourGone(u32, IpAddr),
    /// A route, rule, address or link changed (what: for the log).
    Changed(&'static str),
    /// The socket overflowed: events were lost.
    Overrun,
}

/// A stream of [`RoutingEvent`]s (its connection runs as a task until the receiver is
/// dropped).
pub fn watch_routing() -> Result<tokio::sync::mpsc::UnboundedReceiver<RoutingEvent>> {
    use futures::StreamExt as _;
    use rtnetlink::{
        MulticastGroup, packet_core::NetlinkPayload, packet_route::RouteNetlinkMessage as M,
    };
    let groups = [
        MulticastGroup::Link,
        MulticastGroup::Neigh,
        MulticastGroup::Ipv4Ifaddr,
        MulticastGroup::Ipv6Ifaddr,
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv6Route,
        MulticastGroup::Ipv4Rule,
        MulticastGroup::Ipv6Rule,
    ];
    let (conn, _handle, mut messages) = rtnetlink::new_multicast_connection(&groups)
        .context("subscribing to rtnetlink route, neighbour and link changes")?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(conn);
    tokio::spawn(async move {
        while let Some((msg, _)) = messages.next().await {
            let event = match msg.payload {
                NetlinkPayload::Overrun(_) => RoutingEvent::Overrun,
                NetlinkPayload::InnerMessage(inner) => match inner {
                    M::NewNeighbour(n) => match neighbour_of(&n) {
                        Some((i, a, n)) => RoutingEvent::Neighbour(i, a, n),
                        None => continue,
                    },
                    M::DelNeighbour(n) => match neighbour_of(&n) {
                        Some((i, a, _)) => RoutingEvent::NeighbourGone(i, a),
                        None => continue,
                    },
                    M::NewRoute(_) | M::DelRoute(_) => RoutingEvent::Changed("route"),
                    M::NewRule(_) | M::DelRule(_) => RoutingEvent::Changed("rule"),
                    M::NewAddress(_) | M::DelAddress(_) => RoutingEvent::Changed("address"),
                    M::NewLink(_) | M::DelLink(_) => RoutingEvent::Changed("link"),
                    _ => continue,
                },
                _ => continue,
            };
            if tx.send(event).is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

/// A route to `net` out of link `index`.
fn route_message(net: IpNet, index: u32) -> rtnetlink::packet_route::route::RouteMessage {
    match net {
        IpNet::V4(n) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(n.network(), n.prefix_len())
            .output_interface(index)
            .build(),
        IpNet::V6(n) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(n.network(), n.prefix_len())
            .output_interface(index)
            .build(),
    }
}
