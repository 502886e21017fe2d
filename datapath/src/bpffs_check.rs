//! Is the bpffs holding our pins private to the daemon's mount namespace?
//!
//! The datapath survives the daemon (`kill -9` included) because its maps and links are pinned
//! in a bpffs. `ip netns exec NS datapathd ...` runs the daemon in a new mount namespace with a
//! fresh sysfs, where `/sys/fs/bpf` is empty; the daemon then mounts a bpffs of its own there,
//! seen by nobody else, and when the daemon exits that namespace, the mount, its pins and so
//! the whole datapath go with it. [`warn_if_private`] says so at start.
//!
//! How it decides: each bpffs mount (`mount -t bpf`) is its own instance (superblock), and the
//! pins belong to the instance. The instance is named by the device number that
//! `/proc/PID/mountinfo` shows in its third field: bpffs has no backing device, so the kernel
//! gives each instance an anonymous device number (`0:N`), unique among the instances that
//! exist. The pins outlive us when the instance we pin into is also mounted in PID 1's mount
//! namespace, which lives as long as the machine: the same `0:N` appears in
//! `/proc/1/mountinfo`. Mount ids do not answer this (a mount namespace copied with
//! `unshare`/`ip netns exec` gets new mount ids for the very same instances), and neither do
//! propagation peer groups (`shared:N`, `master:N` describe where future mount events travel,
//! not which instance is mounted: `ip netns exec` makes every copied mount a slave, and a bpffs
//! mounted afterwards is in no group at all).
//!
//! Limits: a daemon in a container whose PID 1 is the container's own init sees that init's
//! mount namespace, not the host's; there the check can only say whether the pins outlive the
//! daemon within the container.
use std::path::{Path, PathBuf};

use tracing::{debug, warn};

/// One line of `/proc/PID/mountinfo`, the fields this check reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub mount_id: u64,
    /// `major:minor` of the filesystem instance (for bpffs an anonymous `0:N`).
    pub dev: (u32, u32),
    pub mount_point: PathBuf,
    pub fs_type: String,
}

/// Parses mountinfo text (`proc(5)`); lines that do not parse are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Mount> {
    // 36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
    // id parent dev root mount-point options [optional fields...] - fstype source super-options
    let (head, tail) = line.split_once(" - ")?;
    let mut head = head.split(' ');
    let mount_id = head.next()?.parse().ok()?;
    let _parent = head.next()?;
    let (major, minor) = head.next()?.split_once(':')?;
    let dev = (major.parse().ok()?, minor.parse().ok()?);
    let _root = head.next()?;
    let mount_point = PathBuf::from(unescape(head.next()?));
    let fs_type = tail.split(' ').next()?.to_owned();
    Some(Mount {
        mount_id,
        dev,
        mount_point,
        fs_type,
    })
}

/// Undoes mountinfo's octal escapes (`\040` space, `\011` tab, `\012` newline, `\134` `\`).
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal.and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok()) {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount `path` is on: the one with the longest mount point containing it; of mounts
/// stacked on the same point, the last listed (mounted last, so on top).
pub fn covering<'a>(mounts: &'a [Mount], path: &Path) -> Option<&'a Mount> {
    mounts
        .iter()
        .filter(|m| path.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.components().count())
        .and_then(|deepest| {
            mounts
                .iter()
                .rev()
                .find(|m| m.mount_point == deepest.mount_point)
        })
}

/// What holds the pins under a pin root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinFs {
    /// No mount covers the path (mountinfo unreadable or empty).
    Unknown,
    /// Not a bpffs: pinning there fails on its own, with its own error.
    NotBpffs {
        mount_point: PathBuf,
        fs_type: String,
    },
    /// A bpffs instance PID 1's mount namespace also has: the pins outlive the daemon.
    Shared { mount_point: PathBuf },
    /// A bpffs instance only this mount namespace has: the pins die with it.
    Private {
        mount_point: PathBuf,
        dev: (u32, u32),
    },
}

