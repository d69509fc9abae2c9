//! Command-line interface (SPEC §10). Every daemon and management command takes `--instance`.
use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use ipnet::IpNet;

use crate::{
    config,
    instance::{DEFAULT_INSTANCE, Instance, parse_instance},
    pool::Range4,
};

/// clap value parser for durations: `20s`, `2m`, `1h`, `500ms`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{e} (write durations like 20s, 2m, 1h)"))?;
    if d.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(d)
}

const EXAMPLES: &str = "\
Examples:
  # a 4over6 concentrator handing out 198.51.100.2-128 to clients over IPv6
  tunnel-ctl server --pool 198.51.100.2-198.51.100.128 --gateway 198.51.100.1 --instance hub
  tunnel-ctl leases --instance hub
  # a client on an IPv6-only network
  tunnel-ctl client --server [2001:db8:100::1]:5678
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
    /// More log output (-v debug, -vv trace). -vv also makes the eBPF programs log each drop
    /// with its reason and addresses, and each hand-off to the slow path (target `ebpf`;
    /// off, and free, otherwise). RUST_LOG overrides the level shown.
    #[arg(short, long, action = ArgAction::Count, global = true)]
    pub verbose: u8,

    /// Log lines as text (default) or as one JSON object per line (timestamp, level,
    /// target, fields), for log collectors.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

/// How daemons write their log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

// Parsed once per run: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
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

    /// Daemon: the 4over6 concentrator (seed-004 TCP control protocol, IPv4 pool, in-band TUN).
    ///
    /// Clients connect over TCP (IPv6, or IPv4-mapped), ask for an address (100), get a lease
    /// (101 "<ipv4> 0.0.0.0 <dns1> <dns2> <dns3>") and exchange IPv4 packets in 102/103 frames;
    /// the server writes them to a TUN device routed for the pool. Keepalives (104) go both
    /// ways; a silent client is dropped after --timeout and its address held for it for --hold.
    #[command(after_help = "Example:
  tunnel-ctl server --listen [::]:5678 --pool 198.51.100.2-198.51.100.128 \\
      --gateway 198.51.100.1 --dns 192.0.2.53,192.0.2.54 --instance concentrator

  # with the eBPF fast path for clients that ask for native mode (105/106)
  tunnel-ctl server --pool 198.51.100.2-198.51.100.128 --gateway 198.51.100.1 \\
      --v6-dev eth0 --v4-dev eth1 --tunnel-addr 2001:db8:100::4 --instance concentrator

  # IPv6 for clients that ask (client --ipv6): a /128 each, a /64 each for their LANs,
  # inbound SSH allowed, everything else from outside only as replies
  tunnel-ctl server --pool 198.51.100.2-198.51.100.128 --gateway 198.51.100.1 \\
      --pool6 2001:db8:600::/64 --delegate 2001:db8:700::/48 --allow-in 22/tcp

  # the provider's /64 is on-link on eth0: hand out addresses from it, answer NDP for them
  tunnel-ctl server --pool 198.51.100.2-198.51.100.128 --gateway 198.51.100.1 \\
      --pool6 2001:db8:ff::100:0/112 --proxy-ndp eth0

  # two concentrators sharing the pool through PostgreSQL (run the same on the second,
  # --node-id b); clients list both: client --server A --server B
  tunnel-ctl server --pool 198.51.100.2-198.51.100.128 --gateway 198.51.100.1 \\
      --lease-store postgres://tunnel@db.example.net/tunnel --node-id a

The server enables net.ipv4.ip_forward (and IPv6 forwarding with --pool6/--delegate); the
IPv4 side needs a route for the pool back to this host, the IPv6 side one for --pool6 and
--delegate (unless --proxy-ndp), and with native mode one for --tunnel-addr.
Leases are saved in --state-dir (or the --lease-store database); after a crash or upgrade
the next start re-adopts them and the pinned eBPF state, so native clients keep forwarding
meanwhile.")]
    Server(ServerArgs),

    /// Daemon: a 4over6 client: lease an IPv4 address and route IPv4 through the server.
    ///
    /// Connects, asks for an address and (unless --no-default-route) routes all IPv4 through
    /// the tunnel (0.0.0.0/1 and 128.0.0.0/1, leaving any existing default route alone).
    /// In-band mode (default) carries packets in 102/103 frames through a TUN device. Native
    /// mode (--mode native --v6-dev IFACE) asks the server for the fast path (105/106): eBPF
    /// on IFACE wraps IPv4 in IPv6 straight to the server, nothing goes through userspace.
    /// Reconnects with capped exponential backoff and gets the same address back within the
    /// server's hold time; in native mode forwarding continues while reconnecting.
    #[command(after_help = "Examples:
  tunnel-ctl client --server [2001:db8:100::1]:5678 --instance uplink
  tunnel-ctl client --server [2001:db8:100::1]:5678 --mode native --v6-dev eth0
  # two concentrators sharing a lease store: the second when the first fails
  tunnel-ctl client --server [2001:db8:100::1]:5678 --server [2001:db8:200::1]:5678
  # IPv4 and IPv6 from a server reached over IPv4; the delegated /64 advertised on eth1
  tunnel-ctl client --server 192.0.2.1:5678 --ipv6 --lan eth1")]
    Client(ClientArgs),

    /// MAP-E (RFC 7597): calculate a CE's address and port set.
    #[command(subcommand)]
    Mape(MapeCommand),

    /// List a server's leases (address, client, mode, since), or with --history who held an
    /// address when.
    ///
    /// With --json: a list of objects with ipv4, client, mode, since (RFC 3339). With
    /// --history: ipv4, psid, client, node (the concentrator), start and end (null: held
    /// now), from the lease store (the history file in --state-dir, or PostgreSQL: every
    /// concentrator's leases).
    #[command(after_help = "Examples:
  tunnel-ctl leases --instance concentrator --json
  tunnel-ctl leases --history --ipv4 198.51.100.7 --at 2026-12-01T21:30:00Z")]
    Leases(LeasesArgs),

    /// Show what a running daemon is doing (role, interfaces, uptime).
    #[command(after_help = "Example:\n  tunnel-ctl status --instance lab --json")]
    Status(QueryArgs),

    /// Show a running daemon's packet counters, summed over CPUs.
    ///
    /// With --json: one object of counter name -> integer. Every counter is listed,
    /// zeros included.
    #[command(after_help = "Example:\n  tunnel-ctl stats --instance lab --json")]
    Stats(QueryArgs),

    /// List a MAP-E CE's NAPT mappings (protocol, LAN endpoint, external port, remote, kind,
    /// idle time).
    ///
    /// With --json: a list of objects with proto, lan, external_port, remote ("*" for
    /// forwards and endpoint-independent mappings), kind, idle_ms.
    #[command(after_help = "Example:\n  tunnel-ctl nat --instance home --json")]
    Nat(QueryArgs),

    /// Answer "who used external port P at time T" from a CE's port log (`mape ce
    /// --port-log FILE`, and its rotated FILE.1): each mapping of that port in use then, with
    /// its LAN endpoint, remote, start and end. Reads the files: works without the daemon.
    ///
    /// With --json: a list of objects with proto, lan, external_port, remote (null for
    /// forwards and endpoint-independent mappings), kind, start, end (null: still in use).
    #[command(
        after_help = "Example:\n  tunnel-ctl portlog /var/log/tunnel/ports.log --port 4100 \\
    --at 2026-12-01T21:30:00Z --proto tcp"
    )]
    Portlog(PortlogArgs),

    /// Manage a MAP-E CE's static port forwards at runtime.
    #[command(subcommand)]
    #[command(after_help = "Examples:
  tunnel-ctl forward add 1680=192.168.1.10:80/tcp --instance home
  tunnel-ctl forward del 1680/tcp --instance home
  tunnel-ctl forward list --instance home")]
    Forward(ForwardCommand),

    /// Change a server's lwAFTR softwire table at run time (SPEC §4a): each change reaches
    /// the fast path at once, and no other softwire loses a packet. Changes are not written
    /// to the --bindings file: a reload makes the table the file's again.
    #[command(subcommand)]
    #[command(after_help = "Examples:
  tunnel-ctl softwire add 203.0.113.1 4/6 2001:db8:1::2 --instance aftr
  tunnel-ctl softwire add 203.0.113.9 0/0 2001:db8:1::3 --instance aftr    # whole address
  tunnel-ctl softwire del 203.0.113.1 4 --instance aftr
  tunnel-ctl softwire list --json --instance aftr")]
    Softwire(SoftwireCommand),

    /// Make a running daemon re-read its configuration (its --config file and the flags it
    /// was started with) and apply the difference without dropping anyone; the same as
    /// SIGHUP. Prints what changed, and what only a restart can change.
    ///
    /// A server changes its pool (leases of a removed range end with 110 "address
    /// withdrawn"), --allow, its limits, DNS and timers for new sessions in place. A file that
    /// does not load is refused whole: exit status 1 with the error, nothing changes.
    #[command(after_help = "Example:\n  tunnel-ctl reload --instance hub")]
    Reload(InstanceArg),
}

