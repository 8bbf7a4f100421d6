//! The database tier against real PostgreSQL (Debian's `postgresql`, installed by
//! `scripts/test`): bootstrap, synchronous replication, failover after `kill -9` of the
//! primary with every acknowledged write kept, rejoin through pg_rewind (and what happens when
//! pg_rewind fails), switchover back, a synchronous standby lost and back, the health endpoints
//! and metrics, and the errors that must touch no data.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::Value;
use testkit::{eventually, free_tcp_port};
use tokio::time::Instant;

/// Two sites on their own loopback addresses (`127.0.N.*` edge, `127.0.N+1.*` region).
struct Db {
    _dir: tempfile::TempDir,
    up: Up,
    state: std::path::PathBuf,
    edge_frontend: SocketAddr,
    health: [SocketAddr; 2],
}

/// Members outlive Tandem: whatever a test leaves running goes with it. Tandem is asked to
/// stop (it stops the members it runs), then anything still running from a member's data
/// directory is killed.
impl Drop for Db {
    fn drop(&mut self) {
        let _ = signal(self.up.child.id() as i32, nix::sys::signal::Signal::SIGTERM);
        let end = Instant::now() + Duration::from_secs(30);
        while Instant::now() < end && matches!(self.up.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let postgres = pg::local::find_bins(None).unwrap().join("postgres");
        for site in ["edge", "region"] {
            let data = self.state.join("databases/orders").join(site);
            pg::family::kill_in_data_dir(&postgres, &data);
        }
    }
}

/// A state directory PostgreSQL's own user can reach (tempdirs are 0700).
fn reachable_tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn topology(net: u8, port: u16, replication: &str, extra: &str) -> String {
    let (e, r) = (net, net + 1);
    let timeout = if extra.contains("failover_timeout") {
        ""
    } else {
        "failover_timeout = \"2s\""
    };
    format!(
        r#"
[[site]]
name = "edge"
role = "edge"

[[site]]
name = "region"
role = "region"

[[database]]
name = "orders"
replication = "{replication}"
{timeout}
frontends = {{ edge = "127.0.{e}.20:{port}", region = "127.0.{r}.20:{port}" }}
{extra}
  [[database.member]]
  site = "edge"
  listen = "127.0.{e}.21:{port}"

  [[database.member]]
  site = "region"
  listen = "127.0.{r}.21:{port}"
"#
    )
}

async fn start(net: u8) -> Db {
    start_with(net, "sync").await
}

async fn start_with(net: u8, replication: &str) -> Db {
    start_in(reachable_tempdir(), net, replication, "").await
}

/// As [`start_with`], in `dir`, with `extra` lines in the `[[database]]`.
async fn start_in(dir: tempfile::TempDir, net: u8, replication: &str, extra: &str) -> Db {
    let ips: Vec<String> = [net, net + 1]
        .iter()
        .flat_map(|n| [format!("127.0.{n}.20"), format!("127.0.{n}.21")])
        .collect();
    let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
    let port = free_tcp_port(&ips);
    let api: SocketAddr = format!("127.0.0.1:{}", free_tcp_port(&["127.0.0.1"]))
        .parse()
        .unwrap();
    let file = topology_file(dir.path(), api, &topology(net, port, replication, extra));
    let up = Up::start(&file, api, &[]);
    let db = Db {
        state: dir.path().join("state"),
        _dir: dir,
        up,
        edge_frontend: format!("127.0.{net}.20:{port}").parse().unwrap(),
        health: [
            format!("127.0.{net}.21:8008").parse().unwrap(),
            format!("127.0.{}.21:8008", net + 1).parse().unwrap(),
        ],
    };
    let sync = replication.starts_with("sync");
    db.wait(Duration::from_secs(60), "healthy with edge primary", |d| {
        d["state"] == "healthy" && d["primary"] == "edge" && (d["sync_standby"] == "region") == sync
    })
    .await;
    db
}

impl Db {
    async fn view(&self) -> Option<Value> {
        let v = try_get_json(self.up.api, "/v1/databases").await?;
        Some(v["databases"][0].clone())
    }

    async fn wait(&self, deadline: Duration, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        eventually(deadline, what, || async {
            self.view().await.filter(|d| check(d))
        })
        .await
    }

    fn password(&self) -> String {
        std::fs::read_to_string(self.state.join("databases/orders/password"))
            .unwrap()
            .trim()
            .to_string()
    }

    async fn client(&self) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        connect(&(self.edge_frontend, self.password())).await
    }

    /// Runs `sql` through the edge frontend.
    async fn execute(&self, sql: &str) {
        self.client()
            .await
            .unwrap()
            .batch_execute(sql)
            .await
            .unwrap();
    }

    /// How many rows `acked` holds, through the edge frontend (asked again while a connection
    /// fails: right after a failover the frontend may reset one it took a moment earlier).
    async fn rows(&self) -> usize {
        eventually(
            Duration::from_secs(10),
            "rows through the edge frontend",
            || async {
                let c = self.client().await.ok()?;
                c.query("SELECT id FROM acked", &[])
                    .await
                    .ok()
                    .map(|r| r.len())
            },
        )
        .await
    }
}

/// The status code of a GET.
async fn code(addr: SocketAddr, path: &str) -> u16 {
    status(&http_get(addr, path).await)
}

/// The status code of an HTTP response.
fn status(resp: &str) -> u16 {
    resp.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

fn member<'a>(d: &'a Value, site: &str) -> &'a Value {
    d["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["site"] == site)
        .unwrap()
}

/// Who acknowledged a write: the member's site and its postmaster's start time.
type Acknowledger = (String, String);

/// Inserts increasing ids through the edge frontend, reconnecting on errors, and records each
/// acknowledged one; stops when told or after 60 s.
struct Writer {
    /// Each acknowledged id, with the member that acknowledged it (its site, and its
    /// postmaster's start time: a member restarted in place is another postmaster) and when.
    acked: Arc<Mutex<Vec<(i64, Acknowledger, Instant)>>>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    fn start(db: &Db) -> Writer {
        let acked = Arc::new(Mutex::new(Vec::new()));
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let (frontend, password) = (db.edge_frontend, db.password());
        let a = acked.clone();
        let task = tokio::spawn(async move {
            let db = (frontend, password);
            let deadline = Instant::now() + Duration::from_secs(60);
            // Ids never repeat across writers: start from the clock.
            let mut next: i64 = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_micros() as i64;
            let mut client = None;
            while !*stopped.borrow() && Instant::now() < deadline {
                if client.is_none() {
                    client = connect(&db).await.ok();
                }
                let Some(c) = &client else {
                    let _ =
                        tokio::time::timeout(Duration::from_millis(50), stopped.changed()).await;
                    continue;
                };
                let id = next;
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
                let insert = c.query_one(
                    "INSERT INTO acked (id) VALUES ($1) \
                     RETURNING current_setting('cluster_name'), pg_postmaster_start_time()::text",
                    &params,
                );
                match tokio::time::timeout(Duration::from_secs(5), insert).await {
                    Ok(Ok(row)) => {
                        let by = (row.get(0), row.get(1));
                        a.lock().unwrap().push((next, by, Instant::now()));
                        next += 1;
                    }
                    _ => {
                        // Not acknowledged: the id may or may not be there; never reused.
                        next += 1;
                        client = None;
                    }
                }
            }
        });
        Writer { acked, stop, task }
    }

