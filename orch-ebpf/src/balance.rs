//! Backend choice: the connection table first, then the service's table: its round-robin
//! slots, or for a Maglev service the slot its flow hashes to.

use aya_ebpf::helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns};
use orch_common::{
    maps::{
        slot_table_index, tcp_opens, FlowKey, FlowValue, ServiceKey, ServiceValue, DIR_FORWARD,
        SERVICE_MAGLEV, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
    },
    CtEvent, Reason, EJECTED_RETRIES, IPPROTO_TCP, IPPROTO_UDP, MAGLEV_SIZE, SLOTS_PER_TABLE,
};

use crate::{
    clock, conntrack, fib,
    frame::Frame,
    maps::{
        service_gen, settings, Work, BACKENDS, BACKEND_DOWN, BACKEND_STATS, CURSORS, MAGLEV,
        SCRATCH, SERVICES, SERVICE_STATS, SLOTS,
    },
    parse::Packet,
    stats,
};

/// Looks a client's packet up: the live connection's entry, with this packet's FIN/RST
/// recorded and, when due, a fresh timestamp; null when the packet must be balanced as a new
/// connection (if it may open one: see [`opens`]).
///
/// An entry that no longer holds is forgotten here: the client closed (FIN or RST) and sends
/// a SYN from the same port, or a UDP flow idled past its timeout; the packet is then
/// balanced afresh. An unconfirmed TCP connection whose client acknowledges the backend's
/// SYN-ACK is confirmed.
///
/// Inlined into its one caller, `steer::established`, a subprogram of its own (see
/// [`crate::steer`] on the stack). The entry is returned as a pointer into the map (valid
/// for the rest of the program's run), not copied.
/// Only a connection whose service lives is found (see [`service_lives`]); the entry of one
/// whose service is gone is left as it is (no timestamp, no flag, no backend signal) and null
/// returned, as if the connection table were looked up after the service table.
#[inline(always)]
pub fn find(ctx: &impl Frame, pkt: &Packet) -> *mut FlowValue {
    let key = pkt.key(DIR_FORWARD);
    let Some((entry, confirmed)) = conntrack::get(&key) else {
        return core::ptr::null_mut();
    };
    let ptr = entry;
    // SAFETY: a live map value; concurrent writers only store whole aligned words into
    // `last_seen_ns`/`peer_next` and single bytes into the flags; the rest is written once.
    let entry = unsafe { &mut *entry };
    if !service_lives(entry, pkt) {
        return core::ptr::null_mut();
    }
    let tcp = key.proto == IPPROTO_TCP;
    let flags = pkt.tcp_flags;
    if tcp && tcp_opens(flags) {
        // A bare SYN after the client closed (FIN or RST) is a new connection reusing the
        // port: balance it afresh rather than send it to the old connection's backend.
        if entry.fin != 0 || entry.rst != 0 {
            forget(&key, entry, confirmed);
            return core::ptr::null_mut();
        }
        // Before the backend's SYN-ACK, nothing binds the client to it yet.
        if entry.peer_next == 0 {
            // The same initial sequence number: the client retrying, its first SYN got no
            // answer (a sign against the backend). Another one: a new attempt on a reused
            // port, after an attempt the client gave up without a word.
            if pkt.tcp_seq(ctx).map(|s| s.wrapping_add(1)) == Ok(entry.syn_next) {
                stats::signals(entry.backend_id, |s| s.syn_retrans += 1);
            }
            // Either way it is balanced afresh: a backend that left the rotation (a host
            // gone dark) keeps no client waiting on it, and a live one may well be chosen
            // again.
            forget(&key, entry, confirmed);
            return core::ptr::null_mut();
        }
        // A SYN after the SYN-ACK: the client retrying, the SYN-ACK lost on the way.
        stats::signals(entry.backend_id, |s| s.syn_retrans += 1);
    }
    let settings = settings();
    // The coarse clock (the same monotonic clock, as of a tick or two ago, 1-20 ms behind):
    // idle times are counted in seconds, and it costs a load instead of a clock-source
    // read on every established packet (see `clock`). (A coarse reading may be a little
    // older than the precise one the entry was created with: `saturating_sub` reads that as
    // not idle.)
    let now = clock::coarse_ns();
    let idle = now.saturating_sub(entry.last_seen_ns);
    if !tcp && idle > settings.udp_idle_ns {
        forget(&key, entry, confirmed);
        return core::ptr::null_mut();
    }
    // Refresh the timestamp only when it is stale enough to matter: a write per packet
    // would bounce the entry's cache line between CPUs. The cached next hops of both
    // directions are looked up again then (see `CachedHop`): TCP replies read no clock, so
    // their entry is reached from here.
    if idle > settings.touch_interval_ns {
        entry.last_seen_ns = now;
        entry.hop.gen = 0;
        if tcp {
            forget_reply_hop(&key, entry);
        }
    }
    record_flags(entry, flags);
    // The client acknowledges the backend's SYN-ACK: it is real (a spoofed source never
    // sees the SYN-ACK, so it cannot know the number) and the connection is established.
    if !confirmed
        && tcp
        && entry.peer_next != 0
        && flags & (TCP_ACK | TCP_SYN) == TCP_ACK
        && pkt.tcp_ack(ctx) == Ok(entry.peer_next)
    {
        conntrack::confirm(&key, entry);
    }
    ptr
}

