//! Command-line interface (SPEC §10). Every daemon and management command takes `--instance`.
use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};

use crate::instance::{DEFAULT_INSTANCE, Instance, parse_instance};

const EXAMPLES: &str = "\
Examples:
  # count packets on eth0 with the eBPF pipeline (daemon; Ctrl-C stops it and removes its pins)
  tunnel-ctl monitor --dev eth0 --instance lab
  # from another shell: what it is doing, and its counters
  tunnel-ctl status --instance lab
  tunnel-ctl stats --instance lab --json

Daemons keep a management socket at /run/tunnel/INSTANCE.sock and pin their BPF maps and links
under /sys/fs/bpf/tunnel/INSTANCE/. Exit status: 0 success, 1 runtime error, 2 bad usage.";

#[derive(Debug, Parser)]
#[command(
    name = "tunnel-ctl",
    version,
    about = "IPv4-over-IPv6 tunnel controller with an eBPF fast path",
    long_about = "IPv4-over-IPv6 tunnel controller with an eBPF fast path.\n\n\
        Runs the tunnel's daemons (which load and attach the embedded eBPF programs) and talks \
        to running daemons over their management socket. Needs root (CAP_BPF, CAP_NET_ADMIN).",
    after_help = EXAMPLES,
)]
pub struct Cli {
    /// More log output (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, action = ArgAction::Count, global = true)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Daemon: attach the eBPF packet counter to interfaces and serve its counters.
    ///
    /// A diagnostic and a check that the eBPF pipeline works on this host: every packet
    /// crossing the interfaces is counted by protocol (IPv4, IPv6, other) and direction,
    /// per CPU, and passed on untouched. Stop it with Ctrl-C or SIGTERM; that detaches the
    /// programs and removes the pins. After SIGKILL the pinned links keep counting, and the
    /// next start of the same --instance re-adopts them.
    #[command(
        after_help = "Example:\n  tunnel-ctl monitor --dev eth0 --dev eth1 --direction ingress --instance lab"
    )]
    Monitor(MonitorArgs),

    /// Show what a running daemon is doing (role, interfaces, uptime).
    #[command(after_help = "Example:\n  tunnel-ctl status --instance lab --json")]
    Status(QueryArgs),

    /// Show a running daemon's packet counters, summed over CPUs.
    ///
    /// With --json: one object of counter name -> integer. Every counter is listed,
    /// zeros included.
    #[command(after_help = "Example:\n  tunnel-ctl stats --instance lab --json")]
    Stats(QueryArgs),
}

#[derive(Debug, Clone, Args)]
pub struct InstanceArg {
    /// Instance name: picks /run/tunnel/NAME.sock and /sys/fs/bpf/tunnel/NAME/.
    #[arg(long, value_name = "NAME", default_value = DEFAULT_INSTANCE, value_parser = parse_instance)]
    pub instance: Instance,
}

#[derive(Debug, Clone, Args)]
pub struct QueryArgs {
    #[command(flatten)]
    pub instance: InstanceArg,

    /// Print JSON for scripts instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DirectionArg {
    Ingress,
    Egress,
    Both,
}

#[derive(Debug, Clone, Args)]
pub struct MonitorArgs {
    /// Interface to count on (repeat for several).
    #[arg(long = "dev", value_name = "IFACE", required = true)]
    pub devs: Vec<String>,

    /// Which side of the interfaces to count.
    #[arg(long, value_enum, default_value_t = DirectionArg::Both)]
    pub direction: DirectionArg,

    #[command(flatten)]
    pub instance: InstanceArg,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
