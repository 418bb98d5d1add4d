//! Address and port translation with incremental checksum updates (RFC 1624).

use aya_ebpf::programs::XdpContext;
use orch_common::{csum::Delta, IPPROTO_UDP};

use crate::parse::{read, write, Packet, ETH_HLEN};

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
/// checksum and the TCP/UDP checksum (whose pseudo-header covers the addresses). Returns
/// false only if a write fell outside the packet, which parsing has already ruled out.
#[inline(always)]
pub fn rewrite(ctx: &XdpContext, pkt: &Packet, side: Side, addr: &[u32; 4], port_be: u16) -> bool {
    let (old_addr, old_port) = match side {
        Side::Src => (&pkt.src, pkt.src_port_be),
        Side::Dst => (&pkt.dst, pkt.dst_port_be),
    };
    let addr_delta = if pkt.v6 {
        let off = if side == Side::Src {
            V6_SADDR
        } else {
            V6_DADDR
        };
        if !write(ctx, off, *addr) {
            return false;
        }
        Delta::new().replace_addr(old_addr, addr)
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
        if !write(ctx, off, addr[3]) || !write(ctx, V4_CHECK, delta.apply(check)) {
            return false;
        }
        delta
    };

    let l4 = pkt.l4_off();
    let port_off = if side == Side::Src { l4 } else { l4 + 2 };
    if !write(ctx, port_off, port_be) {
        return false;
    }
    let udp = pkt.proto == IPPROTO_UDP;
    let check_off = l4 + if udp { UDP_CHECK } else { TCP_CHECK };
    let Some(check) = read::<u16>(ctx, check_off) else {
        return false;
    };
    // An IPv4 UDP checksum of zero means "none" (RFC 768): leave it so.
    if udp && !pkt.v6 && check == 0 {
        return true;
    }
    let mut new = addr_delta.replace_u16(old_port, port_be).apply(check);
    // A computed UDP checksum of zero is sent as all ones (RFC 768; RFC 8200 section 8.1).
    if udp && new == 0 {
        new = 0xffff;
    }
    write(ctx, check_off, new)
}
