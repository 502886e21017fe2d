//! The socket-LB programs: loaded over the load balancer's service maps, attached to a cgroup
//! through pinned links (`pin_root/socklb/links/`), and their counters.
use std::{
    collections::BTreeMap,
    os::{
        fd::{AsFd as _, AsRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        CgroupAttachMode, CgroupSockAddr,
        links::{FdLink, PinnedLink},
    },
};
use bpf_common::sock::{globals, map_names, reason};
use tracing::info;

use crate::{
    Error, Result,
    bpf::links::{self, LinkOrigin},
    config::SockLbSettings,
    error::{map_error, program_error},
    lb::LbServiceMaps,
};

/// The compiled socket-LB object (built by `build.rs` from `bpf-sock`).
pub static SOCK_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bpf-sock"));

/// The programs, in attach order.
pub const PROGRAMS: [&str; 8] = [
    "sock_connect4",
    "sock_sendmsg4",
    "sock_recvmsg4",
    "sock_getpeername4",
    "sock_connect6",
    "sock_sendmsg6",
    "sock_recvmsg6",
    "sock_getpeername6",
];

/// Value size of `SOCK_REVNAT`.
const REVNAT_VALUE_SIZE: u32 = std::mem::size_of::<bpf_common::sock::SockRevNatSet>() as u32;

/// The cgroup2 mount point, from `/proc/self/mountinfo` (a hybrid host has it at
/// `/sys/fs/cgroup/unified`, a Kubernetes node at `/sys/fs/cgroup`).
pub fn cgroup2_root() -> Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::io("read /proc/self/mountinfo", e))?;
    text.lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))
                .flatten()
        })
        .ok_or_else(|| {
            Error::Unavailable(
                "no cgroup2 file system is mounted (see /proc/self/mountinfo)".into(),
            )
        })
}

/// A cgroup v2 directory's id: its inode number.
pub fn cgroup_id(dir: &Path) -> Result<u64> {
    let meta =
        std::fs::metadata(dir).map_err(|e| Error::io(format!("cgroup {}", dir.display()), e))?;
    if !meta.is_dir() {
        return Err(Error::InvalidArgument(format!(
            "cgroup {} is not a directory",
            dir.display()
        )));
    }
    Ok(meta.ino())
}

/// The BTF an sk_storage map must be created with: `int` keys, values of `size` bytes.
fn revnat_btf(size: u32) -> Vec<u8> {
    const KIND_INT: u32 = 1;
    const KIND_ARRAY: u32 = 3;
    let strings = b"\0int\0char\0";
    let mut types: Vec<u32> = Vec::new();
    // [1] int: signed, 32 bits.
    types.extend([1, KIND_INT << 24, 4, (1 << 24) | 32]);
    // [2] char: 8 bits.
    types.extend([5, KIND_INT << 24, 1, 8]);
    // [3] char[size], indexed by int.
    types.extend([0, KIND_ARRAY << 24, 0, 2, 1, size]);
    let type_len = (types.len() * 4) as u32;
    let mut out = Vec::new();
    out.extend(0xeb9f_u16.to_ne_bytes());
    out.extend([1u8, 0]);
    for word in [24, 0, type_len, type_len, strings.len() as u32] {
        out.extend(word.to_ne_bytes());
    }
    for t in types {
        out.extend(t.to_ne_bytes());
    }
    out.extend(strings);
    out
}

/// Creates `SOCK_REVNAT` with its BTF and pins it at `pin`: the loader cannot (the object has
/// no BTF), and adopts the pin by name.
fn create_revnat_map(pin: &Path) -> Result<()> {
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_BTF_LOAD: libc::c_long = 18;
    const MAP_TYPE_SK_STORAGE: u32 = 24;
    const F_NO_PREALLOC: u32 = 1;
    let btf = revnat_btf(REVNAT_VALUE_SIZE);
    #[repr(C)]
    struct BtfLoad {
        btf: u64,
        log_buf: u64,
        size: u32,
        log_size: u32,
        log_level: u32,
    }
    let btf_fd = links::bpf_syscall(
        BPF_BTF_LOAD,
        &BtfLoad {
            btf: btf.as_ptr() as u64,
            log_buf: 0,
            size: btf.len() as u32,
            log_size: 0,
            log_level: 0,
        },
    )
    .map(links::owned_fd)
    .map_err(|e| Error::io("load the BTF of SOCK_REVNAT", e))?;
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
        inner_map_fd: u32,
        numa_node: u32,
        map_name: [u8; 16],
        map_ifindex: u32,
        btf_fd: u32,
        btf_key_type_id: u32,
        btf_value_type_id: u32,
        btf_vmlinux_value_type_id: u32,
        map_extra: u64,
    }
    let mut name = [0u8; 16];
    name[..map_names::REVNAT.len()].copy_from_slice(map_names::REVNAT.as_bytes());
    let map_fd = links::bpf_syscall(
        BPF_MAP_CREATE,
        &MapCreate {
            map_type: MAP_TYPE_SK_STORAGE,
            key_size: 4,
            value_size: REVNAT_VALUE_SIZE,
            max_entries: 0,
            map_flags: F_NO_PREALLOC,
            inner_map_fd: 0,
            numa_node: 0,
            map_name: name,
            map_ifindex: 0,
            btf_fd: btf_fd.as_raw_fd() as u32,
            btf_key_type_id: 1,
            btf_value_type_id: 3,
            btf_vmlinux_value_type_id: 0,
            map_extra: 0,
        },
    )
    .map(links::owned_fd)
    .map_err(|e| Error::io("create SOCK_REVNAT (sk_storage)", e))?;
    pin_fd(map_fd, pin, map_names::REVNAT)
}

