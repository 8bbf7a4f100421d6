//! The REST API of a node: what it runs, what the cluster looks like from it, and operator
//! actions, which are stored as intent (see `cluster::intent`) and applied by the node that
//! runs what they name. Requests and responses are the types of [`types`], shared with the CLI.
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/healthz` | `ok` while Tandem runs |
//! | GET | `/v1/cluster` | mode, this node, its site, the leader, isolation, the store, the topology's hash |
//! | GET | `/v1/nodes` | every node of the topology, alive or gone and since when |
//! | GET | `/v1/health` | every probe target; in cluster mode with each live node's vote and the consensus |
//! | GET | `/v1/profiles` | every DNS profile: endpoints, states, the answer now |
//! | POST | `/v1/profiles/{profile}/endpoints/{endpoint}/disable` | stop answering (and probing) an endpoint, on every node |
//! | POST | `/v1/profiles/{profile}/endpoints/{endpoint}/enable` | answer it again |
//! | GET | `/v1/load-balancers` | every load balancer of every live node: frontends, backends, counters |
//! | POST | `/v1/load-balancers/{lb}/backends/{address}/drain` | stop new flows, drain the rest |
//! | POST | `/v1/load-balancers/{lb}/backends/{address}/enable` | take new flows again |
//! | GET | `/v1/scale-sets` | every scale set of every live node, with its instances |
//! | POST | `/v1/scale-sets/{set}/scale` | `{"capacity": N}` |
//! | GET | `/v1/databases` | every database: primary, term, members with role, LSNs, lag |
//! | POST | `/v1/databases/{db}/switchover` | `{"to": SITE}`: planned handover, no data loss |
//! | GET | `/v1/databases/{db}/backups` | the backups in the repository, the WAL archive, the schedule, the last drill |
//! | POST | `/v1/databases/{db}/backups` | `{"type": "full"\|"diff"\|"incr"}`: a backup now; answers when it is done |
//! | POST | `/v1/databases/{db}/backups/verify` | `pgbackrest verify` of the repository |
//! | POST | `/v1/databases/{db}/restore` | `{"site": SITE, "to": TIME}` (`to` optional): the database back to a point in time, SITE's member its primary |
//! | POST | `/v1/databases/{db}/restore-drill` | `{"to": TIME}` (optional): restore into a scratch copy, count, measure RTO and RPO |
//! | GET | `/v1/apps` | every app: active site, term, each site's health, data and capacity, the move under way, what failback waits for, the last move |
//! | GET | `/v1/apps/{app}` | one app, as in `/v1/apps` |
//! | GET | `/v1/apps/{app}/plan?to=SITE` | the steps a move to `SITE` would take now, without starting it |
//! | POST | `/v1/apps/{app}/failover` | `{"to": SITE}`: move the whole app there now (planned: switchover, scale, DNS) |
//! | POST | `/v1/apps/{app}/failback` | back to the preferred site, refused until its data has caught up |
//! | POST | `/v1/apps/{app}/pin` | `{"site": SITE}`: stay there (moving first if needed); no automatic moves |
//! | POST | `/v1/apps/{app}/unpin` | automatic moves again |
//! | POST | `/v1/apps/{app}/drill` | start a failover and failback with clients on the app's public entry; the report comes in `GET /v1/apps` (`last_drill`) |
//! | POST | `/v1/reload` | re-read the topology file on every node; what changed and what applies now |
//! | GET | `/v1/drills` | the drill in progress |
//! | POST | `/v1/drills/outage` | `{"site": S, "for": "60s"}`: a whole site goes dark, then returns |
//! | POST | `/v1/drills/stop` | end the drill now |
//! | GET | `/v1/events` | the last 1,000 events of every node |
//! | GET | `/v1/events/stream` | every event from now on, live, as Server-Sent Events ([`stream`]) |
//! | GET | `/metrics` | Prometheus exposition |
//! | GET | `/`, `/assets/…` | the dashboard ([`dashboard`]), without a token; it reads the API with one |
//!
//! Reads of things other nodes run (`load-balancers`, `scale-sets`, `databases`) ask every live
//! node (`?scope=local` asks only the one answering) and list the nodes that did not answer.

pub mod auth;
pub mod dashboard;
pub mod limit;
pub mod metrics;
pub mod peers;
pub mod stream;
pub mod tls;
pub mod types;

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{MethodRouter, get, post};
use dns::manager::Manager;
pub use event::{Event, Source};
use health::Engine;
use model::Topology;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::broadcast;

use types::*;

/// How many recent events `/v1/events` keeps.
pub const EVENT_LOG_SIZE: usize = 1000;
/// How long an operator action waits for this node to apply it before answering.
pub const APPLY_WAIT: Duration = Duration::from_secs(3);

#[derive(Debug)]
struct Log {
    /// In time order, each with its sequence number.
    events: VecDeque<Numbered>,
    /// The sequence number of the last event recorded (0: none yet).
    last: u64,
}

impl Log {
    /// Keeps `event` (numbered next) in time order, dropping the oldest beyond
    /// [`EVENT_LOG_SIZE`].
    fn insert(&mut self, event: Event) -> Numbered {
        self.last += 1;
        let n = Numbered {
            seq: self.last,
            event,
        };
        if self.events.len() == EVENT_LOG_SIZE {
            self.events.pop_front();
        }
        // Other nodes' events arrive a little late: keep the log in time order.
        let at = self.events.partition_point(|x| x.event.at <= n.event.at);
        self.events.insert(at, n.clone());
        n
    }
}

/// An event with its sequence number in this process's [`EventLog`]: 1 for the first event
/// recorded (or loaded from the journal) after the process started, one more for each next
/// one, whatever node it comes from. Numbers are only meaningful with the log's
/// [`EventLog::epoch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Numbered {
    pub seq: u64,
    pub event: Event,
}

