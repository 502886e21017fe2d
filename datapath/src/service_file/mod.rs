//! The `service_file` controller: the services declared in a YAML file (`service_file.path`),
//! watched with inotify and applied to the load balancer by difference through its
//! [`ServiceSink`]. The file owns the services it declares (source `file`): the API changes
//! them only when forced, and a service the file no longer declares is removed.
//!
//! An invalid file is refused whole, with its line and key, in the log, `lb-ctl sources` and
//! the metrics; what the file declared before keeps serving. A missing file is an error of the
//! same kind (it may be being replaced), not an empty declaration: an empty file removes the
//! file's services.
pub mod parse;

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use datapath_api::ServiceSource;
use tracing::{info, warn};

use crate::{
    Result,
    bus::{Bus, StateReader},
    config::Settings,
    controller::{Cancel, Controller, Health, Prepared, RunFuture},
    lb::{
        sources::{SERVICE_SINK, ServiceSink, SourceTracker},
        store::Durability,
    },
    watch::FileWatch,
};

/// The controller's name: status and logs.
pub const NAME: &str = "service_file";

/// Longest wait between retries of an apply the load balancer refused (it is off, or its
/// state file cannot be written).
const MAX_RETRY: Duration = Duration::from_secs(30);

/// See the module documentation.
pub struct ServiceFileController {
    path: Mutex<Option<PathBuf>>,
    tracker: SourceTracker,
    sink: StateReader<Option<ServiceSink>>,
    /// Wakes the run loop when a reload changed the path.
    changed: tokio::sync::Notify,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ServiceFileController {
    pub fn new(settings: &Settings, bus: &Bus) -> Result<Arc<Self>> {
        let me = Arc::new(Self {
            path: Mutex::new(settings.service_file.path.clone()),
            tracker: SourceTracker::new(bus, ServiceSource::File)?,
            sink: bus.state(SERVICE_SINK)?.reader(),
            changed: tokio::sync::Notify::new(),
        });
        me.configured(settings);
        Ok(me)
    }

    fn configured(&self, settings: &Settings) {
        let path = settings.service_file.path.clone();
        self.tracker.configured(
            path.is_some(),
            path.as_ref().map(|p| p.display().to_string()),
        );
        *lock(&self.path) = path;
    }

    /// Reads, checks and applies the file once. An error leaves what was applied before.
    async fn apply(&self, path: &Path, text: Option<&[u8]>) -> Result<(), Failure> {
        let text = match text {
            Some(t) => t.to_vec(),
            None => std::fs::read(path).map_err(|e| {
                Failure::Input(format!(
                    "cannot read the services file {}: {e}",
                    path.display()
                ))
            })?,
        };
        let text = String::from_utf8(text).map_err(|_| {
            Failure::Input(format!("services file {}: not UTF-8 text", path.display()))
        })?;
        let declared = parse::parse(path, &text).map_err(|e| Failure::Input(e.to_string()))?;
        let objects = declared.len();
        let sink = (*self.sink.get())
            .clone()
            .ok_or_else(|| Failure::Apply("the load balancer is not running".into()))?;
        let (report, owned) = sink
            .replace(ServiceSource::File, None, declared, Durability::Now)
            .await
            .map_err(|e| Failure::Apply(e.to_string()))?;
        for r in &report.rejected {
            warn!(service = %r.key, owner = %r.owner, reason = %r.reason,
                  "services file: service not applied");
        }
        info!(path = %path.display(), created = report.created, updated = report.updated,
              removed = report.removed, unchanged = report.unchanged,
              rejected = report.rejected.len(), "services file applied");
        self.tracker
            .applied(&report, owned, objects, Vec::new(), Vec::new());
        Ok(())
    }

    /// Applies `path` until it succeeds, with backoff; a change of the file meanwhile restarts
    /// the attempt with the new content.
    async fn follow(&self, path: PathBuf, cancel: &mut Cancel) -> Result<()> {
        let mut watch = FileWatch::new(&path)
            .map_err(|e| crate::Error::io(format!("watch {}", path.display()), e))?;
        let mut pending: Option<Option<Vec<u8>>> = Some(None);
        let mut retry = Duration::from_millis(500);
        loop {
            if let Some(content) = pending.take() {
                match self.apply(&path, content.as_deref()).await {
                    Ok(()) => retry = Duration::from_millis(500),
                    Err(Failure::Input(e)) => {
                        // Waits for the next change of the file.
                        warn!(error = %e, "services file refused; the services it declared before keep serving");
                        self.tracker.failed(e);
                    }
                    Err(Failure::Apply(e)) => {
                        warn!(error = %e, retry_in = ?retry, "services file not applied; retrying");
                        self.tracker.failed(e);
                        pending = Some(None);
                    }
                }
            }
            let wait = if pending.is_some() {
                retry
            } else {
                Duration::MAX
            };
            tokio::select! {
                changed = watch.changed() => {
                    let content = changed
                        .map_err(|e| crate::Error::io(format!("watch {}", path.display()), e))?;
                    pending = Some(Some(content));
                }
                _ = tokio::time::sleep(wait), if pending.is_some() => {
                    retry = (retry * 2).min(MAX_RETRY);
                }
                _ = self.changed.notified() => return Ok(()),
                _ = cancel.cancelled() => return Ok(()),
            }
        }
    }
}

/// Why an apply failed: the file (wait for it to change) or the load balancer (retry).
enum Failure {
    Input(String),
    Apply(String),
}

/// A reload of the path: taken on commit, and the run loop follows the new file.
struct PathChange {
    ctl: Arc<ServiceFileController>,
    settings: Settings,
}

impl Prepared for PathChange {
    fn commit(self: Box<Self>) -> Vec<String> {
        let before = lock(&self.ctl.path).clone();
        self.ctl.configured(&self.settings);
        self.ctl.changed.notify_one();
        match (&before, &self.settings.service_file.path) {
            (a, b) if a == b => Vec::new(),
            (_, Some(p)) => vec![format!("services file {}", p.display())],
            (_, None) => vec!["services file off (its services stay until removed)".into()],
        }
    }

    fn rollback(self: Box<Self>) {}
}

impl Controller for ServiceFileController {
    fn name(&self) -> &'static str {
        NAME
    }

    fn after(&self) -> &'static [&'static str] {
        &[crate::lb::NAME]
    }

    fn enabled(&self, settings: &Settings) -> bool {
        settings.service_file.path.is_some()
    }

    fn start(&self, settings: &Settings, _blocker: Option<String>) -> Result<()> {
        self.configured(settings);
        Ok(())
    }

    fn prepare(
        self: Arc<Self>,
        settings: &Settings,
        _blocker: Option<String>,
    ) -> Result<Box<dyn Prepared>> {
        Ok(Box::new(PathChange {
            ctl: self,
            settings: settings.clone(),
        }))
    }

    fn run(self: Arc<Self>, mut cancel: Cancel) -> RunFuture {
        Box::pin(async move {
            loop {
                let path = lock(&self.path).clone();
                match path {
                    Some(path) => self.follow(path, &mut cancel).await?,
                    None => {
                        tokio::select! {
                            _ = self.changed.notified() => {}
                            _ = cancel.cancelled() => {}
                        }
                    }
                }
                if cancel.is_cancelled() {
                    return Ok(());
                }
            }
        })
    }

    fn health(&self) -> Health {
        let on = lock(&self.path).is_some();
        Health {
            enabled: on,
            up: on,
            reason: if on {
                None
            } else {
                Some("no service_file.path configured".into())
            },
        }
    }
}
