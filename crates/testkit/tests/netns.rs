//! The multi-site lab with real namespaces, sockets, processes and a real 3-member etcd
//! cluster. Needs root, as CI has.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command};
use std::time::Duration;

use testkit::eventually;
use testkit::netns::{CLIENT, Lab, MAIN_HOST};

const SITES: [&str; 3] = ["edge", "region", "witness"];

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(out.status.success(), "{program} {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

fn netns_list() -> String {
    run("ip", &["netns", "list"])
}

/// A TCP connection from inside `site` to `to`: the local address it got, or the error.
fn connect(lab: &Lab, site: &str, to: SocketAddr) -> std::io::Result<SocketAddr> {
    lab.in_site(site, || {
        let s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
        s.local_addr()
    })
}

/// A listener inside `site` on every address, any port.
fn listen(lab: &Lab, site: &str) -> TcpListener {
    lab.in_site(site, || TcpListener::bind("0.0.0.0:0").unwrap())
}

/// Waits (at most 20 s: the last tests of a CI run share a busy machine) until a child has
/// exited.
async fn exited(child: &mut Child, what: &str) {
    eventually(Duration::from_secs(20), what, || {
        let done = child.try_wait().unwrap();
        async move { done }
    })
    .await;
}

/// The state letter of a process in /proc/PID/stat (R, S, T, Z…), if it exists.
fn state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(") ").next()?.chars().next()
}

#[tokio::test]
async fn sites_reach_each_other_and_nothing_is_left_behind() {
    let root_links = run("ip", &["-o", "link"]);
    let lab = Lab::with_client(&SITES);

    // The machine's own namespace is untouched.
    assert_eq!(run("ip", &["-o", "link"]), root_links);
    for table in [
        run("ip", &["-o", "addr"]),
        run("ip", &["route", "show", "table", "all"]),
    ] {
        assert!(!table.contains("198.18."), "{table}");
    }
    let list = netns_list();
    for ns in lab.namespaces() {
        assert!(list.contains(&ns), "{ns} missing from {list}");
    }

    // Every site (and the client) reaches every site's main address, from its own.
    for to in SITES {
        let listener = listen(&lab, to);
        let port = listener.local_addr().unwrap().port();
        for from in SITES.iter().copied().chain([CLIENT]) {
            let addr = SocketAddr::new(lab.ip(to, MAIN_HOST), port);
            let local = connect(&lab, from, addr)
                .unwrap_or_else(|e| panic!("{from} -> {to} ({addr}): {e}"));
            if from != to {
                assert_eq!(local.ip(), lab.ip(from, MAIN_HOST), "{from} -> {to}");
            }
            let (_, peer) = listener.accept().unwrap();
            assert_eq!(peer, local);
        }
        // Loopback works inside a site, and is the site's own.
        let lo = SocketAddr::from(([127, 0, 0, 1], port));
        connect(&lab, to, lo).unwrap();
        let other = SITES.iter().find(|s| **s != to).unwrap();
        let refused = connect(&lab, other, lo).unwrap_err();
        assert_eq!(refused.kind(), ErrorKind::ConnectionRefused, "{refused}");
    }

    // Another address of a site is reachable once added, and only then.
    let region = listen(&lab, "region");
    let extra = SocketAddr::new(lab.ip("region", 20), region.local_addr().unwrap().port());
    let err = connect(&lab, "edge", SocketAddr::new(extra.ip(), 9)).unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::HostUnreachable | ErrorKind::TimedOut),
        "{err}"
    );
    assert_eq!(lab.add_ip("region", 20), extra.ip());
    lab.add_ip("region", 20);
    eventually(Duration::from_secs(5), "region's .20 to answer", || {
        let ok = connect(&lab, "edge", extra).ok();
        async move { ok }
    })
    .await;

    // A process started inside, not through a guard, and the lab's directory.
    let mut sleeper = lab.command("witness", "sleep").arg("600").spawn().unwrap();
    let dir = lab.dir().to_path_buf();
    assert!(dir.is_dir());
    let names = lab.namespaces();
    drop(lab);

    exited(&mut sleeper, "the lab's drop to kill a process inside").await;
    let list = netns_list();
    for ns in names {
        assert!(!list.contains(&ns), "{ns} left in {list}");
    }
    assert!(!dir.exists(), "{} left", dir.display());
}

