//! The XDP load balancer's dataplane: loads the program, reuses pinned maps, attaches to the
//! configured interfaces and programs services into the BPF maps.
//!
//! # Atomicity
//!
//! A service change never exposes a half-built state to packets:
//!
//! 1. backend slots that are new to the service, or that become active, are written first (the
//!    live table does not reference them yet, or references them already);
//! 2. the new Maglev table is written into the service's *inactive* table slot;
//! 3. the VIP entry is replaced in one hash-map update that flips `table_slot` (the kernel swaps
//!    hash elements under RCU, so a packet sees either the old or the new value whole);
//! 4. only then are backends that leave the active set marked draining, and removed backends'
//!    slots freed (which moves their flows).
//!
//! A failure in steps 1-2 leaves the old table live; the daemon reports the error.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap as StdHashMap, HashSet},
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuValues, xdp::DevMapHash},
    programs::{
        Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
    util::nr_cpus,
};
use bpf_common::{
    BACKEND_ACTIVE, BACKEND_DRAINING, BACKEND_UNUSED, BackendInfo, FAMILY_IPV4, MODE_DSR,
    MODE_FULL_NAT, VipAddrKey, VipInfo, VipKey, globals, maglev_index, map_names, reason,
};
use datapath_api::{
    BackendKey, BackendSpec, BackendState, Counter, DesiredState, ForwardingMode, ServiceKey,
    ServiceSpec, StatsSnapshot,
};
use lb_core::maglev::{self, MaglevBackend};
use tracing::{info, warn};

use crate::error::{Error, Result, map_error, program_error};

/// The compiled XDP object (built by `build.rs` from `bpf-xdp`).
pub static XDP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bpf-xdp"));

/// Name of the load-balancer program in [`XDP_OBJECT`].
pub const PROGRAM_LB: &str = "xdp_lb";

/// How to attach XDP.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum XdpAttachMode {
    /// Native (driver) mode, falling back to generic mode with a logged warning.
    #[default]
    Auto,
    Native,
    Generic,
}

impl std::str::FromStr for XdpAttachMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "native" | "driver" => Ok(Self::Native),
            "generic" | "skb" => Ok(Self::Generic),
            other => Err(format!(
                "unknown XDP mode {other:?} (expected auto, native or generic)"
            )),
        }
    }
}

/// Sizes and places the dataplane is built with.
#[derive(Clone, Debug)]
pub struct DataplaneConfig {
    /// Where maps and links are pinned (a directory under bpffs).
    pub pin_root: PathBuf,
    /// Interfaces to attach the XDP program to (client-facing and backend-facing).
    pub interfaces: Vec<String>,
    pub xdp_mode: XdpAttachMode,
    /// Maglev table size; must be prime.
    pub maglev_size: u32,
    pub max_services: u32,
    pub max_backends: u32,
    pub max_flows: u32,
    /// Full-NAT source port range (inclusive).
    pub nat_port_min: u16,
    pub nat_port_max: u16,
    /// How long an established flow reuses its cached FIB answer (next hop MAC, egress
    /// interface) before looking the route up again; 0 disables the cache.
    pub fib_cache_ns: u64,
}

impl Default for DataplaneConfig {
    fn default() -> Self {
        use bpf_common::defaults;
        Self {
            pin_root: PathBuf::from(defaults::PIN_ROOT),
            interfaces: Vec::new(),
            xdp_mode: XdpAttachMode::Auto,
            maglev_size: defaults::MAGLEV_SIZE,
            max_services: defaults::MAX_SERVICES,
            max_backends: defaults::MAX_BACKENDS,
            max_flows: defaults::MAX_FLOWS,
            nat_port_min: defaults::NAT_PORT_MIN,
            nat_port_max: defaults::NAT_PORT_MAX,
            fib_cache_ns: defaults::FIB_CACHE_NS,
        }
    }
}

impl DataplaneConfig {
    /// Checks the sizes before anything is loaded.
    pub fn validate(&self) -> Result<()> {
        if !maglev::is_prime(self.maglev_size) {
            return Err(Error::InvalidArgument(format!(
                "maglev table size {} is not prime (try 65537 or 16381)",
                self.maglev_size
            )));
        }
        if self.max_services == 0 || self.max_backends == 0 || self.max_flows == 0 {
            return Err(Error::InvalidArgument(
                "max services, backends and flows must be positive".into(),
            ));
        }
        // In u128: two u32 maxima times 2 overflow u64.
        let table_entries = u128::from(self.max_services) * 2 * u128::from(self.maglev_size);
        if table_entries > u128::from(u32::MAX / 4) {
            return Err(Error::InvalidArgument(format!(
                "max services ({}) x 2 x maglev size ({}) is too large for one map",
                self.max_services, self.maglev_size
            )));
        }
        if self.nat_port_min == 0 || self.nat_port_min > self.nat_port_max {
            return Err(Error::InvalidArgument(format!(
                "invalid NAT port range {}-{}",
                self.nat_port_min, self.nat_port_max
            )));
        }
        Ok(())
    }
}

