//! What Tandem tells its operator, through the binary as users run it: where it listens,
//! every event from startup on, a drill in `status`, warnings for actions autoscale or an
//! empty pool will undo, reload answers that name what changed, logs once and without
//! colour in a file, and `--node` mistakes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::time::Duration;

use testkit::{Behaviour, HttpServer, eventually};

mod common;
use common::*;

fn topology(
    dir: &std::path::Path,
    api: std::net::SocketAddr,
    web: &HttpServer,
    front: std::net::SocketAddr,
    lb: std::net::SocketAddr,
    extra: &str,
) -> std::path::PathBuf {
    let port = web.addr.port();
    topology_file(
        dir,
        api,
        &format!(
            r#"
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
protocol = "http"
port = {port}
path = "/healthz"
interval = "200ms"
timeout = "150ms"
tolerated_failures = 1
recovery_successes = 1

[[profile]]
name = "www"
domain = "www.shop.test"
routing = "priority"
monitor = "web"
failback_hold = "10s"
  [[profile.endpoint]]
  name = "edge"
  target = {{ address = "127.0.0.1" }}
  priority = 1

[[load_balancer]]
name = "static"
site = "edge"
frontend = "{lb}"
pool = {{ addresses = ["127.0.0.1:{port}", "127.0.0.2:{port}"] }}
probe = "web"

[[load_balancer]]
name = "edge-web"
site = "edge"
frontend = "{front}"
pool = {{ scale_set = "web", port = "http" }}

[[scale_set]]
name = "web"
site = "edge"
command = ["tandem", "sample-app", "--listen", "{{address}}:{{port.http}}", "--site", "{{site}}"]
bind = "127.0.7.30"
ports = {{ http = "22000-22009" }}
capacity = {{ min = 1, max = 4, initial = 2 }}
  [[scale_set.autoscale]]
  metric = "cpu"
  above = 80
  change = "+1"
  window = "1m"
{extra}
"#
        ),
    )
}

