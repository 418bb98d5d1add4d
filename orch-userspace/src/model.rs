//! The desired state in plain Rust types: what services exist and where their backends are.
//! Config files and the registry produce it; the reconciler consumes it.
//!
//! The rules a service or backend must follow live here too, so that a config file, the
//! CLI and the admin API reject the same things with the same words.

use std::{fmt, net::IpAddr, net::SocketAddr, str::FromStr};

use serde::{Deserialize, Serialize};

/// A transport protocol orch balances.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The IP protocol number.
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => orch_common::IPPROTO_TCP,
            Protocol::Udp => orch_common::IPPROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// What identifies a service in the data plane: its VIP, port and protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceAddr {
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for ServiceAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            SocketAddr::new(self.vip, self.port),
            self.protocol
        )
    }
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            other => Err(format!("unknown protocol {other:?}: use tcp or udp")),
        }
    }
}

/// What the operator wants of a backend, independent of its health.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminState {
    /// Takes new connections in proportion to its weight.
    #[default]
    Active,
    /// Takes no new connections; established ones continue.
    Draining,
    /// Out of the service: no new connections, not counted as a backend.
    Disabled,
}

impl fmt::Display for AdminState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AdminState::Active => "active",
            AdminState::Draining => "draining",
            AdminState::Disabled => "disabled",
        })
    }
}

impl FromStr for AdminState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "active" => Ok(AdminState::Active),
            "draining" => Ok(AdminState::Draining),
            "disabled" => Ok(AdminState::Disabled),
            other => Err(format!(
                "unknown backend state {other:?}: use active, draining or disabled"
            )),
        }
    }
}

/// A backend of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Backend {
    pub addr: SocketAddr,
    /// Relative share of new connections; 0 takes none (established ones continue).
    pub weight: u32,
    pub state: AdminState,
}

impl Backend {
    /// An active backend.
    pub fn new(addr: SocketAddr, weight: u32) -> Self {
        Backend {
            addr,
            weight,
            state: AdminState::Active,
        }
    }
}

/// A service and its backends, in the order the operator listed them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub addr: ServiceAddr,
    pub backends: Vec<Backend>,
    /// How the daemon checks the backends' health.
    pub check: HealthCheck,
    /// How the data plane picks the backend of a new connection.
    pub scheduler: Scheduler,
}

/// How a service's new connections are spread over its backends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Scheduler {
    /// Smooth weighted round-robin: each backend's turns evenly spread, per CPU.
    #[default]
    #[serde(rename = "round-robin")]
    RoundRobin,
    /// Maglev consistent hashing of the flow: every orch host with the same backends sends
    /// a new flow to the same backend, and a backend leaving moves about 1/N of the flows.
    #[serde(rename = "maglev")]
    Maglev,
}

impl Scheduler {
    pub const fn name(self) -> &'static str {
        match self {
            Scheduler::RoundRobin => "round-robin",
            Scheduler::Maglev => "maglev",
        }
    }
}

impl std::str::FromStr for Scheduler {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "round-robin" => Ok(Scheduler::RoundRobin),
            "maglev" => Ok(Scheduler::Maglev),
            other => Err(format!(
                "unknown scheduler {other:?}: use round-robin or maglev"
            )),
        }
    }
}

/// What a health check does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// Open a TCP connection to the backend's address.
    #[default]
    Tcp,
    /// `GET path` over HTTP/1.1; healthy when the status is `expect_status`.
    Http,
    /// No active check: the backend is healthy unless the breaker says otherwise.
    None,
}

/// A service's health-check spec. Defaults: TCP connect (none for UDP services), timeout 1 s,
/// healthy after 2 successes, unhealthy after 2 failures, a probe every 20 s while stable and
/// every 500 ms while failing or recovering.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthCheck {
    #[serde(rename = "type")]
    pub kind: CheckKind,
    /// HTTP path (`http` only).
    pub path: String,
    /// Expected HTTP status (`http` only).
    pub expect_status: u16,
    pub timeout_ms: u64,
    /// Consecutive successes that make an unhealthy backend healthy.
    pub rise: u32,
    /// Consecutive failures that make a healthy backend unhealthy.
    pub fall: u32,
    /// Interval while the backend is stable.
    pub interval_ms: u64,
    /// Interval while it is failing or recovering.
    pub fast_interval_ms: u64,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            kind: CheckKind::Tcp,
            path: "/".to_owned(),
            expect_status: 200,
            timeout_ms: 1000,
            rise: 2,
            fall: 2,
            interval_ms: 20_000,
            fast_interval_ms: 500,
        }
    }
}

