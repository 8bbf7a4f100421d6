//! Every metric Tandem exports, named in one place, rendered in the Prometheus text format.

use std::fmt::Write as _;

use std::sync::atomic::Ordering;

use dns::server::{Metrics as DnsMetrics, RCODES, Transport};
use dns::table::ProfileView;
use health::{Report, Status};

/// `1` with the version as a label.
pub const BUILD_INFO: &str = "tandem_build_info";
/// `1` when the target is Online, else `0`.
pub const TARGET_UP: &str = "tandem_health_target_up";
/// `1` for the target's current status, one series per status.
pub const TARGET_STATUS: &str = "tandem_health_target_status";
/// Latency of the target's last probe.
pub const PROBE_LATENCY: &str = "tandem_health_probe_latency_seconds";
/// Probes run per target.
pub const PROBES: &str = "tandem_health_probes_total";
/// Probes failed per target.
pub const PROBE_FAILURES: &str = "tandem_health_probe_failures_total";
/// Status changes of any target since start.
pub const STATUS_CHANGES: &str = "tandem_health_status_changes_total";
/// DNS responses by transport and response code.
pub const DNS_RESPONSES: &str = "tandem_dns_responses_total";
/// DNS queries answered from each profile.
pub const DNS_PROFILE_QUERIES: &str = "tandem_dns_profile_queries_total";
/// UDP responses truncated (the client retries over TCP).
pub const DNS_TRUNCATED: &str = "tandem_dns_truncated_total";
/// Datagrams dropped without an answer (not a query).
pub const DNS_DROPPED: &str = "tandem_dns_dropped_total";
/// UDP responses over the response-rate limit, by `action`: `dropped` (not sent) or `slipped`
/// (sent truncated, so the client retries over TCP).
pub const DNS_RRL: &str = "tandem_dns_rrl_responses_total";
/// `1` for each endpoint a profile currently answers.
pub const DNS_ENDPOINT_ANSWERED: &str = "tandem_dns_endpoint_answered";
/// Changes of the endpoints a profile answers.
pub const DNS_ANSWER_CHANGES: &str = "tandem_dns_answer_changes_total";
/// `1` when a load balancer backend takes new flows.
pub const LB_BACKEND_TAKES_FLOWS: &str = "tandem_lb_backend_takes_new_flows";
/// Flows open now, per backend.
pub const LB_BACKEND_ACTIVE: &str = "tandem_lb_backend_active_connections";
/// Flows since start, per backend.
pub const LB_BACKEND_CONNECTIONS: &str = "tandem_lb_backend_connections_total";
/// Bytes relayed per backend and direction (`in` = client to backend).
pub const LB_BACKEND_BYTES: &str = "tandem_lb_backend_bytes_total";
/// Passive ejections (a failed connect) per backend.
pub const LB_BACKEND_EJECTIONS: &str = "tandem_lb_backend_ejections_total";
/// Failed connects per backend (each retried on the next backend).
pub const LB_BACKEND_FAILED_CONNECTS: &str = "tandem_lb_backend_failed_connects_total";
/// Flow directions switched to zero-copy relaying, per backend.
pub const LB_BACKEND_SPLICED: &str = "tandem_lb_backend_spliced_directions_total";
/// `1` while every endpoint of a profile is down.
pub const DNS_PROFILE_ALL_DOWN: &str = "tandem_dns_profile_all_down";

/// Instances a scale set is to have.
pub const SCALESET_DESIRED: &str = "tandem_scaleset_desired_instances";
/// Instances per scale set and state (`starting`, `running`, `retiring`, `stopped`).
pub const SCALESET_INSTANCES: &str = "tandem_scaleset_instances";
/// Capacity changes per scale set and direction (`out`, `in`).
pub const SCALESET_SCALINGS: &str = "tandem_scaleset_scalings_total";
/// Instances repaired (replaced or restarted) per scale set.
pub const SCALESET_REPAIRS: &str = "tandem_scaleset_repairs_total";
/// CPU of each instance's process, percent of one core, over the last sample.
pub const SCALESET_INSTANCE_CPU: &str = "tandem_scaleset_instance_cpu_percent";

