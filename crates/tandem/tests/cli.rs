//! The `tandem` binary as users run it: a real process, real servers, real signals.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use testkit::{Behaviour, HttpServer, eventually};

mod common;
use common::*;

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/two-site.toml")
}

#[test]
fn validate_accepts_the_example() {
    let out = run(tandem().arg("validate").arg(example()));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("valid (2 sites"));
}

/// The README's validate example is what `tandem validate` prints, word for word: the two
/// edits it names, typed into a copy of `examples/quickstart.toml`.
#[test]
fn the_readme_validate_example_is_what_validate_prints() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let start = "```console\n$ tandem validate topology.toml\n";
    let shown = readme
        .split_once(start)
        .and_then(|(_, rest)| rest.split_once("\n```"))
        .map(|(block, _)| block)
        .expect("README has the validate example");
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(root.join("examples/quickstart.toml")).unwrap();
    assert_eq!(text.matches("timeout = \"500ms\"").count(), 1);
    assert_eq!(text.matches("monitor = \"web\"").count(), 1);
    let text = text
        .replace("timeout = \"500ms\"", "timeout = \"2s\"")
        .replace("monitor = \"web\"", "monitor = \"wbe\"");
    std::fs::write(dir.path().join("topology.toml"), text).unwrap();
    let out = run(tandem()
        .args(["validate", "topology.toml"])
        .current_dir(dir.path()));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&out.stderr).trim_end(), shown);
}

#[test]
fn validate_reports_every_problem_with_its_location() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    let text = std::fs::read_to_string(example())
        .unwrap()
        .replace("role = \"edge\"", "role = \"edgy\"")
        .replace("interval = \"1s\"", "interval = \"1 second\"")
        .replace("monitor = \"web\"", "monitor = \"wbe\"")
        .replace(
            "min = 2, max = 6, initial = 2",
            "min = 3, max = 6, initial = 2",
        );
    std::fs::write(&file, text).unwrap();

    let out = run(tandem().arg("validate").arg(&file));
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let name = file.display().to_string();
    for expected in [
        format!("error[E008]: `role` cannot be \"edgy\"\n  --> {name}:12:8"),
        format!("error[E005]: invalid duration \"1 second\" for `interval`\n  --> {name}:34:12"),
        format!("error[E011]: unknown monitor `wbe`\n  --> {name}:46:11"),
        format!(
            "error[E017]: capacity needs min <= initial <= max, found min 3, initial 2, max 6\n  --> {name}:91:12"
        ),
        format!("error: {name} has 4 problems"),
    ] {
        assert!(
            stderr.contains(&expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }

    let out = run(tandem().args(["validate", "--json"]).arg(&file));
    assert_eq!(out.status.code(), Some(1));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    let codes: Vec<&str> = json
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["code"].as_str().unwrap())
        .collect();
    assert_eq!(codes, ["E008", "E005", "E011", "E017"]);
    assert_eq!(json[1]["line"], 34);
    assert_eq!(json[1]["column"], 12);
}

/// Issue 13: the summary said `1 monitors`; each count now agrees with its number.
#[test]
fn validate_counts_in_words() {
    let quickstart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/quickstart.toml");
    let out = run(tandem().arg("validate").arg(&quickstart));
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!(
            "{}: valid (2 sites, 1 monitor, 1 profile, 2 load balancers, 2 scale sets, 0 databases, 0 apps)\n",
            quickstart.display()
        )
    );
    assert_eq!(String::from_utf8_lossy(&out.stderr), "", "no warning");
}

