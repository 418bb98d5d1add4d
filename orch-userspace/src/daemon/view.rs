//! What readers see: the daemon's state published as an immutable [`View`], and the
//! answers built from it off the event loop.
//!
//! The loop publishes a new view after every change it makes (a registry change, a
//! reload) before it answers, and at the next tick (100 ms) after health moved. Status,
//! list and explain requests and `/metrics` scrapes are answered from the latest view, the
//! kernel's counters (read through a [`Reader`]) and a fresh connection census, on tokio's
//! blocking threads: however large the connection table, and however many scrapes come,
//! the loop that probes, balances and applies changes never waits for them.

use std::{collections::BTreeSet, net::SocketAddr, path::Path, sync::Arc};

use tokio::sync::watch;

use super::{census::Censuses, member::Reach};
use crate::{
    api::{
        ApiError, BackendInfo, BackendRow, BreakerState, ClusterStatus, ErrorKind, Explanation,
        Health, NodeInfo, Reply, Request, ServiceInfo, Source, StatusInfo, API_VERSION,
    },
    config::Config,
    dataplane::{Census, Dataplane, Reader},
    explain,
    health::{breaker, BackendEvents, Verdicts},
    metrics::{BackendSample, Metrics, ServiceSample, Snapshot},
    model::{CheckKind, Service},
    reconcile::Reconciler,
};

/// The daemon's state as readers see it.
#[derive(Debug, Default)]
pub struct View {
    services: Vec<ServiceView>,
    /// Everything of `status` but the uptime.
    status: StatusInfo,
    started: Option<std::time::Instant>,
    conntrack_capacity: u64,
    unconfirmed_capacity: u64,
    udp_idle_ns: u64,
    /// The cgroup socket-level balancing serves, when it is on.
    socket_lb: Option<std::path::PathBuf>,
    /// Since when the cluster is in its state, and its hosts.
    cluster_since: Option<std::time::Instant>,
    nodes: Vec<NodeInfo>,
}

#[derive(Debug)]
struct ServiceView {
    service: Service,
    source: Source,
    id: Option<u32>,
    panic: bool,
    backends: Vec<BackendView>,
}

#[derive(Debug)]
struct BackendView {
    id: Option<u32>,
    health: Health,
    healthy: bool,
    breaker: breaker::State,
    in_rotation: bool,
    events: BackendEvents,
}

fn breaker_state(s: breaker::State) -> BreakerState {
    match s {
        breaker::State::Closed => BreakerState::Closed,
        breaker::State::Open => BreakerState::Open,
        breaker::State::HalfOpen => BreakerState::HalfOpen,
    }
}

/// What a view is made of, lent by the daemon.
pub(super) struct Parts<'a> {
    pub sourced: Vec<(&'a Service, Source)>,
    pub verdicts: &'a Verdicts,
    pub reconciler: &'a Reconciler,
    pub dp: &'a Dataplane,
    pub config: &'a Config,
    pub registry: &'a Path,
    pub missing: &'a BTreeSet<String>,
    pub panicking: &'a BTreeSet<String>,
    /// Reloads, failed reloads, probes.
    pub counts: [u64; 3],
    pub last_reload_error: Option<&'a str>,
    pub started: std::time::Instant,
    pub cluster: Option<&'a super::member::Member>,
}