/// 1 for the member that is the writable primary.
pub const DB_PRIMARY: &str = "tandem_db_member_is_primary";
/// A standby's replay distance behind the primary, in bytes.
pub const DB_LAG: &str = "tandem_db_member_lag_bytes";
/// 1 for a standby streaming from the primary.
pub const DB_STREAMING: &str = "tandem_db_member_streaming";
/// The fencing token in force.
pub const DB_TERM: &str = "tandem_db_term";
/// Failovers, switchovers and restores (`kind`), counted across restarts.
pub const DB_CHANGES: &str = "tandem_db_primary_changes_total";
/// Seconds the last failover or switchover took.
pub const DB_LAST_CHANGE: &str = "tandem_db_last_change_seconds";

const STATUSES: [Status; 5] = [
    Status::CheckingEndpoint,
    Status::Online,
    Status::Degraded,
    Status::Disabled,
    Status::Stopped,
];

/// Renders the exposition text for the given health reports.
pub fn render(reports: &[Report], status_changes: u64) -> String {
    let mut out = String::with_capacity(256 + reports.len() * 512);
    header(&mut out, BUILD_INFO, "gauge", "Tandem build.");
    let _ = writeln!(
        out,
        "{BUILD_INFO}{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    header(
        &mut out,
        STATUS_CHANGES,
        "counter",
        "Health status changes of any target.",
    );
    let _ = writeln!(out, "{STATUS_CHANGES} {status_changes}");

    header(&mut out, TARGET_UP, "gauge", "1 when the target is Online.");
    for r in reports {
        let up = u8::from(r.status == Status::Online);
        let _ = writeln!(out, "{TARGET_UP}{{{}}} {up}", labels(r));
    }
    header(
        &mut out,
        TARGET_STATUS,
        "gauge",
        "1 for the target's current status.",
    );
    for r in reports {
        for s in STATUSES {
            let v = u8::from(r.status == s);
            let _ = writeln!(out, "{TARGET_STATUS}{{{},status=\"{s}\"}} {v}", labels(r));
        }
    }
    header(
        &mut out,
        PROBE_LATENCY,
        "gauge",
        "Latency of the last probe.",
    );
    for r in reports {
        if let Some(ms) = r.last_latency_ms {
            let _ = writeln!(out, "{PROBE_LATENCY}{{{}}} {}", labels(r), ms / 1000.0);
        }
    }
    header(&mut out, PROBES, "counter", "Probes run.");
    for r in reports {
        let _ = writeln!(out, "{PROBES}{{{}}} {}", labels(r), r.probes);
    }
    header(&mut out, PROBE_FAILURES, "counter", "Probes failed.");
    for r in reports {
        let _ = writeln!(out, "{PROBE_FAILURES}{{{}}} {}", labels(r), r.failures);
    }
    out
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn labels(r: &Report) -> String {
    format!(
        "target=\"{}\",monitor=\"{}\"",
        escape(&r.target),
        escape(&r.monitor)
    )
}

/// Label values escape backslash, quote and newline.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Appends the DNS metrics.
pub fn render_dns(out: &mut String, views: &[ProfileView], m: &DnsMetrics) {
    header(
        out,
        DNS_RESPONSES,
        "counter",
        "DNS responses by transport and rcode.",
    );
    for t in [Transport::Udp, Transport::Tcp] {
        for (i, (name, _)) in RCODES.iter().enumerate() {
            let n = m.responses[t as usize][i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{DNS_RESPONSES}{{transport=\"{}\",rcode=\"{name}\"}} {n}",
                t.as_str()
            );
        }
    }
    header(
        out,
        DNS_PROFILE_QUERIES,
        "counter",
        "DNS queries answered per profile.",
    );
    for (v, n) in views.iter().zip(&m.by_profile) {
        let _ = writeln!(
            out,
            "{DNS_PROFILE_QUERIES}{{profile=\"{}\"}} {}",
            escape(&v.name),
            n.load(Ordering::Relaxed)
        );
    }
    header(
        out,
        DNS_ANSWER_CHANGES,
        "counter",
        "Changes of the endpoints a profile answers.",
    );
    for (v, n) in views.iter().zip(&m.answer_changes) {
        let _ = writeln!(
            out,
            "{DNS_ANSWER_CHANGES}{{profile=\"{}\"}} {}",
            escape(&v.name),
            n.load(Ordering::Relaxed)
        );
    }
    header(out, DNS_TRUNCATED, "counter", "UDP responses truncated.");
    let _ = writeln!(
        out,
        "{DNS_TRUNCATED} {}",
        m.truncated.load(Ordering::Relaxed)
    );
    header(out, DNS_DROPPED, "counter", "Datagrams dropped unanswered.");
    let _ = writeln!(out, "{DNS_DROPPED} {}", m.dropped.load(Ordering::Relaxed));
    header(
        out,
        DNS_RRL,
        "counter",
        "UDP responses over the rate limit: dropped, or slipped (sent truncated).",
    );
    for (action, n) in [("dropped", &m.rrl_dropped), ("slipped", &m.rrl_slipped)] {
        let _ = writeln!(
            out,
            "{DNS_RRL}{{action=\"{action}\"}} {}",
            n.load(Ordering::Relaxed)
        );
    }
    header(
        out,
        DNS_ENDPOINT_ANSWERED,
        "gauge",
        "1 when the profile answers the endpoint now.",
    );
    for v in views {
        for e in &v.endpoints {
            let _ = writeln!(
                out,
                "{DNS_ENDPOINT_ANSWERED}{{profile=\"{}\",endpoint=\"{}\"}} {}",
                escape(&v.name),
                escape(&e.name),
                u8::from(e.answered)
            );
        }
    }
    header(
        out,
        DNS_PROFILE_ALL_DOWN,
        "gauge",
        "1 while every endpoint is down.",
    );
    for v in views {
        let _ = writeln!(
            out,
            "{DNS_PROFILE_ALL_DOWN}{{profile=\"{}\"}} {}",
            escape(&v.name),
            u8::from(v.all_down)
        );
    }
}

/// Appends the load balancer metrics.
pub fn render_lb(out: &mut String, views: &[lb::View]) {
    type Field = fn(&lb::balancer::BackendView) -> u64;
    let series: [(&str, &str, &str, Field); 6] = [
        (
            LB_BACKEND_TAKES_FLOWS,
            "gauge",
            "1 when the backend takes new flows.",
            |b| u64::from(b.takes_new_flows),
        ),
        (LB_BACKEND_ACTIVE, "gauge", "Flows open now.", |b| {
            b.active_connections
        }),
        (
            LB_BACKEND_CONNECTIONS,
            "counter",
            "Flows since start.",
            |b| b.total_connections,
        ),
        (LB_BACKEND_EJECTIONS, "counter", "Passive ejections.", |b| {
            b.ejections
        }),
        (
            LB_BACKEND_FAILED_CONNECTS,
            "counter",
            "Failed connects, each retried.",
            |b| b.failed_connects,
        ),
        (
            LB_BACKEND_SPLICED,
            "counter",
            "Flow directions switched to splice.",
            |b| b.spliced_directions,
        ),
    ];
    for (name, kind, help, field) in series {
        header(out, name, kind, help);
        for v in views {
            for b in &v.backends {
                let _ = writeln!(
                    out,
                    "{name}{{lb=\"{}\",backend=\"{}\"}} {}",
                    escape(&v.name),
                    b.address,
                    field(b)
                );
            }
        }
    }
    header(out, LB_BACKEND_BYTES, "counter", "Bytes relayed.");
    for v in views {
        for b in &v.backends {
            for (dir, n) in [("in", b.bytes_in), ("out", b.bytes_out)] {
                let _ = writeln!(
                    out,
                    "{LB_BACKEND_BYTES}{{lb=\"{}\",backend=\"{}\",direction=\"{dir}\"}} {n}",
                    escape(&v.name),
                    b.address
                );
            }
        }
    }
}

/// Scale sets: capacity, instances by state, scalings, repairs, CPU per instance.
pub fn render_scale_sets(out: &mut String, views: &[scaleset::View]) {
    header(
        out,
        SCALESET_DESIRED,
        "gauge",
        "Instances the set is to have.",
    );
    for v in views {
        let _ = writeln!(
            out,
            "{SCALESET_DESIRED}{{scale_set=\"{}\"}} {}",
            v.name, v.desired
        );
    }
    header(out, SCALESET_INSTANCES, "gauge", "Instances by state.");
    for v in views {
        for state in ["starting", "running", "retiring", "stopped"] {
            let n = v.instances.iter().filter(|i| i.state == state).count();
            let _ = writeln!(
                out,
                "{SCALESET_INSTANCES}{{scale_set=\"{}\",state=\"{state}\"}} {n}",
                v.name
            );
        }
    }
    header(
        out,
        SCALESET_SCALINGS,
        "counter",
        "Capacity changes by direction.",
    );
    for v in views {
        for (dir, n) in [("out", v.scale_outs), ("in", v.scale_ins)] {
            let _ = writeln!(
                out,
                "{SCALESET_SCALINGS}{{scale_set=\"{}\",direction=\"{dir}\"}} {n}",
                v.name
            );
        }
    }
    header(
        out,
        SCALESET_REPAIRS,
        "counter",
        "Instances replaced or restarted.",
    );
    for v in views {
        let _ = writeln!(
            out,
            "{SCALESET_REPAIRS}{{scale_set=\"{}\"}} {}",
            v.name, v.repairs
        );
    }
    header(
        out,
        SCALESET_INSTANCE_CPU,
        "gauge",
        "CPU percent of one core.",
    );
    for v in views {
        for i in &v.instances {
            if let Some(cpu) = i.cpu_percent {
                let _ = writeln!(
                    out,
                    "{SCALESET_INSTANCE_CPU}{{scale_set=\"{}\",instance=\"{}\"}} {cpu:.1}",
                    v.name, i.id
                );
            }
        }
    }
}

/// The database tier: who is primary, lag, term, failovers.
pub fn render_databases(out: &mut String, views: &[pg::View]) {
    if views.is_empty() {
        return;
    }
    header(out, DB_TERM, "gauge", "The fencing token (term) in force.");
    for v in views {
        let _ = writeln!(out, "{DB_TERM}{{database=\"{}\"}} {}", v.name, v.term);
    }
    header(
        out,
        DB_PRIMARY,
        "gauge",
        "1 for the member that is the writable primary.",
    );
    for v in views {
        for m in &v.members {
            let p = u8::from(v.primary.as_deref() == Some(m.site.as_str()));
            let _ = writeln!(
                out,
                "{DB_PRIMARY}{{database=\"{}\",member=\"{}\"}} {p}",
                v.name, m.site
            );
        }
    }
    header(
        out,
        DB_STREAMING,
        "gauge",
        "1 for a standby streaming from the primary.",
    );
    for v in views {
        for m in &v.members {
            let s = u8::from(m.state == "streaming");
            let _ = writeln!(
                out,
                "{DB_STREAMING}{{database=\"{}\",member=\"{}\"}} {s}",
                v.name, m.site
            );
        }
    }
    header(
        out,
        DB_LAG,
        "gauge",
        "A standby's replay distance behind the primary, in bytes.",
    );
    for v in views {
        for m in &v.members {
            if let Some(lag) = m.lag_bytes {
                let _ = writeln!(
                    out,
                    "{DB_LAG}{{database=\"{}\",member=\"{}\"}} {lag}",
                    v.name, m.site
                );
            }
        }
    }
    header(
        out,
        DB_CHANGES,
        "counter",
        "Primary changes by kind (failover, switchover, restore), kept across restarts.",
    );
    for v in views {
        for (kind, n) in [
            ("failover", v.failovers),
            ("switchover", v.switchovers),
            ("restore", v.restores),
        ] {
            let _ = writeln!(
                out,
                "{DB_CHANGES}{{database=\"{}\",kind=\"{kind}\"}} {n}",
                v.name
            );
        }
    }
    header(
        out,
        DB_LAST_CHANGE,
        "gauge",
        "Seconds the last failover or switchover took.",
    );
    for v in views {
        if let Some(c) = &v.last_change {
            let _ = writeln!(
                out,
                "{DB_LAST_CHANGE}{{database=\"{}\",kind=\"{}\"}} {:.3}",
                v.name, c.kind, c.seconds
            );
        }
    }
}

/// 1 for the site an app is active at, 0 for its other sites.
pub const APP_ACTIVE_SITE: &str = "tandem_app_active_site";
/// The app's term: grows with every move.
pub const APP_TERM: &str = "tandem_app_term";
/// Moves of an app that ended, by `outcome` (`done`, `failed`, `abandoned`).
pub const APP_MOVES: &str = "tandem_app_moves_total";
/// Seconds the app's last completed move took (its RTO as Tandem measured it).
pub const APP_LAST_MOVE: &str = "tandem_app_last_move_seconds";
/// 1 while a move of the app is under way.
pub const APP_MOVING: &str = "tandem_app_moving";

/// Appends the app metrics.
pub fn render_apps(out: &mut String, views: &[orchestrator::AppView]) {
    if views.is_empty() {
        return;
    }
    header(
        out,
        APP_ACTIVE_SITE,
        "gauge",
        "1 for the site the app is active at, 0 for its other sites.",
    );
    for v in views {
        for s in &v.sites {
            let up = u8::from(s.site == v.active);
            let _ = writeln!(
                out,
                "{APP_ACTIVE_SITE}{{app=\"{}\",site=\"{}\"}} {up}",
                v.name, s.site
            );
        }
    }
    header(
        out,
        APP_TERM,
        "gauge",
        "The app's term: grows with every move.",
    );
    for v in views {
        let _ = writeln!(out, "{APP_TERM}{{app=\"{}\"}} {}", v.name, v.term);
    }
    header(
        out,
        APP_MOVES,
        "counter",
        "Moves of the app that ended, by outcome (done, failed, abandoned).",
    );
    for v in views {
        let _ = writeln!(
            out,
            "{APP_MOVES}{{app=\"{}\",outcome=\"done\"}} {}",
            v.name, v.moves
        );
        let _ = writeln!(
            out,
            "{APP_MOVES}{{app=\"{}\",outcome=\"failed\"}} {}",
            v.name, v.failed_moves
        );
        let _ = writeln!(
            out,
            "{APP_MOVES}{{app=\"{}\",outcome=\"abandoned\"}} {}",
            v.name, v.abandoned_moves
        );
    }
    header(
        out,
        APP_MOVING,
        "gauge",
        "1 while a move of the app is under way.",
    );
    for v in views {
        let _ = writeln!(
            out,
            "{APP_MOVING}{{app=\"{}\"}} {}",
            v.name,
            u8::from(v.moving.is_some())
        );
    }
    header(
        out,
        APP_LAST_MOVE,
        "gauge",
        "Seconds the app's last completed move took, from its start to its last step.",
    );
    for v in views {
        if let Some(m) = v.last_move.as_ref().filter(|m| m.outcome == "done") {
            let _ = writeln!(
                out,
                "{APP_LAST_MOVE}{{app=\"{}\",reason=\"{}\"}} {:.3}",
                v.name, m.reason, m.seconds
            );
        }
    }
}

/// Unix time (seconds) the newest backup in the repository finished.
pub const BACKUP_LAST_SUCCESS: &str = "tandem_backup_last_success_timestamp";
/// Seconds the WAL archive is behind: 0 while every completed segment is archived.
pub const BACKUP_ARCHIVE_LAG: &str = "tandem_backup_wal_archive_lag_seconds";
/// Bytes under the backup repository (backups and archived WAL).
pub const BACKUP_REPOSITORY_BYTES: &str = "tandem_backup_repository_bytes";
/// WAL segments the primary failed to archive since its statistics were reset.
pub const BACKUP_ARCHIVE_FAILURES: &str = "tandem_backup_wal_archive_failures_total";
/// 1 when the last restore drill passed, 0 when it failed.
pub const DRILL_SUCCESS: &str = "tandem_restore_drill_success";
/// The last restore drill's RTO (restore plus start), in seconds.
pub const DRILL_RTO: &str = "tandem_restore_drill_rto_seconds";
/// The last restore drill's RPO (acknowledged commits missing from the copy), in seconds.
pub const DRILL_RPO: &str = "tandem_restore_drill_rpo_seconds";
/// Unix time (seconds) the last restore drill started.
pub const DRILL_LAST: &str = "tandem_restore_drill_last_timestamp";

/// A backup metric: name, type, help, and its value for one database's backups.
type BackupGauge<'a> = (
    &'a str,
    &'a str,
    &'a str,
    &'a dyn Fn(&pg::backup::BackupView) -> Option<f64>,
);

/// Appends the backup metrics of the databases with `[database.backup]`.
pub fn render_backups(out: &mut String, views: &[pg::View]) {
    let with: Vec<(&str, &pg::backup::BackupView)> = views
        .iter()
        .filter_map(|v| Some((v.name.as_str(), v.backup.as_ref()?)))
        .collect();
    if with.is_empty() {
        return;
    }
    let secs = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64()
    };
    let gauges: [BackupGauge<'_>; 8] = [
        (
            BACKUP_LAST_SUCCESS,
            "gauge",
            "Unix time the newest backup in the repository finished.",
            &|b| b.last_success.map(secs),
        ),
        (
            BACKUP_ARCHIVE_LAG,
            "gauge",
            "Seconds the WAL archive is behind the primary (0: every completed segment archived).",
            &|b| b.archive_lag_seconds,
        ),
        (
            BACKUP_REPOSITORY_BYTES,
            "gauge",
            "Bytes under the backup repository.",
            &|b| b.repository_bytes.map(|n| n as f64),
        ),
        (
            BACKUP_ARCHIVE_FAILURES,
            "counter",
            "WAL segments the primary failed to archive (pg_stat_archiver.failed_count).",
            &|b| b.archiver.as_ref().map(|a| a.failed_count as f64),
        ),
        (
            DRILL_SUCCESS,
            "gauge",
            "1 when the last restore drill passed, 0 when it failed.",
            &|b| b.last_drill.as_ref().map(|d| f64::from(u8::from(d.ok))),
        ),
        (
            DRILL_RTO,
            "gauge",
            "The last passed restore drill's RTO (restore plus start), in seconds.",
            &|b| {
                b.last_drill
                    .as_ref()
                    .filter(|d| d.ok)
                    .map(|d| d.rto_seconds)
            },
        ),
        (
            DRILL_RPO,
            "gauge",
            "The last passed restore drill's RPO (newest acknowledged minus newest restored commit), in seconds.",
            &|b| {
                b.last_drill
                    .as_ref()
                    .filter(|d| d.ok)
                    .and_then(|d| d.rpo_seconds)
            },
        ),
        (
            DRILL_LAST,
            "gauge",
            "Unix time the last restore drill started.",
            &|b| {
                b.last_drill
                    .as_ref()
                    .and_then(|d| event::parse_rfc3339(&d.started))
                    .map(secs)
            },
        ),
    ];
    for (name, kind, help, value) in gauges {
        header(out, name, kind, help);
        for (db, b) in &with {
            if let Some(v) = value(b) {
                let _ = writeln!(out, "{name}{{database=\"{db}\"}} {v}");
            }
        }
    }
}

/// Whether this node is cut off from the cluster store (1) or not.
pub const CLUSTER_ISOLATED: &str = "tandem_cluster_isolated";
/// 1 on the node holding the leader lease.
pub const CLUSTER_LEADER: &str = "tandem_cluster_leader";
/// The leader lease's term (fencing token) as this node knows it.
pub const CLUSTER_TERM: &str = "tandem_cluster_leader_term";
/// Nodes of the topology and whether each is alive.
pub const CLUSTER_NODE_ALIVE: &str = "tandem_cluster_node_alive";
/// 1 when this node runs another topology file than the cluster.
pub const CLUSTER_TOPOLOGY_MISMATCH: &str = "tandem_cluster_topology_mismatch";
/// Votes of the live nodes on a shared target, by status.
pub const CLUSTER_VOTES: &str = "tandem_cluster_votes";
/// Writes this node made to the cluster store.
pub const STORE_WRITES: &str = "tandem_store_writes_total";

/// Appends the cluster metrics (cluster mode only).
pub fn render_cluster(out: &mut String, api: &crate::Api) {
    let Some(node) = &api.node else {
        return;
    };
    header(
        out,
        STORE_WRITES,
        "counter",
        "Writes this node made to the cluster store (keep-alives are not writes).",
    );
    let _ = writeln!(out, "{STORE_WRITES} {}", api.store.writes());
    let iso = node.isolation();
    header(
        out,
        CLUSTER_ISOLATED,
        "gauge",
        "1 while this node cannot reach the cluster store.",
    );
    let _ = writeln!(out, "{CLUSTER_ISOLATED} {}", u8::from(iso.isolated));
    let l = node.leadership();
    header(
        out,
        CLUSTER_LEADER,
        "gauge",
        "1 on the node holding the leader lease.",
    );
    let _ = writeln!(out, "{CLUSTER_LEADER} {}", u8::from(l.me));
    header(
        out,
        CLUSTER_TERM,
        "gauge",
        "The leader lease's term, as this node knows it.",
    );
    let _ = writeln!(out, "{CLUSTER_TERM} {}", l.term);
    header(
        out,
        CLUSTER_TOPOLOGY_MISMATCH,
        "gauge",
        "1 when this node runs another topology than the cluster.",
    );
    let _ = writeln!(
        out,
        "{CLUSTER_TOPOLOGY_MISMATCH} {}",
        u8::from(node.topology_mismatch())
    );
    header(
        out,
        CLUSTER_NODE_ALIVE,
        "gauge",
        "1 for each node of the topology that is alive.",
    );
    for n in node.nodes() {
        let _ = writeln!(
            out,
            "{CLUSTER_NODE_ALIVE}{{node=\"{}\",site=\"{}\"}} {}",
            escape(&n.name),
            escape(&n.site),
            u8::from(n.alive)
        );
    }
    header(
        out,
        CLUSTER_VOTES,
        "gauge",
        "Live nodes voting each status on a shared target.",
    );
    for target in &node.config().shared_targets {
        let votes = node.votes(target);
        for (status, label) in [(Status::Online, "Online"), (Status::Degraded, "Degraded")] {
            let n = votes.iter().filter(|v| v.status == Some(status)).count();
            let _ = writeln!(
                out,
                "{CLUSTER_VOTES}{{target=\"{}\",status=\"{label}\"}} {n}",
                escape(target)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_rate_limited_responses_are_counted_by_action() {
        let m = DnsMetrics::new(0);
        m.rrl_dropped.store(7, Ordering::Relaxed);
        m.rrl_slipped.store(3, Ordering::Relaxed);
        let mut out = String::new();
        render_dns(&mut out, &[], &m);
        assert!(
            out.contains("# TYPE tandem_dns_rrl_responses_total counter\n"),
            "{out}"
        );
        assert!(out.contains("tandem_dns_rrl_responses_total{action=\"dropped\"} 7\n"));
        assert!(out.contains("tandem_dns_rrl_responses_total{action=\"slipped\"} 3\n"));
    }
}
