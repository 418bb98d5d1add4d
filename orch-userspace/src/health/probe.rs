//! Active health checks: one tokio task per checked backend, reporting every probe result
//! to the daemon's loop, which owns the verdicts (thresholds, breaker) and the maps.
//!
//! - **Adaptive interval.** Each task keeps a stability score in [0, 1]: a success moves it a
//!   quarter of the way to 1, a failure drops it to 0. The next probe comes after
//!   `fast + (interval - fast) x score`, so a backend that has been fine for a while is probed
//!   every `interval` (20 s by default) and one that is failing or recovering every `fast`
//!   (500 ms). A new backend starts at 0: it is probed fast until it proves stable.
//! - **Jitter.** Every wait is stretched or shrunk by up to 10 %, so the probes of many
//!   backends never align into bursts.
//! - **Bounded.** At most `max_in_flight` probes run at once (a semaphore), and every probe
//!   has its own timeout, so a backend that hangs delays no other.
//! - **Probe now.** The daemon can ask for an immediate probe ([`Checker::nudge`]), e.g. when
//!   the data plane sees a backend refuse connections.
//! - **Quick probe.** When the data plane has seen a SYN go unanswered far longer than the
//!   backend's usual handshake, the daemon asks for a probe now with a timeout of the same
//!   order ([`Checker::nudge_quick`]): a host gone dark is out within a fraction of a second,
//!   and a lost packet costs one probe.
//! - **Probe less when traffic vouches.** When the data plane has seen the backend complete
//!   handshakes since the last probe ([`Checker::vouch`]), a stable backend's interval
//!   doubles: real traffic is already checking it.

use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
    sync::{mpsc, Notify, Semaphore},
    task::JoinHandle,
    time::{timeout, Instant},
};
use tracing::debug;

use crate::model::{AdminState, CheckKind, HealthCheck, Service};

/// The result of one probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The backend answered as expected, in `latency`.
    Up { latency: Duration },
    /// It did not; the text says how.
    Down { reason: String },
}

/// One probe result, as sent to the daemon.
#[derive(Clone, Debug)]
pub struct Report {
    pub service: String,
    pub backend: SocketAddr,
    pub outcome: Outcome,
    pub at: Instant,
}

/// Which backend a task checks.
type Key = (String, SocketAddr);

struct Task {
    check: HealthCheck,
    nudge: Arc<Notify>,
    vouched: Arc<AtomicBool>,
    /// The timeout of the next probe, in milliseconds, when it is a quick one (0: not).
    quick_ms: Arc<AtomicU64>,
    handle: JoinHandle<()>,
}

/// The set of running checks.
pub struct Checker {
    tasks: HashMap<Key, Task>,
    limit: Arc<Semaphore>,
    reports: mpsc::Sender<Report>,
}

impl Checker {
    /// A checker that runs at most `max_in_flight` probes at a time and sends every result
    /// to `reports`.
    pub fn new(max_in_flight: usize, reports: mpsc::Sender<Report>) -> Self {
        Checker {
            tasks: HashMap::new(),
            limit: Arc::new(Semaphore::new(max_in_flight.max(1))),
            reports,
        }
    }

    /// Makes the running checks match `services`: starts checks for new backends (or
    /// changed specs), stops those of removed or disabled backends and of services without a
    /// check.
    pub fn sync(&mut self, services: &[Service]) {
        let mut wanted: HashMap<Key, HealthCheck> = HashMap::new();
        for svc in services {
            if svc.check.kind == CheckKind::None {
                continue;
            }
            for b in &svc.backends {
                if b.state != AdminState::Disabled {
                    wanted.insert((svc.name.clone(), b.addr), svc.check.clone());
                }
            }
        }
        self.tasks.retain(|key, task| {
            let keep = wanted.get(key) == Some(&task.check);
            if !keep {
                task.handle.abort();
                debug!(service = %key.0, backend = %key.1, "health check stopped");
            }
            keep
        });
        for (key, check) in wanted {
            if self.tasks.contains_key(&key) {
                continue;
            }
            let nudge = Arc::new(Notify::new());
            let vouched = Arc::new(AtomicBool::new(false));
            let quick_ms = Arc::new(AtomicU64::new(0));
            let handle = tokio::spawn(run(
                key.clone(),
                check.clone(),
                self.limit.clone(),
                self.reports.clone(),
                nudge.clone(),
                vouched.clone(),
                quick_ms.clone(),
            ));
            debug!(service = %key.0, backend = %key.1, "health check started");
            self.tasks.insert(
                key,
                Task {
                    check,
                    nudge,
                    vouched,
                    quick_ms,
                    handle,
                },
            );
        }
    }

