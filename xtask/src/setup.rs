//! `cargo xtask setup`: installs what a fresh machine lacks, and nothing else.
//!
//! Checks are cheap (a few process spawns), so every other xtask command runs them first.
use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, anyhow, bail};

/// bpf-linker release known to work with the pinned aya versions.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Commands the tests and the demo use → the Debian package that provides each.
const DEBIAN_TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("nsenter", "util-linux"),
    ("sysctl", "procps"),
    ("ping", "iputils-ping"),
    ("iperf3", "iperf3"),
    ("tcpdump", "tcpdump"),
    ("traceroute", "traceroute"),
    ("systemd-analyze", "systemd"),
    ("nft", "nftables"),
    ("bpftool", "bpftool"),
    // GRO on a veth (its NAPI) lets it take XDP-redirected frames: the --xdp test and bench.
    ("ethtool", "ethtool"),
    // The bench counts transmits per device with `perf stat` on a tracepoint.
    ("perf", "linux-perf"),
];

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `cargo xtask setup`: report every check.
    Verbose,
    /// Before another command: silent unless something is installed.
    Quiet,
}

/// Whether installers print everything they say (`cargo xtask -v ...`); otherwise each step
/// is one line and its output is shown only when it fails.
static SHOW_OUTPUT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn set_show_output(show: bool) {
    SHOW_OUTPUT.store(show, std::sync::atomic::Ordering::Relaxed);
}

/// One install step on one line: `setup: <what> (<why>) ... done in N s`. The command's
/// output goes to a log file under target/ and is printed only if it fails (or with -v).
fn step(what: &str, why: &str, cmd: &mut Command) -> Result<()> {
    let show = SHOW_OUTPUT.load(std::sync::atomic::Ordering::Relaxed);
    step_to(
        &mut std::io::stdout(),
        &mut std::io::stderr(),
        what,
        why,
        cmd,
        show,
    )
}

/// [`step`], writing its line (and a failed command's output) to `out` and `err`.
fn step_to(
    out: &mut dyn std::io::Write,
    err: &mut dyn std::io::Write,
    what: &str,
    why: &str,
    cmd: &mut Command,
    show: bool,
) -> Result<()> {
    let started = Instant::now();
    if show {
        println!("setup: {what} ({why})");
        crate::run(cmd)?;
        println!(
            "setup: {what}: done in {:.1} s",
            started.elapsed().as_secs_f32()
        );
        return Ok(());
    }
    let _ = write!(out, "setup: {what} ({why}) ... ");
    let _ = out.flush();
    let result = cmd
        .current_dir(crate::root())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    let took = started.elapsed().as_secs_f32();
    if result.status.success() {
        let _ = writeln!(out, "done in {took:.1} s");
        return Ok(());
    }
    let _ = writeln!(out, "FAILED after {took:.1} s; its output:");
    let _ = out.write_all(&result.stdout);
    let _ = err.write_all(&result.stderr);
    bail!("{what}: {cmd:?} failed: {}", result.status)
}

pub fn run(mode: Mode) -> Result<()> {
    let start = Instant::now();
    add_cargo_bin_to_path();
    let mut installed: Vec<String> = Vec::new();

    let say = |msg: &str| {
        if mode == Mode::Verbose {
            println!("setup: {msg}");
        }
    };

    if !nightly_installed()? {
        step(
            "installing the nightly toolchain with rust-src",
            "the eBPF programs build with build-std=core",
            Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ]),
        )?;
        installed.push("nightly toolchain".into());
    } else {
        say("nightly toolchain: present");
    }

    let sysroot = nightly_sysroot()?;
    if !sysroot
        .join("lib/rustlib/src/rust/library/core/Cargo.toml")
        .exists()
    {
        step(
            "installing rust-src for nightly",
            "the eBPF programs build with build-std=core",
            Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
        )?;
        installed.push("rust-src".into());
    } else {
        say("nightly rust-src: present");
    }

    match bpf_linker_version() {
        Some(v) => say(&format!("bpf-linker: {v}")),
        None => {
            install_bpf_linker(&sysroot)?;
            installed.push(format!("bpf-linker {BPF_LINKER_VERSION}"));
        }
    }

    let missing: Vec<&str> = DEBIAN_TOOLS
        .iter()
        .filter(|(cmd, _)| find_in_path(cmd).is_none())
        .map(|&(_, pkg)| pkg)
        .collect();
    if missing.is_empty() {
        say(&format!(
            "test tools ({}): present",
            DEBIAN_TOOLS
                .iter()
                .map(|(c, _)| *c)
                .collect::<Vec<_>>()
                .join(", ")
        ));
    } else {
        install_debian(&missing)?;
        installed.extend(missing.iter().map(|p| format!("apt:{p}")));
    }

    // The shared lease store's tests run a throwaway PostgreSQL cluster (initdb + postgres
    // as the postgres user), from Debian's packages: the server is not on PATH there.
    if postgres_server_present() {
        say("PostgreSQL server: present");
    } else {
        install_debian(&["postgresql"])?;
        installed.push("apt:postgresql".into());
    }

    // The tests parse /metrics with the Prometheus project's own (Python) parser.
    if Command::new("python3")
        .args(["-c", "import prometheus_client.openmetrics.parser"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
    {
        say("python prometheus-client: present");
    } else {
        step(
            "pip install prometheus-client",
            "the tests parse /metrics with the Prometheus project's parser",
            Command::new("python3").args(["-m", "pip", "install", "-q", "prometheus-client"]),
        )?;
        installed.push("pip:prometheus-client".into());
    }

    let took = start.elapsed().as_secs_f32();
    if installed.is_empty() {
        say(&format!(
            "nothing to install, everything is present ({took:.1} s)"
        ));
    } else {
        println!("setup: installed {} ({took:.1} s)", installed.join(", "));
    }
    Ok(())
}

/// `cargo install` puts bpf-linker in $CARGO_HOME/bin; make sure children find it there even
/// when the caller's PATH lacks it.
fn add_cargo_bin_to_path() {
    let cargo_bin = cargo_home().join("bin");
    let path = env::var_os("PATH").unwrap_or_default();
    if !env::split_paths(&path).any(|p| p == cargo_bin) {
        let mut paths: Vec<PathBuf> = vec![cargo_bin];
        paths.extend(env::split_paths(&path));
        if let Ok(joined) = env::join_paths(paths) {
            // SAFETY: xtask is single-threaded at this point.
            unsafe { env::set_var("PATH", joined) };
        }
    }
}

fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo")
        })
}

