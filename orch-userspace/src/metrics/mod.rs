//! Metrics: what the daemon counts, and the Prometheus text served at `/metrics`.
//!
//! Two kinds of series, built two ways:
//! - Daemon events (probes, breaker transitions, registry operations, reloads, map syncs)
//!   are counted as they happen, in a `prometheus::Registry` owned by [`Metrics`].
//! - Everything that is state rather than an event (kernel counters, connection-table
//!   occupancy, health, breaker state) is read at scrape time into a [`Snapshot`] and
//!   rendered fresh. Kernel counters live in per-CPU maps and are summed over CPUs then:
//!   nothing on the packet path ever touches a shared counter.
//!
//! Cardinality is bounded by the configured services: snapshot series exist only for
//! services that exist, and [`Metrics::sync_backends`] removes the event series of services and
//! backends that were removed.
//!
//! The metric list with types, labels and units is in the README ("Metrics"); a test checks
//! that every name the shipped Grafana dashboard uses is served by a live daemon.

use std::{
    collections::{HashMap, HashSet},
    convert::Infallible,
    net::SocketAddr,
    time::Duration,
};

use http_body_util::Full;
use hyper::{body::Bytes, header, Method, Request, Response, StatusCode};
use orch_common::{
    maps::{BackendSignals, TrafficCounters, HANDSHAKE_BUCKETS_US},
    Reason,
};
use prometheus::{
    core::Collector,
    proto::{self, MetricFamily, MetricType},
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
    TextEncoder,
};
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot},
};
use tracing::{debug, info, warn};

use crate::health::{breaker, BackendEvents};

/// Seconds buckets for probe latency and map syncs: 100 µs to 5 s.
const LATENCY_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 1.0, 5.0,
];

/// The daemon's event counters. Per-backend events are not here but in [`BackendEvents`],
/// rendered at scrape: a labelled Prometheus series costs about a kilobyte, and five per
/// backend made 400 MB of a daemon with 80,000 backends.
pub struct Metrics {
    registry: Registry,
    health_check_seconds: HistogramVec,
    registry_ops: IntCounterVec,
    config_reloads: IntCounterVec,
    map_sync_seconds: Histogram,
    map_sync_errors: IntCounter,
    conntrack_expired: IntCounterVec,
}

/// Registry operations, as the `operation` label names them.
pub const REGISTRY_OPERATIONS: [&str; 5] = [
    "service_add",
    "service_rm",
    "backend_add",
    "backend_rm",
    "backend_set_state",
];

/// Outcome of a registry operation: committed, refused (bad input, conflict, capacity:
/// nothing changed), or failed inside the daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpResult {
    Ok,
    Refused,
    Error,
}