/// The most recent events of every node, oldest first, and every new one as it is recorded.
/// Events raised here are stamped with this node's name.
#[derive(Clone, Debug)]
pub struct EventLog {
    log: Arc<Mutex<Log>>,
    node: Option<String>,
    /// When this log was made, in milliseconds since the Unix epoch: sequence numbers restart
    /// with every process, and this tells one run's numbers from another's.
    epoch: u64,
    all: broadcast::Sender<Event>,
    local: broadcast::Sender<Event>,
    /// Every event with its sequence number, sent in sequence order.
    numbered: broadcast::Sender<Numbered>,
    /// Set when the API shuts down: live streams end.
    closing: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Default for EventLog {
    fn default() -> Self {
        Self::new(None)
    }
}

impl EventLog {
    /// A log for `node` (cluster mode) or for the single process.
    pub fn new(node: Option<String>) -> Self {
        let epoch = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        EventLog {
            log: Arc::new(Mutex::new(Log {
                events: VecDeque::with_capacity(EVENT_LOG_SIZE),
                last: 0,
            })),
            node,
            epoch,
            all: broadcast::Sender::new(1024),
            local: broadcast::Sender::new(1024),
            numbered: broadcast::Sender::new(1024),
            closing: Arc::new(tokio::sync::watch::Sender::new(false)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// When this log was made (milliseconds since the Unix epoch): the run its sequence
    /// numbers belong to.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The sequence number of the last event recorded (0: none yet), and every event recorded
    /// after it, numbered, as it is recorded. Taken together, so nothing falls between.
    pub fn subscribe_numbered(&self) -> (u64, broadcast::Receiver<Numbered>) {
        let log = self.lock();
        (log.last, self.numbered.subscribe())
    }

    /// The events still in the log whose sequence number is above `seq`, in sequence order.
    pub fn since(&self, seq: u64) -> Vec<Numbered> {
        let log = self.lock();
        let mut out: Vec<Numbered> = log.events.iter().filter(|n| n.seq > seq).cloned().collect();
        out.sort_by_key(|n| n.seq);
        out
    }

    /// Ends every live stream of this log (`/v1/events/stream`): the API is shutting down.
    pub fn close_streams(&self) {
        self.closing.send_replace(true);
    }

    /// Completes once [`EventLog::close_streams`] has been called.
    pub async fn closed(&self) {
        let mut rx = self.closing.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }

    /// Every event recorded from now on, of any node.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.all.subscribe()
    }

    /// This node's own events from now on (to write them to the store).
    pub fn subscribe_local(&self) -> broadcast::Receiver<Event> {
        self.local.subscribe()
    }

    /// Records every event of a part of this node until its channel closes.
    pub fn follow(&self, rx: broadcast::Receiver<Event>) {
        self.forward(rx, true);
    }

    /// Records events of other nodes (already stamped with theirs).
    pub fn follow_remote(&self, rx: broadcast::Receiver<Event>) {
        self.forward(rx, false);
    }

    fn forward(&self, mut rx: broadcast::Receiver<Event>, local: bool) {
        let sink = self.clone();
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(e) => sink.push(e, local),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "event log fell behind");
                    }
                    Err(_) => return,
                }
            }
        });
    }

    /// Records one event of this node now.
    pub fn record(&self, e: Event) {
        self.push(e, true);
    }

    fn push(&self, mut e: Event, local: bool) {
        if local && e.node.is_none() {
            e.node.clone_from(&self.node);
        }
        {
            let mut log = self.lock();
            let n = log.insert(e.clone());
            // Sent under the lock: streams see sequence numbers in order.
            let _ = self.numbered.send(n);
        }
        if local {
            let _ = self.local.send(e.clone());
        }
        let _ = self.all.send(e);
    }

    /// The single-process default's stand-in for the store's event records (cluster mode
    /// keeps them in etcd): this process's events as JSON lines in `path`, so they outlive a
    /// restart. What the file holds is loaded first (the last [`EVENT_LOG_SIZE`]); every
    /// event recorded from now on is appended, and the file is cut back to the last
    /// [`EVENT_LOG_SIZE`] whenever it has twice as many. Unreadable lines are skipped; a
    /// file that cannot be written is logged once and the log works on without it.
    pub fn journal(&self, path: std::path::PathBuf) {
        let old: Vec<Event> = std::fs::read_to_string(&path)
            .map(|t| {
                t.lines()
                    .filter_map(|l| serde_json::from_str(l).ok())
                    .collect()
            })
            .unwrap_or_default();
        let kept = &old[old.len().saturating_sub(EVENT_LOG_SIZE)..];
        {
            let mut log = self.lock();
            for e in kept {
                log.insert(e.clone());
            }
        }
        let mut rx = self.local.subscribe();
        let mut lines = kept.len();
        let mut last: VecDeque<Event> = kept.iter().cloned().collect();
        tokio::spawn(async move {
            let mut warned = false;
            if lines < old.len() {
                warned |= rewrite(&path, &last, warned);
            }
            loop {
                let e = match rx.recv().await {
                    Ok(e) => e,
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => return,
                };
                if last.len() == EVENT_LOG_SIZE {
                    last.pop_front();
                }
                last.push_back(e.clone());
                lines += 1;
                if lines >= 2 * EVENT_LOG_SIZE {
                    warned |= rewrite(&path, &last, warned);
                    lines = last.len();
                } else if let Err(err) = append(&path, &e)
                    && !warned
                {
                    warned = true;
                    tracing::warn!(file = %path.display(), "cannot keep events across restarts: {err}");
                }
            }
        });
    }

    /// Every event in the log, oldest first.
    pub fn snapshot(&self) -> Vec<Event> {
        let log = self.lock();
        log.events.iter().map(|n| n.event.clone()).collect()
    }
}

/// One event as a line at the end of the journal.
fn append(path: &std::path::Path, e: &Event) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut line = serde_json::to_vec(e).map_err(std::io::Error::other)?;
    line.push(b'\n');
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?
        .write_all(&line)
}

/// The journal written anew with `events` (a temporary file renamed over it); true when that
/// failed and was logged.
fn rewrite(path: &std::path::Path, events: &VecDeque<Event>, warned: bool) -> bool {
    let mut text = Vec::new();
    for e in events {
        if let Ok(mut line) = serde_json::to_vec(e) {
            line.push(b'\n');
            text.extend(line);
        }
    }
    let tmp = path.with_extension("jsonl.tmp");
    let done = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, path));
    match done {
        Ok(()) => false,
        Err(err) => {
            if !warned {
                tracing::warn!(file = %path.display(), "cannot keep events across restarts: {err}");
            }
            true
        }
    }
}

/// The outcome of reading the topology file again, before anything is applied.
#[derive(Clone, Debug)]
pub struct ReloadPlan {
    /// SHA-256 of the new file.
    pub hash: String,
    pub response: ReloadResponse,
}

/// A topology file that cannot be reloaded: the reason, and its diagnostics when invalid.
#[derive(Clone, Debug)]
pub struct ReloadRefused {
    pub message: String,
    pub diagnostics: Option<String>,
}

/// Reads the topology file again and says what would change; the node applies it when the
/// reload intent reaches it.
#[derive(Clone)]
pub struct Reload(pub Arc<dyn Fn() -> Result<ReloadPlan, ReloadRefused> + Send + Sync>);

impl std::fmt::Debug for Reload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reload")
    }
}

