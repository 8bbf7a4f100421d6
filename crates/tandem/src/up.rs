//! `tandem up`: load the topology, build this node (every site, or `--node NAME`'s), serve
//! until SIGINT or SIGTERM, reload on SIGHUP.

use std::io::IsTerminal as _;
use std::path::Path;
use std::process::ExitCode;

use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing_subscriber::EnvFilter;

use crate::{EXIT_INVALID, EXIT_RUNTIME, EXIT_USAGE, report_load_error};

/// Runs the topology in `file`; `console` prints the live summary on stdout.
pub fn run(file: &Path, node: Option<&str>, console: bool) -> ExitCode {
    let config = match node::Config::load(file, node) {
        Ok(c) => c,
        Err(node::Error::Load(e)) => {
            report_load_error(&e, false);
            return ExitCode::from(EXIT_INVALID);
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let terminal = std::io::stderr().is_terminal();
    // On a terminal the live summary already shows every event: logs only say what is wrong.
    let level = if console && terminal && std::io::stdout().is_terminal() {
        "warn"
    } else {
        "info"
    };
    let filter = EnvFilter::try_from_env("TANDEM_LOG").unwrap_or_else(|_| EnvFilter::new(level));
    // TANDEM_LOG_FORMAT=json: one JSON object a line, for journald and log shippers.
    if std::env::var("TANDEM_LOG_FORMAT").is_ok_and(|f| f == "json") {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(terminal)
            .with_writer(std::io::stderr)
            .init();
    }
    crate::log_warnings(&config.warnings);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    match runtime.block_on(serve(config, console)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

async fn serve(config: node::Config, console: bool) -> Result<(), node::Error> {
    // Signals are caught before anything starts: a SIGTERM during startup stops cleanly too.
    let shutdown = shutdown_signal()
        .map_err(|e| node::Error::Start(format!("cannot catch SIGINT and SIGTERM: {e}")))?;
    let hup = signal(SignalKind::hangup())
        .map_err(|e| node::Error::Start(format!("cannot catch SIGHUP: {e}")))?;
    let mut usr2 = signal(SignalKind::user_defined2())
        .map_err(|e| node::Error::Start(format!("cannot catch SIGUSR2: {e}")))?;
    let node = config.build().await?;
    let api = node.api().clone();
    tokio::spawn(reload_on_sighup(api.clone(), hup));
    if console {
        let addr = node.api_addr().ok();
        tokio::spawn(crate::console::run(api.clone(), addr));
    }
    // SIGUSR2: a planned restart or upgrade. Everything stops as for SIGTERM, except the
    // database members, left running with their leases for the next `tandem up` to adopt.
    let databases = api.databases.clone();
    let stop = async move {
        tokio::select! {
            () = shutdown => {}
            _ = usr2.recv() => {
                tracing::info!("SIGUSR2: exiting for a restart; database members keep running");
                for db in &databases {
                    db.leave_running();
                }
            }
        }
    };
    node.run(stop)
        .await
        .map_err(|e| node::Error::Start(format!("API server failed: {e}")))
}

async fn reload_on_sighup(api: api::Api, mut hup: Signal) {
    while hup.recv().await.is_some() {
        match api::reload_now(&api).await {
            Ok(r) if r.unchanged => tracing::info!("reload: no changes"),
            Ok(r) => {
                tracing::info!(applied = ?r.applied, needs_restart = ?r.needs_restart, "reloaded")
            }
            Err((_, e)) => {
                // The event reaches the console and `GET /v1/events`, as a failed reload
                // through the API does; the diagnostics follow the message.
                tracing::error!(
                    "reload failed: {}\n{}",
                    e.error,
                    e.diagnostics.as_deref().unwrap_or_default()
                );
                let message = match e.diagnostics {
                    Some(d) => format!("SIGHUP: {}\n{d}", e.error),
                    None => format!("SIGHUP: {}", e.error),
                };
                let subject = api
                    .node
                    .as_ref()
                    .map_or_else(|| "local".to_string(), |n| n.name().to_string());
                api.events.record(event::Event::new(
                    event::Source::Node,
                    subject,
                    "reload-failed",
                    message,
                ));
            }
        }
    }
}

/// A future that completes on SIGINT or SIGTERM; the handlers are in place when this returns.
pub fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()> + Send + 'static>
{
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
    })
}
