//! [`PolicyPlane`]: the tc object's programs, maps and TCX links.

use super::spec::*;
use crate::ct::table::*;
use std::{
    collections::BTreeMap,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, PerCpuValues, lpm_trie::Key as LpmKey},
    programs::{
        SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
    },
    util::nr_cpus,
};
use bpf_common::{
    Counter,
    ct::{CtEntry, CtKey, POLICY_DIR_INGRESS},
    policy::{
        EndpointKey, EndpointPolicy, EndpointStats, MAX_ENDPOINTS, MAX_RULE_LISTS, MAX_RULES,
        RULE_DIR_IPV6, RULE_PREFIX_HEADER_BITS, RuleList, RulePrefix, defaults, globals, map_names,
        reason,
    },
};
use conntrack::{Timeouts, ct_timeout, is_expired};
use serde::Serialize;
use tracing::info;

use crate::{
    Error, Result,
    error::{map_error, program_error},
};

// ---------------------------------------------------------------------------------------------
// The plane: programs, maps, attachment.
// ---------------------------------------------------------------------------------------------

/// Settings of the policy plane.
#[derive(Clone, Debug)]
pub struct PolicyConfig {
    pub pin_root: PathBuf,
    /// Entries of `CT_FLOWS`.
    pub max_ct_flows: u32,
    /// Flow events per second and CPU.
    pub event_rate: u64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            pin_root: PathBuf::from(bpf_common::defaults::PIN_ROOT),
            max_ct_flows: defaults::MAX_CT_FLOWS,
            event_rate: defaults::EVENT_RATE,
        }
    }
}

/// Counters of one rule (summed over CPUs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RuleStats {
    #[serde(flatten)]
    pub rule: RuleInfo,
    pub packets: u64,
    pub bytes: u64,
}

/// Counters of one endpoint (summed over CPUs), by direction.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct EndpointCounters {
    pub endpoint: String,
    pub interfaces: Vec<String>,
    pub ingress: DirCounters,
    pub egress: DirCounters,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DirCounters {
    pub allowed: u64,
    pub denied: u64,
    pub default_hits: u64,
    pub tracked: u64,
    pub cut: u64,
}

/// What `policy list` shows.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PolicyStatus {
    pub generation: u32,
    pub policy: PolicySpec,
    pub endpoints: Vec<EndpointCounters>,
    pub rules: Vec<RuleStats>,
    pub reasons: BTreeMap<String, u64>,
}

/// The tc programs, their maps and their TCX links.
///
/// # Counters across applies
///
/// The programs count per rule id and endpoint id *within a slot* (`TC_RULE_STATS`,
/// `TC_EP_STATS`), and ids are positions in the policy file, so a slot's counters must be
/// zeroed before a new policy is written into it. Reporting them as they are would make the
/// exported Prometheus counters go down at every apply (and at every interface attach, which
/// rewrites the policy). Instead, what [`PolicyPlane::status`] reports is monotonic per
/// user-visible identity, a rule's (endpoint pattern, direction, name or `#index`) and an
/// endpoint's pattern:
///
/// `retired (folded totals) + the inactive slot (the previous generation) + the live slot`.
///
/// Before [`PolicyPlane::apply`] zeroes the inactive slot, it folds that slot's counters
/// (read with the policy this process wrote there) into `retired`. The slot has not been
/// live for a whole generation by then, so no packet still counts into it; the live and the
/// previous slot are both read at every status, so packets of the old generation still in
/// flight right after a flip are counted too. A rule that is renamed or an unnamed rule that
/// moves starts a new identity (as its metric labels do); one that disappears and comes back
/// continues from its total. The totals live in this process: a restarted daemon starts from
/// zero, like any Prometheus counter after a process restart.
pub struct PolicyPlane {
    bpf: Ebpf,
    config: PolicyConfig,
    /// Interface name -> (ifindex, ingress link, egress link). The links are pinned (see
    /// [`tcx_link_pin`]), so they outlive this process.
    links: BTreeMap<String, (u32, PinnedLink, PinnedLink)>,
    policy: PolicySpec,
    compiled: CompiledPolicy,
    /// The policy this process wrote into the inactive slot (the previous generation), whose
    /// counters still count; `None` when that slot was not written by this process or its
    /// counters were folded into `retired_*` already.
    previous: Option<CompiledPolicy>,
    /// Counters of generations whose slot was reused, by rule identity.
    retired_rules: BTreeMap<RuleIdentity, Counter>,
    /// Counters of generations whose slot was reused, by endpoint pattern.
    retired_endpoints: BTreeMap<String, EndpointStats>,
}

