//! The packet as each program type hands it over: an XDP frame (before the kernel has made an
//! skb of it) or a TC socket buffer. The steering logic is written once, generic over
//! [`Frame`]; `main.rs` instantiates it for both.
//!
//! The one real difference is the L4 checksum. An XDP frame comes from the wire or from a
//! peer that computed full checksums, so an incremental update (RFC 1624) is right. An skb
//! from a local sender (a container behind a veth or a bridge, with TX checksum offload on,
//! the kernel's default) may carry only a *partial* checksum, the pseudo-header sum that the
//! device is to complete (`CHECKSUM_PARTIAL`): updating it as a full one corrupts it, and
//! the receiver drops the segment. On TC the kernel's checksum helpers, which know the
//! skb's checksum state, do the update.

use aya_ebpf::{
    bindings::{
        bpf_check_mtu_flags::BPF_MTU_CHK_SEGS, xdp_action, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR,
        TC_ACT_OK, TC_ACT_SHOT,
    },
    helpers::{bpf_check_mtu, bpf_csum_diff, bpf_redirect},
    programs::{TcContext, XdpContext},
    EbpfContext,
};
use core::{mem::size_of, ptr};

use orch_common::csum::Delta;

use crate::maps::XDP_TX;

/// The headers the program reads, at most: Ethernet, IPv6, ICMPv6 and the quoted IPv6
/// header and ports (TCP up to its sequence numbers is shorter). A TC program pulls this
/// much into the skb's linear part first, unless [`own_headers`] are there already.
const HEADERS: u32 = 14 + 40 + 8 + 40 + 8;

/// What the parse of a TCP or UDP packet reads: Ethernet, the IP header and the L4 header
/// (20 bytes of TCP, 8 of UDP); [`HEADERS`] for anything else (ICMP errors quote headers,
/// IPv6 extension headers, other protocols) or when too little is linear to tell.
///
/// Why it matters: a segment from a local TCP socket keeps its payload in page fragments
/// and its head shared with the socket's retransmit queue (a clone). Pulling [`HEADERS`]
/// from it would pull payload bytes in, which makes the kernel copy the head into a new
/// buffer, on every such packet, though the headers were all there.
#[inline(always)]
fn own_headers(ctx: &TcContext) -> u32 {
    let Some(ethertype) = read::<[u8; 2]>(ctx, 12) else {
        return HEADERS;
    };
    let (l3, proto) = match u16::from_be_bytes(ethertype) {
        0x0800 => match read::<[u8; 10]>(ctx, 14) {
            // Version and header length, ..., protocol.
            Some(h) => (u32::from(h[0] & 0x0f) * 4, h[9]),
            None => return HEADERS,
        },
        0x86dd => match read::<[u8; 7]>(ctx, 14) {
            // The next header field.
            Some(h) => (40, h[6]),
            None => return HEADERS,
        },
        _ => return HEADERS,
    };
    match proto {
        6 => 14 + l3 + 20,
        17 => 14 + l3 + 8,
        _ => HEADERS,
    }
}

/// An L4 checksum change: one end's address and port, from `old` to `new`.
pub struct L4Change<'a> {
    /// Offset of the checksum field.
    pub check_off: usize,
    pub v6: bool,
    pub udp: bool,
    pub old_addr: &'a [u32; 4],
    pub new_addr: &'a [u32; 4],
    pub old_port_be: u16,
    pub new_port_be: u16,
}

/// What the steering logic needs from a program type.
pub trait Frame: EbpfContext {
    /// The action that hands the packet to the kernel stack.
    const PASS: u32;
    /// The action that drops it.
    const DROP: u32;
    /// Whether the FIB lookup should check the MTU against the IP header's length. An skb
    /// may be a GRO aggregate far above the MTU that the kernel will segment: on TC the
    /// lookup checks the skb itself instead.
    const MTU_BY_IP_LEN: bool;

    /// Where direct access may read: `start()..end()`.
    fn start(&self) -> usize;
    fn end(&self) -> usize;
    /// The whole packet's length, past `end()` too (an skb's paged data).
    fn total_len(&self) -> usize;
    /// The interface the packet arrived on.
    fn ifindex(&self) -> u32;
    /// Makes the headers readable by direct access (a TC skb may hold them in fragments).
    fn prepare(&self);
    /// Updates the TCP/UDP checksum for the change; false if the packet is too short.
    fn fix_l4_csum(&self, c: &L4Change<'_>) -> bool;
    /// Whether a packet can be sent out of `ifindex` from this hook: asked before the
    /// packet is prepared for it, so that a refusal leaves it to the stack unchanged.
    fn can_send(&self, ifindex: u32) -> bool;
    /// Sends the packet out of `ifindex`: the action to return.
    fn send(&self, ifindex: u32) -> u32;
    /// Whether the packet fits the MTU of `ifindex` (an skb's GSO segments included). XDP
    /// leaves this to the FIB lookup, which checks the IP length.
    fn fits(&self, ifindex: u32) -> bool;
}

impl Frame for XdpContext {
    const PASS: u32 = xdp_action::XDP_PASS;
    const DROP: u32 = xdp_action::XDP_DROP;
    const MTU_BY_IP_LEN: bool = true;

    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }

    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }

    #[inline(always)]
    fn total_len(&self) -> usize {
        self.data_end() - self.data()
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        self.ingress_ifindex() as u32
    }

    #[inline(always)]
    fn prepare(&self) {}

    #[inline(always)]
    fn can_send(&self, ifindex: u32) -> bool {
        XDP_TX.get(ifindex).is_some()
    }

    #[inline(always)]
    fn fits(&self, _ifindex: u32) -> bool {
        true
    }

    #[inline(always)]
    fn send(&self, ifindex: u32) -> u32 {
        // The key was just found; if it went meanwhile, the packet goes to the stack.
        XDP_TX
            .redirect(ifindex, xdp_action::XDP_PASS as u64)
            .unwrap_or(xdp_action::XDP_PASS)
    }

    #[inline(always)]
    fn fix_l4_csum(&self, c: &L4Change<'_>) -> bool {
        let Some(check) = read::<u16>(self, c.check_off) else {
            return false;
        };
        // An IPv4 UDP checksum of zero means "none" (RFC 768): leave it so.
        if c.udp && !c.v6 && check == 0 {
            return true;
        }
        let delta = if c.v6 {
            Delta::new().replace_addr(c.old_addr, c.new_addr)
        } else {
            Delta::new().replace_u32(c.old_addr[3], c.new_addr[3])
        };
        let mut new = delta.replace_u16(c.old_port_be, c.new_port_be).apply(check);
        // A computed UDP checksum of zero is sent as all ones (RFC 768; RFC 8200 8.1).
        if c.udp && new == 0 {
            new = 0xffff;
        }
        write(self, c.check_off, new)
    }
}

