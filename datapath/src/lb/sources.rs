//! The load balancer's side of the service sources (the services file, Kubernetes): the typed
//! handle they apply their desired services through ([`ServiceSink`], published on the bus),
//! the state each publishes about itself ([`SourceState`]), and the `GET /v1/sources` route and
//! metrics over those states.
use std::{sync::Arc, time::Instant};

use axum::{Json, Router, extract::State, routing::get};
use datapath_api::{
    DeclaredService, RejectedService, ServiceSource, SourceStatus, SourcesView, routes,
};
use prometheus::{GaugeVec, IntCounterVec, IntGaugeVec, Opts};

use super::{
    LbPlane,
    store::{Durability, SourceReport},
};
use crate::{
    Error, Result,
    bus::{Bus, StateReader, StateWriter},
    metrics::{self, FamilyCollector, counter, gauge},
    server::SharedController,
};

/// Bus state: the handle sources apply through (`None` until the lb controller exists).
pub const SERVICE_SINK: &str = "lb.service_sink";

/// Bus state each source publishes about itself.
pub fn status_state(source: ServiceSource) -> &'static str {
    match source {
        ServiceSource::Api => "sources.api",
        ServiceSource::File => "sources.file",
        ServiceSource::Kubernetes => "sources.kubernetes",
    }
}

/// The sources that publish a state (the API has none: it is always there).
pub const SOURCES: [ServiceSource; 2] = [ServiceSource::File, ServiceSource::Kubernetes];

/// How a source hands its whole desired state to the load balancer.
#[derive(Clone)]
pub struct ServiceSink {
    ctl: SharedController<LbPlane>,
}

impl ServiceSink {
    pub(super) fn new(ctl: SharedController<LbPlane>) -> Self {
        Self { ctl }
    }

    /// Makes `source`'s services (of the owners in `scope`, or all) exactly `declared` (see
    /// `Store::replace_source`); answers
    /// what changed and how many services the source owns now.
    pub async fn replace(
        &self,
        source: ServiceSource,
        scope: Option<std::collections::BTreeSet<String>>,
        declared: Vec<DeclaredService>,
        durability: Durability,
    ) -> Result<(SourceReport, usize)> {
        let mut guard = Arc::clone(&self.ctl).lock_owned().await;
        tokio::task::spawn_blocking(move || {
            let report = guard.replace_source(source, scope.as_ref(), declared, durability)?;
            let owned = guard
                .store()
                .state()
                .services
                .values()
                .filter(|s| s.source == source)
                .count();
            Ok((report, owned))
        })
        .await
        .map_err(|e| Error::Internal(format!("applying the {source} source's services: {e}")))?
    }
}

impl ServiceSink {
    /// Writes the state file if a deferred batch left it behind.
    ///
    /// The copy is taken under the controller lock; the write is done outside it, so an
    /// endpoint change meanwhile is not held behind the file, on a thread of its own at the
    /// lowest CPU priority: encoding a state of 10,000 services takes tens of milliseconds of
    /// a CPU that the changes need more.
    pub async fn flush(&self) -> Result<()> {
        let ctl = Arc::clone(&self.ctl);
        let pending = tokio::task::spawn_blocking(move || ctl.blocking_lock().take_unsaved())
            .await
            .map_err(|e| Error::Internal(format!("saving the services: {e}")))?;
        let Some(pending) = pending else {
            return Ok(());
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("state-writer".into())
            .spawn(move || {
                // SAFETY: plain syscalls on this thread (Linux applies nice per thread).
                unsafe {
                    let tid = libc::gettid() as libc::id_t;
                    libc::setpriority(libc::PRIO_PROCESS, tid, 19);
                }
                let _ = tx.send(pending.write());
            })
            .map_err(|e| Error::io("start the state-file writer", e))?;
        let written = rx
            .await
            .map_err(|_| Error::Internal("the state-file writer stopped".into()))?;
        if written.is_err() {
            self.ctl.lock().await.mark_unsaved();
        }
        written
    }
}

/// What a source publishes about itself: its status, and when it last applied.
#[derive(Clone, Debug, Default)]
pub struct SourceState {
    pub status: SourceStatus,
    pub last_sync: Option<Instant>,
}

impl SourceState {
    /// The status as the API shows it, with the age of the last sync as of now.
    pub fn view(&self) -> SourceStatus {
        let mut status = self.status.clone();
        status.last_sync_age_seconds = self.last_sync.map(|t| t.elapsed().as_secs_f64());
        status
    }
}

/// A source's own bookkeeping of its [`SourceState`].
pub struct SourceTracker {
    writer: StateWriter<SourceState>,
}

impl SourceTracker {
    pub fn new(bus: &Bus, source: ServiceSource) -> Result<Self> {
        let writer = bus.state::<SourceState>(status_state(source))?.writer()?;
        writer.modify(|s| s.status.source = source);
        Ok(Self { writer })
    }

