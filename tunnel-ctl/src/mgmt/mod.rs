//! The management socket: one JSON object per line each way, on `/run/tunnel/INSTANCE.sock`
//! (mode 0600, so only root can talk to a daemon).
//!
//! Request: `{"cmd":"stats"}`. Response: `{"ok":{...}}` or `{"error":"what went wrong"}`.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::{fs::PermissionsExt as _, net::UnixStream as StdUnixStream},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};
use serde::Deserialize;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader as TokioBufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};
use tracing::{debug, warn};

use crate::instance::{Instance, RUN_DIR};

pub mod api;

pub use api::{Reply, Request, Response, Status};

/// What a reload reports: the changes made, one line each; Err: refused, nothing changed.
pub type ReloadResult = std::result::Result<Vec<String>, String>;

/// Longest request line a daemon accepts.
const MAX_REQUEST: usize = 64 * 1024;
/// How long a management command waits for a daemon's answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// The answer of a daemon of kind `role` to a request it has nothing for.
pub fn not_supported(role: &str, request: &Request) -> Response {
    Response::Error(format!(
        "a {role} has no {}; check --instance",
        request.subject()
    ))
}

/// A [`Response`] as the command-line side reads it: the reply stays JSON, for printing.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
enum WireResponse {
    Ok(serde_json::Value),
    Error(String),
}

/// What a daemon answers requests with.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, request: Request) -> Response;
}

