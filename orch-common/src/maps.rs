//! Map names, keys and values shared by the kernel program and the daemon.
//!
//! Rules every type here follows (the kernel reads their bytes, not their Rust meaning):
//! - `#[repr(C)]`, `Copy`, explicit padding fields, no `bool`/`Option`/enum fields;
//! - a compile-time size assert, so a layout change cannot slip in unnoticed;
//! - addresses are `[u32; 4]` in network byte order (each word a raw copy of packet bytes),
//!   IPv4 as IPv4-mapped IPv6 (`::ffff:a.b.c.d`), so one layout serves both families;
//! - ports carry `_be` in their name: network byte order, as on the wire.
//!
//! Map names carry a layout version (`_V1`). A change to any key or value layout gets a new
//! name, so a daemon never reads old bytes as new ones when it adopts pinned maps.

use core::mem::size_of;

use crate::{MAGLEV_SIZE, SLOTS_PER_TABLE};

/// Services: [`ServiceKey`] → [`ServiceValue`] (hash).
pub const SERVICES_MAP: &str = "ORCH_SVC_V1";
/// Round-robin slot tables: `service id * 2 + table` → [`SlotTable`] (array).
pub const SLOTS_MAP: &str = "ORCH_SLOTS_V1";
/// Maglev lookup tables: `service id * 2 + table` → [`MaglevTable`] (hash without
/// preallocation: only services whose scheduler is Maglev take memory, 64 KiB per table).
pub const MAGLEV_MAP: &str = "ORCH_MAGLEV_V1";
/// Replies that no connection-table entry knows, for Maglev services: [`BackendKey`] →
/// [`MaglevReply`] (hash).
pub const MAGLEV_REPLY_MAP: &str = "ORCH_MAGLEV_REPLY_V1";
/// Which services are live: service id → its incarnation (`u32`, array), 0 for a free id.
/// The daemon gives a service a new incarnation when it installs it under an id and clears
/// it when it removes the service; connections record it ([`FlowValue::service_gen`]), so
/// that their packets need no service lookup while their service lives. One slot past the
/// last id holds the highest incarnation ever given, so that none is given twice, across
/// restarts too.
pub const SERVICE_LIVE_MAP: &str = "ORCH_SVC_LIVE_V1";
/// Backends: backend id → [`Backend`] (array).
pub const BACKENDS_MAP: &str = "ORCH_BE_V1";
/// Per-service new-connection cursor: service id → `u64` (per-CPU array).
pub const CURSORS_MAP: &str = "ORCH_CURSOR_V1";
/// Confirmed connections: [`FlowKey`] → [`FlowValue`] (hash, never evicts). A TCP
/// connection enters it when the client acknowledges the backend's SYN-ACK (proof that the
/// client is real and sees the backend's answers), a UDP flow when the backend answers. The
/// daemon removes closed and idle entries; nothing a client sends can push one out.
pub const CONNTRACK_MAP: &str = "ORCH_CT_V3";
/// Unconfirmed connections: [`FlowKey`] → [`FlowValue`] (LRU hash). Every new connection
/// starts here; a SYN flood recycles this table only.
pub const CONNTRACK_NEW_MAP: &str = "ORCH_CT_NEW_V3";
/// The two connection tables of layout 2 ([`v2::FlowValue`]): confirmed, then unconfirmed.
/// A daemon that finds them pinned migrates their entries into [`CONNTRACK_MAP`] and
/// [`CONNTRACK_NEW_MAP`] before it swaps its program in.
pub const CONNTRACK_MAPS_V2: [&str; 2] = ["ORCH_CT_V2", "ORCH_CT_NEW_V2"];
/// The connection table of the previous layout ([`v1::FlowValue`], one LRU table); a daemon
/// that finds it pinned migrates its entries into [`CONNTRACK_MAP`] before it swaps its
/// program in.
pub const CONNTRACK_MAP_V1: &str = "ORCH_CT_V1";
/// Port pre-filter: index [`PORTS_VIP`] / [`PORTS_BACKEND`] → [`PortBitmap`] (array).
pub const PORTS_MAP: &str = "ORCH_PORTS_V1";
/// Datagrams in fragments being translated: [`FragKey`] → [`FragValue`] (LRU hash, not
/// pinned: a fragment outlives nothing but its datagram's others, a second or so).
pub const FRAGS_MAP: &str = "ORCH_FRAGS_V1";
/// Capacity of [`FRAGS_MAP`]: datagrams in flight at once.
pub const FRAGS_CAPACITY: u32 = 8192;
/// Interfaces an XDP program may redirect to: ifindex → ifindex (devmap hash). The daemon
/// lists the devices it attached natively to, whose drivers take redirected frames; a
/// route through any other device is left to the kernel stack, so a redirect never vanishes
/// into a device that cannot transmit it.
pub const XDP_TX_MAP: &str = "ORCH_XDP_TX_V1";
/// Capacity of [`XDP_TX_MAP`]: interfaces the balancer attaches to natively.
pub const XDP_TX_CAPACITY: u32 = 256;
/// The route generation: index 0 → `u32` (array), never 0. Moved by the daemon whenever
/// something a cached next hop depends on changes (see [`CachedHop`]).
pub const ROUTE_GEN_MAP: &str = "ORCH_ROUTE_GEN_V1";
/// Runtime settings: index 0 → [`Settings`] (array).
pub const SETTINGS_MAP: &str = "ORCH_CFG_V1";
/// Verdict counters: [`crate::Reason`] → `u64` (per-CPU array).
pub const STATS_MAP: &str = "ORCH_STATS_V4";
/// The verdict counters of earlier layouts (fewer reasons, same indices); migrated into
/// [`STATS_MAP`] so that counters never go backwards across an upgrade.
pub const STATS_MAPS_BEFORE: [&str; 2] = ["ORCH_STATS_V2", "ORCH_STATS_V3"];
/// Connection-table events: [`crate::CtEvent`] → `u64` (per-CPU array).
pub const CT_EVENTS_MAP: &str = "ORCH_CT_EV_V1";
/// Entries added to and removed from the unconfirmed table, by whom: [`CT_NEW_INSERTED`]..
/// → `u64` (per-CPU array, [`CT_NEW_OPS`] slots). The kernel evicts from an LRU without
/// telling anyone; with the table's exact element count, these give the evictions:
/// inserted + adopted − removed − expired − present.
pub const CT_NEW_OPS_MAP: &str = "ORCH_CT_NEW_OPS_V1";
/// Entries the program inserted (each a new key; written after the insert).
pub const CT_NEW_INSERTED: u32 = 0;
/// Entries the program removed (a confirmation moves two out, a refusal forgets two; written
/// before the removal and taken back if it fails).
pub const CT_NEW_REMOVED: u32 = 1;
/// Entries the daemon's expiry removed. Written by the daemon only.
pub const CT_NEW_EXPIRED: u32 = 2;
/// Entries the table held when these counters began (an upgrade from a layout that did not
/// count). Written by the daemon only.
pub const CT_NEW_ADOPTED: u32 = 3;
/// Number of slots in [`CT_NEW_OPS_MAP`].
pub const CT_NEW_OPS: u32 = 4;
/// Per-service traffic: service id → [`TrafficCounters`] (per-CPU array).
pub const SERVICE_STATS_MAP: &str = "ORCH_SVC_ST_V1";
/// Per-backend traffic: backend id → [`TrafficCounters`] (per-CPU array).
pub const BACKEND_STATS_MAP: &str = "ORCH_BE_ST_V1";
/// Passive health signals per backend: backend id → [`BackendSignals`] (per-CPU array).
pub const BACKEND_SIGNALS_MAP: &str = "ORCH_BE_SIG_V2";
/// The passive signals of the previous layout ([`v1::BackendSignals`], without the SYN
/// times); migrated into [`BACKEND_SIGNALS_MAP`] so that its counters never go backwards.
pub const BACKEND_SIGNALS_MAP_V1: &str = "ORCH_BE_SIG_V1";
/// Backends the data plane ejected itself: backend id → non-zero when a backend refused a
/// connection (array of u32). New connections skip them; the daemon clears the mark once
/// probes find the backend healthy again.
pub const BACKEND_DOWN_MAP: &str = "ORCH_BE_DOWN_V1";
/// Socket-level balancing: the VIP each balanced socket connected to, by socket cookie
/// ([`SockPeer`]), so that `getpeername()` answers the VIP. An LRU: a closed socket's entry
/// leaves when room is needed.
pub const SOCK_PEERS_MAP: &str = "ORCH_SOCK_PEERS_V1";
/// Capacity of [`SOCK_PEERS_MAP`]: sockets balanced at connect time and still open.
pub const SOCK_PEERS_CAPACITY: u32 = 65_536;
/// Socket-level balancing of unconnected UDP sockets: the backend each socket's datagrams
/// to a VIP go to ([`SockFlowKey`] with the VIP -> [`SockFlow`]), so that a socket's flow
/// keeps its backend; and the way back ([`SockFlowKey`] with the backend -> the VIP), so
/// that answers seem to come from the VIP. LRUs: an idle socket's entries leave when room
/// is needed.
pub const SOCK_UDP_MAP: &str = "ORCH_SOCK_UDP_V1";
/// See [`SOCK_UDP_MAP`].
pub const SOCK_UDP_REV_MAP: &str = "ORCH_SOCK_UDP_REV_V1";
/// Capacity of each of [`SOCK_UDP_MAP`] and [`SOCK_UDP_REV_MAP`].
pub const SOCK_UDP_CAPACITY: u32 = 65_536;