/// What the handlers read and act on.
#[derive(Clone, Debug)]
pub struct Api {
    pub topology: Arc<Topology>,
    /// This node in cluster mode; `None` in the single-process default.
    pub node: Option<Arc<cluster::Node>>,
    /// The site this process runs; `None`: every site.
    pub site: Option<String>,
    pub store: Arc<dyn store::Store>,
    /// SHA-256 of the topology file this process runs.
    pub topology_hash: String,
    pub engine: Arc<Engine>,
    pub dns: Option<Arc<Manager>>,
    /// Where DNS listens (UDP and TCP), as bound (a port 0 resolved).
    pub dns_listen: Vec<std::net::SocketAddr>,
    pub load_balancers: Vec<Arc<lb::Balancer>>,
    pub scale_sets: Vec<Arc<scaleset::ScaleSet>>,
    pub databases: Vec<Arc<pg::Cluster>>,
    pub drills: Arc<orchestrator::Drills>,
    /// Every `[[app]]` (in cluster mode every node runs them; the leader drives them).
    pub apps: Vec<Arc<orchestrator::AppRunner>>,
    pub intents: Arc<cluster::Intents>,
    pub reload: Option<Reload>,
    pub events: EventLog,
    /// Bearer tokens with roles (`[tandem] tokens`); `None`: the API is open.
    pub tokens: Option<Arc<auth::Tokens>>,
    /// TLS (`[tandem] tls_cert`, `tls_key`, `tls_ca`): the API serves HTTPS only and asks
    /// other nodes over HTTPS; `None`: plain HTTP.
    pub tls: Option<Arc<tls::ApiTls>>,
}

impl Api {
    /// Whether this process runs `site`.
    pub fn runs(&self, site: &str) -> bool {
        self.site.as_deref().is_none_or(|s| s == site)
    }

    fn node_name(&self) -> Option<String> {
        self.node.as_ref().map(|n| n.name().to_string())
    }

    /// The node that runs `site`, when it is another one.
    fn owner_of(&self, site: &str) -> Option<String> {
        if self.runs(site) {
            return self.node_name();
        }
        self.topology
            .nodes
            .iter()
            .find(|n| n.site.as_str() == site)
            .map(|n| n.name.to_string())
    }

    fn placed<T>(&self, view: T) -> Placed<T> {
        Placed {
            node: self.node_name(),
            view,
        }
    }
}

/// Every route of the API: its method, its path pattern (axum's `{param}` syntax) and its
/// handler. [`router`] is built from this list, so a test can walk all of it and no route
/// escapes the token check.
pub fn routes() -> Vec<(Method, &'static str, MethodRouter<Api>)> {
    vec![
        (Method::GET, "/healthz", get(|| async { "ok\n" })),
        (Method::GET, "/v1/cluster", get(cluster_view)),
        (Method::GET, "/v1/nodes", get(nodes)),
        (Method::GET, "/v1/health", get(health_targets)),
        (Method::GET, "/v1/profiles", get(profiles)),
        (
            Method::POST,
            "/v1/profiles/{profile}/endpoints/{endpoint}/{action}",
            post(endpoint_action),
        ),
        (Method::GET, "/v1/load-balancers", get(load_balancers)),
        (
            Method::POST,
            "/v1/load-balancers/{lb}/backends/{address}/{action}",
            post(backend_action),
        ),
        (Method::GET, "/v1/scale-sets", get(scale_sets)),
        (Method::POST, "/v1/scale-sets/{set}/scale", post(scale)),
        (Method::GET, "/v1/databases", get(databases)),
        (
            Method::POST,
            "/v1/databases/{db}/switchover",
            post(switchover),
        ),
        (Method::GET, "/v1/databases/{db}/backups", get(backups_list)),
        (Method::POST, "/v1/databases/{db}/backups", post(backup_now)),
        (
            Method::POST,
            "/v1/databases/{db}/backups/verify",
            post(backup_verify),
        ),
        (
            Method::POST,
            "/v1/databases/{db}/restore-drill",
            post(restore_drill),
        ),
        (Method::POST, "/v1/databases/{db}/restore", post(restore)),
        (Method::GET, "/v1/apps", get(apps)),
        (Method::GET, "/v1/apps/{app}", get(app_view)),
        (Method::GET, "/v1/apps/{app}/plan", get(app_plan)),
        (Method::POST, "/v1/apps/{app}/drill", post(app_drill)),
        (Method::POST, "/v1/apps/{app}/{action}", post(app_action)),
        (Method::POST, "/v1/reload", post(reload)),
        (Method::GET, "/v1/drills", get(drills)),
        (Method::POST, "/v1/drills/outage", post(outage)),
        (Method::POST, "/v1/drills/stop", post(stop_drill)),
        (Method::GET, "/v1/events", get(events)),
        (Method::GET, "/v1/events/stream", get(stream::events_stream)),
        (Method::GET, "/", get(dashboard::index)),
        (Method::GET, "/assets/{*path}", get(dashboard::asset)),
        (Method::GET, "/metrics", get(metrics)),
    ]
}

/// The API's routes ([`routes`]) behind the token check ([`auth::authorize`]).
pub fn router(api: Api) -> Router {
    routes()
        .into_iter()
        .fold(Router::new(), |r, (_, path, handler)| {
            r.route(path, handler)
        })
        .layer(axum::middleware::from_fn_with_state(
            api.clone(),
            auth::authorize,
        ))
        .with_state(api)
}

/// Serves the API on `listener` until `shutdown` completes, over TLS when `api.tls` is set,
/// within the default [`limit::Limits`]; then live event streams end, and the requests in
/// progress are finished.
pub async fn serve(
    listener: TcpListener,
    api: Api,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with_limits(listener, api, limit::Limits::default(), shutdown).await
}

/// As [`serve`], with connection limits of one's own.
pub async fn serve_with_limits(
    listener: TcpListener,
    api: Api,
    limits: limit::Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let events = api.events.clone();
    let shutdown = async move {
        shutdown.await;
        events.close_streams();
    };
    match api.tls.clone() {
        Some(tls) => {
            let listener = tls::TlsListener::new(listener, tls.server.clone(), limits);
            axum::serve(listener, router(api))
                .with_graceful_shutdown(shutdown)
                .await
        }
        None => {
            axum::serve(limit::Slots::new(listener, limits), router(api))
                .with_graceful_shutdown(shutdown)
                .await
        }
    }
}

fn error(status: StatusCode, field: &str, message: impl Into<String>) -> Response {
    let body = ErrorResponse {
        error: message.into(),
        field: field.into(),
        diagnostics: None,
    };
    (status, Json(body)).into_response()
}

