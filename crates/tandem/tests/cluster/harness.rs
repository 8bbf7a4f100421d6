//! Three sites in network namespaces (edge, region, witness, plus a client): one etcd member
//! and one `tandem up --node` in each, a scale set of `tandem sample-app` behind a public load
//! balancer in edge and region, DNS on every node.
//!
//! Addresses (see `testkit::netns`): site N's node, etcd member and DNS on 198.18.N.10, its
//! load balancer on .20, its instances on .30; the client on 198.18.100.10.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;
use testkit::eventually;
use testkit::netns::{EtcdCluster, Lab, Proc};

pub const SITES: [&str; 3] = ["edge", "region", "witness"];
pub const DOMAIN: &str = "www.shop.test";

/// Knobs of the topology the tests vary.
#[derive(Clone, Debug)]
pub struct Options {
    pub lease_ttl: &'static str,
    pub failback_hold: &'static str,
    pub interval: &'static str,
    pub timeout: &'static str,
    /// Extra TOML appended to the file (`LAB_DIR` in it: the lab's directory).
    pub extra: String,
    /// Each node keeps its state in its own directory (`LAB/SITE/state`), as on separate
    /// machines; else they share `LAB/state`.
    pub state_per_node: bool,
    /// The sample-app instances write and read through their site's database frontend
    /// (`orders` on .40, the password in the node's state directory): for app drills.
    pub sample_app_database: bool,
    /// The witness's node serves DNS too (ns3); without, it only probes, votes and may lead.
    pub witness_dns: bool,
    /// A site whose node starts alone first and is waited for as the leader, the others after.
    pub first: Option<&'static str>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            lease_ttl: "3s",
            failback_hold: "3s",
            // Generous for a busy 2-core machine running several labs at once: a probe
            // starved of CPU must not look like a dead endpoint. (The failover figures in the
            // README come from the benchmark, with 100 ms probes.)
            interval: "250ms",
            timeout: "200ms",
            extra: String::new(),
            state_per_node: false,
            sample_app_database: false,
            witness_dns: true,
            first: None,
        }
    }
}

pub struct Sites {
    pub opts: Options,
    pub lab: Lab,
    pub etcd: EtcdCluster,
    pub nodes: BTreeMap<String, Proc>,
    pub topology: PathBuf,
    /// Processes a test added (kept until the end).
    pub extra: Vec<Proc>,
}

pub fn node_name(site: &str) -> String {
    format!("{site}-1")
}

impl Sites {
    pub fn ip(&self, site: &str, host: u8) -> IpAddr {
        self.lab.ip(site, host)
    }

    pub fn api(&self, site: &str) -> SocketAddr {
        SocketAddr::new(self.ip(site, 10), 7400)
    }

    /// The load balancer's address in `site` (what DNS answers for it).
    pub fn lb(&self, site: &str) -> String {
        self.ip(site, 20).to_string()
    }

    /// Starts the lab, etcd and the three nodes, and waits until every node sees three alive.
    pub async fn start(opts: Options) -> Sites {
        Self::start_with(opts, |_| Vec::new()).await
    }

    /// [`Sites::start`], with `setup` run on the lab before the nodes start (extra addresses,
    /// extra processes it keeps running).
    pub async fn start_with(opts: Options, setup: impl FnOnce(&Lab) -> Vec<Proc>) -> Sites {
        let lab = Lab::with_client(&SITES);
        let extra = setup(&lab);
        for site in ["edge", "region"] {
            lab.add_ip(site, 20);
            lab.add_ip(site, 30);
        }
        let etcd = lab.etcd_cluster(&SITES);
        etcd.wait_healthy().await;
        let topology = lab.dir().join("topology.toml");
        std::fs::write(&topology, topology_text(&lab, &etcd, &opts)).unwrap();
        for site in SITES {
            std::fs::create_dir_all(lab.dir().join(site)).unwrap();
        }
        let mut sites = Sites {
            opts,
            lab,
            etcd,
            nodes: BTreeMap::new(),
            topology,
            extra,
        };
        if let Some(first) = sites.opts.first {
            sites.start_node(first);
            sites.wait_leader(first, &node_name(first)).await;
        }
        for site in SITES {
            if sites.opts.first != Some(site) {
                sites.start_node(site);
            }
        }
        for site in SITES {
            sites.wait_alive(site, 3).await;
        }
        sites
    }