    fn count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// When the first write acknowledged by `site` came.
    fn first_from(&self, site: &str) -> Option<Instant> {
        let acked = self.acked.lock().unwrap();
        acked
            .iter()
            .find(|(_, (s, _), _)| s == site)
            .map(|(_, _, at)| *at)
    }

    /// The first write acknowledged by another postmaster than the one that acknowledged the
    /// last write before `at` (a commit in flight at a crash may still be acknowledged by the
    /// dying one's backend), and by which member.
    fn first_after(&self, at: Instant) -> Option<(Instant, String)> {
        let acked = self.acked.lock().unwrap();
        let last = acked
            .iter()
            .rfind(|(_, _, t)| *t <= at)
            .map(|(_, by, _)| by);
        acked
            .iter()
            .find(|(_, by, t)| *t > at && Some(by) != last)
            .map(|(_, (s, _), t)| (*t, s.clone()))
    }

    async fn finish(self) -> Vec<i64> {
        let _ = self.stop.send(true);
        self.task.await.unwrap();
        let acked = Arc::try_unwrap(self.acked).unwrap().into_inner().unwrap();
        acked.into_iter().map(|(id, _, _)| id).collect()
    }
}

async fn connect(
    db: &(SocketAddr, String),
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut c = tokio_postgres::Config::new();
    c.host(db.0.ip().to_string())
        .port(db.0.port())
        .user("postgres")
        .password(&db.1)
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(1));
    let (client, conn) = c.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

/// Every acknowledged id must be in the table the frontend now reaches.
async fn assert_all_present(db: &Db, acked: &[i64]) {
    let client = eventually(Duration::from_secs(10), "a connection", || async {
        db.client().await.ok()
    })
    .await;
    let rows = client.query("SELECT id FROM acked", &[]).await.unwrap();
    let have: std::collections::HashSet<i64> = rows.iter().map(|r| r.get(0)).collect();
    let missing: Vec<&i64> = acked.iter().filter(|id| !have.contains(id)).collect();
    assert!(missing.is_empty(), "acknowledged ids lost: {missing:?}");
}

async fn wait_acks(w: &Writer, more_than: usize, what: &str) {
    eventually(Duration::from_secs(30), what, || async {
        (w.count() > more_than).then_some(())
    })
    .await;
}

/// The primary's machine hangs (every process of its member frozen) while the writer runs:
/// fenced, then the standby promoted once the lease expired. Returns the time from the freeze
/// to the next acknowledged write, after checking that nothing acknowledged was lost. (A
/// postmaster that crashes is restarted in place instead: see
/// `a_crashed_primary_is_restarted_in_place_before_any_failover`.)
async fn failover_once(db: &Db, from: &str, to: &str, term: u64) -> Duration {
    failover_checked(db, from, to, term, true).await
}

/// As [`failover_once`]; `rpo0` checks every acknowledged write survived (async mode may lose
/// the last ones by design).
async fn failover_checked(db: &Db, from: &str, to: &str, term: u64, rpo0: bool) -> Duration {
    let w = Writer::start(db);
    wait_acks(&w, 50, "writes before the fault").await;
    let view = db.view().await.unwrap();
    let pid = member(&view, from)["pid"].as_i64().unwrap() as i32;
    let before = w.count();
    let fault = Instant::now();
    let frozen = Frozen::new(pid).await;
    // The RTO ends at the first write the new primary takes.
    let resumed = eventually(
        Duration::from_secs(30),
        "writes on the new primary",
        || async { w.first_from(to) },
    )
    .await;
    let rto = resumed - fault;
    wait_acks(&w, before + 30, "more writes on the new primary").await;
    let acked = w.finish().await;
    drop(frozen); // the fence killed them all; nothing is left to resume
    eprintln!(
        "phase: failover writes done {:?} after the freeze",
        fault.elapsed()
    );
    let d = db
        .wait(Duration::from_secs(10), "the standby promoted", |d| {
            d["primary"] == to && d["term"] == term
        })
        .await;
    assert_eq!(d["last_change"]["kind"], "failover");
    eprintln!(
        "phase: promoted {:.2} s after the loss was seen",
        d["last_change"]["seconds"].as_f64().unwrap()
    );
    if rpo0 {
        assert_all_present(db, &acked).await;
    }
    rto
}

