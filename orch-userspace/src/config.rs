//! The daemon's TOML configuration: parsing, validation with file/line/column for every
//! problem, and conversion into the desired state.
//!
//! Validation collects every problem instead of stopping at the first, so one run of
//! `orch config check FILE` shows all there is to fix. A config that fails validation is
//! never applied, in part or in whole.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::{IpAddr, SocketAddr},
    ops::Range,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use toml::Spanned;

use crate::model::{
    self, AdminState, Backend, HealthCheck, Protocol, Service, ServiceAddr,
    MAX_BACKENDS_PER_SERVICE,
};
/// Longest interface name Linux accepts (IFNAMSIZ - 1).
const IFNAME_MAX: usize = 15;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub dataplane: DataplaneConfig,
    #[serde(default)]
    pub registry: RegistryConfig,
    #[serde(default)]
    pub api: ApiConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub health: HealthConfig,
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceConfig>,
    /// The file's text and path, to place problems found after parsing.
    #[serde(skip)]
    source: (PathBuf, String),
}

/// `[registry]`: where services registered through the CLI are kept.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// The SQLite database (created with its directory when missing).
    pub path: PathBuf,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            path: PathBuf::from("/var/lib/orch/registry.db"),
        }
    }
}

/// `[api]`: the local admin API the CLI talks to.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// The Unix socket (mode 0660, group `orch` when that group exists).
    pub socket: PathBuf,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            socket: PathBuf::from(crate::api::DEFAULT_SOCKET),
        }
    }
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
            listen: crate::metrics::DEFAULT_LISTEN
                .parse()
                .expect("the default is a valid address"),
        }
    }
}

/// `[health]`: rules over every service's health verdicts.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// The panic floor, in percent of a service's enabled backends (active, weight > 0).
    /// When fewer of them than this are in rotation, health is not trusted and the service
    /// balances over all of them; with none in rotation it always does (health never leaves
    /// a service dark). 0 keeps only that last rule.
    pub panic_threshold: Spanned<u8>,
}

/// Default [`HealthConfig::panic_threshold`]: Envoy's healthy-panic threshold. At 50 % a
/// fleet that loses half its backends at once is more likely to see its checks fail (a
/// network partition, an overloaded probe path, forged signals) than half its servers die,
/// and the survivors would take twice their load.
pub const DEFAULT_PANIC_THRESHOLD: u8 = 50;

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            panic_threshold: Spanned::new(0..0, DEFAULT_PANIC_THRESHOLD),
        }
    }
}

/// `[log]`: what the kernel program logs (the daemon's own format and level are chosen on
/// its command line: `--log-format`, `RUST_LOG`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// The most verbose level the XDP program logs at, forwarded into the daemon's log
    /// (target `orch::kernel`). `off` by default: a disabled level is removed from the
    /// program by the verifier, so it costs nothing per packet.
    pub kernel: KernelLogLevel,
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

