//! The admin API: how the CLI (or a script) talks to the daemon.
//!
//! Transport: a Unix stream socket (default [`DEFAULT_SOCKET`], mode 0660, group `orch` when
//! that group exists). Nothing listens on a network address for control; who may change the
//! load balancer is decided by file permissions. The socket appears at its path only with
//! those permissions (it is bound under a temporary name and renamed into place), and orch
//! never replaces anything at that path but a stale socket. A client has [`READ_TIMEOUT`]
//! to send its request and [`MAX_CONNECTIONS`] may be open at once. Every change is logged
//! with the requester's uid and pid (`SO_PEERCRED`).
//!
//! Protocol, version [`API_VERSION`]: one request per connection. The client writes one line
//! of JSON, `{"api": 1, "op": "...", ...arguments}`, and reads one line back:
//! `{"api": 1, "ok": RESULT}` or `{"api": 1, "error": {"kind": KIND, "message": TEXT}}`.
//! Operations and their arguments are the [`Request`] variants (snake_case `op`), results the
//! [`Reply`] variants. A request with another `api` version is refused with kind
//! `unsupported_version`; fields are only ever added within a version.
//!
//! Example:
//! ```text
//! -> {"api":1,"op":"backend_add","service":"web","address":"198.18.1.2:8080","weight":1}
//! <- {"api":1,"ok":{"done":"backend 198.18.1.2:8080 added to service \"web\""}}
//! ```
//!
//! This module holds the wire types only, a leaf that every side may import; the daemon's
//! side is [`server`], the CLI's [`client`].

pub mod client;
pub mod server;

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use serde::{Deserialize, Serialize};

use crate::model::{AdminState, HealthCheck, Protocol, Scheduler};

/// The protocol version this build speaks.
pub const API_VERSION: u32 = 1;

/// A request, as the `op` field names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// The daemon's state at a glance.
    Status,
    /// Every service, from the config file and the registry.
    ServiceList,
    /// One service with its backends.
    ServiceShow { name: String },
    /// Registers a service (and optionally its first backends).
    ServiceAdd {
        name: String,
        vip: IpAddr,
        port: u16,
        protocol: Protocol,
        #[serde(default)]
        backends: Vec<BackendSpec>,
        /// The health check; the protocol's default when absent.
        #[serde(default)]
        check: Option<HealthCheck>,
        /// `round-robin` (the default) or `maglev`.
        #[serde(default)]
        scheduler: Scheduler,
    },
    /// Removes a registered service and its backends.
    ServiceRm { name: String },
    /// Adds a backend to a registered service.
    BackendAdd {
        service: String,
        address: SocketAddr,
        #[serde(default = "default_weight")]
        weight: u32,
    },
    /// Removes a backend from a registered service.
    BackendRm {
        service: String,
        address: SocketAddr,
    },
    /// Sets a backend's admin state (`drain`, `enable`, `disable` in the CLI).
    BackendSetState {
        service: String,
        address: SocketAddr,
        state: AdminState,
    },
    /// The backends of one service, or of all.
    BackendList {
        #[serde(default)]
        service: Option<String>,
    },
    /// Where the data plane steers (or would steer) a flow, and why.
    Explain {
        protocol: Protocol,
        client: SocketAddr,
        vip: SocketAddr,
    },
    /// The hosts of the cluster, as their leases in etcd say.
    NodeList,
}

impl Request {
    /// The operation's wire name (`op`).
    pub const fn op(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::ServiceList => "service_list",
            Request::ServiceShow { .. } => "service_show",
            Request::ServiceAdd { .. } => "service_add",
            Request::ServiceRm { .. } => "service_rm",
            Request::BackendAdd { .. } => "backend_add",
            Request::BackendRm { .. } => "backend_rm",
            Request::BackendSetState { .. } => "backend_set_state",
            Request::BackendList { .. } => "backend_list",
            Request::Explain { .. } => "explain",
            Request::NodeList => "node_list",
        }
    }

    /// Whether it changes the load balancer (and so is logged with who asked).
    pub const fn changes(&self) -> bool {
        matches!(
            self,
            Request::ServiceAdd { .. }
                | Request::ServiceRm { .. }
                | Request::BackendAdd { .. }
                | Request::BackendRm { .. }
                | Request::BackendSetState { .. }
        )
    }
}

fn default_weight() -> u32 {
    1
}

/// A backend in a [`Request::ServiceAdd`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSpec {
    pub address: SocketAddr,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

/// A successful result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Status(StatusInfo),
    Services(Vec<ServiceInfo>),
    Service(ServiceInfo),
    Backends(Vec<BackendRow>),
    /// A change was made (or there was nothing to change); the text says what.
    Done(String),
    Explain(Explanation),
    Nodes(Vec<NodeInfo>),
}

