//! Bus throughput (criterion): events per second through one `datapath::bus::Topic<T>` with
//! 4 subscribers, each on its own thread (a current-thread tokio runtime, as a controller's run
//! loop is a task) draining with `recv_many`.
//!
//! - `4 keep up, buffer 65536`: 4 subscribers that only drain, with a buffer of a whole batch,
//!   so that nothing can be lost (asserted): every event reaches all 4. Time: from the first
//!   publish of a batch until every subscriber has received all of it.
//! - `4 drain, buffer 4096`: the same with the daemon's buffer (`EVENT_BUFFER`). On 2 CPUs the
//!   5 threads take turns, and a subscriber that is not running while the publisher fills its
//!   4096 slots loses the oldest: those losses are counted and printed. Time: until every
//!   subscriber has accounted for the batch (received or counted lost).
//! - `3 + 1 slow, buffer 4096`: 3 such subscribers and one that sleeps 1 ms after every 64
//!   events (about 60,000 events/s, far below the publish rate), so it loses most of them.
//!   Time: until the 3 fast ones are done; the slow one then drains its buffer untimed.
//!
//! Each case runs twice: one `publish` per event, and `publish_batch` of 256 events (what the
//! ring-buffer drain does: the records of one wake-up in one call, one lock and one wake-up per
//! subscriber).
//!
//! Event types: `datapath::ct::FlowEventView` itself (a deep clone per subscriber, 8 heap
//! strings) and `Arc<FlowEventView>` (what the daemon's `flow_events` topic carries: one
//! reference count per subscriber). The events of a batch are
//! built before the clock runs,
//! so the figure is the bus's cost, not the event's construction.
//!
//! Every event carries its sequence number (in `ts_ns`). Each subscriber checks that it sees
//! them in order and adds up the gaps; after every measured call the bench asserts, for every
//! subscriber, that the topic's `delivered` equals what the subscriber received, its `lost`
//! equals the gaps it saw, and `delivered + lost == published`: each loss is counted exactly.
//!
//! `cargo test --benches` runs each benchmark once (and so each check). No root needed.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use datapath::{
    bus::{Bus, Subscriber, Topic, TopicStats as _},
    ct::{EVENT_BUFFER, FlowEventView},
};

/// Events published per measured iteration.
const BATCH: u64 = 65_536;
/// Events per `publish_batch` in the batched cases: what one wake-up of the ring-buffer drain
/// publishes under load (it reads up to the ring's records per wake-up).
const RING_BATCH: usize = 256;
/// Most events one `recv_many` takes, as the daemon's consumers do.
const RECV_MAX: usize = 256;
/// The sequence number that tells a subscriber thread to stop (never counted).
const STOP: u64 = u64::MAX;
/// Longest any wait for the subscribers may last before the bench fails.
const WAIT_LIMIT: Duration = Duration::from_secs(60);
const NAMES: [&str; 4] = ["sub0", "sub1", "sub2", "sub3"];

/// An event the bench can number and recognise.
trait Event: Clone + Send + Sync + 'static {
    fn numbered(template: &FlowEventView, seq: u64) -> Self;
    fn seq(&self) -> u64;
}

impl Event for FlowEventView {
    fn numbered(template: &FlowEventView, seq: u64) -> Self {
        FlowEventView {
            ts_ns: seq,
            ..template.clone()
        }
    }
    fn seq(&self) -> u64 {
        self.ts_ns
    }
}

impl Event for Arc<FlowEventView> {
    fn numbered(template: &FlowEventView, seq: u64) -> Self {
        Arc::new(FlowEventView::numbered(template, seq))
    }
    fn seq(&self) -> u64 {
        self.ts_ns
    }
}

/// A typical `closed` event, with the strings the daemon fills in.
fn template() -> FlowEventView {
    FlowEventView {
        kind: "closed".into(),
        ts_ns: 0,
        protocol: "tcp".into(),
        src: "198.18.0.2".into(),
        src_port: 40_312,
        dst: "198.18.100.1".into(),
        dst_port: 80,
        interface: "veth-pod17".into(),
        direction: "ingress".into(),
        rule: Some(3),
        rule_name: Some("web".into()),
        state: "time_wait".into(),
        packets_orig: 12,
        packets_reply: 10,
        bytes_orig: 1_840,
        bytes_reply: 14_220,
        duration_ns: 52_000_000,
        rtt_ns: 180_000,
        dst_name: Some("api.example.com".into()),
        src_name: None,
        pid: None,
        exe: None,
    }
}

