//! The daemon's configuration: a TOML file, validated with file/line/column for every
//! problem, then used as the plain [`Config`].
//!
//! Validation collects every problem instead of stopping at the first, so one run of
//! `orch config check FILE` shows all there is to fix. A config that fails validation is
//! never applied, in part or in whole. The file form, with each value's position, stays in
//! [`file`]; the rest of the daemon sees plain values.
//!
//! Settings that size or place things the running daemon cannot move (map capacities, the
//! pin directory, the registry, the sockets, the kernel log level) are gathered in
//! [`Fixed`]: a reload keeps the running ones and says which differ.

mod file;

use std::{
    fmt,
    net::SocketAddr,
    ops::Range,
    path::{Path, PathBuf},
};

use orch_common::maps::Settings;
use serde::Deserialize;

use crate::{
    dataplane::{self, AttachKind, Capacity, Timeouts},
    model::Service,
};

/// Defaults that more than the file's parser needs (the CLI's socket, the docs).
pub mod defaults {
    /// The admin socket.
    pub const SOCKET: &str = "/run/orch/orch.sock";
    /// The registry database.
    pub const REGISTRY: &str = "/var/lib/orch/registry.db";
    /// Where maps and links are pinned.
    pub const PIN_DIR: &str = "/sys/fs/bpf/orch";
    /// The Prometheus listener: loopback, so that nothing is exposed unless chosen.
    pub const METRICS_LISTEN: &str = "127.0.0.1:9477";
    /// The panic threshold: Envoy's healthy-panic threshold. At 50 % a fleet that loses
    /// half its backends at once is more likely to see its checks fail (a network
    /// partition, an overloaded probe path, forged signals) than half its servers die, and
    /// the survivors would take twice their load.
    pub const PANIC_THRESHOLD: u8 = 50;
    /// Established TCP idle timeout: 2 h 15 min. Above Linux's default TCP keepalive time
    /// (7,200 s), so a connection that keepalive holds open is never forgotten; far below
    /// conntrack's 5 days, so connections whose ends vanished without a FIN do not hold the
    /// table for long. IPVS's 15 minutes would cut idle database pools.
    pub const TCP_IDLE_SECS: u64 = 8_100;
    /// Closed TCP timeout, conntrack's `close` timeout: long enough for the last ACK and a
    /// retransmitted FIN, short enough that churn does not fill the table.
    pub const TCP_CLOSE_SECS: u64 = 10;
    /// Unconfirmed TCP timeout: a client gives up on a SYN after about a minute of
    /// retransmissions; a retry after 30 s is balanced afresh.
    pub const UNCONFIRMED_SECS: u64 = 30;
    /// The cgroup whose processes' sockets are balanced at `connect()`: the root of the
    /// unified hierarchy, so every process on the host (containers included).
    pub const SOCKET_LB_CGROUP: &str = "/sys/fs/cgroup";
    /// The DNS server's address: a loopback address of its own, beside systemd-resolved's
    /// 127.0.0.53 and 127.0.0.54, on the port resolvers use.
    pub const DNS_LISTEN: &str = "127.0.0.153:53";
    /// The domain orch answers for (`.internal` is reserved for private use, ICANN 2024).
    pub const DNS_DOMAIN: &str = "orch.internal";
    /// Seconds clients may cache an answer: services come and go.
    pub const DNS_TTL_SECS: u32 = 5;
    /// Queries per second over all clients.
    pub const DNS_MAX_QPS: u32 = 10_000;
    /// Seconds an idle TCP connection to the DNS server stays open.
    pub const DNS_TCP_IDLE_SECS: u64 = 5;
    /// The etcd key prefix of a cluster's records.
    pub const CLUSTER_PREFIX: &str = "/orch";
    /// How long one etcd request may take: etcd's own election timeout is 1 s, so 2 s
    /// rides out a leader change and still tells an unreachable cluster quickly.
    pub const CLUSTER_TIMEOUT_MS: u64 = 2_000;
}

