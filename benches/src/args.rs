//! What every benchmark binary reads at start besides its flags (clap): the `orch` binary.

use std::path::PathBuf;

use anyhow::ensure;

use crate::report;

/// The `orch` binary the benchmarks start: `$ORCH_BIN`, or the release build (figures from a
/// debug build would mean little).
pub fn orch_bin() -> anyhow::Result<PathBuf> {
    let bin = std::env::var_os("ORCH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| report::repo_root().join("target/release/orch"));
    ensure!(
        bin.exists(),
        "{} not found: build it with `cargo build --release -p orch-userspace`",
        bin.display()
    );
    Ok(bin)
}
