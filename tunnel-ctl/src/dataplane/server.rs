//! The server's native mode: the eBPF fast path (SPEC §5.2) and its userspace slow path.
//!
//! The programs are attached with pinned links and the maps are pinned, so a controller that
//! crashes leaves forwarding running; the next start re-adopts both (see `dataplane::tc`).
//! Packets to a native lease that still reach the TUN (too big for the tunnel, sent by this
//! host or by an in-band client) are handled here: ICMP fragmentation-needed for DF packets,
//! IPv4 fragments otherwise, sent as IPv4-in-IPv6 through a raw socket.
use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    sync::Mutex,
};

use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    maps::{MapData, RingBuf},
};
use tracing::{info, warn};
use tunnel_common::{
    fastpath::{DEFAULT_HOP_LIMIT, TCP_IPV4_OVERHEAD, TunnelConfig, bind_cache_bits},
    names::{
        B4_ADDRS, BIND_BY_V4, BIND_BY_V6, BIND_CACHE, CLIENT_TRAFFIC, POLICY_EVENTS,
        PROG_SERVER_DECAP, PROG_SERVER_DECAP_XDP, PROG_SERVER_ENCAP, SHARED_ADDRS, SOFTWIRES,
    },
};

use crate::{
    dataplane::{
        self, bpffs,
        fastpath::Maps,
        nexthop::{self, NextHopTask},
        softwires::Softwires,
        stats::Counters,
        tc,
    },
    netlink::Netlink,
    server::softwires::Table,
    softwire::{Sent, Softwire},
};

/// What the server needs to run native mode.
pub struct NativeArgs<'a> {
    pub v6_dev: &'a str,
    pub v4_dev: &'a str,
    pub tunnel_addr: Ipv6Addr,
    pub tun_index: u32,
    pub pin_dir: PathBuf,
    /// `--policy-icmp`: policy events per second (0: none).
    pub policy_icmp: u32,
    /// `--max-bindings`: entries of each binding map (and of each softwire map).
    pub max_bindings: u32,
    /// Whether native clients bind here (a pure lwAFTR has none: its binding maps get one
    /// entry each instead of `max_bindings`).
    pub native_clients: bool,
    /// `--bindings`: the static softwires (lwAFTR) to serve from the start.
    pub softwires: Table,
    /// `--no-hairpin`.
    pub no_hairpin: bool,
    /// The controller reassembles and fragments for softwires (pure lwAFTR): the fast path
    /// hands it fragments and too-big packets toward softwires (to `tun_index`), and leaves
    /// B4s' outer fragments to the kernel's reassembly.
    pub softwire_slow_path: bool,
    /// `--xdp`: decapsulate the plain case in XDP on `v6_dev` too.
    pub xdp: bool,
}

pub struct Native {
    pub tunnel_addr: Ipv6Addr,
    /// Announced in 106: outer MTU − 40.
    pub inner_mtu: u16,
    pub v6_dev: String,
    pub v4_dev: String,
    ebpf: Mutex<Ebpf>,
    maps: Mutex<Maps>,
    raw: Softwire,
    pin_dir: PathBuf,
    /// The fast path's source-policy drops, for `server::policy` (taken once).
    policy_events: Mutex<Option<RingBuf<MapData>>>,
    pub policy_icmp: u32,
    max_bindings: u32,
    softwires: Mutex<Softwires>,
    nexthops: NextHopTask,
}