fn add_counter(into: &mut Counter, c: &Counter) {
    into.packets += c.packets;
    into.bytes += c.bytes;
}

fn add_endpoint_stats(into: &mut EndpointStats, s: &EndpointStats) {
    for d in 0..2 {
        into.allowed[d] += s.allowed[d];
        into.denied[d] += s.denied[d];
        into.default_hits[d] += s.default_hits[d];
        into.tracked[d] += s.tracked[d];
        into.cut[d] += s.cut[d];
    }
}

/// The layout this build's tc object gives its pinned maps with plain keys and values (the LPM
/// trie and the ring buffer are left out: their kernel sizes are not the ABI types' sizes).
fn tc_abi_layouts() -> [crate::bpf::pins::PinLayout; 8] {
    use bpf_common::policy::{MAX_ENDPOINTS, MAX_RULE_LISTS, MAX_RULES, RateBucket};
    use std::mem::size_of;
    [
        (
            map_names::CT_FLOWS,
            size_of::<CtKey>(),
            size_of::<CtEntry>(),
            None,
        ),
        (map_names::GENERATION, 4, 4, Some(1)),
        (
            map_names::ENDPOINTS,
            size_of::<EndpointKey>(),
            size_of::<EndpointPolicy>(),
            Some(MAX_ENDPOINTS * 2),
        ),
        (
            map_names::RULE_LISTS,
            4,
            size_of::<RuleList>(),
            Some(MAX_RULE_LISTS * 2),
        ),
        (
            map_names::RULE_STATS,
            4,
            size_of::<bpf_common::Counter>(),
            Some(MAX_RULES * 2),
        ),
        (
            map_names::EP_STATS,
            4,
            size_of::<EndpointStats>(),
            Some(MAX_ENDPOINTS * 2),
        ),
        (map_names::REASONS, 4, 8, Some(reason::COUNT)),
        (map_names::EVENT_RATE, 4, size_of::<RateBucket>(), Some(1)),
    ]
}

/// Where the TCX link of program `prog` on `interface` is pinned: beside the XDP links, so
/// `datapathd cleanup` removes it with them.
pub fn tcx_link_pin(pin_root: &Path, prog: &str, interface: &str) -> PathBuf {
    pin_root.join("links").join(format!("{prog}_{interface}"))
}

/// Unpins (and so detaches) every pinned TCX link under `pin_root` whose interface is not in
/// `keep`: what a previous run left for interfaces that are no longer configured, or for a
/// policy module that is now off.
pub fn unpin_tcx_links(pin_root: &Path, keep: &[String]) -> Result<()> {
    let dir = pin_root.join("links");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(());
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(format!("list {}", dir.display()), e))?;
        let file = entry.file_name().to_string_lossy().into_owned();
        let interface = [PROGRAM_INGRESS, PROGRAM_EGRESS]
            .iter()
            .find_map(|prog| file.strip_prefix(&format!("{prog}_")).map(str::to_string));
        if let Some(interface) = interface
            && !keep.contains(&interface)
        {
            std::fs::remove_file(entry.path()).map_err(|e| {
                Error::io(format!("remove pinned link {}", entry.path().display()), e)
            })?;
            info!(
                interface,
                link = file,
                "unpinned a TCX link of an interface no longer governed"
            );
        }
    }
    Ok(())
}

/// Names of the interfaces of the current network namespace (`if_nameindex`: `/sys/class/net`
/// shows the namespace sysfs was mounted in, not necessarily the process's own).
pub fn list_interfaces() -> Result<Vec<String>> {
    Ok(crate::config::interface_names())
}

