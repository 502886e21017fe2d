//! Fuzz target `config`: the daemon's configuration file (`datapath::config::Settings::resolve`)
//! and its hot reload (`datapath::daemon::reload_from_file`, every controller under a real supervisor), see `docs/fuzzing.md`.
//!
//! Properties:
//! - arbitrary text, word soups and mutations of `deploy/config.example.yaml` and the unit
//!   tests' snippets never panic;
//! - a rejected file gives `Error::Config` naming a key, with a non-empty one-line message and,
//!   when it names a line, a line of the file;
//! - generated files (random keys, valid and invalid values, written out as YAML here, each
//!   key in the current layout or, when it has one, under its deprecated name) resolve to
//!   exactly the documented meaning of each key over the defaults, with one deprecation per
//!   old key used; a file with one invalid value is refused naming that key (as written) and
//!   its line, and one giving a setting under both its old and its new key is refused naming
//!   the new key and its line;
//! - a reload of a rejected file (or of one changing a restart-only key) leaves the running
//!   settings and module states exactly as they were, counts a failure and shows the error;
//!   an accepted one puts the new settings in force. (The runtime has no capabilities here, so
//!   no module is loaded: only the configuration logic runs.)

#[path = "../../lb-core/tests/fuzz_harness/mod.rs"]
mod fuzz_harness;
mod fuzz_yaml;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use datapath::{
    Error,
    bus::Bus,
    config::{DEPRECATED_KEYS, Overrides, Settings, Source},
    daemon,
    dataplane::XdpAttachMode,
    features::Features,
    supervisor::Supervisor,
};
use proptest::prelude::*;

const CONFIG_WORDS: &[&str] = &[
    "interfaces:",
    "xdp_mode:",
    "interface_wait_seconds:",
    "api_socket:",
    "state_file:",
    "pin_root:",
    "metrics_listen:",
    "log_format:",
    "nat_port_range:",
    "fib_cache_ms:",
    "gc_interval_seconds:",
    "maps:",
    "maglev_size:",
    "max_services:",
    "max_backends:",
    "max_flows:",
    "modules:",
    "lb:",
    "prog_stats:",
    "features:",
    "force_off:",
    "reload:",
    "watch:",
    "poll_interval_ms:",
    "policy:",
    "lb:",
    "conntrack:",
    "enabled:",
    "event_rate:",
    "timeouts:",
    "tcp_syn_seconds:",
    "udp_seconds:",
    "colour:",
    "auto",
    "native",
    "generic",
    "turbo",
    "text",
    "json",
    "off",
    ":9477",
    "0.0.0.0:9477",
    "[::1]:80",
    "1.2.3.4",
    "\"1024-65535\"",
    "\"9-3\"",
    "\"0-10\"",
    "\"1-\"",
    "eth0",
    "\"veth*\"",
    "sixteen_chars_xx",
    "[lsm, warp]",
    "[xdp]",
    "251",
    "4093",
    "65537",
    "100",
    "60001",
    "2592001",
    "/tmp/x",
    "\"\"",
];

fn seeds() -> Vec<String> {
    vec![
        include_str!("../../deploy/config.example.yaml").to_string(),
        "lb:\n  interfaces: [a, b]\n  maps:\n    max_flows: 1000\n    max_services: 8\n".into(),
        "policy:\n  enabled: true\n  interfaces: [\"ep*\"]\n  gc_interval_seconds: 1\n  timeouts:\n    udp_seconds: 2\n".into(),
        "lb:\n  interfaces: [a]\n  maps:\n    maglev_size: 100\n".into(),
        "features:\n  force_off: [lsm, xdp]\nreload: {watch: false, poll_interval_ms: 5}\n".into(),
        "{lb: {interfaces: [eth0], nat_port_range: \"2000-3000\"}, metrics_listen: off}\n".into(),
        String::new(),
        // The previous build's layout, still read.
        include_str!("fixtures/config.previous.yaml").to_string(),
        "interfaces: [a, b]\nmaps:\n  max_flows: 1000\n  max_services: 8\nconntrack:\n  gc_interval_seconds: 1\n".into(),
        "interfaces: [a]\nlb:\n  interfaces: [b]\n".into(),
    ]
}

