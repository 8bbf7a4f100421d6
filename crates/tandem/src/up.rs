//! `tandem up`: validate, start probing, serve the API, stop cleanly on SIGINT or SIGTERM.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

use crate::{EXIT_INVALID, EXIT_RUNTIME, report_load_error};

pub fn run(file: &Path) -> ExitCode {
    let topology = match model::load(file) {
        Ok(t) => t,
        Err(e) => {
            report_load_error(&e, false);
            return ExitCode::from(EXIT_INVALID);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("TANDEM_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    match runtime.block_on(serve(topology)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

async fn serve(topology: model::Topology) -> anyhow::Result<()> {
    let topology = Arc::new(topology);
    let addr = topology.tandem.api;
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for the API on {addr} ([tandem] api)"))?;
    let targets = health::targets(&topology);
    let count = targets.len();
    let engine = Arc::new(
        health::Engine::start(targets, &topology.monitors, health::Options::default())
            .context("cannot start the probe engine")?,
    );
    let events = api::EventLog::default();
    events.follow(engine.events());
    let mut dns_server = None;
    let dns = match &topology.dns {
        Some(config) => {
            let manager = dns::manager::Manager::new(topology.clone(), engine.clone())
                .map_err(anyhow::Error::msg)?;
            events.follow(manager.events());
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            let server = dns::server::Server::start(
                &config.listen,
                manager.tables(),
                manager.metrics.clone(),
                threads,
            )
            .context("cannot start the DNS server ([dns] listen)")?;
            for a in &server.addrs {
                tracing::info!(listen = %a, "DNS serving on udp and tcp");
            }
            dns_server = Some(server);
            tokio::spawn(manager.clone().run(engine.subscribe()));
            Some(manager)
        }
        None => None,
    };
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut load_balancers = Vec::new();
    let mut running = Vec::new();
    for config in &topology.load_balancers {
        let balancer = lb::Balancer::new(config.clone(), engine.clone());
        events.follow(balancer.events());
        let r = lb::Running::start(balancer.clone(), workers)
            .with_context(|| format!("cannot start load balancer {}", config.name))?;
        tokio::spawn(balancer.clone().follow_health(engine.subscribe()));
        for (front, _) in balancer.frontends() {
            tracing::info!(lb = %config.name, frontend = %front, protocol = %config.protocol, "load balancer listening");
        }
        load_balancers.push(balancer);
        running.push(r);
    }
    tracing::info!(api = %addr, targets = count, "tandem is up");
    let state = api::Api {
        engine: engine.clone(),
        dns,
        load_balancers,
        events,
    };
    api::serve(listener, state, shutdown_signal())
        .await
        .context("API server failed")?;
    if let Some(mut s) = dns_server {
        s.stop();
    }
    for mut r in running {
        r.stop();
    }
    engine.shutdown();
    tracing::info!("tandem stopped");
    Ok(())
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("shutting down");
}
