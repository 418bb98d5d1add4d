//! Several hosts, one registry: the registry's services kept in etcd and watched by every
//! host (`[cluster]` in the config; without it orch is one host with its SQLite registry).
//!
//! One task per daemon owns the etcd client ([`start`]). It lists the prefix, then watches
//! it from the list's revision, and hands the daemon's loop what changed ([`Event`]); the loop
//! mirrors it into the SQLite registry (so a restart serves the last known state while etcd
//! is away) and reconciles its own data plane. When the connection breaks, the task resumes
//! the watch from the last revision it delivered, so no change is missed; when etcd has
//! compacted that revision away, it lists again.
//!
//! Writes ([`Cluster::write`]) are read-modify-write transactions: the service's key is
//! read, the change is applied and validated by the registry's own rules, and the result is
//! written only if the key's `mod_revision` is still the one read (a new service: only if
//! neither its name nor its address exists). When another host changed the service in
//! between, the change is applied again to the new value, which refuses it if it no longer
//! fits (the same backend added twice, a removed service): concurrent writes are serialised
//! by etcd and none is lost silently. A write is acknowledged once etcd committed it.
//!
//! While etcd is unreachable the host keeps serving what it knows (the data plane is never
//! emptied because the store is away), refuses writes at once with a clear error, and says
//! so in `orch status` and `orch_cluster_reachable`.
//!
//! Each host announces itself under a lease (`orch node list`) and publishes its config-file
//! services, so that no host registers a name or address another host's file uses. Health
//! checks stay local: each host judges backends from where its own traffic goes.

mod record;
mod session;

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::sync::{mpsc, oneshot, watch};

pub use record::{FileClaim, Keys, NodeRecord, ServiceRecord};

use crate::{
    model::Service,
    registry::{Change, RegistryError},
};

/// `[cluster]`, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// etcd client URLs (`http://host:2379`, or `https://` with [`Tls`]).
    pub endpoints: Vec<String>,
    /// Every key orch writes starts with it.
    pub prefix: String,
    /// This host's name in the cluster.
    pub node: String,
    /// The address this host advertises in `orch node list`.
    pub address: Option<IpAddr>,
    /// How long one request to etcd may take before etcd counts as unreachable.
    pub timeout: Duration,
    pub tls: Option<Tls>,
}

/// TLS towards etcd: the CA that signs its certificates, and this host's client identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// What changed in the cluster, in order.
#[derive(Debug)]
pub enum Event {
    /// Everything as of `revision` (after a list): replaces what the host knew.
    Reset {
        revision: i64,
        services: Vec<Service>,
        nodes: BTreeMap<String, NodeRecord>,
        files: BTreeMap<String, Vec<FileClaim>>,
    },
    /// Changes up to and including `revision`.
    Changes { revision: i64, deltas: Vec<Delta> },
    /// etcd answers (again), or stopped answering (`error` says why).
    Reachable { error: Option<String> },
}

/// One change of an [`Event::Changes`].
#[derive(Debug)]
pub enum Delta {
    Service(String, Option<Service>),
    Node(String, Option<NodeRecord>),
    Files(String, Option<Vec<FileClaim>>),
}

/// Why a write was not acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The change itself is refused (invalid, unknown service, a conflict): nothing changed.
    #[error(transparent)]
    Refused(#[from] RegistryError),
    #[error(
        "the cluster store (etcd) is unreachable: {0}; nothing was changed. This host keeps \
         serving its last known state; retry once etcd answers"
    )]
    Unreachable(String),
    #[error(
        "etcd did not confirm the change within {0:?}: it may or may not have been applied; \
         `orch service list` shows which once etcd answers"
    )]
    Unconfirmed(Duration),
    #[error("service {0:?} kept changing under concurrent writes; nothing was changed, retry")]
    Contended(String),
}

/// A write for the task: the change and who waits for its revision.
struct Write {
    change: Change,
    reply: oneshot::Sender<Result<i64, WriteError>>,
}

/// The daemon's handle on the cluster task.
pub struct Cluster {
    writes: mpsc::Sender<Write>,
    claims: watch::Sender<Vec<FileClaim>>,
    settings: Settings,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("endpoints", &self.settings.endpoints)
            .field("node", &self.settings.node)
            .finish()
    }
}

/// Starts the cluster task on the current runtime. `claims` are this host's config-file
/// services; `import` the services of a registry that was never a cluster's mirror (a host
/// joining a cluster): they are created in etcd, unless taken, before the first list.
pub fn start(
    settings: Settings,
    claims: Vec<FileClaim>,
    import: Vec<Service>,
) -> (Cluster, mpsc::Receiver<Event>) {
    let (events_tx, events) = mpsc::channel(64);
    let (writes, writes_rx) = mpsc::channel(64);
    let (claims, claims_rx) = watch::channel(claims);
    tokio::spawn(session::run(
        settings.clone(),
        events_tx,
        writes_rx,
        claims_rx,
        import,
    ));
    (
        Cluster {
            writes,
            claims,
            settings,
        },
        events,
    )
}

impl Cluster {
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Commits `change` to etcd; resolves to the revision it was committed at.
    pub fn write(
        &self,
        change: Change,
    ) -> impl std::future::Future<Output = Result<i64, WriteError>> + Send + 'static {
        let writes = self.writes.clone();
        async move {
            let (reply, answer) = oneshot::channel();
            writes
                .send(Write { change, reply })
                .await
                .map_err(|_| WriteError::Unreachable("the cluster task stopped".into()))?;
            answer
                .await
                .unwrap_or_else(|_| Err(WriteError::Unreachable("the cluster task stopped".into())))
        }
    }

    /// Publishes this host's config-file services (after a reload).
    pub fn claim(&self, claims: Vec<FileClaim>) {
        self.claims.send_replace(claims);
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
