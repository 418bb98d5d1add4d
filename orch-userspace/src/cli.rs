//! The `orch` command line: its grammar (clap) and how answers are printed.
//!
//! Every command except `daemon` and `config check` is a client of the admin API
//! ([`crate::api`]): it sends one request over the Unix socket and prints the answer as a
//! table for people or, with `--json`, as the API's JSON for scripts.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand};
use comfy_table::{presets::NOTHING, Table};

use crate::{
    api::{
        client::{self, ClientError},
        BackendInfo, BackendSpec, ErrorKind, Reply, Request, ServiceInfo,
    },
    model::{AdminState, CheckKind, HealthCheck, Protocol},
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

/// orch: an eBPF/XDP layer-4 load balancer.
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
    Status {
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Register, inspect and remove services.
    Service {
        #[command(subcommand)]
        command: ServiceCommand,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Add, remove, drain and enable backends.
    Backend {
        #[command(subcommand)]
        command: BackendCommand,
        #[command(flatten)]
        client: ClientOpts,
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
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Work with configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
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

/// The API request a client command stands for.
pub fn request(command: &Command) -> Option<(Request, &ClientOpts)> {
    let r = match command {
        Command::Status { client } => (Request::Status, client),
        Command::Service { command, client } => (
            match command {
                ServiceCommand::Add {
                    name,
                    vip,
                    protocol,
                    backends,
                    check,
                } => Request::ServiceAdd {
                    name: name.clone(),
                    vip: vip.ip(),
                    port: vip.port(),
                    protocol: *protocol,
                    backends: backends.clone(),
                    check: check.clone(),
                },
                ServiceCommand::Rm { name } => Request::ServiceRm { name: name.clone() },
                ServiceCommand::List => Request::ServiceList,
                ServiceCommand::Show { name } => Request::ServiceShow { name: name.clone() },
            },
            client,
        ),
        Command::Backend { command, client } => {
            let state = |service: &String, address: &SocketAddr, state| Request::BackendSetState {
                service: service.clone(),
                address: *address,
                state,
            };
            (
                match command {
                    BackendCommand::Add {
                        service,
                        address,
                        weight,
                    } => Request::BackendAdd {
                        service: service.clone(),
                        address: *address,
                        weight: *weight,
                    },
                    BackendCommand::Rm { service, address } => Request::BackendRm {
                        service: service.clone(),
                        address: *address,
                    },
                    BackendCommand::Drain {
                        service, address, ..
                    } => state(service, address, AdminState::Draining),
                    BackendCommand::Enable { service, address } => {
                        state(service, address, AdminState::Active)
                    }
                    BackendCommand::Disable { service, address } => {
                        state(service, address, AdminState::Disabled)
                    }
                    BackendCommand::List { service } => Request::BackendList {
                        service: service.clone(),
                    },
                },
                client,
            )
        }
        Command::Explain {
            protocol,
            client,
            vip,
            opts,
        } => (
            Request::Explain {
                protocol: *protocol,
                client: *client,
                vip: *vip,
            },
            opts,
        ),
        Command::Daemon { .. } | Command::Config { .. } => return None,
    };
    Some(r)
}

/// After a successful `backend drain --wait`: polls the backend's live connections, printing
/// each change, until none is left or `timeout` passes.
pub fn wait_drained(
    opts: &ClientOpts,
    service: &str,
    address: SocketAddr,
    timeout: std::time::Duration,
) -> ExitCode {
    let start = std::time::Instant::now();
    let mut last = None;
    loop {
        let request = Request::BackendList {
            service: Some(service.to_owned()),
        };
        let left = match client::call(&opts.socket, &request) {
            Ok(Reply::Backends(rows)) => rows
                .iter()
                .find(|r| r.backend.address == address)
                .map(|r| r.backend.established),
            Ok(_) => None,
            Err(e) => {
                eprintln!("error: {}", crate::chain(&e));
                return ExitCode::from(exit::FAILURE);
            }
        };
        let Some(left) = left else {
            eprintln!("error: backend {address} of service {service:?} is gone");
            return ExitCode::from(exit::FAILURE);
        };
        if last != Some(left) {
            eprintln!(
                "{address}: {left} connection{} left ({}s)",
                if left == 1 { "" } else { "s" },
                start.elapsed().as_secs()
            );
            last = Some(left);
        }
        if left == 0 {
            println!("{address} of service {service:?} is drained");
            return ExitCode::from(exit::OK);
        }
        if start.elapsed() >= timeout {
            eprintln!(
                "error: {left} connections still on {address} after {}s; it stays draining",
                timeout.as_secs()
            );
            return ExitCode::from(exit::TIMED_OUT);
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
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
                ErrorKind::Internal => exit::FAILURE,
                _ => exit::REFUSED,
            })
        }
        Err(e) => {
            eprintln!("error: {}", crate::chain(&e));
            ExitCode::from(exit::FAILURE)
        }
    }
}

/// A reply as text for people.
pub fn render(reply: &Reply) -> String {
    match reply {
        Reply::Done(text) => format!("{text}\n"),
        Reply::Explain(e) => crate::explain::render(e),
        Reply::Status(s) => {
            let mut out = format!(
                "orch {} (pid {}), up {}s, API v{}\n\
                 config:      {}\n\
                 registry:    {}\n\
                 pins:        {}{}\n\
                 interfaces:  {}\n\
                 services:    {} ({} backends)\n\
                 reloads:     {} ok, {} rejected\n\
                 probes:      {} sent\n",
                s.version,
                s.pid,
                s.uptime_secs,
                s.api,
                s.config.display(),
                s.registry.display(),
                s.pin_dir.display(),
                if s.adopted {
                    " (took over a running data plane)"
                } else {
                    ""
                },
                s.interfaces.join(", "),
                s.services,
                s.backends,
                s.config_reloads,
                s.config_reload_failures,
                s.probes_total,
            );
            if !s.services_in_panic.is_empty() {
                out.push_str(&format!(
                    "panic:       {} (too few healthy backends: balancing over all)\n",
                    s.services_in_panic.join(", ")
                ));
            }
            if let Some(e) = &s.last_reload_error {
                out.push_str(&format!("last reload rejected:\n{e}\n"));
            }
            out
        }
        Reply::Services(list) => {
            let mut t = table(&[
                "NAME", "ADDRESS", "PROTO", "SOURCE", "BACKENDS", "ACTIVE", "CONNS",
            ]);
            for s in list {
                let active = s.backends.iter().filter(|b| b.in_rotation).count();
                t.add_row(vec![
                    s.name.clone(),
                    SocketAddr::new(s.vip, s.port).to_string(),
                    s.protocol.to_string(),
                    source(s),
                    s.backends.len().to_string(),
                    active.to_string(),
                    s.connections.to_string(),
                ]);
            }
            format!("{t}\n")
        }
        Reply::Service(s) => {
            let mut out = format!(
                "{} {}/{} (from {}), {} connections\n",
                s.name,
                SocketAddr::new(s.vip, s.port),
                s.protocol,
                source(s),
                s.connections
            );
            if s.panic {
                out.push_str(
                    "PANIC: too few healthy backends to trust the checks; new connections go \
                     to every enabled backend ([health] panic_threshold)\n",
                );
            }
            let mut t = table(&[
                "BACKEND", "WEIGHT", "STATE", "HEALTH", "BREAKER", "ROTATION", "LIVE", "CONNS",
            ]);
            for b in &s.backends {
                t.add_row(backend_cells(b));
            }
            out.push_str(&format!("{t}\n"));
            out
        }
        Reply::Backends(rows) => {
            let mut t = table(&[
                "SERVICE", "BACKEND", "WEIGHT", "STATE", "HEALTH", "BREAKER", "ROTATION", "LIVE",
                "CONNS",
            ]);
            for r in rows {
                let mut cells = vec![r.service.clone()];
                cells.extend(backend_cells(&r.backend));
                t.add_row(cells);
            }
            format!("{t}\n")
        }
    }
}

fn source(s: &ServiceInfo) -> String {
    match s.source {
        crate::api::Source::File => "file",
        crate::api::Source::Registry => "registry",
    }
    .to_owned()
}

fn backend_cells(b: &BackendInfo) -> Vec<String> {
    vec![
        b.address.to_string(),
        b.weight.to_string(),
        b.state.to_string(),
        b.health.name().to_owned(),
        b.breaker.name().to_owned(),
        if b.in_rotation { "yes" } else { "no" }.to_owned(),
        b.established.to_string(),
        b.connections.to_string(),
    ]
}

/// A borderless table, like `ip` and `kubectl` print.
fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(NOTHING).set_header(header.to_vec());
    t
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let (req, opts) = request(&cli.command).unwrap();
        assert_eq!(
            req,
            Request::BackendSetState {
                service: "web".into(),
                address: "198.18.1.2:8080".parse().unwrap(),
                state: AdminState::Draining
            }
        );
        assert_eq!(opts.socket, PathBuf::from("/tmp/s"));
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