/// What one subscriber thread saw, published after every batch it handled.
#[derive(Default)]
struct Seen {
    received: AtomicU64,
    /// Sum of the gaps in the sequence numbers: events it never saw.
    gaps: AtomicU64,
    /// `Subscriber::lost` after its last batch.
    lost: AtomicU64,
    /// Events that came out of order (must stay 0).
    disorder: AtomicU64,
}

impl Seen {
    /// Everything up to `published` is either received or counted lost.
    fn accounted(&self, published: u64) -> bool {
        self.received.load(Ordering::Acquire) + self.lost.load(Ordering::Acquire) >= published
    }
}

fn drain<T: Event>(mut sub: Subscriber<T>, seen: Arc<Seen>, slow: bool) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime");
    runtime.block_on(async move {
        let max = if slow { 64 } else { RECV_MAX };
        let mut batch = Vec::with_capacity(max);
        let mut next = 0u64;
        loop {
            sub.recv_many(&mut batch, max).await;
            let mut received = 0;
            for event in batch.drain(..) {
                let seq = event.seq();
                if seq == STOP {
                    return;
                }
                if seq < next {
                    seen.disorder.fetch_add(1, Ordering::Relaxed);
                } else {
                    seen.gaps.fetch_add(seq - next, Ordering::Relaxed);
                    next = seq + 1;
                }
                received += 1;
            }
            seen.lost.store(sub.lost(), Ordering::Release);
            seen.received.fetch_add(received, Ordering::Release);
            if slow {
                // A consumer doing real work per batch (a disk write, a slow client).
                thread::sleep(Duration::from_millis(1));
            }
        }
    });
}

/// A topic with 4 subscriber threads (the last one slow if `slow`).
struct Rig<T: Event> {
    topic: Arc<Topic<T>>,
    seen: Vec<Arc<Seen>>,
    threads: Vec<thread::JoinHandle<()>>,
    template: FlowEventView,
    next_seq: u64,
}

impl<T: Event> Rig<T> {
    fn new(slow: bool, capacity: usize) -> Self {
        let bus = Bus::new();
        let topic = bus
            .topic::<T>("bench_flow_events", capacity)
            .expect("a new topic");
        let mut seen = Vec::new();
        let mut threads = Vec::new();
        for (i, name) in NAMES.iter().enumerate() {
            let sub = topic.subscribe(name);
            let s = Arc::new(Seen::default());
            seen.push(Arc::clone(&s));
            let is_slow = slow && i == NAMES.len() - 1;
            threads.push(
                thread::Builder::new()
                    .name(name.to_string())
                    .spawn(move || drain(sub, s, is_slow))
                    .expect("spawn a subscriber"),
            );
        }
        Self {
            topic,
            seen,
            threads,
            template: template(),
            next_seq: 0,
        }
    }

    /// Waits (bounded) until the subscribers `which` have accounted for every event.
    fn wait(&self, which: &[Arc<Seen>]) {
        let published = self.next_seq;
        let started = Instant::now();
        while !which.iter().all(|s| s.accounted(published)) {
            assert!(
                started.elapsed() < WAIT_LIMIT,
                "subscribers did not catch up within {WAIT_LIMIT:?}"
            );
            // Sleep rather than spin: on 2 CPUs a spinning waiter takes a subscriber's CPU.
            thread::sleep(Duration::from_micros(20));
        }
    }

