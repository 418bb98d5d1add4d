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

use core::{mem::size_of, ptr};

use aya_ebpf::programs::XdpContext;
use orch_common::{maps::v4_mapped, Reason, IPPROTO_TCP, IPPROTO_UDP};

pub const ETH_HLEN: usize = 14;
pub const IPV4_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
/// IPv4 `frag_off` bits that mark a fragment: MF and the 13-bit offset (RFC 791).
const IP_MF_OFFSET_MASK: u16 = 0x3fff;
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;

/// IPv6 next-header values that are extension headers (RFC 8200 section 4, and AH/ESP).
const IPV6_EXT_HEADERS: [u8; 7] = [0, 43, 50, 51, 60, 135, 139];
const IPV6_FRAGMENT: u8 = 44;

/// Offset of the L4 header for each family (fixed: see the module docs).
pub const L4_OFF_V4: usize = ETH_HLEN + IPV4_HLEN;
pub const L4_OFF_V6: usize = ETH_HLEN + IPV6_HLEN;

/// Returns a pointer to a `T` at `offset` in the packet, or `None` if it would end past
/// `data_end`. The comparison is the bounds proof the verifier needs.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// Reads a `T` at `offset` (unaligned), or `None` past the end of the packet.
#[inline(always)]
pub fn read<T: Copy>(ctx: &XdpContext, offset: usize) -> Option<T> {
    // SAFETY: ptr_at proved `offset..offset + size_of::<T>()` is inside the packet.
    ptr_at::<T>(ctx, offset).map(|p| unsafe { ptr::read_unaligned(p) })
}

/// Writes a `T` at `offset` (unaligned); false past the end of the packet.
#[inline(always)]
pub fn write<T: Copy>(ctx: &XdpContext, offset: usize, value: T) -> bool {
    match ptr_at::<T>(ctx, offset) {
        Some(p) => {
            // SAFETY: as in `read`.
            unsafe { ptr::write_unaligned(p, value) };
            true
        }
        None => false,
    }
}

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
}

impl Packet {
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

/// Parses Ethernet, IP and the L4 ports. `Err` carries the reason to pass the packet.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Packet, Reason> {
    let ethertype = u16::from_be(read::<u16>(ctx, 12).ok_or(Reason::PassTruncated)?);
    match ethertype {
        ETH_P_IP => parse_v4(ctx),
        ETH_P_IPV6 => parse_v6(ctx),
        _ => Err(Reason::PassNotIp),
    }
}

#[inline(always)]
fn packet_len(ctx: &XdpContext) -> usize {
    ctx.data_end() - ctx.data()
}

#[inline(always)]
fn parse_v4(ctx: &XdpContext) -> Result<Packet, Reason> {
    // The whole fixed header must be present before any field is trusted.
    let hdr = read::<[u8; IPV4_HLEN]>(ctx, ETH_HLEN).ok_or(Reason::PassTruncated)?;
    let version = hdr[0] >> 4;
    let ihl = (hdr[0] & 0x0f) as usize;
    if version != 4 || ihl < 5 {
        return Err(Reason::PassMalformed);
    }
    let tot_len = u16::from_be_bytes([hdr[2], hdr[3]]);
    if (tot_len as usize) < ihl * 4 {
        return Err(Reason::PassMalformed);
    }
    if ETH_HLEN + tot_len as usize > packet_len(ctx) {
        return Err(Reason::PassTruncated);
    }
    if u16::from_be_bytes([hdr[6], hdr[7]]) & IP_MF_OFFSET_MASK != 0 {
        return Err(Reason::PassFragment);
    }
    let proto = hdr[9];
    let l4_min = l4_min_len(proto)?;
    if ihl != 5 {
        return Err(Reason::PassIpOptions);
    }
    if (tot_len as usize) < IPV4_HLEN + l4_min {
        return Err(Reason::PassMalformed);
    }
    let src = u32::from_ne_bytes([hdr[12], hdr[13], hdr[14], hdr[15]]);
    let dst = u32::from_ne_bytes([hdr[16], hdr[17], hdr[18], hdr[19]]);
    let (src_port_be, dst_port_be) = read_l4(ctx, L4_OFF_V4, proto)?;
    Ok(Packet {
        v6: false,
        proto,
        src: v4_mapped(src),
        dst: v4_mapped(dst),
        src_port_be,
        dst_port_be,
        l3_len: tot_len,
    })
}

#[inline(always)]
fn parse_v6(ctx: &XdpContext) -> Result<Packet, Reason> {
    let hdr = read::<[u8; 8]>(ctx, ETH_HLEN).ok_or(Reason::PassTruncated)?;
    if hdr[0] >> 4 != 6 {
        return Err(Reason::PassMalformed);
    }
    let payload_len = u16::from_be_bytes([hdr[4], hdr[5]]) as usize;
    // Addresses follow the first 8 bytes: read them as raw network-order words.
    let src = read::<[u32; 4]>(ctx, ETH_HLEN + 8).ok_or(Reason::PassTruncated)?;
    let dst = read::<[u32; 4]>(ctx, ETH_HLEN + 24).ok_or(Reason::PassTruncated)?;
    if L4_OFF_V6 + payload_len > packet_len(ctx) {
        return Err(Reason::PassTruncated);
    }
    let next = hdr[6];
    if next == IPV6_FRAGMENT {
        return Err(Reason::PassFragment);
    }
    if IPV6_EXT_HEADERS.contains(&next) {
        return Err(Reason::PassIpOptions);
    }
    let l4_min = l4_min_len(next)?;
    if payload_len < l4_min {
        return Err(Reason::PassMalformed);
    }
    let (src_port_be, dst_port_be) = read_l4(ctx, L4_OFF_V6, next)?;
    Ok(Packet {
        v6: true,
        proto: next,
        src,
        dst,
        src_port_be,
        dst_port_be,
        l3_len: (IPV6_HLEN + payload_len) as u16,
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

/// Reads the ports, after checking that the whole fixed L4 header (with its checksum field,
/// which NAT rewrites) is in the packet.
#[inline(always)]
fn read_l4(ctx: &XdpContext, off: usize, proto: u8) -> Result<(u16, u16), Reason> {
    if proto == IPPROTO_TCP {
        let tcp = read::<[u8; TCP_HLEN]>(ctx, off).ok_or(Reason::PassTruncated)?;
        // Data offset below 5 words cannot be a TCP header (RFC 9293 section 3.1).
        if tcp[12] >> 4 < 5 {
            return Err(Reason::PassMalformed);
        }
        Ok((
            u16::from_ne_bytes([tcp[0], tcp[1]]),
            u16::from_ne_bytes([tcp[2], tcp[3]]),
        ))
    } else {
        let udp = read::<[u8; UDP_HLEN]>(ctx, off).ok_or(Reason::PassTruncated)?;
        Ok((
            u16::from_ne_bytes([udp[0], udp[1]]),
            u16::from_ne_bytes([udp[2], udp[3]]),
        ))
    }
}
