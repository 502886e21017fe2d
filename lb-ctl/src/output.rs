//! Human-readable output: aligned tables and one-line confirmations.
use std::fmt::Write as _;

use datapath_api::{
    BackendKey, BackendView, CtFlow, CtStats, FlowEventView, PolicyStatus, ServiceKey, ServiceView,
    StatsView,
};

/// Column alignment.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Align {
    Left,
    Right,
}

/// A table whose columns are as wide as their widest cell, two spaces apart.
struct Table {
    header: Vec<&'static str>,
    align: Vec<Align>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(columns: &[(&'static str, Align)]) -> Self {
        Self {
            header: columns.iter().map(|c| c.0).collect(),
            align: columns.iter().map(|c| c.1).collect(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.header.len());
        self.rows.push(cells);
    }

    fn render(&self) -> String {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.len()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let header: Vec<String> = self.header.iter().map(|h| h.to_string()).collect();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                let pad = widths[i] - cell.chars().count();
                // Headers of right-aligned columns are right-aligned too, over their numbers.
                if self.align[i] == Align::Right {
                    line.extend(std::iter::repeat_n(' ', pad));
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

pub fn service_key(v: &ServiceView) -> ServiceKey {
    ServiceKey {
        vip: v.vip,
        port: v.port,
        proto: v.proto,
    }
}

fn backend_key(b: &BackendView) -> BackendKey {
    BackendKey {
        addr: b.addr,
        port: b.port,
    }
}

/// `VIP:PORT` with IPv6 in brackets.
fn endpoint(v: &ServiceView) -> String {
    BackendKey {
        addr: v.vip,
        port: v.port,
    }
    .to_string()
}

/// A backend's share of its service's live Maglev table.
fn share(b: &BackendView, service: &ServiceView) -> String {
    let total: u64 = service
        .backends
        .iter()
        .map(|b| u64::from(b.table_entries))
        .sum();
    if total == 0 {
        return "0.0%".into();
    }
    format!("{:.1}%", 100.0 * f64::from(b.table_entries) / total as f64)
}

/// `service list`: each service, its backends indented below it.
pub fn service_list(services: &[ServiceView]) -> String {
    if services.is_empty() {
        return "no services (add one with: lb-ctl service add VIP:PORT)\n".into();
    }
    use Align::*;
    let mut t = Table::new(&[
        ("SERVICE", Left),
        ("PROTO", Left),
        ("MODE", Left),
        ("SOURCE", Left),
        ("BACKENDS", Right),
        ("WEIGHT", Right),
        ("STATE", Left),
        ("TABLE", Right),
        ("PACKETS", Right),
        ("BYTES", Right),
    ]);
    for s in services {
        t.row(vec![
            endpoint(s),
            s.proto.to_string(),
            s.mode.to_string(),
            s.source.to_string(),
            s.backends.len().to_string(),
            String::new(),
            String::new(),
            String::new(),
            s.counters.packets.to_string(),
            s.counters.bytes.to_string(),
        ]);
        for b in &s.backends {
            t.row(vec![
                format!("  -> {}", backend_key(b)),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                b.weight.to_string(),
                b.state.to_string(),
                share(b, s),
                b.counters.packets.to_string(),
                b.counters.bytes.to_string(),
            ]);
        }
    }
    t.render()
}

/// `service show`: the service's fields, then a table of its backends.
pub fn service_show(s: &ServiceView) -> String {
    let mut out = String::new();
    let snat = match (s.mode, s.snat_addr) {
        (datapath_api::ForwardingMode::Dsr, _) => "-".to_string(),
        (_, Some(a)) => a.to_string(),
        (_, None) => "auto (the address towards each backend)".to_string(),
    };
    let fields = [
        ("SERVICE", service_key(s).to_string()),
        ("ID", s.id.to_string()),
        ("MODE", s.mode.to_string()),
        (
            "SOURCE",
            match &s.owner {
                Some(owner) => format!("{} ({owner})", s.source),
                None => s.source.to_string(),
            },
        ),
        ("SNAT", snat),
        (
            "SOURCES",
            if s.source_ranges.is_empty() {
                "any".to_string()
            } else {
                s.source_ranges
                    .iter()
                    .map(|r| r.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        ),
        ("BACKENDS", s.backends.len().to_string()),
        ("PACKETS", s.counters.packets.to_string()),
        ("BYTES", s.counters.bytes.to_string()),
    ];
    for (name, value) in fields {
        let _ = writeln!(out, "{name:<9} {value}");
    }
    if s.backends.is_empty() {
        out.push_str("\nno backends (add one with: lb-ctl backend add VIP:PORT ADDR:PORT)\n");
        return out;
    }
    use Align::*;
    let mut t = Table::new(&[
        ("BACKEND", Left),
        ("ID", Right),
        ("WEIGHT", Right),
        ("STATE", Left),
        ("NEIGHBOUR", Left),
        ("TABLE", Right),
        ("PACKETS", Right),
        ("BYTES", Right),
    ]);
    for b in &s.backends {
        t.row(vec![
            backend_key(b).to_string(),
            b.id.to_string(),
            b.weight.to_string(),
            b.state.to_string(),
            b.neighbour.clone().unwrap_or_else(|| "-".into()),
            share(b, s),
            b.counters.packets.to_string(),
            b.counters.bytes.to_string(),
        ]);
    }
    out.push('\n');
    out.push_str(&t.render());
    out
}

/// `stats`: traffic per service and backend, then the verdict counters.
pub fn stats(v: &StatsView) -> String {
    use Align::*;
    let mut out = String::new();
    if v.services.is_empty() {
        out.push_str("no services\n");
    } else {
        let mut t = Table::new(&[
            ("SERVICE / BACKEND", Left),
            ("PACKETS", Right),
            ("BYTES", Right),
        ]);
        for s in &v.services {
            t.row(vec![
                service_key(s).to_string(),
                s.counters.packets.to_string(),
                s.counters.bytes.to_string(),
            ]);
            for b in &s.backends {
                t.row(vec![
                    format!("  -> {}", backend_key(b)),
                    b.counters.packets.to_string(),
                    b.counters.bytes.to_string(),
                ]);
            }
        }
        out.push_str(&t.render());
    }
    let mut t = Table::new(&[("REASON", Left), ("PACKETS", Right)]);
    for (reason, n) in &v.reasons {
        t.row(vec![reason.clone(), n.to_string()]);
    }
    out.push('\n');
    out.push_str(&t.render());
    if let Some(flood) = &v.syn_flood {
        out.push('\n');
        out.push_str(&syn_flood(flood));
    }
    out
}

/// The SYN-flood line of `lb-ctl stats`.
fn syn_flood(f: &datapath_api::SynFloodView) -> String {
    if f.rate_per_cpu == 0 {
        return "syn flood mode: off (lb.syn_flood_rate 0)\n".into();
    }
    let state = if f.cpus_flooding > 0 {
        format!("ACTIVE on {} of {} CPUs", f.cpus_flooding, f.cpus)
    } else {
        "inactive".into()
    };
    format!(
        "syn flood mode: {state} (above {} new flows/s per CPU, DSR SYNs untracked; entered {} \
         time(s))\n",
        f.rate_per_cpu, f.entered
    )
}

/// `lb-ctl status`: modules first (with why one is off), then features and interfaces.
pub fn status(v: &datapath_api::StatusView) -> String {
    use Align::*;
    let mut out = format!(
        "datapathd {}: {}\n",
        v.version,
        if v.ready { "ready" } else { "NOT READY" }
    );
    if let Some(file) = &v.config_file {
        out.push_str(&format!(
            "config {file}: {} reload(s) applied, {} refused\n",
            v.config_reloads, v.config_reload_failures
        ));
    }
    if let Some(e) = &v.last_reload_error {
        out.push_str(&format!("last refused reload: {e}\n"));
    }
    let mut t = Table::new(&[
        ("MODULE", Left),
        ("STATE", Left),
        ("RESTARTS", Right),
        ("WHY", Left),
    ]);
    for m in &v.modules {
        let state = match (m.enabled, m.up) {
            (_, true) => "up",
            (true, false) => "down",
            (false, false) => "off",
        };
        // Why it is off, else the last failure of its run loop (it was restarted since).
        let why = m
            .reason
            .clone()
            .or_else(|| {
                m.last_failure
                    .as_ref()
                    .map(|f| format!("last failure: {f}"))
            })
            .unwrap_or_default();
        t.row(vec![
            m.name.clone(),
            state.to_string(),
            m.restarts.to_string(),
            why,
        ]);
    }
    out.push_str(&t.render());
    let mut t = Table::new(&[("FEATURE", Left), ("AVAILABLE", Left), ("DETAIL", Left)]);
    for f in &v.features {
        t.row(vec![
            f.name.clone(),
            if f.available { "yes" } else { "no" }.to_string(),
            f.detail.clone(),
        ]);
    }
    out.push_str(&t.render());
    let mut t = Table::new(&[("INTERFACE", Left), ("XDP MODE", Left)]);
    for i in &v.interfaces {
        t.row(vec![i.name.clone(), i.xdp_mode.clone()]);
    }
    out.push_str(&t.render());
    if let Some(n) = &v.netlink {
        out.push_str(&format!(
            "netlink: {} message(s), {} resync(s), {} unparsable, receive buffer {} bytes, {} re-attachment(s)\n",
            n.messages, n.resyncs, n.parse_errors, n.receive_buffer_bytes, n.reattachments
        ));
    }
    let attached: Vec<_> = v.links.iter().filter(|l| !l.attached.is_empty()).collect();
    if !attached.is_empty() {
        let mut t = Table::new(&[("LINK", Left), ("IFINDEX", Right), ("ATTACHED", Left)]);
        for l in attached {
            t.row(vec![
                l.name.clone(),
                l.ifindex.to_string(),
                l.attached.join(","),
            ]);
        }
        out.push_str(&t.render());
    }
    if !v.neighbours.is_empty() {
        out.push_str(&neighbour_table(&v.neighbours));
    }
    out
}

fn neighbour_table(neighbours: &[datapath_api::NeighbourStatus]) -> String {
    use Align::*;
    let mut t = Table::new(&[
        ("BACKEND", Left),
        ("INTERFACE", Left),
        ("NEIGHBOUR", Left),
        ("MAC", Left),
        ("MANAGED", Left),
    ]);
    for n in neighbours {
        let state = if n.unresolved {
            n.state.to_uppercase()
        } else {
            n.state.clone()
        };
        t.row(vec![
            n.addr.to_string(),
            n.interface.clone().unwrap_or_else(|| "-".into()),
            state,
            n.mac.clone().unwrap_or_else(|| "-".into()),
            if n.managed { "yes" } else { "no" }.to_string(),
        ]);
    }
    t.render()
}

/// The socket LB's lines of `lb-ctl stats`: sockets per service, sockets destroyed.
pub fn socklb_stats(v: &datapath_api::SockLbStatus) -> String {
    use Align::*;
    let mut out = String::from("\n");
    let mut t = Table::new(&[("SOCKET LB SERVICE", Left), ("SOCKETS", Right)]);
    for s in &v.services {
        t.row(vec![s.service.clone(), s.sockets.to_string()]);
    }
    if !v.services.is_empty() {
        out.push_str(&t.render());
    }
    let _ = writeln!(
        out,
        "socket LB: {} sockets destroyed (backend removed)",
        v.sockets_destroyed
    );
    out
}

/// `lb-ctl socklb`: the module's state, then its services and counters, then the latest
/// decisions.
pub fn socklb(v: &datapath_api::SockLbStatus) -> String {
    use Align::*;
    let mut out = String::new();
    let state = if v.up {
        "up".to_string()
    } else {
        format!("off ({})", v.reason.as_deref().unwrap_or("disabled"))
    };
    let _ = writeln!(out, "socket LB: {state}");
    if let Some(c) = &v.cgroup {
        let _ = writeln!(out, "cgroup: {c}");
    }
    if !v.programs.is_empty() {
        let _ = writeln!(out, "programs: {}", v.programs.join(", "));
    }
    let _ = writeln!(
        out,
        "host namespace only: {}",
        if v.host_netns_only { "yes" } else { "no" }
    );
    for c in &v.opt_out_cgroups {
        let _ = writeln!(out, "opted out: {c}");
    }
    let _ = writeln!(out, "sockets destroyed: {}", v.sockets_destroyed);
    if !v.services.is_empty() {
        let mut t = Table::new(&[("SERVICE", Left), ("SOCKETS", Right)]);
        for s in &v.services {
            t.row(vec![s.service.clone(), s.sockets.to_string()]);
        }
        out.push_str(&t.render());
    }
    let counted: Vec<_> = v.reasons.iter().filter(|(_, n)| **n > 0).collect();
    if !counted.is_empty() {
        let mut t = Table::new(&[("OUTCOME", Left), ("COUNT", Right)]);
        for (r, n) in counted {
            t.row(vec![r.clone(), n.to_string()]);
        }
        out.push_str(&t.render());
    }
    if !v.recent.is_empty() {
        let mut t = Table::new(&[
            ("COOKIE", Right),
            ("PID", Right),
            ("CGROUP", Right),
            ("HOOK", Left),
            ("PROTO", Left),
            ("VIP", Left),
            ("BACKEND", Left),
        ]);
        for d in &v.recent {
            t.row(vec![
                d.cookie.to_string(),
                d.pid.to_string(),
                d.cgroup_id.to_string(),
                match d.hook {
                    datapath_api::SockLbHook::Connect => "connect",
                    datapath_api::SockLbHook::Sendmsg => "sendmsg",
                }
                .into(),
                d.proto.to_string(),
                d.vip.to_string(),
                match d.outcome {
                    datapath_api::SockLbOutcome::Translated => d.backend.to_string(),
                    datapath_api::SockLbOutcome::NoBackend => "refused: no backend".into(),
                },
            ]);
        }
        out.push_str(&t.render());
    }
    out
}

/// `lb-ctl node`.
/// `sources`: one line per source, then what each skipped, rejected and noted.
pub fn sources(v: &datapath_api::SourcesView) -> String {
    use Align::*;
    let mut t = Table::new(&[
        ("SOURCE", Left),
        ("ENABLED", Left),
        ("SYNCED", Left),
        ("LAST SYNC", Right),
        ("SYNCS", Right),
        ("ERRORS", Right),
        ("SERVICES", Right),
        ("OBJECTS", Right),
        ("LOCATION", Left),
    ]);
    for s in &v.sources {
        t.row(vec![
            s.source.to_string(),
            if s.enabled { "yes" } else { "no" }.into(),
            if s.synced { "yes" } else { "no" }.into(),
            s.last_sync_age_seconds
                .map(|a| format!("{a:.1}s ago"))
                .unwrap_or_else(|| "-".into()),
            s.syncs.to_string(),
            s.sync_errors.to_string(),
            s.services.to_string(),
            s.objects.to_string(),
            s.location.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    let mut out = t.render();
    for s in &v.sources {
        if let Some(e) = &s.last_error {
            let _ = writeln!(out, "{}: last error: {e}", s.source);
        }
        for k in &s.skipped {
            let _ = writeln!(out, "{}: skipped {}: {}", s.source, k.object, k.reason);
        }
        for r in &s.rejected {
            let _ = writeln!(
                out,
                "{}: not applied {} ({}): {}",
                s.source, r.service, r.owner, r.reason
            );
        }
        for n in &s.notes {
            let _ = writeln!(out, "{}: note: {n}", s.source);
        }
    }
    out
}

pub fn node(v: &datapath_api::NodeView) -> String {
    use Align::*;
    let mut out = String::new();
    if !v.ready {
        out.push_str("netlink view NOT READY (first dump or a resync in progress)\n");
    }
    let mut t = Table::new(&[
        ("IFINDEX", Right),
        ("LINK", Left),
        ("MAC", Left),
        ("MTU", Right),
        ("STATE", Left),
        ("ATTACHED", Left),
    ]);
    for l in &v.links {
        t.row(vec![
            l.ifindex.to_string(),
            l.name.clone(),
            l.mac.clone().unwrap_or_else(|| "-".into()),
            l.mtu.to_string(),
            if l.up { "up" } else { "down" }.to_string(),
            l.attached.join(","),
        ]);
    }
    out.push_str(&t.render());
    let mut t = Table::new(&[("ADDRESS", Left), ("INTERFACE", Left)]);
    for a in &v.addresses {
        t.row(vec![
            format!("{}/{}", a.addr, a.prefix_len),
            a.interface.clone(),
        ]);
    }
    out.push_str(&t.render());
    let mut t = Table::new(&[
        ("NEIGHBOUR", Left),
        ("INTERFACE", Left),
        ("MAC", Left),
        ("STATE", Left),
        ("MANAGED", Left),
    ]);
    for n in &v.neighbours {
        t.row(vec![
            n.addr.to_string(),
            n.interface.clone(),
            n.mac.clone().unwrap_or_else(|| "-".into()),
            n.state.clone(),
            if n.managed { "yes" } else { "no" }.to_string(),
        ]);
    }
    out.push_str(&t.render());
    let mut t = Table::new(&[
        ("ROUTE", Left),
        ("TABLE", Right),
        ("TYPE", Left),
        ("VIA", Left),
        ("DEV", Left),
        ("METRIC", Right),
    ]);
    for r in &v.routes {
        t.row(vec![
            r.dst.clone(),
            r.table.to_string(),
            r.kind.clone(),
            r.gateway
                .map(|g| g.to_string())
                .unwrap_or_else(|| "-".into()),
            r.interface.clone().unwrap_or_else(|| "-".into()),
            r.metric.map(|m| m.to_string()).unwrap_or_default(),
        ]);
    }
    out.push_str(&t.render());
    out.push_str(&format!(
        "netlink: {} message(s), {} resync(s), {} unparsable, receive buffer {} bytes\n",
        v.netlink.messages,
        v.netlink.resyncs,
        v.netlink.parse_errors,
        v.netlink.receive_buffer_bytes
    ));
    out
}

/// A nanosecond duration in seconds, one decimal.
fn secs(ns: u64) -> String {
    format!("{:.1}s", ns as f64 / 1e9)
}

/// An optional cell: `-` when absent (an unnamed rule, the default action).
fn or_dash(v: Option<impl ToString>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

/// `lb-ctl policy list`.
pub fn policy(v: &PolicyStatus) -> String {
    let mut out = format!("generation {}\n\n", v.generation);
    let mut t = Table::new(&[
        ("ENDPOINT", Align::Left),
        ("INTERFACES", Align::Left),
        ("DIR", Align::Left),
        ("ALLOWED", Align::Right),
        ("DENIED", Align::Right),
        ("DEFAULT", Align::Right),
        ("TRACKED", Align::Right),
        ("CUT", Align::Right),
    ]);
    for ep in &v.endpoints {
        for (dir, c) in [("ingress", &ep.ingress), ("egress", &ep.egress)] {
            t.row(vec![
                ep.endpoint.clone(),
                ep.interfaces.join(","),
                dir.into(),
                c.allowed.to_string(),
                c.denied.to_string(),
                c.default_hits.to_string(),
                c.tracked.to_string(),
                c.cut.to_string(),
            ]);
        }
    }
    out.push_str(&t.render());
    out.push('\n');
    let mut r = Table::new(&[
        ("ID", Align::Right),
        ("ENDPOINT", Align::Left),
        ("DIR", Align::Left),
        ("NAME", Align::Left),
        ("CIDR", Align::Left),
        ("PROTO", Align::Left),
        ("PORTS", Align::Left),
        ("ACTION", Align::Left),
        ("PACKETS", Align::Right),
        ("BYTES", Align::Right),
    ]);
    for stats in &v.rules {
        let rule = &stats.rule;
        r.row(vec![
            rule.id.to_string(),
            rule.endpoint.clone(),
            rule.direction.to_string(),
            or_dash(rule.name.as_ref()),
            rule.cidr.to_string(),
            rule.protocol.to_string(),
            rule.ports.to_string(),
            rule.action.to_string(),
            stats.packets.to_string(),
            stats.bytes.to_string(),
        ]);
    }
    out.push_str(&r.render());
    out
}

/// `lb-ctl conntrack list`.
pub fn conntrack(flows: &[CtFlow]) -> String {
    let mut t = Table::new(&[
        ("TABLE", Align::Left),
        ("PROTO", Align::Left),
        ("SOURCE", Align::Left),
        ("DESTINATION", Align::Left),
        ("STATE", Align::Left),
        ("PKTS ORIG", Align::Right),
        ("BYTES ORIG", Align::Right),
        ("PKTS REPLY", Align::Right),
        ("BYTES REPLY", Align::Right),
        ("AGE", Align::Right),
        ("IDLE", Align::Right),
        ("RULE", Align::Right),
        ("NAME", Align::Left),
        ("PROCESS", Align::Left),
    ]);
    for f in flows {
        t.row(vec![
            f.table.to_string(),
            f.protocol.to_string(),
            addr_port(f.src, f.src_port),
            addr_port(f.dst, f.dst_port),
            f.state.to_string(),
            f.packets_orig.to_string(),
            f.bytes_orig.to_string(),
            f.packets_reply.to_string(),
            f.bytes_reply.to_string(),
            secs(f.age_ns),
            secs(f.idle_ns),
            or_dash(f.rule),
            remote_name(f.dst_name.as_deref(), f.src_name.as_deref()),
            process_of(f.pid, f.exe.as_deref()),
        ]);
    }
    t.render()
}

/// The NAME of a flow: its destination's learned name, else its source's (a flow seen from
/// the remote's side) marked with `<`, else `-`.
fn remote_name(dst: Option<&str>, src: Option<&str>) -> String {
    match (dst, src) {
        (Some(d), _) => d.to_string(),
        (None, Some(s)) => format!("<{s}"),
        (None, None) => "-".into(),
    }
}

/// The PROCESS of a flow: `program[pid]` of who opened it (the `exec` module; the program's
/// file name, its path is in `-o json`), else `-`.
fn process_of(pid: Option<u32>, exe: Option<&str>) -> String {
    match (pid, exe) {
        (Some(p), Some(e)) => format!("{}[{p}]", e.rsplit('/').next().unwrap_or(e)),
        (Some(p), None) => p.to_string(),
        (None, _) => "-".into(),
    }
}

/// `lb-ctl proc list`.
pub fn processes(list: &[datapath_api::ProcessView]) -> String {
    let mut t = Table::new(&[
        ("PID", Align::Right),
        ("PPID", Align::Right),
        ("UID", Align::Right),
        ("EXE", Align::Left),
        ("ARGS", Align::Left),
        ("CGROUP", Align::Left),
        ("STATE", Align::Left),
    ]);
    for p in list {
        let mut args = p.args.join(" ");
        if args.len() > 60 {
            let cut = (0..=57)
                .rev()
                .find(|i| args.is_char_boundary(*i))
                .unwrap_or(0);
            args.truncate(cut);
            args.push_str("...");
        }
        t.row(vec![
            p.pid.to_string(),
            p.ppid.to_string(),
            p.uid.to_string(),
            if p.exe.is_empty() {
                p.comm.clone()
            } else {
                p.exe.clone()
            },
            args,
            p.cgroup.clone().unwrap_or_else(|| p.cgroup_id.to_string()),
            match p.exit_code {
                Some(code) => format!("exited {code}"),
                None => "running".into(),
            },
        ]);
    }
    t.render()
}

/// `lb-ctl proc show PID`: every field, one process after the other.
pub fn process_details(list: &[datapath_api::ProcessView]) -> String {
    let mut out = String::new();
    for p in list {
        let _ = writeln!(out, "pid {} (started at tick {})", p.pid, p.start_ticks);
        let _ = writeln!(out, "  parent   {}", p.ppid);
        let _ = writeln!(out, "  exe      {}", p.exe);
        let _ = writeln!(out, "  args     {:?}", p.args);
        let _ = writeln!(out, "  comm     {}", p.comm);
        let _ = writeln!(out, "  uid      {}", p.uid);
        let _ = writeln!(
            out,
            "  cgroup   {} (id {})",
            p.cgroup.as_deref().unwrap_or("-"),
            p.cgroup_id
        );
        if let Some(pod) = &p.pod_uid {
            let _ = writeln!(
                out,
                "  pod      {pod} container {}",
                p.container_id.as_deref().unwrap_or("-")
            );
        }
        let _ = writeln!(
            out,
            "  state    {}{}",
            match p.exit_code {
                Some(code) => format!("exited {code}"),
                None => "running".into(),
            },
            if p.from_proc { " (found at start)" } else { "" }
        );
    }
    out
}

/// `lb-ctl proc rules`.
pub fn proc_rules(v: &datapath_api::ProcRulesView) -> String {
    let mut out = String::new();
    let scope = if v.host_wide {
        "host-wide".to_string()
    } else if v.cgroups.is_empty() {
        "no cgroup".to_string()
    } else {
        let c: Vec<String> = v
            .cgroups
            .iter()
            .map(|c| format!("{} (id {})", c.path, c.id))
            .collect();
        c.join(", ")
    };
    let _ = writeln!(out, "enforcement: {} in {scope}", v.mode);
    let _ = writeln!(
        out,
        "hooks: {}",
        if v.hooks.is_empty() {
            "none".to_string()
        } else {
            v.hooks.join(", ")
        }
    );
    let items: Vec<String> = v.verdicts.iter().map(|(k, n)| format!("{k} {n}")).collect();
    if !items.is_empty() {
        let _ = writeln!(out, "verdicts: {}", items.join(", "));
    }
    let mut t = Table::new(&[
        ("RULE", Align::Right),
        ("KIND", Align::Left),
        ("TARGET", Align::Left),
        ("INODE", Align::Left),
        ("HITS", Align::Right),
    ]);
    for r in &v.rules {
        t.row(vec![
            r.index.to_string(),
            r.kind.clone(),
            r.target.clone(),
            or_dash(r.inode.as_ref()),
            r.hits.to_string(),
        ]);
    }
    out.push_str(&t.render());
    out
}

/// One line of `lb-ctl proc follow`.
pub fn proc_event(e: &datapath_api::ProcEventView) -> String {
    use datapath_api::ProcEventView as E;
    let verdict = |v: &Option<String>, r: &Option<u16>| match (v, r) {
        (Some(v), Some(r)) => format!(" [{v} by rule {r}]"),
        (Some(v), None) => format!(" [{v}]"),
        _ => String::new(),
    };
    match e {
        E::Exec {
            process,
            verdict: v,
            rule,
        } => format!(
            "exec    pid {} ppid {} uid {} cgroup {} {} {:?}{}\n",
            process.pid,
            process.ppid,
            process.uid,
            process.cgroup_id,
            process.exe,
            process.args,
            verdict(v, rule)
        ),
        E::Fork { process } => format!(
            "fork    pid {} ppid {} {}\n",
            process.pid, process.ppid, process.exe
        ),
        E::Exit { pid, code, .. } => format!("exit    pid {pid} code {code}\n"),
        E::Connect { connect: c } => {
            let src = if c.src_port == 0 {
                String::new()
            } else {
                format!("{} -> ", addr_port(c.src, c.src_port))
            };
            format!(
                "connect pid {} {} {} {src}{} {}{}\n",
                c.pid,
                c.exe.as_deref().unwrap_or(&c.comm),
                c.protocol,
                addr_port(c.dst, c.dst_port),
                c.outcome,
                verdict(&c.verdict, &c.rule)
            )
        }
    }
}

/// `lb-ctl proc status`.
pub fn proc_status(v: &datapath_api::ProcStatus) -> String {
    let mut out = String::new();
    let state = match (v.enabled, v.up) {
        (_, true) => "up".to_string(),
        (false, _) => "disabled".to_string(),
        (true, false) => format!("off: {}", v.reason.as_deref().unwrap_or("unknown")),
    };
    let _ = writeln!(out, "exec: {state}");
    let _ = writeln!(
        out,
        "cache: {} processes ({} exited), {} evicted, {} expired, {} found at start",
        v.entries, v.exited, v.evicted, v.expired, v.found_at_start
    );
    let _ = writeln!(
        out,
        "connections: {} attributed, {} forgotten",
        v.connections, v.connections_forgotten
    );
    let items: Vec<String> = v.events.iter().map(|(k, n)| format!("{k} {n}")).collect();
    let _ = writeln!(
        out,
        "events: {}",
        if items.is_empty() {
            "none".to_string()
        } else {
            items.join(", ")
        }
    );
    out
}

/// `lb-ctl dns status`.
pub fn dns_status(v: &datapath_api::DnsStatus) -> String {
    let mut out = String::new();
    let state = match (v.enabled, v.up) {
        (_, true) => "up".to_string(),
        (false, _) => "disabled".to_string(),
        (true, false) => format!("off: {}", v.reason.as_deref().unwrap_or("unknown")),
    };
    let _ = writeln!(out, "dns: {state}");
    let _ = writeln!(
        out,
        "interfaces: {}",
        if v.interfaces.is_empty() {
            "-".to_string()
        } else {
            v.interfaces.join(", ")
        }
    );
    let _ = writeln!(
        out,
        "captured {} (cut at the snap length {}), messages {}, duplicates {}, answers {}",
        v.captured, v.snap_cut, v.messages, v.duplicates, v.answers
    );
    let _ = writeln!(
        out,
        "store: {} entries, {} names, {} held by live flows, {} expired, tcp streams {}",
        v.entries, v.names, v.held, v.expired, v.tcp_streams
    );
    for (title, map) in [
        ("lost", &v.lost),
        ("parse errors", &v.parse_errors),
        ("evictions", &v.evictions),
    ] {
        let items: Vec<String> = map
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        let _ = writeln!(
            out,
            "{title}: {}",
            if items.is_empty() {
                "none".to_string()
            } else {
                items.join(", ")
            }
        );
    }
    out
}

/// `lb-ctl dns list` and `lb-ctl dns lookup`.
pub fn dns_names(entries: &[datapath_api::DnsEntryView]) -> String {
    let mut t = Table::new(&[
        ("ADDRESS", Align::Left),
        ("NAME", Align::Left),
        ("CNAMES", Align::Left),
        ("CLIENT", Align::Left),
        ("TTL", Align::Right),
        ("EXPIRES", Align::Right),
        ("HELD", Align::Left),
        ("RESOLVER", Align::Left),
    ]);
    for e in entries {
        let cnames = e.names.get(1..).unwrap_or_default();
        t.row(vec![
            e.address.to_string(),
            e.names.first().cloned().unwrap_or_else(|| "-".into()),
            if cnames.is_empty() {
                "-".into()
            } else {
                cnames.join(" > ")
            },
            e.client.to_string(),
            e.ttl.to_string(),
            format!("{}s", e.expires_in_seconds),
            if e.held { "yes" } else { "no" }.into(),
            e.resolver.to_string(),
        ]);
    }
    t.render()
}

/// `lb-ctl conntrack stats`.
pub fn conntrack_stats(v: &CtStats) -> String {
    let mut out = format!(
        "entries {} of {}\ngc: {} sweeps, {} expired\nflow events: {} received\n",
        v.entries, v.capacity, v.gc_sweeps, v.gc_expired, v.events_received,
    );
    for (title, map) in [
        ("by state", &v.by_state),
        ("by protocol", &v.by_protocol),
        ("events lost", &v.events_lost),
        ("timeouts (s)", &v.timeouts),
    ] {
        let items: Vec<String> = map.iter().map(|(k, n)| format!("{k}={n}")).collect();
        let _ = writeln!(out, "{title}: {}", items.join(" "));
    }
    out
}

/// `ADDR:PORT`, an IPv6 address in brackets (`[2001:db8::1]:80`), as lb-ctl takes them.
fn addr_port(addr: std::net::IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(addr, port).to_string()
}

/// One flow event, one line.
pub fn flow_event(e: &FlowEventView) -> String {
    let mut line = format!(
        "{:<8} {} {} -> {} {} {} rule={} state={}",
        e.kind,
        e.protocol,
        addr_port(e.src, e.src_port),
        addr_port(e.dst, e.dst_port),
        e.interface,
        e.direction,
        e.rule_name.clone().unwrap_or_else(|| or_dash(e.rule)),
        e.state,
    );
    if let Some(name) = &e.dst_name {
        let _ = write!(line, " dst_name={name}");
    }
    if let Some(name) = &e.src_name {
        let _ = write!(line, " src_name={name}");
    }
    if e.kind.ends_flow() {
        let _ = write!(
            line,
            " packets={}/{} bytes={}/{} duration={}",
            e.packets_orig,
            e.packets_reply,
            e.bytes_orig,
            e.bytes_reply,
            secs(e.duration_ns),
        );
    }
    line.push('\n');
    line
}

fn bytes_text(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1}G", n as f64 / f64::from(1u32 << 30)),
        n if n >= 1 << 20 => format!("{:.1}M", n as f64 / f64::from(1u32 << 20)),
        n if n >= 1 << 10 => format!("{:.1}K", n as f64 / 1024.0),
        n => n.to_string(),
    }
}

fn rtt_text(us: Option<u64>) -> String {
    match us {
        None => "-".into(),
        Some(us) if us >= 10_000 => format!("{}ms", us / 1000),
        Some(us) if us >= 1000 => format!("{:.1}ms", us as f64 / 1000.0),
        Some(us) => format!("{us}us"),
    }
}

/// `lb-ctl graph`: one line per edge, then the nodes with their names and addresses.
pub fn graph(g: &datapath_api::GraphView) -> String {
    let mut t = Table::new(&[
        ("CALLER", Align::Left),
        ("CALLEE", Align::Left),
        ("PORT", Align::Left),
        ("CONNS", Align::Right),
        ("SENT", Align::Right),
        ("RECEIVED", Align::Right),
        ("RTT P50", Align::Right),
        ("RTT P99", Align::Right),
        ("FAILED", Align::Right),
        ("PROCESSES", Align::Left),
    ]);
    for e in &g.edges {
        let f = &e.failures;
        let failed: Vec<String> = [
            ("reset", f.reset),
            ("refused", f.refused),
            ("denied", f.denied),
            ("no_backend", f.no_backend),
        ]
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
        let procs: Vec<String> = e
            .processes
            .iter()
            .map(|p| format!("{}×{}", p.exe, p.connections))
            .collect();
        t.row(vec![
            e.caller.clone(),
            e.callee.clone(),
            format!("{}/{}", e.protocol, e.port),
            e.connections.to_string(),
            bytes_text(e.bytes_sent),
            bytes_text(e.bytes_received),
            rtt_text(e.rtt_p50_us),
            rtt_text(e.rtt_p99_us),
            if failed.is_empty() {
                "0".into()
            } else {
                failed.join(", ")
            },
            if procs.is_empty() {
                "-".into()
            } else {
                procs.join(", ")
            },
        ]);
    }
    let mut out = format!(
        "window {} ({} edges{}): sources: names {}, processes {}, services {}\n",
        g.window,
        g.edges.len(),
        if g.edges_omitted > 0 {
            format!(", {} more left out by --top", g.edges_omitted)
        } else {
            String::new()
        },
        if g.sources.names { "on" } else { "off" },
        if g.sources.processes { "on" } else { "off" },
        if g.sources.services { "on" } else { "off" },
    );
    out.push_str(&t.render());
    let mut n = Table::new(&[
        ("NODE", Align::Left),
        ("NAMESPACE", Align::Left),
        ("NAMES", Align::Left),
        ("ADDRESSES", Align::Left),
    ]);
    for node in &g.nodes {
        let list = |v: &[String]| {
            if v.is_empty() {
                "-".to_string()
            } else {
                v.join(", ")
            }
        };
        n.row(vec![
            node.id.clone(),
            node.namespace.clone().unwrap_or_else(|| "-".into()),
            list(&node.names),
            list(&node.addresses),
        ]);
    }
    out.push('\n');
    out.push_str(&n.render());
    out
}

#[cfg(test)]
mod tests {
    use datapath_api::{BackendState, Counter, ForwardingMode, Protocol};

    use super::*;

    fn view() -> ServiceView {
        let backend = |addr: &str, weight, state, entries, packets| BackendView {
            addr: addr.parse().unwrap(),
            port: 8080,
            weight,
            state,
            id: 0,
            table_entries: entries,
            counters: Counter {
                packets,
                bytes: packets * 100,
            },
            neighbour: None,
        };
        ServiceView {
            vip: "198.18.0.10".parse().unwrap(),
            port: 80,
            proto: Protocol::Tcp,
            mode: ForwardingMode::FullNat,
            source: datapath_api::ServiceSource::Api,
            owner: None,
            source_ranges: Vec::new(),
            snat_addr: None,
            id: 0,
            backends: vec![
                backend("198.18.1.1", 1, BackendState::Active, 3, 5),
                backend("198.18.1.22", 2, BackendState::Draining, 0, 12345),
                backend("198.18.1.3", 3, BackendState::Active, 1, 0),
            ],
            counters: Counter {
                packets: 12350,
                bytes: 1_235_000,
            },
        }
    }

    #[test]
    fn list_is_aligned_with_backends_nested() {
        let got = service_list(&[view()]);
        let want = "\
SERVICE                PROTO  MODE      SOURCE  BACKENDS  WEIGHT  STATE     TABLE  PACKETS    BYTES
198.18.0.10:80         tcp    full-nat  api            3                             12350  1235000
  -> 198.18.1.1:8080                                           1  active    75.0%        5      500
  -> 198.18.1.22:8080                                          2  draining   0.0%    12345  1234500
  -> 198.18.1.3:8080                                           3  active    25.0%        0        0
";
        assert_eq!(got, want, "\n{got}");
    }

    #[test]
    fn show_and_empty_cases() {
        let got = service_show(&view());
        assert!(
            got.starts_with("SERVICE   tcp/198.18.0.10:80\nID        0\n"),
            "{got}"
        );
        assert!(
            got.contains("198.18.1.22:8080   0       2  draining  -           0.0%"),
            "{got}"
        );
        let mut known = view();
        known.backends[0].neighbour = Some("reachable".into());
        let got = service_show(&known);
        assert!(got.contains("  NEIGHBOUR  "), "{got}");
        assert!(
            got.contains("198.18.1.1:8080    0       1  active    reachable  75.0%"),
            "{got}"
        );
        assert!(service_list(&[]).starts_with("no services"));
        let mut v6 = view();
        v6.vip = "2001:db8::10".parse().unwrap();
        v6.backends.clear();
        assert!(service_list(&[v6]).contains("[2001:db8::10]:80"));
    }

    #[test]
    fn stats_lists_traffic_and_reasons() {
        let v = StatsView {
            services: vec![view()],
            reasons: [
                ("drop_no_backend".to_string(), 4),
                ("fwd_tx".to_string(), 99),
            ]
            .into_iter()
            .collect(),
            syn_flood: Some(datapath_api::SynFloodView {
                rate_per_cpu: 125_000,
                cpus_flooding: 1,
                cpus: 2,
                entered: 3,
            }),
        };
        let got = stats(&v);
        assert!(
            got.ends_with(
                "\nsyn flood mode: ACTIVE on 1 of 2 CPUs (above 125000 new flows/s per CPU, DSR \
                 SYNs untracked; entered 3 time(s))\n"
            ),
            "{got}"
        );
        assert!(
            got.starts_with(
                "\
SERVICE / BACKEND      PACKETS    BYTES
tcp/198.18.0.10:80       12350  1235000
  -> 198.18.1.1:8080         5      500
"
            ),
            "{got}"
        );
        assert!(
            got.contains(
                "REASON           PACKETS\ndrop_no_backend        4\nfwd_tx                99\n"
            ),
            "{got}"
        );
    }
}
