//! `tandem status`: the nodes, DNS profiles with their answers, load balancers, scale sets,
//! databases, a drill in progress, then every probe target — as the node asked sees them.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::SystemTime;

use api::types::*;
use serde::Serialize;

use crate::EXIT_RUNTIME;
use crate::client::{api_addr, block_on, get};

/// Everything `status --json` prints.
#[derive(Debug, Serialize)]
struct Status {
    cluster: ClusterResponse,
    nodes: Vec<NodeView>,
    drill: DrillResponse,
    profiles: Vec<dns::table::ProfileView>,
    load_balancers: Vec<Placed<lb::View>>,
    scale_sets: Vec<Placed<scaleset::View>>,
    databases: Vec<Placed<pg::View>>,
    apps: Vec<orchestrator::AppView>,
    targets: Vec<TargetView>,
    /// Nodes that did not answer for their views.
    unreachable: Vec<String>,
}

async fn fetch(api: SocketAddr) -> anyhow::Result<Status> {
    let cluster: ClusterResponse = get(api, "/v1/cluster").await?;
    let nodes: NodesResponse = get(api, "/v1/nodes").await?;
    let drill: DrillResponse = get(api, "/v1/drills").await?;
    let profiles: ProfilesResponse = get(api, "/v1/profiles").await?;
    let lbs: LoadBalancersResponse = get(api, "/v1/load-balancers").await?;
    let sets: ScaleSetsResponse = get(api, "/v1/scale-sets").await?;
    let dbs: DatabasesResponse = get(api, "/v1/databases").await?;
    let health: HealthResponse = get(api, "/v1/health").await?;
    let apps: AppsResponse = get(api, "/v1/apps").await?;
    let mut unreachable: Vec<String> = lbs
        .unreachable
        .iter()
        .chain(&sets.unreachable)
        .chain(&dbs.unreachable)
        .cloned()
        .collect();
    unreachable.sort();
    unreachable.dedup();
    Ok(Status {
        cluster,
        nodes: nodes.nodes,
        drill,
        profiles: profiles.profiles,
        load_balancers: lbs.load_balancers,
        scale_sets: sets.scale_sets,
        databases: dbs.databases,
        apps: apps.apps,
        targets: health.targets,
        unreachable,
    })
}