fn resolve(text: &str) -> datapath::Result<Settings> {
    Settings::resolve(
        Some(&Source::from_text("/etc/datapath/config.yaml", text)),
        &Overrides::default(),
    )
}

/// What every configuration text must satisfy, accepted or not.
fn check_config_text(text: &str) -> Result<(), TestCaseError> {
    let first = resolve(text);
    match &first {
        Err(e) => {
            fuzz_yaml::check_message(&e.to_string())?;
            let Error::Config {
                line, key, reason, ..
            } = e
            else {
                return Err(TestCaseError::fail(format!("not a config error: {e}")));
            };
            // The key may be empty: `"": 1` is refused as unknown field ``.
            let _ = key;
            prop_assert!(!reason.trim().is_empty(), "no reason: {}", e);
            if let Some(line) = line {
                let lines = fuzz_yaml::yaml_lines(text) + 1;
                prop_assert!(
                    (1..=lines).contains(line),
                    "line {} of a {}-line file: {}",
                    line,
                    lines,
                    e
                );
            }
        }
        Ok(s) => {
            // Accepted settings are consistent: what the dataplane would be started with
            // validates, and resolving is a function of the text.
            prop_assert!(s.dataplane_config().validate().is_ok());
            prop_assert!(s.lb.nat_port_min >= 1 && s.lb.nat_port_min <= s.lb.nat_port_max);
            prop_assert!(s.lb.fib_cache <= Duration::from_secs(60));
            prop_assert!(s.poll_interval >= Duration::from_millis(1));
            prop_assert!(s.restart_only_changes(s).is_empty());
            let again = resolve(text).ok();
            prop_assert_eq!(again.as_ref(), Some(s));
        }
    }
    Ok(())
}

#[test]
fn fuzz_config_arbitrary_text() {
    let strategy = prop_oneof![
        any::<String>(),
        fuzz_yaml::word_soup(CONFIG_WORDS),
        "[ -~\n]{0,200}",
    ];
    fuzz_harness::check("config_arbitrary_text", strategy, |text| {
        check_config_text(&text)
    });
}

#[test]
fn fuzz_config_mutated_examples() {
    let seeds = seeds();
    let strategy = (
        0..seeds.len(),
        proptest::collection::vec(fuzz_yaml::text_mutation(), 1..5),
    );
    fuzz_harness::check("config_mutated_examples", strategy, |(seed, mutations)| {
        check_config_text(&fuzz_yaml::mutate(&seeds[seed], &mutations, CONFIG_WORDS))
    });
}

#[test]
fn every_seed_resolves_as_its_tests_say() {
    let seeds = seeds();
    for (i, seed) in seeds.iter().enumerate() {
        // The fourth seed is the unit tests' non-prime Maglev size, the last one gives the same
        // setting under its old and its new key.
        let refused = i == 3 || i == seeds.len() - 1;
        assert_eq!(resolve(seed).is_err(), refused, "seed {i}: {seed}");
    }
}

// ---------------------------------------------------------------------------------------------
// Generated files.
// ---------------------------------------------------------------------------------------------

/// One key of a generated file: its dotted path as written, the current layout's path of the
/// setting (the same unless written under its deprecated key), the YAML text of its value,
/// and what it does to the settings when it is valid (`None`: the documented rules refuse
/// it).
#[derive(Clone, Debug)]
struct GenKey {
    path: &'static str,
    setting: &'static str,
    value: String,
    effect: Option<Effect>,
}