impl HealthCheck {
    /// The default check for a service of `protocol`: TCP connect, or none for UDP (a UDP
    /// port has nothing to connect to).
    pub fn default_for(protocol: Protocol) -> Self {
        HealthCheck {
            kind: match protocol {
                Protocol::Tcp => CheckKind::Tcp,
                Protocol::Udp => CheckKind::None,
            },
            ..HealthCheck::default()
        }
    }

    /// Every problem with the spec.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let ms = |v: u64, what: &str, lo: u64, hi: u64, p: &mut Vec<String>| {
            if !(lo..=hi).contains(&v) {
                p.push(format!("check.{what} = {v} is outside {lo}..={hi}"));
            }
        };
        ms(self.timeout_ms, "timeout_ms", 10, 60_000, &mut p);
        ms(self.interval_ms, "interval_ms", 100, 3_600_000, &mut p);
        ms(
            self.fast_interval_ms,
            "fast_interval_ms",
            100,
            3_600_000,
            &mut p,
        );
        if self.fast_interval_ms > self.interval_ms {
            p.push(format!(
                "check.fast_interval_ms = {} is longer than check.interval_ms = {}",
                self.fast_interval_ms, self.interval_ms
            ));
        }
        for (what, v) in [("rise", self.rise), ("fall", self.fall)] {
            if !(1..=100).contains(&v) {
                p.push(format!("check.{what} = {v} is outside 1..=100"));
            }
        }
        if self.kind == CheckKind::Http {
            if !self.path.starts_with('/')
                || self
                    .path
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control())
            {
                p.push(format!(
                    "check.path {:?} must start with '/' and contain no spaces",
                    self.path
                ));
            }
            if !(100..=599).contains(&self.expect_status) {
                p.push(format!(
                    "check.expect_status = {} is not an HTTP status",
                    self.expect_status
                ));
            }
        }
        p
    }
}

impl Service {
    /// The service as the data plane should see it: disabled backends left out; draining
    /// ones, and those `usable` rejects (unhealthy, breaker open), with weight 0: kept, so
    /// their established connections are still counted, but given no new ones.
    pub fn for_dataplane(&self, usable: impl Fn(SocketAddr) -> bool) -> Service {
        Service {
            name: self.name.clone(),
            addr: self.addr,
            check: self.check.clone(),
            scheduler: self.scheduler,
            backends: self
                .backends
                .iter()
                .filter(|b| b.state != AdminState::Disabled)
                .map(|b| Backend {
                    weight: if b.state == AdminState::Active && usable(b.addr) {
                        b.weight
                    } else {
                        0
                    },
                    ..*b
                })
                .collect(),
        }
    }
}

impl Service {
    /// Whether the service is in panic: fewer than `threshold_percent` of its enabled
    /// backends (active, weight > 0) are `usable`, or none is. A service in panic balances
    /// over every enabled backend: health verdicts that empty a service, or most of it, are
    /// more likely wrong (a partition, an overloaded probe path, forged signals) than right,
    /// and a try at a backend beats a certain drop. A service with no enabled backend is not
    /// in panic: it has nothing to fall back on.
    pub fn in_panic(&self, usable: impl Fn(SocketAddr) -> bool, threshold_percent: u8) -> bool {
        let enabled: Vec<&Backend> = self
            .backends
            .iter()
            .filter(|b| b.state == AdminState::Active && b.weight > 0)
            .collect();
        let healthy = enabled.iter().filter(|b| usable(b.addr)).count();
        !enabled.is_empty()
            && (healthy == 0 || healthy * 100 < enabled.len() * threshold_percent as usize)
    }
}

/// Largest accepted backend weight: weights are relative, and this leaves room to express
/// any ratio an operator needs without overflowing the table arithmetic.
pub const MAX_WEIGHT: u32 = 10_000;
/// Most backends one service can have: each needs at least one slot of its table.
pub const MAX_BACKENDS_PER_SERVICE: usize = orch_common::SLOTS_PER_TABLE as usize;

