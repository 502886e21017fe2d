//! The `dns` controller: names learned passively from the DNS answers that cross the node, with
//! no proxy. It owns the TCX capture programs of `bpf-dns` (attached to `dns.interfaces` and
//! `lo`), reads their ring buffer, decodes every answer record by record
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
    os::fd::AsFd as _,
    sync::{Arc, Mutex},
    time::Duration,
};

use bpf_common::dns::DnsCaptureMeta;
use datapath_api::{DnsEntryView, DnsNamesQuery, DnsStatus};
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
use plane::DnsPlane;

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
/// The longest an answer waits in the ring buffer below the programs' wake-up watermark.
const READ_TICK: Duration = Duration::from_millis(100);

/// What a module may ask the name store.
pub trait NameLookup: Send + Sync {
    /// The name `client` asked for that answered `addr` (else any client's name for it).
    /// Shared with the store: a reference count, not a copy (the graph asks on every flow).
    fn name_of(&self, client: IpAddr, addr: IpAddr) -> Option<Arc<str>>;
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
    fn name_of(&self, client: IpAddr, addr: IpAddr) -> Option<Arc<str>> {
        let learner = lock(&self.0);
        learner
            .store
            .lookup(Some(client), addr)
            .and_then(|e| e.names.first().cloned())
    }
}

struct Inner {
    settings: DnsSettings,
    plane: Option<DnsPlane>,
    /// The ring buffer's descriptor: each run of the loop opens its reader from a duplicate
    /// (the ring keeps its read position, so a restarted loop goes on where it stopped).
    ring: Option<std::os::fd::OwnedFd>,
    health: Health,
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
    /// Why the last interface sync could not attach somewhere.
    attach_errors: Mutex<Vec<String>>,
}

impl DnsController {
    pub fn new(settings: &Settings, bus: &Bus) -> Result<Arc<Self>> {
        Ok(Arc::new(Self {
            inner: Mutex::new(Inner {
                settings: settings.dns.clone(),
                plane: None,
                ring: None,
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

    /// One ring record: the capture header, then the frame.
    fn record(&self, bytes: &[u8], out: &mut Vec<Arc<DnsAnswer>>) {
        let meta_len = std::mem::size_of::<DnsCaptureMeta>();
        let Some(meta_bytes) = bytes.get(..meta_len) else {
            return;
        };
        // SAFETY: DnsCaptureMeta is a padded `repr(C)` POD of exactly `meta_len` bytes, valid
        // for any bit pattern; read unaligned.
        let meta: DnsCaptureMeta = unsafe { std::ptr::read_unaligned(meta_bytes.as_ptr().cast()) };
        let end = (meta_len + meta.captured_len as usize).min(bytes.len());
        let frame = &bytes[meta_len..end];
        let mut learner = lock(&self.learner);
        out.extend(learner.ingest(frame, meta.ts_ns).into_iter().map(Arc::new));
    }

    /// The ring buffer, opened afresh from the kept descriptor.
    fn open_ring(&self) -> Result<Option<plane::Ring>> {
        let inner = lock(&self.inner);
        inner
            .ring
            .as_ref()
            .map(|fd| crate::bpf::ringbuf::reopen(fd, "DNS_EVENTS"))
            .transpose()
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
        let (plane, ring) = DnsPlane::start(settings).map_err(|e| format!("cannot load: {e}"))?;
        let mut inner = lock(&self.inner);
        inner.plane = Some(plane);
        inner.ring = Some(
            ring.as_fd()
                .try_clone_to_owned()
                .map_err(|e| format!("cannot keep the ring buffer: {e}"))?,
        );
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
            // TCX attachment and the ring buffer.
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
            let Some(ring) = self.open_ring()? else {
                let mut cancel = cancel;
                cancel.cancelled().await;
                return Ok(());
            };
            // The programs wake the reader only past a watermark; the rest is read on a tick.
            let me = Arc::clone(&self);
            let topic = Arc::clone(&self.answers);
            let readers = crate::bpf::ringbuf::drain_records(
                ring,
                topic,
                1024,
                Some(READ_TICK),
                cancel.clone(),
                move |bytes, out| me.record(bytes, out),
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
            a.and(b)
        })
    }

    fn health(&self) -> Health {
        lock(&self.inner).health.clone()
    }

    fn collectors(self: Arc<Self>) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![Box::new(metrics_collector(self))]
    }

    fn routes(self: Arc<Self>) -> axum::Router {
        use crate::server::{get_blocking, get_query_blocking};
        let me = Arc::clone(&self);
        let status = get_blocking(move || me.status());
        let me = Arc::clone(&self);
        let names = get_query_blocking(move |q: DnsNamesQuery| me.names(&q));
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
                    "DNS responses not seen, by cause (rate_limited, buffer_full)",
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
