//! Operations (issue 26, part): systemd's notification protocol, JSON logs, and the example
//! units in `dist/systemd/`.
use std::{
    os::unix::net::{UnixDatagram, UnixStream},
    path::Path,
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use tunnel_tests::{Lab, tunnel_ctl_bin};

/// Under a fake `NOTIFY_SOCKET` (what systemd gives a `Type=notify` unit), a daemon sends
/// READY=1 only once its management socket accepts, then WATCHDOG=1 again and again at half
/// of `WATCHDOG_USEC`; with `--log-format json` every log line is a JSON object.
#[test]
fn a_daemon_tells_systemd_it_is_ready_keeps_the_watchdog_and_logs_json() -> Result<()> {
    let mut lab = Lab::new()?;
    let a = lab.ns("a")?;
    let b = lab.ns("b")?;
    lab.veth(&a, "veth-a", &b, "veth-b")?;
    let instance = lab.instance("notify");
    let notify = lab.dir().join("notify.sock");
    let sock = UnixDatagram::bind(&notify)?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    let log = lab.dir().join("notify-daemon.log");
    // WATCHDOG_PID must be the daemon's pid: the shell's, which exec keeps (nsenter too).
    let script = format!(
        "export WATCHDOG_PID=$$; exec nsenter --net=/run/netns/{} -- {} --log-format json \
         monitor --dev veth-b --instance {instance}",
        b.name,
        tunnel_ctl_bin()?.display()
    );
    let mut child = Command::new("sh")
        .args(["-c", &script])
        .env("NOTIFY_SOCKET", &notify)
        .env("WATCHDOG_USEC", "400000")
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let outcome = (|| -> Result<()> {
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).context("no READY=1 from the daemon")?;
        let first = String::from_utf8_lossy(&buf[..n]).into_owned();
        ensure!(
            first.lines().any(|l| l == "READY=1"),
            "first message: {first:?}"
        );
        ensure!(first.contains("STATUS=serving"), "{first:?}");
        // Ready means serving: the management socket accepts now.
        let socket = Path::new("/run/tunnel").join(format!("{instance}.sock"));
        UnixStream::connect(&socket)
            .with_context(|| format!("READY=1 before {} accepts", socket.display()))?;
        let (mut watchdogs, mut status) = (0, None);
        for _ in 0..20 {
            let n = sock.recv(&mut buf).context("the watchdog stopped")?;
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            if text.lines().any(|l| l == "WATCHDOG=1") {
                watchdogs += 1;
            }
            if let Some(s) = text.lines().find_map(|l| l.strip_prefix("STATUS=")) {
                status = Some(s.to_owned());
            }
            if watchdogs >= 3 && status.is_some() {
                break;
            }
        }
        ensure!(watchdogs >= 3, "{watchdogs} WATCHDOG=1 messages");
        // What `systemctl status` shows: the daemon's own summary.
        ensure!(
            status.as_deref() == Some("counting on veth-b"),
            "STATUS= line: {status:?}"
        );
        Ok(())
    })();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait()?;
    outcome?;
    ensure!(status.success(), "daemon exited with {status}");
    let text = std::fs::read_to_string(&log)?;
    ensure!(text.lines().count() >= 2, "log: {text}");
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))?;
        ensure!(
            v["timestamp"].is_string() && v["level"].is_string() && v["target"].is_string(),
            "missing fields: {line}"
        );
    }
    Ok(())
}

/// Every unit in dist/systemd/ passes `systemd-analyze verify` once installed (the binary
/// path filled in, templates instantiated), with no unknown or ignored setting.
#[test]
fn the_example_systemd_units_verify() -> Result<()> {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: systemd-analyze is not installed (cargo xtask setup installs it)");
        return Ok(());
    }
    let bin = tunnel_ctl_bin()?;
    let bin_dir = bin.parent().context("binary directory")?.canonicalize()?;
    let dist = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/systemd");
    let out_dir = std::env::temp_dir().join(format!("tnl-units-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir)?;
    let mut checked = 0;
    for entry in std::fs::read_dir(&dist)? {
        let src = entry?.path();
        let name = src
            .file_name()
            .and_then(|n| n.to_str())
            .context("unit name")?;
        let text = std::fs::read_to_string(&src)?.replace("@BINDIR@", &bin_dir.to_string_lossy());
        ensure!(
            !text.contains('@') || name.contains('@'),
            "{name}: placeholder left"
        );
        let instance = name.replace("@.", "@test.");
        let dst = out_dir.join(&instance);
        std::fs::write(&dst, text)?;
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&dst)
            .output()?;
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(out.status.success(), "{instance}: {said}");
        ensure!(
            !said.contains("Unknown") && !said.contains("ignoring"),
            "{instance}: {said}"
        );
        checked += 1;
    }
    std::fs::remove_dir_all(&out_dir)?;
    ensure!(checked >= 5, "only {checked} units in {}", dist.display());
    Ok(())
}

/// One sample of a scrape, as the Prometheus project's own OpenMetrics parser (its Python
/// client) reads it.
struct Sample {
    name: String,
    kind: String,
    labels: serde_json::Value,
    value: f64,
}

