//! `--config FILE` (SPEC §8): a daemon's settings in a TOML file.
//!
//! Keys are exactly the daemon's long flag names (`pool`, `max-sessions`, `v6-dev`,
//! `forward`, …, see `tunnel-ctl <daemon> --help`); a flag that can be repeated takes an array,
//! a switch takes `true`/`false`, durations are strings (`"20s"`), numbers may be written
//! bare. A flag on the command line overrides the file's key (a list given there replaces the
//! file's list). `--print-config` prints the effective settings as TOML and exits.
//!
//! The file becomes command-line arguments placed before those typed, so clap stays the one
//! definition of every key: its type, default, checks and help. Each value is checked with the
//! flag's own parser here, so an error names the file, line and key.
use std::{ffi::OsString, path::Path};

use clap::{Arg, ArgAction, Command};
use toml::de::{DeTable, DeValue};

use crate::usage::{UsageError, usage};

mod daemons;

pub use daemons::{
    AllowIn, BrConfig, CeConfig, ClientConfig, ClientKey, ClientMode, LeaseStoreSpec,
    MonitorConfig, NatTimeouts, ServerConfig, Timers, redact_url,
};

/// Flags that are not settings and so never keys.
const NOT_KEYS: &[&str] = &["config", "print-config", "help", "verbose", "version"];

/// The config keys of `daemon`: its long flags, less [`NOT_KEYS`].
pub fn keys(daemon: &Command) -> Vec<String> {
    daemon
        .get_arguments()
        .filter_map(Arg::get_long)
        .filter(|l| !NOT_KEYS.contains(l))
        .map(str::to_owned)
        .collect()
}

/// `argv` with the settings of its `--config FILE` (if any) put in front of the typed flags
/// of the subcommand that `root` finds in it. Flags typed on the command line win.
pub fn apply(root: &Command, argv: Vec<OsString>) -> anyhow::Result<Vec<OsString>> {
    let Some((daemon, at)) = subcommand(root, &argv) else {
        return Ok(argv);
    };
    let typed: Vec<String> = argv[at..]
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let Some(file) = config_path(&typed) else {
        return Ok(argv);
    };
    let text =
        std::fs::read_to_string(&file).map_err(|e| usage(format!("--config {file}: {e}")))?;
    let from_file = file_args(daemon, Path::new(&file), &text, &typed)?;
    let mut out = argv[..at].to_vec();
    out.extend(from_file.into_iter().map(OsString::from));
    out.extend_from_slice(&argv[at..]);
    Ok(out)
}

/// The deepest subcommand named in `argv` and the index just past its name.
fn subcommand<'a>(root: &'a Command, argv: &[OsString]) -> Option<(&'a Command, usize)> {
    let mut cur = root;
    let mut at = None;
    let mut skip_value = false;
    for (i, a) in argv.iter().enumerate().skip(1) {
        let a = a.to_string_lossy();
        if std::mem::take(&mut skip_value) {
            continue;
        }
        if let Some(long) = a.strip_prefix("--") {
            // A global option's value (`--log-format json`) is not a subcommand.
            skip_value = !long.contains('=')
                && root
                    .get_arguments()
                    .any(|o| o.get_long() == Some(long) && !takes_no_value(o));
            continue;
        }
        if a.starts_with('-') {
            continue;
        }
        match cur.find_subcommand(a.as_ref()) {
            Some(sub) => {
                cur = sub;
                at = Some(i + 1);
            }
            None => break,
        }
    }
    at.map(|i| (cur, i))
}

/// The value of `--config FILE` / `--config=FILE` among the typed arguments.
fn config_path(typed: &[String]) -> Option<String> {
    typed.iter().enumerate().find_map(|(i, a)| {
        if a == "--config" {
            typed.get(i + 1).cloned()
        } else {
            a.strip_prefix("--config=").map(str::to_owned)
        }
    })
}

