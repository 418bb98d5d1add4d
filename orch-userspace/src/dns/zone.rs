//! The zone orch is authoritative for, and the answer to one question about it.
//!
//! Pure: no sockets, no clock. The server ([`super`]) turns a packet into a question and an
//! [`Answer`] back into a packet.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
};

use hickory_proto::rr::{
    rdata::{A, AAAA, SOA, SRV},
    Name, RData, Record, RecordType,
};

use crate::model::{Protocol, Service, ServiceAddr};

/// The label under a service's name whose addresses are the backends in rotation:
/// `backends.<service>.<domain>`.
const BACKENDS_LABEL: &str = "backends";

/// Seconds a negative answer may be cached (the SOA's minimum): short, since a service may be
/// added any moment.
const NEGATIVE_TTL: u32 = 5;

/// The services by name, under one domain.
#[derive(Clone, Debug)]
pub struct Zone {
    domain: Name,
    ttl: u32,
    /// By lower-case name: only names that are one DNS label are here.
    services: HashMap<String, Entry>,
    /// Changes with every new zone, so that secondaries (and people) can tell them apart.
    serial: u32,
}

/// What the zone knows of one service.
#[derive(Clone, Debug)]
struct Entry {
    addr: ServiceAddr,
    /// The addresses of the backends new connections may go to, each once, in the order
    /// the operator listed them.
    in_rotation: Vec<IpAddr>,
}

/// The answer to one question.
#[derive(Clone, Debug, PartialEq)]
pub struct Answer {
    pub rcode: Rcode,
    pub answers: Vec<Record>,
    /// The zone's SOA, for negative answers (RFC 2308) and SOA questions' authority.
    pub authority: Vec<Record>,
    pub additionals: Vec<Record>,
}

/// The response codes orch gives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rcode {
    NoError,
    NxDomain,
    /// Not ours: orch is not a recursive resolver.
    Refused,
}

impl Rcode {
    pub const fn name(self) -> &'static str {
        match self {
            Rcode::NoError => "noerror",
            Rcode::NxDomain => "nxdomain",
            Rcode::Refused => "refused",
        }
    }
}

impl Answer {
    /// No records: for refusals, and for an answer that does not fit.
    pub fn nothing() -> Answer {
        Answer {
            rcode: Rcode::Refused,
            answers: Vec::new(),
            authority: Vec::new(),
            additionals: Vec::new(),
        }
    }
}

impl Zone {
    /// The zone of `domain` (already validated) with `services`, each with the addresses
    /// of its backends in rotation (by the daemon's rule: admin state, weight, health,
    /// panic).
    pub fn new<'a>(
        domain: &Name,
        ttl: u32,
        serial: u32,
        services: impl IntoIterator<Item = (&'a Service, Vec<IpAddr>)>,
    ) -> Zone {
        let services = services
            .into_iter()
            .filter(|(s, _)| is_label(&s.name))
            .map(|(s, mut in_rotation)| {
                // Two backends on one host differ only by port, which A records cannot tell.
                let mut seen = HashSet::new();
                in_rotation.retain(|ip| seen.insert(*ip));
                let entry = Entry {
                    addr: s.addr,
                    in_rotation,
                };
                (s.name.to_ascii_lowercase(), entry)
            })
            .collect();
        Zone {
            domain: domain.to_lowercase(),
            ttl,
            services,
            serial,
        }
    }

    /// An empty zone (before the daemon published one).
    pub fn empty(domain: &Name) -> Zone {
        Zone::new(domain, 0, 0, std::iter::empty())
    }

