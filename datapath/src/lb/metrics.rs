//! The load balancer's metrics, read from its maps at scrape time (summed over CPUs, never
//! cached: a restarted daemon reports the totals the pinned maps hold). No map is walked
//! entry by entry: the flow tables' occupancy is the conntrack controller's last count.

use bpf_common::reason;
use prometheus::{GaugeVec, IntCounterVec, IntGaugeVec, Opts, core::Collector};

use super::LbPlane;
use crate::{
    bus::StateReader,
    ct::Occupancy,
    metrics::{self, FamilyCollector, counter, gauge},
    server::SharedController,
};

/// One scrape's metric vectors, built fresh every time.
pub(super) struct Families {
    interface_attached: IntGaugeVec,
    interface_packets: IntCounterVec,
    interface_bytes: IntCounterVec,
    service_packets: IntCounterVec,
    service_bytes: IntCounterVec,
    backend_packets: IntCounterVec,
    backend_bytes: IntCounterVec,
    outcomes: IntCounterVec,
    drops: IntCounterVec,
    syn_flood_cpus: IntGaugeVec,
    syn_flood_entered: IntCounterVec,
    syn_flood_rate: IntGaugeVec,
    map_entries: IntGaugeVec,
    map_capacity: IntGaugeVec,
    prog_runs: IntCounterVec,
    prog_run_seconds: GaugeVec,
}

const SVC: [&str; 3] = ["vip", "port", "proto"];
const BE: [&str; 4] = ["vip", "port", "proto", "backend"];

impl metrics::Families for Families {
    fn new() -> Self {
        Self {
            interface_attached: gauge(
                "datapath_interface_attached",
                "Interfaces the XDP program is attached to, by attach mode.",
                &["interface", "mode"],
            ),
            interface_packets: counter(
                "datapath_interface_received_packets_total",
                "Frames each attached interface received, as the XDP program saw them.",
                &["interface"],
            ),
            interface_bytes: counter(
                "datapath_interface_received_bytes_total",
                "Bytes of the frames each attached interface received.",
                &["interface"],
            ),
            service_packets: counter(
                "datapath_service_packets_total",
                "Packets forwarded to the service's backends, from LB_VIP_STATS.",
                &SVC,
            ),
            service_bytes: counter(
                "datapath_service_bytes_total",
                "Bytes forwarded to the service's backends, from LB_VIP_STATS.",
                &SVC,
            ),
            backend_packets: counter(
                "datapath_backend_packets_total",
                "Packets forwarded to the backend, from LB_BE_STATS.",
                &BE,
            ),
            backend_bytes: counter(
                "datapath_backend_bytes_total",
                "Bytes forwarded to the backend, from LB_BE_STATS.",
                &BE,
            ),
            outcomes: counter(
                "datapath_xdp_packets_total",
                "Packets seen by the XDP program by outcome (LB_REASONS).",
                &["reason"],
            ),
            drops: counter(
                "datapath_xdp_drops_total",
                "Packets dropped by the XDP program by reason (LB_REASONS).",
                &["reason"],
            ),
            syn_flood_cpus: gauge(
                "datapath_xdp_syn_flood_cpus",
                "CPUs in SYN-flood mode now: over datapath_xdp_syn_flood_rate new flows in their \
                 current second, forwarding DSR TCP SYNs without a flow entry.",
                &[],
            ),
            syn_flood_entered: counter(
                "datapath_xdp_syn_flood_entered_total",
                "Times a CPU entered SYN-flood mode (one per second it spent over the rate).",
                &[],
            ),
            syn_flood_rate: gauge(
                "datapath_xdp_syn_flood_rate",
                "New flows per second per CPU that start SYN-flood mode (lb.syn_flood_rate; \
                 0: the mode is off).",
                &[],
            ),
            map_entries: gauge(
                "datapath_map_entries",
                "Entries in use in the BPF map.",
                &["map"],
            ),
            map_capacity: gauge(
                "datapath_map_max_entries",
                "Capacity of the BPF map, in entries.",
                &["map"],
            ),
            prog_runs: counter(
                "datapath_bpf_program_runs_total",
                "Runs of the BPF program counted by the kernel while BPF stats are enabled.",
                &["program"],
            ),
            prog_run_seconds: GaugeVec::new(
                Opts::new(
                    "datapath_bpf_program_run_time_seconds",
                    "Time spent running the BPF program while BPF stats are enabled (grows like \
                     a counter).",
                ),
                &["program"],
            )
            .expect("valid metric definition"),
        }
    }

    fn all(&self) -> Vec<&dyn Collector> {
        vec![
            &self.interface_attached,
            &self.interface_packets,
            &self.interface_bytes,
            &self.service_packets,
            &self.service_bytes,
            &self.backend_packets,
            &self.backend_bytes,
            &self.outcomes,
            &self.drops,
            &self.syn_flood_cpus,
            &self.syn_flood_entered,
            &self.syn_flood_rate,
            &self.map_entries,
            &self.map_capacity,
            &self.prog_runs,
            &self.prog_run_seconds,
        ]
    }
}

/// The load balancer's collector.
pub(super) struct LbCollector;

