//! The `dns` controller: names learned passively from the DNS answers that cross the node, with
//! no proxy. It owns the TCX capture programs of `bpf-dns` (attached to `dns.interfaces` and
//! `lo`), reads their per-CPU perf buffers, decodes every answer record by record
//! (`dnsnames`), and keeps the name store: (client, address) to the name asked for and its
//! CNAME chain, with a TTL floor and cap, a cap of addresses per name and an LRU bound.
//!
//! - An entry past its TTL is kept while the conntrack (the [`LIVE_FLOWS`] handle) holds a
//!   live flow to its address, then for `dns.grace_seconds`: a long connection keeps its name.
//! - Other modules read names through the [`NAMES`] handle (the conntrack's listing and flow
//!   events show them); each answer is published on [`ANSWERS`].
//! - The section needs a restart to change (config refuses a reload that changes it).
mod learn;
pub mod plane;

use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
    os::fd::AsRawFd as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bpf_common::dns::DnsCaptureMeta;
use datapath_api::{DnsEntryView, DnsNamesQuery, DnsStatus};
use tokio::io::unix::AsyncFd;
use tracing::{info, warn};

use crate::{
    Error, Result,
    bus::{Bus, StateReader, StateWriter, Topic},
    config::{DnsSettings, Settings},
    controller::{Cancel, Controller, Health, NoChange, Prepared, Requirements, RunFuture},
    ct::gc::monotonic_now_ns,
    features::Capability,
};
pub use learn::{DnsAnswer, Learner, store_config};
use plane::{DnsPlane, PerfBuffer};

/// The controller's name: status, logs, metrics.
pub const NAME: &str = "dns";
/// State: the name store's lookup handle ([`NameHandle`]; writer: dns).
pub const NAMES: &str = "dns.names";
/// Topic: every decoded answer that taught an address, as `Arc<DnsAnswer>`.
pub const ANSWERS: &str = "dns.answers";
/// State: the conntrack's live flows ([`LiveHandle`]; writer: conntrack).
pub const LIVE_FLOWS: &str = "conntrack.live_flows";
/// Answers a slow subscriber may fall behind by before it loses some.
const ANSWER_BUFFER: usize = 4096;
/// How often the store looks for expired entries (and the capture for new interfaces when
/// the netlink controller is off).
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// What a module may ask the name store.
pub trait NameLookup: Send + Sync {
    /// The name `client` asked for that answered `addr` (else any client's name for it).
    fn name_of(&self, client: IpAddr, addr: IpAddr) -> Option<String>;
}

/// The name store's handle on the bus (`None`: the module is off).
pub type NameHandle = Option<Arc<dyn NameLookup>>;

/// What the name store asks the conntrack.
pub trait LiveFlows: Send + Sync {
    /// Every address at either end of a live flow, in both tables.
    fn live_addresses(&self) -> Result<HashSet<IpAddr>>;
}

/// The conntrack's handle on the bus (`None`: not running yet).
pub type LiveHandle = Option<Arc<dyn LiveFlows>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The name store as other modules see it.
struct StoreHandle(Arc<Mutex<Learner>>);

impl NameLookup for StoreHandle {
    fn name_of(&self, client: IpAddr, addr: IpAddr) -> Option<String> {
        let learner = lock(&self.0);
        learner
            .store
            .lookup(Some(client), addr)
            .and_then(|e| e.names.first().map(|n| n.to_string()))
    }
}

struct Inner {
    settings: DnsSettings,
    plane: Option<DnsPlane>,
    /// One per online CPU; kept here so a restarted run loop reads them again.
    buffers: Vec<Arc<Mutex<PerfBuffer>>>,
    health: Health,
}

/// A perf buffer's descriptor for the reactor (the buffer itself stays in `Inner`).
struct BufferFd(std::os::fd::RawFd);

impl std::os::fd::AsRawFd for BufferFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0
    }
}

/// See the module documentation.
pub struct DnsController {
    inner: Mutex<Inner>,
    learner: Arc<Mutex<Learner>>,
    names: StateWriter<NameHandle>,
    live: StateReader<LiveHandle>,
    answers: Arc<Topic<Arc<DnsAnswer>>>,
    links: StateReader<crate::netlink::model::Links>,
    netlink: bool,
    /// Perf records the kernel dropped because this reader was behind.
    reader_lost: AtomicU64,
    /// Why the last interface sync could not attach somewhere.
    attach_errors: Mutex<Vec<String>>,
}

