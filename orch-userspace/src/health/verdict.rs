//! Verdicts: whether each backend may take new connections, drawn from probe results and
//! from what the data plane saw.
//!
//! Three inputs move a backend's verdict:
//! - probes ([`Verdicts::on_probe`]): `rise` successes in a row bring a backend back,
//!   `fall` failures in a row take it out; every result also feeds its breaker;
//! - the data plane's signals ([`Verdicts::on_signals`]): a refused connection (or the
//!   data plane's own ejection of the backend) counts as a failure at once; a SYN left
//!   unanswered for many times the backend's usual handshake makes it *suspect*, and the
//!   quick probe that follows decides (failed: out at once; answered: a lost packet);
//! - time ([`Verdicts::poll`]): open breakers turn half-open when their cool-down ends.
//!
//! Then one rule over a whole service ([`Verdicts::in_panic`]): when too few of its
//! backends are usable, the verdicts are not trusted and every enabled backend takes
//! connections.
//!
//! Nothing here touches the data plane or the probes: each method says what the daemon must
//! do (rebalance, probe now, clear an ejection), so the rules are unit-tested on a paused
//! clock.

use std::{net::SocketAddr, time::Duration};

use rustc_hash::FxHashMap;

use orch_common::maps::BackendSignals;
use tokio::time::Instant;
use tracing::{info, warn};

use super::{
    breaker::{self, Breaker, Transition},
    probe::Outcome,
};
use crate::model::{AdminState, Backend, HealthCheck, Service};

/// A SYN unanswered for this many times the backend's usual handshake makes it suspect.
const QUICK_FACTOR: u32 = 50;
/// The floor of that wait and of the quick probe's timeout: scheduling noise on a busy
/// host is a few milliseconds, and a lost SYN must never be taken for a dead host.
const QUICK_MIN: Duration = Duration::from_millis(100);
/// The usual handshake assumed before the data plane has measured one.
const QUICK_DEFAULT: Duration = Duration::from_millis(4);

/// What happened to one backend in the daemon: probes by result and breaker transitions by
/// the state entered. Kept with the backend's health (40 bytes) and exported as counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendEvents {
    pub probes_up: u64,
    pub probes_down: u64,
    /// Transitions into closed, open and half-open.
    pub transitions: [u64; 3],
}

impl BackendEvents {
    pub fn probe(&mut self, up: bool) {
        if up {
            self.probes_up += 1;
        } else {
            self.probes_down += 1;
        }
    }

    pub fn transition(&mut self, to: breaker::State) {
        self.transitions[Self::index(to)] += 1;
    }

    /// Transitions into `state` so far.
    pub fn transitions_into(&self, state: breaker::State) -> u64 {
        self.transitions[Self::index(state)]
    }

    fn index(state: breaker::State) -> usize {
        match state {
            breaker::State::Closed => 0,
            breaker::State::Open => 1,
            breaker::State::HalfOpen => 2,
        }
    }
}

/// What the daemon knows of one backend's health.
#[derive(Debug)]
pub struct BackendHealth {
    /// The data plane's signals at the last read, to take differences.
    signals: BackendSignals,
    /// The data plane's ejection of this backend has been counted as a failure.
    ejection_noted: bool,
    /// The active checks' verdict. Starts healthy: a restarted daemon must not pull every
    /// backend out of rotation while it waits for first probes.
    healthy: bool,
    successes: u32,
    failures: u32,
    last_failure: Option<String>,
    /// The last successful probe was slow by the breaker's measure.
    last_slow: bool,
    breaker: Breaker,
    /// Probes and breaker transitions, for the metrics.
    events: BackendEvents,
    /// A SYN went unanswered for many times the usual handshake: the quick probe asked for
    /// decides (failed: out at once; answered: a lost packet, nothing more).
    suspect: bool,
    /// The SYN (its send time) that made the backend suspect, so that one SYN is one
    /// suspicion.
    suspected_syn_ns: u64,
}

impl BackendHealth {
    fn new(seed: u64) -> Self {
        BackendHealth {
            signals: Default::default(),
            ejection_noted: false,
            healthy: true,
            successes: 0,
            failures: 0,
            last_failure: None,
            last_slow: false,
            breaker: Breaker::new(breaker::Config::default(), seed),
            events: BackendEvents::default(),
            suspect: false,
            suspected_syn_ns: 0,
        }
    }