fn unavailable(e: store::StoreError) -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "store",
        format!("cannot record the request: {e}"),
    )
}

/// `?scope=local`: only this node, not the cluster.
#[derive(Debug, Default, Deserialize)]
struct Scope {
    #[serde(default)]
    scope: Option<String>,
}

impl Scope {
    fn local(&self) -> bool {
        self.scope.as_deref() == Some("local")
    }
}

async fn cluster_view(State(api): State<Api>) -> Json<ClusterResponse> {
    let store = api.store.connection().borrow().clone();
    Json(ClusterResponse {
        mode: if api.node.is_some() {
            "cluster"
        } else {
            "single-process"
        }
        .into(),
        node: api.node_name(),
        site: api.site.clone(),
        leader: api.node.as_ref().map(|n| n.leadership()),
        isolation: api.node.as_ref().map(|n| n.isolation()),
        store,
        topology: api.topology_hash.clone(),
        cluster_topology: api.node.as_ref().and_then(|n| n.cluster_hash()),
        sites: api
            .topology
            .sites
            .iter()
            .map(|s| SiteView {
                name: s.name.to_string(),
                role: s.role.as_str().into(),
            })
            .collect(),
    })
}

async fn nodes(State(api): State<Api>) -> Json<NodesResponse> {
    Json(NodesResponse {
        nodes: api.node.as_ref().map(|n| n.nodes()).unwrap_or_default(),
    })
}

async fn health_targets(State(api): State<Api>) -> Json<HealthResponse> {
    let targets = api
        .engine
        .reports()
        .into_iter()
        .map(|report| match &api.node {
            Some(n) if n.config().shared_targets.contains(&report.target) => TargetView {
                consensus: n.status(&report.target),
                votes: n.votes(&report.target),
                report,
            },
            _ => TargetView {
                consensus: Some(report.status),
                votes: Vec::new(),
                report,
            },
        })
        .collect();
    Json(HealthResponse { targets })
}

async fn profiles(State(api): State<Api>) -> Json<ProfilesResponse> {
    let profiles = api.dns.as_ref().map(|d| d.views()).unwrap_or_default();
    Json(ProfilesResponse { profiles })
}

async fn endpoint_action(
    State(api): State<Api>,
    Path((profile, endpoint, action)): Path<(String, String, String)>,
) -> Response {
    let enabled = match action.as_str() {
        "enable" => true,
        "disable" => false,
        other => {
            return error(
                StatusCode::NOT_FOUND,
                "action",
                format!("unknown action {other:?}: use enable or disable"),
            );
        }
    };
    let Some(p) = api.topology.profile(&profile) else {
        return error(
            StatusCode::NOT_FOUND,
            "profile",
            format!("no profile {profile:?}"),
        );
    };
    if !p.endpoints.iter().any(|e| e.name.as_str() == endpoint) {
        return error(
            StatusCode::NOT_FOUND,
            "endpoint",
            format!("profile {profile:?} has no endpoint {endpoint:?}"),
        );
    }
    let revision = match api.intents.set_endpoint(&profile, &endpoint, enabled).await {
        Ok(r) => r,
        Err(e) => return unavailable(e),
    };
    // Every node answers and probes every endpoint: this one applies it too.
    let applied_here = api.intents.applied(revision, APPLY_WAIT).await;
    tracing::info!(%profile, %endpoint, enabled, "endpoint switched by operator");
    let view = api
        .dns
        .as_ref()
        .and_then(|d| d.views().into_iter().find(|p| p.name == profile));
    Json(IntentResponse {
        view,
        applies_on: None,
        applied_here,
        warnings: Vec::new(),
    })
    .into_response()
}

/// Every load balancer of the topology, the database frontends included.
fn balancer_site(topology: &Topology, name: &str) -> Option<String> {
    topology
        .load_balancers
        .iter()
        .cloned()
        .chain(
            topology
                .databases
                .iter()
                .flat_map(|d| d.frontend_balancers()),
        )
        .find(|l| l.name.as_str() == name)
        .map(|l| l.site.to_string())
}

async fn load_balancers(
    State(api): State<Api>,
    Query(q): Query<Scope>,
) -> Json<LoadBalancersResponse> {
    let mut load_balancers: Vec<Placed<lb::View>> = api
        .load_balancers
        .iter()
        .map(|b| api.placed(b.view()))
        .collect();
    let mut unreachable = Vec::new();
    if !q.local() {
        let (more, missing) =
            peers::gather::<LoadBalancersResponse>(&api, "/v1/load-balancers?scope=local").await;
        load_balancers.extend(more.into_iter().flat_map(|r| r.load_balancers));
        unreachable = missing;
    }
    Json(LoadBalancersResponse {
        load_balancers,
        unreachable,
    })
}

async fn backend_action(
    State(api): State<Api>,
    Path((name, address, action)): Path<(String, String, String)>,
) -> Response {
    let Some(site) = balancer_site(&api.topology, &name) else {
        return error(
            StatusCode::NOT_FOUND,
            "lb",
            format!("no load balancer {name:?}"),
        );
    };
    let Ok(addr) = address.parse() else {
        return error(
            StatusCode::BAD_REQUEST,
            "address",
            format!("{address:?} is not an ip:port address"),
        );
    };
    let draining = match action.as_str() {
        "drain" => true,
        "enable" => false,
        other => {
            return error(
                StatusCode::NOT_FOUND,
                "action",
                format!("unknown action {other:?}: use drain or enable"),
            );
        }
    };
    let local = api
        .load_balancers
        .iter()
        .find(|b| b.config.name.as_str() == name)
        .cloned();
    let mut warnings = Vec::new();
    // Run elsewhere: a drain names a backend its node lists (an enable only clears an intent).
    if local.is_none() && draining {
        match remote_backends(&api, &name).await {
            Some(backends) if !backends.contains(&addr) => {
                let list: Vec<String> = backends.iter().map(ToString::to_string).collect();
                return error(
                    StatusCode::NOT_FOUND,
                    "address",
                    format!(
                        "load balancer {name:?} has no backend {addr} (its backends: {})",
                        if list.is_empty() { "none".into() } else { list.join(", ") }
                    ),
                );
            }
            Some(_) => {}
            None => warnings.push(format!(
                "{addr} not checked: no node running {name} answered; the drain applies if it is one of its backends"
            )),
        }
    }
    if let Some(b) = &local {
        let view = b.view();
        if !view.backends.iter().any(|x| x.address == addr) {
            return error(
                StatusCode::NOT_FOUND,
                "address",
                format!("load balancer {name:?} has no backend {addr}"),
            );
        }
        let others = view
            .backends
            .iter()
            .filter(|x| x.address != addr && x.takes_new_flows)
            .count();
        if draining && others == 0 {
            warnings.push(format!(
                "{addr} was the last backend of {name} taking new flows: new flows are now refused (all_down = {})",
                b.config.all_down
            ));
        }
    }
    let revision = match api.intents.set_draining(&name, addr, draining).await {
        Ok(r) => r,
        Err(e) => return unavailable(e),
    };
    let applied_here = local.is_some() && api.intents.applied(revision, APPLY_WAIT).await;
    Json(IntentResponse {
        view: local.map(|b| b.view()),
        applies_on: api.owner_of(&site),
        applied_here,
        warnings,
    })
    .into_response()
}

