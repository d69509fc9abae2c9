//! systemd's notification protocol (sd_notify(3), through the `sd-notify` crate): `READY=1`
//! once a daemon serves its management socket (what `Type=notify` units wait for), and
//! `WATCHDOG=1` at half the unit's `WatchdogSec` while the runtime is alive, and `STATUS=`
//! lines (`systemctl status` shows them: sessions and leases, mappings, ...) when they change.
//! Without `NOTIFY_SOCKET` (not started by systemd) nothing is sent.
use std::time::Duration;

use sd_notify::NotifyState;
use tracing::debug;

/// Tells systemd the daemon is up, with a status line.
pub fn ready(status: &str) {
    if let Err(e) = sd_notify::notify(false, &[NotifyState::Ready, NotifyState::Status(status)]) {
        debug!("sd_notify READY: {e}");
    }
}

/// Keeps systemd's status line at what `status` says (checked every 2 s, sent on change).
pub async fn status_updates(status: impl Fn() -> Option<String>) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return std::future::pending().await;
    }
    let mut last = String::new();
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tick.tick().await;
        if let Some(line) = status()
            && line != last
        {
            if let Err(e) = sd_notify::notify(false, &[NotifyState::Status(&line)]) {
                debug!("sd_notify STATUS: {e}");
            }
            last = line;
        }
    }
}

/// Half the watchdog period systemd asked for (`WATCHDOG_USEC` for this pid), if any.
pub fn watchdog_interval() -> Option<Duration> {
    let mut usec = 0;
    (sd_notify::watchdog_enabled(false, &mut usec) && usec > 0)
        .then(|| Duration::from_micros(usec / 2))
}

/// Sends `WATCHDOG=1` every `every`, for as long as the runtime runs the task: a daemon
/// whose runtime is stuck stops sending, and systemd restarts it.
pub async fn watchdog(every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        if let Err(e) = sd_notify::notify(false, &[NotifyState::Watchdog]) {
            debug!("sd_notify WATCHDOG: {e}");
        }
    }
}
