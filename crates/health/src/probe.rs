//! Probers: one probe is one fresh connection (never a pooled one, which could pass while new
//! connections fail), bounded by the monitor's timeout, with a precise reason when it fails.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use model::units::StatusRange;
use model::{Monitor, Protocol};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use crate::http1;

/// How much of a body is searched for the expected substring.
pub const BODY_LIMIT: usize = 64 * 1024;

/// Where a probe connects.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Destination {
    Addr(SocketAddr),
    /// Resolved at every probe, so a DNS change is followed.
    Host(String, u16),
}

impl Destination {
    /// The host name to present (Host header, SNI): the name, or the address.
    fn host(&self) -> String {
        match self {
            Destination::Addr(a) => a.ip().to_string(),
            Destination::Host(h, _) => h.clone(),
        }
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Destination::Addr(a) => write!(f, "{a}"),
            Destination::Host(h, p) => write!(f, "{h}:{p}"),
        }
    }
}

/// Why a probe failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// No complete answer within the timeout.
    Timeout(Duration),
    Refused,
    /// Other connect errors (unreachable, reset, resolution failure…).
    Connect(String),
    Tls(String),
    /// An HTTP status outside the expected ranges.
    Status(u16),
    /// The body did not contain the expected text.
    BodyMismatch,
    /// The server did not speak HTTP/1.x correctly.
    Http(String),
    /// The probe itself could not be built (bad header, bad path).
    Config(String),
}

impl Failure {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Failure::Timeout(_) => "timeout",
            Failure::Refused => "refused",
            Failure::Connect(_) => "connect",
            Failure::Tls(_) => "tls",
            Failure::Status(_) => "status",
            Failure::BodyMismatch => "body",
            Failure::Http(_) => "http",
            Failure::Config(_) => "config",
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Timeout(d) => write!(f, "timeout after {}", model::units::format_duration(*d)),
            Failure::Refused => f.write_str("connection refused"),
            Failure::Connect(e) => write!(f, "connect failed: {e}"),
            Failure::Tls(e) => write!(f, "TLS error: {e}"),
            Failure::Status(s) => write!(f, "status {s}"),
            Failure::BodyMismatch => f.write_str("body mismatch"),
            Failure::Http(e) => write!(f, "invalid HTTP response: {e}"),
            Failure::Config(e) => write!(f, "bad probe settings: {e}"),
        }
    }
}

/// The outcome of one probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Time from the start of the probe to its verdict.
    pub latency: Duration,
    pub result: Result<(), Failure>,
}

