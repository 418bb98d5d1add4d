//! Internet checksum arithmetic (RFC 1071) and incremental updates (RFC 1624).
//!
//! The data plane rewrites addresses and ports and must keep the IPv4 header checksum and
//! the TCP/UDP checksums right without summing the payload again. RFC 1624 eqn. 3 gives the
//! update: `HC' = ~(~HC + ~m + m')` for every 16-bit word `m` replaced by `m'`.
//!
//! Byte order: every value passed here is a *raw* load of packet memory (a `u16` or `u32`
//! read in the machine's native order, never converted). The one's-complement sum is
//! byte-order independent (RFC 1071 section 2(B)): summing byte-swapped words yields the
//! byte-swapped sum. So loading the checksum field, the old and the new words natively and
//! storing the result natively is correct on any host, and no `to_be`/`from_be` is needed
//! on the packet path.

/// Folds a 64-bit one's-complement accumulator into 16 bits.
///
/// Four folds are enough for any accumulator below 2^48, far more than the few dozen
/// words an update ever adds (unrolled: the BPF verifier prefers straight-line code).
#[inline(always)]
pub const fn fold(sum: u64) -> u16 {
    let s = (sum & 0xffff_ffff) + (sum >> 32);
    let s = (s & 0xffff) + (s >> 16);
    let s = (s & 0xffff) + (s >> 16);
    let s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// The change made to a packet's checksummed words, to be applied to one or more checksum
/// fields with [`Delta::apply`].
///
/// One delta for an address change can be applied both to the IPv4 header checksum and to
/// the TCP/UDP checksum (whose pseudo-header covers the addresses); the port change is added
/// to the L4 delta only.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Delta(u64);

impl Delta {
    /// No change.
    pub const fn new() -> Self {
        Delta(0)
    }

    /// Records that the 16-bit word `old` became `new` (raw loads, see the module docs).
    #[inline(always)]
    #[must_use]
    pub const fn replace_u16(self, old: u16, new: u16) -> Self {
        Delta(self.0 + (!old) as u64 + new as u64)
    }

    /// Records that the 32-bit word `old` became `new`. Summing 32-bit words and folding
    /// equals summing their 16-bit halves, so this is two `replace_u16` at once.
    #[inline(always)]
    #[must_use]
    pub const fn replace_u32(self, old: u32, new: u32) -> Self {
        Delta(self.0 + (!old) as u64 + new as u64)
    }

    /// Records that an address (IPv6, or IPv4 in its last word) changed. Only the words that
    /// differ matter, but adding `~m + m` for an unchanged word adds zero (mod 0xffff), so the
    /// caller need not care which family it has.
    #[inline(always)]
    #[must_use]
    pub const fn replace_addr(self, old: &[u32; 4], new: &[u32; 4]) -> Self {
        self.replace_u32(old[0], new[0])
            .replace_u32(old[1], new[1])
            .replace_u32(old[2], new[2])
            .replace_u32(old[3], new[3])
    }

    /// Both changes: for a checksum that covers the words of both (ICMPv6's covers the
    /// outer addresses and the quoted packet).
    #[inline(always)]
    #[must_use]
    pub const fn and(self, other: Delta) -> Self {
        Delta(self.0 + other.0)
    }

    /// Applies the recorded change to the checksum field `check` (RFC 1624 eqn. 3).
    #[inline(always)]
    pub const fn apply(self, check: u16) -> u16 {
        !fold((!check) as u64 + self.0)
    }
}

/// The one's-complement sum of `data` read as big-endian 16-bit words (an odd trailing byte
/// is padded with zero), added to `initial`. Not used on the packet path; it verifies the
/// incremental updates in tests and builds test packets.
pub fn sum_be(data: &[u8], initial: u64) -> u64 {
    let mut sum = initial;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u16::from_be_bytes([c[0], c[1]]) as u64;
    }
    if let [last] = chunks.remainder() {
        sum += (*last as u64) << 8;
    }
    sum
}

