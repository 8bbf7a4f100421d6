//! Scale sets through `tandem up`: real sample-app processes behind a real load balancer.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use testkit::eventually;

mod common;
use common::*;

/// A site, a monitor on `/healthz`, a scale set of sample apps on `ip` and a load balancer in
/// front of it on `front` with a 2 s `drain_timeout`; `set` adds lines to the `[[scale_set]]`.
fn scale_set_topology(
    dir: &Path,
    api: SocketAddr,
    ip: &str,
    front: SocketAddr,
    set: &str,
) -> std::path::PathBuf {
    scale_set_topology_with(dir, api, ip, front, "drain_timeout = \"2s\"", set)
}

/// [`scale_set_topology`] with `lb` as the last lines of the `[[load_balancer]]`.
fn scale_set_topology_with(
    dir: &Path,
    api: SocketAddr,
    ip: &str,
    front: SocketAddr,
    lb: &str,
    set: &str,
) -> std::path::PathBuf {
    topology_file(
        dir,
        api,
        &format!(
            r#"[[site]]
name = "edge"
role = "edge"
[[monitor]]
name = "web"
protocol = "http"
port = 1
path = "/healthz"
interval = "200ms"
timeout = "150ms"
tolerated_failures = 1
recovery_successes = 1
[[load_balancer]]
name = "edge-web"
site = "edge"
frontend = "{front}"
pool = {{ scale_set = "web", port = "http" }}
probe = "web"
{lb}
[[scale_set]]
name = "web"
site = "edge"
bind = "{ip}"
ports = {{ http = "21000-21019" }}
health = "web"
{set}
"#
        ),
    )
}

const COMMAND: &str = r#"command = ["tandem", "sample-app", "--listen", "{address}:{port.http}", "--site", "{site}"]"#;

fn front(ip: [u8; 4]) -> SocketAddr {
    (ip, testkit::free_udp_tcp_port(ip.into())).into()
}

async fn set_view(api: SocketAddr) -> Value {
    match try_get_json(api, "/v1/scale-sets").await {
        Some(v) => v["scale_sets"][0].clone(),
        None => Value::Null,
    }
}

fn instances(view: &Value) -> Vec<Value> {
    view["instances"].as_array().cloned().unwrap_or_default()
}

/// Instance ids that run and are Online.
fn serving(view: &Value) -> BTreeSet<String> {
    instances(view)
        .iter()
        .filter(|i| i["state"] == "running" && i["health"] == "Online")
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect()
}

fn address(i: &Value) -> SocketAddr {
    format!("{}:{}", i["address"].as_str().unwrap(), i["ports"]["http"])
        .parse()
        .unwrap()
}