/// A monitor made ready to probe: headers parsed, TLS configured, once.
#[derive(Clone, Debug)]
pub struct Prober {
    protocol: Protocol,
    path: String,
    headers: Vec<(String, String)>,
    host_header: Option<String>,
    expected_status: Vec<StatusRange>,
    body: Option<String>,
    timeout: Duration,
    sni: Option<String>,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Prober {
    /// Prepares a monitor. Fails only on settings the model could not check (header syntax) or
    /// when the system's trust store cannot be read.
    pub fn new(m: &Monitor) -> Result<Self, String> {
        let mut headers = Vec::new();
        let mut host_header = None;
        for (k, v) in &m.headers {
            if !http1::valid_header_name(k) {
                return Err(format!("invalid header name {k:?}"));
            }
            if !http1::valid_header_value(v) {
                return Err(format!("invalid value for header {k}"));
            }
            if k.eq_ignore_ascii_case("host") {
                host_header = Some(v.clone());
            } else {
                headers.push((k.clone(), v.clone()));
            }
        }
        if !http1::valid_path(&m.path) {
            return Err(format!("invalid path {:?}", m.path));
        }
        let tls = match m.protocol {
            Protocol::Https => Some(crate::tls::client_config(m.tls_verify)?),
            _ => None,
        };
        Ok(Prober {
            protocol: m.protocol,
            path: m.path.clone(),
            headers,
            host_header,
            expected_status: m.expected_status.clone(),
            body: m.body.clone(),
            timeout: m.timeout,
            sni: m.sni.clone(),
            tls,
        })
    }

    /// Runs one probe against `dest`.
    pub async fn probe(&self, dest: &Destination) -> Outcome {
        let start = Instant::now();
        let result = match tokio::time::timeout(self.timeout, self.attempt(dest)).await {
            Ok(r) => r,
            Err(_) => Err(Failure::Timeout(self.timeout)),
        };
        Outcome {
            latency: start.elapsed(),
            result,
        }
    }

    async fn attempt(&self, dest: &Destination) -> Result<(), Failure> {
        let stream = connect(dest).await?;
        // Close every probe connection with a reset, as HAProxy does: the verdict is known by
        // then, and skipping the FIN exchange and TIME_WAIT halves the kernel's work per probe
        // and keeps 10,000 targets from exhausting ports.
        let _ = stream.set_zero_linger();
        match self.protocol {
            Protocol::Tcp => Ok(()),
            Protocol::Http => self.http(stream, dest).await,
            Protocol::Https => {
                let name = self
                    .sni
                    .clone()
                    .or_else(|| self.host_header.clone())
                    .unwrap_or_else(|| dest.host());
                let server_name = ServerName::try_from(strip_port(&name).to_string())
                    .map_err(|_| Failure::Config(format!("invalid TLS server name {name:?}")))?;
                let tls = self
                    .tls
                    .as_ref()
                    .ok_or_else(|| Failure::Config("TLS not configured".into()))?;
                let stream = TlsConnector::from(tls.clone())
                    .connect(server_name, stream)
                    .await
                    .map_err(|e| Failure::Tls(tls_reason(&e)))?;
                self.http(stream, dest).await
            }
        }
    }

    async fn http<S>(&self, mut stream: S, dest: &Destination) -> Result<(), Failure>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let request = self.request(dest);
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| Failure::Http(format!("sending the request: {e}")))?;
        let mut buf = Vec::with_capacity(1024);
        let (status, head_len, framing) = loop {
            if read_more(&mut stream, &mut buf, HEAD_LIMIT).await? == 0 {
                return Err(Failure::Http("connection closed before a response".into()));
            }
            if let Some(head) = http1::parse_head(&buf)? {
                break head;
            }
        };
        if !self.expected_status.iter().any(|r| r.contains(status)) {
            return Err(Failure::Status(status));
        }
        let Some(expected) = &self.body else {
            return Ok(());
        };
        // Read until the body is complete, the text is found, or the limit is reached.
        let limit = head_len + BODY_LIMIT + 64 * 1024;
        loop {
            let (body, complete) = http1::body(&buf[head_len..], framing)?;
            if contains(&body, expected.as_bytes()) {
                return Ok(());
            }
            if complete || body.len() >= BODY_LIMIT || buf.len() >= limit {
                return Err(Failure::BodyMismatch);
            }
            if read_more(&mut stream, &mut buf, limit).await? == 0 {
                return match framing {
                    http1::Framing::UntilClose => Err(Failure::BodyMismatch),
                    _ => Err(Failure::Http("connection closed mid-body".into())),
                };
            }
        }
    }

    /// The request head: fixed per prober but for the Host header.
    fn request(&self, dest: &Destination) -> String {
        let host = self.host_header.clone().unwrap_or_else(|| match dest {
            Destination::Addr(a) => a.to_string(),
            Destination::Host(h, p) => format!("{h}:{p}"),
        });
        let mut req = format!(
            "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: tandem-health/{}\r\nConnection: close\r\n",
            self.path,
            env!("CARGO_PKG_VERSION")
        );
        for (k, v) in &self.headers {
            req.push_str(k);
            req.push_str(": ");
            req.push_str(v);
            req.push_str("\r\n");
        }
        req.push_str("\r\n");
        req
    }
}

/// Largest response head accepted.
const HEAD_LIMIT: usize = 16 * 1024;

/// Reads what is available into `buf`, up to `limit` bytes in all; 0 at end of stream.
async fn read_more<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    limit: usize,
) -> Result<usize, Failure> {
    if buf.len() >= limit {
        return Err(Failure::Http(format!("response larger than {limit} bytes")));
    }
    let mut chunk = [0u8; 8192];
    let want = chunk.len().min(limit - buf.len());
    let n = stream
        .read(&mut chunk[..want])
        .await
        .map_err(|e| Failure::Http(format!("reading the response: {e}")))?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

fn strip_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => host.trim_start_matches('[').trim_end_matches(']'),
    }
}

async fn connect(dest: &Destination) -> Result<TcpStream, Failure> {
    let addr = match dest {
        Destination::Addr(a) => *a,
        Destination::Host(h, p) => tokio::net::lookup_host((h.as_str(), *p))
            .await
            .map_err(|e| Failure::Connect(format!("cannot resolve {h}: {e}")))?
            .next()
            .ok_or_else(|| Failure::Connect(format!("{h} has no address")))?,
    };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| Failure::Connect(e.to_string()))?;
    let stream = socket.connect(addr).await.map_err(|e| match e.kind() {
        io::ErrorKind::ConnectionRefused => Failure::Refused,
        _ => Failure::Connect(e.to_string()),
    })?;
    Ok(stream)
}

fn tls_reason(e: &io::Error) -> String {
    match e.get_ref() {
        Some(inner) => inner.to_string(),
        None => e.to_string(),
    }
}
