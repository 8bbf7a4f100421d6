//! One Tandem node as a library: `Config::load(file, node)?.build().await?` starts every part
//! the topology places on this node — probes, DNS, load balancers, scale sets, databases,
//! drills, the cluster membership and the API — and [`Node::run`] serves until a shutdown
//! signal, then stops them in order. The `tandem` binary only parses flags; tests run several
//! nodes in one process the same way.
//!
//! **Placement.** Without `[[node]]` sections (and without `--node`) one process runs every
//! site on the embedded store: the single-machine default. With them, `--node NAME` runs only
//! that node's site — its load balancers and scale sets — plus its own DNS listeners (every
//! DNS node answers every zone), a probe engine that probes every monitored endpoint (each node
//! is a vantage point) and the API, coordinated with the other nodes through etcd.

mod apply;
mod build;
mod leader;
mod reload;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tokio::net::TcpListener;
use tokio::task::AbortHandle;

pub use build::Parts;

/// What to run: the topology, and which node of it (none: every site in this process).
#[derive(Clone, Debug)]
pub struct Config {
    /// The topology file (read again on reload).
    pub file: PathBuf,
    /// Its text as loaded.
    pub text: String,
    pub topology: model::Topology,
    /// What `validate` would warn about (the file is valid).
    pub warnings: model::Diagnostics,
    /// `--node NAME`; `None` runs every site.
    pub node: Option<String>,
}

/// Why a node could not be configured or started.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The topology cannot be read or is invalid.
    #[error(transparent)]
    Load(#[from] model::LoadError),
    /// `--node` names no node, or is missing for a topology with nodes.
    #[error("{0}")]
    Usage(String),
    /// Something could not start (an address in use, the store, a database).
    #[error("{0}")]
    Start(String),
}

impl Config {
    /// Reads and validates `file`, and checks `node` against it.
    pub fn load(file: &Path, node: Option<&str>) -> Result<Config, Error> {
        let text = std::fs::read_to_string(file).map_err(|source| model::LoadError::Read {
            path: file.display().to_string(),
            source,
        })?;
        let model::Checked { topology, warnings } =
            model::check(model::Source::new(file.display().to_string(), text.clone()))
                .map_err(|d| model::LoadError::Invalid(Box::new(d)))?;
        match (node, topology.nodes.is_empty()) {
            (Some(n), _) => {
                model::find_node(&topology, n).map_err(Error::Usage)?;
            }
            (None, false) => {
                let names: Vec<&str> = topology.nodes.iter().map(|n| n.name.as_str()).collect();
                return Err(Error::Usage(format!(
                    "{} declares nodes: run one per machine with --node NAME ({})",
                    file.display(),
                    names.join(", ")
                )));
            }
            (None, true) => {}
        }
        Ok(Config {
            file: file.to_path_buf(),
            text,
            topology,
            warnings,
            node: node.map(str::to_string),
        })
    }

    /// Starts everything this node runs. Must run inside a tokio runtime.
    pub async fn build(self) -> Result<Node, Error> {
        build::build(self).await
    }
}

/// A running node.
#[derive(Debug)]
pub struct Node {
    pub parts: Parts,
    listener: TcpListener,
    tasks: Vec<AbortHandle>,
}

impl Node {
    /// The API's state: every part, for the API and the console.
    pub fn api(&self) -> &api::Api {
        &self.parts.api
    }

    /// Where the API listens.
    pub fn api_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves the API until `shutdown` completes, then stops every part in order: the node
    /// leaves the cluster (its record and votes go at once), instances stop, databases stop,
    /// DNS and load balancers stop listening, probes stop.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let Node {
            parts,
            listener,
            tasks,
        } = self;
        let served = api::serve(listener, parts.api.clone(), shutdown).await;
        for t in tasks {
            t.abort();
        }
        parts.stop().await;
        served
    }
}
