//! `--config FILE` (issue 20, SPEC §8): every daemon starts from a TOML file alone, in the
//! scenarios of the flag-based tests: a native-mode server and client pinging the internet,
//! an in-band client through a server with limits, a MAP-E CE and BR carrying UDP.
use std::net::SocketAddrV4;

use anyhow::Result;
use tunnel_tests::{
    fourover6::{FourOverSix, INTERNET_HOST, NATIVE_ARGS, server_args},
    mape::{INTERNET_HOST as MAPE_HOST, MapeLab, RULE_252, udp_echo, udp_roundtrip},
};

#[test]
fn server_and_clients_start_from_a_config_file_alone() -> Result<()> {
    let mut args = server_args(&["--max-sessions", "50", "--keepalive", "5s"]);
    args.extend_from_slice(NATIVE_ARGS);
    let mut t = FourOverSix::start_with(&args, true)?;
    let status = t.lab.ctl_json("status", &t.server_instance)?;
    assert_eq!(status["role"], "server", "{status}");
    let ns = t.client_ns()?;
    let (_, addr) = t.start_native_client(&ns, &[])?;
    assert!(addr.starts_with("198.51.100."), "{addr}");
    assert_eq!(ns.ping(INTERNET_HOST, 3)?, 3, "native client from a file");
    let inband = t.client_ns()?;
    t.start_client(&inband, &[])?;
    assert_eq!(
        inband.ping(INTERNET_HOST, 3)?,
        3,
        "in-band client from a file"
    );
    // The file is what the daemons ran with: the server log names its settings.
    let log = t.lab.daemon_log(&t.server_instance).unwrap_or_default();
    assert!(log.contains("keepalive 5s"), "{log}");
    Ok(())
}

#[test]
fn mape_ce_and_br_start_from_a_config_file_alone() -> Result<()> {
    let t = MapeLab::start_with(&RULE_252, &[], true)?;
    let _echo = udp_echo(&t.internet, SocketAddrV4::new(MAPE_HOST, 7))?;
    udp_roundtrip(&t.lan, SocketAddrV4::new(MAPE_HOST, 7), b"from a file")?;
    let status = t.lab.ctl_json("status", &t.ce_instance)?;
    assert_eq!(status["ipv4"], "203.0.113.18", "{status}");
    Ok(())
}
