//! A minimal HTTP client for the CLI's calls to a running tandem's API.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// GETs `path` from the API and parses the JSON answer.
pub async fn get_json(api: SocketAddr, path: &str) -> anyhow::Result<serde_json::Value> {
    let exchange = async {
        let stream = TcpStream::connect(api).await.with_context(|| {
            format!("cannot reach the tandem API at {api}; is `tandem up` running?")
        })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = Request::get(path)
            .header(hyper::header::HOST, api.to_string())
            .body(Empty::<Bytes>::new())?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            bail!(
                "{path} answered {status}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        serde_json::from_slice(&body).with_context(|| format!("{path} answered invalid JSON"))
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .with_context(|| format!("the tandem API at {api} did not answer within 10s"))?
}
