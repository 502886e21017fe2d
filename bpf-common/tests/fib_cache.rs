//! When an established flow may reuse its cached FIB answer.

use bpf_common::FlowEntry;

const SEC: u64 = 1_000_000_000;

fn cached(at_ns: u64, max_len: u16, generation: u32) -> FlowEntry {
    let mut entry = FlowEntry {
        fib_ifindex: 3,
        fib_cached_ns: at_ns,
        fib_max_len: max_len,
        ..FlowEntry::default()
    };
    entry.set_fib_generation(generation);
    assert_eq!(entry.cached_fib_generation(), generation);
    entry
}

#[test]
fn a_cached_answer_serves_packets_no_longer_than_it_was_checked_for_until_it_ages_out() {
    let entry = cached(10 * SEC, 1500, 0);
    assert!(entry.fib_cache_usable(10 * SEC, SEC, 60, 0));
    assert!(entry.fib_cache_usable(11 * SEC - 1, SEC, 1500, 0));
    assert!(!entry.fib_cache_usable(11 * SEC, SEC, 60, 0), "aged out");
    assert!(
        !entry.fib_cache_usable(10 * SEC, SEC, 1501, 0),
        "longer than checked"
    );
    assert!(
        !entry.fib_cache_usable(10 * SEC, 0, 60, 0),
        "a zero lifetime disables it"
    );
}

#[test]
fn a_new_generation_invalidates_a_fresh_answer_at_once() {
    let entry = cached(10 * SEC, 1500, 41);
    assert!(entry.fib_cache_usable(10 * SEC, 60 * SEC, 60, 41));
    assert!(
        !entry.fib_cache_usable(10 * SEC, 60 * SEC, 60, 42),
        "a neighbour or route changed since"
    );
    // Wrapping is just another value.
    let wrapped = cached(10 * SEC, 1500, u32::MAX);
    assert!(!wrapped.fib_cache_usable(10 * SEC, 60 * SEC, 60, 0));
    // An entry of a build before the generation (padding: zeros) matches generation 0 only.
    assert!(cached(10 * SEC, 1500, 0).fib_cache_usable(10 * SEC, 60 * SEC, 60, 0));
}

#[test]
fn no_answer_is_cached_in_a_new_entry() {
    assert!(!FlowEntry::default().fib_cache_usable(0, u64::MAX, 0, 0));
}

#[test]
fn an_answer_cached_a_tick_ahead_of_the_coarse_clock_is_fresh() {
    // A SYN caches with the fine clock; the packets after it read the coarse one, which lags by
    // up to a jiffy.
    let entry = cached(10 * SEC, 1500, 0);
    assert!(entry.fib_cache_usable(10 * SEC - 4_000_000, SEC, 60, 0));
}