/// The backends of load balancer `name` as the node running it lists them; `None` when no
/// node that answered runs it.
async fn remote_backends(api: &Api, name: &str) -> Option<Vec<std::net::SocketAddr>> {
    let (answers, _) =
        peers::gather::<LoadBalancersResponse>(api, "/v1/load-balancers?scope=local").await;
    answers
        .into_iter()
        .flat_map(|r| r.load_balancers)
        .find(|b| b.view.name == name)
        .map(|b| b.view.backends.iter().map(|x| x.address).collect())
}

async fn scale_sets(State(api): State<Api>, Query(q): Query<Scope>) -> Json<ScaleSetsResponse> {
    let mut scale_sets: Vec<Placed<scaleset::View>> = api
        .scale_sets
        .iter()
        .map(|s| api.placed(s.view()))
        .collect();
    let mut unreachable = Vec::new();
    if !q.local() {
        let (more, missing) =
            peers::gather::<ScaleSetsResponse>(&api, "/v1/scale-sets?scope=local").await;
        scale_sets.extend(more.into_iter().flat_map(|r| r.scale_sets));
        unreachable = missing;
    }
    Json(ScaleSetsResponse {
        scale_sets,
        unreachable,
    })
}

/// `POST /v1/scale-sets/{set}/scale` with `{"capacity": N}`.
async fn scale(
    State(api): State<Api>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let Some(config) = api.topology.scale_set(&name) else {
        return error(
            StatusCode::NOT_FOUND,
            "set",
            format!("no scale set {name:?}"),
        );
    };
    let Ok(ScaleRequest { capacity }) = serde_json::from_slice::<ScaleRequest>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "capacity",
            "expected a JSON body {\"capacity\": N} with N a whole number",
        );
    };
    let c = config.capacity;
    if !(c.min..=c.max).contains(&capacity) {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "capacity",
            format!(
                "capacity {capacity} is outside {}..={} (capacity.min and capacity.max of {name})",
                c.min, c.max
            ),
        );
    }
    let warnings = autoscale_warnings(config, capacity);
    let revision = match api.intents.set_capacity(&name, capacity).await {
        Ok(r) => r,
        Err(e) => return unavailable(e),
    };
    let local = api.scale_sets.iter().find(|s| s.name == name).cloned();
    let applied_here = local.is_some() && api.intents.applied(revision, APPLY_WAIT).await;
    Json(IntentResponse {
        view: local.map(|s| s.view()),
        applies_on: api.owner_of(config.site.as_str()),
        applied_here,
        warnings,
    })
    .into_response()
}

/// What autoscale will do to a manual capacity, as the Azure portal warns.
fn autoscale_warnings(set: &model::ScaleSet, capacity: u32) -> Vec<String> {
    if set.autoscale.is_empty() {
        return Vec::new();
    }
    let rules: Vec<String> = set
        .autoscale
        .iter()
        .map(|r| {
            let (dir, v) = match r.threshold {
                model::Threshold::Above(v) => ("above", v),
                model::Threshold::Below(v) => ("below", v),
            };
            format!(
                "{} {dir} {v} over {} -> {:+}",
                r.metric,
                model::units::format_duration(r.window),
                r.change
            )
        })
        .collect();
    vec![format!(
        "{} has autoscale rules ({}): they keep running and will move the capacity away from {capacity} when they fire, within {}..={}",
        set.name,
        rules.join("; "),
        set.capacity.min,
        set.capacity.max
    )]
}

async fn databases(State(api): State<Api>, Query(q): Query<Scope>) -> Json<DatabasesResponse> {
    let mut databases: Vec<Placed<pg::View>> =
        api.databases.iter().map(|d| api.placed(d.view())).collect();
    let mut unreachable = Vec::new();
    if !q.local() {
        let (more, missing) =
            peers::gather::<DatabasesResponse>(&api, "/v1/databases?scope=local").await;
        databases.extend(more.into_iter().flat_map(|r| r.databases));
        unreachable = missing;
    }
    Json(DatabasesResponse {
        databases,
        unreachable,
    })
}

/// `POST /v1/databases/{db}/switchover` with `{"to": SITE}`.
async fn switchover(
    State(api): State<Api>,
    Path(name): Path<String>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let Some(db) = api.databases.iter().find(|d| d.name == name) else {
        return error(StatusCode::NOT_FOUND, "db", format!("no database {name:?}"));
    };
    let Ok(SwitchoverRequest { to }) = serde_json::from_slice::<SwitchoverRequest>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "to",
            "expected a JSON body {\"to\": SITE}",
        );
    };
    if !db.sites.contains(&to) {
        return error(
            StatusCode::NOT_FOUND,
            "to",
            format!(
                "database {name} has no member in site {to:?} (members: {})",
                db.sites.join(", ")
            ),
        );
    }
    // Cluster mode: the primary's own node runs a switchover; asked elsewhere, it is passed
    // on to that node and its answer returned as it is.
    // Passed on once only: two nodes that each see the other's member as primary (views a
    // tick apart) must not send a request back and forth.
    let forwarded = headers.contains_key(peers::FORWARDED);
    if let Some(node) = primary_elsewhere(&api, db).filter(|_| !forwarded) {
        let path = format!("/v1/databases/{name}/switchover");
        let wait = Duration::from_secs(120);
        return match peers::forward(&api, node.api, Method::POST, &path, body, wait).await {
            Some((status, body)) => {
                (status, [(CONTENT_TYPE, "application/json")], body).into_response()
            }
            None => error(
                StatusCode::BAD_GATEWAY,
                "to",
                format!(
                    "the primary runs on node {} ({}), which gave no answer",
                    node.name, node.api
                ),
            ),
        };
    }
    match db.switchover(&to).await {
        Ok(message) => Json(SwitchoverResponse {
            message,
            database: db.view(),
        })
        .into_response(),
        Err(e) => error(StatusCode::CONFLICT, "to", e.to_string()),
    }
}

