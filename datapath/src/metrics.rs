//! Prometheus metrics, `/healthz` and `/readyz` on a TCP listener (default `:9477`), apart
//! from the root-only API socket.
//!
//! The datapath's counters live in per-CPU BPF maps. They are read when Prometheus scrapes,
//! summed over CPUs, by a custom [`Collector`]: nothing is cached or accumulated in the
//! daemon, so a restarted daemon reports the same totals as the maps hold (they survive the
//! restart pinned), never counting a packet twice.
use std::{net::SocketAddr, sync::Arc, sync::atomic::Ordering};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use bpf_common::reason;
use prometheus::{
    Encoder, GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
    core::{Collector, Desc},
    proto::MetricFamily,
};
use tokio::net::TcpListener;

use crate::{
    error::{Error, Result},
    features::{Feature, Module},
    runtime::Runtime,
};

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition")
}

fn gauge(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition")
}

/// One scrape's metric vectors, built fresh every time.
struct Families {
    build_info: IntGaugeVec,
    module_up: IntGaugeVec,
    module_enabled: IntGaugeVec,
    feature: IntGaugeVec,
    ready: IntGaugeVec,
    reloads: IntCounterVec,
    reload_failures: IntCounterVec,
    interface_attached: IntGaugeVec,
    interface_packets: IntCounterVec,
    interface_bytes: IntCounterVec,
    service_packets: IntCounterVec,
    service_bytes: IntCounterVec,
    backend_packets: IntCounterVec,
    backend_bytes: IntCounterVec,
    outcomes: IntCounterVec,
    drops: IntCounterVec,
    map_entries: IntGaugeVec,
    map_capacity: IntGaugeVec,
    prog_runs: IntCounterVec,
    prog_run_seconds: GaugeVec,
}

const SVC: [&str; 3] = ["vip", "port", "proto"];
const BE: [&str; 4] = ["vip", "port", "proto", "backend"];

