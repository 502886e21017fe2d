//! The process tracer of `bpf-trace`: the kernel struct offsets read from the kernel's BTF and
//! set as globals, the three BTF tracepoints loaded and attached (links owned by the process:
//! tracing has nothing to keep across a restart), their ring buffer and counters.
use std::collections::BTreeMap;

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, RingBuf},
    programs::BtfTracePoint,
};
use bpf_common::trace::{globals, map_names, reason};

use crate::{Error, Result, error::program_error};

/// The compiled tracer (built by `build.rs` from `bpf-trace`).
pub static TRACE_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bpf-trace"));

/// (program, tracepoint, the arguments its prototype must have besides the context).
pub const PROGRAMS: [(&str, &str, usize); 3] = [
    ("trace_exec", "sched_process_exec", 3),
    ("trace_fork", "sched_process_fork", 2),
    ("trace_exit", "sched_process_exit", 1),
];

pub type Ring = RingBuf<MapData>;

pub struct TracePlane {
    _bpf: Ebpf,
    reasons: crate::bpf::maps::ReasonCounters,
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
    pub fn start(event_rate: u64, offsets: &[(&'static str, u32)]) -> Result<(Self, Ring)> {
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
            program
                .load(tracepoint, &btf)
                .map_err(program_error(format!("load {name}")))?;
            program
                .attach()
                .map_err(program_error(format!("attach {name} to {tracepoint}")))?;
        }
        let reasons = crate::bpf::maps::take_reasons(&mut bpf, map_names::REASONS)?;
        let ring = crate::bpf::ringbuf::take(&mut bpf, map_names::EVENTS)?;
        Ok((Self { _bpf: bpf, reasons }, ring))
    }

    /// The programs' counters, by reason, summed over the CPUs.
    pub fn reasons(&self) -> Result<BTreeMap<&'static str, u64>> {
        self.reasons.sums(&reason::NAMES)
    }
}
