//! `dp-bench --only dns`: what learning names from DNS answers costs (issue 15).
//!
//! - **Parsing on one core**: captured frames (Ethernet, IPv4, UDP from port 53, an answer
//!   with a CNAME and an A record, each a different name and address) through the daemon's own
//!   path, `datapath::dns::Learner::ingest`: frame, duplicate check, record-by-record decode,
//!   name store. Rounds of 100,000 frames (the DNS id changes every round, so no frame is a
//!   duplicate); answers per second, median over rounds. Every frame must teach one address.
//! - **Kernel to store, loss counted**: `dns_ingress` run by BPF_PROG_TEST_RUN on one CPU (each
//!   run copies the frame into the ring buffer), a reader on the other CPU draining the ring
//!   into a learner, for two seconds. Answers learned per second, and what was lost (the
//!   kernel's `buffer_full`).
//! - **The capture's cost on other packets**: a TCP frame (not DNS) through `dns_ingress` and
//!   through an empty TCX program (`tc_next`, bpf-perf), interleaved, 1M repeats per round,
//!   ns per packet as the kernel times it; and a DNS answer through `dns_ingress` (its copy
//!   into the ring included).
//! - **Memory per 100,000 names**: heap bytes (glibc's `mallinfo2`) of a name store holding
//!   100,000 entries, each a different name, a CNAME and an address.
use std::{
    net::{IpAddr, Ipv4Addr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions};
use datapath::{
    config::DnsSettings,
    dns::{Learner, plane::DnsPlane},
};
use etherparse::PacketBuilder;
use serde::Serialize;

use crate::{bpf::PerfObject, fuzz::sys::pin_to_cpu, report::Summary};

const CLIENT: [u8; 4] = [198, 18, 0, 1];
const RESOLVER: [u8; 4] = [198, 18, 1, 11];
/// `TCX_NEXT` as the kernel reports a classifier's return value.
const TCX_NEXT: u32 = u32::MAX;

#[derive(Debug, Serialize)]
pub struct DnsReport {
    pub frames_per_round: usize,
    /// Answers learned per second on one core (user space only).
    pub parse_per_second: Summary,
    /// Kernel to store: answers learned per second, over `pipeline_seconds`.
    pub pipeline_per_second: f64,
    pub pipeline_seconds: f64,
    pub pipeline_sent: u64,
    pub pipeline_learned: u64,
    pub pipeline_lost_buffer_full: u64,
    /// ns per packet through `dns_ingress` / `tc_next`, a non-DNS TCP frame.
    pub capture_other_ns: Summary,
    pub empty_ns: Summary,
    /// ns per packet through `dns_ingress`, a DNS answer (its copy into the ring included).
    pub capture_answer_ns: Summary,
    pub memory_bytes_per_100k_names: f64,
}

/// A DNS answer: `svc-<i>.bench.test` CNAME `edge-<i>.cdn.test` A 198.18.(100+i/65536)..
fn answer(i: u32, id: u16) -> Vec<u8> {
    let mut m = id.to_be_bytes().to_vec();
    m.extend([0x81, 0x80, 0, 1, 0, 2, 0, 0, 0, 0]);
    let name = |labels: &[&str]| {
        let mut out = Vec::new();
        for l in labels {
            out.push(l.len() as u8);
            out.extend(l.as_bytes());
        }
        out.push(0);
        out
    };
    let svc = format!("svc-{i}");
    let edge = format!("edge-{i}");
    m.extend(name(&[&svc, "bench", "test"]));
    m.extend([0, 1, 0, 1]);
    // CNAME: owner = the question (pointer to 12), target in full.
    let target = name(&[&edge, "cdn", "test"]);
    let target_at = m.len() + 12;
    m.extend([0xc0, 12, 0, 5, 0, 1, 0, 0, 0, 60]);
    m.extend((target.len() as u16).to_be_bytes());
    m.extend(&target);
    // A: owner = the CNAME target (pointer).
    m.extend([0xc0 | (target_at >> 8) as u8, target_at as u8]);
    m.extend([0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
    m.extend(address(i).octets());
    m
}

fn address(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + i)
}

fn udp_frame(payload: &[u8]) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2([2, 0, 0, 0, 1, 11], [2, 0, 0, 0, 0, 1])
        .ipv4(RESOLVER, CLIENT, 64)
        .udp(53, 40_000);
    let mut out = Vec::with_capacity(builder.size(payload.len()));
    builder
        .write(&mut out, payload)
        .expect("writing to a Vec cannot fail");
    out
}

fn tcp_frame() -> Vec<u8> {
    let builder = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 1, 11])
        .ipv4(CLIENT, RESOLVER, 64)
        .tcp(40_000, 8080, 1, 64_000)
        .ack(1);
    let payload = [0u8; 64];
    let mut out = Vec::with_capacity(builder.size(payload.len()));
    builder
        .write(&mut out, &payload)
        .expect("writing to a Vec cannot fail");
    out
}

