//! The running daemon's modules: the XDP load balancer (which may be off: disabled by the
//! configuration or missing a kernel feature) and program statistics; configuration reloads
//! that apply the difference between two [`Settings`]; the status `lb-ctl status` shows.
use std::{
    collections::BTreeMap,
    os::fd::OwnedFd,
    sync::{
        Arc, Mutex as StdMutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use datapath_api::{
    DesiredState, InterfaceStatus, ModuleStatus, ServiceSpec, StatsSnapshot, StatusView,
};
use tracing::{info, warn};

use crate::{
    api::{PlaneStats, SharedController},
    config::{self, Settings, Source},
    dataplane::{Dataplane, DataplaneConfig},
    error::{Error, Result},
    features::{Features, Module},
    state::ServicePlane,
};

/// The load balancer module: the attached dataplane, or why there is none.
pub struct LbPlane {
    dp: Option<Dataplane>,
    off_reason: String,
}

impl LbPlane {
    pub fn on(dp: Dataplane) -> Self {
        Self {
            dp: Some(dp),
            off_reason: String::new(),
        }
    }

    pub fn off(reason: impl Into<String>) -> Self {
        Self {
            dp: None,
            off_reason: reason.into(),
        }
    }

    pub fn dataplane(&self) -> Option<&Dataplane> {
        self.dp.as_ref()
    }

    pub fn dataplane_mut(&mut self) -> Option<&mut Dataplane> {
        self.dp.as_mut()
    }

    fn require(&mut self) -> Result<&mut Dataplane> {
        let reason = &self.off_reason;
        self.dp.as_mut().ok_or_else(|| {
            Error::Unavailable(format!("module lb is off ({reason}); see `lb-ctl status`"))
        })
    }
}

impl ServicePlane for LbPlane {
    fn apply_service(&mut self, s: &ServiceSpec) -> Result<()> {
        self.require()?.apply_service(s)
    }

    fn remove_service(&mut self, s: &ServiceSpec) -> Result<()> {
        self.require()?.remove_service(s)
    }
}

impl PlaneStats for LbPlane {
    fn stats(&self) -> Result<StatsSnapshot> {
        match &self.dp {
            Some(dp) => dp.stats(),
            None => Ok(StatsSnapshot::default()),
        }
    }

    fn table_entries(&self, service_id: u32) -> Result<BTreeMap<u32, u32>> {
        match &self.dp {
            Some(dp) => dp.table_entries(service_id),
            None => Ok(BTreeMap::new()),
        }
    }
}

/// Status of one module.
#[derive(Clone, Debug)]
struct ModuleState {
    enabled: bool,
    up: bool,
    reason: Option<String>,
}

/// What the daemon shares between the API, the metrics endpoint and the reload task.
pub struct Runtime {
    pub ctl: SharedController<LbPlane>,
    pub config_file: Option<std::path::PathBuf>,
    /// Set once every enabled module is up after start (and kept in step with reloads).
    pub ready: AtomicBool,
    /// Why the daemon is not ready yet.
    pub not_ready_reason: StdMutex<String>,
    pub reloads: AtomicU64,
    pub reload_failures: AtomicU64,
    /// The policy module (set once at start).
    pub policy: std::sync::OnceLock<Arc<crate::policyd::PolicyModule>>,
    inner: StdMutex<Inner>,
}

struct Inner {
    settings: Settings,
    features: Features,
    modules: BTreeMap<Module, ModuleState>,
    last_reload_error: Option<String>,
    /// Keeps `kernel.bpf_stats_enabled` on while held (prog_stats module).
    stats_fd: Option<OwnedFd>,
}

/// What the metrics collector needs besides the controller.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub modules: Vec<(Module, bool, bool)>,
    pub features: Features,
    pub prog_stats_up: bool,
}

fn enable_bpf_stats() -> Result<OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(|e| {
        Error::io(
            "enable BPF run-time statistics (BPF_ENABLE_STATS)",
            std::io::Error::other(e.to_string()),
        )
    })
}