impl Families {
    fn new() -> Self {
        Self {
            build_info: gauge(
                "datapath_build_info",
                "Build of the running datapathd (always 1).",
                &["version"],
            ),
            module_up: gauge(
                "datapath_module_up",
                "Whether the module is loaded, attached and reconciled (1) or not (0).",
                &["module"],
            ),
            module_enabled: gauge(
                "datapath_module_enabled",
                "Whether the configuration enables the module.",
                &["module"],
            ),
            feature: gauge(
                "datapath_feature",
                "Kernel features probed at start (1 available, 0 missing or forced off).",
                &["name"],
            ),
            ready: gauge("datapath_ready", "Whether /readyz answers ready.", &[]),
            reloads: counter(
                "datapath_config_reloads_total",
                "Configuration reloads applied since start.",
                &[],
            ),
            reload_failures: counter(
                "datapath_config_reload_failures_total",
                "Configuration reloads refused since start (the running configuration stayed).",
                &[],
            ),
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

    fn collectors(&self) -> Vec<&dyn Collector> {
        vec![
            &self.build_info,
            &self.module_up,
            &self.module_enabled,
            &self.feature,
            &self.ready,
            &self.reloads,
            &self.reload_failures,
            &self.interface_attached,
            &self.interface_packets,
            &self.interface_bytes,
            &self.service_packets,
            &self.service_bytes,
            &self.backend_packets,
            &self.backend_bytes,
            &self.outcomes,
            &self.drops,
            &self.map_entries,
            &self.map_capacity,
            &self.prog_runs,
            &self.prog_run_seconds,
        ]
    }
}

/// Reads everything from the runtime and the BPF maps at scrape time.
pub struct DatapathCollector {
    runtime: Arc<Runtime>,
    descs: Vec<Desc>,
}

impl DatapathCollector {
    pub fn new(runtime: Arc<Runtime>) -> Self {
        let families = Families::new();
        let descs = families
            .collectors()
            .into_iter()
            .flat_map(|c| c.desc().into_iter().cloned())
            .collect();
        Self { runtime, descs }
    }

    fn fill(&self, f: &Families) {
        let rt = &self.runtime;
        f.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let snap = rt.snapshot();
        for module in Module::ALL {
            let (enabled, up) = snap
                .modules
                .iter()
                .find(|(m, _, _)| *m == module)
                .map(|(_, e, u)| (*e, *u))
                .unwrap_or((false, false));
            f.module_up
                .with_label_values(&[module.name()])
                .set(i64::from(up));
            f.module_enabled
                .with_label_values(&[module.name()])
                .set(i64::from(enabled));
        }
        for feature in Feature::ALL {
            f.feature
                .with_label_values(&[feature.name()])
                .set(i64::from(snap.features.available(feature)));
        }
        f.ready
            .with_label_values::<&str>(&[])
            .set(i64::from(rt.ready.load(Ordering::SeqCst)));
        f.reloads
            .with_label_values::<&str>(&[])
            .inc_by(rt.reloads.load(Ordering::SeqCst));
        f.reload_failures
            .with_label_values::<&str>(&[])
            .inc_by(rt.reload_failures.load(Ordering::SeqCst));

        // The collector runs on the blocking pool (see `metrics`), where waiting for the
        // controller is allowed.
        let ctl = rt.ctl.blocking_lock();
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
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the datapath counters for a scrape"),
        }
        for usage in dp.map_usage() {
            f.map_entries
                .with_label_values(&[usage.name])
                .set(usage.entries as i64);
            f.map_capacity
                .with_label_values(&[usage.name])
                .set(usage.capacity as i64);
        }
        if snap.prog_stats_up {
            match dp.program_info() {
                Ok(info) => {
                    f.prog_runs
                        .with_label_values(&[crate::dataplane::PROGRAM_LB])
                        .inc_by(info.run_count());
                    f.prog_run_seconds
                        .with_label_values(&[crate::dataplane::PROGRAM_LB])
                        .set(info.run_time().as_secs_f64());
                }
                Err(e) => tracing::warn!(error = %e, "cannot read xdp_lb's program info"),
            }
        }
    }
}

impl Collector for DatapathCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let families = Families::new();
        self.fill(&families);
        families
            .collectors()
            .into_iter()
            .flat_map(|c| c.collect())
            .filter(|mf| !mf.get_metric().is_empty())
            .collect()
    }
}

/// The registry the endpoint serves.
pub fn registry(runtime: Arc<Runtime>) -> Result<Registry> {
    let registry = Registry::new();
    registry
        .register(Box::new(DatapathCollector::new(Arc::clone(&runtime))))
        .map_err(|e| Error::InvalidArgument(format!("metrics registry: {e}")))?;
    registry
        .register(Box::new(crate::policyd::PolicyCollector::new(runtime)))
        .map_err(|e| Error::InvalidArgument(format!("metrics registry: {e}")))?;
    Ok(registry)
}

#[derive(Clone)]
struct HttpState {
    runtime: Arc<Runtime>,
    registry: Registry,
}

async fn metrics(State(s): State<HttpState>) -> impl IntoResponse {
    let registry = s.registry.clone();
    let body = tokio::task::spawn_blocking(move || {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&registry.gather(), &mut buf)
            .map(|()| buf)
    })
    .await;
    match body {
        Ok(Ok(buf)) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
            buf,
        )
            .into_response(),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<HttpState>) -> (StatusCode, String) {
    if s.runtime.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready\n".into())
    } else {
        let why = s
            .runtime
            .not_ready_reason
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default();
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
    }
}

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| Error::io(format!("cannot listen for metrics on {addr}"), e))
}

/// Serves `/metrics`, `/healthz` and `/readyz` until the task is dropped.
pub async fn serve(listener: TcpListener, runtime: Arc<Runtime>) -> Result<()> {
    let registry = registry(runtime.clone())?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(HttpState { runtime, registry });
    axum::serve(listener, app)
        .await
        .map_err(|e| Error::io("serving metrics", e))
}