    /// Asks for a probe of `backend` of `service` now instead of at its next slot.
    pub fn nudge(&self, service: &str, backend: SocketAddr) {
        if let Some(t) = self.tasks.get(&(service.to_owned(), backend)) {
            t.nudge.notify_one();
        }
    }

    /// Asks for a probe now that gives up after `limit` (shorter than the check's own
    /// timeout): the data plane suspects the backend, and the probe decides.
    pub fn nudge_quick(&self, service: &str, backend: SocketAddr, limit: Duration) {
        if let Some(t) = self.tasks.get(&(service.to_owned(), backend)) {
            let ms = (limit.as_millis() as u64).max(1);
            t.quick_ms.store(ms, Ordering::Relaxed);
            t.nudge.notify_one();
        }
    }

    /// Tells the check of `backend` that real traffic has just gone well.
    pub fn vouch(&self, service: &str, backend: SocketAddr) {
        if let Some(t) = self.tasks.get(&(service.to_owned(), backend)) {
            t.vouched.store(true, Ordering::Relaxed);
        }
    }

    /// How many backends are being checked.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Whether no backend is being checked.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        for t in self.tasks.values() {
            t.handle.abort();
        }
    }
}

/// Probes one backend forever (until aborted or the daemon stops listening).
async fn run(
    (service, backend): Key,
    check: HealthCheck,
    limit: Arc<Semaphore>,
    reports: mpsc::Sender<Report>,
    nudge: Arc<Notify>,
    vouched: Arc<AtomicBool>,
    quick_ms: Arc<AtomicU64>,
) {
    let mut stability = 0.0f64;
    let mut rng = fastrand::Rng::new();
    let prober = probe_for(&check);
    loop {
        let outcome = {
            let Ok(_permit) = limit.acquire().await else {
                return;
            };
            // A quick probe has a shorter time limit, never a longer one.
            let ms = match quick_ms.swap(0, Ordering::Relaxed) {
                0 => check.timeout_ms,
                quick => quick.min(check.timeout_ms),
            };
            probe_within(prober.as_ref(), backend, Duration::from_millis(ms)).await
        };
        stability = match outcome {
            Outcome::Up { .. } => stability + (1.0 - stability) * 0.25,
            Outcome::Down { .. } => 0.0,
        };
        let report = Report {
            service: service.clone(),
            backend,
            outcome,
            at: Instant::now(),
        };
        if reports.send(report).await.is_err() {
            return;
        }
        let mut wait = next_interval(&check, stability, rng.f64());
        if vouched.swap(false, Ordering::Relaxed) && stability > 0.9 {
            wait *= 2;
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = nudge.notified() => {}
        }
    }
}

/// The wait before the next probe: between the fast and the stable interval by `stability`,
/// then +/- 10 % by `unit_random` (in [0, 1)).
pub fn next_interval(check: &HealthCheck, stability: f64, unit_random: f64) -> Duration {
    let fast = check.fast_interval_ms as f64;
    let slow = check.interval_ms as f64;
    let base = fast + (slow - fast) * stability.clamp(0.0, 1.0);
    let jitter = 1.0 + 0.1 * (unit_random * 2.0 - 1.0);
    Duration::from_secs_f64(base * jitter / 1000.0)
}

