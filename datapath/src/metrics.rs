//! Prometheus metrics, `/healthz` and `/readyz` on a TCP listener (default `:9477`), apart
//! from the root-only API socket.
//!
//! The registry holds the daemon's own families (controllers, features, reloads, the bus) and
//! every controller's collectors. The datapath's counters live in per-CPU BPF maps; the
//! controllers read them when Prometheus scrapes, summed over CPUs: nothing is cached or
//! accumulated in the daemon, so a restarted daemon reports the same totals as the maps hold
//! (they survive the restart pinned), never counting a packet twice. No scrape walks a BPF
//! map entry by entry.
use std::{net::SocketAddr, sync::Arc, sync::atomic::Ordering};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use prometheus::{
    Encoder, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
    core::{Collector, Desc},
    proto::MetricFamily,
};
use tokio::net::TcpListener;

use crate::{
    error::{Error, Result},
    features::Feature,
    supervisor::Supervisor,
};

/// An integer counter family (the definitions are constants: a bad one is a bug).
pub fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition")
}

/// An integer gauge family.
pub fn gauge(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition")
}

/// The metric families one collector fills at every scrape, built fresh every time (so a
/// label that is gone disappears, and counters are read from the source, never accumulated).
pub trait Families: Send + Sync + 'static {
    fn new() -> Self;
    fn all(&self) -> Vec<&dyn Collector>;
}

/// A [`Collector`] over [`Families`] and the function that fills them.
pub struct FamilyCollector<F: Families> {
    descs: Vec<Desc>,
    fill: Box<dyn Fn(&F) + Send + Sync>,
}

impl<F: Families> FamilyCollector<F> {
    pub fn new(fill: impl Fn(&F) + Send + Sync + 'static) -> Self {
        let descs = F::new()
            .all()
            .into_iter()
            .flat_map(|c| c.desc().into_iter().cloned())
            .collect();
        Self {
            descs,
            fill: Box::new(fill),
        }
    }
}

impl<F: Families> Collector for FamilyCollector<F> {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let families = F::new();
        (self.fill)(&families);
        families
            .all()
            .into_iter()
            .flat_map(|c| c.collect())
            .filter(|mf| !mf.get_metric().is_empty())
            .collect()
    }
}

/// The daemon's own families: build, controllers, features, readiness, reloads, the bus.
struct DaemonFamilies {
    build_info: IntGaugeVec,
    module_up: IntGaugeVec,
    module_enabled: IntGaugeVec,
    restarts: IntCounterVec,
    feature: IntGaugeVec,
    ready: IntGaugeVec,
    reloads: IntCounterVec,
    reload_failures: IntCounterVec,
    bus_published: IntCounterVec,
    bus_delivered: IntCounterVec,
    bus_lost: IntCounterVec,
}

impl Families for DaemonFamilies {
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
            restarts: counter(
                "datapath_controller_restarts_total",
                "Times the supervisor restarted the controller's run loop after a failure.",
                &["controller"],
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
            bus_published: counter(
                "datapath_bus_events_published_total",
                "Events published on the bus topic.",
                &["topic"],
            ),
            bus_delivered: counter(
                "datapath_bus_events_delivered_total",
                "Events of the bus topic taken by the subscriber.",
                &["topic", "subscriber"],
            ),
            bus_lost: counter(
                "datapath_bus_events_lost_total",
                "Events of the bus topic the subscriber lost because it fell behind.",
                &["topic", "subscriber"],
            ),
        }
    }

    fn all(&self) -> Vec<&dyn Collector> {
        vec![
            &self.build_info,
            &self.module_up,
            &self.module_enabled,
            &self.restarts,
            &self.feature,
            &self.ready,
            &self.reloads,
            &self.reload_failures,
            &self.bus_published,
            &self.bus_delivered,
            &self.bus_lost,
        ]
    }
}

fn fill_daemon(sup: &Supervisor, f: &DaemonFamilies) {
    f.build_info
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1);
    for report in sup.reports() {
        f.module_up
            .with_label_values(&[report.name])
            .set(i64::from(report.health.up));
        f.module_enabled
            .with_label_values(&[report.name])
            .set(i64::from(report.health.enabled));
        f.restarts
            .with_label_values(&[report.name])
            .inc_by(report.restarts);
    }
    let features = sup.features();
    for feature in Feature::ALL {
        f.feature
            .with_label_values(&[feature.name()])
            .set(i64::from(features.available(feature)));
    }
    f.ready
        .with_label_values::<&str>(&[])
        .set(i64::from(sup.not_ready().is_none()));
    f.reloads
        .with_label_values::<&str>(&[])
        .inc_by(sup.reloads.load(Ordering::SeqCst));
    f.reload_failures
        .with_label_values::<&str>(&[])
        .inc_by(sup.reload_failures.load(Ordering::SeqCst));
    for topic in sup.bus().topic_stats() {
        f.bus_published
            .with_label_values(&[topic.name()])
            .inc_by(topic.published());
        for (subscriber, counts) in topic.subscribers() {
            f.bus_delivered
                .with_label_values(&[topic.name(), subscriber])
                .inc_by(counts.delivered);
            f.bus_lost
                .with_label_values(&[topic.name(), subscriber])
                .inc_by(counts.lost);
        }
    }
}

/// The registry the endpoint serves: the daemon's families and every controller's.
pub fn registry(sup: &Arc<Supervisor>) -> Result<Registry> {
    let registry = Registry::new();
    let register = |c: Box<dyn Collector>| {
        registry
            .register(c)
            .map_err(|e| Error::Internal(format!("metrics registry: {e}")))
    };
    let me = Arc::clone(sup);
    register(Box::new(FamilyCollector::new(move |f: &DaemonFamilies| {
        fill_daemon(&me, f)
    })))?;
    for controller in sup.controllers() {
        for collector in Arc::clone(controller).collectors() {
            register(collector)?;
        }
    }
    Ok(registry)
}

#[derive(Clone)]
struct HttpState {
    sup: Arc<Supervisor>,
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
    match s.sup.not_ready() {
        None => (StatusCode::OK, "ready\n".into()),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| Error::io(format!("cannot listen for metrics on {addr}"), e))
}

/// Serves `/metrics`, `/healthz` and `/readyz` until the task is dropped.
pub async fn serve(listener: TcpListener, sup: Arc<Supervisor>) -> Result<()> {
    let registry = registry(&sup)?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(HttpState { sup, registry });
    axum::serve(listener, app)
        .await
        .map_err(|e| Error::io("serving metrics", e))
}