fn pin_fd(fd: OwnedFd, pin: &Path, name: &str) -> Result<()> {
    let data = MapData::from_fd(fd).map_err(map_error(format!("open {name}")))?;
    data.pin(pin).map_err(|source| Error::Pin {
        context: format!("pin {name} at {}", pin.display()),
        source: Box::new(source),
    })
}

/// Pins the map the load balancer lent us at `pin` (ours), replacing what was there: the
/// loader adopts the maps by name, so the programs use the very maps the XDP program does.
fn pin_lent(fd: &OwnedFd, pin: &Path, name: &str) -> Result<()> {
    match std::fs::remove_file(pin) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(format!("remove {}", pin.display()), e)),
    }
    let fd = fd
        .try_clone()
        .map_err(|e| Error::io(format!("duplicate the descriptor of {name}"), e))?;
    pin_fd(fd, pin, name)
}

/// Runs `program` in the cgroup link pinned at `pin`, if that link is attached to cgroup
/// `cgroup_id` (the configuration may have named another since it was pinned).
fn update_link(pin: &Path, cgroup_id: u64, program: &CgroupSockAddr) -> Result<()> {
    let attached = links::attached_cgroup_id(pin)?;
    if attached != cgroup_id {
        return Err(Error::InvalidArgument(format!(
            "the pinned link is attached to cgroup {attached}, not the configured {cgroup_id}"
        )));
    }
    let prog = program
        .fd()
        .map_err(program_error("the loaded program's descriptor"))?;
    links::update_program(pin, prog.as_fd())
}

/// The loaded and attached socket-LB programs.
pub struct SockLbPlane {
    _bpf: Ebpf,
    pub cgroup: PathBuf,
    links: Vec<(String, PinnedLink, LinkOrigin)>,
    reasons: PerCpuArray<MapData, u64>,
    service_stats: PerCpuArray<MapData, u64>,
    vips: HashMap<MapData, bpf_common::VipKey, bpf_common::VipInfo>,
    /// `SOCK_REVNAT`, whose values sock_diag dumps with each TCP socket.
    pub revnat: MapData,
    /// `SOCK_UDP_CONN`: connected UDP sockets by cookie (sock_diag dumps no storage for UDP).
    pub udp_connected: HashMap<MapData, u64, bpf_common::sock::SockRevNat>,
    pub events: Option<RingBuf<MapData>>,
}

impl SockLbPlane {
    /// The directory of our pins.
    pub fn pin_dir(pin_root: &Path) -> PathBuf {
        crate::bpf::pins::controller_dir(pin_root, super::NAME)
    }

    fn link_pin(pin_root: &Path, program: &str) -> PathBuf {
        Self::pin_dir(pin_root).join("links").join(program)
    }

