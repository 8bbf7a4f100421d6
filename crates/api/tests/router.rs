//! The API over a real socket, with a health engine, DNS tables and the intent records behind
//! it: errors name the field with the right status, one drill runs at a time, `/metrics`
//! is well-formed Prometheus text, tokens guard reads and changes, the event stream (SSE)
//! delivers events live and resumes after `Last-Event-ID`, and the dashboard's files are
//! served with their content types.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOPOLOGY: &str = r#"
[dns]
listen = ["127.0.0.1:0"]
[[dns.zone]]
name = "shop.test"
nameservers = ["ns1.shop.test"]
hostmaster = "hostmaster.shop.test"

[[site]]
name = "edge"
role = "edge"
[[site]]
name = "region"
role = "region"

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
  target = { address = "127.0.0.1" }
  priority = 1

# A load balancer of the edge, which this process does not run.
[[load_balancer]]
name = "edge-static"
site = "edge"
frontend = "127.0.0.2:18079"
pool = { addresses = ["127.0.0.1:18080"] }
"#;

/// Serves the API of a process that runs site `region` only (so drills of `edge` are recorded
/// without waiting for this process to apply them). A stand-in for the node's intent applier
/// applies drills of `edge` to an empty site, so they raise their events.
async fn serve() -> SocketAddr {
    serve_with(None).await
}

/// As [`serve`], with bearer tokens required.
async fn serve_with(tokens: Option<api::auth::Tokens>) -> SocketAddr {
    serve_full(tokens, None, "127.0.0.1:0".parse().unwrap()).await
}

/// As [`serve`], with tokens and TLS as given.
async fn serve_full(
    tokens: Option<api::auth::Tokens>,
    tls: Option<api::tls::ApiTls>,
    bind: SocketAddr,
) -> SocketAddr {
    serve_limited(tokens, tls, bind, api::limit::Limits::default()).await
}

/// As [`serve_full`], within `limits`.
async fn serve_limited(
    tokens: Option<api::auth::Tokens>,
    tls: Option<api::tls::ApiTls>,
    bind: SocketAddr,
    limits: api::limit::Limits,
) -> SocketAddr {
    let topology = match model::parse(model::Source::new("t.toml", TOPOLOGY)) {
        Ok(t) => Arc::new(t),
        Err(d) => panic!("{}", d.render()),
    };
    let engine = Arc::new(
        health::Engine::start(
            health::targets(&topology),
            &topology.monitors,
            health::Options::default(),
        )
        .unwrap(),
    );
    let store: Arc<dyn store::Store> = Arc::new(store::Embedded::in_memory());
    let intents = cluster::Intents::start(store.clone(), "local");
    let drills = orchestrator::Drills::new(vec![orchestrator::Site {
        databases: Vec::new(),
        name: "edge".into(),
        frontends: Vec::new(),
        scale_sets: Vec::new(),
    }]);
    let events = api::EventLog::new(None);
    events.follow(drills.events());
    {
        let (intents, drills) = (intents.clone(), drills.clone());
        tokio::spawn(async move {
            let mut changes = intents.subscribe();
            loop {
                let drill = intents.current().drill.map(|(d, _)| orchestrator::Drill {
                    kind: d.kind,
                    site: d.site,
                    started: d.started,
                    ends: d.ends,
                });
                drills.apply(drill.as_ref(), std::time::SystemTime::now());
                if changes.changed().await.is_err() {
                    return;
                }
            }
        });
    }
    let api = api::Api {
        topology: topology.clone(),
        node: None,
        site: Some("region".into()),
        store: store.clone(),
        topology_hash: "0".repeat(64),
        engine: engine.clone(),
        dns: Some(dns::manager::Manager::new(topology, engine).unwrap()),
        // As a node serving DNS (its listener is not started here).
        dns_listen: vec!["127.0.0.1:53".parse().unwrap()],
        load_balancers: Vec::new(),
        scale_sets: Vec::new(),
        databases: Vec::new(),
        drills,
        apps: Vec::new(),
        intents,
        reload: None,
        events,
        tokens: tokens.map(Arc::new),
        tls: tls.map(Arc::new),
    };
    let listener = tokio::net::TcpListener::bind(bind).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(api::serve_with_limits(
        listener,
        api,
        limits,
        std::future::pending(),
    ));
    addr
}

