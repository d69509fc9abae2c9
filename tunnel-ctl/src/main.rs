use std::process::ExitCode;

use clap::{CommandFactory as _, FromArgMatches as _};
use tunnel_ctl::{
    cli::{Cli, Command, ForwardCommand, MapeCommand, SoftwireCommand},
    client,
    mgmt::{self, Request},
    monitor, report, server,
};

fn main() -> ExitCode {
    let root = Cli::command();
    // As typed: what a reload reads again.
    let typed: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // `--config FILE` puts the file's settings in front of the typed flags.
    let argv = match tunnel_ctl::config::apply(&root, typed.clone()) {
        Ok(argv) => argv,
        Err(e) => {
            eprintln!("tunnel-ctl: error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let matches = match root.clone().try_get_matches_from(&argv) {
        Ok(m) => m,
        Err(e) => return usage_error(e),
    };
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    if let Some(text) = print_config(&root, &matches) {
        print!("{text}");
        return ExitCode::SUCCESS;
    }
    init_logging(cli.verbose, cli.log_format);
    if cli.verbose >= 2 {
        tunnel_ctl::dataplane::log_ebpf_debug();
    }
    let daemon = matches!(
        cli.command,
        Command::Monitor(_)
            | Command::Server(_)
            | Command::Client(_)
            | Command::Mape(MapeCommand::Ce(_) | MapeCommand::Br(_))
    );
    if !daemon {
        // A one-shot command whose reader went away (`... | head -1`) ends quietly, as
        // every Unix tool does, instead of panicking on EPIPE. Daemons keep ignoring
        // SIGPIPE: a peer's closed socket is an error to handle, not a reason to die.
        // SAFETY: setting a signal disposition to its default before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let result =
        match cli.command {
            Command::Monitor(args) => run_daemon(monitor::run(args.into())),
            Command::Server(args) => {
                let source = tunnel_ctl::cli::reread(typed, |c| match c {
                    Command::Server(a) => Some(a.into()),
                    _ => None,
                });
                run_daemon(server::run(args.into(), source))
            }
            Command::Client(args) => run_daemon_on(RunOn::OneThread, client::run(args.into())),
            Command::Mape(MapeCommand::Ce(args)) => {
                let source = tunnel_ctl::cli::reread(typed, |c| match c {
                    Command::Mape(MapeCommand::Ce(a)) => Some((*a).into()),
                    _ => None,
                });
                run_daemon(tunnel_ctl::daemon::ce::run((*args).into(), source))
            }
            Command::Mape(MapeCommand::Br(args)) => {
                let source = tunnel_ctl::cli::reread(typed, |c| match c {
                    Command::Mape(MapeCommand::Br(a)) => Some(a.into()),
                    _ => None,
                });
                run_daemon(tunnel_ctl::daemon::br::run(args.into(), source))
            }
            Command::Mape(MapeCommand::Calc(args))
                if args.rule.prefix == tunnel_ctl::cli::PrefixArg::Auto =>
            {
                Err(tunnel_ctl::usage::usage(
                    "--prefix auto reads a CE's --wan addresses: give mape calc the prefix itself",
                ))
            }
            Command::Mape(MapeCommand::Calc(args)) => tunnel_ctl::mape::calc(&args.rule.query())
                .map(|m| {
                    if args.json {
                        report::print(&serde_json::json!(m), true);
                    } else {
                        println!("{}", m.describe());
                    }
                }),
            Command::Reload(i) => {
                mgmt::request(&i.instance, &Request::Reload).map(|v| report::print(&v, false))
            }
            Command::Leases(l) if l.history => {
                let request = Request::LeaseHistory {
                    ipv4: l.ipv4,
                    at: l
                        .at
                        .map(|t| humantime::format_rfc3339_micros(t).to_string()),
                };
                mgmt::request(&l.query.instance.instance, &request).map(|v| {
                    if v.as_array().is_some_and(Vec::is_empty) && !l.query.json {
                        println!("no lease matches");
                    } else {
                        report::print(&v, l.query.json);
                    }
                })
            }
            Command::Leases(l) => mgmt::request(&l.query.instance.instance, &Request::Leases)
                .map(|v| report::print(&v, l.query.json)),
            Command::Status(q) => mgmt::request(&q.instance.instance, &Request::Status)
                .map(|v| report::print(&v, q.json)),
            Command::Stats(q) => mgmt::request(&q.instance.instance, &Request::Stats)
                .map(|v| report::print(&v, q.json)),
            Command::Nat(q) => mgmt::request(&q.instance.instance, &Request::Nat)
                .map(|v| report::print(&v, q.json)),
            Command::Portlog(q) => {
                tunnel_ctl::mape::portlog::query(&q.file, q.port, q.proto.as_deref(), q.at).map(
                    |uses| {
                        if uses.is_empty() && !q.json {
                            println!(
                                "nobody used external port {} at {}",
                                q.port,
                                humantime::format_rfc3339(q.at)
                            );
                        } else {
                            report::print(&serde_json::json!(uses), q.json);
                        }
                    },
                )
            }
            Command::Forward(ForwardCommand::Add { spec, instance }) => {
                mgmt::request(&instance.instance, &Request::ForwardAdd { forward: spec })
                    .map(|v| report::print(&v, false))
            }
            Command::Forward(ForwardCommand::Del { port, instance }) => {
                mgmt::request(&instance.instance, &Request::ForwardDel { port })
                    .map(|v| report::print(&v, false))
            }
            Command::Forward(ForwardCommand::List(q)) => {
                mgmt::request(&q.instance.instance, &Request::ForwardList)
                    .map(|v| report::print(&v, q.json))
            }
            Command::Softwire(SoftwireCommand::Add {
                ipv4,
                psid,
                b4,
                psid_offset,
                aftr,
                instance,
            }) => {
                SoftwireCommand::softwire(ipv4, psid, b4, psid_offset, aftr).and_then(|softwire| {
                    mgmt::request(&instance.instance, &Request::SoftwireAdd { softwire })
                        .map(|v| report::print(&v, false))
                })
            }
            Command::Softwire(SoftwireCommand::Del {
                ipv4,
                psid,
                instance,
            }) => mgmt::request(&instance.instance, &Request::SoftwireDel { ipv4, psid })
                .map(|v| report::print(&v, false)),
            Command::Softwire(SoftwireCommand::List(q)) => {
                mgmt::request(&q.instance.instance, &Request::SoftwireList)
                    .map(|v| report::print(&v, q.json))
            }
        };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if tunnel_ctl::usage::is_usage(&e) => {
            eprintln!("tunnel-ctl: error: {e:#} (see tunnel-ctl --help)");
            ExitCode::from(2)
        }
        Err(e) => {
            // One line: what went wrong, with its causes.
            eprintln!("tunnel-ctl: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// With `--print-config`, the effective settings of the daemon it was given to, as TOML.
fn print_config(root: &clap::Command, matches: &clap::ArgMatches) -> Option<String> {
    let (mut cmd, mut m) = (root, matches);
    while let Some((name, sub)) = m.subcommand() {
        cmd = cmd.find_subcommand(name)?;
        m = sub;
    }
    let wanted =
        cmd.get_arguments().any(|a| a.get_id() == "print_config") && m.get_flag("print_config");
    wanted.then(|| tunnel_ctl::config::print(cmd, m))
}

/// Help and version go to stdout with status 0; anything else is a one-line error, status 2.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
            ExitCode::from(2)
        } else {
            ExitCode::SUCCESS
        };
    }
    // The first paragraph, on one line: "error: the following required arguments were not
    // provided:" is followed by the indented list of them.
    let rendered = e.render().to_string();
    let first: Vec<&str> = rendered
        .lines()
        .skip_while(|l| l.trim().is_empty())
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    let first = match first.join(" ") {
        s if s.is_empty() => "bad usage".to_owned(),
        s => s.trim_start_matches("error: ").to_owned(),
    };
    eprintln!("tunnel-ctl: error: {first} (see tunnel-ctl --help)");
    ExitCode::from(2)
}

fn init_logging(verbose: u8, format: tunnel_ctl::cli::LogFormat) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        tunnel_ctl::cli::LogFormat::Json => fmt.json().init(),
        tunnel_ctl::cli::LogFormat::Text => fmt
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
}

/// Where a daemon's own future runs.
#[derive(Clone, Copy)]
enum RunOn {
    /// The main thread (block_on) of a two-worker runtime: the servers, whose packet and
    /// session work is spawned on the workers anyway; their accept loops keep a thread of
    /// their own there.
    Main,
    /// A runtime of one thread: the client, whose session is one future (the TUN reader and
    /// the connection in one `select!`). A second worker only added wake-ups from one thread
    /// to the other: in the bench's held lab the in-band client on one thread gave UDP 64 B
    /// uploads of 132 kpps against 104 (medians of eight alternating runs); TCP moved within
    /// the noise (ten more: uploads 5.18 Gbit/s against 4.93, downloads 5.21 against 5.60).
    OneThread,
}

fn run_daemon(
    fut: impl std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
) -> anyhow::Result<()> {
    run_daemon_on(RunOn::Main, fut)
}

fn run_daemon_on(
    on: RunOn,
    fut: impl std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
) -> anyhow::Result<()> {
    // The packet paths take and give back 64 KiB buffers all the time (a super-packet's
    // copy, a coalesced write's head); glibc's defaults give the top of the heap back to the
    // kernel and fault it in again each time (brk, page faults: 5% of the in-band client's
    // time). Keep what was freed, up to 64 MiB, and keep such buffers off mmap.
    // SAFETY: mallopt only sets allocator parameters; called before other threads start.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
    let runtime = match on {
        RunOn::Main => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?,
        RunOn::OneThread => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
    };
    runtime.block_on(async {
        // From here on SIGHUP is caught (the handler stays for the process's life), so a
        // hang-up during start-up cannot end the daemon uncleanly either;
        // the daemon skeleton takes them over once it serves (a reload).
        let _hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
        fut.await
    })
}
