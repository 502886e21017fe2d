//! The `prog_stats` controller: keeps the kernel's BPF run-time statistics on
//! (`BPF_ENABLE_STATS`) while it runs, so the other controllers can export their programs' run
//! counts and times. Publishes whether they are on as the state [`ENABLED`].
use std::{
    os::fd::OwnedFd,
    sync::{Arc, Mutex},
};

use tracing::info;

use crate::{
    Error, Result,
    bus::{Bus, StateWriter},
    config::Settings,
    controller::{self, Cancel, Controller, Health, Prepared, Requirements, RunFuture},
    features::{Capability, Feature},
};

pub const NAME: &str = "prog_stats";
/// State: `true` while kernel BPF statistics are on.
pub const ENABLED: &str = "prog_stats.enabled";

fn enable_bpf_stats() -> Result<OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(|e| {
        Error::io(
            "enable BPF run-time statistics (BPF_ENABLE_STATS)",
            std::io::Error::other(e.to_string()),
        )
    })
}

struct Inner {
    /// Keeps `kernel.bpf_stats_enabled` on while held.
    fd: Option<OwnedFd>,
    health: Health,
}

pub struct ProgStats {
    inner: Mutex<Inner>,
    enabled: StateWriter<bool>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ProgStats {
    pub fn new(bus: &Bus) -> Result<Arc<Self>> {
        Ok(Arc::new(Self {
            inner: Mutex::new(Inner {
                fd: None,
                health: Health::default(),
            }),
            enabled: bus.state::<bool>(ENABLED)?.writer()?,
        }))
    }

    fn apply(&self, settings: &Settings, blocker: Option<String>, fd: Option<OwnedFd>) -> bool {
        let mut inner = lock(&self.inner);
        let reason = if !settings.prog_stats.enabled {
            Some("disabled by the configuration".to_string())
        } else {
            blocker
        };
        let changed = inner.fd.is_some() != (reason.is_none());
        if reason.is_none() {
            if let Some(fd) = fd {
                inner.fd = Some(fd);
            }
        } else {
            inner.fd = None;
        }
        let up = inner.fd.is_some();
        inner.health = Health {
            enabled: settings.prog_stats.enabled,
            up,
            reason: if up { None } else { reason },
        };
        self.enabled.publish(up);
        changed
    }
}

/// A prepared reload: the new statistics descriptor (or none to turn them off).
struct Change {
    ctl: Arc<ProgStats>,
    settings: Settings,
    blocker: Option<String>,
    fd: Option<OwnedFd>,
}

impl Prepared for Change {
    fn commit(self: Box<Self>) -> Vec<String> {
        let changed = self.ctl.apply(&self.settings, self.blocker, self.fd);
        let up = lock(&self.ctl.inner).fd.is_some();
        match (changed, up) {
            (true, true) => vec!["module prog_stats up".into()],
            (true, false) => vec!["module prog_stats off".into()],
            _ => Vec::new(),
        }
    }

    fn rollback(self: Box<Self>) {
        // Dropping the unused descriptor undoes the enable.
    }
}

impl Controller for ProgStats {
    fn name(&self) -> &'static str {
        NAME
    }

    fn requirements(&self) -> Requirements {
        Requirements {
            features: &[Feature::BpfStats],
            // BPF_ENABLE_STATS is restricted to CAP_SYS_ADMIN.
            capabilities: &[Capability::SysAdmin],
        }
    }

    fn enabled(&self, settings: &Settings) -> bool {
        settings.prog_stats.enabled
    }

    fn start(&self, settings: &Settings, blocker: Option<String>) -> Result<()> {
        let fd = if settings.prog_stats.enabled && blocker.is_none() {
            let fd = enable_bpf_stats()?;
            info!("module prog_stats up: kernel BPF statistics enabled");
            Some(fd)
        } else {
            None
        };
        self.apply(settings, blocker, fd);
        Ok(())
    }

    fn prepare(
        self: Arc<Self>,
        settings: &Settings,
        blocker: Option<String>,
    ) -> Result<Box<dyn Prepared>> {
        let wanted = settings.prog_stats.enabled && blocker.is_none();
        let have = lock(&self.inner).fd.is_some();
        // The only step that can fail, done now; turning off waits for the commit.
        let fd = if wanted && !have {
            Some(enable_bpf_stats()?)
        } else {
            None
        };
        Ok(Box::new(Change {
            ctl: self,
            settings: settings.clone(),
            blocker,
            fd,
        }))
    }

    fn run(self: Arc<Self>, cancel: Cancel) -> RunFuture {
        controller::idle(cancel)
    }

    fn health(&self) -> Health {
        lock(&self.inner).health.clone()
    }
}
