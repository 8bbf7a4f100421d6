//! A database across machines: the edge's member on the edge node, the region's on the
//! region node, the lease in etcd, every site's frontend on the primary wherever it runs.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use testkit::eventually;
use tokio::time::Instant;

use crate::harness::{DOMAIN, Options, Sites, sql};

/// Frontends on .40, members on .50 (health on :8008) of each site.
fn database() -> String {
    let ip = |n: u8, host: u8| format!("198.18.{n}.{host}");
    format!(
        r#"
[[database]]
name = "orders"
replication = "sync"
failover_timeout = "3s"
frontends = {{ edge = "{e40}:5432", region = "{r40}:5432" }}

  [[database.member]]
  site = "edge"
  listen = "{e50}:5432"

  [[database.member]]
  site = "region"
  listen = "{r50}:5432"
"#,
        e40 = ip(1, 40),
        r40 = ip(2, 40),
        e50 = ip(1, 50),
        r50 = ip(2, 50),
    )
}

/// `orders` as `site`'s node sees it.
async fn view(s: &Sites, site: &str) -> Option<Value> {
    let v: Value = s.get(site, "/v1/databases?scope=local").await?;
    v["databases"]
        .as_array()?
        .iter()
        .find(|d| d["name"] == "orders")
        .cloned()
}

fn member<'a>(v: &'a Value, site: &str) -> &'a Value {
    v["members"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["site"] == site))
        .unwrap_or(&Value::Null)
}

/// Waits until both nodes see `primary` leading with `standby` as its synchronous standby.
async fn wait_healthy(s: &Sites, primary: &str, standby: &str, deadline: Duration) {
    for site in ["edge", "region"] {
        let what = format!("{site}'s node to see {primary} primary, {standby} synchronous");
        eventually(deadline, &what, || async {
            let v = view(s, site).await?;
            (v["primary"] == primary && v["sync_standby"] == standby && v["state"] == "healthy")
                .then_some(())
        })
        .await;
    }
}

fn frontend(s: &Sites, site: &str) -> SocketAddr {
    SocketAddr::new(s.ip(site, 40), 5432)
}

/// Which member's address serves a new session through `site`'s frontend. Asked again for up
/// to 10 s: on a starved machine a tick may miss the primary for a moment, and its frontend
/// then resets its flows.
async fn served_by(s: &Sites, site: &str, password: &str) -> String {
    eventually(
        Duration::from_secs(10),
        "a session through the frontend",
        || async {
            let c = s.sql(frontend(s, site), password).await.ok()?;
            let row = c
                .query_one("SELECT host(inet_server_addr())", &[])
                .await
                .ok()?;
            Some(row.get::<_, String>(0))
        },
    )
    .await
}

/// `sql` through `site`'s frontend, asked again for up to 10 s (see [`served_by`]).
async fn through(
    s: &Sites,
    site: &str,
    password: &str,
    statement: &str,
) -> Vec<tokio_postgres::Row> {
    eventually(Duration::from_secs(10), statement, || async {
        let c = s.sql(frontend(s, site), password).await.ok()?;
        c.query(statement, &[]).await.ok()
    })
    .await
}

/// The ids a writer had acknowledged, with when, and its client errors.
#[derive(Clone, Default)]
struct Writes {
    acks: Arc<Mutex<Vec<(i64, Instant)>>>,
    errors: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Writes {
    fn count(&self) -> usize {
        self.acks.lock().unwrap().len()
    }

    /// The first acknowledgement after `t`, as a delay from it.
    fn first_after(&self, t: Instant) -> Option<Duration> {
        let acks = self.acks.lock().unwrap();
        acks.iter().find(|(_, at)| *at > t).map(|(_, at)| *at - t)
    }

    /// The longest time between two acknowledgements: the outage the writer saw.
    fn longest_gap(&self) -> Duration {
        let acks = self.acks.lock().unwrap();
        acks.windows(2)
            .map(|p| p[1].1 - p[0].1)
            .max()
            .unwrap_or_default()
    }

    fn ids(&self) -> Vec<i64> {
        self.acks
            .lock()
            .unwrap()
            .iter()
            .map(|(id, _)| *id)
            .collect()
    }

    async fn wait_more(&self, n: usize, what: &str) {
        let want = self.count() + n;
        eventually(Duration::from_secs(20), what, || async {
            (self.count() >= want).then_some(())
        })
        .await;
    }
}

/// The next id a writer inserts.
static NEXT_ID: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(1);

/// Inserts an id every 50 ms through `site`'s frontend from the client, reconnecting after
/// any error, until told to stop.
fn writer(s: &Sites, site: &str, password: &str) -> (Writes, tokio::task::JoinHandle<()>) {
    let w = Writes::default();
    let (lab, addr, password, out) = (
        s.lab.clone(),
        frontend(s, site),
        password.to_string(),
        w.clone(),
    );
    let task = tokio::spawn(async move {
        let mut client: Option<tokio_postgres::Client> = None;
        for _ in 0..4_000 {
            // Unique across the test's writers: a second writer must not collide with the
            // first's rows.
            let id = NEXT_ID.fetch_add(1, Ordering::SeqCst);
            if out.stop.load(Ordering::SeqCst) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                client = sql(&lab, "client", addr, &password).await.ok();
            }
            let Some(c) = &client else {
                out.errors.fetch_add(1, Ordering::SeqCst);
                continue;
            };
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
            let insert = c.execute("INSERT INTO t (id) VALUES ($1)", &params);
            match tokio::time::timeout(Duration::from_secs(2), insert).await {
                Ok(Ok(_)) => out.acks.lock().unwrap().push((id, Instant::now())),
                _ => {
                    out.errors.fetch_add(1, Ordering::SeqCst);
                    client = None;
                }
            }
        }
    });
    (w, task)
}

