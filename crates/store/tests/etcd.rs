//! The etcd store against a real etcd member (Debian's etcd-server) on loopback: leases with
//! fencing terms, records with compare-and-set, watches through a mirror, session records that
//! vanish with their process, and a clear state when etcd cannot be reached.

#![allow(clippy::unwrap_used, clippy::expect_used)]
#![cfg(feature = "etcd")]

use std::sync::Arc;
use std::time::Duration;

use store::{Etcd, EtcdOptions, Expect, Mirror, Scope, Store, StoreError};
use testkit::{EtcdMember, eventually};

async fn connect(member: &EtcdMember, cluster: &str, session: Duration) -> Arc<Etcd> {
    let s = Etcd::connect(EtcdOptions::new(
        vec![member.endpoint.clone()],
        cluster,
        session,
    ))
    .await
    .unwrap();
    s.ready(Duration::from_secs(10)).await.unwrap();
    s
}

#[tokio::test]
async fn leases_are_exclusive_terms_grow_and_stale_terms_are_fenced() {
    let etcd = EtcdMember::start().await;
    let a = connect(&etcd, "leases", Duration::from_secs(5)).await;
    let b = connect(&etcd, "leases", Duration::from_secs(5)).await;
    let ttl = Duration::from_secs(2);
    let l1 = a.acquire("leader", "n1", ttl).await.unwrap();
    assert_eq!(l1.term, 1);
    match b.acquire("leader", "n2", ttl).await {
        Err(StoreError::Held { holder, term, .. }) => {
            assert_eq!((holder.as_str(), term), ("n1", 1))
        }
        other => panic!("expected Held, got {other:?}"),
    }
    // Renewals keep it past its time to live.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        a.renew("leader", "n1", 1, ttl).await.unwrap();
    }
    assert!(b.acquire("leader", "n2", ttl).await.is_err(), "renewed");
    a.put_fenced("decision", b"n1 decides".to_vec(), "leader", "n1", 1)
        .await
        .unwrap();
    // n1 goes silent: the lease expires in etcd and n2 takes it with the next term.
    let l2 = eventually(Duration::from_secs(10), "n2 takes over", || async {
        b.acquire("leader", "n2", ttl).await.ok()
    })
    .await;
    assert_eq!(l2.term, 2);
    assert!(matches!(
        a.renew("leader", "n1", 1, ttl).await,
        Err(StoreError::Lost { term: 2, .. })
    ));
    assert!(matches!(
        a.put_fenced("decision", b"stale".to_vec(), "leader", "n1", 1)
            .await,
        Err(StoreError::Lost { term: 2, .. })
    ));
    assert_eq!(
        b.read("decision").await.unwrap().unwrap().value,
        b"n1 decides"
    );
    // A planned handover keeps terms growing.
    b.release("leader", "n2", 2).await.unwrap();
    assert_eq!(a.get("leader").await.unwrap(), (None, 2));
    assert_eq!(a.acquire("leader", "n1", ttl).await.unwrap().term, 3);
}

#[tokio::test]
async fn records_compare_and_set_and_a_mirror_follows_them() {
    let etcd = EtcdMember::start().await;
    let s = connect(&etcd, "records", Duration::from_secs(5)).await;
    let other = connect(&etcd, "another-cluster", Duration::from_secs(5)).await;
    let r1 = s
        .put(
            "intent/capacity/web",
            b"3".to_vec(),
            Scope::Persistent,
            Expect::Absent,
        )
        .await
        .unwrap();
    assert!(matches!(
        s.put("intent/capacity/web", b"4".to_vec(), Scope::Persistent, Expect::Absent).await,
        Err(StoreError::Conflict { revision: Some(r), .. }) if r == r1
    ));
    let r2 = s
        .put(
            "intent/capacity/web",
            b"4".to_vec(),
            Scope::Persistent,
            Expect::Revision(r1),
        )
        .await
        .unwrap();
    assert!(r2 > r1);
    assert!(
        other.read("intent/capacity/web").await.unwrap().is_none(),
        "clusters do not mix"
    );
    let store: Arc<dyn Store> = s.clone();
    let m = Mirror::start(store, "intent/");
    eventually(
        Duration::from_secs(5),
        "the mirror's first list",
        || async { m.get("intent/capacity/web").filter(|r| r.value == b"4") },
    )
    .await;
    s.put(
        "intent/drill",
        b"{}".to_vec(),
        Scope::Persistent,
        Expect::Any,
    )
    .await
    .unwrap();
    s.delete("intent/capacity/web", Expect::Any).await.unwrap();
    eventually(Duration::from_secs(5), "the mirror to follow", || async {
        let keys: Vec<String> = m.records().into_keys().collect();
        (keys == ["intent/drill"]).then_some(())
    })
    .await;
    let (items, _) = s.list("intent/").await.unwrap();
    assert_eq!(items.len(), 1);
}

