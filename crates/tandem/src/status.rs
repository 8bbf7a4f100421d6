//! `tandem status`: the health of every target, as a table or as the API's JSON.

use std::net::SocketAddr;
use std::process::ExitCode;

use serde_json::Value;

use crate::EXIT_RUNTIME;
use crate::client::get_json;

const DEFAULT_API: &str = "127.0.0.1:7400";

pub fn run(api: Option<SocketAddr>, json: bool) -> ExitCode {
    let api = match api.map(Ok).unwrap_or_else(default_api) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    match runtime.block_on(get_json(api, "/v1/health")) {
        Ok(body) => {
            if json {
                println!("{body:#}");
            } else {
                print!("{}", table(&body));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

fn default_api() -> Result<SocketAddr, String> {
    let raw = std::env::var("TANDEM_API").unwrap_or_else(|_| DEFAULT_API.to_string());
    raw.parse()
        .map_err(|_| format!("TANDEM_API={raw:?} is not an ip:port address"))
}

/// A readable table of `/v1/health`.
fn table(body: &Value) -> String {
    let mut rows = vec![[
        "TARGET".to_string(),
        "STATUS".into(),
        "SINCE".into(),
        "LATENCY".into(),
        "OK/FAIL".into(),
        "LAST FAILURE".into(),
    ]];
    let targets = body["targets"].as_array().cloned().unwrap_or_default();
    for t in &targets {
        let s = |k: &str| t[k].as_str().unwrap_or("-").to_string();
        let latency = t["last_latency_ms"]
            .as_f64()
            .map_or_else(|| "-".into(), |ms| format!("{ms:.1}ms"));
        rows.push([
            format!("{} ({} {})", s("target"), s("monitor"), s("destination")),
            s("status"),
            s("since"),
            latency,
            format!(
                "{}/{}",
                t["consecutive_successes"].as_u64().unwrap_or(0),
                t["consecutive_failures"].as_u64().unwrap_or(0)
            ),
            s("last_failure"),
        ]);
    }
    let widths: Vec<usize> = (0..6)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    if targets.is_empty() {
        out.push_str("(no monitored targets)\n");
    }
    out
}
