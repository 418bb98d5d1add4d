//! The route generation: when the kernel's forwarding changes, cached next hops go.
//!
//! Each connection-table entry caches what the kernel's FIB answered for its packets (a
//! redirect, or the stack: `orch_common::maps::CachedHop`), valid while the generation in
//! `ORCH_ROUTE_GEN_V1` is the one it was filled under. A task listens to the kernel's routing
//! notifications (rtnetlink) and moves the generation whenever what a lookup answers may
//! have changed:
//! - a route, a nexthop object or a routing rule added or removed (IPv4, IPv6);
//! - an address added or removed (it may make a destination local);
//! - a link changed (down, new MTU, new MAC, deleted);
//! - a neighbour's link-layer address changed, or the neighbour failed or went away. A
//!   neighbour's other state changes (reachable, stale, probing: several a minute per
//!   neighbour on a busy host) leave the answer as it was and move nothing: the task keeps
//!   the last address it saw per neighbour to tell.
//!
//! The generation moves at once, from the task, not through the daemon's loop. A lost
//! notification (the socket's buffer overflowed) costs at most the program's own bound: it
//! looks each connection's route up again at least every touch interval (a second).

use std::{
    collections::HashMap as StdHashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use aya::maps::{Array, MapData};
use futures_util::StreamExt;
use orch_common::maps::ROUTE_GEN_MAP;
use rtnetlink::{
    constants::{
        RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE, RTMGRP_IPV4_RULE, RTMGRP_IPV6_IFADDR,
        RTMGRP_IPV6_ROUTE, RTMGRP_LINK, RTMGRP_NEIGH,
    },
    packet_core::NetlinkPayload,
    packet_route::{
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
        RouteNetlinkMessage,
    },
    sys::{AsyncSocket, SocketAddr},
};
use tracing::{debug, warn};

use super::{map_err, DataplaneError};

/// `RTNLGRP_IPV6_RULE` and `RTNLGRP_NEXTHOP` (linux/rtnetlink.h) as group bits: not among
/// rtnetlink's constants. (Nexthop objects change without a route notification when
/// `nexthop_compat_mode` is off.)
const RTMGRP_IPV6_RULE: u32 = 1 << (19 - 1);
const RTMGRP_NEXTHOP: u32 = 1 << (32 - 1);

/// The route generation map, shared by the data plane and the watcher task.
#[derive(Clone)]
pub struct RouteGen(Arc<Mutex<Array<MapData, u32>>>);

impl RouteGen {
    pub(super) fn new(map: Array<MapData, u32>) -> Self {
        Self(Arc::new(Mutex::new(map)))
    }

    /// Moves the generation: every cached next hop is looked up again on its next packet.
    /// Never 0, which marks an empty cache. (Two movers that race both leave a generation
    /// other than the one before, which is all a cache compares with.)
    pub fn bump(&self) -> Result<u32, DataplaneError> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let now = map.get(&0, 0).map_err(map_err(ROUTE_GEN_MAP))?;
        let next = match now.wrapping_add(1) {
            0 => 1,
            n => n,
        };
        map.set(0, next, 0).map_err(map_err(ROUTE_GEN_MAP))?;
        Ok(next)
    }

    /// The current generation.
    pub fn current(&self) -> Result<u32, DataplaneError> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&0, 0).map_err(map_err(ROUTE_GEN_MAP))
    }
}

/// Starts the watcher on the current tokio runtime. Without a netlink socket a warning says
/// so, and cached next hops live by the program's own bound alone.
pub fn watch(generation: RouteGen) {
    let groups = RTMGRP_LINK
        | RTMGRP_NEIGH
        | RTMGRP_IPV4_IFADDR
        | RTMGRP_IPV4_ROUTE
        | RTMGRP_IPV4_RULE
        | RTMGRP_IPV6_IFADDR
        | RTMGRP_IPV6_ROUTE
        | RTMGRP_IPV6_RULE
        | RTMGRP_NEXTHOP;
    let (mut conn, _handle, mut messages) = match rtnetlink::new_connection() {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "no netlink socket: cached next hops are refreshed every second only");
            return;
        }
    };
    if let Err(e) = conn
        .socket_mut()
        .socket_mut()
        .bind(&SocketAddr::new(0, groups))
    {
        warn!(error = %e, "cannot listen to routing changes: cached next hops are refreshed every second only");
        return;
    }
    tokio::spawn(conn);
    tokio::spawn(async move {
        let mut neighbours = Neighbours::default();
        while let Some((message, _)) = messages.next().await {
            let moves = match message.payload {
                NetlinkPayload::InnerMessage(m) => neighbours.moves(&m),
                // An error or an overrun: anything may have changed.
                _ => true,
            };
            if moves {
                match generation.bump() {
                    Ok(g) => debug!(generation = g, "routing changed"),
                    Err(e) => warn!(error = %e, "moving the route generation failed"),
                }
            }
        }
        warn!("routing notifications stopped: cached next hops are refreshed every second only");
    });
}

