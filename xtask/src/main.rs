//! `cargo xtask`: the project's own build, setup and test commands.
use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

mod demo;
mod fuzz;
mod install;
mod setup;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Build, set up, test and demo the tunnel"
)]
struct Cli {
    /// Show the full output of install steps (apt-get, cargo install); without it each step
    /// is one line, and its output is printed only if it fails.
    #[arg(short, long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what a fresh machine lacks: nightly rust-src, bpf-linker, test tools (apt).
    /// Idempotent: a second run checks, installs nothing and says so.
    Setup,
    /// Build tunnel-ctl with its embedded eBPF object.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Install tunnel-ctl into PREFIX/bin and example systemd units into
    /// PREFIX/lib/systemd/system.
    Install {
        #[arg(long, default_value = "/usr/local")]
        prefix: PathBuf,
    },
    /// Run every test: unit, eBPF (BPF_PROG_TEST_RUN) and network-namespace integration
    /// tests. Needs root. Extra arguments go to `cargo test` (e.g. a test name filter).
    Test {
        /// The long forms of the endurance tests (100,000 churn cycles, 100 server restarts
        /// instead of 10,000 and 20); sets TUNNEL_LONG=1.
        #[arg(long)]
        long: bool,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build, create a throwaway namespace lab, show the tunnel working, remove everything.
    Demo,
    /// Throughput, eBPF per-packet cost and control-plane scale, each as a ratio against a
    /// baseline measured in the same run; writes target/bench/report.json and report.md.
    /// Needs root. About 14 minutes; --quick (CI) under 2.
    Bench {
        /// Short runs (one round, 1 s each, 1,000 sessions): checks the bench works.
        #[arg(long)]
        quick: bool,
        /// Only one part: throughput, ebpf, control or store (the shared lease store).
        #[arg(long, value_name = "PART")]
        only: Option<String>,
        /// Record each measured run with `perf record -a -g` (needs perf) and write the
        /// hottest symbols to target/bench/profile/<run>.txt: where a missed target loses.
        #[arg(long)]
        profile: bool,
    },
    /// cargo fmt --check and cargo clippy -D warnings over the workspace.
    Lint,
    /// Run the cargo-fuzz targets (frame decoder, 101/106/108 texts, MAP-E rules, slow path)
    /// for --time seconds each and report runs per target. Needs nightly; installs cargo-fuzz
    /// if missing. The checked-in corpus is replayed by `cargo xtask test` anyway.
    Fuzz {
        /// Seconds per target.
        #[arg(long, value_name = "S", default_value_t = 60)]
        time: u64,
        /// Only this target.
        #[arg(long, value_name = "NAME")]
        target: Option<String>,
        /// Targets run side by side.
        #[arg(long, value_name = "N", default_value_t = 1)]
        jobs: usize,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    setup::set_show_output(cli.verbose);
    let result = match cli.command {
        Cmd::Setup => setup::run(setup::Mode::Verbose),
        Cmd::Build { release } => setup::run(setup::Mode::Quiet).and_then(|()| build(release)),
        Cmd::Install { prefix } => {
            setup::run(setup::Mode::Quiet).and_then(|()| install::run(&prefix))
        }
        Cmd::Test { long, args } => setup::run(setup::Mode::Quiet).and_then(|()| test(long, &args)),
        Cmd::Demo => setup::run(setup::Mode::Quiet).and_then(|()| demo::run()),
        Cmd::Bench {
            quick,
            only,
            profile,
        } => setup::run(setup::Mode::Quiet).and_then(|()| bench(quick, only.as_deref(), profile)),
        Cmd::Lint => setup::run(setup::Mode::Quiet).and_then(|()| lint()),
        Cmd::Fuzz { time, target, jobs } => {
            setup::run(setup::Mode::Quiet).and_then(|()| fuzz::run(time, target.as_deref(), jobs))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Runs a command in the workspace root, failing on a non-zero exit.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .current_dir(root())
        .status()
        .with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Builds tunnel-ctl and returns the binary's path.
pub fn build(release: bool) -> Result<()> {
    build_bin(release).map(|_| ())
}

pub fn build_bin(release: bool) -> Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args(["build", "--package", "tunnel-ctl"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    let profile = if release { "release" } else { "debug" };
    Ok(root().join("target").join(profile).join("tunnel-ctl"))
}

fn require_root(what: &str) -> Result<()> {
    if !nix_is_root() {
        bail!(
            "{what} needs root (network namespaces, BPF): run it as root, e.g. sudo -E cargo xtask ..."
        );
    }
    Ok(())
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

fn test(long: bool, args: &[String]) -> Result<()> {
    require_root("cargo xtask test")?;
    let bin = build_bin(false)?;
    // The scale tests (a million softwires) measure the build an operator runs; the bench
    // builds the same one, so CI compiles it once.
    let release = build_bin(true)?;
    let mut cmd = cargo();
    cmd.args(["test", "--workspace", "--exclude", "tunnel-ebpf"])
        .args(args)
        .env("TUNNEL_CTL", bin)
        .env("TUNNEL_CTL_RELEASE", release);
    if long {
        cmd.env("TUNNEL_LONG", "1");
    }
    run(&mut cmd)
}

/// Builds a release tunnel-ctl (what is measured) and runs the bench target with it.
fn bench(quick: bool, only: Option<&str>, profile: bool) -> Result<()> {
    require_root("cargo xtask bench")?;
    let bin = build_bin(true)?;
    let mut cmd = cargo();
    cmd.args([
        "bench",
        "--package",
        "tunnel-tests",
        "--bench",
        "bench",
        "--",
    ])
    .env("TUNNEL_CTL", bin);
    if quick {
        cmd.arg("--quick");
    }
    if let Some(part) = only {
        cmd.args(["--only", part]);
    }
    if profile {
        cmd.arg("--profile");
    }
    run(&mut cmd)
}

fn lint() -> Result<()> {
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "tunnel-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))
}
