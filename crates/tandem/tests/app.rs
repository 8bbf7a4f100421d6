//! The whole app moving between sites in the single-process mode, against real parts: real
//! PostgreSQL members (edge primary, region synchronous standby), real sample-app instances
//! behind real load balancers, real DNS answers read with `dig`, and a writer whose every
//! acknowledged row is checked at the end.
//!
//! One test walks the operator's path and the automatic one: a planned failover (`tandem app
//! failover`) and the automatic failback that follows once the edge's data has caught up; the
//! edge's member held back (SIGSTOP) so failback waits and says why; pin and unpin; a site
//! outage drill of the edge (the app moves by itself) and the failback after it; the edge's
//! primary alone frozen (the database fails over, the app follows its data) and back; and
//! `tandem drill app`, whose clients go through the public entry; a restart of Tandem that
//! keeps the app's site, term and pin. Another walks a cold standby (`standby = "cold"`, with
//! pgBackRest): restored in the region when the edge is lost, failed back, warmed up for a
//! planned failover.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::Value;
use testkit::{eventually, free_tcp_port};
use tokio::time::Instant;

struct Lab {
    /// Before `dir`: its log is read from there when a test fails.
    up: Up,
    dir: tempfile::TempDir,
    dns: SocketAddr,
    /// The region's database frontend (the writer's way in: the region never goes dark).
    region_db: SocketAddr,
    /// The load balancers' port (the public entry's).
    web: u16,
    /// The edge's and the region's loopback networks (127.0.N.0/24).
    nets: (u8, u8),
}

/// Members outlive Tandem only if it dies: stop it, then kill anything left in the data
/// directories.
impl Drop for Lab {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.up.child.id() as i32),
            nix::sys::signal::Signal::SIGCONT,
        );
        self.up.terminate();
        let postgres = pg::local::find_bins(None).unwrap().join("postgres");
        for site in ["edge", "region", "region.restored", "edge.restored"] {
            let data = self.dir.path().join("state/databases/orders").join(site);
            pg::family::kill_in_data_dir(&postgres, &data);
        }
    }
}

/// How the region stands by.
#[derive(Clone, Copy)]
enum Mode<'a> {
    /// Its set's min (1) and a synchronous standby member.
    Warm,
    /// Nothing running: its set at 0, its member cold, the database backed up into this
    /// repository with this `archive_timeout`.
    Cold(&'a std::path::Path, &'a str),
}

impl Mode<'_> {
    /// The edge's and the region's loopback networks: each mode its own, so that tests of
    /// both run side by side (the instances' port range is fixed).
    fn nets(self) -> (u8, u8) {
        match self {
            Mode::Warm => (110, 111),
            Mode::Cold(..) => (112, 113),
        }
    }
}

/// Probes every `probe` (timeout `probe_timeout`), Degraded after two failures.
fn topology(
    dns: SocketAddr,
    web: u16,
    pg: u16,
    state: &std::path::Path,
    (probe, probe_timeout): (&str, &str),
    mode: Mode<'_>,
) -> String {
    let (e, r) = mode.nets();
    let password = state.join("databases/orders/password");
    let password = password.display();
    let (standby, region_min, backup) = match mode {
        Mode::Warm => ("warm", 1, String::new()),
        Mode::Cold(repo, archive_timeout) => (
            "cold",
            0,
            format!(
                "  [database.backup]\n  repository = \"{}\"\n  full = \"weekly\"\n  archive_timeout = \"{archive_timeout}\"\n  drill_table = \"public.acked\"\n",
                repo.display()
            ),
        ),
    };
    format!(
        r#"
[[site]]
name = "edge"
role = "edge"

[[site]]
name = "region"
role = "region"

[dns]
listen = ["{dns}"]

[[dns.zone]]
name = "shop.test"
nameservers = ["ns1.shop.test"]
hostmaster = "hostmaster.shop.test"

[[monitor]]
name = "web"
protocol = "http"
port = {web}
path = "/healthz"
interval = "{probe}"
timeout = "{probe_timeout}"
tolerated_failures = 1
recovery_successes = 2

[[profile]]
name = "www"
domain = "www.shop.test"
routing = "priority"
monitor = "web"
ttl = "1s"
failback_hold = "3s"

  [[profile.endpoint]]
  name = "edge"
  target = {{ load_balancer = "edge-web" }}
  priority = 1

  [[profile.endpoint]]
  name = "region"
  target = {{ load_balancer = "region-web" }}
  priority = 2

[[load_balancer]]
name = "edge-web"
site = "edge"
frontend = "127.0.{e}.10:{web}"
pool = {{ scale_set = "edge-web", port = "http" }}
probe = "web"
drain_timeout = "1s"

[[load_balancer]]
name = "region-web"
site = "region"
frontend = "127.0.{r}.10:{web}"
pool = {{ scale_set = "region-web", port = "http" }}
probe = "web"
drain_timeout = "1s"

[[scale_set]]
name = "edge-web"
site = "edge"
command = ["tandem", "sample-app", "--listen", "{{address}}:{{port.http}}", "--site", "{{site}}",
           "--database", "127.0.{e}.20:{pg}", "--database-password-file", "{password}"]
bind = "127.0.{e}.1"
ports = {{ http = "21500-21519" }}
capacity = {{ min = 2, max = 3, initial = 2 }}
health = "web"
stop_grace = "1s"

[[scale_set]]
name = "region-web"
site = "region"
command = ["tandem", "sample-app", "--listen", "{{address}}:{{port.http}}", "--site", "{{site}}",
           "--database", "127.0.{r}.20:{pg}", "--database-password-file", "{password}"]
bind = "127.0.{r}.1"
ports = {{ http = "21500-21519" }}
capacity = {{ min = {region_min}, max = 3, initial = {region_min} }}
health = "web"
stop_grace = "1s"

[[database]]
name = "orders"
replication = "sync"
failover_timeout = "2s"
frontends = {{ edge = "127.0.{e}.20:{pg}", region = "127.0.{r}.20:{pg}" }}
{backup}
  [[database.member]]
  site = "edge"
  listen = "127.0.{e}.21:{pg}"

  [[database.member]]
  site = "region"
  listen = "127.0.{r}.21:{pg}"

[[app]]
name = "shop"
sites = ["edge", "region"]
profile = "www"
database = "orders"
scale_sets = ["edge-web", "region-web"]
standby = "{standby}"
failback = "automatic"
"#
    )
}

