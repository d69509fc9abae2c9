//! The 4over6 topology (SPEC §9): clients ⇄ (IPv6 only) ⇄ server ⇄ (IPv4) ⇄ internet.
//!
//! ```text
//!  client i  v6 2001:db8:i::2/64 ─veth─ c<i> 2001:db8:i::1/64  core (IPv6 router)
//!                                       srv  2001:db8:ff::2/64 ─veth─ up6 2001:db8:ff::1/64  server
//!     server lo 2001:db8:100::1 (control), 2001:db8:100::4 (native tunnel endpoint)
//!     server inet0 192.0.2.1/24 ─veth─ eth0 192.0.2.2/24  internet
//! ```
//! Clients have no IPv4 except what the tunnel gives them. The server has one IPv6-side
//! interface (`up6`, its `--v6-dev` in native mode) and one IPv4-side (`inet0`, `--v4-dev`).
//! The internet host routes the pool (198.51.100.0/24) back to the server.
use std::{
    io::{Read as _, Write as _},
    net::{Ipv6Addr, SocketAddr, TcpStream},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, ensure};

use crate::{Lab, Ns, wait_for};

/// Where clients reach the server.
pub const SERVER: &str = "[2001:db8:100::1]:5678";
/// The internet host.
pub const INTERNET_HOST: &str = "192.0.2.2";
/// The server's native tunnel endpoint.
pub const TUNNEL_ADDR: &str = "2001:db8:100::4";
/// The server flags every test needs: the pool (198.51.100.2-100), gateway and DNS.
pub const BASE_ARGS: &[&str] = &[
    "--pool",
    "198.51.100.2-198.51.100.100",
    "--gateway",
    "198.51.100.1",
    "--dns",
    "192.0.2.53",
];

/// [`BASE_ARGS`] followed by `extra`.
pub fn server_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = BASE_ARGS.to_vec();
    args.extend_from_slice(extra);
    args
}

/// Server flags that enable native mode in this topology.
pub const NATIVE_ARGS: &[&str] = &[
    "--v6-dev",
    "up6",
    "--v4-dev",
    "inet0",
    "--tunnel-addr",
    TUNNEL_ADDR,
];

pub struct FourOverSix {
    pub lab: Lab,
    pub server: Ns,
    pub core: Ns,
    pub internet: Ns,
    pub server_instance: String,
    /// The server's full command line (to restart it the same way).
    pub server_args: Vec<String>,
    /// Whether the server (and clients) start from a TOML file alone (`--config`).
    pub from_config: bool,
    clients: u32,
}

impl FourOverSix {
    /// Builds server, core and internet namespaces and starts `tunnel-ctl server
    /// <server_args>` (with a lease file in the lab's directory).
    pub fn start(server_args: &[&str]) -> Result<FourOverSix> {
        FourOverSix::start_with(server_args, false)
    }

    /// As [`FourOverSix::start`]; with `from_config` the server, and the clients started with
    /// [`FourOverSix::start_client`], read their settings from a TOML file alone.
    pub fn start_with(server_args: &[&str], from_config: bool) -> Result<FourOverSix> {
        let mut lab = Lab::new()?;
        let server = lab.ns("srv")?;
        let core = lab.ns("core")?;
        let internet = lab.ns("inet")?;
        server.ip("addr add 2001:db8:100::1/128 dev lo")?;
        server.ip(&format!("addr add {TUNNEL_ADDR}/128 dev lo"))?;
        lab.veth(&server, "up6", &core, "srv")?;
        server.ip("addr add 2001:db8:ff::1/64 dev up6 nodad")?;
        core.ip("addr add 2001:db8:ff::2/64 dev srv nodad")?;
        server.ip("-6 route add 2001:db8::/32 via 2001:db8:ff::2")?;
        core.ip("-6 route add 2001:db8:100::/48 via 2001:db8:ff::1")?;
        core.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        lab.veth(&server, "inet0", &internet, "eth0")?;
        server.ip("addr add 192.0.2.1/24 dev inet0")?;
        internet.ip("addr add 192.0.2.2/24 dev eth0")?;
        internet.ip("route add 198.51.100.0/24 via 192.0.2.1")?;
        let server_instance = lab.instance("server");
        let state_dir: PathBuf = lab.dir().join("state");
        let mut args: Vec<String> = vec!["server".into()];
        args.extend(server_args.iter().map(|a| a.to_string()));
        args.extend(["--state-dir".into(), state_dir.display().to_string()]);
        let mut t = FourOverSix {
            lab,
            server,
            core,
            internet,
            server_instance,
            server_args: args,
            from_config,
            clients: 0,
        };
        t.start_server()?;
        Ok(t)
    }

