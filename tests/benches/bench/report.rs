//! The bench report: every figure with its unit, ratios with their baseline, targets marked
//! met, missed or missing (a failed measurement) with what limits them; written as JSON and Markdown, printed as a table.
use std::{fmt::Write as _, path::Path, process::Command, time::Duration};

use anyhow::Result;
use serde_json::{Value, json};

use tunnel_tests::measure::Verdict;
pub use tunnel_tests::measure::{Target, median, ratio};

use crate::Plan;

/// One measured figure.
pub struct Figure {
    pub section: &'static str,
    pub name: String,
    pub value: f64,
    pub unit: &'static str,
    /// Every round's value (the figure is their median).
    pub samples: Vec<f64>,
}

pub struct Report {
    machine: Value,
    mode: &'static str,
    figures: Vec<Figure>,
    targets: Vec<Target>,
    notes: Vec<String>,
    duration: Duration,
}

impl Report {
    pub fn new(plan: &Plan) -> Result<Report> {
        Ok(Report {
            machine: machine(),
            mode: if plan.quick { "quick" } else { "full" },
            figures: Vec::new(),
            targets: Vec::new(),
            notes: Vec::new(),
            duration: Duration::ZERO,
        })
    }

    /// Records the median of `samples` and returns it.
    pub fn figure(
        &mut self,
        section: &'static str,
        name: impl Into<String>,
        unit: &'static str,
        samples: Vec<f64>,
    ) -> f64 {
        let value = median(&samples);
        self.figures.push(Figure {
            section,
            name: name.into(),
            value,
            unit,
            samples,
        });
        value
    }

    pub fn target(&mut self, target: Target) {
        self.targets.push(target);
    }

    pub fn note(&mut self, text: impl Into<String>) {
        self.notes.push(text.into());
    }

    pub fn set_duration(&mut self, d: Duration) {
        self.duration = d;
    }

    fn json(&self) -> Value {
        json!({
            "mode": self.mode,
            "machine": self.machine,
            "duration_s": self.duration.as_secs_f64(),
            "targets": self.targets.iter().map(|t| json!({
                "name": t.name,
                "value": t.value,
                "unit": t.unit,
                "op": t.op,
                "threshold": t.threshold,
                "against": t.against,
                "met": t.verdict().json(),
            })).collect::<Vec<_>>(),
            "figures": self.figures.iter().map(|f| json!({
                "section": f.section,
                "name": f.name,
                "value": f.value,
                "unit": f.unit,
                "samples": f.samples,
            })).collect::<Vec<_>>(),
            "notes": self.notes,
        })
    }

    /// Targets (ratios first), then every figure: the stdout table.
    pub fn table(&self) -> String {
        let names = self.targets.iter().map(|t| t.name.chars().count());
        let figure_name = |f: &Figure| format!("{}: {}", f.section, f.name);
        let width = names
            .chain(self.figures.iter().map(|f| figure_name(f).chars().count()))
            .max()
            .unwrap_or(0)
            .max(20);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\n{:<width$} {:>10} {:>14}  met",
            "target", "value", "target"
        );
        for t in &self.targets {
            let _ = writeln!(
                out,
                "{:<width$} {:>10} {:>14}  {}",
                t.name,
                fmt(t.value),
                format!("{} {}", t.op, fmt(t.threshold)),
                t.verdict().word()
            );
        }
        let _ = writeln!(out, "\n{:<width$} {:>10}  unit", "figure (median)", "value");
        for f in &self.figures {
            let _ = writeln!(
                out,
                "{:<width$} {:>10}  {}",
                figure_name(f),
                fmt(f.value),
                f.unit
            );
        }
        out
    }

    fn markdown(&self) -> String {
        let mut md = String::from("# tunnel bench report\n\n");
        let m = &self.machine;
        let _ = writeln!(
            md,
            "Mode **{}**, {:.0} s. Commit `{}`, kernel `{}`, {} CPUs ({}), {}.\n",
            self.mode,
            self.duration.as_secs_f64(),
            m["commit"].as_str().unwrap_or("?"),
            m["kernel"].as_str().unwrap_or("?"),
            m["cpus"],
            m["cpu_model"].as_str().unwrap_or("?"),
            m["date"].as_str().unwrap_or("?"),
        );
        md +=
            "## Targets\n\n| target | value | target | met | against |\n|---|---:|---:|---|---|\n";
        for t in &self.targets {
            let _ = writeln!(
                md,
                "| {} | {} {} | {} {} | {} | {} |",
                t.name,
                fmt(t.value),
                t.unit,
                t.op,
                fmt(t.threshold),
                match t.verdict() {
                    Verdict::Met => "yes",
                    Verdict::Missed => "**no**",
                    Verdict::Missing => "**missing** (the measurement failed)",
                },
                t.against
            );
        }
        md += "\n## Figures (median of the rounds)\n\n| section | figure | value | unit | rounds |\n|---|---|---:|---|---|\n";
        for f in &self.figures {
            let samples: Vec<String> = f.samples.iter().map(|s| fmt(*s)).collect();
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} |",
                f.section,
                f.name,
                fmt(f.value),
                f.unit,
                samples.join(", ")
            );
        }
        if !self.notes.is_empty() {
            md += "\n## Notes\n\n";
            for n in &self.notes {
                let _ = writeln!(md, "- {n}");
            }
        }
        md
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::write(
            dir.join("report.json"),
            serde_json::to_string_pretty(&self.json())? + "\n",
        )?;
        std::fs::write(dir.join("report.md"), self.markdown())?;
        Ok(())
    }
}

/// A number with sensible precision for a table.
pub fn fmt(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn machine() -> Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu_model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let cmd = |argv: &[&str]| {
        Command::new(argv[0])
            .args(&argv[1..])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    let dirty = !cmd(&["git", "status", "--porcelain", "--untracked-files=no"]).is_empty();
    json!({
        "kernel": cmd(&["uname", "-r"]),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": cpu_model,
        "mem_total": read("/proc/meminfo").lines().next().unwrap_or("").split_whitespace().nth(1).unwrap_or("").to_owned() + " kB",
        "commit": cmd(&["git", "rev-parse", "--short", "HEAD"]) + if dirty { "+dirty" } else { "" },
        "date": cmd(&["date", "-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        "iperf3": cmd(&["iperf3", "--version"]).lines().next().unwrap_or("").to_owned(),
    })
}
