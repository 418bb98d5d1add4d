//! The service registry: services and backends registered through the CLI or the admin API,
//! kept in SQLite and served from an in-memory index.
//!
//! Every change is one SQLite transaction, committed with `synchronous = FULL` in WAL mode
//! before the caller is told it is done: a registration the CLI reported survives a
//! `kill -9` of the daemon, and a power cut, at any moment. Reads never touch the database;
//! the index is updated only after the commit succeeded, so it never shows what the disk
//! does not have.
//!
//! Changes are validated first ([`Registry::preview`], no side effect), so that the daemon
//! can check the result against the config file's services and the data plane's capacity
//! before anything is written.
//!
//! The schema is versioned with SQLite's `user_version`; [`MIGRATIONS`] lists every step,
//! and a database from a newer orch is refused rather than misread.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use tracing::info;

use crate::model::{
    self, AdminState, Backend, HealthCheck, Protocol, Scheduler, Service, ServiceAddr,
    MAX_BACKENDS_PER_SERVICE,
};

/// Schema steps; step `i` takes the database from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: services and their backends.
    "CREATE TABLE service (
        id       INTEGER PRIMARY KEY,
        name     TEXT NOT NULL UNIQUE,
        vip      TEXT NOT NULL,
        port     INTEGER NOT NULL CHECK (port BETWEEN 1 AND 65535),
        protocol TEXT NOT NULL CHECK (protocol IN ('tcp', 'udp')),
        UNIQUE (vip, port, protocol)
    );
    CREATE TABLE backend (
        id         INTEGER PRIMARY KEY,
        service_id INTEGER NOT NULL REFERENCES service (id) ON DELETE CASCADE,
        address    TEXT NOT NULL,
        weight     INTEGER NOT NULL CHECK (weight BETWEEN 0 AND 10000),
        state      TEXT NOT NULL CHECK (state IN ('active', 'draining', 'disabled')),
        UNIQUE (service_id, address)
    );",
    // 2: per-service options (the health-check spec), as JSON so that options can grow
    // without a migration each; an empty object means the protocol's defaults.
    "ALTER TABLE service ADD COLUMN options TEXT NOT NULL DEFAULT '{}';",
    // 3: facts about the registry itself; in a cluster, which cluster it mirrors and at
    // what revision.
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
];

/// In `meta`: the cluster this registry mirrors (its etcd key prefix), when it is a mirror.
const META_CLUSTER: &str = "cluster";
/// In `meta`: the cluster revision the mirror holds.
const META_REVISION: &str = "cluster_revision";

/// Per-service options as stored in `service.options`.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
struct Options {
    check: Option<HealthCheck>,
    /// Absent in rows written before schedulers existed: round-robin.
    scheduler: Option<Scheduler>,
}

/// Why a registry operation failed. Every variant except `Db` and `Open` is the caller's
/// input, and changes nothing.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{0}")]
    Invalid(String),
    #[error("no service named {0:?}")]
    UnknownService(String),
    #[error("service {service:?} has no backend {addr}")]
    UnknownBackend { service: String, addr: SocketAddr },
    #[error("{0}")]
    Conflict(String),
    #[error("opening the registry {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "the registry {path} has schema version {found}, newer than this orch knows ({known}); \
         run the orch that wrote it, or a newer one"
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        known: usize,
    },
    #[error("the registry database is corrupt: {0}")]
    Corrupt(String),
    #[error("registry database error")]
    Db(#[from] rusqlite::Error),
}

/// One change to the registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    AddService(Service),
    RemoveService {
        name: String,
    },
    AddBackend {
        service: String,
        backend: Backend,
    },
    RemoveBackend {
        service: String,
        addr: SocketAddr,
    },
    SetState {
        service: String,
        addr: SocketAddr,
        state: AdminState,
    },
}

impl Change {
    /// The name of the service it changes.
    pub fn service(&self) -> &str {
        match self {
            Change::AddService(s) => &s.name,
            Change::RemoveService { name } => name,
            Change::AddBackend { service, .. }
            | Change::RemoveBackend { service, .. }
            | Change::SetState { service, .. } => service,
        }
    }
}

