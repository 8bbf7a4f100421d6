//! A minimal HTTP client for the CLI's calls to a running node's API, typed with the API's own
//! request and response types (`api::types`).

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use api::types::ErrorResponse;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;

const DEFAULT_API: &str = "127.0.0.1:7400";

/// How long the CLI waits for one answer.
pub const TIMEOUT: Duration = Duration::from_secs(15);
/// How long it waits for a backup, a verify or a restore drill to finish.
pub const LONG_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

/// The API refused the request: its status and what it said.
#[derive(Debug)]
pub struct Refused {
    pub status: u16,
    pub body: ErrorResponse,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.body.error, self.status)
    }
}

impl std::error::Error for Refused {}

/// The API address: given, else `TANDEM_API`, else the default.
pub fn api_addr(given: Option<SocketAddr>) -> anyhow::Result<SocketAddr> {
    if let Some(a) = given {
        return Ok(a);
    }
    let raw = std::env::var("TANDEM_API").unwrap_or_else(|_| DEFAULT_API.to_string());
    raw.parse()
        .map_err(|_| anyhow!("TANDEM_API={raw:?} is not an ip:port address"))
}

/// The API token every request carries (`--token` or `TANDEM_TOKEN`), if any.
static TOKEN: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();

/// Sets the token once, at start.
pub fn set_token(token: Option<String>) {
    let _ = TOKEN.set(token.filter(|t| !t.is_empty()));
}

/// The TLS client configuration, when the API is served over TLS (`--ca` or `TANDEM_CA`).
static TLS: std::sync::OnceLock<Option<std::sync::Arc<rustls::ClientConfig>>> =
    std::sync::OnceLock::new();

/// Sets the CA that signs the API's certificate once, at start; `None`: plain HTTP.
///
/// # Errors
/// The file cannot be read or holds no CA certificate.
pub fn set_ca(ca: Option<&std::path::Path>) -> anyhow::Result<()> {
    let config = ca
        .map(api::tls::client_config)
        .transpose()
        .map_err(|e| anyhow!("{e} (--ca or TANDEM_CA)"))?;
    let _ = TLS.set(config);
    Ok(())
}

/// Runs a future on a small runtime of its own.
pub fn block_on<T>(f: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

pub async fn get<T: DeserializeOwned>(api: SocketAddr, path: &str) -> anyhow::Result<T> {
    call(api, Method::GET, path, None::<()>, TIMEOUT).await
}

/// POST of a long operation (a backup, a restore drill): waits up to [`LONG_TIMEOUT`].
pub async fn post_long<T: DeserializeOwned>(
    api: SocketAddr,
    path: &str,
    body: Option<impl Serialize>,
) -> anyhow::Result<T> {
    call(api, Method::POST, path, body, LONG_TIMEOUT).await
}

/// GET that may wait for pgBackRest (listing a repository): up to [`LONG_TIMEOUT`].
pub async fn get_long<T: DeserializeOwned>(api: SocketAddr, path: &str) -> anyhow::Result<T> {
    call(api, Method::GET, path, None::<()>, LONG_TIMEOUT).await
}

/// POST, with a JSON body when given.
pub async fn post<T: DeserializeOwned>(
    api: SocketAddr,
    path: &str,
    body: Option<impl Serialize>,
) -> anyhow::Result<T> {
    call(api, Method::POST, path, body, TIMEOUT).await
}

async fn call<T: DeserializeOwned>(
    api: SocketAddr,
    method: Method,
    path: &str,
    body: Option<impl Serialize>,
    timeout: Duration,
) -> anyhow::Result<T> {
    let body = match body {
        Some(b) => serde_json::to_vec(&b)?,
        None => Vec::new(),
    };
    let exchange = async {
        let unreachable =
            || format!("cannot reach the tandem API at {api}; is `tandem up` running?");
        let mut sender = match TLS.get().cloned().flatten() {
            Some(config) => {
                let stream = api::tls::connect(api, &config).await.with_context(|| {
                    format!(
                        "{}; with --ca/TANDEM_CA its certificate must be signed by that CA and name {}",
                        unreachable(),
                        api.ip()
                    )
                })?;
                api::peers::http1(stream).await?
            }
            None => {
                let stream = TcpStream::connect(api).await.with_context(unreachable)?;
                api::peers::http1(stream).await?
            }
        };
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, api.to_string())
            .header(hyper::header::CONTENT_TYPE, "application/json");
        if let Some(Some(token)) = TOKEN.get() {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let req = req.body(Full::new(Bytes::from(body)))?;
        let resp = sender.send_request(req).await.map_err(|e| {
            let hint = if TLS.get().cloned().flatten().is_none() {
                "; if the API serves TLS ([tandem] tls_cert), set TANDEM_CA (or --ca) to its CA"
            } else {
                ""
            };
            anyhow!("the tandem API at {api} closed the request: {e}{hint}")
        })?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            let body =
                serde_json::from_slice::<ErrorResponse>(&bytes).unwrap_or_else(|_| ErrorResponse {
                    error: String::from_utf8_lossy(&bytes).into_owned(),
                    field: String::new(),
                    diagnostics: None,
                });
            return Err(Refused {
                status: status.as_u16(),
                body,
            }
            .into());
        }
        serde_json::from_slice(&bytes).with_context(|| format!("{path} answered invalid JSON"))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .with_context(|| format!("the tandem API at {api} did not answer within {timeout:?}"))?
}
