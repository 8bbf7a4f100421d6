//! A minimal HTTP client for the CLI's calls to a running tandem's API.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

const DEFAULT_API: &str = "127.0.0.1:7400";

/// The API address: given, else `TANDEM_API`, else the default.
pub fn api_addr(given: Option<SocketAddr>) -> anyhow::Result<SocketAddr> {
    if let Some(a) = given {
        return Ok(a);
    }
    let raw = std::env::var("TANDEM_API").unwrap_or_else(|_| DEFAULT_API.to_string());
    raw.parse()
        .map_err(|_| anyhow!("TANDEM_API={raw:?} is not an ip:port address"))
}

/// Runs a future on a small runtime of its own.
pub fn block_on<T>(f: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

pub async fn get_json(api: SocketAddr, path: &str) -> anyhow::Result<serde_json::Value> {
    call(api, Method::GET, path, None).await
}

pub async fn post_json(api: SocketAddr, path: &str) -> anyhow::Result<serde_json::Value> {
    call(api, Method::POST, path, None).await
}

/// POST with a JSON body.
pub async fn post_body(
    api: SocketAddr,
    path: &str,
    body: serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    call(api, Method::POST, path, Some(body)).await
}

async fn call(
    api: SocketAddr,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<serde_json::Value> {
    let exchange = async {
        let stream = TcpStream::connect(api).await.with_context(|| {
            format!("cannot reach the tandem API at {api}; is `tandem up` running?")
        })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, api.to_string())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(
                body.map(|b| b.to_string()).unwrap_or_default(),
            )))?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            let why = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
            bail!("{why} ({status})");
        }
        serde_json::from_slice(&body).with_context(|| format!("{path} answered invalid JSON"))
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .with_context(|| format!("the tandem API at {api} did not answer within 10s"))?
}
