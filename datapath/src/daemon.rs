//! The daemon: builds the bus and the controllers (one line each), hands them to the
//! supervisor, serves the API and the metrics, reloads on SIGHUP or a change of the file, and
//! stops on SIGTERM or SIGINT.
use std::{path::PathBuf, sync::Arc, time::Instant};

use crate::controller::Controller as _;
use axum::{Json, extract::State, routing::get};
use datapath_api::{InterfaceStatus, ModuleStatus, StatusView};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::{info, warn};

use crate::{
    Error, Result,
    bus::Bus,
    config::{Overrides, Settings, Source},
    controller::DynController,
    ct::ConntrackController,
    features::Features,
    lb::{LbController, LbPlane},
    metrics,
    netlink::NetlinkController,
    policy::PolicyController,
    prog_stats::ProgStats,
    server::{self, SharedController},
    supervisor::Supervisor,
};

fn signal_of(kind: SignalKind, name: &str) -> Result<Signal> {
    signal(kind).map_err(|e| Error::io(format!("cannot handle {name}"), e))
}

/// What `GET /v1/status` reads.
#[derive(Clone)]
struct StatusState {
    sup: Arc<Supervisor>,
    lb: SharedController<LbPlane>,
    netlink: Arc<NetlinkController>,
    config_file: Option<PathBuf>,
}

async fn status(State(s): State<StatusState>) -> Json<StatusView> {
    let interfaces: Vec<InterfaceStatus> =
        s.lb.lock()
            .await
            .plane()
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
            .unwrap_or_default();
    let mut view = status_view(&s.sup, interfaces, s.config_file.as_deref());
    if s.netlink.health().up {
        view.links = s.netlink.link_status();
        view.neighbours = s.netlink.neighbour_status();
        view.netlink = Some(s.netlink.figures());
    }
    Json(view)
}

/// Everything `GET /v1/status` shows; `interfaces`: the load balancer's.
pub fn status_view(
    sup: &Supervisor,
    interfaces: Vec<InterfaceStatus>,
    config_file: Option<&std::path::Path>,
) -> StatusView {
    StatusView {
        version: env!("CARGO_PKG_VERSION").to_string(),
        ready: sup.not_ready().is_none(),
        config_file: config_file.map(|p| p.display().to_string()),
        config_reloads: sup.reloads.load(std::sync::atomic::Ordering::SeqCst),
        config_reload_failures: sup
            .reload_failures
            .load(std::sync::atomic::Ordering::SeqCst),
        last_reload_error: sup.last_reload_error(),
        interfaces,
        links: Vec::new(),
        neighbours: Vec::new(),
        netlink: None,
        modules: sup
            .reports()
            .into_iter()
            .map(|r| ModuleStatus {
                name: r.name.to_string(),
                enabled: r.health.enabled,
                up: r.health.up,
                reason: r.health.reason,
                restarts: r.restarts,
                last_failure: r.last_failure,
            })
            .collect(),
        features: sup.features().views(),
    }
}

/// The daemon's controllers, and typed handles of the two the daemon itself talks to.
pub struct Controllers {
    pub lb: Arc<LbController>,
    pub conntrack: Arc<ConntrackController>,
    pub netlink: Arc<NetlinkController>,
    pub all: Vec<DynController>,
}

/// Builds every controller on `bus`: one line each. The supervisor orders them by their
/// dependencies; a new module is one folder and one line here.
pub fn controllers(settings: &Settings, bus: &Bus) -> Result<Controllers> {
    let lb = LbController::new(settings, bus)
        .map_err(|e| e.context("cannot load the saved services"))?;
    let conntrack = ConntrackController::new(settings, bus)?;
    let netlink = NetlinkController::new(settings, bus)?;
    let all: Vec<DynController> = vec![
        Arc::clone(&netlink) as DynController,
        Arc::clone(&lb) as DynController,
        ProgStats::new(bus)?,
        PolicyController::new(settings, bus)?,
        crate::service_file::ServiceFileController::new(settings, bus)? as DynController,
        crate::kubernetes::KubernetesController::new(settings, bus)? as DynController,
        crate::socklb::SockLbController::new(settings, bus)? as DynController,
        crate::dns::DnsController::new(settings, bus)? as DynController,
        crate::exec::ExecController::new(settings, bus)? as DynController,
        Arc::clone(&conntrack) as DynController,
        crate::graph::GraphController::new(settings, bus)? as DynController,
    ];
    Ok(Controllers {
        lb,
        conntrack,
        netlink,
        all,
    })
}