impl PolicyPlane {
    /// Loads the tc object, reusing (or creating) the maps pinned under `config.pin_root`.
    pub fn start(config: &PolicyConfig) -> Result<Self> {
        if TC_OBJECT.is_empty() {
            return Err(Error::InvalidArgument(
                "this datapathd was built without its BPF programs (AYA_BUILD_SKIP)".into(),
            ));
        }
        std::fs::create_dir_all(&config.pin_root)
            .map_err(|e| Error::io(format!("create pin root {}", config.pin_root.display()), e))?;
        crate::bpf::pins::replace_incompatible_pins(&config.pin_root, &tc_abi_layouts())?;
        let mut loader = EbpfLoader::new();
        loader
            .default_map_pin_directory(&config.pin_root)
            .map_max_entries(map_names::CT_FLOWS, config.max_ct_flows)
            .override_global(globals::EVENT_RATE, &config.event_rate, true);
        let mut bpf = loader.load(TC_OBJECT).map_err(|source| Error::Load {
            source: Box::new(source),
            context: format!(
                "load the tc object with maps pinned under {}",
                config.pin_root.display()
            ),
        })?;
        for name in [PROGRAM_INGRESS, PROGRAM_EGRESS] {
            let program: &mut SchedClassifier = bpf
                .program_mut(name)
                .ok_or_else(|| Error::InvalidArgument(format!("program {name} missing")))?
                .try_into()
                .map_err(program_error(format!("{name} is not a classifier")))?;
            crate::bpf::load_retrying(|| program.load())
                .map_err(program_error(format!("load {name}")))?;
        }
        Ok(Self {
            bpf,
            config: config.clone(),
            links: BTreeMap::new(),
            policy: PolicySpec::default(),
            compiled: CompiledPolicy::default(),
            previous: None,
            retired_rules: BTreeMap::new(),
            retired_endpoints: BTreeMap::new(),
        })
    }

    pub fn config(&self) -> &PolicyConfig {
        &self.config
    }

    /// The program for tc direction `dir` (for BPF_PROG_TEST_RUN).
    pub fn program(&self, dir: u8) -> Result<&SchedClassifier> {
        let name = if dir == POLICY_DIR_INGRESS {
            PROGRAM_INGRESS
        } else {
            PROGRAM_EGRESS
        };
        self.bpf
            .program(name)
            .ok_or_else(|| Error::InvalidArgument(format!("program {name} missing")))?
            .try_into()
            .map_err(program_error(format!("{name} is not a classifier")))
    }

    /// Attaches both programs (TCX ingress and egress) to `name`. Idempotent.
    pub fn attach(&mut self, name: &str) -> Result<()> {
        if self.links.contains_key(name) {
            return Ok(());
        }
        let ifindex = crate::dataplane::interface_index(name)?;
        let (ingress, ingress_created) = self.attach_pinned(PROGRAM_INGRESS, name)?;
        let egress = match self.attach_pinned(PROGRAM_EGRESS, name) {
            Ok((link, _)) => link,
            Err(e) => {
                // No half-attached interface: undo the ingress link this call created.
                if ingress_created {
                    let _ = ingress.unpin();
                }
                return Err(e);
            }
        };
        self.links
            .insert(name.to_string(), (ifindex, ingress, egress));
        // The new interface may be governed by the live policy.
        if !self.compiled.endpoints.is_empty() {
            let compiled = self.compiled.clone();
            self.write(&compiled)?;
        }
        Ok(())
    }

    /// Attaches program `prog` to `interface` through a pinned TCX link, or swaps this
    /// process's program into the link a previous run pinned (`bpf_link_update`: the
    /// interface is never without its policy across a daemon restart or upgrade). Returns the
    /// link and whether this call created it.
    fn attach_pinned(&mut self, prog: &str, interface: &str) -> Result<(PinnedLink, bool)> {
        let pin = tcx_link_pin(&self.config.pin_root, prog, interface);
        let at = if prog == PROGRAM_INGRESS {
            TcAttachType::Ingress
        } else {
            TcAttachType::Egress
        };
        let program: &mut SchedClassifier = self
            .bpf
            .program_mut(prog)
            .ok_or_else(|| Error::InvalidArgument(format!("program {prog} missing")))?
            .try_into()
            .map_err(program_error(format!("{prog} is not a classifier")))?;
        let link_error = |what: String| {
            move |e: aya::programs::links::LinkError| {
                Error::io(what, std::io::Error::other(e.to_string()))
            }
        };
        let program = std::cell::RefCell::new(program);
        let replace = |fd_link: FdLink| -> Result<()> {
            let mut program = program.borrow_mut();
            let link = SchedClassifierLink::try_from(fd_link).map_err(link_error(format!(
                "pinned link {} is not a TCX link",
                pin.display()
            )))?;
            let id = program
                .attach_to_link(link)
                .map_err(program_error(format!("replace {prog} on {interface}")))?;
            // The pin keeps the link, and the program now in it, alive.
            drop(
                program
                    .take_link(id)
                    .map_err(program_error("take the updated TCX link"))?,
            );
            Ok(())
        };
        let attach = || -> Result<(FdLink, ())> {
            let mut program = program.borrow_mut();
            let id = program
                .attach(interface, at)
                .map_err(program_error(format!("attach {prog} to {interface} (TCX)")))?;
            let link = program
                .take_link(id)
                .map_err(program_error("take the new TCX link"))?;
            let fd_link = FdLink::try_from(link).map_err(link_error(format!(
                "{prog} on {interface} was attached through netlink (kernel without TCX), which \
                 cannot be pinned"
            )))?;
            Ok((fd_link, ()))
        };
        let (pinned, (), origin) = crate::bpf::links::adopt_or_attach(
            &pin,
            &format!("{prog} on {interface}"),
            replace,
            attach,
        )?;
        Ok((pinned, origin == crate::bpf::links::LinkOrigin::Created))
    }

