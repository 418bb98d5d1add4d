//! The map reads behind an explanation: the connection table first, then the service's
//! active table (round-robin slots and every CPU's cursor, or the Maglev table and the
//! flow's hash), as the program reads them.

use std::net::SocketAddr;

use orch_common::maps::{
    slot_table_index, FlowKey, DIR_FORWARD, SEEN_FIN, SEEN_RST, SERVICE_MAGLEV,
};

use super::{hashed_picks, next_picks};
use crate::{
    api::{CpuChoice, ExplainPath},
    dataplane::{
        codec::{addr_words, service_key, words_addr},
        monotonic_ns, DataplaneError, Reader,
    },
    model::{Protocol, ServiceAddr},
};

/// Where the data plane sends the next packet of `client` -> `vip` (a service's address),
/// and every backend that answer names, read from the maps the program reads. A UDP flow
/// idle for `udp_idle_ns` is stale: the next datagram is balanced afresh.
pub fn query(
    reader: &Reader,
    protocol: Protocol,
    client: SocketAddr,
    vip: SocketAddr,
    udp_idle_ns: u64,
) -> Result<(ExplainPath, Vec<SocketAddr>), DataplaneError> {
    let addr = ServiceAddr {
        vip: vip.ip(),
        port: vip.port(),
        protocol,
    };
    let Some(entry) = reader.service_entry(&service_key(&addr))? else {
        // Not installed: the program does not know it either.
        return Ok((ExplainPath::NotAService, Vec::new()));
    };
    let key = FlowKey {
        src: addr_words(client.ip()),
        dst: addr_words(vip.ip()),
        src_port_be: client.port().to_be(),
        dst_port_be: vip.port().to_be(),
        proto: protocol.number(),
        dir: DIR_FORWARD,
        _pad: 0,
    };
    let mut stale = None;
    if let Some(flow) = reader.flow(&key)? {
        let backend = SocketAddr::new(words_addr(&flow.nat_addr), u16::from_be(flow.nat_port_be));
        let idle_ns = monotonic_ns().saturating_sub(flow.last_seen_ns);
        if protocol == Protocol::Udp && idle_ns > udp_idle_ns {
            stale = Some(backend);
        } else {
            let reply = key.reply(flow.nat_addr, flow.nat_port_be);
            let reply_seen = reader.flow(&reply)?.map_or(0, |r| r.seen());
            let closed = |seen: u32| seen & (SEEN_FIN | SEEN_RST) != 0;
            let path = ExplainPath::Existing {
                backend,
                idle_ms: idle_ns / 1_000_000,
                client_closed: closed(flow.seen()),
                backend_closed: closed(reply_seen),
            };
            return Ok((path, vec![backend]));
        }
    }
    let index = slot_table_index(entry.id, entry.active_table);
    let cursors = reader.cursors(entry.id)?;
    let ejected = |id| reader.ejected(id).unwrap_or(false);
    let hashed = entry.flags & SERVICE_MAGLEV != 0;
    let (slots, picks) = if hashed {
        let ids = reader
            .maglev_table(index)?
            .map_or_else(Vec::new, |t| t.used().to_vec());
        (
            ids.len() as u32,
            hashed_picks(cursors.len(), &ids, key.hash(), ejected),
        )
    } else {
        let table = reader.slot_table(index)?;
        let ids = table.used();
        (ids.len() as u32, next_picks(&cursors, ids, ejected))
    };
    if picks.is_empty() {
        return Ok((ExplainPath::NoBackend, Vec::new()));
    }
    let addr_of = |id: u32| {
        reader
            .backend_entry(id)
            .map(|b| SocketAddr::new(words_addr(&b.addr), u16::from_be(b.port_be)))
    };
    let mut named = Vec::new();
    let mut by_cpu = Vec::new();
    for p in picks {
        let backend = addr_of(p.backend_id)?;
        if !named.contains(&backend) {
            named.push(backend);
        }
        by_cpu.push(CpuChoice {
            cpu: p.cpu,
            slot: p.slot,
            backend,
            skipped: p
                .skipped
                .into_iter()
                .map(addr_of)
                .collect::<Result<_, _>>()?,
        });
    }
    let path = ExplainPath::New {
        stale,
        slots,
        hashed,
        by_cpu,
    };
    Ok((path, named))
}