#[derive(Debug, Clone, Args)]
pub struct InstanceArg {
    /// Instance name: picks /run/tunnel/NAME.sock and /sys/fs/bpf/tunnel/NAME/.
    #[arg(long, value_name = "NAME", default_value = DEFAULT_INSTANCE, value_parser = parse_instance)]
    pub instance: Instance,
}

#[derive(Debug, Clone, Args)]
pub struct PortlogArgs {
    /// The port log (`mape ce --port-log`).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,

    /// The external port asked about.
    #[arg(long, value_name = "PORT")]
    pub port: u16,

    /// The moment asked about: RFC 3339 (`2026-12-01T21:30:00Z`; UTC when no offset).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub at: std::time::SystemTime,

    /// Only this protocol.
    #[arg(long, value_parser = ["tcp", "udp", "icmp"])]
    pub proto: Option<String>,

    /// Print JSON for scripts instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn parse_time(s: &str) -> Result<std::time::SystemTime, String> {
    humantime::parse_rfc3339_weak(s)
        .map_err(|e| format!("{s:?}: {e} (RFC 3339, e.g. 2026-12-01T21:30:00Z)"))
}

#[derive(Debug, Clone, Args)]
pub struct LeasesArgs {
    #[command(flatten)]
    pub query: QueryArgs,

    /// Who held addresses when (an abuse request: who had A at T?), ended leases included.
    #[arg(long)]
    pub history: bool,

    /// With --history: only this address.
    #[arg(long, value_name = "IPV4", requires = "history")]
    pub ipv4: Option<Ipv4Addr>,

    /// With --history: only leases held at this moment (RFC 3339).
    #[arg(long, value_name = "TIME", value_parser = parse_time, requires = "history")]
    pub at: Option<std::time::SystemTime>,
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

    #[command(flatten)]
    pub config: ConfigArgs,

    /// Serve Prometheus metrics (OpenMetrics text) at http://ADDR:PORT/metrics: every stats
    /// counter as tunnel_<name>_total, status figures as gauges. Off unless given.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<SocketAddr>,
}

/// `--config FILE` and `--print-config`, for every daemon (see [`crate::config`]).
#[derive(Debug, Clone, Args)]
pub struct ConfigArgs {
    /// Read settings from this TOML file: the keys are the long flags of this command
    /// ("pool", "max-sessions", "v6-dev", ...), a repeatable flag takes an array, a switch
    /// true or false, durations are strings ("20s"). Flags typed on the command line override
    /// the file's keys.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Print the effective settings (file, flags and defaults) as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
}

#[derive(Debug, Clone, Args)]
pub struct TimerArgs {
    /// Send a keepalive (104) this often.
    #[arg(long, value_name = "DURATION", default_value = "20s", value_parser = parse_duration)]
    pub keepalive: Duration,

    /// Close the session after hearing nothing for this long.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// `--no-tun-offload` (server and client).
#[derive(Args, Debug, Clone, Copy)]
pub struct TunOffloadArg {
    /// Read and write the TUN one packet at a time. By default the TUN uses the kernel's
    /// offloads (IFF_VNET_HDR, TSO/USO): one read brings a TCP super-packet of up to 64 KiB,
    /// split here into MTU-sized packets, and consecutive packets of one flow from the tunnel
    /// go down in one write. The wire is the same either way (one packet per 102/103); a
    /// kernel without offloads gets this mode by itself.
    #[arg(long)]
    pub no_tun_offload: bool,
}

#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// TCP address to listen on; [::] also accepts IPv4 (mapped) clients.
    #[arg(long, value_name = "ADDR:PORT", default_value = "[::]:5678")]
    pub listen: SocketAddr,