/// The console, the logs, `status`, `scale`, `backend drain` and `reload` say what is true.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_output_tells_the_truth() {
    let dir = tempfile::tempdir().unwrap();
    let web = HttpServer::start_on("127.0.0.1:0".parse().unwrap()).await;
    let api = testkit::closed_port();
    let front: std::net::SocketAddr =
        format!("127.0.7.20:{}", testkit::free_tcp_port(&["127.0.7.20"]))
            .parse()
            .unwrap();
    let lb: std::net::SocketAddr =
        format!("127.0.7.21:{}", testkit::free_tcp_port(&["127.0.7.21"]))
            .parse()
            .unwrap();
    let file = topology(dir.path(), api, &web, front, lb, "");
    let out_path = dir.path().join("console.txt");
    let err_path = dir.path().join("tandem.log");
    // The console on (stdout a file), logs at warn as on a terminal.
    let child = tandem()
        .arg("up")
        .arg(&file)
        .env("TANDEM_LOG", "warn")
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut up = Up {
        child,
        api,
        log: Some(err_path.clone()),
    };
    let api_arg = api.to_string();
    let console = || std::fs::read_to_string(&out_path).unwrap_or_default();

    // Where everything listens, once, first.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let text = loop {
        let t = console();
        if t.matches("started pid").count() >= 2 {
            break t;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "both instances started within 20 s; the console:\n{t}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(text.starts_with("──── tandem listening ────"), "{text}");
    assert!(text.contains(&format!("api    http://{api}")), "{text}");
    assert!(text.contains("dns    127.0.0.1:"), "{text}");
    assert!(text.contains(&format!("lb     static tcp {lb}")), "{text}");
    assert!(
        text.contains(&format!("lb     edge-web tcp {front}")),
        "{text}"
    );
    assert_eq!(text.matches("──── tandem listening ────").count(), 1);
    // Every instance start, from the first moment on.
    assert_eq!(text.matches("started pid").count(), 2, "{text}");
    eventually(
        Duration::from_secs(10),
        "a first success, in words that agree",
        || async {
            console()
                .contains("CheckingEndpoint -> Online: 1 success in a row")
                .then_some(())
        },
    )
    .await;

    // A Degraded target: on the console, not again in the log (events log at info).
    web.set(Behaviour::Answer(503, String::new()));
    eventually(
        Duration::from_secs(10),
        "a Degraded event on the console",
        || async { console().contains("Online -> Degraded").then_some(()) },
    )
    .await;
    let log = std::fs::read_to_string(&err_path).unwrap();
    assert!(!log.contains("health changed"), "logged twice:\n{log}");
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a log file:\n{log}"
    );
    web.set(Behaviour::Answer(200, "ok".into()));

    // A drill shows in status and status --json.
    let out = run(tandem().args(["drill", "outage", "edge", "--for", "60s", "--api", &api_arg]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(tandem().args(["status", "--api", &api_arg]));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("OUTAGE (in progress)  edge"), "{table}");
    assert!(
        table.contains("STREAK") && !table.contains("OK/FAIL"),
        "{table}"
    );
    let json = up.status().unwrap();
    assert_eq!(json["drill"]["drill"]["site"], "edge", "{json:#}");
    // One drill at a time: a second is refused (exit 3) and says how to end the first.
    let out = run(tandem().args(["drill", "outage", "edge", "--api", &api_arg]));
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("a drill of site edge is already running; stop it first (tandem drill stop)"),
        "{err}"
    );
    // The static load balancer stopped answering for the drill; `drill stop` brings it back.
    assert!(
        std::net::TcpStream::connect(lb).is_err(),
        "{lb} answers in a drill"
    );
    let out = run(tandem().args(["drill", "stop", "--api", &api_arg]));
    assert!(out.status.success());
    let json = up.status().unwrap();
    assert!(json["drill"]["drill"].is_null());
    assert!(
        std::net::TcpStream::connect(lb).is_ok(),
        "{lb} does not answer after the drill"
    );
    let ended = wait_event(api, "outage drill ended early").await;
    assert_eq!(ended["kind"], "outage-end", "{ended}");
    let out = run(tandem().args(["drill", "stop", "--api", &api_arg]));
    assert_eq!(out.status.code(), Some(3), "stopping no drill");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no drill is running"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Manual scaling with autoscale rules: the reply says what they will do.
    let out = run(tandem().args(["scale", "web", "--to", "3", "--api", &api_arg]));
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning: web has autoscale rules (cpu above 80 over 1m -> +1)")
            && err.contains("will move the capacity away from 3"),
        "{err}"
    );

    // Draining the last backend taking new flows is said.
    eventually(
        Duration::from_secs(10),
        "both static backends Online",
        || async {
            let v = try_get_json(api, "/v1/load-balancers").await?;
            let lb = v["load_balancers"]
                .as_array()?
                .iter()
                .find(|l| l["name"] == "static")?
                .clone();
            (lb["backends"]
                .as_array()?
                .iter()
                .filter(|b| b["takes_new_flows"] == true)
                .count()
                == 1)
                .then_some(())
        },
    )
    .await;
    // 127.0.0.2 has nothing listening: 127.0.0.1 is the one backend taking flows.
    let out = run(tandem().args([
        "backend",
        "drain",
        "static",
        &format!("127.0.0.1:{}", web.addr.port()),
        "--api",
        &api_arg,
    ]));
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("was the last backend of static taking new flows"),
        "{err}"
    );

    // Reload: nothing changed; a change that needs a restart; a broken file.
    let out = run(tandem().args(["reload", "--api", &api_arg]));
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "no changes: the file is the running topology\n"
    );
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(
        &file,
        text.replace("failback_hold = \"10s\"", "failback_hold = \"20s\""),
    )
    .unwrap();
    // Asked again, the answer is the same: the change is still not in effect.
    for _ in 0..2 {
        let out = run(tandem().args(["reload", "--api", &api_arg]));
        assert!(out.status.success());
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "profile www: failback_hold changed: needs a restart\n"
        );
    }
    std::fs::write(
        &file,
        text.replace("routing = \"priority\"", "routing = \"priorty\""),
    )
    .unwrap();
    let out = run(tandem().args(["reload", "--api", &api_arg]));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("error[E008]: `routing` cannot be \"priorty\""),
        "{err}"
    );
    assert!(err.contains("keeping the running topology"), "{err}");

    // SIGHUP reloads as `tandem reload` does: a broken file is an event and changes nothing;
    // a good one applies the scale set's new definition.
    let hup = || {
        let pid = up.child.id().to_string();
        assert!(
            std::process::Command::new("kill")
                .args(["-HUP", &pid])
                .status()
                .unwrap()
                .success()
        );
    };
    hup();
    let failed = wait_event(api, "`routing` cannot be \"priorty\"").await;
    assert_eq!(failed["kind"], "reload-failed", "{failed}");
    std::fs::write(
        &file,
        text.replace(
            "capacity = { min = 1, max = 4, initial = 2 }",
            "capacity = { min = 1, max = 5, initial = 2 }",
        ),
    )
    .unwrap();
    hup();
    let reloaded = wait_event(api, "scale sets applied: web").await;
    assert_eq!(reloaded["kind"], "reloaded", "{reloaded}");
    eventually(
        Duration::from_secs(10),
        "web's max of 5 applied",
        || async {
            let v = try_get_json(api, "/v1/scale-sets").await?;
            let set = v["scale_sets"].as_array()?.first()?.clone();
            (set["max"] == 5).then_some(())
        },
    )
    .await;
    let out = run(tandem().args(["reload", "--api", &api_arg]));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "no changes: the file is the running topology\n"
    );

    // Every metric the README names outside databases, backups, apps and cluster mode is exported, with its
    // HELP and TYPE (those two are covered by the database and cluster tests).
    // (A sample of each: the CPU of an instance needs two readings, so wait a little.)
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let named = metric_names(&readme);
    assert!(named.len() > 25, "{named:?}");
    let here: Vec<&String> = named
        .iter()
        .filter(|n| !n.starts_with("tandem_db_") && !n.starts_with("tandem_cluster_"))
        // Backups and drills: covered by the backup tests.
        .filter(|n| !n.starts_with("tandem_backup_") && !n.starts_with("tandem_restore_drill_"))
        .filter(|n| *n != "tandem_store_writes_total")
        // Apps: covered by the app test.
        .filter(|n| !n.starts_with("tandem_app_"))
        .collect();
    let exported = |metrics: &str, name: &str| {
        metrics.contains(&format!("# TYPE {name} ")) && metrics.contains(&format!("\n{name}"))
    };
    let missing = eventually(Duration::from_secs(30), "every metric exported", || async {
        let metrics = http_get(api, "/metrics").await;
        here.iter().all(|n| exported(&metrics, n)).then_some(())
    });
    if tokio::time::timeout(Duration::from_secs(10), missing)
        .await
        .is_err()
    {
        let metrics = http_get(api, "/metrics").await;
        let absent: Vec<_> = here.iter().filter(|n| !exported(&metrics, n)).collect();
        panic!("in the README but not exported: {absent:?}\n{metrics}");
    }
    assert!(up.terminate().success());
}