/// What a cluster says changed, for [`Registry::mirror`].
#[derive(Clone, Debug, Default)]
pub struct Mirror {
    /// Replace everything (after a list) rather than change some services.
    pub reset: bool,
    /// New or changed services.
    pub put: Vec<Service>,
    /// Removed services, by name.
    pub removed: Vec<String>,
    /// The cluster revision this brings the mirror to.
    pub revision: i64,
}

/// The registry: a SQLite database and its in-memory index, by service name.
pub struct Registry {
    conn: Connection,
    path: PathBuf,
    index: BTreeMap<String, Service>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("path", &self.path)
            .field("services", &self.index.len())
            .finish()
    }
}

impl Registry {
    /// Opens (creating it and its directory when missing) and migrates the database at
    /// `path`, and loads the index.
    pub fn open(path: &Path) -> Result<Registry, RegistryError> {
        let open_err = |source: Box<dyn std::error::Error + Send + Sync>| RegistryError::Open {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| open_err(e.into()))?;
        }
        let mut conn = Connection::open(path).map_err(|e| open_err(e.into()))?;
        // WAL: readers never block the writer; FULL: a commit is on disk before it returns.
        conn.pragma_update(None, "journal_mode", "WAL")
            .and_then(|_| conn.pragma_update(None, "synchronous", "FULL"))
            .and_then(|_| conn.pragma_update(None, "foreign_keys", true))
            .and_then(|_| conn.busy_timeout(std::time::Duration::from_secs(5)))
            .map_err(|e| open_err(e.into()))?;
        migrate(&mut conn, path)?;
        let index = load(&conn)?;
        info!(path = %path.display(), services = index.len(), "registry opened");
        Ok(Registry {
            conn,
            path: path.to_owned(),
            index,
        })
    }

    /// Where the database is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every registered service, by name.
    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.index.values()
    }

    /// The service called `name`.
    pub fn get(&self, name: &str) -> Option<&Service> {
        self.index.get(name)
    }

    /// The registry's services as they would be after `change`, or why `change` is invalid.
    /// Writes nothing.
    pub fn preview(&self, change: &Change) -> Result<Vec<Service>, RegistryError> {
        let mut index = self.index.clone();
        apply(&mut index, change)?;
        Ok(index.into_values().collect())
    }

    /// Validates `change`, writes it in one transaction, then updates the index.
    pub fn commit(&mut self, change: &Change) -> Result<(), RegistryError> {
        let mut next = self.index.clone();
        apply(&mut next, change)?;
        let tx = self.conn.transaction()?;
        write(&tx, change)?;
        tx.commit()?;
        self.index = next;
        Ok(())
    }
}

impl Registry {
    /// The cluster (key prefix) and revision this registry mirrors, if it is a cluster's
    /// mirror rather than a host's own registry.
    pub fn mirrors(&self) -> Result<Option<(String, i64)>, RegistryError> {
        let get = |key: &str| -> Result<Option<String>, rusqlite::Error> {
            self.conn
                .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                .optional()
        };
        let Some(cluster) = get(META_CLUSTER)? else {
            return Ok(None);
        };
        let revision = get(META_REVISION)?
            .and_then(|r| r.parse().ok())
            .unwrap_or(0);
        Ok(Some((cluster, revision)))
    }

    /// Brings the registry in line with the cluster `cluster` (its key prefix), in one
    /// transaction. Services that break the registry's rules (a record written by hand, an
    /// address taken twice) are left out and returned with the reason. The work is in
    /// proportion to the services the update names (all of them only for a reset): a
    /// cluster of 10,000 services changes one at a time.
    pub fn mirror(&mut self, cluster: &str, update: &Mirror) -> Result<Mirrored, RegistryError> {
        // Every service the update touches, as it was before.
        let mut before: BTreeMap<String, Option<Service>> = BTreeMap::new();
        if update.reset {
            for (name, svc) in std::mem::take(&mut self.index) {
                before.insert(name, Some(svc));
            }
        }
        let mut rejected = Vec::new();
        for name in &update.removed {
            let was = self.index.remove(name);
            before.entry(name.clone()).or_insert(was);
        }
        for svc in &update.put {
            let was = self.index.remove(&svc.name);
            before
                .entry(svc.name.clone())
                .or_insert_with(|| was.clone());
            if let Err(e) = apply(&mut self.index, &Change::AddService(svc.clone())) {
                rejected.push((svc.name.clone(), e));
                if let Some(w) = was {
                    self.index.insert(w.name.clone(), w);
                }
            }
        }
        let written = self.write_mirror(cluster, update.revision, &before);
        let changed = match written {
            Ok(changed) => changed,
            Err(e) => {
                // The index goes back to what the database still holds.
                for (name, was) in before {
                    match was {
                        Some(s) => self.index.insert(name, s),
                        None => self.index.remove(&name),
                    };
                }
                return Err(e);
            }
        };
        Ok(Mirrored { rejected, changed })
    }

