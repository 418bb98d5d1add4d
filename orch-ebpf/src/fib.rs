//! Forwarding of translated packets: a kernel FIB lookup and a redirect when the route and
//! the neighbour are known, the kernel stack otherwise; and the cases where the kernel must
//! answer the sender (too big, TTL), found before the packet is touched.
//!
//! A connection's entry caches its redirect, or that its packets go to the stack
//! ([`CachedHop`]): an established packet then pays a comparison with the route generation
//! instead of a lookup. The TTL and the redirect setting are still checked on every packet,
//! and so is the size, but for a stack decision that holds for any size (no route).

use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup, BPF_FIB_LKUP_RET_BLACKHOLE, BPF_FIB_LKUP_RET_FRAG_NEEDED,
        BPF_FIB_LKUP_RET_FWD_DISABLED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
    },
    helpers::bpf_fib_lookup as fib_lookup,
};
use orch_common::{
    csum::Delta,
    maps::{CachedHop, Settings, SETTING_REDIRECT},
    Reason,
};

use crate::{
    frame::{read, write, Frame},
    maps::{route_gen, FIB_SCRATCH},
    parse::{Packet, ETH_HLEN},
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// TTL and protocol share one 16-bit word of the IPv4 header (offset 8).
const V4_TTL: usize = ETH_HLEN + 8;
/// Flags and fragment offset of the IPv4 header, and its don't-fragment bit (RFC 791).
const V4_FRAG_OFF: usize = ETH_HLEN + 6;
const IP_DF: u16 = 0x4000;
const V4_CHECK: usize = ETH_HLEN + 10;
const V6_HOP_LIMIT: usize = ETH_HLEN + 7;
// `lookup` zeroes the parameters in words.
const _: () = assert!(size_of::<bpf_fib_lookup>().is_multiple_of(8));

/// The kernel's route for a translated packet. The lookup's parameters and results live in
/// this CPU's entry of [`FIB_SCRATCH`], not on the 512-byte stack.
pub struct Route {
    params: *mut bpf_fib_lookup,
    rc: i64,
}

impl Route {
    /// The route the last [`lookup`] on this CPU left in [`FIB_SCRATCH`], with its result
    /// code `rc`: a new connection's first packet reuses the lookup that found its reply
    /// interface instead of making the same one again.
    #[inline(always)]
    pub fn last(rc: i64) -> Option<Route> {
        // SAFETY: this CPU's scratch entry; only its address is taken.
        let params = unsafe { &raw mut (*FIB_SCRATCH.get_ptr_mut(0)?).params };
        Some(Route { params, rc })
    }

    /// The lookup's result code (`BPF_FIB_LKUP_RET_*`).
    #[inline(always)]
    pub fn rc(&self) -> i64 {
        self.rc
    }

    /// The interface the packet leaves by, or 0 when the FIB has no route. Known also when
    /// the neighbour is not yet resolved (the kernel sets the egress before it looks the
    /// neighbour up).
    #[inline(always)]
    pub fn egress(&self) -> u32 {
        if self.rc == BPF_FIB_LKUP_RET_SUCCESS as i64 || self.rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64
        {
            // SAFETY: this CPU's scratch entry, filled by the lookup that made `self`.
            unsafe { (*self.params).ifindex }
        } else {
            0
        }
    }
}

/// Looks up the route of a (translated) packet from `src` to `dst`, as received on this
/// packet's interface. `None` only if the scratch map is missing, which cannot happen.
#[inline(always)]
pub fn lookup<F: Frame>(ctx: &F, pkt: &Packet, src: &[u32; 4], dst: &[u32; 4]) -> Option<Route> {
    // SAFETY: this CPU's scratch entry; only its address is taken.
    let p = unsafe { &raw mut (*FIB_SCRATCH.get_ptr_mut(0)?).params };
    // SAFETY: this CPU's own scratch entry; XDP programs do not nest on one CPU. Every field
    // the helper reads is written here first.
    // All-zero is a valid value of this plain C struct; written in place, not built on the
    // stack and copied, and word by word: `write_bytes` becomes a call to a `memset`
    // subprogram, whose frame and return a profile of new connections shows. (Volatile, or
    // the compiler makes the loop that call again.) A map value is 8-byte aligned.
    for i in 0..size_of::<bpf_fib_lookup>() / 8 {
        unsafe { p.cast::<u64>().add(i).write_volatile(0) };
    }
    // SAFETY: as above.
    let params = unsafe { &mut *p };
    params.l4_protocol = pkt.proto;
    params.sport = pkt.src_port_be;
    params.dport = pkt.dst_port_be;
    // Zero: the kernel checks the skb against the MTU, GRO aggregates included.
    params.__bindgen_anon_1.tot_len = if F::MTU_BY_IP_LEN { pkt.l3_len } else { 0 };
    params.ifindex = ctx.ifindex();
    if pkt.v6 {
        params.family = AF_INET6;
        params.__bindgen_anon_3.ipv6_src = *src;
        params.__bindgen_anon_4.ipv6_dst = *dst;
    } else {
        params.family = AF_INET;
        params.__bindgen_anon_3.ipv4_src = src[3];
        params.__bindgen_anon_4.ipv4_dst = dst[3];
    }
    // SAFETY: `params` is a valid, fully initialised struct of the size we pass.
    let rc = unsafe { fib_lookup(ctx.as_ptr(), p, size_of::<bpf_fib_lookup>() as i32, 0) };
    Some(Route { params: p, rc })
}

/// Where a balanced packet goes next, decided before it is rewritten.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Out of the next hop's interface, from here.
    Redirect,
    /// To the kernel stack, translated: no route (remembered until the routes change), no
    /// neighbour yet (the stack resolves it and the next packets take the fast path), a
    /// device this hook cannot send to, redirect disabled, or an IPv4 packet without DF that
    /// the stack will fragment.
    Stack,
    /// Bigger than the next hop takes, and not to be fragmented here.
    TooBig,
    /// Its TTL (hop limit) ends here.
    TtlExpired,
}