/// One request; the status and the body.
async fn call(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let (status, _, body) = call_as(addr, method, path, body, None).await;
    (status, body)
}

/// One request with `Authorization: Bearer TOKEN` when given; status, head and body.
async fn call_as(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    token: Option<&str>,
) -> (u16, String, String) {
    let talk = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        let req = format!(
            "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    };
    let out = tokio::time::timeout(Duration::from_secs(10), talk)
        .await
        .expect("the API answers within 10 s");
    let status = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (status, head.to_string(), body.to_string())
}

/// A tokens file with a read token and an admin token (only their SHA-256 in it).
fn tokens(dir: &std::path::Path, open_reads: bool) -> api::auth::Tokens {
    use sha2::Digest;
    let hex = |s: &str| {
        sha2::Sha256::digest(s.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let path = dir.join("tokens.toml");
    std::fs::write(
        &path,
        format!(
            "[[token]]\nname = \"grafana\"\nrole = \"read\"\nsha256 = \"{}\"\n\n[[token]]\nname = \"ops\"\nrole = \"admin\"\nsha256 = \"{}\"\n",
            hex("read-secret"),
            hex("admin-secret")
        ),
    )
    .unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(!text.contains("secret"), "no secret in the file");
    api::auth::Tokens::load(&path, open_reads).unwrap()
}

/// With `[tandem] tokens`: a change needs an admin token, a read a read token (unless reads
/// are open), `/healthz` none. 401 says how to send one (with RFC 6750's `WWW-Authenticate`),
/// 403 names the token; both name the field `authorization`.
#[tokio::test]
async fn tokens_guard_reads_and_changes() {
    let dir = tempfile::tempdir().unwrap();
    let api = serve_with(Some(tokens(dir.path(), false))).await;
    let outage = r#"{"site": "edge", "for": "60s"}"#;
    let cases = [
        ("GET", "/healthz", "", None, 200),
        ("GET", "/v1/nodes", "", None, 401),
        ("GET", "/v1/nodes", "", Some("wrong"), 401),
        ("GET", "/v1/nodes", "", Some("read-secret"), 200),
        ("GET", "/metrics", "", Some("read-secret"), 200),
        ("GET", "/v1/nodes", "", Some("admin-secret"), 200),
        ("GET", "/v1/events/stream", "", None, 401),
        ("GET", "/", "", None, 200),
        ("GET", "/assets/app.js", "", None, 200),
        ("POST", "/v1/drills/outage", outage, None, 401),
        (
            "POST",
            "/v1/drills/outage",
            outage,
            Some("read-secret"),
            403,
        ),
        (
            "POST",
            "/v1/drills/outage",
            outage,
            Some("admin-secret"),
            200,
        ),
        ("POST", "/v1/drills/stop", "", Some("admin-secret"), 200),
    ];
    for (method, path, body, token, want) in cases {
        let (status, head, text) = call_as(api, method, path, body, token).await;
        assert_eq!(status, want, "{method} {path} as {token:?}: {text}");
        if status == 401 || status == 403 {
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["field"], "authorization", "{v}");
        }
        if status == 401 {
            assert!(
                head.to_ascii_lowercase()
                    .contains("www-authenticate: bearer"),
                "{head}"
            );
            assert!(text.contains("TANDEM_TOKEN"), "{text}");
        }
        if status == 403 {
            let v: Value = serde_json::from_str(&text).unwrap();
            let error = v["error"].as_str().unwrap();
            assert!(error.contains("\"grafana\""), "{error}");
        }
    }
    // Open reads: reads need no token, changes still do.
    let open = serve_with(Some(tokens(dir.path(), true))).await;
    assert_eq!(call_as(open, "GET", "/v1/nodes", "", None).await.0, 200);
    assert_eq!(
        call_as(open, "POST", "/v1/drills/stop", "", None).await.0,
        401
    );
    // A file with no token, or a malformed hash, is refused with the reason.
    let empty = dir.path().join("empty.toml");
    std::fs::write(&empty, "").unwrap();
    let e = api::auth::Tokens::load(&empty, false).unwrap_err();
    assert!(e.contains("no [[token]]"), "{e}");
    std::fs::write(
        &empty,
        "[[token]]\nname = \"x\"\nrole = \"admin\"\nsha256 = \"12\"\n",
    )
    .unwrap();
    let e = api::auth::Tokens::load(&empty, false).unwrap_err();
    assert!(e.contains("64 hex digits"), "{e}");
}

/// The status line of one request, read without waiting for the body (a stream may never end).
async fn status_as(addr: SocketAddr, method: &str, path: &str, token: Option<&str>) -> u16 {
    let talk = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n") && s.read(&mut byte).await.unwrap() == 1 {
            head.push(byte[0]);
        }
        String::from_utf8(head).unwrap()
    };
    let line = tokio::time::timeout(Duration::from_secs(10), talk)
        .await
        .expect("the API answers within 10 s");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Walks every route the router has (`api::routes`), so a new one cannot slip past the tokens:
/// without a token each is refused (401), a read token is refused every change (403), the admin
/// token is refused nothing; only `/healthz` and the dashboard's static files are open.
#[tokio::test]
async fn every_route_is_guarded_by_the_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let api = serve_with(Some(tokens(dir.path(), false))).await;
    let routes = api::routes();
    assert!(routes.len() >= 21, "{} routes", routes.len());
    for (method, pattern, _) in routes {
        // `{param}` segments get a value no resource has: the check comes before the lookup.
        let path = pattern
            .split('/')
            .map(|seg| if seg.starts_with('{') { "x" } else { seg })
            .collect::<Vec<_>>()
            .join("/");
        let m = method.as_str();
        let change = method != axum::http::Method::GET;
        let anonymous = status_as(api, m, &path, None).await;
        let read = status_as(api, m, &path, Some("read-secret")).await;
        let admin = status_as(api, m, &path, Some("admin-secret")).await;
        // `/healthz` and the dashboard's static files (no data in them) are open.
        if ["/healthz", "/", "/assets/{*path}"].contains(&pattern) {
            for status in [anonymous, read, admin] {
                assert!(![401, 403].contains(&status), "{m} {pattern}: {status}");
            }
            continue;
        }
        assert_eq!(anonymous, 401, "{m} {pattern} without a token");
        if change {
            assert_eq!(read, 403, "{m} {pattern} with a read token");
        } else {
            assert!(![401, 403].contains(&read), "{m} {pattern} read: {read}");
        }
        assert!(![401, 403].contains(&admin), "{m} {pattern} admin: {admin}");
    }
}

