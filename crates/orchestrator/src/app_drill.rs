//! `tandem drill app APP`: a whole-app failover and failback rehearsed the way Azure Site
//! Recovery's test failover is, with clients going through the app's public entry the whole
//! time — the DNS name (asked of Tandem's own DNS listener, re-resolved when its TTL ends) →
//! the site's load balancer → an instance → the database frontend → the primary. The app's
//! instances must serve `POST /write` and `GET /read` (`tandem sample-app --database`).
//!
//! The report gives each move's steps and times, the RTO the clients saw (from the move's
//! start to the first write committed at the target), the longest stretch without an
//! acknowledged write, every client error, and the RPO: acknowledged writes missing from the
//! primary afterwards.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use http_body_util::{BodyExt, Empty};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::app::{AppRunner, MoveView};

/// How often the writer writes, and the reader reads.
const WRITE_EVERY: Duration = Duration::from_millis(50);
const READ_EVERY: Duration = Duration::from_millis(200);
/// One request's bound (DNS, connect and answer).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// Acknowledged writes needed at a site before the drill goes on.
const WRITES_TO_SEE: usize = 5;
/// The longest wait for writes to be acknowledged (before, and after each move).
const WRITES_WAIT: Duration = Duration::from_secs(60);
/// The longest wait for a move to end, and for the preferred site's data to catch up.
const MOVE_WAIT: Duration = Duration::from_secs(300);
/// At most this many distinct client errors are reported.
const ERRORS_KEPT: usize = 20;

/// The app's public entry: its DNS name, asked of `dns`, and the port of its load balancers.
#[derive(Clone, Debug)]
pub struct Entry {
    pub dns: SocketAddr,
    pub domain: String,
    pub port: u16,
}

impl Entry {
    /// The entry of `app`: Tandem's first DNS listener (a wildcard one asked on loopback),
    /// the profile's domain, and the frontend port of the load balancer its preferred site's
    /// endpoint targets (else any load balancer endpoint's).
    ///
    /// # Errors
    /// No DNS listener here, or no endpoint of the profile is a load balancer.
    pub fn of(
        topology: &model::Topology,
        app: &model::App,
        dns_listen: &[SocketAddr],
    ) -> Result<Entry, String> {
        let mut dns = *dns_listen
            .first()
            .ok_or("this node answers no DNS: the drill asks the app's name of Tandem's DNS")?;
        if dns.ip().is_unspecified() {
            dns.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
        }
        let profile = topology
            .profile(&app.profile)
            .ok_or_else(|| format!("no profile {}", app.profile))?;
        let home = app.sites.first().map(model::Name::as_str);
        let port_of = |e: &model::Endpoint| match &e.target {
            model::Target::LoadBalancer(lb) => {
                topology.load_balancer(lb).map(|l| l.frontend.port())
            }
            _ => None,
        };
        let port = profile
            .endpoints
            .iter()
            .filter(|e| topology.endpoint_site(e) == home)
            .find_map(port_of)
            .or_else(|| profile.endpoints.iter().find_map(port_of))
            .ok_or_else(|| {
                format!(
                    "profile {} has no load balancer endpoint: the drill needs the port clients use",
                    app.profile
                )
            })?;
        Ok(Entry {
            dns,
            domain: profile.domain.to_string(),
            port,
        })
    }
}

/// What the clients saw during one move.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ClientView {
    /// From the move's start to the first write served at the target end to end — DNS
    /// answered its load balancer, one of its instances took it, its member committed it —
    /// in seconds.
    pub rto_seconds: Option<f64>,
    /// The longest time between two acknowledged writes from the move's start to that first
    /// write at the target, in seconds (the outage the writer felt).
    pub longest_gap_seconds: Option<f64>,
    /// Writes that failed meanwhile.
    pub failed_writes: u64,
}

