//! `dp-bench --only kubernetes`: the Kubernetes service source at scale (issue 13), with the
//! real daemon in the forwarding topology's LB namespace and the test suite's stand-in API
//! server (the one stand-in: it serves objects in the real list/watch wire format) on that
//! namespace's loopback:
//!
//! - **initial sync**: 10,000 Services (one ClusterIP port each) and their 10,000
//!   EndpointSlices of 10 endpoints (100,000 backends with distinct pod addresses in
//!   198.18.0.0/15, routed through one gateway); from the daemon's start, and from its API answering, until `GET /v1/sources`
//!   says the source synced and owns 10,000 services;
//! - **one EndpointSlice change until live**: an endpoint of a random Service turns
//!   terminating (then ready again), 200 times, 20 ms apart; the time from the change until
//!   the backend's state in `LB_BACKENDS` (read from its pin) flips;
//! - **RSS** of the daemon with the 10,000 Services (`/proc/<pid>/status`, VmRSS and VmHWM).
use std::{
    net::{Ipv4Addr, TcpListener},
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use bpf_common::{BACKEND_ACTIVE, BACKEND_DRAINING, BackendInfo};
use netns_tests::{
    Binaries, Daemon, DaemonOptions,
    kube_api::{KubeApi, Resource},
    topology::ip_in,
};
use serde::Serialize;
use serde_json::{Value, json};

use crate::{report::Summary, topo};

/// How long the sync may take before the bench gives up.
const SYNC_LIMIT: Duration = Duration::from_secs(120);
const CHANGE_LIMIT: Duration = Duration::from_secs(5);
const ENDPOINTS: usize = 10;

#[derive(Debug, Serialize)]
pub struct KubernetesReport {
    pub services: usize,
    pub endpoints_per_service: usize,
    /// Seconds from the daemon's start to the source synced.
    pub sync_from_start_s: f64,
    /// Seconds from the daemon's API answering to the source synced.
    pub sync_from_ready_s: f64,
    /// Milliseconds from a slice change to its backend's state flipping in `LB_BACKENDS`.
    pub change_ms: Summary,
    pub rss: Rss,
}

fn cluster_ip(i: usize) -> Ipv4Addr {
    // 198.19.0.0/18 for the VIPs: 16,384 addresses.
    Ipv4Addr::new(198, 19, (i / 250) as u8, (i % 250 + 1) as u8)
}

/// Endpoint `j` of Service `i`: 100,000 distinct addresses in 198.18.0.0/15 outside the
/// topology's subnets (198.18.0.0/23), its VIP's /24 (198.18.100.0/24) and the ClusterIPs
/// (198.19.0.0/18), all routed through one gateway.
fn pod_ip(i: usize, j: usize) -> Ipv4Addr {
    let mut n = (i * ENDPOINTS + j) as u32;
    let mut addr = u32::from(Ipv4Addr::new(198, 18, 2, 0));
    let skips = [
        (u32::from(Ipv4Addr::new(198, 18, 100, 0)), 256),
        (u32::from(Ipv4Addr::new(198, 19, 0, 0)), 16_384),
    ];
    for (start, len) in skips {
        if addr + n < start {
            break;
        }
        n -= start - addr;
        addr = start + len;
    }
    Ipv4Addr::from(addr + n)
}

fn service(i: usize) -> Value {
    json!({
        "metadata": {"name": format!("svc-{i}"), "namespace": "bench",
                     "creationTimestamp": "2026-12-01T00:00:00Z"},
        "spec": {"type": "ClusterIP", "clusterIP": cluster_ip(i).to_string(),
                 "clusterIPs": [cluster_ip(i).to_string()],
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}
    })
}

fn slice(i: usize, terminating: Option<usize>) -> Value {
    let endpoints: Vec<Value> = (0..ENDPOINTS)
        .map(|j| {
            let conditions = if terminating == Some(j) {
                json!({"ready": false, "serving": true, "terminating": true})
            } else {
                json!({"ready": true, "serving": true, "terminating": false})
            };
            json!({"addresses": [pod_ip(i, j).to_string()], "conditions": conditions,
                   "nodeName": "node-a"})
        })
        .collect();
    json!({
        "metadata": {"name": format!("svc-{i}-abcde"), "namespace": "bench",
                     "creationTimestamp": "2026-12-01T00:00:00Z",
                     "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
    })
}

fn backend_state(pin: &Path, id: u32) -> Result<u8> {
    let data =
        aya::maps::MapData::from_pin(pin).with_context(|| format!("open {}", pin.display()))?;
    let array: aya::maps::Array<_, BackendInfo> =
        aya::maps::Array::try_from(aya::maps::Map::Array(data))?;
    Ok(array.get(&id, 0)?.state)
}

/// Resident memory of `pid`, MiB.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Rss {
    pub total: f64,
    pub peak: f64,
    /// Heap and stacks (`RssAnon`).
    pub anon: f64,
    /// Mapped files and BPF maps (`RssFile`: `LB_MAGLEV` is mapped while it is written).
    pub file: f64,
}

fn rss_mib(pid: u32) -> Result<Rss> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| -> Result<f64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(key))
            .with_context(|| format!("no {key} in /proc/{pid}/status"))?;
        Ok(line
            .split_whitespace()
            .nth(1)
            .unwrap_or("0")
            .parse::<f64>()?)
    };
    Ok(Rss {
        total: kib("VmRSS:")? / 1024.0,
        peak: kib("VmHWM:")? / 1024.0,
        anon: kib("RssAnon:")? / 1024.0,
        file: (kib("RssFile:")? + kib("RssShmem:")?) / 1024.0,
    })
}

