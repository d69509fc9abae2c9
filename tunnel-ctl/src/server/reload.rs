//! Reload (SIGHUP, `tunnel-ctl reload`; SPEC §8): the server compares the re-read
//! configuration with the one it runs and applies the difference in place, without dropping
//! a session: pool ranges (a withdrawn address's lease ends with 110 "address withdrawn" and
//! is never granted again), `--allow`, the limits, DNS and timers for new leases and
//! sessions. A setting that only a restart can change is reported, not applied. An invalid
//! file never gets here: the caller refuses it whole.
use std::collections::HashSet;

use ipnet::Ipv4Net;
use tracing::{info, warn};

use super::{Config, Server, dns_of, machine};
use crate::{config::ServerConfig, pool::Pool};

/// What a reload did, one line each (or why it did nothing).
pub type Changes = Vec<String>;

impl Server {
    /// Applies `new` (see the module header). Err: nothing was changed.
    pub async fn reload(&self, new: ServerConfig) -> Result<Changes, String> {
        let mut running = self.running.lock().await;
        new.timers.check().map_err(|e| format!("{e:#}"))?;
        // A pool that cannot be built is refused before anything changes.
        Pool::new(&new.pool, &[new.gateway], new.hold).map_err(|e| format!("--pool: {e}"))?;
        let mut changes = restart_only(&running, &new);
        if let Some(native) = &self.native {
            let mut table = super::softwire_table(&new).map_err(|e| format!("{e:#}"))?;
            // The softwires of shared leases are the lease table's, not the file's: they stay.
            let shared = self.lock().shared_softwires();
            for sw in shared {
                table.insert(sw).map_err(|e| {
                    format!(
                        "--bindings: {e} (shared lease {} psid {})",
                        sw.ipv4, sw.psid
                    )
                })?;
            }
            changes.extend(crate::daemon::aftr::reload_softwires(native, table)?);
        } else if new.bindings.is_some() {
            return Err(
                "--bindings needs native mode (--v6-dev, --v4-dev): restart with it".into(),
            );
        }

        // With a shared store the database holds the pool's rows: a restart adds new ones.
        let shared_store = matches!(self.store, super::store::LeaseStore::Postgres(_));
        if running.pool != new.pool && shared_store {
            changes.push(format!(
                "pool: not changed, it needs a restart with --lease-store postgres (running {}, \
                 file {})",
                list(&running.pool),
                list(&new.pool)
            ));
        } else if running.pool != new.pool {
            changes.push(self.reshape_pool(&running, &new).await?);
        }
        let mut cfg: Config = self.cfg();
        let dns = dns_of(&new);
        let mut changed = |name: &str, old: String, now: String| {
            if old != now {
                changes.push(format!("{name}: {old} → {now}"));
            }
        };
        changed("allow", list(&running.allow), list(&new.allow));
        changed("dns", list(&cfg.dns), list(&dns));
        for (name, old, now) in [
            ("max-sessions", running.max_sessions, new.max_sessions),
            ("max-per-source", running.max_per_source, new.max_per_source),
            (
                "max-leases-per-prefix",
                running.max_leases_per_prefix,
                new.max_leases_per_prefix,
            ),
            (
                "max-leases-per-address",
                running.max_leases_per_address,
                new.max_leases_per_address,
            ),
        ] {
            changed(name, old.to_string(), now.to_string());
        }
        for (name, old, now) in [
            (
                "max-connect-rate",
                running.max_connect_rate,
                new.max_connect_rate,
            ),
            ("session-queue", running.session_queue, new.session_queue),
            ("session-buffer", running.session_buffer, new.session_buffer),
        ] {
            changed(name, old.to_string(), now.to_string());
        }
        changed(
            "prefix-len",
            running.prefix_len.to_string(),
            new.prefix_len.to_string(),
        );
        for (name, old, now) in [
            ("keepalive", running.timers.keepalive, new.timers.keepalive),
            ("timeout", running.timers.timeout, new.timers.timeout),
            (
                "handshake-timeout",
                running.handshake_timeout,
                new.handshake_timeout,
            ),
        ] {
            changed(name, format!("{old:?}"), format!("{now:?}"));
        }

        cfg.allow = new.allow.clone();
        cfg.dns = dns;
        cfg.max_sessions = new.max_sessions;
        cfg.keepalive = new.timers.keepalive;
        cfg.timeout = new.timers.timeout;
        cfg.handshake_timeout = new.handshake_timeout;
        cfg.session_queue = new.session_queue as usize;
        cfg.session_buffer = new.session_buffer as usize;
        *self.cfg.write().unwrap_or_else(|p| p.into_inner()) = cfg;
        let session = self.session_cfg();
        *self.session_cfg.write().unwrap_or_else(|p| p.into_inner()) =
            std::sync::Arc::new(machine::SessionConfig {
                keepalive: new.timers.keepalive,
                timeout: new.timers.timeout,
                handshake_timeout: new.handshake_timeout,
                dns,
                native: session.native,
                ipv6: session.ipv6.clone(),
                sharing: session.sharing,
            });
        self.admission
            .set_limits(new.max_per_source, new.max_connect_rate);
        self.lock().limits = super::state::LeaseLimits {
            per_prefix: new.max_leases_per_prefix,
            prefix_len: new.prefix_len,
            per_address: new.max_leases_per_address,
        };

        // What only a restart changes keeps its running value.
        let applied = ServerConfig {
            pool: if shared_store {
                running.pool.clone()
            } else {
                new.pool
            },
            dns: new.dns,
            timers: new.timers,
            allow: new.allow,
            max_sessions: new.max_sessions,
            max_per_source: new.max_per_source,
            max_leases_per_prefix: new.max_leases_per_prefix,
            prefix_len: new.prefix_len,
            max_leases_per_address: new.max_leases_per_address,
            max_connect_rate: new.max_connect_rate,
            handshake_timeout: new.handshake_timeout,
            session_queue: new.session_queue,
            session_buffer: new.session_buffer,
            ..running.clone()
        };
        *running = applied;
        self.stats.reloads.inc();
        if changes.is_empty() {
            changes.push("nothing changed".into());
        }
        for c in &changes {
            info!("reload: {c}");
        }
        Ok(changes)
    }

