//! Throughput on the test topologies, baseline and candidates back to back in every round.
//!
//! 4over6: one client namespace runs the native client and also has a plain IPv4 route to a
//! second address of the internet host (192.0.2.3) over the same veths, core router and
//! server (plain forwarding: the baseline); a second client namespace runs an in-band client.
//! MAP-E: the LAN host reaches 192.0.2.2 through CE + BR, and 192.0.2.3 by plain routing over
//! the same CE–BR veth with nftables masquerade on the CE (what a seed-003 user runs, minus
//! the kernel tunnel this machine does not have).
use std::process::{Child, Stdio};

use anyhow::{Context as _, Result, anyhow, bail};
use serde_json::Value;
use tunnel_tests::{
    Lab, Ns, counter,
    fourover6::FourOverSix,
    mape::{MapeLab, RULE_252},
    netstat, snmp, snmp_sum, wait_for,
};

use crate::{
    Plan,
    report::{Report, Target, ratio},
};

/// The internet host's second address, reached without any tunnel.
const PLAIN_DST: &str = "192.0.2.3";
const TUNNEL_DST: &str = "192.0.2.2";
/// A third address of the internet host, reached by plain routing with the tunnel's inner
/// MTU on the client's route (the same MSS as the tunnel's TCP): information beside the
/// targets, which stay against plain routing at the link's MTU.
const PLAIN_AT_TUNNEL_MTU_DST: &str = "192.0.2.4";
/// In-band clients in the all-at-once run.
const INBAND_CLIENTS: usize = 8;

/// A background process killed on drop.
struct Bg(Child);

impl Drop for Bg {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// iperf3 server in `ns` on port 5201, waited for until it listens.
fn iperf_server(ns: &Ns) -> Result<Bg> {
    iperf_server_on(ns, 5201)
}

/// iperf3 server in `ns` on `port` (one serves one test at a time).
fn iperf_server_on(ns: &Ns, port: u16) -> Result<Bg> {
    let port_s = port.to_string();
    let child = ns
        .command("iperf3")
        .args(["-s", "-p", &port_s])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting iperf3 -s")?;
    let bg = Bg(child);
    wait_for(
        "iperf3 to listen",
        std::time::Duration::from_secs(10),
        || {
            Ok(ns
                .run(&["ss", "-Hltn", &format!("sport = :{port}")])?
                .contains(&port_s)
                .then_some(()))
        },
    )?;
    Ok(bg)
}

/// Runs iperf3 in `ns` toward `dst` with `extra` flags; returns its JSON `end` object.
fn iperf(ns: &Ns, dst: &str, seconds: u32, extra: &[&str]) -> Result<Value> {
    iperf_on(ns, dst, 5201, seconds, extra)
}

/// As [`iperf`], to the server on `port`.
fn iperf_on(ns: &Ns, dst: &str, port: u16, seconds: u32, extra: &[&str]) -> Result<Value> {
    let port = port.to_string();
    let secs = seconds.to_string();
    let limit = (seconds + 20).to_string();
    let mut argv = vec![
        "timeout",
        &limit,
        "iperf3",
        "-c",
        dst,
        "-p",
        &port,
        "-t",
        &secs,
        "-J",
        "--connect-timeout",
        "5000",
    ];
    argv.extend_from_slice(extra);
    let started = std::time::Instant::now();
    let out = ns.output(&argv)?;
    let v: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 {argv:?} printed no JSON"))?;
    if let Some(e) = v["error"].as_str() {
        bail!(
            "iperf3 to {dst} port {port} {extra:?} from {}: {e} (after {:.1} s)",
            ns.name,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(v["end"].clone())
}

/// Copies the daemons' logs of `lab` (removed with it) to `<failed>/<lab id>/` (by default
/// `target/bench/failed/`, under `--out`), with each daemon's `stats --json` as it stands
/// now, and says where in `error`: a failed run is otherwise gone with its lab.
fn keep_daemon_logs(lab: &Lab, failed: &std::path::Path, error: anyhow::Error) -> anyhow::Error {
    let to = failed.join(lab.id());
    let copied = (|| -> Result<usize> {
        std::fs::create_dir_all(&to)?;
        let mut n = 0;
        for entry in std::fs::read_dir(lab.dir())? {
            let path = entry?.path();
            if path.extension().is_none_or(|e| e != "log") {
                continue;
            }
            std::fs::copy(&path, to.join(path.file_name().unwrap_or_default()))?;
            n += 1;
            // The log is named after its instance (a restarted daemon's as `<instance>.<n>`).
            let Some(instance) = path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.split('.').next())
            else {
                continue;
            };
            let stats = lab
                .ctl_json("stats", instance)
                .map_or_else(|e| format!("{e:#}"), |v| format!("{v:#}"));
            std::fs::write(to.join(format!("{instance}.stats.json")), stats)?;
        }
        Ok(n)
    })();
    match copied {
        Ok(n) => error.context(format!("{n} daemon logs kept in {}", to.display())),
        Err(e) => error.context(format!("the daemon logs could not be kept: {e:#}")),
    }
}

/// One kind of run from a namespace to a destination for some seconds: its figure.
type Measure = fn(&Ns, &str, u32) -> Result<f64>;

/// Single-stream TCP, Gbit/s received.
fn tcp_gbps(ns: &Ns, dst: &str, seconds: u32) -> Result<f64> {
    let end = iperf(ns, dst, seconds, &[])?;
    received_gbps(&end)
}

/// Single-stream TCP from `dst` to `ns` (iperf3 -R: the far end sends), Gbit/s received.
fn tcp_down_gbps(ns: &Ns, dst: &str, seconds: u32) -> Result<f64> {
    let end = iperf(ns, dst, seconds, &["-R"])?;
    received_gbps(&end)
}

fn received_gbps(end: &Value) -> Result<f64> {
    end["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .ok_or_else(|| anyhow!("no sum_received in {end}"))
}

/// One TCP stream from each of `senders` at once, each its own iperf3 process (to its own
/// iperf3 server, ports from 5202 on) with `extra` flags, Gbit/s received by all of them
/// together. A namespace may be given more than once.
fn tcp_each_gbps<'a>(
    senders: impl IntoIterator<Item = &'a Ns>,
    dst: &str,
    seconds: u32,
    extra: &[&str],
) -> Result<f64> {
    std::thread::scope(|scope| {
        let runs: Vec<_> = senders
            .into_iter()
            .enumerate()
            .map(|(i, ns)| {
                scope.spawn(move || {
                    let end = iperf_on(ns, dst, 5202 + i as u16, seconds, extra)?;
                    received_gbps(&end)
                })
            })
            .collect();
        runs.into_iter()
            .map(|r| r.join().map_err(|_| anyhow!("an iperf3 thread panicked"))?)
            .sum()
    })
}

/// One TCP stream from each of `clients` at once, Gbit/s received by all of them together.
fn tcp_clients_gbps(clients: &[Ns], dst: &str, seconds: u32) -> Result<f64> {
    tcp_each_gbps(clients, dst, seconds, &[])
}

/// The streams of the multi-stream runs. Each is its own iperf3 process: iperf3 3.12 (this
/// Debian's) sends all the streams of one `-P` run from one thread, and where the scheduler
/// put that thread and its receiver decided the result (plain routing alone measured 14 to 35
/// Gbit/s from one run to the next); iperf3 3.16 and later give each stream its own thread.
const STREAMS: usize = 8;

/// [`STREAMS`] parallel TCP streams from `ns`, one iperf3 process each, Gbit/s received by
/// all of them together.
fn tcp_streams_gbps(ns: &Ns, dst: &str, seconds: u32) -> Result<f64> {
    tcp_streams_cc_gbps(ns, dst, seconds, None)
}

/// [`tcp_streams_gbps`] with the senders' congestion control `cc` (iperf3 -C) instead of the
/// machine's default.
fn tcp_streams_cc_gbps(ns: &Ns, dst: &str, seconds: u32, cc: Option<&str>) -> Result<f64> {
    let extra: Vec<&str> = cc.iter().flat_map(|cc| ["-C", *cc]).collect();
    tcp_each_gbps(std::iter::repeat_n(ns, STREAMS), dst, seconds, &extra)
}

/// [`STREAMS`] TCP streams from one iperf3 process (`-P`, one sending thread in iperf3 3.12):
/// information beside the multi-stream target.
fn tcp_one_process_streams_gbps(ns: &Ns, dst: &str, seconds: u32) -> Result<f64> {
    let streams = STREAMS.to_string();
    let end = iperf(ns, dst, seconds, &["-P", &streams])?;
    received_gbps(&end)
}

/// The machine's busy CPU time so far, in CPU-seconds (`/proc/stat`: user, nice, system, irq,
/// softirq and steal of all CPUs).
fn machine_busy_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let cpu = stat
        .lines()
        .find_map(|l| l.strip_prefix("cpu "))
        .ok_or_else(|| anyhow!("no cpu line in /proc/stat"))?;
    let f: Vec<u64> = cpu
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .context("reading /proc/stat")?;
    let [user, nice, system, _idle, _iowait, irq, softirq, steal, ..] = f[..] else {
        bail!("short cpu line in /proc/stat: {cpu}");
    };
    Ok((user + nice + system + irq + softirq + steal) as f64 / crate::clock_ticks_per_second())
}

/// Runs `measure` (a TCP run of `seconds`, Gbit/s) and returns its figure and the machine's
/// busy CPU time per Gbit it moved, in CPU-milliseconds, whatever its throughput in that
/// round. The whole machine counts (the lab's namespaces, both iperf3 ends and their
/// wake-ups); nothing else runs during the bench.
fn with_cpu_per_gbit(seconds: u32, measure: impl FnOnce() -> Result<f64>) -> Result<(f64, f64)> {
    let before = machine_busy_seconds()?;
    let gbps = measure()?;
    let busy = machine_busy_seconds()? - before;
    let gbit = gbps * f64::from(seconds);
    if gbit <= 0.0 {
        bail!("the run moved nothing ({gbps} Gbit/s)");
    }
    Ok((gbps, 1000.0 * busy / gbit))
}

/// The congestion control of the information rows that leave BBR's pacing out: CUBIC, when
/// the kernel offers it.
const UNPACED_CC: &str = "cubic";

fn cc_available(cc: &str) -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control")
        .is_ok_and(|list| list.split_whitespace().any(|c| c == cc))
}

