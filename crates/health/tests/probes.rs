//! Probers and the engine against real servers on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use health::{Destination, Engine, Failure, Options, Prober, Status, Target};
use model::Monitor;
use testkit::{Behaviour, HttpServer, closed_port, eventually};

/// A monitor read through the real topology parser.
fn monitor(settings: &str) -> Monitor {
    let text = format!("[[monitor]]\nname = \"m\"\n{settings}\n");
    match model::parse(model::Source::new("test.toml", text)) {
        Ok(t) => t.monitors[0].clone(),
        Err(d) => panic!("{}", d.render()),
    }
}

fn http(port: u16, extra: &str) -> Monitor {
    monitor(&format!(
        "protocol = \"http\"\nport = {port}\ninterval = \"100ms\"\ntimeout = \"80ms\"\n{extra}"
    ))
}

fn at(server: &HttpServer) -> Destination {
    Destination::Addr(server.addr)
}

#[tokio::test]
async fn http_success_sends_host_headers_and_a_fresh_connection_each_time() {
    let server = HttpServer::start().await;
    let m = http(
        server.addr.port(),
        "path = \"/healthz\"\nheaders = { Host = \"www.shop.test\", X-Probe = \"tandem\" }",
    );
    let p = Prober::new(&m).unwrap();
    for _ in 0..3 {
        let out = p.probe(&at(&server)).await;
        assert_eq!(out.result, Ok(()));
        assert!(out.latency > Duration::ZERO);
    }
    assert_eq!(server.requests(), 3, "one request per probe");
    let req = server.last_request().unwrap().to_ascii_lowercase();
    assert!(req.starts_with("get /healthz http/1.1\r\n"), "{req}");
    assert!(req.contains("host: www.shop.test\r\n"), "{req}");
    assert!(req.contains("x-probe: tandem\r\n"), "{req}");
    assert!(req.contains("connection: close\r\n"), "{req}");
}

#[tokio::test]
async fn http_failures_have_precise_reasons() {
    let server = HttpServer::start().await;
    let p = Prober::new(&http(server.addr.port(), "body = \"ready\"")).unwrap();

    server.set(Behaviour::Answer(503, "ready".into()));
    assert_eq!(
        p.probe(&at(&server)).await.result,
        Err(Failure::Status(503))
    );

    server.set(Behaviour::Answer(200, "starting".into()));
    assert_eq!(
        p.probe(&at(&server)).await.result,
        Err(Failure::BodyMismatch)
    );

    server.set(Behaviour::Answer(200, "all ready now".into()));
    assert_eq!(p.probe(&at(&server)).await.result, Ok(()));

    server.set(Behaviour::Hang);
    let out = p.probe(&at(&server)).await;
    assert_eq!(out.result, Err(Failure::Timeout(Duration::from_millis(80))));
    assert_eq!(out.result.unwrap_err().to_string(), "timeout after 80ms");

    let refused = Destination::Addr(closed_port());
    assert_eq!(p.probe(&refused).await.result, Err(Failure::Refused));
}

#[tokio::test]
async fn expected_status_ranges_are_honoured() {
    let server = HttpServer::start().await;
    server.set(Behaviour::Answer(301, String::new()));
    let strict = Prober::new(&http(server.addr.port(), "")).unwrap();
    assert_eq!(
        strict.probe(&at(&server)).await.result,
        Err(Failure::Status(301))
    );
    let lenient = Prober::new(&http(
        server.addr.port(),
        "expected_status = [\"200-299\", 301]",
    ))
    .unwrap();
    assert_eq!(lenient.probe(&at(&server)).await.result, Ok(()));
}

#[tokio::test]
async fn https_verifies_certificates_unless_told_not_to() {
    let (server, _pem) = HttpServer::start_tls().await;
    let port = server.addr.port();
    let base =
        format!("protocol = \"https\"\nport = {port}\ninterval = \"1s\"\ntimeout = \"500ms\"");

    let verifying = Prober::new(&monitor(&format!("{base}\nsni = \"localhost\""))).unwrap();
    match verifying.probe(&at(&server)).await.result {
        Err(Failure::Tls(reason)) => assert!(reason.contains("certificate"), "{reason}"),
        other => panic!("self-signed certificate accepted: {other:?}"),
    }

    let trusting = Prober::new(&monitor(&format!(
        "{base}\ntls_verify = false\nsni = \"localhost\""
    )))
    .unwrap();
    assert_eq!(trusting.probe(&at(&server)).await.result, Ok(()));
    assert_eq!(server.last_sni().as_deref(), Some("localhost"));
    assert!(server.last_request().unwrap().starts_with("GET / HTTP/1.1"));
}

#[tokio::test]
async fn tcp_probe_connects_only() {
    let server = HttpServer::start().await;
    let p = Prober::new(&monitor(&format!(
        "protocol = \"tcp\"\nport = {}\ninterval = \"1s\"\ntimeout = \"200ms\"",
        server.addr.port()
    )))
    .unwrap();
    assert_eq!(p.probe(&at(&server)).await.result, Ok(()));
    let refused = Destination::Addr(closed_port());
    assert_eq!(p.probe(&refused).await.result, Err(Failure::Refused));
}

async fn next_event(events: &mut tokio::sync::broadcast::Receiver<event::Event>) -> event::Event {
    tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .expect("a health event within 5s")
        .unwrap()
}

fn target(server: &HttpServer) -> Target {
    Target {
        id: "profile/www/edge".into(),
        monitor: "m".into(),
        destination: at(server),
        disabled: false,
    }
}