/// Reads the configuration file `path` again and reloads every controller with it (see
/// [`Supervisor::reload`]). A file that is invalid, or changes a key that needs a restart, is
/// refused before any controller sees it; either way the outcome is logged, counted and
/// shown by `lb-ctl status`.
pub async fn reload_from_file(
    sup: &Arc<Supervisor>,
    path: &std::path::Path,
    overrides: &Overrides,
) -> Result<String> {
    let new = Source::read(path).and_then(|source| {
        let new = Settings::resolve(Some(&source), overrides)?;
        let restart_only = sup.settings().restart_only_changes(&new);
        if !restart_only.is_empty() {
            return Err(Error::Config {
                file: path.to_path_buf(),
                line: None,
                key: restart_only.join(", "),
                reason: "changes only on restart (kernel map sizes, program constants, open \
                         sockets and files)"
                    .into(),
            });
        }
        Ok(new)
    });
    match new {
        Ok(new) => sup.reload(new).await,
        Err(e) => {
            let text = e.to_string();
            sup.refuse_reload(e);
            Err(Error::InvalidArgument(text))
        }
    }
}

/// Runs the daemon until SIGTERM or SIGINT. `source`: the configuration file as read at
/// start; `overrides`: the flags and environment, applied again at every reload.
pub async fn run(settings: Settings, source: Option<Source>, overrides: Overrides) -> Result<()> {
    // Registered before anything is attached, so a signal during start-up ends the daemon
    // through the same orderly path instead of killing it half-way.
    let mut sigterm = signal_of(SignalKind::terminate(), "SIGTERM")?;
    let mut sigint = signal_of(SignalKind::interrupt(), "SIGINT")?;
    let sighup = signal_of(SignalKind::hangup(), "SIGHUP")?;
    let config_file = source.as_ref().map(|s| s.path.clone());

    let features = Features::probe(&settings.force_off);
    info!(
        features = %features.summary(),
        config = %config_file.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "(none)".into()),
        "probed kernel features"
    );
    let missing = features.missing_capabilities();
    if !missing.is_empty() {
        let names: Vec<&str> = missing.iter().map(|c| c.name()).collect();
        warn!(missing = %names.join(", "),
              "missing capabilities: the modules that need them stay off (see deploy/README.md)");
    }

    let bus = Bus::new();
    let Controllers {
        lb,
        conntrack,
        netlink,
        all,
    } = controllers(&settings, &bus)?;
    let sup = Supervisor::new(all, bus, settings.clone(), features)?;

    // Metrics and probes answer from the start: /healthz at once, /readyz once started.
    let metrics_task = match settings.metrics_listen {
        Some(addr) => {
            let listener = metrics::bind(addr).await?;
            info!(%addr, "serving /metrics, /healthz and /readyz");
            let s = Arc::clone(&sup);
            Some(tokio::spawn(async move {
                if let Err(e) = metrics::serve(listener, s).await {
                    tracing::error!(error = %e, "metrics listener stopped");
                }
            }))
        }
        None => None,
    };

    // Then the socket: it refuses to start while another daemon is serving, before we take
    // its programs and maps over.
    let listener = server::bind(&settings.api_socket).await?;
    let remove_socket = |path: &std::path::Path| {
        // Gone rather than refusing connections: lb-ctl then says plainly nobody is there.
        if let Err(e) = std::fs::remove_file(path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!(socket = %path.display(), error = %e, "cannot remove the API socket");
        }
    };

    let started = tokio::select! {
        started = sup.start() => started,
        _ = sigterm.recv() => Err(Error::Unavailable("SIGTERM".into())),
        _ = sigint.recv() => Err(Error::Unavailable("SIGINT".into())),
    };
    if let Err(e) = started {
        for c in sup.controllers() {
            c.stop();
        }
        if let Some(task) = metrics_task {
            task.abort();
        }
        remove_socket(&settings.api_socket);
        if let Error::Unavailable(signal) = e.root() {
            info!(signal = %signal, "stopping during start-up");
            return Ok(());
        }
        return Err(e);
    }
    crate::bpffs_check::warn_if_private(&settings.pin_root);
    info!(
        services = lb.shared().lock().await.store().state().services.len(),
        state_file = %settings.lb.state_file.display(),
        "ready: controllers up and the saved services restored"
    );

    let reloader = tokio::spawn(reloader(
        Arc::clone(&sup),
        config_file.clone(),
        overrides,
        sighup,
    ));
    info!(socket = %settings.api_socket.display(), "serving the API");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<Instant>();
    let ct = Arc::clone(&conntrack);
    let shutdown = async move {
        let name = tokio::select! {
            _ = sigterm.recv() => "SIGTERM",
            _ = sigint.recv() => "SIGINT",
        };
        let _ = stop_tx.send(Instant::now());
        ct.stop_streams();
        info!(
            signal = name,
            "stopping: finishing in-flight requests; the datapath stays attached"
        );
    };
    let mut router = axum::Router::new()
        .route("/v1/status", get(status))
        .with_state(StatusState {
            sup: Arc::clone(&sup),
            lb: lb.shared(),
            netlink,
            config_file,
        });
    for c in sup.controllers() {
        router = router.merge(Arc::clone(c).routes());
    }
    let served = server::serve_router(listener, router, shutdown).await;
    reloader.abort();
    sup.shutdown().await;
    if let Some(task) = metrics_task {
        task.abort();
    }
    remove_socket(&settings.api_socket);
    served?;
    // Every change is saved before it is acknowledged: nothing is left to flush. The pinned
    // links and maps stay; our descriptors close with the process.
    let stopping_since = stop_rx.await.ok();
    info!(
        stop_ms = stopping_since.map(|t| t.elapsed().as_millis() as u64),
        "stopped; the datapath keeps forwarding"
    );
    Ok(())
}