impl Frame for TcContext {
    const PASS: u32 = TC_ACT_OK as u32;
    const DROP: u32 = TC_ACT_SHOT as u32;
    const MTU_BY_IP_LEN: bool = false;

    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }

    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }

    #[inline(always)]
    fn total_len(&self) -> usize {
        self.len() as usize
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: the context's skb, valid for the program's run.
        unsafe { (*self.skb.skb).ifindex }
    }

    #[inline(always)]
    fn can_send(&self, _ifindex: u32) -> bool {
        // From TC an skb can go out of any device.
        true
    }

    #[inline(always)]
    fn send(&self, ifindex: u32) -> u32 {
        // SAFETY: a helper taking plain integers.
        unsafe { bpf_redirect(ifindex, 0) as u32 }
    }

    #[inline(always)]
    fn fits(&self, ifindex: u32) -> bool {
        let mut mtu: u32 = 0;
        // SAFETY: the context's skb and a local the helper writes the MTU to.
        let rc =
            unsafe { bpf_check_mtu(self.as_ptr(), ifindex, &mut mtu, 0, BPF_MTU_CHK_SEGS as u64) };
        rc == 0
    }

    #[inline(always)]
    fn prepare(&self) {
        let linear = (self.end() - self.start()) as u32;
        let all = if self.len() < HEADERS {
            self.len()
        } else {
            HEADERS
        };
        if linear >= all || linear >= own_headers(self) {
            return;
        }
        // On failure the parse finds the headers short and passes the packet.
        let _ = self.pull_data(all);
    }

    #[inline(always)]
    fn fix_l4_csum(&self, c: &L4Change<'_>) -> bool {
        // UDP: a zero checksum (IPv4's "none") stays zero, a result of zero becomes ones.
        let udp = if c.udp {
            BPF_F_MARK_MANGLED_0 as u64
        } else {
            0
        };
        let pseudo = BPF_F_PSEUDO_HDR as u64 | udp;
        let addr = if c.v6 {
            // SAFETY: two 16-byte arrays, read by the helper.
            let diff = unsafe {
                bpf_csum_diff(
                    c.old_addr.as_ptr() as *mut u32,
                    16,
                    c.new_addr.as_ptr() as *mut u32,
                    16,
                    0,
                )
            };
            // Size 0: `to` is a checksum difference, `from` unused.
            self.l4_csum_replace(c.check_off, 0, diff as u64, pseudo)
        } else {
            self.l4_csum_replace(
                c.check_off,
                c.old_addr[3] as u64,
                c.new_addr[3] as u64,
                pseudo | 4,
            )
        };
        addr.is_ok()
            && self
                .l4_csum_replace(
                    c.check_off,
                    c.old_port_be as u64,
                    c.new_port_be as u64,
                    udp | 2,
                )
                .is_ok()
    }
}

/// Returns a pointer to a `T` at `offset` in the packet, or `None` if it would end past
/// `data_end`. The comparison is the bounds proof the verifier needs.
#[inline(always)]
pub fn ptr_at<T>(ctx: &impl Frame, offset: usize) -> Option<*mut T> {
    let start = ctx.start();
    let end = ctx.end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// Reads a `T` at `offset` (unaligned), or `None` past the end of the packet.
#[inline(always)]
pub fn read<T: Copy>(ctx: &impl Frame, offset: usize) -> Option<T> {
    // SAFETY: ptr_at proved `offset..offset + size_of::<T>()` is inside the packet.
    ptr_at::<T>(ctx, offset).map(|p| unsafe { ptr::read_unaligned(p) })
}

/// Writes a `T` at `offset` (unaligned); false past the end of the packet.
#[inline(always)]
pub fn write<T: Copy>(ctx: &impl Frame, offset: usize, value: T) -> bool {
    match ptr_at::<T>(ctx, offset) {
        Some(p) => {
            // SAFETY: as in `read`.
            unsafe { ptr::write_unaligned(p, value) };
            true
        }
        None => false,
    }
}
