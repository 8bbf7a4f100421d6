//! The dashboard in a real browser: headless Debian `chromium` driven through `chromedriver`
//! (WebDriver, fantoccini) against the real `tandem` binary on a quickstart-like topology
//! (two sites, each a scale set of sample-app instances behind a load balancer, DNS priority
//! routing between them) with free ports. Needs `chromium` and `chromium-driver`
//! (scripts/deps). A screenshot is left in `target/test-artifacts/`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use testkit::eventually;

mod common;
use common::*;

/// The first test's addresses; the second's are in 127.0.10.0/24.
const EDGE: &str = "127.0.9.10";
const REGION: &str = "127.0.9.20";

/// A `chromedriver` on a free loopback port, killed when dropped.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    /// Starts chromedriver and waits (up to 20 s) until it answers.
    async fn start(dir: &Path) -> Driver {
        let port = testkit::free_tcp_port(&["127.0.0.1"]);
        let child = Command::new("/usr/bin/chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("chromedriver.log")).unwrap())
            .spawn()
            .expect("chromedriver runs (apt-get install chromium chromium-driver; scripts/deps)");
        let driver = Driver { child, port };
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        eventually(Duration::from_secs(20), "chromedriver ready", || async {
            tokio::net::TcpStream::connect(addr).await.ok()?;
            let status = driver_call(addr, "GET", "/status", "").await;
            (status["value"]["ready"] == true).then_some(())
        })
        .await;
        driver
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A headless chromium session (as root it needs `--no-sandbox`), keeping the browser's
    /// console log.
    async fn browser(&self) -> Client {
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--window-size=1280,1700",
                ],
            },
            "goog:loggingPrefs": { "browser": "ALL" },
        });
        let caps = caps.as_object().unwrap().clone();
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&self.url())
            .await
            .expect("a chromium session")
    }

    /// The browser's console messages since the last call (chromedriver's log endpoint):
    /// `(level, message)`.
    async fn console(&self, client: &Client) -> Vec<(String, String)> {
        let id = client.session_id().await.unwrap().unwrap();
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        let v = driver_call(
            addr,
            "POST",
            &format!("/session/{id}/se/log"),
            r#"{"type": "browser"}"#,
        )
        .await;
        v["value"]
            .as_array()
            .unwrap_or_else(|| panic!("chromedriver's log: {v}"))
            .iter()
            .map(|e| {
                (
                    e["level"].as_str().unwrap_or("").to_string(),
                    e["message"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // chromedriver ends the chromium it started when it exits on SIGTERM; a kill after
        // that only reaps it.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let end = tokio::time::Instant::now() + Duration::from_secs(5);
        while tokio::time::Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request to chromedriver (which answers HTTP/1.1 only, keeping the connection), within
/// 10 s; the JSON body, read by its `Content-Length`.
async fn driver_call(addr: SocketAddr, method: &str, path: &str, json: &str) -> Value {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let talk = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{json}",
            json.len()
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        loop {
            let mut chunk = [0u8; 8192];
            let n = s.read(&mut chunk).await.unwrap();
            assert!(
                n > 0,
                "chromedriver closed: {}",
                String::from_utf8_lossy(&out)
            );
            out.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&out).to_string();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())
                            .flatten()
                    })
                    .expect("chromedriver sends Content-Length");
                if body.len() >= length {
                    return body.to_string();
                }
            }
        }
    };
    let body = tokio::time::timeout(Duration::from_secs(10), talk)
        .await
        .unwrap_or_else(|_| panic!("chromedriver did not answer {method} {path} within 10 s"));
    serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("chromedriver {method} {path}: {e}: {body}"))
}

/// Console errors (level SEVERE) among `log`.
fn errors(log: &[(String, String)]) -> Vec<&(String, String)> {
    log.iter().filter(|(level, _)| level == "SEVERE").collect()
}

/// The text of the element `css`, or `None` while there is none.
async fn text(client: &Client, css: &str) -> Option<String> {
    client.find(Locator::Css(css)).await.ok()?.text().await.ok()
}