impl DnsController {
    pub fn new(settings: &Settings, bus: &Bus) -> Result<Arc<Self>> {
        Ok(Arc::new(Self {
            inner: Mutex::new(Inner {
                settings: settings.dns.clone(),
                plane: None,
                buffers: Vec::new(),
                health: Health::default(),
            }),
            learner: Arc::new(Mutex::new(Learner::new(&settings.dns))),
            names: bus.state::<NameHandle>(NAMES)?.writer()?,
            live: bus.state::<LiveHandle>(LIVE_FLOWS)?.reader(),
            answers: bus.topic(ANSWERS, ANSWER_BUFFER)?,
            links: bus
                .state::<crate::netlink::model::Links>(crate::netlink::LINKS)?
                .reader(),
            netlink: settings.netlink.enabled,
            reader_lost: AtomicU64::new(0),
            attach_errors: Mutex::new(Vec::new()),
        }))
    }

    /// Attaches to the configured interfaces present now (and lets go of those gone).
    fn sync_interfaces(&self) {
        let mut inner = lock(&self.inner);
        let settings = inner.settings.clone();
        let Some(plane) = inner.plane.as_mut() else {
            return;
        };
        let failed = plane.sync_interfaces(&settings);
        let errors: Vec<String> = failed
            .into_iter()
            .map(|(name, e)| format!("{name}: {e}"))
            .collect();
        let mut known = lock(&self.attach_errors);
        if *known != errors {
            for e in &errors {
                warn!(error = %e, "dns: cannot capture on an interface");
            }
            *known = errors;
        }
    }

    /// One perf sample: the capture header, then the frame.
    fn sample(&self, head: &[u8], tail: &[u8]) -> Vec<Arc<DnsAnswer>> {
        let meta_len = std::mem::size_of::<DnsCaptureMeta>();
        let mut bytes = Vec::with_capacity(head.len() + tail.len());
        bytes.extend_from_slice(head);
        bytes.extend_from_slice(tail);
        let Some(meta_bytes) = bytes.get(..meta_len) else {
            return Vec::new();
        };
        let mut meta = DnsCaptureMeta::default();
        // SAFETY: DnsCaptureMeta is a padded `repr(C)` POD of exactly `meta_len` bytes, valid
        // for any bit pattern; the copy is unaligned-safe.
        unsafe {
            std::ptr::copy_nonoverlapping(
                meta_bytes.as_ptr(),
                std::ptr::addr_of_mut!(meta).cast::<u8>(),
                meta_len,
            );
        }
        // The sample is padded to 8 bytes: the frame is what the program said it appended.
        let end = (meta_len + meta.captured_len as usize).min(bytes.len());
        let frame = &bytes[meta_len..end];
        let mut learner = lock(&self.learner);
        learner
            .ingest(frame, meta.ts_ns)
            .into_iter()
            .map(Arc::new)
            .collect()
    }

    /// Reads one CPU's perf buffer until `cancel`.
    async fn read_buffer(
        self: Arc<Self>,
        buffer: Arc<Mutex<PerfBuffer>>,
        mut cancel: Cancel,
    ) -> Result<()> {
        let fd = lock(&buffer).as_raw_fd();
        // SAFETY: the descriptor is the buffer's, which `buffer` (held until this function
        // returns) keeps open for as long as the registration, dropped first, lives.
        let ready =
            unsafe { AsyncFd::register_with_interest(BufferFd(fd), tokio::io::Interest::READABLE) }
                .map_err(|e| {
                    Error::io(format!("poll the perf buffer (fd {fd})"), e.into_parts().1)
                })?;
        loop {
            let mut guard = tokio::select! {
                g = ready.readable() => g.map_err(|e| Error::io("poll the perf buffer", e))?,
                _ = cancel.cancelled() => return Ok(()),
            };
            let mut answers = Vec::new();
            let mut lost = 0u64;
            lock(&buffer).for_each(|event| match event {
                aya::maps::perf::PerfEvent::Sample { head, tail } => {
                    answers.extend(self.sample(head, tail))
                }
                aya::maps::perf::PerfEvent::Lost { count } => lost += count,
            });
            guard.clear_ready();
            if lost > 0 {
                self.reader_lost.fetch_add(lost, Ordering::Relaxed);
            }
            if !answers.is_empty() {
                self.answers.publish_batch(answers);
            }
        }
    }

