//! The flow-table collector against real kernel LRU hash maps of the datapath's key and value
//! types: it deletes exactly the entries idle past their state's timeout, keeps everything
//! else, removes full-NAT reverse entries whose flow is gone, and honours its deletion cap.
//!
//! Needs root (BPF maps). Without it the tests are skipped, unless
//! `DATAPATH_REQUIRE_PRIVILEGED=1`, in which case they fail.

use std::os::fd::{AsFd as _, OwnedFd};

use bpf_common::{FlowEntry, NatReverseEntry, ct::CtKey};
use conntrack::{TcpState, Timeouts, canonical_key, new_entry};
use datapath::gc::{
    BPF_MAP_TYPE_LRU_HASH, FlowGc, GcConfig, create_hash_map, monotonic_now_ns, read_all,
    update_all,
};

const SEC: u64 = 1_000_000_000;
const TCP: u8 = 6;
const UDP: u8 = 17;

/// Returns false (skip) when the test cannot run; panics when it must run (see
/// [`netns_tests::privilege::may_run`]).
fn privileged() -> bool {
    netns_tests::privilege::privileged_as_root("creating BPF maps")
}

fn addr(last: u8) -> [u32; 4] {
    [u32::from_ne_bytes([198, 18, 0, last]), 0, 0, 0]
}

const VIP: [u8; 4] = [198, 18, 100, 1];

/// The canonical key the kernel gives the flow from `client`:`client_port` to the VIP, port 80.
fn flow(client: u8, client_port: u16, proto: u8) -> CtKey {
    canonical_key(
        addr(client),
        client_port.to_be(),
        [u32::from_ne_bytes(VIP), 0, 0, 0],
        80u16.to_be(),
        proto,
        2,
    )
    .0
}

/// The client's port in a flow key built by [`flow`].
fn client_port(key: &CtKey) -> u16 {
    if key.addr_a[0] == u32::from_ne_bytes(VIP) {
        u16::from_be(key.port_b_be)
    } else {
        u16::from_be(key.port_a_be)
    }
}

fn entry(state: TcpState, last_seen_ns: u64, nat_port: u16) -> FlowEntry {
    let mut ct = new_entry(last_seen_ns, 0);
    ct.state = state as u8;
    FlowEntry {
        ct,
        backend_id: 1,
        backend_generation: 1,
        service_id: 0,
        nat_port_be: nat_port.to_be(),
        ..FlowEntry::default()
    }
}

/// The reverse entry the kernel would insert for full-NAT flow `owner` on `nat_port`.
fn reverse_of(owner: &CtKey, nat_port: u16) -> (CtKey, NatReverseEntry) {
    let (key, backend_side) = canonical_key(
        [u32::from_ne_bytes([198, 18, 1, 11]), 0, 0, 0],
        80u16.to_be(),
        [u32::from_ne_bytes([198, 18, 1, 1]), 0, 0, 0],
        nat_port.to_be(),
        owner.proto,
        2,
    );
    let client_side = u8::from(owner.addr_a[0] == u32::from_ne_bytes(VIP));
    let (client, vip) = if client_side == 0 {
        (
            (owner.addr_a, owner.port_a_be),
            (owner.addr_b, owner.port_b_be),
        )
    } else {
        (
            (owner.addr_b, owner.port_b_be),
            (owner.addr_a, owner.port_a_be),
        )
    };
    let value = NatReverseEntry {
        owner: *owner,
        client_addr: client.0,
        vip_addr: vip.0,
        client_port_be: client.1,
        vip_port_be: vip.1,
        service_id: 0,
        backend_id: 1,
        backend_side,
        client_side,
        _pad: [0; 2],
    };
    (key, value)
}

fn maps() -> (OwnedFd, OwnedFd) {
    let flows =
        create_hash_map::<CtKey, FlowEntry>(BPF_MAP_TYPE_LRU_HASH, 4_096).expect("create flow map");
    let reverse = create_hash_map::<CtKey, NatReverseEntry>(BPF_MAP_TYPE_LRU_HASH, 4_096)
        .expect("create reverse map");
    (flows, reverse)
}

fn sorted_keys<V: Copy + Default>(map: &OwnedFd) -> Vec<(u16, u8)> {
    let mut keys: Vec<(u16, u8)> = read_all::<CtKey, V>(map.as_fd())
        .expect("read map")
        .into_iter()
        .map(|(key, _)| (client_port(&key), key.proto))
        .collect();
    keys.sort_unstable();
    keys
}