    /// Client addresses: FIRST-LAST, a CIDR, or one address; repeat or comma-separate.
    /// Without it (and with --bindings) the server is a pure lwAFTR: no control channel.
    #[arg(
        long,
        value_name = "RANGE",
        required_unless_present = "bindings",
        value_delimiter = ','
    )]
    pub pool: Vec<Range4>,

    /// The server's own address on the TUN device (never leased).
    #[arg(long, value_name = "IPV4", required_unless_present = "bindings")]
    pub gateway: Option<Ipv4Addr>,

    /// DNS servers announced in 101 (comma-separated, up to 3 used). Default: the IPv4
    /// nameservers of /etc/resolv.conf.
    #[arg(long, value_name = "IPV4,...", value_delimiter = ',')]
    pub dns: Vec<Ipv4Addr>,

    #[command(flatten)]
    pub timers: TimerArgs,

    /// Keep a released address for its last client this long (same IPv6 → same IPv4).
    #[arg(long, value_name = "DURATION", default_value = "300s", value_parser = parse_duration)]
    pub hold: Duration,

    /// Name of the TUN device.
    #[arg(long, value_name = "NAME", default_value = "tun4o6", value_parser = crate::tundev::parse_name)]
    pub tun: String,

    /// TUN queues read in parallel, one worker each (IFF_MULTI_QUEUE: the kernel spreads
    /// flows over them; sessions are spread over them for their writes). Default: one per
    /// CPU, at most 8.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub tun_queues: Option<u16>,

    #[command(flatten)]
    pub tun_offload: TunOffloadArg,

    /// Only accept clients from these prefixes (repeatable). Default: everyone.
    #[arg(long, value_name = "CIDR")]
    pub allow: Vec<IpNet>,

    /// Refuse new sessions beyond this many (110 "server full"; 0: no limit). In every limit
    /// here, 0 means "no limit".
    #[arg(
        long,
        value_name = "N",
        default_value_t = 10_000,
        help_heading = "Limits"
    )]
    pub max_sessions: usize,

    /// Refuse a source address's connections beyond this many at once (110; 0: no limit).
    /// Clients behind one NAT share an address: size it for the largest such site.
    #[arg(long, value_name = "N", default_value_t = 64, help_heading = "Limits")]
    pub max_per_source: usize,

    /// Native mode: how many clients the fast path can bind (the size of each binding map;
    /// 1 to 4,194,304). A 105 beyond it is refused with 110 "the fast path is full". It
    /// sizes the lwAFTR's softwire maps too: a --bindings table of 1,000,000 softwires
    /// needs --max-bindings 1000000. The binding cache the decap programs read first gets
    /// as many entries (the next power of two; 32 bytes each, at most 1,048,576).
    #[arg(long, value_name = "N", default_value_t = tunnel_common::fastpath::MAX_BINDINGS,
          value_parser = clap::value_parser!(u32).range(1..=4_194_304), help_heading = "Limits")]
    pub max_bindings: u32,

    /// Leases that clients in one IPv6 prefix may hold at once (0: no limit); more are
    /// refused with 110 and counted as lease_limit_refused, so one site's /64 cannot take the
    /// whole pool. The prefix length is that of the prefix-len flag below.
    #[arg(long, value_name = "N", default_value_t = 16, help_heading = "Limits")]
    pub max_leases_per_prefix: usize,

    /// The prefix length that --max-leases-per-prefix groups IPv6 clients by.
    #[arg(
        long,
        value_name = "LEN",
        default_value_t = 64,
        value_parser = clap::value_parser!(u8).range(1..=128),
        help_heading = "Limits"
    )]
    pub prefix_len: u8,

    /// Leases that one source address (IPv4 or IPv6) may hold at once (110 beyond; 0: no
    /// limit).
    #[arg(long, value_name = "N", default_value_t = 16, help_heading = "Limits")]
    pub max_leases_per_address: usize,

    /// New connections per second one source address may open, in bursts of twice that
    /// (110 beyond it; 0: no limit).
    #[arg(long, value_name = "N", default_value_t = 20, help_heading = "Limits")]
    pub max_connect_rate: u32,

    /// Close a connection that has not asked for an address (100 or 107) this long after
    /// connecting: idle and slowloris connections do not pile up.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration,
          help_heading = "Limits")]
    pub handshake_timeout: Duration,

    /// Packets waiting for one session (from the TUN); beyond this a slow client loses its
    /// own packets (drop_session_queue_full), nobody else's. Before that, CoDel (RFC 8289:
    /// 5 ms target, 100 ms interval) drops one now and then while packets keep waiting
    /// longer than 5 ms (drop_session_aqm), so TCP backs off one loss at a time.
    #[arg(long, value_name = "PACKETS", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..=65536), help_heading = "Limits")]
    pub session_queue: u32,

    /// Bytes waiting for one session (from the TUN), whatever the packet count: the cap on
    /// what a slow client can make the server hold (beyond it: drop_session_queue_full). A
    /// download to a client that reads slower than the sender sends fills it; at 1 MiB a
    /// single TCP flow at 5 Gbit/s lost 8% of its packets here in bursts of hundreds.
    #[arg(long, value_name = "BYTES", default_value_t = 4 << 20,
          value_parser = clap::value_parser!(u32).range(1500..), help_heading = "Limits")]
    pub session_buffer: u32,

    /// IPv6 for clients (107/108): hand each client that asks an address (/128) from this
    /// prefix, routed to the TUN. The upstream routes the prefix to this host, or see
    /// --proxy-ndp.
    #[arg(long, value_name = "PREFIX", help_heading = "IPv6 for clients")]
    pub pool6: Option<ipnet::Ipv6Net>,

    /// IPv6 for clients: delegate each client that asks a prefix of --delegate-len from this
    /// one (for its LAN). The upstream must route it to this host.
    #[arg(long, value_name = "PREFIX", help_heading = "IPv6 for clients")]
    pub delegate: Option<ipnet::Ipv6Net>,

    /// Length of each delegated prefix (64 lets the client's LAN autoconfigure by SLAAC).
    #[arg(long, value_name = "LEN", default_value_t = 64, requires = "delegate",
          value_parser = clap::value_parser!(u8).range(1..=128), help_heading = "IPv6 for clients")]
    pub delegate_len: u8,

    /// IPv6 DNS servers announced in 108 (comma-separated). Default: the IPv6 nameservers
    /// of /etc/resolv.conf.
    #[arg(
        long,
        value_name = "IPV6,...",
        value_delimiter = ',',
        help_heading = "IPv6 for clients"
    )]
    pub dns6: Vec<Ipv6Addr>,

    /// The --pool6 prefix is on-link on this upstream interface (the provider's /64): answer
    /// neighbour solicitations there for leased addresses (kernel proxy NDP entries, added
    /// and removed with each lease).
    #[arg(
        long,
        value_name = "IFACE",
        requires = "pool6",
        help_heading = "IPv6 for clients"
    )]
    pub proxy_ndp: Option<String>,

    /// Let new inbound connections to clients' IPv6 addresses through on this port (TCP and
    /// UDP, or PORT/tcp, PORT/udp; repeatable). Everything else from outside is dropped
    /// unless it answers the client's own traffic (default deny, counted as
    /// drop_inbound_denied).
    #[arg(long, value_name = "PORT[/PROTO]", help_heading = "IPv6 for clients")]
    pub allow_in: Vec<crate::server::inbound::AllowIn>,

    /// Native mode: the IPv6-side interface where clients' IPv4-in-IPv6 arrives (enables
    /// 105/106; needs --v4-dev).
    #[arg(long, value_name = "IFACE", requires = "v4_dev")]
    pub v6_dev: Option<String>,

    /// Native mode: the IPv4-side interface where traffic to native clients arrives.
    #[arg(long, value_name = "IFACE", requires = "v6_dev")]
    pub v4_dev: Option<String>,

    /// Native mode: the server's tunnel endpoint (outer address of native packets). Default:
    /// the --listen address when that is a specific IPv6 address.
    #[arg(long, value_name = "IPV6")]
    pub tunnel_addr: Option<Ipv6Addr>,

    /// Native mode: answer packets dropped for their source (an IPv6 address with no
    /// binding, or an inner IPv4 source that is not the lease) with ICMPv6 type 1 code 5,
    /// "source address failed ingress/egress policy" (RFC 7596 §5.1), at most N per second.
    /// 0: drop silently (the counters still tell).
    #[arg(long, value_name = "N", default_value_t = 0, requires = "v6_dev")]
    pub policy_icmp: u32,

    /// lwAFTR (RFC 7596): a static table of softwires, TOML `[[softwire]]` entries with
    /// ipv4, psid, psid-len (0: whole address), psid-offset (default 6), b4 and optional
    /// aftr (default --tunnel-addr). B4s send IPv4-in-IPv6 from their b4 address with a
    /// source port in their set; traffic to the address and port goes back to them. Works
    /// next to --pool or alone (a pure lwAFTR: no listener, no TUN). Change it at run time
    /// with `tunnel-ctl softwire add|del` or by editing the file and `tunnel-ctl reload`.
    #[arg(
        long,
        value_name = "FILE",
        requires = "v6_dev",
        help_heading = "lwAFTR (shared addresses)"
    )]
    pub bindings: Option<PathBuf>,

    /// lw4o6 (RFC 7596): share each pool address among N native clients (a power of two,
    /// 1-1024; 1 = whole addresses). A client that asks for native mode before its lease
    /// (our client does) gets the address with a PSID of log2(N) bits and NAPTs into that
    /// port set; the 101 and the 106 carry `psid=P/K offset=A`. In-band clients, and native
    /// clients that ask after their lease, keep whole addresses from the same pool, never a
    /// shared one. Needs native mode (--v6-dev, --v4-dev).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1,
        help_heading = "lwAFTR (shared addresses)"
    )]
    pub share: u16,

    /// lw4o6: the PSID offset A of shared leases (SPEC §6): with A > 0 the ports below
    /// 2^(16-A) are never used (A = 6: not 0-1023); A = 0 gives each client one contiguous
    /// range.
    #[arg(
        long,
        value_name = "A",
        default_value_t = 6,
        value_parser = clap::value_parser!(u8).range(0..=15),
        help_heading = "lwAFTR (shared addresses)"
    )]
    pub psid_offset: u8,

    /// lwAFTR: drop packets from one softwire to another softwire's address and port
    /// (counted as drop_hairpin_off) instead of sending them straight back toward that B4.
    #[arg(long, help_heading = "lwAFTR (shared addresses)")]
    pub no_hairpin: bool,

    /// Native mode: also decapsulate in XDP on --v6-dev (the plain case: a bound client, its
    /// lease as inner source, no IPv4 options, not a SYN, a known next hop), in the driver
    /// when it has native XDP, ahead of the TC program that still handles everything else.
    /// For NICs with native XDP, where --v4-dev must take XDP-redirected frames (most XDP
    /// drivers). On veth (containers) it costs more than it saves: the peer loses its GSO,
    /// so every hop before carries MTU-sized packets (`cargo xtask bench` measures both),
    /// the --v4-dev veth's peer needs GRO on (else redirected frames are lost), and frames
    /// must come with complete checksums (XDP cannot finish a partial one). Counted as
    /// fastpath_xdp_decap_packets. Takes a restart.
    #[arg(long, requires = "v6_dev")]
    pub xdp: bool,

    /// Where leases are saved so that a restarted server re-adopts them.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/tunnel")]
    pub state_dir: PathBuf,

    /// Where leases live: `file` (the lease file in --state-dir, one machine) or a
    /// PostgreSQL URL, `postgres://USER@HOST/DB` (or `postgresql:///DB?host=/run/postgresql`
    /// for a unix socket), shared by several concentrators that serve one pool: no address
    /// is leased twice and a client that fails over gets its address back. The password
    /// comes from the URL or PGPASSFILE (~/.pgpass); the schema is created on first start.
    #[arg(long, value_name = "file|URL", default_value = "file", value_parser = parse_lease_store,
          help_heading = "Several concentrators")]
    pub lease_store: crate::config::LeaseStoreSpec,

    /// This concentrator's name in the shared lease store: the owner of its leases and the
    /// node in lease history. Default: the host name. Unique per concentrator.
    #[arg(long, value_name = "NAME", help_heading = "Several concentrators")]
    pub node_id: Option<String>,

    /// Which clients count as the same one for getting their address back (a reconnect, a
    /// failover to another concentrator, the --hold): `address`, the same source address;
    /// `prefix64`, any source in the same IPv6 /64 (clients whose address changes within
    /// their /64, privacy addresses say).
    #[arg(long, value_name = "KEY", value_enum, default_value = "address")]
    pub client_key: ClientKeyArg,

    #[command(flatten)]
    pub instance: InstanceArg,

    #[command(flatten)]
    pub config: ConfigArgs,

    /// Serve Prometheus metrics (OpenMetrics text) at http://ADDR:PORT/metrics: every stats
    /// counter as tunnel_<name>_total, status figures as gauges. Off unless given.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<SocketAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ClientKeyArg {
    Address,
    Prefix64,
}