    /// Loads the programs over `maps` and attaches them to the configured cgroup, adopting the
    /// links a previous run pinned (the hooks never run without a program across a restart).
    pub fn start(settings: &SockLbSettings, pin_root: &Path, maps: &LbServiceMaps) -> Result<Self> {
        if SOCK_OBJECT.is_empty() {
            return Err(Error::InvalidArgument(
                "this datapathd was built without its BPF programs (AYA_BUILD_SKIP)".into(),
            ));
        }
        let cgroup = match &settings.cgroup {
            Some(c) => c.clone(),
            None => cgroup2_root()?,
        };
        let attach_to = cgroup_id(&cgroup)?;
        let mut opt_out = Vec::new();
        for dir in &settings.opt_out_cgroups {
            opt_out.push(cgroup_id(dir)?);
        }
        let dir = Self::pin_dir(pin_root);
        std::fs::create_dir_all(dir.join("links"))
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        pin_lent(
            &maps.vips,
            &dir.join(bpf_common::map_names::VIPS),
            "LB_VIPS",
        )?;
        pin_lent(
            &maps.backends,
            &dir.join(bpf_common::map_names::BACKENDS),
            "LB_BACKENDS",
        )?;
        pin_lent(
            &maps.maglev,
            &dir.join(bpf_common::map_names::MAGLEV),
            "LB_MAGLEV",
        )?;
        // Kept across restarts: the sockets translated before keep their way back.
        let revnat = dir.join(map_names::REVNAT);
        if !revnat.exists() {
            create_revnat_map(&revnat)?;
        }
        let only_netns: u64 = if settings.host_netns_only {
            own_netns_cookie()?
        } else {
            0
        };
        let opt_out_any = u32::from(!opt_out.is_empty());
        let mut loader = EbpfLoader::new();
        loader
            .default_map_pin_directory(&dir)
            .map_max_entries(map_names::SERVICE_STATS, maps.max_services)
            .override_global(globals::MAGLEV_SIZE, &maps.maglev_size, true)
            .override_global(globals::ONLY_NETNS_COOKIE, &only_netns, true)
            .override_global(globals::EVENT_RATE, &settings.event_rate, true)
            .override_global(globals::OPT_OUT_ANY, &opt_out_any, true);
        let mut bpf = loader.load(SOCK_OBJECT).map_err(|source| Error::Load {
            source: Box::new(source),
            context: format!(
                "load the socket-LB object with maps pinned under {}",
                dir.display()
            ),
        })?;
        let cgroup_file = std::fs::File::open(&cgroup)
            .map_err(|e| Error::io(format!("open cgroup {}", cgroup.display()), e))?;
        let mut links = Vec::new();
        for name in PROGRAMS {
            let program: &mut CgroupSockAddr = bpf
                .program_mut(name)
                .ok_or_else(|| Error::InvalidArgument(format!("program {name} missing")))?
                .try_into()
                .map_err(program_error(format!(
                    "program {name} is not cgroup sock_addr"
                )))?;
            crate::bpf::load_retrying(|| program.load())
                .map_err(program_error(format!("load {name} (verifier)")))?;
            let pin = Self::link_pin(pin_root, name);
            let what = format!("{name} on cgroup {}", cgroup.display());
            let program = std::cell::RefCell::new(program);
            let (link, (), origin) = links::adopt_or_attach(
                &pin,
                &what,
                |_pinned: FdLink| update_link(&pin, attach_to, &program.borrow()),
                || {
                    let mut program = program.borrow_mut();
                    let id = program
                        .attach(&cgroup_file, CgroupAttachMode::Single)
                        .map_err(program_error(format!("attach {what}")))?;
                    let link = program
                        .take_link(id)
                        .map_err(program_error("take the new link"))?;
                    let fd_link = FdLink::try_from(link).map_err(|e| {
                        Error::io(
                            format!("{what} was attached without a bpf_link"),
                            std::io::Error::other(e.to_string()),
                        )
                    })?;
                    Ok((fd_link, ()))
                },
            )?;
            links.push((name.to_string(), link, origin));
        }
        let take = |bpf: &mut Ebpf, name: &str| {
            bpf.take_map(name)
                .ok_or_else(|| Error::InvalidArgument(format!("map {name} missing")))
        };
        let mut opt_out_map: HashMap<MapData, u64, u8> =
            HashMap::try_from(take(&mut bpf, map_names::OPT_OUT)?)
                .map_err(map_error("open SOCK_OPT_OUT"))?;
        let stale: Vec<u64> = opt_out_map.keys().filter_map(|k| k.ok()).collect();
        for id in stale.iter().filter(|id| !opt_out.contains(id)) {
            let _ = opt_out_map.remove(id);
        }
        for id in &opt_out {
            opt_out_map
                .insert(id, 1, 0)
                .map_err(map_error("write SOCK_OPT_OUT"))?;
        }
        let reasons = PerCpuArray::try_from(take(&mut bpf, map_names::REASONS)?)
            .map_err(map_error("open SOCK_REASONS"))?;
        let service_stats = PerCpuArray::try_from(take(&mut bpf, map_names::SERVICE_STATS)?)
            .map_err(map_error("open SOCK_SVC_STATS"))?;
        let vips = HashMap::try_from(take(&mut bpf, bpf_common::map_names::VIPS)?)
            .map_err(map_error("open LB_VIPS"))?;
        let events = RingBuf::try_from(take(&mut bpf, map_names::EVENTS)?)
            .map_err(map_error("open SOCK_EVENTS"))?;
        let udp_connected = HashMap::try_from(take(&mut bpf, map_names::UDP_CONNECTED)?)
            .map_err(map_error("open SOCK_UDP_CONN"))?;
        let revnat = match take(&mut bpf, map_names::REVNAT)? {
            aya::maps::Map::SkStorage(data) => data,
            _ => {
                return Err(Error::InvalidArgument(
                    "SOCK_REVNAT is not an sk_storage map".into(),
                ));
            }
        };
        info!(cgroup = %cgroup.display(), host_netns_only = settings.host_netns_only,
              opted_out = opt_out.len(), "socket LB attached");
        Ok(Self {
            _bpf: bpf,
            cgroup,
            links,
            reasons,
            service_stats,
            vips,
            revnat,
            udp_connected,
            events: Some(events),
        })
    }