#[test]
fn sweep_deletes_exactly_the_expired_entries_per_state() {
    if !privileged() {
        return;
    }
    let (flows, reverse) = maps();
    let timeouts = Timeouts::DEFAULT;
    // A clock a day ahead: the machine may have been up for less than the 6 h timeout.
    let now = monotonic_now_ns() + 24 * 3600 * SEC;
    // (client port, proto, state, idle for, expected to survive)
    let cases: [(u16, u8, TcpState, u64, bool); 10] = [
        (1001, UDP, TcpState::None, 59 * SEC, true),
        (1002, UDP, TcpState::None, 61 * SEC, false),
        (1003, TCP, TcpState::Established, 3600 * SEC, true),
        (
            1004,
            TCP,
            TcpState::Established,
            timeouts.tcp_established_ns + SEC,
            false,
        ),
        (1005, TCP, TcpState::SynSent, 30 * SEC, true),
        (1006, TCP, TcpState::SynSent, 61 * SEC, false),
        (1007, TCP, TcpState::TimeWait, 9 * SEC, true),
        (1008, TCP, TcpState::TimeWait, 11 * SEC, false),
        (1009, TCP, TcpState::FinWait, 11 * SEC, false),
        (1010, 1, TcpState::None, 61 * SEC, false),
    ];
    let entries: Vec<(CtKey, FlowEntry)> = cases
        .iter()
        .map(|&(port, proto, state, idle, _)| {
            (
                flow(1, port, proto),
                entry(state, now - idle, 40_000 + port),
            )
        })
        .collect();
    update_all(flows.as_fd(), &entries).expect("fill flows");
    // Reverse entries for every flow, plus one whose flow never existed.
    let mut reverse_entries: Vec<(CtKey, NatReverseEntry)> = entries
        .iter()
        .map(|(key, value)| reverse_of(key, u16::from_be(value.nat_port_be)))
        .collect();
    reverse_entries.push(reverse_of(&flow(9, 9999, UDP), 49_999));
    update_all(reverse.as_fd(), &reverse_entries).expect("fill reverse");

    let mut gc = FlowGc::from_fds(flows, reverse, GcConfig::default());
    let report = gc.sweep(now).expect("sweep");

    let expired = cases.iter().filter(|case| !case.4).count() as u64;
    assert_eq!(report.flows_scanned, cases.len() as u64);
    assert_eq!(report.flows_expired, expired);
    assert_eq!(report.nat_scanned, reverse_entries.len() as u64);
    assert_eq!(report.nat_orphans_removed, expired + 1);
    assert_eq!(report.deferred, 0);

    let (flows, reverse) = (gc_flows(&gc), gc_reverse(&gc));
    let mut survivors: Vec<(u16, u8)> = cases
        .iter()
        .filter(|case| case.4)
        .map(|case| (case.0, case.1))
        .collect();
    survivors.sort_unstable();
    assert_eq!(sorted_keys::<FlowEntry>(flows), survivors);
    // Reverse entries are keyed by backend -> SNAT; their owners are the surviving flows.
    let mut owners: Vec<u16> = read_all::<CtKey, NatReverseEntry>(reverse.as_fd())
        .expect("read reverse")
        .into_iter()
        .map(|(_, value)| u16::from_be(value.client_port_be))
        .collect();
    owners.sort_unstable();
    assert_eq!(
        owners,
        survivors.iter().map(|(port, _)| *port).collect::<Vec<_>>()
    );
    assert_eq!(gc.totals().flows_expired, expired);
}

#[test]
fn refreshed_entries_survive_and_the_deletion_cap_defers_the_rest() {
    if !privileged() {
        return;
    }
    let (flows, reverse) = maps();
    // A clock a day ahead: the machine may have been up for less than the 6 h timeout.
    let now = monotonic_now_ns() + 24 * 3600 * SEC;
    let stale: Vec<(CtKey, FlowEntry)> = (0..10)
        .map(|i| {
            (
                flow(2, 2000 + i, UDP),
                entry(TcpState::None, now - 120 * SEC, 0),
            )
        })
        .collect();
    update_all(flows.as_fd(), &stale).expect("fill flows");
    let mut gc = FlowGc::from_fds(
        flows,
        reverse,
        GcConfig {
            max_deletes_per_sweep: 4,
            ..GcConfig::default()
        },
    );

    let first = gc.sweep(now).expect("first sweep");
    assert_eq!((first.flows_expired, first.deferred), (4, 6));
    assert_eq!(
        read_all::<CtKey, FlowEntry>(gc_flows(&gc).as_fd())
            .unwrap()
            .len(),
        6
    );

    // A packet refreshes every remaining flow: the collector must keep all of them.
    let refreshed: Vec<(CtKey, FlowEntry)> = read_all::<CtKey, FlowEntry>(gc_flows(&gc).as_fd())
        .unwrap()
        .into_iter()
        .map(|(key, mut value)| {
            value.ct.last_seen_ns = now;
            (key, value)
        })
        .collect();
    update_all(gc_flows(&gc).as_fd(), &refreshed).expect("refresh");
    let second = gc.sweep(now + SEC).expect("second sweep");
    assert_eq!((second.flows_expired, second.deferred), (0, 0));
    assert_eq!(
        read_all::<CtKey, FlowEntry>(gc_flows(&gc).as_fd())
            .unwrap()
            .len(),
        6
    );

    // A minute later they are idle past the UDP timeout and go, four per sweep.
    let later = now + 61 * SEC + SEC;
    assert_eq!(gc.sweep(later).unwrap().flows_expired, 4);
    assert_eq!(gc.sweep(later).unwrap().flows_expired, 2);
    assert!(
        read_all::<CtKey, FlowEntry>(gc_flows(&gc).as_fd())
            .unwrap()
            .is_empty()
    );
    assert_eq!(gc.totals().flows_expired, 10);
    assert_eq!(gc.totals().sweeps, 4);
}

fn gc_flows(gc: &FlowGc) -> &OwnedFd {
    gc.flows_fd()
}

fn gc_reverse(gc: &FlowGc) -> &OwnedFd {
    gc.nat_reverse_fd()
}