fn parse_lease_store(s: &str) -> Result<crate::config::LeaseStoreSpec, String> {
    s.parse()
}

#[derive(Debug, Subcommand)]
pub enum MapeCommand {
    /// Compute the shared IPv4 address, PSID, port set, CE IPv6 address and BR from a Basic
    /// Mapping Rule (or a shipped profile) and the line's end-user IPv6 prefix.
    ///
    /// Port set (SPEC §6): with PSID offset a, PSID length k and m = 16 - a - k, the ports
    /// are (j << (16-a)) | (psid << m) | i for j = 1 .. 2^a-1 and i = 0 .. 2^m-1.
    #[command(after_help = "Examples:
  # OCN Virtual Connect (63 blocks of 16 ports) and v6plus (15 blocks of 16)
  tunnel-ctl mape calc --profile ocn --prefix 2400:4050:1234:5600::/56
  tunnel-ctl mape calc --profile v6plus --prefix 240b:10:abcd:ef00::/56 --json
  # any rule: RFC 7597 Appendix A, example 1
  tunnel-ctl mape calc --rule-ipv6 2001:db8::/40 --rule-ipv4 192.0.2.0/24 --ea-len 16 \\
      --psid-offset 6 --prefix 2001:db8:12:3400::/56
  # no EA bits, a full IPv4 address shared by explicit PSID (Appendix A, example 5)
  tunnel-ctl mape calc --rule-ipv6 2001:db8:12:3400::/56 --rule-ipv4 192.0.2.1/32 \\
      --ea-len 0 --psid 0x34 --psid-len 8 --prefix 2001:db8:12:3400::/56")]
    Calc(MapeCalcArgs),