/// The bound socket of a daemon; removes the socket file when dropped.
pub struct Listener {
    listener: UnixListener,
    path: PathBuf,
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Fails with a clear message when a daemon of `instance` is already running. Daemons call it
/// before touching anything, and [`bind`] once they are ready to serve.
pub fn ensure_not_running(instance: &Instance) -> Result<()> {
    let path = instance.socket_path();
    if StdUnixStream::connect(&path).is_ok() {
        bail!(
            "instance '{}' is already running (socket {}); stop it or pick another --instance",
            instance.name(),
            path.display()
        );
    }
    Ok(())
}

/// Binds the instance's socket. Fails with a clear message when another daemon of the same
/// instance is running; removes a stale socket left by a killed one. Bind when ready to
/// serve: tools wait for the socket to know that the daemon is up.
pub fn bind(instance: &Instance) -> Result<Listener> {
    std::fs::create_dir_all(RUN_DIR).with_context(|| format!("creating {RUN_DIR}"))?;
    let path = instance.socket_path();
    if path.exists() {
        if StdUnixStream::connect(&path).is_ok() {
            bail!(
                "instance '{}' is already running (socket {}); stop it or pick another --instance",
                instance.name(),
                path.display()
            );
        }
        std::fs::remove_file(&path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", path.display()))?;
    Ok(Listener { listener, path })
}

impl Listener {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves requests until the task is dropped. One task per connection; a bad client only
    /// gets an error answer.
    /// Answers requests for the daemon's life. Serving is what "up" means: systemd hears
    /// READY=1 here, and the watchdog (if the unit has one) starts.
    pub async fn serve(
        &self,
        handler: Arc<dyn Handler>,
        reload: Option<mpsc::Sender<oneshot::Sender<ReloadResult>>>,
    ) {
        crate::systemd::ready(&format!("serving {}", self.path.display()));
        if let Some(every) = crate::systemd::watchdog_interval() {
            tokio::spawn(crate::systemd::watchdog(every));
        }
        let status_of = handler.clone();
        tokio::spawn(crate::systemd::status_updates(move || {
            match status_of.handle(Request::Status) {
                Response::Ok(Reply::Status(s)) => Some(s.line()),
                _ => None,
            }
        }));
        loop {
            match self.listener.accept().await {
                Ok((stream, _)) => {
                    let handler = handler.clone();
                    let reload = reload.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve_connection(stream, handler, reload).await {
                            debug!("management connection: {e:#}");
                        }
                    });
                }
                Err(e) => {
                    warn!("management socket accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

async fn serve_connection(
    stream: UnixStream,
    handler: Arc<dyn Handler>,
    reload: Option<mpsc::Sender<oneshot::Sender<ReloadResult>>>,
) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = TokioBufReader::new(read.take_limit()).lines();
    while let Some(line) = lines.next_line().await? {
        let response = match serde_json::from_str::<Request>(&line) {
            // A reload is the daemon's main loop's to run (it may take a while, and it is
            // async): ask it and wait.
            Ok(Request::Reload) => {
                let (tx, rx) = oneshot::channel();
                let asked = match &reload {
                    Some(r) => r.send(tx).await.is_ok(),
                    None => false,
                };
                match (asked, rx.await) {
                    (true, Ok(Ok(changes))) => Response::Ok(Reply::Changed(changes)),
                    (true, Ok(Err(e))) => Response::Error(e),
                    _ => Response::Error("this daemon cannot reload its configuration".into()),
                }
            }
            Ok(request) => handler.handle(request),
            Err(e) => Response::Error(format!("bad request: {e}")),
        };
        let mut out = serde_json::to_vec(&response)?;
        out.push(b'\n');
        write.write_all(&out).await?;
    }
    Ok(())
}

trait TakeLimit: Sized {
    fn take_limit(self) -> tokio::io::Take<Self>;
}

impl<T: tokio::io::AsyncRead> TakeLimit for T {
    fn take_limit(self) -> tokio::io::Take<Self> {
        tokio::io::AsyncReadExt::take(self, MAX_REQUEST as u64)
    }
}

/// Sends one request to the daemon of `instance` and returns its answer.
pub fn request(instance: &Instance, request: &Request) -> Result<serde_json::Value> {
    let path = instance.socket_path();
    let stream = StdUnixStream::connect(&path).map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => format!(
                "no daemon is running for instance '{}' ({} missing or stale); start one, or pass --instance",
                instance.name(),
                path.display()
            ),
            std::io::ErrorKind::PermissionDenied => format!(
                "permission denied on {}: management commands need root",
                path.display()
            ),
            _ => format!("connecting to {}: {e}", path.display()),
        };
        anyhow!(hint)
    })?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    (&stream).write_all(&line)?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .with_context(|| format!("reading the answer from {}", path.display()))?;
    if answer.is_empty() {
        bail!("the daemon closed {} without answering", path.display());
    }
    match serde_json::from_str::<WireResponse>(&answer).context("daemon sent a malformed answer")? {
        WireResponse::Ok(value) => Ok(value),
        WireResponse::Error(message) => Err(anyhow!("daemon: {message}")),
    }
}

/// The answer to `stats`: the controller's counters, plus the eBPF counters when the daemon
/// runs a data path (an error reading them is the answer then).
pub fn counters_response(
    controller: std::collections::BTreeMap<&'static str, u64>,
    ebpf: Option<Result<crate::dataplane::stats::Counters>>,
) -> Response {
    let mut all: std::collections::BTreeMap<String, u64> = controller
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    match ebpf {
        Some(Ok(c)) => all.extend(c.into_iter().map(|(k, v)| (k.to_owned(), v))),
        Some(Err(e)) => return Response::Error(format!("{e:#}")),
        None => {}
    }
    Response::Ok(Reply::Counters(all))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The module header's wire format, as the command-line side reads it.
    #[test]
    fn answers_parse_as_ok_or_error() {
        let ok = serde_json::from_str::<WireResponse>(r#"{"ok":{"a":1}}"#).unwrap();
        assert!(matches!(ok, WireResponse::Ok(v) if v == serde_json::json!({"a": 1})));
        let err = serde_json::from_str::<WireResponse>(r#"{"error":"x"}"#).unwrap();
        assert!(matches!(err, WireResponse::Error(e) if e == "x"));
    }

    /// SPEC §10: `stats --json` is an object of counter name → integer, the controller's and
    /// the eBPF counters together; a failed eBPF read is an error, not a partial answer.
    #[test]
    fn stats_answer_is_counter_name_to_integer() {
        let controller = [("sessions", 3u64), ("leases", 2)].into_iter().collect();
        let ebpf: crate::dataplane::stats::Counters = [("decap", 7u64)].into_iter().collect();
        let line = serde_json::to_string(&counters_response(controller, Some(Ok(ebpf)))).unwrap();
        assert_eq!(line, r#"{"ok":{"decap":7,"leases":2,"sessions":3}}"#);
        let failed = counters_response(Default::default(), Some(Err(anyhow!("map gone"))));
        assert_eq!(failed, Response::Error("map gone".into()));
    }
}