/// Issue 13: an empty file (or one with nothing to run) reported `valid (0 sites, …)` and
/// nothing else. It is valid, with a warning that it runs nothing, located and with help;
/// `--json` carries the warning with its severity; the exit code stays 0.
#[test]
fn validate_warns_of_a_topology_that_runs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("empty.toml");
    std::fs::write(&file, "").unwrap();
    let name = file.display().to_string();
    let out = run(tandem().arg("validate").arg(&file));
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!(
            "{name}: valid (0 sites, 0 monitors, 0 profiles, 0 load balancers, 0 scale sets, 0 databases, 0 apps)\n"
        )
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    for expected in [
        format!("warning[W001]: the topology serves and runs nothing\n --> {name}:1:1\n"),
        "= help: add a [dns] zone with profiles".to_string(),
        format!("warning: {name} has 1 warning\n"),
    ] {
        assert!(
            stderr.contains(&expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
    let out = run(tandem().args(["validate", "--json"]).arg(&file));
    assert_eq!(out.status.code(), Some(0));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json[0]["severity"], "warning");
    assert_eq!(json[0]["code"], "W001");
    assert_eq!(
        (json[0]["line"].clone(), json[0]["column"].clone()),
        (1.into(), 1.into())
    );
}

/// Issue 13: `tandem up` logs the topology's warnings when it starts, and runs.
#[tokio::test]
async fn up_logs_the_warnings_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let api = testkit::closed_port();
    let topology = topology_file(
        dir.path(),
        api,
        r#"
[dns]
listen = ["127.0.0.1:0"]
[[dns.zone]]
name = "shop.test"
nameservers = ["ns1.shop.test"]
hostmaster = "hostmaster.shop.test"
"#,
    );
    let mut up = Up::start(&topology, api, &[("TANDEM_LOG", "info")]);
    let log = up.log.clone().unwrap();
    let text = eventually(Duration::from_secs(10), "tandem up", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        async move { text.contains("tandem is up").then_some(text) }
    })
    .await;
    assert!(text.contains("W002"), "{text}");
    assert!(
        text.contains("name server `ns1.shop.test` is inside a served zone but has no address"),
        "{text}"
    );
    assert!(
        text.contains(&format!("{}:9:16", topology.display())),
        "{text}"
    );
    assert!(up.terminate().success());
}

