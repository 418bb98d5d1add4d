//! The daemon's side of a cluster: what the cluster task reports is mirrored into the
//! registry and reconciled like any registry change; API changes are committed to etcd and
//! answered once this host applied them (or a little later, saying so).

use std::collections::BTreeMap;

use tokio::{
    sync::mpsc,
    time::{Duration, Instant},
};
use tracing::{error, info, warn};

pub use super::member::Committed;
use super::{
    member::{Member, Reach, Requester},
    state::Daemon,
};
use crate::{
    api::{ApiError, ErrorKind, Reply},
    cluster::{self, Delta, Event, FileClaim, WriteError},
    metrics::OpResult,
    registry::{Change, Mirror, RegistryError},
};

/// How long an acknowledged change waits for this host's watch to bring it, before the
/// requester is answered anyway.
const APPLY_WAIT: Duration = Duration::from_secs(2);

/// What the loop waits on for a cluster.
pub struct Inbox {
    pub events: mpsc::Receiver<Event>,
    pub commits: mpsc::Receiver<Committed>,
}

impl Daemon {
    /// Starts the cluster task when `[cluster]` is configured. A registry that mirrors no
    /// cluster yet (a host joining one) has its services imported first, so nothing
    /// registered on this host is lost.
    pub(super) fn join_cluster(&mut self) -> Result<Option<Inbox>, RegistryError> {
        let Some(settings) = self.config.fixed.cluster.clone() else {
            return Ok(None);
        };
        let mirrored = self.registry.mirrors()?;
        let revision = mirrored.as_ref().map_or(0, |(_, r)| *r);
        let import = match mirrored {
            Some((prefix, revision)) => {
                if prefix != settings.prefix {
                    warn!(mirrored = %prefix, configured = %settings.prefix, "the registry mirrors another cluster prefix; the configured cluster's services replace it");
                }
                info!(
                    revision,
                    services = self.registry.services().count(),
                    "serving the cluster's last known state until etcd answers"
                );
                Vec::new()
            }
            None => self.registry.services().cloned().collect(),
        };
        if !import.is_empty() {
            info!(
                services = import.len(),
                "this host's registered services join the cluster once etcd answers"
            );
        }
        let claims = self.config.services.iter().map(FileClaim::of).collect();
        let (handle, events) = cluster::start(settings, claims, import);
        let (commits_tx, commits) = mpsc::channel(64);
        self.cluster = Some(Member {
            handle,
            revision,
            applied: revision,
            dirty: false,
            last_reconcile: (Instant::now(), Duration::ZERO),
            reach: Reach::Connecting {
                since: std::time::Instant::now(),
            },
            nodes: BTreeMap::new(),
            files: BTreeMap::new(),
            commits: commits_tx,
            awaiting: Vec::new(),
        });
        self.metrics.cluster_reachable(false);
        self.view_stale = true;
        Ok(Some(Inbox { events, commits }))
    }

    /// Refuses a change at once when etcd is known to be away, or when another host's
    /// config file owns the name or the address.
    pub(super) fn cluster_refusal(&self, change: &Change) -> Option<ApiError> {
        let member = self.cluster.as_ref()?;
        if let Reach::Unreachable { error, .. } = &member.reach {
            return Some(ApiError::new(
                ErrorKind::Unavailable,
                WriteError::Unreachable(error.clone()).to_string(),
            ));
        }
        let Change::AddService(svc) = change else {
            return None;
        };
        let own = &member.settings().node;
        for (node, claims) in member.files.iter().filter(|(n, _)| *n != own) {
            if let Some(c) = claims.iter().find(|c| c.name == svc.name) {
                return Some(ApiError::new(
                    ErrorKind::Conflict,
                    format!(
                        "service {:?} is defined in the config file of host {node:?}",
                        c.name
                    ),
                ));
            }
            if let Some(c) = claims.iter().find(|c| c.addr() == svc.addr) {
                return Some(ApiError::new(
                    ErrorKind::Conflict,
                    format!(
                        "{} is already the address of service {:?} (config file of host {node:?})",
                        svc.addr, c.name
                    ),
                ));
            }
        }
        None
    }

