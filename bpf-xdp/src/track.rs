//! Conntrack records of the flow table, advanced with the shared `conntrack` state machine.

use bpf_common::{PROTO_TCP, ct::CtEntry};
use bpf_lib::{coarse_now_ns, now_ns};
use conntrack::{Direction, TcpFlags, update_entry, update_entry_steady};

/// The time to stamp a packet with. TCP handshake packets (SYN set) read the fine clock: the
/// record's handshake RTT is the SYN+ACK's time minus the SYN's. Every other packet reads the
/// coarse one, which only idle timeouts and the FIB cache's age see; a clock-source read costs
/// about 28 ns per packet on these VMs, the coarse clock a few.
#[inline(always)]
pub(crate) fn packet_time(proto: u8, flags: TcpFlags) -> u64 {
    if proto == PROTO_TCP && flags.syn() {
        now_ns()
    } else {
        coarse_now_ns()
    }
}

/// Applies one packet to a flow's conntrack record with the shared `conntrack::update_entry`.
#[inline(always)]
pub(crate) fn track(
    ct: &mut CtEntry,
    proto: u8,
    dir: Direction,
    flags: TcpFlags,
    ip_len: u64,
    now: u64,
) {
    // Most packets of a busy flow: no subprogram call.
    if update_entry_steady(ct, proto, dir, flags, ip_len, now) {
        return;
    }
    let packed = proto as u32 | (dir as u32) << 8 | (flags.0 as u32) << 16;
    track_packed(ct, packed, ip_len, now);
}

/// [`track`]'s body as one BPF subprogram instead of three inlined copies: inlined into every
/// path that tracks a packet, the state machine's registers spill past the 512-byte stack.
/// BPF calls take at most five arguments, hence the packing of protocol, direction and flags.
#[inline(never)]
fn track_packed(ct: &mut CtEntry, packed: u32, ip_len: u64, now: u64) {
    let proto = packed as u8;
    let dir = Direction::from_u8((packed >> 8) as u8);
    let flags = TcpFlags((packed >> 16) as u8);
    let _ = update_entry(ct, proto, dir, flags, ip_len, now);
}