async fn start() -> Lab {
    start_probing(("300ms", "250ms"), Mode::Warm).await
}

async fn start_probing(probe: (&str, &str), mode: Mode<'_>) -> Lab {
    let (edge, region) = mode.nets();
    // PostgreSQL's own user must reach the state directory (tempdirs are 0700).
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let ips: Vec<String> = [edge, region]
        .iter()
        .flat_map(|n| [10, 20, 21].map(|h| format!("127.0.{n}.{h}")))
        .collect();
    let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
    let web = free_tcp_port(&ips);
    let pg = free_tcp_port(&ips);
    let dns: SocketAddr = (
        [127, 0, 0, 1],
        testkit::free_udp_tcp_port([127, 0, 0, 1].into()),
    )
        .into();
    let api: SocketAddr = format!("127.0.0.1:{}", free_tcp_port(&["127.0.0.1"]))
        .parse()
        .unwrap();
    let state = dir.path().join("state");
    let file = topology_file(
        dir.path(),
        api,
        &topology(dns, web, pg, &state, probe, mode),
    );
    let up = Up::start(&file, api, &[]);
    Lab {
        dir,
        up,
        dns,
        region_db: format!("127.0.{region}.20:{pg}").parse().unwrap(),
        web,
        nets: (edge, region),
    }
}

impl Lab {
    async fn app(&self) -> Option<Value> {
        let v = try_get_json(self.up.api, "/v1/apps").await?;
        Some(v["apps"][0].clone())
    }

    /// Waits for the app to satisfy `check`, up to `secs`.
    /// On a timeout the failure shows the app as last seen.
    async fn wait(&self, secs: u64, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        testkit::eventually_shows(Duration::from_secs(secs), what, || self.app(), check).await
    }

    /// Waits until the app is at rest at `site` under `term`, DNS answers that site's load
    /// balancer and the database's primary is there.
    async fn at_rest(&self, site: &str, term: u64, secs: u64) -> Value {
        let a = self
            .wait(secs, &format!("active at {site}, term {term}"), |a| {
                a["active"] == site && a["term"] == term && a["moving"].is_null()
            })
            .await;
        let net = if site == "edge" {
            self.nets.0
        } else {
            self.nets.1
        };
        let want = vec![format!("127.0.{net}.10")];
        eventually(
            Duration::from_secs(5),
            &format!("DNS answers {site}"),
            || async {
                (testkit::dig(self.dns, "www.shop.test", &[]) == Some(want.clone())).then_some(())
            },
        )
        .await;
        // The primary is there (at once after a move; after a restart once the members are
        // back).
        eventually(
            Duration::from_secs(60),
            &format!("primary at {site}"),
            || async {
                let db = try_get_json(self.up.api, "/v1/databases").await?;
                (db["databases"][0]["primary"] == site).then_some(())
            },
        )
        .await;
        a
    }

    /// An outage drill of the edge for `length` (its load balancers, instances and database
    /// member stop).
    async fn outage_of_the_edge(&self, length: &str) {
        let body = format!(r#"{{"site": "edge", "for": "{length}"}}"#);
        let resp = http_post_json(self.up.api, "/v1/drills/outage", &body).await;
        assert!(resp.starts_with("HTTP/1.0 200"), "{resp}");
    }

    /// Waits until the edge's member is fenced by an outage drill (at the database driver's
    /// next tick after the drill starts), and says when it was seen so: a write acknowledged
    /// before then may be lost with the edge, none after.
    async fn edge_fenced(&self) -> Instant {
        eventually(
            Duration::from_secs(30),
            "the edge's member fenced",
            || async {
                let v = try_get_json(self.up.api, "/v1/databases").await?;
                let edge = v["databases"][0]["members"]
                    .as_array()?
                    .iter()
                    .find(|m| m["site"] == "edge")?
                    .clone();
                (edge["state"] == "fenced").then(Instant::now)
            },
        )
        .await
    }

    fn password(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("state/databases/orders/password"))
            .unwrap()
            .trim()
            .to_string()
    }

    fn cli(&self, args: &[&str]) -> (bool, String) {
        let out = run(tandem()
            .arg("app")
            .args(args)
            .args(["--api", &self.up.api.to_string()]));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }
}