/// The status and the `field` of an error answer.
async fn refused(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let (status, text) = call(addr, method, path, body).await;
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}: {text}"));
    assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    (status, v["field"].as_str().unwrap().to_string())
}

/// A drain of a load balancer that no node answering runs is stored, with a warning that
/// the address was not checked; an enable only clears an intent.
#[tokio::test]
async fn drains_of_a_load_balancer_run_elsewhere_are_stored_unchecked_with_a_warning() {
    let api = serve().await;
    let (status, body) = call(
        api,
        "POST",
        "/v1/load-balancers/edge-static/backends/127.0.0.1:18081/drain",
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("127.0.0.1:18081 not checked"), "{body}");
    let (status, body) = call(
        api,
        "POST",
        "/v1/load-balancers/edge-static/backends/127.0.0.1:18081/enable",
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(!body.contains("not checked"), "{body}");
}

#[tokio::test]
async fn errors_name_the_field_with_the_right_status() {
    let api = serve().await;
    let cases = [
        ("POST", "/v1/drills/outage", "not json", 400, "site"),
        (
            "POST",
            "/v1/drills/outage",
            r#"{"site": "mars"}"#,
            404,
            "site",
        ),
        (
            "POST",
            "/v1/drills/outage",
            r#"{"site": "edge", "for": "soon"}"#,
            400,
            "for",
        ),
        ("POST", "/v1/drills/stop", "", 409, "drill"),
        (
            "POST",
            "/v1/profiles/nope/endpoints/edge/disable",
            "",
            404,
            "profile",
        ),
        (
            "POST",
            "/v1/profiles/www/endpoints/nope/disable",
            "",
            404,
            "endpoint",
        ),
        (
            "POST",
            "/v1/profiles/www/endpoints/edge/explode",
            "",
            404,
            "action",
        ),
        (
            "POST",
            "/v1/load-balancers/nope/backends/127.0.0.1:80/drain",
            "",
            404,
            "lb",
        ),
        (
            "POST",
            "/v1/scale-sets/nope/scale",
            r#"{"capacity": 1}"#,
            404,
            "set",
        ),
        (
            "POST",
            "/v1/databases/nope/switchover",
            r#"{"to": "edge"}"#,
            404,
            "db",
        ),
        ("POST", "/v1/reload", "", 404, "reload"),
    ];
    for (method, path, body, status, field) in cases {
        assert_eq!(
            refused(api, method, path, body).await,
            (status, field.to_string()),
            "{method} {path} {body}"
        );
    }
    assert_eq!(call(api, "GET", "/healthz", "").await, (200, "ok\n".into()));
}

#[tokio::test]
async fn one_drill_runs_at_a_time() {
    let api = serve().await;
    let (status, body) = call(
        api,
        "POST",
        "/v1/drills/outage",
        r#"{"site": "edge", "for": "90s"}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["drill"]["site"], "edge", "{v}");

    let (status, body) = call(api, "POST", "/v1/drills/outage", r#"{"site": "region"}"#).await;
    assert_eq!(status, 409, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["field"], "site");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("a drill of site edge is already running"),
        "{v}"
    );

    let (_, body) = call(api, "GET", "/v1/drills", "").await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["drill"]["site"], "edge", "{v}");
    assert_eq!(call(api, "POST", "/v1/drills/stop", "").await.0, 200);
    let (_, body) = call(api, "GET", "/v1/drills", "").await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(v["drill"].is_null(), "{v}");
    // Stopped, another may start.
    let (status, body) = call(api, "POST", "/v1/drills/outage", r#"{"site": "edge"}"#).await;
    assert_eq!(status, 200, "{body}");
}

/// Every sample belongs to a family announced once, by HELP then TYPE, before it; samples are
/// `name{label="value",…} number`.
#[tokio::test]
async fn metrics_are_well_formed_prometheus_text() {
    let api = serve().await;
    let (status, text) = call(api, "GET", "/metrics", "").await;
    assert_eq!(status, 200);
    let mut families: BTreeMap<String, String> = BTreeMap::new();
    let mut last_help = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap();
            assert!(!families.contains_key(name), "{name} announced twice");
            last_help = Some(name.to_string());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert_eq!(
                last_help.as_deref(),
                Some(name),
                "TYPE without HELP: {line}"
            );
            assert!(["gauge", "counter"].contains(&kind), "{line}");
            families.insert(name.to_string(), kind.to_string());
        } else {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let name = series.split('{').next().unwrap();
            let kind = families
                .get(name)
                .unwrap_or_else(|| panic!("sample before its TYPE: {line}"));
            assert!(value.parse::<f64>().is_ok(), "{line}");
            assert_eq!(kind == "counter", name.ends_with("_total"), "{line}");
            if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
                let inner = labels.strip_prefix('{').and_then(|l| l.strip_suffix('}'));
                let inner = inner.unwrap_or_else(|| panic!("{line}"));
                for pair in inner.split("\",") {
                    let (k, v) = pair.split_once("=\"").unwrap_or_else(|| panic!("{line}"));
                    assert!(
                        k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                        "{line}"
                    );
                    assert!(!v.trim_end_matches('"').contains('"'), "{line}");
                }
            }
        }
    }
    for name in [
        "tandem_build_info",
        "tandem_health_target_up",
        "tandem_dns_responses_total",
        "tandem_dns_endpoint_answered",
    ] {
        assert!(families.contains_key(name), "{name} missing:\n{text}");
    }
    assert!(
        text.contains("tandem_health_target_status{target=\"profile/www/edge\",monitor=\"web\",status=\"CheckingEndpoint\"} 1"),
        "{text}"
    );
}