/// Waits up to `deadline` for the text of `css` to contain `needle`.
async fn wait_text(client: &Client, css: &str, needle: &str, deadline: Duration) -> String {
    eventually(deadline, &format!("{css} shows {needle:?}"), || async {
        text(client, css).await.filter(|t| t.contains(needle))
    })
    .await
}

/// Where screenshots go: `target/test-artifacts/` beside the binary under test.
fn artifacts() -> PathBuf {
    let exe = Path::new(env!("CARGO_BIN_EXE_tandem"));
    let target = exe.parent().and_then(Path::parent).unwrap();
    let dir = target.join("test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The quickstart's shape in `NET.0/24` (`NET.10` the edge load balancer, `NET.20` the
/// region's, instances on `NET.11` and `NET.21`), the load balancers on port `front`, `extra`
/// in `[tandem]`, `tail` at the end.
fn quickstart(
    dir: &Path,
    api: SocketAddr,
    net: &str,
    front: u16,
    extra: &str,
    tail: &str,
) -> PathBuf {
    topology_file(
        dir,
        api,
        &format!(
            r#"{extra}
[[site]]
name = "edge"
role = "edge"
[[site]]
name = "region"
role = "region"

[dns]
listen = ["127.0.0.1:0"]
[[dns.zone]]
name = "shop.test"
nameservers = [{{ name = "ns1.shop.test", address = "127.0.0.1" }}]
hostmaster = "hostmaster.shop.test"

[[monitor]]
name = "web"
protocol = "http"
port = {front}
path = "/healthz"
interval = "200ms"
timeout = "150ms"
tolerated_failures = 1
recovery_successes = 1

[[profile]]
name = "www"
domain = "www.shop.test"
routing = "priority"
ttl = "5s"
monitor = "web"
failback_hold = "60s"
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
frontend = "{net}.10:{front}"
pool = {{ scale_set = "edge-web", port = "http" }}
probe = "web"

[[load_balancer]]
name = "region-web"
site = "region"
frontend = "{net}.20:{front}"
pool = {{ scale_set = "region-web", port = "http" }}
probe = "web"

[[scale_set]]
name = "edge-web"
site = "edge"
command = ["tandem", "sample-app", "--listen", "{{address}}:{{port.http}}", "--site", "{{site}}"]
bind = "{net}.11"
ports = {{ http = "23000-23009" }}
capacity = {{ min = 1, max = 2, initial = 2 }}
health = "web"

[[scale_set]]
name = "region-web"
site = "region"
command = ["tandem", "sample-app", "--listen", "{{address}}:{{port.http}}", "--site", "{{site}}"]
bind = "{net}.21"
ports = {{ http = "23000-23009" }}
capacity = {{ min = 1, max = 2, initial = 1 }}
health = "web"
{tail}
"#
        ),
    )
}

/// The page loads without a console error and shows the edge answer; an outage drill of the
/// edge started through the API shows, without a reload, as the region answer, the drill
/// banner and the drill's event in the timeline (fed by `/v1/events/stream`); stopping it
/// takes the banner away. Tandem stops on SIGTERM at once with the page's stream open, and
/// the page says it is no longer live. Leaves `target/test-artifacts/dashboard.png`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_follows_an_outage_drill_live() {
    let dir = tempfile::tempdir().unwrap();
    let api = testkit::closed_port();
    let front = testkit::free_tcp_port(&[EDGE, REGION]);
    // The tiers moving together: an app (without a database) shows in its panel.
    let app = r#"
[[app]]
name = "shop"
sites = ["edge", "region"]
profile = "www"
scale_sets = ["edge-web", "region-web"]
"#;
    let file = quickstart(dir.path(), api, "127.0.9", front, "", app);
    let mut up = Up::start(&file, api, &[]);
    eventually(Duration::from_secs(30), "both endpoints Online", || async {
        let p = try_get_json(api, "/v1/profiles").await?;
        let all = p["profiles"][0]["endpoints"]
            .as_array()?
            .iter()
            .all(|e| e["status"] == "Online");
        all.then_some(())
    })
    .await;

    let driver = Driver::start(dir.path()).await;
    let client = driver.browser().await;
    let started = tokio::time::Instant::now();
    client.goto(&format!("http://{api}/")).await.unwrap();
    assert_eq!(client.title().await.unwrap(), "Tandem");
    let answer = r#"[data-profile="www"] .answer"#;
    wait_text(&client, answer, EDGE, Duration::from_secs(10)).await;
    wait_text(&client, "#live", "live", Duration::from_secs(10)).await;
    assert_eq!(text(&client, "#live").await.as_deref(), Some("live"));
    wait_text(
        &client,
        r#"[data-scale-set="edge-web"]"#,
        "edge-web-",
        Duration::from_secs(10),
    )
    .await;
    wait_text(&client, "#sites", "region", Duration::from_secs(10)).await;
    wait_text(
        &client,
        r#"[data-app="shop"]"#,
        "active at edge",
        Duration::from_secs(10),
    )
    .await;
    eprintln!(
        "dashboard: edge answer shown {:?} after goto",
        started.elapsed()
    );
    let log = driver.console(&client).await;
    assert!(errors(&log).is_empty(), "console errors: {log:#?}");

    // The drill, through the API: the page follows without a reload (the marker stays).
    client
        .execute("window.tandemTestMarker = 42;", Vec::new())
        .await
        .unwrap();
    let resp = http_post_json(
        api,
        "/v1/drills/outage",
        r#"{"site": "edge", "for": "60s"}"#,
    )
    .await;
    assert!(
        resp.starts_with("HTTP/1.0 200") || resp.starts_with("HTTP/1.1 200"),
        "{resp}"
    );
    let drill = tokio::time::Instant::now();
    wait_text(&client, "#events", "outage-start", Duration::from_secs(10)).await;
    let event_shown = drill.elapsed();
    wait_text(&client, answer, REGION, Duration::from_secs(15)).await;
    let answer_shown = drill.elapsed();
    eprintln!(
        "dashboard: drill event shown {} ms, region answer {} ms after the drill started",
        event_shown.as_millis(),
        answer_shown.as_millis()
    );
    wait_text(
        &client,
        "#drill-banner",
        "OUTAGE DRILL of site edge",
        Duration::from_secs(5),
    )
    .await;
    // The app moved by itself: its panel says where, and how the move went.
    let panel = wait_text(
        &client,
        r#"[data-app="shop"]"#,
        "active at region",
        Duration::from_secs(15),
    )
    .await;
    assert!(panel.contains("(site-lost): done"), "{panel}");
    let timeline = text(&client, "#events").await.unwrap();
    assert!(timeline.contains("drill"), "{timeline}");
    let shot = artifacts().join("dashboard.png");
    std::fs::write(&shot, client.screenshot().await.unwrap()).unwrap();
    eprintln!("dashboard screenshot: {}", shot.display());

    let marker = client
        .execute("return window.tandemTestMarker;", Vec::new())
        .await
        .unwrap();
    assert_eq!(marker, json!(42), "the page was not reloaded");

    let resp = http_post(api, "/v1/drills/stop").await;
    assert!(resp.contains(" 200 "), "{resp}");
    wait_text(&client, "#events", "outage-end", Duration::from_secs(10)).await;
    eventually(Duration::from_secs(10), "the drill banner gone", || async {
        let banner = client.find(Locator::Css("#drill-banner")).await.ok()?;
        (!banner.is_displayed().await.ok()?).then_some(())
    })
    .await;
    let log = driver.console(&client).await;
    assert!(errors(&log).is_empty(), "console errors: {log:#?}");

    // An open event stream does not hold tandem up.
    let stopping = tokio::time::Instant::now();
    assert!(up.terminate().success());
    assert!(
        stopping.elapsed() < Duration::from_secs(10),
        "tandem took {:?} to stop",
        stopping.elapsed()
    );
    wait_text(&client, "#live", "not live", Duration::from_secs(10)).await;
    client.close().await.unwrap();
}

/// With `[tandem] tokens` and reads not open: the page says to paste a read token; with the
/// read token pasted it shows the data, and its drill button reports that an admin token is
/// needed; with the admin token pasted the buttons start and stop a drill. The token stays in
/// the tab's sessionStorage. The only console errors are the refused requests themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_asks_for_a_token_and_its_buttons_need_an_admin() {
    let dir = tempfile::tempdir().unwrap();
    // SHA-256 of "read-secret" and "admin-secret".
    let tokens = dir.path().join("tokens.toml");
    std::fs::write(
        &tokens,
        "[[token]]\nname = \"grafana\"\nrole = \"read\"\nsha256 = \"f0fd6c09405cb6d3707d04067d8509cb924e62ae66fa02067c2bc467b0d721e4\"\n\n[[token]]\nname = \"ops\"\nrole = \"admin\"\nsha256 = \"16175223c8ddce5ace0493c948569c211b03c4c6bb3d3e484434999448cffe01\"\n",
    )
    .unwrap();
    let api = testkit::closed_port();
    let (edge, region) = ("127.0.10.10", "127.0.10.20");
    let front = testkit::free_tcp_port(&[edge, region]);
    let extra = format!("tokens = \"{}\"\n", tokens.display());
    let file = quickstart(dir.path(), api, "127.0.10", front, &extra, "");
    let _up = Up::start(&file, api, &[]);
    eventually(Duration::from_secs(30), "the API up", || async {
        tokio::net::TcpStream::connect(api).await.ok()
    })
    .await;

    let driver = Driver::start(dir.path()).await;
    let client = driver.browser().await;
    client.goto(&format!("http://{api}/")).await.unwrap();
    wait_text(
        &client,
        "#need-token",
        "paste a read token",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(text(&client, "#live").await.as_deref(), Some("not live"));

    let paste = |token: &'static str| {
        let client = client.clone();
        async move {
            let field = client.find(Locator::Id("token")).await.unwrap();
            field.clear().await.unwrap();
            field.send_keys(token).await.unwrap();
            client
                .find(Locator::Css("form.token button[type=submit]"))
                .await
                .unwrap()
                .click()
                .await
                .unwrap();
        }
    };
    paste("read-secret").await;
    let answer = r#"[data-profile="www"] .answer"#;
    wait_text(&client, answer, edge, Duration::from_secs(20)).await;
    wait_text(&client, "#live", "live", Duration::from_secs(10)).await;
    assert!(
        !client
            .find(Locator::Id("need-token"))
            .await
            .unwrap()
            .is_displayed()
            .await
            .unwrap()
    );

    let start = r#"[data-site="edge"] .start-drill"#;
    client
        .find(Locator::Css(start))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_text(
        &client,
        "#action-error",
        "needs an admin token",
        Duration::from_secs(10),
    )
    .await;

    paste("admin-secret").await;
    client
        .find(Locator::Css(start))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_text(
        &client,
        "#drill-banner",
        "OUTAGE DRILL of site edge",
        Duration::from_secs(10),
    )
    .await;
    wait_text(&client, "#events", "outage-start", Duration::from_secs(10)).await;
    let drill = get_json_as(api, "/v1/drills", "read-secret").await;
    assert_eq!(drill["drill"]["site"], "edge", "{drill}");
    client
        .find(Locator::Css(r#"[data-site="edge"] .stop-drill"#))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_text(&client, "#events", "outage-end", Duration::from_secs(10)).await;
    let kept = client
        .execute("return sessionStorage.getItem('tandem-token');", Vec::new())
        .await
        .unwrap();
    assert_eq!(kept, json!("admin-secret"));

    let log = driver.console(&client).await;
    let unexpected: Vec<_> = errors(&log)
        .into_iter()
        .filter(|(_, m)| !m.contains("status of 401") && !m.contains("status of 403"))
        .collect();
    assert!(unexpected.is_empty(), "console errors: {log:#?}");
    client.close().await.unwrap();
}

/// The JSON body of a GET with a bearer token.
async fn get_json_as(api: SocketAddr, path: &str, token: &str) -> Value {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(api).await.unwrap();
    let req =
        format!("GET {path} HTTP/1.0\r\nHost: {api}\r\nAuthorization: Bearer {token}\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(HTTP_TIMEOUT, s.read_to_string(&mut out))
        .await
        .expect("the API answers")
        .unwrap();
    serde_json::from_str(body(&out)).unwrap_or_else(|e| panic!("{path}: {e}: {out}"))
}
