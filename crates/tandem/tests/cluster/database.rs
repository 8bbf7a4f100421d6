//! A database across machines: the edge's member on the edge node, the region's on the
//! region node, the lease in etcd, every site's frontend on the primary wherever it runs.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use testkit::eventually;
use tokio::time::Instant;

use crate::harness::{Options, Sites};

/// Frontends on .40, members on .50 (health on :8008) of each site.
fn database() -> String {
    let ip = |n: u8, host: u8| format!("198.18.{n}.{host}");
    format!(
        r#"
[[database]]
name = "orders"
replication = "sync"
failover_timeout = "2s"
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

/// Which member's address served `c`.
async fn served_by(c: &tokio_postgres::Client) -> String {
    let row = c
        .query_one("SELECT host(inet_server_addr())", &[])
        .await
        .unwrap();
    row.get(0)
}

/// Ids acknowledged by the writer, with when.
type Acks = Arc<Mutex<Vec<(i64, Instant)>>>;

/// Inserts an id every 50 ms through `site`'s frontend, reconnecting after any error, until
/// `stop`; every acknowledged id goes into `acks`.
fn writer(
    s: Arc<Sites>,
    site: &'static str,
    password: String,
    acks: Acks,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let addr = frontend(&s, site);
        let mut client: Option<tokio_postgres::Client> = None;
        let mut errors = 0;
        for id in 1..=2_000_i64 {
            if s.lab.dir().join("stop-writer").exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                client = s.sql(addr, &password).await.ok();
            }
            let Some(c) = &client else {
                errors += 1;
                continue;
            };
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
            let insert = c.execute("INSERT INTO t (id) VALUES ($1)", &params);
            match tokio::time::timeout(Duration::from_secs(2), insert).await {
                Ok(Ok(_)) => acks.lock().unwrap().push((id, Instant::now())),
                _ => {
                    errors += 1;
                    client = None;
                }
            }
        }
        errors
    })
}

