//! What a user sees from the command line: help that teaches, one-line errors, exit codes
//! (0 success, 1 runtime error, 2 bad usage).
use std::process::Command;

use anyhow::Result;
use tunnel_tests::tunnel_ctl_bin;

fn run(args: &[&str]) -> Result<(Option<i32>, String, String)> {
    let out = Command::new(tunnel_ctl_bin()?).args(args).output()?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn top_level_help_lists_the_commands() -> Result<()> {
    let (code, stdout, _) = run(&["--help"])?;
    assert_eq!(code, Some(0));
    for word in [
        "monitor",
        "server",
        "client",
        "leases",
        "status",
        "stats",
        "Examples:",
        "/run/tunnel/",
    ] {
        assert!(stdout.contains(word), "--help lacks {word:?}:\n{stdout}");
    }
    Ok(())
}

#[test]
fn every_subcommand_has_help_with_instance_and_an_example() -> Result<()> {
    for cmd in ["monitor", "server", "client", "leases", "status", "stats"] {
        let (code, stdout, _) = run(&[cmd, "--help"])?;
        assert_eq!(code, Some(0), "{cmd} --help");
        assert!(
            stdout.contains("--instance"),
            "{cmd} --help lacks --instance"
        );
        assert!(stdout.contains("Example"), "{cmd} --help lacks an example");
    }
    let (_, stdout, _) = run(&["stats", "--help"])?;
    assert!(stdout.contains("--json"));
    Ok(())
}

#[test]
fn unknown_flag_is_one_line_and_exit_2() -> Result<()> {
    for args in [
        &["--bogus"][..],
        &["stats", "--bogus"],
        &["monitor", "--dev", "x", "--frobnicate"],
        &["nosuchcommand"],
        &["stats", "--instance", "../escape"],
    ] {
        let (code, stdout, stderr) = run(args)?;
        assert_eq!(code, Some(2), "{args:?}: stderr {stderr}");
        assert!(stdout.is_empty(), "{args:?}: stdout {stdout}");
        assert_eq!(
            stderr.lines().count(),
            1,
            "{args:?}: stderr not one line:\n{stderr}"
        );
        assert!(
            stderr.starts_with("tunnel-ctl: error: "),
            "{args:?}: {stderr}"
        );
    }
    Ok(())
}

#[test]
fn management_command_without_a_daemon_says_what_to_do() -> Result<()> {
    let (code, _, stderr) = run(&["stats", "--instance", "tnl-nonexistent-instance"])?;
    assert_eq!(code, Some(1));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("no daemon is running"), "{stderr}");
    Ok(())
}

#[test]
fn bad_flag_values_name_the_flag_and_exit_2() -> Result<()> {
    for (args, flag) in [
        (
            &[
                "server",
                "--pool",
                "198.51.100.9-198.51.100.2",
                "--gateway",
                "198.51.100.1",
            ][..],
            "--pool",
        ),
        (
            &[
                "server",
                "--pool",
                "198.51.100.2-198.51.100.9",
                "--gateway",
                "nope",
            ],
            "--gateway",
        ),
        (
            &[
                "server",
                "--pool",
                "198.51.100.2-198.51.100.9",
                "--gateway",
                "198.51.100.1",
                "--keepalive",
                "soon",
            ],
            "--keepalive",
        ),
        (&["client", "--server", "2001:db8::1"], "--server"),
    ] {
        let (code, _, stderr) = run(args)?;
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert_eq!(
            stderr.lines().count(),
            1,
            "{args:?}: not one line:\n{stderr}"
        );
        assert!(
            stderr.contains(flag),
            "{args:?}: error does not name {flag}: {stderr}"
        );
    }
    Ok(())
}

/// `mape calc` for RFC 7597 Appendix A, example 1.
const EXAMPLE_1: &[&str] = &[
    "mape",
    "calc",
    "--rule-ipv6",
    "2001:db8::/40",
    "--rule-ipv4",
    "192.0.2.0/24",
    "--ea-len",
    "16",
    "--psid-offset",
    "6",
    "--prefix",
    "2001:db8:12:3400::/56",
];

#[test]
fn mape_calc_reproduces_rfc7597_example_1_as_json() -> Result<()> {
    let (code, stdout, stderr) = run(&[EXAMPLE_1, &["--json"]].concat())?;
    assert_eq!(code, Some(0), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout)?;
    assert_eq!(v["ipv4"], "192.0.2.18");
    assert_eq!(
        (v["psid"].as_u64(), v["psid_len"].as_u64()),
        (Some(0x34), Some(8))
    );
    assert_eq!(v["psid_offset"], 6);
    assert_eq!(v["ea_len"], 16);
    assert_eq!(v["port_count"], 252);
    assert_eq!(v["port_ranges"][0], serde_json::json!([1232, 1235]));
    assert_eq!(v["ce_ipv6"], "2001:db8:12:3400:0:c000:212:34");
    Ok(())
}

