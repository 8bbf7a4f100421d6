//! `tandem backend drain|enable LB ADDRESS`.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Subcommand;

use crate::EXIT_RUNTIME;
use crate::client::{api_addr, block_on, post_json};

#[derive(Debug, Subcommand)]
pub enum Action {
    /// Take no new flows; established flows get the balancer's `drain_timeout`, then are reset.
    Drain(Which),
    /// Take new flows again.
    Enable(Which),
}

#[derive(Debug, clap::Args)]
pub struct Which {
    /// The load balancer's name.
    lb: String,
    /// The backend's address, ip:port.
    address: SocketAddr,
    /// API address of the running tandem [env: TANDEM_API] [default: 127.0.0.1:7400].
    #[arg(long)]
    api: Option<SocketAddr>,
}

pub fn run(action: Action) -> ExitCode {
    let (verb, w) = match action {
        Action::Drain(w) => ("drain", w),
        Action::Enable(w) => ("enable", w),
    };
    let path = format!("/v1/load-balancers/{}/backends/{}/{verb}", w.lb, w.address);
    match api_addr(w.api).and_then(|api| block_on(post_json(api, &path))) {
        Ok(body) => {
            let backend = body["load_balancer"]["backends"]
                .as_array()
                .and_then(|bs| bs.iter().find(|b| b["address"] == w.address.to_string()))
                .cloned()
                .unwrap_or_default();
            println!(
                "{}: backend {} {}; active flows {}",
                w.lb,
                w.address,
                if verb == "drain" {
                    "draining"
                } else {
                    "enabled"
                },
                backend["active_connections"]
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}
