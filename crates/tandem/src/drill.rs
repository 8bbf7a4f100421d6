//! `tandem drill outage SITE [--for 60s]` and `tandem drill stop`.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Subcommand;
use serde_json::json;

use crate::EXIT_RUNTIME;
use crate::client::{api_addr, block_on, post_body, post_json};

#[derive(Debug, Subcommand)]
pub enum Action {
    /// Take SITE down as a real outage would, and bring it back after `--for`.
    Outage {
        /// The site's name.
        site: String,
        /// How long the outage lasts.
        #[arg(long = "for", default_value = "60s")]
        length: String,
        /// API address of the running tandem [env: TANDEM_API] [default: 127.0.0.1:7400].
        #[arg(long)]
        api: Option<SocketAddr>,
    },
    /// End the drill in progress now.
    Stop {
        /// API address of the running tandem [env: TANDEM_API] [default: 127.0.0.1:7400].
        #[arg(long)]
        api: Option<SocketAddr>,
    },
}

pub fn run(action: Action) -> ExitCode {
    let result = match &action {
        Action::Outage { site, length, api } => api_addr(*api).and_then(|api| {
            block_on(post_body(
                api,
                "/v1/drills/outage",
                json!({ "site": site, "for": length }),
            ))
        }),
        Action::Stop { api } => {
            api_addr(*api).and_then(|api| block_on(post_json(api, "/v1/drills/stop")))
        }
    };
    match result {
        Ok(body) => {
            let d = &body["drill"];
            match action {
                Action::Outage { site, length, .. } => println!(
                    "outage drill of site {site} started at {}; it ends at {} ({length}); `tandem drill stop` ends it now",
                    d["started"].as_str().unwrap_or("-"),
                    d["ends"].as_str().unwrap_or("-")
                ),
                Action::Stop { .. } => println!(
                    "outage drill of site {} ending now; the site comes back",
                    d["site"].as_str().unwrap_or("-")
                ),
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}
