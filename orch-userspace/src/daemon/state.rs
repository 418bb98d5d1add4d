//! What the daemon owns, how it starts, and the steps every handler shares: bringing the
//! maps in line with the desired services, the attachments in line with the interfaces,
//! and publishing the view that readers serve.

use std::{
    collections::{BTreeSet, HashSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{sync::mpsc, time::Instant};
use tracing::{error, info, warn};

use super::{
    census::Censuses,
    view::{Parts, View},
    DaemonError,
};
use crate::{
    api::Source,
    config::Config,
    dataplane::{vips::VipRoutes, Dataplane, DataplaneError},
    dns::{self, Zone},
    health::{Checker, Report, Verdicts},
    metrics::Metrics,
    model::{CheckKind, Service},
    reconcile::{ReconcileError, Reconciler, Summary},
    registry::Registry,
};

/// Most probes in flight at once.
const MAX_PROBES_IN_FLIGHT: usize = 64;
/// How often the connection tables' expiry takes a step.
pub(super) const EXPIRY_INTERVAL: Duration = Duration::from_secs(1);
/// How many entries of each table an expiry step walks at most (a syscall or two each). A
/// table of up to this size is swept whole every second; the default capacity (262,144) in
/// 16 s, so closed connections leave within their close timeout plus that, at a few percent
/// of one core.
pub(super) const EXPIRY_BUDGET: usize = 16_384;
/// How often the attachments are compared with the kernel's interfaces when no link
/// notification came (they normally say it at once: see [`crate::dataplane::links`]).
pub(super) const LINK_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// One backend whose kernel signals the ticks read.
pub(super) struct SignalTarget {
    pub(super) service: String,
    pub(super) check: CheckKind,
    /// The check's probe timeout, the longest a quick probe may take.
    pub(super) timeout_ms: u64,
    pub(super) backend: SocketAddr,
    pub(super) id: u32,
}

/// Everything the daemon owns.
pub struct Daemon {
    pub(super) config: Config,
    pub(super) dp: Dataplane,
    pub(super) reconciler: Reconciler,
    pub(super) registry: Registry,
    pub(super) checker: Checker,
    pub(super) verdicts: Verdicts,
    /// Every backend whose kernel signals the ticks read, rebuilt after each map sync
    /// (`None`: stale), and where the next tick starts reading.
    pub(super) signal_targets: Option<Vec<SignalTarget>>,
    pub(super) signal_cursor: usize,
    pub(super) probes: u64,
    pub(super) started: std::time::Instant,
    pub(super) reloads: u64,
    pub(super) reload_failures: u64,
    pub(super) last_reload_error: Option<String>,
    pub(super) metrics: Arc<Metrics>,
    /// Services in panic at the last rotation change, to log when one enters or leaves it.
    pub(super) panicking: BTreeSet<String>,
    /// When the next expiry step of the connection tables is due.
    pub(super) next_expiry: Instant,
    /// When to compare the attachments with the kernel's interfaces without being told.
    pub(super) next_link_check: Instant,
    /// Configured interfaces that are not there now (said once, attached when they return).
    pub(super) missing: BTreeSet<String>,
    /// The VIPs' unreachable routes (see [`crate::dataplane::vips`]).
    pub(super) vip_routes: VipRoutes,
    /// Live connections, counted off the loop.
    pub(super) censuses: Arc<Censuses>,
    /// Where the view is published, and whether the daemon's state changed since.
    pub(super) views: tokio::sync::watch::Sender<Arc<View>>,
    pub(super) view_stale: bool,
    /// Where the DNS zone is published (with the view), and its serial.
    pub(super) zones: tokio::sync::watch::Sender<Arc<Zone>>,
    pub(super) zone_serial: u32,
    /// This host's part in a cluster, when `[cluster]` is configured.
    pub(super) cluster: Option<super::member::Member>,
}

impl Daemon {
    /// Loads the config, the registry and the data plane, installs the services and
    /// attaches. On error nothing new stays attached.
    pub fn start(config_path: &Path, reports: mpsc::Sender<Report>) -> Result<Daemon, DaemonError> {
        let config = Config::load(config_path)?;
        let registry = Registry::open(&config.fixed.registry)?;
        let registered: Vec<Service> = registry.services().cloned().collect();
        if config.fixed.cluster.is_none() {
            // In a cluster, another host may have registered a name this file uses: the
            // file's service is kept on this host, and the clash is logged (see
            // `Daemon::file_owner`).
            config.check_against(&registered)?;
        }
        raise_memlock_limit();

        let capacity = config.fixed.capacity;
        let mut dp = Dataplane::open(
            capacity,
            &config.fixed.pin_dir,
            config.fixed.kernel_log as u8,
        )?;
        dp.set_settings(&config.settings())?;
        let mut reconciler = if dp.adopted() {
            Reconciler::adopt(capacity.max_services, capacity.max_backends, &dp)?
        } else {
            Reconciler::new(capacity.max_services, capacity.max_backends)
        };
        let verdicts = Verdicts::default();
        let metrics = Arc::new(Metrics::new());
        let began = std::time::Instant::now();
        let applied = reconciler.apply(&mut dp, &desired(&config, &registered, &verdicts));
        metrics.map_sync(began.elapsed(), applied.is_ok());
        let summary = applied?;
        let mut checker = Checker::new(MAX_PROBES_IN_FLIGHT, reports);
        checker.sync(&all(&config, &registered));
        let censuses = Censuses::new(dp.reader().clone(), config.timeouts.udp_idle_ns);
        let (views, _) = tokio::sync::watch::channel(Arc::new(View::default()));
        let domain = config.fixed.dns.as_ref().map_or_else(
            || dns::check_domain(crate::config::defaults::DNS_DOMAIN).expect("valid default"),
            |d| d.domain.clone(),
        );
        let (zones, _) = tokio::sync::watch::channel(Arc::new(Zone::empty(&domain)));
        let mut daemon = Daemon {
            config,
            dp,
            reconciler,
            registry,
            checker,
            verdicts,
            signal_targets: None,
            signal_cursor: 0,
            probes: 0,
            started: std::time::Instant::now(),
            reloads: 0,
            reload_failures: 0,
            last_reload_error: None,
            metrics,
            panicking: BTreeSet::new(),
            next_expiry: Instant::now(),
            next_link_check: Instant::now() + LINK_CHECK_INTERVAL,
            missing: BTreeSet::new(),
            vip_routes: VipRoutes::start(),
            censuses,
            views,
            view_stale: true,
            zones,
            zone_serial: 0,
            cluster: None,
        };
        let desired = daemon.desired();
        daemon
            .vip_routes
            .set(desired.iter().map(|s| s.addr.vip).collect());
        let wanted = daemon.config.interfaces.clone();
        daemon.attach(&wanted)?;
        match daemon.config.fixed.socket_lb.clone() {
            Some(cgroup) => daemon.dp.attach_cgroup(&cgroup)?,
            None => daemon.dp.detach_cgroup(),
        }
        // The new program is in every link now: what the old one did since the first pass
        // is carried over too, and the old layout's maps are retired.
        if let Err(e) = daemon.dp.migrate(true) {
            error!(error = %crate::chain(&e), "migrating the previous map layout failed");
        }
        daemon.forget_removed();
        daemon.publish();
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

    /// The config file's path.
    pub(super) fn config_path(&self) -> &Path {
        self.config.path()
    }

    /// Attaches to every interface of `wanted` not attached yet (with the configured
    /// hook), and detaches from the others.
    pub(super) fn attach(&mut self, wanted: &[String]) -> Result<(), DataplaneError> {
        for iface in wanted {
            if !self.dp.attached().any(|(a, _)| a == iface) {
                let hook = Dataplane::choose_hook(iface, self.config.attach)?;
                self.dp.attach(iface, hook)?;
            }
        }
        self.dp.detach_others(wanted);
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
        let wanted = self.config.interfaces.clone();
        self.missing.retain(|m| wanted.contains(m));
        for iface in wanted {
            if self.dp.attached().any(|(a, _)| a == iface) {
                self.missing.remove(&iface);
                continue;
            }
            let result = Dataplane::choose_hook(&iface, self.config.attach).and_then(|hook| {
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
                    self.view_stale = true;
                }
                Err(e) => {
                    if self.missing.insert(iface.clone()) {
                        warn!(iface, error = %crate::chain(&e), "configured interface not attached; trying again when links change");
                        self.view_stale = true;
                    }
                }
            }
        }
        self.publish();
    }

    /// Every service, from the file and the registry.
    pub(super) fn services(&self) -> Vec<Service> {
        all(&self.config, &self.registered())
    }

    /// The registry's services (but those a config-file service shadows).
    pub(super) fn registered(&self) -> Vec<Service> {
        self.registry
            .services()
            .filter(|s| self.file_owner(s).is_none())
            .cloned()
            .collect()
    }

    /// The config-file service whose name or address a registered service takes. On one
    /// host the registry refuses such a service; in a cluster another host may have
    /// registered it before this host's file claimed the name, and the file wins here.
    pub(super) fn file_owner(&self, registered: &Service) -> Option<&str> {
        self.config
            .services
            .iter()
            .find(|f| f.name == registered.name || f.addr == registered.addr)
            .map(|f| f.name.as_str())
    }

    /// Every service with where it comes from, file first.
    pub(super) fn sourced(&self) -> impl Iterator<Item = (&Service, Source)> + '_ {
        self.config
            .services
            .iter()
            .map(|s| (s, Source::File))
            .chain(
                self.registry
                    .services()
                    .filter(|s| self.file_owner(s).is_none())
                    .map(|s| (s, Source::Registry)),
            )
    }

    /// The data plane's view of every service: admin states, health and panic applied.
    pub(super) fn desired(&self) -> Vec<Service> {
        desired(&self.config, &self.registered(), &self.verdicts)
    }

    /// Brings the maps in line with `desired`, timing it for the metrics.
    pub(super) fn apply(&mut self, desired: &[Service]) -> Result<Summary, ReconcileError> {
        let began = std::time::Instant::now();
        let applied = self.reconciler.apply(&mut self.dp, desired);
        self.signal_targets = None;
        self.view_stale = true;
        self.vip_routes
            .set(desired.iter().map(|s| s.addr.vip).collect());
        self.metrics.map_sync(began.elapsed(), applied.is_ok());
        applied
    }

    /// Rewrites the slot tables for the current health (a diff: only services whose
    /// rotation changed are written).
    pub(super) fn rebalance(&mut self) {
        // A backend back in rotation must also be choosable by the kernel at once: lift the
        // data plane's ejection before the table that includes it is written.
        for svc in self.services() {
            for b in &svc.backends {
                let Some(h) = self.verdicts.get_mut(&svc.name, b.addr) else {
                    continue;
                };
                if !h.ejection_pending() {
                    continue;
                }
                if let Some(id) = self.reconciler.backend_id(&svc.addr, b.addr) {
                    match self.dp.clear_ejection(id) {
                        Ok(()) => h.ejection_cleared(),
                        Err(e) => warn!(error = %crate::chain(&e), "clearing an ejection failed"),
                    }
                }
            }
        }
        let desired = self.desired();
        match self.apply(&desired) {
            Ok(s) => {
                info!(updated = s.updated, "rotation changed");
                self.note_panic();
            }
            Err(e) => {
                error!(error = %crate::chain(&e), "rebalancing failed")
            }
        }
    }

    /// Logs services entering or leaving panic since the last call (after every change of
    /// health or of the services).
    pub(super) fn note_panic(&mut self) {
        let threshold = self.config.panic_threshold;
        let now: BTreeSet<String> = self
            .sourced()
            .filter(|(s, _)| self.verdicts.in_panic(s, threshold))
            .map(|(s, _)| s.name.clone())
            .collect();
        for name in now.difference(&self.panicking) {
            warn!(service = %name, threshold_percent = threshold, "too few healthy backends to trust the checks: panic, balancing over every enabled backend");
        }
        for name in self.panicking.difference(&now) {
            info!(service = %name, "panic over: balancing over healthy backends again");
        }
        self.panicking = now;
        self.view_stale = true;
    }

    /// Drops health state of backends that no longer exist, and their metrics.
    pub(super) fn forget_removed(&mut self) {
        let backends: HashSet<(String, SocketAddr)> = self
            .services()
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| (s.name.clone(), b.addr)))
            .collect();
        self.verdicts
            .retain(|s, b| backends.contains(&(s.to_owned(), b)));
        self.metrics.sync_backends(&backends);
        self.view_stale = true;
    }

    /// One step of the connection tables' expiry (see [`Dataplane::expire`]).
    pub(super) fn expire(&mut self) {
        match self.dp.expire(&self.config.timeouts, EXPIRY_BUDGET) {
            Ok(done) => self.metrics.conntrack_expired(&done),
            Err(e) => warn!(error = %crate::chain(&e), "expiring connections failed"),
        }
    }

    /// Publishes the view for readers (list requests, scrapes) if anything changed since
    /// the last time. Changes of services and interfaces publish at once; health, which
    /// probes move all the time, at the next tick.
    pub(super) fn publish(&mut self) {
        if !std::mem::take(&mut self.view_stale) {
            return;
        }
        let view = View::of(Parts {
            sourced: self.sourced().collect(),
            verdicts: &self.verdicts,
            reconciler: &self.reconciler,
            dp: &self.dp,
            config: &self.config,
            registry: self.registry.path(),
            missing: &self.missing,
            panicking: &self.panicking,
            counts: [self.reloads, self.reload_failures, self.probes],
            last_reload_error: self.last_reload_error.as_deref(),
            started: self.started,
            cluster: self.cluster.as_ref(),
        });
        self.views.send_replace(Arc::new(view));
        if let Some(dns) = &self.config.fixed.dns {
            self.zone_serial = self.zone_serial.wrapping_add(1);
            let (verdicts, threshold) = (&self.verdicts, self.config.panic_threshold);
            let zone = Zone::new(
                &dns.domain,
                dns.ttl,
                self.zone_serial,
                self.sourced().map(|(s, _)| {
                    let panic = verdicts.in_panic(s, threshold);
                    let in_rotation = s
                        .backends
                        .iter()
                        .filter(|b| verdicts.in_rotation(&s.name, b, panic))
                        .map(|b| b.addr.ip())
                        .collect();
                    (s, in_rotation)
                }),
            );
            self.zones.send_replace(Arc::new(zone));
        }
    }

    /// The path of the admin socket and pins, for `run`'s exit.
    pub(super) fn pin_dir(&self) -> &PathBuf {
        &self.config.fixed.pin_dir
    }
}

/// The file's and the registry's services together.
pub(super) fn all(config: &Config, registered: &[Service]) -> Vec<Service> {
    let mut v = config.services.clone();
    v.extend_from_slice(registered);
    v
}

/// The data plane's view of [`all`] services: admin states, health and panic applied.
pub(super) fn desired(
    config: &Config,
    registered: &[Service],
    verdicts: &Verdicts,
) -> Vec<Service> {
    all(config, registered)
        .iter()
        .map(|s| verdicts.for_dataplane(s, config.panic_threshold))
        .collect()
}

/// Hands the heap that loading left free back to the system. Parsing a large config and
/// building the maps' contents peaks at several times what the daemon keeps (10,000
/// services: about 60 MB more), and glibc keeps freed memory in its arenas, where it would
/// count as the daemon's RSS for good.
pub(super) fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
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
