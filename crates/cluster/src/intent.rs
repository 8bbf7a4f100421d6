//! Operator intent as desired-state records: an endpoint disabled, a backend drained, a scale
//! set's capacity, the drill in progress, the last reload. Any node's API writes them; every
//! node reads them from its mirror and applies what concerns its own services (the DNS nodes
//! an endpoint switch, the site's node a drain, a capacity or a drill). In the single-process
//! default the same records live in the embedded store and the one process applies them all.
//!
//! Intent survives a node's restart in cluster mode (it is in etcd): a restarted node applies
//! it again.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use store::{Expect, Mirror, Scope, Store, StoreError, StoreExt as _, keys};
use tokio::sync::watch;

/// `intent/endpoints/PROFILE/ENDPOINT`: present while the endpoint is disabled.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DisabledEndpoint {
    pub profile: String,
    pub endpoint: String,
    /// The node whose API took the request (`local` in single-process mode).
    pub by: String,
    #[serde(with = "event::time")]
    pub at: SystemTime,
}

/// `intent/backends/LB/ADDRESS`: present while the backend is drained.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainedBackend {
    pub load_balancer: String,
    pub address: SocketAddr,
    pub by: String,
    #[serde(with = "event::time")]
    pub at: SystemTime,
}

/// `intent/capacity/SET`: the capacity an operator set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    pub scale_set: String,
    pub capacity: u32,
    pub by: String,
    #[serde(with = "event::time")]
    pub at: SystemTime,
}

/// `intent/drill`: the drill in progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drill {
    /// `outage`.
    pub kind: String,
    pub site: String,
    #[serde(with = "event::time")]
    pub started: SystemTime,
    /// When it ends by itself.
    #[serde(with = "event::time")]
    pub ends: SystemTime,
    pub by: String,
}

impl Drill {
    pub fn over(&self, now: SystemTime) -> bool {
        now >= self.ends
    }
}

/// `intent/reload`: a reload asked for, with the hash of the topology it should lead to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reload {
    pub hash: String,
    pub by: String,
    #[serde(with = "event::time")]
    pub at: SystemTime,
}

/// Every intent now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IntentSet {
    /// (profile, endpoint).
    pub disabled: BTreeSet<(String, String)>,
    /// (load balancer, backend).
    pub drained: BTreeSet<(String, SocketAddr)>,
    pub capacity: BTreeMap<String, u32>,
    /// With the record's revision, to end it only if unchanged.
    pub drill: Option<(Drill, u64)>,
    pub reload: Option<Reload>,
}

/// Why a drill could not start.
#[derive(Debug, thiserror::Error)]
pub enum DrillRefused {
    #[error("a drill of site {0} is already running; stop it first (tandem drill stop)")]
    Busy(String),
    #[error("no drill is running")]
    NotRunning,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The intent records: written through the store, read from a mirror.
#[derive(Debug)]
pub struct Intents {
    store: Arc<dyn Store>,
    mirror: Arc<Mirror>,
    /// Who writes: this node's name, or `local`.
    by: String,
    /// The mirror revision this node has applied.
    applied: watch::Sender<u64>,
}

impl Intents {
    /// Starts mirroring the intent records; must run inside a tokio runtime.
    pub fn start(store: Arc<dyn Store>, by: &str) -> Arc<Self> {
        Arc::new(Intents {
            mirror: Mirror::start(store.clone(), keys::INTENT),
            store,
            by: by.to_string(),
            applied: watch::Sender::new(0),
        })
    }

    /// Changes whenever an intent record changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.mirror.subscribe()
    }

    /// The store revision the mirror reflects; pass it to [`Intents::mark_applied`].
    pub fn revision(&self) -> u64 {
        self.mirror.revision()
    }

    /// Whether the mirror follows the store (false: the last intents known are used).
    pub fn synced(&self) -> bool {
        self.mirror.synced()
    }