/// Socket-level balancing's counters, per CPU: see [`SockEvent`].
pub const SOCK_STATS_MAP: &str = "ORCH_SOCK_ST_V1";

/// What the socket-level programs count.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SockEvent {
    /// A `connect()` to a VIP rewritten to a backend.
    Connect = 0,
    /// A `connect()` to a VIP whose service has no backend in rotation: left as it was
    /// (it meets the VIP's unreachable route).
    NoBackend = 1,
    /// A `getpeername()` answered with the VIP.
    Peername = 2,
    /// A datagram an unconnected UDP socket sent to a VIP, sent to a backend.
    Sendmsg = 3,
    /// A datagram from a backend, received as from the VIP.
    Recvmsg = 4,
}

impl SockEvent {
    pub const COUNT: u32 = 5;
    pub const ALL: [SockEvent; Self::COUNT as usize] = [
        SockEvent::Connect,
        SockEvent::NoBackend,
        SockEvent::Peername,
        SockEvent::Sendmsg,
        SockEvent::Recvmsg,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            SockEvent::Connect => "connect",
            SockEvent::NoBackend => "no_backend",
            SockEvent::Peername => "peername",
            SockEvent::Sendmsg => "sendmsg",
            SockEvent::Recvmsg => "recvmsg",
        }
    }
}

