//! `orch`: see `orch --help`. Everything of substance lives in the library.

use std::{io::IsTerminal, process::ExitCode};

use clap::Parser;
use orch::{
    cli::{self, exit, Cli, Command, ConfigCommand, LogFormat},
    config::Config,
    daemon::{self, DaemonError},
};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Human => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        // Fields at the top level, next to the message: what log shippers index.
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }

    let opts = &cli.client;
    if let Some(request) = cli::request(&cli.command) {
        let code = cli::run_client(&request, opts);
        if let Command::Backend {
            command:
                cli::BackendCommand::Drain {
                    service,
                    address,
                    wait: true,
                    timeout,
                },
            ..
        } = &cli.command
        {
            if code == ExitCode::from(exit::OK) {
                return cli::wait_drained(
                    opts,
                    service,
                    *address,
                    std::time::Duration::from_secs(*timeout),
                );
            }
        }
        return code;
    }
    match cli.command {
        Command::Config {
            command: ConfigCommand::Check { file },
        } => check_config(&file),
        Command::Daemon {
            config,
            detach_on_exit,
        } => run_daemon(daemon::Options {
            config,
            detach_on_exit,
        }),
        Command::Completions { shell } => cli::print_completions(shell),
        Command::Man => cli::print_man(),
        _ => unreachable!("client commands returned above"),
    }
}

fn check_config(file: &std::path::Path) -> ExitCode {
    match Config::load(file) {
        Ok(c) => {
            println!(
                "{}: ok ({} services, {} backends, interfaces: {})",
                file.display(),
                c.services.len(),
                c.services.iter().map(|s| s.backends.len()).sum::<usize>(),
                c.interfaces.join(", ")
            );
            ExitCode::from(exit::OK)
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(exit::REFUSED)
        }
    }
}

fn run_daemon(opts: daemon::Options) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    match runtime.block_on(daemon::run(&opts)) {
        Ok(()) => ExitCode::from(exit::OK),
        Err(DaemonError::Config(e)) => {
            eprintln!("{e}");
            ExitCode::from(exit::REFUSED)
        }
        Err(e) => {
            eprintln!("error: {:#}", anyhow::Error::from(e));
            ExitCode::from(exit::FAILURE)
        }
    }
}