#[tokio::test]
async fn a_proc_is_the_program_and_obeys_signals() {
    let lab = Lab::new(&["edge"]);
    let mut cmd = lab.command("edge", "sleep");
    cmd.arg("600");
    let mut p = lab.spawn(cmd, "sleeper");
    let pid = p.pid();
    // `ip` first, then (same pid) the program it execs.
    eventually(Duration::from_secs(5), "the pid to be sleep's", || async {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == "sleep").then_some(())
    })
    .await;

    p.stop();
    eventually(Duration::from_secs(5), "SIGSTOP to freeze it", || async {
        (state(pid) == Some('T')).then_some(())
    })
    .await;
    p.cont();
    eventually(Duration::from_secs(5), "SIGCONT to resume it", || async {
        (state(pid) == Some('S')).then_some(())
    })
    .await;
    assert!(p.is_running());
    p.kill9();
    assert!(!p.is_running());
    assert_eq!(state(pid), None, "killed and reaped");
    assert!(p.log().starts_with(lab.dir()));
}

#[tokio::test]
async fn a_cut_route_fails_one_destination_from_one_site_at_once() {
    let lab = Lab::new(&SITES);
    let other = lab.add_ip("edge", 11);
    let listener = listen(&lab, "edge");
    let port = listener.local_addr().unwrap().port();
    let main = SocketAddr::new(lab.ip("edge", MAIN_HOST), port);
    let other = SocketAddr::new(other, port);
    for to in [main, other] {
        connect(&lab, "witness", to).unwrap();
    }

    lab.cut_route("witness", other.ip());
    let err = connect(&lab, "witness", other).unwrap_err();
    // At once, not after the 2 s connect timeout.
    assert_eq!(err.kind(), ErrorKind::HostUnreachable, "{err}");
    connect(&lab, "witness", main).unwrap();
    connect(&lab, "region", other).unwrap();

    lab.heal_route("witness", other.ip());
    connect(&lab, "witness", other).unwrap();

    // A cut is silent: a connection attempt times out.
    lab.cut("edge");
    let err = connect(&lab, "witness", main).unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::TimedOut | ErrorKind::HostUnreachable),
        "{err}"
    );
    connect(&lab, "edge", main).unwrap();
    lab.heal("edge");
    eventually(
        Duration::from_secs(10),
        "the edge to be reachable again",
        || {
            let ok = connect(&lab, "witness", main).ok();
            async move { ok }
        },
    )
    .await;
}

