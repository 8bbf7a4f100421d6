//! Cluster mode end to end: three sites in network namespaces, each with a real etcd member
//! and a real `tandem up --node` (see `harness`), clients in a namespace of their own.

#![cfg(feature = "cluster")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod database;
mod harness;

use std::time::Duration;

use harness::{DOMAIN, Options, Sites};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_cluster_answers_the_edge_from_every_dns_node() {
    let s = Sites::start(Options::default()).await;
    let edge = s.lb("edge");
    for site in ["edge", "region"] {
        s.wait_answer(site, &edge, Duration::from_secs(20)).await;
    }
    let nodes: Value = s.get("witness", "/v1/nodes").await.unwrap();
    let alive: Vec<&str> = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["alive"] == true)
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    assert_eq!(alive, ["edge-1", "region-1", "witness-1"], "{nodes:#}");
    assert_eq!(s.dig("region", DOMAIN).await.unwrap(), [edge]);
    // `tandem status` from any node shows the three.
    let status = s.status_text("client", "region").await;
    for name in ["edge-1", "region-1", "witness-1"] {
        assert!(
            status
                .lines()
                .any(|l| l.starts_with(name) && l.contains("alive")),
            "{name} alive in:\n{status}"
        );
    }
    // The zone lists one name server per DNS node, each with its address as glue.
    let ns = s
        .dig_text(
            "witness",
            &["shop.test", "NS", "+noall", "+answer", "+additional"],
        )
        .await;
    for (n, site) in [(1, "edge"), (2, "region"), (3, "witness")] {
        let name = format!("ns{n}.shop.test.");
        assert!(
            ns.lines()
                .any(|l| l.contains("\tNS\t") && l.ends_with(&name)),
            "NS {name} in:\n{ns}"
        );
        assert!(
            ns.lines().any(|l| l.starts_with(&name)
                && l.contains("\tA\t")
                && l.ends_with(&s.ip(site, 10).to_string())),
            "glue for {name} in:\n{ns}"
        );
    }
    // The witness runs no app tier: no load balancer, no scale set of its own.
    let lbs: Value = s
        .get("witness", "/v1/load-balancers?scope=local")
        .await
        .unwrap();
    assert_eq!(
        lbs["load_balancers"].as_array().unwrap().len(),
        0,
        "{lbs:#}"
    );
    let sets: Value = s
        .get("witness", "/v1/scale-sets?scope=local")
        .await
        .unwrap();
    assert_eq!(sets["scale_sets"].as_array().unwrap().len(), 0, "{sets:#}");

    // Every cluster and store metric the README names is exported, with a sample.
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let named: std::collections::BTreeSet<&str> = readme
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("tandem_cluster_") || w.starts_with("tandem_store_"))
        .collect();
    assert!(named.len() >= 5, "{named:?}");
    let metrics = s.metrics("region").await.unwrap();
    for name in named {
        assert!(
            metrics.contains(&format!("# TYPE {name} ")) && metrics.contains(&format!("\n{name}")),
            "{name} is in the README but not exported:\n{metrics}"
        );
    }
}

/// The DNS answer events a node shows, oldest first: (time, message).
async fn answers(s: &Sites, site: &str) -> Vec<(std::time::SystemTime, String)> {
    s.events(site)
        .await
        .into_iter()
        .filter(|e| e["source"] == "dns" && e["node"] == harness::node_name(site).as_str())
        .map(|e| {
            let at = humantime::parse_rfc3339(e["at"].as_str().unwrap()).unwrap();
            (at, e["message"].as_str().unwrap().to_string())
        })
        .collect()
}