/// Port of the request/response echo server in the internet namespace.
const RR_PORT: u16 = 5301;

/// A TCP echo server for request/response runs: every connection gets a thread that sends
/// back each byte it reads, until the peer closes. The first byte names the CPU the thread
/// is to run on (see [`tcp_rr_ktps`]); the thread moves there before it echoes that byte,
/// and closes the connection if it cannot. The listener is made in `ns` (a socket stays in
/// the namespace it was made in); the threads run for the rest of the bench.
fn rr_server(ns: &Ns) -> Result<()> {
    use std::io::{Read as _, Write as _};
    let listener = ns.enter(|| std::net::TcpListener::bind(("0.0.0.0", RR_PORT)))??;
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let _ = conn.set_nodelay(true);
                let mut byte = [0u8; 1];
                if conn.read_exact(&mut byte).is_err()
                    || pin_this_thread(usize::from(byte[0])).is_err()
                {
                    return;
                }
                while conn.write_all(&byte).is_ok() && conn.read_exact(&mut byte).is_ok() {}
            });
        }
    });
    Ok(())
}

/// Where the two ends of a request/response run execute.
#[derive(Clone, Copy)]
struct RrCpus {
    client: u8,
    server: u8,
}

/// Both ends on CPU 0: every hop of the path then runs on that CPU too (each packet is
/// carried through the namespaces inside its sender's system call), so a transaction costs
/// the two ends plus the path and nothing else. Unpinned, the scheduler put the two ends
/// together at some times and apart at others, and a transaction apart costs about ten times
/// as much (two cross-CPU wake-ups of a halted virtual CPU), so the ratio depended on where
/// the threads landed in each run.
const RR_ONE_CPU: RrCpus = RrCpus {
    client: 0,
    server: 0,
};

/// The ends on CPUs 0 and 1, as two hosts would be (information: the cross-CPU wake-ups
/// dominate).
const RR_TWO_CPUS: RrCpus = RrCpus {
    client: 0,
    server: 1,
};

/// Restricts the calling thread to `cpu`.
fn pin_this_thread(cpu: usize) -> Result<()> {
    use nix::{sched::CpuSet, unistd::Pid};
    let mut set = CpuSet::new();
    set.set(cpu)
        .and_then(|()| nix::sched::sched_setaffinity(Pid::from_raw(0), &set))
        .with_context(|| format!("running a thread on CPU {cpu} (sched_setaffinity)"))
}

/// Whether this process may run on `cpu` (its affinity mask, as `taskset` or a cpuset set it).
fn cpu_usable(cpu: usize) -> bool {
    nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))
        .and_then(|set| set.is_set(cpu))
        .unwrap_or(false)
}

/// TCP request/response with 1-byte messages, one at a time over one connection (what
/// netperf calls TCP_RR), the ends on `cpus`: thousands of transactions per second for
/// `seconds`.
fn tcp_rr_ktps(ns: &Ns, dst: &str, seconds: u32, cpus: RrCpus) -> Result<f64> {
    use std::io::{Read as _, Write as _};
    let addr: std::net::SocketAddr = format!("{dst}:{RR_PORT}").parse()?;
    let mut conn = ns.enter(|| {
        std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))
    })??;
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
    // A thread of its own: the pinning must not reach the bench's other children.
    std::thread::scope(|scope| {
        scope
            .spawn(|| -> Result<f64> {
                pin_this_thread(usize::from(cpus.client))?;
                let mut byte = [cpus.server; 1];
                conn.write_all(&byte)
                    .and_then(|()| conn.read_exact(&mut byte))
                    .with_context(|| {
                        format!(
                            "request/response to {dst}: the echo server did not start on CPU {} \
                             (it closes the connection when it cannot run there)",
                            cpus.server
                        )
                    })?;
                let started = std::time::Instant::now();
                let limit = std::time::Duration::from_secs(u64::from(seconds));
                let mut done = 0u64;
                while started.elapsed() < limit {
                    conn.write_all(&byte)
                        .and_then(|()| conn.read_exact(&mut byte))
                        .with_context(|| {
                            format!("request/response to {dst} after {done} transactions")
                        })?;
                    done += 1;
                }
                Ok(done as f64 / started.elapsed().as_secs_f64() / 1e3)
            })
            .join()
            .map_err(|_| anyhow!("the request/response thread panicked"))?
    })
}

/// Transmits seen by the `net:net_dev_start_xmit` tracepoint on one device during a run.
struct Xmits {
    device: &'static str,
    per_s: f64,
    /// Share of them that were GSO packets of more than one segment.
    gso_share: f64,
    /// Share of them longer than one Ethernet MTU (a GSO packet, or one that was not split).
    big_share: f64,
}

/// One eBPF program's work during a run, from the kernel's run-time statistics.
struct ProgRun {
    /// The kernel's name for it (15 bytes at most).
    name: String,
    runs: u64,
    /// Their total time.
    ns: u128,
}

/// What a counted TCP run along the 4over6 path saw.
struct PathRun {
    gbps: f64,
    xmits: Vec<Xmits>,
    /// Times per second TCP armed a socket's pacing timer (`tcp_pace_kick`): a sender that
    /// was ahead of its pacing rate and had to wait. Without the fq qdisc (not in this
    /// kernel) TCP paces itself with one high-resolution timer per wait.
    pacing_per_s: f64,
    /// The eBPF programs that ran meanwhile (all of the machine's, ours are the only ones).
    programs: Vec<ProgRun>,
    /// What TCP itself counted at both ends meanwhile.
    tcp: TcpEvents,
    /// How long the run took.
    secs: f64,
}

/// TCP's own counters of a run, at the sender and at the receiver (all sockets of each
/// namespace; the iperf3 flows are the only busy ones): a path that loses or reorders
/// packets shows here before it shows in Gbit/s. The two CPUs forward in parallel, so some
/// reordering is the lab's own, on every path.
#[derive(Clone, Copy)]
struct TcpEvents {
    /// Segments the senders retransmitted (`Tcp RetransSegs`).
    retransmitted: u64,
    /// Times the senders learned from SACKs that segments had been reordered
    /// (`TcpExt TCPSACKReorder`).
    reordered: u64,
    /// Segments the receivers queued out of order (`TcpExt TCPOFOQueue`).
    out_of_order: u64,
}

