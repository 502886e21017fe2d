//! The pin directory: where each controller's maps and links live (`pin_root/<controller>/`),
//! the layout check that keeps a map of another build from being reused, and the migration of
//! the flat layout of builds before controllers.
use std::path::{Path, PathBuf};

use aya::maps::MapData;
use tracing::{info, warn};

use crate::{Error, Result};

/// `f_type` of bpffs.
pub const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The filesystem type (`statfs`'s `f_type`) of `path`, or `None` if it cannot be read.
pub fn fs_magic(path: &Path) -> Option<i64> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statfs into a zeroed struct with a valid C string.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut stat) };
    (rc == 0).then_some(stat.f_type as i64)
}

/// The pin directory of controller `controller`.
pub fn controller_dir(pin_root: &Path, controller: &str) -> PathBuf {
    pin_root.join(controller)
}

/// What a controller owned in the flat layout of builds before controllers: its maps by name
/// under `pin_root`, and its links under `pin_root/links/` by file-name prefix.
pub struct FlatPins<'a> {
    pub maps: &'a [&'a str],
    pub link_prefixes: &'a [&'a str],
}

/// Moves the pins a previous build left flat under `pin_root` into `dir` (a controller's pin
/// directory), before the controller loads its object there. A rename inside bpffs moves the
/// pin only: the maps keep their entries and the links stay attached, so forwarding has no
/// gap. Answers how many pins moved.
pub fn migrate_flat_pins(pin_root: &Path, dir: &Path, owned: &FlatPins<'_>) -> Result<usize> {
    let mut moved = 0;
    let mut move_pin = |from: PathBuf, to: PathBuf| -> Result<()> {
        if !from.exists() {
            return Ok(());
        }
        if to.exists() {
            warn!(old = %from.display(), new = %to.display(),
                  "a pin exists in both layouts; the new one is kept, the old one removed");
            return std::fs::remove_file(&from)
                .map_err(|e| Error::io(format!("remove {}", from.display()), e));
        }
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| Error::io(format!("create {}", parent.display()), e))?;
        }
        std::fs::rename(&from, &to).map_err(|e| {
            Error::io(
                format!("move pin {} to {}", from.display(), to.display()),
                e,
            )
        })?;
        moved += 1;
        Ok(())
    };
    for name in owned.maps {
        move_pin(pin_root.join(name), dir.join(name))?;
    }
    let flat_links = pin_root.join("links");
    if let Ok(entries) = std::fs::read_dir(&flat_links) {
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            if owned.link_prefixes.iter().any(|p| file.starts_with(p)) {
                move_pin(entry.path(), dir.join("links").join(&file))?;
            }
        }
        // Gone once every controller took its links.
        let _ = std::fs::remove_dir(&flat_links);
    }
    if moved > 0 {
        info!(from = %pin_root.display(), to = %dir.display(), pins = moved,
              "moved the pins of a previous build into this controller's directory");
    }
    Ok(moved)
}

/// A pinned map's layout as a build expects it: name, key size, value size, and the entry count
/// where the ABI fixes it too (the others follow the configuration).
pub type PinLayout = (&'static str, usize, usize, Option<u32>);

/// Unpins every map of `layouts` under `pin_root` whose layout differs, so that the
/// loader creates it afresh. Such a pin is left by a datapathd built with another ABI (an
/// upgrade that changed a map's key or value type, or added a drop reason): reused, it would
/// make the load fail in the verifier or, worse, be read with the wrong layout. Only those maps
/// lose their entries (a replaced `LB_FLOWS` loses its flows: established connections are
/// re-pinned by Maglev, full-NAT ones with a new source port); every compatible map, the
/// services and the pinned links are kept. The old program keeps forwarding with the old maps
/// until the new one is swapped into its links.
pub fn replace_incompatible_pins(pin_root: &Path, layouts: &[PinLayout]) -> Result<()> {
    use std::os::fd::AsFd as _;
    for &(name, key_size, value_size, entries) in layouts {
        let path = pin_root.join(name);
        if !path.exists() {
            continue;
        }
        let map = MapData::from_pin(&path).map_err(|e| Error::Map {
            context: format!("open pinned map {}", path.display()),
            source: Box::new(e),
        })?;
        let found = crate::bpf::maps::map_layout(map.fd().as_fd())?;
        let compatible = found.key_size as usize == key_size
            && found.value_size as usize == value_size
            && entries.is_none_or(|n| n == found.max_entries);
        if compatible {
            continue;
        }
        warn!(
            map = name,
            found_key_bytes = found.key_size,
            found_value_bytes = found.value_size,
            found_entries = found.max_entries,
            key_bytes = key_size,
            value_bytes = value_size,
            "pinned map has another build's layout: replaced by an empty one; its entries are lost"
        );
        std::fs::remove_file(&path)
            .map_err(|e| Error::io(format!("unpin incompatible map {}", path.display()), e))?;
    }
    Ok(())
}

/// Mounts bpffs at `/sys/fs/bpf` when nothing is mounted there.
pub fn ensure_bpffs() -> Result<()> {
    let path = c"/sys/fs/bpf";
    if fs_magic(Path::new("/sys/fs/bpf")) == Some(BPF_FS_MAGIC) {
        return Ok(());
    }
    std::fs::create_dir_all("/sys/fs/bpf").map_err(|e| Error::io("create /sys/fs/bpf", e))?;
    // SAFETY: plain mount(2) call with valid C strings.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            path.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(Error::io(
            "mount bpffs at /sys/fs/bpf",
            std::io::Error::last_os_error(),
        ));
    }
    info!("mounted bpffs at /sys/fs/bpf");
    Ok(())
}

/// Removes the files under `dir` whose parent directory is named `links` (at any depth), so
/// every pinned link detaches before any map goes.
fn unpin_links(dir: &Path) -> Result<()> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| Error::io(format!("list {}", dir.display()), e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(format!("list {}", dir.display()), e))?;
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        if entry.file_name() == "links" {
            for link in std::fs::read_dir(&path).map_err(|e| Error::io("list pinned links", e))? {
                let link = link.map_err(|e| Error::io("list pinned links", e))?;
                // Removing the last reference (the pin) detaches the link.
                std::fs::remove_file(link.path()).map_err(|e| {
                    Error::io(format!("remove pinned link {}", link.path().display()), e)
                })?;
            }
        } else {
            unpin_links(&path)?;
        }
    }
    Ok(())
}

/// Detaches everything pinned under `pin_root`, in the flat layout of older builds and in the
/// controllers' directories (links first, so the programs stop at once), and removes every
/// pin and directory. Used by `datapathd cleanup`.
pub fn cleanup(pin_root: &Path) -> Result<()> {
    if !pin_root.exists() {
        return Ok(());
    }
    unpin_links(pin_root)?;
    std::fs::remove_dir_all(pin_root)
        .map_err(|e| Error::io(format!("remove {}", pin_root.display()), e))
}