/// `kill -9` of the edge node: its load balancer and instances die with it; the surviving DNS
/// nodes answer the region at once (the two other vantage points agree); the edge node's
/// record expires after `lease_ttl`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_edge_node_moves_every_surviving_dns_node_to_the_region() {
    let mut s = Sites::start(Options::default()).await;
    let (edge, region) = (s.lb("edge"), s.lb("region"));
    for site in ["edge", "region", "witness"] {
        s.wait_answer(site, &edge, Duration::from_secs(20)).await;
    }
    let killed = tokio::time::Instant::now();
    s.node("edge").kill9();
    for site in ["region", "witness"] {
        s.wait_answer(site, &region, Duration::from_secs(10)).await;
    }
    let moved = killed.elapsed();
    eprintln!("edge node killed -> region and witness answer the region: {moved:?}");
    assert!(
        s.unreachable(std::net::SocketAddr::new(s.ip("edge", 20), 8080))
            .await,
        "the edge load balancer died with its node"
    );
    assert_eq!(s.through_lb("region").await.as_deref(), Some("site=region"));
    testkit::eventually(Duration::from_secs(15), "edge-1 gone", || async {
        let v: Value = s.get("witness", "/v1/nodes").await?;
        let edge = v["nodes"]
            .as_array()?
            .iter()
            .find(|n| n["name"] == "edge-1")?
            .clone();
        (edge["alive"] == false).then_some(())
    })
    .await;
    let gone = killed.elapsed();
    eprintln!("edge node killed -> its record expired: {gone:?}");
    // The session's 3 s run from its last keep-alive, sent every second.
    assert!(
        gone >= Duration::from_millis(1900),
        "the record lives until its session's ttl (3 s after the last keep-alive): gone after {gone:?}"
    );
    // The region's node sees the record go through its own watch, a moment after the
    // witness's may have.
    testkit::eventually(
        Duration::from_secs(5),
        "a node-gone event on the region's node",
        || async {
            s.events("region")
                .await
                .iter()
                .any(|e| e["source"] == "node" && e["subject"] == "edge-1" && e["kind"] == "gone")
                .then_some(())
        },
    )
    .await;
    let status = s.status_text("client", "witness").await;
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("edge-1") && l.contains("gone")),
        "edge-1 gone in `tandem status` from the witness:\n{status}"
    );
}

/// The edge's link cut: region and witness keep etcd's quorum and answer the region; the edge
/// node says it is isolated and keeps answering from its last view and its own probes. After
/// the link heals, the cluster fails back once, after the hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_edge_is_isolated_and_fails_back_once_after_the_hold() {
    let s = Sites::start(Options::default()).await;
    let (edge, region) = (s.lb("edge"), s.lb("region"));
    for site in ["edge", "region", "witness"] {
        s.wait_answer(site, &edge, Duration::from_secs(20)).await;
    }
    s.lab.cut("edge");
    for site in ["region", "witness"] {
        s.wait_answer(site, &region, Duration::from_secs(10)).await;
    }
    testkit::eventually(Duration::from_secs(15), "edge-1 isolated", || async {
        let v: Value = s.get_from("edge", "edge", "/v1/cluster").await?;
        (v["isolation"]["isolated"] == true).then_some(())
    })
    .await;
    let metrics = s.metrics("edge").await.unwrap();
    assert!(metrics.contains("tandem_cluster_isolated 1"));
    let events: Value = s.get_from("edge", "edge", "/v1/events").await.unwrap();
    assert!(
        events["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["source"] == "node" && e["subject"] == "edge-1" && e["kind"] == "isolated"),
        "an isolated event: {events:#}"
    );
    let status = s.status_text("edge", "edge").await;
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("edge-1") && l.contains("ISOLATED")),
        "isolation in `tandem status`:\n{status}"
    );
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("region-1") && l.contains("(last seen)")),
        "the others as last seen, in `tandem status`:\n{status}"
    );
    // Cut off, the edge still answers its own site from its own probes.
    let from_edge = {
        let mut cmd = s.lab.command("edge", "dig");
        cmd.arg(format!("@{}", s.ip("edge", 10)))
            .args([DOMAIN, "+short", "+norec", "+time=1", "+tries=1"]);
        String::from_utf8(cmd.output().unwrap().stdout).unwrap()
    };
    assert_eq!(from_edge.trim(), edge);
    let before = answers(&s, "region").await.len();
    let healed = std::time::SystemTime::now();
    s.lab.heal("edge");
    s.wait_answer("region", &edge, Duration::from_secs(20))
        .await;
    s.wait_answer("witness", &edge, Duration::from_secs(5))
        .await;
    let region_answers = answers(&s, "region").await;
    let back: Vec<_> = region_answers[before..]
        .iter()
        .filter(|(_, m)| m.starts_with("region -> edge"))
        .collect();
    assert_eq!(back.len(), 1, "one failback: {region_answers:?}");
    // The hold, by the servers' clocks: from the first vote seeing the edge Online again.
    let events = s.events("region").await;
    let healed_votes: Vec<std::time::SystemTime> = events
        .iter()
        .filter(|e| {
            e["source"] == "health" && e["subject"] == "profile/www/edge" && e["kind"] == "Online"
        })
        .map(|e| humantime::parse_rfc3339(e["at"].as_str().unwrap()).unwrap())
        .filter(|t| *t > healed && *t < back[0].0)
        .collect();
    let first = healed_votes.iter().min().unwrap();
    let held = back[0].0.duration_since(*first).unwrap_or_default();
    let story: Vec<String> = events
        .iter()
        .filter(|e| {
            e["source"] != "scale-set"
                && e["source"] != "lb"
                && e["subject"] != "profile/www/region"
        })
        .map(|e| {
            format!(
                "{} {} {} {} {} {}",
                e["at"], e["node"], e["source"], e["subject"], e["kind"], e["message"]
            )
        })
        .collect();
    assert!(
        held >= Duration::from_millis(2900),
        "failback {held:?} after the edge was Online again, before the 3 s hold:\n{}",
        story.join("\n")
    );
    testkit::eventually(Duration::from_secs(15), "edge-1 rejoined", || async {
        let v: Value = s.get("edge", "/v1/cluster").await?;
        (v["isolation"]["isolated"] == false).then_some(())
    })
    .await;
}

