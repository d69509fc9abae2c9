//! Two concentrators that share one pool through one PostgreSQL (issue 22).
//!
//! ```text
//!  clients (ns cli)  to-a 2001:db8:a::2/64 ─veth─ c0 2001:db8:a::1/64  concentrator A
//!                    to-b 2001:db8:b::2/64 ─veth─ c0 2001:db8:b::1/64  concentrator B
//!    raw clients' sources: 2001:db8:c::/64 (local on cli's lo, routed by A and B)
//!    A listens on 2001:db8:100::1 (lo), B on 2001:db8:200::1
//!    PostgreSQL: a throwaway cluster on a unix socket (namespaces share the filesystem)
//! ```
//! Both serve the pool 198.51.100.1-198.51.100.64 (gateway 198.51.100.254, the TUN address).
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
};

use anyhow::{Context as _, Result, ensure};

use crate::{Lab, Ns, postgres::Postgres};

pub const POOL: &str = "198.51.100.1-198.51.100.64";
pub const GATEWAY: &str = "198.51.100.254";
/// Where the raw clients' source addresses come from.
pub const CLIENT_NET: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 0);

/// The concentrators' names (`--node-id`), control addresses and namespaces' roles.
pub const NODES: [(&str, &str); 2] = [
    ("a", "[2001:db8:100::1]:5678"),
    ("b", "[2001:db8:200::1]:5678"),
];

pub struct Cluster {
    /// Before `lab`: the database stops before the lab's directory goes.
    pub pg: Postgres,
    pub lab: Lab,
    pub cli: Ns,
    pub nodes: Vec<Node>,
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
    /// `server_args` go to both concentrators, after the pool and the store.
    pub fn new(server_args: &[&str]) -> Result<Cluster> {
        let mut lab = Lab::new()?;
        let pg = Postgres::start(lab.dir())?;
        let cli = lab.ns("cli")?;
        cli.ip("-6 route add local 2001:db8:c::/64 dev lo")?;
        cli.sysctl("net.ipv6.ip_nonlocal_bind", "1")?;
        let mut nodes = Vec::new();
        for (i, (name, listen)) in NODES.iter().enumerate() {
            let ns = lab.ns(&format!("node-{name}"))?;
            let link = format!("to-{name}");
            lab.veth(&cli, &link, &ns, "c0")?;
            let net = format!("2001:db8:{name}::");
            cli.ip(&format!("addr add {net}2/64 dev {link} nodad"))?;
            ns.ip(&format!("addr add {net}1/64 dev c0 nodad"))?;
            let control = format!("2001:db8:{}00::1", i + 1);
            ns.ip(&format!("addr add {control}/128 dev lo"))?;
            ns.ip(&format!("-6 route add 2001:db8:c::/64 via {net}2"))?;
            cli.ip(&format!("-6 route add {control}/128 via {net}1"))?;
            let instance = lab.instance(&format!("node-{name}"));
            let state = lab.dir().join(format!("state-{name}"));
            let mut args: Vec<String> = [
                "server",
                "--listen",
                listen,
                "--pool",
                POOL,
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
        Ok(Cluster {
            pg,
            lab,
            cli,
            nodes,
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