/// Loads [`XDP_OBJECT`] with the configured sizes and globals, reusing (or creating) the maps
/// pinned under `config.pin_root`. Shared by the daemon and the fixture tests.
pub fn load_object(config: &DataplaneConfig) -> Result<Ebpf> {
    if XDP_OBJECT.is_empty() {
        return Err(Error::InvalidArgument(
            "this datapathd was built without its BPF programs (AYA_BUILD_SKIP); rebuild without it"
                .into(),
        ));
    }
    config.validate()?;
    std::fs::create_dir_all(&config.pin_root)
        .map_err(|e| Error::io(format!("create pin root {}", config.pin_root.display()), e))?;
    crate::bpf::pins::replace_incompatible_pins(&config.pin_root, &abi_layouts())?;
    let table_entries = config.max_services * 2 * config.maglev_size;
    let mut loader = EbpfLoader::new();
    loader
        .default_map_pin_directory(&config.pin_root)
        .map_max_entries(map_names::VIPS, config.max_services)
        .map_max_entries(map_names::VIP_ADDRS, config.max_services)
        .map_max_entries(map_names::BACKENDS, config.max_backends)
        .map_max_entries(map_names::MAGLEV, table_entries)
        .map_max_entries(map_names::FLOWS, config.max_flows)
        .map_max_entries(map_names::NAT_REV, config.max_flows)
        .map_max_entries(map_names::VIP_STATS, config.max_services)
        .map_max_entries(map_names::BACKEND_STATS, config.max_backends)
        .override_global(globals::MAGLEV_SIZE, &config.maglev_size, true)
        .override_global(globals::NAT_PORT_MIN, &config.nat_port_min, true)
        .override_global(globals::NAT_PORT_MAX, &config.nat_port_max, true)
        .override_global(globals::FIB_CACHE_NS, &config.fib_cache_ns, true);
    loader.load(XDP_OBJECT).map_err(|source| Error::Load {
        source: Box::new(source),
        context: format!(
            "load the XDP object with maps pinned under {} (if the pinned maps were created \
             with other sizes, run `datapathd cleanup` first)",
            config.pin_root.display()
        ),
    })
}

pub(crate) use crate::bpf::pins::PinLayout;

/// The layout this build's XDP object gives each pinned map whose layout is fixed by the ABI in
/// `bpf-common`.
fn abi_layouts() -> [PinLayout; 10] {
    use bpf_common::{FlowEntry, NatReverseEntry, ct::CtKey, defaults};
    use std::mem::size_of;
    let counter = size_of::<bpf_common::Counter>();
    [
        (
            map_names::VIPS,
            size_of::<VipKey>(),
            size_of::<VipInfo>(),
            None,
        ),
        (map_names::VIP_ADDRS, size_of::<VipAddrKey>(), 4, None),
        (map_names::BACKENDS, 4, size_of::<BackendInfo>(), None),
        (map_names::MAGLEV, 4, 4, None),
        (
            map_names::FLOWS,
            size_of::<CtKey>(),
            size_of::<FlowEntry>(),
            None,
        ),
        (
            map_names::NAT_REV,
            size_of::<CtKey>(),
            size_of::<NatReverseEntry>(),
            None,
        ),
        (map_names::VIP_STATS, 4, counter, None),
        (map_names::BACKEND_STATS, 4, counter, None),
        (
            map_names::INTERFACE_STATS,
            4,
            counter,
            Some(defaults::MAX_IFINDEX),
        ),
        (map_names::REASONS, 4, 8, Some(reason::COUNT)),
    ]
}

/// The ifindex of `name` in this network namespace.
pub(crate) fn interface_index(name: &str) -> Result<u32> {
    let c_name = std::ffi::CString::new(name)
        .map_err(|_| Error::InvalidArgument(format!("invalid interface name {name:?}")))?;
    // SAFETY: valid C string.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index == 0 {
        return Err(Error::InvalidArgument(format!(
            "interface {name:?} does not exist"
        )));
    }
    Ok(index)
}

fn take_map(bpf: &mut Ebpf, name: &str) -> Result<aya::maps::Map> {
    bpf.take_map(name)
        .ok_or_else(|| Error::InvalidArgument(format!("map {name} missing from the XDP object")))
}

fn ipv4_of(addr: IpAddr, what: &str) -> Result<Ipv4Addr> {
    match addr {
        IpAddr::V4(v4) => Ok(v4),
        IpAddr::V6(_) => Err(Error::InvalidArgument(format!(
            "{what} {addr} is IPv6; this release forwards IPv4 only"
        ))),
    }
}

fn addr16(addr: Ipv4Addr) -> [u32; 4] {
    bpf_common::addr16_from_ipv4_octets(addr.octets())
}

fn vip_key(key: &ServiceKey) -> Result<VipKey> {
    Ok(VipKey {
        addr: addr16(ipv4_of(key.vip, "VIP")?),
        port_be: key.port.to_be(),
        proto: key.proto.number(),
        family: FAMILY_IPV4,
    })
}