/// A host of the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    pub address: Option<IpAddr>,
    pub version: String,
    /// When its daemon started (Unix seconds).
    pub started: u64,
    /// Seconds since it last renewed its record (every 3 s; gone 10 s after its last).
    pub seen_secs_ago: u64,
    /// The host that answered.
    pub this_host: bool,
}

/// This host's part in a cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub node: String,
    pub endpoints: Vec<String>,
    pub prefix: String,
    /// `connecting`, `reachable` or `unreachable`.
    pub state: String,
    /// Seconds in that state.
    pub for_secs: u64,
    /// Why etcd is unreachable.
    pub error: Option<String>,
    /// The cluster revision this host has applied.
    pub revision: i64,
    /// Hosts with a live lease.
    pub nodes: usize,
}

/// Where a service is defined; only its owner may change it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The config file: change it by editing the file.
    File,
    /// The registry: change it with the CLI or this API.
    Registry,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusInfo {
    pub version: String,
    pub api: u32,
    pub pid: u32,
    pub uptime_secs: u64,
    pub config: PathBuf,
    pub registry: PathBuf,
    pub pin_dir: PathBuf,
    pub interfaces: Vec<String>,
    /// Whether this daemon took over a data plane that was already running.
    pub adopted: bool,
    pub services: usize,
    pub backends: usize,
    pub config_reloads: u64,
    /// Health probes sent since the daemon started.
    pub probes_total: u64,
    pub config_reload_failures: u64,
    /// The last config reload problem, if the last reload failed.
    pub last_reload_error: Option<String>,
    /// Services in panic: too few healthy backends to trust the checks, so they balance
    /// over all their enabled backends.
    #[serde(default)]
    pub services_in_panic: Vec<String>,
    /// In a cluster: its state as this host sees it.
    #[serde(default)]
    pub cluster: Option<ClusterStatus>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceInfo {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub source: Source,
    pub check: HealthCheck,
    #[serde(default)]
    pub scheduler: Scheduler,
    pub backends: Vec<BackendInfo>,
    /// New connections the data plane steered to this service so far.
    pub connections: u64,
    /// In panic: too few healthy backends to trust the checks, so every enabled backend
    /// takes new connections.
    #[serde(default)]
    pub panic: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendInfo {
    pub address: SocketAddr,
    pub weight: u32,
    pub state: AdminState,
    /// What the health checks say.
    pub health: Health,
    /// The circuit breaker's state.
    pub breaker: BreakerState,
    /// Whether new connections go to it now (active, weight > 0, healthy, breaker closed).
    pub in_rotation: bool,
    /// Live connections to it now, counted from the connection table.
    pub established: u64,
    /// New connections the data plane steered to this backend so far.
    pub connections: u64,
}

/// A backend's health verdict as the API reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Healthy,
    Unhealthy,
    /// The service has no health check.
    Unchecked,
}

/// A backend's circuit breaker as the API reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BreakerState {
    /// Traffic flows.
    Closed,
    /// Out of rotation until its cool-down ends.
    Open,
    /// Trial probes decide between closed and open.
    HalfOpen,
}

impl Health {
    pub const fn name(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
            Health::Unchecked => "unchecked",
        }
    }
}

impl BreakerState {
    pub const fn name(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half-open",
        }
    }
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::fmt::Display for BreakerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendRow {
    pub service: String,
    #[serde(flatten)]
    pub backend: BackendInfo,
}

/// The answer to an explain request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Explanation {
    pub protocol: Protocol,
    pub client: SocketAddr,
    pub vip: SocketAddr,
    /// The service at `vip`, if there is one.
    pub service: Option<String>,
    pub path: ExplainPath,
    /// The state of every backend `path` names.
    pub backends: Vec<BackendInfo>,
    /// When socket-level balancing is on: the cgroup whose processes connect to the VIP
    /// straight to a backend (their packets take no translation; `path` is for the rest).
    #[serde(default)]
    pub socket_lb: Option<PathBuf>,
}

/// What the data plane does with the flow's next packet.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ExplainPath {
    /// No service has this address: the packet goes to the kernel stack untouched.
    NotAService,
    /// The connection table has the flow: its packets go to `backend`, whatever the
    /// rotation says now.
    Existing {
        backend: SocketAddr,
        /// Since the entry last recorded a packet (refreshed at most once a second).
        idle_ms: u64,
        /// The client sent FIN or RST: a new SYN from this port is balanced afresh.
        client_closed: bool,
        /// The backend sent FIN or RST.
        backend_closed: bool,
    },
    /// No entry (or a UDP entry idle past the timeout): the next packet is a new connection
    /// and takes the next round-robin slot of the CPU that receives it.
    New {
        /// The backend of a stale UDP entry that will be replaced.
        stale: Option<SocketAddr>,
        /// Slots in the active table.
        slots: u32,
        /// A Maglev service: the flow's hash picks the slot, the same on every CPU.
        #[serde(default)]
        hashed: bool,
        by_cpu: Vec<CpuChoice>,
    },
    /// The service has no backend in rotation: new connections are dropped.
    NoBackend,
}