    /// New pool ranges: routes for the new ones, the withdrawn addresses' leases ended.
    async fn reshape_pool(
        &self,
        running: &ServerConfig,
        new: &ServerConfig,
    ) -> Result<String, String> {
        let (held, ended) = self
            .lock()
            .reshape_pool(&new.pool)
            .map_err(|e| format!("--pool: {e}"))?;
        let nets = |ranges: &[crate::pool::Range4]| -> HashSet<Ipv4Net> {
            ranges.iter().flat_map(|r| r.subnets()).collect()
        };
        let (old_nets, new_nets) = (nets(&running.pool), nets(&new.pool));
        for net in new_nets.difference(&old_nets) {
            if let Err(e) = self.nl.route(*net, self.tun_index).await {
                warn!("reload: route {net} to the TUN: {e:#}");
            }
        }
        for net in old_nets.difference(&new_nets) {
            if let Err(e) = self.nl.del_route(*net, self.tun_index).await {
                warn!("reload: removing route {net}: {e:#}");
            }
        }
        let links: Vec<_> = {
            let state = self.lock();
            held.iter()
                .filter_map(|(_, id)| state.links.get(id).map(|l| l.withdraw.clone()))
                .collect()
        };
        for w in links {
            w.notify_one();
        }
        self.stats.leases_withdrawn.add(ended.len() as u64);
        self.ended(&ended);
        let withdrawn = held.len() + ended.len();
        Ok(format!(
            "pool: {} → {} ({withdrawn} leases withdrawn)",
            list(&running.pool),
            list(&new.pool)
        ))
    }
}

/// The settings that differ but take a restart, as report lines.
fn restart_only(running: &ServerConfig, new: &ServerConfig) -> Changes {
    let (r, n) = (running, new);
    crate::daemon::restart_only(&[
        ("listen", &r.listen, &n.listen),
        ("gateway", &r.gateway, &n.gateway),
        ("hold", &r.hold, &n.hold),
        ("tun", &r.tun, &n.tun),
        ("tun-queues", &r.tun_queues, &n.tun_queues),
        ("no-tun-offload", &!r.tun_offload, &!n.tun_offload),
        ("max-bindings", &r.max_bindings, &n.max_bindings),
        ("pool6", &r.pool6, &n.pool6),
        ("delegate", &r.delegate, &n.delegate),
        ("delegate-len", &r.delegate_len, &n.delegate_len),
        ("dns6", &r.dns6, &n.dns6),
        ("proxy-ndp", &r.proxy_ndp, &n.proxy_ndp),
        ("allow-in", &r.allow_in, &n.allow_in),
        ("v6-dev", &r.v6_dev, &n.v6_dev),
        ("v4-dev", &r.v4_dev, &n.v4_dev),
        ("tunnel-addr", &r.tunnel_addr, &n.tunnel_addr),
        ("policy-icmp", &r.policy_icmp, &n.policy_icmp),
        ("no-hairpin", &r.no_hairpin, &n.no_hairpin),
        ("xdp", &r.xdp, &n.xdp),
        ("share", &r.share, &n.share),
        ("psid-offset", &r.psid_offset, &n.psid_offset),
        ("state-dir", &r.state_dir, &n.state_dir),
        ("lease-store", &r.lease_store, &n.lease_store),
        ("node-id", &r.node_id, &n.node_id),
        ("client-key", &r.client_key, &n.client_key),
        ("metrics", &r.metrics, &n.metrics),
    ])
}

fn list<T: std::fmt::Display>(items: &[T]) -> String {
    if items.is_empty() {
        return "(none)".into();
    }
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}