fn vip_addr_key(addr: IpAddr) -> Result<VipAddrKey> {
    Ok(VipAddrKey {
        addr: addr16(ipv4_of(addr, "VIP")?),
        family: FAMILY_IPV4,
        _pad: [0; 3],
    })
}

/// The source address the kernel would use towards `backend` (a UDP `connect` sends nothing).
/// The same socket then sends one empty datagram to the discard port so the kernel resolves the
/// backend's neighbour entry: without it `bpf_fib_lookup` reports no neighbour and, in DSR mode,
/// the program cannot build the frame.
fn source_towards(backend: Ipv4Addr, prime_neighbour: bool) -> Result<Ipv4Addr> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
        .map_err(|e| Error::io("open a UDP socket for route lookup", e))?;
    socket
        .connect(SocketAddr::from((backend, 9)))
        .map_err(|e| Error::InvalidArgument(format!("no route to backend {backend}: {e}")))?;
    let local = socket
        .local_addr()
        .map_err(|e| Error::io("read the route's source address", e))?;
    if prime_neighbour {
        // Best effort: the discard port may answer with ICMP port unreachable, which is fine.
        let _ = socket.send(&[]);
    }
    match local.ip() {
        IpAddr::V4(v4) => Ok(v4),
        IpAddr::V6(v6) => Err(Error::InvalidArgument(format!(
            "route to backend {backend} uses IPv6 source {v6}"
        ))),
    }
}

/// What the dataplane last programmed for a service.
struct Programmed {
    spec: ServiceSpec,
    /// Live table entries per backend id.
    table_entries: BTreeMap<u32, u32>,
}

/// The loaded, attached XDP load balancer.
pub struct Dataplane {
    config: DataplaneConfig,
    bpf: Ebpf,
    vips: HashMap<MapData, VipKey, VipInfo>,
    vip_addrs: HashMap<MapData, VipAddrKey, u32>,
    backends: Array<MapData, BackendInfo>,
    maglev: Array<MapData, u32>,
    vip_stats: PerCpuArray<MapData, bpf_common::Counter>,
    backend_stats: PerCpuArray<MapData, bpf_common::Counter>,
    interface_stats: PerCpuArray<MapData, bpf_common::Counter>,
    reasons: PerCpuArray<MapData, u64>,
    tx_ports: DevMapHash<MapData>,
    /// Attached interfaces: the pinned link and how it was attached.
    links: BTreeMap<String, (PinnedLink, AttachedMode)>,
    programmed: StdHashMap<ServiceKey, Programmed>,
}

/// How the program is attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachedMode {
    Native,
    Generic,
    /// A link pinned by a previous run, whose program was replaced in place; its mode was
    /// chosen by that run.
    Adopted,
}

impl AttachedMode {
    pub fn name(self) -> &'static str {
        match self {
            AttachedMode::Native => "native",
            AttachedMode::Generic => "generic",
            AttachedMode::Adopted => "adopted",
        }
    }
}

/// Entries in use and capacity of one map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapUsage {
    pub name: &'static str,
    pub entries: u64,
    pub capacity: u64,
}

fn link_pin_path(pin_root: &Path, interface: &str) -> PathBuf {
    pin_root.join("links").join(format!("xdp_lb_{interface}"))
}

impl Dataplane {
    /// Mounts bpffs if needed, loads the program (reusing pinned maps), and attaches it to every
    /// configured interface, replacing the program of an existing pinned link atomically.
    pub fn start(config: &DataplaneConfig) -> Result<Self> {
        if config.interfaces.is_empty() {
            return Err(Error::InvalidArgument(
                "no interface to attach to (use --iface)".into(),
            ));
        }
        let mut if_indexes = Vec::new();
        for name in &config.interfaces {
            if_indexes.push((name.clone(), interface_index(name)?));
        }
        crate::bpf::pins::ensure_bpffs()?;
        let mut bpf = load_object(config)?;

        let program: &mut Xdp = bpf
            .program_mut(PROGRAM_LB)
            .ok_or_else(|| Error::InvalidArgument(format!("program {PROGRAM_LB} missing")))?
            .try_into()
            .map_err(program_error("program xdp_lb is not XDP"))?;
        program
            .load()
            .map_err(program_error("load xdp_lb (verifier)"))?;

        std::fs::create_dir_all(config.pin_root.join("links"))
            .map_err(|e| Error::io("create the links pin directory", e))?;
        let mut links = BTreeMap::new();
        for (name, _) in &if_indexes {
            links.insert(name.clone(), attach_or_replace(program, config, name)?);
        }

        let mut tx_ports: DevMapHash<MapData> =
            DevMapHash::try_from(take_map(&mut bpf, map_names::TX_PORTS)?)
                .map_err(map_error("open LB_TX_PORTS"))?;
        for (name, index) in &if_indexes {
            tx_ports.insert(*index, *index, None, 0).map_err(|e| {
                Error::io(
                    format!("add {name} to LB_TX_PORTS"),
                    std::io::Error::other(e.to_string()),
                )
            })?;
        }

        let vips = HashMap::try_from(take_map(&mut bpf, map_names::VIPS)?)
            .map_err(map_error("open LB_VIPS"))?;
        let vip_addrs = HashMap::try_from(take_map(&mut bpf, map_names::VIP_ADDRS)?)
            .map_err(map_error("open LB_VIP_ADDRS"))?;
        let backends = Array::try_from(take_map(&mut bpf, map_names::BACKENDS)?)
            .map_err(map_error("open LB_BACKENDS"))?;
        let maglev = Array::try_from(take_map(&mut bpf, map_names::MAGLEV)?)
            .map_err(map_error("open LB_MAGLEV"))?;
        let vip_stats = PerCpuArray::try_from(take_map(&mut bpf, map_names::VIP_STATS)?)
            .map_err(map_error("open LB_VIP_STATS"))?;
        let backend_stats = PerCpuArray::try_from(take_map(&mut bpf, map_names::BACKEND_STATS)?)
            .map_err(map_error("open LB_BE_STATS"))?;
        let reasons = PerCpuArray::try_from(take_map(&mut bpf, map_names::REASONS)?)
            .map_err(map_error("open LB_REASONS"))?;
        let interface_stats =
            PerCpuArray::try_from(take_map(&mut bpf, map_names::INTERFACE_STATS)?)
                .map_err(map_error("open LB_IF_STATS"))?;

        Ok(Self {
            config: config.clone(),
            bpf,
            vips,
            vip_addrs,
            backends,
            maglev,
            vip_stats,
            backend_stats,
            interface_stats,
            reasons,
            tx_ports,
            links,
            programmed: StdHashMap::new(),
        })
    }

