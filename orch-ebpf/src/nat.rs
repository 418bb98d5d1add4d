//! Address and port translation with incremental checksum updates (RFC 1624).

use orch_common::{csum::Delta, IPPROTO_UDP};

use crate::{
    frame::{read, write, Frame, L4Change},
    parse::{Packet, ETH_HLEN},
};

/// Which end of the packet to rewrite.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Source: replies, where the backend becomes the VIP again.
    Src,
    /// Destination: client packets, where the VIP becomes the backend.
    Dst,
}

/// IPv4 header offsets (RFC 791).
const V4_CHECK: usize = ETH_HLEN + 10;
const V4_SADDR: usize = ETH_HLEN + 12;
const V4_DADDR: usize = ETH_HLEN + 16;
/// IPv6 header offsets (RFC 8200).
const V6_SADDR: usize = ETH_HLEN + 8;
const V6_DADDR: usize = ETH_HLEN + 24;
/// Checksum offsets within the L4 header.
const TCP_CHECK: usize = 16;
const UDP_CHECK: usize = 6;

/// Rewrites one end's address and port to `addr`/`port_be` and fixes the IPv4 header
/// checksum and the TCP/UDP checksum (whose pseudo-header covers the addresses), the latter
/// as the frame's kind requires (see [`crate::frame`]). Returns false only if a write fell
/// outside the packet, which parsing has already ruled out.
#[inline(always)]
pub fn rewrite(ctx: &impl Frame, pkt: &Packet, side: Side, addr: &[u32; 4], port_be: u16) -> bool {
    let (old_addr, old_port) = match side {
        Side::Src => (&pkt.src, pkt.src_port_be),
        Side::Dst => (&pkt.dst, pkt.dst_port_be),
    };
    if pkt.v6 {
        let off = if side == Side::Src {
            V6_SADDR
        } else {
            V6_DADDR
        };
        if !write(ctx, off, *addr) {
            return false;
        }
    } else {
        let off = if side == Side::Src {
            V4_SADDR
        } else {
            V4_DADDR
        };
        let delta = Delta::new().replace_u32(old_addr[3], addr[3]);
        let Some(check) = read::<u16>(ctx, V4_CHECK) else {
            return false;
        };
        // The IP header checksum is always a full one, in an skb too.
        if !write(ctx, off, addr[3]) || !write(ctx, V4_CHECK, delta.apply(check)) {
            return false;
        }
    }

    let l4 = pkt.l4_off();
    let port_off = if side == Side::Src { l4 } else { l4 + 2 };
    if !write(ctx, port_off, port_be) {
        return false;
    }
    let udp = pkt.proto == IPPROTO_UDP;
    ctx.fix_l4_csum(&L4Change {
        check_off: l4 + if udp { UDP_CHECK } else { TCP_CHECK },
        v6: pkt.v6,
        udp,
        old_addr,
        new_addr: addr,
        old_port_be: old_port,
        new_port_be: port_be,
    })
}