/// A probe in flight.
pub type Pending<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;

/// One kind of active check, as the checker sees it: probe a backend once. Timing,
/// thresholds and scheduling are the same for every kind and live elsewhere (the tasks here,
/// the verdicts in [`super::verdict`]), so a new kind is one more implementation.
pub trait Probe: Send + Sync {
    /// Probes `backend` once: `Ok` when it answered as expected, else what went wrong. The
    /// caller bounds it in time.
    fn check(&self, backend: SocketAddr) -> Pending<'_>;
    /// What a timeout means for it, for the failure's text ("no {} within 1s").
    fn awaits(&self) -> &'static str;
}

/// `tcp`: a connection is accepted.
pub struct TcpConnect;

/// `http`: `GET path` is answered with the expected status.
pub struct HttpGet {
    path: String,
    expect_status: u16,
}

/// `none`: always up (the service has no check; its backends are never probed).
pub struct Unchecked;

impl Probe for TcpConnect {
    fn check(&self, backend: SocketAddr) -> Pending<'_> {
        Box::pin(async move {
            TcpStream::connect(backend)
                .await
                .map(drop)
                .map_err(|e| format!("connect: {e}"))
        })
    }
    fn awaits(&self) -> &'static str {
        "connection"
    }
}

impl Probe for HttpGet {
    fn check(&self, backend: SocketAddr) -> Pending<'_> {
        Box::pin(http_get(backend, &self.path, self.expect_status))
    }
    fn awaits(&self) -> &'static str {
        "HTTP answer"
    }
}

impl Probe for Unchecked {
    fn check(&self, _: SocketAddr) -> Pending<'_> {
        Box::pin(async { Ok(()) })
    }
    fn awaits(&self) -> &'static str {
        "answer"
    }
}

/// The probe a check asks for.
pub fn probe_for(check: &HealthCheck) -> Box<dyn Probe> {
    match check.kind {
        CheckKind::None => Box::new(Unchecked),
        CheckKind::Tcp => Box::new(TcpConnect),
        CheckKind::Http => Box::new(HttpGet {
            path: check.path.clone(),
            expect_status: check.expect_status,
        }),
    }
}

/// Runs `probe` on `backend` within `limit`, timing it.
pub async fn probe_within(probe: &dyn Probe, backend: SocketAddr, limit: Duration) -> Outcome {
    let start = Instant::now();
    let result = timeout(limit, probe.check(backend))
        .await
        .map_err(|_| format!("no {} within {limit:?}", probe.awaits()))
        .and_then(|r| r);
    match result {
        Ok(()) => Outcome::Up {
            latency: start.elapsed(),
        },
        Err(reason) => Outcome::Down { reason },
    }
}

/// One probe of `backend` as `check` describes it, within its timeout.
pub async fn probe(backend: SocketAddr, check: &HealthCheck) -> Outcome {
    probe_within(
        probe_for(check).as_ref(),
        backend,
        Duration::from_millis(check.timeout_ms),
    )
    .await
}

