//! Each member's HTTP health endpoint, in the conventions HAProxy users know from Patroni:
//! `/primary` (also `/read-write`) answers 200 only on the writable primary holding the lease,
//! `/replica?lag=1MB` 200 on a streaming standby within that lag, `/read-only` on either,
//! `/health` 200 while PostgreSQL answers; 503 otherwise. Any method (HAProxy checks with
//! OPTIONS by default); the body is the member's state as JSON.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::cluster::{Cluster, MemberView};

type Ctx = (Arc<Cluster>, String);

pub(crate) async fn serve(
    listener: TcpListener,
    cluster: Arc<Cluster>,
    site: String,
    mut stop: watch::Receiver<bool>,
) {
    let app = Router::new()
        .route("/{check}", any(check))
        .route(
            "/",
            any(|s: State<Ctx>| check(s, Path("primary".into()), Query(HashMap::new()))),
        )
        .with_state((cluster, site));
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await;
}

async fn check(
    State((cluster, site)): State<Ctx>,
    Path(check): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let view = cluster.view();
    let Some(m) = view.members.iter().find(|m| m.site == site) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let primary = view.primary.as_deref() == Some(site.as_str()) && m.role == "primary";
    let lag = match q.get("lag").map(|l| parse_size(l)) {
        Some(None) => {
            return (
                StatusCode::BAD_REQUEST,
                "lag: expected bytes, optionally with kB, MB or GB (e.g. 1MB)\n",
            )
                .into_response();
        }
        Some(Some(n)) => n,
        None => u64::MAX,
    };
    let replica = replica_within(m, lag);
    let ok = match check.as_str() {
        "primary" | "read-write" | "master" | "leader" => primary,
        "replica" | "standby" => replica,
        "read-only" => primary || replica,
        "health" | "liveness" => m.state == "running" || m.state == "streaming",
        _ => {
            return (
                StatusCode::NOT_FOUND,
                "checks: /primary, /replica?lag=, /read-only, /health\n",
            )
                .into_response();
        }
    };
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = serde_json::to_value(m).unwrap_or_default();
    // Anyone who can reach a health check reads this: no paths, no error texts (they quote
    // logs and paths); `GET /v1/databases` has them for operators.
    if let Some(fields) = body.as_object_mut() {
        for private in ["data_dir", "log", "error"] {
            fields.remove(private);
        }
    }
    body["term"] = view.term.into();
    body["database"] = view.name.clone().into();
    (status, axum::Json(body)).into_response()
}

fn replica_within(m: &MemberView, lag: u64) -> bool {
    m.role == "standby" && m.state == "streaming" && m.lag_bytes.unwrap_or(u64::MAX) <= lag
}

/// `1048576`, `16kB`, `1MB`, `2GB` (powers of 1024, as PostgreSQL's units).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1 << 10,
        "mb" => 1 << 20,
        "gb" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_sizes() {
        assert_eq!(parse_size("1048576"), Some(1 << 20));
        assert_eq!(parse_size("16kB"), Some(16 << 10));
        assert_eq!(parse_size("1MB"), Some(1 << 20));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size("1TB"), None);
    }
}
