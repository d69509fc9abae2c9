//! The eBPF programs' aya-log calls (issue "operations", `-vv`): every program and every log
//! program passes the verifier with logging on, and with it off the verifier removes the log
//! calls (what stays, on drop and slow paths only, is the read of the switch).
//!
//! A test binary of its own: the log level is a process-wide setting of the loader.
use std::path::Path;

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf,
    programs::{Program, ProgramInfo},
};
use tunnel_common::names::{ALL_PROGRAMS, LOG_PROGRAMS, TAIL_PROGRAMS};
use tunnel_ctl::dataplane;
use tunnel_tests::Lab;

type Sizes = Vec<(&'static str, u32, u32)>;

/// Loads every program of a fresh object; returns (name, verified instructions, translated
/// bytes) per program, and the same for the log programs the loader installed (none when
/// logging is off).
fn load_all(lab: &mut Lab, role: &str) -> Result<(Sizes, Sizes)> {
    let instance = lab.instance(role);
    let pin_dir = Path::new("/sys/fs/bpf/tunnel").join(&instance);
    let mut ebpf: Ebpf = dataplane::load(&pin_dir)?;
    let mut sizes = Vec::new();
    for &name in ALL_PROGRAMS.iter().rev() {
        let program = ebpf
            .program_mut(name)
            .with_context(|| format!("no program {name}"))?;
        match program {
            // The loader installed the tail-called programs already (verified then).
            Program::SchedClassifier(_) if TAIL_PROGRAMS.contains(&name) => Ok(()),
            Program::SchedClassifier(p) => p.load(),
            Program::Xdp(p) => p.load(),
            other => bail!("{name}: unexpected program type {:?}", other.prog_type()),
        }
        .with_context(|| format!("the verifier rejected {name}"))?;
        sizes.push(size(&ebpf, name)?);
    }
    let mut loggers = Vec::new();
    for &name in LOG_PROGRAMS {
        if ebpf.program(name).is_some_and(|p| p.fd().is_ok()) {
            loggers.push(size(&ebpf, name)?);
        }
    }
    Ok((sizes, loggers))
}

fn size(ebpf: &Ebpf, name: &'static str) -> Result<(&'static str, u32, u32)> {
    let info: ProgramInfo = ebpf.program(name).expect("present").info()?;
    Ok((
        name,
        info.verified_instruction_count().unwrap_or(0),
        info.size_translated().unwrap_or(0),
    ))
}

#[test]
fn every_program_verifies_with_logging_on_and_sheds_its_log_calls_when_off() -> Result<()> {
    let mut lab = Lab::new()?;
    let (off, no_loggers) = load_all(&mut lab, "logoff")?;
    assert!(
        no_loggers.is_empty(),
        "log programs loaded with logging off"
    );
    dataplane::log_ebpf_debug();
    let (on, loggers) = load_all(&mut lab, "logon")?;
    eprintln!("program              verified insns (off / -vv)   translated bytes (off / -vv)");
    for ((name, off_insns, off_bytes), (_, on_insns, on_bytes)) in off.iter().zip(&on) {
        eprintln!("{name:<20} {off_insns:>10} / {on_insns:<10}      {off_bytes:>8} / {on_bytes}");
    }
    for (name, insns, bytes) in &loggers {
        eprintln!(
            "{name:<20} {:>10}   {insns:<10}      {:>8}   {bytes}",
            "-", "-"
        );
    }
    assert_eq!(
        loggers.len(),
        LOG_PROGRAMS.len(),
        "every log program installed"
    );
    // The programs that log must carry their log calls when logging is on, and none of it
    // when it is off (the branch on the frozen level is dead, and the verifier removes it).
    for name in LOG_PROGRAMS.iter().map(|l| l.trim_start_matches("log_")) {
        let (_, _, off_bytes) = off.iter().find(|p| p.0 == name).expect("loaded");
        let (_, _, on_bytes) = on.iter().find(|p| p.0 == name).expect("loaded");
        assert!(
            on_bytes > off_bytes,
            "{name}: {on_bytes} B with logging on, {off_bytes} B off: the log calls are not in it"
        );
    }
    Ok(())
}
