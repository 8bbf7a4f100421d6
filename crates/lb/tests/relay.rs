//! The load balancer with real parts: backends are real TCP and UDP servers on loopback
//! addresses of their own, probed by the real health engine; clients are real sockets.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use health::{Engine, Status};
use lb::{Balancer, Running};
use testkit::{bind_tcp, eventually, free_tcp_port, free_udp_tcp_port};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};
use tokio::task::JoinHandle;

/// A TCP backend: answers each line with `NAME LINE`; a PROXY v2 header, when sent, is read
/// first and remembered. Its probe port is a separate listener that can be stopped alone.
struct Backend {
    name: String,
    data: SocketAddr,
    health_port: u16,
    data_task: Option<JoinHandle<()>>,
    health_task: Option<JoinHandle<()>>,
    proxy_header: Arc<std::sync::Mutex<Option<Vec<u8>>>>,
    accepted: Arc<AtomicU64>,
}

impl Backend {
    async fn start(name: &str, ip: &str, data_port: u16, health_port: u16) -> Self {
        let mut b = Backend {
            name: name.into(),
            data: format!("{ip}:{data_port}").parse().unwrap(),
            health_port,
            data_task: None,
            health_task: None,
            proxy_header: Arc::default(),
            accepted: Arc::default(),
        };
        b.start_data(false).await;
        b.start_health().await;
        b
    }

    async fn start_data(&mut self, expect_proxy: bool) {
        let l = bind_tcp(self.data).await;
        let (name, header, accepted) = (
            self.name.clone(),
            self.proxy_header.clone(),
            self.accepted.clone(),
        );
        self.data_task = Some(tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else {
                    continue;
                };
                accepted.fetch_add(1, Ordering::Relaxed);
                let (name, header) = (name.clone(), header.clone());
                tokio::spawn(async move {
                    let mut s = BufReader::new(s);
                    if expect_proxy {
                        let mut fixed = [0u8; 16];
                        s.read_exact(&mut fixed).await.unwrap();
                        let len = u16::from_be_bytes([fixed[14], fixed[15]]) as usize;
                        let mut rest = vec![0u8; len];
                        s.read_exact(&mut rest).await.unwrap();
                        let mut all = fixed.to_vec();
                        all.extend(rest);
                        *header.lock().unwrap() = Some(all);
                    }
                    let mut line = String::new();
                    while s.read_line(&mut line).await.unwrap_or(0) > 0 {
                        let reply = format!("{name} {line}");
                        if s.get_mut().write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                        line.clear();
                    }
                });
            }
        }));
    }

    async fn start_health(&mut self) {
        let l = bind_tcp(SocketAddr::new(self.data.ip(), self.health_port)).await;
        self.health_task = Some(tokio::spawn(async move {
            loop {
                let _ = l.accept().await;
            }
        }));
    }

    /// The process dies: both ports refuse from the moment this returns.
    async fn kill(&mut self) {
        self.stop_data().await;
        self.stop_health().await;
    }

    async fn stop_data(&mut self) {
        if let Some(t) = self.data_task.take() {
            t.abort();
            let _ = t.await;
        }
    }

    async fn stop_health(&mut self) {
        if let Some(t) = self.health_task.take() {
            t.abort();
            let _ = t.await;
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        for t in [self.data_task.take(), self.health_task.take()]
            .into_iter()
            .flatten()
        {
            t.abort();
        }
    }
}

/// A UDP echo backend answering `NAME payload` (the payload after a PROXY v2 header, when one
/// starts the datagram), keeping every datagram it receives; probed on a TCP health port.
struct UdpBackend {
    name: &'static str,
    data: SocketAddr,
    received: Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl UdpBackend {
    async fn start(name: &'static str, ip: &str, health_port: u16) -> Self {
        let echo = UdpSocket::bind((ip, 0)).await.unwrap();
        let data = echo.local_addr().unwrap();
        let received: Arc<std::sync::Mutex<Vec<Vec<u8>>>> = Arc::default();
        let kept = received.clone();
        let echo_task = tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            loop {
                let Ok((n, from)) = echo.recv_from(&mut buf).await else {
                    continue;
                };
                let d = &buf[..n];
                kept.lock().unwrap().push(d.to_vec());
                let payload = if n >= 16 && d.starts_with(&lb::proxy_v2::SIGNATURE) {
                    &d[(16 + usize::from(u16::from_be_bytes([d[14], d[15]]))).min(n)..]
                } else {
                    d
                };
                let reply = [name.as_bytes(), b" ", payload].concat();
                let _ = echo.send_to(&reply, from).await;
            }
        });
        let hl = bind_tcp(SocketAddr::new(data.ip(), health_port)).await;
        let health_task = tokio::spawn(async move {
            loop {
                let _ = hl.accept().await;
            }
        });
        UdpBackend {
            name,
            data,
            received,
            tasks: vec![echo_task, health_task],
        }
    }

    fn received(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    /// The process dies: its socket and its probe port are closed when this returns.
    async fn kill(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
            let _ = t.await;
        }
    }
}

