//! The `orch` command line: its grammar (clap) and how answers are printed.
//!
//! Every command except `daemon` and `config check` is a client of the admin API
//! ([`crate::api`]): it sends one request over the Unix socket and prints the answer as a
//! table for people or, with `--json`, as the API's JSON for scripts. Options (`--socket`,
//! `--json`, `--log-format`) go anywhere on the line.
//!
//! - this file: the grammar;
//! - [`request`]: which API request each command stands for;
//! - [`render`]: answers as text for people;
//! - [`drain`]: `backend drain --wait`.

mod drain;
mod render;
mod request;

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand};

pub use drain::wait_drained;
pub use render::render;
pub use request::request;

use crate::{
    api::{
        client::{self, ClientError},
        BackendSpec, ErrorKind, Request,
    },
    model::{CheckKind, HealthCheck, Protocol, Scheduler},
};

/// Exit codes, as documented in `orch --help` and the README.
pub mod exit {
    /// Done.
    pub const OK: u8 = 0;
    /// A runtime failure: the daemon is unreachable, or failed internally.
    pub const FAILURE: u8 = 1;
    /// Invalid usage, configuration or input; or the request was refused (unknown service,
    /// duplicate, conflict, over capacity). Nothing was changed.
    pub const REFUSED: u8 = 2;
    /// `backend drain --wait` timed out with connections left (the backend stays draining).
    pub const TIMED_OUT: u8 = 3;
}

/// An eBPF layer-4 load balancer: a kernel data plane (XDP, TC) and its daemon.
#[derive(Debug, Parser)]
#[command(
    name = "orch",
    version,
    after_help = "Exit codes: 0 success; 1 runtime error (daemon unreachable, internal failure); \
                  2 invalid usage, configuration or input, or a refused request (nothing changed).\n\
                  Logs go to stderr; RUST_LOG (e.g. RUST_LOG=orch=debug) sets the level, \
                  --log-format json makes them machine-readable."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    pub client: ClientOpts,
    /// Log format on stderr: `human`, or `json` (one object per line, for log shippers).
    #[arg(long, global = true, env = "ORCH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
}

/// How logs are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One readable line per event (colored on a terminal).
    Human,
    /// One JSON object per line: timestamp, level, target, fields, message.
    Json,
}

/// Options of every command that talks to the daemon.
#[derive(Debug, Args, Clone)]
pub struct ClientOpts {
    /// The daemon's admin socket.
    #[arg(long, global = true, env = "ORCH_SOCKET", default_value = crate::config::defaults::SOCKET)]
    pub socket: PathBuf,
    /// Print the API's JSON answer instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: load (or take over) the XDP data plane, install the services of the
    /// config file and the registry, attach, and serve the admin API. Needs root.
    #[command(
        after_help = "Examples:\n  sudo orch daemon --config /etc/orch/orch.toml\n  \
                            sudo orch daemon --config demo.toml --detach-on-exit\n\n\
                            Stopping the daemon leaves the data plane running: connections keep \
                            flowing, and the next daemon takes it over without a dropped packet."
    )]
    Daemon {
        /// The configuration file (TOML). Watched: edits apply within a second; SIGHUP
        /// reloads too.
        #[arg(long, short, default_value = "/etc/orch/orch.toml")]
        config: PathBuf,
        /// On exit, detach from every interface and remove the pinned maps, leaving nothing
        /// behind (established connections through orch then break).
        #[arg(long)]
        detach_on_exit: bool,
    },
    /// The daemon's state: uptime, interfaces, services, reloads.
    #[command(after_help = "Example:\n  orch status")]
    Status,
    /// Register, inspect and remove services.
    Service {
        #[command(subcommand)]
        command: ServiceCommand,
    },
    /// Add, remove, drain and enable backends.
    Backend {
        #[command(subcommand)]
        command: BackendCommand,
    },
    /// Where the data plane steers a flow (or would steer a new one), and why.
    #[command(
        after_help = "Examples:\n  orch explain tcp 198.18.0.2:40000 198.19.0.1:80\n  \
                            orch explain udp '[2001:db8::2]:5353' '[2001:db8:ff::1]:53' --json\n\n\
                            An existing connection-table entry decides an established flow. A new \
                            one takes the next round-robin slot of the CPU that receives its first \
                            packet: every CPU's choice is listed, with the backends' health and \
                            breaker state."
    )]
    Explain {
        /// tcp or udp.
        #[arg(value_parser = parse_protocol)]
        protocol: Protocol,
        /// The client's address and port (IPv6 in brackets).
        client: SocketAddr,
        /// The VIP and port the client connects to.
        vip: SocketAddr,
    },
    /// The hosts of the cluster (with `[cluster]` in the config).
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Work with configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Print a shell completion script for orch.
    #[command(
        after_help = "Examples:\n  orch completions bash > /etc/bash_completion.d/orch\n  \
                            orch completions zsh > \"${fpath[1]}/_orch\""
    )]
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print orch's manual page (roff), generated from this command line's definition.
    #[command(after_help = "Example:\n  orch man > /usr/local/share/man/man1/orch.1")]
    Man,
}

