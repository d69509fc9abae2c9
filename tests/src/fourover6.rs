//! The 4over6 topology (SPEC §9): clients ⇄ (IPv6 only) ⇄ server ⇄ (IPv4) ⇄ internet.
//!
//! ```text
//!  client i  v6 2001:db8:i::2/64 ──veth── c<i> 2001:db8:i::1/64   server (lo 2001:db8:100::1)
//!                                                 inet0 192.0.2.1/24 ──veth── eth0 192.0.2.2/24  internet
//! ```
//! Clients have no IPv4 except what the tunnel gives them. The internet host routes the pool
//! (198.51.100.0/24) back to the server.
use std::time::Duration;

use anyhow::Result;

use crate::{Lab, Ns, wait_for};

/// Where clients reach the server.
pub const SERVER: &str = "[2001:db8:100::1]:5678";
/// The internet host.
pub const INTERNET_HOST: &str = "192.0.2.2";

pub struct FourOverSix {
    pub lab: Lab,
    pub server: Ns,
    pub internet: Ns,
    pub server_instance: String,
    clients: u32,
}

impl FourOverSix {
    /// Builds server and internet namespaces and starts `tunnel-ctl server <server_args>`.
    pub fn start(server_args: &[&str]) -> Result<FourOverSix> {
        let mut lab = Lab::new()?;
        let server = lab.ns("srv")?;
        let internet = lab.ns("inet")?;
        server.ip("addr add 2001:db8:100::1/128 dev lo")?;
        lab.veth(&server, "inet0", &internet, "eth0")?;
        server.ip("addr add 192.0.2.1/24 dev inet0")?;
        internet.ip("addr add 192.0.2.2/24 dev eth0")?;
        internet.ip("route add 198.51.100.0/24 via 192.0.2.1")?;
        let server_instance = lab.instance("server");
        let mut args = vec!["server"];
        args.extend_from_slice(server_args);
        lab.spawn_daemon(&server, &server_instance, &args)?;
        Ok(FourOverSix {
            lab,
            server,
            internet,
            server_instance,
            clients: 0,
        })
    }

    /// A new client namespace with an IPv6-only link to the server; returns it.
    pub fn client_ns(&mut self) -> Result<Ns> {
        self.clients += 1;
        let i = self.clients;
        let ns = self.lab.ns(&format!("c{i}"))?;
        let server_side = format!("c{i}");
        self.lab.veth(&ns, "v6", &self.server, &server_side)?;
        ns.ip(&format!("addr add 2001:db8:{i}::2/64 dev v6 nodad"))?;
        self.server.ip(&format!(
            "addr add 2001:db8:{i}::1/64 dev {server_side} nodad"
        ))?;
        ns.ip(&format!(
            "-6 route add 2001:db8:100::/64 via 2001:db8:{i}::1"
        ))?;
        Ok(ns)
    }

    /// Starts `tunnel-ctl client` in `ns` and waits until it holds a lease; returns the
    /// instance name and the leased address.
    pub fn start_client(&mut self, ns: &Ns, extra: &[&str]) -> Result<(String, String)> {
        let instance = self
            .lab
            .instance(&format!("{}-cl", ns.name.rsplit('-').next().unwrap_or("c")));
        let mut args = vec!["client", "--server", SERVER];
        args.extend_from_slice(extra);
        self.lab.spawn_daemon(ns, &instance, &args)?;
        let addr = self.wait_connected(&instance, Duration::from_secs(10))?;
        Ok((instance, addr))
    }

    /// Waits until the client `instance` reports a lease; returns the address.
    pub fn wait_connected(&self, instance: &str, limit: Duration) -> Result<String> {
        wait_for(&format!("client {instance} to get a lease"), limit, || {
            let status = self.lab.ctl_json("status", instance)?;
            Ok((status["state"] == "connected")
                .then(|| status["ipv4"].as_str().map(str::to_owned))
                .flatten())
        })
    }

    /// The server's `leases --json`.
    pub fn leases(&self) -> Result<Vec<serde_json::Value>> {
        let v = self.lab.ctl_json("leases", &self.server_instance)?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    /// The server's `stats --json`.
    pub fn server_stats(&self) -> Result<serde_json::Value> {
        self.lab.ctl_json("stats", &self.server_instance)
    }
}