impl Drop for UdpBackend {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

struct Setup {
    engine: Arc<Engine>,
    running: Running,
    frontend: SocketAddr,
}

impl Setup {
    /// A balancer from topology text `lb` (with `{frontend}`, `{health}`, `{p}` filled in)
    /// probing its backends with a tcp monitor on the health port.
    fn start(lb_toml: &str, health_port: u16) -> Self {
        // Free for TCP and UDP: a UDP frontend shares its port with SO_REUSEPORT, so a port
        // taken by another test's UDP frontend would split the datagrams between the two.
        let ip: IpAddr = [127, 0, 3, 1].into();
        let frontend = SocketAddr::new(ip, free_udp_tcp_port(ip));
        let text = format!(
            "[[site]]\nname = \"edge\"\nrole = \"edge\"\n\
             [[monitor]]\nname = \"alive\"\nprotocol = \"tcp\"\nport = {health_port}\n\
             interval = \"100ms\"\ntimeout = \"80ms\"\ntolerated_failures = 1\nrecovery_successes = 2\n\
             {}",
            lb_toml.replace("{frontend}", &frontend.to_string())
        );
        let t = match model::parse(model::Source::new("t.toml", text)) {
            Ok(t) => t,
            Err(d) => panic!("{}", d.render()),
        };
        let engine = Arc::new(
            Engine::start(health::targets(&t), &t.monitors, health::Options::default()).unwrap(),
        );
        let balancer = Balancer::new(t.load_balancers[0].clone(), engine.clone());
        tokio::spawn(balancer.clone().follow_health(engine.subscribe()));
        let running = Running::start(balancer, 2).unwrap();
        Setup {
            engine,
            running,
            frontend,
        }
    }

    fn balancer(&self) -> &Arc<Balancer> {
        &self.running.balancer
    }

    async fn wait_online(&self, backend: SocketAddr) {
        let id = health::backend_id(&self.balancer().config.name, backend);
        eventually(Duration::from_secs(5), "backend Online", || async {
            (self.engine.status(&id) == Some(Status::Online)).then_some(())
        })
        .await;
        eventually(Duration::from_secs(5), "backend takes flows", || async {
            self.backend_view(backend).takes_new_flows.then_some(())
        })
        .await;
    }

    /// Waits until the balancer stops giving `backend` new flows.
    async fn wait_out(&self, backend: SocketAddr) {
        eventually(
            Duration::from_secs(5),
            "backend out of rotation",
            || async { (!self.backend_view(backend).takes_new_flows).then_some(()) },
        )
        .await;
    }

    /// The API's view of one backend.
    fn backend_view(&self, backend: SocketAddr) -> lb::balancer::BackendView {
        self.balancer()
            .view()
            .backends
            .into_iter()
            .find(|b| b.address == backend)
            .unwrap_or_else(|| panic!("{backend} is not in the pool"))
    }

    /// Opens a flow from `source` (an address of ours) and asks one line.
    async fn ask_from(&self, source: Option<IpAddr>, line: &str) -> Outcome {
        new_flow(self.frontend, source, line).await.0
    }
}

/// How long an exchange may take before it counts as a stall.
const STALL: Duration = Duration::from_secs(5);

/// How a TCP exchange through the balancer ended, told apart precisely: each feature promises
/// one of these, and a stall must never pass for a refusal or a reset.
#[derive(Debug, PartialEq, Eq, Hash)]
enum Outcome {
    /// The backend of this name answered.
    Answer(String),
    /// The connection was refused: ECONNREFUSED, or a reset before any answer on a new
    /// connection (how a listener that accepted refuses).
    Refused,
    /// An established flow was reset (ECONNRESET).
    Reset,
    /// A clean close (end of stream).
    Closed,
    /// No answer before the deadline ([`STALL`]).
    Stalled,
}

/// The answer of the backend `name`.
fn by(name: &str) -> Outcome {
    Outcome::Answer(name.into())
}

async fn connect(to: SocketAddr, source: Option<IpAddr>) -> Result<BufReader<TcpStream>, Outcome> {
    let socket = TcpSocket::new_v4().unwrap();
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0)).unwrap();
    }
    match tokio::time::timeout(STALL, socket.connect(to)).await {
        Ok(Ok(s)) => Ok(BufReader::new(s)),
        // On loopback the RST of a listener that accepted and refused can beat the connect.
        Ok(Err(e))
            if matches!(
                e.kind(),
                io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset
            ) =>
        {
            Err(Outcome::Refused)
        }
        Ok(Err(e)) => panic!("connect to {to}: {e}"),
        Err(_) => Err(Outcome::Stalled),
    }
}