/// A service name: 1-63 characters of `a-z A-Z 0-9 . _ -` (safe in a URL, a shell and a
/// metrics label).
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = (1..=63).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "service name {name:?} must be 1-63 characters of a-z, A-Z, 0-9, '.', '_', '-'"
        ))
    }
}

/// A VIP must be a unicast address.
pub fn check_vip(vip: IpAddr) -> Result<(), String> {
    if vip.is_unspecified() || vip.is_multicast() || vip == IpAddr::from([255, 255, 255, 255]) {
        Err(format!(
            "VIP {vip} cannot receive connections: use a unicast address"
        ))
    } else {
        Ok(())
    }
}

/// A service port is 1-65535.
pub fn check_port(port: u16) -> Result<(), String> {
    if port == 0 {
        Err("port 0 is not a valid service port".to_owned())
    } else {
        Ok(())
    }
}

/// Everything wrong with backend `addr` of a service at `vip`.
pub fn check_backend(vip: IpAddr, addr: SocketAddr) -> Vec<String> {
    let mut problems = Vec::new();
    if addr.port() == 0 {
        problems.push(format!("backend {addr}: port 0 is not valid"));
    }
    if addr.ip().is_unspecified() || addr.ip().is_multicast() {
        problems.push(format!("backend {addr}: use a unicast address"));
    }
    if addr.is_ipv4() != vip.is_ipv4() {
        problems.push(format!(
            "backend {addr} is not of the same IP family as VIP {vip}; \
             NAT mode cannot translate between IPv4 and IPv6"
        ));
    }
    problems
}

/// A weight is 0..=[`MAX_WEIGHT`].
pub fn check_weight(weight: u32) -> Result<(), String> {
    if weight > MAX_WEIGHT {
        Err(format!(
            "weight {weight} is above the maximum of {MAX_WEIGHT}"
        ))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(backends: &[(&str, u32, AdminState)]) -> Service {
        Service {
            name: "web".into(),
            addr: ServiceAddr {
                vip: "198.19.0.1".parse().unwrap(),
                port: 80,
                protocol: Protocol::Tcp,
            },
            check: Default::default(),
            scheduler: Default::default(),
            backends: backends
                .iter()
                .map(|(a, w, state)| Backend {
                    state: *state,
                    ..Backend::new(a.parse().unwrap(), *w)
                })
                .collect(),
        }
    }

    #[test]
    fn panic_below_the_threshold_or_with_none_healthy() {
        use AdminState::Active;
        let s = service(&[
            ("198.18.1.2:80", 1, Active),
            ("198.18.1.3:80", 1, Active),
            ("198.18.1.4:80", 1, Active),
            ("198.18.1.5:80", 1, Active),
        ]);
        let healthy = |n: usize| {
            let up: Vec<SocketAddr> = s.backends.iter().take(n).map(|b| b.addr).collect();
            move |a: SocketAddr| up.contains(&a)
        };
        // 50 %: two of four is not below it, one is.
        assert!(!s.in_panic(healthy(4), 50));
        assert!(!s.in_panic(healthy(2), 50));
        assert!(s.in_panic(healthy(1), 50));
        // 0 %: only an empty rotation panics.
        assert!(!s.in_panic(healthy(1), 0));
        assert!(s.in_panic(healthy(0), 0));
        // 100 %: any backend out.
        assert!(s.in_panic(healthy(3), 100));
    }

    #[test]
    fn only_enabled_backends_count() {
        use AdminState::{Active, Disabled, Draining};
        let s = service(&[
            ("198.18.1.2:80", 1, Active),
            ("198.18.1.3:80", 0, Active),
            ("198.18.1.4:80", 1, Draining),
            ("198.18.1.5:80", 1, Disabled),
        ]);
        let only_first = |a: SocketAddr| a == "198.18.1.2:80".parse().unwrap();
        assert!(!s.in_panic(only_first, 100), "1 of 1 enabled is healthy");
        assert!(s.in_panic(|_| false, 0));
        // A drained or disabled service has nothing to fall back on: no panic.
        let drained = service(&[("198.18.1.2:80", 1, Draining)]);
        assert!(!drained.in_panic(|_| false, 50));
    }
}
