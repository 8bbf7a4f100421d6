//! `tandem db switchover DB --to SITE`.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Subcommand;
use serde_json::json;

use crate::EXIT_RUNTIME;
use crate::client::{api_addr, block_on, post_body};

#[derive(Debug, Subcommand)]
pub enum Action {
    /// Planned handover: waits for the target to catch up, stops the primary cleanly,
    /// promotes the target once it has every write, re-points the frontends; the former
    /// primary rejoins as a standby.
    Switchover {
        /// The database's name.
        db: String,
        /// The site whose member becomes primary.
        #[arg(long)]
        to: String,
        /// API address of the running tandem [env: TANDEM_API] [default: 127.0.0.1:7400].
        #[arg(long)]
        api: Option<SocketAddr>,
    },
}

pub fn run(action: Action) -> ExitCode {
    let Action::Switchover { db, to, api } = action;
    let path = format!("/v1/databases/{db}/switchover");
    match api_addr(api).and_then(|api| block_on(post_body(api, &path, json!({ "to": to })))) {
        Ok(body) => {
            println!("{}", body["message"].as_str().unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}