/// Cluster mode: the node running `db`'s primary when it is another node's.
fn primary_elsewhere<'a>(api: &'a Api, db: &pg::Cluster) -> Option<&'a model::Node> {
    api.node.as_ref()?;
    let primary = db.view().primary?;
    if api.site.as_deref() == Some(primary.as_str()) {
        return None;
    }
    api.topology
        .nodes
        .iter()
        .find(|n| n.site.as_str() == primary)
}

fn database<'a>(api: &'a Api, name: &str) -> Result<&'a Arc<pg::Cluster>, Box<Response>> {
    api.databases
        .iter()
        .find(|d| d.name == name)
        .ok_or_else(|| {
            Box::new(error(
                StatusCode::NOT_FOUND,
                "db",
                format!("no database {name:?}"),
            ))
        })
}

fn backup_error(e: pg::BackupError) -> Response {
    let status = match &e {
        pg::BackupError::NotConfigured(_) => StatusCode::NOT_FOUND,
        pg::BackupError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        pg::BackupError::Failed(_) => StatusCode::CONFLICT,
    };
    error(status, "backup", e.to_string())
}

/// An optional JSON body: the default when empty, 400 naming `field` when malformed.
fn optional_json<T: Default + serde::de::DeserializeOwned>(
    body: &[u8],
    field: &str,
    expected: &str,
) -> Result<T, Box<Response>> {
    if body.is_empty() {
        return Ok(T::default());
    }
    serde_json::from_slice(body)
        .map_err(|_| Box::new(error(StatusCode::BAD_REQUEST, field, expected)))
}

/// `GET /v1/apps`.
async fn apps(State(api): State<Api>) -> Json<AppsResponse> {
    Json(AppsResponse {
        apps: api.apps.iter().map(|a| a.view()).collect(),
    })
}

fn app_runner<'a>(
    api: &'a Api,
    name: &str,
) -> Result<&'a Arc<orchestrator::AppRunner>, Box<Response>> {
    if let Some(a) = api.apps.iter().find(|a| a.name == name) {
        return Ok(a);
    }
    let message = if api.topology.app(name).is_some() {
        format!("app {name:?} is not running in this process")
    } else {
        format!("no app {name:?}")
    };
    Err(Box::new(error(StatusCode::NOT_FOUND, "app", message)))
}

/// `GET /v1/apps/{app}`.
async fn app_view(State(api): State<Api>, Path(name): Path<String>) -> Response {
    match app_runner(&api, &name) {
        Ok(a) => Json(a.view()).into_response(),
        Err(r) => *r,
    }
}

/// An app's refusal: 404 when it names a site that is not the app's, else 409.
fn refused(field: &str, e: app::Refused) -> Response {
    let status = if e.unknown_site {
        StatusCode::NOT_FOUND
    } else {
        StatusCode::CONFLICT
    };
    error(status, field, e.why)
}

/// `GET /v1/apps/{app}/plan?to=SITE`.
async fn app_plan(
    State(api): State<Api>,
    Path(name): Path<String>,
    Query(q): Query<PlanQuery>,
) -> Response {
    let app = match app_runner(&api, &name) {
        Ok(a) => a,
        Err(r) => return *r,
    };
    let Some(to) = q.to else {
        return error(StatusCode::BAD_REQUEST, "to", "expected ?to=SITE");
    };
    match app.plan(&to) {
        Ok(plan) => Json(plan).into_response(),
        Err(e) => refused("to", e),
    }
}

/// `POST /v1/apps/{app}/drill`: starts the drill and answers 202 with the app (`drilling`);
/// its report becomes the app's `last_drill`. 409 when it cannot start, with why.
async fn app_drill(
    State(api): State<Api>,
    Path(name): Path<String>,
    headers: axum::http::HeaderMap,
) -> Response {
    let app = match app_runner(&api, &name) {
        Ok(a) => a,
        Err(r) => return *r,
    };
    // Cluster mode: the leader drives the drill's moves; asked elsewhere, passed on to it.
    let path = format!("/v1/apps/{name}/drill");
    let body = axum::body::Bytes::new();
    if let Some(r) = to_leader(&api, app, &headers, &path, body).await {
        return r;
    }
    let Some(config) = api.topology.app(&name) else {
        return error(StatusCode::NOT_FOUND, "app", format!("no app {name:?}"));
    };
    let entry = match orchestrator::app_drill::Entry::of(&api.topology, config, &api.dns_listen) {
        Ok(e) => e,
        Err(e) => return error(StatusCode::CONFLICT, "app", e),
    };
    match app.start_drill(entry) {
        Ok(_) => (StatusCode::ACCEPTED, Json(app.view())).into_response(),
        Err(e) => refused("app", e),
    }
}

/// Cluster mode, on a node that does not drive `app`: the request passed on to the leader
/// (once only) and its answer as it is; `None` where this node is to answer.
async fn to_leader(
    api: &Api,
    app: &orchestrator::AppRunner,
    headers: &axum::http::HeaderMap,
    path: &str,
    body: axum::body::Bytes,
) -> Option<Response> {
    if headers.contains_key(peers::FORWARDED) {
        return None;
    }
    let leader = app.leader_elsewhere()?;
    let addr = api
        .node
        .as_ref()?
        .peers()
        .into_iter()
        .find(|(p, _)| *p == leader)
        .map(|(_, a)| a)?;
    let wait = Duration::from_secs(10);
    Some(
        match peers::forward(api, addr, Method::POST, path, body, wait).await {
            Some((status, body)) => {
                (status, [(CONTENT_TYPE, "application/json")], body).into_response()
            }
            None => error(
                StatusCode::BAD_GATEWAY,
                "app",
                format!("the leader, node {leader} ({addr}), gave no answer"),
            ),
        },
    )
}