/// RFC 7597 Appendix A, example 5: a full IPv4 address shared by explicit port parameters.
#[test]
fn mape_calc_reproduces_rfc7597_example_5_with_explicit_psid() -> Result<()> {
    let (code, stdout, stderr) = run(&[
        "mape",
        "calc",
        "--rule-ipv6",
        "2001:db8:12:3400::/56",
        "--rule-ipv4",
        "192.0.2.1/32",
        "--ea-len",
        "0",
        "--psid",
        "0x34",
        "--psid-len",
        "8",
        "--prefix",
        "2001:db8:12:3400::/56",
        "--json",
    ])?;
    assert_eq!(code, Some(0), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout)?;
    assert_eq!(v["ipv4"], "192.0.2.1");
    assert_eq!(
        (v["psid"].as_u64(), v["psid_len"].as_u64()),
        (Some(0x34), Some(8))
    );
    assert_eq!(v["port_count"], 252);
    assert_eq!(v["port_ranges"][1], serde_json::json!([2256, 2259]));
    assert_eq!(v["ce_ipv6"], "2001:db8:12:3400:0:c000:201:34");
    // The PSID needs its length, and an EA-carried PSID cannot be overridden.
    let (code, _, stderr) = run(&[
        "mape",
        "calc",
        "--rule-ipv6",
        "2001:db8::/40",
        "--rule-ipv4",
        "192.0.2.0/24",
        "--ea-len",
        "16",
        "--psid",
        "0x34",
        "--psid-len",
        "8",
        "--prefix",
        "2001:db8:12:3400::/56",
    ])?;
    assert_eq!(code, Some(1));
    assert!(stderr.contains("already carry a 8-bit PSID"), "{stderr}");
    Ok(())
}