/// The load balancer's members, and those taking new flows.
async fn pool(api: SocketAddr) -> (BTreeSet<SocketAddr>, BTreeSet<SocketAddr>) {
    let lbs = try_get_json(api, "/v1/load-balancers")
        .await
        .unwrap_or_default();
    let backends = lbs["load_balancers"][0]["backends"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let addr = |b: &Value| b["address"].as_str().unwrap().parse().unwrap();
    (
        backends.iter().map(addr).collect(),
        backends
            .iter()
            .filter(|b| b["takes_new_flows"] == true)
            .map(addr)
            .collect(),
    )
}

/// Waits until exactly `n` instances serve and the pool is exactly their addresses.
async fn settled(api: SocketAddr, n: usize, what: &str) -> Value {
    settled_without(api, n, what, None).await
}

/// [`settled`], and `gone` (an instance id) no longer serving: the view published before the
/// runner handled its exit still shows it.
async fn settled_without(api: SocketAddr, n: usize, what: &str, gone: Option<&str>) -> Value {
    eventually(Duration::from_secs(20), what, || async {
        let v = set_view(api).await;
        if gone.is_some_and(|g| serving(&v).contains(g)) {
            return None;
        }
        let live: Vec<Value> = instances(&v)
            .into_iter()
            .filter(|i| i["state"] != "retiring")
            .collect();
        let addrs: BTreeSet<SocketAddr> = live.iter().map(address).collect();
        let (members, taking) = pool(api).await;
        (serving(&v).len() == n && live.len() == n && members == addrs && taking == addrs)
            .then_some(v)
    })
    .await
}

async fn event_with(api: SocketAddr, text: &str) -> Value {
    eventually(Duration::from_secs(20), text, || async {
        recent_events(api)
            .await
            .into_iter()
            .find(|e| e["source"] == "scale-set" && e["message"].as_str().unwrap().contains(text))
    })
    .await
}

/// Instances start and register in the pool; `kill -9` of one, or one failing its health
/// check past the grace period, gets it replaced and the pool updated; `tandem scale` changes
/// the capacity within min..max; SIGTERM stops every instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_register_get_repaired_scale_and_stop_with_tandem() {
    let dir = tempfile::tempdir().unwrap();
    let api = testkit::closed_port();
    let front = front([127, 0, 6, 10]);
    let topology = scale_set_topology(
        dir.path(),
        api,
        "127.0.6.1",
        front,
        &format!(
            "{COMMAND}\ncapacity = {{ min = 1, max = 4, initial = 2 }}\nrepair = {{ grace_period = \"1s\" }}"
        ),
    );
    let mut up = Up::start(&topology, api, &[]);
    let v = settled(api, 2, "two instances serving in the pool").await;
    let mut seen_pids = instance_pids(&v);

    // Requests through the load balancer reach both instances, which report the site.
    let mut answered = BTreeSet::new();
    for _ in 0..40 {
        let reply = http_get(front, "/").await;
        let b = body(&reply);
        assert!(b.starts_with("site=edge instance=web-"), "{reply}");
        answered.insert(b.split_whitespace().nth(1).unwrap().to_string());
    }
    assert_eq!(answered.len(), 2, "{answered:?}");
    // Each instance's output is in its log under the state directory.
    let log = instances(&v)[0]["log"].as_str().unwrap().to_string();
    assert!(log.starts_with(dir.path().join("state").to_str().unwrap()));
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("listening on 127.0.6.1:2100")
    );

    // kill -9: replaced, and the pool follows.
    let victim = instances(&v)[0].clone();
    let victim_pid = victim["pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let e = event_with(api, "replacing: exited: signal: 9 (SIGKILL)").await;
    assert_eq!(
        e["subject"],
        format!("web/{}", victim["id"].as_str().unwrap())
    );
    let v = settled_without(api, 2, "a replacement serving", victim["id"].as_str()).await;
    assert!(!serving(&v).contains(victim["id"].as_str().unwrap()));
    seen_pids.extend(instance_pids(&v));

    // Failing its health check past the grace period: replaced too.
    let sick = instances(&v)[0].clone();
    assert!(http_post(address(&sick), "/fail").await.contains("failing"));
    event_with(api, "replacing: Degraded for").await;
    let v = settled_without(
        api,
        2,
        "the unhealthy instance replaced",
        sick["id"].as_str(),
    )
    .await;
    assert!(!serving(&v).contains(sick["id"].as_str().unwrap()));
    seen_pids.extend(instance_pids(&v));

    // Manual scaling, within min..max only.
    let api_arg = api.to_string();
    let out = run(tandem().args(["scale", "web", "--to", "3", "--api", &api_arg]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = settled(api, 3, "three instances after tandem scale --to 3").await;
    seen_pids.extend(instance_pids(&v));
    let out = run(tandem().args(["scale", "web", "--to", "5", "--api", &api_arg]));
    assert_eq!(out.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("capacity 5 is outside 1..=4 (capacity.min and capacity.max of web)"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = run(tandem().args(["status", "--api", &api_arg]));
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("web (edge)") && table.contains("3 of 3 (min 1, max 4)"),
        "{table}"
    );

    // SIGTERM: tandem stops every instance before it exits.
    assert!(up.terminate().success());
    for pid in seen_pids {
        assert!(!alive(pid), "instance pid {pid} outlived tandem");
    }
}

/// `kill -9` of tandem itself: the kernel takes its instances down with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_tandem_leaves_no_instance_behind() {
    let dir = tempfile::tempdir().unwrap();
    let api = testkit::closed_port();
    let front = front([127, 0, 6, 20]);
    let topology = scale_set_topology(
        dir.path(),
        api,
        "127.0.6.2",
        front,
        &format!("{COMMAND}\ncapacity = {{ min = 1, max = 4, initial = 2 }}"),
    );
    let mut up = Up::start(&topology, api, &[]);
    let v = settled(api, 2, "two instances").await;
    let pids = instance_pids(&v);
    up.child.kill().unwrap();
    wait_exit(&mut up.child, Duration::from_secs(30));
    eventually(Duration::from_secs(10), "instances gone", || async {
        pids.iter().all(|p| !alive(*p)).then_some(())
    })
    .await;
}

/// CPU burn drives a scale-out, idleness a scale-in; never past min or max. Prints the time
/// from the start of the burn to the new instance answering through the load balancer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_drives_scale_out_and_idleness_scale_in() {
    let dir = tempfile::tempdir().unwrap();
    let api = testkit::closed_port();
    let front = front([127, 0, 6, 30]);
    let topology = scale_set_topology(
        dir.path(),
        api,
        "127.0.6.3",
        front,
        &format!(
            r#"{COMMAND}
capacity = {{ min = 1, max = 2, initial = 1 }}
  [[scale_set.autoscale]]
  metric = "cpu"
  above = 50
  window = "1s"
  change = "+1"
  cooldown = "1s"
  [[scale_set.autoscale]]
  metric = "cpu"
  below = 10
  window = "2s"
  change = "-1"
  cooldown = "1s"
"#
        ),
    );
    let _up = Up::start(&topology, api, &[]);
    let v = settled(api, 1, "one instance").await;
    let first = instances(&v)[0].clone();
    let first_id = first["id"].as_str().unwrap().to_string();
    let started = tokio::time::Instant::now();
    let burner = tokio::spawn(http_get(address(&first), "/burn?ms=6000"));
    // Serving: a request through the load balancer answered by another instance.
    let new_id = eventually(
        Duration::from_secs(20),
        "a second instance serving",
        || async {
            let reply = http_get(front, "/").await;
            let who = body(&reply)
                .split_whitespace()
                .nth(1)?
                .strip_prefix("instance=")?
                .to_string();
            (who != first_id).then_some(who)
        },
    )
    .await;
    let took = started.elapsed();
    eprintln!("breach to new instance serving: {} ms", took.as_millis());
    let e = event_with(api, "autoscale out 1 -> 2: cpu").await;
    assert!(
        e["message"].as_str().unwrap().contains("above 50 over 1s"),
        "{e}"
    );
    burner.await.unwrap();

    // Idle: back to min, never below.
    event_with(api, "autoscale in 2 -> 1").await;
    let v = settled(api, 1, "back to one instance").await;
    assert_eq!(v["desired"], 1);
    assert_eq!(v["scale_outs"], 1, "max is 2: no further scale-out");
    assert!(
        serving(&v).len() == 1 && (serving(&v).contains(&first_id) ^ serving(&v).contains(&new_id))
    );
}

/// A changed template rolls through in batches of `max_batch` after `tandem reload`; the pool
/// never has fewer than capacity − max_batch instances taking flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_change_rolls_through_keeping_the_floor() {
    let dir = tempfile::tempdir().unwrap();
    let api = testkit::closed_port();
    let front = front([127, 0, 6, 40]);
    let policy = "capacity = { min = 1, max = 6, initial = 4 }\nupgrade = { max_batch = 2, max_unhealthy = 1, pause = \"300ms\" }\nrepair = { grace_period = \"5s\" }";
    let topology = scale_set_topology(
        dir.path(),
        api,
        "127.0.6.4",
        front,
        &format!("{COMMAND}\n{policy}"),
    );
    let _up = Up::start(&topology, api, &[]);
    settled(api, 4, "four instances").await;

    let v2 = COMMAND.replace("\"{site}\"", "\"{site}-v2\"");
    scale_set_topology(
        dir.path(),
        api,
        "127.0.6.4",
        front,
        &format!("{v2}\n{policy}"),
    );
    let out = run(tandem().args(["reload", "--api", &api.to_string()]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("scale set web: command changed: applied"),
        "{said}"
    );

    let mut floor = usize::MAX;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, taking) = pool(api).await;
        floor = floor.min(taking.len());
        let v = set_view(api).await;
        let done = v["upgrading"] == false
            && instances(&v)
                .iter()
                .all(|i| i["template"] == 1 && i["state"] == "running");
        if done && serving(&v).len() == 4 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "upgrade did not finish: {v:#}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(floor >= 2, "pool fell to {floor}, below 4 - max_batch");
    event_with(
        api,
        "upgrade to template 1 complete: 4 instances upgraded, 0 failed",
    )
    .await;
    settled(api, 4, "pool follows").await;
    for _ in 0..10 {
        let reply = http_get(front, "/").await;
        assert!(body(&reply).starts_with("site=edge-v2 "), "{reply}");
    }
}

