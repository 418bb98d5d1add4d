//! The file form of the configuration: what serde reads, every value with its position
//! (`Spanned`) so that validation can say where each problem is. Nothing outside this module
//! sees a span: a valid file becomes the plain [`Config`](super::Config).

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    ops::Range,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use toml::Spanned;

use super::{defaults, Config, ConfigError, Fixed, KernelLogLevel, MetricsConfig, Origin, Problem};
use crate::{
    dataplane::{AttachKind, Capacity, Timeouts},
    model::{
        self, AdminState, Backend, HealthCheck, Protocol, Scheduler, Service, ServiceAddr,
        MAX_BACKENDS_PER_SERVICE,
    },
};
/// Longest interface name Linux accepts (IFNAMSIZ - 1).
const IFNAME_MAX: usize = 15;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct File {
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
    #[serde(default)]
    pub dns: DnsSection,
    #[serde(default)]
    pub socket_lb: SocketLbSection,
    pub cluster: Option<ClusterSection>,
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceConfig>,
}

/// `[registry]`: where services registered through the CLI are kept.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RegistryConfig {
    /// The SQLite database (created with its directory when missing).
    pub path: PathBuf,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            path: PathBuf::from(defaults::REGISTRY),
        }
    }
}

/// `[api]`: the local admin API the CLI talks to.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct ApiConfig {
    /// The Unix socket (mode 0660, group `orch` when that group exists).
    pub socket: PathBuf,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            socket: PathBuf::from(defaults::SOCKET),
        }
    }
}

/// `[health]`: rules over every service's health verdicts.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct HealthConfig {
    /// The panic floor, in percent of a service's enabled backends (active, weight > 0).
    /// When fewer of them than this are in rotation, health is not trusted and the service
    /// balances over all of them; with none in rotation it always does (health never leaves
    /// a service dark). 0 keeps only that last rule.
    pub panic_threshold: Spanned<u8>,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            panic_threshold: Spanned::new(0..0, defaults::PANIC_THRESHOLD),
        }
    }
}

/// `[log]`: what the kernel program logs (the daemon's own format and level are chosen on
/// its command line: `--log-format`, `RUST_LOG`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct LogConfig {
    /// The most verbose level the XDP program logs at, forwarded into the daemon's log
    /// (target `orch::kernel`). `off` by default: a disabled level is removed from the
    /// program by the verifier, so it costs nothing per packet.
    pub kernel: KernelLogLevel,
}

/// `[dataplane]`: where and how the XDP program runs.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DataplaneConfig {
    /// Interfaces to attach to: every interface that receives client traffic for a VIP or
    /// backend replies.
    pub interfaces: Spanned<Vec<Spanned<String>>>,
    /// Where the balancer runs on each interface: `auto` (native XDP on hardware NICs, TC
    /// on virtual devices: veth, bridge, VLAN, tunnels), `xdp` or `tc`.
    #[serde(default)]
    pub attach: AttachKind,
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

/// `[socket_lb]`: balancing local clients at `connect()`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct SocketLbSection {
    pub enabled: bool,
    pub cgroup: PathBuf,
}

impl Default for SocketLbSection {
    fn default() -> Self {
        SocketLbSection {
            enabled: false,
            cgroup: PathBuf::from(defaults::SOCKET_LB_CGROUP),
        }
    }
}

/// `[cluster]`: the registry shared by several hosts through etcd.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ClusterSection {
    pub endpoints: Spanned<Vec<Spanned<String>>>,
    #[serde(default = "default_cluster_prefix")]
    pub prefix: Spanned<String>,
    pub node: Option<Spanned<String>>,
    pub address: Option<IpAddr>,
    #[serde(default = "default_cluster_timeout")]
    pub timeout_ms: Spanned<u64>,
    pub tls: Option<ClusterTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ClusterTls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

fn default_cluster_prefix() -> Spanned<String> {
    Spanned::new(0..0, defaults::CLUSTER_PREFIX.to_owned())
}

fn default_cluster_timeout() -> Spanned<u64> {
    Spanned::new(0..0, defaults::CLUSTER_TIMEOUT_MS)
}

/// A node name: what a host name may be (letters, digits, `-`, `.`, `_`), 1 to 63 bytes.
fn check_node_name(name: &str) -> Result<(), String> {
    let ok = (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "cluster.node {name:?} is not a node name (1-63 letters, digits, '-', '.', '_')"
        ))
    }
}

/// This host's name, the default node name.
fn host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| check_node_name(h).is_ok())
        .unwrap_or_else(|| "localhost".to_owned())
}