/// The Internet checksum of `data` (RFC 1071), as a big-endian value.
pub fn checksum_be(data: &[u8]) -> u16 {
    !fold(sum_be(data, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4 header with a known checksum (0xb861), the classic worked example.
    const IPV4_HDR: [u8; 20] = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8, 0x00,
        0x01, 0xc0, 0xa8, 0x00, 0xc7,
    ];

    fn with_zero_checksum(h: &[u8; 20]) -> [u8; 20] {
        let mut h = *h;
        h[10] = 0;
        h[11] = 0;
        h
    }

    fn raw_u16(b: &[u8]) -> u16 {
        u16::from_ne_bytes([b[0], b[1]])
    }

    fn raw_u32(b: &[u8]) -> u32 {
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
    }

    #[test]
    fn full_checksum_matches_known_answer() {
        assert_eq!(checksum_be(&with_zero_checksum(&IPV4_HDR)), 0xb861);
        // A header carrying its own correct checksum sums to zero.
        assert_eq!(checksum_be(&IPV4_HDR), 0);
    }

    #[test]
    fn odd_length_pads_with_zero() {
        assert_eq!(sum_be(&[0x12, 0x34, 0x56], 0), 0x1234 + 0x5600);
    }

    #[test]
    fn fold_handles_carries() {
        assert_eq!(fold(0xffff), 0xffff);
        assert_eq!(fold(0x1_0000), 1);
        assert_eq!(fold(0x1_fffe), 0xffff);
        assert_eq!(fold(0xffff_ffff_ffff), 0xffff);
    }

    /// Rewrites the destination address and TTL the way the data plane does and checks that
    /// the incremental result equals a full recomputation, for many addresses.
    #[test]
    fn incremental_ipv4_update_matches_full_recompute() {
        let mut seed = 0x1234_5678_u32;
        for _ in 0..10_000 {
            // xorshift: deterministic, covers carries in every position.
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            let mut h = IPV4_HDR;
            let old_daddr = raw_u32(&h[16..20]);
            let old_ttl_word = raw_u16(&h[8..10]);
            h[16..20].copy_from_slice(&seed.to_be_bytes());
            h[8] = h[8].wrapping_sub(1);
            let delta = Delta::new()
                .replace_u32(old_daddr, raw_u32(&h[16..20]))
                .replace_u16(old_ttl_word, raw_u16(&h[8..10]));
            let new_check = delta.apply(raw_u16(&IPV4_HDR[10..12]));
            h[10..12].copy_from_slice(&new_check.to_ne_bytes());
            assert_eq!(
                checksum_be(&h),
                0,
                "daddr {seed:#x}: incremental checksum {:#06x} is wrong",
                u16::from_be_bytes(new_check.to_ne_bytes())
            );
        }
    }

    #[test]
    fn replace_addr_covers_all_words() {
        let old: [u32; 4] = [0x0102_0304, 0x0506_0708, 0x090a_0b0c, 0x0d0e_0f10];
        let new: [u32; 4] = [0xffff_0000, 0x0000_ffff, 0x1234_5678, 0x9abc_def0];
        let mut bytes = [0u8; 32];
        for (i, w) in old.iter().enumerate() {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        let check = checksum_be(&bytes[..16]).to_be_bytes();
        let updated = Delta::new()
            .replace_addr(&old, &new)
            .apply(u16::from_ne_bytes(check));
        for (i, w) in new.iter().enumerate() {
            bytes[16 + i * 4..16 + i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        assert_eq!(
            updated.to_ne_bytes(),
            checksum_be(&bytes[16..]).to_be_bytes()
        );
    }

    #[test]
    fn unchanged_words_leave_checksum_alone() {
        let d = Delta::new().replace_u32(0xdead_beef, 0xdead_beef);
        assert_eq!(fold(d.0), 0xffff, "x + ~x is negative zero");
        // Applying a no-op delta keeps every non-zero checksum.
        for c in [1u16, 0x1234, 0xfffe] {
            assert_eq!(d.apply(c), c);
        }
    }
}
