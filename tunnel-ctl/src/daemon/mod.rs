//! The skeleton every daemon runs on (server, client, MAP-E CE and BR, monitor): refuse to
//! start twice, serve metrics and the management socket once ready (systemd hears READY=1
//! then), run the daemon's own tasks until one ends or SIGINT/SIGTERM arrives, and return so
//! that the daemon cleans up. A daemon's `run` is its set-up, [`Daemon::run`] and its
//! clean-up, nothing else.
use std::{future::Future, net::SocketAddr, path::Path, pin::Pin, sync::Arc};

use anyhow::Result;
use tokio::sync::{mpsc, oneshot};
use tracing::info;

pub mod aftr;
pub mod br;
pub mod ce;
pub mod softwire_slow;

use crate::{
    instance::Instance,
    mgmt::{self, Handler},
};

/// Fails with a clear message when a daemon of `instance` is already running. Called before
/// anything is touched.
pub fn claim(instance: &Instance) -> Result<()> {
    mgmt::ensure_not_running(instance)
}

/// Re-reads the daemon's configuration the way it was given (flags and `--config` file).
pub type Source<T> = Arc<dyn Fn() -> Result<T> + Send + Sync>;

pub use crate::mgmt::ReloadResult;

/// A reload under way.
pub type Reloading = Pin<Box<dyn Future<Output = ReloadResult> + Send>>;

/// Re-reads and applies the configuration (SIGHUP, `tunnel-ctl reload`).
pub type Reloader = Arc<dyn Fn() -> Reloading + Send + Sync>;

/// A reload for `source` that `apply` carries out on `target`; `apply` also gets a file
/// that does not load (as its error), to refuse it whole.
pub fn reloader<T, S>(
    source: Source<T>,
    target: Arc<S>,
    apply: fn(Arc<S>, std::result::Result<T, String>) -> Reloading,
) -> Reloader
where
    T: Send + 'static,
    S: Send + Sync + 'static,
{
    Arc::new(move || apply(target.clone(), source().map_err(|e| format!("{e:#}"))))
}

/// The report lines of a reload for settings that differ between the running configuration
/// and the file but take a restart: (key, running value, file value).
pub fn restart_only(fields: &[(&str, &dyn std::fmt::Debug, &dyn std::fmt::Debug)]) -> Vec<String> {
    fields
        .iter()
        .map(|(k, a, b)| (k, format!("{a:?}"), format!("{b:?}")))
        .filter(|(_, a, b)| a != b)
        .map(|(k, a, b)| format!("{k}: not changed, it needs a restart (running {a}, file {b})"))
        .collect()
}

/// A daemon that is set up and about to serve.
pub struct Daemon {
    listener: mgmt::Listener,
    handler: Arc<dyn Handler>,
    reload: Option<Reloader>,
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
        Ok(Daemon {
            listener,
            handler,
            reload: None,
        })
    }

    /// SIGHUP and `tunnel-ctl reload` run `reload`; without one they are refused with a word.
    pub fn with_reload(mut self, reload: Reloader) -> Daemon {
        self.reload = Some(reload);
        self
    }

    pub fn socket(&self) -> &Path {
        self.listener.path()
    }

    /// Serves until `work` ends or a signal asks to stop (logged with `on_signal`, what the
    /// daemon does next). The socket goes when this returns. Reloads run as tasks of their
    /// own, so the daemon's work goes on meanwhile.
    pub async fn run(self, work: impl Future<Output = ()>, on_signal: &str) {
        use tokio::signal::unix::{SignalKind, signal};
        let (tx, mut rx) = mpsc::channel::<oneshot::Sender<ReloadResult>>(8);
        let serve = self.listener.serve(self.handler.clone(), Some(tx));
        let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) else {
            // Without signal handling the default action (exit) applies.
            tokio::select! {
                () = work => {}
                () = serve => {}
            }
            return;
        };
        tokio::pin!(work, serve);
        let reload = |reply: Option<oneshot::Sender<ReloadResult>>| {
            let Some(reload) = self.reload.clone() else {
                let no = "this daemon cannot reload its configuration; restart it to change it";
                match reply {
                    Some(r) => drop(r.send(Err(no.into()))),
                    None => tracing::warn!("SIGHUP ignored: {no}"),
                }
                return;
            };
            tokio::spawn(async move {
                let result = reload().await;
                if let Err(e) = &result {
                    tracing::warn!("reload refused, the running configuration stays: {e}");
                }
                if let Some(r) = reply {
                    let _ = r.send(result);
                }
            });
        };
        loop {
            tokio::select! {
                () = &mut work => return,
                () = &mut serve => return,
                _ = int.recv() => return info!("SIGINT: {on_signal}"),
                _ = term.recv() => return info!("SIGTERM: {on_signal}"),
                _ = hup.recv() => {
                    info!("SIGHUP: reloading the configuration");
                    reload(None);
                }
                Some(reply) = rx.recv() => reload(Some(reply)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_settings_that_differ_are_reported_with_both_values() {
        let lines = super::restart_only(&[
            ("listen", &"[::]:5678", &"[::]:5679"),
            ("tun", &"tun4o6", &"tun4o6"),
        ]);
        assert_eq!(
            lines,
            vec![
                "listen: not changed, it needs a restart (running \"[::]:5678\", file \"[::]:5679\")"
                    .to_string()
            ]
        );
    }
}