/// Stops the writer; checks every id it had acknowledged is in the primary behind `site`'s
/// frontend; the ids kept.
async fn check_no_loss(
    s: &Sites,
    site: &str,
    password: &str,
    w: Writes,
    task: tokio::task::JoinHandle<()>,
) -> HashSet<i64> {
    w.stop.store(true, Ordering::SeqCst);
    task.await.unwrap();
    let kept: HashSet<i64> = through(s, site, password, "SELECT id FROM t")
        .await
        .iter()
        .map(|r| r.get(0))
        .collect();
    let acked = w.ids();
    let lost: Vec<&i64> = acked.iter().filter(|id| !kept.contains(id)).collect();
    eprintln!(
        "{} writes acknowledged, {} client errors, {} lost",
        acked.len(),
        w.errors.load(Ordering::SeqCst),
        lost.len()
    );
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    kept
}

/// Both members polled for writability every 100 ms, each from inside its own site (so a cut
/// link hides neither): `NOT pg_is_in_recovery()` through a new connection, a member that
/// does not answer counting as not writable. Every poll that finds both writable is kept.
struct Polls {
    stop: Arc<AtomicBool>,
    both: Arc<Mutex<Vec<Duration>>>,
    polls: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

fn poll_writability(s: &Sites, password: &str) -> Polls {
    let (lab, password) = (s.lab.clone(), password.to_string());
    let members = ["edge", "region"].map(|site| (site, SocketAddr::new(s.ip(site, 50), 5432)));
    let (stop, both, polls) = (
        Arc::<AtomicBool>::default(),
        Arc::<Mutex<Vec<Duration>>>::default(),
        Arc::<AtomicU64>::default(),
    );
    let (stop2, both2, polls2) = (stop.clone(), both.clone(), polls.clone());
    let task = tokio::spawn(async move {
        let started = Instant::now();
        for _ in 0..20_000 {
            if stop2.load(Ordering::SeqCst) {
                break;
            }
            let mut writable = 0;
            for (site, addr) in members {
                let Ok(c) = sql(&lab, site, addr, &password).await else {
                    continue;
                };
                let ask = c.query_one("SELECT NOT pg_is_in_recovery()", &[]);
                if let Ok(Ok(row)) = tokio::time::timeout(Duration::from_millis(500), ask).await
                    && row.get::<_, bool>(0)
                {
                    writable += 1;
                }
            }
            polls2.fetch_add(1, Ordering::SeqCst);
            if writable > 1 {
                both2.lock().unwrap().push(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    Polls {
        stop,
        both,
        polls,
        task,
    }
}

impl Polls {
    /// Stops polling; never were both members writable.
    async fn check(self) {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap();
        let both = self.both.lock().unwrap().clone();
        eprintln!(
            "{} polls of both members' writability, {} with both writable",
            self.polls.load(Ordering::SeqCst),
            both.len()
        );
        assert!(both.is_empty(), "both members writable at {both:?}");
    }
}

/// Starts the three sites with the database; waits until it is healthy with the edge primary;
/// creates table `t`; the superuser's password.
async fn start() -> (Sites, String) {
    start_with("").await
}

/// [`start`] with `extra` TOML after the database (an app: the instances then use the
/// database too).
async fn start_with(extra: &str) -> (Sites, String) {
    let opts = Options {
        extra: database() + extra,
        state_per_node: true,
        sample_app_database: !extra.is_empty(),
        ..Options::default()
    };
    start_lab(opts, |_| {}).await
}

/// The lab of `opts` (`prepare` runs on it before the nodes start), the database healthy with
/// the edge primary and table `t`; the superuser's password.
async fn start_lab(opts: Options, prepare: impl FnOnce(&testkit::netns::Lab)) -> (Sites, String) {
    let s = Sites::start_with(opts, |lab| {
        for site in ["edge", "region"] {
            lab.add_ip(site, 40);
            lab.add_ip(site, 50);
        }
        prepare(lab);
        Vec::new()
    })
    .await;
    wait_healthy(&s, "edge", "region", Duration::from_secs(120)).await;
    let file = s.state("edge").join("databases/orders/password");
    let password = std::fs::read_to_string(file).unwrap().trim().to_string();
    through(
        &s,
        "edge",
        &password,
        "CREATE TABLE IF NOT EXISTS t (id bigint PRIMARY KEY)",
    )
    .await;
    (s, password)
}

/// The edge site lost (its link cut, its node killed): the region's node takes the lapsed lease
/// and promotes its synchronous standby, the region's frontend follows, no acknowledged write
/// is lost. Back, the edge's old primary is rewound over the network into a standby; a
/// switchover asked of the edge's node is passed on to the region's, which hands the lease
/// back to the edge's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_across_nodes_fails_over_with_its_site_and_switches_back() {
    let (mut s, password) = start().await;
    let polls = poll_writability(&s, &password);

    // One set of passwords, made once, in 0600 files on both nodes, in no log.
    let file = |site: &str| s.state(site).join("databases/orders/password");
    assert_eq!(
        password,
        std::fs::read_to_string(file("region")).unwrap().trim()
    );
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(file("region"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    assert!(
        !s.log("edge").contains(&password) && !s.log("region").contains(&password),
        "a password in a node's log"
    );

    // The region's frontend reaches the edge's primary.
    assert_eq!(
        served_by(&s, "region", &password).await,
        s.ip("edge", 50).to_string()
    );

    let (w, task) = writer(&s, "region", &password);
    w.wait_more(20, "20 writes acknowledged").await;

    // The whole edge site goes: its link, then its node (the postmaster stays, cut off).
    let lost = Instant::now();
    s.lab.cut("edge");
    s.node("edge").kill9();
    let (gone, promoted) = fenced_then_promoted(&s, &password, lost).await;
    eprintln!(
        "edge site lost -> edge primary fenced by its watchdog {gone:?}, region promoted {promoted:?}"
    );
    let watchdog_log = s.state("edge").join("databases/orders/edge.watchdog.log");
    let text = std::fs::read_to_string(&watchdog_log).unwrap_or_default();
    assert!(
        text.contains("Fenced"),
        "the watchdog says it fenced: {text}"
    );
    w.wait_more(10, "writes after the loss").await;
    let rto = w.first_after(lost).unwrap();
    eprintln!(
        "edge site lost -> first write acknowledged through the region's frontend: {rto:?} (longest gap {:?})",
        w.longest_gap()
    );
    let region = view(&s, "region").await.unwrap();
    assert_eq!(region["last_change"]["kind"], "failover", "{region}");
    let kept = check_no_loss(&s, "region", &password, w, task).await;
    assert_eq!(
        served_by(&s, "region", &password).await,
        s.ip("region", 50).to_string()
    );

    // The edge comes back: its old primary is rewound into a standby of the region's.
    s.lab.heal("edge");
    s.start_node("edge");
    wait_healthy(&s, "region", "edge", Duration::from_secs(90)).await;
    let edge = view(&s, "edge").await.unwrap();
    assert_eq!(member(&edge, "edge")["role"], "standby", "{edge}");
    let events = s.events("edge").await;
    assert!(
        events
            .iter()
            .any(|e| e["subject"] == "orders/edge" && e["kind"] == "rejoined"),
        "the edge's member rejoined through pg_rewind: {events:?}"
    );

    // A planned switchover asked of the edge's node, whose member is the standby: passed on to
    // the primary's node, which hands the lease to the edge's, which promotes its member.
    let (status, body) = s
        .post(
            "edge",
            "/v1/databases/orders/switchover",
            r#"{"to": "edge"}"#,
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("switched over from region to edge")),
        "{body}"
    );
    wait_healthy(&s, "edge", "region", Duration::from_secs(60)).await;
    assert_eq!(
        served_by(&s, "edge", &password).await,
        s.ip("edge", 50).to_string()
    );
    let rows: i64 = through(&s, "edge", &password, "SELECT count(*) FROM t").await[0].get(0);
    assert_eq!(rows, kept.len() as i64, "every row after the switchover");
    through(&s, "edge", &password, "INSERT INTO t (id) VALUES (100000)").await;
    polls.check().await;
}

/// After the edge's node stopped renewing at `since`: polled from inside the edge, its
/// primary must stop taking connections (its watchdog) before the region's member is
/// promoted. Both delays.
async fn fenced_then_promoted(s: &Sites, password: &str, since: Instant) -> (Duration, Duration) {
    let edge_member = SocketAddr::new(s.ip("edge", 50), 5432);
    let (mut gone, mut promoted) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(30);
    while promoted.is_none() {
        assert!(
            Instant::now() < deadline,
            "the region's node did not promote region"
        );
        if gone.is_none() && s.sql_from("edge", edge_member, password).await.is_err() {
            gone = Some(since.elapsed());
        }
        if view(s, "region")
            .await
            .is_some_and(|v| v["primary"] == "region")
        {
            promoted = Some(since.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let gone =
        gone.expect("the edge's primary still took connections when the region was promoted");
    (gone, promoted.unwrap())
}

/// A planned restart of the primary's node (`SIGUSR2`, then up again) leaves its postmaster
/// running and costs the other site's clients no write; a frozen primary's node (`SIGSTOP`)
/// cannot renew, and its watchdog fences the primary before the region's is promoted; resumed,
/// the node finds the lease gone and its member rejoins as a standby.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_keeps_its_primary_and_a_frozen_one_is_fenced() {
    let (mut s, password) = start().await;
    let polls = poll_writability(&s, &password);
    let before = view(&s, "edge").await.unwrap();
    let pid = member(&before, "edge")["pid"].clone();
    assert!(pid.is_u64(), "{before}");
    let (w, task) = writer(&s, "region", &password);
    w.wait_more(10, "writes before the restart").await;
    let errors = w.errors.load(Ordering::SeqCst);

    let restart = Instant::now();
    s.node("edge").signal(nix::sys::signal::Signal::SIGUSR2);
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.node("edge").is_running() {
        assert!(
            Instant::now() < deadline,
            "the edge's node did not exit on SIGUSR2"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let exited = restart.elapsed();
    s.start_node("edge");
    eventually(
        Duration::from_secs(30),
        "the restarted node leads with the same postmaster",
        || async {
            let v = view(&s, "edge").await?;
            (v["primary"] == "edge"
                && member(&v, "edge")["pid"] == pid
                && v["term"] == before["term"])
                .then_some(())
        },
    )
    .await;
    eprintln!(
        "planned restart of the primary's node: exited after {exited:?}, leading again after {:?}",
        restart.elapsed()
    );
    w.wait_more(20, "writes after the restart").await;
    assert_eq!(
        w.errors.load(Ordering::SeqCst),
        errors,
        "client errors through the region's frontend while the primary's node restarted"
    );
    let region = view(&s, "region").await.unwrap();
    assert!(region["last_change"].is_null(), "no failover: {region}");

    let frozen = Instant::now();
    s.node("edge").stop();
    let (gone, promoted) = fenced_then_promoted(&s, &password, frozen).await;
    eprintln!(
        "primary's node frozen -> its watchdog fenced it {gone:?}, region promoted {promoted:?}"
    );
    w.wait_more(10, "writes after the freeze").await;
    eprintln!(
        "primary's node frozen -> longest time without an acknowledged write through the region's frontend: {:?}",
        w.longest_gap()
    );
    s.node("edge").cont();
    wait_healthy(&s, "region", "edge", Duration::from_secs(90)).await;
    check_no_loss(&s, "region", &password, w, task).await;
    polls.check().await;
}

/// The standby's site lost (its node and postmaster killed): the primary stops waiting for it
/// after `failover_timeout` and writes go on; its node back, the member streams again. Then the
/// primary's site cut off with its node alive: the node cannot renew the lease (no etcd
/// quorum there) and fences its own primary before the lease can lapse and the region's is
/// promoted; healed, the node follows the region and its member rejoins as a standby.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_standby_costs_no_write_and_a_cut_off_primary_fences_itself() {
    let (mut s, password) = start().await;
    let polls = poll_writability(&s, &password);
    let (w, task) = writer(&s, "edge", &password);
    w.wait_more(10, "writes before the standby's loss").await;
    // Its pid as its own node knows it.
    let region = view(&s, "region").await.unwrap();
    let standby_pid = member(&region, "region")["pid"].clone();
    let lost = Instant::now();
    s.node("region").kill9();
    let pid = i32::try_from(standby_pid.as_u64().unwrap()).unwrap();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    w.wait_more(20, "writes after the standby's loss").await;
    eprintln!(
        "standby's site lost -> longest time without an acknowledged write through the edge's frontend: {:?}",
        w.longest_gap()
    );
    assert!(w.first_after(lost).is_some());
    s.start_node("region");
    wait_healthy(&s, "edge", "region", Duration::from_secs(90)).await;
    check_no_loss(&s, "edge", &password, w, task).await;

    let (w, task) = writer(&s, "region", &password);
    w.wait_more(10, "writes before the cut").await;
    let cut = Instant::now();
    s.lab.cut("edge");
    let (gone, promoted) = fenced_then_promoted(&s, &password, cut).await;
    eprintln!(
        "primary's site cut off -> its primary fenced {gone:?}, region promoted {promoted:?}"
    );
    w.wait_more(10, "writes after the cut").await;
    s.lab.heal("edge");
    wait_healthy(&s, "region", "edge", Duration::from_secs(90)).await;
    // Whichever looked first: the node at its next tick, or its watchdog (same deadline).
    let events = s.events("edge").await;
    let by_node = events.iter().any(|e| {
        e["subject"] == "orders/edge"
            && e["kind"] == "fenced"
            && e["message"]
                .as_str()
                .is_some_and(|m| m.contains("could not be renewed"))
    });
    let watchdog_log = s.state("edge").join("databases/orders/edge.watchdog.log");
    let by_watchdog = std::fs::read_to_string(&watchdog_log).is_ok_and(|t| t.contains("Fenced"));
    eprintln!("fenced by the node: {by_node}, by its watchdog: {by_watchdog}");
    assert!(
        by_node || by_watchdog,
        "the edge's primary was fenced: {events:?}"
    );
    check_no_loss(&s, "region", &password, w, task).await;
    polls.check().await;
}

/// The primary's postmaster killed on its node: restarted in place under the same lease and
/// term, no failover. Then frozen (`SIGSTOP`, a hung server): its node fences it before the
/// lease can lapse and the region's node promotes its standby; the edge's member rejoins.
/// Then the region's node killed alone: its watchdog fences the primary, the edge's is
/// promoted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_primary_is_restarted_on_its_node_and_a_hung_one_failed_over() {
    let (mut s, password) = start().await;
    let polls = poll_writability(&s, &password);
    let (w, task) = writer(&s, "region", &password);
    w.wait_more(10, "writes before the crash").await;
    let before = view(&s, "edge").await.unwrap();
    let pid = member(&before, "edge")["pid"].as_u64().unwrap();
    let signal = |sig| {
        let _ =
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()), sig);
    };
    let crashed = Instant::now();
    signal(nix::sys::signal::Signal::SIGKILL);
    eventually(
        Duration::from_secs(20),
        "edge restarted in place",
        || async {
            let v = view(&s, "edge").await?;
            let now = member(&v, "edge")["pid"].as_u64()?;
            (v["primary"] == "edge" && now != pid && v["term"] == before["term"]).then_some(())
        },
    )
    .await;
    w.wait_more(10, "writes after the restart").await;
    eprintln!(
        "primary's postmaster killed -> restarted in place on its node; longest time without an acknowledged write {:?} ({:?} in all)",
        w.longest_gap(),
        crashed.elapsed()
    );
    let region = view(&s, "region").await.unwrap();
    assert!(region["last_change"].is_null(), "no failover: {region}");

    let v = view(&s, "edge").await.unwrap();
    let pid = member(&v, "edge")["pid"].as_u64().unwrap();
    let hung = Instant::now();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        nix::sys::signal::Signal::SIGSTOP,
    );
    eventually(Duration::from_secs(30), "region promoted", || async {
        let v = view(&s, "region").await?;
        (v["primary"] == "region").then_some(())
    })
    .await;
    eprintln!(
        "primary's postmaster hung -> region promoted after {:?}",
        hung.elapsed()
    );
    w.wait_more(10, "writes after the failover").await;
    wait_healthy(&s, "region", "edge", Duration::from_secs(90)).await;
    let region = view(&s, "region").await.unwrap();
    assert_eq!(region["last_change"]["kind"], "failover", "{region}");
    check_no_loss(&s, "region", &password, w, task).await;

    // The primary's node killed alone, its postmaster left running: its watchdog fences the
    // primary before the lease lapses and the edge's is promoted.
    let (w, task) = writer(&s, "edge", &password);
    w.wait_more(10, "writes before the node's kill").await;
    let killed = Instant::now();
    s.node("region").kill9();
    eventually(Duration::from_secs(30), "edge promoted", || async {
        let v = view(&s, "edge").await?;
        (v["primary"] == "edge").then_some(())
    })
    .await;
    eprintln!(
        "primary's node killed -> edge promoted after {:?}",
        killed.elapsed()
    );
    w.wait_more(10, "writes after the node's kill").await;
    let log = s
        .state("region")
        .join("databases/orders/region.watchdog.log");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("Fenced"),
        "the region's watchdog fenced its primary: {text}"
    );
    s.start_node("region");
    wait_healthy(&s, "edge", "region", Duration::from_secs(90)).await;
    check_no_loss(&s, "edge", &password, w, task).await;
    polls.check().await;
}

/// An outage drill of the edge, asked of the witness's node, stops the edge's member on the
/// edge's node as if its machine were gone: the region's node promotes its member once the
/// lease lapses, no acknowledged write is lost, never are both writable; when the drill is
/// stopped the edge's member rejoins as the synchronous standby.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_drill_fails_the_sites_member_over_and_it_rejoins_after() {
    let (s, password) = start().await;
    let polls = poll_writability(&s, &password);
    let (w, task) = writer(&s, "region", &password);
    w.wait_more(20, "20 writes acknowledged").await;
    s.outage_drill("witness", "edge", "5m").await;
    eventually(Duration::from_secs(30), "the region promoted", || async {
        let v = view(&s, "region").await?;
        (v["primary"] == "region" && v["last_change"]["kind"] == "failover").then_some(())
    })
    .await;
    let edge = view(&s, "edge").await.unwrap();
    assert_eq!(member(&edge, "edge")["state"], "fenced", "{edge}");
    assert_eq!(
        member(&edge, "edge")["error"],
        "outage drill of site edge",
        "{edge}"
    );
    w.wait_more(10, "writes after the failover").await;
    check_no_loss(&s, "region", &password, w, task).await;
    let (status, body) = s.post("witness", "/v1/drills/stop", "").await.unwrap();
    assert_eq!(status, 200, "{body}");
    wait_healthy(&s, "region", "edge", Duration::from_secs(90)).await;
    polls.check().await;
}

/// Backups in cluster mode: one repository every member's node reaches (here a directory of
/// the lab's, as a mount would be), pgBackRest's locks in it. The primary's node creates the
/// stanza and takes the scheduled first full backup; a backup, a listing and a restore drill
/// asked of the standby's node are passed on to the primary's node; both nodes asked for a
/// backup at once give two backups, one after the other; after a switchover the new
/// primary's node archives and backs up, and a drill there restores every row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_run_on_the_primarys_node_into_one_repository() {
    let opts = Options {
        extra: database()
            + r#"
  [database.backup]
  repository = "LAB_DIR/repo"
  full = "weekly"
  archive_timeout = "5s"
  drill_table = "public.t"
"#,
        state_per_node: true,
        ..Options::default()
    };
    let (s, password) = start_lab(opts, |lab| {
        let repo = lab.dir().join("repo");
        std::fs::create_dir_all(&repo).unwrap();
        if let Some((uid, gid)) = pg::local::run_as().unwrap() {
            std::os::unix::fs::chown(&repo, Some(uid), Some(gid)).unwrap();
        }
    })
    .await;
    let backups = |site: &'static str| {
        let s = &s;
        async move {
            let v: Value = s.get(site, "/v1/databases/orders/backups").await?;
            v["backups"].as_array().cloned()
        }
    };
    // The primary's node creates the stanza and takes the first full backup; the standby's
    // node lists it (passed on to the primary's node).
    let first = eventually(
        Duration::from_secs(120),
        "the first full backup",
        || async { backups("region").await.filter(|b| !b.is_empty()) },
    )
    .await;
    assert_eq!(first[0]["type"], "full", "{first:?}");
    assert!(
        s.lab.dir().join("repo/lock").is_dir(),
        "pgBackRest's locks live in the shared repository"
    );
    through(
        &s,
        "edge",
        &password,
        "INSERT INTO t SELECT generate_series(1, 100)",
    )
    .await;

    // Asked of both nodes at once: passed on to the primary's node, one after the other.
    let long = Duration::from_secs(180);
    let body = r#"{"type": "incr"}"#;
    let path = "/v1/databases/orders/backups";
    let (a, b) = tokio::join!(
        s.post_within("edge", path, body, long),
        s.post_within("region", path, body, long)
    );
    for (site, r) in [("edge", a), ("region", b)] {
        let (status, body) = r.unwrap_or_else(|| panic!("{site}'s node gave no answer"));
        assert_eq!(status, 200, "{site}: {body}");
        assert_eq!(body["created"]["type"], "incr", "{site}: {body}");
    }
    let listed = backups("edge").await.unwrap();
    assert_eq!(listed.len(), 3, "{listed:?}");

    // A restore drill asked of the standby's node: every row.
    let drill = |site: &'static str, rows: i64| {
        let s = &s;
        async move {
            let path = "/v1/databases/orders/restore-drill";
            let (status, r) = s.post_within(site, path, "", long).await.unwrap();
            assert_eq!(status, 200, "{r}");
            assert_eq!(
                (r["ok"].as_bool(), r["rows"].as_i64()),
                (Some(true), Some(rows)),
                "{r}"
            );
        }
    };
    drill("region", 100).await;