    /// Whether new connections may go to the backend.
    pub fn usable(&self) -> bool {
        self.healthy && self.breaker.allows_traffic()
    }

    /// The checks' verdict alone (the breaker aside).
    pub fn healthy(&self) -> bool {
        self.healthy
    }

    pub fn breaker_state(&self) -> breaker::State {
        self.breaker.state()
    }

    pub fn events(&self) -> BackendEvents {
        self.events
    }

    /// Why the last failure was one.
    pub fn last_failure(&self) -> Option<&str> {
        self.last_failure.as_deref()
    }

    /// The data plane's ejection is counted and waits to be lifted once the backend is
    /// usable again.
    pub fn ejection_pending(&self) -> bool {
        self.ejection_noted && self.usable()
    }

    /// The daemon lifted the data plane's ejection.
    pub fn ejection_cleared(&mut self) {
        self.ejection_noted = false;
    }

    /// The backend's usual SYN-to-SYN-ACK time as the data plane measured it, if it has
    /// completed any handshake.
    fn handshake_mean(&self) -> Option<Duration> {
        (self.signals.handshakes > 0)
            .then(|| Duration::from_nanos(self.signals.handshake_ns / self.signals.handshakes))
    }

    /// How long a SYN may go unanswered before the backend is suspect, and how long the
    /// probe that decides may take: many times the usual handshake, within bounds (a
    /// backend that answers in 0.1 ms needs no second to show it is gone; a slow one gets
    /// the probe's own timeout at most).
    pub fn quick_limit(&self, timeout_ms: u64) -> Duration {
        let usual = self.handshake_mean().unwrap_or(QUICK_DEFAULT);
        let most = Duration::from_millis(timeout_ms).max(QUICK_MIN);
        (usual * QUICK_FACTOR).clamp(QUICK_MIN, most)
    }

    fn note(&mut self, t: Option<Transition>, who: Who<'_>) {
        if let Some(t) = t {
            self.events.transition(t.to);
            info!(
                service = who.0,
                backend = %who.1,
                from = t.from.name(),
                to = t.to.name(),
                threshold = self.breaker.threshold(),
                expected_ms = self.breaker.expected_latency().map(|d| d.as_secs_f64() * 1e3),
                "breaker"
            );
        }
    }
}

/// A backend named in logs: (service, address).
type Who<'a> = (&'a str, SocketAddr);

/// What a probe result asks of the daemon.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AfterProbe {
    /// The backend entered or left rotation: rebuild the service's tables.
    pub rebalance: bool,
    /// Probe it again now rather than at its stable interval (its breaker is counting bad
    /// samples or running trials).
    pub probe_now: bool,
}

/// What a read of the data plane's signals asks of the daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterSignals {
    /// Nothing new.
    Nothing,
    /// The backend refused connections: a failure was counted; probe it now, and rebuild
    /// the tables if it left rotation.
    Failed { rebalance: bool },
    /// Lift the data plane's ejection (then call [`BackendHealth::ejection_cleared`]).
    ClearEjection,
    /// A SYN went unanswered: a probe with this timeout decides, now.
    QuickProbe(Duration),
    /// Clients retransmit SYNs it left unanswered: probe it now (no failure counted).
    ProbeNow,
    /// Handshakes completed: its stable checks can be sparser.
    Vouch,
}

/// The verdicts of every backend, keyed by (service name, backend address).
#[derive(Debug, Default)]
pub struct Verdicts {
    /// By service, then backend: a lookup by `&str` allocates nothing, and a service's
    /// backends are found without a walk over every backend (the data plane's view of
    /// 10,000 services asks 80,000 times per reconcile).
    backends: FxHashMap<String, FxHashMap<SocketAddr, BackendHealth>>,
    /// Seeds each new breaker's jitter differently.
    seeds: u64,
}

impl Verdicts {
    pub fn get(&self, service: &str, backend: SocketAddr) -> Option<&BackendHealth> {
        self.backends.get(service)?.get(&backend)
    }

    pub fn get_mut(&mut self, service: &str, backend: SocketAddr) -> Option<&mut BackendHealth> {
        self.backends.get_mut(service)?.get_mut(&backend)
    }

    fn entry(&mut self, service: &str, backend: SocketAddr) -> &mut BackendHealth {
        if !self.backends.contains_key(service) {
            self.backends
                .insert(service.to_owned(), FxHashMap::default());
        }
        let seeds = &mut self.seeds;
        self.backends
            .get_mut(service)
            .expect("inserted above")
            .entry(backend)
            .or_insert_with(|| {
                *seeds += 1;
                BackendHealth::new(*seeds)
            })
    }