    /// As [`FourOverSix::start`], with native mode enabled on the server.
    pub fn start_native(server_args: &[&str]) -> Result<FourOverSix> {
        let mut args = server_args.to_vec();
        args.extend_from_slice(NATIVE_ARGS);
        FourOverSix::start(&args)
    }

    /// (Re)starts the server daemon with its command line.
    pub fn start_server(&mut self) -> Result<()> {
        let args: Vec<&str> = self.server_args.iter().map(String::as_str).collect();
        let (server, instance) = (self.server.clone(), self.server_instance.clone());
        if self.from_config {
            self.lab
                .spawn_daemon_from_config(&server, &instance, &args)?;
        } else {
            self.lab.spawn_daemon(&server, &instance, &args)?;
        }
        Ok(())
    }

    /// A new client namespace with an IPv6-only link to the core router; returns it.
    pub fn client_ns(&mut self) -> Result<Ns> {
        Ok(self.client_ns_addr()?.0)
    }

    /// As [`FourOverSix::client_ns`], with the client's address (`2001:db8:<i>::2`).
    pub fn client_ns_addr(&mut self) -> Result<(Ns, Ipv6Addr)> {
        self.clients += 1;
        let i = self.clients;
        let ns = self.lab.ns(&format!("c{i}"))?;
        let core_side = format!("c{i}");
        self.lab.veth(&ns, "v6", &self.core, &core_side)?;
        ns.ip(&format!("addr add 2001:db8:{i}::2/64 dev v6 nodad"))?;
        self.core.ip(&format!(
            "addr add 2001:db8:{i}::1/64 dev {core_side} nodad"
        ))?;
        ns.ip(&format!(
            "-6 route add 2001:db8:100::/48 via 2001:db8:{i}::1"
        ))?;
        let addr = format!("2001:db8:{i}::2").parse()?;
        Ok((ns, addr))
    }

    /// A client namespace that may use every address of the /64 `net` as a source (a local
    /// route there, non-local bind, and the core routes the /64 to it): many clients from one
    /// namespace, for load generators.
    pub fn sources_ns(&mut self, net: &str) -> Result<Ns> {
        let (ns, addr) = self.client_ns_addr()?;
        ns.sysctl("net.ipv6.ip_nonlocal_bind", "1")?;
        ns.ip(&format!("-6 route add local {net}/64 dev lo"))?;
        self.core.ip(&format!("-6 route add {net}/64 via {addr}"))?;
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
        if self.from_config {
            self.lab.spawn_daemon_from_config(ns, &instance, &args)?;
        } else {
            self.lab.spawn_daemon(ns, &instance, &args)?;
        }
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
        v.as_array()
            .cloned()
            .ok_or_else(|| anyhow!("leases --json is not a list: {v}"))
    }

    /// Starts a native-mode client on `ns`'s `v6` interface; returns instance and address.
    pub fn start_native_client(&mut self, ns: &Ns, extra: &[&str]) -> Result<(String, String)> {
        let mut args = vec!["--mode", "native", "--v6-dev", "v6"];
        args.extend_from_slice(extra);
        self.start_client(ns, &args)
    }