    /// Publishes `iters` batches, `per_call` events per publish call (1: `publish`; more:
    /// `publish_batch`, as the ring-buffer drain publishes the records of one wake-up); the
    /// time until the subscribers that are not slow are done.
    fn run(&mut self, iters: u64, slow: bool, per_call: usize) -> Duration {
        let fast = if slow {
            &self.seen[..NAMES.len() - 1]
        } else {
            &self.seen[..]
        };
        let fast = fast.to_vec();
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            let events: Vec<T> = (self.next_seq..self.next_seq + BATCH)
                .map(|seq| T::numbered(&self.template, seq))
                .collect();
            let started = Instant::now();
            if per_call <= 1 {
                for event in events {
                    self.topic.publish(event);
                }
            } else {
                let mut events = events.into_iter();
                loop {
                    let chunk: Vec<T> = events.by_ref().take(per_call).collect();
                    if chunk.is_empty() {
                        break;
                    }
                    self.topic.publish_batch(chunk);
                }
            }
            self.next_seq += BATCH;
            self.wait(&fast);
            total += started.elapsed();
        }
        // Untimed: the slow subscriber works through what is left in its buffer.
        self.wait(&self.seen);
        self.check();
        total
    }

    /// Every event delivered or counted lost, for every subscriber, exactly.
    fn check(&self) {
        let published = self.topic.published();
        assert_eq!(published, self.next_seq, "published counter");
        let stats = self.topic.subscribers();
        for (name, seen) in NAMES.iter().zip(&self.seen) {
            let counts = stats[name];
            let received = seen.received.load(Ordering::Acquire);
            let gaps = seen.gaps.load(Ordering::Acquire);
            assert_eq!(
                seen.disorder.load(Ordering::Acquire),
                0,
                "{name}: out of order"
            );
            assert_eq!(counts.delivered, received, "{name}: delivered vs received");
            assert_eq!(counts.lost, gaps, "{name}: lost vs gaps seen");
            assert_eq!(
                counts.delivered + counts.lost,
                published,
                "{name}: delivered + lost != published"
            );
        }
    }

    /// Stops the threads; returns (published, lost per subscriber).
    fn finish(self) -> (u64, Vec<u64>) {
        self.check();
        let published = self.topic.published();
        let lost = NAMES
            .iter()
            .map(|name| self.topic.subscribers()[name].lost)
            .collect();
        let mut stop = self.template.clone();
        stop.ts_ns = STOP;
        // The newest event is never the one dropped, so every subscriber gets the stop.
        self.topic.publish(T::numbered(&stop, STOP));
        for thread in self.threads {
            thread.join().expect("a subscriber thread panicked");
        }
        (published, lost)
    }
}

fn bench_type<T: Event>(c: &mut Criterion, type_name: &str) {
    let mut group = c.benchmark_group(format!("bus_{type_name}"));
    group.throughput(Throughput::Elements(BATCH));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(5));
    for (case, slow, capacity, per_call) in [
        ("4 keep up, buffer 65536", false, BATCH as usize, 1),
        ("4 drain, buffer 4096", false, EVENT_BUFFER, 1),
        ("3 + 1 slow, buffer 4096", true, EVENT_BUFFER, 1),
        (
            "4 keep up, buffer 65536, batches of 256",
            false,
            BATCH as usize,
            RING_BATCH,
        ),
        (
            "4 drain, buffer 4096, batches of 256",
            false,
            EVENT_BUFFER,
            RING_BATCH,
        ),
        (
            "3 + 1 slow, buffer 4096, batches of 256",
            true,
            EVENT_BUFFER,
            RING_BATCH,
        ),
    ] {
        let mut rig = Rig::<T>::new(slow, capacity);
        group.bench_function(BenchmarkId::new(case, BATCH), |b| {
            b.iter_custom(|iters| rig.run(iters, slow, per_call));
        });
        let (published, lost) = rig.finish();
        if capacity as u64 >= BATCH {
            // Every batch starts on empty buffers (the last one was waited for) and holds no
            // more than a buffer: a loss here would be a bug in the topic.
            assert!(lost.iter().all(|&l| l == 0), "{case}: lost {lost:?}");
        }
        // Checked above; printed so that RESULTS.md can quote the losses of the whole run.
        println!(
            "bus_{type_name}/{case}: published {published}, lost per subscriber {lost:?} \
             (delivered + lost == published checked for each)"
        );
    }
    group.finish();
}

fn bus(c: &mut Criterion) {
    bench_type::<Arc<FlowEventView>>(c, "arc_flow_event");
    bench_type::<FlowEventView>(c, "flow_event");
}

criterion_group!(benches, bus);
criterion_main!(benches);
