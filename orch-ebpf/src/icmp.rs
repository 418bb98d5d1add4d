//! ICMP errors about balanced connections, both ways, IPv4 and IPv6.
//!
//! An ICMP error quotes the start of the packet it is about: its IP header and the first
//! 8 bytes after it, the ports among them. For a balanced connection that quoted packet is
//! one side's view of it, and the error must reach the other side, translated:
//! - from the clients' side, about a reply (quoted: VIP -> client): the backend that sent
//!   the reply needs it (a "fragmentation needed" from a router on the client's path is
//!   path-MTU discovery; without it large replies vanish). The quoted source and the outer
//!   destination become the backend.
//! - from the backends' side, about a client's packet (quoted: client -> backend): the
//!   client needs it, and must see the VIP it sent to. The quoted destination becomes the
//!   VIP, and so does the outer source when the backend itself sent the error (its address
//!   must not leak).
//!
//! The quoted packet is found in the connection table like any packet of the connection;
//! an error about anything else is passed to the kernel, counted as another protocol. The
//! checksums follow every change: the outer IPv4 header's, the quoted IPv4 header's, the
//! quoted UDP checksum (inside the 8 bytes; TCP's is not), and the ICMP checksum over all of
//! them (ICMPv6's also over the outer addresses, its pseudo-header).

use orch_common::{
    csum::Delta,
    maps::{v4_mapped, FlowKey, DIR_FORWARD, DIR_REPLY},
    Reason, IPPROTO_TCP, IPPROTO_UDP,
};

use crate::{
    conntrack, fib,
    frame::{read, write, Frame},
    maps::{settings, SCRATCH},
    parse::{Packet, ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IPV6_FRAGMENT},
};

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;

/// Where the fields are, for each family: the outer header without options or extension
/// headers, the ICMP header, the quoted header (likewise), the quoted ports.
struct Layout {
    v6: bool,
    outer_src: usize,
    outer_dst: usize,
    icmp: usize,
    inner_proto: usize,
    inner_src: usize,
    inner_dst: usize,
    inner_l4: usize,
}

const V4: Layout = Layout {
    v6: false,
    outer_src: ETH_HLEN + 12,
    outer_dst: ETH_HLEN + 16,
    icmp: ETH_HLEN + 20,
    inner_proto: ETH_HLEN + 28 + 9,
    inner_src: ETH_HLEN + 28 + 12,
    inner_dst: ETH_HLEN + 28 + 16,
    inner_l4: ETH_HLEN + 28 + 20,
};

const V6: Layout = Layout {
    v6: true,
    outer_src: ETH_HLEN + 8,
    outer_dst: ETH_HLEN + 24,
    icmp: ETH_HLEN + 40,
    inner_proto: ETH_HLEN + 48 + 6,
    inner_src: ETH_HLEN + 48 + 8,
    inner_dst: ETH_HLEN + 48 + 24,
    inner_l4: ETH_HLEN + 48 + 40,
};

/// Offsets within IPv4 headers (outer and quoted alike).
const V4_VER_IHL: usize = 0;
const V4_TOT_LEN: usize = 2;
const V4_FRAG_OFF: usize = 6;
const V4_PROTO: usize = 9;
const V4_CHECK: usize = 10;
const V6_PAYLOAD_LEN: usize = 4;
const V6_NEXT: usize = 6;
/// The ICMP checksum, and the quoted UDP checksum, within their headers.
const ICMP_CHECK: usize = 2;
const UDP_CHECK: usize = 6;

/// Which way a translated error goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Toward {
    Backend,
    Client,
}

