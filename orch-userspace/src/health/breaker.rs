//! A learning circuit breaker, one per backend.
//!
//! States:
//! - **closed**: the backend takes new connections. Every sample (a probe result today; the
//!   data plane's handshake latencies later) is judged against the backend's *expected
//!   latency*, an EWMA it learns. A sample slower than twice the expectation shrinks the trip
//!   threshold (x0.8, never below 1) and counts as a bad sample, like a failure; a good sample
//!   resets the count and lets the threshold grow back slowly (+0.05 per sample) to its base.
//!   When consecutive bad samples reach the threshold, the breaker **opens**.
//! - **open**: no new connections. After a recovery time that doubles with each consecutive
//!   trip (1 s, 2 s, 4 s... up to 30 s, +/- 20 % jitter so a fleet does not retry in step) it
//!   goes **half-open**.
//! - **half-open**: still no new connections; the next samples are trials. Three good ones in
//!   a row close it (and reset the backoff); one bad one opens it again with a longer wait.
//!
//! A backend whose latency shifts for good is learned slowly (bad samples still move the
//! EWMA at a tenth of the normal rate), so a lasting change eventually becomes the new normal
//! instead of tripping forever.
//!
//! Time comes from the caller (`now`), as tokio's `Instant`, so tests drive it on a paused
//! clock.

use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

/// The breaker's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half-open",
        }
    }
}

/// Whether a slow sample is the service's slowness rather than the backend's: at least half
/// of the backend's peers (the service's other backends) were slow at their last sample too.
/// A breaker judges its backend against the backend's own past; when the whole service
/// slows down at once (the load balancer's host is overloaded, a flood reaches every
/// backend, the network is congested), tripping breakers one by one would only move the
/// load onto the others. Such samples are left out of the breaker's count. A backend with no
/// peer has nothing to be compared with.
pub fn shared_slowness(peers_slow: &[bool]) -> bool {
    let slow = peers_slow.iter().filter(|s| **s).count();
    !peers_slow.is_empty() && slow * 2 >= peers_slow.len()
}

/// Tunables, with the documented defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Consecutive bad samples that trip a breaker at full trust.
    pub base_threshold: f64,
    /// A sample slower than `slow_factor` x the expected latency is bad.
    pub slow_factor: f64,
    /// Threshold multiplier on a slow sample.
    pub shrink: f64,
    /// Threshold growth per good sample.
    pub grow: f64,
    /// EWMA weight of a good sample.
    pub alpha: f64,
    /// EWMA weight of a slow sample.
    pub slow_alpha: f64,
    /// First recovery time, doubled per consecutive trip up to `max_recovery`.
    pub recovery: Duration,
    pub max_recovery: Duration,
    /// Relative jitter of the recovery time.
    pub jitter: f64,
    /// Good samples in a row that close a half-open breaker.
    pub half_open_trials: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            base_threshold: 3.0,
            slow_factor: 2.0,
            shrink: 0.8,
            grow: 0.05,
            alpha: 0.2,
            slow_alpha: 0.02,
            recovery: Duration::from_secs(1),
            max_recovery: Duration::from_secs(30),
            jitter: 0.2,
            half_open_trials: 3,
        }
    }
}

/// A state change, for logs and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    pub from: State,
    pub to: State,
}

/// One backend's breaker.
#[derive(Debug)]
pub struct Breaker {
    cfg: Config,
    state: State,
    /// Learned latency, seconds.
    expected: Option<f64>,
    threshold: f64,
    bad: u32,
    /// Consecutive trips without a full close: the backoff exponent.
    trips: u32,
    open_until: Option<Instant>,
    trial_successes: u32,
    rng: fastrand::Rng,
}

