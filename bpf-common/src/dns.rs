//! ABI of the DNS capture (`bpf-dns`): TCX programs that copy DNS responses (UDP or TCP from
//! port 53) to user space through a perf event array, the packet appended by the kernel
//! (`BPF_F_CTXLEN`), so the program itself copies nothing and non-linear skbs are whole.

/// `DnsCaptureMeta::direction`: the packet was received on the interface.
pub const DIR_INGRESS: u8 = 0;
/// `DnsCaptureMeta::direction`: the packet was sent by the interface.
pub const DIR_EGRESS: u8 = 1;

/// What precedes the packet's bytes in each perf sample.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsCaptureMeta {
    /// `bpf_ktime_get_ns` at capture.
    pub ts_ns: u64,
    /// The skb's whole length (`skb->len`).
    pub packet_len: u32,
    /// Bytes appended after this header (at most the snap length).
    pub captured_len: u32,
    pub ifindex: u32,
    /// `DIR_*`.
    pub direction: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<DnsCaptureMeta>() == 24);

/// Largest snap length: a perf sample's size field is 16 bits, and the kernel also counts its
/// own headers in it.
pub const MAX_SNAP_LEN: u32 = 65_000;
/// Default snap length: the EDNS buffer size most resolvers answer within (dnsmasq: 4096).
pub const DEFAULT_SNAP_LEN: u32 = 4_096;
/// Default ceiling of captured responses per second per CPU.
pub const DEFAULT_CAPTURE_RATE: u64 = 50_000;

/// Map names of the DNS capture.
pub mod map_names {
    /// Perf event array of `DnsCaptureMeta` followed by the packet.
    pub const EVENTS: &str = "DNS_EVENTS";
    /// Per-CPU `u64` per reason (`reason`).
    pub const REASONS: &str = "DNS_REASONS";
    /// Per-CPU `RateBucket` of the capture rate.
    pub const RATE_BUCKET: &str = "DNS_RATE";
}

/// `.rodata` globals of the DNS capture.
pub mod globals {
    /// `u64`: captured responses per second per CPU (0: none).
    pub const CAPTURE_RATE: &str = "CAPTURE_RATE";
    /// `u32`: most bytes of a packet copied (`MAX_SNAP_LEN` at most).
    pub const SNAP_LEN: &str = "SNAP_LEN";
}

/// Counters of the capture (`DNS_REASONS`). Packets that are not DNS responses count nothing
/// (that path stays a few loads); every response counts one outcome, and `SNAP_CUT` is counted
/// beside `CAPTURED`.
pub mod reason {
    /// A response copied to user space.
    pub const CAPTURED: u32 = 0;
    /// A response not copied: over the rate.
    pub const RATE_LIMITED: u32 = 1;
    /// A response not copied: the perf buffer was full.
    pub const BUFFER_FULL: u32 = 2;
    /// A captured response longer than the snap length: copied only up to it.
    pub const SNAP_CUT: u32 = 3;

    pub const COUNT: u32 = 4;

    pub const NAMES: [&str; COUNT as usize] =
        ["captured", "rate_limited", "buffer_full", "snap_cut"];
}
