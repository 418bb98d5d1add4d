//! IP fragments of balanced connections, IPv4 and IPv6.
//!
//! A datagram larger than the path (a 4,000-byte UDP answer, a DNSSEC reply) leaves its
//! sender in fragments, and only the first carries the ports the connection table is keyed
//! by. The first fragment of a datagram of a known connection is translated like any of its
//! packets (address, port, and the L4 checksum, which covers the whole datagram and so
//! updates incrementally as well), and how it was translated is remembered under the
//! datagram's identity (addresses, IP identification, protocol, in [`FRAGS`]); the
//! fragments after it find that and get their address rewritten.
//!
//! Limits: a fragment that arrives before its datagram's first is passed untranslated
//! (counted `pass_fragment`; its datagram cannot be reassembled by the receiver and is
//! lost, as on a path that reorders fragments through a stateful firewall); and a new
//! connection whose very first datagram is fragmented is not balanced (the connection table
//! creates state from unfragmented packets only).

use orch_common::{
    csum::Delta,
    maps::{v4_mapped, FlowKey, FragKey, FragValue, DIR_FORWARD, DIR_REPLY},
    Reason, IPPROTO_TCP, IPPROTO_UDP,
};

use crate::{
    conntrack, fib,
    frame::{read, write, Frame, L4Change},
    maps::{settings, BACKEND_STATS, FRAGS, SCRATCH, SERVICE_STATS},
    parse::{Packet, ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IPV6_FRAGMENT},
    stats,
};

/// IPv4 header fields (RFC 791).
const V4_TOT_LEN: usize = ETH_HLEN + 2;
const V4_ID: usize = ETH_HLEN + 4;
const V4_FRAG_OFF: usize = ETH_HLEN + 6;
const V4_PROTO: usize = ETH_HLEN + 9;
const V4_CHECK: usize = ETH_HLEN + 10;
const V4_SRC: usize = ETH_HLEN + 12;
const V4_DST: usize = ETH_HLEN + 16;
/// IPv6 header fields (RFC 8200) and the fragment header right after it.
const V6_PAYLOAD_LEN: usize = ETH_HLEN + 4;
const V6_NEXT: usize = ETH_HLEN + 6;
const V6_SRC: usize = ETH_HLEN + 8;
const V6_DST: usize = ETH_HLEN + 24;
const V6_FRAG: usize = ETH_HLEN + 40;
/// The checksum field within the L4 header.
const TCP_CHECK: usize = 16;
const UDP_CHECK: usize = 6;

/// Steers a fragment of a balanced connection's datagram; anything else is passed as a
/// fragment.
///
/// Not inlined: a subprogram with a frame of its own (see `steer::open`).
#[inline(never)]
pub fn steer<F: Frame>(ctx: &F) -> (u32, Reason) {
    match translate(ctx) {
        Ok(v) => v,
        Err(reason) => (F::PASS, reason),
    }
}

