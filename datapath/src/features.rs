//! Kernel feature and capability probing at start, and what each module needs.
//!
//! Every probe asks the kernel directly (a `bpf()` feature probe, a file the kernel exposes,
//! `statfs`), never a version table. A feature listed in the configuration's
//! `features.force_off` is reported as unavailable, as if the kernel lacked it: that is how an
//! operator switches a hook off on a node, and how the tests simulate an older kernel.
use std::{collections::BTreeMap, fmt, path::Path};

use aya::{maps::MapType, programs::ProgramType};
use datapath_api::FeatureStatus;
use serde::Deserialize;

/// A kernel feature a module may depend on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Feature {
    /// Kernel BTF at `/sys/kernel/btf/vmlinux`.
    Btf,
    /// XDP programs can be loaded.
    Xdp,
    /// TCX (tc attachment through bpf links) rather than legacy tc.
    Tcx,
    /// BPF LSM is an active LSM.
    Lsm,
    /// BPF ring buffer maps.
    Ringbuf,
    /// cgroup v2 mounted.
    Cgroupv2,
    /// The `kernel.bpf_stats_enabled` knob (BPF_ENABLE_STATS).
    BpfStats,
}

impl Feature {
    pub const ALL: [Feature; 7] = [
        Feature::Btf,
        Feature::Xdp,
        Feature::Tcx,
        Feature::Lsm,
        Feature::Ringbuf,
        Feature::Cgroupv2,
        Feature::BpfStats,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Feature::Btf => "btf",
            Feature::Xdp => "xdp",
            Feature::Tcx => "tcx",
            Feature::Lsm => "lsm",
            Feature::Ringbuf => "ringbuf",
            Feature::Cgroupv2 => "cgroupv2",
            Feature::BpfStats => "bpf_stats",
        }
    }
}

impl fmt::Display for Feature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A Linux capability the daemon uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Capability {
    NetAdmin,
    SysAdmin,
    Perfmon,
    Bpf,
}

impl Capability {
    pub const ALL: [Capability; 4] = [
        Capability::Bpf,
        Capability::NetAdmin,
        Capability::Perfmon,
        Capability::SysAdmin,
    ];

    fn bit(self) -> u32 {
        match self {
            Capability::NetAdmin => 12,
            Capability::SysAdmin => 21,
            Capability::Perfmon => 38,
            Capability::Bpf => 39,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Capability::NetAdmin => "CAP_NET_ADMIN",
            Capability::SysAdmin => "CAP_SYS_ADMIN",
            Capability::Perfmon => "CAP_PERFMON",
            Capability::Bpf => "CAP_BPF",
        }
    }
}

/// The capabilities of this process's effective set that the daemon uses, from
/// `/proc/self/status` (`CapEff`).
pub fn effective_capabilities() -> Vec<Capability> {
    let eff = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0);
    Capability::ALL
        .into_iter()
        .filter(|c| eff & (1u64 << c.bit()) != 0)
        .collect()
}

/// The daemon's modules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Module {
    /// The XDP L4 load balancer.
    Lb,
    /// Run count and run time of the BPF programs (kernel BPF statistics).
    ProgStats,
}

impl Module {
    pub const ALL: [Module; 2] = [Module::Lb, Module::ProgStats];

    pub fn name(self) -> &'static str {
        match self {
            Module::Lb => "lb",
            Module::ProgStats => "prog_stats",
        }
    }

    /// Kernel features the module cannot work without.
    pub fn features(self) -> &'static [Feature] {
        match self {
            Module::Lb => &[Feature::Xdp],
            Module::ProgStats => &[Feature::BpfStats],
        }
    }

    /// Capabilities the module cannot work without (see `deploy/README.md`).
    pub fn capabilities(self) -> &'static [Capability] {
        match self {
            // Loading programs and maps (CAP_BPF), attaching XDP and reading interfaces
            // (CAP_NET_ADMIN), the verifier's pointer arithmetic on packet data (CAP_PERFMON).
            Module::Lb => &[Capability::Bpf, Capability::NetAdmin, Capability::Perfmon],
            // BPF_ENABLE_STATS is restricted to CAP_SYS_ADMIN.
            Module::ProgStats => &[Capability::SysAdmin],
        }
    }
}

impl fmt::Display for Module {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The result of one probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    pub available: bool,
    pub detail: String,
}

/// Every feature's probe result.
#[derive(Clone, Debug, Default)]
pub struct Features {
    pub probes: BTreeMap<Feature, Probe>,
    pub capabilities: Vec<Capability>,
}

fn yes(detail: impl Into<String>) -> Probe {
    Probe {
        available: true,
        detail: detail.into(),
    }
}

