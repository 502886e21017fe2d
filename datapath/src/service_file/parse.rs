//! The services file: its format, and its translation into declared services, checked whole
//! before any of it is applied. The format is documented in docs/service-maps.md:
//!
//! ```yaml
//! services:
//!   - name: web              # unique; shown as the services' owner
//!     vip: 198.18.0.10
//!     port: 80
//!     protocol: tcp          # tcp (default) or udp
//!     mode: full-nat         # full-nat (default) or dsr
//!     source_ranges: [198.18.0.0/24]   # new flows only from these (default: any source)
//!     backends:
//!       - addr: 198.18.1.1
//!         port: 8080
//!         weight: 1          # default 1
//!         state: active      # active (default) or draining
//! ```
use std::{collections::BTreeMap, net::IpAddr, path::Path};

use datapath_api::{
    BackendState, DeclaredBackend, DeclaredService, ForwardingMode, Protocol, ServiceKey,
    SourceRange,
};
use serde::Deserialize;

use crate::{
    error::{Error, single_line},
    lb::store::check_declared,
};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLayout {
    #[serde(default)]
    services: Vec<Entry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    vip: IpAddr,
    port: u16,
    #[serde(default = "tcp")]
    protocol: Protocol,
    #[serde(default)]
    mode: ForwardingMode,
    #[serde(default)]
    snat_addr: Option<IpAddr>,
    /// New flows only from these prefixes (absent: from anywhere).
    #[serde(default)]
    source_ranges: Vec<SourceRange>,
    #[serde(default)]
    backends: Vec<BackendEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendEntry {
    addr: IpAddr,
    port: u16,
    #[serde(default = "one")]
    weight: u32,
    #[serde(default)]
    state: BackendState,
}

fn tcp() -> Protocol {
    Protocol::Tcp
}

fn one() -> u32 {
    1
}

/// The services `text` (read from `path`) declares, or the first thing wrong with it as an
/// [`Error::ServicesFile`] with its line and key.
pub fn parse(path: &Path, text: &str) -> Result<Vec<DeclaredService>, Error> {
    let config_error = |line: Option<usize>, key: &str, reason: &str| Error::ServicesFile {
        file: path.to_path_buf(),
        line,
        key: single_line(key),
        reason: single_line(reason),
    };
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let de = serde_yaml_ng::Deserializer::from_str(text);
    let layout: FileLayout = serde_path_to_error::deserialize(de).map_err(|e| {
        let (line, key, reason) = crate::text::yaml_error(&e, true);
        config_error(line, &key, &reason)
    })?;

    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    let mut keys: BTreeMap<ServiceKey, &str> = BTreeMap::new();
    let mut out = Vec::with_capacity(layout.services.len());
    for (i, e) in layout.services.iter().enumerate() {
        let line = line_of_name(text, &e.name);
        let at = format!("services[{i}]");
        if e.name.trim().is_empty() {
            return Err(config_error(
                line,
                &format!("{at}.name"),
                "must not be empty",
            ));
        }
        if let Some(first) = names.insert(&e.name, i) {
            return Err(config_error(
                line,
                &format!("{at}.name"),
                &format!("{:?} is also the name of services[{first}]", e.name),
            ));
        }
        let key = ServiceKey {
            vip: e.vip,
            port: e.port,
            proto: e.protocol,
        };
        if let Some(first) = keys.insert(key, &e.name) {
            return Err(config_error(
                line,
                &at,
                &format!("service {key} is also declared by {first:?}"),
            ));
        }
        let declared = DeclaredService {
            key,
            mode: e.mode,
            snat_addr: e.snat_addr,
            owner: e.name.clone(),
            source_ranges: e.source_ranges.clone(),
            xdp_only: false,
            backends: e
                .backends
                .iter()
                .map(|b| DeclaredBackend {
                    addr: b.addr,
                    port: b.port,
                    weight: b.weight,
                    state: b.state,
                })
                .collect(),
        };
        check_declared(&declared)
            .map_err(|reason| config_error(line, &format!("{at} ({})", e.name), &reason))?;
        out.push(declared);
    }
    Ok(out)
}

/// The line of the entry named `name` (its `name:` key), for errors the parser cannot place.
fn line_of_name(text: &str, name: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            let l = l.trim_start().trim_start_matches("- ").trim_start();
            l.strip_prefix("name:")
                .map(|v| v.trim().trim_matches(['"', '\'']) == name)
                .unwrap_or(false)
        })
        .map(|i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        parse(Path::new("/etc/datapath/services.yaml"), text)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn a_documented_file_parses_with_defaults() {
        let text = "\
services:
  - name: web
    vip: 198.18.0.10
    port: 80
    backends:
      - addr: 198.18.1.1
        port: 8080
      - addr: 198.18.1.2
        port: 8080
        weight: 3
        state: draining
  - name: dns
    vip: 198.18.0.11
    port: 53
    protocol: udp
    mode: dsr
";
        let got = parse(Path::new("s.yaml"), text).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].owner, "web");
        assert_eq!(got[0].key.to_string(), "tcp/198.18.0.10:80");
        assert_eq!(got[0].mode, ForwardingMode::FullNat);
        assert_eq!(
            got[0].backends,
            vec![
                DeclaredBackend {
                    addr: "198.18.1.1".parse().unwrap(),
                    port: 8080,
                    weight: 1,
                    state: BackendState::Active
                },
                DeclaredBackend {
                    addr: "198.18.1.2".parse().unwrap(),
                    port: 8080,
                    weight: 3,
                    state: BackendState::Draining
                },
            ]
        );
        assert_eq!(got[1].key.to_string(), "udp/198.18.0.11:53");
        assert_eq!(got[1].mode, ForwardingMode::Dsr);
        assert!(got[1].backends.is_empty());
        assert!(parse(Path::new("s.yaml"), "").unwrap().is_empty());
        assert!(
            parse(Path::new("s.yaml"), "services: []\n")
                .unwrap()
                .is_empty()
        );
    }

    /// A dual-stack service is one entry per family; an IPv6 entry takes IPv6 backends.
    #[test]
    fn ipv6_entries_parse_and_a_mixed_family_is_refused_with_its_line() {
        let text = "\
services:
  - name: web
    vip: 198.18.0.10
    port: 80
    backends: [{addr: 198.18.1.1, port: 8080}]
  - name: web-v6
    vip: 2001:db8:64::10
    port: 80
    backends: [{addr: 2001:db8:1::11, port: 8080}]
";
        let got = parse(Path::new("s.yaml"), text).unwrap();
        assert_eq!(got[1].key.to_string(), "tcp/[2001:db8:64::10]:80");
        assert_eq!(
            got[1].backends[0].addr,
            "2001:db8:1::11".parse::<IpAddr>().unwrap()
        );
        let mixed = text.replace("2001:db8:1::11", "198.18.1.1");
        let e = err(&mixed);
        assert!(e.contains("line 6"), "{e}");
        assert!(
            e.contains("it is IPv4 but VIP 2001:db8:64::10 is IPv6"),
            "{e}"
        );
    }

    /// Every refusal names the file, the line and the key.
    #[test]
    fn invalid_files_are_refused_with_line_and_key() {
        let head = "services:\n  - name: web\n    vip: 198.18.0.10\n    port: 80\n";
        let cases = [
            (
                format!("{head}    prot: tcp\n"),
                "services file /etc/datapath/services.yaml line 5: key `services[0].prot`: unknown field `prot`, expected one of `name`, `vip`, `port`, `protocol`, `mode`, `snat_addr`, `source_ranges`, `backends`",
            ),
            (
                "services:\n  - name: web\n    vip: 198.18.0.300\n    port: 80\n".to_string(),
                "services file /etc/datapath/services.yaml line 3: key `services[0].vip`: invalid IP address syntax",
            ),
            (
                format!("{head}    backends:\n      - addr: 198.18.1.1\n        port: 70000\n"),
                "services file /etc/datapath/services.yaml line 7: key `services[0].backends[0].port`: invalid value: integer `70000`, expected u16",
            ),
            (
                format!("{head}    backends:\n      - addr: 198.18.1.1\n        port: 0\n"),
                "services file /etc/datapath/services.yaml line 2: key `services[0] (web)`: invalid backend 198.18.1.1:0: port must not be 0",
            ),
            (
                format!("{head}  - name: web\n    vip: 198.18.0.11\n    port: 80\n"),
                "services file /etc/datapath/services.yaml line 2: key `services[1].name`: \"web\" is also the name of services[0]",
            ),
            (
                format!("{head}  - name: other\n    vip: 198.18.0.10\n    port: 80\n"),
                "services file /etc/datapath/services.yaml line 5: key `services[1]`: service tcp/198.18.0.10:80 is also declared by \"web\"",
            ),
            (
                format!("{head}    mode: dsr\n    snat_addr: 198.18.0.1\n"),
                "services file /etc/datapath/services.yaml line 2: key `services[0] (web)`: invalid SNAT address 198.18.0.1: only full-nat services rewrite the source, dsr services keep the client's",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(err(&text), want, "{text}");
        }
    }
}
