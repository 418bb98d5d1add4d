//! The daemon: one event loop that owns the data plane, the registry and the config.
//!
//! Start: load the config, open the registry, open the data plane on its pins (adopting a
//! running one), reconcile the desired services (file + registry) into the maps, attach.
//! Then one loop serves, one at a time: admin API requests, config file changes (watched,
//! and SIGHUP), and SIGINT/SIGTERM. Because one task does all of it, the reconciler stays the
//! only writer of the maps without any lock.
//!
//! Exit leaves the data plane running (pinned maps and links): established and new
//! connections keep flowing while the daemon is stopped or upgraded. `--detach-on-exit`
//! removes everything instead.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use orch_common::maps::{slot_table_index, FlowKey, Settings, DIR_FORWARD, SEEN_FIN, SEEN_RST};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::mpsc,
    time::Instant,
};
use tracing::{error, info, warn};

use crate::vips::VipRoutes;
use crate::{
    api::{
        self, ApiError, ApiServerError, BackendInfo, BackendRow, ErrorKind, Reply, Request,
        ServiceInfo, Source, StatusInfo,
    },
    breaker::{self, Breaker},
    config::{AttachConfig, Config, ConfigError},
    dataplane::{self, AttachKind, Capacity, Dataplane, DataplaneError, Timeouts},
    explain::{self, CpuChoice, Explanation, Path as ExplainPath},
    health::{Checker, Outcome, Report},
    metrics::{self, BackendEvents, BackendSample, Metrics, OpResult, ServiceSample, Snapshot},
    model::{AdminState, Backend, CheckKind, HealthCheck, Protocol, Service, ServiceAddr},
    reconcile::{self, MapReader, ReconcileError, Reconciler},
    registry::{Change, Registry, RegistryError},
};