impl Runtime {
    /// The runtime before the load balancer is started: the controller holds an `LbPlane`
    /// that is off ("starting") until [`Runtime::start_modules`].
    pub fn new(
        ctl: SharedController<LbPlane>,
        settings: Settings,
        features: Features,
        config_file: Option<std::path::PathBuf>,
    ) -> Arc<Self> {
        Arc::new(Self {
            ctl,
            config_file,
            ready: AtomicBool::new(false),
            not_ready_reason: StdMutex::new("starting".into()),
            reloads: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
            policy: std::sync::OnceLock::new(),
            inner: StdMutex::new(Inner {
                settings,
                features,
                modules: BTreeMap::new(),
                last_reload_error: None,
                stats_fd: None,
            }),
        })
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn settings(&self) -> Settings {
        self.inner().settings.clone()
    }

    pub fn set_not_ready(&self, reason: impl Into<String>) {
        *self
            .not_ready_reason
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = reason.into();
        self.ready.store(false, Ordering::SeqCst);
    }

    /// Brings every enabled module up (at start, under the controller lock): the load
    /// balancer is loaded, attached to `interfaces` and reconciled with `state`. A module
    /// whose feature or capability is missing is left off with its reason; an error starting
    /// an available module is returned.
    pub fn start_modules(
        &self,
        plane: &mut LbPlane,
        interfaces: &[String],
        state: &DesiredState,
    ) -> Result<()> {
        let mut inner = self.inner();
        let settings = inner.settings.clone();
        let features = inner.features.clone();
        for module in Module::ALL {
            let enabled = settings.module_enabled(module);
            let blocker = features.blocker(module);
            let state_of = if !enabled {
                ModuleState {
                    enabled,
                    up: false,
                    reason: Some("disabled by the configuration".into()),
                }
            } else if let Some(why) = blocker {
                warn!(module = module.name(), reason = %why, "module disabled");
                ModuleState {
                    enabled,
                    up: false,
                    reason: Some(why),
                }
            } else {
                match module {
                    Module::Lb => {
                        let mut config = settings.dataplane_config();
                        config.interfaces = interfaces.to_vec();
                        let mut dp = Dataplane::start(&config)?;
                        dp.reconcile(state)?;
                        info!(interfaces = ?interfaces, services = state.services.len(),
                              "module lb up: XDP load balancer attached and reconciled");
                        *plane = LbPlane::on(dp);
                    }
                    Module::ProgStats => {
                        inner.stats_fd = Some(enable_bpf_stats()?);
                        info!("module prog_stats up: kernel BPF statistics enabled");
                    }
                }
                ModuleState {
                    enabled,
                    up: true,
                    reason: None,
                }
            };
            if module == Module::Lb && !state_of.up {
                *plane = LbPlane::off(state_of.reason.clone().unwrap_or_default());
            }
            inner.modules.insert(module, state_of);
        }
        Ok(())
    }

    /// Marks the daemon ready (every enabled module that can run is up).
    pub fn mark_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }

    pub fn snapshot(&self) -> Snapshot {
        let inner = self.inner();
        Snapshot {
            modules: inner
                .modules
                .iter()
                .map(|(m, s)| (*m, s.enabled, s.up))
                .collect(),
            features: inner.features.clone(),
            prog_stats_up: inner.stats_fd.is_some(),
        }
    }

