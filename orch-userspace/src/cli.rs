//! The `orch` command line.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// orch: an eBPF/XDP layer-4 load balancer.
#[derive(Debug, Parser)]
#[command(
    name = "orch",
    version,
    after_help = "Exit codes: 0 success, 1 runtime error, 2 invalid usage or configuration.\n\
                  Logs go to stderr; RUST_LOG (e.g. RUST_LOG=orch=debug) sets the level."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: load the XDP program, install the services from the config file,
    /// attach to its interfaces, and detach on SIGINT or SIGTERM. Needs root (CAP_BPF,
    /// CAP_NET_ADMIN).
    #[command(after_help = "Example:\n  sudo orch daemon --config /etc/orch/orch.toml")]
    Daemon {
        /// The configuration file (TOML).
        #[arg(long, short, default_value = "/etc/orch/orch.toml")]
        config: PathBuf,
    },
    /// Work with configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a configuration file and print every problem with its line and column.
    /// Changes nothing; needs no privileges.
    #[command(after_help = "Example:\n  orch config check examples/orch.toml")]
    Check {
        /// The file to check.
        file: PathBuf,
    },
}
