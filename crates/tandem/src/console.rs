//! The live summary `tandem up` prints on stdout: where everything listens (once), every event
//! from startup on, and the whole picture (nodes, DNS answers, each site's load balancers and
//! instances, a drill in progress) whenever it changes. The same views as `tandem status`.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

/// Prints until the event log closes.
pub async fn run(api: api::Api, addr: Option<SocketAddr>) {
    // Subscribed before the snapshot, so nothing falls between; what both hold prints once.
    let mut events = api.events.subscribe();
    print(&listening(&api, addr));
    let mut printed: HashSet<(SystemTime, String, String)> = HashSet::new();
    for e in api.events.snapshot() {
        printed.insert(key(&e));
        print(&event_line(&e));
    }
    let mut last = String::new();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            e = events.recv() => match e {
                Ok(e) => {
                    if printed.remove(&key(&e)) {
                        continue;
                    }
                    print(&event_line(&e));
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => return,
            },
            _ = tick.tick() => {
                // Past the first moments, what was printed from the snapshot cannot recur.
                printed.clear();
                let now = summary(&api);
                if now != last {
                    print(&now);
                    last = now;
                }
            }
        }
    }
}

fn key(e: &api::Event) -> (SystemTime, String, String) {
    (e.at, e.subject.clone(), e.kind.clone())
}

fn print(text: &str) {
    let mut out = std::io::stdout().lock();
    // A closed stdout (piped into `head`) must not stop tandem.
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

/// Where the API, DNS and every load balancer listen.
fn listening(api: &api::Api, addr: Option<SocketAddr>) -> String {
    let mut out = String::from("──── tandem listening ────\n");
    if let Some(n) = &api.node {
        let _ = writeln!(out, "  node   {} (site {})", n.name(), n.site());
    }
    if let Some(a) = addr {
        let scheme = if api.tls.is_some() { "https" } else { "http" };
        let _ = writeln!(
            out,
            "  api    {scheme}://{a}  (dashboard at /, /v1/…, /metrics)"
        );
    }
    let dns: Vec<String> = api.dns_listen.iter().map(ToString::to_string).collect();
    if !dns.is_empty() {
        let _ = writeln!(out, "  dns    {} (udp and tcp)", dns.join(", "));
    }
    for b in &api.load_balancers {
        for f in b.view().frontends {
            let _ = writeln!(out, "  lb     {} {f}", b.config.name);
        }
    }
    out
}

/// `HH:MM:SS.mmm  [node]  source  subject  kind  message`.
fn event_line(e: &api::Event) -> String {
    let at = event::rfc3339(e.at);
    let time = at.get(11..23).unwrap_or(&at);
    let node = e
        .node
        .as_deref()
        .map(|n| format!("{n}  "))
        .unwrap_or_default();
    format!(
        "{time}  {node}{:<9} {:<28} {:<14} {}\n",
        e.source.as_str(),
        e.subject,
        e.kind,
        e.message
    )
}

/// The picture now: the nodes (cluster mode), one line per profile and per site.
pub fn summary(api: &api::Api) -> String {
    let mut out = String::from("──── tandem ────\n");
    if let Some(n) = &api.node {
        let nodes: Vec<String> = n
            .nodes()
            .iter()
            .map(|v| {
                format!(
                    "{}{} {}",
                    v.name,
                    if v.leader { "*" } else { "" },
                    if v.alive { "alive" } else { "gone" }
                )
            })
            .collect();
        let iso = n.isolation();
        let _ = writeln!(
            out,
            "  nodes  {}{}",
            nodes.join(", "),
            if iso.isolated {
                format!("   THIS NODE IS ISOLATED: {}", iso.reason)
            } else {
                String::new()
            }
        );
    }
    if let Some(dns) = &api.dns {
        for p in dns.views() {
            let answer = if p.answer.is_empty() {
                "(no answer)".to_string()
            } else {
                p.answer.join(", ")
            };
            let endpoints: Vec<String> = p
                .endpoints
                .iter()
                .map(|e| {
                    let mark = if e.answered { "*" } else { "" };
                    format!("{}{mark} {}", e.name, e.status)
                })
                .collect();
            let _ = writeln!(
                out,
                "  dns    {} ({}) -> {answer}{}   endpoints: {}",
                p.domain,
                p.routing,
                if p.all_down { " (all down)" } else { "" },
                endpoints.join(", ")
            );
        }
    }
    let lbs: Vec<lb::View> = api.load_balancers.iter().map(|b| b.view()).collect();
    let sets: Vec<scaleset::View> = api.scale_sets.iter().map(|s| s.view()).collect();
    let drill = api.intents.current().drill.map(|(d, _)| d);
    for site in api
        .topology
        .sites
        .iter()
        .map(|s| s.name.as_str())
        .filter(|s| api.runs(s))
    {
        let mut parts = Vec::new();
        for lb in lbs.iter().filter(|l| l.site == site) {
            let up = lb.backends.iter().filter(|b| b.takes_new_flows).count();
            parts.push(format!(
                "lb {} {}: {up}/{} backends taking flows",
                lb.name,
                lb.frontends.first().map_or("", String::as_str),
                lb.backends.len()
            ));
        }
        for s in sets.iter().filter(|s| s.site == site) {
            let serving = s
                .instances
                .iter()
                .filter(|i| i.state == "running" && i.health == health::Status::Online)
                .count();
            let mut line = format!("scale set {}: {serving}/{} serving", s.name, s.desired);
            if s.down {
                line.push_str(" (down)");
            }
            if s.upgrading {
                line.push_str(" (upgrading)");
            }
            parts.push(line);
        }
        if drill
            .as_ref()
            .is_some_and(|d| d.site == site && !d.over(SystemTime::now()))
        {
            parts.push("OUTAGE DRILL".into());
        }
        let _ = writeln!(out, "  {site:<6} {}", parts.join(" · "));
    }
    for db in api.databases.iter().map(|d| d.view()) {
        let members: Vec<String> = db
            .members
            .iter()
            .map(|m| format!("{} {} {}", m.site, m.role, m.state))
            .collect();
        let _ = writeln!(
            out,
            "  db     {} ({}): primary {}, term {}, {}   members: {}",
            db.name,
            db.replication,
            db.primary.as_deref().unwrap_or("none"),
            db.term,
            db.state,
            members.join(", ")
        );
    }
    out
}
