//! The network-namespace lab used by the integration tests and by `cargo xtask demo`.
//!
//! A [`Lab`] creates uniquely named namespaces (`tnl-<pid>-<seq>-<role>`), veth pairs between
//! them, and daemons inside them, and removes all of it when dropped: daemons stopped, namespaces
//! deleted, BPF pins and sockets of its instances removed. Names carry the creating process's
//! pid, so [`Lab::new`] can remove what an earlier, killed run left behind (only our own prefix,
//! only when that pid is gone).
//!
//! Addresses follow SPEC §9: IPv6 2001:db8::/32, IPv4 192.0.2.0/24 (internet hosts),
//! 198.51.100.0/24 (4over6 pool), 203.0.113.0/24 (MAP-E).
//!
//! Waiting: every wait has one deadline for the whole wait, not only for each step of it.
//! [`wait_for`] polls a condition until a limit and fails with the last reason; a loop that
//! skips frames (keepalives) or reads until something shows up computes the time left from
//! one deadline (`fourover6::RawPeer::recv_skip_keepalive`, `loadgen::Session::expect`);
//! daemons get [`DAEMON_START_TIMEOUT`] to open their socket. No fixed sleep stands in for a
//! condition, and no test compares a duration with a threshold: wait for what a user would
//! observe (a status, a counter, a reply), and leave speed to the bench.
use std::{
    fs,
    os::unix::{net::UnixStream, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Once,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};

/// Every namespace, instance and socket the lab makes starts with this.
pub const PREFIX: &str = "tnl";
const NETNS_DIR: &str = "/run/netns";
const PIN_ROOT: &str = "/sys/fs/bpf/tunnel";
const RUN_DIR: &str = "/run/tunnel";
/// How long a daemon gets to open its management socket.
pub const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(20);

static SEQ: AtomicU32 = AtomicU32::new(0);
static STALE_CLEANUP: Once = Once::new();

/// Path of the `tunnel-ctl` binary under test: `$TUNNEL_CTL`, else the workspace's
/// `target/debug/tunnel-ctl` (`cargo xtask test` builds it and sets the variable).
pub fn tunnel_ctl_bin() -> Result<PathBuf> {
    built_binary("TUNNEL_CTL", "debug", "cargo build -p tunnel-ctl")
}

/// The tunnel-ctl that `env` names, else the workspace's `profile` build.
fn built_binary(env: &str, profile: &str, build: &str) -> Result<PathBuf> {
    let path = match std::env::var_os(env) {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target")
            .join(profile)
            .join("tunnel-ctl"),
    };
    if !path.exists() {
        bail!(
            "{} not found: build it first ({build}), or run cargo xtask test",
            path.display()
        );
    }
    Ok(path)
}

/// The release build of tunnel-ctl (`TUNNEL_CTL_RELEASE`, set by `cargo xtask test`), for the
/// tests that measure what an operator's build does (loading a million softwires); a debug
/// build is several times slower there and says nothing about the product.
pub fn tunnel_ctl_release_bin() -> Result<PathBuf> {
    built_binary(
        "TUNNEL_CTL_RELEASE",
        "release",
        "cargo build --release -p tunnel-ctl",
    )
}

/// A network namespace of the lab.
#[derive(Clone, Debug)]
pub struct Ns {
    pub name: String,
}

impl Ns {
    /// A command that runs inside this namespace (network namespace only: the host's /sys,
    /// bpffs and /run stay visible, so pins and management sockets work as on a real host).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={NETNS_DIR}/{}", self.name))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Runs `argv` in the namespace; fails (with its stderr) if it exits non-zero.
    pub fn run(&self, argv: &[&str]) -> Result<String> {
        let (program, args) = argv.split_first().ok_or_else(|| anyhow!("empty command"))?;
        let out = self.command(program).args(args).output()?;
        check(&format!("[{}] {}", self.name, argv.join(" ")), out)
    }

    /// Runs `argv` and returns its output whatever the exit status.
    pub fn output(&self, argv: &[&str]) -> Result<Output> {
        let (program, args) = argv.split_first().ok_or_else(|| anyhow!("empty command"))?;
        Ok(self.command(program).args(args).output()?)
    }

    /// Runs `f` on a thread that has entered this namespace, and returns its result. Sockets
    /// created inside belong to the namespace and can be used from any thread afterwards.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let path = format!("{NETNS_DIR}/{}", self.name);
        let ns = fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    use std::os::fd::AsRawFd as _;
                    // SAFETY: setns on a valid namespace fd affects only this thread.
                    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(anyhow!("setns {path}: {}", std::io::Error::last_os_error()));
                    }
                    Ok(f())
                })
                .join()
                .map_err(|_| anyhow!("thread in {} panicked", self.name))?
        })
    }

    /// `ip <args>` in the namespace.
    pub fn ip(&self, args: &str) -> Result<String> {
        let out = Command::new("ip")
            .arg("-n")
            .arg(&self.name)
            .args(args.split_whitespace())
            .output()?;
        check(&format!("[{}] ip {args}", self.name), out)
    }

    /// `sysctl -w key=value` in the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.run(&["sysctl", "-q", "-w", &format!("{key}={value}")])?;
        Ok(())
    }

    /// Sends `count` pings to `addr` (0.1 s apart, 2 s deadline each) and returns how many
    /// were answered.
    pub fn ping(&self, addr: &str, count: u32) -> Result<u32> {
        let (received, text) = self.ping_with(&[], addr, count)?;
        received.ok_or_else(|| anyhow!("[{}] ping {addr}: no summary in output: {text}", self.name))
    }

    /// `ping` with extra flags (e.g. `-M do -s 1452`): how many replies came back (None
    /// when ping printed no summary), and everything ping printed.
    /// Starts `count` pings 10 ms apart to `addr` (1 s wait each) in the background; its
    /// summary is in the output ([`ping_received`]).
    pub fn ping_every_10ms(&self, addr: &str, count: u32) -> Result<std::process::Child> {
        Ok(self
            .command("ping")
            .args([
                "-n",
                "-q",
                "-i",
                "0.01",
                "-c",
                &count.to_string(),
                "-W",
                "1",
                addr,
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()?)
    }

    /// Applies an nftables ruleset (`nft -f -`) in this namespace.
    pub fn nft(&self, rules: &str) -> Result<()> {
        use std::io::Write as _;
        let mut child = self
            .command("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .context("nft stdin")?
            .write_all(rules.as_bytes())?;
        if !child.wait()?.success() {
            bail!("nft -f - in {} refused:\n{rules}", self.name);
        }
        Ok(())
    }

    pub fn ping_with(
        &self,
        flags: &[&str],
        addr: &str,
        count: u32,
    ) -> Result<(Option<u32>, String)> {
        let count = count.to_string();
        let mut argv = vec!["ping", "-n", "-c", &count, "-i", "0.1", "-W", "2"];
        argv.extend_from_slice(flags);
        argv.push(addr);
        let out = self.output(&argv)?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // "5 packets transmitted, 5 received, 0% packet loss, time 402ms"
        let received = text
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .and_then(|l| l.split(',').nth(1))
            .and_then(|s| s.split_whitespace().next())
            .and_then(|n| n.parse().ok());
        Ok((received, text))
    }
}

/// The "N received" of a finished `ping`'s summary in `stdout`.
pub fn ping_received(stdout: &[u8]) -> Result<u32> {
    let text = String::from_utf8_lossy(stdout);
    text.split(',')
        .find_map(|part| part.trim().strip_suffix(" received")?.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no ping summary in {text}"))
}

fn check(what: &str, out: Output) -> Result<String> {
    if !out.status.success() {
        bail!(
            "{what}: {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A `tunnel-ctl` daemon running in a namespace; its output goes to a log file.
pub struct Daemon {
    pub instance: String,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// What the daemon has logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (e.g. `libc::SIGSTOP`).
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// SIGKILL (no clean shutdown: pins and files stay), and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then SIGKILL after 5 s; returns the exit status code (None when killed).
    pub fn stop(&mut self) -> Option<i32> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return status.code();
        }
        self.signal(libc::SIGCONT);
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        self.child.wait().ok().and_then(|s| s.code())
    }
}

/// Namespaces, veths, daemons and instances of one test or demo; all removed on drop.
pub struct Lab {
    id: String,
    dir: PathBuf,
    namespaces: Vec<Ns>,
    daemons: Vec<Daemon>,
    instances: Vec<String>,
    /// The tunnel-ctl daemons run from, when not [`tunnel_ctl_bin`].
    binary: Option<PathBuf>,
}

impl Lab {
    /// A new, empty lab. The first lab of a process also removes leftovers of killed runs.
    pub fn new() -> Result<Lab> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!("the namespace lab needs root (network namespaces, BPF)");
        }
        STALE_CLEANUP.call_once(|| remove_leftovers(|pid| !pid_alive(pid)));
        let pid = std::process::id();
        let id = format!("{PREFIX}-{pid}-{}", SEQ.fetch_add(1, Ordering::SeqCst));
        let dir = std::env::temp_dir().join(&id);
        fs::create_dir_all(&dir)?;
        Ok(Lab {
            id,
            dir,
            namespaces: Vec::new(),
            daemons: Vec::new(),
            instances: Vec::new(),
            binary: None,
        })
    }

    /// Daemons this lab starts from now on run the release build ([`tunnel_ctl_release_bin`]).
    pub fn use_release_build(&mut self) -> Result<()> {
        self.binary = Some(tunnel_ctl_release_bin()?);
        Ok(())
    }

    /// The lab's unique id (`tnl-<pid>-<seq>`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// A scratch directory removed with the lab.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Creates namespace `<id>-<role>` with loopback up.
    pub fn ns(&mut self, role: &str) -> Result<Ns> {
        let name = format!("{}-{role}", self.id);
        run_host(&["ip", "netns", "add", &name])?;
        let ns = Ns { name };
        self.namespaces.push(ns.clone());
        ns.ip("link set lo up")?;
        Ok(ns)
    }

    /// A veth pair `a_if` (in `a`) ⇄ `b_if` (in `b`), both up.
    pub fn veth(&mut self, a: &Ns, a_if: &str, b: &Ns, b_if: &str) -> Result<()> {
        a.ip(&format!(
            "link add {a_if} type veth peer name {b_if} netns {}",
            b.name
        ))?;
        a.ip(&format!("link set {a_if} up"))?;
        b.ip(&format!("link set {b_if} up"))?;
        Ok(())
    }

    /// A unique instance name `<id>-<role>`, whose pins and socket the lab removes on drop.
    pub fn instance(&mut self, role: &str) -> String {
        let name = format!("{}-{role}", self.id);
        self.instances.push(name.clone());
        name
    }

    /// Starts `tunnel-ctl <args> --instance <instance>` in `ns` and waits (bounded) until its
    /// management socket answers. Fails with the daemon's log if it exits first.
    pub fn spawn_daemon(&mut self, ns: &Ns, instance: &str, args: &[&str]) -> Result<&mut Daemon> {
        self.spawn(ns, instance, args, true)
    }

    /// As [`Lab::spawn_daemon`], but the daemon starts from a TOML file alone
    /// (`tunnel-ctl <subcommand> --config FILE`): `args`' flags, and the instance, become
    /// the file's keys (a repeated flag an array, a flag without a value `true`).
    pub fn spawn_daemon_from_config(
        &mut self,
        ns: &Ns,
        instance: &str,
        args: &[&str],
    ) -> Result<&mut Daemon> {
        let split = args
            .iter()
            .position(|a| a.starts_with("--"))
            .unwrap_or(args.len());
        let (path, flags) = args.split_at(split);
        let file = self.write_config(instance, flags)?.display().to_string();
        let mut argv: Vec<&str> = path.to_vec();
        argv.extend(["--config", &file]);
        self.spawn(ns, instance, &argv, false)
    }

    /// Writes (or rewrites, for a reload) the TOML file of `instance` with `flags` as keys,
    /// where [`Lab::spawn_daemon_from_config`] reads it from; returns its path.
    pub fn write_config(&self, instance: &str, flags: &[&str]) -> Result<PathBuf> {
        let mut text = format!("instance = {}\n", serde_json::json!(instance));
        text.push_str(&flags_as_toml(flags)?);
        let file = self.dir.join(format!("{instance}.toml"));
        fs::write(&file, text)?;
        Ok(file)
    }

    fn spawn(
        &mut self,
        ns: &Ns,
        instance: &str,
        args: &[&str],
        with_instance: bool,
    ) -> Result<&mut Daemon> {
        if !self.instances.iter().any(|i| i == instance) {
            self.instances.push(instance.to_owned());
        }
        // A restarted daemon gets its own log file next to its predecessor's.
        let runs = self
            .daemons
            .iter()
            .filter(|d| d.instance == instance)
            .count();
        let log = match runs {
            0 => self.dir.join(format!("{instance}.log")),
            n => self.dir.join(format!("{instance}.{n}.log")),
        };
        let log_file = fs::File::create(&log)?;
        let bin = match &self.binary {
            Some(b) => b.clone(),
            None => tunnel_ctl_bin()?,
        };
        let mut cmd = ns.command(bin);
        cmd.args(args);
        if with_instance {
            cmd.args(["--instance", instance]);
        }
        // Daemons log at info unless the test asks for more with -v/-vv (which RUST_LOG
        // would override) or the test run sets RUST_LOG.
        let verbose = args
            .iter()
            .any(|a| a.len() > 1 && a.starts_with('-') && a[1..].chars().all(|c| c == 'v'));
        match std::env::var("RUST_LOG") {
            Ok(filter) => cmd.env("RUST_LOG", filter),
            Err(_) if verbose => cmd.env_remove("RUST_LOG"),
            Err(_) => cmd.env("RUST_LOG", "info"),
        };
        cmd.stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        // If the test process dies, its daemons get SIGTERM (clean shutdown, pins removed).
        // SAFETY: prctl is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd.spawn().context("spawning tunnel-ctl")?;
        self.daemons.push(Daemon {
            instance: instance.to_owned(),
            child,
            log,
        });
        let daemon = self.daemons.last_mut().expect("just pushed");
        let socket = Path::new(RUN_DIR).join(format!("{instance}.sock"));
        let deadline = Instant::now() + DAEMON_START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = daemon.child.try_wait() {
                bail!(
                    "tunnel-ctl {} exited ({status}) before serving {}:\n{}",
                    args.join(" "),
                    socket.display(),
                    daemon.log()
                );
            }
            if UnixStream::connect(&socket).is_ok() {
                return Ok(daemon);
            }
            if Instant::now() > deadline {
                bail!(
                    "tunnel-ctl {} did not open {} within {:?}:\n{}",
                    args.join(" "),
                    socket.display(),
                    DAEMON_START_TIMEOUT,
                    daemon.log()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The pid of the latest daemon of `instance`.
    pub fn spawn_daemon_pid(&self, instance: &str) -> Option<u32> {
        self.daemons
            .iter()
            .rev()
            .find(|d| d.instance == instance)
            .map(Daemon::pid)
    }

    /// The latest daemon started for `instance`.
    pub fn daemon(&mut self, instance: &str) -> Option<&mut Daemon> {
        self.daemons
            .iter_mut()
            .rev()
            .find(|d| d.instance == instance)
    }

    /// What the latest daemon of `instance` has logged so far.
    pub fn daemon_log(&self, instance: &str) -> Option<String> {
        self.daemons
            .iter()
            .rev()
            .find(|d| d.instance == instance)
            .map(Daemon::log)
    }

    /// Runs a management command (`tunnel-ctl <args>`), which needs no namespace: the socket
    /// is a path. Returns stdout; fails with stderr on a non-zero exit.
    pub fn ctl(&self, args: &[&str]) -> Result<String> {
        let out = self.ctl_output(args)?;
        check(&format!("tunnel-ctl {}", args.join(" ")), out)
    }

    /// Like [`Lab::ctl`] but returns the whole output whatever the exit status.
    pub fn ctl_output(&self, args: &[&str]) -> Result<Output> {
        Ok(Command::new(tunnel_ctl_bin()?).args(args).output()?)
    }

    /// Sends `requests` (management protocol JSON, SPEC §8) one after another to
    /// `instance`'s socket, a connection each (the daemon bounds what one connection may
    /// send), each answered before the next goes; fails on the first error answer. Returns
    /// how many were answered ok.
    pub fn ctl_batch(
        &self,
        instance: &str,
        requests: impl IntoIterator<Item = serde_json::Value>,
    ) -> Result<u32> {
        use std::io::{BufRead as _, Write as _};
        let path = format!("/run/tunnel/{instance}.sock");
        let mut ok = 0;
        for request in requests {
            let mut stream = std::os::unix::net::UnixStream::connect(&path)
                .with_context(|| format!("connecting to {path}"))?;
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            // One write: the daemon reads the line as it comes.
            stream.write_all(format!("{request}\n").as_bytes())?;
            let mut answer = String::new();
            std::io::BufReader::new(stream).read_line(&mut answer)?;
            let answer: serde_json::Value = serde_json::from_str(&answer)
                .with_context(|| format!("answer to {request}: {answer:?}"))?;
            if answer.get("ok").is_none() {
                bail!("{request} was answered {answer}");
            }
            ok += 1;
        }
        Ok(ok)
    }

    /// `tunnel-ctl <cmd> --json --instance <instance>`, parsed.
    pub fn ctl_json(&self, cmd: &str, instance: &str) -> Result<serde_json::Value> {
        let out = self.ctl(&[cmd, "--json", "--instance", instance])?;
        serde_json::from_str(&out).with_context(|| format!("{cmd} --json printed {out:?}"))
    }

    /// Stops every daemon (SIGTERM, then SIGKILL), deletes the namespaces, removes pins and
    /// sockets. Called by drop; safe to call twice.
    pub fn teardown(&mut self) {
        for daemon in &mut self.daemons {
            daemon.stop();
        }
        self.daemons.clear();
        for ns in self.namespaces.drain(..) {
            let _ = run_host(&["ip", "netns", "del", &ns.name]);
        }
        for instance in self.instances.drain(..) {
            remove_instance_files(&instance);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown();
    }
}

fn run_host(argv: &[&str]) -> Result<String> {
    let out = Command::new(argv[0]).args(&argv[1..]).output()?;
    check(&argv.join(" "), out)
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The pid in a `tnl-<pid>-...` name.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?.strip_prefix('-')?;
    rest.split('-').next()?.parse().ok()
}

fn remove_instance_files(instance: &str) {
    let pins = Path::new(PIN_ROOT).join(instance);
    if let Ok(entries) = fs::read_dir(&pins) {
        for entry in entries.flatten() {
            let _ = fs::remove_file(entry.path());
        }
        let _ = fs::remove_dir(&pins);
    }
    let _ = fs::remove_dir(PIN_ROOT); // only if empty
    let _ = fs::remove_file(Path::new(RUN_DIR).join(format!("{instance}.sock")));
}

/// Removes namespaces, pins, sockets and daemons named `tnl-<pid>-...` for every pid that
/// `owned` accepts. Used at start for dead pids, and by the demo's Ctrl-C handler for its own.
pub fn remove_leftovers(owned: impl Fn(u32) -> bool) {
    // Daemons first: they hold namespaces and pins.
    if let Ok(procs) = fs::read_dir("/proc") {
        for entry in procs.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let args: Vec<String> = cmdline
                .split(|&b| b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let is_ours = args.iter().any(|a| a.ends_with("tunnel-ctl"))
                && args
                    .windows(2)
                    .any(|w| w[0] == "--instance" && owner_pid(&w[1]).is_some_and(&owned));
            if is_ours && pid as u32 != std::process::id() {
                // SAFETY: kill(2) on a pid we just identified as a leftover daemon.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
    }
    for dir in [NETNS_DIR, PIN_ROOT, RUN_DIR] {
        let Ok(entries) = fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !owner_pid(&name).is_some_and(&owned) {
                continue;
            }
            match dir {
                NETNS_DIR => {
                    let _ = run_host(&["ip", "netns", "del", &name]);
                }
                PIN_ROOT => remove_instance_files(&name),
                _ => {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
    }
}

/// Removes everything this process's labs made; for Ctrl-C handlers (drop does not run there).
pub fn remove_own_leftovers() {
    let me = std::process::id();
    remove_leftovers(|pid| pid == me);
}

/// Lets this process hold a few thousand sockets (the soft limit may be 1,024).
pub fn raise_nofile(want: u64) -> Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get/setrlimit with a pointer to a local.
    unsafe {
        ensure!(
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0,
            "getrlimit"
        );
        if lim.rlim_cur < want {
            lim.rlim_cur = want.min(lim.rlim_max);
            ensure!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0, "setrlimit");
        }
    }
    ensure!(
        lim.rlim_cur >= want,
        "open-files limit {} < {want}",
        lim.rlim_cur
    );
    Ok(())
}

/// Command-line flags as TOML keys: `--key value` → `key = "value"`, a flag repeated → an
/// array, a flag without a value → `true` (written here, not with the code under test).
pub fn flags_as_toml(flags: &[&str]) -> Result<String> {
    let mut keys: Vec<(String, Vec<String>)> = Vec::new();
    let mut i = 0;
    while i < flags.len() {
        let key = flags[i]
            .strip_prefix("--")
            .ok_or_else(|| anyhow!("{:?} is not a long flag", flags[i]))?;
        let value = flags.get(i + 1).filter(|v| !v.starts_with("--"));
        i += if value.is_some() { 2 } else { 1 };
        let value = value.map_or("true".to_owned(), |v| v.to_string());
        match keys.iter_mut().find(|(k, _)| k == key) {
            Some((_, values)) => values.push(value),
            None => keys.push((key.to_owned(), vec![value])),
        }
    }
    let mut text = String::new();
    for (key, values) in keys {
        let quoted: Vec<String> = values
            .iter()
            .map(|v| {
                if v == "true" {
                    v.clone()
                } else {
                    serde_json::json!(v).to_string()
                }
            })
            .collect();
        match quoted.as_slice() {
            [one] => text.push_str(&format!("{key} = {one}\n")),
            many => text.push_str(&format!("{key} = [{}]\n", many.join(", "))),
        }
    }
    Ok(text)
}

/// Whether the long forms of the endurance tests run (`cargo xtask test --long`, which sets
/// `TUNNEL_LONG=1`); CI runs the short forms.
pub fn long_runs() -> bool {
    std::env::var_os("TUNNEL_LONG").is_some_and(|v| !v.is_empty() && v != "0")
}

/// Waits until `check` returns `Ok(Some(value))`, polling every 50 ms for at most `limit`.
/// The last error or "still waiting" becomes the failure message.
pub fn wait_for<T>(
    what: &str,
    limit: Duration,
    mut check: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        let last = match check() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => "condition not met".to_owned(),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() > deadline {
            bail!("timed out after {limit:?} waiting for {what}: {last}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits (at most `limit`) until each counter in `want` of what `read` returns has risen
/// from `before` by exactly its number; returns the last reading.
pub fn wait_counter_deltas(
    what: &str,
    limit: Duration,
    before: &serde_json::Value,
    want: &[(&str, u64)],
    mut read: impl FnMut() -> Result<serde_json::Value>,
) -> Result<serde_json::Value> {
    wait_for(what, limit, || {
        let now = read()?;
        Ok(want
            .iter()
            .all(|(name, n)| counter(&now, name) - counter(before, name) == *n)
            .then_some(now))
    })
}

/// The values of counters `names` of one protocol (`Ip`, `Tcp`, `Udp`, ...) in /proc/net/snmp
/// of `ns` (the file is per namespace), in the order asked, read at one instant. A name the
/// kernel does not list is an error, not a zero: a test asserting "none" must not pass on a
/// counter that is not there.
pub fn snmp(ns: &Ns, proto: &str, names: &[&str]) -> Result<Vec<u64>> {
    proc_net_counters(ns, "/proc/net/snmp", proto, names)
}

/// As [`snmp`], from /proc/net/netstat (`TcpExt`, `IpExt`, ...: the kernel's extended
/// counters, what `nstat` shows after the `snmp` ones).
pub fn netstat(ns: &Ns, proto: &str, names: &[&str]) -> Result<Vec<u64>> {
    proc_net_counters(ns, "/proc/net/netstat", proto, names)
}

/// Counters `names` of `proto` in `file`, one of the /proc/net files that list each
/// protocol as a line of names followed by a line of values.
fn proc_net_counters(ns: &Ns, file: &str, proto: &str, names: &[&str]) -> Result<Vec<u64>> {
    let text = ns.run(&["cat", file])?;
    let mut lines = text.lines().filter(|l| l.starts_with(&format!("{proto}:")));
    let (Some(header), Some(values)) = (lines.next(), lines.next()) else {
        bail!("no {proto} lines in {file} of {}", ns.name);
    };
    let row: Vec<(&str, &str)> = header
        .split_whitespace()
        .skip(1)
        .zip(values.split_whitespace().skip(1))
        .collect();
    names
        .iter()
        .map(|&name| {
            row.iter()
                .find(|(n, _)| *n == name)
                .and_then(|(_, v)| v.parse().ok())
                .ok_or_else(|| anyhow!("no {proto} {name} in {file} of {}", ns.name))
        })
        .collect()
}

/// The sum of counters `names` of `proto` in /proc/net/snmp of `ns` (see [`snmp`]).
pub fn snmp_sum(ns: &Ns, proto: &str, names: &[&str]) -> Result<u64> {
    Ok(snmp(ns, proto, names)?.into_iter().sum())
}

/// An integer counter from a `stats --json` object; panics with the object if it is missing.
pub fn counter(stats: &serde_json::Value, name: &str) -> u64 {
    stats[name]
        .as_u64()
        .unwrap_or_else(|| panic!("stats has no integer {name}: {stats}"))
}

/// A `struct xdp_md` for BPF_PROG_TEST_RUN's ctx_in: no metadata, the whole `len`-byte packet,
/// received on `ifindex` (which must exist in the calling thread's namespace).
pub fn xdp_test_ctx(ifindex: u32, len: usize) -> Vec<u8> {
    // data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex
    [0, len as u32, 0, ifindex, 0, 0]
        .iter()
        .flat_map(|w| w.to_ne_bytes())
        .collect()
}

pub mod cluster;
pub mod craft;
pub mod fourover6;
pub mod ipv6;
pub mod loadgen;
pub mod lwaftr;
pub mod mape;
pub mod measure;
pub mod postgres;
pub mod transfer;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_parses_only_our_prefix() {
        assert_eq!(owner_pid("tnl-123-4-client"), Some(123));
        assert_eq!(owner_pid("tnl-123"), Some(123));
        assert_eq!(owner_pid("tnlx-123-4"), None);
        assert_eq!(owner_pid("other-123-4"), None);
        assert_eq!(owner_pid("tnl-abc-4"), None);
    }
}
