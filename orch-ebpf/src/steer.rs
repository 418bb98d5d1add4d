//! The decision for each packet: forward to a backend, translate a reply, or pass.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use orch_common::{
    maps::{
        BackendKey, BackendSignals, FlowKey, FlowValue, ServiceKey, ServiceValue, TrafficCounters,
        DIR_REPLY, PORTS_BACKEND, PORTS_VIP, SERVICE_MAGLEV, TCP_ACK, TCP_RST, TCP_SYN,
    },
    Reason, IPPROTO_TCP, IPPROTO_UDP,
};

use crate::{
    balance, clock, conntrack, fib, frag,
    frame::Frame,
    icmp,
    maps::{settings, BACKEND_STATS, MAGLEV_REPLY, PORTS, SCRATCH, SERVICES, SERVICE_STATS},
    nat::{self, Side},
    parse::{self, Packet},
    stats,
};

/// Returns the XDP action and the reason to count.
#[inline(always)]
pub fn steer<F: Frame>(ctx: &F) -> (u32, Reason) {
    verdict::<F>(try_steer(ctx))
}

/// The action and reason of a step's result: an `Err` is a packet we are not translating.
///
/// Subprograms return this pair ([`Packed`]) rather than a `Result`: the kernel checks the
/// program's BTF type information, which describes a function's return type, and rejects
/// the union a Rust enum becomes when its tag hides in a field's spare values
/// (`Result<Option<_>, _>`).
#[inline(always)]
fn verdict<F: Frame>(r: Result<(u32, Reason), Reason>) -> (u32, Reason) {
    match r {
        Ok(verdict) => verdict,
        Err(reason) => (action_for::<F>(reason), reason),
    }
}

/// An action and a reason in one register, as the subprograms return them. A pair is
/// returned through the caller's memory, and the compiler may then leave a pointer into the
/// caller's stack in R0 at the return, which the verifier refuses ("cannot return stack
/// pointer to the caller").
#[derive(Clone, Copy)]
#[repr(transparent)]
struct Packed(u64);

impl Packed {
    /// What [`established`] returns for a packet of no known connection: no action.
    const NO_CONNECTION: Packed = Packed(u64::MAX);

    #[inline(always)]
    fn new((action, reason): (u32, Reason)) -> Self {
        Packed(u64::from(action) << 32 | reason as u64)
    }

    #[inline(always)]
    fn get(self) -> (u32, Reason) {
        let reason = Reason::ALL
            .get(self.0 as u32 as usize)
            .copied()
            .unwrap_or(Reason::DropInternal);
        ((self.0 >> 32) as u32, reason)
    }
}

/// What to do with a packet we are not translating: drop it if we decided to drop it,
/// otherwise hand it to the kernel, which knows how to handle (or reject) it.
#[inline(always)]
fn action_for<F: Frame>(reason: Reason) -> u32 {
    match reason {
        Reason::DropNoBackend
        | Reason::DropConntrackFull
        | Reason::DropInternal
        | Reason::DropRefused
        | Reason::DropTcpNoFlow
        | Reason::DropReplyInterface
        | Reason::DropReplyCollision => F::DROP,
        _ => F::PASS,
    }
}

#[inline(always)]
fn try_steer<F: Frame>(ctx: &F) -> Result<(u32, Reason), Reason> {
    ctx.prepare();
    let pkt = match parse::parse(ctx) {
        Ok(pkt) => pkt,
        // ICMP errors about balanced connections are translated too.
        Err(Reason::PassOtherProtocol) => return Ok(icmp::steer(ctx)),
        // Fragments of balanced connections' datagrams too.
        Err(Reason::PassFragment) => return Ok(frag::steer(ctx)),
        Err(reason) => return Err(reason),
    };

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
        // The connection table first: an established packet whose service lives needs no
        // service lookup (see `balance::find`).
        let done = established(ctx, &pkt);
        if done.0 != Packed::NO_CONNECTION.0 {
            return Ok(done.get());
        }
        let key = ServiceKey {
            vip: pkt.dst,
            port_be: pkt.dst_port_be,
            proto: pkt.proto,
            _pad: 0,
        };
        // SAFETY: the value is copied out at once; the daemon replaces whole values.
        if let Some(svc) = unsafe { SERVICES.get(key) }.copied() {
            return open(ctx, &pkt, &svc);
        }
    }
    not_forwarded(ctx, &pkt, maybe_reply)
}