impl OpResult {
    fn label(self) -> &'static str {
        match self {
            OpResult::Ok => "ok",
            OpResult::Refused => "refused",
            OpResult::Error => "error",
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let health_check_seconds = HistogramVec::new(
            HistogramOpts::new(
                "orch_health_check_duration_seconds",
                "Latency of successful health check probes.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["service"],
        )
        .expect("valid metric");
        let registry_ops = IntCounterVec::new(
            Opts::new(
                "orch_registry_operations_total",
                "Registry changes requested through the admin API, by result.",
            ),
            &["operation", "result"],
        )
        .expect("valid metric");
        let config_reloads = IntCounterVec::new(
            Opts::new(
                "orch_config_reloads_total",
                "Config file reloads, by result (ok or failed: a failed reload changes nothing).",
            ),
            &["result"],
        )
        .expect("valid metric");
        let map_sync_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "orch_map_sync_duration_seconds",
                "Time to bring the eBPF maps in line with the desired state.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        let conntrack_expired = IntCounterVec::new(
            Opts::new(
                "orch_conntrack_expired_total",
                "Connections the daemon removed from the connection tables, by reason: \
                 closed, idle, unconfirmed (handshake never completed), orphan (a reply \
                 entry without its forward entry).",
            ),
            &["reason"],
        )
        .expect("valid metric");
        for e in crate::dataplane::Expiry::ALL {
            conntrack_expired.with_label_values(&[e.name()]);
        }
        let map_sync_errors = IntCounter::new(
            "orch_map_sync_errors_total",
            "Map syncs that failed (the data plane kept its previous state).",
        )
        .expect("valid metric");

        // Every label value of a fixed set exists from the start, so a dashboard's rate()
        // has a zero to start from rather than a missing series.
        for op in REGISTRY_OPERATIONS {
            for r in [OpResult::Ok, OpResult::Refused, OpResult::Error] {
                registry_ops.with_label_values(&[op, r.label()]);
            }
        }
        for r in ["ok", "failed"] {
            config_reloads.with_label_values(&[r]);
        }

        for c in [
            Box::new(health_check_seconds.clone()) as Box<dyn Collector>,
            Box::new(registry_ops.clone()),
            Box::new(config_reloads.clone()),
            Box::new(map_sync_seconds.clone()),
            Box::new(map_sync_errors.clone()),
            Box::new(conntrack_expired.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        // The process collector reads /proc/self: RSS, CPU, open files, start time.
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("metric names are unique");

        Metrics {
            registry,
            health_check_seconds,
            registry_ops,
            config_reloads,
            map_sync_seconds,
            map_sync_errors,
            conntrack_expired,
        }
    }

    /// Counts connections the expiry removed.
    pub fn conntrack_expired(&self, expired: &crate::dataplane::Expired) {
        for e in crate::dataplane::Expiry::ALL {
            let n = expired.removed[e as usize];
            if n > 0 {
                self.conntrack_expired
                    .with_label_values(&[e.name()])
                    .inc_by(n);
            }
        }
    }

    /// Records the latency of a successful probe of a backend of `service` (the count per
    /// backend is in its [`BackendEvents`]).
    pub fn probe_latency(&self, service: &str, latency: Duration) {
        self.health_check_seconds
            .with_label_values(&[service])
            .observe(latency.as_secs_f64());
    }

    /// Counts a registry operation (one of [`REGISTRY_OPERATIONS`]).
    pub fn registry_op(&self, operation: &'static str, result: OpResult) {
        self.registry_ops
            .with_label_values(&[operation, result.label()])
            .inc();
    }

    /// Counts a config reload.
    pub fn config_reload(&self, ok: bool) {
        self.config_reloads
            .with_label_values(&[if ok { "ok" } else { "failed" }])
            .inc();
    }

    /// Records one map sync.
    pub fn map_sync(&self, took: Duration, ok: bool) {
        self.map_sync_seconds.observe(took.as_secs_f64());
        if !ok {
            self.map_sync_errors.inc();
        }
    }

    /// Follows the set of backends: `backends` holds every (service, backend) pair there
    /// is. Series of removed services are dropped (cardinality follows the config, never
    /// history); new ones get their series at zero, so a dashboard's `rate()` has a
    /// starting point before the first event. (Per-backend series are rendered from the
    /// snapshot, so they come and go with the backends by construction.)
    pub fn sync_backends(&self, backends: &HashSet<(String, SocketAddr)>) {
        let services: HashSet<&str> = backends.iter().map(|(s, _)| s.as_str()).collect();
        for service in &services {
            self.health_check_seconds.with_label_values(&[service]);
        }
        let keep = |labels: &HashMap<&str, &str>| {
            labels
                .get("service")
                .is_none_or(|service| services.contains(service))
        };
        retain_vec(&self.health_check_seconds, &keep);
    }

    /// The text exposition of everything: the event counters and `snapshot`.
    pub fn render(&self, snapshot: &Snapshot) -> String {
        let mut families = self.registry.gather();
        families.extend(snapshot.families());
        families.sort_by(|a, b| a.name().cmp(b.name()));
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&families, &mut out)
            .expect("writing to a Vec cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

/// Removes from a metric vector every series whose labels `keep` refuses.
fn retain_vec<C: Collector + RemoveLabels>(vec: &C, keep: &impl Fn(&HashMap<&str, &str>) -> bool) {
    for family in vec.collect() {
        for m in family.get_metric() {
            let labels: HashMap<&str, &str> = m
                .get_label()
                .iter()
                .map(|l| (l.name(), l.value()))
                .collect();
            if !keep(&labels) {
                vec.remove_labels(&labels);
            }
        }
    }
}

/// The removal method both vector kinds have, under one name.
trait RemoveLabels {
    fn remove_labels(&self, labels: &HashMap<&str, &str>);
}

impl RemoveLabels for IntCounterVec {
    fn remove_labels(&self, labels: &HashMap<&str, &str>) {
        let _ = self.remove(labels);
    }
}

impl RemoveLabels for HistogramVec {
    fn remove_labels(&self, labels: &HashMap<&str, &str>) {
        let _ = self.remove(labels);
    }
}

/// State read at scrape time: the kernel's counters summed over CPUs, and what the daemon
/// knows of each backend.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The program's verdict counters.
    pub reasons: Vec<(Reason, u64)>,
    /// Entries in the confirmed-connection table (two per connection), and its capacity.
    pub conntrack_entries: u64,
    pub conntrack_capacity: u64,
    /// Entries in the unconfirmed table, and its capacity.
    pub unconfirmed_entries: u64,
    pub unconfirmed_capacity: u64,
    /// The program's connection-table events.
    pub ct_events: crate::dataplane::CtEvents,
    pub services: Vec<ServiceSample>,
    /// Services and backends known to the daemon.
    pub backends_total: u64,
    pub uptime: Duration,
}

/// One service at scrape time.
#[derive(Clone, Debug, Default)]
pub struct ServiceSample {
    pub name: String,
    /// Whether health put the service in panic (it balances over all enabled backends).
    pub panic: bool,
    pub traffic: TrafficCounters,
    pub backends: Vec<BackendSample>,
}

/// One backend at scrape time.
#[derive(Clone, Debug)]
pub struct BackendSample {
    pub addr: SocketAddr,
    pub traffic: TrafficCounters,
    pub signals: BackendSignals,
    /// The data plane ejected it (it refused a connection) and the daemon has not yet
    /// lifted the ejection.
    pub ejected: bool,
    /// Connections open in the connection table.
    pub active: u64,
    pub healthy: bool,
    pub in_rotation: bool,
    pub breaker: breaker::State,
    pub events: BackendEvents,
}

impl Snapshot {
    fn families(&self) -> Vec<MetricFamily> {
        let mut f = Families::default();
        let none: &[(&str, &str)] = &[];

        f.gauge(
            "orch_build_info",
            "Always 1; the labels name the build.",
            &[("version", env!("CARGO_PKG_VERSION"))],
            1.0,
        );
        f.gauge(
            "orch_uptime_seconds",
            "Seconds since the daemon started.",
            none,
            self.uptime.as_secs_f64(),
        );
        f.gauge(
            "orch_services",
            "Services configured (file and registry).",
            none,
            self.services.len() as f64,
        );
        f.gauge(
            "orch_backends",
            "Backends configured, over all services.",
            none,
            self.backends_total as f64,
        );

        for (reason, n) in &self.reasons {
            f.counter(
                "orch_xdp_packets_total",
                "Packets seen by the XDP program, by what it did with them (pass_*: \
                 handed to the stack untouched, fwd_*/reply_*: translated, drop_*: dropped).",
                &[("reason", reason.name())],
                *n,
            );
        }
        let full = self
            .reasons
            .iter()
            .find(|(r, _)| *r == Reason::DropConntrackFull)
            .map_or(0, |(_, n)| *n);
        f.counter(
            "orch_conntrack_insert_failures_total",
            "New connections dropped because the connection table refused the insert.",
            none,
            full,
        );
        f.gauge(
            "orch_conntrack_entries",
            "Entries in the confirmed-connection table (two per connection; never evicted, \
             removed when closed or idle).",
            none,
            self.conntrack_entries as f64,
        );
        f.gauge(
            "orch_conntrack_capacity",
            "Capacity of the confirmed-connection table, in entries.",
            none,
            self.conntrack_capacity as f64,
        );
        f.gauge(
            "orch_conntrack_unconfirmed_entries",
            "Entries in the unconfirmed table (handshakes in flight, unanswered UDP flows; \
             LRU: a flood recycles it).",
            none,
            self.unconfirmed_entries as f64,
        );
        f.gauge(
            "orch_conntrack_unconfirmed_capacity",
            "Capacity of the unconfirmed table, in entries.",
            none,
            self.unconfirmed_capacity as f64,
        );
        f.gauge(
            "orch_conntrack_flood",
            "1 when more than half the unconfirmed table is taken: handshakes arrive that \
             never complete (a SYN flood); established connections are out of its reach.",
            none,
            f64::from(u8::from(
                self.unconfirmed_entries * 2 > self.unconfirmed_capacity,
            )),
        );
        f.counter(
            "orch_conntrack_confirmed_total",
            "Connections confirmed (TCP: the client acknowledged the backend's SYN-ACK; \
             UDP: the backend answered) and moved to the confirmed table.",
            none,
            self.ct_events.confirmed,
        );
        f.counter(
            "orch_conntrack_confirm_failures_total",
            "Connections left unconfirmed because the confirmed table was full.",
            none,
            self.ct_events.confirm_failed,
        );
        f.counter(
            "orch_conntrack_reply_collisions_total",
            "New connections whose reply 4-tuple was held by another service's live \
             connection on the same backend: sent to another backend, or dropped \
             (drop_reply_collision) when there was none.",
            none,
            self.ct_events.reply_collisions,
        );
        // Absent, rather than a zero that would be false, where the kernel cannot count.
        if let Some(evicted) = self.ct_events.evicted {
            f.counter(
                "orch_conntrack_unconfirmed_evictions_total",
                "Entries the kernel evicted from the full unconfirmed table to make room for \
                 new ones (two per connection: a flood's half-open connections, or the \
                 handshakes it pushed out). Derived from exact counts; an operation in \
                 flight can delay an eviction's count, never invent one.",
                none,
                evicted,
            );
        }

        for s in &self.services {
            let svc = [("service", s.name.as_str())];
            traffic(&mut f, "service", &svc, &s.traffic);
            f.counter(
                "orch_service_connections_total",
                "New connections balanced to a backend of the service.",
                &svc,
                s.traffic.new_conns,
            );
            f.counter(
                "orch_service_no_backend_drops_total",
                "New connections dropped because the service had no backend in rotation.",
                &svc,
                s.traffic.no_backend,
            );
            f.gauge(
                "orch_service_panic",
                "1 when too few of the service's enabled backends are healthy to trust the \
                 checks ([health] panic_threshold): it balances over all of them.",
                &svc,
                f64::from(u8::from(s.panic)),
            );
            for b in &s.backends {
                let addr = b.addr.to_string();
                let labels = [("service", s.name.as_str()), ("backend", addr.as_str())];
                traffic(&mut f, "backend", &labels, &b.traffic);
                f.counter(
                    "orch_backend_connections_total",
                    "New connections balanced to the backend.",
                    &labels,
                    b.traffic.new_conns,
                );
                f.gauge(
                    "orch_backend_active_connections",
                    "Open connections to the backend in the connection table (TCP until \
                     RST or both FINs, UDP until the idle timeout).",
                    &labels,
                    b.active as f64,
                );
                f.gauge(
                    "orch_backend_healthy",
                    "1 when active health checks find the backend healthy.",
                    &labels,
                    f64::from(u8::from(b.healthy)),
                );
                f.gauge(
                    "orch_backend_in_rotation",
                    "1 when new connections may go to the backend (enabled, weight > 0, \
                     healthy, breaker not open).",
                    &labels,
                    f64::from(u8::from(b.in_rotation)),
                );
                f.gauge(
                    "orch_backend_ejected",
                    "1 while the data plane keeps new connections off the backend because \
                     it refused one.",
                    &labels,
                    f64::from(u8::from(b.ejected)),
                );
                for (result, n) in [("up", b.events.probes_up), ("down", b.events.probes_down)] {
                    f.counter(
                        "orch_health_checks_total",
                        "Active health check probes by result (up or down).",
                        &[
                            ("service", s.name.as_str()),
                            ("backend", addr.as_str()),
                            ("result", result),
                        ],
                        n,
                    );
                }
                for state in [
                    breaker::State::Closed,
                    breaker::State::Open,
                    breaker::State::HalfOpen,
                ] {
                    let to = [
                        ("service", s.name.as_str()),
                        ("backend", addr.as_str()),
                        ("to", state.name()),
                    ];
                    f.counter(
                        "orch_breaker_transitions_total",
                        "Circuit breaker state changes, by the state entered.",
                        &to,
                        b.events.transitions_into(state),
                    );
                    f.gauge(
                        "orch_breaker_state",
                        "1 for the state the backend's circuit breaker is in.",
                        &[
                            ("service", s.name.as_str()),
                            ("backend", addr.as_str()),
                            ("state", state.name()),
                        ],
                        f64::from(u8::from(b.breaker == state)),
                    );
                }
                f.counter(
                    "orch_backend_refused_total",
                    "SYNs the backend answered with RST (seen by the data plane).",
                    &labels,
                    b.signals.refused,
                );
                f.counter(
                    "orch_backend_syn_retransmits_total",
                    "Client SYN retransmissions on connections to the backend: attempts \
                     the backend left unanswered.",
                    &labels,
                    b.signals.syn_retrans,
                );
                f.handshakes(&labels, &b.signals);
            }
        }
        f.0.into_values().collect()
    }
}

/// Packets and bytes in both directions of one service or backend.
fn traffic(f: &mut Families, of: &str, labels: &[(&str, &str)], c: &TrafficCounters) {
    let with = |dir: &'static str| {
        let mut v = labels.to_vec();
        v.push(("direction", dir));
        v
    };
    let (packets, bytes) = (
        format!("orch_{of}_packets_total"),
        format!("orch_{of}_bytes_total"),
    );
    let help_p = format!(
        "Packets translated for the {of}, by direction (to_backend: client to backend, \
         to_client: the replies)."
    );
    let help_b = format!("IP bytes (headers included) translated for the {of}, by direction.");
    f.counter(&packets, &help_p, &with("to_backend"), c.fwd_packets);
    f.counter(&packets, &help_p, &with("to_client"), c.reply_packets);
    f.counter(&bytes, &help_b, &with("to_backend"), c.fwd_bytes);
    f.counter(&bytes, &help_b, &with("to_client"), c.reply_bytes);
}

/// Metric families under construction, by name.
#[derive(Default)]
struct Families(std::collections::BTreeMap<String, MetricFamily>);

impl Families {
    fn push(
        &mut self,
        name: &str,
        help: &str,
        kind: MetricType,
        labels: &[(&str, &str)],
    ) -> &mut proto::Metric {
        let family = self.0.entry(name.to_owned()).or_insert_with(|| {
            let mut f = MetricFamily::default();
            f.set_name(name.to_owned());
            f.set_help(help.to_owned());
            f.set_field_type(kind);
            f
        });
        let mut labels = labels.to_vec();
        labels.sort_unstable();
        let mut m = proto::Metric::default();
        m.set_label(
            labels
                .iter()
                .map(|(k, v)| {
                    let mut l = proto::LabelPair::default();
                    l.set_name((*k).to_owned());
                    l.set_value((*v).to_owned());
                    l
                })
                .collect(),
        );
        family.mut_metric().push(m);
        family.mut_metric().last_mut().expect("just pushed")
    }

    fn counter(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: u64) {
        let mut c = proto::Counter::default();
        c.set_value(value as f64);
        self.push(name, help, MetricType::COUNTER, labels)
            .set_counter(c);
    }

    fn gauge(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: f64) {
        let mut g = proto::Gauge::default();
        g.set_value(value);
        self.push(name, help, MetricType::GAUGE, labels)
            .set_gauge(g);
    }

    /// The kernel's handshake histogram, rebuilt as a Prometheus histogram (cumulative
    /// buckets in seconds; the kernel's last bucket is +Inf).
    fn handshakes(&mut self, labels: &[(&str, &str)], s: &BackendSignals) {
        let mut h = proto::Histogram::default();
        h.set_sample_count(s.handshakes);
        h.set_sample_sum(s.handshake_ns as f64 / 1e9);
        let mut cumulative = 0;
        let mut buckets = Vec::new();
        for (i, upper_us) in HANDSHAKE_BUCKETS_US.iter().enumerate() {
            cumulative += s.handshake_hist[i];
            if *upper_us == u64::MAX {
                break; // +Inf is implied by the sample count
            }
            let mut b = proto::Bucket::default();
            b.set_upper_bound(*upper_us as f64 / 1e6);
            b.set_cumulative_count(cumulative);
            buckets.push(b);
        }
        h.set_bucket(buckets);
        self.push(
            "orch_backend_handshake_duration_seconds",
            "Time from a balanced SYN to the backend's SYN-ACK, as the data plane saw it.",
            MetricType::HISTOGRAM,
            labels,
        )
        .set_histogram(h);
    }
}

/// A scrape on its way to the daemon's main loop, with where to send the text.
pub type Scrape = oneshot::Sender<String>;

/// Why `/metrics` could not be started.
#[derive(Debug, thiserror::Error)]
#[error("listening for metrics on {addr}")]
pub struct ListenError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ListenError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ListenError { addr, source })?;
    info!(%addr, "metrics at http://{addr}/metrics");
    Ok(listener)
}

