//! ABI of the DNS capture (`bpf-dns`): TCX programs that copy DNS responses (UDP or TCP from
//! port 53) to user space through a ring buffer: the packet, up to the snap length, is copied
//! with `bpf_skb_load_bytes` (paged fragments included) into a per-CPU scratch record, which
//! goes to the ring with one `bpf_ringbuf_output` of its real length.

/// `DnsCaptureMeta::direction`: the packet was received on the interface.
pub const DIR_INGRESS: u8 = 0;
/// `DnsCaptureMeta::direction`: the packet was sent by the interface.
pub const DIR_EGRESS: u8 = 1;

/// What precedes the packet's bytes in each ring record.
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

/// Largest snap length: the scratch record's data (a per-CPU map value is at most 32 KiB). A
/// power of two: the programs bound the copy's length with a mask.
pub const MAX_SNAP_LEN: u32 = 16_384;
const _: () = assert!(MAX_SNAP_LEN.is_power_of_two());

/// The per-CPU scratch record (`DNS_SCRATCH`): the header, then the packet's first bytes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DnsScratch {
    pub meta: DnsCaptureMeta,
    pub data: [u8; MAX_SNAP_LEN as usize],
}
const _: () = assert!(core::mem::size_of::<DnsScratch>() == 24 + MAX_SNAP_LEN as usize);

/// Bytes of the ring buffer (a power of two): about 20,000 answers of typical size.
pub const RING_BYTES: u32 = 8 << 20;
/// The programs wake the reader only once this much waits (a wake-up per answer costs more
/// than the capture; measured in perf/RESULTS.md); the reader also reads on a short tick.
pub const WAKE_BYTES: u64 = 1 << 20;
/// Default snap length: the EDNS buffer size most resolvers answer within (dnsmasq: 4096).
pub const DEFAULT_SNAP_LEN: u32 = 4_096;
/// Default ceiling of captured responses per second per CPU.
pub const DEFAULT_CAPTURE_RATE: u64 = 50_000;

/// Map names of the DNS capture.
pub mod map_names {
    /// Ring buffer of `DnsCaptureMeta` followed by the packet.
    pub const EVENTS: &str = "DNS_EVENTS";
    /// Per-CPU `DnsScratch`, where a record is assembled.
    pub const SCRATCH: &str = "DNS_SCRATCH";
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
    /// A response not copied: the ring buffer was full, or the packet could not be read.
    pub const BUFFER_FULL: u32 = 2;
    /// A captured response longer than the snap length: copied only up to it.
    pub const SNAP_CUT: u32 = 3;

    pub const COUNT: u32 = 4;

    pub const NAMES: [&str; COUNT as usize] =
        ["captured", "rate_limited", "buffer_full", "snap_cut"];
}