fn no(detail: impl Into<String>) -> Probe {
    Probe {
        available: false,
        detail: detail.into(),
    }
}

fn statfs_magic(path: &str) -> Option<i64> {
    crate::bpf::pins::fs_magic(Path::new(path))
}

/// `LSM_ID_BPF` of `include/uapi/linux/lsm.h`.
const LSM_ID_BPF: u64 = 110;

/// The ids of the active LSMs from `lsm_list_modules(2)` (Linux 6.8+), or `None` where the
/// syscall does not exist.
fn lsm_list_modules() -> Option<Vec<u64>> {
    // One number on every architecture (the unified syscall table, like all numbers >= 424).
    const SYS_LSM_LIST_MODULES: libc::c_long = 461;
    let mut ids = [0u64; 32];
    let mut size = std::mem::size_of_val(&ids) as u32;
    // SAFETY: the kernel writes at most `size` bytes into `ids` and updates `size`.
    let rc = unsafe {
        libc::syscall(
            SYS_LSM_LIST_MODULES,
            ids.as_mut_ptr(),
            &mut size as *mut u32,
            0u32,
        )
    };
    (rc >= 0).then(|| ids[..(rc as usize).min(ids.len())].to_vec())
}

fn probe(feature: Feature) -> Probe {
    match feature {
        Feature::Btf => {
            if Path::new("/sys/kernel/btf/vmlinux").exists() {
                yes("/sys/kernel/btf/vmlinux")
            } else {
                no("no /sys/kernel/btf/vmlinux (kernel built without CONFIG_DEBUG_INFO_BTF)")
            }
        }
        Feature::Xdp => match aya::sys::is_program_supported(ProgramType::Xdp) {
            Ok(true) => yes("XDP programs load"),
            Ok(false) => no("the kernel refuses XDP programs"),
            Err(e) => no(format!("probe failed: {e}")),
        },
        Feature::Tcx => {
            // TCX links arrived in 6.6 together with BPF_LINK_TYPE_TCX; a kernel that knows
            // the sched_cls program type but not TCX links falls back to legacy tc.
            let sched_cls = aya::sys::is_program_supported(ProgramType::SchedClassifier);
            let tcx = aya::util::KernelVersion::current()
                .map(|v| v >= aya::util::KernelVersion::new(6, 6, 0))
                .unwrap_or(false);
            match (sched_cls, tcx) {
                (Ok(true), true) => yes("TCX links"),
                (Ok(true), false) => no("legacy tc only (kernel before 6.6)"),
                (Ok(false), _) => no("the kernel refuses sched_cls programs"),
                (Err(e), _) => no(format!("probe failed: {e}")),
            }
        }
        Feature::Lsm => match std::fs::read_to_string("/sys/kernel/security/lsm") {
            Ok(list) if list.trim().split(',').any(|l| l == "bpf") => {
                yes(format!("active LSMs: {}", list.trim()))
            }
            Ok(list) => no(format!("bpf is not an active LSM ({})", list.trim())),
            Err(_) if lsm_list_modules().is_some() => {
                // securityfs is not mounted: ask the kernel's LSM syscall (6.8+).
                let ids = lsm_list_modules().unwrap_or_default();
                if ids.contains(&LSM_ID_BPF) {
                    yes("bpf is an active LSM (lsm_list_modules)")
                } else {
                    no(format!("bpf is not an active LSM (LSM ids {ids:?})"))
                }
            }
            Err(_) => {
                // securityfs is not mounted: ask the verifier instead.
                match aya::sys::is_program_supported(ProgramType::Lsm(
                    aya::programs::LsmAttachType::Mac,
                )) {
                    Ok(true) => yes("BPF_PROG_TYPE_LSM loads (securityfs not mounted)"),
                    Ok(false) => no("BPF_PROG_TYPE_LSM refused"),
                    Err(e) => no(format!("probe failed: {e}")),
                }
            }
        },
        Feature::Ringbuf => match aya::sys::is_map_supported(MapType::RingBuf) {
            Ok(true) => yes("BPF_MAP_TYPE_RINGBUF"),
            Ok(false) => no("BPF_MAP_TYPE_RINGBUF refused"),
            Err(e) => no(format!("probe failed: {e}")),
        },
        Feature::Cgroupv2 => {
            const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
            match ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
                .into_iter()
                .find(|p| statfs_magic(p) == Some(CGROUP2_SUPER_MAGIC))
            {
                Some(p) => yes(format!("mounted at {p}")),
                None => no("no cgroup2 mount at /sys/fs/cgroup or /sys/fs/cgroup/unified"),
            }
        }
        Feature::BpfStats => {
            if Path::new("/proc/sys/kernel/bpf_stats_enabled").exists() {
                yes("kernel.bpf_stats_enabled")
            } else {
                no("no kernel.bpf_stats_enabled (kernel before 5.8)")
            }
        }
    }
}

