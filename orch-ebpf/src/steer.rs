//! The decision for each packet: forward to a backend, translate a reply, or pass.

use aya_ebpf::{bindings::xdp_action, helpers::bpf_ktime_get_ns, programs::XdpContext};
use orch_common::{
    maps::{
        tcp_opens, BackendSignals, FlowKey, FlowValue, ServiceKey, ServiceValue, Settings,
        TrafficCounters, DIR_FORWARD, DIR_REPLY, TCP_ACK, TCP_RST, TCP_SYN,
    },
    maps::{PORTS_BACKEND, PORTS_VIP},
    Reason, IPPROTO_TCP,
};

use crate::{
    balance, fib,
    maps::{BACKEND_STATS, CONNTRACK, PORTS, SERVICES, SERVICE_STATS, SETTINGS},
    nat::{self, Side},
    parse::{self, Packet},
    stats,
};

/// Offsets of the sequence and acknowledgment numbers in the TCP header (RFC 9293).
const TCP_SEQ_OFF: usize = 4;
const TCP_ACK_SEQ_OFF: usize = 8;

/// Returns the XDP action and the reason to count.
#[inline(always)]
pub fn steer(ctx: &XdpContext) -> (u32, Reason) {
    match try_steer(ctx) {
        Ok(verdict) => verdict,
        Err(reason) => (action_for(reason), reason),
    }
}

/// What to do with a packet we are not translating: drop it if we decided to drop it,
/// otherwise hand it to the kernel, which knows how to handle (or reject) it.
#[inline(always)]
fn action_for(reason: Reason) -> u32 {
    match reason {
        Reason::DropNoBackend
        | Reason::DropConntrackFull
        | Reason::DropInternal
        | Reason::DropRefused
        | Reason::DropTcpNoFlow
        | Reason::DropReplyInterface
        | Reason::DropReplyCollision => xdp_action::XDP_DROP,
        _ => xdp_action::XDP_PASS,
    }
}

#[inline(always)]
fn try_steer(ctx: &XdpContext) -> Result<(u32, Reason), Reason> {
    let pkt = parse::parse(ctx)?;

    // Pre-filter on ports: traffic to ports no service listens on, from ports no backend
    // answers from, leaves after two array loads and no hash lookup.
    let dport = u16::from_be(pkt.dst_port_be);
    let sport = u16::from_be(pkt.src_port_be);
    let maybe_vip = PORTS.get(PORTS_VIP).is_some_and(|b| b.contains(dport));
    let maybe_reply = PORTS.get(PORTS_BACKEND).is_some_and(|b| b.contains(sport));
    if !maybe_vip && !maybe_reply {
        return Err(Reason::PassNotService);
    }

    if maybe_vip {
        let key = ServiceKey {
            vip: pkt.dst,
            port_be: pkt.dst_port_be,
            proto: pkt.proto,
            _pad: 0,
        };
        // SAFETY: the value is copied out at once; the daemon replaces whole values.
        if let Some(svc) = unsafe { SERVICES.get(key) } {
            let svc = *svc;
            return forward(ctx, &pkt, &svc);
        }
    }
    if maybe_reply {
        let key = FlowKey {
            src: pkt.src,
            dst: pkt.dst,
            src_port_be: pkt.src_port_be,
            dst_port_be: pkt.dst_port_be,
            proto: pkt.proto,
            dir: DIR_REPLY,
            _pad: 0,
        };
        if let Some(entry) = CONNTRACK.get_ptr_mut(key) {
            // SAFETY: a live map value, updated only by whole-word and single-byte stores.
            let entry = unsafe { &mut *entry };
            // A reverse-path check: the backend's packets come from where it is routed.
            // Anything else claiming its address (a host on the client side, say) is neither
            // translated towards a client nor read as the backend's answer.
            if entry.ifindex != 0 && entry.ifindex != ctx.ingress_ifindex() as u32 {
                return Err(Reason::DropReplyInterface);
            }
            if pkt.proto == IPPROTO_TCP && entry.synack == 0 {
                handshake(ctx, &key, entry, &pkt)?;
            } else if pkt.tcp_flags & TCP_RST != 0 {
                // The backend reset an established connection. The client sends nothing
                // more on it, so mark its forward entry too: a SYN that reuses the port is
                // then a new connection, not one for this (perhaps dead) backend.
                if let Some(forward) = CONNTRACK.get_ptr_mut(key.forward_of(entry)) {
                    // SAFETY: as above.
                    balance::record_flags(unsafe { &mut *forward }, TCP_RST);
                }
            }
            balance::record_flags(entry, pkt.tcp_flags);
            let flow = *entry;
            return reply(ctx, &pkt, &flow);
        }
    }
    Err(Reason::PassNotService)
}

