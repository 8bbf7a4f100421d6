//! The REST API: `GET /healthz`, `GET /v1/health`, `GET /v1/events` and `GET /metrics`.

pub mod metrics;

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use health::{Engine, Event};
use serde::Serialize;
use tokio::net::TcpListener;

/// How many recent events `/v1/events` keeps.
pub const EVENT_LOG_SIZE: usize = 1000;

/// The most recent events, newest last.
#[derive(Clone, Debug, Default)]
pub struct EventLog(Arc<Mutex<VecDeque<Event>>>);

impl EventLog {
    /// Records every event of `engine` until the engine stops.
    pub fn record(engine: &Engine) -> Self {
        let log = EventLog::default();
        let mut rx = engine.events();
        let sink = log.clone();
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
        log
    }

    fn push(&self, e: Event) {
        let mut q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() == EVENT_LOG_SIZE {
            q.pop_front();
        }
        q.push_back(e);
    }

    pub fn snapshot(&self) -> Vec<Event> {
        let q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        q.iter().cloned().collect()
    }
}

/// What the handlers read.
#[derive(Clone, Debug)]
pub struct Api {
    pub engine: Arc<Engine>,
    pub events: EventLog,
}

#[derive(Serialize)]
struct HealthBody {
    targets: Vec<health::Report>,
}

#[derive(Serialize)]
struct EventsBody {
    events: Vec<Event>,
}

/// The API's routes.
pub fn router(api: Api) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/v1/health", get(health_targets))
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

async fn health_targets(State(api): State<Api>) -> Json<HealthBody> {
    Json(HealthBody {
        targets: api.engine.reports(),
    })
}

async fn events(State(api): State<Api>) -> Json<EventsBody> {
    Json(EventsBody {
        events: api.events.snapshot(),
    })
}

async fn metrics(State(api): State<Api>) -> impl IntoResponse {
    let changes = *api.engine.subscribe().borrow();
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        metrics::render(&api.engine.reports(), changes),
    )
}