/// The key of [`SOCK_UDP_MAP`] and [`SOCK_UDP_REV_MAP`]: a socket (its cookie) and the far
/// end's address and port (network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockFlowKey {
    pub cookie: u64,
    pub addr: [u32; 4],
    pub port_be: u16,
    pub _pad: [u8; 6],
}
const _: () = assert!(size_of::<SockFlowKey>() == 32);

/// The value of [`SOCK_UDP_MAP`] (the backend) and [`SOCK_UDP_REV_MAP`] (the VIP), with
/// when the flow last sent: idle past the UDP idle timeout, it is balanced afresh.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockFlow {
    pub addr: [u32; 4],
    pub port_be: u16,
    pub _pad: u16,
    pub backend_id: u32,
    pub last_ns: u64,
}
const _: () = assert!(size_of::<SockFlow>() == 32);

/// The value of [`SOCK_PEERS_MAP`]: the VIP a socket connected to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockPeer {
    pub vip: [u32; 4],
    pub port_be: u16,
    pub _pad: u16,
}
const _: () = assert!(size_of::<SockPeer>() == 20);

/// Index of the VIP-port bitmap in [`PORTS_MAP`]: destination ports of any service.
pub const PORTS_VIP: u32 = 0;
/// Index of the backend-port bitmap in [`PORTS_MAP`]: source ports of any backend's replies.
pub const PORTS_BACKEND: u32 = 1;

/// The IPv4-mapped prefix word (`::ffff:0:0/96`, third word) as a raw network-order `u32`.
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// Builds an IPv4-mapped address from a raw (network-order) IPv4 word.
#[inline(always)]
pub const fn v4_mapped(addr_be: u32) -> [u32; 4] {
    [0, 0, V4_MAPPED_WORD, addr_be]
}

/// True when `addr` is IPv4-mapped (so the flow is IPv4).
#[inline(always)]
pub const fn is_v4_mapped(addr: &[u32; 4]) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == V4_MAPPED_WORD
}

/// A service: one virtual IP, port and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    /// The VIP, network order, IPv4-mapped for IPv4.
    pub vip: [u32; 4],
    /// The service port, network order.
    pub port_be: u16,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<ServiceKey>() == 20);

/// What the data plane knows of a service.
///
/// The daemon replaces the whole value with one map update when it flips `active_table`;
/// a hash-map update swaps the element under RCU, so a packet reads either the old value or
/// the new one, never a mix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    /// Dense id (`< max services`): index of the cursor, the slot tables and the counters.
    pub id: u32,
    /// Which of the service's two slot tables (0 or 1) new connections use.
    pub active_table: u32,
    /// Per-service options: [`SERVICE_MAGLEV`]; the other bits are zero.
    pub flags: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<ServiceValue>() == 16);

/// A service's weighted round-robin order: new connection `n` goes to
/// `backend_ids[n % len]`. Written whole by the daemon while inactive, then activated by
/// flipping [`ServiceValue::active_table`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotTable {
    /// Number of used slots; 0 means no backend takes new connections.
    pub len: u32,
    pub _pad: u32,
    /// Backend ids in smooth weighted round-robin order.
    pub backend_ids: [u32; SLOTS_PER_TABLE as usize],
}
const _: () = assert!(size_of::<SlotTable>() == 8 + 4 * SLOTS_PER_TABLE as usize);

impl SlotTable {
    /// The used slots' ids (never past the array, whatever `len` says).
    pub fn used(&self) -> &[u32] {
        &self.backend_ids[..(self.len as usize).min(self.backend_ids.len())]
    }
}

impl Default for SlotTable {
    fn default() -> Self {
        SlotTable {
            len: 0,
            _pad: 0,
            backend_ids: [0; SLOTS_PER_TABLE as usize],
        }
    }
}

/// [`ServiceValue::flags`]: new connections are hashed into the service's Maglev table
/// ([`MAGLEV_MAP`]) instead of taking its round-robin slots.
pub const SERVICE_MAGLEV: u32 = 1;

/// A service's Maglev lookup table: a new flow goes to `backend_ids[flow_hash % len]`.
/// Written whole by the daemon while inactive, activated like a [`SlotTable`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevTable {
    /// [`MAGLEV_SIZE`], or 0 when no backend takes new connections.
    pub len: u32,
    pub backend_ids: [u32; MAGLEV_SIZE as usize],
}
const _: () = assert!(size_of::<MaglevTable>() == 4 + 4 * MAGLEV_SIZE as usize);