/// A decision and, for a redirect, its next hop: the connection's cached one, or this CPU's
/// scratch copy of a lookup's result.
///
/// A struct whose pointer is always set (null but for a redirect), not an enum with a
/// payload: the compiler copies an enum's payload register on every path, set or not, and
/// the verifier refuses a read of a register that was never written.
pub struct Hop {
    pub kind: Kind,
    next: *const CachedHop,
}

impl Hop {
    #[inline(always)]
    const fn to(kind: Kind) -> Hop {
        Hop {
            kind,
            next: core::ptr::null(),
        }
    }

    #[inline(always)]
    const fn redirect(next: *const CachedHop) -> Hop {
        Hop {
            kind: Kind::Redirect,
            next,
        }
    }

    /// Why the packet is left to the kernel as it came, for its ICMP answer: too big, or
    /// its TTL ends here. `None` for a packet we translate.
    #[inline(always)]
    pub fn answered_by_stack(&self) -> Option<Reason> {
        match self.kind {
            Kind::TooBig => Some(Reason::PassTooBig),
            Kind::TtlExpired => Some(Reason::PassTtlExpired),
            _ => None,
        }
    }
}

/// Sends a translated packet to its `hop`: the action, and whether it was redirected (or
/// went to the stack). An XDP redirect whose interface left the redirect map meanwhile is
/// passed to the stack instead, and counted as such.
#[inline(always)]
pub fn forward<F: Frame>(ctx: &F, pkt: &Packet, hop: Hop) -> (u32, bool) {
    if hop.kind != Kind::Redirect || hop.next.is_null() {
        return (F::PASS, false);
    }
    // SAFETY: a live map value (the entry's cache or this CPU's scratch), alive for the rest
    // of this run.
    match send(ctx, pkt, unsafe { &*hop.next }) {
        Some(action) => (action, action != F::PASS),
        None => (F::PASS, false),
    }
}