/// `GET path` over TLS, trusting `ca`: the status and body, or the error of the handshake.
async fn get_tls(
    addr: SocketAddr,
    ca: &std::path::Path,
    path: &str,
) -> Result<(u16, String), String> {
    let config = api::tls::client_config(ca)?;
    let talk = async {
        let mut s = api::tls::connect(addr, &config)
            .await
            .map_err(|e| e.to_string())?;
        let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        let status = out
            .split_whitespace()
            .nth(1)
            .unwrap_or("0")
            .parse()
            .unwrap_or(0);
        let body = out
            .split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .to_string();
        Ok((status, body))
    };
    tokio::time::timeout(Duration::from_secs(10), talk)
        .await
        .expect("the API answers within 10 s")
}

/// With `tls_cert` and `tls_key` the API speaks only TLS: a client trusting its CA is answered;
/// one trusting another CA, or reaching an address the certificate does not name, is refused
/// in the handshake; plain HTTP gets no answer. A silent client does not hold up the others.
#[tokio::test]
async fn the_api_over_tls_answers_only_verified_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = testkit::pki::Pki::new(&dir.path().join("pki"), "tandem test CA");
    // The certificate names 127.0.0.1 only.
    let issued = pki.issue("node", &["127.0.0.1"]);
    let tls = api::tls::ApiTls::load(&issued.cert, &issued.key, Some(&pki.ca())).unwrap();
    assert!(tls.client.is_some());
    let api = serve_full(None, Some(tls.clone()), "127.0.0.1:0".parse().unwrap()).await;

    // A client that connects and says nothing, left open through the rest of the test.
    let _silent = tokio::net::TcpStream::connect(api).await.unwrap();
    let (status, body) = get_tls(api, &pki.ca(), "/v1/nodes").await.unwrap();
    assert_eq!(status, 200, "{body}");

    let other = testkit::pki::Pki::new(&dir.path().join("other"), "another CA");
    let e = get_tls(api, &other.ca(), "/v1/nodes").await.unwrap_err();
    assert!(e.to_lowercase().contains("certificate"), "{e}");

    let plain = async {
        let mut s = tokio::net::TcpStream::connect(api).await.unwrap();
        s.write_all(b"GET /v1/nodes HTTP/1.0\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        out
    };
    let out = tokio::time::timeout(Duration::from_secs(10), plain)
        .await
        .expect("a plain HTTP request is closed within 10 s");
    assert!(!out.starts_with(b"HTTP/"), "plain HTTP answered");

    // Served on 127.0.0.2 with a certificate for 127.0.0.1 only: the name does not match.
    let misnamed = serve_full(None, Some(tls), "127.0.0.2:0".parse().unwrap()).await;
    let e = get_tls(misnamed, &pki.ca(), "/v1/nodes").await.unwrap_err();
    assert!(e.to_lowercase().contains("certificate"), "{e}");

    // Files that do not hold what they should are named in the error.
    let e = api::tls::ApiTls::load(&issued.key, &issued.key, None).unwrap_err();
    assert!(
        e.contains("no PEM certificate") && e.contains("node-key.pem"),
        "{e}"
    );
    let e = api::tls::ApiTls::load(&issued.cert, &dir.path().join("nope.pem"), None).unwrap_err();
    assert!(e.contains("nope.pem"), "{e}");
}

