//! The Kubernetes mapping at scale (criterion): 10,000 ClusterIP Services with one 10-endpoint
//! EndpointSlice each, mapped to frontends and backends by `servicemap::map_service`, as the
//! Kubernetes source will on its initial sync. Objects are built before the clock runs: the
//! figure is the mapping's cost alone, one part of issue 13's "initial sync ≤ 2 s" (the
//! datapath's programming and the API's list are not in it). No root needed.
//!
//! `cargo test --benches` runs it once (and the check that every Service got its 10 backends).

use std::{collections::BTreeMap, hint::black_box};

use criterion::{Criterion, criterion_group, criterion_main};
use k8s_openapi::{
    api::{
        core::v1::{Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use servicemap::{NodeContext, SERVICE_NAME_LABEL, map_service};

const SERVICES: usize = 10_000;
const ENDPOINTS: usize = 10;

fn objects() -> (Vec<Service>, Vec<EndpointSlice>) {
    let meta = |name: String, labels: Option<BTreeMap<String, String>>| ObjectMeta {
        name: Some(name),
        namespace: Some("bench".into()),
        labels,
        ..ObjectMeta::default()
    };
    let mut services = Vec::with_capacity(SERVICES);
    let mut slices = Vec::with_capacity(SERVICES);
    for i in 0..SERVICES {
        let name = format!("svc-{i}");
        services.push(Service {
            metadata: meta(name.clone(), None),
            spec: Some(ServiceSpec {
                cluster_ip: Some(format!("10.96.{}.{}", i / 250, i % 250 + 1)),
                ports: Some(vec![ServicePort {
                    name: Some("http".into()),
                    port: 80,
                    protocol: Some("TCP".into()),
                    ..ServicePort::default()
                }]),
                ..ServiceSpec::default()
            }),
            status: None,
        });
        slices.push(EndpointSlice {
            metadata: meta(
                format!("{name}-abcde"),
                Some([(SERVICE_NAME_LABEL.to_string(), name)].into()),
            ),
            address_type: "IPv4".into(),
            endpoints: (0..ENDPOINTS)
                .map(|e| Endpoint {
                    addresses: vec![format!("10.{}.{}.{}", 100 + e, i / 250, i % 250 + 1)],
                    conditions: Some(EndpointConditions {
                        ready: Some(true),
                        serving: Some(true),
                        terminating: Some(false),
                    }),
                    ..Endpoint::default()
                })
                .collect(),
            ports: Some(vec![EndpointPort {
                name: Some("http".into()),
                port: Some(8080),
                protocol: Some("TCP".into()),
                ..EndpointPort::default()
            }]),
        });
    }
    (services, slices)
}

fn bench(c: &mut Criterion) {
    let (services, slices) = objects();
    let node = NodeContext {
        name: "node-1".into(),
        zone: None,
        addresses: vec![],
    };
    // The source indexes slices by Service; so does the bench (slice i belongs to Service i).
    let mut g = c.benchmark_group("servicemap");
    g.sample_size(10);
    g.bench_function("map 10,000 Services x 10 endpoints", |b| {
        b.iter(|| {
            let mut backends = 0;
            for (svc, slice) in services.iter().zip(&slices) {
                let m = map_service(black_box(svc), &[slice], &node).unwrap();
                assert_eq!(m.frontends[0].backends.len(), ENDPOINTS);
                backends += m.frontends[0].backends.len();
            }
            assert_eq!(backends, SERVICES * ENDPOINTS);
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
