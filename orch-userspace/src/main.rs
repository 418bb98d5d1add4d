//! `orch`: see `orch --help`. Everything of substance lives in the library.

use std::{io::IsTerminal, process::ExitCode};

use clap::Parser;
use orch::{
    cli::{Cli, Command, ConfigCommand},
    config::Config,
    daemon::{self, DaemonError},
};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    match cli.command {
        Command::Config {
            command: ConfigCommand::Check { file },
        } => match Config::load(&file) {
            Ok(c) => {
                println!(
                    "{}: ok ({} services, {} backends, interfaces: {})",
                    file.display(),
                    c.services.len(),
                    c.services.iter().map(|s| s.backends.len()).sum::<usize>(),
                    c.dataplane
                        .interfaces
                        .get_ref()
                        .iter()
                        .map(|i| i.get_ref().as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Command::Daemon { config } => {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: starting the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(daemon::run(&daemon::Options { config })) {
                Ok(()) => ExitCode::SUCCESS,
                Err(DaemonError::Config(e)) => {
                    eprintln!("{e}");
                    ExitCode::from(2)
                }
                Err(e) => {
                    eprintln!(
                        "error: {}",
                        anyhow::Error::from(e)
                            .chain()
                            .map(|c| c.to_string())
                            .collect::<Vec<_>>()
                            .join(": ")
                    );
                    ExitCode::FAILURE
                }
            }
        }
    }
}
