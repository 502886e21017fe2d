//! A whole test bed: topology, backend servers and (optionally) the daemon, torn down in the
//! right order when dropped.

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, Result, ensure};
use datapath_api::{Protocol, ServiceView};

use crate::{
    client::sock,
    daemon::{Binaries, Daemon, service_arg},
    servers::BackendServer,
    topology::{Topology, TopologyOptions, VIP},
};

/// The port backends listen on in full-NAT topologies.
pub const BACKEND_PORT: u16 = 8080;
/// The TCP service port the tests use.
pub const TCP_SERVICE_PORT: u16 = 80;
/// The UDP service port the tests use.
pub const UDP_SERVICE_PORT: u16 = 53;

/// With `DATAPATH_TEST_LB_POLICY=allow-all` every lab's daemon also runs the policy module on
/// the LB node's interfaces (`lbc`, `lbb`) with an allow-all policy: the second run of the
/// load-balancer tests (`cargo xtask test`), so the traffic the kernel forwards past the XDP
/// program (DSR replies, cold-neighbour passes) crosses tc programs, as on a policed node.
pub const LB_POLICY_ENV: &str = "DATAPATH_TEST_LB_POLICY";

/// The policy the [`LB_POLICY_ENV`] run applies.
pub const ALLOW_ALL_POLICY: &str = "\
endpoints:
  - interface: \"lb*\"
    default_ingress: allow
    default_egress: allow
";

/// Whether this run puts the allow-all policy on the LB node ([`LB_POLICY_ENV`]).
pub fn lb_policy_requested() -> Result<bool> {
    match std::env::var(LB_POLICY_ENV) {
        Err(_) => Ok(false),
        Ok(v) if v.is_empty() => Ok(false),
        Ok(v) if v == "allow-all" => Ok(true),
        Ok(v) => anyhow::bail!("{LB_POLICY_ENV}={v:?}: the one accepted value is allow-all"),
    }
}

