//! Backups against real PostgreSQL and pgBackRest (Debian's `postgresql` and `pgbackrest`,
//! installed by `scripts/deps`) under the real `tandem up`: the scheduled first full backup,
//! writes, WAL switches archived, restore drills that count every acknowledged row, a restore
//! to a named time without the rows committed after it, archiving that carries on from the
//! new primary after a switchover, incremental backups, verify, the metrics; and the bad
//! input: a repository missing (clear events and errors, commits never blocked, archiving
//! back once it exists), a drill refusing a scratch directory that is not empty; `tandem
//! restore` into the members, to a named time and to the newest WAL.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::Value;
use testkit::{eventually, free_tcp_port};
use tokio::time::Instant;

struct Db {
    dir: tempfile::TempDir,
    up: Up,
    state: PathBuf,
    frontend: SocketAddr,
}

/// Tandem is asked to stop (it stops its members), then anything still running from a
/// member's or a drill's directory is killed.
impl Drop for Db {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.up.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let end = Instant::now() + Duration::from_secs(30);
        while Instant::now() < end && matches!(self.up.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let postgres = pg::local::find_bins(None).unwrap().join("postgres");
        for d in [
            "edge",
            "region",
            "drill",
            "edge.restored",
            "region.restored",
        ] {
            pg::family::kill_in_data_dir(&postgres, &self.state.join("databases/orders").join(d));
        }
    }
}

/// A directory the database user may write (as root: `postgres`).
fn owned_by_db_user(path: &Path) {
    std::fs::create_dir_all(path).unwrap();
    if let Some((uid, gid)) = pg::local::run_as().unwrap() {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
    }
}

async fn start(net: u8, repository: &Path, create_repository: bool) -> Db {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let repository = dir.path().join(repository);
    if create_repository {
        owned_by_db_user(&repository);
    }
    let (e, r) = (net, net + 1);
    let ips = [
        format!("127.0.{e}.20"),
        format!("127.0.{e}.21"),
        format!("127.0.{r}.20"),
        format!("127.0.{r}.21"),
    ];
    let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
    let port = free_tcp_port(&ips);
    let api: SocketAddr = format!("127.0.0.1:{}", free_tcp_port(&["127.0.0.1"]))
        .parse()
        .unwrap();
    let body = format!(
        r#"
[[site]]
name = "edge"
role = "edge"

[[site]]
name = "region"
role = "region"

[[database]]
name = "orders"
replication = "sync"
failover_timeout = "2s"
frontends = {{ edge = "127.0.{e}.20:{port}", region = "127.0.{r}.20:{port}" }}
  [database.backup]
  repository = "{repo}"
  full = "weekly"
  archive_timeout = "60s"
  retention_full = 2
  drill_table = "public.acked"

  [[database.member]]
  site = "edge"
  listen = "127.0.{e}.21:{port}"

  [[database.member]]
  site = "region"
  listen = "127.0.{r}.21:{port}"
"#,
        repo = repository.display()
    );
    let file = topology_file(dir.path(), api, &body);
    let up = Up::start(&file, api, &[]);
    let db = Db {
        state: dir.path().join("state"),
        dir,
        up,
        frontend: format!("127.0.{e}.20:{port}").parse().unwrap(),
    };
    eventually(
        Duration::from_secs(60),
        "healthy with edge primary",
        || async {
            let v = try_get_json(db.up.api, "/v1/databases").await?;
            let d = &v["databases"][0];
            (d["state"] == "healthy" && d["primary"] == "edge").then_some(())
        },
    )
    .await;
    db
}

impl Db {
    fn password(&self) -> String {
        std::fs::read_to_string(self.state.join("databases/orders/password"))
            .unwrap()
            .trim()
            .to_string()
    }

