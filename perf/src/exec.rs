//! `dp-bench --only exec`: what following processes costs (issue 16).
//!
//! - **Ring record to cache, one core**: the daemon's own path for a record of the tracer
//!   (`datapath::exec::ingest`: decode, then `ProcessCache::apply`) over synthetic records: exec,
//!   then exit, of distinct processes with five arguments each. Records per second, median
//!   over rounds. The bus's publish is measured on its own (`perf/benches/bus.rs`).
//! - **fork+exec overhead**: `/bin/true` spawned and waited for, in rounds with the tracer
//!   attached (a reader draining its ring into a cache on another thread, as the daemon does)
//!   and rounds without it, interleaved; the ratio of the medians. The tracer is host-wide:
//!   whatever else runs on the machine is traced too.
//! - **Memory at 10,000 processes**: heap bytes (glibc's `mallinfo2`) of a cache of 10,000
//!   processes, each with a path, five arguments and a cgroup path.
//! - **Kernel ring buffer to the bus**: `tc_trace_producer` (bpf-perf), run through
//!   BPF_PROG_TEST_RUN on one thread, writes exec records into a ring of the tracer's size as
//!   fast as the kernel can; the daemon's own reader (`bpf::ringbuf::drain_records` with the
//!   controller's `exec::ingest` and cache) drains it into a bus topic on a tokio runtime, and a
//!   subscriber counts what arrives. Records delivered per second (first record written to
//!   last delivered), with the records the full ring refused counted as lost.
use std::{
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use bpf_common::trace::{EVENT_EXEC, EVENT_EXIT, MAX_ARGS, MAX_FILENAME, ProcessEvent};
use datapath::exec::{
    cache::{Event, Process, ProcessCache},
    ingest,
    plane::{self, TracePlane},
};
use serde::Serialize;

use crate::report::Summary;

#[derive(Debug, Serialize)]
pub struct ExecReport {
    pub records_per_round: usize,
    /// Records decoded and applied per second, one core.
    pub records_per_second: Summary,
    pub spawns_per_round: usize,
    /// Microseconds per spawn and wait of `/bin/true`, per round.
    pub spawn_us_off: Summary,
    pub spawn_us_on: Summary,
    /// Events the reader took from the ring during the "on" rounds, and those the tracer
    /// could not send.
    pub traced_events: u64,
    pub lost_events: u64,
    pub memory_bytes_10k: f64,
    /// Records the producer wrote per round (lost ones included).
    pub ring_records_per_round: u64,
    /// Records delivered to the bus subscriber per second, per round.
    pub ring_to_bus_per_second: Summary,
    /// Of all rounds: records delivered, and refused by the full ring.
    pub ring_delivered: u64,
    pub ring_lost: u64,
    /// The baseline of the same run: the same drain with aya's `RingBuf::next` as the reader
    /// (the consumer position published after every record), as the daemon read before.
    pub ring_aya_per_second: Summary,
    pub ring_aya_delivered: u64,
    pub ring_aya_lost: u64,
}

/// Which reader drains the ring in a kernel-to-bus round.
#[derive(Clone, Copy)]
enum Reader {
    /// The daemon's (`datapath::bpf::ringbuf`): the consumer position published per batch.
    Daemon,
    /// aya's `RingBuf::next`, the baseline.
    AyaNext,
}

/// aya's `RingBuf::next` as a record source (the consumer position published after every
/// record), as the daemon read before: the baseline of the ring rows.
struct AyaNext(aya::maps::RingBuf<aya::maps::MapData>);

impl std::os::fd::AsRawFd for AyaNext {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

impl datapath::bpf::ringbuf::RecordSource for AyaNext {
    fn read_batch(&mut self, max: usize, each: &mut dyn FnMut(&[u8])) -> bool {
        for _ in 0..max {
            let Some(item) = self.0.next() else {
                return true;
            };
            each(&item);
        }
        false
    }
}

/// `tc_trace_producer` (bpf-perf) loaded, with its ring and counters taken out: what writes
/// exec records into a ring of the tracer's size for the ring rows and
/// `perf/tests/ring_reader.rs`.
pub struct TraceProducer {
    ebpf: aya::Ebpf,
    /// `TRACE_RING`, until a reader takes it.
    pub ring: Option<aya::maps::RingBuf<aya::maps::MapData>>,
    counts: aya::maps::PerCpuArray<aya::maps::MapData, u64>,
}

/// How the producer asks the kernel to wake the reader.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wakeups {
    /// As the tracer: each time another eighth of the ring waits (the reader's tick reads the
    /// rest).
    AsTracer,
    /// Whenever the reader had caught up (flags 0): a lost wake-up then hangs the reader.
    WhenCaughtUp,
}

impl TraceProducer {
    pub fn load(wakeups: Wakeups) -> Result<Self> {
        use aya::{
            maps::{PerCpuArray, RingBuf},
            programs::SchedClassifier,
        };
        ensure!(
            !crate::bpf::PERF_OBJECT.is_empty(),
            "dp-perf was built without its BPF programs"
        );
        let mut ebpf = aya::EbpfLoader::new()
            .override_global("TRACE_WAKE_EVERY", &0u64, true)
            .override_global(
                "TRACE_WAKE_AS_TRACER",
                &u32::from(wakeups == Wakeups::AsTracer),
                true,
            )
            .load(crate::bpf::PERF_OBJECT)
            .context("load the bpf-perf object")?;
        let producer: &mut SchedClassifier = ebpf
            .program_mut("tc_trace_producer")
            .context("tc_trace_producer missing")?
            .try_into()
            .context("tc_trace_producer is not a classifier")?;
        datapath::bpf::load_retrying(|| producer.load()).context("load tc_trace_producer")?;
        let ring = RingBuf::try_from(ebpf.take_map("TRACE_RING").context("TRACE_RING")?)?;
        let counts =
            PerCpuArray::try_from(ebpf.take_map("TRACE_PRODUCED").context("TRACE_PRODUCED")?)?;
        Ok(Self {
            ebpf,
            ring: Some(ring),
            counts,
        })
    }

    /// Runs the producer `calls` times `repeat` times (BPF_PROG_TEST_RUN); a record a run.
    pub fn produce(&self, calls: u32, repeat: u32) -> Result<()> {
        use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions};
        let producer: &SchedClassifier = self
            .ebpf
            .program("tc_trace_producer")
            .context("tc_trace_producer")?
            .try_into()?;
        let frame = [0u8; 64];
        for _ in 0..calls {
            let mut opts = TestRunOptions::new();
            opts.data_in = Some(&frame);
            opts.repeat = repeat;
            producer.test_run(opts).context("BPF_PROG_TEST_RUN")?;
        }
        Ok(())
    }

    /// Records written so far, and refused by the full ring, over all CPUs.
    pub fn counts(&self) -> Result<(u64, u64)> {
        let sum = |i: u32| -> Result<u64> { Ok(self.counts.get(&i, 0)?.iter().sum()) };
        Ok((sum(0)?, sum(1)?))
    }
}

