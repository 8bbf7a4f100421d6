//! `tandem scale SET --to N` and `tandem reload`.

use std::net::SocketAddr;
use std::process::ExitCode;

use serde_json::json;

use crate::EXIT_RUNTIME;
use crate::client::{api_addr, block_on, post_body, post_json};

pub fn scale(set: &str, to: u32, api: Option<SocketAddr>) -> ExitCode {
    let path = format!("/v1/scale-sets/{set}/scale");
    match api_addr(api).and_then(|api| block_on(post_body(api, &path, json!({ "capacity": to })))) {
        Ok(body) => {
            let v = &body["scale_set"];
            let running = v["instances"].as_array().map_or(0, |is| {
                is.iter().filter(|i| i["state"] != "retiring").count()
            });
            println!(
                "{set}: capacity {} (min {}, max {}); {running} instances now, the rest follow",
                v["desired"], v["min"], v["max"]
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

pub fn reload(api: Option<SocketAddr>) -> ExitCode {
    match api_addr(api).and_then(|api| block_on(post_json(api, "/v1/reload"))) {
        Ok(body) => {
            for line in body["applied"].as_array().into_iter().flatten() {
                println!("{}", line.as_str().unwrap_or_default());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}
