use std::net::{IpAddr, Ipv4Addr};

use datapath_api::{BackendState, Protocol};

use super::{testing::*, *};
use crate::persist::tmp_path;

const LIMITS: Limits = Limits {
    max_services: 3,
    max_backends: 4,
};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn svc(vip: &str, port: u16) -> CreateService {
    CreateService {
        vip: ip(vip),
        port,
        proto: Protocol::Tcp,
        mode: ForwardingMode::FullNat,
        snat_addr: None,
    }
}

fn key_of(req: &CreateService) -> ServiceKey {
    ServiceKey {
        vip: req.vip,
        port: req.port,
        proto: req.proto,
    }
}

fn be(addr: &str, port: u16) -> AddBackend {
    AddBackend {
        addr: ip(addr),
        port,
        weight: 1,
        state: BackendState::Active,
    }
}

fn bkey(addr: &str, port: u16) -> BackendKey {
    BackendKey {
        addr: ip(addr),
        port,
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
    store: Store,
    plane: MemPlane,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    let store = Store::open(&path, LIMITS).unwrap();
    Fixture {
        _dir: dir,
        path,
        store,
        plane: MemPlane::default(),
    }
}

fn invalid(r: Result<ServiceSpec>) -> String {
    match r {
        Err(Error::InvalidArgument(m)) => m,
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

#[test]
fn missing_file_is_empty_state_and_gets_written() {
    let f = fixture();
    assert!(f.store.state().services.is_empty());
    let text = fs::read_to_string(&f.path).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["version"], 1);
    assert_eq!(v["services"], serde_json::json!([]));
}

#[test]
fn open_creates_missing_parent_directories() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a/b/state.json");
    Store::open(&path, LIMITS).unwrap();
    assert!(path.exists());
}

#[test]
fn service_ids_are_lowest_free_and_capacity_is_enforced() {
    let mut f = fixture();
    let ids: Vec<u32> = ["198.18.0.1", "198.18.0.2", "198.18.0.3"]
        .iter()
        .map(|v| {
            f.store
                .create_service(&mut f.plane, &svc(v, 80))
                .unwrap()
                .id
        })
        .collect();
    assert_eq!(ids, [0, 1, 2]);
    match f.store.create_service(&mut f.plane, &svc("198.18.0.4", 80)) {
        Err(Error::CapacityExhausted(m)) => assert!(m.contains("3 service slots"), "{m}"),
        other => panic!("{other:?}"),
    }
    f.store
        .delete_service(&mut f.plane, &key_of(&svc("198.18.0.2", 80)))
        .unwrap();
    let again = f
        .store
        .create_service(&mut f.plane, &svc("198.18.0.4", 80))
        .unwrap();
    assert_eq!(again.id, 1, "the freed id is reused first");
}

#[test]
fn backend_ids_are_shared_generations_grow_and_backends_stay_sorted() {
    let mut f = fixture();
    let a = key_of(&svc("198.18.0.1", 80));
    let b = key_of(&svc("198.18.0.2", 80));
    f.store
        .create_service(&mut f.plane, &svc("198.18.0.1", 80))
        .unwrap();
    f.store
        .create_service(&mut f.plane, &svc("198.18.0.2", 80))
        .unwrap();
    f.store
        .add_backend(&mut f.plane, &a, &be("198.18.1.9", 80))
        .unwrap();
    f.store
        .add_backend(&mut f.plane, &b, &be("198.18.1.1", 80))
        .unwrap();
    let s = f
        .store
        .add_backend(&mut f.plane, &a, &be("198.18.1.2", 80))
        .unwrap();
    let got: Vec<(String, u32, u32)> = s
        .backends
        .iter()
        .map(|b| (b.key().to_string(), b.id, b.generation))
        .collect();
    assert_eq!(
        got,
        [
            ("198.18.1.2:80".to_string(), 2, 2),
            ("198.18.1.9:80".to_string(), 0, 0)
        ]
    );
    // Freeing slot 0 and reusing it hands out a new generation.
    f.store
        .remove_backend(&mut f.plane, &a, &bkey("198.18.1.9", 80))
        .unwrap();
    let s = f
        .store
        .add_backend(&mut f.plane, &b, &be("198.18.1.3", 80))
        .unwrap();
    let reused = s.backends.iter().find(|b| b.id == 0).unwrap();
    assert_eq!(reused.generation, 3);
    assert_eq!(f.store.state().next_generation, 4);
    // The dataplane saw the same specs the store holds.
    assert_eq!(f.plane.live, f.store.state().services);
}

#[test]
fn backend_capacity_is_across_services() {
    let mut f = fixture();
    let a = key_of(&svc("198.18.0.1", 80));
    let b = key_of(&svc("198.18.0.2", 80));
    f.store
        .create_service(&mut f.plane, &svc("198.18.0.1", 80))
        .unwrap();
    f.store
        .create_service(&mut f.plane, &svc("198.18.0.2", 80))
        .unwrap();
    for p in 1..=2 {
        f.store
            .add_backend(&mut f.plane, &a, &be("198.18.1.1", p))
            .unwrap();
        f.store
            .add_backend(&mut f.plane, &b, &be("198.18.1.1", p))
            .unwrap();
    }
    match f.store.add_backend(&mut f.plane, &a, &be("198.18.1.1", 3)) {
        Err(Error::CapacityExhausted(m)) => assert!(m.contains("4 backend slots"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn service_validation() {
    let mut f = fixture();
    let mut p = MemPlane::default();
    let m = invalid(f.store.create_service(&mut p, &svc("198.18.0.1", 0)));
    assert!(m.contains("port must not be 0"), "{m}");
    for (vip, why) in [
        ("0.0.0.0", "unspecified"),
        ("255.255.255.255", "broadcast"),
        ("224.0.0.1", "multicast"),
        ("::", "unspecified"),
    ] {
        let m = invalid(f.store.create_service(&mut p, &svc(vip, 80)));
        assert!(m.contains(why), "{vip}: {m}");
    }
    // IPv6 source ranges are refused (IPv6 VIPs themselves are services like any other).
    let declared = datapath_api::DeclaredService {
        key: key_of(&svc("2001:db8::2", 80)),
        mode: ForwardingMode::FullNat,
        snat_addr: None,
        owner: "test".into(),
        source_ranges: vec!["2001:db8::/32".parse().expect("range")],
        xdp_only: false,
        backends: Vec::new(),
    };
    let m = super::check_declared(&declared).expect_err("IPv6 source ranges");
    assert!(m.contains("an IPv6 service takes none"), "{m}");
    let mut req = svc("198.18.0.1", 80);
    req.snat_addr = Some(ip("2001:db8::1"));
    let m = invalid(f.store.create_service(&mut p, &req));
    assert!(m.contains("is IPv6 but VIP 198.18.0.1 is IPv4"), "{m}");
    req.snat_addr = Some(ip("198.18.0.100"));
    req.mode = ForwardingMode::Dsr;
    let m = invalid(f.store.create_service(&mut p, &req));
    assert!(m.contains("only full-nat"), "{m}");
    assert!(
        p.calls.is_empty(),
        "invalid requests never reach the dataplane"
    );
    f.store
        .create_service(&mut p, &svc("2001:db8::1", 80))
        .expect("an IPv6 VIP");

    f.store
        .create_service(&mut p, &svc("198.18.0.1", 80))
        .unwrap();
    match f.store.create_service(&mut p, &svc("198.18.0.1", 80)) {
        Err(e @ Error::AlreadyExists(_)) => {
            assert_eq!(e.to_string(), "service tcp/198.18.0.1:80 already exists")
        }
        other => panic!("{other:?}"),
    }
    let mut udp = svc("198.18.0.1", 80);
    udp.proto = Protocol::Udp;
    f.store.create_service(&mut p, &udp).unwrap();
    match f
        .store
        .delete_service(&mut p, &key_of(&svc("198.18.0.9", 80)))
    {
        Err(e @ Error::NotFound(_)) => {
            assert_eq!(e.to_string(), "service tcp/198.18.0.9:80 not found")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn backend_validation() {
    let mut f = fixture();
    let k = key_of(&svc("198.18.0.1", 80));
    f.store
        .create_service(&mut f.plane, &svc("198.18.0.1", 80))
        .unwrap();
    let calls = f.plane.calls.len();
    let p = &mut f.plane;
    let m = invalid(f.store.add_backend(p, &k, &be("198.18.1.1", 0)));
    assert!(m.contains("port must not be 0"), "{m}");
    let mut zero = be("198.18.1.1", 80);
    zero.weight = 0;
    let m = invalid(f.store.add_backend(p, &k, &zero));
    assert!(m.contains("weight 0"), "{m}");
    let m = invalid(f.store.add_backend(p, &k, &be("2001:db8::2", 80)));
    assert!(m.contains("is IPv6 but VIP 198.18.0.1 is IPv4"), "{m}");
    let m = invalid(f.store.add_backend(p, &k, &be("224.1.1.1", 80)));
    assert!(m.contains("multicast"), "{m}");
    let m = invalid(f.store.add_backend(p, &k, &be("198.18.0.1", 8080)));
    assert!(m.contains("own VIP"), "{m}");
    assert_eq!(f.plane.calls.len(), calls);

    f.store
        .add_backend(&mut f.plane, &k, &be("198.18.1.1", 80))
        .unwrap();
    match f.store.add_backend(&mut f.plane, &k, &be("198.18.1.1", 80)) {
        Err(e @ Error::AlreadyExists(_)) => assert_eq!(
            e.to_string(),
            "backend 198.18.1.1:80 of service tcp/198.18.0.1:80 already exists"
        ),
        other => panic!("{other:?}"),
    }
    match f
        .store
        .remove_backend(&mut f.plane, &k, &bkey("198.18.1.2", 80))
    {
        Err(e @ Error::NotFound(_)) => assert_eq!(
            e.to_string(),
            "backend 198.18.1.2:80 of service tcp/198.18.0.1:80 not found"
        ),
        other => panic!("{other:?}"),
    }
    let mut heavy = be("198.18.1.2", 80);
    heavy.weight = u32::MAX;
    let m = invalid(f.store.add_backend(&mut f.plane, &k, &heavy));
    assert!(m.contains("would add up to 4294967296"), "{m}");
    let max = UpdateBackend {
        weight: Some(u32::MAX),
        state: None,
    };
    f.store
        .update_backend(&mut f.plane, &k, &bkey("198.18.1.1", 80), &max)
        .unwrap();
    let zero = UpdateBackend {
        weight: Some(0),
        state: None,
    };
    let m = invalid(
        f.store
            .update_backend(&mut f.plane, &k, &bkey("198.18.1.1", 80), &zero),
    );
    assert!(m.contains("weight 0"), "{m}");
}

#[test]
fn update_changes_weight_and_state_but_keeps_id_and_generation() {
    let mut f = fixture();
    let k = key_of(&svc("198.18.0.1", 80));
    let b = bkey("198.18.1.1", 80);
    f.store
        .create_service(&mut f.plane, &svc("198.18.0.1", 80))
        .unwrap();
    let before = f
        .store
        .add_backend(&mut f.plane, &k, &be("198.18.1.1", 80))
        .unwrap()
        .backends[0]
        .clone();
    let drain = UpdateBackend {
        weight: Some(5),
        state: Some(BackendState::Draining),
    };
    let after = f
        .store
        .update_backend(&mut f.plane, &k, &b, &drain)
        .unwrap()
        .backends[0]
        .clone();
    assert_eq!((after.weight, after.state), (5, BackendState::Draining));
    assert_eq!((after.id, after.generation), (before.id, before.generation));
    // The same change again is a no-op that does not touch the dataplane.
    let calls = f.plane.calls.len();
    f.store
        .update_backend(&mut f.plane, &k, &b, &drain)
        .unwrap();
    assert_eq!(f.plane.calls.len(), calls);
}

#[test]
fn dataplane_failure_changes_nothing() {
    let mut f = fixture();
    let k = key_of(&svc("198.18.0.1", 80));
    f.store
        .create_service(&mut f.plane, &svc("198.18.0.1", 80))
        .unwrap();
    let state = f.store.state().clone();
    let file = fs::read(&f.path).unwrap();
    f.plane.fail_all = true;
    let results = [
        f.store
            .create_service(&mut f.plane, &svc("198.18.0.2", 80))
            .err(),
        f.store
            .add_backend(&mut f.plane, &k, &be("198.18.1.1", 80))
            .err(),
        f.store.delete_service(&mut f.plane, &k).err(),
    ];
    for r in results {
        assert!(matches!(r, Some(Error::Map { .. })), "{r:?}");
    }
    assert_eq!(f.store.state(), &state);
    assert_eq!(fs::read(&f.path).unwrap(), file);
    assert_eq!(f.store.state().next_generation, 0, "no generation spent");
}

#[test]
fn persist_failure_rolls_the_dataplane_back() {
    let mut f = fixture();
    let k = key_of(&svc("198.18.0.1", 80));
    f.store
        .create_service(&mut f.plane, &svc("198.18.0.1", 80))
        .unwrap();
    f.store
        .add_backend(&mut f.plane, &k, &be("198.18.1.1", 80))
        .unwrap();
    let state = f.store.state().clone();
    let live = f.plane.live.clone();
    // Root ignores permission bits, so the way to make saving fail is to take the
    // directory away.
    fs::remove_dir_all(f.path.parent().unwrap()).unwrap();

    let n = f.plane.calls.len();
    let e = f
        .store
        .add_backend(&mut f.plane, &k, &be("198.18.1.2", 80))
        .unwrap_err();
    assert!(matches!(e, Error::Persistence { .. }), "{e:?}");
    assert!(e.to_string().starts_with("state file "), "{e}");
    // Applied, then undone with the old spec.
    assert_eq!(f.plane.calls.len(), n + 2);
    assert_eq!(
        f.plane.calls[n + 1],
        Call::Apply(state.services[&k].clone())
    );

    let e = f
        .store
        .create_service(&mut f.plane, &svc("198.18.0.2", 80))
        .unwrap_err();
    assert!(matches!(e, Error::Persistence { .. }), "{e:?}");
    assert!(matches!(f.plane.calls.last(), Some(Call::Remove(_))));

    let e = f.store.delete_service(&mut f.plane, &k).unwrap_err();
    assert!(matches!(e, Error::Persistence { .. }), "{e:?}");
    assert!(matches!(f.plane.calls.last(), Some(Call::Apply(_))));

    assert_eq!(f.store.state(), &state);
    assert_eq!(f.plane.live, live);
}

#[test]
fn failed_rollback_still_reports_persistence_and_keeps_memory() {
    let mut f = fixture();
    f.store
        .create_service(&mut f.plane, &svc("198.18.0.1", 80))
        .unwrap();
    let state = f.store.state().clone();
    fs::remove_dir_all(f.path.parent().unwrap()).unwrap();
    let n = f.plane.calls.len();
    f.plane.fail_calls.insert(n + 1);
    let e = f
        .store
        .create_service(&mut f.plane, &svc("198.18.0.2", 80))
        .unwrap_err();
    assert!(matches!(e, Error::Persistence { .. }), "{e:?}");
    assert_eq!(f.store.state(), &state);
}

#[test]
fn persist_is_atomic_and_reload_round_trips() {
    let mut f = fixture();
    let k = key_of(&svc("198.18.0.1", 80));
    let mut req = svc("198.18.0.1", 80);
    req.snat_addr = Some(ip("198.18.0.100"));
    f.store.create_service(&mut f.plane, &req).unwrap();
    f.store
        .create_service(&mut f.plane, &svc("198.18.0.2", 53))
        .unwrap();
    f.store
        .add_backend(&mut f.plane, &k, &be("198.18.1.1", 80))
        .unwrap();
    let mut heavy = be("198.18.1.2", 80);
    heavy.weight = 7;
    heavy.state = BackendState::Draining;
    f.store.add_backend(&mut f.plane, &k, &heavy).unwrap();
    assert!(
        !tmp_path(&f.path).exists(),
        "the temporary file is renamed away"
    );
    let reopened = Store::open(&f.path, LIMITS).unwrap();
    assert_eq!(reopened.state(), f.store.state());
    assert_eq!(reopened.state().next_generation, 2);
}

#[test]
fn corrupt_files_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    let backend = |id: u32, port: u16| {
        serde_json::json!({"addr": "198.18.1.1", "port": port, "weight": 1,
                           "state": "active", "id": id, "generation": 0})
    };
    let service = |vip: &str, id: u32, backends: Vec<serde_json::Value>| {
        serde_json::json!({"key": {"vip": vip, "port": 80, "proto": "tcp"},
                           "mode": "full-nat", "id": id, "backends": backends})
    };
    let cases = [
        ("{not json".to_string(), "not a state file"),
        ("{}".to_string(), "no \"version\""),
        (
            r#"{"version": 2, "services": []}"#.to_string(),
            "version 2 is not supported",
        ),
        (
            r#"{"version": 1, "services": [], "extra": 1}"#.to_string(),
            "unknown field",
        ),
        (
            serde_json::json!({"version": 1, "services": [service("198.18.0.1", 3, vec![])]})
                .to_string(),
            "id 3 but max_services is 3",
        ),
        (
            serde_json::json!({"version": 1, "services": [
                service("198.18.0.1", 0, vec![]), service("198.18.0.2", 0, vec![])]})
            .to_string(),
            "reuses service id 0",
        ),
        (
            serde_json::json!({"version": 1, "services": [
                service("198.18.0.1", 0, vec![backend(1, 80)]),
                service("198.18.0.2", 1, vec![backend(1, 81)])]})
            .to_string(),
            "reuses backend id 1",
        ),
        (
            serde_json::json!({"version": 1, "services": [
                service("198.18.0.1", 0, vec![backend(1, 80), backend(2, 80)])]})
            .to_string(),
            "twice",
        ),
        (
            serde_json::json!({"version": 1, "services": [
                service("198.18.0.1", 0, vec![backend(9, 80)])]})
            .to_string(),
            "max_backends is 4",
        ),
        (
            serde_json::json!({"version": 1, "services": [
                service("0.0.0.0", 0, vec![])]})
            .to_string(),
            "unspecified",
        ),
    ];
    for (text, want) in cases {
        fs::write(&path, &text).unwrap();
        match Store::open(&path, LIMITS) {
            Err(e @ Error::CorruptState { .. }) => {
                let m = e.to_string();
                assert!(m.contains(want), "{text}: {m}");
                assert!(!m.contains('\n'), "one line: {m}");
            }
            other => panic!("{text}: expected CorruptState, got {other:?}"),
        }
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            text,
            "a refused file is left untouched"
        );
    }
}

#[test]
fn generation_counter_is_moved_past_saved_generations() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    let text = serde_json::json!({"version": 1, "services": [
        {"key": {"vip": "198.18.0.1", "port": 80, "proto": "tcp"}, "mode": "dsr", "id": 0,
         "backends": [{"addr": "198.18.1.1", "port": 80, "weight": 1, "state": "active",
                       "id": 0, "generation": 41}]}]});
    fs::write(&path, text.to_string()).unwrap();
    let store = Store::open(&path, LIMITS).unwrap();
    assert_eq!(store.state().next_generation, 42);
    let vip = Ipv4Addr::new(198, 18, 0, 1);
    assert_eq!(
        store
            .service(&ServiceKey {
                vip: vip.into(),
                port: 80,
                proto: Protocol::Tcp
            })
            .unwrap()
            .mode,
        ForwardingMode::Dsr
    );
}

fn declared(vip: &str, owner: &str, backends: &[(&str, u16, BackendState)]) -> DeclaredService {
    DeclaredService {
        key: ServiceKey {
            vip: ip(vip),
            port: 80,
            proto: Protocol::Tcp,
        },
        mode: ForwardingMode::FullNat,
        snat_addr: None,
        xdp_only: false,
        owner: owner.into(),
        source_ranges: Vec::new(),
        backends: backends
            .iter()
            .map(|&(addr, port, state)| datapath_api::DeclaredBackend {
                addr: ip(addr),
                port,
                weight: 1,
                state,
            })
            .collect(),
    }
}

fn ids(spec: &ServiceSpec) -> Vec<(BackendKey, u32, u32)> {
    spec.backends
        .iter()
        .map(|b| (b.key(), b.id, b.generation))
        .collect()
}

use BackendState::{Active, Draining};

/// A source's batch is applied by difference: kept backends keep id and generation (their
/// Maglev slots and flows), a changed state is an update, what is no longer declared goes, and
/// what did not change is not programmed again.
#[test]
fn replace_source_applies_the_difference_and_keeps_slots() {
    let mut f = fixture();
    let src = ServiceSource::Kubernetes;
    let first = vec![
        declared(
            "198.18.0.1",
            "default/a:http",
            &[("198.18.1.1", 80, Active), ("198.18.1.2", 80, Active)],
        ),
        declared(
            "198.18.0.2",
            "default/b:http",
            &[("198.18.1.3", 80, Active)],
        ),
    ];
    let r = f
        .store
        .replace_source(&mut f.plane, src, None, first.clone(), Durability::Now)
        .unwrap();
    assert_eq!((r.created, r.updated, r.removed, r.unchanged), (2, 0, 0, 0));
    assert!(r.rejected.is_empty(), "{r:?}");
    let a = f.store.service(&first[0].key).unwrap().clone();
    assert_eq!(a.source, src);
    assert_eq!(a.owner.as_deref(), Some("default/a:http"));
    let b_backend = f.store.service(&first[1].key).unwrap().backends[0].id;
    let calls = f.plane.calls.len();

    // The same batch again changes nothing and programs nothing.
    let r = f
        .store
        .replace_source(&mut f.plane, src, None, first.clone(), Durability::Now)
        .unwrap();
    assert_eq!((r.created, r.updated, r.removed, r.unchanged), (0, 0, 0, 2));
    assert_eq!(f.plane.calls.len(), calls);

    // a: 198.18.1.1 drains, 198.18.1.2 goes, 198.18.1.4 comes; b is no longer declared.
    let second = vec![declared(
        "198.18.0.1",
        "default/a:http",
        &[("198.18.1.1", 80, Draining), ("198.18.1.4", 80, Active)],
    )];
    let r = f
        .store
        .replace_source(&mut f.plane, src, None, second, Durability::Now)
        .unwrap();
    assert_eq!((r.created, r.updated, r.removed, r.unchanged), (0, 1, 1, 0));
    let a2 = f.store.service(&first[0].key).unwrap().clone();
    assert_eq!(a2.id, a.id);
    let kept = &a.backends[0];
    assert_eq!(
        (
            a2.backends[0].key(),
            a2.backends[0].id,
            a2.backends[0].generation
        ),
        (kept.key(), kept.id, kept.generation),
        "a backend that stays keeps its slot and generation"
    );
    assert_eq!(a2.backends[0].state, Draining);
    // The ids freed in this batch (198.18.1.2's, b's) are not reused within it.
    let freed = [a.backends[1].id, b_backend];
    assert!(
        !freed.contains(&a2.backends[1].id),
        "{:?} vs {freed:?}",
        ids(&a2)
    );
    assert!(f.store.service(&first[1].key).is_err());
    assert_eq!(f.plane.live.len(), 1);
    assert_eq!(f.plane.live[&first[0].key], a2);

    // Restored as saved, source and owner included.
    let reopened = Store::open(&f.path, LIMITS).unwrap();
    assert_eq!(reopened.state(), f.store.state());
}

/// Ownership: a source never takes another's service, the API changes a source's service only
/// when forced, and sources do not touch each other's services.
#[test]
fn sources_own_their_services() {
    let mut f = fixture();
    let api = svc("198.18.0.1", 80);
    f.store.create_service(&mut f.plane, &api).unwrap();
    let r = f
        .store
        .replace_source(
            &mut f.plane,
            ServiceSource::File,
            None,
            vec![
                declared("198.18.0.1", "web", &[("198.18.1.1", 80, Active)]),
                declared("198.18.0.2", "db", &[("198.18.1.2", 80, Active)]),
            ],
            Durability::Now,
        )
        .unwrap();
    assert_eq!(r.created, 1);
    assert_eq!(r.rejected.len(), 1, "{r:?}");
    assert_eq!(r.rejected[0].owner, "web");
    assert!(
        r.rejected[0].reason.contains("belongs to the api source"),
        "{}",
        r.rejected[0].reason
    );
    assert_eq!(
        f.store.service(&key_of(&api)).unwrap().source,
        ServiceSource::Api
    );

    let db = ServiceKey {
        vip: ip("198.18.0.2"),
        port: 80,
        proto: Protocol::Tcp,
    };
    let e = f.store.check_api_may_change(&db, false).unwrap_err();
    assert!(matches!(e, Error::OwnedByOtherSource(_)), "{e:?}");
    assert!(e.to_string().contains("file source (db)"), "{e}");
    f.store.check_api_may_change(&db, true).unwrap();
    f.store.check_api_may_change(&key_of(&api), false).unwrap();

    // Kubernetes declaring nothing removes nothing of the file's or the API's.
    let r = f
        .store
        .replace_source(
            &mut f.plane,
            ServiceSource::Kubernetes,
            None,
            Vec::new(),
            Durability::Now,
        )
        .unwrap();
    assert_eq!(r, SourceReport::default());
    assert_eq!(f.store.state().services.len(), 2);
}

/// Invalid entries, duplicates and capacity are refused one service at a time, with the reason,
/// and take no ids; the rest of the batch applies.
#[test]
fn replace_source_rejects_per_service() {
    let mut f = fixture();
    let r = f
        .store
        .replace_source(
            &mut f.plane,
            ServiceSource::File,
            None,
            vec![
                declared(
                    "198.18.0.1",
                    "a",
                    &[("198.18.1.1", 80, Active), ("198.18.1.1", 80, Active)],
                ),
                declared("198.18.0.2", "b", &[("198.18.1.2", 0, Active)]),
                declared("198.18.0.3", "c", &[("198.18.1.3", 80, Active); 1]),
                declared("198.18.0.3", "c-again", &[]),
                declared(
                    "198.18.0.4",
                    "d",
                    &[
                        ("198.18.1.4", 80, Active),
                        ("198.18.1.5", 80, Active),
                        ("198.18.1.6", 80, Active),
                        ("198.18.1.7", 80, Active),
                    ],
                ),
            ],
            Durability::Now,
        )
        .unwrap();
    assert_eq!(r.created, 1, "{r:?}");
    let reasons: Vec<(&str, &str)> = r
        .rejected
        .iter()
        .map(|x| (x.owner.as_str(), x.reason.as_str()))
        .collect();
    assert_eq!(reasons.len(), 4, "{reasons:?}");
    assert!(
        reasons
            .iter()
            .any(|(o, why)| *o == "c-again" && why.contains("declared twice"))
    );
    assert!(
        reasons
            .iter()
            .any(|(o, why)| *o == "a" && why.contains("listed twice"))
    );
    assert!(
        reasons
            .iter()
            .any(|(o, why)| *o == "b" && why.contains("port must not be 0"))
    );
    assert!(
        reasons
            .iter()
            .any(|(o, why)| *o == "d" && why.contains("capacity exhausted"))
    );
    // c got service id 0 and backend id 0: the refusals took none.
    let c = f
        .store
        .service(&ServiceKey {
            vip: ip("198.18.0.3"),
            port: 80,
            proto: Protocol::Tcp,
        })
        .unwrap();
    assert_eq!((c.id, c.backends[0].id), (0, 0));
}

/// A batch whose state file cannot be written is undone whole, in the dataplane and memory.
#[test]
fn replace_source_persist_failure_undoes_the_batch() {
    let mut f = fixture();
    f.store
        .replace_source(
            &mut f.plane,
            ServiceSource::File,
            None,
            vec![declared("198.18.0.1", "a", &[("198.18.1.1", 80, Active)])],
            Durability::Now,
        )
        .unwrap();
    let state = f.store.state().clone();
    let live = f.plane.live.clone();
    fs::remove_dir_all(f.path.parent().unwrap()).unwrap();
    let e = f
        .store
        .replace_source(
            &mut f.plane,
            ServiceSource::File,
            None,
            vec![
                declared("198.18.0.1", "a", &[("198.18.1.2", 80, Active)]),
                declared("198.18.0.2", "b", &[("198.18.1.3", 80, Active)]),
            ],
            Durability::Now,
        )
        .unwrap_err();
    assert!(matches!(e, Error::Persistence { .. }), "{e:?}");
    assert_eq!(f.store.state(), &state);
    assert_eq!(f.plane.live, live);
}

/// A scoped replacement touches only the owners named: one Kubernetes Service's change leaves
/// the source's other services alone, and removes that Service's frontends it no longer has.
#[test]
fn scoped_replacement_touches_only_its_owners() {
    let mut f = fixture();
    let src = ServiceSource::Kubernetes;
    f.store
        .replace_source(
            &mut f.plane,
            src,
            None,
            vec![
                declared("198.18.0.1", "ns/a", &[("198.18.1.1", 80, Active)]),
                declared("198.18.0.2", "ns/a", &[("198.18.1.1", 80, Active)]),
                declared("198.18.0.3", "ns/b", &[("198.18.1.2", 80, Active)]),
            ],
            Durability::Now,
        )
        .unwrap();
    let scope: BTreeSet<String> = ["ns/a".to_string()].into();
    let r = f
        .store
        .replace_source(
            &mut f.plane,
            src,
            Some(&scope),
            vec![declared(
                "198.18.0.1",
                "ns/a",
                &[("198.18.1.3", 80, Active)],
            )],
            Durability::Now,
        )
        .unwrap();
    assert_eq!((r.created, r.updated, r.removed, r.unchanged), (0, 1, 1, 0));
    let vips: Vec<String> = f
        .store
        .state()
        .services
        .keys()
        .map(|k| k.vip.to_string())
        .collect();
    assert_eq!(vips, ["198.18.0.1", "198.18.0.3"]);
}
