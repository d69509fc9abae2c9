//! `--profile`: a system-wide `perf record -g` around each measured run, so that a missed
//! target comes with where the CPU went. Each run leaves `<dir>/<label>.data` and
//! `<dir>/<label>.txt` (the hottest symbols, self time, with the binary each is in).
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

/// Where profiles go; unset when `--profile` was not given.
static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Turns profiling on, into `dir`.
pub fn enable(dir: PathBuf) -> Result<()> {
    {
        let found = Command::new("perf")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            bail!("--profile needs perf (Debian: apt-get install linux-perf)");
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let _ = DIR.set(dir);
    Ok(())
}

/// Whether `--profile` was given. Profiled runs are extra runs after the measured ones, so
/// perf's own cost is in no reported figure.
pub fn enabled() -> bool {
    DIR.get().is_some()
}

/// Runs `f` under `perf record` as `label` (just runs it when profiling is off).
pub fn run<T>(label: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let Some(dir) = DIR.get() else { return f() };
    let data = dir.join(format!("{}.data", slug(label)));
    let recorder = Recorder::start(&data)?;
    let out = f();
    recorder.stop()?;
    summarize(&data, &data.with_extension("txt"))?;
    out
}

/// `perf record -a -g` until stopped.
struct Recorder(Child);

impl Recorder {
    fn start(data: &Path) -> Result<Recorder> {
        let child = Command::new("perf")
            .args(["record", "-a", "-g", "-F", "2000", "-q", "-o"])
            .arg(data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting perf record")?;
        // perf needs a moment to open its events on every CPU.
        std::thread::sleep(std::time::Duration::from_millis(300));
        Ok(Recorder(child))
    }

    fn stop(mut self) -> Result<()> {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT)?;
        self.0.wait()?;
        Ok(())
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The symbols with at least 0.5% of the samples, self time (`perf report --no-children`).
fn summarize(data: &Path, txt: &Path) -> Result<()> {
    let out = Command::new("perf")
        .args([
            "report",
            "--no-children",
            "--sort",
            "dso,sym",
            "--stdio",
            "-g",
            "none",
            "--percent-limit",
            "0.5",
            "-i",
        ])
        .arg(data)
        .output()
        .context("running perf report")?;
    // perf pads its columns to the widest symbol; keep the lines readable.
    let text: String = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| format!("{}\n", l.trim_end()))
        .collect();
    std::fs::write(txt, text).with_context(|| format!("writing {}", txt.display()))
}

/// A file-name form of a label.
fn slug(label: &str) -> String {
    let mut s = String::new();
    for c in label.chars() {
        if c.is_ascii_alphanumeric() {
            s.push(c.to_ascii_lowercase());
        } else if !s.ends_with('-') {
            s.push('-');
        }
    }
    s.trim_matches('-').to_string()
}