impl MaglevTable {
    /// The used ids (none when `len` is 0; never past the array, whatever `len` says).
    pub fn used(&self) -> &[u32] {
        &self.backend_ids[..(self.len as usize).min(self.backend_ids.len())]
    }
}

impl Default for MaglevTable {
    fn default() -> Self {
        MaglevTable {
            len: 0,
            backend_ids: [0; MAGLEV_SIZE as usize],
        }
    }
}

/// The hash Maglev services place a flow with: of its addresses, ports and protocol as
/// the client sent them (network order words, as in [`FlowKey`]). Fixed and documented
/// (MurmurHash3's 32-bit mixing, word by word), so that every orch host, and every version,
/// sends a flow to the same slot: the kernel program computes it per new flow, the daemon
/// to predict (`orch explain`), the tests to check.
#[inline(always)]
pub fn flow_hash(
    src: &[u32; 4],
    dst: &[u32; 4],
    src_port_be: u16,
    dst_port_be: u16,
    proto: u8,
) -> u32 {
    #[inline(always)]
    fn round(h: u32, k: u32) -> u32 {
        let k = k
            .wrapping_mul(0xcc9e_2d51)
            .rotate_left(15)
            .wrapping_mul(0x1b87_3593);
        (h ^ k)
            .rotate_left(13)
            .wrapping_mul(5)
            .wrapping_add(0xe654_6b64)
    }
    let mut h = 0x6f72_6368; // "orch"
    let mut i = 0;
    while i < 4 {
        h = round(h, src[i]);
        h = round(h, dst[i]);
        i += 1;
    }
    h = round(h, (u32::from(src_port_be) << 16) | u32::from(dst_port_be));
    h = round(h, u32::from(proto));
    // The finalizer: the input's length in bytes (9 words), then every input bit reaches
    // every output bit.
    h ^= 36;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// A backend as its packets arrive: source address, port and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    /// Network order, IPv4-mapped for IPv4.
    pub addr: [u32; 4],
    pub port_be: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<BackendKey>() == 20);

/// Where a backend of a Maglev service answers from, so that its packets can be translated
/// back without a connection-table entry: when the flow was balanced by another orch host
/// (an ECMP change moved it here) or before this host lost its table. Only backends that
/// serve exactly one Maglev service are listed (for two, the VIP would be a guess).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MaglevReply {
    /// The service's VIP, network order, IPv4-mapped for IPv4.
    pub vip: [u32; 4],
    pub port_be: u16,
    pub _pad: u16,
    pub service_id: u32,
    pub backend_id: u32,
}
const _: () = assert!(size_of::<MaglevReply>() == 28);

/// Index of a service's slot table `table` (0 or 1) in [`SLOTS_MAP`].
#[inline(always)]
pub const fn slot_table_index(service_id: u32, table: u32) -> u32 {
    service_id * 2 + (table & 1)
}

/// [`Backend::service_id`] of an entry no service uses.
pub const NO_SERVICE: u32 = u32::MAX;

/// A backend: where the data plane sends a connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// Address, network order, IPv4-mapped for IPv4. Same family as its service's VIP.
    pub addr: [u32; 4],
    /// Port, network order.
    pub port_be: u16,
    pub _pad: u16,
    /// The service this backend belongs to (for counters and sanity checks), or
    /// [`NO_SERVICE`] for a free entry. A restarted daemon rebuilds its view of which
    /// backends each service has from this field.
    pub service_id: u32,
}
const _: () = assert!(size_of::<Backend>() == 24);

impl Backend {
    /// The value of a free entry.
    pub const FREE: Backend = Backend {
        addr: [0; 4],
        port_be: 0,
        _pad: 0,
        service_id: NO_SERVICE,
    };

    /// Whether a service uses this entry (written entries always have a non-zero port).
    pub const fn in_use(&self) -> bool {
        self.port_be != 0 && self.service_id != NO_SERVICE
    }
}

/// [`FlowValue::seen`]: a FIN went this way.
pub const SEEN_FIN: u32 = 1;
/// [`FlowValue::seen`]: a RST went this way.
pub const SEEN_RST: u32 = 2;
/// [`FlowValue::seen`] of a reply entry: the backend's SYN-ACK to the balanced SYN went
/// through (the handshake latency was measured; later RSTs are not refusals).
pub const SEEN_SYNACK: u32 = 4;
/// TCP header flags (RFC 9293 section 3.1).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Whether TCP `flags` open a connection: SYN alone (ACK, RST and FIN clear; PSH, URG, ECE
/// and CWR may ride along). Only such a segment may create connection state: anything
/// else that matches no entry is stray (lost state, a scan, a forgery) and is dropped.
#[inline(always)]
pub const fn tcp_opens(flags: u8) -> bool {
    flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN
}

impl FlowValue {
    /// The [`SEEN_FIN`] / [`SEEN_RST`] / [`SEEN_SYNACK`] summary of this entry's flags.
    #[inline(always)]
    pub const fn seen(&self) -> u32 {
        (if self.fin != 0 { SEEN_FIN } else { 0 })
            | (if self.rst != 0 { SEEN_RST } else { 0 })
            | (if self.synack != 0 { SEEN_SYNACK } else { 0 })
    }