impl TcpEvents {
    fn read(sender: &Ns, receiver: &Ns) -> Result<Self> {
        // One value per name asked, or an error.
        Ok(Self {
            retransmitted: snmp(sender, "Tcp", &["RetransSegs"])?[0],
            reordered: netstat(sender, "TcpExt", &["TCPSACKReorder"])?[0],
            out_of_order: netstat(receiver, "TcpExt", &["TCPOFOQueue"])?[0],
        })
    }

    fn since(self, before: Self) -> Self {
        Self {
            retransmitted: self.retransmitted.saturating_sub(before.retransmitted),
            reordered: self.reordered.saturating_sub(before.reordered),
            out_of_order: self.out_of_order.saturating_sub(before.out_of_order),
        }
    }
}

/// Runs `measure` (a TCP run, Gbit/s) while `perf stat` counts, per device in `devices`, the
/// transmits and those with more than one GSO segment (tracepoint filters, so nothing is
/// copied to user space), and the senders' pacing waits; the kernel's BPF run-time statistics
/// are on meanwhile, and TCP's own counters are read in `sender`'s and `receiver`'s namespaces
/// before and after. Device names are matched in every namespace: the lab's are unique along
/// the path.
fn path_run(
    devices: &[&'static str],
    (sender, receiver): (&Ns, &Ns),
    measure: impl FnOnce() -> Result<f64>,
) -> Result<PathRun> {
    let mut events = vec![];
    for dev in devices {
        events.push(("net:net_dev_start_xmit", format!("name == \"{dev}\"")));
        events.push((
            "net:net_dev_start_xmit",
            format!("name == \"{dev}\" && gso_segs > 1"),
        ));
        // perf stat counts events, it does not sum a field: how many transmits are longer
        // than one MTU stands in for their size.
        events.push((
            "net:net_dev_start_xmit",
            format!("name == \"{dev}\" && len > 1514"),
        ));
    }
    let (pace_kick, _) = kernel_function("tcp_pace_kick")?;
    events.push(("timer:hrtimer_start", format!("function == {pace_kick:#x}")));
    let before = TcpEvents::read(sender, receiver)?;
    let ((gbps, programs), counts, secs) = counted_during(&events, || programs_during(measure))?;
    let tcp = TcpEvents::read(sender, receiver)?.since(before);
    let (per_device, pacing) = counts.split_at(3 * devices.len());
    Ok(PathRun {
        gbps,
        xmits: devices
            .iter()
            .zip(per_device.chunks(3))
            .map(|(&device, c)| Xmits {
                device,
                per_s: c[0] / secs,
                gso_share: if c[0] > 0.0 { c[1] / c[0] } else { 0.0 },
                big_share: if c[0] > 0.0 { c[2] / c[0] } else { 0.0 },
            })
            .collect(),
        pacing_per_s: pacing[0] / secs,
        programs,
        tcp,
        secs,
    })
}

/// Runs `measure` with the kernel's BPF run-time statistics on (`BPF_ENABLE_STATS`, held for
/// the run: each program run then also reads the clock twice) and returns, for every loaded
/// program name that ran meanwhile, its runs and their total time.
fn programs_during<T>(measure: impl FnOnce() -> Result<T>) -> Result<(T, Vec<ProgRun>)> {
    use std::collections::{BTreeMap, HashMap};
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("turning on BPF run-time statistics (BPF_ENABLE_STATS)")?;
    let snapshot = || -> Result<HashMap<u32, (String, u64, u128)>> {
        aya::programs::loaded_programs()
            .map(|p| {
                let p = p.context("listing loaded BPF programs")?;
                let name = p.name_as_str().unwrap_or("(no name)").to_string();
                Ok((p.id(), (name, p.run_count(), p.run_time().as_nanos())))
            })
            .collect()
    };
    let before = snapshot()?;
    let value = measure()?;
    // Summed by name: every lab role loads its own copy, and each namespace's programs are
    // separate ones.
    let mut by_name: BTreeMap<String, (u64, u128)> = BTreeMap::new();
    for (id, (name, count, ns)) in snapshot()? {
        let (count0, ns0) = before.get(&id).map_or((0, 0), |b| (b.1, b.2));
        let sum = by_name.entry(name).or_default();
        sum.0 += count.saturating_sub(count0);
        sum.1 += ns.saturating_sub(ns0);
    }
    let runs: Vec<ProgRun> = by_name
        .into_iter()
        .filter(|(_, (n, _))| *n > 0)
        .map(|(name, (runs, ns))| ProgRun { name, runs, ns })
        .collect();
    Ok((value, runs))
}

/// Runs `measure` while `perf stat -a` counts each (tracepoint, filter) of `events`; returns
/// what `measure` returned, the counts in the order of `events` and the seconds `measure`
/// took.
fn counted_during<T>(
    events: &[(&str, String)],
    measure: impl FnOnce() -> Result<T>,
) -> Result<(T, Vec<f64>, f64)> {
    if !std::path::Path::new("/sys/kernel/tracing/events/net").exists() {
        let _ = std::process::Command::new("mount")
            .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
            .status();
    }
    let mut argv: Vec<String> = vec!["stat".into(), "-x,".into(), "-a".into()];
    for (event, filter) in events {
        argv.extend([
            "-e".into(),
            (*event).into(),
            "--filter".into(),
            filter.clone(),
        ]);
    }
    let out_path =
        std::env::temp_dir().join(format!("tunnel-bench-counts-{}.csv", std::process::id()));
    argv.extend(["-o".into(), out_path.display().to_string()]);
    let perf = std::process::Command::new("perf")
        .args(&argv)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting perf stat (Debian: linux-perf)")?;
    let mut perf = Bg(perf);
    // perf opens its events on every CPU before counting; what it misses of the first
    // milliseconds does not change a rate over seconds.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let started = std::time::Instant::now();
    let result = measure();
    let secs = started.elapsed().as_secs_f64();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(perf.0.id() as i32, libc::SIGINT) };
    let status = perf.0.wait()?;
    let value = result?;
    let text = std::fs::read_to_string(&out_path).unwrap_or_default();
    let _ = std::fs::remove_file(&out_path);
    let counts: Vec<f64> = text
        .lines()
        .filter(|l| events.iter().any(|(event, _)| l.contains(event)))
        .filter_map(|l| l.split(',').next()?.trim().parse().ok())
        .collect();
    if counts.len() != events.len() {
        bail!(
            "perf stat ({status}) gave {} counts for {} events:\n{text}",
            counts.len(),
            events.len()
        );
    }
    Ok((value, counts, secs))
}

/// The tracepoint filter that matches allocations made on behalf of `pskb_expand_head` (a
/// packet's head copied into a bigger buffer): `kmem:kmalloc`'s call site lies inside that
/// function.
fn head_realloc_filter() -> Result<String> {
    let (lo, hi) = kernel_function("pskb_expand_head")?;
    Ok(format!("call_site >= {lo:#x} && call_site < {hi:#x}"))
}

/// Where kernel function `name` starts and where the next one does, from /proc/kallsyms (root
/// sees real addresses).
fn kernel_function(name: &str) -> Result<(u64, u64)> {
    let syms = std::fs::read_to_string("/proc/kallsyms").context("/proc/kallsyms")?;
    let mut addrs: Vec<(u64, &str)> = syms
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let addr = u64::from_str_radix(f.next()?, 16).ok()?;
            let kind = f.next()?;
            let name = f.next()?;
            (kind.eq_ignore_ascii_case("t") && f.next().is_none()).then_some((addr, name))
        })
        .collect();
    addrs.sort_unstable();
    let at = addrs
        .iter()
        .position(|&(_, n)| n == name)
        .ok_or_else(|| anyhow!("no {name} in /proc/kallsyms"))?;
    let (lo, _) = addrs[at];
    let hi = addrs[at + 1..]
        .iter()
        .map(|&(a, _)| a)
        .find(|&a| a > lo)
        .ok_or_else(|| anyhow!("no symbol after {name}"))?;
    if lo == 0 {
        bail!("/proc/kallsyms hides addresses (kptr_restrict)");
    }
    Ok((lo, hi))
}