/// `tandem drill app`'s report.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AppDrillReport {
    pub app: String,
    /// Both moves done, the writer back home, and no acknowledged write lost.
    pub ok: bool,
    pub error: Option<String>,
    pub from: String,
    pub to: String,
    #[serde(with = "event::time")]
    pub started: SystemTime,
    pub seconds: f64,
    pub failover: Option<MoveView>,
    pub failover_clients: ClientView,
    pub failback: Option<MoveView>,
    pub failback_clients: ClientView,
    pub writes_acknowledged: u64,
    pub writes_failed: u64,
    pub reads_ok: u64,
    pub reads_failed: u64,
    /// Acknowledged writes missing from the primary at the end (the RPO in writes), and the
    /// first of their ids.
    pub writes_lost: Option<u64>,
    pub lost_ids: Vec<i64>,
    /// Distinct client errors, with how often each was seen.
    pub errors: Vec<String>,
}

/// One acknowledged write: its id, the site of the instance that served it, the member that
/// committed it, when.
#[derive(Clone, Debug)]
struct Ack {
    id: i64,
    site: String,
    member: String,
    at: Instant,
}

impl Ack {
    /// Served at `site` end to end: DNS answered its load balancer, and its member committed.
    fn at_site(&self, site: &str) -> bool {
        self.site == site && self.member == site
    }
}

#[derive(Debug, Default)]
struct Log {
    acks: Vec<Ack>,
    failed_writes: Vec<Instant>,
    reads_ok: u64,
    reads_failed: u64,
    errors: HashMap<String, u64>,
}

impl Log {
    fn error(&mut self, e: String) {
        if self.errors.len() < ERRORS_KEPT || self.errors.contains_key(&e) {
            *self.errors.entry(e).or_default() += 1;
        }
    }
}

/// Runs the drill: the clients start, the app fails over to the next healthy site (pinned
/// there meanwhile), then fails back once its preferred site's data has caught up, and is
/// unpinned. Never leaves the app pinned.
pub(crate) async fn run(
    runner: Arc<AppRunner>,
    entry: Entry,
    database: Option<Connector>,
    to: String,
) -> AppDrillReport {
    let started = SystemTime::now();
    let t0 = Instant::now();
    let v = runner.view();
    let mut report = AppDrillReport {
        app: runner.name.clone(),
        ok: false,
        error: None,
        from: v.active.clone(),
        to: to.clone(),
        started,
        seconds: 0.0,
        failover: None,
        failover_clients: ClientView::default(),
        failback: None,
        failback_clients: ClientView::default(),
        writes_acknowledged: 0,
        writes_failed: 0,
        reads_ok: 0,
        reads_failed: 0,
        writes_lost: None,
        lost_ids: Vec::new(),
        errors: Vec::new(),
    };
    runner.drill_event(
        "app-drill-start",
        format!(
            "{} -> {to} -> {} with clients on {}",
            v.active, v.active, entry.domain
        ),
    );

    let log = Arc::new(Mutex::new(Log::default()));
    let (stop, stopped) = watch::channel(false);
    let resolver = Arc::new(Resolver::new(entry.clone()));
    let writer = tokio::spawn(client_loop(
        resolver.clone(),
        log.clone(),
        stopped.clone(),
        (WRITE_EVERY, "POST", "/write"),
        note_write,
    ));
    let reader = tokio::spawn(client_loop(
        resolver,
        log.clone(),
        stopped,
        (READ_EVERY, "GET", "/read"),
        note_read,
    ));

    let outcome = moves(&runner, &log, &v.active, &to, t0, &mut report).await;
    let _ = stop.send(true);
    let _ = writer.await;
    let _ = reader.await;
    // Never left pinned by the drill, whatever happened (operators' commands are refused
    // while it runs, so the pin is the drill's own).
    let _ = runner.command_unchecked(app::Command::Unpin);

    let log = std::mem::take(&mut *log.lock().unwrap_or_else(|p| p.into_inner()));
    report.writes_acknowledged = log.acks.len() as u64;
    report.writes_failed = log.failed_writes.len() as u64;
    report.reads_ok = log.reads_ok;
    report.reads_failed = log.reads_failed;
    let mut errors: Vec<(String, u64)> = log.errors.into_iter().collect();
    errors.sort_by_key(|e| std::cmp::Reverse(e.1));
    report.errors = errors
        .into_iter()
        .map(|(e, n)| format!("{n}× {e}"))
        .collect();
    let lost = match &database {
        Some(connect) => lost_writes(connect, &log.acks).await,
        None => Err("the app has no database".into()),
    };
    match lost {
        Ok(ids) => {
            report.writes_lost = Some(ids.len() as u64);
            report.lost_ids = ids.into_iter().take(20).collect();
        }
        Err(e) => {
            if report.error.is_none() && database.is_some() {
                report.error = Some(format!("cannot check the acknowledged writes: {e}"));
            }
        }
    }
    if let Err(e) = outcome {
        report.error = Some(e);
    }
    // With a database, passing needs every acknowledged write found.
    report.ok = report.error.is_none() && (database.is_none() || report.writes_lost == Some(0));
    report.seconds = t0.elapsed().as_secs_f64();
    runner.drill_event(
        if report.ok {
            "app-drill-end"
        } else {
            "app-drill-failed"
        },
        format!(
            "{}: failover RTO {} (clients), failback RTO {}, {} writes acknowledged, {} lost{}",
            if report.ok { "passed" } else { "FAILED" },
            secs(report.failover_clients.rto_seconds),
            secs(report.failback_clients.rto_seconds),
            report.writes_acknowledged,
            report
                .writes_lost
                .map_or_else(|| "?".to_string(), |n| n.to_string()),
            report
                .error
                .as_ref()
                .map_or(String::new(), |e| format!(": {e}"))
        ),
    );
    report
}

