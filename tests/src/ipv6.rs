//! The IPv6-for-clients topology (SPEC §7): clients reach the server over IPv4 only; the
//! server's upstream is IPv6.
//!
//! ```text
//!  client i  wan 192.0.2.(128+4i+2)/30 ─veth─ acc<i> 192.0.2.(128+4i+1)/30  server
//!  server up6 2001:db8:ff::1/64 ─veth─ eth0 2001:db8:ff::2/64  internet (the upstream router)
//!     internet lo 2001:db8:eeee::1 (the IPv6 internet host)
//!  [host] eth0 ─veth─ lan0 [client]   (a LAN behind a client, SLAAC)
//! ```
//! Routed mode: the internet routes [`POOL6`] and [`DELEGATE`] to the server. Proxy NDP mode:
//! the pool is [`ONLINK_POOL6`], inside the upstream /64, and the internet has no route for it.
use std::time::Duration;

use anyhow::Result;

use crate::{Lab, Ns, wait_for};

/// The IPv6 internet host.
pub const INTERNET6: &str = "2001:db8:eeee::1";
/// Routed /128s.
pub const POOL6: &str = "2001:db8:600::/64";
/// Routed prefix for delegation.
pub const DELEGATE: &str = "2001:db8:700::/48";
/// Inside the upstream's on-link 2001:db8:ff::/64 (proxy NDP mode).
pub const ONLINK_POOL6: &str = "2001:db8:ff::100:0/112";

/// How the upstream reaches clients' addresses.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Upstream {
    Routed,
    ProxyNdp,
}

pub struct V6Lab {
    pub lab: Lab,
    pub server: Ns,
    pub internet: Ns,
    pub server_instance: String,
    clients: u32,
}

impl V6Lab {
    /// Builds server and internet and starts `tunnel-ctl server` with an IPv4 pool, the
    /// upstream's flags (`--pool6`, or `--proxy-ndp`) and `extra`.
    pub fn start(upstream: Upstream, extra: &[&str]) -> Result<V6Lab> {
        let mut lab = Lab::new()?;
        let server = lab.ns("srv")?;
        let internet = lab.ns("inet")?;
        lab.veth(&server, "up6", &internet, "eth0")?;
        server.ip("addr add 2001:db8:ff::1/64 dev up6 nodad")?;
        internet.ip("addr add 2001:db8:ff::2/64 dev eth0 nodad")?;
        internet.ip(&format!("addr add {INTERNET6}/128 dev lo"))?;
        server.ip("-6 route add default via 2001:db8:ff::2")?;
        let mut args = vec!["server"];
        args.extend_from_slice(&crate::fourover6::server_args(&["--dns6", "2001:db8::53"]));
        match upstream {
            Upstream::Routed => {
                internet.ip(&format!("-6 route add {POOL6} via 2001:db8:ff::1"))?;
                internet.ip(&format!("-6 route add {DELEGATE} via 2001:db8:ff::1"))?;
            }
            Upstream::ProxyNdp => {
                args.extend(["--pool6", ONLINK_POOL6, "--proxy-ndp", "up6"]);
            }
        }
        args.extend_from_slice(extra);
        let state_dir = lab.dir().join("state").display().to_string();
        args.extend(["--state-dir", &state_dir]);
        let server_instance = lab.instance("server");
        lab.spawn_daemon(&server, &server_instance, &args)?;
        Ok(V6Lab {
            lab,
            server,
            internet,
            server_instance,
            clients: 0,
        })
    }

    /// A client namespace whose only link is IPv4, to the server; returns it and the
    /// server's control address as seen from it.
    pub fn client_ns(&mut self) -> Result<(Ns, String)> {
        self.clients += 1;
        let i = self.clients;
        let ns = self.lab.ns(&format!("c{i}"))?;
        let acc = format!("acc{i}");
        self.lab.veth(&ns, "wan", &self.server, &acc)?;
        let base = 128 + 4 * i;
        self.server
            .ip(&format!("addr add 192.0.2.{}/30 dev {acc}", base + 1))?;
        ns.ip(&format!("addr add 192.0.2.{}/30 dev wan", base + 2))?;
        Ok((ns, format!("192.0.2.{}:5678", base + 1)))
    }

    /// Starts `tunnel-ctl client --ipv6 <extra>` in `ns` and waits until it holds an IPv6
    /// lease; returns the instance and the leased "address/len".
    pub fn start_client(
        &mut self,
        ns: &Ns,
        server: &str,
        extra: &[&str],
    ) -> Result<(String, String)> {
        let instance = self
            .lab
            .instance(&format!("{}-cl", ns.name.rsplit('-').next().unwrap_or("c")));
        let mut args = vec!["client", "--server", server, "--ipv6"];
        args.extend_from_slice(extra);
        self.lab.spawn_daemon(ns, &instance, &args)?;
        let lab = &self.lab;
        let addr = wait_for(
            &format!("client {instance} to get IPv6"),
            Duration::from_secs(15),
            || {
                let status = lab.ctl_json("status", &instance)?;
                Ok((status["state"] == "connected")
                    .then(|| status["ipv6"]["addr"].as_str().map(str::to_owned))
                    .flatten())
            },
        )?;
        Ok((instance, addr))
    }

    /// The server's `stats --json`.
    pub fn server_stats(&self) -> Result<serde_json::Value> {
        self.lab.ctl_json("stats", &self.server_instance)
    }
}

/// The address part of "address/len".
pub fn addr_of(lease: &str) -> &str {
    lease.split('/').next().unwrap_or(lease)
}