#[inline(always)]
#[allow(
    clippy::needless_borrows_for_generic_args,
    reason = "by value, the scratch entry's key and value would be copied onto the stack"
)]
fn translate<F: Frame>(ctx: &F) -> Result<(u32, Reason), Reason> {
    let pass = Reason::PassFragment;
    let ethertype = u16::from_be(read::<u16>(ctx, 12).ok_or(Reason::PassTruncated)?);
    let v6 = match ethertype {
        ETH_P_IP => false,
        ETH_P_IPV6 => true,
        _ => return Err(pass),
    };
    // The datagram: its identity, whether this is its first fragment, where L4 starts.
    let (src, dst, id, proto, first, l4, len) = if v6 {
        if read::<u8>(ctx, V6_NEXT) != Some(IPV6_FRAGMENT) {
            return Err(pass);
        }
        let proto = read::<u8>(ctx, V6_FRAG).ok_or(Reason::PassTruncated)?;
        // Offset (13 bits) and flags; the identification after them.
        let off = u16::from_be(read::<u16>(ctx, V6_FRAG + 2).ok_or(Reason::PassTruncated)?);
        let id = read::<u32>(ctx, V6_FRAG + 4).ok_or(Reason::PassTruncated)?;
        let len = u16::from_be(read::<u16>(ctx, V6_PAYLOAD_LEN).ok_or(Reason::PassTruncated)?);
        (
            read::<[u32; 4]>(ctx, V6_SRC).ok_or(Reason::PassTruncated)?,
            read::<[u32; 4]>(ctx, V6_DST).ok_or(Reason::PassTruncated)?,
            id,
            proto,
            off & 0xfff8 == 0,
            V6_FRAG + 8,
            len.saturating_add(40),
        )
    } else {
        // Options would move L4; such fragments are passed.
        if read::<u8>(ctx, ETH_HLEN) != Some(0x45) {
            return Err(pass);
        }
        let off = u16::from_be(read::<u16>(ctx, V4_FRAG_OFF).ok_or(Reason::PassTruncated)?);
        (
            v4_mapped(read::<u32>(ctx, V4_SRC).ok_or(Reason::PassTruncated)?),
            v4_mapped(read::<u32>(ctx, V4_DST).ok_or(Reason::PassTruncated)?),
            u32::from(read::<u16>(ctx, V4_ID).ok_or(Reason::PassTruncated)?),
            read::<u8>(ctx, V4_PROTO).ok_or(Reason::PassTruncated)?,
            off & 0x1fff == 0,
            ETH_HLEN + 20,
            u16::from_be(read::<u16>(ctx, V4_TOT_LEN).ok_or(Reason::PassTruncated)?),
        )
    };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Err(pass);
    }
    let w = SCRATCH.get_ptr_mut(0).ok_or(Reason::DropInternal)?;
    // SAFETY: this CPU's scratch entry; programs do not nest on one CPU.
    let w = unsafe { &mut *w };
    w.frag_key = FragKey {
        src,
        dst,
        id,
        proto,
        _pad: [0; 3],
    };
    let mut port = None;
    if first {
        // The first fragment: a packet of its connection, found by its ports.
        let sport = read::<u16>(ctx, l4).ok_or(Reason::PassTruncated)?;
        let dport = read::<u16>(ctx, l4 + 2).ok_or(Reason::PassTruncated)?;
        w.holder_key = FlowKey {
            src,
            dst,
            src_port_be: sport,
            dst_port_be: dport,
            proto,
            dir: DIR_FORWARD,
            _pad: 0,
        };
        let (entry, dir) = match conntrack::get(&w.holder_key) {
            Some((e, _)) => (e, DIR_FORWARD),
            None => {
                w.holder_key.dir = DIR_REPLY;
                (conntrack::get(&w.holder_key).ok_or(pass)?.0, DIR_REPLY)
            }
        };
        // SAFETY: a live map value, read field by field.
        let e = unsafe { &*entry };
        if dir == DIR_REPLY && e.ifindex != 0 && e.ifindex != ctx.ifindex() {
            return Err(Reason::DropReplyInterface);
        }
        w.frag = FragValue {
            addr: e.nat_addr,
            dir,
            _pad: [0; 3],
            service_id: e.service_id,
            backend_id: e.backend_id,
            _pad2: 0,
        };
        let old = if dir == DIR_FORWARD { dport } else { sport };
        port = Some((old, e.nat_port_be));
    } else {
        // SAFETY: the value is copied out at once.
        w.frag = *unsafe { FRAGS.get(&w.frag_key) }.ok_or(pass)?;
    }
    let forward = w.frag.dir == DIR_FORWARD;
    let pkt = Packet {
        v6,
        proto,
        src: if forward { src } else { w.frag.addr },
        dst: if forward { w.frag.addr } else { dst },
        src_port_be: 0,
        dst_port_be: 0,
        l3_len: len,
        tcp_flags: 0,
    };
    let hop = fib::decide(ctx, &pkt, (&pkt.src, &pkt.dst), &settings(), None, None);
    if let Some(reason) = hop.answered_by_stack() {
        return Err(reason);
    }

    // The address, and the IPv4 header checksum.
    let (old_addr, off) = if forward {
        (&dst, if v6 { V6_DST } else { V4_DST })
    } else {
        (&src, if v6 { V6_SRC } else { V4_SRC })
    };
    let new_addr = &w.frag.addr;
    if v6 {
        if !write(ctx, off, *new_addr) {
            return Err(Reason::DropInternal);
        }
    } else {
        let check = read::<u16>(ctx, V4_CHECK).ok_or(Reason::PassTruncated)?;
        let delta = Delta::new().replace_u32(old_addr[3], new_addr[3]);
        if !write(ctx, off, new_addr[3]) || !write(ctx, V4_CHECK, delta.apply(check)) {
            return Err(Reason::DropInternal);
        }
    }
    // The first fragment: the port and the datagram's L4 checksum; and remember it all for
    // the fragments after it.
    if let Some((old_port, new_port)) = port {
        let port_off = if forward { l4 + 2 } else { l4 };
        let udp = proto == IPPROTO_UDP;
        if !write(ctx, port_off, new_port)
            || !ctx.fix_l4_csum(&L4Change {
                check_off: l4 + if udp { UDP_CHECK } else { TCP_CHECK },
                v6,
                udp,
                old_addr,
                new_addr,
                old_port_be: old_port,
                new_port_be: new_port,
            })
        {
            return Err(Reason::DropInternal);
        }
        // Failing to remember loses the rest of the datagram, not this fragment.
        let _ = FRAGS.insert(&w.frag_key, &w.frag, 0);
    }

    let bytes = u64::from(len);
    let count = |c: &mut orch_common::maps::TrafficCounters| {
        if forward {
            c.fwd_packets += 1;
            c.fwd_bytes += bytes;
        } else {
            c.reply_packets += 1;
            c.reply_bytes += bytes;
        }
    };
    stats::traffic(&SERVICE_STATS, w.frag.service_id, count);
    stats::traffic(&BACKEND_STATS, w.frag.backend_id, count);
    let (redirected, stacked) = if forward {
        (Reason::FwdRedirect, Reason::FwdStack)
    } else {
        (Reason::ReplyRedirect, Reason::ReplyStack)
    };
    let (action, sent) = fib::forward(ctx, &pkt, hop);
    Ok((action, if sent { redirected } else { stacked }))
}
