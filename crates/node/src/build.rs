//! Building a node: what the topology places on it, started in dependency order.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::{Config, Error, Node};

/// Something running that stops at shutdown. Every part of a node is one; the node stops them
/// in the order they are listed in [`Parts`], once.
pub trait Service: Send + Sync {
    fn name(&self) -> String;
    fn stop(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

/// Every part of a running node.
pub struct Parts {
    pub api: api::Api,
    /// In the order they stop.
    services: Vec<Box<dyn Service>>,
}

impl std::fmt::Debug for Parts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self.services.iter().map(|s| s.name()).collect();
        f.debug_struct("Parts").field("services", &names).finish()
    }
}

impl Parts {
    /// Stops every service, in order.
    pub async fn stop(self) {
        for s in &self.services {
            tracing::debug!(service = %s.name(), "stopping");
            s.stop().await;
        }
        tracing::info!("tandem stopped");
    }
}

struct Leave(Arc<cluster::Node>);
impl Service for Leave {
    fn name(&self) -> String {
        format!("cluster membership of {}", self.0.name())
    }
    fn stop(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            // Bounded: a node cut off from etcd still stops.
            let _ = tokio::time::timeout(Duration::from_secs(3), self.0.leave()).await;
        })
    }
}

struct AppService(Arc<orchestrator::AppRunner>);
impl Service for AppService {
    fn name(&self) -> String {
        format!("app {}", self.0.name)
    }
    fn stop(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        self.0.shutdown();
        Box::pin(async {})
    }
}

struct SetService(Arc<scaleset::ScaleSet>);
impl Service for SetService {
    fn name(&self) -> String {
        format!("scale set {}", self.0.name)
    }
    fn stop(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(self.0.shutdown())
    }
}

struct DbService(Arc<pg::Cluster>);
impl Service for DbService {
    fn name(&self) -> String {
        format!("database {}", self.0.name)
    }
    fn stop(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(self.0.shutdown())
    }
}

struct DnsService(std::sync::Mutex<Option<dns::server::Server>>);
impl Service for DnsService {
    fn name(&self) -> String {
        "DNS listeners".into()
    }
    fn stop(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        if let Some(mut s) = self.0.lock().unwrap_or_else(|p| p.into_inner()).take() {
            s.stop();
        }
        Box::pin(async {})
    }
}

struct DrillsService(Arc<orchestrator::Drills>);
impl Service for DrillsService {
    fn name(&self) -> String {
        "load balancer listeners".into()
    }
    fn stop(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        self.0.shutdown();
        Box::pin(async {})
    }
}

struct EngineService(Arc<health::Engine>);
impl Service for EngineService {
    fn name(&self) -> String {
        "probe engine".into()
    }
    fn stop(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        self.0.shutdown();
        Box::pin(async {})
    }
}

/// DNS health in cluster mode: the consensus of the live vantage points.
struct ClusterHealth {
    node: Arc<cluster::Node>,
    engine: Arc<health::Engine>,
}

impl dns::table::HealthView for ClusterHealth {
    fn status(&self, target: &str) -> Option<health::Status> {
        self.node.status(target)
    }
    fn latency(&self, target: &str) -> Option<Duration> {
        dns::table::HealthView::latency(&*self.engine, target)
    }
}

/// The probe targets every node votes on: the endpoints of monitored profiles.
fn shared_targets(t: &model::Topology) -> Vec<String> {
    health::targets(t)
        .into_iter()
        .filter(|x| x.id.starts_with("profile/"))
        .map(|x| x.id)
        .collect()
}

fn workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The coordination store: etcd in cluster mode; in-process otherwise (with its leases in
/// `STATE_DIR/store.json` when databases need them to survive a restart).
async fn open_store(config: &Config) -> Result<Arc<dyn store::Store>, Error> {
    let t = &config.topology;
    if let Some(c) = &t.cluster {
        return connect_etcd(c).await;
    }
    if t.databases.is_empty() {
        return Ok(Arc::new(store::Embedded::in_memory()));
    }
    let dir = create_state_dir(t)?;
    let path = dir.join("store.json");
    let s = store::Embedded::open(&path).map_err(|e| {
        Error::Start(format!(
            "cannot open the coordination store {}: {e}",
            path.display()
        ))
    })?;
    Ok(Arc::new(s))
}

/// Reads `[cluster] etcd_ca`, `etcd_cert` and `etcd_key`; `None` without TLS.
#[cfg(feature = "cluster")]
fn etcd_tls(t: &model::EtcdTls) -> Result<Option<store::EtcdTls>, Error> {
    let read = |key: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| {
            Error::Start(format!(
                "cannot read [cluster] {key} {}: {e}\n  help: {key} names a PEM file, relative to the working directory",
                path.display()
            ))
        })
    };
    let Some(ca) = &t.ca else { return Ok(None) };
    let identity = match (&t.cert, &t.key) {
        (Some(c), Some(k)) => Some((read("etcd_cert", c)?, read("etcd_key", k)?)),
        _ => None,
    };
    Ok(Some(store::EtcdTls {
        ca: read("etcd_ca", ca)?,
        identity,
    }))
}