/// An instance that survives SIGTERM (it logs `TERM ignored`) and starts a child, in its
/// process group, that ignores it: only a SIGKILL to the whole group ends them.
const STUBBORN: &str = r#"trap 'echo TERM ignored' TERM
(trap '' TERM; exec sleep 300) &
echo child $!
while kill -0 $! 2>/dev/null; do wait $!; done"#;

/// The parent and process group of a process, from `/proc/PID/stat`.
fn parent_and_group(pid: i32) -> Option<(i32, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(1);
    Some((fields.next()?.parse().ok()?, fields.next()?.parse().ok()?))
}

/// The running children of `pid`.
fn children(pid: i32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|&p| alive(p) && parent_and_group(p).is_some_and(|(parent, _)| parent == pid))
        .collect()
}

/// Whether a process ignores SIGTERM (`SigIgn` in `/proc/PID/status`).
fn ignores_sigterm(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let mask = s.lines().find_map(|l| l.strip_prefix("SigIgn:"))?;
            u64::from_str_radix(mask.trim(), 16).ok()
        })
        .is_some_and(|mask| mask & (1 << (nix::sys::signal::Signal::SIGTERM as i32 - 1)) != 0)
}

/// SIGKILLs these process groups if the test fails, so that no stray process outlives it.
struct KillGroupsOnPanic(Vec<i32>);