    /// Keeps only the backends `keep` accepts.
    pub fn retain(&mut self, keep: impl Fn(&str, SocketAddr) -> bool) {
        for (service, backends) in &mut self.backends {
            backends.retain(|b, _| keep(service, *b));
        }
        self.backends.retain(|_, backends| !backends.is_empty());
    }

    /// Whether health lets new connections go to backend `addr` of service `service`.
    pub fn usable(&self, service: &str, addr: SocketAddr) -> bool {
        self.get(service, addr).is_none_or(BackendHealth::usable)
    }

    /// Whether `s` is in panic under `threshold_percent` (see [`Service::in_panic`]).
    pub fn in_panic(&self, s: &Service, threshold_percent: u8) -> bool {
        s.in_panic(|addr| self.usable(&s.name, addr), threshold_percent)
    }

    /// Whether new connections may go to backend `b` of `service`, in panic or not.
    pub fn in_rotation(&self, service: &str, b: &Backend, panic: bool) -> bool {
        b.state == AdminState::Active && b.weight > 0 && (panic || self.usable(service, b.addr))
    }

    /// The data plane's view of `s`: admin states, health and panic applied.
    pub fn for_dataplane(&self, s: &Service, threshold_percent: u8) -> Service {
        let panic = self.in_panic(s, threshold_percent);
        s.for_dataplane(|addr| panic || self.usable(&s.name, addr))
    }

    /// Takes one probe result for backend `backend` of `service`, checked by `check`:
    /// counts it against the thresholds and feeds the breaker.
    pub fn on_probe(
        &mut self,
        service: &str,
        backend: SocketAddr,
        check: &HealthCheck,
        outcome: &Outcome,
        at: Instant,
    ) -> AfterProbe {
        let peers_slow: Vec<bool> = self
            .backends
            .get(service)
            .into_iter()
            .flatten()
            .filter(|(b, _)| **b != backend)
            .map(|(_, h)| h.last_slow)
            .collect();
        let who = (service, backend);
        let h = self.entry(service, backend);
        let before = h.usable();
        h.events.probe(matches!(outcome, Outcome::Up { .. }));
        let suspect = std::mem::take(&mut h.suspect);
        let transition = match outcome {
            Outcome::Up { latency } => {
                if suspect {
                    info!(service, %backend, ?latency, "quick probe answered: a SYN was lost, the backend is fine");
                }
                h.successes += 1;
                h.failures = 0;
                if !h.healthy && h.successes >= check.rise {
                    h.healthy = true;
                    info!(service, %backend, "backend healthy");
                }
                h.last_slow = h.breaker.is_slow(*latency);
                if h.last_slow && breaker::shared_slowness(&peers_slow) {
                    // The whole service is slow, not this backend: no verdict on it.
                    None
                } else {
                    h.breaker.record_success(*latency, at)
                }
            }
            Outcome::Down { reason } => {
                h.failures += 1;
                h.successes = 0;
                h.last_failure = Some(reason.clone());
                // The data plane's unanswered SYN and this probe agree: that is enough.
                if suspect {
                    h.failures = h.failures.max(check.fall);
                    h.last_failure = Some(format!("a SYN went unanswered, then {reason}"));
                }
                if h.healthy && h.failures >= check.fall {
                    h.healthy = false;
                    warn!(service, %backend, %reason, "backend unhealthy");
                }
                h.breaker.record_failure(at)
            }
        };
        h.note(transition, who);
        AfterProbe {
            rebalance: h.usable() != before,
            // A closed breaker that has started counting bad samples, and a half-open one
            // running its trials, want the next sample now rather than at the stable
            // interval: a slow backend is judged, and a recovered one readmitted, in seconds.
            probe_now: h.breaker.pending_bad() > 0 || h.breaker.state() == breaker::State::HalfOpen,
        }
    }