/// Decides from our mountinfo (`ours`) and PID 1's (`init`) what `pin_root` is on.
pub fn classify(ours: &str, init: &str, pin_root: &Path) -> PinFs {
    let ours = parse_mountinfo(ours);
    let Some(mount) = covering(&ours, pin_root) else {
        return PinFs::Unknown;
    };
    let mount_point = mount.mount_point.clone();
    if mount.fs_type != "bpf" {
        return PinFs::NotBpffs {
            mount_point,
            fs_type: mount.fs_type.clone(),
        };
    }
    let shared = parse_mountinfo(init)
        .iter()
        .any(|m| m.fs_type == "bpf" && m.dev == mount.dev);
    if shared {
        PinFs::Shared { mount_point }
    } else {
        PinFs::Private {
            mount_point,
            dev: mount.dev,
        }
    }
}

/// `path` with symbolic links resolved as far as it exists (the pin root may not yet).
fn resolve(path: &Path) -> PathBuf {
    let mut existing = path;
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = std::fs::canonicalize(existing) {
            return rest.iter().rev().fold(real, |p, c| p.join(c));
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_owned());
                existing = parent;
            }
            _ => return path.to_owned(),
        }
    }
}

/// Warns when the bpffs holding `pin_root` is private to this process's mount namespace (see
/// the module documentation). Call it once the modules have started, when the bpffs is
/// mounted. Says nothing when the daemon shares PID 1's mount namespace, and only logs at
/// debug level when it cannot tell.
pub fn warn_if_private(pin_root: &Path) {
    let same_ns = match (
        std::fs::read_link("/proc/self/ns/mnt"),
        std::fs::read_link("/proc/1/ns/mnt"),
    ) {
        (Ok(ours), Ok(init)) => ours == init,
        _ => false,
    };
    if same_ns {
        return;
    }
    let (ours, init) = match (
        std::fs::read_to_string("/proc/self/mountinfo"),
        std::fs::read_to_string("/proc/1/mountinfo"),
    ) {
        (Ok(ours), Ok(init)) => (ours, init),
        (Err(e), _) | (_, Err(e)) => {
            debug!(error = %e, "cannot read the mount tables: bpffs visibility not checked");
            return;
        }
    };
    let pin_root = resolve(pin_root);
    if let PinFs::Private { mount_point, dev } = classify(&ours, &init, &pin_root) {
        warn!(
            pin_root = %pin_root.display(),
            bpffs = %mount_point.display(),
            dev = %format!("{}:{}", dev.0, dev.1),
            "the bpffs holding the pins is private to datapathd's mount namespace (PID 1 does \
             not have it): when the daemon exits, even after SIGTERM or kill -9, the pins and \
             with them the datapath are gone; run datapathd in the host's mount namespace and \
             join only the network namespace (nsenter --net=/run/netns/NS datapathd ...), not \
             with `ip netns exec` (see docs/operations.md)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PID 1's mount table on a host with systemd: bpffs at /sys/fs/bpf, instance 0:30.
    const HOST: &str = "\
22 28 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
23 28 0:22 / /proc rw,nosuid,nodev,noexec,relatime shared:13 - proc proc rw
28 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro
35 22 0:30 / /sys/fs/bpf rw,nosuid,nodev,noexec,relatime shared:9 - bpf bpf rw,mode=700
40 22 0:33 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw
";

    /// `ip netns exec lb datapathd`: a copied namespace (new mount ids, every mount a slave), a
    /// fresh sysfs over /sys (here the copied one is still listed below it, as when it could
    /// not be detached), and the bpffs datapathd mounted itself (instance 0:61).
    const IP_NETNS_EXEC: &str = "\
622 621 8:1 / / rw,relatime master:1 - ext4 /dev/sda1 rw,errors=remount-ro
623 622 0:22 / /proc rw,nosuid,nodev,noexec,relatime master:13 - proc proc rw
640 622 0:21 / /sys rw,nosuid,nodev,noexec,relatime master:7 - sysfs sysfs rw
641 640 0:30 / /sys/fs/bpf rw,nosuid,nodev,noexec,relatime master:9 - bpf bpf rw,mode=700
700 622 0:60 / /sys rw,relatime - sysfs lb rw
701 700 0:61 / /sys/fs/bpf rw,relatime - bpf bpf rw
";

    /// `unshare -m` without a new sysfs: other mount ids, the host's bpffs instance.
    const UNSHARED_SAME_BPFFS: &str = "\
900 899 8:1 / / rw,relatime - ext4 /dev/sda1 rw,errors=remount-ro
901 900 0:21 / /sys rw,nosuid,nodev,noexec,relatime - sysfs sysfs rw
902 901 0:30 / /sys/fs/bpf rw,nosuid,nodev,noexec,relatime - bpf bpf rw,mode=700
";

    #[test]
    fn parses_mountinfo_lines() {
        let mounts = parse_mountinfo(HOST);
        assert_eq!(mounts.len(), 5);
        assert_eq!(
            mounts[3],
            Mount {
                mount_id: 35,
                dev: (0, 30),
                mount_point: "/sys/fs/bpf".into(),
                fs_type: "bpf".into(),
            }
        );
        // Escaped mount points, lines without optional fields, garbage.
        let odd = "\
50 28 0:40 / /mnt/with\\040space\\134x rw - bpf bpf rw
51 28 0:41 / /mnt/b rw shared:3 master:2 - tmpfs tmpfs rw
not a mount line
52 28 x:y / /mnt/c rw - bpf bpf rw
";
        let mounts = parse_mountinfo(odd);
        assert_eq!(mounts.len(), 2);
        assert_eq!(mounts[0].mount_point, Path::new("/mnt/with space\\x"));
        assert_eq!(mounts[1].fs_type, "tmpfs");
        assert_eq!(unescape("a\\012b\\0"), "a\nb\\0");
    }

    #[test]
    fn the_covering_mount_is_the_deepest_and_topmost() {
        let ns = parse_mountinfo(IP_NETNS_EXEC);
        let m = covering(&ns, Path::new("/sys/fs/bpf/datapath")).unwrap();
        assert_eq!((m.mount_id, m.dev), (701, (0, 61)));
        let m = covering(&ns, Path::new("/sys/kernel")).unwrap();
        assert_eq!(m.mount_id, 700);
        // Component-wise: /sys/fs/bpfx is not under /sys/fs/bpf.
        let m = covering(&ns, Path::new("/sys/fs/bpfx")).unwrap();
        assert_eq!(m.mount_id, 700);
        assert_eq!(covering(&ns, Path::new("/var/lib")).unwrap().mount_id, 622);
        assert_eq!(covering(&[], Path::new("/")), None);
    }

    #[test]
    fn a_bpffs_only_this_namespace_has_is_private() {
        let pins = Path::new("/sys/fs/bpf/datapath");
        assert_eq!(
            classify(IP_NETNS_EXEC, HOST, pins),
            PinFs::Private {
                mount_point: "/sys/fs/bpf".into(),
                dev: (0, 61)
            }
        );
        // Same instance under other mount ids (and no peer group): shared.
        assert_eq!(
            classify(UNSHARED_SAME_BPFFS, HOST, pins),
            PinFs::Shared {
                mount_point: "/sys/fs/bpf".into()
            }
        );
        // PID 1's own table (the same namespace, nsenter --net): shared.
        assert_eq!(
            classify(HOST, HOST, pins),
            PinFs::Shared {
                mount_point: "/sys/fs/bpf".into()
            }
        );
        // A pin root that is not on a bpffs is not this check's business.
        assert_eq!(
            classify(HOST, HOST, Path::new("/var/lib/datapath")),
            PinFs::NotBpffs {
                mount_point: "/".into(),
                fs_type: "ext4".into()
            }
        );
        assert_eq!(classify("", HOST, pins), PinFs::Unknown);
        // PID 1 has a device 0:61 too, but not a bpffs one: still private.
        let init = format!("{HOST}77 28 0:61 / /run/x rw - tmpfs tmpfs rw\n");
        assert!(matches!(
            classify(IP_NETNS_EXEC, &init, pins),
            PinFs::Private { .. }
        ));
    }

    #[test]
    fn resolve_follows_links_as_far_as_the_path_exists() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, dir.path().join("link")).unwrap();
        let got = resolve(&dir.path().join("link/not/yet"));
        assert_eq!(got, real.canonicalize().unwrap().join("not/yet"));
    }
}