/// A live `GET /v1/events/stream`: the response head, then SSE messages as they come.
struct Stream {
    s: tokio::net::TcpStream,
    buf: String,
}

impl Stream {
    /// Opens the stream (HTTP/1.0: the body is the SSE text itself, unchunked) and reads the
    /// head; the status and the head.
    async fn open(
        addr: SocketAddr,
        token: Option<&str>,
        last_id: Option<&str>,
    ) -> (u16, String, Self) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        let last = last_id.map_or(String::new(), |i| format!("Last-Event-ID: {i}\r\n"));
        let req = format!(
            "GET /v1/events/stream HTTP/1.0\r\nHost: {addr}\r\nAccept: text/event-stream\r\n{auth}{last}\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut stream = Stream {
            s,
            buf: String::new(),
        };
        let head = stream.until("\r\n\r\n").await;
        let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        (status, head, stream)
    }

    /// The text up to `end` (excluded), read within 10 s.
    async fn until(&mut self, end: &str) -> String {
        let read = async {
            loop {
                if let Some(i) = self.buf.find(end) {
                    let text = self.buf[..i].to_string();
                    self.buf.drain(..i + end.len());
                    return text;
                }
                let mut chunk = [0u8; 4096];
                let n = self.s.read(&mut chunk).await.unwrap();
                assert!(n > 0, "the stream ended; read so far: {:?}", self.buf);
                self.buf.push_str(std::str::from_utf8(&chunk[..n]).unwrap());
            }
        };
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .unwrap_or_else(|_| panic!("nothing within 10 s; read so far: {:?}", self.buf))
    }

    /// The next message with data: its id and its data as JSON (comments are skipped).
    async fn next(&mut self) -> (Option<String>, Value) {
        loop {
            let block = self.until("\n\n").await;
            let mut id = None;
            let mut data = Vec::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    id = Some(v.trim().to_string());
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push(v.trim_start().to_string());
                } else {
                    assert!(line.starts_with(':'), "an SSE field or comment: {line:?}");
                }
            }
            if !data.is_empty() {
                return (id, serde_json::from_str(&data.join("\n")).unwrap());
            }
        }
    }

    /// The next message whose event has `kind`, skipping others.
    async fn next_kind(&mut self, kind: &str) -> (Option<String>, Value) {
        loop {
            let (id, e) = self.next().await;
            if e["kind"] == kind {
                return (id, e);
            }
        }
    }
}

