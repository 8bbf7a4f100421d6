//! Test fixtures: real servers on loopback whose behaviour a test changes while they run, and
//! waiting for a condition with a deadline instead of sleeping; real etcd members; multi-site
//! labs in network namespaces ([`netns`]).

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod netns;
pub mod pki;

pub use netns::{EtcdCluster, Lab, Proc};

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

/// What an [`HttpServer`] does with the next requests.
#[derive(Clone, Debug)]
pub enum Behaviour {
    /// Answer with this status and body.
    Answer(u16, String),
    /// Read the request and never answer.
    Hang,
}

#[derive(Debug, Default)]
struct State {
    behaviour: Option<Behaviour>,
    last_request: Option<String>,
    last_sni: Option<String>,
    requests: u64,
}

/// A one-request-per-connection HTTP/1.1 server, optionally over TLS, that can be stopped (the
/// port then refuses connections) and started again on the same address.
pub struct HttpServer {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    tls: Option<TlsAcceptor>,
    task: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// A plain HTTP server on `127.0.0.1` answering `200 ok`.
    pub async fn start() -> Self {
        Self::bind("127.0.0.1:0".parse().unwrap(), None).await
    }

    /// A plain HTTP server on a chosen address (port 0 for any).
    pub async fn start_on(addr: SocketAddr) -> Self {
        Self::bind(addr, None).await
    }

    /// An HTTPS server with a self-signed certificate for `localhost`; returns the certificate
    /// in PEM so a test can trust it.
    pub async fn start_tls() -> (Self, String) {
        let key = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let pem = key.cert.pem();
        let cert = CertificateDer::from(key.cert.der().to_vec());
        let pkey = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.signing_key.serialize_der()));
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], pkey)
        .unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let server = Self::bind("127.0.0.1:0".parse().unwrap(), Some(acceptor)).await;
        (server, pem)
    }

    async fn bind(addr: SocketAddr, tls: Option<TlsAcceptor>) -> Self {
        let mut server = HttpServer {
            addr,
            state: Arc::new(Mutex::new(State {
                behaviour: Some(Behaviour::Answer(200, "ok".into())),
                ..State::default()
            })),
            tls,
            task: None,
        };
        server.resume().await;
        server
    }

    /// Sets what the next requests get.
    pub fn set(&self, b: Behaviour) {
        self.state.lock().unwrap().behaviour = Some(b);
    }

    /// The raw head of the last request received.
    pub fn last_request(&self) -> Option<String> {
        self.state.lock().unwrap().last_request.clone()
    }

    /// The server name the last TLS client asked for.
    pub fn last_sni(&self) -> Option<String> {
        self.state.lock().unwrap().last_sni.clone()
    }

    pub fn requests(&self) -> u64 {
        self.state.lock().unwrap().requests
    }

    /// Starts closing the listener; [`HttpServer::kill`] waits until it is closed.
    pub fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    /// Closes the listener and waits until it is gone: from then on connections are refused.
    pub async fn kill(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }

    /// Listens again on the same address.
    pub async fn resume(&mut self) {
        self.kill().await;
        let listener = bind_tcp(self.addr).await;
        self.addr = listener.local_addr().unwrap();
        let state = self.state.clone();
        let tls = self.tls.clone();
        self.task = Some(tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = state.clone();
                let tls = tls.clone();
                conns.spawn(async move {
                    match tls {
                        None => serve(stream, state).await,
                        Some(acceptor) => {
                            if let Ok(s) = acceptor.accept(stream).await {
                                let sni = s.get_ref().1.server_name().map(str::to_string);
                                state.lock().unwrap().last_sni = sni;
                                serve(s, state).await;
                            }
                        }
                    }
                });
                while conns.try_join_next().is_some() {}
            }
        }));
    }
}

