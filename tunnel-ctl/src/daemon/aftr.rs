//! `tunnel-ctl server --bindings FILE` without `--pool`: a pure lwAFTR (SPEC §4a, RFC 7596).
//! No control channel: the server's fast path serves the static softwire table, which
//! `tunnel-ctl softwire add|del` and a reload of the file change in place. The softwire
//! requests are answered here for the full server too ([`softwire_request`]).
//! Its slow path is [`softwire_slow`]'s, on a TUN of its own.
use std::{sync::Arc, time::Instant};

use anyhow::{Context as _, Result};
use tracing::{info, warn};

use super::softwire_slow::{self, SoftwireSlowPath};
use crate::{
    config::ServerConfig,
    dataplane::{
        bpffs::PinGuard,
        server::{Native, NativeArgs},
    },
    instance::Instance,
    mgmt::{self, Handler, Request, Response, Status, api},
    netlink::Netlink,
    server::{softwire_table, softwires::Table},
    tundev,
};

struct Aftr {
    native: Native,
    running: tokio::sync::Mutex<ServerConfig>,
    instance: Instance,
    started: Instant,
    slow: SoftwireSlowPath,
}

impl Handler for Aftr {
    fn handle(&self, request: Request) -> Response {
        if let Some(r) = softwire_request(&self.native, &request) {
            return r;
        }
        match request {
            Request::Status => {
                let running = self.running.try_lock().ok();
                Status::Aftr(api::AftrStatus {
                    process: api::Process::now(&self.instance, self.started),
                    tunnel_addr: self.native.tunnel_addr,
                    v6_dev: self.native.v6_dev.clone(),
                    v4_dev: self.native.v4_dev.clone(),
                    inner_mtu: self.native.inner_mtu,
                    bindings: running.as_ref().and_then(|r| r.bindings.clone()),
                    softwires: self.native.softwires().table().len(),
                    hairpin: running.as_ref().is_none_or(|r| !r.no_hairpin),
                })
                .into()
            }
            Request::Stats => {
                mgmt::counters_response(self.slow.stats.snapshot(), Some(self.native.counters()))
            }
            other => mgmt::not_supported("pure lwAFTR (server without --pool)", &other),
        }
    }
}

/// Answers `softwire add|del|list` from `native`'s table; None for other requests.
pub fn softwire_request(native: &Native, request: &Request) -> Option<Response> {
    let changed = |line: String| {
        info!("{line}");
        Response::Ok(api::Reply::Changed(vec![line]))
    };
    Some(match request {
        Request::SoftwireAdd { softwire } => {
            let result = native.softwires().add(*softwire);
            match result {
                Ok(()) => changed(format!("softwire added: {softwire}")),
                Err(e) => Response::Error(format!("{e:#}")),
            }
        }
        Request::SoftwireDel { ipv4, psid } => {
            let result = native.softwires().del((*ipv4, *psid));
            match result {
                Ok(sw) => changed(format!("softwire removed: {sw}")),
                Err(e) => Response::Error(format!("{e:#}")),
            }
        }
        Request::SoftwireList => {
            let softwires = native.softwires();
            let rows = softwires
                .table()
                .iter()
                .map(|sw| api::SoftwireRow {
                    ipv4: sw.ipv4,
                    psid: sw.psid,
                    psid_len: sw.psid_len,
                    psid_offset: sw.psid_offset,
                    b4: sw.b4,
                    aftr: sw.aftr.unwrap_or(native.tunnel_addr),
                    port_count: sw.port_count(),
                })
                .collect();
            Response::Ok(api::Reply::Softwires(rows))
        }
        _ => return None,
    })
}

/// Applies the softwire table of a reloaded configuration: the report lines.
pub fn reload_softwires(native: &Native, table: Table) -> Result<Vec<String>, String> {
    let diff = native
        .softwires()
        .apply(table)
        .map_err(|e| format!("{e:#}"))?;
    let mut lines: Vec<String> = diff
        .remove
        .iter()
        .map(|sw| format!("softwire removed: {sw}"))
        .collect();
    lines.extend(
        diff.write
            .iter()
            .map(|sw| format!("softwire written: {sw}")),
    );
    Ok(lines)
}