impl Drop for KillGroupsOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for g in &self.0 {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(*g),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// A stop sends SIGTERM, waits `stop_grace`, then SIGKILLs the whole process group: an
/// instance that ignores SIGTERM, and the child it started, are both gone afterwards — on a
/// scale-in, and when tandem itself stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_is_sigterm_then_after_stop_grace_sigkill_to_the_group() {
    let dir = tempfile::tempdir().unwrap();
    let api = testkit::closed_port();
    let write = |grace: &str| {
        topology_file(
            dir.path(),
            api,
            &format!(
                r#"[[site]]
name = "edge"
role = "edge"
[[scale_set]]
name = "stubborn"
site = "edge"
bind = "127.0.6.5"
command = ["sh", "-c", '''{STUBBORN}''']
capacity = {{ min = 1, max = 2, initial = 2 }}
stop_grace = "{grace}"
"#
            ),
        )
    };
    let topology = write("1s");
    let mut up = Up::start(&topology, api, &[]);
    // (instance id, pid, its child's pid, log) once each child runs and ignores SIGTERM.
    let family = eventually(
        Duration::from_secs(20),
        "two instances, each with a child that ignores SIGTERM",
        || async {
            let v = set_view(api).await;
            let mut out = Vec::new();
            for i in instances(&v) {
                let pid = i["pid"].as_i64()? as i32;
                let child = *children(pid).first()?;
                ignores_sigterm(child).then_some(())?;
                let log = i["log"].as_str()?.to_string();
                out.push((i["id"].as_str()?.to_string(), pid, child, log));
            }
            (out.len() == 2).then_some(out)
        },
    )
    .await;
    let _cleanup = KillGroupsOnPanic(family.iter().map(|f| f.1).collect());
    for (_, pid, child, _) in &family {
        assert_eq!(
            parent_and_group(*child).map(|(_, group)| group),
            Some(*pid),
            "the child runs in its instance's process group"
        );
    }