/// `GET /v1/events/stream` needs a read token like every read, and then delivers an event the
/// moment it is recorded (an outage drill started by POST), as the same JSON `/v1/events`
/// lists, with an id; a stream opened with that id as `Last-Event-ID` replays what came after
/// it (the drill's end), and one with an id of another run does not.
#[tokio::test]
async fn events_stream_live_and_resume_after_last_event_id() {
    let dir = tempfile::tempdir().unwrap();
    let api = serve_with(Some(tokens(dir.path(), false))).await;
    let (status, _, _) = Stream::open(api, None, None).await;
    assert_eq!(status, 401);

    let (status, head, mut stream) = Stream::open(api, Some("read-secret"), None).await;
    assert_eq!(status, 200, "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/event-stream"),
        "{head}"
    );
    let started = tokio::time::Instant::now();
    let (status, body) = {
        let (s, _, b) = call_as(
            api,
            "POST",
            "/v1/drills/outage",
            r#"{"site": "edge", "for": "60s"}"#,
            Some("admin-secret"),
        )
        .await;
        (s, b)
    };
    assert_eq!(status, 200, "{body}");
    let (id, event) = stream.next_kind("outage-start").await;
    eprintln!(
        "outage-start on the stream {:?} after the POST began",
        started.elapsed()
    );
    assert_eq!(event["source"], "drill", "{event}");
    assert_eq!(event["subject"], "edge", "{event}");
    let id = id.expect("events carry an id");
    // The same JSON as the event log's.
    let (_, _, text) = call_as(api, "GET", "/v1/events", "", Some("read-secret")).await;
    let log: Value = serde_json::from_str(&text).unwrap();
    assert!(
        log["events"].as_array().unwrap().contains(&event),
        "{event} in {log}"
    );

    let (status, _, _) = call_as(api, "POST", "/v1/drills/stop", "", Some("admin-secret")).await;
    assert_eq!(status, 200);
    let (end_id, end) = stream.next_kind("outage-end").await;
    assert_eq!(end["subject"], "edge", "{end}");

    // Reconnecting after the start: the end is replayed, with the same id.
    let (status, _, mut resumed) = Stream::open(api, Some("read-secret"), Some(&id)).await;
    assert_eq!(status, 200);
    let (again_id, again) = resumed.next().await;
    assert_eq!((again_id, again), (end_id, end));

    // An id of another run (a restarted node) replays nothing: the next message is a new event.
    let (epoch, _) = id.split_once('-').unwrap();
    let other = format!("{}-1", epoch.parse::<u64>().unwrap() - 1);
    let (status, _, mut fresh) = Stream::open(api, Some("read-secret"), Some(&other)).await;
    assert_eq!(status, 200);
    let (status, _, _) = call_as(
        api,
        "POST",
        "/v1/drills/outage",
        r#"{"site": "edge", "for": "60s"}"#,
        Some("admin-secret"),
    )
    .await;
    assert_eq!(status, 200);
    let (_, first) = fresh.next().await;
    assert_eq!(first["kind"], "outage-start", "{first}");
}

