//! The daemon's ring-buffer reader (`datapath::bpf::ringbuf`) against a real BPF ring: the
//! records `tc_trace_producer` (bpf-perf) writes through BPF_PROG_TEST_RUN arrive on the bus
//! whole, in order, once each, across many wraps of the ring and with a full ring refusing
//! writes; and the reader is woken by the kernel every time it has caught up (these runs have no
//! tick, so a lost wake-up hangs a run until its deadline and fails it).
use std::time::{Duration, Instant};

use bpf_common::trace::{EVENT_EXEC, PROCESS_EVENT_BEFORE_ARGS, ProcessEvent};
use dp_perf::exec::TraceProducer;

/// What a record says about itself: (pid, ts_ns, length). The producer numbers its records by
/// how many it wrote before on its CPU (pid = n | 0x4000_0000, ts_ns = 1_000_000 + n), so the
/// producing thread is pinned.
type Seen = (u32, u64, usize);

struct Setup {
    producer: TraceProducer,
}

fn setup() -> Option<Setup> {
    if !netns_tests::privilege::privileged_as_root("loading BPF programs and BPF_PROG_TEST_RUN") {
        return None;
    }
    let producer =
        TraceProducer::load(dp_perf::exec::Wakeups::WhenCaughtUp).expect("load tc_trace_producer");
    netns_tests::cpu::pin_here().expect("pin the producing thread");
    Some(Setup { producer })
}

impl Setup {
    /// Runs the producer `calls` times `repeat` times; answers (written, refused) so far.
    fn produce(&self, calls: u32, repeat: u32) -> (u64, u64) {
        self.producer.produce(calls, repeat).expect("produce");
        self.producer.counts().expect("counts")
    }

    fn take_ring(&mut self) -> aya::maps::RingBuf<aya::maps::MapData> {
        self.producer.ring.take().expect("ring")
    }
}

/// Starts `drain_records` with no tick on its own runtime thread; every record is reported as
/// what it says about itself. Answers the subscriber and the cancel handle (and the thread).
fn start_reader(
    ring: aya::maps::RingBuf<aya::maps::MapData>,
) -> (
    datapath::bus::Subscriber<Seen>,
    datapath::controller::CancelHandle,
    std::thread::JoinHandle<()>,
) {
    let bus = datapath::bus::Bus::new();
    let topic = bus.topic::<Seen>("ring.test", 1 << 20).expect("topic");
    let subscriber = topic.subscribe("test");
    let cancel = datapath::controller::CancelHandle::new();
    let token = cancel.token();
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime
            .block_on(datapath::bpf::ringbuf::drain_records(
                ring,
                topic,
                256,
                None,
                token,
                |bytes, out| {
                    assert!(bytes.len() >= PROCESS_EVENT_BEFORE_ARGS, "short record");
                    let mut e = std::mem::MaybeUninit::<ProcessEvent>::zeroed();
                    let n = bytes.len().min(std::mem::size_of::<ProcessEvent>());
                    // SAFETY: at most the event's size is copied into a zeroed POD of the ABI.
                    let e = unsafe {
                        std::ptr::copy_nonoverlapping(bytes.as_ptr(), e.as_mut_ptr().cast(), n);
                        e.assume_init()
                    };
                    assert_eq!(e.kind, EVENT_EXEC);
                    out.push((e.pid, e.ts_ns, bytes.len()));
                },
            ))
            .expect("drain_records");
    });
    (subscriber, cancel, thread)
}

/// Receives until `want` records arrived or `deadline` passed.
fn receive(
    subscriber: &mut datapath::bus::Subscriber<Seen>,
    want: u64,
    deadline: Instant,
) -> Vec<Seen> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut all = Vec::new();
    runtime.block_on(async {
        while (all.len() as u64) < want {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut batch = Vec::new();
            match tokio::time::timeout(left, subscriber.recv_many(&mut batch, 4096)).await {
                Ok(_) => all.extend(batch),
                Err(_) => return,
            }
        }
    });
    all
}

fn assert_in_order(seen: &[Seen], from: u64) {
    let expected_len = seen.first().map_or(0, |s| s.2);
    for (i, (pid, ts_ns, len)) in seen.iter().enumerate() {
        let n = from + i as u64;
        assert_eq!(
            (*pid, *ts_ns, *len),
            ((n as u32) | 0x4000_0000, 1_000_000 + n, expected_len),
            "record {i} of the run"
        );
    }
}

#[test]
fn the_reader_is_woken_each_time_it_catches_up_and_gets_every_record_once_in_order() {
    let Some(mut s) = setup() else { return };
    let (mut subscriber, cancel, thread) = start_reader(s.take_ring());
    // Let the reader reach its first wait. Then rounds of three phases, each waiting for what
    // it wrote: a flood larger than the ring (the 8 MiB ring holds about 21,800 of these
    // records, so some are refused); a stream of single records, one a syscall, slower than the
    // reader, so it catches up again and again while records keep coming (the race between
    // publishing its position and the next commit); a trickle of 200 calls of 5 records (the
    // reader drains and sleeps between calls, and must be woken each time). 30 rounds wrap the
    // ring about 40 times.
    std::thread::sleep(Duration::from_millis(50));
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut got = Vec::new();
    let mut refused_before = 0;
    for round in 1..=30 {
        for (phase, calls, repeat) in [
            ("flood", 1, 30_000),
            ("stream", 2_000, 1),
            ("trickle", 200, 5),
        ] {
            let (written, refused) = s.produce(calls, repeat);
            if phase != "flood" {
                assert_eq!(refused, refused_before, "round {round}: the {phase} fits");
            }
            refused_before = refused;
            got.extend(receive(
                &mut subscriber,
                written - got.len() as u64,
                deadline,
            ));
            assert_eq!(
                got.len() as u64,
                written,
                "round {round}, {phase}: the reader was not woken for what was written (no tick here)"
            );
        }
    }
    assert!(refused_before > 0, "the floods never filled the ring");
    assert_in_order(&got, 0);
    cancel.cancel();
    thread.join().expect("reader thread");
}

#[test]
fn a_full_ring_refuses_writes_and_the_reader_then_gets_every_written_record() {
    let Some(mut s) = setup() else { return };
    // Fill the ring before any reader exists: it refuses what does not fit.
    let (written, refused) = s.produce(1, 40_000);
    assert!(
        written > 20_000 && written < 40_000 && refused == 40_000 - written,
        "written {written}, refused {refused}"
    );
    let (mut subscriber, cancel, thread) = start_reader(s.take_ring());
    // The records already there: the reader's first read finds them, with no new wake-up.
    let deadline = Instant::now() + Duration::from_secs(30);
    let first = receive(&mut subscriber, written, deadline);
    assert_eq!(first.len() as u64, written, "the records of the full ring");
    assert_in_order(&first, 0);
    // Writing goes on where it stopped, and is read.
    let (more, refused_after) = s.produce(1, 10_000);
    assert_eq!((more, refused_after), (written + 10_000, refused));
    let rest = receive(&mut subscriber, 10_000, deadline);
    assert_eq!(rest.len(), 10_000);
    assert_in_order(&rest, written);
    cancel.cancel();
    thread.join().expect("reader thread");
}
