//! The process tracer of `bpf-trace`: the kernel struct offsets read from the kernel's BTF and
//! set as globals, the four BTF tracepoints loaded and attached (links owned by the process:
//! tracing has nothing to keep across a restart), their ring buffers and counters; with
//! enforcement on, the rules in the programs' maps and the cgroup connect hooks attached to
//! each enforced cgroup (owned too: nothing that denies outlives the daemon or the module).
use std::collections::BTreeMap;

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, LpmTrie, MapData, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{BtfTracePoint, CgroupAttachMode, CgroupSockAddr},
};
use bpf_common::trace::{ConnectRuleData, ExecRuleKey, MAX_RULES, globals, map_names, reason};

use super::rules::{Mode, Resolved};
use crate::error::map_error;

use crate::{Error, Result, error::program_error};

/// The compiled tracer (built by `build.rs` from `bpf-trace`).
pub static TRACE_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bpf-trace"));

/// (program, tracepoint, the arguments its prototype must have besides the context).
pub const PROGRAMS: [(&str, &str, usize); 4] = [
    ("trace_exec", "sched_process_exec", 3),
    ("trace_fork", "sched_process_fork", 2),
    ("trace_exit", "sched_process_exit", 1),
    ("trace_sock_state", "inet_sock_set_state", 3),
];

/// The cgroup connect hooks of the connect rules.
pub const ENFORCE_PROGRAMS: [&str; 2] = ["enforce_connect4", "enforce_connect6"];

pub type Ring = RingBuf<MapData>;

pub struct TracePlane {
    _bpf: Ebpf,
    reasons: crate::bpf::maps::ReasonCounters,
    rule_hits: PerCpuArray<MapData, u64>,
    /// The hooks enforcing (`exec`, `connect`).
    hooks: Vec<&'static str>,
}

/// The two rings: process events and connect events.
pub struct Rings {
    pub processes: Ring,
    pub connects: Ring,
}

/// The offsets the programs need, from `btf`; the first one missing names itself.
pub fn offsets(btf: &kbtf::Btf) -> std::result::Result<Vec<(&'static str, u32)>, String> {
    let mut out = Vec::new();
    for (global, strukt, path) in globals::OFFSETS {
        let off = btf
            .member_offset(strukt, path)
            .map_err(|e| format!("the kernel's BTF has no {strukt}.{}: {e}", path.join(".")))?;
        out.push((global, off));
    }
    for (_, tracepoint, args) in PROGRAMS {
        let typedef = format!("btf_trace_{tracepoint}");
        let n = btf
            .typedef_proto_params(&typedef)
            .map_err(|e| format!("the kernel has no tracepoint {tracepoint}: {e}"))?;
        // The first parameter is the context.
        if n < args + 1 {
            return Err(format!(
                "tracepoint {tracepoint} has {} arguments here, {args} needed",
                n.saturating_sub(1)
            ));
        }
    }
    Ok(out)
}