/// A packet that is no client's packet for a VIP: a backend's, if its source port may be
/// one (`maybe_reply`), or not a service's.
#[inline(always)]
fn not_forwarded<F: Frame>(
    ctx: &F,
    pkt: &Packet,
    maybe_reply: bool,
) -> Result<(u32, Reason), Reason> {
    if maybe_reply {
        return Ok(backend_packet(ctx, pkt).get());
    }
    Err(Reason::PassNotService)
}

/// A packet from a backend's port: translated back to the VIP if it belongs to a balanced
/// connection, passed as `pass_not_service` if it does not.
///
/// Not inlined, for the stack (see [`open`]).
#[inline(never)]
fn backend_packet<F: Frame>(ctx: &F, pkt: &Packet) -> Packed {
    Packed::new(verdict::<F>(
        translate_reply(ctx, pkt).and_then(|v| v.ok_or(Reason::PassNotService)),
    ))
}

/// [`backend_packet`]'s work: `None` when the packet belongs to no balanced connection.
#[inline(always)]
fn translate_reply<F: Frame>(ctx: &F, pkt: &Packet) -> Result<Option<(u32, Reason)>, Reason> {
    let key = pkt.key(DIR_REPLY);
    let Some((entry, confirmed)) = conntrack::get(&key) else {
        return stateless_reply(ctx, pkt);
    };
    // SAFETY: a live map value, updated only by whole-word and single-byte stores.
    let entry = unsafe { &mut *entry };
    // A reverse-path check: the backend's packets come from where it is routed. Anything
    // else claiming its address (a host on the client side, say) is neither translated
    // towards a client nor read as the backend's answer.
    if entry.ifindex != 0 && entry.ifindex != ctx.ifindex() {
        return Err(Reason::DropReplyInterface);
    }
    if pkt.proto == IPPROTO_TCP && entry.synack == 0 {
        handshake(ctx, &key, entry, pkt)?;
    } else if pkt.tcp_flags & TCP_RST != 0 {
        // The backend reset an established connection. The client sends nothing more on
        // it, so mark its forward entry too: a SYN that reuses the port is then a new
        // connection, not one for this (perhaps dead) backend.
        if let Some((forward, _)) = conntrack::get(&key.forward_of(entry)) {
            // SAFETY: as above.
            balance::record_flags(unsafe { &mut *forward }, TCP_RST);
        }
    }
    balance::record_flags(entry, pkt.tcp_flags);
    let settings = settings();
    if pkt.proto == IPPROTO_UDP {
        // A UDP flow may carry only replies for a while (a server pushing): they keep it
        // alive. (A TCP peer acknowledges what it receives, which refreshes the forward
        // entry, so TCP replies need no clock read.)
        // The coarse clock, as for the client's packets (see `balance::find`).
        let now = clock::coarse_ns();
        if now.saturating_sub(entry.last_seen_ns) > settings.touch_interval_ns {
            entry.last_seen_ns = now;
            // The cached next hop is looked up again with each refresh (see `CachedHop`).
            entry.hop.gen = 0;
        }
        // A UDP flow the backend answers is confirmed (TCP: by the client's ACK).
        if !confirmed {
            let fwd_key = key.forward_of(entry);
            if let Some((fwd, false)) = conntrack::get(&fwd_key) {
                // SAFETY: a live map value, handed on as the value to copy.
                conntrack::confirm(&fwd_key, unsafe { &*fwd });
            }
        }
    }
    let (vip, port_be) = (entry.nat_addr, entry.nat_port_be);
    let (service_id, backend_id) = (entry.service_id, entry.backend_id);
    let hop = fib::decide(
        ctx,
        pkt,
        (&vip, &pkt.dst),
        &settings,
        None,
        Some(&raw mut entry.hop),
    );
    if let Some(untouched) = for_the_stack::<F>(&hop) {
        return Ok(Some(untouched));
    }
    if !nat::rewrite(ctx, pkt, Side::Src, &vip, port_be) {
        return Err(Reason::DropInternal);
    }
    Ok(Some(deliver(ctx, pkt, (service_id, backend_id), true, hop)))
}