    /// Answers `qtype` for `qname`:
    /// - `<service>.<domain>`: `A` or `AAAA` give the VIP (the other family: no data);
    /// - `backends.<service>.<domain>`: `A` or `AAAA` give the addresses of the backends in
    ///   rotation, for clients that balance by themselves (gRPC, database drivers); with
    ///   many backends this is the answer that outgrows a UDP message;
    /// - `_<service>._<tcp|udp>.<domain>`: `SRV` gives port and target, with the target's
    ///   address as additional data;
    /// - the domain itself: its `SOA`;
    /// - any other name in the domain: NXDOMAIN; a name outside it: REFUSED.
    pub fn answer(&self, qname: &Name, qtype: RecordType) -> Answer {
        let qname = qname.to_lowercase();
        if !self.domain.zone_of(&qname) {
            return self.negative(Rcode::Refused, false);
        }
        let depth = qname.num_labels() - self.domain.num_labels();
        let labels: Vec<String> = qname
            .iter()
            .take(depth as usize)
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect();
        match labels.as_slice() {
            [] => {
                let soa = self.soa();
                if qtype == RecordType::SOA {
                    self.positive(vec![soa], Vec::new())
                } else {
                    self.negative(Rcode::NoError, true)
                }
            }
            [service] => match self.services.get(service.as_str()) {
                None => self.negative(Rcode::NxDomain, true),
                Some(entry) => self.addresses(&qname, [entry.addr.vip], qtype),
            },
            [label, service] if label == BACKENDS_LABEL => {
                match self.services.get(service.as_str()) {
                    None => self.negative(Rcode::NxDomain, true),
                    Some(entry) => self.addresses(&qname, entry.in_rotation.iter().copied(), qtype),
                }
            }
            [service, proto] => {
                let wanted = match proto.as_str() {
                    "_tcp" => Protocol::Tcp,
                    "_udp" => Protocol::Udp,
                    _ => return self.negative(Rcode::NxDomain, true),
                };
                let found = service
                    .strip_prefix('_')
                    .and_then(|s| self.services.get(s).map(|e| (s, &e.addr)))
                    .filter(|(_, a)| a.protocol == wanted);
                let Some((name, addr)) = found else {
                    return self.negative(Rcode::NxDomain, true);
                };
                if qtype != RecordType::SRV {
                    return self.negative(Rcode::NoError, true);
                }
                let target = self.name_of(name);
                let srv = Record::from_rdata(
                    qname.clone(),
                    self.ttl,
                    RData::SRV(SRV::new(0, 0, addr.port, target.clone())),
                );
                let glue = [RecordType::A, RecordType::AAAA]
                    .into_iter()
                    .filter_map(|t| self.address(&target, addr.vip, t))
                    .collect();
                self.positive(vec![srv], glue)
            }
            _ => self.negative(Rcode::NxDomain, true),
        }
    }

    /// The records of those of `ips` that `qtype` asks for, under `name`: NOERROR with no
    /// data when none is of that family.
    fn addresses(
        &self,
        name: &Name,
        ips: impl IntoIterator<Item = IpAddr>,
        qtype: RecordType,
    ) -> Answer {
        let records: Vec<Record> = ips
            .into_iter()
            .filter_map(|ip| self.address(name, ip, qtype))
            .collect();
        if records.is_empty() {
            self.negative(Rcode::NoError, true)
        } else {
            self.positive(records, Vec::new())
        }
    }

    /// `<service>.<domain>.`
    fn name_of(&self, service: &str) -> Name {
        Name::from_ascii(service)
            .and_then(|n| n.append_domain(&self.domain))
            .expect("a single valid label under a valid domain")
    }