#[test]
fn validate_of_a_missing_file_says_so() {
    let out = run(tandem().args(["validate", "/nonexistent/topology.toml"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot read /nonexistent/topology.toml")
    );
}

#[test]
fn usage_errors_exit_2_and_every_command_has_help() {
    assert_eq!(run(tandem().arg("frobnicate")).status.code(), Some(2));
    for cmd in [
        &["--help"][..],
        &["up", "--help"],
        &["validate", "--help"],
        &["status", "--help"],
    ] {
        let out = run(tandem().args(cmd));
        assert_eq!(out.status.code(), Some(0), "{cmd:?}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("Usage: tandem"));
    }
    // A drill's length without its unit, or of zero, is a usage error, told before any call.
    for length in ["30", "0s"] {
        let out = run(tandem().args([
            "drill",
            "outage",
            "edge",
            "--for",
            length,
            "--api",
            "127.0.0.1:9",
        ]));
        assert_eq!(out.status.code(), Some(2), "--for {length}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("expected a duration longer than 0"), "{err}");
    }
    let out = run(tandem().arg("--version"));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("tandem {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn status_without_a_running_tandem_exits_3() {
    let out = run(tandem().args(["status", "--api", "127.0.0.1:9"]));
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is `tandem up` running?"));
}

/// `tandem up` probes http, https (verifying against a trusted test CA) and tcp targets of a
/// real topology; `tandem status --json` shows each go Online, Degraded after exactly
/// tolerated + 1 failures, and Online again; SIGTERM stops it and frees its port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_probes_the_topology_and_status_shows_it() {
    let web = HttpServer::start().await;
    let (secure, ca_pem) = HttpServer::start_tls().await;
    let db = HttpServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, ca_pem).unwrap();
    let api = testkit::closed_port();
    let topology = topology_file(
        dir.path(),
        api,
        &format!(
            r#"
[dns]
listen = ["127.0.0.1:0"]
[[dns.zone]]
name = "shop.test"
nameservers = ["ns1.shop.test"]
hostmaster = "hostmaster.shop.test"

[[monitor]]
name = "web"
protocol = "http"
port = {web}
path = "/healthz"
interval = "200ms"
timeout = "150ms"
tolerated_failures = 2
recovery_successes = 2

[[monitor]]
name = "secure"
protocol = "https"
port = {secure}
sni = "localhost"
interval = "200ms"
timeout = "150ms"

[[monitor]]
name = "db"
protocol = "tcp"
port = {db}
interval = "200ms"
timeout = "150ms"

[[profile]]
name = "www"
domain = "www.shop.test"
routing = "priority"
monitor = "web"
  [[profile.endpoint]]
  name = "edge"
  target = {{ address = "127.0.0.1" }}
  priority = 1

[[profile]]
name = "api"
domain = "api.shop.test"
routing = "weighted"
monitor = "secure"
  [[profile.endpoint]]
  name = "edge"
  target = {{ address = "127.0.0.1" }}

[[profile]]
name = "db"
domain = "db.shop.test"
routing = "weighted"
monitor = "db"
  [[profile.endpoint]]
  name = "edge"
  target = {{ address = "127.0.0.1" }}
"#,
            web = web.addr.port(),
            secure = secure.addr.port(),
            db = db.addr.port()
        ),
    );

    let mut up = Up::start(&topology, api, &[("SSL_CERT_FILE", ca.to_str().unwrap())]);
    for id in ["profile/www/edge", "profile/api/edge", "profile/db/edge"] {
        wait_status(&up, id, "Online").await;
    }
    assert!(
        web.last_request()
            .unwrap()
            .starts_with("GET /healthz HTTP/1.1")
    );
    assert_eq!(secure.last_sni().as_deref(), Some("localhost"));

    web.set(Behaviour::Answer(503, String::new()));
    let t = wait_status(&up, "profile/www/edge", "Degraded").await;
    assert_eq!(t["last_failure"], "status 503");
    let events = recent_events(api).await;
    let degraded = events
        .iter()
        .find(|e| {
            e["source"] == "health" && e["subject"] == "profile/www/edge" && e["kind"] == "Degraded"
        })
        .expect("a Degraded event");
    assert_eq!(
        degraded["message"],
        "Online -> Degraded: 3 failures in a row, last: status 503"
    );

    web.set(Behaviour::Answer(200, "ok".into()));
    wait_status(&up, "profile/www/edge", "Online").await;
    let events = recent_events(api).await;
    let back = events
        .iter()
        .rfind(|e| {
            e["source"] == "health" && e["subject"] == "profile/www/edge" && e["kind"] == "Online"
        })
        .unwrap();
    assert!(
        back["message"]
            .as_str()
            .unwrap()
            .starts_with("Degraded -> Online: 2 successes in a row")
    );

    let metrics = http_get(api, "/metrics").await;
    assert!(
        metrics.contains("tandem_health_target_up{target=\"profile/www/edge\",monitor=\"web\"} 1")
    );

    let table = run(tandem().args(["status", "--api", &api.to_string()]));
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.starts_with("PROFILE"), "{table}");
    assert!(table.contains("\nTARGET "), "{table}");
    assert!(table.contains("profile/db/edge (db 127.0.0.1:"), "{table}");

    let exit = up.terminate();
    assert!(exit.success(), "tandem exits 0 on SIGTERM: {exit:?}");
    assert!(
        std::net::TcpListener::bind(api).is_ok(),
        "the API port is free again"
    );
}

/// HTTPS probes trust what `SSL_CERT_DIR` holds, and only that: the same self-signed server is
/// Online for a Tandem whose directory holds its certificate, Degraded with a certificate
/// reason for one whose directory is the system store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_probes_trust_the_certificates_in_ssl_cert_dir() {
    let (secure, pem) = HttpServer::start_tls().await;
    let body = format!(
        r#"
[[monitor]]
name = "secure"
protocol = "https"
port = {}
sni = "localhost"
interval = "200ms"
timeout = "150ms"
tolerated_failures = 0

[[load_balancer]]
name = "api"
site = "edge"
frontend = "127.0.0.1:0"
pool = {{ addresses = ["127.0.0.1:{}"] }}
probe = "secure"

[[site]]
name = "edge"
role = "edge"
"#,
        secure.addr.port(),
        secure.addr.port()
    );
    let target = format!("lb/api/127.0.0.1:{}", secure.addr.port());

    let trusting = tempfile::tempdir().unwrap();
    let certs = trusting.path().join("certs");
    std::fs::create_dir(&certs).unwrap();
    std::fs::write(certs.join("server.pem"), &pem).unwrap();
    let api = testkit::closed_port();
    let file = topology_file(trusting.path(), api, &body);
    let mut up = Up::start(&file, api, &[("SSL_CERT_DIR", certs.to_str().unwrap())]);
    wait_status(&up, &target, "Online").await;
    assert!(up.terminate().success());

    let system = tempfile::tempdir().unwrap();
    let api = testkit::closed_port();
    let file = topology_file(system.path(), api, &body);
    let mut up = Up::start(&file, api, &[("SSL_CERT_DIR", "/etc/ssl/certs")]);
    let t = wait_status(&up, &target, "Degraded").await;
    let reason = t["last_failure"].as_str().unwrap_or_default();
    assert!(reason.contains("certificate"), "{t}");
    assert!(up.terminate().success());
}

#[test]
fn up_refuses_an_invalid_topology_and_an_address_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[[site]]\nname = \"edge\"\n").unwrap();
    let out = run(tandem().arg("up").arg(&bad));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing required key `role`"));

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let file = dir.path().join("t.toml");
    std::fs::write(&file, format!("[tandem]\napi = \"{addr}\"\n")).unwrap();
    let out = run(tandem().arg("up").arg(&file));
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "cannot listen for the API on {addr} ([tandem] api)"
        )),
        "{stderr}"
    );
}