impl std::fmt::Debug for HttpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpServer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Binds a TCP listener, retrying for up to 2 s: a port just closed can take a moment to be
/// free again.
pub async fn bind_tcp(addr: SocketAddr) -> TcpListener {
    let mut last = None;
    for _ in 0..100 {
        match TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("cannot bind {addr}: {last:?}");
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, state: Arc<Mutex<State>>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let behaviour = {
        let mut st = state.lock().unwrap();
        st.requests += 1;
        st.last_request = Some(String::from_utf8_lossy(&buf).into_owned());
        st.behaviour.clone()
    };
    match behaviour {
        Some(Behaviour::Answer(status, body)) => {
            let resp = format!(
                "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
            let _ = s.shutdown().await;
        }
        Some(Behaviour::Hang) | None => {
            // Hold the connection open until the client gives up.
            let _ = s.read(&mut chunk).await;
        }
    }
}

/// Fetches a value again and again until `check` holds for it, failing the test after
/// `deadline` with the value as last fetched (a fetch still running then is abandoned).
pub async fn eventually_shows<T, F, Fut>(
    deadline: Duration,
    what: &str,
    mut fetch: F,
    check: impl Fn(&T) -> bool,
) -> T
where
    T: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let end = tokio::time::Instant::now() + deadline;
    let mut last = None;
    loop {
        if let Ok(Some(v)) = tokio::time::timeout_at(end, fetch()).await {
            if check(&v) {
                return v;
            }
            last = Some(v);
        }
        assert!(
            tokio::time::Instant::now() < end,
            "timed out after {deadline:?} waiting for {what}; last seen: {}",
            last.map_or_else(|| "nothing".to_string(), |v| v.to_string())
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls `check` until it returns `Some`, failing the test after `deadline` (a check still
/// running then is abandoned).
pub async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        // A check that hangs (a server that accepts and never answers) is bounded too.
        if let Ok(Some(v)) = tokio::time::timeout_at(end, check()).await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A loopback port that nothing listens on (bound, then released).
pub fn closed_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A TCP port free on every one of `ips` at the time of the call.
pub fn free_tcp_port(ips: &[&str]) -> u16 {
    loop {
        let first = std::net::TcpListener::bind((ips[0], 0)).unwrap();
        let port = first.local_addr().unwrap().port();
        if ips[1..]
            .iter()
            .all(|ip| std::net::TcpListener::bind((*ip, port)).is_ok())
        {
            return port;
        }
    }
}

/// A loopback port free for both UDP and TCP at the time of the call.
pub fn free_udp_tcp_port(ip: std::net::IpAddr) -> u16 {
    loop {
        let udp = std::net::UdpSocket::bind((ip, 0)).unwrap();
        let port = udp.local_addr().unwrap().port();
        if std::net::TcpListener::bind((ip, port)).is_ok() {
            return port;
        }
    }
}

/// `dig`'s short answer for a name from a server, or `None` when it got no answer.
pub fn dig(server: SocketAddr, name: &str, extra: &[&str]) -> Option<Vec<String>> {
    let out = std::process::Command::new("dig")
        .arg(format!("@{}", server.ip()))
        .args([
            "-p",
            &server.port().to_string(),
            name,
            "+short",
            "+norec",
            "+time=1",
            "+tries=1",
        ])
        .args(extra)
        .output()
        .expect("dig is installed (scripts/test installs dnsutils)");
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("connection timed out") || text.contains("communications error") {
        return None;
    }
    Some(text.lines().map(str::to_string).collect())
}

/// The median and the maximum of measurements (panics on none).
pub fn median_max(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[v.len() - 1])
}

/// Sends `signal` to every PostgreSQL process whose working directory is the data directory
/// `data` (a member's postmaster and its children); how many.
pub fn signal_postgres_in(data: &std::path::Path, signal: nix::sys::signal::Signal) -> usize {
    let Ok(data) = std::fs::canonicalize(data) else {
        return 0;
    };
    let mut n = 0;
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return 0;
    };
    for entry in procs.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cwd = std::fs::read_link(entry.path().join("cwd")).ok();
        let exe = std::fs::read_link(entry.path().join("exe")).ok();
        if cwd.as_deref() == Some(data.as_path())
            && exe.is_some_and(|e| e.to_string_lossy().contains("postgres"))
        {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
            n += 1;
        }
    }
    n
}

/// A real single-member etcd (Debian's `etcd-server`) on loopback, with its data in a
/// temporary directory; killed and removed when dropped.
pub struct EtcdMember {
    /// `http://127.0.0.1:PORT` (`https://` with TLS).
    pub endpoint: String,
    pub peer: String,
    /// The member's name, and the `--initial-cluster` it was started with.
    name: String,
    initial_cluster: String,
    child: Option<std::process::Child>,
    dir: std::path::PathBuf,
    /// With TLS: the member's CA, and the client certificate etcdctl uses.
    tls: Option<(std::path::PathBuf, pki::Issued)>,
}

impl std::fmt::Debug for EtcdMember {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdMember")
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

impl EtcdMember {
    /// Starts a member and waits (at most 20 s) until it answers.
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// A member that serves clients over TLS with a certificate from `pki` and accepts only
    /// clients with a certificate from it (etcd's `--client-cert-auth`).
    pub async fn start_tls(pki: &pki::Pki) -> Self {
        Self::start_with(Some(pki)).await
    }

    /// Starts `n` members forming one cluster (each with its own ports and data) and waits
    /// (at most 20 s each) until every one answers.
    pub async fn start_cluster(n: usize) -> Vec<Self> {
        let mut members: Vec<Self> = (0..n)
            .map(|i| Self::unstarted(None, &format!("m{i}")))
            .collect();
        let initial = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        for m in &mut members {
            m.initial_cluster.clone_from(&initial);
            m.spawn();
        }
        for m in &members {
            m.wait_ready().await;
        }
        members
    }

    async fn start_with(pki: Option<&pki::Pki>) -> Self {
        let mut m = Self::unstarted(pki, "t");
        m.spawn();
        m.wait_ready().await;
        m
    }

    /// A member with its own ports and directory, not started, alone in its cluster.
    fn unstarted(pki: Option<&pki::Pki>, name: &str) -> Self {
        let mut taken = Vec::new();
        let mut port = || loop {
            let p = free_tcp_port(&["127.0.0.1"]);
            if !taken.contains(&p) {
                taken.push(p);
                return p;
            }
        };
        let (client, peer) = (port(), port());
        let dir = std::env::temp_dir().join(format!("tandem-etcd-{}-{client}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let scheme = if pki.is_some() { "https" } else { "http" };
        let peer = format!("http://127.0.0.1:{peer}");
        EtcdMember {
            endpoint: format!("{scheme}://127.0.0.1:{client}"),
            initial_cluster: format!("{name}={peer}"),
            name: name.to_string(),
            peer,
            child: None,
            tls: pki.map(|p| {
                (
                    p.ca(),
                    p.issue(&format!("etcd-{client}"), &["127.0.0.1", "localhost"]),
                )
            }),
            dir,
        }
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.join("etcd.log")).unwrap();
        let mut etcd = std::process::Command::new("etcd");
        if let Some((ca, issued)) = &self.tls {
            etcd.arg("--cert-file")
                .arg(&issued.cert)
                .arg("--key-file")
                .arg(&issued.key)
                .arg("--trusted-ca-file")
                .arg(ca)
                .arg("--client-cert-auth");
        }
        let child = etcd
            .args(["--name", &self.name, "--data-dir"])
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", &self.endpoint])
            .args(["--advertise-client-urls", &self.endpoint])
            .args(["--listen-peer-urls", &self.peer])
            .args(["--initial-advertise-peer-urls", &self.peer])
            .args(["--initial-cluster", &self.initial_cluster])
            // A member started again does not call an election and stall the others (etcd
            // 3.5's default).
            .args(["--pre-vote=true"])
            .args(["--log-level", "warn"])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("etcd is installed (scripts/test installs etcd-server)");
        self.child = Some(child);
    }

    /// Runs `etcdctl` against this member; its stdout.
    pub fn etcdctl(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.endpoint])
            .args(self.etcdctl_tls())
            .args(args)
            .output()
            .expect("etcdctl is installed (scripts/test installs etcd-client)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// etcdctl's TLS flags for this member: its CA and a client certificate.
    fn etcdctl_tls(&self) -> Vec<String> {
        match &self.tls {
            Some((ca, issued)) => vec![
                format!("--cacert={}", ca.display()),
                format!("--cert={}", issued.cert.display()),
                format!("--key={}", issued.key.display()),
            ],
            None => Vec::new(),
        }
    }

    async fn wait_ready(&self) {
        let ep = self.endpoint.clone();
        let tls = self.etcdctl_tls();
        eventually(Duration::from_secs(20), "etcd to answer", || {
            let (ep, tls) = (ep.clone(), tls.clone());
            async move {
                let out = tokio::process::Command::new("etcdctl")
                    .env("ETCDCTL_API", "3")
                    .args(&tls)
                    .args(["--endpoints", &ep, "endpoint", "health"])
                    .output()
                    .await
                    .ok()?;
                out.status.success().then_some(())
            }
        })
        .await;
    }

    /// Kills the member (its data stays).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on its data and waits until it answers.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn();
        self.wait_ready().await;
    }
}

impl Drop for EtcdMember {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