/// Decides the next hop of a packet that will go from `src` to `dst` once translated, with
/// `route` when it was looked up already (see [`Route::last`]), and `cache`, the connection
/// entry's cached next hop, used when valid and refilled when not. Decided on the packet as
/// it arrived: when the answer is an ICMP error (too big, TTL), the kernel must quote the
/// packet its sender sent, not our translation of it.
#[inline(always)]
pub fn decide<F: Frame>(
    ctx: &F,
    pkt: &Packet,
    (src, dst): (&[u32; 4], &[u32; 4]),
    settings: &Settings,
    route: Option<Route>,
    cache: Option<*mut CachedHop>,
) -> Hop {
    let ttl_off = if pkt.v6 { V6_HOP_LIMIT } else { V4_TTL };
    match read::<u8>(ctx, ttl_off) {
        Some(ttl) if ttl > 1 => {}
        _ => return Hop::to(Kind::TtlExpired),
    }
    if settings.flags & SETTING_REDIRECT == 0 {
        return Hop::to(Kind::Stack);
    }
    let gen = route_gen();
    if let Some(c) = cache {
        // SAFETY: the connection's live map entry, read in place.
        let cached = unsafe { &*c };
        // On XDP a longer packet than the route was checked with is looked up again: the
        // FIB checks its length against the path MTU.
        let valid =
            gen != 0 && cached.gen == gen && (!F::MTU_BY_IP_LEN || pkt.l3_len <= cached.fits_len);
        if valid && cached.ifindex != STACK {
            if !ctx.fits(cached.ifindex) {
                return too_big(ctx, pkt);
            }
            return Hop::redirect(c);
        }
        // TC checks sizes itself, on every packet: it takes only a stack decision that
        // holds for any size (an XDP fill for a device XDP cannot send to does not), and
        // looks anything else up.
        if valid && (F::MTU_BY_IP_LEN || cached.fits_len == u16::MAX) {
            return Hop::to(Kind::Stack);
        }
    }
    let Some(route) = route.or_else(|| lookup(ctx, pkt, src, dst)) else {
        return Hop::to(Kind::Stack);
    };
    let rc = route.rc;
    if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED as i64 {
        return too_big(ctx, pkt);
    }
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        // The stack resolves the neighbour, and the next packets are redirected.
        return Hop::to(Kind::Stack);
    }
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        // No route to forward on (a local destination, forwarding off, unreachable): the
        // kernel answers so before it compares any size, so the answer holds for every
        // size, until the routes change. Any other code (an encapsulating route, which the
        // kernel reports after its size check) holds on XDP up to this packet's length,
        // and on TC (which checks sizes itself) not at all.
        let any_size = (BPF_FIB_LKUP_RET_BLACKHOLE as i64..=BPF_FIB_LKUP_RET_FWD_DISABLED as i64)
            .contains(&rc);
        let fits_len = match (any_size, F::MTU_BY_IP_LEN) {
            (true, _) => u16::MAX,
            (false, true) => pkt.l3_len,
            (false, false) => 0,
        };
        remember_stack(cache, gen, fits_len);
        return Hop::to(Kind::Stack);
    }
    // SAFETY: this CPU's scratch entry, just filled by the lookup.
    let params = unsafe { &*route.params };
    if !ctx.can_send(params.ifindex) {
        // A device this hook cannot send to; the FIB checked this length against its MTU.
        remember_stack(cache, gen, pkt.l3_len);
        return Hop::to(Kind::Stack);
    }
    // The FIB checks the IP length (XDP); the device check covers an skb and its GSO
    // segments (TC).
    if !ctx.fits(params.ifindex) {
        return too_big(ctx, pkt);
    }
    let (hop, gen) = match cache {
        Some(c) => (c, gen),
        // Never valid: a scratch copy serves one packet.
        None => match FIB_SCRATCH.get_ptr_mut(0) {
            // SAFETY: this CPU's scratch entry; only its address is taken.
            Some(w) => (unsafe { &raw mut (*w).hop }, 0),
            None => return Hop::to(Kind::Stack),
        },
    };
    // SAFETY: a live map value (the entry's or this CPU's scratch). No lock: the generation
    // is cleared first and set last, and another CPU that refills the same entry at the same
    // time writes what the FIB answered it, the same route unless the route changed in
    // between, which moves the generation again. (A refill may also overwrite the clearing
    // of a timestamp refresh: the next refresh, a second later, clears it.)
    unsafe {
        (*hop).gen = 0;
        (*hop).ifindex = params.ifindex;
        (*hop).dmac = params.dmac;
        (*hop).smac = params.smac;
        // TC checks the size on every packet; a TC fill leaves 0 so that XDP, which relies
        // on the FIB's check and sends only to its redirect map, looks the route up itself.
        (*hop).fits_len = if F::MTU_BY_IP_LEN { pkt.l3_len } else { 0 };
        (*hop).gen = gen;
    }
    Hop::redirect(hop)
}