    /// Starts (or starts again) the node of `site`.
    pub fn start_node(&mut self, site: &str) {
        let mut cmd = self.lab.command(site, env!("CARGO_BIN_EXE_tandem"));
        cmd.arg("up")
            .arg(&self.topology)
            .args(["--node", &node_name(site), "--no-console"])
            .env("TANDEM_LOG", "info")
            .current_dir(self.lab.dir().join(site));
        let proc = self.lab.spawn(cmd, &format!("tandem-{site}"));
        self.nodes.insert(site.to_string(), proc);
    }

    /// `site`'s node's state directory.
    pub fn state(&self, site: &str) -> PathBuf {
        if self.opts.state_per_node {
            self.lab.dir().join(site).join("state")
        } else {
            self.lab.dir().join("state")
        }
    }

    /// A PostgreSQL session to `addr` from the client's namespace (the socket is made there,
    /// then driven here), as the superuser with `password`.
    pub async fn sql(
        &self,
        addr: SocketAddr,
        password: &str,
    ) -> Result<tokio_postgres::Client, String> {
        self.sql_from("client", addr, password).await
    }

    /// As [`Sites::sql`], from inside namespace `from`.
    pub async fn sql_from(
        &self,
        from: &str,
        addr: SocketAddr,
        password: &str,
    ) -> Result<tokio_postgres::Client, String> {
        sql(&self.lab, from, addr, password).await
    }

    /// The node's process.
    pub fn node(&mut self, site: &str) -> &mut Proc {
        self.nodes.get_mut(site).unwrap()
    }

    /// Waits until `site`'s node sees `node` hold the leader lease.
    pub async fn wait_leader(&self, site: &str, node: &str) {
        let what = format!("{site} to see {node} lead");
        eventually(Duration::from_secs(30), &what, || async {
            let v: Value = self.get(site, "/v1/cluster").await?;
            (v["leader"]["holder"] == node).then_some(())
        })
        .await;
    }

    /// Waits until `site`'s node lists `n` alive nodes.
    pub async fn wait_alive(&self, site: &str, n: usize) {
        let what = format!("{site} to see {n} nodes alive");
        eventually(Duration::from_secs(30), &what, || async {
            let v: Value = self.get(site, "/v1/nodes").await?;
            let alive = v["nodes"]
                .as_array()?
                .iter()
                .filter(|n| n["alive"] == true)
                .count();
            (alive == n).then_some(())
        })
        .await;
    }