    /// Attaches the loaded program to one more interface (a configuration reload). The
    /// interfaces already attached are not touched.
    pub fn attach_interface(&mut self, name: &str) -> Result<()> {
        if self.links.contains_key(name) {
            return Ok(());
        }
        let index = interface_index(name)?;
        let config = self.config.clone();
        let program: &mut Xdp = self
            .bpf
            .program_mut(PROGRAM_LB)
            .ok_or_else(|| Error::InvalidArgument(format!("program {PROGRAM_LB} missing")))?
            .try_into()
            .map_err(program_error("program xdp_lb is not XDP"))?;
        let link = attach_or_replace(program, &config, name)?;
        if let Err(e) = self.tx_ports.insert(index, index, None, 0) {
            // No partial update: without its devmap entry the interface cannot be a redirect
            // target, so undo the attachment.
            let _ = std::fs::remove_file(link_pin_path(&self.config.pin_root, name));
            drop(link);
            return Err(Error::io(
                format!("add {name} to LB_TX_PORTS"),
                std::io::Error::other(e.to_string()),
            ));
        }
        self.links.insert(name.to_string(), link);
        self.config.interfaces.push(name.to_string());
        Ok(())
    }

    /// Detaches the program from `name` (a configuration reload) and removes its pin.
    pub fn detach_interface(&mut self, name: &str) -> Result<()> {
        let Some((link, _)) = self.links.remove(name) else {
            return Ok(());
        };
        if let Ok(index) = interface_index(name) {
            let _ = self.tx_ports.remove(index);
        }
        // The pin and our descriptor are the link's last references: removing both detaches.
        let pin = link_pin_path(&self.config.pin_root, name);
        std::fs::remove_file(&pin)
            .map_err(|e| Error::io(format!("remove pinned link {}", pin.display()), e))?;
        drop(link);
        self.config.interfaces.retain(|i| i != name);
        Ok(())
    }

    /// Attached interfaces and how.
    pub fn interfaces(&self) -> Vec<(String, AttachedMode)> {
        self.links
            .iter()
            .map(|(name, (_, mode))| (name.clone(), *mode))
            .collect()
    }

    /// Frames and bytes each attached interface received (summed over CPUs), by name. An
    /// interface whose ifindex is `MAX_IFINDEX` or more shares the overflow counter and is
    /// left out.
    pub fn interface_stats(&self) -> Result<Vec<(String, Counter)>> {
        let mut out = Vec::new();
        for name in self.links.keys() {
            // The daemon runs in the interfaces' namespace.
            let Ok(index) = interface_index(name) else {
                continue;
            };
            if index >= bpf_common::defaults::MAX_IFINDEX {
                continue;
            }
            out.push((name.clone(), sum_counter(&self.interface_stats, index)?));
        }
        Ok(out)
    }

    /// Kernel id of the loaded `xdp_lb` program and of each interface's link.
    pub fn program_and_link_ids(&self) -> Result<(u32, BTreeMap<String, u32>)> {
        let program: &Xdp = self
            .bpf
            .program(PROGRAM_LB)
            .ok_or_else(|| Error::InvalidArgument(format!("program {PROGRAM_LB} missing")))?
            .try_into()
            .map_err(program_error("program xdp_lb is not XDP"))?;
        let info = program
            .info()
            .map_err(program_error("read xdp_lb's program info"))?;
        let mut links = BTreeMap::new();
        for name in self.links.keys() {
            let pin = link_pin_path(&self.config.pin_root, name);
            if let Ok(li) = PinnedLink::from_pin(&pin).and_then(|l| FdLink::from(l).info()) {
                links.insert(name.clone(), li.id());
            }
        }
        Ok((info.id(), links))
    }

