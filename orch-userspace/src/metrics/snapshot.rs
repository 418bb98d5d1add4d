//! The state read at scrape time (the kernel's counters summed over CPUs, and what the
//! daemon knows of each backend), turned into metric families.

use std::{net::SocketAddr, time::Duration};

use orch_common::{
    maps::{BackendSignals, SockEvent, TrafficCounters, HANDSHAKE_BUCKETS_US},
    Reason,
};
use prometheus::proto::{self, MetricFamily, MetricType};

use crate::health::{breaker, BackendEvents};

/// State read at scrape time: the kernel's counters summed over CPUs, and what the daemon
/// knows of each backend.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The program's verdict counters.
    pub reasons: Vec<(Reason, u64)>,
    /// Socket-level balancing's counters.
    pub sock: Vec<(SockEvent, u64)>,
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
    pub(super) fn families(&self) -> Vec<MetricFamily> {
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
        for (event, n) in &self.sock {
            f.counter(
                "orch_socket_lb_total",
                "Socket-level balancing: connect() calls to a VIP rewritten to a backend \
                 (connect), unconnected UDP datagrams to a VIP sent to a backend (sendmsg) and \
                 their answers received as from the VIP (recvmsg), getpeername() answered \
                 with the VIP (peername), left alone for want of a backend (no_backend).",
                &[("event", event.name())],
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