    // Scale-in: the newest instance gets SIGTERM, ignores it, and is killed after the grace.
    let asked = tokio::time::Instant::now();
    let out = run(tandem().args(["scale", "stubborn", "--to", "1", "--api", &api.to_string()]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let e = event_with(api, "stopped: signal: 9 (SIGKILL) (killed after 1s)").await;
    let took = asked.elapsed();
    let subject = e["subject"].as_str().unwrap();
    let (id, pid, child, log) = family
        .iter()
        .find(|f| subject == format!("stubborn/{}", f.0))
        .unwrap_or_else(|| panic!("{e}"));
    assert!(
        took >= Duration::from_secs(1),
        "{id} was killed {took:?} after the scale-in, within its stop_grace"
    );
    let said = std::fs::read_to_string(log).unwrap();
    assert!(
        said.contains("TERM ignored"),
        "no SIGTERM came first: {said}"
    );
    eventually(
        Duration::from_secs(5),
        "the retired instance and its child gone",
        || async { (!alive(*pid) && !alive(*child)).then_some(()) },
    )
    .await;
    let (_, other_pid, other_child, other_log) = family.iter().find(|f| f.0 != *id).unwrap();
    assert!(
        alive(*other_pid) && alive(*other_child),
        "the other instance's group was hit too"
    );

    // A reload changes the grace; tandem stopping stops the last instance the same way,
    // before it exits.
    write("2s");
    let out = run(tandem().args(["reload", "--api", &api.to_string()]));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("scale set stubborn: stop_grace changed: applied"),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let asked = tokio::time::Instant::now();
    assert!(up.terminate().success());
    let took = asked.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "tandem stopped its instance within {took:?}, less than its stop_grace"
    );
    let logged = std::fs::read_to_string(up.log.as_ref().unwrap()).unwrap();
    assert!(
        logged.contains("stopped: signal: 9 (SIGKILL) (killed after 2s)"),
        "{logged}"
    );
    let said = std::fs::read_to_string(other_log).unwrap();
    assert!(
        said.contains("TERM ignored"),
        "no SIGTERM came first: {said}"
    );
    eventually(
        Duration::from_secs(5),
        "the last instance and its child gone",
        || async { (!alive(*other_pid) && !alive(*other_child)).then_some(()) },
    )
    .await;
}

/// The instance named in a sample-app answer.
fn answered_by(body: &str) -> Option<String> {
    body.split_whitespace()
        .find_map(|w| w.strip_prefix("instance="))
        .map(str::to_string)
}

/// New flows through the load balancer, above the rule's rate for longer than its window,
/// drive a `connection_rate` scale-out; idleness does not (it drives the scale-in rule).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_flows_drive_a_connection_rate_scale_out_and_idleness_does_not() {
    /// New flows per second sent through the load balancer: five times the rule's threshold.
    const RATE: u32 = 50;
    let dir = tempfile::tempdir().unwrap();
    let api = testkit::closed_port();
    let front = front([127, 0, 6, 60]);
    let topology = scale_set_topology(
        dir.path(),
        api,
        "127.0.6.6",
        front,
        &format!(
            r#"{COMMAND}
capacity = {{ min = 1, max = 2, initial = 2 }}
  [[scale_set.autoscale]]
  metric = "connection_rate"
  above = 10
  window = "1s"
  change = "+1"
  cooldown = "1s"
  [[scale_set.autoscale]]
  metric = "connection_rate"
  below = 2
  window = "1s"
  change = "-1"
  cooldown = "1s"
"#
        ),
    );
    let _up = Up::start(&topology, api, &[]);
    eventually(Duration::from_secs(20), "the API", || async {
        Some(set_view(api).await).filter(|v| !v.is_null())
    })
    .await;

    // Idle from the start (health probes are not flows): a whole window at no new flows
    // scales in, and the scale-out rule, judged on the same window first, never fired.
    let e = event_with(api, "autoscale in 2 -> 1: connection_rate 0.0 below 2").await;
    assert!(e["message"].as_str().unwrap().contains("over 1s"), "{e}");
    let v = settled(api, 1, "one instance after the idle scale-in").await;
    assert_eq!(v["scale_outs"], 0, "idleness fired the rate rule: {v:#}");
    let first = serving(&v).into_iter().next().unwrap();