#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Register a service at VIP:PORT.
    #[command(after_help = "Examples:\n  orch service add web 198.19.0.1:80\n  \
                            orch service add dns 198.19.0.1:53 --protocol udp --backend 198.18.1.2:53\n  \
                            orch service add web6 '[2001:db8:ff::1]:80'")]
    Add {
        /// Name: 1-63 characters of a-z A-Z 0-9 . _ -
        name: String,
        /// The virtual address and port clients connect to (IPv6 in brackets).
        vip: SocketAddr,
        #[arg(long, short, default_value = "tcp", value_parser = parse_protocol)]
        protocol: Protocol,
        /// A first backend, ADDR:PORT[@WEIGHT]; repeat for more.
        #[arg(long = "backend", short, value_parser = parse_backend_spec)]
        backends: Vec<BackendSpec>,
        /// Health check: tcp (connect), http or http:/PATH (GET, expects 200), or none.
        /// Default: tcp for TCP services, none for UDP. Timings use the documented defaults;
        /// set them in the API's `check` object for more.
        #[arg(long, value_parser = parse_check)]
        check: Option<HealthCheck>,
        /// How new connections pick a backend: round-robin (weighted, the default) or
        /// maglev (consistent hashing of the flow: the same backend through every orch host).
        #[arg(long, default_value = "round-robin")]
        scheduler: Scheduler,
    },
    /// Remove a registered service and its backends.
    #[command(alias = "remove", after_help = "Example:\n  orch service rm web")]
    Rm { name: String },
    /// List every service (config file and registry).
    #[command(alias = "ls", after_help = "Example:\n  orch service list --json")]
    List,
    /// Show one service and its backends.
    #[command(after_help = "Example:\n  orch service show web")]
    Show { name: String },
}

#[derive(Debug, Subcommand)]
pub enum BackendCommand {
    /// Add a backend to a registered service.
    #[command(after_help = "Example:\n  orch backend add web 198.18.1.2:8080 --weight 2")]
    Add {
        service: String,
        address: SocketAddr,
        /// Relative share of new connections (0-10000; 0 takes none).
        #[arg(long, short, default_value_t = 1)]
        weight: u32,
    },
    /// Remove a backend from a registered service.
    #[command(
        alias = "remove",
        after_help = "Example:\n  orch backend rm web 198.18.1.2:8080"
    )]
    Rm {
        service: String,
        address: SocketAddr,
    },
    /// Stop new connections to a backend; established ones continue. With --wait, report
    /// the live connections until none is left (exit 0) or the timeout passes (exit 3).
    #[command(after_help = "Examples:\n  orch backend drain web 198.18.1.2:8080\n  \
                            orch backend drain web 198.18.1.2:8080 --wait --timeout 600")]
    Drain {
        service: String,
        address: SocketAddr,
        /// Wait until the backend has no live connection left.
        #[arg(long)]
        wait: bool,
        /// Seconds to wait at most.
        #[arg(long, default_value_t = 300, requires = "wait")]
        timeout: u64,
    },
    /// Let a drained or disabled backend take new connections again.
    #[command(after_help = "Example:\n  orch backend enable web 198.18.1.2:8080")]
    Enable {
        service: String,
        address: SocketAddr,
    },
    /// Take a backend out of its service without removing it.
    #[command(after_help = "Example:\n  orch backend disable web 198.18.1.2:8080")]
    Disable {
        service: String,
        address: SocketAddr,
    },
    /// List the backends of one service, or of all.
    #[command(alias = "ls", after_help = "Example:\n  orch backend list web")]
    List { service: Option<String> },
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Every host with a live lease in etcd: name, address, version, when last seen.
    #[command(alias = "ls", after_help = "Example:\n  orch node list")]
    List,
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

fn parse_protocol(s: &str) -> Result<Protocol, String> {
    s.parse()
}

/// `tcp`, `none`, `http` or `http:/PATH`.
fn parse_check(s: &str) -> Result<HealthCheck, String> {
    let (kind, path) = match s.split_once(':') {
        Some(("http", path)) => (CheckKind::Http, path.to_owned()),
        None => (
            match s {
                "tcp" => CheckKind::Tcp,
                "http" => CheckKind::Http,
                "none" => CheckKind::None,
                other => {
                    return Err(format!(
                        "unknown check {other:?}: use tcp, http[:/PATH] or none"
                    ))
                }
            },
            "/".to_owned(),
        ),
        Some(_) => {
            return Err(format!(
                "unknown check {s:?}: use tcp, http[:/PATH] or none"
            ))
        }
    };
    let check = HealthCheck {
        kind,
        path,
        ..HealthCheck::default()
    };
    match check.problems().into_iter().next() {
        Some(p) => Err(p),
        None => Ok(check),
    }
}

/// `ADDR:PORT[@WEIGHT]`.
fn parse_backend_spec(s: &str) -> Result<BackendSpec, String> {
    let (addr, weight) = match s.rsplit_once('@') {
        Some((a, w)) => (
            a,
            w.parse()
                .map_err(|_| format!("weight {w:?} is not a whole number"))?,
        ),
        None => (s, 1),
    };
    let address = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not ADDR:PORT (IPv6 in brackets: [2001:db8::1]:80)"))?;
    Ok(BackendSpec { address, weight })
}

