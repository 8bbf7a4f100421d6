//! Cluster mode end to end: three sites in network namespaces, each with a real etcd member
//! and a real `tandem up --node` (see `harness`), clients in a namespace of their own.

#![cfg(feature = "cluster")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

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
}
