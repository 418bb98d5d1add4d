//! Between the daemon's types and the maps' layout: addresses as four network-order words
//! (IPv4-mapped for IPv4), service keys.

use std::net::{IpAddr, Ipv6Addr};

use orch_common::maps::{is_v4_mapped, v4_mapped, ServiceKey};

use crate::model::{Protocol, ServiceAddr};

/// The network-order words of an address, IPv4-mapped for IPv4 (the maps' address layout).
pub fn addr_words(ip: IpAddr) -> [u32; 4] {
    match ip {
        IpAddr::V4(v4) => v4_mapped(u32::from_ne_bytes(v4.octets())),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            std::array::from_fn(|i| {
                u32::from_ne_bytes([o[i * 4], o[i * 4 + 1], o[i * 4 + 2], o[i * 4 + 3]])
            })
        }
    }
}

/// The inverse of [`addr_words`].
pub fn words_addr(words: &[u32; 4]) -> IpAddr {
    if is_v4_mapped(words) {
        IpAddr::from(words[3].to_ne_bytes())
    } else {
        let mut o = [0u8; 16];
        for (chunk, w) in o.chunks_exact_mut(4).zip(words) {
            chunk.copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::V6(Ipv6Addr::from(o))
    }
}

/// The services-map key of a service.
pub fn service_key(addr: &ServiceAddr) -> ServiceKey {
    ServiceKey {
        vip: addr_words(addr.vip),
        port_be: addr.port.to_be(),
        proto: addr.protocol.number(),
        _pad: 0,
    }
}

/// The inverse of [`service_key`]; `None` for a protocol orch does not balance.
pub fn service_addr(key: &ServiceKey) -> Option<ServiceAddr> {
    let protocol = [Protocol::Tcp, Protocol::Udp]
        .into_iter()
        .find(|p| p.number() == key.proto)?;
    Some(ServiceAddr {
        vip: words_addr(&key.vip),
        port: u16::from_be(key.port_be),
        protocol,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_keys_round_trip() {
        for addr in [
            "198.19.0.1:80/tcp",
            "198.19.0.1:53/udp",
            "[2001:db8:ff::1]:443/tcp",
        ] {
            let (ip_port, proto) = addr.split_once('/').unwrap();
            let sa: std::net::SocketAddr = ip_port.parse().unwrap();
            let a = ServiceAddr {
                vip: sa.ip(),
                port: sa.port(),
                protocol: proto.parse().unwrap(),
            };
            assert_eq!(service_addr(&service_key(&a)), Some(a));
        }
    }

    #[test]
    fn ipv6_addresses_keep_their_bytes() {
        let w = addr_words("2001:db8:ff::1".parse().unwrap());
        let mut bytes = Vec::new();
        for x in w {
            bytes.extend_from_slice(&x.to_ne_bytes());
        }
        assert_eq!(bytes[..4], [0x20, 0x01, 0x0d, 0xb8]);
        assert_eq!(bytes[15], 1);
    }
}
