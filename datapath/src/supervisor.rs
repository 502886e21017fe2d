//! The supervisor: starts the controllers in dependency order, owns every task they run,
//! restarts a failed run loop with backoff (and reports it), reloads them all or none, and
//! stops them in reverse order.
use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures_util::FutureExt as _;
use tracing::{error, info, warn};

use crate::{
    Error, Result,
    bus::Bus,
    config::Settings,
    controller::{CancelHandle, Controller, DynController, Health, Prepared},
    features::Features,
};

/// First wait before a failed run loop is started again; doubled at each failure in a row.
const BACKOFF_FIRST: Duration = Duration::from_millis(200);
/// Longest wait between restarts.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A run that lasted this long resets the backoff: its failure is not part of a crash loop.
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(60);
/// The whole shutdown's budget: SIGTERM to exit.
pub const STOP_BUDGET: Duration = Duration::from_secs(4);

/// Environment variable of the fault-injection points, for tests of the supervisor and of
/// two-phase reloads (see docs/architecture.md): `NAME.run=panic-after-ms:N` panics the run
/// loop of controller NAME once, N ms after it first starts; `NAME.prepare=error` makes every
/// reload's prepare of NAME fail.
pub const FAILPOINTS_ENV: &str = "DATAPATH_FAILPOINTS";

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Failpoints {
    panic_after: BTreeMap<String, Duration>,
    prepare_error: Vec<String>,
}

impl Failpoints {
    fn parse(spec: &str) -> std::result::Result<Self, String> {
        let mut fp = Failpoints::default();
        for item in spec
            .split([',', ';'])
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            let (point, action) = item
                .split_once('=')
                .ok_or_else(|| format!("failpoint {item:?}: expected POINT=ACTION"))?;
            let (controller, hook) = point.split_once('.').ok_or_else(|| {
                format!("failpoint {point:?}: expected CONTROLLER.run or CONTROLLER.prepare")
            })?;
            match (hook, action.split_once(':')) {
                ("run", Some(("panic-after-ms", ms))) => {
                    let ms: u64 = ms
                        .parse()
                        .map_err(|_| format!("failpoint {item:?}: {ms:?} is not milliseconds"))?;
                    fp.panic_after
                        .insert(controller.to_string(), Duration::from_millis(ms));
                }
                ("prepare", None) if action == "error" => {
                    fp.prepare_error.push(controller.to_string());
                }
                _ => return Err(format!("failpoint {item:?}: unknown hook or action")),
            }
        }
        Ok(fp)
    }
}

/// What the supervisor knows of one controller.
struct Slot {
    controller: DynController,
    restarts: AtomicU64,
    last_failure: Mutex<Option<String>>,
    cancel: CancelHandle,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One controller as `lb-ctl status` shows it.
#[derive(Clone, Debug)]
pub struct ControllerReport {
    pub name: &'static str,
    pub health: Health,
    pub restarts: u64,
    pub last_failure: Option<String>,
}

/// See the module documentation.
pub struct Supervisor {
    slots: Vec<Arc<Slot>>,
    bus: Arc<Bus>,
    failpoints: Failpoints,
    inner: Mutex<Inner>,
    ready: AtomicBool,
    reload_lock: tokio::sync::Mutex<()>,
    pub reloads: AtomicU64,
    pub reload_failures: AtomicU64,
}

struct Inner {
    settings: Settings,
    features: Features,
    not_ready_reason: String,
    last_reload_error: Option<String>,
}

/// Orders `controllers` so that each comes after those it names in `after()`; refuses a
/// cycle, a duplicate name or an unknown dependency (bugs in the registration).
fn start_order(controllers: Vec<DynController>) -> Result<Vec<DynController>> {
    let mut left = controllers;
    let mut done: Vec<DynController> = Vec::new();
    let mut names: Vec<&str> = left.iter().map(|c| c.name()).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(Error::InvalidArgument(format!(
            "controller {} registered twice",
            w[0]
        )));
    }
    for c in &left {
        if let Some(dep) = c.after().iter().find(|d| !names.contains(d)) {
            return Err(Error::InvalidArgument(format!(
                "controller {} starts after {dep}, which is not registered",
                c.name()
            )));
        }
    }
    while !left.is_empty() {
        let pos = left
            .iter()
            .position(|c| {
                c.after()
                    .iter()
                    .all(|d| done.iter().any(|x| x.name() == *d))
            })
            .ok_or_else(|| {
                Error::InvalidArgument("controllers depend on each other in a cycle".into())
            })?;
        done.push(left.remove(pos));
    }
    Ok(done)
}