/// A backend's packet that no connection-table entry knows: translated back to its VIP
/// without state when the backend serves one Maglev service (the daemon lists those in
/// `MAGLEV_REPLY`), the counterpart of [`balance::stateless`]; `None` otherwise. It must
/// arrive where the route to the backend leaves (the reverse-path check the entries make
/// with their interface): a packet from elsewhere that claims a backend's address is not
/// ours to translate.
#[inline(always)]
fn stateless_reply<F: Frame>(ctx: &F, pkt: &Packet) -> Result<Option<(u32, Reason)>, Reason> {
    let key = BackendKey {
        addr: pkt.src,
        port_be: pkt.src_port_be,
        proto: pkt.proto,
        _pad: 0,
    };
    // By reference: given the key by value, the lookup's code leaves a pointer into this
    // frame where the verifier reads it as returned to the caller, and refuses it.
    #[allow(clippy::needless_borrows_for_generic_args)]
    // SAFETY: copied out at once; the daemon replaces whole values.
    let Some(r) = (unsafe { MAGLEV_REPLY.get(&key) }).copied() else {
        return Ok(None);
    };
    if fib::lookup(ctx, pkt, &pkt.dst, &pkt.src).is_none_or(|route| route.egress() != ctx.ifindex())
    {
        return Ok(None);
    }
    let hop = fib::decide(ctx, pkt, (&r.vip, &pkt.dst), &settings(), None, None);
    if let Some(untouched) = for_the_stack::<F>(&hop) {
        return Ok(Some(untouched));
    }
    if !nat::rewrite(ctx, pkt, Side::Src, &r.vip, r.port_be) {
        return Err(Reason::DropInternal);
    }
    Ok(Some(deliver(
        ctx,
        pkt,
        (r.service_id, r.backend_id),
        true,
        hop,
    )))
}

