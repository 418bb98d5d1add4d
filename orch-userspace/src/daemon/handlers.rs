//! Changes asked through the admin API: checked against everything, committed to the
//! registry, then applied to the data plane. Reads are answered elsewhere
//! ([`super::view::Reads`]), off the loop.

use tokio::sync::oneshot;
use tracing::{error, info};

use super::{member::Requester, state::Daemon};
use crate::{
    api::{ApiError, ErrorKind, Reply, Request},
    metrics::OpResult,
    model::{AdminState, Backend, HealthCheck, Service, ServiceAddr},
    registry::{Change, RegistryError},
};

impl Daemon {
    /// Serves one change request (reads never reach the loop). On one host the answer goes
    /// out at once; in a cluster once etcd committed the change (see [`super::cluster`]).
    pub fn handle(&mut self, request: Request, reply: oneshot::Sender<Result<Reply, ApiError>>) {
        let change = match self.change_of(request) {
            Ok(c) => c,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let operation = change_op(&change);
        if self.cluster.is_some() {
            match self.check(&change) {
                Ok(()) => {
                    let done = describe(&change);
                    self.commit_to_cluster(
                        change,
                        Requester {
                            reply,
                            done,
                            op: operation,
                        },
                    );
                }
                Err(e) => {
                    self.metrics.registry_op(operation, OpResult::Refused);
                    let _ = reply.send(Err(e));
                }
            }
            return;
        }
        let result = self.change(change);
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
        // Readers see the change before its requester hears it is done.
        self.publish();
        let _ = reply.send(result);
    }

    /// The registry change a request asks for.
    fn change_of(&self, request: Request) -> Result<Change, ApiError> {
        let change = match request {
            Request::ServiceAdd {
                name,
                vip,
                port,
                protocol,
                backends,
                check,
                scheduler,
            } => Change::AddService(Service {
                name,
                addr: ServiceAddr {
                    vip,
                    port,
                    protocol,
                },
                check: check.unwrap_or_else(|| HealthCheck::default_for(protocol)),
                scheduler,
                backends: backends
                    .into_iter()
                    .map(|b| Backend::new(b.address, b.weight))
                    .collect(),
            }),
            Request::ServiceRm { name } => Change::RemoveService { name },
            Request::BackendAdd {
                service,
                address,
                weight,
            } => Change::AddBackend {
                service,
                backend: Backend::new(address, weight),
            },
            Request::BackendRm { service, address } => Change::RemoveBackend {
                service,
                addr: address,
            },
            Request::BackendSetState {
                service,
                address,
                state,
            } => Change::SetState {
                service,
                addr: address,
                state,
            },
            read => {
                return Err(ApiError::new(
                    ErrorKind::Internal,
                    format!("{} is a read and is served off the loop", read.op()),
                ))
            }
        };
        Ok(change)
    }

    /// Commits a checked registry change durably, then brings the data plane in line.
    fn change(&mut self, change: Change) -> Result<Reply, ApiError> {
        self.check(&change)?;
        self.registry.commit(&change).map_err(registry_error)?;
        let done = describe(&change);
        info!(change = %done, "registry changed");
        let desired = self.desired();
        let applied = self.apply(&desired);
        self.checker.sync(&self.services());
        self.forget_removed();
        if let Err(e) = applied {
            let e = crate::chain(&e);
            error!(error = %e, "applying a registry change to the data plane failed");
            return Err(ApiError::new(
                ErrorKind::Internal,
                format!("{done} in the registry, but the data plane was not updated: {e}"),
            ));
        }
        Ok(Reply::Done(done))
    }

    /// Checks a registry change against everything: validity, the config file's services
    /// (this host's, and in a cluster every host's), the cluster's reachability, capacity.
    /// Changes nothing.
    fn check(&self, change: &Change) -> Result<(), ApiError> {
        let file_services = &self.config.services;
        let target = change.service();
        if file_services.iter().any(|s| s.name == target) {
            return Err(ApiError::new(
                ErrorKind::Conflict,
                format!(
                    "service {target:?} is defined in the config file {}; change it there",
                    self.config_path().display()
                ),
            ));
        }
        if let Change::AddService(svc) = change {
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
        if let Some(refusal) = self.cluster_refusal(change) {
            return Err(refusal);
        }
        let registered = self.registry.preview(change).map_err(registry_error)?;
        let desired = super::state::desired(&self.config, &registered, &self.verdicts);
        self.reconciler
            .check(&desired)
            .map_err(|e| ApiError::new(ErrorKind::Capacity, e.to_string()))?;
        Ok(())
    }
}

/// The operation's name in the registry metrics.
fn change_op(change: &Change) -> &'static str {
    match change {
        Change::AddService(_) => "service_add",
        Change::RemoveService { .. } => "service_rm",
        Change::AddBackend { .. } => "backend_add",
        Change::RemoveBackend { .. } => "backend_rm",
        Change::SetState { .. } => "backend_set_state",
    }
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

fn registry_error(e: RegistryError) -> ApiError {
    let kind = registry_error_kind(&e);
    let message = crate::chain(&e);
    ApiError::new(kind, message)
}

/// The API's class of a registry error.
pub(super) fn registry_error_kind(e: &RegistryError) -> ErrorKind {
    match e {
        RegistryError::Invalid(_) => ErrorKind::Invalid,
        RegistryError::UnknownService(_) | RegistryError::UnknownBackend { .. } => {
            ErrorKind::NotFound
        }
        RegistryError::Conflict(_) => ErrorKind::Conflict,
        RegistryError::Open { .. }
        | RegistryError::TooNew { .. }
        | RegistryError::Corrupt(_)
        | RegistryError::Db(_) => ErrorKind::Internal,
    }
}
