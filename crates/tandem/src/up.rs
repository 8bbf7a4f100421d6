//! `tandem up`: validate, start probing, serve the API, stop cleanly on SIGINT or SIGTERM.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

use crate::{EXIT_INVALID, EXIT_RUNTIME, report_load_error};

/// Runs the topology in `file`; `console` prints the live summary on stdout.
pub fn run(file: &Path, console: bool) -> ExitCode {
    let checked = match model::load_checked(file) {
        Ok(c) => c,
        Err(e) => {
            report_load_error(&e, false);
            return ExitCode::from(EXIT_INVALID);
        }
    };
    // On a terminal the live summary already shows every event: logs only say what is wrong.
    use std::io::IsTerminal as _;
    let level = if console && std::io::stderr().is_terminal() && std::io::stdout().is_terminal() {
        "warn"
    } else {
        "info"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("TANDEM_LOG").unwrap_or_else(|_| EnvFilter::new(level)),
        )
        .with_writer(std::io::stderr)
        .init();
    crate::log_warnings(&checked.warnings);
    let topology = checked.topology;
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    match runtime.block_on(serve(file.to_path_buf(), topology, console)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

async fn serve(file: PathBuf, topology: model::Topology, console: bool) -> anyhow::Result<()> {
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
    let mut frontends = Vec::new();
    let db_frontends = topology
        .databases
        .iter()
        .flat_map(|d| d.frontend_balancers());
    for config in topology.load_balancers.iter().cloned().chain(db_frontends) {
        let balancer = lb::Balancer::new(config.clone(), engine.clone());
        events.follow(balancer.events());
        let r = lb::Running::start(balancer.clone(), workers).with_context(|| {
            format!(
                "cannot start load balancer {} on {}",
                config.name, config.frontend
            )
        })?;
        tokio::spawn(balancer.clone().follow_health(engine.subscribe()));
        for (front, _) in balancer.frontends() {
            tracing::info!(lb = %config.name, frontend = %front, protocol = %config.protocol, "load balancer listening");
        }
        load_balancers.push(balancer);
        frontends.push(orchestrator::Frontend::new(r, workers));
    }
    let databases = start_databases(&topology, &load_balancers, &events).await?;
    let scale_sets = start_scale_sets(&topology, &engine, &load_balancers, &events)?;
    let drills = orchestrator::Drills::new(sites(&topology, frontends, &scale_sets));
    events.follow(drills.events());
    tracing::info!(api = %addr, targets = count, scale_sets = scale_sets.len(), "tandem is up");
    let reload = api::Reload(Arc::new({
        let (file, sets) = (file.clone(), scale_sets.clone());
        move || reload(&file, &sets)
    }));
    tokio::spawn(reload_on_sighup(reload.clone()));
    let state = api::Api {
        engine: engine.clone(),
        dns,
        load_balancers,
        scale_sets: scale_sets.clone(),
        databases: databases.clone(),
        drills: Some(drills.clone()),
        reload: Some(reload),
        events,
    };
    if console {
        let names = topology.sites.iter().map(|s| s.name.to_string()).collect();
        tokio::spawn(crate::console::run(state.clone(), names));
    }
    api::serve(listener, state, shutdown_signal())
        .await
        .context("API server failed")?;
    for set in &scale_sets {
        set.shutdown().await;
    }
    for db in &databases {
        db.shutdown().await;
    }
    if let Some(mut s) = dns_server {
        s.stop();
    }
    drills.shutdown();
    engine.shutdown();
    tracing::info!("tandem stopped");
    Ok(())
}

/// What runs in each site, for drills.
fn sites(
    topology: &model::Topology,
    frontends: Vec<orchestrator::Frontend>,
    sets: &[Arc<scaleset::ScaleSet>],
) -> Vec<orchestrator::Site> {
    let mut sites: Vec<orchestrator::Site> = topology
        .sites
        .iter()
        .map(|s| orchestrator::Site {
            name: s.name.to_string(),
            frontends: Vec::new(),
            scale_sets: sets
                .iter()
                .filter(|set| set.site == s.name.as_str())
                .cloned()
                .collect(),
        })
        .collect();
    for f in frontends {
        if let Some(site) = sites
            .iter_mut()
            .find(|s| s.name == f.balancer.config.site.as_str())
        {
            site.frontends.push(f);
        }
    }
    sites
}

/// Starts every database: its members bootstrap or resume in the background; what can be
/// checked first (programs, addresses, data directories) fails `tandem up` here, touching
/// nothing.
async fn start_databases(
    topology: &model::Topology,
    balancers: &[Arc<lb::Balancer>],
    events: &api::EventLog,
) -> anyhow::Result<Vec<Arc<pg::Cluster>>> {
    if topology.databases.is_empty() {
        return Ok(Vec::new());
    }
    let state_dir = create_state_dir(topology)?;
    let path = state_dir.join("store.json");
    let store: Arc<dyn store::Store> = Arc::new(
        store::Embedded::open(&path)
            .with_context(|| format!("cannot open the coordination store {}", path.display()))?,
    );
    let mut out = Vec::new();
    for db in &topology.databases {
        let wiring = pg::Wiring::of(db, store.clone(), balancers);
        let cluster = pg::Cluster::start(db.clone(), wiring, state_dir.clone())
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        events.follow(cluster.events());
        out.push(cluster);
    }
    Ok(out)
}

fn create_state_dir(topology: &model::Topology) -> anyhow::Result<PathBuf> {
    let state_dir = &topology.tandem.state_dir;
    std::fs::create_dir_all(state_dir).with_context(|| {
        format!(
            "cannot create the state directory {} ([tandem] state_dir)",
            state_dir.display()
        )
    })?;
    Ok(state_dir.clone())
}

/// Starts every scale set, its instances feeding its load balancers' pools.
fn start_scale_sets(
    topology: &model::Topology,
    engine: &Arc<health::Engine>,
    balancers: &[Arc<lb::Balancer>],
    events: &api::EventLog,
) -> anyhow::Result<Vec<Arc<scaleset::ScaleSet>>> {
    if topology.scale_sets.is_empty() {
        return Ok(Vec::new());
    }
    let state_dir = &create_state_dir(topology)?;
    let driver: Arc<dyn scaleset::Driver> = Arc::new(scaleset::ProcessDriver {
        tandem: std::env::current_exe().ok(),
    });
    let mut sets = Vec::new();
    for config in &topology.scale_sets {
        let wiring = scaleset::runner::Wiring::of(config, topology, engine.clone(), balancers);
        let set = scaleset::ScaleSet::start(
            config.clone(),
            driver.clone(),
            wiring,
            scaleset::runner::Options::new(state_dir.clone()),
        );
        events.follow(set.events());
        sets.push(set);
    }
    Ok(sets)
}

/// Re-reads the topology and hands each scale set its new definition. Other changes need a
/// restart; the answer says so.
fn reload(file: &Path, sets: &[Arc<scaleset::ScaleSet>]) -> Result<Vec<String>, String> {
    let topology = match model::load_checked(file) {
        Ok(c) => {
            crate::log_warnings(&c.warnings);
            c.topology
        }
        Err(model::LoadError::Invalid(d)) => return Err(d.render()),
        Err(e) => return Err(e.to_string()),
    };
    let mut applied = Vec::new();
    for set in sets {
        match topology
            .scale_sets
            .iter()
            .find(|s| s.name.as_str() == set.name)
        {
            Some(config) => {
                set.reload(config.clone());
                applied.push(format!("scale set {}: reloaded", set.name));
            }
            None => applied.push(format!(
                "scale set {}: no longer in the file; removing it needs a restart",
                set.name
            )),
        }
    }
    for config in &topology.scale_sets {
        if !sets.iter().any(|s| s.name == config.name.as_str()) {
            applied.push(format!(
                "scale set {}: new; adding it needs a restart",
                config.name
            ));
        }
    }
    applied.push("other sections: unchanged until restart".into());
    tracing::info!(file = %file.display(), ?applied, "reloaded");
    Ok(applied)
}

async fn reload_on_sighup(reload: api::Reload) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    while hup.recv().await.is_some() {
        if let Err(e) = (reload.0)() {
            tracing::error!("reload failed; keeping the running topology:\n{e}");
        }
    }
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
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