/// A backend's first answers to a balanced SYN, recognised by what they acknowledge: the
/// client's SYN sequence number plus one. A SYN-ACK gives the handshake latency (the reply
/// entry's timestamp is the SYN's: replies never refresh it); a RST is a refusal. The
/// refusing backend is ejected from selection, the RST dropped and the flow forgotten, so the
/// client's SYN retransmission (about a second later) is balanced again onto a backend that
/// is up, instead of the client seeing "connection refused".
///
/// Any other RST (one that acknowledges something else, or nothing) is not an answer to our
/// SYN: it is translated and passed on like any packet of the connection, and ejects nobody.
#[inline(always)]
fn handshake(
    ctx: &XdpContext,
    key: &FlowKey,
    entry: &mut FlowValue,
    pkt: &Packet,
) -> Result<(), Reason> {
    let flags = pkt.tcp_flags;
    if flags & TCP_ACK == 0 || flags & (TCP_SYN | TCP_RST) == 0 {
        return Ok(());
    }
    let ack =
        parse::read::<u32>(ctx, pkt.l4_off() + TCP_ACK_SEQ_OFF).ok_or(Reason::PassTruncated)?;
    if u32::from_be(ack) != entry.syn_next {
        return Ok(());
    }
    if flags & TCP_SYN != 0 {
        // SAFETY: a helper without arguments.
        let latency = unsafe { bpf_ktime_get_ns() }.saturating_sub(entry.last_seen_ns);
        entry.synack = 1;
        stats::signals(entry.backend_id, |s| {
            s.handshakes += 1;
            s.handshake_ns += latency;
            let b = BackendSignals::bucket(latency);
            if b < s.handshake_hist.len() {
                s.handshake_hist[b] += 1;
            }
        });
    } else {
        stats::signals(entry.backend_id, |s| s.refused += 1);
        balance::eject(entry.backend_id);
        let _ = CONNTRACK.remove(key.forward_of(entry));
        let _ = CONNTRACK.remove(key);
        return Err(Reason::DropRefused);
    }
    Ok(())
}

#[inline(always)]
fn settings() -> Settings {
    SETTINGS.get(0).copied().unwrap_or_default()
}

/// A client's packet for a VIP: find or choose its backend, rewrite, forward.
#[inline(always)]
fn forward(ctx: &XdpContext, pkt: &Packet, svc: &ServiceValue) -> Result<(u32, Reason), Reason> {
    let settings = settings();
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let key = FlowKey {
        src: pkt.src,
        dst: pkt.dst,
        src_port_be: pkt.src_port_be,
        dst_port_be: pkt.dst_port_be,
        proto: pkt.proto,
        dir: DIR_FORWARD,
        _pad: 0,
    };
    let tcp = pkt.proto == IPPROTO_TCP;
    let flow = match balance::existing(&key, now, &settings, pkt.tcp_flags) {
        Some(flow) => flow,
        None => {
            // Only a SYN opens a connection (UDP: any datagram).
            if tcp && !tcp_opens(pkt.tcp_flags) {
                return Err(Reason::DropTcpNoFlow);
            }
            let syn_next = if tcp {
                let seq = parse::read::<u32>(ctx, pkt.l4_off() + TCP_SEQ_OFF)
                    .ok_or(Reason::PassTruncated)?;
                u32::from_be(seq).wrapping_add(1)
            } else {
                0
            };
            let new = balance::NewFlow {
                now,
                syn_next,
                udp_idle_ns: settings.udp_idle_ns,
            };
            balance::new_flow(&key, svc, &new, |backend| {
                fib::lookup(ctx, pkt, &pkt.src, backend).egress()
            })?
        }
    };
    if !nat::rewrite(ctx, pkt, Side::Dst, &flow.nat_addr, flow.nat_port_be) {
        return Err(Reason::DropInternal);
    }
    let targets = (&pkt.src, &flow.nat_addr);
    Ok(deliver(ctx, pkt, &flow, targets, &settings, false))
}

/// A backend's reply: restore the VIP as the source so the client sees only the VIP.
#[inline(always)]
fn reply(ctx: &XdpContext, pkt: &Packet, flow: &FlowValue) -> Result<(u32, Reason), Reason> {
    if !nat::rewrite(ctx, pkt, Side::Src, &flow.nat_addr, flow.nat_port_be) {
        return Err(Reason::DropInternal);
    }
    let targets = (&flow.nat_addr, &pkt.dst);
    Ok(deliver(ctx, pkt, flow, targets, &settings(), true))
}

/// Counts a translated packet (now from `src` to `dst`) for its service and backend, then
/// forwards it: redirected when the FIB knows the way, otherwise to the kernel stack.
#[inline(always)]
fn deliver(
    ctx: &XdpContext,
    pkt: &Packet,
    flow: &FlowValue,
    (src, dst): (&[u32; 4], &[u32; 4]),
    settings: &Settings,
    reply: bool,
) -> (u32, Reason) {
    let bytes = pkt.l3_len as u64;
    let count = |c: &mut TrafficCounters| {
        if reply {
            c.reply_packets += 1;
            c.reply_bytes += bytes;
        } else {
            c.fwd_packets += 1;
            c.fwd_bytes += bytes;
        }
    };
    stats::traffic(&SERVICE_STATS, flow.service_id, count);
    stats::traffic(&BACKEND_STATS, flow.backend_id, count);
    let (redirected, stacked) = if reply {
        (Reason::ReplyRedirect, Reason::ReplyStack)
    } else {
        (Reason::FwdRedirect, Reason::FwdStack)
    };
    match fib::redirect(ctx, pkt, src, dst, settings) {
        Some(action) => (action, redirected),
        None => (xdp_action::XDP_PASS, stacked),
    }
}