/// Packets received and head reallocations during a UDP 64 B run from `ns` to `dst`.
fn udp_head_reallocs(ns: &Ns, dst: &str, seconds: u32) -> Result<(f64, f64)> {
    let filter = head_realloc_filter()?;
    let ((packets, _), counts, _) = counted_during(&[("kmem:kmalloc", filter)], || {
        udp_received(ns, dst, seconds, &[])
    })?;
    Ok((packets, counts[0]))
}

fn path_run_text(label: &str, run: &PathRun) -> String {
    let per_device: Vec<String> = run
        .xmits
        .iter()
        .map(|x| {
            format!(
                "{} {:.0}/s ({:.0}% GSO, {:.0}% over one MTU)",
                x.device,
                x.per_s,
                100.0 * x.gso_share,
                100.0 * x.big_share
            )
        })
        .collect();
    // Programs that run on control events (a neighbour to resolve) are left out of the list,
    // not out of the CPU share.
    let programs: Vec<String> = run
        .programs
        .iter()
        .filter_map(|p| {
            let (per_s, ns) = (p.runs as f64 / run.secs, p.ns as f64 / p.runs as f64);
            (per_s >= 100.0).then(|| format!("{} {per_s:.0}/s at {ns:.0} ns", p.name))
        })
        .collect();
    // ns of program time per second, as a percentage of one CPU.
    let cpu: f64 = run.programs.iter().map(|p| p.ns as f64).sum::<f64>() / run.secs / 1e7;
    let per_s = |n: u64| n as f64 / run.secs;
    format!(
        "{label}: {:.2} Gbit/s; the senders waited for their pacing rate {:.0} times/s \
         (tcp_pace_kick timers armed), retransmitted {:.0} segments/s and saw {:.0} \
         reorderings/s, the receivers queued {:.0} segments/s out of order; eBPF: {} \
         ({cpu:.1}% of one CPU); transmits per device: {}",
        run.gbps,
        run.pacing_per_s,
        per_s(run.tcp.retransmitted),
        per_s(run.tcp.reordered),
        per_s(run.tcp.out_of_order),
        if programs.is_empty() {
            "none ran".to_string()
        } else {
            programs.join(", ")
        },
        per_device.join(", ")
    )
}

/// UDP with 64-byte payloads at full speed, thousands of packets per second received.
fn udp_kpps(ns: &Ns, dst: &str, seconds: u32) -> Result<f64> {
    udp_kpps_with(ns, dst, seconds, &[])
}

/// As [`udp_kpps`], `dst` sending to `ns` (iperf3 -R).
fn udp_down_kpps(ns: &Ns, dst: &str, seconds: u32) -> Result<f64> {
    udp_kpps_with(ns, dst, seconds, &["-R"])
}

fn udp_kpps_with(ns: &Ns, dst: &str, seconds: u32, extra: &[&str]) -> Result<f64> {
    let (packets, secs) = udp_received(ns, dst, seconds, extra)?;
    Ok(packets / secs / 1e3)
}

/// As [`udp_kpps_with`], also the datagrams that `receiver`'s sockets dropped meanwhile
/// because their receive buffer was full.
fn udp_kpps_rcvbuf_drops(
    ns: &Ns,
    receiver: &Ns,
    dst: &str,
    seconds: u32,
    extra: &[&str],
) -> Result<(f64, u64)> {
    // Udp RcvbufErrors: /proc/net/snmp is per namespace.
    let drops = || snmp_sum(receiver, "Udp", &["RcvbufErrors"]);
    let before = drops()?;
    let kpps = udp_kpps_with(ns, dst, seconds, extra)?;
    Ok((kpps, drops()? - before))
}

/// iperf3's socket buffers (SO_SNDBUF and SO_RCVBUF, both ends) for the UDP runs that show
/// what the path carries when the receiving application has room for bursts.
const UDP_BIG_BUFFERS: &[&str] = &["-w", "4M"];

/// UDP 64 B at full speed: packets received and over how many seconds.
fn udp_received(ns: &Ns, dst: &str, seconds: u32, extra: &[&str]) -> Result<(f64, f64)> {
    let mut argv = vec!["-u", "-b", "0", "-l", "64"];
    argv.extend_from_slice(extra);
    let end = iperf(ns, dst, seconds, &argv)?;
    let r = &end["sum_received"];
    let (bytes, secs) = (r["bytes"].as_f64(), r["seconds"].as_f64());
    match (bytes, secs) {
        (Some(b), Some(s)) if s > 0.0 => Ok((b / 64.0, s)),
        _ => Err(anyhow!("no sum_received in {end}")),
    }
}

/// `failed`: where a failed round leaves the daemons' logs ([`keep_daemon_logs`]).
pub fn run(plan: &Plan, report: &mut Report, failed: &std::path::Path) -> Result<()> {
    fourover6(plan, report, failed).context("4over6 throughput")?;
    mape(plan, report).context("MAP-E throughput")?;
    Ok(())
}

/// Adds the plain-routing path client → core → server → internet (192.0.2.3) next to the
/// tunnel, on the same namespaces and veths, and a second one (192.0.2.4) whose route has the
/// tunnel's inner MTU, which it returns.
fn plain_route_4over6(t: &FourOverSix, client: &Ns) -> Result<u32> {
    client.ip("addr add 203.0.113.2/30 dev v6")?;
    t.core.ip("addr add 203.0.113.1/30 dev c1")?;
    t.core.ip("addr add 203.0.113.5/30 dev srv")?;
    t.server.ip("addr add 203.0.113.6/30 dev up6")?;
    t.core.sysctl("net.ipv4.ip_forward", "1")?;
    t.core.ip("route add 192.0.2.0/24 via 203.0.113.6")?;
    t.server.ip("route add 203.0.113.0/30 via 203.0.113.5")?;
    t.internet
        .ip(&format!("addr add {PLAIN_DST}/24 dev eth0"))?;
    // Replies leave from the address the client talks to (UDP sockets are connected).
    t.internet.ip(&format!(
        "route add 203.0.113.0/30 via 192.0.2.1 src {PLAIN_DST}"
    ))?;
    client.ip(&format!(
        "route add {PLAIN_DST}/32 via 203.0.113.1 src 203.0.113.2"
    ))?;
    if client.ping(PLAIN_DST, 2)? == 0 {
        bail!("the plain-routing baseline path does not answer pings");
    }
    // The native client's routes carry the tunnel's MTU (the link's less 40 bytes).
    let routes = client.run(&["ip", "-4", "route", "show", "0.0.0.0/1"])?;
    let mtu = routes
        .split_whitespace()
        .skip_while(|w| *w != "mtu")
        .nth(1)
        .and_then(|m| m.parse::<u32>().ok())
        .ok_or_else(|| anyhow!("no MTU on the native client's route: {routes:?}"))?;
    t.internet
        .ip(&format!("addr add {PLAIN_AT_TUNNEL_MTU_DST}/24 dev eth0"))?;
    client.ip(&format!(
        "route add {PLAIN_AT_TUNNEL_MTU_DST}/32 via 203.0.113.1 src 203.0.113.2 mtu {mtu}"
    ))?;
    if client.ping(PLAIN_AT_TUNNEL_MTU_DST, 2)? == 0 {
        bail!("the plain-routing path at the tunnel's MTU does not answer pings");
    }
    Ok(mtu)
}

/// Information rows in the throughput section for one kind of run: plain routing's and the
/// native fast path's medians (`plain IPv4 routing, {what}`, `4over6 native fast path,
/// {what}`) and their ratio, named `ratio_name`. Returns the three values.
fn plain_native_figures(
    report: &mut Report,
    unit: &'static str,
    what: &str,
    ratio_name: &str,
    plain: Vec<f64>,
    native: Vec<f64>,
) -> (f64, f64, f64) {
    let sec = "throughput";
    let p = report.figure(sec, format!("plain IPv4 routing, {what}"), unit, plain);
    let n = report.figure(
        sec,
        format!("4over6 native fast path, {what}"),
        unit,
        native,
    );
    let x = ratio(n, p);
    report.figure(sec, ratio_name, "x", vec![x]);
    (p, n, x)
}