#[cfg(feature = "cluster")]
async fn connect_etcd(c: &model::Cluster) -> Result<Arc<dyn store::Store>, Error> {
    let mut opts = store::EtcdOptions::new(c.etcd.clone(), &c.name, c.lease_ttl);
    opts.tls = etcd_tls(&c.etcd_tls)?;
    let etcd = store::Etcd::connect(opts)
        .await
        .map_err(|e| Error::Start(format!("{e}\n  help: check `etcd` in [cluster]")))?;
    // A node that cannot reach etcd still starts (isolated, serving from its own probes) and
    // joins when it can: a site must not stay dark because the store is.
    if let Err(why) = etcd.ready(JOIN_WAIT).await {
        tracing::error!(
            etcd = ?c.etcd,
            "cannot reach etcd within {JOIN_WAIT:?} ({why}); starting isolated, retrying; check `etcd` in [cluster]"
        );
    }
    Ok(etcd)
}

#[cfg(not(feature = "cluster"))]
async fn connect_etcd(_: &model::Cluster) -> Result<Arc<dyn store::Store>, Error> {
    Err(Error::Start(
        "this tandem was built without cluster mode\n  help: build it with `cargo install --path crates/tandem --locked --features cluster` (needs protoc: apt-get install protobuf-compiler)".into(),
    ))
}

fn create_state_dir(t: &model::Topology) -> Result<std::path::PathBuf, Error> {
    let dir = &t.tandem.state_dir;
    std::fs::create_dir_all(dir).map_err(|e| {
        Error::Start(format!(
            "cannot create the state directory {} ([tandem] state_dir): {e}",
            dir.display()
        ))
    })?;
    Ok(dir.clone())
}

/// How long a starting node waits for etcd before it starts isolated.
const JOIN_WAIT: Duration = Duration::from_secs(5);

