//! Outage drills applied to a real load balancer: its listener closes and its flows are reset
//! while the drill lasts, it listens again when the drill ends or is stopped, and applying the
//! same drill twice does nothing the second time.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use lb::{Balancer, Running};
use orchestrator::{Drill, Drills, Frontend, Site};
use testkit::{bind_tcp, free_tcp_port};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::broadcast::Receiver;

/// Health that calls every backend Online: this load balancer has no probe.
struct AllUp;

impl lb::BackendHealth for AllUp {
    fn status(&self, _: &str) -> Option<health::Status> {
        Some(health::Status::Online)
    }
    fn eject(&self, _: &str, _: &str) {}
}

/// An echo backend on loopback.
async fn echo() -> SocketAddr {
    let addr: SocketAddr = format!("127.0.8.2:{}", free_tcp_port(&["127.0.8.2"]))
        .parse()
        .unwrap();
    let l = bind_tcp(addr).await;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                while let Ok(n @ 1..) = s.read(&mut buf).await {
                    if s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Drills over one site, `edge`, with one load balancer in front of an echo backend.
async fn edge() -> (Arc<Drills>, SocketAddr) {
    let backend = echo().await;
    let frontend: SocketAddr = format!("127.0.8.1:{}", free_tcp_port(&["127.0.8.1"]))
        .parse()
        .unwrap();
    let text = format!(
        "[[site]]\nname = \"edge\"\nrole = \"edge\"\n\
         [[load_balancer]]\nname = \"web\"\nsite = \"edge\"\nfrontend = \"{frontend}\"\n\
         pool = {{ addresses = [\"{backend}\"] }}\n"
    );
    let t = model::parse(model::Source::new("t.toml", text)).unwrap();
    let balancer = Balancer::new(t.load_balancers[0].clone(), Arc::new(AllUp));
    let running = Running::start(balancer, 1).unwrap();
    let site = Site {
        databases: Vec::new(),
        name: "edge".into(),
        frontends: vec![Frontend::new(running, 1)],
        scale_sets: Vec::new(),
    };
    (Drills::new(vec![site]), frontend)
}

async fn round_trip(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4];
    s.write_all(b"ping").await.is_ok()
        && tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut buf))
            .await
            .is_ok_and(|r| r.is_ok())
        && &buf == b"ping"
}

fn drill(site: &str, started: SystemTime, lasts: Duration) -> Drill {
    Drill {
        kind: "outage".into(),
        site: site.into(),
        started,
        ends: started + lasts,
    }
}

/// The next event, if one is already there.
fn next(events: &mut Receiver<event::Event>) -> Option<event::Event> {
    events.try_recv().ok()
}

#[tokio::test]
async fn a_drill_closes_the_site_and_its_end_brings_it_back() {
    let (drills, frontend) = edge().await;
    let mut events = drills.events();
    let mut flow = TcpStream::connect(frontend).await.unwrap();
    assert!(round_trip(&mut flow).await, "the load balancer relays");

    let t0 = SystemTime::now();
    let d = drill("edge", t0, Duration::from_secs(60));
    drills.apply(Some(&d), t0);
    assert_eq!(drills.applied(), Some(d.clone()));
    assert!(
        TcpStream::connect(frontend).await.is_err(),
        "a site in a drill refuses connections"
    );
    assert!(!round_trip(&mut flow).await, "an open flow is reset");
    let started = next(&mut events).expect("an outage-start event");
    assert_eq!(
        (started.subject.as_str(), started.kind.as_str()),
        ("edge", "outage-start")
    );
    assert!(
        started.message.contains("back in 1m"),
        "{}",
        started.message
    );

    // Idempotent: the same drill again changes nothing and says nothing.
    drills.apply(Some(&d), t0 + Duration::from_secs(1));
    assert!(next(&mut events).is_none());

    // Its time is up: the site listens again.
    drills.apply(Some(&d), t0 + Duration::from_secs(60));
    assert_eq!(drills.applied(), None);
    let mut flow = TcpStream::connect(frontend).await.unwrap();
    assert!(round_trip(&mut flow).await, "back after the drill");
    let ended = next(&mut events).expect("an outage-end event");
    assert_eq!(ended.kind, "outage-end");
    assert!(
        ended.message.starts_with("outage drill ended after 60.0s"),
        "{}",
        ended.message
    );
}

#[tokio::test]
async fn a_stopped_drill_ends_early_and_another_sites_drill_leaves_this_one_alone() {
    let (drills, frontend) = edge().await;
    let mut events = drills.events();
    let t0 = SystemTime::now();

    drills.apply(Some(&drill("region", t0, Duration::from_secs(60))), t0);
    assert_eq!(drills.applied(), None, "not a site this process runs");
    assert!(next(&mut events).is_none());
    assert!(TcpStream::connect(frontend).await.is_ok());

    drills.apply(Some(&drill("edge", t0, Duration::from_secs(60))), t0);
    assert!(TcpStream::connect(frontend).await.is_err());
    drills.apply(None, t0 + Duration::from_secs(5));
    assert!(TcpStream::connect(frontend).await.is_ok());
    let _start = next(&mut events).unwrap();
    let ended = next(&mut events).unwrap();
    assert!(
        ended
            .message
            .starts_with("outage drill ended early after 5.0s"),
        "{}",
        ended.message
    );

    // A drill already over when first seen (a node that was down through it) does nothing.
    let late = t0 + Duration::from_secs(120);
    drills.apply(Some(&drill("edge", t0, Duration::from_secs(60))), late);
    assert!(next(&mut events).is_none());
    assert!(TcpStream::connect(frontend).await.is_ok());
}