    /// Writes the services of `before` whose value changed, and the revision.
    fn write_mirror(
        &mut self,
        cluster: &str,
        revision: i64,
        before: &BTreeMap<String, Option<Service>>,
    ) -> Result<bool, RegistryError> {
        let tx = self.conn.transaction()?;
        let mut changed = false;
        for (name, was) in before {
            let now = self.index.get(name);
            if was.as_ref() == now {
                continue;
            }
            changed = true;
            tx.execute("DELETE FROM service WHERE name = ?1", [name])?;
            if let Some(svc) = now {
                write(&tx, &Change::AddService(svc.clone()))?;
            }
        }
        for (key, value) in [
            (META_CLUSTER, cluster.to_owned()),
            (META_REVISION, revision.to_string()),
        ] {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![key, value],
            )?;
        }
        tx.commit()?;
        Ok(changed)
    }
}

/// What [`Registry::mirror`] did.
#[derive(Debug)]
pub struct Mirrored {
    /// Services left out, and why.
    pub rejected: Vec<(String, RegistryError)>,
    /// Whether any service changed.
    pub changed: bool,
}

/// Applies `change` to an index, checking it first (the rules every registry change
/// follows, in one host or in a cluster).
pub(crate) fn apply(
    index: &mut BTreeMap<String, Service>,
    change: &Change,
) -> Result<(), RegistryError> {
    let invalid = RegistryError::Invalid;
    match change {
        Change::AddService(svc) => {
            model::check_name(&svc.name).map_err(invalid)?;
            model::check_vip(svc.addr.vip).map_err(invalid)?;
            model::check_port(svc.addr.port).map_err(invalid)?;
            if let Some(problem) = svc.check.problems().into_iter().next() {
                return Err(invalid(problem));
            }
            if svc.backends.len() > MAX_BACKENDS_PER_SERVICE {
                return Err(invalid(format!(
                    "{} backends; a service has at most {MAX_BACKENDS_PER_SERVICE}",
                    svc.backends.len()
                )));
            }
            for (i, b) in svc.backends.iter().enumerate() {
                check_backend(svc, b)?;
                if svc.backends[..i].iter().any(|o| o.addr == b.addr) {
                    return Err(invalid(format!("backend {} is listed twice", b.addr)));
                }
            }
            if index.contains_key(&svc.name) {
                return Err(RegistryError::Conflict(format!(
                    "a service named {:?} already exists",
                    svc.name
                )));
            }
            if let Some(other) = index.values().find(|o| o.addr == svc.addr) {
                return Err(RegistryError::Conflict(format!(
                    "{} is already the address of service {:?}",
                    svc.addr, other.name
                )));
            }
            index.insert(svc.name.clone(), svc.clone());
        }
        Change::RemoveService { name } => {
            index
                .remove(name)
                .ok_or_else(|| RegistryError::UnknownService(name.clone()))?;
        }
        Change::AddBackend { service, backend } => {
            let svc = service_mut(index, service)?;
            check_backend(svc, backend)?;
            if svc.backends.iter().any(|b| b.addr == backend.addr) {
                return Err(RegistryError::Conflict(format!(
                    "service {service:?} already has backend {}",
                    backend.addr
                )));
            }
            if svc.backends.len() >= MAX_BACKENDS_PER_SERVICE {
                return Err(invalid(format!(
                    "service {service:?} already has {MAX_BACKENDS_PER_SERVICE} backends, the most a service can have"
                )));
            }
            svc.backends.push(*backend);
        }
        Change::RemoveBackend { service, addr } => {
            let svc = service_mut(index, service)?;
            let i = backend_index(svc, *addr)?;
            svc.backends.remove(i);
        }
        Change::SetState {
            service,
            addr,
            state,
        } => {
            let svc = service_mut(index, service)?;
            let i = backend_index(svc, *addr)?;
            svc.backends[i].state = *state;
        }
    }
    Ok(())
}