impl ClusterSection {
    fn validate(&self, v: &mut Validator<'_>) {
        if self.endpoints.get_ref().is_empty() {
            v.at(
                self.endpoints.span(),
                "cluster.endpoints is empty: list the etcd members' client URLs".into(),
            );
        }
        let tls = self.tls.is_some();
        for e in self.endpoints.get_ref() {
            let url = e.get_ref();
            let rest = match (url.strip_prefix("http://"), url.strip_prefix("https://")) {
                (Some(r), _) if !tls => Some(r),
                (_, Some(r)) if tls => Some(r),
                (Some(_), _) => {
                    v.at(
                        e.span(),
                        format!("cluster endpoint {url:?} is http:// while [cluster.tls] is set; use https://"),
                    );
                    continue;
                }
                (_, Some(_)) => {
                    v.at(
                        e.span(),
                        format!("cluster endpoint {url:?} is https:// without [cluster.tls]; add the section (its ca at least)"),
                    );
                    continue;
                }
                _ => None,
            };
            let valid = rest.is_some_and(|r| {
                r.rsplit_once(':').is_some_and(|(host, port)| {
                    !host.is_empty()
                        && !host.contains('/')
                        && port.parse::<u16>().is_ok_and(|p| p > 0)
                })
            });
            if !valid {
                v.at(
                    e.span(),
                    format!("cluster endpoint {url:?} is not a URL like http://198.18.50.1:2379"),
                );
            }
        }
        let prefix = self.prefix.get_ref();
        if !prefix.starts_with('/')
            || prefix.ends_with('/')
            || prefix.len() < 2
            || prefix.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            v.at(
                self.prefix.span(),
                format!("cluster.prefix {prefix:?} must start with '/', not end with one, and hold no spaces (e.g. \"/orch\")"),
            );
        }
        if let Some(node) = &self.node {
            if let Err(e) = check_node_name(node.get_ref()) {
                v.at(node.span(), e);
            }
        }
        let timeout = *self.timeout_ms.get_ref();
        if !(100..=60_000).contains(&timeout) {
            v.at(
                self.timeout_ms.span(),
                format!("cluster.timeout_ms = {timeout} is outside 100..=60000"),
            );
        }
    }

    fn settings(self) -> crate::cluster::Settings {
        crate::cluster::Settings {
            endpoints: self
                .endpoints
                .into_inner()
                .into_iter()
                .map(Spanned::into_inner)
                .collect(),
            prefix: self.prefix.into_inner(),
            node: self.node.map_or_else(host_name, Spanned::into_inner),
            address: self.address,
            timeout: std::time::Duration::from_millis(self.timeout_ms.into_inner()),
            tls: self.tls.map(|t| crate::cluster::Tls {
                ca: t.ca,
                cert: t.cert,
                key: t.key,
            }),
        }
    }
}

/// `[dns]`: service discovery by name.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct DnsSection {
    pub enabled: bool,
    pub listen: SocketAddr,
    pub domain: Spanned<String>,
    pub ttl_secs: Spanned<u32>,
    pub max_queries_per_sec: Spanned<u32>,
    pub tcp_idle_timeout_secs: Spanned<u64>,
}

impl Default for DnsSection {
    fn default() -> Self {
        DnsSection {
            enabled: false,
            listen: defaults::DNS_LISTEN.parse().expect("the default is valid"),
            domain: Spanned::new(0..0, defaults::DNS_DOMAIN.to_owned()),
            ttl_secs: Spanned::new(0..0, defaults::DNS_TTL_SECS),
            max_queries_per_sec: Spanned::new(0..0, defaults::DNS_MAX_QPS),
            tcp_idle_timeout_secs: Spanned::new(0..0, defaults::DNS_TCP_IDLE_SECS),
        }
    }
}

impl DnsSection {
    fn validate(&self, v: &mut Validator<'_>) {
        if let Err(e) = crate::dns::check_domain(self.domain.get_ref()) {
            v.at(self.domain.span(), e);
        }
        for (name, value, range) in [
            (
                "dns.ttl_secs",
                u64::from(*self.ttl_secs.get_ref()),
                0..=86_400,
            ),
            (
                "dns.max_queries_per_sec",
                u64::from(*self.max_queries_per_sec.get_ref()),
                1..=1_000_000,
            ),
            (
                "dns.tcp_idle_timeout_secs",
                *self.tcp_idle_timeout_secs.get_ref(),
                1..=300,
            ),
        ] {
            if !range.contains(&value) {
                let span = match name {
                    "dns.ttl_secs" => self.ttl_secs.span(),
                    "dns.max_queries_per_sec" => self.max_queries_per_sec.span(),
                    _ => self.tcp_idle_timeout_secs.span(),
                };
                v.at(
                    span,
                    format!(
                        "{name} = {value} is outside {}..={}",
                        range.start(),
                        range.end()
                    ),
                );
            }
        }
    }

    /// The server's settings, when it is enabled.
    fn settings(self) -> Option<crate::dns::Settings> {
        self.enabled.then(|| crate::dns::Settings {
            listen: self.listen,
            domain: crate::dns::check_domain(self.domain.get_ref()).expect("validated"),
            ttl: *self.ttl_secs.get_ref(),
            max_queries_per_sec: *self.max_queries_per_sec.get_ref(),
            tcp_idle_timeout: std::time::Duration::from_secs(*self.tcp_idle_timeout_secs.get_ref()),
        })
    }
}