/// The link-layer address last seen of each neighbour (by interface and address), `None`
/// while it has none (incomplete, failed).
#[derive(Default)]
struct Neighbours(StdHashMap<(u32, IpAddr), Option<Vec<u8>>>);

impl Neighbours {
    /// Whether `m` may change what a FIB lookup answers.
    fn moves(&mut self, m: &RouteNetlinkMessage) -> bool {
        match m {
            RouteNetlinkMessage::NewNeighbour(n) => match key_of(n) {
                Some(key) => {
                    let now = lladdr_of(n);
                    self.0.insert(key, now.clone()) != Some(now)
                }
                None => false,
            },
            RouteNetlinkMessage::DelNeighbour(n) => {
                if let Some(key) = key_of(n) {
                    self.0.remove(&key);
                }
                key_of(n).is_some()
            }
            _ => true,
        }
    }
}

/// An IP neighbour's interface and address; `None` for other families (bridge FDB entries
/// come on the same group).
fn key_of(n: &NeighbourMessage) -> Option<(u32, IpAddr)> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
            Some((n.header.ifindex, IpAddr::V4(*v4)))
        }
        NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
            Some((n.header.ifindex, IpAddr::V6(*v6)))
        }
        _ => None,
    })
}

/// The neighbour's link-layer address if a lookup would use it (the kernel's `NUD_VALID`).
fn lladdr_of(n: &NeighbourMessage) -> Option<Vec<u8>> {
    let valid = matches!(
        n.header.state,
        NeighbourState::Reachable
            | NeighbourState::Stale
            | NeighbourState::Delay
            | NeighbourState::Probe
            | NeighbourState::Permanent
            | NeighbourState::Noarp
    );
    if !valid {
        return None;
    }
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(mac) => Some(mac.clone()),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_route::neighbour::NeighbourHeader;

    fn neighbour(state: NeighbourState, mac: Option<[u8; 6]>) -> NeighbourMessage {
        let mut n = NeighbourMessage::default();
        n.header = NeighbourHeader {
            ifindex: 7,
            state,
            ..Default::default()
        };
        n.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
                "198.18.1.3".parse().unwrap(),
            )));
        if let Some(mac) = mac {
            n.attributes
                .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        }
        n
    }

    #[test]
    fn only_a_neighbours_address_changes_move_the_generation() {
        let mut seen = Neighbours::default();
        let new = |n| RouteNetlinkMessage::NewNeighbour(n);
        let mac = [2, 0, 0, 0, 0, 3];
        assert!(seen.moves(&new(neighbour(NeighbourState::Reachable, Some(mac)))));
        // Reachable -> stale -> probe -> reachable with the same address: nothing to do.
        for state in [
            NeighbourState::Stale,
            NeighbourState::Probe,
            NeighbourState::Reachable,
        ] {
            assert!(!seen.moves(&new(neighbour(state, Some(mac)))));
        }
        // A new address (a container restarted with the same IP) or a failure moves it.
        assert!(seen.moves(&new(neighbour(
            NeighbourState::Reachable,
            Some([2, 0, 0, 0, 0, 4])
        ))));
        assert!(seen.moves(&new(neighbour(NeighbourState::Failed, None))));
        assert!(seen.moves(&RouteNetlinkMessage::DelNeighbour(neighbour(
            NeighbourState::None,
            None
        ))));
        // Anything else that routing notifications carry moves it.
        assert!(seen.moves(&RouteNetlinkMessage::NewRoute(Default::default())));
    }
}