/// Whether the service of the connection whose forward entry is `entry` still lives: its
/// incarnation is the one the entry recorded (an array load, no lookup), or else the
/// service table has the packet's VIP and port (an entry from an earlier layout, which
/// recorded none, or a service added again under the same address, which takes its
/// connections back).
#[inline(always)]
fn service_lives(entry: &FlowValue, pkt: &Packet) -> bool {
    if entry.service_gen != 0 && service_gen(entry.service_id) == entry.service_gen {
        return true;
    }
    let key = ServiceKey {
        vip: pkt.dst,
        port_be: pkt.dst_port_be,
        proto: pkt.proto,
        _pad: 0,
    };
    // SAFETY: only whether there is a value is read.
    unsafe { SERVICES.get(key) }.is_some()
}

/// Empties the cached next hop of the reply entry of the connection whose forward entry
/// `fwd` is under `key`. Not inlined: the reply key takes a frame of its own rather than
/// [`find`]'s.
#[inline(never)]
fn forget_reply_hop(key: &FlowKey, fwd: &FlowValue) {
    if let Some((e, _)) = conntrack::get(&key.reply(fwd.nat_addr, fwd.nat_port_be)) {
        // SAFETY: a live map value; one aligned word store.
        unsafe { (*e).hop.gen = 0 };
    }
}

/// Whether a packet that matches no connection may open one: only a SYN (UDP: any
/// datagram). Any other TCP segment is stray: [`Reason::DropTcpNoFlow`].
#[inline(always)]
pub fn opens(pkt: &Packet) -> Result<(), Reason> {
    if pkt.proto == IPPROTO_TCP && !tcp_opens(pkt.tcp_flags) {
        Err(Reason::DropTcpNoFlow)
    } else {
        Ok(())
    }
}

/// Records a FIN or RST in an entry. Each flag is its own byte, set by one store and only
/// when not yet set (a few packets per connection), so established traffic never writes
/// here and two CPUs setting different flags cannot undo each other.
#[inline(always)]
pub fn record_flags(entry: &mut FlowValue, tcp_flags: u8) {
    if tcp_flags & TCP_FIN != 0 && entry.fin == 0 {
        entry.fin = 1;
    }
    if tcp_flags & TCP_RST != 0 && entry.rst == 0 {
        entry.rst = 1;
    }
}

/// Forgets the connection of the client's 4-tuple `key` whose forward entry is `old`, found
/// `confirmed` or not: that entry, and its reply entry if that is still its own.
#[inline(always)]
fn forget(key: &FlowKey, old: &FlowValue, confirmed: bool) {
    let reply_key = key.reply(old.nat_addr, old.nat_port_be);
    if let Some((reply, reply_confirmed)) = conntrack::get(&reply_key) {
        // SAFETY: a live map value; two fields read.
        let reply = unsafe { &*reply };
        if reply.nat_addr == key.dst && reply.nat_port_be == key.dst_port_be {
            conntrack::remove_found(&reply_key, reply_confirmed);
        }
    }
    conntrack::remove_found(key, confirmed);
}

