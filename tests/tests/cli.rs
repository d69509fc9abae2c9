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