/// GET /metrics on `addr` inside the server's namespace, parsed by the official parser.
fn scrape(t: &tunnel_tests::fourover6::FourOverSix, addr: &str) -> Result<Vec<Sample>> {
    use std::io::{Read as _, Write as _};
    let text = t.server.enter(|| -> Result<String> {
        let mut s = std::net::TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")?;
        let mut reply = String::new();
        s.read_to_string(&mut reply)?;
        Ok(reply)
    })??;
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP header")?;
    ensure!(head.starts_with("HTTP/1.1 200"), "{head}");
    ensure!(head.contains("application/openmetrics-text"), "{head}");
    let script = "import sys, json\n\
        from prometheus_client.openmetrics.parser import text_string_to_metric_families\n\
        out = []\n\
        for fam in text_string_to_metric_families(sys.stdin.read()):\n\
        \x20   for s in fam.samples:\n\
        \x20       out.append([s.name, fam.type, s.labels, s.value])\n\
        print(json.dumps(out))\n";
    let mut py = Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    py.stdin
        .take()
        .context("stdin")?
        .write_all(body.as_bytes())?;
    let out = py.wait_with_output()?;
    ensure!(
        out.status.success(),
        "the Prometheus parser refused /metrics: {}\n{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<(String, String, serde_json::Value, f64)> = serde_json::from_slice(&out.stdout)?;
    Ok(rows
        .into_iter()
        .map(|(name, kind, labels, value)| Sample {
            name,
            kind,
            labels,
            value,
        })
        .collect())
}

/// The value of `name` for the client leased `ipv4` (checking its mode label).
fn client_sample(samples: &[Sample], name: &str, ipv4: &str, mode: &str) -> Result<f64> {
    let s = samples
        .iter()
        .find(|s| s.name == name && s.labels["ipv4"] == ipv4)
        .with_context(|| format!("no {name}{{ipv4={ipv4:?}}}"))?;
    ensure!(s.kind == "counter", "{name}: {}", s.kind);
    ensure!(s.labels["mode"] == mode, "{name}: {}", s.labels);
    ensure!(
        s.labels["client"]
            .as_str()
            .is_some_and(|c| c.starts_with("2001:db8:"))
    );
    Ok(s.value)
}

/// Issue 26, Done-when 1: a server with an in-band and a native client, scraped at
/// `--metrics` before and after a known transfer: the text parses with the Prometheus
/// project's own OpenMetrics parser, every `stats` counter is there as `tunnel_<name>_total`
/// with the value `stats` gives (read before and after the scrape), and each client's byte
/// counters (in-band: the session's; native: its binding's per-CPU eBPF counters) rose by at
/// least what the test sent each way. `leases --json` carries the same figures.
#[test]
fn metrics_parse_with_the_prometheus_parser_and_match_stats() -> Result<()> {
    use tunnel_tests::fourover6::{FourOverSix, INTERNET_HOST, server_args};
    const ADDR: &str = "127.0.0.1:9180";
    let mut t = FourOverSix::start_native(&server_args(&["--metrics", ADDR]))?;
    let (inband, native) = (t.client_ns()?, t.client_ns()?);
    let (_, inband_ip) = t.start_client(&inband, &[])?;
    let (_, native_ip) = t.start_native_client(&native, &[])?;
    for ns in [&inband, &native] {
        ensure!(ns.ping(INTERNET_HOST, 3)? == 3);
    }
    let first = scrape(&t, ADDR)?;
    // The known transfer: 10 echo requests of 1,028 IP bytes each way per client.
    const PINGS: u32 = 10;
    const IP_BYTES: f64 = 1028.0;
    for ns in [&inband, &native] {
        let (got, text) = ns.ping_with(&["-s", "1000"], INTERNET_HOST, PINGS)?;
        ensure!(got == Some(PINGS), "{text}");
    }
    let before = t.server_stats()?;
    let samples = scrape(&t, ADDR)?;
    let after = t.server_stats()?;
    let names = before.as_object().context("stats is an object")?;
    ensure!(names.len() > 20, "{before}");
    for (name, low) in names {
        let metric = format!("tunnel_{name}_total");
        let sample = samples
            .iter()
            .find(|s| s.name == metric)
            .with_context(|| format!("no {metric}"))?;
        ensure!(sample.kind == "counter", "{metric}: {}", sample.kind);
        let (lo, hi) = (
            low.as_f64().unwrap_or(-1.0),
            after[name].as_f64().unwrap_or(-1.0),
        );
        ensure!(
            lo <= sample.value && sample.value <= hi,
            "{metric} = {}, stats said {lo} then {hi}",
            sample.value
        );
    }
    let kind = |name: &str| {
        samples
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.kind.clone())
    };
    ensure!(kind("tunnel_build_info").as_deref() == Some("info"));
    let sessions = samples.iter().find(|s| s.name == "tunnel_sessions");
    ensure!(sessions.is_some_and(|s| s.value == 2.0), "sessions");
    let leases = t.leases()?;
    for (ip, mode) in [(&inband_ip, "inband"), (&native_ip, "native")] {
        for dir in ["rx", "tx"] {
            let name = format!("tunnel_client_{dir}_bytes_total");
            let grown =
                client_sample(&samples, &name, ip, mode)? - client_sample(&first, &name, ip, mode)?;
            ensure!(
                grown >= f64::from(PINGS) * IP_BYTES,
                "{name} of {mode} client {ip} rose by {grown}, the test sent {} each way",
                f64::from(PINGS) * IP_BYTES
            );
            let packets = format!("tunnel_client_{dir}_packets_total");
            let grown = client_sample(&samples, &packets, ip, mode)?
                - client_sample(&first, &packets, ip, mode)?;
            ensure!(
                grown >= f64::from(PINGS),
                "{packets} of {ip} rose by {grown}"
            );
            let row = leases
                .iter()
                .find(|l| l["ipv4"] == ip.as_str())
                .context("lease row")?;
            let in_leases = row[format!("{dir}_bytes")].as_f64().unwrap_or(-1.0);
            ensure!(
                in_leases >= client_sample(&samples, &name, ip, mode)?,
                "leases --json {dir}_bytes {in_leases} below the scrape's: {row}"
            );
        }
    }
    Ok(())
}