/// Steers an ICMP error about a balanced connection; `Err` for anything else (not ICMP, not
/// an error, not about a connection of ours), which the caller passes.
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
fn translate<F: Frame>(ctx: &F) -> Result<(u32, Reason), Reason> {
    let other = Reason::PassOtherProtocol;
    let ethertype = u16::from_be(read::<u16>(ctx, 12).ok_or(Reason::PassTruncated)?);
    let l = match ethertype {
        ETH_P_IP => {
            // The outer header: no options, not a fragment, ICMP.
            let ip = ETH_HLEN;
            if read::<u8>(ctx, ip + V4_VER_IHL) != Some(0x45)
                || read::<u8>(ctx, ip + V4_PROTO) != Some(IPPROTO_ICMP)
                || read::<u16>(ctx, ip + V4_FRAG_OFF).is_none_or(|f| u16::from_be(f) & 0x3fff != 0)
            {
                return Err(other);
            }
            // Destination unreachable (fragmentation needed among them), time exceeded.
            if !matches!(read::<u8>(ctx, V4.icmp), Some(3 | 11)) {
                return Err(other);
            }
            if read::<u8>(ctx, V4.inner_src - 12 + V4_VER_IHL) != Some(0x45) {
                return Err(other);
            }
            &V4
        }
        ETH_P_IPV6 => {
            if read::<u8>(ctx, ETH_HLEN + V6_NEXT) != Some(IPPROTO_ICMPV6) {
                return Err(other);
            }
            // Destination unreachable, packet too big, time exceeded.
            if !matches!(read::<u8>(ctx, V6.icmp), Some(1..=3)) {
                return Err(other);
            }
            &V6
        }
        _ => return Err(Reason::PassNotIp),
    };
    let mut proto = read::<u8>(ctx, l.inner_proto).ok_or(Reason::PassTruncated)?;
    let mut inner_l4 = l.inner_l4;
    // IPv6 routers do not fragment: a datagram sent in fragments wider than a later link
    // gets "packet too big" quoting its first fragment, whose ports follow the fragment
    // header (IPv4 fragments carry no DF, and routers fragment them further).
    if l.v6 && proto == IPV6_FRAGMENT {
        let offset = read::<u16>(ctx, inner_l4 + 2).ok_or(Reason::PassTruncated)?;
        if u16::from_be(offset) & 0xfff8 != 0 {
            return Err(other);
        }
        proto = read::<u8>(ctx, inner_l4).ok_or(Reason::PassTruncated)?;
        inner_l4 += 8;
    }
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Err(other);
    }
    let addr = |off: usize| -> Result<[u32; 4], Reason> {
        if l.v6 {
            read::<[u32; 4]>(ctx, off).ok_or(Reason::PassTruncated)
        } else {
            read::<u32>(ctx, off)
                .map(v4_mapped)
                .ok_or(Reason::PassTruncated)
        }
    };
    let (inner_src, inner_dst) = (addr(l.inner_src)?, addr(l.inner_dst)?);
    // An error goes to the sender of the packet it quotes: the outer destination is the
    // quoted source (and is not kept apart from it below).
    if addr(l.outer_dst)? != inner_src {
        return Err(other);
    }
    let outer_src = addr(l.outer_src)?;
    let inner_sport = read::<u16>(ctx, inner_l4).ok_or(Reason::PassTruncated)?;
    let inner_dport = read::<u16>(ctx, inner_l4 + 2).ok_or(Reason::PassTruncated)?;
    // The connection, as its own packets would find it: the quoted packet reversed. The
    // key is built in this CPU's scratch entry: the stack (shared with the entry point's
    // frame) has no room for it.
    let w = SCRATCH.get_ptr_mut(0).ok_or(Reason::DropInternal)?;
    // SAFETY: this CPU's scratch entry; programs do not nest on one CPU.
    let key = unsafe { &mut (*w).holder_key };
    *key = FlowKey {
        src: inner_dst,
        dst: inner_src,
        src_port_be: inner_dport,
        dst_port_be: inner_sport,
        proto,
        dir: DIR_FORWARD,
        _pad: 0,
    };
    let (toward, entry) = match conntrack::get(key) {
        Some((e, _)) => (Toward::Backend, e),
        None => {
            key.dir = DIR_REPLY;
            let (e, _) = conntrack::get(key).ok_or(other)?;
            (Toward::Client, e)
        }
    };
    // SAFETY: a live map value; fields read once.
    let (nat_addr, nat_port_be, ifindex) =
        unsafe { ((*entry).nat_addr, (*entry).nat_port_be, (*entry).ifindex) };
    // As for replies: the backends' side is where their traffic comes from.
    if toward == Toward::Client && ifindex != 0 && ifindex != ctx.ifindex() {
        return Err(Reason::DropReplyInterface);
    }

    let len = if l.v6 {
        read::<u16>(ctx, ETH_HLEN + V6_PAYLOAD_LEN).map(|n| u16::from_be(n) + 40)
    } else {
        read::<u16>(ctx, ETH_HLEN + V4_TOT_LEN).map(u16::from_be)
    }
    .ok_or(Reason::PassTruncated)?;
    // The error as it will leave. What changes: toward the backend, the outer destination
    // and the quoted source; toward the client, the quoted destination, and the outer source
    // if the backend itself sent the error.
    let pkt = Packet {
        v6: l.v6,
        proto: if l.v6 { IPPROTO_ICMPV6 } else { IPPROTO_ICMP },
        src: if toward == Toward::Client && outer_src == inner_dst {
            nat_addr
        } else {
            outer_src
        },
        dst: if toward == Toward::Backend {
            nat_addr
        } else {
            inner_src
        },
        src_port_be: 0,
        dst_port_be: 0,
        l3_len: len,
        tcp_flags: 0,
    };
    let hop = fib::decide(ctx, &pkt, (&pkt.src, &pkt.dst), &settings(), None, None);
    if let Some(reason) = hop.answered_by_stack() {
        return Err(reason);
    }

    // The quoted packet.
    let (addr_off, port_off, old_addr, old_port) = match toward {
        Toward::Backend => (l.inner_src, inner_l4, inner_src, inner_sport),
        Toward::Client => (l.inner_dst, inner_l4 + 2, inner_dst, inner_dport),
    };
    let inner = Delta::new().replace_addr(&old_addr, &nat_addr);
    let mut icmp = inner.replace_u16(old_port, nat_port_be);
    if !write_addr(ctx, l.v6, addr_off, &nat_addr) || !write(ctx, port_off, nat_port_be) {
        return Err(Reason::DropInternal);
    }
    if !l.v6 {
        let off = l.inner_src - 12 + V4_CHECK;
        let old = read::<u16>(ctx, off).ok_or(Reason::PassTruncated)?;
        let new = inner.apply(old);
        icmp = icmp.replace_u16(old, new);
        write(ctx, off, new);
    }
    if proto == IPPROTO_UDP {
        let off = inner_l4 + UDP_CHECK;
        let old = read::<u16>(ctx, off).ok_or(Reason::PassTruncated)?;
        // IPv4's "no checksum" stays so.
        if l.v6 || old != 0 {
            let mut new = inner.replace_u16(old_port, nat_port_be).apply(old);
            if new == 0 {
                new = 0xffff;
            }
            icmp = icmp.replace_u16(old, new);
            write(ctx, off, new);
        }
    }
    // The outer header.
    let outer = Delta::new()
        .replace_addr(&outer_src, &pkt.src)
        .replace_addr(&inner_src, &pkt.dst);
    if !write_addr(ctx, l.v6, l.outer_src, &pkt.src)
        || !write_addr(ctx, l.v6, l.outer_dst, &pkt.dst)
    {
        return Err(Reason::DropInternal);
    }
    if l.v6 {
        // ICMPv6's checksum covers the outer addresses too (its pseudo-header).
        icmp = icmp.and(outer);
    } else {
        let off = ETH_HLEN + V4_CHECK;
        let old = read::<u16>(ctx, off).ok_or(Reason::PassTruncated)?;
        write(ctx, off, outer.apply(old));
    }
    let off = l.icmp + ICMP_CHECK;
    let old = read::<u16>(ctx, off).ok_or(Reason::PassTruncated)?;
    write(ctx, off, icmp.apply(old));

    let reason = match toward {
        Toward::Backend => Reason::IcmpToBackend,
        Toward::Client => Reason::IcmpToClient,
    };
    Ok((fib::forward(ctx, &pkt, hop).0, reason))
}

/// Writes an address: 16 bytes, or the IPv4 word of a mapped one.
#[inline(always)]
fn write_addr(ctx: &impl Frame, v6: bool, off: usize, addr: &[u32; 4]) -> bool {
    if v6 {
        write(ctx, off, *addr)
    } else {
        write(ctx, off, addr[3])
    }
}