    // New flows at RATE per second, each a whole request through the load balancer.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let load = tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(1) / RATE);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let end = tokio::time::Instant::now() + Duration::from_secs(40);
        let mut flows = 0u32;
        while !*stopped.borrow() && tokio::time::Instant::now() < end {
            every.tick().await;
            let reply = http_get(front, "/").await;
            assert!(answered_by(body(&reply)).is_some(), "{reply}");
            flows += 1;
        }
        flows
    });
    let started = tokio::time::Instant::now();
    let e = event_with(api, "autoscale out 1 -> 2: connection_rate").await;
    eprintln!(
        "new flows at {RATE}/s to scale-out: {} ms",
        started.elapsed().as_millis()
    );
    let message = e["message"].as_str().unwrap();
    assert!(message.contains("above 10 over 1s"), "{e}");
    // The rate per instance, as the rule saw it: above the threshold, and no more than was
    // sent (one instance took every flow).
    let seen: f64 = message
        .split("connection_rate ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{e}"));
    assert!(
        seen > 10.0 && seen < f64::from(2 * RATE),
        "rate {seen} for {RATE} flows/s: {e}"
    );
    // The new instance serves flows through the load balancer.
    eventually(
        Duration::from_secs(20),
        "a flow answered by the new instance",
        || async {
            let reply = http_get(front, "/").await;
            answered_by(body(&reply)).filter(|who| *who != first)
        },
    )
    .await;
    let v = settled(api, 2, "two instances under load").await;
    assert_eq!(
        (v["desired"].clone(), v["scale_outs"].clone()),
        (2.into(), 1.into())
    );
    stop.send(true).unwrap();
    let flows = load.await.unwrap();
    eprintln!("{flows} new flows sent");

    // Without new flows, the rate falls and the set scales back in.
    eventually(
        Duration::from_secs(20),
        "back to one instance without new flows",
        || async {
            let v = set_view(api).await;
            (v["scale_ins"] == 2 && v["desired"] == 1).then_some(())
        },
    )
    .await;
}

/// One long-lived TCP flow through the load balancer: a keep-alive HTTP/1.1 connection.
struct Flow(tokio::net::TcpStream);

impl Flow {
    /// Opens flows through `front` until one reaches `instance` (at most 200 tries).
    async fn to(front: SocketAddr, instance: &str) -> Flow {
        for _ in 0..200 {
            let mut flow = Flow(tokio::net::TcpStream::connect(front).await.unwrap());
            if flow.ask().await.unwrap() == instance {
                return flow;
            }
        }
        panic!("no flow through {front} reached {instance} in 200 tries");
    }

    /// A `GET /` on this flow: the instance that answered, or why the flow failed.
    async fn ask(&mut self) -> std::io::Result<String> {
        use std::io::{Error, ErrorKind};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let talk = async {
            self.0
                .write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
                .await?;
            let mut got = Vec::new();
            let mut chunk = [0u8; 1024];
            loop {
                let text = String::from_utf8_lossy(&got).into_owned();
                if let Some((head, rest)) = text.split_once("\r\n\r\n") {
                    let length: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().to_string())
                        })
                        .and_then(|v| v.parse().ok())
                        .ok_or_else(|| Error::other(format!("no content-length: {head}")))?;
                    if rest.len() >= length {
                        return answered_by(&rest[..length])
                            .ok_or_else(|| Error::other(format!("not a sample app: {text}")));
                    }
                }
                let n = self.0.read(&mut chunk).await?;
                if n == 0 {
                    return Err(ErrorKind::UnexpectedEof.into());
                }
                got.extend_from_slice(&chunk[..n]);
            }
        };
        tokio::time::timeout(HTTP_TIMEOUT, talk)
            .await
            .unwrap_or_else(|_| Err(ErrorKind::TimedOut.into()))
    }
}