impl Aftr {
    async fn reload(&self, new: ServerConfig) -> Result<Vec<String>, String> {
        let mut running = self.running.lock().await;
        if !new.pool.is_empty() {
            return Err(
                "--pool: a pure lwAFTR becomes a server with a pool only by a restart".into(),
            );
        }
        let table = softwire_table(&new).map_err(|e| format!("{e:#}"))?;
        let mut changes = super::restart_only(&[
            ("v6-dev", &running.v6_dev, &new.v6_dev),
            ("v4-dev", &running.v4_dev, &new.v4_dev),
            ("tunnel-addr", &running.tunnel_addr, &new.tunnel_addr),
            ("no-hairpin", &running.no_hairpin, &new.no_hairpin),
            ("xdp", &running.xdp, &new.xdp),
            ("max-bindings", &running.max_bindings, &new.max_bindings),
            ("metrics", &running.metrics, &new.metrics),
        ]);
        changes.extend(reload_softwires(&self.native, table)?);
        running.bindings = new.bindings;
        if changes.is_empty() {
            changes.push("nothing changed".into());
        }
        for c in &changes {
            info!("reload: {c}");
        }
        Ok(changes)
    }
}

/// Runs the pure lwAFTR with `args` (no `--pool`); `source` re-reads it for a reload.
pub async fn run(args: ServerConfig, source: super::Source<ServerConfig>) -> Result<()> {
    let instance = args.instance.clone();
    super::claim(&instance)?;
    let (Some(v6_dev), Some(v4_dev)) = (&args.v6_dev, &args.v4_dev) else {
        return Err(crate::usage::usage(
            "a server without --pool is a pure lwAFTR: it needs --bindings, --v6-dev, \
             --v4-dev and --tunnel-addr",
        ));
    };
    let Some(tunnel_addr) = args.tunnel_addr else {
        return Err(crate::usage::usage(
            "a pure lwAFTR (no --pool) needs --tunnel-addr: the IPv6 address B4s send \
             IPv4-in-IPv6 to",
        ));
    };
    let table = softwire_table(&args)?;
    let nl = Netlink::connect()?;
    crate::tundev::ensure_ipv4_forwarding("B4s' traffic is routed through this host")?;
    // The slow path's door: what the fast path hands over arrives here, and what the kernel
    // is to route toward the internet is written here.
    let tun = tundev::create(&args.tun)?;
    let tun_index = nl.index(&args.tun).await?;
    nl.up(tun_index, tundev::TUN_MTU).await?;
    let receiver = softwire_slow::ipip_receiver()?;
    let pin_dir = instance.pin_dir();
    let _pins = PinGuard(Some(pin_dir.clone()));
    let native = Native::start(
        &nl,
        NativeArgs {
            v6_dev,
            v4_dev,
            tunnel_addr,
            tun_index,
            pin_dir,
            policy_icmp: args.policy_icmp,
            max_bindings: args.max_bindings,
            native_clients: false,
            softwires: table,
            no_hairpin: args.no_hairpin,
            softwire_slow_path: true,
            xdp: args.xdp,
        },
    )
    .await
    .context("starting the lwAFTR fast path")?;
    // Native clients never bind here (no control channel): bindings an earlier run with a
    // pool pinned must not keep forwarding.
    if let Err(e) = native.reconcile(&[]) {
        warn!("removing pinned native bindings: {e:#}");
    }
    let aftr = Arc::new(Aftr {
        native,
        running: tokio::sync::Mutex::new(args.clone()),
        instance: instance.clone(),
        started: Instant::now(),
        slow: SoftwireSlowPath::new(tun, args.no_hairpin),
    });
    let reload = super::reloader(source, aftr.clone(), |aftr, cfg| {
        Box::pin(async move { aftr.reload(cfg?).await })
    });
    let daemon = super::Daemon::start(&instance, aftr.clone(), args.metrics)
        .await?
        .with_reload(reload);
    info!(
        "lwAFTR {tunnel_addr} on {v6_dev} (B4s) and {v4_dev} (IPv4): {} softwires{}",
        aftr.native.softwires().table().len(),
        if args.no_hairpin {
            ", no hairpinning"
        } else {
            ""
        }
    );
    let slow_path = async {
        let a = aftr.clone();
        let tun = async move {
            let mut buf = vec![0u8; 65536];
            loop {
                let n = tundev::recv(&a.slow.tun, &mut buf).await;
                a.slow.toward_b4(&a.native, &buf[..n]).await;
            }
        };
        tokio::join!(tun, aftr.slow.b4_reader(&aftr.native, receiver));
    };
    daemon.run(slow_path, "stopping").await;
    Ok(())
}