impl Supervisor {
    /// The supervisor of `controllers` (registration order does not matter: they are started
    /// in dependency order).
    pub fn new(
        controllers: Vec<DynController>,
        bus: Arc<Bus>,
        settings: Settings,
        features: Features,
    ) -> Result<Arc<Self>> {
        let failpoints = match std::env::var(FAILPOINTS_ENV) {
            Ok(spec) => Failpoints::parse(&spec).map_err(Error::InvalidArgument)?,
            Err(_) => Failpoints::default(),
        };
        if failpoints != Failpoints::default() {
            warn!(failpoints = ?failpoints, "fault injection is on ({FAILPOINTS_ENV}): for tests only");
        }
        let slots = start_order(controllers)?
            .into_iter()
            .map(|controller| {
                Arc::new(Slot {
                    controller,
                    restarts: AtomicU64::new(0),
                    last_failure: Mutex::new(None),
                    cancel: CancelHandle::new(),
                    task: Mutex::new(None),
                })
            })
            .collect();
        Ok(Arc::new(Self {
            slots,
            bus,
            failpoints,
            inner: Mutex::new(Inner {
                settings,
                features,
                not_ready_reason: "starting".into(),
                last_reload_error: None,
            }),
            ready: AtomicBool::new(false),
            reload_lock: tokio::sync::Mutex::new(()),
            reloads: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
        }))
    }

    pub fn bus(&self) -> &Arc<Bus> {
        &self.bus
    }

    pub fn controllers(&self) -> impl Iterator<Item = &DynController> {
        self.slots.iter().map(|s| &s.controller)
    }

    pub fn settings(&self) -> Settings {
        lock(&self.inner).settings.clone()
    }

    pub fn features(&self) -> Features {
        lock(&self.inner).features.clone()
    }

    fn blocker(
        &self,
        c: &dyn Controller,
        features: &Features,
        settings: &Settings,
    ) -> Option<String> {
        if !c.enabled(settings) {
            return None;
        }
        let why = features.blocker_for(&c.requirements());
        if let Some(why) = &why {
            warn!(controller = c.name(), reason = %why, "controller kept off");
        }
        why
    }