impl View {
    /// The view of the daemon's `parts` now.
    pub(super) fn of(d: Parts<'_>) -> View {
        let threshold = d.config.panic_threshold;
        let services: Vec<ServiceView> = d
            .sourced
            .iter()
            .map(|&(s, source)| {
                let panic = d.verdicts.in_panic(s, threshold);
                let backends = s
                    .backends
                    .iter()
                    .map(|b| {
                        let h = d.verdicts.get(&s.name, b.addr);
                        let healthy = h.is_none_or(|h| h.healthy());
                        BackendView {
                            id: d.reconciler.backend_id(&s.addr, b.addr),
                            health: match (s.check.kind, healthy) {
                                (CheckKind::None, _) => Health::Unchecked,
                                (_, false) => Health::Unhealthy,
                                (_, true) => Health::Healthy,
                            },
                            healthy,
                            breaker: h.map_or(breaker::State::Closed, |h| h.breaker_state()),
                            in_rotation: d.verdicts.in_rotation(&s.name, b, panic),
                            events: h.map(|h| h.events()).unwrap_or_default(),
                        }
                    })
                    .collect();
                ServiceView {
                    service: s.clone(),
                    source,
                    id: d.reconciler.service_id(&s.addr),
                    panic,
                    backends,
                }
            })
            .collect();
        let capacity = d.dp.capacity();
        let [reloads, reload_failures, probes] = d.counts;
        View {
            status: StatusInfo {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                api: API_VERSION,
                pid: std::process::id(),
                uptime_secs: 0,
                config: d.config.path().to_owned(),
                registry: d.registry.to_owned(),
                pin_dir: d.config.fixed.pin_dir.clone(),
                interfaces: d
                    .dp
                    .attached()
                    .map(|(i, hook)| format!("{i} ({})", hook.name()))
                    .chain(d.missing.iter().map(|i| format!("{i} (missing)")))
                    .collect(),
                adopted: d.dp.adopted(),
                services: services.len(),
                backends: services.iter().map(|s| s.backends.len()).sum(),
                config_reloads: reloads,
                probes_total: probes,
                config_reload_failures: reload_failures,
                last_reload_error: d.last_reload_error.map(str::to_owned),
                services_in_panic: d.panicking.iter().cloned().collect(),
                cluster: d.cluster.map(|m| {
                    let settings = m.settings();
                    let (state, error) = match &m.reach {
                        Reach::Connecting { .. } => ("connecting", None),
                        Reach::Reachable { .. } => ("reachable", None),
                        Reach::Unreachable { error, .. } => ("unreachable", Some(error.clone())),
                    };
                    ClusterStatus {
                        node: settings.node.clone(),
                        endpoints: settings.endpoints.clone(),
                        prefix: settings.prefix.clone(),
                        state: state.to_owned(),
                        for_secs: 0,
                        error,
                        revision: m.revision,
                        nodes: m.nodes.len(),
                    }
                }),
            },
            services,
            started: Some(d.started),
            conntrack_capacity: u64::from(capacity.conntrack),
            unconfirmed_capacity: u64::from(capacity.conntrack_new),
            udp_idle_ns: d.config.timeouts.udp_idle_ns,
            socket_lb: d.config.fixed.socket_lb.clone(),
            cluster_since: d.cluster.map(|m| m.reach.since()),
            nodes: d.cluster.map_or_else(Vec::new, |m| {
                let now = crate::cluster::unix_now();
                m.nodes
                    .iter()
                    .map(|(name, r)| NodeInfo {
                        name: name.clone(),
                        address: r.address,
                        version: r.version.clone(),
                        started: r.started,
                        seen_secs_ago: now.saturating_sub(r.seen),
                        this_host: *name == m.settings().node,
                    })
                    .collect()
            }),
        }
    }
}

/// Answers reads from the latest view, off the loop.
pub struct Reads {
    pub(super) views: watch::Receiver<Arc<View>>,
    pub(super) reader: Arc<Reader>,
    pub(super) censuses: Arc<Censuses>,
    pub(super) metrics: Arc<Metrics>,
}

impl Reads {
    /// Whether `request` is a read these answer (the rest goes to the loop).
    pub fn serves(request: &Request) -> bool {
        matches!(
            request,
            Request::Status
                | Request::ServiceList
                | Request::ServiceShow { .. }
                | Request::BackendList { .. }
                | Request::Explain { .. }
                | Request::NodeList
        )
    }