/// Sends `request`, prints the answer, and returns the exit code.
pub fn run_client(request: &Request, opts: &ClientOpts) -> ExitCode {
    match client::call(&opts.socket, request) {
        Ok(reply) => {
            if opts.json {
                match serde_json::to_string_pretty(&reply) {
                    Ok(text) => println!("{text}"),
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::from(exit::FAILURE);
                    }
                }
            } else {
                print!("{}", render(&reply));
            }
            ExitCode::from(exit::OK)
        }
        Err(ClientError::Refused(e)) => {
            if opts.json {
                println!("{}", serde_json::json!({ "error": e }));
            }
            eprintln!("error: {e}");
            ExitCode::from(match e.kind {
                ErrorKind::Internal | ErrorKind::Unconfirmed => exit::FAILURE,
                _ => exit::REFUSED,
            })
        }
        Err(e) => {
            eprintln!("error: {}", crate::chain(&e));
            ExitCode::from(exit::FAILURE)
        }
    }
}

/// Writes the completion script for `shell` to stdout.
pub fn print_completions(shell: clap_complete::Shell) -> ExitCode {
    let mut command = <Cli as clap::CommandFactory>::command();
    clap_complete::generate(shell, &mut command, "orch", &mut std::io::stdout());
    ExitCode::from(exit::OK)
}

/// Writes the manual page (roff) to stdout.
pub fn print_man() -> ExitCode {
    let command = <Cli as clap::CommandFactory>::command();
    match clap_mangen::Man::new(command).render(&mut std::io::stdout()) {
        Ok(()) => ExitCode::from(exit::OK),
        // `orch man | head`: the reader had enough.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::from(exit::OK),
        Err(e) => {
            eprintln!("error: writing the manual page: {e}");
            ExitCode::from(exit::FAILURE)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::AdminState;

    #[test]
    fn the_grammar_is_consistent_and_documents_itself() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let mut man = Vec::new();
        clap_mangen::Man::new(Cli::command())
            .render(&mut man)
            .unwrap();
        let man = String::from_utf8(man).unwrap();
        assert!(man.starts_with(".ie \\n(.g .ds Aq"), "{}", &man[..80]);
        for word in ["orch", "service", "backend", "explain", "\\-\\-socket"] {
            assert!(man.contains(word), "the manual page lacks {word:?}");
        }
        let mut bash = Vec::new();
        clap_complete::generate(
            clap_complete::Shell::Bash,
            &mut Cli::command(),
            "orch",
            &mut bash,
        );
        let bash = String::from_utf8(bash).unwrap();
        assert!(
            bash.contains("_orch()") && bash.contains("drain") && bash.contains("--socket"),
            "{bash}"
        );
    }

    #[test]
    fn backend_specs_parse_with_optional_weight() {
        let b = parse_backend_spec("198.18.1.2:8080@3").unwrap();
        assert_eq!(b.address, "198.18.1.2:8080".parse().unwrap());
        assert_eq!(b.weight, 3);
        assert_eq!(parse_backend_spec("[2001:db8::1]:80").unwrap().weight, 1);
        assert!(parse_backend_spec("198.18.1.2")
            .unwrap_err()
            .contains("ADDR:PORT"));
        assert!(parse_backend_spec("198.18.1.2:80@x")
            .unwrap_err()
            .contains("weight"));
    }

    #[test]
    fn commands_map_to_requests() {
        let cli = Cli::try_parse_from([
            "orch",
            "backend",
            "drain",
            "web",
            "198.18.1.2:8080",
            "--socket",
            "/tmp/s",
        ])
        .unwrap();
        let req = request(&cli.command).unwrap();
        let opts = &cli.client;
        assert_eq!(
            req,
            Request::BackendSetState {
                service: "web".into(),
                address: "198.18.1.2:8080".parse().unwrap(),
                state: AdminState::Draining
            }
        );
        assert_eq!(opts.socket, PathBuf::from("/tmp/s"));
        // Options go anywhere on the line, before the command too.
        for line in [
            &["orch", "--socket", "/tmp/t", "--json", "service", "list"][..],
            &["orch", "service", "--socket", "/tmp/t", "list", "--json"][..],
            &["orch", "service", "list", "--json", "--socket=/tmp/t"][..],
        ] {
            let cli = Cli::try_parse_from(line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
            assert_eq!(
                request(&cli.command),
                Some(Request::ServiceList),
                "{line:?}"
            );
            assert_eq!(cli.client.socket, PathBuf::from("/tmp/t"), "{line:?}");
            assert!(cli.client.json, "{line:?}");
        }
        assert!(Cli::try_parse_from(["orch", "service", "add", "web", "198.19.0.1"]).is_err());
        assert!(Cli::try_parse_from([
            "orch",
            "service",
            "add",
            "w",
            "198.19.0.1:80",
            "-p",
            "sctp"
        ])
        .is_err());
    }
}