/// Whether `--long` was typed (as `--long`, `--long VALUE` or `--long=VALUE`).
fn typed_flag(typed: &[String], long: &str) -> bool {
    typed.iter().any(|a| {
        a.strip_prefix("--")
            .is_some_and(|rest| rest == long || rest.starts_with(&format!("{long}=")))
    })
}

/// `--key=value` arguments for every key of the file that was not typed.
fn file_args(
    daemon: &Command,
    file: &Path,
    text: &str,
    typed: &[String],
) -> Result<Vec<String>, UsageError> {
    let at = |span: std::ops::Range<usize>| {
        let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
        format!("{}:{line}", file.display())
    };
    let table: DeTable<'_> = DeTable::parse(text)
        .map_err(|e| {
            let first = e.message().lines().next().unwrap_or("not TOML").to_owned();
            match e.span() {
                Some(span) => UsageError(format!("{}: {first}", at(span))),
                None => UsageError(format!("{}: {first}", file.display())),
            }
        })?
        .into_inner();
    let name = daemon.get_name();
    let mut out = Vec::new();
    for (key, value) in &table {
        let (k, where_) = (key.get_ref().as_ref(), at(key.span()));
        let arg = daemon
            .get_arguments()
            .find(|a| a.get_long() == Some(k) && !NOT_KEYS.contains(&k))
            .ok_or_else(|| {
                UsageError(format!(
                    "{where_}: unknown key \"{k}\" (keys are the long flags of `{name}`: see \
                     tunnel-ctl {name} --help)"
                ))
            })?;
        if typed_flag(typed, k) {
            continue; // the command line wins
        }
        let values = strings(value.get_ref())
            .ok_or_else(|| UsageError(format!("{where_}: {k}: {}", expected(arg))))?;
        if takes_no_value(arg) {
            match values.as_slice() {
                [v] if v == "true" => out.push(format!("--{k}")),
                [v] if v == "false" => {}
                _ => {
                    return Err(UsageError(format!("{where_}: {k}: expected true or false")));
                }
            }
            continue;
        }
        let repeatable = matches!(arg.get_action(), ArgAction::Append);
        if values.len() != 1 && !repeatable {
            return Err(UsageError(format!(
                "{where_}: {k}: takes one value, not a list"
            )));
        }
        for v in values {
            check(daemon, arg, &v).map_err(|why| UsageError(format!("{where_}: {k}: {why}")))?;
            out.push(format!("--{k}={v}"));
        }
    }
    Ok(out)
}

fn takes_no_value(arg: &Arg) -> bool {
    matches!(
        arg.get_action(),
        ArgAction::SetTrue | ArgAction::SetFalse | ArgAction::Count
    )
}

fn expected(arg: &Arg) -> &'static str {
    if takes_no_value(arg) {
        "expected true or false"
    } else if matches!(arg.get_action(), ArgAction::Append) {
        "expected a value or an array of values"
    } else {
        "expected a string or a number"
    }
}

/// A scalar or an array of scalars as the strings a command line would carry.
fn strings(value: &DeValue<'_>) -> Option<Vec<String>> {
    let scalar = |v: &DeValue<'_>| -> Option<String> {
        Some(match v {
            DeValue::String(s) => s.to_string(),
            DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix()).ok()?.to_string(),
            DeValue::Float(f) => f.to_string(),
            DeValue::Boolean(b) => b.to_string(),
            DeValue::Datetime(_) | DeValue::Array(_) | DeValue::Table(_) => return None,
        })
    };
    match value {
        DeValue::Array(items) => items.iter().map(|i| scalar(i.get_ref())).collect(),
        other => scalar(other).map(|s| vec![s]),
    }
}