    /// Detaches both programs from `name`: unpinning the links releases their last reference.
    pub fn detach(&mut self, name: &str) -> Result<()> {
        let Some((_, ingress, egress)) = self.links.remove(name) else {
            return Ok(());
        };
        for link in [ingress, egress] {
            link.unpin()
                .map_err(|e| Error::io(format!("unpin the TCX links of {name}"), e))?;
        }
        Ok(())
    }

    /// Attaches to every interface matching one of `patterns`, detaches from attached ones
    /// that no longer match (or are gone). Returns the attached names.
    pub fn sync_interfaces(&mut self, patterns: &[String]) -> Result<Vec<String>> {
        let present = list_interfaces()?;
        let wanted: Vec<String> = present
            .into_iter()
            .filter(|n| patterns.iter().any(|p| pattern_matches(p, n)))
            .collect();
        let stale: Vec<String> = self
            .links
            .iter()
            .filter(|(n, (idx, _, _))| {
                !wanted.contains(n) || crate::dataplane::interface_index(n).ok() != Some(*idx)
            })
            .map(|(n, _)| n.clone())
            .collect();
        for name in stale {
            if self.detach(&name).is_err() {
                // The interface is gone with its links.
                self.links.remove(&name);
            }
        }
        for name in &wanted {
            self.attach(name)?;
        }
        // Links a previous run pinned for interfaces no longer configured.
        unpin_tcx_links(&self.config.pin_root, &self.interfaces())?;
        Ok(self.interfaces())
    }

    pub fn interfaces(&self) -> Vec<String> {
        self.links.keys().cloned().collect()
    }

    /// Interface name -> ifindex of what is attached.
    pub fn attached(&self) -> BTreeMap<String, u32> {
        self.links
            .iter()
            .map(|(name, (index, _, _))| (name.clone(), *index))
            .collect()
    }

