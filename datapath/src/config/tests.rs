use super::*;

fn src(text: &str) -> Source {
    Source::from_text("/etc/datapath/config.yaml", text)
}

fn resolve(text: &str) -> Result<Settings> {
    Settings::resolve(Some(&src(text)), &Overrides::default())
}

fn deprecations(text: &str) -> Vec<Deprecated> {
    Settings::resolve_with_deprecations(Some(&src(text)), &Overrides::default())
        .unwrap()
        .1
}

fn err(text: &str) -> (Option<usize>, String, String) {
    match resolve(text).unwrap_err() {
        Error::Config {
            line, key, reason, ..
        } => (line, key, reason),
        other => panic!("not a config error: {other}"),
    }
}

fn repo_file(path: &str) -> String {
    std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

#[test]
fn full_example_parses() {
    let text = repo_file("../deploy/config.example.yaml");
    let (s, deprecated) =
        Settings::resolve_with_deprecations(Some(&src(&text)), &Overrides::default()).unwrap();
    assert_eq!(deprecated, [], "the example uses the current layout");
    assert_eq!(s.lb.interfaces, ["eth0", "eth1"]);
    assert_eq!(s.metrics_listen, "0.0.0.0:9477".parse().ok());
    assert!(s.lb.enabled);
    assert!(!s.prog_stats.enabled);
    // The example shows the defaults.
    let defaults = Settings {
        lb: LbSettings {
            interfaces: s.lb.interfaces.clone(),
            ..LbSettings::default()
        },
        ..Settings::default()
    };
    assert_eq!(s, defaults);
}

/// A file written for the previous build (its example, kept as a fixture) still resolves,
/// to the same settings as the current example, with one warning per old key.
#[test]
fn previous_example_resolves_like_the_current_one() {
    let old = repo_file("tests/fixtures/config.previous.yaml");
    let new = repo_file("../deploy/config.example.yaml");
    let (old_settings, deprecated) =
        Settings::resolve_with_deprecations(Some(&src(&old)), &Overrides::default()).unwrap();
    let mut new_settings = resolve(&new).unwrap();
    // The one default that changed since: the previous example spelled out 1000 ms; with the
    // netlink controller's exact FIB cache the default is 30 s.
    assert_eq!(old_settings.lb.fib_cache, Duration::from_millis(1000));
    assert_eq!(new_settings.lb.fib_cache, Duration::from_secs(30));
    new_settings.lb.fib_cache = old_settings.lb.fib_cache;
    // And BPF statistics: the previous example turned them on, as the default was; they are off
    // by default now (they cost every BPF program two clock reads per run).
    assert!(old_settings.prog_stats.enabled);
    assert!(!new_settings.prog_stats.enabled);
    new_settings.prog_stats.enabled = true;
    assert_eq!(old_settings, new_settings);
    let olds: Vec<&str> = deprecated.iter().map(|d| d.old).collect();
    assert_eq!(
        olds,
        [
            "interfaces",
            "xdp_mode",
            "interface_wait_seconds",
            "state_file",
            "nat_port_range",
            "fib_cache_ms",
            "gc_interval_seconds",
            "maps.maglev_size",
            "maps.max_services",
            "maps.max_backends",
            "maps.max_flows",
            "modules.lb",
            "modules.prog_stats",
        ]
    );
}

#[test]
fn old_keys_map_to_their_sections() {
    let old = "interfaces: [a]\nxdp_mode: generic\ninterface_wait_seconds: 3\nstate_file: /s.json\nnat_port_range: \"2000-3000\"\nfib_cache_ms: 7\ngc_interval_seconds: 9\nmaps:\n  maglev_size: 251\n  max_services: 8\n  max_backends: 9\n  max_flows: 10\nmodules:\n  lb: false\n  prog_stats: false\n";
    let new = "lb:\n  enabled: false\n  interfaces: [a]\n  xdp_mode: generic\n  interface_wait_seconds: 3\n  state_file: /s.json\n  nat_port_range: \"2000-3000\"\n  fib_cache_ms: 7\n  maps:\n    maglev_size: 251\n    max_services: 8\n    max_backends: 9\n    max_flows: 10\nconntrack:\n  gc_interval_seconds: 9\nprog_stats:\n  enabled: false\n";
    let s = resolve(new).unwrap();
    assert_eq!(resolve(old).unwrap(), s);
    assert_eq!(deprecations(new), []);
    let lb = &s.lb;
    assert!(!lb.enabled && !s.prog_stats.enabled);
    assert_eq!(lb.interfaces, ["a"]);
    assert_eq!(lb.xdp_mode, XdpAttachMode::Generic);
    assert_eq!(lb.interface_wait, Duration::from_secs(3));
    assert_eq!(lb.state_file, PathBuf::from("/s.json"));
    assert_eq!((lb.nat_port_min, lb.nat_port_max), (2000, 3000));
    assert_eq!(lb.fib_cache, Duration::from_millis(7));
    assert_eq!(
        (
            lb.maglev_size,
            lb.max_services,
            lb.max_backends,
            lb.max_flows
        ),
        (251, 8, 9, 10)
    );
    assert_eq!(s.conntrack.gc_interval, Duration::from_secs(9));
    assert_eq!(s.policy_state_file(), PathBuf::from("/policy.json"));
    // Each warning names the new key; every listed old key is one a file can use.
    let got = deprecations(old);
    assert_eq!(got.len(), 13);
    for d in &got {
        assert!(DEPRECATED_KEYS.contains(&(d.old, d.new)), "{d}");
    }
    assert_eq!(
        got[0].to_string(),
        "`interfaces` is deprecated: use `lb.interfaces`"
    );
    assert_eq!(
        deprecations("maps: {}\nmodules: {}\n"),
        [
            Deprecated {
                old: "maps",
                new: "lb.maps"
            },
            Deprecated {
                old: "modules",
                new: "lb.enabled and prog_stats.enabled"
            }
        ]
    );
    // Old and new keys of different settings mix.
    let s = resolve("maps:\n  max_flows: 5\nlb:\n  maps:\n    max_services: 6\n").unwrap();
    assert_eq!((s.lb.max_flows, s.lb.max_services), (5, 6));
}

#[test]
fn old_and_new_key_together_are_refused() {
    for (text, line, key, old) in [
        (
            "interfaces: [a]\nlb:\n  interfaces: [b]\n",
            3,
            "lb.interfaces",
            "`interfaces` (line 1)",
        ),
        (
            "lb:\n  maps:\n    max_flows: 3\nmaps:\n  max_flows: 4\n",
            3,
            "lb.maps.max_flows",
            "`maps.max_flows` (line 5)",
        ),
        (
            "modules:\n  lb: true\nlb:\n  enabled: true\n",
            4,
            "lb.enabled",
            "`modules.lb` (line 2)",
        ),
        (
            "prog_stats:\n  enabled: false\nmodules: {prog_stats: true}\n",
            2,
            "prog_stats.enabled",
            "`modules.prog_stats`",
        ),
        (
            "conntrack:\n  gc_interval_seconds: 1\ngc_interval_seconds: 1\n",
            2,
            "conntrack.gc_interval_seconds",
            "`gc_interval_seconds` (line 3)",
        ),
    ] {
        let (got_line, got_key, reason) = err(text);
        assert_eq!((got_line, got_key.as_str()), (Some(line), key), "{text}");
        assert!(reason.contains(old), "{text}: {reason}");
        assert!(reason.contains(&format!("keep only `{key}`")), "{reason}");
    }
}

#[test]
fn precedence_defaults_file_overrides() {
    let src = Source::from_text(
        "c.yaml",
        "lb:\n  interfaces: [a, b]\n  maps:\n    max_flows: 1000\n    max_services: 8\n",
    );
    let s = Settings::resolve(Some(&src), &Overrides::default()).unwrap();
    assert_eq!((s.lb.max_flows, s.lb.max_services), (1000, 8));
    assert_eq!(s.lb.max_backends, defaults::MAX_BACKENDS);
    let o = Overrides {
        max_flows: Some(2000),
        interfaces: Some(vec!["c".into()]),
        gc_interval_seconds: Some(0),
        ..Overrides::default()
    };
    let s = Settings::resolve(Some(&src), &o).unwrap();
    assert_eq!((s.lb.max_flows, s.lb.max_services), (2000, 8));
    assert_eq!(s.lb.interfaces, ["c"]);
    assert_eq!(s.conntrack.gc_interval, Duration::ZERO);
}

#[test]
fn errors_name_line_and_key() {
    assert_eq!(
        err("lb:\n  interfaces: [a]\n  maps:\n    max_flows: 0\n"),
        (
            Some(4),
            "lb.maps.max_flows".into(),
            "a map size of 0 cannot hold anything".into()
        )
    );
    let (line, key, reason) = err("lb:\n  maps:\n    max_flowz: 10\n");
    assert_eq!((line, key.as_str()), (Some(3), "lb.maps.max_flowz"));
    assert!(reason.contains("unknown field `max_flowz`"), "{reason}");
    let (line, key, reason) = err("lb:\n  interfaces: [a]\ncolour: red\n");
    assert_eq!((line, key.as_str()), (Some(3), "colour"));
    assert!(reason.contains("unknown field"), "{reason}");
    let (line, key, reason) = err("lb:\n  colour: red\n");
    assert_eq!((line, key.as_str()), (Some(2), "lb.colour"));
    assert!(reason.contains("unknown field"), "{reason}");
    let (line, key, reason) = err("conntrack:\n  max_flows: 1\n");
    assert_eq!((line, key.as_str()), (Some(2), "conntrack.max_flows"));
    assert!(reason.contains("unknown field"), "{reason}");
    let (line, key, reason) = err("lb:\n  maps:\n    max_flows: many\n");
    assert_eq!((line, key.as_str()), (Some(3), "lb.maps.max_flows"));
    assert!(reason.contains("invalid type"), "{reason}");
    let (line, key, _) = err("lb:\n  maps:\n    maglev_size: 100\n");
    assert_eq!((line, key.as_str()), (Some(3), "lb.maps.maglev_size"));
    let (line, key, _) = err("lb:\n  xdp_mode: turbo\n");
    assert_eq!((line, key.as_str()), (Some(2), "lb.xdp_mode"));
    let (line, key, _) = err("features:\n  force_off: [lsm, warp]\n");
    assert_eq!((line, key.as_str()), (Some(2), "features.force_off[1]"));
    let (line, key, _) = err("a: 1\nlb:\n  nat_port_range: 9-3\n");
    assert_eq!((line, key.as_str()), (Some(1), "a"));
    let (line, key, reason) = err("lb:\n  nat_port_range: 9-3\n");
    assert_eq!((line, key.as_str()), (Some(2), "lb.nat_port_range"));
    assert!(reason.contains("MIN is above MAX"), "{reason}");
    let (line, key, reason) = err("lb:\n  nat_port_range: 0-10\n");
    assert_eq!((line, key.as_str()), (Some(2), "lb.nat_port_range"));
    assert!(reason.contains("not a port"), "{reason}");
    let (_, _, reason) = err("lb:\n  nat_port_range: \"1024\"\n");
    assert!(reason.contains("expected MIN-MAX"), "{reason}");
    let (line, key, _) = err("lb:\n  maps:\n    max_services: 40000\n");
    assert_eq!((line, key.as_str()), (Some(2), "lb.maps"));
    let (line, key, _) = err("lb:\n  fib_cache_ms: 60001\n");
    assert_eq!((line, key.as_str()), (Some(2), "lb.fib_cache_ms"));
    // A value under an old key is refused under the name the file used.
    let (line, key, _) = err("interfaces: [a]\nmaps:\n  max_flows: 0\n");
    assert_eq!((line, key.as_str()), (Some(3), "maps.max_flows"));
    let (line, key, _) = err("nat_port_range: 9-3\n");
    assert_eq!((line, key.as_str()), (Some(1), "nat_port_range"));
    let (line, key, _) = err("xdp_mode: turbo\n");
    assert_eq!((line, key.as_str()), (Some(1), "xdp_mode"));
    let (line, key, _) = err("maps:\n  max_services: 40000\n");
    assert_eq!((line, key.as_str()), (Some(1), "maps"));
}

#[test]
fn interface_patterns() {
    let have: Vec<String> = ["lo", "eth0", "eth1", "lbc"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let got = expand_interfaces(&["eth*".into(), "lbc".into()], &have, None).unwrap();
    assert_eq!(got, ["eth0", "eth1", "lbc"]);
    let patterns = ["eth0".to_string(), "wlan*".to_string()];
    for (text, line, key) in [
        (
            "lb:\n  interfaces:\n    - eth0\n    - wlan*\n",
            4,
            "lb.interfaces",
        ),
        ("interfaces:\n  - eth0\n  - wlan*\n", 3, "interfaces"),
        (
            "policy:\n  interfaces:\n    - wlan*\nlb:\n  interfaces:\n    - eth0\n    - wlan*\n",
            7,
            "lb.interfaces",
        ),
    ] {
        match expand_interfaces(&patterns, &have, Some(&src(text))) {
            Err(Error::Config {
                line: got_line,
                key: got_key,
                ..
            }) => assert_eq!((got_line, got_key.as_str()), (Some(line), key), "{text}"),
            other => panic!("{other:?}"),
        }
    }
    match expand_interfaces(&[], &have, Some(&src("lb:\n  enabled: true\n"))) {
        Err(Error::Config { key, reason, .. }) => {
            assert_eq!(key, "lb.interfaces");
            assert!(
                reason.contains("set `lb.interfaces` or --iface"),
                "{reason}"
            );
        }
        other => panic!("{other:?}"),
    }
    let (line, key, _) = err("lb:\n  interfaces: [\"sixteen_chars_xx\"]\n");
    assert_eq!((line, key.as_str()), (Some(2), "lb.interfaces"));
    assert_eq!(unmatched(&patterns, &have), ["wlan*"]);
    assert!(glob_match("e?h*", "eth12"));
    assert!(!glob_match("eth", "eth0"));
}

#[test]
fn policy_section() {
    let s = resolve(
        "policy:\n  enabled: true\n  interfaces: [\"ep*\"]\n  gc_interval_seconds: 1\n  timeouts:\n    udp_seconds: 2\n",
    )
    .unwrap();
    assert!(s.policy.enabled);
    assert_eq!(s.policy.interfaces, ["ep*"]);
    assert_eq!(s.policy.gc_interval, Duration::from_secs(1));
    assert_eq!(s.policy.timeouts.udp_ns, 2_000_000_000);
    assert_eq!(
        s.policy.timeouts.tcp_established_ns,
        conntrack::Timeouts::DEFAULT.tcp_established_ns
    );
    assert_eq!(
        s.policy_state_file(),
        PathBuf::from("/var/lib/datapath/policy.json")
    );
    // The policy's GC interval is its own, not the load balancer's conntrack's.
    assert_eq!(s.conntrack.gc_interval, crate::gc::DEFAULT_SWEEP_INTERVAL);
    let (line, key, reason) = err("policy:\n  enabled: true\n  timeouts:\n    udp_secs: 2\n");
    assert_eq!((line, key.as_str()), (Some(4), "policy.timeouts.udp_secs"));
    assert!(reason.contains("unknown field"), "{reason}");
    let (line, key, _) = err("policy:\n  timeouts:\n    udp_seconds: 0\n");
    assert_eq!(
        (line, key.as_str()),
        (Some(3), "policy.timeouts.udp_seconds")
    );
    let a = resolve("policy:\n  max_flows: 10\n").unwrap();
    let b = resolve("policy:\n  max_flows: 20\n  interfaces: [x]\n").unwrap();
    assert_eq!(a.restart_only_changes(&b), ["policy.max_flows"]);
}

#[test]
fn reload_refuses_restart_only_keys() {
    let a = resolve("lb:\n  interfaces: [a]\n").unwrap();
    let b = resolve("lb:\n  interfaces: [a, b]\n  maps:\n    max_flows: 77\n").unwrap();
    assert_eq!(a.restart_only_changes(&b), ["lb.maps.max_flows"]);
    // The answer names the current keys also when the file used the old ones.
    let c = resolve("interfaces: [a]\nmaps:\n  max_flows: 77\ngc_interval_seconds: 1\n").unwrap();
    assert_eq!(
        a.restart_only_changes(&c),
        ["lb.maps.max_flows", "conntrack.gc_interval_seconds"]
    );
    let d = resolve("lb:\n  enabled: false\n  xdp_mode: native\nprog_stats:\n  enabled: false\n")
        .unwrap();
    assert!(a.restart_only_changes(&d).is_empty());
    assert!(!d.module_enabled(Module::Lb) && !d.module_enabled(Module::ProgStats));
}

#[test]
fn interface_errors_found_after_resolving_name_the_files_line() {
    let src = Source::from_text("/etc/d.yaml", "interfaces:\n  - lbc\n  - wan*\n");
    let s = Settings::resolve(Some(&src), &Overrides::default()).unwrap();
    let e = expand_interfaces(&s.lb.interfaces, &["lbc".to_string()], s.origin.source())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("/etc/d.yaml line 3") && e.contains("`interfaces`"),
        "{e}"
    );
    let cloned = s.clone();
    assert!(cloned.origin.source().is_some());
}

#[test]
fn dns_section_resolves_and_refuses_with_its_key() {
    let s = resolve(
        "dns:\n  enabled: true\n  interfaces: [\"veth*\", eth0]\n  loopback: false\n  \
         capture_rate: 1000\n  snap_bytes: 1500\n  ttl_floor_seconds: 0\n  ttl_cap_seconds: 60\n  \
         grace_seconds: 5\n  max_entries: 1000\n  max_addresses_per_name: 8\n",
    )
    .unwrap();
    assert_eq!(
        s.dns,
        DnsSettings {
            enabled: true,
            interfaces: vec!["veth*".into(), "eth0".into()],
            loopback: false,
            capture_rate: 1000,
            snap_bytes: 1500,
            ttl_floor: Duration::ZERO,
            ttl_cap: Duration::from_secs(60),
            grace: Duration::from_secs(5),
            max_entries: 1000,
            max_addresses_per_name: 8,
        }
    );
    assert_eq!(resolve("").unwrap().dns, DnsSettings::default());
    for (text, key) in [
        ("dns:\n  snap_bytes: 100\n", "dns.snap_bytes"),
        ("dns:\n  snap_bytes: 70000\n", "dns.snap_bytes"),
        ("dns:\n  capture_rate: 2000000\n", "dns.capture_rate"),
        (
            "dns:\n  ttl_floor_seconds: 10\n  ttl_cap_seconds: 5\n",
            "dns.ttl_floor_seconds",
        ),
        ("dns:\n  ttl_cap_seconds: 0\n", "dns.ttl_cap_seconds"),
        ("dns:\n  max_entries: 0\n", "dns.max_entries"),
        (
            "dns:\n  max_addresses_per_name: 0\n",
            "dns.max_addresses_per_name",
        ),
        ("dns:\n  interfaces: [\"\"]\n", "dns.interfaces"),
    ] {
        let (_, got_key, message) = err(text);
        assert_eq!(got_key, key, "{text:?}: {message}");
    }
    // A restart is needed to change it.
    let a = resolve("dns:\n  enabled: true\n").unwrap();
    let b = resolve("dns:\n  enabled: false\n").unwrap();
    assert!(
        a.restart_only_changes(&b).contains(&"dns"),
        "{:?}",
        a.restart_only_changes(&b)
    );
}

#[test]
fn graph_section() {
    assert_eq!(resolve("").unwrap().graph, GraphSettings::default());
    assert!(GraphSettings::default().enabled && GraphSettings::default().web_listen.is_none());
    let s = resolve(
        "graph:\n  max_edges: 500\n  metrics_edges: 20\n  web:\n    listen: \"[::1]:9466\"\n",
    )
    .unwrap();
    assert_eq!(
        s.graph,
        GraphSettings {
            enabled: true,
            max_edges: 500,
            metrics_edges: 20,
            web_listen: "[::1]:9466".parse().ok(),
        }
    );
    for (text, key, says) in [
        ("graph:\n  max_edges: 0\n", "graph.max_edges", "between 1"),
        (
            "graph:\n  metrics_edges: 20000\n",
            "graph.metrics_edges",
            "at most 10000",
        ),
        (
            "graph:\n  web:\n    listen: 0.0.0.0:9466\n",
            "graph.web.listen",
            "not a loopback address",
        ),
        (
            "graph:\n  web:\n    listen: localhost\n",
            "graph.web.listen",
            "address:port",
        ),
        ("graph:\n  webb: {}\n", "graph", "webb"),
    ] {
        let (_, got_key, message) = err(text);
        assert!(
            got_key.starts_with(key) && message.contains(says),
            "{text:?}: {got_key}: {message}"
        );
    }
    let a = resolve("graph:\n  enabled: true\n").unwrap();
    let b = resolve("graph:\n  enabled: false\n").unwrap();
    assert!(a.restart_only_changes(&b).contains(&"graph"));
}