fn check_backend(svc: &Service, b: &Backend) -> Result<(), RegistryError> {
    let problems = model::check_backend(svc.addr.vip, b.addr);
    if let Some(first) = problems.into_iter().next() {
        return Err(RegistryError::Invalid(first));
    }
    model::check_weight(b.weight).map_err(RegistryError::Invalid)
}

fn service_mut<'a>(
    index: &'a mut BTreeMap<String, Service>,
    name: &str,
) -> Result<&'a mut Service, RegistryError> {
    index
        .get_mut(name)
        .ok_or_else(|| RegistryError::UnknownService(name.to_owned()))
}

fn backend_index(svc: &Service, addr: SocketAddr) -> Result<usize, RegistryError> {
    svc.backends
        .iter()
        .position(|b| b.addr == addr)
        .ok_or_else(|| RegistryError::UnknownBackend {
            service: svc.name.clone(),
            addr,
        })
}

fn write(tx: &Transaction<'_>, change: &Change) -> Result<(), rusqlite::Error> {
    let service_id = |name: &str| -> Result<i64, rusqlite::Error> {
        tx.query_row("SELECT id FROM service WHERE name = ?1", [name], |r| {
            r.get(0)
        })
    };
    match change {
        Change::AddService(svc) => {
            let options = Options {
                check: Some(svc.check.clone()),
                scheduler: Some(svc.scheduler),
            };
            let options = serde_json::to_string(&options)
                .map_err(|e| rusqlite::Error::ToSqlConversionFailure(e.into()))?;
            tx.execute(
                "INSERT INTO service (name, vip, port, protocol, options) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    svc.name,
                    svc.addr.vip.to_string(),
                    svc.addr.port,
                    svc.addr.protocol.to_string(),
                    options
                ],
            )?;
            let id = tx.last_insert_rowid();
            for b in &svc.backends {
                insert_backend(tx, id, b)?;
            }
        }
        Change::RemoveService { name } => {
            tx.execute("DELETE FROM service WHERE name = ?1", [name])?;
        }
        Change::AddBackend { service, backend } => {
            insert_backend(tx, service_id(service)?, backend)?;
        }
        Change::RemoveBackend { service, addr } => {
            tx.execute(
                "DELETE FROM backend WHERE service_id = ?1 AND address = ?2",
                params![service_id(service)?, addr.to_string()],
            )?;
        }
        Change::SetState {
            service,
            addr,
            state,
        } => {
            tx.execute(
                "UPDATE backend SET state = ?3 WHERE service_id = ?1 AND address = ?2",
                params![service_id(service)?, addr.to_string(), state.to_string()],
            )?;
        }
    }
    Ok(())
}

fn insert_backend(tx: &Transaction<'_>, service_id: i64, b: &Backend) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO backend (service_id, address, weight, state) VALUES (?1, ?2, ?3, ?4)",
        params![
            service_id,
            b.addr.to_string(),
            b.weight,
            b.state.to_string()
        ],
    )?;
    Ok(())
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), RegistryError> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version as usize > MIGRATIONS.len() {
        return Err(RegistryError::TooNew {
            path: path.to_owned(),
            found: version,
            known: MIGRATIONS.len(),
        });
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(step)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
        info!(path = %path.display(), version = i + 1, "registry schema migrated");
    }
    Ok(())
}