    /// Answers a read request.
    pub async fn answer(self: Arc<Self>, request: Request) -> Result<Reply, ApiError> {
        let view = self.views.borrow().clone();
        if matches!(request, Request::Status) {
            let mut status = view.status.clone();
            status.uptime_secs = view.started.map_or(0, |s| s.elapsed().as_secs());
            if let (Some(c), Some(since)) = (status.cluster.as_mut(), view.cluster_since) {
                c.for_secs = since.elapsed().as_secs();
            }
            return Ok(Reply::Status(status));
        }
        if matches!(request, Request::NodeList) {
            if view.status.cluster.is_none() {
                return Err(ApiError::new(
                    ErrorKind::Invalid,
                    "this host is not in a cluster (no [cluster] section in its config)",
                ));
            }
            return Ok(Reply::Nodes(view.nodes.clone()));
        }
        // Refused requests need no census.
        match &request {
            Request::ServiceShow { name }
            | Request::BackendList {
                service: Some(name),
            } if !view.services.iter().any(|s| &s.service.name == name) => {
                return Err(not_found(format!("no service named {name:?}")));
            }
            Request::Explain { client, vip, .. } => check_explain(*client, *vip)?,
            _ => {}
        }
        let census = self.censuses.fresh().await;
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.read(&view, &census, request))
            .await
            .unwrap_or_else(|e| Err(ApiError::new(ErrorKind::Internal, e.to_string())))
    }

    fn read(&self, view: &View, census: &Census, request: Request) -> Result<Reply, ApiError> {
        let infos = |name: Option<&str>| -> Vec<ServiceInfo> {
            view.services
                .iter()
                .filter(|s| name.is_none_or(|n| n == s.service.name))
                .map(|s| self.info(s, census))
                .collect()
        };
        match request {
            Request::ServiceList => Ok(Reply::Services(infos(None))),
            Request::ServiceShow { name } => infos(Some(&name))
                .pop()
                .map(Reply::Service)
                .ok_or_else(|| not_found(format!("no service named {name:?}"))),
            Request::BackendList { service } => Ok(Reply::Backends(
                infos(service.as_deref())
                    .into_iter()
                    .flat_map(|info| {
                        let name = info.name;
                        info.backends.into_iter().map(move |b| BackendRow {
                            service: name.clone(),
                            backend: b,
                        })
                    })
                    .collect(),
            )),
            Request::Explain {
                protocol,
                client,
                vip,
            } => {
                let mut e = Explanation {
                    protocol,
                    client,
                    vip,
                    service: None,
                    path: crate::api::ExplainPath::NotAService,
                    backends: Vec::new(),
                    socket_lb: view.socket_lb.clone(),
                };
                let Some(svc) = view.services.iter().find(|s| {
                    s.service.addr.vip == vip.ip()
                        && s.service.addr.port == vip.port()
                        && s.service.addr.protocol == protocol
                }) else {
                    return Ok(Reply::Explain(e));
                };
                e.service = Some(svc.service.name.clone());
                let (path, named) =
                    explain::query(&self.reader, protocol, client, vip, view.udp_idle_ns).map_err(
                        |e| {
                            ApiError::new(
                                ErrorKind::Internal,
                                format!("reading the data plane: {}", crate::chain(&e)),
                            )
                        },
                    )?;
                e.path = path;
                e.backends = self
                    .info(svc, census)
                    .backends
                    .into_iter()
                    .filter(|b| named.contains(&b.address))
                    .collect();
                Ok(Reply::Explain(e))
            }
            other => Err(ApiError::new(
                ErrorKind::Internal,
                format!("{} is not a read", other.op()),
            )),
        }
    }

    fn info(&self, s: &ServiceView, census: &Census) -> ServiceInfo {
        let svc = &s.service;
        let new_conns = |id: Option<u32>, service: bool| {
            id.and_then(|id| {
                if service {
                    self.reader.service_counters(id).ok()
                } else {
                    self.reader.backend_counters(id).ok()
                }
            })
            .map_or(0, |c| c.new_conns)
        };
        ServiceInfo {
            name: svc.name.clone(),
            vip: svc.addr.vip,
            port: svc.addr.port,
            protocol: svc.addr.protocol,
            source: s.source,
            check: svc.check.clone(),
            scheduler: svc.scheduler,
            connections: new_conns(s.id, true),
            panic: s.panic,
            backends: svc
                .backends
                .iter()
                .zip(&s.backends)
                .map(|(b, v)| BackendInfo {
                    address: b.addr,
                    weight: b.weight,
                    state: b.state,
                    health: v.health,
                    breaker: breaker_state(v.breaker),
                    in_rotation: v.in_rotation,
                    established: v
                        .id
                        .and_then(|id| census.live.get(&id))
                        .copied()
                        .unwrap_or(0),
                    connections: new_conns(v.id, false),
                })
                .collect(),
        }
    }

    /// The Prometheus text: the event counters, and the kernel's counters and the
    /// daemon's view of each backend read now.
    pub async fn scrape(self: Arc<Self>) -> String {
        let view = self.views.borrow().clone();
        let census = self.censuses.current().await;
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.render(&view, &census))
            .await
            .unwrap_or_default()
    }

    fn render(&self, view: &View, census: &Census) -> String {
        let r = &self.reader;
        let warn = |what: &str, e: crate::dataplane::DataplaneError| {
            tracing::warn!(error = %crate::chain(&e), "reading {what} failed");
        };
        let mut snapshot = Snapshot {
            reasons: r.reason_counts().unwrap_or_else(|e| {
                warn("the verdict counters", e);
                Vec::new()
            }),
            sock: r.sock_counts().unwrap_or_default(),
            conntrack_entries: census.entries,
            conntrack_capacity: view.conntrack_capacity,
            unconfirmed_entries: census.unconfirmed,
            unconfirmed_capacity: view.unconfirmed_capacity,
            ct_events: r.ct_events().unwrap_or_default(),
            uptime: view.started.map(|s| s.elapsed()).unwrap_or_default(),
            ..Default::default()
        };
        for s in &view.services {
            let Some(id) = s.id else { continue };
            let mut sample = ServiceSample {
                traffic: r.service_counters(id).unwrap_or_default(),
                name: s.service.name.clone(),
                panic: s.panic,
                backends: Vec::new(),
            };
            for (b, v) in s.service.backends.iter().zip(&s.backends) {
                let Some(bid) = v.id else { continue };
                sample.backends.push(BackendSample {
                    addr: b.addr,
                    traffic: r.backend_counters(bid).unwrap_or_default(),
                    signals: r.backend_signals(bid).unwrap_or_default(),
                    ejected: r.ejected(bid).unwrap_or(false),
                    active: census.live.get(&bid).copied().unwrap_or(0),
                    healthy: v.healthy,
                    in_rotation: v.in_rotation,
                    breaker: v.breaker,
                    events: v.events,
                });
            }
            snapshot.backends_total += s.service.backends.len() as u64;
            snapshot.services.push(sample);
        }
        self.metrics.render(&snapshot)
    }
}

fn check_explain(client: SocketAddr, vip: SocketAddr) -> Result<(), ApiError> {
    let invalid = |m: String| ApiError::new(ErrorKind::Invalid, m);
    if client.is_ipv4() != vip.is_ipv4() {
        return Err(invalid(format!(
            "{client} and {vip} are not of the same address family"
        )));
    }
    if client.port() == 0 || vip.port() == 0 {
        return Err(invalid("ports must be 1-65535".into()));
    }
    Ok(())
}

pub(super) fn not_found(message: String) -> ApiError {
    ApiError::new(ErrorKind::NotFound, message)
}
