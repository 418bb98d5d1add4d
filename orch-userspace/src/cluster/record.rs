//! The cluster's key layout in etcd and the records stored under it.
//!
//! Everything lives under `{prefix}/v1/`; a layout that changes incompatibly gets `v2/`
//! beside it, so hosts of two versions never misread each other's records.
//!
//! | key | value | written by |
//! |---|---|---|
//! | `services/<name>` | [`ServiceRecord`] (JSON) | any host's API, compare-and-set |
//! | `addresses/<protocol>/<vip>/<port>` | the service's name | in the same transaction |
//! | `nodes/<node>` | [`NodeRecord`], on the host's lease | each host, for itself |
//! | `files/<node>` | [`FileClaim`]s: the host's config-file services | each host, for itself |
//!
//! The address keys make "one service per address" hold across hosts: a service is created
//! only together with its address key, in one transaction that fails if either exists.
//! Records keep unknown fields out of the way (no `deny_unknown_fields`): a newer orch may
//! add fields within `v1`, and an older one reads the rest.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::model::{AdminState, Backend, HealthCheck, Protocol, Scheduler, Service, ServiceAddr};

/// The keys of one cluster, under its prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    root: String,
}

/// What a key under the root is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Key {
    Service(String),
    Address,
    Node(String),
    Files(String),
}

impl Keys {
    /// `prefix` without a trailing slash (checked by the config).
    pub fn new(prefix: &str) -> Keys {
        Keys {
            root: format!("{}/v1/", prefix.trim_end_matches('/')),
        }
    }

    /// Every key of this layout starts with it.
    pub fn root(&self) -> &str {
        &self.root
    }

    pub fn services(&self) -> String {
        format!("{}services/", self.root)
    }

    pub fn service(&self, name: &str) -> String {
        format!("{}services/{name}", self.root)
    }

    pub fn address(&self, addr: &ServiceAddr) -> String {
        format!(
            "{}addresses/{}/{}/{}",
            self.root, addr.protocol, addr.vip, addr.port
        )
    }

    pub fn node(&self, node: &str) -> String {
        format!("{}nodes/{node}", self.root)
    }

    pub fn files(&self, node: &str) -> String {
        format!("{}files/{node}", self.root)
    }

    /// What `key` is, or `None` for a key this version does not know (left alone).
    pub fn parse(&self, key: &[u8]) -> Option<Key> {
        let rest = std::str::from_utf8(key).ok()?.strip_prefix(&self.root)?;
        let (kind, name) = rest.split_once('/')?;
        if name.is_empty() {
            return None;
        }
        match kind {
            "services" => Some(Key::Service(name.to_owned())),
            "addresses" => Some(Key::Address),
            "nodes" => Some(Key::Node(name.to_owned())),
            "files" => Some(Key::Files(name.to_owned())),
            _ => None,
        }
    }
}

/// A registered service as stored; its name is its key's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRecord {
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    #[serde(default)]
    pub scheduler: Scheduler,
    pub check: HealthCheck,
    pub backends: Vec<BackendRecord>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendRecord {
    pub address: SocketAddr,
    pub weight: u32,
    #[serde(default)]
    pub state: AdminState,
}

impl ServiceRecord {
    pub fn of(s: &Service) -> ServiceRecord {
        ServiceRecord {
            vip: s.addr.vip,
            port: s.addr.port,
            protocol: s.addr.protocol,
            scheduler: s.scheduler,
            check: s.check.clone(),
            backends: s
                .backends
                .iter()
                .map(|b| BackendRecord {
                    address: b.addr,
                    weight: b.weight,
                    state: b.state,
                })
                .collect(),
        }
    }

    pub fn into_service(self, name: String) -> Service {
        Service {
            name,
            addr: ServiceAddr {
                vip: self.vip,
                port: self.port,
                protocol: self.protocol,
            },
            check: self.check,
            scheduler: self.scheduler,
            backends: self
                .backends
                .into_iter()
                .map(|b| Backend {
                    addr: b.address,
                    weight: b.weight,
                    state: b.state,
                })
                .collect(),
        }
    }

    pub fn encode(s: &Service) -> Vec<u8> {
        serde_json::to_vec(&ServiceRecord::of(s)).expect("a record always serialises")
    }

    pub fn decode(name: &str, value: &[u8]) -> Result<Service, serde_json::Error> {
        serde_json::from_slice::<ServiceRecord>(value).map(|r| r.into_service(name.to_owned()))
    }
}

/// A host of the cluster, as it announces itself (on a lease: gone when the host is).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The address it advertises (`[cluster] address`), if any.
    #[serde(default)]
    pub address: Option<IpAddr>,
    /// orch's version on it.
    pub version: String,
    /// When its daemon started and when it last renewed this record (Unix seconds).
    pub started: u64,
    pub seen: u64,
}

/// A config-file service of one host: its name and address belong to that host's file, and
/// no registered service may take either.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileClaim {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl FileClaim {
    pub fn of(s: &Service) -> FileClaim {
        FileClaim {
            name: s.name.clone(),
            vip: s.addr.vip,
            port: s.addr.port,
            protocol: s.addr.protocol,
        }
    }

    pub fn addr(&self) -> ServiceAddr {
        ServiceAddr {
            vip: self.vip,
            port: self.port,
            protocol: self.protocol,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_back_and_foreign_keys_are_left_alone() {
        let k = Keys::new("/orch");
        assert_eq!(k.service("web"), "/orch/v1/services/web");
        assert_eq!(
            k.parse(k.service("web").as_bytes()),
            Some(Key::Service("web".into()))
        );
        assert_eq!(
            k.parse(k.node("h1").as_bytes()),
            Some(Key::Node("h1".into()))
        );
        assert_eq!(
            k.parse(k.files("h1").as_bytes()),
            Some(Key::Files("h1".into()))
        );
        let addr = ServiceAddr {
            vip: "2001:db8::1".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
        };
        assert_eq!(k.address(&addr), "/orch/v1/addresses/tcp/2001:db8::1/80");
        assert_eq!(k.parse(k.address(&addr).as_bytes()), Some(Key::Address));
        for foreign in [
            "/orch/v2/services/web",
            "/other/v1/services/web",
            "/orch/v1/services/",
        ] {
            assert_eq!(k.parse(foreign.as_bytes()), None, "{foreign}");
        }
    }

    #[test]
    fn a_service_survives_its_record_and_unknown_fields_are_ignored() {
        let mut web = Service {
            name: "web".into(),
            addr: ServiceAddr {
                vip: "198.19.0.1".parse().unwrap(),
                port: 80,
                protocol: Protocol::Tcp,
            },
            check: HealthCheck::default_for(Protocol::Tcp),
            scheduler: Scheduler::Maglev,
            backends: vec![Backend::new("198.18.1.2:8080".parse().unwrap(), 3)],
        };
        web.backends[0].state = AdminState::Draining;
        let bytes = ServiceRecord::encode(&web);
        assert_eq!(ServiceRecord::decode("web", &bytes).unwrap(), web);
        let mut json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        json["from_a_newer_orch"] = serde_json::json!(true);
        let newer = serde_json::to_vec(&json).unwrap();
        assert_eq!(ServiceRecord::decode("web", &newer).unwrap(), web);
        assert!(ServiceRecord::decode("web", b"{\"vip\": 7}").is_err());
    }
}