    /// Whether a connection whose two entries have seen `a` and `b` ([`FlowValue::seen`])
    /// is over.
    pub const fn closed(a: u32, b: u32) -> bool {
        (a | b) & SEEN_RST != 0 || (a & SEEN_FIN != 0 && b & SEEN_FIN != 0)
    }
}

/// Direction of a connection-table entry.
pub const DIR_FORWARD: u8 = 0;
/// See [`DIR_FORWARD`].
pub const DIR_REPLY: u8 = 1;

/// The fragments of one IP datagram, as they arrive (before translation): its addresses,
/// identification (IPv4: 16 bits, IPv6: 32) and protocol. See [`FRAGS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub id: u32,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<FragKey>() == 40);

/// How the first fragment of a datagram was translated, for the fragments after it (which
/// carry no ports): the new address, on which side, and the connection's ids for counting.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragValue {
    pub addr: [u32; 4],
    /// [`DIR_FORWARD`]: the destination was rewritten (a client's datagram to a backend);
    /// [`DIR_REPLY`]: the source (a backend's answer, to the VIP).
    pub dir: u8,
    pub _pad: [u8; 3],
    pub service_id: u32,
    pub backend_id: u32,
    pub _pad2: u32,
}
const _: () = assert!(size_of::<FragValue>() == 32);

/// A connection-table key: the full 5-tuple as seen on the wire, plus the direction.
///
/// Forward entries are keyed by the client's packet (`src` = client, `dst` = VIP); reply
/// entries by the backend's packet (`src` = backend, `dst` = client). Each connection has one
/// of each, so both directions are one lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub src_port_be: u16,
    pub dst_port_be: u16,
    pub proto: u8,
    /// [`DIR_FORWARD`] or [`DIR_REPLY`].
    pub dir: u8,
    pub _pad: u16,
}
const _: () = assert!(size_of::<FlowKey>() == 40);

impl FlowKey {
    /// [`flow_hash`] of this key's flow.
    #[inline(always)]
    pub fn hash(&self) -> u32 {
        flow_hash(
            &self.src,
            &self.dst,
            self.src_port_be,
            self.dst_port_be,
            self.proto,
        )
    }

    /// The key of the reply entry of a connection whose forward entry is `self`, balanced
    /// to `backend_addr`:`backend_port_be`: the backend's packets as they arrive.
    #[inline(always)]
    pub const fn reply(&self, backend_addr: [u32; 4], backend_port_be: u16) -> FlowKey {
        FlowKey {
            src: backend_addr,
            dst: self.src,
            src_port_be: backend_port_be,
            dst_port_be: self.src_port_be,
            proto: self.proto,
            dir: DIR_REPLY,
            _pad: 0,
        }
    }

    /// The key of the forward entry of a connection whose reply entry is (`self`, `reply`):
    /// the client's packets as they arrive.
    #[inline(always)]
    pub const fn forward_of(&self, reply: &FlowValue) -> FlowKey {
        FlowKey {
            src: self.dst,
            dst: reply.nat_addr,
            src_port_be: self.dst_port_be,
            dst_port_be: reply.nat_port_be,
            proto: self.proto,
            dir: DIR_FORWARD,
            _pad: 0,
        }
    }
}

/// Where a connection's packets leave, as the kernel's FIB resolved it: cached in each
/// connection-table entry so that an established packet pays a comparison instead of a FIB
/// lookup (about a quarter of the established path's cost when it ran on every packet).
///
/// An entry holds a route the FIB resolved to a redirect (interface and both MACs), or the
/// decision to leave the packets to the kernel stack (`ifindex` 0: no route forwards them,
/// as for a backend on this host, or a device this hook cannot send to). A neighbour not
/// yet resolved is not cached: the stack resolves it, and the next packets are redirected.
/// Within the length it was checked for (`fits_len`), a stale stack decision costs speed
/// only: the stack forwards as the FIB says now. Either stays valid while [`ROUTE_GEN_MAP`]
/// holds the generation it was filled under: the daemon moves the generation when a route,
/// a neighbour's link-layer address, a link or an address changes, and when an interface
/// becomes or stops being a redirect target. The data plane also empties it whenever it
/// refreshes the entry's timestamp (at most every [`Settings::touch_interval_ns`]), which
/// bounds its age by itself when no daemon runs and for changes no notification reports (a
/// learnt path MTU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CachedHop {
    /// The generation it was filled under; 0: empty (the generation is never 0).
    pub gen: u32,
    /// The interface to redirect to; 0: to the kernel stack, translated.
    pub ifindex: u32,
    /// The next hop's MAC (the frame's destination).
    pub dmac: [u8; 6],
    /// The egress interface's MAC (the frame's source).
    pub smac: [u8; 6],
    /// XDP: the largest IP length the FIB checked against this route's MTU; a longer packet
    /// is looked up afresh (and may be too big). On TC the MTU is checked per packet, and a
    /// TC fill of a redirect leaves 0: an XDP program that meets the entry (a hook changed)
    /// looks up. A stack decision for want of a route holds for any length (`u16::MAX`), on
    /// either hook; TC uses no other stack decision.
    pub fits_len: u16,
    pub _pad: u16,
}
const _: () = assert!(size_of::<CachedHop>() == 24);

