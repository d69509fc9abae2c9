//! Two concentrators that share one pool through one PostgreSQL (issue 22).
//!
//! ```text
//!  client n (ns c<n>)  v6 2001:db8:d<n>::2/64 ─veth─ r<n> 2001:db8:d<n>::1/64  router (ns cli)
//!  router  to-a 2001:db8:a::2/64 ─veth─ c0 2001:db8:a::1/64  concentrator A
//!          to-b 2001:db8:b::2/64 ─veth─ c0 2001:db8:b::1/64  concentrator B
//!    raw clients' sources: 2001:db8:c::/64 (local on the router's lo, routed by A and B)
//!    A: control 2001:db8:100::1, tunnel 2001:db8:100::4 (lo); B: 2001:db8:200::1 and ::4
//!  A inet0 192.0.2.1/29 ─veth─ 192.0.2.2 internet (lo 203.0.113.1) 192.0.2.10 ─ inet0 192.0.2.9/29 B
//!    the internet routes the pool to one concentrator ([`Cluster::route_pool_to`]: the
//!    operator's routing, not the concentrators')
//!  PostgreSQL: a throwaway cluster on a unix socket (namespaces share the filesystem)
//! ```
//! Both serve the pool 198.51.100.1-198.51.100.64 (gateway 198.51.100.254, the TUN address).
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};

use crate::{Lab, Ns, postgres::Postgres, wait_for};

pub const POOL: &str = "198.51.100.1-198.51.100.64";
pub const GATEWAY: &str = "198.51.100.254";
/// The internet host clients ping.
pub const INTERNET_HOST: &str = "203.0.113.1";
/// Where the raw clients' source addresses come from.
pub const CLIENT_NET: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 0);

/// The concentrators' names (`--node-id`).
pub const NODES: [&str; 2] = ["a", "b"];

pub struct Cluster {
    /// Before `lab`: the database stops before the lab's directory goes.
    pub pg: Postgres,
    pub lab: Lab,
    /// The router between clients and concentrators; raw clients connect from here.
    pub cli: Ns,
    pub internet: Ns,
    pub nodes: Vec<Node>,
    clients: u32,
}

pub struct Node {
    pub name: &'static str,
    pub ns: Ns,
    pub listen: SocketAddr,
    pub instance: String,
    pub args: Vec<String>,
}

impl Cluster {
    /// The namespaces and the database; no concentrator runs yet ([`Cluster::start_node`]).
    /// `server_args` go to both concentrators, after the pool and the store; with `native`
    /// they run the fast path too.
    pub fn new(server_args: &[&str], native: bool) -> Result<Cluster> {
        Cluster::with_pool(server_args, native, &[POOL])
    }

