//! What a member says about itself over SQL: role, positions, timeline, replication.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;
use tokio_postgres::{Client, NoTls};

use crate::local::{SUPERUSER, parse_lsn};

/// One standby as its primary sees it (`pg_stat_replication`).
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Replica {
    pub name: String,
    /// `streaming`, `catchup`, …
    pub state: String,
    /// `sync`, `async`, `potential`, `quorum`.
    pub sync_state: String,
    pub flush_lsn: u64,
    pub replay_lsn: u64,
    pub replay_lag_seconds: f64,
    /// When the standby sent its last reply, by its own clock (`reply_time`, as text).
    pub reply_time: String,
}

/// A member's answer to one round of questions.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Observation {
    pub in_recovery: bool,
    /// Primary: the current write position. Standby: the last replayed one.
    pub lsn: u64,
    /// Standby: the last position received and flushed.
    pub receive_lsn: u64,
    pub timeline: i32,
    /// Standby: its WAL receiver's status (`streaming` when connected).
    pub receiver: Option<String>,
    /// Primary: `synchronous_standby_names`.
    pub synchronous_standby_names: String,
    /// Primary: its standbys.
    pub replicas: Vec<Replica>,
}

/// Connects as the superuser, with a short timeout; the connection runs on its own task.
pub async fn connect(addr: SocketAddr, password: &str) -> Result<Client, String> {
    let mut config = tokio_postgres::Config::new();
    config
        .host(addr.ip().to_string())
        .port(addr.port())
        .user(SUPERUSER)
        .password(password)
        .dbname("postgres")
        .application_name("tandem")
        .connect_timeout(Duration::from_secs(1));
    let (client, connection) = config.connect(NoTls).await.map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

const MEMBER: &str = "SELECT pg_is_in_recovery(),
  (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END)::text,
  COALESCE(pg_last_wal_receive_lsn()::text, ''),
  (SELECT timeline_id FROM pg_control_checkpoint()),
  (SELECT status FROM pg_stat_wal_receiver),
  current_setting('synchronous_standby_names')";

const REPLICAS: &str = "SELECT application_name, COALESCE(state, ''), COALESCE(sync_state, ''),
  COALESCE(flush_lsn::text, ''), COALESCE(replay_lsn::text, ''),
  COALESCE(EXTRACT(EPOCH FROM replay_lag)::float8, 0), COALESCE(reply_time::text, '')
  FROM pg_stat_replication";

/// Asks a member where it stands.
pub async fn observe(client: &Client) -> Result<Observation, String> {
    let row = client
        .query_one(MEMBER, &[])
        .await
        .map_err(|e| e.to_string())?;
    let lsn = |s: Option<String>| s.as_deref().and_then(parse_lsn).unwrap_or(0);
    let mut o = Observation {
        in_recovery: row.get(0),
        lsn: lsn(row.get(1)),
        receive_lsn: lsn(row.get(2)),
        timeline: row.get::<_, Option<i32>>(3).unwrap_or(0),
        receiver: row.get(4),
        synchronous_standby_names: row.get(5),
        replicas: Vec::new(),
    };
    if !o.in_recovery {
        for r in client
            .query(REPLICAS, &[])
            .await
            .map_err(|e| e.to_string())?
        {
            o.replicas.push(Replica {
                name: r.get(0),
                state: r.get(1),
                sync_state: r.get(2),
                flush_lsn: lsn(r.get(3)),
                replay_lsn: lsn(r.get(4)),
                replay_lag_seconds: r.get(5),
                reply_time: r.get(6),
            });
        }
    }
    Ok(o)
}

/// Runs statements that change nothing but settings or roles (`ALTER SYSTEM` cannot run in a
/// transaction block, so each runs alone).
pub async fn execute(client: &Client, statements: &[&str]) -> Result<(), String> {
    for s in statements {
        client
            .batch_execute(s)
            .await
            .map_err(|e| format!("{s}: {e}"))?;
    }
    Ok(())
}

/// Quotes an SQL string literal.
pub fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}