/// Every `tandem_…` metric name in `text`.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("tandem_") && w.len() > "tandem_".len())
        .map(str::to_string)
        .collect()
}

/// `--node` mistakes: a name the topology lacks, and a topology with nodes but no `--node`.
#[test]
fn node_names_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("t.toml");
    std::fs::write(
        &file,
        r#"[cluster]
etcd = ["http://127.0.0.1:1"]
[[site]]
name = "edge"
role = "edge"
[[node]]
name = "edge-1"
site = "edge"
api = "127.0.0.1:7400"
"#,
    )
    .unwrap();
    let out = run(tandem()
        .arg("up")
        .arg(&file)
        .args(["--node", "edge-2", "--no-console"]));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no node \"edge-2\" in the topology; did you mean `edge-1`?"),
        "{err}"
    );
    let out = run(tandem().arg("up").arg(&file).arg("--no-console"));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("declares nodes: run one per machine with --node NAME (edge-1)"),
        "{err}"
    );
    let out = run(tandem()
        .arg("validate")
        .arg(&file)
        .args(["--node", "edge-2"]));
    assert_eq!(out.status.code(), Some(1));
    let out = run(tandem()
        .arg("validate")
        .arg(&file)
        .args(["--node", "edge-1"]));
    assert!(out.status.success());
}