impl Native {
    /// Loads (re-adopting pinned maps), configures and attaches the fast path.
    pub async fn start(nl: &Netlink, args: NativeArgs<'_>) -> Result<Native> {
        let v6_index = nl
            .index(args.v6_dev)
            .await
            .with_context(|| format!("--v6-dev {}", args.v6_dev))?;
        nl.index(args.v4_dev)
            .await
            .with_context(|| format!("--v4-dev {}", args.v4_dev))?;
        let inner_mtu = nl
            .inner_mtu(v6_index, &format!("--v6-dev {}", args.v6_dev))
            .await?;
        let clients = if args.native_clients {
            args.max_bindings
        } else {
            1
        };
        let mut sizes = vec![
            (BIND_BY_V4, clients),
            (BIND_BY_V6, clients),
            (BIND_CACHE, 1 << bind_cache_bits(clients)),
            (CLIENT_TRAFFIC, clients),
            (SOFTWIRES, args.max_bindings),
            (SHARED_ADDRS, args.max_bindings),
            (B4_ADDRS, args.max_bindings),
        ];
        // The NAPT maps are the CE's and the lwB4's.
        sizes.extend(dataplane::NAT_MAPS.iter().map(|&name| (name, 1)));
        let mut ebpf = dataplane::load_sized(&args.pin_dir, &sizes)?;
        let mut maps = Maps::take(&mut ebpf)?;
        let previous = maps.config()?;
        maps.set_config(&TunnelConfig {
            local: args.tunnel_addr.octets(),
            v6_ifindex: v6_index,
            tun_ifindex: args.tun_index,
            inner_mtu,
            mss: inner_mtu - TCP_IPV4_OVERHEAD,
            hop_limit: DEFAULT_HOP_LIMIT,
            enabled: 1,
            policy_events_per_s: args.policy_icmp.min(u32::from(u16::MAX)) as u16,
            no_hairpin: u8::from(args.no_hairpin),
            softwire_slow_path: u8::from(args.softwire_slow_path),
            ..Default::default()
        })?;
        if args.softwires.len() > args.max_bindings as usize {
            anyhow::bail!(
                "--bindings has {} softwires, more than --max-bindings {}",
                args.softwires.len(),
                args.max_bindings
            );
        }
        let loading = std::time::Instant::now();
        let count = args.softwires.len();
        let softwires = Softwires::take(&mut ebpf, args.tunnel_addr, args.softwires)?;
        if count > 0 {
            info!(
                "{count} softwires in the fast path ({} ms)",
                loading.elapsed().as_millis()
            );
        }
        let policy_events = if args.policy_icmp > 0 {
            Some(dataplane::fastpath::take(&mut ebpf, POLICY_EVENTS)?)
        } else {
            None
        };
        if previous.enabled != 0 {
            info!(
                "re-adopting the pinned fast path in {}",
                args.pin_dir.display()
            );
        }
        tc::attach_ingress_exactly(
            &mut ebpf,
            &[
                (PROG_SERVER_DECAP, args.v6_dev),
                (PROG_SERVER_ENCAP, args.v4_dev),
            ],
            args.xdp.then_some((PROG_SERVER_DECAP_XDP, args.v6_dev)),
            &args.pin_dir,
        )?;
        let nexthops = nexthop::start(&mut ebpf, &args.pin_dir)?;
        let raw = Softwire::open(args.tunnel_addr)?;
        Ok(Native {
            tunnel_addr: args.tunnel_addr,
            inner_mtu,
            v6_dev: args.v6_dev.to_owned(),
            v4_dev: args.v4_dev.to_owned(),
            ebpf: Mutex::new(ebpf),
            maps: Mutex::new(maps),
            raw,
            pin_dir: args.pin_dir,
            policy_events: Mutex::new(policy_events),
            policy_icmp: args.policy_icmp,
            max_bindings: args.max_bindings,
            softwires: Mutex::new(softwires),
            nexthops,
        })
    }

    /// The softwire table and its maps (lwAFTR).
    pub fn softwires(&self) -> std::sync::MutexGuard<'_, Softwires> {
        self.softwires.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn maps(&self) -> std::sync::MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The policy event ring, once (None when --policy-icmp is off).
    pub fn take_policy_events(&self) -> Option<RingBuf<MapData>> {
        self.policy_events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    pub fn bind(&self, client: Ipv6Addr, ipv4: Ipv4Addr) -> Result<()> {
        self.maps().bind(client, ipv4).map_err(|e| {
            // A full hash map answers E2BIG.
            let full = e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.raw_os_error() == Some(libc::E2BIG))
            });
            if full {
                anyhow::anyhow!(
                    "the fast path is full: {} bindings (--max-bindings)",
                    self.max_bindings
                )
            } else {
                e
            }
        })
    }

    pub fn unbind(&self, client: Ipv6Addr, ipv4: Ipv4Addr) {
        if let Err(e) = self.maps().unbind(client, ipv4) {
            warn!("removing binding {ipv4} ↔ {client}: {e:#}");
        }
    }

    /// Makes the maps hold exactly `keep` (after a restart: the restored native leases).
    pub fn reconcile(&self, keep: &[(Ipv4Addr, Ipv6Addr)]) -> Result<()> {
        let mut maps = self.maps();
        let removed = maps.retain(|v4, v6| keep.contains(&(v4, v6)))?;
        if removed > 0 {
            info!("removed {removed} pinned bindings that no saved lease accounts for");
        }
        for &(v4, v6) in keep {
            maps.bind(v6, v4)?;
        }
        Ok(())
    }

    /// What the binding of `ipv4` carried through the fast path (None: not bound).
    pub fn traffic(&self, ipv4: Ipv4Addr) -> Option<tunnel_common::fastpath::ClientTraffic> {
        self.maps().traffic(ipv4)
    }

    /// (IPv4-side bindings, IPv6-side bindings) currently in the maps.
    pub fn binding_counts(&self) -> (usize, usize) {
        let (v4, v6) = self.maps().bindings();
        (v4.len(), v6)
    }

    pub fn counters(&self) -> Result<Counters> {
        let ebpf = self.ebpf.lock().unwrap_or_else(|p| p.into_inner());
        Ok(self.nexthops.with_counters(dataplane::stats::read(&ebpf)?))
    }

    /// Sends an IPv4 packet to a native client as IPv4-in-IPv6 from the tunnel address,
    /// fragmented or answered with ICMP from `icmp_src` when it does not fit.
    pub fn send_fitted(&self, client: Ipv6Addr, packet: &[u8], icmp_src: Ipv4Addr) -> Sent {
        self.raw
            .send_fitted(client, packet, self.inner_mtu, icmp_src)
    }

    /// Clean shutdown: detach (by removing the link pins) and drop the maps.
    pub fn remove_pins(&self) {
        if let Err(e) = bpffs::remove_pins(&self.pin_dir) {
            warn!("removing pins: {e:#}");
        }
    }
}