impl TracePlane {
    /// Loads the tracer with `offsets` (see [`offsets`]) and attaches its tracepoints.
    pub fn start(
        event_rate: u64,
        offsets: &[(&'static str, u32)],
        rules: &Resolved,
    ) -> Result<(Self, Rings)> {
        if TRACE_OBJECT.is_empty() {
            return Err(Error::InvalidArgument(
                "this datapathd was built without its BPF programs (AYA_BUILD_SKIP)".into(),
            ));
        }
        let btf = aya::Btf::from_sys_fs().map_err(|e| {
            Error::io(
                "read the kernel's BTF (/sys/kernel/btf/vmlinux)",
                std::io::Error::other(e.to_string()),
            )
        })?;
        let mut loader = EbpfLoader::new();
        loader.override_global(globals::EVENT_RATE, &event_rate, true);
        let mode = rules.mode.global();
        let host_wide = u32::from(rules.host_wide);
        loader.override_global(globals::ENFORCE_MODE, &mode, true);
        loader.override_global(globals::ENFORCE_HOST_WIDE, &host_wide, true);
        for (name, value) in offsets {
            loader.override_global(name, value, true);
        }
        let mut bpf = loader.load(TRACE_OBJECT).map_err(|source| Error::Load {
            source: Box::new(source),
            context: "load the process tracer".into(),
        })?;
        for (name, tracepoint, _) in PROGRAMS {
            let program: &mut BtfTracePoint = bpf
                .program_mut(name)
                .ok_or_else(|| Error::InvalidArgument(format!("program {name} missing")))?
                .try_into()
                .map_err(program_error(format!("{name} is not a BTF tracepoint")))?;
            crate::bpf::load_retrying(|| program.load(tracepoint, &btf))
                .map_err(program_error(format!("load {name}")))?;
            program
                .attach()
                .map_err(program_error(format!("attach {name} to {tracepoint}")))?;
        }
        let hooks = fill_rules(&mut bpf, rules)?;
        let reasons = crate::bpf::maps::take_reasons(&mut bpf, map_names::REASONS)?;
        let rule_hits = PerCpuArray::try_from(take(&mut bpf, map_names::RULE_HITS)?)
            .map_err(map_error(format!("open {}", map_names::RULE_HITS)))?;
        let rings = Rings {
            processes: crate::bpf::ringbuf::take(&mut bpf, map_names::EVENTS)?,
            connects: crate::bpf::ringbuf::take(&mut bpf, map_names::CONNECTS)?,
        };
        Ok((
            Self {
                _bpf: bpf,
                reasons,
                rule_hits,
                hooks,
            },
            rings,
        ))
    }

    /// Matches of each rule index, summed over the CPUs.
    pub fn rule_hits(&self, count: usize) -> Result<Vec<u64>> {
        (0..count.min(MAX_RULES as usize))
            .map(|i| {
                self.rule_hits
                    .get(&(i as u32), 0)
                    .map(|v| v.iter().sum())
                    .map_err(map_error(format!("read {}", map_names::RULE_HITS)))
            })
            .collect()
    }

    pub fn hooks(&self) -> &[&'static str] {
        &self.hooks
    }

    /// The programs' counters, by reason, summed over the CPUs.
    pub fn reasons(&self) -> Result<BTreeMap<&'static str, u64>> {
        self.reasons.sums(&reason::NAMES)
    }
}

fn take(bpf: &mut Ebpf, name: &str) -> Result<aya::maps::Map> {
    bpf.take_map(name)
        .ok_or_else(|| Error::InvalidArgument(format!("map {name} missing")))
}

/// Writes the rules into the programs' maps and attaches the connect hooks to each enforced
/// cgroup (the cgroup2 root when host-wide); answers the hooks enforcing.
fn fill_rules(bpf: &mut Ebpf, rules: &Resolved) -> Result<Vec<&'static str>> {
    if rules.mode == Mode::Off {
        return Ok(Vec::new());
    }
    {
        let mut cgroups: HashMap<&mut MapData, u64, u8> = HashMap::try_from(
            bpf.map_mut(map_names::ENFORCED_CGROUPS)
                .ok_or_else(|| Error::InvalidArgument("map ENFORCED_CGROUPS missing".into()))?,
        )
        .map_err(map_error("open ENFORCED_CGROUPS"))?;
        for c in &rules.cgroups {
            cgroups
                .insert(c.id, 1, 0)
                .map_err(map_error("write ENFORCED_CGROUPS"))?;
        }
    }
    {
        let mut exec: HashMap<&mut MapData, ExecRuleKey, u32> = HashMap::try_from(
            bpf.map_mut(map_names::EXEC_DENY)
                .ok_or_else(|| Error::InvalidArgument("map EXEC_DENY missing".into()))?,
        )
        .map_err(map_error("open EXEC_DENY"))?;
        for r in &rules.exec {
            exec.insert(r.key, u32::from(r.index), 0)
                .map_err(map_error("write EXEC_DENY"))?;
        }
    }
    {
        let mut connect: LpmTrie<&mut MapData, ConnectRuleData, u32> = LpmTrie::try_from(
            bpf.map_mut(map_names::CONNECT_DENY)
                .ok_or_else(|| Error::InvalidArgument("map CONNECT_DENY missing".into()))?,
        )
        .map_err(map_error("open CONNECT_DENY"))?;
        for (index, r) in &rules.connect {
            let (len, data) = r.key();
            connect
                .insert(&Key::new(len, data), u32::from(*index), 0)
                .map_err(map_error("write CONNECT_DENY"))?;
        }
    }
    let mut hooks = vec!["exec"];
    let targets: Vec<std::path::PathBuf> = if rules.host_wide {
        vec![crate::socklb::cgroup2_root()?]
    } else {
        rules.cgroups.iter().map(|c| c.dir.clone()).collect()
    };
    for name in ENFORCE_PROGRAMS {
        let program: &mut CgroupSockAddr = bpf
            .program_mut(name)
            .ok_or_else(|| Error::InvalidArgument(format!("program {name} missing")))?
            .try_into()
            .map_err(program_error(format!("{name} is not cgroup sock_addr")))?;
        crate::bpf::load_retrying(|| program.load())
            .map_err(program_error(format!("load {name} (verifier)")))?;
        for dir in &targets {
            let file = std::fs::File::open(dir)
                .map_err(|e| Error::io(format!("open cgroup {}", dir.display()), e))?;
            // A bpf_link: the kernel refuses attach flags on link_create, and a cgroup link
            // always runs beside the cgroup's other programs (the socket LB's connect4).
            program
                .attach(&file, CgroupAttachMode::Single)
                .map_err(program_error(format!(
                    "attach {name} to cgroup {}",
                    dir.display()
                )))?;
        }
    }
    hooks.push("connect");
    Ok(hooks)
}