/// Runs the flag's own value parser on `value` (each part, for comma-separated flags), in a
/// command of that one flag (its relations to other flags are the full parse's business).
fn check(daemon: &Command, arg: &Arg, value: &str) -> Result<(), String> {
    let long = arg.get_long().unwrap_or_default();
    let alone = Arg::new(arg.get_id().clone())
        .long(long.to_owned())
        .value_name(long.to_uppercase())
        .num_args(1)
        .value_parser(arg.get_value_parser().clone());
    let cmd = Command::new(daemon.get_name().to_owned())
        .no_binary_name(true)
        .disable_help_flag(true)
        .arg(alone);
    let parts: Vec<&str> = match arg.get_value_delimiter() {
        Some(d) => value.split(d).collect(),
        None => vec![value],
    };
    for part in parts {
        cmd.clone()
            .try_get_matches_from([format!("--{long}={part}")])
            .map_err(|e| {
                let text = e.render().to_string();
                let first = text.lines().next().unwrap_or("invalid value").to_owned();
                first.trim_start_matches("error: ").to_owned()
            })?;
    }
    Ok(())
}

/// The effective settings of `daemon` (as parsed into `matches`) as TOML: every key with
/// its value, defaults included.
pub fn print(daemon: &Command, matches: &clap::ArgMatches) -> String {
    let mut table = toml::Table::new();
    let mut unset = Vec::new();
    for arg in daemon.get_arguments() {
        let Some(long) = arg.get_long().filter(|l| !NOT_KEYS.contains(l)) else {
            continue;
        };
        let id = arg.get_id().as_str();
        if takes_no_value(arg) {
            let on = matches!(arg.get_action(), ArgAction::SetTrue) && matches.get_flag(id);
            table.insert(long.to_owned(), toml::Value::Boolean(on));
            continue;
        }
        let Some(raw) = matches.get_raw(id) else {
            unset.push(long);
            continue;
        };
        let values: Vec<toml::Value> = raw
            .map(|v| {
                let s = v.to_string_lossy();
                match s.parse::<i64>() {
                    Ok(n) => toml::Value::Integer(n),
                    Err(_) => toml::Value::String(s.into_owned()),
                }
            })
            .collect();
        let value = if matches!(arg.get_action(), ArgAction::Append) {
            toml::Value::Array(values)
        } else {
            match values.into_iter().next() {
                Some(v) => v,
                None => continue,
            }
        };
        table.insert(long.to_owned(), value);
    }
    let mut text = toml::to_string(&table).unwrap_or_default();
    for long in unset {
        text.push_str(&format!("# {long}: not set\n"));
    }
    text
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, Parser as _};

    use super::*;
    use crate::cli::Cli;

    fn argv(args: &[&str]) -> Vec<OsString> {
        std::iter::once("tunnel-ctl")
            .chain(args.iter().copied())
            .map(OsString::from)
            .collect()
    }

    fn with_file(text: &str, args: &[&str]) -> anyhow::Result<Vec<String>> {
        // One file per call: tests run in parallel, so the name must never repeat.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "tunnel-config-{}-{}.toml",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::write(&path, text).unwrap();
        let p = path.display().to_string();
        let mut all = args.to_vec();
        all.extend(["--config", &p]);
        let out = apply(&Cli::command(), argv(&all));
        let _ = std::fs::remove_file(&path);
        Ok(out?
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect())
    }

    #[test]
    fn file_keys_become_flags_and_typed_flags_win() {
        let out = with_file(
            "pool = [\"198.51.100.2-198.51.100.9\", \"198.51.100.20\"]\n\
             gateway = \"198.51.100.1\"\nmax-sessions = 7\nkeepalive = \"5s\"\n",
            &["server", "--max-sessions", "9"],
        )
        .unwrap();
        assert_eq!(
            &out[1..7],
            [
                "server",
                "--gateway=198.51.100.1",
                "--keepalive=5s",
                "--pool=198.51.100.2-198.51.100.9",
                "--pool=198.51.100.20",
                "--max-sessions",
            ]
        );
        assert!(!out.iter().any(|a| a == "--max-sessions=7"), "{out:?}");
        let cli = Cli::try_parse_from(&out).unwrap();
        let crate::cli::Command::Server(s) = cli.command else {
            panic!("not a server")
        };
        assert_eq!((s.max_sessions, s.pool.len()), (9, 2));
        assert_eq!(s.timers.keepalive, std::time::Duration::from_secs(5));
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let err = with_file(
            "gateway = \"198.51.100.1\"\n\nfrobnicate = 1\n",
            &["server"],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains(".toml:3: unknown key \"frobnicate\""), "{err}");
        let err = with_file(
            "gateway = \"198.51.100.1\"\nkeepalive = \"soon\"\n",
            &["server"],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(".toml:2: keepalive: invalid value 'soon'"),
            "{err}"
        );
        let err = with_file("pool = \"198.51.100.9-198.51.100.2\"\n", &["server"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(":1: pool:") && err.contains("ends before it starts"),
            "{err}"
        );
        let err = with_file(
            "gateway = [\"198.51.100.1\", \"198.51.100.2\"]\n",
            &["server"],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains(":1: gateway: takes one value"), "{err}");
        let err = with_file("config = \"x\"\n", &["client"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown key \"config\""), "{err}");
        let err = with_file("pool = \n", &["server"]).unwrap_err().to_string();
        assert!(err.contains(".toml:1: "), "{err}");
    }

    #[test]
    fn global_options_before_the_subcommand_are_skipped() {
        let out = with_file(
            "gateway = \"198.51.100.1\"\n",
            &[
                "--log-format",
                "json",
                "-v",
                "server",
                "--pool",
                "198.51.100.2",
            ],
        )
        .unwrap();
        assert_eq!(&out[1..5], ["--log-format", "json", "-v", "server"]);
        assert_eq!(out[5], "--gateway=198.51.100.1", "{out:?}");
    }

    #[test]
    fn switches_take_booleans() {
        let out = with_file(
            "server = \"[2001:db8::1]:5678\"\nno-default-route = true\nipv6 = false\n",
            &["client"],
        )
        .unwrap();
        assert!(out.contains(&"--no-default-route".to_owned()), "{out:?}");
        assert!(!out.iter().any(|a| a.starts_with("--ipv6")), "{out:?}");
        let err = with_file("no-default-route = \"yes\"\n", &["client"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no-default-route: expected true or false"),
            "{err}"
        );
    }

    /// Every long flag of every daemon is a key, every key a flag, and each daemon's defaults
    /// written back as a file load again.
    #[test]
    fn every_flag_is_a_key_and_defaults_round_trip() {
        let root = Cli::command();
        let daemons = [
            vec!["server"],
            vec!["client"],
            vec!["monitor"],
            vec!["mape", "ce"],
            vec!["mape", "br"],
        ];
        for path in daemons {
            let mut cmd = &root;
            for p in &path {
                cmd = cmd.find_subcommand(p).unwrap();
            }
            let flags: Vec<String> = cmd
                .get_arguments()
                .filter_map(Arg::get_long)
                .filter(|l| !["config", "print-config", "help", "verbose"].contains(l))
                .map(str::to_owned)
                .collect();
            assert_eq!(keys(cmd), flags, "{path:?}");
            assert!(flags.contains(&"instance".to_owned()), "{path:?}");
            // The defaults, as --print-config would show them, are a valid file.
            let m = cmd.clone().ignore_errors(true).get_matches_from(["x"]);
            let text = print(cmd, &m);
            for line in text.lines().filter(|l| !l.is_empty()) {
                let key = match line.strip_prefix("# ") {
                    Some(unset) => unset.trim_end_matches(": not set"),
                    None => line.split(" = ").next().unwrap(),
                };
                assert!(flags.iter().any(|f| f == key), "{path:?}: {line}");
            }
            let mut args: Vec<&str> = path.clone();
            args.push("--help");
            with_file(&text, &args).unwrap_or_else(|e| panic!("{path:?}: {e}\n{text}"));
        }
    }
}
