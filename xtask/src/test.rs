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
    step(
        "cargo test: unit, packet (BPF_PROG_TEST_RUN) and end-to-end (netns) tiers",
        || {
            util::run(
                util::cargo()
                    .arg("test")
                    .args(cargo_args)
                    .env("ORCH_BIN", &bin),
            )
        },
    )
}