/// One CPU's next choice for a new connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuChoice {
    pub cpu: u32,
    /// The slot the cursor points at.
    pub slot: u32,
    /// Where the connection goes (after skipping ejected backends).
    pub backend: SocketAddr,
    /// Ejected backends skipped on the way.
    pub skipped: Vec<SocketAddr>,
}

/// Why a request failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

/// Classes of failure; all but `Internal` mean the request was refused and nothing changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Malformed or invalid input (bad address, port 0, unknown field...).
    Invalid,
    /// The named service or backend does not exist.
    NotFound,
    /// Clashes with what exists (duplicate name or VIP, owned by the config file).
    Conflict,
    /// Would not fit the data plane's capacity.
    Capacity,
    /// The cluster store (etcd) cannot be reached: nothing changed; retry later.
    Unavailable,
    /// The cluster store did not confirm the change in time: it may or may not be applied.
    Unconfirmed,
    /// The client speaks another protocol version.
    UnsupportedVersion,
    /// The daemon failed to do something it should have been able to do.
    Internal,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError {
            kind,
            message: message.into(),
        }
    }
}

/// What travels on the wire, both ways: the version plus the body.
#[derive(Debug, Serialize, Deserialize)]
struct Envelope<T> {
    api: u32,
    #[serde(flatten)]
    body: T,
}

// One per request, built and dropped at once: boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Outcome {
    Ok(Reply),
    Error(ApiError),
}

/// Parses one request line, checking the version before anything else.
fn decode(line: &str) -> Result<Request, ApiError> {
    let value: serde_json::Value = serde_json::from_str(line)
        .map_err(|e| ApiError::new(ErrorKind::Invalid, format!("request is not JSON: {e}")))?;
    match value.get("api").and_then(|v| v.as_u64()) {
        Some(v) if v == API_VERSION as u64 => {}
        Some(v) => {
            return Err(ApiError::new(
                ErrorKind::UnsupportedVersion,
                format!("this daemon speaks API version {API_VERSION}, the request {v}"),
            ))
        }
        None => {
            return Err(ApiError::new(
                ErrorKind::Invalid,
                format!("the request has no \"api\" version field (expected {API_VERSION})"),
            ))
        }
    }
    let mut object = value;
    if let Some(map) = object.as_object_mut() {
        map.remove("api");
    }
    serde_json::from_value(object)
        .map_err(|e| ApiError::new(ErrorKind::Invalid, format!("invalid request: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_op_name_is_the_wire_name_and_only_changes_are_changes() {
        let reqs = [
            Request::Status,
            Request::ServiceList,
            Request::ServiceShow { name: "w".into() },
            Request::ServiceRm { name: "w".into() },
            Request::BackendRm {
                service: "w".into(),
                address: "198.18.1.2:80".parse().unwrap(),
            },
            Request::BackendList { service: None },
        ];
        for r in &reqs {
            let v = serde_json::to_value(r).unwrap();
            assert_eq!(v["op"], r.op());
        }
        assert!(!Request::Status.changes() && Request::ServiceRm { name: "w".into() }.changes());
    }

    #[test]
    fn requests_round_trip_with_the_documented_shape() {
        let line = r#"{"api":1,"op":"backend_add","service":"web","address":"198.18.1.2:8080","weight":2}"#;
        let req = decode(line).unwrap();
        assert_eq!(
            req,
            Request::BackendAdd {
                service: "web".into(),
                address: "198.18.1.2:8080".parse().unwrap(),
                weight: 2
            }
        );
        let back = serde_json::to_string(&Envelope {
            api: API_VERSION,
            body: &req,
        })
        .unwrap();
        assert_eq!(back, line);
    }

    #[test]
    fn bad_requests_are_named() {
        let cases = [
            ("not json", ErrorKind::Invalid, "not JSON"),
            (r#"{"op":"status"}"#, ErrorKind::Invalid, "no \"api\""),
            (
                r#"{"api":2,"op":"status"}"#,
                ErrorKind::UnsupportedVersion,
                "version 1",
            ),
            (r#"{"api":1,"op":"explode"}"#, ErrorKind::Invalid, "explode"),
            (
                r#"{"api":1,"op":"backend_add","service":"web","address":"198.18.1.2"}"#,
                ErrorKind::Invalid,
                "socket address",
            ),
            (
                r#"{"api":1,"op":"service_show","name":"web","extra":1}"#,
                ErrorKind::Invalid,
                "extra",
            ),
        ];
        for (line, kind, text) in cases {
            let e = decode(line).unwrap_err();
            assert_eq!(e.kind, kind, "{line}: {e}");
            assert!(e.message.contains(text), "{line}: {e}");
        }
    }
}