#[derive(Clone, Debug)]
enum Effect {
    Interfaces(Vec<String>),
    XdpMode(XdpAttachMode),
    InterfaceWait(u64),
    MetricsListen(Option<SocketAddr>),
    NatPorts(u16, u16),
    FibCacheMs(u64),
    GcInterval(u64),
    Map(&'static str, u32),
    Lb(bool),
    ProgStats(bool),
    Watch(bool),
    PollMs(u64),
    PolicyEnabled(bool),
    PolicyMaxFlows(u32),
    PolicyTimeout(&'static str, u64),
    StateFile(PathBuf),
}

fn apply_effect(s: &mut Settings, e: &Effect) {
    match e {
        Effect::Interfaces(v) => s.lb.interfaces = v.clone(),
        Effect::XdpMode(m) => s.lb.xdp_mode = *m,
        Effect::InterfaceWait(v) => s.lb.interface_wait = Duration::from_secs(*v),
        Effect::MetricsListen(v) => s.metrics_listen = *v,
        Effect::NatPorts(a, b) => (s.lb.nat_port_min, s.lb.nat_port_max) = (*a, *b),
        Effect::FibCacheMs(v) => s.lb.fib_cache = Duration::from_millis(*v),
        Effect::GcInterval(v) => s.conntrack.gc_interval = Duration::from_secs(*v),
        Effect::Map(key, v) => match *key {
            "maglev_size" => s.lb.maglev_size = *v,
            "max_services" => s.lb.max_services = *v,
            "max_backends" => s.lb.max_backends = *v,
            _ => s.lb.max_flows = *v,
        },
        Effect::Lb(v) => s.lb.enabled = *v,
        Effect::ProgStats(v) => s.prog_stats.enabled = *v,
        Effect::Watch(v) => s.watch = *v,
        Effect::PollMs(v) => s.poll_interval = Duration::from_millis(*v),
        Effect::PolicyEnabled(v) => s.policy.enabled = *v,
        Effect::PolicyMaxFlows(v) => s.policy.max_flows = *v,
        Effect::PolicyTimeout(key, v) => {
            let ns = v * 1_000_000_000;
            let t = &mut s.policy.timeouts;
            match *key {
                "tcp_syn_seconds" => t.tcp_syn_ns = ns,
                "tcp_established_seconds" => t.tcp_established_ns = ns,
                "tcp_closing_seconds" => t.tcp_closing_ns = ns,
                "udp_seconds" => t.udp_ns = ns,
                _ => t.other_ns = ns,
            }
        }
        Effect::StateFile(p) => s.lb.state_file = p.clone(),
    }
}

fn is_prime(n: u32) -> bool {
    n >= 2
        && (2..)
            .take_while(|d: &u32| u64::from(*d) * u64::from(*d) <= u64::from(n))
            .all(|d| !n.is_multiple_of(d))
}

fn key(path: &'static str, value: impl Into<String>, effect: Option<Effect>) -> GenKey {
    GenKey {
        path,
        setting: path,
        value: value.into(),
        effect,
    }
}

fn gen_key() -> impl Strategy<Value = GenKey> {
    let name = prop_oneof![
        4 => "[a-z][a-z0-9*?]{0,14}",
        1 => Just(String::new()),
        1 => Just("   ".to_string()),
        1 => Just("sixteen_chars_xx".to_string()),
    ];
    let map_key = prop_oneof![
        Just("maglev_size"),
        Just("max_services"),
        Just("max_backends"),
        Just("max_flows")
    ];
    let map_value = prop_oneof![
        Just(0u32),
        Just(251),
        Just(4093),
        Just(16381),
        Just(65537),
        Just(100),
        Just(1),
        any::<u32>(),
    ];
    let timeout_key = prop_oneof![
        Just("tcp_syn_seconds"),
        Just("tcp_established_seconds"),
        Just("tcp_closing_seconds"),
        Just("udp_seconds"),
        Just("other_seconds"),
    ];
    prop_oneof![
        proptest::collection::vec(name, 0..4).prop_map(|names| {
            let ok = names.iter().all(|n| !n.trim().is_empty() && n.len() <= 15);
            let value = format!(
                "[{}]",
                names
                    .iter()
                    .map(|n| format!("\"{n}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            key(
                "lb.interfaces",
                value,
                ok.then_some(Effect::Interfaces(names)),
            )
        }),
        prop_oneof![
            Just(key(
                "lb.xdp_mode",
                "auto",
                Some(Effect::XdpMode(XdpAttachMode::Auto))
            )),
            Just(key(
                "lb.xdp_mode",
                "native",
                Some(Effect::XdpMode(XdpAttachMode::Native))
            )),
            Just(key(
                "lb.xdp_mode",
                "generic",
                Some(Effect::XdpMode(XdpAttachMode::Generic))
            )),
            Just(key("lb.xdp_mode", "turbo", None)),
        ],
        any::<u64>().prop_map(|v| key(
            "lb.interface_wait_seconds",
            v.to_string(),
            Some(Effect::InterfaceWait(v))
        )),
        prop_oneof![
            Just(key(
                "metrics_listen",
                "off",
                Some(Effect::MetricsListen(None))
            )),
            Just(key(
                "metrics_listen",
                "\"\"",
                Some(Effect::MetricsListen(None))
            )),
            Just(key(
                "metrics_listen",
                "\":9477\"",
                Some(Effect::MetricsListen("0.0.0.0:9477".parse().ok()))
            )),
            Just(key(
                "metrics_listen",
                "\"[::1]:80\"",
                Some(Effect::MetricsListen("[::1]:80".parse().ok()))
            )),
            Just(key("metrics_listen", "\"1.2.3.4\"", None)),
            Just(key("metrics_listen", "nope", None)),
        ],
        (0u32..70_000, 0u32..70_000).prop_map(|(a, b)| {
            let ok = a >= 1 && b <= 65535 && a <= b;
            key(
                "lb.nat_port_range",
                format!("\"{a}-{b}\""),
                ok.then_some(Effect::NatPorts(a as u16, b as u16)),
            )
        }),
        prop_oneof![0u64..=60_000, 60_001u64..100_000].prop_map(|v| key(
            "lb.fib_cache_ms",
            v.to_string(),
            (v <= 60_000).then_some(Effect::FibCacheMs(v))
        )),
        any::<u64>().prop_map(|v| key(
            "conntrack.gc_interval_seconds",
            v.to_string(),
            Some(Effect::GcInterval(v))
        )),
        (map_key, map_value).prop_map(|(k, v)| {
            let path = match k {
                "maglev_size" => "lb.maps.maglev_size",
                "max_services" => "lb.maps.max_services",
                "max_backends" => "lb.maps.max_backends",
                _ => "lb.maps.max_flows",
            };
            let ok = v != 0 && (k != "maglev_size" || is_prime(v));
            key(path, v.to_string(), ok.then_some(Effect::Map(k, v)))
        }),
        any::<bool>().prop_map(|v| key("lb.enabled", v.to_string(), Some(Effect::Lb(v)))),
        any::<bool>().prop_map(|v| key(
            "prog_stats.enabled",
            v.to_string(),
            Some(Effect::ProgStats(v))
        )),
        any::<bool>().prop_map(|v| key("reload.watch", v.to_string(), Some(Effect::Watch(v)))),
        prop_oneof![Just(0u64), 1u64..100_000].prop_map(|v| key(
            "reload.poll_interval_ms",
            v.to_string(),
            (v > 0).then_some(Effect::PollMs(v))
        )),
        any::<bool>().prop_map(|v| key(
            "policy.enabled",
            v.to_string(),
            Some(Effect::PolicyEnabled(v))
        )),
        prop_oneof![Just(0u32), any::<u32>()].prop_map(|v| key(
            "policy.max_flows",
            v.to_string(),
            (v > 0).then_some(Effect::PolicyMaxFlows(v))
        )),
        (
            timeout_key,
            prop_oneof![Just(0u64), Just(2_592_000), Just(2_592_001), 1u64..100_000]
        )
            .prop_map(|(k, v)| {
                let path = match k {
                    "tcp_syn_seconds" => "policy.timeouts.tcp_syn_seconds",
                    "tcp_established_seconds" => "policy.timeouts.tcp_established_seconds",
                    "tcp_closing_seconds" => "policy.timeouts.tcp_closing_seconds",
                    "udp_seconds" => "policy.timeouts.udp_seconds",
                    _ => "policy.timeouts.other_seconds",
                };
                let ok = (1..=2_592_000).contains(&v);
                key(
                    path,
                    v.to_string(),
                    ok.then_some(Effect::PolicyTimeout(k, v)),
                )
            }),
        "/[a-z/]{1,20}".prop_map(|p| key(
            "lb.state_file",
            p.clone(),
            Some(Effect::StateFile(PathBuf::from(p)))
        )),
    ]
}

/// Writes the keys as block-style YAML, each section (and sub-section) once, and returns the
/// text and the line of each key (by index into `keys`).
fn render(keys: &[GenKey]) -> (String, Vec<usize>) {
    let mut out = String::from("# generated\n");
    let mut lines = vec![0; keys.len()];
    let mut line = 2;
    // Sorted by section path, top-level keys first: every section's keys are then together,
    // its sub-sections right after it.
    let parent = |i: usize| -> Vec<&'static str> {
        let mut segments: Vec<&'static str> = keys[i].path.split('.').collect();
        segments.pop();
        segments
    };
    let mut order: Vec<usize> = (0..keys.len()).collect();
    order.sort_by_key(|&i| parent(i));
    let mut open: Vec<&'static str> = Vec::new();
    for i in order {
        let want = parent(i);
        let common = open.iter().zip(&want).take_while(|(a, b)| a == b).count();
        open.truncate(common);
        for segment in &want[common..] {
            out.push_str(&format!("{}{segment}:\n", "  ".repeat(open.len())));
            open.push(segment);
            line += 1;
        }
        let leaf = keys[i].path.rsplit('.').next().unwrap_or_default();
        out.push_str(&format!(
            "{}{leaf}: {}\n",
            "  ".repeat(open.len()),
            keys[i].value
        ));
        lines[i] = line;
        line += 1;
    }
    (out, lines)
}

/// The deprecated key `new` replaced, if any.
fn old_key(new: &str) -> Option<&'static str> {
    DEPRECATED_KEYS
        .iter()
        .find(|(_, n)| *n == new)
        .map(|(o, _)| *o)
}

/// A generated file: its keys, and whether the last one repeats an earlier setting under its
/// other name (old or new), which must be refused.
#[derive(Clone, Debug)]
struct GenFile {
    keys: Vec<GenKey>,
    conflict: bool,
}

#[test]
fn fuzz_config_generated() {
    let strategy = (
        proptest::collection::vec((gen_key(), any::<bool>()), 0..8),
        proptest::option::weighted(0.2, any::<proptest::sample::Index>()),
    )
        .prop_map(|(keys, conflict)| {
            // One value per setting, some under their deprecated key.
            let mut seen = Vec::new();
            let mut keys: Vec<GenKey> = keys
                .into_iter()
                .filter(|(k, _)| {
                    let new = !seen.contains(&k.setting);
                    seen.push(k.setting);
                    new
                })
                .map(|(mut k, deprecated)| {
                    if deprecated && let Some(old) = old_key(k.setting) {
                        k.path = old;
                    }
                    k
                })
                .collect();
            // At most one invalid value, so the error to expect is known.
            let mut bad = false;
            keys.retain(|k| {
                let keep = k.effect.is_some() || !bad;
                bad |= k.effect.is_none();
                keep
            });
            // Then, in a file of valid values, maybe one setting given twice.
            let mut conflict_added = false;
            if let Some(pick) = conflict
                && !bad
            {
                let movable: Vec<&GenKey> = keys
                    .iter()
                    .filter(|k| old_key(k.setting).is_some())
                    .collect();
                if !movable.is_empty() {
                    let mut twin = movable[pick.index(movable.len())].clone();
                    twin.path = if twin.path == twin.setting {
                        old_key(twin.setting).unwrap_or(twin.setting)
                    } else {
                        twin.setting
                    };
                    keys.push(twin);
                    conflict_added = true;
                }
            }
            GenFile {
                keys,
                conflict: conflict_added,
            }
        });
    fuzz_harness::check("config_generated", strategy, |file| {
        let keys = &file.keys;
        let (text, lines) = render(keys);
        let mut expected = Settings::default();
        let mut invalid = None;
        for (i, k) in keys.iter().enumerate() {
            match &k.effect {
                Some(e) => apply_effect(&mut expected, e),
                None => invalid = Some(i),
            }
        }
        if file.conflict {
            // Refused at the new key of the setting given twice.
            let twin = keys.last().map(|k| k.setting).unwrap_or_default();
            invalid = keys.iter().position(|k| k.path == twin);
        }
        let result = Settings::resolve_with_deprecations(
            Some(&Source::from_text(
                "/etc/datapath/config.yaml",
                text.as_str(),
            )),
            &Overrides::default(),
        );
        match (invalid, result) {
            (None, Ok((got, deprecated))) => {
                prop_assert_eq!(got, expected, "{}", text);
                let mut used: Vec<&str> = keys
                    .iter()
                    .filter(|k| k.path != k.setting)
                    .map(|k| k.path)
                    .collect();
                let mut warned: Vec<&str> = deprecated.iter().map(|d| d.old).collect();
                used.sort_unstable();
                warned.sort_unstable();
                prop_assert_eq!(warned, used, "one warning per old key\n{}", text);
                for d in &deprecated {
                    prop_assert!(old_key(d.new) == Some(d.old), "{}", d);
                }
            }
            (None, Err(e)) => {
                // Only the cross-key rule may refuse a file of valid values: the Maglev
                // tables of every service must fit one map.
                let lb = &expected.lb;
                let tables = u64::from(lb.max_services) * 2 * u64::from(lb.maglev_size);
                prop_assert!(tables > u64::from(u32::MAX / 4), "refused: {}\n{}", e, text);
                let Error::Config { key, .. } = &e else {
                    return Err(TestCaseError::fail(format!("not a config error: {e}")));
                };
                // Named at the section the map sizes were written in.
                let old = keys.iter().any(|k| k.path.starts_with("maps."));
                prop_assert_eq!(key.as_str(), if old { "maps" } else { "lb.maps" }, "{}", e);
            }
            (Some(i), Err(e)) => {
                let Error::Config {
                    key, line, reason, ..
                } = &e
                else {
                    return Err(TestCaseError::fail(format!("not a config error: {e}")));
                };
                prop_assert_eq!(key.as_str(), keys[i].path, "{}\n{}", e, text);
                prop_assert_eq!(*line, Some(lines[i]), "{}\n{}", e, text);
                if file.conflict {
                    prop_assert!(reason.contains("deprecated"), "{}", e);
                }
            }
            (Some(i), Ok(_)) => {
                prop_assert!(
                    false,
                    "invalid {} = {} accepted\n{}",
                    keys[i].path,
                    keys[i].value,
                    text
                )
            }
        }
        check_config_text(&text)
    });
}

// ---------------------------------------------------------------------------------------------
// Reload.
// ---------------------------------------------------------------------------------------------

struct ReloadRig {
    _dir: tempfile::TempDir,
    config: PathBuf,
    overrides: Overrides,
    rt: tokio::runtime::Runtime,
    sup: Arc<Supervisor>,
    lb: Arc<datapath::lb::LbController>,
}

impl ReloadRig {
    fn status(&self) -> datapath_api::StatusView {
        daemon::status_view(&self.sup, Vec::new(), Some(&self.config))
    }
}

/// The daemon's controllers under a real supervisor, whose configuration file holds `base`,
/// without capabilities (so no controller loads a program: only the configuration logic runs,
/// also as root). Pins and state stay in a temporary directory.
fn rig(base: &str) -> ReloadRig {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, base).expect("write config");
    let overrides = Overrides {
        pin_root: Some(dir.path().join("pins")),
        state_file: Some(dir.path().join("state.json")),
        ..Overrides::default()
    };
    let settings = Settings::resolve(Some(&Source::from_text(&config, base)), &overrides)
        .expect("base config is valid");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let bus = Bus::new();
    let controllers = daemon::controllers(&settings, &bus).expect("controllers");
    let lb = Arc::clone(&controllers.lb);
    let sup =
        Supervisor::new(controllers.all, bus, settings, Features::default()).expect("supervisor");
    rt.block_on(sup.start()).expect("start");
    ReloadRig {
        _dir: dir,
        config,
        overrides,
        rt,
        sup,
        lb,
    }
}

#[test]
fn fuzz_config_reload_loses_nothing() {
    let seeds = seeds();
    let base = seeds[0].clone();
    let strategy = (
        0..seeds.len(),
        proptest::collection::vec(fuzz_yaml::text_mutation(), 0..4),
    );
    let rig = std::cell::RefCell::new(rig(&base));
    fuzz_harness::check("config_reload", strategy, move |(seed, mutations)| {
        let rig = &mut *rig.borrow_mut();
        let text = fuzz_yaml::mutate(&seeds[seed], &mutations, CONFIG_WORDS);
        let before = rig.sup.settings();
        let status_before = rig.status();
        std::fs::write(&rig.config, &text).expect("write config");
        let expected = Settings::resolve(
            Some(&Source::from_text(&rig.config, text.as_str())),
            &rig.overrides,
        );
        let _ = rig.rt.block_on(daemon::reload_from_file(
            &rig.sup,
            &rig.config,
            &rig.overrides,
        ));
        let status = rig.status();
        let accepted = match &expected {
            Ok(new) => before.restart_only_changes(new).is_empty(),
            Err(_) => false,
        };
        if accepted {
            prop_assert_eq!(Some(rig.sup.settings()), expected.ok());
            prop_assert_eq!(status.config_reloads, status_before.config_reloads + 1);
            prop_assert_eq!(status.last_reload_error, None);
        } else {
            prop_assert_eq!(
                rig.sup.settings(),
                before,
                "a refused reload changes nothing"
            );
            prop_assert_eq!(
                status.config_reload_failures,
                status_before.config_reload_failures + 1
            );
            prop_assert_eq!(status.config_reloads, status_before.config_reloads);
            let shown = status.last_reload_error.clone().unwrap_or_default();
            if let Err(e) = &expected {
                prop_assert_eq!(
                    shown.as_str(),
                    e.to_string(),
                    "the error shown is the file's"
                );
            }
            fuzz_yaml::check_message(&shown)?;
            let names = |s: &datapath_api::StatusView| -> Vec<(String, bool, bool)> {
                s.modules
                    .iter()
                    .map(|m| (m.name.clone(), m.enabled, m.up))
                    .collect()
            };
            prop_assert_eq!(names(&status), names(&status_before), "modules unchanged");
        }
        let lb = rig.lb.shared();
        prop_assert!(
            lb.blocking_lock().plane().dataplane().is_none(),
            "nothing was loaded"
        );
        Ok(())
    });
}

/// Found by `fuzz_config_reload_loses_nothing` (minimized input: a key `"a\nb"`): an unknown key
/// with a line break is quoted verbatim, so the error (logged, and shown by `lb-ctl status` as
/// the last reload error) spans two lines. `Source::parse` (datapath/src/config.rs) puts the
/// key path and serde's message into the error unescaped. Fixed: control characters are
/// escaped (`error::single_line`).
#[test]
fn regression_config_error_is_one_line() {
    let err = resolve("\"a\\nb\": 1\n").expect_err("unknown field");
    let message = err.to_string();
    assert!(!message.contains('\n'), "{message:?}");
}

/// Found by `cargo xtask fuzz` (`fuzz_config_generated`, minimized input below): two huge map
/// sizes make `DataplaneConfig::validate` (datapath/src/dataplane.rs, `table_entries =
/// u64::from(max_services) * 2 * u64::from(maglev_size)`) overflow u64: a panic where overflow
/// checks are on (debug builds: loading or reloading such a file kills the daemon), a wrapped
/// product that may pass the check in release builds. Fixed: the product is computed in u128.
#[test]
fn regression_huge_map_sizes_are_refused() {
    let text = "maps:\n  max_services: 3117234626\n  maglev_size: 2958831511\n";
    match std::panic::catch_unwind(|| resolve(text)) {
        Ok(Err(Error::Config { key, .. })) => assert_eq!(key, "maps"),
        Ok(other) => panic!("not refused: {other:?}"),
        Err(_) => panic!("panicked instead of refusing the file"),
    }
}