    /// Takes what the data plane saw of backend `backend` of `service` since the last read:
    /// `signals` and whether it is `ejected` now. `checked` says whether the service has a
    /// health check (without one no probe could bring a backend back, so the data plane's
    /// ejection is lifted at once); `timeout_ms` is its probe timeout, the longest a quick
    /// probe may take; `now_ns` is the data plane's clock.
    #[allow(clippy::too_many_arguments)] // one backend's reading, all of it needed
    pub fn on_signals(
        &mut self,
        service: &str,
        backend: SocketAddr,
        signals: BackendSignals,
        ejected: bool,
        checked: bool,
        timeout_ms: u64,
        now_ns: u64,
        at: Instant,
    ) -> AfterSignals {
        let h = self.entry(service, backend);
        let refused = signals.refused.saturating_sub(h.signals.refused);
        let handshakes = signals.handshakes.saturating_sub(h.signals.handshakes);
        let unanswered = signals.syn_retrans.saturating_sub(h.signals.syn_retrans);
        h.signals = signals;
        if !checked {
            return if ejected {
                AfterSignals::ClearEjection
            } else {
                AfterSignals::Nothing
            };
        }
        if refused > 0 || (ejected && !h.ejection_noted) {
            let before = h.usable();
            h.ejection_noted = ejected;
            h.successes = 0;
            h.failures += 1;
            h.last_failure = Some("refused connections (seen by the data plane)".into());
            if h.healthy {
                h.healthy = false;
                warn!(service, %backend, refused, "backend refuses connections: out of rotation");
            }
            let t = h.breaker.record_failure(at);
            h.note(t, (service, backend));
            return AfterSignals::Failed {
                rebalance: h.usable() != before,
            };
        }
        if ejected && h.usable() {
            // Probes found it healthy again: let the data plane choose it again.
            return AfterSignals::ClearEjection;
        }
        let limit = h.quick_limit(timeout_ms);
        if h.usable()
            && signals.syn_unanswered(now_ns, limit.as_nanos() as u64)
            && h.suspected_syn_ns != signals.last_syn_ns
        {
            // A SYN has gone unanswered for many times this backend's usual handshake, and
            // no SYN-ACK came since: a host gone dark, or a lost packet. A quick probe
            // decides, at once: failed, the backend is out (the unanswered SYN counts as the
            // first failure); answered, nothing happened.
            h.suspect = true;
            h.suspected_syn_ns = signals.last_syn_ns;
            info!(service, %backend, ?limit, "a SYN went unanswered: quick probe");
            return AfterSignals::QuickProbe(limit);
        }
        if unanswered > 0 && handshakes == 0 {
            // Clients retransmit SYNs it left unanswered and no handshake with it completed
            // since the last read: a host gone dark, or one whose accept queue is full. Not
            // proof (a lost packet looks the same), so no failure is counted; the next probe
            // goes out now instead of at its slot.
            return AfterSignals::ProbeNow;
        }
        if handshakes > 0 {
            return AfterSignals::Vouch;
        }
        AfterSignals::Nothing
    }

