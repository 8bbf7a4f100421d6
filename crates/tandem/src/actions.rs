//! Operator actions through a node's API: `endpoint`, `backend`, `scale`, `reload`, `drill`,
//! `db`. In cluster mode any node takes them; the node that runs what they name applies them.

use std::net::SocketAddr;
use std::process::ExitCode;

use api::types::{
    BackupRequest, BackupsResponse, DrillResponse, IntentResponse, OutageRequest, ReloadResponse,
    RestoreDrillRequest, RestoreRequest, ScaleRequest, SwitchoverRequest, SwitchoverResponse,
    VerifyResponse,
};
use clap::Subcommand;

use crate::client::{Refused, api_addr, block_on, get_long, post, post_long};
use crate::{EXIT_INVALID, EXIT_RUNTIME};

#[derive(Debug, clap::Args)]
pub struct Api {
    /// API address of a running node [env: TANDEM_API] [default: 127.0.0.1:7400].
    #[arg(long)]
    pub api: Option<SocketAddr>,
}

#[derive(Debug, Subcommand)]
pub enum Endpoint {
    /// Stop answering the endpoint (its state becomes Disabled) and stop probing it, on every
    /// node.
    Disable(EndpointArgs),
    /// Answer the endpoint again (it starts over at CheckingEndpoint).
    Enable(EndpointArgs),
}

#[derive(Debug, clap::Args)]
pub struct EndpointArgs {
    /// The profile's name.
    profile: String,
    /// The endpoint's name within the profile.
    endpoint: String,
    #[command(flatten)]
    api: Api,
}

#[derive(Debug, Subcommand)]
pub enum Backend {
    /// Take no new flows; established flows get the balancer's `drain_timeout`, then are reset.
    Drain(BackendArgs),
    /// Take new flows again.
    Enable(BackendArgs),
}

#[derive(Debug, clap::Args)]
pub struct BackendArgs {
    /// The load balancer's name.
    lb: String,
    /// The backend's address, ip:port.
    address: SocketAddr,
    #[command(flatten)]
    api: Api,
}

#[derive(Debug, Subcommand)]
pub enum Drill {
    /// Take SITE down as a real outage would (its node's load balancers stop answering, its
    /// instances stop), and bring it back after `--for`.
    Outage {
        /// The site's name.
        site: String,
        /// How long the outage lasts.
        #[arg(long = "for", default_value = "60s")]
        length: String,
        #[command(flatten)]
        api: Api,
    },
    /// End the drill in progress now.
    Stop {
        #[command(flatten)]
        api: Api,
    },
    /// Restore DB's latest backup and archived WAL into a scratch copy (its own directory and
    /// port, never a running member), start it, check it answers, count `drill_table`,
    /// report RTO and RPO, and remove it.
    Restore {
        /// The database's name.
        db: String,
        /// Restore to this time (RFC 3339, UTC: 2024-05-01T12:00:00Z) instead of the newest
        /// archived WAL.
        #[arg(long, default_value = "latest")]
        to: String,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: Api,
    },
    /// Fail APP over to its next healthy site and back while a writer and a reader go through
    /// its public entry (DNS name, load balancer, instance, database frontend); report each
    /// step's time, the RTO the clients saw, client errors and acknowledged writes lost. Its
    /// instances must be `tandem sample-app --database …` (or serve `POST /write` and `GET
    /// /read` alike).
    App {
        /// The app's name.
        app: String,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: Api,
    },
}

#[derive(Debug, Subcommand)]
pub enum Backup {
    /// Take a backup of the primary now and wait for it.
    Now {
        /// full, diff or incr (pgBackRest makes the first one full).
        #[arg(long = "type", default_value = "incr")]
        kind: String,
        #[command(flatten)]
        api: Api,
    },
    /// The backups in the repository: label, type, start and stop, size, WAL range.
    List {
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: Api,
    },
    /// Check every backup and archived WAL file against its checksum (`pgbackrest verify`).
    Verify {
        #[command(flatten)]
        api: Api,
    },
}

#[derive(Debug, Subcommand)]
pub enum Db {
    /// Planned handover: waits for the target to catch up, stops the primary cleanly,
    /// promotes the target once it has every write, re-points the frontends; the former
    /// primary rejoins as a standby.
    Switchover {
        /// The database's name.
        db: String,
        /// The site whose member becomes primary.
        #[arg(long)]
        to: String,
        #[command(flatten)]
        api: Api,
    },
}