/// Switches back over to `to` with the writer running; nothing acknowledged is lost.
async fn switchover_once(db: &Db, to: &str) {
    db.wait(
        Duration::from_secs(60),
        "the old primary streaming as sync standby",
        |d| d["state"] == "healthy" && d["sync_standby"] != Value::Null && d["primary"] != to,
    )
    .await;
    let t0 = Instant::now();
    eprintln!("phase: switchover to {to}: standby ready");
    let w = Writer::start(db);
    wait_acks(&w, 20, "writes before the switchover").await;
    eprintln!("phase: switchover: writer going after {:?}", t0.elapsed());
    let out = run(tandem().args([
        "db",
        "switchover",
        "orders",
        "--to",
        to,
        "--api",
        &db.up.api.to_string(),
    ]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually(
        Duration::from_secs(30),
        "writes on the new primary",
        || async { w.first_from(to) },
    )
    .await;
    let acked = w.finish().await;
    eprintln!("phase: switchover: writes done after {:?}", t0.elapsed());
    assert_all_present(db, &acked).await;
    db.wait(
        Duration::from_secs(60),
        "healthy after the switchover",
        |d| d["state"] == "healthy" && d["primary"] == to,
    )
    .await;
}

async fn create_table(db: &Db) {
    let c = db.client().await.unwrap();
    c.batch_execute("CREATE TABLE acked (id bigint PRIMARY KEY)")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_failover_keeps_every_acknowledged_write_and_the_old_primary_rejoins() {
    let db = start(61).await;
    create_table(&db).await;
    // Health endpoints in HAProxy's conventions.
    assert_eq!(code(db.health[0], "/primary").await, 200, "/primary");
    assert_eq!(code(db.health[1], "/primary").await, 503, "/primary");
    assert_eq!(
        code(db.health[1], "/replica?lag=1MB").await,
        200,
        "/replica?lag=1MB"
    );
    assert_eq!(
        code(db.health[1], "/replica?lag=x").await,
        400,
        "/replica?lag=x"
    );
    for (path, edge, region) in [
        ("/read-write", 200, 503),
        ("/replica", 503, 200),
        ("/read-only", 200, 200),
        ("/health", 200, 200),
    ] {
        assert_eq!(code(db.health[0], path).await, edge, "edge {path}");
        assert_eq!(code(db.health[1], path).await, region, "region {path}");
    }
    // HAProxy checks with OPTIONS by default; any method gets the same answer.
    for (method, member, want) in [("OPTIONS", 0, 200), ("OPTIONS", 1, 503), ("HEAD", 1, 503)] {
        let resp = http_request(db.health[member], method, "/primary").await;
        assert_eq!(
            status(&resp),
            want,
            "{method} /primary on member {member}: {resp}"
        );
    }
    // A 503 says why: the member's state, as JSON.
    let resp = http_request(db.health[1], "GET", "/read-write").await;
    assert_eq!(status(&resp), 503, "{resp}");
    assert!(
        resp.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{resp}"
    );
    let why: Value = serde_json::from_str(body(&resp)).unwrap();
    assert_eq!(why["site"], "region", "{why}");
    assert_eq!(why["role"], "standby", "{why}");
    assert_eq!(why["state"], "streaming", "{why}");
    assert_eq!(why["database"], "orders", "{why}");
    assert_eq!(why["term"], 1, "{why}");
    // It reveals no path and no error text to whoever can reach it.
    for private in ["data_dir", "log", "error"] {
        assert!(why.get(private).is_none(), "{private} in {why}");
    }
    assert!(!body(&resp).contains("databases/"), "{resp}");

    let rto = failover_once(&db, "edge", "region", 2).await;
    eprintln!("failover RTO (freeze to next acknowledged write): {rto:?}");
    let events = recent_events(db.up.api).await;
    let fenced = events
        .iter()
        .position(|e| e["kind"] == "fenced")
        .expect("a fence event");
    let failover = events
        .iter()
        .position(|e| e["kind"] == "failover")
        .expect("a failover event");
    assert!(
        fenced < failover,
        "the old primary is fenced before the promotion"
    );
    assert_eq!(events[failover]["term"], 2);

    // The former primary comes back as a standby through pg_rewind, streaming, synchronous.
    let d = db
        .wait(Duration::from_secs(60), "edge streaming again", |d| {
            member(d, "edge")["state"] == "streaming" && d["sync_standby"] == "edge"
        })
        .await;
    assert_eq!(member(&d, "edge")["role"], "standby");
    let events = recent_events(db.up.api).await;
    assert!(
        events.iter().any(
            |e| e["kind"] == "rejoined" && e["message"].as_str().unwrap().contains("pg_rewind")
        ),
        "{events:#?}"
    );
    assert_eq!(code(db.health[1], "/primary").await, 200, "/primary");
    assert_eq!(code(db.health[0], "/primary").await, 503, "/primary");
    assert_eq!(code(db.health[1], "/read-write").await, 200, "/read-write");
    assert_eq!(code(db.health[0], "/read-write").await, 503, "/read-write");
    assert_eq!(code(db.health[0], "/read-only").await, 200, "/read-only");
    assert_metrics_after_failover(&db).await;

    // Planned switchover back to the edge loses nothing either.
    switchover_once(&db, "edge").await;
    let d = db.view().await.unwrap();
    assert_eq!(d["term"], 3);
    assert_eq!(d["last_change"]["kind"], "switchover");
    // A site with no member is not found (404), naming the field; nothing changes.
    let resp = http_post_json(
        db.up.api,
        "/v1/databases/orders/switchover",
        r#"{"to": "nowhere"}"#,
    )
    .await;
    assert_eq!(status(&resp), 404, "{resp}");
    let why: Value = serde_json::from_str(body(&resp)).unwrap();
    assert_eq!(why["field"], "to", "{why}");
    assert!(
        why["error"].as_str().unwrap().contains("no member in site"),
        "{why}"
    );
    assert_eq!(db.view().await.unwrap()["term"], 3);
    let status = run(tandem().args(["status", "--api", &db.up.api.to_string()]));
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("orders") && text.contains("term 3"), "{text}");
}

/// Every `tandem_db_*` metric the README names is exported (a name added to the README without
/// its metric fails here), with the values of the failover just done: region primary in term 2,
/// edge streaming.
async fn assert_metrics_after_failover(db: &Db) {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let mut names: Vec<&str> = Vec::new();
    let mut rest = readme.as_str();
    while let Some(at) = rest.find("tandem_db_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        // `tandem_db_*` names a family, not a metric.
        if !name.ends_with('_') && !names.contains(&name) {
            names.push(name);
        }
        rest = &tail[end..];
    }
    assert!(names.len() >= 6, "README names {names:?}");
    let metrics = http_get(db.up.api, "/metrics").await;
    let metrics = body(&metrics);
    for name in &names {
        assert!(
            metrics.lines().any(|l| l
                .strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))),
            "README names {name}, /metrics has no sample of it:\n{metrics}"
        );
    }
    for line in [
        "tandem_db_term{database=\"orders\"} 2",
        "tandem_db_member_is_primary{database=\"orders\",member=\"region\"} 1",
        "tandem_db_member_is_primary{database=\"orders\",member=\"edge\"} 0",
        "tandem_db_member_streaming{database=\"orders\",member=\"edge\"} 1",
        "tandem_db_primary_changes_total{database=\"orders\",kind=\"failover\"} 1",
        "tandem_db_primary_changes_total{database=\"orders\",kind=\"switchover\"} 0",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} not in:\n{metrics}"
        );
    }
}