/// Why the daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("installing the configured services failed")]
    Reconcile(#[from] ReconcileError),
    #[error(transparent)]
    Api(#[from] ApiServerError),
    #[error(transparent)]
    Metrics(#[from] metrics::ListenError),
    #[error("installing a signal handler failed")]
    Signal(#[source] std::io::Error),
}

/// Options of `orch daemon`.
#[derive(Clone, Debug)]
pub struct Options {
    pub config: PathBuf,
    /// Detach and remove every pin on exit instead of leaving the data plane running.
    pub detach_on_exit: bool,
}

/// Runs the daemon until SIGINT or SIGTERM.
pub async fn run(opts: &Options) -> Result<(), DaemonError> {
    let mut sigint = signal(SignalKind::interrupt()).map_err(DaemonError::Signal)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(DaemonError::Signal)?;
    let mut sighup = signal(SignalKind::hangup()).map_err(DaemonError::Signal)?;

    let (reports_tx, mut reports) = mpsc::channel(256);
    let mut d = Daemon::start(&opts.config, reports_tx)?;
    d.dp.forward_kernel_log()?;
    let socket = d.config.api.socket.clone();
    let listener = api::bind(&socket)?;
    let (calls_tx, mut calls) = mpsc::channel(64);
    let server = tokio::spawn(api::serve(listener, calls_tx));
    let (scrapes_tx, mut scrapes) = mpsc::channel::<metrics::Scrape>(16);
    let metrics_server = if d.config.metrics.enabled {
        let listener = metrics::bind(d.config.metrics.listen).await?;
        Some(tokio::spawn(metrics::serve(listener, scrapes_tx)))
    } else {
        None
    };
    let (changed_tx, mut changed) = mpsc::channel(1);
    let _watcher = watch(&opts.config, changed_tx)
        .inspect_err(|e| warn!(error = %e, "cannot watch the config file; reload with SIGHUP"))
        .ok();
    let mut ticks = tokio::time::interval(Duration::from_millis(100));
    let mut link_changes = crate::links::watch();
    info!("orch is ready");

    loop {
        tokio::select! {
            Some((request, reply)) = calls.recv() => {
                let _ = reply.send(d.handle(request));
            }
            Some(report) = reports.recv() => d.on_report(report),
            Some(scrape) = scrapes.recv() => {
                let _ = scrape.send(d.scrape());
            }
            _ = ticks.tick() => d.tick(Instant::now()),
            Some(()) = link_changes.recv() => d.sync_interfaces(),
            Some(()) = changed.recv() => {
                // Editors save in several steps (truncate, write, rename): let them finish.
                tokio::time::sleep(Duration::from_millis(100)).await;
                while changed.try_recv().is_ok() {}
                d.reload("the file changed");
            }
            _ = sighup.recv() => d.reload("SIGHUP"),
            _ = sigint.recv() => { info!("SIGINT received, shutting down"); break; }
            _ = sigterm.recv() => { info!("SIGTERM received, shutting down"); break; }
        }
    }
    server.abort();
    if let Some(m) = metrics_server {
        m.abort();
    }
    if let Err(e) = std::fs::remove_file(&socket) {
        warn!(socket = %socket.display(), error = %e, "removing the admin socket failed");
    }
    log_totals(&d.dp);
    if opts.detach_on_exit {
        d.dp.detach_all();
        d.dp.remove_pins();
    } else {
        info!(
            pin_dir = %d.config.dataplane.pin_dir.get_ref().display(),
            "the data plane keeps running; the next daemon takes it over"
        );
    }
    Ok(())
}

/// What the daemon knows of one backend's health.
#[derive(Debug)]
struct BackendHealth {
    /// The data plane's signals at the last read, to take differences.
    signals: orch_common::maps::BackendSignals,
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
    fn usable(&self) -> bool {
        self.healthy && self.breaker.allows_traffic()
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
    fn quick_limits(&self, timeout_ms: u64) -> Duration {
        let usual = self.handshake_mean().unwrap_or(QUICK_DEFAULT);
        let most = Duration::from_millis(timeout_ms).max(QUICK_MIN);
        (usual * QUICK_FACTOR).clamp(QUICK_MIN, most)
    }
}

/// A SYN unanswered for this many times the backend's usual handshake makes it suspect.
const QUICK_FACTOR: u32 = 50;
/// The floor of that wait and of the quick probe's timeout: scheduling noise on a busy
/// host is a few milliseconds, and a lost SYN must never be taken for a dead host.
const QUICK_MIN: Duration = Duration::from_millis(100);
/// The usual handshake assumed before the data plane has measured one.
const QUICK_DEFAULT: Duration = Duration::from_millis(4);

/// Most probes in flight at once.
const MAX_PROBES_IN_FLIGHT: usize = 64;

/// Everything the daemon owns.
pub struct Daemon {
    config_path: PathBuf,
    config: Config,
    dp: Dataplane,
    reconciler: Reconciler,
    registry: Registry,
    checker: Checker,
    health: HashMap<(String, SocketAddr), BackendHealth>,
    /// Every backend whose kernel signals the ticks read, rebuilt after each map sync
    /// (`None`: stale), and where the next tick starts reading (see [`SIGNALS_PER_TICK`]).
    signal_targets: Option<Vec<SignalTarget>>,
    signal_cursor: usize,
    seeds: u64,
    probes: u64,
    started: Instant,
    reloads: u64,
    reload_failures: u64,
    last_reload_error: Option<String>,
    metrics: Metrics,
    /// Services in panic at the last rotation change, to log when one enters or leaves it.
    panicking: BTreeSet<String>,
    /// When the next expiry step of the connection tables is due.
    next_expiry: Instant,
    /// When to compare the attachments with the kernel's interfaces without being told.
    next_link_check: Instant,
    /// Configured interfaces that are not there now (said once, attached when they return).
    missing: BTreeSet<String>,
    /// The VIPs' unreachable routes (see [`crate::vips`]).
    vip_routes: VipRoutes,
}

impl Daemon {
    /// Loads the config, the registry and the data plane, installs the services and
    /// attaches. On error nothing new stays attached.
    pub fn start(config_path: &Path, reports: mpsc::Sender<Report>) -> Result<Daemon, DaemonError> {
        let config = Config::load(config_path)?;
        let registry = Registry::open(&config.registry.path)?;
        let registered: Vec<Service> = registry.services().cloned().collect();
        config.check_against(&registered)?;
        raise_memlock_limit();

        let d = &config.dataplane;
        let capacity = Capacity {
            max_services: *d.max_services.get_ref(),
            max_backends: *d.max_backends.get_ref(),
            conntrack: *d.conntrack_capacity.get_ref(),
            conntrack_new: *d.conntrack_new_capacity.get_ref(),
        };
        let mut dp = Dataplane::open(capacity, d.pin_dir.get_ref(), config.log.kernel as u8)?;
        dp.set_settings(&settings(&config))?;
        let mut reconciler = if dp.adopted() {
            Reconciler::adopt(capacity.max_services, capacity.max_backends, &dp)?
        } else {
            Reconciler::new(capacity.max_services, capacity.max_backends)
        };
        let health = HashMap::new();
        let metrics = Metrics::new();
        let began = std::time::Instant::now();
        let applied = reconciler.apply(&mut dp, &desired(&config, &registered, &health));
        metrics.map_sync(began.elapsed(), applied.is_ok());
        let summary = applied?;
        let mut checker = Checker::new(MAX_PROBES_IN_FLIGHT, reports);
        checker.sync(&all(&config, &registered));
        let mut daemon = Daemon {
            config_path: config_path.to_owned(),
            config,
            dp,
            reconciler,
            registry,
            checker,
            health,
            signal_targets: None,
            signal_cursor: 0,
            seeds: 0,
            probes: 0,
            started: Instant::now(),
            reloads: 0,
            reload_failures: 0,
            last_reload_error: None,
            metrics,
            panicking: BTreeSet::new(),
            next_expiry: Instant::now(),
            next_link_check: Instant::now() + LINK_CHECK_INTERVAL,
            missing: BTreeSet::new(),
            vip_routes: VipRoutes::start(),
        };
        let desired = desired(&daemon.config, &registered, &daemon.health);
        daemon
            .vip_routes
            .set(desired.iter().map(|s| s.addr.vip).collect());
        daemon.attach()?;
        // The new program is in every link now: what the old one did since the first pass
        // is carried over too, and the old layout's maps are retired.
        if let Err(e) = daemon.dp.migrate(true) {
            error!(error = %format!("{:#}", anyhow::Error::from(e)), "migrating the previous map layout failed");
        }
        daemon.forget_removed();
        release_freed_memory();
        info!(
            services = daemon.reconciler.len(),
            added = summary.added,
            updated = summary.updated,
            removed = summary.removed,
            unchanged = summary.unchanged,
            adopted = daemon.dp.adopted(),
            interfaces = ?daemon.dp.attached().map(|(i, h)| format!("{i} ({})", h.name())).collect::<Vec<_>>(),
            "data plane in place"
        );
        Ok(daemon)
    }

    fn attach(&mut self) -> Result<(), DataplaneError> {
        let d = &self.config.dataplane;
        let kind = attach_kind(d.attach);
        let wanted: Vec<String> = d
            .interfaces
            .get_ref()
            .iter()
            .map(|i| i.get_ref().clone())
            .collect();
        for iface in &wanted {
            if !self.dp.attached().any(|(a, _)| a == iface) {
                let hook = Dataplane::choose_hook(iface, kind)?;
                self.dp.attach(iface, hook)?;
            }
        }
        self.dp.detach_others(&wanted);
        Ok(())
    }

    /// Brings the attachments in line with the interfaces the kernel has now: forgets those
    /// whose device went away (or was replaced under its name), attaches the configured
    /// ones that are there and not attached. Runs on link notifications and every few
    /// seconds. A failure is logged and tried again at the next change.
    pub fn sync_interfaces(&mut self) {
        self.next_link_check = Instant::now() + LINK_CHECK_INTERVAL;
        for iface in self.dp.forget_gone() {
            warn!(
                iface,
                "interface gone: the balancer went with it; attached again when it returns"
            );
        }
        let kind = attach_kind(self.config.dataplane.attach);
        let wanted: Vec<String> = self
            .config
            .dataplane
            .interfaces
            .get_ref()
            .iter()
            .map(|i| i.get_ref().clone())
            .collect();
        self.missing.retain(|m| wanted.contains(m));
        for iface in wanted {
            if self.dp.attached().any(|(a, _)| a == iface) {
                self.missing.remove(&iface);
                continue;
            }
            let result = Dataplane::choose_hook(&iface, kind).and_then(|hook| {
                self.dp.attach(&iface, hook)?;
                Ok(hook)
            });
            match result {
                Ok(hook) => {
                    info!(
                        iface,
                        hook = hook.name(),
                        "interface back: balancer attached"
                    );
                    self.missing.remove(&iface);
                }
                Err(e) => {
                    if self.missing.insert(iface.clone()) {
                        warn!(iface, error = %format!("{:#}", anyhow::Error::from(e)), "configured interface not attached; trying again when links change");
                    }
                }
            }
        }
    }

    /// Re-reads the config file and applies it as a diff; an invalid file changes nothing.
    pub fn reload(&mut self, why: &str) {
        match self.try_reload() {
            Ok(summary) => {
                self.reloads += 1;
                self.metrics.config_reload(true);
                self.last_reload_error = None;
                info!(
                    trigger = why,
                    added = summary.added,
                    updated = summary.updated,
                    removed = summary.removed,
                    unchanged = summary.unchanged,
                    "config reloaded"
                );
                self.note_panic();
            }
            Err(e) => {
                self.reload_failures += 1;
                self.metrics.config_reload(false);
                let text = format!("{e:#}");
                error!(
                    trigger = why,
                    "config reload rejected, the running state is unchanged:\n{text}"
                );
                self.last_reload_error = Some(text);
            }
        }
        release_freed_memory();
    }

    fn try_reload(&mut self) -> anyhow::Result<crate::reconcile::Summary> {
        let next = Config::load(&self.config_path)?;
        let registered: Vec<Service> = self.registry.services().cloned().collect();
        next.check_against(&registered)?;
        let desired = desired(&next, &registered, &self.health);
        self.reconciler.check(&desired)?;
        for (what, old, new) in restart_only(&self.config, &next) {
            warn!(
                setting = what,
                running = old,
                file = new,
                "this setting takes effect at the next restart; keeping the running value"
            );
        }
        self.dp.set_settings(&settings(&next))?;
        let summary = self.apply(&desired)?;
        // Keep what cannot change while running, take the rest.
        let mut next = next;
        next.dataplane.max_services = self.config.dataplane.max_services.clone();
        next.dataplane.max_backends = self.config.dataplane.max_backends.clone();
        next.dataplane.conntrack_capacity = self.config.dataplane.conntrack_capacity.clone();
        next.dataplane.conntrack_new_capacity =
            self.config.dataplane.conntrack_new_capacity.clone();
        next.dataplane.pin_dir = self.config.dataplane.pin_dir.clone();
        next.registry = std::mem::take(&mut self.config.registry);
        next.api = std::mem::take(&mut self.config.api);
        next.metrics = self.config.metrics.clone();
        next.log = self.config.log.clone();
        self.config = next;
        self.attach()?;
        self.checker.sync(&all(&self.config, &registered));
        self.forget_removed();
        Ok(summary)
    }

    /// Takes one probe result: counts it against the thresholds, feeds the breaker, and
    /// re-balances when the backend enters or leaves rotation.
    pub fn on_report(&mut self, report: Report) {
        self.probes += 1;
        let registered: Vec<Service> = self.registry.services().cloned().collect();
        let Some(check) = all(&self.config, &registered)
            .into_iter()
            .find(|s| s.name == report.service)
            .map(|s| s.check)
        else {
            return; // the service went away while the probe ran
        };
        let key = (report.service.clone(), report.backend);
        let peers_slow: Vec<bool> = self
            .health
            .iter()
            .filter(|((s, b), _)| *s == report.service && *b != report.backend)
            .map(|(_, h)| h.last_slow)
            .collect();
        self.seeds += 1;
        let seed = self.seeds;
        let h = self
            .health
            .entry(key)
            .or_insert_with(|| BackendHealth::new(seed));
        let before = h.usable();
        h.events.probe(matches!(report.outcome, Outcome::Up { .. }));
        let suspect = std::mem::take(&mut h.suspect);
        if let Outcome::Up { latency } = &report.outcome {
            self.metrics.probe_latency(&report.service, *latency);
        }
        let transition = match &report.outcome {
            Outcome::Up { latency } => {
                if suspect {
                    info!(service = %report.service, backend = %report.backend, ?latency, "quick probe answered: a SYN was lost, the backend is fine");
                }
                h.successes += 1;
                h.failures = 0;
                if !h.healthy && h.successes >= check.rise {
                    h.healthy = true;
                    info!(service = %report.service, backend = %report.backend, "backend healthy");
                }
                h.last_slow = h.breaker.is_slow(*latency);
                if h.last_slow && breaker::shared_slowness(&peers_slow) {
                    // The whole service is slow, not this backend: no verdict on it.
                    None
                } else {
                    h.breaker.record_success(*latency, report.at)
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
                    warn!(service = %report.service, backend = %report.backend, %reason, "backend unhealthy");
                }
                h.breaker.record_failure(report.at)
            }
        };
        if let Some(t) = transition {
            h.events.transition(t.to);
            info!(
                service = %report.service,
                backend = %report.backend,
                from = t.from.name(),
                to = t.to.name(),
                threshold = h.breaker.threshold(),
                expected_ms = h.breaker.expected_latency().map(|d| d.as_secs_f64() * 1e3),
                "breaker"
            );
        }
        // A closed breaker that has started counting bad samples, and a half-open one
        // running its trials, want the next sample now rather than at the stable interval:
        // a slow backend is judged, and a recovered one readmitted, in seconds.
        let suspicious =
            h.breaker.pending_bad() > 0 || h.breaker.state() == breaker::State::HalfOpen;
        if h.usable() != before {
            self.rebalance();
        }
        if suspicious {
            self.checker.nudge(&report.service, report.backend);
        }
    }

    /// Reads the data plane's passive signals, and moves open breakers whose time has come
    /// to half-open (probing them at once).
    pub fn tick(&mut self, now: Instant) {
        self.read_signals(now);
        if now >= self.next_expiry {
            self.next_expiry = now + EXPIRY_INTERVAL;
            self.expire();
        }
        if now >= self.next_link_check {
            self.sync_interfaces();
        }
        for ((service, backend), h) in &mut self.health {
            if let Some(t) = h.breaker.poll(now) {
                h.events.transition(t.to);
                info!(%service, %backend, from = t.from.name(), to = t.to.name(), "breaker");
                self.checker.nudge(service, *backend);
            }
        }
    }

    /// What the kernel saw since the last tick, per backend. Refusals (and the kernel's own
    /// ejection of the backend) count as a failed check and get a probe at once; once probes
    /// find the backend healthy again, the ejection is cleared. Unanswered SYNs with no
    /// completed handshake get a probe at once too. Completed handshakes vouch for the
    /// backend, so its stable checks can be sparser.
    ///
    /// A tick reads at most [`SIGNALS_PER_TICK`] backends, resuming where the last one
    /// stopped, so its cost is bounded whatever the fleet's size.
    fn read_signals(&mut self, now: Instant) {
        let targets = match self.signal_targets.take() {
            Some(t) => t,
            None => self.signal_targets_now(),
        };
        let n = targets.len().min(SIGNALS_PER_TICK);
        let start = if targets.is_empty() {
            0
        } else {
            self.signal_cursor % targets.len()
        };
        self.signal_cursor = start + n;
        let mut changed = false;
        for target in targets.iter().cycle().skip(start).take(n) {
            let id = target.id;
            let (Ok(signals), Ok(ejected)) = (self.dp.backend_signals(id), self.dp.ejected(id))
            else {
                continue;
            };
            self.seeds += 1;
            let seed = self.seeds;
            let h = self
                .health
                .entry((target.service.clone(), target.backend))
                .or_insert_with(|| BackendHealth::new(seed));
            let refused = signals.refused.saturating_sub(h.signals.refused);
            let handshakes = signals.handshakes.saturating_sub(h.signals.handshakes);
            let unanswered = signals.syn_retrans.saturating_sub(h.signals.syn_retrans);
            h.signals = signals;
            if target.check == CheckKind::None {
                // No probe could ever bring it back: the kernel's ejection saved the
                // refused attempt; lift it at once rather than for good.
                if ejected {
                    if let Err(e) = self.dp.clear_ejection(id) {
                        warn!(error = %e, "clearing an ejection failed");
                    }
                }
                continue;
            }
            if refused > 0 || (ejected && !h.ejection_noted) {
                let before = h.usable();
                h.ejection_noted = ejected;
                h.successes = 0;
                h.failures += 1;
                h.last_failure = Some("refused connections (seen by the data plane)".into());
                if h.healthy {
                    h.healthy = false;
                    warn!(service = %target.service, backend = %target.backend, refused, "backend refuses connections: out of rotation");
                }
                if let Some(t) = h.breaker.record_failure(now) {
                    h.events.transition(t.to);
                    info!(service = %target.service, backend = %target.backend, from = t.from.name(), to = t.to.name(), "breaker");
                }
                changed |= h.usable() != before;
                self.checker.nudge(&target.service, target.backend);
            } else if ejected && h.usable() {
                // Probes found it healthy again: let the data plane choose it again.
                match self.dp.clear_ejection(id) {
                    Ok(()) => h.ejection_noted = false,
                    Err(e) => warn!(error = %e, "clearing an ejection failed"),
                }
            } else if h.usable()
                && signals.syn_unanswered(
                    dataplane::monotonic_ns(),
                    h.quick_limits(target.timeout_ms).as_nanos() as u64,
                )
                && h.suspected_syn_ns != signals.last_syn_ns
            {
                // A SYN has gone unanswered for many times this backend's usual handshake,
                // and no SYN-ACK came since: a host gone dark, or a lost packet. A quick
                // probe decides, at once: failed, the backend is out (the unanswered SYN
                // counts as the first failure); answered, nothing happened.
                h.suspect = true;
                h.suspected_syn_ns = signals.last_syn_ns;
                let limit = h.quick_limits(target.timeout_ms);
                info!(service = %target.service, backend = %target.backend, ?limit, "a SYN went unanswered: quick probe");
                self.checker
                    .nudge_quick(&target.service, target.backend, limit);
            } else if unanswered > 0 && handshakes == 0 {
                // Clients retransmit SYNs it left unanswered and no handshake with it
                // completed since the last read: a host gone dark, or one whose accept
                // queue is full. Not proof (a lost packet looks the same), so no failure
                // is counted; the next probe goes out now instead of at its slot.
                self.checker.nudge(&target.service, target.backend);
            } else if handshakes > 0 {
                self.checker.vouch(&target.service, target.backend);
            }
        }
        // Put back unless a sync in this tick made them stale.
        if self.signal_targets.is_none() {
            self.signal_targets = Some(targets);
        }
        if changed {
            self.rebalance();
        }
    }

    /// Every backend the kernel keeps signals for, with its id.
    fn signal_targets_now(&self) -> Vec<SignalTarget> {
        let registered: Vec<Service> = self.registry.services().cloned().collect();
        let mut targets = Vec::new();
        for svc in all(&self.config, &registered) {
            for b in &svc.backends {
                if let Some(id) = self.reconciler.backend_id(&svc.addr, b.addr) {
                    targets.push(SignalTarget {
                        service: svc.name.clone(),
                        check: svc.check.kind,
                        timeout_ms: svc.check.timeout_ms,
                        backend: b.addr,
                        id,
                    });
                }
            }
        }
        targets
    }

    /// Rewrites the slot tables for the current health (a diff: only services whose
    /// rotation changed are written).
    fn rebalance(&mut self) {
        let registered: Vec<Service> = self.registry.services().cloned().collect();
        // A backend back in rotation must also be choosable by the kernel at once: lift the
        // data plane's ejection before the table that includes it is written.
        for svc in all(&self.config, &registered) {
            for b in &svc.backends {
                let Some(h) = self.health.get_mut(&(svc.name.clone(), b.addr)) else {
                    continue;
                };
                if !(h.ejection_noted && h.usable()) {
                    continue;
                }
                if let Some(id) = self.reconciler.backend_id(&svc.addr, b.addr) {
                    match self.dp.clear_ejection(id) {
                        Ok(()) => h.ejection_noted = false,
                        Err(e) => warn!(error = %e, "clearing an ejection failed"),
                    }
                }
            }
        }
        let desired = desired(&self.config, &registered, &self.health);
        match self.apply(&desired) {
            Ok(s) => {
                info!(updated = s.updated, "rotation changed");
                self.note_panic();
            }
            Err(e) => {
                error!(error = %format!("{:#}", anyhow::Error::from(e)), "rebalancing failed")
            }
        }
    }

    /// One step of the connection tables' expiry (see [`Dataplane::expire`]).
    fn expire(&mut self) {
        let d = &self.config.dataplane;
        let secs = |s: &toml::Spanned<u64>| s.get_ref().saturating_mul(1_000_000_000);
        let t = Timeouts {
            tcp_idle_ns: secs(&d.tcp_idle_timeout_secs),
            tcp_close_ns: secs(&d.tcp_close_timeout_secs),
            unconfirmed_ns: secs(&d.unconfirmed_timeout_secs),
            udp_idle_ns: secs(&d.udp_idle_timeout_secs),
        };
        match self.dp.expire(&t, EXPIRY_BUDGET) {
            Ok(done) => self.metrics.conntrack_expired(&done),
            Err(e) => warn!(error = %e, "expiring connections failed"),
        }
    }

    /// Logs services entering or leaving panic since the last call (after every change of
    /// health or of the services).
    fn note_panic(&mut self) {
        let now: BTreeSet<String> = self
            .all_services()
            .filter(|(s, _)| in_panic(&self.config, &self.health, s))
            .map(|(s, _)| s.name)
            .collect();
        let threshold = *self.config.health.panic_threshold.get_ref();
        for name in now.difference(&self.panicking) {
            warn!(service = %name, threshold_percent = threshold, "too few healthy backends to trust the checks: panic, balancing over every enabled backend");
        }
        for name in self.panicking.difference(&now) {
            info!(service = %name, "panic over: balancing over healthy backends again");
        }
        self.panicking = now;
    }

    /// Drops health state of backends that no longer exist.
    fn forget_removed(&mut self) {
        let registered: Vec<Service> = self.registry.services().cloned().collect();
        let backends: HashSet<(String, SocketAddr)> = all(&self.config, &registered)
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| (s.name.clone(), b.addr)))
            .collect();
        self.health.retain(|key, _| backends.contains(key));
        self.metrics.sync_backends(&backends);
    }

    /// Where the data plane sends the next packet of `client` -> `vip`, read from the maps
    /// the program reads (see [`crate::explain`]).
    fn explain(
        &self,
        protocol: Protocol,
        client: SocketAddr,
        vip: SocketAddr,
    ) -> Result<Explanation, ApiError> {
        let invalid = |m: String| ApiError::new(ErrorKind::Invalid, m);
        if client.is_ipv4() != vip.is_ipv4() {
            return Err(invalid(format!(
                "{client} and {vip} are not of the same address family"
            )));
        }
        if client.port() == 0 || vip.port() == 0 {
            return Err(invalid("ports must be 1-65535".into()));
        }
        let internal = |e: DataplaneError| {
            ApiError::new(
                ErrorKind::Internal,
                format!("reading the data plane: {:#}", anyhow::Error::from(e)),
            )
        };
        let addr = ServiceAddr {
            vip: vip.ip(),
            port: vip.port(),
            protocol,
        };
        let mut e = Explanation {
            protocol,
            client,
            vip,
            service: None,
            path: ExplainPath::NotAService,
            backends: Vec::new(),
        };
        let Some((svc, source)) = self.all_services().find(|(s, _)| s.addr == addr) else {
            return Ok(e);
        };
        e.service = Some(svc.name.clone());
        let Some(entry) = self
            .dp
            .service_entry(&reconcile::service_key(&addr))
            .map_err(internal)?
        else {
            return Ok(e); // not installed: the program does not know it either
        };
        let key = FlowKey {
            src: reconcile::addr_words(client.ip()),
            dst: reconcile::addr_words(vip.ip()),
            src_port_be: client.port().to_be(),
            dst_port_be: vip.port().to_be(),
            proto: protocol.number(),
            dir: DIR_FORWARD,
            _pad: 0,
        };
        let mut named = Vec::new();
        let mut stale = None;
        if let Some(flow) = self.dp.flow(&key).map_err(internal)? {
            let backend = SocketAddr::new(
                reconcile::words_addr(&flow.nat_addr),
                u16::from_be(flow.nat_port_be),
            );
            let idle_ns = dataplane::monotonic_ns().saturating_sub(flow.last_seen_ns);
            let udp_idle = self.config.dataplane.udp_idle_timeout_secs.get_ref() * 1_000_000_000;
            if protocol == Protocol::Udp && idle_ns > udp_idle {
                stale = Some(backend);
            } else {
                let reply = key.reply(flow.nat_addr, flow.nat_port_be);
                let reply_seen = self
                    .dp
                    .flow(&reply)
                    .map_err(internal)?
                    .map_or(0, |r| r.seen());
                let closed = |seen: u32| seen & (SEEN_FIN | SEEN_RST) != 0;
                e.path = ExplainPath::Existing {
                    backend,
                    idle_ms: idle_ns / 1_000_000,
                    client_closed: closed(flow.seen()),
                    backend_closed: closed(reply_seen),
                };
                named.push(backend);
            }
        }
        if named.is_empty() {
            let table = self
                .dp
                .slot_table(slot_table_index(entry.id, entry.active_table))
                .map_err(internal)?;
            let cursors = self.dp.cursors(entry.id).map_err(internal)?;
            let picks =
                explain::next_picks(&cursors, &table, |id| self.dp.ejected(id).unwrap_or(false));
            let addr_of = |id: u32| {
                self.dp
                    .backend_entry(id)
                    .map(|b| {
                        SocketAddr::new(reconcile::words_addr(&b.addr), u16::from_be(b.port_be))
                    })
                    .map_err(internal)
            };
            e.path = if picks.is_empty() {
                ExplainPath::NoBackend
            } else {
                let mut by_cpu = Vec::new();
                for p in picks {
                    let backend = addr_of(p.backend_id)?;
                    if !named.contains(&backend) {
                        named.push(backend);
                    }
                    by_cpu.push(CpuChoice {
                        cpu: p.cpu,
                        slot: p.slot,
                        backend,
                        skipped: p
                            .skipped
                            .into_iter()
                            .map(addr_of)
                            .collect::<Result<_, _>>()?,
                    });
                }
                ExplainPath::New {
                    stale,
                    slots: table.len,
                    by_cpu,
                }
            };
        }
        let live = self.live();
        e.backends = self
            .info(svc, source, &live)
            .backends
            .into_iter()
            .filter(|b| named.contains(&b.address))
            .collect();
        Ok(e)
    }

    /// Brings the maps in line with `desired`, timing it for the metrics.
    fn apply(&mut self, desired: &[Service]) -> Result<crate::reconcile::Summary, ReconcileError> {
        let began = std::time::Instant::now();
        let applied = self.reconciler.apply(&mut self.dp, desired);
        self.signal_targets = None;
        self.vip_routes
            .set(desired.iter().map(|s| s.addr.vip).collect());
        self.metrics.map_sync(began.elapsed(), applied.is_ok());
        applied
    }

    /// The Prometheus text: event counters, and the kernel's counters and the daemon's
    /// view of each backend read now.
    pub fn scrape(&self) -> String {
        let idle = self.config.dataplane.udp_idle_timeout_secs.get_ref() * 1_000_000_000;
        let census = self.dp.census(idle).unwrap_or_else(|e| {
            warn!(error = %e, "walking the connection table failed");
            Default::default()
        });
        let reasons = self.dp.reason_counts().unwrap_or_else(|e| {
            warn!(error = %e, "reading the verdict counters failed");
            Vec::new()
        });
        let mut snapshot = Snapshot {
            reasons,
            conntrack_entries: census.entries,
            conntrack_capacity: u64::from(self.dp.capacity().conntrack),
            unconfirmed_entries: census.unconfirmed,
            unconfirmed_capacity: u64::from(self.dp.capacity().conntrack_new),
            ct_events: self.dp.ct_events().unwrap_or_default(),
            uptime: self.started.elapsed(),
            ..Default::default()
        };
        for (s, _) in self.all_services() {
            let Some(id) = self.reconciler.service_id(&s.addr) else {
                continue;
            };
            let panic = in_panic(&self.config, &self.health, &s);
            let mut sample = ServiceSample {
                traffic: self.dp.service_counters(id).unwrap_or_default(),
                name: s.name.clone(),
                panic,
                backends: Vec::new(),
            };
            for b in &s.backends {
                let Some(bid) = self.reconciler.backend_id(&s.addr, b.addr) else {
                    continue;
                };
                let h = self.health.get(&(s.name.clone(), b.addr));
                sample.backends.push(BackendSample {
                    addr: b.addr,
                    traffic: self.dp.backend_counters(bid).unwrap_or_default(),
                    signals: self.dp.backend_signals(bid).unwrap_or_default(),
                    ejected: self.dp.ejected(bid).unwrap_or(false),
                    active: census.live.get(&bid).copied().unwrap_or(0),
                    healthy: h.is_none_or(|h| h.healthy),
                    in_rotation: in_rotation(b, h, panic),
                    breaker: h.map_or(breaker::State::Closed, |h| h.breaker.state()),
                    events: h.map(|h| h.events).unwrap_or_default(),
                });
            }
            snapshot.backends_total += s.backends.len() as u64;
            snapshot.services.push(sample);
        }
        self.metrics.render(&snapshot)
    }

    /// Serves one admin API request.
    pub fn handle(&mut self, request: Request) -> Result<Reply, ApiError> {
        match request {
            Request::Status => Ok(Reply::Status(self.status())),
            Request::ServiceList => {
                let live = self.live();
                Ok(Reply::Services(
                    self.all_services()
                        .map(|(s, src)| self.info(s, src, &live))
                        .collect(),
                ))
            }
            Request::ServiceShow { name } => {
                let live = self.live();
                self.all_services()
                    .find(|(s, _)| s.name == name)
                    .map(|(s, src)| Reply::Service(self.info(s, src, &live)))
                    .ok_or_else(|| not_found(format!("no service named {name:?}")))
            }
            Request::Explain {
                protocol,
                client,
                vip,
            } => self.explain(protocol, client, vip).map(Reply::Explain),
            Request::BackendList { service } => {
                if let Some(name) = &service {
                    if !self.all_services().any(|(s, _)| &s.name == name) {
                        return Err(not_found(format!("no service named {name:?}")));
                    }
                }
                let live = self.live();
                Ok(Reply::Backends(
                    self.all_services()
                        .filter(|(s, _)| service.as_ref().is_none_or(|n| *n == s.name))
                        .flat_map(|(s, src)| {
                            let info = self.info(s, src, &live);
                            let name = info.name.clone();
                            info.backends.into_iter().map(move |b| BackendRow {
                                service: name.clone(),
                                backend: b,
                            })
                        })
                        .collect(),
                ))
            }
            Request::ServiceAdd {
                name,
                vip,
                port,
                protocol,
                backends,
                check,
            } => self.change(Change::AddService(Service {
                name,
                addr: ServiceAddr {
                    vip,
                    port,
                    protocol,
                },
                check: check.unwrap_or_else(|| HealthCheck::default_for(protocol)),
                backends: backends
                    .into_iter()
                    .map(|b| Backend::new(b.address, b.weight))
                    .collect(),
            })),
            Request::ServiceRm { name } => self.change(Change::RemoveService { name }),
            Request::BackendAdd {
                service,
                address,
                weight,
            } => self.change(Change::AddBackend {
                service,
                backend: Backend::new(address, weight),
            }),
            Request::BackendRm { service, address } => self.change(Change::RemoveBackend {
                service,
                addr: address,
            }),
            Request::BackendSetState {
                service,
                address,
                state,
            } => self.change(Change::SetState {
                service,
                addr: address,
                state,
            }),
        }
    }

    /// Checks a registry change against everything (validity, the file's services,
    /// capacity), commits it durably, then brings the data plane in line.
    fn change(&mut self, change: Change) -> Result<Reply, ApiError> {
        let operation = match &change {
            Change::AddService(_) => "service_add",
            Change::RemoveService { .. } => "service_rm",
            Change::AddBackend { .. } => "backend_add",
            Change::RemoveBackend { .. } => "backend_rm",
            Change::SetState { .. } => "backend_set_state",
        };
        let result = self.try_change(change);
        if result.is_ok() {
            self.note_panic();
        }
        self.metrics.registry_op(
            operation,
            match &result {
                Ok(_) => OpResult::Ok,
                Err(e) if e.kind == ErrorKind::Internal => OpResult::Error,
                Err(_) => OpResult::Refused,
            },
        );
        result
    }

    fn try_change(&mut self, change: Change) -> Result<Reply, ApiError> {
        let file_services = self.config.services();
        let target = match &change {
            Change::AddService(s) => &s.name,
            Change::RemoveService { name } => name,
            Change::AddBackend { service, .. }
            | Change::RemoveBackend { service, .. }
            | Change::SetState { service, .. } => service,
        };
        if file_services.iter().any(|s| &s.name == target) {
            return Err(ApiError::new(
                ErrorKind::Conflict,
                format!(
                    "service {target:?} is defined in the config file {}; change it there",
                    self.config_path.display()
                ),
            ));
        }
        if let Change::AddService(svc) = &change {
            if let Some(other) = file_services.iter().find(|s| s.addr == svc.addr) {
                return Err(ApiError::new(
                    ErrorKind::Conflict,
                    format!(
                        "{} is already the address of service {:?} (config file)",
                        svc.addr, other.name
                    ),
                ));
            }
        }
        let registered = self.registry.preview(&change).map_err(registry_error)?;
        let desired = desired(&self.config, &registered, &self.health);
        self.reconciler
            .check(&desired)
            .map_err(|e| ApiError::new(ErrorKind::Capacity, e.to_string()))?;
        self.registry.commit(&change).map_err(registry_error)?;
        let done = describe(&change);
        info!(change = %done, "registry changed");
        let applied = self.apply(&desired);
        self.checker.sync(&all(&self.config, &registered));
        self.forget_removed();
        if let Err(e) = applied {
            let e = anyhow::Error::from(e);
            error!(error = %format!("{e:#}"), "applying a registry change to the data plane failed");
            return Err(ApiError::new(
                ErrorKind::Internal,
                format!("{done} in the registry, but the data plane was not updated: {e:#}"),
            ));
        }
        Ok(Reply::Done(done))
    }

    /// Every service with where it comes from, file first.
    fn all_services(&self) -> impl Iterator<Item = (Service, Source)> + '_ {
        self.config
            .services()
            .into_iter()
            .map(|s| (s, Source::File))
            .chain(
                self.registry
                    .services()
                    .map(|s| (s.clone(), Source::Registry)),
            )
    }

    /// Live connections per backend id, or none when the table cannot be read.
    fn live(&self) -> HashMap<u32, u64> {
        let idle = self.config.dataplane.udp_idle_timeout_secs.get_ref() * 1_000_000_000;
        match self.dp.census(idle) {
            Ok(c) => c.live,
            Err(e) => {
                warn!(error = %e, "counting live connections failed");
                HashMap::new()
            }
        }
    }

    fn info(&self, s: Service, source: Source, live: &HashMap<u32, u64>) -> ServiceInfo {
        let connections = |id: Option<u32>, service: bool| {
            id.and_then(|id| {
                if service {
                    self.dp.service_counters(id).ok()
                } else {
                    self.dp.backend_counters(id).ok()
                }
            })
            .map_or(0, |c| c.new_conns)
        };
        let panic = in_panic(&self.config, &self.health, &s);
        ServiceInfo {
            panic,
            connections: connections(self.reconciler.service_id(&s.addr), true),
            backends: s
                .backends
                .iter()
                .map(|b| {
                    let h = self.health.get(&(s.name.clone(), b.addr));
                    let health = match (s.check.kind, h) {
                        (CheckKind::None, _) => "unchecked",
                        (_, Some(h)) if !h.healthy => "unhealthy",
                        _ => "healthy",
                    };
                    let breaker = h.map_or(breaker::State::Closed, |h| h.breaker.state());
                    let id = self.reconciler.backend_id(&s.addr, b.addr);
                    BackendInfo {
                        established: id.and_then(|id| live.get(&id)).copied().unwrap_or(0),
                        address: b.addr,
                        weight: b.weight,
                        state: b.state,
                        health: health.to_owned(),
                        breaker: breaker.name().to_owned(),
                        in_rotation: in_rotation(b, h, panic),
                        connections: connections(id, false),
                    }
                })
                .collect(),
            name: s.name,
            vip: s.addr.vip,
            port: s.addr.port,
            protocol: s.addr.protocol,
            check: s.check,
            source,
        }
    }

    fn status(&self) -> StatusInfo {
        let services: Vec<(Service, Source)> = self.all_services().collect();
        StatusInfo {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            api: api::API_VERSION,
            pid: std::process::id(),
            uptime_secs: self.started.elapsed().as_secs(),
            config: self.config_path.clone(),
            registry: self.registry.path().to_owned(),
            pin_dir: self.config.dataplane.pin_dir.get_ref().clone(),
            interfaces: self
                .dp
                .attached()
                .map(|(i, hook)| format!("{i} ({})", hook.name()))
                .chain(self.missing.iter().map(|i| format!("{i} (missing)")))
                .collect(),
            adopted: self.dp.adopted(),
            services: services.len(),
            backends: services.iter().map(|(s, _)| s.backends.len()).sum(),
            config_reloads: self.reloads,
            probes_total: self.probes,
            config_reload_failures: self.reload_failures,
            last_reload_error: self.last_reload_error.clone(),
            services_in_panic: self.panicking.iter().cloned().collect(),
        }
    }
}

/// Whether new connections may go to backend `b` with health `h`, its service in panic or
/// not.
fn in_rotation(b: &Backend, h: Option<&BackendHealth>, panic: bool) -> bool {
    b.state == AdminState::Active && b.weight > 0 && (panic || h.is_none_or(|h| h.usable()))
}

/// Hands the heap that loading left free back to the system. Parsing a large config and
/// building the maps' contents peaks at several times what the daemon keeps (10,000
/// services: about 60 MB more), and glibc keeps freed memory in its arenas, where it would
/// count as the daemon's RSS for good.
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Backends whose kernel signals a tick reads at most (two map lookups each). A fleet up to
/// this size is read every tick (100 ms); a larger one in turns: 10,000 services x 8
/// backends in 16 s. The data plane ejects a refusing backend by itself at once; what waits
/// for the sweep is the daemon's follow-up (a probe, the breaker), not the protection.
const SIGNALS_PER_TICK: usize = 512;

/// How often the connection tables' expiry takes a step, and how many entries of each table
/// a step walks at most (a syscall or two each). A table of up to this size is swept whole
/// every second; the default capacity (262,144) in 16 s, so closed connections leave within
/// their close timeout plus that, at a few percent of one core.
fn attach_kind(c: AttachConfig) -> AttachKind {
    match c {
        AttachConfig::Auto => AttachKind::Auto,
        AttachConfig::Xdp => AttachKind::Xdp,
        AttachConfig::Tc => AttachKind::Tc,
    }
}

const EXPIRY_INTERVAL: Duration = Duration::from_secs(1);
/// How often the attachments are compared with the kernel's interfaces when no link
/// notification came (they normally say it at once: see [`crate::links`]).
const LINK_CHECK_INTERVAL: Duration = Duration::from_secs(5);
const EXPIRY_BUDGET: usize = 16_384;

/// One backend whose kernel signals the ticks read.
struct SignalTarget {
    service: String,
    check: CheckKind,
    /// The check's probe timeout, the longest a quick probe may take.
    timeout_ms: u64,
    backend: SocketAddr,
    id: u32,
}

/// The file's and the registry's services together.
fn all(config: &Config, registered: &[Service]) -> Vec<Service> {
    let mut v = config.services();
    v.extend_from_slice(registered);
    v
}

/// The data plane's view of [`all`] services: admin states and health applied.
fn desired(
    config: &Config,
    registered: &[Service],
    health: &HashMap<(String, SocketAddr), BackendHealth>,
) -> Vec<Service> {
    all(config, registered)
        .iter()
        .map(|s| {
            let panic = in_panic(config, health, s);
            s.for_dataplane(|addr| panic || usable(health, s, addr))
        })
        .collect()
}

/// Whether health lets new connections go to backend `addr` of `s`.
fn usable(
    health: &HashMap<(String, SocketAddr), BackendHealth>,
    s: &Service,
    addr: SocketAddr,
) -> bool {
    health
        .get(&(s.name.clone(), addr))
        .is_none_or(BackendHealth::usable)
}

/// Whether `s` is in panic under the configured threshold (see [`Service::in_panic`]).
fn in_panic(
    config: &Config,
    health: &HashMap<(String, SocketAddr), BackendHealth>,
    s: &Service,
) -> bool {
    s.in_panic(
        |addr| usable(health, s, addr),
        *config.health.panic_threshold.get_ref(),
    )
}

fn describe(change: &Change) -> String {
    match change {
        Change::AddService(s) => format!(
            "service {:?} added at {} with {} backends",
            s.name,
            s.addr,
            s.backends.len()
        ),
        Change::RemoveService { name } => format!("service {name:?} removed"),
        Change::AddBackend { service, backend } => format!(
            "backend {} added to service {service:?} (weight {})",
            backend.addr, backend.weight
        ),
        Change::RemoveBackend { service, addr } => {
            format!("backend {addr} removed from service {service:?}")
        }
        Change::SetState {
            service,
            addr,
            state,
        } => {
            let what = match state {
                AdminState::Active => "enabled",
                AdminState::Draining => "draining",
                AdminState::Disabled => "disabled",
            };
            format!("backend {addr} of service {service:?} is {what}")
        }
    }
}

fn not_found(message: String) -> ApiError {
    ApiError::new(ErrorKind::NotFound, message)
}

fn registry_error(e: RegistryError) -> ApiError {
    let kind = match &e {
        RegistryError::Invalid(_) => ErrorKind::Invalid,
        RegistryError::UnknownService(_) | RegistryError::UnknownBackend { .. } => {
            ErrorKind::NotFound
        }
        RegistryError::Conflict(_) => ErrorKind::Conflict,
        RegistryError::Open { .. } | RegistryError::TooNew { .. } | RegistryError::Db(_) => {
            ErrorKind::Internal
        }
    };
    let message = format!("{:#}", anyhow::Error::from(e));
    ApiError::new(kind, message)
}

/// Settings that only a restart changes, as (name, running, in the file) where they differ.
fn restart_only(running: &Config, next: &Config) -> Vec<(&'static str, String, String)> {
    let (a, b) = (&running.dataplane, &next.dataplane);
    let mut out = Vec::new();
    let mut cmp = |what, x: String, y: String| {
        if x != y {
            out.push((what, x, y));
        }
    };
    cmp(
        "dataplane.max_services",
        a.max_services.get_ref().to_string(),
        b.max_services.get_ref().to_string(),
    );
    cmp(
        "dataplane.max_backends",
        a.max_backends.get_ref().to_string(),
        b.max_backends.get_ref().to_string(),
    );
    cmp(
        "dataplane.conntrack_capacity",
        a.conntrack_capacity.get_ref().to_string(),
        b.conntrack_capacity.get_ref().to_string(),
    );
    cmp(
        "dataplane.conntrack_new_capacity",
        a.conntrack_new_capacity.get_ref().to_string(),
        b.conntrack_new_capacity.get_ref().to_string(),
    );
    cmp(
        "dataplane.pin_dir",
        a.pin_dir.get_ref().display().to_string(),
        b.pin_dir.get_ref().display().to_string(),
    );
    cmp(
        "registry.path",
        running.registry.path.display().to_string(),
        next.registry.path.display().to_string(),
    );
    cmp(
        "api.socket",
        running.api.socket.display().to_string(),
        next.api.socket.display().to_string(),
    );
    cmp(
        "metrics",
        format!("{:?}", running.metrics),
        format!("{:?}", next.metrics),
    );
    cmp(
        "log.kernel",
        format!("{:?}", running.log.kernel),
        format!("{:?}", next.log.kernel),
    );
    out
}

/// Watches the config file's directory (editors replace files by renaming, which a watch on
/// the file itself would miss) and signals `changed` when the file is touched.
fn watch(path: &Path, changed: mpsc::Sender<()>) -> notify::Result<notify::RecommendedWatcher> {
    use notify::Watcher;
    let path = std::path::absolute(path)?;
    let name = path.file_name().map(|n| n.to_owned());
    let dir = path.parent().unwrap_or(Path::new("/")).to_owned();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if event.kind.is_access() {
            return;
        }
        if event.paths.iter().any(|p| p.file_name() == name.as_deref()) {
            // A full channel already holds a pending reload: nothing is lost.
            let _ = changed.try_send(());
        }
    })?;
    watcher.watch(&dir, notify::RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

fn settings(config: &Config) -> Settings {
    let d = &config.dataplane;
    let mut s = dataplane::default_settings();
    s.udp_idle_ns = d.udp_idle_timeout_secs.get_ref() * 1_000_000_000;
    if !d.redirect {
        s.flags &= !orch_common::maps::SETTING_REDIRECT;
    }
    s
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it so large maps load there
/// too. Newer kernels account maps to the cgroup and ignore it.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        // Harmless on kernels that account maps to the memory cgroup (5.11 and later).
        tracing::debug!(error = %std::io::Error::last_os_error(), "could not raise RLIMIT_MEMLOCK");
    }
}

fn log_totals(dp: &Dataplane) {
    match dp.reason_counts() {
        Ok(counts) => {
            let nonzero: Vec<String> = counts
                .iter()
                .filter(|(_, n)| *n > 0)
                .map(|(r, n)| format!("{}={n}", r.name()))
                .collect();
            info!(packets = %nonzero.join(" "), "data plane totals");
        }
        Err(e) => warn!(error = %e, "reading counters failed"),
    }
}