/// `POST /v1/apps/{app}/{failover|failback|pin|unpin}`: answers with the app once the
/// command is taken; the move runs on (`GET /v1/apps` shows it).
async fn app_action(
    State(api): State<Api>,
    Path((name, action)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let app = match app_runner(&api, &name) {
        Ok(a) => a,
        Err(r) => return *r,
    };
    // Cluster mode: the leader drives the apps; asked elsewhere, passed on to it.
    let path = format!("/v1/apps/{name}/{action}");
    if let Some(r) = to_leader(&api, app, &headers, &path, body.clone()).await {
        return r;
    }
    if !["failover", "failback", "pin", "unpin"].contains(&action.as_str()) {
        return error(
            StatusCode::NOT_FOUND,
            "action",
            format!("no app action {action:?}: use failover, failback, pin, unpin or drill"),
        );
    }
    let req: AppRequest = match optional_json(
        &body,
        "body",
        "expected a JSON body {\"to\": SITE} (failover) or {\"site\": SITE} (pin)",
    ) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    let (cmd, field) = match (action.as_str(), req) {
        ("failover", AppRequest { to: Some(to), .. }) => (app::Command::Failover { to }, "to"),
        ("failover", _) => {
            return error(StatusCode::BAD_REQUEST, "to", "expected {\"to\": SITE}");
        }
        (
            "pin",
            AppRequest {
                site: Some(site), ..
            },
        ) => (app::Command::Pin { site }, "site"),
        ("pin", _) => {
            return error(StatusCode::BAD_REQUEST, "site", "expected {\"site\": SITE}");
        }
        ("failback", _) => (app::Command::Failback, "app"),
        // Validated above: what is left is `unpin`.
        _ => (app::Command::Unpin, "app"),
    };
    match app.command(cmd) {
        Ok(()) => (StatusCode::ACCEPTED, Json(app.view())).into_response(),
        Err(e) => refused(field, e),
    }
}

/// Cluster mode: backups, verify and restore drills run on the primary's node (its member's
/// data directory is there, and one node backs up at a time); asked of another node, the
/// request is passed on to it once and its answer returned as it is. `None`: run it here.
async fn on_primary_node(
    api: &Api,
    db: &pg::Cluster,
    method: Method,
    path: &str,
    body: axum::body::Bytes,
    headers: &axum::http::HeaderMap,
) -> Option<Response> {
    if headers.contains_key(peers::FORWARDED) {
        return None;
    }
    let node = primary_elsewhere(api, db)?;
    // As long as the operation may take (a full backup of a large database).
    let wait = Duration::from_secs(6 * 3600);
    Some(
        match peers::forward(api, node.api, method, path, body, wait).await {
            Some((status, body)) => {
                (status, [(CONTENT_TYPE, "application/json")], body).into_response()
            }
            None => error(
                StatusCode::BAD_GATEWAY,
                "backup",
                format!(
                    "the primary runs on node {} ({}), which gave no answer",
                    node.name, node.api
                ),
            ),
        },
    )
}

/// `GET /v1/databases/{db}/backups`.
async fn backups_list(
    State(api): State<Api>,
    Path(name): Path<String>,
    headers: axum::http::HeaderMap,
) -> Response {
    let db = match database(&api, &name) {
        Ok(db) => db,
        Err(r) => return *r,
    };
    let path = format!("/v1/databases/{name}/backups");
    if let Some(r) =
        on_primary_node(&api, db, Method::GET, &path, Default::default(), &headers).await
    {
        return r;
    }
    match db.backup_list().await {
        Ok(backups) => Json(BackupsResponse {
            database: name,
            backups,
            created: None,
            status: db.view().backup,
        })
        .into_response(),
        Err(e) => backup_error(e),
    }
}

/// `POST /v1/databases/{db}/backups` with `{"type": …}` (optional).
async fn backup_now(
    State(api): State<Api>,
    Path(name): Path<String>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let db = match database(&api, &name) {
        Ok(db) => db,
        Err(r) => return *r,
    };
    let path = format!("/v1/databases/{name}/backups");
    if let Some(r) = on_primary_node(&api, db, Method::POST, &path, body.clone(), &headers).await {
        return r;
    }
    let req: BackupRequest = match optional_json(
        &body,
        "type",
        "expected a JSON body {\"type\": \"full\"|\"diff\"|\"incr\"}",
    ) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    let kind = match req.kind.as_deref() {
        None => pg::backup::Kind::Incr,
        Some(k) => match pg::backup::Kind::parse(k) {
            Some(k) => k,
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "type",
                    format!("unknown backup type {k:?}: use full, diff or incr"),
                );
            }
        },
    };
    match db.backup_now(kind).await {
        Ok(created) => {
            let status = db.view().backup;
            Json(BackupsResponse {
                database: name,
                backups: status
                    .as_ref()
                    .map(|b| b.backups.clone())
                    .unwrap_or_default(),
                created: Some(created),
                status,
            })
            .into_response()
        }
        Err(e) => backup_error(e),
    }
}

/// `POST /v1/databases/{db}/backups/verify`.
async fn backup_verify(
    State(api): State<Api>,
    Path(name): Path<String>,
    headers: axum::http::HeaderMap,
) -> Response {
    let db = match database(&api, &name) {
        Ok(db) => db,
        Err(r) => return *r,
    };
    let path = format!("/v1/databases/{name}/backups/verify");
    if let Some(r) =
        on_primary_node(&api, db, Method::POST, &path, Default::default(), &headers).await
    {
        return r;
    }
    match db.backup_verify().await {
        Ok(report) => Json(VerifyResponse {
            database: name,
            report,
        })
        .into_response(),
        Err(e) => backup_error(e),
    }
}

/// `POST /v1/databases/{db}/restore-drill` with `{"to": TIME}` (optional). A drill that ran
/// and failed answers 200 with `ok: false` and the reason.
async fn restore_drill(
    State(api): State<Api>,
    Path(name): Path<String>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let db = match database(&api, &name) {
        Ok(db) => db,
        Err(r) => return *r,
    };
    let path = format!("/v1/databases/{name}/restore-drill");
    if let Some(r) = on_primary_node(&api, db, Method::POST, &path, body.clone(), &headers).await {
        return r;
    }
    let req: RestoreDrillRequest = match optional_json(
        &body,
        "to",
        "expected a JSON body {\"to\": \"2024-05-01T12:00:00Z\"} or none",
    ) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    let to = match restore_target(req.to.as_deref()) {
        Ok(to) => to,
        Err(r) => return *r,
    };
    match db.restore_drill(to).await {
        Ok(report) => Json(report).into_response(),
        Err(e) => backup_error(e),
    }
}

/// `to` of a restore: `None` (or `latest`) for the newest archived WAL, else a UTC time.
fn restore_target(to: Option<&str>) -> Result<Option<std::time::SystemTime>, Box<Response>> {
    match to {
        None | Some("latest") => Ok(None),
        Some(t) => event::parse_rfc3339(t).map(Some).ok_or_else(|| {
            Box::new(error(
                StatusCode::BAD_REQUEST,
                "to",
                format!("{t:?} is not a time such as 2024-05-01T12:00:00Z (UTC), or latest"),
            ))
        }),
    }
}