impl Breaker {
    /// A closed breaker; `seed` makes its jitter reproducible.
    pub fn new(cfg: Config, seed: u64) -> Self {
        Breaker {
            threshold: cfg.base_threshold,
            cfg,
            state: State::Closed,
            expected: None,
            bad: 0,
            trips: 0,
            open_until: None,
            trial_successes: 0,
            rng: fastrand::Rng::with_seed(seed),
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Whether new connections may go to the backend.
    pub fn allows_traffic(&self) -> bool {
        self.state == State::Closed
    }

    /// The latency the breaker has learned to expect.
    pub fn expected_latency(&self) -> Option<Duration> {
        self.expected.map(Duration::from_secs_f64)
    }

    /// Consecutive bad samples that trip the breaker now.
    pub fn threshold(&self) -> u32 {
        self.threshold.floor().max(1.0) as u32
    }

    /// Bad samples counted toward the next trip (closed state).
    pub fn pending_bad(&self) -> u32 {
        self.bad
    }

    /// When an open breaker turns half-open.
    pub fn reopens_at(&self) -> Option<Instant> {
        self.open_until
    }

    /// Whether a sample that took `latency` is slow for this backend (more than
    /// `slow_factor` x the learned latency).
    pub fn is_slow(&self, latency: Duration) -> bool {
        self.expected
            .is_some_and(|e| latency.as_secs_f64() > self.cfg.slow_factor * e)
    }

    /// A successful sample that took `latency`.
    pub fn record_success(&mut self, latency: Duration, now: Instant) -> Option<Transition> {
        let secs = latency.as_secs_f64();
        let slow = self.is_slow(latency);
        self.learn(secs, slow);
        match self.state {
            State::Closed if slow => {
                self.threshold = (self.threshold * self.cfg.shrink).max(1.0);
                self.bad += 1;
                self.trip_if_due(now)
            }
            State::Closed => {
                self.bad = 0;
                self.threshold = (self.threshold + self.cfg.grow).min(self.cfg.base_threshold);
                None
            }
            State::HalfOpen if slow => Some(self.trip(now)),
            State::HalfOpen => {
                self.trial_successes += 1;
                (self.trial_successes >= self.cfg.half_open_trials).then(|| self.close())
            }
            State::Open => None,
        }
    }

    /// A failed sample (refused, timed out, wrong answer).
    pub fn record_failure(&mut self, now: Instant) -> Option<Transition> {
        match self.state {
            State::Closed => {
                self.bad += 1;
                self.trip_if_due(now)
            }
            State::HalfOpen => Some(self.trip(now)),
            State::Open => None,
        }
    }

    /// Moves an open breaker to half-open once its recovery time has passed.
    pub fn poll(&mut self, now: Instant) -> Option<Transition> {
        match (self.state, self.open_until) {
            (State::Open, Some(until)) if now >= until => {
                self.state = State::HalfOpen;
                self.open_until = None;
                self.trial_successes = 0;
                Some(Transition {
                    from: State::Open,
                    to: State::HalfOpen,
                })
            }
            _ => None,
        }
    }

    fn learn(&mut self, secs: f64, slow: bool) {
        let alpha = if slow {
            self.cfg.slow_alpha
        } else {
            self.cfg.alpha
        };
        self.expected = Some(match self.expected {
            None => secs,
            Some(e) => e + alpha * (secs - e),
        });
    }

    fn trip_if_due(&mut self, now: Instant) -> Option<Transition> {
        (self.bad >= self.threshold()).then(|| self.trip(now))
    }

    fn trip(&mut self, now: Instant) -> Transition {
        let from = self.state;
        self.trips += 1;
        let base = self
            .cfg
            .recovery
            .saturating_mul(1 << (self.trips - 1).min(16))
            .min(self.cfg.max_recovery);
        let jitter = 1.0 + self.cfg.jitter * (self.rng.f64() * 2.0 - 1.0);
        self.open_until = Some(now + base.mul_f64(jitter));
        self.state = State::Open;
        self.bad = 0;
        Transition {
            from,
            to: State::Open,
        }
    }

    fn close(&mut self) -> Transition {
        self.state = State::Closed;
        self.trips = 0;
        self.bad = 0;
        self.trial_successes = 0;
        Transition {
            from: State::HalfOpen,
            to: State::Closed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::advance;

    const MS: Duration = Duration::from_millis(1);

    fn learned(latency: Duration) -> Breaker {
        let mut b = Breaker::new(Config::default(), 7);
        for _ in 0..20 {
            assert_eq!(b.record_success(latency, Instant::now()), None);
        }
        b
    }

    #[tokio::test(start_paused = true)]
    async fn failures_trip_at_the_threshold_and_recovery_goes_half_open_then_closed() {
        let mut b = learned(10 * MS);
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.threshold(), 3);
        assert_eq!(b.record_failure(Instant::now()), None);
        assert_eq!(b.record_failure(Instant::now()), None);
        let t = b
            .record_failure(Instant::now())
            .expect("third failure trips");
        assert_eq!((t.from, t.to), (State::Closed, State::Open));
        assert!(!b.allows_traffic());

        // 1 s +/- 20 %: not before 0.8 s, surely by 1.2 s.
        advance(Duration::from_millis(790)).await;
        assert_eq!(b.poll(Instant::now()), None);
        advance(Duration::from_millis(420)).await;
        let t = b
            .poll(Instant::now())
            .expect("half-open after the recovery time");
        assert_eq!((t.from, t.to), (State::Open, State::HalfOpen));
        assert!(!b.allows_traffic(), "half-open takes only trials");

        assert_eq!(b.record_success(10 * MS, Instant::now()), None);
        assert_eq!(b.record_success(10 * MS, Instant::now()), None);
        let t = b
            .record_success(10 * MS, Instant::now())
            .expect("third trial closes");
        assert_eq!((t.from, t.to), (State::HalfOpen, State::Closed));
        assert!(b.allows_traffic());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_trial_reopens_with_a_longer_backoff() {
        let mut b = learned(10 * MS);
        for _ in 0..3 {
            b.record_failure(Instant::now());
        }
        let first_wait = b.reopens_at().unwrap() - Instant::now();
        advance(first_wait).await;
        b.poll(Instant::now()).unwrap();
        let t = b
            .record_failure(Instant::now())
            .expect("a failed trial reopens");
        assert_eq!((t.from, t.to), (State::HalfOpen, State::Open));
        let second_wait = b.reopens_at().unwrap() - Instant::now();
        // 2 s +/- 20 % against 1 s +/- 20 %.
        assert!(
            second_wait >= Duration::from_millis(1600),
            "{second_wait:?}"
        );
        assert!(first_wait <= Duration::from_millis(1200), "{first_wait:?}");
        // A slow trial counts as failed too.
        advance(second_wait).await;
        b.poll(Instant::now()).unwrap();
        let t = b
            .record_success(100 * MS, Instant::now())
            .expect("slow trial reopens");
        assert_eq!(t.to, State::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_is_capped() {
        let mut b = learned(10 * MS);
        for _ in 0..3 {
            b.record_failure(Instant::now());
        }
        for _ in 0..10 {
            let wait = b.reopens_at().unwrap() - Instant::now();
            assert!(wait <= Duration::from_secs(36), "{wait:?}");
            advance(wait).await;
            b.poll(Instant::now()).unwrap();
            b.record_failure(Instant::now()).unwrap();
        }
        let wait = b.reopens_at().unwrap() - Instant::now();
        assert!(
            wait >= Duration::from_secs(24),
            "capped at 30 s +/- 20 %: {wait:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn slow_samples_shrink_the_threshold_until_it_trips() {
        let mut b = learned(10 * MS);
        // 25 ms > 2 x 10 ms: bad. Threshold 3 -> 2.4 (2) after the first, so the second trips.
        assert_eq!(b.record_success(25 * MS, Instant::now()), None);
        assert_eq!(b.threshold(), 2);
        let t = b.record_success(25 * MS, Instant::now()).expect("trips");
        assert_eq!(t.to, State::Open);
        // Never below 1.
        let mut b = learned(10 * MS);
        for _ in 0..30 {
            b.threshold = (b.threshold * b.cfg.shrink).max(1.0);
        }
        assert_eq!(b.threshold(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn good_samples_grow_the_threshold_back_slowly() {
        let mut b = learned(10 * MS);
        b.record_success(25 * MS, Instant::now());
        assert_eq!(b.threshold(), 2);
        for _ in 0..11 {
            b.record_success(10 * MS, Instant::now());
        }
        assert_eq!(b.threshold(), 2, "not yet: +0.05 per sample");
        for _ in 0..2 {
            b.record_success(10 * MS, Instant::now());
        }
        assert_eq!(b.threshold(), 3);
        for _ in 0..50 {
            b.record_success(10 * MS, Instant::now());
        }
        assert_eq!(b.threshold(), 3, "never above the base");
    }

    #[tokio::test(start_paused = true)]
    async fn expected_latency_follows_good_samples_fast_and_slow_ones_slowly() {
        let mut b = learned(10 * MS);
        let e = b.expected_latency().unwrap();
        assert!(e.abs_diff(10 * MS) < MS / 10, "{e:?}");
        for _ in 0..10 {
            b.record_success(15 * MS, Instant::now());
        }
        let e = b.expected_latency().unwrap();
        assert!(e > 14 * MS, "good samples move it fast: {e:?}");
        let before = b.expected_latency().unwrap();
        b.record_success(100 * MS, Instant::now());
        let after = b.expected_latency().unwrap();
        assert!(
            after - before < 3 * MS,
            "a slow sample moves it by 2 %: {before:?} -> {after:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_breaker_ignores_samples_until_it_is_due() {
        let mut b = learned(10 * MS);
        for _ in 0..3 {
            b.record_failure(Instant::now());
        }
        assert_eq!(b.record_success(10 * MS, Instant::now()), None);
        assert_eq!(b.record_failure(Instant::now()), None);
        assert_eq!(b.state(), State::Open);
    }

    #[test]
    fn slowness_is_shared_when_half_the_peers_are_slow() {
        assert!(!shared_slowness(&[]), "no peer, nothing shared");
        assert!(!shared_slowness(&[false, false]));
        assert!(shared_slowness(&[true, false]));
        assert!(shared_slowness(&[true]));
        assert!(!shared_slowness(&[true, false, false]));
    }
}
