//! `cargo xtask fuzz`: runs the cargo-fuzz targets in `fuzz/` (installing cargo-fuzz if it is
//! missing) for a fixed time each and reports runs, speed and the outcome per target.
//!
//! New interesting inputs go to target/fuzz/corpus/<target>/ (scratch); the checked-in seeds
//! in fuzz/corpus/<target>/ are read, never written. A crash leaves its input in
//! fuzz/artifacts/<target>/: copy it into fuzz/corpus/<target>/ with the fix, and the corpus
//! replay test keeps it fixed.
use std::{
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::{root, setup::find_in_path};

/// The targets, as named in fuzz/Cargo.toml (and tunnel_ctl::fuzzing::TARGETS).
pub const TARGETS: &[&str] = &["frame_decoder", "texts", "mape_rule", "slow_path"];

pub fn run(seconds: u64, only: Option<&str>, jobs: usize) -> Result<()> {
    let targets: Vec<&str> = match only {
        Some(t) if TARGETS.contains(&t) => vec![t],
        Some(t) => bail!(
            "no fuzz target {t:?}; the targets are {}",
            TARGETS.join(", ")
        ),
        None => TARGETS.to_vec(),
    };
    ensure_cargo_fuzz()?;
    println!("fuzz: building the targets (nightly, sanitizers)");
    crate::run(Command::new("cargo").args([
        "+nightly",
        "fuzz",
        "build",
        "-O",
        "--fuzz-dir",
        "fuzz",
    ]))?;
    let mut results = Vec::new();
    for batch in targets.chunks(jobs.max(1)) {
        let children: Vec<_> = batch
            .iter()
            .map(|t| start(t, seconds).map(|c| (*t, c, Instant::now())))
            .collect::<Result<_>>()?;
        for (target, mut child, started) in children {
            let status = child.wait()?;
            let log = std::fs::read_to_string(log_path(target)).unwrap_or_default();
            results.push(Outcome {
                target,
                ok: status.success(),
                runs: done_runs(&log),
                seconds: started.elapsed().as_secs(),
                corpus: corpus_size(&log),
            });
        }
    }
    println!(
        "\n{:<14} {:>8} {:>14} {:>10} {:>8}  result",
        "target", "seconds", "runs", "runs/s", "corpus"
    );
    for r in &results {
        let rate = r.runs.map(|n| n / r.seconds.max(1));
        println!(
            "{:<14} {:>8} {:>14} {:>10} {:>8}  {}",
            r.target,
            r.seconds,
            r.runs.map_or("?".into(), |n| n.to_string()),
            rate.map_or("?".into(), |n| n.to_string()),
            r.corpus.map_or("?".into(), |n| n.to_string()),
            if r.ok {
                "no crash, no hang".to_string()
            } else {
                format!(
                    "FAILED: see target/fuzz/{}.log and fuzz/artifacts/{}/",
                    r.target, r.target
                )
            }
        );
    }
    if results.iter().any(|r| !r.ok) {
        bail!("a fuzz target failed");
    }
    Ok(())
}

struct Outcome<'a> {
    target: &'a str,
    ok: bool,
    runs: Option<u64>,
    seconds: u64,
    corpus: Option<u64>,
}

fn log_path(target: &str) -> std::path::PathBuf {
    root().join(format!("target/fuzz/{target}.log"))
}

/// Starts one target; its output goes straight to its log file (a pipe nobody reads while
/// another target is waited for would fill up and stall it).
fn start(target: &str, seconds: u64) -> Result<std::process::Child> {
    let scratch = root().join("target/fuzz/corpus").join(target);
    std::fs::create_dir_all(&scratch)?;
    let log = std::fs::File::create(log_path(target))?;
    println!("fuzz: {target} for {seconds} s");
    Command::new("cargo")
        .current_dir(root())
        .args([
            "+nightly",
            "fuzz",
            "run",
            "-O",
            "--fuzz-dir",
            "fuzz",
            target,
        ])
        .arg(&scratch)
        .arg(format!("fuzz/corpus/{target}"))
        .args([
            "--",
            &format!("-max_total_time={seconds}"),
            "-timeout=10",
            "-rss_limit_mb=2048",
            "-print_final_stats=1",
        ])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting cargo fuzz run {target}"))
}

/// libFuzzer's "Done 123456 runs in 600 second(s)".
fn done_runs(log: &str) -> Option<u64> {
    log.lines()
        .rev()
        .find_map(|l| l.strip_prefix("Done "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// The last status line's "corp: N/...".
fn corpus_size(log: &str) -> Option<u64> {
    log.lines()
        .rev()
        .find_map(|l| l.split("corp: ").nth(1))
        .and_then(|l| l.split('/').next())
        .and_then(|n| n.parse().ok())
}

/// cargo-fuzz, installed with cargo when missing.
fn ensure_cargo_fuzz() -> Result<()> {
    if find_in_path("cargo-fuzz").is_some() {
        return Ok(());
    }
    println!("fuzz: installing cargo-fuzz (1-2 min)");
    crate::run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))
}