    /// Attaches again what someone else detached (a TCX link whose kernel info shows no
    /// interface): answers the interfaces repaired.
    pub fn repair_detached(&mut self) -> Result<Vec<String>> {
        let broken: Vec<String> = self
            .links
            .iter()
            .filter(|(name, (index, _, _))| {
                [PROGRAM_INGRESS, PROGRAM_EGRESS].iter().any(|prog| {
                    let pin = tcx_link_pin(&self.config.pin_root, prog, name);
                    crate::bpf::links::attached_ifindex(&pin).ok() != Some(*index)
                })
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in &broken {
            if self.detach(name).is_err() {
                self.links.remove(name);
            }
            self.attach(name)?;
        }
        Ok(broken)
    }

    pub fn policy(&self) -> &PolicySpec {
        &self.policy
    }

    /// The live generation (0: no policy).
    pub fn generation(&self) -> Result<u32> {
        let map = self
            .bpf
            .map(map_names::GENERATION)
            .ok_or_else(|| Error::InvalidArgument("TC_GENERATION missing".into()))?;
        let array: Array<&MapData, u32> =
            Array::try_from(map).map_err(map_error("TC_GENERATION"))?;
        array.get(&0, 0).map_err(map_error("read TC_GENERATION"))
    }

    /// Applies a policy whole: it is written into the inactive slot, then the generation flips
    /// in one update. On any error before the flip the old policy stays in force.
    pub fn apply(&mut self, spec: &PolicySpec) -> Result<u32> {
        let compiled = spec.compile()?;
        let generation = self.write(&compiled)?;
        self.policy = spec.clone();
        self.compiled = compiled;
        Ok(generation)
    }

    /// Removes the policy: every attached interface passes everything again (the generation
    /// flips to an empty slot, so tracked flows are re-checked and pass).
    pub fn delete(&mut self) -> Result<u32> {
        self.apply(&PolicySpec::default())
    }

    fn write(&mut self, compiled: &CompiledPolicy) -> Result<u32> {
        let live = self.generation()?;
        let mut generation = live.wrapping_add(1);
        if generation == 0 {
            generation = 2;
        }
        let slot = generation & 1;

        // Fold the inactive slot's counters (the generation before the live one) into the
        // totals before they are zeroed: see "Counters across applies" on `PolicyPlane`.
        if let Some(previous) = &self.previous {
            let rules = self.slot_rule_counters(slot, previous)?;
            let endpoints = self.slot_endpoint_counters(slot, previous)?;
            for (rule, c) in previous.rules.iter().zip(&rules) {
                add_counter(self.retired_rules.entry(rule.identity()).or_default(), c);
            }
            for (ep, c) in previous.endpoints.iter().zip(&endpoints) {
                add_endpoint_stats(
                    self.retired_endpoints
                        .entry(ep.pattern.clone())
                        .or_default(),
                    c,
                );
            }
            // Counted once: from here on the slot's counters are only in the totals.
            self.previous = None;
        }

        // Clear the inactive slot.
        {
            let mut endpoints: HashMap<&mut MapData, EndpointKey, EndpointPolicy> =
                HashMap::try_from(self.map_mut(map_names::ENDPOINTS)?)
                    .map_err(map_error("TC_ENDPOINTS"))?;
            let stale: Vec<EndpointKey> = endpoints
                .keys()
                .filter_map(|k| k.ok())
                .filter(|k| k.slot == slot)
                .collect();
            for key in stale {
                endpoints
                    .remove(&key)
                    .map_err(map_error("clear TC_ENDPOINTS"))?;
            }
        }
        {
            let mut trie: LpmTrie<&mut MapData, RulePrefix, u32> =
                LpmTrie::try_from(self.map_mut(map_names::RULES_LPM)?)
                    .map_err(map_error("TC_RULES_LPM"))?;
            let stale: Vec<LpmKey<RulePrefix>> = trie
                .keys()
                .filter_map(|k| k.ok())
                .filter(|k| u32::from(k.data().slot) == slot)
                .collect();
            for key in stale {
                trie.remove(&key).map_err(map_error("clear TC_RULES_LPM"))?;
            }
        }
        let cpus = nr_cpus().map_err(|(_, e)| Error::io("count CPUs", e))?;
        {
            let mut stats: PerCpuArray<&mut MapData, Counter> =
                PerCpuArray::try_from(self.map_mut(map_names::RULE_STATS)?)
                    .map_err(map_error("TC_RULE_STATS"))?;
            for id in 0..compiled.rules.len() as u32 {
                let zero = PerCpuValues::try_from(vec![Counter::default(); cpus])
                    .map_err(|e| Error::io("zero counters", e))?;
                stats
                    .set(slot * MAX_RULES + id, zero, 0)
                    .map_err(map_error("reset TC_RULE_STATS"))?;
            }
        }
        {
            let mut stats: PerCpuArray<&mut MapData, EndpointStats> =
                PerCpuArray::try_from(self.map_mut(map_names::EP_STATS)?)
                    .map_err(map_error("TC_EP_STATS"))?;
            for ep in &compiled.endpoints {
                let zero = PerCpuValues::try_from(vec![EndpointStats::default(); cpus])
                    .map_err(|e| Error::io("zero counters", e))?;
                stats
                    .set(slot * MAX_ENDPOINTS + ep.id, zero, 0)
                    .map_err(map_error("reset TC_EP_STATS"))?;
            }
        }

        // Write the new policy into it.
        let mut next_list = 0u32;
        for ep in &compiled.endpoints {
            for (dir, prefix, list) in &ep.lists {
                let index = slot * MAX_RULE_LISTS + next_list;
                {
                    let mut lists: Array<&mut MapData, RuleList> =
                        Array::try_from(self.map_mut(map_names::RULE_LISTS)?)
                            .map_err(map_error("TC_RULE_LISTS"))?;
                    lists
                        .set(index, *list, 0)
                        .map_err(map_error("write TC_RULE_LISTS"))?;
                }
                let mut trie: LpmTrie<&mut MapData, RulePrefix, u32> =
                    LpmTrie::try_from(self.map_mut(map_names::RULES_LPM)?)
                        .map_err(map_error("TC_RULES_LPM"))?;
                let key = LpmKey::new(
                    RULE_PREFIX_HEADER_BITS + u32::from(prefix.len),
                    RulePrefix {
                        slot: slot as u8,
                        dir: if prefix.addr.is_ipv6() {
                            *dir | RULE_DIR_IPV6
                        } else {
                            *dir
                        },
                        endpoint_be: (ep.id as u16).to_be(),
                        addr: bpf_common::addr16_from_ip(prefix.addr),
                    },
                );
                trie.insert(&key, next_list, 0)
                    .map_err(map_error("write TC_RULES_LPM"))?;
                next_list += 1;
            }
        }
        {
            let links: Vec<(String, u32)> = self
                .links
                .iter()
                .map(|(n, (idx, _, _))| (n.clone(), *idx))
                .collect();
            let mut endpoints: HashMap<&mut MapData, EndpointKey, EndpointPolicy> =
                HashMap::try_from(self.map_mut(map_names::ENDPOINTS)?)
                    .map_err(map_error("TC_ENDPOINTS"))?;
            for (name, ifindex) in links {
                if let Some(ep) = compiled.endpoint_for(&name) {
                    endpoints
                        .insert(EndpointKey { ifindex, slot }, ep.policy, 0)
                        .map_err(map_error("write TC_ENDPOINTS"))?;
                }
            }
        }

        // Flip: one 4-byte update.
        let mut gen_map: Array<&mut MapData, u32> =
            Array::try_from(self.map_mut(map_names::GENERATION)?)
                .map_err(map_error("TC_GENERATION"))?;
        gen_map
            .set(0, generation, 0)
            .map_err(map_error("flip TC_GENERATION"))?;
        // The policy live until now keeps its counters in what is now the inactive slot.
        self.previous = Some(self.compiled.clone());
        Ok(generation)
    }

    /// Counters of `compiled`'s rules in `slot`, summed over CPUs, in `compiled.rules` order.
    fn slot_rule_counters(&self, slot: u32, compiled: &CompiledPolicy) -> Result<Vec<Counter>> {
        let map: PerCpuArray<&MapData, Counter> =
            PerCpuArray::try_from(self.map(map_names::RULE_STATS)?)
                .map_err(map_error("TC_RULE_STATS"))?;
        compiled
            .rules
            .iter()
            .map(|r| {
                let v = map
                    .get(&(slot * MAX_RULES + r.id), 0)
                    .map_err(map_error("read TC_RULE_STATS"))?;
                Ok(Counter {
                    packets: v.iter().map(|c| c.packets).sum(),
                    bytes: v.iter().map(|c| c.bytes).sum(),
                })
            })
            .collect()
    }

    /// Counters of `compiled`'s endpoints in `slot`, summed over CPUs, in
    /// `compiled.endpoints` order.
    fn slot_endpoint_counters(
        &self,
        slot: u32,
        compiled: &CompiledPolicy,
    ) -> Result<Vec<EndpointStats>> {
        let map: PerCpuArray<&MapData, EndpointStats> =
            PerCpuArray::try_from(self.map(map_names::EP_STATS)?)
                .map_err(map_error("TC_EP_STATS"))?;
        compiled
            .endpoints
            .iter()
            .map(|ep| {
                let v = map
                    .get(&(slot * MAX_ENDPOINTS + ep.id), 0)
                    .map_err(map_error("read TC_EP_STATS"))?;
                let mut sum = EndpointStats::default();
                for s in v.iter() {
                    add_endpoint_stats(&mut sum, s);
                }
                Ok(sum)
            })
            .collect()
    }

    fn map_mut(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        self.bpf
            .map_mut(name)
            .ok_or_else(|| Error::InvalidArgument(format!("map {name} missing from the tc object")))
    }

    fn map(&self, name: &str) -> Result<&aya::maps::Map> {
        self.bpf
            .map(name)
            .ok_or_else(|| Error::InvalidArgument(format!("map {name} missing from the tc object")))
    }

    /// Drop/verdict reasons, summed over CPUs.
    pub fn reasons(&self) -> Result<BTreeMap<String, u64>> {
        let map: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(self.map(map_names::REASONS)?)
            .map_err(map_error("TC_REASONS"))?;
        let mut out = BTreeMap::new();
        for (i, name) in reason::NAMES.iter().enumerate() {
            let values = map
                .get(&(i as u32), 0)
                .map_err(map_error("read TC_REASONS"))?;
            out.insert((*name).to_string(), values.iter().sum());
        }
        Ok(out)
    }

    /// Status of the live policy with its counters. Rule and endpoint counters are totals
    /// over every generation this process applied, by identity (see "Counters across
    /// applies" on [`PolicyPlane`]), so they never go down.
    pub fn status(&self) -> Result<PolicyStatus> {
        let generation = self.generation()?;
        let slot = generation & 1;
        // What earlier generations counted: the folded totals plus the previous slot.
        let mut carried_rules = self.retired_rules.clone();
        let mut carried_endpoints = self.retired_endpoints.clone();
        if let Some(previous) = &self.previous {
            let rules = self.slot_rule_counters(slot ^ 1, previous)?;
            for (rule, c) in previous.rules.iter().zip(&rules) {
                add_counter(carried_rules.entry(rule.identity()).or_default(), c);
            }
            let endpoints = self.slot_endpoint_counters(slot ^ 1, previous)?;
            for (ep, c) in previous.endpoints.iter().zip(&endpoints) {
                add_endpoint_stats(carried_endpoints.entry(ep.pattern.clone()).or_default(), c);
            }
        }
        let live_rules = self.slot_rule_counters(slot, &self.compiled)?;
        let mut rules = Vec::new();
        for (r, live) in self.compiled.rules.iter().zip(&live_rules) {
            let mut total = *live;
            // Two rules of one endpoint and direction with the same name share an identity:
            // the first one carries the history.
            if let Some(carried) = carried_rules.remove(&r.identity()) {
                add_counter(&mut total, &carried);
            }
            rules.push(RuleStats {
                rule: r.clone(),
                packets: total.packets,
                bytes: total.bytes,
            });
        }
        let live_endpoints = self.slot_endpoint_counters(slot, &self.compiled)?;
        let mut endpoints = Vec::new();
        for (ep, live) in self.compiled.endpoints.iter().zip(&live_endpoints) {
            let mut v = *live;
            if let Some(carried) = carried_endpoints.remove(&ep.pattern) {
                add_endpoint_stats(&mut v, &carried);
            }
            let dir = |d: usize| DirCounters {
                allowed: v.allowed[d],
                denied: v.denied[d],
                default_hits: v.default_hits[d],
                tracked: v.tracked[d],
                cut: v.cut[d],
            };
            endpoints.push(EndpointCounters {
                endpoint: ep.pattern.clone(),
                interfaces: self
                    .links
                    .keys()
                    .filter(|n| self.compiled.endpoint_for(n).is_some_and(|e| e.id == ep.id))
                    .cloned()
                    .collect(),
                ingress: dir(0),
                egress: dir(1),
            });
        }
        Ok(PolicyStatus {
            generation,
            policy: self.policy.clone(),
            endpoints,
            rules,
            reasons: self.reasons()?,
        })
    }

    /// Every tracked flow, read with `BPF_MAP_LOOKUP_BATCH` ([`crate::gc::lookup_batch_all`]): a few
    /// hundred syscalls for a million entries instead of two per entry, and no restart from
    /// the first key when the entry the iteration stood on is deleted meanwhile.
    pub fn ct_entries(&self) -> Result<Vec<(CtKey, CtEntry)>> {
        /// Entries per `BPF_MAP_LOOKUP_BATCH` call when reading `CT_FLOWS`.
        const CT_LOOKUP_BATCH: u32 = 4_096;
        let map = match self.map(map_names::CT_FLOWS)? {
            aya::maps::Map::LruHashMap(data) | aya::maps::Map::HashMap(data) => data,
            _ => {
                return Err(Error::InvalidArgument(
                    "CT_FLOWS is not a hash map in the tc object".into(),
                ));
            }
        };
        // The pinned map may predate a change of `max_ct_flows`: bound the walk by its own size.
        let max_entries = map
            .info()
            .map(|info| info.max_entries())
            .unwrap_or(self.config.max_ct_flows);
        crate::gc::lookup_batch_all(map.fd().as_fd(), max_entries, CT_LOOKUP_BATCH)
    }

    /// Tracked flows matching `filter`.
    pub fn ct_list(&self, filter: &CtFilter, now_ns: u64) -> Result<Vec<CtFlow>> {
        let mut flows: Vec<CtFlow> = self
            .ct_entries()?
            .iter()
            .map(|(k, e)| CtFlow::from_entry(k, e, now_ns))
            .filter(|f| filter.matches(f))
            .collect();
        sort_flows(&mut flows);
        Ok(flows)
    }

    /// Removes tracked flows matching `filter`; returns how many.
    pub fn ct_flush(&mut self, filter: &CtFilter, now_ns: u64) -> Result<u64> {
        let victims: Vec<CtKey> = self
            .ct_entries()?
            .iter()
            .filter(|(k, e)| filter.matches(&CtFlow::from_entry(k, e, now_ns)))
            .map(|(k, _)| *k)
            .collect();
        let mut map: HashMap<&mut MapData, CtKey, CtEntry> =
            HashMap::try_from(self.map_mut(map_names::CT_FLOWS)?).map_err(map_error("CT_FLOWS"))?;
        let mut removed = 0;
        for key in victims {
            if map.remove(&key).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Removes flows idle past their timeout, at most `max_deletes`. Every candidate is read
    /// again right before its deletion and kept if a packet refreshed it since the scan, so a
    /// live entry is never removed. Returns the expired flows.
    pub fn ct_sweep(
        &mut self,
        timeouts: &Timeouts,
        now_ns: u64,
        max_deletes: usize,
    ) -> Result<Vec<(CtKey, CtEntry)>> {
        self.ct_sweep_counted(timeouts, now_ns, max_deletes)
            .map(|(_, expired)| expired)
    }

    /// [`Self::ct_sweep`], also answering how many entries the scan read (the table's
    /// occupancy before the sweep).
    pub fn ct_sweep_counted(
        &mut self,
        timeouts: &Timeouts,
        now_ns: u64,
        max_deletes: usize,
    ) -> Result<(u64, Vec<(CtKey, CtEntry)>)> {
        let entries = self.ct_entries()?;
        let scanned = entries.len() as u64;
        let candidates: Vec<CtKey> = entries
            .iter()
            .filter(|(k, e)| {
                is_expired(
                    e.last_seen_ns,
                    now_ns,
                    ct_timeout(timeouts, k.proto, e.state),
                )
            })
            .map(|(k, _)| *k)
            .take(max_deletes)
            .collect();
        let mut map: HashMap<&mut MapData, CtKey, CtEntry> =
            HashMap::try_from(self.map_mut(map_names::CT_FLOWS)?).map_err(map_error("CT_FLOWS"))?;
        let mut expired = Vec::new();
        for key in candidates {
            let Ok(entry) = map.get(&key, 0) else {
                continue;
            };
            if !is_expired(
                entry.last_seen_ns,
                now_ns,
                ct_timeout(timeouts, key.proto, entry.state),
            ) {
                continue;
            }
            if map.remove(&key).is_ok() {
                expired.push((key, entry));
            }
        }
        Ok((scanned, expired))
    }

    /// Deletes `keys` from `CT_FLOWS`; answers how many were there.
    pub fn ct_remove(&mut self, keys: &[CtKey]) -> Result<u64> {
        let mut map: HashMap<&mut MapData, CtKey, CtEntry> =
            HashMap::try_from(self.map_mut(map_names::CT_FLOWS)?).map_err(map_error("CT_FLOWS"))?;
        Ok(keys.iter().filter(|k| map.remove(k).is_ok()).count() as u64)
    }

    /// Takes the flow-event ring buffer (once) for a reader task.
    pub fn take_events(&mut self) -> Option<aya::maps::RingBuf<aya::maps::MapData>> {
        let map = self.bpf.take_map(map_names::EVENTS)?;
        aya::maps::RingBuf::try_from(map).ok()
    }

    pub fn pin_root(&self) -> &Path {
        &self.config.pin_root
    }
}