    /// Starts every controller in order, then their run loops. The first start that fails
    /// stops the daemon (nothing of the later controllers was touched).
    pub async fn start(self: &Arc<Self>) -> Result<()> {
        for slot in &self.slots {
            let c = Arc::clone(&slot.controller);
            let (settings, features) = {
                let inner = lock(&self.inner);
                (inner.settings.clone(), inner.features.clone())
            };
            self.set_not_ready(format!("starting controller {}", c.name()));
            let blocker = self.blocker(c.as_ref(), &features, &settings);
            let name = c.name();
            tokio::task::spawn_blocking(move || c.start(&settings, blocker))
                .await
                .map_err(|e| Error::Internal(format!("controller {name} panicked at start: {e}")))?
                .map_err(|e| e.context(format!("cannot start controller {name}")))?;
        }
        for slot in &self.slots {
            let task = tokio::spawn(Arc::clone(self).supervise(Arc::clone(slot)));
            *lock(&slot.task) = Some(task);
        }
        self.ready.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Runs one controller's loop until it is cancelled, restarting it when it fails.
    async fn supervise(self: Arc<Self>, slot: Arc<Slot>) {
        let name = slot.controller.name();
        let mut backoff = BACKOFF_FIRST;
        let mut injected_panic = self.failpoints.panic_after.get(name).copied();
        loop {
            let cancel = slot.cancel.token();
            let started = Instant::now();
            let run = Arc::clone(&slot.controller).run(cancel.clone());
            let panic_at = injected_panic.take();
            let run = async move {
                if let Some(after) = panic_at {
                    tokio::select! {
                        r = run => r,
                        _ = tokio::time::sleep(after) => {
                            panic!("failpoint {name}.run: injected panic after {after:?}")
                        }
                    }
                } else {
                    run.await
                }
            };
            // The loop's own task, so that a panic is caught as a JoinError and not in here.
            let outcome = tokio::spawn(std::panic::AssertUnwindSafe(run).catch_unwind()).await;
            if cancel.is_cancelled() {
                return;
            }
            let failure = match outcome {
                Ok(Ok(Ok(()))) => "its run loop ended".to_string(),
                Ok(Ok(Err(e))) => e.to_string(),
                Ok(Err(panic)) => format!("panicked: {}", panic_message(panic.as_ref())),
                Err(e) => format!("task failed: {e}"),
            };
            let restarts = slot.restarts.fetch_add(1, Ordering::SeqCst) + 1;
            *lock(&slot.last_failure) = Some(failure.clone());
            if started.elapsed() >= BACKOFF_RESET_AFTER {
                backoff = BACKOFF_FIRST;
            }
            error!(controller = name, failure = %failure, restarts, backoff_ms = backoff.as_millis() as u64,
                   "controller failed; restarting it, the others keep serving");
            let mut cancel = cancel;
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = cancel.cancelled() => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Two-phase reload: every controller prepares `new`; then all commit, or, at the first
    /// refusal, those prepared roll back (in reverse order) and every controller is as it was.
    pub async fn reload(self: &Arc<Self>, new: Settings) -> Result<String> {
        let _one_at_a_time = self.reload_lock.lock().await;
        let me = Arc::clone(self);
        let done = tokio::task::spawn_blocking(move || me.reload_blocking(new))
            .await
            .map_err(|e| Error::Internal(format!("reload panicked: {e}")))?;
        match &done {
            Ok(changes) => {
                self.reloads.fetch_add(1, Ordering::SeqCst);
                lock(&self.inner).last_reload_error = None;
                info!(changes = %changes, "configuration reloaded");
            }
            Err(e) => {
                self.reload_failures.fetch_add(1, Ordering::SeqCst);
                let text = e.to_string();
                error!(error = %text, "configuration reload refused; every controller keeps the running configuration");
                lock(&self.inner).last_reload_error = Some(text);
            }
        }
        done
    }

    /// Counts and shows a reload refused before it reached the controllers (an invalid file).
    pub fn refuse_reload(&self, e: Error) {
        self.reload_failures.fetch_add(1, Ordering::SeqCst);
        let text = e.to_string();
        error!(error = %text, "configuration reload refused; every controller keeps the running configuration");
        lock(&self.inner).last_reload_error = Some(text);
    }

    fn reload_blocking(&self, new: Settings) -> Result<String> {
        let old = self.settings();
        let restart_only = old.restart_only_changes(&new);
        if !restart_only.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "{} changes only on restart (kernel map sizes, program constants, open sockets \
                 and files)",
                restart_only.join(", ")
            )));
        }
        let features = self.features().with_force_off(&new.force_off);
        let mut prepared: Vec<(&'static str, Box<dyn Prepared>)> = Vec::new();
        for slot in &self.slots {
            let c = Arc::clone(&slot.controller);
            let blocker = self.blocker(c.as_ref(), &features, &new);
            let step = if self.failpoints.prepare_error.iter().any(|n| n == c.name()) {
                Err(Error::InvalidArgument(format!(
                    "failpoint {}.prepare: injected refusal",
                    c.name()
                )))
            } else {
                Arc::clone(&c).prepare(&new, blocker)
            };
            match step {
                Ok(p) => prepared.push((c.name(), p)),
                Err(e) => {
                    for (name, p) in prepared.into_iter().rev() {
                        info!(
                            controller = name,
                            "rolling back its part of the refused reload"
                        );
                        p.rollback();
                    }
                    return Err(e.context(format!("controller {} refused the reload", c.name())));
                }
            }
        }
        let mut changes = Vec::new();
        for (_, p) in prepared {
            changes.extend(p.commit());
        }
        let mut inner = lock(&self.inner);
        inner.settings = new;
        inner.features = features;
        Ok(if changes.is_empty() {
            "none".into()
        } else {
            changes.join(", ")
        })
    }

