//! `cargo xtask test`: the checks and every test tier, as CI runs them.

use anyhow::bail;

use crate::{
    prereqs, run,
    util::{self, step},
};

pub fn test(lint: bool, cargo_args: &[String]) -> anyhow::Result<()> {
    prereqs::ensure()?;
    if lint {
        step("cargo fmt --check", || {
            util::run(util::cargo().args(["fmt", "--all", "--check"]))
        })?;
        step("clippy, host crates (-D warnings)", || {
            util::run(util::cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))
        })?;
        step(
            "clippy, eBPF crate for the BPF target (-D warnings)",
            || {
                util::run(
                    util::cargo()
                        .args([
                            "clippy",
                            "--package",
                            "orch-ebpf",
                            "--release",
                            "--target",
                            "bpfel-unknown-none",
                            "-Z",
                            "build-std=core",
                            "--",
                            "-D",
                            "warnings",
                        ])
                        // -Z flags on the stable toolchain, as the eBPF build itself does.
                        .env("RUSTC_BOOTSTRAP", "1"),
                )
            },
        )?;
    }
    let bin = step("building the orch binary the end-to-end tests run", || {
        run::build(false)
    })?;
    if !util::is_root() {
        if util::in_ci() {
            bail!("CI=true but not root: the packet and end-to-end tests need root and must not be skipped in CI");
        }
        eprintln!(
            "note: not root, so the packet and end-to-end tests will skip; run `sudo -E cargo xtask test` for all tiers"
        );
    }
    let (passed, failed) = step(
        "cargo test: unit, packet (BPF_PROG_TEST_RUN) and end-to-end (netns) tiers",
        || cargo_test(cargo_args, &bin),
    )?;
    // One closing line over every test binary (cargo prints one per binary).
    println!("tests: {passed} passed, {failed} failed");
    Ok(())
}

/// Runs `cargo test`, echoing its output, and adds up the per-binary results.
fn cargo_test(cargo_args: &[String], bin: &std::path::Path) -> anyhow::Result<(u64, u64)> {
    use std::io::{BufRead, BufReader};
    let mut child = util::cargo()
        .arg("test")
        .args(cargo_args)
        .env("ORCH_BIN", bin)
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let (mut passed, mut failed) = (0, 0);
    let stdout = child.stdout.take().expect("piped stdout");
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        // "test result: ok. 9 passed; 0 failed; 0 ignored; ..."
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(['.', ';']) {
                let mut words = part.split_whitespace();
                if let (Some(n), Some(what)) = (words.next(), words.next()) {
                    match (n.parse::<u64>(), what) {
                        (Ok(n), "passed") => passed += n,
                        (Ok(n), "failed") => failed += n,
                        _ => {}
                    }
                }
            }
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("cargo test failed ({status}): {failed} failed, {passed} passed");
    }
    Ok((passed, failed))
}