/// The dashboard: `/` is the page, `/assets/…` its files with their content types, all
/// embedded; an unknown asset is 404.
#[tokio::test]
async fn dashboard_files_are_served_with_their_types() {
    let api = serve().await;
    let cases = [
        ("/", "text/html", "/assets/vendor/alpine.min.js"),
        ("/assets/app.js", "text/javascript", "/v1/events/stream"),
        ("/assets/style.css", "text/css", "x-cloak"),
        ("/assets/vendor/alpine.min.js", "text/javascript", "Alpine"),
        (
            "/assets/vendor/LICENSE-alpinejs.md",
            "text/plain",
            "MIT License",
        ),
    ];
    for (path, content_type, needle) in cases {
        let (status, head, body) = call_as(api, "GET", path, "", None).await;
        assert_eq!(status, 200, "{path}");
        let head = head.to_ascii_lowercase();
        assert!(
            head.contains(&format!("content-type: {content_type}")),
            "{path}: {head}"
        );
        assert!(head.contains("x-content-type-options: nosniff"), "{head}");
        assert!(body.contains(needle), "{path} lacks {needle:?}");
    }
    let (_, head, body) = call_as(api, "GET", "/", "", None).await;
    assert!(
        head.to_ascii_lowercase()
            .contains("content-security-policy: default-src 'none'"),
        "{head}"
    );
    assert!(
        !body.contains("http://") && !body.contains("https://"),
        "nothing from elsewhere"
    );
    assert_eq!(call(api, "GET", "/assets/nope.js", "").await.0, 404);
}

/// Reads until the peer closes (or errs); `None` if it is still open after `within`.
async fn closed_within(s: &mut tokio::net::TcpStream, within: Duration) -> Option<()> {
    let mut buf = [0u8; 64];
    tokio::time::timeout(within, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
}

/// At most `max_connections` at once: the next waits until one closes. A connection that says
/// nothing is closed after `idle_timeout`, so silent clients cannot hold the slots.
#[tokio::test]
async fn connections_are_bounded_and_idle_ones_closed() {
    use api::limit::Limits;
    let full = Limits {
        max_connections: 2,
        idle_timeout: Duration::from_secs(600),
    };
    let api = serve_limited(None, None, "127.0.0.1:0".parse().unwrap(), full).await;
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(tokio::net::TcpStream::connect(api).await.unwrap());
    }
    // Both slots are held: a third client is not served while they are.
    let third = tokio::spawn(async move { call(api, "GET", "/healthz", "").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !third.is_finished(),
        "a third connection was served beyond the limit"
    );
    silent.pop();
    let (status, _) = tokio::time::timeout(Duration::from_secs(10), third)
        .await
        .expect("served once a slot is free")
        .unwrap();
    assert_eq!(status, 200);

    // Idle connections are closed, with or without TLS.
    let idle = Limits {
        max_connections: 8,
        idle_timeout: Duration::from_secs(1),
    };
    let dir = tempfile::tempdir().unwrap();
    let pki = testkit::pki::Pki::new(&dir.path().join("pki"), "tandem test CA");
    let issued = pki.issue("node", &["127.0.0.1"]);
    let tls = api::tls::ApiTls::load(&issued.cert, &issued.key, Some(&pki.ca())).unwrap();
    for tls in [None, Some(tls)] {
        let api = serve_limited(None, tls, "127.0.0.1:0".parse().unwrap(), idle).await;
        let mut s = tokio::net::TcpStream::connect(api).await.unwrap();
        assert!(
            closed_within(&mut s, Duration::from_secs(10))
                .await
                .is_some(),
            "an idle connection stays open"
        );
    }
}

/// A change a browser sends from a page of another site is refused (CSRF), even with the API
/// open; the same change from the API's own page (its Origin is the Host), or from a client
/// that sends no Origin, reaches the handler.
#[tokio::test]
async fn changes_from_another_site_are_refused() {
    let api = serve().await;
    let send = |origin: Option<String>| async move {
        let mut s = tokio::net::TcpStream::connect(api).await.unwrap();
        let origin = origin.map_or(String::new(), |o| format!("Origin: {o}\r\n"));
        let req = format!(
            "POST /v1/drills/stop HTTP/1.0\r\nHost: {api}\r\n{origin}Content-Length: 0\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let status: u16 = out.split_whitespace().nth(1).unwrap().parse().unwrap();
        let body = out.split_once("\r\n\r\n").unwrap().1.to_string();
        (status, body)
    };
    for evil in [
        "http://evil.example",
        "null",
        &format!("http://{api}.evil.example"),
    ] {
        let (status, body) = send(Some(evil.to_string())).await;
        assert_eq!(status, 403, "{evil}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["field"], "origin", "{v}");
    }
    // No drill is running: the handler answers 409, so the request got through.
    assert_eq!(send(Some(format!("http://{api}"))).await.0, 409);
    assert_eq!(send(None).await.0, 409);
}