/// `[dataplane]`: where and how the XDP program runs.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataplaneConfig {
    /// Interfaces to attach to: every interface that receives client traffic for a VIP or
    /// backend replies.
    pub interfaces: Spanned<Vec<Spanned<String>>>,
    /// Where the balancer runs on each interface: `auto` (native XDP on hardware NICs, TC
    /// on virtual devices: veth, bridge, VLAN, tunnels), `xdp` or `tc`.
    #[serde(default)]
    pub attach: AttachConfig,
    /// Replaced by `attach`; kept only to say so.
    #[serde(default)]
    pub xdp_mode: Option<Spanned<toml::Value>>,
    /// Forward translated packets with a FIB lookup and XDP_REDIRECT (true), or hand them to
    /// the kernel stack to route (false).
    #[serde(default = "default_true")]
    pub redirect: bool,
    /// Idle seconds after which a UDP flow is balanced again.
    #[serde(default = "default_udp_idle")]
    pub udp_idle_timeout_secs: Spanned<u64>,
    /// Confirmed-connection table entries (two per connection).
    #[serde(default = "default_conntrack")]
    pub conntrack_capacity: Spanned<u32>,
    /// Unconfirmed-connection table entries (handshakes in flight, unanswered UDP flows).
    #[serde(default = "default_conntrack_new")]
    pub conntrack_new_capacity: Spanned<u32>,
    /// Idle seconds after which an established TCP connection is forgotten.
    #[serde(default = "default_tcp_idle")]
    pub tcp_idle_timeout_secs: Spanned<u64>,
    /// Seconds a closed TCP connection (both FINs, or a RST) stays, for its last segments.
    #[serde(default = "default_tcp_close")]
    pub tcp_close_timeout_secs: Spanned<u64>,
    /// Seconds a TCP connection may stay unconfirmed (handshake not completed).
    #[serde(default = "default_unconfirmed")]
    pub unconfirmed_timeout_secs: Spanned<u64>,
    /// Capacity of the service maps.
    #[serde(default = "default_max_services")]
    pub max_services: Spanned<u32>,
    /// Capacity of the backend maps (over all services).
    #[serde(default = "default_max_backends")]
    pub max_backends: Spanned<u32>,
    /// Directory on bpffs where maps and links are pinned so that the data plane outlives
    /// daemon restarts. Under /sys/fs/bpf, bpffs is mounted when missing.
    #[serde(default = "default_pin_dir")]
    pub pin_dir: Spanned<PathBuf>,
}

/// `attach`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachConfig {
    #[default]
    Auto,
    Xdp,
    Tc,
}

/// `[[service]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub name: Spanned<String>,
    pub vip: Spanned<IpAddr>,
    pub port: Spanned<u16>,
    pub protocol: Protocol,
    #[serde(default, rename = "backend")]
    pub backends: Vec<BackendConfig>,
    /// `[service.check]`; defaults to [`HealthCheck::default_for`] the protocol.
    #[serde(default)]
    pub check: Option<Spanned<HealthCheck>>,
}

/// `[[service.backend]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// `ip:port`, IPv6 in brackets: `"[2001:db8:1::2]:8080"`.
    pub address: Spanned<SocketAddr>,
    #[serde(default = "default_weight")]
    pub weight: Spanned<u32>,
    /// `active` (default), `draining` (no new connections) or `disabled`.
    #[serde(default)]
    pub state: AdminState,
}

fn default_true() -> bool {
    true
}
fn default_udp_idle() -> Spanned<u64> {
    Spanned::new(0..0, orch_common::DEFAULT_UDP_IDLE_NS / 1_000_000_000)
}
fn default_conntrack() -> Spanned<u32> {
    Spanned::new(0..0, orch_common::CONNTRACK_CAPACITY)
}
fn default_conntrack_new() -> Spanned<u32> {
    Spanned::new(0..0, orch_common::CONNTRACK_NEW_CAPACITY)
}
/// Default [`DataplaneConfig::tcp_idle_timeout_secs`]: 2 h 15 min. Above Linux's default TCP
/// keepalive time (7,200 s), so a connection that keepalive holds open is never forgotten;
/// far below conntrack's 5 days, so connections whose ends vanished without a FIN do not
/// hold the table for long. IPVS's 15 minutes would cut idle database pools.
pub const DEFAULT_TCP_IDLE_SECS: u64 = 8_100;
fn default_tcp_idle() -> Spanned<u64> {
    Spanned::new(0..0, DEFAULT_TCP_IDLE_SECS)
}
/// Default [`DataplaneConfig::tcp_close_timeout_secs`], conntrack's `close` timeout: long
/// enough for the last ACK and a retransmitted FIN, short enough that churn does not fill
/// the table.
pub const DEFAULT_TCP_CLOSE_SECS: u64 = 10;
fn default_tcp_close() -> Spanned<u64> {
    Spanned::new(0..0, DEFAULT_TCP_CLOSE_SECS)
}
/// Default [`DataplaneConfig::unconfirmed_timeout_secs`]: a client gives up on a SYN after
/// about a minute of retransmissions; a retry after 30 s is balanced afresh.
pub const DEFAULT_UNCONFIRMED_SECS: u64 = 30;
fn default_unconfirmed() -> Spanned<u64> {
    Spanned::new(0..0, DEFAULT_UNCONFIRMED_SECS)
}
fn default_max_services() -> Spanned<u32> {
    Spanned::new(0..0, orch_common::MAX_SERVICES)
}
fn default_max_backends() -> Spanned<u32> {
    Spanned::new(0..0, orch_common::MAX_BACKENDS)
}
fn default_pin_dir() -> Spanned<PathBuf> {
    Spanned::new(0..0, PathBuf::from("/sys/fs/bpf/orch"))
}
fn default_weight() -> Spanned<u32> {
    Spanned::new(0..0, 1)
}