/// [`CachedHop::ifindex`] of a cached decision to leave the packets to the stack.
const STACK: u32 = 0;

/// Caches in `cache` (if any) that the connection's packets go to the stack, translated,
/// under generation `gen`, for packets up to `fits_len` long (`u16::MAX`: any size, the
/// only kind TC uses). Worth it for a backend on this host (its address is local: no route
/// forwards to it), whose every packet would otherwise pay a failed lookup. Within its
/// size bound, a stale decision costs speed only: the stack forwards as the FIB says now.
#[inline(always)]
fn remember_stack(cache: Option<*mut CachedHop>, gen: u32, fits_len: u16) {
    let Some(c) = cache else {
        return;
    };
    // SAFETY: the connection's live map entry; the generation is set last, as in `decide`.
    unsafe {
        (*c).gen = 0;
        (*c).ifindex = STACK;
        (*c).fits_len = fits_len;
        (*c).gen = gen;
    }
}

/// A packet bigger than the next hop takes: IPv4 without DF may be fragmented on the way
/// (the stack does it, translated); anything else is the kernel's to answer, untranslated.
#[inline(always)]
fn too_big<F: Frame>(ctx: &F, pkt: &Packet) -> Hop {
    let df = pkt.v6 || read::<u16>(ctx, V4_FRAG_OFF).is_some_and(|f| u16::from_be(f) & IP_DF != 0);
    Hop::to(if df { Kind::TooBig } else { Kind::Stack })
}

/// Sends the (already translated) packet to `next`: sets the MACs, decrements the TTL as a
/// router must, and returns the action. `None` if the packet is too short to carry what
/// parsing found in it, which cannot happen.
#[inline(always)]
pub fn send(ctx: &impl Frame, pkt: &Packet, next: &CachedHop) -> Option<u32> {
    if !write(ctx, 0, next.dmac) || !write(ctx, 6, next.smac) {
        return None;
    }
    let ttl_off = if pkt.v6 { V6_HOP_LIMIT } else { V4_TTL };
    let ttl = read::<u8>(ctx, ttl_off)?;
    if pkt.v6 {
        write(ctx, ttl_off, ttl - 1);
    } else {
        let old = read::<u16>(ctx, V4_TTL)?;
        let new = u16::from_ne_bytes([ttl - 1, pkt.proto]);
        let check = read::<u16>(ctx, V4_CHECK)?;
        write(ctx, V4_TTL, new);
        write(
            ctx,
            V4_CHECK,
            Delta::new().replace_u16(old, new).apply(check),
        );
    }
    Some(ctx.send(next.ifindex))
}