    /// Everything `GET /v1/status` shows, but the interfaces (filled by the caller, which
    /// holds the controller).
    pub fn status(&self, plane: &LbPlane) -> StatusView {
        let inner = self.inner();
        StatusView {
            version: env!("CARGO_PKG_VERSION").to_string(),
            ready: self.ready.load(Ordering::SeqCst),
            config_file: self.config_file.as_ref().map(|p| p.display().to_string()),
            config_reloads: self.reloads.load(Ordering::SeqCst),
            config_reload_failures: self.reload_failures.load(Ordering::SeqCst),
            last_reload_error: inner.last_reload_error.clone(),
            interfaces: plane
                .dataplane()
                .map(|dp| {
                    dp.interfaces()
                        .into_iter()
                        .map(|(name, mode)| InterfaceStatus {
                            name,
                            xdp_mode: mode.name().to_string(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            modules: inner
                .modules
                .iter()
                .map(|(m, s)| ModuleStatus {
                    name: m.name().to_string(),
                    enabled: s.enabled,
                    up: s.up,
                    reason: s.reason.clone(),
                })
                .collect(),
            features: inner.features.views(),
        }
    }

    /// Reads the configuration file again and applies the difference. A refused reload
    /// (invalid file, a key that needs a restart, a failed attachment) leaves the running
    /// configuration in force, is logged, counted, and shown by `lb-ctl status`.
    pub fn reload(&self, plane: &mut LbPlane, state: &DesiredState, overrides: &config::Overrides) {
        let result = self.try_reload(plane, state, overrides);
        match result {
            Ok(changes) => {
                self.reloads.fetch_add(1, Ordering::SeqCst);
                self.inner().last_reload_error = None;
                info!(changes = %changes, "configuration reloaded");
            }
            Err(e) => {
                self.reload_failures.fetch_add(1, Ordering::SeqCst);
                let text = e.to_string();
                tracing::error!(error = %text, "configuration reload refused; the running configuration stays in force");
                self.inner().last_reload_error = Some(text);
            }
        }
    }

    fn try_reload(
        &self,
        plane: &mut LbPlane,
        state: &DesiredState,
        overrides: &config::Overrides,
    ) -> Result<String> {
        let path = self
            .config_file
            .clone()
            .ok_or_else(|| Error::InvalidArgument("no configuration file to reload".into()))?;
        let source = Source::read(&path)?;
        let new = Settings::resolve(Some(&source), overrides)?;
        let old = self.settings();
        let restart_only = old.restart_only_changes(&new);
        if !restart_only.is_empty() {
            return Err(Error::Config {
                file: path.clone(),
                line: None,
                key: restart_only.join(", "),
                reason: "changes only on restart (kernel map sizes, program constants, open \
                         sockets and files)"
                    .into(),
            });
        }
        let features = self.inner().features.with_force_off(&new.force_off);
        let lb_wanted = new.lb_enabled && features.blocker(Module::Lb).is_none();
        let interfaces = if lb_wanted {
            config::expand_interfaces(&new.interfaces, &config::interface_names(), Some(&source))?
        } else {
            Vec::new()
        };
        let mut changes = Vec::new();

        // The policy module first (loaded, unloaded, its interfaces synced): it can be put back
        // exactly as it was with the old settings, so a load-balancer step that fails below
        // does not leave the policy half of this reload in force.
        let policy_module = self.policy.get();
        if let Some(policy) = policy_module {
            let blocker = crate::policyd::PolicyModule::blocker(&features);
            let said = policy.configure(&new.policy, blocker)?;
            if !said.is_empty() {
                changes.push(said);
            }
        }
        let restore_policy = |e: Error| -> Error {
            if let Some(policy) = policy_module {
                let old_features = self.inner().features.with_force_off(&old.force_off);
                let blocker = crate::policyd::PolicyModule::blocker(&old_features);
                if let Err(undo) = policy.configure(&old.policy, blocker) {
                    tracing::error!(error = %undo, "could not restore the policy module after a refused reload");
                }
            }
            e
        };

        // The load balancer.
        let lb_reason = if !new.lb_enabled {
            Some("disabled by the configuration".to_string())
        } else {
            features.blocker(Module::Lb)
        };
        let lb_result = (|| -> Result<()> {
            match (plane.dataplane_mut(), lb_wanted) {
                (Some(dp), true) => {
                    let current: Vec<String> =
                        dp.interfaces().into_iter().map(|(n, _)| n).collect();
                    let added: Vec<&String> =
                        interfaces.iter().filter(|i| !current.contains(i)).collect();
                    let removed: Vec<&String> =
                        current.iter().filter(|i| !interfaces.contains(i)).collect();
                    // Attach first; undo this reload's attachments if one fails.
                    let mut done: Vec<&String> = Vec::new();
                    for name in &added {
                        if let Err(e) = dp.attach_interface(name) {
                            for d in &done {
                                let _ = dp.detach_interface(d);
                            }
                            return Err(e);
                        }
                        done.push(name);
                        changes.push(format!("attached {name}"));
                    }
                    for name in removed {
                        dp.detach_interface(name)?;
                        changes.push(format!("detached {name}"));
                    }
                }
                (Some(_), false) => {
                    let reason = lb_reason.clone().unwrap_or_default();
                    if let Some(dp) = plane.dataplane_mut() {
                        for (name, _) in dp.interfaces() {
                            dp.detach_interface(&name)?;
                        }
                    }
                    *plane = LbPlane::off(reason.clone());
                    changes.push(format!("module lb off ({reason})"));
                }
                (None, true) => {
                    let config = DataplaneConfig {
                        interfaces: interfaces.clone(),
                        ..new.dataplane_config()
                    };
                    let mut dp = Dataplane::start(&config)?;
                    dp.reconcile(state)?;
                    *plane = LbPlane::on(dp);
                    changes.push("module lb up".into());
                }
                (None, false) => {}
            }
            Ok(())
        })();
        lb_result.map_err(restore_policy)?;

        // Program statistics.
        let stats_wanted = new.prog_stats_enabled && features.blocker(Module::ProgStats).is_none();
        let mut inner = self.inner();
        let stats_reason = if !new.prog_stats_enabled {
            Some("disabled by the configuration".to_string())
        } else {
            features.blocker(Module::ProgStats)
        };
        match (inner.stats_fd.is_some(), stats_wanted) {
            (false, true) => {
                inner.stats_fd = Some(enable_bpf_stats()?);
                changes.push("module prog_stats up".into());
            }
            (true, false) => {
                inner.stats_fd = None;
                changes.push("module prog_stats off".into());
            }
            _ => {}
        }
        inner.modules.insert(
            Module::Lb,
            ModuleState {
                enabled: new.lb_enabled,
                up: plane.dataplane().is_some(),
                reason: if plane.dataplane().is_some() {
                    None
                } else {
                    lb_reason
                },
            },
        );
        let stats_up = inner.stats_fd.is_some();
        inner.modules.insert(
            Module::ProgStats,
            ModuleState {
                enabled: new.prog_stats_enabled,
                up: stats_up,
                reason: if stats_up { None } else { stats_reason },
            },
        );
        inner.features = features;
        inner.settings = new;
        Ok(if changes.is_empty() {
            "none".into()
        } else {
            changes.join(", ")
        })
    }
}