/// One thing wrong with a config file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line and column; `None` when the problem is the absence of something.
    pub position: Option<(usize, usize)>,
    pub message: String,
}

/// A config file that cannot be used, with every problem found.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
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
    let mut out = String::new();
    for (i, p) in problems.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        match p.position {
            Some((line, col)) => {
                out.push_str(&format!("{}:{line}:{col}: {}", path.display(), p.message))
            }
            None => out.push_str(&format!("{}: {}", path.display(), p.message)),
        }
    }
    out
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
        let invalid = |problems| ConfigError::Invalid {
            path: path.to_owned(),
            problems,
        };
        let config: Config = toml::from_str(text).map_err(|e| {
            invalid(vec![Problem {
                position: e.span().map(|s| line_col(text, s.start)),
                message: e.message().trim_end().to_owned(),
            }])
        })?;
        let problems = config.validate(text);
        if problems.is_empty() {
            let mut config = config;
            config.source = (path.to_owned(), text.to_owned());
            Ok(config)
        } else {
            Err(invalid(problems))
        }
    }

    /// Checks the file's services against services registered elsewhere (the registry):
    /// each name and each VIP:port/protocol belongs to one source only.
    pub fn check_against(&self, registered: &[Service]) -> Result<(), ConfigError> {
        let (path, text) = &self.source;
        let mut v = Validator {
            text,
            problems: Vec::new(),
        };
        for svc in &self.services {
            let name = svc.name.get_ref();
            if registered.iter().any(|r| &r.name == name) {
                v.at(
                    svc.name.span(),
                    format!("service name {name:?} is already registered through the CLI; remove it there first (orch service rm {name}) or rename this one"),
                );
            }
            let addr = ServiceAddr {
                vip: *svc.vip.get_ref(),
                port: *svc.port.get_ref(),
                protocol: svc.protocol,
            };
            if let Some(r) = registered
                .iter()
                .find(|r| r.addr == addr && &r.name != name)
            {
                v.at(
                    svc.vip.span(),
                    format!(
                        "{addr} is already the address of service {:?}, registered through the CLI",
                        r.name
                    ),
                );
            }
        }
        if v.problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid {
                path: path.clone(),
                problems: v.problems,
            })
        }
    }

    /// Every problem the file has beyond syntax and types.
    fn validate(&self, text: &str) -> Vec<Problem> {
        let mut v = Validator {
            text,
            problems: Vec::new(),
        };
        self.dataplane.validate(&mut v);
        let threshold = &self.health.panic_threshold;
        if *threshold.get_ref() > 100 {
            v.at(
                threshold.span(),
                format!(
                    "panic_threshold is a percentage (0-100), not {}",
                    threshold.get_ref()
                ),
            );
        }

        let mut names = HashMap::new();
        let mut addrs = HashMap::new();
        let mut backends_total = 0usize;
        for svc in &self.services {
            let name = svc.name.get_ref();
            if let Err(e) = model::check_name(name) {
                v.at(svc.name.span(), e);
            } else if let Some(first) = names.insert(name.clone(), svc.name.span()) {
                v.at(
                    svc.name.span(),
                    format!(
                        "service name {name:?} is already used at line {}",
                        line_col(text, first.start).0
                    ),
                );
            }
            let vip = *svc.vip.get_ref();
            if let Err(e) = model::check_vip(vip) {
                v.at(svc.vip.span(), e);
            }
            if let Err(e) = model::check_port(*svc.port.get_ref()) {
                v.at(svc.port.span(), e);
            }
            let addr = ServiceAddr {
                vip,
                port: *svc.port.get_ref(),
                protocol: svc.protocol,
            };
            if let Some(other) = addrs.insert(addr, name.clone()) {
                v.at(
                    svc.vip.span(),
                    format!("{addr} is already the address of service {other:?}"),
                );
            }
            self.validate_backends(svc, &mut v);
            if let Some(check) = &svc.check {
                for problem in check.get_ref().problems() {
                    v.at(check.span(), problem);
                }
            }
            backends_total += svc.backends.len();
        }

        let max_services = *self.dataplane.max_services.get_ref();
        if self.services.len() > max_services as usize {
            v.anywhere(format!(
                "{} services exceed dataplane.max_services = {max_services}",
                self.services.len()
            ));
        }
        let max_backends = *self.dataplane.max_backends.get_ref();
        if backends_total > max_backends as usize {
            v.anywhere(format!(
                "{backends_total} backends exceed dataplane.max_backends = {max_backends}"
            ));
        }
        v.problems
    }

    fn validate_backends(&self, svc: &ServiceConfig, v: &mut Validator<'_>) {
        let vip = *svc.vip.get_ref();
        let name = svc.name.get_ref();
        if svc.backends.len() > MAX_BACKENDS_PER_SERVICE {
            v.at(
                svc.name.span(),
                format!(
                    "service {name:?} has {} backends; at most {MAX_BACKENDS_PER_SERVICE} are supported",
                    svc.backends.len(),
                ),
            );
        }
        let mut seen = HashSet::new();
        for b in &svc.backends {
            let addr = *b.address.get_ref();
            for problem in model::check_backend(vip, addr) {
                v.at(b.address.span(), problem);
            }
            if !seen.insert(addr) {
                v.at(
                    b.address.span(),
                    format!("backend {addr} is listed twice in service {name:?}"),
                );
            }
            if let Err(e) = model::check_weight(*b.weight.get_ref()) {
                v.at(b.weight.span(), e);
            }
        }
    }

    /// The services as the reconciler wants them.
    pub fn services(&self) -> Vec<Service> {
        self.services
            .iter()
            .map(|s| Service {
                name: s.name.get_ref().clone(),
                addr: ServiceAddr {
                    vip: *s.vip.get_ref(),
                    port: *s.port.get_ref(),
                    protocol: s.protocol,
                },
                check: s
                    .check
                    .as_ref()
                    .map(|c| c.get_ref().clone())
                    .unwrap_or_else(|| HealthCheck::default_for(s.protocol)),
                backends: s
                    .backends
                    .iter()
                    .map(|b| Backend {
                        addr: *b.address.get_ref(),
                        weight: *b.weight.get_ref(),
                        state: b.state,
                    })
                    .collect(),
            })
            .collect()
    }
}