    /// Expires the store's entries past their time, keeping those the conntrack holds a live
    /// flow to (asked only when something is due).
    async fn sweep(&self) {
        let now = monotonic_now_ns();
        let due = lock(&self.learner)
            .store
            .next_expiry()
            .is_some_and(|t| t <= now);
        if !due {
            return;
        }
        let live = match (*self.live.get()).clone() {
            Some(ct) => tokio::task::spawn_blocking(move || ct.live_addresses())
                .await
                .unwrap_or_else(|e| Err(Error::Internal(format!("conntrack task failed: {e}"))))
                .unwrap_or_else(|e| {
                    warn!(error = %e, "dns: cannot read the live flows; expiring by TTL alone");
                    HashSet::new()
                }),
            None => HashSet::new(),
        };
        let now = monotonic_now_ns();
        let removed = lock(&self.learner)
            .store
            .expire(now, &|a| live.contains(&a));
        if removed > 0 {
            tracing::debug!(removed, "dns: names expired");
        }
    }

    /// `GET /v1/dns`.
    pub fn status(&self) -> DnsStatus {
        let inner = lock(&self.inner);
        let mut st = DnsStatus {
            enabled: inner.settings.enabled,
            up: inner.health.up,
            reason: inner.health.reason.clone(),
            ..Default::default()
        };
        if let Some(plane) = &inner.plane {
            st.interfaces = plane.interfaces();
            match plane.reasons() {
                Ok(r) => {
                    let get = |k: &str| r.get(k).copied().unwrap_or(0);
                    st.captured = get("captured");
                    st.snap_cut = get("snap_cut");
                    st.lost.insert("rate_limited".into(), get("rate_limited"));
                    st.lost.insert("buffer_full".into(), get("buffer_full"));
                }
                Err(e) => warn!(error = %e, "dns: cannot read its counters"),
            }
        }
        drop(inner);
        st.lost.insert(
            "reader_lost".into(),
            self.reader_lost.load(Ordering::Relaxed),
        );
        let learner = lock(&self.learner);
        let c = &learner.counters;
        st.messages = c.messages;
        st.duplicates = c.duplicates;
        st.truncated_answers = c.truncated_answers;
        st.answers = c.answers;
        st.parse_errors = c
            .parse_errors
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect();
        for (k, v) in learner.tcp_errors() {
            if v > 0 {
                st.parse_errors.insert(k.into(), v);
            }
        }
        let s = learner.store.stats();
        st.entries = s.entries as u64;
        st.names = s.names as u64;
        st.held = s.held;
        st.expired = s.expired;
        st.evictions = BTreeMap::from([
            ("lru".to_string(), s.evicted_lru),
            ("name_cap".to_string(), s.evicted_name_cap),
        ]);
        st.tcp_streams = learner.tcp_streams() as u64;
        st
    }

    /// `GET /v1/dns/names`: entries matching `q`, by address then client.
    pub fn names(&self, q: &DnsNamesQuery) -> Result<Vec<DnsEntryView>> {
        let (address, client) = q
            .parsed()
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let name = q
            .name
            .as_deref()
            .map(|n| n.trim_end_matches('.').to_ascii_lowercase());
        let now = monotonic_now_ns();
        let learner = lock(&self.learner);
        let mut out: Vec<DnsEntryView> = learner
            .store
            .iter()
            .filter(|e| address.is_none_or(|a| a == e.addr))
            .filter(|e| client.is_none_or(|c| c == e.client))
            .filter(|e| {
                name.as_ref()
                    .is_none_or(|n| e.names.iter().any(|x| x.as_ref() as &str == n.as_str()))
            })
            .map(|e| DnsEntryView {
                client: e.client,
                address: e.addr,
                names: e.names.iter().map(|n| n.to_string()).collect(),
                ttl: e.ttl,
                age_seconds: now.saturating_sub(e.learned_ns) / 1_000_000_000,
                expires_in_seconds: e.expires_ns.saturating_sub(now).div_ceil(1_000_000_000),
                held: e.held,
                resolver: e.resolver,
            })
            .collect();
        out.sort_by_key(|e| (e.address, e.client));
        Ok(out)
    }

    fn load(&self, settings: &DnsSettings) -> std::result::Result<(), String> {
        let (plane, buffers) =
            DnsPlane::start(settings).map_err(|e| format!("cannot load: {e}"))?;
        let mut inner = lock(&self.inner);
        inner.plane = Some(plane);
        inner.buffers = buffers
            .into_iter()
            .map(|b| Arc::new(Mutex::new(b)))
            .collect();
        Ok(())
    }
}

