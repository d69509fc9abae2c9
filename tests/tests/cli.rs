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

#[test]
fn mape_calc_reproduces_rfc7597_example_1_as_json() -> Result<()> {
    let (code, stdout, stderr) = run(&[
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
        "--json",
    ])?;
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