    /// Records that this node has applied every intent up to `revision`.
    pub fn mark_applied(&self, revision: u64) {
        self.applied.send_if_modified(|a| {
            let newer = revision > *a;
            if newer {
                *a = revision;
            }
            newer
        });
    }

    /// Waits (at most `deadline`) until this node has applied a write at `revision`.
    pub async fn applied(&self, revision: u64, deadline: Duration) -> bool {
        let mut rx = self.applied.subscribe();
        tokio::time::timeout(deadline, async {
            while *rx.borrow_and_update() < revision {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
        .await
        .is_ok()
    }

    /// Every intent now, parsed; a record that does not parse is skipped.
    pub fn current(&self) -> IntentSet {
        self.mirror.with(|records| {
            let mut set = IntentSet::default();
            for (key, r) in records {
                if key == keys::DRILL {
                    set.drill = r.json::<Drill>().map(|d| (d, r.revision));
                } else if key == keys::RELOAD {
                    set.reload = r.json();
                } else if let Some(e) = r
                    .json::<DisabledEndpoint>()
                    .filter(|_| key.starts_with(&format!("{}endpoints/", keys::INTENT)))
                {
                    set.disabled.insert((e.profile, e.endpoint));
                } else if let Some(b) = r
                    .json::<DrainedBackend>()
                    .filter(|_| key.starts_with(&format!("{}backends/", keys::INTENT)))
                {
                    set.drained.insert((b.load_balancer, b.address));
                } else if let Some(c) = r.json::<Capacity>() {
                    set.capacity.insert(c.scale_set, c.capacity);
                }
            }
            set
        })
    }

    /// Disables (or enables again) an endpoint; the revision of the write.
    pub async fn set_endpoint(
        &self,
        profile: &str,
        endpoint: &str,
        enabled: bool,
    ) -> Result<u64, StoreError> {
        let key = keys::disabled_endpoint(profile, endpoint);
        if enabled {
            return self.remove(&key).await;
        }
        let record = DisabledEndpoint {
            profile: profile.into(),
            endpoint: endpoint.into(),
            by: self.by.clone(),
            at: SystemTime::now(),
        };
        self.store
            .put_json(&key, &record, Scope::Persistent, Expect::Any)
            .await
    }

    /// Drains (or enables again) a backend; the revision of the write.
    pub async fn set_draining(
        &self,
        lb: &str,
        address: SocketAddr,
        draining: bool,
    ) -> Result<u64, StoreError> {
        let key = keys::drained_backend(lb, &address.to_string());
        if !draining {
            return self.remove(&key).await;
        }
        let record = DrainedBackend {
            load_balancer: lb.into(),
            address,
            by: self.by.clone(),
            at: SystemTime::now(),
        };
        self.store
            .put_json(&key, &record, Scope::Persistent, Expect::Any)
            .await
    }

    /// Sets a scale set's capacity; the revision of the write.
    pub async fn set_capacity(&self, set: &str, capacity: u32) -> Result<u64, StoreError> {
        let record = Capacity {
            scale_set: set.into(),
            capacity,
            by: self.by.clone(),
            at: SystemTime::now(),
        };
        self.store
            .put_json(
                &keys::capacity(set),
                &record,
                Scope::Persistent,
                Expect::Any,
            )
            .await
    }

    /// Starts an outage drill of `site` for `length`, unless one runs; the drill and the
    /// revision of the write.
    pub async fn start_drill(
        &self,
        site: &str,
        length: Duration,
    ) -> Result<(Drill, u64), DrillRefused> {
        let now = SystemTime::now();
        let expect = match self.store.read(keys::DRILL).await? {
            Some(r) => match r.json::<Drill>() {
                Some(d) if !d.over(now) => return Err(DrillRefused::Busy(d.site)),
                // Over but not cleaned up yet (its node is away): replace it.
                _ => Expect::Revision(r.revision),
            },
            None => Expect::Absent,
        };
        let drill = Drill {
            kind: "outage".into(),
            site: site.into(),
            started: now,
            ends: now + length,
            by: self.by.clone(),
        };
        let revision = match self
            .store
            .put_json(keys::DRILL, &drill, Scope::Persistent, expect)
            .await
        {
            Ok(r) => r,
            Err(StoreError::Conflict { .. }) => {
                let busy = self
                    .store
                    .read(keys::DRILL)
                    .await?
                    .and_then(|r| r.json::<Drill>())
                    .map_or_else(|| site.to_string(), |d| d.site);
                return Err(DrillRefused::Busy(busy));
            }
            Err(e) => return Err(e.into()),
        };
        Ok((drill, revision))
    }

    /// Ends the drill in progress now; the drill and the revision of the write.
    pub async fn stop_drill(&self) -> Result<(Drill, u64), DrillRefused> {
        let r = self
            .store
            .read(keys::DRILL)
            .await?
            .ok_or(DrillRefused::NotRunning)?;
        let drill = r.json::<Drill>().ok_or(DrillRefused::NotRunning)?;
        if drill.over(SystemTime::now()) {
            return Err(DrillRefused::NotRunning);
        }
        match self
            .store
            .delete(keys::DRILL, Expect::Revision(r.revision))
            .await
        {
            Ok(_) => Ok((drill, self.store.list(keys::DRILL).await?.1)),
            Err(StoreError::Conflict { .. }) => Err(DrillRefused::NotRunning),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes a drill record that ran out, if it is still the one seen (revision `r`).
    pub async fn end_drill(&self, r: u64) -> Result<bool, StoreError> {
        match self.store.delete(keys::DRILL, Expect::Revision(r)).await {
            Ok(deleted) => Ok(deleted),
            Err(StoreError::Conflict { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Asks every node to reload to the topology of `hash`; the revision of the write.
    pub async fn reload(&self, hash: &str) -> Result<u64, StoreError> {
        let record = Reload {
            hash: hash.into(),
            by: self.by.clone(),
            at: SystemTime::now(),
        };
        self.store
            .put_json(keys::RELOAD, &record, Scope::Persistent, Expect::Any)
            .await
    }

    async fn remove(&self, key: &str) -> Result<u64, StoreError> {
        self.store.delete(key, Expect::Any).await?;
        // A delete's own revision is not returned; the store's revision now covers it.
        Ok(self.store.list(key).await?.1)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn intents_round_trip_and_one_drill_at_a_time() {
        let store: Arc<dyn Store> = Arc::new(store::Embedded::in_memory());
        let i = Intents::start(store, "edge-1");
        let r = i.set_endpoint("www", "edge", false).await.unwrap();
        i.set_draining("edge-web", "127.0.1.31:8080".parse().unwrap(), true)
            .await
            .unwrap();
        i.set_capacity("edge-web", 3).await.unwrap();
        let (d, _) = i
            .start_drill("edge", Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(d.site, "edge");
        assert!(matches!(
            i.start_drill("region", Duration::from_secs(60)).await,
            Err(DrillRefused::Busy(s)) if s == "edge"
        ));
        let last = i.reload("abc").await.unwrap();
        assert!(last > r);
        assert!(i.mirror.caught_up(last, Duration::from_secs(5)).await);
        let set = i.current();
        assert!(set.disabled.contains(&("www".into(), "edge".into())));
        assert_eq!(set.drained.len(), 1);
        assert_eq!(set.capacity.get("edge-web"), Some(&3));
        assert_eq!(
            set.drill.as_ref().map(|(d, _)| d.site.as_str()),
            Some("edge")
        );
        assert_eq!(set.reload.map(|r| r.hash), Some("abc".into()));
        let (_, r) = i.stop_drill().await.unwrap();
        assert!(matches!(
            i.stop_drill().await,
            Err(DrillRefused::NotRunning)
        ));
        let r2 = i.set_endpoint("www", "edge", true).await.unwrap();
        assert!(i.mirror.caught_up(r.max(r2), Duration::from_secs(5)).await);
        let set = i.current();
        assert!(set.drill.is_none() && set.disabled.is_empty());
    }
}
