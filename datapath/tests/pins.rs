//! The pin layout on a real bpffs: the flat pins of builds before controllers move into a
//! controller's directory with their entries (the same kernel map, not a copy), only the pins
//! the controller owns move, and `datapathd cleanup` removes both layouts.
//!
//! Needs root (bpffs, BPF maps). Without it the tests are skipped, unless
//! `DATAPATH_REQUIRE_PRIVILEGED=1`, in which case they fail.

use std::{os::fd::AsFd as _, path::PathBuf};

use aya::maps::MapData;
use datapath::{
    bpf::pins::{FlatPins, cleanup, controller_dir, migrate_flat_pins},
    gc::{BPF_MAP_TYPE_LRU_HASH, create_hash_map, read_all, update_all},
};

fn privileged() -> bool {
    netns_tests::privilege::privileged_as_root("creating BPF maps and pins")
}

/// A fresh directory on the host's bpffs, removed first if a dead run left it.
fn pin_root(name: &str) -> PathBuf {
    let root = PathBuf::from(format!(
        "/sys/fs/bpf/datapath-test-pins-{name}-{}",
        std::process::id()
    ));
    let _ = cleanup(&root);
    std::fs::create_dir_all(&root).expect("bpffs directory");
    root
}

/// Pins a new hash map holding `entries` at `path`; answers the kernel's id of the map.
fn pin_map(path: &std::path::Path, entries: &[(u32, u64)]) -> u32 {
    let fd = create_hash_map::<u32, u64>(BPF_MAP_TYPE_LRU_HASH, 64).expect("create map");
    update_all(fd.as_fd(), entries).expect("fill map");
    let map = MapData::from_fd(fd).expect("map data");
    map.pin(path).expect("pin map");
    map.info().expect("map info").id()
}

#[test]
fn flat_pins_move_into_the_controllers_directory_keeping_the_same_maps() {
    if !privileged() {
        return;
    }
    let root = pin_root("migrate");
    let flows_id = pin_map(&root.join("LB_FLOWS"), &[(1, 10), (2, 20)]);
    let other_id = pin_map(&root.join("TC_GENERATION"), &[(0, 7)]);
    std::fs::create_dir_all(root.join("links")).unwrap();
    // Stand-ins for pinned links: the migration moves pins by name, whatever they hold.
    pin_map(&root.join("links").join("xdp_lb_eth0"), &[]);
    pin_map(&root.join("links").join("tc_ingress_eth0"), &[]);

    let dir = controller_dir(&root, "lb");
    let owned = FlatPins {
        maps: &["LB_FLOWS", "LB_VIPS"],
        link_prefixes: &["xdp_lb_"],
    };
    assert_eq!(migrate_flat_pins(&root, &dir, &owned).unwrap(), 2);

    let moved = MapData::from_pin(dir.join("LB_FLOWS")).expect("moved pin");
    assert_eq!(moved.info().unwrap().id(), flows_id, "the same kernel map");
    let mut entries: Vec<(u32, u64)> = read_all(moved.fd().as_fd()).unwrap();
    entries.sort_unstable();
    assert_eq!(entries, [(1, 10), (2, 20)], "its entries are kept");
    assert!(dir.join("links").join("xdp_lb_eth0").exists());
    assert!(!root.join("LB_FLOWS").exists());
    // Another controller's pins stay where they are until that controller moves them.
    let kept = MapData::from_pin(root.join("TC_GENERATION")).expect("not ours: kept");
    assert_eq!(kept.info().unwrap().id(), other_id);
    assert!(root.join("links").join("tc_ingress_eth0").exists());
    // A second start finds nothing left to move.
    assert_eq!(migrate_flat_pins(&root, &dir, &owned).unwrap(), 0);

    cleanup(&root).expect("cleanup removes both layouts");
    assert!(!root.exists());
}