pub fn find_in_path(cmd: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> =
        env::split_paths(&env::var_os("PATH").unwrap_or_default()).collect();
    // Root's tools live in sbin, which a non-login PATH may lack.
    dirs.extend(["/usr/sbin", "/sbin"].map(PathBuf::from));
    dirs.into_iter().map(|d| d.join(cmd)).find(|p| p.is_file())
}

fn nightly_installed() -> Result<bool> {
    let out = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .context("running rustup (is rustup installed?)")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.starts_with("nightly")))
}

fn nightly_sysroot() -> Result<PathBuf> {
    let out = Command::new("rustc")
        .args(["+nightly", "--print", "sysroot"])
        .output()
        .context("running rustc +nightly")?;
    if !out.status.success() {
        bail!(
            "rustc +nightly --print sysroot: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// The installed bpf-linker's version, if it runs (it links nightly's LLVM dynamically, so a
/// nightly update can break it; then it is reinstalled).
fn bpf_linker_version() -> Option<String> {
    let out = Command::new("bpf-linker").arg("--version").output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The recipe from DEVELOPERS.md: build bpf-linker against the LLVM that ships with nightly.
fn install_bpf_linker(sysroot: &Path) -> Result<()> {
    let verbose = Command::new("rustc").args(["+nightly", "-vV"]).output()?;
    let verbose = String::from_utf8_lossy(&verbose.stdout);
    let llvm_major = verbose
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .ok_or_else(|| anyhow!("no LLVM version in `rustc +nightly -vV`"))?
        .to_owned();
    let lib_dir = sysroot.join("lib");
    // The real shared object (libLLVM.so.22.1-rust-...), not the libLLVM-22-rust-*.so linker
    // script next to it.
    let libllvm = std::fs::read_dir(&lib_dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("libLLVM.so.{llvm_major}.")))
        })
        .ok_or_else(|| anyhow!("no libLLVM.so.{llvm_major}.* in {}", lib_dir.display()))?;
    let prefix = env::temp_dir().join(format!("tunnel-llvm-{llvm_major}"));
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&libllvm, &link)?;
    let mut rustflags = OsString::from("-C link-arg=-Wl,-rpath,");
    rustflags.push(lib_dir.as_os_str());
    step(
        &format!("building bpf-linker {BPF_LINKER_VERSION} against nightly's LLVM {llvm_major}"),
        "it links the eBPF object; 1-3 min",
        Command::new("cargo")
            .args([
                "install",
                "--force",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                &format!("llvm-{llvm_major}"),
            ])
            .env("LLVM_PREFIX", &prefix)
            .env("RUSTFLAGS", rustflags),
    )?;
    bpf_linker_version().ok_or_else(|| anyhow!("bpf-linker was installed but does not run"))?;
    Ok(())
}

/// Whether initdb and postgres are installed (Debian: /usr/lib/postgresql/<version>/bin), with
/// the postgres user they run as.
fn postgres_server_present() -> bool {
    let in_lib = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .any(|v| v.path().join("bin/initdb").exists() && v.path().join("bin/postgres").exists());
    let user = std::fs::read_to_string("/etc/passwd")
        .is_ok_and(|p| p.lines().any(|l| l.starts_with("postgres:")));
    (in_lib || (find_in_path("initdb").is_some() && find_in_path("postgres").is_some())) && user
}

fn install_debian(packages: &[&str]) -> Result<()> {
    if find_in_path("apt-get").is_none() {
        bail!(
            "missing tools; install these packages with your package manager: {}",
            packages.join(" ")
        );
    }
    step(
        "apt-get update",
        "package lists for the test tools",
        Command::new("apt-get")
            .args(["update", "-q"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    step(
        &format!("apt-get install {}", packages.join(" ")),
        "commands the tests and the demo run",
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    }

    #[test]
    fn a_step_is_one_line_and_shows_its_output_only_when_it_fails() {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        step_to(
            &mut out,
            &mut err,
            "installing x",
            "for y",
            &mut sh("echo noisy; echo noisy >&2"),
            false,
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("setup: installing x (for y) ... done in "),
            "{text}"
        );
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(!text.contains("noisy") && err.is_empty(), "{text}");

        let (mut out, mut err) = (Vec::new(), Vec::new());
        let e = step_to(
            &mut out,
            &mut err,
            "installing z",
            "for w",
            &mut sh("echo why-it-failed; echo detail >&2; exit 3"),
            false,
        )
        .unwrap_err();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("FAILED") && text.contains("why-it-failed"),
            "{text}"
        );
        assert_eq!(String::from_utf8(err).unwrap(), "detail\n");
        assert!(e.to_string().contains("installing z"), "{e}");
    }
}
