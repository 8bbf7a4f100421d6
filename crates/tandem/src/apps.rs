//! `tandem app …`: the whole app's status, plans, failover, failback, pin and unpin.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use api::types::{AppRequest, AppsResponse};
use clap::Subcommand;
use orchestrator::app::{AppView, MoveView, PlanView};

use crate::EXIT_RUNTIME;
use crate::actions::{Api, call};
use crate::client::{get, post};

/// How long `failover`, `failback` and `pin` wait for the move they start, by default.
const MOVE_WAIT: &str = "5m";

#[derive(Debug, Subcommand)]
pub enum App {
    /// Every app (or one): where it is active, each site's health, data and capacity, the move
    /// under way, what failback waits for, the last move and how long each step took.
    Status {
        /// Only this app.
        app: Option<String>,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: Api,
    },
    /// The steps a move to SITE would take now, without moving.
    Plan {
        app: String,
        #[arg(long)]
        to: String,
        #[command(flatten)]
        api: Api,
    },
    /// Move the whole app to SITE now (database switchover, standby scaled, DNS moved); waits
    /// for the move and prints each step's time. With automatic failback the app returns to
    /// its preferred site once that site's data has caught up: `pin` keeps it away.
    Failover {
        app: String,
        #[arg(long)]
        to: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Back to the preferred site now; refused while its database member has not caught up.
    Failback {
        app: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Keep the app at SITE (moving there first when it is elsewhere); nothing moves it by
    /// itself until `unpin`.
    Pin {
        app: String,
        site: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Let the app move by itself again (failover, automatic failback).
    Unpin {
        app: String,
        #[command(flatten)]
        api: Api,
    },
}

#[derive(Debug, clap::Args)]
pub struct Wait {
    /// Return once the move has started instead of waiting for its end.
    #[arg(long)]
    no_wait: bool,
    /// The longest wait for the move's end.
    #[arg(long, default_value = MOVE_WAIT)]
    timeout: String,
    #[command(flatten)]
    api: Api,
}

pub fn run(action: App) -> ExitCode {
    match action {
        App::Status { app, json, api } => call(
            &api,
            async |a| match &app {
                // One app: an unknown name is the API's 404.
                Some(name) => Ok(AppsResponse {
                    apps: vec![get::<AppView>(a, &format!("/v1/apps/{name}")).await?],
                }),
                None => get::<AppsResponse>(a, "/v1/apps").await,
            },
            |r| {
                let apps: Vec<&AppView> = r.apps.iter().collect();
                if json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&apps).unwrap_or_default()
                    );
                } else if apps.is_empty() {
                    println!("no app: the topology declares no [[app]]");
                } else {
                    for v in apps {
                        print_app(v);
                    }
                }
            },
        ),
        App::Plan { app, to, api } => call(
            &api,
            async |a| get::<PlanView>(a, &format!("/v1/apps/{app}/plan?to={to}")).await,
            |p| {
                println!("{}: {} -> {}", p.app, p.from, p.to);
                for (i, s) in p.steps.iter().enumerate() {
                    println!("  {}. {s}", i + 1);
                }
            },
        ),
        App::Failover { app, to, wait } => command(
            &app,
            "failover",
            AppRequest {
                to: Some(to),
                site: None,
            },
            &wait,
        ),
        App::Failback { app, wait } => command(&app, "failback", AppRequest::default(), &wait),
        App::Pin { app, site, wait } => command(
            &app,
            "pin",
            AppRequest {
                to: None,
                site: Some(site),
            },
            &wait,
        ),
        App::Unpin { app, api } => call(
            &api,
            async |a| post::<AppView>(a, &format!("/v1/apps/{app}/unpin"), None::<()>).await,
            |v| {
                println!(
                    "{} unpinned: it moves by itself again (active at {})",
                    v.name, v.active
                )
            },
        ),
    }
}

/// Posts a command, then (unless `--no-wait`) follows the move it started to its end.
fn command(app: &str, action: &str, req: AppRequest, wait: &Wait) -> ExitCode {
    let Some(timeout) = model::units::parse_duration(&wait.timeout) else {
        eprintln!("error: --timeout: expected a duration such as \"5m\"");
        return ExitCode::from(crate::EXIT_USAGE);
    };
    let path = format!("/v1/apps/{app}/{action}");
    let mut outcome: Option<MoveView> = None;
    let code = call(
        &wait.api,
        async |a| {
            let v = post::<AppView>(a, &path, Some(req)).await?;
            if wait.no_wait || v.moving.is_none() {
                return Ok((v, None));
            }
            let ended = follow(a, app, v.ended_moves(), timeout).await?;
            Ok((v, Some(ended)))
        },
        |(v, ended)| match (&v.moving, ended) {
            (None, _) => println!(
                "{}: active at {} (term {}){}",
                v.name,
                v.active,
                v.term,
                if v.pinned { ", pinned" } else { "" }
            ),
            (Some(m), None) => println!(
                "{}: moving {} -> {} ({}); `tandem app status {}` follows it",
                v.name,
                m.from,
                m.to,
                m.steps.join(", "),
                v.name
            ),
            (Some(_), Some(m)) => {
                print_move("move", &m);
                outcome = Some(m);
            }
        },
    );
    match outcome {
        Some(m) if m.outcome != "done" => ExitCode::from(EXIT_RUNTIME),
        _ => code,
    }
}

