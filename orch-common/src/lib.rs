//! Types shared by the kernel programs (`orch-ebpf`) and the daemon (`orch-userspace`).
//!
//! Everything that crosses the kernel/user boundary is defined once, here:
//! - [`maps`]: map names, keys and values (`#[repr(C)]`, explicit padding, size asserts);
//! - [`csum`]: RFC 1071/1624 checksum arithmetic, used by the data plane for incremental
//!   updates and unit-tested on the host;
//! - [`Reason`]: why the data plane gave each verdict, the index of its global counters;
//! - the capacity constants that size both the maps and the daemon's validation.
//!
//! The crate is `no_std` so the BPF target can use it; the `user` feature adds aya's `Pod`
//! implementations for the daemon.
#![no_std]

pub mod csum;
pub mod maps;

/// Default number of services the data plane can hold. The daemon may raise it at load time
/// (every per-service map is sized from the same figure).
pub const MAX_SERVICES: u32 = 1024;
/// Default number of backends over all services (the backend id space).
pub const MAX_BACKENDS: u32 = 16_384;
/// Slots in one service's round-robin table. Weights are reduced to this many slots; a
/// service can therefore have at most this many backends with a non-zero weight.
pub const SLOTS_PER_TABLE: u32 = 256;
/// Slots in one Maglev lookup table (a prime, as Maglev's permutations need; Cilium's
/// default). Balanced well up to about 160 backends (the paper wants 100 slots per backend).
pub const MAGLEV_SIZE: u32 = 16_381;
/// Default capacity of the confirmed-connection table (entries; each connection uses two:
/// forward and reply).
pub const CONNTRACK_CAPACITY: u32 = 262_144;
/// Default capacity of the unconfirmed-connection table (LRU): handshakes in flight and UDP
/// flows not yet answered. A SYN flood recycles this table and no other; its size decides
/// how long a real handshake has to complete under one (two entries per SYN: at 130,000
/// spoofed SYNs a second, one second).
pub const CONNTRACK_NEW_CAPACITY: u32 = 262_144;
/// Default idle time after which a UDP flow may be re-balanced, in nanoseconds.
pub const DEFAULT_UDP_IDLE_NS: u64 = 30_000_000_000;

/// How many further slots a new connection tries when its slot's backend was ejected by the
/// data plane (it refused a connection and the daemon has not yet rebuilt the table). The
/// kernel program follows it and `orch explain` predicts with it.
pub const EJECTED_RETRIES: u64 = 3;

/// IP protocol numbers the data plane balances.
pub const IPPROTO_TCP: u8 = 6;
/// See [`IPPROTO_TCP`].
pub const IPPROTO_UDP: u8 = 17;

/// Why the data plane returned the verdict it did. Every packet the program sees increments
/// exactly one of these counters (the per-CPU array [`maps::STATS_MAP`], indexed by this value).
///
/// `Pass*` reasons hand the packet to the kernel stack untouched (it is not ours, or we do not
/// steer it), `Fwd*`/`Reply*` are packets we translated, `Drop*` are packets we dropped.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Not IPv4 or IPv6 (ARP, LLDP, VLAN-tagged frames...).
    PassNotIp = 0,
    /// IP traffic that is neither for a VIP nor a reply from a backend: the fast path.
    PassNotService = 1,
    /// Protocol other than TCP or UDP (ICMP, GRE...).
    PassOtherProtocol = 2,
    /// An IPv4 fragment or an IPv6 packet with a fragment header: we cannot see the ports of
    /// every fragment, so we never steer any of them.
    PassFragment = 3,
    /// IPv4 options or IPv6 extension headers, which this version does not parse.
    PassIpOptions = 4,
    /// A header ends beyond the end of the packet.
    PassTruncated = 5,
    /// A header that cannot be valid: IHL below 5, a version that does not match the
    /// ethertype, a total length shorter than the headers.
    PassMalformed = 6,
    /// A new connection's packet, translated and forwarded with XDP_REDIRECT.
    FwdRedirect = 7,
    /// A translated packet handed to the kernel stack to route (no FIB result, neighbour not
    /// yet resolved, TTL about to expire, or redirect disabled).
    FwdStack = 8,
    /// A backend's reply, translated back to the VIP and redirected.
    ReplyRedirect = 9,
    /// A backend's reply, translated back to the VIP and handed to the stack.
    ReplyStack = 10,
    /// A new connection to a service whose round-robin table is empty (no backend with a
    /// non-zero weight).
    DropNoBackend = 11,
    /// The connection table refused an insert; the packet is dropped rather than forwarded
    /// without the state its replies need.
    DropConntrackFull = 12,
    /// A slot or backend lookup failed (the daemon wrote an inconsistent table). Never
    /// expected; counted so it would be seen.
    DropInternal = 13,
    /// A backend answered a new connection's SYN with RST. The RST is dropped and the
    /// connection forgotten, so the client's SYN retransmission is balanced again (to
    /// another backend: this one is ejected from selection at once).
    DropRefused = 14,
    /// A TCP segment without SYN (an ACK, FIN, RST, data...) for a VIP that matches no
    /// connection: a scan, a forgery, or a connection whose state was lost. Only a SYN may
    /// create state; balancing it would make the chosen backend answer with a RST, which
    /// must never be read as that backend refusing connections.
    DropTcpNoFlow = 15,
    /// A packet with a balanced backend's source address that arrived on an interface the
    /// backend is not routed through: whoever sent it is not that backend.
    DropReplyInterface = 16,
    /// A new connection whose translated 4-tuple (backend, client address and port) is
    /// already used by a live connection of another service that shares the backend; its
    /// replies could not be told apart. Dropped when no other backend is free of the clash:
    /// the client's SYN retransmission tries again.
    DropReplyCollision = 17,
    /// A balanced connection's packet bigger than the next hop takes (the FIB's or the
    /// device's MTU): left to the kernel untranslated, so that its ICMP "fragmentation
    /// needed" / "packet too big" goes to the sender with the sender's own packet quoted
    /// (path-MTU discovery then works through the load balancer).
    PassTooBig = 18,
    /// A balanced connection's packet whose TTL (hop limit) would expire here: left to the
    /// kernel untranslated, for its ICMP "time exceeded" to quote what was sent.
    PassTtlExpired = 19,
    /// An ICMP error about a balanced connection that came from the clients' side (its
    /// quoted packet is a reply from the VIP): translated and forwarded to the backend.
    IcmpToBackend = 20,
    /// An ICMP error about a balanced connection that came from the backends' side (its
    /// quoted packet went from a client to the backend): translated to the VIP and
    /// forwarded to the client.
    IcmpToClient = 21,
}