    /// Stops the run loops in reverse start order, within [`STOP_BUDGET`] in all.
    pub async fn shutdown(&self) {
        let deadline = tokio::time::Instant::now() + STOP_BUDGET;
        for slot in self.slots.iter().rev() {
            slot.cancel.cancel();
            let task = lock(&slot.task).take();
            if let Some(mut task) = task
                && tokio::time::timeout_at(deadline, &mut task).await.is_err()
            {
                warn!(
                    controller = slot.controller.name(),
                    "run loop did not stop in time; aborted"
                );
                task.abort();
            }
            slot.controller.stop();
        }
    }

    pub fn set_not_ready(&self, reason: impl Into<String>) {
        lock(&self.inner).not_ready_reason = reason.into();
        self.ready.store(false, Ordering::SeqCst);
    }

    /// `None` when ready; else why not (for `/readyz`).
    /// A controller's own reason (waiting for its interfaces, say) comes first, also during
    /// start-up.
    pub fn not_ready(&self) -> Option<String> {
        let own = self.slots.iter().find_map(|s| s.controller.not_ready());
        if own.is_some() {
            return own;
        }
        (!self.ready.load(Ordering::SeqCst)).then(|| lock(&self.inner).not_ready_reason.clone())
    }

    pub fn last_reload_error(&self) -> Option<String> {
        lock(&self.inner).last_reload_error.clone()
    }

    pub fn reports(&self) -> Vec<ControllerReport> {
        self.slots
            .iter()
            .map(|s| ControllerReport {
                name: s.controller.name(),
                health: s.controller.health(),
                restarts: s.restarts.load(Ordering::SeqCst),
                last_failure: lock(&s.last_failure).clone(),
            })
            .collect()
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(no message)".into())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::controller::{Cancel, RunFuture};

    /// A controller for the supervisor's own tests: counts its runs and fails as told.
    struct Probe {
        name: &'static str,
        after: &'static [&'static str],
        runs: AtomicUsize,
        fail_first_runs: usize,
        refuse_prepare: bool,
        log: Arc<Mutex<Vec<String>>>,
    }