/// [`Work::route_rc`] when no lookup was made: not `BPF_FIB_LKUP_RET_SUCCESS`, so the
/// packet goes to the stack.
pub const NO_ROUTE: i64 = -1;

/// What a new connection needs besides its key.
struct NewFlow {
    now: u64,
    /// The client's SYN sequence number plus one (TCP), 0 for UDP.
    syn_next: u32,
    /// A UDP flow idle for longer than this no longer holds its reply 4-tuple.
    udp_idle_ns: u64,
}

/// Balances a client's packet that opens a new connection to `svc`: takes the service's
/// next round-robin slot and records the connection in both directions (unconfirmed). Its
/// forward entry is also left in this CPU's scratch entry, returned.
///
/// Not inlined: see [`crate::steer`] on the stack. The service comes as its fields in
/// registers (`id` and `active_table` in `id_table`, see [`service_words`]) rather than a
/// pointer to the caller's copy, which would have to live on the caller's stack: 16 bytes
/// that the deepest chain of calls does not have. (A BPF call takes at most five
/// arguments, the returned value's pointer among them.)
#[inline(never)]
pub fn new_flow(
    ctx: &impl Frame,
    pkt: &Packet,
    id_table: u64,
    flags: u32,
) -> Result<*mut FlowValue, Reason> {
    let svc = &ServiceValue {
        id: id_table as u32,
        active_table: (id_table >> 32) as u32,
        flags,
        _pad: 0,
    };
    let key = pkt.key(DIR_FORWARD);
    let new = NewFlow {
        // SAFETY: a helper without arguments.
        now: unsafe { bpf_ktime_get_ns() },
        syn_next: if key.proto == IPPROTO_TCP {
            pkt.tcp_seq(ctx)?.wrapping_add(1)
        } else {
            0
        },
        udp_idle_ns: settings().udp_idle_ns,
    };
    // The route to each candidate backend: its interface is where replies must arrive, and
    // the chosen one's route forwards this packet.
    let mut route = |backend: &[u32; 4]| fib::lookup(ctx, pkt, &pkt.src, backend);
    let key = &key;
    let egress = &mut route;
    let new = &new;
    let first = pick(svc, Some(key))?;
    let backend_id = first.backend_id;

    // One call site for `record`, in a loop of at most two rounds: inlined twice, its keys
    // would take twice the stack.
    let mut candidate = backend_id;
    let mut retried = false;
    let result = loop {
        match record(key, svc.id, candidate, new, egress) {
            // Another service's live connection holds this backend's reply 4-tuple: the
            // next other backend in the order, if there is one.
            Err(Reason::DropReplyCollision) if !retried => {
                retried = true;
                conntrack::event(CtEvent::ReplyCollision);
                let mut other = None;
                for i in 1..=EJECTED_RETRIES {
                    let c = first.nth(svc, i)?;
                    if c != backend_id {
                        other = Some(c);
                        break;
                    }
                }
                match other {
                    Some(c) => candidate = c,
                    None => break Err(Reason::DropReplyCollision),
                }
            }
            r => break r,
        }
    };
    let chosen = result?;
    stats::traffic(&SERVICE_STATS, svc.id, |c| c.new_conns += 1);
    stats::traffic(&BACKEND_STATS, chosen, |c| c.new_conns += 1);
    if key.proto == IPPROTO_TCP {
        // For the daemon's watch on SYNs no SYN-ACK follows (see `BackendSignals`).
        stats::signals(chosen, |s| s.last_syn_ns = new.now);
    }
    let w = SCRATCH.get_ptr_mut(0).ok_or(Reason::DropInternal)?;
    // SAFETY: this CPU's scratch entry, just written by `record`; only its address is taken.
    Ok(unsafe { &raw mut (*w).flow })
}