/// The edge site lost (its link cut, its node killed): the region's node takes the lapsed lease
/// and promotes its synchronous standby, the region's frontend follows, no acknowledged write
/// is lost. Back, the edge's old primary is fenced and rewound over the network into a standby;
/// a switchover asked of the region's node hands the lease back to the edge's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_across_nodes_fails_over_with_its_site_and_switches_back() {
    let opts = Options {
        extra: database(),
        state_per_node: true,
        ..Options::default()
    };
    let s = Sites::start_with(opts, |lab| {
        for site in ["edge", "region"] {
            lab.add_ip(site, 40);
            lab.add_ip(site, 50);
        }
        Vec::new()
    })
    .await;
    wait_healthy(&s, "edge", "region", Duration::from_secs(120)).await;

    // One set of passwords, made once, in 0600 files on both nodes.
    let file = |site: &str| s.state(site).join("databases/orders/password");
    let password = std::fs::read_to_string(file("edge")).unwrap();
    assert_eq!(password, std::fs::read_to_string(file("region")).unwrap());
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(file("region"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let password = password.trim().to_string();
    assert!(
        !s.log("edge").contains(&password) && !s.log("region").contains(&password),
        "a password in a node's log"
    );

    // The region's frontend reaches the edge's primary.
    let c = s.sql(frontend(&s, "region"), &password).await.unwrap();
    c.batch_execute("CREATE TABLE t (id bigint PRIMARY KEY)")
        .await
        .unwrap();
    assert_eq!(served_by(&c).await, s.ip("edge", 50).to_string());
    drop(c);

    // Asked of a node whose member is not the primary: refused with where to ask.
    let (status, body) = s
        .post(
            "region",
            "/v1/databases/orders/switchover",
            r#"{"to": "region"}"#,
        )
        .await
        .unwrap();
    assert_eq!(status, 409, "{body}");
    assert!(body.to_string().contains("edge"), "{body}");

    let password2 = password.clone();
    let s = Arc::new(s);
    let acks: Acks = Arc::default();
    let w = writer(s.clone(), "region", password2, acks.clone());
    eventually(
        Duration::from_secs(20),
        "20 writes acknowledged",
        || async { (acks.lock().unwrap().len() >= 20).then_some(()) },
    )
    .await;

    // The whole edge site goes: its link, then its node (the postmaster stays, cut off).
    let lost = Instant::now();
    s.lab.cut("edge");
    signal_node(&s, "edge", nix::sys::signal::Signal::SIGKILL);
    // Polled from inside the edge (cut off from the rest): its primary must be gone, fenced
    // by its watchdog, before the region's member is promoted.
    let edge_member = SocketAddr::new(s.ip("edge", 50), 5432);
    let (mut edge_gone, mut promoted) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(30);
    while promoted.is_none() {
        assert!(
            Instant::now() < deadline,
            "the region's node did not promote region"
        );
        if edge_gone.is_none() && s.sql_from("edge", edge_member, &password).await.is_err() {
            edge_gone = Some(lost.elapsed());
        }
        if view(&s, "region")
            .await
            .is_some_and(|v| v["primary"] == "region")
        {
            promoted = Some(lost.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "edge site lost -> edge primary fenced by its watchdog {edge_gone:?}, region promoted {promoted:?}"
    );
    assert!(
        edge_gone.is_some_and(|g| Some(g) <= promoted),
        "the edge's primary still took connections when the region was promoted"
    );
    let watchdog_log = s.state("edge").join("databases/orders/edge.watchdog.log");
    let text = std::fs::read_to_string(&watchdog_log).unwrap_or_default();
    assert!(
        text.contains("Fenced"),
        "the watchdog says it fenced: {text}"
    );
    eventually(
        Duration::from_secs(20),
        "a write acknowledged after the loss",
        || async {
            acks.lock()
                .unwrap()
                .iter()
                .any(|(_, at)| *at > lost)
                .then_some(())
        },
    )
    .await;
    let rto = acks
        .lock()
        .unwrap()
        .iter()
        .find(|(_, at)| *at > lost)
        .map(|(_, at)| *at - lost)
        .unwrap();
    eprintln!("edge site lost -> first write acknowledged through the region's frontend: {rto:?}");
    let region = view(&s, "region").await.unwrap();
    assert_eq!(region["last_change"]["kind"], "failover", "{region}");
    let before = acks.lock().unwrap().len();
    eventually(Duration::from_secs(10), "writes go on", || async {
        (acks.lock().unwrap().len() >= before + 10).then_some(())
    })
    .await;

    std::fs::write(s.lab.dir().join("stop-writer"), "").unwrap();
    let errors = w.await.unwrap();
    let c = s.sql(frontend(&s, "region"), &password).await.unwrap();
    assert_eq!(served_by(&c).await, s.ip("region", 50).to_string());
    let kept: std::collections::HashSet<i64> = c
        .query("SELECT id FROM t", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let acked: Vec<i64> = acks.lock().unwrap().iter().map(|(id, _)| *id).collect();
    let lost_ids: Vec<&i64> = acked.iter().filter(|id| !kept.contains(id)).collect();
    eprintln!(
        "{} writes acknowledged, {errors} client errors, {} lost",
        acked.len(),
        lost_ids.len()
    );
    assert!(
        lost_ids.is_empty(),
        "acknowledged writes lost: {lost_ids:?}"
    );

    // The edge comes back: its old primary must never take a write again.
    s.lab.heal("edge");
    let mut s = Arc::try_unwrap(s).ok().expect("the writer is done");
    s.start_node("edge");
    wait_healthy(&s, "region", "edge", Duration::from_secs(90)).await;
    let edge = view(&s, "edge").await.unwrap();
    assert_eq!(member(&edge, "edge")["role"], "standby", "{edge}");
    let events = s.events("edge").await;
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "rejoined" || e["kind"] == "recloned"),
        "the edge's member rejoined: {events:?}"
    );

    // A planned switchover asked of the primary's node: the edge's node promotes its member.
    let (status, body) = s
        .post(
            "region",
            "/v1/databases/orders/switchover",
            r#"{"to": "edge"}"#,
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    wait_healthy(&s, "edge", "region", Duration::from_secs(60)).await;
    let c = s.sql(frontend(&s, "edge"), &password).await.unwrap();
    assert_eq!(served_by(&c).await, s.ip("edge", 50).to_string());
    let rows: i64 = c
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, kept.len() as i64, "every row after the switchover");
    c.execute("INSERT INTO t (id) VALUES (100000)", &[])
        .await
        .unwrap();
}

/// Signals `site`'s node process.
fn signal_node(s: &Sites, site: &str, signal: nix::sys::signal::Signal) {
    let pid = s.nodes[site].pid();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        signal,
    );
}
