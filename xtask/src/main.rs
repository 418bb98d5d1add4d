//! `cargo xtask`: everything a newcomer runs.
//!
//! - `cargo xtask run`: install what the build needs, build, and start orch in a demo lab
//!   (or, with `--config`, on this host's interfaces);
//! - `cargo xtask test`: every check and every test tier, as CI runs them;
//! - `cargo xtask bench`: every benchmark against its baseline, written to BENCHMARKS.md;
//! - `cargo xtask install` / `uninstall`: orch as a systemd service on this host;
//! - `cargo xtask prereqs`: only the installation step.

mod bench;
mod install;
mod prereqs;
mod run;
mod test;
mod util;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, run and test orch")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install missing prerequisites (rust-src, LLVM, bpf-linker, iproute2, nftables, protoc,
    /// etcd).
    Prereqs,
    /// Build orch and run it. Without --config: a demo lab in network namespaces (a client,
    /// orch, three backends) with traffic that shows connections spread round-robin.
    Run {
        /// Run the daemon on this host with this config instead of the demo lab.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Demo only: exit after the demo traffic instead of waiting for Ctrl-C.
        #[arg(long)]
        once: bool,
        /// Build with optimisations.
        #[arg(long)]
        release: bool,
    },
    /// Run formatting and lint checks, then every test tier (unit, packet, end-to-end).
    Test {
        /// Skip `cargo fmt --check` and clippy.
        #[arg(long)]
        no_lint: bool,
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
    /// Install orch as a systemd service: the binary, its manual page and completions, an
    /// example /etc/orch/orch.toml (an existing one is kept), the orch user and group and
    /// the unit. Does not start it: name this host's interfaces in the config first.
    Install {
        /// Install under this directory instead of / (an image, a test).
        #[arg(long, default_value = "/")]
        root: PathBuf,
        /// Install this binary instead of building one.
        #[arg(long)]
        binary: Option<PathBuf>,
    },
    /// Undo `install`: stop and disable the service, remove what install wrote and the
    /// data plane's pins. Keeps the config, the registry and the orch user and group.
    Uninstall {
        /// Uninstall from this directory instead of /.
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
    /// Install the peers (wrk, nginx, HAProxy, nftables), build in release mode, run every
    /// benchmark and write BENCHMARKS.md with its charts. Needs root; about 15 minutes.
    Bench {
        /// Fewer rounds and repetitions (about 4 minutes): to check the pipeline, not for
        /// figures to quote.
        #[arg(long)]
        quick: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Prereqs => prereqs::ensure(),
        Cmd::Run {
            config,
            once,
            release,
        } => run::run(config, once, release),
        Cmd::Test {
            no_lint,
            cargo_args,
        } => test::test(!no_lint, &cargo_args),
        Cmd::Bench { quick } => bench::bench(quick),
        Cmd::Install { root, binary } => install::install(&root, binary),
        Cmd::Uninstall { root } => install::uninstall(&root),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The whole chain on one line, without a backtrace: each layer says what failed.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