    /// The kernel's view of the `xdp_lb` program: run count and run time (while BPF stats are
    /// enabled).
    pub fn program_info(&self) -> Result<aya::programs::ProgramInfo> {
        let program: &Xdp = self
            .bpf
            .program(PROGRAM_LB)
            .ok_or_else(|| Error::InvalidArgument(format!("program {PROGRAM_LB} missing")))?
            .try_into()
            .map_err(program_error("program xdp_lb is not XDP"))?;
        program
            .info()
            .map_err(program_error("read xdp_lb's program info"))
    }

    /// Entries in use and capacity of each map the daemon sizes, from what this process
    /// programmed (never a walk of a map: a scrape must stay cheap). `flows` and `nat`: the
    /// flow tables' occupancy, as the conntrack controller's last sweep counted it.
    pub fn map_usage(&self, flows: u64, nat: u64) -> Vec<MapUsage> {
        let c = &self.config;
        let backends_used = self
            .programmed
            .values()
            .flat_map(|p| p.spec.backends.iter().map(|b| b.id))
            .collect::<std::collections::BTreeSet<u32>>()
            .len() as u64;
        let services = self.programmed.len() as u64;
        let maglev_used = self
            .programmed
            .values()
            .filter(|p| !p.table_entries.is_empty())
            .count() as u64
            * u64::from(c.maglev_size);
        vec![
            MapUsage {
                name: map_names::VIPS,
                entries: services,
                capacity: u64::from(c.max_services),
            },
            MapUsage {
                name: map_names::BACKENDS,
                entries: backends_used,
                capacity: u64::from(c.max_backends),
            },
            MapUsage {
                name: map_names::MAGLEV,
                entries: maglev_used,
                capacity: u64::from(c.max_services) * 2 * u64::from(c.maglev_size),
            },
            MapUsage {
                name: map_names::FLOWS,
                entries: flows,
                capacity: u64::from(c.max_flows),
            },
            MapUsage {
                name: map_names::NAT_REV,
                entries: nat,
                capacity: u64::from(c.max_flows),
            },
        ]
    }

    pub fn config(&self) -> &DataplaneConfig {
        &self.config
    }

