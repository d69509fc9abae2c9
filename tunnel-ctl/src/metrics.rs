//! `--metrics ADDR:PORT`: the daemon's counters and state for Prometheus, at `/metrics`, in
//! the OpenMetrics text format (the `prometheus-client` crate encodes it).
//!
//! Each scrape asks the daemon's own management handler, so `/metrics` and `tunnel-ctl stats`
//! can never disagree: every `stats` counter becomes `tunnel_<name>_total`, every integer of
//! `status` (sessions, leases, mappings, …) a gauge `tunnel_<name>`, plus
//! `tunnel_build_info{version=…}`, and on a server each client's traffic,
//! `tunnel_client_{rx,tx}_{bytes,packets}_total{ipv4,client,mode}` (`rx`: from the client). The HTTP side is the few lines a scrape needs (one GET,
//! one answer, close), written here rather than pulling in a web framework for one route.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::ConstGauge,
        info::Info,
    },
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use tracing::{debug, info, warn};

use crate::mgmt::{Handler, Reply, Request, Response};

/// Longest request head a scrape may send.
const MAX_REQUEST: usize = 8 * 1024;
/// How long a scraper gets to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds `addr` (failing the start with a clear error when it cannot) and serves `/metrics`
/// from `handler` in the background.
pub async fn spawn(addr: Option<SocketAddr>, handler: Arc<dyn Handler>) -> Result<()> {
    let Some(addr) = addr else {
        return Ok(());
    };
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("--metrics {addr}: cannot listen there"))?;
    info!("metrics at http://{addr}/metrics");
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    let handler = handler.clone();
                    tokio::spawn(async move {
                        if let Err(e) = answer(stream, handler).await {
                            debug!("metrics request from {peer}: {e:#}");
                        }
                    });
                }
                Err(e) => {
                    warn!("metrics accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(())
}

async fn answer(mut stream: TcpStream, handler: Arc<dyn Handler>) -> Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    tokio::time::timeout(REQUEST_TIMEOUT, async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    })
    .await
    .context("request timed out")??;
    let line = String::from_utf8_lossy(&head);
    let mut words = line.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (status, kind, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            render(&*handler),
        ),
        ("GET", _) => ("404 Not Found", "text/plain", "only /metrics here\n".into()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET /metrics\n".into(),
        ),
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(reply.as_bytes()).await?;
    stream.shutdown().await?;
    Ok(())
}

/// The exposition text for what `handler` reports now.
pub fn render(handler: &dyn Handler) -> String {
    let mut registry = Registry::default();
    registry.register(
        "tunnel_build",
        "tunnel-ctl version",
        Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
    );
    if let Response::Ok(Reply::Counters(stats)) = handler.handle(Request::Stats) {
        for (name, v) in stats {
            registry.register(
                format!("tunnel_{}", metric_name(&name)),
                format!("the {name} counter of tunnel-ctl stats"),
                ConstCounter::new(v),
            );
        }
    }
    if let Response::Ok(status @ Reply::Status(_)) = handler.handle(Request::Status) {
        // The integers of the status object (sessions, leases, mappings ...) as gauges.
        let status = serde_json::to_value(&status).unwrap_or_default();
        for (name, value) in status.as_object().into_iter().flatten() {
            // Identity and clocks are not state; counters are reported above.
            if matches!(
                name.as_str(),
                "pid" | "uptime_s" | "psid" | "psid_len" | "psid_offset"
            ) {
                continue;
            }
            if let Some(v) = value.as_i64() {
                registry.register(
                    format!("tunnel_{}", metric_name(name)),
                    format!("{name} in tunnel-ctl status"),
                    ConstGauge::new(v),
                );
            }
        }
    }
    if let Response::Ok(Reply::Leases(rows)) = handler.handle(Request::Leases) {
        client_traffic(&mut registry, &rows);
    }
    let mut text = String::new();
    let _ = encode(&mut text, &registry);
    text
}

/// `tunnel_client_*_total{ipv4,client,mode}`: one series per lease and figure; a lease that
/// ended is simply absent from the next scrape.
fn client_traffic(registry: &mut Registry, rows: &[crate::mgmt::api::LeaseRow]) {
    type Labels = Vec<(&'static str, String)>;
    type Figure = fn(&crate::mgmt::api::Traffic) -> u64;
    let families: [(&str, &str, Figure); 4] = [
        ("rx_bytes", "IP bytes received from the client", |t| {
            t.rx_bytes
        }),
        ("tx_bytes", "IP bytes sent to the client", |t| t.tx_bytes),
        ("rx_packets", "IP packets received from the client", |t| {
            t.rx_packets
        }),
        ("tx_packets", "IP packets sent to the client", |t| {
            t.tx_packets
        }),
    ];
    for (name, help, get) in families {
        let family = Family::<Labels, Counter>::default();
        for row in rows {
            let labels = vec![
                ("ipv4", row.ipv4.to_string()),
                ("client", row.client.clone()),
                ("mode", row.mode.to_owned()),
            ];
            family.get_or_create(&labels).inc_by(get(&row.traffic));
        }
        registry.register(format!("tunnel_client_{name}"), help, family);
    }
}

/// A counter or field name as a metric name: `[a-zA-Z0-9_]`, without a `_total` suffix (the
/// encoder adds it to counters).
fn metric_name(name: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    clean.trim_end_matches("_total").to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mgmt::api;

    struct Fixed;

    impl Handler for Fixed {
        fn handle(&self, request: Request) -> Response {
            match request {
                Request::Stats => Response::Ok(Reply::Counters(
                    [("leases_granted", 3), ("fastpath_decap_packets", 12)]
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v))
                        .collect(),
                )),
                Request::Status => api::Status::Server(api::example_server_status()).into(),
                _ => Response::Error("no".into()),
            }
        }
    }

    #[test]
    fn counters_and_status_integers_are_exposed() {
        let text = render(&Fixed);
        for line in [
            "# TYPE tunnel_leases_granted counter",
            "tunnel_leases_granted_total 3",
            "tunnel_fastpath_decap_packets_total 12",
            "# TYPE tunnel_sessions gauge",
            "tunnel_sessions 2",
            "tunnel_build_info{version=\"",
            "# EOF",
        ] {
            assert!(text.contains(line), "{line:?} not in:\n{text}");
        }
        assert!(!text.contains("tunnel_pid"), "{text}");
        assert!(!text.contains("tunnel_role"), "{text}");
    }
}