/// `POST /v1/databases/{db}/restore` with `{"site": SITE, "to": TIME}`: answers once the
/// restored member is the primary (or with the reason it is not; 409).
async fn restore(
    State(api): State<Api>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let db = match database(&api, &name) {
        Ok(db) => db,
        Err(r) => return *r,
    };
    let req: RestoreRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "site",
                "expected a JSON body {\"site\": \"edge\", \"to\": \"2024-05-01T12:00:00Z\"} (to optional)",
            );
        }
    };
    if !db.sites.contains(&req.site) {
        return error(
            StatusCode::BAD_REQUEST,
            "site",
            format!(
                "database {name} has no member in site {:?} (members: {})",
                req.site,
                db.sites.join(", ")
            ),
        );
    }
    let to = match restore_target(req.to.as_deref()) {
        Ok(to) => to,
        Err(r) => return *r,
    };
    match db.restore(&req.site, to).await {
        Ok(report) => Json(report).into_response(),
        Err(e) => backup_error(e),
    }
}

async fn reload(State(api): State<Api>) -> Response {
    match reload_now(&api).await {
        Ok(r) => Json(r).into_response(),
        Err((status, body)) => (status, Json(body)).into_response(),
    }
}

/// Reads the topology file again and asks every node to apply it (`POST /v1/reload`,
/// SIGHUP): what changed, what applies now and what needs a restart; the file's diagnostics
/// when it is invalid (nothing is applied then).
pub async fn reload_now(api: &Api) -> Result<ReloadResponse, (StatusCode, ErrorResponse)> {
    let refuse = |status, field: &str, error: String, diagnostics| {
        (
            status,
            ErrorResponse {
                error,
                field: field.into(),
                diagnostics,
            },
        )
    };
    let Some(reload) = &api.reload else {
        return Err(refuse(
            StatusCode::NOT_FOUND,
            "reload",
            "this server cannot reload".into(),
            None,
        ));
    };
    let plan = (reload.0)().map_err(|r| {
        refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            "topology",
            r.message,
            r.diagnostics,
        )
    })?;
    if plan.response.unchanged {
        return Ok(plan.response);
    }
    let stored = |e: store::StoreError| {
        refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "store",
            format!("cannot record the reload: {e}"),
            None,
        )
    };
    let revision = api.intents.reload(&plan.hash).await.map_err(stored)?;
    if let Some(n) = &api.node {
        n.set_cluster_topology(&plan.hash).await.map_err(stored)?;
    }
    api.intents.applied(revision, APPLY_WAIT).await;
    Ok(plan.response)
}

/// The drill in progress, as stored (an ended one is not).
fn current_drill(api: &Api) -> Option<orchestrator::Drill> {
    api.intents
        .current()
        .drill
        .map(|(d, _)| d)
        .filter(|d| !d.over(SystemTime::now()))
        .map(|d| orchestrator::Drill {
            kind: d.kind,
            site: d.site,
            started: d.started,
            ends: d.ends,
        })
}

fn drill_response(api: &Api, drill: Option<orchestrator::Drill>) -> DrillResponse {
    let applies_on = drill.as_ref().and_then(|d| api.owner_of(&d.site));
    let applied_here = drill.is_some() && drill == api.drills.applied();
    DrillResponse {
        drill,
        applies_on,
        applied_here,
    }
}

async fn drills(State(api): State<Api>) -> Json<DrillResponse> {
    let drill = current_drill(&api);
    Json(drill_response(&api, drill))
}

/// `POST /v1/drills/outage` with `{"site": "edge", "for": "60s"}` (`for` defaults to 60 s).
async fn outage(State(api): State<Api>, body: axum::body::Bytes) -> Response {
    let Ok(req) = serde_json::from_slice::<OutageRequest>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "site",
            "expected a JSON body {\"site\": NAME, \"for\": DURATION}",
        );
    };
    if api.topology.site(&req.site).is_none() {
        return error(
            StatusCode::NOT_FOUND,
            "site",
            format!("no site {:?} in the topology", req.site),
        );
    }
    let length = match req
        .length
        .as_deref()
        .map(model::units::parse_positive_duration)
    {
        None => Duration::from_secs(60),
        Some(Some(d)) => d,
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "for",
                "expected a duration longer than 0, such as \"60s\" or \"2m\"",
            );
        }
    };
    let (stored, revision) = match api.intents.start_drill(&req.site, length).await {
        Ok(d) => d,
        Err(e @ cluster::DrillRefused::Busy(_)) => {
            return error(StatusCode::CONFLICT, "site", e.to_string());
        }
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, "store", e.to_string()),
    };
    if api.runs(&req.site) {
        api.intents.applied(revision, APPLY_WAIT).await;
    }
    let drill = orchestrator::Drill {
        kind: stored.kind,
        site: stored.site,
        started: stored.started,
        ends: stored.ends,
    };
    Json(drill_response(&api, Some(drill))).into_response()
}

async fn stop_drill(State(api): State<Api>) -> Response {
    match api.intents.stop_drill().await {
        Ok((d, revision)) => {
            if api.runs(&d.site) {
                api.intents.applied(revision, APPLY_WAIT).await;
            }
            let stopped = orchestrator::Drill {
                kind: d.kind,
                site: d.site,
                started: d.started,
                ends: d.ends,
            };
            Json(drill_response(&api, Some(stopped))).into_response()
        }
        Err(e @ cluster::DrillRefused::NotRunning) => {
            error(StatusCode::CONFLICT, "drill", e.to_string())
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, "store", e.to_string()),
    }
}

async fn events(State(api): State<Api>) -> Json<EventsResponse> {
    Json(EventsResponse {
        events: api.events.snapshot(),
    })
}

async fn metrics(State(api): State<Api>) -> impl IntoResponse {
    let changes = *api.engine.subscribe().borrow();
    let mut body = metrics::render(&api.engine.reports(), changes);
    // A node without DNS listeners keeps the tables to decide failback, but answers nothing.
    if let Some(dns) = &api.dns
        && !api.dns_listen.is_empty()
    {
        metrics::render_dns(&mut body, &dns.views(), &dns.metrics);
    }
    let views: Vec<lb::View> = api.load_balancers.iter().map(|b| b.view()).collect();
    metrics::render_lb(&mut body, &views);
    let sets: Vec<scaleset::View> = api.scale_sets.iter().map(|s| s.view()).collect();
    metrics::render_scale_sets(&mut body, &sets);
    let dbs: Vec<pg::View> = api.databases.iter().map(|d| d.view()).collect();
    metrics::render_databases(&mut body, &dbs);
    metrics::render_backups(&mut body, &dbs);
    let apps: Vec<_> = api.apps.iter().map(|a| a.view()).collect();
    metrics::render_apps(&mut body, &apps);
    metrics::render_cluster(&mut body, &api);
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        body,
    )
}