/// The README's two-site example: `tandem up examples/two-site.toml` serves the API on the
/// example's address and shows both endpoints probed; `tandem status` reads it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_two_site_example_runs() {
    let cwd = tempfile::tempdir().unwrap();
    let child = tandem()
        .arg("up")
        .arg(example())
        .current_dir(cwd.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut up = Up {
        child,
        api: "127.0.0.1:7400".parse().unwrap(),
        log: None,
    };
    // Each site's scale set starts its sample-app instances behind the site's load balancer,
    // so both endpoints go Online and the edge answers.
    for id in ["profile/www/edge", "profile/www/region"] {
        wait_status(&up, id, "Online").await;
    }
    let reply = http_get("127.0.1.10:8080".parse().unwrap(), "/").await;
    assert!(reply.contains("site=edge instance=edge-web-"), "{reply}");
    let table = run(tandem().arg("status").current_dir(cwd.path()));
    assert!(
        String::from_utf8_lossy(&table.stdout).contains("profile/www/edge (web 127.0.1.10:8080)")
    );
    // The README's dig: the edge first.
    let dns: SocketAddr = "127.0.0.1:5353".parse().unwrap();
    assert_eq!(
        testkit::dig(dns, "www.shop.test", &[]),
        Some(vec!["127.0.1.10".to_string()])
    );
    assert!(up.terminate().success());
}