/// A valid configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// What only a restart changes.
    pub fixed: Fixed,
    /// Interfaces to attach to.
    pub interfaces: Vec<String>,
    /// Where the balancer runs on each interface.
    pub attach: AttachKind,
    /// Forward translated packets with a FIB lookup and a redirect (true), or hand them to
    /// the kernel stack to route (false).
    pub redirect: bool,
    /// When connections leave the connection tables.
    pub timeouts: Timeouts,
    /// The panic floor, in percent of a service's enabled backends.
    pub panic_threshold: u8,
    /// The file's services.
    pub services: Vec<Service>,
    /// The file's path and text, and where each service's name and VIP are, to place the
    /// problems [`Config::check_against`] finds.
    origin: Origin,
}

/// Settings that only a restart changes: a reload keeps the running value.
#[derive(Clone, Debug, PartialEq)]
pub struct Fixed {
    pub capacity: Capacity,
    pub pin_dir: PathBuf,
    pub registry: PathBuf,
    pub api_socket: PathBuf,
    pub metrics: MetricsConfig,
    pub kernel_log: KernelLogLevel,
    /// The DNS server, when `[dns] enabled`.
    pub dns: Option<crate::dns::Settings>,
    /// The cgroup (v2) whose sockets are balanced at `connect()`, when `[socket_lb]
    /// enabled`.
    pub socket_lb: Option<PathBuf>,
    /// The etcd cluster whose registry this host shares, when `[cluster]` is present;
    /// otherwise the registry is this host's alone.
    pub cluster: Option<crate::cluster::Settings>,
}

#[derive(Clone, Debug)]
struct Origin {
    path: PathBuf,
    text: String,
    /// (name, VIP) spans of each of `Config::services`, in order.
    service_spans: Vec<(Range<usize>, Range<usize>)>,
}

/// `[metrics]`: the Prometheus endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve `/metrics` at all.
    pub enabled: bool,
    /// Address and port of the HTTP listener. Loopback by default: put a scraper on the same
    /// host, or choose an address that only the monitoring network reaches.
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: true,
            listen: defaults::METRICS_LISTEN
                .parse()
                .expect("the default is a valid address"),
        }
    }
}

/// Kernel log levels, most quiet first; the discriminants are aya-log's numbering.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum KernelLogLevel {
    #[default]
    Off = 0,
    Error = 1,
    Warn = 2,
    Info = 3,
    Debug = 4,
    Trace = 5,
}

/// One thing wrong with a config file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line and column; `None` when the problem is the absence of something.
    pub position: Option<(usize, usize)>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some((l, c)) => write!(f, "{l}:{c}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// A config file that cannot be used, with every problem found.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", render(.path, .problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

fn render(path: &Path, problems: &[Problem]) -> String {
    let lines: Vec<String> = problems
        .iter()
        .map(|p| match p.position {
            Some((line, col)) => format!("{}:{line}:{col}: {}", path.display(), p.message),
            None => format!("{}: {}", path.display(), p.message),
        })
        .collect();
    lines.join("\n")
}

impl ConfigError {
    /// The problems, for callers that present them their own way.
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Read { .. } => &[],
            ConfigError::Invalid { problems, .. } => problems,
        }
    }
}

impl Config {
    /// Reads, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates `text`; `path` only labels the errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        file::parse(text, path)
    }

    /// Checks the file's services against services registered elsewhere (the registry):
    /// each name and each VIP:port/protocol belongs to one source only.
    pub fn check_against(&self, registered: &[Service]) -> Result<(), ConfigError> {
        file::check_against(self, registered)
    }

    /// The file this config was read from.
    pub fn path(&self) -> &Path {
        &self.origin.path
    }

    /// The data plane's runtime settings.
    pub fn settings(&self) -> Settings {
        let mut s = dataplane::default_settings();
        s.udp_idle_ns = self.timeouts.udp_idle_ns;
        if !self.redirect {
            s.flags &= !orch_common::maps::SETTING_REDIRECT;
        }
        s
    }
}