fn settings() -> DnsSettings {
    DnsSettings {
        enabled: true,
        capture_rate: 1_000_000,
        max_entries: 1_000_000,
        ..DnsSettings::default()
    }
}

/// One clock for the learner's times (the capture's is CLOCK_MONOTONIC too).
fn now_ns() -> u64 {
    datapath::ct::gc::monotonic_now_ns()
}

fn parse_rounds(frames: usize, rounds: usize) -> Result<Summary> {
    let mut learner = Learner::new(&settings());
    let mut payloads: Vec<Vec<u8>> = (0..frames as u32).map(|i| answer(i, 0)).collect();
    let mut rates = Vec::new();
    for round in 0..rounds {
        for p in &mut payloads {
            p[..2].copy_from_slice(&(round as u16).to_be_bytes());
        }
        let built: Vec<Vec<u8>> = payloads.iter().map(|p| udp_frame(p)).collect();
        let before = learner.counters.answers;
        let t = Instant::now();
        for f in &built {
            std::hint::black_box(learner.ingest(f, now_ns()));
        }
        let secs = t.elapsed().as_secs_f64();
        let learned = learner.counters.answers - before;
        ensure!(
            learned == frames as u64,
            "round {round}: {learned} of {frames} answers learned; errors {:?}",
            learner.counters.parse_errors
        );
        rates.push(frames as f64 / secs);
    }
    Summary::of(&rates).context("no rounds")
}

