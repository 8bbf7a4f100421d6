//! The REST API: health targets, DNS profiles, events, and Prometheus metrics.
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/healthz` | `ok` while Tandem runs |
//! | GET | `/v1/health` | every probe target |
//! | GET | `/v1/profiles` | every DNS profile: endpoints, states, the answer now |
//! | POST | `/v1/profiles/{profile}/endpoints/{endpoint}/disable` | stop answering an endpoint |
//! | POST | `/v1/profiles/{profile}/endpoints/{endpoint}/enable` | answer it again |
//! | GET | `/v1/load-balancers` | every load balancer: frontends, backends, counters |
//! | POST | `/v1/load-balancers/{lb}/backends/{address}/drain` | stop new flows, drain the rest |
//! | POST | `/v1/load-balancers/{lb}/backends/{address}/enable` | take new flows again |
//! | GET | `/v1/databases` | every database: primary, term, members with role, LSNs, lag |
//! | POST | `/v1/databases/{db}/switchover` | `{"to": SITE}`: planned handover, no data loss |
//! | GET | `/v1/events` | the last 1,000 health, DNS and load balancer events |
//! | GET | `/metrics` | Prometheus exposition |

pub mod metrics;

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use dns::manager::Manager;
pub use event::{Event, Source};
use health::Engine;
use serde_json::json;
use tokio::net::TcpListener;

/// How many recent events `/v1/events` keeps.
pub const EVENT_LOG_SIZE: usize = 1000;

/// The most recent events, newest last, and every new one as it is recorded.
#[derive(Clone, Debug)]
pub struct EventLog(
    Arc<Mutex<VecDeque<Event>>>,
    tokio::sync::broadcast::Sender<Event>,
);

impl Default for EventLog {
    fn default() -> Self {
        EventLog(Arc::default(), tokio::sync::broadcast::Sender::new(1024))
    }
}

impl EventLog {
    /// Every event recorded from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Event> {
        self.1.subscribe()
    }

    /// Records every event of a broadcast channel until it closes.
    pub fn follow(&self, mut rx: tokio::sync::broadcast::Receiver<Event>) {
        let sink = self.clone();
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(e) => sink.push(e),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "event log fell behind");
                    }
                    Err(_) => return,
                }
            }
        });
    }

    fn push(&self, e: Event) {
        let mut q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() == EVENT_LOG_SIZE {
            q.pop_front();
        }
        q.push_back(e.clone());
        let _ = self.1.send(e);
    }

    pub fn snapshot(&self) -> Vec<Event> {
        let q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        q.iter().cloned().collect()
    }
}

/// Re-reads the topology file and applies what can change while running; says what it did.
#[derive(Clone)]
pub struct Reload(pub Arc<dyn Fn() -> Result<Vec<String>, String> + Send + Sync>);

impl std::fmt::Debug for Reload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reload")
    }
}

/// What the handlers read.
#[derive(Clone, Debug)]
pub struct Api {
    pub engine: Arc<Engine>,
    pub dns: Option<Arc<Manager>>,
    pub load_balancers: Vec<Arc<lb::Balancer>>,
    pub scale_sets: Vec<Arc<scaleset::ScaleSet>>,
    pub databases: Vec<Arc<pg::Cluster>>,
    pub drills: Option<Arc<orchestrator::Drills>>,
    pub reload: Option<Reload>,
    pub events: EventLog,
}

/// The API's routes.
pub fn router(api: Api) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/v1/health", get(health_targets))
        .route("/v1/profiles", get(profiles))
        .route(
            "/v1/profiles/{profile}/endpoints/{endpoint}/{action}",
            post(endpoint_action),
        )
        .route("/v1/load-balancers", get(load_balancers))
        .route(
            "/v1/load-balancers/{lb}/backends/{address}/{action}",
            post(backend_action),
        )
        .route("/v1/scale-sets", get(scale_sets))
        .route("/v1/scale-sets/{set}/scale", post(scale))
        .route("/v1/databases", get(databases))
        .route("/v1/databases/{db}/switchover", post(switchover))
        .route("/v1/reload", post(reload))
        .route("/v1/drills", get(drills))
        .route("/v1/drills/outage", post(outage))
        .route("/v1/drills/stop", post(stop_drill))
        .route("/v1/events", get(events))
        .route("/metrics", get(metrics))
        .with_state(api)
}

/// Serves the API on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    api: Api,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(api))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn health_targets(State(api): State<Api>) -> Json<serde_json::Value> {
    Json(json!({ "targets": api.engine.reports() }))
}

async fn profiles(State(api): State<Api>) -> Json<serde_json::Value> {
    let profiles = api.dns.as_ref().map(|d| d.views()).unwrap_or_default();
    Json(json!({ "profiles": profiles }))
}

fn error(status: StatusCode, field: &str, message: String) -> Response {
    (status, Json(json!({ "error": message, "field": field }))).into_response()
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
    let Some(dns) = &api.dns else {
        return error(
            StatusCode::NOT_FOUND,
            "profile",
            "this topology has no [dns]".into(),
        );
    };
    if let Err(e) = dns.set_enabled(&profile, &endpoint, enabled) {
        let field = match e {
            dns::manager::NotFound::Profile(_) => "profile",
            dns::manager::NotFound::Endpoint(..) => "endpoint",
        };
        return error(StatusCode::NOT_FOUND, field, e.to_string());
    }
    // Stop or resume probing it too; an endpoint without a probe has no target.
    let _ = api
        .engine
        .set_disabled(&health::endpoint_id(&profile, &endpoint), !enabled);
    tracing::info!(%profile, %endpoint, enabled, "endpoint switched by operator");
    let view = dns.views().into_iter().find(|p| p.name == profile);
    Json(json!({ "profile": view })).into_response()
}

async fn load_balancers(State(api): State<Api>) -> Json<serde_json::Value> {
    let views: Vec<lb::View> = api.load_balancers.iter().map(|b| b.view()).collect();
    Json(json!({ "load_balancers": views }))
}

async fn backend_action(
    State(api): State<Api>,
    Path((name, address, action)): Path<(String, String, String)>,
) -> Response {
    let Some(balancer) = api
        .load_balancers
        .iter()
        .find(|b| b.config.name.as_str() == name)
    else {
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
    let result = match action.as_str() {
        "drain" => balancer.drain(addr),
        "enable" => balancer.enable(addr),
        other => {
            return error(
                StatusCode::NOT_FOUND,
                "action",
                format!("unknown action {other:?}: use drain or enable"),
            );
        }
    };
    match result {
        Ok(()) => Json(json!({ "load_balancer": balancer.view() })).into_response(),
        Err(e) => error(StatusCode::NOT_FOUND, "address", e.to_string()),
    }
}

async fn scale_sets(State(api): State<Api>) -> Json<serde_json::Value> {
    let views: Vec<scaleset::View> = api.scale_sets.iter().map(|s| s.view()).collect();
    Json(json!({ "scale_sets": views }))
}

/// `POST /v1/scale-sets/{set}/scale` with `{"capacity": N}`.
async fn scale(
    State(api): State<Api>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let Some(set) = api.scale_sets.iter().find(|s| s.name == name) else {
        return error(
            StatusCode::NOT_FOUND,
            "set",
            format!("no scale set {name:?}"),
        );
    };
    let capacity = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("capacity")?.as_u64())
        .and_then(|n| u32::try_from(n).ok());
    let Some(n) = capacity else {
        return error(
            StatusCode::BAD_REQUEST,
            "capacity",
            "expected a JSON body {\"capacity\": N} with N a whole number".into(),
        );
    };
    match set.scale_to(n).await {
        Ok(()) => Json(json!({ "scale_set": set.view() })).into_response(),
        Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, "capacity", e),
    }
}

async fn databases(State(api): State<Api>) -> Json<serde_json::Value> {
    let views: Vec<pg::View> = api.databases.iter().map(|d| d.view()).collect();
    Json(json!({ "databases": views }))
}

/// `POST /v1/databases/{db}/switchover` with `{"to": SITE}`.
async fn switchover(
    State(api): State<Api>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let Some(db) = api.databases.iter().find(|d| d.name == name) else {
        return error(StatusCode::NOT_FOUND, "db", format!("no database {name:?}"));
    };
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let Some(to) = v.get("to").and_then(|s| s.as_str()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "to",
            "expected a JSON body {\"to\": SITE}".into(),
        );
    };
    match db.switchover(to).await {
        Ok(message) => Json(json!({ "message": message, "database": db.view() })).into_response(),
        Err(e) => error(StatusCode::CONFLICT, "to", e.to_string()),
    }
}

async fn reload(State(api): State<Api>) -> Response {
    let Some(reload) = &api.reload else {
        return error(
            StatusCode::NOT_FOUND,
            "reload",
            "this server cannot reload".into(),
        );
    };
    match (reload.0)() {
        Ok(applied) => Json(json!({ "applied": applied })).into_response(),
        Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, "topology", e),
    }
}

async fn drills(State(api): State<Api>) -> Json<serde_json::Value> {
    let drill = api.drills.as_ref().and_then(|d| d.view());
    Json(json!({ "drill": drill }))
}

/// `POST /v1/drills/outage` with `{"site": "edge", "for": "60s"}` (`for` defaults to 60 s).
async fn outage(State(api): State<Api>, body: axum::body::Bytes) -> Response {
    let Some(drills) = &api.drills else {
        return error(StatusCode::NOT_FOUND, "site", "no sites to drill".into());
    };
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let Some(site) = v.get("site").and_then(|s| s.as_str()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "site",
            "expected a JSON body {\"site\": NAME, \"for\": DURATION}".into(),
        );
    };
    let length = match v
        .get("for")
        .map(|f| f.as_str().map(model::units::parse_duration))
    {
        None => Duration::from_secs(60),
        Some(Some(Some(d))) if !d.is_zero() => d,
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "for",
                "expected a duration such as \"60s\" or \"2m\"".into(),
            );
        }
    };
    match drills.outage(site, length) {
        Ok(d) => Json(json!({ "drill": d })).into_response(),
        Err(e @ orchestrator::DrillError::UnknownSite(_)) => {
            error(StatusCode::NOT_FOUND, "site", e.to_string())
        }
        Err(e) => error(StatusCode::CONFLICT, "site", e.to_string()),
    }
}

async fn stop_drill(State(api): State<Api>) -> Response {
    match api.drills.as_ref().map(|d| d.stop()) {
        Some(Ok(d)) => Json(json!({ "drill": d })).into_response(),
        Some(Err(e)) => error(StatusCode::CONFLICT, "drill", e.to_string()),
        None => error(StatusCode::CONFLICT, "drill", "no drill is running".into()),
    }
}

async fn events(State(api): State<Api>) -> Json<serde_json::Value> {
    Json(json!({ "events": api.events.snapshot() }))
}

async fn metrics(State(api): State<Api>) -> impl IntoResponse {
    let changes = *api.engine.subscribe().borrow();
    let mut body = metrics::render(&api.engine.reports(), changes);
    if let Some(dns) = &api.dns {
        metrics::render_dns(&mut body, &dns.views(), &dns.metrics);
    }
    let views: Vec<lb::View> = api.load_balancers.iter().map(|b| b.view()).collect();
    metrics::render_lb(&mut body, &views);
    let sets: Vec<scaleset::View> = api.scale_sets.iter().map(|s| s.view()).collect();
    metrics::render_scale_sets(&mut body, &sets);
    let dbs: Vec<pg::View> = api.databases.iter().map(|d| d.view()).collect();
    metrics::render_databases(&mut body, &dbs);
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        body,
    )
}