impl Controller for DnsController {
    fn name(&self) -> &'static str {
        NAME
    }

    fn after(&self) -> &'static [&'static str] {
        &[crate::netlink::NAME]
    }

    fn requirements(&self) -> Requirements {
        Requirements {
            features: &[],
            // TCX attachment, and perf buffers for BPF output.
            capabilities: &[Capability::Bpf, Capability::NetAdmin, Capability::Perfmon],
        }
    }

    fn enabled(&self, settings: &Settings) -> bool {
        settings.dns.enabled
    }

    fn start(&self, settings: &Settings, blocker: Option<String>) -> Result<()> {
        lock(&self.inner).settings = settings.dns.clone();
        *lock(&self.learner) = Learner::new(&settings.dns);
        let reason = if !settings.dns.enabled {
            Some("disabled by the configuration (dns.enabled)".to_string())
        } else if let Some(b) = blocker {
            Some(b)
        } else {
            self.load(&settings.dns).err()
        };
        match &reason {
            None => {
                self.sync_interfaces();
                info!(
                    interfaces = ?lock(&self.inner).plane.as_ref().map(|p| p.interfaces()),
                    "module dns up: capturing DNS answers"
                );
                self.names.publish(Some(
                    Arc::new(StoreHandle(Arc::clone(&self.learner))) as Arc<dyn NameLookup>
                ));
            }
            Some(r) if settings.dns.enabled => warn!(reason = %r, "module dns off"),
            Some(_) => {}
        }
        lock(&self.inner).health = Health {
            enabled: settings.dns.enabled,
            up: reason.is_none(),
            reason,
        };
        Ok(())
    }

    fn prepare(
        self: Arc<Self>,
        _settings: &Settings,
        _blocker: Option<String>,
    ) -> Result<Box<dyn Prepared>> {
        // Its section needs a restart (config refuses a reload that changes it).
        Ok(Box::new(NoChange))
    }

    fn run(self: Arc<Self>, cancel: Cancel) -> RunFuture {
        Box::pin(async move {
            let buffers = lock(&self.inner).buffers.clone();
            if lock(&self.inner).plane.is_none() {
                let mut cancel = cancel;
                cancel.cancelled().await;
                return Ok(());
            }
            let readers = futures_util::future::try_join_all(
                buffers
                    .into_iter()
                    .map(|b| Arc::clone(&self).read_buffer(b, cancel.clone())),
            );
            let me = Arc::clone(&self);
            let mut stop = cancel.clone();
            let upkeep = async move {
                let mut links = me.links.clone();
                let mut tick = tokio::time::interval(SWEEP_EVERY);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    let relinked = tokio::select! {
                        _ = links.changed(), if me.netlink => true,
                        _ = tick.tick() => !me.netlink,
                        _ = stop.cancelled() => return Ok::<(), Error>(()),
                    };
                    if relinked {
                        let m = Arc::clone(&me);
                        let _ = tokio::task::spawn_blocking(move || m.sync_interfaces()).await;
                    }
                    me.sweep().await;
                }
            };
            let (a, b) = tokio::join!(readers, upkeep);
            a.map(|_| ()).and(b)
        })
    }

    fn health(&self) -> Health {
        lock(&self.inner).health.clone()
    }

    fn collectors(self: Arc<Self>) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![Box::new(metrics_collector(self))]
    }

    fn routes(self: Arc<Self>) -> axum::Router {
        use axum::{
            Json,
            extract::Query,
            response::{IntoResponse, Response},
            routing::get,
        };
        let me = Arc::clone(&self);
        let status = get(move || {
            let me = Arc::clone(&me);
            async move {
                Json(
                    tokio::task::spawn_blocking(move || me.status())
                        .await
                        .unwrap_or_default(),
                )
            }
        });
        let me = Arc::clone(&self);
        let names = get(
            move |q: std::result::Result<
                Query<DnsNamesQuery>,
                axum::extract::rejection::QueryRejection,
            >| {
                let me = Arc::clone(&me);
                async move {
                    let q = match q {
                        Ok(Query(q)) => q,
                        Err(e) => {
                            return crate::server::ApiFailure::from(Error::InvalidArgument(
                                format!("invalid query: {}", e.body_text()),
                            ))
                            .into_response();
                        }
                    };
                    let answer: Response =
                        match tokio::task::spawn_blocking(move || me.names(&q)).await {
                            Ok(Ok(list)) => Json(list).into_response(),
                            Ok(Err(e)) => crate::server::ApiFailure::from(e).into_response(),
                            Err(e) => crate::server::ApiFailure::from(Error::Internal(format!(
                                "dns task failed: {e}"
                            )))
                            .into_response(),
                        };
                    answer
                }
            },
        );
        axum::Router::new()
            .route(datapath_api::routes::DNS, status)
            .route(datapath_api::routes::DNS_NAMES, names)
    }
}

