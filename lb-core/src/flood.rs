//! SYN-flood mode (Katran's `is_under_flood`): every CPU counts its new flows per one-second
//! window. Over the configured rate, a DSR TCP SYN is forwarded to its Maglev backend without a
//! flow entry, so a flood of SYNs that never complete neither pays the LRU's insert nor evicts
//! established flows. The flow's entry is made by its first packet that is not a SYN, and Maglev
//! gives that packet the same backend while the table is unchanged.

use bpf_common::SynFloodWindow;

/// The length of a counting window.
pub const WINDOW_NS: u64 = 1_000_000_000;

/// Counts one new flow at `now_ns` in this CPU's `window` and tells whether the CPU is over
/// `rate` new flows per second, i.e. in flood mode. A `rate` of 0 turns the mode off (and leaves
/// the window alone).
#[inline(always)]
pub fn note_new_flow(window: &mut SynFloodWindow, now_ns: u64, rate: u64) -> bool {
    if rate == 0 {
        return false;
    }
    // Saturating: SYNs read the fine clock and other packets the coarse one, which lags by up
    // to a tick, so a window that opened "in the future" is the current one.
    if now_ns.saturating_sub(window.window_start_ns) >= WINDOW_NS {
        window.window_start_ns = now_ns;
        window.new_flows = 0;
        window.flooding = 0;
    }
    window.new_flows += 1;
    if window.new_flows <= rate {
        return false;
    }
    if window.flooding == 0 {
        window.flooding = 1;
        window.entered += 1;
    }
    true
}

/// Whether a new flow's packet is forwarded without a flow entry: its CPU is in flood mode
/// (`flooding`), the service is DSR (full-NAT needs its entries for the replies), the packet is
/// a TCP SYN without ACK (`tcp_flags`, the header's flag byte), and it found no entry at all
/// (`fresh`: not a record reopened by a SYN or rescheduled off a removed backend, which the
/// packet must replace).
#[must_use]
#[inline(always)]
pub const fn untracked_syn(
    flooding: bool,
    full_nat: bool,
    proto: u8,
    tcp_flags: u8,
    fresh: bool,
) -> bool {
    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;
    flooding
        && !full_nat
        && proto == bpf_common::PROTO_TCP
        && tcp_flags & (SYN | ACK) == SYN
        && fresh
}

/// Whether `window` says its CPU is in flood mode at `now_ns`: over the rate in a window that
/// is still open. A window is only closed by the next new flow, so a flag of a window that ended
/// is stale.
#[must_use]
pub const fn flooding_at(window: &SynFloodWindow, now_ns: u64) -> bool {
    window.flooding != 0 && now_ns.saturating_sub(window.window_start_ns) < WINDOW_NS
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 5 * WINDOW_NS;

    #[test]
    fn below_the_rate_nothing_floods() {
        let mut w = SynFloodWindow::default();
        for i in 0..3 {
            assert!(!note_new_flow(&mut w, T0 + i, 3), "flow {i}");
        }
        assert_eq!((w.new_flows, w.flooding, w.entered), (3, 0, 0));
        assert!(!flooding_at(&w, T0 + 3));
    }

    #[test]
    fn over_the_rate_floods_until_the_window_closes() {
        let mut w = SynFloodWindow::default();
        for i in 0..3 {
            assert!(!note_new_flow(&mut w, T0 + i, 3));
        }
        assert!(note_new_flow(&mut w, T0 + 10, 3));
        assert!(note_new_flow(&mut w, T0 + 11, 3));
        assert_eq!((w.new_flows, w.flooding, w.entered), (5, 1, 1));
        assert!(flooding_at(&w, T0 + WINDOW_NS - 1));
        // Stale once the window is over, even before a new flow closes it.
        assert!(!flooding_at(&w, T0 + WINDOW_NS));
        // The next window starts counting afresh.
        assert!(!note_new_flow(&mut w, T0 + WINDOW_NS, 3));
        assert_eq!((w.new_flows, w.flooding, w.entered), (1, 0, 1));
        for i in 0..3 {
            note_new_flow(&mut w, T0 + WINDOW_NS + 1 + i, 3);
        }
        assert_eq!((w.flooding, w.entered), (1, 2), "entered once per window");
    }

    #[test]
    fn a_coarse_clock_a_tick_behind_stays_in_the_window() {
        let mut w = SynFloodWindow::default();
        assert!(!note_new_flow(&mut w, T0, 2));
        assert!(!note_new_flow(&mut w, T0 - 4_000_000, 2));
        assert!(note_new_flow(&mut w, T0 + 1, 2));
        assert_eq!((w.window_start_ns, w.new_flows), (T0, 3));
    }

    #[test]
    fn only_a_fresh_dsr_syn_of_a_flooded_cpu_goes_untracked() {
        use bpf_common::{PROTO_TCP, PROTO_UDP};
        const SYN: u8 = 0x02;
        const SYN_ACK: u8 = 0x12;
        const ACK: u8 = 0x10;
        assert!(untracked_syn(true, false, PROTO_TCP, SYN, true));
        // With PSH or ECN bits too, still a SYN.
        assert!(untracked_syn(
            true,
            false,
            PROTO_TCP,
            SYN | 0x08 | 0x40,
            true
        ));
        assert!(
            !untracked_syn(false, false, PROTO_TCP, SYN, true),
            "below the rate"
        );
        assert!(!untracked_syn(true, true, PROTO_TCP, SYN, true), "full-NAT");
        assert!(!untracked_syn(true, false, PROTO_UDP, SYN, true), "UDP");
        assert!(
            !untracked_syn(true, false, PROTO_TCP, SYN_ACK, true),
            "SYN+ACK"
        );
        assert!(
            !untracked_syn(true, false, PROTO_TCP, ACK, true),
            "the handshake's ACK"
        );
        assert!(
            !untracked_syn(true, false, PROTO_TCP, SYN, false),
            "an entry to replace"
        );
    }

    #[test]
    fn rate_zero_is_off() {
        let mut w = SynFloodWindow::default();
        for i in 0..1000 {
            assert!(!note_new_flow(&mut w, T0 + i, 0));
        }
        assert_eq!(w, SynFloodWindow::default());
    }

    #[test]
    fn a_zeroed_window_opens_at_the_first_flow() {
        let mut w = SynFloodWindow::default();
        assert!(!note_new_flow(&mut w, T0, 1));
        assert_eq!(w.window_start_ns, T0);
        assert!(note_new_flow(&mut w, T0 + 1, 1));
    }
}
