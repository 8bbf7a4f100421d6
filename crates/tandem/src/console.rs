//! The live summary `tandem up` prints on stdout: the whole picture (DNS answers, each site's
//! load balancers and instances, a drill in progress) whenever it changes, and every event as
//! it happens. The same views as `tandem status` and `/v1/…`, in a few lines.

use std::fmt::Write as _;
use std::io::Write as _;
use std::time::Duration;

use lb::View as LbView;
use scaleset::View as SetView;

/// Prints until the event log closes.
pub async fn run(api: api::Api, sites: Vec<String>) {
    let mut events = api.events.subscribe();
    let mut last = String::new();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            e = events.recv() => match e {
                Ok(e) => print(&event_line(&e)),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => return,
            },
            _ = tick.tick() => {
                let now = summary(&api, &sites);
                if now != last {
                    print(&now);
                    last = now;
                }
            }
        }
    }
}

fn print(text: &str) {
    let mut out = std::io::stdout().lock();
    // A closed stdout (piped into `head`) must not stop tandem.
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
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

/// The picture now, one line per profile and per site.
pub fn summary(api: &api::Api, sites: &[String]) -> String {
    let mut out = String::from("──── tandem ────\n");
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
    let lbs: Vec<LbView> = api.load_balancers.iter().map(|b| b.view()).collect();
    let sets: Vec<SetView> = api.scale_sets.iter().map(|s| s.view()).collect();
    let drill = api.drills.as_ref().and_then(|d| d.view());
    for site in sites {
        let mut parts = Vec::new();
        for lb in lbs.iter().filter(|l| &l.site == site) {
            let up = lb.backends.iter().filter(|b| b.takes_new_flows).count();
            parts.push(format!(
                "lb {} {}: {up}/{} backends taking flows",
                lb.name,
                lb.frontends.first().map_or("", String::as_str),
                lb.backends.len()
            ));
        }
        for s in sets.iter().filter(|s| &s.site == site) {
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
        if drill.as_ref().is_some_and(|d| &d.site == site) {
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