/// A connection-table value: the address and port to write into the packet, what the data
/// plane has seen of the connection, and where its packets leave.
///
/// Layout 3 (`ORCH_CT_V3`, `ORCH_CT_NEW_V3`). Against [`v2::FlowValue`]: the cached next
/// hop ([`CachedHop`]) and the service's incarnation (`service_gen`) are new.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    /// Forward: the backend's address; reply: the VIP.
    pub nat_addr: [u32; 4],
    /// Forward: the backend's port; reply: the service port. Network order.
    pub nat_port_be: u16,
    pub _pad: u16,
    /// The backend chosen for the connection (counters).
    pub backend_id: u32,
    /// The service of the connection (counters).
    pub service_id: u32,
    /// Non-zero once a FIN went this way.
    ///
    /// Each flag is a byte of its own, set with a single store and never read-modified-
    /// written: the two directions of a connection (and, with RSS, one direction) run on
    /// different CPUs, and a shared bit word updated with a plain `|=` loses one of two
    /// flags set at once (a lost FIN left a connection "live" for `drain --wait`). Flags are
    /// written only by the few packets that carry them, so the hot path stays read-only.
    pub fin: u8,
    /// Non-zero once a RST went this way.
    pub rst: u8,
    /// Reply entries: non-zero once the backend's SYN-ACK to the balanced SYN went through.
    pub synack: u8,
    pub _flags_pad: u8,
    /// The client's initial sequence number plus one (host order): what a SYN-ACK or a RST
    /// that answers the balanced SYN acknowledges. Only such a RST is a refusal.
    pub syn_next: u32,
    /// Forward entries: the backend's initial sequence number plus one (host order), learnt
    /// from its SYN-ACK; 0 before. A client segment that acknowledges exactly this confirms
    /// the connection: a spoofed source never sees the SYN-ACK, so it cannot.
    pub peer_next: u32,
    /// Reply entries: the interface through which the backend is routed (the forward
    /// path's FIB egress). A packet with the backend's source address that arrives on
    /// another interface did not come from the backend and is dropped. 0: not checked (an
    /// entry migrated from layout 1, which did not record it).
    pub ifindex: u32,
    /// The incarnation of the service the connection was balanced for ([`SERVICE_LIVE_MAP`];
    /// both entries carry it, the forward one is read). While the service's slot still holds
    /// it, an established packet skips the service lookup; otherwise (the service was
    /// removed, or its id went to another one) the packet is checked against the service
    /// table as a new one would be. 0: always checked (entries migrated from layout 2).
    pub service_gen: u32,
    /// `bpf_ktime_get_ns()` when the connection's first packet was balanced: the start of
    /// the handshake latency the SYN-ACK measures.
    pub created_ns: u64,
    /// `bpf_ktime_get_ns()` of the last packet seen this way, refreshed at most every
    /// [`Settings::touch_interval_ns`] to keep the hot path free of shared writes. The
    /// daemon expires idle and closed connections by it.
    pub last_seen_ns: u64,
    /// The next hop of this direction's packets (see [`CachedHop`]).
    pub hop: CachedHop,
}
const _: () = assert!(size_of::<FlowValue>() == 88);

/// Layout 2 of the connection table (`ORCH_CT_V2`, `ORCH_CT_NEW_V2`), kept to migrate its
/// entries.
pub mod v2 {
    use core::mem::size_of;

    /// A connection-table value as layout 2 stored it: layout 3's without the next hop.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct FlowValue {
        pub nat_addr: [u32; 4],
        pub nat_port_be: u16,
        pub _pad: u16,
        pub backend_id: u32,
        pub service_id: u32,
        pub fin: u8,
        pub rst: u8,
        pub synack: u8,
        pub _flags_pad: u8,
        pub syn_next: u32,
        pub peer_next: u32,
        pub ifindex: u32,
        pub _pad2: u32,
        pub created_ns: u64,
        pub last_seen_ns: u64,
    }
    const _: () = assert!(size_of::<FlowValue>() == 64);

    impl FlowValue {
        /// The entry in layout 3, with no next hop cached (its next packet looks it up) and no
        /// service incarnation (its packets are checked against the service table).
        pub const fn upgrade(&self) -> super::FlowValue {
            super::FlowValue {
                nat_addr: self.nat_addr,
                nat_port_be: self.nat_port_be,
                _pad: self._pad,
                backend_id: self.backend_id,
                service_id: self.service_id,
                fin: self.fin,
                rst: self.rst,
                synack: self.synack,
                _flags_pad: self._flags_pad,
                syn_next: self.syn_next,
                peer_next: self.peer_next,
                ifindex: self.ifindex,
                service_gen: 0,
                created_ns: self.created_ns,
                last_seen_ns: self.last_seen_ns,
                hop: super::CachedHop {
                    gen: 0,
                    ifindex: 0,
                    dmac: [0; 6],
                    smac: [0; 6],
                    fits_len: 0,
                    _pad: 0,
                },
            }
        }
    }
}

/// Layout 1 of the connection table (`ORCH_CT_V1`), kept to migrate its entries.
pub mod v1 {
    use core::mem::size_of;