/// `GET path` and a check of the status line; the rest of the answer is not read.
async fn http_get(backend: SocketAddr, path: &str, expect_status: u16) -> Result<(), String> {
    let mut conn = TcpStream::connect(backend)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let host = match backend {
        SocketAddr::V4(a) => a.to_string(),
        SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: orch-health/{}\r\nConnection: close\r\n\r\n",
        env!("CARGO_PKG_VERSION")
    );
    conn.write_all(request.as_bytes())
        .await
        .map_err(|e| format!("sending the request: {e}"))?;
    let mut line = String::new();
    // One status line is all we read; a backend that streams garbage cannot make us buffer it.
    BufReader::new(tokio::io::AsyncReadExt::take(&mut conn, 512))
        .read_line(&mut line)
        .await
        .map_err(|e| format!("reading the status line: {e}"))?;
    let status: u16 = line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("not an HTTP status line: {:?}", line.trim_end()))?;
    if status == expect_status {
        Ok(())
    } else {
        Err(format!("HTTP status {status}, expected {expect_status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::{io::AsyncReadExt, net::TcpListener};

    fn spec(kind: CheckKind) -> HealthCheck {
        HealthCheck {
            kind,
            timeout_ms: 300,
            ..HealthCheck::default()
        }
    }

    #[test]
    fn the_interval_moves_with_stability_and_jitter_stays_within_ten_percent() {
        let c = HealthCheck::default();
        assert_eq!(next_interval(&c, 0.0, 0.5), Duration::from_millis(500));
        assert_eq!(next_interval(&c, 1.0, 0.5), Duration::from_millis(20_000));
        assert_eq!(next_interval(&c, 0.5, 0.5), Duration::from_millis(10_250));
        assert_eq!(next_interval(&c, 1.0, 0.0), Duration::from_millis(18_000));
        assert!(next_interval(&c, 1.0, 0.999_999) <= Duration::from_millis(22_000));
    }

    async fn http_server(answer: &'static str, delay: Duration) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = c.read(&mut buf).await;
                    tokio::time::sleep(delay).await;
                    let _ = c.write_all(answer.as_bytes()).await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn probes_judge_tcp_and_http_answers() {
        let ok = http_server("HTTP/1.1 200 OK\r\n\r\n", Duration::ZERO).await;
        let err = http_server("HTTP/1.1 503 Busy\r\n\r\n", Duration::ZERO).await;
        let junk = http_server("SSH-2.0-x\r\n", Duration::ZERO).await;
        let slow = http_server("HTTP/1.1 200 OK\r\n\r\n", Duration::from_secs(5)).await;
        // A port nobody listens on: bind, note, close.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };

        assert!(matches!(
            probe(ok, &spec(CheckKind::Tcp)).await,
            Outcome::Up { .. }
        ));
        assert!(matches!(
            probe(ok, &spec(CheckKind::Http)).await,
            Outcome::Up { .. }
        ));
        let down = |o: Outcome| match o {
            Outcome::Down { reason } => reason,
            up => panic!("expected down, got {up:?}"),
        };
        assert!(down(probe(err, &spec(CheckKind::Http)).await).contains("503"));
        assert!(down(probe(junk, &spec(CheckKind::Http)).await).contains("not an HTTP"));
        assert!(down(probe(slow, &spec(CheckKind::Http)).await).contains("within"));
        assert!(down(probe(closed, &spec(CheckKind::Tcp)).await).contains("connect"));
    }

    #[tokio::test]
    async fn a_hung_backend_does_not_delay_the_others() {
        let hung = http_server("HTTP/1.1 200 OK\r\n\r\n", Duration::from_secs(30)).await;
        let ok = http_server("HTTP/1.1 200 OK\r\n\r\n", Duration::ZERO).await;
        let (tx, mut rx) = mpsc::channel(16);
        let mut checker = Checker::new(4, tx);
        let svc = |name: &str, addr| Service {
            name: name.into(),
            addr: crate::model::ServiceAddr {
                vip: "198.19.0.1".parse().unwrap(),
                port: 80,
                protocol: crate::model::Protocol::Tcp,
            },
            backends: vec![crate::model::Backend::new(addr, 1)],
            check: HealthCheck {
                kind: CheckKind::Http,
                timeout_ms: 5000,
                ..HealthCheck::default()
            },
            scheduler: Default::default(),
        };
        checker.sync(&[svc("hung", hung), svc("ok", ok)]);
        assert_eq!(checker.len(), 2);
        let first = timeout(Duration::from_secs(2), rx.recv())
            .await
            .expect("a report while the other probe hangs")
            .unwrap();
        assert_eq!(first.service, "ok");
        assert!(matches!(first.outcome, Outcome::Up { .. }));
        checker.sync(&[]);
        assert!(checker.is_empty());
    }
}