    /// Turned on or off (by the configuration), reading from `location`.
    pub fn configured(&self, enabled: bool, location: Option<String>) {
        self.writer.modify(|s| {
            s.status.enabled = enabled;
            s.status.location = location;
        });
    }

    /// A successful apply of `objects` objects, with what was skipped and noted.
    pub fn applied(
        &self,
        report: &SourceReport,
        owned: usize,
        objects: usize,
        skipped: Vec<datapath_api::SkippedObject>,
        notes: Vec<String>,
    ) {
        self.writer.modify(|s| {
            s.status.synced = true;
            s.status.syncs += 1;
            s.status.services = owned as u64;
            s.status.objects = objects as u64;
            s.status.skipped = skipped;
            s.status.notes = notes;
            s.status.rejected = report
                .rejected
                .iter()
                .map(|r| RejectedService {
                    service: r.key.to_string(),
                    owner: r.owner.clone(),
                    reason: r.reason.clone(),
                })
                .collect();
            s.status.last_error = None;
            s.last_sync = Some(Instant::now());
        });
    }

    /// A failed read or apply: the services applied before keep serving.
    pub fn failed(&self, error: impl Into<String>) {
        let error = error.into();
        self.writer.modify(|s| {
            s.status.sync_errors += 1;
            s.status.last_error = Some(error);
        });
    }

    pub fn current(&self) -> SourceState {
        (*self.writer.current()).clone()
    }
}

/// Readers of every source's state.
#[derive(Clone)]
pub(super) struct SourceReaders(Vec<StateReader<SourceState>>);

impl SourceReaders {
    pub(super) fn new(bus: &Bus) -> Result<Self> {
        SOURCES
            .iter()
            .map(|s| Ok(bus.state::<SourceState>(status_state(*s))?.reader()))
            .collect::<Result<Vec<_>>>()
            .map(Self)
    }

    fn view(&self) -> SourcesView {
        SourcesView {
            sources: self.0.iter().map(|r| r.get().view()).collect(),
        }
    }
}

pub(super) fn router(readers: SourceReaders) -> Router {
    Router::new()
        .route(routes::SOURCES, get(list_sources))
        .with_state(readers)
}

async fn list_sources(State(readers): State<SourceReaders>) -> Json<SourcesView> {
    Json(readers.view())
}

pub(super) struct SourceFamilies {
    enabled: IntGaugeVec,
    synced: IntGaugeVec,
    syncs: IntCounterVec,
    errors: IntCounterVec,
    age: GaugeVec,
    services: IntGaugeVec,
    rejected: IntGaugeVec,
    skipped: IntGaugeVec,
}

impl metrics::Families for SourceFamilies {
    fn new() -> Self {
        let by = &["source"];
        Self {
            enabled: gauge(
                "datapath_source_enabled",
                "Whether the service source is configured.",
                by,
            ),
            synced: gauge(
                "datapath_source_synced",
                "Whether the source has applied its services since the daemon started.",
                by,
            ),
            syncs: counter(
                "datapath_source_syncs_total",
                "Successful applies of the source's services.",
                by,
            ),
            errors: counter(
                "datapath_source_sync_errors_total",
                "Failed reads or applies of the source (the services applied before keep \
                 serving).",
                by,
            ),
            age: GaugeVec::new(
                Opts::new(
                    "datapath_source_last_sync_age_seconds",
                    "Seconds since the source's last successful apply.",
                ),
                by,
            )
            .expect("valid metric definition"),
            services: gauge(
                "datapath_source_services",
                "Services (frontends) the source owns in the load balancer.",
                by,
            ),
            rejected: gauge(
                "datapath_source_rejected_services",
                "Services the source declared that were not applied at its last apply.",
                by,
            ),
            skipped: gauge(
                "datapath_source_skipped_objects",
                "Objects the source read and made no service of (headless, ExternalName, no \
                 address).",
                by,
            ),
        }
    }

    fn all(&self) -> Vec<&dyn prometheus::core::Collector> {
        vec![
            &self.enabled,
            &self.synced,
            &self.syncs,
            &self.errors,
            &self.age,
            &self.services,
            &self.rejected,
            &self.skipped,
        ]
    }
}

pub(super) fn collector(readers: SourceReaders) -> FamilyCollector<SourceFamilies> {
    FamilyCollector::new(move |f: &SourceFamilies| {
        for s in readers.view().sources {
            let l = [s.source.as_str()];
            f.enabled.with_label_values(&l).set(i64::from(s.enabled));
            if !s.enabled {
                continue;
            }
            f.synced.with_label_values(&l).set(i64::from(s.synced));
            f.syncs.with_label_values(&l).inc_by(s.syncs);
            f.errors.with_label_values(&l).inc_by(s.sync_errors);
            if let Some(age) = s.last_sync_age_seconds {
                f.age.with_label_values(&l).set(age);
            }
            f.services.with_label_values(&l).set(s.services as i64);
            f.rejected
                .with_label_values(&l)
                .set(s.rejected.len() as i64);
            f.skipped.with_label_values(&l).set(s.skipped.len() as i64);
        }
    })
}