    /// A backend's passive signals as layout 1 stored them: layout 2's without the SYN
    /// times, which are appended.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct BackendSignals {
        pub handshakes: u64,
        pub handshake_ns: u64,
        pub handshake_hist: [u64; 8],
        pub refused: u64,
        pub syn_retrans: u64,
    }
    const _: () = assert!(size_of::<BackendSignals>() == 96);

    impl BackendSignals {
        /// Adds these counts to `to` (layout 2).
        pub fn add_to(&self, to: &mut super::BackendSignals) {
            to.handshakes += self.handshakes;
            to.handshake_ns += self.handshake_ns;
            for (a, b) in to.handshake_hist.iter_mut().zip(&self.handshake_hist) {
                *a += b;
            }
            to.refused += self.refused;
            to.syn_retrans += self.syn_retrans;
        }
    }

    /// A connection-table value as layout 1 stored it (the key is unchanged).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct FlowValue {
        pub nat_addr: [u32; 4],
        pub nat_port_be: u16,
        pub _pad: u16,
        pub backend_id: u32,
        pub service_id: u32,
        /// `SEEN_*` bits.
        pub seen: u32,
        pub last_seen_ns: u64,
    }
    const _: () = assert!(size_of::<FlowValue>() == 40);

    impl FlowValue {
        /// The entry in layout 2 (see [`super::v2::FlowValue::upgrade`] for layout 3). What
        /// layout 1 did not record stays unknown: no sequence numbers (so no RST counts as a
        /// refusal on it) and no reply interface (not checked). Migrated entries go to the
        /// confirmed table: they are connections the previous release was already carrying.
        pub const fn upgrade(&self) -> super::v2::FlowValue {
            super::v2::FlowValue {
                nat_addr: self.nat_addr,
                nat_port_be: self.nat_port_be,
                _pad: 0,
                backend_id: self.backend_id,
                service_id: self.service_id,
                fin: (self.seen & super::SEEN_FIN != 0) as u8,
                rst: (self.seen & super::SEEN_RST != 0) as u8,
                synack: (self.seen & super::SEEN_SYNACK != 0) as u8,
                _flags_pad: 0,
                syn_next: 0,
                peer_next: 0,
                ifindex: 0,
                _pad2: 0,
                created_ns: self.last_seen_ns,
                last_seen_ns: self.last_seen_ns,
            }
        }
    }
}

/// A set of ports, one bit each. The program checks it before any hash lookup, so traffic to
/// ports no service uses costs one array load.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortBitmap {
    pub words: [u64; 1024],
}
const _: () = assert!(size_of::<PortBitmap>() == 8192);

impl Default for PortBitmap {
    fn default() -> Self {
        PortBitmap { words: [0; 1024] }
    }
}

impl PortBitmap {
    /// Whether `port` (host order) is in the set.
    #[inline(always)]
    pub const fn contains(&self, port: u16) -> bool {
        self.words[(port >> 6) as usize] & (1u64 << (port & 63)) != 0
    }

    /// Adds `port` (host order).
    pub fn insert(&mut self, port: u16) {
        self.words[(port >> 6) as usize] |= 1u64 << (port & 63);
    }
}

/// Forwarding flag: use `bpf_fib_lookup` + `XDP_REDIRECT` (otherwise always hand translated
/// packets to the kernel stack to route).
pub const SETTING_REDIRECT: u64 = 1;

/// Runtime settings, written by the daemon, read by every packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// A UDP flow idle for longer than this is balanced again on its next packet.
    pub udp_idle_ns: u64,
    /// How stale `last_seen_ns` may get before a packet refreshes it.
    pub touch_interval_ns: u64,
    /// `SETTING_*` bits.
    pub flags: u64,
    pub _reserved: u64,
}
const _: () = assert!(size_of::<Settings>() == 32);

/// Traffic counters of one service or one backend (per CPU; the daemon sums them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficCounters {
    /// Client-to-backend packets and bytes (L3 length: IP header and payload).
    pub fwd_packets: u64,
    pub fwd_bytes: u64,
    /// Backend-to-client packets and bytes.
    pub reply_packets: u64,
    pub reply_bytes: u64,
    /// Connections balanced (new connection-table entries).
    pub new_conns: u64,
    /// New connections dropped for want of a backend (service counters only).
    pub no_backend: u64,
}
const _: () = assert!(size_of::<TrafficCounters>() == 48);

