//! The capture programs of `bpf-dns`: loaded once, attached to the configured interfaces
//! (TCX ingress and egress, `lo` on ingress only), their ring buffer and counters.
//!
//! The links are not pinned: a passive capture has nothing to keep across a restart, and an
//! exiting daemon leaves no program behind on the node's interfaces.
use std::collections::BTreeMap;

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, RingBuf},
    programs::{SchedClassifier, TcAttachType, tc::SchedClassifierLinkId},
};
use bpf_common::dns::{globals, map_names, reason};

use crate::{Error, Result, config::DnsSettings, error::program_error, text::glob_match};

/// The compiled capture object (built by `build.rs` from `bpf-dns`).
pub static DNS_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bpf-dns"));

pub const PROGRAM_INGRESS: &str = "dns_ingress";
pub const PROGRAM_EGRESS: &str = "dns_egress";
/// The loopback interface: captured on ingress only, which every loopback packet crosses once
/// (its egress would show each answer a second time).
pub const LOOPBACK: &str = "lo";

/// One attached interface.
struct Attached {
    ifindex: u32,
    links: Vec<(&'static str, SchedClassifierLinkId)>,
}

pub struct DnsPlane {
    bpf: Ebpf,
    reasons: crate::bpf::maps::ReasonCounters,
    attached: BTreeMap<String, Attached>,
}

/// The capture's ring buffer: `DnsCaptureMeta`, then the packet's first bytes, per record.
pub type Ring = RingBuf<MapData>;

impl DnsPlane {
    /// Loads and verifies the programs; answers the plane and its ring buffer.
    pub fn start(settings: &DnsSettings) -> Result<(Self, Ring)> {
        if DNS_OBJECT.is_empty() {
            return Err(Error::InvalidArgument(
                "this datapathd was built without its BPF programs (AYA_BUILD_SKIP)".into(),
            ));
        }
        let mut loader = EbpfLoader::new();
        loader
            .override_global(globals::CAPTURE_RATE, &settings.capture_rate, true)
            .override_global(globals::SNAP_LEN, &settings.snap_bytes, true);
        let mut bpf = loader.load(DNS_OBJECT).map_err(|source| Error::Load {
            source: Box::new(source),
            context: "load the DNS capture object".into(),
        })?;
        for name in [PROGRAM_INGRESS, PROGRAM_EGRESS] {
            let program = classifier(&mut bpf, name)?;
            crate::bpf::load_retrying(|| program.load())
                .map_err(program_error(format!("load {name}")))?;
        }
        let reasons = crate::bpf::maps::take_reasons(&mut bpf, map_names::REASONS)?;
        let ring = crate::bpf::ringbuf::take(&mut bpf, map_names::EVENTS)?;
        Ok((
            Self {
                bpf,
                reasons,
                attached: BTreeMap::new(),
            },
            ring,
        ))
    }

    /// Attaches to every interface of this namespace matching `settings` (and `lo`), detaches
    /// from those that no longer match or are gone. Answers the interfaces it could not
    /// attach to, with why (the others keep being captured).
    pub fn sync_interfaces(&mut self, settings: &DnsSettings) -> Vec<(String, Error)> {
        let present: BTreeMap<String, u32> = crate::config::interface_names()
            .into_iter()
            .filter_map(|n| {
                let index = crate::dataplane::interface_index(&n).ok()?;
                Some((n, index))
            })
            .collect();
        let wanted: BTreeMap<&String, u32> = present
            .iter()
            .filter(|(n, _)| {
                (settings.loopback && n.as_str() == LOOPBACK)
                    || settings.interfaces.iter().any(|p| glob_match(p, n))
            })
            .map(|(n, i)| (n, *i))
            .collect();
        let stale: Vec<String> = self
            .attached
            .iter()
            .filter(|(n, a)| wanted.get(n) != Some(&a.ifindex))
            .map(|(n, _)| n.clone())
            .collect();
        for name in stale {
            self.detach(&name);
        }
        let mut failed = Vec::new();
        for (name, ifindex) in wanted {
            if self.attached.contains_key(name) {
                continue;
            }
            if let Err(e) = self.attach(name, ifindex) {
                failed.push((name.clone(), e));
            }
        }
        failed
    }

    fn attach(&mut self, name: &str, ifindex: u32) -> Result<()> {
        let mut hooks = vec![(PROGRAM_INGRESS, TcAttachType::Ingress)];
        if name != LOOPBACK {
            hooks.push((PROGRAM_EGRESS, TcAttachType::Egress));
        }
        let mut links = Vec::new();
        for (prog, at) in hooks {
            let attached = classifier(&mut self.bpf, prog).and_then(|p| {
                p.attach(name, at)
                    .map_err(program_error(format!("attach {prog} to {name} (TCX)")))
            });
            match attached {
                Ok(id) => links.push((prog, id)),
                Err(e) => {
                    // No half-captured interface.
                    self.release(links);
                    return Err(e);
                }
            }
        }
        self.attached
            .insert(name.to_string(), Attached { ifindex, links });
        Ok(())
    }

    fn release(&mut self, links: Vec<(&'static str, SchedClassifierLinkId)>) {
        for (prog, id) in links {
            if let Ok(p) = classifier(&mut self.bpf, prog) {
                // Gone with its interface already, if that is why.
                let _ = p.detach(id);
            }
        }
    }

    fn detach(&mut self, name: &str) {
        if let Some(a) = self.attached.remove(name) {
            self.release(a.links);
        }
    }

    /// Program `name` (for BPF_PROG_TEST_RUN in the benchmarks).
    pub fn program(&self, name: &str) -> Result<&SchedClassifier> {
        self.bpf
            .program(name)
            .ok_or_else(|| Error::InvalidArgument(format!("program {name} missing")))?
            .try_into()
            .map_err(program_error(format!("{name} is not a classifier")))
    }

    /// The interfaces captured.
    pub fn interfaces(&self) -> Vec<String> {
        self.attached.keys().cloned().collect()
    }

    /// The programs' counters, by reason, summed over the CPUs.
    pub fn reasons(&self) -> Result<BTreeMap<&'static str, u64>> {
        self.reasons.sums(&reason::NAMES)
    }
}

fn classifier<'a>(bpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SchedClassifier> {
    bpf.program_mut(name)
        .ok_or_else(|| Error::InvalidArgument(format!("program {name} missing")))?
        .try_into()
        .map_err(program_error(format!("{name} is not a classifier")))
}