/// The DNS traffic manager end to end: `tandem up` probes an edge and a region web server;
/// `dig` sees the edge; when the edge server stops the answer moves to the region; when it
/// comes back the answer returns only after the failback hold; an operator's disable takes
/// effect at once; stopping tandem frees the DNS port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_fails_over_and_back_with_real_probes_and_dig() {
    let mut edge = HttpServer::start_on("127.0.1.10:0".parse().unwrap()).await;
    let port = edge.addr.port();
    let _region = HttpServer::start_on(format!("127.0.2.10:{port}").parse().unwrap()).await;
    let dns: SocketAddr = (
        [127, 0, 0, 1],
        testkit::free_udp_tcp_port([127, 0, 0, 1].into()),
    )
        .into();
    let api = testkit::closed_port();
    let dir = tempfile::tempdir().unwrap();
    let topology = topology_file(
        dir.path(),
        api,
        &format!(
            r#"
[dns]
listen = ["{dns}"]
[[dns.zone]]
name = "shop.test"
nameservers = ["ns1.shop.test"]
hostmaster = "hostmaster.shop.test"

[[monitor]]
name = "web"
protocol = "http"
port = {port}
path = "/healthz"
interval = "200ms"
timeout = "150ms"
tolerated_failures = 1
recovery_successes = 2

[[profile]]
name = "www"
domain = "www.shop.test"
routing = "priority"
monitor = "web"
ttl = "1s"
failback_hold = "2s"
  [[profile.endpoint]]
  name = "edge"
  target = {{ address = "127.0.1.10" }}
  priority = 1
  [[profile.endpoint]]
  name = "region"
  target = {{ address = "127.0.2.10" }}
  priority = 2
"#
        ),
    );
    let mut up = Up::start(&topology, api, &[]);
    let answer = move || testkit::dig(dns, "www.shop.test", &[]);
    let wait_answer = |want: &'static str, deadline: u64| async move {
        eventually(
            Duration::from_secs(deadline),
            &format!("answer {want}"),
            || async { (answer() == Some(vec![want.to_string()])).then_some(()) },
        )
        .await;
    };
    wait_status(&up, "profile/www/edge", "Online").await;
    wait_status(&up, "profile/www/region", "Online").await;
    assert_eq!(answer(), Some(vec!["127.0.1.10".to_string()]));
    assert_eq!(
        testkit::dig(dns, "www.shop.test", &["+tcp"]),
        Some(vec!["127.0.1.10".to_string()])
    );

    edge.kill().await;
    let stopped = tokio::time::Instant::now();
    wait_answer("127.0.2.10", 10).await;
    let failover = stopped.elapsed();
    let dns_events: Vec<Value> = recent_events(api)
        .await
        .into_iter()
        .filter(|e| e["source"] == "dns")
        .collect();
    let moved = dns_events.last().unwrap();
    assert_eq!(moved["message"], "edge -> region: edge Online -> Degraded");
    let health = recent_events(api).await;
    let degraded = health
        .iter()
        .rfind(|e| e["subject"] == "profile/www/edge" && e["kind"] == "Degraded")
        .unwrap();
    assert_eq!(
        degraded["message"],
        "Online -> Degraded: 2 failures in a row, last: connection refused"
    );

    let resumed = tokio::time::Instant::now();
    edge.resume().await;
    wait_status(&up, "profile/www/edge", "Online").await;
    assert_eq!(
        answer(),
        Some(vec!["127.0.2.10".to_string()]),
        "held after recovery"
    );
    wait_answer("127.0.1.10", 10).await;
    let failback = resumed.elapsed();
    // The hold, by the server's own clock: from the edge's return to Online to the answer's
    // move back.
    let events = recent_events(api).await;
    let at = |e: &Value| humantime::parse_rfc3339(e["at"].as_str().unwrap()).unwrap();
    let online = events
        .iter()
        .rfind(|e| e["subject"] == "profile/www/edge" && e["kind"] == "Online")
        .map(at)
        .unwrap();
    let back = events
        .iter()
        .rfind(|e| {
            e["source"] == "dns"
                && e["message"]
                    .as_str()
                    .unwrap()
                    .starts_with("region -> edge:")
        })
        .map(at)
        .unwrap();
    let held = back.duration_since(online).unwrap();
    assert!(
        held >= Duration::from_secs(2),
        "failback after {held:?}, before the 2 s hold"
    );
    eprintln!(
        "measured: failover {failover:?} (tolerated 1, interval 100ms); failback {failback:?} (rise 2, hold 2s; held {held:?})"
    );

    // The operator's switch takes effect before the command returns.
    let out = run(tandem().args([
        "endpoint",
        "disable",
        "www",
        "edge",
        "--api",
        &api.to_string(),
    ]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("www now answers: A 127.0.2.10"));
    assert_eq!(answer(), Some(vec!["127.0.2.10".to_string()]));
    let out = run(tandem().args([
        "endpoint",
        "disable",
        "www",
        "nope",
        "--api",
        &api.to_string(),
    ]));
    assert_eq!(out.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("profile \"www\" has no endpoint \"nope\"")
    );
    let out = run(tandem().args([
        "endpoint",
        "enable",
        "www",
        "edge",
        "--api",
        &api.to_string(),
    ]));
    assert!(out.status.success());

    let status = up.status().unwrap();
    assert_eq!(status["profiles"][0]["name"], "www");
    // Failover, failback, disable (and maybe the re-enabled edge's failback): the counter
    // counts every change of answer the events show, read together until they agree.
    eventually(
        Duration::from_secs(10),
        "answer changes counted",
        || async {
            let before = recent_events(api).await;
            let metrics = http_get(api, "/metrics").await;
            let after = recent_events(api).await;
            let changes = |ev: &[Value]| ev.iter().filter(|e| e["source"] == "dns").count();
            let n = changes(&after);
            let line = format!("tandem_dns_answer_changes_total{{profile=\"www\"}} {n}");
            (changes(&before) == n && n >= 3 && metrics.contains(&line)).then_some(())
        },
    )
    .await;
    let metrics = http_get(api, "/metrics").await;
    let tcp = "tandem_dns_responses_total{transport=\"tcp\",rcode=\"NOERROR\"} 1";
    assert!(metrics.contains(tcp), "{tcp} not in:\n{metrics}");

    assert!(up.terminate().success());
    assert!(std::net::UdpSocket::bind(dns).is_ok(), "DNS UDP port freed");
    assert!(
        std::net::TcpListener::bind(dns).is_ok(),
        "DNS TCP port freed"
    );
}

