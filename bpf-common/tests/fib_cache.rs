//! When an established flow may reuse its cached FIB answer.

use bpf_common::FlowEntry;

const SEC: u64 = 1_000_000_000;

fn cached(at_ns: u64, max_len: u16) -> FlowEntry {
    FlowEntry {
        fib_ifindex: 3,
        fib_cached_ns: at_ns,
        fib_max_len: max_len,
        ..FlowEntry::default()
    }
}

#[test]
fn a_cached_answer_serves_packets_no_longer_than_it_was_checked_for_until_it_ages_out() {
    let entry = cached(10 * SEC, 1500);
    assert!(entry.fib_cache_usable(10 * SEC, SEC, 60));
    assert!(entry.fib_cache_usable(11 * SEC - 1, SEC, 1500));
    assert!(!entry.fib_cache_usable(11 * SEC, SEC, 60), "aged out");
    assert!(
        !entry.fib_cache_usable(10 * SEC, SEC, 1501),
        "longer than checked"
    );
    assert!(
        !entry.fib_cache_usable(10 * SEC, 0, 60),
        "a zero lifetime disables it"
    );
}

#[test]
fn no_answer_is_cached_in_a_new_entry() {
    assert!(!FlowEntry::default().fib_cache_usable(0, u64::MAX, 0));
}