/// Runs one call and maps its failure to an exit code.
pub fn call<T>(
    api: &Api,
    f: impl AsyncFnOnce(SocketAddr) -> anyhow::Result<T>,
    print: impl FnOnce(T),
) -> ExitCode {
    match api_addr(api.api).and_then(|a| block_on(f(a))) {
        Ok(v) => {
            print(v);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

fn where_applied<T>(r: &IntentResponse<T>) -> String {
    match (&r.applies_on, r.applied_here) {
        (_, true) => String::new(),
        (Some(n), false) => format!(" (node {n} applies it)"),
        (None, false) => " (stored; it applies when its node runs)".into(),
    }
}

fn warn(warnings: &[String]) {
    for w in warnings {
        eprintln!("warning: {w}");
    }
}

pub fn endpoint(action: Endpoint) -> ExitCode {
    let (verb, w) = match action {
        Endpoint::Disable(w) => ("disable", w),
        Endpoint::Enable(w) => ("enable", w),
    };
    let path = format!("/v1/profiles/{}/endpoints/{}/{verb}", w.profile, w.endpoint);
    call(
        &w.api,
        async |a| post::<IntentResponse<dns::table::ProfileView>>(a, &path, None::<()>).await,
        |r| {
            let answer = r
                .view
                .as_ref()
                .map(|p| p.answer.join(", "))
                .unwrap_or_default();
            println!(
                "{verb}d {}/{}; {} now answers: {answer}",
                w.profile, w.endpoint, w.profile
            );
            warn(&r.warnings);
        },
    )
}

pub fn backend(action: Backend) -> ExitCode {
    let (verb, w) = match action {
        Backend::Drain(w) => ("drain", w),
        Backend::Enable(w) => ("enable", w),
    };
    let path = format!("/v1/load-balancers/{}/backends/{}/{verb}", w.lb, w.address);
    call(
        &w.api,
        async |a| post::<IntentResponse<lb::View>>(a, &path, None::<()>).await,
        |r| {
            let active = r
                .view
                .as_ref()
                .and_then(|v| v.backends.iter().find(|b| b.address == w.address))
                .map_or_else(|| "-".to_string(), |b| b.active_connections.to_string());
            let state = if verb == "drain" {
                "draining"
            } else {
                "enabled"
            };
            println!(
                "{}: backend {} {state}; active flows {active}{}",
                w.lb,
                w.address,
                where_applied(&r)
            );
            warn(&r.warnings);
        },
    )
}

pub fn scale(set: &str, to: u32, api: &Api) -> ExitCode {
    let path = format!("/v1/scale-sets/{set}/scale");
    call(
        api,
        async |a| {
            post::<IntentResponse<scaleset::View>>(a, &path, Some(ScaleRequest { capacity: to }))
                .await
        },
        |r| {
            match &r.view {
                Some(v) => {
                    let running = v.instances.iter().filter(|i| i.state != "retiring").count();
                    println!(
                        "{set}: capacity {} (min {}, max {}); {running} instances now, the rest follow",
                        v.desired, v.min, v.max
                    );
                }
                None => println!("{set}: capacity {to}{}", where_applied(&r)),
            }
            warn(&r.warnings);
        },
    )
}

/// `tandem reload`: an invalid file exits 1 with the same diagnostics as `validate`.
pub fn reload(api: &Api) -> ExitCode {
    let result = api_addr(api.api)
        .and_then(|a| block_on(post::<ReloadResponse>(a, "/v1/reload", None::<()>)));
    match result {
        Ok(r) if r.unchanged => {
            println!("no changes: the file is the running topology");
            ExitCode::SUCCESS
        }
        Ok(r) => {
            for line in r.applied.iter().chain(&r.needs_restart) {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => match e.downcast_ref::<Refused>() {
            Some(Refused { body, .. }) if body.diagnostics.is_some() => {
                eprint!("{}", body.diagnostics.as_deref().unwrap_or_default());
                eprintln!("error: {}", body.error);
                ExitCode::from(EXIT_INVALID)
            }
            _ => {
                eprintln!("error: {e:#}");
                ExitCode::from(EXIT_RUNTIME)
            }
        },
    }
}

pub fn drill(action: Drill) -> ExitCode {
    match action {
        Drill::Outage { site, length, api } => {
            if model::units::parse_positive_duration(&length).is_none() {
                eprintln!(
                    "error: --for {length:?}: expected a duration longer than 0 with its unit, such as \"60s\" or \"2m\""
                );
                return ExitCode::from(crate::EXIT_USAGE);
            }
            call(
                &api,
                async |a| {
                    let req = OutageRequest {
                        site: site.clone(),
                        length: Some(length.clone()),
                    };
                    post::<DrillResponse>(a, "/v1/drills/outage", Some(req)).await
                },
                |r| {
                    let at = |t: Option<std::time::SystemTime>| {
                        t.map_or("-".to_string(), event::rfc3339)
                    };
                    let d = r.drill.as_ref();
                    println!(
                        "outage drill of site {site} started at {}; it ends at {} ({length}){}; `tandem drill stop` ends it now",
                        at(d.map(|d| d.started)),
                        at(d.map(|d| d.ends)),
                        match (&r.applies_on, r.applied_here) {
                            (Some(n), false) => format!("; node {n} takes the site down"),
                            _ => String::new(),
                        }
                    );
                },
            )
        }
        Drill::Restore { db, to, json, api } => {
            let path = format!("/v1/databases/{db}/restore-drill");
            let mut failed = false;
            let code = call(
                &api,
                async |a| {
                    post_long::<pg::backup::DrillReport>(
                        a,
                        &path,
                        Some(RestoreDrillRequest {
                            to: Some(to.clone()),
                        }),
                    )
                    .await
                },
                |r| {
                    failed = !r.ok;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
                    } else {
                        print_drill(&db, &r);
                    }
                },
            );
            if failed {
                ExitCode::from(EXIT_RUNTIME)
            } else {
                code
            }
        }
        Drill::App { app, json, api } => {
            let path = format!("/v1/apps/{app}/drill");
            let mut failed = false;
            let code = call(
                &api,
                async |a| crate::apps::drill(a, &app, &path).await,
                |r| {
                    failed = !r.ok;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
                    } else {
                        crate::apps::print_drill(&r);
                    }
                },
            );
            if failed {
                ExitCode::from(EXIT_RUNTIME)
            } else {
                code
            }
        }
        Drill::Stop { api } => call(
            &api,
            async |a| post::<DrillResponse>(a, "/v1/drills/stop", None::<()>).await,
            |r| {
                println!(
                    "outage drill of site {} ending now; the site comes back",
                    r.drill.map_or_else(|| "-".to_string(), |d| d.site)
                );
            },
        ),
    }
}

pub fn db(action: Db) -> ExitCode {
    let Db::Switchover { db, to, api } = action;
    let path = format!("/v1/databases/{db}/switchover");
    call(
        &api,
        async |a| {
            post::<SwitchoverResponse>(a, &path, Some(SwitchoverRequest { to: to.clone() })).await
        },
        |r| println!("{}", r.message),
    )
}

/// `tandem restore DB --site SITE [--to TIME]`.
pub fn restore(db: &str, site: &str, to: &str, json: bool, api: &Api) -> ExitCode {
    let path = format!("/v1/databases/{db}/restore");
    let req = RestoreRequest {
        site: site.to_string(),
        to: Some(to.to_string()),
    };
    call(
        api,
        async |a| post_long::<pg::RestoreReport>(a, &path, Some(req.clone())).await,
        |r| {
            if json {
                println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
                return;
            }
            let or = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
            let c = &r.copy;
            println!(
                "restored {db} to {}: {} is the primary (term {})",
                c.target, r.site, r.term
            );
            println!("  backup        {}", or(&c.backup));
            println!(
                "  copy made in  {:.2} s (restore {:.2} s + replay {:.2} s) beside the running members",
                c.rto_seconds, c.restore_seconds, c.start_seconds
            );
            println!(
                "  down for      {:.2} s (members stopped -> the restored primary writable)",
                r.downtime_seconds
            );
            if let Some(t) = &c.table {
                println!(
                    "  rows          {} in {t}",
                    c.rows.map_or_else(|| "-".into(), |n| n.to_string())
                );
            }
            println!(
                "  newest commit {} restored (the primary's newest before: {})",
                or(&c.newest_restored_commit),
                or(&c.newest_acknowledged_commit)
            );
            println!(
                "  former data   {}",
                r.set_aside
                    .as_deref()
                    .unwrap_or("none (the member had no data)")
            );
            if let Some(p) = &r.former_set_aside {
                println!("  former primary's data {p} (it is cloned afresh)");
            }
            println!("  a full backup of the restored database is under way");
        },
    )
}

fn print_drill(db: &str, r: &pg::backup::DrillReport) {
    let or = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    if r.ok {
        println!("restore drill of {db}: passed");
    } else {
        println!(
            "restore drill of {db}: FAILED: {}",
            r.error.as_deref().unwrap_or("?")
        );
    }
    println!("  backup        {} (target {})", or(&r.backup), r.target);
    println!("  restored in   {} (port {}, removed)", r.directory, r.port);
    println!(
        "  RTO           {:.2} s (restore {:.2} s + start and replay {:.2} s)",
        r.rto_seconds, r.restore_seconds, r.start_seconds
    );
    if let Some(t) = &r.table {
        println!(
            "  rows          {} in {t}",
            r.rows.map_or_else(|| "-".into(), |n| n.to_string())
        );
    }
    println!(
        "  RPO           {} (newest restored commit {}, newest acknowledged {})",
        r.rpo_seconds
            .map_or_else(|| "unknown".into(), |s| format!("{s:.2} s")),
        or(&r.newest_restored_commit),
        or(&r.newest_acknowledged_commit)
    );
}

pub fn backup(db: &str, action: Backup) -> ExitCode {
    let path = format!("/v1/databases/{db}/backups");
    match action {
        Backup::Now { kind, api } => call(
            &api,
            async |a| {
                post_long::<BackupsResponse>(
                    a,
                    &path,
                    Some(BackupRequest {
                        kind: Some(kind.clone()),
                    }),
                )
                .await
            },
            |r| {
                if let Some(b) = r.created {
                    println!(
                        "{} backup {} of {db} done in {:.1} s: {} bytes ({} in the repository), WAL {}..{}",
                        b.kind,
                        b.label,
                        b.stopped
                            .duration_since(b.started)
                            .unwrap_or_default()
                            .as_secs_f64(),
                        b.size_bytes,
                        b.repository_bytes,
                        b.wal_start.as_deref().unwrap_or("?"),
                        b.wal_stop.as_deref().unwrap_or("?")
                    );
                }
            },
        ),
        Backup::List { json, api } => call(
            &api,
            async |a| get_long::<BackupsResponse>(a, &path).await,
            |r| {
                if json {
                    println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
                    return;
                }
                println!(
                    "{:<36} {:<5} {:<24} {:<24} {:>12} {:>12}  WAL",
                    "LABEL", "TYPE", "STARTED", "STOPPED", "SIZE", "STORED"
                );
                for b in &r.backups {
                    println!(
                        "{:<36} {:<5} {:<24} {:<24} {:>12} {:>12}  {}..{}",
                        b.label,
                        b.kind,
                        event::rfc3339(b.started),
                        event::rfc3339(b.stopped),
                        b.size_bytes,
                        b.repository_bytes,
                        b.wal_start.as_deref().unwrap_or("?"),
                        b.wal_stop.as_deref().unwrap_or("?")
                    );
                }
                if let Some(s) = r.status {
                    println!(
                        "archive: {}..{}, lag {}; repository {} ({} bytes)",
                        s.wal_min.as_deref().unwrap_or("-"),
                        s.wal_max.as_deref().unwrap_or("-"),
                        s.archive_lag_seconds
                            .map_or_else(|| "unknown".into(), |l| format!("{l:.0} s")),
                        s.repository,
                        s.repository_bytes
                            .map_or_else(|| "?".into(), |n| n.to_string())
                    );
                    if let (Some(k), Some(at)) = (&s.next_backup, s.next_backup_at) {
                        println!("next: {k} backup at {}", event::rfc3339(at));
                    }
                    if let Some(e) = &s.last_error {
                        println!("last error: {e}");
                    }
                }
            },
        ),
        Backup::Verify { api } => call(
            &api,
            async |a| post_long::<VerifyResponse>(a, &format!("{path}/verify"), None::<()>).await,
            |r| println!("{}", r.report),
        ),
    }
}
