//! The VIPs' routes: traffic for a VIP that the data plane does not steer never loops.
//!
//! A VIP is no address of this host. Traffic for it that the XDP program passes to the kernel
//! (a port no service listens on, ICMP, fragments, late packets of a removed service) is
//! routed by the kernel's own table, whose default route usually leads back to the router that
//! sent it here, which sends it here again, until its TTL runs out. So the daemon keeps one
//! `unreachable` route per VIP (a /32 or /128 in the main table of its network namespace):
//! the kernel drops such packets and answers with ICMP destination unreachable, as a router
//! with no way to the destination does, and counts them (`ip -s` / `InNoRoutes`, or the
//! ICMP out counters). Routes carry orch's protocol number, [`PROTOCOL`], so orch finds and
//! removes only its own, and an operator can list them (`ip route show proto 79`).
//!
//! The routes change far less often than packets flow and only need to be right eventually,
//! so a task of their own keeps them in line with the latest set of VIPs, off the daemon's
//! event loop. The routes stay when the daemon stops, like the data plane: the next daemon
//! adopts them.

use std::{collections::BTreeSet, net::IpAddr};

use futures_util::TryStreamExt;
use rtnetlink::{
    packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType},
    Handle, IpVersion, RouteMessageBuilder,
};
use tokio::sync::watch;
use tracing::{info, warn};

/// The route protocol number orch marks its routes with. Values above 4 are left to routing
/// daemons (`/etc/iproute2/rt_protos`); 79 is assigned to none of the usual ones.
pub const PROTOCOL: u8 = 79;

/// The VIPs whose routes the task keeps.
pub struct VipRoutes {
    want: watch::Sender<BTreeSet<IpAddr>>,
}

impl VipRoutes {
    /// Starts the task on the current tokio runtime. Without a netlink socket (a sandbox that
    /// forbids it) the routes are not kept, and a warning says so: the data plane works the
    /// same without them.
    pub fn start() -> VipRoutes {
        let (want, rx) = watch::channel(BTreeSet::new());
        match rtnetlink::new_connection() {
            Ok((conn, handle, _)) => {
                tokio::spawn(conn);
                tokio::spawn(keep(handle, rx));
            }
            Err(e) => warn!(error = %e, "no netlink socket: the VIPs get no unreachable routes"),
        }
        VipRoutes { want }
    }

    /// The VIPs to route from now on.
    pub fn set(&self, vips: BTreeSet<IpAddr>) {
        self.want.send_if_modified(|cur| {
            let changed = *cur != vips;
            *cur = vips;
            changed
        });
    }
}

/// Brings the routes in line with each new set of VIPs.
async fn keep(handle: Handle, mut rx: watch::Receiver<BTreeSet<IpAddr>>) {
    loop {
        let want = rx.borrow_and_update().clone();
        if let Err(e) = sync(&handle, &want).await {
            warn!(error = %e, "updating the VIPs' unreachable routes failed");
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

async fn sync(handle: &Handle, want: &BTreeSet<IpAddr>) -> Result<(), rtnetlink::Error> {
    let mut have = BTreeSet::new();
    for version in [IpVersion::V4, IpVersion::V6] {
        let query = match version {
            IpVersion::V4 => RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
            IpVersion::V6 => RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
        };
        let mut routes = handle.route().get(query).execute();
        while let Some(route) = routes.try_next().await? {
            if route.header.protocol == RouteProtocol::Other(PROTOCOL) {
                if let Some(dst) = destination(&route) {
                    have.insert(dst);
                }
            }
        }
    }
    let (mut added, mut removed) = (0, 0);
    for vip in want.difference(&have) {
        handle
            .route()
            .add(message(*vip))
            .replace()
            .execute()
            .await?;
        added += 1;
    }
    for vip in have.difference(want) {
        handle.route().del(message(*vip)).execute().await?;
        removed += 1;
    }
    if added + removed > 0 {
        info!(
            added,
            removed,
            vips = want.len(),
            "VIP unreachable routes updated"
        );
    }
    Ok(())
}

/// The unreachable host route of `vip`.
fn message(vip: IpAddr) -> RouteMessage {
    let prefix = if vip.is_ipv4() { 32 } else { 128 };
    RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(vip, prefix)
        .expect("a host prefix of the address's own family")
        .kind(RouteType::Unreachable)
        .protocol(RouteProtocol::Other(PROTOCOL))
        .build()
}

/// The destination of a host route, if `route` is one.
fn destination(route: &RouteMessage) -> Option<IpAddr> {
    route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(a)) => Some(IpAddr::V4(*a)),
        RouteAttribute::Destination(RouteAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
        _ => None,
    })
}
