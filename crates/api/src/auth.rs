//! Bearer tokens with roles for the API, from the file `[tandem] tokens` names.
//!
//! The file holds no secret, only each token's SHA-256 (a leaked file opens nothing):
//!
//! ```toml
//! [[token]]
//! name = "ops"            # who, for logs and errors
//! role = "admin"          # "read": GET only; "admin": everything
//! sha256 = "9f86d0…"      # printf %s "$SECRET" | sha256sum
//! ```
//!
//! Every mutation (POST) needs an admin token; reads need a read or admin token unless
//! `[tandem] open_reads = true`; `/healthz` and the dashboard's static files (`/`,
//! `/assets/…`, which hold no data) are always open. A request without a valid token
//! gets 401 with `WWW-Authenticate: Bearer` (RFC 6750 §3), one whose token lacks the role 403;
//! both name the field `authorization`. Without a tokens file the API is open, as before.

use std::collections::HashMap;
use std::path::Path;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::Api;

tokio::task_local! {
    /// The `Authorization` header of the request being served: views gathered from the
    /// other nodes are asked for with it (every node reads the same tokens file).
    pub static AUTHORIZATION: Option<String>;
}

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Read,
    Admin,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    token: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    role: Role,
    sha256: String,
}

/// The tokens the API accepts.
#[derive(Clone, Debug)]
pub struct Tokens {
    by_hash: HashMap<[u8; 32], (String, Role)>,
    /// Reads need no token.
    pub open_reads: bool,
}

impl Tokens {
    /// Reads the tokens file. Errors name the file and what is wrong with it.
    pub fn load(path: &Path, open_reads: bool) -> Result<Tokens, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the tokens file {}: {e}", path.display()))?;
        let file: File =
            toml::from_str(&text).map_err(|e| format!("tokens file {}: {e}", path.display()))?;
        let mut by_hash = HashMap::new();
        for t in file.token {
            let hash = parse_hex(&t.sha256).ok_or_else(|| {
                format!(
                    "tokens file {}: token {:?}: sha256 must be 64 hex digits (printf %s \"$SECRET\" | sha256sum)",
                    path.display(),
                    t.name
                )
            })?;
            by_hash.insert(hash, (t.name, t.role));
        }
        if by_hash.is_empty() {
            return Err(format!(
                "tokens file {} has no [[token]]: nobody could use the API",
                path.display()
            ));
        }
        Ok(Tokens {
            by_hash,
            open_reads,
        })
    }

    /// The name and role of the token `secret`, if it is one.
    pub fn check(&self, secret: &str) -> Option<(&str, Role)> {
        let hash: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        self.by_hash.get(&hash).map(|(n, r)| (n.as_str(), *r))
    }
}

fn parse_hex(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The role a request needs: none for `/healthz`, the dashboard's static files and, when
/// open, for reads.
fn needed(method: &Method, path: &str, open_reads: bool) -> Option<Role> {
    let read = matches!(*method, Method::GET | Method::HEAD);
    match (path, read) {
        ("/healthz", _) => None,
        (p, true) if crate::dashboard::is_static(p) => None,
        (_, true) if open_reads => None,
        (_, true) => Some(Role::Read),
        (_, false) => Some(Role::Admin),
    }
}

fn refuse(status: StatusCode, message: String) -> Response {
    let body = crate::types::ErrorResponse {
        error: message,
        field: "authorization".into(),
        diagnostics: None,
    };
    let mut resp = (status, axum::Json(body)).into_response();
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"tandem\""),
        );
    }
    resp
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// A change sent by a browser from another site (its `Origin` is not the `Host` it was sent
/// to): a page the operator visits must not drive the API with the operator's network access
/// (cross-site request forgery). Clients other than browsers send no `Origin`.
fn cross_site(req: &Request) -> bool {
    if matches!(*req.method(), Method::GET | Method::HEAD) {
        return false;
    }
    let Some(origin) = req.headers().get(header::ORIGIN) else {
        return false;
    };
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok());
    let origin_host = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, rest)| rest.trim_end_matches('/'));
    match (origin_host, host) {
        (Some(o), Some(h)) => !o.eq_ignore_ascii_case(h),
        _ => true,
    }
}

/// The middleware: refuses cross-site changes, then checks the request's token against the
/// role it needs.
pub async fn authorize(State(api): State<Api>, req: Request, next: Next) -> Response {
    if cross_site(&req) {
        let body = crate::types::ErrorResponse {
            error: "a change from a page of another site is refused (its Origin is not this API)"
                .into(),
            field: "origin".into(),
            diagnostics: None,
        };
        return (StatusCode::FORBIDDEN, axum::Json(body)).into_response();
    }
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if let Some(tokens) = &api.tokens
        && let Some(role) = needed(req.method(), req.uri().path(), tokens.open_reads)
    {
        let what = if role == Role::Admin {
            "a change"
        } else {
            "a read"
        };
        match bearer(req.headers()).and_then(|s| tokens.check(s)) {
            None => {
                return refuse(
                    StatusCode::UNAUTHORIZED,
                    format!(
                        "{what} needs a token: send `Authorization: Bearer TOKEN` (the CLI reads TANDEM_TOKEN or --token)"
                    ),
                );
            }
            Some((name, has)) if has < role => {
                return refuse(
                    StatusCode::FORBIDDEN,
                    format!("token {name:?} may only read; {what} needs an admin token"),
                );
            }
            Some(_) => {}
        }
    }
    AUTHORIZATION.scope(header, next.run(req)).await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn roles_and_paths() {
        assert_eq!(needed(&Method::GET, "/healthz", false), None);
        assert_eq!(needed(&Method::POST, "/healthz", false), None);
        assert_eq!(needed(&Method::GET, "/v1/nodes", false), Some(Role::Read));
        assert_eq!(needed(&Method::GET, "/v1/nodes", true), None);
        assert_eq!(needed(&Method::POST, "/v1/reload", true), Some(Role::Admin));
        assert_eq!(needed(&Method::GET, "/", false), None);
        assert_eq!(needed(&Method::GET, "/assets/app.js", false), None);
        assert_eq!(needed(&Method::POST, "/", false), Some(Role::Admin));
        assert_eq!(
            needed(&Method::GET, "/v1/events/stream", false),
            Some(Role::Read)
        );
        assert!(Role::Admin > Role::Read);
        assert!(parse_hex(&"ab".repeat(32)).is_some());
        assert!(parse_hex("abc").is_none());
        assert!(parse_hex(&"zz".repeat(32)).is_none());
    }
}