    pub fn programs(&self) -> Vec<String> {
        self.links.iter().map(|(n, _, _)| n.clone()).collect()
    }

    pub fn adopted(&self) -> usize {
        self.links
            .iter()
            .filter(|(_, _, o)| *o == LinkOrigin::Adopted)
            .count()
    }

    /// Every reason's count, summed over CPUs.
    pub fn reasons(&self) -> Result<BTreeMap<String, u64>> {
        let mut out = BTreeMap::new();
        for (i, name) in reason::NAMES.iter().enumerate() {
            let per_cpu = self
                .reasons
                .get(&(i as u32), 0)
                .map_err(map_error("read SOCK_REASONS"))?;
            out.insert(name.to_string(), per_cpu.iter().sum());
        }
        Ok(out)
    }

    /// Translated sockets per service (`proto/vip:port`), for those that had any.
    pub fn service_counts(&self) -> Result<Vec<(String, u64)>> {
        let mut out = Vec::new();
        for entry in self.vips.iter() {
            let (key, info) = entry.map_err(map_error("read LB_VIPS"))?;
            let Ok(per_cpu) = self.service_stats.get(&info.service_id, 0) else {
                continue;
            };
            let n: u64 = per_cpu.iter().sum();
            if n > 0 {
                let ip = std::net::Ipv4Addr::from(key.addr[0].to_ne_bytes());
                let port = u16::from_be(key.port_be);
                let proto = if key.proto == bpf_common::PROTO_UDP {
                    "udp"
                } else {
                    "tcp"
                };
                out.push((format!("{proto}/{ip}:{port}"), n));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Detaches: removes the link pins (with our descriptors dropped, the links go).
    pub fn detach(self, pin_root: &Path) -> Result<()> {
        for (name, link, _) in self.links {
            links::unpin(&Self::link_pin(pin_root, &name))?;
            drop(link);
        }
        Ok(())
    }
}

/// The cookie of the daemon's own network namespace (the host's, where it runs).
fn own_netns_cookie() -> Result<u64> {
    // SO_NETNS_COOKIE (71) on any socket of this namespace.
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")
        .map_err(|e| Error::io("open a socket to read the netns cookie", e))?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket and an out-buffer of the stated length.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            71,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(Error::io(
            "read the network namespace cookie (SO_NETNS_COOKIE)",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_revnat_btf_is_int_keys_and_a_byte_array_of_the_value_size() {
        let btf = revnat_btf(200);
        assert_eq!(u16::from_ne_bytes([btf[0], btf[1]]), 0xeb9f);
        let word = |i: usize| u32::from_ne_bytes(btf[i..i + 4].try_into().unwrap());
        assert_eq!(word(4), 24, "header length");
        let (type_len, str_len) = (word(12), word(20));
        assert_eq!(type_len, 14 * 4);
        assert_eq!(btf.len(), 24 + type_len as usize + str_len as usize);
        // The array's element count is the value size.
        assert_eq!(word(24 + type_len as usize - 4), 200);
        assert_eq!(&btf[24 + type_len as usize..], b"\0int\0char\0");
    }

    #[test]
    fn the_cgroup2_root_is_found_in_mountinfo() {
        // Every test machine mounts cgroup2 somewhere.
        let root = cgroup2_root().unwrap();
        assert!(
            root.is_absolute() && root.join("cgroup.procs").exists(),
            "{root:?}"
        );
    }
}