/// Records a new connection to `backend_id` in both directions, unless its reply 4-tuple
/// belongs to another live connection. The entries and keys are built in this CPU's scratch
/// entry ([`SCRATCH`]), not on the stack; the forward entry and the route's result code are
/// left there. Returns the backend id.
#[inline(always)]
fn record<F: FnMut(&[u32; 4]) -> Option<fib::Route>>(
    key: &FlowKey,
    service_id: u32,
    backend_id: u32,
    new: &NewFlow,
    egress: &mut F,
) -> Result<u32, Reason> {
    let backend = BACKENDS.get(backend_id).ok_or(Reason::DropInternal)?;
    let w = SCRATCH.get_ptr_mut(0).ok_or(Reason::DropInternal)?;
    // SAFETY: this CPU's own scratch entry; XDP programs do not nest on one CPU.
    let w = unsafe { &mut *w };
    w.reply_key = key.reply(backend.addr, backend.port_be);
    claim_reply(w, key, new)?;
    let v = &mut w.flow;
    // The reply entry first: once the forward entry exists, later packets of the
    // connection rely on it and the reply must already be translatable.
    v.nat_addr = key.dst;
    v.nat_port_be = key.dst_port_be;
    v._pad = 0;
    v.backend_id = backend_id;
    v.service_id = service_id;
    v.fin = 0;
    v.rst = 0;
    v.synack = 0;
    v._flags_pad = 0;
    v.syn_next = new.syn_next;
    v.peer_next = 0;
    let route = egress(&backend.addr);
    v.ifindex = route.as_ref().map_or(0, fib::Route::egress);
    w.route_rc = route.map_or(NO_ROUTE, |r| r.rc());
    v.service_gen = service_gen(service_id);
    v.created_ns = new.now;
    v.last_seen_ns = new.now;
    // No next hop cached yet: the connection's second packet fills it.
    v.hop.gen = 0;
    conntrack::insert_new(&w.reply_key, &w.flow, false).map_err(|_| Reason::DropConntrackFull)?;
    let v = &mut w.flow;
    v.nat_addr = backend.addr;
    v.nat_port_be = backend.port_be;
    v.ifindex = 0;
    conntrack::insert_new(key, &w.flow, true).map_err(|_| Reason::DropConntrackFull)?;
    Ok(backend_id)
}

/// Makes room for a new connection's reply entry under `w.reply_key`. The reply key has no
/// VIP (it is the backend's packet as it arrives), so two services that share a backend,
/// reached by one client from one source port, map to the same key; the second would take
/// over the first one's replies. The holder gives way only when it is this client port's
/// own earlier connection to the same VIP (`key`), or its connection is over; it is then
/// forgotten with its forward entry.
#[inline(always)]
fn claim_reply(w: &mut Work, key: &FlowKey, new: &NewFlow) -> Result<(), Reason> {
    let Some((old, _)) = conntrack::get(&w.reply_key) else {
        return Ok(());
    };
    // SAFETY: a live map value; fields read in place.
    let old = unsafe { &*old };
    w.holder_key = w.reply_key.forward_of(old);
    let own = old.nat_addr == key.dst && old.nat_port_be == key.dst_port_be;
    if !own {
        if let Some((fwd, _)) = conntrack::get(&w.holder_key) {
            // SAFETY: as above.
            let fwd = unsafe { &*fwd };
            let over = if key.proto == IPPROTO_UDP {
                let last = if fwd.last_seen_ns > old.last_seen_ns {
                    fwd.last_seen_ns
                } else {
                    old.last_seen_ns
                };
                new.now.saturating_sub(last) > new.udp_idle_ns
            } else {
                FlowValue::closed(fwd.seen(), old.seen())
            };
            if !over {
                return Err(Reason::DropReplyCollision);
            }
        }
        // No forward entry: half a connection, whose replies could not be translated.
    }
    conntrack::remove(&w.holder_key);
    conntrack::remove(&w.reply_key);
    Ok(())
}