#[tokio::test]
async fn an_etcd_cluster_across_sites_survives_a_cut_and_a_lost_member() {
    let lab = Lab::new(&SITES);
    let mut etcd = lab.etcd_cluster(&SITES);
    assert_eq!(
        etcd.endpoints(),
        [
            "http://198.18.1.10:2379",
            "http://198.18.2.10:2379",
            "http://198.18.3.10:2379"
        ]
    );
    etcd.wait_healthy().await;
    let get = |key: &'static str| ["get", key, "--print-value-only"];

    // Written through one member, read through another.
    assert_eq!(
        etcd.etcdctl("edge", &["put", "a", "1"])
            .await
            .unwrap()
            .trim(),
        "OK"
    );
    assert_eq!(
        etcd.etcdctl("witness", &get("a")).await.unwrap().trim(),
        "1"
    );

    // The edge cut off: the majority goes on (after electing a leader if the edge led).
    lab.cut("edge");
    eventually(
        Duration::from_secs(20),
        "region to write without the edge",
        || async { etcd.etcdctl("region", &["put", "b", "2"]).await.ok() },
    )
    .await;
    assert_eq!(
        etcd.etcdctl("witness", &get("b")).await.unwrap().trim(),
        "2"
    );
    // The edge member runs but can neither write nor read linearizably: the client's deadline
    // passes, or the member gives up first ("request timed out": a proposal it could not
    // commit, as when it still thought it led the cluster).
    for args in [&["put", "c", "3"][..], &get("a")] {
        let err = etcd.etcdctl("edge", args).await.unwrap_err();
        assert!(
            err.contains("deadline exceeded") || err.contains("request timed out"),
            "{args:?} on the edge: {err}"
        );
    }
    let stale = ["get", "a", "--print-value-only", "--consistency=s"];
    assert_eq!(etcd.etcdctl("edge", &stale).await.unwrap().trim(), "1");

    // Healed: the edge catches up and serves again.
    lab.heal("edge");
    let caught_up = ["get", "b", "--print-value-only", "--consistency=s"];
    eventually(Duration::from_secs(20), "the edge to catch up", || async {
        let v = etcd.etcdctl("edge", &caught_up).await.ok()?;
        (v.trim() == "2").then_some(())
    })
    .await;
    eventually(
        Duration::from_secs(20),
        "the edge to write again",
        || async { etcd.etcdctl("edge", &["put", "d", "4"]).await.ok() },
    )
    .await;

    // The witness member killed: two of three still serve.
    let pid = etcd.process("witness").unwrap().pid();
    etcd.kill("witness");
    assert_eq!(state(pid), None);
    assert!(etcd.process("witness").is_none());
    eventually(
        Duration::from_secs(20),
        "edge and region to write without the witness",
        || async { etcd.etcdctl("edge", &["put", "e", "5"]).await.ok() },
    )
    .await;
    assert_eq!(etcd.etcdctl("region", &get("e")).await.unwrap().trim(), "5");

    // Restarted on its data: healthy, and it has what was written meanwhile.
    etcd.start("witness");
    etcd.wait_healthy().await;
    assert_eq!(
        etcd.etcdctl("witness", &get("e")).await.unwrap().trim(),
        "5"
    );
}

#[test]
fn a_panicking_test_leaves_nothing_behind() {
    let mut seen = None;
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let lab = Lab::new(&["edge", "region"]);
        let etcd = lab.etcd_cluster(&["edge"]);
        let sleeper = lab.command("region", "sleep").arg("600").spawn().unwrap();
        seen = Some((
            lab.namespaces(),
            lab.dir().to_path_buf(),
            etcd.process("edge").unwrap().pid(),
            sleeper,
        ));
        panic!("a test failing with a lab and an etcd member running");
    }));
    assert!(panicked.is_err());
    let (names, dir, etcd_pid, mut sleeper) = seen.unwrap();
    assert_eq!(state(etcd_pid), None, "etcd killed and reaped");
    // Killed by the lab; the test reaps its own child.
    assert!(sleeper.wait().is_ok());
    let list = netns_list();
    for ns in names {
        assert!(!list.contains(&ns), "{ns} left in {list}");
    }
    assert!(!dir.exists(), "{} left", dir.display());
}

#[tokio::test]
async fn namespaces_left_by_a_dead_process_are_removed() {
    // A pid that was alive and is not any more.
    let mut gone = Command::new("true").spawn().unwrap();
    gone.wait().unwrap();
    let stale = format!("tdm-{}-0-edge", gone.id());
    run("ip", &["netns", "add", &stale]);
    let mut inside = Command::new("ip")
        .args(["netns", "exec", &stale, "sleep", "600"])
        .spawn()
        .unwrap();

    let _lab = Lab::new(&["edge"]);
    exited(&mut inside, "the stale namespace's process to be killed").await;
    let list = netns_list();
    assert!(!list.contains(&stale), "{stale} left in {list}");
}

#[test]
fn addresses_follow_the_order_of_sites() {
    let lab = Lab::with_client(&SITES);
    let ip = |s: &str, h: u8| -> IpAddr { lab.ip(s, h) };
    assert_eq!(ip("edge", 10).to_string(), "198.18.1.10");
    assert_eq!(ip("witness", 7).to_string(), "198.18.3.7");
    assert_eq!(ip(CLIENT, 10).to_string(), "198.18.100.10");
    assert!(lab.ns("region").starts_with(lab.id()));
    assert!(lab.id().starts_with("tdm-"));
}
