//! Pinned bpf_links, the same way for every attachment (XDP, TCX, and later cgroup and LSM):
//! adopt the link a previous run pinned by swapping our program into it (`bpf_link_update`:
//! the hook never runs without a program across a restart or an upgrade), or attach afresh
//! and pin the new link. A stale pinned link, one whose interface was deleted or that is of
//! another kind, is replaced by a new one.
use std::path::Path;

use aya::programs::links::{FdLink, PinnedLink};
use tracing::{info, warn};

use crate::{Error, Result};

/// How [`adopt_or_attach`] got its link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkOrigin {
    /// A link pinned by a previous run now runs our program.
    Adopted,
    /// A new link, attached and pinned by this call.
    Created,
}

fn link_error(what: String) -> impl FnOnce(aya::programs::links::LinkError) -> Error {
    move |e| Error::io(what, std::io::Error::other(e.to_string()))
}

/// The link pinned at `pin`, running our program: adopted by `replace` (given the pinned link,
/// it swaps the program in and answers what the caller wants to know of it), or, with no
/// usable pin, created by `attach` and pinned there. `what` names the attachment in errors and
/// logs (`xdp_lb on eth0`).
pub fn adopt_or_attach<T>(
    pin: &Path,
    what: &str,
    replace: impl FnOnce(FdLink) -> Result<T>,
    attach: impl FnOnce() -> Result<(FdLink, T)>,
) -> Result<(PinnedLink, T, LinkOrigin)> {
    if pin.exists() {
        let adopted = PinnedLink::from_pin(pin)
            .map_err(link_error(format!("open pinned link {}", pin.display())))
            .and_then(|pinned| replace(FdLink::from(pinned)));
        match adopted {
            Ok(extra) => {
                // The pin keeps the link, and the program now in it, alive; hold it by path.
                let pinned = PinnedLink::from_pin(pin)
                    .map_err(link_error(format!("reopen pinned link {}", pin.display())))?;
                info!(
                    link = what,
                    "adopted the pinned link: our program now runs in it"
                );
                return Ok((pinned, extra, LinkOrigin::Adopted));
            }
            Err(e) => {
                // E.g. the interface was deleted and re-created under the same name: the old
                // link is defunct and cannot be updated.
                warn!(link = what, error = %e, "stale pinned link replaced by a new one");
                std::fs::remove_file(pin).map_err(|e| {
                    Error::io(format!("remove stale pinned link {}", pin.display()), e)
                })?;
            }
        }
    }
    let (link, extra) = attach()?;
    if let Some(dir) = pin.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    }
    let pinned = link.pin(pin).map_err(|source| Error::Pin {
        context: format!("pin the link of {what}"),
        source: Box::new(source),
    })?;
    Ok((pinned, extra, LinkOrigin::Created))
}

/// Removes the pin of a link we hold: with our descriptor dropped too, the link detaches.
pub fn unpin(pin: &Path) -> Result<()> {
    match std::fs::remove_file(pin) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(
            format!("remove pinned link {}", pin.display()),
            e,
        )),
    }
}

/// `bpf(2)` with one `union bpf_attr` variant.
pub(crate) fn bpf_syscall<T>(cmd: libc::c_long, attr: &T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid bpf_attr variant of the size passed, outliving the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const T,
            std::mem::size_of::<T>(),
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// The descriptor `bpf(2)` answered.
pub(crate) fn owned_fd(fd: libc::c_long) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd as _;
    // SAFETY: a descriptor the kernel just gave us, owned from here.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) }
}

/// Opens the object pinned at `pin` (`BPF_OBJ_GET`).
pub(crate) fn obj_get(pin: &Path) -> Result<std::os::fd::OwnedFd> {
    use std::os::unix::ffi::OsStrExt as _;
    const BPF_OBJ_GET: libc::c_long = 7;
    let path = std::ffi::CString::new(pin.as_os_str().as_bytes()).map_err(|e| {
        Error::io(
            format!("pin path {}", pin.display()),
            std::io::Error::other(e),
        )
    })?;
    // union bpf_attr for BPF_OBJ_GET: pathname, bpf_fd, file_flags.
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let attr = ObjGet {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    bpf_syscall(BPF_OBJ_GET, &attr)
        .map(owned_fd)
        .map_err(|e| Error::io(format!("open pinned link {}", pin.display()), e))
}

/// The first words of the kernel's `struct bpf_link_info` for the link pinned at `pin`: type,
/// id, prog_id, then (8-aligned, from word 2) the per-type union.
fn link_info(pin: &Path) -> Result<[u64; 16]> {
    use std::os::fd::AsRawFd as _;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    let fd = obj_get(pin)?;
    let mut info = [0u64; 16];
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let attr = InfoByFd {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    bpf_syscall(BPF_OBJ_GET_INFO_BY_FD, &attr)
        .map_err(|e| Error::io(format!("read link info of {}", pin.display()), e))?;
    Ok(info)
}

/// The interface the link pinned at `pin` is attached to, from the kernel's link info
/// (`bpf_link_info.xdp.ifindex` / `.tcx.ifindex`, which share an offset): `0` when the link was
/// detached (`bpftool link detach`, or its interface deleted). No event announces a detach,
/// which is why the controllers' watchdogs ask.
pub fn attached_ifindex(pin: &Path) -> Result<u32> {
    // The first u32 of the union.
    let union = link_info(pin)?[2].to_ne_bytes();
    Ok(u32::from_ne_bytes([union[0], union[1], union[2], union[3]]))
}

/// The cgroup the cgroup link pinned at `pin` is attached to (`bpf_link_info.cgroup.cgroup_id`,
/// the cgroup directory's inode number); `0` when it was detached.
pub fn attached_cgroup_id(pin: &Path) -> Result<u64> {
    Ok(link_info(pin)?[2])
}

/// Runs `program` in the link pinned at `pin` (`BPF_LINK_UPDATE`), for a link type aya cannot
/// update itself (cgroup links).
pub fn update_program(pin: &Path, program: std::os::fd::BorrowedFd<'_>) -> Result<()> {
    use std::os::fd::AsRawFd as _;
    const BPF_LINK_UPDATE: libc::c_long = 29;
    let link = obj_get(pin)?;
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let attr = LinkUpdate {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: program.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    bpf_syscall(BPF_LINK_UPDATE, &attr)
        .map(drop)
        .map_err(|e| Error::io(format!("update the pinned link {}", pin.display()), e))
}
