//! Socket-level balancing, for clients on the load balancer's own host (and its
//! containers): a `connect()` to a VIP is rewritten to the chosen backend before the socket
//! connects, so the connection's packets need no translation at all; `getpeername()` still
//! answers the VIP.
//!
//! The choice is [`balance::pick`]'s, the packet path's rule: the service's active slot
//! table, this CPU's cursor, ejected backends skipped. Health, drain, weights and panic are
//! in the table the daemon writes, so they apply here unchanged.

use aya_ebpf::{
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_ns},
    programs::SockAddrContext,
    EbpfContext,
};
use orch_common::{
    maps::{v4_mapped, ServiceKey, SockEvent, SockFlow, SockFlowKey, SockPeer},
    IPPROTO_UDP,
};

use crate::{
    balance,
    maps::{
        settings, BACKENDS, BACKEND_STATS, SERVICES, SERVICE_STATS, SOCK_PEERS, SOCK_UDP,
        SOCK_UDP_REV,
    },
    stats,
};

/// The address family a program serves.
#[derive(Clone, Copy)]
pub enum Family {
    V4,
    V6,
}

/// The destination `ctx` holds, as the maps' address words, and its port (network order).
#[inline(always)]
fn destination(ctx: &SockAddrContext, family: Family) -> ([u32; 4], u16) {
    // SAFETY: the kernel's context for this program; every field read is a 4-byte load,
    // the width the verifier allows for these fields.
    unsafe {
        let sa = &*ctx.sock_addr;
        let addr = match family {
            Family::V4 => v4_mapped(sa.user_ip4),
            Family::V6 => [
                sa.user_ip6[0],
                sa.user_ip6[1],
                sa.user_ip6[2],
                sa.user_ip6[3],
            ],
        };
        // The port is in network order in the field's low 16 bits.
        (addr, sa.user_port as u16)
    }
}

/// Writes `addr`:`port_be` as the destination.
#[inline(always)]
fn set_destination(ctx: &SockAddrContext, family: Family, addr: &[u32; 4], port_be: u16) {
    // SAFETY: as in `destination`; these fields are writable from connect and getpeername.
    unsafe {
        let sa = &mut *ctx.sock_addr;
        match family {
            Family::V4 => sa.user_ip4 = addr[3],
            Family::V6 => {
                sa.user_ip6[0] = addr[0];
                sa.user_ip6[1] = addr[1];
                sa.user_ip6[2] = addr[2];
                sa.user_ip6[3] = addr[3];
            }
        }
        sa.user_port = u32::from(port_be);
    }
}

/// `connect()`: a VIP becomes the next backend. Anything else is left alone.
#[inline(always)]
pub fn connect(ctx: &SockAddrContext, family: Family) {
    let (vip, port_be) = destination(ctx, family);
    // SAFETY: as in `destination`.
    let proto = unsafe { (*ctx.sock_addr).protocol } as u8;
    let key = ServiceKey {
        vip,
        port_be,
        proto,
        _pad: 0,
    };
    // SAFETY: a lookup in a map of plain values.
    let Some(svc) = (unsafe { SERVICES.get(key) }) else {
        return;
    };
    let Ok(pick) = balance::pick(svc, None) else {
        stats::sock(SockEvent::NoBackend);
        return;
    };
    let Some(backend) = BACKENDS.get(pick.backend_id) else {
        return;
    };
    // SAFETY: the helper takes the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let peer = SockPeer {
        vip,
        port_be,
        _pad: 0,
    };
    // Best effort: without the entry `getpeername()` shows the backend, nothing breaks.
    let _ = SOCK_PEERS.insert(cookie, peer, 0);
    set_destination(ctx, family, &backend.addr, backend.port_be);
    stats::traffic(&SERVICE_STATS, svc.id, |c| c.new_conns += 1);
    stats::traffic(&BACKEND_STATS, pick.backend_id, |c| c.new_conns += 1);
    stats::sock(SockEvent::Connect);
}

