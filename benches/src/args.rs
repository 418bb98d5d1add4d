//! What every benchmark binary reads at start: numeric flags and the `orch` binary to run.

use std::path::PathBuf;

use anyhow::{ensure, Context};

use crate::report;

/// The whole number after `flag` on the command line.
pub fn number(args: &mut impl Iterator<Item = String>, flag: &str) -> anyhow::Result<u64> {
    args.next()
        .with_context(|| format!("{flag} needs a value"))?
        .parse()
        .with_context(|| format!("{flag} takes a whole number"))
}

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

#[cfg(test)]
mod tests {
    use super::number;

    #[test]
    fn numbers_and_their_errors() {
        let mut args = ["12", "x"].into_iter().map(String::from);
        assert_eq!(number(&mut args, "--n").unwrap(), 12);
        let err = number(&mut args, "--n").unwrap_err();
        assert!(
            format!("{err:#}").contains("--n takes a whole number"),
            "{err:#}"
        );
        let err = number(&mut args, "--n").unwrap_err();
        assert!(format!("{err:#}").contains("--n needs a value"), "{err:#}");
    }
}
