//! `tandem endpoint disable|enable PROFILE ENDPOINT`.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Subcommand;

use crate::EXIT_RUNTIME;
use crate::client::{api_addr, block_on, post_json};

#[derive(Debug, Subcommand)]
pub enum Action {
    /// Stop answering the endpoint (its state becomes Disabled) and stop probing it.
    Disable(Which),
    /// Answer the endpoint again (it starts over at CheckingEndpoint).
    Enable(Which),
}

#[derive(Debug, clap::Args)]
pub struct Which {
    /// The profile's name.
    profile: String,
    /// The endpoint's name within the profile.
    endpoint: String,
    /// API address of the running tandem [env: TANDEM_API] [default: 127.0.0.1:7400].
    #[arg(long)]
    api: Option<SocketAddr>,
}

pub fn run(action: Action) -> ExitCode {
    let (verb, w) = match action {
        Action::Disable(w) => ("disable", w),
        Action::Enable(w) => ("enable", w),
    };
    let path = format!("/v1/profiles/{}/endpoints/{}/{verb}", w.profile, w.endpoint);
    let result = api_addr(w.api).and_then(|api| block_on(post_json(api, &path)));
    match result {
        Ok(body) => {
            let answer = body["profile"]["answer"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default();
            println!(
                "{verb}d {}/{}; {} now answers: {answer}",
                w.profile, w.endpoint, w.profile
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}
