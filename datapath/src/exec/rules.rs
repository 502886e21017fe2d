//! Enforcement rules of the exec module (`exec.enforcement`): deny the exec of listed files
//! and the connect to listed `CIDR:port`s, only in configured cgroups (and their
//! descendants), or host-wide when configured so explicitly. Off by default; `audit` reports
//! the matches and denies nothing.
//!
//! Exec rules match the executed file's inode (resolved from the path at start, so a rename
//! or a hard link is still matched, and a replaced file is not); a script is matched by its
//! interpreter, the program the kernel runs. Connect rules match the destination the process
//! asks for, IPv4 (also as `::ffff:a.b.c.d` on an IPv6 socket) and IPv6.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use bpf_common::trace::{
    ConnectRuleData, ENFORCE_AUDIT, ENFORCE_DENY, ENFORCE_OFF, ExecRuleKey, MAX_ENFORCED_CGROUPS,
    MAX_RULES,
};

/// What the rules do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    #[default]
    Off,
    /// Report the matches, deny nothing.
    Audit,
    /// Deny the matches (and report them).
    Enforce,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::Audit => "audit",
            Mode::Enforce => "enforce",
        }
    }

    /// The programs' `ENFORCE_MODE`.
    pub fn global(self) -> u32 {
        match self {
            Mode::Off => ENFORCE_OFF,
            Mode::Audit => ENFORCE_AUDIT,
            Mode::Enforce => ENFORCE_DENY,
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Mode::Off),
            "audit" => Ok(Mode::Audit),
            "enforce" => Ok(Mode::Enforce),
            _ => Err(format!("{s:?} is not a mode: off, audit or enforce")),
        }
    }
}

/// A destination connects to which are denied: a prefix and a port (0: every port).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectRule {
    pub addr: IpAddr,
    pub prefix: u8,
    pub port: u16,
}

impl std::fmt::Display for ConnectRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let full = if self.addr.is_ipv4() { 32 } else { 128 };
        let net = if self.prefix == full {
            self.addr.to_string()
        } else {
            format!("{}/{}", self.addr, self.prefix)
        };
        match (self.addr, self.port) {
            (_, 0) => write!(f, "{net}"),
            (IpAddr::V4(_), p) => write!(f, "{net}:{p}"),
            (IpAddr::V6(_), p) => write!(f, "[{net}]:{p}"),
        }
    }
}

/// `a.b.c.d[/len]` or `v6[/len]`: the address and prefix length, host bits refused.
fn parse_net(s: &str, whole: &str) -> Result<(IpAddr, u8), String> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let addr: IpAddr = addr.parse().map_err(|_| {
        format!("{whole:?}: {addr:?} is not an address (a.b.c.d/len:port or [v6/len]:port)")
    })?;
    let full = if addr.is_ipv4() { 32 } else { 128 };
    let len = match len {
        None => full,
        Some(l) => l
            .parse::<u8>()
            .ok()
            .filter(|l| *l <= full)
            .ok_or_else(|| format!("{whole:?}: invalid prefix length {l:?}"))?,
    };
    let host_bits = match addr {
        IpAddr::V4(a) => u128::from(u32::from(a)) & ((1u128 << (32 - u32::from(len))) - 1),
        IpAddr::V6(a) => {
            let bits = 128 - u32::from(len);
            if bits == 128 {
                u128::from(a)
            } else {
                u128::from(a) & ((1u128 << bits) - 1)
            }
        }
    };
    if host_bits != 0 {
        return Err(format!("{whole:?} has host bits set"));
    }
    Ok((addr, len))
}

fn parse_port(p: &str, whole: &str) -> Result<u16, String> {
    p.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{whole:?}: {p:?} is not a port (1-65535)"))
}

impl std::str::FromStr for ConnectRule {
    type Err = String;

    /// `198.18.0.0/15:80`, `198.18.0.1:443`, `198.18.0.0/24` (every port),
    /// `[2001:db8::/32]:80`, `2001:db8::1`.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (net, port) = if let Some(rest) = s.strip_prefix('[') {
            let (net, after) = rest
                .split_once(']')
                .ok_or_else(|| format!("{s:?}: no closing ]"))?;
            let port = match after {
                "" => 0,
                p => parse_port(
                    p.strip_prefix(':')
                        .ok_or_else(|| format!("{s:?}: expected :port after ]"))?,
                    s,
                )?,
            };
            (net, port)
        } else if s.matches(':').count() == 1 {
            let (net, p) = s.split_once(':').unwrap_or((s, ""));
            (net, parse_port(p, s)?)
        } else {
            (s, 0)
        };
        let (addr, prefix) = parse_net(net, s)?;
        Ok(ConnectRule { addr, prefix, port })
    }
}

