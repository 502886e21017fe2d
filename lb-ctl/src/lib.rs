//! lb-ctl: the operator CLI of datapathd's XDP load balancer.
//!
//! The binary parses the command line ([`cli::Cli`]), checks it into an [`cli::Action`] before
//! connecting, sends that to datapathd over its Unix socket ([`client::Client`]) and prints the
//! answer ([`output`]). Failures are an [`Error`], each with its exit code; clap's usage errors
//! are rendered on one line by [`usage`].
pub mod cli;
pub mod client;
pub mod error;
pub mod output;
pub mod usage;

use std::io::Write as _;

use datapath_api::{BackendState, FlowEventView, FlowsQuery, ServiceView};
use serde::Serialize;

pub use crate::error::{Error, Result, exit};
use crate::{
    cli::{Action, Cli, Output},
    client::Client,
    output::service_key,
};

/// Runs the command and returns what to print on stdout. Nothing is sent if the arguments are
/// invalid.
pub async fn run(cli: &Cli) -> Result<String> {
    let action = cli.command.action()?;
    let client = Client::new(&cli.socket);
    let json = cli.output == Output::Json;
    if cli.output == Output::Dot && !matches!(action, Action::Graph(_)) {
        return Err(Error::invalid(
            "output",
            "dot",
            "only `lb-ctl graph` writes DOT; use table or json",
        ));
    }
    Ok(match action {
        Action::Graph(q) => {
            let g = client.graph(&q).await?;
            match cli.output {
                Output::Json => to_json(&g)?,
                Output::Dot => g.to_dot(),
                Output::Table => output::graph(&g),
            }
        }
        Action::ServiceList => {
            let list = client.list_services().await?;
            if json {
                to_json(&list)?
            } else {
                output::service_list(&list)
            }
        }
        Action::ServiceShow(key) => {
            let view = client.show_service(&key).await?;
            if json {
                to_json(&view)?
            } else {
                output::service_show(&view)
            }
        }
        Action::Stats => {
            let stats = client.stats().await?;
            if json {
                to_json(&stats)?
            } else {
                let mut out = output::stats(&stats);
                // The socket LB's side of the same services, when it runs (`lb-ctl socklb`
                // has the rest).
                if let Ok(st) = client.socklb().await
                    && st.up
                {
                    out.push_str(&output::socklb_stats(&st));
                }
                out
            }
        }
        Action::PolicyApply(req) => {
            let status = client.apply_policy(&req).await?;
            if json {
                to_json_sorted(&status)?
            } else {
                format!(
                    "policy applied (generation {}): {} endpoint(s), {} rule(s)\n",
                    status.generation,
                    status.endpoints.len(),
                    status.rules.len()
                )
            }
        }
        Action::PolicyList => {
            let status = client.policy().await?;
            if json {
                to_json_sorted(&status)?
            } else {
                output::policy(&status)
            }
        }
        Action::PolicyDelete => {
            let status = client.delete_policy().await?;
            if json {
                to_json_sorted(&status)?
            } else {
                format!(
                    "policy deleted (generation {}): policed interfaces pass everything\n",
                    status.generation
                )
            }
        }
        Action::ConntrackList(filter) => {
            let flows = client.conntrack(&filter).await?;
            if json {
                to_json_sorted(&flows)?
            } else {
                output::conntrack(&flows)
            }
        }
        Action::ConntrackStats => {
            let stats = client.conntrack_stats().await?;
            if json {
                to_json_sorted(&stats)?
            } else {
                output::conntrack_stats(&stats)
            }
        }
        Action::ConntrackFlush(filter) => {
            let answer = client.flush_conntrack(&filter).await?;
            if json {
                to_json_sorted(&answer)?
            } else {
                format!("{} tracked flow(s) removed\n", answer.removed)
            }
        }
        Action::Flows(FlowsQuery { follow: false, .. }) => {
            let events = client.flows().await?;
            if json {
                to_json_sorted(&events)?
            } else {
                events.iter().map(output::flow_event).collect()
            }
        }
        Action::Flows(FlowsQuery {
            follow: true,
            count,
            timeout_seconds,
        }) => {
            let stdout = std::io::stdout();
            client
                .follow_flows(count, timeout_seconds, |line| {
                    // -o json: the daemon's line as it came (one JSON object a line). A line
                    // that is not an event is shown as it is rather than lost.
                    let event = (!json)
                        .then(|| serde_json::from_str::<FlowEventView>(line).ok())
                        .flatten();
                    let text = match event {
                        Some(event) => output::flow_event(&event),
                        None => format!("{line}\n"),
                    };
                    let mut out = stdout.lock();
                    out.write_all(text.as_bytes())
                        .and_then(|()| out.flush())
                        .map_err(Error::Output)
                })
                .await?;
            String::new()
        }
        Action::Sources => {
            let sources = client.sources().await?;
            if json {
                to_json(&sources)?
            } else {
                output::sources(&sources)
            }
        }
        Action::SockLb => {
            let st = client.socklb().await?;
            if json {
                to_json(&st)?
            } else {
                output::socklb(&st)
            }
        }
        Action::ProcList(q) => {
            let list = client.processes(&q).await?;
            if json {
                to_json(&list)?
            } else {
                output::processes(&list)
            }
        }
        Action::ProcShow(pid) => {
            let q = datapath_api::ProcQuery {
                pid: Some(pid),
                ..Default::default()
            };
            let list = client.processes(&q).await?;
            if list.is_empty() {
                return Err(Error::Api(datapath_api::ApiError {
                    code: datapath_api::ErrorCode::NotFound,
                    error: format!("no process {pid} in the exec module's cache"),
                }));
            }
            if json {
                to_json(&list)?
            } else {
                output::process_details(&list)
            }
        }
        Action::ProcRules => {
            let v = client.proc_rules().await?;
            if json {
                to_json(&v)?
            } else {
                output::proc_rules(&v)
            }
        }
        Action::ProcFollow(q) => {
            let stdout = std::io::stdout();
            client
                .follow_proc(&q, |line| {
                    // -o json: the daemon's line as it came; a line that is not an event is
                    // shown as it is rather than lost.
                    let event = (!json)
                        .then(|| serde_json::from_str::<datapath_api::ProcEventView>(line).ok())
                        .flatten();
                    let text = match event {
                        Some(event) => output::proc_event(&event),
                        None => format!("{line}\n"),
                    };
                    let mut out = stdout.lock();
                    out.write_all(text.as_bytes())
                        .and_then(|()| out.flush())
                        .map_err(Error::Output)
                })
                .await?;
            String::new()
        }
        Action::ProcStatus => {
            let st = client.proc_status().await?;
            if json {
                to_json(&st)?
            } else {
                output::proc_status(&st)
            }
        }
        Action::DnsStatus => {
            let st = client.dns().await?;
            if json {
                to_json(&st)?
            } else {
                output::dns_status(&st)
            }
        }
        Action::DnsList(q) | Action::DnsLookup(q) => {
            let entries = client.dns_names(&q).await?;
            if json {
                to_json(&entries)?
            } else {
                output::dns_names(&entries)
            }
        }
        Action::Node => {
            let node = client.node().await?;
            if json {
                to_json(&node)?
            } else {
                output::node(&node)
            }
        }
        Action::Status => {
            let status = client.status().await?;
            if json {
                to_json(&status)?
            } else {
                output::status(&status)
            }
        }
        Action::ServiceAdd(req) => {
            let view = client.create_service(&req).await?;
            confirm(json, &view, || {
                format!(
                    "service {} added ({}, id {}); add backends with: lb-ctl backend add",
                    service_key(&view),
                    view.mode,
                    view.id
                )
            })?
        }
        Action::ServiceRemove(key) => {
            let view = client.delete_service(&key, cli.force).await?;
            confirm(json, &view, || {
                format!(
                    "service {key} removed with its {} backend(s)",
                    view.backends.len()
                )
            })?
        }
        Action::BackendAdd(key, req) => {
            let view = client.add_backend(&key, &req, cli.force).await?;
            let backend = datapath_api::BackendKey {
                addr: req.addr,
                port: req.port,
            };
            confirm(json, &view, || {
                format!(
                    "backend {backend} added to service {} (weight {})",
                    service_key(&view),
                    req.weight
                )
            })?
        }
        Action::BackendRemove(key, backend) => {
            let view = client.remove_backend(&key, &backend, cli.force).await?;
            confirm(json, &view, || {
                format!("backend {backend} removed from service {key}")
            })?
        }
        Action::BackendUpdate(key, backend, req) => {
            let view = client
                .update_backend(&key, &backend, &req, cli.force)
                .await?;
            confirm(json, &view, || {
                let mut said = Vec::new();
                if let Some(w) = req.weight {
                    said.push(format!("now has weight {w}"));
                }
                match req.state {
                    Some(BackendState::Draining) => said.push(
                        "is draining: it keeps its established flows and gets no new ones".into(),
                    ),
                    Some(BackendState::Active) => said.push("is active".into()),
                    None => {}
                }
                format!("backend {backend} of service {key} {}", said.join(" and "))
            })?
        }
    })
}

/// A mutating command's output: the resulting service as JSON, or a one-line confirmation.
fn confirm(json: bool, view: &ServiceView, line: impl FnOnce() -> String) -> Result<String> {
    if json {
        to_json(view)
    } else {
        Ok(line() + "\n")
    }
}

fn to_json(value: &impl Serialize) -> Result<String> {
    serde_json::to_string_pretty(value)
        .map(|s| s + "\n")
        .map_err(|e| Error::Output(e.into()))
}

/// Like [`to_json`], with every object's keys in name order: the policy, conntrack and flow
/// commands printed the daemon's answer through `serde_json::Value` (whose maps sort their
/// keys) before they had types, and scripts may compare that output.
fn to_json_sorted(value: &impl Serialize) -> Result<String> {
    let value = serde_json::to_value(value).map_err(|e| Error::Output(e.into()))?;
    to_json(&value)
}