    /// Duplicates of the descriptors of the flow table (`LB_FLOWS`) and of the full-NAT
    /// reverse table (`LB_NAT_REV`): the typed handle the conntrack controller works on.
    pub fn flow_table_fds(&self) -> Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
        let dup = |name: &str| -> Result<std::os::fd::OwnedFd> {
            let map = self.bpf.map(name).ok_or_else(|| {
                Error::InvalidArgument(format!("map {name} missing from the XDP object"))
            })?;
            let data: &MapData = match map {
                aya::maps::Map::LruHashMap(d) | aya::maps::Map::HashMap(d) => d,
                _ => return Err(Error::InvalidArgument(format!("{name} is not a hash map"))),
            };
            data.fd()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| Error::io(format!("duplicate the descriptor of {name}"), e))
        };
        Ok((dup(map_names::FLOWS)?, dup(map_names::NAT_REV)?))
    }

    /// The whole loaded object (programs and the maps not taken over by the dataplane), for the
    /// benchmark harness, which tail-calls `xdp_lb` through `BENCH_TARGET`.
    pub fn bpf_mut(&mut self) -> &mut Ebpf {
        &mut self.bpf
    }

    /// The loaded `xdp_lb` program, for BPF_PROG_TEST_RUN in fixture tests and benchmarks.
    pub fn program_mut(&mut self) -> Result<&mut Xdp> {
        self.bpf
            .program_mut(PROGRAM_LB)
            .ok_or_else(|| Error::InvalidArgument(format!("program {PROGRAM_LB} missing")))?
            .try_into()
            .map_err(program_error("program xdp_lb is not XDP"))
    }

    /// Programs one service (new or changed) so that the datapath switches from its previous
    /// table to the new one in a single map update. On error the previous table stays live.
    pub fn apply_service(&mut self, service: &ServiceSpec) -> Result<()> {
        let key = vip_key(&service.key)?;
        if service.id >= self.config.max_services {
            return Err(Error::CapacityExhausted(format!(
                "service id {} beyond the configured {} services",
                service.id, self.config.max_services
            )));
        }
        let previous: BTreeMap<BackendKey, BackendSpec> = self
            .programmed
            .get(&service.key)
            .map(|p| {
                p.spec
                    .backends
                    .iter()
                    .map(|b| (b.key(), b.clone()))
                    .collect()
            })
            .unwrap_or_default();

        // Resolve every backend's datapath record first: nothing is written if one fails.
        let prime = true;
        let mut records = Vec::with_capacity(service.backends.len());
        for backend in &service.backends {
            if backend.id >= self.config.max_backends {
                return Err(Error::CapacityExhausted(format!(
                    "backend id {} beyond the configured {} backends",
                    backend.id, self.config.max_backends
                )));
            }
            let addr = ipv4_of(backend.addr, "backend")?;
            let snat = match service.snat_addr {
                Some(snat) => {
                    let snat = ipv4_of(snat, "SNAT address")?;
                    // Still prime the neighbour.
                    let _ = source_towards(addr, prime);
                    snat
                }
                None => source_towards(addr, prime)?,
            };
            records.push((
                backend,
                BackendInfo {
                    addr: addr16(addr),
                    snat_addr: addr16(snat),
                    port_be: backend.port.to_be(),
                    family: FAMILY_IPV4,
                    state: match backend.state {
                        BackendState::Active => BACKEND_ACTIVE,
                        BackendState::Draining => BACKEND_DRAINING,
                    },
                    generation: backend.generation,
                },
            ));
        }

        // The new table, over active backends only.
        let active: Vec<&BackendSpec> = service
            .backends
            .iter()
            .filter(|b| b.state == BackendState::Active)
            .collect();
        let identities: Vec<String> = active.iter().map(|b| b.key().to_string()).collect();
        let table = if active.is_empty() {
            Vec::new()
        } else {
            let members: Vec<MaglevBackend<'_>> = active
                .iter()
                .zip(&identities)
                .map(|(b, identity)| MaglevBackend {
                    key: identity.as_bytes(),
                    weight: b.weight,
                })
                .collect();
            maglev::build_table(&members, self.config.maglev_size)
                .map_err(|e| Error::InvalidArgument(format!("maglev table: {e}")))?
                .into_iter()
                .map(|index| active[index as usize].id)
                .collect::<Vec<u32>>()
        };

        // Step 1: backends that are new, or that become active, before the table can point at
        // them. New slots start with zeroed counters.
        let mut written_new = Vec::new();
        for (backend, info) in &records {
            let old = previous.get(&backend.key());
            let is_new = old.is_none_or(|o| o.id != backend.id);
            let becomes_active = old.is_some_and(|o| o.state != BackendState::Active)
                && backend.state == BackendState::Active;
            // A slot already pinned with this generation is the same backend from before a
            // restart: keep its counters.
            let already_pinned = self.backends.get(&backend.id, 0).is_ok_and(|pinned| {
                pinned.state != BACKEND_UNUSED && pinned.generation == backend.generation
            });
            if is_new && !already_pinned {
                self.reset_counter(CounterKind::Backend, backend.id)?;
            }
            if is_new || becomes_active {
                if let Err(e) = self
                    .backends
                    .set(backend.id, *info, 0)
                    .map_err(map_error(format!("write backend {}", backend.key())))
                {
                    self.free_backends(&written_new);
                    return Err(e);
                }
                if is_new {
                    written_new.push(backend.id);
                }
            }
        }

        // Step 2: the inactive table slot.
        let current = self.vips.get(&key, 0).ok();
        let slot = match current {
            Some(info) if info.service_id == service.id => 1 - (info.table_slot & 1),
            _ => 0,
        };
        if current.is_none_or(|info| info.service_id != service.id) {
            self.reset_counter(CounterKind::Service, service.id)?;
        }
        // One BPF_MAP_UPDATE_BATCH per 8192 entries instead of a syscall per entry: a
        // 65537-entry table goes live in milliseconds, not in a tenth of a second.
        let entries: Vec<(u32, u32)> = table
            .iter()
            .enumerate()
            .map(|(bucket, backend_id)| {
                let index = maglev_index(service.id, slot, self.config.maglev_size, bucket as u32);
                (index, *backend_id)
            })
            .collect();
        let maglev_fd = aya::maps::IterableMap::map(&self.maglev).fd().as_fd();
        if let Err(e) = crate::gc::update_all(maglev_fd, &entries) {
            self.free_backends(&written_new);
            return Err(match e {
                Error::Io { context, source } => Error::io(
                    format!("write the Maglev table of {} ({context})", service.key),
                    source,
                ),
                other => other,
            });
        }

        // Step 3: the flip.
        let info = VipInfo {
            service_id: service.id,
            table_slot: slot,
            active_backends: if table.is_empty() {
                0
            } else {
                active.len() as u32
            },
            mode: match service.mode {
                ForwardingMode::FullNat => MODE_FULL_NAT,
                ForwardingMode::Dsr => MODE_DSR,
            },
            _pad: [0; 3],
        };
        if let Err(e) = self.vips.insert(key, info, 0).map_err(map_error(format!(
            "switch {} to its new table",
            service.key
        ))) {
            self.free_backends(&written_new);
            return Err(e);
        }
        // Counts services per VIP address for the anomaly paths; an error here only affects
        // how fragments to this address are counted.
        let _ = self.vip_addrs.insert(vip_addr_key(service.key.vip)?, 1, 0);

        // Step 4: backends leaving the active set, then removed backends.
        for (backend, info) in &records {
            if let Some(old) = previous.get(&backend.key())
                && old.id == backend.id
                && (old.state != backend.state || old.generation != backend.generation)
                && backend.state != BackendState::Active
            {
                self.backends
                    .set(backend.id, *info, 0)
                    .map_err(map_error(format!("update backend {}", backend.key())))?;
            }
        }
        let kept: BTreeSet<u32> = service.backends.iter().map(|b| b.id).collect();
        let removed: Vec<u32> = previous
            .values()
            .map(|b| b.id)
            .filter(|id| !kept.contains(id))
            .collect();
        self.free_backends(&removed);

        let mut table_entries = BTreeMap::new();
        for backend_id in &table {
            *table_entries.entry(*backend_id).or_insert(0) += 1;
        }
        self.programmed.insert(
            service.key,
            Programmed {
                spec: service.clone(),
                table_entries,
            },
        );
        Ok(())
    }

    /// Removes a service: its VIP stops matching at once; its backend slots are freed.
    pub fn remove_service(&mut self, service: &ServiceSpec) -> Result<()> {
        let key = vip_key(&service.key)?;
        match self.vips.remove(&key) {
            Ok(()) => {}
            Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(map_error(format!("remove {}", service.key))(e)),
        }
        let address_still_used = self
            .programmed
            .keys()
            .any(|k| *k != service.key && k.vip == service.key.vip);
        if !address_still_used {
            let _ = self.vip_addrs.remove(&vip_addr_key(service.key.vip)?);
        }
        let mut ids: Vec<u32> = service.backends.iter().map(|b| b.id).collect();
        if let Some(programmed) = self.programmed.remove(&service.key) {
            ids.extend(programmed.spec.backends.iter().map(|b| b.id));
        }
        self.free_backends(&ids);
        Ok(())
    }

    /// At start: programs every service of `state` and removes whatever the pinned maps hold
    /// that `state` does not.
    pub fn reconcile(&mut self, state: &DesiredState) -> Result<()> {
        for service in state.services.values() {
            self.apply_service(service)?;
        }
        let wanted: HashSet<VipKey> = state.services.keys().map(vip_key).collect::<Result<_>>()?;
        let stale: Vec<VipKey> = self
            .vips
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !wanted.contains(k))
            .collect();
        for key in stale {
            warn!(?key, "removing a VIP the state file does not know");
            let _ = self.vips.remove(&key);
        }
        let wanted_addrs: HashSet<VipAddrKey> = state
            .services
            .keys()
            .map(|k| vip_addr_key(k.vip))
            .collect::<Result<_>>()?;
        let stale_addrs: Vec<VipAddrKey> = self
            .vip_addrs
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !wanted_addrs.contains(k))
            .collect();
        for key in stale_addrs {
            let _ = self.vip_addrs.remove(&key);
        }
        let used: BTreeSet<u32> = state
            .services
            .values()
            .flat_map(|s| s.backends.iter().map(|b| b.id))
            .collect();
        let unused: Vec<u32> = (0..self.config.max_backends)
            .filter(|id| !used.contains(id))
            .filter(|id| {
                self.backends
                    .get(id, 0)
                    .is_ok_and(|info| info.state != BACKEND_UNUSED)
            })
            .collect();
        self.free_backends(&unused);
        Ok(())
    }

    /// Reads every counter, summed over CPUs.
    pub fn stats(&self) -> Result<StatsSnapshot> {
        let mut snapshot = StatsSnapshot::default();
        for programmed in self.programmed.values() {
            let id = programmed.spec.id;
            snapshot
                .services
                .insert(id, sum_counter(&self.vip_stats, id)?);
            for backend in &programmed.spec.backends {
                snapshot
                    .backends
                    .insert(backend.id, sum_counter(&self.backend_stats, backend.id)?);
            }
        }
        for (index, name) in reason::NAMES.iter().enumerate() {
            let values = self
                .reasons
                .get(&(index as u32), 0)
                .map_err(map_error("read LB_REASONS"))?;
            snapshot
                .reasons
                .insert((*name).to_string(), values.iter().sum());
        }
        Ok(snapshot)
    }

    /// Number of entries of service `service_id`'s live Maglev table that point at each backend
    /// id.
    pub fn table_entries(&self, service_id: u32) -> Result<BTreeMap<u32, u32>> {
        Ok(self
            .programmed
            .values()
            .find(|p| p.spec.id == service_id)
            .map(|p| p.table_entries.clone())
            .unwrap_or_default())
    }

    /// How many packets found no neighbour entry for their next hop (`pass_fib_no_neigh`).
    pub fn neighbour_misses(&self) -> Result<u64> {
        let values = self
            .reasons
            .get(&reason::PASS_FIB_NO_NEIGH, 0)
            .map_err(map_error("read LB_REASONS"))?;
        Ok(values.iter().sum())
    }

    /// Makes the kernel resolve every programmed backend's neighbour entry again.
    ///
    /// Why: without a neighbour entry `bpf_fib_lookup` cannot give the next hop's MAC, and the
    /// packet's fallback to the stack does not resolve it either - in full-NAT the rewritten
    /// packet carries one of this node's own addresses as source, which the kernel drops as a
    /// martian before it would send an ARP request, and in DSR the kernel has no route for the
    /// VIP. The daemon calls this when `pass_fib_no_neigh` rises (a flushed or expired entry);
    /// the client's retransmission then finds the neighbour.
    pub fn prime_neighbours(&self) {
        for programmed in self.programmed.values() {
            for backend in &programmed.spec.backends {
                if let IpAddr::V4(addr) = backend.addr
                    && let Err(e) = source_towards(addr, true)
                {
                    warn!(backend = %addr, error = %e, "could not prime the neighbour entry");
                }
            }
        }
    }

    fn free_backends(&mut self, ids: &[u32]) {
        for id in ids {
            if let Err(e) = self.backends.set(*id, BackendInfo::default(), 0) {
                warn!(backend_id = id, error = %e, "could not free a backend slot");
            }
        }
    }

    fn reset_counter(&mut self, kind: CounterKind, id: u32) -> Result<()> {
        let cpus = nr_cpus().map_err(|(_, e)| Error::io("count possible CPUs", e))?;
        let zeros = PerCpuValues::try_from(vec![bpf_common::Counter::default(); cpus])
            .map_err(|e| Error::io("build per-CPU zeros", e))?;
        let map = match kind {
            CounterKind::Service => &mut self.vip_stats,
            CounterKind::Backend => &mut self.backend_stats,
        };
        map.set(id, zeros, 0)
            .map_err(map_error(format!("reset counters of id {id}")))
    }
}