/// A TCP segment of a Maglev service that matches no connection: sent to the backend its
/// hash gives in the active table, creating no state. Its connection was balanced by another
/// orch host (an ECMP change moved it here) or before this host lost its table, with the
/// same table, so the same backend holds it. Ejected backends are not skipped: the
/// connection lives where the table points, if anywhere. Nothing is recorded and no
/// backend's signals move, so stray segments still change nothing. The backend and its
/// address are left in this CPU's scratch entry, returned.
///
/// Not inlined: see [`crate::steer`] on the stack.
#[inline(never)]
pub fn stateless(pkt: &Packet, id_table: u64) -> Result<*mut FlowValue, Reason> {
    let id = id_table as u32;
    let svc = ServiceValue {
        id,
        active_table: (id_table >> 32) as u32,
        flags: SERVICE_MAGLEV,
        _pad: 0,
    };
    let table = Table::of(&svc)?.ok_or(Reason::DropTcpNoFlow)?;
    if table.len == 0 {
        return Err(Reason::DropTcpNoFlow);
    }
    let backend_id = table.at(u64::from(hash_of(&pkt.key(DIR_FORWARD))))?;
    let backend = BACKENDS.get(backend_id).ok_or(Reason::DropInternal)?;
    let w = SCRATCH.get_ptr_mut(0).ok_or(Reason::DropInternal)?;
    // SAFETY: this CPU's own scratch entry; programs do not nest on one CPU.
    let v = unsafe { &mut (*w).flow };
    v.nat_addr = backend.addr;
    v.nat_port_be = backend.port_be;
    v.service_id = id;
    v.backend_id = backend_id;
    Ok(v)
}

/// `svc`'s id and active table in one word, as [`new_flow`] takes them.
#[inline(always)]
pub fn service_words(svc: &ServiceValue) -> (u64, u32) {
    (
        u64::from(svc.id) | u64::from(svc.active_table) << 32,
        svc.flags,
    )
}

/// A new connection's backend, and where in the service's table it was found.
pub struct Pick {
    /// The slot is `ticket % len`.
    pub ticket: u64,
    pub backend_id: u32,
}

impl Pick {
    /// The backend `i` slots after this pick's (for a retry; looks the table up again).
    #[inline(always)]
    pub fn nth(&self, svc: &ServiceValue, i: u64) -> Result<u32, Reason> {
        Table::of(svc)?
            .ok_or(Reason::DropInternal)?
            .at(self.ticket + i)
    }
}

/// A service's active table of either kind, as its backend ids: round-robin slots or a
/// Maglev table. One shape for both, so that the choice below is one piece of code (the
/// stack is the program's scarcest resource, and each instance of it costs some).
struct Table {
    ids: *const u32,
    /// How many ids the map value holds: the bound every read is checked against.
    cap: u64,
    /// How many are used; 0: no backend takes new connections.
    len: u32,
}

impl Table {
    /// `svc`'s active table; `None` for a Maglev service whose table is not there.
    #[inline(always)]
    fn of(svc: &ServiceValue) -> Result<Option<Table>, Reason> {
        let index = slot_table_index(svc.id, svc.active_table);
        if svc.flags & SERVICE_MAGLEV != 0 {
            // SAFETY: a map value read in place; the daemon replaces whole tables.
            Ok(unsafe { MAGLEV.get(index) }.map(|t| Table {
                ids: t.backend_ids.as_ptr(),
                cap: MAGLEV_SIZE as u64,
                len: t.len,
            }))
        } else {
            let t = SLOTS.get(index).ok_or(Reason::DropInternal)?;
            Ok(Some(Table {
                ids: t.backend_ids.as_ptr(),
                cap: SLOTS_PER_TABLE as u64,
                len: t.len,
            }))
        }
    }