/// Reads the whole registry. A row that does not parse is a corrupt database: an error, not
/// a silently missing service.
fn load(conn: &Connection) -> Result<BTreeMap<String, Service>, RegistryError> {
    let corrupt = RegistryError::Corrupt;
    let mut index = BTreeMap::new();
    let mut ids = BTreeMap::new();
    let mut stmt = conn.prepare("SELECT id, name, vip, port, protocol, options FROM service")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, u16>(3)?,
            r.get::<_, String>(4)?,
            r.get::<_, String>(5)?,
        ))
    })?;
    for row in rows {
        let (id, name, vip, port, protocol, options) = row?;
        let protocol = protocol.parse::<Protocol>().map_err(corrupt)?;
        let options: Options = serde_json::from_str(&options)
            .map_err(|e| corrupt(format!("service {name}: options {options:?}: {e}")))?;
        let svc = Service {
            check: options
                .check
                .unwrap_or_else(|| HealthCheck::default_for(protocol)),
            scheduler: options.scheduler.unwrap_or_default(),
            addr: ServiceAddr {
                vip: vip
                    .parse()
                    .map_err(|_| corrupt(format!("service {name}: VIP {vip:?}")))?,
                port,
                protocol,
            },
            name: name.clone(),
            backends: Vec::new(),
        };
        ids.insert(id, name.clone());
        index.insert(name, svc);
    }
    let mut stmt =
        conn.prepare("SELECT service_id, address, weight, state FROM backend ORDER BY id")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, u32>(2)?,
            r.get::<_, String>(3)?,
        ))
    })?;
    for row in rows {
        let (service_id, addr, weight, state) = row?;
        let svc = ids
            .get(&service_id)
            .and_then(|name| index.get_mut(name))
            .ok_or_else(|| corrupt(format!("backend {addr} of a missing service")))?;
        svc.backends.push(Backend {
            addr: addr
                .parse()
                .map_err(|_| corrupt(format!("backend address {addr:?}")))?,
            weight,
            state: state.parse().map_err(corrupt)?,
        });
    }
    Ok(index)
}