impl Features {
    /// Probes every feature; those in `force_off` are reported unavailable.
    pub fn probe(force_off: &[Feature]) -> Self {
        let probes = Feature::ALL
            .into_iter()
            .map(|f| {
                let p = if force_off.contains(&f) {
                    no("forced off by the configuration (features.force_off)")
                } else {
                    probe(f)
                };
                (f, p)
            })
            .collect();
        Self {
            probes,
            capabilities: effective_capabilities(),
        }
    }

    /// The same probes with `force_off` applied anew (on a reload).
    pub fn with_force_off(&self, force_off: &[Feature]) -> Self {
        let mut out = Features::probe(&[]);
        out.capabilities = self.capabilities.clone();
        for f in force_off {
            out.probes.insert(
                *f,
                no("forced off by the configuration (features.force_off)"),
            );
        }
        out
    }

    pub fn available(&self, f: Feature) -> bool {
        self.probes.get(&f).is_some_and(|p| p.available)
    }

    /// Whether the process holds `cap`, or a capability the kernel accepts instead: before
    /// CAP_BPF and CAP_PERFMON existed CAP_SYS_ADMIN granted both, and it still does
    /// (`bpf_capable()`, `perfmon_capable()`).
    pub fn has(&self, cap: Capability) -> bool {
        self.capabilities.contains(&cap)
            || (matches!(cap, Capability::Bpf | Capability::Perfmon)
                && self.capabilities.contains(&Capability::SysAdmin))
    }

    /// Why `module` cannot run here, or `None` if it can.
    pub fn blocker(&self, module: Module) -> Option<String> {
        self.blocker_for(&crate::controller::Requirements {
            features: module.features(),
            capabilities: module.capabilities(),
        })
    }

    /// Why a controller with `needs` cannot run here, or `None` if it can.
    pub fn blocker_for(&self, needs: &crate::controller::Requirements) -> Option<String> {
        let missing_caps: Vec<&str> = needs
            .capabilities
            .iter()
            .filter(|c| !self.has(**c))
            .map(|c| c.name())
            .collect();
        if !missing_caps.is_empty() {
            return Some(format!("missing capability {}", missing_caps.join(", ")));
        }
        needs
            .features
            .iter()
            .find(|f| !self.available(**f))
            .map(|f| {
                let detail = self
                    .probes
                    .get(f)
                    .map(|p| p.detail.as_str())
                    .unwrap_or("not probed");
                format!("feature {f} unavailable: {detail}")
            })
    }

    /// One line: `btf=yes xdp=yes tcx=yes lsm=no ...`.
    pub fn summary(&self) -> String {
        self.probes
            .iter()
            .map(|(f, p)| format!("{f}={}", if p.available { "yes" } else { "no" }))
            .collect::<Vec<_>>()
            .join(" ")
    }

    pub fn views(&self) -> Vec<FeatureStatus> {
        self.probes
            .iter()
            .map(|(f, p)| FeatureStatus {
                name: f.name().to_string(),
                available: p.available,
                detail: p.detail.clone(),
            })
            .collect()
    }

    /// Capabilities of [`Capability::ALL`] this process lacks (counting CAP_SYS_ADMIN as
    /// CAP_BPF and CAP_PERFMON, as the kernel does).
    pub fn missing_capabilities(&self) -> Vec<Capability> {
        Capability::ALL
            .into_iter()
            .filter(|c| !self.has(*c))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forced_off_feature_blocks_only_its_module() {
        let mut f = Features {
            probes: Feature::ALL.into_iter().map(|f| (f, yes("test"))).collect(),
            capabilities: Capability::ALL.to_vec(),
        };
        assert_eq!(f.blocker(Module::Lb), None);
        f.probes.insert(Feature::BpfStats, no("forced off"));
        assert_eq!(f.blocker(Module::Lb), None);
        let why = f.blocker(Module::ProgStats).unwrap();
        assert!(
            why.contains("bpf_stats") && why.contains("forced off"),
            "{why}"
        );
        f.capabilities.retain(|c| *c != Capability::Bpf);
        assert_eq!(
            f.blocker(Module::Lb),
            None,
            "CAP_SYS_ADMIN stands in for CAP_BPF"
        );
        f.capabilities.retain(|c| *c != Capability::SysAdmin);
        assert_eq!(f.blocker(Module::Lb).unwrap(), "missing capability CAP_BPF");
        assert_eq!(
            f.missing_capabilities(),
            [Capability::Bpf, Capability::SysAdmin]
        );
    }
}