impl ConnectRule {
    /// The `CONNECT_DENY` key: prefix length (port bits, then address bits) and data.
    pub fn key(&self) -> (u32, ConnectRuleData) {
        let (addr, bits) = match self.addr {
            IpAddr::V4(a) => (a.to_ipv6_mapped().octets(), 96 + u32::from(self.prefix)),
            IpAddr::V6(a) => (a.octets(), u32::from(self.prefix)),
        };
        (
            16 + bits,
            ConnectRuleData {
                port_be: self.port.to_be_bytes(),
                addr,
            },
        )
    }
}

/// `exec.enforcement`, as configured.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Enforcement {
    pub mode: Mode,
    /// Cgroup directories under the cgroup2 root (`/a/b`) the rules apply in, with their
    /// descendants.
    pub cgroups: Vec<String>,
    /// Every cgroup: only when set explicitly.
    pub host_wide: bool,
    pub deny_exec: Vec<PathBuf>,
    pub deny_connect: Vec<ConnectRule>,
}

impl Enforcement {
    /// Whether the settings make sense, else (the field, why).
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.mode != Mode::Off && self.cgroups.is_empty() && !self.host_wide {
            return Err((
                "cgroups",
                "enforcement needs the cgroups it applies in (or host_wide: true, explicitly)"
                    .into(),
            ));
        }
        if self.cgroups.len() > MAX_ENFORCED_CGROUPS as usize {
            return Err(("cgroups", format!("at most {MAX_ENFORCED_CGROUPS}")));
        }
        for c in &self.cgroups {
            if !c.starts_with('/') || c.split('/').any(|p| p == ".." || p == ".") {
                return Err((
                    "cgroups",
                    format!("{c:?}: a path under the cgroup2 root, like /my.slice/app"),
                ));
            }
        }
        for p in &self.deny_exec {
            if !p.is_absolute() {
                return Err((
                    "deny_exec",
                    format!("{}: not an absolute path", p.display()),
                ));
            }
        }
        if self.deny_exec.len() + self.deny_connect.len() > MAX_RULES as usize {
            return Err(("deny_exec", format!("at most {MAX_RULES} rules in all")));
        }
        Ok(())
    }
}

/// A cgroup enforcement applies in, found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnforcedCgroup {
    pub path: String,
    pub dir: PathBuf,
    pub id: u64,
}

/// An exec rule, its file found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecRule {
    pub index: u16,
    pub path: PathBuf,
    pub key: ExecRuleKey,
}

/// The rules with their cgroups and files found, ready for the programs' maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    pub mode: Mode,
    pub host_wide: bool,
    pub cgroups: Vec<EnforcedCgroup>,
    pub exec: Vec<ExecRule>,
    /// (index, rule).
    pub connect: Vec<(u16, ConnectRule)>,
}

/// `st_dev` as the kernel's `s_dev` holds it (`MKDEV`: major << 20 | minor).
pub fn kernel_dev(st_dev: u64) -> u32 {
    let (major, minor) = (libc::major(st_dev), libc::minor(st_dev));
    (major << 20) | (minor & 0xf_ffff)
}

/// Finds what `e` names: each cgroup under `cgroup_root`, each file. The first one missing
/// names itself (nothing is applied then).
pub fn resolve(e: &Enforcement, cgroup_root: &Path) -> Result<Resolved, String> {
    use std::os::unix::fs::MetadataExt as _;
    let mut out = Resolved {
        mode: e.mode,
        host_wide: e.host_wide,
        ..Default::default()
    };
    if e.mode == Mode::Off {
        return Ok(out);
    }
    for c in &e.cgroups {
        let dir = cgroup_root.join(c.trim_start_matches('/'));
        let meta = std::fs::metadata(&dir).map_err(|err| {
            format!(
                "exec.enforcement.cgroups: {c}: {err} (looked at {})",
                dir.display()
            )
        })?;
        if !meta.is_dir() {
            return Err(format!("exec.enforcement.cgroups: {c}: not a directory"));
        }
        out.cgroups.push(EnforcedCgroup {
            path: c.clone(),
            dir,
            id: meta.ino(),
        });
    }
    let mut index = 0u16;
    for p in &e.deny_exec {
        let meta = std::fs::metadata(p)
            .map_err(|err| format!("exec.enforcement.deny_exec: {}: {err}", p.display()))?;
        if !meta.is_file() {
            return Err(format!(
                "exec.enforcement.deny_exec: {}: not a file",
                p.display()
            ));
        }
        out.exec.push(ExecRule {
            index,
            path: p.clone(),
            key: ExecRuleKey {
                ino: meta.ino(),
                dev: kernel_dev(meta.dev()),
                _pad: 0,
            },
        });
        index += 1;
    }
    for r in &e.deny_connect {
        out.connect.push((index, r.clone()));
        index += 1;
    }
    Ok(out)
}

