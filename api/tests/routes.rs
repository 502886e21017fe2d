//! The route table: every route once, its types, its request targets, and docs/api.md's
//! table listing the same routes with the same answers.

use datapath_api::{
    BackendKey, CtFilter, FlowsQuery, Protocol, Route, ServiceKey,
    routes::{self, ChangeQuery, Encoding, Method, NoQuery, ROUTES},
};

#[test]
fn every_route_once() {
    let mut seen = std::collections::BTreeSet::new();
    for r in ROUTES {
        assert!(seen.insert(r.name), "{} twice", r.name);
        // One (method, path) per answer encoding: the flows route answers a list or a stream.
        let same: Vec<_> = ROUTES
            .iter()
            .filter(|o| o.method == r.method && o.path == r.path && o.encoding == r.encoding)
            .collect();
        assert_eq!(same.len(), 1, "{} {}", r.method, r.path);
        assert!(r.path.starts_with('/'), "{}", r.path);
    }
    assert_eq!(ROUTES.len(), 29);
    let types = |name: &str| ROUTES.iter().find(|r| r.name == name).copied().unwrap();
    assert_eq!(types("ListServices").answer, "Vec<ServiceView>");
    assert_eq!(types("PatchBackend").request, "UpdateBackend");
    assert_eq!(types("ListConntrack").query, "CtFilter");
    assert_eq!(types("FollowFlows").encoding, Encoding::NdJson);
}

/// The table and the marker types are one list: spot-check that they say the same.
#[test]
fn markers_are_the_table() {
    fn row<R: Route>() -> (Method, &'static str, u16, Encoding) {
        (R::METHOD, R::PATH, R::STATUS, R::ENCODING)
    }
    let by_name = |name: &str| {
        let r = ROUTES.iter().find(|r| r.name == name).unwrap();
        (r.method, r.path, r.status, r.encoding)
    };
    assert_eq!(
        row::<routes::PostService>(),
        by_name(routes::PostService::NAME)
    );
    assert_eq!(row::<routes::PutPolicy>(), by_name("PutPolicy"));
    assert_eq!(row::<routes::FollowFlows>(), by_name("FollowFlows"));
    assert_eq!(row::<routes::GetHealth>(), by_name("GetHealth"));
}

#[test]
fn request_targets() {
    let key = ServiceKey {
        vip: "2001:db8::10".parse().unwrap(),
        port: 80,
        proto: Protocol::Udp,
    };
    let backend = BackendKey {
        addr: "198.18.1.1".parse().unwrap(),
        port: 8080,
    };
    assert_eq!(
        routes::GetService::uri(&key, &NoQuery),
        "/v1/services/udp/2001:db8::10/80"
    );
    assert_eq!(
        routes::PostBackend::uri(&key, &ChangeQuery::default()),
        "/v1/services/udp/2001:db8::10/80/backends"
    );
    assert_eq!(
        routes::DeleteBackend::uri(&(key, backend), &ChangeQuery::default()),
        "/v1/services/udp/2001:db8::10/80/backends/198.18.1.1/8080"
    );
    assert_eq!(
        routes::DeleteService::uri(&key, &ChangeQuery { force: true }),
        "/v1/services/udp/2001:db8::10/80?force=true"
    );
    assert_eq!(routes::GetStatus::uri(&(), &NoQuery), "/v1/status");
    assert_eq!(
        routes::FlushConntrack::uri(
            &(),
            &CtFilter {
                port: Some(53),
                ..CtFilter::default()
            }
        ),
        "/v1/conntrack?port=53"
    );
    assert_eq!(
        routes::GetFlows::uri(&(), &FlowsQuery::default()),
        "/v1/flows"
    );
    assert_eq!(
        routes::FollowFlows::uri(&(), &FlowsQuery::follow(Some(1), None)),
        "/v1/flows?follow=true&count=1"
    );
}

/// docs/api.md's route table has a row for every route and a route for every row, with the
/// route's success status and its answer's type.
#[test]
fn docs_list_the_routes() {
    let doc = include_str!("../../docs/api.md");
    let table = doc
        .split("## Routes")
        .nth(1)
        .and_then(|rest| rest.split("\n\n").nth(1))
        .expect("a table under ## Routes");
    let rows: Vec<Vec<String>> = table
        .lines()
        .skip(2)
        .map(|l| {
            l.trim_matches('|')
                .split(" | ")
                .map(|c| c.trim().to_string())
                .collect()
        })
        .collect();
    assert_eq!(rows.len(), ROUTES.len(), "{table}");
    for r in ROUTES {
        // The docs write the backend's port `{port}` too, and the queries after the path.
        let path = r.path.replace("{backend_port}", "{port}");
        let row = rows
            .iter()
            .find(|row| {
                let doc_path = row[1].trim_matches('`');
                let doc_path = doc_path.split('?').next().unwrap();
                let streams = row[1].contains("follow=true");
                row[0] == r.method.as_str()
                    && doc_path == path
                    && streams == (r.encoding == Encoding::NdJson)
            })
            .unwrap_or_else(|| panic!("no row for {} {}", r.method, r.path));
        let answer = r
            .answer
            .trim_start_matches("Vec<")
            .trim_end_matches('>')
            .to_string();
        assert!(
            row[3].starts_with(&r.status.to_string()) && row[3].contains(&answer),
            "{}: {row:?}",
            r.name
        );
        if r.request != "NoBody" {
            assert!(row[2].contains(r.request), "{}: {row:?}", r.name);
        }
    }
}