#[test]
fn mape_calc_says_when_no_rule_covers_the_prefix() -> Result<()> {
    let (code, _, stderr) = run(&[
        "mape",
        "calc",
        "--profile",
        "ocn",
        "--prefix",
        "2409:10:1234:5600::/56",
    ])?;
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("no ocn rule covers 2409:10:1234:5600::/56"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    Ok(())
}

/// Issue 18 item 6: a one-shot command whose reader has gone (`| head -1`) ends quietly: no
/// panic, no message, not exit 101.
#[test]
fn a_closed_stdout_ends_a_command_quietly() -> Result<()> {
    use std::os::{fd::FromRawFd as _, unix::process::ExitStatusExt as _};
    let mut fds = [0; 2];
    // SAFETY: pipe(2) fills two descriptors that we then own.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: fds[0] and fds[1] are open and owned by nobody else.
    let (reader, writer) = unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    drop(reader); // the reader is gone before the first write
    let json = [EXAMPLE_1, &["--json"]].concat();
    for args in [EXAMPLE_1, &json, &["--help"]] {
        let out = Command::new(tunnel_ctl_bin()?)
            .args(args)
            .stdout(writer.try_clone()?)
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
        assert!(
            out.status.code() == Some(0) || out.status.signal() == Some(libc::SIGPIPE),
            "{args:?}: {}",
            out.status
        );
    }
    Ok(())
}

/// Issue 18 item 6: bad usage found only after parsing is exit 2 too, with one line naming
/// the flag.
#[test]
fn usage_errors_found_after_parsing_exit_2() -> Result<()> {
    let server = |extra: &[&'static str]| {
        let mut args = vec![
            "server",
            "--gateway",
            "198.51.100.1",
            "--instance",
            "tnl-cli-usage",
        ];
        args.extend_from_slice(extra);
        args
    };
    for (args, words) in [
        (
            server(&[
                "--pool",
                "198.51.100.2-198.51.100.9,198.51.100.5-198.51.100.20",
            ]),
            &["--pool", "overlap at 198.51.100.5"][..],
        ),
        (
            server(&["--pool", "198.51.100.1"]),
            &["--pool", "no usable address"],
        ),
        (
            // Over the size limit (2^20); the server stops before it sends or binds anything.
            server(&["--pool", "192.0.2.0-203.0.113.255"]),
            &["--pool", "larger than 1048576"],
        ),
        (
            server(&[
                "--pool",
                "198.51.100.2-198.51.100.9",
                "--tun",
                "a-name-far-too-long",
            ]),
            &["--tun", "1-15"],
        ),
        (
            server(&[
                "--pool",
                "198.51.100.2-198.51.100.9",
                "--keepalive",
                "20s",
                "--timeout",
                "10s",
            ]),
            &["--timeout 10s", "--keepalive 20s"],
        ),
        (
            vec![
                "client",
                "--server",
                "[2001:db8::1]:5678",
                "--keepalive",
                "30s",
                "--timeout",
                "30s",
            ],
            &["--timeout 30s", "--keepalive 30s"],
        ),
        (
            vec![
                "client",
                "--server",
                "[2001:db8::1]:5678",
                "--mode",
                "native",
                "--v6-dev",
                "v6",
                "--ipv6",
            ],
            &["--ipv6", "--mode inband"],
        ),
        (
            server(&["--pool", "198.51.100.2-198.51.100.9", "--share", "3"]),
            &["--share 3", "power of two"],
        ),
        (
            server(&["--pool", "198.51.100.2-198.51.100.9", "--share", "4"]),
            &["--share", "native mode only", "--v6-dev"],
        ),
        (
            vec!["client", "--server", "[2001:db8::1]:5678", "--lan", "eth1"],
            &["--lan", "--ipv6", "--mode native"],
        ),
        (
            server(&[
                "--pool",
                "198.51.100.2-198.51.100.9",
                "--lease-store",
                "mysql://db.example.net/tunnel",
            ]),
            &["--lease-store", "PostgreSQL URL"],
        ),
        (
            server(&[
                "--pool",
                "198.51.100.2-198.51.100.9",
                "--share",
                "4",
                "--v6-dev",
                "v6",
                "--v4-dev",
                "v4",
                "--tunnel-addr",
                "2001:db8::4",
                "--lease-store",
                "postgresql:///tunnel?host=/nonexistent",
            ]),
            &["--share", "--lease-store postgres", "lease file"],
        ),
    ] {
        let (code, stdout, stderr) = run(&args)?;
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(stdout.is_empty(), "{args:?}: {stdout}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}:\n{stderr}");
        for w in words {
            assert!(stderr.contains(w), "{args:?}: no {w:?} in {stderr}");
        }
    }
    Ok(())
}

/// Issue 18 item 6: 0 means "no limit" for every limit, and --help says so.
#[test]
fn zero_means_no_limit_in_every_limit() -> Result<()> {
    let (code, help, _) = run(&["server", "--help"])?;
    assert_eq!(code, Some(0));
    let flat = help.split_whitespace().collect::<Vec<_>>().join(" ");
    for flag in [
        "--max-sessions",
        "--max-per-source",
        "--max-connect-rate",
        "--max-leases-per-prefix",
        "--max-leases-per-address",
    ] {
        let at = flat
            .find(&format!("{flag} <N>"))
            .unwrap_or_else(|| panic!("{flag}: {flat}"));
        let text = &flat[at..];
        let end = text[2..].find(" --").map_or(text.len(), |e| e + 2);
        assert!(
            text[..end].contains("0: no limit"),
            "{flag}'s help does not say 0 means no limit: {}",
            &text[..end]
        );
    }
    Ok(())
}

/// Issue 20: `--config FILE`: an unknown key and a bad value each exit 2 with one line
/// naming the file, the line and the key; a typed flag overrides the file's key, as
/// `--print-config` shows.
#[test]
fn config_file_errors_name_file_line_and_key_and_flags_override_it() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("tnl-cli-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("server.toml");
    let path = file.display().to_string();
    let good = "pool = [\"198.51.100.2-198.51.100.9\"]\ngateway = \"198.51.100.1\"\n\
                max-sessions = 7\n";
    for (text, want) in [
        (
            format!("{good}\nfrobnicate = 1\n"),
            format!("{path}:5: unknown key \"frobnicate\""),
        ),
        (
            format!("{good}keepalive = \"soon\"\n"),
            format!("{path}:4: keepalive: invalid value 'soon'"),
        ),
        (
            format!("{good}max-sessions = \"many\"\n"),
            format!("{path}:"),
        ),
    ] {
        std::fs::write(&file, &text)?;
        let (code, stdout, stderr) = run(&["server", "--config", &path])?;
        assert_eq!(code, Some(2), "{text}: {stderr}");
        assert!(stdout.is_empty());
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(&want), "{want:?} not in {stderr}");
    }
    std::fs::write(&file, good)?;
    let (code, stdout, stderr) = run(&[
        "server",
        "--config",
        &path,
        "--max-sessions",
        "9",
        "--print-config",
    ])?;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("max-sessions = 9\n"), "{stdout}");
    assert!(
        stdout.contains("pool = [\"198.51.100.2-198.51.100.9\"]"),
        "{stdout}"
    );
    assert!(
        stdout.contains("keepalive = \"20s\""),
        "defaults shown: {stdout}"
    );
    let (code, stdout, _) = run(&["server", "--config", &path, "--print-config"])?;
    assert_eq!(code, Some(0));
    assert!(stdout.contains("max-sessions = 7\n"), "{stdout}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// A lease store that cannot be reached stops the server at start (exit 1), naming it, before
/// it sets anything up.
#[test]
fn an_unreachable_lease_store_stops_the_start_with_its_name() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("tnl-cli-store-{}", std::process::id()));
    let (code, _, stderr) = run(&[
        "server",
        "--pool",
        "198.51.100.2-198.51.100.9",
        "--gateway",
        "198.51.100.1",
        "--instance",
        "tnl-cli-store",
        "--state-dir",
        &dir.display().to_string(),
        "--lease-store",
        "postgresql:///tunnel?host=/nonexistent&user=tunnel&password=secret",
    ])?;
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(code, Some(1), "{stderr}");
    for w in ["lease store", "cannot be reached", "host=/nonexistent"] {
        assert!(stderr.contains(w), "no {w:?} in {stderr}");
    }
    assert!(!stderr.contains("secret"), "the password shows: {stderr}");
    Ok(())
}