/// The live instances, oldest first (born together, the lower number was started first),
/// each with its address and pid.
fn by_age(view: &Value) -> Vec<(String, SocketAddr, i32)> {
    let number = |i: &Value| -> u64 {
        i["id"]
            .as_str()
            .unwrap()
            .rsplit('-')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let mut live: Vec<Value> = instances(view)
        .into_iter()
        .filter(|i| i["state"] == "running")
        .collect();
    live.sort_by(|a, b| {
        let age = |i: &Value| i["age_seconds"].as_f64().unwrap();
        age(b).total_cmp(&age(a)).then(number(a).cmp(&number(b)))
    });
    live.iter()
        .map(|i| {
            let id = i["id"].as_str().unwrap().to_string();
            (id, address(i), i["pid"].as_i64().unwrap() as i32)
        })
        .collect()
}

/// Scales to `n` and checks the instance that retires, `retired` on `addr`, drains: out of
/// the load balancer's pool (no new flow through `front` reaches it), while its established
/// `flow` keeps working and it keeps running.
async fn scale_in_to(
    api: SocketAddr,
    front: SocketAddr,
    n: u32,
    (retired, addr, pid): (&str, SocketAddr, i32),
    flow: &mut Flow,
) {
    let out = run(tandem().args([
        "scale",
        "web",
        "--to",
        &n.to_string(),
        "--api",
        &api.to_string(),
    ]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually(
        Duration::from_secs(10),
        &format!("{retired} out of the pool"),
        || async {
            let v = set_view(api).await;
            let running = instances(&v)
                .iter()
                .any(|i| i["id"] == retired && i["state"] == "running");
            let (members, _) = pool(api).await;
            (!running && !members.contains(&addr)).then_some(())
        },
    )
    .await;
    for _ in 0..30 {
        let connected = tokio::net::TcpStream::connect(front).await;
        match connected.map(Flow) {
            Ok(mut new) => match new.ask().await {
                Ok(who) => assert_ne!(who, retired, "a new flow reached the retiring {retired}"),
                // Refused: with no instance left, no backend takes new flows.
                Err(_) if n == 0 => {}
                Err(e) => panic!("a new flow failed: {e}"),
            },
            Err(_) if n == 0 => {}
            Err(e) => panic!("cannot connect to {front}: {e}"),
        }
    }
    match flow.ask().await {
        Ok(who) => assert_eq!(who, retired),
        Err(e) => panic!("the flow to the retiring {retired} broke: {e}"),
    }
    let v = set_view(api).await;
    assert!(
        instances(&v)
            .iter()
            .any(|i| i["id"] == retired && i["state"] == "retiring")
            && alive(pid),
        "{retired} is not retiring: {v:#}"
    );
}

/// Scale-in retires the newest instance (by default), or with `scale_in = "oldest"` the
/// oldest: out of the pool at once, so no new flow reaches it, while its established flow
/// keeps working; it stops once that flow closes, or when the load balancer's
/// `drain_timeout` has passed. Tandem stopping during a drain stops the instance as any
/// other, SIGTERM first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_in_drains_the_retired_instance_then_stops_it() {
    const DRAIN: Duration = Duration::from_secs(5);
    let dir = tempfile::tempdir().unwrap();
    let api = testkit::closed_port();
    let front = front([127, 0, 6, 70]);
    let lb = "drain_timeout = \"5s\"";
    let set = |scale_in: &str| {
        format!(
            "{COMMAND}\ncapacity = {{ min = 0, max = 3, initial = 3 }}\nscale_in = \"{scale_in}\""
        )
    };
    let topology = scale_set_topology_with(dir.path(), api, "127.0.6.7", front, lb, &set("newest"));
    let mut up = Up::start(&topology, api, &[]);
    let v = settled(api, 3, "three instances").await;
    let born = by_age(&v);
    let (oldest, middle, (newest, newest_addr, newest_pid)) =
        (born[0].clone(), born[1].clone(), born[2].clone());

    // Newest: its flow keeps working while it drains; closing the flow lets it stop.
    let mut flow = Flow::to(front, &newest).await;
    let asked = tokio::time::Instant::now();
    let retired = (newest.as_str(), newest_addr, newest_pid);
    scale_in_to(api, front, 2, retired, &mut flow).await;
    let e = event_with(api, "scale-in: retiring the newest instance").await;
    assert_eq!(e["subject"], format!("web/{newest}"));
    drop(flow);
    let closed = asked.elapsed();
    eventually(
        Duration::from_secs(20),
        "the newest instance stopped",
        || async {
            let v = set_view(api).await;
            let listed = instances(&v).iter().any(|i| i["id"] == newest);
            (!listed && !alive(newest_pid)).then_some(())
        },
    )
    .await;
    let took = asked.elapsed();
    assert!(
        took < DRAIN,
        "stopped {took:?} after the scale-in, its flow closed after {closed:?}: it waited for the drain timeout"
    );
    let v = settled(api, 2, "two instances").await;
    assert_eq!(
        serving(&v),
        BTreeSet::from([oldest.0.clone(), middle.0.clone()])
    );

    // Oldest: its flow keeps working through the whole drain timeout, then it stops.
    scale_set_topology_with(dir.path(), api, "127.0.6.7", front, lb, &set("oldest"));
    let out = run(tandem().args(["reload", "--api", &api.to_string()]));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("scale set web: scale_in changed: applied"),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (oldest, oldest_addr, oldest_pid) = oldest;
    let mut flow = Flow::to(front, &oldest).await;
    let asked = tokio::time::Instant::now();
    scale_in_to(api, front, 1, (&oldest, oldest_addr, oldest_pid), &mut flow).await;
    let e = event_with(api, "scale-in: retiring the oldest instance").await;
    assert_eq!(e["subject"], format!("web/{oldest}"));
    let ended = loop {
        match flow.ask().await {
            Ok(who) => assert_eq!(who, oldest),
            Err(_) => break asked.elapsed(),
        }
        assert!(
            asked.elapsed() < DRAIN + Duration::from_secs(20),
            "the flow outlived the drain timeout"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        ended >= DRAIN,
        "the flow ended {ended:?} after the scale-in, before the drain timeout"
    );
    eventually(
        Duration::from_secs(20),
        "the oldest instance stopped",
        || async { (!alive(oldest_pid)).then_some(()) },
    )
    .await;
    let v = settled(api, 1, "one instance").await;
    assert_eq!(serving(&v), BTreeSet::from([middle.0.clone()]));

    // Tandem stopping while the last instance drains: stopped like any other, SIGTERM first
    // (the sample app then exits 0), not just killed when tandem goes.
    let (middle, middle_addr, middle_pid) = middle;
    let mut flow = Flow::to(front, &middle).await;
    scale_in_to(api, front, 0, (&middle, middle_addr, middle_pid), &mut flow).await;
    assert!(up.terminate().success());
    assert!(!alive(middle_pid), "{middle} outlived tandem");
    let logged = std::fs::read_to_string(up.log.as_ref().unwrap()).unwrap();
    assert!(
        logged.contains(&format!("instance=\"{middle}\" stopped: exit status: 0")),
        "{logged}"
    );
}

/// An instance's log past `log_max_size` is moved to `INSTANCE.log.1` and started afresh, so a
/// chatty instance never fills the disk; the instance keeps writing to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chatty_instance_log_is_rotated() {
    let dir = tempfile::tempdir().unwrap();
    let api = testkit::closed_port();
    let topology = topology_file(
        dir.path(),
        api,
        r#"[[site]]
name = "edge"
role = "edge"
[[scale_set]]
name = "chatty"
site = "edge"
bind = "127.0.6.9"
command = ["sh", "-c", 'i=0; for c in $(seq 20); do for j in $(seq 2000); do i=$((i+1)); echo "line $i 0123456789012345678901234567890123456789012345678901234567890123456789"; done; sleep 0.3; done; sleep 600']
capacity = { min = 1, max = 1, initial = 1 }
log_max_size = "64kB"
stop_grace = "0s"
"#,
    );
    let mut up = Up::start(&topology, api, &[]);
    let log = eventually(Duration::from_secs(20), "the instance's log", || async {
        let v = set_view(api).await;
        let i = instances(&v).into_iter().next()?;
        Some(PathBuf::from(i["log"].as_str()?))
    })
    .await;
    let rotated = PathBuf::from(format!("{}.1", log.display()));
    // The instance writes ~3.2 MB in 20 bursts over ~6 s; the log is cut back as it grows
    // and the rotated copy is there.
    eventually(
        Duration::from_secs(60),
        "the instance done writing",
        || async {
            let text = std::fs::read_to_string(&log).ok()?;
            text.contains("line 40000 ").then_some(())
        },
    )
    .await;
    let size = std::fs::metadata(&log).unwrap().len();
    let old = std::fs::metadata(&rotated).unwrap().len();
    assert!(size < 3_200_000 / 2, "the log was cut back: {size} bytes");
    assert!(
        old > 64_000,
        "the rotated copy holds the earlier lines: {old} bytes"
    );
    assert!(up.terminate().success());
}