fn secs(s: Option<f64>) -> String {
    s.map_or_else(|| "-".into(), |s| format!("{s:.2} s"))
}

/// The two moves, each followed until the clients write at its target.
async fn moves(
    runner: &Arc<AppRunner>,
    log: &Arc<Mutex<Log>>,
    home: &str,
    to: &str,
    t0: Instant,
    report: &mut AppDrillReport,
) -> Result<(), String> {
    let writes = |site: &str, since: Instant| {
        let log = log.lock().unwrap_or_else(|p| p.into_inner());
        log.acks
            .iter()
            .filter(|a| a.at >= since && a.at_site(site))
            .count()
    };
    wait_for(WRITES_WAIT, "writes acknowledged through the public entry (is the app's sample-app started with --database?)", || {
        writes(home, t0) >= WRITES_TO_SEE
    })
    .await?;

    // Failover, pinned so nothing moves the app back meanwhile.
    let start = Instant::now();
    let m = follow(runner, app::Command::Pin { site: to.into() }).await?;
    report.failover = Some(m.clone());
    if m.outcome != "done" {
        return Err(format!(
            "the failover failed: {}",
            m.error.unwrap_or_default()
        ));
    }
    wait_for(WRITES_WAIT, &format!("writes committed at {to}"), || {
        writes(to, start) >= WRITES_TO_SEE
    })
    .await?;
    report.failover_clients = clients(log, start, to);

    // Failback, once the preferred site's member has caught up.
    wait_for(
        MOVE_WAIT,
        &format!("{home}'s database member to catch up"),
        || {
            let v = runner.view();
            v.sites
                .iter()
                .any(|s| s.site == home && s.healthy && (v.database.is_none() || s.caught_up))
        },
    )
    .await?;
    let start = Instant::now();
    let m = follow(runner, app::Command::Failback).await?;
    report.failback = Some(m.clone());
    if m.outcome != "done" {
        return Err(format!(
            "the failback failed: {}",
            m.error.unwrap_or_default()
        ));
    }
    wait_for(WRITES_WAIT, &format!("writes committed at {home}"), || {
        writes(home, start) >= WRITES_TO_SEE
    })
    .await?;
    report.failback_clients = clients(log, start, home);
    Ok(())
}

