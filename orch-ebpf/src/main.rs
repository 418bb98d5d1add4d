//! orch's kernel data plane.
//!
//! One balancer, built for two hooks: XDP (`orch_xdp`, on drivers that run XDP natively) and
//! TC ingress (`orch_tc`, on skbs: veths, bridges, VLANs), attached to every interface that
//! faces clients or backends (NAT mode: the load balancer is the backends' gateway). For each
//! packet it either
//! - steers a client's packet for a VIP to a backend (new connection: next round-robin slot;
//!   known connection: the backend in the connection table), rewriting the destination, or
//! - translates a backend's reply back to the VIP, or
//! - passes anything else to the kernel untouched, counting why.
//!
//! Layout: [`frame`] is what differs between the hooks, [`parse`] reads headers with bounds
//! checks, [`steer`] decides, [`balance`] picks backends, [`conntrack`] keeps connections
//! (unconfirmed, then confirmed), [`clock`] tells the time cheaply, [`nat`] rewrites
//! addresses and checksums, [`fib`] forwards, [`icmp`] translates ICMP errors about
//! balanced connections and [`frag`] their datagrams' fragments, [`sock`] balances local
//! clients' sockets at `connect()` (cgroup programs), [`maps`] declares the maps, [`stats`]
//! counts, [`log`] tells the operator (off unless asked for). Only `main.rs` has entry
//! points.
#![no_std]
#![no_main]

mod balance;
mod clock;
mod conntrack;
mod fib;
mod frag;
mod frame;
mod icmp;
mod log;
mod maps;
mod nat;
mod parse;
mod sock;
mod stats;
mod steer;

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK},
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};
use sock::Family;

/// The load balancer: attached to client- and backend-facing interfaces alike.
#[xdp]
pub fn orch_xdp(ctx: XdpContext) -> u32 {
    let (action, reason) = steer::steer(&ctx);
    stats::count(reason);
    log::verdict(&ctx, reason);
    action
}

/// The same balancer at TC ingress, on skbs: for devices where XDP cannot forward or cannot
/// keep checksums right (veth, bridges, VLANs: see `frame`).
#[classifier]
pub fn orch_tc(ctx: TcContext) -> i32 {
    let (action, reason) = steer::steer(&ctx);
    stats::count(reason);
    log::verdict(&ctx, reason);
    action as i32
}

/// Socket-level balancing (see `sock`): `connect()` to an IPv4 VIP, attached to a cgroup.
/// Always lets the call proceed (1); only its destination may change.
#[cgroup_sock_addr(connect4)]
pub fn orch_connect4(ctx: SockAddrContext) -> i32 {
    sock::connect(&ctx, Family::V4);
    1
}

/// [`orch_connect4`] for IPv6.
#[cgroup_sock_addr(connect6)]
pub fn orch_connect6(ctx: SockAddrContext) -> i32 {
    sock::connect(&ctx, Family::V6);
    1
}

/// `getpeername()` of a socket balanced at connect time: the VIP.
#[cgroup_sock_addr(getpeername4)]
pub fn orch_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::peername(&ctx, Family::V4);
    1
}

/// [`orch_getpeername4`] for IPv6.
#[cgroup_sock_addr(getpeername6)]
pub fn orch_getpeername6(ctx: SockAddrContext) -> i32 {
    sock::peername(&ctx, Family::V6);
    1
}

/// Unconnected UDP sockets sending to an IPv4 VIP: each datagram goes to its flow's backend.
#[cgroup_sock_addr(sendmsg4)]
pub fn orch_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::sendmsg(&ctx, Family::V4);
    1
}

/// [`orch_sendmsg4`] for IPv6.
#[cgroup_sock_addr(sendmsg6)]
pub fn orch_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock::sendmsg(&ctx, Family::V6);
    1
}

/// Answers to [`orch_sendmsg4`]'s datagrams: received as from the VIP.
#[cgroup_sock_addr(recvmsg4)]
pub fn orch_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::recvmsg(&ctx, Family::V4);
    1
}

/// [`orch_recvmsg4`] for IPv6.
#[cgroup_sock_addr(recvmsg6)]
pub fn orch_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::recvmsg(&ctx, Family::V6);
    1
}

/// The TC benchmark floor: one counter increment and TC_ACT_OK.
#[classifier]
pub fn orch_tc_floor(_ctx: TcContext) -> i32 {
    stats::count(orch_common::Reason::PassNotIp);
    TC_ACT_OK
}

/// The benchmark floor: one per-CPU counter increment and XDP_PASS. Benchmarks report the
/// balancer's cost as a ratio to this program's, measured in the same run.
#[xdp]
pub fn orch_floor(_ctx: XdpContext) -> u32 {
    stats::count(orch_common::Reason::PassNotIp);
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach here, so this is never executed.
    loop {}
}

/// `bpf_fib_lookup` and `bpf_redirect` are GPL-only helpers.
#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
