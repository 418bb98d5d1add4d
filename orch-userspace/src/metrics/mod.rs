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

//!
//! - this file: the event counters and the rendering of all of it;
//! - [`snapshot`]: the state read at scrape, as metric families;
//! - [`http`]: the `/metrics` endpoint.

mod http;
mod snapshot;

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    time::Duration,
};

use prometheus::{
    core::Collector, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    Opts, Registry, TextEncoder,
};

pub use http::{bind, serve, ListenError, Scrape};
pub use snapshot::{BackendSample, ServiceSample, Snapshot};

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
    dns_queries: IntCounterVec,
    dns_rate_limited: IntCounter,
    dns_truncated: IntCounter,
    map_sync_seconds: Histogram,
    map_sync_errors: IntCounter,
    conntrack_expired: IntCounterVec,
    /// Registered when the host joins a cluster: a single host has no such series (an
    /// alert on `orch_cluster_reachable == 0` must not fire on it).
    cluster: std::sync::OnceLock<ClusterGauges>,
}

struct ClusterGauges {
    reachable: prometheus::IntGauge,
    revision: prometheus::IntGauge,
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
        let dns_queries = IntCounterVec::new(
            Opts::new(
                "orch_dns_queries_total",
                "DNS queries answered, by query type (A, AAAA, SRV, SOA, ANY, other; none when \
                 the message had no single question) and response code.",
            ),
            &["type", "rcode"],
        )
        .expect("valid metric");
        let dns_rate_limited = IntCounter::new(
            "orch_dns_rate_limited_total",
            "DNS queries refused because the server's query rate limit was reached.",
        )
        .expect("valid metric");
        let dns_truncated = IntCounter::new(
            "orch_dns_truncated_total",
            "DNS answers too large for the client's UDP limit, sent empty with the TC flag \
             (the client asks again over TCP).",
        )
        .expect("valid metric");
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
            Box::new(dns_queries.clone()),
            Box::new(dns_rate_limited.clone()),
            Box::new(dns_truncated.clone()),
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
            dns_queries,
            dns_rate_limited,
            dns_truncated,
            cluster: std::sync::OnceLock::new(),
        }
    }

    fn cluster_gauges(&self) -> &ClusterGauges {
        self.cluster.get_or_init(|| {
            let reachable = prometheus::IntGauge::new(
                "orch_cluster_reachable",
                "1 while etcd answers this host (a quorum is reachable), 0 while it does not: \
                 the host serves its last known state and refuses registry changes.",
            )
            .expect("valid metric");
            let revision = prometheus::IntGauge::new(
                "orch_cluster_revision",
                "The etcd revision of the cluster registry this host has applied.",
            )
            .expect("valid metric");
            for g in [&reachable, &revision] {
                self.registry
                    .register(Box::new(g.clone()))
                    .expect("metric names are unique");
            }
            ClusterGauges {
                reachable,
                revision,
            }
        })
    }

    /// Whether etcd answers this host.
    pub fn cluster_reachable(&self, reachable: bool) {
        self.cluster_gauges().reachable.set(i64::from(reachable));
    }

    /// The cluster revision this host has applied.
    pub fn cluster_revision(&self, revision: i64) {
        self.cluster_gauges().revision.set(revision);
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

    /// Counts a DNS query by its type label and the response code sent.
    pub fn dns_query(&self, qtype: &str, rcode: hickory_proto::op::ResponseCode) {
        let code = match rcode {
            hickory_proto::op::ResponseCode::NoError => "noerror",
            hickory_proto::op::ResponseCode::NXDomain => "nxdomain",
            hickory_proto::op::ResponseCode::Refused => "refused",
            hickory_proto::op::ResponseCode::FormErr => "formerr",
            hickory_proto::op::ResponseCode::NotImp => "notimp",
            _ => "other",
        };
        self.dns_queries.with_label_values(&[qtype, code]).inc();
    }

    /// Counts a DNS query refused by the rate limit.
    pub fn dns_rate_limited(&self) {
        self.dns_rate_limited.inc();
    }

    /// Counts a DNS answer truncated for UDP.
    pub fn dns_truncated(&self) {
        self.dns_truncated.inc();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::{breaker, BackendEvents};
    use orch_common::{
        maps::{BackendSignals, SockEvent, TrafficCounters},
        Reason,
    };

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
            sock: vec![(SockEvent::Connect, 5), (SockEvent::Peername, 4)],
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
            (r#"orch_socket_lb_total{event="connect"}"#.into(), "5"),
            (r#"orch_socket_lb_total{event="peername"}"#.into(), "4"),
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