pub(crate) async fn build(config: Config) -> Result<Node, Error> {
    let topology = Arc::new(config.topology.clone());
    let me = config
        .node
        .as_deref()
        .and_then(|n| topology.node(n))
        .cloned();
    let site = me.as_ref().map(|n| n.site.to_string());
    let runs = |s: &str| site.as_deref().is_none_or(|mine| mine == s);
    let api_addr = me.as_ref().map_or(topology.tandem.api, |n| n.api);
    let hash = cluster::topology_hash(config.text.as_bytes());
    let tokens = match &topology.tandem.tokens {
        Some(path) => Some(Arc::new(
            api::auth::Tokens::load(path, topology.tandem.open_reads).map_err(|e| {
                Error::Start(format!(
                    "{e}\n  help: [tandem] tokens names a TOML file of [[token]] name, role (read or admin), sha256"
                ))
            })?,
        )),
        None => None,
    };
    let tls = match &topology.tandem.tls {
        Some(t) => Some(Arc::new(
            api::tls::ApiTls::load(&t.cert, &t.key, t.ca.as_deref()).map_err(|e| {
                Error::Start(format!(
                    "{e}\n  help: [tandem] tls_cert, tls_key and tls_ca name PEM files, relative to the working directory"
                ))
            })?,
        )),
        None => None,
    };
    let store = open_store(&config).await?;

    // Probes: every monitored endpoint (each node is a vantage point) and the static backends
    // of the load balancers this node runs.
    let local_lbs: Vec<String> = topology
        .load_balancers
        .iter()
        .filter(|l| runs(&l.site))
        .map(|l| l.name.to_string())
        .collect();
    let targets: Vec<health::Target> = health::targets(&topology)
        .into_iter()
        .filter(|t| {
            t.id.starts_with("profile/")
                || local_lbs
                    .iter()
                    .any(|lb| t.id.starts_with(&format!("lb/{lb}/")))
        })
        .collect();
    let count = targets.len();
    let engine = Arc::new(
        health::Engine::start(targets, &topology.monitors, health::Options::default())
            .map_err(|e| Error::Start(format!("cannot start the probe engine: {e}")))?,
    );
    let events = api::EventLog::new(config.node.clone());
    // Events outlive a restart: in etcd in cluster mode, else beside the state the process
    // keeps anyway (databases, scale sets' logs).
    if me.is_none() && !(topology.databases.is_empty() && topology.scale_sets.is_empty()) {
        events.journal(create_state_dir(&topology)?.join("events.jsonl"));
    }
    events.follow(engine.events());
    let mut services: Vec<Box<dyn Service>> = Vec::new();

    let node = match (&me, &topology.cluster) {
        (Some(n), Some(c)) => {
            let cfg = cluster::Config {
                node: n.clone(),
                nodes: topology.nodes.clone(),
                cluster: c.clone(),
                topology_hash: hash.clone(),
                shared_targets: shared_targets(&topology),
            };
            let node = cluster::Node::join(store.clone(), cfg, engine.clone(), JOIN_WAIT)
                .await
                .map_err(|e| Error::Start(e.to_string()))?;
            events.follow(node.events());
            events.follow_remote(node.remote_events());
            node.record_events(events.subscribe_local());
            services.push(Box::new(Leave(node.clone())));
            Some(node)
        }
        _ => None,
    };
    // The API's address is bound after joining, so a second process started with the same
    // `--node` is told it is a duplicate rather than that the address is in use.
    let listener = match TcpListener::bind(api_addr).await {
        Ok(l) => l,
        Err(e) => {
            if let Some(n) = &node {
                n.leave().await;
            }
            let key = if me.is_some() {
                "its [[node]] api"
            } else {
                "[tandem] api"
            };
            return Err(Error::Start(format!(
                "cannot listen for the API on {api_addr} ({key}): {e}"
            )));
        }
    };
    let by = config.node.clone().unwrap_or_else(|| "local".into());
    let intents = cluster::Intents::start(store.clone(), &by);

    // DNS: the node's own listeners in cluster mode, `[dns] listen` otherwise.
    let listen = match (&me, &topology.dns) {
        (Some(n), Some(_)) => n.dns.clone(),
        (None, Some(d)) => d.listen.clone(),
        _ => Vec::new(),
    };
    let mut dns_manager = None;
    let mut dns_server = None;
    let mut dns_listen = Vec::new();
    // In cluster mode every node keeps the DNS tables, listeners or not: whichever node holds
    // the leader lease (a witness may) decides failback for the DNS nodes (`leader::run`).
    let serves = !listen.is_empty();
    if let Some(dns_config) = &topology.dns
        && (serves || node.is_some())
    {
        let health: Arc<dyn dns::table::HealthView + Send + Sync> = match &node {
            Some(n) => Arc::new(ClusterHealth {
                node: n.clone(),
                engine: engine.clone(),
            }),
            None => engine.clone(),
        };
        let manager = if serves {
            dns::manager::Manager::new(topology.clone(), health).map_err(Error::Start)?
        } else {
            dns::manager::Manager::deciding(topology.clone(), health)
        };
        tokio::spawn(manager.clone().run(changes(&engine, node.as_ref())));
        if serves {
            events.follow(manager.events());
            let rrl = &dns_config.rrl;
            let server = dns::server::Server::start_with(
                &listen,
                manager.tables(),
                manager.metrics.clone(),
                workers(),
                dns::server::TcpLimits::default(),
                rrl.enabled.then(|| dns::rrl::Limiter::new(rrl)),
            )
            .map_err(|e| Error::Start(format!("cannot start the DNS server: {e}")))?;
            for a in &server.addrs {
                tracing::info!(listen = %a, "DNS serving on udp and tcp");
            }
            dns_listen.clone_from(&server.addrs);
            dns_server = Some(server);
        }
        dns_manager = Some(manager);
    }

    // Load balancers of this node's sites, the database frontends among them.
    let mut load_balancers = Vec::new();
    let mut frontends = Vec::new();
    let db_frontends = topology
        .databases
        .iter()
        .flat_map(|d| d.frontend_balancers());
    for lb_config in topology
        .load_balancers
        .iter()
        .cloned()
        .chain(db_frontends)
        .filter(|l| runs(&l.site))
    {
        let balancer = lb::Balancer::new(lb_config.clone(), engine.clone());
        events.follow(balancer.events());
        let r = lb::Running::start(balancer.clone(), workers()).map_err(|e| {
            Error::Start(format!(
                "cannot start load balancer {} on {}: {e}",
                lb_config.name, lb_config.frontend
            ))
        })?;
        tokio::spawn(balancer.clone().follow_health(engine.subscribe()));
        for (front, _) in balancer.frontends() {
            tracing::info!(lb = %lb_config.name, frontend = %front, protocol = %lb_config.protocol, "load balancer listening");
        }
        load_balancers.push(balancer);
        frontends.push(orchestrator::Frontend::new(r, workers()));
    }
    let databases =
        start_databases(&topology, site.as_deref(), &store, &load_balancers, &events).await?;
    let scale_sets = start_scale_sets(&topology, &runs, &engine, &load_balancers, &events)?;
    let drills =
        orchestrator::Drills::new(sites(&topology, &runs, frontends, &scale_sets, &databases));
    events.follow(drills.events());

    let shared = node.as_ref().map(|n| orchestrator::app_shared::Shared {
        node: n.clone(),
        store: store.clone(),
        intents: intents.clone(),
        mirror: store::Mirror::start(store.clone(), store::keys::APPS),
        health: Arc::new(ClusterHealth {
            node: n.clone(),
            engine: engine.clone(),
        }),
    });
    let apps = start_apps(
        &topology,
        shared,
        &engine,
        &dns_manager,
        &databases,
        &scale_sets,
        &drills,
        &events,
    );

    // Stop order: leave the cluster, apps (so nothing moves while the tiers stop), instances,
    // databases, DNS, load balancers, probes.
    for a in &apps {
        services.push(Box::new(AppService(a.clone())));
    }
    for s in &scale_sets {
        services.push(Box::new(SetService(s.clone())));
    }
    for d in &databases {
        services.push(Box::new(DbService(d.clone())));
    }
    services.push(Box::new(DnsService(std::sync::Mutex::new(dns_server))));
    services.push(Box::new(DrillsService(drills.clone())));
    services.push(Box::new(EngineService(engine.clone())));

    let reload = crate::reload::Reloader::new(&config, hash.clone());
    let api = api::Api {
        topology: topology.clone(),
        node: node.clone(),
        site: site.clone(),
        store: store.clone(),
        topology_hash: hash,
        engine: engine.clone(),
        dns: dns_manager.clone(),
        dns_listen,
        load_balancers,
        scale_sets,
        databases,
        drills,
        apps,
        intents: intents.clone(),
        tokens,
        tls,
        reload: Some(reload.hook()),
        events,
    };
    let mut tasks = vec![tokio::spawn(crate::apply::run(api.clone(), reload)).abort_handle()];
    if let (Some(n), Some(m)) = (&node, &dns_manager) {
        tasks.push(tokio::spawn(crate::leader::run(n.clone(), m.clone())).abort_handle());
    }
    tracing::info!(
        api = %api_addr,
        node = config.node.as_deref().unwrap_or("(single process)"),
        targets = count,
        scale_sets = api.scale_sets.len(),
        "tandem is up"
    );
    Ok(Node {
        parts: crate::Parts { api, services },
        listener,
        tasks,
    })
}