/// Reloads the configuration on SIGHUP and, when `reload.watch` is on, when the file's content
/// changes: watched with inotify (see [`crate::watch`]), so nothing polls. If inotify cannot
/// be set up, the file's modification time and size are polled every
/// `reload.poll_interval_ms` instead, with a warning.
async fn reloader(
    sup: Arc<Supervisor>,
    config_file: Option<PathBuf>,
    overrides: Overrides,
    mut sighup: Signal,
) {
    let Some(path) = config_file else {
        // Nothing to reload; SIGHUP is still consumed so it does not kill us.
        while sighup.recv().await.is_some() {
            warn!("SIGHUP: no configuration file to reload (start with --config)");
        }
        return;
    };
    let mut watch = match crate::watch::FileWatch::new(&path) {
        Ok(w) => Some(w),
        Err(e) => {
            warn!(file = %path.display(), error = %e,
                  "cannot watch the configuration file with inotify: polling it instead");
            None
        }
    };
    let stamp = |p: &std::path::Path| {
        std::fs::metadata(p)
            .ok()
            .map(|m| (m.modified().ok(), m.len()))
    };
    let mut seen = stamp(&path);
    loop {
        let settings = sup.settings();
        let by = tokio::select! {
            got = sighup.recv() => {
                if got.is_none() {
                    return;
                }
                if let Some(w) = watch.as_mut() {
                    w.saw(std::fs::read(&path).ok());
                }
                "SIGHUP"
            }
            changed = async {
                match watch.as_mut() {
                    Some(w) => w.changed().await.map(|_| ()),
                    None => std::future::pending().await,
                }
            }, if settings.watch && watch.is_some() => {
                if let Err(e) = changed {
                    warn!(error = %e, "the configuration file watch failed: polling it instead");
                    watch = None;
                    continue;
                }
                "file change"
            }
            _ = tokio::time::sleep(settings.poll_interval), if settings.watch && watch.is_none() => {
                if stamp(&path) == seen {
                    continue;
                }
                "file change"
            }
        };
        seen = stamp(&path);
        info!(trigger = by, file = %path.display(), "reloading the configuration");
        // The supervisor logs, counts and shows the outcome.
        let _ = reload_from_file(&sup, &path, &overrides).await;
    }
}
