//! What the daemon keeps of its cluster: its state as this host sees it, and the changes
//! waiting for their answer. Plain data; [`super::cluster`] does the work.

use std::collections::BTreeMap;

use tokio::{
    sync::{mpsc, oneshot},
    time::{Duration, Instant},
};

use crate::{
    api::{ApiError, Reply},
    cluster::{self, Cluster, FileClaim, NodeRecord, WriteError},
};

/// The requester of a change, and what to tell it.
pub(super) struct Requester {
    pub(super) reply: oneshot::Sender<Result<Reply, ApiError>>,
    pub(super) done: String,
    pub(super) op: &'static str,
}

/// A write's outcome, from its task back to the loop.
pub struct Committed {
    pub(super) result: Result<i64, WriteError>,
    pub(super) requester: Requester,
}

/// Whether etcd answers.
#[derive(Clone, Debug)]
pub(super) enum Reach {
    Connecting {
        since: std::time::Instant,
    },
    Reachable {
        since: std::time::Instant,
    },
    Unreachable {
        since: std::time::Instant,
        error: String,
    },
}

/// This host as a member of a cluster.
pub(super) struct Member {
    pub(super) handle: Cluster,
    /// The cluster revision the registry mirrors.
    pub(super) revision: i64,
    /// The revision the data plane and the published view hold (behind `revision` while a
    /// reconcile is deferred).
    pub(super) applied: i64,
    /// The registry changed since the last reconcile.
    pub(super) dirty: bool,
    /// When the last reconcile ended, and how long it took.
    pub(super) last_reconcile: (Instant, Duration),
    pub(super) reach: Reach,
    pub(super) nodes: BTreeMap<String, NodeRecord>,
    /// Every host's config-file services, by node.
    pub(super) files: BTreeMap<String, Vec<FileClaim>>,
    pub(super) commits: mpsc::Sender<Committed>,
    /// Acknowledged changes waiting for this host to apply their revision.
    pub(super) awaiting: Vec<(i64, Instant, Requester)>,
}

impl Reach {
    pub(super) fn since(&self) -> std::time::Instant {
        match self {
            Reach::Connecting { since }
            | Reach::Reachable { since }
            | Reach::Unreachable { since, .. } => *since,
        }
    }
}

impl Member {
    pub(super) fn settings(&self) -> &cluster::Settings {
        self.handle.settings()
    }
}
