//! The daemon: load the data plane, install the configured services, attach, and wait for a
//! signal to detach and exit.
//!
//! Later issues add the registry, health checks and hot reload around the same core: the
//! reconciler stays the only writer of the service maps.

use std::path::{Path, PathBuf};

use orch_common::maps::Settings;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

use crate::{
    config::{Config, ConfigError, XdpModeConfig},
    dataplane::{self, AttachMode, Capacity, Dataplane, DataplaneError},
    reconcile::{ReconcileError, Reconciler},
};

/// Why the daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error("installing the configured services failed")]
    Reconcile(#[from] ReconcileError),
    #[error("installing a signal handler failed")]
    Signal(#[source] std::io::Error),
}

/// Options of `orch daemon`.
#[derive(Clone, Debug)]
pub struct Options {
    pub config: PathBuf,
}

/// Runs the daemon until SIGINT or SIGTERM.
pub async fn run(opts: &Options) -> Result<(), DaemonError> {
    let mut sigint = signal(SignalKind::interrupt()).map_err(DaemonError::Signal)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(DaemonError::Signal)?;

    let mut dp = start(&opts.config)?;
    tokio::select! {
        _ = sigint.recv() => info!("SIGINT received, shutting down"),
        _ = sigterm.recv() => info!("SIGTERM received, shutting down"),
    }
    dp.detach_all();
    log_totals(&dp);
    Ok(())
}

/// Loads the config and the data plane, installs the services and attaches. On error,
/// whatever was attached is detached again (the data plane's `Drop`).
pub fn start(config_path: &Path) -> Result<Dataplane, DaemonError> {
    let config = Config::load(config_path)?;
    raise_memlock_limit();
    let d = &config.dataplane;
    let capacity = Capacity {
        max_services: *d.max_services.get_ref(),
        max_backends: *d.max_backends.get_ref(),
        conntrack: *d.conntrack_capacity.get_ref(),
    };
    let mut dp = Dataplane::load(capacity)?;
    dp.set_settings(&settings(&config))?;

    let mut reconciler = Reconciler::new(capacity.max_services, capacity.max_backends);
    let summary = reconciler.apply(&mut dp, &config.services())?;

    let mode = match d.xdp_mode {
        XdpModeConfig::Auto => AttachMode::Auto,
        XdpModeConfig::Native => AttachMode::Native,
        XdpModeConfig::Generic => AttachMode::Generic,
    };
    for iface in d.interfaces.get_ref() {
        dp.attach(iface.get_ref(), mode)?;
    }
    info!(
        services = summary.added,
        interfaces = ?dp.attached().collect::<Vec<_>>(),
        "orch is ready"
    );
    Ok(dp)
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