    /// Daemon: a MAP-E CE. NAPT of the LAN into the line's shared IPv4 address and port set,
    /// IPv4-in-IPv6 to the BR, all in eBPF after each flow's first packet.
    ///
    /// The first packet of a new flow reaches the controller through a TUN device (routed
    /// for 0.0.0.0/1 and 128.0.0.0/1 unless --no-default-route): it picks an external port
    /// from the set, spreading flows over every block, installs both directions in the maps
    /// and sends the packet on. A port is reused toward different remotes (port saving); when
    /// every port toward one remote is taken, new flows there fail at once (ICMP
    /// administratively prohibited) and are counted (port_exhausted). Idle mappings expire
    /// per protocol (see the timeouts). `tunnel-ctl nat` lists the mappings.
    #[command(after_help = "Examples:
  # OCN Virtual Connect on eth0 (the ONU side), LAN on br-lan, a web server forwarded
  tunnel-ctl mape ce --wan eth0 --lan br-lan --profile ocn \\
      --prefix 2400:4050:1234:5600::/56 --forward 1680=192.168.1.10:80/tcp
  # any rule (the test lab's): BR given explicitly
  tunnel-ctl mape ce --wan wan0 --lan lan0 --rule-ipv6 2001:db8::/40 \\
      --rule-ipv4 203.0.113.0/24 --ea-len 16 --psid-offset 6 \\
      --br 2001:db8:ffff::1 --prefix 2001:db8:12:a400::/56

The upstream must route the end-user prefix to --wan; nothing needs to be configured on it.
The CE enables net.ipv4.ip_forward.")]
    Ce(Box<MapeCeArgs>),

    /// Daemon: a MAP-E BR (stateless). Checks each CE's source against the rules and
    /// decapsulates; encapsulates toward the CE address computed from destination and port.
    #[command(after_help = "Example:
  tunnel-ctl mape br --v6-dev eth0 --v4-dev eth1 --br-addr 2001:db8:ffff::1 \\
      --rule 2001:db8::/40,203.0.113.0/24,16,6

Packets from a CE whose inner source port is outside its set, or whose outer source is not
the address the rule gives, are dropped and counted (mape_br_drop_*). The IPv4 side must route
the rule prefixes to this host; it routes them to its TUN for the slow path (too big).")]
    Br(MapeBrArgs),
}

/// Which Basic Mapping Rule: a shipped profile, or the rule's parameters.
#[derive(Debug, Clone, Args)]
pub struct RuleArgs {
    /// A shipped rule table: v6plus or ocn.
    #[arg(long, value_name = "NAME")]
    pub profile: Option<String>,

    /// Custom rule: the rule IPv6 prefix.
    #[arg(long, value_name = "PREFIX")]
    pub rule_ipv6: Option<ipnet::Ipv6Net>,

    /// Custom rule: the rule IPv4 prefix.
    #[arg(long, value_name = "PREFIX")]
    pub rule_ipv4: Option<ipnet::Ipv4Net>,

    /// Custom rule: EA-bits length (0-48).
    #[arg(long, value_name = "N")]
    pub ea_len: Option<u8>,

    /// Custom rule: PSID offset a (default 6).
    #[arg(long, value_name = "A")]
    pub psid_offset: Option<u8>,

    /// Custom rule with explicit port parameters (RFC 7598 S46_PORTPARAMS): the PSID,
    /// decimal or 0x-hex. Only for a rule whose EA bits hold no PSID (a full IPv4 address
    /// shared by port set); needs --psid-len.
    #[arg(long, value_name = "PSID", value_parser = parse_u16_any_radix, requires = "psid_len")]
    pub psid: Option<u16>,

    /// Custom rule with explicit port parameters: the PSID length k (1-16); needs --psid.
    #[arg(long, value_name = "K", requires = "psid")]
    pub psid_len: Option<u8>,

    /// Custom rule: the BR's IPv6 address.
    #[arg(long, value_name = "IPV6")]
    pub br: Option<Ipv6Addr>,

    /// CE interface-id layout (profiles default to draft03, custom rules to rfc7597).
    #[arg(long, value_enum)]
    pub interface_id: Option<crate::mape::rule::InterfaceId>,

    /// The line's end-user IPv6 prefix (delegated prefix), e.g. 2400:4050:1234:5600::/56.
    /// `mape ce` also takes `auto`: the /64 of a global address on --wan that a rule covers
    /// (the prefix an RA gives), followed when it changes: the CE moves to the new shared
    /// address and port set within seconds.
    #[arg(long, value_name = "IPV6PREFIX|auto", value_parser = parse_prefix)]
    pub prefix: PrefixArg,
}

/// `--prefix`: a prefix, or `auto` (taken from the WAN).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefixArg {
    Net(ipnet::Ipv6Net),
    Auto,
}