/// The steps of the app's last move, in order.
fn done_steps(app: &Value) -> Vec<&str> {
    app["last_move"]["done"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect()
}

fn site<'a>(app: &'a Value, name: &str) -> &'a Value {
    app["sites"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["site"] == name)
        .unwrap()
}

async fn connect(db: SocketAddr, password: &str) -> Option<tokio_postgres::Client> {
    let mut c = tokio_postgres::Config::new();
    c.host(db.ip().to_string())
        .port(db.port())
        .user("postgres")
        .password(password)
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(1));
    let (client, conn) = c.connect(tokio_postgres::NoTls).await.ok()?;
    tokio::spawn(conn);
    Some(client)
}

/// Inserts increasing ids through a frontend, reconnecting after errors, and keeps every
/// acknowledged one; bounded to 10 minutes.
struct Writer {
    acked: Arc<Mutex<Vec<i64>>>,
    /// When each of `acked` was acknowledged.
    acked_at: Arc<Mutex<Vec<Instant>>>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    fn start(db: SocketAddr, password: String) -> Writer {
        let acked = Arc::new(Mutex::new(Vec::new()));
        let acked_at = Arc::new(Mutex::new(Vec::new()));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let (a, at) = (acked.clone(), acked_at.clone());
        let task = tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(600);
            let mut next: i64 = 1;
            let mut client = None;
            while !*stopped.borrow() && Instant::now() < deadline {
                if client.is_none() {
                    client = connect(db, &password).await;
                    if client.is_none() {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                }
                let c = client.as_ref().unwrap();
                let id = next;
                next += 1;
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
                let insert = c.execute("INSERT INTO acked (id) VALUES ($1)", &params);
                match tokio::time::timeout(Duration::from_secs(5), insert).await {
                    Ok(Ok(_)) => {
                        a.lock().unwrap().push(id);
                        at.lock().unwrap().push(Instant::now());
                    }
                    _ => client = None,
                }
                // A steady trickle, not a flood: the test is about the moves.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        Writer {
            acked,
            acked_at,
            stop,
            task,
        }
    }

    /// Every acknowledged id with when it was acknowledged.
    fn acked_at(&self) -> Vec<(i64, Instant)> {
        let a = self.acked.lock().unwrap().clone();
        let at = self.acked_at.lock().unwrap().clone();
        a.into_iter().zip(at).collect()
    }

    fn count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    async fn more_than(&self, n: usize, what: &str) {
        eventually(Duration::from_secs(30), what, || async {
            (self.count() > n).then_some(())
        })
        .await;
    }

    async fn finish(self) -> Vec<i64> {
        let _ = self.stop.send(true);
        self.task.await.unwrap();
        Arc::try_unwrap(self.acked).unwrap().into_inner().unwrap()
    }
}

/// Sends `signal` to every process of the member whose data directory is `data`.
fn signal_member(data: &std::path::Path, signal: nix::sys::signal::Signal) {
    let n = testkit::signal_postgres_in(data, signal);
    if signal == nix::sys::signal::Signal::SIGSTOP {
        assert!(n > 0, "no process of the member in {}", data.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_app_fails_over_and_back_with_its_data() {
    let mut lab = start().await;
    // At rest at the edge: DNS answers the edge, the edge's member is the primary, the region
    // (warm) runs its set's min.
    let a = lab
        .wait(120, "edge and region healthy, region caught up", |a| {
            site(a, "edge")["healthy"] == true
                && site(a, "region")["caught_up"] == true
                && site(a, "edge")["online"] == 2
                && site(a, "region")["online"] == 1
        })
        .await;
    assert_eq!(a["standby"], "warm");
    lab.at_rest("edge", 0, 10).await;

    // The plan, printed without acting on it.
    let (ok, text) = lab.cli(&["plan", "shop", "--to", "region"]);
    assert!(ok, "{text}");
    assert!(
        text.contains("shop: edge -> region")
            && text.contains("1. promote")
            && text.contains("2. scale")
            && text.contains("3. wait-online")
            && text.contains("4. move-dns")
            && text.contains("5. scale-down"),
        "{text}"
    );
    let (ok, text) = lab.cli(&["plan", "shop", "--to", "moon"]);
    assert!(
        !ok && text.contains("moon is not one of the app's sites (edge, region) (404)"),
        "{text}"
    );
    let (ok, text) = lab.cli(&["failover", "shop", "--to", "moon"]);
    assert!(!ok && text.contains("(404)"), "{text}");
    let (ok, text) = lab.cli(&["status", "nope"]);
    assert!(!ok && text.contains("no app \"nope\""), "{text}");

    // A writer through the region's frontend, which follows the primary wherever it is.
    let password = lab.password();
    let c = connect(lab.region_db, &password).await.unwrap();
    c.batch_execute("CREATE TABLE acked (id bigint PRIMARY KEY)")
        .await
        .unwrap();
    let writer = Writer::start(lab.region_db, password.clone());
    writer.more_than(20, "writes before the failover").await;

    // (4) Pin: the app moves to the region (a switchover, the warm region scaled to the
    // edge's capacity before DNS) and stays there past the failback hold.
    let (ok, text) = lab.cli(&["pin", "shop", "region"]);
    assert!(ok, "{text}");
    assert!(
        text.contains("move edge -> region (operator): done"),
        "{text}"
    );
    for step in ["promote", "scale", "wait-online", "move-dns", "scale-down"] {
        assert!(text.contains(step), "{step} missing: {text}");
    }
    let a = lab.at_rest("region", 1, 10).await;
    assert_eq!(a["pinned"], true);
    assert_eq!(a["waiting_for"], "pinned to region");
    assert_eq!(
        site(&a, "region")["capacity"],
        2,
        "warm standby scaled up: {a}"
    );
    lab.wait(60, "the edge's member caught up again", |a| {
        site(a, "edge")["caught_up"] == true && site(a, "edge")["healthy"] == true
    })
    .await;
    // Past the 3 s hold, a pinned app stays where it is (watched for 5 s).
    let watch_until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < watch_until {
        let a = lab.app().await.unwrap();
        assert_eq!(a["active"], "region", "a pinned app moved: {a}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let n = writer.count();
    writer.more_than(n + 20, "writes at the region").await;

    // (2) Failback gated on the data: the edge's member held back (every process stopped)
    // stops streaming; failback is refused on command and waits by itself, saying why.
    let edge_data = lab.dir.path().join("state/databases/orders/edge");
    signal_member(&edge_data, nix::sys::signal::Signal::SIGSTOP);
    lab.wait(20, "the edge's member behind", |a| {
        site(a, "edge")["caught_up"] == false
    })
    .await;
    let (ok, text) = lab.cli(&["failback", "shop"]);
    assert!(!ok && text.contains("has not caught up"), "{text}");
    let (ok, text) = lab.cli(&["unpin", "shop"]);
    assert!(ok && text.contains("unpinned"), "{text}");
    let a = lab.app().await.unwrap();
    assert_eq!(a["active"], "region", "{a}");
    assert!(
        a["waiting_for"]
            .as_str()
            .is_some_and(|w| w.contains("edge's database member to catch up")),
        "{a}"
    );
    signal_member(&edge_data, nix::sys::signal::Signal::SIGCONT);
    let a = lab.at_rest("edge", 2, 90).await;
    assert_eq!(a["last_move"]["reason"], "failback");
    assert_eq!(a["last_move"]["outcome"], "done");
    lab.wait(30, "the region scaled back to its min", |a| {
        site(a, "region")["capacity"] == 1
    })
    .await;

    // (4) A planned failover without a pin: done, then the automatic failback brings the app
    // home once the edge's member has caught up.
    lab.wait(60, "the region's member caught up again", |a| {
        site(a, "region")["caught_up"] == true
    })
    .await;
    let (ok, text) = lab.cli(&["failover", "shop", "--to", "region"]);
    assert!(
        ok && text.contains("move edge -> region (operator): done"),
        "{text}"
    );
    let a = lab.at_rest("edge", 4, 90).await;
    assert_eq!(a["last_move"]["reason"], "failback");
    let n = writer.count();
    writer.more_than(n + 20, "writes after failing back").await;

    // (1) The edge site lost (an outage drill: its load balancers, instances and database
    // member stop): the database fails over by itself once the lease lapses, the app moves
    // with it, then fails back once the edge returns and its member has caught up. The
    // region's member, just rewound by the failback, must be the synchronous standby again
    // first: without one a failover is refused (it would lose acknowledged writes).
    lab.wait(
        60,
        "the region's member caught up after the failback",
        |a| site(a, "region")["caught_up"] == true,
    )
    .await;
    let n = writer.count();
    lab.outage_of_the_edge("5m").await;
    let a = lab.at_rest("region", 5, 60).await;
    assert_eq!(a["last_move"]["reason"], "site-lost");
    let steps = done_steps(&a);
    assert_eq!(
        steps,
        [
            "confirm-loss",
            "promote",
            "scale",
            "wait-online",
            "move-dns",
            "scale-down"
        ],
        "{a}"
    );
    assert_eq!(a["waiting_for"], "edge to be healthy", "{a}");
    let db = &get_json(lab.up.api, "/v1/databases").await["databases"][0];
    assert_eq!(db["last_change"]["kind"], "failover", "{db}");
    let edge_member = db["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["site"] == "edge")
        .unwrap();
    assert_eq!(edge_member["state"], "fenced", "{db}");
    assert_eq!(edge_member["error"], "outage drill of site edge", "{db}");
    writer.more_than(n + 20, "writes after the site loss").await;
    let resp = http_post(lab.up.api, "/v1/drills/stop").await;
    assert!(resp.starts_with("HTTP/1.0 200"), "{resp}");
    lab.at_rest("edge", 6, 90).await;

    // (3) The database alone fails (the edge's primary freezes; the edge's web tier stays
    // healthy): the database fails over by itself, and the whole app follows its data, then
    // comes home once the edge's member has rejoined and caught up.
    lab.wait(60, "the region's member synchronous again", |a| {
        site(a, "region")["caught_up"] == true
    })
    .await;
    let n = writer.count();
    signal_member(&edge_data, nix::sys::signal::Signal::SIGSTOP);
    let moved = wait_event(lab.up.api, "edge -> region (data-moved)").await;
    assert_eq!(moved["kind"], "app-move-start", "{moved}");
    // Whatever fencing left of the frozen member runs on (and is stopped or rewound).
    signal_member(&edge_data, nix::sys::signal::Signal::SIGCONT);
    let a = lab.at_rest("edge", 8, 120).await;
    assert_eq!(a["last_move"]["reason"], "failback");
    writer
        .more_than(n + 20, "writes after the database failover")
        .await;

    // Every acknowledged write is there.
    let acked = writer.finish().await;
    let c = eventually(Duration::from_secs(10), "a connection", || async {
        connect(lab.region_db, &password).await
    })
    .await;
    let rows = c.query("SELECT id FROM acked", &[]).await.unwrap();
    let have: std::collections::HashSet<i64> = rows.iter().map(|r| r.get(0)).collect();
    let lost: Vec<&i64> = acked.iter().filter(|id| !have.contains(id)).collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    assert!(acked.len() > 100, "{} writes", acked.len());

    // (5) The drill: failover and failback with clients on the public entry (DNS name, load
    // balancer, sample-app instance, the site's database frontend); its figures match the
    // rows the clients left.
    lab.wait(60, "the region's member caught up before the drill", |a| {
        site(a, "region")["caught_up"] == true
    })
    .await;
    let out = run(tandem().args([
        "drill",
        "app",
        "shop",
        "--json",
        "--api",
        &lab.up.api.to_string(),
    ]));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(
        (r["from"].as_str(), r["to"].as_str()),
        (Some("edge"), Some("region"))
    );
    assert_eq!(r["failover"]["outcome"], "done", "{r}");
    assert_eq!(r["failback"]["outcome"], "done", "{r}");
    assert_eq!(r["writes_lost"], 0, "{r}");
    for phase in ["failover_clients", "failback_clients"] {
        let rto = r[phase]["rto_seconds"].as_f64().unwrap();
        assert!(rto > 0.0 && rto < 60.0, "{phase}: {r}");
    }
    let acked = r["writes_acknowledged"].as_u64().unwrap();
    let failed = r["writes_failed"].as_u64().unwrap();
    assert!(acked >= 15, "{r}");
    assert!(r["reads_ok"].as_u64().unwrap() > 0, "{r}");
    let c = connect(lab.region_db, &password).await.unwrap();
    let rows: i64 = c
        .query_one("SELECT count(*) FROM tandem_sample", &[])
        .await
        .unwrap()
        .get(0);
    // Every acknowledged write is a row; a failed one may or may not have committed.
    let rows = rows as u64;
    assert!(rows >= acked && rows <= acked + failed, "{rows} rows: {r}");
    let a = lab.at_rest("edge", 10, 30).await;
    assert_eq!(a["pinned"], false, "the drill leaves the app unpinned: {a}");
    assert_eq!(a["last_drill"]["ok"], true);
    // The text report.
    let shown = run(tandem().args(["app", "status", "--api", &lab.up.api.to_string()]));
    let shown = String::from_utf8_lossy(&shown.stdout).to_string();
    assert!(
        shown.contains("app shop: active at edge (term 10)"),
        "{shown}"
    );

    // Metrics tell the same story.
    let metrics = http_get(lab.up.api, "/metrics").await;
    for line in [
        "tandem_app_active_site{app=\"shop\",site=\"edge\"} 1",
        "tandem_app_active_site{app=\"shop\",site=\"region\"} 0",
        "tandem_app_term{app=\"shop\"} 10",
        "tandem_app_moves_total{app=\"shop\",outcome=\"done\"} 10",
        "tandem_app_moving{app=\"shop\"} 0",
    ] {
        assert!(metrics.contains(line), "{line} missing");
    }
    assert!(metrics.contains("tandem_app_last_move_seconds{app=\"shop\",reason=\"failback\"}"));
    // Every app metric the README names is exported with its HELP and TYPE.
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let named: std::collections::BTreeSet<&str> = readme
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("tandem_app_"))
        .collect();
    assert!(named.len() >= 5, "{named:?}");
    for name in named {
        assert!(
            metrics.contains(&format!("# TYPE {name} "))
                && metrics.contains(&format!("# HELP {name} ")),
            "{name} is in the README but not exported"
        );
    }

    // A restart of Tandem keeps where the app is, its term and its pin (STATE_DIR/apps/).
    lab.wait(60, "the region's member caught up", |a| {
        site(a, "region")["caught_up"] == true
    })
    .await;
    let (ok, text) = lab.cli(&["pin", "shop", "region"]);
    assert!(ok, "{text}");
    lab.at_rest("region", 11, 30).await;
    assert!(lab.up.terminate().success());
    let file = lab.dir.path().join("topology.toml");
    lab.up = Up::start(&file, lab.up.api, &[]);
    let a = lab
        .wait(120, "the app back after the restart", |a| {
            site(a, "region")["healthy"] == true && a["active"] == "region"
        })
        .await;
    assert_eq!(
        (a["term"].as_u64(), a["pinned"].as_bool()),
        (Some(11), Some(true)),
        "{a}"
    );
    lab.at_rest("region", 11, 120).await;
}

/// Ids of `table` in the database behind `db`.
async fn ids(db: SocketAddr, password: &str) -> Option<std::collections::BTreeSet<i64>> {
    let c = connect(db, password).await?;
    let rows = c.query("SELECT id FROM acked", &[]).await.ok()?;
    Some(rows.iter().map(|r| r.get::<_, i64>(0)).collect())
}

/// A backup repository the database user may write: its parent (kept) and its path.
fn repository() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let repo = dir.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    if let Some((uid, gid)) = pg::local::run_as().unwrap() {
        std::os::unix::fs::chown(&repo, Some(uid), Some(gid)).unwrap();
    }
    (dir, repo)
}

/// A cold standby's failover of a database of `pgbench -i -s TANDEM_COLD_SCALE` (default
/// 70: about 1 GB), `archive_timeout = "60s"`, 1 s probes: the edge lost (an outage drill)
/// while a writer commits every 20 ms, to the app at rest in the region (restored, scaled
/// from 0, DNS moved) and to the writer's first acknowledged write there; the restore's own
/// times and the writes lost (the loss `TANDEM_COLD_WRITE_SECS`, default 90, into the writes).
/// `TANDEM_COLD_SCALE=70 cargo nextest run -p tandem --test app --run-ignored only --no-capture measure_cold`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement"]
async fn measure_cold_failover() {
    let scale: u32 = std::env::var("TANDEM_COLD_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(70);
    let (_repo_dir, repo) = repository();
    let lab = start_probing(("1s", "500ms"), Mode::Cold(&repo, "60s")).await;
    lab.wait(120, "the edge serving", |a| site(a, "edge")["online"] == 2)
        .await;
    lab.at_rest("edge", 0, 30).await;
    let password = lab.password();
    let pgbench = pg::local::find_bins(None).unwrap().join("pgbench");
    let t = Instant::now();
    let out = std::process::Command::new(pgbench)
        .args(["-i", "-q", "-s", &scale.to_string(), "-h"])
        .arg(lab.region_db.ip().to_string())
        .args([
            "-p",
            &lab.region_db.port().to_string(),
            "-U",
            "postgres",
            "postgres",
        ])
        .env("PGPASSWORD", &password)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("pgbench -i -s {scale}: {:?}", t.elapsed());
    let c = connect(lab.region_db, &password).await.unwrap();
    c.batch_execute("CREATE TABLE acked (id bigint PRIMARY KEY)")
        .await
        .unwrap();
    let size: i64 = c
        .query_one("SELECT pg_database_size('postgres')", &[])
        .await
        .unwrap()
        .get(0);
    let out = run(tandem().args([
        "backup",
        "orders",
        "now",
        "--type",
        "full",
        "--api",
        &lab.up.api.to_string(),
    ]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The loss comes `TANDEM_COLD_WRITE_SECS` (default 90) into the writes: past one
    // `archive_timeout` after the backup, so the RPO is what the timeout bounds, not luck.
    let writing: u64 = std::env::var("TANDEM_COLD_WRITE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(90);
    let writer = Writer::start(lab.region_db, password.clone());
    let until = Instant::now() + Duration::from_secs(writing);
    eventually(
        Duration::from_secs(writing + 30),
        "writing for a while",
        || async { (Instant::now() >= until && writer.count() > 100).then_some(()) },
    )
    .await;
    let lost_at = Instant::now();
    lab.outage_of_the_edge("10m").await;
    let fenced_at = lab.edge_fenced().await;
    let before = writer.count();
    let a = lab.at_rest("region", 1, 600).await;
    let at_rest = lost_at.elapsed();
    writer.more_than(before, "a write at the region").await;
    // The writer's outage: the longest stretch without an acknowledgement around the loss,
    // and when it ended.
    let times: Vec<Instant> = writer.acked_at().into_iter().map(|(_, at)| at).collect();
    let (gap, first) = times
        .windows(2)
        .filter(|w| w[1] > lost_at)
        .map(|w| (w[1] - w[0], w[1] - lost_at))
        .max()
        .unwrap_or_default();
    let have = ids(lab.region_db, &password).await.unwrap();
    let lost: Vec<Duration> = writer
        .acked_at()
        .into_iter()
        .filter(|(id, at)| *at < fenced_at && !have.contains(id))
        .map(|(_, at)| lost_at.saturating_duration_since(at))
        .collect();
    let restored = wait_event(lab.up.api, "restored at region").await;
    eprintln!(
        "cold failover of {:.0} MB: app at rest in the region after {at_rest:?} (steps {}), the writer without an acknowledgement for {gap:?}, until {first:?} after the loss; {} acknowledged writes lost (RPO {:?}); {}",
        size as f64 / 1e6,
        a["last_move"]["done"],
        lost.len(),
        lost.iter().max().copied().unwrap_or_default(),
        restored["message"]
    );
    let _ = writer.finish().await;
}

/// `standby = "cold"`: nothing runs in the region (its set at 0, its database member cold)
/// until the edge is lost; then the region's member is restored from the backups (the newest
/// backup and the WAL archived every `archive_timeout`, 3 s) as the primary, its set scaled
/// from 0, and DNS moved; the writer resumes, and the only acknowledged writes lost are
/// those of the last `archive_timeout` before the loss. The edge back: its member rebuilt
/// from the region's, the app fails back with a switchover (nothing lost), the region cold
/// again. A planned failover warms the region's member up first (cloned from the primary,
/// caught up), then switches over: nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_standby_is_restored_from_the_backups() {
    let (_repo_dir, repo) = repository();
    let lab = start_probing(("300ms", "250ms"), Mode::Cold(&repo, "3s")).await;
    let cold_region = |d: &Value| {
        d["members"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["site"] == "region"))
            .is_some_and(|m| m["state"] == "cold" && m["pid"].is_null())
    };
    let region_cold_again = |what: &'static str| {
        let lab = &lab;
        async move {
            eventually(Duration::from_secs(30), what, || async {
                let v = try_get_json(lab.up.api, "/v1/databases").await?;
                cold_region(&v["databases"][0]).then_some(())
            })
            .await;
        }
    };
    let a = lab
        .wait(
            120,
            "the edge serving, nothing running in the region",
            |a| {
                site(a, "edge")["online"] == 2
                    && site(a, "region")["capacity"] == 0
                    && site(a, "region")["healthy"] == true
            },
        )
        .await;
    assert_eq!(a["standby"], "cold");
    lab.at_rest("edge", 0, 10).await;
    let db = get_json(lab.up.api, "/v1/databases").await["databases"][0].clone();
    assert!(cold_region(&db), "{db:#}");
    assert_eq!(
        db["state"], "healthy",
        "a cold member is no degradation: {db:#}"
    );

    let password = lab.password();
    let c = connect(lab.region_db, &password).await.unwrap();
    c.batch_execute("CREATE TABLE acked (id bigint PRIMARY KEY)")
        .await
        .unwrap();
    // The primary keeps no replication slot for a cold member (it would hold WAL forever).
    let slots: i64 = c
        .query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0);
    eventually(Duration::from_secs(90), "the first full backup", || async {
        let b = try_get_json(lab.up.api, "/v1/databases/orders/backups").await?;
        b["backups"]
            .as_array()
            .filter(|a| !a.is_empty())
            .map(|_| ())
    })
    .await;
    let writer = Writer::start(lab.region_db, password.clone());
    writer
        .more_than(150, "writes before the edge is lost")
        .await;

    // (1) The edge lost: restored in the region.
    let lost_at = Instant::now();
    lab.outage_of_the_edge("5m").await;
    let fenced_at = lab.edge_fenced().await;
    let a = lab.at_rest("region", 1, 120).await;
    let steps = done_steps(&a);
    assert_eq!(
        steps,
        [
            "confirm-loss",
            "restore",
            "scale",
            "wait-online",
            "move-dns",
            "scale-down"
        ],
        "{a}"
    );
    assert_eq!(site(&a, "region")["capacity"], 2, "scaled from 0: {a}");
    let resumed = writer.count();
    writer
        .more_than(resumed + 20, "writes after the restore")
        .await;
    let db = get_json(lab.up.api, "/v1/databases").await["databases"][0].clone();
    assert_eq!(db["last_change"]["kind"], "restore", "{db:#}");
    // The restore's event bounds the RPO (the lost primary's newest commit is unknown).
    let e = wait_event(lab.up.api, "restored at region").await;
    let said = e["message"].as_str().unwrap();
    assert!(said.contains("RPO at most"), "{said}");
    // RPO: what was lost was acknowledged within archive_timeout (3 s, and a second for the
    // archiver's pace) before the loss, or after it until the edge's primary was fenced.
    let have = ids(lab.region_db, &password).await.unwrap();
    let lost: Vec<(i64, Instant)> = writer
        .acked_at()
        .into_iter()
        .filter(|(id, at)| *at < fenced_at && !have.contains(id))
        .collect();
    let window = Duration::from_secs(4);
    for (id, at) in &lost {
        assert!(
            *at + window >= lost_at,
            "id {id}, acknowledged {:?} before the loss, is missing",
            lost_at - *at
        );
    }
    let rpo = lost
        .iter()
        .map(|(_, at)| lost_at.saturating_duration_since(*at))
        .max()
        .unwrap_or_default();
    eprintln!(
        "cold failover: {} acknowledged writes lost (RPO {rpo:?}); app moved in {} s",
        lost.len(),
        a["last_move"]["seconds"]
    );
    let lost: std::collections::BTreeSet<i64> = lost.into_iter().map(|(id, _)| id).collect();

    // (2) The edge back: its member rebuilt from the region's, then the failback (a
    // switchover: nothing lost), the region cold again.
    let resp = http_post_json(lab.up.api, "/v1/drills/stop", "").await;
    assert!(resp.starts_with("HTTP/1.0 200"), "{resp}");
    let a = lab.at_rest("edge", 2, 120).await;
    assert_eq!(a["last_move"]["reason"], "failback", "{a}");
    lab.wait(30, "the region at 0 again", |a| {
        site(a, "region")["capacity"] == 0 && site(a, "region")["online"] == 0
    })
    .await;
    region_cold_again("the region's member cold again").await;
    let n = writer.count();
    writer.more_than(n + 20, "writes after the failback").await;

    // (3) A planned failover to the cold region: warmed up, then switched over.
    let (ok, text) = lab.cli(&["failover", "shop", "--to", "region"]);
    assert!(
        ok && text.contains("move edge -> region (operator): done"),
        "{text}"
    );
    for step in ["warm-up", "promote", "scale", "wait-online", "move-dns"] {
        assert!(text.contains(step), "{step} missing: {text}");
    }
    let a = lab.at_rest("edge", 4, 120).await;
    assert_eq!(a["last_move"]["reason"], "failback", "{a}");
    region_cold_again("the region's member cold once more").await;
    let n = writer.count();
    writer.more_than(n + 20, "writes at the end").await;
    let acked = writer.finish().await;
    let have = ids(lab.region_db, &password).await.unwrap();
    let missing: Vec<i64> = acked
        .iter()
        .filter(|id| !have.contains(id) && !lost.contains(id))
        .copied()
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged and lost after the restore: {missing:?}"
    );
}

/// A POST through the public entry: the name asked of Tandem's DNS (`dig`, every time: a
/// client that re-resolves), then the load balancer it answers; the body of a 200.
async fn public_write(dns: SocketAddr, port: u16) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ip = testkit::dig(dns, "www.shop.test", &[])?
        .into_iter()
        .next()?;
    let addr: SocketAddr = format!("{ip}:{port}").parse().ok()?;
    let talk = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let req = "POST /write HTTP/1.0\r\nHost: www.shop.test\r\nContent-Length: 0\r\n\r\n";
        s.write_all(req.as_bytes()).await.ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).await.ok()?;
        out.starts_with("HTTP/1.0 200")
            .then(|| out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()))?
    };
    tokio::time::timeout(Duration::from_secs(3), talk)
        .await
        .ok()?
}