fn fourover6(plan: &Plan, report: &mut Report, failed: &std::path::Path) -> Result<()> {
    let mut t = FourOverSix::start_native(&[
        "--pool",
        "198.51.100.2-198.51.100.20",
        "--gateway",
        "198.51.100.1",
        "--dns",
        "192.0.2.53",
    ])?;
    let native = t.client_ns()?;
    let (native_instance, _) = t.start_native_client(&native, &[])?;
    let inband = t.client_ns()?;
    t.start_client(&inband, &[])?;
    // Seven more in-band clients for the eight-at-once run (the first is `inband`).
    let mut eight = vec![];
    for _ in 1..INBAND_CLIENTS {
        let ns = t.client_ns()?;
        t.start_client(&ns, &[])?;
        eight.push(ns);
    }
    let tunnel_mtu = plain_route_4over6(&t, &native)?;
    let _server = iperf_server(&t.internet)?;
    if std::env::var_os("BENCH_LAB_HOLD").is_some() {
        eprintln!(
            "lab up: native client {}, in-band {}, core {}, server {}, internet {}",
            native.name, inband.name, t.core.name, t.server.name, t.internet.name
        );
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
    // One server per sender of the all-at-once runs (the in-band clients, and the streams).
    let _servers = (0..INBAND_CLIENTS.max(STREAMS))
        .map(|i| iperf_server_on(&t.internet, 5202 + i as u16))
        .collect::<Result<Vec<_>>>()?;
    rr_server(&t.internet)?;
    let s = plan.seconds;
    // TCP's behaviour here depends on the congestion control the namespaces inherit from the
    // machine (BBR paces to a model of the path; CUBIC's pacing follows its window): the
    // report says which.
    let cc = native
        .run(&["sysctl", "-n", "net.ipv4.tcp_congestion_control"])
        .unwrap_or_default()
        .trim()
        .to_owned();
    report.note(format!(
        "TCP runs use the machine's default congestion control: {cc} (net.ipv4.tcp_congestion_control)."
    ));
    let (mut plain_tcp, mut native_tcp, mut inband_tcp) = (vec![], vec![], vec![]);
    let (mut plain_udp, mut native_udp, mut inband_udp) = (vec![], vec![], vec![]);
    let (mut plain_tcp8, mut native_tcp8) = (vec![], vec![]);
    let (mut plain_tcp8_one, mut native_tcp8_one) = (vec![], vec![]);
    let (mut plain_mtu_tcp, mut plain_mtu_tcp8) = (vec![], vec![]);
    let (mut plain_rr, mut native_rr) = (vec![], vec![]);
    let (mut plain_rr2, mut native_rr2) = (vec![], vec![]);
    let rr_two_cpus = cpu_usable(usize::from(RR_TWO_CPUS.server));
    // Information: 8 streams with CUBIC, whose pacing rate follows its window (1.2-2x a
    // window per RTT) and so seldom holds the senders back: the runs are CPU-bound and show
    // what the path costs per byte. With BBR (this machine's default) the senders pace to
    // a bandwidth model, and pacing decides (see the notes on pacing waits).
    let unpaced = (cc != UNPACED_CC && cc_available(UNPACED_CC)).then_some(UNPACED_CC);
    let (mut plain_tcp8_unpaced, mut native_tcp8_unpaced) = (vec![], vec![]);
    // ... and the machine's busy CPU time per Gbit in those runs.
    let (mut plain_cpu_unpaced, mut native_cpu_unpaced) = (vec![], vec![]);
    let (mut plain_tcp_down, mut inband_tcp_down) = (vec![], vec![]);
    let (mut plain_udp_down, mut inband_udp_down) = (vec![], vec![]);
    let mut inband_tcp8 = vec![];
    // The receiving sockets' buffer-full drops during the in-band UDP runs (upload, download).
    let mut inband_udp_drops = (0u64, 0u64);
    // UDP with big socket buffers: plain and in-band, upload then download.
    let mut big = [
        "plain IPv4 routing, UDP 64 B",
        "4over6 in-band TUN, UDP 64 B",
        "plain IPv4 routing, UDP 64 B download",
        "4over6 in-band TUN, UDP 64 B download",
    ]
    .map(|name| (name, Vec::new()));
    // The server's session-queue drops during the in-band TCP downloads: tail drops at the
    // cap, and CoDel's.
    let (mut down_full, mut down_aqm, mut down_packets) = (0u64, 0u64, 0u64);
    let before = t.server_stats()?;
    let rounds = (|| -> Result<()> {
        for round in 1..=plan.rounds {
            eprintln!("  4over6 round {round}/{}", plan.rounds);
            plain_tcp.push(tcp_gbps(&native, PLAIN_DST, s)?);
            native_tcp.push(tcp_gbps(&native, TUNNEL_DST, s)?);
            inband_tcp.push(tcp_gbps(&inband, TUNNEL_DST, s)?);
            plain_udp.push(udp_kpps(&native, PLAIN_DST, s)?);
            native_udp.push(udp_kpps(&native, TUNNEL_DST, s)?);
            let (kpps, drops) = udp_kpps_rcvbuf_drops(&inband, &t.internet, TUNNEL_DST, s, &[])?;
            inband_udp.push(kpps);
            inband_udp_drops.0 += drops;
            plain_tcp8.push(tcp_streams_gbps(&native, PLAIN_DST, s)?);
            native_tcp8.push(tcp_streams_gbps(&native, TUNNEL_DST, s)?);
            plain_tcp8_one.push(tcp_one_process_streams_gbps(&native, PLAIN_DST, s)?);
            native_tcp8_one.push(tcp_one_process_streams_gbps(&native, TUNNEL_DST, s)?);
            plain_mtu_tcp.push(tcp_gbps(&native, PLAIN_AT_TUNNEL_MTU_DST, s)?);
            plain_mtu_tcp8.push(tcp_streams_gbps(&native, PLAIN_AT_TUNNEL_MTU_DST, s)?);
            if unpaced.is_some() {
                for (dst, gbps, cpu) in [
                    (PLAIN_DST, &mut plain_tcp8_unpaced, &mut plain_cpu_unpaced),
                    (
                        TUNNEL_DST,
                        &mut native_tcp8_unpaced,
                        &mut native_cpu_unpaced,
                    ),
                ] {
                    let (g, c) =
                        with_cpu_per_gbit(s, || tcp_streams_cc_gbps(&native, dst, s, unpaced))?;
                    gbps.push(g);
                    cpu.push(c);
                }
            }
            plain_rr.push(tcp_rr_ktps(&native, PLAIN_DST, s, RR_ONE_CPU)?);
            native_rr.push(tcp_rr_ktps(&native, TUNNEL_DST, s, RR_ONE_CPU)?);
            if rr_two_cpus {
                plain_rr2.push(tcp_rr_ktps(&native, PLAIN_DST, s, RR_TWO_CPUS)?);
                native_rr2.push(tcp_rr_ktps(&native, TUNNEL_DST, s, RR_TWO_CPUS)?);
            }
            plain_tcp_down.push(tcp_down_gbps(&native, PLAIN_DST, s)?);
            let q0 = t.server_stats()?;
            inband_tcp_down.push(tcp_down_gbps(&inband, TUNNEL_DST, s)?);
            let q1 = t.server_stats()?;
            let d = |name: &str| counter(&q1, name) - counter(&q0, name);
            down_full += d("drop_session_queue_full");
            down_aqm += d("drop_session_aqm");
            down_packets += d("inband_packets_from_tun");
            plain_udp_down.push(udp_down_kpps(&native, PLAIN_DST, s)?);
            let (kpps, drops) = udp_kpps_rcvbuf_drops(&inband, &inband, TUNNEL_DST, s, &["-R"])?;
            inband_udp_down.push(kpps);
            inband_udp_drops.1 += drops;
            // Information: the same UDP runs with 4 MiB socket buffers at both ends.
            for ((_, samples), (ns, dst, reverse)) in big.iter_mut().zip([
                (&native, PLAIN_DST, false),
                (&inband, TUNNEL_DST, false),
                (&native, PLAIN_DST, true),
                (&inband, TUNNEL_DST, true),
            ]) {
                let mut argv = UDP_BIG_BUFFERS.to_vec();
                if reverse {
                    argv.push("-R");
                }
                samples.push(udp_kpps_with(ns, dst, s, &argv)?);
            }
            let all: Vec<Ns> = std::iter::once(inband.clone())
                .chain(eight.iter().cloned())
                .collect();
            inband_tcp8.push(tcp_clients_gbps(&all, TUNNEL_DST, s)?);
        }
        Ok(())
    })();
    if let Err(e) = rounds {
        return Err(keep_daemon_logs(&t.lab, failed, e));
    }
    // Separate runs (the tracepoint counting and the BPF statistics cost a little per
    // packet): how many transmits each device of the path makes and how many of them are GSO
    // packets, how often the senders waited for their pacing rate, how often TCP saw
    // reordering, and what the eBPF programs cost in live traffic; plain routing on a route
    // with the tunnel's MTU too, which shows what the tunnel's MSS alone does. The paths:
    // client v6 → core c<N>/srv → server up6 → inet0 → internet eth0, and back.
    let path = ["v6", "srv", "inet0", "eth0", "up6", "c1"];
    let runs: [(&str, &str, Measure); 6] = [
        ("plain TCP", PLAIN_DST, tcp_gbps),
        (
            "plain TCP at the tunnel's MTU",
            PLAIN_AT_TUNNEL_MTU_DST,
            tcp_gbps,
        ),
        ("native TCP", TUNNEL_DST, tcp_gbps),
        ("plain 8 TCP streams", PLAIN_DST, tcp_streams_gbps),
        (
            "plain 8 TCP streams at the tunnel's MTU",
            PLAIN_AT_TUNNEL_MTU_DST,
            tcp_streams_gbps,
        ),
        ("native 8 TCP streams", TUNNEL_DST, tcp_streams_gbps),
    ];
    for (label, dst, measure) in runs {
        let ends = (&native, &t.internet);
        match path_run(&path, ends, || measure(&native, dst, s)) {
            Ok(run) => report.note(path_run_text(label, &run)),
            Err(e) => report.note(format!("{label}: no path counts: {e:#}")),
        }
    }
    // A packet whose head has less room than the 40 bytes of IPv6 is copied into a bigger
    // one by bpf_skb_adjust_room: a UDP socket reserves only the device's link-layer room.
    for (label, dst) in [
        ("plain UDP 64 B", PLAIN_DST),
        ("native UDP 64 B", TUNNEL_DST),
    ] {
        match udp_head_reallocs(&native, dst, s) {
            Ok((packets, reallocs)) => report.note(format!(
                "{label}: {:.2} head reallocations (pskb_expand_head) per packet received \
                 ({reallocs:.0} in {packets:.0})",
                if packets > 0.0 {
                    reallocs / packets
                } else {
                    0.0
                }
            )),
            Err(e) => report.note(format!("{label}: no reallocation count: {e:#}")),
        }
    }
    if crate::profile::enabled() {
        type Run<'a> = (&'a str, &'a Ns, &'a str, Measure);
        let runs: [Run; 8] = [
            ("plain TCP", &native, PLAIN_DST, tcp_gbps),
            ("native TCP", &native, TUNNEL_DST, tcp_gbps),
            ("plain 8 TCP streams", &native, PLAIN_DST, tcp_streams_gbps),
            (
                "native 8 TCP streams",
                &native,
                TUNNEL_DST,
                tcp_streams_gbps,
            ),
            ("in-band TCP", &inband, TUNNEL_DST, tcp_gbps),
            ("plain UDP", &native, PLAIN_DST, udp_kpps),
            ("native UDP", &native, TUNNEL_DST, udp_kpps),
            ("in-band UDP", &inband, TUNNEL_DST, udp_kpps),
        ];
        for (label, ns, dst, measure) in runs {
            crate::profile::run(label, || measure(ns, dst, s))?;
        }
    }
    let after = t.server_stats()?;
    let decap =
        counter(&after, "fastpath_decap_packets") - counter(&before, "fastpath_decap_packets");
    let encap =
        counter(&after, "fastpath_encap_packets") - counter(&before, "fastpath_encap_packets");
    report.note(format!(
        "4over6 runs: the server's eBPF counted {decap} decapsulated and {encap} encapsulated \
         packets (GSO segments) for the native client, so the native figures are the fast path."
    ));

    let sec = "throughput";
    let p_tcp = report.figure(sec, "plain IPv4 routing, TCP", "Gbit/s", plain_tcp);
    let n_tcp = report.figure(sec, "4over6 native fast path, TCP", "Gbit/s", native_tcp);
    let i_tcp = report.figure(sec, "4over6 in-band TUN, TCP", "Gbit/s", inband_tcp);
    let p_udp = report.figure(sec, "plain IPv4 routing, UDP 64 B", "kpps", plain_udp);
    let n_udp = report.figure(sec, "4over6 native fast path, UDP 64 B", "kpps", native_udp);
    let i_udp = report.figure(sec, "4over6 in-band TUN, UDP 64 B", "kpps", inband_udp);
    let p_tcp_down = report.figure(
        sec,
        "plain IPv4 routing, TCP download",
        "Gbit/s",
        plain_tcp_down,
    );
    let i_tcp_down = report.figure(
        sec,
        "4over6 in-band TUN, TCP download",
        "Gbit/s",
        inband_tcp_down,
    );
    let p_udp_down = report.figure(
        sec,
        "plain IPv4 routing, UDP 64 B download",
        "kpps",
        plain_udp_down,
    );
    let i_udp_down = report.figure(
        sec,
        "4over6 in-band TUN, UDP 64 B download",
        "kpps",
        inband_udp_down,
    );
    let i_tcp8 = report.figure(
        sec,
        "4over6 in-band TUN, 8 clients, one TCP stream each",
        "Gbit/s",
        inband_tcp8,
    );
    let p_tcp8 = report.figure(
        sec,
        "plain IPv4 routing, 8 TCP streams",
        "Gbit/s",
        plain_tcp8,
    );
    let n_tcp8 = report.figure(
        sec,
        "4over6 native fast path, 8 TCP streams",
        "Gbit/s",
        native_tcp8,
    );
    // Information: the same 8 streams from one iperf3 process, as this bench measured them
    // up to 44f271c.
    let (p1, n1, x1) = plain_native_figures(
        report,
        "Gbit/s",
        "8 TCP streams from one iperf3 process (-P 8)",
        "fast path 8 TCP streams from one iperf3 process / plain routing",
        plain_tcp8_one,
        native_tcp8_one,
    );
    report.note(format!(
        "8 TCP streams: each from its own iperf3 process (the target's runs), and from one \
         process (iperf3 -P 8, information): {n1:.1} Gbit/s native against {p1:.1} plain \
         ({x1:.2}x). iperf3 3.12 sends every stream of a -P run from one thread, so where the \
         scheduler puts that thread and its receiver on the two CPUs decides such a run more \
         than the path does."
    ));
    // Information: how much of the TCP gap is the tunnel's smaller MTU (MSS) alone.
    let p_mtu_tcp = report.figure(
        sec,
        format!("plain IPv4 routing at the tunnel's MTU ({tunnel_mtu}), TCP"),
        "Gbit/s",
        plain_mtu_tcp,
    );
    let p_mtu_tcp8 = report.figure(
        sec,
        format!("plain IPv4 routing at the tunnel's MTU ({tunnel_mtu}), 8 TCP streams"),
        "Gbit/s",
        plain_mtu_tcp8,
    );
    report.figure(
        sec,
        "fast path TCP / plain routing at the tunnel's MTU",
        "x",
        vec![ratio(n_tcp, p_mtu_tcp)],
    );
    report.figure(
        sec,
        "fast path 8 TCP streams / plain routing at the tunnel's MTU",
        "x",
        vec![ratio(n_tcp8, p_mtu_tcp8)],
    );
    // Information: the two TCP targets as a tunnel costing nothing but its 40-byte header
    // would score them in this run (plain routing at the tunnel's MTU against plain routing
    // at the link's), so a reader sees how much of a miss is the MTU alone.
    let free_tcp = ratio(p_mtu_tcp, p_tcp);
    let free_tcp8 = ratio(p_mtu_tcp8, p_tcp8);
    report.figure(
        sec,
        "plain routing at the tunnel's MTU / plain routing, TCP (a tunnel that costs nothing)",
        "x",
        vec![free_tcp],
    );
    report.figure(
        sec,
        "plain routing at the tunnel's MTU / plain routing, 8 TCP streams (a tunnel that costs \
         nothing)",
        "x",
        vec![free_tcp8],
    );
    report.note(format!(
        "The MTU alone: plain routing at the tunnel's MTU ({tunnel_mtu}) scores {free_tcp:.2}x \
         of plain routing with one TCP stream and {free_tcp8:.2}x with 8, in this run. That is \
         what a tunnel costing nothing but its 40-byte header would score against the TCP \
         targets (>= 0.95): with the machine's congestion control ({cc}), the smaller MSS \
         can cost far more than its 2.7% of bytes."
    ));
    match unpaced {
        Some(unpaced) => {
            let (p, n, x) = plain_native_figures(
                report,
                "Gbit/s",
                &format!("8 TCP streams, {unpaced}"),
                &format!("fast path 8 TCP streams / plain routing, {unpaced}"),
                plain_tcp8_unpaced,
                native_tcp8_unpaced,
            );
            let (pc, nc, xc) = plain_native_figures(
                report,
                "CPU ms/Gbit",
                &format!("8 TCP streams, {unpaced}, the machine's busy CPU time per Gbit"),
                &format!("fast path / plain routing, CPU time per Gbit, 8 TCP streams, {unpaced}"),
                plain_cpu_unpaced,
                native_cpu_unpaced,
            );
            report.note(format!(
                "8 TCP streams with {unpaced} (information): {n:.1} Gbit/s native against \
                 {p:.1} plain ({x:.2}x). {unpaced}'s pacing follows its window and seldom \
                 holds the senders back, so these runs are bound by the CPUs, and their \
                 throughput swings by a fifth from round to round. The machine's busy CPU \
                 time per Gbit in the same runs: {nc:.1} ms native against {pc:.1} plain \
                 ({xc:.2}x). In these runs the two ends spend much of that time waking \
                 each other across the CPUs, which makes every per-packet cost on the path \
                 count more, and how the ends are started changes it (README, Benchmark). \
                 The target's runs use the machine's {cc}."
            ));
        }
        None => report.note(format!(
            "No 8-stream runs with {UNPACED_CC}: it is the machine's default already ({cc}), \
             or the kernel does not offer it."
        )),
    }
    let p_rr = report.figure(
        sec,
        "plain IPv4 routing, TCP request/response 1 B, both ends on CPU 0",
        "k transactions/s",
        plain_rr,
    );
    let n_rr = report.figure(
        sec,
        "4over6 native fast path, TCP request/response 1 B, both ends on CPU 0",
        "k transactions/s",
        native_rr,
    );
    if rr_two_cpus {
        plain_native_figures(
            report,
            "k transactions/s",
            "TCP request/response 1 B, ends on CPUs 0 and 1",
            "fast path TCP request/response / plain routing, ends on CPUs 0 and 1",
            plain_rr2,
            native_rr2,
        );
    } else {
        report.note(
            "request/response with the ends on two CPUs: not measured, this process may not \
             run on CPU 1",
        );
    }
    // The targets of the fast-path issue (its table); a miss is reported, never redefined.
    report.target(Target {
        name: "fast path TCP / plain routing".into(),
        value: ratio(n_tcp, p_tcp),
        unit: "x",
        op: ">=",
        threshold: 0.95,
        against: "plain IPv4 routing, same veths".into(),
    });
    report.target(Target {
        name: "fast path UDP 64 B pps / plain routing".into(),
        value: ratio(n_udp, p_udp),
        unit: "x",
        op: ">=",
        threshold: 0.92,
        against: "plain IPv4 routing, same veths".into(),
    });
    report.target(Target {
        name: "fast path 8 TCP streams / plain routing".into(),
        value: ratio(n_tcp8, p_tcp8),
        unit: "x",
        op: ">=",
        threshold: 0.95,
        against: "plain IPv4 routing, same veths, 8 streams".into(),
    });
    report.target(Target {
        name: "fast path TCP request/response / plain routing".into(),
        value: ratio(n_rr, p_rr),
        unit: "x",
        op: ">=",
        threshold: 0.90,
        against: "plain IPv4 routing, same veths, 1-byte transactions, both ends on CPU 0".into(),
    });
    // The in-band issue's targets (upload: the client sends; download: the internet host).
    for (name, value, threshold) in [
        (
            "in-band TCP upload / plain routing",
            ratio(i_tcp, p_tcp),
            0.30,
        ),
        (
            "in-band TCP download / plain routing",
            ratio(i_tcp_down, p_tcp_down),
            0.30,
        ),
        (
            "in-band UDP 64 B pps upload / plain routing",
            ratio(i_udp, p_udp),
            0.75,
        ),
        (
            "in-band UDP 64 B pps download / plain routing",
            ratio(i_udp_down, p_udp_down),
            0.75,
        ),
    ] {
        report.target(Target {
            name: name.into(),
            value,
            unit: "x",
            op: ">=",
            threshold,
            against: "plain IPv4 routing, same veths, same direction".into(),
        });
    }
    report.note(format!(
        "in-band TCP downloads: the server queued {down_packets} packets for the session; \
         {down_full} more were dropped at the session queue's cap (tail drops: the sender \
         then retransmits) and {down_aqm} of the queued ones by CoDel."
    ));
    // Information beside the in-band UDP targets: where their packets are lost, and what the
    // path carries when the receiving application has room for bursts.
    let bufs = UDP_BIG_BUFFERS.join(" ");
    let [p_big, i_big, p_big_down, i_big_down] = big.map(|(name, samples)| {
        report.figure(sec, format!("{name}, iperf3 {bufs}"), "kpps", samples)
    });
    report.note(format!(
        "in-band UDP 64 B: the receiving iperf3's socket dropped {} datagrams (buffer full, \
         Udp RcvbufErrors) in the upload runs and {} in the download runs. With {bufs} \
         (socket buffers at both ends; information, not the target) in-band is {:.2}x of \
         plain routing uploading and {:.2}x downloading.",
        inband_udp_drops.0,
        inband_udp_drops.1,
        ratio(i_big, p_big),
        ratio(i_big_down, p_big_down),
    ));
    report.note(format!(
        "in-band, {INBAND_CLIENTS} clients at once: {:.2}x of plain routing with 8 TCP streams",
        ratio(i_tcp8, p_tcp8)
    ));
    report.target(Target {
        name: "fast path TCP / in-band TUN".into(),
        value: ratio(n_tcp, i_tcp),
        unit: "x",
        op: ">=",
        threshold: 5.0,
        against: "in-band 102/103 over the TCP session".into(),
    });
    xdp_rows(
        plan,
        report,
        &mut t,
        &native,
        &native_instance,
        (n_tcp, n_udp),
    )
}