impl Fixed {
    /// The settings that differ from `other`, as (name, this value, other value).
    pub fn differences(&self, other: &Fixed) -> Vec<(&'static str, String, String)> {
        let (a, b) = (self, other);
        let rows = [
            (
                "dataplane.max_services",
                a.capacity.max_services.to_string(),
                b.capacity.max_services.to_string(),
            ),
            (
                "dataplane.max_backends",
                a.capacity.max_backends.to_string(),
                b.capacity.max_backends.to_string(),
            ),
            (
                "dataplane.conntrack_capacity",
                a.capacity.conntrack.to_string(),
                b.capacity.conntrack.to_string(),
            ),
            (
                "dataplane.conntrack_new_capacity",
                a.capacity.conntrack_new.to_string(),
                b.capacity.conntrack_new.to_string(),
            ),
            (
                "dataplane.pin_dir",
                a.pin_dir.display().to_string(),
                b.pin_dir.display().to_string(),
            ),
            (
                "registry.path",
                a.registry.display().to_string(),
                b.registry.display().to_string(),
            ),
            (
                "api.socket",
                a.api_socket.display().to_string(),
                b.api_socket.display().to_string(),
            ),
            (
                "metrics",
                format!("{:?}", a.metrics),
                format!("{:?}", b.metrics),
            ),
            (
                "log.kernel",
                format!("{:?}", a.kernel_log),
                format!("{:?}", b.kernel_log),
            ),
            ("dns", format!("{:?}", a.dns), format!("{:?}", b.dns)),
            (
                "socket_lb",
                format!("{:?}", a.socket_lb),
                format!("{:?}", b.socket_lb),
            ),
            (
                "cluster",
                format!("{:?}", a.cluster),
                format!("{:?}", b.cluster),
            ),
        ];
        rows.into_iter().filter(|(_, x, y)| x != y).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[dataplane]
interfaces = ["ext", "be1"]

[[service]]
name = "web"
vip = "198.19.0.1"
port = 80
protocol = "tcp"
backend = [
  { address = "198.18.1.2:8080" },
  { address = "198.18.2.2:8080", weight = 3 },
]

[[service]]
name = "web6"
vip = "2001:db8:ff::1"
port = 80
protocol = "tcp"
backend = [{ address = "[2001:db8:1::2]:8080", weight = 0 }]
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("orch.toml"))
    }

    fn problems(text: &str) -> Vec<String> {
        parse(text)
            .expect_err("config should be rejected")
            .problems()
            .iter()
            .map(|p| p.to_string())
            .collect()
    }

    #[test]
    fn attach_kinds_parse_and_the_old_xdp_mode_says_what_replaced_it() {
        let with = |line: &str| GOOD.replace("[dataplane]\n", &format!("[dataplane]\n{line}\n"));
        assert_eq!(
            parse(&with(r#"attach = "tc""#)).unwrap().attach,
            AttachKind::Tc
        );
        assert_eq!(
            parse(&with(r#"attach = "xdp""#)).unwrap().attach,
            AttachKind::Xdp
        );
        let p = problems(&with(r#"xdp_mode = "generic""#));
        assert!(
            p.len() == 1 && p[0].contains("replaced by dataplane.attach"),
            "{p:?}"
        );
        assert!(parse(&with(r#"attach = "generic""#)).is_err());
    }

    #[test]
    fn parses_a_good_config_with_defaults() {
        let c = parse(GOOD).expect("valid");
        assert_eq!(c.attach, AttachKind::Auto);
        assert!(c.redirect);
        assert_eq!(c.timeouts.udp_idle_ns, 30_000_000_000);
        assert_eq!(c.fixed.pin_dir, Path::new(defaults::PIN_DIR));
        let s = &c.services;
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].addr.to_string(), "198.19.0.1:80/tcp");
        assert_eq!(s[0].backends[0].weight, 1);
        assert_eq!(s[0].backends[1].weight, 3);
        assert_eq!(s[1].backends[0].addr.to_string(), "[2001:db8:1::2]:8080");
    }

    #[test]
    fn syntax_errors_carry_line_and_column() {
        let p = problems("[dataplane]\ninterfaces = [\"ext\"]\n[[service]]\nname = \"x\"\nvip = \"198.19.0.300\"\nport = 80\nprotocol = \"tcp\"\n");
        assert_eq!(p.len(), 1);
        assert!(p[0].starts_with("5:7:"), "{p:?}");
        assert!(p[0].contains("invalid IP address"), "{p:?}");
    }

    #[test]
    fn unknown_fields_and_protocols_are_rejected() {
        let p = problems("[dataplane]\ninterfaces = [\"ext\"]\ncolour = 1\n");
        assert!(
            p[0].starts_with("3:1:") && p[0].contains("unknown field"),
            "{p:?}"
        );
        let p = problems("[dataplane]\ninterfaces = [\"e\"]\n[[service]]\nname = \"x\"\nvip = \"198.19.0.1\"\nport = 1\nprotocol = \"sctp\"\n");
        assert!(p[0].contains("unknown variant `sctp`"), "{p:?}");
    }

    #[test]
    fn every_semantic_problem_is_reported_with_its_line() {
        let text = r#"[dataplane]
interfaces = ["ext", "ext", "much-too-long-interface"]
udp_idle_timeout_secs = 0

[[service]]
name = "web"
vip = "198.19.0.1"
port = 0
protocol = "tcp"
backend = [
  { address = "198.18.1.2:0" },
  { address = "[2001:db8::1]:80" },
  { address = "198.18.1.3:80", weight = 20000 },
  { address = "198.18.1.3:80" },
]

[[service]]
name = "web"
vip = "198.19.0.1"
port = 0
protocol = "tcp"

[[service]]
name = "bad name!"
vip = "224.0.0.1"
port = 53
protocol = "udp"
"#;
        let p = problems(text);
        let expect = [
            ("2:22:", "listed twice"),
            ("2:29:", "not a valid interface name"),
            ("3:25:", "outside 1..=86400"),
            ("8:8:", "port 0"),
            ("11:15:", "port 0 is not valid"),
            ("12:15:", "same IP family"),
            ("13:41:", "above the maximum"),
            ("14:15:", "listed twice"),
            ("18:8:", "already used at line 6"),
            ("19:7:", "already the address of service \"web\""),
            ("24:8:", "must be 1-63 characters"),
            ("25:7:", "use a unicast address"),
        ];
        for (pos, text) in expect {
            assert!(
                p.iter().any(|m| m.starts_with(pos) && m.contains(text)),
                "missing {pos} {text:?} in:\n{}",
                p.join("\n")
            );
        }
    }

    #[test]
    fn missing_dataplane_section_is_an_error() {
        let p = problems(
            "[[service]]\nname = \"x\"\nvip = \"198.19.0.1\"\nport = 1\nprotocol = \"tcp\"\n",
        );
        assert!(p[0].contains("missing field `dataplane`"), "{p:?}");
    }

    #[test]
    fn error_display_names_the_file() {
        let e = parse("[dataplane]\ninterfaces = []\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "orch.toml:2:14: dataplane.interfaces: name at least one interface to attach to"
        );
    }

    #[test]
    fn services_registered_elsewhere_cannot_be_redefined() {
        let c = parse(GOOD).unwrap();
        let mut taken = c.services[0].clone();
        assert!(c.check_against(std::slice::from_ref(&taken)).is_err());
        taken.name = "api".into();
        let e = c.check_against(&[taken.clone()]).unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with("orch.toml:7:7: ") && text.contains("registered through the CLI"),
            "{text}"
        );
        taken.addr.port = 8443;
        c.check_against(&[taken]).unwrap();
    }

    #[test]
    fn restart_only_settings_are_compared_in_one_place() {
        let running = parse(GOOD).unwrap();
        assert!(running.fixed.differences(&running.fixed).is_empty());
        let next = parse(&GOOD.replace(
            "[dataplane]\n",
            "[dataplane]\nmax_services = 8\nconntrack_capacity = 4096\n",
        ))
        .unwrap();
        let changed: Vec<&str> = running
            .fixed
            .differences(&next.fixed)
            .iter()
            .map(|(what, _, _)| *what)
            .collect();
        assert_eq!(
            changed,
            ["dataplane.max_services", "dataplane.conntrack_capacity"]
        );
    }

    #[test]
    fn the_cluster_section_is_absent_by_default_and_checked() {
        assert_eq!(parse(GOOD).unwrap().fixed.cluster, None);
        let on = parse(&format!(
            "{GOOD}\n[cluster]\nendpoints = [\"http://198.18.50.1:2379\"]\nnode = \"h1\"\n"
        ))
        .unwrap();
        let c = on.fixed.cluster.unwrap();
        assert_eq!(c.prefix, "/orch");
        assert_eq!(c.node, "h1");
        assert_eq!(c.timeout, std::time::Duration::from_millis(2_000));
        assert_eq!(c.tls, None);
        let p = problems(&format!(
            "{GOOD}\n[cluster]\nendpoints = [\"198.18.50.1:2379\", \"https://198.18.50.2:2379\"]\n\
             prefix = \"orch/\"\nnode = \"h 1\"\ntimeout_ms = 5\n"
        ));
        for wanted in [
            "\"198.18.50.1:2379\" is not a URL",
            "is https:// without [cluster.tls]",
            "cluster.prefix \"orch/\" must start with '/'",
            "cluster.node \"h 1\" is not a node name",
            "cluster.timeout_ms = 5 is outside",
        ] {
            assert!(p.iter().any(|m| m.contains(wanted)), "{wanted}: {p:?}");
        }
        let empty = problems(&format!("{GOOD}\n[cluster]\nendpoints = []\n"));
        assert!(
            empty
                .iter()
                .any(|m| m.contains("cluster.endpoints is empty")),
            "{empty:?}"
        );
    }

    #[test]
    fn the_dns_section_is_off_by_default_and_checked() {
        assert_eq!(parse(GOOD).unwrap().fixed.dns, None);
        let on = parse(&format!("{GOOD}\n[dns]\nenabled = true\n")).unwrap();
        let dns = on.fixed.dns.unwrap();
        assert_eq!(dns.domain.to_string(), "orch.internal.");
        assert_eq!(dns.listen.to_string(), defaults::DNS_LISTEN);
        let p = problems(&format!(
            "{GOOD}\n[dns]\nenabled = true\ndomain = \"orch_internal\"\nttl_secs = 100000\n"
        ));
        let at_line = |m: &str| {
            m.split(':')
                .next()
                .is_some_and(|l| l.parse::<u32>().is_ok())
        };
        assert!(
            p.iter()
                .any(|m| at_line(m)
                    && m.contains("dns.domain \"orch_internal\" is not a domain name")),
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|m| at_line(m) && m.contains("dns.ttl_secs = 100000")),
            "{p:?}"
        );
    }

    #[test]
    fn socket_lb_is_off_by_default_and_names_its_cgroup() {
        assert_eq!(parse(GOOD).unwrap().fixed.socket_lb, None);
        let on = parse(&format!(
            "{GOOD}\n[socket_lb]\nenabled = true\ncgroup = \"/sys/fs/cgroup/lb\"\n"
        ))
        .unwrap();
        assert_eq!(
            on.fixed.socket_lb.as_deref(),
            Some(Path::new("/sys/fs/cgroup/lb"))
        );
        let p = problems(&format!("{GOOD}\n[socket_lb]\nenable = true\n"));
        assert!(
            p.iter().any(|m| m.contains("unknown field `enable`")),
            "{p:?}"
        );
    }
}
