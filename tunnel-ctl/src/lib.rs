//! `tunnel-ctl`: the controller of the tunnel. One binary runs the daemons (server, client, MAP-E
//! CE/BR, the monitor) and the management commands that talk to them.
//!
//! The library half exists so that the integration tests can load the same embedded eBPF object
//! and speak the same management protocol as the binary.

pub mod cli;
pub mod client;
pub mod config;
pub mod counters;
pub mod dataplane;
pub mod dns;
#[doc(hidden)]
pub mod fuzzing;
pub mod instance;
pub mod mape;
pub mod metrics;
pub mod mgmt;
pub mod monitor;
pub mod netlink;
pub mod packet;
pub mod pool;
pub mod pool6;
pub mod protocol;
pub mod report;
pub mod server;
pub mod softwire;
pub mod systemd;
pub mod tundev;
pub mod usage;

/// Resolves on SIGINT or SIGTERM and says which. SIGHUP (an operator's "reload", or a
/// closed terminal) would otherwise end the daemon without clean-up: it is logged and
/// ignored until reload exists.
pub async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        // Without signal handling the default action (exit) applies; wait forever.
        return std::future::pending().await;
    };
    loop {
        tokio::select! {
            _ = int.recv() => return "SIGINT",
            _ = term.recv() => return "SIGTERM",
            _ = hup.recv() => tracing::warn!(
                "SIGHUP ignored: this version cannot reload its configuration; restart the \
                 daemon to change it (SIGTERM stops it cleanly)"
            ),
        }
    }
}