/// Whole-app RTO with 1 s probes, median and max over `TANDEM_RTO_RUNS` rounds (default 10):
/// a site outage (drill: the edge's load balancers, instances and database member stop) of
/// the edge to the first write acknowledged through the public entry and committed at the
/// region, by a client that re-resolves DNS for every write; and
/// `tandem drill app` (planned failover and failback: client RTO, writes lost).
/// `cargo nextest run -p tandem --test app --run-ignored only --no-capture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement"]
async fn measure_whole_app_rto() {
    let runs: usize = std::env::var("TANDEM_RTO_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let lab = start_probing(("1s", "500ms"), Mode::Warm).await;
    lab.wait(120, "both sites healthy, the region caught up", |a| {
        site(a, "edge")["healthy"] == true
            && site(a, "region")["caught_up"] == true
            && site(a, "edge")["online"] == 2
    })
    .await;
    let web = lab.web;
    eventually(
        Duration::from_secs(30),
        "a write through the public entry",
        || async { public_write(lab.dns, web).await },
    )
    .await;
    let mut term = lab.app().await.unwrap()["term"].as_u64().unwrap();
    let mut outage = Vec::new();
    let (mut planned_fo, mut planned_fb) = (Vec::new(), Vec::new());
    let mut lost = 0;
    for round in 0..runs {
        lab.wait(120, "the region caught up", |a| {
            site(a, "region")["caught_up"] == true && a["moving"].is_null()
        })
        .await;
        let start = Instant::now();
        lab.outage_of_the_edge("5m").await;
        let end = start + Duration::from_secs(120);
        let mut rto = None;
        while Instant::now() < end {
            if let Some(body) = public_write(lab.dns, web).await
                && body.contains("member=region")
            {
                rto = Some(start.elapsed().as_secs_f64());
                break;
            }
        }
        let rto = rto.expect("a write at the region within 120 s");
        lab.wait(60, "the app at the region", |a| {
            a["active"] == "region" && a["moving"].is_null()
        })
        .await;
        let _ = http_post(lab.up.api, "/v1/drills/stop").await;
        let a = lab
            .wait(180, "the app back at the edge", |a| {
                a["active"] == "edge"
                    && a["moving"].is_null()
                    && a["term"].as_u64() > Some(term + 1)
            })
            .await;
        term = a["term"].as_u64().unwrap();
        println!("round {round}: site loss to the first write at the region: {rto:.2} s");
        outage.push(rto);

        lab.wait(120, "the region caught up", |a| {
            site(a, "region")["caught_up"] == true
        })
        .await;
        let out = run(tandem().args([
            "drill",
            "app",
            "shop",
            "--json",
            "--api",
            &lab.up.api.to_string(),
        ]));
        let r: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(r["ok"], true, "{r}");
        term += 2;
        let fo = r["failover_clients"]["rto_seconds"].as_f64().unwrap();
        let fb = r["failback_clients"]["rto_seconds"].as_f64().unwrap();
        lost += r["writes_lost"].as_u64().unwrap();
        println!(
            "round {round}: drill app: failover {fo:.2} s (move {:.2} s), failback {fb:.2} s (move {:.2} s), {} writes, {} lost",
            r["failover"]["seconds"].as_f64().unwrap(),
            r["failback"]["seconds"].as_f64().unwrap(),
            r["writes_acknowledged"],
            r["writes_lost"]
        );
        planned_fo.push(fo);
        planned_fb.push(fb);
    }
    let n = outage.len();
    let (m, x) = testkit::median_max(outage);
    println!(
        "site loss (web tier and database member) -> first write at the region (1 s probes): median {m:.2} s, max {x:.2} s over {n}"
    );
    let (m, x) = testkit::median_max(planned_fo);
    println!("planned failover (client RTO): median {m:.2} s, max {x:.2} s over {runs}");
    let (m, x) = testkit::median_max(planned_fb);
    println!(
        "planned failback (client RTO): median {m:.2} s, max {x:.2} s over {runs}; {lost} acknowledged writes lost"
    );
}
