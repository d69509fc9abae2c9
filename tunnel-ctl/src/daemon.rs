//! The skeleton every daemon runs on (server, client, MAP-E CE and BR, monitor): refuse to
//! start twice, serve metrics and the management socket once ready (systemd hears READY=1
//! then), run the daemon's own tasks until one ends or SIGINT/SIGTERM arrives, and return so
//! that the daemon cleans up. A daemon's `run` is its set-up, [`Daemon::run`] and its
//! clean-up, nothing else.
use std::{future::Future, net::SocketAddr, path::Path, sync::Arc};

use anyhow::Result;
use tracing::info;

use crate::{
    instance::Instance,
    mgmt::{self, Handler},
};

/// Fails with a clear message when a daemon of `instance` is already running. Called before
/// anything is touched.
pub fn claim(instance: &Instance) -> Result<()> {
    mgmt::ensure_not_running(instance)
}

/// A daemon that is set up and about to serve.
pub struct Daemon {
    listener: mgmt::Listener,
    handler: Arc<dyn Handler>,
}

impl Daemon {
    /// Starts `--metrics` (if given) and binds the management socket: from here on tools
    /// see the daemon as up.
    pub async fn start(
        instance: &Instance,
        handler: Arc<dyn Handler>,
        metrics: Option<SocketAddr>,
    ) -> Result<Daemon> {
        crate::metrics::spawn(metrics, handler.clone()).await?;
        let listener = mgmt::bind(instance)?;
        Ok(Daemon { listener, handler })
    }

    pub fn socket(&self) -> &Path {
        self.listener.path()
    }

    /// Serves until `work` ends or a signal asks to stop (logged with `on_signal`, what the
    /// daemon does next). The socket goes when this returns.
    pub async fn run(self, work: impl Future<Output = ()>, on_signal: &str) {
        tokio::select! {
            () = work => {}
            () = self.listener.serve(self.handler.clone()) => {}
            signal = shutdown_signal() => info!("{signal}: {on_signal}"),
        }
    }
}

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
