//! The controller abstraction: every module of the daemon is one [`Controller`], registered
//! with the [`Supervisor`](crate::supervisor::Supervisor) in one line of `daemon.rs`.
//!
//! A controller owns its BPF objects (pins under `pin_root/<name>/`), its section of the
//! configuration, its API routes, its metric collectors and its status. It talks to the others
//! only through the [`Bus`](crate::bus::Bus) or typed handles published there.
use std::{future::Future, pin::Pin, sync::Arc};

use prometheus::core::Collector;

use crate::{
    Result,
    config::Settings,
    features::{Capability, Feature},
};

/// What a controller cannot run without. A controller whose requirement is missing is kept off
/// with the reason in its status, as if disabled; the others run.
#[derive(Clone, Copy, Debug, Default)]
pub struct Requirements {
    pub features: &'static [Feature],
    pub capabilities: &'static [Capability],
}

/// One controller's line of `lb-ctl status`, and of `/readyz` when it is not up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Health {
    pub enabled: bool,
    pub up: bool,
    /// Why it is off, when it is.
    pub reason: Option<String>,
}

/// A stop signal for run loops, cloned into every task of a controller.
#[derive(Clone, Debug)]
pub struct Cancel(tokio::sync::watch::Receiver<bool>);

/// The sending end of [`Cancel`].
#[derive(Debug)]
pub struct CancelHandle(tokio::sync::watch::Sender<bool>);

impl CancelHandle {
    pub fn new() -> Self {
        Self(tokio::sync::watch::Sender::new(false))
    }

    pub fn token(&self) -> Cancel {
        Cancel(self.0.subscribe())
    }

    pub fn cancel(&self) {
        self.0.send_replace(true);
    }
}

impl Default for CancelHandle {
    fn default() -> Self {
        Self::new()
    }
}

impl Cancel {
    /// A token that is never cancelled (for tests and one-off calls).
    pub fn never() -> Self {
        let (tx, rx) = tokio::sync::watch::channel(false);
        // The sender lives forever so that `cancelled` never resolves.
        std::mem::forget(tx);
        Self(rx)
    }

    pub fn is_cancelled(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once the controller is asked to stop.
    pub async fn cancelled(&mut self) {
        if self.0.wait_for(|c| *c).await.is_err() {
            // The supervisor is gone: nobody can ask any more, so stop.
        }
    }
}

/// The boxed future of a run loop.
pub type RunFuture = Pin<Box<dyn Future<Output = Result<()>> + Send + 'static>>;

/// The first phase of a reload, done by [`Controller::prepare`]: everything that can fail has
/// been done, and can still be undone.
pub trait Prepared: Send {
    /// Makes the change final; answers what changed, for the log.
    fn commit(self: Box<Self>) -> Vec<String>;
    /// Undoes what prepare did: the controller is as it was before.
    fn rollback(self: Box<Self>);
}

/// A prepared reload that changes nothing.
pub struct NoChange;

impl Prepared for NoChange {
    fn commit(self: Box<Self>) -> Vec<String> {
        Vec::new()
    }

    fn rollback(self: Box<Self>) {}
}

/// A module of the daemon. See the module documentation.
///
/// The blocking methods (`start`, `prepare`, `commit`, `rollback`) are called on the blocking
/// pool, one at a time per controller; `run` is a task the supervisor owns and restarts.
pub trait Controller: Send + Sync + 'static {
    /// Its name: in status, metrics, logs and its pin directory.
    fn name(&self) -> &'static str;

    /// Controllers that must be started before this one (and stopped after it).
    fn after(&self) -> &'static [&'static str] {
        &[]
    }

    fn requirements(&self) -> Requirements {
        Requirements::default()
    }

    /// Whether `settings` turns it on.
    fn enabled(&self, settings: &Settings) -> bool;

    /// Brings it to `settings` at start. `blocker`: why it cannot run here (a missing feature
    /// or capability); it then stays off with that reason. An error stops the daemon.
    fn start(&self, settings: &Settings, blocker: Option<String>) -> Result<()>;

    /// Phase one of a reload to `settings`: do what can fail, keep what is needed to undo it.
    fn prepare(
        self: Arc<Self>,
        settings: &Settings,
        blocker: Option<String>,
    ) -> Result<Box<dyn Prepared>>;

    /// Its long-running work, until `cancel`. An error or a panic is reported and the loop is
    /// started again with backoff; a loop with nothing to do waits for `cancel`.
    fn run(self: Arc<Self>, cancel: Cancel) -> RunFuture;

    fn health(&self) -> Health;

    /// Why it is not ready yet (checked by `/readyz` once started), or `None`.
    fn not_ready(&self) -> Option<String> {
        None
    }

    /// Its API routes (state included).
    fn routes(self: Arc<Self>) -> axum::Router {
        axum::Router::new()
    }

    /// Its metric collectors, registered once at start.
    fn collectors(self: Arc<Self>) -> Vec<Box<dyn Collector>> {
        Vec::new()
    }

    /// Called once at shutdown, after its run loop stopped (the datapath stays attached).
    fn stop(&self) {}
}

/// A run loop with nothing to do: waits until cancelled.
pub fn idle(mut cancel: Cancel) -> RunFuture {
    Box::pin(async move {
        cancel.cancelled().await;
        Ok(())
    })
}

/// Wraps `Arc<C>` so the supervisor can hold any controller.
pub type DynController = Arc<dyn Controller>;