/// What the DNS tables depend on: the engine's changes, and in cluster mode the votes, nodes,
/// decisions and isolation.
fn changes(
    engine: &health::Engine,
    node: Option<&Arc<cluster::Node>>,
) -> tokio::sync::watch::Receiver<u64> {
    let Some(node) = node else {
        return engine.subscribe();
    };
    let (tx, rx) = tokio::sync::watch::channel(0u64);
    let (mut a, mut b) = (engine.subscribe(), node.subscribe());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                r = a.changed() => if r.is_err() { return },
                r = b.changed() => if r.is_err() { return },
            }
            tx.send_modify(|v| *v += 1);
        }
    });
    rx
}

/// What runs in each of this node's sites, for drills.
fn sites(
    topology: &model::Topology,
    runs: &dyn Fn(&str) -> bool,
    frontends: Vec<orchestrator::Frontend>,
    sets: &[Arc<scaleset::ScaleSet>],
    databases: &[Arc<pg::Cluster>],
) -> Vec<orchestrator::Site> {
    let mut sites: Vec<orchestrator::Site> = topology
        .sites
        .iter()
        .filter(|s| runs(&s.name))
        .map(|s| orchestrator::Site {
            name: s.name.to_string(),
            frontends: Vec::new(),
            scale_sets: sets
                .iter()
                .filter(|set| set.site == s.name.as_str())
                .cloned()
                .collect(),
            databases: databases
                .iter()
                .filter(|d| d.sites.iter().any(|m| m == s.name.as_str()))
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

/// The sites whose member of database `db` is a cold standby: every site but the preferred
/// one of an app with `standby = "cold"` on that database.
fn cold_sites(topology: &model::Topology, db: &model::Name) -> Vec<String> {
    topology
        .apps
        .iter()
        .filter(|a| a.standby == model::Standby::Cold && a.database.as_ref() == Some(db))
        .flat_map(|a| a.sites.iter().skip(1).map(ToString::to_string))
        .collect()
}

/// Starts every database: its members bootstrap or resume in the background; what can be
/// checked first (programs, addresses, data directories) fails here, touching nothing. In
/// cluster mode (`here`: the node's site) a node runs its site's members and follows the
/// others through the store, for each database with a member or a frontend in its site.
async fn start_databases(
    topology: &model::Topology,
    here: Option<&str>,
    store: &Arc<dyn store::Store>,
    balancers: &[Arc<lb::Balancer>],
    events: &api::EventLog,
) -> Result<Vec<Arc<pg::Cluster>>, Error> {
    let placed = |db: &&model::Database| {
        here.is_none_or(|site| {
            db.members.iter().any(|m| m.site.as_str() == site)
                || db.frontends.iter().any(|f| f.site.as_str() == site)
        })
    };
    let databases: Vec<&model::Database> = topology.databases.iter().filter(placed).collect();
    if databases.is_empty() {
        return Ok(Vec::new());
    }
    let state_dir = create_state_dir(topology)?;
    let mut out = Vec::new();
    for db in databases {
        let mut wiring =
            pg::Wiring::of(db, store.clone(), balancers).with_cold(cold_sites(topology, &db.name));
        if let Some(site) = here {
            wiring = wiring.on_node(vec![site.to_string()]);
        }
        let cluster = pg::Cluster::start(db.clone(), wiring, state_dir.clone())
            .await
            .map_err(|e| Error::Start(e.to_string()))?;
        events.follow(cluster.events());
        out.push(cluster);
    }
    Ok(out)
}

/// Starts every `[[app]]`: in the single-process mode this process runs every tier of every
/// site and drives it; in cluster mode (`shared`) every node follows the app, reports on its
/// own site's part and the leader drives it ([`orchestrator::app_shared`]).
#[allow(clippy::too_many_arguments)]
fn start_apps(
    topology: &Arc<model::Topology>,
    shared: Option<orchestrator::app_shared::Shared>,
    engine: &Arc<health::Engine>,
    dns: &Option<Arc<dns::manager::Manager>>,
    databases: &[Arc<pg::Cluster>],
    scale_sets: &[Arc<scaleset::ScaleSet>],
    drills: &Arc<orchestrator::Drills>,
    events: &api::EventLog,
) -> Vec<Arc<orchestrator::AppRunner>> {
    topology
        .apps
        .iter()
        .map(|a| {
            let tiers = orchestrator::Tiers {
                topology: topology.clone(),
                engine: engine.clone(),
                dns: dns.clone(),
                database: a
                    .database
                    .as_ref()
                    .and_then(|d| databases.iter().find(|c| c.name == d.as_str()).cloned()),
                scale_sets: scale_sets
                    .iter()
                    .filter(|s| a.scale_sets.iter().any(|n| n.as_str() == s.name))
                    .cloned()
                    .collect(),
                drills: drills.clone(),
                state_dir: Some(topology.tandem.state_dir.clone()),
                shared: shared.clone(),
            };
            let runner = orchestrator::AppRunner::start(a.clone(), tiers);
            events.follow(runner.events());
            runner
        })
        .collect()
}

/// Starts this node's scale sets, their instances feeding its load balancers' pools.
fn start_scale_sets(
    topology: &model::Topology,
    runs: &dyn Fn(&str) -> bool,
    engine: &Arc<health::Engine>,
    balancers: &[Arc<lb::Balancer>],
    events: &api::EventLog,
) -> Result<Vec<Arc<scaleset::ScaleSet>>, Error> {
    let local: Vec<&model::ScaleSet> = topology
        .scale_sets
        .iter()
        .filter(|s| runs(&s.site))
        .collect();
    if local.is_empty() {
        return Ok(Vec::new());
    }
    let state_dir = create_state_dir(topology)?;
    let driver: Arc<dyn scaleset::Driver> = Arc::new(scaleset::ProcessDriver {
        tandem: std::env::current_exe().ok(),
    });
    let mut sets = Vec::new();
    for config in local {
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