/// Reads the schema version of the database at `path` without changing it, if it exists.
pub fn schema_version(path: &Path) -> Result<Option<i64>, RegistryError> {
    if !path.exists() {
        return Ok(None);
    }
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    Ok(conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .optional()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn web() -> Service {
        Service {
            name: "web".into(),
            check: HealthCheck::default(),
            scheduler: Default::default(),
            addr: ServiceAddr {
                vip: "198.19.0.1".parse().unwrap(),
                port: 80,
                protocol: Protocol::Tcp,
            },
            backends: vec![Backend::new("198.18.1.2:8080".parse().unwrap(), 1)],
        }
    }

    fn temp_db() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/registry.db");
        (dir, path)
    }

    #[test]
    fn changes_survive_reopening() {
        let (_dir, path) = temp_db();
        let mut r = Registry::open(&path).unwrap();
        r.commit(&Change::AddService(web())).unwrap();
        let b2: SocketAddr = "198.18.2.2:8080".parse().unwrap();
        r.commit(&Change::AddBackend {
            service: "web".into(),
            backend: Backend::new(b2, 3),
        })
        .unwrap();
        r.commit(&Change::SetState {
            service: "web".into(),
            addr: b2,
            state: AdminState::Draining,
        })
        .unwrap();
        let before: Vec<Service> = r.services().cloned().collect();
        drop(r);

        let r = Registry::open(&path).unwrap();
        let after: Vec<Service> = r.services().cloned().collect();
        assert_eq!(before, after);
        let svc = r.get("web").unwrap();
        assert_eq!(svc.backends.len(), 2);
        assert_eq!(svc.backends[1].weight, 3);
        assert_eq!(svc.backends[1].state, AdminState::Draining);
        assert_eq!(
            schema_version(&path).unwrap(),
            Some(MIGRATIONS.len() as i64)
        );
    }

    #[test]
    fn bad_changes_are_refused_and_change_nothing() {
        let (_dir, path) = temp_db();
        let mut r = Registry::open(&path).unwrap();
        r.commit(&Change::AddService(web())).unwrap();
        let before: Vec<Service> = r.services().cloned().collect();

        let mut dup_addr = web();
        dup_addr.name = "other".into();
        let mut port0 = web();
        port0.name = "p0".into();
        port0.addr.port = 0;
        let mut v6_backend = web();
        v6_backend.name = "mixed".into();
        v6_backend.addr.port = 81;
        v6_backend.backends = vec![Backend::new("[2001:db8:1::2]:80".parse().unwrap(), 1)];
        let cases = [
            (Change::AddService(web()), "already exists"),
            (Change::AddService(dup_addr), "already the address"),
            (Change::AddService(port0), "port 0"),
            (Change::AddService(v6_backend), "same IP family"),
            (
                Change::RemoveService {
                    name: "nope".into(),
                },
                "no service named",
            ),
            (
                Change::AddBackend {
                    service: "web".into(),
                    backend: Backend::new("198.18.1.2:8080".parse().unwrap(), 1),
                },
                "already has backend",
            ),
            (
                Change::AddBackend {
                    service: "web".into(),
                    backend: Backend::new("198.18.9.2:8080".parse().unwrap(), 10_001),
                },
                "maximum",
            ),
            (
                Change::RemoveBackend {
                    service: "web".into(),
                    addr: "198.18.9.9:1".parse().unwrap(),
                },
                "has no backend",
            ),
        ];
        for (change, expect) in cases {
            let err = r.commit(&change).unwrap_err().to_string();
            assert!(err.contains(expect), "{change:?}: {err}");
            assert!(r.preview(&change).is_err());
        }
        let after: Vec<Service> = r.services().cloned().collect();
        assert_eq!(before, after);
        drop(r);
        let reopened: Vec<Service> = Registry::open(&path).unwrap().services().cloned().collect();
        assert_eq!(before, reopened);
    }

    #[test]
    fn removing_a_service_removes_its_backends() {
        let (_dir, path) = temp_db();
        let mut r = Registry::open(&path).unwrap();
        r.commit(&Change::AddService(web())).unwrap();
        r.commit(&Change::RemoveService { name: "web".into() })
            .unwrap();
        drop(r);
        let conn = Connection::open(&path).unwrap();
        let n: i64 = conn
            .query_row("SELECT count(*) FROM backend", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 0);
    }

    #[test]
    fn a_mirror_follows_the_cluster_and_survives_reopening() {
        let (_dir, path) = temp_db();
        let mut reg = Registry::open(&path).unwrap();
        assert_eq!(reg.mirrors().unwrap(), None, "a host's own registry");
        let mut api = web();
        api.name = "api".into();
        api.addr.port = 81;
        let done = reg
            .mirror(
                "/orch",
                &Mirror {
                    reset: true,
                    put: vec![web(), api.clone()],
                    removed: vec![],
                    revision: 7,
                },
            )
            .unwrap();
        assert!(done.rejected.is_empty() && done.changed);
        // A change to one service, a removal, and a record that breaks the rules (another
        // service's address): the last is left out, the rest applied.
        let mut web2 = web();
        web2.backends.pop();
        let mut thief = web();
        thief.name = "thief".into();
        let done = reg
            .mirror(
                "/orch",
                &Mirror {
                    reset: false,
                    put: vec![web2.clone(), thief],
                    removed: vec!["api".into()],
                    revision: 9,
                },
            )
            .unwrap();
        assert_eq!(done.rejected.len(), 1);
        assert_eq!(done.rejected[0].0, "thief");
        assert!(done.changed);
        // The same state again changes nothing (a reset after a reconnect, say).
        let again = reg
            .mirror(
                "/orch",
                &Mirror {
                    reset: true,
                    put: vec![web2.clone()],
                    removed: vec![],
                    revision: 10,
                },
            )
            .unwrap();
        assert!(!again.changed);
        drop(reg);
        let reg = Registry::open(&path).unwrap();
        assert_eq!(reg.mirrors().unwrap(), Some(("/orch".into(), 10)));
        assert_eq!(reg.services().cloned().collect::<Vec<_>>(), vec![web2]);
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let (_dir, path) = temp_db();
        drop(Registry::open(&path).unwrap());
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        let err = Registry::open(&path).unwrap_err();
        assert!(
            matches!(err, RegistryError::TooNew { found: 99, .. }),
            "{err}"
        );
    }
}