    /// Waits until the server's lease file holds each of `leases` (address, mode): it saves
    /// within ~100 ms of a change, and a SIGKILL before that loses the newest change.
    pub fn wait_saved(&self, leases: &[(&str, &str)]) -> Result<()> {
        let status = self.lab.ctl_json("status", &self.server_instance)?;
        let file = status["state_file"]
            .as_str()
            .ok_or_else(|| anyhow!("status has no state_file: {status}"))?
            .to_owned();
        wait_for("the leases to be saved", Duration::from_secs(5), || {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            let saved: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            let rows = saved["leases"].as_array().cloned().unwrap_or_default();
            Ok(leases
                .iter()
                .all(|(addr, mode)| {
                    rows.iter()
                        .any(|l| l["ipv4"] == *addr && l["mode"] == *mode)
                })
                .then_some(()))
        })
    }

    /// The server's `stats --json`.
    pub fn server_stats(&self) -> Result<serde_json::Value> {
        self.lab.ctl_json("stats", &self.server_instance)
    }
}

/// How long [`RawPeer::recv_skip_keepalive`] waits in all for a frame other than a keepalive.
pub const RAW_REPLY_LIMIT: Duration = Duration::from_secs(10);

/// A client written from the SPEC §3 bytes, not from the project's codec.
pub struct RawPeer {
    pub stream: TcpStream,
}

impl RawPeer {
    pub fn connect(ns: &Ns) -> Result<RawPeer> {
        let addr: SocketAddr = SERVER.parse()?;
        let stream = ns.enter(|| TcpStream::connect_timeout(&addr, Duration::from_secs(5)))??;
        stream.set_read_timeout(Some(RAW_REPLY_LIMIT))?;
        Ok(RawPeer { stream })
    }

    pub fn send(&mut self, kind: u8, data: &[u8]) -> Result<()> {
        self.stream.write_all(&Self::frame(kind, data))?;
        Ok(())
    }

    /// One frame as SPEC §3 puts it on the wire: length (header included, little-endian),
    /// type, data.
    pub fn frame(kind: u8, data: &[u8]) -> Vec<u8> {
        let mut frame = ((5 + data.len()) as u32).to_le_bytes().to_vec();
        frame.push(kind);
        frame.extend_from_slice(data);
        frame
    }

    /// Next frame, as (type, data).
    pub fn recv(&mut self) -> Result<(u8, Vec<u8>)> {
        let mut header = [0u8; 5];
        self.stream
            .read_exact(&mut header)
            .context("reading a frame header")?;
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        ensure!(
            (5..=4101).contains(&len),
            "server sent a frame of length {len}"
        );
        let mut data = vec![0u8; len - 5];
        self.stream.read_exact(&mut data)?;
        Ok((header[4], data))
    }

    /// Next frame that is not a keepalive, within [`RAW_REPLY_LIMIT`] in all (a server that
    /// only sends 104s does not keep the test waiting).
    pub fn recv_skip_keepalive(&mut self) -> Result<(u8, Vec<u8>)> {
        let deadline = Instant::now() + RAW_REPLY_LIMIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            ensure!(
                !left.is_zero(),
                "no frame other than 104 within {RAW_REPLY_LIMIT:?}"
            );
            self.stream.set_read_timeout(Some(left))?;
            let frame = self.recv();
            self.stream.set_read_timeout(Some(RAW_REPLY_LIMIT))?;
            let (kind, data) = frame?;
            if kind != 104 {
                return Ok((kind, data));
            }
        }
    }

    /// 100 → 101; returns the 101 text.
    pub fn lease(&mut self) -> Result<String> {
        self.send(100, &[])?;
        let (kind, data) = self.recv_skip_keepalive()?;
        ensure!(
            kind == 101,
            "expected 101, got {kind}: {:?}",
            String::from_utf8_lossy(&data)
        );
        Ok(String::from_utf8(data)?)
    }

    /// Whether the server has closed the connection (EOF within `limit`).
    pub fn closed_within(&mut self, limit: Duration) -> Result<bool> {
        self.stream.set_read_timeout(Some(limit))?;
        let mut buf = [0u8; 4096];
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            match self.stream.read(&mut buf) {
                Ok(0) => return Ok(true),
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(true),
                Err(_) => return Ok(false),
            }
        }
        Ok(false)
    }
}
