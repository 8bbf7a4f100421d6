//! The README's quickstart end to end: `tandem up examples/quickstart.toml` as a real
//! process, `dig` and HTTP through the load balancers, an outage drill of the edge.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use testkit::eventually;
use tokio::time::Instant;

mod common;
use common::*;

const DNS: &str = "127.0.0.1:5353";
const API: &str = "127.0.0.1:7400";
const EDGE: &str = "127.0.1.10";
const REGION: &str = "127.0.2.10";

fn answer() -> Option<String> {
    testkit::dig(DNS.parse().unwrap(), "www.shop.test", &[])?
        .into_iter()
        .next()
}

async fn site_of_reply(lb: &str) -> Option<String> {
    let addr: SocketAddr = format!("{lb}:8080").parse().unwrap();
    let s = tokio::net::TcpStream::connect(addr).await.ok()?;
    drop(s);
    let reply = http_get(addr, "/").await;
    body(&reply)
        .split_whitespace()
        .next()?
        .strip_prefix("site=")
        .map(str::to_string)
}

fn pids(sets: &Value) -> Vec<i32> {
    sets["scale_sets"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(instance_pids)
        .collect()
}

/// The walkthrough: the edge answers and serves; an outage drill of the edge moves the answer
/// to the region within the detection time and requests reach region instances; after the
/// drill the answer returns only after the failback hold; stopping tandem leaves no process
/// or port behind. Prints the failover and failback times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_quickstart_fails_over_and_back_in_an_outage_drill() {
    let cwd = tempfile::tempdir().unwrap();
    let example =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/quickstart.toml");
    let console = cwd.path().join("console.txt");
    let child = tandem()
        .arg("up")
        .arg(&example)
        .current_dir(cwd.path())
        .stdout(std::fs::File::create(&console).unwrap())
        .stderr(std::fs::File::create(cwd.path().join("tandem.log")).unwrap())
        .spawn()
        .unwrap();
    let api: SocketAddr = API.parse().unwrap();
    let mut up = Up {
        child,
        api,
        log: Some(cwd.path().join("tandem.log")),
    };

    // The edge answers and serves.
    eventually(Duration::from_secs(20), "both endpoints Online", || async {
        let p = try_get_json(api, "/v1/profiles").await?;
        let all = p["profiles"][0]["endpoints"]
            .as_array()?
            .iter()
            .all(|e| e["status"] == "Online");
        all.then_some(())
    })
    .await;
    assert_eq!(answer().as_deref(), Some(EDGE));
    assert_eq!(site_of_reply(EDGE).await.as_deref(), Some("edge"));
    assert_eq!(site_of_reply(REGION).await.as_deref(), Some("region"));
    let before = get_json(api, "/v1/scale-sets").await;
    let mut all_pids = pids(&before);

    // The drill: the edge goes dark; the answer moves to the region.
    let out = run(tandem().args(["drill", "outage", "edge", "--for", "5s", "--api", API]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let drill_started = Instant::now();
    eventually(
        Duration::from_secs(10),
        "the answer is the region",
        || async { (answer().as_deref() == Some(REGION)).then_some(()) },
    )
    .await;
    let failover = drill_started.elapsed();
    // Detection: 2 failed probes 1 s apart, each given 500 ms; the DNS answer follows at once.
    // The bound allows for where in the interval the outage lands plus scheduling slack.
    assert!(
        failover < Duration::from_millis(4000),
        "failover took {failover:?}"
    );
    assert_eq!(site_of_reply(REGION).await.as_deref(), Some("region"));
    assert!(
        tokio::net::TcpStream::connect((EDGE, 8080)).await.is_err(),
        "the edge load balancer stopped answering"
    );
    let sets = get_json(api, "/v1/scale-sets").await;
    let edge_set = sets["scale_sets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["site"] == "edge")
        .unwrap()
        .clone();
    assert_eq!(edge_set["down"], true);
    all_pids.extend(pids(&sets));

    // After the drill: the edge is Online again, but the answer stays on the region for the hold.
    eventually(Duration::from_secs(20), "edge Online again", || async {
        let p = try_get_json(api, "/v1/profiles").await?;
        let edge = p["profiles"][0]["endpoints"]
            .as_array()?
            .iter()
            .find(|e| e["name"] == "edge")?
            .clone();
        (edge["status"] == "Online").then_some(())
    })
    .await;
    assert_eq!(
        answer().as_deref(),
        Some(REGION),
        "no failback before the hold"
    );
    eventually(
        Duration::from_secs(30),
        "the answer is the edge again",
        || async { (answer().as_deref() == Some(EDGE)).then_some(()) },
    )
    .await;
    let failback = drill_started.elapsed();
    // The hold by the server's own clock: from the edge endpoint's return to Online to the
    // answer's move back (the test's polling would add its own delays to either end).
    let events = get_json(api, "/v1/events").await["events"]
        .as_array()
        .unwrap()
        .clone();
    let at = |e: &Value| humantime::parse_rfc3339(e["at"].as_str().unwrap()).unwrap();
    let back = events
        .iter()
        .rfind(|e| {
            e["source"] == "dns" && e["message"].as_str().unwrap().starts_with("region -> edge")
        })
        .map(at)
        .expect("the failback's answer event");
    let online = events
        .iter()
        .filter(|e| e["subject"] == "profile/www/edge" && e["kind"] == "Online")
        .map(at)
        .filter(|t| *t <= back)
        .max()
        .expect("the edge's Online event");
    let held = back.duration_since(online).unwrap();
    assert!(
        held >= Duration::from_secs(10),
        "failback after {held:?}, hold is 10s"
    );
    eprintln!(
        "quickstart drill: failover {} ms after the outage began; failback {} ms after it began, {} ms after the edge was Online again (hold 10 s)",
        failover.as_millis(),
        failback.as_millis(),
        held.as_millis()
    );
    let restored = eventually(
        Duration::from_secs(20),
        "edge instances serving again",
        || async { (site_of_reply(EDGE).await.as_deref() == Some("edge")).then_some(()) },
    );
    restored.await;
    all_pids.extend(pids(&get_json(api, "/v1/scale-sets").await));

    // The live summary showed it all.
    let text = std::fs::read_to_string(&console).unwrap();
    for needle in [
        "dns    www.shop.test (priority) -> A 127.0.1.10",
        "dns    www.shop.test (priority) -> A 127.0.2.10",
        "outage-start",
        "outage-end",
        "OUTAGE DRILL",
        "scale set edge-web: 2/2 serving",
    ] {
        assert!(text.contains(needle), "console lacks {needle:?}:\n{text}");
    }

    // Stopping tandem leaves nothing behind.
    assert!(up.terminate().success());
    for pid in all_pids {
        assert!(!alive(pid), "pid {pid} left behind");
    }
    for addr in [
        API,
        "127.0.1.10:8080",
        "127.0.2.10:8080",
        "127.0.1.1:20000",
        "127.0.2.1:20000",
    ] {
        std::net::TcpListener::bind(addr).unwrap_or_else(|e| panic!("{addr} still taken: {e}"));
    }
    std::net::UdpSocket::bind(DNS).expect("the DNS port is free");
}