    /// `GET path` from `site`'s node API, as the client sees it; `None` when it does not
    /// answer (within 3 s) or answers an error.
    pub async fn get<T: DeserializeOwned + Send + 'static>(
        &self,
        site: &str,
        path: &str,
    ) -> Option<T> {
        self.get_from("client", site, path).await
    }

    /// `GET path` from `site`'s node API, asked from inside namespace `from` (a site cut off
    /// from the others is reachable only from inside).
    pub async fn get_from<T: DeserializeOwned + Send + 'static>(
        &self,
        from: &str,
        site: &str,
        path: &str,
    ) -> Option<T> {
        let (lab, addr, path, from) = (
            self.lab.clone(),
            self.api(site),
            path.to_string(),
            from.to_string(),
        );
        let body =
            tokio::task::spawn_blocking(move || lab.in_site(&from, || http(addr, "GET", &path)))
                .await
                .ok()??;
        serde_json::from_str(&body).ok()
    }

    /// `GET /metrics` of `site`'s node, asked from inside its own namespace.
    pub async fn metrics(&self, site: &str) -> Option<String> {
        let (lab, addr, site) = (self.lab.clone(), self.api(site), site.to_string());
        tokio::task::spawn_blocking(move || lab.in_site(&site, || http(addr, "GET", "/metrics")))
            .await
            .ok()?
    }

    /// Whether a TCP connection from the client to `addr` is refused or times out (1 s).
    pub async fn unreachable(&self, addr: SocketAddr) -> bool {
        let lab = self.lab.clone();
        tokio::task::spawn_blocking(move || {
            lab.in_site("client", || {
                TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err()
            })
        })
        .await
        .unwrap_or(false)
    }

    /// `GET /` through a load balancer from the client: the sample app's `site=…` word.
    pub async fn through_lb(&self, site: &str) -> Option<String> {
        let (lab, addr) = (self.lab.clone(), SocketAddr::new(self.ip(site, 20), 8080));
        let body =
            tokio::task::spawn_blocking(move || lab.in_site("client", || http(addr, "GET", "/")))
                .await
                .ok()??;
        body.split_whitespace().next().map(str::to_string)
    }

    /// `POST path` (JSON body) to `site`'s node API; the status and body.
    pub async fn post(&self, site: &str, path: &str, body: &str) -> Option<(u16, Value)> {
        self.post_within(site, path, body, Duration::from_secs(5))
            .await
    }

    /// [`Sites::post`] of an operation that takes a while (a backup): the answer awaited up
    /// to `wait`.
    pub async fn post_within(
        &self,
        site: &str,
        path: &str,
        body: &str,
        wait: Duration,
    ) -> Option<(u16, Value)> {
        let (lab, addr, path, body) = (
            self.lab.clone(),
            self.api(site),
            path.to_string(),
            body.to_string(),
        );
        tokio::task::spawn_blocking(move || {
            lab.in_site("client", || post(addr, &path, &body, wait))
        })
        .await
        .ok()?
    }

    /// An outage drill of `site` for `length`, asked of `via`'s node; its answer's body.
    pub async fn outage_drill(&self, via: &str, site: &str, length: &str) -> Value {
        let body = format!(r#"{{"site": "{site}", "for": "{length}"}}"#);
        let (status, body) = self.post(via, "/v1/drills/outage", &body).await.unwrap();
        assert_eq!(status, 200, "{body}");
        body
    }

    /// `dig` from the client against `site`'s DNS: the short answer, or `None` when it got none.
    pub async fn dig(&self, site: &str, name: &str) -> Option<Vec<String>> {
        let mut cmd = self.lab.command("client", "dig");
        cmd.arg(format!("@{}", self.ip(site, 10)))
            .args([name, "+short", "+norec", "+time=1", "+tries=1"]);
        let out = tokio::process::Command::from(cmd).output().await.ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || text.contains("timed out") || text.contains("error") {
            return None;
        }
        Some(text.lines().map(str::to_string).collect())
    }

    /// `dig` from the client against `site`'s DNS with `args`; its whole output.
    pub async fn dig_text(&self, site: &str, args: &[&str]) -> String {
        let mut cmd = self.lab.command("client", "dig");
        cmd.arg(format!("@{}", self.ip(site, 10)))
            .args(args)
            .args(["+norec", "+time=1", "+tries=1"]);
        let out = tokio::process::Command::from(cmd).output().await.unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `tandem status --api` of `site`'s node, run inside namespace `from`: its stdout.
    pub async fn status_text(&self, from: &str, site: &str) -> String {
        let mut cmd = self.lab.command(from, env!("CARGO_BIN_EXE_tandem"));
        cmd.args(["status", "--api", &self.api(site).to_string()]);
        let out = tokio::process::Command::from(cmd).output().await.unwrap();
        assert!(
            out.status.success(),
            "tandem status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until `site`'s DNS answers `want` for the name.
    pub async fn wait_answer(&self, site: &str, want: &str, deadline: Duration) {
        let what = format!("{site}'s DNS to answer {want}");
        eventually(deadline, &what, || async {
            let a = self.dig(site, DOMAIN).await?;
            (a == [want]).then_some(())
        })
        .await;
    }

    /// Every event `site`'s node shows.
    pub async fn events(&self, site: &str) -> Vec<Value> {
        self.get::<Value>(site, "/v1/events")
            .await
            .and_then(|v| v["events"].as_array().cloned())
            .unwrap_or_default()
    }

    /// Writes so far: etcd's committed proposals (the edge member's count: every member
    /// commits every proposal), and each node's `tandem_store_writes_total`.
    pub async fn store_counts(&self) -> (u64, Vec<u64>) {
        let metric = |text: &str, name: &str| -> u64 {
            text.lines()
                .find(|l| l.starts_with(name) && !l.starts_with('#'))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .map_or(0, |v| v as u64)
        };
        let (lab, etcd) = (self.lab.clone(), SocketAddr::new(self.ip("edge", 10), 2379));
        let text = tokio::task::spawn_blocking(move || {
            lab.in_site("client", || http(etcd, "GET", "/metrics"))
        })
        .await
        .ok()
        .flatten()
        .unwrap_or_default();
        let proposals = metric(&text, "etcd_server_proposals_committed_total");
        let mut nodes = Vec::new();
        for site in SITES {
            let (lab, api) = (self.lab.clone(), self.api(site));
            let text = tokio::task::spawn_blocking(move || {
                lab.in_site("client", || http(api, "GET", "/metrics"))
            })
            .await
            .ok()
            .flatten()
            .unwrap_or_default();
            nodes.push(metric(&text, "tandem_store_writes_total"));
        }
        (proposals, nodes)
    }

    /// The tail of a node's log (for failure messages).
    pub fn log(&self, site: &str) -> String {
        let path = self.lab.dir().join(format!("tandem-{site}.log"));
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

/// One HTTP/1.0 exchange, bounded in time; the body of a 2xx answer.
fn http(addr: SocketAddr, method: &str, path: &str) -> Option<String> {
    let (status, body) = exchange(
        addr,
        &format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n"),
        Duration::from_secs(5),
    )?;
    (200..300).contains(&status).then_some(body)
}

fn post(addr: SocketAddr, path: &str, body: &str, wait: Duration) -> Option<(u16, Value)> {
    let req = format!(
        "POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (status, body) = exchange(addr, &req, wait)?;
    Some((status, serde_json::from_str(&body).unwrap_or(Value::Null)))
}

fn exchange(addr: SocketAddr, request: &str, wait: Duration) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(wait)).ok()?;
    s.write_all(request.as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

/// A PostgreSQL session to `addr` from inside `lab`'s namespace `from` (the socket is made
/// there, then driven from here), as the superuser with `password`.
pub async fn sql(
    lab: &Lab,
    from: &str,
    addr: SocketAddr,
    password: &str,
) -> Result<tokio_postgres::Client, String> {
    let (lab, from) = (lab.clone(), from.to_string());
    let stream = tokio::task::spawn_blocking(move || {
        lab.in_site(&from, || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(1))
        })
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    stream.set_nonblocking(true).map_err(|e| e.to_string())?;
    let stream = tokio::net::TcpStream::from_std(stream).map_err(|e| e.to_string())?;
    let mut c = tokio_postgres::Config::new();
    c.user("postgres").password(password).dbname("postgres");
    let connect = c.connect_raw(stream, tokio_postgres::NoTls);
    let (client, conn) = tokio::time::timeout(Duration::from_secs(2), connect)
        .await
        .map_err(|_| "no answer within 2 s".to_string())?
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(client)
}

/// The three-site topology with the lab's addresses.
fn topology_text(lab: &Lab, etcd: &EtcdCluster, o: &Options) -> String {
    let ip = |site: &str, host: u8| lab.ip(site, host);
    let etcd_list: Vec<String> = etcd
        .endpoints()
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect();
    let state = if o.state_per_node {
        PathBuf::from("state")
    } else {
        lab.dir().join("state")
    };
    let mut t = format!(
        r#"[tandem]
state_dir = "{state}"

[cluster]
name = "shop"
etcd = [{etcd}]
lease_ttl = "{ttl}"

[[site]]
name = "edge"
role = "edge"

[[site]]
name = "region"
role = "region"

[[site]]
name = "witness"
role = "witness"

[[node]]
name = "edge-1"
site = "edge"
api = "{e10}:7400"
dns = ["{e10}:53"]

[[node]]
name = "region-1"
site = "region"
api = "{r10}:7400"
dns = ["{r10}:53"]

[[node]]
name = "witness-1"
site = "witness"
api = "{w10}:7400"
{witness_dns}

[[dns.zone]]
name = "shop.test"
nameservers = [
  {{ name = "ns1.shop.test", address = "{e10}" }},
  {{ name = "ns2.shop.test", address = "{r10}" }},
{ns3}]
hostmaster = "hostmaster.shop.test"

# The test client polls far faster than a resolver would: exempt from response-rate limiting,
# as an operator exempts a monitoring host.
[dns.rrl]
exempt = ["198.18.100.0/24"]

[[monitor]]
name = "web"
protocol = "http"
port = 8080
path = "/healthz"
interval = "{interval}"
timeout = "{timeout}"
tolerated_failures = 2
recovery_successes = 2

[[profile]]
name = "www"
domain = "www.shop.test"
routing = "priority"
ttl = "1s"
monitor = "web"
failback_hold = "{hold}"

  [[profile.endpoint]]
  name = "edge"
  target = {{ load_balancer = "edge-web" }}
  priority = 1

  [[profile.endpoint]]
  name = "region"
  target = {{ load_balancer = "region-web" }}
  priority = 2
"#,
        state = state.display(),
        etcd = etcd_list.join(", "),
        ttl = o.lease_ttl,
        e10 = ip("edge", 10),
        r10 = ip("region", 10),
        w10 = ip("witness", 10),
        interval = o.interval,
        timeout = o.timeout,
        hold = o.failback_hold,
        witness_dns = if o.witness_dns {
            format!("dns = [\"{}:53\"]", ip("witness", 10))
        } else {
            String::new()
        },
        ns3 = if o.witness_dns {
            format!(
                "  {{ name = \"ns3.shop.test\", address = \"{}\" }},\n",
                ip("witness", 10)
            )
        } else {
            String::new()
        },
    );
    for site in ["edge", "region"] {
        let database = if o.sample_app_database {
            format!(
                r#", "--database", "{}:5432", "--database-password-file", "state/databases/orders/password""#,
                ip(site, 40)
            )
        } else {
            String::new()
        };
        t.push_str(&format!(
            r#"
[[load_balancer]]
name = "{site}-web"
site = "{site}"
frontend = "{lb}:8080"
pool = {{ scale_set = "{site}-web", port = "http" }}
probe = "web"

[[scale_set]]
name = "{site}-web"
site = "{site}"
command = ["tandem", "sample-app", "--listen", "{{address}}:{{port.http}}", "--site", "{{site}}"{database}]
bind = "{inst}"
ports = {{ http = "21000-21009" }}
capacity = {{ min = 1, max = 4, initial = 2 }}
health = "web"
"#,
            lb = ip(site, 20),
            inst = ip(site, 30),
        ));
    }
    // `LAB_DIR` in the extra TOML: the lab's directory (a path every node reaches).
    t.push_str(&o.extra.replace("LAB_DIR", &lab.dir().display().to_string()));
    t
}