/// A leader that serves no DNS (the witness, as in `scripts/three-sites`) decides failback for
/// the DNS nodes. The region's node leads while a drill takes the edge down and publishes
/// "region"; the two DNS nodes frozen past their leases, the witness takes the lead. Once the
/// edge is back, the DNS nodes must fail back after the hold — not follow the old leader's
/// "region" for good. (A drill, not a cut: a cut can disturb etcd and the nodes' views, and
/// move the lead before the test means it to.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_without_dns_listeners_decides_failback_for_the_dns_nodes() {
    let mut s = Sites::start(Options {
        witness_dns: false,
        first: Some("region"),
        ..Options::default()
    })
    .await;
    let (edge, region) = (s.lb("edge"), s.lb("region"));
    for site in ["edge", "region"] {
        s.wait_answer(site, &edge, Duration::from_secs(20)).await;
    }
    s.outage_drill("region", "edge", "5m").await;
    s.wait_answer("region", &region, Duration::from_secs(20))
        .await;
    wait_decision(&s, "region", "region-1", Duration::from_secs(10)).await;
    for site in ["region", "edge"] {
        s.node(site).stop();
    }
    testkit::eventually_shows(
        Duration::from_secs(20),
        "the witness to lead",
        || s.get::<Value>("witness", "/v1/cluster"),
        |v: &Value| v["leader"]["holder"] == "witness-1",
    )
    .await;
    for site in ["region", "edge"] {
        s.node(site).cont();
    }
    let (status, body) = s.post("witness", "/v1/drills/stop", "").await.unwrap();
    assert_eq!(status, 200, "{body}");
    // The witness decides the failback, under its own term, and the DNS nodes follow it.
    wait_decision(&s, "edge", "witness-1", Duration::from_secs(30)).await;
    for site in ["region", "edge"] {
        s.wait_answer(site, &edge, Duration::from_secs(10)).await;
    }
    // And `tandem status` on the witness shows the answer it decides.
    let status = s.status_text("client", "witness").await;
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("www ") && l.contains(&edge)),
        "{status}"
    );
}