    impl Probe {
        fn new(
            name: &'static str,
            after: &'static [&'static str],
            log: &Arc<Mutex<Vec<String>>>,
        ) -> Self {
            Self {
                name,
                after,
                runs: AtomicUsize::new(0),
                fail_first_runs: 0,
                refuse_prepare: false,
                log: Arc::clone(log),
            }
        }
    }

    struct Logged(&'static str, Arc<Mutex<Vec<String>>>);

    impl Prepared for Logged {
        fn commit(self: Box<Self>) -> Vec<String> {
            lock(&self.1).push(format!("commit {}", self.0));
            vec![format!("{} changed", self.0)]
        }

        fn rollback(self: Box<Self>) {
            lock(&self.1).push(format!("rollback {}", self.0));
        }
    }

    impl Controller for Probe {
        fn name(&self) -> &'static str {
            self.name
        }

        fn after(&self) -> &'static [&'static str] {
            self.after
        }

        fn enabled(&self, _: &Settings) -> bool {
            true
        }

        fn start(&self, _: &Settings, _: Option<String>) -> Result<()> {
            lock(&self.log).push(format!("start {}", self.name));
            Ok(())
        }

        fn prepare(self: Arc<Self>, _: &Settings, _: Option<String>) -> Result<Box<dyn Prepared>> {
            if self.refuse_prepare {
                return Err(Error::InvalidArgument(format!("{} refuses", self.name)));
            }
            lock(&self.log).push(format!("prepare {}", self.name));
            Ok(Box::new(Logged(self.name, Arc::clone(&self.log))))
        }

        fn run(self: Arc<Self>, mut cancel: Cancel) -> RunFuture {
            Box::pin(async move {
                let n = self.runs.fetch_add(1, Ordering::SeqCst);
                if n < self.fail_first_runs {
                    if n.is_multiple_of(2) {
                        panic!("probe {} run {n} panics", self.name);
                    }
                    return Err(Error::InvalidArgument(format!("run {n} fails")));
                }
                cancel.cancelled().await;
                lock(&self.log).push(format!("stopped {}", self.name));
                Ok(())
            })
        }

        fn health(&self) -> Health {
            Health {
                enabled: true,
                up: true,
                reason: None,
            }
        }
    }

    fn features() -> Features {
        Features::probe(&[])
    }

    #[tokio::test]
    async fn starts_in_dependency_order_restarts_failures_and_stops_in_reverse() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut flaky = Probe::new("flaky", &["base"], &log);
        flaky.fail_first_runs = 2;
        let flaky = Arc::new(flaky);
        let base = Arc::new(Probe::new("base", &[], &log));
        let sup = Supervisor::new(
            vec![
                Arc::clone(&flaky) as DynController,
                Arc::clone(&base) as DynController,
            ],
            Bus::new(),
            Settings::default(),
            features(),
        )
        .unwrap();
        sup.start().await.unwrap();
        assert_eq!(lock(&log)[..2], ["start base", "start flaky"]);
        // Two failures (a panic, then an error), restarted after 200 ms and 400 ms.
        let deadline = Instant::now() + Duration::from_secs(10);
        while flaky.runs.load(Ordering::SeqCst) < 3 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let reports = sup.reports();
        let flaky_report = reports.iter().find(|r| r.name == "flaky").unwrap();
        assert_eq!(flaky_report.restarts, 2);
        assert_eq!(flaky_report.last_failure.as_deref(), Some("run 1 fails"));
        assert_eq!(
            reports.iter().find(|r| r.name == "base").unwrap().restarts,
            0
        );
        assert_eq!(
            base.runs.load(Ordering::SeqCst),
            1,
            "the others keep running"
        );
        sup.shutdown().await;
        let log = lock(&log).clone();
        assert_eq!(log[log.len() - 2..], ["stopped flaky", "stopped base"]);
    }

    #[tokio::test]
    async fn a_refused_prepare_rolls_back_those_prepared_and_commits_nothing() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let a = Arc::new(Probe::new("a", &[], &log));
        let mut b = Probe::new("b", &["a"], &log);
        b.refuse_prepare = true;
        let c = Arc::new(Probe::new("c", &["b"], &log));
        let sup = Supervisor::new(
            vec![
                c as DynController,
                Arc::new(b) as DynController,
                a as DynController,
            ],
            Bus::new(),
            Settings::default(),
            features(),
        )
        .unwrap();
        sup.start().await.unwrap();
        lock(&log).clear();
        let e = sup
            .reload(Settings::default())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("controller b refused the reload") && e.contains("b refuses"),
            "{e}"
        );
        assert_eq!(*lock(&log), ["prepare a", "rollback a"]);
        assert_eq!(sup.reload_failures.load(Ordering::SeqCst), 1);
        assert!(sup.last_reload_error().is_some());
        sup.shutdown().await;
    }

    #[test]
    fn registration_errors_and_failpoints() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let cyc_a = Arc::new(Probe::new("a", &["b"], &log)) as DynController;
        let cyc_b = Arc::new(Probe::new("b", &["a"], &log)) as DynController;
        assert!(start_order(vec![cyc_a, cyc_b]).is_err());
        let lone = Arc::new(Probe::new("a", &["zz"], &log)) as DynController;
        assert!(start_order(vec![lone]).is_err());
        let fp =
            Failpoints::parse("conntrack.run=panic-after-ms:1500, policy.prepare=error").unwrap();
        assert_eq!(fp.panic_after["conntrack"], Duration::from_millis(1500));
        assert_eq!(fp.prepare_error, ["policy"]);
        for bad in [
            "x",
            "a.run=panic",
            "a.start=error",
            "a.run=panic-after-ms:soon",
        ] {
            assert!(Failpoints::parse(bad).is_err(), "{bad}");
        }
    }
}
