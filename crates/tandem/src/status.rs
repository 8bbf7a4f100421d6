//! `tandem status`: DNS profiles with their answers, then every probe target.

use std::net::SocketAddr;
use std::process::ExitCode;

use serde_json::{Value, json};

use crate::EXIT_RUNTIME;
use crate::client::{api_addr, block_on, get_json};

pub fn run(api: Option<SocketAddr>, json: bool) -> ExitCode {
    let result = api_addr(api).and_then(|api| {
        block_on(async move {
            let health = get_json(api, "/v1/health").await?;
            let profiles = get_json(api, "/v1/profiles").await?;
            let lbs = get_json(api, "/v1/load-balancers").await?;
            let sets = get_json(api, "/v1/scale-sets").await?;
            let dbs = get_json(api, "/v1/databases").await?;
            Ok(json!({
                "databases": dbs["databases"],
                "profiles": profiles["profiles"],
                "load_balancers": lbs["load_balancers"],
                "scale_sets": sets["scale_sets"],
                "targets": health["targets"],
            }))
        })
    });
    match result {
        Ok(body) => {
            if json {
                println!("{body:#}");
            } else {
                print!("{}", text(&body));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

fn s(v: &Value, k: &str) -> String {
    match &v[k] {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// Profiles (one line each, then their endpoints), then targets.
fn text(body: &Value) -> String {
    let mut out = String::new();
    let profiles = body["profiles"].as_array().cloned().unwrap_or_default();
    if !profiles.is_empty() {
        let mut rows = vec![cells([
            "PROFILE",
            "DOMAIN",
            "ROUTING",
            "ENDPOINTS",
            "ANSWER",
        ])];
        for p in &profiles {
            let endpoints: Vec<String> = p["endpoints"]
                .as_array()
                .map(|es| {
                    es.iter()
                        .map(|e| {
                            let mark = if e["answered"] == true { "*" } else { "" };
                            format!("{}{mark}={}", s(e, "name"), s(e, "status"))
                        })
                        .collect()
                })
                .unwrap_or_default();
            let answer: Vec<&str> = p["answer"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let mut answer = answer.join(", ");
            if p["all_down"] == true {
                answer.push_str(" (all down)");
            }
            rows.push(cells([
                &s(p, "name"),
                &s(p, "domain"),
                &s(p, "routing"),
                &endpoints.join(" "),
                &answer,
            ]));
        }
        out.push_str(&table(&rows));
        out.push('\n');
    }
    let lbs = body["load_balancers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if !lbs.is_empty() {
        out.push_str(&table(&lb_rows(&lbs)));
        out.push('\n');
    }
    let sets = body["scale_sets"].as_array().cloned().unwrap_or_default();
    if !sets.is_empty() {
        out.push_str(&table(&set_rows(&sets)));
        out.push('\n');
    }
    let dbs = body["databases"].as_array().cloned().unwrap_or_default();
    if !dbs.is_empty() {
        out.push_str(&table(&db_rows(&dbs)));
        out.push('\n');
    }
    let mut rows = vec![cells([
        "TARGET",
        "STATUS",
        "SINCE",
        "LATENCY",
        "OK/FAIL",
        "LAST FAILURE",
    ])];
    let targets = body["targets"].as_array().cloned().unwrap_or_default();
    for t in &targets {
        let latency = t["last_latency_ms"]
            .as_f64()
            .map_or_else(|| "-".into(), |ms| format!("{ms:.1}ms"));
        rows.push(cells([
            &format!(
                "{} ({} {})",
                s(t, "target"),
                s(t, "monitor"),
                s(t, "destination")
            ),
            &s(t, "status"),
            &s(t, "since"),
            &latency,
            &format!(
                "{}/{}",
                s(t, "consecutive_successes"),
                s(t, "consecutive_failures")
            ),
            &s(t, "last_failure"),
        ]));
    }
    out.push_str(&table(&rows));
    if targets.is_empty() {
        out.push_str("(no monitored targets)\n");
    }
    out
}

/// One line per database (primary, term, state), then one per member.
fn db_rows(dbs: &[Value]) -> Vec<Vec<String>> {
    let mut rows = vec![cells([
        "DATABASE", "ROLE", "STATE", "LSN", "LAG", "TIMELINE",
    ])];
    for d in dbs {
        let change = match &d["last_change"] {
            Value::Null => String::new(),
            c => format!(
                "; last {} {} -> {} in {:.2}s",
                s(c, "kind"),
                s(c, "from"),
                s(c, "to"),
                c["seconds"].as_f64().unwrap_or(0.0)
            ),
        };
        rows.push(cells([
            &format!("{} ({})", s(d, "name"), s(d, "replication")),
            &format!("primary {}, term {}", s(d, "primary"), s(d, "term")),
            &format!("{}{change}", s(d, "state")),
            "",
            "",
            "",
        ]));
        for m in d["members"].as_array().into_iter().flatten() {
            let sync = match m["sync_state"].as_str() {
                Some(st) => format!(" ({st})"),
                None => String::new(),
            };
            let lag = match m["lag_bytes"].as_u64() {
                Some(b) => format!("{b} B"),
                None => "-".into(),
            };
            rows.push(cells([
                &format!("  {} {}", s(m, "site"), s(m, "listen")),
                &format!("{}{sync}", s(m, "role")),
                &s(m, "state"),
                &s(m, "lsn"),
                &lag,
                &s(m, "timeline"),
            ]));
        }
    }
    rows
}

/// One line per scale set, then one per instance.
fn set_rows(sets: &[Value]) -> Vec<Vec<String>> {
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
    for v in sets {
        let mut flags = Vec::new();
        if v["upgrading"] == true {
            flags.push(format!("upgrading to template {}", s(v, "template")));
        }
        if v["repair_suspended"] == true {
            flags.push("repair suspended".to_string());
        }
        let instances = v["instances"].as_array().cloned().unwrap_or_default();
        rows.push(cells([
            &format!("{} ({})", s(v, "name"), s(v, "site")),
            &format!(
                "{} of {} (min {}, max {}){}",
                instances
                    .iter()
                    .filter(|i| i["state"] != "retiring")
                    .count(),
                s(v, "desired"),
                s(v, "min"),
                s(v, "max"),
                if flags.is_empty() {
                    String::new()
                } else {
                    format!("; {}", flags.join("; "))
                }
            ),
            "",
            "",
            "",
            "",
            "",
            "",
        ]));
        for i in &instances {
            let ports: Vec<String> = i["ports"]
                .as_object()
                .map(|ps| {
                    ps.iter()
                        .map(|(k, p)| format!("{k}={}:{p}", s(i, "address")))
                        .collect()
                })
                .unwrap_or_default();
            let age = i["age_seconds"].as_f64().unwrap_or_default();
            rows.push(cells([
                &format!("  {}", s(i, "id")),
                &s(i, "state"),
                &s(i, "health"),
                &s(i, "pid"),
                &ports.join(" "),
                &format!("{age:.0}s"),
                &s(i, "restarts"),
                &i["cpu_percent"]
                    .as_f64()
                    .map_or_else(|| "-".into(), |c| format!("{c:.0}%")),
            ]));
        }
    }
    rows
}

fn cells<const N: usize>(c: [&str; N]) -> Vec<String> {
    c.iter().map(|s| s.to_string()).collect()
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

/// One row per backend, the balancer's name and frontends on its first.
fn lb_rows(lbs: &[Value]) -> Vec<Vec<String>> {
    let mut rows = vec![cells([
        "LOAD BALANCER",
        "FRONTENDS",
        "BACKEND",
        "STATUS",
        "FLOWS",
        "ACTIVE",
        "EJECTIONS",
    ])];
    for l in lbs {
        let fronts: Vec<&str> = l["frontends"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let backends = l["backends"].as_array().cloned().unwrap_or_default();
        if backends.is_empty() {
            rows.push(cells([
                &s(l, "name"),
                &fronts.join(", "),
                "(no backends)",
                "",
                "",
                "",
                "",
            ]));
        }
        for (i, b) in backends.iter().enumerate() {
            let mut status = s(b, "status");
            if b["draining"] == true {
                status.push_str(" draining");
            } else if b["takes_new_flows"] == true {
                status.push_str(" *");
            }
            let (name, fronts) = if i == 0 {
                (s(l, "name"), fronts.join(", "))
            } else {
                (String::new(), String::new())
            };
            rows.push(cells([
                &name,
                &fronts,
                &s(b, "address"),
                &status,
                &s(b, "total_connections"),
                &s(b, "active_connections"),
                &s(b, "ejections"),
            ]));
        }
    }
    rows
}
