//! `cargo xtask bench`: throughput, per-packet eBPF cost and control-plane scale, each figure
//! a ratio against a baseline measured in the same run on the same namespaces (SPEC §9).
//!
//! Run through `cargo xtask bench [--quick]`, which builds a release `tunnel-ctl` and passes
//! it in `TUNNEL_CTL`. Writes `target/bench/report.json` and `report.md`, and prints the
//! table (ratios first) on stdout. Nothing here asserts on timing: figures go to the report,
//! each target marked met or not.
use std::{path::PathBuf, time::Instant};

use anyhow::{Context as _, Result};

mod control;
mod ebpf_cost;
mod profile;
mod report;
mod store;
mod throughput;

use report::Report;

/// The kernel's clock ticks per second, the unit of `/proc` CPU times.
pub fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// How long and how often: `--quick` keeps CI's run under two minutes.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub quick: bool,
    /// Rounds of each throughput comparison (baseline and candidates back to back).
    pub rounds: u32,
    /// Seconds per iperf3 run.
    pub seconds: u32,
    /// BPF_PROG_TEST_RUN calls per program.
    pub test_runs: u32,
    /// Concurrent control sessions.
    pub sessions: u32,
    /// Seconds of keepalive CPU sampling, and of binding churn.
    pub steady_seconds: u32,
    pub churn_seconds: u32,
    /// Softwires in the big lwAFTR table (the scale, quick or not).
    pub softwires: u32,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                quick,
                rounds: 1,
                seconds: 1,
                test_runs: 20_000,
                sessions: 1_000,
                steady_seconds: 3,
                churn_seconds: 2,
                softwires: 1_000_000,
            }
        } else {
            Plan {
                quick,
                rounds: 5,
                seconds: 4,
                test_runs: 1_000_000,
                sessions: 10_000,
                steady_seconds: 25,
                churn_seconds: 10,
                softwires: 1_000_000,
            }
        }
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("bench: error: {e:#}");
        tunnel_tests::remove_own_leftovers();
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let mut quick = false;
    let mut out = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/bench"));
    let mut only: Option<String> = None;
    let mut profile = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--out" => out = args.next().context("--out needs a directory")?.into(),
            "--only" => only = Some(args.next().context("--only needs a section")?),
            "--profile" => profile = true,
            // cargo bench passes --bench to harness-less targets.
            "--bench" => {}
            other => anyhow::bail!(
                "unknown argument {other:?} (use --quick, --out DIR, --only throughput|ebpf|control|store, --profile)"
            ),
        }
    }
    if profile {
        profile::enable(out.join("profile"))?;
    }
    ctrlc_cleanup();
    let plan = Plan::new(quick);
    let started = Instant::now();
    let mut report = Report::new(&plan)?;
    let want = |s: &str| only.as_deref().is_none_or(|o| o == s);
    if want("ebpf") {
        eprintln!(
            "bench: eBPF cost per packet ({} test runs each)",
            plan.test_runs
        );
        ebpf_cost::run(&plan, &mut report).context("eBPF cost")?;
    }
    if want("throughput") {
        eprintln!(
            "bench: throughput ({} rounds of {} s per run)",
            plan.rounds, plan.seconds
        );
        throughput::run(&plan, &mut report, &out.join("failed")).context("throughput")?;
    }
    if want("control") {
        eprintln!("bench: control plane ({} sessions)", plan.sessions);
        control::run(&plan, &mut report).context("control plane")?;
    }
    if want("store") {
        eprintln!(
            "bench: shared lease store ({} sessions, PostgreSQL and file)",
            plan.sessions
        );
        store::run(&plan, &mut report).context("lease store")?;
    }
    report.set_duration(started.elapsed());
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    report.write(&out)?;
    print!("{}", report.table());
    eprintln!(
        "bench: wrote {} and {} ({:.0} s)",
        out.join("report.json").display(),
        out.join("report.md").display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Ctrl-C removes this process's namespaces and daemons (drop does not run on a signal).
fn ctrlc_cleanup() {
    let _ = ctrlc::set_handler(|| {
        eprintln!("bench: interrupted, removing the lab");
        tunnel_tests::remove_own_leftovers();
        std::process::exit(130);
    });
}