/// Connection-table events the program counts (per-CPU array [`maps::CT_EVENTS_MAP`],
/// indexed by this value).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtEvent {
    /// A connection moved from the unconfirmed table to the confirmed one.
    Confirmed = 0,
    /// A connection could not be confirmed: the confirmed table is full. It keeps working
    /// from the unconfirmed table, where a flood could evict it.
    ConfirmFailed = 1,
    /// A new connection's reply 4-tuple was held by another service's live connection (they
    /// share the backend, the client used one source port for both): it went to another
    /// backend, or was dropped as `drop_reply_collision` when there was none.
    ReplyCollision = 2,
}

impl CtEvent {
    /// Number of events: the size of the array.
    pub const COUNT: u32 = 3;
}

impl Reason {
    /// Number of reasons: the size of the statistics array.
    pub const COUNT: u32 = 22;

    /// Every reason, in index order.
    pub const ALL: [Reason; Self::COUNT as usize] = [
        Reason::PassNotIp,
        Reason::PassNotService,
        Reason::PassOtherProtocol,
        Reason::PassFragment,
        Reason::PassIpOptions,
        Reason::PassTruncated,
        Reason::PassMalformed,
        Reason::FwdRedirect,
        Reason::FwdStack,
        Reason::ReplyRedirect,
        Reason::ReplyStack,
        Reason::DropNoBackend,
        Reason::DropConntrackFull,
        Reason::DropInternal,
        Reason::DropRefused,
        Reason::DropTcpNoFlow,
        Reason::DropReplyInterface,
        Reason::DropReplyCollision,
        Reason::PassTooBig,
        Reason::PassTtlExpired,
        Reason::IcmpToBackend,
        Reason::IcmpToClient,
    ];

    /// A stable snake_case name, used in logs and (later) metric labels.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::PassNotIp => "pass_not_ip",
            Reason::PassNotService => "pass_not_service",
            Reason::PassOtherProtocol => "pass_other_protocol",
            Reason::PassFragment => "pass_fragment",
            Reason::PassIpOptions => "pass_ip_options",
            Reason::PassTruncated => "pass_truncated",
            Reason::PassMalformed => "pass_malformed",
            Reason::FwdRedirect => "fwd_redirect",
            Reason::FwdStack => "fwd_stack",
            Reason::ReplyRedirect => "reply_redirect",
            Reason::ReplyStack => "reply_stack",
            Reason::DropNoBackend => "drop_no_backend",
            Reason::DropConntrackFull => "drop_conntrack_full",
            Reason::DropInternal => "drop_internal",
            Reason::DropRefused => "drop_refused",
            Reason::DropTcpNoFlow => "drop_tcp_no_flow",
            Reason::DropReplyInterface => "drop_reply_interface",
            Reason::DropReplyCollision => "drop_reply_collision",
            Reason::PassTooBig => "pass_too_big",
            Reason::PassTtlExpired => "pass_ttl_expired",
            Reason::IcmpToBackend => "icmp_to_backend",
            Reason::IcmpToClient => "icmp_to_client",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_dense_and_in_order() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{} is out of place", r.name());
        }
    }
}