#[tokio::test]
async fn session_records_vanish_with_their_process_and_come_back_with_a_new_session() {
    let etcd = EtcdMember::start().await;
    let watcher = connect(&etcd, "sessions", Duration::from_secs(5)).await;
    let node = connect(&etcd, "sessions", Duration::from_secs(2)).await;
    node.put(
        "nodes/edge-1",
        b"alive".to_vec(),
        Scope::Session,
        Expect::Absent,
    )
    .await
    .unwrap();
    // The session ends behind the process's back (as when it was cut off for longer than its
    // time to live): the record goes, then the store writes it again under a new session.
    let leases = etcd.etcdctl(&["lease", "list"]);
    let ids: Vec<&str> = leases.lines().skip(1).map(str::trim).collect();
    assert!(!ids.is_empty(), "{leases}");
    for id in &ids {
        etcd.etcdctl(&["lease", "revoke", id]);
    }
    let first = node.connection().borrow().session;
    eventually(Duration::from_secs(10), "a new session", || async {
        (node.connection().borrow().session > first).then_some(())
    })
    .await;
    eventually(
        Duration::from_secs(5),
        "the record written again",
        || async { watcher.read("nodes/edge-1").await.ok().flatten() },
    )
    .await;
    // The process goes away without a word: etcd deletes its record after the session's ttl.
    drop(node);
    let gone = tokio::time::Instant::now();
    eventually(Duration::from_secs(10), "the record to expire", || async {
        watcher
            .read("nodes/edge-1")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    assert!(
        gone.elapsed() >= Duration::from_secs(1),
        "not before the session's time to live"
    );
}

#[tokio::test]
async fn an_unreachable_etcd_says_so_and_fails_requests_quickly() {
    let closed = testkit::closed_port();
    let s = Etcd::connect(EtcdOptions::new(
        vec![format!("http://{closed}")],
        "nowhere",
        Duration::from_secs(3),
    ))
    .await
    .unwrap();
    let why = s.ready(Duration::from_secs(3)).await.unwrap_err();
    assert!(!why.is_empty());
    assert!(!s.connection().borrow().connected);
    let started = tokio::time::Instant::now();
    assert!(matches!(
        s.put("k", b"v".to_vec(), Scope::Persistent, Expect::Any)
            .await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// TLS as etcd's `--client-cert-auth` expects: with the CA and a client certificate the store
/// works; without the certificate, or trusting another CA, it never connects and says so.
#[tokio::test]
async fn tls_with_a_client_certificate_and_nothing_less() {
    let dir = tempfile::tempdir().unwrap();
    let pki = testkit::pki::Pki::new(&dir.path().join("pki"), "etcd test CA");
    let etcd = EtcdMember::start_tls(&pki).await;
    assert!(etcd.endpoint.starts_with("https://"), "{}", etcd.endpoint);
    let client = pki.issue("node-1", &["127.0.0.1"]);
    let read = |p: &std::path::Path| std::fs::read(p).unwrap();
    let options = |tls: Option<store::EtcdTls>| {
        let mut o = EtcdOptions::new(vec![etcd.endpoint.clone()], "tls", Duration::from_secs(5));
        o.tls = tls;
        o
    };

    let good = store::EtcdTls {
        ca: read(&pki.ca()),
        identity: Some((read(&client.cert), read(&client.key))),
    };
    let s = Etcd::connect(options(Some(good))).await.unwrap();
    s.ready(Duration::from_secs(10)).await.unwrap();
    s.put("k", b"over tls".to_vec(), Scope::Persistent, Expect::Any)
        .await
        .unwrap();
    let debug = format!("{:?}", options(None).tls);
    assert!(!debug.contains("PRIVATE KEY"), "{debug}");

    // No client certificate: etcd refuses the handshake.
    let anonymous = store::EtcdTls {
        ca: read(&pki.ca()),
        identity: None,
    };
    let other = testkit::pki::Pki::new(&dir.path().join("other"), "another CA");
    let stranger = store::EtcdTls {
        ca: read(&other.ca()),
        identity: Some((read(&client.cert), read(&client.key))),
    };
    for (what, tls) in [
        ("no client certificate", anonymous),
        ("another CA", stranger),
    ] {
        let s = Etcd::connect(options(Some(tls))).await.unwrap();
        let why = s.ready(Duration::from_secs(3)).await.unwrap_err();
        assert!(!why.is_empty(), "{what}");
        assert!(!s.connection().borrow().connected, "{what}");
        assert!(
            matches!(
                s.put("k", b"no".to_vec(), Scope::Persistent, Expect::Any)
                    .await,
                Err(StoreError::Unavailable(_))
            ),
            "{what}"
        );
    }
    assert_eq!(
        etcd.etcdctl(&["get", "--print-value-only", "--prefix", "/tandem/tls/"])
            .trim(),
        "over tls"
    );
}

/// One member of three going away, among them the one holding the session's keep-alive
/// stream, leaves the store connected: the next keep-alive goes to another member well within
/// the second a cluster node waits before it says it is isolated (it used to wait a third of
/// the session's time to live, 5 s here). The raft leader stays up and a member started again
/// calls no election (`--pre-vote`), so none is measured; 2 s leaves room for a loaded machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_member_with_the_keep_alive_stream_keeps_the_store_connected() {
    let mut members = EtcdMember::start_cluster(3).await;
    let leader = eventually(Duration::from_secs(10), "a raft leader", || async {
        members.iter().position(is_leader)
    })
    .await;
    let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let s = Etcd::connect(EtcdOptions::new(
        followers
            .iter()
            .map(|i| members[*i].endpoint.clone())
            .collect(),
        "three",
        Duration::from_secs(15),
    ))
    .await
    .unwrap();
    s.ready(Duration::from_secs(10)).await.unwrap();
    let longest = Arc::new(std::sync::Mutex::new(Duration::ZERO));
    let watch = tokio::spawn(longest_disconnection(s.connection(), longest.clone()));
    // The stream is on one of the two followers: killing each in turn hits it once.
    for i in followers {
        members[i].kill();
        // More than a keep-alive period (a third of 15 s) without the member.
        tokio::time::sleep(Duration::from_secs(6)).await;
        members[i].restart().await;
    }
    watch.abort();
    let longest = *longest.lock().unwrap();
    assert!(
        longest < Duration::from_secs(2),
        "disconnected for {longest:?}"
    );
    assert!(s.connection().borrow().connected);
}

/// Whether `m` is the raft leader, by `etcdctl endpoint status`.
fn is_leader(m: &EtcdMember) -> bool {
    let v: serde_json::Value =
        serde_json::from_str(&m.etcdctl(&["endpoint", "status", "-w", "json"])).unwrap_or_default();
    let status = &v[0]["Status"];
    status["leader"].is_u64() && status["leader"] == status["header"]["member_id"]
}

/// Keeps the longest time `connection` said disconnected in `longest`, an ongoing one included.
async fn longest_disconnection(
    mut connection: tokio::sync::watch::Receiver<store::Connection>,
    longest: Arc<std::sync::Mutex<Duration>>,
) {
    let mut down_since = None;
    loop {
        let connected = connection.borrow_and_update().connected;
        match (connected, down_since) {
            (false, None) => down_since = Some(tokio::time::Instant::now()),
            (true, Some(t)) => {
                let mut l = longest.lock().unwrap();
                *l = (*l).max(t.elapsed());
                down_since = None;
            }
            _ => {}
        }
        let changed = tokio::time::timeout(Duration::from_millis(50), connection.changed()).await;
        if let (Some(t), Err(_)) = (down_since, &changed) {
            let mut l = longest.lock().unwrap();
            *l = (*l).max(t.elapsed());
        }
        if matches!(changed, Ok(Err(_))) {
            return;
        }
    }
}