/// Async mode: commits do not wait for the standby, and a failover still promotes it (it is
/// within `max_lag_on_failover`), with no synchronous standby ever named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_mode_fails_over_to_a_standby_within_the_lag_limit() {
    let db = start_with(69, "async").await;
    create_table(&db).await;
    let c = db.client().await.unwrap();
    let ssn = c
        .query_one("SHOW synchronous_standby_names", &[])
        .await
        .unwrap();
    assert_eq!(ssn.get::<_, String>(0), "");
    drop(c);
    failover_checked(&db, "edge", "region", 2, false).await;
    let d = db
        .wait(Duration::from_secs(60), "edge back as a standby", |d| {
            member(d, "edge")["state"] == "streaming" && d["state"] == "healthy"
        })
        .await;
    assert_eq!(d["sync_standby"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_the_same_data_and_primary() {
    let mut db = start(63).await;
    create_table(&db).await;
    db.execute("INSERT INTO acked VALUES (42)").await;
    assert!(db.up.terminate().success());
    // A stop shuts the primary down first (its commits never lose their synchronous partner
    // while it still takes them), then the standby (PostgreSQL's own log times).
    let logs = db.state.join("databases/orders");
    let when = |site: &str, text: &str| -> String {
        let log = std::fs::read_to_string(logs.join(format!("{site}.log"))).unwrap();
        let line = log
            .lines()
            .rfind(|l| l.contains(text))
            .unwrap_or_else(|| panic!("{site}.log has no {text:?}:\n{log}"));
        line[..23].to_string() // "2026-11-30 10:50:26.123"
    };
    let primary_down = when("edge", "database system is shut down");
    let standby_asked = when("region", "received fast shutdown request");
    assert!(
        primary_down <= standby_asked,
        "primary down at {primary_down}, standby asked to stop at {standby_asked}"
    );
    // Tandem's environment does not reach PostgreSQL: libpq would take these for every
    // setting a connection string leaves out, and the standby would never stream.
    let file = db.state.parent().unwrap().join("topology.toml");
    db.up = Up::start(
        &file,
        db.up.api,
        &[
            ("PGPASSWORD", "not-the-password"),
            ("PGUSER", "nobody"),
            ("PGPASSFILE", "/nonexistent"),
            ("PGSSLMODE", "require"),
        ],
    );
    let d = db
        .wait(Duration::from_secs(60), "healthy again", |d| {
            d["state"] == "healthy"
                && d["sync_standby"] == "region"
                && member(d, "region")["state"] == "streaming"
        })
        .await;
    assert_eq!(d["primary"], "edge");
    assert_eq!(d["term"], 1, "same holder, same term");
    let events = recent_events(db.up.api).await;
    assert!(
        events
            .iter()
            .any(|e| e["message"].as_str().unwrap().contains("resumed edge"))
    );
    // The events of the first run are still there, once each.
    let initialised = events
        .iter()
        .filter(|e| says(e, "orders/edge", "bootstrapped", "initialised edge"))
        .count();
    assert_eq!(initialised, 1, "{events:#?}");
    assert!(
        events
            .iter()
            .any(|e| says(e, "orders/edge", "stopped", "edge stopped (primary")),
        "{events:#?}"
    );
    assert_eq!(db.rows().await, 1);

    // A switchover, then a restart: the counters and the last change are kept.
    switchover_once(&db, "region").await;
    assert!(db.up.terminate().success());
    db.up = Up::start(&file, db.up.api, &[]);
    let d = db
        .wait(Duration::from_secs(60), "healthy on region", |d| {
            d["state"] == "healthy" && d["primary"] == "region"
        })
        .await;
    assert_eq!(d["term"], 2, "{d}");
    assert_eq!(d["switchovers"], 1, "{d}");
    assert_eq!(d["failovers"], 0, "{d}");
    assert_eq!(d["last_change"]["kind"], "switchover", "{d}");
    assert_eq!(d["last_change"]["to"], "region", "{d}");
    let events = recent_events(db.up.api).await;
    assert!(
        events.iter().any(|e| e["kind"] == "switchover"),
        "{events:#?}"
    );
}

/// `tandem up` on a bad setup exits with an error that says what is wrong, and changes no
/// data directory.
#[test]
fn bad_setups_fail_clearly_and_touch_no_data() {
    let dir = reachable_tempdir();
    let api: SocketAddr = format!("127.0.0.1:{}", free_tcp_port(&["127.0.0.1"]))
        .parse()
        .unwrap();
    let port = free_tcp_port(&["127.0.65.21", "127.0.66.21", "127.0.65.20", "127.0.66.20"]);
    let up = |extra: &str| {
        let file = topology_file(dir.path(), api, &topology(65, port, "sync", extra));
        let out = run(tandem().arg("up").arg("--no-console").arg(&file));
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let err = up("bin_dir = \"/nonexistent/bin\"");
    assert!(
        err.contains("PostgreSQL programs missing in /nonexistent/bin"),
        "{err}"
    );
    assert!(err.contains("help:"), "{err}");

    let data = dir.path().join("state/databases/orders/edge");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("precious"), "keep me").unwrap();
    let err = up("");
    assert!(err.contains("not a PostgreSQL data directory"), "{err}");
    assert_eq!(
        std::fs::read_to_string(data.join("precious")).unwrap(),
        "keep me"
    );
    assert_eq!(std::fs::read_dir(&data).unwrap().count(), 1);
    std::fs::remove_dir_all(&data).unwrap();

    let taken = std::net::TcpListener::bind(format!("127.0.65.21:{port}")).unwrap();
    let err = up("");
    assert!(
        err.contains("cannot use listen address") && err.contains("help:"),
        "{err}"
    );
    drop(taken);
    assert!(
        !Path::new(&data).join("PG_VERSION").exists(),
        "nothing initialised"
    );
}

/// RTO over several failovers, for the closing note and `bench/db-failover/run`:
/// `TANDEM_RTO_RUNS=5 cargo nextest run -p tandem --run-ignored only rto --no-capture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, run by bench/db-failover/run"]
async fn rto_over_repeated_failovers() {
    let runs: usize = std::env::var("TANDEM_RTO_RUNS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(5);
    let db = start(67).await;
    create_table(&db).await;
    let mut rtos = Vec::new();
    for i in 0..runs {
        let term = 2 + 2 * i as u64;
        let rto = failover_once(&db, "edge", "region", term).await;
        eprintln!("run {}: RTO {rto:?}", i + 1);
        rtos.push(rto);
        switchover_once(&db, "edge").await;
    }
    rtos.sort();
    eprintln!(
        "RTO over {runs} runs: min {:?}, median {:?}, max {:?}",
        rtos[0],
        rtos[rtos.len() / 2],
        rtos[rtos.len() - 1]
    );
}

/// Split-brain guard: a standby promoted behind Tandem's back (someone ran `pg_promote()` on
/// it) is stopped at once and comes back as a standby; the lease holder stays primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_promoted_behind_tandems_back_is_stopped_and_rewound() {
    let db = start(71).await;
    let view = db.view().await.unwrap();
    let region: SocketAddr = member(&view, "region")["listen"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let direct = connect(&(region, db.password())).await.unwrap();
    // Tandem may fence it before `pg_promote` answers: the session then ends.
    if let Ok(row) = direct.query_one("SELECT pg_promote(true, 30)", &[]).await {
        assert!(row.get::<_, bool>(0), "promoted");
    }
    eventually(
        Duration::from_secs(10),
        "the rogue primary fenced",
        || async {
            let events = recent_events(db.up.api).await;
            events
                .iter()
                .any(|e| e["kind"] == "fenced" && e["subject"] == "orders/region")
                .then_some(())
        },
    )
    .await;
    let d = db
        .wait(Duration::from_secs(60), "region streaming again", |d| {
            member(d, "region")["state"] == "streaming" && d["state"] == "healthy"
        })
        .await;
    assert_eq!(d["primary"], "edge");
    assert_eq!(d["term"], 1, "no failover happened");
}

async fn wait_event(db: &Db, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    eventually(Duration::from_secs(30), what, || async {
        recent_events(db.up.api)
            .await
            .into_iter()
            .find(|e| check(e))
    })
    .await
}

fn says(e: &Value, subject: &str, kind: &str, text: &str) -> bool {
    e["subject"] == subject
        && e["kind"] == kind
        && e["message"].as_str().is_some_and(|m| m.contains(text))
}

/// A `bin_dir` in `dir` with PostgreSQL's programs, `program` replaced by a shell `script`
/// (`$REAL` in it is the real programs' directory).
fn bin_dir_with(dir: &Path, program: &str, script: &str) -> std::path::PathBuf {
    let real = pg::local::find_bins(None).unwrap();
    let bin = dir.join("bin");
    std::fs::create_dir(&bin).unwrap();
    for p in std::fs::read_dir(&real).unwrap() {
        let p = p.unwrap();
        if p.file_name() != program {
            std::os::unix::fs::symlink(p.path(), bin.join(p.file_name())).unwrap();
        }
    }
    let path = bin.join(program);
    let script = script.replace("$REAL", &real.display().to_string());
    std::fs::write(&path, format!("#!/bin/sh\n{script}")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

/// A `bin_dir` in `dir` whose `pg_rewind` always fails; it writes a line to
/// `dir/pg_rewind.calls` each time it runs.
fn failing_pg_rewind(dir: &Path) -> std::path::PathBuf {
    // PostgreSQL's user writes it when Tandem runs as root.
    let calls = dir.join("pg_rewind.calls");
    std::fs::write(&calls, "").unwrap();
    std::fs::set_permissions(&calls, std::fs::Permissions::from_mode(0o666)).unwrap();
    bin_dir_with(
        dir,
        "pg_rewind",
        &format!(
            "echo \"$*\" >> {}\necho 'pg_rewind: fatal: failing on purpose' >&2\nexit 1\n",
            calls.display()
        ),
    )
}

/// `rewind_failure`: a former primary that `pg_rewind` cannot bring back is left stopped with
/// `stop`, its data untouched and its state in `/v1/databases`, an event and its health
/// endpoint; restarted with the default (`clone`), it is cloned afresh, its data set aside as
/// `SITE.old`, and streams again with every row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_former_primary_pg_rewind_cannot_bring_back_is_left_stopped_or_cloned_afresh() {
    let dir = reachable_tempdir();
    let bin = failing_pg_rewind(dir.path());
    let calls = dir.path().join("pg_rewind.calls");
    let rewinds = || std::fs::read_to_string(&calls).unwrap().lines().count();
    let policy = "rewind_failure = \"stop\"";
    let extra = format!("bin_dir = \"{}\"\n{policy}", bin.display());
    let mut db = start_in(dir, 75, "sync", &extra).await;
    create_table(&db).await;
    failover_once(&db, "edge", "region", 2).await;

    // `stop`: one attempt, then left stopped.
    let d = db
        .wait(Duration::from_secs(60), "edge left stopped", |d| {
            member(d, "edge")["state"] == "failed"
        })
        .await;
    let edge = member(&d, "edge");
    assert_eq!(edge["pid"], Value::Null, "{edge}");
    let error = edge["error"].as_str().unwrap();
    assert!(error.contains("pg_rewind failed"), "{error}");
    assert!(error.contains("failing on purpose"), "{error}");
    assert_eq!(d["primary"], "region");
    assert_eq!(d["state"], "degraded");
    wait_event(&db, "the stop as an event", |e| {
        says(
            e,
            "orders/edge",
            "error",
            "left stopped (rewind_failure = \"stop\")",
        )
    })
    .await;
    let resp = http_request(db.health[0], "GET", "/health").await;
    assert_eq!(status(&resp), 503, "{resp}");
    let why: Value = serde_json::from_str(body(&resp)).unwrap();
    assert_eq!(why["state"], "failed", "{why}");
    assert_eq!(code(db.health[0], "/read-only").await, 503, "/read-only");
    assert_eq!(code(db.health[1], "/read-only").await, 200, "/read-only");
    // Writes go on without it (no synchronous standby to wait for).
    tokio::time::timeout(
        Duration::from_secs(5),
        db.client()
            .await
            .unwrap()
            .batch_execute("INSERT INTO acked VALUES (1)"),
    )
    .await
    .expect("writes go on")
    .unwrap();
    let data = db.state.join("databases/orders");
    assert!(data.join("edge/PG_VERSION").is_file(), "data left in place");
    assert!(!data.join("edge.old").exists(), "nothing set aside");
    let d = db.view().await.unwrap();
    assert_eq!(member(&d, "edge")["state"], "failed", "still stopped");
    assert_eq!(rewinds(), 1, "pg_rewind ran once");

    // Restarted with the default, `clone`: cloned afresh, the former data set aside.
    assert!(db.up.terminate().success());
    let file = db.state.parent().unwrap().join("topology.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, text.replace(policy, "")).unwrap();
    db.up = Up::start(&file, db.up.api, &[]);
    let d = db
        .wait(
            Duration::from_secs(60),
            "edge cloned and synchronous",
            |d| d["sync_standby"] == "edge" && member(d, "edge")["state"] == "streaming",
        )
        .await;
    assert_eq!(d["primary"], "region");
    assert_eq!(d["term"], 2);
    assert!(rewinds() >= 2, "pg_rewind tried again");
    let e = wait_event(&db, "the clone as an event", |e| {
        says(e, "orders/edge", "recloned", "pg_rewind failed")
    })
    .await;
    assert!(e["message"].as_str().unwrap().contains("edge.old"), "{e}");
    assert!(
        data.join("edge.old/PG_VERSION").is_file(),
        "former data kept"
    );

    // The clone has every row of the primary (every acknowledged one: checked on it above).
    let ids = |rows: Vec<tokio_postgres::Row>| -> Vec<i64> {
        let mut ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        ids.sort();
        ids
    };
    let want = ids(db
        .client()
        .await
        .unwrap()
        .query("SELECT id FROM acked", &[])
        .await
        .unwrap());
    assert!(want.len() > 80, "{} rows", want.len());
    let edge: SocketAddr = member(&d, "edge")["listen"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let standby = connect(&(edge, db.password())).await.unwrap();
    eventually(
        Duration::from_secs(10),
        "every row on the clone",
        || async {
            let rows = standby.query("SELECT id FROM acked", &[]).await.ok()?;
            (ids(rows) == want).then_some(())
        },
    )
    .await;
}

fn signal(pid: i32, sig: nix::sys::signal::Signal) -> nix::Result<()> {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig)
}

/// The fields of `/proc/PID/stat` after the command name: state, parent, …
fn proc_stat(pid: i32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// The processes whose parent is `pid`.
fn children(pid: i32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&p| proc_stat(p).is_some_and(|f| f[1] == pid.to_string()))
        .collect()
}

/// Every process of a member stopped with SIGSTOP, as on a machine that hangs: the postmaster
/// first (so it starts no other), then its children, which lead process groups of their own
/// (a `killpg` of the postmaster misses them). Dropping it lets them all run again.
struct Frozen(Vec<i32>);

impl Frozen {
    async fn new(postmaster: i32) -> Frozen {
        use nix::sys::signal::Signal::SIGSTOP;
        signal(postmaster, SIGSTOP).unwrap();
        let mut frozen = Frozen(vec![postmaster]);
        eventually(Duration::from_secs(5), "the postmaster stopped", || async {
            proc_stat(postmaster)
                .is_some_and(|f| f[0] == "T")
                .then_some(())
        })
        .await;
        for child in children(postmaster) {
            signal(child, SIGSTOP).unwrap();
            frozen.0.push(child);
        }
        assert!(frozen.0.len() > 3, "a postmaster and its processes");
        frozen
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        for &pid in &self.0 {
            let _ = signal(pid, nix::sys::signal::Signal::SIGCONT);
        }
    }
}

/// `SHOW synchronous_standby_names`, without the quotes Tandem writes.
async fn sync_names(c: &tokio_postgres::Client) -> String {
    let row = c
        .query_one("SHOW synchronous_standby_names", &[])
        .await
        .unwrap();
    row.get::<_, String>(0).trim_matches('"').to_string()
}

/// Sync mode: a synchronous standby that hangs is dropped from `synchronous_standby_names`
/// once the primary has not reported it synchronous for `failover_timeout`, and a commit that
/// was waiting for it goes through. Still hung 15 s on, it is stopped and rewound without
/// holding up the primary's lease; back and synchronous, it is named again. A dropped standby
/// is never promoted, even when it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_synchronous_standby_is_dropped_then_named_again_and_never_promoted_meanwhile() {
    let db = start(73).await;
    create_table(&db).await;
    let view = db.view().await.unwrap();
    let listen = |site: &str| -> SocketAddr {
        member(&view, site)["listen"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (edge, password) = (listen("edge"), db.password());
    let primary = connect(&(edge, password.clone())).await.unwrap();
    assert_eq!(sync_names(&primary).await, "region");

    // The standby hangs; a commit now waits for it.
    let pid = member(&view, "region")["pid"].as_i64().unwrap() as i32;
    let frozen = Frozen::new(pid).await;
    let hung = Instant::now();
    let writer = connect(&(edge, password.clone())).await.unwrap();
    let commit = tokio::spawn(async move {
        writer
            .batch_execute("INSERT INTO acked VALUES (1)")
            .await
            .unwrap();
        hung.elapsed()
    });
    // Tandem sees the standby's replies stop and drops it after `failover_timeout` (2 s); the
    // primary's WAL sender gives up on it after `wal_sender_timeout`, which follows it.
    eventually(
        Duration::from_secs(20),
        "synchronous_standby_names emptied",
        || async { sync_names(&primary).await.is_empty().then_some(()) },
    )
    .await;
    let waited = tokio::time::timeout(Duration::from_secs(5), commit)
        .await
        .expect("the commit goes through once the standby is dropped")
        .unwrap();
    eprintln!(
        "phase: standby dropped, commit through {waited:?} after the standby hung (dropped {:?})",
        hung.elapsed()
    );
    assert!(
        waited >= Duration::from_secs(1),
        "the commit did wait for the hung standby ({waited:?})"
    );
    // Not `failover_timeout` plus a fixed 5 s `wal_sender_timeout` (7 s and more, as before).
    assert!(
        waited < Duration::from_secs(5),
        "a commit waits about failover_timeout (2 s) for a silent standby, not {waited:?}"
    );
    db.wait(Duration::from_secs(5), "no synchronous standby", |d| {
        d["sync_standby"].is_null() && d["state"] == "degraded"
    })
    .await;
    wait_event(&db, "the drop as an event", |e| {
        says(e, "orders/region", "sync", "gone for 2s")
    })
    .await;

    // Still hung after 15 s: Tandem stops it to rewind it, and keeps the primary's lease while
    // the standby ignores its shutdown.
    wait_event(&db, "the hung standby given up on", |e| {
        says(e, "orders/region", "error", "has not streamed")
    })
    .await;
    db.wait(Duration::from_secs(5), "region rewinding", |d| {
        member(d, "region")["state"] == "rewinding"
    })
    .await;
    tokio::time::timeout(
        Duration::from_secs(5),
        primary.batch_execute("INSERT INTO acked VALUES (2)"),
    )
    .await
    .expect("writes go on while the standby hangs")
    .unwrap();
    let d = db.view().await.unwrap();
    assert_eq!(d["primary"], "edge", "{d}");
    assert_eq!(d["term"], 1, "{d}");
    drop(frozen);
    eprintln!("phase: standby back after {:?}", hung.elapsed());

    // Back, it shuts down cleanly, is rewound, streams, is synchronous and named again.
    db.wait(
        Duration::from_secs(60),
        "region the synchronous standby again",
        |d| d["sync_standby"] == "region" && member(d, "region")["state"] == "streaming",
    )
    .await;
    assert_eq!(sync_names(&primary).await, "region");
    wait_event(&db, "region rewound", |e| {
        says(e, "orders/region", "rejoined", "pg_rewind")
    })
    .await;
    let events = recent_events(db.up.api).await;
    assert!(!events.iter().any(|e| e["kind"] == "fenced"), "{events:#?}");

    // Replication refused (the standby still answers SQL): dropped again; then the primary
    // dies, and the standby that was not synchronous again is not promoted.
    primary
        .batch_execute("ALTER ROLE replicator NOLOGIN")
        .await
        .unwrap();
    primary
        .batch_execute("SELECT pg_terminate_backend(pid) FROM pg_stat_replication")
        .await
        .unwrap();
    eventually(
        Duration::from_secs(20),
        "synchronous_standby_names emptied again",
        || async { sync_names(&primary).await.is_empty().then_some(()) },
    )
    .await;
    let d = db
        .wait(Duration::from_secs(5), "no synchronous standby", |d| {
            d["sync_standby"].is_null()
        })
        .await;
    assert_eq!(member(&d, "region")["role"], "standby", "{d}");
    // The only complete copy is restarted in place (it was never restarted before: the
    // primary stayed down until someone did it by hand).
    let pid = member(&d, "edge")["pid"].as_i64().unwrap() as i32;
    signal(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_event(&db, "the restart, and why not a failover", |e| {
        says(e, "orders/edge", "restarting", "no failover possible")
            && says(e, "orders/edge", "restarting", "no standby was synchronous")
    })
    .await;
    let d = db
        .wait(Duration::from_secs(30), "edge primary again", |d| {
            d["primary"] == "edge"
        })
        .await;
    assert_eq!(d["term"], 1, "{d}");
    assert_eq!(member(&d, "region")["role"], "standby", "{d}");
    let events = recent_events(db.up.api).await;
    assert!(
        !events.iter().any(|e| e["kind"] == "failover"),
        "{events:#?}"
    );
}

/// A client writing straight to the primary, counting acknowledged writes and errors.
struct Direct {
    acked: Arc<Mutex<(u64, u64)>>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Direct {
    fn start(addr: SocketAddr, password: String) -> Direct {
        let acked = Arc::new(Mutex::new((0, 0)));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let a = acked.clone();
        let task = tokio::spawn(async move {
            let client = connect(&(addr, password)).await.unwrap();
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut id: i64 = -1;
            while !*stopped.borrow() && Instant::now() < deadline {
                id -= 1; // below the writer's ids
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
                let insert = client.execute("INSERT INTO acked VALUES ($1)", &params);
                let ok = matches!(
                    tokio::time::timeout(Duration::from_secs(5), insert).await,
                    Ok(Ok(1))
                );
                {
                    let mut c = a.lock().unwrap();
                    if ok {
                        c.0 += 1;
                    } else {
                        c.1 += 1;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        Direct { acked, stop, task }
    }

    fn counts(&self) -> (u64, u64) {
        *self.acked.lock().unwrap()
    }

    async fn more_than(&self, n: u64, what: &str) {
        eventually(Duration::from_secs(20), what, || async {
            (self.counts().0 > n).then_some(())
        })
        .await;
    }

    async fn finish(self) -> (u64, u64) {
        let _ = self.stop.send(true);
        self.task.await.unwrap();
        *self.acked.lock().unwrap()
    }
}

/// Members outlive Tandem. `kill -9` of Tandem: both postmasters keep running and the primary
/// keeps taking writes; the next `tandem up` carries on with them (same processes, same
/// primary, no failover). SIGUSR2 (a planned restart) leaves them running too. Tandem stopped
/// (SIGSTOP) past the lease: back, it takes its lapsed lease again instead of failing over.
/// A client writing straight to the primary sees no error through all of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outlives_tandem_and_is_adopted() {
    let mut db = start(87).await;
    create_table(&db).await;
    let view = db.view().await.unwrap();
    let pids = |d: &Value| -> Vec<i64> {
        ["edge", "region"]
            .iter()
            .map(|s| member(d, s)["pid"].as_i64().unwrap())
            .collect()
    };
    let before = pids(&view);
    let edge: SocketAddr = member(&view, "edge")["listen"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let writer = Direct::start(edge, db.password());
    writer.more_than(20, "writes before").await;
    let file = db.state.parent().unwrap().join("topology.toml");

    // kill -9: nothing of PostgreSQL's goes with it.
    db.up.child.kill().unwrap();
    db.up.child.wait().unwrap();
    for &pid in &before {
        assert!(alive(pid as i32), "postmaster {pid} outlived tandem");
    }
    let n = writer.counts().0;
    writer.more_than(n + 20, "writes with tandem gone").await;
    db.up = Up::start(&file, db.up.api, &[]);
    let d = db
        .wait(Duration::from_secs(60), "healthy again", |d| {
            d["state"] == "healthy" && d["sync_standby"] == "region"
        })
        .await;
    assert_eq!(d["primary"], "edge", "{d}");
    assert_eq!(pids(&d), before, "the same postmasters, adopted");
    wait_event(&db, "the adoption", |e| {
        says(e, "orders", "adopted", "edge (pid")
    })
    .await;

    // SIGUSR2: a planned restart.
    signal(db.up.child.id() as i32, nix::sys::signal::Signal::SIGUSR2).unwrap();
    assert!(wait_exit(&mut db.up.child, Duration::from_secs(30)).success());
    for &pid in &before {
        assert!(alive(pid as i32), "postmaster {pid} left running");
    }
    db.up = Up::start(&file, db.up.api, &[]);
    let d = db
        .wait(Duration::from_secs(60), "healthy again", |d| {
            d["state"] == "healthy" && d["sync_standby"] == "region"
        })
        .await;
    assert_eq!(pids(&d), before);
    let term = d["term"].as_i64().unwrap();

    // Stopped past the lease (2 s), then back: no fence, no failover.
    signal(db.up.child.id() as i32, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let n = writer.counts().0;
    writer
        .more_than(n + 100, "writes with tandem stopped")
        .await;
    signal(db.up.child.id() as i32, nix::sys::signal::Signal::SIGCONT).unwrap();
    wait_event(&db, "the lease taken again", |e| {
        says(e, "orders/edge", "lease", "took its lease again")
    })
    .await;
    let d = db.view().await.unwrap();
    assert_eq!(d["primary"], "edge", "{d}");
    assert_eq!(d["term"].as_i64().unwrap(), term + 1, "{d}");
    assert_eq!(pids(&d), before);
    let events = recent_events(db.up.api).await;
    assert!(
        !events.iter().any(|e| matches!(
            e["kind"].as_str(),
            Some("fenced" | "failover" | "restarting")
        )),
        "{events:#?}"
    );
    let n = writer.counts().0;
    writer.more_than(n + 20, "writes after").await;
    let (acked, errors) = writer.finish().await;
    eprintln!("straight to the primary: {acked} writes acknowledged, {errors} errors");
    assert_eq!(errors, 0, "no client error");
}

/// `sync-strict` (Patroni's strict mode): a commit never completes without a synchronous
/// standby. The standby hangs: it is dropped from `synchronous_standby_names` as in `sync`,
/// but `*` takes its place, so the commit keeps waiting (in `sync` it goes through after
/// `failover_timeout`) until a standby is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_strict_never_acknowledges_a_commit_without_a_synchronous_standby() {
    let db = start_with(85, "sync-strict").await;
    create_table(&db).await;
    let view = db.view().await.unwrap();
    let edge: SocketAddr = member(&view, "edge")["listen"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let primary = connect(&(edge, db.password())).await.unwrap();
    assert_eq!(sync_names(&primary).await, "region");
    let pid = member(&view, "region")["pid"].as_i64().unwrap() as i32;
    let frozen = Frozen::new(pid).await;
    let writer = connect(&(edge, db.password())).await.unwrap();
    let mut commit = tokio::spawn(async move {
        writer
            .batch_execute("INSERT INTO acked VALUES (1)")
            .await
            .unwrap();
    });
    wait_event(&db, "the standby dropped", |e| {
        says(e, "orders/region", "sync", "commits wait for any standby")
    })
    .await;
    eventually(Duration::from_secs(10), "any standby named", || async {
        (sync_names(&primary).await == "*").then_some(())
    })
    .await;
    assert!(
        tokio::time::timeout(Duration::from_secs(3), &mut commit)
            .await
            .is_err(),
        "no commit without a synchronous standby"
    );
    drop(frozen);
    tokio::time::timeout(Duration::from_secs(30), commit)
        .await
        .expect("the commit completes once the standby is back")
        .unwrap();
    db.wait(Duration::from_secs(60), "region synchronous again", |d| {
        d["sync_standby"] == "region" && d["state"] == "healthy"
    })
    .await;
    assert_eq!(sync_names(&primary).await, "region");
}

/// `kill -9` of the primary's postmaster, its data intact: Tandem restarts it in place
/// (Patroni's behaviour) before anyone is promoted. Same member, same term, no failover;
/// every acknowledged write is there, and the standby is synchronous again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_primary_is_restarted_in_place_before_any_failover() {
    let db = start(77).await;
    create_table(&db).await;
    let w = Writer::start(&db);
    wait_acks(&w, 50, "writes before the crash").await;
    let view = db.view().await.unwrap();
    let pid = member(&view, "edge")["pid"].as_i64().unwrap() as i32;
    let fault = Instant::now();
    signal(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    let (resumed, by) = eventually(
        Duration::from_secs(30),
        "writes again after the crash",
        || async { w.first_after(fault) },
    )
    .await;
    eprintln!(
        "restart in place: kill -9 to the next acknowledged write {:?}",
        resumed - fault
    );
    assert_eq!(by, "edge", "the same member takes writes again");
    let before = w.count();
    wait_acks(&w, before + 20, "more writes").await;
    let acked = w.finish().await;
    assert_all_present(&db, &acked).await;
    let d = db
        .wait(Duration::from_secs(30), "healthy again", |d| {
            d["state"] == "healthy" && d["sync_standby"] == "region"
        })
        .await;
    assert_eq!(d["primary"], "edge", "{d}");
    assert_eq!(d["term"], 1, "no new term: {d}");
    assert!(d["last_change"].is_null(), "no failover: {d}");
    assert_ne!(member(&d, "edge")["pid"].as_i64().unwrap() as i32, pid);
    let events = recent_events(db.up.api).await;
    let restart = events
        .iter()
        .position(|e| says(e, "orders/edge", "restarting", "restarting it in place"))
        .expect("a restarting event");
    let back = events
        .iter()
        .position(|e| says(e, "orders/edge", "primary-back", "restarted in place"))
        .expect("a primary-back event");
    assert!(restart < back, "{events:#?}");
    assert!(
        !events
            .iter()
            .any(|e| matches!(e["kind"].as_str(), Some("fenced" | "failover" | "promoted"))),
        "{events:#?}"
    );
}

/// A postmaster that hangs (SIGSTOP to it alone: established sessions still answer while every
/// new client waits) is found by the periodic fresh-connection check, fenced, and the
/// synchronous standby promoted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_postmaster_is_found_and_failed_over() {
    let db = start(83).await;
    create_table(&db).await;
    let pid = member(&db.view().await.unwrap(), "edge")["pid"]
        .as_i64()
        .unwrap() as i32;
    signal(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    wait_event(&db, "the hang seen", |e| {
        says(
            e,
            "orders/edge",
            "primary-lost",
            "new connection got no answer",
        )
    })
    .await;
    let d = db
        .wait(Duration::from_secs(30), "region promoted", |d| {
            d["primary"] == "region" && d["term"] == 2
        })
        .await;
    assert_eq!(d["last_change"]["kind"], "failover", "{d}");
    wait_event(&db, "the hung primary fenced", |e| {
        says(e, "orders/edge", "fenced", "fenced")
    })
    .await;
    // Fenced means killed, stopped or not.
    eventually(
        Duration::from_secs(10),
        "the hung postmaster gone",
        || async { proc_stat(pid).is_none_or(|f| f[0] == "Z").then_some(()) },
    )
    .await;
}

/// A primary that exits again at once after each restart (its `postgres` fails) is restarted
/// with a backoff, never more than three times in a row, then the synchronous standby is
/// promoted; once its program works again it rejoins as a standby.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_backs_off_then_fails_over() {
    let dir = reachable_tempdir();
    let flag = dir.path().join("postgres-fails");
    let bin = bin_dir_with(
        dir.path(),
        "postgres",
        &format!(
            "if [ -e {} ]; then echo 'postgres: failing on purpose' >&2; exit 1; fi\nexec $REAL/postgres \"$@\"\n",
            flag.display()
        ),
    );
    // A longer lease than the other tests: three restarts fit before the fence.
    let extra = format!("bin_dir = \"{}\"\nfailover_timeout = \"6s\"", bin.display());
    let db = start_in(dir, 79, "sync", &extra).await;
    create_table(&db).await;
    db.execute("INSERT INTO acked VALUES (7)").await;
    std::fs::write(&flag, "").unwrap();
    let pid = member(&db.view().await.unwrap(), "edge")["pid"]
        .as_i64()
        .unwrap() as i32;
    signal(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_event(&db, "the crash loop given up", |e| {
        says(e, "orders/edge", "crash-loop", "failing over instead")
    })
    .await;
    let d = db
        .wait(Duration::from_secs(30), "region promoted", |d| {
            d["primary"] == "region" && d["term"] == 2
        })
        .await;
    assert_eq!(d["last_change"]["kind"], "failover", "{d}");
    let events = recent_events(db.up.api).await;
    let restarts: Vec<&str> = events
        .iter()
        .filter(|e| says(e, "orders/edge", "restarting", ""))
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert_eq!(restarts.len(), 3, "{restarts:#?}");
    assert!(
        restarts[1].contains("attempt 2 after a 500ms backoff"),
        "{restarts:#?}"
    );
    assert!(
        restarts[2].contains("attempt 3 after a 1s backoff"),
        "{restarts:#?}"
    );
    assert_eq!(db.rows().await, 1);
    // Fixed: the former primary rejoins as a standby.
    std::fs::remove_file(&flag).unwrap();
    db.wait(Duration::from_secs(60), "edge streaming again", |d| {
        member(d, "edge")["state"] == "streaming"
    })
    .await;
}

/// A switchover whose target dies once the primary has shut down: the call fails at once with
/// the reason, and the former primary, which has every write, is primary again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_whose_target_dies_brings_the_old_primary_back() {
    let dir = reachable_tempdir();
    let flag = dir.path().join("kill-region");
    let region = dir
        .path()
        .join("state/databases/orders/region/postmaster.pid");
    // Tandem reads the stopped primary's last position with pg_controldata: that moment, the
    // target dies.
    let bin = bin_dir_with(
        dir.path(),
        "pg_controldata",
        &format!(
            "if [ -e {} ]; then kill -9 $(head -1 {}); fi\nexec $REAL/pg_controldata \"$@\"\n",
            flag.display(),
            region.display()
        ),
    );
    let extra = format!("bin_dir = \"{}\"", bin.display());
    let db = start_in(dir, 81, "sync", &extra).await;
    create_table(&db).await;
    db.execute("INSERT INTO acked VALUES (1), (2), (3)").await;
    std::fs::write(&flag, "").unwrap();
    let resp = http_post_json(
        db.up.api,
        "/v1/databases/orders/switchover",
        r#"{"to": "region"}"#,
    )
    .await;
    std::fs::remove_file(&flag).unwrap();
    assert_eq!(status(&resp), 409, "{resp}");
    let why: Value = serde_json::from_str(body(&resp)).unwrap();
    let error = why["error"].as_str().unwrap();
    // Seen as an exit while it catches up, or — its backends outliving its postmaster for a
    // moment — as a promotion that fails: either way it is given up at once.
    assert!(
        error.contains("region exited during the switchover")
            || error.contains("promoting region failed"),
        "{error}"
    );
    assert!(error.contains("edge stays primary"), "{error}");
    let d = db.view().await.unwrap();
    assert_eq!(d["primary"], "edge", "primary again at once: {d}");
    assert_eq!(db.rows().await, 3);
    db.wait(Duration::from_secs(60), "healthy again", |d| {
        d["state"] == "healthy" && d["primary"] == "edge" && d["sync_standby"] == "region"
    })
    .await;
    wait_event(&db, "the abandoned switchover", |e| {
        says(
            e,
            "orders/edge",
            "switchover-abandoned",
            "edge stays primary",
        )
    })
    .await;
}