    /// The backend at `ticket % len`. The modulo is by the table's own, run-time length: by
    /// a constant, the compiler would prove the bound check needless and drop it, and the
    /// verifier, which cannot follow the multiplication it becomes, would refuse the
    /// access. (Checked, as an empty table has none: a plain `%` would leave a panic path,
    /// which BPF cannot have.)
    #[inline(always)]
    fn at(&self, ticket: u64) -> Result<u32, Reason> {
        let Some(slot) = ticket.checked_rem(u64::from(self.len)) else {
            return Err(Reason::DropNoBackend);
        };
        // Bound for the verifier (and against a corrupt `len`).
        if slot >= self.cap {
            return Err(Reason::DropInternal);
        }
        // SAFETY: `ids` points at `cap` ids of a live map value.
        Ok(unsafe { *self.ids.add(slot as usize) })
    }
}

/// The backend the next new connection to `svc` takes: the one selection rule of every
/// path (packets at XDP or TC, sockets at `connect()`), and the rule `orch explain`
/// restates.
/// - Round-robin (the default): the next slot of the service's active table from this
///   CPU's cursor.
/// - Maglev: the slot `flow`'s hash gives, so that every orch host sends the flow to the
///   same backend. A socket's `connect()` has no flow yet (its port is not chosen): it walks
///   the Maglev table from the cursor, which keeps the weights.
///
/// Either way backends the data plane ejected are skipped (see [`choose`]).
#[inline(always)]
pub fn pick(svc: &ServiceValue, flow: Option<&FlowKey>) -> Result<Pick, Reason> {
    let table = match Table::of(svc)? {
        Some(t) if t.len != 0 => t,
        _ => {
            stats::traffic(&SERVICE_STATS, svc.id, |c| c.no_backend += 1);
            return Err(Reason::DropNoBackend);
        }
    };
    let ticket = match flow {
        Some(f) if svc.flags & SERVICE_MAGLEV != 0 => u64::from(hash_of(f)),
        _ => next_ticket(svc)?,
    };
    choose(&table, ticket)
}

/// [`FlowKey::hash`], in a frame of its own: inlined, its temporaries spill onto the stack
/// of [`new_flow`], which has none to spare.
#[inline(never)]
fn hash_of(key: &FlowKey) -> u32 {
    key.hash()
}

/// This CPU's next ticket for `svc`. The cursor is per CPU: incrementing it is a plain add
/// on memory no other CPU touches, so there is no read-then-write race and no cache line
/// bouncing between CPUs under a burst of new connections. Each CPU walks the same smooth
/// order from its own starting slot, so over any number of connections a backend's share is
/// off by at most one per CPU.
#[inline(always)]
fn next_ticket(svc: &ServiceValue) -> Result<u64, Reason> {
    let cursor = CURSORS.get_ptr_mut(svc.id).ok_or(Reason::DropInternal)?;
    // SAFETY: this CPU's own slot; programs do not nest on one CPU.
    Ok(unsafe {
        let n = *cursor;
        *cursor = n + 1;
        n + bpf_get_smp_processor_id() as u64
    })
}

/// The backend at `ticket % len`, or past it when that one was ejected (it refused a
/// connection moments ago): the next slots are tried until the daemon rewrites the table;
/// if all of those are ejected too, the first choice stands (better a try than a certain
/// drop).
#[inline(always)]
fn choose(table: &Table, ticket: u64) -> Result<Pick, Reason> {
    let mut backend_id = table.at(ticket)?;
    if is_ejected(backend_id) {
        for i in 1..=EJECTED_RETRIES {
            let candidate = table.at(ticket + i)?;
            if !is_ejected(candidate) {
                backend_id = candidate;
                break;
            }
        }
    }
    Ok(Pick { ticket, backend_id })
}

#[inline(always)]
fn is_ejected(backend_id: u32) -> bool {
    BACKEND_DOWN.get(backend_id).is_some_and(|d| *d != 0)
}

/// Marks a backend as refusing connections: new connections skip it from now on.
#[inline(always)]
pub fn eject(backend_id: u32) {
    if let Some(d) = BACKEND_DOWN.get_ptr_mut(backend_id) {
        // SAFETY: a u32 slot of an array map; a racing writer stores the same value.
        unsafe { *d = 1 };
    }
}