/// The server restarted with `--xdp`, native TCP and UDP next to plain routing in the same
/// conditions: the lab's veths made as NIC-like as XDP needs (GRO at the internet host's
/// veth, which makes it take redirected frames; complete checksums from the core, which XDP
/// cannot finish) and, as on any veth with XDP, the core's veth toward the server without
/// GSO. Reported next to the TC rows; no target (the default is TC, which measures best
/// here).
fn xdp_rows(
    plan: &Plan,
    report: &mut Report,
    t: &mut FourOverSix,
    native: &Ns,
    native_instance: &str,
    (tc_tcp, tc_udp): (f64, f64),
) -> Result<()> {
    t.internet.run(&["ethtool", "-K", "eth0", "gro", "on"])?;
    t.core.run(&["ethtool", "-K", "srv", "tx", "off"])?;
    let instance = t.server_instance.clone();
    if let Some(server) = t.lab.daemon(&instance) {
        server.kill();
    }
    t.server_args.push("--xdp".into());
    t.start_server()?;
    t.wait_connected(native_instance, std::time::Duration::from_secs(30))?;
    wait_for(
        "pings through the XDP server",
        std::time::Duration::from_secs(20),
        || Ok((native.ping(TUNNEL_DST, 1)? == 1).then_some(())),
    )?;
    let s = plan.seconds;
    let before = t.server_stats()?;
    let (mut plain_tcp, mut xdp_tcp, mut plain_udp, mut xdp_udp) = (vec![], vec![], vec![], vec![]);
    for round in 1..=plan.rounds {
        eprintln!("  4over6 --xdp round {round}/{}", plan.rounds);
        plain_tcp.push(tcp_gbps(native, PLAIN_DST, s)?);
        xdp_tcp.push(tcp_gbps(native, TUNNEL_DST, s)?);
        plain_udp.push(udp_kpps(native, PLAIN_DST, s)?);
        xdp_udp.push(udp_kpps(native, TUNNEL_DST, s)?);
    }
    let after = t.server_stats()?;
    let moved = |name: &str| counter(&after, name) - counter(&before, name);
    let sec = "throughput";
    let p_tcp = report.figure(
        sec,
        "plain IPv4 routing, TCP (XDP lab settings)",
        "Gbit/s",
        plain_tcp,
    );
    let x_tcp = report.figure(
        sec,
        "4over6 native fast path, TCP, server --xdp",
        "Gbit/s",
        xdp_tcp,
    );
    let p_udp = report.figure(
        sec,
        "plain IPv4 routing, UDP 64 B (XDP lab settings)",
        "kpps",
        plain_udp,
    );
    let x_udp = report.figure(
        sec,
        "4over6 native fast path, UDP 64 B, server --xdp",
        "kpps",
        xdp_udp,
    );
    report.note(format!(
        "server --xdp (GRO on the internet host's veth, the core's veth to the server without \
         GSO and checksum offload, as XDP on veth needs): TCP {x_tcp:.2} Gbit/s ({:.2}x of plain \
         routing in the same settings; TC: {tc_tcp:.2} Gbit/s), UDP 64 B {x_udp:.1} kpps ({:.2}x; \
         TC: {tc_udp:.1} kpps). The XDP program decapsulated {} of {} packets.",
        ratio(x_tcp, p_tcp),
        ratio(x_udp, p_udp),
        moved("fastpath_xdp_decap_packets"),
        moved("fastpath_decap_packets"),
    ));
    Ok(())
}