pub fn run(api: Option<SocketAddr>, json: bool) -> ExitCode {
    match api_addr(api).and_then(|api| block_on(fetch(api))) {
        Ok(s) => {
            if json {
                match serde_json::to_string_pretty(&s) {
                    Ok(text) => println!("{text}"),
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::from(EXIT_RUNTIME);
                    }
                }
            } else {
                print!("{}", text(&s));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

fn text(s: &Status) -> String {
    let mut out = String::new();
    let mut section = |rows: Vec<Vec<String>>| {
        if rows.len() > 1 {
            out.push_str(&table(&rows));
            out.push('\n');
        }
    };
    section(node_rows(s));
    section(drill_rows(&s.drill));
    section(app_rows(&s.apps));
    section(profile_rows(&s.profiles));
    section(lb_rows(&s.load_balancers));
    section(set_rows(&s.scale_sets));
    section(db_rows(&s.databases));
    let targets = target_rows(&s.targets);
    let empty = s.targets.is_empty();
    out.push_str(&table(&targets));
    if empty {
        out.push_str("(no monitored targets)\n");
    }
    if !s.unreachable.is_empty() {
        out.push_str(&format!(
            "\nnodes that did not answer: {}\n",
            s.unreachable.join(", ")
        ));
    }
    out
}

fn cells<const N: usize>(c: [&str; N]) -> Vec<String> {
    c.iter().map(|s| s.to_string()).collect()
}

fn ago(t: SystemTime) -> String {
    let d = SystemTime::now().duration_since(t).unwrap_or_default();
    let s = d.as_secs();
    if s < 120 {
        format!("{s}s ago")
    } else if s < 7200 {
        format!("{}m ago", s / 60)
    } else {
        format!("{}h ago", s / 3600)
    }
}

/// The nodes of a cluster (nothing in single-process mode).
fn node_rows(s: &Status) -> Vec<Vec<String>> {
    let mut rows = vec![cells([
        "NODE", "SITE", "STATE", "SINCE", "API", "DNS", "TOPOLOGY",
    ])];
    let isolation = s.cluster.isolation.as_ref().filter(|i| i.isolated);
    for n in &s.nodes {
        let mut state = if n.alive { "alive" } else { "gone" }.to_string();
        if n.leader {
            state.push_str(", leader");
        }
        if n.this_node {
            state.push_str(", this node");
            if let Some(iso) = isolation {
                state.push_str(&format!(", ISOLATED ({})", iso.reason));
            }
        } else if isolation.is_some() {
            // Cut off from the store, this node knows the others only as it last saw them.
            state.push_str(" (last seen)");
        }
        rows.push(vec![
            n.name.clone(),
            n.site.clone(),
            state,
            n.since.map_or("-".into(), ago),
            n.api.clone(),
            if n.dns.is_empty() {
                "-".into()
            } else {
                n.dns.join(" ")
            },
            match n.topology_matches {
                Some(true) => "same".into(),
                Some(false) => "DIFFERENT".into(),
                None => "-".into(),
            },
        ]);
    }
    rows
}

fn drill_rows(d: &DrillResponse) -> Vec<Vec<String>> {
    let mut rows = vec![cells(["DRILL", "SITE", "STARTED", "ENDS", "APPLIED BY"])];
    if let Some(drill) = &d.drill {
        rows.push(vec![
            format!("{} (in progress)", drill.kind.to_uppercase()),
            drill.site.clone(),
            event::rfc3339(drill.started),
            event::rfc3339(drill.ends),
            d.applies_on
                .clone()
                .unwrap_or_else(|| "this process".into()),
        ]);
    }
    rows
}

fn profile_rows(profiles: &[dns::table::ProfileView]) -> Vec<Vec<String>> {
    let mut rows = vec![cells([
        "PROFILE",
        "DOMAIN",
        "ROUTING",
        "ENDPOINTS",
        "ANSWER",
    ])];
    for p in profiles {
        let endpoints: Vec<String> = p
            .endpoints
            .iter()
            .map(|e| {
                let mark = if e.answered { "*" } else { "" };
                format!("{}{mark}={}", e.name, e.status)
            })
            .collect();
        let mut answer = p.answer.join(", ");
        if p.all_down {
            answer.push_str(" (all down)");
        }
        rows.push(vec![
            p.name.clone(),
            p.domain.clone(),
            p.routing.clone(),
            endpoints.join(" "),
            answer,
        ]);
    }
    rows
}

fn node_of<T>(p: &Placed<T>) -> String {
    p.node.clone().map(|n| format!(" @{n}")).unwrap_or_default()
}

/// One row per backend, the balancer's name and frontends on its first.
fn lb_rows(lbs: &[Placed<lb::View>]) -> Vec<Vec<String>> {
    let mut rows = vec![cells([
        "LOAD BALANCER",
        "FRONTENDS",
        "BACKEND",
        "STATUS",
        "FLOWS",
        "ACTIVE",
        "EJECTIONS",
    ])];
    for p in lbs {
        let l = &p.view;
        let name = format!("{}{}", l.name, node_of(p));
        let fronts = l.frontends.join(", ");
        if l.backends.is_empty() {
            rows.push(vec![
                name.clone(),
                fronts.clone(),
                "(no backends)".into(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
            ]);
        }
        for (i, b) in l.backends.iter().enumerate() {
            let mut status = b.status.to_string();
            if b.draining {
                status.push_str(" draining");
            } else if b.takes_new_flows {
                status.push_str(" *");
            }
            let (n, f) = if i == 0 {
                (name.clone(), fronts.clone())
            } else {
                (String::new(), String::new())
            };
            rows.push(vec![
                n,
                f,
                b.address.to_string(),
                status,
                b.total_connections.to_string(),
                b.active_connections.to_string(),
                b.ejections.to_string(),
            ]);
        }
    }
    rows
}

/// One line per scale set, then one per instance.
fn set_rows(sets: &[Placed<scaleset::View>]) -> Vec<Vec<String>> {
    let mut rows = vec![cells([
        "SCALE SET / INSTANCE",
        "STATE",
        "HEALTH",
        "PID",
        "PORTS",
        "AGE",
        "RESTARTS",
        "CPU",
    ])];
    for p in sets {
        let v = &p.view;
        let mut flags = Vec::new();
        if v.upgrading {
            flags.push(format!("upgrading to template {}", v.template));
        }
        if v.repair_suspended {
            flags.push("repair suspended".to_string());
        }
        if v.down {
            flags.push("down (outage drill)".to_string());
        }
        let running = v.instances.iter().filter(|i| i.state != "retiring").count();
        rows.push(vec![
            format!("{} ({}){}", v.name, v.site, node_of(p)),
            format!(
                "{running} of {} (min {}, max {}){}",
                v.desired,
                v.min,
                v.max,
                if flags.is_empty() {
                    String::new()
                } else {
                    format!("; {}", flags.join("; "))
                }
            ),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
        ]);
        for i in &v.instances {
            let ports: Vec<String> = i
                .ports
                .iter()
                .map(|(k, port)| format!("{k}={}:{port}", i.address))
                .collect();
            rows.push(vec![
                format!("  {}", i.id),
                i.state.clone(),
                i.health.to_string(),
                i.pid.map_or("-".into(), |p| p.to_string()),
                ports.join(" "),
                format!("{:.0}s", i.age_seconds),
                i.restarts.to_string(),
                i.cpu_percent.map_or("-".into(), |c| format!("{c:.0}%")),
            ]);
        }
    }
    rows
}

/// One line per database (primary, term, state), then one per member.
/// One row per app: where it is and why, then one per site.
fn app_rows(apps: &[orchestrator::AppView]) -> Vec<Vec<String>> {
    let mut rows = vec![cells(["APP", "ACTIVE", "STATE", "DATA", "INSTANCES"])];
    let yes = |b: bool, y: &str, n: &str| if b { y.to_string() } else { n.to_string() };
    for a in apps {
        let state = match (&a.moving, &a.waiting_for) {
            (Some(m), _) => format!("moving {} -> {} ({})", m.from, m.to, m.reason),
            (None, Some(w)) => format!("failback waits for {w}"),
            (None, None) if a.drilling => "drill running".into(),
            (None, None) => "at rest".into(),
        };
        rows.push(vec![
            format!("{} ({}, failback {})", a.name, a.standby, a.failback),
            format!(
                "{}, term {}{}",
                a.active,
                a.term,
                if a.pinned { ", PINNED" } else { "" }
            ),
            state,
            String::new(),
            String::new(),
        ]);
        for s in &a.sites {
            rows.push(vec![
                format!("  {}", s.site),
                yes(s.site == a.active, "active", ""),
                format!(
                    "{}{}",
                    yes(s.healthy, "healthy", "unhealthy"),
                    yes(s.reachable, "", ", unreachable")
                ),
                match (a.database.is_some(), s.primary, s.caught_up) {
                    (false, _, _) => "-".into(),
                    (true, true, _) => "primary".into(),
                    (true, false, c) => yes(c, "caught up", "behind"),
                },
                format!("{}/{} Online", s.online, s.capacity),
            ]);
        }
    }
    rows
}

fn db_rows(dbs: &[Placed<pg::View>]) -> Vec<Vec<String>> {
    let mut rows = vec![cells([
        "DATABASE", "ROLE", "STATE", "LSN", "LAG", "TIMELINE",
    ])];
    for p in dbs {
        let d = &p.view;
        let change = d.last_change.as_ref().map_or(String::new(), |c| {
            format!(
                "; last {} {} -> {} in {:.2}s",
                c.kind,
                c.from.as_deref().unwrap_or("-"),
                c.to,
                c.seconds
            )
        });
        rows.push(vec![
            format!("{} ({}){}", d.name, d.replication, node_of(p)),
            format!(
                "primary {}, term {}",
                d.primary.as_deref().unwrap_or("none"),
                d.term
            ),
            format!("{}{change}", d.state),
            String::new(),
            String::new(),
            String::new(),
        ]);
        for m in &d.members {
            let sync = m
                .sync_state
                .as_deref()
                .map(|s| format!(" ({s})"))
                .unwrap_or_default();
            rows.push(vec![
                format!("  {} {}", m.site, m.listen),
                format!("{}{sync}", m.role),
                m.state.clone(),
                m.lsn.clone().unwrap_or_else(|| "-".into()),
                m.lag_bytes.map_or("-".into(), |b| format!("{b} B")),
                m.timeline.map_or("-".into(), |t| t.to_string()),
            ]);
        }
    }
    rows
}

/// One row per target: its status (the consensus in cluster mode, with each node's vote), the
/// current streak, and the last failure with when it happened.
fn target_rows(targets: &[TargetView]) -> Vec<Vec<String>> {
    let mut rows = vec![cells([
        "TARGET",
        "STATUS",
        "SINCE",
        "LATENCY",
        "STREAK",
        "LAST FAILURE",
        "VOTES",
    ])];
    for t in targets {
        let r = &t.report;
        let streak = if r.consecutive_failures > 0 {
            format!("{} failed", r.consecutive_failures)
        } else {
            format!("{} ok", r.consecutive_successes)
        };
        let last_failure = match (&r.last_failure, r.last_failure_at) {
            (Some(f), Some(at)) => format!("{f} ({})", ago(at)),
            (Some(f), None) => f.clone(),
            _ => "-".into(),
        };
        let status = match t.consensus {
            Some(c) if c != r.status => format!("{c} (here {})", r.status),
            _ => r.status.to_string(),
        };
        let votes: Vec<String> = t
            .votes
            .iter()
            .map(|v| {
                format!(
                    "{}={}",
                    v.node,
                    v.status.map_or("-".to_string(), |s| s.to_string())
                )
            })
            .collect();
        rows.push(vec![
            format!("{} ({} {})", r.target, r.monitor, r.destination),
            status,
            event::rfc3339(r.since),
            r.last_latency_ms
                .map_or_else(|| "-".into(), |ms| format!("{ms:.1}ms")),
            streak,
            last_failure,
            if votes.is_empty() {
                "-".into()
            } else {
                votes.join(" ")
            },
        ]);
    }
    rows
}

/// Left-aligned columns separated by two spaces.
fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..cols)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}