/// `getpeername()`: a socket balanced at connect time names its VIP, not its backend.
#[inline(always)]
pub fn peername(ctx: &SockAddrContext, family: Family) {
    // SAFETY: the helper takes the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: a lookup in a map of plain values.
    if let Some(peer) = unsafe { SOCK_PEERS.get(cookie) } {
        set_destination(ctx, family, &peer.vip, peer.port_be);
        stats::sock(SockEvent::Peername);
    }
}

/// `sendmsg()` on an unconnected UDP socket, to a VIP: the datagram goes to the backend
/// this socket's flow to that VIP has (picked afresh when new or idle past the UDP idle
/// timeout), and the way back is remembered for [`recvmsg`].
#[inline(always)]
pub fn sendmsg(ctx: &SockAddrContext, family: Family) {
    let (vip, port_be) = destination(ctx, family);
    let key = ServiceKey {
        vip,
        port_be,
        proto: IPPROTO_UDP,
        _pad: 0,
    };
    // SAFETY: a lookup in a map of plain values.
    let Some(svc) = (unsafe { SERVICES.get(key) }) else {
        return;
    };
    // SAFETY: the helpers take the program's own context, or nothing.
    let (cookie, now) = unsafe { (bpf_get_socket_cookie(ctx.as_ptr()), bpf_ktime_get_ns()) };
    let flow_key = SockFlowKey {
        cookie,
        addr: vip,
        port_be,
        _pad: [0; 6],
    };
    // SAFETY: a lookup in a map of plain values.
    let known = unsafe { SOCK_UDP.get(flow_key) }
        .copied()
        .filter(|f| now.saturating_sub(f.last_ns) <= settings().udp_idle_ns);
    let flow = match known {
        Some(f) => f,
        None => {
            let Ok(pick) = balance::pick(svc, None) else {
                stats::sock(SockEvent::NoBackend);
                return;
            };
            let Some(backend) = BACKENDS.get(pick.backend_id) else {
                return;
            };
            stats::traffic(&SERVICE_STATS, svc.id, |c| c.new_conns += 1);
            stats::traffic(&BACKEND_STATS, pick.backend_id, |c| c.new_conns += 1);
            SockFlow {
                addr: backend.addr,
                port_be: backend.port_be,
                _pad: 0,
                backend_id: pick.backend_id,
                last_ns: now,
            }
        }
    };
    let fresh = SockFlow {
        last_ns: now,
        ..flow
    };
    let back_key = SockFlowKey {
        cookie,
        addr: flow.addr,
        port_be: flow.port_be,
        _pad: [0; 6],
    };
    let back = SockFlow {
        addr: vip,
        port_be,
        _pad: 0,
        backend_id: flow.backend_id,
        last_ns: now,
    };
    // Best effort: without them the next datagram is balanced afresh, or an answer shows
    // the backend's address.
    let _ = SOCK_UDP.insert(flow_key, fresh, 0);
    let _ = SOCK_UDP_REV.insert(back_key, back, 0);
    set_destination(ctx, family, &flow.addr, flow.port_be);
    stats::sock(SockEvent::Sendmsg);
}

/// `recvmsg()` on a UDP socket: a datagram from a backend this socket sent to as a VIP is
/// received as from the VIP.
#[inline(always)]
pub fn recvmsg(ctx: &SockAddrContext, family: Family) {
    let (addr, port_be) = destination(ctx, family);
    // SAFETY: the helper takes the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockFlowKey {
        cookie,
        addr,
        port_be,
        _pad: [0; 6],
    };
    // SAFETY: a lookup in a map of plain values.
    if let Some(vip) = unsafe { SOCK_UDP_REV.get(key) } {
        set_destination(ctx, family, &vip.addr, vip.port_be);
        stats::sock(SockEvent::Recvmsg);
    }
}
