//! Header parsing with every read bounds-checked against `data_end`.
//!
//! The verifier rejects any packet access it cannot prove to lie inside
//! `[data, data_end)`; [`ptr_at`] is the one place that proves it. Headers are read with
//! unaligned loads: the IP header starts 14 bytes into the frame, so its 32-bit fields are
//! not 4-byte aligned.
//!
//! We only steer packets whose layout is fixed: IPv4 without options (L4 at byte 34) and IPv6
//! whose next header is TCP or UDP (L4 at byte 54). Everything else is passed to the kernel
//! with the reason counted, so constant offsets keep the verifier's job (and ours) simple.

use core::ptr;

use crate::frame::{ptr_at, read, Frame};
use orch_common::{
    maps::{v4_mapped, FlowKey},
    Reason, IPPROTO_TCP, IPPROTO_UDP,
};

pub const ETH_HLEN: usize = 14;
pub const IPV4_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
/// IPv4 `frag_off` bits that mark a fragment: MF and the 13-bit offset (RFC 791).
const IP_MF_OFFSET_MASK: u16 = 0x3fff;
const TCP_HLEN: usize = 20;
/// Offsets of the sequence and acknowledgment numbers in the TCP header (RFC 9293).
const TCP_SEQ_OFF: usize = 4;
const TCP_ACK_SEQ_OFF: usize = 8;
const UDP_HLEN: usize = 8;

/// IPv6 next-header values that are extension headers (RFC 8200 section 4, and AH/ESP).
const IPV6_EXT_HEADERS: [u8; 7] = [0, 43, 50, 51, 60, 135, 139];
/// The IPv6 fragment header's next-header value.
pub const IPV6_FRAGMENT: u8 = 44;

/// Offset of the L4 header for each family (fixed: see the module docs).
pub const L4_OFF_V4: usize = ETH_HLEN + IPV4_HLEN;
pub const L4_OFF_V6: usize = ETH_HLEN + IPV6_HLEN;

/// What the steering logic needs to know of a TCP or UDP packet.
#[derive(Clone, Copy)]
pub struct Packet {
    /// IPv6 (true) or IPv4.
    pub v6: bool,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    /// Addresses, network order, IPv4-mapped for IPv4.
    pub src: [u32; 4],
    pub dst: [u32; 4],
    /// Ports, network order.
    pub src_port_be: u16,
    pub dst_port_be: u16,
    /// IP total length (header and payload), for byte counters and the FIB MTU check.
    pub l3_len: u16,
    /// The TCP flags byte (FIN 0x01, SYN 0x02, RST 0x04, ACK 0x10); 0 for UDP.
    pub tcp_flags: u8,
}

impl Packet {
    /// The connection-table key of this packet as it arrived, for direction `dir`
    /// (`DIR_FORWARD`: a client's packet; `DIR_REPLY`: a backend's).
    #[inline(always)]
    pub fn key(&self, dir: u8) -> FlowKey {
        FlowKey {
            src: self.src,
            dst: self.dst,
            src_port_be: self.src_port_be,
            dst_port_be: self.dst_port_be,
            proto: self.proto,
            dir,
            _pad: 0,
        }
    }

    /// The TCP sequence number (host order), if the header is in the packet.
    #[inline(always)]
    pub fn tcp_seq(&self, ctx: &impl Frame) -> Result<u32, Reason> {
        read::<u32>(ctx, self.l4_off() + TCP_SEQ_OFF)
            .map(u32::from_be)
            .ok_or(Reason::PassTruncated)
    }

    /// The TCP acknowledgment number (host order), if the header is in the packet.
    #[inline(always)]
    pub fn tcp_ack(&self, ctx: &impl Frame) -> Result<u32, Reason> {
        read::<u32>(ctx, self.l4_off() + TCP_ACK_SEQ_OFF)
            .map(u32::from_be)
            .ok_or(Reason::PassTruncated)
    }

    /// Offset of the L4 header.
    #[inline(always)]
    pub fn l4_off(&self) -> usize {
        if self.v6 {
            L4_OFF_V6
        } else {
            L4_OFF_V4
        }
    }
}

/// The IPv4 header without options (RFC 791), as laid out on the wire.
#[repr(C)]
struct Ipv4Hdr {
    version_ihl: u8,
    tos: u8,
    tot_len: u16,
    id: u16,
    frag_off: u16,
    ttl: u8,
    protocol: u8,
    check: u16,
    saddr: u32,
    daddr: u32,
}

/// The fixed IPv6 header (RFC 8200).
#[repr(C)]
struct Ipv6Hdr {
    version_flow: u32,
    payload_len: u16,
    next_header: u8,
    hop_limit: u8,
    saddr: [u32; 4],
    daddr: [u32; 4],
}

/// Reads field `$f` of the header at `$p` without copying the whole header (unaligned).
macro_rules! field {
    ($p:expr, $f:ident) => {
        // SAFETY: `$p` came from `ptr_at`, which proved the whole header is in the packet.
        unsafe { ptr::read_unaligned(ptr::addr_of!((*$p).$f)) }
    };
}