    /// Moves open breakers whose time has come to half-open; returns the backends to
    /// probe now (their trials).
    pub fn poll(&mut self, now: Instant) -> Vec<(String, SocketAddr)> {
        let mut due = Vec::new();
        for (service, backend, h) in self
            .backends
            .iter_mut()
            .flat_map(|(s, m)| m.iter_mut().map(move |(b, h)| (s, b, h)))
        {
            if let Some(t) = h.breaker.poll(now) {
                h.events.transition(t.to);
                info!(%service, %backend, from = t.from.name(), to = t.to.name(), "breaker");
                due.push((service.clone(), *backend));
            }
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Protocol, ServiceAddr};

    const NS: u64 = 1_000_000;

    fn check() -> HealthCheck {
        HealthCheck {
            rise: 2,
            fall: 3,
            timeout_ms: 1_000,
            ..HealthCheck::default_for(Protocol::Tcp)
        }
    }

    fn addr(last: u8) -> SocketAddr {
        SocketAddr::from(([198, 18, 1, last], 8080))
    }

    fn up() -> Outcome {
        Outcome::Up {
            latency: Duration::from_millis(1),
        }
    }

    fn down() -> Outcome {
        Outcome::Down {
            reason: "connection refused".into(),
        }
    }

    fn service(backends: &[u8]) -> Service {
        Service {
            name: "web".into(),
            addr: ServiceAddr {
                vip: [198, 19, 0, 1].into(),
                port: 80,
                protocol: Protocol::Tcp,
            },
            check: check(),
            scheduler: Default::default(),
            backends: backends.iter().map(|&b| Backend::new(addr(b), 1)).collect(),
        }
    }

    /// Signals as the data plane would show them: `handshakes` completed in 1 ms each, the
    /// last SYN sent at `syn_ns` and the last SYN-ACK seen at `synack_ns`.
    fn signals(handshakes: u64, refused: u64, syn_ns: u64, synack_ns: u64) -> BackendSignals {
        BackendSignals {
            handshakes,
            handshake_ns: handshakes * NS,
            refused,
            last_syn_ns: syn_ns,
            last_synack_ns: synack_ns,
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn fall_failures_take_a_backend_out_and_rise_successes_bring_it_back() {
        let mut v = Verdicts::default();
        let (c, b) = (check(), addr(2));
        let now = Instant::now();
        assert!(v.usable("web", b), "unknown backends start usable");
        for i in 1..c.fall {
            let after = v.on_probe("web", b, &c, &down(), now);
            assert!(
                !after.rebalance,
                "failure {i} of {} changes nothing",
                c.fall
            );
            assert!(v.usable("web", b));
        }
        let after = v.on_probe("web", b, &c, &down(), now);
        assert!(after.rebalance && !v.usable("web", b));
        assert!(!v.get("web", b).unwrap().healthy());
        assert_eq!(
            v.get("web", b).unwrap().last_failure(),
            Some("connection refused")
        );
        // The breaker opened on the way; let it cool down so only the checks decide.
        tokio::time::advance(Duration::from_secs(60)).await;
        v.poll(Instant::now());
        let mut back = false;
        for _ in 0..c.rise + 3 {
            back |= v.on_probe("web", b, &c, &up(), Instant::now()).rebalance;
        }
        assert!(back && v.usable("web", b), "{:?}", v.get("web", b));
        let events = v.get("web", b).unwrap().events();
        assert_eq!(events.probes_down, u64::from(c.fall));
        assert_eq!(events.probes_up, u64::from(c.rise + 3));
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_breaker_turns_half_open_after_its_cool_down_and_asks_for_trials() {
        let mut v = Verdicts::default();
        let (c, b) = (check(), addr(2));
        for _ in 0..c.fall {
            v.on_probe("web", b, &c, &down(), Instant::now());
        }
        assert_eq!(
            v.get("web", b).unwrap().breaker_state(),
            breaker::State::Open
        );
        assert!(v.poll(Instant::now()).is_empty(), "not before its time");
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(v.poll(Instant::now()), vec![("web".to_owned(), b)]);
        assert_eq!(
            v.get("web", b).unwrap().breaker_state(),
            breaker::State::HalfOpen
        );
        let after = v.on_probe("web", b, &c, &up(), Instant::now());
        assert!(after.probe_now, "a half-open breaker wants its trials now");
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_seen_by_the_data_plane_is_a_failure_at_once() {
        let mut v = Verdicts::default();
        let (c, b) = (check(), addr(2));
        let at = Instant::now();
        let s = signals(10, 0, 5 * NS, 6 * NS);
        let first = v.on_signals("web", b, s, false, true, c.timeout_ms, 7 * NS, at);
        assert_eq!(first, AfterSignals::Vouch, "ten handshakes vouch for it");
        let refused = signals(10, 1, 5 * NS, 6 * NS);
        let after = v.on_signals("web", b, refused, true, true, c.timeout_ms, 8 * NS, at);
        assert_eq!(after, AfterSignals::Failed { rebalance: true });
        assert!(!v.usable("web", b));
        // The same reading again is nothing new: no second failure.
        let again = v.on_signals("web", b, refused, true, true, c.timeout_ms, 9 * NS, at);
        assert_eq!(again, AfterSignals::Nothing);
        assert!(!v.get("web", b).unwrap().ejection_pending());
        // Probes bring it back; then the ejection is to be lifted.
        tokio::time::advance(Duration::from_secs(60)).await;
        v.poll(Instant::now());
        for _ in 0..c.rise + 3 {
            v.on_probe("web", b, &c, &up(), Instant::now());
        }
        assert!(v.usable("web", b));
        assert!(v.get("web", b).unwrap().ejection_pending());
        let lift = v.on_signals("web", b, refused, true, true, c.timeout_ms, 10 * NS, at);
        assert_eq!(lift, AfterSignals::ClearEjection);
        v.get_mut("web", b).unwrap().ejection_cleared();
        assert!(!v.get("web", b).unwrap().ejection_pending());
    }

    #[tokio::test(start_paused = true)]
    async fn an_unchecked_service_has_its_ejections_lifted_and_no_verdict() {
        let mut v = Verdicts::default();
        let b = addr(2);
        let s = signals(1, 1, NS, 2 * NS);
        let after = v.on_signals("web", b, s, true, false, 1_000, 3 * NS, Instant::now());
        assert_eq!(after, AfterSignals::ClearEjection);
        assert!(v.usable("web", b));
    }

    #[tokio::test(start_paused = true)]
    async fn an_unanswered_syn_asks_for_one_quick_probe_that_decides() {
        let (c, b) = (check(), addr(2));
        // Usual handshake 1 ms: suspect after 50 ms, floored at 100 ms.
        let s = signals(10, 0, 1_000 * NS, 900 * NS);
        for (outcome, out) in [(down(), true), (up(), false)] {
            let mut v = Verdicts::default();
            let at = Instant::now();
            let early = v.on_signals("web", b, s, false, true, c.timeout_ms, 1_050 * NS, at);
            assert_eq!(
                early,
                AfterSignals::Vouch,
                "50 ms is within the 100 ms floor"
            );
            let late = v.on_signals("web", b, s, false, true, c.timeout_ms, 1_101 * NS, at);
            assert_eq!(late, AfterSignals::QuickProbe(Duration::from_millis(100)));
            let same = v.on_signals("web", b, s, false, true, c.timeout_ms, 1_200 * NS, at);
            assert_eq!(same, AfterSignals::Nothing, "one SYN, one suspicion");
            let after = v.on_probe("web", b, &c, &outcome, at);
            assert_eq!(after.rebalance, out, "{outcome:?}");
            assert_eq!(v.usable("web", b), !out, "{outcome:?}");
            if out {
                let why = v.get("web", b).unwrap().last_failure().unwrap();
                assert!(why.starts_with("a SYN went unanswered"), "{why}");
            }
        }
    }

    #[test]
    fn backend_events_count_by_kind() {
        let mut e = BackendEvents::default();
        e.probe(true);
        e.probe(true);
        e.probe(false);
        e.transition(breaker::State::Open);
        e.transition(breaker::State::HalfOpen);
        e.transition(breaker::State::Open);
        assert_eq!((e.probes_up, e.probes_down), (2, 1));
        assert_eq!(e.transitions, [0, 2, 1]);
    }

    #[test]
    fn the_quick_limit_follows_the_usual_handshake_within_bounds() {
        let mut h = BackendHealth::new(1);
        assert_eq!(
            h.quick_limit(1_000),
            Duration::from_millis(200),
            "4 ms assumed before any handshake"
        );
        h.signals = signals(10, 0, 0, 0);
        assert_eq!(
            h.quick_limit(1_000),
            QUICK_MIN,
            "1 ms x 50 is under the floor"
        );
        h.signals.handshake_ns = 10 * 10 * NS;
        assert_eq!(h.quick_limit(1_000), Duration::from_millis(500));
        h.signals.handshake_ns = 10 * 100 * NS;
        assert_eq!(
            h.quick_limit(1_000),
            Duration::from_secs(1),
            "capped at the timeout"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_service_with_too_few_usable_backends_is_in_panic_and_uses_them_all() {
        let mut v = Verdicts::default();
        let s = service(&[2, 3, 4, 5]);
        let c = check();
        let take_out = |v: &mut Verdicts, last: u8| {
            for _ in 0..c.fall {
                v.on_probe("web", addr(last), &c, &down(), Instant::now());
            }
        };
        take_out(&mut v, 2);
        take_out(&mut v, 3);
        assert!(!v.in_panic(&s, 50), "2 of 4 usable is at the threshold");
        let d = v.for_dataplane(&s, 50);
        let weights: Vec<u32> = d.backends.iter().map(|b| b.weight).collect();
        assert_eq!(weights, [0, 0, 1, 1]);
        take_out(&mut v, 4);
        assert!(v.in_panic(&s, 50));
        assert!(v.in_rotation("web", &s.backends[0], true));
        let d = v.for_dataplane(&s, 50);
        assert!(d.backends.iter().all(|b| b.weight == 1), "{d:?}");
        assert!(
            !v.in_panic(&s, 0),
            "threshold 0: only an empty service panics"
        );
        let mut draining = s.backends[3];
        draining.state = AdminState::Draining;
        assert!(!v.in_rotation("web", &draining, true));
    }
}
