//! Asking the other live nodes' APIs, for views of what they run.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;

use crate::Api;

/// How long one peer gets to answer.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(2);

/// `GET path` from every other live node, at once; the answers, and the nodes that gave none.
pub async fn gather<T: DeserializeOwned + Send + 'static>(
    api: &Api,
    path: &str,
) -> (Vec<T>, Vec<String>) {
    let Some(node) = &api.node else {
        return (Vec::new(), Vec::new());
    };
    let mut tasks = tokio::task::JoinSet::new();
    // Asked with the caller's token: every node reads the same tokens file.
    let auth = crate::auth::AUTHORIZATION
        .try_with(Clone::clone)
        .ok()
        .flatten();
    // Every node serves TLS when one does (one topology), verified with `tls_ca`.
    let tls = api.tls.as_ref().and_then(|t| t.client.clone());
    for (name, addr) in node.peers() {
        let (path, auth, tls) = (path.to_string(), auth.clone(), tls.clone());
        tasks.spawn(async move {
            let got = tokio::time::timeout(PEER_TIMEOUT, get::<T>(addr, &path, auth, tls)).await;
            (name, got.ok().flatten())
        });
    }
    let (mut answers, mut missing) = (Vec::new(), Vec::new());
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((_, Some(t))) => answers.push(t),
            Ok((name, None)) => missing.push(name),
            Err(_) => {}
        }
    }
    missing.sort();
    (answers, missing)
}

/// The header a request passed on to another node carries (it is not passed on again).
pub const FORWARDED: &str = "x-tandem-forwarded";

/// `method path` with a JSON `body` to the node API at `addr`, with the caller's token, for a
/// request only that node can carry out; its status and body, or `None` when it gave no answer
/// within `timeout`.
pub async fn forward(
    api: &Api,
    addr: SocketAddr,
    method: hyper::Method,
    path: &str,
    body: Bytes,
    timeout: Duration,
) -> Option<(hyper::StatusCode, Bytes)> {
    let auth = crate::auth::AUTHORIZATION
        .try_with(Clone::clone)
        .ok()
        .flatten();
    let tls = api.tls.as_ref().and_then(|t| t.client.clone());
    let ask = async move {
        let mut sender = match tls {
            Some(config) => http1(crate::tls::connect(addr, &config).await.ok()?).await,
            None => http1(TcpStream::connect(addr).await.ok()?).await,
        }
        .ok()?;
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, addr.to_string())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(FORWARDED, "1");
        if let Some(a) = auth {
            req = req.header(hyper::header::AUTHORIZATION, a);
        }
        let req = req.body(http_body_util::Full::new(body)).ok()?;
        let resp = sender.send_request(req).await.ok()?;
        let status = resp.status();
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        Some((status, body))
    };
    tokio::time::timeout(timeout, ask).await.ok().flatten()
}

async fn get<T: DeserializeOwned>(
    addr: SocketAddr,
    path: &str,
    auth: Option<String>,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Option<T> {
    let mut sender = match tls {
        Some(config) => {
            let stream = crate::tls::connect(addr, &config)
                .await
                // A certificate that does not name the peer, or a wrong `tls_ca`, is a
                // misconfiguration the operator must see; an unreachable peer is not.
                .map_err(|e| {
                    if e.kind() == std::io::ErrorKind::InvalidData {
                        tracing::warn!(%addr, "the peer's API refused TLS: {e}; check tls_ca and that its certificate names {}", addr.ip());
                    } else {
                        tracing::debug!(%addr, "peer API over TLS: {e}");
                    }
                })
                .ok()?;
            http1(stream).await
        }
        None => http1(TcpStream::connect(addr).await.ok()?).await,
    }
    .ok()?;
    let mut req = Request::get(path).header(hyper::header::HOST, addr.to_string());
    if let Some(a) = auth {
        req = req.header(hyper::header::AUTHORIZATION, a);
    }
    let req = req.body(Empty::<Bytes>::new()).ok()?;
    let resp = sender.send_request(req).await.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    serde_json::from_slice(&body).ok()
}

/// An HTTP/1.1 client connection over `io` (plain TCP or TLS), driven by a task of its own.
///
/// # Errors
/// The handshake failed.
pub async fn http1<IO, B>(io: IO) -> hyper::Result<hyper::client::conn::http1::SendRequest<B>>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(conn);
    Ok(sender)
}