/// Parses Ethernet, IP and the L4 ports. `Err` carries the reason to pass the packet.
///
/// Order matters for the verifier: the L4 header's bounds are checked with `ptr_at` before
/// the IP length fields are compared with the packet length. The other way round, LLVM
/// derives the L4 bounds from that (scalar) comparison and drops the pointer check, and the
/// verifier, which cannot follow the deduction, rejects the program.
#[inline(always)]
pub fn parse(ctx: &impl Frame) -> Result<Packet, Reason> {
    let ethertype = u16::from_be(read::<u16>(ctx, 12).ok_or(Reason::PassTruncated)?);
    match ethertype {
        ETH_P_IP => parse_v4(ctx),
        ETH_P_IPV6 => parse_v6(ctx),
        _ => Err(Reason::PassNotIp),
    }
}

/// The whole packet's length: on TC, headers in the linear part, payload maybe in pages.
#[inline(always)]
fn packet_len(ctx: &impl Frame) -> usize {
    ctx.total_len()
}

#[inline(always)]
fn parse_v4(ctx: &impl Frame) -> Result<Packet, Reason> {
    let ip = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN).ok_or(Reason::PassTruncated)?;
    let version_ihl: u8 = field!(ip, version_ihl);
    let ihl = (version_ihl & 0x0f) as usize;
    if version_ihl >> 4 != 4 || ihl < 5 {
        return Err(Reason::PassMalformed);
    }
    if u16::from_be(field!(ip, frag_off)) & IP_MF_OFFSET_MASK != 0 {
        return Err(Reason::PassFragment);
    }
    let proto: u8 = field!(ip, protocol);
    let l4_min = l4_min_len(proto)?;
    if ihl != 5 {
        return Err(Reason::PassIpOptions);
    }
    let (src_port_be, dst_port_be, tcp_flags) = read_l4(ctx, L4_OFF_V4, proto)?;
    let tot_len = u16::from_be(field!(ip, tot_len));
    if (tot_len as usize) < IPV4_HLEN + l4_min {
        return Err(Reason::PassMalformed);
    }
    if ETH_HLEN + tot_len as usize > packet_len(ctx) {
        return Err(Reason::PassTruncated);
    }
    Ok(Packet {
        v6: false,
        proto,
        src: v4_mapped(field!(ip, saddr)),
        dst: v4_mapped(field!(ip, daddr)),
        src_port_be,
        dst_port_be,
        l3_len: tot_len,
        tcp_flags,
    })
}

#[inline(always)]
fn parse_v6(ctx: &impl Frame) -> Result<Packet, Reason> {
    let ip = ptr_at::<Ipv6Hdr>(ctx, ETH_HLEN).ok_or(Reason::PassTruncated)?;
    let version_flow: u32 = field!(ip, version_flow);
    if u32::from_be(version_flow) >> 28 != 6 {
        return Err(Reason::PassMalformed);
    }
    let next: u8 = field!(ip, next_header);
    if next == IPV6_FRAGMENT {
        return Err(Reason::PassFragment);
    }
    if IPV6_EXT_HEADERS.contains(&next) {
        return Err(Reason::PassIpOptions);
    }
    let l4_min = l4_min_len(next)?;
    let (src_port_be, dst_port_be, tcp_flags) = read_l4(ctx, L4_OFF_V6, next)?;
    let payload_len = u16::from_be(field!(ip, payload_len)) as usize;
    if payload_len < l4_min {
        return Err(Reason::PassMalformed);
    }
    if L4_OFF_V6 + payload_len > packet_len(ctx) {
        return Err(Reason::PassTruncated);
    }
    Ok(Packet {
        v6: true,
        proto: next,
        src: field!(ip, saddr),
        dst: field!(ip, daddr),
        src_port_be,
        dst_port_be,
        l3_len: (IPV6_HLEN + payload_len) as u16,
        tcp_flags,
    })
}

/// The minimum header length of a protocol we balance; anything else is passed.
#[inline(always)]
fn l4_min_len(proto: u8) -> Result<usize, Reason> {
    match proto {
        IPPROTO_TCP => Ok(TCP_HLEN),
        IPPROTO_UDP => Ok(UDP_HLEN),
        _ => Err(Reason::PassOtherProtocol),
    }
}

/// Reads the ports (and TCP's flags), after checking that the whole fixed L4 header (with
/// its checksum field, which NAT rewrites) is in the packet.
#[inline(always)]
fn read_l4(ctx: &impl Frame, off: usize, proto: u8) -> Result<(u16, u16, u8), Reason> {
    let (ports, flags) = if proto == IPPROTO_TCP {
        let tcp = ptr_at::<[u8; TCP_HLEN]>(ctx, off).ok_or(Reason::PassTruncated)?;
        // SAFETY: ptr_at proved the 20 bytes are in the packet.
        let (data_offset, flags) = unsafe { ((*tcp)[12] >> 4, (*tcp)[13]) };
        // Data offset below 5 words cannot be a TCP header (RFC 9293 section 3.1).
        if data_offset < 5 {
            return Err(Reason::PassMalformed);
        }
        (tcp.cast::<[u16; 2]>(), flags)
    } else {
        let udp = ptr_at::<[u8; UDP_HLEN]>(ctx, off).ok_or(Reason::PassTruncated)?;
        (udp.cast::<[u16; 2]>(), 0)
    };
    // SAFETY: both branches proved at least 8 bytes at `off`.
    let [src, dst] = unsafe { ptr::read_unaligned(ports) };
    Ok((src, dst, flags))
}