    // After a switchover the region's node archives and backs up.
    let (status, body) = s
        .post_within(
            "edge",
            "/v1/databases/orders/switchover",
            r#"{"to": "region"}"#,
            long,
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    wait_healthy(&s, "region", "edge", Duration::from_secs(60)).await;
    through(
        &s,
        "region",
        &password,
        "INSERT INTO t SELECT generate_series(101, 150)",
    )
    .await;
    let (status, body) = s
        .post_within("edge", path, r#"{"type": "full"}"#, long)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    drill("edge", 150).await;
    // `tandem restore` stays a single-process operation: refused, nothing touched.
    let (status, body) = s
        .post_within(
            "region",
            "/v1/databases/orders/restore",
            r#"{"site": "region"}"#,
            long,
        )
        .await
        .unwrap();
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("single-process mode only")),
        "{body}"
    );
}

/// The app of the cluster tests: the web tier and the database, a warm standby.
const APP: &str = r#"
[[app]]
name = "shop"
sites = ["edge", "region"]
profile = "www"
database = "orders"
scale_sets = ["edge-web", "region-web"]
standby = "warm"
"#;

/// `shop` as `site`'s node shows it.
async fn app(s: &Sites, site: &str) -> Option<Value> {
    s.get(site, "/v1/apps/shop").await
}

