//! The API's requests and responses, shared by the server and the CLI: a field renamed here
//! fails to compile on both sides instead of printing `-`.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

pub use cluster::{Isolation, Leadership, NodeView, VoteView};
pub use event::Event;
pub use health::{Report, Status};
pub use store::Connection;

/// Every error: what went wrong, and which field of the request it is about.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorResponse {
    pub error: String,
    pub field: String,
    /// The topology's diagnostics, for a reload of an invalid file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diagnostics: Option<String>,
}

/// `GET /v1/cluster`: how this process runs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterResponse {
    /// `single-process` or `cluster`.
    pub mode: String,
    /// This node (cluster mode).
    pub node: Option<String>,
    /// The site it runs; `None`: every site.
    pub site: Option<String>,
    pub leader: Option<Leadership>,
    pub isolation: Option<Isolation>,
    /// The coordination store as this process reaches it.
    pub store: Connection,
    /// SHA-256 of the topology file this node runs, and of the cluster's.
    pub topology: String,
    pub cluster_topology: Option<String>,
    /// Every site of the topology, in its order.
    #[serde(default)]
    pub sites: Vec<SiteView>,
}

/// A site of the topology.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SiteView {
    pub name: String,
    /// `edge`, `region` or `witness`.
    pub role: String,
}

/// `GET /v1/nodes`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodesResponse {
    pub nodes: Vec<NodeView>,
}

/// One probe target, with the votes of every live node in cluster mode.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TargetView {
    #[serde(flatten)]
    pub report: Report,
    /// What DNS uses (cluster mode: the live nodes' consensus).
    pub consensus: Option<Status>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub votes: Vec<VoteView>,
}

/// `GET /v1/health`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HealthResponse {
    pub targets: Vec<TargetView>,
}

/// `GET /v1/profiles`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProfilesResponse {
    pub profiles: Vec<dns::table::ProfileView>,
}

/// A view of something one node runs, with that node.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Placed<T> {
    /// The node running it (cluster mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(flatten)]
    pub view: T,
}

/// `GET /v1/load-balancers`: this node's, and in cluster mode every live node's.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoadBalancersResponse {
    pub load_balancers: Vec<Placed<lb::View>>,
    /// Nodes that did not answer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unreachable: Vec<String>,
}

/// `GET /v1/scale-sets`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ScaleSetsResponse {
    pub scale_sets: Vec<Placed<scaleset::View>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unreachable: Vec<String>,
}

/// `GET /v1/databases`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DatabasesResponse {
    pub databases: Vec<Placed<pg::View>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unreachable: Vec<String>,
}

/// `GET /v1/events`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EventsResponse {
    pub events: Vec<Event>,
}

/// `GET /v1/drills` and the answer to starting or stopping one.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DrillResponse {
    /// The drill in progress (cluster-wide).
    pub drill: Option<orchestrator::Drill>,
    /// The node that runs the drilled site, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applies_on: Option<String>,
    /// This node has applied it (it runs the site).
    pub applied_here: bool,
}

/// `POST /v1/drills/outage`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OutageRequest {
    pub site: String,
    /// How long, such as `"60s"`. Default 60 s.
    #[serde(default, rename = "for")]
    pub length: Option<String>,
}

/// `POST /v1/scale-sets/{set}/scale`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ScaleRequest {
    pub capacity: u32,
}

/// The answer to an operator action on one thing: stored as intent, applied where it runs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IntentResponse<T> {
    /// The thing as this node shows it now (when it runs it).
    pub view: Option<T>,
    /// The node that applies it (cluster mode), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applies_on: Option<String>,
    /// Applied by this node before the answer.
    pub applied_here: bool,
    /// Something the operator should know (autoscale will move a manual capacity…).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// `POST /v1/databases/{db}/switchover`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SwitchoverRequest {
    pub to: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SwitchoverResponse {
    pub message: String,
    pub database: pg::View,
}

/// `POST /v1/databases/{db}/backups`: a backup now. `type`: `full`, `diff` or `incr`;
/// default `incr` (pgBackRest makes it full when there is none yet).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct BackupRequest {
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
}

/// `GET /v1/databases/{db}/backups` and the answer to `POST` (with `created`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackupsResponse {
    pub database: String,
    /// Oldest first.
    pub backups: Vec<pg::backup::BackupSet>,
    /// The backup just taken (`POST`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<pg::backup::BackupSet>,
    /// The archive, the schedule, the last error and drill.
    pub status: Option<pg::backup::BackupView>,
}

/// `POST /v1/databases/{db}/backups/verify`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VerifyResponse {
    pub database: String,
    /// What `pgbackrest verify` reported.
    pub report: String,
}

/// `POST /v1/databases/{db}/restore-drill`: restore the latest backup and the archived WAL
/// into a scratch copy; `to` (RFC 3339, UTC) restores to that time instead of the newest WAL.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RestoreDrillRequest {
    #[serde(default)]
    pub to: Option<String>,
}

/// `POST /v1/databases/{db}/restore`: the database back to the newest archived WAL, or to
/// `to` (RFC 3339, UTC; `latest` or none: the newest), with `site`'s member as its primary.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RestoreRequest {
    #[serde(default)]
    pub site: String,
    #[serde(default)]
    pub to: Option<String>,
}

/// `POST /v1/reload`: what changed in the file and what became of each change.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ReloadResponse {
    /// Applied now (scale set definitions; a changed template rolls through as an upgrade).
    pub applied: Vec<String>,
    /// Changed in the file but running as before until a restart.
    pub needs_restart: Vec<String>,
    /// True when the file is the same as the running topology.
    pub unchanged: bool,
}

/// A peer node's API address, for the CLI's `--api` of another node.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Peer {
    pub node: String,
    pub api: SocketAddr,
}

/// `GET /v1/apps`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AppsResponse {
    pub apps: Vec<orchestrator::AppView>,
}

/// `POST /v1/apps/{app}/failover` (`to`) and `/pin` (`site`); `failback` and `unpin` take no
/// body.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AppRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
}

/// `GET /v1/apps/{app}/plan?to=SITE`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PlanQuery {
    pub to: Option<String>,
}