/// Gives the command and waits for the move it starts to end.
async fn follow(runner: &Arc<AppRunner>, cmd: app::Command) -> Result<MoveView, String> {
    let ended = runner.view().ended_moves();
    runner.command_unchecked(cmd).map_err(|e| e.why)?;
    let mut last = None;
    wait_for(MOVE_WAIT, "the move to end", || {
        let v = runner.view();
        if v.ended_moves() > ended {
            last = v.last_move;
            true
        } else {
            false
        }
    })
    .await?;
    last.ok_or_else(|| "the move ended without a record".into())
}

/// Checks `done` every 100 ms until it holds or `within` passes.
async fn wait_for(
    within: Duration,
    what: &str,
    mut done: impl FnMut() -> bool,
) -> Result<(), String> {
    let deadline = Instant::now() + within;
    let mut every = tokio::time::interval(Duration::from_millis(100));
    loop {
        every.tick().await;
        if done() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("gave up after {within:?} waiting for {what}"));
        }
    }
}

/// What the writer saw from `start` to its first write served at `site` end to end.
fn clients(log: &Mutex<Log>, start: Instant, site: &str) -> ClientView {
    let log = log.lock().unwrap_or_else(|p| p.into_inner());
    let first = log
        .acks
        .iter()
        .find(|a| a.at >= start && a.at_site(site))
        .map(|a| a.at);
    let Some(first) = first else {
        return ClientView::default();
    };
    // The last write acknowledged before the move, then every one until the first at the
    // target: the longest stretch between two of them.
    let mut times: Vec<Instant> = log
        .acks
        .iter()
        .filter(|a| a.at <= first)
        .map(|a| a.at)
        .collect();
    let keep_from = times.iter().rposition(|t| *t < start).unwrap_or(0);
    times.drain(..keep_from);
    let gap = times
        .windows(2)
        .map(|w| w[1].saturating_duration_since(w[0]))
        .max()
        .unwrap_or_default();
    ClientView {
        rto_seconds: Some(first.saturating_duration_since(start).as_secs_f64()),
        longest_gap_seconds: Some(gap.as_secs_f64()),
        failed_writes: log
            .failed_writes
            .iter()
            .filter(|t| **t >= start && **t <= first)
            .count() as u64,
    }
}

/// Opens a superuser connection to the database's primary (see
/// `AppRunner::primary_connector`).
pub(crate) type Connector = Arc<
    dyn Fn() -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<pg::Client, String>> + Send>,
        > + Send
        + Sync,
>;