enum CounterKind {
    Service,
    Backend,
}

fn sum_counter(map: &PerCpuArray<MapData, bpf_common::Counter>, id: u32) -> Result<Counter> {
    let values = map
        .get(&id, 0)
        .map_err(map_error(format!("read counters of id {id}")))?;
    Ok(values.iter().fold(Counter::default(), |acc, c| Counter {
        packets: acc.packets + c.packets,
        bytes: acc.bytes + c.bytes,
    }))
}

/// Attaches `program` to `interface` through a pinned bpf_link, or, when a link from a previous
/// run is pinned, swaps the program inside it atomically (`bpf_link_update`) so no packet ever
/// misses the program. See [`crate::bpf::links`].
fn attach_or_replace(
    program: &mut Xdp,
    config: &DataplaneConfig,
    interface: &str,
) -> Result<(PinnedLink, AttachedMode)> {
    let pin_path = link_pin_path(&config.pin_root, interface);
    let what = format!("{PROGRAM_LB} on {interface}");
    let program = std::cell::RefCell::new(program);
    let replace = |fd_link: FdLink| -> Result<AttachedMode> {
        let mut program = program.borrow_mut();
        let xdp_link = XdpLink::try_from(fd_link).map_err(|e| {
            Error::io(
                format!("pinned link {} is not an XDP link", pin_path.display()),
                std::io::Error::other(e.to_string()),
            )
        })?;
        let link_id = program
            .attach_to_link(xdp_link)
            .map_err(program_error(format!("replace the program on {interface}")))?;
        // The pin holds the link; our handle of it can go.
        drop(
            program
                .take_link(link_id)
                .map_err(program_error("take the updated link"))?,
        );
        Ok(AttachedMode::Adopted)
    };
    let attach = || -> Result<(FdLink, AttachedMode)> {
        let mut program = program.borrow_mut();
        let modes: &[XdpMode] = match config.xdp_mode {
            XdpAttachMode::Auto => &[XdpMode::Driver, XdpMode::Skb],
            XdpAttachMode::Native => &[XdpMode::Driver],
            XdpAttachMode::Generic => &[XdpMode::Skb],
        };
        let mut last_error = None;
        for mode in modes {
            match program.attach(interface, *mode) {
                Ok(link_id) => {
                    if *mode == XdpMode::Skb && config.xdp_mode == XdpAttachMode::Auto {
                        warn!(
                            interface,
                            "native XDP unavailable, attached in generic (skb) mode: slower"
                        );
                    }
                    let link = program
                        .take_link(link_id)
                        .map_err(program_error("take the new link"))?;
                    let fd_link = FdLink::try_from(link).map_err(|e| {
                        Error::io(
                            format!(
                                "XDP on {interface} was attached through netlink, which cannot \
                                 be pinned"
                            ),
                            std::io::Error::other(e.to_string()),
                        )
                    })?;
                    info!(interface, ?mode, "attached xdp_lb");
                    let attached = if *mode == XdpMode::Skb {
                        AttachedMode::Generic
                    } else {
                        AttachedMode::Native
                    };
                    return Ok((fd_link, attached));
                }
                Err(e) => last_error = Some(e),
            }
        }
        Err(program_error(format!("attach xdp_lb to {interface}"))(
            last_error.unwrap_or(aya::programs::ProgramError::NotLoaded),
        ))
    };
    let (pinned, mode, _) = crate::bpf::links::adopt_or_attach(&pin_path, &what, replace, attach)?;
    Ok((pinned, mode))
}

pub use crate::bpf::pins::cleanup;