/// A file removed when dropped.
struct TempFile(std::path::PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A directory removed with everything in it on drop.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What to build.
#[derive(Clone, Debug)]
pub struct LabOptions {
    pub topology: TopologyOptions,
    /// Start `datapathd` in the LB namespace (with these binaries).
    pub daemon: Option<Binaries>,
}

impl LabOptions {
    /// Full-NAT topology with `backends` backends and the daemon from [`Binaries::from_env`].
    pub fn with_daemon(backends: usize) -> LabOptions {
        LabOptions {
            topology: TopologyOptions {
                backends,
                dsr: false,
                ipv6: false,
            },
            daemon: Some(Binaries::from_env()),
        }
    }

    /// Direct-server-return topology with three backends and the daemon.
    pub fn dsr() -> LabOptions {
        LabOptions {
            topology: TopologyOptions {
                backends: 3,
                dsr: true,
                ipv6: false,
            },
            daemon: Some(Binaries::from_env()),
        }
    }
}

/// Topology + servers + daemon. Fields drop in declaration order: daemon first (it prints its
/// log if the test is failing), then servers, then the namespaces.
pub struct Lab {
    pub daemon: Option<Daemon>,
    pub servers: Vec<BackendServer>,
    pub topo: Topology,
    /// The daemon's configuration file, when the run asks for one ([`LB_POLICY_ENV`]).
    _config: Option<TempFile>,
    /// Whether the LB node's interfaces carry the allow-all policy.
    pub policed: bool,
    /// Files a test writes for the daemon (configs, kubeconfigs, services files); removed
    /// after the daemon stopped.
    scratch: Option<TempDir>,
}

impl Lab {
    /// Builds the topology, starts a server pair in every backend namespace, and starts the
    /// daemon if asked.
    ///
    /// Full-NAT: the servers listen on `<backend ip>:8080`. DSR: the packets keep their
    /// destination (only the MAC changes), so the servers listen on the VIP itself, on the
    /// service port.
    pub fn start(opts: LabOptions) -> Result<Lab> {
        let topo = Topology::create(&opts.topology)?;
        let mut lab = Lab {
            daemon: None,
            servers: Vec::new(),
            topo,
            _config: None,
            policed: false,
            scratch: None,
        };
        for b in lab.topo.backends.clone() {
            let port = if lab.topo.dsr {
                TCP_SERVICE_PORT
            } else {
                BACKEND_PORT
            };
            let addr = if lab.topo.ipv6 {
                // One dual-stack socket (`[::]`, not IPV6_V6ONLY) answers both families, on
                // the backend's addresses and, in DSR, on both VIPs.
                SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port))
            } else if lab.topo.dsr {
                sock(VIP, port)
            } else {
                sock(b.ip, port)
            };
            lab.servers.push(
                BackendServer::start(&b.ns, &b.name, addr)
                    .with_context(|| format!("starting servers in {}", b.ns))?,
            );
        }
        if let Some(bins) = opts.daemon {
            if lb_policy_requested()? {
                let path = std::env::temp_dir()
                    .join(format!("datapath-{}-lb-policy.yaml", lab.topo.prefix));
                std::fs::write(
                    &path,
                    "reload:\n  watch: false\npolicy:\n  enabled: true\n  interfaces: [lbc, lbb]\n",
                )
                .with_context(|| format!("writing {}", path.display()))?;
                let config = path.display().to_string();
                lab._config = Some(TempFile(path));
                let daemon =
                    Daemon::start(&lab.topo.lb, &lab.topo.prefix, bins, &["--config", &config])?;
                let policy = daemon.dir.join("allow-all.yaml");
                std::fs::write(&policy, ALLOW_ALL_POLICY)?;
                daemon
                    .lb_ctl_ok(&["policy", "apply", "-f", &policy.display().to_string()])
                    .context("applying the allow-all policy on the LB node")?;
                lab.daemon = Some(daemon);
                lab.policed = true;
            } else {
                lab.daemon = Some(Daemon::start(&lab.topo.lb, &lab.topo.prefix, bins, &[])?);
            }
        }
        Ok(lab)
    }

    /// A directory for the files a test hands the daemon, removed with the lab.
    pub fn scratch(&mut self) -> Result<std::path::PathBuf> {
        if self.scratch.is_none() {
            let dir = std::env::temp_dir().join(format!("datapath-{}-files", self.topo.prefix));
            std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
            self.scratch = Some(TempDir(dir));
        }
        Ok(self.scratch.as_ref().expect("just made").0.clone())
    }

    /// Writes `name` with `text` into the lab's scratch directory; answers its path.
    pub fn write_file(&mut self, name: &str, text: &str) -> Result<std::path::PathBuf> {
        let path = self.scratch()?.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// Starts the daemon in the LB namespace with the configuration file `config` (YAML).
    pub fn start_daemon_with_config(&mut self, config: &str) -> Result<()> {
        let path = self.write_file("config.yaml", config)?;
        let arg = path.display().to_string();
        self.daemon = Some(Daemon::start(
            &self.topo.lb,
            &self.topo.prefix,
            Binaries::from_env(),
            &["--config", &arg],
        )?);
        Ok(())
    }

    /// The daemon (panics if the lab has none).
    pub fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("lab started without a daemon")
    }

    /// The daemon, mutably.
    pub fn daemon_mut(&mut self) -> &mut Daemon {
        self.daemon.as_mut().expect("lab started without a daemon")
    }

    /// The client namespace.
    pub fn client_ns(&self) -> &str {
        &self.topo.client
    }

    /// The address backend `name` is configured with in the service (`ip:8080`, or `ip:80` in
    /// DSR).
    pub fn backend_addr(&self, name: &str) -> SocketAddr {
        let port = if self.topo.dsr {
            TCP_SERVICE_PORT
        } else {
            BACKEND_PORT
        };
        sock(self.topo.backend(name).ip, port)
    }

    /// [`Lab::backend_addr`] with the backend's IPv6 address (dual-stack topologies).
    pub fn backend_addr6(&self, name: &str) -> SocketAddr {
        let port = self.backend_addr(name).port();
        SocketAddr::from((self.topo.backend(name).ip6, port))
    }

    /// The backend name whose address (of either family) is `addr`.
    pub fn backend_name(&self, addr: IpAddr) -> Option<&str> {
        self.topo
            .backends
            .iter()
            .find(|b| IpAddr::V4(b.ip) == addr || IpAddr::V6(b.ip6) == addr)
            .map(|b| b.name.as_str())
    }

    /// The server running in backend `name`.
    pub fn server(&self, name: &str) -> &BackendServer {
        self.servers
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no server {name}"))
    }

    /// `lb-ctl service add VIP:PORT --proto P --mode M`, then `backend add` for each backend
    /// name, weight 1.
    pub fn add_service(
        &self,
        port: u16,
        proto: Protocol,
        mode: &str,
        backends: &[&str],
    ) -> Result<ServiceView> {
        self.add_service_on(IpAddr::V4(VIP), port, proto, mode, backends)
    }

    /// [`Lab::add_service`] on VIP `vip`, of either family: the backends are added with their
    /// addresses of the VIP's family.
    pub fn add_service_on(
        &self,
        vip: IpAddr,
        port: u16,
        proto: Protocol,
        mode: &str,
        backends: &[&str],
    ) -> Result<ServiceView> {
        let d = self.daemon();
        let svc = service_arg(vip, port);
        let proto_s = proto.to_string();
        d.lb_ctl_ok(&["service", "add", &svc, "--proto", &proto_s, "--mode", mode])?;
        for name in backends {
            let addr = if vip.is_ipv6() {
                self.backend_addr6(name)
            } else {
                self.backend_addr(name)
            }
            .to_string();
            d.lb_ctl_ok(&[
                "backend", "add", &svc, &addr, "--proto", &proto_s, "--weight", "1",
            ])?;
        }
        let view = d.service(vip, port, proto)?;
        ensure!(
            view.backends.len() == backends.len(),
            "service shows {} backends, expected {}",
            view.backends.len(),
            backends.len()
        );
        Ok(view)
    }

    /// Diagnostics for a failure message: daemon log and counters, server counts.
    pub fn diagnostics(&mut self) -> String {
        let mut out = String::new();
        for s in &self.servers {
            out.push_str(&format!(
                "server {} in {}: {} tcp accepted, local addrs {:?}\n",
                s.name,
                s.ns,
                s.tcp_accepted(),
                s.local_addrs()
            ));
        }
        if let Some(d) = self.daemon.as_mut() {
            out.push_str(&d.diagnostics());
        }
        out
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for s in &self.servers {
                eprintln!(
                    "server {} in {}: {} tcp accepted, local addrs {:?}",
                    s.name,
                    s.ns,
                    s.tcp_accepted(),
                    s.local_addrs()
                );
            }
        }
    }
}