/// An address as the programs report it (IPv4 as `::ffff:a.b.c.d`), in its own family.
pub fn address_of(bytes: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(bytes);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None if v6.is_unspecified() => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        None => IpAddr::V6(v6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(s: &str) -> ConnectRule {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn connect_rules_parse_in_both_families_and_print_back() {
        let r = rule("198.18.0.0/15:80");
        assert_eq!(
            r,
            ConnectRule {
                addr: "198.18.0.0".parse().unwrap(),
                prefix: 15,
                port: 80
            }
        );
        for s in [
            "198.18.0.0/15:80",
            "198.18.0.1:443",
            "198.18.0.0/24",
            "[2001:db8::/32]:80",
            "2001:db8::1",
            "[2001:db8::1]:22",
        ] {
            assert_eq!(rule(s).to_string(), s);
        }
        assert_eq!(rule("2001:db8::/32").port, 0);
        assert_eq!(rule("[2001:db8::1]").prefix, 128);
    }

    #[test]
    fn bad_connect_rules_are_refused_with_the_reason() {
        for (s, why) in [
            ("198.18.0.1/15:80", "host bits"),
            ("198.18.0.0/33", "prefix length"),
            ("198.18.0.0:0", "not a port"),
            ("198.18.0.0:http", "not a port"),
            ("[2001:db8::1:80", "closing"),
            ("[2001:db8::1]80", ":port"),
            ("example.com:80", "not an address"),
            ("2001:db8::1/32", "host bits"),
        ] {
            let e = s.parse::<ConnectRule>().unwrap_err();
            assert!(e.contains(why), "{s}: {e}");
        }
    }

    #[test]
    fn lpm_keys_put_the_port_before_the_mapped_address() {
        let (len, data) = rule("198.18.0.0/15:80").key();
        assert_eq!(len, 16 + 96 + 15);
        assert_eq!(data.port_be, [0, 80]);
        assert_eq!(
            &data.addr[..12],
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]
        );
        assert_eq!(&data.addr[12..], &[198, 18, 0, 0]);
        let (len, data) = rule("2001:db8::/32").key();
        assert_eq!(len, 16 + 32);
        assert_eq!(data.port_be, [0, 0]);
    }

    #[test]
    fn enforcement_needs_a_scope_and_sane_paths() {
        let mut e = Enforcement {
            mode: Mode::Enforce,
            ..Default::default()
        };
        assert_eq!(e.validate().unwrap_err().0, "cgroups");
        e.host_wide = true;
        assert!(e.validate().is_ok());
        e.host_wide = false;
        e.cgroups = vec!["relative".into()];
        assert_eq!(e.validate().unwrap_err().0, "cgroups");
        e.cgroups = vec!["/a/../b".into()];
        assert_eq!(e.validate().unwrap_err().0, "cgroups");
        e.cgroups = vec!["/a/b".into()];
        e.deny_exec = vec!["bin/true".into()];
        assert_eq!(e.validate().unwrap_err().0, "deny_exec");
        e.deny_exec = vec!["/bin/true".into()];
        assert!(e.validate().is_ok());
        // Off needs nothing.
        assert!(Enforcement::default().validate().is_ok());
    }

    #[test]
    fn resolve_finds_inodes_and_names_what_is_missing() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = std::env::temp_dir().join(format!("dp-rules-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("cg")).unwrap();
        let file = dir.join("prog");
        std::fs::write(&file, b"x").unwrap();
        let e = Enforcement {
            mode: Mode::Audit,
            cgroups: vec!["/cg".into()],
            deny_exec: vec![file.clone()],
            deny_connect: vec![rule("198.18.0.0/24:9")],
            ..Default::default()
        };
        let r = resolve(&e, &dir).unwrap();
        let meta = std::fs::metadata(&file).unwrap();
        assert_eq!(r.exec[0].key.ino, meta.ino());
        assert_eq!(r.exec[0].index, 0);
        assert_eq!(r.connect[0].0, 1);
        assert_eq!(
            r.cgroups[0].id,
            std::fs::metadata(dir.join("cg")).unwrap().ino()
        );
        let missing = Enforcement {
            deny_exec: vec![dir.join("nope")],
            ..e.clone()
        };
        let err = resolve(&missing, &dir).unwrap_err();
        assert!(err.contains("deny_exec") && err.contains("nope"), "{err}");
        let no_cgroup = Enforcement {
            cgroups: vec!["/absent".into()],
            ..e
        };
        assert!(resolve(&no_cgroup, &dir).unwrap_err().contains("/absent"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn kernel_dev_is_mkdev() {
        // 8:1 (sda1) in glibc's encoding, 0x801.
        assert_eq!(kernel_dev(libc::makedev(8, 1)), (8 << 20) | 1);
        assert_eq!(kernel_dev(libc::makedev(259, 70_000)), (259 << 20) | 70_000);
    }

    #[test]
    fn mapped_addresses_come_back_in_their_family() {
        assert_eq!(
            address_of(Ipv4Addr::new(198, 18, 0, 1).to_ipv6_mapped().octets()),
            IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1))
        );
        let v6: Ipv6Addr = "2001:db8::1".parse().unwrap();
        assert_eq!(address_of(v6.octets()), IpAddr::V6(v6));
        assert_eq!(address_of([0; 16]), IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    }
}