mod metrics {
    use prometheus::{IntCounterVec, IntGaugeVec, core::Collector};

    use crate::metrics::{Families, counter, gauge};

    pub(super) struct DnsFamilies {
        pub captured: IntCounterVec,
        pub lost: IntCounterVec,
        pub snap_cut: IntCounterVec,
        pub messages: IntCounterVec,
        pub answers: IntCounterVec,
        pub parse_errors: IntCounterVec,
        pub entries: IntGaugeVec,
        pub names: IntGaugeVec,
        pub evictions: IntCounterVec,
        pub expired: IntCounterVec,
    }

    impl Families for DnsFamilies {
        fn new() -> Self {
            Self {
                captured: counter(
                    "datapath_dns_captured_total",
                    "DNS responses the capture programs copied to user space",
                    &[],
                ),
                lost: counter(
                    "datapath_dns_lost_total",
                    "DNS responses not seen, by cause (rate_limited, buffer_full, reader_lost)",
                    &["cause"],
                ),
                snap_cut: counter(
                    "datapath_dns_snap_cut_total",
                    "DNS responses copied only up to the snap length",
                    &[],
                ),
                messages: counter(
                    "datapath_dns_messages_total",
                    "DNS messages decoded (datagrams and reassembled TCP messages)",
                    &[],
                ),
                answers: counter(
                    "datapath_dns_answers_total",
                    "Addresses learned from answers (new or refreshed entries)",
                    &[],
                ),
                parse_errors: counter(
                    "datapath_dns_parse_errors_total",
                    "Problems met decoding captured DNS responses, by reason",
                    &["reason"],
                ),
                entries: gauge(
                    "datapath_dns_entries",
                    "Entries (client, address) in the name store",
                    &[],
                ),
                names: gauge(
                    "datapath_dns_names",
                    "Distinct names in the name store",
                    &[],
                ),
                evictions: counter(
                    "datapath_dns_evictions_total",
                    "Entries evicted from the name store, by cause (lru, name_cap)",
                    &["cause"],
                ),
                expired: counter(
                    "datapath_dns_expired_total",
                    "Entries expired from the name store",
                    &[],
                ),
            }
        }

        fn all(&self) -> Vec<&dyn Collector> {
            vec![
                &self.captured,
                &self.lost,
                &self.snap_cut,
                &self.messages,
                &self.answers,
                &self.parse_errors,
                &self.entries,
                &self.names,
                &self.evictions,
                &self.expired,
            ]
        }
    }
}

fn metrics_collector(
    ctl: Arc<DnsController>,
) -> crate::metrics::FamilyCollector<metrics::DnsFamilies> {
    crate::metrics::FamilyCollector::new(move |f: &metrics::DnsFamilies| {
        if !lock(&ctl.inner).health.up {
            return;
        }
        let st = ctl.status();
        let none: &[&str] = &[];
        f.captured.with_label_values(none).inc_by(st.captured);
        for (cause, n) in &st.lost {
            f.lost.with_label_values(&[cause.as_str()]).inc_by(*n);
        }
        f.snap_cut.with_label_values(none).inc_by(st.snap_cut);
        f.messages.with_label_values(none).inc_by(st.messages);
        f.answers.with_label_values(none).inc_by(st.answers);
        for reason in dnsnames::packet::PACKET_REASONS
            .iter()
            .chain(dnsnames::wire::WIRE_REASONS)
            .chain(["tcp_gap", "tcp_overflow", "tcp_evicted", "tcp_desync"].iter())
        {
            let n = st.parse_errors.get(*reason).copied().unwrap_or(0);
            f.parse_errors.with_label_values(&[reason]).inc_by(n);
        }
        f.entries.with_label_values(none).set(st.entries as i64);
        f.names.with_label_values(none).set(st.names as i64);
        for (cause, n) in &st.evictions {
            f.evictions.with_label_values(&[cause.as_str()]).inc_by(*n);
        }
        f.expired.with_label_values(none).inc_by(st.expired);
    })
}