/// A load balancer run by `tandem up`: HTTP through its frontend reaches both backends, a
/// backend killed mid-loop costs no request, `tandem backend drain` stops new flows to one
/// backend at once, and `tandem status` shows the balancer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_balancer_through_tandem_up() {
    let mut a = HttpServer::start_on("127.0.5.11:0".parse().unwrap()).await;
    let port = a.addr.port();
    a.set(Behaviour::Answer(200, "a".into()));
    let b = HttpServer::start_on(format!("127.0.5.12:{port}").parse().unwrap()).await;
    b.set(Behaviour::Answer(200, "b".into()));
    let front: SocketAddr = (
        [127, 0, 5, 1],
        testkit::free_udp_tcp_port([127, 0, 5, 1].into()),
    )
        .into();
    let api = testkit::closed_port();
    let dir = tempfile::tempdir().unwrap();
    let topology = topology_file(
        dir.path(),
        api,
        &format!(
            r#"[[site]]
name = "edge"
role = "edge"
[[monitor]]
name = "web"
protocol = "http"
port = {port}
interval = "200ms"
timeout = "150ms"
[[load_balancer]]
name = "edge-web"
site = "edge"
frontend = "{front}"
pool = {{ addresses = ["{a}", "{b}"] }}
probe = "web"
"#,
            a = a.addr,
            b = b.addr
        ),
    );
    let mut up = Up::start(&topology, api, &[]);
    wait_status(&up, &health::backend_id("edge-web", a.addr), "Online").await;
    wait_status(&up, &health::backend_id("edge-web", b.addr), "Online").await;
    let body = |resp: String| resp.rsplit("\r\n\r\n").next().unwrap_or("").to_string();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..40 {
        seen.insert(body(http_get(front, "/").await));
    }
    assert_eq!(seen.len(), 2, "both backends answer: {seen:?}");

    a.kill().await;
    for i in 0..100 {
        assert_eq!(
            body(http_get(front, "/").await),
            "b",
            "request {i} after a died"
        );
    }
    a.resume().await;
    wait_status(&up, &health::backend_id("edge-web", a.addr), "Online").await;

    let out = run(tandem().args([
        "backend",
        "drain",
        "edge-web",
        &b.addr.to_string(),
        "--api",
        &api.to_string(),
    ]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("draining"));
    // With b in rotation about half would answer "b"; b's probes continue, so its request
    // count is no measure.
    for _ in 0..20 {
        assert_eq!(
            body(http_get(front, "/").await),
            "a",
            "a drained backend takes no new flows"
        );
    }
    let out = run(tandem().args([
        "backend",
        "drain",
        "edge-web",
        "127.9.9.9:1",
        "--api",
        &api.to_string(),
    ]));
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no backend 127.9.9.9:1"));

    let table = run(tandem().args(["status", "--api", &api.to_string()]));
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("LOAD BALANCER"), "{table}");
    assert!(table.contains("Online draining"), "{table}");
    let events = recent_events(api).await;
    assert!(
        events
            .iter()
            .any(|e| e["source"] == "lb" && e["kind"] == "ejected"),
        "{events:?}"
    );
    assert!(up.terminate().success());
}

