//! What nodes write to the store, as JSON (one record per key of `store::keys`).

use std::net::SocketAddr;
use std::time::SystemTime;

use health::Status;
use serde::{Deserialize, Serialize};

/// `nodes/NODE`, under the node's session: present exactly while the node is alive.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    pub site: String,
    pub api: SocketAddr,
    pub dns: Vec<SocketAddr>,
    /// Tandem's version.
    pub version: String,
    #[serde(with = "event::time")]
    pub started: SystemTime,
    /// The process and its machine, to tell a stale record of this node's previous run from
    /// a second process started with the same `--node`.
    pub pid: u32,
    pub host: String,
    /// SHA-256 of the topology file the node runs.
    pub topology: String,
}

/// `health/NODE/TARGET`: one node's verdict on a target, written when it changes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vote {
    pub status: Status,
    #[serde(with = "event::time")]
    pub since: SystemTime,
    /// Why, as the node's probe saw it.
    pub reason: String,
}

/// `decisions/dns/PROFILE`: the endpoint the leader lets take a priority profile's traffic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// The endpoint's name; `None` when none is available.
    pub endpoint: Option<String>,
    pub leader: String,
    pub term: u64,
}

/// `topology`: the topology the cluster runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopologyRecord {
    pub hash: String,
    /// The node that wrote it (its first start, or a reload through it).
    pub by: String,
    #[serde(with = "event::time")]
    pub at: SystemTime,
}

/// SHA-256 of a topology file's bytes, in hex: nodes compare it to know they run one file.
pub fn topology_hash(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether a process runs on this machine (a zombie has exited).
pub fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| !r.trim_start().starts_with('Z'))
    })
}

/// This machine's host name.
pub fn host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown".into())
}