    async fn client(&self) -> tokio_postgres::Client {
        let mut c = tokio_postgres::Config::new();
        c.host(self.frontend.ip().to_string())
            .port(self.frontend.port())
            .user("postgres")
            .password(self.password())
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(2));
        let (client, conn) = c.connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        client
    }

    /// Inserts `n` rows through the frontend, each acknowledged within 2 s.
    async fn insert(&self, n: usize) {
        let c = self.client().await;
        for _ in 0..n {
            let t = Instant::now();
            c.execute("INSERT INTO acked DEFAULT VALUES", &[])
                .await
                .unwrap();
            assert!(
                t.elapsed() < Duration::from_secs(2),
                "a commit took {:?}",
                t.elapsed()
            );
        }
    }

    /// Closes the current WAL segment and waits until the primary has archived it.
    async fn switch_and_archive(&self) -> String {
        let c = self.client().await;
        let seg: String = c
            .query_one("SELECT pg_walfile_name(pg_switch_wal())", &[])
            .await
            .unwrap()
            .get(0);
        eventually(
            Duration::from_secs(30),
            &format!("{seg} archived"),
            || async {
                let last: Option<String> = c
                    .query_one("SELECT last_archived_wal FROM pg_stat_archiver", &[])
                    .await
                    .ok()?
                    .get(0);
                last.filter(|l| l.get(8..24) >= seg.get(8..24)).map(|_| ())
            },
        )
        .await;
        seg
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = tandem();
        cmd.args(args).args(["--api", &self.up.api.to_string()]);
        run(&mut cmd)
    }

    /// `tandem drill restore orders ARGS --json`: its report, and whether it exited 0.
    fn drill(&self, args: &[&str]) -> (Value, bool) {
        let mut all = vec!["drill", "restore", "orders", "--json"];
        all.extend_from_slice(args);
        let out = self.cli(&all);
        let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "drill report: {e}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (report, out.status.success())
    }

    async fn backups(&self) -> Value {
        get_json(self.up.api, "/v1/databases/orders/backups").await
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn backups_archive_and_restore_drills_follow_the_primary() {
    let db = start(60, Path::new("repo"), true).await;
    // The schedule's first full backup, as soon as the stanza exists.
    let first = eventually(Duration::from_secs(90), "the first full backup", || async {
        let b = db.backups().await;
        b["backups"].as_array().filter(|a| !a.is_empty()).cloned()
    })
    .await;
    assert_eq!(first[0]["type"], "full", "{first:?}");
    wait_event(db.up.api, "stanza orders ready").await;
    wait_event(db.up.api, "full backup").await;

    db.client()
        .await
        .batch_execute("CREATE TABLE acked (id bigserial PRIMARY KEY, at timestamptz DEFAULT clock_timestamp())")
        .await
        .unwrap();
    db.insert(100).await;
    db.switch_and_archive().await;

    // A drill restores the backup and the archived WAL: every acknowledged row.
    let (r, ok) = db.drill(&[]);
    assert!(ok, "{r:#}");
    assert_eq!(r["ok"], true, "{r:#}");
    assert_eq!(r["rows"], 100, "{r:#}");
    assert_eq!(r["table"], "public.acked");
    assert!(r["rto_seconds"].as_f64().unwrap() > 0.0, "{r:#}");
    assert!(
        r["rpo_seconds"].as_f64().unwrap() < 1.0,
        "everything was archived: {r:#}"
    );
    let scratch = db.state.join("databases/orders/drill");
    assert!(!scratch.exists(), "the scratch copy is removed");
    eprintln!(
        "drill: RTO {:.2} s (restore {:.2} s), RPO {} s",
        r["rto_seconds"].as_f64().unwrap(),
        r["restore_seconds"].as_f64().unwrap(),
        r["rpo_seconds"]
    );

    // A restore to a named time has none of the rows committed after it.
    let c = db.client().await;
    let named: String = c
        .query_one(
            "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    db.insert(50).await;
    db.switch_and_archive().await;
    let (r, ok) = db.drill(&["--to", &named]);
    assert!(ok, "{r:#}");
    assert_eq!(r["rows"], 100, "restored to {named}: {r:#}");
    let (r, ok) = db.drill(&[]);
    assert!(ok, "{r:#}");
    assert_eq!(r["rows"], 150, "{r:#}");

    // After a switchover the new primary archives (a new timeline) and is backed up.
    let out = db.cli(&["db", "switchover", "orders", "--to", "region"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    db.insert(30).await;
    let seg = db.switch_and_archive().await;
    assert!(
        seg.starts_with("00000002"),
        "timeline 2 after the switchover: {seg}"
    );
    let out = db.cli(&["backup", "orders", "now", "--type", "incr"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("incr backup"), "{said}");
    let (r, ok) = db.drill(&[]);
    assert!(ok, "{r:#}");
    assert_eq!(r["rows"], 180, "{r:#}");

    let out = db.cli(&["backup", "orders", "list", "--json"]);
    assert!(out.status.success());
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    let kinds: Vec<&str> = list["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["full", "incr"], "{list:#}");
    let incr = &list["backups"][1];
    assert!(
        incr["wal_start"].as_str().unwrap().starts_with("00000002"),
        "{incr}"
    );
    assert!(incr["label"].as_str().unwrap().ends_with('I'));
    let out = db.cli(&["backup", "orders", "list"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("LABEL") && text.contains("incr"), "{text}");
    let out = db.cli(&["backup", "orders", "verify"]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Status and metrics.
    let v = get_json(db.up.api, "/v1/databases").await;
    let b = &v["databases"][0]["backup"];
    assert_eq!(b["last_drill"]["rows"], 180, "{b:#}");
    assert_eq!(b["ready"], true);
    let metrics = http_get(db.up.api, "/metrics").await;
    let value = |name: &str| -> f64 {
        let line = metrics
            .lines()
            .find(|l| l.starts_with(&format!("{name}{{database=\"orders\"}}")))
            .unwrap_or_else(|| panic!("{name} missing: {metrics}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(now - value("tandem_backup_last_success_timestamp") < 300.0);
    assert!(value("tandem_backup_repository_bytes") > 1_000_000.0);
    assert_eq!(value("tandem_restore_drill_success"), 1.0);
    assert!(value("tandem_restore_drill_rto_seconds") > 0.0);
    // Every backup and drill metric the README names, with its HELP, TYPE and a sample.
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let mut names: Vec<&str> = Vec::new();
    for prefix in ["tandem_backup_", "tandem_restore_drill_"] {
        let mut rest = readme.as_str();
        while let Some(at) = rest.find(prefix) {
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                .unwrap_or(tail.len());
            let name = &tail[..end];
            if !name.ends_with('_') && !names.contains(&name) {
                names.push(name);
            }
            rest = &tail[end..];
        }
    }
    assert!(names.len() >= 8, "README names {names:?}");
    for name in &names {
        assert!(
            metrics.contains(&format!("# TYPE {name} "))
                && metrics.contains(&format!("\n{name}{{database=\"orders\"}} ")),
            "README names {name}; /metrics lacks it:\n{metrics}"
        );
    }
    // Lag 0 once every completed segment is archived. On a busy machine an archive attempt
    // may have failed since the last success (the lag then counts from that success): a WAL
    // switch now and then gives pgBackRest a new segment to archive successfully.
    let last_switch = std::sync::Mutex::new(tokio::time::Instant::now());
    eventually(Duration::from_secs(60), "archive lag 0", || async {
        let m = http_get(db.up.api, "/metrics").await;
        let zero = m
            .lines()
            .any(|l| l == "tandem_backup_wal_archive_lag_seconds{database=\"orders\"} 0");
        let due = last_switch.lock().unwrap().elapsed() >= Duration::from_secs(10);
        if !zero && due {
            *last_switch.lock().unwrap() = tokio::time::Instant::now();
            let c = db.client().await;
            let _ = c.batch_execute("SELECT pg_switch_wal()").await;
        }
        zero.then_some(())
    })
    .await;

    // A scratch directory that is not empty is never restored over.
    std::fs::create_dir_all(&scratch).unwrap();
    std::fs::write(scratch.join("keep"), "mine").unwrap();
    let (r, ok) = db.drill(&[]);
    assert!(!ok, "{r:#}");
    assert!(
        r["error"].as_str().unwrap().contains("is not empty"),
        "{r:#}"
    );
    assert_eq!(
        std::fs::read_to_string(scratch.join("keep")).unwrap(),
        "mine"
    );
    std::fs::remove_dir_all(&scratch).unwrap();
    let _ = &db.dir;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_repository_is_reported_and_never_blocks_commits() {
    let db = start(62, Path::new("not-mounted/orders"), false).await;
    let e = wait_event(db.up.api, "cannot create the stanza").await;
    let msg = e["message"].as_str().unwrap();
    assert!(msg.contains("does not create it"), "{msg}");
    assert_eq!(e["kind"], "backup-error", "{e}");

    db.client()
        .await
        .batch_execute("CREATE TABLE acked (id bigserial PRIMARY KEY)")
        .await
        .unwrap();
    // Archiving fails on every segment; commits go on all the same.
    let c = db.client().await;
    for _ in 0..3 {
        db.insert(20).await;
        c.batch_execute("SELECT pg_switch_wal()").await.unwrap();
    }
    wait_event(db.up.api, "WAL archiving is failing").await;
    db.insert(50).await;
    let n: i64 = c
        .query_one("SELECT count(*) FROM acked", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 110);
    let failed: i64 = c
        .query_one("SELECT failed_count FROM pg_stat_archiver", &[])
        .await
        .unwrap()
        .get(0);
    assert!(failed > 0);

    // Operator commands say why.
    let out = db.cli(&["backup", "orders", "now", "--type", "full"]);
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not-mounted/orders") && err.contains("does not create it"),
        "{err}"
    );
    let (r, ok) = db.drill(&[]);
    assert!(!ok && r["ok"] == false, "{r:#}");
    let metrics = http_get(db.up.api, "/metrics").await;
    assert!(
        metrics.contains("tandem_backup_wal_archive_failures_total{database=\"orders\"}"),
        "{metrics}"
    );

    // Once it exists: the stanza, archiving again, a backup.
    owned_by_db_user(&db.dir.path().join("not-mounted/orders"));
    wait_event(db.up.api, "stanza orders ready").await;
    // A fresh connection: on a busy machine the frontend may have reset the old one (it
    // resets flows when the primary's probe fails), which is not what this test is about.
    eventually(Duration::from_secs(20), "a WAL switch", || async {
        let c = db.client().await;
        c.batch_execute("SELECT pg_switch_wal()").await.ok()
    })
    .await;
    wait_event(db.up.api, "WAL archiving works again").await;
    eventually(Duration::from_secs(90), "a full backup", || async {
        let b = db.backups().await;
        b["backups"]
            .as_array()
            .filter(|a| !a.is_empty())
            .map(|_| ())
    })
    .await;
}

impl Db {
    async fn count(&self) -> Option<i64> {
        let c = tokio::time::timeout(Duration::from_secs(3), async {
            let mut cfg = tokio_postgres::Config::new();
            cfg.host(self.frontend.ip().to_string())
                .port(self.frontend.port())
                .user("postgres")
                .password(self.password())
                .dbname("postgres")
                .connect_timeout(Duration::from_secs(2));
            let (client, conn) = cfg.connect(tokio_postgres::NoTls).await.ok()?;
            tokio::spawn(conn);
            client
                .query_one("SELECT count(*) FROM acked", &[])
                .await
                .ok()
                .map(|r| r.get::<_, i64>(0))
        })
        .await;
        c.ok().flatten()
    }

    /// Waits until `site` is the primary behind the frontend with `rows` rows, and the other
    /// member has rejoined as the synchronous standby.
    async fn restored(&self, site: &str, rows: i64) {
        eventually(
            Duration::from_secs(120),
            &format!("{site} primary with {rows} rows, the other member its synchronous standby"),
            || async {
                let v = try_get_json(self.up.api, "/v1/databases").await?;
                let d = &v["databases"][0];
                let other = if site == "edge" { "region" } else { "edge" };
                (d["primary"] == site
                    && d["sync_standby"] == other
                    && d["state"] == "healthy"
                    && self.count().await == Some(rows))
                .then_some(())
            },
        )
        .await;
    }

    /// The database server's clock now, to the millisecond, plus 2 ms (RFC 3339): a target
    /// after every commit made so far. Returns once the server's clock has passed it.
    async fn target_after_last_commit(&self) -> String {
        let c = self.client().await;
        let now: f64 = c
            .query_one("SELECT extract(epoch FROM clock_timestamp())::float8", &[])
            .await
            .unwrap()
            .get(0);
        let t = std::time::UNIX_EPOCH + Duration::from_secs_f64(now + 0.002);
        self.clock_past(t + Duration::from_millis(1)).await;
        event::rfc3339(t)
    }

    /// Returns once the database server's clock has passed `t`.
    async fn clock_past(&self, t: std::time::SystemTime) {
        let c = self.client().await;
        let after = t
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        eventually(
            Duration::from_secs(5),
            "the server's clock past a time",
            || async {
                let now: f64 = c
                    .query_one("SELECT extract(epoch FROM clock_timestamp())::float8", &[])
                    .await
                    .ok()?
                    .get(0);
                (now > after).then_some(())
            },
        )
        .await;
    }
}

/// `tandem restore`: the database back to a named time with the edge's member as primary
/// (the rows committed after it gone, the former data set aside, the region rejoining the
/// restored history as the synchronous standby, writes going on), then to the newest
/// archived WAL with the region's member as primary. A copy directory that is not empty is
/// refused untouched, the database going on as before.
#[tokio::test(flavor = "multi_thread")]
async fn a_restore_brings_the_database_back_to_a_point_in_time() {
    let db = start(81, Path::new("repo"), true).await;
    db.client()
        .await
        .batch_execute("CREATE TABLE acked (id bigserial PRIMARY KEY)")
        .await
        .unwrap();
    let first = eventually(Duration::from_secs(90), "the first full backup", || async {
        let b = db.backups().await;
        b["backups"].as_array().filter(|a| !a.is_empty()).cloned()
    })
    .await;
    // A time before the backup finished cannot be restored to; said before anything runs.
    let stopped = event::parse_rfc3339(first[0]["stopped"].as_str().unwrap()).unwrap();
    let before = event::rfc3339(stopped - Duration::from_secs(1));
    let out = db.cli(&["restore", "orders", "--site", "edge", "--to", &before]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(3) && err.contains("no backup finished before"),
        "{err}"
    );
    // pgBackRest compares a target with backups' stop times in whole seconds.
    db.clock_past(stopped + Duration::from_secs(1)).await;
    db.insert(100).await;
    let target = db.target_after_last_commit().await;
    db.insert(30).await;
    db.switch_and_archive().await;

    // A leftover copy directory: refused, left as it was, the database untouched.
    let leftover = db.state.join("databases/orders/edge.restored");
    owned_by_db_user(&leftover);
    std::fs::write(leftover.join("keep"), "mine").unwrap();
    let out = db.cli(&["restore", "orders", "--site", "edge", "--to", &target]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("is not empty"), "{err}");
    assert_eq!(
        std::fs::read_to_string(leftover.join("keep")).unwrap(),
        "mine"
    );
    std::fs::remove_dir_all(&leftover).unwrap();
    assert_eq!(db.count().await, Some(130));

    // To the named time, the edge's member the primary.
    let out = db.cli(&[
        "restore", "orders", "--site", "edge", "--to", &target, "--json",
    ]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["site"], "edge", "{r:#}");
    assert_eq!(r["copy"]["rows"], 100, "{r:#}");
    assert_eq!(r["copy"]["target"], target, "{r:#}");
    let aside = PathBuf::from(r["set_aside"].as_str().unwrap());
    let named = aside.file_name().unwrap().to_string_lossy().to_string();
    assert!(
        named.starts_with("edge.before-restore-") && aside.join("PG_VERSION").is_file(),
        "{r:#}"
    );
    assert!(
        r["former_set_aside"].is_null(),
        "the edge was the primary: {r:#}"
    );
    assert!(!leftover.exists());
    db.restored("edge", 100).await;
    let v = get_json(db.up.api, "/v1/databases").await;
    let d = &v["databases"][0];
    assert_eq!(d["last_change"]["kind"], "restore", "{d:#}");
    assert_eq!(d["term"], r["term"], "{d:#}");
    wait_event(db.up.api, "restored edge from the backups").await;
    // Writes go on, acknowledged by the region's rejoined member too.
    db.insert(20).await;
    db.switch_and_archive().await;

    // To the newest archived WAL, the region's member the primary.
    let out = db.cli(&["restore", "orders", "--site", "region"]);
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("restored orders to latest: region is the primary")
            && text.contains("rows          120 in public.acked")
            && text.contains("former primary's data")
            && text.contains("edge.before-restore-"),
        "{text}"
    );
    db.restored("region", 120).await;
    db.insert(10).await;
    assert_eq!(db.count().await, Some(130));
    let metrics = http_get(db.up.api, "/metrics").await;
    assert!(
        metrics.contains("tandem_db_primary_changes_total{database=\"orders\",kind=\"restore\"} 2"),
        "{metrics}"
    );
}

/// A tmpfs of `size` mounted at `dir` (owned by the database user), unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount a tmpfs at {}", dir.display());
        owned_by_db_user(dir);
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// A repository that is full (a 3 MB tmpfs) or that the database user cannot write: each
/// said in an event with pgBackRest's reason, the backups failing, and the primary's commits
/// acknowledged all along (archiving never blocks them).
#[tokio::test(flavor = "multi_thread")]
async fn a_full_or_unwritable_repository_is_reported_and_never_blocks_commits() {
    let mounts = tempfile::tempdir().unwrap();
    std::fs::set_permissions(mounts.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let full = mounts.path().join("full");
    let _tmpfs = Tmpfs::mount(&full, "3m");
    let db = start(75, &full, false).await;
    db.client()
        .await
        .batch_execute("CREATE TABLE acked (id bigserial PRIMARY KEY)")
        .await
        .unwrap();
    // The first full backup does not fit.
    let e = eventually(Duration::from_secs(90), "a failed backup", || async {
        recent_events(db.up.api)
            .await
            .into_iter()
            .find(|e| e["kind"] == "backup-failed")
    })
    .await;
    // pgBackRest's reason, as it words it for the file it could not write.
    let msg = e["message"].as_str().unwrap();
    assert!(
        msg.contains("No space left on device") || msg.contains("unable to write"),
        "{msg}"
    );
    let c = db.client().await;
    for _ in 0..3 {
        db.insert(20).await;
        c.batch_execute("SELECT pg_switch_wal()").await.unwrap();
    }
    db.insert(50).await;
    drop(db);

    // A repository the database user cannot write (root's, 0755).
    let locked = mounts.path().join("locked");
    std::fs::create_dir_all(&locked).unwrap();
    let db = start(79, &locked, false).await;
    let e = wait_event(db.up.api, "cannot create the stanza").await;
    let msg = e["message"].as_str().unwrap();
    assert!(msg.contains("Permission denied"), "{msg}");
    db.client()
        .await
        .batch_execute("CREATE TABLE acked (id bigserial PRIMARY KEY)")
        .await
        .unwrap();
    db.insert(50).await;
    let out = db.cli(&["backup", "orders", "now"]);
    assert_eq!(out.status.code(), Some(3));
}

/// A database without `[database.backup]` says so; unknown ones are 404.
#[tokio::test(flavor = "multi_thread")]
async fn backup_commands_refuse_clearly() {
    let db = start(64, Path::new("repo"), true).await;
    let out = db.cli(&["backup", "nosuch", "list"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no database \"nosuch\""));
    let out = db.cli(&["backup", "orders", "now", "--type", "weekly"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown backup type"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = db.cli(&["drill", "restore", "orders", "--to", "yesterday"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a time"));
    let out = db.cli(&["restore", "orders", "--site", "edge", "--to", "yesterday"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a time"));
    let out = db.cli(&["restore", "orders", "--site", "moon"]);
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no member in site \"moon\" (members: edge, region)"),
        "{err}"
    );
    let out = db.cli(&["restore", "orders"]);
    assert_eq!(out.status.code(), Some(2), "--site is required");
}