    /// As [`Cluster::new`], with other pool ranges (the bench's 10,000 leases).
    pub fn with_pool(server_args: &[&str], native: bool, pool: &[&str]) -> Result<Cluster> {
        let mut lab = Lab::new()?;
        let pg = Postgres::start(lab.dir())?;
        let cli = lab.ns("cli")?;
        cli.ip("-6 route add local 2001:db8:c::/64 dev lo")?;
        cli.sysctl("net.ipv6.ip_nonlocal_bind", "1")?;
        cli.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        let internet = lab.ns("inet")?;
        internet.ip(&format!("addr add {INTERNET_HOST}/32 dev lo"))?;
        let mut nodes = Vec::new();
        for (i, name) in NODES.iter().enumerate() {
            let ns = lab.ns(&format!("node-{name}"))?;
            let link = format!("to-{name}");
            lab.veth(&cli, &link, &ns, "c0")?;
            let net = format!("2001:db8:{name}::");
            cli.ip(&format!("addr add {net}2/64 dev {link} nodad"))?;
            ns.ip(&format!("addr add {net}1/64 dev c0 nodad"))?;
            let site = format!("2001:db8:{}00::", i + 1);
            ns.ip(&format!("addr add {site}1/128 dev lo"))?;
            ns.ip(&format!("addr add {site}4/128 dev lo"))?;
            ns.ip(&format!("-6 route add 2001:db8::/32 via {net}2"))?;
            cli.ip(&format!("-6 route add {site}/64 via {net}1"))?;
            let upstream = format!("n-{name}");
            lab.veth(&ns, "inet0", &internet, &upstream)?;
            let (mine, theirs) = (1 + 8 * i, 2 + 8 * i);
            ns.ip(&format!("addr add 192.0.2.{mine}/29 dev inet0"))?;
            internet.ip(&format!("addr add 192.0.2.{theirs}/29 dev {upstream}"))?;
            ns.ip(&format!("route add 203.0.113.0/24 via 192.0.2.{theirs}"))?;
            let instance = lab.instance(&format!("node-{name}"));
            let state = lab.dir().join(format!("state-{name}"));
            let listen = format!("[{site}1]:5678");
            let tunnel = format!("{site}4");
            let mut args: Vec<String> = [
                "server",
                "--listen",
                &listen,
                "--pool",
                &pool.join(","),
                "--gateway",
                GATEWAY,
                "--dns",
                "192.0.2.53",
                "--lease-store",
                &pg.url(),
                "--node-id",
                name,
                "--max-leases-per-prefix",
                "0",
                "--max-connect-rate",
                "0",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            if native {
                args.extend(
                    [
                        "--v6-dev",
                        "c0",
                        "--v4-dev",
                        "inet0",
                        "--tunnel-addr",
                        &tunnel,
                    ]
                    .map(String::from),
                );
            }
            args.extend(["--state-dir".into(), state.display().to_string()]);
            args.extend(server_args.iter().map(|s| s.to_string()));
            nodes.push(Node {
                name,
                ns,
                listen: listen.parse()?,
                instance,
                args,
            });
        }
        let c = Cluster {
            pg,
            lab,
            cli,
            internet,
            nodes,
            clients: 0,
        };
        c.route_pool_to(0)?;
        Ok(c)
    }

    /// The internet sends the pool to concentrator `i` (what the operator's routing does).
    pub fn route_pool_to(&self, i: usize) -> Result<()> {
        self.internet.ip(&format!(
            "route replace 198.51.100.0/24 via 192.0.2.{}",
            1 + 8 * i
        ))?;
        Ok(())
    }

    /// A client namespace behind the router; returns it.
    pub fn client_ns(&mut self) -> Result<Ns> {
        self.clients += 1;
        let n = self.clients;
        let ns = self.lab.ns(&format!("c{n}"))?;
        let router_if = format!("r{n}");
        self.lab.veth(&ns, "v6", &self.cli.clone(), &router_if)?;
        ns.ip(&format!("addr add 2001:db8:d{n}::2/64 dev v6 nodad"))?;
        self.cli.ip(&format!(
            "addr add 2001:db8:d{n}::1/64 dev {router_if} nodad"
        ))?;
        ns.ip(&format!("-6 route add default via 2001:db8:d{n}::1"))?;
        Ok(ns)
    }

    /// Starts `tunnel-ctl client --server <node>...` (in the order of `servers`) in `ns` and
    /// waits until it has a lease; returns the instance and the address.
    pub fn start_client(
        &mut self,
        ns: &Ns,
        servers: &[usize],
        extra: &[&str],
    ) -> Result<(String, String)> {
        let instance = self
            .lab
            .instance(&format!("{}-cl", ns.name.rsplit('-').next().unwrap_or("c")));
        let listens: Vec<String> = servers
            .iter()
            .map(|&i| self.nodes[i].listen.to_string())
            .collect();
        let mut args = vec!["client"];
        for l in &listens {
            args.extend(["--server", l]);
        }
        args.extend_from_slice(extra);
        self.lab.spawn_daemon(ns, &instance, &args)?;
        let addr = self.wait_connected(&instance, None, Duration::from_secs(15))?;
        Ok((instance, addr))
    }

    /// Waits until client `instance` has a lease (from the server `on`, if given); returns
    /// the address.
    pub fn wait_connected(
        &self,
        instance: &str,
        on: Option<usize>,
        limit: Duration,
    ) -> Result<String> {
        let want = on.map(|i| self.nodes[i].listen.to_string());
        wait_for(&format!("client {instance} to get a lease"), limit, || {
            let status = self.lab.ctl_json("status", instance)?;
            let on_it = want.as_deref().is_none_or(|w| status["server"] == w);
            Ok((status["state"] == "connected" && on_it)
                .then(|| status["ipv4"].as_str().map(str::to_owned))
                .flatten())
        })
    }

    /// (Re)starts concentrator `i` with its command line.
    pub fn start_node(&mut self, i: usize) -> Result<()> {
        let node = &self.nodes[i];
        let args: Vec<&str> = node.args.iter().map(String::as_str).collect();
        let (ns, instance) = (node.ns.clone(), node.instance.clone());
        self.lab.spawn_daemon(&ns, &instance, &args)?;
        Ok(())
    }

    /// Stops concentrator `i` cleanly (SIGTERM).
    pub fn stop_node(&mut self, i: usize) -> Result<()> {
        let instance = self.nodes[i].instance.clone();
        self.lab
            .daemon(&instance)
            .context("the node is not running")?
            .stop();
        Ok(())
    }

    /// Stops concentrator `i` and starts it again with the lease file instead of PostgreSQL
    /// (one machine).
    pub fn restart_with_file_store(&mut self, i: usize) -> Result<()> {
        self.stop_node(i)?;
        let args = &mut self.nodes[i].args;
        let at = args
            .iter()
            .position(|a| a == "--lease-store")
            .context("--lease-store")?;
        args[at + 1] = "file".into();
        self.start_node(i)
    }

    /// SIGKILL of concentrator `i` (its pins and rows stay).
    pub fn kill_node(&mut self, i: usize) -> Result<()> {
        let instance = self.nodes[i].instance.clone();
        self.lab
            .daemon(&instance)
            .context("the node is not running")?
            .kill();
        Ok(())
    }

    /// The concentrators' and the database's logs, on stderr (for a failing test).
    pub fn dump_logs(&self) {
        for node in &self.nodes {
            if let Some(log) = self.lab.daemon_log(&node.instance) {
                eprintln!("--- concentrator {} ---\n{log}", node.name);
            }
        }
        eprintln!("--- PostgreSQL ---\n{}", self.pg.log());
        if let Ok(rows) = self
            .pg
            .query("SELECT * FROM tunnel_lease_history ORDER BY id")
        {
            eprintln!("--- lease history ---\n{rows}");
        }
    }

    /// Concentrator `i`'s lease table: address → client.
    pub fn table(&self, i: usize) -> Result<BTreeMap<Ipv4Addr, String>> {
        let rows = self.lab.ctl_json("leases", &self.nodes[i].instance)?;
        let rows = rows.as_array().context("leases --json is a list")?;
        rows.iter()
            .map(|r| {
                Ok((
                    r["ipv4"].as_str().context("ipv4")?.parse()?,
                    r["client"].as_str().context("client")?.to_owned(),
                ))
            })
            .collect()
    }

    /// The database's held leases: address → (node, client).
    pub fn store(&self) -> Result<BTreeMap<Ipv4Addr, (String, String)>> {
        let out = self.pg.query(
            "SELECT host(ipv4), node, host(client) FROM tunnel_leases WHERE node IS NOT NULL",
        )?;
        out.lines()
            .filter(|l| !l.is_empty())
            .map(|l| {
                let f: Vec<&str> = l.split('|').collect();
                ensure!(f.len() == 3, "unexpected psql row {l:?}");
                Ok((f[0].parse()?, (f[1].to_owned(), f[2].to_owned())))
            })
            .collect()
    }
}
