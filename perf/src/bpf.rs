//! The embedded `bpf-perf` object (generator, counting sink, counting drop, pass) and the
//! user-space mirrors of its map values.

use std::net::Ipv4Addr;

use anyhow::{Context, Result, bail, ensure};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, PerCpuArray, PerCpuValues},
    programs::{Xdp, XdpMode, xdp::XdpLinkId},
};
use bpf_common::Counter;

/// The `bpf-perf` object, compiled for `bpfel-unknown-none` by `perf/build.rs`.
pub static PERF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bpf-perf"));

/// Program names in the object.
pub mod programs {
    /// The live-frames generator.
    pub const PKTGEN: &str = "xdp_pktgen";
    /// Counts IPv4 frames (total and by destination) and drops them; passes the rest.
    pub const COUNT_SINK: &str = "xdp_count_sink";
    /// Counts and drops everything.
    pub const DROP_COUNT: &str = "xdp_drop_count";
    /// Passes everything.
    pub const PASS: &str = "xdp_pass";
    /// Rewrites the MACs and redirects everything to one interface: the forwarding floor.
    pub const REDIRECT_FLOOR: &str = "xdp_redirect_floor";
    /// An empty TCX program (`TCX_NEXT`).
    pub const TC_NEXT: &str = "tc_next";
}

/// Map names in the object.
pub mod maps {
    pub const PKTGEN_CONFIG: &str = "PKTGEN_CONFIG";
    pub const PKTGEN_STATS: &str = "PKTGEN_STATS";
    pub const SINK_STATS: &str = "SINK_STATS";
    pub const SINK_BY_DST: &str = "SINK_BY_DST";
    pub const DROP_STATS: &str = "DROP_STATS";
    pub const REDIRECT_MACS: &str = "REDIRECT_MACS";
    pub const REDIRECT_PORT: &str = "REDIRECT_PORT";
}

/// Bytes of the header template the generator writes into every frame.
pub const HEADER_LEN: usize = 56;

/// Mirror of `bpf-perf`'s `GenConfig` (value of `PKTGEN_CONFIG[0]`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GenConfig {
    pub header: [u8; HEADER_LEN],
    pub flows: u32,
    pub ports: u32,
    pub src_ip: u32,
    pub src_port: u32,
    pub l4_csum_off: u32,
    pub frame_len: u32,
}
const _: () = assert!(std::mem::size_of::<GenConfig>() == HEADER_LEN + 24);

// SAFETY: `#[repr(C)]`, only integers and byte arrays, no padding (size asserted above).
unsafe impl aya::Pod for GenConfig {}

/// Packets and bytes summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Totals {
    pub packets: u64,
    pub bytes: u64,
}

impl Totals {
    fn of(values: &PerCpuValues<Counter>) -> Self {
        values.iter().fold(Totals::default(), |acc, c| Totals {
            packets: acc.packets + c.packets,
            bytes: acc.bytes + c.bytes,
        })
    }

    /// `self - earlier`, saturating.
    pub fn since(self, earlier: Totals) -> Totals {
        Totals {
            packets: self.packets.saturating_sub(earlier.packets),
            bytes: self.bytes.saturating_sub(earlier.bytes),
        }
    }
}

/// The loaded `bpf-perf` object. Its maps and programs are private to it (nothing is pinned);
/// dropping it detaches every program it attached.
pub struct PerfObject {
    ebpf: Ebpf,
}

impl PerfObject {
    /// Loads the object and all its programs into the kernel (maps are not pinned).
    pub fn load() -> Result<Self> {
        ensure!(
            !PERF_OBJECT.is_empty(),
            "dp-perf was built without its BPF programs (AYA_BUILD_SKIP or no bpf-linker); \
             rebuild it with bpf-linker on PATH"
        );
        let mut ebpf = EbpfLoader::new()
            .load(PERF_OBJECT)
            .context("load the bpf-perf object")?;
        for name in [
            programs::PKTGEN,
            programs::COUNT_SINK,
            programs::DROP_COUNT,
            programs::PASS,
            programs::REDIRECT_FLOOR,
        ] {
            let program: &mut Xdp = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from bpf-perf"))?
                .try_into()
                .with_context(|| format!("program {name} is not XDP"))?;
            program
                .load()
                .with_context(|| format!("load (verify) program {name}"))?;
        }
        let tc: &mut aya::programs::SchedClassifier = ebpf
            .program_mut(programs::TC_NEXT)
            .context("program tc_next missing from bpf-perf")?
            .try_into()
            .context("tc_next is not a classifier")?;
        tc.load().context("load (verify) tc_next")?;
        Ok(Self { ebpf })
    }

    /// The TCX program `name`.
    pub fn classifier(&self, name: &str) -> Result<&aya::programs::SchedClassifier> {
        self.ebpf
            .program(name)
            .with_context(|| format!("program {name} missing from bpf-perf"))?
            .try_into()
            .with_context(|| format!("program {name} is not a classifier"))
    }