impl TrafficCounters {
    /// Field-wise sum, used to add up the per-CPU values.
    pub fn add(&mut self, o: &TrafficCounters) {
        self.fwd_packets += o.fwd_packets;
        self.fwd_bytes += o.fwd_bytes;
        self.reply_packets += o.reply_packets;
        self.reply_bytes += o.reply_bytes;
        self.new_conns += o.new_conns;
        self.no_backend += o.no_backend;
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: every type is repr(C), Copy, with explicit padding and no invalid bit patterns.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for MaglevTable {}
    unsafe impl aya::Pod for BackendKey {}
    unsafe impl aya::Pod for MaglevReply {}
    unsafe impl aya::Pod for SockPeer {}
    unsafe impl aya::Pod for SockFlowKey {}
    unsafe impl aya::Pod for SockFlow {}
    unsafe impl aya::Pod for SlotTable {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowValue {}
    unsafe impl aya::Pod for v1::FlowValue {}
    unsafe impl aya::Pod for v2::FlowValue {}
    unsafe impl aya::Pod for v1::BackendSignals {}
    unsafe impl aya::Pod for PortBitmap {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for TrafficCounters {}
    unsafe impl aya::Pod for BackendSignals {}
}

/// Handshake latency histogram buckets: upper bounds in microseconds (the last is open).
pub const HANDSHAKE_BUCKETS_US: [u64; 8] = [50, 100, 250, 500, 1_000, 5_000, 25_000, u64::MAX];

/// What the data plane observes of a backend's connections, without probing it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendSignals {
    /// SYN-ACKs seen in reply to a balanced SYN.
    pub handshakes: u64,
    /// Sum of SYN-to-SYN-ACK latencies, nanoseconds.
    pub handshake_ns: u64,
    /// Handshakes by latency bucket ([`HANDSHAKE_BUCKETS_US`]).
    pub handshake_hist: [u64; 8],
    /// RSTs in reply to a SYN: the backend refused the connection.
    pub refused: u64,
    /// SYN retransmissions on a balanced flow: the first SYN got no answer in time.
    pub syn_retrans: u64,
    /// When the last new connection's SYN was sent to the backend, and when the backend's
    /// last SYN-ACK came (`bpf_ktime_get_ns`, CLOCK_MONOTONIC). A SYN that no SYN-ACK has
    /// followed for many times the usual handshake latency is the first sign of a host gone
    /// dark, a second before the client's retransmission says so.
    pub last_syn_ns: u64,
    pub last_synack_ns: u64,
}
const _: () = assert!(size_of::<BackendSignals>() == 112);

impl BackendSignals {
    /// Field-wise sum, for adding up the per-CPU values.
    pub fn add(&mut self, o: &BackendSignals) {
        self.handshakes += o.handshakes;
        self.handshake_ns += o.handshake_ns;
        for (a, b) in self.handshake_hist.iter_mut().zip(&o.handshake_hist) {
            *a += b;
        }
        self.refused += o.refused;
        self.syn_retrans += o.syn_retrans;
        // Times, not counts: the latest over CPUs.
        self.last_syn_ns = self.last_syn_ns.max(o.last_syn_ns);
        self.last_synack_ns = self.last_synack_ns.max(o.last_synack_ns);
    }

    /// Whether a SYN has gone unanswered for longer than `after_ns` at `now_ns`: the last
    /// SYN is newer than the last SYN-ACK, and old.
    pub const fn syn_unanswered(&self, now_ns: u64, after_ns: u64) -> bool {
        self.last_syn_ns > self.last_synack_ns && now_ns.saturating_sub(self.last_syn_ns) > after_ns
    }

    /// The histogram bucket of a latency.
    #[inline(always)]
    pub const fn bucket(latency_ns: u64) -> usize {
        let us = latency_ns / 1000;
        let mut i = 0;
        while i < HANDSHAKE_BUCKETS_US.len() - 1 {
            if us <= HANDSHAKE_BUCKETS_US[i] {
                return i;
            }
            i += 1;
        }
        HANDSHAKE_BUCKETS_US.len() - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The flow hash is part of the protocol between orch hosts: two versions that hashed
    /// differently would send one flow to two backends. These values must never change.
    #[test]
    fn the_flow_hash_is_fixed() {
        let client = v4_mapped(u32::from_ne_bytes([198, 18, 0, 2]));
        let vip = v4_mapped(u32::from_ne_bytes([198, 19, 0, 1]));
        let h = |port: u16| flow_hash(&client, &vip, port.to_be(), 80u16.to_be(), 6);
        assert_eq!([h(40000), h(40001)], [2_291_652_223, 3_371_728_352]);
        // Every field counts.
        assert_ne!(
            flow_hash(&client, &vip, 1, 2, 6),
            flow_hash(&client, &vip, 1, 2, 17)
        );
        assert_ne!(
            flow_hash(&client, &vip, 1, 2, 6),
            flow_hash(&vip, &client, 1, 2, 6)
        );
        assert_ne!(
            flow_hash(&client, &vip, 1, 2, 6),
            flow_hash(&client, &vip, 2, 1, 6)
        );
    }

    #[test]
    fn v4_mapped_layout() {
        let a = v4_mapped(u32::from_ne_bytes([198, 19, 0, 1]));
        let mut bytes = [0u8; 16];
        for (i, w) in a.iter().enumerate() {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        assert_eq!(
            bytes,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 19, 0, 1]
        );
        assert!(is_v4_mapped(&a));
        assert!(!is_v4_mapped(&[0, 0, 0, 1]));
    }

    #[test]
    fn port_bitmap_sets_only_its_bit() {
        let mut b = PortBitmap::default();
        for p in [0u16, 63, 64, 8080, 65535] {
            assert!(!b.contains(p));
            b.insert(p);
            assert!(b.contains(p));
        }
        assert!(!b.contains(8081));
        assert!(!b.contains(1));
    }
}