fn test_run(prog: &SchedClassifier, frame: &[u8], repeat: u32) -> Result<(u32, f64)> {
    let mut out = vec![0u8; frame.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    opts.repeat = repeat;
    let r = prog.test_run(opts).context("BPF_PROG_TEST_RUN")?;
    Ok((r.return_value, r.duration.as_nanos() as f64))
}

/// Kernel to store for `seconds`: the program runs on `producer_cpu`, the reader on
/// `reader_cpu`. Answers (sent, learned, lost to a full ring, elapsed seconds).
fn pipeline(
    plane: &DnsPlane,
    ring: datapath::dns::plane::Ring,
    producer_cpu: usize,
    reader_cpu: usize,
    seconds: f64,
) -> Result<(u64, u64, u64, f64)> {
    let learner = Arc::new(Mutex::new(Learner::new(&settings())));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (learner, stop) = (Arc::clone(&learner), Arc::clone(&stop));
        std::thread::spawn(move || -> Result<()> {
            pin_to_cpu(reader_cpu)?;
            let mut ring = ring;
            let meta = std::mem::size_of::<bpf_common::dns::DnsCaptureMeta>();
            let drain = |ring: &mut datapath::dns::plane::Ring| {
                let mut l = learner.lock().unwrap_or_else(|p| p.into_inner());
                while let Some(item) = ring.next() {
                    let len = u32::from_ne_bytes(item[12..16].try_into().unwrap()) as usize;
                    let end = (meta + len).min(item.len());
                    l.ingest(&item[meta..end], now_ns());
                }
            };
            // Busy-reading: the producer never waits for a wake-up.
            while !stop.load(Ordering::Relaxed) {
                drain(&mut ring);
            }
            drain(&mut ring);
            Ok(())
        })
    };
    pin_to_cpu(producer_cpu)?;
    let prog = plane.program(datapath::dns::plane::PROGRAM_INGRESS)?;
    let mut frames: Vec<Vec<u8>> = (0..65_536u32).map(|i| udp_frame(&answer(i, 1))).collect();
    let before = plane.reasons()?;
    let started = Instant::now();
    let mut sent = 0u64;
    let mut round = 1u16;
    'run: loop {
        for f in &frames {
            let (verdict, _) = test_run(prog, f, 1)?;
            ensure!(verdict == TCX_NEXT, "dns_ingress answered {verdict}");
            sent += 1;
            if sent.is_multiple_of(1024) && started.elapsed().as_secs_f64() >= seconds {
                break 'run;
            }
        }
        // A new id for every frame: the next pass is not a duplicate of this one.
        round = round.wrapping_add(1);
        for f in &mut frames {
            f[42..44].copy_from_slice(&round.to_be_bytes());
            // UDP checksum: zero means none over IPv4.
            f[40..42].copy_from_slice(&[0, 0]);
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    // Let the reader catch up with what is in the ring.
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    let after = plane.reasons()?;
    let learned = learner
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .counters
        .answers;
    let full = after["buffer_full"] - before["buffer_full"];
    Ok((sent, learned, full, elapsed))
}

/// Heap bytes of a store of `n` names (glibc's allocator statistics).
fn memory_of_names(n: u32) -> f64 {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    let in_use = || unsafe { libc::mallinfo2() }.uordblks as f64;
    let before = in_use();
    let mut store = dnsnames::store::NameStore::new(datapath::dns::store_config(&settings()));
    let client = IpAddr::V4(Ipv4Addr::from(CLIENT));
    let resolver = IpAddr::V4(Ipv4Addr::from(RESOLVER));
    for i in 0..n {
        let learned = dnsnames::wire::Learned {
            addr: IpAddr::V4(address(i)),
            names: vec![format!("svc-{i}.bench.test"), format!("edge-{i}.cdn.test")],
            ttl: 60,
        };
        store.insert(client, resolver, &learned, 1);
    }
    let after = in_use();
    assert_eq!(store.len(), n as usize);
    drop(std::hint::black_box(store));
    after - before
}

pub fn run(smoke: bool) -> Result<DnsReport> {
    let (frames, rounds) = if smoke { (10_000, 3) } else { (100_000, 7) };
    let parse = parse_rounds(frames, rounds)?;

    let cpus = crate::bpf::online_cpus()?;
    ensure!(cpus.len() >= 2, "the pipeline needs two CPUs");
    let (plane, mut ring) = DnsPlane::start(&settings()).context("load the DNS capture")?;
    let perf = PerfObject::load()?;
    let empty = perf.classifier(crate::bpf::programs::TC_NEXT)?;
    let capture = plane.program(datapath::dns::plane::PROGRAM_INGRESS)?;
    let other = tcp_frame();
    let dns = udp_frame(&answer(7, 7));
    let repeat = if smoke { 100_000 } else { 1_000_000 };
    let (mut cap, mut base, mut ans) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let (v, ns) = test_run(capture, &other, repeat)?;
        ensure!(v == TCX_NEXT, "dns_ingress answered {v} for a TCP frame");
        cap.push(ns);
        let (v, ns) = test_run(empty, &other, repeat)?;
        ensure!(v == TCX_NEXT, "tc_next answered {v}");
        base.push(ns);
        // Few repeats: each is a ring record that nobody reads until the pipeline drains them.
        let (v, ns) = test_run(capture, &dns, 1_000)?;
        ensure!(v == TCX_NEXT, "dns_ingress answered {v} for an answer");
        ans.push(ns);
    }
    // Drain what the cost rows sent before the pipeline measures.
    while ring.next().is_some() {}
    let seconds = if smoke { 0.5 } else { 2.0 };
    let (sent, learned, full, elapsed) =
        pipeline(&plane, ring, cpus[0] as usize, cpus[1] as usize, seconds)?;
    ensure!(
        learned + full == sent,
        "the pipeline lost track: {sent} sent, {learned} learned, {full} lost"
    );
    Ok(DnsReport {
        frames_per_round: frames,
        parse_per_second: parse,
        pipeline_per_second: learned as f64 / elapsed,
        pipeline_seconds: elapsed,
        pipeline_sent: sent,
        pipeline_learned: learned,
        pipeline_lost_buffer_full: full,
        capture_other_ns: Summary::of(&cap).context("no rounds")?,
        empty_ns: Summary::of(&base).context("no rounds")?,
        capture_answer_ns: Summary::of(&ans).context("no rounds")?,
        memory_bytes_per_100k_names: memory_of_names(100_000),
    })
}