/// Plain routing with nftables masquerade LAN → CE → BR → 192.0.2.3, next to MAP-E on the
/// same veths. The CE–BR link gets 192.0.2.252/30 (the internet host routes it via the BR);
/// nothing there is in the rule's 203.0.113.0/24, so the BR's programs leave it alone.
fn plain_route_mape(m: &MapeLab) -> Result<()> {
    m.ce.ip("addr add 192.0.2.254/30 dev wan0")?;
    m.br.ip("addr add 192.0.2.253/30 dev ce0")?;
    m.ce.ip(&format!("route add {PLAIN_DST}/32 via 192.0.2.253"))?;
    m.internet
        .ip(&format!("addr add {PLAIN_DST}/24 dev eth0"))?;
    m.internet.ip(&format!(
        "route add 192.0.2.252/30 via 192.0.2.1 src {PLAIN_DST}"
    ))?;
    let rules = m.lab.dir().join("masquerade.nft");
    std::fs::write(
        &rules,
        "table ip bench_masq {\n  chain post {\n    type nat hook postrouting priority srcnat;\n    \
         oifname \"wan0\" ip daddr 192.0.2.3 masquerade\n  }\n}\n",
    )?;
    m.ce.run(&["nft", "-f", &rules.display().to_string()])?;
    if m.lan.ping(PLAIN_DST, 2)? == 0 {
        bail!("the masquerade baseline path does not answer pings");
    }
    Ok(())
}