/// Waits until the app has ended more than `ended_before` moves; the last one.
async fn follow(
    api: SocketAddr,
    app: &str,
    ended_before: u64,
    timeout: Duration,
) -> anyhow::Result<MoveView> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut every = tokio::time::interval(Duration::from_millis(250));
    loop {
        every.tick().await;
        let r = get::<AppsResponse>(api, "/v1/apps").await?;
        let v = r
            .apps
            .into_iter()
            .find(|v| v.name == app)
            .ok_or_else(|| anyhow::anyhow!("app {app} is gone"))?;
        if v.ended_moves() > ended_before
            && let Some(m) = v.last_move
        {
            return Ok(m);
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!(
                "the move has not ended after {timeout:?}; `tandem app status {app}` follows it"
            );
        }
    }
}

fn print_move(title: &str, m: &MoveView) {
    println!(
        "{title} {} -> {} ({}): {} in {:.2} s{}",
        m.from,
        m.to,
        m.reason,
        m.outcome,
        m.seconds,
        m.error.as_ref().map_or(String::new(), |e| format!(": {e}"))
    );
    for s in &m.done {
        println!("  {:<13} {:>7.2} s", s.step, s.seconds);
    }
}

fn print_app(v: &AppView) {
    println!(
        "app {}: active at {} (term {}){}; standby {}, failback {}",
        v.name,
        v.active,
        v.term,
        if v.pinned { ", PINNED" } else { "" },
        v.standby,
        v.failback
    );
    println!(
        "  {:<10} {:<8} {:<9} {:<8} {:<9} {:>6}",
        "site", "healthy", "reachable", "primary", "caught-up", "online"
    );
    let yes = |b: bool| if b { "yes" } else { "no" };
    for s in &v.sites {
        println!(
            "  {:<10} {:<8} {:<9} {:<8} {:<9} {:>6}",
            s.site,
            yes(s.healthy),
            yes(s.reachable),
            yes(s.primary),
            yes(s.caught_up),
            format!("{}/{}", s.online, s.capacity)
        );
    }
    if let Some(m) = &v.moving {
        println!(
            "  moving {} -> {} ({}) for {:.1} s: {}; done: {}",
            m.from,
            m.to,
            m.reason,
            m.seconds,
            m.steps.join(", "),
            m.done
                .iter()
                .map(|s| s.step.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if let Some(w) = &v.waiting_for {
        println!("  failback to {} waits for {w}", v.preferred);
    }
    if let Some(m) = &v.last_move {
        print_move("  last move", m);
    }
}

/// Starts `tandem drill app` and follows it to its end (the drill can take minutes: the
/// API answers at once and the report comes with the app's view).
pub async fn drill(
    api: SocketAddr,
    app: &str,
    path: &str,
) -> anyhow::Result<orchestrator::app_drill::AppDrillReport> {
    let before = get::<AppsResponse>(api, "/v1/apps")
        .await?
        .apps
        .into_iter()
        .find(|v| v.name == app)
        .and_then(|v| v.last_drill.map(|d| d.started));
    post::<AppView>(api, path, None::<()>).await?;
    let mut every = tokio::time::interval(Duration::from_millis(500));
    loop {
        every.tick().await;
        let v = get::<AppsResponse>(api, "/v1/apps")
            .await?
            .apps
            .into_iter()
            .find(|v| v.name == app)
            .ok_or_else(|| anyhow::anyhow!("app {app} is gone"))?;
        if !v.drilling
            && let Some(d) = v.last_drill
            && Some(d.started) != before
        {
            return Ok(d);
        }
    }
}

/// `tandem drill app`'s report, as text.
pub fn print_drill(r: &orchestrator::app_drill::AppDrillReport) {
    let secs = |s: Option<f64>| s.map_or_else(|| "-".to_string(), |s| format!("{s:.2} s"));
    match &r.error {
        None if r.ok => println!("app drill of {}: passed ({:.1} s)", r.app, r.seconds),
        _ => println!(
            "app drill of {}: FAILED: {}",
            r.app,
            r.error
                .as_deref()
                .unwrap_or("acknowledged writes were lost")
        ),
    }
    for (what, m, c) in [
        ("failover", &r.failover, &r.failover_clients),
        ("failback", &r.failback, &r.failback_clients),
    ] {
        if let Some(m) = m {
            print_move(&format!("  {what}"), m);
            println!(
                "    clients: RTO {} (to the first write committed at {}), longest gap {}, {} writes failed",
                secs(c.rto_seconds),
                m.to,
                secs(c.longest_gap_seconds),
                c.failed_writes
            );
        }
    }
    println!(
        "  writes        {} acknowledged, {} failed; reads {} ok, {} failed",
        r.writes_acknowledged, r.writes_failed, r.reads_ok, r.reads_failed
    );
    println!(
        "  RPO           {} acknowledged writes lost{}",
        r.writes_lost
            .map_or_else(|| "unknown:".to_string(), |n| n.to_string()),
        if r.lost_ids.is_empty() {
            String::new()
        } else {
            format!(" (ids {:?})", r.lost_ids)
        }
    );
    for e in &r.errors {
        println!("  client error  {e}");
    }
}