/// Waits until the store holds `leader`'s failback decision for profile `www`: `endpoint`.
async fn wait_decision(s: &Sites, endpoint: &str, leader: &str, deadline: Duration) {
    let key = "/tandem/shop/decisions/dns/www";
    let endpoint = format!(r#""endpoint":"{endpoint}""#);
    testkit::eventually_shows(
        deadline,
        &format!("{leader}'s decision {endpoint}"),
        || async {
            s.etcd
                .etcdctl("region", &["get", key, "--print-value-only"])
                .await
                .ok()
        },
        |v: &String| v.contains(&endpoint) && v.contains(&format!(r#""leader":"{leader}""#)),
    )
    .await;
}

/// One vantage point (the witness) cut off from the edge's load balancer only: it votes
/// Degraded, the two others Online, so nothing moves — over 20 cuts — and the votes say why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_vantage_point_cut_off_from_the_edge_moves_nothing() {
    let s = Sites::start(Options::default()).await;
    let edge = s.lb("edge");
    for site in ["edge", "region", "witness"] {
        s.wait_answer(site, &edge, Duration::from_secs(20)).await;
    }
    let lb_ip = s.ip("edge", 20);
    let vote = |target: Value, node: &str| {
        target["votes"]
            .as_array()
            .and_then(|v| v.iter().find(|v| v["node"] == node).cloned())
            .map(|v| v["status"].as_str().unwrap_or("-").to_string())
    };
    let reason = |target: &Value, node: &str| {
        target["votes"]
            .as_array()
            .and_then(|v| v.iter().find(|v| v["node"] == node))
            .and_then(|v| v["reason"].as_str())
            .unwrap_or("-")
            .to_string()
    };
    testkit::eventually(
        Duration::from_secs(10),
        "every node votes Online",
        || async {
            let h: Value = s.get("region", "/v1/health").await?;
            let t = h["targets"]
                .as_array()?
                .iter()
                .find(|t| t["target"] == "profile/www/edge")?
                .clone();
            let all = ["edge-1", "region-1", "witness-1"]
                .iter()
                .all(|n| vote(t.clone(), n).as_deref() == Some("Online"));
            all.then_some(())
        },
    )
    .await;
    // Counted once every vote is in: the answers of the start (instances not serving yet) are
    // not this test's.
    let before: usize = {
        let mut n = 0;
        for site in ["edge", "region", "witness"] {
            n += answers(&s, site).await.len();
        }
        n
    };
    for round in 0..20 {
        s.lab.cut_route("witness", lb_ip);
        let what = format!("round {round}: the witness votes Degraded");
        let target = testkit::eventually(Duration::from_secs(10), &what, || async {
            let h: Value = s.get("region", "/v1/health").await?;
            let t = h["targets"]
                .as_array()?
                .iter()
                .find(|t| t["target"] == "profile/www/edge")?
                .clone();
            (vote(t.clone(), "witness-1").as_deref() == Some("Degraded")).then_some(t)
        })
        .await;
        assert_eq!(target["consensus"], "Online", "{target:#}");
        assert_eq!(vote(target.clone(), "edge-1").as_deref(), Some("Online"));
        assert_eq!(vote(target.clone(), "region-1").as_deref(), Some("Online"));
        let why = reason(&target, "witness-1");
        assert!(
            why.contains("unreachable") || why.contains("No route"),
            "{why}"
        );
        assert_eq!(s.dig("region", DOMAIN).await.unwrap(), [edge.as_str()]);
        assert_eq!(s.dig("witness", DOMAIN).await.unwrap(), [edge.as_str()]);
        s.lab.heal_route("witness", lb_ip);
        let what = format!("round {round}: the witness votes Online again");
        let target = testkit::eventually(Duration::from_secs(10), &what, || async {
            let h: Value = s.get("region", "/v1/health").await?;
            let t = h["targets"]
                .as_array()?
                .iter()
                .find(|t| t["target"] == "profile/www/edge")?
                .clone();
            (vote(t.clone(), "witness-1").as_deref() == Some("Online")).then_some(t)
        })
        .await;
        // Online because its probes pass, not by the failure it had.
        assert_eq!(reason(&target, "witness-1"), "probes pass", "{target:#}");
    }
    let mut after = Vec::new();
    for site in ["edge", "region", "witness"] {
        after.extend(answers(&s, site).await.into_iter().map(|a| (site, a)));
    }
    assert_eq!(
        after.len(),
        before,
        "no answer changed on any node in 20 cuts: {after:#?}"
    );
}

/// etcd: the witness's member killed changes nothing; every member gone, every node keeps
/// answering DNS and carrying flows from its last view, says it is isolated, and no node
/// acts as leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_etcd_members_stops_no_service() {
    let mut s = Sites::start(Options::default()).await;
    let edge = s.lb("edge");
    for site in ["edge", "region", "witness"] {
        s.wait_answer(site, &edge, Duration::from_secs(20)).await;
    }
    s.etcd.kill("witness");
    // Still a quorum: a write through any node works and is seen everywhere.
    let (status, body) = s
        .post(
            "witness",
            "/v1/scale-sets/edge-web/scale",
            r#"{"capacity": 3}"#,
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body:#}");
    testkit::eventually(Duration::from_secs(15), "edge-web at 3", || async {
        let v: Value = s.get("edge", "/v1/scale-sets?scope=local").await?;
        (v["scale_sets"][0]["desired"] == 3).then_some(())
    })
    .await;
    for site in ["edge", "region", "witness"] {
        let c: Value = s.get(site, "/v1/cluster").await.unwrap();
        assert_eq!(c["isolation"]["isolated"], false, "{site}: {c:#}");
    }
    s.etcd.kill("edge");
    s.etcd.kill("region");
    for site in ["edge", "region", "witness"] {
        let what = format!("{site} isolated");
        testkit::eventually(Duration::from_secs(20), &what, || async {
            let c: Value = s.get(site, "/v1/cluster").await?;
            (c["isolation"]["isolated"] == true && c["leader"]["me"] == false).then_some(())
        })
        .await;
        assert_eq!(
            s.dig(site, DOMAIN).await.unwrap(),
            [edge.as_str()],
            "{site}"
        );
    }
    assert_eq!(s.through_lb("edge").await.as_deref(), Some("site=edge"));
    assert_eq!(s.through_lb("region").await.as_deref(), Some("site=region"));
    // Cut off from everybody, a node goes by its own probes: the edge failing moves them all.
    s.node("edge").kill9();
    for site in ["region", "witness"] {
        s.wait_answer(site, &s.lb("region"), Duration::from_secs(10))
            .await;
    }
    // etcd back: they rejoin.
    for site in ["region", "witness"] {
        s.etcd.start(site);
    }
    for site in ["region", "witness"] {
        let what = format!("{site} rejoined");
        testkit::eventually(Duration::from_secs(30), &what, || async {
            let c: Value = s.get(site, "/v1/cluster").await?;
            (c["isolation"]["isolated"] == false).then_some(())
        })
        .await;
    }
}

/// Operator intent through any node's API takes effect on the node that runs what it names:
/// an endpoint disabled (every DNS node), a scale set's capacity (its site's node), an outage
/// drill (its site's node stops its load balancer and instances; everybody else sees it
/// through the probes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_intent_through_one_node_applies_where_it_belongs() {
    let s = Sites::start(Options::default()).await;
    let (edge, region) = (s.lb("edge"), s.lb("region"));
    for site in ["edge", "region", "witness"] {
        s.wait_answer(site, &edge, Duration::from_secs(20)).await;
    }
    // Disable the edge endpoint through the witness: every DNS node answers the region.
    let (status, body) = s
        .post("witness", "/v1/profiles/www/endpoints/edge/disable", "")
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    for site in ["edge", "region", "witness"] {
        s.wait_answer(site, &region, Duration::from_secs(5)).await;
    }
    let (status, _) = s
        .post("region", "/v1/profiles/www/endpoints/edge/enable", "")
        .await
        .unwrap();
    assert_eq!(status, 200);
    for site in ["edge", "region", "witness"] {
        s.wait_answer(site, &edge, Duration::from_secs(15)).await;
    }
    // Scale the edge's set through the region's API.
    let (status, body) = s
        .post(
            "region",
            "/v1/scale-sets/edge-web/scale",
            r#"{"capacity": 3}"#,
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["applies_on"], "edge-1", "{body:#}");
    testkit::eventually(Duration::from_secs(20), "three edge instances", || async {
        let v: Value = s.get("edge", "/v1/scale-sets?scope=local").await?;
        let running = v["scale_sets"][0]["instances"]
            .as_array()?
            .iter()
            .filter(|i| i["state"] == "running" && i["health"] == "Online")
            .count();
        (running == 3).then_some(())
    })
    .await;
    // The whole cluster's view from the witness, which runs no set.
    let all: Value = s.get("witness", "/v1/scale-sets").await.unwrap();
    let names: Vec<&str> = all["scale_sets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["node"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "{all:#}");
    // Drain one of the edge's backends through the witness, as the edge's node lists them;
    // an address it does not list is refused with the list.
    let backend_draining = |address: String| {
        let s = &s;
        async move {
            let v: Value = s.get("witness", "/v1/load-balancers").await?;
            let b = v["load_balancers"]
                .as_array()?
                .iter()
                .find(|b| b["name"] == "edge-web")?["backends"]
                .as_array()?
                .iter()
                .find(|b| b["address"] == address.as_str())?
                .clone();
            b["draining"].as_bool()
        }
    };
    let v: Value = s.get("witness", "/v1/load-balancers").await.unwrap();
    let backend = v["load_balancers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "edge-web")
        .unwrap()["backends"][0]["address"]
        .as_str()
        .unwrap()
        .to_string();
    let bogus = format!("{}:29999", s.ip("edge", 30));
    let (status, body) = s
        .post(
            "witness",
            &format!("/v1/load-balancers/edge-web/backends/{bogus}/drain"),
            "",
        )
        .await
        .unwrap();
    assert_eq!(
        (status, &body["field"]),
        (404, &Value::from("address")),
        "{body:#}"
    );
    assert!(
        body["error"].as_str().unwrap().contains(&backend),
        "{body:#}"
    );
    for (action, draining) in [("drain", true), ("enable", false)] {
        let path = format!("/v1/load-balancers/edge-web/backends/{backend}/{action}");
        let (status, body) = s.post("witness", &path, "").await.unwrap();
        assert_eq!(status, 200, "{body:#}");
        assert_eq!(body["applies_on"], "edge-1", "{body:#}");
        let what = format!("{backend} draining: {draining}");
        testkit::eventually(Duration::from_secs(10), &what, || async {
            (backend_draining(backend.clone()).await? == draining).then_some(())
        })
        .await;
    }
    // An outage drill of the edge through the witness.
    let body = s.outage_drill("witness", "edge", "60s").await;
    assert_eq!(body["applies_on"], "edge-1", "{body:#}");
    let lb = std::net::SocketAddr::new(s.ip("edge", 20), 8080);
    testkit::eventually(
        Duration::from_secs(10),
        "the edge lb stops answering",
        || async { s.unreachable(lb).await.then_some(()) },
    )
    .await;
    for site in ["region", "witness"] {
        s.wait_answer(site, &region, Duration::from_secs(10)).await;
    }
    testkit::eventually(
        Duration::from_secs(20),
        "the edge's instances stopped by the drill",
        || async {
            let v: Value = s
                .get_from("edge", "edge", "/v1/scale-sets?scope=local")
                .await?;
            let running = v["scale_sets"][0]["instances"]
                .as_array()?
                .iter()
                .filter(|i| i["state"] == "running")
                .count();
            (running == 0).then_some(())
        },
    )
    .await;
    let (status, _) = s
        .post("region", "/v1/drills/outage", r#"{"site": "region"}"#)
        .await
        .unwrap();
    assert_eq!(status, 409, "one drill at a time");
    let (status, _) = s.post("region", "/v1/drills/stop", "").await.unwrap();
    assert_eq!(status, 200);
    testkit::eventually(Duration::from_secs(10), "the edge lb back", || async {
        (!s.unreachable(lb).await).then_some(())
    })
    .await;
    for kind in ["outage-start", "outage-end"] {
        let what = format!("{kind} recorded by edge-1 and seen from the witness");
        testkit::eventually(Duration::from_secs(10), &what, || async {
            s.events("witness")
                .await
                .iter()
                .any(|e| e["source"] == "drill" && e["kind"] == kind && e["node"] == "edge-1")
                .then_some(())
        })
        .await;
    }
}

/// Bad input and faults: a second process with the same `--node` is refused with the reason;
/// a node running another topology file says so and takes no decision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_nodes_and_different_files_are_refused_with_the_reason() {
    let mut s = Sites::start(Options::default()).await;
    // The same --node again, on the edge's machine.
    let out = s
        .lab
        .command("edge", env!("CARGO_BIN_EXE_tandem"))
        .arg("up")
        .arg(&s.topology)
        .args(["--node", "edge-1", "--no-console"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("node edge-1 is already running on") && err.contains("each --node runs once"),
        "{err}"
    );
    // The region restarts with another file.
    s.node("region").signal(testkit::netns::Signal::SIGTERM);
    let end = tokio::time::Instant::now() + Duration::from_secs(15);
    while s.node("region").is_running() {
        assert!(tokio::time::Instant::now() < end, "region-1 did not stop");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let other = s.lab.dir().join("other.toml");
    let text = std::fs::read_to_string(&s.topology).unwrap();
    std::fs::write(&other, text.replace("ttl = \"1s\"", "ttl = \"2s\"")).unwrap();
    let mut cmd = s.lab.command("region", env!("CARGO_BIN_EXE_tandem"));
    cmd.arg("up")
        .arg(&other)
        .args(["--node", "region-1", "--no-console"]);
    let p = s.lab.spawn(cmd, "tandem-region-other");
    s.nodes.insert("region".into(), p);
    testkit::eventually(Duration::from_secs(20), "the mismatch seen", || async {
        let v: Value = s.get("witness", "/v1/nodes").await?;
        let r = v["nodes"]
            .as_array()?
            .iter()
            .find(|n| n["name"] == "region-1")?
            .clone();
        (r["alive"] == true && r["topology_matches"] == false).then_some(())
    })
    .await;
    testkit::eventually(
        Duration::from_secs(10),
        "a topology-mismatch event",
        || async {
            s.events("region")
                .await
                .iter()
                .any(|e| e["kind"] == "topology-mismatch" && e["node"] == "region-1")
                .then_some(())
        },
    )
    .await;
    let m: Value = s.get("region", "/v1/cluster").await.unwrap();
    assert_ne!(m["topology"], m["cluster_topology"]);
    assert_eq!(m["leader"]["me"], false);
}

fn median(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (v[v.len() / 2], *v.last().unwrap())
}

/// Measurement (bench/cluster/run): `kill -9` of the edge node to every surviving DNS node
/// answering the region, with 100 ms probes; TANDEM_RUNS runs (default 5), each on a fresh
/// lab. Timed by the nodes' own answer-change events (the server's clock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: bench/cluster/run"]
async fn edge_node_loss_to_region_answers() {
    let runs: usize = std::env::var("TANDEM_RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(5);
    let mut times = Vec::new();
    for run in 0..runs {
        let opts = Options {
            interval: "100ms",
            timeout: "80ms",
            ..Options::default()
        };
        let mut s = Sites::start(opts).await;
        let (edge, region) = (s.lb("edge"), s.lb("region"));
        for site in ["edge", "region", "witness"] {
            s.wait_answer(site, &edge, Duration::from_secs(20)).await;
        }
        // Steady: every node sees the edge Online.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let killed = std::time::SystemTime::now();
        s.node("edge").kill9();
        let mut slowest = Duration::ZERO;
        for site in ["region", "witness"] {
            s.wait_answer(site, &region, Duration::from_secs(10)).await;
            let moved = answers(&s, site)
                .await
                .into_iter()
                .filter(|(at, m)| *at >= killed && m.starts_with("edge -> region"))
                .map(|(at, _)| at.duration_since(killed).unwrap())
                .next()
                .expect("an answer change");
            slowest = slowest.max(moved);
        }
        eprintln!(
            "run {run}: edge node killed -> region and witness answer the region: {slowest:?}"
        );
        times.push(slowest);
    }
    let (median, max) = median(times);
    eprintln!(
        "edge node loss -> every surviving DNS node answers the region: median {median:?}, max {max:?} over {runs} runs (100 ms probes, tolerated_failures 1)"
    );
}

/// Measurement (bench/cluster/run): writes to etcd per second per node at steady state with
/// `TANDEM_ENDPOINTS` monitored endpoints (default 1,000; profiles of 100, weighted, probed
/// every second by each of the three nodes), from etcd's own count of committed proposals and
/// from each node's count, with each node's CPU over the same window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: bench/cluster/run"]
async fn store_writes_at_steady_state() {
    let endpoints: usize = std::env::var("TANDEM_ENDPOINTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let mut extra = String::from(
        "\n[[monitor]]\nname = \"bulk\"\nprotocol = \"tcp\"\nport = 8081\ninterval = \"1s\"\ntimeout = \"500ms\"\n",
    );
    for p in 0..endpoints.div_ceil(100) {
        extra.push_str(&format!(
            "\n[[profile]]\nname = \"bulk{p}\"\ndomain = \"bulk{p}.shop.test\"\nrouting = \"weighted\"\nmonitor = \"bulk\"\n"
        ));
        for e in 0..100.min(endpoints - p * 100) {
            extra.push_str(&format!(
                "  [[profile.endpoint]]\n  name = \"e{e}\"\n  target = {{ address = \"198.18.1.40\" }}\n"
            ));
        }
    }
    let opts = Options {
        extra,
        interval: "1s",
        timeout: "500ms",
        ..Options::default()
    };
    let mut s = Sites::start_with(opts, |lab| {
        lab.add_ip("edge", 40);
        let mut app = lab.command("edge", env!("CARGO_BIN_EXE_tandem"));
        app.args([
            "sample-app",
            "--listen",
            "198.18.1.40:8081",
            "--site",
            "edge",
        ]);
        vec![lab.spawn(app, "bulk-app")]
    })
    .await;
    let target_count = |h: &Value| h["targets"].as_array().map_or(0, |t| t.len());
    let what = format!("{endpoints} endpoints Online on every node");
    testkit::eventually(
        Duration::from_secs(60 + endpoints as u64 / 100),
        &what,
        || async {
            for site in ["edge", "region", "witness"] {
                let h: Value = s.get(site, "/v1/health").await?;
                let online = h["targets"]
                    .as_array()?
                    .iter()
                    .filter(|t| {
                        t["target"].as_str().unwrap().starts_with("profile/bulk")
                            && t["consensus"] == "Online"
                    })
                    .count();
                if online < endpoints {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    // Settle, then count over a window.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let window = Duration::from_secs(30);
    let pids: Vec<u32> = ["edge", "region", "witness"]
        .iter()
        .map(|site| s.node(site).pid())
        .collect();
    let cpu_before: Vec<f64> = pids.iter().map(|p| cpu_seconds(*p)).collect();
    let before = s.store_counts().await;
    let h: Value = s.get("edge", "/v1/health").await.unwrap();
    eprintln!("probe targets per node: {}", target_count(&h));
    tokio::time::sleep(window).await;
    let after = s.store_counts().await;
    for (i, site) in ["edge", "region", "witness"].iter().enumerate() {
        let cores = (cpu_seconds(pids[i]) - cpu_before[i]) / window.as_secs_f64();
        eprintln!("{site} node: {cores:.3} cores of CPU (user + system, all threads)");
    }
    let secs = window.as_secs_f64();
    for site in ["edge", "region", "witness"] {
        let events = s.events(site).await;
        let mut by: std::collections::BTreeMap<String, usize> = Default::default();
        for e in events
            .iter()
            .filter(|e| e["node"] == harness::node_name(site).as_str())
        {
            *by.entry(format!("{} {}", e["source"], e["kind"]))
                .or_default() += 1;
        }
        eprintln!("{site} events (all, by source and kind): {by:?}");
    }
    let etcd = (after.0 - before.0) as f64 / secs;
    eprintln!(
        "etcd committed proposals: {etcd:.2}/s for the whole cluster (3 nodes): {:.2}/s per node",
        etcd / 3.0
    );
    for (i, site) in ["edge", "region", "witness"].iter().enumerate() {
        let per = (after.1[i] - before.1[i]) as f64 / secs;
        eprintln!("{site} node: {per:.2} store writes/s (tandem_store_writes_total)");
        assert!(per <= 10.0, "{site}: {per} writes/s at steady state");
    }
}

/// User + system CPU seconds of process `pid` so far (all its threads), from
/// `/proc/PID/stat` (fields 14 and 15, in clock ticks of 1/100 s); 0 when gone.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command may hold spaces: count the fields after its closing parenthesis.
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let ticks: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse().ok())
        .collect();
    ticks.iter().sum::<f64>() / 100.0
}