fn mape(plan: &Plan, report: &mut Report) -> Result<()> {
    let mut m = MapeLab::start(&RULE_252, &[])?;
    plain_route_mape(&m)?;
    let _server = iperf_server(&m.internet)?;
    let s = plan.seconds;
    let (mut masq, mut mape) = (vec![], vec![]);
    let before = m.ce_stats()?;
    for round in 1..=plan.rounds {
        eprintln!("  MAP-E round {round}/{}", plan.rounds);
        masq.push(tcp_gbps(&m.lan, PLAIN_DST, s)?);
        mape.push(tcp_gbps(&m.lan, TUNNEL_DST, s)?);
    }
    if crate::profile::enabled() {
        crate::profile::run("masquerade TCP", || tcp_gbps(&m.lan, PLAIN_DST, s))?;
        crate::profile::run("MAP-E TCP", || tcp_gbps(&m.lan, TUNNEL_DST, s))?;
    }
    let after = m.ce_stats()?;
    let out =
        counter(&after, "mape_ce_napt_out_packets") - counter(&before, "mape_ce_napt_out_packets");
    let slow = counter(&after, "slowpath_out_packets")
        .saturating_sub(counter(&before, "slowpath_out_packets"));
    report.note(format!(
        "MAP-E runs: the CE's eBPF NAPT counted {out} outbound packets; {slow} went through \
         the slow path (first packets of flows)."
    ));
    let sec = "throughput";
    let masq = report.figure(
        sec,
        "plain routing + nftables masquerade, TCP",
        "Gbit/s",
        masq,
    );
    let mape = report.figure(sec, "MAP-E CE + BR (eBPF), TCP", "Gbit/s", mape);
    report.target(Target {
        name: "MAP-E CE+BR TCP / masquerade routing".into(),
        value: ratio(mape, masq),
        unit: "x",
        op: ">=",
        threshold: 1.00,
        against: "plain routing with nftables masquerade, same veths".into(),
    });
    mape_br_xdp_rows(plan, report, &mut m, mape)
}

/// The BR restarted with `--xdp`, MAP-E next to the masquerade baseline in the same
/// settings: the veths made as NIC-like as XDP needs (GRO at the internet host's veth, which
/// makes it take redirected frames; complete checksums from the CE's WAN veth, which XDP
/// cannot finish) and, as on any veth with XDP, the CE's WAN veth without GSO. Reported next
/// to the TC rows; no target (the default is TC).
fn mape_br_xdp_rows(plan: &Plan, report: &mut Report, m: &mut MapeLab, tc: f64) -> Result<()> {
    let mut args = m.br_args.clone();
    args.push("--xdp".into());
    m.restart_br(args)?;
    m.internet.run(&["ethtool", "-K", "eth0", "gro", "on"])?;
    m.ce.run(&["ethtool", "-K", "wan0", "tx", "off"])?;
    wait_for(
        "pings through the XDP BR",
        std::time::Duration::from_secs(20),
        || Ok((m.lan.ping(TUNNEL_DST, 1)? == 1).then_some(())),
    )?;
    let s = plan.seconds;
    let before = m.br_stats()?;
    let (mut masq, mut xdp) = (vec![], vec![]);
    for round in 1..=plan.rounds {
        eprintln!("  MAP-E br --xdp round {round}/{}", plan.rounds);
        masq.push(tcp_gbps(&m.lan, PLAIN_DST, s)?);
        xdp.push(tcp_gbps(&m.lan, TUNNEL_DST, s)?);
    }
    let after = m.br_stats()?;
    let moved = |name: &str| counter(&after, name) - counter(&before, name);
    let sec = "throughput";
    let masq = report.figure(
        sec,
        "plain routing + nftables masquerade, TCP (XDP lab settings)",
        "Gbit/s",
        masq,
    );
    let xdp = report.figure(sec, "MAP-E CE + BR --xdp, TCP", "Gbit/s", xdp);
    report.note(format!(
        "mape br --xdp (GRO on the internet host's veth, the CE's WAN veth without GSO and \
         checksum offload, as XDP on veth needs): TCP {xdp:.2} Gbit/s ({:.2}x of masquerade \
         routing in the same settings; TC: {tc:.2} Gbit/s). The XDP program decapsulated {} of \
         {} packets.",
        ratio(xdp, masq),
        moved("fastpath_xdp_decap_packets"),
        moved("mape_br_decap_packets"),
    ));
    Ok(())
}