    /// Sends a checked change to etcd; the requester hears once it is committed and applied.
    pub(super) fn commit_to_cluster(&mut self, change: Change, requester: Requester) {
        let member = self.cluster.as_ref().expect("in a cluster");
        let write = member.handle.write(change);
        let commits = member.commits.clone();
        tokio::spawn(async move {
            let result = write.await;
            let _ = commits.send(Committed { result, requester }).await;
        });
    }

    /// A write's outcome.
    pub fn on_committed(&mut self, c: Committed) {
        let Committed { result, requester } = c;
        let revision = match result {
            Ok(r) => r,
            Err(e) => {
                let kind = match &e {
                    WriteError::Refused(r) => super::handlers::registry_error_kind(r),
                    WriteError::Unreachable(_) => ErrorKind::Unavailable,
                    WriteError::Unconfirmed(_) => ErrorKind::Unconfirmed,
                    WriteError::Contended(_) => ErrorKind::Conflict,
                };
                self.metrics.registry_op(
                    requester.op,
                    if kind == ErrorKind::Unconfirmed {
                        OpResult::Error
                    } else {
                        OpResult::Refused
                    },
                );
                let _ = requester
                    .reply
                    .send(Err(ApiError::new(kind, crate::chain(&e))));
                return;
            }
        };
        self.metrics.registry_op(requester.op, OpResult::Ok);
        info!(change = %requester.done, revision, "committed to the cluster");
        let member = self.cluster.as_mut().expect("in a cluster");
        if member.applied >= revision {
            let _ = requester.reply.send(Ok(Reply::Done(requester.done)));
        } else {
            member
                .awaiting
                .push((revision, Instant::now() + APPLY_WAIT, requester));
        }
    }

    /// What the cluster task reports: every event waiting, mirrored one by one, then one
    /// reconcile for them all. A reconcile diffs every service, so under a stream of writes
    /// (registering thousands of services) they are spaced by at least twice the time the
    /// last one took: the data plane follows in batches, at most half the loop's time goes
    /// to it, and a change after a quiet moment is applied at once.
    pub fn on_cluster(&mut self, events: Vec<Event>) {
        let mut changed = false;
        for event in events {
            changed |= self.take(event);
        }
        let member = self.cluster.as_mut().expect("in a cluster");
        member.dirty |= changed;
        if !member.dirty {
            // Nothing to reconcile: hosts, reachability, or a change another event undid.
            member.applied = member.revision;
            self.view_stale = true;
        }
        if self.cluster_due().is_some_and(|due| due <= Instant::now()) {
            self.reconcile_cluster();
        }
        self.answer_applied(Instant::now());
        self.publish();
    }

    /// When a deferred reconcile is due, if one is.
    pub fn cluster_due(&self) -> Option<Instant> {
        let member = self.cluster.as_ref()?;
        let (at, took) = member.last_reconcile;
        member
            .dirty
            .then(|| at + (took * 2).max(Duration::from_millis(5)))
    }

    /// Mirrors one event into the registry; whether a service changed.
    fn take(&mut self, event: Event) -> bool {
        match event {
            Event::Reset {
                revision,
                services,
                nodes,
                files,
            } => {
                let member = self.cluster.as_mut().expect("in a cluster");
                member.nodes = nodes;
                member.files = files;
                self.mirror(Mirror {
                    reset: true,
                    put: services,
                    removed: Vec::new(),
                    revision,
                })
            }
            Event::Changes { revision, deltas } => {
                let member = self.cluster.as_mut().expect("in a cluster");
                let mut update = Mirror {
                    revision,
                    ..Mirror::default()
                };
                for delta in deltas {
                    match delta {
                        Delta::Service(name, Some(s)) => {
                            update.removed.retain(|n| *n != name);
                            update.put.retain(|p| p.name != name);
                            update.put.push(s);
                        }
                        Delta::Service(name, None) => {
                            update.put.retain(|p| p.name != name);
                            update.removed.push(name);
                        }
                        Delta::Node(n, Some(r)) => {
                            member.nodes.insert(n, r);
                        }
                        Delta::Node(n, None) => {
                            member.nodes.remove(&n);
                        }
                        Delta::Files(n, Some(c)) => {
                            member.files.insert(n, c);
                        }
                        Delta::Files(n, None) => {
                            member.files.remove(&n);
                        }
                    }
                }
                if update.put.is_empty() && update.removed.is_empty() {
                    member.revision = revision;
                    false
                } else {
                    self.mirror(update)
                }
            }
            Event::Reachable { error } => {
                let member = self.cluster.as_mut().expect("in a cluster");
                let now = std::time::Instant::now();
                member.reach = match error {
                    None => Reach::Reachable { since: now },
                    Some(error) => Reach::Unreachable { since: now, error },
                };
                self.metrics
                    .cluster_reachable(matches!(member.reach, Reach::Reachable { .. }));
                false
            }
        }
    }