/// One round of the kernel-to-bus measurement: (delivered per second, delivered, lost).
fn ring_to_bus_round(records: u64, reader_kind: Reader) -> Result<(f64, u64, u64)> {
    let mut producer = TraceProducer::load(Wakeups::AsTracer)?;
    let ring = producer.ring.take().context("TRACE_RING")?;
    let bus = datapath::bus::Bus::new();
    let topic = bus.topic::<Arc<Event>>("exec.events", 4096)?;
    let mut subscriber = topic.subscribe("bench");
    let cancel = datapath::controller::CancelHandle::new();
    let token = cancel.token();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let cache = Arc::new(Mutex::new(ProcessCache::new(65_536, 30_000_000_000)));
    let two_cpus = std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2);
    let delivered = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let last = Arc::new(Mutex::new(Instant::now()));
    let consumer = {
        let (delivered, last) = (Arc::clone(&delivered), Arc::clone(&last));
        let no_cgroup = |_id: u64| None;
        std::thread::spawn(move || -> Result<()> {
            // The reader on its own CPU, the producer on another (below): left to the scheduler,
            // the reader's wake-ups pull it onto the producer's CPU, and the two then share one.
            if two_cpus {
                netns_tests::cpu::pin_to(1).context("pin the reader to CPU 1")?;
            }
            runtime.block_on(async move {
                let each = move |bytes: &[u8], out: &mut Vec<Arc<Event>>| {
                    if let Some(e) = ingest(&cache, bytes, 100, &no_cgroup) {
                        out.push(Arc::new(e));
                    }
                };
                let tick = Duration::from_millis(100);
                let reader_token = token.clone();
                let reader = async move {
                    match reader_kind {
                        Reader::Daemon => datapath::bpf::ringbuf::drain_records(
                            ring,
                            topic,
                            1024,
                            Some(tick),
                            reader_token,
                            each,
                        )
                        .await
                        .map_err(anyhow::Error::from),
                        Reader::AyaNext => datapath::bpf::ringbuf::drain_source(
                            AyaNext(ring),
                            topic,
                            1024,
                            Some(tick),
                            reader_token,
                            each,
                        )
                        .await
                        .map_err(anyhow::Error::from),
                    }
                };
                let mut stop = token;
                let count = async move {
                    let mut batch = Vec::with_capacity(4096);
                    loop {
                        tokio::select! {
                            n = subscriber.recv_many(&mut batch, 4096) => {
                                batch.clear();
                                delivered.fetch_add(n as u64, Ordering::Relaxed);
                                *last.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
                            }
                            _ = stop.cancelled() => return,
                        }
                    }
                };
                let (r, ()) = tokio::join!(reader, count);
                r
            })
        })
    };
    // Let the reader reach its first wait.
    std::thread::sleep(Duration::from_millis(50));
    let start = Instant::now();
    let deadline = start + Duration::from_secs(60);
    let producer = &producer;
    std::thread::scope(|scope| {
        scope
            .spawn(|| -> Result<()> {
                if two_cpus {
                    netns_tests::cpu::pin_to(0).context("pin the producer to CPU 0")?;
                }
                // Until `records` are in the ring: the producer outruns any reader, so the ring
                // stays full, the reader never waits, and what it delivers is its capacity.
                while producer.counts()?.0 < records && Instant::now() < deadline {
                    producer.produce(1, 10_000)?;
                }
                Ok(())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the producer panicked"))?
    })?;
    let (written, lost) = producer.counts()?;
    let produced_secs = start.elapsed().as_secs_f64();
    // Every written record reaches the subscriber (the reader's tick drains a quiet ring).
    while delivered.load(Ordering::Relaxed) < written && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let secs = last
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .duration_since(start)
        .as_secs_f64();
    cancel.cancel();
    consumer
        .join()
        .map_err(|_| anyhow::anyhow!("the reader panicked"))??;
    let got = delivered.load(Ordering::Relaxed);
    ensure!(
        got == written,
        "{got} of {written} written records delivered"
    );
    eprintln!(
        "  ring round: {:.0} records/s offered by the producer ({lost} refused by the full ring), {:.0}/s delivered",
        (written + lost) as f64 / produced_secs,
        got as f64 / secs
    );
    Ok((got as f64 / secs, got, lost))
}

fn record(kind: u8, pid: u32, i: u64) -> Vec<u8> {
    let mut e = ProcessEvent {
        ts_ns: 1_000_000 + i,
        start_ns: 10_000_000_000 + i * 10_000_000,
        parent_start_ns: 1_000_000_000,
        cgroup_id: 4242,
        pid,
        ppid: 1,
        uid: 1000,
        exit_code: 0,
        kind,
        verdict: 0,
        filename_len: 0,
        args_len: 0,
        rule: 0,
        comm: [0; 16],
        filename: [0; MAX_FILENAME],
        args: [0; MAX_ARGS],
    };
    let exe = b"/usr/bin/python3";
    e.filename[..exe.len()].copy_from_slice(exe);
    e.filename_len = exe.len() as u16;
    let args = format!("python3\0-m\0http.server\0--bind\0198.18.0.{}\0", i % 250);
    e.args[..args.len()].copy_from_slice(args.as_bytes());
    e.args_len = args.len() as u16;
    e.comm[..7].copy_from_slice(b"python3");
    // SAFETY: a padded POD of the ABI, viewed as its bytes.
    unsafe {
        std::slice::from_raw_parts(
            std::ptr::addr_of!(e).cast::<u8>(),
            std::mem::size_of::<ProcessEvent>(),
        )
    }
    .to_vec()
}

fn decode_rounds(records: usize, rounds: usize) -> Result<Summary> {
    // The daemon names each cgroup id once and shares the name (`exec::cache::Cgroup`).
    let name = datapath::exec::cache::Cgroup::new(
        "/kubepods.slice/kubepods-pod0f6e37b8_8f0f_4c8e_9a5b_1c2d3e4f5a6b.slice",
    );
    let cgroup = move |_id: u64| Some(name.clone());
    let mut rates = Vec::new();
    for round in 0..rounds {
        let base = (round * records) as u64;
        let batch: Vec<Vec<u8>> = (0..records as u64)
            .flat_map(|i| {
                let pid = 100_000 + (i % 1_000_000) as u32;
                [
                    record(EVENT_EXEC, pid, base + i),
                    record(EVENT_EXIT, pid, base + i),
                ]
            })
            .collect();
        let cache = Mutex::new(ProcessCache::new(65_536, 30_000_000_000));
        let t = Instant::now();
        let mut applied = 0usize;
        for r in &batch {
            if let Some(e) = ingest(&cache, r, 100, &cgroup) {
                // What the daemon publishes; the subscriber's drop is not timed here.
                std::hint::black_box(e);
                applied += 1;
            }
        }
        let secs = t.elapsed().as_secs_f64();
        ensure!(
            applied == batch.len(),
            "{applied} of {} records decoded",
            batch.len()
        );
        rates.push(batch.len() as f64 / secs);
    }
    Summary::of(&rates).context("no rounds")
}

/// Microseconds per spawn-and-wait of `/bin/true`, over `n` spawns.
fn spawn_round(n: usize) -> Result<f64> {
    let t = Instant::now();
    for _ in 0..n {
        let status = Command::new("/bin/true")
            .status()
            .context("spawn /bin/true")?;
        ensure!(status.success(), "/bin/true failed");
    }
    Ok(t.elapsed().as_secs_f64() * 1e6 / n as f64)
}

fn memory_of_processes(n: u32) -> f64 {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    let in_use = || unsafe { libc::mallinfo2() }.uordblks as f64;
    let before = in_use();
    let mut cache = ProcessCache::new(n as usize, 30_000_000_000);
    for pid in 0..n {
        // As the daemon's decode makes them: program and command shared, the rest each its own.
        let (exe, comm) = (cache.intern("/usr/bin/python3"), cache.intern("python3"));
        let cgroup = datapath::exec::cache::Cgroup::new(&format!(
            "/kubepods.slice/kubepods-pod{pid:032x}.slice"
        ));
        cache.apply(Event::Exec {
            process: Process {
                pid,
                start_ticks: u64::from(pid) + 1_000,
                ppid: 1,
                parent_start_ticks: 1,
                exe,
                args: ["python3", "-m", "http.server", "--bind", "198.18.0.1"]
                    .into_iter()
                    .collect(),
                comm,
                uid: 1000,
                cgroup_id: 4242,
                cgroup: Some(cgroup),
                ..Process::default()
            },
            verdict: None,
        });
    }
    let after = in_use();
    assert_eq!(cache.stats().entries, n as usize);
    drop(std::hint::black_box(cache));
    after - before
}

pub fn run(smoke: bool) -> Result<ExecReport> {
    let (records, rounds) = if smoke { (10_000, 3) } else { (100_000, 7) };
    let records_per_second = decode_rounds(records, rounds)?;

    let btf = kbtf::Btf::from_sys_fs().context("read the kernel's BTF")?;
    let offsets = plane::offsets(&btf).map_err(anyhow::Error::msg)?;
    let spawns = if smoke { 300 } else { 5_000 };
    let spawn_rounds = if smoke { 2 } else { 4 };
    let (mut off, mut on) = (Vec::new(), Vec::new());
    let (mut traced, mut lost) = (0u64, 0u64);
    for _ in 0..spawn_rounds {
        off.push(spawn_round(spawns)?);
        let (tracer, rings) = TracePlane::start(
            1_000_000,
            &offsets,
            &datapath::exec::rules::Resolved::default(),
        )
        .context("load the tracer")?;
        let ring = rings.processes;
        let before = tracer.reasons()?;
        let stop = Arc::new(AtomicBool::new(false));
        let cache = Arc::new(Mutex::new(ProcessCache::new(65_536, 30_000_000_000)));
        let reader = {
            let (stop, cache) = (Arc::clone(&stop), Arc::clone(&cache));
            std::thread::spawn(move || -> u64 {
                let mut ring = ring;
                let mut n = 0;
                let no_cgroup = |_id: u64| None;
                loop {
                    let mut got = false;
                    while let Some(item) = ring.next() {
                        got = true;
                        if ingest(&cache, &item, 100, &no_cgroup).is_some() {
                            n += 1;
                        }
                    }
                    if stop.load(Ordering::Relaxed) && !got {
                        return n;
                    }
                    if !got {
                        // The daemon waits on epoll and a tick; a short sleep here.
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            })
        };
        on.push(spawn_round(spawns)?);
        std::thread::sleep(Duration::from_millis(50));
        stop.store(true, Ordering::Relaxed);
        traced += reader
            .join()
            .map_err(|_| anyhow::anyhow!("reader panicked"))?;
        let after = tracer.reasons()?;
        lost += ["lost", "rate_limited", "read_failed"]
            .iter()
            .map(|k| after[*k] - before[*k])
            .sum::<u64>();
        drop(tracer);
    }
    ensure!(
        traced >= (spawns * spawn_rounds) as u64,
        "the tracer saw {traced} events for {} spawns",
        spawns * spawn_rounds
    );
    let ring_records: u64 = if smoke { 200_000 } else { 2_000_000 };
    let (mut ring_rates, mut ring_delivered, mut ring_lost) = (Vec::new(), 0u64, 0u64);
    let (mut aya_rates, mut aya_delivered, mut aya_lost) = (Vec::new(), 0u64, 0u64);
    for _ in 0..rounds {
        let (rate, got, lost) = ring_to_bus_round(ring_records, Reader::Daemon)?;
        ring_rates.push(rate);
        ring_delivered += got;
        ring_lost += lost;
        let (rate, got, lost) = ring_to_bus_round(ring_records, Reader::AyaNext)?;
        aya_rates.push(rate);
        aya_delivered += got;
        aya_lost += lost;
    }
    Ok(ExecReport {
        ring_records_per_round: ring_records,
        ring_to_bus_per_second: Summary::of(&ring_rates).context("no rounds")?,
        ring_delivered,
        ring_lost,
        ring_aya_per_second: Summary::of(&aya_rates).context("no rounds")?,
        ring_aya_delivered: aya_delivered,
        ring_aya_lost: aya_lost,
        records_per_round: records * 2,
        records_per_second,
        spawns_per_round: spawns,
        spawn_us_off: Summary::of(&off).context("no rounds")?,
        spawn_us_on: Summary::of(&on).context("no rounds")?,
        traced_events: traced,
        lost_events: lost,
        memory_bytes_10k: memory_of_processes(10_000),
    })
}