impl LbCollector {
    #[expect(
        clippy::new_ret_no_self,
        reason = "a constructor of the generic collector"
    )]
    pub(super) fn new(
        ctl: SharedController<LbPlane>,
        occupancy: StateReader<Occupancy>,
        prog_stats: StateReader<bool>,
    ) -> FamilyCollector<Families> {
        let scrape = Scrape {
            ctl,
            occupancy,
            prog_stats,
        };
        FamilyCollector::new(move |f: &Families| scrape.fill(f))
    }
}

struct Scrape {
    ctl: SharedController<LbPlane>,
    occupancy: StateReader<Occupancy>,
    /// Whether kernel BPF statistics are on (the prog_stats controller's state).
    prog_stats: StateReader<bool>,
}

impl Scrape {
    fn fill(&self, f: &Families) {
        // The collector runs on the blocking pool (see `metrics`), where waiting for the
        // controller is allowed.
        let ctl = self.ctl.blocking_lock();
        let Some(dp) = ctl.plane().dataplane() else {
            return;
        };
        for (name, mode) in dp.interfaces() {
            f.interface_attached
                .with_label_values(&[name.as_str(), mode.name()])
                .set(1);
        }
        match dp.interface_stats() {
            Ok(interfaces) => {
                for (name, counter) in interfaces {
                    f.interface_packets
                        .with_label_values(&[name.as_str()])
                        .inc_by(counter.packets);
                    f.interface_bytes
                        .with_label_values(&[name.as_str()])
                        .inc_by(counter.bytes);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the interface counters for a scrape"),
        }
        match ctl.stats() {
            Ok(stats) => {
                for s in &stats.services {
                    let port = s.port.to_string();
                    let proto = s.proto.to_string();
                    let vip = s.vip.to_string();
                    let labels = [vip.as_str(), port.as_str(), proto.as_str()];
                    f.service_packets
                        .with_label_values(&labels)
                        .inc_by(s.counters.packets);
                    f.service_bytes
                        .with_label_values(&labels)
                        .inc_by(s.counters.bytes);
                    for b in &s.backends {
                        let backend = match b.addr {
                            std::net::IpAddr::V4(a) => format!("{a}:{}", b.port),
                            std::net::IpAddr::V6(a) => format!("[{a}]:{}", b.port),
                        };
                        let labels = [
                            vip.as_str(),
                            port.as_str(),
                            proto.as_str(),
                            backend.as_str(),
                        ];
                        f.backend_packets
                            .with_label_values(&labels)
                            .inc_by(b.counters.packets);
                        f.backend_bytes
                            .with_label_values(&labels)
                            .inc_by(b.counters.bytes);
                    }
                }
                for name in reason::NAMES {
                    let n = stats.reasons.get(name).copied().unwrap_or(0);
                    f.outcomes.with_label_values(&[name]).inc_by(n);
                    if let Some(cause) = name.strip_prefix("drop_") {
                        f.drops.with_label_values(&[cause]).inc_by(n);
                    }
                }
                if let Some(flood) = stats.syn_flood {
                    f.syn_flood_cpus
                        .with_label_values::<&str>(&[])
                        .set(i64::from(flood.cpus_flooding));
                    f.syn_flood_entered
                        .with_label_values::<&str>(&[])
                        .inc_by(flood.entered);
                    f.syn_flood_rate
                        .with_label_values::<&str>(&[])
                        .set(i64::try_from(flood.rate_per_cpu).unwrap_or(i64::MAX));
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the datapath counters for a scrape"),
        }
        let occupancy = self.occupancy.get();
        for usage in dp.map_usage(occupancy.lb_flows, occupancy.lb_nat_reverse) {
            f.map_entries
                .with_label_values(&[usage.name])
                .set(usage.entries as i64);
            f.map_capacity
                .with_label_values(&[usage.name])
                .set(usage.capacity as i64);
        }
        if *self.prog_stats.get() {
            match dp.program_info() {
                Ok(info) => {
                    f.prog_runs
                        .with_label_values(&[super::dataplane::PROGRAM_LB])
                        .inc_by(info.run_count());
                    f.prog_run_seconds
                        .with_label_values(&[super::dataplane::PROGRAM_LB])
                        .set(info.run_time().as_secs_f64());
                }
                Err(e) => tracing::warn!(error = %e, "cannot read xdp_lb's program info"),
            }
        }
    }
}

pub(super) struct FibFamilies {
    generation: prometheus::IntGaugeVec,
}

impl crate::metrics::Families for FibFamilies {
    fn new() -> Self {
        Self {
            generation: crate::metrics::gauge(
                "datapath_fib_generation",
                "The XDP FIB cache's generation, bumped on every neighbour or route change that \
                 can change a forwarding decision",
                &[],
            ),
        }
    }

    fn all(&self) -> Vec<&dyn prometheus::core::Collector> {
        vec![&self.generation]
    }
}

pub(super) fn fib_collector(
    lb: std::sync::Arc<super::LbController>,
) -> crate::metrics::FamilyCollector<FibFamilies> {
    crate::metrics::FamilyCollector::new(move |f: &FibFamilies| {
        let generation = lb.fib_generation.load(std::sync::atomic::Ordering::Relaxed);
        f.generation
            .with_label_values::<&str>(&[])
            .set(generation as i64);
    })
}