    /// The XDP program `name`.
    pub fn program(&self, name: &str) -> Result<&Xdp> {
        self.ebpf
            .program(name)
            .with_context(|| format!("program {name} missing from bpf-perf"))?
            .try_into()
            .with_context(|| format!("program {name} is not XDP"))
    }

    /// Attaches program `name` to `iface` in namespace `ns` (driver mode: veths support it).
    /// It stays attached until [`PerfObject::detach`], the object is dropped, or the
    /// interface goes away.
    pub fn attach(&mut self, name: &str, ns: &str, iface: &str) -> Result<XdpLinkId> {
        let program: &mut Xdp = self
            .ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from bpf-perf"))?
            .try_into()
            .with_context(|| format!("program {name} is not XDP"))?;
        netns_tests::netns::run_in(ns, || program.attach(iface, XdpMode::Driver))?
            .with_context(|| format!("attach {name} to {iface} in namespace {ns}"))
    }

    /// Detaches what [`PerfObject::attach`] attached.
    pub fn detach(&mut self, name: &str, link: XdpLinkId) -> Result<()> {
        let program: &mut Xdp = self
            .ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from bpf-perf"))?
            .try_into()
            .with_context(|| format!("program {name} is not XDP"))?;
        program
            .detach(link)
            .with_context(|| format!("detach {name}"))
    }

    /// Points `xdp_redirect_floor` at interface `ifindex` of namespace `ns` with Ethernet
    /// addresses `dst` (next hop) and `src` (the egress interface).
    pub fn set_redirect(
        &mut self,
        ns: &str,
        ifindex: u32,
        dst: [u8; 6],
        src: [u8; 6],
    ) -> Result<()> {
        let mut macs = [0u8; 12];
        macs[..6].copy_from_slice(&dst);
        macs[6..].copy_from_slice(&src);
        let mut array: Array<&mut MapData, [u8; 12]> = Array::try_from(
            self.ebpf
                .map_mut(maps::REDIRECT_MACS)
                .context("map REDIRECT_MACS missing")?,
        )?;
        array.set(0, macs, 0).context("write REDIRECT_MACS")?;
        let mut port: aya::maps::DevMap<&mut MapData> = aya::maps::DevMap::try_from(
            self.ebpf
                .map_mut(maps::REDIRECT_PORT)
                .context("map REDIRECT_PORT missing")?,
        )?;
        // The kernel resolves a devmap's ifindex in the writer's network namespace.
        netns_tests::netns::run_in(ns, || port.set(0, ifindex, None, 0))?
            .context("write REDIRECT_PORT")?;
        Ok(())
    }

    /// Writes the generator's configuration.
    pub fn set_gen_config(&mut self, config: &GenConfig) -> Result<()> {
        let mut array: Array<&mut MapData, GenConfig> = Array::try_from(
            self.ebpf
                .map_mut(maps::PKTGEN_CONFIG)
                .context("map PKTGEN_CONFIG missing")?,
        )?;
        array.set(0, *config, 0).context("write PKTGEN_CONFIG")?;
        Ok(())
    }

    fn per_cpu(&self, map: &str, index: u32) -> Result<Totals> {
        let array: PerCpuArray<&MapData, Counter> = PerCpuArray::try_from(
            self.ebpf
                .map(map)
                .with_context(|| format!("map {map} missing"))?,
        )?;
        let values = array
            .get(&index, 0)
            .with_context(|| format!("read {map}[{index}]"))?;
        Ok(Totals::of(&values))
    }

    /// Frames the generator produced (all CPUs).
    pub fn generated(&self) -> Result<Totals> {
        self.per_cpu(maps::PKTGEN_STATS, 0)
    }

    /// Runs in which the generator found no configuration (must stay 0).
    pub fn generator_errors(&self) -> Result<u64> {
        Ok(self.per_cpu(maps::PKTGEN_STATS, 1)?.packets)
    }

    /// IPv4 frames the counting sink dropped.
    pub fn sink_ipv4(&self) -> Result<Totals> {
        self.per_cpu(maps::SINK_STATS, 0)
    }

    /// Non-IPv4 frames the counting sink passed.
    pub fn sink_other(&self) -> Result<Totals> {
        self.per_cpu(maps::SINK_STATS, 1)
    }

    /// IPv4 frames the sink saw for each destination address ending in one of `last_bytes`.
    pub fn sink_by_dst(&self, addrs: &[Ipv4Addr]) -> Result<Vec<Totals>> {
        addrs
            .iter()
            .map(|a| self.per_cpu(maps::SINK_BY_DST, u32::from(a.octets()[3])))
            .collect()
    }

    /// Frames `xdp_drop_count` dropped.
    pub fn dropped(&self) -> Result<Totals> {
        self.per_cpu(maps::DROP_STATS, 0)
    }
}

/// Number of possible CPUs (the length of per-CPU values), for pinning threads.
pub fn online_cpus() -> Result<Vec<u32>> {
    match aya::util::online_cpus() {
        Ok(cpus) if !cpus.is_empty() => Ok(cpus),
        Ok(_) => bail!("no online CPU"),
        Err((path, e)) => Err(e).with_context(|| format!("read {path}")),
    }
}
