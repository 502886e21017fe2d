//! The conntrack's metrics: occupancy as the last sweep counted it (never a walk at scrape
//! time), garbage collection and flow events.
use std::sync::{Arc, atomic::Ordering};

use prometheus::{IntCounterVec, IntGaugeVec, core::Collector};

use super::ConntrackController;
use crate::metrics::{Families, FamilyCollector, counter, gauge};

pub(super) struct CtFamilies {
    events_received: IntCounterVec,
    events_lost: IntCounterVec,
    ct_entries: IntGaugeVec,
    ct_capacity: IntGaugeVec,
    gc_sweeps: IntCounterVec,
    gc_expired: IntCounterVec,
    lb_gc_expired: IntCounterVec,
}

impl Families for CtFamilies {
    fn new() -> Self {
        Self {
            events_received: counter(
                "datapath_flow_events_received_total",
                "Flow events read from the ring buffer",
                &[],
            ),
            events_lost: counter(
                "datapath_flow_events_lost_total",
                "Flow events lost: ring_full, rate_limited (programs), slow_reader (daemon)",
                &["cause"],
            ),
            ct_entries: gauge(
                "datapath_conntrack_entries",
                "Entries of the conntrack table CT_FLOWS at the last garbage-collection sweep",
                &[],
            ),
            ct_capacity: gauge(
                "datapath_conntrack_max_entries",
                "Capacity of the conntrack table CT_FLOWS",
                &[],
            ),
            gc_sweeps: counter(
                "datapath_conntrack_gc_sweeps_total",
                "Conntrack garbage-collection sweeps",
                &[],
            ),
            gc_expired: counter(
                "datapath_conntrack_gc_expired_total",
                "Conntrack entries removed by garbage collection after their idle timeout",
                &[],
            ),
            lb_gc_expired: counter(
                "datapath_flow_gc_expired_total",
                "Load-balancer flows (LB_FLOWS) removed by garbage collection after their idle timeout",
                &[],
            ),
        }
    }

    fn all(&self) -> Vec<&dyn Collector> {
        vec![
            &self.events_received,
            &self.events_lost,
            &self.ct_entries,
            &self.ct_capacity,
            &self.gc_sweeps,
            &self.gc_expired,
            &self.lb_gc_expired,
        ]
    }
}

pub(super) fn collector(ct: Arc<ConntrackController>) -> FamilyCollector<CtFamilies> {
    FamilyCollector::new(move |f: &CtFamilies| {
        f.lb_gc_expired
            .with_label_values::<&str>(&[])
            .inc_by(ct.lb_gc_expired.load(Ordering::Relaxed));
        let Some(policy) = ct.policy() else {
            return;
        };
        f.events_received
            .with_label_values::<&str>(&[])
            .inc_by(policy.events_received());
        for (cause, n) in ct.events_lost(policy.as_ref()) {
            f.events_lost.with_label_values(&[cause.as_str()]).inc_by(n);
        }
        f.ct_entries
            .with_label_values::<&str>(&[])
            .set(ct.occupancy.current().policy_flows as i64);
        f.ct_capacity
            .with_label_values::<&str>(&[])
            .set(policy.capacity() as i64);
        f.gc_sweeps
            .with_label_values::<&str>(&[])
            .inc_by(ct.gc_sweeps.load(Ordering::Relaxed));
        f.gc_expired
            .with_label_values::<&str>(&[])
            .inc_by(ct.gc_expired.load(Ordering::Relaxed));
    })
}