/// Online, then Degraded after exactly tolerated + 1 failures, then Online again after exactly
/// `recovery_successes`: the reasons carry the counts that caused each change.
#[tokio::test]
async fn engine_degrades_and_recovers_at_exact_thresholds() {
    for trouble in ["stop", "503", "hang"] {
        let mut server = HttpServer::start().await;
        let m = http(
            server.addr.port(),
            "tolerated_failures = 2\nrecovery_successes = 3",
        );
        let engine = Engine::start(vec![target(&server)], &[m], Options::default()).unwrap();
        let mut events = engine.events();
        let online = next_event(&mut events).await;
        assert_eq!(online.kind, "Online");
        assert!(
            online.message.starts_with("CheckingEndpoint -> Online: "),
            "{}",
            online.message
        );

        match trouble {
            "stop" => server.stop(),
            "503" => server.set(Behaviour::Answer(503, String::new())),
            _ => server.set(Behaviour::Hang),
        }
        let degraded = next_event(&mut events).await;
        assert_eq!(
            (degraded.subject.as_str(), degraded.kind.as_str()),
            ("profile/www/edge", "Degraded")
        );
        let expected = match trouble {
            "stop" => "Online -> Degraded: 3 failures in a row, last: connection refused",
            "503" => "Online -> Degraded: 3 failures in a row, last: status 503",
            _ => "Online -> Degraded: 3 failures in a row, last: timeout after 80ms",
        };
        assert_eq!(degraded.message, expected, "{trouble}");
        let report = engine.report("profile/www/edge").unwrap();
        assert_eq!(report.status, Status::Degraded);
        assert!(report.last_failure.is_some());

        match trouble {
            "stop" => server.resume().await,
            _ => server.set(Behaviour::Answer(200, "ok".into())),
        }
        let back = next_event(&mut events).await;
        assert_eq!(back.kind, "Online");
        assert!(
            back.message
                .starts_with("Degraded -> Online: 3 successes in a row"),
            "{}",
            back.message
        );
    }
}

#[tokio::test]
async fn disabled_targets_are_not_probed_and_subscribers_hear_of_changes() {
    let server = HttpServer::start().await;
    let m = http(server.addr.port(), "");
    let mut witness = target(&server);
    witness.id = "profile/www/witness".into();
    let engine = Engine::start(vec![target(&server), witness], &[m], Options::default()).unwrap();
    let mut version = engine.subscribe();
    eventually(Duration::from_secs(5), "Online", || async {
        (engine.status("profile/www/edge") == Some(Status::Online)).then_some(())
    })
    .await;
    assert!(version.has_changed().unwrap());
    version.mark_unchanged();

    assert_eq!(
        engine.set_disabled("profile/www/edge", true).unwrap(),
        Status::Disabled
    );
    assert!(version.has_changed().unwrap());
    let disabled_probes = engine.report("profile/www/edge").unwrap().probes;
    // While the other target is probed three more times, the disabled one is not probed at all.
    let witness_probes = engine.report("profile/www/witness").unwrap().probes;
    eventually(
        Duration::from_secs(5),
        "three more probes of the witness",
        || async {
            (engine.report("profile/www/witness").unwrap().probes >= witness_probes + 3)
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        engine.report("profile/www/edge").unwrap().probes,
        disabled_probes
    );

    assert_eq!(
        engine.set_disabled("profile/www/edge", false).unwrap(),
        Status::CheckingEndpoint
    );
    eventually(Duration::from_secs(5), "Online again", || async {
        (engine.status("profile/www/edge") == Some(Status::Online)).then_some(())
    })
    .await;
    assert!(engine.set_disabled("nope", true).is_err());
}

#[tokio::test]
async fn targets_follow_the_topology() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/two-site.toml");
    let t = model::load(std::path::Path::new(path)).unwrap();
    let targets = health::targets(&t);
    let ids: Vec<&str> = targets.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(ids, ["profile/www/edge", "profile/www/region"]);
    assert_eq!(
        targets[0].destination,
        Destination::Addr("127.0.1.10:8080".parse().unwrap())
    );
}

/// Scale-set instances come and go while the engine runs: an added target is probed and
/// reported, a removed one is neither, and both bump the change counter.
#[tokio::test]
async fn targets_can_be_added_and_removed_while_running() {
    let server = HttpServer::start().await;
    let m = http(server.addr.port(), "");
    let engine = Engine::start(vec![], &[m], Options::default()).unwrap();
    let mut version = engine.subscribe();
    engine.add(target(&server)).unwrap();
    assert!(version.has_changed().unwrap());
    assert!(matches!(
        engine.add(target(&server)),
        Err(health::engine::Error::DuplicateTarget(_))
    ));
    let mut other = target(&server);
    other.monitor = "missing".into();
    other.id = "x".into();
    assert!(matches!(
        engine.add(other),
        Err(health::engine::Error::UnknownMonitor { .. })
    ));
    eventually(Duration::from_secs(5), "Online", || async {
        (engine.status("profile/www/edge") == Some(Status::Online)).then_some(())
    })
    .await;
    version.mark_unchanged();
    let before = server.requests();
    assert!(engine.remove("profile/www/edge"));
    assert!(version.has_changed().unwrap());
    assert!(!engine.remove("profile/www/edge"));
    assert_eq!(engine.status("profile/www/edge"), None);
    assert!(engine.reports().is_empty());
    // A witness target on the same server shows probing goes on while the removed one is silent.
    let mut witness = target(&server);
    witness.id = "witness".into();
    witness.destination = Destination::Addr(server.addr);
    engine.add(witness).unwrap();
    eventually(Duration::from_secs(5), "witness probed 3 times", || async {
        (engine.report("witness").unwrap().probes >= 3).then_some(())
    })
    .await;
    let probes = engine.report("witness").unwrap().probes;
    // Every request since the removal came from the witness (allowing one probe in flight).
    assert!(server.requests() - before <= probes + 1);
}