/// An app across the cluster, driven by the leader through the store: the edge site lost (its
/// link cut, its node killed), the database fails over by itself and the app follows its data
/// — the region's set scaled to the capacity the edge had (warm), the app's record at the
/// region on every node, DNS answering the region — with no acknowledged write lost. The edge
/// back, the app fails back once its member has caught up (a switchover carried out by the
/// primary's node), the region back at its min. Operator failovers asked of any node reach the
/// leader. The edge's postmaster hung alone: the whole app follows its data, then comes home.
/// Pinned away with the edge's member held back: failback refused, then waited for, saying so.
/// `tandem drill app` asked of a node runs on the leader, with every acknowledged write found.
/// Pinned away, a manual failback brings the app home.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_follows_its_data_across_the_cluster_and_fails_back() {
    let (mut s, password) = start_with(APP).await;
    // The edge at 3 instances: what the warm region must be scaled to.
    let (status, body) = s
        .post(
            "witness",
            "/v1/scale-sets/edge-web/scale",
            r#"{"capacity": 3}"#,
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    for site in ["edge", "region", "witness"] {
        let what = format!("{site}'s node to see the app at the edge, 3 instances there");
        eventually(Duration::from_secs(60), &what, || async {
            let a = app(&s, site).await?;
            let edge = a["sites"]
                .as_array()?
                .iter()
                .find(|x| x["site"] == "edge")?;
            (a["active"] == "edge"
                && edge["capacity"] == 3
                && edge["online"] == 3
                && edge["primary"] == true)
                .then_some(())
        })
        .await;
    }
    // Without a synchronous standby a failover is refused (it would lose acknowledged writes).
    settled(
        &s,
        Some("edge"),
        Duration::from_secs(60),
        "the region caught up",
    )
    .await;
    let (w, task) = writer(&s, "region", &password);
    w.wait_more(20, "20 writes acknowledged").await;

    s.lab.cut("edge");
    s.node("edge").kill9();
    for site in ["region", "witness"] {
        let what = format!("{site}'s node to see the app moved to the region");
        let a = eventually(Duration::from_secs(60), &what, || async {
            let a = app(&s, site).await?;
            (a["active"] == "region" && a["term"].as_u64()? >= 1).then_some(a)
        })
        .await;
        eprintln!("{site}: {a}");
    }
    eventually(Duration::from_secs(30), "the region's set at 3", || async {
        let v: Value = s.get("region", "/v1/scale-sets?scope=local").await?;
        (v["scale_sets"][0]["desired"] == 3).then_some(())
    })
    .await;
    let region_lb = s.lb("region");
    for site in ["region", "witness"] {
        assert_eq!(
            s.dig(site, DOMAIN).await.unwrap(),
            [region_lb.as_str()],
            "{site}"
        );
    }
    let region = view(&s, "region").await.unwrap();
    assert_eq!(region["primary"], "region", "{region}");
    w.wait_more(10, "writes after the loss").await;

    // The edge back: once its member has rejoined and caught up and the edge has been healthy
    // for the hold, the app fails back by a switchover the primary's node carries out, the
    // edge scaled first, DNS back, the region back to its min.
    s.lab.heal("edge");
    s.start_node("edge");
    for site in ["edge", "region", "witness"] {
        let what = format!("{site}'s node to see the app back at the edge");
        eventually(Duration::from_secs(120), &what, || async {
            let a = app(&s, site).await?;
            (a["active"] == "edge" && a["term"] == 2 && a["moving"].is_null()).then_some(())
        })
        .await;
    }
    let leader_view = driver_view(&s).await;
    assert_eq!(
        leader_view["last_move"]["reason"], "failback",
        "{leader_view}"
    );
    assert_eq!(leader_view["last_move"]["outcome"], "done", "{leader_view}");
    wait_healthy(&s, "edge", "region", Duration::from_secs(30)).await;
    let edge_lb = s.lb("edge");
    for site in ["edge", "region", "witness"] {
        s.wait_answer(site, &edge_lb, Duration::from_secs(10)).await;
    }
    eventually(
        Duration::from_secs(30),
        "the region back at its min",
        || async {
            let v: Value = s.get("region", "/v1/scale-sets?scope=local").await?;
            (v["scale_sets"][0]["desired"] == 1).then_some(())
        },
    )
    .await;
    w.wait_more(10, "writes after the failback").await;
    check_no_loss(&s, "edge", &password, w, task).await;

    // An operator's failover asked of every node in turn reaches the leader (passed on by the
    // others); the automatic failback brings the app home again after the hold.
    let mut term = 2;
    for site in ["witness", "region", "edge"] {
        settled(&s, None, Duration::from_secs(60), "the region caught up").await;
        let (status, body) = s
            .post(site, "/v1/apps/shop/failover", r#"{"to": "region"}"#)
            .await
            .unwrap();
        assert_eq!(status, 202, "{site}: {body}");
        for (active, t) in [("region", term + 1), ("edge", term + 2)] {
            let what = format!("the app at {active} (term {t}) after a failover asked of {site}");
            eventually(Duration::from_secs(60), &what, || async {
                let a = app(&s, "witness").await?;
                (a["active"] == active && a["term"] == t).then_some(())
            })
            .await;
        }
        term += 2;
    }

    // The database alone fails (the edge's postmaster hangs; the edge's web tier stays
    // healthy): the database fails over by itself and the whole app follows its data, then
    // comes home once the edge's member has rejoined and caught up.
    settled(&s, None, Duration::from_secs(60), "the region caught up").await;
    let v = view(&s, "edge").await.unwrap();
    let pid = member(&v, "edge")["pid"].as_u64().unwrap();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        nix::sys::signal::Signal::SIGSTOP,
    );
    let moved = eventually(
        Duration::from_secs(60),
        "the app moved with its data",
        || async {
            let a = driver_view_now(&s).await?;
            (a["active"] == "region" && a["term"] == term + 1 && a["moving"].is_null()).then_some(a)
        },
    )
    .await;
    // Whatever fencing left of the frozen member runs on (and is stopped or rewound).
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        nix::sys::signal::Signal::SIGCONT,
    );
    let reason = &moved["last_move"]["reason"];
    assert!(
        moved["last_move"]["to"] == "region" && reason == "data-moved",
        "{moved}"
    );
    eventually(Duration::from_secs(120), "the app home again", || async {
        let a = app(&s, "witness").await?;
        (a["active"] == "edge" && a["term"] == term + 2).then_some(())
    })
    .await;
    let term = term + 2;

    // Failback gated on the data: pinned at the region (asked of the edge's node), the edge's
    // member held back (cut off from the primary's address); failback is refused on command, and once
    // unpinned the app waits for the member, saying so, then comes home.
    settled(&s, None, Duration::from_secs(60), "the region caught up").await;
    let (status, body) = s
        .post("edge", "/v1/apps/shop/pin", r#"{"site": "region"}"#)
        .await
        .unwrap();
    assert_eq!(status, 202, "{body}");
    eventually(Duration::from_secs(60), "pinned at the region", || async {
        let a = driver_view_now(&s).await?;
        (a["active"] == "region" && a["pinned"] == true && a["moving"].is_null()).then_some(())
    })
    .await;
    eventually(
        Duration::from_secs(30),
        "the edge's member streaming",
        || async {
            let v = view(&s, "edge").await?;
            (member(&v, "edge")["state"] == "streaming").then_some(())
        },
    )
    .await;
    // Held back by the network rather than by freezing the member: the edge's node rewinds a
    // standby that has not streamed for 15 s, which would end a freeze before the test looks.
    let region_member = s.ip("region", 50);
    s.lab.cut_route("edge", region_member);
    eventually(
        Duration::from_secs(20),
        "the edge's member behind",
        || async {
            let a = driver_view_now(&s).await?;
            let edge = a["sites"]
                .as_array()?
                .iter()
                .find(|x| x["site"] == "edge")?;
            (edge["caught_up"] == false).then_some(())
        },
    )
    .await;
    let (status, body) = s
        .post("witness", "/v1/apps/shop/failback", "")
        .await
        .unwrap();
    assert!(
        status == 409 && body.to_string().contains("has not caught up"),
        "{status} {body}"
    );
    let (status, body) = s.post("region", "/v1/apps/shop/unpin", "").await.unwrap();
    assert_eq!(status, 202, "{body}");
    testkit::eventually_shows(
        Duration::from_secs(10),
        "the app to wait for the edge's data",
        || driver_view_now(&s),
        |a| {
            let waits = a["waiting_for"]
                .as_str()
                .is_some_and(|w| w.contains("database member to catch up"));
            a["active"] == "region" && a["pinned"] == false && waits
        },
    )
    .await;
    s.lab.heal_route("edge", region_member);
    eventually(Duration::from_secs(120), "home once caught up", || async {
        let a = app(&s, "witness").await?;
        (a["active"] == "edge" && a["term"].as_u64()? > term + 1).then_some(())
    })
    .await;

    // (5) `tandem drill app` asked of the region's node runs on the leader: a failover and a
    // failback with clients on the public entry (DNS, load balancer, instance, the site's
    // database frontend); every acknowledged write is on the primary.
    settled(
        &s,
        Some("edge"),
        Duration::from_secs(60),
        "home, the region caught up",
    )
    .await;
    let (status, body) = s.post("region", "/v1/apps/shop/drill", "").await.unwrap();
    assert_eq!(status, 202, "{body}");
    let r = eventually(Duration::from_secs(120), "the drill's report", || async {
        let a = driver_view_now(&s).await?;
        (a["drilling"] == false && !a["last_drill"].is_null()).then(|| a["last_drill"].clone())
    })
    .await;
    let c: Value = s.get("witness", "/v1/cluster").await.unwrap();
    eprintln!("drill run by {}: {r}", c["leader"]["holder"]);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(
        (r["from"].as_str(), r["to"].as_str()),
        (Some("edge"), Some("region"))
    );
    assert_eq!(r["writes_lost"], 0, "{r}");
    assert!(r["writes_acknowledged"].as_u64().unwrap() >= 10, "{r}");

    // A manual failback: pinned at the region, the app stays there past the hold; `failback`
    // (asked of the edge's node) brings it home, still pinned, until `unpin`.
    settled(
        &s,
        Some("edge"),
        Duration::from_secs(60),
        "at rest after the drill",
    )
    .await;
    let (status, body) = s
        .post("witness", "/v1/apps/shop/pin", r#"{"site": "region"}"#)
        .await
        .unwrap();
    assert_eq!(status, 202, "{body}");
    eventually(
        Duration::from_secs(60),
        "pinned at the region, edge caught up",
        || async {
            let a = driver_view_now(&s).await?;
            let edge = site_of(&a, "edge")?;
            (a["active"] == "region"
                && a["pinned"] == true
                && a["moving"].is_null()
                && edge["caught_up"] == true)
                .then_some(())
        },
    )
    .await;
    let (status, body) = s.post("edge", "/v1/apps/shop/failback", "").await.unwrap();
    assert_eq!(status, 202, "{body}");
    eventually(
        Duration::from_secs(60),
        "home by command, still pinned",
        || async {
            let a = driver_view_now(&s).await?;
            (a["active"] == "edge" && a["pinned"] == true && a["moving"].is_null()).then_some(())
        },
    )
    .await;
    let (status, body) = s.post("region", "/v1/apps/shop/unpin", "").await.unwrap();
    assert_eq!(status, 202, "{body}");
    // The witness follows the app's record through its watch, a moment after the driver.
    testkit::eventually_shows(
        Duration::from_secs(10),
        "the witness's node to see the app at the edge",
        || app(&s, "witness"),
        |a| a["active"] == "edge",
    )
    .await;
}

/// The app as the node that drives it now shows it.
async fn driver_view_now(s: &Sites) -> Option<Value> {
    let c: Value = s.get("witness", "/v1/cluster").await?;
    let holder = c["leader"]["holder"].as_str()?.to_string();
    let site = ["edge", "region", "witness"]
        .into_iter()
        .find(|site| holder.starts_with(site))?;
    app(s, site).await
}

/// The app as the node that drove its last move shows it (the others follow its record and
/// know no moves).
async fn driver_view(s: &Sites) -> Value {
    for site in ["edge", "region", "witness"] {
        if let Some(a) = app(s, site).await
            && !a["last_move"].is_null()
            && a["last_move"]["to"] == "edge"
        {
            return a;
        }
    }
    panic!("no node shows the failback");
}

/// Whole-app RTO in cluster mode, median and max over `TANDEM_RTO_RUNS` rounds (default 5):
/// the edge site lost (link cut, node killed) to the app active at the region and to the
/// first write acknowledged through the region's database frontend; and an operator's
/// failover to the region (a planned switchover) as the leader timed the move, with the
/// writer's longest gap. Probes every 250 ms (the harness's).
/// `cargo nextest run -p tandem --test cluster --run-ignored only --no-capture measure_cluster_app`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement"]
async fn measure_cluster_app_rto() {
    let runs: usize = std::env::var("TANDEM_RTO_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let (mut s, password) = start_with(APP).await;
    let (mut moved, mut written, mut planned, mut gaps) = (vec![], vec![], vec![], vec![]);
    for round in 0..runs {
        settled(
            &s,
            Some("edge"),
            Duration::from_secs(120),
            "at rest at the edge",
        )
        .await;
        let term = app(&s, "witness").await.unwrap()["term"].as_u64().unwrap();
        let (w, task) = writer(&s, "region", &password);
        w.wait_more(20, "writes before the loss").await;
        let lost_at = Instant::now();
        s.lab.cut("edge");
        s.node("edge").kill9();
        eventually(Duration::from_secs(60), "the app at the region", || async {
            let a = app(&s, "witness").await?;
            (a["active"] == "region" && a["term"] == term + 1).then_some(())
        })
        .await;
        let m = lost_at.elapsed().as_secs_f64();
        w.wait_more(10, "writes after the loss").await;
        let first = w.first_after(lost_at).unwrap().as_secs_f64();
        check_no_loss(&s, "region", &password, w, task).await;
        println!(
            "round {round}: edge lost -> app at the region {m:.2} s, first write {first:.2} s"
        );
        moved.push(m);
        written.push(first);
        s.lab.heal("edge");
        s.start_node("edge");
        settled(&s, Some("edge"), Duration::from_secs(120), "home again").await;
        // Planned: an operator's failover to the region, with a writer through the region.
        let term = app(&s, "witness").await.unwrap()["term"].as_u64().unwrap();
        let (w, task) = writer(&s, "region", &password);
        w.wait_more(20, "writes before the switchover").await;
        let (status, body) = s
            .post("witness", "/v1/apps/shop/failover", r#"{"to": "region"}"#)
            .await
            .unwrap();
        assert_eq!(status, 202, "{body}");
        let a = eventually(Duration::from_secs(60), "the planned move done", || async {
            let a = driver_view_now(&s).await?;
            (a["term"] == term + 1 && a["moving"].is_null() && a["last_move"]["to"] == "region")
                .then_some(a)
        })
        .await;
        let p = a["last_move"]["seconds"].as_f64().unwrap();
        w.wait_more(10, "writes after the switchover").await;
        let gap = w.longest_gap().as_secs_f64();
        check_no_loss(&s, "region", &password, w, task).await;
        println!("round {round}: planned failover {p:.2} s, writer's longest gap {gap:.2} s");
        planned.push(p);
        gaps.push(gap);
    }
    let (m, x) = testkit::median_max(moved);
    println!("edge site lost -> app at the region: median {m:.2} s, max {x:.2} s over {runs}");
    let (m, x) = testkit::median_max(written);
    println!(
        "edge site lost -> first write through the region's frontend: median {m:.2} s, max {x:.2} s"
    );
    let (m, x) = testkit::median_max(planned);
    println!("planned failover (the leader's move): median {m:.2} s, max {x:.2} s");
    let (m, x) = testkit::median_max(gaps);
    println!(
        "planned failover, writer's longest gap: median {m:.2} s, max {x:.2} s; 0 acknowledged writes lost"
    );
}

/// `site`'s entry in an app's view.
fn site_of<'a>(a: &'a Value, site: &str) -> Option<&'a Value> {
    a["sites"].as_array()?.iter().find(|x| x["site"] == site)
}

/// Waits until the app, as its driver shows it, is at rest (at `active` when given) with the
/// region's member caught up.
async fn settled(s: &Sites, active: Option<&str>, deadline: Duration, what: &str) {
    eventually(deadline, what, || async {
        let a = driver_view_now(s).await?;
        let region = site_of(&a, "region")?;
        (a["moving"].is_null()
            && region["caught_up"] == true
            && active.is_none_or(|x| a["active"] == x))
        .then_some(())
    })
    .await;
}