/// A backend's first answers to a balanced SYN, recognised by what they acknowledge: the
/// client's SYN sequence number plus one. A SYN-ACK gives the handshake latency (from the
/// entry's creation, the SYN's time) and the backend's sequence number; a RST is a refusal. The
/// refusing backend is ejected from selection, the RST dropped and the flow forgotten, so the
/// client's SYN retransmission (about a second later) is balanced again onto a backend that
/// is up, instead of the client seeing "connection refused".
///
/// Any other RST (one that acknowledges something else, or nothing) is not an answer to our
/// SYN: it is translated and passed on like any packet of the connection, and ejects nobody.
#[inline(always)]
fn handshake<F: Frame>(
    ctx: &F,
    key: &FlowKey,
    entry: &mut FlowValue,
    pkt: &Packet,
) -> Result<(), Reason> {
    let flags = pkt.tcp_flags;
    if flags & TCP_ACK == 0 || flags & (TCP_SYN | TCP_RST) == 0 {
        return Ok(());
    }
    if pkt.tcp_ack(ctx)? != entry.syn_next {
        return Ok(());
    }
    if flags & TCP_SYN != 0 {
        // SAFETY: a helper without arguments.
        let now = unsafe { bpf_ktime_get_ns() };
        let latency = now.saturating_sub(entry.created_ns);
        entry.synack = 1;
        // The client's side learns the backend's sequence number: the client's segment
        // that acknowledges it confirms the connection.
        let seq = pkt.tcp_seq(ctx)?;
        if let Some((fwd, _)) = conntrack::get(&key.forward_of(entry)) {
            // SAFETY: a live map value; one aligned word store.
            unsafe { (*fwd).peer_next = seq.wrapping_add(1) };
        }
        stats::signals(entry.backend_id, |s| {
            s.last_synack_ns = now;
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
        conntrack::remove(&key.forward_of(entry));
        conntrack::remove(key);
        return Err(Reason::DropRefused);
    }
    Ok(())
}

/// A client's packet for a VIP that no connection-table entry knows: balance it as a new
/// connection to `svc` if it may open one, rewrite, forward.
///
/// The stack: BPF gives a program 512 bytes for the whole chain of calls, and these paths
/// need more than that when inlined into one function (every value live across a helper
/// call is spilled: BPF has four callee-saved registers). So each step is a subprogram with
/// a frame of its own, called one after the other from the entry point, not from each
/// other (a step may call a small helper subprogram, such as `conntrack::confirm`, whose
/// frame fits beside it): the deepest chain is the entry point, one step and at most one
/// such helper. The steps hand the connection's forward entry over as a pointer into its
/// map.
#[inline(always)]
fn open<F: Frame>(ctx: &F, pkt: &Packet, svc: &ServiceValue) -> Result<(u32, Reason), Reason> {
    let (id_table, flags) = balance::service_words(svc);
    let (flow, entry) = if let Err(stray) = balance::opens(pkt) {
        if flags & SERVICE_MAGLEV == 0 {
            return Err(stray);
        }
        // Maglev: where the table says, without state.
        (balance::stateless(pkt, id_table)?, Entry::Stateless)
    } else {
        (balance::new_flow(ctx, pkt, id_table, flags)?, Entry::New)
    };
    // SAFETY: this CPU's scratch entry, alive for the rest of this run.
    Ok(translate_forward(ctx, pkt, unsafe { &mut *flow }, entry).get())
}

/// A client's packet of a connection in the table whose service lives: translated to its
/// backend and forwarded. [`Packed::NO_CONNECTION`] when there is none, and the packet may
/// open one.
///
/// The lookup and the forwarding in one subprogram, where two would do for the stack: on a
/// CPU that mitigates return-stack speculation (AMD's "Safe RET"), every return from a
/// function pays a misprediction, and a `perf record -e cpu-clock` profile of `packet_cost`
/// puts the samples of an established packet right after each return. One return fewer.
#[inline(never)]
fn established<F: Frame>(ctx: &F, pkt: &Packet) -> Packed {
    let flow = balance::find(ctx, pkt);
    if flow.is_null() {
        return Packed::NO_CONNECTION;
    }
    // SAFETY: the connection's map entry, alive for the rest of this run.
    let flow = unsafe { &mut *flow };
    Packed::new(forward_to(ctx, pkt, flow, Entry::Established))
}

/// What kind of entry [`forward_to`] is handed (by [`established`], or by
/// [`translate_forward`] for a new connection): it decides where the route comes from and
/// whether the next hop may be cached.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Entry {
    /// The connection's entry in the table: its cached next hop is used or refilled.
    Established,
    /// A new connection's first packet, in this CPU's scratch entry: its route was looked up
    /// when its backend was chosen, and is reused.
    New,
    /// A Maglev service's segment without an entry, in this CPU's scratch entry.
    Stateless,
}

/// Rewrites a client's packet to the backend of its connection's entry `flow` and forwards
/// it.
#[inline(never)]
fn translate_forward<F: Frame>(
    ctx: &F,
    pkt: &Packet,
    flow: &mut FlowValue,
    entry: Entry,
) -> Packed {
    Packed::new(forward_to(ctx, pkt, flow, entry))
}

/// [`translate_forward`]'s work.
#[inline(always)]
fn forward_to<F: Frame>(
    ctx: &F,
    pkt: &Packet,
    flow: &mut FlowValue,
    entry: Entry,
) -> (u32, Reason) {
    let route = if entry == Entry::New {
        SCRATCH.get(0).and_then(|w| fib::Route::last(w.route_rc))
    } else {
        None
    };
    let cache = (entry == Entry::Established).then_some(&raw mut flow.hop);
    let (addr, port_be) = (flow.nat_addr, flow.nat_port_be);
    let ids = (flow.service_id, flow.backend_id);
    let hop = fib::decide(ctx, pkt, (&pkt.src, &addr), &settings(), route, cache);
    if let Some(untouched) = for_the_stack::<F>(&hop) {
        return untouched;
    }
    if !nat::rewrite(ctx, pkt, Side::Dst, &addr, port_be) {
        return verdict::<F>(Err(Reason::DropInternal));
    }
    deliver(ctx, pkt, ids, false, hop)
}

/// The verdict for a packet the kernel must answer (too big, TTL), left as it came; `None`
/// for one we translate.
#[inline(always)]
fn for_the_stack<F: Frame>(hop: &fib::Hop) -> Option<(u32, Reason)> {
    hop.answered_by_stack().map(|reason| (F::PASS, reason))
}

/// Counts a translated packet for its service and backend (ids), then forwards it to
/// `hop`: redirected when the FIB knows the way, otherwise to the kernel stack.
#[inline(always)]
fn deliver<F: Frame>(
    ctx: &F,
    pkt: &Packet,
    (service_id, backend_id): (u32, u32),
    reply: bool,
    hop: fib::Hop,
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
    stats::traffic(&SERVICE_STATS, service_id, count);
    stats::traffic(&BACKEND_STATS, backend_id, count);
    let (redirected, stacked) = if reply {
        (Reason::ReplyRedirect, Reason::ReplyStack)
    } else {
        (Reason::FwdRedirect, Reason::FwdStack)
    };
    let (action, sent) = fib::forward(ctx, pkt, hop);
    (action, if sent { redirected } else { stacked })
}