fn parse_prefix(s: &str) -> Result<PrefixArg, String> {
    if s == "auto" {
        return Ok(PrefixArg::Auto);
    }
    s.parse().map(PrefixArg::Net).map_err(|e| {
        format!("{s:?}: {e} (an IPv6 prefix such as 2400:4050:1234:5600::/56, or auto)")
    })
}

impl RuleArgs {
    /// The flags as the calculator's plain query.
    pub fn query(&self) -> crate::mape::RuleQuery {
        crate::mape::RuleQuery {
            profile: self.profile.clone(),
            rule_ipv6: self.rule_ipv6,
            rule_ipv4: self.rule_ipv4,
            ea_len: self.ea_len,
            psid_offset: self.psid_offset,
            psid: self.psid,
            psid_len: self.psid_len,
            br: self.br,
            interface_id: self.interface_id,
            prefix: match self.prefix {
                PrefixArg::Net(n) => n,
                // Filled in from the WAN's addresses (`mape ce`).
                PrefixArg::Auto => ipnet::Ipv6Net::default(),
            },
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct MapeCalcArgs {
    #[command(flatten)]
    pub rule: RuleArgs,

    /// Print JSON (ipv4, psid, psid_len, psid_offset, ea_len, port_count, port_ranges,
    /// ce_ipv6, br).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct NatTimeouts {
    /// Idle timeout of an established TCP mapping (RFC 5382: at least 2h4m).
    #[arg(long, value_name = "DURATION", default_value = "2h4m", value_parser = parse_duration)]
    pub tcp_timeout: Duration,

    /// Idle timeout of a TCP mapping that is opening or closing (SYN only, FIN or RST seen).
    #[arg(long, value_name = "DURATION", default_value = "4m", value_parser = parse_duration)]
    pub tcp_transitory_timeout: Duration,

    /// Idle timeout of a UDP mapping (RFC 4787: at least 2m).
    #[arg(long, value_name = "DURATION", default_value = "2m", value_parser = parse_duration)]
    pub udp_timeout: Duration,

    /// Idle timeout of an ICMP echo mapping.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub icmp_timeout: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct MapeCeArgs {
    /// The IPv6 (IPoE) side: IPv4-in-IPv6 to and from the BR goes through it.
    #[arg(long, value_name = "IFACE")]
    pub wan: String,

    /// The IPv4 LAN side: its hosts are translated into the port set.
    #[arg(long, value_name = "IFACE")]
    pub lan: String,

    #[command(flatten)]
    pub rule: RuleArgs,

    /// Static port forward EXTPORT=IPV4:PORT[/tcp|/udp] (both protocols without a suffix);
    /// EXTPORT must be in the port set. Repeatable.
    #[arg(long, value_name = "EXTPORT=IPV4:PORT[/PROTO]")]
    pub forward: Vec<crate::mape::ForwardSpec>,

    /// Endpoint-independent mapping for UDP: one external port per LAN socket, open to every
    /// remote (helps games and VoIP; uses the port set faster).
    #[arg(long)]
    pub udp_eim: bool,

    #[command(flatten)]
    pub timeouts: NatTimeouts,

    /// Name of the TUN device (the slow path: first packets of new flows).
    #[arg(long, value_name = "NAME", default_value = "mape0", value_parser = crate::tundev::parse_name)]
    pub tun: String,

    /// Do not route IPv4 into MAP-E (0.0.0.0/1 and 128.0.0.0/1 via the TUN); route it yourself.
    #[arg(long)]
    pub no_default_route: bool,

    /// Where the NAPT mappings are saved (`<instance>.nat.json`), so that a restarted CE
    /// takes them back and established flows continue (after a SIGKILL the pinned maps
    /// keep them too).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/tunnel")]
    pub state_dir: PathBuf,

    /// With --prefix auto: read the prefix from this interface's addresses instead of
    /// --wan's (a LAN interface numbered from a delegated prefix, when the WAN has none).
    #[arg(long, value_name = "IFACE")]
    pub prefix_from: Option<String>,

    /// Answer PCP (RFC 6887) MAP requests from the LAN on UDP 5351: an application gets an
    /// inbound port forward from the port set (the port it suggests when that one is free),
    /// for the lifetime it asks, at most 2 h, renewed by asking again.
    #[arg(long)]
    pub pcp: bool,

    /// Log every mapping's start and end (time, protocol, LAN endpoint, external port,
    /// remote) as JSON lines to FILE, for abuse requests: `tunnel-ctl portlog FILE --port P
    /// --at TIME` answers who used a port when. Rotated to FILE.1 at --port-log-size.
    #[arg(long, value_name = "FILE")]
    pub port_log: Option<PathBuf>,

    /// Size at which the port log is rotated (bytes).
    #[arg(long, value_name = "BYTES", default_value_t = 64 * 1024 * 1024)]
    pub port_log_size: u64,

    #[command(flatten)]
    pub instance: InstanceArg,

    #[command(flatten)]
    pub config: ConfigArgs,

    /// Serve Prometheus metrics (OpenMetrics text) at http://ADDR:PORT/metrics: every stats
    /// counter as tunnel_<name>_total, status figures as gauges. Off unless given.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<SocketAddr>,
}

#[derive(Debug, Clone, Args)]
pub struct MapeBrArgs {
    /// The IPv6 side, toward the CEs.
    #[arg(long, value_name = "IFACE")]
    pub v6_dev: String,

    /// The IPv4 side, toward the internet.
    #[arg(long, value_name = "IFACE")]
    pub v4_dev: String,

    /// The BR's IPv6 address (CEs send to it; the IPv6 side must route it here).
    #[arg(long, value_name = "IPV6")]
    pub br_addr: Ipv6Addr,

    /// A mapping rule IPV6PREFIX,IPV4PREFIX,EA_LEN[,PSID_OFFSET] (offset defaults to 6).
    /// Repeatable; the longest IPv4 prefix wins.
    #[arg(long, value_name = "RULE", required = true)]
    pub rule: Vec<crate::mape::rule::RuleSpec>,

    /// CE interface-id layout of the rules.
    #[arg(long, value_enum, default_value_t = crate::mape::rule::InterfaceId::Rfc7597)]
    pub interface_id: crate::mape::rule::InterfaceId,

    /// Name of the TUN device (the slow path: packets too big for the tunnel).
    #[arg(long, value_name = "NAME", default_value = "mapebr0", value_parser = crate::tundev::parse_name)]
    pub tun: String,

    /// Also decapsulate in XDP on --v6-dev (the plain case: unfragmented TCP or UDP whose
    /// outer source is the CE address the rule gives for its inner source and port, no IPv4
    /// options, not a SYN, a known next hop), in the driver when it has native XDP, ahead of
    /// the TC program that still handles, logs and counts everything else. For NICs with
    /// native XDP, where --v4-dev must take XDP-redirected frames. On veth it costs more than
    /// it saves (the peer loses its GSO, the --v4-dev veth's peer needs GRO on, and frames must
    /// come with complete checksums). Counted as fastpath_xdp_decap_packets. Takes a restart.
    #[arg(long)]
    pub xdp: bool,

    #[command(flatten)]
    pub instance: InstanceArg,

    #[command(flatten)]
    pub config: ConfigArgs,

    /// Serve Prometheus metrics (OpenMetrics text) at http://ADDR:PORT/metrics: every stats
    /// counter as tunnel_<name>_total, status figures as gauges. Off unless given.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<SocketAddr>,
}

#[derive(Debug, Subcommand)]
pub enum ForwardCommand {
    /// Add a forward: EXTPORT=IPV4:PORT[/tcp|/udp].
    Add {
        spec: crate::mape::ForwardSpec,
        #[command(flatten)]
        instance: InstanceArg,
    },
    /// Remove the forward on EXTPORT (both protocols unless /tcp or /udp is given).
    Del {
        #[arg(value_name = "EXTPORT[/PROTO]")]
        port: crate::mape::ForwardPort,
        #[command(flatten)]
        instance: InstanceArg,
    },
    /// List the forwards.
    List(QueryArgs),
}

#[derive(Debug, Subcommand)]
pub enum SoftwireCommand {
    /// Add a softwire: IPV4, PSID/LEN (k bits of port-set id; 0/0 is the whole address), the
    /// B4's IPv6 address.
    Add {
        ipv4: Ipv4Addr,
        #[arg(value_name = "PSID/LEN", value_parser = parse_psid_len)]
        psid: (u16, u8),
        b4: Ipv6Addr,
        /// a: ports whose top a bits are 0 are in no set (0: one contiguous range, ports
        /// below 1024 included).
        #[arg(long, value_name = "A", default_value_t = crate::server::softwires::DEFAULT_PSID_OFFSET)]
        psid_offset: u8,
        /// This softwire's AFTR address (default: the server's --tunnel-addr).
        #[arg(long, value_name = "IPV6")]
        aftr: Option<Ipv6Addr>,
        #[command(flatten)]
        instance: InstanceArg,
    },
    /// Remove the softwire of IPV4 and PSID.
    Del {
        ipv4: Ipv4Addr,
        psid: u16,
        #[command(flatten)]
        instance: InstanceArg,
    },
    /// List the softwires (with --json: ipv4, psid, psid_len, psid_offset, b4, aftr,
    /// port_count).
    List(QueryArgs),
}

impl SoftwireCommand {
    /// The softwire an `add` names, checked.
    pub fn softwire(
        ipv4: Ipv4Addr,
        (psid, len): (u16, u8),
        b4: Ipv6Addr,
        offset: u8,
        aftr: Option<Ipv6Addr>,
    ) -> anyhow::Result<crate::server::softwires::Softwire> {
        crate::server::softwires::Softwire::new(ipv4, psid, len, offset, b4, aftr)
            .map_err(crate::usage::usage)
    }
}

/// `PSID/LEN`, e.g. `4/6`.
fn parse_psid_len(s: &str) -> Result<(u16, u8), String> {
    let (p, l) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?}: write PSID/LEN, e.g. 4/6 (0/0: the whole address)"))?;
    let psid = p
        .parse::<u16>()
        .map_err(|_| format!("{s:?}: PSID {p:?} is not a number 0-65535"))?;
    let len = l
        .parse::<u8>()
        .ok()
        .filter(|l| *l <= 16)
        .ok_or_else(|| format!("{s:?}: LEN {l:?} is not 0-16"))?;
    Ok((psid, len))
}

/// How a client carries its IPv4 traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ClientMode {
    /// 102/103 frames over the TCP session through a TUN device (works with any server).
    Inband,
    /// IPv4-in-IPv6 by eBPF on --v6-dev, after the server grants 105/106.
    Native,
}

#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// The server's control address. Repeat it for several concentrators that share one
    /// lease store: the client starts with the first, moves to the next when a connection
    /// or session setup fails (keeping its backoff), and gets its address back there.
    #[arg(long, value_name = "ADDR:PORT", required = true)]
    pub server: Vec<SocketAddr>,