    /// The record of `vip` under `name` if `qtype` asks for its family.
    fn address(&self, name: &Name, vip: IpAddr, qtype: RecordType) -> Option<Record> {
        let rdata = match (vip, qtype) {
            (IpAddr::V4(v4), RecordType::A) => RData::A(A(v4)),
            (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(AAAA(v6)),
            _ => return None,
        };
        Some(Record::from_rdata(name.clone(), self.ttl, rdata))
    }

    fn soa(&self) -> Record {
        let host = |l: &str| {
            Name::from_ascii(l)
                .and_then(|n| n.append_domain(&self.domain))
                .expect("valid")
        };
        Record::from_rdata(
            self.domain.clone(),
            NEGATIVE_TTL,
            RData::SOA(SOA::new(
                host("ns"),
                host("hostmaster"),
                self.serial,
                3_600,
                600,
                86_400,
                NEGATIVE_TTL,
            )),
        )
    }

    fn positive(&self, answers: Vec<Record>, additionals: Vec<Record>) -> Answer {
        Answer {
            rcode: Rcode::NoError,
            answers,
            authority: Vec::new(),
            additionals,
        }
    }

    fn negative(&self, rcode: Rcode, with_soa: bool) -> Answer {
        Answer {
            rcode,
            answers: Vec::new(),
            authority: if with_soa {
                vec![self.soa()]
            } else {
                Vec::new()
            },
            additionals: Vec::new(),
        }
    }
}

/// Whether `s` is one DNS label (RFC 1123 host label: letters, digits, hyphens, 1-63, no
/// hyphen at either end). Service names with dots or underscores are not resolvable.
pub fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Checks a configured domain: one or more labels, at most 253 characters.
pub fn check_domain(domain: &str) -> Result<Name, String> {
    let trimmed = domain.strip_suffix('.').unwrap_or(domain);
    if trimmed.is_empty() || trimmed.len() > 253 || !trimmed.split('.').all(is_label) {
        return Err(format!(
            "dns.domain {domain:?} is not a domain name (labels of letters, digits and hyphens, \
             joined by dots)"
        ));
    }
    let mut name = Name::from_ascii(trimmed).map_err(|e| format!("dns.domain {domain:?}: {e}"))?;
    name.set_fqdn(true);
    Ok(name.to_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Backend, HealthCheck};

    fn service(name: &str, vip: &str, port: u16, protocol: Protocol) -> Service {
        Service {
            name: name.into(),
            addr: ServiceAddr {
                vip: vip.parse().unwrap(),
                port,
                protocol,
            },
            check: HealthCheck::default_for(protocol),
            scheduler: Default::default(),
            backends: vec![Backend::new("198.18.1.2:8080".parse().unwrap(), 1)],
        }
    }

    fn zone() -> Zone {
        let services = [
            service("web", "198.19.0.1", 80, Protocol::Tcp),
            service("dns", "198.19.0.1", 53, Protocol::Udp),
            service("web6", "2001:db8:ff::1", 80, Protocol::Tcp),
            service("not.a.label", "198.19.0.9", 80, Protocol::Tcp),
        ];
        // web's backends in rotation: two hosts, one of them twice (on another port).
        let in_rotation = |s: &Service| match s.name.as_str() {
            "web" => ["198.18.1.2", "198.18.1.3", "198.18.1.2"]
                .iter()
                .map(|ip| ip.parse().unwrap())
                .collect(),
            _ => Vec::new(),
        };
        Zone::new(
            &check_domain("orch.internal").unwrap(),
            5,
            7,
            services.iter().map(|s| (s, in_rotation(s))),
        )
    }

    fn ask(name: &str, t: RecordType) -> Answer {
        zone().answer(&Name::from_ascii(name).unwrap(), t)
    }

    #[test]
    fn a_and_aaaa_give_the_vip_of_their_family() {
        let a = ask("web.orch.internal.", RecordType::A);
        assert_eq!(a.rcode, Rcode::NoError);
        assert_eq!(a.answers.len(), 1);
        assert_eq!(
            a.answers[0].data(),
            &RData::A(A("198.19.0.1".parse().unwrap()))
        );
        assert_eq!(a.answers[0].ttl(), 5);
        // Case does not matter (RFC 4343); the answer names what was asked.
        let mixed = ask("WeB6.Orch.Internal.", RecordType::AAAA);
        assert_eq!(
            mixed.answers[0].data(),
            &RData::AAAA(AAAA("2001:db8:ff::1".parse().unwrap()))
        );
        // The other family: the name exists, with no such data (NOERROR, SOA, no answer).
        let none = ask("web.orch.internal.", RecordType::AAAA);
        assert_eq!(
            (none.rcode, none.answers.len(), none.authority.len()),
            (Rcode::NoError, 0, 1)
        );
    }

    #[test]
    fn backends_give_the_addresses_in_rotation_each_once() {
        let a = ask("backends.WEB.orch.internal.", RecordType::A);
        let ips: Vec<RData> = a.answers.iter().map(|r| r.data().clone()).collect();
        assert_eq!(
            ips,
            [
                RData::A(A("198.18.1.2".parse().unwrap())),
                RData::A(A("198.18.1.3".parse().unwrap()))
            ]
        );
        // No backend in rotation, or none of the family: the name exists, with no data.
        for (name, t) in [
            ("backends.web.orch.internal.", RecordType::AAAA),
            ("backends.dns.orch.internal.", RecordType::A),
        ] {
            let none = ask(name, t);
            assert_eq!(
                (none.rcode, none.answers.len(), none.authority.len()),
                (Rcode::NoError, 0, 1),
                "{name} {t}"
            );
        }
        assert_eq!(
            ask("backends.nope.orch.internal.", RecordType::A).rcode,
            Rcode::NxDomain
        );
    }

    #[test]
    fn srv_gives_port_and_target_with_its_address() {
        let srv = ask("_dns._udp.orch.internal.", RecordType::SRV);
        assert_eq!(srv.rcode, Rcode::NoError);
        let RData::SRV(s) = srv.answers[0].data() else {
            panic!("{srv:?}")
        };
        assert_eq!(s.port(), 53);
        assert_eq!(s.target().to_string(), "dns.orch.internal.");
        assert_eq!(srv.additionals.len(), 1);
        assert_eq!(
            srv.additionals[0].data(),
            &RData::A(A("198.19.0.1".parse().unwrap()))
        );
        // The wrong protocol is another name, which does not exist.
        assert_eq!(
            ask("_dns._tcp.orch.internal.", RecordType::SRV).rcode,
            Rcode::NxDomain
        );
        assert_eq!(
            ask("_web._sctp.orch.internal.", RecordType::SRV).rcode,
            Rcode::NxDomain
        );
        assert_eq!(
            ask("web._tcp.orch.internal.", RecordType::SRV).rcode,
            Rcode::NxDomain
        );
    }

    #[test]
    fn unknown_names_are_nxdomain_and_other_domains_refused() {
        for name in [
            "nope.orch.internal.",
            "a.web.orch.internal.",
            "not.a.label.orch.internal.",
            "x._y._tcp.orch.internal.",
        ] {
            let a = ask(name, RecordType::A);
            assert_eq!(a.rcode, Rcode::NxDomain, "{name}");
            assert_eq!(
                a.authority.len(),
                1,
                "{name}: the SOA, for negative caching"
            );
        }
        for name in ["example.com.", "internal.", "orch.internal.example.", "."] {
            let a = ask(name, RecordType::A);
            assert_eq!((a.rcode, a.authority.len()), (Rcode::Refused, 0), "{name}");
        }
        let soa = ask("orch.internal.", RecordType::SOA);
        assert_eq!((soa.rcode, soa.answers.len()), (Rcode::NoError, 1));
        let RData::SOA(s) = soa.answers[0].data() else {
            panic!()
        };
        assert_eq!((s.serial(), s.minimum()), (7, NEGATIVE_TTL));
        assert_eq!(ask("orch.internal.", RecordType::A).answers.len(), 0);
    }

    #[test]
    fn domains_and_labels_are_checked() {
        assert_eq!(
            check_domain("Orch.Internal.").unwrap().to_string(),
            "orch.internal."
        );
        for bad in ["", ".", "a..b", "-a.b", "a_b.c", &"x".repeat(64), "a b"] {
            assert!(check_domain(bad).is_err(), "{bad:?}");
        }
        assert!(is_label("web-1") && !is_label("web_1") && !is_label("a.b") && !is_label(""));
    }
}