/// A new connection asking one line: a reset before the answer is a refusal.
async fn new_flow(
    to: SocketAddr,
    source: Option<IpAddr>,
    line: &str,
) -> (Outcome, Option<BufReader<TcpStream>>) {
    let mut s = match connect(to, source).await {
        Ok(s) => s,
        Err(o) => return (o, None),
    };
    match ask(&mut s, line).await {
        Outcome::Reset => (Outcome::Refused, None),
        o => (o, Some(s)),
    }
}

/// Sends a line on an established flow and reads the reply's backend name.
async fn ask(s: &mut BufReader<TcpStream>, line: &str) -> Outcome {
    if let Err(e) = s.get_mut().write_all(format!("{line}\n").as_bytes()).await {
        return failed(e);
    }
    let mut reply = String::new();
    match tokio::time::timeout(STALL, s.read_line(&mut reply)).await {
        Err(_) => Outcome::Stalled,
        Ok(Err(e)) => failed(e),
        Ok(Ok(0)) => Outcome::Closed,
        Ok(Ok(_)) => by(reply.split_whitespace().next().unwrap_or("")),
    }
}

/// Waits, sending nothing, for an established flow to end: how it ended.
async fn ending(s: &mut BufReader<TcpStream>) -> Outcome {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(STALL, s.read(&mut buf)).await {
        Err(_) => Outcome::Stalled,
        Ok(Err(e)) => failed(e),
        Ok(Ok(0)) => Outcome::Closed,
        Ok(Ok(n)) => panic!("unexpected bytes: {:?}", &buf[..n]),
    }
}

fn failed(e: io::Error) -> Outcome {
    match e.kind() {
        // Writing after a reset arrived gives ECONNRESET once, then EPIPE.
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => Outcome::Reset,
        _ => panic!("unexpected error on an established flow: {e}"),
    }
}

/// How long a UDP reply may take.
const REPLY: Duration = Duration::from_secs(2);

async fn two_udp_backends(ips: [&str; 2]) -> (UdpBackend, UdpBackend, u16) {
    let health = free_tcp_port(&ips);
    let a = UdpBackend::start("a", ips[0], health).await;
    let b = UdpBackend::start("b", ips[1], health).await;
    (a, b, health)
}

fn udp_lb_toml(backends: &[&UdpBackend], extra: &str) -> String {
    let pool: Vec<String> = backends.iter().map(|b| format!("\"{}\"", b.data)).collect();
    format!(
        "[[load_balancer]]\nname = \"dns\"\nsite = \"edge\"\nfrontend = \"{{frontend}}\"\n\
         protocol = \"udp\"\npool = {{ addresses = [{}] }}\nprobe = \"alive\"\n{extra}\n",
        pool.join(", ")
    )
}

/// A UDP client on a source port of its own, which it keeps.
async fn udp_client(frontend: SocketAddr) -> UdpSocket {
    let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    c.connect(frontend).await.unwrap();
    c
}

/// Sends `payload` and waits up to `wait` for its reply: the name of the backend that answered.
/// Late replies to earlier datagrams are skipped.
async fn udp_ask(c: &UdpSocket, payload: &str, wait: Duration) -> Option<String> {
    c.send(payload.as_bytes()).await.unwrap();
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = [0u8; 2048];
    loop {
        let n = tokio::time::timeout_at(deadline, c.recv(&mut buf))
            .await
            .ok()?
            .ok()?;
        let text = String::from_utf8_lossy(&buf[..n]);
        if let Some((name, p)) = text.split_once(' ')
            && p == payload
        {
            return Some(name.to_string());
        }
    }
}

fn pool(backends: &[&Backend], weights: &[u32]) -> String {
    let items: Vec<String> = backends
        .iter()
        .zip(weights)
        .map(|(b, w)| format!("{{ address = \"{}\", weight = {w} }}", b.data))
        .collect();
    format!("[{}]", items.join(", "))
}

fn lb_toml(pool: &str, extra: &str) -> String {
    format!(
        "[[load_balancer]]\nname = \"web\"\nsite = \"edge\"\nfrontend = \"{{frontend}}\"\n\
         pool = {{ addresses = {pool} }}\nprobe = \"alive\"\n{extra}\n"
    )
}

async fn two_backends() -> (Backend, Backend, u16) {
    let data = free_tcp_port(&["127.0.3.11", "127.0.3.12"]);
    let health = free_tcp_port(&["127.0.3.11", "127.0.3.12"]);
    let a = Backend::start("a", "127.0.3.11", data, health).await;
    let b = Backend::start("b", "127.0.3.12", data, health).await;
    (a, b, health)
}