    /// In-band (TUN, 102/103) or native (eBPF IPv4-in-IPv6 on --v6-dev).
    #[arg(long, value_enum, default_value_t = ClientMode::Inband)]
    pub mode: ClientMode,

    /// Native mode: the interface that reaches the server over IPv6.
    #[arg(long, value_name = "IFACE", required_if_eq("mode", "native"))]
    pub v6_dev: Option<String>,

    /// Name of the TUN device (in-band mode).
    #[arg(long, value_name = "NAME", default_value = "tun4o6", value_parser = crate::tundev::parse_name)]
    pub tun: String,

    #[command(flatten)]
    pub tun_offload: TunOffloadArg,

    /// Do not route IPv4 (and IPv6, with --ipv6) through the tunnel (only the leased
    /// addresses are configured).
    #[arg(long)]
    pub no_default_route: bool,

    /// Also ask for IPv6 (107): configure the leased address on the TUN and route IPv6
    /// through the tunnel (::/1 and 8000::/1). In-band mode only.
    #[arg(long)]
    pub ipv6: bool,

    /// A LAN behind this client. With --ipv6: hand the delegated IPv6 prefix to it (number
    /// it <prefix>::1, send router advertisements so hosts autoconfigure, forward for them).
    /// In native mode on a shared lease (lwB4): the LAN's IPv4 hosts (numbered by you, with
    /// this host as their router) are NAPTed into the lease's port set like this host's own
    /// traffic (net.ipv4.ip_forward is turned on).
    #[arg(long, value_name = "IFACE")]
    pub lan: Option<String>,

    /// Write the leased DNS servers to this resolv.conf-style file.
    #[arg(long, value_name = "FILE")]
    pub write_resolv_conf: Option<std::path::PathBuf>,

    #[command(flatten)]
    pub timers: TimerArgs,

    /// Longest wait between reconnection attempts (backoff doubles from 1s up to this).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub max_backoff: Duration,

    #[command(flatten)]
    pub instance: InstanceArg,

    #[command(flatten)]
    pub config: ConfigArgs,