fn sources(daemon: &Daemon) -> Result<Value> {
    daemon.lb_ctl_json(&["sources"])
}

pub fn run(
    datapathd: std::path::PathBuf,
    lb_ctl: std::path::PathBuf,
    smoke: bool,
) -> Result<KubernetesReport> {
    let count = if smoke { 500 } else { 10_000 };
    let rounds = if smoke { 20 } else { 200 };
    let topo = topo::ForwardTopo::create()?;
    // The pods sit behind one gateway, a backend of the topology.
    ip_in(
        &topo.lb_ns,
        &[
            "route",
            "add",
            "198.18.0.0/15",
            "via",
            &topo::BACKENDS[0].to_string(),
        ],
    )?;
    let listener =
        netns_tests::netns::run_in(&topo.lb_ns, || TcpListener::bind(("127.0.0.1", 0)))??;
    let api = KubeApi::serve_prepared(listener, |api| {
        for i in 0..count {
            api.apply(Resource::Services, service(i))?;
            api.apply(Resource::EndpointSlices, slice(i, None))?;
        }
        Ok(())
    })?;
    let dir = std::env::temp_dir().join(format!("dp-bench-kube-{}", topo.prefix));
    std::fs::create_dir_all(&dir)?;
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: s\n  cluster:\n    server: {}\n\
             users:\n- name: u\n  user: {{}}\ncontexts:\n- name: c\n  context:\n    cluster: s\n    \
             user: u\ncurrent-context: c\n",
            api.url()
        ),
    )?;
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "reload:\n  watch: false\nlb:\n  interfaces: [lbc, lbb]\n  maps:\n    maglev_size: 251\n    \
             max_services: {}\n    max_backends: {}\nkubernetes:\n  enabled: true\n  kubeconfig: {}\n  \
             node_name: node-a\n",
            count + 256,
            count * ENDPOINTS + 1024,
            kubeconfig.display()
        ),
    )?;
    let started = Instant::now();
    let daemon = Daemon::start_with(
        &topo.lb_ns,
        &topo.prefix,
        Binaries { datapathd, lb_ctl },
        DaemonOptions {
            ifaces: false,
            wait_ready: true,
            extra_args: vec!["--config".into(), config.display().to_string()],
        },
    )
    .context("start datapathd")?;
    let ready = Instant::now();
    let result = (|| -> Result<KubernetesReport> {
        let synced = loop {
            let s = sources(&daemon)?;
            let k = s["sources"]
                .as_array()
                .and_then(|a| a.iter().find(|x| x["source"] == "kubernetes"))
                .cloned()
                .unwrap_or_default();
            if k["synced"] == true && k["services"].as_u64() == Some(count as u64) {
                break Instant::now();
            }
            if started.elapsed() > SYNC_LIMIT {
                bail!("not synced after {SYNC_LIMIT:?}: {k}");
            }
            thread::sleep(Duration::from_millis(20));
        };
        let pid = daemon.pid().context("datapathd is not running")?;
        let pin = daemon
            .pin_root
            .join("lb")
            .join(bpf_common::map_names::BACKENDS);
        let mut samples = Vec::new();
        let mut rng = 0x9e37_79b9_u64;
        for _ in 0..rounds {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let i = (rng >> 33) as usize % count;
            let view =
                daemon.lb_ctl_json(&["service", "show", &format!("{}:80", cluster_ip(i))])?;
            let id = view["backends"]
                .as_array()
                .and_then(|b| b.iter().find(|b| b["addr"] == pod_ip(i, 0).to_string()))
                .and_then(|b| b["id"].as_u64())
                .context("the endpoint's backend")? as u32;
            for (terminating, want) in [(Some(0), BACKEND_DRAINING), (None, BACKEND_ACTIVE)] {
                let t0 = Instant::now();
                api.apply(Resource::EndpointSlices, slice(i, terminating))?;
                loop {
                    if backend_state(&pin, id)? == want {
                        samples.push(t0.elapsed().as_secs_f64() * 1000.0);
                        break;
                    }
                    if t0.elapsed() > CHANGE_LIMIT {
                        bail!("svc-{i}: backend {id} not {want} after {CHANGE_LIMIT:?}");
                    }
                    thread::sleep(Duration::from_micros(50));
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
        let rss = rss_mib(pid)?;
        Ok(KubernetesReport {
            services: count,
            endpoints_per_service: ENDPOINTS,
            sync_from_start_s: (synced - started).as_secs_f64(),
            sync_from_ready_s: (synced - ready).as_secs_f64(),
            change_ms: Summary::of(&samples).context("no change measured")?,
            rss,
        })
    })();
    if result.is_err() || std::env::var_os("DP_BENCH_DAEMON_LOG").is_some() {
        eprintln!("{}", daemon.log());
    }
    drop(daemon);
    drop(api);
    let _ = std::fs::remove_dir_all(&dir);
    result
}