/// An established flow whose first answer came from the backend `name`.
async fn flow_on(s: &Setup, name: &str) -> BufReader<TcpStream> {
    for i in 0..50 {
        let (o, c) = new_flow(s.frontend, None, &format!("{i}")).await;
        if o == by(name) {
            return c.unwrap();
        }
    }
    panic!("no flow landed on {name} in 50 tries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_tuple_spreads_by_weight_and_source_ip_sticks() {
    let (a, b, hp) = two_backends().await;
    let s = Setup::start(&lb_toml(&pool(&[&a, &b], &[1, 3]), ""), hp);
    s.wait_online(a.data).await;
    s.wait_online(b.data).await;
    let mut to_b = 0;
    for i in 0..400 {
        if s.ask_from(None, &format!("q{i}")).await == by("b") {
            to_b += 1;
        }
    }
    // Expect 300 of 400 (binomial sd ≈ 8.7): ±60 is about 7 sd.
    assert!(
        (240..=360).contains(&to_b),
        "{to_b} of 400 to the weight-3 backend"
    );

    let s = Setup::start(
        &lb_toml(&pool(&[&a, &b], &[1, 1]), "distribution = \"source-ip\""),
        hp,
    );
    s.wait_online(a.data).await;
    s.wait_online(b.data).await;
    let mut seen = std::collections::HashSet::new();
    for host in 20..40u8 {
        let ip: IpAddr = [127, 0, 4, host].into();
        let first = s.ask_from(Some(ip), "x").await;
        assert!(matches!(first, Outcome::Answer(_)), "{first:?}");
        for _ in 0..5 {
            assert_eq!(s.ask_from(Some(ip), "x").await, first, "affinity of {ip}");
        }
        seen.insert(first);
    }
    assert_eq!(seen.len(), 2, "twenty sources use both backends");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_dying_mid_loop_costs_no_client_a_connection() {
    let (mut a, b, hp) = two_backends().await;
    let s = Setup::start(&lb_toml(&pool(&[&a, &b], &[1, 1]), ""), hp);
    s.wait_online(a.data).await;
    s.wait_online(b.data).await;
    let mut events = s.balancer().events();
    let mut failed = 0;
    for i in 0..300 {
        if i == 100 {
            a.kill().await;
        }
        let o = s.ask_from(None, "hi").await;
        if !matches!(o, Outcome::Answer(_)) {
            failed += 1;
        }
    }
    assert_eq!(failed, 0, "failed client connections");
    let ejected = loop {
        let e = tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .expect("an ejected event within 10 s")
            .unwrap();
        if e.kind == "ejected" {
            break e;
        }
    };
    assert_eq!(ejected.subject, format!("web/{}", a.data));
    assert!(
        ejected.message.contains("Connection refused"),
        "{}",
        ejected.message
    );
    let view = s.balancer().view();
    let va = view.backends.iter().find(|x| x.address == a.data).unwrap();
    assert!(!va.takes_new_flows);
    assert_eq!(
        va.ejections, 1,
        "ejected once, at the first refused connect"
    );
    // It comes back through its probe.
    a.start_data(false).await;
    a.start_health().await;
    s.wait_online(a.data).await;
}

/// A listener on `addr` that never accepts, its accept queue filled: the kernel drops every
/// further SYN, so a connect there is neither answered nor refused (a hung host, on loopback).
/// Keep what it returns alive for as long as the hole is needed.
async fn black_hole(addr: SocketAddr) -> (std::net::TcpListener, Vec<TcpStream>) {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.set_reuse_address(true).unwrap();
    s.bind(&addr.into()).unwrap();
    // A backlog of 0 holds one connection; the next SYN is dropped.
    s.listen(0).unwrap();
    let listener = std::net::TcpListener::from(s);
    let mut queued = Vec::new();
    for _ in 0..8 {
        match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
            Ok(Ok(c)) => queued.push(c),
            Ok(Err(e)) => panic!("filling the accept queue of {addr}: {e}"),
            Err(_) => return (listener, queued), // unanswered: the queue is full
        }
    }
    panic!("the accept queue of {addr} never filled");
}

/// README, `connect_timeout`: a connect that fails or times out is retried at once on the next
/// backend, and ejects the backend until its probe brings it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_or_timed_out_connect_is_retried_on_the_next_backend_and_ejects_it() {
    for refused in [true, false] {
        let (mut a, b, hp) = two_backends().await;
        // `a` wins nearly every flow's first choice (weight 100 to 1).
        let s = Setup::start(
            &lb_toml(&pool(&[&a, &b], &[100, 1]), "connect_timeout = \"300ms\""),
            hp,
        );
        s.wait_online(a.data).await;
        s.wait_online(b.data).await;
        let id = health::backend_id("web", a.data);
        let mut health_events = s.engine.events();
        let mut events = s.balancer().events();
        // Its data port fails while its probe port answers: only the data plane can tell.
        a.stop_data().await;
        let _hole = if refused {
            None
        } else {
            Some(black_hole(a.data).await)
        };
        let mut flows = 0;
        while s.backend_view(a.data).ejections == 0 {
            assert!(flows < 20, "20 flows and none tried a");
            assert_eq!(s.ask_from(None, "x").await, by("b"), "the flow lands on b");
            flows += 1;
        }
        let va = s.backend_view(a.data);
        assert_eq!((va.ejections, va.failed_connects), (1, 1));
        let why = if refused {
            "Connection refused"
        } else {
            "timed out after 300ms"
        };
        let ejected = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let e = events.recv().await.unwrap();
                if e.kind == "ejected" {
                    return e;
                }
            }
        })
        .await
        .expect("an ejected event");
        assert_eq!(ejected.subject, format!("web/{}", a.data));
        assert!(ejected.message.contains(why), "{}", ejected.message);
        // Out through the engine, back through its probe (recovery_successes = 2).
        let mut seen = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), async {
            while seen.last().map(|(to, _): &(String, String)| to.as_str()) != Some("Online") {
                let e = health_events.recv().await.unwrap();
                if e.subject == id {
                    seen.push((e.kind, e.message));
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("a back Online; seen {seen:?}"));
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert_eq!(seen[0].0, Status::Degraded.to_string());
        assert!(seen[0].1.contains("ejected"), "{seen:?}");
        s.wait_online(a.data).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn established_flows_survive_probe_down_unless_reset() {
    for reset in [false, true] {
        let (mut a, b, hp) = two_backends().await;
        let extra = if reset {
            "on_backend_down = \"reset\""
        } else {
            ""
        };
        // Only `a` at first, so the flow lands there.
        let s = Setup::start(&lb_toml(&pool(&[&a, &b], &[1, 1]), extra), hp);
        s.wait_online(a.data).await;
        s.wait_online(b.data).await;
        let mut flow = flow_on(&s, "a").await;
        a.stop_health().await;
        s.wait_out(a.data).await;
        for _ in 0..10 {
            assert_eq!(s.ask_from(None, "new").await, by("b"), "new flows avoid a");
        }
        let answer = ask(&mut flow, "still there?").await;
        if reset {
            assert_eq!(
                answer,
                Outcome::Reset,
                "on_backend_down = reset resets the flow"
            );
        } else {
            assert_eq!(answer, by("a"), "the established flow continues");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_finishes_active_flows_then_resets_them() {
    let (a, b, hp) = two_backends().await;
    let s = Setup::start(
        &lb_toml(&pool(&[&a, &b], &[1, 1]), "drain_timeout = \"1s\""),
        hp,
    );
    s.wait_online(a.data).await;
    s.wait_online(b.data).await;
    let mut flow = flow_on(&s, "a").await;
    s.balancer().drain(a.data).unwrap();
    let accepted = a.accepted.load(Ordering::Relaxed);
    for _ in 0..20 {
        assert_eq!(s.ask_from(None, "new").await, by("b"));
    }
    assert_eq!(
        a.accepted.load(Ordering::Relaxed),
        accepted,
        "no new flows to a"
    );
    assert_eq!(
        ask(&mut flow, "during").await,
        by("a"),
        "active flow goes on"
    );
    let view = s.balancer().view();
    assert!(
        view.backends
            .iter()
            .any(|x| x.address == a.data && x.draining)
    );
    // At the drain timeout the flow is reset (README: "then are reset"), not closed.
    assert_eq!(ending(&mut flow).await, Outcome::Reset);
    s.balancer().enable(a.data).unwrap();
    eventually(Duration::from_secs(5), "a takes flows again", || async {
        s.balancer()
            .view()
            .backends
            .iter()
            .any(|x| x.address == a.data && x.takes_new_flows)
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_flows_close_at_the_idle_timeout_and_busy_ones_do_not() {
    let (a, _b, hp) = two_backends().await;
    let s = Setup::start(&lb_toml(&pool(&[&a], &[1]), "idle_timeout = \"1s\""), hp);
    s.wait_online(a.data).await;
    let mut busy = connect(s.frontend, None).await.unwrap();
    let mut idle = connect(s.frontend, None).await.unwrap();
    assert_eq!(ask(&mut idle, "once").await, by("a"));
    // The busy flow talks every 300 ms for 2.4 s, past the idle timeout of the other.
    for i in 0..8 {
        assert_eq!(ask(&mut busy, &format!("{i}")).await, by("a"));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Closed cleanly (idle_reset = false), not reset.
    assert_eq!(ending(&mut idle).await, Outcome::Closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_v2_announces_the_client() {
    let (mut a, _b, hp) = two_backends().await;
    a.stop_data().await;
    a.start_data(true).await;
    let s = Setup::start(&lb_toml(&pool(&[&a], &[1]), "proxy_protocol = true"), hp);
    s.wait_online(a.data).await;
    let mut c = connect(s.frontend, Some([127, 0, 4, 7].into()))
        .await
        .unwrap();
    let client = c.get_ref().local_addr().unwrap();
    assert_eq!(ask(&mut c, "hello").await, by("a"));
    let h = a.proxy_header.lock().unwrap().clone().unwrap();
    assert_eq!(&h[..12], &lb::proxy_v2::SIGNATURE);
    assert_eq!((h[12], h[13]), (0x21, 0x11), "v2 PROXY, TCP over IPv4");
    assert_eq!(&h[16..20], &[127, 0, 4, 7], "source address");
    assert_eq!(&h[20..24], &[127, 0, 3, 1], "destination: the frontend");
    assert_eq!(u16::from_be_bytes([h[24], h[25]]), client.port());
    assert_eq!(u16::from_be_bytes([h[26], h[27]]), s.frontend.port());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_flows_relay_replies_and_expire() {
    // A UDP echo backend answering `NAME payload`, probed on a TCP health port.
    let data = free_tcp_port(&["127.0.3.21"]);
    let echo = UdpSocket::bind(("127.0.3.21", data)).await.unwrap();
    let echo_task = tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        loop {
            let (n, from) = echo.recv_from(&mut buf).await.unwrap();
            let reply = [b"u ".as_slice(), &buf[..n]].concat();
            echo.send_to(&reply, from).await.unwrap();
        }
    });
    let health = free_tcp_port(&["127.0.3.21"]);
    let hl = bind_tcp(format!("127.0.3.21:{health}").parse().unwrap()).await;
    let health_task = tokio::spawn(async move {
        loop {
            let _ = hl.accept().await;
        }
    });
    let backend: SocketAddr = format!("127.0.3.21:{data}").parse().unwrap();
    let s = Setup::start(
        &format!(
            "[[load_balancer]]\nname = \"dns\"\nsite = \"edge\"\nfrontend = \"{{frontend}}\"\n\
             protocol = \"udp\"\npool = {{ addresses = [\"{backend}\"] }}\nprobe = \"alive\"\n\
             idle_timeout = \"1s\"\n"
        ),
        health,
    );
    eventually(
        Duration::from_secs(5),
        "udp backend takes flows",
        || async {
            s.balancer().view().backends[0]
                .takes_new_flows
                .then_some(())
        },
    )
    .await;
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.connect(s.frontend).await.unwrap();
    let mut buf = [0u8; 64];
    for i in 0..3 {
        client.send(format!("ping{i}").as_bytes()).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(2), client.recv(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..n], format!("u ping{i}").as_bytes());
    }
    let v = s.balancer().view();
    assert_eq!(
        (
            v.backends[0].active_connections,
            v.backends[0].total_connections
        ),
        (1, 1)
    );
    eventually(Duration::from_secs(5), "the idle flow expires", || async {
        (s.balancer().view().backends[0].active_connections == 0).then_some(())
    })
    .await;
    echo_task.abort();
    health_task.abort();
}

/// Azure Load Balancer moves a UDP flow to a healthy instance when the probe of its instance
/// fails; so does Tandem, with either `on_backend_down`, at the flow's first datagram after
/// its backend left the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_flow_moves_to_a_healthy_backend_when_its_backend_dies() {
    for mode in ["continue", "reset"] {
        let (mut a, mut b, hp) = two_udp_backends(["127.0.3.31", "127.0.3.32"]).await;
        let extra = format!("on_backend_down = \"{mode}\"\nidle_timeout = \"1m\"");
        let s = Setup::start(&udp_lb_toml(&[&a, &b], &extra), hp);
        s.wait_online(a.data).await;
        s.wait_online(b.data).await;
        let client = udp_client(s.frontend).await;
        let first = udp_ask(&client, "q0", REPLY).await.expect("a reply");
        let (dead, alive) = if first == "a" {
            (&mut a, &b)
        } else {
            (&mut b, &a)
        };
        dead.kill().await;
        // The client goes on sending every 200 ms; what it sends before the probe notices is
        // lost, and keeps the flow from idling out.
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        let mut i = 1;
        while s.backend_view(dead.data).takes_new_flows {
            assert!(i < 50, "{mode}: the probe never took {} out", dead.name);
            tick.tick().await;
            client.send(format!("q{i}").as_bytes()).await.unwrap();
            i += 1;
        }
        for j in 0..3 {
            assert_eq!(
                udp_ask(&client, &format!("after{j}"), REPLY)
                    .await
                    .as_deref(),
                Some(alive.name),
                "{mode}: the flow follows to the healthy backend"
            );
        }
        let (vd, va) = (s.backend_view(dead.data), s.backend_view(alive.data));
        assert_eq!(
            (vd.active_connections, va.active_connections),
            (0, 1),
            "{mode}"
        );
    }
}

/// A drained backend, and one taken out of the pool (as a scale set's scale-in does), keep
/// their established UDP flows until `drain_timeout`; then each flow moves at its next datagram.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_flow_leaves_a_drained_or_removed_backend_at_the_drain_timeout() {
    for remove in [false, true] {
        let (a, b, hp) = two_udp_backends(["127.0.3.33", "127.0.3.34"]).await;
        let extra = "drain_timeout = \"2s\"\nidle_timeout = \"1m\"";
        let s = Setup::start(&udp_lb_toml(&[&a, &b], extra), hp);
        s.wait_online(a.data).await;
        s.wait_online(b.data).await;
        let client = udp_client(s.frontend).await;
        let first = udp_ask(&client, "q0", REPLY).await.expect("a reply");
        let (gone, stays) = if first == "a" { (&a, &b) } else { (&b, &a) };
        let how = if remove { "removed" } else { "drained" };
        let started = tokio::time::Instant::now();
        if remove {
            let id = health::backend_id("dns", stays.data);
            s.balancer().set_members(vec![(stays.data, 1, Some(id))]);
        } else {
            s.balancer().drain(gone.data).unwrap();
        }
        let during = udp_ask(&client, "during", REPLY).await;
        if started.elapsed() < Duration::from_millis(1500) {
            assert_eq!(during.as_deref(), Some(gone.name), "{how}: the flow stays");
        }
        let newcomer = udp_client(s.frontend).await;
        assert_eq!(
            udp_ask(&newcomer, "new", REPLY).await.as_deref(),
            Some(stays.name),
            "{how}: new flows avoid {}",
            gone.name
        );
        // The client sends every 200 ms until a reply comes from the other backend.
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        for i in 0.. {
            assert!(i < 40, "{how}: the flow never left {}", gone.name);
            tick.tick().await;
            let r = udp_ask(&client, &format!("q{i}"), Duration::from_millis(150)).await;
            if r.as_deref() == Some(stays.name) {
                break;
            }
        }
        assert!(
            started.elapsed() >= Duration::from_secs(2),
            "{how}: moved before the drain timeout"
        );
        let received = gone.received();
        for j in 0..3 {
            assert_eq!(
                udp_ask(&client, &format!("after{j}"), REPLY)
                    .await
                    .as_deref(),
                Some(stays.name),
                "{how}"
            );
        }
        assert_eq!(
            gone.received(),
            received,
            "{how}: {} receives nothing more",
            gone.name
        );
        if !remove {
            assert_eq!(s.backend_view(gone.data).active_connections, 0);
        }
    }
}

/// PROXY protocol v2 over UDP (transport DGRAM, haproxy.org's proxy-protocol.txt): every
/// datagram to the backend starts with the header, as dnsdist and BIND read it, and the client
/// gets one reply per datagram it sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_v2_over_udp_prefixes_every_datagram() {
    let hp = free_tcp_port(&["127.0.3.35"]);
    let a = UdpBackend::start("a", "127.0.3.35", hp).await;
    let s = Setup::start(&udp_lb_toml(&[&a], "proxy_protocol = true"), hp);
    s.wait_online(a.data).await;
    let client = UdpSocket::bind("127.0.4.9:0").await.unwrap();
    client.connect(s.frontend).await.unwrap();
    let port = client.local_addr().unwrap().port();
    let mut buf = [0u8; 2048];
    for i in 0..3 {
        client.send(format!("p{i}").as_bytes()).await.unwrap();
        let n = tokio::time::timeout(REPLY, client.recv(&mut buf))
            .await
            .expect("a reply")
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&buf[..n]),
            format!("a p{i}"),
            "each reply answers the datagram just sent"
        );
    }
    let got = a.received.lock().unwrap().clone();
    assert_eq!(
        got.len(),
        3,
        "one datagram to the backend per client datagram"
    );
    for (i, d) in got.iter().enumerate() {
        assert_eq!(&d[..12], &lb::proxy_v2::SIGNATURE, "datagram {i}");
        assert_eq!((d[12], d[13]), (0x21, 0x12), "v2 PROXY, UDP over IPv4");
        assert_eq!(&d[14..16], &[0, 12], "address block length");
        assert_eq!(&d[16..20], &[127, 0, 4, 9], "source address");
        assert_eq!(&d[20..24], &[127, 0, 3, 1], "destination: the frontend");
        assert_eq!(u16::from_be_bytes([d[24], d[25]]), port);
        assert_eq!(u16::from_be_bytes([d[26], d[27]]), s.frontend.port());
        assert_eq!(&d[28..], format!("p{i}").as_bytes(), "the payload follows");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_healthy_backend_refuses_unless_send_all() {
    for send_all in [false, true] {
        let (mut a, _b, hp) = two_backends().await;
        let extra = if send_all {
            "all_down = \"send-all\""
        } else {
            ""
        };
        let s = Setup::start(&lb_toml(&pool(&[&a], &[1]), extra), hp);
        s.wait_online(a.data).await;
        a.stop_health().await; // probe down, data port still serving
        let id = health::backend_id("web", a.data);
        eventually(Duration::from_secs(5), "a Degraded", || async {
            (s.engine.status(&id) == Some(Status::Degraded)).then_some(())
        })
        .await;
        if send_all {
            eventually(
                Duration::from_secs(5),
                "the balancer sees a Degraded",
                || async {
                    let v = s.balancer().view();
                    (v.backends[0].status == Status::Degraded && v.backends[0].takes_new_flows)
                        .then_some(())
                },
            )
            .await;
        } else {
            s.wait_out(a.data).await;
        }
        let r = s.ask_from(None, "x").await;
        if send_all {
            assert_eq!(r, by("a"), "send-all uses the down backend");
        } else {
            assert_eq!(r, Outcome::Refused);
        }
    }
}

/// Megabytes both ways through the balancer arrive intact (the relay switches to splice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_transfers_arrive_intact_both_ways() {
    let (_a, _b, hp) = two_backends().await;
    // An echo server on a third port of a's address.
    let echo_port = free_tcp_port(&["127.0.3.11"]);
    let echo_l = bind_tcp(format!("127.0.3.11:{echo_port}").parse().unwrap()).await;
    let echo = tokio::spawn(async move {
        loop {
            let (mut s, _) = echo_l.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let s = Setup::start(&lb_toml(&format!("[\"127.0.3.11:{echo_port}\"]"), ""), hp);
    eventually(
        Duration::from_secs(5),
        "echo backend takes flows",
        || async {
            s.balancer().view().backends[0]
                .takes_new_flows
                .then_some(())
        },
    )
    .await;
    let data: Vec<u8> = (0..8 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let stream = TcpStream::connect(s.frontend).await.unwrap();
    let (mut r, mut w) = stream.into_split();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::with_capacity(data.len());
    tokio::time::timeout(Duration::from_secs(20), r.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    writer.await.unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == data, "the bytes came back unchanged");
    let v = &s.balancer().view().backends[0];
    assert_eq!(
        (v.bytes_in, v.bytes_out),
        (data.len() as u64, data.len() as u64)
    );
    assert_eq!(
        v.spliced_directions, 2,
        "both directions switched to splice"
    );
    echo.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_map_frontend_ports_to_backend_ports() {
    let (a, _b, hp) = two_backends().await;
    // A second service on another port of a's address.
    let other = free_tcp_port(&["127.0.3.11"]);
    let _alt = Backend::start("alt", "127.0.3.11", other, free_tcp_port(&["127.0.3.11"])).await;
    let front2 = free_tcp_port(&["127.0.3.1"]);
    let s = Setup::start(
        &lb_toml(
            &pool(&[&a], &[1]),
            &format!("rules = [{{ frontend_port = {front2}, backend_port = {other} }}]"),
        ),
        hp,
    );
    s.wait_online(a.data).await;
    assert_eq!(s.ask_from(None, "x").await, by("a"));
    let mut c = connect(SocketAddr::new(s.frontend.ip(), front2), None)
        .await
        .unwrap();
    assert_eq!(ask(&mut c, "x").await, by("alt"), "the rule's backend port");
    let fronts = s.balancer().view().frontends;
    assert_eq!(fronts.len(), 2);
    assert!(
        fronts[1].ends_with(&format!("-> backend port {other}")),
        "{fronts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_changes_apply_live_and_keep_established_flows() {
    let (a, b, hp) = two_backends().await;
    let s = Setup::start(&lb_toml(&pool(&[&a], &[1]), ""), hp);
    s.wait_online(a.data).await;
    let mut flow = connect(s.frontend, None).await.unwrap();
    assert_eq!(ask(&mut flow, "1").await, by("a"));
    // The pool becomes just b (as a scale-in or a new database primary would make it).
    s.balancer().set_members(vec![(b.data, 1, None)]);
    for _ in 0..10 {
        assert_eq!(s.ask_from(None, "new").await, by("b"));
    }
    assert_eq!(
        ask(&mut flow, "2").await,
        by("a"),
        "the established flow goes on"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_reset_resets_instead_of_closing() {
    let (a, _b, hp) = two_backends().await;
    let s = Setup::start(
        &lb_toml(
            &pool(&[&a], &[1]),
            "idle_timeout = \"1s\"\nidle_reset = true",
        ),
        hp,
    );
    s.wait_online(a.data).await;
    let mut idle = connect(s.frontend, None).await.unwrap();
    assert_eq!(ask(&mut idle, "once").await, by("a"));
    assert_eq!(ending(&mut idle).await, Outcome::Reset);
}
