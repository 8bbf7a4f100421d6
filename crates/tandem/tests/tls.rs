//! TLS end to end with the real binary: two nodes on loopback whose APIs serve TLS only, ask
//! each other over TLS, and reach a real etcd member that demands client certificates
//! (`--client-cert-auth`); the CLI talks to them with `--ca` or `TANDEM_CA`.

#![cfg(feature = "cluster")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::time::Duration;

use common::{run, tandem, wait_exit};
use serde_json::Value;
use testkit::eventually;
use testkit::pki::Pki;

/// A `tandem up --node` killed when dropped (its log printed if the test failed).
struct NodeProc {
    child: Child,
    log: std::path::PathBuf,
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Ok(text) = std::fs::read_to_string(&self.log)
        {
            eprintln!("--- {} ---\n{text}", self.log.display());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn up(dir: &std::path::Path, topology: &std::path::Path, node: &str) -> NodeProc {
    let log = dir.join(format!("{node}.log"));
    let child = tandem()
        .current_dir(dir)
        .args(["up", "--no-console", "--node", node])
        .arg(topology)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    NodeProc { child, log }
}

/// `tandem ARGS --api API` with the CA from `TANDEM_CA`: its stdout when it succeeded.
fn cli(
    dir: &std::path::Path,
    api: SocketAddr,
    ca: Option<&str>,
    args: &[&str],
) -> Result<String, String> {
    let mut cmd = tandem();
    cmd.current_dir(dir)
        .args(args)
        .args(["--api", &api.to_string()]);
    if let Some(ca) = ca {
        cmd.env("TANDEM_CA", ca);
    }
    let out = run(&mut cmd);
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    if out.status.success() {
        Ok(text(&out.stdout))
    } else {
        Err(text(&out.stderr))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_talk_tls_to_each_other_to_etcd_and_to_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pki = Pki::new(&d.join("tls"), "tandem test CA");
    let node = pki.issue("node", &["127.0.0.1", "127.0.0.2"]);
    let etcd_client = pki.issue("etcd-client", &["127.0.0.1"]);
    let etcd = testkit::EtcdMember::start_tls(&pki).await;
    // Each site's machine has its own address: edge 127.0.0.1, region 127.0.0.2.
    let port = || testkit::free_tcp_port(&["127.0.0.1", "127.0.0.2"]);
    let (edge_api, region_api): (SocketAddr, SocketAddr) = (
        format!("127.0.0.1:{}", port()).parse().unwrap(),
        format!("127.0.0.2:{}", port()).parse().unwrap(),
    );
    let (edge_lb, region_lb, backend) = (port(), port(), port());
    let topology = d.join("topology.toml");
    // Paths relative to the working directory, as an operator writes them.
    std::fs::write(
        &topology,
        format!(
            r#"[tandem]
state_dir = "state"
tls_cert = "tls/node.pem"
tls_key = "tls/node-key.pem"
tls_ca = "tls/ca.pem"

[cluster]
name = "tls"
etcd = ["{etcd}"]
etcd_ca = "tls/ca.pem"
etcd_cert = "tls/etcd-client.pem"
etcd_key = "tls/etcd-client-key.pem"

[[site]]
name = "edge"
role = "edge"
[[site]]
name = "region"
role = "region"

[[node]]
name = "edge-1"
site = "edge"
api = "{edge_api}"
[[node]]
name = "region-1"
site = "region"
api = "{region_api}"

[[load_balancer]]
name = "edge-web"
site = "edge"
frontend = "127.0.0.1:{edge_lb}"
pool = {{ addresses = ["127.0.0.1:{backend}"] }}
[[load_balancer]]
name = "region-web"
site = "region"
frontend = "127.0.0.2:{region_lb}"
pool = {{ addresses = ["127.0.0.2:{backend}"] }}
"#,
            etcd = etcd.endpoint,
        ),
    )
    .unwrap();
    assert!(
        node.cert.ends_with("tls/node.pem") && etcd_client.key.ends_with("tls/etcd-client-key.pem")
    );
    let _edge = up(d, &topology, "edge-1");
    let _region = up(d, &topology, "region-1");
    let ca = pki.ca().display().to_string();

    // Both nodes joined through etcd over TLS: each sees the other alive.
    eventually(
        Duration::from_secs(30),
        "both nodes alive, seen over TLS",
        || async {
            let text = cli(d, edge_api, Some(&ca), &["status", "--json"]).ok()?;
            let v: Value = serde_json::from_str(&text).ok()?;
            let nodes = v["nodes"].as_array()?;
            (nodes.len() == 2 && nodes.iter().all(|n| n["alive"] == true)).then_some(())
        },
    )
    .await;

    // The edge node gathers the region's load balancer from the region node's API, over TLS.
    let status = eventually(
        Duration::from_secs(15),
        "both load balancers, over TLS",
        || async {
            let text = cli(d, edge_api, Some(&ca), &["status", "--json"]).ok()?;
            let v: Value = serde_json::from_str(&text).ok()?;
            let mut placed: Vec<(String, String)> = v["load_balancers"]
                .as_array()?
                .iter()
                .map(|l| {
                    (
                        l["node"].as_str().unwrap_or("").into(),
                        l["name"].as_str().unwrap_or("").into(),
                    )
                })
                .collect();
            placed.sort();
            (placed
                == [
                    ("edge-1".into(), "edge-web".into()),
                    ("region-1".into(), "region-web".into()),
                ])
            .then_some(v)
        },
    )
    .await;
    assert_eq!(status["unreachable"], serde_json::json!([]), "{status}");

    // Without the CA the CLI cannot talk to a TLS API, and says what to do.
    let e = cli(d, region_api, None, &["status"]).unwrap_err();
    assert!(!e.is_empty());
    let other = Pki::new(&d.join("other"), "another CA");
    let e = cli(
        d,
        region_api,
        Some(&other.ca().display().to_string()),
        &["status"],
    )
    .unwrap_err();
    assert!(e.contains("--ca") || e.contains("TANDEM_CA"), "{e}");
    let e = cli(d, region_api, Some("tls/missing.pem"), &["status"]).unwrap_err();
    assert!(e.contains("tls/missing.pem"), "{e}");

    // Both stop cleanly.
    for (mut p, name) in [(_edge, "edge-1"), (_region, "region-1")] {
        let _ = std::process::Command::new("kill")
            .arg(p.child.id().to_string())
            .status();
        let status = wait_exit(&mut p.child, Duration::from_secs(30));
        assert!(status.success(), "{name}: {status}");
    }
}
