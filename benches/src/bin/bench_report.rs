//! Assembles BENCHMARKS.md from the sections the benchmarks saved (see
//! `orch_benches::report`), with the machine they ran on and the hand-written analysis in
//! `benches/analysis.md`.
//!
//! ```text
//! target/release/bench_report [--full | --quick]
//! ```
//! `cargo xtask bench` runs it last.

use std::{fmt::Write as _, process::Command};

use anyhow::{bail, Context};
use orch_benches::report;

/// Assembles BENCHMARKS.md from the sections the benchmarks saved.
#[derive(clap::Parser)]
struct Options {
    /// The figures come from `cargo xtask bench --quick` (said at the top of the report).
    #[arg(long, conflicts_with = "full")]
    quick: bool,
    /// The figures come from a full run (the default).
    #[arg(long)]
    full: bool,
}

fn main() -> anyhow::Result<()> {
    let Options { quick, .. } = <Options as clap::Parser>::parse();
    let dir = report::results_dir();
    let mut missing = Vec::new();
    let mut sections = Vec::new();
    for name in report::SECTIONS {
        match std::fs::read_to_string(dir.join(format!("{name}.md"))) {
            Ok(text) => sections.push(text),
            Err(_) => missing.push(name),
        }
    }
    if !missing.is_empty() {
        bail!(
            "no results for {} in {}: run those benchmarks first (`cargo xtask bench` runs all)",
            missing.join(", "),
            dir.display()
        );
    }
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let mut md = String::from("# Benchmarks\n\n");
    writeln!(
        md,
        "Every figure is a ratio against a baseline measured in the same run (the floor \
         program, the backends reached directly, the peers), so it holds on a noisy shared \
         machine. Written by `sudo -E cargo xtask bench`{}, which installs the peers, builds in \
         release mode and runs each benchmark below; each section gives the command that \
         reproduces it alone.\n",
        if quick { " --quick" } else { "" }
    )?;
    writeln!(md, "Machine: {}. Date: {date}.\n", report::machine())?;
    if quick {
        writeln!(
            md,
            "**Quick run**: fewer rounds and repetitions than the default; for checking the \
             pipeline, not for quoting.\n"
        )?;
    }
    for s in &sections {
        md.push_str(s.trim_end());
        md.push_str("\n\n");
    }
    let analysis = report::repo_root().join("benches/analysis.md");
    let text = std::fs::read_to_string(&analysis)
        .with_context(|| format!("reading {}", analysis.display()))?;
    md.push_str(text.trim_end());
    md.push('\n');
    let path = report::repo_root().join("BENCHMARKS.md");
    std::fs::write(&path, md).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}