/// `[[service]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ServiceConfig {
    pub name: Spanned<String>,
    pub vip: Spanned<IpAddr>,
    pub port: Spanned<u16>,
    pub protocol: Protocol,
    #[serde(default, rename = "backend")]
    pub backends: Vec<BackendConfig>,
    /// `[service.check]`; defaults to [`HealthCheck::default_for`] the protocol.
    #[serde(default)]
    pub check: Option<Spanned<HealthCheck>>,
    /// `"round-robin"` (default) or `"maglev"`.
    #[serde(default)]
    pub scheduler: Scheduler,
}

/// `[[service.backend]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BackendConfig {
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
fn default_tcp_idle() -> Spanned<u64> {
    Spanned::new(0..0, defaults::TCP_IDLE_SECS)
}
fn default_tcp_close() -> Spanned<u64> {
    Spanned::new(0..0, defaults::TCP_CLOSE_SECS)
}
fn default_unconfirmed() -> Spanned<u64> {
    Spanned::new(0..0, defaults::UNCONFIRMED_SECS)
}
fn default_max_services() -> Spanned<u32> {
    Spanned::new(0..0, orch_common::MAX_SERVICES)
}
fn default_max_backends() -> Spanned<u32> {
    Spanned::new(0..0, orch_common::MAX_BACKENDS)
}
fn default_pin_dir() -> Spanned<PathBuf> {
    Spanned::new(0..0, PathBuf::from(defaults::PIN_DIR))
}
fn default_weight() -> Spanned<u32> {
    Spanned::new(0..0, 1)
}

/// Parses and validates `text` into the plain [`Config`]; `path` only labels the errors.
pub(super) fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let invalid = |problems| ConfigError::Invalid {
        path: path.to_owned(),
        problems,
    };
    let file: File = toml::from_str(text).map_err(|e| {
        invalid(vec![Problem {
            position: e.span().map(|s| line_col(text, s.start)),
            message: e.message().trim_end().to_owned(),
        }])
    })?;
    let problems = file.validate(text);
    if !problems.is_empty() {
        return Err(invalid(problems));
    }
    Ok(file.into_config(path, text))
}

/// Checks the file's services against services registered elsewhere (the registry): each
/// name and each VIP:port/protocol belongs to one source only.
pub(super) fn check_against(config: &Config, registered: &[Service]) -> Result<(), ConfigError> {
    let origin = &config.origin;
    let mut v = Validator {
        text: &origin.text,
        problems: Vec::new(),
    };
    for (svc, (name_at, vip_at)) in config.services.iter().zip(&origin.service_spans) {
        let name = &svc.name;
        if registered.iter().any(|r| &r.name == name) {
            v.at(
                name_at.clone(),
                format!("service name {name:?} is already registered through the CLI; remove it there first (orch service rm {name}) or rename this one"),
            );
        }
        let addr = svc.addr;
        if let Some(r) = registered
            .iter()
            .find(|r| r.addr == addr && &r.name != name)
        {
            v.at(
                vip_at.clone(),
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
            path: origin.path.clone(),
            problems: v.problems,
        })
    }
}

impl File {
    /// The plain form of a valid file.
    fn into_config(self, path: &Path, text: &str) -> Config {
        let services = self.services();
        let d = self.dataplane;
        let ns = |s: &Spanned<u64>| s.get_ref().saturating_mul(1_000_000_000);
        Config {
            fixed: Fixed {
                capacity: Capacity {
                    max_services: *d.max_services.get_ref(),
                    max_backends: *d.max_backends.get_ref(),
                    conntrack: *d.conntrack_capacity.get_ref(),
                    conntrack_new: *d.conntrack_new_capacity.get_ref(),
                },
                pin_dir: d.pin_dir.into_inner(),
                registry: self.registry.path,
                api_socket: self.api.socket,
                metrics: self.metrics,
                kernel_log: self.log.kernel,
                dns: self.dns.settings(),
                socket_lb: self.socket_lb.enabled.then_some(self.socket_lb.cgroup),
                cluster: self.cluster.map(ClusterSection::settings),
            },
            interfaces: d
                .interfaces
                .into_inner()
                .into_iter()
                .map(Spanned::into_inner)
                .collect(),
            attach: d.attach,
            redirect: d.redirect,
            timeouts: Timeouts {
                tcp_idle_ns: ns(&d.tcp_idle_timeout_secs),
                tcp_close_ns: ns(&d.tcp_close_timeout_secs),
                unconfirmed_ns: ns(&d.unconfirmed_timeout_secs),
                udp_idle_ns: ns(&d.udp_idle_timeout_secs),
            },
            panic_threshold: self.health.panic_threshold.into_inner(),
            origin: Origin {
                path: path.to_owned(),
                text: text.to_owned(),
                service_spans: self
                    .services
                    .iter()
                    .map(|s| (s.name.span(), s.vip.span()))
                    .collect(),
            },
            services,
        }
    }

    /// Every problem the file has beyond syntax and types.
    fn validate(&self, text: &str) -> Vec<Problem> {
        let mut v = Validator {
            text,
            problems: Vec::new(),
        };
        self.dataplane.validate(&mut v);
        self.dns.validate(&mut v);
        if let Some(cluster) = &self.cluster {
            cluster.validate(&mut v);
        }
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
    fn services(&self) -> Vec<Service> {
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
                scheduler: s.scheduler,
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