    /// Serve Prometheus metrics (OpenMetrics text) at http://ADDR:PORT/metrics: every stats
    /// counter as tunnel_<name>_total, status figures as gauges. Off unless given.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<SocketAddr>,
}

/// A number in decimal or with a `0x` prefix in hex (PSIDs are usually written in hex).
fn parse_u16_any_radix(s: &str) -> Result<u16, String> {
    let t = s.trim();
    match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u16::from_str_radix(hex, 16),
        None => t.parse(),
    }
    .map_err(|e| format!("{s:?}: {e} (write decimal or 0x-hex, 0-65535)"))
}

/// The configuration of the daemon started with `argv`, read again as at start (the
/// `--config` file as it is now, then the flags typed): what a reload applies. `pick` takes
/// that daemon's settings out of the parsed command line.
pub fn reread<T: 'static>(
    argv: Vec<std::ffi::OsString>,
    pick: fn(Command) -> Option<T>,
) -> crate::daemon::Source<T> {
    use clap::{CommandFactory as _, FromArgMatches as _};
    std::sync::Arc::new(move || {
        let root = Cli::command();
        let argv = config::apply(&root, argv.clone())?;
        let matches = root.try_get_matches_from(&argv).map_err(|e| {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            anyhow::anyhow!("{}", first.trim_start_matches("error: "))
        })?;
        let cli = Cli::from_arg_matches(&matches)?;
        pick(cli.command).ok_or_else(|| anyhow::anyhow!("the command line names another daemon"))
    })
}

// What the daemons run with: the parsed flags as `config` types (clap stays here).

impl From<TimerArgs> for config::Timers {
    fn from(t: TimerArgs) -> config::Timers {
        config::Timers {
            keepalive: t.keepalive,
            timeout: t.timeout,
        }
    }
}

/// One TUN queue per CPU, at most 8.
fn default_tun_queues() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
}

impl From<ServerArgs> for config::ServerConfig {
    fn from(a: ServerArgs) -> config::ServerConfig {
        config::ServerConfig {
            listen: a.listen,
            pool: a.pool,
            gateway: a.gateway.unwrap_or(Ipv4Addr::UNSPECIFIED),
            dns: a.dns,
            timers: a.timers.into(),
            hold: a.hold,
            tun: a.tun,
            tun_queues: a.tun_queues.map_or_else(default_tun_queues, usize::from),
            tun_offload: !a.tun_offload.no_tun_offload,
            allow: a.allow,
            max_sessions: a.max_sessions,
            max_per_source: a.max_per_source,
            max_bindings: a.max_bindings,
            max_leases_per_prefix: a.max_leases_per_prefix,
            prefix_len: a.prefix_len,
            max_leases_per_address: a.max_leases_per_address,
            max_connect_rate: a.max_connect_rate,
            handshake_timeout: a.handshake_timeout,
            session_queue: a.session_queue,
            session_buffer: a.session_buffer,
            pool6: a.pool6,
            delegate: a.delegate,
            delegate_len: a.delegate_len,
            dns6: a.dns6,
            proxy_ndp: a.proxy_ndp,
            allow_in: a.allow_in,
            v6_dev: a.v6_dev,
            v4_dev: a.v4_dev,
            tunnel_addr: a.tunnel_addr,
            policy_icmp: a.policy_icmp,
            bindings: a.bindings,
            no_hairpin: a.no_hairpin,
            xdp: a.xdp,
            share: a.share,
            psid_offset: a.psid_offset,
            state_dir: a.state_dir,
            lease_store: a.lease_store,
            node_id: a.node_id,
            client_key: match a.client_key {
                ClientKeyArg::Address => config::ClientKey::Address,
                ClientKeyArg::Prefix64 => config::ClientKey::Prefix64,
            },
            instance: a.instance.instance,
            metrics: a.metrics,
        }
    }
}

impl From<ClientArgs> for config::ClientConfig {
    fn from(a: ClientArgs) -> config::ClientConfig {
        config::ClientConfig {
            servers: a.server,
            mode: match a.mode {
                ClientMode::Inband => config::ClientMode::Inband,
                ClientMode::Native => config::ClientMode::Native,
            },
            v6_dev: a.v6_dev,
            tun: a.tun,
            tun_offload: !a.tun_offload.no_tun_offload,
            no_default_route: a.no_default_route,
            ipv6: a.ipv6,
            lan: a.lan,
            write_resolv_conf: a.write_resolv_conf,
            timers: a.timers.into(),
            max_backoff: a.max_backoff,
            instance: a.instance.instance,
            metrics: a.metrics,
        }
    }
}

impl From<MapeCeArgs> for config::CeConfig {
    fn from(a: MapeCeArgs) -> config::CeConfig {
        let t = a.timeouts;
        config::CeConfig {
            wan: a.wan,
            lan: a.lan,
            rule: a.rule.query(),
            forward: a.forward,
            udp_eim: a.udp_eim,
            timeouts: config::NatTimeouts {
                tcp_timeout: t.tcp_timeout,
                tcp_transitory_timeout: t.tcp_transitory_timeout,
                udp_timeout: t.udp_timeout,
                icmp_timeout: t.icmp_timeout,
            },
            tun: a.tun,
            no_default_route: a.no_default_route,
            prefix_auto: a.rule.prefix == PrefixArg::Auto,
            prefix_from: a.prefix_from,
            pcp: a.pcp,
            state_dir: a.state_dir,
            port_log: a.port_log,
            port_log_size: a.port_log_size,
            instance: a.instance.instance,
            metrics: a.metrics,
        }
    }
}

impl From<MapeBrArgs> for config::BrConfig {
    fn from(a: MapeBrArgs) -> config::BrConfig {
        config::BrConfig {
            v6_dev: a.v6_dev,
            v4_dev: a.v4_dev,
            br_addr: a.br_addr,
            rule: a.rule,
            interface_id: a.interface_id,
            tun: a.tun,
            xdp: a.xdp,
            instance: a.instance.instance,
            metrics: a.metrics,
        }
    }
}

impl From<MonitorArgs> for config::MonitorConfig {
    fn from(a: MonitorArgs) -> config::MonitorConfig {
        use crate::dataplane::tc::Direction;
        config::MonitorConfig {
            devs: a.devs,
            directions: match a.direction {
                DirectionArg::Ingress => vec![Direction::Ingress],
                DirectionArg::Egress => vec![Direction::Egress],
                DirectionArg::Both => vec![Direction::Ingress, Direction::Egress],
            },
            instance: a.instance.instance,
            metrics: a.metrics,
        }
    }
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