/// The acknowledged ids missing from the primary's `tandem_sample`.
async fn lost_writes(connect: &Connector, acks: &[Ack]) -> Result<Vec<i64>, String> {
    let ids: Vec<i64> = acks.iter().map(|a| a.id).collect();
    let mut client = None;
    // The primary may just have changed: a few tries.
    for _ in 0..20 {
        match connect().await {
            Ok(c) => {
                client = Some(c);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
    let client = client.ok_or("no primary answered")?;
    let rows = client
        .query("SELECT id FROM tandem_sample WHERE id = ANY($1)", &[&ids])
        .await
        .map_err(|e| e.to_string())?;
    let have: std::collections::HashSet<i64> = rows.iter().map(|r| r.get(0)).collect();
    Ok(ids.into_iter().filter(|id| !have.contains(id)).collect())
}

/// Resolves the app's name through Tandem's DNS, keeping the answer for its TTL (as a
/// client's stub resolver would), and sends requests to the address it gives.
struct Resolver {
    entry: Entry,
    cached: Mutex<Option<(IpAddr, Instant)>>,
}

impl Resolver {
    fn new(entry: Entry) -> Self {
        Resolver {
            entry,
            cached: Mutex::new(None),
        }
    }

    async fn address(&self) -> Result<SocketAddr, String> {
        let now = Instant::now();
        if let Some((ip, until)) = *self.cached.lock().unwrap_or_else(|p| p.into_inner())
            && now < until
        {
            return Ok(SocketAddr::new(ip, self.entry.port));
        }
        let (ip, ttl) = self.ask().await?;
        *self.cached.lock().unwrap_or_else(|p| p.into_inner()) = Some((ip, now + ttl));
        Ok(SocketAddr::new(ip, self.entry.port))
    }

    async fn ask(&self) -> Result<(IpAddr, Duration), String> {
        let name = Name::from_ascii(format!("{}.", self.entry.domain.trim_end_matches('.')))
            .map_err(|e| format!("{}: {e}", self.entry.domain))?;
        let mut q = Message::query();
        q.metadata.recursion_desired = false;
        q.add_query(Query::query(name, RecordType::A));
        let bytes = q.to_vec().map_err(|e| e.to_string())?;
        let socket = tokio::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
            .await
            .map_err(|e| e.to_string())?;
        socket
            .send_to(&bytes, self.entry.dns)
            .await
            .map_err(|e| format!("DNS {}: {e}", self.entry.dns))?;
        let mut buf = vec![0u8; 4096];
        let n = socket
            .recv(&mut buf)
            .await
            .map_err(|e| format!("DNS {}: {e}", self.entry.dns))?;
        let answer = Message::from_vec(&buf[..n]).map_err(|e| format!("DNS answer: {e}"))?;
        answer
            .answers
            .iter()
            .find_map(|r| match &r.data {
                RData::A(a) => Some((IpAddr::V4(a.0), Duration::from_secs(u64::from(r.ttl)))),
                _ => None,
            })
            .ok_or_else(|| format!("DNS: no address for {}", self.entry.domain))
    }
}

/// One request through the public entry: method and path, the body of a 200.
async fn request(resolver: &Resolver, method: &str, path: &str) -> Result<String, String> {
    let exchange = async {
        let addr = resolver.address().await?;
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| format!("{addr}: {e}"))?;
        tokio::spawn(conn);
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, resolver.entry.domain.as_str())
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("{addr}: {e}"))?
            .to_bytes();
        let text = String::from_utf8_lossy(&body).trim().to_string();
        if status.is_success() {
            Ok(text)
        } else {
            Err(format!("{addr}: {status}: {text}"))
        }
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no answer within {REQUEST_TIMEOUT:?}"))?
}

/// `key=value` from a sample app's answer.
fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

/// A client of the public entry: `method path` every `every` until stopped, each outcome
/// noted in the log by `note`.
async fn client_loop(
    resolver: Arc<Resolver>,
    log: Arc<Mutex<Log>>,
    mut stopped: watch::Receiver<bool>,
    (every, method, path): (Duration, &'static str, &'static str),
    note: fn(&mut Log, Result<String, String>),
) {
    let mut every = tokio::time::interval(every);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !*stopped.borrow() {
        tokio::select! {
            _ = every.tick() => {}
            _ = stopped.changed() => return,
        }
        let r = request(&resolver, method, path).await;
        note(&mut log.lock().unwrap_or_else(|p| p.into_inner()), r);
    }
}

/// A write: acknowledged with its id, site and member, or failed.
fn note_write(log: &mut Log, r: Result<String, String>) {
    let ack = r.as_ref().ok().and_then(|t| {
        Some(Ack {
            id: field(t, "id")?.parse().ok()?,
            site: field(t, "site")?.to_string(),
            member: field(t, "member")?.to_string(),
            at: Instant::now(),
        })
    });
    match (ack, r) {
        (Some(a), _) => log.acks.push(a),
        (None, r) => {
            log.failed_writes.push(Instant::now());
            log.error(match r {
                Ok(t) => format!("write: unexpected answer {t:?}"),
                Err(e) => format!("write: {e}"),
            });
        }
    }
}

fn note_read(log: &mut Log, r: Result<String, String>) {
    match r {
        Ok(_) => log.reads_ok += 1,
        Err(e) => {
            log.reads_failed += 1;
            log.error(format!("read: {e}"));
        }
    }
}