impl DataplaneConfig {
    fn validate(&self, v: &mut Validator<'_>) {
        if let Some(old) = &self.xdp_mode {
            v.at(
                old.span(),
                "dataplane.xdp_mode was replaced by dataplane.attach = \"auto\" | \"xdp\" | \
                 \"tc\" (auto: native XDP on hardware NICs, TC on veths, bridges and other \
                 virtual devices; generic XDP is gone: on skbs with partial checksums it \
                 corrupted traffic)"
                    .to_owned(),
            );
        }
        let ifaces = self.interfaces.get_ref();
        if ifaces.is_empty() {
            v.at(
                self.interfaces.span(),
                "dataplane.interfaces: name at least one interface to attach to".to_owned(),
            );
        }
        let mut seen = HashSet::new();
        for i in ifaces {
            let name = i.get_ref();
            if name.is_empty()
                || name.len() > IFNAME_MAX
                || name.contains(['/', ' ', '\t', '\n', ':'])
            {
                v.at(i.span(), format!("{name:?} is not a valid interface name (1-{IFNAME_MAX} characters, no '/', ':' or spaces)"));
            } else if !seen.insert(name) {
                v.at(i.span(), format!("interface {name:?} is listed twice"));
            }
        }
        let udp = &self.udp_idle_timeout_secs;
        if !(1..=86_400).contains(udp.get_ref()) {
            v.at(
                udp.span(),
                format!(
                    "udp_idle_timeout_secs = {} is outside 1..=86400",
                    udp.get_ref()
                ),
            );
        }
        let ct = &self.conntrack_capacity;
        if !(1024..=1 << 26).contains(ct.get_ref()) {
            v.at(
                ct.span(),
                format!(
                    "conntrack_capacity = {} is outside 1024..={}",
                    ct.get_ref(),
                    1 << 26
                ),
            );
        }
        let ctn = &self.conntrack_new_capacity;
        if !(1024..=1 << 24).contains(ctn.get_ref()) {
            v.at(
                ctn.span(),
                format!(
                    "conntrack_new_capacity = {} is outside 1024..={}",
                    ctn.get_ref(),
                    1 << 24
                ),
            );
        }
        for (name, value, max) in [
            (
                "tcp_idle_timeout_secs",
                &self.tcp_idle_timeout_secs,
                30 * 86_400,
            ),
            (
                "tcp_close_timeout_secs",
                &self.tcp_close_timeout_secs,
                3_600,
            ),
            (
                "unconfirmed_timeout_secs",
                &self.unconfirmed_timeout_secs,
                3_600,
            ),
        ] {
            if !(1..=max).contains(value.get_ref()) {
                v.at(
                    value.span(),
                    format!("{name} = {} is outside 1..={max}", value.get_ref()),
                );
            }
        }
        let ms = &self.max_services;
        if !(1..=1 << 20).contains(ms.get_ref()) {
            v.at(
                ms.span(),
                format!("max_services = {} is outside 1..={}", ms.get_ref(), 1 << 20),
            );
        }
        let mb = &self.max_backends;
        if !(1..=1 << 22).contains(mb.get_ref()) {
            v.at(
                mb.span(),
                format!("max_backends = {} is outside 1..={}", mb.get_ref(), 1 << 22),
            );
        }
    }
}

struct Validator<'a> {
    text: &'a str,
    problems: Vec<Problem>,
}

impl Validator<'_> {
    fn at(&mut self, span: Range<usize>, message: String) {
        let position = (span.end > 0).then(|| line_col(self.text, span.start));
        self.problems.push(Problem { position, message });
    }

    fn anywhere(&mut self, message: String) {
        self.problems.push(Problem {
            position: None,
            message,
        });
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some((l, c)) => write!(f, "{l}:{c}: {}", self.message),
            None => f.write_str(&self.message),
        }
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
            parse(&with(r#"attach = "tc""#)).unwrap().dataplane.attach,
            AttachConfig::Tc
        );
        assert_eq!(
            parse(&with(r#"attach = "xdp""#)).unwrap().dataplane.attach,
            AttachConfig::Xdp
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
        assert_eq!(c.dataplane.attach, AttachConfig::Auto);
        assert!(c.dataplane.redirect);
        assert_eq!(*c.dataplane.udp_idle_timeout_secs.get_ref(), 30);
        let s = c.services();
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
        let mut taken = c.services()[0].clone();
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
}