/// Serves `GET /metrics` forever: each scrape asks the main loop for the text through
/// `scrapes`, so the maps are read by their one owner. Anything else is refused: the
/// endpoint is read-only.
pub async fn serve(listener: TcpListener, scrapes: mpsc::Sender<Scrape>) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                warn!(error = %e, "accepting a metrics connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let scrapes = scrapes.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| answer(req, scrapes.clone()));
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                debug!(error = %e, "metrics connection ended with an error");
            }
        });
    }
}

async fn answer(
    req: Request<hyper::body::Incoming>,
    scrapes: mpsc::Sender<Scrape>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET: the metrics endpoint is read-only\n".into(),
        );
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return Ok(r);
    }
    match req.uri().path() {
        "/metrics" => {
            let (tx, rx) = oneshot::channel();
            let text = match scrapes.send(tx).await {
                Ok(()) => rx.await.ok(),
                Err(_) => None,
            };
            Ok(match text {
                Some(text) => {
                    let mut r = reply(StatusCode::OK, text);
                    r.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static("text/plain; version=0.0.4"),
                    );
                    r
                }
                None => reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the daemon is shutting down\n".into(),
                ),
            })
        }
        "/" => Ok(reply(StatusCode::OK, "orch: metrics at /metrics\n".into())),
        other => Ok(reply(
            StatusCode::NOT_FOUND,
            format!("no {other} here: metrics are at /metrics\n"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        let mut signals = BackendSignals {
            handshakes: 3,
            handshake_ns: 600_000,
            refused: 1,
            ..Default::default()
        };
        signals.handshake_hist[BackendSignals::bucket(80_000)] = 2;
        signals.handshake_hist[BackendSignals::bucket(440_000)] = 1;
        Snapshot {
            reasons: vec![(Reason::FwdRedirect, 7), (Reason::DropConntrackFull, 2)],
            conntrack_entries: 4,
            conntrack_capacity: 100,
            unconfirmed_entries: 60,
            unconfirmed_capacity: 100,
            ct_events: crate::dataplane::CtEvents {
                confirmed: 5,
                confirm_failed: 1,
                reply_collisions: 2,
                evicted: Some(9),
            },
            services: vec![ServiceSample {
                name: "web".into(),
                panic: true,
                traffic: TrafficCounters {
                    fwd_packets: 10,
                    new_conns: 3,
                    ..Default::default()
                },
                backends: vec![BackendSample {
                    addr: "198.18.1.2:8080".parse().unwrap(),
                    traffic: TrafficCounters {
                        fwd_packets: 10,
                        reply_bytes: 1500,
                        new_conns: 3,
                        ..Default::default()
                    },
                    signals,
                    ejected: false,
                    active: 2,
                    healthy: true,
                    in_rotation: true,
                    breaker: breaker::State::HalfOpen,
                    events: BackendEvents {
                        probes_up: 4,
                        probes_down: 1,
                        transitions: [0, 1, 1],
                    },
                }],
            }],
            backends_total: 1,
            uptime: Duration::from_secs(5),
        }
    }

    /// The value of the sample `name{labels}` in `text`, exactly as written.
    fn value(text: &str, series: &str) -> Option<String> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ').map(str::to_owned))
    }

    #[test]
    fn uncounted_evictions_are_absent_not_zero() {
        let mut snapshot = sample();
        snapshot.ct_events.evicted = None;
        let text = Metrics::new().render(&snapshot);
        assert!(!text.contains("orch_conntrack_unconfirmed_evictions_total"));
        assert_eq!(
            value(&text, "orch_conntrack_confirmed_total").as_deref(),
            Some("5")
        );
    }

    #[test]
    fn snapshot_series_carry_the_kernel_counts_and_state() {
        let text = Metrics::new().render(&sample());
        let b = r#"backend="198.18.1.2:8080",service="web""#;
        let cases = [
            (r#"orch_xdp_packets_total{reason="fwd_redirect"}"#.to_string(), "7"),
            ("orch_conntrack_insert_failures_total".into(), "2"),
            ("orch_conntrack_entries".into(), "4"),
            (
                r#"orch_service_packets_total{direction="to_backend",service="web"}"#.into(),
                "10",
            ),
            (r#"orch_service_connections_total{service="web"}"#.into(), "3"),
            (r#"orch_service_panic{service="web"}"#.into(), "1"),
            ("orch_conntrack_unconfirmed_entries".into(), "60"),
            ("orch_conntrack_flood".into(), "1"),
            ("orch_conntrack_confirmed_total".into(), "5"),
            ("orch_conntrack_confirm_failures_total".into(), "1"),
            ("orch_conntrack_reply_collisions_total".into(), "2"),
            ("orch_conntrack_unconfirmed_evictions_total".into(), "9"),
            (
                r#"orch_backend_bytes_total{backend="198.18.1.2:8080",direction="to_client",service="web"}"#
                    .into(),
                "1500",
            ),
            (format!("orch_backend_active_connections{{{b}}}"), "2"),
            (format!(r#"orch_breaker_state{{{b},state="half-open"}}"#), "1"),
            (format!(r#"orch_breaker_state{{{b},state="open"}}"#), "0"),
            (format!("orch_backend_refused_total{{{b}}}"), "1"),
            (
                r#"orch_health_checks_total{backend="198.18.1.2:8080",result="up",service="web"}"#.into(),
                "4",
            ),
            (
                r#"orch_health_checks_total{backend="198.18.1.2:8080",result="down",service="web"}"#.into(),
                "1",
            ),
            (
                format!(r#"orch_breaker_transitions_total{{{b},to="open"}}"#),
                "1",
            ),
            (
                format!(r#"orch_breaker_transitions_total{{{b},to="closed"}}"#),
                "0",
            ),
            // 80 µs lands in the 100 µs bucket, 440 µs in the 500 µs one: cumulative counts.
            (
                format!(r#"orch_backend_handshake_duration_seconds_bucket{{{b},le="0.0001"}}"#),
                "2",
            ),
            (
                format!(r#"orch_backend_handshake_duration_seconds_bucket{{{b},le="0.00025"}}"#),
                "2",
            ),
            (
                format!(r#"orch_backend_handshake_duration_seconds_bucket{{{b},le="0.0005"}}"#),
                "3",
            ),
            (
                format!(r#"orch_backend_handshake_duration_seconds_bucket{{{b},le="+Inf"}}"#),
                "3",
            ),
            (format!("orch_backend_handshake_duration_seconds_count{{{b}}}"), "3"),
            (format!("orch_backend_handshake_duration_seconds_sum{{{b}}}"), "0.0006"),
        ];
        for (series, want) in cases {
            assert_eq!(
                value(&text, &series).as_deref(),
                Some(want),
                "{series} in\n{text}"
            );
        }
        assert!(text.contains("# TYPE orch_backend_handshake_duration_seconds histogram"));
        assert!(text.contains("# TYPE orch_xdp_packets_total counter"));
    }

    #[test]
    fn removed_services_lose_their_event_series() {
        let m = Metrics::new();
        let a: SocketAddr = "198.18.1.2:8080".parse().unwrap();
        m.probe_latency("web", Duration::from_millis(1));
        m.probe_latency("db", Duration::from_millis(1));
        let empty = Snapshot::default();
        assert!(m.render(&empty).contains(r#"service="db""#));

        m.sync_backends(&HashSet::from([
            ("web".to_string(), a),
            ("new".to_string(), a),
        ]));
        let after = m.render(&empty);
        assert!(!after.contains(r#"service="db""#), "{after}");
        let count = |service: &str| {
            value(
                &after,
                &format!(r#"orch_health_check_duration_seconds_count{{service="{service}"}}"#),
            )
        };
        assert_eq!(count("web").as_deref(), Some("1"));
        assert_eq!(
            count("new").as_deref(),
            Some("0"),
            "new services start at zero"
        );
    }

    #[test]
    fn fixed_label_sets_start_at_zero() {
        let text = Metrics::new().render(&Snapshot::default());
        assert_eq!(
            value(&text, r#"orch_config_reloads_total{result="failed"}"#).as_deref(),
            Some("0")
        );
        assert_eq!(
            value(
                &text,
                r#"orch_registry_operations_total{operation="service_add",result="refused"}"#
            )
            .as_deref(),
            Some("0")
        );
        assert!(text.contains("process_resident_memory_bytes"), "{text}");
    }
}