/// `[tandem] tokens`: the CLI sends the token from `TANDEM_TOKEN` or `--token`; without one a
/// read is refused (401), with a read token a change is refused (403), with an admin token it
/// goes through. A tokens file that cannot be read stops `tandem up` with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_carries_the_api_token() {
    let dir = tempfile::tempdir().unwrap();
    let api = testkit::closed_port();
    // SHA-256 of "read-secret" and "admin-secret".
    std::fs::write(
        dir.path().join("tokens.toml"),
        "[[token]]\nname = \"grafana\"\nrole = \"read\"\nsha256 = \"f0fd6c09405cb6d3707d04067d8509cb924e62ae66fa02067c2bc467b0d721e4\"\n\n[[token]]\nname = \"ops\"\nrole = \"admin\"\nsha256 = \"16175223c8ddce5ace0493c948569c211b03c4c6bb3d3e484434999448cffe01\"\n",
    )
    .unwrap();
    let write = |tokens: &str| {
        let file = dir.path().join("topology.toml");
        std::fs::write(
            &file,
            format!(
                r#"[tandem]
api = "{api}"
state_dir = "{state}"
tokens = "{tokens}"

[dns]
listen = ["127.0.0.1:0"]
[[dns.zone]]
name = "shop.test"
nameservers = [{{ name = "ns1.shop.test", address = "127.0.0.1" }}]
hostmaster = "hostmaster.shop.test"

[[site]]
name = "edge"
role = "edge"

[[monitor]]
name = "web"
protocol = "tcp"
port = 9
interval = "10s"

[[profile]]
name = "www"
domain = "www.shop.test"
routing = "priority"
monitor = "web"
  [[profile.endpoint]]
  name = "edge"
  target = {{ address = "127.0.0.1" }}
  priority = 1
"#,
                state = dir.path().join("state").display(),
                tokens = dir.path().join(tokens).display(),
            ),
        )
        .unwrap();
        file
    };

    // A tokens file that is not there.
    let out = run(tandem()
        .arg("up")
        .arg(write("missing.toml"))
        .arg("--no-console"));
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot read the tokens file"), "{err}");

    let file = write("tokens.toml");
    let _up = Up::start(&file, api, &[]);
    let api_arg = api.to_string();
    let as_who = |token: Option<&str>, args: &[&str]| {
        let mut cmd = tandem();
        cmd.args(args)
            .args(["--api", &api_arg])
            .env_remove("TANDEM_TOKEN");
        if let Some(t) = token {
            cmd.env("TANDEM_TOKEN", t);
        }
        run(&mut cmd)
    };
    let status = eventually(Duration::from_secs(10), "the API answering", || async {
        let out = as_who(Some("read-secret"), &["status"]);
        out.status.success().then_some(out)
    })
    .await;
    assert!(String::from_utf8_lossy(&status.stdout).contains("www"));
    let out = as_who(None, &["status"]);
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs a token"), "{err}");
    let out = as_who(Some("read-secret"), &["drill", "outage", "edge"]);
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("may only read"), "{err}");
    let out = as_who(
        None,
        &["--token", "admin-secret", "drill", "outage", "edge"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `TANDEM_LOG_FORMAT=json`: every log line is one JSON object, for journald and log shippers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_can_be_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let api = testkit::closed_port();
    let file = topology_file(
        dir.path(),
        api,
        r#"
[dns]
listen = ["127.0.0.1:0"]
[[dns.zone]]
name = "shop.test"
nameservers = [{ name = "ns1.shop.test", address = "127.0.0.1" }]
hostmaster = "hostmaster.shop.test"
"#,
    );
    let mut up = Up::start(
        &file,
        api,
        &[("TANDEM_LOG_FORMAT", "json"), ("TANDEM_LOG", "info")],
    );
    eventually(Duration::from_secs(10), "the API answering", || async {
        up.status()
    })
    .await;
    assert!(up.terminate().success());
    let log = std::fs::read_to_string(up.log.as_ref().unwrap()).unwrap();
    let lines: Vec<Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .all(|l| l["level"].is_string() && l["timestamp"].is_string()),
        "{log}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "shutting down"),
        "{log}"
    );
}
