//! The daemon: one event loop that owns the data plane, the registry and the config.
//!
//! Start: load the config, open the registry, open the data plane on its pins (adopting a
//! running one), reconcile the desired services (file + registry) into the maps, attach.
//! Then one loop takes, one at a time: admin API changes, probe reports, ticks, link
//! changes, config file changes (watched, and SIGHUP), and SIGINT/SIGTERM. Because one task
//! does all of it, the reconciler stays the only writer of the maps without any lock.
//! Reads (status, lists, explain, scrapes) never reach the loop: they are answered from the
//! view it publishes ([`view`]), off the loop.
//!
//! Exit leaves the data plane running (pinned maps and links): established and new
//! connections keep flowing while the daemon is stopped or upgraded. `--detach-on-exit`
//! removes everything instead.
//!
//! - [`state`]: what the daemon owns, its start, the steps every handler shares;
//! - [`handlers`]: changes through the admin API;
//! - [`reload`]: config reloads, all or nothing;
//! - [`health`]: probe reports, the data plane's signals, the tick;
//! - [`view`]: the published view and the reads served from it;
//! - [`census`]: live connections, counted off the loop;
//! - [`cluster`]: the cluster's changes mirrored and applied, writes answered once applied;
//!   [`member`] holds what the daemon keeps of its cluster;
//! - [`readiness`]: what the service manager is told (systemd `Type=notify`).

mod census;
mod cluster;
mod handlers;
mod health;
mod member;
pub mod readiness;
mod reload;
mod state;
mod view;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{
    signal::unix::{signal, SignalKind},
    sync::mpsc,
    time::Instant,
};
use tracing::{info, warn};

pub use reload::ReloadError;
pub use state::Daemon;
use view::Reads;

use crate::{
    api::{server, server::Call},
    config::ConfigError,
    dataplane::{links, routes, DataplaneError},
    metrics,
    reconcile::ReconcileError,
    registry::RegistryError,
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
    Api(#[from] server::ApiServerError),
    #[error(transparent)]
    Metrics(#[from] metrics::ListenError),
    #[error(transparent)]
    Dns(#[from] crate::dns::ListenError),
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
    let reads = Arc::new(Reads {
        views: d.views.subscribe(),
        reader: d.dp.reader().clone(),
        censuses: d.censuses.clone(),
        metrics: d.metrics.clone(),
    });
    let socket = d.config.fixed.api_socket.clone();
    let listener = server::bind(&socket)?;
    let (calls_tx, calls) = mpsc::channel(64);
    let (changes_tx, mut changes) = mpsc::channel(64);
    let mut tasks = vec![
        tokio::spawn(server::serve(listener, calls_tx)),
        tokio::spawn(route(calls, changes_tx, reads.clone())),
    ];
    if d.config.fixed.metrics.enabled {
        let listener = metrics::bind(d.config.fixed.metrics.listen).await?;
        let (scrapes_tx, scrapes) = mpsc::channel::<metrics::Scrape>(16);
        tasks.push(tokio::spawn(metrics::serve(listener, scrapes_tx)));
        tasks.push(tokio::spawn(answer_scrapes(scrapes, reads)));
    }
    if let Some(settings) = d.config.fixed.dns.clone() {
        let mut server =
            crate::dns::serve(&settings, d.zones.subscribe(), d.metrics.clone()).await?;
        tasks.push(tokio::spawn(async move {
            if let Err(e) = server.block_until_done().await {
                warn!(error = %e, "the DNS server stopped");
            }
        }));
    }
    let (changed_tx, mut changed) = mpsc::channel(1);
    let _watcher = watch(d.config_path(), changed_tx)
        .inspect_err(|e| warn!(error = %e, "cannot watch the config file; reload with SIGHUP"))
        .ok();
    let mut ticks = tokio::time::interval(Duration::from_millis(100));
    let mut link_changes = links::watch();
    routes::watch(d.dp.route_generation());
    let mut cluster_inbox = d.join_cluster()?;
    info!("orch is ready");
    readiness::ready();

    loop {
        tokio::select! {
            Some((request, reply)) = changes.recv() => d.handle(request, reply),
            Some(report) = reports.recv() => d.on_report(report),
            Some(message) = cluster::next(&mut cluster_inbox) => match message {
                cluster::Either::Event(e) => {
                    // Everything already waiting goes in the same batch.
                    let mut batch = vec![e];
                    if let Some(inbox) = cluster_inbox.as_mut() {
                        while let Ok(e) = inbox.events.try_recv() {
                            batch.push(e);
                        }
                    }
                    d.on_cluster(batch);
                }
                cluster::Either::Committed(c) => d.on_committed(c),
            },
            _ = sleep_until_due(d.cluster_due()) => d.reconcile_cluster(),
            _ = ticks.tick() => {
                let now = Instant::now();
                d.answer_applied(now);
                d.tick(now);
            }
            Some(()) = link_changes.recv() => d.sync_interfaces(),
            Some(()) = changed.recv() => {
                // Editors save in several steps (truncate, write, rename): let them finish.
                tokio::time::sleep(Duration::from_millis(100)).await;
                while changed.try_recv().is_ok() {}
                reload(&mut d, "the file changed");
            }
            _ = sighup.recv() => reload(&mut d, "SIGHUP"),
            _ = sigint.recv() => { info!("SIGINT received, shutting down"); break; }
            _ = sigterm.recv() => { info!("SIGTERM received, shutting down"); break; }
        }
    }
    readiness::stopping();
    for t in tasks {
        t.abort();
    }
    if let Err(e) = std::fs::remove_file(&socket) {
        warn!(socket = %socket.display(), error = %e, "removing the admin socket failed");
    }
    log_totals(&d);
    if opts.detach_on_exit {
        d.dp.detach_all();
        d.dp.remove_pins();
    } else {
        info!(
            pin_dir = %d.pin_dir().display(),
            "the data plane keeps running; the next daemon takes it over"
        );
    }
    Ok(())
}

/// Sleeps until `due`, or for ever.
async fn sleep_until_due(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

/// A reload, told to the service manager while it runs.
fn reload(d: &mut Daemon, why: &str) {
    readiness::reloading();
    d.reload(why);
    readiness::ready();
}

/// Hands reads to [`Reads`] (each on a task of its own) and changes to the loop.
async fn route(mut calls: mpsc::Receiver<Call>, changes: mpsc::Sender<Call>, reads: Arc<Reads>) {
    while let Some((request, reply)) = calls.recv().await {
        if Reads::serves(&request) {
            let reads = reads.clone();
            tokio::spawn(async move {
                let _ = reply.send(reads.answer(request).await);
            });
        } else if changes.send((request, reply)).await.is_err() {
            return;
        }
    }
}

/// Answers each scrape on a task of its own.
async fn answer_scrapes(mut scrapes: mpsc::Receiver<metrics::Scrape>, reads: Arc<Reads>) {
    while let Some(scrape) = scrapes.recv().await {
        let reads = reads.clone();
        tokio::spawn(async move {
            let _ = scrape.send(reads.scrape().await);
        });
    }
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

fn log_totals(d: &Daemon) {
    match d.dp.reader().reason_counts() {
        Ok(counts) => {
            let nonzero: Vec<String> = counts
                .iter()
                .filter(|(_, n)| *n > 0)
                .map(|(r, n)| format!("{}={n}", r.name()))
                .collect();
            info!(packets = %nonzero.join(" "), "data plane totals");
        }
        Err(e) => {
            warn!(error = %crate::chain(&e), "reading counters failed")
        }
    }
}
