//! The policy's metrics, read from its maps at scrape time.
use std::sync::Arc;

use prometheus::{IntCounterVec, IntGaugeVec, core::Collector};

use super::PolicyController;
use crate::metrics::{self, FamilyCollector, counter, gauge};

pub(super) struct Families {
    up: IntGaugeVec,
    generation: IntGaugeVec,
    rule_packets: IntCounterVec,
    rule_bytes: IntCounterVec,
    endpoint_verdicts: IntCounterVec,
    packets: IntCounterVec,
    drops: IntCounterVec,
}

impl metrics::Families for Families {
    fn new() -> Self {
        Self {
            up: gauge(
                "datapath_policy_up",
                "1 while the tc policy programs are loaded",
                &[],
            ),
            generation: gauge(
                "datapath_policy_generation",
                "Generation of the live policy (0: none applied yet)",
                &[],
            ),
            rule_packets: counter(
                "datapath_policy_rule_packets_total",
                "Packets decided by each rule of the live policy, totalled over applies by \
                 (endpoint, direction, rule name)",
                &["endpoint", "direction", "rule", "action"],
            ),
            rule_bytes: counter(
                "datapath_policy_rule_bytes_total",
                "Bytes decided by each rule of the live policy, totalled over applies by \
                 (endpoint, direction, rule name)",
                &["endpoint", "direction", "rule", "action"],
            ),
            endpoint_verdicts: counter(
                "datapath_policy_endpoint_verdicts_total",
                "Verdicts per endpoint and direction, totalled over applies by endpoint",
                &["endpoint", "direction", "verdict"],
            ),
            packets: counter(
                "datapath_policy_packets_total",
                "Packets seen by the tc programs, by outcome (TC_REASONS)",
                &["reason"],
            ),
            drops: counter(
                "datapath_policy_drops_total",
                "Packets dropped by the tc programs, by reason",
                &["reason"],
            ),
        }
    }

    fn all(&self) -> Vec<&dyn Collector> {
        vec![
            &self.up,
            &self.generation,
            &self.rule_packets,
            &self.rule_bytes,
            &self.endpoint_verdicts,
            &self.packets,
            &self.drops,
        ]
    }
}

pub(super) fn collector(m: Arc<PolicyController>) -> FamilyCollector<Families> {
    FamilyCollector::new(move |f: &Families| {
        let (up, _) = m.up();
        f.up.with_label_values::<&str>(&[]).set(i64::from(up));
        if !up {
            return;
        }
        let status = m.status();
        if let Ok(status) = status {
            f.generation
                .with_label_values::<&str>(&[])
                .set(i64::from(status.generation));
            for r in &status.rules {
                let name = r.rule.label();
                let action = format!("{:?}", r.rule.action).to_lowercase();
                let labels = [
                    r.rule.endpoint.as_str(),
                    r.rule.direction.as_str(),
                    name.as_str(),
                    action.as_str(),
                ];
                f.rule_packets.with_label_values(&labels).inc_by(r.packets);
                f.rule_bytes.with_label_values(&labels).inc_by(r.bytes);
            }
            for ep in &status.endpoints {
                for (dir, c) in [("ingress", &ep.ingress), ("egress", &ep.egress)] {
                    for (verdict, n) in [
                        ("allowed", c.allowed),
                        ("denied", c.denied),
                        ("default", c.default_hits),
                        ("tracked", c.tracked),
                        ("cut", c.cut),
                    ] {
                        f.endpoint_verdicts
                            .with_label_values(&[ep.endpoint.as_str(), dir, verdict])
                            .inc_by(n);
                    }
                }
            }
            for (name, n) in &status.reasons {
                f.packets.with_label_values(&[name.as_str()]).inc_by(*n);
                if let Some(cause) = name.strip_prefix("drop_") {
                    f.drops.with_label_values(&[cause]).inc_by(*n);
                }
            }
        }
    })
}
