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
    collections::{BTreeMap, HashMap as StdHashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, lpm_trie::LpmTrie, xdp::DevMapHash},
    programs::{Xdp, links::PinnedLink},
};
use bpf_common::{
    BackendInfo, FAMILY_IPV4, FAMILY_IPV6, VipAddrKey, VipInfo, VipKey, globals, map_names, reason,
};
use datapath_api::{Counter, ServiceKey, ServiceSpec};
use lb_core::maglev::{self};

use crate::error::{Error, Result, map_error, program_error};

/// The compiled XDP object (built by `build.rs` from `bpf-xdp`).
pub static XDP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bpf-xdp"));

/// Name of the load-balancer program in [`XDP_OBJECT`].
pub const PROGRAM_LB: &str = "xdp_lb";
/// Name of its IPv6 half, which `xdp_lb` tail-calls through `LB_PROGS`.
pub const PROGRAM_LB6: &str = "xdp_lb6";

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
    /// New flows per second per CPU above which DSR TCP SYNs make no flow entry (SYN-flood
    /// mode, `lb_core::flood`); 0 turns the mode off.
    pub syn_flood_rate: u64,
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
            syn_flood_rate: defaults::SYN_FLOOD_RATE,
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
        .override_global(globals::FIB_CACHE_NS, &config.fib_cache_ns, true)
        .override_global(globals::SYN_FLOOD_RATE, &config.syn_flood_rate, true);
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
fn abi_layouts() -> [PinLayout; 14] {
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
        (map_names::FIB_GEN, 4, 4, Some(1)),
        (map_names::PROGS, 4, 4, Some(1)),
        (
            map_names::SYN_FLOOD,
            4,
            size_of::<bpf_common::SynFloodWindow>(),
            Some(1),
        ),
        (
            map_names::SOURCE_RANGES,
            4 + size_of::<bpf_common::SourceRangeKey>(),
            1,
            Some(defaults::MAX_SOURCE_RANGES),
        ),
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

/// Loads `xdp_lb6` and puts it in `LB_PROGS`, where `xdp_lb` tail-calls it for IPv6 frames.
/// Replacing the entry is atomic: an IPv6 frame runs either the previous build's program or
/// this one. The map stays with the object (the benchmark harness's loads need it too).
fn install_ipv6_program(bpf: &mut Ebpf) -> Result<()> {
    let program: &mut Xdp = bpf
        .program_mut(PROGRAM_LB6)
        .ok_or_else(|| Error::InvalidArgument(format!("program {PROGRAM_LB6} missing")))?
        .try_into()
        .map_err(program_error("program xdp_lb6 is not XDP"))?;
    crate::bpf::load_retrying(|| program.load())
        .map_err(program_error("load xdp_lb6 (verifier)"))?;
    let fd = program
        .fd()
        .map_err(program_error("xdp_lb6 has no descriptor"))?
        .try_clone()
        .map_err(|e| Error::io("duplicate the descriptor of xdp_lb6", e))?;
    let map = bpf
        .map_mut(map_names::PROGS)
        .ok_or_else(|| Error::InvalidArgument(format!("map {} missing", map_names::PROGS)))?;
    let mut progs = aya::maps::ProgramArray::try_from(map).map_err(map_error("open LB_PROGS"))?;
    progs
        .set(bpf_common::PROG_LB6, &fd, 0)
        .map_err(map_error("put xdp_lb6 in LB_PROGS"))
}

fn take_map(bpf: &mut Ebpf, name: &str) -> Result<aya::maps::Map> {
    bpf.take_map(name)
        .ok_or_else(|| Error::InvalidArgument(format!("map {name} missing from the XDP object")))
}

fn ipv4_of(addr: IpAddr, what: &str) -> Result<Ipv4Addr> {
    match addr {
        IpAddr::V4(v4) => Ok(v4),
        IpAddr::V6(_) => Err(Error::InvalidArgument(format!(
            "{what} {addr} is IPv6; only IPv4 {what}s are supported"
        ))),
    }
}

use bpf_common::addr16_from_ip as addr16;

/// The maps' family of an address.
pub(crate) fn family_of(addr: IpAddr) -> u8 {
    if addr.is_ipv4() {
        FAMILY_IPV4
    } else {
        FAMILY_IPV6
    }
}

fn vip_key(key: &ServiceKey) -> Result<VipKey> {
    Ok(VipKey {
        addr: addr16(key.vip),
        port_be: key.port.to_be(),
        proto: key.proto.number(),
        family: family_of(key.vip),
    })
}

fn vip_addr_key(addr: IpAddr) -> Result<VipAddrKey> {
    Ok(VipAddrKey {
        addr: addr16(addr),
        family: family_of(addr),
        _pad: [0; 3],
    })
}

/// Asks the kernel which source address it would use towards a destination, on one UDP socket
/// kept for the purpose: `connect` (which sends nothing) answers through `getsockname`. The
/// socket is disconnected (`connect` to `AF_UNSPEC`) before each question, because a connected
/// UDP socket keeps the source of its first route. One socket instead of one per question
/// halves the syscalls of programming 100,000 backends.
#[derive(Default)]
pub(crate) struct SourceProbe {
    v4: Option<UdpSocket>,
    v6: Option<UdpSocket>,
}

impl SourceProbe {
    /// The source address towards `backend`. With `prime_neighbour` the socket then sends one
    /// empty datagram to the discard port so the kernel resolves the backend's neighbour entry:
    /// without it `bpf_fib_lookup` reports no neighbour and, in DSR mode, the program cannot
    /// build the frame.
    pub(crate) fn source_towards(
        &mut self,
        backend: IpAddr,
        prime_neighbour: bool,
    ) -> Result<IpAddr> {
        let (slot, any): (&mut Option<UdpSocket>, IpAddr) = match backend {
            IpAddr::V4(_) => (&mut self.v4, Ipv4Addr::UNSPECIFIED.into()),
            IpAddr::V6(_) => (&mut self.v6, Ipv6Addr::UNSPECIFIED.into()),
        };
        let socket = match slot.take() {
            Some(socket) => {
                disconnect(&socket)?;
                socket
            }
            None => UdpSocket::bind((any, 0))
                .map_err(|e| Error::io("open a UDP socket for route lookup", e))?,
        };
        let socket = slot.insert(socket);
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
        Ok(local.ip())
    }
}

/// Dissolves a UDP socket's association (and its source address), so that the next `connect`
/// routes afresh.
fn disconnect(socket: &UdpSocket) -> Result<()> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: a zeroed sockaddr with family AF_UNSPEC, passed with its own length.
    let rc = unsafe {
        let mut unspec: libc::sockaddr = std::mem::zeroed();
        unspec.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
        libc::connect(
            socket.as_raw_fd(),
            &unspec,
            std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(Error::io(
            "disconnect the route-lookup socket",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
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
    /// `LB_MAGLEV` written through mappings, when it was created mappable (not by an older
    /// build).
    maglev_mapped: Option<crate::bpf::maps::MappableU32Array>,
    source_ranges: LpmTrie<MapData, bpf_common::SourceRangeKey, u8>,
    vip_stats: PerCpuArray<MapData, bpf_common::Counter>,
    backend_stats: PerCpuArray<MapData, bpf_common::Counter>,
    interface_stats: PerCpuArray<MapData, bpf_common::Counter>,
    reasons: PerCpuArray<MapData, u64>,
    syn_flood: PerCpuArray<MapData, bpf_common::SynFloodWindow>,
    tx_ports: DevMapHash<MapData>,
    fib_generation: Array<MapData, u32>,
    /// Attached interfaces: the pinned link and how it was attached.
    links: BTreeMap<String, (PinnedLink, AttachedMode)>,
    programmed: StdHashMap<ServiceKey, Programmed>,
    probe: SourceProbe,
    /// Set by [`Dataplane::reconcile`], which frees every slot no service holds: from then on a
    /// backend slot that no programmed service holds is known to be free, and is not read back
    /// before it is written.
    reconciled: bool,
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
        // No interface yet is fine: the lb controller attaches to interfaces as they appear.
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
        crate::bpf::load_retrying(|| program.load())
            .map_err(program_error("load xdp_lb (verifier)"))?;
        // IPv6 before the attach: the new `xdp_lb` tail-calls whatever `LB_PROGS` holds.
        install_ipv6_program(&mut bpf)?;
        let program: &mut Xdp = bpf
            .program_mut(PROGRAM_LB)
            .ok_or_else(|| Error::InvalidArgument(format!("program {PROGRAM_LB} missing")))?
            .try_into()
            .map_err(program_error("program xdp_lb is not XDP"))?;

        std::fs::create_dir_all(config.pin_root.join("links"))
            .map_err(|e| Error::io("create the links pin directory", e))?;
        let mut links = BTreeMap::new();
        for (name, _) in &if_indexes {
            links.insert(
                name.clone(),
                attach::attach_or_replace(program, config, name)?,
            );
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
        let maglev: Array<MapData, u32> = Array::try_from(take_map(&mut bpf, map_names::MAGLEV)?)
            .map_err(map_error("open LB_MAGLEV"))?;
        let maglev_mapped = crate::bpf::maps::MappableU32Array::open(
            aya::maps::IterableMap::map(&maglev).fd().as_fd(),
        )?;
        if maglev_mapped.is_none() {
            tracing::info!(
                "LB_MAGLEV was pinned by an older build and is not mappable: Maglev tables are \
                 written with syscalls until `datapathd cleanup` recreates it"
            );
        }
        let source_ranges = LpmTrie::try_from(take_map(&mut bpf, map_names::SOURCE_RANGES)?)
            .map_err(map_error("open LB_SRC_RANGES"))?;
        let vip_stats = PerCpuArray::try_from(take_map(&mut bpf, map_names::VIP_STATS)?)
            .map_err(map_error("open LB_VIP_STATS"))?;
        let backend_stats = PerCpuArray::try_from(take_map(&mut bpf, map_names::BACKEND_STATS)?)
            .map_err(map_error("open LB_BE_STATS"))?;
        let reasons = PerCpuArray::try_from(take_map(&mut bpf, map_names::REASONS)?)
            .map_err(map_error("open LB_REASONS"))?;
        let syn_flood = PerCpuArray::try_from(take_map(&mut bpf, map_names::SYN_FLOOD)?)
            .map_err(map_error("open LB_SYN_FLOOD"))?;
        let interface_stats =
            PerCpuArray::try_from(take_map(&mut bpf, map_names::INTERFACE_STATS)?)
                .map_err(map_error("open LB_IF_STATS"))?;
        let fib_generation = Array::try_from(take_map(&mut bpf, map_names::FIB_GEN)?)
            .map_err(map_error("open LB_FIB_GEN"))?;

        Ok(Self {
            config: config.clone(),
            bpf,
            vips,
            vip_addrs,
            backends,
            maglev,
            maglev_mapped,
            source_ranges,
            vip_stats,
            backend_stats,
            interface_stats,
            reasons,
            syn_flood,
            tx_ports,
            fib_generation,
            links,
            programmed: StdHashMap::new(),
            probe: SourceProbe::default(),
            reconciled: false,
        })
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

    /// Descriptors of the service maps (`LB_VIPS`, `LB_BACKENDS`, `LB_MAGLEV`), for the socket
    /// load balancer's programs, which use the very same maps.
    pub fn service_map_fds(&self) -> Result<[std::os::fd::OwnedFd; 3]> {
        use aya::maps::IterableMap as _;
        let dup = |name: &str, data: &MapData| {
            data.fd()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| Error::io(format!("duplicate the descriptor of {name}"), e))
        };
        Ok([
            dup(map_names::VIPS, self.vips.map())?,
            dup(map_names::BACKENDS, self.backends.map())?,
            dup(map_names::MAGLEV, self.maglev.map())?,
        ])
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
}

enum CounterKind {
    Service,
    Backend,
}

fn sum_counter(map: &PerCpuArray<MapData, bpf_common::Counter>, id: u32) -> Result<Counter> {
    let values = map
        .get(&id, 0)
        .map_err(map_error(format!("read counters of id {id}")))?;
    Ok(sum_over_cpus(&values))
}

/// One id's per-CPU counters, summed.
fn sum_over_cpus(per_cpu: &[bpf_common::Counter]) -> Counter {
    per_cpu.iter().fold(Counter::default(), |acc, c| Counter {
        packets: acc.packets + c.packets,
        bytes: acc.bytes + c.bytes,
    })
}

pub use crate::bpf::pins::cleanup;

mod attach;
mod services;
pub use services::set_neighbour_priming;