    /// Answers the requesters whose change this host has applied, and those that waited
    /// long enough (their change is committed; the watch brings it later).
    pub(super) fn answer_applied(&mut self, now: Instant) {
        let Some(member) = self.cluster.as_mut() else {
            return;
        };
        let applied = member.applied;
        for (revision, deadline, requester) in std::mem::take(&mut member.awaiting) {
            if revision <= applied {
                let _ = requester.reply.send(Ok(Reply::Done(requester.done)));
            } else if now >= deadline {
                let _ = requester.reply.send(Ok(Reply::Done(format!(
                    "{} (committed to the cluster at revision {revision}; this host applies it \
                     when its watch catches up)",
                    requester.done
                ))));
            } else {
                member.awaiting.push((revision, deadline, requester));
            }
        }
    }

    /// Mirrors a cluster update into the registry; whether a service changed.
    fn mirror(&mut self, update: Mirror) -> bool {
        let member = self.cluster.as_mut().expect("in a cluster");
        let prefix = member.settings().prefix.clone();
        let done = match self.registry.mirror(&prefix, &update) {
            Ok(done) => done,
            Err(e) => {
                // The registry (and so the data plane) stays as it was; the next list
                // tries again.
                error!(error = %crate::chain(&e), "writing the cluster's state to the local registry failed");
                return false;
            }
        };
        for (name, e) in done.rejected {
            error!(service = %name, error = %crate::chain(&e), "the cluster's record of this service breaks the registry's rules; left out");
        }
        self.cluster.as_mut().expect("in a cluster").revision = update.revision;
        self.metrics.cluster_revision(update.revision);
        done.changed
    }

    /// Brings the data plane and the published view in line with the mirrored registry,
    /// and answers the requesters this applies.
    pub fn reconcile_cluster(&mut self) {
        let began = Instant::now();
        for svc in self.registry.services() {
            if let Some(owner) = self.file_owner(svc) {
                error!(service = %svc.name, file_service = %owner, "a registered service clashes with this host's config file; the file's service is kept here");
            }
        }
        let revision = self.cluster.as_ref().map_or(0, |m| m.revision);
        let desired = self.desired();
        let applied = self.apply(&desired);
        self.checker.sync(&self.services());
        self.forget_removed();
        self.note_panic();
        match applied {
            Ok(s) => info!(
                revision,
                added = s.added,
                updated = s.updated,
                removed = s.removed,
                "cluster changes applied"
            ),
            Err(e) => {
                error!(error = %crate::chain(&e), "applying the cluster's services to the data plane failed")
            }
        }
        // Readers see the change before its requesters hear it is done.
        self.view_stale = true;
        self.publish();
        let member = self.cluster.as_mut().expect("in a cluster");
        member.applied = revision;
        member.dirty = false;
        let now = Instant::now();
        member.last_reconcile = (now, now - began);
        self.answer_applied(now);
    }

    /// This host's published config-file services, after a reload.
    pub(super) fn publish_claims(&self) {
        if let Some(member) = &self.cluster {
            member
                .handle
                .claim(self.config.services.iter().map(FileClaim::of).collect());
        }
    }
}

/// Waits for the next message of an optional inbox (never, without a cluster).
pub async fn next(inbox: &mut Option<Inbox>) -> Option<Either> {
    match inbox {
        Some(i) => tokio::select! {
            Some(e) = i.events.recv() => Some(Either::Event(e)),
            Some(c) = i.commits.recv() => Some(Either::Committed(c)),
            else => None,
        },
        None => std::future::pending().await,
    }
}

/// One message of an [`Inbox`].
pub enum Either {
    Event(Event),
    Committed(Committed),
}
